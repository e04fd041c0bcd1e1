"""VirtualIp against real network namespaces: two nodes and a client on one bridge.

client ns (vipt-c-PID): bridge br0 192.0.2.1/24, arp_accept=1 (like a router that learns
gratuitous ARP); node A ns (vipt-a-PID): eth0 192.0.2.10/24; node B ns (vipt-b-PID): eth0
192.0.2.11/24. Each node's eth0 is a veth whose peer is enslaved to br0."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address

import pytest

from appliance.vip import VipError, VirtualIp, vip_label
from appliance.waiting import wait_until

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]

VIP = IPv4Address("192.0.2.100")


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=10).stdout




@dataclass(frozen=True)
class Lab:
    a: str
    b: str
    client: str

    def mac(self, ns: str, ifname: str = "eth0") -> str:
        return json.loads(sh("ip", "-n", ns, "-j", "link", "show", ifname))[0]["address"]

    def client_neigh(self, addr: IPv4Address) -> str | None:
        """MAC the client's neighbour table holds for addr, if any."""
        entries = json.loads(sh("ip", "-n", self.client, "-j", "neigh", "show", str(addr)))
        macs = [e.get("lladdr") for e in entries if e.get("lladdr")]
        return macs[0] if macs else None

    def ping(self, addr: IPv4Address) -> bool:
        argv = ["ip", "netns", "exec", self.client, "ping", "-c", "1", "-W", "1", str(addr)]
        return subprocess.run(argv, capture_output=True, timeout=5).returncode == 0


@pytest.fixture
def lab() -> Iterator[Lab]:
    pid = os.getpid()
    lab = Lab(a=f"vipt-a-{pid}", b=f"vipt-b-{pid}", client=f"vipt-c-{pid}")
    created: list[str] = []
    try:
        for ns in (lab.client, lab.a, lab.b):
            sh("ip", "netns", "add", ns)
            created.append(ns)
        c = lab.client
        sh("ip", "netns", "exec", c, "sysctl", "-qw", "net.ipv4.conf.all.arp_accept=1")
        sh("ip", "-n", c, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", c, "addr", "add", "192.0.2.1/24", "dev", "br0")
        sh("ip", "-n", c, "link", "set", "br0", "up")
        for ns, peer, addr in ((lab.a, "pa", "192.0.2.10/24"), (lab.b, "pb", "192.0.2.11/24")):
            sh("ip", "-n", c, "link", "add", peer, "type", "veth", "peer", "eth0", "netns", ns)
            sh("ip", "-n", c, "link", "set", peer, "master", "br0", "up")
            sh("ip", "-n", ns, "addr", "add", addr, "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        yield lab
    finally:
        for ns in created:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


@pytest.fixture
def messages() -> list[str]:
    return []


def make_vip(lab: Lab, ns: str, log: list[str], interface: str | None = None) -> VirtualIp:
    return VirtualIp(VIP, interface, arpreroute=True, log=log.append, netns=ns)


@pytest.fixture
def vips() -> Iterator[list[VirtualIp]]:
    made: list[VirtualIp] = []
    try:
        yield made
    finally:
        for v in made:
            v.close()


def test_vip_is_added_with_label_and_answers_the_client(
    lab: Lab, messages: list[str], vips: list[VirtualIp]
) -> None:
    vip = make_vip(lab, lab.a, messages)
    vips.append(vip)
    assert vip.resolve_interface() == ("eth0", 24)
    assert not vip.held()

    vip.add()

    shown = sh("ip", "-n", lab.a, "-4", "addr", "show", "dev", "eth0")
    assert "inet 192.0.2.100/24" in shown
    assert "eth0:mh" in shown
    assert vip.held()
    assert lab.ping(VIP)
    assert any("added on eth0" in m for m in messages)


def test_add_does_not_wait_for_the_arp_announces(
    lab: Lab, messages: list[str], vips: list[VirtualIp]
) -> None:
    vip = make_vip(lab, lab.a, messages)
    vips.append(vip)
    started = time.monotonic()
    vip.add()
    # arping -c 3 takes 2 s; the takeover must not.
    assert time.monotonic() - started < 1.0


def test_client_learns_the_vip_from_gratuitous_arp_without_asking(
    lab: Lab, messages: list[str], vips: list[VirtualIp]
) -> None:
    vip = make_vip(lab, lab.a, messages)
    vips.append(vip)
    assert lab.client_neigh(VIP) is None

    vip.add()

    mac_a = lab.mac(lab.a)
    wait_until(lambda: lab.client_neigh(VIP) == mac_a, 3.0, "client to learn the VIP's MAC")


def test_client_follows_the_vip_when_it_moves_to_the_other_node(
    lab: Lab, messages: list[str], vips: list[VirtualIp]
) -> None:
    on_a, on_b = make_vip(lab, lab.a, messages), make_vip(lab, lab.b, messages)
    vips.extend([on_a, on_b])
    mac_a, mac_b = lab.mac(lab.a), lab.mac(lab.b)
    assert mac_a != mac_b
    on_a.add()
    assert lab.ping(VIP)
    assert lab.client_neigh(VIP) == mac_a

    on_a.remove()
    on_b.add()

    wait_until(lambda: lab.client_neigh(VIP) == mac_b, 4.0, "client's ARP entry to move to B")
    assert lab.ping(VIP)
    assert not on_a.held()
    assert on_b.held()


def test_add_and_remove_are_idempotent(
    lab: Lab, messages: list[str], vips: list[VirtualIp]
) -> None:
    vip = VirtualIp(VIP, "eth0", arpreroute=False, log=messages.append, netns=lab.a)
    vips.append(vip)
    vip.add()
    vip.add()
    shown = sh("ip", "-n", lab.a, "-4", "addr", "show", "dev", "eth0")
    assert shown.count("192.0.2.100") == 1

    vip.remove()
    vip.remove()
    assert not vip.held()
    assert "192.0.2.100" not in sh("ip", "-n", lab.a, "-4", "addr", "show")
    assert not lab.ping(VIP)


def test_interface_up_follows_admin_state_and_carrier(
    lab: Lab, messages: list[str], vips: list[VirtualIp]
) -> None:
    vip = make_vip(lab, lab.a, messages)
    vips.append(vip)
    assert vip.interface_up()

    sh("ip", "-n", lab.client, "link", "set", "pa", "down")  # cable pulled: no carrier
    wait_until(lambda: not vip.interface_up(), 2.0, "carrier loss to show")
    sh("ip", "-n", lab.client, "link", "set", "pa", "up")
    wait_until(vip.interface_up, 2.0, "carrier to return")

    sh("ip", "-n", lab.a, "link", "set", "eth0", "down")
    assert not vip.interface_up()


def test_vip_outside_every_local_subnet_is_refused_with_a_clear_message(
    lab: Lab, messages: list[str]
) -> None:
    vip = VirtualIp(IPv4Address("203.0.113.7"), None, False, messages.append, netns=lab.a)
    with pytest.raises(VipError, match=r"203\.0\.113\.7: no interface .* subnet"):
        vip.add()
    assert not vip.interface_up()


def test_unknown_interface_is_refused_with_its_name(lab: Lab, messages: list[str]) -> None:
    vip = VirtualIp(VIP, "eth9", False, messages.append, netns=lab.a)
    with pytest.raises(VipError, match="interface eth9 not found"):
        vip.add()


def test_label_of_a_long_interface_name_fits_the_kernel_limit(
    lab: Lab, messages: list[str], vips: list[VirtualIp]
) -> None:
    long_name = "vipteth0abcdefg"  # 15 characters, the longest Linux allows
    sh("ip", "-n", lab.a, "link", "add", long_name, "type", "veth", "peer", "name", "x0")
    sh("ip", "-n", lab.a, "addr", "add", "198.51.100.1/24", "dev", long_name)
    sh("ip", "-n", lab.a, "link", "set", long_name, "up")
    vip = VirtualIp(IPv4Address("198.51.100.9"), None, False, messages.append, netns=lab.a)
    vips.append(vip)

    vip.add()

    assert vip_label(long_name) == "vipteth0abcd:mh"
    shown = sh("ip", "-n", lab.a, "-4", "addr", "show", "dev", long_name)
    assert "198.51.100.9/24" in shown
    assert "vipteth0abcd:mh" in shown
