"""Routes: the REST API (/api/v1, for browsers and scripts, login + CSRF), the peer API
(/peer/v1, for the other node's console, cluster client certificate) and the health checks
(/health, /primary, /secondary, no login, for load balancers).

The API acts on "nodes": this one (`node.LocalNode`) and the peer (`peer.RemoteNode`, which
calls the peer API, which calls the peer's LocalNode). Both have the same methods, so every
route below is written once for either node.
"""

from __future__ import annotations

import json
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from flask import Blueprint, Response, current_app, jsonify, request
from flask.typing import ResponseReturnValue

from appliance.config import ClusterConfig, load_cluster, parse_cluster
from appliance.console import auth, peer
from appliance.console.node import ConsoleError, LocalNode, check_module, recommend
from appliance.errors import ConfigError, MirrorhaError
from appliance.files import write_atomic
from appliance.keys import export_bundle, import_bundle, init_cluster
from appliance.paths import DEFAULT_MODULE, Paths
from appliance.replication import tls

api = Blueprint("api", __name__, url_prefix="/api/v1")
peer_api = Blueprint("peer", __name__, url_prefix="/peer/v1")
health = Blueprint("health", __name__)

LAN = "default"  # the one network the console's cluster.xml has


class NodeOps(Protocol):
    name: str

    def hello(self) -> dict[str, Any]: ...
    def state(self, module: str) -> dict[str, Any]: ...
    def check(self, module: str, files: dict[str, str]) -> dict[str, Any]: ...
    def deploy(self, module: str, files: dict[str, str]) -> str: ...
    def command(self, module: str, name: str) -> None: ...
    def logs(self, module: str, kind: str, lines: int = 200, offset: int | None = None,
             wait_s: float = 10.0) -> dict[str, Any]: ...
    def snapshot(self, module: str) -> bytes: ...
    def boot(self, module: str) -> dict[str, Any]: ...
    def set_boot(self, module: str, on: bool) -> dict[str, Any]: ...
    def freshness(self, module: str) -> dict[str, Any]: ...


@dataclass
class Console:
    """What the routes share: this node, its files, the login limiter, the live sessions."""

    home: Path
    local: LocalNode
    files: auth.ConsoleFiles
    peer_port: int = peer.CONSOLE_PORT
    limiter: auth.LoginLimiter = field(default_factory=auth.LoginLimiter)
    sessions: auth.Sessions = field(default_factory=auth.Sessions)
    # Held while a cluster is created here (PUT /nodes) or installed by a join: one at a time.
    installing: threading.Lock = field(default_factory=threading.Lock)
    # Held by a PUT config (validate and deploy on both nodes): one at a time.
    deploying: threading.Lock = field(default_factory=threading.Lock)

    def cluster(self) -> ClusterConfig | None:
        path = Paths(self.home).cluster_xml
        if not path.is_file():
            return None
        try:
            return load_cluster(path)
        except ConfigError as e:
            raise ConsoleError(500, "bad_cluster", str(e)) from None

    def node_list(self) -> list[tuple[str, str]]:
        """(name, address on the first lan) of both nodes, in cluster.xml's order; only this
        node while there is no cluster."""
        cluster = self.cluster()
        if cluster is None:
            return [(self.local.name, "")]
        return [(n.name, str(n.addr(cluster.lans[0]))) for n in cluster.nodes]

    def ops(self, name: str) -> NodeOps:
        for node, addr in self.node_list():
            if node == name:
                if node == self.local.name:
                    return self.local
                return peer.RemoteNode(Paths(self.home).pki_dir, self.local.name, node, addr,
                                       self.peer_port)
        raise ConsoleError(404, "not_found", f"no node {name!r} in this cluster")

    def all_ops(self) -> list[NodeOps]:
        return [self.ops(name) for name, _ in self.node_list()]


def console() -> Console:
    return current_app.extensions["mirrorha"]  # type: ignore[no-any-return]


def body_json() -> dict[str, Any]:
    data = request.get_json(silent=True)
    if not isinstance(data, dict):
        raise ConsoleError(400, "bad_request", "expected a JSON object "
                           "(Content-Type: application/json)")
    return data


def module_arg(module: str) -> str:
    check_module(module)
    return module


# ---------------------------------------------------------------------------------------------
# /api/v1: login


@api.post("/login")
def login() -> ResponseReturnValue:
    """JSON only: a cross-site form cannot post JSON (no login CSRF), and SameSite=Strict keeps
    the cookie off cross-site requests afterwards."""
    data = body_json()
    username, password = data.get("username", auth.ADMIN_USER), data.get("password")
    authenticate(username, password, "wrong user name or password")
    return jsonify({"csrf_token": auth.start_session(str(username))})


def authenticate(username: Any, password: Any, wrong: str) -> None:
    """The admin's credentials (login, and the bootstrap join), rate-limited per client
    address: the socket's peer, never a header a client could forge (X-Forwarded-For...)."""
    c = console()
    client = request.remote_addr or "?"
    wait = c.limiter.attempt(client)
    if wait is not None:
        raise ConsoleError(429, "rate_limited", f"too many failed logins from {client}; try "
                           f"again in {int(wait) + 1} s")
    if not isinstance(username, str) or not isinstance(password, str) or \
            not auth.check_password(c.files, username, password):
        raise ConsoleError(401, "bad_credentials", wrong)
    c.limiter.succeeded(client)


@api.post("/logout")
@auth.api_login_required
def logout() -> ResponseReturnValue:
    auth.end_session()
    return jsonify({"ok": True})


@api.get("/session")
@auth.api_login_required
def session_info() -> ResponseReturnValue:
    return jsonify({"user": auth.current_user(), "csrf_token": auth.csrf_token()})


@api.get("/hello")
@peer_api.get("/hello")  # the same answer to the peer (who it is talking to)
def hello() -> ResponseReturnValue:
    return jsonify(console().local.hello())


# ---------------------------------------------------------------------------------------------
# /api/v1: the cluster's nodes


@api.get("/nodes")
@auth.api_login_required
def get_nodes() -> ResponseReturnValue:
    c = console()
    cluster = c.cluster()
    nodes = []
    for name, addr in c.node_list():
        entry: dict[str, Any] = {"name": name, "addr": addr or None,
                                 "local": name == c.local.name, "reachable": True,
                                 "error": None}
        if name != c.local.name:
            try:
                c.ops(name).hello()
            except ConsoleError as e:
                entry.update(reachable=False, error=e.message)
        nodes.append(entry)
    return jsonify({"nodes": nodes, "configured": cluster is not None})


@api.put("/nodes")
@auth.api_login_required
def put_nodes() -> ResponseReturnValue:
    """Both nodes by address: writes cluster.xml, creates the cluster key, CA and node
    certificates, installs them on the peer (bootstrap join) and here, and switches both
    consoles to the cluster certificates."""
    c = console()
    entries = _node_entries(body_json())
    local_i = _local_index(entries)
    peer_i = 1 - local_i
    peer_addr = entries[peer_i]["addr"]
    password = entries[peer_i].get("password")
    if not isinstance(password, str) or not password:
        raise ConsoleError(400, "invalid_nodes", "the new node's admin password is needed",
                           [_node_field(peer_i, "password", "required: the admin password of "
                                        f"the console on {peer_addr}")])
    peer_hello = peer.hello(peer_addr, c.peer_port)
    names = ["", ""]
    names[local_i], names[peer_i] = c.local.name, peer_hello["node"]
    for i, name in enumerate(names):
        try:
            tls.check_node_name(name)
        except tls.TlsError as e:
            raise ConsoleError(400, "invalid_nodes", str(e),
                               [_node_field(i, "addr", str(e))]) from None
    if names[0] == names[1]:
        raise ConsoleError(400, "invalid_nodes", f"both nodes are called {names[0]!r}: give "
                           "them different host names (MIRRORHA_NODE)",
                           [_node_field(peer_i, "addr", "same node name as this node")])
    text = cluster_xml_text(names, [e["addr"] for e in entries])
    if not c.installing.acquire(blocking=False):
        raise ConsoleError(409, "busy", "a cluster is being created on this node already")
    try:
        return _create_cluster(c, names, entries, local_i, password, text)
    finally:
        c.installing.release()


def _create_cluster(c: Console, names: list[str], entries: list[dict[str, Any]], local_i: int,
                    password: str, text: str) -> ResponseReturnValue:
    peer_i = 1 - local_i
    existing = c.cluster()
    if existing is not None:
        if _same_cluster(existing, names, entries):
            return jsonify({"nodes": _nodes_answer(names, entries, local_i), "configured": True,
                            "changed": False})
        raise ConsoleError(409, "configured", "this node already belongs to a cluster of "
                           + " and ".join(f"{n.name} ({n.addr(existing.lans[0])})"
                                          for n in existing.nodes))
    if Paths(c.home).cluster_key.exists():
        raise ConsoleError(409, "configured", f"{Paths(c.home).cluster_key} exists without "
                           "cluster.xml; remove it deliberately to create a new cluster")
    with tempfile.TemporaryDirectory(prefix="mirrorha-cluster-") as tmp:
        staging = Paths(Path(tmp))
        init_cluster(staging, names)
        bundle = export_bundle(staging, names[peer_i])
        peer.join(entries[peer_i]["addr"], c.peer_port, {
            "username": auth.ADMIN_USER, "password": password, "cluster_xml": text,
            "bundle": bundle})
        try:
            install_cluster(c, text, export_bundle(staging, names[local_i]), staging)
        except (OSError, MirrorhaError) as e:
            peer_name = names[peer_i]
            raise ConsoleError(500, "half_configured", f"{peer_name} has joined the new "
                               f"cluster, but installing it on {c.local.name} failed: {e}. "
                               f"To start over, remove cluster.xml, cluster.key and pki/ from "
                               f"the home of both nodes, then save the nodes again") from None
    return jsonify({"nodes": _nodes_answer(names, entries, local_i), "configured": True,
                    "changed": True})


def _node_entries(data: dict[str, Any]) -> list[dict[str, Any]]:
    nodes = data.get("nodes")
    if not isinstance(nodes, list) or len(nodes) != 2 or \
            not all(isinstance(n, dict) for n in nodes):
        raise ConsoleError(400, "invalid_nodes", "exactly two nodes are needed",
                           [{"file": None, "line": None, "field": "nodes",
                             "message": "a list of two {\"addr\": ...} objects"}])
    errors = []
    for i, n in enumerate(nodes):
        try:
            n["addr"] = str(IPv4Address(str(n.get("addr", "")).strip()))
        except ValueError:
            errors.append(_node_field(i, "addr", f"{n.get('addr')!r} is not an IPv4 address"))
    if not errors and nodes[0]["addr"] == nodes[1]["addr"]:
        errors.append(_node_field(1, "addr", "both nodes have the same address"))
    if errors:
        raise ConsoleError(400, "invalid_nodes", "invalid node addresses", errors)
    return nodes


def _local_index(entries: list[dict[str, Any]]) -> int:
    local = [i for i, e in enumerate(entries) if is_local_address(e["addr"])]
    if len(local) != 1:
        which = "none" if not local else "both"
        raise ConsoleError(400, "invalid_nodes", f"{which} of the addresses belong to this "
                           "node: give this node's address and the other node's",
                           [_node_field(0, "addr", f"{which} of the addresses are local")])
    return local[0]


def _node_field(i: int, name: str, message: str) -> dict[str, Any]:
    return {"file": None, "line": None, "field": f"nodes[{i}].{name}", "message": message}


def _nodes_answer(names: list[str], entries: list[dict[str, Any]], local_i: int
                  ) -> list[dict[str, Any]]:
    return [{"name": n, "addr": e["addr"], "local": i == local_i, "reachable": True,
             "error": None} for i, (n, e) in enumerate(zip(names, entries, strict=True))]


def _same_cluster(cluster: ClusterConfig, names: list[str], entries: list[dict[str, Any]]
                  ) -> bool:
    lan = cluster.lans[0]
    return [(n.name, str(n.addr(lan))) for n in cluster.nodes] == \
        list(zip(names, [e["addr"] for e in entries], strict=True))


def is_local_address(addr: str) -> bool:
    """An address configured on one of this machine's interfaces. (Not a bind() test: with
    net.ipv4.ip_nonlocal_bind any address would pass.)"""
    import psutil
    return any(a.family == socket.AF_INET and a.address == addr
               for entries in psutil.net_if_addrs().values() for a in entries)


def cluster_xml_text(names: list[str], addrs: list[str]) -> str:
    nodes = "".join(f'      <node name="{n}" addr="{a}"/>\n'
                    for n, a in zip(names, addrs, strict=True))
    return (f'<cluster>\n  <lans>\n    <lan name="{LAN}">\n{nodes}    </lan>\n  </lans>\n'
            "</cluster>\n")


def install_cluster(c: Console, cluster_xml: str, bundle: str, staging: Paths | None) -> None:
    """cluster.xml, key and certificates into this node's home; the console serves its
    cluster certificate from the next connection on. The CA's private key stays only on the
    node that created the cluster (`staging`: where it was made)."""
    paths = Paths(c.home)
    import_bundle(paths, bundle, "the cluster bundle")
    if staging is not None:
        write_atomic(paths.pki_dir / tls.CA_KEY, (staging.pki_dir / tls.CA_KEY
                                                        ).read_bytes())
    write_atomic(paths.cluster_xml, cluster_xml.encode(), 0o644)
    auth.install_cluster_cert(c.files, c.local.name)


# ---------------------------------------------------------------------------------------------
# /api/v1: modules


@api.get("/modules")
@auth.api_login_required
def modules() -> ResponseReturnValue:
    return jsonify({"modules": console().local.modules()})


@api.get("/modules/<module>/config")
@auth.api_login_required
def get_config(module: str) -> ResponseReturnValue:
    return jsonify(console().local.read_config(module_arg(module)))


@api.post("/modules/<module>/config/validate")
@auth.api_login_required
def validate_config(module: str) -> ResponseReturnValue:
    body, status = _check_everywhere(module_arg(module), body_json())
    return jsonify(body), status


@api.put("/modules/<module>/config")
@auth.api_login_required
def put_config(module: str) -> ResponseReturnValue:
    """Validate on both nodes, then deploy on both; nothing anywhere if a node refuses."""
    module = module_arg(module)
    c = console()
    if not c.deploying.acquire(blocking=False):
        raise ConsoleError(409, "busy", "another deployment is under way from this console; "
                           "try again when it has finished")
    try:
        return _validate_and_deploy(c, module)
    finally:
        c.deploying.release()


def _validate_and_deploy(c: Console, module: str) -> ResponseReturnValue:
    if c.cluster() is None:
        raise ConsoleError(409, "not_configured", "add both nodes first (PUT /api/v1/nodes)")
    body, status = _check_everywhere(module, body_json())
    if status != 200:
        return jsonify(body), status
    blockers = [f"{n}: {r['blocker']}" for n, r in body["nodes"].items() if r.get("blocker")]
    if blockers:
        raise ConsoleError(409, "module_running", "; ".join(blockers))
    files = c.local.complete_files(module, body_json())
    results: dict[str, Any] = {}
    done: list[str] = []
    failed: tuple[str, ConsoleError] | None = None
    for ops in c.all_ops():
        if failed is not None:  # one node changed at most while the operator is told why
            results[ops.name] = {"ok": False, "message": f"not deployed ({failed[0]} failed "
                                 f"first): nothing changed on {ops.name}"}
            continue
        try:
            results[ops.name] = {"ok": True, "message": ops.deploy(module, files)}
            done.append(ops.name)
        except ConsoleError as e:
            results[ops.name] = {"ok": False, "message": e.message}
            failed = (ops.name, e)
    if failed is None:
        return jsonify({"nodes": results})
    name, e = failed
    if done:
        error = ConsoleError(e.status, "partial_deploy", f"deployed on {', '.join(done)} but "
                             f"not on {name} ({e.message}): the nodes' configurations now "
                             f"differ; fix {name} and apply again", e.fields)
    else:
        error = ConsoleError(e.status, "deploy_failed", f"deployed nowhere: {e.message}",
                             e.fields)
    return jsonify({"nodes": results, **error.body()}), e.status


def _check_everywhere(module: str, data: dict[str, Any]) -> tuple[dict[str, Any], int]:
    c = console()
    files = c.local.complete_files(module, data)
    nodes: dict[str, Any] = {}
    fields: list[dict[str, Any]] = []
    unreachable = []
    for ops in c.all_ops():
        try:
            result = ops.check(module, files)
        except ConsoleError as e:
            if e.status != 502:
                raise
            unreachable.append(e.message)
            nodes[ops.name] = {"ok": False, "reachable": False, "errors": [], "blocker": None,
                               "message": e.message}
            continue
        errors = result["errors"]
        nodes[ops.name] = {"ok": not errors, "reachable": True, "errors": errors,
                           "blocker": result.get("blocker")}
        fields += [{**e, "node": ops.name} for e in errors]
    body: dict[str, Any] = {"nodes": nodes}
    if fields:  # first: what the operator can fix now, even with the peer away
        failing = ", ".join(n for n, r in nodes.items() if r["reachable"] and not r["ok"])
        body.update(ConsoleError(400, "invalid_config", f"invalid configuration on {failing}",
                                 fields).body())
        return body, 400
    if unreachable:
        body.update(ConsoleError(502, "peer_unreachable", "; ".join(unreachable)).body())
        return body, 502
    return body, 200


@api.get("/modules/<module>/state")
@auth.api_login_required
def module_state(module: str) -> ResponseReturnValue:
    module = module_arg(module)
    nodes = {}
    for ops in console().all_ops():
        try:
            nodes[ops.name] = ops.state(module)
        except ConsoleError as e:
            nodes[ops.name] = {"reachable": False, "state": None, "daemon": None,
                               "error": e.message}
    return jsonify({"nodes": nodes})


@api.post("/modules/<module>/nodes/<node>/commands/<cmd>")
@auth.api_login_required
def command(module: str, node: str, cmd: str) -> ResponseReturnValue:
    console().ops(node).command(module_arg(module), cmd)
    return jsonify({"ok": True})


@api.get("/modules/<module>/nodes/<node>/logs/<kind>")
@auth.api_login_required
def logs(module: str, node: str, kind: str) -> ResponseReturnValue:
    lines, offset, wait = _log_args()
    return jsonify(console().ops(node).logs(module_arg(module), kind, lines, offset, wait))


def _log_args() -> tuple[int, int | None, float]:
    try:
        lines = int(request.args.get("lines", 200))
        offset = int(request.args["offset"]) if "offset" in request.args else None
        wait = float(request.args.get("wait", 10))
    except ValueError:
        raise ConsoleError(400, "bad_request", "lines, offset and wait are numbers") from None
    return lines, offset, wait


@api.get("/modules/<module>/nodes/<node>/snapshot")
@auth.api_login_required
def snapshot(module: str, node: str) -> ResponseReturnValue:
    return _zip(console().ops(node).snapshot(module_arg(module)), node)


def _zip(data: bytes, node: str) -> Response:
    name = f"mirrorha-snapshot-{node}-{time.strftime('%Y%m%d-%H%M%S')}.zip"
    return Response(data, mimetype="application/zip", headers={
        "Content-Disposition": f"attachment; filename*=UTF-8''{quote(name)}"})


@api.get("/modules/<module>/nodes/<node>/boot")
@auth.api_login_required
def get_boot(module: str, node: str) -> ResponseReturnValue:
    return jsonify(console().ops(node).boot(module_arg(module)))


@api.put("/modules/<module>/nodes/<node>/boot")
@auth.api_login_required
def put_boot(module: str, node: str) -> ResponseReturnValue:
    return jsonify(console().ops(node).set_boot(module_arg(module), _on_flag()))


def _on_flag() -> bool:
    on = body_json().get("on")
    if not isinstance(on, bool):
        raise ConsoleError(400, "bad_request", 'send {"on": true} or {"on": false}',
                           [{"file": None, "line": None, "field": "on",
                             "message": "must be true or false"}])
    return on


@api.get("/modules/<module>/recommendation")
@auth.api_login_required
def recommendation(module: str) -> ResponseReturnValue:
    module = module_arg(module)
    c = console()
    fresh: dict[str, dict[str, Any] | None] = {}
    errors = {}
    for ops in c.all_ops():
        try:
            fresh[ops.name] = ops.freshness(module)
        except ConsoleError as e:
            fresh[ops.name], errors[ops.name] = None, e.message
    best, why = recommend([n for n, _ in c.node_list()], fresh)
    return jsonify({"node": best, "why": why, "nodes": fresh, "errors": errors})


# ---------------------------------------------------------------------------------------------
# /peer/v1: the other node's console (mutual TLS with the cluster's certificates)


def verified_peer() -> str | None:
    """The cluster node name in the client certificate the TLS layer verified against the
    cluster CA (gunicorn puts the connection in the WSGI environ), None without one."""
    sock = request.environ.get("gunicorn.socket")
    getpeercert: Callable[[], Any] | None = getattr(sock, "getpeercert", None)
    if getpeercert is None:
        return None
    try:
        return tls.peer_node_name(getpeercert())
    except (tls.TlsError, ValueError):
        return None


@peer_api.before_request
def require_cluster_cert() -> None:
    if request.endpoint == "peer.peer_join":
        return
    """Only the other node of cluster.xml: this CA's certificate for this very node (what our
    own console holds) or for a name outside cluster.xml is no peer."""
    c = console()
    name = verified_peer()
    cluster = c.cluster()
    peers = [n.name for n in cluster.nodes if n.name != c.local.name] if cluster else []
    if name is None or name not in peers:
        raise ConsoleError(403, "peer_cert", "the peer API needs the client certificate of "
                           "this cluster's other node")


@peer_api.post("/join")
def peer_join() -> ResponseReturnValue:
    """Bootstrap: the node creating the cluster installs it here, proving it knows this node's
    admin password (no cluster certificate exists yet)."""
    c = console()
    _refuse_if_member(c)  # before the password: a configured node is no password oracle
    data = body_json()
    authenticate(data.get("username", auth.ADMIN_USER), data.get("password", ""),
                 f"wrong admin password for the console of {c.local.name}")
    text, bundle = data.get("cluster_xml"), data.get("bundle")
    if not isinstance(text, str) or not isinstance(bundle, str):
        raise ConsoleError(400, "bad_request", "cluster_xml and bundle are needed")
    try:
        new = parse_cluster(text, Path("cluster.xml"))
        me = new.node(c.local.name)
    except ConfigError as e:
        raise ConsoleError(400, "invalid_nodes", f"{c.local.name}: {e}") from None
    mine = me.addr(new.lans[0])
    # Loopback too: all of 127/8 is this machine's (a cluster of two consoles on one host).
    if not (is_local_address(str(mine)) or mine.is_loopback):
        raise ConsoleError(400, "invalid_nodes", f"{me.addr(new.lans[0])} is not an address "
                           f"of {c.local.name}")
    # Not waiting: both consoles creating a cluster with each other at once would each hold
    # its lock while joining the other.
    if not c.installing.acquire(blocking=False):
        raise ConsoleError(409, "busy", f"{c.local.name} is creating a cluster itself")
    try:
        _refuse_if_member(c)
        with tempfile.TemporaryDirectory(prefix="mirrorha-join-") as tmp:
            verify_bundle(bundle, c.local.name, Paths(Path(tmp)))  # all of it, before writing
        install_cluster(c, text, bundle, None)
    finally:
        c.installing.release()
    return jsonify({"ok": True, "node": c.local.name})


def _refuse_if_member(c: Console) -> None:
    paths = Paths(c.home)
    if c.cluster() is not None or paths.cluster_key.exists() or \
            (paths.pki_dir / tls.CA_CERT).exists():
        raise ConsoleError(409, "configured", f"{c.local.name} already belongs to a cluster")


def verify_bundle(bundle: str, node: str, staging: Paths) -> None:
    """What a join brings must be exactly this node's: a cluster key, a CA certificate and
    NODE's certificate (issued by that CA, naming NODE alone) with its key. Unpacked into
    `staging`: a bad bundle leaves nothing behind in the node's home."""
    try:
        import_bundle(staging, bundle, "the cluster bundle")
    except MirrorhaError as e:
        raise ConsoleError(400, "bad_bundle", f"{node}: {e}") from None
    pki = staging.pki_dir
    expected = sorted([tls.CA_CERT, f"{node}.pem", f"{node}.key"])
    found = sorted(p.name for p in pki.iterdir()) if pki.is_dir() else []
    if found != expected:
        raise ConsoleError(400, "bad_bundle", f"{node}: the bundle must hold "
                           f"{', '.join(expected)}, not {', '.join(found) or 'nothing'}")
    try:
        ca = x509.load_pem_x509_certificate((pki / tls.CA_CERT).read_bytes())
        cert = x509.load_pem_x509_certificate((pki / f"{node}.pem").read_bytes())
        cert.verify_directly_issued_by(ca)
        names = cert.extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
        tls.server_context(pki, node)  # loads: the key is the certificate's
    except (ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound,
            tls.TlsError) as e:
        raise ConsoleError(400, "bad_bundle", f"{node}: the bundle's certificates do not "
                           f"hold together: {e or type(e).__name__}") from None
    if names != [node]:
        raise ConsoleError(400, "bad_bundle", f"{node}: the bundle's certificate is for "
                           f"{', '.join(names) or 'no name'}")


@peer_api.get("/modules/<module>/state")
def peer_state(module: str) -> ResponseReturnValue:
    return jsonify(console().local.state(module_arg(module)))


@peer_api.post("/modules/<module>/validate")
def peer_validate(module: str) -> ResponseReturnValue:
    local = console().local
    files = local.complete_files(module_arg(module), body_json())
    return jsonify(local.check(module, files))


@peer_api.put("/modules/<module>/config")
def peer_deploy(module: str) -> ResponseReturnValue:
    local = console().local
    files = local.complete_files(module_arg(module), body_json())
    return jsonify({"ok": True, "message": local.deploy(module, files)})


@peer_api.post("/modules/<module>/commands/<cmd>")
def peer_command(module: str, cmd: str) -> ResponseReturnValue:
    console().local.command(module_arg(module), cmd)
    return jsonify({"ok": True})


@peer_api.get("/modules/<module>/logs/<kind>")
def peer_logs(module: str, kind: str) -> ResponseReturnValue:
    lines, offset, wait = _log_args()
    return jsonify(console().local.logs(module_arg(module), kind, lines, offset, wait))


@peer_api.get("/modules/<module>/snapshot")
def peer_snapshot(module: str) -> ResponseReturnValue:
    c = console()
    return _zip(c.local.snapshot(module_arg(module)), c.local.name)


@peer_api.get("/modules/<module>/boot")
def peer_get_boot(module: str) -> ResponseReturnValue:
    return jsonify(console().local.boot(module_arg(module)))


@peer_api.put("/modules/<module>/boot")
def peer_put_boot(module: str) -> ResponseReturnValue:
    return jsonify(console().local.set_boot(module_arg(module), _on_flag()))


@peer_api.get("/modules/<module>/freshness")
def peer_freshness(module: str) -> ResponseReturnValue:
    return jsonify(console().local.freshness(module_arg(module)))


# ---------------------------------------------------------------------------------------------
# Health checks for load balancers (no login, like Patroni's)


def _health(ok: Callable[[dict[str, Any]], bool]) -> ResponseReturnValue:
    c = console()
    module = request.args.get("module", DEFAULT_MODULE)
    try:
        st = c.local.daemon_state(module_arg(module))
    except (ConsoleError, MirrorhaError):
        st = None
    state = st["state"] if st else None
    status = 200 if st is not None and ok(st) else 503
    return Response(json.dumps({"state": state, "node": c.local.name}), status=status,
                    mimetype="application/json")


@health.get("/health")
def health_check() -> ResponseReturnValue:
    return _health(lambda st: True)


@health.get("/primary")
def primary_check() -> ResponseReturnValue:
    return _health(lambda st: st["state"] in ("PRIM", "ALONE"))


@health.get("/secondary")
def secondary_check() -> ResponseReturnValue:
    return _health(lambda st: st["state"] == "SECOND" and bool(st.get("in_sync")))
