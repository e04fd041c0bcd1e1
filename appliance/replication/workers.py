"""Blocking calls from the replication's trio loops, and the process's memory setting.

`in_worker(fn, *args)` runs fn in a dedicated thread that wakes the trio task through an
eventfd: lighter than trio.to_thread (measured here: about 40 us a hop against 150 us, which
names the thread twice per call and wakes trio through its wake-up socket). Used for the
fsyncs of the FUSE mounts and for the secondary's applier. Idle threads are kept for reuse;
one whose caller was cancelled while it ran is not reused (its eventfd may still fire).
"""

from __future__ import annotations

import ctypes
import os
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import trio

T = TypeVar("T")
_Job = tuple[Callable[..., Any], tuple[Any, ...]]


class BlockingWorker:
    """A thread running one call at a time for a trio task, which waits on its eventfd."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._result: Any = None
        self._error: BaseException | None = None
        threading.Thread(target=self._loop, name="mirrorha worker", daemon=True).start()

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            fn, args = job
            try:
                self._result, self._error = fn(*args), None
            except BaseException as e:  # handed to the caller, in its task
                self._result, self._error = None, e
            os.eventfd_write(self._efd, 1)
        os.close(self._efd)

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        self.start(fn, *args)
        return await self.result()  # type: ignore[no-any-return]

    def start(self, fn: Callable[..., Any], *args: Any) -> None:
        """Start fn(*args) in the thread; `result()` waits for it."""
        self._jobs.put((fn, args))

    async def result(self) -> Any:
        while True:
            await trio.lowlevel.wait_readable(self._efd)
            try:
                os.eventfd_read(self._efd)
                break
            except BlockingIOError:
                continue
        result, error = self._result, self._error
        self._result = self._error = None
        if error is not None:
            raise error
        return result

    def stop(self) -> None:
        self._jobs.put(None)  # after the call it may still run: closes its eventfd then


_idle: list[BlockingWorker] = []  # per process: callers come and go, threads stay
_idle_lock = threading.Lock()  # trio loops of several threads share the list


async def in_worker(fn: Callable[..., T], *args: Any) -> T:
    """fn(*args) in an idle BlockingWorker (started if none is idle)."""
    worker = idle_worker()
    worker.start(fn, *args)
    return await worker_result(worker)  # type: ignore[no-any-return]


def idle_worker() -> BlockingWorker:
    """A worker for one job: `start` it, then `await worker_result(worker)` (which gives it
    back): for a call that must begin at a moment of the caller's choosing."""
    with _idle_lock:
        worker = _idle.pop() if _idle else None
    return worker if worker is not None else BlockingWorker()


async def worker_result(worker: BlockingWorker) -> Any:
    try:
        result = await worker.result()
    except BaseException as e:
        if isinstance(e, trio.Cancelled):
            worker.stop()  # cancelled while fn may still run: not reused
            raise
        _give_back(worker)
        raise
    _give_back(worker)
    return result


def _give_back(worker: BlockingWorker) -> None:
    with _idle_lock:
        _idle.append(worker)


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_BYTES = 32 * 1024 * 1024  # larger than any frame (MAX_FRAME is about 4 MiB)
_TRIM_BYTES = 64 * 1024 * 1024


def keep_large_buffers() -> None:
    """Every FUSE write (up to 1 MiB) is a new bytes object, and so is each frame made of it.
    By default glibc serves such blocks with a fresh mmap and gives them back with munmap, so
    every one of them page-faults in again: measured here, a 1 MiB copy took 1.7 ms that way
    against 55 us from the heap. Keep them in the heap instead (the process then holds on to
    up to _TRIM_BYTES of freed memory)."""
    _libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_BYTES)
    _libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_BYTES)
