"""The dirty-zone journal: where this node's data may differ from its peer's, kept across crashes.

What it records, per replicated dir:
- zones: byte ranges of files written (WRITE, FALLOCATE) or cut (TRUNCATE: from the new size to
  the end) since the copies were last identical;
- whole: paths whose every byte must be sent (a file created or renamed over, a directory
  renamed: everything below it).
Namespace and attribute changes need no record: reintegration compares both trees anyway.

Two ways ops arrive:
- streaming (a synchronised peer): `note` appends every op to the current epoch, cheaply. The
  replication service closes the epoch every second (`rotate`) and sends a SYNC barrier; once
  the peer acknowledged it durably, that epoch is forgotten (`durable`). Epochs still open are
  exactly what the peer may not have on its disk (acknowledged on receipt is not on disk);
- alone (no stream, or it broke): `record` puts ops straight into the zones, and `spill` moves
  the open epochs there when the stream breaks.

Reintegration takes what is recorded (`take`: a snapshot; new writes keep being recorded),
sends it, and forgets it only once the peer acknowledged the copy durably (`commit`), or puts
it back (`abort`). Until then the snapshot stays in the file.

Persistence: `state()` is a JSON document written atomically (tmp + fsync + rename) by the
service every second when something changed and on an orderly stop (clean=True). After a crash
the last seconds may be missing, so the loaded journal sets `suspect_since` to the time up to
which it was complete (minus a margin): any file whose ctime is newer is compared by checksums.
ctime is set by every change and cannot be set back by applications, so nothing escapes.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.replication.protocol import Op, OpKind

END = 2**63 - 1  # "to the end of the file"
SUSPECT_MARGIN_S = 10.0  # at least: ops in flight from a mount, clock granularity
MAX_RANGES = 2048  # per file; beyond, its zones are coarsened to COARSE-byte blocks
COARSE = 1024 * 1024
_VERSION = 1


class RangeSet:
    """Disjoint, sorted, merged [start, end) byte ranges."""

    __slots__ = ("_ends", "_starts")

    def __init__(self, ranges: Iterable[tuple[int, int]] = ()) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        for start, end in ranges:
            self.add(start, end)

    def add(self, start: int, end: int) -> None:
        if end <= start:
            return
        i = bisect.bisect_left(self._ends, start)  # first range that ends at or after start
        j = bisect.bisect_right(self._starts, end)  # ranges from i to j-1 touch [start, end)
        if i < j:
            start = min(start, self._starts[i])
            end = max(end, self._ends[j - 1])
        self._starts[i:j] = [start]
        self._ends[i:j] = [end]

    def update(self, other: RangeSet) -> None:
        for start, end in other:
            self.add(start, end)

    def __iter__(self) -> Any:
        return iter(zip(self._starts, self._ends, strict=True))

    def __bool__(self) -> bool:
        return bool(self._starts)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RangeSet) and list(self) == list(other)

    def __repr__(self) -> str:
        return f"RangeSet({list(self)!r})"

    def __len__(self) -> int:
        return len(self._starts)

    def coarsened(self, block: int) -> RangeSet:
        """The same ranges widened to whole `block`s (fewer, larger ranges)."""
        return RangeSet((s - s % block, min(END, -(-e // block) * block)) for s, e in self)

    def total(self, size: int = END) -> int:
        return sum(max(0, min(end, size) - start) for start, end in self if start < size)

    def to_json(self) -> list[list[int]]:
        return [[s, e] for s, e in self]

    @classmethod
    def from_json(cls, value: Any) -> RangeSet:
        if not isinstance(value, list):
            raise ValueError("ranges must be a list")
        out = cls()
        for item in value:
            if (not isinstance(item, list) or len(item) != 2
                    or not all(isinstance(v, int) and not isinstance(v, bool) for v in item)):
                raise ValueError(f"bad range {item!r}")
            out.add(item[0], item[1])
        return out


@dataclass
class Dirt:
    """Zones and whole paths of one replicated dir, and the paths of every other recorded
    change (namespace, attributes: no bytes to send, yet the copies differ there)."""

    zones: dict[str, RangeSet] = field(default_factory=dict)
    whole: set[str] = field(default_factory=set)
    touched: set[str] = field(default_factory=set)

    def zone(self, path: str, start: int, end: int) -> None:
        ranges = self.zones.get(path)
        if ranges is None:
            ranges = self.zones[path] = RangeSet()
        ranges.add(start, end)
        if len(ranges) > MAX_RANGES:  # random small writes: bounded memory and file size
            self.zones[path] = ranges.coarsened(COARSE)

    def merge(self, other: Dirt) -> None:
        for path, ranges in other.zones.items():
            mine = self.zones.get(path)
            if mine is None:
                self.zones[path] = RangeSet(ranges)
            else:
                mine.update(ranges)
        self.whole |= other.whole
        self.touched |= other.touched

    def is_whole(self, path: str) -> bool:
        """The path or a directory above it was marked whole."""
        if not self.whole:
            return False
        while True:
            if path in self.whole:
                return True
            cut = path.rfind("/")
            if cut < 0:
                return False
            path = path[:cut]

    def __bool__(self) -> bool:
        return bool(self.zones or self.whole or self.touched)

    def volume(self) -> int:
        """Bytes recorded (a cut "to the end of the file" counts for nothing: no data)."""
        return sum(t for t in (r.total() for r in self.zones.values()) if t < END // 2)

    def to_json(self) -> dict[str, Any]:
        return {"zones": {p: r.to_json() for p, r in self.zones.items()},
                "whole": sorted(self.whole), "touched": sorted(self.touched)}

    @classmethod
    def from_json(cls, value: Any) -> Dirt:
        if not isinstance(value, dict):
            raise ValueError("dirt must be an object")
        zones = value.get("zones", {})
        whole = value.get("whole", [])
        if not isinstance(zones, dict) or not isinstance(whole, list):
            raise ValueError("bad zones/whole")
        if not all(isinstance(p, str) for p in whole):
            raise ValueError("whole paths must be strings")
        touched = value.get("touched", [])
        if not isinstance(touched, list) or not all(isinstance(p, str) for p in touched):
            raise ValueError("touched paths must be strings")
        return cls({str(p): RangeSet.from_json(r) for p, r in zones.items()}, set(whole),
                   set(touched))


# What an op changes, without its data: (root, "z"one start end | "w"hole | "o"p only, path).
Mark = tuple[int, str, str, int, int]


def marks_of(op: Op) -> tuple[Mark, ...]:
    """What `op` makes different from the peer's copy ("o": only that something changed, the
    tree comparison finds what; nothing for FSYNC and SYNC, which change nothing)."""
    match op.kind:
        case OpKind.WRITE:
            return ((op.root, "z", op.path, op.offset, op.offset + len(op.data)),)
        case OpKind.FALLOCATE:
            return ((op.root, "z", op.path, op.offset, op.offset + op.length),)
        case OpKind.TRUNCATE:
            return ((op.root, "z", op.path, op.length, END),)
        case OpKind.CREATE | OpKind.MKNOD | OpKind.SYMLINK:
            return ((op.root, "w", op.path, 0, 0),)
        case OpKind.RENAME:  # RENAME_EXCHANGE: both names change content
            return ((op.root, "w", op.path2, 0, 0), (op.root, "w", op.path, 0, 0))
        case OpKind.LINK:
            return ((op.root, "w", op.path2, 0, 0),)
        case OpKind.FSYNC | OpKind.SYNC:
            return ()
    return ((op.root, "o", op.path, 0, 0),)


def apply_marks(dirt: list[Dirt], marks: Iterable[Mark]) -> None:
    for root, what, path, start, end in marks:
        if not 0 <= root < len(dirt):
            continue
        d = dirt[root]
        if what == "z":
            d.zone(path, start, end)
        elif what == "w":
            d.whole.add(path)
        else:
            d.touched.add(path)


@dataclass
class Snapshot:
    """What a reintegration pass took from the journal."""

    dirt: list[Dirt]
    suspect_since: float | None


class DirtyJournal:
    """One module's journal on one node (see the module docstring)."""

    def __init__(self, path: Path, roots: int, margin_s: float = SUSPECT_MARGIN_S) -> None:
        self.path = path
        self.roots = roots
        # How late an op may be recorded after the application's change reached the disk
        # (it travels from the mount, then may wait for room in the window).
        self.margin_s = max(SUSPECT_MARGIN_S, margin_s)
        self.base: list[Any] | None = None  # generation of the last identical copies
        self.valid = False  # the journal has followed every change since `base`
        self.torn = False  # a copy INTO this node is under way: its data is not a whole copy
        self.suspect_since: float | None = None  # crash rule: files changed later are suspect
        self.dirt = [Dirt() for _ in range(roots)]
        self.taken: list[Snapshot] = []
        self._epochs: list[tuple[int, float, list[Mark]]] = []  # (id, wall start, marks)
        self._next_epoch = 1
        self._current: list[Mark] = []
        self._current_started = time.time()
        self.writing = False  # this node's application writes (primary): see load()
        self.changed = True

    # -- loading -----------------------------------------------------------------------------

    def load(self) -> str:
        """Read the file; returns a sentence for the module log."""
        try:
            data = json.loads(self.path.read_text())
            self._from_state(data)
        except FileNotFoundError:
            self.valid = False
            return "no dirty-zone journal yet: the first reintegration compares checksums"
        except (OSError, ValueError, KeyError, TypeError) as e:
            self.valid = False
            self.dirt = [Dirt() for _ in range(self.roots)]
            self._quarantine()
            return (f"dirty-zone journal {self.path} unreadable ({e}): set aside; the next "
                    "reintegration compares checksums")
        clean = bool(data.get("clean"))
        complete = float(data.get("complete_before", 0.0)) - self.margin_s
        when = time.strftime("%H:%M:%S", time.localtime(complete))
        # After a clean stop the directories were plain ones: what anybody wrote there since
        # was not recorded. After a crash, only a node whose application was writing can hold
        # changes it did not record (a secondary's copy is a prefix of its primary's stream,
        # which the primary accounts for).
        if clean or data.get("writing"):
            self._suspect_from(complete)
        if not clean and data.get("writing"):
            return ("dirty-zone journal loaded after an unclean stop: files changed since "
                    f"{when} will be compared by checksums")
        if clean:
            return (f"dirty-zone journal loaded (files changed since the stop at {when} are "
                    "compared)")
        return "dirty-zone journal loaded (this node was not writing when it stopped)"

    def _suspect_from(self, since: float) -> None:
        self.suspect_since = since if self.suspect_since is None else min(self.suspect_since,
                                                                          since)
        self.changed = True

    def _quarantine(self) -> None:
        with contextlib.suppress(OSError):
            self.path.rename(self.path.with_suffix(f".bad-{int(time.time())}"))

    def _from_state(self, data: Any) -> None:
        if not isinstance(data, dict) or data.get("version") != _VERSION:
            raise ValueError("unknown journal version")
        roots = data["roots"]
        if not isinstance(roots, list) or len(roots) != self.roots:
            raise ValueError(f"journal has {len(roots)} dirs, config has {self.roots}")
        base = data.get("base")
        if base is not None and not isinstance(base, list):
            raise ValueError("bad base")
        suspect = data.get("suspect_since")
        if suspect is not None and not isinstance(suspect, int | float):
            raise ValueError("bad suspect_since")
        self.base = base
        self.valid = bool(data.get("valid")) and base is not None
        self.torn = bool(data.get("torn"))
        self.suspect_since = float(suspect) if suspect is not None else None
        self.dirt = [Dirt.from_json(r) for r in roots]

    # -- state ---------------------------------------------------------------------------------

    def all_dirt(self) -> list[Dirt]:
        """Recorded zones, snapshots being reintegrated and open epochs: everything that may
        differ on the peer."""
        out = self.recorded()
        for _, _, marks in self._epochs:
            apply_marks(out, marks)
        apply_marks(out, self._current)
        return out

    def complete_before(self) -> float:
        """Every change before this wall time is in the file (or durably on the peer)."""
        if self._epochs:
            return self._epochs[0][1]
        if self._current:
            return self._current_started
        return time.time()

    def state(self, *, clean: bool = False) -> dict[str, Any]:
        # Open epochs are not written: after a crash, `complete_before` (the oldest one's
        # start) makes every file changed since then suspect, which covers them.
        self.changed = False
        return {
            "version": _VERSION, "clean": clean, "base": self.base, "valid": self.valid,
            "torn": self.torn, "writing": self.writing, "suspect_since": self.suspect_since,
            "complete_before": self.complete_before(),
            "roots": [d.to_json() for d in self.recorded()],
        }

    def recorded(self) -> list[Dirt]:
        """Recorded zones and the snapshots being reintegrated (not the open epochs)."""
        out = [Dirt() for _ in range(self.roots)]
        for i, d in enumerate(self.dirt):
            out[i].merge(d)
        for snap in self.taken:
            for i, d in enumerate(snap.dirt):
                out[i].merge(d)
        return out

    def summary(self) -> dict[str, Any]:
        """What the peer needs to know about this side (sent with the LIST answer)."""
        return {"valid": self.valid, "base": self.base, "torn": self.torn,
                "suspect_since": self.suspect_since,
                "roots": [d.to_json() for d in self.all_dirt()]}

    def volume(self) -> int:
        return sum(d.volume() for d in self.all_dirt())

    def unsynced_marks(self) -> int:
        """Changes sent to the peer and not yet covered by a SYNC barrier."""
        return sum(len(marks) for _, _, marks in self._epochs) + len(self._current)

    # -- streaming -----------------------------------------------------------------------------

    def note(self, op: Op) -> None:
        marks = marks_of(op)
        if marks:
            if not self._current:
                self._current_started = time.time()
            self._current.extend(marks)

    def rotate(self) -> int | None:
        """Close the current epoch; its id (None if it was empty)."""
        if not self._current:
            return None
        epoch = self._next_epoch
        self._next_epoch += 1
        self._epochs.append((epoch, self._current_started, self._current))
        self._current = []
        return epoch

    def durable(self, epoch: int) -> None:
        """Everything up to `epoch` is on the peer's disk."""
        before = len(self._epochs)
        self._epochs = [e for e in self._epochs if e[0] > epoch]
        self.changed = self.changed or len(self._epochs) != before

    def drained(self) -> None:
        """Everything sent is on the peer's disk (a SYNC barrier was acknowledged)."""
        self._epochs, self._current = [], []
        self.changed = True

    def spill(self) -> None:
        """The stream broke: what the peer may lack becomes recorded dirt."""
        for _, _, marks in self._epochs:
            apply_marks(self.dirt, marks)
        apply_marks(self.dirt, self._current)
        self._epochs, self._current = [], []
        self.changed = True

    # -- alone -----------------------------------------------------------------------------------

    def record(self, op: Op) -> None:
        marks = marks_of(op)
        if marks:
            apply_marks(self.dirt, marks)
            self.changed = True

    # -- reintegration ---------------------------------------------------------------------------

    def take(self) -> Snapshot:
        snap = Snapshot(self.dirt, self.suspect_since)
        self.taken.append(snap)
        self.dirt = [Dirt() for _ in range(self.roots)]
        return snap

    def commit(self) -> None:
        """The peer durably holds everything taken: forget it (the generation both copies now
        have comes later, from the daemon: `rebase`)."""
        taken, self.taken = self.taken, []
        suspects = {s.suspect_since for s in taken}
        if self.suspect_since in suspects:
            self.suspect_since = None  # every suspect file was compared
        self.valid = True
        self.changed = True

    def abort(self) -> None:
        for snap in self.taken:
            for i, d in enumerate(snap.dirt):
                self.dirt[i].merge(d)
        self.taken = []
        self.changed = True

    def rebase(self, base: list[Any]) -> None:
        if self.base != base:
            self.base = base
            self.changed = True

    def reset_identical(self) -> None:
        """This node just received a whole copy (it is the secondary, now in sync)."""
        self.dirt = [Dirt() for _ in range(self.roots)]
        self.taken = []
        self._epochs, self._current = [], []
        self.suspect_since = None
        self.torn = False
        self.valid = True
        self.changed = True

    def set_torn(self) -> None:
        self.torn = True
        self.changed = True


def write_state(path: Path, state: dict[str, Any]) -> None:
    """Atomically replace the journal file (blocking: run it in a worker thread)."""
    tmp = path.with_name(path.name + ".tmp")
    data = json.dumps(state, separators=(",", ":")).encode()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
