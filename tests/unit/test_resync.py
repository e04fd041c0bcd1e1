"""Full resync: the primary's tree streamed as ops and applied gives an identical copy."""

from __future__ import annotations

import os
from pathlib import Path

import trio

from appliance.replication.applier import Applier
from appliance.replication.protocol import Op, OpKind
from appliance.replication.resync import full_copy
from tests.support.trees import differences


def build_tree(top: Path) -> None:
    (top / "db" / "base").mkdir(parents=True)
    (top / "db" / "base" / "1").write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    with open(top / "sparse", "wb") as f:
        f.write(b"head")
        f.seek(512 * 1024 * 1024)
        f.write(b"tail")
    with open(top / "trailing-hole", "wb") as f:
        f.write(b"x")
        f.truncate(10 * 1024 * 1024)
    (top / "empty").write_bytes(b"")
    os.link(top / "db" / "base" / "1", top / "hardlink")
    os.symlink("db/base/1", top / "symlink")
    os.symlink("/nonexistent/elsewhere", top / "dangling")
    os.mkfifo(top / "fifo")
    os.chmod(top / "db", 0o700)
    os.chown(top / "db" / "base" / "1", 1234, 5678)
    os.chown(top / "symlink", 4321, 8765, follow_symlinks=False)
    os.chmod(top / "empty", 0o4755)
    for path in (top / "empty", top / "sparse"):
        os.utime(path, ns=(1_600_000_000_123_456_789, 1_600_000_000_987_654_321))
    os.utime(top / "db", ns=(1_500_000_000_000_000_001, 1_500_000_000_000_000_002))


def copy(src: Path, dst: Path) -> list[Op]:
    sent: list[Op] = []

    async def main() -> None:
        fd = os.open(src, os.O_RDONLY | os.O_DIRECTORY)
        try:
            with Applier([dst]) as applier:
                async def submit(op: Op) -> None:
                    op = Op(**{**op.__dict__, "seq": len(sent) + 1})
                    sent.append(op)
                    applier.apply(op)
                await full_copy(0, fd, submit)
        finally:
            os.close(fd)

    trio.run(main)
    return sent


def test_full_copy_makes_a_byte_identical_tree(tmp_path: Path) -> None:
    src, dst = tmp_path / "primary", tmp_path / "secondary"
    src.mkdir()
    dst.mkdir()
    build_tree(src)
    os.utime(src, ns=(1_400_000_000_000_000_000, 1_400_000_000_000_000_000))
    ops = copy(src, dst)
    assert differences(src, dst) == []
    assert os.stat(dst).st_mtime_ns == os.stat(src).st_mtime_ns
    assert ops[0].kind is OpKind.RESET  # RESYNC_DONE is the caller's, after a durable SYNC
    # Only data extents cross (block-granular): the 512 MiB and 10 MiB holes are not sent.
    sent = sum(len(op.data) for op in ops if op.kind is OpKind.WRITE)
    assert 3 * 1024 * 1024 + 17 + 9 <= sent <= 3 * 1024 * 1024 + 17 + 3 * 4096


def test_previous_secondary_content_is_kept_aside(tmp_path: Path) -> None:
    src, dst = tmp_path / "primary", tmp_path / "secondary"
    src.mkdir()
    (dst / "divergent").mkdir(parents=True)
    (dst / "divergent" / "only-here").write_bytes(b"written during a split brain")
    (src / "kept").write_bytes(b"reference")
    copy(src, dst)
    assert differences(src, dst) == []
    (aside,) = (tmp_path / "secondary.mirrorha-aside").iterdir()
    assert (aside / "divergent" / "only-here").read_bytes() == b"written during a split brain"
