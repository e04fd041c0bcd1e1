"""A heartbeat overtaken on another network proves liveness but must not undo newer news."""

from __future__ import annotations

import queue
import socket
import time
from ipaddress import IPv4Address

from appliance.heartbeat import HeartbeatLink, HeartbeatNetwork, PeerHeard, encode_frame
from appliance.waiting import wait_until

KEY = bytes(range(32))
PORT = 48123


def test_older_frame_arriving_late_does_not_replace_the_newest_payload() -> None:
    events: queue.Queue[object] = queue.Queue()
    link = HeartbeatLink(
        node="node1", peer="node2", key=KEY,
        networks=[HeartbeatNetwork("default", IPv4Address("127.0.0.1"),
                                   IPv4Address("127.0.0.2"), PORT)],
        pulse_ms=50, timeout_ms=5000, payload=lambda: {"s": "PRIM"}, on_event=events.put)
    link.start()
    try:
        epoch = time.time_ns()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
            peer.bind(("127.0.0.2", 0))
            for seq, state in ((10, "new"), (5, "old")):
                frame = encode_frame(KEY, "node2", epoch, seq, {"p": {"s": state}, "t": 0})
                peer.sendto(frame, ("127.0.0.1", PORT))
            wait_until(lambda: link.snapshot().networks[0].received >= 2, 5,
                       "both frames to be received")
        heard = []
        while not events.empty():
            event = events.get_nowait()
            if isinstance(event, PeerHeard):
                heard.append(event.payload)
        assert heard == [{"s": "new"}]
        assert link.snapshot().rejected_replay == 0  # inside the window: not a replay
    finally:
        link.stop()
