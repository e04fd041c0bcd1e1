"""An application run inside a lab node: appends chunks to a file, fsyncing after each one, and
records every call's outcome and duration, one JSON line per chunk, flushed at once (so the test
reads what happened even if this process is killed).

    python disk_writer.py FILE CHUNK_BYTES CHUNKS OUTPUT

Line fields: i (chunk index), offset, write_s / fsync_s (duration of the calls), write_error /
fsync_error (errno name or null; a chunk whose write failed is not fsynced: fsync_s is null).
Chunk i's bytes are `chunk(i, size)`: the test recomputes them to check what reached the disk.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import sys
import time


def chunk(i: int, size: int) -> bytes:
    """Deterministic, incompressible content of chunk i (no two chunks alike)."""
    block = hashlib.sha256(f"chunk {i}".encode()).digest()
    return (block * (size // len(block) + 1))[:size]


def _name(e: OSError) -> str:
    return errno.errorcode.get(e.errno or 0, str(e.errno))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def main(path: str, size: int, count: int, output: str) -> int:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    with open(output, "w") as out:
        for i in range(count):
            record: dict[str, object] = {"i": i, "offset": i * size, "write_error": None,
                                         "fsync_s": None, "fsync_error": None}
            data = chunk(i, size)
            t0 = time.monotonic()
            try:
                _write_all(fd, data)
            except OSError as e:
                record["write_error"] = _name(e)
            t1 = time.monotonic()
            record["write_s"] = t1 - t0
            if record["write_error"] is None:
                try:
                    os.fsync(fd)
                except OSError as e:
                    record["fsync_error"] = _name(e)
                record["fsync_s"] = time.monotonic() - t1
            else:
                os.lseek(fd, (i + 1) * size, os.SEEK_SET)  # the next chunk at its own offset
            out.write(json.dumps(record) + "\n")
            out.flush()
    os.close(fd)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]))
