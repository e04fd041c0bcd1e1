"""Pieces shared by the benchmarks: deadline-bounded waits, statistics, log timestamps, and the
record of one crash-and-takeover run."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import statistics
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

from appliance.errors import MirrorhaError
from appliance.lab import PollSample
from appliance.waiting import wait_until

T = TypeVar("T")


class BenchError(MirrorhaError):
    """A benchmark could not measure what it was asked to; the message says what went wrong."""


def wait_for(
    predicate: Callable[[], T | None], timeout: float, what: str, interval: float = 0.05
) -> T:
    """appliance.waiting.wait_until, failing with BenchError (a measurement that could not be
    made, not a test assertion)."""
    return wait_until(predicate, timeout, what, interval, error=BenchError)  # type: ignore[return-value]


def write_json(path: Path, results: dict[str, Any]) -> None:
    """Write results atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(path)


@dataclass(frozen=True)
class Stats:
    n: int
    min: float
    median: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float | None]) -> Stats | None:
        known = [v for v in values if v is not None]
        if not known:
            return None
        return cls(len(known), min(known), statistics.median(known), max(known))


def parse_log_time(stamp: str) -> float:
    """Epoch seconds of a module-log timestamp `2026-11-26 05:31:19.498` (local time, as the
    daemon writes it; the lab's nodes share the host's clock and time zone)."""
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S.%f").timestamp()


@dataclass(frozen=True)
class Takeover:
    """What the survivor's own records say about a takeover, as epoch seconds."""

    decided: float  # the survivor decided to serve (state transition)
    app_launched: float  # it started start_prim / the notify_master script
    script_s: float | None  # how long that script ran (it backgrounds the application)


@dataclass(frozen=True)
class CrashRun:
    """One crash of the primary, measured from the client. All durations in seconds."""

    run: int
    crashed: str
    survivor: str
    rto_s: float  # crash -> first HTTP answer from the survivor on the VIP
    detection_s: float  # crash -> the survivor decided to take over
    app_start_s: float  # the survivor launched the application -> first HTTP answer
    start_prim_s: float | None  # duration of the start script itself
    uncertainty_s: float  # the service came back within this long before rto_s was observed
    failed_attempts: int  # client requests that failed between the crash and the answer

    @property
    def rto_minus_app_start_s(self) -> float:
        """What the HA engine itself costs: crash -> application launched on the survivor."""
        return self.rto_s - self.app_start_s


def first_answer(
    samples: Sequence[PollSample], after: float, body: str
) -> tuple[PollSample, PollSample | None, int]:
    """The first successful attempt started after `after` answered by `body`, the attempt just
    before it (None if there was none after `after`) and the number of failed attempts between.
    """
    previous: PollSample | None = None
    failed = 0
    for sample in samples:
        if sample.t_start < after:
            continue
        if sample.ok and sample.served_by == body:
            return sample, previous, failed
        failed += 0 if sample.ok else 1
        previous = sample
    raise BenchError(f"no answer from {body} in the client's samples")


def crash_run(
    run: int,
    crashed: str,
    survivor: str,
    t0: float,
    wall0: float,
    samples: Sequence[PollSample],
    takeover: Takeover,
) -> CrashRun:
    """Combine the client's samples (monotonic clock, crash at t0) with the survivor's records
    (epoch seconds, crash at wall0) into one run."""
    ok, previous, failed = first_answer(samples, t0, survivor)
    answered = ok.t_end
    # The service was back at some instant after the previous attempt started (that attempt
    # failed, perhaps only because it was sent a moment too early) and before this one ended.
    since = previous.t_start if previous is not None else t0
    launched = t0 + (takeover.app_launched - wall0)
    return CrashRun(
        run=run,
        crashed=crashed,
        survivor=survivor,
        rto_s=answered - t0,
        detection_s=takeover.decided - wall0,
        app_start_s=answered - launched,
        start_prim_s=takeover.script_s,
        uncertainty_s=answered - since,
        failed_attempts=failed,
    )


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so every `finally` removes its lab."""

    def interrupt(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_bench(prog: str, needs: str, prepare: Callable[[], T], run: Callable[[T], int],
              interrupted: str) -> int:
    """The shared entry point of a benchmark: root check, argument errors as one line,
    SIGTERM treated like Ctrl-C so that every lab is removed."""
    if os.geteuid() != 0:
        print(f"{prog}: needs root ({needs})", file=sys.stderr)
        return 2
    try:
        plan = prepare()
    except BenchError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    with sigterm_as_interrupt():
        try:
            return run(plan)
        except KeyboardInterrupt:
            print(f"{prog}: interrupted; {interrupted}", file=sys.stderr)
            return 130
