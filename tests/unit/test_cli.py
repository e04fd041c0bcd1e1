"""The CLI's contract with operators: one line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.cli import main

FIXTURE = Path(__file__).parents[1] / "fixtures" / "config" / "reference_userconfig.xml"


def filled_reference(tmp_path: Path) -> Path:
    text = FIXTURE.read_text().replace("VIRTUAL_TO_BE_DEFINED", "198.51.100.100")
    path = tmp_path / "userconfig.xml"
    path.write_text(text.replace("PROCESS_NAME", "postgres"))
    return path


def test_config_check_accepts_the_filled_reference(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    path = filled_reference(tmp_path)
    assert main(["config", "check", "--userconfig", str(path),
                 "--cluster", str(tmp_path / "none.xml")]) == 0
    out = capsys.readouterr()
    assert f"{path}: OK" in out.out
    assert "typographic quotes" in out.err  # the published file's curly quotes are reported


def test_config_check_names_file_line_and_field(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    path = filled_reference(tmp_path)
    lines = path.read_text().splitlines()
    number = next(i for i, line in enumerate(lines, 1) if "<heart " in line)
    path.write_text(path.read_text().replace('timeout="30000"', 'timeout="soon"'))
    assert main(["config", "check", "--userconfig", str(path),
                 "--cluster", str(tmp_path / "none.xml")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"mirrorha: {path}:{number}: heart@timeout: ")
    assert len(err.splitlines()) == 1


def test_commands_without_a_daemon_fail_with_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "MIRRORHA_HOME": str(tmp_path)}
    res = subprocess.run([sys.executable, "-m", "appliance.cli", "swap"], env=env,
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 1
    assert "daemon is not running" in res.stderr and "Traceback" not in res.stderr


def test_daemon_without_the_cluster_key_refuses_to_start(tmp_path: Path) -> None:
    (tmp_path / "cluster.xml").write_text(
        '<cluster><lans><lan name="default">'
        '<node name="node1" addr="127.0.0.1"/><node name="node2" addr="127.0.0.2"/>'
        "</lan></lans></cluster>")
    conf = tmp_path / "mirror" / "conf"
    conf.mkdir(parents=True)
    (conf / "userconfig.xml").write_text(
        '<safe><service mode="mirror"><heart pulse="100" timeout="600">'
        '<heartbeat name="default"/></heart></service></safe>')
    env = {**os.environ, "MIRRORHA_HOME": str(tmp_path), "MIRRORHA_NODE": "node1"}
    res = subprocess.run([sys.executable, "-m", "appliance.cli", "daemon"], env=env,
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 1
    assert "no cluster key" in res.stderr and "cluster init" in res.stderr
    assert not (tmp_path / "mirror" / "control.sock").exists()


def test_cluster_init_export_import_installs_key_and_certificates_on_the_peer(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    monkeypatch.setenv("MIRRORHA_HOME", str(a))
    assert main(["cluster", "init", "--nodes", "node1,node2"]) == 0
    assert (a / "cluster.key").stat().st_mode & 0o777 == 0o600
    assert main(["cluster", "init", "--nodes", "node1,node2"]) == 1  # never silently replaced
    capsys.readouterr()
    assert main(["cluster", "export", "node2"]) == 0
    exported = tmp_path / "bundle"
    exported.write_text(capsys.readouterr().out)
    monkeypatch.setenv("MIRRORHA_HOME", str(b))
    assert main(["cluster", "import", str(exported)]) == 0
    assert (a / "cluster.key").read_text() == (b / "cluster.key").read_text()
    assert sorted(p.name for p in (b / "pki").iterdir()) == ["ca.pem", "node2.key", "node2.pem"]
    assert (b / "pki" / "node2.key").stat().st_mode & 0o777 == 0o600
    # The peer can now talk TLS to this node: its certificate chains to the same CA.
    from appliance.replication.tls import client_context, server_context
    server_context(a / "pki", "node1")
    client_context(b / "pki", "node2", "node1")


def test_boot_on_writes_a_unit_that_starts_the_module_and_off_removes_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MIRRORHA_UNIT_DIR", str(tmp_path / "units"))
    monkeypatch.setenv("MIRRORHA_HOME", str(tmp_path / "home"))
    unit = tmp_path / "units" / "mirrorha.service"
    assert main(["boot", "on"]) == 0
    text = unit.read_text()
    assert "daemon --start" in text and f"MIRRORHA_HOME={tmp_path / 'home'}" in text
    assert "WantedBy=multi-user.target" in text
    assert main(["boot", "off"]) == 0
    assert not unit.exists()
