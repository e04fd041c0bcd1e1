"""Makes the seed disks of a two-node mirrorha appliance cluster, on the host.

    .venv/bin/python image/seed/mkseed.py SPEC.json -o build/seeds

writes, for each node of SPEC, `NODE.json` (the seed) and `NODE-seed.img` (a 1 MiB vfat labelled
MHSEED holding it as seed.json), to attach to that node's VM as a second disk. The cluster key,
CA and node certificates are made here (`mirrorha cluster init` in a temporary directory) and each
node's seed carries its own bundle, so both VMs boot as one cluster; the CA's private key is
thrown away with the directory. A seed holds secrets: keep it like a private key.

SPEC (see image/seed/example-cluster.json):
  {"vip": "198.51.100.100", "pulse_ms": 700, "timeout_ms": 30000, "port": 4800,
   "replicated_dirs": ["/srv/mirrorha/data"], "admin_password": "...",
   "firewall_tcp_ports": [80],
   "nodes": {"node1": {"address": "198.51.100.1/24", "mac": "52:54:00:..:..:..",
                       "interfaces": [{"mac": "...", "address": "192.0.2.15/24"}]},
             "node2": {...}}}
`address` is the node's address on the cluster network (heartbeats, replication, the VIP's
subnet), on the interface given by `mac` (or `ifname`); `interfaces` lists other interfaces.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import replace
from ipaddress import IPv4Interface
from pathlib import Path
from typing import Any

from appliance.files import write_atomic
from appliance.keys import export_bundle, init_cluster
from appliance.lab import APP_COMM, LabSettings, userconfig_xml
from appliance.paths import Paths

SEED_LABEL = "MHSEED"
CLUSTER_LAN = "default"
SEED_IMAGE_KIB = 1024


class SpecError(Exception):
    pass


def cluster_xml(addresses: dict[str, IPv4Interface]) -> str:
    cluster = ET.Element("cluster")
    lan = ET.SubElement(ET.SubElement(cluster, "lans"), "lan", name=CLUSTER_LAN)
    for node, iface in addresses.items():
        ET.SubElement(lan, "node", name=node, addr=str(iface.ip))
    ET.indent(cluster, space="  ")
    return ET.tostring(cluster, encoding="unicode") + "\n"


def module_userconfig(spec: dict[str, Any]) -> str:
    # The lab's generator, on one network: the same file the lab's tests exercise.
    settings = replace(
        LabSettings(),
        pulse_ms=int(spec.get("pulse_ms", 700)),
        timeout_ms=int(spec.get("timeout_ms", 30000)),
        defaultprim=str(spec.get("defaultprim", "alone")),
        heartbeat_networks=(CLUSTER_LAN,),
        flow_network=CLUSTER_LAN,
        errd_polltimer_s=float(spec.get("errd_polltimer_s", 10)),
        replicated_dirs=tuple(spec.get("replicated_dirs", ())),
        # The sample application is watched by errd; an application of one's own names its
        # process (or null for none).
        errd_proc=spec.get("errd_proc", APP_COMM if "start_prim" not in spec else None),
    )
    text = userconfig_xml(settings, spec["vip"])
    port = spec.get("port")
    if port is not None:
        text = text.replace("<heart ", f'<heart port="{int(port)}" ', 1)
    return text


def node_seed(spec: dict[str, Any], node: str, common: dict[str, Any],
              bundle: str) -> dict[str, Any]:
    entry = spec["nodes"][node]
    cluster_if: dict[str, Any] = {"address": entry["address"]}
    if "mac" in entry:
        cluster_if["mac"] = entry["mac"]
    elif "ifname" in entry:
        cluster_if["name"] = entry["ifname"]
    else:
        raise SpecError(f"nodes.{node}: give the cluster interface's mac or ifname")
    seed = {
        "instance_id": f"{node}-{secrets.token_hex(6)}",
        "hostname": node,
        "node": node,
        "interfaces": [cluster_if, *entry.get("interfaces", [])],
        "bundle": bundle,
        **common,
    }
    return seed


def make_seeds(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    nodes = list(spec.get("nodes", {}))
    if len(nodes) != 2:
        raise SpecError(f"nodes: two nodes are required, found {nodes}")
    try:
        addresses = {n: IPv4Interface(spec["nodes"][n]["address"]) for n in nodes}
    except (KeyError, ValueError) as e:
        raise SpecError(f"nodes: each needs an address A.B.C.D/N ({e})") from None
    if "vip" not in spec:
        raise SpecError("vip: the virtual IP is required")
    common: dict[str, Any] = {
        "cluster_xml": cluster_xml(addresses),
        "userconfig_xml": module_userconfig(spec),
    }
    for key in ("admin_password_hash", "root_password_hash", "firewall_tcp_ports",
                "start_prim", "stop_prim"):
        if key in spec:
            common[key] = spec[key]
    if "admin_password" in spec:
        # Hashed here, as `mirrorha console passwd` would: the clear text never reaches a disk.
        from werkzeug.security import generate_password_hash
        common["admin_password_hash"] = generate_password_hash(str(spec["admin_password"]))
    with tempfile.TemporaryDirectory() as tmp:
        paths = Paths(Path(tmp))
        init_cluster(paths, nodes)
        return {n: node_seed(spec, n, common, export_bundle(paths, n)) for n in nodes}


def write_seed_image(seed: dict[str, Any], path: Path) -> None:
    """A vfat labelled MHSEED with seed.json, made without mounting (mkfs.vfat + mtools)."""
    path.unlink(missing_ok=True)
    # The seed holds the node's key: the image is 0600 before anything is written into it.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, SEED_IMAGE_KIB * 1024)
    finally:
        os.close(fd)
    subprocess.run(["mkfs.vfat", "-n", SEED_LABEL, str(path)], check=True, capture_output=True)
    with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
        json.dump(seed, f, indent=2)
        f.flush()
        subprocess.run(["mcopy", "-i", str(path), f.name, "::seed.json"], check=True,
                       capture_output=True)
    path.chmod(0o600)


def write_all(spec: dict[str, Any], out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    images = {}
    for node, seed in make_seeds(spec).items():
        write_atomic(out / f"{node}.json", (json.dumps(seed, indent=2) + "\n").encode())
        images[node] = out / f"{node}-seed.img"
        write_seed_image(seed, images[node])
    return images


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="seed disks for a two-node appliance cluster")
    p.add_argument("spec", help="cluster spec (JSON), see image/seed/example-cluster.json")
    p.add_argument("-o", "--out", default="build/seeds", help="output directory")
    args = p.parse_args(argv)
    try:
        spec = json.loads(Path(args.spec).read_text())
        images = write_all(spec, Path(args.out))
    except (SpecError, OSError, ValueError, subprocess.CalledProcessError) as e:
        print(f"mkseed: {e}", file=sys.stderr)
        return 1
    for node, image in images.items():
        print(f"{node}: {image}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
