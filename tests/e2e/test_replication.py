"""Synchronous replication in the lab: real FUSE over-mounts, real TLS stream between nodes."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from appliance.lab import Lab, LabSettings
from appliance.waiting import wait_until
from tests.e2e.conftest import Cluster
from tests.e2e.test_failover import formed
from tests.support.trees import differences

pytestmark = pytest.mark.slow

DATA = "/srv/mirrorha-lab-data"
REPLICATED = dataclasses.replace(LabSettings(), replicated_dirs=(DATA,))


def sh(c: Cluster, node: str, script: str, timeout: float = 30.0) -> str:
    return c.lab.node_run(node, ["sh", "-c", script], timeout=timeout).stdout


def digest(c: Cluster, node: str) -> str:
    """Content, modes, owners, sizes and mtimes of every entry of the node's backing copy,
    read through the node's own mount."""
    # .mirrorha-aside holds what a node had before a full resync: kept locally, not replicated.
    walk = "find . -path ./.mirrorha-aside -prune -o"
    return sh(c, node, f"cd {DATA} && {walk} -printf '%p %y %m %U %G %s %T@ %l\\n' | sort && "
                       f"{walk} -type f -exec sha256sum {{}} + | sort -k2")


def mounted(c: Cluster, node: str) -> bool:
    return "fuse" in sh(c, node, f"grep ' {DATA} ' /proc/mounts || true")


@pytest.mark.parametrize("lab_settings", [REPLICATED])
def test_writes_on_the_primary_are_on_the_secondary_and_survive_failover(
        cluster: Cluster) -> None:
    formed(cluster)
    assert mounted(cluster, "node1") and mounted(cluster, "node2")
    sh(cluster, "node1", f"""
        set -e; cd {DATA}
        mkdir -p db/base; head -c 3000000 /dev/urandom > db/base/1
        printf hello > greeting; ln greeting greeting.link; ln -s db/base/1 current
        dd if=/dev/urandom of=sparse bs=4096 count=1 seek=100000 conv=notrunc 2>/dev/null
        chmod 600 db/base/1; chown 1234:5678 greeting; touch -d '2020-01-02 03:04:05' greeting
        printf again >> greeting; mv db/base/1 db/base/2; sync""")
    wait_until(lambda: digest(cluster, "node2") == digest(cluster, "node1"), 10,
               "node2's copy to equal node1's")
    refused = cluster.lab.node_run("node2", ["sh", "-c", f"echo x > {DATA}/local"], check=False)
    assert refused.returncode != 0 and "Read-only" in refused.stderr
    before = digest(cluster, "node1")
    cluster.lab.crash_node("node1")
    cluster.wait_state("node2", "ALONE")
    assert digest(cluster, "node2") == before
    sh(cluster, "node2", f"printf 'written alone' > {DATA}/after-failover")
    # The old primary returns: its copy lags behind, nothing of its own to keep (it wrote
    # nothing alone), so it is reintegrated in place with what changed.
    cluster.lab.start_node("node1")
    cluster.wait_pair("node2", "node1", timeout=30)
    wait_until(lambda: digest(cluster, "node1") == digest(cluster, "node2"), 10,
               "node1's copy to equal node2's after its return")
    assert "written alone" in sh(cluster, "node1", f"cat {DATA}/after-failover")
    assert "reintegration of node1 (journal mode)" in cluster.module_log("node2")
    backing = cluster.lab.private_dir_source("node1", Path(DATA))
    assert not (backing / ".mirrorha-aside").exists()


def test_lab_without_replicated_dirs_mounts_nothing(cluster: Cluster) -> None:
    formed(cluster)
    st = cluster.state("node1")
    assert st is not None and st["replication"] is None
    assert Lab.NODES == ("node1", "node2")


@pytest.mark.parametrize("lab_settings", [REPLICATED])
def test_swap_hands_over_identical_copies_and_keeps_replicating(cluster: Cluster) -> None:
    formed(cluster)
    sh(cluster, "node1", f"head -c 2000000 /dev/urandom > {DATA}/before-swap")
    cluster.cmd("node1", "swap")
    cluster.wait_pair("node2", "node1")
    assert "attached (copies identical)" in cluster.module_log("node2")
    assert "full resync" not in cluster.module_log("node2")  # no copy needed for a swap
    sh(cluster, "node2", f"printf 'written on node2' > {DATA}/after-swap; sync {DATA}/after-swap")
    wait_until(lambda: digest(cluster, "node1") == digest(cluster, "node2"), 10,
               "node1 (now SECOND) to receive node2's writes")
    cluster.cmd("node2", "swap")
    cluster.wait_pair("node1", "node2")
    sh(cluster, "node1", f"rm {DATA}/before-swap")
    wait_until(lambda: digest(cluster, "node2") == digest(cluster, "node1"), 10,
               "the swap back to replicate too")


@pytest.mark.parametrize("lab_settings", [REPLICATED])
def test_primary_keeps_writing_alone_when_the_secondary_dies_then_resyncs_it(
        cluster: Cluster) -> None:
    formed(cluster)
    sh(cluster, "node1", f"printf one > {DATA}/a && sync {DATA}/a")
    cluster.lab.crash_node("node2")
    # fsync keeps working: the primary stops waiting for the dead secondary within the
    # heartbeat timeout and continues ALONE.
    sh(cluster, "node1", f"""set -e; cd {DATA}
        for i in $(seq 1 50); do printf "$i" >> counter; sync counter; done
        printf two > b; sync b""")
    cluster.wait_state("node1", "ALONE")
    assert sh(cluster, "node1", f"cat {DATA}/counter").startswith("12345")
    cluster.lab.start_node("node2")
    cluster.wait_pair("node1", "node2", timeout=30)
    wait_until(lambda: digest(cluster, "node2") == digest(cluster, "node1"), 10,
               "node2 to be resynchronised")


EVERY_OPERATION = r"""
import ctypes, mmap, os, sys
os.chdir(sys.argv[1])
os.makedirs("a/b/c")
with open("a/f", "wb") as f:                     # create + write
    f.write(os.urandom(300_000))
fd = os.open("a/f", os.O_RDWR)
os.pwrite(fd, b"middle", 123_456)                # write at an offset
os.ftruncate(fd, 200_000)                        # truncate down
os.ftruncate(fd, 250_000)                        # truncate up: a hole at the end
os.fsync(fd); os.fdatasync(fd); os.close(fd)
with open("a/f", "ab") as f:                     # append
    f.write(b"tail")
with open("sparse", "wb") as f:                  # holes stay holes
    f.seek(5 << 20); f.write(b"x"); f.seek(9 << 20); f.write(b"y")
for flag, name in ((os.O_SYNC, "osync"), (os.O_DSYNC, "odsync")):
    fd = os.open(name, os.O_CREAT | os.O_WRONLY | flag, 0o640)
    os.write(fd, b"durable " * 1000); os.close(fd)
with open("mapped", "wb") as f:
    f.truncate(64 << 10)
with open("mapped", "r+b") as f:                 # MAP_SHARED writes + msync
    m = mmap.mmap(f.fileno(), 64 << 10)
    m[4096:4100] = b"MMAP"; m.flush(); m.close()
fd = os.open("prealloc", os.O_CREAT | os.O_WRONLY, 0o600)
os.posix_fallocate(fd, 0, 100_000); os.close(fd)  # emulated: zeros written
os.mkfifo("a/fifo", 0o620)                       # mknod
os.symlink("a/f", "link"); os.symlink("../nowhere", "a/dangling")
os.link("a/f", "a/b/hard")                       # hard link
with open("gone", "w") as f: f.write("x")
os.unlink("gone")                                # unlink
os.mkdir("emptydir"); os.rmdir("emptydir")       # rmdir
os.rename("osync", "a/b/c/renamed")              # rename across dirs
with open("target", "w") as f: f.write("old")
with open("over", "w") as f: f.write("new")
os.rename("over", "target")                      # rename over an existing file
with open("left", "w") as f: f.write("L")
with open("right", "w") as f: f.write("R")
libc = ctypes.CDLL(None, use_errno=True)         # renameat2(RENAME_EXCHANGE)
if libc.renameat2(-100, b"left", -100, b"right", 2) != 0:
    raise OSError(ctypes.get_errno(), "renameat2")
os.chmod("a/f", 0o604); os.chown("a/b/hard", 1234, 5678)
os.chown("link", 42, 43, follow_symlinks=False)
os.utime("a/b/c/renamed", ns=(1_600_000_000_000_000_000, 1_500_000_000_123_456_789))
fd = os.open("a/b", os.O_RDONLY | os.O_DIRECTORY); os.fsync(fd); os.close(fd)
"""


@pytest.mark.parametrize("lab_settings", [REPLICATED])
def test_every_operation_kind_reaches_the_secondary_byte_for_byte(cluster: Cluster) -> None:
    formed(cluster)
    script = cluster.lab.node_dir("node1") / "every_operation.py"
    script.write_text(EVERY_OPERATION)
    cluster.lab.node_run("node1", [str(cluster.lab.python), str(script), DATA])
    mine = cluster.lab.private_dir_source("node1", Path(DATA))
    theirs = cluster.lab.private_dir_source("node2", Path(DATA))
    wait_until(lambda: not differences(mine, theirs), 15,
               "node2's backing copy to equal node1's (content, size, sparseness, mode, "
               "owner, mtime, links)")
    assert (theirs / "sparse").stat().st_blocks * 512 < 1 << 20  # still sparse there
    assert os.stat(theirs / "a" / "b" / "hard").st_ino == os.stat(theirs / "a" / "f").st_ino
    assert (theirs / "left").read_text() == "R" and (theirs / "target").read_text() == "new"


@pytest.mark.parametrize("lab_settings", [REPLICATED])
def test_the_application_of_a_takeover_can_fsync_from_its_first_instant(
        cluster: Cluster) -> None:
    """start_prim of the new primary runs before the node advertises ALONE, but its generation
    is already on disk: a durable write (PostgreSQL's lock file, say) must succeed at once,
    not fail with EIO after three ack timeouts."""
    formed(cluster)
    script = cluster.lab.node_paths("node2").bin_dir / "start_prim"
    check = (f"{cluster.lab.python} -c \"import os; fd = os.open('{DATA}/started-by-node2', "
             "os.O_CREAT | os.O_WRONLY, 0o644); os.write(fd, b'x'); os.fsync(fd)\" "
             "|| { echo 'fsync in start_prim failed'; exit 1; }\n")
    text = script.read_text()
    script.write_text(text.replace("res=0\n", "res=0\n" + check, 1))
    cluster.lab.crash_node("node1")
    cluster.wait_state("node2", "ALONE")
    cluster.wait_served_by("node2")
    log = cluster.module_log("node2")
    assert "start_prim exited 0" in log and "start_prim failed" not in log, log[-2000:]
    assert "fsync in start_prim failed" not in cluster.cmd("node2", "applog").stdout
