"""The other node, seen from this console: an HTTPS client of its /peer/v1 API.

Mutual TLS with the cluster's own PKI: this node presents its cluster certificate, and only a
server certificate issued by the cluster CA for the peer's node name is accepted
(`appliance.replication.tls.client_context`, the replication channel's context, so the rules are
the same). Before the cluster exists there is nothing to verify against: the bootstrap calls
(`hello`, `join`) go unverified and `join` is authenticated by the peer's admin password.

The standard library's http.client is enough for a handful of JSON calls and avoids a
dependency (requests would bring four packages for nothing we need).
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from appliance.console import node
from appliance.console.node import ConsoleError
from appliance.replication import tls

CONSOLE_PORT = 9010
# How long to wait for the peer's answer, per kind of call. A hung peer (frozen, swapping)
# costs a state refresh of the dashboard (every second) QUICK_TIMEOUT_S; a command or a
# deploy waits for as long as the peer itself may legitimately take (starting or restarting
# its daemon: node.py's deadlines), or node1 would report a failure while node2 succeeds.
QUICK_TIMEOUT_S = 5.0
TIMEOUT_S = 15.0
FOLLOW_TIMEOUT_S = node.FOLLOW_WAIT_S + TIMEOUT_S  # a log follow waits on the peer first
COMMAND_TIMEOUT_S = node.SYSTEMCTL_S + node.DAEMON_START_S + TIMEOUT_S
DEPLOY_TIMEOUT_S = 3 * node.SYSTEMCTL_S + node.DAEMON_STOP_S + node.DAEMON_START_S + TIMEOUT_S
SNAPSHOT_TIMEOUT_S = 60.0


class _Connection(http.client.HTTPSConnection):
    """HTTPS to an address, checking the certificate against a node NAME (not the address:
    node certificates carry names only)."""

    def __init__(self, addr: str, port: int, context: ssl.SSLContext, server_name: str | None,
                 timeout: float) -> None:
        super().__init__(addr, port, timeout=timeout, context=context)
        self._ctx = context
        self._server_name = server_name

    def connect(self) -> None:
        sock = socket.create_connection((self.host, self.port), self.timeout)
        self.sock = self._ctx.wrap_socket(sock, server_hostname=self._server_name)


def bootstrap_context() -> ssl.SSLContext:
    """Before the cluster exists: encrypted, not authenticated (see the module docstring)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def request(addr: str, port: int, context: ssl.SSLContext, server_name: str | None,
            method: str, path: str, body: Any = None, timeout: float = TIMEOUT_S,
            who: str | None = None) -> tuple[int, str, bytes]:
    """(status, content type, body). Network and TLS failures are ConsoleError 502."""
    who = who or addr
    conn = _Connection(addr, port, context, server_name, timeout)
    headers = {"Accept": "application/json"}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    try:
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        payload = resp.read()
        return resp.status, resp.getheader("Content-Type", ""), payload
    except ssl.SSLCertVerificationError as e:
        raise ConsoleError(502, "peer_untrusted", f"{who} ({addr}): its certificate is not "
                           f"the cluster's: {e.verify_message}") from None
    except (OSError, http.client.HTTPException) as e:
        raise ConsoleError(502, "peer_unreachable", f"{who} ({addr}) does not answer on "
                           f"port {port}: {e}") from None
    finally:
        conn.close()


def json_result(status: int, content_type: str, payload: bytes, who: str) -> Any:
    """The JSON answer, or the peer's error raised here with the same status and code."""
    try:
        data = json.loads(payload) if payload else {}
    except ValueError:
        raise ConsoleError(502, "peer_error", f"{who} answered {status} without JSON") from None
    if status >= 400:
        err = data.get("error", {}) if isinstance(data, dict) else {}
        raise ConsoleError(status, str(err.get("code", "peer_error")),
                           str(err.get("message", f"{who} answered {status}")),
                           list(err.get("fields", [])))
    return data


def hello(addr: str, port: int = CONSOLE_PORT) -> dict[str, Any]:
    """GET /api/v1/hello of a console not known yet (unverified)."""
    result = json_result(*request(addr, port, bootstrap_context(), None, "GET",
                                  "/api/v1/hello", timeout=QUICK_TIMEOUT_S), who=addr)
    if not isinstance(result, dict) or not isinstance(result.get("node"), str):
        raise ConsoleError(502, "peer_error", f"{addr}: not a mirrorha console")
    return result


def join(addr: str, port: int, body: Mapping[str, Any]) -> dict[str, Any]:
    return json_result(*request(addr, port, bootstrap_context(), None, "POST",
                                "/peer/v1/join", dict(body)), who=addr)


class RemoteNode:
    """The peer node, with the same operations as `node.LocalNode`, over /peer/v1."""

    def __init__(self, pki_dir: Path, local: str, name: str, addr: str,
                 port: int = CONSOLE_PORT) -> None:
        self.pki_dir = pki_dir
        self.local = local
        self.name = name
        self.addr = addr
        self.port = port

    def _context(self) -> ssl.SSLContext:
        try:
            return tls.client_context(self.pki_dir, self.local, self.name)
        except tls.TlsError as e:
            raise ConsoleError(502, "peer_untrusted", str(e)) from None

    def _raw(self, method: str, path: str, body: Any = None, query: Mapping[str, Any] | None
             = None, timeout: float = TIMEOUT_S) -> tuple[int, str, bytes]:
        url = "/peer/v1" + path + (f"?{urlencode(query)}" if query else "")
        return request(self.addr, self.port, self._context(), self.name, method, url, body,
                       timeout, who=self.name)

    def _json(self, method: str, path: str, body: Any = None,
              query: Mapping[str, Any] | None = None, timeout: float = TIMEOUT_S) -> Any:
        return json_result(*self._raw(method, path, body, query, timeout), who=self.name)

    @staticmethod
    def _m(module: str) -> str:
        return f"/modules/{quote(module, safe='')}"

    def hello(self) -> dict[str, Any]:
        return self._json("GET", "/hello", timeout=QUICK_TIMEOUT_S)

    def state(self, module: str) -> dict[str, Any]:
        return self._json("GET", f"{self._m(module)}/state", timeout=QUICK_TIMEOUT_S)

    def check(self, module: str, files: Mapping[str, str]) -> dict[str, Any]:
        return self._json("POST", f"{self._m(module)}/validate", {"files": dict(files)})

    def deploy(self, module: str, files: Mapping[str, str]) -> str:
        return self._json("PUT", f"{self._m(module)}/config", {"files": dict(files)},
                          timeout=DEPLOY_TIMEOUT_S)["message"]

    def command(self, module: str, name: str) -> None:
        self._json("POST", f"{self._m(module)}/commands/{quote(name, safe='')}", {},
                   timeout=COMMAND_TIMEOUT_S)

    def logs(self, module: str, kind: str, lines: int = 200, offset: int | None = None,
             wait_s: float = 10.0) -> dict[str, Any]:
        query: dict[str, Any] = {"lines": lines, "wait": wait_s}
        if offset is not None:
            query["offset"] = offset
        return self._json("GET", f"{self._m(module)}/logs/{quote(kind, safe='')}",
                          query=query, timeout=FOLLOW_TIMEOUT_S)

    def snapshot(self, module: str) -> bytes:
        status, ctype, payload = self._raw("GET", f"{self._m(module)}/snapshot",
                                           timeout=SNAPSHOT_TIMEOUT_S)
        if status != 200:
            json_result(status, ctype, payload, self.name)  # raises the peer's error
        return payload

    def boot(self, module: str) -> dict[str, Any]:
        return self._json("GET", f"{self._m(module)}/boot", timeout=QUICK_TIMEOUT_S)

    def set_boot(self, module: str, on: bool) -> dict[str, Any]:
        return self._json("PUT", f"{self._m(module)}/boot", {"on": on})

    def freshness(self, module: str) -> dict[str, Any]:
        return self._json("GET", f"{self._m(module)}/freshness")
