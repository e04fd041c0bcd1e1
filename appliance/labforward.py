"""TCP port forwarding from the host's loopback into a lab namespace: how a browser on the host
reaches a lab node's console (the lab never adds addresses or routes to the host itself).

    python -m appliance.labforward --listen 127.0.0.1:PORT --netns NAME --to ADDR:PORT

Listens on the host; each connection gets a socket created inside the namespace (a thread
that entered it with setns(2): a socket belongs to the namespace it was created in, whichever
thread uses it later) connected to ADDR:PORT there, and bytes are copied both ways. TLS stays
end to end. Prints `listening on HOST:PORT` once ready (PORT 0 picks a free port).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import os
import socket
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

CLONE_NEWNET = 0x40000000  # <sched.h>
NETNS_DIR = Path("/run/netns")
CONNECT_TIMEOUT_S = 5.0


def _enter_netns(name: str) -> None:
    """Move the calling thread (only it) into network namespace `name`."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    fd = os.open(NETNS_DIR / name, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {name}: {os.strerror(err)}")
    finally:
        os.close(fd)


def _pump(src: socket.socket, dst: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := src.recv(65536):
            dst.sendall(data)
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)  # pass the end of stream on; the other way may go on


def _serve(client: socket.socket, netns: str, target: tuple[str, int]) -> None:
    try:
        _enter_netns(netns)  # this connection's thread only
        upstream = socket.create_connection(target, timeout=CONNECT_TIMEOUT_S)
    except OSError as e:
        print(f"labforward: {netns} {target[0]}:{target[1]}: {e}", file=sys.stderr, flush=True)
        client.close()
        return
    upstream.settimeout(None)
    back = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
    back.start()
    _pump(client, upstream)
    back.join()
    client.close()
    upstream.close()


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="labforward")
    p.add_argument("--listen", required=True, type=_addr, help="HOST:PORT on the host")
    p.add_argument("--netns", required=True)
    p.add_argument("--to", required=True, type=_addr, help="ADDR:PORT inside the namespace")
    args = p.parse_args(argv)
    if not (NETNS_DIR / args.netns).exists():
        print(f"labforward: no network namespace {args.netns}", file=sys.stderr)
        return 1
    server = socket.create_server(args.listen, reuse_port=False)
    host, port = server.getsockname()[:2]
    print(f"listening on {host}:{port}", flush=True)
    while True:
        client, _ = server.accept()
        threading.Thread(target=_serve, args=(client, args.netns, args.to), daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
