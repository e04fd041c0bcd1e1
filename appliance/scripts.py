"""Runs the module's bin/start_prim and bin/stop_prim, SafeKit style, and makes sure a stopped
application really is stopped: whatever the scripts do, no process they started outlives
stop_app()."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import psutil

from appliance.modlog import ModuleLog

START = "start_prim"
STOP = "stop_prim"
POLL_S = 0.02


@dataclass(frozen=True)
class ScriptResult:
    script: str
    args: tuple[str, ...]
    exit_code: int | None  # None: not run (missing) or killed at its timeout
    timed_out: bool
    duration_s: float

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out

    @property
    def command(self) -> str:
        return " ".join((self.script, *self.args))


def write_safekit_shim(dir: Path, mirrorha_exe: str) -> Path:
    """`DIR/safekit` forwarding to mirrorha, so reference scripts calling
    `$SAFE/safekit printi "msg"` work unchanged when SAFE=DIR."""
    dir.mkdir(parents=True, exist_ok=True)
    shim = dir / "safekit"
    shim.write_text(
        "#!/bin/sh\n"
        "# SafeKit compatibility: scripts call $SAFE/safekit printi|printe 'message'.\n"
        f'exec {shlex.quote(mirrorha_exe)} "$@"\n'
    )
    shim.chmod(0o755)
    return shim


class ScriptRunner:
    """Blocking runner (the daemon calls it from a worker thread). Each script gets its own
    process group; the groups of start_prim are remembered as the application's, because
    background children (`app &`) keep their parent's group — that is how stop_app() finds
    what stop_prim left behind."""

    def __init__(
        self,
        bin_dir: Path,
        app_log: Path,
        env: Mapping[str, str],
        nicestoptimeout_s: float,
        forcestoptimeout_s: float,
        modlog: ModuleLog,
        kill_grace_s: float = 2.0,
    ) -> None:
        self.bin_dir = bin_dir
        self.app_log = app_log
        self.env = dict(env)
        self.nicestoptimeout_s = nicestoptimeout_s
        self.forcestoptimeout_s = forcestoptimeout_s
        self.modlog = modlog
        self.kill_grace_s = kill_grace_s
        self._lock = threading.Lock()
        self._app_groups: set[int] = set()

    def start_app(self) -> ScriptResult:
        return self._run(START, (), self.nicestoptimeout_s, remember_group=True)

    def stop_app(self) -> list[ScriptResult]:
        """stop_prim; if it fails or hangs, `stop_prim force`; then kill whatever is left of
        the application's process groups. An HA cluster must never leave the application
        running on a node it considers stopped (the peer is about to start it)."""
        nice = self._run(STOP, (), self.nicestoptimeout_s)
        results = [nice]
        runnable = nice.exit_code is not None or nice.timed_out
        if not nice.ok and runnable:
            results.append(self._run(STOP, ("force",), self.forcestoptimeout_s))
        self._kill_leftovers()
        return results

    def app_processes(self) -> list[int]:
        """Pids still alive (not zombies) in the application's remembered process groups."""
        with self._lock:
            groups = set(self._app_groups)
        found = _live_members(groups)
        with self._lock:
            # An empty group's number can be reused by an unrelated process: forget it.
            self._app_groups -= groups - {pgid for pgid, _ in found}
        return sorted(pid for _, pid in found)

    # -- running one script ------------------------------------------------------------------

    def _run(
        self, name: str, args: tuple[str, ...], timeout_s: float, remember_group: bool = False
    ) -> ScriptResult:
        command = " ".join((name, *args))
        path = self.bin_dir / name
        if not path.is_file() or not os.access(path, os.X_OK):
            self.modlog.error(f"{command} not run: {path} is missing or not executable")
            return ScriptResult(name, args, None, False, 0.0)
        started = time.monotonic()
        try:
            proc = self._spawn(path, command, args)
        except OSError as e:
            # A script without a shebang, with CRLF line ends, or a full disk for the log: a
            # failed script, not a reason for the daemon to die.
            self.modlog.error(f"{command} could not be run: {e}")
            return ScriptResult(name, args, None, False, time.monotonic() - started)
        if remember_group:
            with self._lock:
                self._app_groups.add(proc.pid)
        self.modlog.info(f"{command} started")
        return self._wait(proc, name, args, timeout_s, started)

    def _spawn(self, path: Path, command: str, args: tuple[str, ...]) -> subprocess.Popen[bytes]:
        self.app_log.parent.mkdir(parents=True, exist_ok=True)
        with self.app_log.open("ab") as out:
            stamp = datetime.now().strftime("%Y-%m-%d %H:%M:%S")
            out.write(f"==== {stamp} {command} ====\n".encode())
            out.flush()
            return subprocess.Popen(
                [str(path), *args],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.bin_dir.parent,
                env={**os.environ, **self.env},
                start_new_session=True,  # own process group, so a timeout can kill all of it
            )

    def _wait(
        self,
        proc: subprocess.Popen[bytes],
        name: str,
        args: tuple[str, ...],
        timeout_s: float,
        started: float,
    ) -> ScriptResult:
        command = " ".join((name, *args))
        try:
            code: int | None = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            members = [pid for _, pid in _live_members({proc.pid})]
            _signal_group(proc.pid, signal.SIGKILL)  # its time is spent: no second chance
            try:
                proc.wait(timeout=self.kill_grace_s)
            except subprocess.TimeoutExpired:
                # Uninterruptible sleep (hung storage): do not hang the daemon with it.
                self.modlog.error(f"{command} (pid {proc.pid}) does not die after SIGKILL; "
                                  "leaving it behind")
            # SIGKILL is delivered asynchronously: return only once the group is really gone.
            _wait_gone(members, self.kill_grace_s)
            self.modlog.error(
                f"{command} timed out after {timeout_s:g} s; its process group was killed"
            )
            return ScriptResult(name, args, None, True, time.monotonic() - started)
        duration = time.monotonic() - started
        if code == 0:
            self.modlog.info(f"{command} exited 0 after {duration:.2f} s")
        elif code is not None and code < 0:
            self.modlog.error(f"{command} killed by signal {-code} (see application log)")
        else:
            self.modlog.error(f"{command} failed with exit code {code} (see application log)")
        return ScriptResult(name, args, code, False, duration)

    # -- making sure the application is gone ---------------------------------------------------

    def _kill_leftovers(self) -> None:
        with self._lock:
            groups, self._app_groups = set(self._app_groups), set()
        pids = [pid for _, pid in _live_members(groups)]
        if not pids:
            return
        for pgid in groups:
            _signal_group(pgid, signal.SIGTERM)
        alive = _wait_gone(pids, self.kill_grace_s)
        if alive:
            for pgid in groups:
                _signal_group(pgid, signal.SIGKILL)
            alive = _wait_gone(alive, self.kill_grace_s)
        self.modlog.error(
            f"application still running after {STOP}: killed {len(pids) - len(alive)} "
            f"process(es) of its process groups (pids {', '.join(map(str, sorted(pids)))})"
        )
        if alive:
            self.modlog.error(
                f"{len(alive)} application process(es) survived SIGKILL "
                f"(pids {', '.join(map(str, alive))}); the application may still be running"
            )


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):  # the group is already empty
        os.killpg(pgid, sig)


def _live_members(groups: set[int]) -> list[tuple[int, int]]:
    """(pgid, pid) of every non-zombie process whose process group is in groups."""
    if not groups:
        return []
    found = []
    for p in psutil.process_iter():
        try:
            pgid = os.getpgid(p.pid)
            if pgid in groups and p.status() != psutil.STATUS_ZOMBIE:
                found.append((pgid, p.pid))
        except (ProcessLookupError, psutil.Error):
            continue  # exited while we looked
    return found


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _wait_gone(pids: list[int], timeout_s: float) -> list[int]:
    """Poll until the pids are dead (zombies count as dead); returns those still alive."""
    deadline = time.monotonic() + timeout_s
    alive = [pid for pid in pids if _alive(pid)]
    while alive and time.monotonic() < deadline:
        time.sleep(POLL_S)
        alive = [pid for pid in alive if _alive(pid)]
    return alive
