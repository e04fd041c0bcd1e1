"""The file-system workloads of bench/replication, one process each, timing themselves.

Run where the files must go (on the host, or inside a lab node through its replicated mount):

    python -m bench.workloads seq    --dir D --bytes N      1 MiB writes to one file, fsync at end
    python -m bench.workloads fsync  --dir D --count N      4 KiB appends, fsync after each
    python -m bench.workloads files  --dir D --count N      N small files created, dirs fsynced
    python -m bench.workloads dataset --dir D --bytes N     the reintegration dataset
    python -m bench.workloads change  --dir D --percent P   rewrite P % of that dataset
    python -m bench.workloads clean   --dir D               remove D, then fsync its parent

Each prints one JSON line: the wall-clock start and end (epoch seconds, so that two workloads
started together can be combined) and what was done. The time is taken inside the workload,
so entering a node (nsenter, interpreter start) is not counted. `--start-at T` waits until
epoch time T before starting: two copies started that way run truly concurrently.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

SEQ_BLOCK = 1024 * 1024
SMALL_WRITE = 4096
SMALL_FILE = 1024  # bytes in each created file
FILES_PER_DIR = 1000  # keeps directories at a size every file system handles well
# The reintegration dataset is made of this many equal files: 1 % of it is exactly 2 files.
DATASET_FILES = 200


@dataclass(frozen=True)
class Timing:
    workload: str
    start: float  # epoch seconds
    end: float
    bytes: int
    ops: int  # writes, fsyncs or files, depending on the workload

    @property
    def seconds(self) -> float:
        return self.end - self.start


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sequential(directory: Path, total: int) -> Timing:
    """`total` bytes written in 1 MiB writes to a new file, one fsync at the end."""
    block = os.urandom(SEQ_BLOCK)  # incompressible; the same block each time is enough
    path = directory / "seq.bin"
    start = time.time()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        written = 0
        while written < total:
            written += os.write(fd, block[: min(SEQ_BLOCK, total - written)])
        os.fsync(fd)
    finally:
        os.close(fd)
    return Timing("seq", start, time.time(), written, written // SEQ_BLOCK)


def fsync_writes(directory: Path, count: int) -> Timing:
    """`count` 4 KiB appends to a new file, each followed by fsync (a commit log's pattern)."""
    block = os.urandom(SMALL_WRITE)
    path = directory / "fsync.bin"
    start = time.time()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for _ in range(count):
            os.write(fd, block)
            os.fsync(fd)
    finally:
        os.close(fd)
    return Timing("fsync", start, time.time(), count * SMALL_WRITE, count)


def small_files(directory: Path, count: int) -> Timing:
    """`count` files of 1 KiB created (1000 per subdirectory), then every directory fsynced:
    on a replicated mount that fsync returns once the secondary has applied all of it."""
    data = os.urandom(SMALL_FILE)
    top = directory / "files"
    start = time.time()
    top.mkdir()
    subdirs: list[Path] = []
    for i in range(count):
        if i % FILES_PER_DIR == 0:
            subdirs.append(top / f"d{i // FILES_PER_DIR:04d}")
            subdirs[-1].mkdir()
        fd = os.open(subdirs[-1] / f"f{i:06d}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
    for sub in subdirs:
        _fsync_dir(sub)
    _fsync_dir(top)
    return Timing("files", start, time.time(), count * SMALL_FILE, count)


def dataset_file_size(total: int) -> int:
    """Size of each of the DATASET_FILES files making `total` bytes (whole 4 KiB pages)."""
    return max(SMALL_WRITE, total // DATASET_FILES // SMALL_WRITE * SMALL_WRITE)


def dataset(directory: Path, total: int) -> Timing:
    """The reintegration dataset: `total` bytes in DATASET_FILES files under data/, fsynced."""
    top = directory / "data"
    top.mkdir(exist_ok=True)
    size = dataset_file_size(total)
    start = time.time()
    written = 0
    for i in range(DATASET_FILES):
        written += _write_file(top / f"f{i:05d}", os.urandom(size))
    _fsync_dir(top)
    return Timing("dataset", start, time.time(), written, DATASET_FILES)


def change(directory: Path, percent: float) -> Timing:
    """Rewrite `percent` % of the dataset's files in place with new data (same size, so
    `percent` % of its bytes): the change a node misses while it is down."""
    top = directory / "data"
    files = sorted(top.iterdir())
    changed = max(1, round(len(files) * percent / 100))
    # Spread over the dataset rather than the first files: nothing may depend on their order.
    step = len(files) / changed
    chosen = [files[int(i * step)] for i in range(changed)]
    start = time.time()
    written = sum(_write_file(path, os.urandom(path.stat().st_size)) for path in chosen)
    _fsync_dir(top)
    return Timing("change", start, time.time(), written, changed)


def clean(directory: Path) -> Timing:
    """Remove `directory` and fsync its parent. On a replicated mount that fsync returns once
    the secondary has applied the removal too: the next measurement starts with nothing of
    this one still in flight."""
    start = time.time()
    shutil.rmtree(directory, ignore_errors=True)
    _fsync_dir(directory.parent)
    return Timing("clean", start, time.time(), 0, 1)


def _write_file(path: Path, data: bytes) -> int:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)  # no O_TRUNC: rewritten in place
    try:
        written = 0
        view = memoryview(data)
        while written < len(data):
            written += os.write(fd, view[written : written + SEQ_BLOCK])
        os.fsync(fd)
    finally:
        os.close(fd)
    return written


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.workloads",
                                     description="One timed file-system workload.")
    parser.add_argument("workload", choices=("seq", "fsync", "files", "dataset", "change", "clean"))
    parser.add_argument("--dir", type=Path, required=True, help="where the files go")
    parser.add_argument("--bytes", type=int, default=0, help="seq, dataset: bytes to write")
    parser.add_argument("--count", type=int, default=0, help="fsync: writes; files: files")
    parser.add_argument("--percent", type=float, default=1.0, help="change: share of the files")
    parser.add_argument("--start-at", type=float, help="epoch time to start at")
    return parser


def run(args: argparse.Namespace) -> Timing:
    if args.start_at is not None:
        time.sleep(max(0.0, args.start_at - time.time()))  # a rendezvous, not a synchronisation
    match args.workload:
        case "seq":
            return sequential(args.dir, args.bytes)
        case "fsync":
            return fsync_writes(args.dir, args.count)
        case "files":
            return small_files(args.dir, args.count)
        case "dataset":
            return dataset(args.dir, args.bytes)
        case "clean":
            return clean(args.dir)
        case _:
            return change(args.dir, args.percent)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        timing = run(args)
    except OSError as e:
        print(f"bench.workloads {args.workload}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(asdict(timing)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
