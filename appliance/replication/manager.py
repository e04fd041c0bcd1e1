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

Reintegration (the peer is SECOND, not in sync, and wrote nothing on its own: the normal return
of a node): only what differs is sent, while the application keeps writing. REINT_BEGIN (the
secondary stops trusting its copy, and remembers it on disk), LIST (its tree and its journal's
summary), then a first pass, mounts NOT frozen: compare both trees and send what differs (the
journal's dirty zones, or block checksums where the journal cannot tell), the application's
new writes being recorded in the journal meanwhile; then a second pass with the mounts frozen
for what changed during the first one (usually little), SYNC, go live, RESYNC_DONE, unfreeze.
See reintegrate.py for the comparison, journal.py for what is recorded and when it is trusted.

Full resync (split brain: the peer's divergent data is set aside, never overwritten): connect,
freeze the mounts (mutations wait before touching the disk, in-flight ones drain), stream every
dir (resync.full_copy), go live, unfreeze. The application is paused for the copy.

Events for the daemon's engine are posted with `post` (thread-safe): cluster.ResyncDone on the
secondary when the copy is complete, cluster.ReplicationLost on the primary when the stream broke.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket as stdsocket
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import trio

from appliance import cluster
from appliance.errors import MirrorhaError
from appliance.metrics import OpStats
from appliance.replication import inventory, reintegrate, tls
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
from appliance.replication.fusefs import (
    FuseMount,
    MountChannel,
    ReplicatedFs,
    child_argv,
    detach_stale_mounts,
)
from appliance.replication.journal import Dirt, DirtyJournal, write_state
from appliance.replication.protocol import Op, OpKind, ProtocolError
from appliance.replication.resync import full_copy
from appliance.replication.workers import keep_large_buffers

log = logging.getLogger("mirrorha.replication")

ROLES = ("stopped", "idle", "secondary", "primary")
SYNC_MODES = ("attach", "reintegrate", "full")
MOUNT_TIMEOUT_S = 15.0
JOURNAL_WRITE_S = 1.0  # the journal file is rewritten at most this often (when it changed)
BARRIER_S = 2.0  # a SYNC barrier this often while streaming bounds what the peer may lack
RETRY_FIRST_S, RETRY_MAX_S = 1.0, 30.0  # a failed copy is tried again after this, doubling


def copy_ack_timeout(ack_timeout_s: float) -> float:
    """Ack timeout during pass 1 of a reintegration (the application does not wait on it)."""
    return max(30.0, 10 * ack_timeout_s)


@dataclass(frozen=True)
class SyncRetry:
    """Posted to the daemon a while after a failed copy: bring the peer level again if it is
    still a SECOND without a stream."""


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
    journal_path: Path | None = None  # None: kept in memory only (tests)
    nbrei: int = 3  # checksum workers on each side
    local_mount: bool = True  # the first dir served in this process (else a child, like the rest)


class ReplicationError(MirrorhaError):
    pass


class _Freezable(Protocol):
    def set_frozen(self, frozen: bool) -> None: ...


class _MountBase:
    """What both kinds of mount share: which dir, whether it is live, the freeze handshake."""

    def __init__(self, index: int, directory: Path) -> None:
        self.index = index
        self.directory = directory
        self.mounted = trio.Event()
        self.frozen: trio.Event | None = None  # set once the mount confirmed its freeze

    async def start(self, service: ReplicationService, read_only: bool) -> None:
        """Mounted, or switched to `read_only` if it already is; `mounted` set once live."""
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    def _freezable(self) -> _Freezable | None:
        raise NotImplementedError

    def set_frozen(self, frozen: bool) -> None:
        target = self._freezable()
        if target is None:
            return  # nothing mounted or connected: nothing can change there
        self.frozen = trio.Event() if frozen else None
        target.set_frozen(frozen)


class _Mount(_MountBase):
    """A replicated dir's FUSE mount served by a child process (see fusefs: one per process)."""

    def __init__(self, index: int, directory: Path) -> None:
        super().__init__(index, directory)
        self.process: subprocess.Popen[bytes] | None = None
        self.channel: MountChannel | None = None

    async def start(self, service: ReplicationService, read_only: bool) -> None:
        if self.process is None or self.process.poll() is not None:
            self.mounted = trio.Event()
            argv = child_argv(self.index, self.directory, service.s.control_socket,
                              read_only=read_only)
            self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
        elif self.channel is not None:
            self.channel.set_read_only(read_only)

    def _freezable(self) -> _Freezable | None:
        return self.channel

    async def stop(self) -> None:
        proc = self.process
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
        with trio.move_on_after(10):
            while proc.poll() is None:
                await trio.sleep(0.02)  # reaping a child process: nothing to wait on
        if proc.poll() is None:
            proc.kill()
            await trio.to_thread.run_sync(proc.wait)
        detach_stale_mounts(self.directory)
        self.process = None
        self.channel = None


class _LocalMount(_MountBase):
    """The first replicated dir's FUSE mount served by the replication loop itself: its ops
    reach the sender as calls, without a child's socket hop each way (measured: the hop was
    the largest part of a durable write's latency). Same interface as _Mount.

    Safe because nothing in the daemon touches the mount: every access to the dir goes through
    the backing fd opened before mounting (replication, reintegration, the applier)."""

    def __init__(self, index: int, directory: Path, backing_fd: int) -> None:
        super().__init__(index, directory)
        self._backing_fd = backing_fd
        self.fs: ReplicatedFs | None = None
        self._scope: trio.CancelScope | None = None
        self._done: trio.Event | None = None

    async def start(self, service: ReplicationService, read_only: bool) -> None:
        if self.fs is not None:
            self.fs.set_read_only(read_only)
            log.info("%s now %s", self.directory, "read-only" if read_only else "read-write")
            return
        assert service._nursery is not None
        fs = ReplicatedFs(self.index, self._backing_fd, service, read_only)
        fs.on_frozen = self._on_frozen
        self.mounted = trio.Event()
        self._done = trio.Event()
        await service._nursery.start(self._serve, FuseMount(self.directory, fs))
        self.fs = fs
        self.mounted.set()

    async def _serve(self, mount: FuseMount, *,
                     task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        assert self._done is not None
        try:
            with trio.CancelScope() as scope:
                self._scope = scope
                await mount.serve(task_status=task_status)
        finally:
            self.fs = None
            self._done.set()

    def _on_frozen(self) -> None:
        if self.frozen is not None:
            self.frozen.set()

    def _freezable(self) -> _Freezable | None:
        return self.fs

    async def stop(self) -> None:
        if self._scope is not None and self._done is not None:
            self._scope.cancel()
            await self._done.wait()
        self._scope = None
        detach_stale_mounts(self.directory)


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
        self.counters = {"resyncs": 0, "reintegrations": 0, "resync_bytes": 0, "lost": 0}
        self._mounts: list[_MountBase] = []
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
        self.journal = DirtyJournal(settings.journal_path or Path("/nonexistent/journal.json"),
                                    len(settings.dirs), margin_s=3 * settings.ack_timeout_s + 5)
        # The journal is changed by the trio thread (primary) and by the applier's worker
        # thread (secondary markers); the writer takes a consistent state under this lock.
        self._journal_lock = threading.Lock()
        self._journal_file_lock = threading.Lock()
        self._journal_version = self._journal_written = 0
        self._barrier_running = False
        self._sync_scope: trio.CancelScope | None = None
        self._sync_abandoned = ""  # why _sync_scope was cancelled
        self._stopping = False
        self._retry_s, self._last_failure = RETRY_FIRST_S, ""
        self._incoming: dict[str, Any] = {}  # secondary: the copy being received (log line)
        self._receiving = False  # secondary: a copy is being received (metrics)
        self.op_stats = OpStats()  # replicated ops by kind, write latency (/metrics)
        # The copy under way or the last one (/metrics): its start, pass, what it sent.
        self._copy_started: float | None = None
        self._copy_pass = 0
        self._copy_sent = {"bytes": 0, "ops": 0}
        self._last_copy_s: float | None = None

    # -- thread-side API (daemon engine) ---------------------------------------------------

    def start(self) -> None:
        keep_large_buffers()  # this process serves a mount and (de)codes big frames
        self._thread = threading.Thread(target=lambda: trio.run(self._main), name="replication",
                                        daemon=True)
        self._thread.start()
        if not self._started.wait(10):
            raise ReplicationError("the replication loop did not start")

    def stop(self) -> None:
        self._stopping = True
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

    def request_sync(self, mode: str = "full", base: list[Any] | None = None) -> None:
        """Primary whose peer is SECOND without a live stream: `attach` when its copy is known
        identical (after a swap: the old primary drained its stream before handing over),
        `reintegrate` when it only lags behind (`base`: the generation both copies last had,
        if the peer wrote nothing since — then the journals may say what differs), `full`
        when its data diverged (split brain: set aside there, everything copied)."""
        if mode not in SYNC_MODES:
            raise ValueError(mode)
        if self._token is not None:
            trio.from_thread.run_sync(self._request_sync, mode, base, trio_token=self._token)

    def synced_at(self, generation: list[Any]) -> None:
        """The daemon's record of the generation both copies last had (journal base)."""
        if self._token is not None:
            trio.from_thread.run_sync(self._rebase, generation, trio_token=self._token)

    def _rebase(self, generation: list[Any]) -> None:
        with self._journal_lock:
            self.journal.rebase(generation)

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
        await self._sync_task("attaching the replication stream to", self._attach)

    def alive(self) -> bool:
        """The replication loop runs (started and not ended by an error)."""
        return self._thread is None or self._thread.is_alive() or self._stopping

    def streaming(self) -> bool:
        sender = self.sender
        return sender is not None and sender.broken is None

    def peer_gone(self) -> None:
        if self._token is not None:
            trio.from_thread.run_sync(self._peer_gone, trio_token=self._token)

    def _peer_gone(self) -> None:
        if self._sync_scope is not None:
            # A copy to a peer the heartbeats lost is pointless (and its relaxed ack timeout
            # would keep it waiting): the next copy starts when the peer is SECOND again.
            self._sync_abandoned = f"{self.s.peer} was lost"
            self._sync_scope.cancel()
        self._drop_sender("peer lost")

    def _journal_figures(self) -> tuple[int, int]:
        """(dirty bytes, unsynced changes), read from another thread than the loop changing
        them: a read that met a change is simply done again."""
        for _ in range(5):
            try:
                return self.journal.volume(), self.journal.unsynced_marks()
            except RuntimeError:  # "changed size during iteration"
                continue
        return -1, -1

    def status(self) -> dict[str, Any]:
        journal_bytes, unsynced = self._journal_figures()
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
            "journal_bytes": journal_bytes,
            # At risk if this node were lost now: what the peer has not acknowledged (while
            # streaming) or everything written since the copies were identical (alone).
            "rpo_bytes": (lag.bytes if lag else 0) if self.streaming() else (
                journal_bytes if self.role == "primary" else 0),
            "unsynced_changes": unsynced,
            "receiving": self._receiving,
            "reintegration_pass": self._copy_pass,
            "reintegration_sent_bytes": self._copy_sent["bytes"],
            "reintegration_sent_ops": self._copy_sent["ops"],
            "reintegration_received_bytes": self._incoming.get("bytes", 0),
            "reintegration_elapsed_s": (0.0 if self._copy_started is None
                                        else time.monotonic() - self._copy_started),
            "last_reintegration_s": self._last_copy_s,
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
            nursery.start_soon(self._journal_keeper)
            self._started.set()
            await self._stop.wait()
            nursery.cancel_scope.cancel()
        # Stopped in order (unmounted: nothing can change any more) = a clean journal.
        self._write_journal(clean=self.role == "stopped")
        self._close_backing()

    # -- the journal -----------------------------------------------------------------------

    def _write_journal(self, *, clean: bool = False, must: bool = False) -> None:
        """Write the journal file now (blocking; the trio thread uses _keep_journal). `must`:
        raise when it cannot be written (a secondary about to change its copy)."""
        if self.s.journal_path is None:
            return
        self._store_journal(self._journal_state(clean), must=must)

    def _journal_state(self, clean: bool = False) -> tuple[int, dict[str, Any]]:
        with self._journal_lock:
            self._journal_version += 1
            return self._journal_version, self.journal.state(clean=clean)

    def _store_journal(self, versioned: tuple[int, dict[str, Any]], must: bool = False) -> None:
        """Writers of several threads: one at a time, and never an older state over a newer
        one (a secondary's "torn" must not be undone by a late periodic write)."""
        assert self.s.journal_path is not None
        version, state = versioned
        with self._journal_file_lock:
            if version <= self._journal_written:
                return
            try:
                write_state(self.s.journal_path, state)
            except OSError as e:
                log.error("cannot write the dirty-zone journal %s: %s", self.s.journal_path, e)
                self.journal.changed = True
                if must:
                    raise
                return
            self._journal_written = version

    async def _keep_journal(self) -> None:
        # The state is taken here, in the loop that changes the journal; only the writing
        # (fsync, rename) goes to a worker thread.
        if self.s.journal_path is None or not self.journal.changed:
            return
        await trio.to_thread.run_sync(self._store_journal, self._journal_state())

    async def _journal_keeper(self) -> None:
        """Rewrites the journal file when it changed; while streaming, sends SYNC barriers so
        that what the peer may lack (acknowledged is not yet on its disk) stays small. Never
        ends the replication loop: a failure here is logged and tried again next time."""
        last_barrier = time.monotonic()
        while True:
            await trio.sleep(JOURNAL_WRITE_S)
            try:
                sender = self.sender
                if (sender is not None and sender.broken is None and not self._barrier_running
                        and time.monotonic() - last_barrier >= BARRIER_S):
                    last_barrier = time.monotonic()
                    epoch = self.journal.rotate()
                    if epoch is not None:
                        assert self._nursery is not None
                        self._barrier_running = True
                        self._nursery.start_soon(self._barrier, sender, epoch)
                await self._keep_journal()
            except Exception:
                log.exception("dirty-zone journal upkeep failed")

    async def _barrier(self, sender: ReplicaSender, epoch: int) -> None:
        try:
            await sender.submit(Op(OpKind.SYNC, 0, ""))
            if self.sender is sender:
                self.journal.durable(epoch)
        except ReplicaBroken:
            pass  # on_broken spilled the epochs into the journal
        finally:
            self._barrier_running = False

    def _stop_now(self) -> None:
        assert self._stop is not None
        self._stop.set()

    def _open_backing(self) -> None:
        """Open every dir BEFORE anything is mounted over it (after, the path is the mount)."""
        for directory in self.s.dirs:
            detach_stale_mounts(directory)
            directory.mkdir(parents=True, exist_ok=True)
        self._backing_fds = [os.open(d, os.O_RDONLY | os.O_DIRECTORY) for d in self.s.dirs]
        self._applier = Applier(list(self.s.dirs), workers=self.s.nbrei)
        self._mounts = [
            _LocalMount(i, d, self._backing_fds[i]) if i == 0 and self.s.local_mount
            else _Mount(i, d) for i, d in enumerate(self.s.dirs)]
        if self.s.journal_path is not None:
            self.say(self.journal.load())
            self._write_journal()  # from now on a crash is seen as one

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
            root = info.get("root")
            if isinstance(root, int) and 0 <= root < len(self._mounts) and isinstance(
                    self._mounts[root], _Mount):
                mount = self._mounts[root]  # type: ignore[assignment]
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
            if self._sync_scope is not None:
                self._sync_abandoned = "this node is no longer primary"
                self._sync_scope.cancel()  # no copy goes on from a node that stops writing
            await self._drain_and_drop_sender()
        with self._journal_lock:
            self.journal.writing = role == "primary"
            self.journal.changed = True
        if role == "primary":
            # On disk before anything can be written: a crash from now on makes the changes
            # of the last seconds suspect (journal.load).
            await trio.to_thread.run_sync(self._write_journal)
        if role == "stopped":
            await self._unmount_all()
        else:
            await self._mount_all(read_only=role != "primary")
            if role == "secondary":
                await self._start_receiver()
        self.role = role  # only once the role is really in place

    async def _mount_all(self, read_only: bool) -> None:
        with trio.move_on_after(MOUNT_TIMEOUT_S) as scope:
            for m in self._mounts:
                await m.start(self, read_only)
            for m in self._mounts:
                await m.mounted.wait()
        if scope.cancelled_caught:
            raise ReplicationError("a replicated directory could not be mounted in "
                                   f"{MOUNT_TIMEOUT_S:g} s (see the daemon's output)")

    async def _unmount_all(self) -> None:
        for m in self._mounts:
            await m.stop()

    async def _start_receiver(self) -> None:
        assert self._nursery is not None and self._applier is not None
        ctx = tls.server_context(self.s.pki_dir, self.s.node)
        listener = await open_receiver_listener(self.s.listen_addr, self.s.port, ctx)
        self._done_roots = set()
        self.receiver = ReplicaReceiver(
            _MarkedApplier(self._applier, self._resync_marker, self._listing_header,
                           self._count_incoming),
            node=self.s.node,
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

    def _listing_header(self, root: int) -> dict[str, Any]:
        """Sent before this node's tree in the answer to LIST (applier thread)."""
        with self._journal_lock:
            summary = self.journal.summary()
        return {"journal": summary,
                "root": inventory.root_entry(self._backing_fds[root]).to_json()}

    def _resync_marker(self, op: Op) -> None:
        """Called in the applier's thread for RESET / REINT_BEGIN / RESYNC_DONE."""
        if op.kind in (OpKind.RESET, OpKind.REINT_BEGIN):
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
                # Remembered on disk before anything changes: a copy interrupted now must be
                # compared in full next time, whatever the journals say.
                with self._journal_lock:
                    self.journal.set_torn()
                self._write_journal(must=True)  # else no change: the copy stays trusted
                what = "full copy" if op.kind is OpKind.RESET else f"reintegration ({op.path2})"
                self._incoming = {"what": what, "bytes": 0}
                self._receiving = True
        elif op.kind is OpKind.RESYNC_DONE:
            self._done_roots.add(op.root)
            if len(self._done_roots) == len(self.s.dirs):
                took = time.monotonic() - self._resync_started
                with self._journal_lock:
                    self.journal.reset_identical()
                self._write_journal()
                what = self._incoming.get("what", "copy")
                mib = self._incoming.get("bytes", 0) / 1048576
                detail = f"{what} from {self.s.peer}: {mib:.1f} MiB of data in {took:.3f} s"
                self._receiving = False
                self.say(f"{detail}; this copy is now identical")
                self.post(cluster.ResyncDone(detail))

    def _count_incoming(self, op: Op) -> None:
        if op.kind is OpKind.WRITE and self._incoming:
            self._incoming["bytes"] += len(op.data)

    def _receiver_event(self, event: ReceiverEvent) -> None:
        match event:
            case PeerConnected(node=node):
                self.say(f"replication stream from {node} connected")
            case PeerDisconnected(node=node, reason=reason):
                self._receiving = False  # an unfinished copy is redone from its start
                if self._applier is not None:
                    self._applier.early_writeback = False
                self.say(f"replication stream from {node} ended: {reason}")
            case OpRefused(seq=seq, message=message):
                self.say(f"refused replicated op #{seq}: {message}")
            case ConnectionRefused(address=address, reason=reason):
                self.say(f"refused a replication connection from {address}: {reason}")

    # -- primary side ----------------------------------------------------------------------

    def _request_sync(self, mode: str, base: list[Any] | None) -> None:
        if self.role != "primary" or self.resyncing:
            return
        if self.sender is not None and self.sender.broken is None:
            if mode == "attach" or self._sender_from_copy:
                return
            self._drop_sender("the copies differ")  # an attached stream over a gap
        self._sender_from_copy = False
        assert self._nursery is not None
        self.resyncing = True
        if mode == "attach" and any(self.journal.all_dirt()):
            # Something changed since the copies were identical (a stream that broke with
            # ops in flight, writes since): a plain attach would leave that gap there.
            mode = "reintegrate"
        if mode == "attach":
            job, what = self._attach, "attaching the replication stream to"
        elif mode == "full":
            job, what = self._resync, "resync to"
        else:
            job, what = functools.partial(self._reintegrate, base), "reintegration of"
        self._nursery.start_soon(self._sync_task, what, job)

    async def _connect(self, ack_timeout_s: float | None = None) -> ReplicaSender:
        this: list[ReplicaSender] = []  # the sender, for its own on_broken
        sender = ReplicaSender(
            node=self.s.node, peer=self.s.peer, module=self.s.module, host=self.s.peer_addr,
            port=self.s.port, ssl_context=tls.client_context(self.s.pki_dir, self.s.node,
                                                              self.s.peer),
            ack_timeout_s=ack_timeout_s or self.s.ack_timeout_s,
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

    async def _sync_task(self, what: str, job: Callable[[], Awaitable[None]]) -> None:
        """Run an attach, resync or reintegration; when it fails, say why and have the daemon
        try again later (its peer may still be SECOND, waiting), less and less often. Leaving
        the primary role cancels it (_set_role)."""
        started = self._copy_started = time.monotonic()
        self._copy_sent = {"bytes": 0, "ops": 0}
        try:
            with trio.CancelScope() as scope:
                self._sync_scope = scope
                await job()
            if scope.cancelled_caught:  # (the job put back what it took from the journal)
                self.say(f"{what} {self.s.peer} abandoned: {self._sync_abandoned}")
                return
            self._retry_s, self._last_failure = RETRY_FIRST_S, ""
            self._last_copy_s = time.monotonic() - started
        except (ReplicaBroken, OSError, MirrorhaError) as e:
            self._failed(what, str(e))
        except Exception as e:  # a bug must not take the mounts down with the loop
            log.exception("%s %s failed", what, self.s.peer)
            self._failed(what, f"(internal error) {e!r}")
        finally:
            self._sync_scope = None
            self.resyncing = False
            self._copy_started, self._copy_pass = None, 0

    def _failed(self, what: str, why: str) -> None:
        message = f"{what} {self.s.peer} failed: {why}"
        delay = self._retry_s
        if message != self._last_failure:  # the same failure again is not news
            self.say(f"{message}; trying again in {delay:g} s")
        self._last_failure = message
        self._retry_s = min(delay * 2, RETRY_MAX_S)
        assert self._nursery is not None
        self._nursery.start_soon(self._retry_later, delay)

    async def _retry_later(self, delay: float) -> None:
        await trio.sleep(delay)
        self.post(SyncRetry())

    async def _attach(self) -> None:
        """Stream to a secondary whose copy is already identical (after a swap)."""
        try:
            await self._freeze(True)
            self.sender = await self._connect()
        finally:
            await self._freeze(False)
        self.say(f"replication stream to {self.s.peer} attached (copies identical)")

    async def _resync(self) -> None:
        started = time.monotonic()
        sender = await self._connect()
        try:
            await self._freeze(True)  # mutations wait before touching the disk
            self.journal.take()  # the copy sends everything recorded so far
            total = 0
            for i, fd in enumerate(self._backing_fds):
                stats = await full_copy(i, fd, self._counted(sender.submit))
                total += stats.bytes
            await sender.submit(Op(OpKind.SYNC, 0, ""))
            self.sender = sender  # live from the first mutation after the freeze
            self._sender_from_copy = True
            self.journal.commit()  # the SYNC above made the copy durable there
            for i in range(len(self._backing_fds)):  # the secondary may now say in sync
                await sender.submit(Op(OpKind.RESYNC_DONE, i, ""))
        except BaseException:
            self.journal.abort()
            if self.sender is not sender:
                await sender.aclose()
            raise
        finally:
            await self._freeze(False)
        self.counters["resyncs"] += 1
        self.counters["resync_bytes"] += total
        self.say(f"full resync to {self.s.peer}: {total} bytes of data in "
                 f"{time.monotonic() - started:.3f} s")

    async def _reintegrate(self, base: list[Any] | None) -> None:
        started = time.monotonic()
        stats = reintegrate.Stats()
        # Pass 1 runs while the application writes (journaled, it waits on nothing): a
        # secondary slowed down by checksum work or a loaded host may take seconds to
        # acknowledge, and failing the copy for that would only start it again, forever.
        # A dead peer is noticed by the heartbeats meanwhile (peer_gone cancels the copy).
        sender = await self._connect(copy_ack_timeout(self.s.ack_timeout_s))
        try:
            mode = await self._reintegration_passes(sender, base, stats)
        except BaseException:
            self.journal.abort()  # what was taken is still to be sent
            if self.sender is not sender:
                await sender.aclose()
            raise
        self.counters["reintegrations"] += 1
        self.counters["resync_bytes"] += stats.bytes
        took = time.monotonic() - started
        self.say(f"reintegration of {self.s.peer} ({mode} mode): "
                 f"{reintegrate.describe(stats, took)}; replicating synchronously")

    async def _reintegration_passes(self, sender: ReplicaSender, base: list[Any] | None,
                                    stats: reintegrate.Stats) -> str:
        """Pass 1 with the application writing (recorded meanwhile), pass 2 frozen for what
        changed during pass 1, then live. Returns the mode of pass 1."""
        peer = await self._peer_sides(sender)
        summary = peer[0][0]
        mode = "journal" if (
            base is not None and self.journal.valid and self.journal.base == base
            and summary.get("valid") is True and summary.get("torn") is False) else "checksum"
        why = ("both journals cover the gap" if mode == "journal" else
               "no journal covers the gap on both sides: every file both have is compared")
        self.say(f"reintegration of {self.s.peer} started ({mode} mode: {why})")
        await sender.submit(Op(OpKind.REINT_BEGIN, 0, "", path2=mode))
        first = self.journal.take()
        self._copy_pass = 1
        await self._pass(sender, peer, first.dirt, first.suspect_since, mode, stats)
        await sender.submit(Op(OpKind.SYNC, 0, ""))  # pass 1 on the peer's disk, slow or not
        # From the freeze on the application waits on the stream: the normal timeout again.
        sender.set_ack_timeout(self.s.ack_timeout_s)
        try:
            await self._freeze(True)
            self._copy_pass = 2
            # Both sides' suspects and zones were settled by pass 1; what the application
            # changed since is in the journal (nothing: pass 1 saw the final tree, done).
            second = self.journal.take()
            if any(second.dirt):
                again = [(h, reintegrate.Side(side.entries, side.root))
                         for h, side in await self._peer_sides(sender)]
                await self._pass(sender, again, second.dirt, None, "journal", stats)
            await sender.submit(Op(OpKind.SYNC, 0, ""))  # all of it on the peer's disk
            if self.role != "primary":
                raise ReplicationError("this node stopped being primary during the copy")
            self.journal.commit()
            self.sender = sender  # live from the first mutation after the freeze
            self._sender_from_copy = True
            for i in range(len(self._backing_fds)):  # the secondary may now say in sync
                await sender.submit(Op(OpKind.RESYNC_DONE, i, ""))
        finally:
            await self._freeze(False)
        return mode

    async def _peer_sides(self, sender: ReplicaSender
                          ) -> list[tuple[dict[str, Any], reintegrate.Side]]:
        """The secondary's tree of each dir (LIST) and its journal's summary."""
        out = []
        for i in range(len(self._backing_fds)):
            payload = await sender.query(Op(OpKind.LIST, i, ""))
            try:
                out.append(reintegrate.peer_side(payload, i))
            except ValueError as e:
                raise ReplicationError(f"{self.s.peer} described its copy badly: {e}") from None
        return out

    async def _pass(self, sender: ReplicaSender,
                    peer: list[tuple[dict[str, Any], reintegrate.Side]], dirt: list[Dirt],
                    suspect_since: float | None, mode: str, stats: reintegrate.Stats) -> None:
        for i, fd in enumerate(self._backing_fds):
            stats.add(await reintegrate.sync_pass(
                i, fd, peer[i][1], dirt[i], suspect_since, mode, self._counted(sender.submit),
                self._counted(sender.query), self.s.nbrei))

    def _counted(self, send: Callable[[Op], Awaitable[Any]]) -> Callable[[Op], Awaitable[Any]]:
        """`send` (a copy's submit or query) counting what the copy sends, for /metrics."""
        async def counted(op: Op) -> Any:
            self._copy_sent["ops"] += 1
            if op.kind is OpKind.WRITE:
                self._copy_sent["bytes"] += len(op.data)
            return await send(op)
        return counted

    async def _freeze(self, frozen: bool) -> None:
        for m in self._mounts:
            m.set_frozen(frozen)
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
        self.journal.spill()  # what the peer may lack: recorded before anything else runs
        self.post(cluster.ReplicationLost(reason))

    def _drop_sender(self, reason: str) -> None:
        sender, self.sender = self.sender, None
        self.journal.spill()
        if sender is not None and self._nursery is not None:
            self._nursery.start_soon(sender.aclose)

    async def _drain_and_drop_sender(self) -> None:
        """Leaving the primary role: everything sent is made durable on the secondary first,
        so that a swap hands over identical copies."""
        sender, self.sender = self.sender, None
        if sender is None:
            return
        drained = False
        if sender.broken is None:
            with trio.move_on_after(self.s.ack_timeout_s * 2):
                with contextlib.suppress(ReplicaBroken):
                    await sender.submit(Op(OpKind.SYNC, 0, ""))
                    drained = True
        if drained:
            self.journal.drained()
        else:
            self.journal.spill()
        await sender.aclose()

    async def submit(self, op: Op) -> None:
        """OpSink of the mount children."""
        started = time.perf_counter()
        try:
            await self._submit(op)
        finally:
            self.op_stats.waited(op, time.perf_counter() - started)

    async def submit_overlapped(self, op: Op, local: Callable[[], None]) -> None:
        """fusefs.OverlappingSink: a durable op and the local work that goes with it (starting
        the fsync of the same file), `local` called exactly once: when the op has left for
        the secondary, or at once when there is no stream."""
        pending = [local]

        def once() -> None:
            if pending:
                pending.pop()()

        started = time.perf_counter()
        try:
            await self._submit(op, once)
        finally:
            once()
            self.op_stats.waited(op, time.perf_counter() - started)

    async def _submit(self, op: Op, meanwhile: Callable[[], None] | None = None) -> None:
        if self.role != "primary":
            raise OSError(30, "read-only: this node is not the primary")  # EROFS
        # No live stream (alone, or a copy under way): the journal records the op; a durable
        # one succeeds only once the peer cannot take over believing it is in sync.
        sender = self.sender
        if sender is not None and sender.broken is None:
            self.journal.note(op)
            try:
                await sender.submit(op, meanwhile)
                self.op_stats.replicated(op)
                return
            except ReplicaBroken:
                self.journal.spill()  # on_broken told the engine; the app keeps running ALONE
            except ProtocolError:
                self.journal.record(op)  # done here, not sent there: the copies now differ
                raise
        else:
            self.journal.record(op)
        if op.durable:
            if meanwhile is not None:
                meanwhile()
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
    """The receiver's applier, noticing the resync markers as they are applied and answering
    LIST with the journal's summary first."""

    def __init__(self, applier: Applier, on_marker: Callable[[Op], None],
                 header: Callable[[int], dict[str, Any]],
                 on_op: Callable[[Op], None]) -> None:
        self._applier = applier
        self._on_marker = on_marker
        self._header = header
        self._on_op = on_op

    def apply(self, op: Op) -> None:
        if op.kind is OpKind.RESYNC_DONE:
            self._applier.sync()  # "in sync" only once the whole copy is on this disk
            self._applier.early_writeback = False
        if op.kind in (OpKind.RESET, OpKind.REINT_BEGIN):
            self._on_marker(op)  # before: the copy stops being trusted first
            self._applier.early_writeback = True
        self._applier.apply(op)
        self._on_op(op)
        if op.kind is OpKind.RESYNC_DONE:
            self._on_marker(op)

    def query(self, op: Op) -> bytes:
        if op.kind is OpKind.LIST:
            return self._applier.query(op, self._header(op.root))
        return self._applier.query(op)

    def fsync(self, root: int, path: str, datasync: bool) -> None:
        self._applier.fsync(root, path, datasync)

    def sync(self) -> None:
        self._applier.sync()


def settings_for(*, module: str, node: str, peer: str, dirs: Sequence[Path], listen_addr: str,
                 peer_addr: str, port: int, pki_dir: Path, control_socket: Path,
                 async_mode: str, ack_timeout_s: float, journal_path: Path | None = None,
                 nbrei: int = 3) -> ReplicationSettings:
    return ReplicationSettings(module, node, peer, tuple(dirs), listen_addr, peer_addr, port,
                               pki_dir, control_socket, async_mode, ack_timeout_s,
                               journal_path, nbrei)
