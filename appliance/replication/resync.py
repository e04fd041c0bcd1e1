"""Full resynchronisation: the primary streams its whole replicated directory as ops.

The stream is RESET (the secondary sets its previous content aside), then the tree — each
directory before what it holds, data only where the file has data (holes stay holes), hard
links as LINK, attributes and mtimes last (a directory's mtime after its entries were created),
then (sent by the caller once everything is durable on the secondary) RESYNC_DONE.
It is the fallback when nothing better is known; reintegration of dirty zones
comes on top of it. The caller guarantees the tree does not change while it is walked (the
mounts are frozen), so the copy is exact.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from appliance.replication.applier import ASIDE_DIR
from appliance.replication.protocol import Op, OpKind, SetattrField

CHUNK = 1024 * 1024
_ATTRS = SetattrField.MODE | SetattrField.UID | SetattrField.GID | SetattrField.MTIME
_LINK_ATTRS = SetattrField.UID | SetattrField.GID | SetattrField.MTIME  # no chmod on symlinks

Submit = Callable[[Op], Awaitable[None]]


@dataclass
class CopyStats:
    files: int = 0
    dirs: int = 0
    bytes: int = 0
    ops: int = 0
    links: int = 0
    seen: dict[tuple[int, int], str] = field(default_factory=dict, repr=False)


async def full_copy(root: int, root_fd: int, submit: Submit) -> CopyStats:
    """Stream the directory open as `root_fd` (opened before the FUSE mount) as replicated dir
    number `root`."""
    stats = CopyStats()

    async def send(op: Op) -> None:
        stats.ops += 1
        await submit(op)

    await send(Op(OpKind.RESET, root, ""))
    await _copy_dir(root, root_fd, "", send, stats)
    top = os.stat(root_fd)
    await send(Op(OpKind.SETATTR, root, "", mode=stat.S_IMODE(top.st_mode), uid=top.st_uid,
                  gid=top.st_gid, mtime_ns=top.st_mtime_ns, flags=_ATTRS))
    return stats


async def _copy_dir(root: int, dir_fd: int, rel: str, send: Submit, stats: CopyStats) -> None:
    for name in sorted(os.listdir(dir_fd)):
        if not rel and name == ASIDE_DIR:
            continue  # what a previous resync set aside stays on this node
        path = f"{rel}/{name}" if rel else name
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            continue
        await _copy_entry(root, dir_fd, name, path, st, send, stats)


async def _copy_entry(root: int, dir_fd: int, name: str, path: str, st: os.stat_result,
                      send: Submit, stats: CopyStats) -> None:
    mode = stat.S_IMODE(st.st_mode)
    attrs = Op(OpKind.SETATTR, root, path, mode=mode, uid=st.st_uid, gid=st.st_gid,
               mtime_ns=st.st_mtime_ns, flags=_ATTRS)
    if stat.S_ISDIR(st.st_mode):
        stats.dirs += 1
        await send(Op(OpKind.MKDIR, root, path, mode=mode, uid=st.st_uid, gid=st.st_gid))
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
        try:
            await _copy_dir(root, fd, path, send, stats)
        finally:
            os.close(fd)
        await send(attrs)
        return
    if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
        first = stats.seen.get((st.st_dev, st.st_ino))
        if first is not None:
            stats.links += 1
            await send(Op(OpKind.LINK, root, first, path2=path))
            return
        stats.seen[(st.st_dev, st.st_ino)] = path
    if stat.S_ISLNK(st.st_mode):
        target = os.readlink(name, dir_fd=dir_fd)
        await send(Op(OpKind.SYMLINK, root, path, path2=target, uid=st.st_uid, gid=st.st_gid))
        await send(Op(OpKind.SETATTR, root, path, uid=st.st_uid, gid=st.st_gid,
                      mtime_ns=st.st_mtime_ns, flags=_LINK_ATTRS))
        return
    if stat.S_ISREG(st.st_mode):
        stats.files += 1
        await send(Op(OpKind.CREATE, root, path, mode=mode, uid=st.st_uid, gid=st.st_gid))
        stats.bytes += await _copy_data(root, dir_fd, name, path, st.st_size, send)
        await send(Op(OpKind.TRUNCATE, root, path, length=st.st_size))
    else:  # fifo, socket, device node
        await send(Op(OpKind.MKNOD, root, path, mode=st.st_mode, rdev=st.st_rdev,
                      uid=st.st_uid, gid=st.st_gid))
    await send(attrs)


async def _copy_data(root: int, dir_fd: int, name: str, path: str, size: int,
                     send: Submit) -> int:
    """Send the file's data extents only (SEEK_DATA / SEEK_HOLE): sparse files stay sparse."""
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dir_fd)
    sent = 0
    try:
        for start, end in extents(fd, size):
            offset = start
            while offset < end:
                data = os.pread(fd, min(CHUNK, end - offset), offset)
                if not data:
                    break
                await send(Op(OpKind.WRITE, root, path, offset=offset, data=data))
                offset += len(data)
                sent += len(data)
    finally:
        os.close(fd)
    return sent


def extents(fd: int, size: int) -> list[tuple[int, int]]:
    extents = []
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # only a hole remains
                break
            return [(0, size)]  # no SEEK_DATA here: copy everything
        end = os.lseek(fd, start, os.SEEK_HOLE)
        extents.append((start, min(end, size)))
        offset = end
    return extents
