"""ScriptRunner with real shell scripts and real processes (timeouts of 0.3 s)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from appliance.modlog import ModuleLog
from appliance.scripts import ScriptRunner, write_safekit_shim
from appliance.waiting import wait_until

TIMEOUT_S = 0.3


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@dataclass(frozen=True)
class Module:
    dir: Path
    runner: ScriptRunner

    @property
    def module_log(self) -> str:
        return (self.dir / "log" / "module.log").read_text()

    @property
    def app_log(self) -> str:
        return (self.dir / "log" / "application.log").read_text()

    def script(self, name: str, body: str) -> None:
        path = self.dir / "bin" / name
        path.write_text("#!/bin/sh\n" + body)
        path.chmod(0o755)

    def pid(self, name: str) -> int:
        path = self.dir / name
        wait_until(lambda: path.exists() and path.read_text().strip() != "", 2.0, f"{name}")
        return int(path.read_text())


@pytest.fixture
def module(tmp_path: Path) -> Iterator[Module]:
    mod_dir = tmp_path / "mirror"
    (mod_dir / "bin").mkdir(parents=True)
    fake_mirrorha = tmp_path / "fake-mirrorha"
    fake_mirrorha.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/safekit-calls\n')
    fake_mirrorha.chmod(0o755)
    shim_dir = tmp_path / "safe"
    write_safekit_shim(shim_dir, str(fake_mirrorha))
    env = {
        "MIRRORHA_HOME": str(tmp_path),
        "MIRRORHA_MODULE": "mirror",
        "MIRRORHA_NODE": "n1",
        "SAFE": str(shim_dir),
    }
    runner = ScriptRunner(
        bin_dir=mod_dir / "bin",
        app_log=mod_dir / "log" / "application.log",
        env=env,
        nicestoptimeout_s=TIMEOUT_S,
        forcestoptimeout_s=TIMEOUT_S,
        modlog=ModuleLog(mod_dir / "log" / "module.log", "n1"),
        kill_grace_s=1.0,
    )
    mod = Module(mod_dir, runner)
    try:
        yield mod
    finally:
        pids = set(runner.app_processes())
        pids |= {int(p.read_text()) for p in mod_dir.glob("*.pid") if p.read_text().strip()}
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_start_prim_gets_env_cwd_and_safekit_shim_and_its_output_goes_to_app_log(
    module: Module,
) -> None:
    module.script(
        "start_prim",
        'echo "home=$MIRRORHA_HOME module=$MIRRORHA_MODULE node=$MIRRORHA_NODE cwd=$(pwd)"\n'
        'echo "to stderr" >&2\n'
        '$SAFE/safekit printi "application started"\n',
    )

    result = module.runner.start_app()

    assert result.ok
    assert result.script == "start_prim"
    assert result.args == ()
    home = module.dir.parent
    app_log = module.app_log
    assert "==== " in app_log and " start_prim ====" in app_log
    assert f"home={home} module=mirror node=n1 cwd={module.dir}" in app_log
    assert "to stderr" in app_log
    assert (home / "safekit-calls").read_text() == "printi application started\n"
    assert " n1 I start_prim started" in module.module_log
    assert " n1 I start_prim exited 0 after " in module.module_log


def test_failing_start_reports_its_exit_code(module: Module) -> None:
    module.script("start_prim", "echo 'cannot bind port' >&2\nexit 3\n")

    result = module.runner.start_app()

    assert result.exit_code == 3
    assert not result.ok
    assert not result.timed_out
    assert "cannot bind port" in module.app_log
    assert " n1 E start_prim failed with exit code 3 (see application log)" in module.module_log


def test_missing_script_is_logged_not_raised(module: Module) -> None:
    result = module.runner.start_app()

    assert result.exit_code is None
    assert not result.timed_out
    assert " n1 E start_prim not run: " in module.module_log
    assert "missing or not executable" in module.module_log


def test_hanging_stop_is_killed_at_nicestoptimeout_then_force_stop_runs(module: Module) -> None:
    module.script(
        "stop_prim",
        'if [ "$1" = force ]; then echo "forced stop"; exit 0; fi\n'
        "sleep 1000 &\necho $! > stopper.pid\nwait\n",
    )

    started = time.monotonic()
    nice, force = module.runner.stop_app()

    assert nice.timed_out
    assert nice.exit_code is None
    assert TIMEOUT_S <= nice.duration_s < TIMEOUT_S + 1.0
    assert force.args == ("force",)
    assert force.ok
    assert time.monotonic() - started < 2.0
    assert gone(module.pid("stopper.pid"))  # the whole group of the hung script was killed
    assert "forced stop" in module.app_log
    assert "stop_prim timed out after 0.3 s" in module.module_log
    assert " n1 I stop_prim force exited 0 after " in module.module_log


def test_application_left_running_by_stop_prim_is_killed_and_logged(module: Module) -> None:
    module.script("start_prim", "sleep 1000 &\necho $! > app.pid\n")
    module.script("stop_prim", 'echo "stop_prim forgot the app"\n')
    assert module.runner.start_app().ok
    app = module.pid("app.pid")
    assert module.runner.app_processes() == [app]

    results = module.runner.stop_app()

    assert [r.ok for r in results] == [True]
    wait_until(lambda: gone(app), 2.0, "the application process to die")
    assert module.runner.app_processes() == []
    assert "application still running after stop_prim: killed 1 process(es)" in module.module_log
    assert f"(pids {app})" in module.module_log


def test_application_stopped_by_stop_prim_is_not_reported_as_killed(module: Module) -> None:
    module.script("start_prim", "sleep 1000 &\necho $! > app.pid\n")
    module.script("stop_prim", "kill $(cat app.pid)\n")
    assert module.runner.start_app().ok
    app = module.pid("app.pid")

    module.runner.stop_app()

    wait_until(lambda: gone(app), 2.0, "the application process to die")
    assert "still running" not in module.module_log
    assert module.runner.app_processes() == []


def test_failed_nice_stop_runs_force_stop_which_may_clean_up(module: Module) -> None:
    module.script("start_prim", "sleep 1000 &\necho $! > app.pid\n")
    module.script(
        "stop_prim",
        'if [ "$1" = force ]; then kill -9 $(cat app.pid); exit 0; fi\nexit 1\n',
    )
    module.runner.start_app()
    app = module.pid("app.pid")

    nice, force = module.runner.stop_app()

    assert nice.exit_code == 1
    assert force.ok
    wait_until(lambda: gone(app), 2.0, "the application process to die")
    assert "stop_prim failed with exit code 1" in module.module_log


def test_start_that_times_out_is_killed_with_what_it_started(module: Module) -> None:
    module.script("start_prim", "sleep 1000 &\necho $! > app.pid\nwait\n")

    result = module.runner.start_app()

    assert result.timed_out
    assert gone(module.pid("app.pid"))
    assert module.runner.app_processes() == []
    assert "start_prim timed out after 0.3 s; its process group was killed" in module.module_log


def test_module_log_lines_carry_time_node_level_and_state(tmp_path: Path) -> None:
    log = ModuleLog(tmp_path / "log" / "module.log", "node2")
    log.info("no heartbeat from node1; taking the VIP", state="SECOND -> ALONE:")
    log.warning("line one\nline two")
    log.error("stop_prim failed")

    lines = ModuleLog.tail(tmp_path / "log" / "module.log", 2)

    first = (tmp_path / "log" / "module.log").read_text().splitlines()[0]
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} node2 I SECOND -> ALONE: no heartbeat from "
        r"node1; taking the VIP",
        first,
    )
    assert lines[0].endswith(" node2 W line one | line two")
    assert lines[1].endswith(" node2 E stop_prim failed")
    assert ModuleLog.tail(tmp_path / "absent.log", 5) == []


@pytest.mark.parametrize("content", [b"#!/bin/sh\r\necho hi\r\n", b"echo no shebang\n"])
def test_script_that_cannot_be_executed_is_a_failed_script_not_a_crash(
        module: Module, content: bytes) -> None:
    path = module.dir / "bin" / "start_prim"
    path.write_bytes(content)  # CRLF line ends (edited on Windows) or no interpreter line
    path.chmod(0o755)
    result = module.runner.start_app()  # exec fails (ENOENT "/bin/sh\r", ENOEXEC): no raise
    assert result.exit_code is None and not result.timed_out
    assert "E start_prim could not be run: [Errno" in module.module_log
