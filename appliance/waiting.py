"""Waiting on a condition with a deadline: how the lab, the benchmarks and the tests
synchronise (never a bare sleep)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float, what: str,
               interval: float = 0.05, error: type[Exception] = AssertionError) -> T:
    """Poll `predicate` until it returns something truthy (returned); at the deadline raise
    `error` naming `what`."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)  # polling interval of a deadline-bounded wait
    raise error(f"timed out after {timeout:.1f} s waiting for {what} (last: {last!r})")


def holds_for(predicate: Callable[[], bool], duration: float, what: str,
              interval: float = 0.05) -> None:
    """Assert that `predicate` stays true during `duration` (a non-event: no failover...)."""
    deadline = time.monotonic() + duration
    while time.monotonic() < deadline:
        if not predicate():
            raise AssertionError(f"{what} stopped holding")
        time.sleep(interval)  # polling interval of a deadline-bounded observation
