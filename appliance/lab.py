"""Two-node lab in network namespaces: `make demo`, the end-to-end tests and the failover bench.

Topology (every name derives from a prefix, "mh" by default; the host's own networking is never
touched — no bridge, veth or address in the root namespace):

    {p}-sw    the switch: bridges br0 (network "default", 198.51.100.0/24)
              and br1 (network "second", 203.0.113.0/24)
    {p}-n1    node1: eth0 198.51.100.1/24 on br0, eth1 203.0.113.1/24 on br1
    {p}-n2    node2: eth0 198.51.100.2/24 on br0, eth1 203.0.113.2/24 on br1
    {p}-cl    client: eth0 198.51.100.10/24 on br0 (arp_accept=1: gratuitous ARP moves the VIP)
    {p}-wit   witness: eth0 198.51.100.20/24 on br0 (the kernel answers ping; nothing runs there)

The switch-side end of each link is a veth named `{p}{tag}e{i}` in {p}-sw (e.g. mhn1e0 is
node1's eth0). Cutting a link (`cut`) has two flavours, both stopping traffic both ways:

- silent (default): the port leaves its bridge. Both ends keep their carrier; frames reach the
  switch and go nowhere. Like a failure inside the network: the node has no local sign of it,
  only the heartbeat timeout tells — the case heartbeats and the witness exist for.
- unplug (`carrier=True`): the switch port goes down. A veth's peer then loses its carrier, so
  the node sees NO-CARRIER on its interface, as with a pulled cable.

Each node is a "container": the node's network namespace plus its own mount, PID, UTS and IPC
namespaces, PID 1 being appliance.labinit. Killing that PID 1 makes the kernel kill every
process of the node, like a server losing all its processes (its kernel still answers ARP and
ping, and keeps addresses such as the VIP); `crash_node` also takes the node's interfaces down,
like a power loss. System V IPC is the node's own, as on a server: what a crashed node's
application left there (PostgreSQL's shared memory) goes with the node, not onto the host.
`start_node` is a boot: the node's interfaces get their configured addresses back (a VIP left
over by a crash disappears) before PID 1 starts. Both nodes share the host's files; paths that
must differ per node (replicated directories) are given as `private_dirs`: each node gets its
own copy bind-mounted over the path inside its container. `private_dir_limits` makes a node's
copy a small disk of its own (a size-limited tmpfs mounted on the host over that copy before the
node starts: writing more than it holds fails with ENOSPC there); `resize_private_dir` grows or
shrinks it while the node runs.

Files: `{labdir}/{node}/home` is the node's MIRRORHA_HOME (cluster.xml, cluster.key,
mirror/conf/userconfig.xml, mirror/bin/start_prim|stop_prim); `{labdir}/{node}/daemon.out` gets
the container's stdout/stderr; `{labdir}/{node}/container.json` records its PID 1. A registry in
/run/mirrorha-lab/{p}.json remembers the lab directory so `down` removes everything even from
another process; the namespaces themselves are found by name.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import appliance
from appliance.errors import MirrorhaError
from appliance.keys import export_bundle, import_bundle, init_cluster
from appliance.paths import Paths
from appliance.waiting import wait_until

REGISTRY_DIR = Path("/run/mirrorha-lab")
NETNS_DIR = Path("/run/netns")
LABDIR_MARKER = ".mirrorha-lab"
PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{0,7}$")  # keeps "{p}wite0" within IFNAMSIZ (15)
APP_COMM = "mh-sampleapp"
# Source name of the tmpfs the lab mounts for a size-limited private dir: down() detaches
# only mounts of that name under the lab directory.
LIMIT_FS_SOURCE = "mirrorha-lab-limit"
MNT_DETACH = 2  # <sys/mount.h>
# The tree holding the `appliance` package: containers import the same code as the lab itself.
SOURCE_ROOT = Path(appliance.__file__).resolve().parent.parent
CONSOLE_PORT = 9010
CONSOLE_PASSWORD_FILE = "console-password"  # in the lab directory, mode 0600
DEMO_CONSOLE_PORTS = (9010, 9020)  # host ports `lab up` forwards to node1's, node2's console
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class LabError(MirrorhaError):
    """The lab cannot do what was asked; the message says what to do about it."""


class LabCommandFailed(LabError):
    """A command run inside the lab exited non-zero (`result` holds its output)."""

    def __init__(self, what: str, result: subprocess.CompletedProcess[str]) -> None:
        self.result = result
        detail = (result.stderr or result.stdout or "").strip().splitlines()[-5:]
        super().__init__(
            f"{what} failed with exit code {result.returncode}: " + " | ".join(detail)
        )


# ---------------------------------------------------------------------------------------------
# Topology description


@dataclass(frozen=True)
class Network:
    name: str
    bridge: str
    subnet: str  # first three octets of the /24
    index: int  # the endpoint's interface is eth{index}

    def addr(self, host: int) -> str:
        return f"{self.subnet}.{host}"

    @property
    def interface(self) -> str:
        return f"eth{self.index}"


NETWORKS = (
    Network("default", "br0", "198.51.100", 0),
    Network("second", "br1", "203.0.113", 1),
)
NETWORK_BY_NAME = {n.name: n for n in NETWORKS}


@dataclass(frozen=True)
class Endpoint:
    """Something plugged into the switch: a node, the client or the witness."""

    name: str
    tag: str  # namespace suffix and middle of the switch port names
    host: int  # last octet on every network
    networks: tuple[str, ...]


ENDPOINTS = {
    e.name: e
    for e in (
        Endpoint("node1", "n1", 1, ("default", "second")),
        Endpoint("node2", "n2", 2, ("default", "second")),
        Endpoint("client", "cl", 10, ("default",)),
        Endpoint("witness", "wit", 20, ("default",)),
    )
}
WITNESS_ADDR = NETWORK_BY_NAME["default"].addr(ENDPOINTS["witness"].host)
CLIENT_ADDR = NETWORK_BY_NAME["default"].addr(ENDPOINTS["client"].host)


# ---------------------------------------------------------------------------------------------
# Generated node files


@dataclass(frozen=True)
class LabSettings:
    """What goes into the lab's userconfig.xml: fast timers so failovers take a second."""

    pulse_ms: int = 100
    timeout_ms: int = 600
    heartbeat_networks: tuple[str, ...] = ("default", "second")
    flow_network: str = "default"  # the heartbeat network also carrying replication
    witness: bool = False  # split-brain checker pinging the witness host
    errd_polltimer_s: float = 0.5
    maxloop: int = 3
    loop_interval_h: int = 24
    failover: bool = True
    defaultprim: str = "alone"
    autoswap: bool = False
    nicestoptimeout_s: int = 10
    forcestoptimeout_s: int = 10
    app_port: int = 80
    replicated_dirs: tuple[str, ...] = ()  # <rfs><replicated dir=...>; private to each node
    # The process errd watches (<proc name=...>, restart, class prim); None: no <proc> at all.
    # Tests that replace bin/start_prim with another application name its process here.
    errd_proc: str | None = APP_COMM

    def __post_init__(self) -> None:
        unknown = [n for n in self.heartbeat_networks if n not in NETWORK_BY_NAME]
        if unknown or not self.heartbeat_networks:
            raise LabError(
                f"heartbeat networks {list(self.heartbeat_networks)}: choose among "
                f"{list(NETWORK_BY_NAME)}"
            )


def _num(value: float) -> str:
    return f"{value:g}"


def _onoff(flag: bool) -> str:
    return "on" if flag else "off"


def _xml_text(root: ET.Element) -> str:
    ET.indent(root, space="  ")
    return ET.tostring(root, encoding="unicode") + "\n"


def userconfig_xml(settings: LabSettings, vip: str) -> str:
    s = settings
    safe = ET.Element("safe")
    service = ET.SubElement(
        safe,
        "service",
        mode="mirror",
        defaultprim=s.defaultprim,
        maxloop=str(s.maxloop),
        loop_interval=str(s.loop_interval_h),
        failover=_onoff(s.failover),
        autoswap=_onoff(s.autoswap),
    )
    heart = ET.SubElement(service, "heart", pulse=str(s.pulse_ms), timeout=str(s.timeout_ms))
    for name in s.heartbeat_networks:
        attrs = {"ident": "flow"} if name == s.flow_network else {}
        ET.SubElement(heart, "heartbeat", name=name, **attrs)
    interface_list = ET.SubElement(ET.SubElement(service, "vip"), "interface_list")
    interface = ET.SubElement(interface_list, "interface", check="on", arpreroute="on")
    real = ET.SubElement(interface, "real_interface")
    ET.SubElement(real, "virtual_addr", addr=vip, where="one_side_alias")
    errd = ET.SubElement(service, "errd", polltimer=_num(s.errd_polltimer_s))
    if s.errd_proc is not None:
        ET.SubElement(errd, "proc", name=s.errd_proc, atleast="1", action="restart",
                      **{"class": "prim"})
    if s.replicated_dirs:
        rfs = ET.SubElement(service, "rfs", mountover="off", nbrei="3", acl="off",
                            **{"async": "second"})
        for directory in s.replicated_dirs:
            ET.SubElement(rfs, "replicated", dir=directory, mode="read_only")
    if s.witness:
        ET.SubElement(service, "splitbrain", ident="witness", exec="ping", arg=WITNESS_ADDR)
    ET.SubElement(
        service,
        "user",
        nicestoptimeout=str(s.nicestoptimeout_s),
        forcestoptimeout=str(s.forcestoptimeout_s),
        logging="userlog",
    )
    return _xml_text(safe)


def cluster_xml(nodes: Sequence[str]) -> str:
    cluster = ET.Element("cluster")
    lans = ET.SubElement(cluster, "lans")
    for net in NETWORKS:
        lan = ET.SubElement(lans, "lan", name=net.name)
        for node in nodes:
            ET.SubElement(lan, "node", name=node, addr=net.addr(ENDPOINTS[node].host))
    return _xml_text(cluster)


def start_prim_script(python: Path, port: int) -> str:
    # Identical on both nodes, as the console would deploy it: the node comes from the
    # environment, the log from MIRRORHA_HOME (default as on a real server).
    return f"""#!/bin/sh
# Script called on the primary server for starting application

# For logging into the module log use:
# $SAFE/safekit printi | printe "message"
safekit() {{ if [ -x "$SAFE/safekit" ]; then "$SAFE/safekit" "$@"; fi; }}

# stdout goes into Application log
echo "Running start_prim $*"

res=0

# The lab's sample application: answers its node name on http://VIP:{port}/
applog="${{MIRRORHA_HOME:-/var/lib/mirrorha}}/mirror/log/application.log"
mkdir -p "$(dirname "$applog")"
PYTHONPATH={SOURCE_ROOT} nohup {python} -m appliance.sampleapp \\
  --node "${{MIRRORHA_NODE:-$(hostname)}}" --port {port} >> "$applog" 2>&1 < /dev/null &
res=$?

if [ $res -ne 0 ] ; then
  safekit printe "start_prim failed"

  # uncomment to stop the module when critical
  # safekit stop -i "start_prim"
else
  safekit printi "sample application started"
fi
"""


def stop_prim_script() -> str:
    return f"""#!/bin/sh
# Script called on the primary server for stopping application

#----------------------------------------------------------
#
# 2 stop modes:
#
# - graceful stop
#   call standard application stop
#
# - force stop ($1=force)
#   kill application's processes
#
#----------------------------------------------------------

# For logging into the module log use:
# $SAFE/safekit printi | printe "message"
safekit() {{ if [ -x "$SAFE/safekit" ]; then "$SAFE/safekit" "$@"; fi; }}

# stdout goes into Application log
echo "Running stop_prim $*"

res=0

if [ "$1" = "force" ] ; then
  pkill -9 -x {APP_COMM}
  exit 0
fi

# SIGTERM, then wait (at most 5 s) so that the next start finds the port free
pkill -x {APP_COMM}
i=0
while pgrep -x {APP_COMM} > /dev/null && [ $i -lt 50 ] ; do
  sleep 0.1
  i=$((i + 1))
done
pgrep -x {APP_COMM} > /dev/null && res=1

[ $res -ne 0 ] && safekit printe "stop_prim failed: {APP_COMM} still running"
exit $res
"""


# ---------------------------------------------------------------------------------------------
# Processes (read from /proc: the lab's processes live in other namespaces)


def _proc_pids() -> Iterator[int]:
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            yield int(entry.name)


def _ns_inode(pid: int, kind: str) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/{kind}").st_ino
    except OSError:
        return None  # gone, or a zombie (which has no namespaces any more)


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the comm (which may hold spaces): [0] is the state."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def _start_time(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None  # field 22 of stat: start time in clock ticks


def _running(pid: int, start_time: int) -> bool:
    """The process still exists, is not a zombie, and is the one we started (not a reused pid)."""
    fields = _stat_fields(pid)
    return fields is not None and fields[0] != "Z" and int(fields[19]) == start_time


def _comm(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/comm").read_text().rstrip("\n")
    except OSError:
        return None


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _pids_in(kind: str, inodes: set[int]) -> list[int]:
    me = os.getpid()
    return [p for p in _proc_pids() if p != me and _ns_inode(p, kind) in inodes]




def _run(
    argv: Sequence[str],
    *,
    check: bool = True,
    timeout: float = 10.0,
    input: str | None = None,
    env: dict[str, str] | None = None,
    what: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command in its own process group so a timeout kills it and every child it forked
    (nsenter forks when entering a PID namespace)."""
    proc = subprocess.Popen(
        list(argv),
        stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise LabError(f"{what or argv[0]}: no answer within {timeout:g} s") from None
    result = subprocess.CompletedProcess(list(argv), proc.returncode, out, err)
    if check and proc.returncode != 0:
        raise LabCommandFailed(what or " ".join(argv), result)
    return result


@dataclass(frozen=True)
class Container:
    """A running node container, as recorded in {labdir}/{node}/container.json."""

    launcher_pid: int  # the host-side `unshare` process (parent of PID 1)
    pid1: int  # host pid of the container's PID 1 (labinit)
    pid1_start: int  # its start time: tells it from a later process reusing the pid
    pidns: int  # inode of the container's PID namespace

    def alive(self) -> bool:
        return _running(self.pid1, self.pid1_start)


# ---------------------------------------------------------------------------------------------
# Client poller


@dataclass(frozen=True)
class PollSample:
    """One HTTP attempt of the client poller. Times are CLOCK_MONOTONIC, shared by all
    namespaces, so they compare with time.monotonic() in the test process."""

    t_start: float
    t_end: float
    wall: float
    ok: bool
    body: str | None
    error: str | None

    @property
    def served_by(self) -> str | None:
        """The node that answered (the sample app's body), if the attempt succeeded."""
        return self.body.strip() if self.ok and self.body is not None else None


def poll_loop(url: str, interval_s: float, timeout_s: float, max_duration_s: float) -> None:
    """Runs inside the client namespace: one HTTP GET per interval, one JSON line per attempt.

    A fresh connection each time, as a new user would make: after a failover it must reach the
    node now holding the VIP, not linger on a kept-alive socket to the old one."""
    import urllib.request

    end = time.monotonic() + max_duration_s
    next_start = time.monotonic()
    while next_start < end:
        t_start = time.monotonic()
        wall = time.time()
        body: str | None = None
        error: str | None = None
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as response:
                body = response.read().decode(errors="replace")
        except Exception as e:  # any failure is a data point, not a reason to stop polling
            error = f"{type(e).__name__}: {e}"
        sample = PollSample(t_start, time.monotonic(), wall, error is None, body, error)
        print(json.dumps(asdict(sample)), flush=True)
        next_start = max(next_start + interval_s, time.monotonic())
        time.sleep(max(0.0, next_start - time.monotonic()))


class ClientPoller:
    """Handle on a running poll_loop; `samples()` reads what it has written so far."""

    def __init__(self, process: subprocess.Popen[bytes], output: Path) -> None:
        self.process = process
        self.output = output

    def samples(self) -> list[PollSample]:
        try:
            text = self.output.read_text()
        except FileNotFoundError:
            return []
        lines = text.split("\n")[:-1]  # the last piece may be a line still being written
        return [PollSample(**json.loads(line)) for line in lines if line]

    def first_ok_after(self, t: float, body: str | None = None) -> PollSample | None:
        """First successful attempt started after monotonic time t (served by `body` if given)."""
        for s in self.samples():
            if s.t_start >= t and s.ok and (body is None or s.served_by == body.strip()):
                return s
        return None

    def wait_for_ok(
        self, after: float, body: str | None = None, timeout: float = 30.0
    ) -> PollSample:
        """The first successful attempt after `after` (see first_ok_after), once it happened."""
        deadline = time.monotonic() + timeout
        while (sample := self.first_ok_after(after, body)) is None:
            if time.monotonic() > deadline:
                who = f" from {body}" if body else ""
                raise LabError(f"the client got no answer{who} within {timeout:g} s")
            time.sleep(0.01)
        return sample

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


# ---------------------------------------------------------------------------------------------
# The lab


def _default_venv() -> Path:
    # Running inside a virtualenv (the normal case: .venv/bin/python, .venv/bin/mirrorha): use it.
    if sys.prefix != sys.base_prefix:
        return Path(sys.prefix)
    return SOURCE_ROOT / ".venv"


class Lab:
    """Two nodes, a client and a witness in network namespaces. Use as
    `with Lab(prefix="e2e") as lab: lab.up(); …` — leaving the block calls down()."""

    NODES = ("node1", "node2")
    VIP = "198.51.100.100"

    def __init__(
        self,
        prefix: str = "mh",
        labdir: Path | None = None,
        settings: LabSettings = LabSettings(),  # frozen: sharing the default is harmless
        daemon_argv: Sequence[str] | None = None,
        private_dirs: Sequence[str | Path] = (),
        private_dir_limits: Mapping[tuple[str, str | Path], int] | None = None,
        console: bool = False,
        configured: bool = True,
    ) -> None:
        """private_dirs: absolute paths each node sees as its own directory (for the replicated
        directories: on two servers the same path holds two different copies).
        private_dir_limits: {(node, private dir): bytes}: that node's copy is a filesystem of
        that size (a tmpfs), so that a test can fill one node's disk.
        console: each node also runs the web console on :9010 (admin password generated at
        up(), see admin_password; console_url() reaches it from the host).
        configured: False gives a freshly installed pair: no cluster.xml, key or module, no
        daemon at boot, only the console (implies console) — what the console's first
        configuration starts from."""
        if not PREFIX_RE.match(prefix):
            raise LabError(
                f"lab prefix {prefix!r}: use 1 to 8 lowercase letters or digits, starting with a "
                "letter (interface names are derived from it and limited to 15 characters)"
            )
        self.prefix = prefix
        self.labdir = labdir or Path(f"/tmp/mirrorha-lab-{prefix}")
        self.settings = settings
        self.venv = _default_venv()
        self.python = self.venv / "bin" / "python"
        self.mirrorha_exe = self.venv / "bin" / "mirrorha"
        # "{node}" in an argument is replaced by the node's name (stand-ins need it).
        self.daemon_argv = tuple(daemon_argv or (str(self.mirrorha_exe), "daemon", "--start"))
        # Replicated directories are node-private by nature (each server has its own disk).
        self.private_dirs = tuple(dict.fromkeys(
            [Path(d) for d in private_dirs] + [Path(d) for d in settings.replicated_dirs]))
        for d in self.private_dirs:
            if not d.is_absolute() or d == Path("/") or ":" in str(d):
                raise LabError(f"private directory {d}: need an absolute path, not /, no ':'")
        self.private_dir_limits: dict[tuple[str, Path], int] = {}
        for (node, d), size in (private_dir_limits or {}).items():
            self._node(node)
            if Path(d) not in self.private_dirs:
                raise LabError(f"size limit on {d}: not a private directory of the lab "
                               f"({[str(p) for p in self.private_dirs]})")
            if size < 4096:
                raise LabError(f"size limit {size} bytes on {node}'s {d}: at least 4096")
            self.private_dir_limits[(node, Path(d))] = size
        self.configured = configured
        self.console = console or not configured
        self.registry = REGISTRY_DIR / f"{prefix}.json"
        self._launchers: dict[str, subprocess.Popen[bytes]] = {}
        self._pollers: list[ClientPoller] = []

    # -- names and paths ----------------------------------------------------------------------

    def netns(self, endpoint: str) -> str:
        """Network namespace of an endpoint ("node1", "client", …) or of the "switch"."""
        tag = "sw" if endpoint == "switch" else self._endpoint(endpoint).tag
        return f"{self.prefix}-{tag}"

    def port(self, endpoint: str, network: str) -> str:
        """Switch-side veth of an endpoint's link to a network, in the switch namespace."""
        return f"{self.prefix}{self._endpoint(endpoint).tag}e{NETWORK_BY_NAME[network].index}"

    def namespaces(self) -> list[str]:
        return [self.netns("switch"), *(self.netns(e) for e in ENDPOINTS)]

    def address(self, endpoint: str, network: str = "default") -> str:
        """The endpoint's address on a network, e.g. address("node2", "second")."""
        return NETWORK_BY_NAME[network].addr(self._endpoint(endpoint).host)

    def node_dir(self, node: str) -> Path:
        return self.labdir / self._node(node)

    def node_home(self, node: str) -> Path:
        return self.node_dir(node) / "home"

    def node_paths(self, node: str) -> Paths:
        return Paths(self.node_home(node))

    def private_dir_source(self, node: str, path: Path) -> Path:
        """Where node's own copy of a private directory lives on the host."""
        return self.node_dir(node) / "root" / path.relative_to("/")

    def _mount_private_dir_limits(self) -> None:
        """A tmpfs of the requested size over each limited node copy (on the host, before the
        node starts: the container's bind mount of that copy then shows the tmpfs)."""
        for (node, d), size in self.private_dir_limits.items():
            source = self.private_dir_source(node, d)
            _run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", LIMIT_FS_SOURCE,
                  str(source)], what=f"mounting a {size}-byte tmpfs on {source}")

    def resize_private_dir(self, node: str, path: str | Path, size: int) -> None:
        """Change the size of a limited private dir, live (tmpfs remount: the content stays;
        shrinking below what it holds fails)."""
        key = (self._node(node), Path(path))
        if key not in self.private_dir_limits:
            raise LabError(f"{node}'s {path} has no size limit (see private_dir_limits)")
        source = self.private_dir_source(node, Path(path))
        _run(["mount", "-o", f"remount,size={size}", str(source)],
             what=f"resizing the tmpfs on {source} to {size} bytes")
        self.private_dir_limits[key] = size

    def _make_private_dirs(self) -> list[Path]:
        """Create each node's copies and any missing mount point; return the directories created
        on the host outside the lab directory, deepest first."""
        created: list[Path] = []
        for d in self.private_dirs:
            for node in self.NODES:
                self.private_dir_source(node, d).mkdir(parents=True, exist_ok=True)
            missing = [p for p in (d, *d.parents) if not p.exists()]
            d.mkdir(parents=True, exist_ok=True)
            created += missing
        return created

    def daemon_out(self, node: str) -> Path:
        return self.node_dir(node) / "daemon.out"

    @property
    def admin_password(self) -> str:
        """The consoles' admin password (both nodes), generated by up()."""
        try:
            return (self.labdir / CONSOLE_PASSWORD_FILE).read_text().strip()
        except FileNotFoundError:
            raise LabError(f"lab {self.prefix!r} has no console password: was it brought up "
                           "with console=True (`lab up --console`)?") from None

    def console_url(self, node: str, host_port: int = 0) -> str:
        """https://127.0.0.1:PORT on the host, forwarded to node's console (:9010 in its
        namespace)."""
        return f"https://127.0.0.1:{self.forward(node, CONSOLE_PORT, host_port)}"

    def forward(self, node: str, port: int, host_port: int = 0) -> int:
        """A port on the host's 127.0.0.1 forwarded to node's `port` (appliance.labforward):
        one forwarder per node and port, started on first use (host_port 0: a free port),
        stopped by down(). Returns the host port."""
        record = self.labdir / f"forward-{self._node(node)}-{port}.json"
        with contextlib.suppress(OSError, ValueError, KeyError):
            known = json.loads(record.read_text())
            if _running(known["pid"], known["start"]):
                return int(known["port"])
        proc = subprocess.Popen(
            [str(self.python), "-m", "appliance.labforward", "--listen",
             f"127.0.0.1:{host_port}", "--netns", self.netns(node), "--to",
             f"{self.address(node)}:{port}"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": str(SOURCE_ROOT)}, start_new_session=True)
        assert proc.stdout is not None
        line = proc.stdout.readline().decode().strip()  # "listening on 127.0.0.1:PORT"
        if not line.startswith("listening on "):
            proc.kill()
            proc.wait()
            raise LabError(f"port forwarding to {node}'s port {port} did not start "
                           f"(127.0.0.1:{host_port} in use?)")
        listening = int(line.rpartition(":")[2])
        start = _start_time(proc.pid)
        record.write_text(json.dumps({"pid": proc.pid, "start": start, "port": listening}))
        return listening

    def _stop_forwarders(self, labdir: Path) -> None:
        for record in labdir.glob("forward-*.json"):
            with contextlib.suppress(OSError, ValueError, KeyError):
                known = json.loads(record.read_text())
                if _running(known["pid"], known["start"]):
                    os.kill(known["pid"], signal.SIGKILL)

    def node_env(self, node: str) -> dict[str, str]:
        """Environment of everything run on a node: its MIRRORHA_HOME and name, the venv first
        in PATH, and this source tree importable."""
        return {
            "PATH": f"{self.venv / 'bin'}:{SYSTEM_PATH}",
            "HOME": "/root",
            "LANG": "C.UTF-8",
            "PYTHONPATH": str(SOURCE_ROOT),
            "PYTHONUNBUFFERED": "1",
            "MIRRORHA_HOME": str(self.node_home(node)),
            "MIRRORHA_NODE": node,
            # `mirrorha boot on` inside a node writes its unit here, never in the host's /etc
            # (nodes share the host's files); nodeboot reads it at the next boot.
            "MIRRORHA_UNIT_DIR": str(self.node_dir(node) / "systemd"),
        }

    @staticmethod
    def _endpoint(name: str) -> Endpoint:
        try:
            return ENDPOINTS[name]
        except KeyError:
            raise LabError(f"unknown lab host {name!r}: choose among {list(ENDPOINTS)}") from None

    def _node(self, node: str) -> str:
        if node not in self.NODES:
            raise LabError(f"unknown node {node!r}: choose among {list(self.NODES)}")
        return node

    def _networks(self, endpoint: str, network: str | None) -> tuple[str, ...]:
        nets = self._endpoint(endpoint).networks
        if network is None:
            return nets
        if network not in nets:
            raise LabError(f"{endpoint} has no link to network {network!r}: it has {list(nets)}")
        return (network,)

    # -- life cycle ----------------------------------------------------------------------------

    def __enter__(self) -> Lab:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.down()

    def up(self, start_nodes: bool = True) -> None:
        """Build everything from scratch (removing leftovers of this prefix first)."""
        _require_root()
        self.down()
        REGISTRY_DIR.mkdir(parents=True, exist_ok=True)
        registry = {"prefix": self.prefix, "labdir": str(self.labdir), "mountpoints": []}
        self.registry.write_text(json.dumps(registry))
        self.labdir.mkdir(parents=True, exist_ok=True)
        (self.labdir / LABDIR_MARKER).write_text(f"mirrorha lab {self.prefix}\n")
        # Bind mounts need their mount points on the host; the ones made here go away in down().
        registry["mountpoints"] = [str(d) for d in self._make_private_dirs()]
        self.registry.write_text(json.dumps(registry))
        self._mount_private_dir_limits()
        self._build_topology()
        self._write_node_files()
        if start_nodes:
            for node in self.NODES:
                self.start_node(node)

    def down(self) -> None:
        """Remove every trace of the lab: processes, namespaces, lab directory, registry."""
        _require_root()
        for poller in self._pollers:
            poller.stop()
        self._pollers.clear()
        labdirs = {self.labdir}
        mountpoints: list[str] = []
        with contextlib.suppress(OSError, ValueError, KeyError):
            registry = json.loads(self.registry.read_text())
            labdirs.add(Path(registry["labdir"]))
            mountpoints = registry["mountpoints"]
        for labdir in labdirs:
            self._stop_forwarders(labdir)
            self._kill_containers_of(labdir)
        self._kill_namespace_processes()
        for launcher in self._launchers.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                launcher.wait(timeout=5)
        self._launchers.clear()
        existing = [ns for ns in self.namespaces() if ns in _netns_list()]
        if existing:
            _run(["ip", "-batch", "-"], input="".join(f"netns del {ns}\n" for ns in existing))
        for labdir in labdirs:
            _detach_limit_mounts(labdir)  # before removing: never delete through a mount
            _remove_labdir(labdir)
        for mountpoint in mountpoints:  # deepest first; only if still empty
            with contextlib.suppress(OSError):
                os.rmdir(mountpoint)
        self.registry.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            REGISTRY_DIR.rmdir()  # only when no other lab is registered

    def _kill_containers_of(self, labdir: Path) -> None:
        for node in self.NODES:
            container = _read_container(labdir / node / "container.json")
            if container is not None and container.alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(container.pid1, signal.SIGKILL)

    def _kill_namespace_processes(self) -> None:
        # Anything still using a lab namespace (daemons, node_run commands, pollers, a shell an
        # operator opened with nsenter) would keep it alive after `ip netns del`.
        inodes = {st.st_ino for st in _stat_netns(self.namespaces())}
        if not inodes:
            return

        def none_left() -> bool:
            pids = _pids_in("net", inodes)
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            return not pids

        wait_until(none_left, 10.0, f"the processes of lab {self.prefix!r} to exit",
                   error=LabError)

    # -- topology ------------------------------------------------------------------------------

    def _build_topology(self) -> None:
        _run(["ip", "-batch", "-"], input="".join(f"netns add {ns}\n" for ns in self.namespaces()))
        switch = ["link set lo up"]
        for net in NETWORKS:
            switch.append(f"link add {net.bridge} type bridge stp_state 0 forward_delay 0")
        for name, endpoint in ENDPOINTS.items():
            for net_name in endpoint.networks:
                net = NETWORK_BY_NAME[net_name]
                port = self.port(name, net_name)
                switch.append(
                    f"link add {port} type veth peer name {net.interface} netns {self.netns(name)}"
                )
                switch.append(f"link set {port} master {net.bridge} up")
        switch += [f"link set {net.bridge} up" for net in NETWORKS]
        self._ip_batch("switch", switch)
        for name in ENDPOINTS:
            self._configure_interfaces(name)
        # The client must accept gratuitous ARP to follow the VIP without waiting for its ARP
        # cache to expire (on a real LAN, routers and hosts commonly do).
        accept = ("net.ipv4.conf.all.arp_accept=1", "net.ipv4.conf.eth0.arp_accept=1")
        self.client_run(["sysctl", "-q", "-w", *accept])

    def _configure_interfaces(self, endpoint: str) -> None:
        """The endpoint's configured addresses only (a boot: a leftover VIP disappears)."""
        host = self._endpoint(endpoint).host
        lines = ["link set lo up"]
        for net_name in self._endpoint(endpoint).networks:
            net = NETWORK_BY_NAME[net_name]
            lines += [
                f"addr flush dev {net.interface}",
                f"addr add {net.addr(host)}/24 dev {net.interface}",
                f"link set {net.interface} up",
            ]
        self._ip_batch(endpoint, lines)

    def _ip_batch(self, endpoint: str, lines: Sequence[str]) -> None:
        _run(["ip", "-n", self.netns(endpoint), "-batch", "-"], input="\n".join(lines) + "\n")

    def cut(self, endpoint: str, network: str | None = None, *, carrier: bool = False) -> None:
        """Cut an endpoint's link to one network (or all its links). Silent by default (the
        port leaves the bridge, carrier stays); carrier=True unplugs it (the endpoint sees
        NO-CARRIER)."""
        lines = [
            f"link set {self.port(endpoint, n)} down"
            if carrier
            else f"link set {self.port(endpoint, n)} nomaster"
            for n in self._networks(endpoint, network)
        ]
        self._ip_batch("switch", lines)

    def restore(self, endpoint: str, network: str | None = None) -> None:
        """Undo cut() (either flavour) on one network or all of an endpoint's links."""
        self._ip_batch("switch", self._restore_lines(endpoint, network))

    def _restore_lines(self, endpoint: str, network: str | None) -> list[str]:
        return [
            f"link set {self.port(endpoint, n)} master {NETWORK_BY_NAME[n].bridge} up"
            for n in self._networks(endpoint, network)
        ]

    def partition(self, node: str, *, carrier: bool = False) -> None:
        """Isolate a node from everything: peer, client and witness."""
        self.cut(self._node(node), None, carrier=carrier)

    def heal(self) -> None:
        """Restore every link cut with cut() or partition()."""
        self._ip_batch("switch", [ln for e in ENDPOINTS for ln in self._restore_lines(e, None)])

    # -- node files ----------------------------------------------------------------------------

    def _write_node_files(self) -> None:
        if self.console:
            self._set_console_password()
        if not self.configured:
            for node in self.NODES:
                self.node_home(node).mkdir(parents=True, exist_ok=True)
            return
        for node in self.NODES:
            paths = self.node_paths(node)
            for d in (paths.home, paths.userconfig.parent, paths.bin_dir, paths.log_dir):
                d.mkdir(parents=True, exist_ok=True)
            paths.cluster_xml.write_text(cluster_xml(self.NODES))
            paths.userconfig.write_text(userconfig_xml(self.settings, self.VIP))
            start_prim = start_prim_script(self.python, self.settings.app_port)
            _write_script(paths.bin_dir / "start_prim", start_prim)
            _write_script(paths.bin_dir / "stop_prim", stop_prim_script())
        # The documented install step: `cluster init` on one node, its export for the other
        # imported there.
        first_node, *other_nodes = self.NODES
        first = self.node_paths(first_node)
        init_cluster(first, self.NODES)
        for node in other_nodes:
            import_bundle(self.node_paths(node), export_bundle(first, node), "lab")

    def _set_console_password(self) -> None:
        """The install step of the console: one admin password (the same on both nodes, so
        that `make demo` prints one login), stored hashed by `mirrorha console passwd`."""
        password = secrets.token_urlsafe(9)
        secret = self.labdir / CONSOLE_PASSWORD_FILE
        secret.touch(mode=0o600)
        secret.write_text(password + "\n")
        for node in self.NODES:
            self.node_home(node).mkdir(parents=True, exist_ok=True)
            _run([str(self.mirrorha_exe), "console", "passwd", "--password-stdin"],
                 input=password + "\n", env=self.node_env(node),
                 what=f"setting {node}'s console password")

    # -- node containers -----------------------------------------------------------------------

    def _container_file(self, node: str) -> Path:
        return self.node_dir(node) / "container.json"

    def _container(self, node: str) -> Container | None:
        container = _read_container(self._container_file(node))
        return container if container is not None and container.alive() else None

    def node_pid1(self, node: str) -> int | None:
        """Host pid of the node container's PID 1, None if the node is not running."""
        container = self._container(node)
        return container.pid1 if container else None

    def node_alive(self, node: str) -> bool:
        return self._container(node) is not None

    def start_node(self, node: str, timeout: float = 10.0) -> None:
        """Boot a node: configured addresses on its interfaces, then its container's PID 1
        (labinit) running the daemon argv with the node's environment."""
        self._node(node)
        if self.node_alive(node):
            raise LabError(f"{node} is already running (pid {self.node_pid1(node)})")
        old = self._launchers.pop(node, None)
        if old is not None:
            old.poll()  # reap the launcher of a container that exited by itself
        self._configure_interfaces(node)
        argv = [a.replace("{node}", node) for a in self.daemon_argv]
        if self.console:
            # As an appliance boots: the console, and the daemon when the node is configured
            # (unconfigured: only if `mirrorha boot on` was given since, like systemd).
            daemon = ["--", *argv] if self.configured else []
            argv = [str(self.python), "-m", "appliance.nodeboot", "--console", *daemon]
        cmd = [
            "nsenter", f"--net={NETNS_DIR / self.netns(node)}",
            "unshare", "--mount", "--pid", "--uts", "--ipc", "--fork", "--mount-proc",
            "--propagation", "private", "--",
            str(self.python), "-m", "appliance.labinit", "--hostname", node, "--sysfs",
            *self._bind_options(node),
            "--", *argv,
        ]  # fmt: skip
        out = self.daemon_out(node)
        with out.open("ab") as log:
            log.write(f"--- {time.strftime('%F %T')} starting {node}: {' '.join(argv)}\n".encode())
            log.flush()
            launcher = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.node_env(node),
                cwd=self.node_home(node),
                start_new_session=True,  # survives the CLI that ran `lab up`, and its Ctrl-C
            )
        self._launchers[node] = launcher
        container = self._await_pid1(node, launcher, timeout)
        self._container_file(node).write_text(json.dumps(asdict(container)))

    def _bind_options(self, node: str) -> list[str]:
        options = []
        for d in self.private_dirs:
            options += ["--bind", f"{self.private_dir_source(node, d)}:{d}"]
        return options

    def _await_pid1(
        self, node: str, launcher: subprocess.Popen[bytes], timeout: float
    ) -> Container:
        """Wait until labinit is set up (it renames itself `labinit` once it is)."""
        found: list[int] = []

        def ready() -> bool:
            if launcher.poll() is not None:
                tail = self.daemon_out(node).read_text(errors="replace").strip().splitlines()
                raise LabError(
                    f"{node}'s container exited at once (code {launcher.returncode}): "
                    + " | ".join(tail[-5:])
                )
            found[:] = [c for c in _children(launcher.pid) if _comm(c) == "labinit"]
            return bool(found)

        wait_until(ready, timeout, f"{node}'s container to start", error=LabError)
        pid1 = found[0]
        start, pidns = _start_time(pid1), _ns_inode(pid1, "pid")
        if start is None or pidns is None:
            raise LabError(f"{node}'s container exited at once; see {self.daemon_out(node)}")
        return Container(launcher.pid, pid1, start, pidns)

    def kill_node(self, node: str, timeout: float = 10.0) -> None:
        """SIGKILL the container's PID 1; the kernel kills every other process of the node.
        Returns once none is left. The node's kernel (addresses, VIP, ARP) stays as it was."""
        container = _read_container(self._container_file(self._node(node)))
        if container is not None and container.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(container.pid1, signal.SIGKILL)
            wait_until(
                lambda: not container.alive() and not _pids_in("pid", {container.pidns}),
                timeout,
                f"every process of {node} to exit", error=LabError)
        launcher = self._launchers.pop(node, None)
        if launcher is not None:  # ours: reap it so it does not linger as a zombie
            with contextlib.suppress(subprocess.TimeoutExpired):
                launcher.wait(timeout=timeout)
        self._container_file(node).unlink(missing_ok=True)

    def crash_node(self, node: str) -> None:
        """Power loss: the node's interfaces go down (the switch sees the carrier go), then all
        its processes are killed. start_node() brings the interfaces back."""
        lines = [f"link set {NETWORK_BY_NAME[n].interface} down" for n in ENDPOINTS[node].networks]
        self._ip_batch(self._node(node), lines)
        self.kill_node(node)

    # -- running commands ----------------------------------------------------------------------

    def node_run(
        self,
        node: str,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout: float = 30.0,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run argv inside a node (its network, mount, PID and UTS namespaces, its environment)."""
        pid1 = self.node_pid1(node)
        if pid1 is None:
            raise LabError(f"{node} is not running: start it with `mirrorha lab start {node}`")
        cmd = ["nsenter", "-t", str(pid1), "-n", "-m", "-p", "-u", "--", *argv]
        return _run(
            cmd, check=check, timeout=timeout, input=input, env=self.node_env(node),
            what=f"{' '.join(argv)} on {node}",
        )  # fmt: skip

    def mirrorha(
        self, node: str, *args: str, check: bool = True, timeout: float = 30.0
    ) -> subprocess.CompletedProcess[str]:
        """`mirrorha ARGS…` on a node, as an operator logged in there would type it."""
        return self.node_run(node, [str(self.mirrorha_exe), *args], check=check, timeout=timeout)

    def ns_run(
        self,
        endpoint: str,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout: float = 30.0,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run argv in the network namespace of any lab host (or "switch"), nothing else."""
        cmd = ["nsenter", f"--net={NETNS_DIR / self.netns(endpoint)}", "--", *argv]
        return _run(
            cmd, check=check, timeout=timeout, input=input,
            what=f"{' '.join(argv)} in {self.netns(endpoint)}",
        )  # fmt: skip

    def client_run(
        self, argv: Sequence[str], *, check: bool = True, timeout: float = 30.0
    ) -> subprocess.CompletedProcess[str]:
        return self.ns_run("client", argv, check=check, timeout=timeout)

    def client_http_get(self, url: str, timeout: float = 2.0) -> str | None:
        """Body of GET url from the client, None if it failed (no answer, refused, HTTP error)."""
        result = self.client_run(
            ["curl", "--silent", "--fail", "--max-time", f"{timeout:g}", url],
            check=False,
            timeout=timeout + 5,
        )
        return result.stdout if result.returncode == 0 else None

    @contextlib.contextmanager
    def client_poller(
        self,
        url: str | None = None,
        interval_s: float = 0.05,
        timeout_s: float = 0.3,
        max_duration_s: float = 3600.0,
    ) -> Iterator[ClientPoller]:
        """A background loop in the client GETting url (default: the VIP) every interval_s."""
        url = url or f"http://{self.VIP}/"
        self.labdir.mkdir(parents=True, exist_ok=True)
        output = self.labdir / f"poll-{os.getpid()}-{time.monotonic_ns()}.jsonl"
        code = (
            "import sys; from appliance.lab import poll_loop; "
            "poll_loop(sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]))"
        )
        cmd = [
            "nsenter", f"--net={NETNS_DIR / self.netns('client')}", "--",
            str(self.python), "-c", code, url, str(interval_s), str(timeout_s), str(max_duration_s),
        ]  # fmt: skip
        with output.open("wb") as out:
            process = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.DEVNULL,
                env={**os.environ, "PYTHONPATH": str(SOURCE_ROOT)},
                start_new_session=True,
            )
        poller = ClientPoller(process, output)
        self._pollers.append(poller)
        try:
            yield poller
        finally:
            poller.stop()
            self._pollers.remove(poller)

    # -- observation ---------------------------------------------------------------------------

    def app_pids(self, comm: str = APP_COMM) -> dict[str, list[int]]:
        """Application processes per node (command name `comm`, by default the sample app's),
        found from the host. A process belongs to the node whose network namespace it runs in:
        where it really runs, whatever its arguments say."""
        node_of = {}
        for node in self.NODES:
            for st in _stat_netns([self.netns(node)]):
                node_of[st.st_ino] = node
        found: dict[str, list[int]] = {node: [] for node in self.NODES}
        for pid in _proc_pids():
            if _comm(pid) == comm:
                node = node_of.get(_ns_inode(pid, "net") or -1)
                if node is not None:
                    found[node].append(pid)
        return found

    def vip_holders(self) -> list[str]:
        """Nodes with the VIP on an interface that is up (after crash_node the address is still
        configured on the downed interface, but nobody can reach it there)."""
        holders = []
        for node in self.NODES:
            argv = ["ip", "-j", "-4", "addr", "show", "up"]
            result = self.ns_run(node, argv, check=False, timeout=5)
            if result.returncode == 0 and any(
                a.get("local") == self.VIP
                for link in json.loads(result.stdout or "[]")
                for a in link.get("addr_info", [])
            ):
                holders.append(node)
        return holders

    def link_states(self) -> dict[str, dict[str, str]]:
        """Per endpoint and network: "up", "cut" (silent), "unplugged" or "down" (the endpoint's
        own interface is down, e.g. after crash_node)."""
        switch = _links(self.netns("switch"))
        states: dict[str, dict[str, str]] = {}
        for name, endpoint in ENDPOINTS.items():
            own = _links(self.netns(name))
            states[name] = {}
            for net_name in endpoint.networks:
                port = switch.get(self.port(name, net_name), {})
                iface = own.get(NETWORK_BY_NAME[net_name].interface, {})
                if "UP" not in iface.get("flags", []):
                    states[name][net_name] = "down"
                elif "UP" not in port.get("flags", []):
                    states[name][net_name] = "unplugged"
                elif port.get("master") != NETWORK_BY_NAME[net_name].bridge:
                    states[name][net_name] = "cut"
                else:
                    states[name][net_name] = "up"
        return states

    def status(self) -> dict[str, Any]:
        present = set(_netns_list())
        namespaces = {ns: ns in present for ns in self.namespaces()}
        result: dict[str, Any] = {
            "prefix": self.prefix,
            "labdir": str(self.labdir),
            "vip": self.VIP,
            "namespaces": namespaces,
        }
        if not all(namespaces.values()):
            result["up"] = False
            return result
        result["up"] = True
        result["vip_holders"] = self.vip_holders()
        result["links"] = self.link_states()
        apps = self.app_pids()
        nodes: dict[str, object] = {}
        for node in self.NODES:
            info: dict[str, object] = {"alive": self.node_alive(node), "pid1": self.node_pid1(node)}
            info["app_pids"] = apps[node]
            info.update(self._daemon_state(node))
            nodes[node] = info
        result["nodes"] = nodes
        return result

    def _daemon_state(self, node: str) -> dict[str, object]:
        if not self.node_alive(node):
            return {"state": None}
        try:
            answer = self.mirrorha(node, "state", "--json", check=False, timeout=5)
        except LabError as e:
            return {"state": None, "state_error": str(e)}
        if answer.returncode != 0:
            return {"state": None, "state_error": (answer.stderr or answer.stdout).strip()}
        try:
            return {"state": json.loads(answer.stdout)}
        except json.JSONDecodeError:
            return {"state": None, "state_error": f"not JSON: {answer.stdout.strip()[:200]}"}


# ---------------------------------------------------------------------------------------------
# Helpers of the lab


def _require_root() -> None:
    if os.geteuid() != 0:
        raise LabError("the lab needs root: it creates network namespaces (run it with sudo)")


def _netns_list() -> list[str]:
    try:
        return sorted(e.name for e in os.scandir(NETNS_DIR))
    except FileNotFoundError:
        return []


def _stat_netns(names: Sequence[str]) -> list[os.stat_result]:
    """stat of each existing /run/netns/NAME: st_ino is the namespace (it is a bind mount of
    nsfs there, so the inode equals that of /proc/PID/ns/net of its processes)."""
    stats = []
    for name in names:
        with contextlib.suppress(OSError):
            st = os.stat(NETNS_DIR / name)
            if st.st_dev != os.stat(NETNS_DIR).st_dev:  # a leftover file is not a namespace
                stats.append(st)
    return stats


def _links(netns: str) -> dict[str, dict[str, object]]:
    result = _run(["ip", "-n", netns, "-j", "link", "show"], check=False, timeout=5)
    if result.returncode != 0:
        return {}
    return {link["ifname"]: link for link in json.loads(result.stdout or "[]")}


def _read_container(path: Path) -> Container | None:
    try:
        return Container(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _unescape_mountinfo(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _limit_mounts_under(directory: Path) -> list[Path]:
    """Mount points of the lab's size-limit tmpfs at or below `directory`, deepest first."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        fields, _, rest = line.partition(" - ")
        parts, extra = fields.split(), rest.split()
        if len(parts) < 5 or len(extra) < 2 or extra[:2] != ["tmpfs", LIMIT_FS_SOURCE]:
            continue
        mountpoint = Path(_unescape_mountinfo(parts[4]))
        if mountpoint == directory or directory in mountpoint.parents:
            found.append(mountpoint)
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def _detach_limit_mounts(labdir: Path) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    for mountpoint in _limit_mounts_under(labdir.resolve() if labdir.exists() else labdir):
        if libc.umount2(os.fsencode(mountpoint), MNT_DETACH) != 0:
            err = ctypes.get_errno()
            raise LabError(f"cannot unmount the size-limited dir {mountpoint}: "
                           f"{os.strerror(err)}")


def _write_script(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


def _remove_labdir(labdir: Path) -> None:
    # Only a directory the lab made (it holds the marker): a wrong --labdir must not erase
    # someone's files.
    if (labdir / LABDIR_MARKER).exists():
        shutil.rmtree(labdir)
    elif labdir.is_dir() and not any(labdir.iterdir()):
        labdir.rmdir()


# ---------------------------------------------------------------------------------------------
# `mirrorha lab …`


def _parser() -> argparse.ArgumentParser:
    # --prefix / --labdir go after the command (`mirrorha lab up --prefix x`): everything after
    # `lab` is handed over by the main CLI, which would take a leading option for its own.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--prefix", default="mh", help="namespace name prefix (default: mh)")
    common.add_argument("--labdir", type=Path, help="default: /tmp/mirrorha-lab-PREFIX")
    parser = argparse.ArgumentParser(
        prog="mirrorha lab", description="Two-node lab in network namespaces (needs root)."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help_: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_, description=help_, parents=[common])

    up = command("up", "build the lab and start both nodes")
    up.add_argument("--no-start", action="store_true", help="do not start the node daemons")
    up.add_argument("--witness", action="store_true", help="enable the split-brain witness")
    up.add_argument("--no-console", action="store_true", help="no web console on the nodes")
    up.add_argument("--unconfigured", action="store_true",
                    help="a freshly installed pair: only the consoles run, nothing configured "
                         "(configure it from the console)")
    command("down", "remove everything the lab created")
    command("status", "namespaces, nodes, links, VIP, daemon states").add_argument(
        "--json", action="store_true"
    )
    for name, help_ in (
        ("start", "boot a node (its daemon starts)"),
        ("kill", "kill every process of a node (its kernel stays up)"),
        ("crash", "power loss of a node: interfaces down and every process killed"),
        ("partition", "isolate a node from its peer, the client and the witness"),
    ):
        command(name, help_).add_argument("node", choices=Lab.NODES)
    command("heal", "restore every cut link")
    for name, help_ in (("cut", "cut a host's link(s)"), ("restore", "restore a host's link(s)")):
        p = command(name, help_)
        p.add_argument("host", choices=list(ENDPOINTS))
        p.add_argument("network", nargs="?", choices=list(NETWORK_BY_NAME))
        if name == "cut":
            p.add_argument("--unplug", action="store_true", help="the host sees carrier loss")
    run = command("run", "run a command inside a node, e.g. `mirrorha lab run node1 mirrorha "
                         "swap`")
    run.add_argument("node", choices=Lab.NODES)
    run.add_argument("argv", nargs=argparse.REMAINDER)
    return parser


def _console_lines(lab: Lab) -> list[str]:
    if not lab.console:
        return []
    lines = ["web console (log in as admin, password " f"{lab.admin_password}" "):"]
    for node, preferred in zip(lab.NODES, DEMO_CONSOLE_PORTS, strict=True):
        try:
            url = lab.console_url(node, preferred)
        except LabError:  # that host port is taken: any free one
            url = lab.console_url(node)
        lines.append(f"  {node}: {url}/   (certificate of the cluster's own CA: accept it once)")
    if not lab.configured:
        lines.append("  the pair is unconfigured: add both nodes "
                     f"({lab.address('node1')}, {lab.address('node2')}) in the console")
    return lines


def _print_up(lab: Lab) -> None:
    p = lab.prefix
    opt = "" if p == "mh" else f" --prefix {p}"
    cli = lab.mirrorha_exe
    pid = lab.node_pid1("node1")
    if not lab.configured:
        print("\n".join([f"lab {p!r} is up, unconfigured: switch {p}-sw, nodes {p}-n1 {p}-n2, "
                         f"client {p}-cl", *_console_lines(lab),
                         f"  tear down: {cli} lab down{opt}   (or: make demo-down)"]))
        return
    poll = (f"ip netns exec {p}-cl sh -c 'while :; do curl -s -m 0.3 http://{lab.VIP}/ "
            "|| echo \"(no answer)\"; sleep 0.2; done'")
    lines = [
        f"lab {p!r} is up: switch {p}-sw, nodes {p}-n1 {p}-n2, client {p}-cl, witness {p}-wit",
        f"virtual IP: {lab.VIP} (served by the primary's sample application)",
        f"  ask it from the client:  ip netns exec {p}-cl curl http://{lab.VIP}/",
        f"  states of both nodes:    {cli} lab status{opt}",
        "watch a failover:",
        f"  1. in another terminal:  {poll}",
        f"  2. crash the primary:    {cli} lab crash node1{opt}",
        f"  3. see node2 take over:  {cli} lab status{opt}",
        f"  4. bring node1 back:     {cli} lab start node1{opt}   (it returns as SECOND)",
        f"  swap roles back:         {cli} lab run{opt} node2 mirrorha swap",
        f"  any command on a node:   {cli} lab run{opt} node1 mirrorha log -n 20",
    ]
    if pid is not None:
        lines.append(f"  enter node1:             nsenter -t {pid} -n -m -p -u")
    lines += [
        f"  logs:                    {lab.daemon_out('node1')}",
        f"                           {lab.node_paths('node1').log_dir}/",
        f"  tear down:               {cli} lab down{opt}   (or: make demo-down)",
    ]
    print("\n".join([*_console_lines(lab), *lines]))


def _summary(state: object) -> str | None:
    """One line out of `mirrorha state --json` (the full answer is in `lab status --json`)."""
    if not isinstance(state, dict):
        return None if state is None else str(state)
    keys = ("state", "peer_state", "in_sync", "split_brain")
    shown = [(k, state[k]) for k in keys if k in state]
    text = " ".join(f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in shown)
    return text or json.dumps(state)


def _print_status(status: dict[str, Any]) -> None:
    if not status["up"]:
        missing = [ns for ns, ok in status["namespaces"].items() if not ok]
        print(f"lab {status['prefix']!r} is not up (missing namespaces: {' '.join(missing)})")
        return
    holders = ", ".join(status["vip_holders"]) or "nobody"
    print(f"lab {status['prefix']!r}: VIP {status['vip']} held by {holders}")
    links = status["links"]
    for node, info in status["nodes"].items():
        shown = _summary(info.get("state")) or info.get("state_error", "-")
        running = f"running (pid {info['pid1']})" if info["alive"] else "stopped"
        nets = " ".join(f"{n}={s}" for n, s in links[node].items())
        print(f"  {node}: {running}; links {nets}; app pids {info['app_pids']}; state {shown}")
    for host in ("client", "witness"):
        print(f"  {host}: links " + " ".join(f"{n}={s}" for n, s in links[host].items()))


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(list(argv) if argv is not None else None)
    settings = LabSettings(witness=getattr(args, "witness", False))
    try:
        lab = Lab(prefix=args.prefix, labdir=args.labdir, settings=settings,
                  console=not getattr(args, "no_console", False),
                  configured=not getattr(args, "unconfigured", False))
        _dispatch(lab, args)
    except MirrorhaError as e:
        print(f"mirrorha lab: {e}", file=sys.stderr)
        return 1
    return 0


def _dispatch(lab: Lab, args: argparse.Namespace) -> None:
    command = args.command
    if command == "up":
        lab.up(start_nodes=not args.no_start)
        _print_up(lab)
    elif command == "down":
        lab.down()
        print(f"lab {lab.prefix!r} removed")
    elif command == "status":
        status = lab.status()
        print(json.dumps(status, indent=2)) if args.json else _print_status(status)
    elif command == "start":
        lab.start_node(args.node)
        print(f"{args.node} started (pid {lab.node_pid1(args.node)})")
    elif command in ("kill", "crash"):
        (lab.kill_node if command == "kill" else lab.crash_node)(args.node)
        extra = ", interfaces down" if command == "crash" else ""
        print(f"{args.node}: every process killed{extra}")
    elif command == "partition":
        lab.partition(args.node)
        print(f"{args.node} isolated (undo: mirrorha lab heal)")
    elif command == "heal":
        lab.heal()
        print("every link restored")
    elif command == "cut":
        lab.cut(args.host, args.network, carrier=args.unplug)
        print(f"{args.host}: {args.network or 'every'} link cut")
    elif command == "restore":
        lab.restore(args.host, args.network)
        print(f"{args.host}: {args.network or 'every'} link restored")
    elif command == "run":
        result = lab.node_run(args.node, args.argv, check=False)
        sys.stdout.write(result.stdout)
        sys.stderr.write(result.stderr)
        if result.returncode:
            raise SystemExit(result.returncode)
