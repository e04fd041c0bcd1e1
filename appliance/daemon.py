"""The node daemon: wires the adapters to the state machine.

One engine thread owns the state: it takes events from a queue (heartbeats, operator commands,
resync results), asks `cluster.step` what to do, persists the node's memory, runs the actions
and only then advertises the new state. Heartbeats run in their own thread (never starved by a
long stop_prim), the control socket in another; process monitoring and the interface check are
polled by the engine between events, so they never race an application restart.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, is_dataclass, replace
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import psutil

from appliance import cluster, metrics
from appliance import heartbeat as hb
from appliance.cluster import Action, Command, CommandEvent, Decision, NodeView, State
from appliance.config import NodeConfig, ServiceConfig, identify_local_node, load_node_config
from appliance.errd import ProcessWatch
from appliance.errors import ConfigError, MirrorhaError
from appliance.keys import load_cluster_key
from appliance.modlog import ModuleLog
from appliance.paths import Paths
from appliance.replication.manager import ReplicationService, ReplicationSettings, SyncRetry
from appliance.scripts import ScriptRunner, write_safekit_shim
from appliance.vip import VipError, VirtualIp

log = logging.getLogger("mirrorha.daemon")


@dataclass(frozen=True)
class Shutdown:
    """Stop the module (if started) and leave the engine loop."""


@dataclass(frozen=True)
class ControlCommand:
    command: Command
    origin: str


def policy_from(service: ServiceConfig, node: str, peer: str) -> cluster.Policy:
    return cluster.Policy(
        node=node,
        peer=peer,
        defaultprim=service.defaultprim,
        failover=service.failover,
        autoswap=service.autoswap,
        maxloop=service.maxloop,
        loop_interval_s=service.loop_interval_h * 3600.0,
        witness=service.splitbrain is not None,
    )


def local_ipv4_addresses() -> list[IPv4Address]:
    addrs = []
    for entries in psutil.net_if_addrs().values():
        for entry in entries:
            if entry.family.name == "AF_INET":
                addrs.append(IPv4Address(entry.address))
    return addrs


def resolve_node_name(config: NodeConfig) -> str:
    name = os.environ.get("MIRRORHA_NODE")
    if name:
        config.cluster.node(name)  # ConfigError if unknown
        return name
    return identify_local_node(config.cluster, local_ipv4_addresses())


def next_heartbeat_epoch(path: Path) -> int:
    """The heartbeat epoch of this run: strictly above the previous run's even if the wall clock
    went backwards, or the peer would reject every frame as a replay and declare us lost."""
    try:
        last = int(path.read_text())
    except (FileNotFoundError, ValueError):
        last = 0
    epoch = max(time.time_ns(), last + 1)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(str(epoch))
    os.replace(tmp, path)
    return epoch


class MemoryStore:
    """The node's memory in state.json, replaced atomically and fsynced: a generation bump must
    be on disk before the application writes anything under it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> cluster.Memory:
        try:
            data = json.loads(self.path.read_text())
            return cluster.Memory.from_json(data)
        except FileNotFoundError:
            return cluster.Memory()
        except (ValueError, KeyError, TypeError) as e:
            raise MirrorhaError(
                f"{self.path}: unreadable node state ({e}); refusing to guess which data is "
                "newest — restore it or remove it deliberately") from e

    def save(self, memory: cluster.Memory) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump(memory.to_json(), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


class Daemon:
    def __init__(self, paths: Paths) -> None:
        self.paths = paths
        self.config = load_node_config(paths.cluster_xml, paths.userconfig)
        self.key = load_cluster_key(paths.cluster_key)
        self.node = resolve_node_name(self.config)
        self.peer = self.config.cluster.peer_of(self.node).name
        self.modlog = ModuleLog(paths.module_log, self.node)
        self.store = MemoryStore(paths.state_file)
        # SimpleQueue: its put() may be called from the SIGTERM handler (Queue.put may deadlock).
        self.events: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.view: NodeView = cluster.initial_view(
            policy_from(self.config.service, self.node, self.peer), self.store.load())
        self._entering: NodeView | None = None  # the decided view while its actions run
        self.busy: str | None = None  # what the engine is doing right now (for `state`)
        self.busy_since = 0.0
        self.counters: dict[str, int] = {"bad_payload": 0}
        self.started_at = time.time()
        self.failovers = metrics.FailoverRecorder(self.node, self.peer)  # for /metrics
        self._lock = threading.Lock()
        self._build_adapters(self.config)
        self.link = self._make_link()
        self.witness = self._make_witness()
        self.replication = self._make_replication()

    # -- adapters --------------------------------------------------------------------------

    def _build_adapters(self, config: NodeConfig) -> None:
        service = config.service
        self.vips = [
            VirtualIp(va.addr, iface.name, iface.arpreroute, self.modlog.info)
            for iface in service.vips for va in iface.addrs
        ]
        self.checked_vips = [
            v for v, iface in zip(self.vips, self._vip_ifaces(service), strict=True) if iface.check
        ]
        shim_dir = self.paths.module_dir / "run"
        exe = sys.argv[0] if sys.argv[0].endswith("mirrorha") else "mirrorha"
        write_safekit_shim(shim_dir, os.path.abspath(exe) if os.sep in exe else exe)
        env = {
            "MIRRORHA_HOME": str(self.paths.home),
            "MIRRORHA_MODULE": self.paths.module,
            "MIRRORHA_NODE": self.node,
            "SAFE": str(shim_dir),
        }
        self.scripts = ScriptRunner(
            self.paths.bin_dir, self.paths.app_log, env, service.user.nicestoptimeout_s,
            service.user.forcestoptimeout_s, self.modlog)
        self.watch = ProcessWatch(service.errd.procs) if service.errd else None
        self.poll_interval = service.errd.polltimer_s if service.errd else 1.0

    @staticmethod
    def _vip_ifaces(service: ServiceConfig) -> list[Any]:
        return [iface for iface in service.vips for _ in iface.addrs]

    def _make_link(self) -> hb.HeartbeatLink:
        heart = self.config.service.heart
        me = self.config.cluster.node(self.node)
        peer = self.config.cluster.node(self.peer)
        networks = [
            hb.HeartbeatNetwork(net.name, me.addr(net.name), peer.addr(net.name), heart.port)
            for net in heart.networks
        ]
        return hb.HeartbeatLink(
            node=self.node, peer=self.peer, key=self.key, networks=networks,
            pulse_ms=heart.pulse_ms, timeout_ms=heart.timeout_ms,
            payload=self._payload,
            on_event=self.events.put,
            epoch=next_heartbeat_epoch(self.paths.module_dir / "heartbeat.epoch"))

    def _make_replication(self) -> ReplicationService | None:
        service = self.config.service
        if service.rfs is None or not service.rfs.dirs:
            return None
        flow = service.heart.flow_network
        me = self.config.cluster.node(self.node)
        peer = self.config.cluster.node(self.peer)
        settings = ReplicationSettings(
            module=self.paths.module, node=self.node, peer=self.peer,
            dirs=tuple(Path(str(d.path)) for d in service.rfs.dirs),
            listen_addr=str(me.addr(flow)), peer_addr=str(peer.addr(flow)),
            # The replication stream uses the port after the heartbeats' on the flow network.
            port=service.heart.port + 1, pki_dir=self.paths.pki_dir,
            control_socket=self.paths.module_dir / "fuse.sock",
            async_mode=service.rfs.async_mode,
            # No ack within the heartbeat timeout: the secondary is too slow or gone.
            ack_timeout_s=service.heart.timeout_ms / 1000,
            journal_path=self.paths.module_dir / "journal.json", nbrei=service.rfs.nbrei)
        return ReplicationService(settings, post=self.events.put, say=self._say,
                                  alone_is_known=self._alone_is_known,
                                  copy_is_not_trusted=self._copy_is_not_trusted)

    def _copy_is_not_trusted(self) -> bool:
        """The local copy may be rebuilt: this node would not take over with it."""
        return not (self.view.state is State.SECOND and self.view.in_sync)

    def _alone_is_known(self) -> bool:
        """Unreplicated durable writes are safe to acknowledge: this node is ALONE (its new
        generation is on disk) and the peer is gone or no longer claims to be in sync."""
        # While the actions of a decision run (start_prim of a takeover, say), the view still
        # shows the old state; the new one is what counts (its generation is already on disk).
        view = self._entering or self.view
        if view.state is not State.ALONE:
            return False
        peer = view.peer  # its own word: it dropped in_sync once it saw our new generation
        return peer is None or not peer.in_sync

    def _say(self, message: str) -> None:
        self.modlog.info(message, state=self.view.state.value)

    def _make_witness(self) -> hb.Witness | None:
        sb = self.config.service.splitbrain
        if sb is None:
            return None
        return hb.Witness(sb.witness, interval_ms=self.config.service.heart.pulse_ms)

    def _payload(self) -> dict[str, Any]:
        """What heartbeats carry. An engine stuck in an action far beyond its time limits (a
        script in uninterruptible sleep, say) must not keep claiming the role: raising here
        silences the heartbeats, so the peer takes over."""
        if self.busy and time.monotonic() - self.busy_since > self._action_budget():
            raise RuntimeError(f"engine stuck in {self.busy} for "
                               f"{time.monotonic() - self.busy_since:.0f} s")
        return self.view.advertised().to_payload()

    def _action_budget(self) -> float:
        user = self.config.service.user
        return user.nicestoptimeout_s + user.forcestoptimeout_s + 60.0

    def witness_ok(self) -> bool | None:
        if self.witness is None:
            return None
        pulse_s = self.config.service.heart.pulse_ms / 1000
        return self.witness.reachable(max(3 * pulse_s, 0.3))

    # -- public ----------------------------------------------------------------------------

    def submit(self, command: Command, origin: str) -> str | None:
        """Queue an operator command; returns why it is refused in the current state, if so."""
        if command is Command.START and self.view.state is State.STOP:
            problem = self._config_problem()
            if problem:
                return problem
        refused = cluster.step(self.view, CommandEvent(command, origin)).refused
        if refused:
            return refused
        self.events.put(ControlCommand(command, origin))
        return None

    def status(self) -> dict[str, Any]:
        view = self.view
        snap = self.link.snapshot()
        return {
            "node": self.node,
            "peer": self.peer,
            "module": self.paths.module,
            "state": view.state.value,
            "in_sync": view.in_sync,
            "split_brain": view.split_brain,
            "generation": str(view.memory.gen),
            "synced_generation": str(view.memory.synced),
            "peer_state": view.peer.state.value if view.peer else None,
            "peer_present": view.peer is not None,
            "busy": self.busy,
            "vip": [{"addr": str(v.addr), "held": _safe(v.held)} for v in self.vips],
            "witness_ok": self.witness_ok(),
            "heartbeat": _jsonable(snap),
            "counters": dict(self.counters),
            "replication": self.replication.status() if self.replication else None,
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started_at, 1),
        }

    def run(self, start: bool) -> int:
        self.modlog.info(f"daemon started (pid {os.getpid()}, generation {self.view.memory.gen})",
                         state=self.view.state.value)
        self._release_leftovers()
        self._stop_leftover_app()
        if self.replication:
            self.replication.start()
            self.replication.synced_at(self.view.memory.synced.as_list())
        if start:
            # Decide WAIT before the first heartbeat: a booting node must never be seen as
            # STOP, or a peer booting at the same moment would start alone without electing.
            self._handle(ControlCommand(Command.START, "boot"))
        self.link.start()
        if self.witness:
            self.witness.start()
        try:
            self._engine()
        finally:
            self.link.stop()
            if self.witness:
                self.witness.stop()
            if self.replication:
                self.replication.stop()
            self.modlog.info("daemon exited", state=self.view.state.value)
        return 0

    def request_shutdown(self) -> None:
        self.events.put(Shutdown())

    # -- engine ----------------------------------------------------------------------------

    def _engine(self) -> None:
        next_poll = time.monotonic()
        next_isolation_check = time.monotonic()
        pulse_s = self.config.service.heart.pulse_ms / 1000
        while True:
            timeout = max(0.0, min(next_poll, next_isolation_check) - time.monotonic())
            try:
                item = self.events.get(timeout=timeout)
            except queue.Empty:
                item = None
            if isinstance(item, Shutdown):
                if self.view.state is not State.STOP:
                    self._guarded(self._apply, cluster.step(
                        self.view, CommandEvent(Command.STOP, "daemon shutdown")))
                return
            if item is not None:
                self._guarded(self._handle, item)
            if time.monotonic() >= next_poll:
                self._guarded(self._poll)
                next_poll = time.monotonic() + self.poll_interval
            if time.monotonic() >= next_isolation_check:
                self._guarded(self._check_isolation)
                next_isolation_check = time.monotonic() + pulse_s

    def _check_isolation(self) -> None:
        """With a witness, a PRIM that hears neither the peer nor the witness for half the
        timeout steps down early (see cluster.Isolated)."""
        if self.witness is None or self.view.state is not State.PRIM:
            return
        half = self.config.service.heart.timeout_ms / 2000
        ages = [n.last_seen_age_s for n in self.link.snapshot().networks]
        peer_silent = all(a is None or a >= half for a in ages)
        witness_age = self.witness.last_reply_age()
        if peer_silent and (witness_age is None or witness_age >= half):
            self._handle(cluster.Isolated(
                f"no heartbeat from {self.peer} on any network and no answer from the witness "
                f"for {half * 1000:.0f} ms"))

    def _guarded(self, fn: Callable[..., None], *args: Any) -> None:
        """A bug or an unexpected OS error in one event must not kill the daemon (which would
        leave the application and the VIP behind): log it with its traceback and go on."""
        try:
            fn(*args)
        except Exception as e:
            self.busy = None
            detail = traceback.format_exc().strip().replace("\n", " | ")
            with contextlib.suppress(Exception):
                self.modlog.error(f"internal error ({e!r}); continuing: {detail}",
                                  state=self.view.state.value)
            log.exception("engine error")

    def _handle(self, item: Any) -> None:
        if isinstance(item, SyncRetry):  # a copy to the peer failed a while ago
            self._drive_replication()
            return
        detected = time.monotonic()  # a takeover's RTO counts from here (metrics)
        event = self._translate(item)
        if event is None:
            return
        if (isinstance(event, CommandEvent) and self.view.state is State.STOP
                and event.command is not Command.STOP and not self._take_pending_config()):
            return
        decision = cluster.step(self.view, event)
        if isinstance(event, cluster.PeerLost) and self.replication:
            self.replication.peer_gone()
        if decision.refused:
            self.modlog.warning(f"command {event.command} refused: {decision.refused}",  # type: ignore[union-attr]
                                state=self.view.state.value)
            return
        old = self.view
        self._apply(decision)
        self.failovers.decided(old, self.view, event, detected)
        self._drive_replication()

    def _drive_replication(self) -> None:
        """A primary whose peer is SECOND streams to it: a full copy first when the peer is not
        in sync, a plain attach when it is (after a swap)."""
        view, repl = self.view, self.replication
        if (repl is None or view.state not in cluster.SERVING or view.peer is None
                or view.peer.state is not State.SECOND):
            return
        # Only a PRIM whose SECOND is in sync at the same generation may skip the copy; a node
        # that went ALONE (even for a broken stream) has writes the peer never got.
        identical = (view.state is State.PRIM and view.peer.in_sync
                     and view.peer.memory.gen == view.memory.gen)
        if not repl.streaming() or (not identical and not view.peer.in_sync):
            mode, base = sync_mode(view.memory, view.peer.memory, identical)
            repl.request_sync(mode, base)

    def _set_replication_role(self, role: str) -> None:
        if self.replication is None or self.replication.role == role:
            return
        self.busy, self.busy_since = f"replication {role}", time.monotonic()
        try:
            self.replication.set_role(role)
        except Exception as e:  # the state change must complete; the role is retried later
            self.modlog.error(f"replication role {role} failed: {e}", state=self.view.state.value)
        finally:
            self.busy = None

    def _attach_before_start(self) -> None:
        """The new primary of a swap streams to the old one before its application writes."""
        if self.replication is None:
            return
        try:
            attached = self.replication.attach_now()
        except Exception as e:
            attached = False
            self.modlog.error(f"replication attach failed: {e}", state=self.view.state.value)
        if not attached:
            self.events.put(cluster.ReplicationLost("could not attach the stream after a swap"))

    def _translate(self, item: Any) -> cluster.Event | None:
        match item:
            case ControlCommand(command=command, origin=origin):
                return CommandEvent(command, origin)
            case hb.PeerHeard(payload=payload):
                try:
                    peer = cluster.PeerView.from_payload(payload)
                except ValueError as e:
                    self.counters["bad_payload"] += 1
                    self.modlog.error(f"ignored a heartbeat from {self.peer}: {e}")
                    return None
                self._log_peer_change(peer)
                return cluster.PeerHeard(peer)
            case hb.PeerSilent(detail=detail, silent_ms=silent_ms):
                self.failovers.peer_silent(silent_ms / 1000)
                return cluster.PeerLost(detail, self.witness_ok())
            case hb.NetworkLost(network=net, silent_ms=ms, still_up=up, total=total):
                self.modlog.warning(
                    f"heartbeat network {net} silent for {ms} ms; {up}/{total} networks still "
                    f"carry heartbeats from {self.peer}: no failover", state=self.view.state.value)
                return None
            case hb.NetworkRestored(network=net):
                self.modlog.info(f"heartbeat network {net} carries heartbeats again",
                                 state=self.view.state.value)
                return None
            case _ if isinstance(item, cluster.Event):  # already an event of the core
                return item
        log.error("unknown engine item %r", item)
        return None

    def _log_peer_change(self, peer: cluster.PeerView) -> None:
        old = self.view.peer
        if old is None or old.state != peer.state or old.in_sync != peer.in_sync:
            sync = " (in sync)" if peer.state is State.SECOND and peer.in_sync else ""
            self.modlog.info(f"{self.peer} is {peer.state}{sync}, generation {peer.memory.gen}",
                             state=self.view.state.value)

    def _apply(self, decision: Decision) -> None:
        old, new = self.view, decision.view
        if new.memory != old.memory:
            try:
                self.store.save(new.memory)
            except OSError as e:
                # Acting on a generation that is not on disk could let stale data win later.
                self.modlog.error(f"cannot record the node state ({e}); not acting on: "
                                  f"{decision.reason}", state=old.state.value)
                return
            if new.memory.synced != old.memory.synced and self.replication:
                self.replication.synced_at(new.memory.synced.as_list())
        if decision.reason:
            arrow = f"{old.state} -> {new.state}" if new.state != old.state else f"{new.state}"
            line = f"{arrow}: {decision.reason}"
            (self.modlog.error if decision.error else self.modlog.info)(line)
        # Run the actions before advertising the new state: the peer must not take over until
        # stop_prim has finished here (planned failover, swap).
        with self._lock:
            self.view = _keep_state(old, new)
            self._entering = new
        role = replication_role(new.state)
        if role == "primary":  # writable before the application starts
            self._set_replication_role(role)
            if old.state is State.SECOND and new.state is State.PRIM:
                self._attach_before_start()
        for action in decision.actions:
            self._run(action)
        if role != "primary":  # read-only only once the application has stopped
            self._set_replication_role(role)
        with self._lock:
            self.view = new
            self._entering = None
        self.link.send_now()

    def _run(self, action: Action) -> None:
        self.busy = action.value
        self.busy_since = time.monotonic()
        try:
            match action:
                case Action.ADD_VIP:
                    for vip in self.vips:
                        self._vip_call(vip.add, f"adding VIP {vip.addr}")
                case Action.REMOVE_VIP:
                    for vip in self.vips:
                        self._vip_call(vip.remove, f"removing VIP {vip.addr}")
                case Action.START_APP:
                    self.scripts.start_app()
                case Action.STOP_APP:
                    self.scripts.stop_app()
                case Action.BEGIN_RESYNC:
                    if self.replication is None:  # nothing replicated: nothing to copy
                        self.events.put(cluster.ResyncDone("no replicated directories"))
                    # else: the primary connects and copies; the receiver posts ResyncDone
        finally:
            self.busy = None

    def _vip_call(self, fn: Callable[[], None], what: str) -> None:
        try:
            fn()
        except (VipError, OSError) as e:
            self.modlog.error(f"{what} failed: {e}", state=self.view.state.value)

    def _poll(self) -> None:
        self._check_interfaces()
        if (self.replication is not None and not self.replication.alive()
                and self.view.state is not State.STOP):
            # Without its loop no mount answers: the application would only get errors. Stop,
            # so that a synchronised peer takes over (the daemon's output says why it died).
            self.modlog.error("the replication loop died (see the daemon's output); stopping "
                              "the module", state=self.view.state.value)
            self._handle(CommandEvent(Command.STOP, "a replication failure"))
            return
        if self.view.state not in cluster.SERVING:
            self._release_leftovers()  # a VIP that failed to go away must not stay duplicated
        if self.watch is None or self.view.state not in cluster.SERVING:
            return
        # Only the application's processes are watched, and only where the application runs.
        for count in self.watch.count():
            if count.count < count.atleast:
                self._handle(cluster.ProcessCheck(count.name, count.count, count.atleast,
                                                  count.action, time.monotonic()))
                return

    def _check_interfaces(self) -> None:
        if not self.checked_vips:
            return
        down = [vip for vip in self.checked_vips if _safe(vip.interface_up) is False]
        up = not down
        if up != self.view.interface_ok:
            names = sorted({_interface_name(v) for v in (down or self.checked_vips)})
            self._handle(cluster.InterfaceChanged(",".join(names), up))

    def _release_leftovers(self) -> None:
        """A node that does not serve must not hold the VIP (left by a crash, or a removal that
        failed)."""
        for vip in self.vips:
            if _safe(vip.held):
                self.modlog.warning(f"VIP {vip.addr} is configured on a node that does not "
                                    "serve; removing it", state=self.view.state.value)
                self._vip_call(vip.remove, f"removing VIP {vip.addr}")

    def _stop_leftover_app(self) -> None:
        """A daemon that starts finds the module stopped: an application still running from a
        previous run (daemon crash, manual start) is stopped, or it could run on both nodes."""
        if self.watch is None:
            return
        running = [c for c in self.watch.count() if c.count > 0]
        if running:
            names = ", ".join(f"{c.name} ({c.count})" for c in running)
            self.modlog.warning(f"application processes running while the module is stopped: "
                                f"{names}; running stop_prim", state=self.view.state.value)
            self.scripts.stop_app()

    def _config_problem(self) -> str | None:
        """Starting re-reads the configuration: a broken file refuses the start, changes
        nothing, and names the file, line and field. Validation only (control thread); the
        engine applies it when it processes the start."""
        try:
            config = load_node_config(self.paths.cluster_xml, self.paths.userconfig)
            node = resolve_node_name(config)
        except ConfigError as e:
            return f"configuration invalid, module not started: {e}"
        if node != self.node or config.cluster != self.config.cluster:
            return "cluster.xml changed: restart the daemon to apply a new node list"
        if config.service.heart != self.config.service.heart:
            return "heartbeat settings changed: restart the daemon to apply them"
        if config.service.splitbrain != self.config.service.splitbrain:
            return "split-brain witness changed: restart the daemon to apply it"
        return None

    def _take_pending_config(self) -> bool:
        """Engine side of a start: load the configuration again and apply it if it changed."""
        problem = self._config_problem()
        if problem:
            self.modlog.error(f"start refused: {problem}", state=self.view.state.value)
            return False
        config = load_node_config(self.paths.cluster_xml, self.paths.userconfig)
        if config != self.config:
            self.config = config
            self.view = replace(self.view, policy=policy_from(config.service, self.node,
                                                              self.peer))
            self._build_adapters(config)
            self.modlog.info("configuration reloaded", state=self.view.state.value)
        return True


def _interface_name(vip: VirtualIp) -> str:
    try:
        return vip.resolve_interface()[0]
    except (VipError, OSError):
        return str(vip.addr)


def sync_mode(me: cluster.Memory, peer: cluster.Memory, identical: bool
              ) -> tuple[str, list[Any] | None]:
    """How the primary brings its SECOND level: ("attach" | "reintegrate" | "full", base).

    A peer that wrote on its own (split brain, resolved in our favour) gets a full copy: its
    divergent data is set aside there, never overwritten in place. Otherwise only what differs
    is sent; `base` is the generation both copies last had when the peer wrote nothing since
    (then the journals of both sides can say what differs), else None (checksums decide)."""
    if identical:  # the base, should the primary's journal show a gap after all
        return "attach", me.synced.as_list() if me.synced.counter > 0 else None
    if peer.wrote_alone:
        return "full", None
    if peer.gen == peer.synced == me.synced and me.synced.counter > 0:
        return "reintegrate", me.synced.as_list()
    return "reintegrate", None


def replication_role(state: State) -> str:
    return {State.STOP: "stopped", State.WAIT: "idle", State.SECOND: "secondary"}.get(
        state, "primary")


def _keep_state(old: NodeView, new: NodeView) -> NodeView:
    """While actions run, keep advertising the old state but already the new memory."""
    return replace(old, memory=new.memory)


def _safe(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except (VipError, OSError):
        return None


def _jsonable(obj: Any) -> Any:
    if is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(asdict(obj))
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float):
        return round(obj, 6)
    if isinstance(obj, str | int | bool) or obj is None:
        return obj
    return str(obj)


def run_daemon(paths: Paths, start: bool) -> int:
    from appliance.control import ControlServer
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    daemon = Daemon(paths)
    server = ControlServer(paths.control_socket, daemon)
    server.start()
    exporter = serve_metrics(daemon)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: daemon.request_shutdown())
    try:
        return daemon.run(start)
    finally:
        server.stop()
        if exporter is not None:
            exporter.stop()


def serve_metrics(daemon: Daemon, port: int = metrics.METRICS_PORT
                  ) -> metrics.MetricsServer | None:
    """/metrics for Prometheus on all addresses. A port already taken is logged, not fatal:
    the cluster matters more than its monitoring."""
    collector = metrics.MirrorhaCollector(
        daemon.status, daemon.failovers,
        ops=lambda: daemon.replication.op_stats if daemon.replication else None,
        maxloop=lambda: daemon.config.service.maxloop, started_at=daemon.started_at)
    try:
        return metrics.serve(collector, port)
    except OSError as e:
        daemon.modlog.error(f"metrics not served on port {port}: {e}")
        return None
