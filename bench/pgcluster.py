"""PostgreSQL 15 on a replicated directory, its primary crashed mid-load: the one implementation
of the crash round that the RPO test (tests/e2e/test_postgres.py, three crashes) and the RPO
bench (bench/pg_rpo.py, twenty) both run.

The Debian package's server runs on the primary with its data directory inside the replicated
dir, started and stopped by bin/start_prim and bin/stop_prim. Two kinds of clients write through
the VIP from the client namespace: pg_client.py inserts increasing ids one transaction at a time
and records each id once its COMMIT returned; pgbench (4 connections) upserts one counter per
connection and logs every transaction it saw complete. A round crashes the primary mid-load
(every process SIGKILLed, links down); after the failover every recorded transaction must be in
the new primary's database, which must have gone through a clean crash recovery (and pass
amcheck). The crashed node then returns and is fully resynchronised, ready to be the next
victim.

A round measures; it does not judge: what it found wrong is in RoundResult (missing ids, lost
pgbench transactions, problems), for the test to assert and the bench to count. A round that
cannot go on (a timeout, a failed query) raises BenchError or LabError.
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType

from appliance.lab import NETNS_DIR, Lab, LabCommandFailed, LabSettings
from bench.common import BenchError, wait_for
from bench.failover import in_state, module_log, pair_formed

PGBIN = Path("/usr/lib/postgresql/15/bin")
CLIENT_SCRIPT = Path(__file__).with_name("pg_client.py")
# A connection to a primary that then crashed must fail within seconds, whatever state it was
# in. tcp_user_timeout: a statement not yet acknowledged by the server's kernel fails after 2 s
# instead of waiting on TCP retransmissions. Keepalives: a statement already acknowledged (the
# kernel acks alone once the commit outlasts its delayed-ACK timer) leaves nothing in flight,
# and without probes the connection would wait for the answer forever. A slow commit trips
# neither: a live server's kernel acks data and answers probes however busy PostgreSQL is.
CONNINFO = (f"host={Lab.VIP} port=5432 user=postgres dbname=postgres connect_timeout=2 "
            "tcp_user_timeout=2000 keepalives=1 keepalives_idle=1 keepalives_interval=1 "
            "keepalives_count=2")
COMMITS_BEFORE_CRASH = 200  # by the recording client, in each round
COMMITS_AFTER_FAILOVER = 20  # the new primary serves: proof enough before checking
PGBENCH_CLIENTS = 4
FORM_TIMEOUT_S = 60.0  # node1 alone with a fresh database cluster, then node2 in sync
TAKEOVER_TIMEOUT_S = 30.0  # crash -> the survivor ALONE, PostgreSQL recovered and started
REJOIN_TIMEOUT_S = 90.0  # the victim restarted -> SECOND in sync (a full resync)
CLIENTS_DIR = "clients"  # in the lab directory: the clients' files


def data_dir(prefix: str) -> str:
    """The replicated dir of a lab (PostgreSQL's data directory is inside). One per prefix:
    its mount point and the aside folder of a resync are on the host, shared by every lab."""
    return f"/srv/mirrorha-pg-{prefix}"


def lab_settings(data: str) -> LabSettings:
    return replace(
        LabSettings(), replicated_dirs=(data,), errd_proc="postgres",
        # start_prim's budget too: a crash recovery, or the first start's initdb, takes seconds.
        nicestoptimeout_s=30, forcestoptimeout_s=10)


def postgres_missing() -> str | None:
    """Why the PostgreSQL lab cannot run here, None if it can."""
    if not (PGBIN / "postgres").exists():
        return "PostgreSQL 15 is not installed (apt-get install postgresql-15)"
    if importlib.util.find_spec("psycopg") is None:
        return "psycopg is not installed: the recording client needs it (pip install -e '.[dev]')"
    return None


# ---------------------------------------------------------------------------------------------
# The application scripts (identical on both nodes, as the console would deploy them)


def _script_head(name: str, what: str, data: str) -> str:
    return f"""#!/bin/sh
# {what}
safekit() {{ if [ -x "$SAFE/safekit" ]; then "$SAFE/safekit" "$@"; fi; }}
echo "Running {name} $*"

PGBIN={PGBIN}
DATA={data}/pgdata
as_postgres() {{ runuser -u postgres -- "$@"; }}
"""


def start_prim_script(data: str) -> str:
    what = f"Starts PostgreSQL 15 with its data directory in the replicated dir {data}."
    return _script_head("start_prim", what, data) + """
# Per node, outside the replicated dir (read-only on the SECOND, and node-specific): the unix
# socket and PostgreSQL's own log.
HOME_DIR="${MIRRORHA_HOME:-/var/lib/mirrorha}"
RUN="$HOME_DIR/pgrun"
LOG="$HOME_DIR/mirror/log/postgresql.log"

mkdir -p "$RUN" && touch "$LOG" && chown postgres:postgres "$RUN" "$LOG" || exit 1
cd "$RUN" || exit 1

if [ ! -f "$DATA/PG_VERSION" ]; then
  # First start: initdb into a scratch directory renamed once complete, so that a crash in
  # the middle never leaves a half-made cluster that looks like a real one.
  rm -rf "$DATA.new"
  mkdir -m 700 "$DATA.new" && chown postgres:postgres "$DATA.new" || exit 1
  as_postgres "$PGBIN/initdb" -D "$DATA.new" -U postgres --auth=trust -E UTF8 --no-locale \\
    || { safekit printe "initdb failed"; exit 1; }
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


def stop_prim_script(data: str) -> str:
    what = ('Stops PostgreSQL; "force": immediate shutdown (crash-like, recovered at the next '
            'start).')
    return _script_head("stop_prim", what, data) + """
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


def install_postgres_scripts(lab: Lab, data: str) -> None:
    for node in Lab.NODES:
        bin_dir = lab.node_paths(node).bin_dir
        for name, text in (("start_prim", start_prim_script(data)),
                           ("stop_prim", stop_prim_script(data))):
            (bin_dir / name).write_text(text)
            (bin_dir / name).chmod(0o755)


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
# The lab


@contextlib.contextmanager
def postgres_lab(prefix: str, keep: Callable[[Lab], None]) -> Iterator[Lab]:
    """A lab (nodes not started) whose nodes run PostgreSQL from start_prim. On the way out,
    failure or not, `keep(lab)` saves what it wants of the lab, then all of it goes."""
    data = data_dir(prefix)
    lab = Lab(prefix=prefix, settings=lab_settings(data))
    try:
        lab.up(start_nodes=False)
        install_postgres_scripts(lab, data)
        yield lab
    finally:
        try:
            keep(lab)
        finally:
            lab.down()
            # A full resync on a node first tries to set the old copy aside in a sibling of the
            # replicated dir, on the host's /srv here; the empty directory it leaves goes too.
            with contextlib.suppress(OSError):
                os.rmdir(f"{data}.mirrorha-aside")


def keep_clients(lab: Lab, dest: Path) -> None:
    """Copy the clients' files (commit records, pgbench logs) to dest/clients."""
    clients = lab.labdir / CLIENTS_DIR
    if clients.is_dir():
        shutil.copytree(clients, dest / CLIENTS_DIR, dirs_exist_ok=True)


def wait_state(lab: Lab, node: str, state: str, timeout: float) -> None:
    wait_for(lambda: in_state(lab, node, state), timeout, f"{node} {state}", interval=0.1)


def wait_pair(lab: Lab, prim: str, second: str, timeout: float) -> None:
    wait_for(lambda: pair_formed(lab, prim, second), timeout,
             f"{prim} PRIM and {second} SECOND in sync", interval=0.1)


def form_pair(lab: Lab) -> None:
    """node1 alone first: it creates the database cluster (initdb), then node2 joins and gets
    it by a full resync."""
    lab.start_node("node1")
    wait_state(lab, "node1", "ALONE", FORM_TIMEOUT_S)
    lab.start_node("node2")
    wait_pair(lab, "node1", "node2", FORM_TIMEOUT_S)


def other(node: str) -> str:
    return "node2" if node == "node1" else "node1"


def psql(lab: Lab, sql: str, timeout: float = 30) -> list[str]:
    """Run SQL through the VIP from the client; the rows, one string each (-A -t)."""
    argv = [str(PGBIN / "psql"), "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql, CONNINFO]
    return lab.client_run(argv, timeout=timeout).stdout.splitlines()


def pg_log(lab: Lab, node: str) -> str:
    path = lab.node_paths(node).log_dir / "postgresql.log"
    return path.read_text(errors="replace") if path.exists() else ""


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


class ClientExited(BenchError):
    """The recording client ended before it was told to (its stderr says why)."""


class RecordingClient:
    """pg_client.py: its committed ids (with the monotonic time each COMMIT returned) and the
    ids whose INSERT failed, so may or may not have committed. It stops by itself after
    `max_seconds`."""

    def __init__(self, lab: Lab, outdir: Path, max_seconds: float) -> None:
        self.outdir = outdir
        self.process = client_popen(
            lab, [str(lab.python), str(CLIENT_SCRIPT), CONNINFO, str(outdir), f"{max_seconds:g}"],
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
            raise ClientExited(f"the recording client exited ({self.process.returncode}): "
                               f"{err[-1000:]}")

    def stop(self) -> None:
        stop_process(self.process)


class PgbenchRun:
    """One pgbench run through the VIP; it ends by itself when the crash breaks its
    connections. Its per-transaction log (-l) lists every transaction that completed."""

    def __init__(self, lab: Lab, outdir: Path, round_no: int) -> None:
        self.lab = lab
        self.round_no = round_no
        self.prefix = outdir / f"pgbench-r{round_no}-tx"  # its log: PREFIX.<pgbench's pid>
        script = outdir / "pgbench.sql"
        script.write_text(PGBENCH_SCRIPT)
        argv = [str(PGBIN / "pgbench"), "-n", "-c", str(PGBENCH_CLIENTS), "-j", "1", "-T", "600",
                "-f", str(script), "-D", f"round={round_no}", "-l",
                f"--log-prefix={self.prefix}", CONNINFO]
        self.process = client_popen(lab, argv, outdir / f"pgbench-r{round_no}.out",
                                    outdir / f"pgbench-r{round_no}.err")

    def wait_all_clients_committed(self) -> None:
        """Every pgbench connection has committed (its log is only readable once it ends)."""
        sql = f"SELECT count(*) FROM pgb WHERE k / 1000 = {self.round_no} AND n > 0"

        def all_in() -> bool:
            if self.process.poll() is not None:
                raise ClientExited(f"pgbench of round {self.round_no} exited early")
            return psql(self.lab, sql) == [str(PGBENCH_CLIENTS)]
        wait_for(all_in, 30, f"every pgbench connection of round {self.round_no} to commit")

    def wait_end(self, timeout: float) -> None:
        wait_for(lambda: self.process.poll() is not None, timeout,
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
# Verification on the new primary


@dataclass(frozen=True)
class DatabaseView:
    recorded: dict[int, float]  # ids the client recorded as committed (read before the query)
    present: set[int]  # ids in the table
    counters: dict[int, int]  # pgbench: key -> n


def read_database(lab: Lab, client: RecordingClient) -> DatabaseView:
    """The recorded ids are read BEFORE the query: each of them committed before it began."""
    recorded = client.committed()
    present = {int(x) for x in psql(lab, "SELECT id FROM t")}
    rows = (row.split("|") for row in psql(lab, "SELECT k, n FROM pgb"))
    return DatabaseView(recorded, present, {int(k): int(n) for k, n in rows})


def unexplained_rows(view: DatabaseView, client: RecordingClient) -> list[str]:
    """Rows nobody saw committed may exist only for INSERTs in flight: failed ones (uncertain)
    and the one that had committed but was not recorded yet when the query ran (both files
    read after the query, so they cover it)."""
    recorded_after = set(client.committed())
    extra = sorted(view.present - recorded_after - client.uncertain())
    if len(extra) <= 1 and all(e > max(recorded_after) for e in extra):
        return []
    return [f"rows in the table that no client committed: {extra[:20]}"]


def pgbench_losses(view: DatabaseView, benches: Iterable[PgbenchRun]
                   ) -> tuple[dict[int, int], list[str]]:
    """(counter key -> transactions pgbench saw done that the table lacks, problems), over
    every round so far: earlier rounds' transactions must still be there."""
    missing: dict[int, int] = {}
    problems = []
    for b in benches:
        for key, done in b.done_per_key().items():
            have = view.counters.get(key, 0)
            if have < done:
                missing[key] = done - have
            # At most one transaction per connection was in flight when its connection broke.
            if have > done + 1:
                problems.append(f"pgbench counter {key}: {have} in the table, {done} logged")
    return missing, problems


def recovery_problems(recovery: str, survivor: str) -> list[str]:
    """What is wrong in the survivor's PostgreSQL log since the crash: it must have gone through
    a crash recovery to the end, without a PANIC."""
    problems = []
    if "automatic recovery in progress" not in recovery:
        problems.append(f"PostgreSQL on {survivor} did not go through crash recovery:\n"
                        f"{recovery[-2000:]}")
    if "database system is ready to accept connections" not in recovery:
        problems.append(f"PostgreSQL on {survivor} never said it was ready:\n{recovery[-2000:]}")
    if "PANIC" in recovery:
        problems.append(f"PostgreSQL on {survivor}:\n{recovery[-3000:]}")
    return problems


def amcheck_problems(lab: Lab) -> list[str]:
    """Structural checks of the recovered database: heap pages, and indexes against the heap
    (bt_index_check fails the query on a corrupt index)."""
    try:
        rows = psql(lab, "SELECT bt_index_check('t_pkey', true), bt_index_check('pgb_pkey', true);"
                         "SELECT count(*) FROM verify_heapam('t');"
                         "SELECT count(*) FROM verify_heapam('pgb');")
    except LabCommandFailed as e:
        return [f"amcheck failed: {e}"]
    return [] if rows[-2:] == ["0", "0"] else [f"amcheck found heap corruption: {rows}"]


# ---------------------------------------------------------------------------------------------
# The crash round


@dataclass(frozen=True)
class RoundResult:
    victim: str
    committed: int  # ids the recording client saw committed so far (all rounds)
    committed_in_round: int  # of those, since the previous round's check (this round's load)
    present: int  # of all committed ids, found on the new primary
    missing: int
    missing_ids: list[int]  # the first ones
    uncertain_present: int  # failed INSERTs that had committed anyway (allowed; all rounds)
    pgbench_done: int  # transactions pgbench logged as done in this round
    pgbench_missing: dict[int, int]  # counter key -> transactions lost (all rounds)
    # crash -> the survivor reports ALONE and idle (start_prim done; if it failed, see
    # start_failures, errd restarts it a moment later and PostgreSQL serves after that)
    takeover_s: float
    write_rto_s: float  # crash -> the first COMMIT the client saw acknowledged by the survivor
    client_outage_s: float  # longest pause between two COMMITs seen by the client
    start_failures: int  # start_prim failures on the survivor before it served (errd retried)
    resync_s: float | None  # restart of the victim -> PRIM/SECOND in sync (None: not yet)
    problems: list[str] = field(default_factory=list)  # recovery, amcheck, unexplained rows

    @property
    def lost(self) -> int:
        """Committed transactions missing on the new primary: client ids and pgbench's."""
        return self.missing + sum(self.pgbench_missing.values())

    @property
    def recovery_ok(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class Failover:
    takeover_s: float
    write_rto_s: float
    client_outage_s: float
    start_failures: int


def longest_pause(times: Iterable[float]) -> tuple[float, float]:
    """(start, end) of the longest pause between two consecutive instants."""
    return max(itertools.pairwise(sorted(times)), key=lambda pair: pair[1] - pair[0])


def commits_after(client: RecordingClient, since: float, node: str) -> float:
    """Wait for COMMITS_AFTER_FAILOVER commits after `since` (through `node`, the only one
    serving then); the time of the last."""
    def latest() -> float | None:
        after = [t for t in client.committed().values() if t > since]
        return max(after) if len(after) >= COMMITS_AFTER_FAILOVER else None
    try:
        return wait_for(latest, 60, f"{COMMITS_AFTER_FAILOVER} commits through {node}")
    except BenchError as e:
        times = sorted(client.committed().values())
        after = sum(t > since for t in times)
        last = f"{times[-1] - since:+.1f} s" if times else "never"
        raise BenchError(f"{e}: {after} after it; the client's last COMMIT at {last} from it, "
                         f"{len(times)} in all") from None


class CrashRounds:
    """The load (the recording client, one pgbench per round) on a formed pair, and rounds of
    crash, failover, verification and return of the victim. A context manager: the schema is
    created and the client started on entry; every client is stopped on exit."""

    def __init__(self, lab: Lab, client_seconds: float = 600) -> None:
        self.lab = lab
        self.outdir = lab.labdir / CLIENTS_DIR
        self.client_seconds = client_seconds
        self.benches: list[PgbenchRun] = []
        self.results: list[RoundResult] = []  # a round's, as soon as it is checked
        self._checked = 0  # ids recorded as committed at the previous round's check
        self._client: RecordingClient | None = None

    @property
    def client(self) -> RecordingClient:
        if self._client is None:
            raise RuntimeError("CrashRounds used outside its `with` block")
        return self._client

    def __enter__(self) -> CrashRounds:
        psql(self.lab, SCHEMA)
        self.outdir.mkdir()
        self._client = RecordingClient(self.lab, self.outdir, self.client_seconds)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._client is not None:
            self._client.stop()
        for b in self.benches:
            b.stop()

    def crash(self, victim: str) -> RoundResult:
        """One round: load through `victim` (the primary), crash it, let the other node take
        over, check every recorded commit there (the result goes to self.results), then bring
        the victim back in sync (its resync time completes the result)."""
        survivor = other(victim)
        bench = self._load(victim)
        log_mark = len(pg_log(self.lab, survivor))
        failover = self._crash_and_failover(victim, survivor)
        bench.wait_end(30)  # its connections broke: it exits (code 2) and closes its log

        view = read_database(self.lab, self.client)
        pgbench_missing, problems = self._check(view, survivor, log_mark)
        missing = sorted(set(view.recorded) - view.present)
        previous, self._checked = self._checked, len(view.recorded)
        # Recorded before the victim returns: if it cannot, what the round found stays known.
        self.results.append(RoundResult(
            victim=victim, committed=len(view.recorded),
            committed_in_round=len(view.recorded) - previous,
            present=len(set(view.recorded) & view.present), missing=len(missing),
            missing_ids=missing[:50],
            uncertain_present=len(self.client.uncertain() & view.present),
            pgbench_done=sum(bench.done_per_key().values()), pgbench_missing=pgbench_missing,
            takeover_s=failover.takeover_s, write_rto_s=failover.write_rto_s,
            client_outage_s=failover.client_outage_s, start_failures=failover.start_failures,
            resync_s=None, problems=problems))
        resync = self._rejoin(victim, survivor)
        self.results[-1] = replace(self.results[-1], resync_s=round(resync, 3))
        return self.results[-1]

    def _load(self, victim: str) -> PgbenchRun:
        """A new pgbench beside the recording client, until both have committed through
        `victim`."""
        bench = PgbenchRun(self.lab, self.outdir, len(self.benches) + 1)
        self.benches.append(bench)
        base = len(self.client.committed())
        bench.wait_all_clients_committed()
        wait_for(lambda: len(self.client.committed()) >= base + COMMITS_BEFORE_CRASH, 60,
                 f"{COMMITS_BEFORE_CRASH} commits through {victim} before the crash")
        return bench

    def _crash_and_failover(self, victim: str, survivor: str) -> Failover:
        t_crash, wall_crash = time.monotonic(), time.time()
        self.lab.crash_node(victim)
        wait_state(self.lab, survivor, "ALONE", TAKEOVER_TIMEOUT_S)  # not busy: start_prim done
        t_alone = time.monotonic()
        last = commits_after(self.client, t_alone, survivor)
        # The client's outage: the longest pause between two commits around the crash (commits
        # may still reach the victim in the milliseconds before its links go down); the commit
        # that ends it is the survivor's first.
        start, end = longest_pause(t for t in self.client.committed().values()
                                   if t_crash - 1 <= t <= last)
        failures = sum("start_prim failed" in line.text
                       for line in module_log(self.lab, survivor, wall_crash))
        return Failover(takeover_s=round(t_alone - t_crash, 3),
                        write_rto_s=round(end - t_crash, 3),
                        client_outage_s=round(end - start, 3), start_failures=failures)

    def _check(self, view: DatabaseView, survivor: str, log_mark: int
               ) -> tuple[dict[int, int], list[str]]:
        """(pgbench transactions missing per key, problems) on the new primary."""
        problems = unexplained_rows(view, self.client)
        pgbench_missing, pgbench_problems = pgbench_losses(view, self.benches)
        problems += pgbench_problems
        problems += recovery_problems(pg_log(self.lab, survivor)[log_mark:], survivor)
        problems += amcheck_problems(self.lab)
        return pgbench_missing, problems

    def _rejoin(self, victim: str, survivor: str) -> float:
        """Restart the victim; seconds until it is SECOND in sync (a full resync)."""
        t_start = time.monotonic()
        self.lab.start_node(victim)
        wait_pair(self.lab, survivor, victim, REJOIN_TIMEOUT_S)
        return time.monotonic() - t_start
