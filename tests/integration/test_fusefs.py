"""The FUSE over-mount against the real kernel: what applications do through it lands in the
backing dir, and the recorded ops, replayed by the Applier into an empty dir, rebuild the same
tree. Each test mounts in a tmp dir and unmounts even on failure.

Pitfall these tests respect: the mount is served by a thread of the pytest process, so nothing
in this process may touch mmap'ed pages of a file on the mount while holding the GIL (the page
fault would wait for the FUSE thread, which waits for the GIL). mmap is done by a child."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import queue
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from appliance.replication.applier import Applier
from appliance.replication.fusefs import (
    FSYNC_DATASYNC,
    MountChannel,
    MountError,
    ReplicatedFs,
    SocketSink,
    child_argv,
    detach_stale_mounts,
    is_mounted,
    mount_in_thread,
    prepare_backing,
)
from appliance.replication.protocol import Op, OpKind, SetattrField
from appliance.waiting import wait_until

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
                       reason="needs root and /dev/fuse"),
]

OTHER_UID, OTHER_GID = 4242, 4343


class RecordingSink:
    """OpSink that accepts everything and keeps the ops in order."""

    def __init__(self) -> None:
        self.ops: list[Op] = []

    async def submit(self, op: Op) -> None:
        self.ops.append(op)  # before any checkpoint, as the OpSink contract requires

    def kinds(self) -> list[OpKind]:
        return [op.kind for op in self.ops]


class FailingSink(RecordingSink):
    async def submit(self, op: Op) -> None:
        await super().submit(op)
        raise OSError(errno.ENOSPC, "peer disk full")


@dataclass
class Mounted:
    dir: Path
    sink: RecordingSink
    fs: ReplicatedFs
    backing_fd: int  # opened before mounting: sees the backing dir under the mount


@contextmanager
def mounted(directory: Path, sink: RecordingSink | None = None, read_only: bool = False,
            writeback_cache: bool = False) -> Iterator[Mounted]:
    with suppress(FileExistsError):  # exist_ok would stat it: ENOTCONN on a dead mount
        directory.mkdir()
    sink = sink if sink is not None else RecordingSink()
    fd = prepare_backing(directory)
    try:
        fs = ReplicatedFs(0, fd, sink, read_only, writeback_cache=writeback_cache)
        with mount_in_thread(directory, fs):
            yield Mounted(directory, sink, fs, fd)
    finally:
        os.close(fd)
        detach_stale_mounts(directory)  # only does something if unmounting failed
    assert not is_mounted(directory)


def run_as_other_user(*argv: str) -> None:
    subprocess.run(["setpriv", f"--reuid={OTHER_UID}", f"--regid={OTHER_GID}",
                    "--clear-groups", "--", *argv], check=True, timeout=10)


MMAP_WRITER = """
import mmap, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
m = mmap.mmap(fd, 0, mmap.MAP_SHARED)
m[5000:5012] = b"mmap-written"
m.flush()  # msync(MS_SYNC)
m.close()
os.close(fd)
"""

# -- comparing trees ----------------------------------------------------------------------------

CHUNK = 65536


def content_digest(path: Path) -> str:
    """Digest of the logical content (holes read as zeros), whatever the hole layout: only
    non-zero 64 KiB chunks count, found through SEEK_DATA so a 1 GiB sparse file is cheap."""
    digest = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        chunks: set[int] = set()
        pos = 0
        while pos < size:  # each round moves past one data segment
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    break
                raise
            end = os.lseek(fd, start, os.SEEK_HOLE)
            chunks.update(range(start // CHUNK, (end - 1) // CHUNK + 1))
            pos = end
        for chunk in sorted(chunks):
            data = os.pread(fd, CHUNK, chunk * CHUNK)
            if data.strip(b"\0"):
                digest.update(chunk.to_bytes(8, "big") + data)
    finally:
        os.close(fd)
    return f"{size}:{digest.hexdigest()}"


def tree(root: Path, content: bool = True) -> dict[str, tuple[Any, ...]]:
    """Everything compared between the primary's dir and the replayed copy, by relative path.
    Through the mount, `content=False`: pyfuse3 has no lseek, so SEEK_DATA sees a sparse file
    as all data and a 1 GiB hole would be read through FUSE."""
    result: dict[str, tuple[Any, ...]] = {}

    def visit(path: Path, rel: str) -> None:
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            what: Any = os.readlink(path)
        elif stat.S_ISREG(st.st_mode):
            what = content_digest(path) if content else st.st_size
        else:
            what = None
        result[rel] = (stat.filemode(st.st_mode), st.st_uid, st.st_gid, st.st_nlink,
                       st.st_mtime_ns, what)
        if stat.S_ISDIR(st.st_mode):
            for child in sorted(os.listdir(path)):
                visit(path / child, f"{rel}/{child}" if rel else child)

    visit(root, "")
    return result


def replay(ops: list[Op], into: Path) -> None:
    into.mkdir()
    with Applier([into]) as applier:
        for op in ops:
            applier.apply(op)


# -- what the application does lands in the backing dir, and replays identically ----------------


def application_workload(d: Path) -> None:
    """A bit of everything an application does to files, through the mount."""
    (d / "data").mkdir()
    (d / "data" / "a.txt").write_bytes(b"first version")
    (d / "data" / "a.txt").write_bytes(b"overwritten")  # O_TRUNC then write
    with open(d / "data" / "a.txt", "ab") as f:
        f.write(b" + appended")
    with open(d / "data" / "a.txt", "r+b") as f:
        f.write(b"OVER")  # in place, at offset 0
    (d / "big").write_bytes(os.urandom(3 * 1024 * 1024 + 7))  # several FUSE writes
    os.truncate(d / "big", 1024 * 1024 + 3)
    fd = os.open(d / "sparse", os.O_CREAT | os.O_WRONLY, 0o640)
    os.pwrite(fd, b"far away", 1 << 30)
    os.fsync(fd)
    os.close(fd)
    fd = os.open(d / "synced", os.O_CREAT | os.O_WRONLY | os.O_DSYNC, 0o600)
    os.write(fd, b"durable")
    os.close(fd)
    (d / "mapped").write_bytes(b"." * 8192)
    subprocess.run([sys.executable, "-c", MMAP_WRITER, str(d / "mapped")], check=True,
                   timeout=10)
    (d / "gone").mkdir()
    (d / "gone" / "x").write_bytes(b"x")
    os.unlink(d / "gone" / "x")
    os.rmdir(d / "gone")
    (d / "old").write_bytes(b"old content")
    (d / "new").write_bytes(b"replaced by rename")
    os.rename(d / "old", d / "new")  # over an existing file
    os.rename(d / "data", d / "moved")  # a directory, with its content
    os.link(d / "moved" / "a.txt", d / "hardlink")
    os.symlink("moved/a.txt", d / "symlink")
    os.symlink("/etc/passwd", d / "moved" / "outside")  # stored verbatim, never followed
    os.chmod(d / "big", 0o600)
    os.chown(d / "big", OTHER_UID, OTHER_GID)
    os.utime(d / "new", ns=(1_000_000_123, 2_000_000_456))
    os.chown(d / "symlink", OTHER_UID, OTHER_GID, follow_symlinks=False)
    dfd = os.open(d / "moved", os.O_RDONLY | os.O_DIRECTORY)
    os.fsync(dfd)
    os.close(dfd)
    (d / "left").write_bytes(b"was left")
    (d / "right").mkdir()
    rename_exchange(d / "left", d / "right")
    os.mkfifo(d / "fifo")
    os.chmod(d / "fifo", 0o620)  # setattr by path: a fifo is never opened
    (d / "many").mkdir()
    for i in range(300):  # more entries than one readdir reply holds
        (d / "many" / f"entry-with-a-fairly-long-name-{i:04d}").write_bytes(b"")
    assert len(os.listdir(d / "many")) == 300
    assert os.statvfs(d).f_bsize > 0


def rename_exchange(a: Path, b: Path) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd, rename_exchange_flag = -100, 2
    if libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b),
                      rename_exchange_flag) != 0:
        raise OSError(ctypes.get_errno(), "renameat2")


@pytest.mark.parametrize("writeback_cache", [False, True], ids=["write-through", "writeback"])
def test_application_changes_reach_backing_dir_and_replay_to_an_identical_tree(
        tmp_path: Path, writeback_cache: bool) -> None:
    primary = tmp_path / "primary"
    with mounted(primary, writeback_cache=writeback_cache) as m:
        application_workload(primary)
        seen_through_mount = tree(primary, content=False)
        # The backing dir, read through the fd opened before mounting, has the data.
        fd = os.open("moved/a.txt", os.O_RDONLY, dir_fd=m.backing_fd)
        assert os.read(fd, 100) == b"OVERwritten + appended"
        os.close(fd)
        ops = list(m.sink.ops)

    on_disk = tree(primary)
    if not writeback_cache:  # there the kernel keeps its own mtimes (see report)
        assert tree(primary, content=False) == seen_through_mount
    assert on_disk["new"][-1] == content_digest_of(b"old content")
    assert on_disk["hardlink"][3] == 2
    assert on_disk["symlink"][-1] == "moved/a.txt"
    assert on_disk["big"][:3] == ("-rw-------", OTHER_UID, OTHER_GID)
    assert on_disk["new"][4] == 2_000_000_456
    assert "gone" not in on_disk and "old" not in on_disk
    assert on_disk["left"][0].startswith("d") and on_disk["right"][0].startswith("-")
    assert on_disk["fifo"][0] == "prw--w----"
    with open(primary / "mapped", "rb") as f:
        assert f.read()[5000:5012] == b"mmap-written"
    assert os.stat(primary / "sparse").st_size == (1 << 30) + 8

    replica = tmp_path / "replica"
    replay(ops, replica)
    assert tree(replica) == on_disk


def content_digest_of(data: bytes) -> str:
    digest = hashlib.sha256()
    if data.strip(b"\0"):
        digest.update((0).to_bytes(8, "big") + data)
    return f"{len(data)}:{digest.hexdigest()}"


def test_ops_say_exactly_what_happened(tmp_path: Path) -> None:
    d = tmp_path / "dir"
    with mounted(d) as m:
        fd = os.open(d / "log", os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o644)
        os.write(fd, b"one\n")
        os.write(fd, b"two\n")
        os.fdatasync(fd)
        os.close(fd)
        fd = os.open(d / "log", os.O_WRONLY | os.O_SYNC)
        os.pwrite(fd, b"ONE", 0)
        os.close(fd)
        fd = os.open(d / "sparse", os.O_CREAT | os.O_WRONLY, 0o600)
        os.pwrite(fd, b"z", 1 << 30)
        os.close(fd)

    data_ops = [(op.kind, op.path, op.offset, op.data, op.flags) for op in m.sink.ops
                if op.kind in (OpKind.WRITE, OpKind.FSYNC)]
    assert data_ops == [
        (OpKind.WRITE, "log", 0, b"one\n", 0),
        (OpKind.WRITE, "log", 4, b"two\n", 0),  # O_APPEND: the real offset, not 0
        (OpKind.FSYNC, "log", 0, b"", FSYNC_DATASYNC),
        (OpKind.WRITE, "log", 0, b"ONE", 0),
        (OpKind.FSYNC, "log", 0, b"", 0),  # O_SYNC: the kernel asks for a full fsync
        (OpKind.WRITE, "sparse", 1 << 30, b"z", 0),  # only the byte written crosses
    ]
    create = next(op for op in m.sink.ops if op.kind == OpKind.CREATE)
    assert (create.path, create.mode, create.uid, create.gid) == ("log", 0o644, 0, 0)


@pytest.fixture
def public_tmp() -> Iterator[Path]:
    """A tmp dir other users can traverse (pytest's tmp_path lives under a 0700 dir)."""
    path = Path(tempfile.mkdtemp(prefix="mirrorha-fusefs-"))
    try:
        path.chmod(0o755)
        yield path
    finally:
        shutil.rmtree(path)


def test_new_files_belong_to_the_calling_process(public_tmp: Path) -> None:
    tmp_path = public_tmp
    d = tmp_path / "dir"
    with mounted(d) as m:
        (d / "shared").mkdir()
        os.chmod(d / "shared", 0o777)
        run_as_other_user("touch", str(d / "shared" / "mine"))
        run_as_other_user("mkdir", str(d / "shared" / "mydir"))
        (d / "team").mkdir()
        os.chown(d / "team", 0, OTHER_GID)
        os.chmod(d / "team", 0o2775)  # set-group-id: new entries get the directory's group
        (d / "team" / "file").write_bytes(b"")
        (d / "team" / "sub").mkdir()
        assert os.stat(d / "shared" / "mine")[4:6] == (OTHER_UID, OTHER_GID)
        assert os.stat(d / "shared" / "mydir")[4:6] == (OTHER_UID, OTHER_GID)
        assert os.stat(d / "team" / "file").st_gid == OTHER_GID
        sub = os.stat(d / "team" / "sub")
        assert sub.st_gid == OTHER_GID and sub.st_mode & stat.S_ISGID
    created = {op.path: (op.uid, op.gid) for op in m.sink.ops
               if op.kind in (OpKind.CREATE, OpKind.MKDIR)}
    assert created["shared/mine"] == (OTHER_UID, OTHER_GID)
    assert created["team/sub"] == (0, OTHER_GID)
    replay(m.sink.ops, tmp_path / "replica")
    assert tree(tmp_path / "replica") == tree(d)


def test_a_failed_local_change_replicates_nothing(tmp_path: Path) -> None:
    d = tmp_path / "dir"
    with mounted(d) as m:
        (d / "full").mkdir()
        (d / "full" / "f").write_bytes(b"")
        before = len(m.sink.ops)
        with pytest.raises(OSError) as e:
            os.rmdir(d / "full")
        assert e.value.errno == errno.ENOTEMPTY
        (d / "empty").mkdir()
        before = len(m.sink.ops)
        with pytest.raises(OSError) as e:
            os.rename(d / "empty", d / "full")  # only the backing filesystem can refuse it
        assert e.value.errno == errno.ENOTEMPTY
        assert m.sink.ops[before:] == []


def test_a_refused_op_fails_the_application_call(tmp_path: Path) -> None:
    d = tmp_path / "dir"
    with mounted(d, FailingSink()) as m:
        with pytest.raises(OSError) as e:
            os.mkdir(d / "sub")
        assert e.value.errno == errno.ENOSPC
        assert m.sink.kinds()[0] == OpKind.MKDIR
        # The local change happened before the sink refused (see report: question for lead).
        assert stat.S_ISDIR(os.stat("sub", dir_fd=m.backing_fd).st_mode)


def test_read_only_mount_refuses_every_change_but_shows_the_appliers_writes(
        tmp_path: Path) -> None:
    d = tmp_path / "dir"
    d.mkdir()
    (d / "file").write_bytes(b"replicated")
    (d / "sub").mkdir()
    with mounted(d, read_only=True) as m:
        assert (d / "file").read_bytes() == b"replicated"
        assert sorted(os.listdir(d)) == ["file", "sub"]
        refused: list[Callable[[], object]] = [
            lambda: os.close(os.open(d / "file", os.O_RDWR)),
            lambda: os.close(os.open(d / "new", os.O_CREAT | os.O_WRONLY, 0o644)),
            lambda: os.truncate(d / "file", 0),
            lambda: os.mkdir(d / "dir2"),
            lambda: os.rmdir(d / "sub"),
            lambda: os.unlink(d / "file"),
            lambda: os.rename(d / "file", d / "renamed"),
            lambda: os.link(d / "file", d / "link"),
            lambda: os.symlink("file", d / "symlink"),
            lambda: os.chmod(d / "file", 0o600),
            lambda: os.chown(d / "file", OTHER_UID, -1),
            lambda: os.utime(d / "file", ns=(1, 1)),
            lambda: os.mkfifo(d / "fifo"),
        ]
        for change in refused:
            with pytest.raises(OSError) as e:
                change()
            assert e.value.errno == errno.EROFS
        assert m.sink.ops == []

        # The secondary's Applier writes to the backing dir behind the kernel: no stale cache.
        fd = os.open("file", os.O_WRONLY | os.O_TRUNC, dir_fd=m.backing_fd)
        os.write(fd, b"changed by the applier")
        os.close(fd)
        os.rename("sub", "sub2", src_dir_fd=m.backing_fd, dst_dir_fd=m.backing_fd)
        assert (d / "file").read_bytes() == b"changed by the applier"
        assert sorted(os.listdir(d)) == ["file", "sub2"]

        m.fs.set_read_only(False)  # failover: this node becomes primary
        (d / "sub2" / "after").write_bytes(b"written as primary")
        assert [op.path for op in m.sink.ops if op.kind == OpKind.WRITE] == ["sub2/after"]


def test_an_inode_known_only_by_number_is_found_by_searching_the_tree(tmp_path: Path) -> None:
    """After read-only (the Applier renamed things behind the kernel) an open file's name is
    unknown to the table: a change through its fd must still name the right path."""
    d = tmp_path / "dir"
    d.mkdir()
    (d / "deep").mkdir()
    (d / "deep" / "x").write_bytes(b"content")
    with mounted(d, read_only=True) as m, open(d / "deep" / "x", "rb") as f:
        os.rename("deep", "renamed", src_dir_fd=m.backing_fd, dst_dir_fd=m.backing_fd)
        m.fs.set_read_only(False)
        os.chmod(f.fileno(), 0o640)  # setattr on the inode, no lookup of any name
        assert [(op.kind, op.path) for op in m.sink.ops] == [(OpKind.SETATTR, "renamed/x")]
        assert stat.S_IMODE(os.stat("renamed/x", dir_fd=m.backing_fd).st_mode) == 0o640


def test_only_one_mount_per_process(tmp_path: Path) -> None:
    with mounted(tmp_path / "one"):
        fd = prepare_backing(tmp_path)
        try:
            with (pytest.raises(MountError, match="one per process"),
                  mount_in_thread(tmp_path / "one", ReplicatedFs(1, fd, None, False))):
                pass
        finally:
            os.close(fd)


# -- mount children: crash recovery and the control socket --------------------------------------


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    try:
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)


def test_dead_mount_of_a_killed_server_is_detached_and_mounted_again(
        tmp_path: Path, children: list[subprocess.Popen[bytes]]) -> None:
    d = tmp_path / "dir"
    d.mkdir()
    try:
        child = subprocess.Popen(child_argv(0, d))
        children.append(child)
        wait_until(lambda: is_mounted(d), 10, "the child's mount")
        (d / "before-crash").write_bytes(b"kept")
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
        with pytest.raises(OSError) as e:
            os.stat(d / "before-crash")
        assert e.value.errno == errno.ENOTCONN
        assert is_mounted(d)  # the dead mount is still there

        with mounted(d) as m:
            assert (d / "before-crash").read_bytes() == b"kept"
            (d / "after-restart").write_bytes(b"new")
            assert m.sink.kinds()[0] == OpKind.CREATE
    finally:
        detach_stale_mounts(d)


@dataclass
class ControlServer:
    """The daemon's side of a mount child's control socket, on a trio loop in a thread."""

    path: Path
    sink: RecordingSink = field(default_factory=RecordingSink)
    hellos: queue.Queue[dict[str, Any]] = field(default_factory=queue.Queue)
    channel: MountChannel | None = None
    token: trio.lowlevel.TrioToken | None = None

    async def serve(self, ready: threading.Event) -> None:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.bind(str(self.path))
        sock.listen(1)
        self.token = trio.lowlevel.current_trio_token()
        ready.set()
        with trio.move_on_after(30):
            stream = await trio.SocketListener(sock).accept()
            self.channel = MountChannel(stream, self.sink)
            await self.channel.run(on_hello=self.hellos.put)

    def set_read_only(self, read_only: bool) -> None:
        assert self.channel is not None and self.token is not None
        trio.from_thread.run_sync(self.channel.set_read_only, read_only, trio_token=self.token)


def test_mount_child_forwards_ops_over_the_control_socket(
        tmp_path: Path, children: list[subprocess.Popen[bytes]]) -> None:
    d = tmp_path / "dir"
    d.mkdir()
    server = ControlServer(tmp_path / "control.sock")
    ready = threading.Event()
    loop = threading.Thread(target=trio.run, args=(server.serve, ready), daemon=True)
    loop.start()
    try:
        assert ready.wait(10)
        child = subprocess.Popen(child_argv(3, d, server.path))
        children.append(child)
        assert server.hellos.get(timeout=10)["root"] == 3
        assert server.hellos.get(timeout=10) == {"event": "mounted"}

        fd = os.open(d / "f", os.O_CREAT | os.O_WRONLY, 0o644)
        os.write(fd, b"through the daemon")
        os.fsync(fd)
        os.close(fd)
        assert server.sink.kinds() == [OpKind.CREATE, OpKind.SETATTR, OpKind.WRITE,
                                       OpKind.SETATTR, OpKind.FSYNC]
        assert all(op.root == 3 for op in server.sink.ops)

        server.set_read_only(True)
        wait_until(lambda: _is_refused(d / "g"), 5, "the child to turn read-only")

        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=10) == 0
        assert not is_mounted(d)
    finally:
        detach_stale_mounts(d)
        loop.join(timeout=1)


def _is_refused(path: Path) -> bool:
    try:
        path.write_bytes(b"")
    except OSError as e:
        return e.errno == errno.EROFS
    return False


def test_setattr_ops_carry_the_applied_values(tmp_path: Path) -> None:
    d = tmp_path / "dir"
    with mounted(d) as m:
        (d / "f").write_bytes(b"x")
        os.chmod(d / "f", 0o4750)
        os.utime(d / "f", ns=(5, 6))
    setattrs = [(op.path, op.flags, op.mode, op.atime_ns, op.mtime_ns) for op in m.sink.ops
                if op.kind == OpKind.SETATTR and op.path == "f"]
    assert (("f", SetattrField.MODE, 0o4750, -1, -1) in setattrs)
    assert setattrs[-1] == ("f", SetattrField.ATIME | SetattrField.MTIME, 0, 5, 6)


class RefuseWrites(RecordingSink):
    async def submit(self, op: Op) -> None:
        await super().submit(op)
        if op.kind == OpKind.WRITE:
            raise OSError(errno.ENOSPC, "peer disk full")


def test_child_pipelines_writes_and_reports_a_refused_one_at_the_next_fsync() -> None:
    daemon_sink = RefuseWrites()

    async def scenario() -> None:
        child_end, daemon_end = trio.testing.memory_stream_pair()
        child_sink = SocketSink(child_end)
        with trio.fail_after(5):
            await pipeline(child_sink, daemon_end)

    async def pipeline(child_sink: SocketSink, daemon_end: trio.abc.Stream) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(child_sink.run)
            nursery.start_soon(MountChannel(daemon_end, daemon_sink).run)
            await child_sink.submit(Op(OpKind.CREATE, 0, "f"))
            await child_sink.submit(Op(OpKind.WRITE, 0, "f", data=b"lost"))  # returns at once
            with pytest.raises(OSError) as e:
                await child_sink.submit(Op(OpKind.FSYNC, 0, "f"))
            assert e.value.errno == errno.ENOSPC  # the durable ack must not cover the write
            await child_sink.submit(Op(OpKind.FSYNC, 0, "f"))  # reported once, like fsync
            nursery.cancel_scope.cancel()

    trio.run(scenario)
    assert daemon_sink.kinds() == [OpKind.CREATE, OpKind.WRITE, OpKind.FSYNC, OpKind.FSYNC]
