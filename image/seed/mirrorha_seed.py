#!/opt/mirrorha/bin/python3
"""First-boot configuration of the mirrorha appliance from a seed disk.

Installed as /usr/local/sbin/mirrorha-seed and run early at every boot by
mirrorha-seed.service (before the network, the firewall and the mirrorha units):

    mirrorha-seed apply              find the seed disk (vfat labelled MHSEED), apply it once
    mirrorha-seed apply --file F     apply a seed.json given directly
    mirrorha-seed firewall [...]     write /etc/nftables.conf for the configured ports

The seed is `seed.json` on a small vfat disk (image/seed/mkseed.py makes one per node). It is
applied when its `instance_id` differs from the last one applied (as cloud-init's NoCloud
does), so a reboot changes nothing and a new seed reconfigures the node. Everything is
validated before anything is written; an invalid seed leaves the node as it was and the unit
fails with one line saying why (`journalctl -u mirrorha-seed`).

Keys of seed.json (all optional except instance_id):
  instance_id          any string; a new value re-applies the seed
  hostname             the node's host name (default: node)
  node                 the node's mirrorha name (a node of cluster_xml)
  interfaces           [{"mac" | "name", "address": "A.B.C.D/N" | "dhcp": true, "gateway"}]
  cluster_xml          text of cluster.xml
  userconfig_xml       text of the module's userconfig.xml
  bundle               `mirrorha cluster export NODE` output (cluster key, CA, node cert)
  start_prim, stop_prim  the module's scripts (default: the sample application's)
  admin_password_hash  the web console's admin password (hash), or admin_password (clear)
  root_password_hash   crypt(3) hash for root on the local consoles (default: root locked)
  firewall_tcp_ports   extra TCP ports to open, e.g. the application's [80]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path
from typing import Any

SEED_LABEL = "MHSEED"
SEED_FILE = "seed.json"
STATE_DIR = Path("/var/lib/mirrorha-seed")
NETWORK_DIR = Path("/etc/systemd/network")
NFTABLES_CONF = Path("/etc/nftables.conf")
SAMPLE_DIR = Path("/usr/share/mirrorha/sample")
DEFAULT_NETWORK = NETWORK_DIR / "99-mirrorha-default.network"
CONSOLE_PORT = 9010
METRICS_PORT = 9011
DEFAULT_HEARTBEAT_PORT = 4800
ROOT = Path(os.environ.get("MIRRORHA_SEED_ROOT", "/"))  # tests apply a seed into a directory


class SeedError(Exception):
    """The seed cannot be applied; the message says why, for the operator."""


def is_live_system() -> bool:
    """Applying to the running system (not into a directory): host name and root password too."""
    return str(ROOT) == "/"


def under_root(path: Path) -> Path:
    return ROOT / path.relative_to("/")


# -- finding and reading the seed --------------------------------------------------------------


def find_seed_device() -> str | None:
    """The block device labelled MHSEED. blkid probes the devices itself, so this works before
    udev has made its /dev/disk/by-label links."""
    result = subprocess.run(["blkid", "-t", f"LABEL={SEED_LABEL}", "-o", "device"],
                            capture_output=True, text=True, check=False)
    devices = result.stdout.split()
    return devices[0] if devices else None


def read_seed_device(device: str) -> str:
    # mtools reads the vfat directly: no mount, no filesystem module to load.
    result = subprocess.run(["mtype", "-i", device, f"::{SEED_FILE}"],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SeedError(f"{device}: no {SEED_FILE} on the seed disk ({result.stderr.strip()})")
    return result.stdout


def parse_seed(text: str, origin: str) -> dict[str, Any]:
    try:
        seed = json.loads(text)
    except ValueError as e:
        raise SeedError(f"{origin}: not JSON ({e})") from None
    if not isinstance(seed, dict) or not isinstance(seed.get("instance_id"), str):
        raise SeedError(f"{origin}: a JSON object with a string instance_id is required")
    return seed


# -- validation (nothing written yet) ----------------------------------------------------------


@dataclass(frozen=True)
class Interface:
    match: tuple[str, str]  # ("MACAddress", "52:54:...") or ("Name", "ens4")
    address: IPv4Interface | None
    dhcp: bool
    gateway: IPv4Address | None


def parse_interfaces(items: object) -> list[Interface]:
    if not isinstance(items, list):
        raise SeedError("interfaces: a list is required")
    result = []
    for i, item in enumerate(items):
        where = f"interfaces[{i}]"
        if not isinstance(item, dict):
            raise SeedError(f"{where}: an object is required")
        if "mac" in item:
            match = ("MACAddress", str(item["mac"]).lower())
        elif "name" in item:
            match = ("Name", str(item["name"]))
        else:
            raise SeedError(f"{where}: give the interface by mac or by name")
        try:
            address = IPv4Interface(item["address"]) if "address" in item else None
            gateway = IPv4Address(item["gateway"]) if item.get("gateway") else None
        except ValueError as e:
            raise SeedError(f"{where}: {e}") from None
        dhcp = bool(item.get("dhcp", False))
        if address is None and not dhcp:
            raise SeedError(f"{where}: give an address (A.B.C.D/N) or dhcp: true")
        result.append(Interface(match, address, dhcp, gateway))
    return result


def check_module_config(seed: dict[str, Any]) -> int:
    """Validates cluster.xml and userconfig.xml with mirrorha's own parser; returns the heartbeat
    port. Imported here, not at the top, so a boot with nothing to do stays fast."""
    from appliance.config import parse_cluster, parse_node_config
    from appliance.errors import ConfigError
    with tempfile.TemporaryDirectory() as tmp:
        cluster_path = Path(tmp) / "cluster.xml"
        user_path = Path(tmp) / "userconfig.xml"
        try:
            cluster = parse_cluster(seed["cluster_xml"], cluster_path)
            config = parse_node_config(cluster, seed["userconfig_xml"], user_path)
        except ConfigError as e:
            raise SeedError(f"seed: {e}") from None
    node = seed.get("node")
    names = [n.name for n in config.cluster.nodes]
    if node is not None and node not in names:
        raise SeedError(f"seed: node {node!r} is not in cluster_xml ({', '.join(names)})")
    return config.service.heart.port


def check_bundle(text: str) -> None:
    """Imports the bundle into a scratch directory with mirrorha's own code: a malformed one
    fails here, before anything of the node is written."""
    from appliance.errors import MirrorhaError
    from appliance.keys import import_bundle
    from appliance.paths import Paths
    with tempfile.TemporaryDirectory() as tmp:
        try:
            import_bundle(Paths(Path(tmp)), str(text), "seed bundle")
        except MirrorhaError as e:
            raise SeedError(f"seed: {e}") from None


# -- applying ----------------------------------------------------------------------------------


def write_file(path: Path, text: str, mode: int = 0o644) -> None:
    target = under_root(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".seed-tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, mode)
    os.replace(tmp, target)


def network_unit(index: int, iface: Interface) -> str:
    key, value = iface.match
    lines = ["# Written by mirrorha-seed from the seed disk.", "[Match]", f"{key}={value}", "",
             "[Network]"]
    if iface.dhcp:
        lines.append("DHCP=ipv4")
    if iface.address is not None:
        lines.append(f"Address={iface.address.with_prefixlen}")
    if iface.gateway is not None:
        lines.append(f"Gateway={iface.gateway}")
    # The VIP is added by the daemon, not by networkd: keep networkd from removing it when it
    # reconfigures the link, and from dropping the node's address when the carrier blinks.
    lines += ["KeepConfiguration=static", "ConfigureWithoutCarrier=yes", "IgnoreCarrierLoss=yes",
              "LinkLocalAddressing=no", "IPv6AcceptRA=no", ""]
    return "\n".join(lines)


def apply_network(interfaces: list[Interface]) -> None:
    for old in under_root(NETWORK_DIR).glob("10-seed-*.network"):
        old.unlink()
    for i, iface in enumerate(interfaces):
        write_file(NETWORK_DIR / f"10-seed-{i}.network", network_unit(i, iface))
    # The seed describes the machine's network: no DHCP on what it did not name.
    under_root(DEFAULT_NETWORK).unlink(missing_ok=True)


def apply_hostname(name: str) -> None:
    write_file(Path("/etc/hostname"), name + "\n")
    write_file(Path("/etc/hosts"), f"127.0.0.1\tlocalhost\n127.0.1.1\t{name}\n"
               "::1\tlocalhost ip6-localhost ip6-loopback\n")
    if is_live_system():
        socket.sethostname(name)


def apply_module(seed: dict[str, Any]) -> None:
    from appliance.keys import import_bundle
    from appliance.paths import Paths
    paths = Paths(ROOT / "var/lib/mirrorha")
    write_file(Path("/var/lib/mirrorha/cluster.xml"), seed["cluster_xml"])
    write_file(Path("/var/lib/mirrorha/mirror/conf/userconfig.xml"), seed["userconfig_xml"])
    for script in ("start_prim", "stop_prim"):
        text = seed.get(script) or under_root(SAMPLE_DIR / script).read_text()
        write_file(Path(f"/var/lib/mirrorha/mirror/bin/{script}"), text, 0o755)
    if "bundle" in seed:
        import_bundle(paths, seed["bundle"], "seed")
    # The replicated directories must exist before the daemon over-mounts them.
    from appliance.config import load_userconfig
    service = load_userconfig(paths.userconfig)
    for replicated in service.rfs.dirs if service.rfs else ():
        under_root(Path(str(replicated.path))).mkdir(parents=True, exist_ok=True)


def apply_console_password(seed: dict[str, Any]) -> None:
    """The web console's admin password, in the console's own file (`mirrorha console passwd`
    writes the same: {"user": "admin", "hash": <werkzeug hash>}). A clear-text password in a
    hand-written seed is hashed here; mkseed.py only ever puts the hash on the disk."""
    hashed = seed.get("admin_password_hash")
    if not hashed and seed.get("admin_password"):
        from werkzeug.security import generate_password_hash
        hashed = generate_password_hash(str(seed["admin_password"]))
    if not hashed:
        return
    console_dir = under_root(Path("/var/lib/mirrorha/console"))
    console_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_file(Path("/var/lib/mirrorha/console/admin.json"),
               json.dumps({"user": "admin", "hash": hashed}) + "\n", 0o600)


def apply_root_password(seed: dict[str, Any]) -> None:
    crypted = seed.get("root_password_hash")
    if crypted and is_live_system():
        subprocess.run(["usermod", "-p", str(crypted), "root"], check=True)


def nftables_conf(heartbeat_port: int, extra_tcp: Sequence[int] = ()) -> str:
    """Inbound: the console, the metrics, the heartbeats and the replication stream (heartbeat
    port + 1), plus what the operator named; answers to our own traffic; nothing else."""
    tcp = sorted({CONSOLE_PORT, METRICS_PORT, heartbeat_port + 1, *extra_tcp})
    application = f", application {list(extra_tcp)}" if extra_tcp else ""
    return f"""#!/usr/sbin/nft -f
# Written by mirrorha-seed (mirrorha appliance firewall). Inbound only what the appliance
# serves: console :{CONSOLE_PORT}, metrics :{METRICS_PORT}, heartbeats udp :{heartbeat_port},
# replication tcp :{heartbeat_port + 1}{application}.
flush ruleset

table inet mirrorha {{
  chain input {{
    type filter hook input priority filter; policy drop;
    iif lo accept
    ct state established,related accept
    ct state invalid drop
    # IPv6 neighbour discovery (the IPv6 equivalent of ARP, which nftables does not filter here)
    icmpv6 type {{ nd-neighbor-solicit, nd-neighbor-advert, nd-router-advert }} accept
    tcp dport {{ {", ".join(map(str, tcp))} }} accept
    udp dport {heartbeat_port} accept
  }}
  chain forward {{
    type filter hook forward priority filter; policy drop;
  }}
}}
"""


def apply_firewall(heartbeat_port: int, extra_tcp: Sequence[int]) -> None:
    write_file(NFTABLES_CONF, nftables_conf(heartbeat_port, extra_tcp), 0o755)


def seed_digest(seed: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(seed, sort_keys=True).encode()).hexdigest()[:16]


def apply(seed: dict[str, Any]) -> str:
    """Validates everything, then writes. Returns a one-line summary."""
    interfaces = parse_interfaces(seed.get("interfaces", []))
    has_module = "cluster_xml" in seed or "userconfig_xml" in seed
    if has_module and not ("cluster_xml" in seed and "userconfig_xml" in seed):
        raise SeedError("seed: cluster_xml and userconfig_xml go together")
    port = check_module_config(seed) if has_module else DEFAULT_HEARTBEAT_PORT
    extra_tcp = [int(p) for p in seed.get("firewall_tcp_ports", [])]
    if any(not 0 < p < 65536 for p in extra_tcp):
        raise SeedError(f"seed: firewall_tcp_ports {extra_tcp}: ports are 1 to 65535")
    if "bundle" in seed:
        check_bundle(seed["bundle"])
    hostname = seed.get("hostname") or seed.get("node")

    if hostname:
        apply_hostname(str(hostname))
    if interfaces:
        apply_network(interfaces)
    if has_module:
        apply_module(seed)
    apply_console_password(seed)
    apply_root_password(seed)
    apply_firewall(port, extra_tcp)
    state = under_root(STATE_DIR)
    state.mkdir(parents=True, exist_ok=True)
    (state / "instance-id").write_text(seed["instance_id"] + "\n")
    (state / "digest").write_text(seed_digest(seed) + "\n")
    return (f"seed {seed['instance_id']} applied: host {hostname or '-'}, "
            f"{len(interfaces)} interface(s), module {'configured' if has_module else 'unset'}, "
            f"firewall tcp {CONSOLE_PORT},{METRICS_PORT},{port + 1} udp {port}")


def already_applied(seed: dict[str, Any]) -> bool:
    try:
        return (under_root(STATE_DIR) / "instance-id").read_text().strip() == seed["instance_id"]
    except FileNotFoundError:
        return False


# -- command line ------------------------------------------------------------------------------


def cmd_apply(args: argparse.Namespace) -> int:
    if args.file:
        seed = parse_seed(Path(args.file).read_text(), args.file)
    else:
        device = args.device or find_seed_device()
        if device is None:
            print(f"mirrorha-seed: no seed disk (vfat labelled {SEED_LABEL}); nothing to do")
            return 0
        seed = parse_seed(read_seed_device(device), device)
    if already_applied(seed) and not args.force:
        print(f"mirrorha-seed: seed {seed['instance_id']} already applied")
        return 0
    print(f"mirrorha-seed: {apply(seed)}")
    return 0


def cmd_firewall(args: argparse.Namespace) -> int:
    apply_firewall(args.port, args.tcp)
    print(f"mirrorha-seed: {under_root(NFTABLES_CONF)} written")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mirrorha-seed", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("apply", help="apply the seed disk (once per instance_id)")
    a.add_argument("--device", help="the seed disk (default: the vfat labelled MHSEED)")
    a.add_argument("--file", help="a seed.json to apply instead of the seed disk")
    a.add_argument("--force", action="store_true", help="apply even if already applied")
    a.set_defaults(func=cmd_apply)
    f = sub.add_parser("firewall", help="write /etc/nftables.conf")
    f.add_argument("--port", type=int, default=DEFAULT_HEARTBEAT_PORT, help="heartbeat port")
    f.add_argument("--tcp", type=int, action="append", default=[], help="extra TCP port")
    f.set_defaults(func=cmd_firewall)
    args = p.parse_args(argv)
    try:
        return int(args.func(args))
    except (SeedError, OSError, subprocess.CalledProcessError) as e:
        print(f"mirrorha-seed: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    os.umask(0o022)
    sys.exit(main())
