"""Helpers for the console tests: an HTTPS JSON client with a session cookie, a real console
(`mirrorha console` under gunicorn) on a loopback address, a real daemon on a home dir."""

from __future__ import annotations

import contextlib
import http.client
import http.cookiejar
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flask import Flask
from flask.testing import FlaskClient

from appliance import control
from appliance.console import auth
from appliance.console.peer import bootstrap_context
from appliance.keys import init_cluster
from appliance.paths import Paths
from appliance.waiting import wait_until

PASSWORD = "correct horse battery"
ROOT = Path(__file__).resolve().parents[2]


def free_port(addr: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((addr, 0))
        return int(s.getsockname()[1])


def unverified() -> ssl.SSLContext:
    """Like the console's own bootstrap client: encrypted, the server not checked."""
    return bootstrap_context()


def peer_get(port: int, path: str, cert: Path | None = None, key: Path | None = None,
             addr: str = "127.0.0.1") -> tuple[int, bytes]:
    """GET over HTTPS as another console would: presenting `cert` (and `key`) if given,
    not checking the server (the tests check the server's side)."""
    ctx = unverified()
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key or cert.with_suffix(".key")))
    conn = http.client.HTTPSConnection(addr, port, context=ctx, timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


class ApiClient:
    """What a script (or the browser's JavaScript) does: JSON over HTTPS, one session."""

    def __init__(self, base_url: str, context: ssl.SSLContext | None = None) -> None:
        self.base = base_url.rstrip("/")
        self.csrf = ""
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(
            urllib.request.HTTPSHandler(context=context or unverified()),
            urllib.request.HTTPCookieProcessor(self.jar))

    def call(self, method: str, path: str, body: Any = None, timeout: float = 60.0,
             raw: bool = False) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method)
        if body is not None:
            req.add_header("Content-Type", "application/json")
        if self.csrf:
            req.add_header("X-CSRF-Token", self.csrf)
        try:
            with self.opener.open(req, timeout=timeout) as resp:
                status, payload, ctype = resp.status, resp.read(), resp.headers["Content-Type"]
        except urllib.error.HTTPError as e:
            status, payload, ctype = e.code, e.read(), e.headers["Content-Type"]
        if raw or "json" not in (ctype or ""):
            return status, payload
        return status, json.loads(payload)

    def login(self, password: str = PASSWORD) -> None:
        status, body = self.call("POST", "/api/v1/login",
                                 {"username": "admin", "password": password})
        assert status == 200, body
        self.csrf = body["csrf_token"]

    def get(self, path: str, **kw: Any) -> tuple[int, Any]:
        return self.call("GET", path, **kw)

    def post(self, path: str, body: Any = None, **kw: Any) -> tuple[int, Any]:
        return self.call("POST", path, {} if body is None else body, **kw)

    def put(self, path: str, body: Any, **kw: Any) -> tuple[int, Any]:
        return self.call("PUT", path, body, **kw)


def console_home(path: Path, password: str = PASSWORD) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    auth.set_password(auth.ConsoleFiles(path), password)
    return path


def node_env(home: Path, node: str, unit_dir: Path | None = None) -> dict[str, str]:
    env = {**os.environ, "MIRRORHA_HOME": str(home), "MIRRORHA_NODE": node,
           "PYTHONPATH": str(ROOT), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env["MIRRORHA_UNIT_DIR"] = str(unit_dir or home / "systemd")
    return env


@contextlib.contextmanager
def running_console(home: Path, node: str, addr: str, port: int) -> Iterator[str]:
    """`mirrorha console --bind addr:port` as the node runs it; yields its https URL."""
    out = open(home / "console.out", "ab")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "appliance.cli", "console", "--bind",
                             f"{addr}:{port}"], env=node_env(home, node), stdout=out,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    url = f"https://{addr}:{port}"

    def answers() -> bool:
        assert proc.poll() is None, (home / "console.out").read_text()
        with contextlib.suppress(OSError):
            socket.create_connection((addr, port), timeout=0.5).close()
            return True
        return False
    try:
        wait_until(answers, 30, f"the console of {node} on {addr}:{port}", interval=0.1)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        out.close()


def userconfig(heart_port: int, extra: str = "") -> str:
    return (f'<safe><service mode="mirror"><heart pulse="100" timeout="1000" port="{heart_port}">'
            f'<heartbeat name="default"/></heart>{extra}</service></safe>\n')


def cluster_home(path: Path, node: str, heart_port: int) -> Paths:
    """A configured node1 of a loopback cluster (node2 at 127.0.0.2 is never started)."""
    console_home(path)
    paths = Paths(path)
    paths.cluster_xml.write_text(
        '<cluster><lans><lan name="default"><node name="node1" addr="127.0.0.1"/>'
        '<node name="node2" addr="127.0.0.2"/></lan></lans></cluster>\n')
    init_cluster(paths, ["node1", "node2"])
    paths.userconfig.parent.mkdir(parents=True, exist_ok=True)
    paths.userconfig.write_text(userconfig(heart_port))
    for script in ("start_prim", "stop_prim"):
        (paths.bin_dir).mkdir(parents=True, exist_ok=True)
        (paths.bin_dir / script).write_text("#!/bin/sh\necho running $0 $*\n")
        (paths.bin_dir / script).chmod(0o755)
    return paths


def stop_daemon(paths: Paths) -> None:
    """SIGTERM the module's daemon (ours: started by the test or by the console under test)."""
    try:
        pid = int(control.get_state(paths.control_socket)["pid"])
    except control.DaemonUnreachable:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)

    def gone() -> bool:
        try:
            control.get_state(paths.control_socket)
        except control.DaemonUnreachable:
            return True
        return False
    wait_until(gone, 30, "the daemon to exit", interval=0.1)


HTTPS = {"base_url": "https://localhost"}  # the session cookie is Secure


class Api:
    """The test client as an API user: JSON in and out, the CSRF header once logged in."""

    def __init__(self, app: Flask) -> None:
        self.app = app
        self.client: FlaskClient = app.test_client()
        self.csrf = ""

    def call(self, method: str, path: str, body: Any = None, csrf: str | None = None,
             **kw: Any) -> Any:
        headers = {}
        token = self.csrf if csrf is None else csrf
        if token:
            headers["X-CSRF-Token"] = token
        return self.client.open(path, method=method, json=body, headers=headers, **HTTPS, **kw)

    def login(self, password: str = PASSWORD) -> Any:
        resp = self.call("POST", "/api/v1/login", {"username": "admin", "password": password})
        if resp.status_code == 200:
            self.csrf = resp.json["csrf_token"]
        return resp


class FakePeer:
    """The other node's console as node1 meets it on the network, answering each (method,
    path) of its peer API with a canned (status, JSON body), or never (None): a peer that
    validates and then fails its deploy, or hangs. Serves node2's cluster certificate and asks
    for the caller's, like the real one."""

    def __init__(self, pki: Path, addr: str, port: int,
                 routes: dict[tuple[str, str], tuple[int, Any] | None],
                 client_cert: bool = True) -> None:
        import http.server
        import threading

        from appliance.replication import tls

        self.calls: list[tuple[str, str]] = []
        self.release = threading.Event()
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self) -> None:
                path = self.path.split("?")[0]
                fake.calls.append((self.command, path))
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                answer = routes.get((self.command, path), (404, {"error": {
                    "code": "not_found", "message": path, "fields": []}}))
                if answer is None:
                    fake.release.wait(120)
                    return
                data = json.dumps(answer[1]).encode()
                self.send_response(answer[0])
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = _answer

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer((addr, port), Handler)
        self.server.daemon_threads = True
        ctx = tls.server_context(pki, "node2")
        if not client_cert:  # before the cluster exists (hello, join)
            ctx.verify_mode = ssl.CERT_NONE
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakePeer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
