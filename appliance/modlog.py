"""The module log: one human-readable line per event, appended and flushed at once so that an
operator tailing it (or the console) sees a decision the moment it is taken."""

from __future__ import annotations

import logging
import threading
from collections import deque
from datetime import datetime
from pathlib import Path

_mirror = logging.getLogger("mirrorha.module")
_PY_LEVELS = {"I": logging.INFO, "W": logging.WARNING, "E": logging.ERROR}


def format_line(when: datetime, node: str, level: str, message: str, state: str | None) -> str:
    stamp = when.strftime("%Y-%m-%d %H:%M:%S.") + f"{when.microsecond // 1000:03d}"
    parts = [stamp, node, level] + ([state] if state else []) + [message]
    return " ".join(parts)


class ModuleLog:
    """Append-only module log: `2026-11-26 10:00:01.123 node2 I SECOND -> ALONE: reason`."""

    def __init__(self, path: Path, node: str) -> None:
        self.path = path
        self.node = node
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)

    def info(self, message: str, state: str | None = None) -> None:
        self._write("I", message, state)

    def warning(self, message: str, state: str | None = None) -> None:
        self._write("W", message, state)

    def error(self, message: str, state: str | None = None) -> None:
        self._write("E", message, state)

    def _write(self, level: str, message: str, state: str | None) -> None:
        # One line per event: embedded newlines would make the log ambiguous to parse.
        line = format_line(datetime.now(), self.node, level, message.replace("\n", " | "), state)
        # Opening per line costs little and survives log rotation (logrotate's move/create).
        try:
            with self._lock, self.path.open("a", encoding="utf-8", buffering=1) as f:
                f.write(line + "\n")
        except OSError as e:
            # A full disk must not stop the cluster from acting: the line still reaches the
            # daemon's own output (journal).
            _mirror.error("module log %s not writable (%s)", self.path, e)
        _mirror.log(_PY_LEVELS[level], "%s", line)

    @staticmethod
    def tail(path: Path, lines: int) -> list[str]:
        return tail(path, lines)


def tail(path: Path, lines: int) -> list[str]:
    """Last `lines` lines of a log file (without newlines); empty if the file does not exist."""
    if lines <= 0:
        return []
    try:
        with path.open(encoding="utf-8", errors="replace") as f:
            return [line.rstrip("\n") for line in deque(f, maxlen=lines)]
    except FileNotFoundError:
        return []
