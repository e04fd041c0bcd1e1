"""PostgreSQL RPO bench (`make bench`): how many committed transactions a primary crash loses.

    python -m bench.pg_rpo [--quick | --runs N]

PostgreSQL 15 on a replicated directory in a lab of its own (prefix mhq, pulse 100 ms / timeout
600 ms); a recording client and pgbench write through the VIP; the primary is crashed mid-load
(links down, every process SIGKILLed) 20 times (--quick: 3), alternating nodes, the crashed
node resynchronised before the next crash. Each run is bench/pgcluster.py's crash round, the
same as tests/e2e/test_postgres.py's: after the failover every transaction a client saw
committed, in this run or any earlier one, must be on the new primary, which must have gone
through a clean crash recovery and pass amcheck.

Per run: commits the recording client saw (this run), lost transactions (client ids and pgbench
transactions missing on the new primary), the write RTO (crash -> the first COMMIT the client
saw acknowledged by the new primary; it includes the client's own 2 s TCP timeout on the dead
connection), the takeover (crash -> the survivor ALONE with PostgreSQL recovered), the resync
of the returning node, and whether the recovery was clean. Target (issue 4): 0 lost in every
run. Results: a table on stdout and bench/results/pg_rpo.json; the lab's logs and the clients'
files are kept under test-artifacts/bench/pg_rpo/.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from appliance.errors import MirrorhaError
from appliance.lab import Lab
from bench.common import BenchError, Stats, run_bench, write_json
from bench.failover import ARTIFACTS, keep_logs, mirrorha_state
from bench.pgcluster import (
    PGBIN,
    CrashRounds,
    RoundResult,
    data_dir,
    form_pair,
    keep_clients,
    lab_settings,
    postgres_lab,
    postgres_missing,
)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "pg_rpo.json"
PREFIX = "mhq"  # mhb is bench.failover's
SCENARIO = "pg_rpo"  # its logs: test-artifacts/bench/pg_rpo/
FULL_RUNS = 20
QUICK_RUNS = 3
CLIENT_SECONDS_PER_RUN = 120.0  # the recording client's budget (it stops by itself after)


@dataclass(frozen=True)
class Plan:
    runs: int


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.pg_rpo",
        description="Committed transactions lost when the PostgreSQL primary crashes mid-load "
        f"({FULL_RUNS} crashes, alternating nodes). Needs root (the lab).")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_RUNS} runs")
    parser.add_argument("--runs", type=int, help=f"crash runs (default {FULL_RUNS})")
    return parser


def plan_from(args: argparse.Namespace) -> Plan:
    runs = args.runs if args.runs is not None else (QUICK_RUNS if args.quick else FULL_RUNS)
    if runs < 1:
        raise BenchError("--runs must be at least 1")
    if (missing := postgres_missing()) is not None:
        raise BenchError(missing)
    return Plan(runs)


def victims(runs: int) -> list[str]:
    """node1 is the first primary; each victim's peer is the next one's."""
    return ["node1" if i % 2 == 0 else "node2" for i in range(runs)]


# ---------------------------------------------------------------------------------------------
# Report


COLUMNS = (("run", 3), ("victim", 6), ("committed", 9), ("checked", 7), ("lost", 4),
           ("pgbench", 7), ("pgb lost", 8), ("write RTO", 9), ("takeover", 8),
           ("start fail", 10), ("resync", 6), ("recovery", 8))


def header() -> list[str]:
    head = " ".join(f"{name:>{width}}" for name, width in COLUMNS)
    return [
        "committed: COMMITs the recording client saw in the run; checked: all it saw so far, "
        "looked up on the new primary; lost: client ids + pgbench transactions missing; "
        "start fail: start_prim failures on the new primary before PostgreSQL served (errd "
        "restarted it); times in seconds",
        head,
        "-" * len(head),
    ]


def row(run: int, r: RoundResult) -> str:
    cells = (run, r.victim, r.committed_in_round, r.committed, r.lost, r.pgbench_done,
             sum(r.pgbench_missing.values()), f"{r.write_rto_s:.2f}", f"{r.takeover_s:.2f}",
             r.start_failures,
             "-" if r.resync_s is None else f"{r.resync_s:.2f}",
             "ok" if r.recovery_ok else "FAILED")
    return " ".join(f"{cell:>{width}}" for cell, (_, width) in zip(cells, COLUMNS, strict=True))


def stats(values: Sequence[float | None]) -> dict[str, Any] | None:
    s = Stats.of(values)
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in asdict(s).items()} \
        if s else None


def summarize(rounds: Sequence[RoundResult], planned: int) -> dict[str, Any]:
    return {
        "runs_planned": planned,
        "runs_done": len(rounds),
        "lost_transactions": sum(r.lost for r in rounds),
        "runs_with_loss": sum(1 for r in rounds if r.lost),
        "recovery_failed_runs": sum(1 for r in rounds if not r.recovery_ok),
        "runs_with_start_failures": sum(1 for r in rounds if r.start_failures),
        "committed_checked": rounds[-1].committed if rounds else 0,
        "write_rto_s": stats([r.write_rto_s for r in rounds]),
        "takeover_s": stats([r.takeover_s for r in rounds]),
        "resync_s": stats([r.resync_s for r in rounds]),
    }


def _median(s: dict[str, Any] | None) -> str:
    return f"median {s['median']:.2f} (min {s['min']:.2f}, max {s['max']:.2f})" if s else "-"


def summary_lines(summary: dict[str, Any], error: str | None) -> list[str]:
    lines = [
        f"lost transactions: {summary['lost_transactions']} in {summary['runs_with_loss']} of "
        f"{summary['runs_done']} runs",
        f"recovery clean (crash recovery, no PANIC, amcheck): "
        f"{summary['runs_done'] - summary['recovery_failed_runs']} of {summary['runs_done']}",
        f"start_prim failed before PostgreSQL served (errd restarted it) in "
        f"{summary['runs_with_start_failures']} of {summary['runs_done']} runs",
        f"write RTO s: {_median(summary['write_rto_s'])}; takeover s: "
        f"{_median(summary['takeover_s'])}; resync s: {_median(summary['resync_s'])}",
    ]
    if error is not None or summary["runs_done"] < summary["runs_planned"]:
        lines.append(f"STOPPED after {summary['runs_done']} of {summary['runs_planned']} runs: "
                     f"{error}")
    met = (summary["runs_done"] == summary["runs_planned"] and not summary["lost_transactions"]
           and not summary["recovery_failed_runs"])
    lines.append(f"target 0 lost transactions in {summary['runs_planned']} runs: "
                 f"{'met' if met else 'NOT met'}")
    return lines


def host_info() -> dict[str, Any]:
    version = subprocess.run([str(PGBIN / "postgres"), "--version"], capture_output=True,
                             text=True, check=False).stdout.strip()
    return {
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "postgres": version,
        "other_labs_running_at_start": sorted(
            p.stem for p in Path("/run/mirrorha-lab").glob("*.json") if p.stem != PREFIX),
    }


# ---------------------------------------------------------------------------------------------
# Runs


def keep(lab: Lab) -> None:
    if not lab.labdir.is_dir():  # removed by someone else: say so rather than keep nothing
        print(f"bench.pg_rpo: the lab directory {lab.labdir} is gone: no logs kept",
              file=sys.stderr, flush=True)
        return
    keep_logs(lab, SCENARIO)
    keep_clients(lab, ARTIFACTS / SCENARIO)


def record(r: RoundResult, results: dict[str, Any], rounds_done: list[RoundResult]) -> None:
    rounds_done.append(r)
    results["runs"].append({"run": len(rounds_done), **asdict(r), "lost": r.lost,
                            "recovery_ok": r.recovery_ok})
    write_json(RESULTS, results)
    print(row(len(rounds_done), r), flush=True)
    for problem in r.problems:
        print(f"    {problem.splitlines()[0]}", flush=True)


def crash_runs(plan: Plan, results: dict[str, Any], rounds_done: list[RoundResult]) -> None:
    """Form the pair, then the crash rounds; each run's record is written as it ends (also a
    run checked whose victim then could not return)."""
    with postgres_lab(PREFIX, keep) as lab:
        form_pair(lab)
        budget = CLIENT_SECONDS_PER_RUN * plan.runs + 600
        with CrashRounds(lab, client_seconds=budget) as rounds:
            try:
                for victim in victims(plan.runs):
                    record(rounds.crash(victim), results, rounds_done)
            except MirrorhaError:
                results["states_at_failure"] = {n: mirrorha_state(lab, n) for n in lab.NODES}
                raise
            finally:
                for r in rounds.results[len(rounds_done):]:
                    record(r, results, rounds_done)


def run(plan: Plan) -> int:
    data = data_dir(PREFIX)
    settings = lab_settings(data)
    results: dict[str, Any] = {
        "started": datetime.now().isoformat(timespec="seconds"),
        "host": host_info(),
        "lab": {"prefix": PREFIX, "pulse_ms": settings.pulse_ms,
                "timeout_ms": settings.timeout_ms, "replicated_dir": data,
                "first_victim": "node1", "victims_alternate": True},
        "runs": [],
    }
    rounds_done: list[RoundResult] = []
    error: str | None = None
    t0 = time.monotonic()
    print(f"PostgreSQL RPO: {plan.runs} crashes of the primary mid-load (lab {PREFIX}, "
          f"{settings.pulse_ms}/{settings.timeout_ms} ms)", flush=True)
    print("\n".join(header()), flush=True)
    try:
        crash_runs(plan, results, rounds_done)
    except MirrorhaError as e:  # LabError, BenchError: the round could not go on
        error = str(e)
        print(f"FAILED: {e}", file=sys.stderr, flush=True)
    summary = summarize(rounds_done, plan.runs)
    results.update(summary=summary, error=error, elapsed_s=round(time.monotonic() - t0, 1),
                   finished=datetime.now().isoformat(timespec="seconds"))
    write_json(RESULTS, results)
    print()
    print("\n".join(summary_lines(summary, error)))
    print(f"elapsed {results['elapsed_s']:g} s; results: {RESULTS}; logs: "
          f"{ARTIFACTS / SCENARIO}/")
    failed = error is not None or summary["lost_transactions"] or summary["recovery_failed_runs"]
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return run_bench("bench.pg_rpo", "the lab creates network namespaces",
                     lambda: plan_from(args), run, "the lab was removed")


if __name__ == "__main__":
    sys.exit(main())
