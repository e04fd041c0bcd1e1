"""keepalived (Debian's package, VRRPv3) as the comparison point, run in the same lab.

Each node container runs `keepalived` in the foreground instead of the mirrorha daemon, with a
config of its own in the node's home: one VRRP instance on eth0 carrying the same VIP, adverts
every 0.1 s, both nodes starting as BACKUP with `nopreempt` so that a node coming back does not
take the VIP back (mirrorha does not fail back either: the returning node is SECOND). The
notify scripts run the lab's own start_prim / stop_prim, so a takeover includes starting the
same application as with mirrorha. Adverts are multicast (224.0.0.18) on the lab's `default`
network only, where mirrorha sends heartbeats on both networks; keepalived sends its own
gratuitous ARPs when it takes the VIP.

keepalived only moves an address: it has no notion of data, so nothing stops a node with stale
data from serving (mirrorha's generations). The comparison is about VIP failover time only.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from appliance.lab import Lab
from bench.common import Takeover

KEEPALIVED = "/usr/sbin/keepalived"
VIRTUAL_ROUTER_ID = 51
PRIORITY = {"node1": 150, "node2": 100}
ADVERT_INT_S = 0.1
CONF = "keepalived.conf"
STATE_LOG = "vrrp-state.log"  # one line per notify: "EPOCH begin|end STATE [rc]"
NOTIFY = "vrrp-notify"
PID_FILES = ("keepalived.pid", "vrrp.pid", "checkers.pid", "bfd.pid")
PID_OPTIONS = ("pid", "vrrp_pid", "checkers_pid", "bfd_pid")


def version() -> str:
    result = subprocess.run(
        [KEEPALIVED, "--version"], capture_output=True, text=True, timeout=10, check=False
    )
    lines = (result.stderr or result.stdout).strip().splitlines()
    return lines[0] if lines else "unknown"


def daemon_argv(lab_dir: Path) -> list[str]:
    """keepalived in the foreground, VRRP only, logging to the container's stdout.

    Pid files go into the node's home because the nodes share /run. A crash leaves them behind,
    and keepalived refuses to start when its pid file names a live process, which after a
    reboot of the container is likely (pids restart from 2): on a server /run is a tmpfs that a
    boot empties, so the boot here removes them too."""
    home = f"{lab_dir}/{{node}}/home"  # Lab replaces {node}
    pid_files = [f"{home}/{name}" for name in PID_FILES]
    keepalived = [
        KEEPALIVED,
        "--dont-fork",
        "--log-console",
        "--log-detail",
        "--no-syslog",
        "--vrrp",
        f"--use-file={home}/{CONF}",
        *(f"--{option}={path}" for option, path in zip(PID_OPTIONS, pid_files, strict=True)),
    ]
    return ["sh", "-c", f"rm -f {' '.join(pid_files)}; exec {' '.join(keepalived)}"]


def config(lab: Lab, node: str) -> str:
    home = lab.node_home(node)
    notify = home / NOTIFY
    scripts = "\n".join(
        f'    notify_{event.lower()} "{notify} {event}"'
        for event in ("MASTER", "BACKUP", "FAULT", "STOP")
    )
    return f"""# mirrorha failover bench: keepalived side ({node})
global_defs {{
    router_id {node}
    vrrp_version 3
    # The notify scripts stop/start the application: they run as root, like start_prim.
    script_user root
}}

vrrp_instance VI_1 {{
    state BACKUP
    nopreempt
    interface eth0
    virtual_router_id {VIRTUAL_ROUTER_ID}
    priority {PRIORITY[node]}
    advert_int {ADVERT_INT_S:g}
    virtual_ipaddress {{
        {lab.VIP}/24 dev eth0
    }}
{scripts}
}}
"""


def notify_script(lab: Lab, node: str) -> str:
    """Records each transition with a sub-millisecond timestamp (keepalived's console log has
    whole seconds), then runs the lab's start_prim / stop_prim with the node's environment
    spelled out (not relying on what keepalived passes to scripts)."""
    paths = lab.node_paths(node)
    env = " ".join(f"{k}={v}" for k, v in lab.node_env(node).items())
    state_log = lab.node_home(node) / STATE_LOG
    return f"""#!/bin/sh
# keepalived notify for {node}: $1 is the target state (MASTER BACKUP FAULT STOP)
echo "$(date +%s.%N) begin $1" >> {state_log}
case "$1" in
  MASTER) script={paths.bin_dir}/start_prim ;;
  *) script={paths.bin_dir}/stop_prim ;;
esac
cd {paths.module_dir}
env {env} "$script" >> {paths.app_log} 2>&1 < /dev/null
rc=$?
echo "$(date +%s.%N) end $1 $rc" >> {state_log}
exit $rc
"""


def write_node_files(lab: Lab) -> None:
    """After lab.up(start_nodes=False): keepalived's config and notify script on each node."""
    for node in lab.NODES:
        home = lab.node_home(node)
        (home / CONF).write_text(config(lab, node))
        notify = home / NOTIFY
        notify.write_text(notify_script(lab, node))
        notify.chmod(0o755)
        lab.node_paths(node).log_dir.mkdir(parents=True, exist_ok=True)


@dataclass(frozen=True)
class Notified:
    """One line of the state log: a notify script beginning or ending."""

    when: float  # epoch seconds
    phase: str  # "begin" or "end"
    target: str  # MASTER, BACKUP, FAULT, STOP


def _state_lines(lab: Lab, node: str) -> list[Notified]:
    try:
        text = (lab.node_home(node) / STATE_LOG).read_text()
    except FileNotFoundError:
        return []
    lines = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3:
            lines.append(Notified(float(parts[0]), parts[1], parts[2]))
    return lines


def state(lab: Lab, node: str, since: float) -> str | None:
    """The last state keepalived notified on a running node since epoch time `since` (the log
    outlives restarts), once its script has finished."""
    if not lab.node_alive(node):
        return None
    ended = [n for n in _state_lines(lab, node) if n.phase == "end" and n.when >= since]
    return ended[-1].target if ended else None


def takeover(lab: Lab, node: str, since: float) -> Takeover | None:
    """The first MASTER transition of `node` after epoch time `since`, once its script ended."""
    begin: float | None = None
    for n in _state_lines(lab, node):
        if n.when < since or n.target != "MASTER":
            continue
        if n.phase == "begin" and begin is None:
            begin = n.when
        elif n.phase == "end" and begin is not None:
            # keepalived adds the VIP, then forks the notify script: its start is the decision.
            return Takeover(decided=begin, app_launched=begin, script_s=n.when - begin)
    return None
