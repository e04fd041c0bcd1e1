"""The dirty-zone journal: what each op records, epochs while streaming, snapshots while
reintegrating, and what a crash leaves (the crash rule), all on a real file."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from appliance.replication.journal import END, Dirt, DirtyJournal, RangeSet, write_state
from appliance.replication.protocol import Op, OpKind


def w(path: str, offset: int, size: int, root: int = 0) -> Op:
    return Op(OpKind.WRITE, root, path, offset=offset, data=b"x" * size)


@pytest.mark.parametrize(("adds", "expected"), [
    ([(0, 10), (20, 30)], [(0, 10), (20, 30)]),
    ([(0, 10), (10, 20)], [(0, 20)]),  # touching ranges merge
    ([(20, 30), (0, 10), (5, 25)], [(0, 30)]),
    ([(0, 100), (10, 20)], [(0, 100)]),
    ([(50, 60), (0, 10), (30, 40), (9, 31)], [(0, 40), (50, 60)]),
    ([(5, 5), (7, 6)], []),  # empty ranges are nothing
])
def test_rangeset_keeps_ranges_disjoint_sorted_and_merged(
        adds: list[tuple[int, int]], expected: list[tuple[int, int]]) -> None:
    r = RangeSet()
    for start, end in adds:
        r.add(start, end)
    assert list(r) == expected
    assert RangeSet.from_json(r.to_json()) == r


@pytest.mark.parametrize(("op", "zones", "whole"), [
    (w("f", 100, 50), {"f": [(100, 150)]}, set()),
    (Op(OpKind.TRUNCATE, 0, "f", length=10), {"f": [(10, END)]}, set()),
    (Op(OpKind.FALLOCATE, 0, "f", offset=4096, length=8192), {"f": [(4096, 12288)]}, set()),
    (Op(OpKind.CREATE, 0, "d/new"), {}, {"d/new"}),
    (Op(OpKind.SYMLINK, 0, "l", path2="t"), {}, {"l"}),
    (Op(OpKind.MKNOD, 0, "p"), {}, {"p"}),
    (Op(OpKind.RENAME, 0, "a", path2="b"), {}, {"a", "b"}),
    (Op(OpKind.LINK, 0, "a", path2="b"), {}, {"b"}),
    (Op(OpKind.MKDIR, 0, "d"), {}, set()),
    (Op(OpKind.UNLINK, 0, "f"), {}, set()),
    (Op(OpKind.SETATTR, 0, "f", mode=0o600), {}, set()),
    (Op(OpKind.FSYNC, 0, "f"), {}, set()),
])
def test_each_op_records_what_it_makes_different(
        tmp_path: Path, op: Op, zones: dict[str, list[tuple[int, int]]], whole: set[str]) -> None:
    j = DirtyJournal(tmp_path / "j.json", 1)
    j.record(op)
    d = j.all_dirt()[0]
    assert {p: list(r) for p, r in d.zones.items()} == zones
    assert d.whole == whole


def test_whole_covers_everything_below_a_renamed_directory() -> None:
    d = Dirt(whole={"a/b"})
    assert d.is_whole("a/b") and d.is_whole("a/b/c/d")
    assert not d.is_whole("a") and not d.is_whole("a/bc")


def test_epochs_are_forgotten_once_durable_and_spilled_when_the_stream_breaks(
        tmp_path: Path) -> None:
    j = DirtyJournal(tmp_path / "j.json", 1)
    j.note(w("a", 0, 10))
    first = j.rotate()
    j.note(w("b", 0, 10))
    assert first is not None and j.unsynced_marks() == 2
    j.durable(first)  # a SYNC after epoch 1 was acknowledged: "a" is on the peer's disk
    assert j.unsynced_marks() == 1
    j.spill()  # the stream broke: "b" may be missing there
    assert set(j.all_dirt()[0].zones) == {"b"} and j.unsynced_marks() == 0
    assert j.rotate() is None  # nothing open


def test_snapshot_is_kept_in_the_file_until_committed_and_restored_on_abort(
        tmp_path: Path) -> None:
    path = tmp_path / "j.json"
    j = DirtyJournal(path, 2)
    j.record(w("a", 0, 10))
    j.record(w("z", 0, 5, root=1))
    snap = j.take()
    assert set(snap.dirt[0].zones) == {"a"} and set(snap.dirt[1].zones) == {"z"}
    j.record(w("b", 0, 10))  # the application writes on during the pass
    write_state(path, j.state())
    saved = json.loads(path.read_text())
    assert set(saved["roots"][0]["zones"]) == {"a", "b"}  # a crash now loses nothing
    j.abort()
    assert set(j.all_dirt()[0].zones) == {"a", "b"}
    j.take()
    j.commit()
    j.rebase(["7", "node1"])
    assert not any(j.all_dirt()) and j.valid and j.base == ["7", "node1"]


def test_an_unclean_stop_of_a_writing_node_makes_later_changes_suspect(tmp_path: Path) -> None:
    path = tmp_path / "j.json"
    j = DirtyJournal(path, 1)
    j.valid, j.base, j.writing = True, [3, "node1"], True
    j.record(w("a", 0, 10))
    before = time.time()
    write_state(path, j.state())  # ...then the node loses power: no clean state
    again = DirtyJournal(path, 1)
    message = again.load()
    assert "unclean stop" in message
    assert again.valid and again.base == [3, "node1"]
    assert again.suspect_since is not None and again.suspect_since <= before - 5
    assert set(again.all_dirt()[0].zones) == {"a"}


def test_after_a_clean_stop_only_what_changed_while_unmounted_is_suspect(
        tmp_path: Path) -> None:
    path = tmp_path / "j.json"
    j = DirtyJournal(path, 1)
    j.writing = True
    stopped = time.time()
    write_state(path, j.state(clean=True))
    clean = DirtyJournal(path, 1)
    clean.load()
    # The dirs were plain directories since the stop: anything written there is compared.
    assert clean.suspect_since is not None
    assert stopped - 11 <= clean.suspect_since <= stopped - 9


def test_a_crashed_secondary_has_nothing_suspect(tmp_path: Path) -> None:
    """Its copy is a prefix of its primary's stream, which the primary's journal covers."""
    path = tmp_path / "j.json"
    j = DirtyJournal(path, 1)
    write_state(path, j.state())  # writing=False, not clean
    second = DirtyJournal(path, 1)
    second.load()
    assert second.suspect_since is None


def test_namespace_and_attribute_changes_count_even_without_zones(tmp_path: Path) -> None:
    """Reintegration may skip its frozen pass only when nothing at all was recorded."""
    j = DirtyJournal(tmp_path / "j.json", 1)
    j.take()
    j.record(Op(OpKind.UNLINK, 0, "secret"))
    j.record(Op(OpKind.SETATTR, 0, "key", mode=0o600))
    second = j.take()
    assert any(second.dirt) and second.dirt[0].touched == {"secret", "key"}
    j.record(Op(OpKind.FSYNC, 0, "f"))  # changes nothing
    assert not any(j.take().dirt)


def test_random_small_writes_are_coarsened_not_kept_one_by_one(tmp_path: Path) -> None:
    j = DirtyJournal(tmp_path / "j.json", 1)
    for i in range(5000):
        j.record(w("db", i * 8192 * 7 % (1 << 32), 100))
    zones = j.all_dirt()[0].zones["db"]
    assert len(zones) <= 2048  # bounded, wider: still covers every write
    assert all(any(s <= i * 8192 * 7 % (1 << 32) < e for s, e in zones) for i in range(5000))


def test_the_margin_follows_the_ack_timeout(tmp_path: Path) -> None:
    assert DirtyJournal(tmp_path / "j.json", 1, margin_s=90).margin_s == 90
    assert DirtyJournal(tmp_path / "j.json", 1, margin_s=1).margin_s == 10


@pytest.mark.parametrize("content", ["{not json", json.dumps({"version": 99}),
                                     json.dumps({"version": 1, "roots": [{}, {}]})])
def test_a_broken_journal_is_set_aside_and_not_trusted(tmp_path: Path, content: str) -> None:
    path = tmp_path / "j.json"
    path.write_text(content)
    j = DirtyJournal(path, 1)
    message = j.load()
    assert "unreadable" in message and str(path) in message
    assert not j.valid and not path.exists()
    assert list(tmp_path.glob("j.bad-*"))


def test_a_missing_journal_is_not_trusted(tmp_path: Path) -> None:
    j = DirtyJournal(tmp_path / "none.json", 1)
    assert "no dirty-zone journal" in j.load()
    assert not j.valid
