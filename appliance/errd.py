"""Process monitoring (SafeKit's errd): counts the running processes of each `<proc>` check.
Polling cadence and what to do about a shortfall belong to the daemon and the state machine."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import psutil


@dataclass(frozen=True)
class ProcCount:
    name: str
    count: int
    atleast: int
    action: str  # "restart" | "stop", as configured
    klass: str  # "prim": checked only where the application runs

    @property
    def below(self) -> bool:
        return self.count < self.atleast


class ProcCheckLike(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def atleast(self) -> int: ...
    @property
    def action(self) -> str: ...
    @property
    def klass(self) -> str: ...


@dataclass(frozen=True)
class _Check:
    name: str
    atleast: int
    action: str
    klass: str


def matches(name: str, comm: str | None, cmdline: Sequence[str] | None) -> bool:
    """A process is `name` when its command name is (the kernel keeps 15 characters of it), or
    when its argv[0]'s basename is (`exec -a`, or interpreters that set argv[0])."""
    if comm is not None and (comm == name or (len(comm) == 15 and name[:15] == comm)):
        return True
    return bool(cmdline) and os.path.basename(cmdline[0]) == name


def _as_check(check: tuple[str, int, str, str] | ProcCheckLike) -> _Check:
    if isinstance(check, tuple):
        return _Check(*check)
    return _Check(check.name, check.atleast, check.action, check.klass)


class ProcessWatch:
    def __init__(self, checks: Sequence[tuple[str, int, str, str]] | Sequence[ProcCheckLike]):
        self.checks = [_as_check(c) for c in checks]

    def count(self) -> list[ProcCount]:
        """One pass over the process table; zombies do not count (the process is dead)."""
        counts = dict.fromkeys((c.name for c in self.checks), 0)
        if counts:
            for p in psutil.process_iter(["name", "cmdline", "status"]):
                info = p.info
                if info["status"] == psutil.STATUS_ZOMBIE:
                    continue
                for name in counts:
                    if matches(name, info["name"], info["cmdline"]):
                        counts[name] += 1
        return [
            ProcCount(c.name, counts[c.name], c.atleast, c.action, c.klass) for c in self.checks
        ]
