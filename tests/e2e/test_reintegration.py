"""Reintegration in the lab: the returning node gets only what changed while it was away, the
application keeps writing throughout, and both backing copies end byte-for-byte identical."""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
from pathlib import Path

import pytest

from appliance.lab import LabSettings
from appliance.waiting import wait_until
from tests.e2e.conftest import Cluster
from tests.e2e.test_failover import formed
from tests.e2e.test_replication import DATA, sh
from tests.support.trees import differences

pytestmark = pytest.mark.slow

REPLICATED = dataclasses.replace(LabSettings(), replicated_dirs=(DATA,))
FILES, FILE_MIB = 64, 16  # a 1 GiB dataset
CHANGES, CHANGE_KIB = 160, 64  # 1 % of it (10 MiB) rewritten while the peer is away
REINTEGRATED = re.compile(r"reintegration of node2 \((\w+) mode\): ([\d.]+) MiB")

# The application: appends a stamped 4 KiB record and fsyncs it, again and again, recording
# when each fsync returned, until told to stop. Runs in node1's container.
WRITER = """
import os, sys, time
out, stop = sys.argv[1], sys.argv[2]
flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
fd = os.open(os.path.join(sys.argv[3], "journal-of-the-app"), flags)
with open(out, "w") as log:
    n = 0
    while not os.path.exists(stop) and n < 20000:
        os.write(fd, (f"{n} {time.time():.6f} ".ljust(4095) + "\\n").encode())
        os.fsync(fd)
        print(f"{time.time():.6f}", file=log, flush=True)
        n += 1
        time.sleep(0.01)  # pacing of the application, not synchronisation
"""


def backing(c: Cluster, node: str) -> Path:
    return c.lab.private_dir_source(node, Path(DATA))


@pytest.mark.parametrize("lab_settings", [REPLICATED])
def test_returning_secondary_gets_only_the_changes_while_the_app_keeps_writing(
        cluster: Cluster, tmp_path: Path) -> None:
    formed(cluster)
    sh(cluster, "node1", f"""set -e; cd {DATA}
        for i in $(seq 1 {FILES}); do
          dd if=/dev/urandom of=f$i bs=1M count={FILE_MIB} 2>/dev/null
        done""",
       timeout=120)
    # A SYNC barrier covers the dataset: it is on node2's disk (until then it is "maybe not",
    # and a crash would make the primary resend it, rightly).
    wait_until(lambda: (cluster.state("node1") or {}).get("replication", {})
               .get("unsynced_changes") == 0, 30, "the dataset to be durable on node2")
    cluster.lab.crash_node("node2")
    cluster.wait_state("node1", "ALONE")
    # 1 % of the dataset rewritten alone, at scattered places (never the same block twice).
    sh(cluster, "node1", f"""set -e; cd {DATA}
        for i in $(seq 0 {CHANGES - 1}); do
          dd if=/dev/urandom of=f$((i % {FILES} + 1)) bs={CHANGE_KIB}K count=1 \
             seek=$((i / {FILES} * 50 + 7)) conv=notrunc,fsync 2>/dev/null
        done""", timeout=120)
    st = cluster.state("node1")
    assert st is not None and st["replication"]["rpo_bytes"] >= CHANGES * CHANGE_KIB * 1024
    app_pids = cluster.lab.app_pids()["node1"]
    log, stop = tmp_path / "writer.log", tmp_path / "stop"
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    sh(cluster, "node1", f"nohup {cluster.lab.python} {script} {log} {stop} {DATA} "
                         f">{tmp_path}/writer.out 2>&1 &")
    wait_until(lambda: log.exists() and len(log.read_text().split()) >= 5, 10,
               "the application to write")
    cluster.lab.start_node("node2")
    cluster.wait_pair("node1", "node2", timeout=60)
    stamps_at_sync = len(log.read_text().split())
    wait_until(lambda: len(log.read_text().split()) >= stamps_at_sync + 5, 10,
               "the application to write on once node2 is SECOND")
    stop.touch()
    running = f"pgrep -f '^{cluster.lab.python} {script}' || true"  # not this sh itself
    wait_until(lambda: not sh(cluster, "node1", running).strip(), 10,
               "the application to finish")
    wait_until(lambda: not differences(backing(cluster, "node1"), backing(cluster, "node2")),
               20, "both backing copies to be identical")

    # Only about the 1 % (plus what the app appended) crossed, the journal said where.
    node1_log = cluster.module_log("node1")
    found = REINTEGRATED.findall(node1_log)  # the first one: node2 joining at start
    assert len(found) == 2, node1_log[-3000:]
    mode, mib = found[-1][0], float(found[-1][1])
    changed_mib = CHANGES * CHANGE_KIB / 1024
    assert mode == "journal"
    assert changed_mib * 0.95 <= mib <= changed_mib + 2.0, (mib, changed_mib)
    assert "full resync" not in node1_log
    node2_log = cluster.module_log("node2")
    assert re.search(r"reintegration \(journal\) from node1: [\d.]+ MiB of data in [\d.]+ s",
                     node2_log), node2_log[-3000:]
    # The application never stopped: same processes, and its fsyncs went on while node2 was
    # being reintegrated (between its start and the pair forming).
    assert cluster.lab.app_pids()["node1"] == app_pids
    stamps = [float(x) for x in log.read_text().split()]
    assert len(stamps) >= stamps_at_sync + 5  # as waited for above (it may stop right there)
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    assert max(gaps) < 10, f"the application was blocked for {max(gaps):.1f} s"
    st = cluster.state("node1")
    assert st is not None and st["replication"]["reintegrations"] == 2  # join, return
    assert json.dumps(st)  # the state stays serialisable with the new counters


@pytest.mark.parametrize("lab_settings", [REPLICATED])
def test_primary_crashing_alone_keeps_its_journal_and_compares_what_came_last(
        cluster: Cluster) -> None:
    """node1 writes alone, then loses power before its journal file caught up: back up, it
    compares (checksums) what changed in the last seconds instead of trusting the journal."""
    formed(cluster)
    sh(cluster, "node1", f"""set -e; cd {DATA}
        for i in $(seq 1 8); do head -c 2M /dev/urandom > g$i; done""")
    wait_until(lambda: (cluster.state("node1") or {}).get("replication", {})
               .get("unsynced_changes") == 0, 15, "the dataset to be durable on node2")
    cluster.lab.crash_node("node2")
    cluster.wait_state("node1", "ALONE")
    sh(cluster, "node1", f"""set -e; cd {DATA}
        dd if=/dev/urandom of=g2 bs=4K count=3 seek=100 conv=notrunc 2>/dev/null
        printf late > late-file""")
    cluster.lab.crash_node("node1")  # within a second: the journal file may lack these
    cluster.lab.start_node("node1")
    cluster.wait_state("node1", "ALONE", timeout=30)
    assert "journal loaded after an unclean stop" in cluster.module_log("node1")
    cluster.lab.start_node("node2")
    cluster.wait_pair("node1", "node2", timeout=60)
    wait_until(lambda: not differences(backing(cluster, "node1"), backing(cluster, "node2")),
               20, "both backing copies to be identical")
    log = cluster.module_log("node1")
    found = REINTEGRATED.findall(log)
    assert found and found[-1][0] == "journal", found
    assert float(found[-1][1]) < 4.0  # never the 16 MiB dataset again
    last = [line for line in log.splitlines() if "reintegration of node2" in line][-1]
    compared = re.search(r"(\d+) files \([\d.]+ MiB\) compared by checksums", last)
    assert compared and 1 <= int(compared.group(1)) <= 8, last  # the suspects, once


@pytest.mark.parametrize("lab_settings", [REPLICATED])
def test_an_interrupted_reintegration_is_redone_comparing_everything(cluster: Cluster) -> None:
    """The secondary crashes in the middle of being reintegrated: its copy is half new, half
    old, which no journal describes. It said so on disk ("torn") before the first change, so
    the next reintegration compares checksums instead of trusting the journals."""
    formed(cluster)
    cluster.lab.crash_node("node2")
    cluster.wait_state("node1", "ALONE")
    sh(cluster, "node1", f"""set -e; cd {DATA}
        for i in $(seq 1 40); do dd if=/dev/urandom of=big$i bs=1M count=10 2>/dev/null; done""",
       timeout=120)
    cluster.lab.start_node("node2")

    def receiving() -> bool:
        st = cluster.state("node2") or {}
        received = ((st.get("replication") or {}).get("receiver") or {}).get("bytes", 0)
        return received > 40 * 1024 * 1024 and not st.get("in_sync")
    wait_until(receiving, 30, "node2 to be in the middle of its reintegration")
    cluster.lab.crash_node("node2")
    cluster.lab.start_node("node2")
    cluster.wait_pair("node1", "node2", timeout=90)
    wait_until(lambda: not differences(backing(cluster, "node1"), backing(cluster, "node2")),
               30, "both backing copies to be identical")
    started = re.findall(r"reintegration of node2 started \((\w+) mode",
                         cluster.module_log("node1"))
    # The interrupted one could trust the journals; none after it could (a later attempt may
    # fail too: the lab's 600 ms ack timeout is short for checksumming 400 MiB).
    interrupted = started.index("journal")
    assert started[interrupted + 1:] and set(started[interrupted + 1:]) == {"checksum"}, started
