"""ProcessWatch against real processes: counting, dying, zombies, argv[0] names."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator

import psutil
import pytest

from appliance.errd import ProcCount, ProcessWatch
from appliance.waiting import wait_until

NAME = f"vipt-e{os.getpid() % 100000}"  # unique per test run, fits the 15-character comm


Spawn = Callable[[list[str]], "subprocess.Popen[bytes]"]




@pytest.fixture
def spawn() -> Iterator[Spawn]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(argv: list[str]) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(argv)
        procs.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(timeout=5)


def named_child(name: str) -> list[str]:
    """A Python child that renames itself (its comm) and sleeps."""
    code = f"open('/proc/self/comm', 'w').write({name!r}); import time; time.sleep(60)"
    return [sys.executable, "-c", code]


def count_of(watch: ProcessWatch, name: str) -> int:
    return next(c.count for c in watch.count() if c.name == name)


def test_running_process_is_counted_and_dead_one_is_not(spawn: Spawn) -> None:
    watch = ProcessWatch([(NAME, 1, "restart", "prim")])
    assert watch.count() == [ProcCount(NAME, 0, 1, "restart", "prim")]

    proc = spawn(named_child(NAME))
    wait_until(lambda: count_of(watch, NAME) == 1, 3.0, "the child to be counted")
    assert not watch.count()[0].below

    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=5)
    assert watch.count() == [ProcCount(NAME, 0, 1, "restart", "prim")]
    assert watch.count()[0].below


def test_zombie_is_not_counted(spawn: Spawn) -> None:
    watch = ProcessWatch([(NAME, 1, "stop", "prim")])
    proc = spawn(named_child(NAME))
    wait_until(lambda: count_of(watch, NAME) == 1, 3.0, "the child to be counted")

    proc.send_signal(signal.SIGKILL)  # not reaped yet: it stays a zombie
    wait_until(lambda: psutil.Process(proc.pid).status() == psutil.STATUS_ZOMBIE, 3.0, "a zombie")

    assert count_of(watch, NAME) == 0


def test_several_processes_and_several_checks_in_one_pass(spawn: Spawn) -> None:
    other = NAME + "x"
    watch = ProcessWatch([(NAME, 2, "restart", "prim"), (other, 1, "stop", "prim")])
    for _ in range(2):
        spawn(named_child(NAME))
    wait_until(lambda: count_of(watch, NAME) == 2, 3.0, "both children to be counted")

    counts = watch.count()

    assert counts == [
        ProcCount(NAME, 2, 2, "restart", "prim"),
        ProcCount(other, 0, 1, "stop", "prim"),
    ]


def test_process_is_recognised_by_its_argv0_basename(spawn: Spawn) -> None:
    # `exec -a` changes argv[0] but not the command name (comm stays "sleep").
    spawn(["bash", "-c", f"exec -a /opt/app/bin/{NAME} sleep 60"])
    watch = ProcessWatch([(NAME, 1, "restart", "prim")])

    wait_until(lambda: count_of(watch, NAME) == 1, 3.0, "the argv[0]-named process")
