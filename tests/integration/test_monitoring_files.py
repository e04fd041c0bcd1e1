"""The shipped monitoring files, checked with the real tools: the alert rules (promtool check
and unit tests, each alert both firing and staying quiet), the example Prometheus and
Alertmanager configurations, a real scrape (promtool check metrics), the Grafana dashboard (the
committed JSON is grafana/dashboard.py's output; every metric it or a rule names exists) and
the provisioning files a stock Grafana loads. The live check of every query is
tests/e2e/test_monitoring.py."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from appliance.daemon import Daemon, serve_metrics
from tests.support.nodehome import node_home

REPO = Path(__file__).resolve().parents[2]
ALERTS = REPO / "alerts"
RULES = ALERTS / "mirrorha.rules.yml"
GRAFANA = REPO / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "mirrorha.json"


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not installed (scripts/bootstrap.sh installs Debian's prometheus "
                    "and prometheus-alertmanager)")
    return path


def run(*argv: str, cwd: Path = REPO, input: str | None = None) -> str:
    res = subprocess.run(argv, cwd=cwd, input=input, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, f"{' '.join(argv)}:\n{res.stdout}{res.stderr}"
    return res.stdout + res.stderr


def test_rules_pass_promtool_check_and_their_unit_tests() -> None:
    assert "SUCCESS: 11 rules found" in run(tool("promtool"), "check", "rules", str(RULES))
    tests = sorted((ALERTS / "tests").glob("*.yml"))
    assert tests
    assert "SUCCESS" in run(tool("promtool"), "test", "rules", *map(str, tests),
                            cwd=ALERTS / "tests")


def test_every_alert_has_a_test_where_it_fires_and_one_where_it_stays_quiet() -> None:
    names = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    fires: set[str] = set()
    quiet: set[str] = set()
    for path in (ALERTS / "tests").glob("*.yml"):
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert names - fires == set() and names - quiet == set()
    failover = next(r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]
                    if r["alert"] == "MirrorhaFailover")
    assert failover["labels"]["severity"] == "page"


def test_example_prometheus_and_alertmanager_configs_are_valid() -> None:
    run(tool("promtool"), "check", "config", str(ALERTS / "prometheus.yml"))
    run(tool("amtool"), "check-config", str(ALERTS / "alertmanager.yml"))
    am = yaml.safe_load((ALERTS / "alertmanager.yml").read_text())
    pages = [r for r in am["route"]["routes"] if 'severity="page"' in r["matchers"]]
    assert len(pages) == 1 and {"old_primary", "new_primary"} <= set(pages[0]["group_by"])
    prom = yaml.safe_load((ALERTS / "prometheus.yml").read_text())
    assert prom["scrape_configs"][0]["job_name"] == "mirrorha"  # what the rules expect


@pytest.fixture
def scrape(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    daemon = Daemon(node_home(tmp_path, monkeypatch))
    server = serve_metrics(daemon, port=0)
    assert server is not None
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=10) as r:
            return r.read().decode()
    finally:
        server.stop()


def test_a_real_scrape_passes_promtool_check_metrics(scrape: str) -> None:
    out = run(tool("promtool"), "check", "metrics", input=scrape)
    assert out.strip() == ""  # no lint complaint at all


def dashboard_module() -> Any:
    spec = importlib.util.spec_from_file_location("mirrorha_dashboard", GRAFANA / "dashboard.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_committed_dashboard_is_the_generators_output() -> None:
    assert DASHBOARD.read_text() == dashboard_module().render(), (
        "grafana/dashboards/mirrorha.json is stale: run python grafana/dashboard.py")


def test_dashboard_panels_are_well_formed() -> None:
    board = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    names = [v["name"] for v in board["templating"]["list"]]
    assert names == ["datasource", "module"]
    for p in board["panels"]:
        assert {"x", "y", "w", "h"} <= set(p["gridPos"])
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${datasource}" and p["targets"], p["title"]
        for t in p["targets"]:
            assert 'module=~"$module"' in t["expr"], (p["title"], t["expr"])
    titles = " ".join(p["title"] for p in board["panels"]).lower()
    for needed in ("node states", "heartbeat", "lag", "failover", "rto", "reintegration",
                   "write latency", "throughput"):
        assert needed in titles


def test_every_metric_the_dashboard_and_the_rules_name_is_exported(scrape: str) -> None:
    exported = set()
    for fam in text_string_to_metric_families(scrape):
        exported |= {s.name for s in fam.samples}
    texts = [DASHBOARD.read_text(), RULES.read_text()]
    used = {m for text in texts for m in re.findall(r"\bmirrorha_[a-z_]+", text)}
    # Absent until they mean something: the last failover after the first takeover, the
    # heartbeats' age and RTT once the peer was heard (this daemon never started).
    later = {"mirrorha_last_failover_rto_seconds", "mirrorha_last_failover_timestamp_seconds",
             "mirrorha_last_reintegration_duration_seconds",
             "mirrorha_heartbeat_last_seen_age_seconds", "mirrorha_heartbeat_rtt_seconds"}
    assert used - exported - later == set()


def test_grafana_provisioning_files_have_the_documented_fields() -> None:
    ds = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "mirrorha.yml").read_text())
    assert ds["apiVersion"] == 1
    [source] = ds["datasources"]
    assert source["type"] == "prometheus" and source["access"] == "proxy"
    assert source["url"].startswith("http")
    dash = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "mirrorha.yml").read_text())
    assert dash["apiVersion"] == 1
    [provider] = dash["providers"]
    assert provider["type"] == "file" and provider["options"]["path"].startswith("/")
    assert {"name", "folder", "updateIntervalSeconds"} <= set(provider)
