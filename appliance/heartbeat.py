"""Authenticated UDP heartbeats between the two nodes, and the witness pinger.

Three layers, from pure to threaded:

* the wire frame (`encode_frame` / `decode_frame`) and the anti-replay window (`ReplayGuard`):
  pure functions and a small state object, unit-tested without sockets;
* `PeerTracker`: the loss / restore decision as a function of receipts and the time, also pure;
* `HeartbeatLink` and `Witness`: adapters that own sockets and a dedicated thread each, so that
  heartbeats are neither sent late nor read late while the daemon is busy elsewhere (DESIGN.md:
  "Heartbeats must not be starved...").

Sequence numbers: every packet gets its own sequence number, including the copies sent on the
different networks during one pulse (one counter per link, not per network). A (epoch, seq)
pair therefore appears on the wire exactly once, and a duplicate is always a replay; the
receiver keeps one replay window per sender, shared by all networks, which also absorbs the
reordering between networks.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import math
import os
import secrets
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Any

from appliance.errors import MirrorhaError

log = logging.getLogger("mirrorha.heartbeat")

Clock = Callable[[], float]

# ---------------------------------------------------------------------------------------------
# Wire frame
# ---------------------------------------------------------------------------------------------
#
#   magic "MHHB" | version u8 | sender length u8 | sender UTF-8 | epoch u64 | seq u64 |
#   payload UTF-8 JSON (object) | HMAC-SHA256 of everything before it
#
# All integers are big-endian. The payload has no length field: it runs up to the MAC, which
# is the last 32 bytes; a redundant length could only disagree with the frame size.

MAGIC = b"MHHB"
VERSION = 1
MAX_FRAME = 1400  # stays under a 1500-byte MTU with IP and UDP headers: never fragmented
MAC_LEN = hashlib.sha256().digest_size
MAX_SENDER = 64
_HEAD = len(MAGIC) + 2  # magic, version, sender length
_COUNTERS = struct.Struct("!QQ")  # epoch, seq
_MIN_FRAME = _HEAD + 1 + _COUNTERS.size + 2 + MAC_LEN  # one-byte sender, payload "{}"
_U64 = 1 << 64


class FrameError(MirrorhaError):
    """A heartbeat frame cannot be encoded or decoded."""


class BadMac(FrameError):
    """The frame's MAC does not match: wrong cluster key, corruption or forgery."""


class Malformed(FrameError):
    """The frame is not a well-formed heartbeat of this version."""


class FrameTooLarge(FrameError):
    """The frame to send would exceed MAX_FRAME bytes."""


@dataclass(frozen=True)
class Frame:
    sender: str
    epoch: int
    seq: int
    payload: dict[str, Any]


def _mac(key: bytes, body: bytes) -> bytes:
    return hmac.new(key, body, hashlib.sha256).digest()


def encode_frame(key: bytes, sender: str, epoch: int, seq: int, payload: dict[str, Any]) -> bytes:
    name = sender.encode("utf-8")
    if not 1 <= len(name) <= MAX_SENDER:
        raise FrameError(f"sender name must be 1 to {MAX_SENDER} UTF-8 bytes, got {len(name)}")
    if not (0 <= epoch < _U64 and 0 <= seq < _U64):
        raise FrameError(f"epoch {epoch} and seq {seq} must both fit in 64 unsigned bits")
    if not isinstance(payload, dict):
        raise FrameError(f"payload must be a dict, got {type(payload).__name__}")
    try:
        text = json.dumps(payload, separators=(",", ":"), allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as e:
        raise FrameError(f"payload is not JSON-serialisable: {e}") from None
    body = MAGIC + bytes((VERSION, len(name))) + name + _COUNTERS.pack(epoch, seq) + text
    frame = body + _mac(key, body)
    if len(frame) > MAX_FRAME:
        raise FrameTooLarge(
            f"heartbeat frame of {len(frame)} bytes exceeds {MAX_FRAME}: the payload is too big"
        )
    return frame


def decode_frame(key: bytes, data: bytes) -> Frame:
    if len(data) > MAX_FRAME:
        raise Malformed(f"frame of {len(data)} bytes exceeds the {MAX_FRAME}-byte maximum")
    if len(data) < _MIN_FRAME:
        raise Malformed(f"frame of {len(data)} bytes is shorter than the {_MIN_FRAME}-byte minimum")
    # Magic and version are compared with constants before the MAC, so that traffic of another
    # protocol or version is reported as malformed rather than as a key mismatch. Nothing read
    # from the frame is used before the MAC is verified.
    if data[: len(MAGIC)] != MAGIC:
        raise Malformed("not a mirrorha heartbeat (bad magic)")
    if data[len(MAGIC)] != VERSION:
        raise Malformed(f"unsupported heartbeat version {data[len(MAGIC)]} (expected {VERSION})")
    body, mac = data[:-MAC_LEN], data[-MAC_LEN:]
    if not hmac.compare_digest(mac, _mac(key, body)):
        raise BadMac("heartbeat MAC mismatch (wrong cluster key, corruption or forgery)")
    return _parse_body(body)


def _parse_body(body: bytes) -> Frame:
    """Parse an authenticated body: a failure here is a bug or version skew in the peer."""
    n = body[_HEAD - 1]
    counters_at = _HEAD + n
    payload_at = counters_at + _COUNTERS.size
    if n == 0 or payload_at > len(body):
        raise Malformed(f"sender name length {n} does not fit in the frame")
    try:
        sender = body[_HEAD:counters_at].decode("utf-8")
        payload = json.loads(body[payload_at:].decode("utf-8"))
    except (ValueError, RecursionError) as e:
        raise Malformed(f"undecodable sender or payload: {e}") from None
    if not isinstance(payload, dict):
        raise Malformed(f"payload is a JSON {type(payload).__name__}, expected an object")
    epoch, seq = _COUNTERS.unpack_from(body, counters_at)
    return Frame(sender=sender, epoch=epoch, seq=seq, payload=payload)


# ---------------------------------------------------------------------------------------------
# Replay protection
# ---------------------------------------------------------------------------------------------


@dataclass
class _Window:
    """Mutable per-sender state: bit i of `seen` set means seq `top - i` was accepted."""

    epoch: int
    top: int
    seen: int


class ReplayGuard:
    """IPsec-style anti-replay: per sender, the highest epoch and a bitmap of recent seqs.

    The epoch is the sender's start time, so a restarted sender (higher epoch) resets the
    window, and frames of an earlier run are refused. Call `accept` only for frames whose MAC
    has been verified; otherwise a forger could advance the window and silence the peer.
    """

    def __init__(self, window: int = 128) -> None:
        if window < 1:
            raise ValueError("the replay window must hold at least one sequence number")
        self.window = window
        self._mask = (1 << window) - 1
        self._senders: dict[str, _Window] = {}

    def accept(self, sender: str, epoch: int, seq: int) -> bool:
        """Record (epoch, seq) and return True if it is new; return False for a replay."""
        w = self._senders.get(sender)
        if w is None or epoch > w.epoch:
            self._senders[sender] = _Window(epoch=epoch, top=seq, seen=1)
            return True
        if epoch < w.epoch:
            return False
        if seq > w.top:
            w.seen = ((w.seen << (seq - w.top)) | 1) & self._mask
            w.top = seq
            return True
        offset = w.top - seq
        if offset >= self.window or w.seen & (1 << offset):
            return False
        w.seen |= 1 << offset
        return True


# ---------------------------------------------------------------------------------------------
# Events and the loss / restore decision
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PeerHeard:
    """The peer is heard for the first time (since start or since a loss), or its payload
    changed since the last PeerHeard."""

    payload: dict[str, Any]
    network: str


@dataclass(frozen=True)
class PeerSilent:
    """Every network has been silent for at least the timeout (emitted once per loss)."""

    silent_ms: int
    networks_total: int
    detail: str


@dataclass(frozen=True)
class NetworkLost:
    """One network is silent while others still carry heartbeats: a warning, not a failover."""

    network: str
    silent_ms: int
    still_up: int
    total: int


@dataclass(frozen=True)
class NetworkRestored:
    """A network reported by NetworkLost carries heartbeats again."""

    network: str


HeartbeatEvent = PeerHeard | PeerSilent | NetworkLost | NetworkRestored


@dataclass
class _NetState:
    """Mutable tracker state of one network.

    `ref` is the last receipt, or the moment the peer was (re)heard on another network for a
    network not heard since: each network gets a full timeout to show up before it is
    reported lost. `down` means its silence was reported (NetworkLost or inside PeerSilent).
    """

    ref: float
    down: bool = False


class PeerTracker:
    """Decides from receipts and the time when the peer and each network are lost or back.

    Pure (no clock, no socket): `now` is passed in, in seconds on any monotonic clock.
    The peer is lost only when every network has been silent for `timeout_s`.
    """

    def __init__(
        self, *, peer: str, networks: Sequence[str], timeout_s: float, start: float
    ) -> None:
        if not networks:
            raise ValueError("a peer tracker needs at least one network")
        self.peer = peer
        self.timeout_s = timeout_s
        self._start = start
        self._nets = {name: _NetState(ref=start) for name in networks}
        self._up = False
        self._silence_reported = False
        self._last_payload: dict[str, Any] | None = None

    @property
    def peer_up(self) -> bool:
        return self._up

    @property
    def last_payload(self) -> dict[str, Any] | None:
        return self._last_payload

    def receipt(self, network: str, now: float, payload: dict[str, Any]) -> list[HeartbeatEvent]:
        """An authenticated, fresh heartbeat from the peer arrived on `network`."""
        net = self._nets[network]
        net.ref = now
        if not self._up:
            return self._peer_back(network, now, payload)
        events: list[HeartbeatEvent] = []
        if net.down:
            net.down = False
            events.append(NetworkRestored(network=network))
        if payload != self._last_payload:
            events.append(self._heard(network, payload))
        return events

    def check(self, now: float) -> list[HeartbeatEvent]:
        """Report the silences that reached the timeout at `now`; call it often (each pulse)."""
        if not self._up:
            return self._check_never_heard(now)
        newly = [n for n, s in self._nets.items() if not s.down and now - s.ref >= self.timeout_s]
        for name in newly:
            self._nets[name].down = True
        total = len(self._nets)
        if all(s.down for s in self._nets.values()):
            self._up = False
            self._silence_reported = True
            silent_ms = _ms(now - max(s.ref for s in self._nets.values()))
            detail = f"no heartbeat from {self.peer} on {total}/{total} networks for {silent_ms} ms"
            return [PeerSilent(silent_ms=silent_ms, networks_total=total, detail=detail)]
        still_up = sum(not s.down for s in self._nets.values())
        return [
            NetworkLost(
                network=name,
                silent_ms=_ms(now - self._nets[name].ref),
                still_up=still_up,
                total=total,
            )
            for name in newly
        ]

    def _check_never_heard(self, now: float) -> list[HeartbeatEvent]:
        # After a loss PeerSilent was already emitted; only the start needs a report here.
        if self._silence_reported or now - self._start < self.timeout_s:
            return []
        self._silence_reported = True
        total = len(self._nets)
        silent_ms = _ms(now - self._start)
        detail = (
            f"no heartbeat from {self.peer} since start, on {total}/{total} networks "
            f"for {silent_ms} ms"
        )
        return [PeerSilent(silent_ms=silent_ms, networks_total=total, detail=detail)]

    def _peer_back(self, network: str, now: float, payload: dict[str, Any]) -> list[HeartbeatEvent]:
        self._up = True
        self._silence_reported = False
        for state in self._nets.values():
            state.ref = now
            state.down = False
        return [self._heard(network, payload)]

    def _heard(self, network: str, payload: dict[str, Any]) -> PeerHeard:
        self._last_payload = payload
        return PeerHeard(payload=payload, network=network)


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


# ---------------------------------------------------------------------------------------------
# The link: sockets and the heartbeat thread
# ---------------------------------------------------------------------------------------------


class HeartbeatError(MirrorhaError):
    """The heartbeat link cannot be configured or started."""


@dataclass(frozen=True)
class HeartbeatNetwork:
    name: str
    local_addr: IPv4Address
    peer_addr: IPv4Address
    port: int


@dataclass(frozen=True)
class NetworkSnapshot:
    name: str
    up: bool  # a heartbeat arrived on this network less than timeout_ms ago
    last_seen_age_s: float | None
    rtt_s: float | None
    received: int
    sent: int


@dataclass(frozen=True)
class LinkSnapshot:
    networks: tuple[NetworkSnapshot, ...]
    peer_up: bool
    rejected_bad_mac: int
    rejected_replay: int
    rejected_unknown_sender: int
    rejected_malformed: int
    send_errors: int
    running: bool  # the heartbeat thread is alive: if not, the peer will soon declare us lost

    def network(self, name: str) -> NetworkSnapshot:
        for n in self.networks:
            if n.name == name:
                return n
        raise KeyError(name)


@dataclass
class _NetStats:
    """Mutable per-network counters and echo state, guarded by the link's lock."""

    sent: int = 0
    received: int = 0
    last_seen: float | None = None
    rtt_s: float | None = None
    peer_ts_us: int | None = None  # the peer's send timestamp last received here, to echo back
    peer_ts_rx: float = 0.0  # when we received it, on our clock (for the hold time)
    last_echoed_us: int | None = None  # our timestamp last echoed back here (RTT computed)


@dataclass(frozen=True)
class _Envelope:
    """What travels in the frame's payload: the caller's dict plus our RTT fields."""

    payload: dict[str, Any]
    sent_us: int | None
    echo: tuple[int, int] | None  # (our timestamp echoed back, how long the peer held it), µs


RTT_MAX_S = 10.0  # an echo older than this is stale (peer restarted, long outage): ignore it
LOG_EVERY_S = 10.0
_RECV_BURST = 64  # datagrams read per socket per wake-up: bounds a flood's hold on the loop
_RECV_SIZE = 2048  # larger than MAX_FRAME so that oversized datagrams are seen as such
_TOS_CS6 = 0xC0  # DSCP CS6 "network control": switches that honour DSCP queue us first


class _RateLimitedLog:
    """At most one line per key every `every_s`, counting what was held back.

    Used from a single thread (the one that owns it), so it needs no lock.
    """

    def __init__(self, clock: Clock, every_s: float = LOG_EVERY_S) -> None:
        self._clock = clock
        self._every_s = every_s
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def __call__(self, key: str, level: int, message: str, *, exc: bool = False) -> None:
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self._every_s:
            self._held[key] = self._held.get(key, 0) + 1
            return
        held = self._held.pop(key, 0)
        if held:
            message += f" ({held} similar in the last {self._every_s:.0f} s not logged)"
        self._last[key] = now
        log.log(level, message, exc_info=exc)


def _close_pipe(pipe: tuple[int, int] | None) -> None:
    if pipe is not None:
        os.close(pipe[0])
        os.close(pipe[1])


def _wake_pipe() -> tuple[int, int]:
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    return r, w


def _drain_pipe(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass


def _poll_ms(seconds: float) -> int:
    # Rounded up: waking a hair early would make the loop spin until the deadline.
    return max(0, math.ceil(seconds * 1000))


class HeartbeatLink:
    """Sends and receives the heartbeats of one node to its peer, on every network, in its own
    thread. Reports the peer's payloads and the losses through `on_event`, called from that
    thread (the caller makes it thread-safe and quick).

    `clock` must tick in seconds at the pace of real time (poll timeouts are real time); it is
    injectable so that tests and the daemon share one notion of time. `epoch` defaults to the
    wall-clock start time in ns; it must grow across restarts or the peer refuses our frames as
    replays of an older run (a wall clock stepped back across a restart would do that).
    """

    def __init__(
        self,
        *,
        node: str,
        peer: str,
        key: bytes,
        networks: Sequence[HeartbeatNetwork],
        pulse_ms: int,
        timeout_ms: int,
        payload: Callable[[], dict[str, Any]],
        on_event: Callable[[HeartbeatEvent], None],
        clock: Clock = time.monotonic,
        epoch: int | None = None,
    ) -> None:
        _validate(node, peer, key, networks, pulse_ms, timeout_ms)
        self.node = node
        self.peer = peer
        self._key = key
        self._networks = tuple(networks)
        self._pulse_s = pulse_ms / 1000
        self._timeout_s = timeout_ms / 1000
        self._payload = payload
        self._on_event = on_event
        self._clock = clock
        self._epoch = time.time_ns() if epoch is None else epoch
        self._seq = 0
        self._guard = ReplayGuard()
        # (epoch, seq) of the newest frame whose payload was taken: a frame overtaken on another
        # network still proves liveness, but its older payload must not undo a newer one.
        self._newest: tuple[int, int] = (-1, -1)
        self._lock = threading.Lock()
        self._stats = {n.name: _NetStats() for n in self._networks}
        self._counters = dict.fromkeys(_COUNTER_NAMES, 0)
        self._tracker: PeerTracker | None = None
        self._socks: list[socket.socket] = []
        self._wake: tuple[int, int] | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._send_requested = threading.Event()
        self._log = _RateLimitedLog(clock)
        self._start_us = 0

    # -- public API ---------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise HeartbeatError("heartbeat link already started")
        self._socks = self._bind_all()
        self._wake = _wake_pipe()
        now = self._clock()
        self._start_us = int(now * 1e6)
        self._tracker = PeerTracker(
            peer=self.peer,
            networks=[n.name for n in self._networks],
            timeout_s=self._timeout_s,
            start=now,
        )
        self._thread = threading.Thread(
            target=self._run, name=f"heartbeat-{self.node}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        thread = self._thread
        if thread is None:
            return
        self._stopping.set()
        self._poke()
        thread.join(timeout=max(1.0, 4 * self._pulse_s))
        if thread.is_alive():
            log.warning("heartbeat thread did not stop within its grace time; leaving it behind")
        for s in self._socks:
            s.close()
        self._socks = []
        with self._lock:
            _close_pipe(self._wake)
            self._wake = None

    def send_now(self) -> None:
        """Send a heartbeat on every network as soon as possible (the payload changed)."""
        self._send_requested.set()
        self._poke()

    def snapshot(self) -> LinkSnapshot:
        now = self._clock()
        with self._lock:
            nets = tuple(self._net_snapshot(n.name, now) for n in self._networks)
            peer_up = self._tracker is not None and self._tracker.peer_up
            counters = dict(self._counters)
        return LinkSnapshot(
            networks=nets,
            peer_up=peer_up,
            running=self._thread is not None and self._thread.is_alive(),
            **counters,
        )

    # -- set-up -------------------------------------------------------------------------------

    def _bind_all(self) -> list[socket.socket]:
        socks: list[socket.socket] = []
        try:
            for net in self._networks:
                socks.append(_bind(net))
        except BaseException:
            for s in socks:
                s.close()
            raise
        return socks

    def _poke(self) -> None:
        # Under the lock so that stop() cannot close the pipe (and the fd number be reused by
        # some other file) between the check and the write.
        with self._lock:
            if self._wake is None:
                return
            with contextlib.suppress(BlockingIOError):  # full pipe: a wake-up is pending anyway
                os.write(self._wake[1], b"x")

    def _net_snapshot(self, name: str, now: float) -> NetworkSnapshot:
        st = self._stats[name]
        age = None if st.last_seen is None else max(0.0, now - st.last_seen)
        return NetworkSnapshot(
            name=name,
            up=age is not None and age < self._timeout_s,
            last_seen_age_s=age,
            rtt_s=st.rtt_s,
            received=st.received,
            sent=st.sent,
        )

    # -- the thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        assert self._wake is not None
        poller = select.poll()
        by_fd = {s.fileno(): (s, n) for s, n in zip(self._socks, self._networks, strict=True)}
        for fd in by_fd:
            poller.register(fd, select.POLLIN)
        wake_fd = self._wake[0]
        poller.register(wake_fd, select.POLLIN)
        next_send = self._clock()
        while not self._stopping.is_set():
            try:
                next_send = self._cycle(poller, by_fd, wake_fd, next_send)
            except Exception:
                # A bug here must not silence us (the peer would take over): log and go on.
                self._log("cycle", logging.ERROR, "heartbeat loop error", exc=True)
                self._stopping.wait(self._pulse_s / 10)
        if self._send_requested.is_set():
            # The last state change (typically STOP at daemon shutdown) must reach the peer, so
            # that it takes over at once instead of after the timeout.
            with contextlib.suppress(Exception):
                self._send_all()

    def _cycle(
        self,
        poller: select.poll,
        by_fd: dict[int, tuple[socket.socket, HeartbeatNetwork]],
        wake_fd: int,
        next_send: float,
    ) -> float:
        now = self._clock()
        due = now >= next_send
        if due or self._send_requested.is_set():
            self._send_requested.clear()
            self._send_all()
        if due:
            # Keep the cadence, but after a stall send once rather than a burst of late pulses.
            next_send += self._pulse_s
            if next_send <= now:
                next_send = now + self._pulse_s
        for fd, _ in poller.poll(_poll_ms(next_send - self._clock())):
            if fd == wake_fd:
                _drain_pipe(wake_fd)
            else:
                self._receive(*by_fd[fd])
        assert self._tracker is not None
        with self._lock:
            events = self._tracker.check(self._clock())
        self._emit(events)
        return next_send

    def _emit(self, events: list[HeartbeatEvent]) -> None:
        for event in events:
            try:
                self._on_event(event)
            except Exception:
                self._log("on_event", logging.ERROR, "heartbeat event handler failed", exc=True)

    # -- sending ------------------------------------------------------------------------------

    def _send_all(self) -> None:
        try:
            payload = self._payload()
        except Exception:
            # Sending a made-up state would mislead the peer's decisions more than silence.
            self._log("payload", logging.ERROR, "heartbeat payload callback failed", exc=True)
            self._count("send_errors", len(self._socks))
            return
        for sock, net in zip(self._socks, self._networks, strict=True):
            self._send_one(sock, net, payload)

    def _send_one(
        self, sock: socket.socket, net: HeartbeatNetwork, payload: dict[str, Any]
    ) -> None:
        with self._lock:
            self._seq += 1
            seq = self._seq
            envelope = self._envelope(net.name, payload)
        try:
            frame = encode_frame(self._key, self.node, self._epoch, seq, envelope)
        except FrameError as e:
            self._log("encode", logging.ERROR, f"heartbeat not sent: {e}")
            self._count("send_errors")
            return
        try:
            sock.sendto(frame, (str(net.peer_addr), net.port))
        except OSError as e:
            self._log(
                f"send:{net.name}",
                logging.WARNING,
                f"heartbeat to {net.peer_addr}:{net.port} on network {net.name} failed: {e}",
            )
            self._count("send_errors")
            return
        with self._lock:
            self._stats[net.name].sent += 1

    def _envelope(self, network: str, payload: dict[str, Any]) -> dict[str, Any]:
        now = self._clock()
        envelope: dict[str, Any] = {"p": payload, "t": int(now * 1e6)}
        st = self._stats[network]
        if st.peer_ts_us is not None:
            envelope["echo"] = [st.peer_ts_us, int((now - st.peer_ts_rx) * 1e6)]
        return envelope

    # -- receiving ----------------------------------------------------------------------------

    def _receive(self, sock: socket.socket, net: HeartbeatNetwork) -> None:
        for _ in range(_RECV_BURST):
            try:
                data, (src, _port) = sock.recvfrom(_RECV_SIZE)
            except BlockingIOError:
                return
            except OSError as e:
                self._log(f"recv:{net.name}", logging.WARNING, f"heartbeat receive failed: {e}")
                return
            self._emit(self._accept(net, data, src))

    def _accept(self, net: HeartbeatNetwork, data: bytes, src: str) -> list[HeartbeatEvent]:
        """Check one datagram; count and drop it if it is not a fresh frame from the peer."""
        if src != str(net.peer_addr):
            return self._reject(
                "rejected_unknown_sender", f"datagram from {src} on {net.name}, not the peer"
            )
        try:
            frame = decode_frame(self._key, data)
        except BadMac as e:
            return self._reject("rejected_bad_mac", f"from {src} on {net.name}: {e}")
        except Malformed as e:
            return self._reject("rejected_malformed", f"from {src} on {net.name}: {e}")
        if frame.sender != self.peer:
            what = "ourselves (reflected)" if frame.sender == self.node else repr(frame.sender)
            return self._reject(
                "rejected_unknown_sender", f"heartbeat on {net.name} claims to be from {what}"
            )
        envelope = _parse_envelope(frame.payload)
        now = self._clock()
        with self._lock:
            # Replay check under the lock only because the guard is shared state; one thread.
            fresh = self._guard.accept(frame.sender, frame.epoch, frame.seq)
            if fresh and envelope is not None:
                newest = (frame.epoch, frame.seq) > self._newest
                if newest:
                    self._newest = (frame.epoch, frame.seq)
                return self._record(net.name, envelope, now, newest)
        if not fresh:
            return self._reject(
                "rejected_replay", f"replayed heartbeat (seq {frame.seq}) on {net.name}"
            )
        return self._reject("rejected_malformed", f"heartbeat on {net.name} has a bad envelope")

    def _record(self, network: str, envelope: _Envelope, now: float,
                newest: bool) -> list[HeartbeatEvent]:
        """Account for a fresh heartbeat (lock held) and return the tracker's events."""
        st = self._stats[network]
        st.received += 1
        st.last_seen = now
        if envelope.sent_us is not None:
            st.peer_ts_us, st.peer_ts_rx = envelope.sent_us, now
        if envelope.echo is not None:
            self._update_rtt(st, envelope.echo, now)
        assert self._tracker is not None
        payload = envelope.payload
        if not newest and self._tracker.last_payload is not None:
            payload = self._tracker.last_payload
        return self._tracker.receipt(network, now, payload)

    def _update_rtt(self, st: _NetStats, echo: tuple[int, int], now: float) -> None:
        ours_us, held_us = echo
        # Only our own timestamps of this run, each once: a new RTT per new echo.
        if ours_us < self._start_us or ours_us == st.last_echoed_us:
            return
        rtt = now - ours_us / 1e6 - held_us / 1e6
        if -0.001 <= rtt <= RTT_MAX_S:  # truncation to µs may push a tiny RTT just below zero
            st.rtt_s = max(0.0, rtt)
            st.last_echoed_us = ours_us

    def _reject(self, counter: str, message: str) -> list[HeartbeatEvent]:
        self._count(counter)
        self._log(counter, logging.WARNING, f"heartbeat {counter.replace('_', ' ')}: {message}")
        return []

    def _count(self, counter: str, n: int = 1) -> None:
        with self._lock:
            self._counters[counter] += n


_COUNTER_NAMES = (
    "rejected_bad_mac",
    "rejected_replay",
    "rejected_unknown_sender",
    "rejected_malformed",
    "send_errors",
)


def _parse_envelope(data: dict[str, Any]) -> _Envelope | None:
    payload, sent, echo = data.get("p"), data.get("t"), data.get("echo")
    if not isinstance(payload, dict):
        return None
    if sent is not None and not _is_int(sent):
        return None
    if echo is not None:
        if not (isinstance(echo, list) and len(echo) == 2 and all(_is_int(x) for x in echo)):
            return None
        echo = (echo[0], echo[1])
    return _Envelope(payload=payload, sent_us=sent, echo=echo)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _validate(
    node: str,
    peer: str,
    key: bytes,
    networks: Sequence[HeartbeatNetwork],
    pulse_ms: int,
    timeout_ms: int,
) -> None:
    if not node or not peer or node == peer:
        raise HeartbeatError(f"node {node!r} and peer {peer!r} must be two different names")
    for name in (node, peer):
        if len(name.encode("utf-8")) > MAX_SENDER:
            raise HeartbeatError(f"node name {name!r} is longer than {MAX_SENDER} bytes")
    if len(key) < 16:
        raise HeartbeatError(f"the cluster key is {len(key)} bytes; at least 16 are needed")
    if not networks:
        raise HeartbeatError("at least one heartbeat network is needed")
    names = [n.name for n in networks]
    if len(set(names)) != len(names):
        raise HeartbeatError(f"heartbeat network names must be unique: {names}")
    if pulse_ms <= 0 or timeout_ms <= pulse_ms:
        raise HeartbeatError(
            f"heartbeat pulse ({pulse_ms} ms) must be positive and below the timeout "
            f"({timeout_ms} ms)"
        )


def _bind(net: HeartbeatNetwork) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, _TOS_CS6)
        sock.bind((str(net.local_addr), net.port))
    except OSError as e:
        sock.close()
        raise HeartbeatError(
            f"cannot bind the heartbeat socket of network {net.name} to "
            f"{net.local_addr}:{net.port}: {e.strerror}"
        ) from None
    sock.setblocking(False)
    return sock


# ---------------------------------------------------------------------------------------------
# Witness: ICMP echo to a third host, for the split-brain checker
# ---------------------------------------------------------------------------------------------

ICMP_ECHO_REPLY = 0
ICMP_ECHO_REQUEST = 8
_ICMP_HEAD = struct.Struct("!BBHHH")  # type, code, checksum, identifier, sequence
_OUTSTANDING = 64  # probes remembered for matching replies: late replies beyond are ignored


def internet_checksum(data: bytes) -> int:
    """RFC 1071 ones' complement sum, as used by ICMP."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def icmp_echo_request(ident: int, seq: int, payload: bytes) -> bytes:
    unsummed = _ICMP_HEAD.pack(ICMP_ECHO_REQUEST, 0, 0, ident, seq) + payload
    checksum = internet_checksum(unsummed)
    return _ICMP_HEAD.pack(ICMP_ECHO_REQUEST, 0, checksum, ident, seq) + payload


@dataclass(frozen=True)
class EchoReply:
    source: IPv4Address
    ident: int
    seq: int
    payload: bytes


def parse_echo_reply(packet: bytes) -> EchoReply | None:
    """Parse an IPv4 packet as read from a raw ICMP socket; None unless a valid echo reply."""
    if len(packet) < 20 or packet[0] >> 4 != 4:
        return None
    ihl = (packet[0] & 0x0F) * 4
    icmp = packet[ihl:]
    if ihl < 20 or len(icmp) < _ICMP_HEAD.size or internet_checksum(icmp) != 0:
        return None
    kind, code, _, ident, seq = _ICMP_HEAD.unpack_from(icmp)
    if kind != ICMP_ECHO_REPLY or code != 0:
        return None
    return EchoReply(
        source=IPv4Address(packet[12:16]), ident=ident, seq=seq, payload=icmp[_ICMP_HEAD.size :]
    )


class Witness:
    """Pings a witness host every `interval_ms` from a dedicated thread.

    The split-brain checker asks `reachable(max_age_s)` when the peer is lost: the side that
    still reaches the witness may go on alone. Replies are matched on our identifier, a random
    token in the payload and a recently sent sequence number, so that other pings on the host
    (a raw socket sees every ICMP packet) never count.
    """

    def __init__(self, addr: IPv4Address, interval_ms: int, clock: Clock = time.monotonic) -> None:
        if interval_ms <= 0:
            raise HeartbeatError(f"witness interval must be positive, got {interval_ms} ms")
        self.addr = addr
        self._interval_s = interval_ms / 1000
        self._clock = clock
        self._ident = secrets.randbits(16)
        self._token = secrets.token_bytes(16)
        self._seq = 0
        self._sent: dict[int, float] = {}
        self._lock = threading.Lock()
        self._last_reply: float | None = None
        self._sock: socket.socket | None = None
        self._wake: tuple[int, int] | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._log = _RateLimitedLog(clock)

    def start(self) -> None:
        if self._thread is not None:
            raise HeartbeatError("witness already started")
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        except PermissionError:
            raise HeartbeatError(
                "the witness check needs a raw ICMP socket: run the daemon as root "
                "(or with CAP_NET_RAW)"
            ) from None
        sock.setblocking(False)
        self._sock = sock
        self._wake = _wake_pipe()
        self._thread = threading.Thread(target=self._run, name="witness", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        thread = self._thread
        if thread is None:
            return
        self._stopping.set()
        if self._wake is not None:
            with contextlib.suppress(BlockingIOError):
                os.write(self._wake[1], b"x")
        thread.join(timeout=max(1.0, 4 * self._interval_s))
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        _close_pipe(self._wake)
        self._wake = None

    def reachable(self, max_age_s: float) -> bool:
        """A reply from the witness was received within the last `max_age_s` seconds."""
        age = self.last_reply_age()
        return age is not None and age <= max_age_s

    def last_reply_age(self) -> float | None:
        with self._lock:
            last = self._last_reply
        return None if last is None else max(0.0, self._clock() - last)

    def _run(self) -> None:
        assert self._sock is not None and self._wake is not None
        poller = select.poll()
        poller.register(self._sock.fileno(), select.POLLIN)
        poller.register(self._wake[0], select.POLLIN)
        next_probe = self._clock()
        while not self._stopping.is_set():
            try:
                next_probe = self._cycle(poller, next_probe)
            except Exception:
                self._log("cycle", logging.ERROR, "witness loop error", exc=True)
                self._stopping.wait(self._interval_s / 10)

    def _cycle(self, poller: select.poll, next_probe: float) -> float:
        assert self._sock is not None and self._wake is not None
        now = self._clock()
        if now >= next_probe:
            self._probe(now)
            next_probe += self._interval_s
            if next_probe <= now:
                next_probe = now + self._interval_s
        for fd, _ in poller.poll(_poll_ms(next_probe - self._clock())):
            if fd == self._wake[0]:
                _drain_pipe(fd)
            else:
                self._drain()
        return next_probe

    def _probe(self, now: float) -> None:
        assert self._sock is not None
        self._seq = (self._seq + 1) & 0xFFFF
        self._sent[self._seq] = now
        while len(self._sent) > _OUTSTANDING:
            del self._sent[next(iter(self._sent))]  # dicts keep insertion order: oldest first
        packet = icmp_echo_request(self._ident, self._seq, self._token)
        try:
            self._sock.sendto(packet, (str(self.addr), 0))
        except OSError as e:
            self._log("send", logging.WARNING, f"witness ping to {self.addr} failed: {e}")

    def _drain(self) -> None:
        assert self._sock is not None
        for _ in range(_RECV_BURST):
            try:
                packet = self._sock.recv(_RECV_SIZE)
            except BlockingIOError:
                return
            except OSError as e:
                self._log("recv", logging.WARNING, f"witness receive failed: {e}")
                return
            reply = parse_echo_reply(packet)
            if (
                reply is not None
                and reply.source == self.addr
                and reply.ident == self._ident
                and reply.payload == self._token
                and self._sent.pop(reply.seq, None) is not None
            ):
                with self._lock:
                    self._last_reply = self._clock()
