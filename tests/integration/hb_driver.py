"""Test driver run inside a network namespace (`ip netns exec NS python hb_driver.py ...`).

Modes:
  link     run a HeartbeatLink; print its events and, on request, its snapshot
  witness  run a Witness; answer `reachable` requests
  capture  print the first heartbeat datagram seen from --src to --port (raw socket), then exit
  send     send hex bytes once from --bind to --to:--port, then exit

Output is one JSON object per line on stdout. `link` and `witness` read JSON commands from
stdin, one per line ({"cmd": "snapshot"}, {"cmd": "payload", "value": {...}},
{"cmd": "reachable", "max_age": 0.3}); they stop when stdin closes, so a dying test never
leaves them behind.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import select
import socket
import sys
import threading
import time
from ipaddress import IPv4Address
from typing import Any

from appliance.heartbeat import HeartbeatEvent, HeartbeatLink, HeartbeatNetwork, Witness

_out_lock = threading.Lock()


def emit(obj: dict[str, Any]) -> None:
    # Events come from the heartbeat thread, replies from the main thread: one line each.
    with _out_lock:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()


def commands() -> Any:
    for line in sys.stdin:
        if line.strip():
            yield json.loads(line)


def parse_network(text: str, port: int) -> HeartbeatNetwork:
    name, local, peer = text.split(",")
    return HeartbeatNetwork(name, IPv4Address(local), IPv4Address(peer), port)


def run_link(args: argparse.Namespace) -> None:
    payload: dict[str, Any] = json.loads(args.payload)

    def on_event(event: HeartbeatEvent) -> None:
        emit({"event": type(event).__name__, **dataclasses.asdict(event)})

    link = HeartbeatLink(
        node=args.node,
        peer=args.peer,
        key=bytes.fromhex(args.key),
        networks=[parse_network(n, args.port) for n in args.net],
        pulse_ms=args.pulse,
        timeout_ms=args.timeout,
        payload=lambda: payload,
        on_event=on_event,
    )
    link.start()
    emit({"ready": True})
    try:
        for cmd in commands():
            if cmd["cmd"] == "snapshot":
                emit({"snapshot": dataclasses.asdict(link.snapshot())})
            elif cmd["cmd"] == "payload":
                payload = cmd["value"]
                link.send_now()
                emit({"ok": "payload"})
    finally:
        link.stop()


def run_witness(args: argparse.Namespace) -> None:
    witness = Witness(IPv4Address(args.addr), args.interval)
    witness.start()
    emit({"ready": True})
    try:
        for cmd in commands():
            if cmd["cmd"] == "reachable":
                emit(
                    {
                        "reachable": witness.reachable(cmd["max_age"]),
                        "age": witness.last_reply_age(),
                    }
                )
    finally:
        witness.stop()


def run_capture(args: argparse.Namespace) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP)
    deadline = time.monotonic() + args.wait
    emit({"ready": True})
    while (left := deadline - time.monotonic()) > 0:
        if not select.select([sock], [], [], left)[0]:
            break
        packet = sock.recv(4096)
        ihl = (packet[0] & 0x0F) * 4
        src = IPv4Address(packet[12:16])
        dport = int.from_bytes(packet[ihl + 2 : ihl + 4], "big")
        if src == IPv4Address(args.src) and dport == args.port:
            emit({"frame": packet[ihl + 8 :].hex()})
            return
    emit({"error": "no datagram captured"})


def run_send(args: argparse.Namespace) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((args.bind, 0))
        sock.sendto(bytes.fromhex(args.hex), (args.to, args.port))
    emit({"sent": True})


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="mode", required=True)
    link = sub.add_parser("link")
    link.add_argument("--node", required=True)
    link.add_argument("--peer", required=True)
    link.add_argument("--key", required=True)
    link.add_argument("--net", action="append", required=True, help="name,local,peer")
    link.add_argument("--port", type=int, required=True)
    link.add_argument("--pulse", type=int, required=True)
    link.add_argument("--timeout", type=int, required=True)
    link.add_argument("--payload", default="{}")
    witness = sub.add_parser("witness")
    witness.add_argument("--addr", required=True)
    witness.add_argument("--interval", type=int, required=True)
    capture = sub.add_parser("capture")
    capture.add_argument("--src", required=True)
    capture.add_argument("--port", type=int, required=True)
    capture.add_argument("--wait", type=float, default=3.0)
    send = sub.add_parser("send")
    send.add_argument("--bind", required=True)
    send.add_argument("--to", required=True)
    send.add_argument("--port", type=int, required=True)
    send.add_argument("--hex", required=True)
    args = parser.parse_args()
    {"link": run_link, "witness": run_witness, "capture": run_capture, "send": run_send}[args.mode](
        args
    )


if __name__ == "__main__":
    main()
