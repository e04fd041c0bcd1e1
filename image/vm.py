"""Appliance VMs under qemu, for the image test and the image benchmark.

Each VM boots the built disk image through a qcow2 overlay of its own (the image itself is never
written), with its seed disk, and two NICs:

- `mgmt`: qemu user-mode networking, `restrict=on` (the guest reaches nothing outside qemu),
  on 192.0.2.0/24 (TEST-NET-1); the console (:9010) and metrics (:9011) are forwarded from
  127.0.0.1 ports on the host;
- `cluster`: a private link between the two VMs only, qemu `-netdev dgram` over a pair of unix
  datagram sockets (no IP traffic on the host at all). Powering one VM off drops its frames;
  powering it on again reconnects.

The qemu guest agent (virtio-serial, a unix socket on the host) runs commands in the guest: the
image has no SSH and a locked root.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.errors import MirrorhaError
from appliance.waiting import wait_until

REPO = Path(__file__).resolve().parent.parent
IMAGE_DIR = Path(os.environ.get("MIRRORHA_IMAGE_DIR", REPO / "build" / "image"))
IMAGE_NAME = "mirrorha-appliance"
MGMT_NET = "192.0.2.0/24"
MGMT_HOST = "192.0.2.2"
MGMT_GUEST = "192.0.2.15"


class VmError(MirrorhaError):
    """A VM could not be started or reached; the message says what and where its serial log is."""


@dataclass(frozen=True)
class BuiltImage:
    """The outputs of image/build.sh."""

    directory: Path = IMAGE_DIR

    @property
    def raw(self) -> Path:
        return self.directory / f"{IMAGE_NAME}.raw"

    @property
    def qcow2(self) -> Path:
        return self.directory / f"{IMAGE_NAME}.qcow2"

    @property
    def kernel(self) -> Path:
        return self.directory / f"{IMAGE_NAME}.vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.directory / f"{IMAGE_NAME}.initrd"

    @property
    def cmdline(self) -> str:
        return (self.directory / f"{IMAGE_NAME}.cmdline").read_text().strip()

    @property
    def manifest(self) -> dict[str, Any]:
        return dict(json.loads((self.directory / f"{IMAGE_NAME}.json").read_text()))

    def exists(self) -> bool:
        return self.raw.is_file() and self.kernel.is_file()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def mac(index: int, nic: int) -> str:
    """Locally administered MACs in qemu's 52:54:00 range: VM index and NIC in the last bytes."""
    return f"52:54:00:4d:{nic:02x}:{index:02x}"


@dataclass
class VmSpec:
    name: str
    index: int  # 1 or 2: MACs and socket names
    workdir: Path
    seed: Path | None
    image: BuiltImage = field(default_factory=BuiltImage)
    memory_mb: int = 768
    cpus: int = int(os.environ.get("MIRRORHA_VM_CPUS", "1"))
    boot: str = "disk"  # "disk": BIOS + GRUB from the disk; "kernel": qemu -kernel/-initrd
    nice: int = int(os.environ.get("MIRRORHA_VM_NICE", "19"))

    @property
    def cluster_mac(self) -> str:
        return mac(self.index, 1)

    @property
    def mgmt_mac(self) -> str:
        return mac(self.index, 0)


class GuestAgent:
    """A client of qemu-ga over its virtio-serial socket (one connection at a time)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._sock: socket.socket | None = None
        self._buf = b""
        self._sync_id = 0

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
        self._sock = None
        self._buf = b""

    def _connect(self, timeout: float) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(str(self.path))
            self._sock = sock
            self._sync(timeout)
        return self._sock

    def _read_message(self, sock: socket.socket, deadline: float) -> dict[str, Any]:
        while b"\n" not in self._buf:
            sock.settimeout(max(0.05, deadline - time.monotonic()))
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("guest agent closed the connection")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        # guest-sync-delimited prefixes its answer with 0xff so that stale bytes can be skipped
        return dict(json.loads(line.lstrip(b"\xff").decode() or "{}"))

    def _sync(self, timeout: float) -> None:
        """Drain whatever an earlier connection left unread: send a fresh id and read until the
        guest echoes it."""
        assert self._sock is not None
        self._sync_id += 1
        sync_id = int(time.time() * 1000) * 100 + self._sync_id % 100
        self._sock.sendall(b"\xff" + json.dumps(
            {"execute": "guest-sync-delimited", "arguments": {"id": sync_id}}).encode() + b"\n")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._read_message(self._sock, deadline).get("return") == sync_id:
                return
        raise TimeoutError("guest agent did not answer guest-sync")

    def call(self, command: str, arguments: dict[str, Any] | None = None,
             timeout: float = 10.0) -> Any:
        try:
            sock = self._connect(timeout)
            request: dict[str, Any] = {"execute": command}
            if arguments:
                request["arguments"] = arguments
            sock.sendall(json.dumps(request).encode() + b"\n")
            answer = self._read_message(sock, time.monotonic() + timeout)
        except (OSError, ValueError):
            self.close()
            raise
        if "error" in answer:
            raise VmError(f"guest agent {command}: {answer['error'].get('desc', answer)}")
        return answer.get("return")

    def run(self, argv: list[str], timeout: float = 60.0) -> tuple[int, str, str]:
        """Runs argv in the guest; (exit code, stdout, stderr)."""
        pid = self.call("guest-exec", {"path": argv[0], "arg": argv[1:],
                                       "capture-output": True})["pid"]

        def finished() -> dict[str, Any] | None:
            status = self.call("guest-exec-status", {"pid": pid})
            return status if status.get("exited") else None

        status = wait_until(finished, timeout, f"{argv} in the guest", interval=0.2,
                            error=VmError)
        out = base64.b64decode(status.get("out-data", "")).decode(errors="replace")
        err = base64.b64decode(status.get("err-data", "")).decode(errors="replace")
        return int(status.get("exitcode", -1)), out, err

    def shell(self, script: str, timeout: float = 60.0) -> str:
        code, out, err = self.run(["/bin/sh", "-c", script], timeout)
        if code != 0:
            raise VmError(f"guest `{script}` exited {code}: {err.strip() or out.strip()}")
        return out


class ApplianceVm:
    """One appliance VM: start (power on), kill (power off), reachability of its console."""

    def __init__(self, spec: VmSpec, peer_index: int) -> None:
        self.spec = spec
        self.peer_index = peer_index
        self.workdir = spec.workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.overlay = self.workdir / f"{spec.name}.qcow2"
        self.serial_log = self.workdir / f"{spec.name}.serial.log"
        self.console_port = free_port()
        self.metrics_port = free_port()
        self.agent = GuestAgent(self.workdir / f"{spec.name}.qga.sock")
        self.process: subprocess.Popen[bytes] | None = None
        self.started_at: float | None = None

    # -- the link between the two VMs: each binds its own socket, sends to the peer's --------

    def cluster_socket(self, index: int) -> Path:
        return self.workdir.parent / f"cluster-link-{index}.sock"

    def make_overlay(self) -> None:
        """A qcow2 on top of the raw image: the VM writes there, the image stays as built."""
        if self.overlay.exists():
            return
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b",
                        str(self.spec.image.raw), str(self.overlay)], check=True)

    def argv(self) -> list[str]:
        spec = self.spec
        fwd = (f"hostfwd=tcp:127.0.0.1:{self.console_port}-{MGMT_GUEST}:9010,"
               f"hostfwd=tcp:127.0.0.1:{self.metrics_port}-{MGMT_GUEST}:9011")
        argv = [
            "qemu-system-x86_64", "-name", spec.name, "-accel", "tcg", "-machine", "pc",
            "-m", str(spec.memory_mb), "-smp", str(spec.cpus), "-nodefaults", "-no-user-config",
            "-display", "none", "-serial", f"file:{self.serial_log}",
            "-drive", f"file={self.overlay},if=virtio,format=qcow2,discard=unmap",
            "-netdev", f"user,id=mgmt,net={MGMT_NET},host={MGMT_HOST},restrict=on,{fwd}",
            "-device", f"virtio-net-pci,netdev=mgmt,mac={spec.mgmt_mac},romfile=",
            "-netdev", (f"dgram,id=cluster,local.type=unix,"
                        f"local.path={self.cluster_socket(spec.index)},remote.type=unix,"
                        f"remote.path={self.cluster_socket(self.peer_index)}"),
            "-device", f"virtio-net-pci,netdev=cluster,mac={spec.cluster_mac},romfile=",
            "-chardev", f"socket,id=qga,path={self.agent.path},server=on,wait=off",
            "-device", "virtio-serial-pci",
            "-device", "virtserialport,chardev=qga,name=org.qemu.guest_agent.0",
        ]
        if spec.seed is not None:
            argv += ["-drive", f"file={spec.seed},if=virtio,format=raw,readonly=on"]
        if spec.boot == "kernel":
            image = spec.image
            argv += ["-kernel", str(image.kernel), "-initrd", str(image.initrd),
                     "-append", image.cmdline]
        return argv

    def start(self) -> None:
        """Power on. The overlay is kept across power cycles, like a disk."""
        if self.alive():
            raise VmError(f"{self.spec.name} is already running")
        self.make_overlay()
        for path in (self.cluster_socket(self.spec.index), self.agent.path):
            path.unlink(missing_ok=True)
        self.agent.close()
        with open(self.serial_log, "ab") as f:
            f.write(f"\n===== power on {time.strftime('%H:%M:%S')} =====\n".encode())
        out = open(self.workdir / f"{self.spec.name}.qemu.log", "ab")  # noqa: SIM115
        self.started_at = time.monotonic()
        self.process = subprocess.Popen(
            ["nice", "-n", str(self.spec.nice), *self.argv()], stdin=subprocess.DEVNULL,
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        out.close()
        # qemu creates its sockets at once; a qemu that refused its arguments exits at once.
        wait_until(lambda: self.agent.path.exists() or not self.alive(), 20,
                   f"{self.spec.name}'s qemu to start", error=VmError)
        if not self.alive():
            log = (self.workdir / f"{self.spec.name}.qemu.log").read_text(errors="replace")
            raise VmError(f"{self.spec.name}: qemu exited: {log.strip()[-2000:]}")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """Power off (power loss): SIGKILL to qemu, nothing in the guest runs afterwards."""
        self.agent.close()
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
        self.process = None

    # -- reaching the guest ----------------------------------------------------------------

    def http(self, path: str, port: int | None = None, timeout: float = 5.0
             ) -> tuple[int, str] | None:
        """(status, body) of GET https://127.0.0.1:<console>/path, None if nothing answers.
        The console's certificate is the node's cluster certificate (for its node name, not
        127.0.0.1): this probe does not verify it, it only reads health endpoints."""
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        scheme = "https" if port is None else "http"
        url = f"{scheme}://127.0.0.1:{port or self.console_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=timeout,
                                        context=ctx if scheme == "https" else None) as r:
                return r.status, r.read().decode(errors="replace")
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(errors="replace")
        except (OSError, ssl.SSLError):
            return None

    def console_status(self, path: str) -> int | None:
        answer = self.http(path)
        return answer[0] if answer else None

    def state(self) -> dict[str, Any] | None:
        """`mirrorha state --json` in the guest, None while the daemon does not answer."""
        try:
            code, out, _ = self.agent.run(["/usr/local/bin/mirrorha", "state", "--json"], 30)
        except (OSError, VmError, TimeoutError, ValueError):
            return None
        if code != 0:
            return None
        with contextlib.suppress(ValueError):
            return dict(json.loads(out))
        return None

    def serial_tail(self, lines: int = 40) -> str:
        try:
            text = self.serial_log.read_text(errors="replace")
        except FileNotFoundError:
            return "(no serial log)"
        return "\n".join(text.splitlines()[-lines:])


def qemu_available() -> str | None:
    """None when qemu-system-x86_64 and qemu-img are installed, else what is missing."""
    missing = [t for t in ("qemu-system-x86_64", "qemu-img") if shutil.which(t) is None]
    return ", ".join(missing) or None
