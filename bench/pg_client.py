"""A PostgreSQL client that records every transaction it saw committed (run in the lab's client
namespace by bench/pgcluster.py, for tests/e2e/test_postgres.py and bench/pg_rpo.py).

    python pg_client.py CONNINFO OUTDIR MAX_SECONDS

One connection, autocommit: each `INSERT INTO t VALUES (id)` is one transaction, ids increase
and are never reused. An id goes to OUTDIR/committed ("id monotonic-time" per line, flushed)
only once its INSERT returned, i.e. once PostgreSQL acknowledged the COMMIT: every id there must
survive a failover. An INSERT that failed (connection lost mid-statement) may or may not have
committed: its id goes to OUTDIR/uncertain. On any error the client reconnects (the VIP moves to
the other node, which needs a crash recovery first) and goes on with the next id, until
MAX_SECONDS have passed or it is terminated. Connection errors go to stderr with their time.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TextIO

import psycopg

RETRY_PAUSE_S = 0.05  # between connection attempts while nobody serves the VIP


def log(message: str) -> None:
    print(f"{time.monotonic():.3f} {message}", file=sys.stderr, flush=True)


def connect(conninfo: str) -> psycopg.Connection | None:
    try:
        return psycopg.connect(conninfo, autocommit=True)
    except psycopg.Error as e:
        log(f"connect failed: {type(e).__name__}: {str(e).strip()}")
        return None


def record(out: TextIO, line: str) -> None:
    out.write(line + "\n")
    out.flush()


def run(conninfo: str, outdir: Path, max_seconds: float) -> None:
    end = time.monotonic() + max_seconds
    next_id = 1
    conn: psycopg.Connection | None = None
    with (outdir / "committed").open("a") as committed, \
            (outdir / "uncertain").open("a") as uncertain:
        while time.monotonic() < end:
            if conn is None:
                conn = connect(conninfo)
                if conn is None:
                    time.sleep(RETRY_PAUSE_S)  # a retry pause in the client, not a sync point
                    continue
                log("connected")
            tx_id, next_id = next_id, next_id + 1
            try:
                conn.execute("INSERT INTO t (id) VALUES (%s)", (tx_id,))
            except psycopg.Error as e:
                record(uncertain, str(tx_id))
                log(f"insert {tx_id} failed: {type(e).__name__}: {str(e).strip()}")
                conn.close()
                conn = None
                continue
            record(committed, f"{tx_id} {time.monotonic():.6f}")
    if conn is not None:
        conn.close()


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    run(argv[0], Path(argv[1]), float(argv[2]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
