"""Writing a node's own files safely: atomically (a reader sees the old file or the new one,
never half of one) and with the final permissions from creation on (a key never exists, even
briefly, readable by others)."""

from __future__ import annotations

import os
from pathlib import Path


def stage_file(path: Path, data: bytes, mode: int) -> Path:
    """`data` written and synced beside `path` with exactly `mode` from creation on;
    os.replace(returned, path) then installs it (several files can be staged first and
    installed together, so that a failure while writing leaves all of them as they were)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # the umask may have narrowed it
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace `path` with `data` (mode 0600 unless told), creating its directory — only root
    may enter one created here — when missing."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.replace(stage_file(path, data, mode), path)
