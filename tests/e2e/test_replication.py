"""Synchronous replication in the lab: real FUSE over-mounts, real TLS stream between nodes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from appliance.lab import Lab, LabSettings
from appliance.waiting import wait_until
from tests.e2e.conftest import Cluster
from tests.e2e.test_failover import formed

pytestmark = pytest.mark.slow

DATA = "/srv/mirrorha-lab-data"
REPLICATED = dataclasses.replace(LabSettings(), replicated_dirs=(DATA,))


def sh(c: Cluster, node: str, script: str) -> str:
    return c.lab.node_run(node, ["sh", "-c", script]).stdout


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
