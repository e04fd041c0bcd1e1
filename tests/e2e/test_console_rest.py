"""The REST API against a freshly installed, unconfigured pair in the lab, through node1's
console only: nodes, module, first start from the recommended node, state, a refused command,
logs, a snapshot and boot start of node2 fetched through node1."""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.lab import Lab, LabSettings
from appliance.waiting import wait_until
from tests.e2e.conftest import Cluster, make_lab
from tests.support.console import ApiClient

PREFIX = os.environ.get("MIRRORHA_CONSOLE_E2E_PREFIX", "mhc")
DATA = Path("/srv/mirrorha-console-e2e")
M = "/api/v1/modules/mirror"


@pytest.fixture
def fresh_pair(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    if os.geteuid() != 0:
        pytest.skip("the lab needs root (network namespaces, VIPs)")
    yield from make_lab(PREFIX, LabSettings(), request.node.name, console=True,
                        configured=False, private_dirs=[DATA])


def _console(lab: Lab, node: str) -> ApiClient:
    api = ApiClient(lab.console_url(node))

    def up() -> bool:
        try:
            return api.get("/api/v1/hello")[0] == 200
        except OSError:
            return False
    wait_until(up, 30, f"{node}'s console to answer", interval=0.2)
    api.login(lab.admin_password)
    return api


def _states(api: ApiClient) -> dict[str, Any]:
    status, body = api.get(f"{M}/state")
    assert status == 200, body
    return body["nodes"]


def _pair_ready(api: ApiClient) -> bool:
    nodes = _states(api)
    return (nodes["node2"]["state"], nodes["node1"]["state"]) == ("PRIM", "SECOND") and \
        nodes["node1"]["in_sync"] and not nodes["node1"]["busy"]


def test_configure_and_drive_a_fresh_pair_through_one_console(fresh_pair: Cluster) -> None:
    lab = fresh_pair.lab
    node2 = _console(lab, "node2")  # both consoles up (node1 will reach node2's)
    api = _console(lab, "node1")

    status, body = api.put("/api/v1/nodes", {"nodes": [
        {"addr": lab.address("node1")},
        {"addr": lab.address("node2"), "password": lab.admin_password}]})
    assert status == 200, body
    status, body = api.get("/api/v1/nodes")
    assert [(n["name"], n["reachable"]) for n in body["nodes"]] == [("node1", True),
                                                                      ("node2", True)]

    settings = {"vip": Lab.VIP, "replicated_dirs": [str(DATA)], "pulse_ms": 100, "timeout_ms": 1000}
    status, body = api.post(f"{M}/config/validate", {"settings": settings})
    assert status == 200 and all(n["ok"] for n in body["nodes"].values()), body
    status, body = api.put(f"{M}/config", {"settings": settings})
    assert status == 200, body
    assert set(body["nodes"]) == {"node1", "node2"}
    assert all(n["ok"] for n in body["nodes"].values()), body
    assert {n["daemon"] for n in _states(api).values()} == {"running"}

    # node2's copy holds data, node1's is empty: node2 is the one to start first.
    (lab.private_dir_source("node2", DATA) / "precious.txt").write_text("keep me\n")
    status, rec = api.get(f"{M}/recommendation")
    assert rec["node"] == "node2" and "only node2 has data" in rec["why"], rec
    assert api.post(f"{M}/nodes/node2/commands/prim")[0] == 200
    wait_until(lambda: _states(api)["node2"]["state"] == "ALONE", 20, "node2 ALONE")
    assert api.post(f"{M}/nodes/node1/commands/start")[0] == 200
    wait_until(lambda: _pair_ready(api), 40, "node2 PRIM and node1 SECOND in sync")
    nodes = _states(api)
    assert nodes["node1"]["readiness"] == "ready" and nodes["node1"]["resync_progress"] == 100
    assert nodes["node2"]["vip"] == [{"addr": Lab.VIP, "held": True}]
    assert (lab.private_dir_source("node1", DATA) / "precious.txt").read_text() == "keep me\n"

    status, body = api.post(f"{M}/nodes/node1/commands/swap")
    assert status == 409 and body["error"]["code"] == "refused", body
    assert "node1" in body["error"]["message"]

    for node in ("node1", "node2"):
        status, log = api.get(f"{M}/nodes/{node}/logs/module?lines=50")
        assert status == 200 and any("SECOND" in line or "PRIM" in line
                                     for line in log["lines"]), log
        status, _ = api.get(f"{M}/nodes/{node}/logs/application")
        assert status == 200

    status, data = api.get(f"{M}/nodes/node2/snapshot", raw=True)
    assert status == 200
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        names = set(z.namelist())
        assert b'"node": "node2"' in z.read("state.json")
    assert {"cluster.xml", "mirror/conf/userconfig.xml", "mirror/bin/start_prim",
            "mirror/bin/stop_prim", "mirror/log/module.log", "state.json",
            "versions.txt"} <= names
    assert not [n for n in names if n.endswith(".key")]

    unit = lab.node_dir("node2") / "systemd" / "mirrorha.service"
    status, body = api.put(f"{M}/nodes/node2/boot", {"on": True})
    assert status == 200 and body["on"] is True and unit.exists()
    assert api.get(f"{M}/nodes/node2/boot")[1] == {"on": True}
    status, body = api.put(f"{M}/nodes/node2/boot", {"on": False})
    assert status == 200 and body["on"] is False and not unit.exists()

    assert node2.get("/primary")[0] == 200
    assert node2.get("/secondary")[0] == 503


@pytest.fixture
def demo_pair(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    if os.geteuid() != 0:
        pytest.skip("the lab needs root (network namespaces, VIPs)")
    yield from make_lab(f"{PREFIX}d", LabSettings(), request.node.name, console=True)


def test_the_demo_pair_shows_its_cluster_in_either_console(demo_pair: Cluster) -> None:
    """`make demo`: a configured lab with both consoles; each shows both nodes' states, and a
    configuration change restarts a daemon without taking its node down."""
    lab = demo_pair.lab
    demo_pair.wait_state("node1", "PRIM", timeout=30)
    demo_pair.wait_state("node2", "SECOND", timeout=30)
    for node in lab.NODES:
        api = _console(lab, node)
        wait_until(lambda api=api: {n: s["state"] for n, s in _states(api).items()} ==
                   {"node1": "PRIM", "node2": "SECOND"}, 20, f"both states in {node}'s console")
    pid1 = lab.node_pid1("node2")
    _console(lab, "node1").post(f"{M}/nodes/node2/commands/stop")
    demo_pair.wait_state("node2", "STOP", timeout=30)
    status, body = api.get(f"{M}/config")
    assert status == 200, body
    edited = body["files"]["conf/userconfig.xml"].replace('timeout="600"', 'timeout="700"')
    assert edited != body["files"]["conf/userconfig.xml"]
    # node1 is running: a userconfig change needs the module stopped on both nodes
    status, body = api.put(f"{M}/config", {"files": {"conf/userconfig.xml": edited}})
    assert status == 409 and body["error"]["code"] == "module_running", body
    api.post(f"{M}/nodes/node1/commands/stop")
    demo_pair.wait_state("node1", "STOP", timeout=30)
    pids = {n: lab.node_pid1(n) for n in lab.NODES}
    daemons = {n: demo_pair.state(n)["pid"] for n in lab.NODES}  # type: ignore[index]
    status, body = api.put(f"{M}/config", {"files": {"conf/userconfig.xml": edited}})
    assert status == 200 and all(n["ok"] for n in body["nodes"].values()), body
    for node in lab.NODES:  # the daemons were restarted with the new file, the nodes stayed up
        demo_pair.wait_state(node, "STOP", timeout=30)
        assert 'timeout="700"' in lab.node_paths(node).userconfig.read_text()
        assert demo_pair.state(node)["pid"] != daemons[node]  # type: ignore[index]
    assert {n: lab.node_pid1(n) for n in lab.NODES} == pids
    assert lab.node_pid1("node2") == pid1
