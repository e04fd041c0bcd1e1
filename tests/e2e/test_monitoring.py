"""Monitoring against the real stack: Debian's Prometheus scrapes both lab nodes' /metrics,
evaluates the shipped alert rules and sends to Debian's Alertmanager, which routes with the
shipped alertmanager.yml to a webhook standing in for the pager. All three run inside the lab's
client namespace (the host cannot reach the nodes) with their own config and data directory,
and are stopped and removed whatever happens.

Timings: 1 s scrape and evaluation instead of the example's 15 s, group_wait 0 s (the page
route's own) and 1 s group_interval; the rules are the shipped file itself.

Run with MIRRORHA_E2E_PREFIX=mhm to keep this lab apart from other e2e runs. With
MIRRORHA_MONITORING_SCREENSHOT=docs/monitoring.png the test also saves a screenshot of
Prometheus' graph of the node states over the failover (Chromium, in the client namespace).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from appliance.lab import NETNS_DIR, SOURCE_ROOT, Lab, LabSettings
from appliance.waiting import wait_until
from tests.e2e.conftest import ARTIFACTS, Cluster

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "alerts" / "mirrorha.rules.yml"
PROMETHEUS_EXAMPLE = REPO / "alerts" / "prometheus.yml"
ALERTMANAGER_EXAMPLE = REPO / "alerts" / "alertmanager.yml"
DASHBOARD = REPO / "grafana" / "dashboards" / "mirrorha.json"
SINK = Path(__file__).with_name("webhook_sink.py")
DATA = "/srv/mhm-data"
PROM, AM, HOOK = "127.0.0.1:9090", "127.0.0.1:9093", "127.0.0.1:9095"
# Grafana's variables, as Grafana would expand them for this lab (1 s scrapes).
GRAFANA_VARS = {"$__rate_interval": "15s", "$__range": "5m", "$__interval": "1s",
                "$module": ".+"}


@pytest.fixture
def lab_settings() -> LabSettings:
    # A 1.5 s timeout rather than the lab's 0.6 s: the RTO metric counts from the old
    # primary's last heartbeat, up to a pulse (0.1 s) before the crash, and start_prim's exit
    # is seen up to 50 ms late; against a 0.8 s RTO those alone approach the 20 % allowed.
    return LabSettings(replicated_dirs=(DATA,), timeout_ms=1500)


class Stack:
    """Prometheus, Alertmanager and the webhook sink in the client namespace."""

    def __init__(self, lab: Lab, workdir: Path) -> None:
        self.lab = lab
        self.dir = workdir
        self.hooks = workdir / "webhook.jsonl"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.started = time.time()

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = (self.dir / f"{name}.log").open("wb")
        self.procs[name] = subprocess.Popen(
            ["nsenter", f"--net={NETNS_DIR / self.lab.netns('client')}", "--", *argv],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
        log.close()

    def start(self) -> None:
        self._spawn("webhook", [str(self.lab.python), str(SINK), *HOOK.split(":"),
                                str(self.hooks)])
        self._spawn("alertmanager", [
            "prometheus-alertmanager", f"--config.file={self._alertmanager_config()}",
            f"--storage.path={self.dir / 'am-data'}", f"--web.listen-address={AM}",
            "--cluster.listen-address="])  # no gossip: one instance
        self._spawn("prometheus", [
            "prometheus", f"--config.file={self._prometheus_config()}",
            f"--storage.tsdb.path={self.dir / 'prom-data'}", f"--web.listen-address={PROM}"])
        for what, url in (("the webhook sink", f"http://{HOOK}/"),
                          ("Alertmanager", f"http://{AM}/-/ready"),
                          ("Prometheus", f"http://{PROM}/-/ready")):
            wait_until(lambda url=url: self.get(url) is not None, 30, f"{what} to be ready")

    def _prometheus_config(self) -> Path:
        """The shipped example with this lab's targets, 1 s intervals, absolute paths."""
        config = yaml.safe_load(PROMETHEUS_EXAMPLE.read_text())
        config["global"] = {"scrape_interval": "1s", "scrape_timeout": "1s",
                            "evaluation_interval": "1s"}
        config["rule_files"] = [str(RULES)]
        config["alerting"]["alertmanagers"][0]["static_configs"] = [{"targets": [AM]}]
        nodes = [f"{self.lab.address(n)}:9011" for n in Lab.NODES]
        config["scrape_configs"][0]["static_configs"] = [{"targets": nodes}]
        path = self.dir / "prometheus.yml"
        path.write_text(yaml.safe_dump(config))
        return path

    def _alertmanager_config(self) -> Path:
        """The shipped example, its receivers pointing at the sink, groups sent within 1 s."""
        config = yaml.safe_load(ALERTMANAGER_EXAMPLE.read_text())
        for receiver in config["receivers"]:
            for hook in receiver["webhook_configs"]:
                hook["url"] = f"http://{HOOK}/{receiver['name']}"
        for route in [config["route"], *config["route"]["routes"]]:
            route["group_wait"], route["group_interval"] = "0s", "1s"
        path = self.dir / "alertmanager.yml"
        path.write_text(yaml.safe_dump(config))
        return path

    def get(self, url: str, params: dict[str, str] | None = None) -> str | None:
        """GET from inside the client namespace; None if it failed."""
        if params:
            url += "?" + urllib.parse.urlencode(params)
        res = self.lab.client_run(["curl", "--silent", "--fail", "--max-time", "5", url],
                                  check=False, timeout=15)
        return res.stdout if res.returncode == 0 else None

    def query(self, expr: str) -> list[dict[str, Any]]:
        text = self.get(f"http://{PROM}/api/v1/query", {"query": expr})
        assert text is not None, f"Prometheus refused the query {expr!r}"
        answer = json.loads(text)
        assert answer["status"] == "success", (expr, answer)
        return answer["data"]["result"]

    def notifications(self) -> list[dict[str, Any]]:
        if not self.hooks.exists():
            return []
        return [json.loads(line) for line in self.hooks.read_text().splitlines() if line]

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)


@pytest.fixture
def stack(cluster: Cluster, request: pytest.FixtureRequest) -> Iterator[Stack]:
    workdir = Path(tempfile.mkdtemp(prefix="mirrorha-monitoring-"))
    s = Stack(cluster.lab, workdir)
    try:
        s.start()
        yield s
    finally:
        s.stop()
        dest = ARTIFACTS / f"{request.node.name}-monitoring"  # (the lab's own dir is redone)
        dest.mkdir(parents=True, exist_ok=True)
        for name in ("prometheus.log", "alertmanager.log", "webhook.log", "webhook.jsonl",
                     "prometheus.yml", "alertmanager.yml"):
            if (workdir / name).exists():
                shutil.copy(workdir / name, dest / name)
        shutil.rmtree(workdir, ignore_errors=True)


def install_start_prim_that_waits(lab: Lab, node: str) -> None:
    """A start_prim that returns once the application answers, as one should: the RTO metric
    ends when start_prim returns (the lab's own logs its message after launching the app in
    the background, so it returns a CLI start later than the app serves)."""
    script = f"""#!/bin/sh
echo "Running start_prim $*"
PYTHONPATH={SOURCE_ROOT} nohup {lab.python} -m appliance.sampleapp --node "$MIRRORHA_NODE" \\
  --port 80 >> "$MIRRORHA_HOME/mirror/log/application.log" 2>&1 < /dev/null &
i=0
until curl --silent --output /dev/null --max-time 0.2 http://127.0.0.1/; do
  i=$((i + 1)); [ $i -ge 500 ] && exit 1
  sleep 0.01
done
"""
    path = lab.node_paths(node).bin_dir / "start_prim"
    path.write_text(script)
    path.chmod(0o755)


def write_synced(cluster: Cluster, node: str, name: str, count: int = 50) -> None:
    """4 KiB writes, each made durable (O_DSYNC: a write and an fsync replicated)."""
    cluster.lab.node_run(node, ["dd", "if=/dev/zero", f"of={DATA}/{name}", "bs=4k",
                                f"count={count}", "oflag=dsync", "status=none"])


def failover_pages(stack: Stack) -> list[dict[str, Any]]:
    return [alert for n in stack.notifications() if n["path"] == "/on-call-pager"
            for alert in n["body"]["alerts"]
            if alert["labels"]["alertname"] == "MirrorhaFailover" and alert["status"] == "firing"]


def dashboard_queries() -> list[tuple[str, str]]:
    board = json.loads(DASHBOARD.read_text())
    queries = [(p["title"], t["expr"]) for p in board["panels"] for t in p.get("targets", [])]
    queries += [(a["name"], a["expr"]) for a in board["annotations"]["list"]]
    out = []
    for title, expr in queries:
        for var, value in GRAFANA_VARS.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, f"{title}: unexpanded variable in {expr!r}"
        out.append((title, expr))
    return out


def test_crash_pages_with_old_and_new_primary_and_the_rto_matches_the_clients(
        cluster: Cluster, stack: Stack) -> None:
    lab = cluster.lab
    cluster.wait_pair("node1", "node2")
    wait_until(lambda: len(stack.query('up{job="mirrorha"} == 1')) == 2, 20,
               "Prometheus to scrape both nodes", interval=0.2)
    wait_until(lambda: stack.query('mirrorha_failovers_total{node="node2"}'), 10,
               "node2's failover counter at 0 in Prometheus")
    shot = os.environ.get("MIRRORHA_MONITORING_SCREENSHOT")
    if shot:  # a few seconds of the pair before the crash, for the picture
        wait_until(lambda: stack.query('count_over_time(mirrorha_node_state{node="node1",'
                                       'state="PRIM"}[1m]) >= 6'), 20,
                   "6 s of node1 as PRIM in Prometheus", interval=0.5)
    write_synced(cluster, "node1", "before")
    install_start_prim_that_waits(lab, "node2")

    with lab.client_poller(interval_s=0.02, timeout_s=0.05) as poller:
        poller.wait_for_ok(time.monotonic(), "node1", timeout=10)
        t0 = time.monotonic()
        lab.crash_node("node1")
        client_rto = poller.wait_for_ok(t0, "node2", timeout=15).t_end - t0

    pages = wait_until(lambda: failover_pages(stack), 20, "the failover page at the webhook",
                       interval=0.1)
    labels = pages[0]["labels"]
    assert (labels["severity"], labels["module"]) == ("page", "mirror")
    assert (labels["old_primary"], labels["new_primary"]) == ("node1", "node2")
    assert "node2 took over mirror from node1" in pages[0]["annotations"]["summary"]

    rto = stack.query('mirrorha_last_failover_rto_seconds{node="node2",since="last_heartbeat"}')
    assert len(rto) == 1 and rto[0]["metric"]["cause"] == "peer_lost"
    metric_rto = float(rto[0]["value"][1])
    print(f"RTO: client {client_rto:.3f} s, metric (since the last heartbeat) {metric_rto:.3f} s"
          f" ({(metric_rto - client_rto) / client_rto:+.0%})")
    assert abs(metric_rto - client_rto) <= 0.2 * client_rto, (
        f"RTO metric {metric_rto:.3f} s, client through the VIP {client_rto:.3f} s")
    detection = stack.query('mirrorha_last_failover_rto_seconds{node="node2",since="detection"}')
    assert 0 < float(detection[0]["value"][1]) < metric_rto

    # node1 comes back as SECOND (node2 copies what changed), node2 writes: every series of
    # the dashboard has a value from both nodes.
    lab.start_node("node1")
    cluster.wait_pair("node2", "node1", timeout=30)
    wait_until(lambda: len(stack.query('up{job="mirrorha"} == 1')) == 2, 20,
               "Prometheus to scrape node1 again")
    write_synced(cluster, "node2", "after")
    wait_until(lambda: stack.query('mirrorha_last_reintegration_duration_seconds'
                                   '{node="node2"}'), 10, "node2's reintegration in Prometheus")
    empty = [(title, expr) for title, expr in dashboard_queries() if not stack.query(expr)]
    assert not empty, f"dashboard queries without data: {empty}"
    modules = json.loads(stack.get(f"http://{PROM}/api/v1/label/module/values",
                                   {"match[]": "mirrorha_build_info"}) or "{}")
    assert modules.get("data") == ["mirror"]  # the dashboard's $module variable

    scrape = stack.get(f"http://{lab.address('node2')}:9011/metrics")
    assert scrape is not None
    check = subprocess.run(["promtool", "check", "metrics"], input=scrape, text=True,
                           capture_output=True, timeout=30)
    assert check.returncode == 0 and not check.stdout.strip(), check.stdout + check.stderr

    if shot:
        screenshot(lab, Path(shot).resolve(), since=stack.started)


def screenshot(lab: Lab, path: Path, since: float) -> None:
    """Prometheus' graphs of the node states (0 STOP, 1 WAIT, 2 SECOND, 3 ALONE, 4 PRIM) and
    of the heartbeats' age over the test, from Chromium in the client namespace (where
    Prometheus listens)."""
    expr = ('1 * sum by (node) (mirrorha_node_state{state="WAIT"}) + 2 * sum by (node) '
            '(mirrorha_node_state{state="SECOND"}) + 3 * sum by (node) (mirrorha_node_state'
            '{state="ALONE"}) + 4 * sum by (node) (mirrorha_node_state{state="PRIM"})')
    span = int(time.time() - since) + 1
    params: dict[str, str] = {}
    for i, e in enumerate((expr, "mirrorha_heartbeat_last_seen_age_seconds")):
        params |= {f"g{i}.expr": e, f"g{i}.tab": "0", f"g{i}.range_input": f"{span}s",
                   f"g{i}.stacked": "0", f"g{i}.show_exemplars": "0"}
    url = f"http://{PROM}/graph?" + urllib.parse.urlencode(params)
    profile = Path(tempfile.mkdtemp(prefix="mirrorha-chromium-"))
    try:
        lab.client_run(["chromium", "--headless", "--no-sandbox", "--disable-gpu",
                        f"--user-data-dir={profile}", "--hide-scrollbars",
                        "--window-size=1280,1480", "--virtual-time-budget=8000",
                        f"--screenshot={path}", url], timeout=90)
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    assert path.exists() and path.stat().st_size > 10_000
