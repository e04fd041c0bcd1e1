"""Prometheus metrics of a node: `/metrics` on :9011 (see README, "Monitoring").

Almost everything is read at scrape time from what the daemon already keeps (`Daemon.status()`,
the heartbeat link's snapshot, the replication service's status), by one custom collector: the
data path pays nothing for those. Only what must be seen when it happens is recorded at event
time, here, with plain integer increments (no lock, one bisect):

- `FailoverRecorder`: failovers, their RTO (two ways, see below) and errd restarts, fed by the
  daemon's engine after each decision;
- `OpStats`: replicated operations and bytes by kind and the write-latency histogram, fed by the
  replication service for every mutation of a replicated mount.

RTO of a failover, measured on the node that took over, on CLOCK_MONOTONIC:

    since="last_heartbeat"   the last heartbeat heard from the old primary -> service restored
    since="detection"        the peer declared lost (or its handover heard) -> service restored

"Service restored" is the end of the takeover's actions: mounts writable, VIP added (gratuitous
ARP sent), start_prim returned. The last heartbeat precedes the crash by at most one pulse, so
the first is what a client polling the VIP measures from the crash to its first answer (within
a pulse and the application's own start time); the second is the engine's share of it.
"""

from __future__ import annotations

import bisect
import logging
import platform
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import start_http_server
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector, CollectorRegistry

from appliance.cluster import SERVING, NodeView, PeerLost, State
from appliance.replication.protocol import Op, OpKind

log = logging.getLogger("mirrorha.metrics")

METRICS_PORT = 9011
STATES = tuple(s.value for s in State)
LATENCY_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                     0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
RTO_BUCKETS_S = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 45.0, 60.0, 120.0,
                 300.0)
RTO_SINCE = ("last_heartbeat", "detection")
FAILOVER_CAUSES = ("peer_lost", "handover")  # unplanned / planned (the peer stopped or swapped)
LATENCY_OPS = ("write", "fsync", "other")
_LATENCY_OP = {OpKind.WRITE: "write", OpKind.FSYNC: "fsync"}
# What a replicated mount sends (the rest are the copies' barriers and queries).
MOUNT_KINDS = tuple(k for k in OpKind if k.value <= OpKind.FALLOCATE.value)


class Histogram:
    """Bucket counts kept as a list of ints, observed without a lock (one thread observes;
    a scrape copies the list, a consistent snapshot under the GIL)."""

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def buckets(self) -> tuple[list[tuple[str, float]], float]:
        """Cumulative (le, count) pairs as Prometheus wants them, and the sum."""
        counts, total = list(self.counts), self.sum
        out, running = [], 0
        for bound, n in zip((*map(_le, self.bounds), "+Inf"), counts, strict=True):
            running += n
            out.append((bound, float(running)))
        return out, total


def _le(bound: float) -> str:
    return f"{bound:g}"


class OpStats:
    """What the replication service counts per mutation (its trio thread only writes)."""

    def __init__(self) -> None:
        names = [k.name.lower() for k in MOUNT_KINDS]
        self.ops: dict[str, int] = dict.fromkeys(names, 0)  # fixed keys: copied while updated
        self.bytes: dict[str, int] = dict.fromkeys(names, 0)
        self.latency = {op: Histogram(LATENCY_BUCKETS_S) for op in LATENCY_OPS}

    def replicated(self, op: Op) -> None:
        """`op` entered the stream to the secondary."""
        name = op.kind.name.lower()
        if name in self.ops:
            self.ops[name] += 1
            self.bytes[name] += op.size

    def waited(self, op: Op, seconds: float) -> None:
        """The mount waited `seconds` for the replication of `op` (admission, or the durable
        acknowledgement of an fsync)."""
        self.latency[_LATENCY_OP.get(op.kind, "other")].observe(seconds)


@dataclass
class LastFailover:
    cause: str
    old_primary: str
    new_primary: str
    at: float  # wall clock
    rto_s: dict[str, float]


@dataclass
class FailoverRecorder:
    """Failovers and errd restarts as the engine lives them (its thread only writes)."""

    node: str
    peer: str
    clock: Callable[[], float] = time.monotonic
    failovers: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FAILOVER_CAUSES, 0))
    rto: dict[str, Histogram] = field(
        default_factory=lambda: {s: Histogram(RTO_BUCKETS_S) for s in RTO_SINCE})
    last: LastFailover | None = None
    restarts: int = 0
    _last_heartbeat: float | None = None

    def peer_silent(self, silent_s: float) -> None:
        """The heartbeat layer declared the peer lost after `silent_s` of silence on every
        network: its last heartbeat arrived that long ago."""
        self._last_heartbeat = self.clock() - silent_s

    def decided(self, old: NodeView, new: NodeView, event: object, detected: float) -> None:
        """After a decision's actions ran. `detected`: when the engine took up the event."""
        if new.restarts and new.restarts[-1:] != old.restarts[-1:]:
            self.restarts += 1
        if old.state is not State.SECOND or new.state not in SERVING:
            return
        cause = "peer_lost" if isinstance(event, PeerLost) else "handover"
        restored = self.clock()
        last_hb = self._last_heartbeat if cause == "peer_lost" else None
        rto = {"last_heartbeat": restored - (last_hb if last_hb is not None else detected),
               "detection": restored - detected}
        for since, seconds in rto.items():
            self.rto[since].observe(seconds)
        self.failovers[cause] += 1
        self.last = LastFailover(cause, self.peer, self.node, time.time(), rto)
        self._last_heartbeat = None


class MirrorhaCollector(Collector):
    """Turns the daemon's status (and the recorders) into metrics at each scrape."""

    def __init__(self, status: Callable[[], dict[str, Any]], failovers: FailoverRecorder,
                 ops: Callable[[], OpStats | None], maxloop: Callable[[], int],
                 started_at: float, version: str | None = None) -> None:
        self._status = status
        self._started_at = started_at
        self._failovers = failovers
        self._ops = ops
        self._maxloop = maxloop
        self._version = version or _version()
        self._scrape_errors = 0

    def describe(self) -> Iterable[Metric]:
        return []  # families depend on the configuration: nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        try:
            status = self._status()
        except Exception:
            # The exporter must answer even when the daemon's state cannot be read: what is
            # missing is visible as mirrorha_scrape_errors_total rising.
            log.exception("reading the daemon's status for /metrics failed")
            self._scrape_errors += 1
            status = None
        base = {"module": status["module"], "node": status["node"]} if status else {}
        yield from self._build_info(base)
        errors = CounterMetricFamily("mirrorha_scrape_errors", "Scrapes that could not read "
                                     "the daemon's status.", labels=[])
        errors.add_metric([], self._scrape_errors)
        yield errors
        if status is None:
            return
        m = _Families(base)
        self._node(m, status)
        self._heartbeat(m, status["heartbeat"])
        self._failover_metrics(m)
        replication = status.get("replication")
        if replication is not None:
            self._replication(m, replication)
            ops = self._ops()
            if ops is not None:
                self._op_metrics(m, ops)
        yield from m.all()

    def _build_info(self, base: dict[str, str]) -> Iterator[Metric]:
        labels = {**base, "version": self._version, "python": platform.python_version()}
        info = GaugeMetricFamily("mirrorha_build_info", "Always 1; the labels say which build "
                                 "runs.", labels=list(labels))
        info.add_metric(list(labels.values()), 1)
        yield info

    def _node(self, m: _Families, st: dict[str, Any]) -> None:
        m.stateset("mirrorha_node_state", "State of the module on this node (one is 1).",
                   {s: st["state"] == s for s in STATES})
        m.gauge("mirrorha_peer_up", "1 while the peer's heartbeats arrive on some network.",
                st["heartbeat"]["peer_up"])
        # In sync: a PRIM streams synchronously to its SECOND; a SECOND holds every
        # acknowledged byte. ALONE, WAIT, STOP: not in sync.
        in_sync = st["state"] == "PRIM" or (st["state"] == "SECOND" and st["in_sync"])
        m.gauge("mirrorha_replication_in_sync", "1 when both copies are synchronised (PRIM "
                "with its SECOND, or a SECOND holding every acknowledged byte).", in_sync)
        m.gauge("mirrorha_split_brain", "1 when both nodes served apart and the operator must "
                "choose whose data is kept (mirrorha prim on that node).", st["split_brain"])
        vip = m.gauge_family("mirrorha_vip_held", "1 when this node holds the virtual IP.",
                             ["address"])
        for v in st["vip"]:
            vip.add_metric([*m.values, v["addr"]], 1 if v["held"] else 0)
        if st.get("witness_ok") is not None:
            m.gauge("mirrorha_witness_reachable", "1 when the split-brain witness answers.",
                    st["witness_ok"])
        m.gauge("mirrorha_engine_busy", "1 while the engine runs an action (script, VIP...).",
                st["busy"] is not None)
        m.counter("mirrorha_heartbeat_bad_payloads", "Authenticated heartbeats whose content "
                  "could not be read.", st["counters"].get("bad_payload", 0))
        m.counter("mirrorha_process_restarts", "Restarts of the application by process "
                  "monitoring (errd) since the daemon started.", self._failovers.restarts)
        m.gauge("mirrorha_process_restarts_allowed", "maxloop: errd restarts allowed per "
                "loop_interval before the module stops.", self._maxloop())
        m.gauge("mirrorha_daemon_start_time_seconds", "When the daemon started (Unix time).",
                self._started_at)

    def _heartbeat(self, m: _Families, hb: dict[str, Any]) -> None:
        labels = ["network"]
        up = m.gauge_family("mirrorha_heartbeat_network_up", "1 while this network carries "
                            "the peer's heartbeats (one arrived within the timeout).", labels)
        age = m.gauge_family("mirrorha_heartbeat_last_seen_age_seconds", "Time since the "
                             "last heartbeat from the peer on this network.", labels)
        rtt = m.gauge_family("mirrorha_heartbeat_rtt_seconds", "Heartbeat round-trip time on "
                             "this network (last echo).", labels)
        received = m.counter_family("mirrorha_heartbeat_received", "Heartbeats accepted from "
                                    "the peer.", labels)
        sent = m.counter_family("mirrorha_heartbeat_sent", "Heartbeats sent to the peer.",
                                labels)
        for net in hb["networks"]:
            key = [*m.values, net["name"]]
            up.add_metric(key, 1 if net["up"] else 0)
            if net["last_seen_age_s"] is not None:
                age.add_metric(key, net["last_seen_age_s"])
            if net["rtt_s"] is not None:
                rtt.add_metric(key, net["rtt_s"])
            received.add_metric(key, net["received"])
            sent.add_metric(key, net["sent"])
        rejected = m.counter_family("mirrorha_heartbeat_rejected", "Heartbeat frames refused, "
                                    "by reason (bad_mac: wrong key; replay: old epoch or seq).",
                                    ["reason"])
        for reason in ("bad_mac", "replay", "unknown_sender", "malformed"):
            rejected.add_metric([*m.values, reason], hb[f"rejected_{reason}"])
        m.counter("mirrorha_heartbeat_send_errors", "Heartbeats that could not be sent.",
                  hb["send_errors"])
        m.gauge("mirrorha_heartbeat_running", "1 while the heartbeat thread runs.",
                hb["running"])

    def _failover_metrics(self, m: _Families) -> None:
        rec = self._failovers
        total = m.counter_family("mirrorha_failovers", "Takeovers by this node from its peer: "
                                 "peer_lost (unplanned) or handover (the peer stopped or "
                                 "swapped).", ["cause", "old_primary", "new_primary"])
        for cause in FAILOVER_CAUSES:
            total.add_metric([*m.values, cause, rec.peer, rec.node], rec.failovers[cause])
        rto = m.family(HistogramMetricFamily, "mirrorha_failover_rto_seconds", "RTO of this "
                       "node's takeovers, since the old primary's last heartbeat or since the "
                       "failure was detected, until the application started with the VIP up.",
                       ["since"])
        for since, hist in rec.rto.items():
            buckets, total_s = hist.buckets()
            rto.add_metric([*m.values, since], buckets, total_s)
        if rec.last is not None:
            last = m.gauge_family("mirrorha_last_failover_rto_seconds", "RTO of the last "
                                  "takeover by this node (see mirrorha_failover_rto_seconds).",
                                  ["since", "cause", "old_primary", "new_primary"])
            for since, seconds in rec.last.rto_s.items():
                last.add_metric([*m.values, since, rec.last.cause, rec.last.old_primary,
                                 rec.last.new_primary], seconds)
            m.gauge("mirrorha_last_failover_timestamp_seconds", "When this node last took "
                    "over (Unix time).", rec.last.at)

    def _replication(self, m: _Families, r: dict[str, Any]) -> None:
        m.gauge("mirrorha_replication_connected", "1 while the stream to the secondary is "
                "live (primary).", r["connected"])
        m.gauge("mirrorha_replication_lag_bytes", "Bytes sent to the secondary and not yet "
                "acknowledged.", r["lag_bytes"])
        m.gauge("mirrorha_replication_lag_operations", "Operations sent to the secondary and "
                "not yet acknowledged.", r["lag_ops"])
        m.gauge("mirrorha_replication_lag_seconds", "Age of the oldest unacknowledged "
                "operation.", r["lag_seconds"])
        m.gauge("mirrorha_replication_rpo_bytes", "Bytes acknowledged to the application that "
                "would be lost with this node now: unacknowledged ones while streaming, the "
                "journal's dirty volume while ALONE.", r["rpo_bytes"])
        if r["journal_bytes"] >= 0:
            m.gauge("mirrorha_replication_journal_dirty_bytes", "Volume the dirty-zone journal "
                    "marks as possibly different on the peer.", r["journal_bytes"])
        m.gauge("mirrorha_reintegration_in_progress", "1 while a copy to the secondary "
                "(attach, reintegration or full resync) runs (primary), or one is being "
                "received (secondary).", r["resyncing"] or r["receiving"])
        m.gauge("mirrorha_reintegration_pass", "Pass of the reintegration under way: 1 mounts "
                "live, 2 mounts frozen; 0 none.", r["reintegration_pass"])
        m.gauge("mirrorha_reintegration_sent_bytes", "Data bytes sent by the copy under way "
                "(or the last one).", r["reintegration_sent_bytes"])
        m.gauge("mirrorha_reintegration_sent_operations", "Operations (and queries) sent by "
                "the copy under way (or the last one): rising while it makes progress.",
                r["reintegration_sent_ops"])
        m.gauge("mirrorha_reintegration_received_bytes", "Data bytes received by the copy "
                "under way on a secondary (or the last one).", r["reintegration_received_bytes"])
        m.gauge("mirrorha_reintegration_elapsed_seconds", "Age of the copy under way; 0 when "
                "none runs.", r["reintegration_elapsed_s"])
        if r["last_reintegration_s"] is not None:
            m.gauge("mirrorha_last_reintegration_duration_seconds", "Duration of the last "
                    "completed copy to the secondary.", r["last_reintegration_s"])
        done = m.counter_family("mirrorha_reintegrations", "Completed copies to the secondary "
                                "by kind.", ["kind"])
        done.add_metric([*m.values, "reintegration"], r["reintegrations"])
        done.add_metric([*m.values, "full"], r["resyncs"])
        m.counter("mirrorha_reintegration_bytes", "Data bytes sent by completed copies.",
                  r["resync_bytes"])
        m.counter("mirrorha_replication_streams_lost", "Streams to the secondary that broke.",
                  r["lost"])
        receiver = r.get("receiver")
        if receiver:
            m.counter("mirrorha_replication_received_bytes", "Bytes of frames received from "
                      "the primary (secondary).", receiver["bytes"])
            m.counter("mirrorha_replication_applied_operations", "Operations applied from the "
                      "primary (secondary).", receiver["applied"])
            m.counter("mirrorha_replication_rejected_operations", "Operations from the "
                      "primary refused (secondary).", receiver["rejected"])

    def _op_metrics(self, m: _Families, ops: OpStats) -> None:
        counts, sizes = dict(ops.ops), dict(ops.bytes)
        n = m.counter_family("mirrorha_replicated_operations", "Mutations streamed to the "
                             "secondary, by kind.", ["kind"])
        b = m.counter_family("mirrorha_replicated_bytes", "Bytes streamed to the secondary "
                             "(frame size: data, paths, header), by kind.", ["kind"])
        for kind in counts:
            n.add_metric([*m.values, kind], counts[kind])
            b.add_metric([*m.values, kind], sizes[kind])
        lat = m.family(HistogramMetricFamily, "mirrorha_write_latency_seconds", "Time a "
                       "mutation of a replicated mount waited for replication: admission to "
                       "the stream (write, other) or the secondary's durable ack (fsync).",
                       ["op"])
        for op, hist in ops.latency.items():
            buckets, total = hist.buckets()
            lat.add_metric([*m.values, op], buckets, total)


class _Families:
    """Metric families that all carry the node's labels (module, node) first."""

    def __init__(self, base: dict[str, str]) -> None:
        self.names = list(base)
        self.values = list(base.values())
        self._out: list[Metric] = []

    def family(self, cls: Any, name: str, doc: str, labels: Sequence[str] = ()) -> Any:
        fam = cls(name, doc, labels=[*self.names, *labels])
        self._out.append(fam)
        return fam

    def gauge_family(self, name: str, doc: str, labels: Sequence[str] = ()) -> Any:
        return self.family(GaugeMetricFamily, name, doc, labels)

    def counter_family(self, name: str, doc: str, labels: Sequence[str] = ()) -> Any:
        return self.family(CounterMetricFamily, name, doc, labels)

    def gauge(self, name: str, doc: str, value: float | bool) -> None:
        self.gauge_family(name, doc).add_metric(self.values, float(value))

    def counter(self, name: str, doc: str, value: float) -> None:
        self.counter_family(name, doc).add_metric(self.values, value)

    def stateset(self, name: str, doc: str, states: dict[str, bool]) -> None:
        """A state set as a gauge per `state` label value (1 for the current one): the text
        format's own rendering would name the label after the metric."""
        fam = self.gauge_family(name, doc, ["state"])
        for state, on in states.items():
            fam.add_metric([*self.values, state], 1 if on else 0)

    def all(self) -> list[Metric]:
        return self._out


def _version() -> str:
    try:
        return metadata.version("mirrorha")
    except metadata.PackageNotFoundError:
        return "unknown"


@dataclass
class MetricsServer:
    server: Any
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.server.server_port)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def serve(collector: Collector, port: int = METRICS_PORT, addr: str = "0.0.0.0"
          ) -> MetricsServer:
    """Serve /metrics in a thread of its own (OSError if the port is taken)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    ProcessCollector(registry=registry)  # process_start_time_seconds shows daemon restarts
    server, thread = start_http_server(port, addr, registry=registry)
    return MetricsServer(server, thread)
