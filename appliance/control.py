"""Local control API of the daemon: one JSON request line, one JSON reply line, over a unix
socket readable by root only. Used by the CLI (and later the console)."""

from __future__ import annotations

import json
import os
import socket
import socketserver
import threading
from pathlib import Path
from typing import Any, Protocol

from appliance.cluster import Command
from appliance.errors import CommandRefused, MirrorhaError

MAX_REQUEST = 64 * 1024


class DaemonLike(Protocol):
    modlog: Any

    def submit(self, command: Command, origin: str) -> str | None: ...
    def status(self) -> dict[str, Any]: ...


class DaemonUnreachable(MirrorhaError):
    pass


class _Handler(socketserver.StreamRequestHandler):
    server: _Server

    def handle(self) -> None:
        line = self.rfile.readline(MAX_REQUEST)
        try:
            request = json.loads(line)
            reply = self.server.dispatch(request)
        except (ValueError, KeyError, TypeError) as e:
            reply = {"ok": False, "error": f"bad request: {e}"}
        except Exception as e:  # the client gets an answer, whatever went wrong here
            reply = {"ok": False, "error": f"internal error: {e!r}"}
        self.wfile.write(json.dumps(reply).encode() + b"\n")


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, path: Path, daemon: DaemonLike) -> None:
        self.node_daemon = daemon
        super().__init__(str(path), _Handler)

    def dispatch(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request["op"]
        if op == "state":
            return {"ok": True, "state": self.node_daemon.status()}
        if op == "command":
            command = Command(request["command"])
            origin = str(request.get("origin") or "operator")
            refused = self.node_daemon.submit(command, origin)
            return {"ok": refused is None, "error": refused}
        if op == "log":
            level, message = request["level"], str(request["message"])[:4000]
            write = self.node_daemon.modlog.error if level == "E" else self.node_daemon.modlog.info
            write(f"script: {message}")
            return {"ok": True}
        return {"ok": False, "error": f"unknown operation {op!r}"}


class ControlServer:
    def __init__(self, path: Path, daemon: DaemonLike) -> None:
        self.path = path
        self.daemon = daemon
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            if _answers(self.path):
                raise MirrorhaError(f"{self.path}: another mirrorha daemon is running for this "
                                    "module")
            self.path.unlink()  # left by a crashed daemon
        old_umask = os.umask(0o077)
        try:
            self._server = _Server(self.path, self.daemon)
        finally:
            os.umask(old_umask)
        self._thread = threading.Thread(target=self._server.serve_forever, name="control",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server:
            self._server.shutdown()
            self._server.server_close()
        self.path.unlink(missing_ok=True)


def _answers(path: Path) -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(1)
            s.connect(str(path))
        return True
    except OSError:
        return False


def request(path: Path, payload: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(path))
            s.sendall(json.dumps(payload).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
    except (FileNotFoundError, ConnectionRefusedError):
        raise DaemonUnreachable(f"the mirrorha daemon is not running ({path} does not answer); "
                                "start it with `mirrorha daemon` or `systemctl start mirrorha`"
                                ) from None
    except OSError as e:
        raise DaemonUnreachable(f"{path}: {e}") from None
    try:
        reply = json.loads(data)
    except ValueError:
        raise DaemonUnreachable(f"{path}: the daemon closed the connection without an answer; "
                                "see its module log") from None
    if not isinstance(reply, dict):
        raise DaemonUnreachable(f"{path}: unexpected answer {reply!r}")
    return reply


def send_command(path: Path, command: Command, origin: str) -> None:
    reply = request(path, {"op": "command", "command": command.value, "origin": origin})
    if not reply.get("ok"):
        raise CommandRefused(f"{command.value} refused: {reply.get('error')}")


def get_state(path: Path) -> dict[str, Any]:
    reply = request(path, {"op": "state"})
    if not reply.get("ok"):
        raise MirrorhaError(str(reply.get("error")))
    return reply["state"]
