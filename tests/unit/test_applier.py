"""The secondary's Applier on real files in temporary directories (no FUSE, no network)."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from appliance.replication.applier import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    Applier,
    ApplyError,
    ConfinementError,
)
from appliance.replication.protocol import MAX_DATA, NO_ID, Op, OpKind, SetattrField

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown, mknod, mount)")

UID = GID = 1234
MIB = 1024 * 1024
MTIME = 1_600_000_000_123_456_789
ATIME = 1_500_000_000_987_654_321


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "replica"
    path.mkdir()
    return path


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A canary directory next to the replicated one: no op may ever change it."""
    path = tmp_path / "outside"
    (path / "sub").mkdir(parents=True)
    (path / "secret").write_bytes(b"canary")
    (path / "sub" / "deep").write_bytes(b"deep canary")
    return path


@pytest.fixture
def applier(root: Path) -> Iterator[Applier]:
    with Applier([root]) as a:
        yield a


def run(applier: Applier, kind: OpKind, path: str, **fields: object) -> None:
    applier.apply(Op(kind, 0, path, **fields))  # type: ignore[arg-type]


def create(applier: Applier, path: str, data: bytes = b"", mode: int = 0o644) -> None:
    run(applier, OpKind.CREATE, path, mode=mode)
    if data:
        run(applier, OpKind.WRITE, path, data=data)


def snapshot(top: Path) -> dict[str, tuple[object, ...]]:
    """Everything observable about a tree, symlinks not followed (atime left out)."""
    result: dict[str, tuple[object, ...]] = {}
    pending = [top]
    for _ in range(10_000):
        if not pending:
            return result
        current = pending.pop()
        st = current.lstat()
        detail: object = None
        if stat.S_ISLNK(st.st_mode):
            detail = os.readlink(current)
        elif stat.S_ISREG(st.st_mode):
            detail = current.read_bytes()
        elif stat.S_ISDIR(st.st_mode):
            pending.extend(current.iterdir())
        result[str(current.relative_to(top))] = (
            st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_nlink, st.st_mtime_ns, detail)
    raise AssertionError(f"tree under {top} too large to snapshot")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# -- data ops -----------------------------------------------------------------------------------


def test_write_puts_bytes_at_offset(applier: Applier, root: Path) -> None:
    create(applier, "f")
    run(applier, OpKind.WRITE, "f", data=b"hello")
    run(applier, OpKind.WRITE, "f", offset=3, data=b"world")
    run(applier, OpKind.WRITE, "f", offset=8, data=b"")
    assert (root / "f").read_bytes() == b"helworld"


def test_write_of_max_payload_lands_byte_for_byte(applier: Applier, root: Path) -> None:
    data = os.urandom(MAX_DATA)
    create(applier, "big")
    run(applier, OpKind.WRITE, "big", offset=MIB, data=data)
    content = (root / "big").read_bytes()
    assert content == bytes(MIB) + data


def test_write_far_away_keeps_the_file_sparse(applier: Applier, root: Path) -> None:
    create(applier, "sparse")
    run(applier, OpKind.WRITE, "sparse", offset=64 * MIB, data=b"x" * 4096)
    st = (root / "sparse").stat()
    assert st.st_size == 64 * MIB + 4096
    assert st.st_blocks * 512 <= 64 * 1024  # the hole was not filled with zeros
    with (root / "sparse").open("rb") as f:
        assert f.read(4096) == bytes(4096)
        f.seek(64 * MIB)
        assert f.read() == b"x" * 4096


def test_truncate_shrinks_and_extends_without_allocating(applier: Applier, root: Path) -> None:
    create(applier, "f", b"0123456789")
    run(applier, OpKind.TRUNCATE, "f", length=4)
    assert (root / "f").read_bytes() == b"0123"
    run(applier, OpKind.TRUNCATE, "f", length=32 * MIB)
    st = (root / "f").stat()
    assert st.st_size == 32 * MIB
    assert st.st_blocks * 512 <= 64 * 1024


def test_fallocate_reserves_and_punch_hole_frees(applier: Applier, root: Path) -> None:
    create(applier, "f")
    run(applier, OpKind.FALLOCATE, "f", offset=0, length=MIB)
    st = (root / "f").stat()
    assert st.st_size == MIB
    assert st.st_blocks * 512 >= MIB

    data = os.urandom(MIB)
    run(applier, OpKind.WRITE, "f", data=data)
    run(applier, OpKind.FALLOCATE, "f", offset=256 * 1024, length=256 * 1024,
        flags=FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)
    st = (root / "f").stat()
    assert st.st_size == MIB
    assert st.st_blocks * 512 <= MIB - 256 * 1024
    expected = data[:256 * 1024] + bytes(256 * 1024) + data[512 * 1024:]
    assert (root / "f").read_bytes() == expected


def test_fallocate_keep_size_allocates_past_the_end(applier: Applier, root: Path) -> None:
    create(applier, "f", b"abc")
    run(applier, OpKind.FALLOCATE, "f", offset=0, length=MIB, flags=FALLOC_FL_KEEP_SIZE)
    st = (root / "f").stat()
    assert st.st_size == 3
    assert st.st_blocks * 512 >= MIB


def test_fsync_of_file_directory_and_root(applier: Applier, root: Path) -> None:
    run(applier, OpKind.MKDIR, "d", mode=0o755)
    create(applier, "d/f", b"data")
    run(applier, OpKind.FSYNC, "d/f")
    run(applier, OpKind.FSYNC, "d/f", flags=1)  # fdatasync
    run(applier, OpKind.FSYNC, "d")
    applier.fsync(0, "", datasync=False)
    applier.fsync(0, "d/f", datasync=True)
    assert (root / "d" / "f").read_bytes() == b"data"


def test_fsync_of_a_missing_file_is_enoent(applier: Applier) -> None:
    with pytest.raises(ApplyError) as caught:
        run(applier, OpKind.FSYNC, "missing")
    assert caught.value.errno == errno.ENOENT


def test_sync_op_and_method_flush_every_root(tmp_path: Path) -> None:
    roots = [tmp_path / "one", tmp_path / "two"]
    for r in roots:
        r.mkdir()
    with Applier(roots) as applier:
        applier.apply(Op(OpKind.CREATE, 1, "f", mode=0o600))
        applier.apply(Op(OpKind.WRITE, 1, "f", data=b"second root"))
        applier.apply(Op(OpKind.SYNC, 0, ""))
        applier.sync()
    assert (roots[1] / "f").read_bytes() == b"second root"
    assert not (roots[0] / "f").exists()


# -- creation -----------------------------------------------------------------------------------


@needs_root
def test_create_sets_mode_and_owner_ignoring_umask(applier: Applier, root: Path) -> None:
    old = os.umask(0o077)
    try:
        run(applier, OpKind.CREATE, "f", mode=stat.S_IFREG | 0o4755, uid=UID, gid=GID)
    finally:
        os.umask(old)
    st = (root / "f").lstat()
    assert stat.S_ISREG(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o4755  # chmod after chown kept the setuid bit
    assert (st.st_uid, st.st_gid, st.st_size) == (UID, GID, 0)


def test_create_of_an_existing_file_changes_nothing(applier: Applier, root: Path) -> None:
    (root / "f").write_bytes(b"brought by resync")
    os.chmod(root / "f", 0o600)
    before = snapshot(root)
    run(applier, OpKind.CREATE, "f", mode=0o644)
    assert snapshot(root) == before
    run(applier, OpKind.WRITE, "f", offset=0, data=b"B")
    assert (root / "f").read_bytes() == b"Brought by resync"


def test_create_over_a_directory_is_refused(applier: Applier, root: Path) -> None:
    (root / "d").mkdir()
    with pytest.raises(ApplyError) as caught:
        run(applier, OpKind.CREATE, "d", mode=0o644)
    assert caught.value.errno == errno.EISDIR


def test_create_handles_non_utf8_names(applier: Applier, root: Path) -> None:
    name = os.fsdecode(b"caf\xe9-\xff")
    create(applier, name, b"latin-1 name")
    assert os.listdir(os.fsencode(root)) == [b"caf\xe9-\xff"]
    assert (root / name).read_bytes() == b"latin-1 name"


@needs_root
def test_mkdir_sets_mode_and_owner(applier: Applier, root: Path) -> None:
    run(applier, OpKind.MKDIR, "d", mode=0o2750, uid=UID, gid=GID)
    run(applier, OpKind.MKDIR, "d/e", mode=0o700)
    st = (root / "d").lstat()
    assert stat.S_ISDIR(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o2750
    assert (st.st_uid, st.st_gid) == (UID, GID)
    assert stat.S_IMODE((root / "d" / "e").lstat().st_mode) == 0o700


def test_mkdir_of_an_existing_directory_changes_nothing(applier: Applier, root: Path) -> None:
    (root / "d").mkdir(mode=0o755)
    before = snapshot(root)
    run(applier, OpKind.MKDIR, "d", mode=0o700)
    assert snapshot(root) == before


def test_mkdir_over_a_file_is_eexist(applier: Applier, root: Path) -> None:
    create(applier, "f")
    with pytest.raises(ApplyError) as caught:
        run(applier, OpKind.MKDIR, "f", mode=0o755)
    assert caught.value.errno == errno.EEXIST


@needs_root
def test_mknod_makes_fifos_and_device_nodes(applier: Applier, root: Path) -> None:
    run(applier, OpKind.MKNOD, "fifo", mode=stat.S_IFIFO | 0o620, uid=UID, gid=GID)
    run(applier, OpKind.MKNOD, "null", mode=stat.S_IFCHR | 0o666, rdev=os.makedev(1, 3))
    fifo = (root / "fifo").lstat()
    assert stat.S_ISFIFO(fifo.st_mode)
    assert stat.S_IMODE(fifo.st_mode) == 0o620
    assert (fifo.st_uid, fifo.st_gid) == (UID, GID)
    null = (root / "null").lstat()
    assert stat.S_ISCHR(null.st_mode)
    assert stat.S_IMODE(null.st_mode) == 0o666
    assert (os.major(null.st_rdev), os.minor(null.st_rdev)) == (1, 3)


def test_mknod_of_an_unknown_file_type_is_einval(applier: Applier, root: Path) -> None:
    with pytest.raises(ApplyError) as caught:
        run(applier, OpKind.MKNOD, "odd", mode=0o170000 | 0o644)
    assert caught.value.errno == errno.EINVAL
    assert list(root.iterdir()) == []


@needs_root
def test_symlink_stores_its_target_verbatim(applier: Applier, root: Path) -> None:
    target = "../../anything/" + os.fsdecode(b"\xfe")
    run(applier, OpKind.SYMLINK, "link", path2=target, uid=UID, gid=GID)
    st = (root / "link").lstat()
    assert stat.S_ISLNK(st.st_mode)
    assert (st.st_uid, st.st_gid) == (UID, GID)
    assert os.readlink(os.fsencode(root / "link")) == b"../../anything/\xfe"


def test_link_adds_a_name_to_the_same_inode(applier: Applier, root: Path) -> None:
    create(applier, "f", b"shared")
    run(applier, OpKind.MKDIR, "d", mode=0o755)
    run(applier, OpKind.LINK, "f", path2="d/g")
    f, g = (root / "f").stat(), (root / "d" / "g").stat()
    assert (f.st_ino, f.st_nlink) == (g.st_ino, 2)
    run(applier, OpKind.WRITE, "d/g", data=b"S")
    assert (root / "f").read_bytes() == b"Shared"


def test_link_of_a_symlink_links_the_symlink_itself(applier: Applier, root: Path) -> None:
    run(applier, OpKind.SYMLINK, "link", path2="nowhere")
    run(applier, OpKind.LINK, "link", path2="link2")
    assert os.readlink(root / "link2") == "nowhere"
    assert (root / "link2").lstat().st_nlink == 2


# -- removal and rename -------------------------------------------------------------------------


def test_unlink_and_rmdir_remove_names(applier: Applier, root: Path) -> None:
    run(applier, OpKind.MKDIR, "d", mode=0o755)
    create(applier, "d/f", b"x")
    run(applier, OpKind.SYMLINK, "d/l", path2="f")
    run(applier, OpKind.UNLINK, "d/f")
    run(applier, OpKind.UNLINK, "d/l")
    run(applier, OpKind.RMDIR, "d")
    assert list(root.iterdir()) == []


def test_rmdir_of_a_non_empty_directory_is_enotempty(applier: Applier, root: Path) -> None:
    run(applier, OpKind.MKDIR, "d", mode=0o755)
    create(applier, "d/f")
    with pytest.raises(ApplyError) as caught:
        run(applier, OpKind.RMDIR, "d")
    assert caught.value.errno == errno.ENOTEMPTY


def test_write_after_unlink_does_not_reach_the_removed_file(applier: Applier) -> None:
    create(applier, "f", b"cached fd")
    run(applier, OpKind.UNLINK, "f")
    with pytest.raises(ApplyError) as caught:
        run(applier, OpKind.WRITE, "f", data=b"lost?")
    assert caught.value.errno == errno.ENOENT


def test_rename_moves_and_replaces(applier: Applier, root: Path) -> None:
    create(applier, "a", b"old target")
    create(applier, "b", b"new")
    run(applier, OpKind.RENAME, "b", path2="a")
    assert sorted(os.listdir(root)) == ["a"]
    # "a" had a cached fd on the replaced inode: the next write must reach the new file.
    run(applier, OpKind.WRITE, "a", offset=3, data=b"!")
    assert (root / "a").read_bytes() == b"new!"


def test_rename_noreplace_refuses_an_existing_target(applier: Applier, root: Path) -> None:
    create(applier, "a", b"A")
    create(applier, "b", b"B")
    before = snapshot(root)
    with pytest.raises(ApplyError) as caught:
        run(applier, OpKind.RENAME, "a", path2="b", flags=RENAME_NOREPLACE)
    assert caught.value.errno == errno.EEXIST
    assert snapshot(root) == before
    run(applier, OpKind.RENAME, "a", path2="c", flags=RENAME_NOREPLACE)
    assert (root / "c").read_bytes() == b"A"


def test_rename_exchange_swaps_two_names(applier: Applier, root: Path) -> None:
    create(applier, "x", b"was x")
    run(applier, OpKind.MKDIR, "y", mode=0o755)
    run(applier, OpKind.RENAME, "x", path2="y", flags=RENAME_EXCHANGE)
    assert (root / "y").read_bytes() == b"was x"
    assert (root / "x").is_dir()
    run(applier, OpKind.WRITE, "y", data=b"W")
    assert (root / "y").read_bytes() == b"Was x"


def test_rename_with_both_flags_is_einval(applier: Applier) -> None:
    create(applier, "a")
    create(applier, "b")
    with pytest.raises(ApplyError) as caught:
        run(applier, OpKind.RENAME, "a", path2="b", flags=RENAME_EXCHANGE | RENAME_NOREPLACE)
    assert caught.value.errno == errno.EINVAL


def test_renaming_a_directory_moves_cached_files_with_it(applier: Applier, root: Path) -> None:
    run(applier, OpKind.MKDIR, "d", mode=0o755)
    create(applier, "d/f", b"1")
    run(applier, OpKind.RENAME, "d", path2="e")
    with pytest.raises(ApplyError) as caught:
        run(applier, OpKind.WRITE, "d/f", offset=1, data=b"2")
    assert caught.value.errno == errno.ENOENT
    run(applier, OpKind.WRITE, "e/f", offset=1, data=b"2")
    assert (root / "e" / "f").read_bytes() == b"12"


# -- attributes ---------------------------------------------------------------------------------


def setattr_op(path: str, fields: int, **values: int) -> Op:
    return Op(OpKind.SETATTR, 0, path, flags=fields, **values)  # type: ignore[arg-type]


@needs_root
def test_setattr_changes_only_the_fields_flagged(applier: Applier, root: Path) -> None:
    create(applier, "f", b"x", mode=0o600)
    before = (root / "f").stat()
    applier.apply(setattr_op("f", SetattrField.MODE, mode=0o640, uid=UID, gid=GID))
    st = (root / "f").stat()
    assert stat.S_IMODE(st.st_mode) == 0o640
    assert (st.st_uid, st.st_gid) == (before.st_uid, before.st_gid)

    applier.apply(setattr_op("f", SetattrField.UID, uid=UID, gid=GID))
    st = (root / "f").stat()
    assert (st.st_uid, st.st_gid) == (UID, before.st_gid)
    applier.apply(setattr_op("f", SetattrField.GID, gid=GID))
    assert (root / "f").stat().st_gid == GID


def test_setattr_times_to_the_nanosecond(applier: Applier, root: Path) -> None:
    create(applier, "f", b"x")
    both = SetattrField.ATIME | SetattrField.MTIME
    applier.apply(setattr_op("f", both, atime_ns=ATIME, mtime_ns=MTIME))
    st = (root / "f").stat()
    assert (st.st_atime_ns, st.st_mtime_ns) == (ATIME, MTIME)

    applier.apply(setattr_op("f", SetattrField.MTIME, mtime_ns=MTIME + 1))
    st = (root / "f").stat()
    assert (st.st_atime_ns, st.st_mtime_ns) == (ATIME, MTIME + 1)
    applier.apply(setattr_op("f", SetattrField.ATIME, atime_ns=ATIME + 1))
    st = (root / "f").stat()
    assert (st.st_atime_ns, st.st_mtime_ns) == (ATIME + 1, MTIME + 1)


@needs_root
def test_setattr_of_a_symlink_changes_the_link_not_its_target(
    applier: Applier, root: Path
) -> None:
    create(applier, "target", b"t", mode=0o600)
    run(applier, OpKind.SYMLINK, "link", path2="target")
    target_before = (root / "target").lstat()
    every = sum(SetattrField)
    applier.apply(setattr_op("link", every, mode=0o777, uid=UID, gid=GID, atime_ns=ATIME,
                             mtime_ns=MTIME))
    link = (root / "link").lstat()
    assert (link.st_uid, link.st_gid, link.st_mtime_ns) == (UID, GID, MTIME)
    assert (root / "target").lstat() == target_before


def test_setattr_of_the_root_itself(applier: Applier, root: Path) -> None:
    os.chmod(root, 0o755)
    applier.apply(setattr_op("", SetattrField.MODE | SetattrField.MTIME, mode=0o750,
                             mtime_ns=MTIME))
    st = root.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_mtime_ns) == (0o750, MTIME)


def test_setattr_with_unknown_fields_is_einval(applier: Applier, root: Path) -> None:
    create(applier, "f", mode=0o600)
    with pytest.raises(ApplyError) as caught:
        applier.apply(setattr_op("f", SetattrField.MODE | 64, mode=0o777))
    assert caught.value.errno == errno.EINVAL
    assert stat.S_IMODE((root / "f").stat().st_mode) == 0o600


def test_no_id_leaves_owner_unchanged_on_create(applier: Applier, root: Path) -> None:
    run(applier, OpKind.CREATE, "f", mode=0o600, uid=NO_ID, gid=NO_ID)
    st = (root / "f").stat()
    assert (st.st_uid, st.st_gid) == (os.geteuid(), os.getegid())


# -- errors from the OS -------------------------------------------------------------------------


def test_missing_file_and_file_as_directory_are_apply_errors(applier: Applier) -> None:
    create(applier, "f")
    cases = [("missing", errno.ENOENT), ("nodir/f", errno.ENOENT), ("f/g", errno.ENOTDIR)]
    for path, code in cases:
        with pytest.raises(ApplyError) as caught:
            run(applier, OpKind.WRITE, path, data=b"x")
        assert caught.value.errno == code, path
        assert repr(path) in str(caught.value)


def test_offset_beyond_off_t_is_an_apply_error(applier: Applier) -> None:
    create(applier, "f")
    with pytest.raises(ApplyError) as caught:
        run(applier, OpKind.WRITE, "f", offset=2**64 - 1, data=b"x")
    assert caught.value.errno in (errno.EINVAL, errno.EFBIG)


@needs_root
def test_full_filesystem_is_enospc(tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)], check=True)
    try:
        with Applier([small]) as applier:
            create(applier, "f")
            with pytest.raises(ApplyError) as caught:
                run(applier, OpKind.WRITE, "f", data=bytes(MIB))
            assert caught.value.errno == errno.ENOSPC
            assert "WRITE" in str(caught.value)
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_a_missing_root_is_an_apply_error(tmp_path: Path) -> None:
    with pytest.raises(ApplyError) as caught:
        Applier([tmp_path, tmp_path / "absent"])
    assert caught.value.errno == errno.ENOENT


def test_a_closed_applier_refuses_ops(root: Path) -> None:
    applier = Applier([root])
    applier.close()
    applier.close()
    with pytest.raises(ApplyError) as caught:
        applier.apply(Op(OpKind.CREATE, 0, "f"))
    assert caught.value.errno == errno.EBADF
    assert list(root.iterdir()) == []


def test_open_files_stay_bounded_by_the_cache_size(root: Path) -> None:
    baseline = open_fds()
    with Applier([root], max_open_files=2) as applier:
        for i in range(6):
            create(applier, f"f{i}", f"{i}".encode())
        for i in range(6):
            run(applier, OpKind.WRITE, f"f{i}", offset=1, data=b"+")
        assert open_fds() <= baseline + 1 + 2  # root fd + cache
    assert open_fds() == baseline
    assert [(root / f"f{i}").read_bytes() for i in range(6)] == [f"{i}+".encode()
                                                                  for i in range(6)]


# -- confinement --------------------------------------------------------------------------------


def no_setup(applier: Applier, root: Path, outside: Path) -> None:
    """Nothing beyond the fixtures."""


def evil_dir(applier: Applier, root: Path, outside: Path) -> None:
    """ln -s <outside> evil, plus a real file inside."""
    os.symlink(outside, root / "evil")
    (root / "f").write_bytes(b"inside")


def dir_a_with_evil(applier: Applier, root: Path, outside: Path) -> None:
    """The same symlink one level down: a/evil -> <outside>."""
    (root / "a").mkdir()
    os.symlink(outside, root / "a" / "evil")


def evil_file_link(applier: Applier, root: Path, outside: Path) -> None:
    """A symlink to the canary file, made through the applier (allowed: stored verbatim)."""
    run(applier, OpKind.SYMLINK, "link", path2=str(outside / "secret"))


def inner_link(applier: Applier, root: Path, outside: Path) -> None:
    """Even a symlink to a directory inside the root is never traversed."""
    (root / "a").mkdir()
    os.symlink("a", root / "inner")


def special_files(applier: Applier, root: Path, outside: Path) -> None:
    os.mkfifo(root / "fifo")
    if os.geteuid() == 0:
        os.mknod(root / "zero", stat.S_IFCHR | 0o666, os.makedev(1, 5))


def op(kind: OpKind, path: str, **fields: object) -> Op:
    return Op(kind, 0, path, **fields)  # type: ignore[arg-type]


CONFINEMENT_CASES: list[tuple[str, Callable[[Applier, Path, Path], None], Op]] = [
    ("dotdot", no_setup, op(OpKind.WRITE, "../outside/secret", data=b"x")),
    ("dotdot-inside", dir_a_with_evil, op(OpKind.WRITE, "a/../../outside/secret", data=b"x")),
    ("absolute-etc-passwd", no_setup, op(OpKind.CREATE, "/etc/passwd", mode=0o644)),
    ("absolute-canary", no_setup, op(OpKind.WRITE, "{outside}/secret", data=b"x")),
    ("double-slash", no_setup, op(OpKind.CREATE, "a//b", mode=0o644)),
    ("dot", no_setup, op(OpKind.CREATE, "./a", mode=0o644)),
    ("lone-dot", no_setup, op(OpKind.MKDIR, ".", mode=0o755)),
    ("trailing-slash", no_setup, op(OpKind.CREATE, "a/", mode=0o644)),
    ("empty", no_setup, op(OpKind.CREATE, "", mode=0o644)),
    ("nul", no_setup, op(OpKind.CREATE, "a\x00b", mode=0o644)),
    ("root-index", no_setup, Op(OpKind.CREATE, 5, "x", mode=0o644)),
    ("symlinked-dir-write", evil_dir, op(OpKind.WRITE, "evil/secret", data=b"x")),
    ("symlinked-dir-truncate", evil_dir, op(OpKind.TRUNCATE, "evil/secret")),
    ("symlinked-dir-create", evil_dir, op(OpKind.CREATE, "evil/new", mode=0o644)),
    ("symlinked-dir-mkdir", evil_dir, op(OpKind.MKDIR, "evil/new", mode=0o755)),
    ("symlinked-dir-mknod", evil_dir, op(OpKind.MKNOD, "evil/fifo", mode=stat.S_IFIFO | 0o644)),
    ("symlinked-dir-symlink", evil_dir, op(OpKind.SYMLINK, "evil/l", path2="x")),
    ("symlinked-dir-unlink", evil_dir, op(OpKind.UNLINK, "evil/secret")),
    ("symlinked-dir-rmdir", evil_dir, op(OpKind.RMDIR, "evil/sub")),
    ("symlinked-dir-setattr", evil_dir,
     op(OpKind.SETATTR, "evil/secret", flags=SetattrField.MODE, mode=0o777)),
    ("symlinked-dir-fsync", evil_dir, op(OpKind.FSYNC, "evil/secret")),
    ("symlinked-dir-fallocate", evil_dir, op(OpKind.FALLOCATE, "evil/secret", length=MIB)),
    ("symlinked-dir-deeper", dir_a_with_evil, op(OpKind.WRITE, "a/evil/sub/deep", data=b"x")),
    ("rename-into-symlinked-dir", evil_dir, op(OpKind.RENAME, "f", path2="evil/x")),
    ("rename-over-canary", evil_dir, op(OpKind.RENAME, "f", path2="evil/secret")),
    ("rename-out-of-symlinked-dir", evil_dir, op(OpKind.RENAME, "evil/secret", path2="got")),
    ("rename-to-dotdot", evil_dir, op(OpKind.RENAME, "f", path2="../x")),
    ("exchange-with-canary", evil_dir,
     op(OpKind.RENAME, "f", path2="evil/secret", flags=RENAME_EXCHANGE)),
    ("link-from-symlinked-dir", evil_dir, op(OpKind.LINK, "evil/secret", path2="stolen")),
    ("link-into-symlinked-dir", evil_dir, op(OpKind.LINK, "f", path2="evil/x")),
    ("link-to-absolute", evil_dir, op(OpKind.LINK, "f", path2="{outside}/x")),
    ("rename-from-absolute", evil_dir, op(OpKind.RENAME, "{outside}/secret", path2="got")),
    ("write-through-symlink", evil_file_link, op(OpKind.WRITE, "link", data=b"x")),
    ("truncate-through-symlink", evil_file_link, op(OpKind.TRUNCATE, "link")),
    ("fallocate-through-symlink", evil_file_link,
     op(OpKind.FALLOCATE, "link", length=MIB)),
    ("create-through-symlink", evil_file_link, op(OpKind.CREATE, "link", mode=0o644)),
    ("fsync-through-symlink", evil_file_link, op(OpKind.FSYNC, "link")),
    ("inner-symlink-dir", inner_link, op(OpKind.CREATE, "inner/f", mode=0o644)),
    ("symlink-target-nul", no_setup, op(OpKind.SYMLINK, "l", path2="a\x00b")),
    ("write-to-fifo", special_files, op(OpKind.WRITE, "fifo", data=b"x")),
    ("fsync-of-fifo", special_files, op(OpKind.FSYNC, "fifo")),
]


@pytest.mark.parametrize(("setup", "bad_op"), [pytest.param(s, o, id=name)
                                               for name, s, o in CONFINEMENT_CASES])
def test_confinement_refuses_escapes_and_touches_nothing(
    applier: Applier,
    root: Path,
    outside: Path,
    setup: Callable[[Applier, Path, Path], None],
    bad_op: Op,
) -> None:
    setup(applier, root, outside)
    # The canary's absolute path is only known at run time.
    bad_op = replace(bad_op, path=bad_op.path.replace("{outside}", str(outside)),
                     path2=bad_op.path2.replace("{outside}", str(outside)))
    inside, canary = snapshot(root), snapshot(outside)
    with pytest.raises(ConfinementError):
        applier.apply(bad_op)
    assert snapshot(outside) == canary
    assert snapshot(root) == inside


@needs_root
def test_write_to_a_device_node_is_refused(applier: Applier, root: Path) -> None:
    os.mknod(root / "full", stat.S_IFCHR | 0o666, os.makedev(1, 7))  # /dev/full
    with pytest.raises(ConfinementError):
        run(applier, OpKind.WRITE, "full", data=b"x")


def test_confinement_error_names_the_op(applier: Applier) -> None:
    with pytest.raises(ConfinementError) as caught:
        applier.apply(Op(OpKind.RENAME, 0, "f", seq=42, path2="../x"))
    message = str(caught.value)
    assert "RENAME #42" in message
    assert "'../x'" in message
    assert caught.value.errno == errno.EPERM


def test_confinement_error_says_why(applier: Applier) -> None:
    reasons = {"/etc/passwd": "absolute", "a/../b": "'..'", "a\x00b": "NUL", "a//b": "''"}
    for path, reason in reasons.items():
        with pytest.raises(ConfinementError, match=reason):
            run(applier, OpKind.CREATE, path)


def test_reset_keeps_the_previous_content_aside_and_empties_the_root(tmp_path: Path) -> None:
    root = tmp_path / "data"
    (root / "d").mkdir(parents=True)
    (root / "d" / "f").write_bytes(b"old")
    (root / "g").write_bytes(b"older")
    with Applier([root]) as applier:
        applier.apply(Op(OpKind.WRITE, 0, "g", seq=1, offset=0, data=b"x"))  # cached fd
        applier.apply(Op(OpKind.RESET, 0, "", seq=2))
        assert os.listdir(root) == []
        applier.apply(Op(OpKind.CREATE, 0, "g", seq=3, mode=0o644))
        applier.apply(Op(OpKind.WRITE, 0, "g", seq=4, offset=0, data=b"new"))
        applier.apply(Op(OpKind.RESYNC_DONE, 0, "", seq=5))
    (aside,) = (tmp_path / "data.mirrorha-aside").iterdir()
    assert (aside / "d" / "f").read_bytes() == b"old"
    assert (aside / "g").read_bytes() == b"xlder"
    assert (root / "g").read_bytes() == b"new"  # the cached fd of the old g was not reused
