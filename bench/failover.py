"""Failover bench (`make bench`): recovery time after a primary crash, and no false failover
under CPU load.

Scenarios, each in a lab of its own, one after the other:

- mirrorha-fast       mirrorha, pulse 100 ms / timeout 600 ms
- mirrorha-reference  mirrorha, SafeKit's defaults pulse 700 ms / timeout 30000 ms
- keepalived          Debian's keepalived, VRRPv3, advert 0.1 s, same lab, same application
- soak                mirrorha 100/600, both nodes under full CPU load for BENCH_SOAK_S (600 s)

A crash run: a client polls the VIP over HTTP every 20 ms; the primary crashes (lab crash_node:
interfaces down, every process SIGKILLed, like a power loss); RTO is the time from the crash to
the first HTTP answer from the other node. The survivor's own records give when it decided to
take over and when it launched the application, so the RTO splits into "HA engine" (crash ->
application launched) and "application start" (launched -> first answer). The crashed node is
then booted again and must rejoin (SECOND in sync / BACKUP) before the next run, which crashes
the other node.

Results: a table on stdout and bench/results/failover.json; every scenario's node logs are kept
under test-artifacts/bench/.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import platform
import re
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from appliance import control
from appliance.errors import MirrorhaError
from appliance.lab import Lab, LabSettings, PollSample
from bench import keepalived
from bench.common import (
    BenchError,
    CrashRun,
    Stats,
    Takeover,
    crash_run,
    parse_log_time,
    run_bench,
    wait_for,
    write_json,
)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "failover.json"
ARTIFACTS = ROOT / "test-artifacts" / "bench"
MIRRORHA_PREFIX = "mhb"
KEEPALIVED_PREFIX = "mhk"

# The client: a fresh connection every 20 ms. A request to an address nobody answers yet hangs
# until its timeout, so the timeout bounds how late a recovery can be noticed; 50 ms is still
# twenty times what an answer takes in the lab.
POLL_INTERVAL_S = 0.02
POLL_TIMEOUT_S = 0.05
FORM_TIMEOUT_S = 60.0  # cluster formed / crashed node rejoined
LOG_TIMEOUT_S = 10.0  # the survivor's records of a takeover written after the client saw it
# The acceptance target at pulse 100 / timeout 600: median RTO <= 1 s + application start.
TARGET_ENGINE_S = 1.0

SCENARIOS = ("mirrorha-fast", "mirrorha-reference", "keepalived", "soak")
FAST = LabSettings(pulse_ms=100, timeout_ms=600)
REFERENCE = LabSettings(pulse_ms=700, timeout_ms=30000)

BURNER_COMM = "mhb-burn"
SOAK_STATE_EVERY_S = 0.2  # daemon state sampled this often during the soak

LOG_LINE_RE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) \S+ [IWE] (.*)$")
TRANSITION_RE = re.compile(r"\b([A-Z]+) -> ([A-Z]+)\b")
START_PRIM_EXIT_RE = re.compile(r"start_prim exited 0 after ([\d.]+) s")
LOG_STAMP_SLACK_S = 0.001  # module-log stamps are truncated to the millisecond


# ---------------------------------------------------------------------------------------------
# The two systems under test


class Backend(Protocol):
    """One HA system in a lab: how to build it, tell its roles, read its takeover records."""

    name: str
    lab: Lab

    def start(self) -> None: ...

    def wait_pair(self, prim: str, second: str, since: float, timeout: float) -> None: ...

    def takeover(self, node: str, since: float) -> Takeover | None: ...


@dataclass(frozen=True)
class LogLine:
    when: float  # epoch seconds
    text: str  # the line after the timestamp, node name and level


def module_log(lab: Lab, node: str, since: float = 0.0) -> list[LogLine]:
    """Module-log lines of a node written at or after epoch time `since`."""
    try:
        text = lab.node_paths(node).module_log.read_text(errors="replace")
    except FileNotFoundError:
        return []
    lines = []
    for raw in text.splitlines():
        match = LOG_LINE_RE.match(raw)
        if match:
            when = parse_log_time(match.group(1))
            if when >= since - LOG_STAMP_SLACK_S:
                lines.append(LogLine(when, match.group(2)))
    return lines


def mirrorha_state(lab: Lab, node: str) -> dict[str, Any] | None:
    """What `mirrorha state --json` prints, None if the node's daemon does not answer. Asked on
    the daemon's control socket directly (a file the host sees): no CLI process to start, which
    matters when sampling often on CPUs the soak keeps busy."""
    if not lab.node_alive(node):
        return None  # a crashed node's socket file is still there
    with contextlib.suppress(MirrorhaError, ValueError):
        return control.get_state(lab.node_paths(node).control_socket)
    return None


def in_state(lab: Lab, node: str, state: str) -> bool:
    """The node's daemon reports `state` and is not busy (running a script); a SECOND must
    also be in sync."""
    s = mirrorha_state(lab, node)
    return bool(s and s["state"] == state and not s["busy"]
                and (state != "SECOND" or s["in_sync"]))


def pair_formed(lab: Lab, prim: str, second: str) -> bool:
    return in_state(lab, second, "SECOND") and in_state(lab, prim, "PRIM")


class MirrorhaBackend:
    def __init__(self, name: str, settings: LabSettings) -> None:
        self.name = name
        self.settings = settings
        self.lab = Lab(prefix=MIRRORHA_PREFIX, settings=settings)

    def start(self) -> None:
        since = time.time()
        self.lab.up()
        self.wait_pair("node1", "node2", since, FORM_TIMEOUT_S)

    def wait_pair(self, prim: str, second: str, since: float, timeout: float) -> None:
        wait_for(lambda: pair_formed(self.lab, prim, second), timeout,
                 f"{prim} PRIM and {second} SECOND in sync", interval=0.1)

    def takeover(self, node: str, since: float) -> Takeover | None:
        decided: float | None = None
        launched: float | None = None
        for line in module_log(self.lab, node, since):
            transition = TRANSITION_RE.search(line.text)
            if decided is None:
                if transition and transition.group(2) in ("ALONE", "PRIM"):
                    decided = line.when
            elif launched is None:
                if "start_prim started" in line.text:
                    launched = line.when
            elif match := START_PRIM_EXIT_RE.search(line.text):
                return Takeover(decided, launched, float(match.group(1)))
        return None


class KeepalivedBackend:
    name = "keepalived"

    def __init__(self) -> None:
        labdir = Path(f"/tmp/mirrorha-lab-{KEEPALIVED_PREFIX}")
        self.lab = Lab(
            prefix=KEEPALIVED_PREFIX, labdir=labdir, daemon_argv=keepalived.daemon_argv(labdir)
        )

    def start(self) -> None:
        since = time.time()
        self.lab.up(start_nodes=False)
        keepalived.write_node_files(self.lab)
        for node in self.lab.NODES:  # node1 first, as with mirrorha: it wins the election
            self.lab.start_node(node)
        self.wait_pair("node1", "node2", since, FORM_TIMEOUT_S)

    def wait_pair(self, prim: str, second: str, since: float, timeout: float) -> None:
        def formed() -> bool:
            return (
                keepalived.state(self.lab, second, since) == "BACKUP"
                and keepalived.state(self.lab, prim, 0.0) == "MASTER"
            )

        wait_for(formed, timeout, f"{prim} MASTER and {second} BACKUP", interval=0.1)

    def takeover(self, node: str, since: float) -> Takeover | None:
        return keepalived.takeover(self.lab, node, since)


# ---------------------------------------------------------------------------------------------
# Crash runs


def one_crash(backend: Backend, run: int, victim: str, survivor: str, timeout: float) -> CrashRun:
    lab = backend.lab
    with lab.client_poller(
        interval_s=POLL_INTERVAL_S, timeout_s=POLL_TIMEOUT_S, max_duration_s=timeout + 120
    ) as poller:
        poller.wait_for_ok(time.monotonic(), victim, timeout=10)
        t0, wall0 = time.monotonic(), time.time()
        lab.crash_node(victim)
        poller.wait_for_ok(t0, survivor, timeout=timeout)
        samples = poller.samples()
    takeover = wait_for(
        lambda: backend.takeover(survivor, wall0),
        LOG_TIMEOUT_S,
        f"{survivor}'s records of the takeover",
    )
    return crash_run(run, victim, survivor, t0, wall0, samples, takeover)


def crash_runs(backend: Backend, runs: int, takeover_timeout: float) -> list[CrashRun]:
    """`runs` crashes of whichever node is primary; each time the victim boots again and rejoins
    before the next run, so the two nodes take turns."""
    results: list[CrashRun] = []
    prim, second = "node1", "node2"
    for run in range(1, runs + 1):
        result = one_crash(backend, run, prim, second, takeover_timeout)
        results.append(result)
        print(f"  {backend.name} run {run}/{runs}: {describe(result)}", flush=True)
        since = time.time()
        backend.lab.start_node(prim)
        backend.wait_pair(second, prim, since, FORM_TIMEOUT_S)
        prim, second = second, prim
    return results


def describe(r: CrashRun) -> str:
    script = f"{r.start_prim_s:.3f}" if r.start_prim_s is not None else "-"
    return (
        f"crashed {r.crashed}: RTO {r.rto_s:.3f} s (detection {r.detection_s:.3f}, "
        f"app start {r.app_start_s:.3f}, start script {script}, "
        f"±{r.uncertainty_s:.3f}, {r.failed_attempts} failed requests)"
    )


def summarize(runs: Sequence[CrashRun]) -> dict[str, Any]:
    def stats(get: Callable[[CrashRun], float | None]) -> dict[str, Any] | None:
        s = Stats.of([get(r) for r in runs])
        return _rounded(asdict(s)) if s else None

    return {
        "rto_s": stats(lambda r: r.rto_s),
        "detection_s": stats(lambda r: r.detection_s),
        "app_start_s": stats(lambda r: r.app_start_s),
        "start_script_s": stats(lambda r: r.start_prim_s),
        "rto_minus_app_start_s": stats(lambda r: r.rto_minus_app_start_s),
        "uncertainty_s": stats(lambda r: r.uncertainty_s),
    }


# ---------------------------------------------------------------------------------------------
# Soak: no false failover under CPU load


@dataclass
class SoakObservations:
    """Collected while the soak runs (mutable on purpose: filled sample by sample)."""

    state_samples: int = 0
    rtt_max_s: float = 0.0
    silence_max_s: float = 0.0  # largest last_seen_age_s seen on any heartbeat network
    unexpected_states: list[str] = field(default_factory=list)


def _netns_inode(lab: Lab, node: str) -> int | None:
    try:
        return os.stat(f"/run/netns/{lab.netns(node)}").st_ino
    except OSError:
        return None


def burner_ticks(lab: Lab) -> dict[str, tuple[int, int]]:
    """Per node: (number of CPU burners, CPU clock ticks they have used so far)."""
    inodes = {_netns_inode(lab, node): node for node in lab.NODES}
    found = {node: (0, 0) for node in lab.NODES}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if Path(entry.path, "comm").read_text().strip() != BURNER_COMM:
                continue
            node = inodes.get(os.stat(f"{entry.path}/ns/net").st_ino)
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue  # exited while we looked
        if node is None:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        count, ticks = found[node]
        found[node] = (count + 1, ticks + int(fields[11]) + int(fields[12]))  # utime + stime
    return found


def host_cpu_ticks() -> tuple[int, int]:
    """(busy, total) CPU ticks of the whole host since boot, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


def start_burners(lab: Lab, per_node: int) -> None:
    """`per_node` busy loops in each node's container (its PID namespace: they die with it)."""
    code = f"open('/proc/self/comm', 'w').write('{BURNER_COMM}')\nwhile True:\n    pass"
    loop = f'{lab.python} -c "$0" </dev/null >/dev/null 2>&1 &'
    script = f"for i in $(seq {per_node}); do {loop} done"
    for node in lab.NODES:
        lab.node_run(node, ["sh", "-c", script, code])
    wait_for(
        lambda: all(count == per_node for count, _ in burner_ticks(lab).values()),
        10,
        f"{per_node} CPU burners on each node",
    )


def stop_burners(lab: Lab) -> None:
    for node in lab.NODES:
        if lab.node_alive(node):
            lab.node_run(node, ["pkill", "-KILL", "-x", BURNER_COMM], check=False)
    wait_for(
        lambda: not any(count for count, _ in burner_ticks(lab).values()),
        10,
        "the CPU burners to exit",
    )


def observe_states(lab: Lab, seen: SoakObservations) -> None:
    expected = {"node1": "PRIM", "node2": "SECOND"}
    for node in lab.NODES:
        state = mirrorha_state(lab, node)
        if state is None:
            seen.unexpected_states.append(f"{node}: no answer from the daemon")
            continue
        seen.state_samples += 1
        if state["state"] != expected[node]:
            seen.unexpected_states.append(f"{node}: {state['state']}")
        for net in state["heartbeat"]["networks"]:
            if net.get("rtt_s") is not None:
                seen.rtt_max_s = max(seen.rtt_max_s, net["rtt_s"])
            if net.get("last_seen_age_s") is not None:
                seen.silence_max_s = max(seen.silence_max_s, net["last_seen_age_s"])


@dataclass(frozen=True)
class SoakWindow:
    """What the soak measured while the load ran."""

    wall0: float  # epoch time the load window started
    elapsed_s: float
    burner_cores: dict[str, float]  # CPU cores the burners of each node used on average
    host_busy: float  # fraction of the host's CPU time that was busy
    samples: list[PollSample]
    seen: SoakObservations


def soak_window(lab: Lab, duration_s: float) -> SoakWindow:
    """Client polling and daemon state sampling for duration_s, the burners already running."""
    seen = SoakObservations()
    with lab.client_poller(interval_s=0.1, timeout_s=1.0, max_duration_s=duration_s + 120) as poll:
        ticks0, host0 = burner_ticks(lab), host_cpu_ticks()
        t_start, wall0 = time.monotonic(), time.time()
        end, next_report = t_start + duration_s, t_start + 60
        while (now := time.monotonic()) < end:
            observe_states(lab, seen)
            if now >= next_report:
                print(f"  soak: {now - t_start:.0f} s", flush=True)
                next_report += 60
            time.sleep(max(0.0, min(SOAK_STATE_EVERY_S, end - time.monotonic())))
        ticks1, host1 = burner_ticks(lab), host_cpu_ticks()
        elapsed = time.monotonic() - t_start
        samples = [s for s in poll.samples() if t_start <= s.t_start <= t_start + elapsed]
    tick_hz = os.sysconf("SC_CLK_TCK")
    cores = {
        node: round((ticks1[node][1] - ticks0[node][1]) / tick_hz / elapsed, 2)
        for node in lab.NODES
    }
    busy = (host1[0] - host0[0]) / max(1, host1[1] - host0[1])
    return SoakWindow(wall0, elapsed, cores, round(busy, 3), samples, seen)


def log_lines_matching(lab: Lab, since: float, keep: Callable[[str], bool]) -> list[str]:
    return [
        f"{node}: {line.text}"
        for node in lab.NODES
        for line in module_log(lab, node, since)
        if keep(line.text)
    ]


def soak_report(lab: Lab, window: SoakWindow, per_node: int) -> dict[str, Any]:
    transitions = log_lines_matching(lab, window.wall0, lambda t: bool(TRANSITION_RE.search(t)))
    silences = log_lines_matching(lab, window.wall0, lambda t: "silent" in t)
    served = [s.served_by for s in window.samples if s.ok]
    seen = window.seen
    return {
        "duration_s": round(window.elapsed_s, 1),
        "settings": {"pulse_ms": FAST.pulse_ms, "timeout_ms": FAST.timeout_ms},
        "cpus": os.cpu_count(),
        "burners_per_node": per_node,
        "burner_cpu_cores_used": window.burner_cores,
        "host_cpu_busy": window.host_busy,
        "state_transitions": transitions,
        "false_failovers_in_logs": len(transitions),
        "client_requests": len(window.samples),
        "client_errors": sum(1 for s in window.samples if not s.ok),
        "client_served_by_changes": sum(1 for a, b in itertools.pairwise(served) if a != b),
        "served_by": sorted({s for s in served if s}),
        "heartbeat_network_silences": silences,
        "state_samples": seen.state_samples,
        "state_sample_interval_s": SOAK_STATE_EVERY_S,
        "unexpected_states": seen.unexpected_states[:20],
        "heartbeat_rtt_max_s": round(seen.rtt_max_s, 6),
        "heartbeat_silence_max_s": round(seen.silence_max_s, 3),
    }


def soak(duration_s: float) -> dict[str, Any]:
    """mirrorha 100/600 with both nodes' CPUs saturated: any state change is a false failover."""
    backend = MirrorhaBackend("soak", FAST)
    lab = backend.lab
    per_node = 2 * (os.cpu_count() or 1)
    try:
        backend.start()
        start_burners(lab, per_node)
        print(f"  soak: {duration_s:g} s, {per_node} CPU burners per node", flush=True)
        window = soak_window(lab, duration_s)
        stop_burners(lab)
        return soak_report(lab, window, per_node)
    finally:
        keep_logs(lab, "soak")
        lab.down()


# ---------------------------------------------------------------------------------------------
# Scenarios and output


def keep_logs(lab: Lab, scenario: str) -> None:
    """Copy the nodes' logs out of the lab before it is removed (read them after a surprise)."""
    dest = ARTIFACTS / scenario
    shutil.rmtree(dest, ignore_errors=True)
    for node in lab.NODES:
        home = lab.node_home(node)
        sources = [lab.daemon_out(node), *sorted(lab.node_paths(node).log_dir.glob("*.log"))]
        sources += [home / keepalived.STATE_LOG, home / keepalived.CONF]
        for src in sources:
            if src.exists():
                (dest / node).mkdir(parents=True, exist_ok=True)
                shutil.copy(src, dest / node / src.name)


def _rounded(record: dict[str, Any]) -> dict[str, Any]:
    # Sub-millisecond digits are noise here (the client polls every 20 ms).
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()}


def crash_scenario(name: str, runs: int) -> dict[str, Any]:
    backend: Backend
    if name == "keepalived":
        backend = KeepalivedBackend()
        label = f"keepalived {keepalived.version().split()[1]} VRRPv3 advert 0.1 s"
        settings: dict[str, Any] = {"advert_int_s": keepalived.ADVERT_INT_S, "vrrp_version": 3}
        takeover_timeout = 30.0
    else:
        lab_settings = FAST if name == "mirrorha-fast" else REFERENCE
        backend = MirrorhaBackend(name, lab_settings)
        label = f"mirrorha {lab_settings.pulse_ms}/{lab_settings.timeout_ms} ms"
        settings = {"pulse_ms": lab_settings.pulse_ms, "timeout_ms": lab_settings.timeout_ms}
        takeover_timeout = lab_settings.timeout_ms / 1000 + 30
    print(f"{label}: {runs} crash runs", flush=True)
    try:
        backend.start()
        results = crash_runs(backend, runs, takeover_timeout)
    finally:
        keep_logs(backend.lab, name)
        backend.lab.down()
    return {
        "label": label,
        "settings": settings,
        "runs": [
            _rounded({**asdict(r), "rto_minus_app_start_s": r.rto_minus_app_start_s})
            for r in results
        ],
        "stats": summarize(results),
    }


def _cell(stats: dict[str, Any] | None, key: str = "median") -> str:
    return f"{stats[key]:.3f}" if stats else "-"


def table(results: dict[str, Any]) -> str:
    head = (
        f"{'scenario':<40} {'runs':>4} {'min':>7} {'median':>7} {'max':>7} "
        f"{'detect':>7} {'app':>7} {'RTO-app':>7}"
    )
    lines = [
        "RTO = crash of the primary -> first HTTP answer from the other node on the VIP "
        "(seconds; detect, app and RTO-app are medians)",
        head,
        "-" * len(head),
    ]
    for name in SCENARIOS[:3]:
        scenario = results["scenarios"].get(name)
        if scenario is None:
            continue
        if "error" in scenario:
            lines.append(f"{name:<40} FAILED: {scenario['error']}")
            continue
        s = scenario["stats"]
        rto = s["rto_s"]
        lines.append(
            f"{scenario['label']:<40} {rto['n'] if rto else 0:>4} {_cell(rto, 'min'):>7} "
            f"{_cell(rto):>7} {_cell(rto, 'max'):>7} {_cell(s['detection_s']):>7} "
            f"{_cell(s['app_start_s']):>7} {_cell(s['rto_minus_app_start_s']):>7}"
        )
    lines += [
        "detect = crash -> the survivor decides to serve; app = the survivor launches the "
        "application -> first answer;",
        "RTO-app = RTO minus app (crash -> application launched). Client polls every "
        f"{POLL_INTERVAL_S * 1000:g} ms, request timeout {POLL_TIMEOUT_S * 1000:g} ms.",
    ]
    return "\n".join(lines)


def soak_summary(result: dict[str, Any]) -> str:
    if "error" in result:
        return f"soak FAILED: {result['error']}"
    load = ", ".join(f"{n} {c:g}" for n, c in result["burner_cpu_cores_used"].items())
    lines = [
        f"soak {result['duration_s']:g} s at pulse {result['settings']['pulse_ms']} ms / "
        f"timeout {result['settings']['timeout_ms']} ms, {result['burners_per_node']} CPU "
        f"burners per node on {result['cpus']} CPUs (host CPU busy "
        f"{result['host_cpu_busy'] * 100:.0f} %; cores used by burners: {load})",
        f"  state transitions in the module logs: {result['false_failovers_in_logs']}; "
        f"served-by changes seen by the client: {result['client_served_by_changes']} "
        f"({result['client_requests']} requests, {result['client_errors']} failed)",
        f"  heartbeat RTT max {result['heartbeat_rtt_max_s'] * 1000:.1f} ms, longest silence "
        f"seen {result['heartbeat_silence_max_s'] * 1000:.0f} ms (sampled every "
        f"{result['state_sample_interval_s']:g} s), network silences logged: "
        f"{len(result['heartbeat_network_silences'])}",
    ]
    lines += [f"  transition: {t}" for t in result["state_transitions"][:10]]
    lines += [f"  silence: {t}" for t in result["heartbeat_network_silences"][:10]]
    return "\n".join(lines)


def verdicts(results: dict[str, Any]) -> list[str]:
    lines = []
    fast = results["scenarios"].get("mirrorha-fast", {}).get("stats")
    if fast and fast["rto_minus_app_start_s"]:
        engine = fast["rto_minus_app_start_s"]["median"]
        met = "met" if engine <= TARGET_ENGINE_S else "NOT met"
        lines.append(
            f"target median RTO <= {TARGET_ENGINE_S:g} s + app start at 100/600: {met} "
            f"(median RTO - app start {engine:.3f} s)"
        )
    soak_result = results.get("soak")
    if soak_result and "error" not in soak_result:
        false = soak_result["false_failovers_in_logs"] + soak_result["client_served_by_changes"]
        lines.append(f"target no false failover under load: {'met' if false == 0 else 'NOT met'}")
    return lines


def host_info() -> dict[str, Any]:
    other_labs = sorted(p.stem for p in Path("/run/mirrorha-lab").glob("*.json"))
    return {
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "keepalived": keepalived.version(),
        "other_labs_running_at_start": [p for p in other_labs if p != MIRRORHA_PREFIX],
    }




def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.failover",
        description="Failover time of mirrorha (two timer settings) and keepalived after a "
        "primary crash, and a soak under CPU load. Needs root (the lab).",
    )
    parser.add_argument("--quick", action="store_true", help="3 runs per scenario, 30 s soak")
    parser.add_argument("--runs", type=int, help="crash runs per scenario (default 10)")
    parser.add_argument(
        "--soak-s", type=float, help="soak duration in seconds (default $BENCH_SOAK_S or 600)"
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=SCENARIOS,
        help="run only this scenario (repeatable)",
    )
    return parser


@dataclass(frozen=True)
class Plan:
    scenarios: tuple[str, ...]
    runs: int
    soak_s: float


def plan_from(args: argparse.Namespace) -> Plan:
    runs = args.runs if args.runs is not None else (3 if args.quick else 10)
    if args.soak_s is not None:
        soak_s = args.soak_s
    elif args.quick:
        soak_s = 30.0
    else:
        soak_s = float(os.environ.get("BENCH_SOAK_S", "600"))
    if runs < 1 or soak_s <= 0:
        raise BenchError("--runs must be at least 1 and the soak duration positive")
    chosen = tuple(s for s in SCENARIOS if not args.only or s in args.only)
    return Plan(chosen, runs, soak_s)




def run(plan: Plan) -> int:
    results: dict[str, Any] = {
        "started": datetime.now().isoformat(timespec="seconds"),
        "host": host_info(),
        "client": {"interval_s": POLL_INTERVAL_S, "request_timeout_s": POLL_TIMEOUT_S},
        "scenarios": {},
    }
    failed = False
    for name in plan.scenarios:
        try:
            if name == "soak":
                print(f"soak: {plan.soak_s:g} s under CPU load", flush=True)
                results["soak"] = soak(plan.soak_s)
            else:
                results["scenarios"][name] = crash_scenario(name, plan.runs)
        except MirrorhaError as e:  # LabError, BenchError: record it and go on with the rest
            failed = True
            print(f"{name} FAILED: {e}", file=sys.stderr, flush=True)
            where = results if name == "soak" else results["scenarios"]
            where[name] = {"error": str(e)}
        write_json(RESULTS, results)
    results["finished"] = datetime.now().isoformat(timespec="seconds")
    write_json(RESULTS, results)
    print()
    if any(n != "soak" for n in plan.scenarios):
        print(table(results))
    if "soak" in results:
        print(soak_summary(results["soak"]))
    for line in verdicts(results):
        print(line)
    print(f"results: {RESULTS}; node logs: {ARTIFACTS}/")
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return run_bench("bench.failover", "the lab creates network namespaces",
                     lambda: plan_from(args), run, "the labs were removed")


if __name__ == "__main__":
    sys.exit(main())
