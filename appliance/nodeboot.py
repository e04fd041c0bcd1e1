"""What an appliance's init starts at boot, for the lab's node containers (on a real appliance
systemd does the same with mirrorha-console.service and mirrorha.service).

    python -m appliance.nodeboot [--console] [-- DAEMON ARGV…]

- `--console`: the web console (`mirrorha console`) runs in the background;
- the daemon: DAEMON ARGV if given (the configured lab: `mirrorha daemon --start`), otherwise
  `mirrorha daemon --start` only when boot start is on (`mirrorha boot on` wrote its unit in
  $MIRRORHA_UNIT_DIR), as systemd would start an enabled unit. A node that is not configured
  yet, or whose boot start is off, boots with the console alone: the console starts the
  daemon when the operator configures or starts the module.

The console, or else the daemon, is the "main" process: when it exits, nodeboot exits with its
status, so the container ends (labinit exits and the kernel kills the rest, like a server going
down).
SIGTERM / SIGINT are passed on to every child.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from types import FrameType

from appliance.cli import unit_path


def _mirrorha() -> list[str]:
    return [sys.executable, "-m", "appliance.cli"]


def boot_argv(args: Sequence[str]) -> tuple[bool, list[str] | None]:
    """(console?, daemon argv or None) from nodeboot's own arguments."""
    args = list(args)
    daemon: list[str] | None = None
    if "--" in args:
        split = args.index("--")
        args, daemon = args[:split], args[split + 1:] or None
    unknown = [a for a in args if a != "--console"]
    if unknown:
        raise SystemExit(f"nodeboot: unknown option(s) {' '.join(unknown)}; usage: "
                         "nodeboot [--console] [-- DAEMON ARGV…]")
    if daemon is None and unit_path().exists():
        daemon = [*_mirrorha(), "daemon", "--start"]
    return "--console" in args, daemon


def main(args: Sequence[str] | None = None) -> int:
    console, daemon = boot_argv(sys.argv[1:] if args is None else args)
    children: list[subprocess.Popen[bytes]] = []
    running: set[int] = set()
    stopping: list[int] = []

    def forward(signum: int, _frame: FrameType | None) -> None:
        stopping.append(signum)
        for child in children:
            if child.pid in running:  # never signal a pid already reaped (it may be reused)
                with contextlib.suppress(ProcessLookupError):
                    child.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    if daemon is not None:
        children.append(subprocess.Popen(daemon))
    if console:
        children.append(subprocess.Popen([*_mirrorha(), "console"]))
    if not children:
        raise SystemExit("nodeboot: nothing to start (no --console, no daemon argv, boot start "
                         "off)")
    running.update(c.pid for c in children)
    # The console is the main process when there is one: it restarts the daemon itself
    # (SIGTERM, then a new one) when a configuration change needs it, which must not end the
    # node. Every child that exits is reaped here (we are its parent). On SIGTERM we return
    # only once every child has exited: the daemon's orderly stop (stop_prim, VIP) must not be
    # cut short by the container ending under it.
    main_pid, code = children[-1].pid, 0
    while running:
        pid, status = os.wait()
        running.discard(pid)
        if pid == main_pid:
            code = os.waitstatus_to_exitcode(status)
            if not stopping:
                return code
    return code

if __name__ == "__main__":
    sys.exit(main())
