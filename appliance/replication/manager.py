"""The replication side of a module, owned by the daemon: mounts, channel and resync.

Runs one trio loop in its own thread. Its role follows the node's state (the daemon sets it):

    stopped     no mount: the replicated dirs are plain directories (module STOP)
    idle        read-only mounts, no channel (WAIT: nobody may write, nothing to receive)
    secondary   read-only mounts, receiver listening for the primary (SECOND)
    primary     read-write mounts; every mutation goes to the sender when a synchronised
                secondary is attached, otherwise the primary runs ALONE

Each replicated dir is served by a mount child (pyfuse3 allows one mount per process) that
forwards every mutation over a local socket; this service hands them to the sender in arrival
order and answers each one when the sender accepted it (or, for fsync and friends, when the
secondary acknowledged it durably).

Full resync (when the peer is SECOND and not in sync): connect, freeze the mounts (mutations
wait before touching the disk, in-flight ones drain), stream every dir (resync.full_copy), go
live, unfreeze. The application is never stopped: its writes pause for the copy.

Events for the daemon's engine are posted with `post` (thread-safe): cluster.ResyncDone on the
secondary when the copy is complete, cluster.ReplicationLost on the primary when the stream broke.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket as stdsocket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from appliance import cluster
from appliance.errors import MirrorhaError
from appliance.replication import tls
from appliance.replication.applier import Applier, ApplyError
from appliance.replication.channel import (
    ConnectionRefused,
    OpRefused,
    PeerConnected,
    PeerDisconnected,
    ReceiverEvent,
    ReplicaBroken,
    ReplicaReceiver,
    ReplicaSender,
    open_receiver_listener,
)
from appliance.replication.fusefs import MountChannel, child_argv, detach_stale_mounts
from appliance.replication.protocol import Op, OpKind
from appliance.replication.resync import full_copy

log = logging.getLogger("mirrorha.replication")

ROLES = ("stopped", "idle", "secondary", "primary")
MOUNT_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class ReplicationSettings:
    module: str
    node: str
    peer: str
    dirs: tuple[Path, ...]
    listen_addr: str  # this node's address on the replication (flow) network
    peer_addr: str
    port: int
    pki_dir: Path
    control_socket: Path
    async_mode: str = "second"
    ack_timeout_s: float = 5.0


class ReplicationError(MirrorhaError):
    pass


class _Mount:
    def __init__(self, index: int, directory: Path) -> None:
        self.index = index
        self.directory = directory
        self.process: subprocess.Popen[bytes] | None = None
        self.channel: MountChannel | None = None
        self.mounted = trio.Event()
        self.frozen: trio.Event | None = None


class ReplicationService:
    def __init__(self, settings: ReplicationSettings,
                 post: Callable[[object], None], say: Callable[[str], None],
                 alone_is_known: Callable[[], bool] = lambda: True,
                 copy_is_not_trusted: Callable[[], bool] = lambda: True) -> None:
        self.s = settings
        self.post = post
        self.alone_is_known = alone_is_known  # see _until_alone_is_known
        self.copy_is_not_trusted = copy_is_not_trusted  # see _resync_marker
        self.say = say  # one line in the module log
        self.role = "stopped"
        self.sender: ReplicaSender | None = None
        self.receiver: ReplicaReceiver | None = None
        self.resyncing = False
        self.counters = {"resyncs": 0, "resync_bytes": 0, "lost": 0}
        self._mounts: list[_Mount] = []
        self._backing_fds: list[int] = []
        self._applier: Applier | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._stop: trio.Event | None = None
        self._nursery: trio.Nursery | None = None
        self._role_scope: trio.CancelScope | None = None
        self._resync_started = 0.0
        self._done_roots: set[int] = set()
        self._receiver_done: trio.Event | None = None
        self._sender_from_copy = False  # the live stream began with a full copy

    # -- thread-side API (daemon engine) ---------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=lambda: trio.run(self._main), name="replication",
                                        daemon=True)
        self._thread.start()
        if not self._started.wait(10):
            raise ReplicationError("the replication loop did not start")

    def stop(self) -> None:
        if self._token is None or self._thread is None:
            return
        with contextlib.suppress(trio.RunFinishedError):
            self._call(self._set_role, "stopped")
            trio.from_thread.run_sync(self._stop_now, trio_token=self._token)
        self._thread.join(20)

    def set_role(self, role: str) -> None:
        """Blocks until the mounts are in the mode the role needs (an application started
        right after must find its directories writable)."""
        if role not in ROLES:
            raise ValueError(role)
        self._call(self._set_role, role)

    def request_sync(self, full: bool = True) -> None:
        """Primary whose peer is SECOND without a live stream: full resync when the peer is
        not in sync; just connect (`full=False`) when its copy is known identical (after a
        swap: the old primary drained its stream before handing over)."""
        if self._token is not None:
            trio.from_thread.run_sync(self._request_sync, full, trio_token=self._token)

    def attach_now(self) -> bool:
        """Become the stream's source before the application starts (the new primary of a
        swap): no write may happen before the stream exists. True if it does."""
        self._call(self._attach_blocking)
        return self.streaming()

    async def _attach_blocking(self) -> None:
        if self.streaming() or self.resyncing:
            return
        self.resyncing = True
        self._sender_from_copy = False
        await self._attach()

    def streaming(self) -> bool:
        sender = self.sender
        return sender is not None and sender.broken is None

    def peer_gone(self) -> None:
        if self._token is not None:
            trio.from_thread.run_sync(self._drop_sender, "peer lost", trio_token=self._token)

    def status(self) -> dict[str, Any]:
        sender = self.sender
        lag = sender.lag() if sender is not None else None
        receiver = self.receiver
        return {
            "role": self.role,
            "connected": sender is not None and sender.broken is None,
            "resyncing": self.resyncing,
            "lag_bytes": lag.bytes if lag else 0,
            "lag_ops": lag.ops if lag else 0,
            "lag_seconds": lag.seconds if lag else 0.0,
            "receiver": dict(receiver.counters) if receiver else None,
            **self.counters,
        }

    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self._token is None:
            raise ReplicationError("the replication loop is not running")
        return trio.from_thread.run(fn, *args, trio_token=self._token)

    # -- trio side -------------------------------------------------------------------------

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        self._open_backing()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self._serve_control)
            self._started.set()
            await self._stop.wait()
            nursery.cancel_scope.cancel()
        self._close_backing()

    def _stop_now(self) -> None:
        assert self._stop is not None
        self._stop.set()

    def _open_backing(self) -> None:
        """Open every dir BEFORE anything is mounted over it (after, the path is the mount)."""
        for directory in self.s.dirs:
            detach_stale_mounts(directory)
            directory.mkdir(parents=True, exist_ok=True)
        self._backing_fds = [os.open(d, os.O_RDONLY | os.O_DIRECTORY) for d in self.s.dirs]
        self._applier = Applier(list(self.s.dirs))
        self._mounts = [_Mount(i, d) for i, d in enumerate(self.s.dirs)]

    def _close_backing(self) -> None:
        if self._applier is not None:
            self._applier.close()
        for fd in self._backing_fds:
            os.close(fd)
        self._backing_fds = []

    async def _serve_control(self, *, task_status: trio.TaskStatus[None]
                             = trio.TASK_STATUS_IGNORED) -> None:
        path = self.s.control_socket
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        sock = trio.socket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
        await sock.bind(str(path))
        os.chmod(path, 0o600)
        sock.listen(16)
        listener = trio.SocketListener(sock)
        task_status.started()
        async with trio.open_nursery() as nursery:
            while True:
                stream = await listener.accept()
                nursery.start_soon(self._serve_child, stream)

    async def _serve_child(self, stream: trio.SocketStream) -> None:
        channel = MountChannel(stream, self)
        mount: _Mount | None = None

        def on_hello(info: dict[str, Any]) -> None:
            nonlocal mount
            if "root" in info and isinstance(info["root"], int) and info["root"] < len(
                    self._mounts):
                mount = self._mounts[info["root"]]
                mount.channel = channel
            elif info.get("event") == "mounted" and mount is not None:
                mount.mounted.set()
            elif info.get("event") == "frozen" and mount is not None and mount.frozen is not None:
                mount.frozen.set()
        try:
            await channel.run(on_hello)
        except Exception as e:
            log.exception("mount child connection ended: %s", e)
        finally:
            if mount is not None and mount.channel is channel:
                mount.channel = None

    # -- roles -----------------------------------------------------------------------------

    async def _set_role(self, role: str) -> None:
        if role == self.role:
            return
        old = self.role
        log.info("replication role %s -> %s", old, role)
        if self._role_scope is not None:
            # The receiver of a former secondary: wait until it has applied what it had
            # acknowledged, or old ops could land on top of the new primary's writes.
            self._role_scope.cancel()
            self._role_scope = None
            if self._receiver_done is not None:
                await self._receiver_done.wait()
        if role != "primary":
            await self._drain_and_drop_sender()
        if role == "stopped":
            await self._unmount_all()
        else:
            await self._mount_all(read_only=role != "primary")
            if role == "secondary":
                await self._start_receiver()
        self.role = role  # only once the role is really in place

    async def _mount_all(self, read_only: bool) -> None:
        for m in self._mounts:
            if m.process is None or m.process.poll() is not None:
                m.mounted = trio.Event()
                argv = child_argv(m.index, m.directory, self.s.control_socket,
                                  read_only=read_only)
                m.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
            elif m.channel is not None:
                m.channel.set_read_only(read_only)
        with trio.move_on_after(MOUNT_TIMEOUT_S) as scope:
            for m in self._mounts:
                await m.mounted.wait()
        if scope.cancelled_caught:
            raise ReplicationError("a replicated directory could not be mounted in "
                                   f"{MOUNT_TIMEOUT_S:g} s (see the daemon's output)")

    async def _unmount_all(self) -> None:
        for m in self._mounts:
            proc = m.process
            if proc is None:
                continue
            if proc.poll() is None:
                proc.terminate()
            with trio.move_on_after(10):
                while proc.poll() is None:
                    await trio.sleep(0.02)  # reaping a child process: nothing to wait on
            if proc.poll() is None:
                proc.kill()
                await trio.to_thread.run_sync(proc.wait)
            detach_stale_mounts(m.directory)
            m.process = None
            m.channel = None

    async def _start_receiver(self) -> None:
        assert self._nursery is not None and self._applier is not None
        ctx = tls.server_context(self.s.pki_dir, self.s.node)
        listener = await open_receiver_listener(self.s.listen_addr, self.s.port, ctx)
        self._done_roots = set()
        self.receiver = ReplicaReceiver(
            _MarkedApplier(self._applier, self._resync_marker), node=self.s.node,
            async_mode=self.s.async_mode, on_event=self._receiver_event, module=self.s.module,
            expected_peer=self.s.peer)
        scope = trio.CancelScope()
        self._role_scope = scope
        done = self._receiver_done = trio.Event()

        async def serve() -> None:
            try:
                with scope:
                    assert self.receiver is not None
                    await self.receiver.serve(listener)
                await listener.aclose()
            finally:
                done.set()
        self._nursery.start_soon(serve)

    def _resync_marker(self, op: Op) -> None:
        """Called in the applier's thread for RESET / RESYNC_DONE."""
        if op.kind is OpKind.RESET:
            self._done_roots.discard(op.root)
            if op.root == 0:
                self._resync_started = time.monotonic()
                self.post(cluster.ResyncStarted())
                # Nothing is moved aside before the engine stopped trusting this copy: a
                # half-rebuilt copy must never be taken over as "in sync" (this runs in the
                # applier's worker thread, so waiting here holds the stream, nothing else).
                deadline = time.monotonic() + 5
                while not self.copy_is_not_trusted() and time.monotonic() < deadline:
                    time.sleep(0.005)  # polling the engine's view, owned by another thread
                if not self.copy_is_not_trusted():
                    raise ApplyError(5, "the node still trusts its copy; refusing to reset it")
        elif op.kind is OpKind.RESYNC_DONE:
            self._done_roots.add(op.root)
            if len(self._done_roots) == len(self.s.dirs):
                took = time.monotonic() - self._resync_started
                self.post(cluster.ResyncDone(f"full copy from {self.s.peer} in {took:.2f} s"))

    def _receiver_event(self, event: ReceiverEvent) -> None:
        match event:
            case PeerConnected(node=node):
                self.say(f"replication stream from {node} connected")
            case PeerDisconnected(node=node, reason=reason):
                self.say(f"replication stream from {node} ended: {reason}")
            case OpRefused(seq=seq, message=message):
                self.say(f"refused replicated op #{seq}: {message}")
            case ConnectionRefused(address=address, reason=reason):
                self.say(f"refused a replication connection from {address}: {reason}")

    # -- primary side ----------------------------------------------------------------------

    def _request_sync(self, full: bool) -> None:
        if self.role != "primary" or self.resyncing:
            return
        if self.sender is not None and self.sender.broken is None:
            if not full or self._sender_from_copy:
                return
            self._drop_sender("a full copy is needed")  # an attached stream over a gap
        self._sender_from_copy = False
        assert self._nursery is not None
        self.resyncing = True
        self._nursery.start_soon(self._resync if full else self._attach)

    async def _connect(self) -> ReplicaSender:
        this: list[ReplicaSender] = []  # the sender, for its own on_broken
        sender = ReplicaSender(
            node=self.s.node, peer=self.s.peer, module=self.s.module, host=self.s.peer_addr,
            port=self.s.port, ssl_context=tls.client_context(self.s.pki_dir, self.s.node,
                                                              self.s.peer),
            ack_timeout_s=self.s.ack_timeout_s,
            on_broken=lambda reason: self._on_broken(this[0], reason))
        this.append(sender)
        try:
            await sender.connect()
        except BaseException:
            await sender.aclose()
            raise
        assert self._nursery is not None
        self._nursery.start_soon(sender.run)
        return sender

    async def _attach(self) -> None:
        """Stream to a secondary whose copy is already identical (after a swap)."""
        try:
            await self._freeze(True)
            try:
                self.sender = await self._connect()
            finally:
                await self._freeze(False)
            self.say(f"replication stream to {self.s.peer} attached (copies identical)")
        except (ReplicaBroken, OSError, MirrorhaError) as e:
            self.say(f"attaching the replication stream to {self.s.peer} failed: {e}")
        finally:
            self.resyncing = False

    async def _resync(self) -> None:
        started = time.monotonic()
        try:
            sender = await self._connect()
            await self._freeze(True)  # mutations wait before touching the disk
            try:
                total = 0
                for i, fd in enumerate(self._backing_fds):
                    stats = await full_copy(i, fd, sender.submit)
                    total += stats.bytes
                await sender.submit(Op(OpKind.SYNC, 0, ""))
                self.sender = sender  # live from the first mutation after the freeze
                self._sender_from_copy = True
                for i in range(len(self._backing_fds)):  # the secondary may now say in sync
                    await sender.submit(Op(OpKind.RESYNC_DONE, i, ""))
            except BaseException:
                if self.sender is not sender:
                    await sender.aclose()
                raise
            finally:
                await self._freeze(False)
            self.counters["resyncs"] += 1
            self.counters["resync_bytes"] += total
            self.say(f"full resync to {self.s.peer}: {total} bytes of data in "
                     f"{time.monotonic() - started:.2f} s")
        except (ReplicaBroken, OSError, MirrorhaError) as e:
            self.say(f"resync to {self.s.peer} failed: {e}")
        except Exception as e:  # a bug must not take the mounts down with the loop
            log.exception("resync failed")
            self.say(f"resync to {self.s.peer} failed (internal error): {e!r}")
        finally:
            self.resyncing = False

    async def _freeze(self, frozen: bool) -> None:
        for m in self._mounts:
            if m.channel is None:
                continue
            m.frozen = trio.Event() if frozen else None
            m.channel.set_frozen(frozen)
        if frozen:
            with trio.move_on_after(30) as scope:
                for m in self._mounts:
                    if m.frozen is not None:
                        await m.frozen.wait()
            if scope.cancelled_caught:
                raise ReplicationError("a mount did not confirm its freeze within 30 s: "
                                       "no copy of a tree that may still change")

    def _on_broken(self, sender: ReplicaSender, reason: str) -> None:
        if self.sender is not sender:
            return  # an old or unfinished stream: nobody relied on it
        self.counters["lost"] += 1
        self.sender = None
        self.post(cluster.ReplicationLost(reason))

    def _drop_sender(self, reason: str) -> None:
        sender, self.sender = self.sender, None
        if sender is not None and self._nursery is not None:
            self._nursery.start_soon(sender.aclose)

    async def _drain_and_drop_sender(self) -> None:
        """Leaving the primary role: everything sent is made durable on the secondary first,
        so that a swap hands over identical copies."""
        sender, self.sender = self.sender, None
        if sender is None:
            return
        if sender.broken is None:
            with trio.move_on_after(self.s.ack_timeout_s * 2):
                with contextlib.suppress(ReplicaBroken):
                    await sender.submit(Op(OpKind.SYNC, 0, ""))
        await sender.aclose()

    async def submit(self, op: Op) -> None:
        """OpSink of the mount children."""
        if self.role != "primary":
            raise OSError(30, "read-only: this node is not the primary")  # EROFS
        # During a resync the mounts are frozen: the only ops arriving are those already on disk
        # before the freeze, and the copy that follows includes them.
        sender = self.sender
        if sender is not None:
            try:
                await sender.submit(op)
                return
            except ReplicaBroken:
                pass  # on_broken told the engine; the application keeps running ALONE
        if op.durable and not self.resyncing:
            await self._until_alone_is_known(op)

    async def _until_alone_is_known(self, op: Op) -> None:
        """A durable op the secondary did not acknowledge may only succeed once the peer can
        no longer take over believing it is in sync: this node is ALONE with a new generation
        and the peer is gone or has seen it. Otherwise a crash right after the ack would lose
        the data. Bounded: EIO rather than waiting forever."""
        with trio.move_on_after(self.s.ack_timeout_s * 3):
            while not self.alone_is_known():
                await trio.sleep(0.01)  # polling the engine's view, owned by another thread
            return
        raise OSError(5, f"{op.kind.name} not acknowledged by {self.s.peer} and the peer was "
                         "not yet told that this node runs alone")  # EIO


class _MarkedApplier:
    """The receiver's applier, noticing the resync markers as they are applied."""

    def __init__(self, applier: Applier, on_marker: Callable[[Op], None]) -> None:
        self._applier = applier
        self._on_marker = on_marker

    def apply(self, op: Op) -> None:
        if op.kind is OpKind.RESYNC_DONE:
            self._applier.sync()  # "in sync" only once the whole copy is on this disk
        if op.kind is OpKind.RESET:
            self._on_marker(op)  # before: the copy stops being trusted first
        self._applier.apply(op)
        if op.kind is OpKind.RESYNC_DONE:
            self._on_marker(op)

    def fsync(self, root: int, path: str, datasync: bool) -> None:
        self._applier.fsync(root, path, datasync)

    def sync(self) -> None:
        self._applier.sync()


def settings_for(*, module: str, node: str, peer: str, dirs: Sequence[Path], listen_addr: str,
                 peer_addr: str, port: int, pki_dir: Path, control_socket: Path,
                 async_mode: str, ack_timeout_s: float) -> ReplicationSettings:
    return ReplicationSettings(module, node, peer, tuple(dirs), listen_addr, peer_addr, port,
                               pki_dir, control_socket, async_mode, ack_timeout_s)
