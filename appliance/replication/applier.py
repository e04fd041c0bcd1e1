"""Secondary side of replication: apply the primary's operations inside the replicated dirs.

The secondary trusts the primary's *content* but not its *paths*: a bug or a compromised peer
must not be able to touch anything outside the replicated directories. So every path is
resolved component by component from a directory fd opened when the Applier starts (before the
FUSE over-mount hides the backing directory), with `O_NOFOLLOW|O_DIRECTORY` for each
intermediate directory. A symlink anywhere in the path, `..`, `.`, an empty component, a leading
`/` or a NUL byte is a `ConfinementError` and nothing is touched. The last component is not
followed either: WRITE/TRUNCATE/FALLOCATE/FSYNC only open regular files (never a symlink, a
fifo or a device node, whose opening alone could reach outside the directory), SETATTR and the
namespace operations use the `*at()` calls with `follow_symlinks=False`.

Decisions worth knowing:
- An empty path designates the replicated directory itself; only SETATTR and FSYNC accept it
  (chmod or fsync of the mount's root). Every other op needs a name inside the directory.
- CREATE of a file that already exists as a regular file, and MKDIR of an existing directory,
  are accepted and change nothing (no truncation, no chmod/chown) — exactly what
  `open(O_CREAT)` without `O_EXCL` does. After a resync the object (with the content and
  attributes of later ops) may already be there; redoing the creation must not undo them.
- SYNC ignores `op.root`: it is a barrier for everything applied so far, on every root.
- WRITE never extends a file with zeros it was not given: it is one `pwrite` of exactly the
  received bytes, so holes stay holes.

The hot path is many WRITEs to the same file, so write fds are kept in a small LRU keyed by
(root, path). Only UNLINK, RMDIR and RENAME can change which inode a path names; they drop the
cached fds of that path and of everything below it before acting.

The Applier is not thread-safe: one thread (or one trio worker thread at a time) drives it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import stat
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from errno import EBADF, EINVAL, EIO, EISDIR, ELOOP, ENOSYS, ENOTDIR, EPERM
from pathlib import Path
from typing import ClassVar

from appliance.errors import MirrorhaError
from appliance.replication import inventory
from appliance.replication.protocol import NO_ID, Op, OpKind, SetattrField

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
FALLOC_FL_KEEP_SIZE = 1
FALLOC_FL_PUNCH_HOLE = 2
FSYNC_DATASYNC = 1  # Op.flags of FSYNC
DEFAULT_MAX_OPEN_FILES = 64
NOT_A_FILE = 2**64 - 1  # SUMS answer's size when the path is no regular file

_ROOT_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
# Intermediate directories: O_PATH is enough for *at() calls and cannot have side effects.
_STEP_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: should a fifo ever slip in, opening it must fail rather than hang the receiver.
_FILE_FLAGS = os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_PERMS = 0o7777
_SETATTR_ALL = sum(SetattrField)
_MAX_OFF = 2**63 - 1
_NODE_TYPES = (0, stat.S_IFREG, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK)


class ConfinementError(MirrorhaError):
    """The op's path would leave the replicated dir (`..`, absolute, empty or `.` component,
    NUL, a symlink in the path, a device or fifo where a regular file is needed, root index
    out of range). Nothing was touched."""

    errno: ClassVar[int] = EPERM  # what a NACK reports for it


class ApplyError(MirrorhaError):
    """The operating system refused the op (ENOSPC, EIO, ENOENT...)."""

    def __init__(self, errno: int, message: str) -> None:
        self.errno = errno
        self.message = message
        super().__init__(message)


ASIDE_DIR = ".mirrorha-aside"  # inside a root that is its own mount point (see _reset)


def _exists(name: str, dir_fd: int) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


class Applier:
    """Applies `Op`s, in the order given, inside the replicated directories `roots`."""

    def __init__(
        self, roots: Sequence[Path], *, max_open_files: int = DEFAULT_MAX_OPEN_FILES,
        workers: int = 1,
    ) -> None:
        self._roots = [Path(r) for r in roots]
        self._workers = max(1, workers)  # nbrei: threads computing block checksums
        self._root_fds: list[int] = []
        self._max_open = max(1, max_open_files)
        self._files: OrderedDict[tuple[int, str], int] = OrderedDict()
        self._closed = False
        # During a copy (resync, reintegration): start each write's writeback at once, so that
        # the disk works while the rest arrives and the copy's closing SYNC has little left
        # to flush. Not for the live stream: there the application's own fsyncs decide.
        self.early_writeback = False
        try:
            for root in self._roots:
                self._root_fds.append(os.open(root, _ROOT_FLAGS))
        except OSError as e:
            self.close()
            message = f"cannot open replicated dir {root}: {e.strerror}"
            raise ApplyError(e.errno or EIO, message) from e
        self._sync_fds = _one_fd_per_filesystem(self._root_fds)
        self._handlers: dict[OpKind, Callable[[Op], None]] = {
            OpKind.WRITE: self._write,
            OpKind.TRUNCATE: self._truncate,
            OpKind.CREATE: self._create,
            OpKind.MKNOD: self._mknod,
            OpKind.MKDIR: self._mkdir,
            OpKind.UNLINK: self._unlink,
            OpKind.RMDIR: self._rmdir,
            OpKind.RENAME: self._rename,
            OpKind.LINK: self._link,
            OpKind.SYMLINK: self._symlink,
            OpKind.SETATTR: self._setattr,
            OpKind.FSYNC: self._fsync_op,
            OpKind.FALLOCATE: self._fallocate,
            OpKind.SYNC: lambda op: self._sync(),
            OpKind.RESET: self._reset,
            OpKind.RESYNC_DONE: lambda op: None,  # a marker for whoever drives the applier
            OpKind.REINT_BEGIN: lambda op: None,  # likewise
        }

    # -- public ---------------------------------------------------------------------------------

    def apply(self, op: Op) -> None:
        """Apply one op synchronously. Raises ConfinementError or ApplyError."""
        if self._closed:
            raise ApplyError(EBADF, f"{_describe(op)}: the applier is closed")
        # A plain try (not a context manager) keeps the per-op overhead of small writes low.
        try:
            self._handlers[op.kind](op)
        except ConfinementError as e:
            raise ConfinementError(f"{_describe(op)}: {e}") from None
        except OSError as e:
            code = e.errno or EIO
            raise ApplyError(code, f"{_describe(op)}: {e.strerror or os.strerror(code)}") from e
        except OverflowError as e:  # an offset, size or id that does not fit the C type
            raise ApplyError(EINVAL, f"{_describe(op)}: value out of range ({e})") from e

    def query(self, op: Op, header: dict[str, object] | None = None) -> bytes:
        """The answer to a query op: LIST (this copy's tree, after `header`) or SUMS (u64 size
        of the regular file, or 2**64-1 when it is none, then its block digests)."""
        try:
            if op.kind is OpKind.LIST:
                entries = inventory.list_tree(self._root_fd(op.root), ASIDE_DIR)
                return inventory.encode_listing(header or {}, entries)
            if op.kind is OpKind.SUMS:
                return self._sums(op)
        except ConfinementError as e:
            raise ConfinementError(f"{_describe(op)}: {e}") from None
        except OSError as e:
            code = e.errno or EIO
            raise ApplyError(code, f"{_describe(op)}: {e.strerror or os.strerror(code)}") from e
        raise ApplyError(EINVAL, f"{_describe(op)}: not a query")

    def _sums(self, op: Op) -> bytes:
        if not 4096 <= op.length <= 16 * 1024 * 1024:
            raise OSError(EINVAL, f"checksum block of {op.length} bytes")
        with self._parent(op.root, op.path) as (dir_fd, name):
            fd = open_for_reading(dir_fd, name)
        if fd is None:
            return NOT_A_FILE.to_bytes(8, "big")
        try:
            st = os.fstat(fd)
            sums = inventory.block_sums(fd, st.st_size, op.length, self._workers)
            return st.st_size.to_bytes(8, "big") + sums
        finally:
            os.close(fd)

    def fsync(self, root: int, path: str, datasync: bool) -> None:
        """Make one file or directory durable ("" = the replicated dir itself)."""
        self.apply(Op(OpKind.FSYNC, root, path, flags=FSYNC_DATASYNC if datasync else 0))

    def sync(self) -> None:
        """Make everything applied so far durable (syncfs of each filesystem holding a root)."""
        self.apply(Op(OpKind.SYNC, 0, ""))

    def close(self) -> None:
        """Close every fd; idempotent. The Applier cannot be used afterwards."""
        self._closed = True
        while self._files:
            _, fd = self._files.popitem()
            os.close(fd)
        while self._root_fds:
            os.close(self._root_fds.pop())

    def __enter__(self) -> Applier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- full resync ----------------------------------------------------------------------------

    def _reset(self, op: Op) -> None:
        """Move everything in the root aside before a full resync: the data this node held is
        kept for the operator, never deleted. Aside means `<root>.mirrorha-aside/<stamp>/`, a
        sibling (a rename, no copy); when the root is a mount point of its own (a rename to
        the sibling crosses devices), `<root>/.mirrorha-aside/<stamp>/` inside it instead,
        which full resyncs skip."""
        root_fd = self._root_fd(op.root)
        for key in [k for k in self._files if k[0] == op.root]:
            os.close(self._files.pop(key))
        root = self._roots[op.root]
        stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{time.time_ns() % 10**9:09d}-{op.seq}"
        names = [n for n in os.listdir(root_fd) if n != ASIDE_DIR]
        if not names:
            return  # nothing to keep: no empty folder to puzzle the operator
        aside = root.parent / f"{root.name}.mirrorha-aside" / stamp
        aside.mkdir(parents=True, mode=0o700)
        aside_fd = os.open(aside, os.O_RDONLY | os.O_DIRECTORY)
        try:
            try:
                os.rename(names[0], names[0], src_dir_fd=root_fd, dst_dir_fd=aside_fd)
            except OSError as e:
                if e.errno != errno.EXDEV:
                    raise
                os.close(aside_fd)
                aside.rmdir()
                with contextlib.suppress(OSError):  # only if we made it and nothing else is there
                    aside.parent.rmdir()
                if not _exists(ASIDE_DIR, root_fd):
                    os.mkdir(ASIDE_DIR, 0o700, dir_fd=root_fd)
                inner = os.open(ASIDE_DIR, os.O_RDONLY | os.O_DIRECTORY, dir_fd=root_fd)
                try:
                    os.mkdir(stamp, 0o700, dir_fd=inner)
                    aside_fd = os.open(stamp, os.O_RDONLY | os.O_DIRECTORY, dir_fd=inner)
                finally:
                    os.close(inner)
                os.rename(names[0], names[0], src_dir_fd=root_fd, dst_dir_fd=aside_fd)
            for name in names[1:]:
                os.rename(name, name, src_dir_fd=root_fd, dst_dir_fd=aside_fd)
        finally:
            os.close(aside_fd)

    # -- path resolution ------------------------------------------------------------------------

    def _root_fd(self, root: int) -> int:
        if not 0 <= root < len(self._root_fds):
            raise ConfinementError(
                f"root index {root} out of range ({len(self._root_fds)} replicated dirs)")
        return self._root_fds[root]

    def _parent(self, root: int, path: str
                ) -> contextlib.AbstractContextManager[tuple[int, str]]:
        """(fd of the directory holding path's last component, that component), confined."""
        return confined_parent(self._root_fd(root), path)

    @contextmanager
    def _target(self, root: int, path: str) -> Iterator[tuple[int, str]]:
        """Like _parent, but "" designates the replicated dir itself (as (root fd, "."))."""
        if path == "":
            yield self._root_fd(root), "."
        else:
            with self._parent(root, path) as found:
                yield found

    def _file(self, root: int, path: str) -> int:
        """A write fd on the regular file `path`, from the LRU or freshly opened."""
        key = (root, path)
        fd = self._files.get(key)
        if fd is not None:
            self._files.move_to_end(key)
            return fd
        with self._parent(root, path) as (dir_fd, name):
            fd = _open_regular(dir_fd, name)
        self._remember(key, fd)
        return fd

    def _remember(self, key: tuple[int, str], fd: int) -> None:
        old = self._files.pop(key, None)
        if old is not None and old != fd:
            os.close(old)
        self._files[key] = fd
        while len(self._files) > self._max_open:
            _, evicted = self._files.popitem(last=False)
            os.close(evicted)

    def _forget(self, root: int, path: str) -> None:
        """Drop cached fds of `path` and everything below it (its name is about to change)."""
        prefix = path + "/"
        stale = [k for k in self._files if k[0] == root and (k[1] == path
                                                             or k[1].startswith(prefix))]
        for key in stale:
            os.close(self._files.pop(key))

    # -- data -----------------------------------------------------------------------------------

    def _write(self, op: Op) -> None:
        fd = self._file(op.root, op.path)
        written = os.pwrite(fd, op.data, op.offset)
        if written != len(op.data):  # short write (nearly full disk): finish or get the errno
            _pwrite_rest(fd, op.data, op.offset, written)
        if self.early_writeback:
            _libc_start_writeback(fd, op.offset, len(op.data))

    def _truncate(self, op: Op) -> None:
        os.ftruncate(self._file(op.root, op.path), op.length)

    def _fallocate(self, op: Op) -> None:
        if not (0 <= op.offset <= _MAX_OFF and 0 < op.length <= _MAX_OFF):
            raise OSError(EINVAL, f"fallocate range {op.offset}+{op.length} out of range")
        _libc_fallocate(self._file(op.root, op.path), op.flags, op.offset, op.length)

    def _fsync_op(self, op: Op) -> None:
        datasync = bool(op.flags & FSYNC_DATASYNC)
        flush = os.fdatasync if datasync else os.fsync
        cached = self._files.get((op.root, op.path))
        if cached is not None:
            flush(cached)
            return
        with self._target(op.root, op.path) as (dir_fd, name):
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
                try:
                    flush(fd)
                finally:
                    os.close(fd)
                return
            fd = _open_regular(dir_fd, name)
        self._remember((op.root, op.path), fd)
        flush(fd)

    def _sync(self) -> None:
        for fd in self._sync_fds:
            _libc_syncfs(fd)

    # -- namespace ------------------------------------------------------------------------------

    def _create(self, op: Op) -> None:
        with self._parent(op.root, op.path) as (dir_fd, name):
            try:
                fd = os.open(name, _FILE_FLAGS | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=dir_fd)
            except FileExistsError:
                fd = _open_regular(dir_fd, name)  # already there (resync): left as it is
            else:
                try:
                    _set_owner_and_mode(fd, op)
                except BaseException:
                    os.close(fd)
                    raise
        # The application's next calls are almost always writes to this file.
        self._remember((op.root, op.path), fd)

    def _mkdir(self, op: Op) -> None:
        with self._parent(op.root, op.path) as (dir_fd, name):
            try:
                os.mkdir(name, 0o700, dir_fd=dir_fd)
            except FileExistsError:
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    return  # already there (resync): left as it is
                raise
            fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
            try:
                _set_owner_and_mode(fd, op)
            finally:
                os.close(fd)

    def _mknod(self, op: Op) -> None:
        kind = stat.S_IFMT(op.mode)
        if kind not in _NODE_TYPES:
            raise OSError(EINVAL, f"mknod of unknown file type {kind:o}")
        with self._parent(op.root, op.path) as (dir_fd, name):
            # Never opened: a device node here must not be able to reach the device.
            os.mknod(name, (kind or stat.S_IFREG) | 0o600, op.rdev, dir_fd=dir_fd)
            if op.uid != NO_ID or op.gid != NO_ID:
                os.chown(name, op.uid, op.gid, dir_fd=dir_fd, follow_symlinks=False)
            _chmod_not_symlink(dir_fd, name, op.mode & _PERMS)  # mknod honours the umask

    def _symlink(self, op: Op) -> None:
        if "\x00" in op.path2:
            raise ConfinementError("symlink target contains a NUL byte")
        with self._parent(op.root, op.path) as (dir_fd, name):
            os.symlink(op.path2, name, dir_fd=dir_fd)  # target stored verbatim, never followed
            if op.uid != NO_ID or op.gid != NO_ID:
                os.chown(name, op.uid, op.gid, dir_fd=dir_fd, follow_symlinks=False)

    def _link(self, op: Op) -> None:
        with (self._parent(op.root, op.path) as (src_fd, src),
              self._parent(op.root, op.path2) as (dst_fd, dst)):
            os.link(src, dst, src_dir_fd=src_fd, dst_dir_fd=dst_fd, follow_symlinks=False)

    def _unlink(self, op: Op) -> None:
        self._forget(op.root, op.path)
        with self._parent(op.root, op.path) as (dir_fd, name):
            os.unlink(name, dir_fd=dir_fd)

    def _rmdir(self, op: Op) -> None:
        self._forget(op.root, op.path)
        with self._parent(op.root, op.path) as (dir_fd, name):
            os.rmdir(name, dir_fd=dir_fd)

    def _rename(self, op: Op) -> None:
        if op.flags not in (0, RENAME_NOREPLACE, RENAME_EXCHANGE):
            raise OSError(EINVAL, f"rename flags {op.flags:#x} not supported")
        # Rename-over unlinks the target and EXCHANGE swaps both: both names change inode.
        self._forget(op.root, op.path)
        self._forget(op.root, op.path2)
        with (self._parent(op.root, op.path) as (src_fd, src),
              self._parent(op.root, op.path2) as (dst_fd, dst)):
            if op.flags:
                _libc_renameat2(src_fd, src, dst_fd, dst, op.flags)
            else:
                os.rename(src, dst, src_dir_fd=src_fd, dst_dir_fd=dst_fd)

    # -- attributes -----------------------------------------------------------------------------

    def _setattr(self, op: Op) -> None:
        fields = op.flags
        if fields & ~_SETATTR_ALL:
            raise OSError(EINVAL, f"unknown setattr fields {fields:#x}")
        with self._target(op.root, op.path) as (dir_fd, name):
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            if fields & (SetattrField.UID | SetattrField.GID):
                uid = op.uid if fields & SetattrField.UID else NO_ID
                gid = op.gid if fields & SetattrField.GID else NO_ID
                os.chown(name, uid, gid, dir_fd=dir_fd, follow_symlinks=False)
            # After chown, which clears set-id bits. Linux has no mode on symlinks: skipped.
            if fields & SetattrField.MODE and not stat.S_ISLNK(st.st_mode):
                _chmod_not_symlink(dir_fd, name, op.mode & _PERMS)
            if fields & (SetattrField.ATIME | SetattrField.MTIME):
                # One of the two alone: keep the other (UTIME_OMIT; nothing else writes here).
                atime = op.atime_ns if fields & SetattrField.ATIME else st.st_atime_ns
                mtime = op.mtime_ns if fields & SetattrField.MTIME else st.st_mtime_ns
                os.utime(name, ns=(atime, mtime), dir_fd=dir_fd, follow_symlinks=False)


# -- helpers ------------------------------------------------------------------------------------


def _describe(op: Op) -> str:
    where = f"root {op.root} path {op.path!r}"
    if op.kind in (OpKind.RENAME, OpKind.LINK, OpKind.SYMLINK):
        where += f" -> {op.path2!r}"
    return f"{op.kind.name} #{op.seq} {where}"


@contextmanager
def confined_parent(root_fd: int, path: str) -> Iterator[tuple[int, str]]:
    """(fd of the directory holding path's last component below `root_fd`, that component),
    no symlink followed on the way (the primary's reintegration reads its own live tree with
    it too: a directory swapped for a symlink meanwhile must not lead it outside)."""
    *dirs, name = _components(path)
    fd = root_fd
    try:
        for component in dirs:
            child = _step(fd, component)
            if fd != root_fd:
                os.close(fd)
            fd = child
        yield fd, name
    finally:
        if fd != root_fd:
            os.close(fd)


def _components(path: str) -> list[str]:
    """The names in `path`, refusing anything that is not a plain relative path."""
    if "\x00" in path:
        raise ConfinementError("path contains a NUL byte")
    if path.startswith("/"):
        raise ConfinementError("absolute path")
    names = path.split("/")
    for name in names:
        if name in ("", ".", ".."):
            raise ConfinementError(f"path component {name!r} not allowed")
    return names


def _step(dir_fd: int, name: str) -> int:
    """Open the subdirectory `name` of `dir_fd` without following a symlink."""
    try:
        return os.open(name, _STEP_FLAGS, dir_fd=dir_fd)
    except OSError as e:
        if e.errno in (ELOOP, ENOTDIR) and _is_symlink(dir_fd, name):
            raise ConfinementError(f"{name!r} is a symlink") from None
        raise


def _is_symlink(dir_fd: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _open_regular(dir_fd: int, name: str, flags: int = _FILE_FLAGS) -> int:
    """A write fd on the regular file `name`; anything else is refused before being opened."""
    before = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    _require_regular(before.st_mode, name)
    fd = os.open(name, flags, dir_fd=dir_fd)
    try:
        after = os.fstat(fd)
        if (after.st_dev, after.st_ino) != (before.st_dev, before.st_ino):
            raise ConfinementError(f"{name!r} was replaced while being opened")
        _require_regular(after.st_mode, name)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_for_reading(dir_fd: int, name: str) -> int | None:
    """A read fd on the regular file `name` of `dir_fd`, or None when it is none (gone, a
    symlink, a device node: never opened, as opening a device alone may act on it)."""
    try:
        return _open_regular(dir_fd, name, _READ_FLAGS)
    except (FileNotFoundError, ConfinementError, ApplyError):
        return None
    except OSError as e:
        if e.errno in (ELOOP, errno.ENXIO, ENOTDIR, EISDIR):
            return None
        raise


def _require_regular(mode: int, name: str) -> None:
    if stat.S_ISREG(mode):
        return
    if stat.S_ISDIR(mode):
        raise OSError(EISDIR, f"{name!r} is a directory")
    if stat.S_ISLNK(mode):
        raise ConfinementError(f"{name!r} is a symlink")
    raise ConfinementError(f"{name!r} is a device, fifo or socket, not a regular file")


def _set_owner_and_mode(fd: int, op: Op) -> None:
    if op.uid != NO_ID or op.gid != NO_ID:
        os.fchown(fd, op.uid, op.gid)  # -1 leaves that id unchanged
    os.fchmod(fd, op.mode & _PERMS)  # after chown, which clears set-id bits; ignores umask


def _chmod_not_symlink(dir_fd: int, name: str, mode: int) -> None:
    """chmod of a name known not to be a symlink (glibc's no-follow chmod needs /proc)."""
    try:
        os.chmod(name, mode, dir_fd=dir_fd, follow_symlinks=False)
    except (NotImplementedError, ValueError):
        # Python reports glibc's EOPNOTSUPP as one of these; nothing else changes this dir
        # on the secondary, so the name still is the non-symlink the caller checked.
        os.chmod(name, mode, dir_fd=dir_fd)


def _pwrite_rest(fd: int, data: bytes, offset: int, done: int) -> None:
    view = memoryview(data)
    while done < len(view):  # each round writes >= 1 byte or raises: bounded by len(data)
        n = os.pwrite(fd, view[done:], offset + done)
        if n <= 0:
            raise OSError(EIO, "write made no progress")
        done += n


def _one_fd_per_filesystem(fds: list[int]) -> list[int]:
    by_dev: dict[int, int] = {}
    for fd in fds:
        by_dev.setdefault(os.fstat(fd).st_dev, fd)
    return list(by_dev.values())


# -- libc calls Python's os module lacks --------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)


def _libc_function(name: str, argtypes: list[type]) -> Callable[..., int] | None:
    fn = getattr(_libc, name, None)
    if fn is not None:
        fn.argtypes = argtypes
        fn.restype = ctypes.c_int
    return fn


_renameat2 = _libc_function(
    "renameat2", [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint])
_fallocate = _libc_function(
    "fallocate", [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64])
_syncfs = _libc_function("syncfs", [ctypes.c_int])
_sync_file_range = _libc_function(
    "sync_file_range", [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint])
_SYNC_FILE_RANGE_WRITE = 2


def _check(result: int) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def _libc_renameat2(src_fd: int, src: str, dst_fd: int, dst: str, flags: int) -> None:
    if _renameat2 is None:
        raise OSError(ENOSYS, "renameat2 is not available in this libc")
    _check(_renameat2(src_fd, os.fsencode(src), dst_fd, os.fsencode(dst), flags))


def _libc_fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _fallocate is None:
        if mode:
            raise OSError(ENOSYS, "fallocate is not available in this libc")
        os.posix_fallocate(fd, offset, length)
        return
    _check(_fallocate(fd, mode, offset, length))


def _libc_start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing that range to disk, without waiting (a hint: failures are left to the
    fsync or syncfs that follows, which reports them)."""
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


def _libc_syncfs(fd: int) -> None:
    if _syncfs is None:
        os.sync()
        return
    _check(_syncfs(fd))


__all__ = [
    "FALLOC_FL_KEEP_SIZE",
    "FALLOC_FL_PUNCH_HOLE",
    "RENAME_EXCHANGE",
    "RENAME_NOREPLACE",
    "Applier",
    "ApplyError",
    "ConfinementError",
]

