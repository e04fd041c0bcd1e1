"""The FUSE over-mount of a replicated directory: a passthrough that turns mutations into `Op`s.

Each replicated dir is opened (directory fd) BEFORE a pyfuse3 filesystem is mounted over the
same path; applications keep using the normal path, and every backing access goes through that
fd with `*at()` calls (touching the mount point from the process serving it would deadlock).
A mutation is applied locally first; if that fails the errno goes back to the application and
nothing is replicated. Otherwise the op (path relative to the dir, root index) is handed to the
`OpSink` and the kernel gets its reply only when `sink.submit` returns.

Ordering. The secondary must see ops in the order they happened here. pyfuse3 runs handlers
concurrently in one trio loop, so each handler does "local change, then `sink.submit(op)`"
without a checkpoint in between, and `submit` must take the op's place in the stream before its
own first checkpoint (ReplicaSender does: its FIFO admission lock is taken synchronously when
free). Handlers that emit several ops for one request (a namespace change also sets the parent
directories' mtime) hold `_ns_lock`, so two such groups never interleave.

Timestamps. The secondary's own clock would give its copies other mtimes, so the primary sends
them: after a namespace change, SETATTR(MTIME) of the parent dir(s) and of a new dir, node or
symlink; a setattr that changes the size sends the new mtime with its TRUNCATE; after WRITEs
(and CREATE, O_TRUNC) the file is marked and one SETATTR(MTIME) is sent at the next flush
(close), fsync or release rather than one per write — not at fdatasync (nor after a write on
an O_DSYNC file), which POSIX lets leave the mtime for later: a database commit is then two
ops, not three. Ctime cannot be set on Linux and atime is
not replicated (reads change it). With `writeback_cache` the kernel keeps its own mtimes
(stat through the mount may differ from the backing file by the time of the page writeback);
the secondary still matches the backing dir.

Durability. fsync/fdatasync and fsyncdir do the local fsync while the FSYNC op travels: the
call returns when both are done. A short local fsync is done inline once the op is on its way,
a long one (or one with a sink that needs the loop to send) in a worker thread (_fsync_both).
O_SYNC/O_DSYNC opens need nothing more: the kernel itself sends FUSE_FSYNC (datasync matching
the flag) after each write on such a file.

Process model. pyfuse3 keeps its session in module globals: ONE mount per process. The daemon
therefore runs each replicated dir's mount in a child process
(`python -m appliance.replication.fusefs --root-index N --dir PATH --control SOCKET`) whose
`SocketSink` forwards ops over a unix socket to the daemon, where `MountChannel` hands them to
the real sink in the same order and answers each one. Like the sender, the child pipelines
ordinary ops under a byte window and waits only for durable ones (measured: ~25 µs per ordinary
op, ~0.2 ms per durable round trip). A durable op and its answer are written to the socket at
once (no task switch); ordinary ones and their answers leave in batches (_FrameWriter).
`mount_in_thread` runs a mount in a thread of the calling process (tests, tools); nothing in
that process may then touch mmap'ed pages of a file on the mount while holding the GIL (the
page fault waits for the FUSE thread, which waits for the GIL).

Not available in pyfuse3 3.5: fallocate (applications get EOPNOTSUPP; glibc's posix_fallocate
falls back to writing zeros, which replicates as WRITEs), copy_file_range, lseek(SEEK_DATA),
O_TMPFILE. Extended attributes and ACLs are refused (EOPNOTSUPP): they are not replicated.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import errno
import functools
import itertools
import logging
import os
import re
import signal
import stat
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

import pyfuse3
import trio
from pyfuse3 import FUSEError

from appliance.errors import MirrorhaError
from appliance.replication.applier import ASIDE_DIR
from appliance.replication.protocol import (
    NO_ID,
    Ack,
    Hello,
    Nack,
    Op,
    OpKind,
    ProtocolError,
    SetattrField,
    decode,
    encode,
    encode_op_parts,
    frame_length,
)
from appliance.replication.workers import (
    idle_worker,
    in_worker,
    keep_large_buffers,
    worker_result,
)

log = logging.getLogger(__name__)

FSNAME = "mirrorha"  # shows as source "mirrorha", type "fuse.mirrorha" in /proc/self/mountinfo
ROOT = pyfuse3.ROOT_INODE
# A local fsync after at most this many bytes written through us is done inline (see
# ReplicatedFs._fsync_both); a longer one in a worker thread.
INLINE_SYNC_BYTES = 256 * 1024
RW_CACHE_TIMEOUT = 1.0  # s the kernel may cache names and attributes on the primary
# On the secondary the Applier changes the backing dir behind the kernel's back: no caching.
RO_CACHE_TIMEOUT = 0.0
FSYNC_DATASYNC = 1  # Op.flags of FSYNC
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
_PERMS = 0o7777
_MAX_DEPTH = 2048  # a relative path of at most 4096 bytes has at most this many components
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# Flags the backing open must not get: the kernel already computed append offsets and did the
# O_CREAT/O_EXCL checks, and O_DIRECT would need aligned buffers we do not have.
_STRIP = os.O_APPEND | os.O_DIRECT | os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_TRUNC
_XATTR_REFUSED = errno.ENOSYS  # kernel remembers it and answers EOPNOTSUPP without asking


class MountError(MirrorhaError):
    """A FUSE mount could not be set up or served."""


class OpSink(Protocol):
    async def submit(self, op: Op) -> None:
        """Returns when `op` may be acknowledged to the application: for a durable op after the
        secondary's durable ack, for others once accepted into the pipeline window. Must take
        the op's place in the stream before its first checkpoint (see module docstring).
        Raises OSError(errno) when the application's call must fail."""
        ...


@runtime_checkable
class OverlappingSink(OpSink, Protocol):
    async def submit_overlapped(self, op: Op, local: Callable[[], None]) -> None:
        """submit(op) for a durable op, calling `local` exactly once: when the op has left
        for the secondary (or at once when it will not), so that both disks work at once."""
        ...


# -- the filesystem -----------------------------------------------------------------------------


@dataclass(eq=False)
class _Node:
    """An inode the kernel knows (lookup count > 0): its names, as (parent inode, name)."""

    is_dir: bool
    links: set[tuple[int, bytes]] = field(default_factory=set)
    lookups: int = 0
    generation: int = 0  # bumped when its last name goes: the backing inode may be reused
    unlinked: bool = False  # we removed its last name: nothing to replicate for it any more
    fds: set[int] = field(default_factory=set)  # open backing fds (fstat works after unlink)
    mtime_dirty: bool = False  # data changed since the secondary last got its mtime
    unsynced: int = 0  # bytes written through us since its last fsync began (a latency hint)


@dataclass(eq=False)
class _File:
    fd: int
    ino: int


@dataclass(eq=False)
class _Dir:
    fd: int
    ino: int
    names: list[bytes] | None = None  # snapshot taken when a listing starts at offset 0


F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def _errors_to_errno(handler: F) -> F:
    """Only FUSEError may leave a handler (anything else ends pyfuse3's main loop, i.e. kills the
    mount under the application): OSError becomes its errno, a bug becomes EIO and a log."""

    @functools.wraps(handler)
    async def wrapper(*args: Any) -> Any:
        try:
            return await handler(*args)
        except FUSEError:
            raise
        except OSError as e:
            raise FUSEError(e.errno or errno.EIO) from None
        except Exception:
            log.exception("FUSE %s failed", handler.__name__)
            raise FUSEError(errno.EIO) from None

    return wrapper  # type: ignore[return-value]


def _join(parent: bytes, name: bytes) -> bytes:
    return parent + b"/" + name if parent else name


def _local(path: bytes) -> bytes:
    """The relative path for a dir_fd= call ("" is the replicated dir itself)."""
    return path or b"."


_ASIDE = os.fsencode(ASIDE_DIR)


class ReplicatedFs(pyfuse3.Operations):
    """Passthrough of one replicated dir (`backing_fd`, opened before the mount, owned by the
    caller). `sink` None: nothing is replicated. `read_only`: every mutation fails with EROFS
    (the secondary's mount; its Applier writes to the backing dir through its own fd)."""

    def __init__(self, root_index: int, backing_fd: int, sink: OpSink | None, read_only: bool,
                 *, writeback_cache: bool = False) -> None:
        super().__init__()
        st = os.fstat(backing_fd)
        if not stat.S_ISDIR(st.st_mode):
            raise MountError(f"backing fd {backing_fd} is not a directory")
        self.root_index = root_index
        self.enable_writeback_cache = writeback_cache
        self._root = backing_fd
        self._root_ino = st.st_ino
        self._root_dev = st.st_dev
        self._sink = sink
        # A runtime Protocol check costs about 10 us: once, not per fsync.
        self._overlapping = sink if isinstance(sink, OverlappingSink) else None
        self._read_only = read_only
        self._nodes: dict[int, _Node] = {ROOT: _Node(is_dir=True, lookups=1)}
        self._files: dict[int, _File] = {}
        self._dirs: dict[int, _Dir] = {}
        self._ns_lock = trio.Lock()
        # Freeze (full resync): mutations wait before touching the disk; once those already
        # running have finished, `on_frozen` is called so the copy can start.
        self._frozen = False
        self._thaw = trio.Event()
        self._thaw.set()
        self._mutating = 0
        self.on_frozen: Callable[[], None] | None = None
        self._thread_syncs = 0  # local fsyncs running in worker threads

    # -- mode -----------------------------------------------------------------------------------

    @property
    def read_only(self) -> bool:
        return self._read_only

    def set_read_only(self, read_only: bool) -> None:
        """Switch between secondary (EROFS) and primary. Coming from read-only, the Applier may
        have renamed anything: forget every name so paths are learnt again from the kernel's
        lookups (or, for an inode known only by number, by a search of the tree)."""
        if self._read_only and not read_only:
            for ino, node in self._nodes.items():
                if ino != ROOT:
                    node.links.clear()
                    node.unlinked = False
        self._read_only = read_only

    def set_frozen(self, frozen: bool) -> None:
        self._frozen = frozen
        if frozen:
            self._thaw = trio.Event()
            self._report_if_drained()
        else:
            self._thaw.set()

    async def _enter_mutation(self) -> None:
        while self._frozen:
            await self._thaw.wait()
        self._mutating += 1

    def _leave_mutation(self) -> None:
        self._mutating -= 1
        self._report_if_drained()

    def _report_if_drained(self) -> None:
        if self._frozen and self._mutating == 0 and self.on_frozen is not None:
            self.on_frozen()

    def _check_writable(self) -> None:
        if self._read_only:
            raise FUSEError(errno.EROFS)

    @property
    def _timeout(self) -> float:
        return RO_CACHE_TIMEOUT if self._read_only else RW_CACHE_TIMEOUT

    # -- inode table ----------------------------------------------------------------------------

    def _ino(self, st: os.stat_result) -> int:
        """The FUSE inode of a backing stat: its st_ino (stable across remounts), with the
        replicated dir and inode 1 swapped so the root is ROOT_INODE."""
        if st.st_dev != self._root_dev:
            raise FUSEError(errno.EXDEV)  # a mount inside the replicated dir: not supported
        if st.st_ino == self._root_ino:
            return ROOT
        if st.st_ino == ROOT:
            return self._root_ino
        return st.st_ino

    def _attrs(self, ino: int, st: os.stat_result, generation: int = 0) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = ino  # type: ignore[assignment]
        e.generation = generation
        e.st_mode = st.st_mode  # type: ignore[assignment]
        e.st_nlink = st.st_nlink
        e.st_uid = st.st_uid
        e.st_gid = st.st_gid
        e.st_rdev = st.st_rdev
        e.st_size = st.st_size
        e.st_blksize = st.st_blksize
        e.st_blocks = st.st_blocks
        e.st_atime_ns = st.st_atime_ns
        e.st_mtime_ns = st.st_mtime_ns
        e.st_ctime_ns = st.st_ctime_ns
        e.attr_timeout = e.entry_timeout = self._timeout
        return e

    def _entry(self, parent: int, name: bytes, st: os.stat_result) -> tuple[int, _Node]:
        """The node `name` in `parent` now designates (created or refreshed), without counting a
        lookup yet."""
        ino = self._ino(st)
        is_dir = stat.S_ISDIR(st.st_mode)
        node = self._nodes.get(ino)
        if node is None:
            node = self._nodes[ino] = _Node(is_dir=is_dir)
        elif node.unlinked or node.is_dir != is_dir:
            # The backing inode number was reused while the kernel still knew the old inode:
            # a new generation makes the kernel drop the old one instead of mixing them.
            if not node.unlinked:
                node.generation += 1
            node.unlinked = False
            node.is_dir = is_dir
            node.links.clear()
        if is_dir:
            node.links = {(parent, name)}  # a directory has exactly one name
        else:
            node.links.add((parent, name))
        return ino, node

    def _remember(self, parent: int, name: bytes, st: os.stat_result) -> pyfuse3.EntryAttributes:
        """Record a name the kernel is told about and count the lookup it implies."""
        ino, node = self._entry(parent, name, st)
        node.lookups += 1
        return self._attrs(ino, st, node.generation)

    def _node(self, ino: int) -> _Node:
        node = self._nodes.get(ino)
        if node is None:
            raise FUSEError(errno.ESTALE)
        return node

    def _known_path(self, ino: int, depth: int = 0) -> bytes | None:
        """A current name of `ino` from the table (None when no chain of names reaches the
        root). Trusted while read-write: every namespace change goes through this process."""
        if ino == ROOT:
            return b""
        node = self._nodes.get(ino)
        if node is None or depth > _MAX_DEPTH:
            return None
        for parent, name in list(node.links):
            parent_path = self._known_path(parent, depth + 1)
            if parent_path is not None:
                return _join(parent_path, name)
            node.links.discard((parent, name))  # its directory was forgotten by the kernel
        return None

    async def _path(self, ino: int) -> bytes:
        """The path of `ino`, searching the tree when the table lost it (raises ESTALE)."""
        path = self._known_path(ino)
        if path is None:
            path = await self._search(ino)
        return path

    async def _op_path(self, ino: int) -> bytes | None:
        """The path to name in an op about `ino`; None when nothing must be replicated (no sink,
        or the file has no name any more: its data is unreachable on both nodes)."""
        if self._sink is None:
            return None
        node = self._node(ino)
        if node.unlinked:
            return None
        return await self._path(ino)

    async def _search(self, ino: int) -> bytes:
        """Find a name of `ino` by walking the backing tree (rare: an inode known only by
        number, e.g. one name of a hard-linked open file was removed, or after read-only)."""
        self._node(ino)
        path = await trio.to_thread.run_sync(self._walk_for, ino)
        if path is None:
            raise FUSEError(errno.ESTALE)
        parent = ROOT
        prefix = b""
        for name in path.split(b"/"):  # learn every component, so the next call is cheap
            prefix = _join(prefix, name)
            parent, _ = self._entry(parent, name, os.stat(prefix, dir_fd=self._root,
                                                          follow_symlinks=False))
        return path

    def _walk_for(self, ino: int) -> bytes | None:
        # Runs in a worker thread: reads nothing but the backing tree.
        for top, dirs, files, dir_fd in os.fwalk(b".", dir_fd=self._root):
            for name in dirs + files:
                try:
                    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                except OSError:
                    continue
                if st.st_dev == self._root_dev and self._ino(st) == ino:
                    return _join(top[2:], name)  # top is b"." or b"./a/b"
        return None

    def _stat_ino(self, ino: int) -> os.stat_result:
        """Current attributes of `ino`; names that no longer designate it are dropped."""
        if ino == ROOT:
            return os.fstat(self._root)
        node = self._node(ino)
        for fd in node.fds:
            return os.fstat(fd)
        for parent, name in list(node.links):
            parent_path = self._known_path(parent)
            if parent_path is not None:
                try:
                    st = os.stat(_join(parent_path, name), dir_fd=self._root,
                                 follow_symlinks=False)
                    if st.st_dev == self._root_dev and self._ino(st) == ino:
                        return st
                except FileNotFoundError:
                    pass
            node.links.discard((parent, name))
        raise FUSEError(errno.ENOENT if node.unlinked else errno.ESTALE)

    # -- replication ----------------------------------------------------------------------------

    async def _replicate(self, *ops: Op) -> None:
        # No checkpoint before the first submit: the caller's local change and its op must
        # enter the stream atomically with respect to other handlers.
        if self._sink is None:
            return
        for op in ops:
            await self._sink.submit(op)

    def _mtime_op(self, path: bytes, st: os.stat_result) -> Op:
        return Op(OpKind.SETATTR, self.root_index, os.fsdecode(path),
                  flags=SetattrField.MTIME, mtime_ns=st.st_mtime_ns)

    def _dir_mtime_op(self, path: bytes) -> Op:
        return self._mtime_op(path, os.stat(_local(path), dir_fd=self._root))

    async def _send_mtime_if_dirty(self, ino: int, fd: int) -> None:
        node = self._nodes.get(ino)
        if node is None or not node.mtime_dirty:
            return
        path = await self._op_path(ino)
        if path is None:
            node.mtime_dirty = False
            return
        node.mtime_dirty = False  # before the fstat: a write after it marks it again
        await self._replicate(self._mtime_op(path, os.fstat(fd)))

    def _op(self, kind: OpKind, path: bytes, **fields: Any) -> Op:
        return Op(kind, self.root_index, os.fsdecode(path), **fields)

    def _owner(self, ctx: pyfuse3.RequestContext, parent: bytes, mode: int,
               is_dir: bool) -> tuple[int, int, int]:
        """uid, gid and permission bits of a new object: the caller's ids (we run as root),
        except the group inherited from a set-group-id directory, as the kernel would do."""
        pst = os.stat(_local(parent), dir_fd=self._root)
        perms = mode & _PERMS
        if pst.st_mode & stat.S_ISGID:
            return ctx.uid, pst.st_gid, perms | (stat.S_ISGID if is_dir else 0)
        return ctx.uid, ctx.gid, perms

    def _backing_flags(self, flags: int) -> int:
        flags = (flags & ~_STRIP) | os.O_NOFOLLOW | os.O_CLOEXEC
        # The kernel handles O_SYNC/O_DSYNC itself (FUSE_FSYNC after each write): the backing
        # write need not be synchronous too.
        flags &= ~os.O_SYNC
        if self.enable_writeback_cache and (flags & os.O_ACCMODE) == os.O_WRONLY:
            flags = (flags & ~os.O_ACCMODE) | os.O_RDWR  # the page cache reads partial pages
        return flags

    # -- lookup and attributes ------------------------------------------------------------------

    @_errors_to_errno
    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if name in (b".", b".."):
            ino = parent_inode
            if name == b".." and ino != ROOT:
                ino = next(iter(self._node(ino).links), (ROOT, b""))[0]
            st = self._stat_ino(ino)
            node = self._node(ino)
            node.lookups += 1
            return self._attrs(ino, st, node.generation)
        path = _join(await self._path(parent_inode), name)
        try:
            if parent_inode == ROOT and name == _ASIDE:
                raise FileNotFoundError  # a former copy kept aside by a resync: not the app's
            st = os.stat(path, dir_fd=self._root, follow_symlinks=False)
        except FileNotFoundError:
            if self._read_only:
                raise FUSEError(errno.ENOENT) from None
            negative = pyfuse3.EntryAttributes()  # st_ino 0: the kernel caches the absence
            negative.entry_timeout = self._timeout
            return negative
        return self._remember(parent_inode, name, st)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, count in inode_list:
            node = self._nodes.get(ino)
            if node is None or ino == ROOT:
                continue
            node.lookups -= count
            if node.lookups <= 0 and not node.fds:
                del self._nodes[ino]

    @_errors_to_errno
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attrs(inode, self._stat_ino(inode))

    @_errors_to_errno
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self._check_writable()
        async with self._ns_lock:
            node = self._node(inode)
            fd = fh if fh is not None else next(iter(node.fds), None)
            path = b"" if fd is not None else _local(await self._path(inode))
            target = _Target(fd, path, self._root)
            op_path = await self._op_path(inode)
            if fields.update_mode and target.is_symlink():
                raise FUSEError(errno.EOPNOTSUPP)  # Linux symlinks have no mode
            ops = self._apply_setattr(target, attr, fields, op_path)
            st = target.stat()
            if fields.update_mtime or fields.update_size:
                node.mtime_dirty = False  # the SETATTR carries it
            await self._replicate(*ops)
        return self._attrs(inode, st, node.generation)

    def _apply_setattr(self, target: _Target, attr: pyfuse3.EntryAttributes,
                       fields: pyfuse3.SetattrFields, op_path: bytes | None) -> list[Op]:
        """Apply locally, in the order the Applier uses (truncate, chown, chmod, times: chown
        clears set-id bits, and only the last step may set the mtime); return the ops."""
        ops: list[Op] = []
        if fields.update_size:
            target.truncate(attr.st_size)
            if op_path is not None:
                ops.append(self._op(OpKind.TRUNCATE, op_path, length=attr.st_size))
        setattr_op: dict[str, int] = {"flags": 0}
        if fields.update_uid or fields.update_gid:
            uid = attr.st_uid if fields.update_uid else NO_ID
            gid = attr.st_gid if fields.update_gid else NO_ID
            target.chown(uid, gid)
            setattr_op["flags"] |= (SetattrField.UID if fields.update_uid else 0)
            setattr_op["flags"] |= (SetattrField.GID if fields.update_gid else 0)
            setattr_op.update(uid=uid, gid=gid)
        if fields.update_mode:
            target.chmod(attr.st_mode & _PERMS)
            setattr_op["flags"] |= SetattrField.MODE
            setattr_op["mode"] = attr.st_mode & _PERMS
        if fields.update_atime or fields.update_mtime:
            current = target.stat()
            atime = attr.st_atime_ns if fields.update_atime else current.st_atime_ns
            mtime = attr.st_mtime_ns if fields.update_mtime else current.st_mtime_ns
            target.utime(atime, mtime)
            if fields.update_atime:
                setattr_op["flags"] |= SetattrField.ATIME
                setattr_op["atime_ns"] = atime
        if fields.update_mtime or fields.update_size:
            # truncate(2) sends the size alone, yet the file's mtime changed: send it along.
            setattr_op["flags"] |= SetattrField.MTIME
            setattr_op["mtime_ns"] = target.stat().st_mtime_ns
        if setattr_op["flags"] and op_path is not None:
            ops.append(self._op(OpKind.SETATTR, op_path, **setattr_op))
        return ops

    @_errors_to_errno
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return os.readlink(await self._path(inode), dir_fd=self._root)

    @_errors_to_errno
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        s = os.statvfs(self._root)
        data = pyfuse3.StatvfsData()
        for name in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                     "f_ffree", "f_favail", "f_namemax"):
            setattr(data, name, getattr(s, name))
        return data

    # -- directories ----------------------------------------------------------------------------

    @_errors_to_errno
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        fd = os.open(_local(await self._path(inode)), _DIR_FLAGS, dir_fd=self._root)
        if self._ino(os.fstat(fd)) != inode:
            os.close(fd)
            raise FUSEError(errno.ESTALE)
        self._dirs[fd] = _Dir(fd, inode)
        return fd

    @_errors_to_errno
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        d = self._dirs[fh]
        if start_id == 0 or d.names is None:
            # A snapshot per listing: offsets stay valid whatever is created or removed.
            d.names = sorted(os.fsencode(n) for n in os.listdir(d.fd)
                             if d.ino != ROOT or os.fsencode(n) != _ASIDE)
        for index in range(start_id, len(d.names)):
            name = d.names[index]
            try:
                st = os.stat(name, dir_fd=d.fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if st.st_dev != self._root_dev:
                continue  # a mount point inside the replicated dir is not shown
            ino, node = self._entry(d.ino, name, st)
            if not pyfuse3.readdir_reply(token, name, self._attrs(ino, st, node.generation),
                                         index + 1):
                if node.lookups <= 0 and not node.fds:
                    del self._nodes[ino]
                return
            node.lookups += 1  # readdirplus: each entry the kernel took is a lookup

    @_errors_to_errno
    async def releasedir(self, fh: int) -> None:
        d = self._dirs.pop(fh, None)
        if d is not None:
            os.close(d.fd)

    @_errors_to_errno
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        d = self._dirs[fh]
        path = None if self._read_only else await self._op_path(d.ino)
        op = None if path is None else self._op(
            OpKind.FSYNC, path, flags=FSYNC_DATASYNC if datasync else 0)
        await self._fsync_both(d.fd, datasync, op, 0)

    @_errors_to_errno
    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self._check_writable()
        async with self._ns_lock:
            parent = await self._path(parent_inode)
            path = _join(parent, name)
            uid, gid, perms = self._owner(ctx, parent, mode, is_dir=True)
            os.mkdir(path, 0o700, dir_fd=self._root)
            fd = os.open(path, _DIR_FLAGS, dir_fd=self._root)
            try:
                os.fchown(fd, uid, gid)
                os.fchmod(fd, perms)  # after chown, which may clear set-id bits
                st = os.fstat(fd)
            finally:
                os.close(fd)
            await self._replicate(
                self._op(OpKind.MKDIR, path, mode=perms, uid=uid, gid=gid),
                self._mtime_op(path, st), self._dir_mtime_op(parent))
            return self._remember(parent_inode, name, st)

    @_errors_to_errno
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._check_writable()
        async with self._ns_lock:
            parent = await self._path(parent_inode)
            path = _join(parent, name)
            st = os.stat(path, dir_fd=self._root, follow_symlinks=False)
            os.rmdir(path, dir_fd=self._root)
            self._unname(parent_inode, name, st)
            await self._replicate(self._op(OpKind.RMDIR, path), self._dir_mtime_op(parent))

    # -- names ----------------------------------------------------------------------------------

    def _unname(self, parent: int, name: bytes, st: os.stat_result) -> None:
        """`name` in `parent` (which was `st`) is gone."""
        node = self._nodes.get(self._ino(st))
        if node is None:
            return
        node.links.discard((parent, name))
        if stat.S_ISDIR(st.st_mode) or st.st_nlink <= 1:
            node.unlinked = True
            node.generation += 1
            node.links.clear()
            node.mtime_dirty = False

    @_errors_to_errno
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self._check_writable()
        async with self._ns_lock:
            parent = await self._path(parent_inode)
            path = _join(parent, name)
            uid, gid, perms = self._owner(ctx, parent, mode, is_dir=False)
            os.mknod(path, stat.S_IFMT(mode) | 0o600, rdev, dir_fd=self._root)
            os.chown(path, uid, gid, dir_fd=self._root, follow_symlinks=False)
            os.chmod(path, perms, dir_fd=self._root)  # never opened: it may be a fifo
            st = os.stat(path, dir_fd=self._root, follow_symlinks=False)
            await self._replicate(
                self._op(OpKind.MKNOD, path, mode=stat.S_IFMT(mode) | perms, rdev=rdev,
                         uid=uid, gid=gid),
                self._mtime_op(path, st), self._dir_mtime_op(parent))
            return self._remember(parent_inode, name, st)

    @_errors_to_errno
    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self._check_writable()
        async with self._ns_lock:
            parent = await self._path(parent_inode)
            path = _join(parent, name)
            uid, gid, _ = self._owner(ctx, parent, 0, is_dir=False)
            os.symlink(target, path, dir_fd=self._root)
            os.chown(path, uid, gid, dir_fd=self._root, follow_symlinks=False)
            st = os.stat(path, dir_fd=self._root, follow_symlinks=False)
            await self._replicate(
                self._op(OpKind.SYMLINK, path, path2=os.fsdecode(target), uid=uid, gid=gid),
                self._mtime_op(path, st), self._dir_mtime_op(parent))
            return self._remember(parent_inode, name, st)

    @_errors_to_errno
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self._check_writable()
        async with self._ns_lock:
            source = await self._path(inode)
            parent = await self._path(new_parent_inode)
            path = _join(parent, new_name)
            os.link(source, path, src_dir_fd=self._root, dst_dir_fd=self._root,
                    follow_symlinks=False)
            st = os.stat(path, dir_fd=self._root, follow_symlinks=False)
            if not self._node(inode).unlinked:
                await self._replicate(self._op(OpKind.LINK, source, path2=os.fsdecode(path)),
                                      self._dir_mtime_op(parent))
            return self._remember(new_parent_inode, new_name, st)

    @_errors_to_errno
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._check_writable()
        async with self._ns_lock:
            parent = await self._path(parent_inode)
            path = _join(parent, name)
            st = os.stat(path, dir_fd=self._root, follow_symlinks=False)
            os.unlink(path, dir_fd=self._root)
            self._unname(parent_inode, name, st)
            await self._replicate(self._op(OpKind.UNLINK, path), self._dir_mtime_op(parent))

    @_errors_to_errno
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: pyfuse3.RequestContext) -> None:
        self._check_writable()
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE):
            raise FUSEError(errno.EINVAL)
        async with self._ns_lock:
            old_parent = await self._path(parent_inode_old)
            new_parent = await self._path(parent_inode_new)
            old, new = _join(old_parent, name_old), _join(new_parent, name_new)
            st_old = os.stat(old, dir_fd=self._root, follow_symlinks=False)
            try:
                st_new: os.stat_result | None = os.stat(new, dir_fd=self._root,
                                                        follow_symlinks=False)
            except FileNotFoundError:
                st_new = None
            _renameat2(self._root, old, self._root, new, flags)
            if st_new is None or (st_new.st_dev, st_new.st_ino) != (st_old.st_dev, st_old.st_ino):
                self._renamed(parent_inode_old, name_old, parent_inode_new, name_new,
                              st_old, st_new, exchanged=bool(flags & RENAME_EXCHANGE))
            ops = [self._op(OpKind.RENAME, old, path2=os.fsdecode(new), flags=flags),
                   self._dir_mtime_op(old_parent)]
            if new_parent != old_parent:
                ops.append(self._dir_mtime_op(new_parent))
            # A directory moved to another parent gets a new ".." entry: its mtime may change.
            moved = [(new, st_old)] + ([(old, st_new)] if st_new is not None and flags
                                        & RENAME_EXCHANGE else [])
            for where, before in moved:
                after = os.stat(where, dir_fd=self._root, follow_symlinks=False)
                if after.st_mtime_ns != before.st_mtime_ns:
                    ops.append(self._mtime_op(where, after))
            await self._replicate(*ops)

    def _renamed(self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes,
                 st_old: os.stat_result, st_new: os.stat_result | None, exchanged: bool) -> None:
        moved = self._nodes.get(self._ino(st_old))
        other = self._nodes.get(self._ino(st_new)) if st_new is not None else None
        if st_new is not None and not exchanged:
            self._unname(new_parent, new_name, st_new)  # replaced by the rename
        if moved is not None:
            moved.links.discard((old_parent, old_name))
            if moved.is_dir:
                moved.links.clear()
            moved.links.add((new_parent, new_name))
        if exchanged and other is not None:
            other.links.discard((new_parent, new_name))
            if other.is_dir:
                other.links.clear()
            other.links.add((old_parent, old_name))

    # -- files ----------------------------------------------------------------------------------

    def _open_handle(self, ino: int, fd: int) -> pyfuse3.FileInfo:
        self._files[fd] = _File(fd, ino)
        self._node(ino).fds.add(fd)
        # Read-only: the Applier changes files behind the kernel: reload pages at each open.
        return pyfuse3.FileInfo(fh=fd, keep_cache=not self._read_only)  # type: ignore[arg-type]

    @_errors_to_errno
    async def open(self, inode: int, flags: int,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        writing = (flags & os.O_ACCMODE) != os.O_RDONLY or bool(flags & os.O_TRUNC)
        if writing:
            self._check_writable()
        node = self._node(inode)
        if writing and flags & os.O_TRUNC:
            # libfuse asks for atomic O_TRUNC: the truncation arrives here, not as a setattr.
            async with self._ns_lock:
                path = await self._op_path(inode)
                fd = await self._open_backing(inode, flags | os.O_TRUNC)
                node.mtime_dirty = True
                if path is not None:
                    try:
                        await self._replicate(self._op(OpKind.TRUNCATE, path, length=0))
                    except BaseException:
                        os.close(fd)
                        raise
                return self._open_handle(inode, fd)
        return self._open_handle(inode, await self._open_backing(inode, flags))

    async def _open_backing(self, inode: int, flags: int) -> int:
        node = self._node(inode)
        backing = self._backing_flags(flags) | (flags & os.O_TRUNC)
        if node.fds and (node.unlinked or self._known_path(inode) is None):
            # No name: reopen the inode itself through an fd we already hold.
            return os.open(f"/proc/self/fd/{next(iter(node.fds))}", backing & ~os.O_NOFOLLOW)
        path = await self._path(inode)  # resolved before the open: no checkpoint after it
        fd = os.open(_local(path), backing, dir_fd=self._root)
        if self._ino(os.fstat(fd)) != inode:
            os.close(fd)
            raise FUSEError(errno.ESTALE)
        return fd

    @_errors_to_errno
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext
                     ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        self._check_writable()
        async with self._ns_lock:
            parent = await self._path(parent_inode)
            path = _join(parent, name)
            uid, gid, perms = self._owner(ctx, parent, mode, is_dir=False)
            fd = os.open(path, self._backing_flags(flags) | os.O_CREAT | os.O_EXCL, 0o600,
                         dir_fd=self._root)
            try:
                os.fchown(fd, uid, gid)
                os.fchmod(fd, perms)
                st = os.fstat(fd)
                await self._replicate(
                    self._op(OpKind.CREATE, path, mode=perms, uid=uid, gid=gid),
                    self._dir_mtime_op(parent))
            except BaseException:
                os.close(fd)  # the kernel will never release a handle it did not get
                raise
            attrs = self._remember(parent_inode, name, st)
            node = self._nodes[self._ino(st)]
            node.mtime_dirty = True  # sent with the first flush, after the first writes
            return self._open_handle(self._ino(st), fd), attrs

    @_errors_to_errno
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return os.pread(fh, size, off)

    @_errors_to_errno
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        # Writes exist only on handles opened for writing, which read-only mode refuses.
        handle = self._files[fh]
        path = await self._op_path(handle.ino)
        written = os.pwrite(fh, buf, off)
        node = self._nodes[handle.ino]
        node.unsynced += written
        if path is not None:
            node.mtime_dirty = True
            data = buf if written == len(buf) else buf[:written]
            await self._replicate(self._op(OpKind.WRITE, path, offset=off, data=data))
        return written

    @_errors_to_errno
    async def flush(self, fh: int) -> None:
        if not self._read_only:
            await self._send_mtime_if_dirty(self._files[fh].ino, fh)

    @_errors_to_errno
    async def release(self, fh: int) -> None:
        handle = self._files.pop(fh, None)
        if handle is None:
            return
        try:
            if not self._read_only:
                await self._send_mtime_if_dirty(handle.ino, fh)  # pages written after close
        finally:
            os.close(fh)
            node = self._nodes.get(handle.ino)
            if node is not None:
                node.fds.discard(fh)
                if node.lookups <= 0 and not node.fds:
                    del self._nodes[handle.ino]

    @_errors_to_errno
    async def fsync(self, fh: int, datasync: bool) -> None:
        handle = self._files[fh]
        op = None
        if not self._read_only:
            if not datasync:  # fdatasync need not make the mtime durable (POSIX): at close
                await self._send_mtime_if_dirty(handle.ino, fh)
            path = await self._op_path(handle.ino)
            if path is not None:
                op = self._op(OpKind.FSYNC, path, flags=FSYNC_DATASYNC if datasync else 0)
        node = self._nodes.get(handle.ino)
        unsynced = 0
        if node is not None:
            unsynced, node.unsynced = node.unsynced, 0
        await self._fsync_both(fh, datasync, op, unsynced)

    async def _fsync_both(self, fd: int, datasync: bool, op: Op | None, unsynced: int) -> None:
        """The local fsync and the FSYNC op to the secondary at the same time: the latency is
        the slower of the two, not their sum. The local error wins.

        The local fsync is done inline when it is short (little written since the last one,
        no other local fsync running) and nothing has to travel meanwhile (no op, or a
        SocketSink, which writes a durable op to its socket at once in `start`): it blocks
        this loop for about what a hop to a worker thread and back costs (measured here: 4 KiB
        write + fsync 0.25 ms inline, 0.4-0.55 ms through trio.to_thread). Otherwise it runs in
        a worker thread while `submit` proceeds, as another sink (the daemon's own) needs the
        loop to get the op on its way, and other requests are served meanwhile."""
        sync = os.fdatasync if datasync else os.fsync
        errors: list[OSError] = []
        if op is not None and self._overlapping is not None:
            await self._fsync_overlapped(self._overlapping, sync, fd, op, errors)
            if errors:
                raise errors[0]
            return
        waiter = None
        if op is not None and isinstance(self._sink, SocketSink):
            try:
                waiter = self._sink.start(op)  # on the socket before the local fsync starts
            except OSError as e:
                errors.append(e)
            op = None
        if op is None and self._thread_syncs == 0 and unsynced <= INLINE_SYNC_BYTES:
            try:
                sync(fd)
            except OSError as e:
                errors.insert(0, e)
        else:
            async def local() -> None:
                self._thread_syncs += 1
                try:
                    await in_worker(sync, fd)
                except OSError as e:
                    errors.insert(0, e)
                finally:
                    self._thread_syncs -= 1

            async with trio.open_nursery() as nursery:
                nursery.start_soon(local)
                if op is not None:
                    try:
                        await self._replicate(op)
                    except OSError as e:
                        errors.append(e)
        if waiter is not None:
            assert isinstance(self._sink, SocketSink)
            try:
                await self._sink.finish(waiter)
            except OSError as e:
                errors.append(e)
        if errors:
            raise errors[0]

    async def _fsync_overlapped(self, sink: OverlappingSink, sync: Callable[[int], None],
                                fd: int, op: Op, errors: list[OSError]) -> None:
        """The local fsync in a worker thread started by the sink once the op has left (the
        sink needs this loop to send it, and a thread started before competes with the
        sending for the interpreter: measured, 0.1 ms more to get a 4 KiB frame out)."""
        worker = idle_worker()

        def start() -> None:
            self._thread_syncs += 1
            worker.start(sync, fd)

        try:
            await sink.submit_overlapped(op, start)
        except OSError as e:
            errors.append(e)
        finally:
            try:
                await worker_result(worker)  # started by now: exactly once, whatever happened
            except OSError as e:
                errors.insert(0, e)
            finally:
                self._thread_syncs -= 1

    # -- extended attributes: not replicated, so refused ----------------------------------------

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        raise FUSEError(_XATTR_REFUSED)

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        raise FUSEError(_XATTR_REFUSED)

    async def setxattr(self, inode: int, name: bytes, value: bytes,
                       ctx: pyfuse3.RequestContext) -> None:
        raise FUSEError(_XATTR_REFUSED)

    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise FUSEError(_XATTR_REFUSED)


def _mutation(handler: F, when: Callable[[tuple[Any, ...]], bool] | None = None) -> F:
    """Wrap a handler that changes the tree so that a freeze holds it back."""

    @functools.wraps(handler)
    async def wrapper(self: ReplicatedFs, *args: Any) -> Any:
        if when is not None and not when(args):
            return await handler(self, *args)
        await self._enter_mutation()
        try:
            return await handler(self, *args)
        finally:
            self._leave_mutation()

    return wrapper  # type: ignore[return-value]


def _opens_for_writing(args: tuple[Any, ...]) -> bool:
    flags = args[1]
    return bool(flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC)


for _name in ("setattr", "mkdir", "rmdir", "mknod", "symlink", "link", "unlink", "rename",
              "create", "write"):
    setattr(ReplicatedFs, _name, _mutation(getattr(ReplicatedFs, _name)))
ReplicatedFs.open = _mutation(ReplicatedFs.open, _opens_for_writing)  # type: ignore[method-assign]


@dataclass(frozen=True)
class _Target:
    """What a setattr acts on: an open backing fd when there is one (works after unlink), else
    the path relative to the backing dir."""

    fd: int | None
    path: bytes
    root: int

    def stat(self) -> os.stat_result:
        if self.fd is not None:
            return os.fstat(self.fd)
        return os.stat(self.path, dir_fd=self.root, follow_symlinks=False)

    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.stat().st_mode)

    def truncate(self, size: int) -> None:
        if self.fd is not None:
            os.truncate(self.fd, size)
            return
        flags = os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        fd = os.open(self.path, flags, dir_fd=self.root)
        try:
            os.truncate(fd, size)
        finally:
            os.close(fd)

    def chown(self, uid: int, gid: int) -> None:
        if self.fd is not None:
            os.chown(self.fd, uid, gid)
        else:
            os.chown(self.path, uid, gid, dir_fd=self.root, follow_symlinks=False)

    def chmod(self, mode: int) -> None:
        if self.fd is not None:
            os.chmod(self.fd, mode)
        else:  # not a symlink (checked by the caller)
            os.chmod(self.path, mode, dir_fd=self.root)

    def utime(self, atime_ns: int, mtime_ns: int) -> None:
        if self.fd is not None:
            os.utime(self.fd, ns=(atime_ns, mtime_ns))
        else:
            os.utime(self.path, ns=(atime_ns, mtime_ns), dir_fd=self.root,
                     follow_symlinks=False)


_libc = ctypes.CDLL(None, use_errno=True)
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                            ctypes.c_uint]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_MNT_DETACH = 2


def _renameat2(old_fd: int, old: bytes, new_fd: int, new: bytes, flags: int) -> None:
    if not flags:
        os.rename(old, new, src_dir_fd=old_fd, dst_dir_fd=new_fd)
        return
    if _libc.renameat2(old_fd, old, new_fd, new, flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


# -- mounting -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class MountEntry:
    mount_point: str
    fstype: str
    source: str


def _unescape(field: bytes) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    return os.fsdecode(re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), field))


def mounts() -> list[MountEntry]:
    """This process's mounts, in mount order (the last one on a path is the visible one)."""
    with open("/proc/self/mountinfo", "rb") as f:
        lines = f.read().splitlines()
    entries = []
    for line in lines:
        fields = line.split(b" ")
        sep = fields.index(b"-")
        entries.append(MountEntry(_unescape(fields[4]), _unescape(fields[sep + 1]),
                                  _unescape(fields[sep + 2])))
    return entries


def _mount_path(directory: Path) -> str:
    """How mountinfo names `directory`, without stat-ing the directory itself (a dead or hung
    FUSE mount there would fail or block)."""
    absolute = os.path.abspath(directory)
    return os.path.join(os.path.realpath(os.path.dirname(absolute)), os.path.basename(absolute))


def fuse_mounts_at(directory: Path) -> list[MountEntry]:
    where = _mount_path(directory)
    return [m for m in mounts() if m.mount_point == where and m.fstype.startswith("fuse")]


def is_mounted(directory: Path) -> bool:
    """A mirrorha FUSE mount covers `directory` (live or dead)."""
    return any(m.source == FSNAME for m in fuse_mounts_at(directory))


def detach_stale_mounts(directory: Path) -> int:
    """Lazily unmount mirrorha mounts left on `directory` (a crashed server leaves one that
    answers "Transport endpoint is not connected"); returns how many. The caller makes sure no
    live server of its own still serves it. Another FUSE filesystem there is a MountError."""
    where = _mount_path(directory)
    for count in range(64):
        found = fuse_mounts_at(directory)
        if not found:
            return count
        top = found[-1]
        if top.source != FSNAME:
            raise MountError(f"{where} is covered by another FUSE filesystem ({top.fstype} "
                             f"from {top.source}); not touching it")
        log.warning("detaching a stale mirrorha mount on %s", where)
        if _libc.umount2(os.fsencode(where), _MNT_DETACH) != 0:
            code = ctypes.get_errno()
            raise MountError(f"cannot detach the stale mount on {where}: {os.strerror(code)}")
    raise MountError(f"{where}: still mounted after detaching 64 mounts")


def prepare_backing(directory: Path) -> int:
    """Open the replicated dir (after detaching a stale mount) as the backing fd of a future
    mount; the caller owns the fd."""
    detach_stale_mounts(directory)
    try:
        return os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise MountError(f"cannot open replicated dir {directory}: {e.strerror}") from e


_active_mount = threading.Lock()  # pyfuse3's session is a process-wide global


class FuseMount:
    """Serves `fs` on `mountpoint` (the replicated dir itself, whose backing fd `fs` holds)."""

    def __init__(self, mountpoint: Path, fs: ReplicatedFs, *, fsname: str = FSNAME,
                 max_tasks: int = 99) -> None:
        self.mountpoint = Path(mountpoint)
        self.fs = fs
        self.options = {"allow_other", "default_permissions", f"fsname={fsname}",
                        f"subtype={FSNAME}"}
        self._max_tasks = max_tasks

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        """Mount, report started once the mount is live, serve until cancelled (or unmounted
        from outside), then unmount (lazily: it succeeds even while files are open)."""
        if not _active_mount.acquire(blocking=False):
            raise MountError(f"cannot mount {self.mountpoint}: this process already serves a "
                             "FUSE mount (pyfuse3 supports one per process)")
        try:
            detach_stale_mounts(self.mountpoint)
            try:
                pyfuse3.init(self.fs, os.fspath(self.mountpoint), self.options)
            except RuntimeError as e:
                raise MountError(f"cannot mount {self.mountpoint}: {e}") from e
            try:
                log.info("mounted %s (root %d, %s)", self.mountpoint, self.fs.root_index,
                         "read-only" if self.fs.read_only else "read-write")
                task_status.started()
                await pyfuse3.main(max_tasks=self._max_tasks)
            finally:
                pyfuse3.close(unmount=True)
                log.info("unmounted %s", self.mountpoint)
        finally:
            _active_mount.release()


@contextmanager
def mount_in_thread(mountpoint: Path, fs: ReplicatedFs, *, timeout: float = 10.0,
                    fsname: str = FSNAME) -> Iterator[FuseMount]:
    """Serve `fs` on `mountpoint` from a dedicated thread running trio; the mount is live when
    the block starts and unmounted when it ends."""
    mount = FuseMount(mountpoint, fs, fsname=fsname)
    ready = threading.Event()
    box: dict[str, Any] = {}

    async def run() -> None:
        with trio.CancelScope() as scope:
            box["token"], box["scope"] = trio.lowlevel.current_trio_token(), scope
            async with trio.open_nursery() as nursery:
                await nursery.start(mount.serve)
                ready.set()

    def thread_main() -> None:
        try:
            trio.run(run)
        except BaseException as e:
            box["error"] = e
        finally:
            ready.set()

    thread = threading.Thread(target=thread_main, name=f"fuse {mountpoint}", daemon=True)
    thread.start()
    if not ready.wait(timeout):
        raise MountError(f"mount of {mountpoint} not live after {timeout} s")
    if "error" in box:
        thread.join(timeout)
        error = _single(box["error"])
        if isinstance(error, MountError):
            raise error
        raise MountError(f"cannot mount {mountpoint}: {error}") from error
    try:
        yield mount
    finally:
        with suppress(trio.RunFinishedError):  # already over: unmounted from outside
            trio.from_thread.run_sync(box["scope"].cancel, trio_token=box["token"])
        thread.join(timeout)
        if thread.is_alive():
            raise MountError(f"the FUSE thread of {mountpoint} did not stop in {timeout} s")


def _single(error: BaseException) -> BaseException:
    """The one exception inside trio's nested exception groups, if there is just one."""
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error


# -- one mount per child process: the control socket --------------------------------------------
# Frames are protocol frames, with per-op (not cumulative) answers on this local socket:
#   child -> daemon: HELLO {"root", "dir", "pid"} first, HELLO {"event": "mounted"} when live;
#                    OP with seq = the child's own numbering.
#   daemon -> child: ACK(seq) / NACK(seq, errno, message) answering exactly that op (durable
#                    ops finish later than others); HELLO {"read_only": bool} switches mode.


async def _frames(stream: trio.abc.ReceiveStream) -> AsyncIterator[Any]:
    buf = bytearray()
    while True:
        frames = []
        pos = 0
        with memoryview(buf) as view:  # decoded from the buffer itself (decode copies out)
            while len(buf) - pos >= 4:
                need = frame_length(view[pos:pos + 4])
                if len(buf) - pos - 4 < need:
                    break
                frames.append(decode(view[pos + 4:pos + 4 + need]))  # type: ignore[arg-type]
                pos += 4 + need
        del buf[:pos]
        for frame in frames:
            yield frame
        try:
            chunk = await stream.receive_some(1 << 20)
        except trio.BrokenResourceError:
            return  # reset: the peer process is gone, like an end of stream
        if not chunk:
            if buf:
                raise ProtocolError("control socket closed in the middle of a frame")
            return
        buf += chunk


Buffer = bytes | bytearray | memoryview
_IOV_MAX = 1024
class _FrameWriter:
    """Sends frames on `stream` in the order they are given.

    On a socket, a frame given with `now` leaves at once, with whatever is queued before it
    (a non-blocking writev on the socket's fd; trio's stream is then used for receiving only):
    no task switch before the bytes are on their way, so a durable op travels while its local
    fsync blocks the loop, and a durable answer is not held behind a scheduling round. Other
    frames are queued and the `run` task sends each batch in one writev (fewer wake-ups of the
    peer), as it does with any frame the socket does not take at once, and with everything on
    a stream that is not a socket (tests' memory streams)."""

    def __init__(self, stream: trio.abc.SendStream) -> None:
        self._stream = stream
        self._fd = stream.socket.fileno() if isinstance(stream, trio.SocketStream) else None
        self._queue: collections.deque[Buffer] = collections.deque()
        self._sending = False  # `run` holds bytes of the queue not yet written
        self._closed = False
        self._wake = trio.lowlevel.ParkingLot()

    def send(self, buffers: Sequence[Buffer], *, now: bool = False) -> None:
        if self._closed:
            return  # the peer is gone: the reader sees the end of the stream
        self._queue.extend(buffers)
        if now and self._fd is not None and not self._sending:
            self._write_some()
        if self._queue:
            self._wake.unpark()

    def close(self) -> None:
        """No more writes (the stream may be closed and its fd reused after this)."""
        self._closed = True
        self._queue.clear()

    def _write_some(self) -> bool:
        """Write what the socket takes now; True once the queue is empty."""
        assert self._fd is not None
        queue = self._queue
        while queue:
            try:
                written = os.writev(self._fd, list(itertools.islice(queue, _IOV_MAX)))
            except BlockingIOError:
                return False
            except OSError:  # EPIPE, ECONNRESET: the peer is gone
                self.close()
                return True
            while queue and written >= len(queue[0]):  # empty buffers go too
                written -= len(queue.popleft())
            if written:
                queue[0] = memoryview(queue[0])[written:]
        return True

    async def run(self) -> None:
        try:
            while not self._closed:
                if not self._queue:
                    await self._wake.park()
                elif self._fd is None:
                    data = b"".join(self._queue)
                    self._queue.clear()
                    try:
                        await self._stream.send_all(data)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        return
                else:
                    self._sending = True
                    try:
                        while not self._write_some():
                            await trio.lowlevel.wait_writable(self._fd)
                    finally:
                        self._sending = False
        finally:
            self.close()


@dataclass(eq=False)
class _Waiter:
    size: int
    durable: bool
    done: trio.Event = field(default_factory=trio.Event)
    error: OSError | None = None


DEFAULT_CHILD_WINDOW = 8 * 1024 * 1024  # bytes of ops a child has sent and not yet had answered


class SocketSink:
    """OpSink of a mount child: forwards ops to the daemon over the control socket.

    Like the ReplicaSender behind it, it pipelines: an ordinary op returns as soon as it is
    queued and the child's unanswered bytes fit in `window_bytes` (a full window is the
    backpressure); a durable op waits for its own answer. A refused ordinary op (its write
    already returned) fails the next durable op, as Linux reports writeback errors at fsync:
    a durable ack must never cover an op that was not replicated.

    `submit` is `start` (synchronous: the op takes its place in the stream, and a durable one
    is written to the socket at once) then `finish` (waits as described): a caller may do
    something in between, as fsync does its local fsync."""

    def __init__(self, stream: trio.abc.Stream, *,
                 window_bytes: int = DEFAULT_CHILD_WINDOW) -> None:
        self._stream = stream
        self._window = window_bytes
        self._writer = _FrameWriter(stream)
        self._waiting: dict[int, _Waiter] = {}
        self._in_flight = 0
        self._progress = trio.lowlevel.ParkingLot()
        self._next_seq = 1
        self._broken: str | None = None
        self._deferred: OSError | None = None  # first refusal of an op nobody waited for
        self.on_control: Callable[[dict[str, Any]], None] | None = None

    def hello(self, info: dict[str, Any]) -> None:
        self._writer.send([encode(Hello(info))], now=True)

    async def submit(self, op: Op) -> None:
        await self.finish(self.start(op))

    def start(self, op: Op) -> _Waiter:
        if self._broken is not None:
            raise OSError(errno.EIO, self._broken)
        seq = self._next_seq
        frame = encode_op_parts(op, seq)
        self._next_seq += 1
        waiter = self._waiting[seq] = _Waiter(sum(len(b) for b in frame), op.durable)
        self._in_flight += waiter.size
        self._writer.send(frame, now=op.durable)  # synchronous: the stream order is call order
        return waiter

    async def finish(self, waiter: _Waiter) -> None:
        if waiter.durable:
            await waiter.done.wait()
            error = waiter.error or self._deferred
            self._deferred = None
            if error is not None:
                raise error
            return
        # Window full: wait for answers (an op alone larger than the window waits for its own).
        while self._in_flight > self._window and not waiter.done.is_set():
            await self._progress.park()
        if waiter.error is not None:
            if self._deferred is waiter.error:
                self._deferred = None  # reported here, to the write that caused it
            raise waiter.error

    async def run(self) -> None:
        """Pump frames both ways until the daemon closes the socket; then every waiting and
        later op fails with EIO."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer.run)
                async for frame in _frames(self._stream):
                    self._on_frame(frame)
                nursery.cancel_scope.cancel()
        finally:
            self._fail_all("the daemon closed the control socket")

    def _on_frame(self, frame: Any) -> None:
        match frame:
            case Ack(seq, _):
                self._answer(seq, None)
            case Nack(seq, code, message):
                self._answer(seq, OSError(code or errno.EIO, message))
            case Hello(info):
                if self.on_control is not None:
                    self.on_control(info)
            case _:
                raise ProtocolError(f"unexpected frame from the daemon: {frame!r}")

    def _answer(self, seq: int, error: OSError | None) -> None:
        waiter = self._waiting.pop(seq, None)
        if waiter is None:
            raise ProtocolError(f"answer to unknown op {seq}")
        self._in_flight -= waiter.size
        waiter.error = error
        if error is not None and not waiter.durable and self._deferred is None:
            self._deferred = error
        waiter.done.set()
        self._progress.unpark_all()

    def _fail_all(self, reason: str) -> None:
        self._broken = reason
        for waiter in self._waiting.values():
            waiter.error = OSError(errno.EIO, reason)
            waiter.done.set()
        self._waiting.clear()
        self._in_flight = 0
        self._progress.unpark_all()


class MountChannel:
    """Daemon side of one mount child's control socket: hands its ops to `sink` in the order
    they arrive and answers each one when its submit returns."""

    def __init__(self, stream: trio.abc.Stream, sink: OpSink) -> None:
        self._stream = stream
        self._sink = sink
        self._writer = _FrameWriter(stream)

    def set_read_only(self, read_only: bool) -> None:
        self._writer.send([encode(Hello({"read_only": read_only}))], now=True)

    def set_frozen(self, frozen: bool) -> None:
        """Freeze: the child answers HELLO {"event": "frozen"} once nothing mutates any more."""
        self._writer.send([encode(Hello({"freeze": frozen}))], now=True)

    async def run(self, on_hello: Callable[[dict[str, Any]], None] | None = None) -> None:
        """Until the child closes the socket (it unmounted or died)."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer.run)
                async for frame in _frames(self._stream):
                    match frame:
                        case Op() if frame.durable:
                            # start(): submit's synchronous part (taking the op's place in the
                            # stream) runs before the next frame is read, so order is kept
                            # while a durable op waits.
                            await nursery.start(self._forward, frame)
                        case Op():
                            # An ordinary op is admitted by the sink without waiting while its
                            # window has room: no task of its own. When the window is full,
                            # the next frames wait behind it, as they would in the sink.
                            await self._forward(frame)
                        case Hello(info):
                            if on_hello is not None:
                                on_hello(info)
                        case _:
                            raise ProtocolError(
                                f"unexpected frame from a mount child: {frame!r}")
                nursery.cancel_scope.cancel()
        finally:
            self._writer.close()

    async def _forward(self, op: Op, *,
                       task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            await self._sink.submit(op)
        except OSError as e:
            answer: Ack | Nack = Nack(op.seq, e.errno or errno.EIO, str(e))
        except Exception as e:  # the sink's own error types: the application gets EIO
            log.warning("replication of %s failed: %s", op.kind.name, e)
            answer = Nack(op.seq, errno.EIO, str(e))
        else:
            answer = Ack(op.seq, op.durable)
        # A durable op's answer leaves at once; ordinary ones go in batches.
        self._writer.send([encode(answer)], now=op.durable)


def child_argv(root_index: int, directory: Path, control: Path | None = None, *,
               read_only: bool = False, writeback_cache: bool = False) -> list[str]:
    """The command line of a mount child (run it in the root mount namespace of the node)."""
    argv = [sys.executable, "-m", "appliance.replication.fusefs", "--root-index",
            str(root_index), "--dir", os.fspath(directory)]
    if control is not None:
        argv += ["--control", os.fspath(control)]
    if read_only:
        argv.append("--read-only")
    if writeback_cache:
        argv.append("--writeback-cache")
    return argv


async def _serve_child(args: argparse.Namespace) -> None:
    directory = Path(args.dir)
    backing = prepare_backing(directory)
    try:
        sink = None
        if args.control:
            sink = SocketSink(await trio.open_unix_socket(args.control))
        fs = ReplicatedFs(args.root_index, backing, sink, args.read_only,
                          writeback_cache=args.writeback_cache)
        mount = FuseMount(directory, fs)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_on_signal, nursery.cancel_scope)
            if sink is not None:
                sink.on_control = lambda info: _control(fs, info)
                fs.on_frozen = lambda: sink.hello({"event": "frozen"})
                sink.hello({"root": args.root_index, "dir": str(directory), "pid": os.getpid()})
                nursery.start_soon(_then_cancel, sink.run, nursery.cancel_scope)
            await nursery.start(_serve_then_cancel, mount, nursery.cancel_scope)
            if sink is not None:
                sink.hello({"event": "mounted"})
    finally:
        os.close(backing)


def _control(fs: ReplicatedFs, info: dict[str, Any]) -> None:
    if isinstance(info.get("freeze"), bool):
        fs.set_frozen(info["freeze"])
    if isinstance(info.get("read_only"), bool):
        fs.set_read_only(info["read_only"])
        log.info("%s now %s", fs.root_index, "read-only" if fs.read_only else "read-write")


async def _cancel_on_signal(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            scope.cancel()
            return


async def _then_cancel(fn: Callable[[], Awaitable[None]], scope: trio.CancelScope) -> None:
    # Without the daemon, writes cannot be replicated: unmount rather than fail them forever.
    await fn()
    scope.cancel()


async def _serve_then_cancel(mount: FuseMount, scope: trio.CancelScope, *,
                             task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                             ) -> None:
    await mount.serve(task_status=task_status)
    scope.cancel()  # unmounted from outside: the child has nothing left to do


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m appliance.replication.fusefs",
        description="Serve the mirrorha FUSE over-mount of one replicated directory.")
    parser.add_argument("--root-index", type=int, required=True,
                        help="index of the directory in userconfig order (Op.root)")
    parser.add_argument("--dir", required=True, help="the replicated directory")
    parser.add_argument("--control", help="unix socket of the daemon (none: no replication)")
    parser.add_argument("--read-only", action="store_true", help="secondary: EROFS on writes")
    parser.add_argument("--writeback-cache", action="store_true",
                        help="let the kernel buffer writes (fsync still waits for the peer)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format=f"%(asctime)s fusefs[{os.getpid()}] %(levelname)s %(message)s")
    keep_large_buffers()
    try:
        trio.run(_serve_child, args)
    except (MirrorhaError, OSError) as e:
        print(f"mirrorha fusefs: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
