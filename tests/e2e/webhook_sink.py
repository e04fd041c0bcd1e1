"""A stand-in for a pager, run in the lab's client namespace by test_monitoring: every POST
Alertmanager makes to its webhook is appended to a file as one JSON line {"path", "body"}.
Usage: webhook_sink.py ADDR PORT OUTPUT_FILE"""

from __future__ import annotations

import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Sink(BaseHTTPRequestHandler):
    output = ""

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with open(self.output, "a") as f:
            f.write(json.dumps({"path": self.path, "body": json.loads(body or b"null")}) + "\n")
        self.send_response(200)
        self.end_headers()

    def do_GET(self) -> None:  # readiness probe
        self.send_response(200)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


if __name__ == "__main__":
    addr, port, Sink.output = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    ThreadingHTTPServer((addr, port), Sink).serve_forever()
