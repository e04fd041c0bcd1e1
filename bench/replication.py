"""Replication bench (`make bench`): what the FUSE over-mount and synchronous replication cost,
and how long a returning secondary takes to be back in sync.

Three file-system workloads (bench/workloads.py, each timing itself where it runs):

- seq     1 MiB writes to one new file (1 GiB), one fsync at the end            MiB/s
- fsync   4 KiB appends, fsync after each (a commit log's pattern)              fsyncs/s
- files   small-file creates (1 KiB each, 1000 per directory), fsync of the dirs  files/s

on four configurations, all on the same file system:

- (a) local       a plain directory, from the host
- (b) FUSE-only   the mirrorha FUSE passthrough without replication (a mount child started with
                  no --control, in a mount namespace of its own), from the host
- (c) ceiling     the "two-copy ceiling": the workload run twice at once, in two directories of
                  the file system the lab's two backing copies live on. Both copies share the
                  disk and the CPUs, so no replication can beat it: its throughput is one copy's
                  work over the time both took.
- (d) replicated  a lab (prefix mhr, pulse 100 ms / timeout 600 ms), node1 PRIM, node2 SECOND
                  in sync, the workload run inside node1 on its replicated mount; a run counts
                  only if the pair stayed in sync throughout

in rounds (each round runs every workload on every configuration, so that whatever else loads
the machine weighs on all alike; the median of the rounds is kept). Then pgbench (TPC-B-like,
scale 5, 4 clients, 30 s, unix socket) on (a), (b) and (d), and the reintegration of a node that
missed 1 % of a 1 GiB dataset (200 files, 2 of them rewritten while node2 was down): node2
boots, and its resync time is compared with `rsync -a` of the same change between two host
directories, and with a full `rsync -a` copy. node1's dirty-zone journal says what changed, so
the reintegration sends about that 1 %; its time and volume come from node1's module log.

Results: a table on stdout and bench/results/replication.json; the lab's logs are kept under
test-artifacts/bench/replication/.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from appliance.errors import MirrorhaError
from appliance.lab import Lab, LabSettings
from appliance.replication.fusefs import child_argv
from bench.common import BenchError, run_bench, wait_for, write_json
from bench.failover import keep_logs, mirrorha_state, module_log
from bench.workloads import SEQ_BLOCK, Timing

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "replication.json"
PREFIX = "mhr"
# Host-side scratch space, on the same file system as the lab directory (/tmp), so that every
# configuration writes to the same disk.
SCRATCH = Path("/var/tmp/mirrorha-bench-mhr")
DATA_DIR = "/srv/mirrorha-bench-mhr"  # the replicated directory inside the lab's nodes
LAB_SETTINGS = replace(LabSettings(pulse_ms=100, timeout_ms=600), replicated_dirs=(DATA_DIR,))
PGBIN = Path("/usr/lib/postgresql/15/bin")
PG_PORT = 5499  # unix socket only (listen_addresses = ''): the port just names the socket
FORM_TIMEOUT_S = 60.0
WORKLOAD_TIMEOUT_S = 900.0
RESYNC_TIMEOUT_S = 900.0
START_DELAY_S = 1.5  # the two ceiling copies start together this long after being launched
CONFIGS = ("local", "fuse", "ceiling", "replicated")
CONFIG_LABELS = {"local": "(a) local", "fuse": "(b) FUSE", "ceiling": "(c) 2-copy",
                 "replicated": "(d) repl."}
RESYNC_LOG_RE = re.compile(r"full resync to (\S+): (\d+) bytes of data in ([\d.]+) s")
REINT_LOG_RE = re.compile(r"reintegration of (\S+) \((\w+) mode\): ([\d.]+) MiB .*, ([\d.]+) s;")
TPS_RE = re.compile(r"^tps = ([\d.]+) \(without initial connection time\)", re.MULTILINE)
MIB = 1 << 20

# Targets of the issue, as fractions.
TARGET_FUSE_SEQ = 0.90  # (b) / (a), sequential
TARGET_REPL_SEQ = 0.85  # (d) / (c), sequential
TARGET_REPL_FSYNC = 0.70  # (d) / (c), 4 KiB fsync writes
TARGET_REINT_VS_DELTA = 0.50  # reintegration / rsync of the change
TARGET_REINT_VS_FULL = 0.10  # reintegration / full rsync copy
TARGET_PG = 0.60  # replicated TPS / local TPS


@dataclass(frozen=True)
class Sizes:
    seq_bytes: int
    fsync_count: int
    files_count: int
    reint_bytes: int
    change_percent: float
    pg_scale: int
    pg_clients: int
    pg_seconds: int
    pgbench: bool
    repeat: int


FULL = Sizes(seq_bytes=1 << 30, fsync_count=5000, files_count=10_000, reint_bytes=1 << 30,
             change_percent=1.0, pg_scale=5, pg_clients=4, pg_seconds=30, pgbench=True, repeat=3)
QUICK = Sizes(seq_bytes=128 * MIB, fsync_count=1000, files_count=1000, reint_bytes=128 * MIB,
              change_percent=1.0, pg_scale=5, pg_clients=4, pg_seconds=10, pgbench=True,
              repeat=1)


# ---------------------------------------------------------------------------------------------
# Workloads and where they run


@dataclass(frozen=True)
class Workload:
    key: str
    label: str
    unit: str
    per_bytes: bool  # throughput in MiB/s (else in ops/s)

    def args(self, sizes: Sizes) -> list[str]:
        if self.key == "seq":
            return ["seq", "--bytes", str(sizes.seq_bytes)]
        count = sizes.fsync_count if self.key == "fsync" else sizes.files_count
        return [self.key, "--count", str(count)]

    def rate(self, timing: Timing) -> float:
        amount = timing.bytes / MIB if self.per_bytes else timing.ops
        return amount / max(timing.seconds, 1e-9)


def workloads(sizes: Sizes) -> tuple[Workload, ...]:
    return (
        Workload("seq", f"1 MiB seq writes, {sizes.seq_bytes / MIB:g} MiB, fsync at end",
                 "MiB/s", True),
        Workload("fsync", f"4 KiB writes + fsync each, x{sizes.fsync_count}", "fsync/s", False),
        Workload("files", f"small-file creates, x{sizes.files_count}", "files/s", False),
    )


def parse_timing(output: str, what: str) -> Timing:
    for line in reversed(output.strip().splitlines()):
        with contextlib.suppress(ValueError, TypeError):
            return Timing(**json.loads(line))
    raise BenchError(f"{what}: no timing in its output: {output.strip()[-300:]!r}")


class Place(Protocol):
    """Where workloads run: the host, the FUSE-only mount's namespace, or a lab node."""

    def workload(self, args: Sequence[str], directory: str) -> Timing: ...

    def sh(self, script: str, timeout: float = 120.0) -> str: ...


def _workload_argv(python: str, args: Sequence[str], directory: str) -> list[str]:
    return [python, "-m", "bench.workloads", *args, "--dir", directory]


def host_run(argv: Sequence[str], timeout: float) -> str:
    """Run a command on the host; its stdout, BenchError when it fails."""
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                              cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    except subprocess.TimeoutExpired:
        raise BenchError(f"{' '.join(argv)[:200]}: no end within {timeout:g} s") from None
    if done.returncode != 0:
        tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-5:])
        raise BenchError(f"{' '.join(argv)[:200]} failed ({done.returncode}): {tail}")
    return done.stdout


class Host:
    """Commands on the host, entered into another mount namespace first if `enter` says so."""

    def __init__(self, enter: Sequence[str] = ()) -> None:
        self.enter = list(enter)

    def workload(self, args: Sequence[str], directory: str) -> Timing:
        argv = _workload_argv(sys.executable, args, directory)
        return parse_timing(host_run([*self.enter, *argv], WORKLOAD_TIMEOUT_S), " ".join(args))

    def sh(self, script: str, timeout: float = 120.0) -> str:
        return host_run([*self.enter, "sh", "-c", script], timeout)


class Node:
    def __init__(self, lab: Lab, node: str) -> None:
        self.lab = lab
        self.name = node

    def workload(self, args: Sequence[str], directory: str) -> Timing:
        argv = _workload_argv(str(self.lab.python), args, directory)
        out = self.lab.node_run(self.name, argv, timeout=WORKLOAD_TIMEOUT_S).stdout
        return parse_timing(out, f"{' '.join(args)} on {self.name}")

    def sh(self, script: str, timeout: float = 120.0) -> str:
        return self.lab.node_run(self.name, ["sh", "-c", script], timeout=timeout).stdout


def fresh_dir(place: Place, directory: str) -> None:
    place.sh(f"rm -rf '{directory}' && mkdir -p '{directory}'")


def one_run(place: Place, workload: Workload, sizes: Sizes, directory: str) -> Timing:
    """The workload in a fresh `directory`, removed after (and, on a replicated mount, on the
    secondary too). Dirty pages are flushed first so that the previous run's writeback does
    not slow this one down."""
    fresh_dir(place, directory)
    os.sync()
    try:
        return place.workload(workload.args(sizes), directory)
    finally:
        place.workload(["clean"], directory)


def ceiling_run(workload: Workload, sizes: Sizes) -> Timing:
    """The workload run at once in two directories of one file system, as two nodes' backing
    copies; the timing spans from the first start to the last end, with one copy's work."""
    dirs = [SCRATCH / "ceiling-node1" / workload.key, SCRATCH / "ceiling-node2" / workload.key]
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    os.sync()
    start_at = time.time() + START_DELAY_S
    argvs = [_workload_argv(sys.executable, [*workload.args(sizes), "--start-at",
                                             f"{start_at:.6f}"], str(d)) for d in dirs]
    try:
        timings = _run_together(argvs)
    finally:
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)
    return replace(timings[0], start=min(t.start for t in timings),
                   end=max(t.end for t in timings))


def _run_together(argvs: Sequence[Sequence[str]]) -> list[Timing]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen(list(a), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=ROOT, env=env) for a in argvs]
    try:
        outputs = [p.communicate(timeout=WORKLOAD_TIMEOUT_S) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (_out, err) in zip(procs, outputs, strict=True):
        if p.returncode != 0:
            raise BenchError(f"a ceiling copy failed ({p.returncode}): {err.strip()[-300:]}")
    return [parse_timing(out, "ceiling copy") for out, _ in outputs]


def summary(workload: Workload, runs: Sequence[Timing]) -> dict[str, Any]:
    rates = [workload.rate(t) for t in runs]
    return {
        "rate": round(statistics.median(rates), 2),
        "min": round(min(rates), 2),
        "max": round(max(rates), 2),
        "unit": workload.unit,
        "runs": [{"seconds": round(t.seconds, 4), "bytes": t.bytes, "ops": t.ops,
                  "rate": round(workload.rate(t), 2)} for t in runs],
    }


# ---------------------------------------------------------------------------------------------
# FUSE without replication


def _mount_types(pid: int) -> dict[str, str]:
    """Mount point -> file-system type, as process `pid` sees them."""
    found = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
            before, _, after = line.partition(" - ")
            found[before.split()[4]] = after.split()[0]
    return found


@contextlib.contextmanager
def fuse_mount(directory: Path) -> Iterator[Host]:
    """The mirrorha FUSE passthrough over `directory`, without replication (a mount child with
    no --control), in a mount namespace of its own: namespaces created meanwhile (a lab's
    nodes, anyone's) get no copy of it, and it vanishes with its processes even after a crash.
    Yields the place to run commands in that namespace (through nsenter)."""
    directory.mkdir(parents=True, exist_ok=True)
    argv = ["unshare", "--mount", "--propagation", "private", "--", *child_argv(0, directory)]
    with (SCRATCH / "fusefs.log").open("ab") as log:
        child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                 stderr=subprocess.STDOUT, cwd=ROOT,
                                 env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        wait_for(lambda: child.poll() is not None
                 or _mount_types(child.pid).get(str(directory)) == "fuse.mirrorha", 15,
                 f"the FUSE mount on {directory}")
        if child.poll() is not None:
            raise BenchError(f"the FUSE mount child exited ({child.returncode}); see "
                             f"{SCRATCH / 'fusefs.log'}")
        yield Host(["nsenter", "-t", str(child.pid), "-m", "--"])
    finally:
        if child.poll() is None:
            child.terminate()  # it unmounts, then exits
            try:
                child.wait(timeout=15)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


# ---------------------------------------------------------------------------------------------
# pgbench


@dataclass(frozen=True)
class PgSite:
    place: Place
    data: str  # the data directory (created)
    run: str  # unix socket directory and server log (outside any replicated dir)


def _as_pg(command: str) -> str:
    return f"runuser -u postgres -- {command}"


def pg_start(site: PgSite, sizes: Sizes) -> None:
    """initdb, start the server (unix socket only) and pgbench -i."""
    data, run = site.data, site.run
    conf = "\n".join((
        "listen_addresses = ''", f"unix_socket_directories = '{run}'", f"port = {PG_PORT}",
        "fsync = on", "synchronous_commit = on",
        # System V segments go with a lab node's IPC namespace; POSIX ones would be left in the
        # /dev/shm the nodes share with the host if something went wrong.
        "dynamic_shared_memory_type = sysv"))
    site.place.sh(f"""set -e
        rm -rf '{data}' '{run}'; mkdir -p '{run}' "$(dirname '{data}')"; mkdir -m 700 '{data}'
        chown postgres:postgres '{data}' '{run}'
        {_as_pg(f"{PGBIN}/initdb -D '{data}' -U postgres --auth=trust -E UTF8 --no-locale")} \\
          > '{run}/initdb.log'
        printf '%s\\n' "{conf}" >> '{data}/postgresql.conf'
        {_as_pg(f"{PGBIN}/pg_ctl -D '{data}' -l '{run}/postgresql.log' -w -t 60 start")} \\
          > /dev/null
        {_as_pg(f"{PGBIN}/pgbench -h '{run}' -p {PG_PORT} -i -q -s {sizes.pg_scale} postgres")} \\
          > '{run}/init.log' 2>&1""", timeout=600)


def pg_stop(site: PgSite, mode: str = "fast") -> None:
    site.place.sh(
        f"if [ -f '{site.data}/postmaster.pid' ]; then "
        f"{_as_pg(f'{PGBIN}/pg_ctl -D {site.data} -m {mode} -w -t 30 stop')} > /dev/null; fi",
        timeout=60)


def pgbench(site: PgSite, sizes: Sizes) -> dict[str, Any]:
    """initdb + pgbench -i on the site, then the timed pgbench run; the server is stopped and
    its files removed whatever happens."""
    try:
        pg_start(site, sizes)
        os.sync()
        out = site.place.sh(_as_pg(
            f"{PGBIN}/pgbench -h '{site.run}' -p {PG_PORT} -c {sizes.pg_clients} -j 2 "
            f"-T {sizes.pg_seconds} postgres"), timeout=sizes.pg_seconds + 300)
        match = TPS_RE.search(out)
        if match is None:
            raise BenchError(f"pgbench printed no TPS: {out.strip()[-300:]!r}")
        latency = re.search(r"latency average = ([\d.]+) ms", out)
        pg_stop(site)
        return {"tps": float(match.group(1)),
                "latency_ms": float(latency.group(1)) if latency else None}
    finally:
        with contextlib.suppress(MirrorhaError):
            pg_stop(site, "immediate")
        with contextlib.suppress(MirrorhaError):
            site.place.sh(f"rm -rf '{site.data}' '{site.run}'")


def pgbench_unavailable() -> str | None:
    """Why pgbench cannot run here, or None."""
    if not (PGBIN / "pgbench").exists() or not (PGBIN / "postgres").exists():
        return f"PostgreSQL 15 is not installed ({PGBIN})"
    if subprocess.run(["id", "postgres"], capture_output=True).returncode != 0:
        return "no postgres user"
    return None


# ---------------------------------------------------------------------------------------------
# The lab: node1 PRIM, node2 SECOND


def pair_state(lab: Lab) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """node1 PRIM and node2 SECOND in sync, both settled: their states; else None."""
    second = mirrorha_state(lab, "node2")
    if not (second and second["state"] == "SECOND" and second["in_sync"] and not second["busy"]):
        return None
    prim = mirrorha_state(lab, "node1")
    if not (prim and prim["state"] == "PRIM" and not prim["busy"]):
        return None
    return prim, second


def wait_pair(lab: Lab, timeout: float = FORM_TIMEOUT_S) -> dict[str, Any]:
    prim, _ = wait_for(lambda: pair_state(lab), timeout, "node1 PRIM and node2 SECOND in sync",
                       interval=0.05)
    return prim


def replication_counters(prim: dict[str, Any]) -> dict[str, int]:
    repl = prim.get("replication") or {}
    return {k: int(repl.get(k, 0)) for k in ("lost", "resyncs")}


def replicated_run(lab: Lab, w: Workload, sizes: Sizes) -> Timing:
    """The workload on node1's replicated mount; it only counts if the pair stayed in sync
    throughout (no replication loss, no resync in between)."""
    before = replication_counters(wait_pair(lab))
    timing = one_run(Node(lab, "node1"), w, sizes, f"{DATA_DIR}/work")
    after_state = pair_state(lab)
    after = replication_counters(after_state[0]) if after_state else None
    if after != before:
        raise BenchError(f"the pair did not stay in sync during the run (counters {before} -> "
                         f"{after}, pair {'formed' if after_state else 'broken'} after it)")
    return timing


def stop_lab(lab: Lab) -> None:
    keep_logs(lab, "replication")
    lab.down()
    # The secondary's resync leaves an empty `<dir>.mirrorha-aside` next to the replicated dir
    # on the host's /srv (in the lab the copy aside goes inside the node's private dir).
    with contextlib.suppress(OSError):
        Path(f"{DATA_DIR}.mirrorha-aside").rmdir()


def reintegration(lab: Lab, sizes: Sizes) -> dict[str, Any]:
    """Dataset written on node1 (replicated), node2 crashed, 1 % rewritten on node1 ALONE,
    node2 booted: how long until it is SECOND in sync again."""
    node1 = Node(lab, "node1")
    wait_pair(lab)
    fresh_dir(node1, f"{DATA_DIR}/reint")
    written = node1.workload(["dataset", "--bytes", str(sizes.reint_bytes)], f"{DATA_DIR}/reint")
    wait_pair(lab)
    # Once a SYNC barrier covered the dataset it is on node2's disk; crashed before, node2
    # might lack its last seconds, which node1 would then rightly resend too.
    wait_for(lambda: ((mirrorha_state(lab, "node1") or {}).get("replication") or {})
             .get("unsynced_changes") == 0, 30, "the dataset to be durable on node2")
    lab.crash_node("node2")
    wait_for(lambda: _alone(lab, "node1"), 30, "node1 ALONE after node2's crash")
    changed = node1.workload(["change", "--percent", str(sizes.change_percent)],
                             f"{DATA_DIR}/reint")
    os.sync()
    wall0, t0 = time.time(), time.monotonic()
    lab.start_node("node2")
    wait_pair(lab, RESYNC_TIMEOUT_S)
    total_s = time.monotonic() - t0
    resync = _resync_line(lab, wall0)
    return {
        "dataset_bytes": written.bytes,
        "changed_bytes": changed.bytes,
        "changed_files": changed.ops,
        "boot_to_in_sync_s": round(total_s, 3),
        "resync_s": resync[1] if resync else None,
        "resync_bytes": resync[0] if resync else None,
        "method": resync[2] if resync else "unknown",
    }


def _alone(lab: Lab, node: str) -> bool:
    state = mirrorha_state(lab, node)
    return bool(state and state["state"] == "ALONE" and not state["busy"])


def _resync_line(lab: Lab, since: float) -> tuple[int, float, str] | None:
    """(bytes, seconds, method) of node1's resync or reintegration log line written after
    `since`."""
    def found() -> tuple[int, float, str] | None:
        for line in module_log(lab, "node1", since):
            match = RESYNC_LOG_RE.search(line.text)
            if match and match.group(1) == "node2":
                return int(match.group(2)), float(match.group(3)), "full copy"
            match = REINT_LOG_RE.search(line.text)
            if match and match.group(1) == "node2":
                return (int(float(match.group(3)) * MIB), float(match.group(4)),
                        f"reintegration, {match.group(2)} mode")
        return None

    with contextlib.suppress(BenchError):
        return wait_for(found, 10, "node1's resync log line")
    return None


# ---------------------------------------------------------------------------------------------
# rsync between two host directories


def _timed(argv: Sequence[str]) -> float:
    t0 = time.monotonic()
    host_run(argv, WORKLOAD_TIMEOUT_S)
    return time.monotonic() - t0


def rsync_comparison(sizes: Sizes) -> dict[str, Any]:
    """`rsync -a` between two host dirs: the whole dataset into an empty dir (a full copy), then
    the same 1 % change as the lab's (rsync copies the changed files: local transfers default to
    --whole-file). Neither is followed by a sync: rsync does not flush what it wrote."""
    if shutil.which("rsync") is None:
        raise BenchError("rsync is not installed (apt-get install rsync)")
    src, dst = SCRATCH / "rsync-src", SCRATCH / "rsync-dst"
    host = Host()
    try:
        for d in (src, dst):
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True)
        host.workload(["dataset", "--bytes", str(sizes.reint_bytes)], str(src))
        os.sync()
        full_s = _timed(["rsync", "-a", f"{src}/", f"{dst}/"])
        os.sync()
        changed = host.workload(["change", "--percent", str(sizes.change_percent)], str(src))
        os.sync()
        delta_s = _timed(["rsync", "-a", f"{src}/", f"{dst}/"])
        stats = host_run(["rsync", "-a", "--stats", "--dry-run", f"{src}/", f"{dst}/"], 60)
        pending = re.search(r"Number of regular files transferred: (\d+)", stats)
        if pending is None or pending.group(1) != "0":
            raise BenchError("rsync left differences between the two copies")
        return {"full_s": round(full_s, 3), "delta_s": round(delta_s, 3),
                "dataset_bytes": sizes.reint_bytes, "changed_bytes": changed.bytes,
                "changed_files": changed.ops}
    finally:
        for d in (src, dst):
            shutil.rmtree(d, ignore_errors=True)
        os.sync()


# ---------------------------------------------------------------------------------------------
# Measuring every configuration


# One run of a workload on one configuration; or why that configuration is not available.
Runner = Callable[[Workload], Timing]


def throughput_rounds(sizes: Sizes, runners: dict[str, Runner | str],
                      results: dict[str, Any]) -> None:
    """Each round runs every workload on every configuration, one after the other, so that
    whatever else loads the machine meanwhile weighs on all of them alike; the median over the
    rounds is kept. A configuration that failed once is not run again."""
    runs: dict[tuple[str, str], list[Timing]] = {}
    errors: dict[tuple[str, str], str] = {}
    for r in range(sizes.repeat):
        for w in workloads(sizes):
            for config in CONFIGS:
                key, runner = (w.key, config), runners[config]
                if isinstance(runner, str):
                    errors[key] = runner
                if key in errors:
                    continue
                print(f"  round {r + 1}/{sizes.repeat} {CONFIG_LABELS[config]}: {w.label}",
                      flush=True)
                try:
                    runs.setdefault(key, []).append(runner(w))
                except MirrorhaError as e:
                    print(f"    FAILED: {e}", file=sys.stderr, flush=True)
                    errors[key] = str(e)
    for w in workloads(sizes):
        cell = results["workloads"][w.key]
        for config in CONFIGS:
            key = (w.key, config)
            cell[config] = {"error": errors[key]} if key in errors else summary(w, runs[key])


def pgbench_all(sizes: Sizes, sites: dict[str, PgSite | str], results: dict[str, Any]) -> None:
    for config, site in sites.items():
        print(f"  {CONFIG_LABELS[config]}: pgbench", flush=True)
        if isinstance(site, str):
            results["pgbench"][config] = {"error": site}
        else:
            guarded(results["pgbench"], config, lambda site=site: pgbench(site, sizes))


def guarded(results: dict[str, Any], key: str, fn: Callable[[], dict[str, Any]]) -> None:
    try:
        results[key] = fn()
    except MirrorhaError as e:
        print(f"    FAILED: {e}", file=sys.stderr, flush=True)
        results[key] = {"error": str(e)}


def measure_all(sizes: Sizes, results: dict[str, Any]) -> None:
    """Lab and FUSE mount up, throughput rounds, pgbench, rsync, reintegration; everything
    torn down in the end whatever happened."""
    with contextlib.ExitStack() as stack:
        lab = Lab(prefix=PREFIX, settings=LAB_SETTINGS)
        stack.callback(stop_lab, lab)
        repl: Runner | str
        print("lab up (pulse 100 ms, timeout 600 ms): node1 PRIM, node2 SECOND", flush=True)
        try:
            lab.up()
            wait_pair(lab)
            repl = lambda w: replicated_run(lab, w, sizes)  # noqa: E731
        except MirrorhaError as e:
            print(f"  lab FAILED: {e}", file=sys.stderr, flush=True)
            repl = results["lab"]["error"] = f"lab: {e}"
        # Mounted after the lab's nodes exist: they must not get a copy of it (and cannot: it
        # lives in a mount namespace of its own).
        fuse_dir = SCRATCH / "fuse"
        fuse: Runner | str
        try:
            fuse_place = stack.enter_context(fuse_mount(fuse_dir))
            fuse = lambda w: one_run(fuse_place, w, sizes, f"{fuse_dir}/work")  # noqa: E731
        except MirrorhaError as e:
            fuse = f"FUSE mount: {e}"
        host = Host()
        runners: dict[str, Runner | str] = {
            "local": lambda w: one_run(host, w, sizes, f"{SCRATCH}/local"),
            "fuse": fuse,
            "ceiling": lambda w: ceiling_run(w, sizes),
            "replicated": repl,
        }
        print("throughput", flush=True)
        throughput_rounds(sizes, runners, results)
        if "skipped" not in results["pgbench"]:
            sites: dict[str, PgSite | str] = {
                "local": PgSite(host, f"{SCRATCH}/local/pgdata", f"{SCRATCH}/pg-local"),
                "fuse": fuse if isinstance(fuse, str) else PgSite(
                    fuse_place, f"{fuse_dir}/pgdata", f"{SCRATCH}/pg-fuse"),
                "replicated": repl if isinstance(repl, str) else PgSite(
                    Node(lab, "node1"), f"{DATA_DIR}/pgdata", f"{SCRATCH}/pg-repl"),
            }
            print("pgbench", flush=True)
            pgbench_all(sizes, sites, results)
        print("reintegration: rsync -a (full copy, the change), then node2 back after the "
              "change", flush=True)
        guarded(results, "rsync", lambda: rsync_comparison(sizes))
        if isinstance(repl, str):
            results["reintegration"] = {"error": repl}
        else:
            guarded(results, "reintegration", lambda: reintegration(lab, sizes))


# ---------------------------------------------------------------------------------------------
# Output


def _rate(cell: dict[str, Any] | None) -> float | None:
    return cell.get("rate") if cell else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _fmt(value: float | None, width: int, digits: int = 1) -> str:
    return f"{value:>{width}.{digits}f}" if value is not None else f"{'-':>{width}}"


def _pct(value: float | None, width: int = 6) -> str:
    return f"{value * 100:>{width - 2}.0f} %" if value is not None else f"{'-':>{width}}"


def table(results: dict[str, Any]) -> str:
    head = (f"{'workload':<42} {'unit':>7} " + " ".join(f"{CONFIG_LABELS[c]:>10}" for c in CONFIGS)
            + f" {'b/a':>6} {'d/c':>6} {'d/a':>6}")
    lines = [head, "-" * len(head)]
    for cell in results["workloads"].values():
        rates = {c: _rate(cell.get(c)) for c in CONFIGS}
        lines.append(
            f"{cell['label']:<42} {cell['unit']:>7} "
            + " ".join(_fmt(rates[c], 10) for c in CONFIGS)
            + f" {_pct(_ratio(rates['fuse'], rates['local']))}"
            f" {_pct(_ratio(rates['replicated'], rates['ceiling']))}"
            f" {_pct(_ratio(rates['replicated'], rates['local']))}")
    pg = results["pgbench"]
    if "skipped" in pg:
        lines.append(f"{'pgbench':<42} skipped: {pg['skipped']}")
    else:
        tps = {c: (pg.get(c) or {}).get("tps") for c in CONFIGS}
        sizes = results["sizes"]
        label = f"pgbench -s {sizes['pg_scale']} -c {sizes['pg_clients']} -T {sizes['pg_seconds']}"
        lines.append(
            f"{label:<42} {'TPS':>7} " + " ".join(_fmt(tps[c], 10) for c in CONFIGS)
            + f" {_pct(_ratio(tps['fuse'], tps['local']))} {'':>6}"
            f" {_pct(_ratio(tps['replicated'], tps['local']))}")
    for name, cells in (("workload", results["workloads"]), ("pgbench", {"": pg})):
        for key, cell in cells.items():
            for config, value in cell.items():
                if isinstance(value, dict) and "error" in value:
                    lines.append(f"  {name} {key} {config} FAILED: {value['error']}")
    lines += spread_lines(results)
    lines += reintegration_lines(results)
    return "\n".join(lines)


def spread_lines(results: dict[str, Any]) -> list[str]:
    """The widest spread between rounds: how far to trust one cell on a shared machine."""
    widest: tuple[float, str] | None = None
    for cell in results["workloads"].values():
        for config in CONFIGS:
            value = cell.get(config) or {}
            if len(value.get("runs", ())) > 1 and value["min"] > 0:
                spread = value["max"] / value["min"]
                text = (f"{cell['label']}, {CONFIG_LABELS[config]}: {value['min']:.0f} to "
                        f"{value['max']:.0f} {cell['unit']}")
                if widest is None or spread > widest[0]:
                    widest = (spread, text)
    if widest is None:
        return []
    return [f"widest spread between rounds (x{widest[0]:.1f}): {widest[1]}; every run is in "
            f"{RESULTS.name}"]


def reintegration_lines(results: dict[str, Any]) -> list[str]:
    reint, rsync = results.get("reintegration") or {}, results.get("rsync") or {}
    lines = [""]
    if "error" in reint or not reint:
        lines.append(f"reintegration: FAILED: {reint.get('error', 'not measured')}")
    else:
        lines.append(
            f"reintegration, {reint['changed_bytes'] / MIB:.1f} MiB changed "
            f"({reint['changed_files']} of 200 files) in {reint['dataset_bytes'] / MIB:.0f} MiB "
            f"while node2 was down: resync {_fmt(reint['resync_s'], 0, 2)} s for "
            f"{(reint['resync_bytes'] or 0) / MIB:.1f} MiB sent, {reint['method']}; "
            f"node2 boot -> SECOND in sync {reint['boot_to_in_sync_s']:.2f} s")
    if "error" in rsync or not rsync:
        lines.append(f"rsync -a: FAILED: {rsync.get('error', 'not measured')}")
    else:
        lines.append(f"rsync -a between two host dirs: the same change {rsync['delta_s']:.2f} s, "
                     f"a full copy {rsync['full_s']:.2f} s (no sync after either)")
    return lines


def target_lines(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Every target of the issue: the measured ratio, its threshold, met or not."""
    wl = results["workloads"]

    def rate(key: str, config: str) -> float | None:
        return _rate((wl.get(key) or {}).get(config))

    pg = results["pgbench"]
    reint, rsync = results.get("reintegration") or {}, results.get("rsync") or {}
    reint_s = reint.get("resync_s")
    rows = [
        ("(b) FUSE-only vs (a) local, sequential", rate("seq", "fuse"), rate("seq", "local"),
         TARGET_FUSE_SEQ, True),
        ("(d) replicated vs (c) ceiling, sequential", rate("seq", "replicated"),
         rate("seq", "ceiling"), TARGET_REPL_SEQ, True),
        ("(d) replicated vs (c) ceiling, 4 KiB fsync", rate("fsync", "replicated"),
         rate("fsync", "ceiling"), TARGET_REPL_FSYNC, True),
        ("reintegration of 1 % vs rsync -a of the change", reint_s, rsync.get("delta_s"),
         TARGET_REINT_VS_DELTA, False),
        ("reintegration of 1 % vs a full rsync -a copy", reint_s, rsync.get("full_s"),
         TARGET_REINT_VS_FULL, False),
        ("pgbench TPS, (d) replicated vs (a) local", (pg.get("replicated") or {}).get("tps"),
         (pg.get("local") or {}).get("tps"), TARGET_PG, True),
    ]
    targets = []
    for what, value, reference, threshold, at_least in rows:
        ratio = _ratio(value, reference)
        met = None if ratio is None else (ratio >= threshold if at_least else ratio <= threshold)
        targets.append({"target": what, "ratio": None if ratio is None else round(ratio, 4),
                        "at_least": at_least, "threshold": threshold, "met": met})
    return targets


def verdict_text(targets: Sequence[dict[str, Any]]) -> list[str]:
    lines = []
    for t in targets:
        status = {True: "met", False: "not met", None: "not measured"}[t["met"]]
        ratio = f"{t['ratio'] * 100:.0f} %" if t["ratio"] is not None else "-"
        bound = f"{'>=' if t['at_least'] else '<='} {t['threshold'] * 100:.0f} %"
        lines.append(f"  {t['target']:<48} {ratio:>7}  target {bound:<7} {status}")
    return lines


def host_info() -> dict[str, Any]:
    def version(argv: list[str]) -> str | None:
        with contextlib.suppress(OSError, IndexError, subprocess.SubprocessError):
            return subprocess.run(argv, capture_output=True, text=True).stdout.splitlines()[0]
        return None

    st = os.statvfs(SCRATCH.parent)
    return {
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "filesystem_free_gib": round(st.f_bavail * st.f_frsize / (1 << 30), 1),
        "rsync": version(["rsync", "--version"]),
        "postgres": version([str(PGBIN / "postgres"), "--version"]),
        "other_labs_running_at_start": sorted(
            p.stem for p in Path("/run/mirrorha-lab").glob("*.json") if p.stem != PREFIX),
    }




# ---------------------------------------------------------------------------------------------
# Command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.replication",
        description="Throughput of local disk, the FUSE mount, the two-copy ceiling and "
        "mirrorha replication; reintegration time against rsync; pgbench TPS. Needs root.")
    parser.add_argument("--quick", action="store_true",
                        help="128 MiB, 1000 fsyncs, 1000 files, pgbench 10 s, one round")
    parser.add_argument("--seq-mib", type=int, help="sequential workload size (default 1024)")
    parser.add_argument("--fsync-count", type=int, help="4 KiB fsync writes (default 5000)")
    parser.add_argument("--files", type=int, help="small files created (default 10000)")
    parser.add_argument("--reint-mib", type=int, help="reintegration dataset (default 1024)")
    parser.add_argument("--pg-seconds", type=int, help="pgbench duration (default 30)")
    parser.add_argument("--no-pgbench", action="store_true", help="leave pgbench out")
    parser.add_argument("--repeat", type=int,
                        help="rounds of the throughput workloads, median kept (default 3; "
                        "--quick: 1)")
    return parser


def sizes_from(args: argparse.Namespace) -> Sizes:
    base = QUICK if args.quick else FULL
    sizes = replace(
        base,
        seq_bytes=args.seq_mib * SEQ_BLOCK if args.seq_mib else base.seq_bytes,
        fsync_count=args.fsync_count or base.fsync_count,
        files_count=args.files or base.files_count,
        reint_bytes=args.reint_mib * SEQ_BLOCK if args.reint_mib else base.reint_bytes,
        pg_seconds=args.pg_seconds or base.pg_seconds,
        pgbench=base.pgbench and not args.no_pgbench,
        repeat=args.repeat or base.repeat,
    )
    if min(sizes.seq_bytes, sizes.fsync_count, sizes.files_count, sizes.reint_bytes,
           sizes.pg_seconds, sizes.repeat) < 1:
        raise BenchError("sizes, counts, durations and --repeat must be positive")
    return sizes


def run(sizes: Sizes) -> int:
    results: dict[str, Any] = {
        "started": datetime.now().isoformat(timespec="seconds"),
        "sizes": asdict(sizes),
        "lab": {"prefix": PREFIX, "pulse_ms": LAB_SETTINGS.pulse_ms,
                "timeout_ms": LAB_SETTINGS.timeout_ms, "replicated_dir": DATA_DIR},
        "workloads": {w.key: {"label": w.label, "unit": w.unit} for w in workloads(sizes)},
        "pgbench": {},
    }
    if not sizes.pgbench:
        results["pgbench"]["skipped"] = "--no-pgbench"
    elif (why := pgbench_unavailable()) is not None:
        results["pgbench"]["skipped"] = why
    shutil.rmtree(SCRATCH, ignore_errors=True)
    SCRATCH.mkdir(parents=True)
    results["host"] = host_info()
    t0 = time.monotonic()
    try:
        measure_all(sizes, results)
    finally:
        shutil.rmtree(SCRATCH, ignore_errors=True)
    results["elapsed_s"] = round(time.monotonic() - t0, 1)
    results["targets"] = target_lines(results)
    results["finished"] = datetime.now().isoformat(timespec="seconds")
    write_json(RESULTS, results)
    print()
    print(f"Throughput, median of {sizes.repeat} round(s); b/a FUSE-only vs local, d/c "
          f"replicated vs two-copy ceiling, d/a replicated vs local ({os.cpu_count()} CPUs, "
          f"one disk, {results['elapsed_s']:g} s in all)")
    print(table(results))
    print("targets:")
    print("\n".join(verdict_text(results["targets"])))
    print(f"results: {RESULTS}")
    failed = "error" in results["lab"] or any(
        isinstance(v, dict) and "error" in v
        for cell in [*results["workloads"].values(), results["pgbench"],
                     {"r": results.get("rsync"), "i": results.get("reintegration")}]
        for v in cell.values())
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return run_bench("bench.replication", "FUSE mounts, the lab's namespaces",
                     lambda: sizes_from(args), run, "the lab and scratch files were removed")


if __name__ == "__main__":
    sys.exit(main())
