"""The replication channel: one mutual-TLS stream from the primary to the secondary per module.

Primary side, `ReplicaSender`: `submit(op)` numbers the op, queues its frame for a single writer
task (so the stream carries ops in the order submit was called, whatever the number of
concurrent callers) and returns

- for an ordinary op, as soon as it fits in the in-flight window (bytes sent but not yet
  acknowledged): many writes are in flight at once, and a full window is the backpressure;
- for a durable op (FSYNC, SYNC), once the secondary acknowledged it durably, i.e. applied it
  and everything before it, and did the fsync/syncfs.

The sender never lets the application hang on a dead or stalled peer: no acknowledgement for
`ack_timeout_s` while something is outstanding, a broken stream or a NACK marks it broken; every
waiting and later `submit` raises `ReplicaBroken` and `on_broken(reason)` is called once.

Secondary side, `ReplicaReceiver`: accepts TLS connections (the ssl context checks the client
certificate), serves one primary at a time (a new authenticated connection replaces the current
one: a primary that restarted must not wait for a half-open stale connection), checks sequence
numbers, and applies ops strictly in order through an `Applier`. Past the accept loop it runs
in plain threads over blocking sockets (a reader and an applier per connection, see "secondary
side" below), not in the trio loop.

Greeting: the primary sends HELLO {protocol, node, module, generation, first_seq} and waits; the
secondary checks it (the node must be the one its certificate names; module; optional
`check_hello` for the generation) and answers HELLO {protocol, node, module, async, accepted}
when it starts serving, or NACK(seq 0, EPERM, reason) and closes. The first op carries
`first_seq` (default 1), each next op the next number.

Acknowledgements (protocol.Ack is cumulative: "everything up to seq"):
- Ack(seq, durable=False), async_mode "second": ops up to seq are received and queued in
  memory; they WILL be applied, in order, even if the connection drops afterwards (the session
  drains its queue before it ends). async_mode "none": ops up to seq are applied.
- Ack(seq, durable=True): every op up to seq is applied and the durable op seq (and so every
  durable op before it) completed its fsync/sync.
One Ack per batch of frames read (second) or applied (none), never one per frame.

An op the secondary refuses (malformed frame, sequence gap, path escaping the replicated
directory, OS error) is answered by a NACK carrying an errno; the connection is dropped and
nothing after that op is applied. The secondary's copy is then the prefix before the refused op.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol

import trio

from appliance.errors import MirrorhaError
from appliance.replication import tls
from appliance.replication.protocol import (
    MAX_REPLY,
    ZERO_COPY_BYTES,
    Ack,
    Frame,
    Hello,
    Nack,
    Op,
    OpKind,
    ProtocolError,
    Reply,
    decode,
    encode,
    encode_op_parts,
    frame_length,
)
from appliance.replication.tlsio import BlockingTls, TrioTls

log = logging.getLogger("mirrorha.replication.channel")

PROTOCOL_VERSION = 1
DEFAULT_WINDOW_BYTES = 8 * 1024 * 1024
DEFAULT_ACK_TIMEOUT_S = 5.0
DEFAULT_CONNECT_TIMEOUT_S = 5.0
DEFAULT_APPLY_QUEUE_BYTES = 16 * 1024 * 1024  # received, acked ("second") and not yet applied
HANDSHAKE_TIMEOUT_S = 5.0  # a connection must prove itself (TLS + HELLO) within this
CLOSE_TIMEOUT_S = 1.0
MAX_PENDING_HANDSHAKES = 16  # unauthenticated connections cannot pile up without bound
RECEIVE_CHUNK = 256 * 1024
SEND_BATCH_BYTES = 256 * 1024  # small frames are joined into one send_all up to this
CORK_S = 0.002  # how long ordinary ops may wait for more to join them (none is waited for)
LINGER_S = 2.0  # after a NACK, how long the secondary reads on before it closes
LINGER_QUIET_S = 0.2  # ...unless the primary has sent nothing for this long
READ_POLL_S = 0.2  # the secondary's reader looks up from its socket this often when idle
QUERY_TIMEOUT_S = 300.0  # a LIST of a huge tree or SUMS of a huge file takes a while
MAX_ANSWER_BYTES = 1 << 30  # memory a query's answer may take here
APPLY_BATCH_OPS = 256  # ops handed to the applier thread per round trip
APPLY_BATCH_BYTES = 4 * 1024 * 1024
INLINE_APPLY_BYTES = 256 * 1024  # a durable batch up to this is applied by the reader itself
# Half-open TCP (peer host died, no FIN) is noticed by the sender's ack timeout; keepalive lets
# the receiver notice it too when idle, and frees the socket.
KEEPALIVE_IDLE_S, KEEPALIVE_INTERVAL_S, KEEPALIVE_COUNT = 5, 2, 3

ASYNC_MODES: tuple[str, ...] = ("second", "none")


class ReplicaBroken(MirrorhaError):
    """The replication stream to the secondary is unusable; `reason` is a sentence for the log.
    The op being submitted may or may not have reached the secondary."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class ApplierLike(Protocol):
    """What the receiver needs from appliance.replication.applier.Applier."""

    def apply(self, op: Op) -> None: ...
    def query(self, op: Op) -> bytes: ...
    def fsync(self, root: int, path: str, datasync: bool) -> None: ...
    def sync(self) -> None: ...


@dataclass(frozen=True)
class Lag:
    """What the secondary has not acknowledged yet (RPO at risk if the primary died now)."""

    bytes: int
    ops: int
    seconds: float  # age of the oldest unacknowledged op; 0 when nothing is in flight


@dataclass(frozen=True)
class PeerConnected:
    node: str
    hello: Mapping[str, Any]


@dataclass(frozen=True)
class PeerDisconnected:
    node: str
    reason: str
    last_applied_seq: int


@dataclass(frozen=True)
class OpRefused:
    node: str
    seq: int
    errno: int
    message: str


@dataclass(frozen=True)
class ConnectionRefused:
    address: str
    reason: str


ReceiverEvent = PeerConnected | PeerDisconnected | OpRefused | ConnectionRefused


# ----------------------------------------------------------------------------------- framing

class _FrameParser:
    """Splits a byte stream into decoded frames."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._need = 4  # bytes the buffer must hold before parsing can make progress

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> tuple[list[Frame], ProtocolError | None]:
        """The frames `data` completes; after a malformed frame, the good frames before it
        and the error (nothing after it can be trusted: the rest is dropped)."""
        self._buf += data
        # TLS hands out a 1 MiB frame in 16 KiB records: only look at the buffer once the
        # awaited frame is complete.
        if len(self._buf) < self._need:
            return [], None
        frames: list[Frame] = []
        pos, end = 0, len(self._buf)
        self._need = 4
        try:
            with memoryview(self._buf) as view:
                while end - pos >= 4:
                    size = 4 + frame_length(view[pos:pos + 4])
                    if end - pos < size:
                        self._need = size
                        break
                    # decode copies out what it keeps: no copy of the whole frame first
                    frames.append(decode(view[pos + 4:pos + size]))
                    pos += size
        except ProtocolError as e:
            # Nothing after a bad frame can be trusted. Its traceback still holds a view of
            # the buffer (which could then not be resized): a new buffer, the error bare.
            self._buf = bytearray()
            return frames, e.with_traceback(None)
        del self._buf[:pos]
        return frames, None


class _FrameReader:
    """A trio stream's frames, returning everything already buffered at once so that a whole
    batch can be handled in one go."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._parser = _FrameParser()
        self._pending: list[Frame] = []
        self._error: ProtocolError | None = None

    async def batch(self) -> list[Frame]:
        """At least one frame; [] at a clean end of stream. A malformed frame raises
        ProtocolError after the good frames before it have been returned."""
        while True:
            if self._pending:
                frames, self._pending = self._pending, []
                return frames
            if self._error is not None:
                raise self._error
            data = await self._stream.receive_some(RECEIVE_CHUNK)
            if not data:
                if self._parser.buffered:
                    raise ProtocolError(
                        f"stream ended inside a frame ({self._parser.buffered} bytes)")
                return []
            self._pending, self._error = self._parser.feed(data)


def _describe(exc: BaseException) -> str:
    """The useful sentence of a stream error: trio wraps the ssl/OS error as __cause__."""
    cause = exc.__cause__ or exc
    text = str(cause) or type(cause).__name__
    return text if isinstance(cause, ProtocolError) else f"{type(cause).__name__}: {text}"


def _tune_socket(transport: trio.SocketStream | socket.socket) -> None:
    transport.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)  # acks are tiny
    transport.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, True)
    transport.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE_S)
    transport.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL_S)
    transport.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)


async def _close_quietly(stream: trio.abc.AsyncResource) -> None:
    # Closing a dead stream: nothing left to tell the peer.
    with (trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT_S),
          contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError)):
        await stream.aclose()


# ------------------------------------------------------------------------------- primary side

class _SendBatch:
    """Frames leaving in one send, as the buffers they are made of (a large write's data is
    its own buffer: joined, it would be copied once more)."""

    def __init__(self, first: tuple[bytes, ...]) -> None:
        self.buffers: list[bytes] = []
        self.frames = self.size = 0
        self.add(first)

    def add(self, frame: tuple[bytes, ...]) -> None:
        self.buffers.extend(frame)
        self.frames += 1
        self.size += sum(map(len, frame))

    def parts(self) -> list[bytes]:
        """The buffers with each run of small ones joined: one TLS record per part at least,
        and small records cost both sides more than the copy."""
        out: list[bytes] = []
        run: list[bytes] = []
        for buf in self.buffers:
            if len(buf) < ZERO_COPY_BYTES:
                run.append(buf)
                continue
            if run:
                out.append(run[0] if len(run) == 1 else b"".join(run))
                run = []
            out.append(buf)
        if run:
            out.append(run[0] if len(run) == 1 else b"".join(run))
        return out


class ReplicaSender:
    """The primary's end of one module's replication stream.

    Usage (inside the replication trio loop)::

        sender = ReplicaSender(node=..., peer=..., module=..., generation=..., host=...,
                               port=..., ssl_context=tls.client_context(pki, node, peer),
                               on_broken=...)
        peer_hello = await sender.connect()   # ReplicaBroken if refused/unreachable
        nursery.start_soon(sender.run)        # until broken or aclose(); never raises
        await sender.submit(op)

    A sender is used for one connection: after it broke, make a new one (and resynchronise:
    ops not covered by an ack are in `unacked_ops()`).
    """

    def __init__(
        self, *, node: str, peer: str, module: str, host: str, port: int,
        ssl_context: ssl.SSLContext, generation: int = 0, first_seq: int = 1,
        window_bytes: int = DEFAULT_WINDOW_BYTES, ack_timeout_s: float = DEFAULT_ACK_TIMEOUT_S,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
        on_broken: Callable[[str], None] | None = None,
    ) -> None:
        if first_seq < 1:
            raise ValueError("first_seq must be at least 1")
        self.node, self.peer, self.module = node, peer, module
        self._host, self._port, self._ssl_context = host, port, ssl_context
        self._generation = generation
        self._window = window_bytes
        self._ack_timeout = ack_timeout_s
        self._connect_timeout = connect_timeout_s
        self._on_broken = on_broken
        self._stream: TrioTls | None = None
        self._reader: _FrameReader | None = None
        # (frame's buffers, sent at once): durable and query frames are not held back by the cork
        self._send_q, self._recv_q = trio.open_memory_channel[tuple[tuple[bytes, ...], bool]](
            float("inf"))
        self._admission = trio.Lock()  # FIFO: seq order is the order submit() was called
        self._changed = trio.Event()
        self._timeout_changed = trio.Event()
        self._scope: trio.CancelScope | None = None
        self._broken: str | None = None
        self._nack: Nack | None = None
        self._next_seq = first_seq
        self._acked_seq = first_seq - 1
        self._durable_seq = first_seq - 1
        self._max_durable_seq = first_seq - 1
        self._sent_seq = first_seq - 1  # handed to the socket
        self._sent_wanted = False  # a submitter waits for _sent_seq to move
        self._in_flight: deque[tuple[int, Op, float]] = deque()  # (seq, op, time admitted)
        self._in_flight_bytes = 0
        self._last_progress = time.monotonic()
        self.submitted_ops = 0
        self.submitted_bytes = 0
        # query seq -> (answer parts so far, set once the last part came)
        self._queries: dict[int, tuple[list[bytes], trio.Event]] = {}

    # -- connection

    async def connect(self) -> dict[str, Any]:
        """Open the TLS session and exchange HELLOs; returns the secondary's HELLO.
        Raises ReplicaBroken when the peer is unreachable, not who it should be, or refuses."""
        if self._stream is not None:
            raise RuntimeError("ReplicaSender.connect() called twice")
        where = f"{self.peer} at {self._host}:{self._port}"
        tcp: trio.SocketStream | None = None
        try:
            with trio.fail_after(self._connect_timeout):
                tcp = await trio.open_tcp_stream(self._host, self._port)
                _tune_socket(tcp)
                stream = TrioTls(tcp, self._ssl_context, server_hostname=self.peer)
                await stream.do_handshake()
                await stream.send_all(encode(Hello({
                    "protocol": PROTOCOL_VERSION, "node": self.node, "module": self.module,
                    "generation": self._generation, "first_seq": self._next_seq})))
                reader = _FrameReader(stream)
                reply = await reader.batch()
        except trio.TooSlowError:
            await self._discard(tcp)
            raise ReplicaBroken(f"no replication session with {where} within "
                                f"{self._connect_timeout:g} s") from None
        except (OSError, trio.BrokenResourceError, ProtocolError) as e:
            await self._discard(tcp)
            raise ReplicaBroken(f"cannot open replication to {where}: {_describe(e)}") from None
        match reply[:1]:
            case [Hello(info)]:
                self._stream, self._reader = stream, reader
                if reply[1:]:
                    await self._discard(tcp)
                    raise ReplicaBroken(f"{where} sent frames before any op")
                return dict(info)
            case [Nack(message=message)]:
                reason = f"{where} refused the replication connection: {message}"
            case []:
                # TLS 1.3: a refused client certificate shows up as the session ending here.
                reason = f"{where} closed the replication connection during the greeting"
            case _:
                reason = f"{where} answered the greeting with {type(reply[0]).__name__}"
        await self._discard(tcp)
        raise ReplicaBroken(reason)

    async def _discard(self, tcp: trio.SocketStream | None) -> None:
        if tcp is not None:
            await _close_quietly(tcp)

    async def run(self) -> None:
        """Pump ops out and acks in until broken or closed. Never raises (except Cancelled):
        failures go to on_broken and to the waiting submitters."""
        if self._stream is None:
            raise RuntimeError("ReplicaSender.run() before a successful connect()")
        try:
            async with trio.open_nursery() as nursery:
                self._scope = nursery.cancel_scope
                if self._broken is None:
                    nursery.start_soon(self._writer)
                    nursery.start_soon(self._ack_reader)
                    nursery.start_soon(self._watchdog)
        finally:
            self._break(f"replication to {self.peer} stopped", failure=False)
            await _close_quietly(self._stream)

    async def aclose(self) -> None:
        """Stop on purpose: waiting submitters get ReplicaBroken, on_broken is not called."""
        self._break(f"replication to {self.peer} was closed", failure=False)
        if self._stream is not None and self._scope is None:  # else run() closes it
            await _close_quietly(self._stream)

    # -- submitting

    async def submit(self, op: Op, meanwhile: Callable[[], None] | None = None) -> None:
        """Send `op` (its seq is assigned here); see the module docstring for when this returns.
        Raises ReplicaBroken, or ProtocolError for an op that cannot be encoded (not sent).

        `meanwhile`, for a durable op: called once the op has left for the secondary and
        before its ack is awaited (to start the local fsync then: started before, its thread
        competes with the sending for the interpreter). Not called if the stream breaks
        first."""
        await self._submit(op, meanwhile)

    async def query(self, op: Op, timeout_s: float = QUERY_TIMEOUT_S) -> bytes:
        """Send a query op (LIST, SUMS) in its place in the stream and return the secondary's
        answer: it describes the secondary's copy after every op sent before it. No answer
        within `timeout_s` (a stuck secondary: queries are acknowledged on receipt, so the
        ack watchdog does not see it) breaks the stream."""
        if not op.query:
            raise ValueError(f"{op.kind.name} is not a query")
        seq = await self._submit(op)
        parts, done = self._queries[seq]
        with trio.move_on_after(timeout_s):
            while not done.is_set():
                self._raise_if_broken()
                await self._changed.wait()
        if not done.is_set():
            self._break(f"{self.peer} did not answer {op.kind.name} #{seq} within "
                        f"{timeout_s:g} s")
            self._raise_if_broken()
        del self._queries[seq]
        return b"".join(parts)

    async def _submit(self, op: Op, meanwhile: Callable[[], None] | None = None) -> int:
        self._raise_if_broken()
        if self._stream is None:
            raise ReplicaBroken(f"replication to {self.peer} is not connected")
        size = op.size
        if self._admission.locked() or not self._fits(size):
            # Wait for room, in line behind earlier submitters (trio.Lock is FIFO).
            async with self._admission:
                while not self._fits(size):
                    self._raise_if_broken()
                    await self._changed.wait()
                self._raise_if_broken()
                seq = self._admit(op)
        else:
            # Room and nobody waiting: admitted without yielding, so a burst of submits is
            # queued before the writer runs and leaves in a few large TLS writes.
            seq = self._admit(op)
        if op.durable:
            if meanwhile is not None:
                while self._sent_seq < seq:
                    self._raise_if_broken()
                    self._sent_wanted = True
                    await self._changed.wait()
                meanwhile()
            while self._durable_seq < seq:
                self._raise_if_broken()
                await self._changed.wait()
        return seq

    def _fits(self, size: int) -> bool:
        # An op larger than the window goes alone: it must not wait forever.
        return not self._in_flight_bytes or self._in_flight_bytes + size <= self._window

    def _admit(self, op: Op) -> int:
        """Number, encode and queue `op` (no await: the seq order is the queue order)."""
        seq = self._next_seq
        frame = encode_op_parts(op, seq)  # raises before the seq is consumed
        self._next_seq += 1
        now = time.monotonic()
        idle = not self._outstanding()
        self._in_flight.append((seq, op, now))
        self._in_flight_bytes += op.size
        if op.durable:
            self._max_durable_seq = seq
        if op.query:
            self._queries[seq] = ([], trio.Event())
        self.submitted_ops += 1
        self.submitted_bytes += op.size
        self._send_q.send_nowait((frame, op.durable or op.query))
        if idle:
            self._last_progress = now  # the ack timeout counts from the first op in flight
            self._notify()  # wakes the watchdog
        return seq

    # -- state for the manager (may be read from another thread: plain reads only)

    def lag(self) -> Lag:
        try:
            oldest = self._in_flight[0][2]
        except IndexError:
            return Lag(0, 0, 0.0)
        return Lag(self._in_flight_bytes, len(self._in_flight),
                   max(0.0, time.monotonic() - oldest))

    @property
    def broken(self) -> str | None:
        """Why the sender is unusable, or None while it works."""
        return self._broken

    @property
    def nack(self) -> Nack | None:
        """The secondary's refusal, if that is what broke the stream: its copy then ends just
        before nack.seq, whatever was acknowledged (full resync territory)."""
        return self._nack

    @property
    def acked_seq(self) -> int:
        return self._acked_seq

    @property
    def durable_seq(self) -> int:
        return self._durable_seq

    def unacked_ops(self) -> list[Op]:
        """Ops no ack covers (in seq order): after a break, the primary must record them in its
        dirty-zone journal. Some may have reached the secondary; re-copying them is harmless."""
        return [replace(op, seq=seq) for seq, op, _ in self._in_flight]

    # -- tasks

    async def _writer(self) -> None:
        assert self._stream is not None
        try:
            async for frame, urgent in self._recv_q:
                batch = _SendBatch(frame)
                urgent = self._gather(batch, urgent)
                if not urgent and batch.size < SEND_BATCH_BYTES:
                    # Cork: nobody waits for an ordinary op, and the durable op that usually
                    # follows it (write, then fsync) arrives within microseconds. Sent together
                    # they cost the secondary one read, one apply round and one ack, not two.
                    with trio.move_on_after(CORK_S):
                        while not urgent and batch.size < SEND_BATCH_BYTES:
                            more, urgent = await self._recv_q.receive()
                            batch.add(more)
                            urgent = self._gather(batch, urgent)
                await self._stream.send_parts(batch.parts())
                self._sent_seq += batch.frames  # frames leave in seq order
                if self._sent_wanted:
                    self._sent_wanted = False
                    self._notify()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
            self._break(f"replication stream to {self.peer} broke while sending: {_describe(e)}")
        except trio.EndOfChannel:
            pass  # closed while corked: the stream is broken or closing, nothing to send

    def _gather(self, batch: _SendBatch, urgent: bool) -> bool:
        """Add the frames queued now to the batch (up to SEND_BATCH_BYTES); whether one of
        them must leave at once."""
        while batch.size < SEND_BATCH_BYTES:
            try:
                more, now = self._recv_q.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                break
            batch.add(more)
            urgent = urgent or now
        return urgent

    async def _ack_reader(self) -> None:
        assert self._reader is not None
        try:
            while True:
                frames = await self._reader.batch()
                if not frames:
                    self._break(f"{self.peer} closed the replication stream")
                    return
                for frame in frames:
                    self._on_frame(frame)
                    if self._broken is not None:
                        return
        except (trio.BrokenResourceError, trio.ClosedResourceError, ProtocolError) as e:
            self._break(f"replication stream from {self.peer} broke: {_describe(e)}")

    def _on_frame(self, frame: Frame) -> None:
        match frame:
            case Ack(seq, durable):
                if seq >= self._next_seq:
                    raise ProtocolError(f"ack of seq {seq}, never sent")
                self._on_ack(seq, durable)
            case Reply(seq, last, payload):
                parts, done = self._queries.get(seq, (None, None))
                if parts is None or done is None or done.is_set():
                    raise ProtocolError(f"reply to seq {seq}, which is no pending query")
                parts.append(payload)
                if sum(map(len, parts)) > MAX_ANSWER_BYTES:
                    raise ProtocolError(f"answer to query {seq} over {MAX_ANSWER_BYTES} bytes")
                if last:
                    done.set()
                    self._notify()
            case Nack(seq, err, message):
                self._nack = frame
                name = errno.errorcode.get(err, str(err))
                self._break(f"{self.peer} refused op {seq} ({name}): {message}")
            case _:
                raise ProtocolError(f"unexpected {type(frame).__name__} frame from {self.peer}")

    def _on_ack(self, seq: int, durable: bool) -> None:
        progressed = False
        if seq > self._acked_seq:
            self._acked_seq = seq
            while self._in_flight and self._in_flight[0][0] <= seq:
                _, op, _ = self._in_flight.popleft()
                self._in_flight_bytes -= op.size
            progressed = True
        if durable and seq > self._durable_seq:
            self._durable_seq = seq
            progressed = True
        if progressed:
            self._last_progress = time.monotonic()
            self._notify()

    def set_ack_timeout(self, seconds: float) -> None:
        """Change the ack timeout from now on (a copy in progress tolerates a slow peer; a
        live stream must not: the application waits on it)."""
        self._ack_timeout = seconds
        self._timeout_changed.set()  # the watchdog re-reads it
        self._timeout_changed = trio.Event()

    async def _watchdog(self) -> None:
        while self._broken is None:
            if not self._outstanding():
                await self._changed.wait()
                continue
            idle = time.monotonic() - self._last_progress
            if idle >= self._ack_timeout:
                lag = self.lag()
                self._break(
                    f"no acknowledgement from {self.peer} for {idle:.1f} s with {lag.ops} ops "
                    f"({lag.bytes} bytes) outstanding (ack timeout {self._ack_timeout:g} s)")
                return
            # Not woken by each ack (the hot path): only by the deadline or a new timeout.
            with trio.move_on_after(self._ack_timeout - idle):
                await self._timeout_changed.wait()

    # -- state changes

    def _outstanding(self) -> bool:
        return bool(self._in_flight) or self._durable_seq < self._max_durable_seq

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _raise_if_broken(self) -> None:
        if self._broken is not None:
            raise ReplicaBroken(self._broken)

    def _break(self, reason: str, *, failure: bool = True) -> None:
        if self._broken is not None:
            return
        self._broken = reason
        self._send_q.close()
        if self._scope is not None:
            self._scope.cancel()
        self._notify()
        if not failure:
            log.info("%s", reason)
            return
        log.warning("replication broken: %s", reason)
        if self._on_broken is not None:
            try:
                self._on_broken(reason)
            except Exception:
                log.exception("replication on_broken callback failed")


# ----------------------------------------------------------------------------- secondary side
#
# The secondary's data path runs in plain threads over blocking sockets (tlsio.BlockingTls),
# not in the replication trio loop: per connection, one thread reads, checks and queues the
# frames and sends the receipt acks; one applies the queue in order and sends the durable
# acks, the replies and the NACK. Only the accept loop is trio. Measured: trio's SSLStream
# handing out one 16 KiB record per scheduler round was the secondary's main CPU cost on a
# large stream, and the worker-thread hop per applied batch its main added latency per fsync.

class _ApplyQueue:
    """Ops received and not yet applied, bounded in bytes: one reader puts, one applier takes."""

    def __init__(self, limit: int) -> None:
        self._items: deque[Op] = deque()
        self._bytes = 0
        self._limit = limit
        self._closed = False
        self._cond = threading.Condition()

    def put(self, op: Op) -> bool:
        """Queue op, waiting for room; False (not queued) once the queue is closed."""
        with self._cond:
            while self._bytes and self._bytes + op.size > self._limit and not self._closed:
                self._cond.wait()
            if self._closed:
                return False
            self._items.append(op)
            self._bytes += op.size
            self._cond.notify_all()
            return True

    @property
    def empty(self) -> bool:
        return not self._items

    def wait(self) -> bool:
        """Until something is queued (True) or the queue is closed and empty (False)."""
        with self._cond:
            while not self._items:
                if self._closed:
                    return False
                self._cond.wait()
            return True

    def take(self) -> list[Op]:
        """The ops available now (maybe none), ending early after a durable op (acked as soon
        as done)."""
        with self._cond:
            batch: list[Op] = []
            size = 0
            while self._items and len(batch) < APPLY_BATCH_OPS:
                op = self._items[0]
                if batch and size + op.size > APPLY_BATCH_BYTES:
                    break
                batch.append(self._items.popleft())
                size += op.size
                if op.durable:
                    break
            self._bytes -= size
            self._cond.notify_all()
            return batch

    def close(self) -> None:
        """No more puts; what is queued is still taken."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def discard(self) -> None:
        with self._cond:
            self._items.clear()
            self._bytes = 0
            self._closed = True
            self._cond.notify_all()


class _Session:
    """State of one primary's connection, shared by its reader and applier threads."""

    def __init__(self, node: str, first_seq: int, conn: BlockingTls) -> None:
        self.node = node
        self.conn = conn
        self.received_seq = first_seq - 1
        self.applied_seq = first_seq - 1
        self.nack: Nack | None = None  # set once: nothing after nack.seq is applied
        self.nack_at = float("inf")  # when the NACK was sent
        self.stop_reason = ""
        self._send_failed = False
        self.stopped = False
        self.unsynced = 0  # bytes written by ops applied since the last durable op
        # Held while a batch is applied, and by the applier thread while it takes one: with
        # it and the queue empty, everything received so far is applied.
        self.apply_lock = threading.Lock()

    def send(self, parts: list[bytes]) -> None:
        if not parts or self._send_failed:
            return
        try:
            self.conn.send(parts[0] if len(parts) == 1 else b"".join(parts))
        except OSError as e:
            self._send_failed = True
            self.stop(f"connection to {self.node} lost: {_describe(e)}")

    def note_stop(self, reason: str) -> None:
        if not self.stop_reason:
            self.stop_reason = reason

    def stop(self, reason: str) -> None:
        """Stop reading (what was received is still applied; what comes after is dropped,
        even if already in the socket: a stopped session takes no new op)."""
        self.note_stop(reason)
        self.stopped = True
        self.conn.shutdown_read()


class ReplicaReceiver:
    """The secondary's end: serves one primary at a time and applies its ops in order."""

    def __init__(
        self, applier: ApplierLike, *, node: str, async_mode: str = "second",
        on_event: Callable[[ReceiverEvent], None] | None = None, module: str | None = None,
        expected_peer: str | None = None,
        check_hello: Callable[[str, Mapping[str, Any]], str | None] | None = None,
        apply_queue_bytes: int = DEFAULT_APPLY_QUEUE_BYTES,
        handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S,
    ) -> None:
        if async_mode not in ASYNC_MODES:
            raise ValueError(f"async mode {async_mode!r} is not one of {', '.join(ASYNC_MODES)}")
        self._applier = applier
        self.node = node
        self.async_mode = async_mode
        self._on_event = on_event
        self._module = module
        self._expected_peer = expected_peer
        self._check_hello = check_hello
        self._queue_limit = apply_queue_bytes
        self._handshake_timeout = handshake_timeout_s
        self._session_lock = threading.Lock()  # one session applies at a time
        self._state_lock = threading.Lock()  # the fields below
        self._current: _Session | None = None
        self._latest: object | None = None
        self._pending_handshakes = 0
        self._live: set[BlockingTls] = set()
        self._stopping = False
        self.last_applied_seq = 0
        self._counters = dict.fromkeys(
            ("frames", "bytes", "applied", "rejected", "connections", "refused_connections"), 0)

    @property
    def counters(self) -> dict[str, int]:
        """frames/bytes received, ops applied, ops rejected, sessions, refused connections."""
        return dict(self._counters)

    @property
    def peer(self) -> str | None:
        """The node whose session is being served, if any."""
        current = self._current
        return current.node if current is not None else None

    async def serve(self, listener: trio.abc.Listener[trio.SSLStream[trio.SocketStream]], *,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept connections until cancelled (`await nursery.start(receiver.serve, listener)`).
        Cancelled, it stops reading every connection and returns once what they received is
        applied."""
        async with trio.open_nursery() as nursery:
            task_status.started()
            try:
                while True:
                    try:
                        stream = await listener.accept()
                    except OSError as e:  # EMFILE and friends: keep serving
                        log.error("replication listener accept failed: %s", e)
                        await trio.sleep(0.1)  # back off instead of spinning on it
                        continue
                    self._accepted(nursery, stream)
            finally:
                self._stop_all()

    def _accepted(self, nursery: trio.Nursery, stream: trio.SSLStream[trio.SocketStream]
                  ) -> None:
        sock = _blocking_socket(stream)
        if sock is None:
            return
        with self._state_lock:
            crowded = self._pending_handshakes >= MAX_PENDING_HANDSHAKES
            if not crowded:
                self._pending_handshakes += 1
        if crowded:
            self._refused(_peer_address(sock), "too many connections being authenticated")
            sock.close()
            return
        conn = BlockingTls(sock, stream.context, server_side=True)
        with self._state_lock:
            self._live.add(conn)
        nursery.start_soon(self._connection, conn)

    async def _connection(self, conn: BlockingTls) -> None:
        # Not abandoned on cancellation: serve() stops the threads, and what a session
        # acknowledged must be applied before the receiver is gone.
        await trio.to_thread.run_sync(self._connection_thread, conn)

    def _stop_all(self) -> None:
        with self._state_lock:
            self._stopping = True
            live = list(self._live)
            current = self._current
        if current is not None:
            current.stop("the receiver is stopping")
        for conn in live:
            conn.shutdown_read()

    # -- one connection (its own thread)

    def _connection_thread(self, conn: BlockingTls) -> None:
        address = _peer_address(conn.sock)
        try:
            self._handle(conn, address)
        except Exception:
            # One connection's failure must not take the receiver down with it.
            log.exception("replication connection from %s failed", address)
        finally:
            with self._state_lock:
                self._live.discard(conn)
            conn.close()

    def _handle(self, conn: BlockingTls, address: str) -> None:
        try:
            greeting = self._greet(conn, address)
        finally:
            with self._state_lock:
                self._pending_handshakes -= 1
        if greeting is None:
            return
        node, hello, parser, early = greeting
        session = _Session(node, int(hello.get("first_seq", 1)), conn)
        # The newest authenticated connection wins: stop reading the current one, and let a
        # connection still waiting for the lock know it is superseded.
        token = object()
        with self._state_lock:
            if self._current is not None:
                self._current.stop(f"replaced by a new connection from {node} ({address})")
            self._latest = token
        with self._session_lock:
            with self._state_lock:
                superseded = self._latest is not token or self._stopping
                if not superseded:
                    self._current = session
            if superseded:
                log.info("replication connection from %s (%s) superseded before it started",
                         node, address)
                return
            self.last_applied_seq = session.applied_seq
            self._counters["connections"] += 1
            try:
                self._serve_session(session, parser, hello, early)
            finally:
                with self._state_lock:
                    self._current = None

    def _greet(self, conn: BlockingTls, address: str
               ) -> tuple[str, dict[str, Any], _FrameParser, list[Frame]] | None:
        """TLS handshake (certificate from the cluster CA) and the primary's HELLO; the ops
        that came in the same read (a primary that did not wait for the reply), judged and
        queued only once the HELLO is accepted."""
        deadline = time.monotonic() + self._handshake_timeout
        parser = _FrameParser()
        try:
            _tune_socket(conn.sock)
            conn.handshake(self._handshake_timeout)
            node = tls.peer_node_name(conn.getpeercert())
            frames: list[Frame] = []
            error: ProtocolError | None = None
            while not frames and error is None:
                data = conn.receive(max(0.001, deadline - time.monotonic()))
                if not data:
                    break
                frames, error = parser.feed(data)
            if error is not None and not frames:
                raise error
        except TimeoutError:
            self._refused(address, f"no TLS session and HELLO within {self._handshake_timeout:g} s")
            return None
        except (OSError, ProtocolError, tls.TlsError) as e:
            self._refused(address, _describe(e))
            return None
        if not frames or not isinstance(frames[0], Hello) or error:
            self._refused(address, f"{node} must send one HELLO and wait for the reply")
            return None
        hello = frames[0].info
        refusal = self._judge_hello(node, hello)
        if refusal is not None:
            self._refused(address, refusal)
            with contextlib.suppress(OSError):
                conn.send(encode(Nack(0, errno.EPERM, refusal)))
            return None
        return node, hello, parser, frames[1:]

    def _judge_hello(self, node: str, hello: Mapping[str, Any]) -> str | None:
        if self._expected_peer is not None and node != self._expected_peer:
            return f"certificate of {node!r}, expected the peer {self._expected_peer!r}"
        if hello.get("node") != node:
            return f"HELLO claims node {hello.get('node')!r} but the certificate is {node!r}"
        if self._module is not None and hello.get("module") != self._module:
            return f"HELLO for module {hello.get('module')!r}, this is {self._module!r}"
        first = hello.get("first_seq", 1)
        if not isinstance(first, int) or isinstance(first, bool) or first < 1:
            return f"HELLO with invalid first_seq {first!r}"
        if self._check_hello is not None:
            return self._check_hello(node, hello)
        return None

    def _serve_session(self, session: _Session, parser: _FrameParser,
                       hello: Mapping[str, Any], early: list[Frame]) -> None:
        session.send([encode(Hello({
            "protocol": PROTOCOL_VERSION, "node": self.node, "module": self._module,
            "async": self.async_mode, "accepted": True}))])
        if session.stop_reason:
            log.warning("replication connection from %s lost before it started: %s",
                        session.node, session.stop_reason)
            return
        log.info("replication session from %s started (%s)", session.node, dict(hello))
        self._emit(PeerConnected(session.node, dict(hello)))
        queue = _ApplyQueue(self._queue_limit)
        applier = threading.Thread(target=self._apply_loop, args=(session, queue),
                                   name=f"mirrorha applier {session.node}", daemon=True)
        applier.start()
        try:
            with self._state_lock:
                stopping = self._stopping
            if stopping:
                session.note_stop("the receiver is stopping")
            else:
                self._read_loop(session, parser, queue, early)
        finally:
            queue.close()  # what was received is applied before the session ends
            applier.join()
            reason = session.stop_reason or "session ended"
            log.info("replication session from %s ended: %s (applied up to seq %d)",
                     session.node, reason, session.applied_seq)
            self._emit(PeerDisconnected(session.node, reason, session.applied_seq))

    def _read_loop(self, session: _Session, parser: _FrameParser, queue: _ApplyQueue,
                   early: list[Frame]) -> None:
        conn = session.conn
        heard = time.monotonic()
        if early:
            self._take(session, early, None, queue)
        while True:
            try:
                data = conn.receive(READ_POLL_S)
            except TimeoutError:
                if session.nack is not None and _lingered(session.nack_at, heard):
                    return
                continue
            except OSError as e:
                session.note_stop(f"connection from {session.node} lost: {_describe(e)}")
                return
            if not data:
                session.note_stop(f"{session.node} closed the connection")
                return
            if session.stopped:
                return
            heard = time.monotonic()
            if session.nack is not None:
                # Refused: read and drop what the primary still sends until it stops (for a
                # while). Closing with unread data would reset the connection, and the
                # primary could then see "connection reset" before it reads the NACK.
                if _lingered(session.nack_at, heard):
                    return
                continue
            self._take(session, *parser.feed(data), queue)

    def _take(self, session: _Session, frames: list[Frame], error: ProtocolError | None,
              queue: _ApplyQueue) -> None:
        """Queue a batch of frames read together, then acknowledge its receipt."""
        last = frames[-1] if frames else None
        if (error is None and isinstance(last, Op) and last.kind is OpKind.FSYNC
                and session.unsynced + sum(len(getattr(f, "data", b"")) for f in frames)
                <= INLINE_APPLY_BYTES
                and self._apply_inline(session, frames, queue)):
            return
        try:
            for frame in frames:
                if not self._receive(session, frame, queue):
                    break  # the applier refused an op: nothing more is queued
            if error is not None:
                raise error
        except ProtocolError as e:
            self._refuse(session, Nack(session.received_seq + 1, errno.EPROTO, str(e)))
            queue.close()  # the NACK follows the ops before it, once they are applied
            return
        # A batch ending with a durable op gets no receipt ack: its durable ack, moments
        # later, covers it (one message each way less per fsync).
        if (self.async_mode == "second" and frames and session.nack is None
                and not (isinstance(frames[-1], Op) and frames[-1].durable)):
            session.send([encode(Ack(session.received_seq, False))])

    def _receive(self, session: _Session, frame: Frame, queue: _ApplyQueue) -> bool:
        if not isinstance(frame, Op):
            raise ProtocolError(f"unexpected {type(frame).__name__} frame from the primary")
        if frame.seq != session.received_seq + 1:
            raise ProtocolError(f"op seq {frame.seq} where {session.received_seq + 1} was due")
        self._counters["frames"] += 1
        self._counters["bytes"] += frame.size
        if not queue.put(frame):
            return False
        session.received_seq = frame.seq
        return True

    def _apply_loop(self, session: _Session, queue: _ApplyQueue) -> None:
        """The applier thread: in order, until the queue is closed and empty or an op fails;
        the NACK last, after the acks of everything before the refused op."""
        try:
            while queue.wait():
                with session.apply_lock:
                    batch = queue.take()
                    if batch and not self._apply_and_ack(session, batch, queue):
                        break
        finally:
            if session.nack is not None:
                session.send([encode(session.nack)])
                session.nack_at = time.monotonic()  # the reader lingers from now on

    def _apply_inline(self, session: _Session, frames: list[Frame], queue: _ApplyQueue
                      ) -> bool:
        """Apply a batch ending with an FSYNC in the reader's own thread when nothing is
        queued or being applied: the fsync's latency then has no hop to the applier thread and
        back (measured: about 0.1 ms of 0.45). Only a short one (little written since the last
        durable op): the reader reads nothing meanwhile, and a primary whose other writers
        see no receipt ack for the ack timeout gives up. False, nothing done, otherwise."""
        if not session.apply_lock.acquire(blocking=False):
            return False
        try:
            if not queue.empty or session.nack is not None:
                return False
            batch: list[Op] = []
            for frame in frames:
                if not isinstance(frame, Op) or frame.seq != session.received_seq + 1 + len(batch):
                    return False  # the queued path refuses it in order
                batch.append(frame)
            self._counters["frames"] += len(batch)
            self._counters["bytes"] += sum(op.size for op in batch)
            session.received_seq = batch[-1].seq
            self._apply_and_ack(session, batch, queue)
            return True
        finally:
            session.apply_lock.release()

    def _apply_and_ack(self, session: _Session, batch: list[Op], queue: _ApplyQueue) -> bool:
        """Apply a batch, then send its replies and ack; False if an op was refused (the queue
        is then discarded: nothing after a refused op may be applied)."""
        done, error, answers = self._apply_batch(batch)
        parts = [f for seq, payload in answers for f in _reply_frames(seq, payload)]
        if done:
            parts.extend(self._applied(session, batch[:done]))
        session.send(parts)
        if error is None:
            return True
        queue.discard()
        self._refuse(session, _nack_for(batch[done], error))
        return False

    def _apply_batch(self, batch: list[Op]
                     ) -> tuple[int, Exception | None, list[tuple[int, bytes]]]:
        """Apply in order, stop at the first failure (index, error); the answers of query ops
        (seq, payload)."""
        answers: list[tuple[int, bytes]] = []
        for i, op in enumerate(batch):
            try:
                if op.query:
                    answers.append((op.seq, self._applier.query(op)))
                elif op.kind == OpKind.FSYNC:
                    self._applier.fsync(op.root, op.path, bool(op.flags & 1))
                elif op.kind == OpKind.SYNC:
                    self._applier.sync()
                else:
                    self._applier.apply(op)
            except Exception as e:
                return i, e, answers
        return len(batch), None, answers

    def _applied(self, session: _Session, done: list[Op]) -> list[bytes]:
        """Note these ops applied; the ack they earn."""
        last = done[-1]
        session.applied_seq = self.last_applied_seq = last.seq
        self._counters["applied"] += len(done)
        session.unsynced = 0 if last.durable else session.unsynced + sum(
            len(op.data) for op in done)
        if last.durable:  # a batch ends right after its durable op
            return [encode(Ack(last.seq, True))]
        if self.async_mode == "none":
            return [encode(Ack(last.seq, False))]
        return []

    def _refuse(self, session: _Session, nack: Nack) -> None:
        if session.nack is not None:
            return
        self._counters["rejected"] += 1
        session.nack = nack
        name = errno.errorcode.get(nack.errno, str(nack.errno))
        log.error("replication op %d from %s refused (%s): %s", nack.seq, session.node, name,
                  nack.message)
        session.note_stop(f"op {nack.seq} refused ({name}): {nack.message}")
        self._emit(OpRefused(session.node, nack.seq, nack.errno, nack.message))

    # -- events

    def _refused(self, address: str, reason: str) -> None:
        self._counters["refused_connections"] += 1
        log.warning("replication connection from %s refused: %s", address, reason)
        self._emit(ConnectionRefused(address, reason))

    def _emit(self, event: ReceiverEvent) -> None:
        if self._on_event is None:
            return
        try:
            self._on_event(event)
        except Exception:
            log.exception("replication on_event callback failed")


def _lingered(nack_at: float, heard: float) -> bool:
    """After a NACK: long enough, or the primary quiet long enough, to close."""
    now = time.monotonic()
    return now - nack_at >= LINGER_S or (now - heard >= LINGER_QUIET_S and now >= nack_at)


def _blocking_socket(stream: trio.SSLStream[trio.SocketStream]) -> socket.socket | None:
    """The accepted connection's socket, taken out of trio (which must not touch it again)."""
    transport = stream.transport_stream
    try:
        sock = socket.socket(fileno=transport.socket.detach())
    except OSError as e:
        log.error("replication connection lost at accept: %s", e)
        return None
    sock.setblocking(True)
    return sock


def _reply_frames(seq: int, payload: bytes) -> list[bytes]:
    chunks = [payload[i:i + MAX_REPLY] for i in range(0, len(payload), MAX_REPLY)] or [b""]
    return [encode(Reply(seq, i == len(chunks) - 1, chunk)) for i, chunk in enumerate(chunks)]


def _nack_for(op: Op, error: Exception) -> Nack:
    code = getattr(error, "errno", None)
    if not isinstance(code, int) or not 0 < code < 65536:
        # A confinement refusal has no errno of its own; anything else is a bug in the applier.
        code = errno.EPERM if isinstance(error, MirrorhaError) else errno.EIO
        if not isinstance(error, MirrorhaError):
            log.error("applier failed on op %d", op.seq, exc_info=error)
    return Nack(op.seq, code, f"{op.kind.name} {op.path!r}: {error}")


def _peer_address(sock: socket.socket) -> str:
    try:
        host, port = sock.getpeername()[:2]
    except OSError:
        return "?"
    return f"{host}:{port}"


async def open_receiver_listener(host: str, port: int, ssl_context: ssl.SSLContext
                                 ) -> trio.SSLListener[trio.SocketStream]:
    """Listen on host:port (0: an ephemeral port, see `listener_port`) for primaries."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    if len(listeners) != 1:
        for extra in listeners:
            await extra.aclose()
        raise OSError(f"{host}:{port} resolves to {len(listeners)} addresses, expected one")
    return trio.SSLListener(listeners[0], ssl_context, https_compatible=False)


def listener_port(listener: trio.SSLListener[trio.SocketStream]) -> int:
    transport = listener.transport_listener
    assert isinstance(transport, trio.SocketListener)
    return int(transport.socket.getsockname()[1])


async def serve_receiver(listener: trio.abc.Listener[trio.SSLStream[trio.SocketStream]],
                         applier: ApplierLike, *, node: str, async_mode: str = "second",
                         on_event: Callable[[ReceiverEvent], None] | None = None,
                         **options: Any) -> None:
    """Shorthand for `ReplicaReceiver(...).serve(listener)` when nobody reads its counters."""
    await ReplicaReceiver(applier, node=node, async_mode=async_mode, on_event=on_event,
                          **options).serve(listener)
