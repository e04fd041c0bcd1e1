"""The exporter: what a scrape of a real (not started) daemon shows, and how failovers, errd
restarts and replicated writes are recorded when they happen."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from appliance import cluster
from appliance.cluster import Generation, Memory, NodeView, PeerView, Policy, State
from appliance.daemon import Daemon, serve_metrics
from appliance.metrics import FailoverRecorder, Histogram, MirrorhaCollector, OpStats, serve
from appliance.replication.protocol import Op, OpKind
from tests.support.nodehome import node_home

GEN = Generation(1, "node2")


class Clock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def second_in_sync() -> NodeView:
    """node1, SECOND with a current copy of node2's data (node2 PRIM)."""
    mem = Memory(gen=GEN, synced=GEN, last_role="second")
    return NodeView(Policy("node1", "node2"), State.SECOND, mem,
                    peer=PeerView(State.PRIM, mem, in_sync=False), in_sync=True)


def samples(text: str) -> list[Sample]:
    return [s for fam in text_string_to_metric_families(text) for s in fam.samples]


def value(text: str, name: str, **labels: str) -> float:
    found = [s.value for s in samples(text)
             if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, f"{name}{labels}: {found}"
    return found[0]


def test_histogram_buckets_are_cumulative_and_end_with_the_count() -> None:
    h = Histogram((0.001, 0.01, 0.1))
    for v in (0.0005, 0.001, 0.005, 0.05, 3.0):
        h.observe(v)
    buckets, total = h.buckets()
    assert buckets == [("0.001", 2.0), ("0.01", 3.0), ("0.1", 4.0), ("+Inf", 5.0)]
    assert total == pytest.approx(3.0565)


def test_takeover_after_peer_loss_records_rto_since_last_heartbeat_and_since_detection() -> None:
    clock = Clock()
    rec = FailoverRecorder("node1", "node2", clock=clock)
    old = second_in_sync()
    lost = cluster.PeerLost("no heartbeat from node2 on 2/2 networks for 600 ms")
    new = cluster.step(old, lost).view
    assert new.state is State.ALONE
    rec.peer_silent(0.6)  # at 100.0: last heartbeat at 99.4
    detected = clock.now = 100.02
    clock.now = 100.32  # VIP up and start_prim done
    rec.decided(old, new, lost, detected)
    assert rec.failovers == {"peer_lost": 1, "handover": 0}
    assert rec.last is not None
    assert (rec.last.old_primary, rec.last.new_primary, rec.last.cause) == (
        "node2", "node1", "peer_lost")
    assert rec.last.rto_s["last_heartbeat"] == pytest.approx(0.92)
    assert rec.last.rto_s["detection"] == pytest.approx(0.30)
    assert rec.rto["last_heartbeat"].buckets()[0][3] == ("1", 1.0)  # le=0.25,0.5,0.75,1


def test_planned_handover_is_not_counted_as_a_peer_loss() -> None:
    clock = Clock()
    rec = FailoverRecorder("node1", "node2", clock=clock)
    rec.peer_silent(5.0)  # an earlier loss that led to no takeover must not leak into this one
    old = second_in_sync()
    stopped = cluster.PeerHeard(PeerView(State.STOP, old.memory))  # node2 stopped (operator)
    new = cluster.step(old, stopped).view
    assert new.state in cluster.SERVING
    rec.decided(old, new, stopped, detected=clock.now - 0.1)
    assert rec.failovers == {"peer_lost": 0, "handover": 1}
    assert rec.last is not None and rec.last.rto_s == pytest.approx(
        {"last_heartbeat": 0.1, "detection": 0.1})


def test_other_transitions_are_no_failover_but_errd_restarts_count() -> None:
    rec = FailoverRecorder("node1", "node2")
    alone = NodeView(Policy("node1", "node2"), State.ALONE, Memory(gen=GEN))
    missing = cluster.ProcessCheck("mh-sampleapp", 0, 1, "restart", now=10.0)
    after = cluster.step(alone, missing).view
    rec.decided(alone, after, missing, detected=0.0)
    again = cluster.ProcessCheck("mh-sampleapp", 0, 1, "restart", now=20.0)
    rec.decided(after, cluster.step(after, again).view, again, detected=0.0)
    assert rec.restarts == 2
    assert rec.failovers == {"peer_lost": 0, "handover": 0} and rec.last is None


def test_op_stats_count_replicated_mutations_and_their_wait_by_op() -> None:
    ops = OpStats()
    write = Op(OpKind.WRITE, 0, "f", data=b"x" * 4096)
    ops.replicated(write)
    ops.replicated(Op(OpKind.SYNC, 0, ""))  # a copy's barrier: not a mount's mutation
    ops.waited(write, 0.0002)
    ops.waited(Op(OpKind.FSYNC, 0, "f"), 0.004)
    ops.waited(Op(OpKind.RENAME, 0, "a", path2="b"), 0.0001)
    assert ops.ops["write"] == 1 and ops.bytes["write"] == write.size and "sync" not in ops.ops
    assert [h.buckets()[0][-1][1] for h in ops.latency.values()] == [1.0, 1.0, 1.0]


@pytest.fixture
def daemon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Daemon:
    return Daemon(node_home(tmp_path, monkeypatch))


@pytest.fixture
def scrape(daemon: Daemon) -> Iterator[str]:
    server = serve_metrics(daemon, port=0)
    assert server is not None
    try:
        yield f"http://127.0.0.1:{server.port}/metrics"
    finally:
        server.stop()


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


def test_scrape_of_a_stopped_daemon_shows_state_heartbeats_and_zeroed_counters(
        daemon: Daemon, scrape: str) -> None:
    text = get(scrape)
    node = {"module": "mirror", "node": "node1"}
    assert value(text, "mirrorha_build_info", **node) == 1
    states = {s.labels["state"]: s.value for s in samples(text)
              if s.name == "mirrorha_node_state"}
    assert states == {"STOP": 1, "WAIT": 0, "ALONE": 0, "PRIM": 0, "SECOND": 0}
    for net in ("default", "second"):
        assert value(text, "mirrorha_heartbeat_network_up", network=net, **node) == 0
        assert value(text, "mirrorha_heartbeat_sent_total", network=net) == 0
    assert not [s for s in samples(text) if s.name == "mirrorha_heartbeat_rtt_seconds"]
    assert value(text, "mirrorha_vip_held", address="198.51.100.100") == 0
    for cause in ("peer_lost", "handover"):  # present from the start: increase() sees the 1st
        assert value(text, "mirrorha_failovers_total", cause=cause, old_primary="node2",
                     new_primary="node1") == 0
    assert value(text, "mirrorha_replication_rpo_bytes") == 0
    assert value(text, "mirrorha_write_latency_seconds_count", op="fsync") == 0
    assert value(text, "mirrorha_process_restarts_allowed") == 3
    assert value(text, "mirrorha_daemon_start_time_seconds") == pytest.approx(daemon.started_at)
    assert not [s for s in samples(text) if s.name.startswith("mirrorha_last_failover")]


def test_recorded_events_appear_in_the_next_scrape(daemon: Daemon, scrape: str) -> None:
    old = second_in_sync()
    lost = cluster.PeerLost("no heartbeat from node2 on 2/2 networks for 600 ms")
    daemon.failovers.peer_silent(0.6)
    daemon.failovers.decided(old, cluster.step(old, lost).view, lost, detected=0.0)
    assert daemon.replication is not None
    fsync = Op(OpKind.FSYNC, 0, "db")
    daemon.replication.op_stats.replicated(fsync)
    daemon.replication.op_stats.waited(fsync, 0.003)
    text = get(scrape)
    assert value(text, "mirrorha_failovers_total", cause="peer_lost") == 1
    last = value(text, "mirrorha_last_failover_rto_seconds", since="last_heartbeat",
                 old_primary="node2", new_primary="node1", cause="peer_lost")
    assert 0.6 <= last < 60
    assert value(text, "mirrorha_failover_rto_seconds_count", since="detection") == 1
    assert value(text, "mirrorha_replicated_operations_total", kind="fsync") == 1
    assert value(text, "mirrorha_write_latency_seconds_bucket", op="fsync", le="0.0025") == 0
    assert value(text, "mirrorha_write_latency_seconds_bucket", op="fsync", le="0.005") == 1


def test_an_unreadable_status_still_answers_and_is_counted() -> None:
    def broken() -> dict[str, object]:
        raise RuntimeError("engine state torn")
    collector = MirrorhaCollector(broken, FailoverRecorder("node1", "node2"), ops=lambda: None,
                                  maxloop=lambda: 3, started_at=0.0)
    server = serve(collector, port=0, addr="127.0.0.1")
    try:
        url = f"http://127.0.0.1:{server.port}/metrics"
        get(url)
        text = get(url)
    finally:
        server.stop()
    assert value(text, "mirrorha_scrape_errors_total") == 2
    assert value(text, "mirrorha_build_info") == 1
    assert not [s for s in samples(text) if s.name == "mirrorha_node_state"]
