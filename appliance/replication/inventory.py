"""What a replicated directory holds, as both nodes can describe it: the tree and block checksums.

Reintegration compares the primary's tree with the secondary's (`list_tree` on each side, the
secondary's sent back in answer to a LIST query) and, where the journal cannot say which bytes
of a file differ, compares block checksums (`block_sums`, an answer to SUMS) computed by `nbrei`
worker threads on each side (os.pread and hashlib release the GIL, so the workers really run
in parallel).

An entry is recorded with everything the comparison needs: type, permissions, owner, size,
mtime, ctime (any change sets it and nothing can set it back: the crash rule of the journal
uses it), inode number and link count (hard-link groups), device number, symlink target.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

CHUNK = 1024 * 1024  # data per WRITE op when a file's content is sent
DIGEST_BYTES = 16
BLOCK = 128 * 1024  # checksum block: 8192 digests (128 KiB) for a 1 GiB file
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True)
class Entry:
    path: str  # relative to the replicated dir, "/"-separated, never empty
    kind: str  # "d" directory, "f" regular file, "l" symlink, "n" other node (fifo, device...)
    mode: int  # st_mode (type bits included)
    uid: int
    gid: int
    size: int
    mtime_ns: int
    ctime_ns: int
    ino: int
    nlink: int
    rdev: int = 0
    target: str = ""  # symlink target
    dev: int = 0  # with ino, the file's identity (a nested mount has inodes of its own)

    def to_json(self) -> list[Any]:
        return [self.path, self.kind, self.mode, self.uid, self.gid, self.size, self.mtime_ns,
                self.ctime_ns, self.ino, self.nlink, self.rdev, self.target, self.dev]

    @property
    def identity(self) -> tuple[int, int] | str:
        """Hard-link group key: (dev, ino) for a file with several names, else its path."""
        return (self.dev, self.ino) if self.nlink > 1 else self.path

    @classmethod
    def from_json(cls, row: Any) -> Entry:
        if not isinstance(row, list) or len(row) != 13:
            raise ValueError(f"bad tree entry {row!r}")
        path, kind, target = row[0], row[1], row[11]
        numbers = row[2:11]
        dev = row[12]
        if not isinstance(dev, int) or isinstance(dev, bool):
            raise ValueError(f"bad tree entry {row!r}")
        if (not isinstance(path, str) or not path or kind not in ("d", "f", "l", "n")
                or not isinstance(target, str)
                or not all(isinstance(n, int) and not isinstance(n, bool) for n in numbers)):
            raise ValueError(f"bad tree entry {row!r}")
        return cls(path, kind, *numbers, target=target, dev=dev)

    @property
    def same_attrs_key(self) -> tuple[int, int, int, int]:
        return (stat.S_IMODE(self.mode), self.uid, self.gid, self.mtime_ns)


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "d"
    if stat.S_ISREG(mode):
        return "f"
    if stat.S_ISLNK(mode):
        return "l"
    return "n"


def entry_from_stat(path: str, st: os.stat_result, target: str = "") -> Entry:
    return Entry(path, _kind(st.st_mode), st.st_mode, st.st_uid, st.st_gid,
                 st.st_size if stat.S_ISREG(st.st_mode) else 0, st.st_mtime_ns, st.st_ctime_ns,
                 st.st_ino, st.st_nlink, st.st_rdev, target, st.st_dev)


def list_tree(root_fd: int, skip: str) -> list[Entry]:
    """Every entry below the directory open as `root_fd`, parents before their contents,
    names sorted; `skip` at the top is left out (what a previous resync set aside)."""
    return list(_walk(root_fd, "", skip))


def _walk(dir_fd: int, rel: str, skip: str) -> Iterator[Entry]:
    for name in sorted(os.listdir(dir_fd)):
        if not rel and name == skip:
            continue
        path = f"{rel}/{name}" if rel else name
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            target = os.readlink(name, dir_fd=dir_fd) if stat.S_ISLNK(st.st_mode) else ""
        except FileNotFoundError:
            continue  # removed while we looked (the primary's tree may be live)
        yield entry_from_stat(path, st, target)
        if stat.S_ISDIR(st.st_mode):
            try:
                fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
            except (FileNotFoundError, NotADirectoryError):
                continue
            try:
                yield from _walk(fd, path, skip)
            finally:
                os.close(fd)


def root_entry(root_fd: int) -> Entry:
    return entry_from_stat(".", os.stat(root_fd))


def encode_listing(header: dict[str, Any], entries: list[Entry]) -> bytes:
    """JSON lines: the header, then one entry per line (any file name: surrogate escapes)."""
    lines = [json.dumps(header)]
    lines.extend(json.dumps(e.to_json()) for e in entries)
    return "\n".join(lines).encode("utf-8", "surrogatepass")


def decode_listing(payload: bytes) -> tuple[dict[str, Any], list[Entry]]:
    text = payload.decode("utf-8", "surrogatepass")
    first, *rest = text.split("\n")
    header = json.loads(first)
    if not isinstance(header, dict):
        raise ValueError("listing header is not an object")
    return header, [Entry.from_json(json.loads(line)) for line in rest if line]


# -- block checksums --------------------------------------------------------------------------


def _sum_range(fd: int, start: int, end: int, block: int) -> bytes:
    out = []
    offset = start
    while offset < end:
        data = os.pread(fd, min(block, end - offset), offset)
        out.append(hashlib.blake2b(data, digest_size=DIGEST_BYTES).digest())
        if len(data) < min(block, end - offset):
            break  # the file got shorter: no more blocks
        offset += block
    return b"".join(out)


def block_sums(fd: int, size: int, block: int = BLOCK, workers: int = 1,
               pool: ThreadPoolExecutor | None = None) -> bytes:
    """Digest of each `block` bytes of the first `size` bytes of fd (the last block may be
    short), computed by `workers` threads each taking a contiguous run of blocks."""
    if size <= 0:
        return b""
    blocks = -(-size // block)
    workers = max(1, min(workers, blocks))
    if workers == 1:
        return _sum_range(fd, 0, size, block)
    per = -(-blocks // workers)
    bounds = [(i * per * block, min(size, (i + 1) * per * block)) for i in range(workers)]
    own = pool is None
    executor = pool or ThreadPoolExecutor(workers, thread_name_prefix="nbrei")
    try:
        parts = executor.map(lambda b: _sum_range(fd, b[0], b[1], block), bounds)
        return b"".join(parts)
    finally:
        if own:
            executor.shutdown()


def differing_blocks(mine: bytes, theirs: bytes, size: int, block: int) -> list[tuple[int, int]]:
    """Byte ranges [start, end) of `size` whose block digests differ (or are missing there)."""
    ranges: list[tuple[int, int]] = []
    blocks = -(-size // block) if size > 0 else 0
    for i in range(blocks):
        a = mine[i * DIGEST_BYTES:(i + 1) * DIGEST_BYTES]
        b = theirs[i * DIGEST_BYTES:(i + 1) * DIGEST_BYTES]
        if a != b or not a:
            start, end = i * block, min(size, (i + 1) * block)
            if ranges and ranges[-1][1] == start:
                ranges[-1] = (ranges[-1][0], end)
            else:
                ranges.append((start, end))
    return ranges


def extents(fd: int, size: int) -> list[tuple[int, int]]:
    """The file's data extents (SEEK_DATA / SEEK_HOLE): what to send so that holes stay
    holes. Everything when the filesystem cannot tell."""
    out = []
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # only a hole remains
                break
            return [(0, size)]  # no SEEK_DATA here: copy everything
        end = os.lseek(fd, start, os.SEEK_HOLE)
        out.append((start, min(end, size)))
        offset = end
    return out
