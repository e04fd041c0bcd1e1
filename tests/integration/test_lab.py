"""The network-namespace lab, exercised with a stand-in for the daemon: the container's child is
the sample app itself (or a sleep), so these tests need nothing but the kernel and iproute2."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from appliance.lab import (
    REGISTRY_DIR,
    Lab,
    LabError,
    LabSettings,
    main,
    userconfig_xml,
)
from appliance.waiting import wait_until

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root (network namespaces)"),
    pytest.mark.timeout(60),
]

PREFIX = "labt"
APP_ARGV = (sys.executable, "-m", "appliance.sampleapp", "--node", "{node}", "--port", "80")
SLEEP_ARGV = ("sleep", "infinity")




def lab_namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return [line.split()[0] for line in out.stdout.splitlines() if line.startswith(f"{PREFIX}-")]


def pid_exists(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def ping(lab: Lab, src: str, addr: str) -> bool:
    """One ping from src's network namespace (works whether or not a node is running)."""
    result = lab.ns_run(src, ["ping", "-c1", "-W0.5", "-q", addr], check=False, timeout=5)
    return result.returncode == 0


def reaches(lab: Lab, src: str, addr: str) -> bool:
    # Right after a link comes back, an ARP entry left INCOMPLETE by the cut is only retried
    # every second (the kernel's retrans_time): allow a few pings.
    deadline = time.monotonic() + 3
    while not ping(lab, src, addr):
        if time.monotonic() > deadline:
            return False
    return True


def reached(lab: Lab, src: str, *addrs: str) -> list[str]:
    """Which of addrs answer one ping from src (the pings run together: a lost one takes 0.5 s)."""
    with ThreadPoolExecutor(len(addrs)) as pool:
        answers = list(pool.map(lambda addr: ping(lab, src, addr), addrs))
    return [addr for addr, answered in zip(addrs, answers, strict=True) if answered]


def app_answers(lab: Lab, addr: str, body: str) -> Callable[[], bool]:
    return lambda: lab.client_http_get(f"http://{addr}/", timeout=1) == body


@pytest.fixture
def make_lab(tmp_path: Path) -> Iterator[Callable[..., Lab]]:
    labs: list[Lab] = []

    def make(daemon_argv: tuple[str, ...] = APP_ARGV, **kwargs: object) -> Lab:
        lab = Lab(prefix=PREFIX, labdir=tmp_path / "lab", daemon_argv=daemon_argv, **kwargs)
        labs.append(lab)
        lab.up()
        return lab

    try:
        yield make
    finally:
        for lab in labs:
            lab.down()


@pytest.fixture
def lab(make_lab: Callable[..., Lab]) -> Lab:
    lab = make_lab()
    for node, addr in (("node1", "198.51.100.1"), ("node2", "198.51.100.2")):
        wait_until(app_answers(lab, addr, f"{node}\n"), 10, f"{node}'s sample app")
    return lab


def test_every_host_reaches_the_others_on_each_network(lab: Lab) -> None:
    for src, addr in (
        ("node1", "198.51.100.2"),
        ("node1", "203.0.113.2"),
        ("node2", "203.0.113.1"),
        ("client", "198.51.100.1"),
        ("client", "198.51.100.2"),
        ("node1", "198.51.100.20"),
        ("node2", "198.51.100.20"),
    ):
        assert reaches(lab, src, addr), f"{src} cannot reach {addr}"
    # Nothing was added to the host's own network namespace.
    host_links = subprocess.run(["ip", "-br", "link"], capture_output=True, text=True).stdout
    assert PREFIX not in host_links


def test_client_gets_each_nodes_name_and_app_pids_group_by_node(lab: Lab) -> None:
    assert lab.client_http_get("http://198.51.100.1/") == "node1\n"
    assert lab.client_http_get("http://198.51.100.2/") == "node2\n"
    assert lab.client_http_get("http://198.51.100.1/health") is not None
    assert lab.client_http_get("http://198.51.100.99/", timeout=0.5) is None  # nobody there

    pids = lab.app_pids()
    assert len(pids["node1"]) == 1 and len(pids["node2"]) == 1
    for node, (pid,) in pids.items():
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert node.encode() in cmdline


def test_each_node_is_a_container_with_its_own_pid_namespace(lab: Lab) -> None:
    assert lab.node_run("node1", ["cat", "/proc/1/comm"]).stdout == "labinit\n"
    assert lab.node_run("node2", ["hostname"]).stdout == "node2\n"
    comms = lab.node_run("node1", ["ps", "-e", "-o", "comm="]).stdout.split()
    # node2's sample app runs too, but node1 only sees its own.
    assert sorted(comms) == ["labinit", "mh-sampleapp", "ps"]
    # /sys describes the node's interfaces, not the host's.
    assert lab.node_run("node1", ["ls", "/sys/class/net"]).stdout.split() == ["eth0", "eth1", "lo"]
    env = lab.node_run("node2", ["env"]).stdout.splitlines()
    assert "MIRRORHA_NODE=node2" in env
    assert f"MIRRORHA_HOME={lab.node_home('node2')}" in env


def test_kill_node_kills_every_process_of_the_node_and_start_node_brings_it_back(lab: Lab) -> None:
    pid1 = lab.node_pid1("node1")
    (app,) = lab.app_pids()["node1"]
    assert pid1 is not None and pid_exists(app)

    lab.kill_node("node1")

    assert not lab.node_alive("node1") and lab.node_pid1("node1") is None
    assert not pid_exists(pid1) and not pid_exists(app)
    assert lab.app_pids() == {"node1": [], "node2": lab.app_pids()["node2"]}
    assert lab.node_alive("node2")
    with pytest.raises(LabError, match="not running"):
        lab.node_run("node1", ["true"])
    lab.kill_node("node1")  # killing a dead node is a no-op

    lab.start_node("node1")
    wait_until(app_answers(lab, "198.51.100.1", "node1\n"), 10, "node1's app after restart")
    with pytest.raises(LabError, match="already running"):
        lab.start_node("node1")


def test_labinit_forwards_sigterm_and_exits_with_the_child(lab: Lab) -> None:
    pid1 = lab.node_pid1("node2")
    assert pid1 is not None
    os.kill(pid1, signal.SIGTERM)
    try:
        wait_until(lambda: not lab.node_alive("node2"), 10, "node2's container to exit")
    except AssertionError:
        ps = lab.node_run("node2", ["ps", "-eLo", "pid,tid,stat,wchan:20,comm"]).stdout
        raise AssertionError(f"{ps}\n{lab.daemon_out('node2').read_text()}") from None
    assert "mh-sampleapp: node2 stopped" in lab.daemon_out("node2").read_text()


def test_labinit_reaps_orphans(make_lab: Callable[..., Lab]) -> None:
    lab = make_lab(SLEEP_ARGV)
    # sh exits at once: its background sleep is orphaned, reparented to labinit, and must not
    # stay a zombie once it exits.
    orphan = lab.node_run("node1", ["sh", "-c", "sleep 0.2 & echo $!"]).stdout.strip()
    wait_until(
        lambda: lab.node_run("node1", ["test", "-e", f"/proc/{orphan}"], check=False).returncode,
        5,
        "the orphan to be reaped",
    )


def test_crash_node_takes_its_links_down_and_boot_drops_the_stale_vip(lab: Lab) -> None:
    lab.ns_run("node1", ["ip", "addr", "add", f"{Lab.VIP}/32", "dev", "eth0"])
    assert lab.vip_holders() == ["node1"]

    lab.crash_node("node1")

    assert not lab.node_alive("node1")
    assert lab.link_states()["node1"] == {"default": "down", "second": "down"}
    assert lab.vip_holders() == []  # still configured, on an interface that is down
    assert reached(lab, "client", "198.51.100.1") == []

    lab.start_node("node1")
    assert lab.vip_holders() == []
    assert lab.link_states()["node1"] == {"default": "up", "second": "up"}
    wait_until(app_answers(lab, "198.51.100.1", "node1\n"), 10, "node1's app after the boot")


@pytest.mark.parametrize("carrier", [False, True], ids=["silent", "unplug"])
def test_cut_and_restore_one_network(lab: Lab, carrier: bool) -> None:
    lab.cut("node1", "second", carrier=carrier)

    assert reached(lab, "node1", "203.0.113.2", "198.51.100.2") == ["198.51.100.2"]
    assert reached(lab, "node2", "203.0.113.1") == []
    states = lab.link_states()["node1"]
    assert states == {"default": "up", "second": "unplugged" if carrier else "cut"}
    flags = json.loads(lab.ns_run("node1", ["ip", "-j", "link", "show", "eth1"]).stdout)[0]
    assert ("NO-CARRIER" in flags["flags"]) == carrier

    lab.restore("node1", "second")

    assert lab.link_states()["node1"] == {"default": "up", "second": "up"}
    assert reaches(lab, "node1", "203.0.113.2")


def test_partition_isolates_a_node_from_peer_client_and_witness(lab: Lab) -> None:
    lab.partition("node1")

    others = ("198.51.100.2", "203.0.113.2", "198.51.100.20", "198.51.100.10")
    assert reached(lab, "node1", *others) == []
    assert lab.client_http_get("http://198.51.100.1/", timeout=0.5) is None
    assert reaches(lab, "node2", "198.51.100.20")
    assert lab.client_http_get("http://198.51.100.2/") == "node2\n"

    lab.heal()

    assert reaches(lab, "node1", "198.51.100.2") and reaches(lab, "node1", "203.0.113.2")
    assert lab.client_http_get("http://198.51.100.1/") == "node1\n"


def test_client_poller_records_each_attempt(lab: Lab) -> None:
    with lab.client_poller("http://198.51.100.1/", interval_s=0.02) as poller:
        first = poller.wait_for_ok(after=0.0, body="node1", timeout=10)
        assert first.served_by == "node1"
        lab.kill_node("node1")
        killed_at = time.monotonic()
        wait_until(
            lambda: any(s.t_start > killed_at and not s.ok for s in poller.samples()),
            10,
            "a failed attempt after the kill",
        )
        assert poller.first_ok_after(killed_at) is None
        process = poller.process
    assert process.poll() is not None  # leaving the block stopped it


def attrs(root: ET.Element, path: str) -> dict[str, str]:
    element = root.find(path)
    assert element is not None, f"no {path} in {ET.tostring(root, encoding='unicode')}"
    return dict(element.attrib)


def test_a_host_port_forwards_into_a_node_until_down(make_lab: Callable[..., Lab]) -> None:
    """How a browser on the host reaches a node's console: labforward on 127.0.0.1."""
    lab = make_lab()
    wait_until(app_answers(lab, "198.51.100.2", "node2\n"), 10, "node2's sample app")
    port = lab.forward("node2", 80)
    assert lab.forward("node2", 80) == port  # one forwarder per node and port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as answer:
        assert answer.read() == b"node2\n"
    record = json.loads((lab.labdir / "forward-node2-80.json").read_text())
    lab.down()
    wait_until(lambda: not pid_exists(record["pid"]), 5, "the forwarder to exit")


def test_boot_of_a_node_container_starts_what_an_appliance_would(tmp_path: Path) -> None:
    """nodeboot: the daemon only when boot start is on (its unit exists), like systemd."""
    from appliance.nodeboot import boot_argv
    os.environ["MIRRORHA_UNIT_DIR"] = str(tmp_path)
    try:
        assert boot_argv(["--console"]) == (True, None)
        assert boot_argv(["--console", "--", "x", "--start"]) == (True, ["x", "--start"])
        (tmp_path / "mirrorha.service").write_text("[Unit]\n")
        console, daemon = boot_argv([])
        assert not console and daemon is not None and daemon[-2:] == ["daemon", "--start"]
        with pytest.raises(SystemExit, match="unknown option"):
            boot_argv(["--bogus"])
    finally:
        del os.environ["MIRRORHA_UNIT_DIR"]


def test_generated_node_files(lab: Lab) -> None:
    paths1, paths2 = lab.node_paths("node1"), lab.node_paths("node2")
    lans = ET.parse(paths1.cluster_xml).getroot().findall("lans/lan")
    assert [(lan.get("name"), [(n.get("name"), n.get("addr")) for n in lan]) for lan in lans] == [
        ("default", [("node1", "198.51.100.1"), ("node2", "198.51.100.2")]),
        ("second", [("node1", "203.0.113.1"), ("node2", "203.0.113.2")]),
    ]
    assert paths1.cluster_key.read_text() == paths2.cluster_key.read_text()
    assert stat.S_IMODE(paths2.cluster_key.stat().st_mode) == 0o600

    safe = ET.parse(paths2.userconfig).getroot()
    assert attrs(safe, "service")["defaultprim"] == "alone"
    assert attrs(safe, "service/heart") == {"pulse": "100", "timeout": "600"}
    assert [h.attrib for h in safe.iter("heartbeat")] == [
        {"name": "default", "ident": "flow"},
        {"name": "second"},
    ]
    vip = "service/vip/interface_list/interface/real_interface/virtual_addr"
    assert attrs(safe, vip) == {"addr": Lab.VIP, "where": "one_side_alias"}
    assert attrs(safe, "service/errd") == {"polltimer": "0.5"}
    assert attrs(safe, "service/errd/proc")["name"] == "mh-sampleapp"
    assert safe.find("service/splitbrain") is None
    for script in ("start_prim", "stop_prim"):
        assert os.access(paths1.bin_dir / script, os.X_OK)

    with_witness = ET.fromstring(userconfig_xml(LabSettings(witness=True), Lab.VIP))
    assert attrs(with_witness, "service/splitbrain") == {
        "ident": "witness",
        "exec": "ping",
        "arg": "198.51.100.20",
    }


def test_start_prim_and_stop_prim_run_the_sample_app(make_lab: Callable[..., Lab]) -> None:
    lab = make_lab(SLEEP_ARGV)
    bin_dir = lab.node_paths("node2").bin_dir

    lab.node_run("node2", [str(bin_dir / "start_prim")])
    wait_until(app_answers(lab, "198.51.100.2", "node2\n"), 10, "the app started by start_prim")
    assert len(lab.app_pids()["node2"]) == 1 and lab.app_pids()["node1"] == []

    lab.node_run("node2", [str(bin_dir / "stop_prim")])
    assert lab.app_pids()["node2"] == []  # stop_prim returns once the app is gone
    log = lab.node_paths("node2").app_log.read_text()
    assert "mh-sampleapp: node2 stopped" in log

    lab.node_run("node2", [str(bin_dir / "start_prim")])
    wait_until(lambda: len(lab.app_pids()["node2"]) == 1, 10, "the app to start again")
    lab.node_run("node2", [str(bin_dir / "stop_prim"), "force"])
    wait_until(lambda: lab.app_pids()["node2"] == [], 5, "stop_prim force to kill the app")


def test_private_dirs_give_each_node_its_own_copy_of_a_path(
    make_lab: Callable[..., Lab], tmp_path: Path
) -> None:
    shared = tmp_path / "srv" / "data"
    lab = make_lab(SLEEP_ARGV, private_dirs=[shared])
    lab.node_run("node1", ["sh", "-c", f"echo one > {shared}/f"])

    assert lab.node_run("node1", ["cat", f"{shared}/f"]).stdout == "one\n"
    assert lab.node_run("node2", ["ls", "-A", str(shared)]).stdout == ""
    assert list(shared.iterdir()) == []  # the host's directory is untouched
    assert (lab.private_dir_source("node1", shared) / "f").read_text() == "one\n"

    lab.down()
    assert not (tmp_path / "srv").exists()  # mount points the lab made are gone too


def test_a_size_limited_private_dir_is_a_small_disk_of_that_node_only(
    make_lab: Callable[..., Lab], tmp_path: Path
) -> None:
    shared = tmp_path / "srv" / "data"
    lab = make_lab(SLEEP_ARGV, private_dirs=[shared],
                   private_dir_limits={("node2", shared): 1 << 20})
    fill = f"head -c {2 << 20} /dev/zero > {shared}/f"
    assert lab.node_run("node1", ["sh", "-c", fill], check=False).returncode == 0
    full = lab.node_run("node2", ["sh", "-c", fill], check=False)
    assert full.returncode != 0 and "No space left" in full.stderr
    # The host sees node2's copy on its own filesystem, which grows live.
    source = lab.private_dir_source("node2", shared)
    assert os.statvfs(source).f_blocks * os.statvfs(source).f_frsize == 1 << 20
    lab.resize_private_dir("node2", shared, 4 << 20)
    assert lab.node_run("node2", ["sh", "-c", fill], check=False).returncode == 0
    assert (source / "f").stat().st_size == 2 << 20
    with pytest.raises(LabError, match="no size limit"):
        lab.resize_private_dir("node1", shared, 4 << 20)

    lab.down()
    assert str(lab.labdir) not in Path("/proc/self/mountinfo").read_text()
    assert not lab.labdir.exists() and not (tmp_path / "srv").exists()


def test_size_limits_only_on_private_dirs_of_known_nodes(tmp_path: Path) -> None:
    with pytest.raises(LabError, match="not a private directory"):
        Lab(prefix=PREFIX, private_dir_limits={("node2", tmp_path): 1 << 20})
    with pytest.raises(LabError, match="unknown node"):
        Lab(prefix=PREFIX, private_dirs=[tmp_path], private_dir_limits={("node3", tmp_path): 4096})


def test_down_leaves_nothing_behind_even_from_another_process(
    make_lab: Callable[..., Lab], tmp_path: Path
) -> None:
    lab = make_lab(APP_ARGV)
    labdir = lab.labdir
    wait_until(lambda: all(lab.app_pids().values()), 10, "both sample apps")
    pids = [lab.node_pid1("node1"), lab.node_pid1("node2")]
    pids += [pid for node_pids in lab.app_pids().values() for pid in node_pids]
    with lab.client_poller(interval_s=0.1) as poller:
        pids.append(poller.process.pid)
        # A stray process an operator left in the client namespace.
        stray = subprocess.Popen(["ip", "netns", "exec", f"{PREFIX}-cl", "sleep", "60"])
        wait_until(lambda: subprocess.run(
            ["ip", "netns", "pids", f"{PREFIX}-cl"], capture_output=True, text=True
        ).stdout.strip() != "", 5, "the stray process to enter the client namespace")  # fmt: skip

        # A fresh Lab object knows nothing of this one: it finds everything from the names and
        # the registry (the lab directory is not the default one).
        Lab(prefix=PREFIX).down()

        assert stray.wait(timeout=5) == -signal.SIGKILL
    assert lab_namespaces() == []
    assert not labdir.exists()
    assert not (REGISTRY_DIR / f"{PREFIX}.json").exists()
    wait_until(lambda: not any(pid_exists(p) for p in pids if p), 5, "every lab process to go")
    lab.down()  # twice is fine


def test_down_after_a_partial_up_and_prefix_validation() -> None:
    subprocess.run(["ip", "netns", "add", f"{PREFIX}-sw"], check=True)
    try:
        Lab(prefix=PREFIX).down()
        assert lab_namespaces() == []
    finally:
        subprocess.run(["ip", "netns", "del", f"{PREFIX}-sw"], capture_output=True)
    with pytest.raises(LabError, match="prefix"):
        Lab(prefix="much-too-long")


def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    where = ["--prefix", PREFIX, "--labdir", str(tmp_path / "cli")]
    try:
        assert main(["up", "--no-start", "--no-console", "--witness", *where]) == 0
        out = capsys.readouterr().out
        assert f"ip netns exec {PREFIX}-cl curl http://{Lab.VIP}/" in out
        assert "mirrorha lab crash node1" in out
        userconfig = tmp_path / "cli" / "node1" / "home" / "mirror" / "conf" / "userconfig.xml"
        assert attrs(ET.parse(userconfig).getroot(), "service/splitbrain")["arg"] == "198.51.100.20"

        assert main(["cut", "witness", "--unplug", *where]) == 0
        assert "witness" in capsys.readouterr().out
        assert main(["status", "--json", *where]) == 0
        status = json.loads(capsys.readouterr().out)
        assert status["links"]["witness"] == {"default": "unplugged"}
        assert status["nodes"]["node1"]["alive"] is False

        with pytest.raises(SystemExit) as usage_error:
            main(["kill", "node3", *where])
        assert usage_error.value.code == 2
    finally:
        assert main(["down", *where]) == 0
    assert lab_namespaces() == []
    assert main(["start", "node1", "--prefix", "BAD"]) == 1
    assert "prefix" in capsys.readouterr().err
