"""Reintegration over the real channel (loopback TLS, real Applier on the secondary's dir): only
what differs crosses, and both trees end byte-for-byte identical (content, size, sparseness,
mode, owner, mtime, links)."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from appliance.replication import reintegrate
from appliance.replication.applier import NOT_A_FILE
from appliance.replication.channel import ReplicaBroken
from appliance.replication.journal import Dirt, DirtyJournal
from appliance.replication.protocol import Op, OpKind
from tests.integration.test_channel import make_sender, primary, run, secondary
from tests.support.trees import differences

MIB = 1024 * 1024


@pytest.fixture
def trees(tmp_path: Path) -> tuple[Path, Path]:
    src, dst = tmp_path / "src", tmp_path / "data"
    src.mkdir()
    return src, dst


def _fill(src: Path) -> None:
    """A small tree with every kind of entry."""
    (src / "big").write_bytes(os.urandom(4 * MIB))
    (src / "d" / "e").mkdir(parents=True)
    (src / "d" / "e" / "f.txt").write_text("hello\n")
    (src / "d" / "gone.txt").write_text("bye\n")
    (src / "d" / "moved").mkdir()
    (src / "d" / "moved" / "x").write_bytes(b"x" * 5000)
    (src / "link").symlink_to("d/e/f.txt")
    os.link(src / "d" / "e" / "f.txt", src / "hard")
    with open(src / "sparse", "wb") as f:
        f.truncate(8 * MIB)
        f.seek(3 * MIB)
        f.write(b"data in the middle")
    os.mkfifo(src / "fifo")
    os.chmod(src / "d", 0o750)


def _copy(src: Path, dst: Path) -> None:
    subprocess.run(["cp", "-a", "--sparse=always", str(src), str(dst)], check=True)


def _mutate(src: Path) -> None:
    """What an application would do while the peer is away."""
    with open(src / "big", "r+b") as f:
        f.seek(2 * MIB + 100)
        f.write(b"Z" * 3000)
    (src / "d" / "gone.txt").unlink()
    (src / "d" / "new.txt").write_text("new\n")
    os.rename(src / "d" / "moved", src / "d" / "renamed")
    (src / "link").unlink()
    (src / "link").symlink_to("big")
    os.chmod(src / "d" / "e" / "f.txt", 0o600)
    with open(src / "sparse", "r+b") as f:
        f.truncate(6 * MIB)
    (src / "hard").unlink()  # the group {f.txt, hard} becomes {f.txt, hard2}
    os.link(src / "d" / "e" / "f.txt", src / "d" / "hard2")
    (src / "fifo").unlink()
    (src / "fifo").mkdir()  # type change


async def _reintegrate(pki: Path, src: Path, dst: Path, mode: str, dirt: Dirt,
                       suspect: float | None = None) -> reintegrate.Stats:
    root_fd = os.open(src, os.O_RDONLY | os.O_DIRECTORY)
    try:
        async with (secondary(pki, dst) as side,
                    primary(make_sender(pki, side.port, window_bytes=4 * MIB)) as sender):
            _, peer = reintegrate.peer_side(await sender.query(Op(OpKind.LIST, 0, "")), 0)
            stats = await reintegrate.sync_pass(0, root_fd, peer, dirt, suspect, mode,
                                                sender.submit, sender.query, workers=3)
            await sender.submit(Op(OpKind.SYNC, 0, ""))
            return stats
    finally:
        os.close(root_fd)


def _journal_of(src: Path, change: Callable[[DirtyJournal], None]) -> Dirt:
    journal = DirtyJournal(src.parent / "journal.json", 1)
    change(journal)
    return journal.take().dirt[0]


def test_checksum_mode_sends_only_differing_blocks_and_ends_identical(
        pki: Path, trees: tuple[Path, Path]) -> None:
    src, dst = trees
    _fill(src)
    _copy(src, dst)
    _mutate(src)

    async def scenario() -> None:
        stats = await _reintegrate(pki, src, dst, "checksum", Dirt())
        assert differences(src, dst) == []
        assert stats.compared == 2  # big and sparse (f.txt changed hard-link group: remade)
        # One 128 KiB block of `big` and the small new files, never the 4 MiB file again.
        assert stats.bytes < 512 * 1024, stats
        assert stats.removed >= 3 and stats.made >= 3
    run(scenario)


def test_journal_mode_sends_the_recorded_zones_only(pki: Path, trees: tuple[Path, Path]) -> None:
    src, dst = trees
    (src / "a").write_bytes(os.urandom(8 * MIB))
    (src / "b").write_bytes(os.urandom(MIB))
    _copy(src, dst)
    with open(src / "a", "r+b") as f:
        f.seek(5 * MIB)
        f.write(b"Q" * 10_000)

    def record(journal: DirtyJournal) -> None:
        journal.record(Op(OpKind.WRITE, 0, "a", offset=5 * MIB, data=b"Q" * 10_000))

    async def scenario() -> None:
        stats = await _reintegrate(pki, src, dst, "journal", _journal_of(src, record))
        assert differences(src, dst) == []
        assert stats.bytes == 10_000  # exactly the zone, no checksum reading
        assert stats.compared == 0
    run(scenario)


def test_a_change_hidden_behind_an_old_mtime_is_found_by_the_crash_rule(
        pki: Path, trees: tuple[Path, Path]) -> None:
    """After a crash the journal may lack the last writes: a file whose ctime is newer than
    the journal's completeness is compared, even with its size and mtime unchanged."""
    src, dst = trees
    (src / "f").write_bytes(b"a" * 300_000)
    _copy(src, dst)
    before = os.stat(src / "f")
    with open(src / "f", "r+b") as f:
        f.seek(1000)
        f.write(b"b" * 10)
    os.utime(src / "f", ns=(before.st_atime_ns, before.st_mtime_ns))
    suspect_since = before.st_ctime_ns / 1e9 - 1

    async def scenario() -> None:
        # Without the rule the journal (empty) and size/mtime say "equal": nothing is sent.
        stats = await _reintegrate(pki, src, dst, "journal", Dirt())
        assert stats.bytes == 0 and differences(src, dst) != []
        stats = await _reintegrate(pki, src, dst, "journal", Dirt(), suspect_since)
        assert stats.compared == 1
        assert differences(src, dst) == []
    run(scenario)


def test_an_empty_secondary_gets_everything(pki: Path, trees: tuple[Path, Path]) -> None:
    src, dst = trees
    _fill(src)
    dst.mkdir()

    async def scenario() -> None:
        stats = await _reintegrate(pki, src, dst, "checksum", Dirt())
        assert differences(src, dst) == []
        assert stats.compared == 0  # nothing to compare with: plain copies
    run(scenario)


def test_two_passes_with_the_tree_changing_in_between_converge(
        pki: Path, trees: tuple[Path, Path]) -> None:
    """Pass 1 runs while the application writes; pass 2 (frozen) sends what pass 1 missed."""
    src, dst = trees
    _fill(src)
    _copy(src, dst)
    _mutate(src)

    async def scenario() -> None:
        await _reintegrate(pki, src, dst, "checksum", Dirt())
        journal = DirtyJournal(src.parent / "j.json", 1)
        with open(src / "big", "r+b") as f:  # "during pass 1"
            f.write(b"late")
        journal.record(Op(OpKind.WRITE, 0, "big", offset=0, data=b"late"))
        (src / "d" / "later").write_text("later")
        journal.record(Op(OpKind.CREATE, 0, "d/later"))
        stats = await _reintegrate(pki, src, dst, "journal", journal.take().dirt[0])
        assert differences(src, dst) == []
        assert stats.bytes == 4 + len("later")
    run(scenario)


def test_listing_answer_names_no_aside_dir(pki: Path, trees: tuple[Path, Path]) -> None:
    _, dst = trees
    dst.mkdir()
    (dst / ".mirrorha-aside").mkdir()
    (dst / "kept").write_text("k")

    async def scenario() -> None:
        async with (secondary(pki, dst) as side,
                    primary(make_sender(pki, side.port)) as sender):
            summary, peer = reintegrate.peer_side(
                await sender.query(Op(OpKind.LIST, 0, "")), 0)
        assert summary == {}
        assert set(peer.entries) == {"kept"}
    trio.run(scenario)


@pytest.mark.parametrize("path", ["../outside", "/etc/passwd", "inside/../../outside", "lnk/x"])
def test_queries_cannot_read_outside_the_replicated_dir(
        pki: Path, trees: tuple[Path, Path], path: str) -> None:
    """A checksum query is a read: confined like every op (a primary must not learn what lies
    outside the secondary's replicated dir, not even a digest)."""
    _, dst = trees
    dst.mkdir()
    (dst / "inside").mkdir()
    (dst.parent / "outside").write_text("secret")
    (dst / "lnk").symlink_to(dst.parent)

    async def scenario() -> None:
        async with (secondary(pki, dst) as side,
                    primary(make_sender(pki, side.port)) as sender):
            with pytest.raises(ReplicaBroken):
                await sender.query(Op(OpKind.SUMS, 0, path, length=128 * 1024))
            assert sender.nack is not None and sender.nack.errno == errno.EPERM
            assert side.receiver.counters["rejected"] == 1
    run(scenario)


def test_checksums_of_a_device_fifo_or_directory_say_not_a_file(
        pki: Path, trees: tuple[Path, Path]) -> None:
    """Never opened (opening a device alone may act on it): answered as "no regular file"."""
    _, dst = trees
    dst.mkdir()
    os.mknod(dst / "null", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    os.mkfifo(dst / "fifo")
    (dst / "dir").mkdir()

    async def scenario() -> None:
        async with (secondary(pki, dst) as side,
                    primary(make_sender(pki, side.port)) as sender):
            for name in ("null", "fifo", "dir", "missing"):
                answer = await sender.query(Op(OpKind.SUMS, 0, name, length=128 * 1024))
                assert int.from_bytes(answer[:8], "big") == NOT_A_FILE, name
    run(scenario)
