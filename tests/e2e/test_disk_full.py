"""Disk full on the secondary (issue 4): the primary is told, degrades to ALONE, the application
gets no false success and never hangs beyond the timeout; once the secondary has room again the
pair returns to PRIM/SECOND with identical copies.

node2's copy of the replicated directory is a small filesystem of its own (the lab's
`private_dir_limits`: a size-limited tmpfs under the node's bind mount, mounted before the daemon
over-mounts it with FUSE). An application on node1 appends to a file and fsyncs after every
chunk, three times more than node2 can hold, timing each call.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import stat
from pathlib import Path
from typing import Any

import pytest

from appliance.lab import LabError, LabSettings
from appliance.waiting import holds_for, wait_until
from tests.e2e.conftest import E2E_PREFIX, Cluster
from tests.e2e.disk_writer import chunk
from tests.e2e.test_failover import formed

pytestmark = pytest.mark.slow

# Our own path, derived from the lab prefix: a lab of another prefix running at the same time
# must not share (and remove) the host-side mount point.
DATA = f"/srv/mirrorha-{E2E_PREFIX}-disk-full"
SETTINGS = dataclasses.replace(LabSettings(), replicated_dirs=(DATA,))
TIMEOUT_S = SETTINGS.timeout_ms / 1000
MIB = 1 << 20
SMALL = 8 * MIB  # node2's filesystem
CHUNK = 256 * 1024
CHUNKS = 3 * SMALL // CHUNK  # three times what node2 can hold
# Big enough for node1's data twice: a full copy (rather than a reintegration) moves the copy
# node2 held when it filled up aside, on the same filesystem, before copying everything again.
ROOMY = SMALL + 2 * CHUNKS * CHUNK
# The durability contract lets a durable op wait at most three ack timeouts (= the heartbeat
# timeout) before it fails with EIO; plus scheduling slack on a shared two-core machine.
CALL_BOUND_S = 3 * TIMEOUT_S + 2.0
WRITER = Path(__file__).with_name("disk_writer.py")
ASIDE = ".mirrorha-aside"
SYNC_FAILED = re.compile(r"(resync to|reintegration of) node2 failed")


@pytest.fixture
def lab_settings() -> LabSettings:
    return SETTINGS


@pytest.fixture
def lab_options() -> dict[str, Any]:
    return {"private_dir_limits": {("node2", DATA): SMALL}}


def backing(c: Cluster, node: str) -> Path:
    """The node's own copy (under its FUSE mount), seen from the host."""
    return c.lab.private_dir_source(node, Path(DATA))


def run_writer(c: Cluster) -> list[dict[str, Any]]:
    """The application on node1; returns one record per chunk (see disk_writer.py)."""
    output = c.lab.labdir / "disk-writer.jsonl"
    argv = [str(c.lab.python), str(WRITER), f"{DATA}/big", str(CHUNK), str(CHUNKS), str(output)]
    failure: str | None = None
    try:
        result = c.lab.node_run("node1", argv, check=False, timeout=120)
        if result.returncode != 0:
            failure = f"the writer exited {result.returncode}: {result.stderr.strip()[-500:]}"
    except LabError as e:  # no answer within the deadline: some call hung
        failure = str(e)
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert failure is None, f"{failure}; last calls: {records[-3:]}"
    return records


def durations(records: list[dict[str, Any]]) -> list[tuple[float, str]]:
    calls = [(r["write_s"], f"write of chunk {r['i']}") for r in records]
    calls += [(r["fsync_s"], f"fsync of chunk {r['i']}") for r in records
              if r["fsync_s"] is not None]
    return sorted(calls, reverse=True)


def module_lines(c: Cluster, node: str, *words: str) -> list[str]:
    return [line for line in c.module_log(node).splitlines() if all(w in line for w in words)]


def no_space(line: str) -> bool:
    return "ENOSPC" in line or "No space left" in line


def fill_the_secondary(c: Cluster) -> list[dict[str, Any]]:
    """node1 PRIM, node2 SECOND in sync; the application writes more than node2 holds. Checks
    what the application saw and what both nodes say; returns the writer's records."""
    formed(c)
    records = run_writer(c)
    assert len(records) == CHUNKS

    # (1) node1 was told why and runs ALONE; node2 says why its stream ended.
    c.wait_state("node1", "ALONE", timeout=10)
    went_alone = module_lines(c, "node1", "PRIM -> ALONE")
    assert went_alone and no_space(went_alone[0]) and "node2" in went_alone[0], (
        f"node1's log does not name node2's full disk as the cause: {went_alone}")
    ended = module_lines(c, "node2", "replication stream from node1 ended")
    assert ended and no_space(ended[0]), f"node2's log does not say why: {ended}"

    # (2) No false success: every chunk whose fsync succeeded is on node1's disk (true: node1 is
    # ALONE, its own copy is the reference). No call hung beyond the contract's bound.
    assert not [r for r in records if r["write_error"]], "a write failed on node1's big disk"
    fsynced = [r for r in records if r["fsync_error"] is None]
    data = (backing(c, "node1") / "big").read_bytes()
    lost = [r["i"] for r in fsynced
            if data[r["offset"]:r["offset"] + CHUNK] != chunk(r["i"], CHUNK)]
    assert not lost, f"chunks fsynced successfully but not on node1's disk: {lost}"
    beyond = [r for r in fsynced if r["offset"] + CHUNK > SMALL]
    failed = [(r["i"], r["fsync_error"], round(r["fsync_s"], 3)) for r in records
              if r["fsync_error"]]
    assert beyond, ("no fsync succeeded beyond node2's capacity: node1 did not keep serving "
                    f"(failed fsyncs: {failed[:5]}... {len(failed)} in all)")
    longest = durations(records)[:3]
    print(f"{len(fsynced)}/{len(records)} fsyncs succeeded, {len(beyond)} beyond node2's "
          f"{SMALL // MIB} MiB; longest calls {[(round(t, 3), what) for t, what in longest]} "
          f"(bound {CALL_BOUND_S:g} s)")
    assert longest[0][0] <= CALL_BOUND_S, (
        f"calls blocked longer than {CALL_BOUND_S:g} s: {longest}")

    # (3) node2 never claims to be in sync with a copy that misses node1's writes. The resync
    # node1 starts at once fails too (node2's disk is still full).
    wait_until(lambda: any(SYNC_FAILED.search(line) for line in c.module_log("node1")
                           .splitlines()), 10, "node1's first resync attempt to fail")

    def degraded() -> bool:
        st1, st2 = c.state("node1"), c.state("node2")
        return (st1 is not None and st1["state"] == "ALONE" and st2 is not None
                and not st2["in_sync"] and st2["state"] in ("SECOND", "WAIT"))
    assert degraded()
    holds_for(degraded, 5 * TIMEOUT_S, "node1 ALONE, node2 not in sync")
    return records


def tree(root: Path) -> dict[str, tuple[Any, ...]]:
    """Every entry under root but the kept-aside former copies: type, mode, owner, size,
    content hash, symlink target, and mtime (except for directories, whose mtime the aside
    folder changes)."""
    entries: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if Path(dirpath) == root and ASIDE in dirnames:
            dirnames.remove(ASIDE)
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            extra: tuple[Any, ...] = ()
            if stat.S_ISREG(st.st_mode):
                extra = (hashlib.sha256(path.read_bytes()).hexdigest(), st.st_mtime_ns)
            elif stat.S_ISLNK(st.st_mode):
                extra = (os.readlink(path), st.st_mtime_ns)
            entries[str(path.relative_to(root))] = (
                st.st_mode, st.st_uid, st.st_gid,
                None if stat.S_ISDIR(st.st_mode) else st.st_size, *extra)
    return entries


def assert_identical_copies(c: Cluster) -> None:
    wait_until(lambda: tree(backing(c, "node2")) == tree(backing(c, "node1")), 10,
               "node2's copy to equal node1's")
    assert (backing(c, "node1") / "big").stat().st_size == CHUNKS * CHUNK


def test_disk_full_on_the_secondary_degrades_to_alone_without_false_success(
        cluster: Cluster) -> None:
    fill_the_secondary(cluster)
    # node2 gets room again. Nothing retries the failed resync by itself (see the next test),
    # so the operator restarts node2's module: it rejoins and is resynchronised.
    cluster.lab.resize_private_dir("node2", DATA, ROOMY)
    cluster.cmd("node2", "stop")
    cluster.wait_state("node2", "STOP")
    cluster.cmd("node2", "start")
    cluster.wait_pair("node1", "node2", timeout=60)
    assert_identical_copies(cluster)
    st1, st2 = cluster.state("node1"), cluster.state("node2")
    assert st1 is not None and st2 is not None
    assert st2["in_sync"] and st2["generation"] == st1["generation"]


def test_pair_recovers_by_itself_once_the_secondary_has_room(cluster: Cluster) -> None:
    fill_the_secondary(cluster)
    cluster.lab.resize_private_dir("node2", DATA, ROOMY)
    # The failed copy is tried again (1 s, then doubling): no operator needed.
    cluster.wait_pair("node1", "node2", timeout=40)
    assert_identical_copies(cluster)
    assert "trying again in" in cluster.module_log("node1")
