"""The lab's sample application: a tiny HTTP server that says which node serves it.

`GET /` answers the node's name (`node1\\n`), so a client polling the virtual IP sees a failover
as the answer changing; `GET /health` answers 200. The process renames itself `mh-sampleapp`
(its comm, what `ps`, `pkill -x` and psutil's name() see) so that process monitoring (errd) and
the tests can find it. SIGTERM makes it stop serving and exit 0, as a well-behaved application
does for stop_prim.
"""

from __future__ import annotations

import argparse
import signal
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType

COMM = "mh-sampleapp"


class Stop(BaseException):
    """Raised by the SIGTERM handler inside serve_forever() to leave it from the main thread.
    A BaseException: socketserver catches Exception around request handling and would go on
    serving."""


def set_comm(name: str) -> None:
    # Before any thread exists: a thread takes its comm from the thread that creates it.
    Path("/proc/self/comm").write_text(name)


def make_handler(node: str) -> type[BaseHTTPRequestHandler]:
    body_root = f"{node}\n".encode()

    class Handler(BaseHTTPRequestHandler):
        server_version = "mh-sampleapp"

        def do_GET(self) -> None:
            if self.path == "/":
                self.reply(200, body_root)
            elif self.path == "/health":
                self.reply(200, b"ok\n")
            else:
                self.reply(404, b"not found\n")

        def reply(self, code: int, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            # Clients poll every few tens of ms during failover tests: one line per request
            # would drown the application log.
            pass

    return Handler


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="mh-sampleapp", description="HTTP server answering its node name"
    )
    parser.add_argument("--node", required=True, help="name answered on GET /")
    parser.add_argument("--port", type=int, default=80)
    parser.add_argument("--bind", default="0.0.0.0")
    return parser.parse_args(argv)


def on_sigterm(_signum: int, _frame: FrameType | None) -> None:
    raise Stop


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    set_comm(COMM)
    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        server = ThreadingHTTPServer((args.bind, args.port), make_handler(args.node))
    except OSError as e:
        print(f"mh-sampleapp: cannot listen on {args.bind}:{args.port}: {e.strerror}", flush=True)
        return 1
    print(f"mh-sampleapp: {args.node} serving on {args.bind}:{args.port}", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    except (Stop, KeyboardInterrupt):
        pass
    finally:
        server.server_close()
    print(f"mh-sampleapp: {args.node} stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
