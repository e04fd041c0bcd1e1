"""The console's security properties: no mutation without a session, logs and snapshots
confined to the module, log text escaped, and a peer API that only this cluster's nodes can
use (real gunicorn, real TLS, on loopback)."""

from __future__ import annotations

import io
import json
import socket
import ssl
import zipfile
from pathlib import Path

import pytest

from appliance.console import auth
from appliance.console.app import create_app
from appliance.keys import init_cluster
from appliance.paths import Paths
from tests.support.console import (
    PASSWORD,
    Api,
    ApiClient,
    cluster_home,
    console_home,
    free_port,
    peer_get,
    running_console,
    unverified,
)

SCRIPT_LINE = '2026-01-01 00:00:00.000 node1 I <script>alert("x")</script> & <b>bold</b>'


@pytest.fixture
def configured(tmp_path: Path) -> tuple[Api, Paths]:
    paths = cluster_home(tmp_path / "home", "node1", free_port())
    paths.log_dir.mkdir(parents=True, exist_ok=True)
    paths.module_log.write_text(SCRIPT_LINE + "\n")
    api = Api(create_app(paths.home, node="node1", peer_port=free_port()))
    api.login()
    return api, paths


def test_every_mutating_route_answers_401_without_a_session(tmp_path: Path) -> None:
    app = create_app(console_home(tmp_path / "home"), node="node1")
    api = Api(app)
    mutating = [(m, rule.rule) for rule in app.url_map.iter_rules()
                for m in rule.methods & {"POST", "PUT", "DELETE", "PATCH"}]
    assert len(mutating) >= 10
    for method, rule in mutating:
        path = (rule.replace("<module>", "mirror").replace("<node>", "node1")
                .replace("<cmd>", "stop").replace("<kind>", "module"))
        resp = api.call(method, path, {})
        if rule == "/api/v1/login":
            assert resp.status_code == 401  # wrong credentials, and nothing else happens
        elif rule == "/login":
            assert resp.status_code == 400  # the page's form without its script: no login
        elif rule == "/peer/v1/join":
            assert resp.status_code == 401  # the node's admin password is the credential
        elif rule.startswith("/peer/v1/"):
            assert resp.status_code == 403, rule  # no cluster client certificate
        else:
            assert resp.status_code == 401, (method, rule)
    assert not Paths(app.extensions["mirrorha"].home).cluster_xml.exists()


def test_a_log_line_with_markup_is_data_and_the_log_page_does_not_embed_it(
        configured: tuple[Api, Paths]) -> None:
    api, _ = configured
    resp = api.call("GET", "/api/v1/modules/mirror/nodes/node1/logs/module")
    assert resp.mimetype == "application/json"
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert resp.json["lines"] == [SCRIPT_LINE]
    assert b"<script>" not in resp.data  # JSON escapes < and > as \u003c \u003e
    page = api.call("GET", "/logs/node1/module")
    assert page.status_code == 200 and page.mimetype == "text/html"
    assert b'<script>alert("x")' not in page.data
    assert "script-src" in page.headers["Content-Security-Policy"] or \
        "default-src 'self'" in page.headers["Content-Security-Policy"]


def test_html_pages_escape_what_comes_from_the_request(configured: tuple[Api, Paths]) -> None:
    api, _ = configured
    page = api.call("GET", "/logs/node1/module?module=<script>x</script>")
    assert b"<script>x</script>" not in page.data


@pytest.mark.parametrize("path", [
    "/api/v1/modules/mirror/nodes/node1/logs/..%2F..%2F..%2Fetc%2Fpasswd",
    "/api/v1/modules/mirror/nodes/node1/logs/%2Fetc%2Fpasswd",
    "/api/v1/modules/mirror/nodes/node1/logs/../../../../etc/passwd",
    "/api/v1/modules/..%2F..%2Fetc/nodes/node1/logs/module",
    "/api/v1/modules/%2Fetc/nodes/node1/snapshot",
    "/api/v1/modules/mirror/nodes/..%2F..%2Fetc/logs/module",
])
def test_path_parameters_cannot_leave_the_module(configured: tuple[Api, Paths],
                                                 path: str) -> None:
    api, _ = configured
    resp = api.call("GET", path)
    assert resp.status_code == 404, resp.data
    assert b"root:" not in resp.data


def test_a_log_file_symlinked_outside_is_refused(configured: tuple[Api, Paths],
                                                tmp_path: Path) -> None:
    api, paths = configured
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP SECRET\n")
    paths.app_log.symlink_to(secret)
    resp = api.call("GET", "/api/v1/modules/mirror/nodes/node1/logs/application")
    assert resp.status_code == 403 and b"TOP SECRET" not in resp.data
    follow = api.call("GET", "/api/v1/modules/mirror/nodes/node1/logs/application?offset=0"
                             "&wait=0")
    assert follow.status_code == 403 and b"TOP SECRET" not in follow.data


def test_a_log_directory_symlinked_outside_is_refused(configured: tuple[Api, Paths],
                                                     tmp_path: Path) -> None:
    api, paths = configured
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "module.log").write_text("TOP SECRET\n")
    for f in paths.log_dir.iterdir():
        f.unlink()
    paths.log_dir.rmdir()
    paths.log_dir.symlink_to(outside)
    resp = api.call("GET", "/api/v1/modules/mirror/nodes/node1/logs/module")
    assert resp.status_code == 403 and b"TOP SECRET" not in resp.data
    snap = api.call("GET", "/api/v1/modules/mirror/nodes/node1/snapshot")
    with zipfile.ZipFile(io.BytesIO(snap.data)) as z:
        assert not [n for n in z.namelist() if n.startswith("mirror/log/")]


def test_the_snapshot_leaves_out_symlinks_keys_and_everything_outside(
        configured: tuple[Api, Paths], tmp_path: Path) -> None:
    api, paths = configured
    secret = tmp_path / "shadow"
    secret.write_text("TOP SECRET\n")
    (paths.log_dir / "evil.log").symlink_to(secret)
    (paths.bin_dir / "evil").symlink_to("/etc/passwd")
    resp = api.call("GET", "/api/v1/modules/mirror/nodes/node1/snapshot")
    assert resp.status_code == 200
    with zipfile.ZipFile(io.BytesIO(resp.data)) as z:
        names = z.namelist()
        content = b"".join(z.read(n) for n in names)
    assert "mirror/log/module.log" in names
    assert not [n for n in names if "evil" in n or n.endswith(".key") or "pki" in n]
    assert b"TOP SECRET" not in content and b"root:x:" not in content
    assert Paths(paths.home).cluster_key.read_text().strip().encode() not in content


# -- the peer API over real TLS ------------------------------------------------------------------


def _get(port: int, path: str, pki: Path | None, node: str = "node2") -> tuple[int, bytes]:
    """As `node` of the cluster whose certificates are in `pki` (None: no certificate)."""
    if pki is None:
        return peer_get(port, path)
    return peer_get(port, path, pki / f"{node}.pem")


def _served_cert(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            unverified().wrap_socket(raw) as s:
        cert = s.getpeercert(binary_form=True)
        assert cert is not None
        return cert


def test_peer_api_needs_a_client_certificate_of_this_cluster(
        tmp_path: Path, foreign_pki: Path) -> None:
    paths = cluster_home(tmp_path / "home", "node1", free_port())
    files = auth.ConsoleFiles(paths.home)
    auth.install_cluster_cert(files, "node1")
    port = free_port()
    with running_console(paths.home, "node1", "127.0.0.1", port):
        status, body = _get(port, "/peer/v1/hello", paths.pki_dir)
        assert status == 200 and json.loads(body)["node"] == "node1"
        status, body = _get(port, "/peer/v1/modules/mirror/state", paths.pki_dir)
        assert status == 200 and json.loads(body)["daemon"] == "not running"

        status, body = _get(port, "/peer/v1/hello", None)
        assert status == 403 and json.loads(body)["error"]["code"] == "peer_cert"

        # Same node names, another cluster's CA: the handshake itself fails.
        with pytest.raises((ssl.SSLError, ConnectionError)):
            _get(port, "/peer/v1/modules/mirror/state", foreign_pki)

        # A browser (no certificate) still gets the API and pages.
        status, _ = _get(port, "/api/v1/hello", None)
        assert status == 200


def test_a_replaced_certificate_is_served_without_a_restart(tmp_path: Path) -> None:
    """Started before the cluster exists (self-signed), then the cluster is created: its
    certificate is served from the next connection on. (A console started with the cluster
    already there serves the cluster's from the start: see server.run.)"""
    paths = Paths(console_home(tmp_path / "home"))
    port = free_port()
    with running_console(paths.home, "node1", "127.0.0.1", port):
        bootstrap = _served_cert(port)
        init_cluster(paths, ["node1", "node2"])
        auth.install_cluster_cert(auth.ConsoleFiles(paths.home), "node1")
        cluster_cert = _served_cert(port)
        assert cluster_cert != bootstrap
        expected = ssl.PEM_cert_to_DER_cert((paths.pki_dir / "node1.pem").read_text())
        assert cluster_cert == expected


def test_two_consoles_create_the_cluster_and_then_talk_over_mutual_tls(tmp_path: Path) -> None:
    """PUT /api/v1/nodes on node1 (127.0.0.1) with node2 (127.0.0.2) and its password: both
    get cluster.xml, the key and their certificates; node1 then reads node2 through the peer
    API. A wrong password for node2 changes nothing anywhere."""
    port = free_port()
    h1, h2 = console_home(tmp_path / "n1"), console_home(tmp_path / "n2")
    with running_console(h1, "node1", "127.0.0.1", port) as url1, \
            running_console(h2, "node2", "127.0.0.2", port):
        api = ApiClient(url1)
        api.login()
        nodes = [{"addr": "127.0.0.1"}, {"addr": "127.0.0.2", "password": "wrong password"}]
        status, body = api.put("/api/v1/nodes", {"nodes": nodes})
        assert status == 401 and "node2" in body["error"]["message"]
        assert not (h1 / "cluster.xml").exists() and not (h2 / "cluster.xml").exists()

        nodes[1]["password"] = PASSWORD
        status, body = api.put("/api/v1/nodes", {"nodes": nodes})
        assert status == 200, body
        assert [(n["name"], n["local"]) for n in body["nodes"]] == [("node1", True),
                                                                      ("node2", False)]
        for home in (h1, h2):
            assert (home / "cluster.xml").read_text() == (h1 / "cluster.xml").read_text()
            assert (home / "cluster.key").stat().st_mode & 0o777 == 0o600
        assert (h1 / "pki" / "ca.key").exists() and not (h2 / "pki" / "ca.key").exists()
        assert not (h2 / "pki" / "node1.key").exists()  # each node has only its own key
        served = ssl.PEM_cert_to_DER_cert((h2 / "pki" / "node2.pem").read_text())
        with socket.create_connection(("127.0.0.2", port), timeout=10) as raw, \
                unverified().wrap_socket(raw) as s:
            assert s.getpeercert(binary_form=True) == served

        status, body = api.get("/api/v1/nodes")
        assert status == 200 and body["configured"] is True
        assert all(n["reachable"] for n in body["nodes"]), body
        status, body = api.get("/api/v1/modules/mirror/state")
        assert body["nodes"]["node2"]["reachable"] is True, body
        assert body["nodes"]["node2"]["daemon"] == "not configured"

        again = api.put("/api/v1/nodes", {"nodes": nodes})
        assert again[0] == 200 and again[1]["changed"] is False
        other = api.put("/api/v1/nodes", {"nodes": [{"addr": "127.0.0.1"},
                                                    {"addr": "127.0.0.3", "password": "x"}]})
        assert other[0] in (409, 502)


def test_certificate_names_are_checked_by_the_peer_client(tmp_path: Path) -> None:
    """node1's client accepts only node2's certificate at node2's address: a console serving
    another node's certificate (here node1's own) is refused."""
    from appliance.console.node import ConsoleError
    from appliance.console.peer import RemoteNode
    paths = cluster_home(tmp_path / "home", "node1", free_port())
    auth.install_cluster_cert(auth.ConsoleFiles(paths.home), "node1")
    port = free_port()
    with running_console(paths.home, "node1", "127.0.0.1", port):
        impostor = RemoteNode(paths.pki_dir, "node1", "node2", "127.0.0.1", port)
        with pytest.raises(ConsoleError) as refused:
            impostor.hello()
        assert refused.value.code == "peer_untrusted"
        genuine = RemoteNode(paths.pki_dir, "node2", "node1", "127.0.0.1", port)
        assert genuine.hello()["node"] == "node1"
