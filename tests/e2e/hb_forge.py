"""Sends heartbeat frames claiming to come from a node: run inside that node's namespace.

usage: hb_forge.py SRC_ADDR DST_ADDR PORT SENDER KEY_HEX COUNT EPOCH SEQ
"""

from __future__ import annotations

import socket
import sys

from appliance.heartbeat import encode_frame


def main(argv: list[str]) -> int:
    src, dst, port, sender, key_hex, count, epoch, seq = argv
    key = bytes.fromhex(key_hex)
    payload = {"p": {"s": "PRIM"}, "t": 0}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((src, 0))
        for i in range(int(count)):
            frame = encode_frame(key, sender, int(epoch), int(seq) + i, payload)
            s.sendto(frame, (dst, int(port)))
    print(count)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
