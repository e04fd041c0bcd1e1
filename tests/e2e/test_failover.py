"""Failover scenarios in the two-node lab, the client polling the VIP over HTTP."""

from __future__ import annotations

import dataclasses

import pytest

from appliance.lab import Lab, LabSettings
from appliance.waiting import holds_for, wait_until
from tests.e2e.conftest import Cluster

pytestmark = pytest.mark.slow

TIMEOUT_S = LabSettings().timeout_ms / 1000


def formed(c: Cluster) -> None:
    """The lab starts node1 then node2: node1 becomes primary, node2 its SECOND."""
    c.wait_pair("node1", "node2")
    c.wait_served_by("node1")
    assert c.lab.app_pids()["node1"] and not c.lab.app_pids().get("node2")


def test_cluster_forms_with_first_node_primary(cluster: Cluster) -> None:
    formed(cluster)
    st = cluster.state("node1")
    assert st is not None and st["peer_state"] == "SECOND"
    assert st["vip"][0]["held"] is True
    st2 = cluster.state("node2")
    assert st2 is not None and st2["vip"][0]["held"] is False
    assert st["generation"] == st2["generation"]


def test_secondary_takes_over_when_primary_crashes_and_old_primary_returns(
        cluster: Cluster) -> None:
    formed(cluster)
    cluster.lab.crash_node("node1")
    cluster.wait_state("node2", "ALONE")
    cluster.wait_served_by("node2")
    log = cluster.module_log("node2")
    assert "SECOND -> ALONE" in log and "in sync" in log
    # The old primary comes back: it must rejoin as SECOND, never serve.
    cluster.lab.restore("node1")
    cluster.lab.start_node("node1")
    cluster.wait_pair("node2", "node1")
    assert cluster.vip_body() == "node2\n"
    assert not cluster.lab.app_pids().get("node1")


def test_swap_exchanges_roles_and_moves_the_vip(cluster: Cluster) -> None:
    formed(cluster)
    refused = cluster.cmd("node2", "swap", check=False)
    assert refused.returncode != 0 and "primary" in refused.stderr
    cluster.cmd("node1", "swap")
    cluster.wait_pair("node2", "node1")
    cluster.wait_served_by("node2")
    pids = cluster.lab.app_pids()
    assert pids["node2"] and not pids.get("node1")


def test_stop_on_primary_fails_over(cluster: Cluster) -> None:
    formed(cluster)
    cluster.cmd("node1", "stop")
    cluster.wait_state("node1", "STOP")
    cluster.wait_state("node2", "ALONE")
    cluster.wait_served_by("node2")
    assert "stopped by operator" in cluster.module_log("node1")


@pytest.mark.parametrize("lab_settings", [dataclasses.replace(LabSettings(), maxloop=2)])
def test_app_killed_repeatedly_is_restarted_then_node_stops_and_peer_takes_over(
        cluster: Cluster) -> None:
    formed(cluster)
    for attempt in (1, 2):
        pid = cluster.lab.app_pids()["node1"][0]
        cluster.lab.node_run("node1", ["pkill", "-9", "-x", "mh-sampleapp"])
        wait_until(lambda p=pid: (cluster.lab.app_pids().get("node1") or [p])[0] != p,
                   10, f"restart {attempt} of the application on node1")
        assert f"restart {attempt} of 2" in cluster.module_log("node1")
    cluster.lab.node_run("node1", ["pkill", "-9", "-x", "mh-sampleapp"])
    cluster.wait_state("node1", "STOP")
    assert "maxloop" in cluster.module_log("node1")
    cluster.wait_state("node2", "ALONE")
    cluster.wait_served_by("node2")


@pytest.mark.parametrize("lab_settings", [dataclasses.replace(LabSettings(), witness=True)])
def test_partition_with_witness_on_one_side_leaves_exactly_one_server(cluster: Cluster) -> None:
    formed(cluster)
    # node1 (primary) loses the peer, the client and the witness; node2 still reaches the witness.
    cluster.lab.partition("node1")
    cluster.wait_state("node2", "ALONE")
    cluster.wait_state("node1", "WAIT")
    cluster.wait_served_by("node2")
    pids = cluster.lab.app_pids()
    assert pids["node2"] and not pids.get("node1")
    assert "isolated" in cluster.module_log("node1")
    holds_for(lambda: cluster.state_name("node1") == "WAIT"
              and not cluster.lab.app_pids().get("node1"), 3 * TIMEOUT_S,
              "isolated node1 staying in WAIT without the application")


def test_cutting_one_of_two_heartbeat_networks_causes_no_failover(cluster: Cluster) -> None:
    formed(cluster)
    cluster.lab.cut("node2", "second")
    wait_until(lambda: "heartbeat network second silent" in cluster.module_log("node1"),
               5 * TIMEOUT_S, "node1 to log the loss of network second")
    holds_for(lambda: cluster.state_name("node1") == "PRIM"
              and cluster.state_name("node2") == "SECOND", 4 * TIMEOUT_S,
              "PRIM/SECOND with one heartbeat network left")
    cluster.lab.restore("node2", "second")
    wait_until(lambda: "heartbeat network second carries heartbeats again"
               in cluster.module_log("node1"), 5 * TIMEOUT_S, "node1 to log the network back")


def test_stale_node_waits_after_both_stop_and_restart_in_opposite_order(
        cluster: Cluster) -> None:
    formed(cluster)
    cluster.cmd("node1", "stop")            # node2 takes over and writes alone
    cluster.wait_state("node2", "ALONE")
    cluster.lab.kill_node("node2")          # power loss of node2 while ALONE
    cluster.lab.kill_node("node1")
    cluster.lab.start_node("node1")         # node1 first: its data is stale
    cluster.wait_state("node1", "WAIT")
    holds_for(lambda: cluster.state_name("node1") == "WAIT"
              and not cluster.lab.app_pids().get("node1"), 4 * TIMEOUT_S,
              "stale node1 waiting without serving")
    assert "may be stale" in cluster.module_log("node1")
    cluster.lab.start_node("node2")         # the node with the newest data returns
    cluster.wait_pair("node2", "node1")
    cluster.wait_served_by("node2")


def test_heartbeats_with_wrong_key_or_replayed_are_ignored_and_counted(
        cluster: Cluster) -> None:
    formed(cluster)
    key = cluster.cluster_key()
    forged = cluster.send_heartbeat_frames("node2", "node1", key=bytes(32), count=3)
    assert forged == 3
    wait_until(lambda: cluster.state("node1")["heartbeat"]["rejected_bad_mac"] >= 3, 5,
               "node1 to count 3 frames with a bad MAC")
    cluster.send_heartbeat_frames("node2", "node1", key=key, count=3, epoch=1, seq=1)
    wait_until(lambda: cluster.state("node1")["heartbeat"]["rejected_replay"] >= 1, 5,
               "node1 to count replayed frames")
    holds_for(lambda: cluster.state_name("node1") == "PRIM", 2 * TIMEOUT_S,
              "node1 staying PRIM despite forged heartbeats")


def test_broken_config_is_rejected_with_location_and_node_is_unchanged(
        cluster: Cluster) -> None:
    formed(cluster)
    home = cluster.lab.node_home("node1")
    conf = home / "mirror" / "conf" / "userconfig.xml"
    good = conf.read_text()
    broken = good.replace('pulse="100"', 'pulse="-5"')
    assert broken != good
    conf.write_text(broken)
    res = cluster.cmd("node1", "config", "check", check=False)
    assert res.returncode != 0
    assert f"{conf}:" in res.stderr and "heart@pulse" in res.stderr
    assert "Traceback" not in res.stderr
    assert cluster.state_name("node1") == "PRIM"
    # A start with the broken file is refused and changes nothing.
    cluster.cmd("node2", "stop")
    cluster.wait_state("node2", "STOP")
    res = cluster.cmd("node2", "start", check=False)
    assert res.returncode == 0  # node2's own config is intact
    conf.write_text(good.replace("<heart", "<heart bogus=\"1\"", 1))
    cluster.cmd("node1", "stop")
    cluster.wait_state("node1", "STOP")
    res = cluster.cmd("node1", "start", check=False)
    assert res.returncode != 0 and "bogus" in res.stderr
    assert cluster.state_name("node1") == "STOP"
    conf.write_text(good)
    cluster.cmd("node1", "start")
    cluster.wait_state("node1", "SECOND")


def test_lab_vip_is_on_exactly_one_node(cluster: Cluster) -> None:
    formed(cluster)
    held = {n: cluster.state(n)["vip"][0]["held"] for n in Lab.NODES}
    assert held == {"node1": True, "node2": False}


def test_daemon_shutdown_on_primary_is_a_planned_failover(cluster: Cluster) -> None:
    formed(cluster)
    # What `systemctl stop mirrorha` (or a reboot) does: SIGTERM to the daemon (the lab's init
    # forwards it). stop_prim runs, then the peer is told at once instead of timing out.
    cluster.lab.node_run("node1", ["kill", "-TERM", "1"])
    cluster.wait_state("node2", "ALONE")
    cluster.wait_served_by("node2")
    wait_until(lambda: not cluster.lab.node_alive("node1"), 10, "node1's daemon to exit")
    assert "stopped by daemon shutdown" in cluster.module_log("node1")
    assert "stop_prim exited 0" in cluster.module_log("node1")
    log2 = cluster.module_log("node2")
    assert "SECOND -> ALONE: node1 is STOP" in log2 and "no heartbeat" not in log2
