"""The FUSE hot path in isolation: local disk vs the mount child, without a lab.

    python -m bench.fuse_hotpath [--rounds N] [--tree NAME=DIR ...] [--configs fuse,sink]

Configurations, all on the file system of /var/tmp:

- local        a plain directory
- fuse:NAME    a mount child with no --control (nothing replicated), from source tree NAME
- inproc:NAME  the mount served in a process's own trio loop with a sink that accepts every op
               at once (as the daemon serves the first replicated dir: no socket hop, and a
               sink that needs the loop to send)
- sink:NAME    a mount child whose control socket goes to a stand-in daemon (this module's
               `fake-daemon`: fusefs.MountChannel over a sink that accepts every op at once),
               i.e. the child, the framing both ways and the daemon's MountChannel, no TLS

NAME is "work" (this checkout) or one given with --tree NAME=DIR (e.g. a `git archive` of an
older commit), so that before/after run in the same rounds and the machine's noise hits both.
Each round runs every workload on every configuration; the medians of the rounds and the
ratio to local of each round (median) are printed, and written as JSON with --json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SCRATCH = Path("/var/tmp/mirrorha-fuse-hotpath")
CHILD_PIDS: dict[Path, int] = {}
PGBENCH = "pgbench"
WORKLOADS = {
    "fsync": lambda n: ["fsync", "--count", str(n["fsync"])],
    "files": lambda n: ["files", "--count", str(n["files"])],
    "seq": lambda n: ["seq", "--bytes", str(n["seq"])],
}


def _env(tree: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(tree)}


def _mount_type(pid: int, directory: Path) -> str | None:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
            before, _, after = line.partition(" - ")
            if before.split()[4] == str(directory):
                return after.split()[0]
    return None


@contextlib.contextmanager
def mount_child(tree: Path, directory: Path, control: Path | None,
                extra: Sequence[str] = ()) -> Iterator[list[str]]:
    """A mount child of `tree` over `directory` in a private mount namespace; yields the prefix
    entering that namespace."""
    directory.mkdir(parents=True, exist_ok=True)
    server = ["appliance.replication.fusefs", "--root-index", "0"]
    if control == INPROC:
        server, control = ["bench.fuse_hotpath", "inproc-mount"], None
        _copy_into(tree)
    argv = ["unshare", "--mount", "--propagation", "private", "--", sys.executable, "-m",
            *server, "--dir", str(directory),
            *(["--control", str(control)] if control else []), *extra]
    log = (SCRATCH / f"{directory.parent.name}.log").open("ab")
    child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                             cwd=tree, env=_env(tree))
    try:
        deadline = time.monotonic() + 15
        while _mount_type(child.pid, directory) != "fuse.mirrorha":
            if child.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mount child for {directory} did not come up")
            time.sleep(0.05)
        CHILD_PIDS[directory] = child.pid
        yield ["nsenter", "-t", str(child.pid), "-m", "--"]
    finally:
        child.terminate()
        try:
            child.wait(timeout=15)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        log.close()


@contextlib.contextmanager
def fake_daemon(tree: Path, socket: Path) -> Iterator[None]:
    with contextlib.suppress(FileNotFoundError):
        socket.unlink()
    _copy_into(tree)  # the stand-in runs from `tree` too (its MountChannel)
    proc = subprocess.Popen([sys.executable, "-m", "bench.fuse_hotpath", "fake-daemon",
                             "--socket", str(socket)], cwd=tree, env=_env(tree))
    try:
        deadline = time.monotonic() + 10
        while not socket.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("fake daemon did not start")
            time.sleep(0.05)
        yield
    finally:
        proc.terminate()
        proc.wait(timeout=10)


INPROC = Path("in-process")


def _copy_into(tree: Path) -> None:
    if tree != ROOT:
        shutil.copy(Path(__file__), tree / "bench" / "fuse_hotpath.py")


def run_inproc_mount(directory: Path) -> None:
    import signal

    from appliance.replication.fusefs import ReplicatedFs, mount_in_thread, prepare_backing

    class Accept:
        async def submit(self, op: Any) -> None:
            return None

    fd = prepare_backing(directory)
    with mount_in_thread(directory, ReplicatedFs(0, fd, Accept(), False)):
        signal.sigwait({signal.SIGTERM, signal.SIGINT})


def run_fake_daemon(socket: Path) -> None:
    import trio

    from appliance.replication.fusefs import MountChannel

    class Accept:
        async def submit(self, op: Any) -> None:
            return None

    async def serve(stream: trio.SocketStream) -> None:
        with contextlib.suppress(Exception):
            await MountChannel(stream, Accept()).run()

    async def main() -> None:
        listener = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        await listener.bind(str(socket))
        listener.listen(8)
        await trio.serve_listeners(serve, [trio.SocketListener(listener)])

    trio.run(main)


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU time of process `pid` and its threads so far (0 without a pid)."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def workload(enter: Sequence[str], args: Sequence[str], directory: Path) -> dict[str, Any]:
    subprocess.run([*enter, "sh", "-c", f"rm -rf '{directory}' && mkdir -p '{directory}'"],
                   check=True)
    os.sync()
    pid = CHILD_PIDS.get(directory.parent)
    argv = [*enter, sys.executable, "-m", "bench.workloads", *args, "--dir", str(directory)]
    cpu = cpu_seconds(pid)
    out = subprocess.run(argv, check=True, capture_output=True, text=True, cwd=ROOT,
                         env=_env(ROOT)).stdout
    cpu = cpu_seconds(pid) - cpu
    subprocess.run([*enter, "rm", "-rf", str(directory)], check=True)
    timing = json.loads(out.strip().splitlines()[-1])
    seconds = timing["end"] - timing["start"]
    if args[0] == "seq":
        return {"rate": timing["bytes"] / (1 << 20) / seconds, "unit": "MiB/s",
                "cpu_us": cpu / (timing["bytes"] / (1 << 20)) * 1e6}  # child CPU per MiB
    return {"rate": timing["ops"] / seconds, "unit": "ops/s",
            "cpu_us": cpu / timing["ops"] * 1e6}  # child CPU per op


def pgbench(enter: Sequence[str], directory: Path, seconds: int) -> dict[str, Any]:
    """bench/replication's pgbench (initdb, pgbench -i -s 5, then -c 4 for `seconds`) with its
    data directory in `directory`; child CPU per transaction."""
    from bench.replication import QUICK, PgSite
    from bench.replication import pgbench as run_pgbench

    class Place:
        def sh(self, script: str, timeout: float = 120.0) -> str:
            return subprocess.run([*enter, "sh", "-c", script], check=True, text=True,
                                  capture_output=True, timeout=timeout).stdout

    subprocess.run([*enter, "mkdir", "-p", str(directory)], check=True)
    run = SCRATCH / f"pg-{directory.parent.parent.name}"
    pid = CHILD_PIDS.get(directory.parent)
    cpu = cpu_seconds(pid)
    start = time.monotonic()
    got = run_pgbench(PgSite(Place(), f"{directory}/pgdata", str(run)),  # type: ignore[arg-type]
                      replace(QUICK, pg_seconds=seconds))
    cpu = cpu_seconds(pid) - cpu
    subprocess.run([*enter, "rm", "-rf", str(directory)], check=True)
    # CPU of the whole initdb + load + run, per transaction of the timed part: a rough gauge
    return {"rate": got["tps"], "unit": "TPS",
            "cpu_us": cpu / max(1.0, got["tps"] * seconds) * 1e6,
            "wall": time.monotonic() - start}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fuse_hotpath")
    parser.add_argument("command", nargs="?", default="bench", choices=("bench", "fake-daemon",
                                                                 "inproc-mount"))
    parser.add_argument("--dir", type=Path)
    parser.add_argument("--socket", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tree", action="append", default=[], help="NAME=DIR")
    parser.add_argument("--configs", default="fuse,sink", help="kinds: fuse, sink, inproc")
    parser.add_argument("--workloads", default="fsync,files,seq")
    parser.add_argument("--fsync", type=int, default=2000)
    parser.add_argument("--files", type=int, default=3000)
    parser.add_argument("--seq", type=int, default=256 << 20)
    parser.add_argument("--child-arg", action="append", default=[])
    parser.add_argument("--pgbench", type=int, default=0, metavar="SECONDS",
                        help="also pgbench (scale 5, 4 clients) for this long per run")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.command == "inproc-mount":
        import signal
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
        run_inproc_mount(args.dir)
        return 0
    if args.command == "fake-daemon":
        run_fake_daemon(args.socket)
        return 0
    trees = {"work": ROOT} | {k: Path(v) for k, v in (t.split("=", 1) for t in args.tree)}
    sizes = {"fsync": args.fsync, "files": args.files, "seq": args.seq}
    names = args.workloads.split(",") + ([PGBENCH] if args.pgbench else [])
    shutil.rmtree(SCRATCH, ignore_errors=True)
    SCRATCH.mkdir(parents=True)
    configs: dict[str, list[str]] = {"local": []}
    results: dict[str, dict[str, list[float]]] = {}
    cpus: dict[str, dict[str, list[float]]] = {}
    with contextlib.ExitStack() as stack:
        for name, tree in trees.items():
            for kind in args.configs.split(","):
                key = f"{kind}:{name}"
                control = None
                if kind == "sink":
                    control = SCRATCH / f"{kind}-{name}.sock"
                    stack.enter_context(fake_daemon(tree, control))
                elif kind == "inproc":
                    control = INPROC
                configs[key] = stack.enter_context(
                    mount_child(tree, SCRATCH / f"{kind}-{name}" / "mnt", control,
                                args.child_arg))
        for r in range(args.rounds):
            for w in names:
                for key, enter in configs.items():
                    where = (SCRATCH / "local" if key == "local"
                             else SCRATCH / key.replace(":", "-") / "mnt") / "work"
                    got = (pgbench(enter, where, args.pgbench) if w == PGBENCH
                           else workload(enter, WORKLOADS[w](sizes), where))
                    results.setdefault(w, {}).setdefault(key, []).append(got["rate"])
                    cpus.setdefault(w, {}).setdefault(key, []).append(got["cpu_us"])
                    print(f"round {r} {w:6} {key:12} {got['rate']:10.1f} "
                          f"child CPU {got['cpu_us']:8.1f} us", flush=True)
    print()
    print(f"{'workload':8} {'config':14} {'median':>10} {'min':>10} {'max':>10} {'/local':>7} "
          f"{'child CPU us/op (seq: /MiB)':>28}")
    summary: dict[str, Any] = {}
    for w, by in results.items():
        for key, rates in by.items():
            ratios = [a / b for a, b in zip(rates, by["local"], strict=True)]
            ratio = statistics.median(ratios)
            cpu = statistics.median(cpus[w][key])
            summary.setdefault(w, {})[key] = {"median": statistics.median(rates), "runs": rates,
                                             "ratio_to_local": ratio, "child_cpu_us": cpu}
            print(f"{w:8} {key:14} {statistics.median(rates):10.1f} {min(rates):10.1f} "
                  f"{max(rates):10.1f} {ratio:6.0%} {cpu:28.1f}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
