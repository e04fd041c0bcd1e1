"""The web console in a real browser (Playwright driving Debian's Chromium), against a freshly
installed, unconfigured lab pair: the reference's whole flow from one browser, on node1's
console only — add both nodes, create the module, configure, first start from the recommended
node, failover from a node's menu, both logs, advanced editing redeployed to both nodes,
snapshots. Screenshots of every step go to test-artifacts/console/ (the dashboard one is also
docs/console.png, shown in the README)."""

from __future__ import annotations

import io
import os
import re
import shutil
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.lab import Lab, LabSettings
from tests.e2e.conftest import ARTIFACTS, Cluster, make_lab

pytestmark = pytest.mark.slow

playwright_api = pytest.importorskip("playwright.sync_api", reason="pip install -e '.[dev]'")
expect = playwright_api.expect
Page = playwright_api.Page
LocatorAssertions = playwright_api.LocatorAssertions

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
PREFIX = os.environ.get("MIRRORHA_BROWSER_E2E_PREFIX", "mhb2")
DATA = Path("/srv/mhb2data")  # the replicated dir: private to each lab node
SHOTS = ARTIFACTS / "console"
README_SHOT = Path(__file__).resolve().parents[2] / "docs" / "console.png"
XSS = "<script>alert(1)</script>"
# A state change seen by the browser: the daemon acts, then the next 1 s poll shows it.
STATE_MS = 30_000


@pytest.fixture
def lab() -> Iterator[Cluster]:
    if os.geteuid() != 0:
        pytest.skip("the lab needs root (network namespaces, VIPs)")
    yield from make_lab(PREFIX, LabSettings(), "test_console_browser", console=True,
                        configured=False, private_dirs=[DATA])


@pytest.fixture
def page(tmp_path: Path) -> Iterator[Page]:
    if not CHROMIUM.exists():
        pytest.skip("needs Debian's chromium (scripts/bootstrap.sh installs it)")
    with playwright_api.sync_playwright() as pw:
        # The console's certificate is issued by the cluster's own CA: not one Chromium knows.
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=str(CHROMIUM),
            args=CHROMIUM_ARGS, headless=True, ignore_https_errors=True,
            accept_downloads=True, viewport={"width": 1280, "height": 800})
        try:
            context.set_default_timeout(20_000)
            yield context.pages[0] if context.pages else context.new_page()
        finally:
            context.close()


class Shots:
    """Numbered screenshots of the scenario's steps."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.n = 0
        shutil.rmtree(SHOTS, ignore_errors=True)
        SHOTS.mkdir(parents=True)

    def __call__(self, name: str, full_page: bool = False) -> Path:
        self.n += 1
        path = SHOTS / f"{self.n:02d}-{name}.png"
        self.page.screenshot(path=str(path), full_page=full_page)
        return path


def test_console_configures_starts_fails_over_edits_and_snapshots_the_pair(
        lab: Cluster, page: Page) -> None:
    t0 = time.monotonic()
    base = lab.lab.console_url("node1")
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    shot = Shots(page)
    # Data on node1 only: the recommendation must pick node1 for the first start.
    (lab.lab.private_dir_source("node1", DATA) / "precious.txt").write_text("node1's data\n")

    log_in(page, base, lab.lab.admin_password)
    shot("login-done")
    add_nodes(page, base, lab.lab)
    shot("cluster")
    configure_module(page, base, shot)
    first_start(page, base, shot)
    refused_and_failover(page, shot)
    read_logs(page, lab, shot)
    edit_and_redeploy(page, base, lab.lab, shot)
    boot_start(page, base)
    snapshots(page, base, lab.lab)
    assert not dialogs, f"a dialog opened (script injected?): {dialogs}"
    print(f"console browser scenario: {time.monotonic() - t0:.1f} s")


def log_in(page: Page, base: str, password: str) -> None:
    page.goto(f"{base}/")
    expect(page.get_by_test_id("login-password")).to_be_visible()  # redirected to /login
    page.get_by_test_id("login-password").fill("not the password")
    page.get_by_test_id("login-submit").click()
    expect(page.get_by_test_id("login-error")).to_be_visible()
    page.get_by_test_id("login-password").fill(password)
    page.get_by_test_id("login-submit").click()
    # Unconfigured: the dashboard sends the operator to the cluster page.
    expect(page.get_by_test_id("setup-link")).to_have_attribute("href", "/cluster")


def add_nodes(page: Page, base: str, lab: Lab) -> None:
    page.goto(f"{base}/cluster")
    page.get_by_test_id("node-addr-0").fill(lab.address("node1"))
    page.get_by_test_id("new-node").click()
    page.get_by_test_id("node-addr-1").fill(lab.address("node2"))
    page.get_by_test_id("node-password-1").fill(lab.admin_password)
    page.get_by_test_id("save-cluster").click()
    for node in Lab.NODES:
        expect(page.get_by_test_id(f"cluster-node-{node}")).to_contain_text("yes")


def configure_module(page: Page, base: str, shot: Shots) -> None:
    page.goto(f"{base}/module")
    page.get_by_test_id("create-module").click()
    page.get_by_test_id("vip-input").fill(Lab.VIP)
    # A directory that does not exist: an error line per node, and Configure stays disabled.
    page.get_by_test_id("replicated-dirs").fill("/srv/mhb2-nowhere")
    page.get_by_test_id("validate").click()
    for node in Lab.NODES:
        expect(page.get_by_test_id(f"result-{node}")).to_have_class("result bad")
    expect(page.get_by_test_id("configure")).to_be_disabled()
    shot("module-invalid")
    page.get_by_test_id("replicated-dirs").fill(str(DATA))
    page.get_by_test_id("validate").click()
    for node in Lab.NODES:
        expect(page.get_by_test_id(f"result-{node}")).to_have_class("result ok")
    page.get_by_test_id("configure").click()
    for node in Lab.NODES:
        expect(page.get_by_test_id(f"result-{node}")).to_have_class("result ok", timeout=STATE_MS)
    shot("module-configured")


def state(page: Page, node: str) -> LocatorAssertions:
    return expect(page.get_by_test_id(f"state-{node}"))


def first_start(page: Page, base: str, shot: Shots) -> None:
    page.goto(f"{base}/")
    for node in Lab.NODES:
        state(page, node).to_have_text("STOP", timeout=STATE_MS)
    expect(page.get_by_test_id("recommended-node")).to_have_text("node1")
    expect(page.get_by_test_id("recommended-why")).not_to_be_empty()
    shot("first-start")
    page.get_by_test_id("start-recommended").click()
    state(page, "node1").to_have_text("ALONE", timeout=STATE_MS)
    expect(page.get_by_test_id("start-other")).to_have_text("Start node2")
    page.get_by_test_id("start-other").click()
    state(page, "node2").to_have_text("SECOND", timeout=STATE_MS)
    state(page, "node1").to_have_text("PRIM", timeout=STATE_MS)
    expect(page.get_by_test_id("sync-node2")).to_contain_text("in sync", timeout=STATE_MS)
    expect(page.get_by_test_id("vip-holder")).to_have_text(f"{Lab.VIP} on node1")
    expect(page.get_by_test_id("first-start")).to_be_hidden()
    dashboard = shot("dashboard")
    if os.environ.get("MIRRORHA_UPDATE_DOCS"):  # refresh the README's picture only on demand
        README_SHOT.parent.mkdir(exist_ok=True)
        shutil.copy(dashboard, README_SHOT)
    page.set_viewport_size({"width": 390, "height": 844})  # a phone
    shot("dashboard-phone", full_page=True)
    page.set_viewport_size({"width": 1280, "height": 800})


def command(page: Page, node: str, cmd: str) -> None:
    page.get_by_test_id(f"menu-{node}").click()
    page.get_by_test_id(f"cmd-{node}-{cmd}").click()


def refused_and_failover(page: Page, shot: Shots) -> None:
    # swap on the SECOND is refused (409): the state machine's reason is shown.
    command(page, "node2", "swap")
    expect(page.get_by_test_id("cmd-result-node2")).to_contain_text("refused")
    expect(page.get_by_test_id("cmd-result-node2")).to_contain_text("primary")
    state(page, "node2").to_have_text("SECOND")
    command(page, "node1", "stop")
    state(page, "node1").to_have_text("STOP", timeout=STATE_MS)
    state(page, "node2").to_have_text("ALONE", timeout=STATE_MS)
    expect(page.get_by_test_id("vip-holder")).to_have_text(f"{Lab.VIP} on node2")
    shot("failover")


def read_logs(page: Page, lab: Cluster, shot: Shots) -> None:
    page.get_by_test_id("logs-node2-module").click()
    lines = page.get_by_test_id("log-lines")
    expect(lines).to_contain_text("node1 is STOP")  # why node2 took over
    # A line written while the page follows it arrives, as text: no script element, no alert.
    lab.cmd("node2", "printi", XSS)
    expect(lines).to_contain_text(XSS, timeout=15_000)
    assert page.locator("[data-testid=log-lines] script").count() == 0
    shot("log-node2-module")
    page.get_by_test_id("log-link-node1-module").click()
    expect(lines).to_contain_text("stopped by")
    page.get_by_test_id("log-link-node2-application").click()
    expect(lines).to_contain_text("Running start_prim")  # the template's start_prim on node2
    shot("log-node2-application")


def edit_and_redeploy(page: Page, base: str, lab: Lab, shot: Shots) -> None:
    page.goto(f"{base}/advanced")
    area = page.get_by_test_id("file-start_prim")
    expect(area).to_have_value(re.compile(r"^#!"))
    # A broken userconfig.xml: refused with file:line: field, on both nodes.
    userconfig = page.get_by_test_id("file-userconfig.xml")
    good = userconfig.input_value()
    userconfig.fill(good.replace('failover="on"', 'failover="on" bogus="1"', 1))
    page.get_by_test_id("adv-validate").click()
    expect(page.get_by_test_id("field-errors")).to_contain_text(
        re.compile(r"conf/userconfig\.xml:\d+: \S*bogus"))
    for node in Lab.NODES:
        expect(page.get_by_test_id(f"result-{node}")).to_have_class("result bad")
    shot("advanced-invalid", full_page=True)
    userconfig.fill(good)
    shebang, _, rest = area.input_value().partition("\n")
    area.fill(f"{shebang}\necho 'redeployed by mhb2'\n{rest}")
    page.get_by_test_id("adv-validate").click()
    for node in Lab.NODES:
        expect(page.get_by_test_id(f"result-{node}")).to_have_class("result ok")
    page.get_by_test_id("adv-apply").click()
    for node in Lab.NODES:
        expect(page.get_by_test_id(f"result-{node}")).to_have_class("result ok", timeout=STATE_MS)
    shot("advanced-applied", full_page=True)
    for node in Lab.NODES:
        script = lab.node_paths(node).bin_dir / "start_prim"
        assert "redeployed by mhb2" in lab.node_run(node, ["cat", str(script)]).stdout, node


def boot_start(page: Page, base: str) -> None:
    """Boot start of node2 on, as read back from node2 after a reload, then off again."""
    page.goto(f"{base}/")
    page.get_by_test_id("boot-node2").check()
    expect(page.get_by_test_id("cmd-result-node2")).to_contain_text("start at boot on")
    page.reload()
    expect(page.get_by_test_id("boot-node2")).to_be_checked()
    expect(page.get_by_test_id("boot-node1")).not_to_be_checked()
    page.get_by_test_id("boot-node2").uncheck()
    expect(page.get_by_test_id("cmd-result-node2")).to_contain_text("start at boot off")


def snapshots(page: Page, base: str, lab: Lab) -> None:
    page.goto(f"{base}/")
    for node in Lab.NODES:
        with page.expect_download() as info:
            page.get_by_test_id(f"snapshot-{node}").click()
        data = Path(info.value.path()).read_bytes()
        (SHOTS / f"snapshot-{node}.zip").write_bytes(data)
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            names = z.namelist()
        for member in ("conf/userconfig.xml", "bin/start_prim", "log/module.log", "state.json"):
            assert any(n == member or n.endswith(f"/{member}") for n in names), (node, names)
        assert not [n for n in names if n.endswith(".key")], (node, names)
