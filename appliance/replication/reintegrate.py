"""Reintegration: bring the secondary's copy level with the primary's by sending only what differs.

`plan` is pure: from both trees (inventory.Entry per path), both journals' dirt and the crash
rule's thresholds it decides, per entry, what to do on the secondary:

- an entry only the secondary has, or of another type (or a symlink with another target, a node
  with another device number, a file in another hard-link group): removed there, deepest first;
- an entry only the primary has: made there (a file with all its data; the further names of a
  hard-linked file as LINKs);
- a file both have: its data job, `whole` (every byte: created or renamed over since), `zones`
  (the journal's byte ranges: the normal case), `compare` (block checksums of both sides: the
  journal does not cover it, or it is suspect after a crash, or size/mtime differ without a
  recorded reason) or none;
- attributes (mode, owner, mtime) where they differ or the entry changed; directories last,
  deepest first, so that their mtime is the primary's once their entries are in place.

Modes: "journal" when both journals followed every change since the copies were identical, so
an unrecorded file is equal on both sides; "checksum" otherwise (first start with data on both
sides, lost journal, interrupted copy): every file both have is compared.

`execute` runs a plan against the live tree: it reads the primary's data when it sends it, and
skips what vanished meanwhile (the caller's final frozen pass settles every such race).
"""

from __future__ import annotations

import bisect
import errno
import os
import stat
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import trio

from appliance.replication import inventory
from appliance.replication.applier import (
    ASIDE_DIR,
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    NOT_A_FILE,
    ConfinementError,
    confined_parent,
    open_for_reading,
)
from appliance.replication.inventory import CHUNK, Entry, extents
from appliance.replication.journal import Dirt, RangeSet
from appliance.replication.protocol import Op, OpKind, SetattrField

_ATTRS = SetattrField.MODE | SetattrField.UID | SetattrField.GID | SetattrField.MTIME
_LINK_ATTRS = SetattrField.UID | SetattrField.GID | SetattrField.MTIME
_PUNCH = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
COMPARE_JOBS = 4  # files compared at once (their checksums pipeline on both sides)


@dataclass(frozen=True)
class Side:
    """One node's description of one replicated dir."""

    entries: dict[str, Entry]  # path -> entry, in listing order (parents first)
    root: Entry | None = None  # the replicated dir itself
    dirt: Dirt = field(default_factory=Dirt)
    suspect_since: float | None = None  # wall seconds: newer ctimes are suspect

    def suspect(self, entry: Entry) -> bool:
        return self.suspect_since is not None and entry.ctime_ns >= self.suspect_since * 1e9


@dataclass(frozen=True)
class DataJob:
    path: str
    how: str  # "whole" | "zones" | "compare"
    zones: RangeSet | None = None


@dataclass
class Plan:
    remove: list[Entry] = field(default_factory=list)  # secondary's entries, deepest first
    make: list[Entry] = field(default_factory=list)  # primary's entries, parents first
    links: list[tuple[str, str]] = field(default_factory=list)  # (made or kept name, new name)
    data: list[DataJob] = field(default_factory=list)
    attrs: list[Entry] = field(default_factory=list)  # non-directories
    dir_attrs: list[Entry] = field(default_factory=list)  # deepest first, the root last

    def __bool__(self) -> bool:
        return bool(self.remove or self.make or self.links or self.data or self.attrs
                    or self.dir_attrs)


def _parent(path: str) -> str:
    cut = path.rfind("/")
    return path[:cut] if cut >= 0 else ""


def _depth(path: str) -> int:
    return path.count("/") + 1 if path else 0


def _groups(entries: dict[str, Entry]) -> dict[tuple[int, int] | str, list[str]]:
    """Regular files by identity: the names of each hard-link group, sorted."""
    out: dict[tuple[int, int] | str, list[str]] = defaultdict(list)
    for path, e in entries.items():
        if e.kind == "f":
            out[e.identity].append(path)
    for names in out.values():
        names.sort()
    return out


def _same_node(s: Entry, t: Entry) -> bool:
    if s.kind != t.kind:
        return False
    if s.kind == "l":
        return s.target == t.target
    if s.kind == "n":
        return stat.S_IFMT(s.mode) == stat.S_IFMT(t.mode) and s.rdev == t.rdev
    return True


def plan(src: Side, dst: Side, mode: str) -> Plan:
    """What to send so that `dst` (the secondary) ends up like `src` (the primary)."""
    if mode not in ("journal", "checksum"):
        raise ValueError(mode)
    p = Plan()
    removed: set[str] = set()
    changed_dirs: set[str] = set()

    ordered = sorted(dst.entries)

    def remove(path: str) -> None:
        if path in removed:
            return
        removed.add(path)
        changed_dirs.add(_parent(path))
        # Everything below path sorts between "path/" and "path0" ("0" follows "/").
        start = bisect.bisect_left(ordered, path + "/")
        removed.update(ordered[start:bisect.bisect_left(ordered, path + "0")])

    for path, t in dst.entries.items():
        s = src.entries.get(path)
        if s is None or not _same_node(s, t):
            remove(path)

    s_groups, t_groups = _groups(src.entries), _groups(dst.entries)
    made: set[str] = set()
    linked: set[str] = set()
    for names in s_groups.values():
        t0 = dst.entries.get(names[0])
        kept = (t0 is not None and t0.kind == "f"
                and all(n not in removed and dst.entries.get(n) is not None
                        and dst.entries[n].identity == t0.identity for n in names)
                and t_groups.get(t0.identity) == names)
        if kept:
            job = _data_job(names, src, dst, mode)
            if job is not None:
                p.data.append(job)
            s, t = src.entries[names[0]], dst.entries[names[0]]
            if job is not None or s.same_attrs_key != t.same_attrs_key:
                p.attrs.append(s)
            continue
        for n in names:
            if n in dst.entries:
                remove(n)
        made.add(names[0])
        for n in names[1:]:
            linked.add(n)
            p.links.append((names[0], n))
            changed_dirs.add(_parent(n))

    for path, s in src.entries.items():
        if path in linked:
            continue
        t = dst.entries.get(path)
        if path in made or t is None or path in removed:
            p.make.append(s)
            changed_dirs.add(_parent(path))
        elif s.kind in ("l", "n") and s.same_attrs_key != t.same_attrs_key:
            p.attrs.append(s)

    p.remove = sorted((dst.entries[r] for r in removed if r in dst.entries),
                      key=lambda e: (-_depth(e.path), e.path))
    made_dirs = {e.path for e in p.make if e.kind == "d"}
    for path, s in src.entries.items():
        if s.kind != "d" or path in made_dirs:
            continue  # a made directory gets its attributes when it is made... and below
        t = dst.entries.get(path)
        if path in changed_dirs or t is None or s.same_attrs_key != t.same_attrs_key:
            p.dir_attrs.append(s)
    for path in made_dirs:  # entries were made inside after the MKDIR: mtime again
        p.dir_attrs.append(src.entries[path])
    p.dir_attrs.sort(key=lambda e: (-_depth(e.path), e.path))
    if src.root is not None and ("" in changed_dirs or dst.root is None
                                 or src.root.same_attrs_key != dst.root.same_attrs_key):
        p.dir_attrs.append(src.root)
    return p


def _data_job(names: list[str], src: Side, dst: Side, mode: str) -> DataJob | None:
    path = names[0]
    s, t = src.entries[path], dst.entries[path]
    if any(src.dirt.is_whole(n) or dst.dirt.is_whole(n) for n in names):
        return DataJob(path, "whole")
    if mode == "checksum" or src.suspect(s) or dst.suspect(t):
        return DataJob(path, "compare")
    zones = RangeSet()
    for n in names:
        for d in (src.dirt, dst.dirt):
            ranges = d.zones.get(n)
            if ranges is not None:
                zones.update(ranges)
    if zones:
        return DataJob(path, "zones", zones)
    if s.size != t.size:
        return DataJob(path, "compare")  # a change nothing recorded: look rather than trust
    if s.mtime_ns != t.mtime_ns and not any(n in d.touched for n in names
                                            for d in (src.dirt, dst.dirt)):
        return DataJob(path, "compare")  # not explained by a recorded utime/chmod either
    return None


# -- execution ------------------------------------------------------------------------------------

T = TypeVar("T")
Submit = Callable[[Op], Awaitable[None]]
Query = Callable[[Op], Awaitable[bytes]]


@dataclass
class Stats:
    bytes: int = 0  # data sent
    ops: int = 0
    removed: int = 0
    made: int = 0
    compared: int = 0
    compared_bytes: int = 0
    files: int = 0  # files whose data was sent (whole, zones or differing blocks)

    def add(self, other: Stats) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


class Executor:
    """Runs plans of one replicated dir: reads the primary's tree through `root_fd` (opened
    before the mount) and sends ops through `submit` / `query` (the reintegration sender)."""

    def __init__(self, root: int, root_fd: int, submit: Submit, query: Query,
                 workers: int = 1) -> None:
        self.root = root
        self.root_fd = root_fd
        self._submit = submit
        self._query = query
        self.workers = max(1, workers)
        self.stats = Stats()

    async def send(self, op: Op) -> None:
        self.stats.ops += 1
        if op.kind is OpKind.WRITE:
            self.stats.bytes += len(op.data)
        await self._submit(op)

    def _op(self, kind: OpKind, path: str, **fields: object) -> Op:
        return Op(kind, self.root, path, **fields)  # type: ignore[arg-type]

    def _in_parent(self, path: str, fn: Callable[[int, str], T]) -> T | None:
        """fn(fd of path's directory, last name), or None when the path vanished meanwhile
        (or a symlink appeared in it: never followed)."""
        try:
            with confined_parent(self.root_fd, path) as (fd, name):
                return fn(fd, name)
        except (FileNotFoundError, NotADirectoryError, ConfinementError):
            return None
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENXIO):
                return None
            raise

    def _lstat(self, path: str) -> os.stat_result | None:
        return self._in_parent(path, lambda fd, name: os.stat(name, dir_fd=fd,
                                                              follow_symlinks=False))

    def _readlink(self, path: str) -> str | None:
        return self._in_parent(path, lambda fd, name: os.readlink(name, dir_fd=fd))

    def _open(self, path: str) -> int | None:
        return self._in_parent(path, open_for_reading)

    async def run(self, p: Plan) -> Stats:
        self.stats = Stats()
        for e in p.remove:
            await self.send(self._op(OpKind.RMDIR if e.kind == "d" else OpKind.UNLINK, e.path))
            self.stats.removed += 1
        for e in p.make:
            await self._make(e)
        for first, name in p.links:
            if self._lstat(first) is not None:
                await self.send(self._op(OpKind.LINK, first, path2=name))
        await self._data(p.data)
        for e in p.attrs:
            await self._attrs(e.path)
        for e in p.dir_attrs:
            await self._attrs("" if e.path == "." else e.path)
        return self.stats

    async def _make(self, e: Entry) -> None:
        st = self._lstat(e.path)
        if st is None:
            return  # gone since the listing: nothing to make (the final pass agrees)
        mode = stat.S_IMODE(st.st_mode)
        self.stats.made += 1
        if stat.S_ISDIR(st.st_mode):
            # Its attributes come with dir_attrs, once its entries are made.
            await self.send(self._op(OpKind.MKDIR, e.path, mode=mode, uid=st.st_uid,
                                     gid=st.st_gid))
            return
        if stat.S_ISLNK(st.st_mode):
            target = self._readlink(e.path)
            if target is None:
                return
            await self.send(self._op(OpKind.SYMLINK, e.path, path2=target, uid=st.st_uid,
                                     gid=st.st_gid))
        elif stat.S_ISREG(st.st_mode):
            await self.send(self._op(OpKind.CREATE, e.path, mode=mode, uid=st.st_uid,
                                     gid=st.st_gid))
            await self._whole(e.path, truncate_first=False)
        else:
            await self.send(self._op(OpKind.MKNOD, e.path, mode=st.st_mode, rdev=st.st_rdev,
                                     uid=st.st_uid, gid=st.st_gid))
        await self._attrs(e.path)

    async def _attrs(self, path: str) -> None:
        st = os.stat(self.root_fd) if path == "" else self._lstat(path)
        if st is None:
            return
        if stat.S_ISLNK(st.st_mode):
            op = self._op(OpKind.SETATTR, path, uid=st.st_uid, gid=st.st_gid,
                          mtime_ns=st.st_mtime_ns, flags=_LINK_ATTRS)
        else:
            op = self._op(OpKind.SETATTR, path, mode=stat.S_IMODE(st.st_mode), uid=st.st_uid,
                          gid=st.st_gid, mtime_ns=st.st_mtime_ns, flags=_ATTRS)
        await self.send(op)

    # -- data ------------------------------------------------------------------------------------

    async def _data(self, jobs: list[DataJob]) -> None:
        compares = [j for j in jobs if j.how == "compare"]
        for job in jobs:
            if job.how == "whole":
                await self._whole(job.path, truncate_first=True)
            elif job.how == "zones":
                assert job.zones is not None
                await self._ranges(job.path, list(job.zones))
        if not compares:
            return
        # Checksums: several files at once so both sides' hashing and the network overlap.
        limit = trio.Semaphore(COMPARE_JOBS)
        async with trio.open_nursery() as nursery:
            for job in compares:
                await limit.acquire()
                nursery.start_soon(self._compare_then_release, job.path, limit)

    async def _compare_then_release(self, path: str, limit: trio.Semaphore) -> None:
        try:
            await self._compare(path)
        finally:
            limit.release()

    async def _whole(self, path: str, *, truncate_first: bool) -> None:
        fd = self._open(path)
        if fd is None:
            return
        try:
            size = os.fstat(fd).st_size
            if truncate_first:
                await self.send(self._op(OpKind.TRUNCATE, path, length=0))
            self.stats.files += 1
            for start, end in extents(fd, size):
                await self._send_data(fd, path, start, end)
            await self.send(self._op(OpKind.TRUNCATE, path, length=size))
        finally:
            os.close(fd)

    async def _ranges(self, path: str, ranges: list[tuple[int, int]]) -> None:
        """Send the primary's bytes of `ranges` (data as WRITEs, holes punched), then its size."""
        fd = self._open(path)
        if fd is None:
            return
        try:
            size = os.fstat(fd).st_size
            data = extents(fd, size)
            if ranges:
                self.stats.files += 1
            for start, end in ranges:
                end = min(end, size)
                if start >= end:
                    continue
                cursor = start
                for d_start, d_end in data:
                    lo, hi = max(start, d_start), min(end, d_end)
                    if lo >= hi:
                        continue
                    if lo > cursor:
                        await self._punch(path, cursor, lo)
                    await self._send_data(fd, path, lo, hi)
                    cursor = hi
                if cursor < end:
                    await self._punch(path, cursor, end)
            await self.send(self._op(OpKind.TRUNCATE, path, length=size))
        finally:
            os.close(fd)

    async def _punch(self, path: str, start: int, end: int) -> None:
        await self.send(self._op(OpKind.FALLOCATE, path, offset=start, length=end - start,
                                 flags=_PUNCH))

    async def _send_data(self, fd: int, path: str, start: int, end: int) -> None:
        offset = start
        while offset < end:
            data = os.pread(fd, min(CHUNK, end - offset), offset)
            if not data:
                return  # the file got shorter meanwhile (the final pass settles it)
            await self.send(self._op(OpKind.WRITE, path, offset=offset, data=data))
            offset += len(data)

    async def _compare(self, path: str) -> None:
        fd = self._open(path)
        if fd is None:
            return
        answers: list[bytes] = []

        async def theirs() -> None:
            answers.append(await self._query(self._op(OpKind.SUMS, path,
                                                      length=inventory.BLOCK)))
        try:
            size = os.fstat(fd).st_size
            async with trio.open_nursery() as nursery:  # both sides hash at the same time
                nursery.start_soon(theirs)
                mine = await trio.to_thread.run_sync(
                    inventory.block_sums, fd, size, inventory.BLOCK, self.workers)
        finally:
            os.close(fd)
        answer = answers[0]
        t_size = int.from_bytes(answer[:8], "big")
        self.stats.compared += 1
        self.stats.compared_bytes += size
        if t_size == NOT_A_FILE:
            await self._whole(path, truncate_first=True)
            return
        ranges = inventory.differing_blocks(mine, answer[8:], size, inventory.BLOCK)
        if ranges or t_size != size:
            await self._ranges(path, ranges)


def peer_side(payload: bytes, root: int) -> tuple[dict[str, object], Side]:
    """The secondary's answer to LIST for dir `root`: its journal's summary ({} when it has
    none) and its Side. ValueError when the answer is malformed."""
    try:
        header, entries = inventory.decode_listing(payload)
        summary = header.get("journal") or {}
        roots = summary.get("roots") or []
        dirt = Dirt.from_json(roots[root]) if len(roots) > root else Dirt()
        suspect = summary.get("suspect_since")
        top = inventory.Entry.from_json(header["root"]) if "root" in header else None
    except (KeyError, TypeError, IndexError, AttributeError) as e:
        raise ValueError(f"malformed listing: {e!r}") from None
    return summary, Side({e.path: e for e in entries}, top, dirt,
                         float(suspect) if isinstance(suspect, int | float) else None)


async def sync_pass(root: int, root_fd: int, peer: Side, dirt: Dirt, suspect_since: float | None,
                    mode: str, submit: Submit, query: Query, workers: int) -> Stats:
    """One pass over dir `root`: list this side, plan against `peer`, send."""
    entries = await trio.to_thread.run_sync(inventory.list_tree, root_fd, ASIDE_DIR)
    mine = Side({e.path: e for e in entries}, inventory.root_entry(root_fd), dirt, suspect_since)
    return await Executor(root, root_fd, submit, query, workers).run(plan(mine, peer, mode))


def describe(stats: Stats, took: float) -> str:
    mib = stats.bytes / 1048576
    parts = [f"{mib:.1f} MiB in {stats.files} files"]
    if stats.compared:
        parts.append(f"{stats.compared} files ({stats.compared_bytes / 1048576:.1f} MiB) "
                     "compared by checksums")
    if stats.made or stats.removed:
        parts.append(f"{stats.made} entries made, {stats.removed} removed")
    return ", ".join(parts) + f", {took:.3f} s"

