"""Operator-facing behaviour in the lab: scripts, logs, snapshots, interface checks."""

from __future__ import annotations

import io
import zipfile

import pytest

from appliance.waiting import wait_until
from tests.e2e.conftest import Cluster
from tests.e2e.test_failover import formed

pytestmark = pytest.mark.slow

FAILING_START = """#!/bin/sh
echo "Running start_prim $*"
$SAFE/safekit printe "start_prim failed"
$SAFE/safekit stop -i start_prim
exit 1
"""


def test_failing_start_prim_logs_and_stops_the_module_as_the_reference_does(
        cluster: Cluster) -> None:
    formed(cluster)
    script = cluster.lab.node_paths("node2").bin_dir / "start_prim"
    script.write_text(FAILING_START)
    cluster.cmd("node1", "stop")            # node2 must take over, and its start fails
    cluster.wait_state("node2", "STOP")
    log = cluster.module_log("node2")
    assert "script: start_prim failed" in log
    assert "start_prim failed with exit code 1" in log
    assert "stopped by start_prim" in log
    assert not cluster.lab.app_pids().get("node2")
    assert "Running start_prim" in cluster.cmd("node2", "applog").stdout


def test_printi_and_log_commands_reach_the_module_log(cluster: Cluster) -> None:
    formed(cluster)
    cluster.cmd("node1", "printi", "hello", "from", "the", "operator")
    cluster.cmd("node1", "printe", "<script>alert(1)</script>")
    out = cluster.cmd("node1", "log", "-n", "5").stdout
    assert "I PRIM script: hello from the operator" in out or "script: hello from the" in out
    assert "E" in out and "<script>alert(1)</script>" in out


def test_snapshot_holds_config_scripts_logs_state_and_versions_but_never_the_key(
        cluster: Cluster) -> None:
    formed(cluster)
    out = cluster.lab.node_dir("node1") / "snap.zip"
    cluster.cmd("node1", "snapshot", "-o", str(out))
    with zipfile.ZipFile(io.BytesIO(out.read_bytes())) as z:
        names = set(z.namelist())
        assert {"cluster.xml", "mirror/conf/userconfig.xml", "mirror/bin/start_prim",
                "mirror/bin/stop_prim", "mirror/log/module.log", "mirror/state.json",
                "state.json", "versions.txt"} <= names
        assert not any("key" in n for n in names)
        assert b'"state": "PRIM"' in z.read("state.json")
        assert b"mirrorha " in z.read("versions.txt")


def test_vip_interface_down_on_primary_moves_service_to_peer(cluster: Cluster) -> None:
    formed(cluster)
    # Unplug node1's VIP network only: heartbeats still flow on the second network, so this
    # is the interface check (check="on") at work, not a heartbeat failover.
    cluster.lab.cut("node1", "default", carrier=True)
    cluster.wait_state("node1", "WAIT")
    cluster.wait_state("node2", "ALONE")
    cluster.wait_served_by("node2")
    assert "interface eth0 of the VIP is down" in cluster.module_log("node1")
    cluster.lab.restore("node1", "default")
    cluster.wait_pair("node2", "node1")


def test_commands_refused_by_the_state_say_why_and_exit_non_zero(cluster: Cluster) -> None:
    formed(cluster)
    cases = [("node2", "restart", "does not run"), ("node1", "start", "already started"),
             ("node1", "prim", "already primary"), ("node2", "second", "already SECOND")]
    for node, command, why in cases:
        res = cluster.cmd(node, command, check=False)
        assert res.returncode != 0, (node, command)
        assert why in res.stderr and "Traceback" not in res.stderr, res.stderr
    wait_until(lambda: cluster.state_name("node1") == "PRIM", 2, "node1 still PRIM")
