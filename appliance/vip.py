"""The virtual IP: added on the primary, removed elsewhere, announced by gratuitous ARP so that
clients and routers move to the new holder without waiting for their ARP caches to expire."""

from __future__ import annotations

import errno
import shutil
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from appliance.errors import MirrorhaError

LABEL_SUFFIX = ":mh"
IFNAMSIZ_MAX = 15  # the kernel's label field is IFNAMSIZ (16) bytes including the NUL
IFF_UP = 0x1
IFF_RUNNING = 0x40  # set by the kernel while the link has carrier
ARP_COUNT = 3


class VipError(MirrorhaError):
    """The virtual IP cannot be placed, added or removed."""


def vip_label(ifname: str) -> str:
    """`eth0:mh`, so `ip addr` shows which address is ours; the interface part is shortened so
    the label fits the kernel's 15 characters."""
    return ifname[: IFNAMSIZ_MAX - len(LABEL_SUFFIX)] + LABEL_SUFFIX


@dataclass(frozen=True)
class _Addr:
    index: int
    ifname: str
    iface: IPv4Interface  # address with its prefix


class VirtualIp:
    """Adds and removes one IPv4 virtual address in the current network namespace (or in the
    named one: tests and the lab drive a node's namespace from outside)."""

    def __init__(
        self,
        addr: IPv4Address,
        interface: str | None,
        arpreroute: bool,
        log: Callable[[str], None],
        netns: str | None = None,
    ) -> None:
        self.addr = addr
        self.interface = interface
        self.arpreroute = arpreroute
        self.log = log
        self.netns = netns
        self._lock = threading.Lock()
        self._announcers: list[subprocess.Popen[bytes]] = []

    # -- queries ---------------------------------------------------------------------------

    def resolve_interface(self) -> tuple[str, int]:
        """(ifname, prefixlen) the VIP goes on: the configured interface, or else the interface
        with an IPv4 address whose subnet contains the VIP (SafeKit's `one_side_alias`)."""
        with self._ipr() as ipr:
            return self._resolve(ipr)

    def _resolve(self, ipr: IPRoute) -> tuple[str, int]:
        addrs = [a for a in _addresses(ipr) if a.iface.ip != self.addr]
        if self.interface is not None:
            if not ipr.link_lookup(ifname=self.interface):
                raise VipError(f"virtual IP {self.addr}: interface {self.interface} not found")
            return self.interface, self._prefix_on(self.interface, addrs)
        candidates = [a for a in addrs if self.addr in a.iface.network]
        if not candidates:
            raise VipError(
                f"virtual IP {self.addr}: no interface has an IPv4 address in a subnet containing "
                "it; give the interface explicitly or add an address in that subnet"
            )
        best = max(candidates, key=lambda a: a.iface.network.prefixlen)
        return best.ifname, best.iface.network.prefixlen

    def _prefix_on(self, ifname: str, addrs: list[_Addr]) -> int:
        # Same prefix as the real address of that subnet, so the VIP is a plain alias; a VIP
        # outside every local subnet is a host route (/32), still answered by ARP.
        on_if = [a for a in addrs if a.ifname == ifname and self.addr in a.iface.network]
        return max((a.iface.network.prefixlen for a in on_if), default=32)

    def held(self) -> bool:
        """The address is configured locally (on any interface)."""
        with self._ipr() as ipr:
            return any(a.iface.ip == self.addr for a in _addresses(ipr))

    def interface_up(self) -> bool:
        """For check="on": the VIP's interface exists, is administratively up and has carrier."""
        try:
            # One netlink socket for both questions: opening one costs about 0.5 ms of CPU,
            # and this runs at every engine poll.
            with self._ipr() as ipr:
                ifname, _ = self._resolve(ipr)
                links = ipr.get_links(*ipr.link_lookup(ifname=ifname))
        except (VipError, NetlinkError):
            return False
        if not links:
            return False
        flags = links[0]["flags"]
        operstate = links[0].get("IFLA_OPERSTATE")
        return bool(flags & IFF_UP) and bool(flags & IFF_RUNNING) and operstate != "DOWN"

    # -- actions ---------------------------------------------------------------------------

    def add(self) -> None:
        """Add the VIP (no-op if already there) and, with arpreroute, announce it. The announce
        is repeated even when the address was already present: after a daemon restart the
        network may still point at the peer."""
        ifname, prefixlen = self.resolve_interface()
        label = vip_label(ifname)
        with self._ipr() as ipr:
            index = ipr.link_lookup(ifname=ifname)[0]
            if not any(a.iface.ip == self.addr for a in _addresses(ipr)):
                try:
                    ipr.addr(
                        "add",
                        index=index,
                        address=str(self.addr),
                        prefixlen=prefixlen,
                        label=label,
                    )
                except NetlinkError as e:
                    if e.code != errno.EEXIST:
                        raise VipError(
                            f"cannot add virtual IP {self.addr}/{prefixlen} on {ifname}: {e}"
                        ) from e
                self.log(f"virtual IP {self.addr}/{prefixlen} added on {ifname} ({label})")
        if self.arpreroute:
            self._announce(ifname)

    def remove(self) -> None:
        """Remove the VIP wherever it is configured (no-op if absent)."""
        # Stop announcing first: a still-running arping would pull clients back to this node
        # after the peer has taken the address.
        self._stop_announcers()
        with self._ipr() as ipr:
            for a in _addresses(ipr):
                if a.iface.ip == self.addr:
                    self._delete(ipr, a)

    def _delete(self, ipr: IPRoute, a: _Addr) -> None:
        prefixlen = a.iface.network.prefixlen
        try:
            ipr.addr("del", index=a.index, address=str(self.addr), prefixlen=prefixlen)
        except NetlinkError as e:
            if e.code != errno.EADDRNOTAVAIL:  # gone meanwhile: that is what we wanted
                raise VipError(f"cannot remove virtual IP {self.addr} from {a.ifname}: {e}") from e
        self.log(f"virtual IP {self.addr} removed from {a.ifname}")

    def close(self) -> None:
        """Stop any announce still running (daemon shutdown, test teardown)."""
        self._stop_announcers()

    # -- internals -------------------------------------------------------------------------

    @contextmanager
    def _ipr(self) -> Iterator[IPRoute]:
        # A fresh netlink socket per call: cheap, and no shared socket state between threads.
        ipr = IPRoute(netns=self.netns) if self.netns else IPRoute()
        try:
            yield ipr
        finally:
            ipr.close()

    def _announce(self, ifname: str) -> None:
        """Gratuitous ARP in the background: `arping -c 3` takes 2 s, which must not delay the
        takeover. A reaper thread collects the exit status and logs failures."""
        arping = shutil.which("arping") or "/usr/bin/arping"
        argv = [arping, "-U", "-c", str(ARP_COUNT), "-I", ifname, str(self.addr)]
        if self.netns:
            path = self.netns if "/" in self.netns else f"/run/netns/{self.netns}"
            argv = ["nsenter", f"--net={path}", *argv]
        try:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
            )
        except OSError as e:
            self.log(f"gratuitous ARP for {self.addr} on {ifname} not sent: {e}")
            return
        with self._lock:
            self._announcers.append(proc)
        self.log(f"gratuitous ARP for {self.addr} on {ifname}: {ARP_COUNT} announces")
        threading.Thread(
            target=self._reap, args=(proc, ifname), name=f"arping-{ifname}", daemon=True
        ).start()

    def _reap(self, proc: subprocess.Popen[bytes], ifname: str) -> None:
        _, err = proc.communicate()
        with self._lock:
            stopped_by_us = proc not in self._announcers
            if not stopped_by_us:
                self._announcers.remove(proc)
        if proc.returncode != 0 and not stopped_by_us:
            detail = err.decode(errors="replace").strip().splitlines()
            self.log(
                f"gratuitous ARP for {self.addr} on {ifname} failed (exit {proc.returncode})"
                + (f": {detail[-1]}" if detail else "")
            )

    def _stop_announcers(self) -> None:
        with self._lock:
            procs, self._announcers = self._announcers, []
        for proc in procs:
            if proc.poll() is None:
                proc.kill()


def _addresses(ipr: IPRoute) -> list[_Addr]:
    names = {link["index"]: link.get("IFLA_IFNAME") for link in ipr.get_links()}
    out = []
    for msg in ipr.get_addr(family=socket.AF_INET):
        address = msg.get("IFA_LOCAL") or msg.get("IFA_ADDRESS")
        iface = IPv4Interface(f"{address}/{msg['prefixlen']}")
        out.append(_Addr(index=msg["index"], ifname=names.get(msg["index"], "?"), iface=iface))
    return out
