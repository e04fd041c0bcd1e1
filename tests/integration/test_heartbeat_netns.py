"""Heartbeats between two network namespaces joined by two veth pairs, plus a witness.

    hbt-a-<pid>  n1 192.0.2.1/24    ====  n1 192.0.2.2/24     hbt-b-<pid>
                 n2 198.51.100.1/24 ====  n2 198.51.100.2/24
                                          w0 203.0.113.1/24 == w0 203.0.113.9/24  hbt-w-<pid>

Each side runs tests/integration/hb_driver.py in its namespace and reports events as JSON lines.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root and iproute2"
    ),
]

DRIVER = Path(__file__).with_name("hb_driver.py")
REPO = Path(__file__).resolve().parents[2]
PORT = 7946
PULSE_MS = 50
TIMEOUT_MS = 300
TIMEOUT_S = TIMEOUT_MS / 1000
MARGIN_S = 0.5  # scheduling slack on a loaded 2-CPU machine
KEY = "11" * 32
WRONG_KEY = "22" * 32

Message = dict[str, Any]


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@dataclass
class Lab:
    a: str
    b: str
    w: str

    def link(self, ns: str, dev: str, state: str) -> None:
        ip("-n", ns, "link", "set", dev, state)


@pytest.fixture
def lab() -> Iterator[Lab]:
    pid = os.getpid()
    the_lab = Lab(a=f"hbt-a-{pid}", b=f"hbt-b-{pid}", w=f"hbt-w-{pid}")
    created: list[str] = []
    try:
        for ns in (the_lab.a, the_lab.b, the_lab.w):
            ip("netns", "add", ns)
            created.append(ns)
            ip("-n", ns, "link", "set", "lo", "up")
        wire(the_lab.a, the_lab.b, "n1", "192.0.2.1/24", "192.0.2.2/24")
        wire(the_lab.a, the_lab.b, "n2", "198.51.100.1/24", "198.51.100.2/24")
        wire(the_lab.b, the_lab.w, "w0", "203.0.113.1/24", "203.0.113.9/24")
        yield the_lab
    finally:
        for ns in created:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


def wire(ns1: str, ns2: str, dev: str, addr1: str, addr2: str) -> None:
    """A veth pair named `dev` on both ends, created straight inside the two namespaces."""
    ip("-n", ns1, "link", "add", dev, "type", "veth", "peer", "name", dev, "netns", ns2)
    for ns, addr in ((ns1, addr1), (ns2, addr2)):
        ip("-n", ns, "addr", "add", addr, "dev", dev)
        ip("-n", ns, "link", "set", dev, "up")


@dataclass
class Driver:
    """One hb_driver.py process; its stdout lines are queued by a reader thread."""

    name: str
    proc: subprocess.Popen[str]
    lines: queue.Queue[Message] = field(default_factory=queue.Queue)
    seen: list[Message] = field(default_factory=list)
    taken: set[int] = field(default_factory=set)

    def read_forever(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(json.loads(line))

    def expect(self, pred: Callable[[Message], bool], timeout: float, what: str) -> Message:
        """The first not yet expected message matching `pred`, already received or to come.

        Messages are never dropped: an event may arrive before the line a test waits for
        first (b hears a before printing its own ready line).
        """
        for i, msg in enumerate(self.seen):
            if i not in self.taken and pred(msg):
                self.taken.add(i)
                return msg
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                msg = self.lines.get(timeout=left)
            except queue.Empty:
                break
            self.seen.append(msg)
            if pred(msg):
                self.taken.add(len(self.seen) - 1)
                return msg
        raise AssertionError(f"{self.name}: no {what} within {timeout} s; saw {self.seen[-10:]}")

    def none_during(self, pred: Callable[[Message], bool], during: float, what: str) -> None:
        """Observe for `during` seconds that no such message comes (an absence, not a wait)."""
        try:
            msg = self.expect(pred, during, what)
        except AssertionError:
            return
        raise AssertionError(f"{self.name}: unexpected {what}: {msg}")

    def send(self, cmd: Message) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def request(self, cmd: Message, key: str) -> Message:
        self.send(cmd)
        return self.expect(lambda m: key in m, 3.0, f"reply {key!r}")[key]

    def snapshot(self) -> Message:
        return self.request({"cmd": "snapshot"}, "snapshot")

    def events(self, kind: str) -> list[Message]:
        """The events of this kind received so far and not already expected by the test."""
        return [
            m for i, m in enumerate(self.seen) if i not in self.taken and m.get("event") == kind
        ]


@pytest.fixture
def start() -> Iterator[Callable[..., Driver]]:
    drivers: list[Driver] = []

    def start_driver(ns: str, name: str, *args: str, ready: bool = True) -> Driver:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, str(DRIVER), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        driver = Driver(name=name, proc=proc)
        drivers.append(driver)
        threading.Thread(target=driver.read_forever, daemon=True).start()
        if ready:
            driver.expect(lambda m: "ready" in m, 5.0, "ready line")
        return driver

    try:
        yield start_driver
    finally:
        for d in drivers:
            if d.proc.stdin is not None:
                d.proc.stdin.close()  # the driver stops its link and exits on EOF
        for d in drivers:
            try:
                d.proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                d.proc.kill()
                d.proc.wait(timeout=3)


def node_args(node: str, peer: str, key: str, payload: Message, *nets: str) -> list[str]:
    args = ["link", "--node", node, "--peer", peer, "--key", key, "--port", str(PORT)]
    args += [
        "--pulse",
        str(PULSE_MS),
        "--timeout",
        str(TIMEOUT_MS),
        "--payload",
        json.dumps(payload),
    ]
    for net in nets:
        args += ["--net", net]
    return args


def start_pair(lab: Lab, start: Callable[..., Driver], key_b: str = KEY) -> tuple[Driver, Driver]:
    a = start(
        lab.a,
        "node1",
        *node_args(
            "node1", "node2", KEY, {"state": "PRIM"}, "lan,192.0.2.1,192.0.2.2",
            "rep,198.51.100.1,198.51.100.2",
        ),
    )  # fmt: skip
    b = start(
        lab.b,
        "node2",
        *node_args(
            "node2", "node1", key_b, {"state": "SECOND"}, "lan,192.0.2.2,192.0.2.1",
            "rep,198.51.100.2,198.51.100.1",
        ),
    )  # fmt: skip
    return a, b


def is_event(kind: str, **fields: Any) -> Callable[[Message], bool]:
    return lambda m: m.get("event") == kind and all(m.get(k) == v for k, v in fields.items())


def wait_until(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.02)  # polling interval of a condition with a deadline, not synchronisation
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def both_networks_up(d: Driver) -> bool:
    return all(n["up"] for n in d.snapshot()["networks"])


def heard_each_other(a: Driver, b: Driver) -> None:
    a.expect(is_event("PeerHeard", payload={"state": "SECOND"}), 3.0, "PeerHeard from node2")
    b.expect(is_event("PeerHeard", payload={"state": "PRIM"}), 3.0, "PeerHeard from node1")
    for d in (a, b):
        wait_until(lambda d=d: both_networks_up(d), 3.0, f"{d.name} hearing on both networks")
        # The first driver may report the peer silent since start while the second one is still
        # starting (a slow machine): right, but not what the tests look at afterwards.
        for i, m in enumerate(d.seen):
            if m.get("event") == "PeerSilent" and "since start" in m["detail"]:
                d.taken.add(i)


def test_nodes_hear_each_other_with_payload_and_rtt(lab: Lab, start: Callable[..., Driver]) -> None:
    a, b = start_pair(lab, start)
    heard_each_other(a, b)

    b.request({"cmd": "payload", "value": {"state": "ALONE"}}, "ok")
    a.expect(is_event("PeerHeard", payload={"state": "ALONE"}), 1.0, "PeerHeard with new payload")

    wait_until(
        lambda: all(n["rtt_s"] is not None for n in a.snapshot()["networks"]), 3.0, "RTT on a"
    )
    snap = a.snapshot()
    assert snap["peer_up"] and snap["running"]
    for net in snap["networks"]:
        assert 0 <= net["rtt_s"] < 0.05, net  # veth round trip: far below a pulse
        assert net["received"] > 0 and net["sent"] > 0
        assert net["last_seen_age_s"] < TIMEOUT_S
    rejected = [v for k, v in snap.items() if k.startswith("rejected_")]
    assert rejected == [0, 0, 0, 0]
    assert not a.events("PeerSilent") and not b.events("PeerSilent")


def test_one_network_down_warns_without_losing_the_peer(
    lab: Lab, start: Callable[..., Driver]
) -> None:
    a, b = start_pair(lab, start)
    heard_each_other(a, b)

    lab.link(lab.a, "n1", "down")
    for d in (a, b):
        lost = d.expect(is_event("NetworkLost", network="lan"), TIMEOUT_S + MARGIN_S, "lan lost")
        assert (lost["still_up"], lost["total"]) == (1, 2)
        assert lost["silent_ms"] >= TIMEOUT_MS
    a.none_during(is_event("PeerSilent"), 3 * TIMEOUT_S, "PeerSilent with one network up")
    assert not b.events("PeerSilent")
    assert a.snapshot()["peer_up"]

    lab.link(lab.a, "n1", "up")
    for d in (a, b):
        d.expect(is_event("NetworkRestored", network="lan"), 3.0, "lan restored")


def test_all_networks_down_loses_the_peer_within_the_timeout(
    lab: Lab, start: Callable[..., Driver]
) -> None:
    a, b = start_pair(lab, start)
    heard_each_other(a, b)

    cut = time.monotonic()
    lab.link(lab.a, "n1", "down")
    lab.link(lab.a, "n2", "down")
    for d, peer in ((a, "node2"), (b, "node1")):
        silent = d.expect(is_event("PeerSilent"), TIMEOUT_S + MARGIN_S, "PeerSilent")
        assert time.monotonic() - cut < TIMEOUT_S + MARGIN_S
        assert silent["silent_ms"] >= TIMEOUT_MS
        assert silent["networks_total"] == 2
        assert silent["detail"].startswith(f"no heartbeat from {peer} on 2/2 networks for ")
        assert not d.snapshot()["peer_up"]
    a.none_during(is_event("PeerSilent"), 2 * TIMEOUT_S, "a second PeerSilent for one loss")

    lab.link(lab.a, "n1", "up")
    a.expect(is_event("PeerHeard", network="lan"), 3.0, "PeerHeard after the loss")


def test_peer_with_the_wrong_key_is_never_heard(lab: Lab, start: Callable[..., Driver]) -> None:
    a, _b = start_pair(lab, start, key_b=WRONG_KEY)

    silent = a.expect(is_event("PeerSilent"), TIMEOUT_S + MARGIN_S, "PeerSilent since start")
    assert silent["detail"].startswith("no heartbeat from node2 since start")
    wait_until(lambda: a.snapshot()["rejected_bad_mac"] >= 4, 3.0, "bad MACs counted on a")
    snap = a.snapshot()
    assert not snap["peer_up"]
    assert all(n["received"] == 0 and not n["up"] for n in snap["networks"])
    assert not a.events("PeerHeard")


def test_replayed_or_spoofed_frames_are_counted_and_ignored(
    lab: Lab, start: Callable[..., Driver]
) -> None:
    a, b = start_pair(lab, start)
    heard_each_other(a, b)

    # Capture one genuine frame of node2 as it arrives in a's namespace, then play it again.
    capture = start(lab.a, "capture", "capture", "--src", "192.0.2.2", "--port", str(PORT))
    frame = capture.expect(lambda m: "frame" in m, 3.0, "captured frame")["frame"]
    replay = ["send", "--to", "192.0.2.1", "--port", str(PORT), "--hex", frame]
    start(lab.b, "replay", *replay, "--bind", "192.0.2.2", ready=False).expect(
        lambda m: "sent" in m, 3.0, "replay sent"
    )
    wait_until(lambda: a.snapshot()["rejected_replay"] == 1, 3.0, "the replay counted on a")

    # The same genuine frame from an address that is not the peer's.
    ip("-n", lab.b, "addr", "add", "192.0.2.3/24", "dev", "n1")
    start(lab.b, "spoof", *replay, "--bind", "192.0.2.3", ready=False).expect(
        lambda m: "sent" in m, 3.0, "spoof sent"
    )
    wait_until(
        lambda: a.snapshot()["rejected_unknown_sender"] == 1, 3.0, "the stranger counted on a"
    )
    snap = a.snapshot()
    assert snap["peer_up"]
    assert (snap["rejected_bad_mac"], snap["rejected_malformed"]) == (0, 0)
    assert not a.events("PeerSilent")


def test_witness_reachable_until_its_link_goes_down(lab: Lab, start: Callable[..., Driver]) -> None:
    max_age = 0.3
    witness = start(lab.b, "witness", "witness", "--addr", "203.0.113.9", "--interval", "50")

    def reachable() -> bool:
        return witness.request({"cmd": "reachable", "max_age": max_age}, "reachable")

    wait_until(reachable, 3.0, "the witness to answer")

    lab.link(lab.w, "w0", "down")
    cut = time.monotonic()
    wait_until(lambda: not reachable(), max_age + MARGIN_S, "the witness to be unreachable")
    assert time.monotonic() - cut >= max_age - 0.1  # a reply just before the cut still counts
    age = witness.request({"cmd": "reachable", "max_age": max_age}, "age")
    assert age is not None and age > max_age


def test_witness_that_never_answers_is_unreachable(lab: Lab, start: Callable[..., Driver]) -> None:
    # 203.0.113.77 is on b's witness network but no host has it: pings go unanswered.
    witness = start(lab.b, "witness", "witness", "--addr", "203.0.113.77", "--interval", "50")
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline:
        assert witness.request({"cmd": "reachable", "max_age": 10.0}, "age") is None
