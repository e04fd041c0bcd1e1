"""The mirrorha Grafana dashboard as code (stdlib only): `python grafana/dashboard.py` rewrites
grafana/dashboards/mirrorha.json; tests/integration/test_monitoring_files.py checks that the
committed JSON is this file's output and runs every query against a live Prometheus in the
monitoring end-to-end test.

Template variables: `datasource` (a Prometheus data source) and `module` (the modules the
scraped nodes report, from mirrorha_build_info).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

OUTPUT = Path(__file__).with_name("dashboards") / "mirrorha.json"
UID = "mirrorha-overview"
DS = {"type": "prometheus", "uid": "${datasource}"}
M = 'module=~"$module"'

# mirrorha_node_state as one number per node, for a state timeline: STOP 0 ... PRIM 4.
STATE_CODES = {"STOP": 0, "WAIT": 1, "SECOND": 2, "ALONE": 3, "PRIM": 4}
STATE_COLORS = {"STOP": "text", "WAIT": "yellow", "SECOND": "blue", "ALONE": "orange",
                "PRIM": "green"}
STATE_EXPR = " + ".join(
    f'{code} * sum by (module, node) (mirrorha_node_state{{{M}, state="{state}"}})'
    for state, code in STATE_CODES.items() if code)


def target(expr: str, legend: str = "", ref: str = "A", instant: bool = False) -> dict[str, Any]:
    t: dict[str, Any] = {"datasource": DS, "expr": expr, "legendFormat": legend, "refId": ref}
    if instant:
        t["instant"] = True
        t["range"] = False
    return t


def panel(kind: str, title: str, targets: list[dict[str, Any]], grid: tuple[int, int, int, int],
          unit: str = "short", description: str = "", **extra: Any) -> dict[str, Any]:
    x, y, w, h = grid
    for i, t in enumerate(targets):
        t["refId"] = chr(ord("A") + i)
    p: dict[str, Any] = {
        "type": kind, "title": title, "description": description, "datasource": DS,
        "gridPos": {"x": x, "y": y, "w": w, "h": h}, "targets": targets,
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {},
    }
    p.update(extra)
    return p


def row(title: str, y: int) -> dict[str, Any]:
    return {"type": "row", "title": title, "collapsed": False, "panels": [],
            "gridPos": {"x": 0, "y": y, "w": 24, "h": 1}}


def state_mappings() -> list[dict[str, Any]]:
    return [{"type": "value", "options": {
        str(code): {"text": state, "color": STATE_COLORS[state], "index": code}
        for state, code in STATE_CODES.items()}}]


def panels() -> list[dict[str, Any]]:
    rate = "$__rate_interval"
    out: list[dict[str, Any]] = [
        row("Cluster", 0),
        panel("state-timeline", "Node states", [target(STATE_EXPR, "{{node}}")], (0, 1, 16, 6),
              description="mirrorha_node_state of each node over time.",
              fieldConfig={"defaults": {"mappings": state_mappings(), "min": 0, "max": 4,
                                        "color": {"mode": "thresholds"}}, "overrides": []},
              options={"showValue": "auto", "mergeValues": True}),
        panel("stat", "VIP held by", [target(f"mirrorha_vip_held{{{M}}} == 1", "{{node}}",
                                             instant=True)], (16, 1, 4, 3),
              options={"textMode": "name", "reduceOptions": {"calcs": ["lastNotNull"]}}),
        panel("stat", "Split brain", [target(f"max(mirrorha_split_brain{{{M}}})", instant=True)],
              (20, 1, 4, 3),
              fieldConfig={"defaults": {"mappings": [{"type": "value", "options": {
                  "0": {"text": "no", "color": "green"}, "1": {"text": "SPLIT BRAIN",
                                                              "color": "red"}}}]},
                  "overrides": []}),
        panel("stat", "Replication in sync", [target(f"mirrorha_replication_in_sync{{{M}}}",
                                                     "{{node}}", instant=True)], (16, 4, 4, 3),
              fieldConfig={"defaults": {"mappings": [{"type": "value", "options": {
                  "0": {"text": "no", "color": "orange"}, "1": {"text": "in sync",
                                                               "color": "green"}}}]},
                  "overrides": []}),
        panel("stat", "Peer heard", [target(f"mirrorha_peer_up{{{M}}}", "{{node}}",
                                            instant=True)], (20, 4, 4, 3)),
        row("Heartbeats", 7),
        panel("timeseries", "Last heartbeat age per network",
              [target(f"mirrorha_heartbeat_last_seen_age_seconds{{{M}}}",
                      "{{node}} {{network}}")], (0, 8, 8, 7), unit="s",
              description="Time since the peer's last heartbeat on each network; the peer is "
                          "lost when every network exceeds the heartbeat timeout."),
        panel("timeseries", "Heartbeat RTT per network",
              [target(f"mirrorha_heartbeat_rtt_seconds{{{M}}}", "{{node}} {{network}}")],
              (8, 8, 8, 7), unit="s"),
        panel("state-timeline", "Heartbeat networks up",
              [target(f"mirrorha_heartbeat_network_up{{{M}}}", "{{node}} {{network}}")],
              (16, 8, 8, 7),
              fieldConfig={"defaults": {"mappings": [{"type": "value", "options": {
                  "0": {"text": "down", "color": "red"}, "1": {"text": "up",
                                                              "color": "green"}}}]},
                  "overrides": []}),
        row("Replication", 15),
        panel("timeseries", "Replication lag",
              [target(f"mirrorha_replication_lag_bytes{{{M}}}", "{{node}} lag"),
               target(f"mirrorha_replication_rpo_bytes{{{M}}}", "{{node}} RPO at risk")],
              (0, 16, 8, 7), unit="bytes",
              description="Bytes sent and not yet acknowledged by the secondary, and what "
                          "would be lost with the node now (the dirty volume while ALONE)."),
        panel("timeseries", "Replication lag (time, operations)",
              [target(f"mirrorha_replication_lag_seconds{{{M}}}", "{{node}} oldest op"),
               target(f"mirrorha_replication_lag_operations{{{M}}}", "{{node}} ops in flight")],
              (8, 16, 8, 7), unit="s",
              fieldConfig={"defaults": {"unit": "s"}, "overrides": [{
                  "matcher": {"id": "byRegexp", "options": ".*ops in flight"},
                  "properties": [{"id": "unit", "value": "short"},
                                 {"id": "custom.axisPlacement", "value": "right"}]}]}),
        panel("timeseries", "Replicated throughput",
              [target(f"sum by (node) (rate(mirrorha_replicated_bytes_total{{{M}}}[{rate}]))",
                      "{{node}} bytes/s"),
               target(f"sum by (node, kind) (rate(mirrorha_replicated_operations_total{{{M}}}"
                      f"[{rate}]))", "{{node}} {{kind}} ops/s")],
              (16, 16, 8, 7), unit="Bps",
              fieldConfig={"defaults": {"unit": "Bps"}, "overrides": [{
                  "matcher": {"id": "byRegexp", "options": ".*ops/s"},
                  "properties": [{"id": "unit", "value": "ops"},
                                 {"id": "custom.axisPlacement", "value": "right"}]}]}),
        panel("timeseries", "Write latency (replication wait)",
              [target(f"histogram_quantile({q}, sum by (le, op) (rate("
                      f"mirrorha_write_latency_seconds_bucket{{{M}}}[{rate}])))",
                      f"p{round(q * 100)} {{{{op}}}}") for q in (0.5, 0.99)],
              (0, 23, 12, 7), unit="s",
              description="How long a mutation of a replicated mount waited for replication: "
                          "admission to the stream (write, other), or the secondary's durable "
                          "acknowledgement (fsync)."),
        panel("timeseries", "Reintegration",
              [target(f"mirrorha_reintegration_in_progress{{{M}}}", "{{node}} in progress"),
               target(f"mirrorha_reintegration_pass{{{M}}}", "{{node}} pass"),
               target(f"mirrorha_reintegration_sent_bytes{{{M}}}", "{{node}} sent bytes")],
              (12, 23, 6, 7),
              description="A copy to the SECOND: in progress, its pass (1 live, 2 frozen) and "
                          "the data it sent so far (the last copy's once done).",
              fieldConfig={"defaults": {"unit": "short"}, "overrides": [{
                  "matcher": {"id": "byRegexp", "options": ".*sent bytes"},
                  "properties": [{"id": "unit", "value": "bytes"},
                                 {"id": "custom.axisPlacement", "value": "right"}]}]}),
        panel("stat", "Last reintegration",
              [target(f"mirrorha_last_reintegration_duration_seconds{{{M}}}", "{{node}}",
                      instant=True),
               target(f"mirrorha_reintegration_elapsed_seconds{{{M}}}",
                      "{{node}} current copy running for", instant=True)],
              (18, 23, 6, 7), unit="s"),
        row("Failovers", 30),
        panel("stat", "Failovers (range)",
              [target(f"sum by (cause) (increase(mirrorha_failovers_total{{{M}}}[$__range]))",
                      "{{cause}}", instant=True)], (0, 31, 6, 6),
              description="peer_lost: unplanned takeovers; handover: stop or swap of the "
                          "primary."),
        panel("stat", "RTO of the last failover",
              [target(f"mirrorha_last_failover_rto_seconds{{{M}}}",
                      "{{old_primary}} → {{new_primary}} since {{since}}", instant=True)],
              (6, 31, 8, 6), unit="s",
              description="last_heartbeat: the old primary's last heartbeat until the service "
                          "ran again on the new one (what clients saw); detection: the "
                          "engine's share, from declaring the peer lost."),
        panel("bargauge", "RTO distribution (range)",
              [target(f"sum by (le) (increase(mirrorha_failover_rto_seconds_bucket{{{M}, "
                      f'since="last_heartbeat"}}[$__range]))', "{{le}}", instant=True)],
              (14, 31, 10, 6), options={"displayMode": "basic", "orientation": "vertical"},
              description="Takeovers with an RTO up to each bound (cumulative buckets)."),
    ]
    for i, p in enumerate(out, 1):
        p["id"] = i
    return out


def dashboard() -> dict[str, Any]:
    return {
        "uid": UID,
        "title": "mirrorha",
        "description": "Two-node HA cluster: node states, heartbeats, replication, failovers.",
        "tags": ["mirrorha"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": [
            {"name": "datasource", "type": "datasource", "query": "prometheus",
             "label": "Data source", "current": {}, "hide": 0},
            {"name": "module", "type": "query", "label": "Module", "datasource": DS,
             "query": {"query": "label_values(mirrorha_build_info, module)",
                       "refId": "module"},
             "definition": "label_values(mirrorha_build_info, module)",
             "includeAll": True, "multi": True, "allValue": ".+", "refresh": 2,
             "current": {"text": "All", "value": "$__all"}, "hide": 0},
        ]},
        "annotations": {"list": [{
            "name": "Failovers", "enable": True, "iconColor": "red", "datasource": DS,
            "expr": f"increase(mirrorha_failovers_total{{{M}}}[1m]) > 0",  # not a reset
            "titleFormat": "failover", "textFormat": "{{old_primary}} → {{new_primary}} "
                                                    "({{cause}})",
        }]},
        "panels": panels(),
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(render())
    print(f"wrote {OUTPUT}", file=sys.stderr)
