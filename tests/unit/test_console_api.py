"""The console's REST API through Flask's test client, against a real daemon where the answer
depends on one (a `mirrorha daemon` of a loopback cluster whose peer is never started)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from appliance import control
from appliance.console.app import create_app
from appliance.console.auth import LoginLimiter
from appliance.paths import Paths
from appliance.waiting import wait_until
from tests.support.console import (
    PASSWORD,
    Api,
    cluster_home,
    console_home,
    free_port,
    node_env,
    stop_daemon,
    userconfig,
)


@pytest.fixture
def fresh(tmp_path: Path) -> Api:
    """An unconfigured node with its admin password set."""
    return Api(create_app(console_home(tmp_path / "home"), node="node1",
                          peer_port=free_port()))


@pytest.fixture
def node1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Api, Paths]]:
    """node1 of a configured loopback cluster, its daemon running (STOP); node2 is down."""
    paths = cluster_home(tmp_path / "home", "node1", free_port())
    monkeypatch.setenv("MIRRORHA_UNIT_DIR", str(tmp_path / "systemd"))
    env = node_env(paths.home, "node1", tmp_path / "systemd")
    proc = subprocess.Popen([sys.executable, "-m", "appliance.cli", "daemon"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        wait_until(lambda: _answers(paths), 20, "node1's daemon", interval=0.1)
        yield Api(create_app(paths.home, node="node1", peer_port=free_port())), paths
    finally:
        stop_daemon(paths)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _answers(paths: Paths) -> bool:
    try:
        control.get_state(paths.control_socket)
        return True
    except control.DaemonUnreachable:
        return False


# -- login, sessions, CSRF ---------------------------------------------------------------------


def test_hello_and_health_answer_without_login(fresh: Api) -> None:
    hello = fresh.call("GET", "/api/v1/hello")
    assert hello.status_code == 200
    assert hello.json == {"node": "node1", "configured": False, "version": "0.1.0"}
    health = fresh.call("GET", "/health")
    assert health.status_code == 503  # no daemon
    assert health.json == {"state": None, "node": "node1"}


def test_login_gives_a_session_and_a_csrf_token_logout_ends_it(fresh: Api) -> None:
    assert fresh.call("GET", "/api/v1/session").status_code == 401
    resp = fresh.login()
    assert resp.status_code == 200
    cookie = resp.headers["Set-Cookie"]
    assert "mirrorha-node1=" in cookie and "Secure" in cookie and "HttpOnly" in cookie
    assert "SameSite=Strict" in cookie
    session = fresh.call("GET", "/api/v1/session")
    assert session.json == {"user": "admin", "csrf_token": fresh.csrf}
    assert fresh.call("POST", "/api/v1/logout", {}).status_code == 200
    assert fresh.call("GET", "/api/v1/session").status_code == 401


def test_wrong_password_is_401_and_the_sixth_try_within_a_minute_is_429(tmp_path: Path) -> None:
    now = [1000.0]
    app = create_app(console_home(tmp_path / "home"), node="node1",
                     limiter=LoginLimiter(clock=lambda: now[0]))
    api = Api(app)
    for _ in range(5):
        resp = api.login("wrong password")
        assert resp.status_code == 401
        assert resp.json["error"]["code"] == "bad_credentials"
    limited = api.login()  # even the right password: the address is blocked for now
    assert limited.status_code == 429
    assert limited.json["error"]["code"] == "rate_limited"
    now[0] += 61
    assert api.login().status_code == 200


def test_without_a_password_only_health_and_hello_answer(tmp_path: Path) -> None:
    api = Api(create_app(tmp_path / "home", node="node1"))
    assert api.call("GET", "/api/v1/hello").status_code == 200
    refused = api.login("anything at all")
    assert refused.status_code == 503
    assert "mirrorha console passwd" in refused.json["error"]["message"]
    page = api.call("GET", "/")
    assert page.status_code == 503 and b"mirrorha console passwd" in page.data


def _api_routes(app: Flask) -> list[tuple[str, str]]:
    out = []
    for rule in app.url_map.iter_rules():
        if not rule.rule.startswith("/api/v1/") or rule.endpoint in ("api.login", "api.hello"):
            continue
        path = (rule.rule.replace("<module>", "mirror").replace("<node>", "node1")
                .replace("<cmd>", "start").replace("<kind>", "module"))
        out += [(m, path) for m in sorted(rule.methods - {"HEAD", "OPTIONS"})]
    return out


def test_every_api_endpoint_but_login_and_hello_needs_a_session(fresh: Api) -> None:
    routes = _api_routes(fresh.app)
    assert len(routes) >= 15
    for method, path in routes:
        resp = fresh.call(method, path, {} if method != "GET" else None)
        assert resp.status_code == 401, (method, path, resp.status_code)
        assert resp.json["error"]["code"] == "unauthorized"


def test_state_changing_requests_need_the_csrf_token(fresh: Api) -> None:
    fresh.login()
    for method, path in _api_routes(fresh.app):
        if method == "GET":
            continue
        for token in ("", "not-the-token"):
            resp = fresh.call(method, path, {}, csrf=token)
            assert resp.status_code == 403, (method, path, token)
            assert resp.json["error"]["code"] == "csrf"


# -- nodes -----------------------------------------------------------------------------------------


def test_nodes_of_an_unconfigured_node_and_field_errors(fresh: Api) -> None:
    fresh.login()
    nodes = fresh.call("GET", "/api/v1/nodes").json
    assert nodes["configured"] is False
    assert [(n["name"], n["local"]) for n in nodes["nodes"]] == [("node1", True)]
    bad = fresh.call("PUT", "/api/v1/nodes", {"nodes": [{"addr": "127.0.0.1"},
                                                         {"addr": "not-an-ip"}]})
    assert bad.status_code == 400
    assert [f["field"] for f in bad.json["error"]["fields"]] == ["nodes[1].addr"]
    one = fresh.call("PUT", "/api/v1/nodes", {"nodes": [{"addr": "127.0.0.1"}]})
    assert one.status_code == 400 and one.json["error"]["fields"][0]["field"] == "nodes"
    foreign = fresh.call("PUT", "/api/v1/nodes", {"nodes": [
        {"addr": "198.18.0.1"}, {"addr": "198.18.0.2", "password": "x"}]})
    assert foreign.status_code == 400 and "none of the addresses" in \
        foreign.json["error"]["message"]
    no_password = fresh.call("PUT", "/api/v1/nodes", {"nodes": [
        {"addr": "127.0.0.1"}, {"addr": "127.0.0.2"}]})
    assert no_password.status_code == 400
    assert no_password.json["error"]["fields"][0]["field"] == "nodes[1].password"


def test_put_nodes_with_a_silent_peer_is_502_and_writes_nothing(fresh: Api) -> None:
    fresh.login()
    resp = fresh.call("PUT", "/api/v1/nodes", {"nodes": [
        {"addr": "127.0.0.1"}, {"addr": "127.0.0.2", "password": PASSWORD}]})
    assert resp.status_code == 502
    assert resp.json["error"]["code"] == "peer_unreachable"
    home = fresh.app.extensions["mirrorha"].home
    assert not (home / "cluster.xml").exists() and not (home / "cluster.key").exists()


# -- module configuration ------------------------------------------------------------------------


def test_config_of_a_new_module_is_the_mirror_template(fresh: Api) -> None:
    fresh.login()
    assert fresh.call("GET", "/api/v1/modules").json == {
        "modules": [{"name": "mirror", "configured": False}]}
    config = fresh.call("GET", "/api/v1/modules/mirror/config").json
    assert set(config["files"]) == {"conf/userconfig.xml", "bin/start_prim", "bin/stop_prim"}
    assert config["files"]["bin/start_prim"].startswith("#!/bin/sh")
    assert config["settings"] == {"vip": None, "replicated_dirs": [], "pulse_ms": 700,
                                  "timeout_ms": 30000}


def test_validate_reports_a_missing_replicated_dir_and_a_bad_vip(fresh: Api,
                                                                 tmp_path: Path) -> None:
    fresh.login()
    there = tmp_path / "data"
    there.mkdir()
    ok = fresh.call("POST", "/api/v1/modules/mirror/config/validate",
                    {"settings": {"replicated_dirs": [str(there)]}})
    assert ok.status_code == 200, ok.json
    assert ok.json["nodes"]["node1"]["ok"] is True
    missing = fresh.call("POST", "/api/v1/modules/mirror/config/validate", {"settings": {
        "replicated_dirs": [str(tmp_path / "nowhere")], "vip": "198.18.5.5"}})
    assert missing.status_code == 400
    fields = missing.json["error"]["fields"]
    assert {f["field"] for f in fields} == {"rfs/replicated@dir", "vip/interface_list/interface"}
    assert all(f["node"] == "node1" for f in fields)
    assert any("does not exist on node1" in f["message"] for f in fields)
    assert missing.json["nodes"]["node1"]["ok"] is False
    not_ip = fresh.call("POST", "/api/v1/modules/mirror/config/validate",
                        {"settings": {"vip": "10.0.0"}})
    assert not_ip.status_code == 400 and not_ip.json["error"]["fields"][0]["field"] == "vip"


def test_invalid_userconfig_is_400_with_file_line_field_and_nothing_written(
        node1: tuple[Api, Paths]) -> None:
    api, paths = node1
    api.login()
    before = {p: p.read_bytes() for p in (paths.userconfig, paths.bin_dir / "start_prim")}
    broken = userconfig(4800).replace('timeout="1000"', 'timeout="soon"').replace("><", ">\n<")
    resp = api.call("PUT", "/api/v1/modules/mirror/config", {"files": {
        "conf/userconfig.xml": broken, "bin/start_prim": "#!/bin/sh\necho new\n"}})
    assert resp.status_code == 400
    (field,) = resp.json["error"]["fields"]
    assert field["file"] == "conf/userconfig.xml" and field["field"] == "heart@timeout"
    assert field["line"] == 3 and field["node"] == "node1"
    assert {p: p.read_bytes() for p in before} == before
    script = api.call("POST", "/api/v1/modules/mirror/config/validate",
                      {"files": {"bin/stop_prim": "echo no interpreter line"}})
    assert script.status_code == 400
    assert script.json["error"]["fields"][0]["file"] == "bin/stop_prim"
    unknown = api.call("POST", "/api/v1/modules/mirror/config/validate",
                       {"files": {"../../etc/passwd": "x"}})
    assert unknown.status_code == 400 and unknown.json["error"]["code"] == "bad_request"


def test_put_config_with_the_peer_down_is_502_and_deploys_nothing(
        node1: tuple[Api, Paths]) -> None:
    api, paths = node1
    api.login()
    before = paths.bin_dir.joinpath("start_prim").read_text()
    resp = api.call("PUT", "/api/v1/modules/mirror/config",
                    {"files": {"bin/start_prim": "#!/bin/sh\necho new\n"}})
    assert resp.status_code == 502, resp.json
    assert resp.json["nodes"]["node2"]["reachable"] is False
    assert resp.json["nodes"]["node1"]["ok"] is True
    assert paths.bin_dir.joinpath("start_prim").read_text() == before


# -- state, commands, health ---------------------------------------------------------------------


def test_state_of_both_nodes_commands_and_a_refused_command(node1: tuple[Api, Paths]) -> None:
    api, paths = node1
    api.login()
    nodes = api.call("GET", "/api/v1/modules/mirror/state").json["nodes"]
    assert nodes["node1"]["state"] == "STOP" and nodes["node1"]["daemon"] == "running"
    assert nodes["node1"]["readiness"] == "not_ready"
    assert nodes["node2"]["reachable"] is False and "node2" in nodes["node2"]["error"]
    swap = api.call("POST", "/api/v1/modules/mirror/nodes/node1/commands/swap", {})
    assert swap.status_code == 409, swap.json
    assert swap.json["error"]["code"] == "refused"
    assert "swap" in swap.json["error"]["message"]
    assert api.call("GET", "/primary").status_code == 503
    assert api.call("GET", "/health").json == {"state": "STOP", "node": "node1"}
    start = api.call("POST", "/api/v1/modules/mirror/nodes/node1/commands/start", {})
    assert start.status_code == 200 and start.json == {"ok": True}
    st = wait_until(lambda: _state_not_stop(api), 10, "node1 to leave STOP")
    assert st["state"] in ("WAIT", "ALONE")
    stop = api.call("POST", "/api/v1/modules/mirror/nodes/node1/commands/stop", {})
    assert stop.status_code == 200
    wait_until(lambda: control.get_state(paths.control_socket)["state"] == "STOP", 15,
               "node1 to stop")


def _state_not_stop(api: Api) -> dict[str, Any] | None:
    st = api.call("GET", "/api/v1/modules/mirror/state").json["nodes"]["node1"]
    return st if st["state"] != "STOP" else None


def test_unknown_node_module_or_command_is_404(node1: tuple[Api, Paths]) -> None:
    api, _ = node1
    api.login()
    for path in ("/api/v1/modules/mirror/nodes/node3/commands/start",
                 "/api/v1/modules/mirror/nodes/node1/commands/explode",
                 "/api/v1/modules/Bad..Name/nodes/node1/commands/start"):
        resp = api.call("POST", path, {})
        assert resp.status_code == 404, path
        assert resp.json["error"]["code"] == "not_found"


def test_a_command_starts_the_daemon_when_it_is_not_running(node1: tuple[Api, Paths]) -> None:
    api, paths = node1
    api.login()
    stop_daemon(paths)
    assert api.call("GET", "/api/v1/modules/mirror/state").json["nodes"]["node1"][
        "daemon"] == "not running"
    resp = api.call("POST", "/api/v1/modules/mirror/nodes/node1/commands/start", {})
    assert resp.status_code == 200, resp.json
    st = control.get_state(paths.control_socket)  # started detached by the console
    assert st["node"] == "node1"
    assert "started by the console" in (paths.log_dir / "daemon.out").read_text()


# -- logs, snapshot, boot, recommendation --------------------------------------------------------


def test_logs_tail_and_follow_by_offset(node1: tuple[Api, Paths]) -> None:
    api, paths = node1
    api.login()
    url = "/api/v1/modules/mirror/nodes/node1/logs/module"
    tail = api.call("GET", url + "?lines=5").json
    assert 1 <= len(tail["lines"]) <= 5 and "daemon started" in "\n".join(tail["lines"])
    assert tail["offset"] == paths.module_log.stat().st_size
    quiet = api.call("GET", f"{url}?offset={tail['offset']}&wait=0.3").json
    assert quiet == {"lines": [], "offset": tail["offset"]}
    subprocess.run([sys.executable, "-m", "appliance.cli", "printi", "hello from a test"],
                   env=node_env(paths.home, "node1"), check=True, timeout=30)
    new = api.call("GET", f"{url}?offset={tail['offset']}&wait=5").json
    assert any("hello from a test" in line for line in new["lines"])
    assert new["offset"] > tail["offset"]
    app_log = api.call("GET", "/api/v1/modules/mirror/nodes/node1/logs/application").json
    assert app_log == {"lines": [], "offset": 0}
    assert api.call("GET", "/api/v1/modules/mirror/nodes/node1/logs/shadow").status_code == 404


def test_snapshot_is_a_zip_of_config_scripts_logs_state_and_no_key(
        node1: tuple[Api, Paths]) -> None:
    api, _ = node1
    api.login()
    resp = api.call("GET", "/api/v1/modules/mirror/nodes/node1/snapshot")
    assert resp.status_code == 200 and resp.mimetype == "application/zip"
    assert "attachment" in resp.headers["Content-Disposition"]
    with zipfile.ZipFile(io.BytesIO(resp.data)) as z:
        names = set(z.namelist())
        state = json.loads(z.read("state.json"))
    assert {"cluster.xml", "mirror/conf/userconfig.xml", "mirror/bin/start_prim",
            "mirror/log/module.log", "state.json", "versions.txt"} <= names
    assert not [n for n in names if n.endswith((".key", "cluster.key"))]
    assert state["node"] == "node1" and state["state"] == "STOP"


def test_boot_on_and_off(node1: tuple[Api, Paths], tmp_path: Path) -> None:
    api, _ = node1
    api.login()
    url = "/api/v1/modules/mirror/nodes/node1/boot"
    assert api.call("GET", url).json == {"on": False}
    on = api.call("PUT", url, {"on": True})
    assert on.status_code == 200 and on.json["on"] is True
    assert "daemon --start" in (tmp_path / "systemd" / "mirrorha.service").read_text()
    assert api.call("GET", url).json == {"on": True}
    assert api.call("PUT", url, {"on": False}).json["on"] is False
    assert not (tmp_path / "systemd" / "mirrorha.service").exists()
    assert api.call("PUT", url, {"on": "yes"}).status_code == 400


def test_recommendation_with_the_peer_down_names_the_known_node(
        node1: tuple[Api, Paths]) -> None:
    api, _ = node1
    api.login()
    rec = api.call("GET", "/api/v1/modules/mirror/recommendation").json
    assert rec["node"] == "node1" and "node2 could not be asked" in rec["why"]
    assert rec["nodes"]["node1"]["generation"] == [0, ""] and rec["nodes"]["node2"] is None
