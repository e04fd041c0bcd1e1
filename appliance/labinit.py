"""PID 1 of a lab node's container: the smallest init that makes a PID namespace behave like a
server.

The lab starts it as `unshare --mount --pid --uts --fork --mount-proc … python -m
appliance.labinit [--hostname NAME] [--sysfs] [--bind SRC:DST]… -- ARGV…`. It then:

- gives the container the node's host name and a sysfs of the node's own network namespace
  (otherwise /sys/class/net would describe the host's interfaces, not the node's), and
  bind-mounts node-private directories over paths both nodes use (the replicated directories);
- names itself `labinit` (what `ps` shows as PID 1 inside the node) — the lab waits for that
  name as the sign that the container is set up;
- starts ARGV as its only direct child and reaps every process that dies in the container:
  orphans are reparented to PID 1, and nobody else would collect them;
- forwards SIGTERM / SIGINT to the child (PID 1 gets no default signal actions, so without a
  handler `kill 1` would do nothing);
- exits with the child's status as soon as the child exits. The kernel then SIGKILLs every
  remaining process of the namespace: exactly what a server losing its processes looks like.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

COMM = "labinit"
MS_BIND = 4096  # <sys/mount.h>
MS_REC = 16384
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class LabInitError(Exception):
    """labinit cannot set up the container; the message is printed before exiting with 127."""


@dataclass(frozen=True)
class Options:
    argv: tuple[str, ...]
    hostname: str | None = None
    sysfs: bool = False
    binds: tuple[tuple[str, str], ...] = ()  # (source, target) pairs


USAGE = "usage: labinit [--hostname NAME] [--sysfs] [--bind SRC:DST]… -- COMMAND [ARG…]"


def parse_args(args: list[str]) -> Options:
    """Hand-parsed: everything after `--` is the command, whatever options it has."""
    if "--" not in args:
        raise LabInitError(USAGE)
    split = args.index("--")
    own, argv = args[:split], args[split + 1 :]
    if not argv:
        raise LabInitError(f"labinit: no command after --\n{USAGE}")
    hostname: str | None = None
    sysfs = False
    binds: list[tuple[str, str]] = []
    i = 0
    while i < len(own):
        option, value = own[i], own[i + 1] if i + 1 < len(own) else None
        if option == "--sysfs":
            sysfs, i = True, i + 1
            continue
        if option == "--hostname" and value:
            hostname = value
        elif option == "--bind" and value and ":" in value:
            source, target = value.split(":", 1)
            binds.append((source, target))
        else:
            raise LabInitError(f"labinit: bad option {option!r}\n{USAGE}")
        i += 2
    return Options(tuple(argv), hostname, sysfs, tuple(binds))


def _mount(source: str, target: str, fstype: str | None, flags: int) -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    fs = fstype.encode() if fstype else None
    if libc.mount(source.encode(), target.encode(), fs, flags, None) != 0:
        err = ctypes.get_errno()
        raise LabInitError(f"labinit: cannot mount {source} on {target}: {os.strerror(err)}")


def mount_sysfs() -> None:
    # Same as `ip netns exec`: a fresh sysfs reflects the network namespace of whoever mounts it.
    # Our mount namespace is private (unshare --propagation private), the host never sees it.
    _mount("sysfs", "/sys", "sysfs", 0)


def bind_mount(source: str, target: str) -> None:
    # A node-private directory over a path both nodes use, as two servers each have their own.
    _mount(source, target, None, MS_BIND | MS_REC)


def set_comm(name: str) -> None:
    Path("/proc/self/comm").write_text(name)


def spawn(argv: tuple[str, ...]) -> int:
    # Python ignores SIGPIPE and SIGXFSZ; exec would keep them ignored in the child, so reset them
    # (subprocess does the same with restore_signals=True). Nothing is blocked in our mask.
    try:
        return os.posix_spawnp(
            argv[0],
            list(argv),
            os.environ,
            setsigdef=(signal.SIGPIPE, signal.SIGXFSZ, *FORWARDED_SIGNALS),
        )
    except OSError as e:
        raise LabInitError(f"labinit: cannot start {argv[0]}: {e.strerror}") from None


def exit_code(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return code if code >= 0 else 128 - code


class Forwarder:
    """Signal handler passing SIGTERM / SIGINT on to the child once it exists."""

    def __init__(self) -> None:
        self.child: int | None = None

    def __call__(self, signum: int, _frame: FrameType | None) -> None:
        if self.child is None:
            # Nothing started yet, so nothing to stop gracefully: behave like the default action.
            os._exit(128 + signum)
        # ProcessLookupError: already gone, its exit is about to be reaped by supervise().
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.child, signum)


def supervise(child: int) -> int:
    """Reap every process until `child` exits; return the exit code to exit with."""
    while True:
        # Blocks until any process of the namespace dies; Python retries it after a handler ran.
        pid, status = os.waitpid(-1, 0)
        if pid == child:
            return exit_code(status)


def main(args: list[str] | None = None) -> int:
    forwarder = Forwarder()
    # Installed first: PID 1 of a namespace does not even get the default action of a signal it
    # has no handler for, so a SIGTERM before this point would be silently lost.
    for sig in FORWARDED_SIGNALS:
        signal.signal(sig, forwarder)
    try:
        options = parse_args(sys.argv[1:] if args is None else args)
        if options.hostname:
            socket.sethostname(options.hostname)
        if options.sysfs:
            mount_sysfs()
        for source, target in options.binds:
            bind_mount(source, target)
        set_comm(COMM)
        forwarder.child = spawn(options.argv)
    except LabInitError as e:
        print(e, file=sys.stderr, flush=True)
        return 127
    return supervise(forwarder.child)


if __name__ == "__main__":
    sys.exit(main())
