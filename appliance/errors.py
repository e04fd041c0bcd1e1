"""Error types whose messages are written for the operator (the CLI prints them as one line)."""

from __future__ import annotations

from pathlib import Path


class MirrorhaError(Exception):
    """Base of every error the CLI reports as one line on stderr with a non-zero exit."""


class ConfigError(MirrorhaError):
    """A configuration file is invalid: names the file, the line and the field at fault."""

    def __init__(self, file: Path | str, line: int | None, field: str, message: str) -> None:
        self.file = str(file)
        self.line = line
        self.field = field
        self.message = message
        where = f"{self.file}:{line}" if line is not None else self.file
        super().__init__(f"{where}: {field}: {message}")


class CommandRefused(MirrorhaError):
    """An operator command that makes no sense in the node's current state."""
