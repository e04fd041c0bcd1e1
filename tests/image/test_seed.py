"""The first-boot seed, without a VM: mkseed.py makes a cluster's seeds on the host, and the
appliance's mirrorha-seed applies one into a directory standing for the appliance's root."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from appliance.config import load_node_config
from appliance.keys import load_cluster_key
from image.seed import mirrorha_seed, mkseed

IMAGE_FILES = Path(__file__).resolve().parents[2] / "image" / "files"
SPEC: dict[str, Any] = {
    "vip": "198.51.100.100",
    "defaultprim": "node1",
    "pulse_ms": 500,
    "timeout_ms": 8000,
    "port": 4900,
    "replicated_dirs": ["/srv/mirrorha/data"],
    "admin_password": "a-long-password",
    "firewall_tcp_ports": [80],
    "nodes": {
        "node1": {"address": "198.51.100.1/24", "mac": "52:54:00:4D:01:01",
                  "interfaces": [{"name": "ens2", "dhcp": True}]},
        "node2": {"address": "198.51.100.2/24", "mac": "52:54:00:4d:01:02"},
    },
}


@pytest.fixture
def appliance_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory with what the image ships (units, default network, sample scripts)."""
    root = tmp_path / "root"
    shutil.copytree(IMAGE_FILES, root)
    monkeypatch.setattr(mirrorha_seed, "ROOT", root)
    return root


@pytest.fixture(scope="module")
def seeds() -> dict[str, dict[str, Any]]:
    return mkseed.make_seeds(SPEC)


def test_seeds_of_one_cluster_share_the_key_and_differ_in_identity(
        seeds: dict[str, dict[str, Any]]) -> None:
    one, two = seeds["node1"], seeds["node2"]
    assert json.loads(one["bundle"])["cluster_key"] == json.loads(two["bundle"])["cluster_key"]
    assert set(json.loads(one["bundle"])["pki"]) == {"ca.pem", "node1.pem", "node1.key"}
    assert one["instance_id"] != two["instance_id"]
    assert one["cluster_xml"] == two["cluster_xml"]
    # The clear-text password never reaches the seed; a werkzeug hash does.
    assert "admin_password" not in one
    assert one["admin_password_hash"].startswith(("scrypt:", "pbkdf2:"))


def test_applying_a_seed_configures_the_node(
        appliance_root: Path, seeds: dict[str, dict[str, Any]]) -> None:
    summary = mirrorha_seed.apply(seeds["node1"])
    assert "module configured" in summary

    home = appliance_root / "var/lib/mirrorha"
    config = load_node_config(home / "cluster.xml", home / "mirror/conf/userconfig.xml")
    assert config.service.heart.port == 4900
    assert config.service.defaultprim == "node1"
    assert len(load_cluster_key(home / "cluster.key")) == 32
    assert (home / "pki/node1.key").stat().st_mode & 0o777 == 0o600
    assert not (home / "pki/node2.key").exists()
    assert (home / "mirror/bin/start_prim").read_text().startswith("#!/bin/sh")
    assert (appliance_root / "srv/mirrorha/data").is_dir()
    admin = json.loads((home / "console/admin.json").read_text())
    assert admin["user"] == "admin" and admin["hash"] == seeds["node1"]["admin_password_hash"]

    cluster_link = (appliance_root / "etc/systemd/network/10-seed-0.network").read_text()
    assert "MACAddress=52:54:00:4d:01:01" in cluster_link
    assert "Address=198.51.100.1/24" in cluster_link
    assert "Name=ens2" in (appliance_root / "etc/systemd/network/10-seed-1.network").read_text()
    assert not (appliance_root / "etc/systemd/network/99-mirrorha-default.network").exists()
    assert (appliance_root / "etc/hostname").read_text() == "node1\n"

    firewall = (appliance_root / "etc/nftables.conf").read_text()
    assert "tcp dport { 80, 4901, 9010, 9011 } accept" in firewall
    assert "udp dport 4900 accept" in firewall
    assert "policy drop" in firewall


def test_a_seed_is_applied_once_per_instance_id(
        appliance_root: Path, seeds: dict[str, dict[str, Any]]) -> None:
    mirrorha_seed.apply(seeds["node2"])
    assert mirrorha_seed.already_applied(seeds["node2"])
    assert not mirrorha_seed.already_applied({**seeds["node2"], "instance_id": "new"})


def test_an_invalid_seed_changes_nothing(
        appliance_root: Path, seeds: dict[str, dict[str, Any]]) -> None:
    broken = {**seeds["node1"], "userconfig_xml": seeds["node1"]["userconfig_xml"].replace(
        'pulse="500"', 'pulse="fast"')}
    before = sorted(p.relative_to(appliance_root) for p in appliance_root.rglob("*"))
    with pytest.raises(mirrorha_seed.SeedError, match="heart@pulse"):
        mirrorha_seed.apply(broken)
    assert sorted(p.relative_to(appliance_root) for p in appliance_root.rglob("*")) == before


def test_a_seed_with_a_malformed_bundle_changes_nothing(
        appliance_root: Path, seeds: dict[str, dict[str, Any]]) -> None:
    broken = {**seeds["node1"], "bundle": json.dumps({"cluster_key": "not-hex", "pki": {}})}
    before = sorted(p.relative_to(appliance_root) for p in appliance_root.rglob("*"))
    with pytest.raises(mirrorha_seed.SeedError, match="seed: "):
        mirrorha_seed.apply(broken)
    assert sorted(p.relative_to(appliance_root) for p in appliance_root.rglob("*")) == before


def test_the_seed_disk_is_a_vfat_labelled_mhseed(
        tmp_path: Path, seeds: dict[str, dict[str, Any]]) -> None:
    if shutil.which("mkfs.vfat") is None or shutil.which("mtype") is None:
        pytest.skip("dosfstools and mtools are installed by scripts/bootstrap.sh")
    image = tmp_path / "seed.img"
    mkseed.write_seed_image(seeds["node1"], image)
    label = subprocess.run(["blkid", "-o", "value", "-s", "LABEL", str(image)],
                           capture_output=True, text=True, check=True).stdout.strip()
    assert label == mirrorha_seed.SEED_LABEL
    assert mirrorha_seed.parse_seed(mirrorha_seed.read_seed_device(str(image)), "disk") == \
        seeds["node1"]
