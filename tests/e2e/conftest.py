"""The two-node lab as a fixture: real network namespaces, real daemons, real VIP, real app.

Every test gets a fresh cluster and always tears it down. A monitor samples both nodes' processes
for the whole test and fails it if the application ever ran on both nodes at once.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.lab import Lab, LabSettings
from appliance.waiting import wait_until

pytestmark = pytest.mark.slow

class DualRunMonitor:
    """Samples which nodes run the application; records every instant both did."""

    def __init__(self, lab: Lab, interval: float = 0.02, comm: str | None = None) -> None:
        self.lab = lab
        self.interval = interval
        self.comm = comm  # the application's process name (default: the lab's sample app)
        self.violations: list[dict[str, list[int]]] = []
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            pids = self.lab.app_pids(self.comm) if self.comm else self.lab.app_pids()
            self.samples += 1
            if all(pids.get(n) for n in Lab.NODES):
                self.violations.append(pids)
            self._stop.wait(self.interval)

    def __enter__(self) -> DualRunMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


class Cluster:
    """Test-side helpers around the lab."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab

    def state(self, node: str) -> dict[str, Any] | None:
        if not self.lab.node_alive(node):
            return None
        res = self.lab.mirrorha(node, "state", "--json", check=False)
        if res.returncode != 0:
            return None
        return json.loads(res.stdout)

    def state_name(self, node: str) -> str | None:
        st = self.state(node)
        return st["state"] if st else None

    def wait_state(self, node: str, *states: str, timeout: float = 15.0) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            st = self.state(node)
            if st and st["state"] in states and not st["busy"]:
                if st["state"] == "SECOND" and not st["in_sync"]:
                    return None
                return st
            return None
        return wait_until(reached, timeout, f"{node} in {'/'.join(states)}")

    def wait_pair(self, prim: str, second: str, timeout: float = 20.0) -> None:
        self.wait_state(second, "SECOND", timeout=timeout)
        self.wait_state(prim, "PRIM", timeout=timeout)

    def vip_body(self) -> str | None:
        return self.lab.client_http_get(f"http://{Lab.VIP}/", timeout=0.5)

    def wait_served_by(self, node: str, timeout: float = 15.0) -> None:
        wait_until(lambda: (self.vip_body() or "").strip() == node, timeout,
                   f"the VIP to be served by {node}")

    def module_log(self, node: str) -> str:
        path = self.lab.node_home(node) / "mirror" / "log" / "module.log"
        return path.read_text() if path.exists() else ""

    def cmd(self, node: str, *args: str, check: bool = True) -> Any:
        return self.lab.mirrorha(node, *args, check=check)

    def cluster_key(self) -> bytes:
        from appliance.keys import load_cluster_key
        return load_cluster_key(self.lab.node_paths("node1").cluster_key)

    def send_heartbeat_frames(self, sender: str, target: str, key: bytes, count: int,
                              epoch: int | None = None, seq: int = 1) -> int:
        """Send `count` heartbeat frames that claim to come from `sender`, from inside the
        sender's namespace and address, to `target`'s heartbeat port: forged (wrong key) or
        replayed (right key, old epoch/seq)."""
        src = self.lab.address(sender, "default")
        dst = self.lab.address(target, "default")
        forge = Path(__file__).with_name("hb_forge.py")
        stamp = epoch if epoch is not None else time.time_ns()
        res = self.lab.node_run(sender, [
            str(self.lab.python), str(forge), src, dst, "4800", sender, key.hex(), str(count),
            str(stamp), str(seq)])
        return int(res.stdout.strip())


ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
# Two labs with different prefixes are fully separate (own namespaces, lab dir, registry), so
# two developers (or loops) may run the e2e tests side by side.
E2E_PREFIX = os.environ.get("MIRRORHA_E2E_PREFIX", "mhe")


def keep_logs(lab: Lab, test_name: str) -> None:
    """Copy both nodes' logs out of the lab before it is torn down (read them after a failure)."""
    dest = ARTIFACTS / test_name
    shutil.rmtree(dest, ignore_errors=True)
    for node in Lab.NODES:
        for src in (lab.daemon_out(node), *sorted(lab.node_paths(node).log_dir.glob("*.log"))):
            if src.exists():
                (dest / node).mkdir(parents=True, exist_ok=True)
                shutil.copy(src, dest / node / src.name)


def make_lab(prefix: str, settings: LabSettings, test_name: str,
             **options: Any) -> Iterator[Cluster]:
    """options: further keyword arguments of Lab (private_dirs, private_dir_limits...)."""
    lab = Lab(prefix=prefix, settings=settings, **options)
    try:
        lab.up()
        yield Cluster(lab)
    finally:
        keep_logs(lab, test_name)
        lab.down()


@pytest.fixture
def lab_settings() -> LabSettings:
    return LabSettings()


@pytest.fixture
def lab_options() -> dict[str, Any]:
    """Keyword arguments of Lab beyond the settings (a test module overrides this fixture)."""
    return {}


@pytest.fixture
def cluster(lab_settings: LabSettings, lab_options: dict[str, Any],
            request: pytest.FixtureRequest) -> Iterator[Cluster]:
    if os.geteuid() != 0:
        pytest.skip("the lab needs root (network namespaces, VIPs)")
    for c in make_lab(E2E_PREFIX, lab_settings, request.node.name, **lab_options):
        with DualRunMonitor(c.lab) as monitor:
            t0 = time.monotonic()
            yield c
        assert monitor.samples > 0, "the dual-run monitor never sampled"
        assert not monitor.violations, (
            f"the application ran on both nodes at once ({len(monitor.violations)} samples "
            f"in {time.monotonic() - t0:.1f} s): {monitor.violations[:3]}")
