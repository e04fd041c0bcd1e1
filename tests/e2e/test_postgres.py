"""PostgreSQL 15 on a replicated directory: a failover loses no committed transaction.

The crash round (load through the VIP by a recording client and pgbench, crash of the primary,
failover, check of every recorded commit on the new primary, crash recovery and amcheck, return
of the crashed node by a full resync) is bench/pgcluster.py's, which bench/pg_rpo.py repeats
twenty times. Here: three crashes, alternating nodes, then a planned switchover back; and
PostgreSQL must never run on both nodes at once.

Per crash: committed / present / missing, takeover and resync times, printed (pytest -s) and in
test-artifacts/<test>/clients/rounds.json with the clients' files and the PostgreSQL logs.
The lab's prefix is MIRRORHA_PG_PREFIX (default mhpg), so two runs can coexist.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Iterator

import pytest

from appliance.lab import Lab
from bench.pgcluster import (
    PGBIN,
    CrashRounds,
    RoundResult,
    commits_after,
    form_pair,
    keep_clients,
    longest_pause,
    other,
    pg_log,
    postgres_lab,
    postgres_missing,
    read_database,
    wait_pair,
)
from tests.e2e.conftest import ARTIFACTS, DualRunMonitor, keep_logs

pytestmark = [
    pytest.mark.slow,
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root (network namespaces)"),
    pytest.mark.skipif(not (PGBIN / "postgres").exists(),
                       reason="PostgreSQL 15 is not installed (apt-get install postgresql-15)"),
    pytest.mark.timeout(300),
]

PREFIX = os.environ.get("MIRRORHA_PG_PREFIX", "mhpg")
CRASHES = ("node1", "node2", "node1")  # each victim is the primary of its round


@pytest.fixture
def pg_lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    if (missing := postgres_missing()) is not None:  # not a skip: this is an acceptance test
        pytest.fail(missing)

    def keep(lab: Lab) -> None:
        keep_logs(lab, request.node.name)
        keep_clients(lab, ARTIFACTS / request.node.name)

    with postgres_lab(PREFIX, keep) as lab, \
            DualRunMonitor(lab, interval=0.05, comm="postgres") as monitor:
        form_pair(lab)
        yield lab
    assert monitor.samples > 0, "the dual-run monitor never sampled"
    assert not monitor.violations, (
        f"PostgreSQL ran on both nodes at once ({len(monitor.violations)} samples): "
        f"{monitor.violations[:3]}")


def run_switchover(rounds: CrashRounds, prim: str) -> tuple[int, float]:
    """`mirrorha swap`: stop_prim shuts PostgreSQL down cleanly, the peer starts it without a
    crash recovery, nothing committed is lost. Returns (ids checked, client outage)."""
    lab, second = rounds.lab, other(prim)
    log_mark = len(pg_log(lab, second))
    t_swap = time.monotonic()
    lab.mirrorha(prim, "swap")
    wait_pair(lab, second, prim, 60)
    last = commits_after(rounds.client, time.monotonic(), second)
    view = read_database(lab, rounds.client)
    missing = sorted(set(view.recorded) - view.present)
    assert not missing, f"swap to {second}: {len(missing)} committed ids lost: {missing[:50]}"
    assert "database system is shut down" in pg_log(lab, prim), "stop_prim: no clean shutdown"
    started = pg_log(lab, second)[log_mark:]
    assert "database system was shut down at" in started, started[-2000:]
    assert "automatic recovery" not in started, f"{second} needed a recovery:\n{started}"
    start, end = longest_pause(t for t in view.recorded.values() if t_swap - 1 <= t <= last)
    return len(view.recorded), end - start


def print_round(r: RoundResult) -> None:
    resync = "-" if r.resync_s is None else f"{r.resync_s:.2f}"
    print(f"crash {r.victim}: committed {r.committed}, present {r.present}, "
          f"missing {r.missing}, failed-but-committed {r.uncertain_present}; "
          f"pgbench {r.pgbench_done} done, lost {sum(r.pgbench_missing.values())}; "
          f"takeover {r.takeover_s:.2f} s, client outage {r.client_outage_s:.2f} s, "
          f"resync {resync} s")


def test_postgres_loses_no_committed_transaction_across_three_crashes(pg_lab: Lab) -> None:
    results: list[RoundResult] = []
    swap: dict[str, float] = {}
    with CrashRounds(pg_lab) as rounds:
        try:
            for victim in CRASHES:
                results.append(rounds.crash(victim))
                assert not results[-1].problems, "\n".join(results[-1].problems)
            # Planned switchover back to the first node: stop_prim's clean shutdown.
            checked, outage = run_switchover(rounds, other(CRASHES[-1]))
            swap = {"committed": checked, "client_outage_s": round(outage, 3)}
        finally:
            report = {"crashes": [dataclasses.asdict(r) for r in results], "swap": swap}
            # Copied to test-artifacts/ with the clients' files by the fixture.
            (rounds.outdir / "rounds.json").write_text(json.dumps(report, indent=2) + "\n")
            for r in results:
                print_round(r)
            if swap:
                print(f"swap back: {swap['committed']:.0f} committed ids all present; "
                      f"client outage {swap['client_outage_s']:.2f} s")
    for r in results:
        assert not r.missing, (
            f"crash of {r.victim}: {r.missing} committed ids lost: {r.missing_ids}…")
        assert not r.pgbench_missing, (
            f"crash of {r.victim}: pgbench transactions lost: {r.pgbench_missing}")
    assert len(results) == len(CRASHES)
