"""The reintegration planner, a pure function of both trees and both journals."""

from __future__ import annotations

import dataclasses

import pytest

from appliance.replication.inventory import Entry
from appliance.replication.journal import Dirt, RangeSet
from appliance.replication.reintegrate import DataJob, Side, plan

MTIME = 1_700_000_000_000_000_000


def f(path: str, ino: int, size: int = 100, nlink: int = 1, mtime: int = MTIME,
      ctime: int = MTIME, mode: int = 0o100644) -> Entry:
    return Entry(path, "f", mode, 0, 0, size, mtime, ctime, ino, nlink)


def d(path: str, ino: int, mode: int = 0o40755) -> Entry:
    return Entry(path, "d", mode, 0, 0, 0, MTIME, MTIME, ino, 2)


def link(path: str, ino: int, target: str) -> Entry:
    return Entry(path, "l", 0o120777, 0, 0, 0, MTIME, MTIME, ino, 1, target=target)


def side(*entries: Entry, dirt: Dirt | None = None, suspect: float | None = None) -> Side:
    return Side({e.path: e for e in entries}, None, dirt or Dirt(), suspect)


def test_identical_trees_need_nothing() -> None:
    tree = (d("a", 1), f("a/x", 2), link("l", 3, "a/x"))
    assert not plan(side(*tree), side(*tree), "journal")


def test_checksum_mode_compares_every_file_both_have() -> None:
    tree = (d("a", 1), f("a/x", 2), f("y", 3))
    p = plan(side(*tree), side(*tree), "checksum")
    assert sorted(j.path for j in p.data if j.how == "compare") == ["a/x", "y"]


def test_journal_mode_sends_zones_and_compares_only_unexplained_changes() -> None:
    src = side(f("zoned", 1), f("touched", 2, size=200), f("quiet", 3),
               dirt=Dirt(zones={"zoned": RangeSet([(0, 10)])}))
    dst = side(f("zoned", 11), f("touched", 12), f("quiet", 13))
    p = plan(src, dst, "journal")
    assert DataJob("zoned", "zones", RangeSet([(0, 10)])) in p.data
    assert DataJob("touched", "compare") in p.data  # size differs, nothing recorded
    assert all(j.path != "quiet" for j in p.data)


def test_the_secondarys_own_zones_count_too() -> None:
    """A crashed former primary reports what it wrote that may not have reached us."""
    src = side(f("x", 1))
    dst = side(f("x", 9), dirt=Dirt(zones={"x": RangeSet([(50, 60)])}))
    assert plan(src, dst, "journal").data == [DataJob("x", "zones", RangeSet([(50, 60)]))]


def test_crash_rule_compares_files_changed_after_the_journal_was_complete() -> None:
    src = side(f("old", 1, ctime=MTIME), f("new", 2, ctime=MTIME + 10**10),
               suspect=(MTIME + 10**9) / 1e9)
    dst = side(f("old", 11), f("new", 12))
    assert plan(src, dst, "journal").data == [DataJob("new", "compare")]


def test_whole_files_are_resent_entirely() -> None:
    src = side(d("dir", 1), f("dir/x", 2), dirt=Dirt(whole={"dir"}))
    dst = side(d("dir", 11), f("dir/x", 12))
    assert plan(src, dst, "journal").data == [DataJob("dir/x", "whole")]


def test_extra_entries_are_removed_deepest_first_and_type_changes_remade() -> None:
    src = side(f("t", 1), d("keep", 2))
    dst = side(d("t", 11), f("t/inner", 12), d("gone", 13), d("gone/sub", 14),
               f("gone/sub/z", 15), d("keep", 16))
    p = plan(src, dst, "journal")
    assert [e.path for e in p.remove] == ["gone/sub/z", "gone/sub", "t/inner", "gone", "t"]
    assert [e.path for e in p.make] == ["t"]


def test_symlink_with_another_target_is_replaced() -> None:
    p = plan(side(link("l", 1, "new")), side(link("l", 9, "old")), "journal")
    assert [e.path for e in p.remove] == ["l"] and [e.path for e in p.make] == ["l"]


def test_hard_link_groups_that_differ_are_rebuilt() -> None:
    # Primary: x and y are one file; z alone. Secondary: x and z were one file, y absent.
    src = side(f("x", 1, nlink=2), f("y", 1, nlink=2), f("z", 2))
    dst = side(f("x", 10, nlink=2), f("z", 10, nlink=2))
    p = plan(src, dst, "journal")
    assert {e.path for e in p.remove} == {"x", "z"}
    assert {e.path for e in p.make} == {"x", "z"}
    assert p.links == [("x", "y")]


def test_an_intact_hard_link_group_is_one_data_job_with_the_zones_of_all_names() -> None:
    src = side(f("x", 1, nlink=2), f("y", 1, nlink=2),
               dirt=Dirt(zones={"y": RangeSet([(0, 4)])}))
    dst = side(f("x", 10, nlink=2), f("y", 10, nlink=2))
    p = plan(src, dst, "journal")
    assert p.data == [DataJob("x", "zones", RangeSet([(0, 4)]))]
    assert not p.remove and not p.make and not p.links


def test_directories_get_their_attributes_last_deepest_first() -> None:
    src = side(d("a", 1), d("a/b", 2), f("a/b/new", 3), d("c", 4, mode=0o40700))
    dst = side(d("a", 11), d("a/b", 12), d("c", 14))
    p = plan(src, dst, "journal")
    assert [e.path for e in p.make] == ["a/b/new"]
    assert [e.path for e in p.dir_attrs] == ["a/b", "c"]  # a/b changed, c's mode differs


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError):
        plan(side(), side(), "guess")


def test_equal_inode_numbers_on_other_devices_or_single_links_are_no_hard_links() -> None:
    """A nested mount or a btrfs subvolume has inode numbers of its own (257 in each)."""
    a = dataclasses.replace(f("s1/a", 257), dev=1)
    b = dataclasses.replace(f("s2/b", 257), dev=2)
    p = plan(side(d("s1", 1), d("s2", 2), a, b), side(d("s1", 1), d("s2", 2)), "journal")
    assert not p.links and {e.path for e in p.make} == {"s1/a", "s2/b"}


def test_a_recorded_utime_explains_an_mtime_difference_without_reading_the_file() -> None:
    src = side(f("x", 1, mtime=MTIME + 5), f("y", 2, mtime=MTIME + 5),
               dirt=Dirt(touched={"x"}))
    dst = side(f("x", 11), f("y", 12))
    p = plan(src, dst, "journal")
    assert p.data == [DataJob("y", "compare")]  # y's change was recorded nowhere: look
    assert {e.path for e in p.attrs} == {"x", "y"}
