"""The replication channel over loopback TLS: ordered, pipelined, durable when asked, refusing
strangers and escaping paths, and never leaving the application hanging on a dead secondary."""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from appliance.replication import tls
from appliance.replication.applier import Applier
from appliance.replication.channel import (
    ConnectionRefused,
    OpRefused,
    PeerDisconnected,
    ReceiverEvent,
    ReplicaBroken,
    ReplicaReceiver,
    ReplicaSender,
    listener_port,
    open_receiver_listener,
)
from appliance.replication.protocol import Ack, Hello, Nack, Op, OpKind, decode, encode

HOST = "127.0.0.1"
ACK_TIMEOUT_S = 1.0
SCENARIO_TIMEOUT_S = 20.0
KIB, MIB = 1024, 1024 * 1024






@pytest.fixture
def root(tmp_path: Path) -> Path:
    """The secondary's replicated directory, with a sibling that must never be touched."""
    (tmp_path / "data").mkdir()
    return tmp_path / "data"


class RecordingApplier(Applier):
    """The real Applier, noting what it applied (in order), able to hold ops or only fsyncs
    back as a slow or hung disk would, and to note the primary's acked seq at each op."""

    def __init__(self, root: Path) -> None:
        super().__init__([root])
        self.applied: list[Op] = []
        self.apply_gate, self.fsync_gate = threading.Event(), threading.Event()
        self.apply_gate.set()
        self.fsync_gate.set()
        self.ack_probe: Callable[[], int] | None = None
        self.acked_when_applied: list[tuple[int, int]] = []  # (seq, primary's acked seq)

    def apply(self, op: Op) -> None:
        if not self.apply_gate.wait(SCENARIO_TIMEOUT_S):
            raise AssertionError("apply gate never opened")
        if self.ack_probe is not None and op.seq:
            self.acked_when_applied.append((op.seq, self.ack_probe()))
        super().apply(op)
        self.applied.append(op)

    def fsync(self, root: int, path: str, datasync: bool) -> None:
        if not self.fsync_gate.wait(SCENARIO_TIMEOUT_S):
            raise AssertionError("fsync gate never opened")
        super().fsync(root, path, datasync)  # recorded by apply()

    def open_gates(self) -> None:
        self.apply_gate.set()
        self.fsync_gate.set()


@dataclass
class Secondary:
    receiver: ReplicaReceiver
    applier: RecordingApplier
    port: int
    scope: trio.CancelScope
    events: list[ReceiverEvent] = field(default_factory=list)

    def applied_seqs(self) -> list[int]:
        return [op.seq for op in self.applier.applied if op.kind != OpKind.FSYNC]


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    async def bounded() -> None:
        with trio.fail_after(SCENARIO_TIMEOUT_S):
            await scenario()
    trio.run(bounded)


async def wait_for(predicate: Callable[[], Any], what: str, timeout: float = 5.0) -> Any:
    """Poll `predicate` in the trio loop until truthy, with a deadline."""
    deadline = trio.current_time() + timeout
    while trio.current_time() < deadline:
        value = predicate()
        if value:
            return value
        await trio.sleep(0.01)  # polling interval of a deadline-bounded wait
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@asynccontextmanager
async def secondary(pki: Path, root: Path, **options: Any) -> AsyncIterator[Secondary]:
    listener = await open_receiver_listener(HOST, 0, tls.server_context(pki, "node2"))
    applier = RecordingApplier(root)
    events: list[ReceiverEvent] = []
    receiver = ReplicaReceiver(applier, node="node2", module="mirror", on_event=events.append,
                               **options)
    scope = trio.CancelScope()  # the test may stop the receiver on its own

    async def serve(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with scope:
            await receiver.serve(listener, task_status=task_status)

    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve)
            yield Secondary(receiver, applier, listener_port(listener), scope, events)
            nursery.cancel_scope.cancel()
    finally:
        applier.open_gates()
        await listener.aclose()
        applier.close()


def make_sender(pki: Path, port: int, *, node: str = "node1", context: Any = None,
                broken: list[str] | None = None, **options: Any) -> ReplicaSender:
    return ReplicaSender(
        node=node, peer="node2", module="mirror", host=HOST, port=port, generation=7,
        ssl_context=context or tls.client_context(pki, node, "node2"),
        ack_timeout_s=ACK_TIMEOUT_S,
        on_broken=broken.append if broken is not None else None, **options)


@asynccontextmanager
async def primary(sender: ReplicaSender) -> AsyncIterator[ReplicaSender]:
    await sender.connect()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender.run)
        try:
            yield sender
        finally:
            await sender.aclose()


def write(path: str, index: int, size: int = 4 * KIB) -> Op:
    return Op(OpKind.WRITE, 0, path, offset=index * size, data=bytes([index % 251]) * size)


def create(path: str) -> Op:
    return Op(OpKind.CREATE, 0, path, mode=0o644)


def fsync(path: str) -> Op:
    return Op(OpKind.FSYNC, 0, path)


# --------------------------------------------------------------------------------- ordering

def test_pipelined_writes_are_applied_in_order_before_the_fsync_returns(
        pki: Path, root: Path) -> None:
    count = 2000

    async def scenario() -> None:
        async with secondary(pki, root) as side, primary(make_sender(pki, side.port)) as sender:
            await sender.submit(create("f"))
            most_in_flight = 0
            for i in range(count):
                await sender.submit(write("f", i))
                most_in_flight = max(most_in_flight, sender.lag().ops)
            await sender.submit(fsync("f"))
            # The fsync returned: everything before it is on the secondary, in order.
            assert side.applied_seqs() == list(range(1, count + 2))
            assert side.applier.applied[-1].kind == OpKind.FSYNC
            assert most_in_flight > 1, "each write waited for its ack: not pipelined"
            assert sender.durable_seq == count + 2
            assert side.receiver.counters["applied"] == count + 2
        expected = b"".join(bytes([i % 251]) * 4 * KIB for i in range(count))
        assert (root / "f").read_bytes() == expected

    run(scenario)


def test_concurrent_submitters_reach_the_secondary_in_call_order(pki: Path, root: Path) -> None:
    async def scenario() -> None:
        # A small window: submitters also queue up for room, not only take the fast path.
        async with (secondary(pki, root) as side,
                    primary(make_sender(pki, side.port, window_bytes=64 * KIB)) as sender):
            called: list[tuple[str, int]] = []
            for name in ("a", "b", "c", "d"):
                await sender.submit(create(name))

            async def writer(name: str) -> None:
                for i in range(200):
                    called.append((name, i * 4 * KIB))
                    await sender.submit(write(name, i))

            async with trio.open_nursery() as nursery:
                for name in ("a", "b", "c", "d"):
                    nursery.start_soon(writer, name)
            await sender.submit(Op(OpKind.SYNC, 0, ""))
            writes = [(op.path, op.offset) for op in side.applier.applied
                      if op.kind == OpKind.WRITE]
            assert writes == called
            assert len({name for name, _ in called[:50]}) > 1, "submitters did not interleave"

    run(scenario)


def test_without_async_an_op_is_acknowledged_only_once_applied(pki: Path, root: Path) -> None:
    async def scenario() -> None:
        async with (secondary(pki, root, async_mode="none") as side,
                    primary(make_sender(pki, side.port)) as sender):
            side.applier.ack_probe = lambda: sender.acked_seq
            side.applier.apply_gate.clear()  # a slow disk: everything arrives before it is applied
            await sender.submit(create("f"))
            for i in range(100):
                await sender.submit(write("f", i))
            await wait_for(lambda: side.receiver.counters["frames"] == 101, "all ops received")
            side.applier.apply_gate.set()
            await wait_for(lambda: sender.acked_seq == 101, "all ops acknowledged")
            assert len(side.applier.acked_when_applied) == 101
            early = [(seq, acked) for seq, acked in side.applier.acked_when_applied if acked >= seq]
            assert early == [], "acknowledged before being applied"

    run(scenario)


def test_with_async_second_acknowledged_ops_are_applied_even_if_the_receiver_stops(
        pki: Path, root: Path) -> None:
    async def scenario() -> None:
        async with secondary(pki, root, async_mode="second") as side:
            async with primary(make_sender(pki, side.port)) as sender:
                side.applier.apply_gate.clear()  # a slow disk
                await sender.submit(create("f"))
                for i in range(200):
                    await sender.submit(write("f", i))
                await wait_for(lambda: sender.acked_seq == 201, "acks on receipt")
                assert side.applier.applied == []  # acknowledged, not applied yet
                side.scope.cancel()  # the secondary's daemon is stopping
                # Its reader threads stop reading once the receiver's task has seen the
                # cancellation; before that, the op below could still be taken (and rightly
                # acknowledged).
                await trio.testing.wait_all_tasks_blocked()
                side.applier.apply_gate.set()
                with pytest.raises(ReplicaBroken):
                    await sender.submit(fsync("f"))
            await wait_for(lambda: any(isinstance(e, PeerDisconnected) for e in side.events),
                           "the session to end")
            assert side.applied_seqs() == list(range(1, 202))

    run(scenario)


def test_throughput_is_measured(pki: Path, root: Path, capsys: pytest.CaptureFixture[str]
                                ) -> None:
    results: list[str] = []

    async def measure(sender: ReplicaSender, name: str, size: int, count: int) -> None:
        await sender.submit(create(name))
        start = time.perf_counter()
        for i in range(count):
            await sender.submit(write(name, i, size))
        await sender.submit(fsync(name))
        elapsed = time.perf_counter() - start
        results.append(f"{count} x {size // KIB} KiB + fsync: {count * size / MIB / elapsed:.0f} "
                       f"MiB/s, {count / elapsed:.0f} ops/s")

    async def scenario() -> None:
        for mode in ("second", "none"):
            async with (secondary(pki, root, async_mode=mode) as side,
                        primary(make_sender(pki, side.port)) as sender):
                results.append(f"async={mode}:")
                await measure(sender, f"big-{mode}", MIB, 128)
                await measure(sender, f"small-{mode}", 4 * KIB, 4000)

    run(scenario)
    with capsys.disabled():
        print("\nreplication over loopback TLS, real Applier on", root)
        for line in results:
            print("  " + line)


# ------------------------------------------------------------------------------ refusals

def test_primary_with_a_foreign_certificate_is_refused_and_nothing_applied(
        pki: Path, foreign_pki: Path, root: Path) -> None:
    async def scenario() -> None:
        intruder = tls.client_context(foreign_pki, "node1", "node2")
        intruder.load_verify_locations(cafile=str(pki / "ca.pem"))  # trusts our secondary
        async with secondary(pki, root) as side:
            sender = make_sender(pki, side.port, context=intruder)
            with pytest.raises(ReplicaBroken, match=r"node2 at 127\.0\.0\.1"):
                await sender.connect()
            with pytest.raises(ReplicaBroken):
                await sender.submit(create("f"))
            await wait_for(lambda: side.receiver.counters["refused_connections"] == 1,
                           "the refusal to be counted")
            refused = [e for e in side.events if isinstance(e, ConnectionRefused)]
            assert refused and "certificate" in refused[0].reason.lower()
            assert side.receiver.counters["connections"] == 0
            assert side.applier.applied == []
        assert list(root.iterdir()) == []

    run(scenario)


def test_stale_primary_is_refused_by_the_hello_check(pki: Path, root: Path) -> None:
    def check(node: str, hello: dict[str, Any]) -> str | None:
        return None if hello["generation"] >= 8 else f"{node} has stale generation"

    async def scenario() -> None:
        async with secondary(pki, root, check_hello=check) as side:
            with pytest.raises(ReplicaBroken, match=r"refused.*stale generation"):
                await make_sender(pki, side.port).connect()
            assert side.receiver.counters["connections"] == 0

    run(scenario)


def test_op_escaping_the_directory_is_nacked_and_nothing_after_it_applied(
        pki: Path, root: Path) -> None:
    async def scenario() -> None:
        broken: list[str] = []
        async with secondary(pki, root) as side:
            async with primary(make_sender(pki, side.port, broken=broken)) as sender:
                await sender.submit(create("f"))
                await sender.submit(write("f", 0))
                await sender.submit(write("../escape", 0))
                with pytest.raises(ReplicaBroken, match=r"refused op 3 \(EPERM\)"):
                    await sender.submit(write("f", 1))
                    await sender.submit(fsync("f"))
                assert sender.nack is not None and sender.nack.seq == 3
            assert side.applied_seqs() == [1, 2]
            assert side.receiver.counters["rejected"] == 1
            await wait_for(lambda: any(isinstance(e, PeerDisconnected) for e in side.events),
                           "the connection to be dropped")
            refused = [e for e in side.events if isinstance(e, OpRefused)]
            assert [(e.seq, e.errno) for e in refused] == [(3, errno.EPERM)]
            assert len(broken) == 1
        assert not (root.parent / "escape").exists()
        assert (root / "f").stat().st_size == 4 * KIB

    run(scenario)


async def raw_primary(pki: Path, port: int) -> trio.SSLStream[trio.SocketStream]:
    """A TLS client that speaks frames by hand, to send what no ReplicaSender would."""
    tcp = await trio.open_tcp_stream(HOST, port)
    stream = trio.SSLStream(tcp, tls.client_context(pki, "node1", "node2"),
                            server_hostname="node2")
    await stream.send_all(encode(Hello({"node": "node1", "module": "mirror", "first_seq": 1})))
    return stream


async def read_frames(stream: trio.SSLStream[trio.SocketStream]) -> list[object]:
    """Every frame until the peer closes."""
    data = b""
    while chunk := await stream.receive_some():
        data += chunk
    frames = []
    while data:
        length = int.from_bytes(data[:4], "big")
        frames.append(decode(data[4:4 + length]))
        data = data[4 + length:]
    return frames


def test_sequence_gap_is_a_protocol_error(pki: Path, root: Path) -> None:
    async def scenario() -> None:
        async with secondary(pki, root, async_mode="none") as side:
            stream = await raw_primary(pki, side.port)
            ops = [create("f"), write("f", 0), write("f", 1)]
            await stream.send_all(b"".join(
                encode(replace(op, seq=seq)) for seq, op in zip((1, 2, 4), ops, strict=True)))
            frames = await read_frames(stream)
            await stream.aclose()
            assert isinstance(frames[0], Hello)
            assert frames[-1] == Nack(3, errno.EPROTO, "op seq 4 where 3 was due")
            assert Ack(2, False) in frames
            assert side.applied_seqs() == [1, 2]

    run(scenario)


# --------------------------------------------------------------------- dead or slow secondary

@asynccontextmanager
async def bare_secondary(pki: Path, serve: Callable[[trio.SSLStream[trio.SocketStream]],
                                                    Awaitable[None]]) -> AsyncIterator[int]:
    """A TLS peer that greets like a secondary and then does whatever `serve` does."""
    listener = await open_receiver_listener(HOST, 0, tls.server_context(pki, "node2"))

    async def handle(stream: trio.SSLStream[trio.SocketStream]) -> None:
        await stream.do_handshake()
        await stream.receive_some()  # the HELLO
        await stream.send_all(encode(Hello({"node": "node2"})))
        await serve(stream)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, handle, [listener])
        yield listener_port(listener)
        nursery.cancel_scope.cancel()


def test_full_window_blocks_submit_until_the_ack_timeout(pki: Path) -> None:
    window, size = 1 * MIB, 64 * KIB
    parked = trio.Event()

    async def never_read(stream: trio.SSLStream[trio.SocketStream]) -> None:
        await parked.wait()

    async def scenario() -> None:
        broken: list[str] = []
        async with (bare_secondary(pki, never_read) as port,
                    primary(make_sender(pki, port, window_bytes=window,
                                        broken=broken)) as sender):
            await sender.submit(create("f"))
            op_size = write("f", 0, size).size
            fits = (window - create("f").size) // op_size
            done = 0
            start = trio.current_time()
            with pytest.raises(ReplicaBroken, match="no acknowledgement"):
                for i in range(1000):
                    await sender.submit(write("f", i, size))
                    done += 1
            blocked_for = trio.current_time() - start
            assert done == fits
            assert ACK_TIMEOUT_S * 0.9 <= blocked_for <= ACK_TIMEOUT_S + 1.5
            assert sender.lag().ops == fits + 1 and sender.lag().bytes > fits * size
            assert [op.seq for op in sender.unacked_ops()] == list(range(1, fits + 2))
            assert len(broken) == 1
            parked.set()

    run(scenario)


def test_fsync_fails_at_the_ack_timeout_when_the_secondary_disk_hangs(
        pki: Path, root: Path) -> None:
    async def scenario() -> None:
        broken: list[str] = []
        async with secondary(pki, root) as side:
            async with primary(make_sender(pki, side.port, broken=broken)) as sender:
                await sender.submit(create("f"))
                await sender.submit(write("f", 0))
                side.applier.fsync_gate.clear()
                start = trio.current_time()
                with pytest.raises(ReplicaBroken, match="no acknowledgement from node2"):
                    await sender.submit(fsync("f"))
                assert trio.current_time() - start < ACK_TIMEOUT_S + 1.5
                with pytest.raises(ReplicaBroken):
                    await sender.submit(write("f", 1))
            assert len(broken) == 1
            side.applier.fsync_gate.set()  # the disk comes back: the receiver finishes up
            await wait_for(lambda: side.receiver.counters["applied"] == 3, "the fsync")

    run(scenario)


def test_a_copy_tolerates_a_slow_secondary_until_the_timeout_is_tightened(
        pki: Path, root: Path) -> None:
    """Pass 1 of a reintegration runs with a long ack timeout (the application does not wait
    on it); tightening it applies at once to what is already outstanding."""
    async def scenario() -> None:
        async with secondary(pki, root) as side:
            sender = make_sender(pki, side.port)
            sender.set_ack_timeout(30)
            async with primary(sender):
                await sender.submit(create("f"))
                side.applier.fsync_gate.clear()  # a busy secondary: no ack for a while
                failed: list[str] = []

                async def durable() -> None:
                    try:
                        await sender.submit(fsync("f"))
                    except ReplicaBroken as e:
                        failed.append(str(e))

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(durable)
                    stalled_until = trio.current_time() + ACK_TIMEOUT_S * 2
                    while trio.current_time() < stalled_until:  # longer than the normal timeout
                        assert sender.broken is None
                        await trio.sleep(0.05)  # polling interval of a bounded observation
                    start = trio.current_time()
                    sender.set_ack_timeout(ACK_TIMEOUT_S)
                    await wait_for(lambda: failed, "the tightened timeout to break it")
                    assert trio.current_time() - start < 0.5
                assert "no acknowledgement from node2" in failed[0]
                side.applier.fsync_gate.set()

    run(scenario)


def test_fsync_fails_at_once_when_the_secondary_dies_mid_stream(pki: Path) -> None:
    async def read_a_little_then_die(stream: trio.SSLStream[trio.SocketStream]) -> None:
        received = 0
        while received < 64 * KIB:
            received += len(await stream.receive_some())
        await stream.transport_stream.aclose()  # no TLS goodbye: the process is gone

    async def scenario() -> None:
        broken: list[str] = []
        async with (bare_secondary(pki, read_a_little_then_die) as port,
                    primary(make_sender(pki, port, broken=broken)) as sender):
            start = trio.current_time()
            with pytest.raises(ReplicaBroken, match="node2"):
                await sender.submit(create("f"))
                for i in range(100):
                    await sender.submit(write("f", i))
                await sender.submit(fsync("f"))
            assert trio.current_time() - start < ACK_TIMEOUT_S
            assert broken == [sender.broken]

    run(scenario)


def test_a_new_connection_from_the_primary_replaces_a_stale_one(pki: Path, root: Path) -> None:
    async def scenario() -> None:
        old_broken: list[str] = []
        async with secondary(pki, root) as side:
            async with primary(make_sender(pki, side.port, broken=old_broken)) as old:
                await old.submit(create("f"))
                await old.submit(fsync("f"))
                async with primary(make_sender(pki, side.port)) as new:
                    await new.submit(write("f", 0))
                    await new.submit(fsync("f"))
                    await wait_for(lambda: old.broken, "the old session to be dropped")
            assert side.receiver.counters["connections"] == 2
            assert len(old_broken) == 1
            assert (root / "f").stat().st_size == 4 * KIB

    run(scenario)
