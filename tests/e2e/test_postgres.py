"""PostgreSQL 15 on a replicated directory: a failover loses no committed transaction.

The Debian package's server runs on the primary with its data directory inside the replicated
dir, started and stopped by bin/start_prim and bin/stop_prim. Two kinds of clients write through
the VIP from the client namespace: pg_client.py inserts increasing ids one transaction at a time
and records each id once its COMMIT returned; pgbench (4 connections) upserts one counter per
connection and logs every transaction it saw complete. The primary is crashed mid-load (every
process SIGKILLed, links down) three times, alternating nodes; after each failover every
recorded transaction must be in the new primary's database, which must have gone through a
clean crash recovery (and pass amcheck), and PostgreSQL must never run on both nodes at once.
The crashed node then returns, is fully resynchronised, and becomes the next victim.

Per crash: committed / present / missing, takeover and resync times, printed (pytest -s) and in
test-artifacts/<test>/clients/rounds.json with the clients' files and the PostgreSQL logs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import itertools
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from appliance.lab import NETNS_DIR, Lab, LabSettings
from appliance.waiting import wait_until
from tests.e2e.conftest import ARTIFACTS, Cluster, DualRunMonitor, keep_logs

PGBIN = Path("/usr/lib/postgresql/15/bin")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root (network namespaces)"),
    pytest.mark.skipif(not (PGBIN / "postgres").exists(),
                       reason="PostgreSQL 15 is not installed (apt-get install postgresql-15)"),
    pytest.mark.timeout(300),
]

PREFIX = "mhpg"
DATA_DIR = "/srv/mirrorha-pg"  # the replicated dir; PostgreSQL's data directory is inside
PGDATA = f"{DATA_DIR}/pgdata"
SETTINGS = dataclasses.replace(
    LabSettings(), replicated_dirs=(DATA_DIR,), errd_proc="postgres",
    # start_prim's budget too: a crash recovery, or the first start's initdb, takes seconds.
    nicestoptimeout_s=30, forcestoptimeout_s=10)
# tcp_user_timeout: a statement sent to a primary that then crashed fails within 2 s instead
# of waiting on TCP retransmissions (the server's kernel acks data at once, however slow the
# commit, so a slow commit never trips it).
CONNINFO = (f"host={Lab.VIP} port=5432 user=postgres dbname=postgres connect_timeout=2 "
            "tcp_user_timeout=2000")
CRASHES = ("node1", "node2", "node1")  # each victim is the primary of its round
COMMITS_BEFORE_CRASH = 200  # by the recording client, in each round
COMMITS_AFTER_FAILOVER = 20  # the new primary serves: proof enough before checking
PGBENCH_CLIENTS = 4


# ---------------------------------------------------------------------------------------------
# The application scripts (identical on both nodes, as the console would deploy them)


def start_prim_script() -> str:
    return f"""#!/bin/sh
# Starts PostgreSQL 15 with its data directory in the replicated dir {DATA_DIR}.
safekit() {{ if [ -x "$SAFE/safekit" ]; then "$SAFE/safekit" "$@"; fi; }}
echo "Running start_prim $*"

PGBIN={PGBIN}
DATA={PGDATA}
# Per node, outside the replicated dir (read-only on the SECOND, and node-specific): the unix
# socket and PostgreSQL's own log.
HOME_DIR="${{MIRRORHA_HOME:-/var/lib/mirrorha}}"
RUN="$HOME_DIR/pgrun"
LOG="$HOME_DIR/mirror/log/postgresql.log"
as_postgres() {{ runuser -u postgres -- "$@"; }}

mkdir -p "$RUN" && touch "$LOG" && chown postgres:postgres "$RUN" "$LOG" || exit 1
cd "$RUN" || exit 1

if [ ! -f "$DATA/PG_VERSION" ]; then
  # First start: initdb into a scratch directory renamed once complete, so that a crash in
  # the middle never leaves a half-made cluster that looks like a real one.
  rm -rf "$DATA.new"
  mkdir -m 700 "$DATA.new" && chown postgres:postgres "$DATA.new" || exit 1
  as_postgres "$PGBIN/initdb" -D "$DATA.new" -U postgres --auth=trust -E UTF8 --no-locale \\
    || {{ safekit printe "initdb failed"; exit 1; }}
  echo "host all all 198.51.100.0/24 trust" >> "$DATA.new/pg_hba.conf"
  cat >> "$DATA.new/postgresql.conf" <<EOF
listen_addresses = '*'
fsync = on
synchronous_commit = on
full_page_writes = on
# System V segments live in the node's IPC namespace and vanish with a crashed node; POSIX
# ones would be left in /dev/shm, which the lab's nodes share with the host.
dynamic_shared_memory_type = sysv
EOF
  mv "$DATA.new" "$DATA" || exit 1
  safekit printi "PostgreSQL cluster created in $DATA"
fi

# The module starts the application only where it does not run: a postmaster.pid found now was
# left by a primary that crashed, and names a process of another machine.
if ! pgrep -x postgres > /dev/null; then
  rm -f "$DATA/postmaster.pid"
fi

as_postgres "$PGBIN/pg_ctl" -D "$DATA" -l "$LOG" -w -t 60 \\
  -o "-c unix_socket_directories=$RUN" start
res=$?
if [ $res -ne 0 ] ; then
  safekit printe "PostgreSQL did not start (see $LOG)"
else
  safekit printi "PostgreSQL started"
fi
exit $res
"""


def stop_prim_script() -> str:
    return f"""#!/bin/sh
# Stops PostgreSQL; "force": immediate shutdown (crash-like, recovered at the next start).
safekit() {{ if [ -x "$SAFE/safekit" ]; then "$SAFE/safekit" "$@"; fi; }}
echo "Running stop_prim $*"

PGBIN={PGBIN}
DATA={PGDATA}
as_postgres() {{ runuser -u postgres -- "$@"; }}

pgrep -x postgres > /dev/null || exit 0

if [ "$1" = "force" ] ; then
  as_postgres "$PGBIN/pg_ctl" -D "$DATA" -m immediate -w -t 5 stop
  # pg_ctl starts the server in its own session, out of reach of the module's own leftover
  # kill: whatever is still there goes now.
  pkill -9 -x postgres
  exit 0
fi

as_postgres "$PGBIN/pg_ctl" -D "$DATA" -m fast -w -t 20 stop
res=$?
[ $res -ne 0 ] && safekit printe "stop_prim: pg_ctl stop failed"
exit $res
"""


# pgbench's transaction: one counter per (round, connection), so that the number of
# transactions pgbench logged as done can be compared with what the database holds.
PGBENCH_SCRIPT = """\
INSERT INTO pgb (k, n) VALUES (:round * 1000 + :client_id, 1)
  ON CONFLICT (k) DO UPDATE SET n = pgb.n + 1;
"""

SCHEMA = """
CREATE TABLE t (id bigint PRIMARY KEY);
CREATE TABLE pgb (k int PRIMARY KEY, n bigint NOT NULL);
CREATE EXTENSION amcheck;
"""


# ---------------------------------------------------------------------------------------------
# Clients in the client namespace


def client_popen(lab: Lab, argv: list[str], stdout: Path, stderr: Path) -> subprocess.Popen[bytes]:
    """A long-running process in the client's network namespace (lab.client_run waits)."""
    cmd = ["nsenter", f"--net={NETNS_DIR / lab.netns('client')}", "--", *argv]
    with stdout.open("ab") as out, stderr.open("ab") as err:
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                start_new_session=True)


def stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


def complete_lines(path: Path) -> list[str]:
    """The lines written so far, without a last one still being written."""
    try:
        return [ln for ln in path.read_text().split("\n")[:-1] if ln]
    except FileNotFoundError:
        return []


class RecordingClient:
    """pg_client.py: its committed ids (with the monotonic time each COMMIT returned) and the
    ids whose INSERT failed, so may or may not have committed."""

    def __init__(self, lab: Lab, outdir: Path) -> None:
        self.outdir = outdir
        script = Path(__file__).with_name("pg_client.py")
        self.process = client_popen(
            lab, [str(lab.python), str(script), CONNINFO, str(outdir), "600"],
            outdir / "client.out", outdir / "client.err")

    def committed(self) -> dict[int, float]:
        self._check_running()
        pairs = (line.split() for line in complete_lines(self.outdir / "committed"))
        return {int(i): float(t) for i, t in pairs}

    def uncertain(self) -> set[int]:
        return {int(line) for line in complete_lines(self.outdir / "uncertain")}

    def _check_running(self) -> None:
        if self.process.poll() is not None:
            err = (self.outdir / "client.err").read_text(errors="replace").strip()
            raise AssertionError(f"the recording client exited ({self.process.returncode}): "
                                 f"{err[-1000:]}")

    def stop(self) -> None:
        stop_process(self.process)


class PgbenchRun:
    """One pgbench run through the VIP; it ends by itself when the crash breaks its
    connections. Its per-transaction log (-l) lists every transaction that completed."""

    def __init__(self, lab: Lab, outdir: Path, round_no: int) -> None:
        self.round_no = round_no
        self.prefix = outdir / f"pgbench-r{round_no}-tx"  # its log: PREFIX.<pgbench's pid>
        script = outdir / "pgbench.sql"
        script.write_text(PGBENCH_SCRIPT)
        argv = [str(PGBIN / "pgbench"), "-n", "-c", str(PGBENCH_CLIENTS), "-j", "1", "-T", "600",
                "-f", str(script), "-D", f"round={round_no}", "-l",
                f"--log-prefix={self.prefix}", CONNINFO]
        self.process = client_popen(lab, argv, outdir / f"pgbench-r{round_no}.out",
                                    outdir / f"pgbench-r{round_no}.err")

    def wait_all_clients_committed(self, c: Cluster) -> None:
        """Every pgbench connection has committed (its log is only readable once it ends)."""
        sql = (f"SELECT count(*) FROM pgb WHERE k / 1000 = {self.round_no} AND n > 0")

        def all_in() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"pgbench of round {self.round_no} exited early")
            return psql(c, sql) == [str(PGBENCH_CLIENTS)]
        wait_until(all_in, 30, f"every pgbench connection of round {self.round_no} to commit")

    def wait_end(self, timeout: float) -> None:
        wait_until(lambda: self.process.poll() is not None, timeout,
                   f"pgbench of round {self.round_no} to end after the crash")

    def done_per_key(self) -> dict[int, int]:
        """Transactions pgbench saw complete, per counter key (round * 1000 + client id)."""
        done = {self.round_no * 1000 + c: 0 for c in range(PGBENCH_CLIENTS)}
        for log in self.prefix.parent.glob(f"{self.prefix.name}.[0-9]*"):
            for line in complete_lines(log):
                client = int(line.split()[0])
                done[self.round_no * 1000 + client] += 1
        return done

    def stop(self) -> None:
        stop_process(self.process)


# ---------------------------------------------------------------------------------------------
# The cluster


def psql(c: Cluster, sql: str, timeout: float = 30) -> list[str]:
    """Run SQL through the VIP from the client; the rows, one string each (-A -t)."""
    argv = [str(PGBIN / "psql"), "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql, CONNINFO]
    return c.lab.client_run(argv, timeout=timeout).stdout.splitlines()


def pg_log(c: Cluster, node: str) -> str:
    path = c.lab.node_paths(node).log_dir / "postgresql.log"
    return path.read_text(errors="replace") if path.exists() else ""


def install_postgres_scripts(lab: Lab) -> None:
    for node in Lab.NODES:
        bin_dir = lab.node_paths(node).bin_dir
        for name, text in (("start_prim", start_prim_script()),
                           ("stop_prim", stop_prim_script())):
            (bin_dir / name).write_text(text)
            (bin_dir / name).chmod(0o755)


@pytest.fixture
def pg_cluster(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    if importlib.util.find_spec("psycopg") is None:  # not a skip: this is an acceptance test
        pytest.fail("psycopg is not installed: the recording client needs it "
                    "(pip install -e '.[dev]')")
    lab = Lab(prefix=PREFIX, settings=SETTINGS)
    try:
        lab.up(start_nodes=False)
        install_postgres_scripts(lab)
        c = Cluster(lab)
        with DualRunMonitor(lab, interval=0.05, comm="postgres") as monitor:
            # node1 alone first: it creates the database cluster (initdb), then node2 joins
            # and gets it by a full resync.
            lab.start_node("node1")
            c.wait_state("node1", "ALONE", timeout=60)
            lab.start_node("node2")
            c.wait_pair("node1", "node2", timeout=60)
            yield c
        assert monitor.samples > 0, "the dual-run monitor never sampled"
        assert not monitor.violations, (
            f"PostgreSQL ran on both nodes at once ({len(monitor.violations)} samples): "
            f"{monitor.violations[:3]}")
    finally:
        keep_logs(lab, request.node.name)
        clients = lab.labdir / "clients"
        if clients.is_dir():
            shutil.copytree(clients, ARTIFACTS / request.node.name / "clients",
                            dirs_exist_ok=True)
        lab.down()
        # A full resync on a node first tries to set the old copy aside in a sibling of the
        # replicated dir, on the host's /srv here; the empty directory it leaves goes too.
        with contextlib.suppress(OSError):
            os.rmdir(f"{DATA_DIR}.mirrorha-aside")


# ---------------------------------------------------------------------------------------------
# One round: load, crash, failover, verification, return of the crashed node


@dataclass(frozen=True)
class RoundResult:
    victim: str
    committed: int  # ids the recording client saw committed so far (all rounds)
    present: int  # of those, found on the new primary
    missing: int
    missing_ids: list[int]  # the first ones
    uncertain_present: int  # failed INSERTs that had committed anyway (allowed; all rounds)
    pgbench_done: int  # transactions pgbench logged as done in this round
    pgbench_missing: dict[int, int]  # counter key -> transactions lost
    takeover_s: float  # crash -> the survivor reports ALONE, PostgreSQL recovered and started
    client_outage_s: float  # longest pause between two COMMITs seen by the client
    resync_s: float  # restart of the victim -> PRIM/SECOND in sync again


def other(node: str) -> str:
    return "node2" if node == "node1" else "node1"


def read_database(c: Cluster, client: RecordingClient
                  ) -> tuple[dict[int, float], set[int], dict[int, int]]:
    """(ids recorded as committed, ids in the table, pgbench counters). The recorded ids are
    read BEFORE the query: each of them committed before the query began."""
    recorded = client.committed()
    present = {int(x) for x in psql(c, "SELECT id FROM t")}
    rows = (row.split("|") for row in psql(c, "SELECT k, n FROM pgb"))
    return recorded, present, {int(k): int(n) for k, n in rows}


def check_amcheck(c: Cluster) -> None:
    """Structural checks of the recovered database: heap pages, and indexes against the heap."""
    rows = psql(c, "SELECT bt_index_check('t_pkey', true), bt_index_check('pgb_pkey', true);"
                   "SELECT count(*) FROM verify_heapam('t');"
                   "SELECT count(*) FROM verify_heapam('pgb');")
    assert rows[-2:] == ["0", "0"], f"amcheck found heap corruption: {rows}"


def run_round(c: Cluster, client: RecordingClient, benches: list[PgbenchRun], victim: str,
              outdir: Path) -> RoundResult:
    survivor = other(victim)
    round_no = len(benches) + 1
    bench = PgbenchRun(c.lab, outdir, round_no)
    benches.append(bench)
    base = len(client.committed())
    bench.wait_all_clients_committed(c)
    wait_until(lambda: len(client.committed()) >= base + COMMITS_BEFORE_CRASH, 60,
               f"{COMMITS_BEFORE_CRASH} commits through {victim} before the crash")
    log_mark = len(pg_log(c, survivor))

    t_crash = time.monotonic()
    c.lab.crash_node(victim)
    c.wait_state(survivor, "ALONE", timeout=30)  # not busy: start_prim (recovery) is done
    t_alone = time.monotonic()

    def commits_after_takeover() -> list[float]:  # necessarily by the survivor
        return sorted(t for t in client.committed().values() if t > t_alone)
    after = wait_until(lambda: len(commits_after_takeover()) >= COMMITS_AFTER_FAILOVER
                       and commits_after_takeover(), 60, f"commits through {survivor}")
    # The client's outage: the longest pause between two commits around the crash (commits
    # may still reach the victim in the milliseconds before its links go down).
    around = sorted(t for t in client.committed().values() if t_crash - 1 <= t <= after[-1])
    outage = max(b - a for a, b in itertools.pairwise(around))
    bench.wait_end(30)  # its connections broke: it exits (code 2) and closes its log

    recorded, present, counters = read_database(c, client)
    missing = sorted(set(recorded) - present)
    # Rows nobody saw committed may exist only for INSERTs in flight: failed ones (uncertain)
    # and the one that had committed but was not recorded yet when the query ran (both files
    # read after the query, so they cover it).
    uncertain = client.uncertain()
    recorded_after = set(client.committed())
    extra = sorted(present - recorded_after - uncertain)
    assert len(extra) <= 1 and all(e > max(recorded_after) for e in extra), (
        f"rows in the table that no client committed: {extra[:20]}")

    pgbench_missing: dict[int, int] = {}
    pgbench_done = 0
    for b in benches:  # earlier rounds too: their transactions must still be there
        for key, done in b.done_per_key().items():
            if b is bench:
                pgbench_done += done
            have = counters.get(key, 0)
            if have < done:
                pgbench_missing[key] = done - have
            # At most one transaction per connection was in flight when its connection broke.
            assert have <= done + 1, f"pgbench counter {key}: {have} in the table, {done} logged"

    recovery = pg_log(c, survivor)[log_mark:]
    assert "automatic recovery in progress" in recovery, (
        f"PostgreSQL on {survivor} did not go through crash recovery:\n{recovery[-2000:]}")
    assert "database system is ready to accept connections" in recovery
    assert "PANIC" not in recovery, f"PostgreSQL on {survivor}:\n{recovery[-3000:]}"
    check_amcheck(c)

    t_start = time.monotonic()
    c.lab.start_node(victim)
    c.wait_pair(survivor, victim, timeout=90)
    resync = time.monotonic() - t_start

    return RoundResult(
        victim=victim, committed=len(recorded), present=len(set(recorded) & present),
        missing=len(missing), missing_ids=missing[:50], uncertain_present=len(uncertain & present),
        pgbench_done=pgbench_done, pgbench_missing=pgbench_missing,
        takeover_s=round(t_alone - t_crash, 3), client_outage_s=round(outage, 3),
        resync_s=round(resync, 3))


def run_switchover(c: Cluster, client: RecordingClient, prim: str) -> tuple[int, float]:
    """`mirrorha swap`: stop_prim shuts PostgreSQL down cleanly, the peer starts it without a
    crash recovery, nothing committed is lost. Returns (ids checked, client outage)."""
    second = other(prim)
    log_mark = len(pg_log(c, second))
    t_swap = time.monotonic()
    c.cmd(prim, "swap")
    c.wait_pair(second, prim, timeout=60)
    t_pair = time.monotonic()
    wait_until(lambda: sum(t > t_pair for t in client.committed().values())
               >= COMMITS_AFTER_FAILOVER, 30, f"commits through {second} after the swap")
    recorded, present, _ = read_database(c, client)
    missing = sorted(set(recorded) - present)
    assert not missing, f"swap to {second}: {len(missing)} committed ids lost: {missing[:50]}"
    assert "database system is shut down" in pg_log(c, prim), "stop_prim: no clean shutdown"
    started = pg_log(c, second)[log_mark:]
    assert "database system was shut down at" in started, started[-2000:]
    assert "automatic recovery" not in started, f"{second} needed a recovery:\n{started}"
    around = sorted(t for t in client.committed().values() if t >= t_swap - 1)
    return len(recorded), max(b - a for a, b in itertools.pairwise(around))


def test_postgres_loses_no_committed_transaction_across_three_crashes(
        pg_cluster: Cluster) -> None:
    c = pg_cluster
    psql(c, SCHEMA)
    outdir = c.lab.labdir / "clients"
    outdir.mkdir()
    client = RecordingClient(c.lab, outdir)
    benches: list[PgbenchRun] = []
    results: list[RoundResult] = []
    swap: dict[str, float] = {}
    try:
        for victim in CRASHES:
            results.append(run_round(c, client, benches, victim, outdir))
        # Planned switchover back to the first node: stop_prim's clean shutdown.
        checked, outage = run_switchover(c, client, other(CRASHES[-1]))
        swap = {"committed": checked, "client_outage_s": round(outage, 3)}
    finally:
        client.stop()
        for b in benches:
            b.stop()
        report = {"crashes": [dataclasses.asdict(r) for r in results], "swap": swap}
        # Copied to test-artifacts/ with the clients' files by the fixture.
        (outdir / "rounds.json").write_text(json.dumps(report, indent=2) + "\n")
        for r in results:
            print(f"crash {r.victim}: committed {r.committed}, present {r.present}, "
                  f"missing {r.missing}, failed-but-committed {r.uncertain_present}; "
                  f"pgbench {r.pgbench_done} done, lost {sum(r.pgbench_missing.values())}; "
                  f"takeover {r.takeover_s:.2f} s, client outage {r.client_outage_s:.2f} s, "
                  f"resync {r.resync_s:.2f} s")
        if swap:
            print(f"swap back: {swap['committed']:.0f} committed ids all present; "
                  f"client outage {swap['client_outage_s']:.2f} s")
    for r in results:
        assert not r.missing, (
            f"crash of {r.victim}: {r.missing} committed ids lost: {r.missing_ids}…")
        assert not r.pgbench_missing, (
            f"crash of {r.victim}: pgbench transactions lost: {r.pgbench_missing}")
    assert len(results) == len(CRASHES)
