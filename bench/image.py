"""The appliance image: its size, and the time from power-on to a reachable console under qemu TCG.

    python -m bench.image [--build] [--runs N] [--quick]

`--build` runs image/build.sh first and times it (with the debootstrap cache as it is). Each
run boots one seeded appliance VM (node1 of a two-node cluster, its peer absent) from a fresh
overlay — the first boot, which applies the seed — then powers it off and boots it again from
the same disk: both through BIOS + GRUB from the disk and with `qemu -kernel` (the kernel and
initrd exported beside the image). Measured from qemu's start: the console answering HTTPS at
all (`/health`, any status), and `/health` 200 (the daemon answers through the console). The
guest's own `systemd-analyze` (kernel + userspace until multi-user) is recorded too. Results in
bench/results/image.json.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from appliance.waiting import wait_until
from bench.common import BenchError, Stats, write_json
from image.seed import mkseed
from image.vm import MGMT_GUEST, MGMT_HOST, ApplianceVm, BuiltImage, VmSpec, mac, qemu_available

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "image.json"
BOOT_TIMEOUT = 900.0


def build(image: BuiltImage) -> dict[str, Any]:
    cached = any((image.directory / "cache").glob("base-*.tar.zst"))
    t0 = time.monotonic()
    subprocess.run([str(REPO / "image" / "build.sh")], check=True)
    return {"build_s": time.monotonic() - t0, "base_cached_before": cached}


def sizes(image: BuiltImage) -> dict[str, Any]:
    manifest = image.manifest
    return {
        "raw_bytes": image.raw.stat().st_size,
        "raw_allocated_bytes": image.raw.stat().st_blocks * 512,
        "qcow2_bytes": image.qcow2.stat().st_size,
        "kernel_bytes": image.kernel.stat().st_size,
        "initrd_bytes": image.initrd.stat().st_size,
        "kernel": manifest.get("kernel"),
        "mirrorha": manifest.get("mirrorha"),
        "build_seconds_manifest": manifest.get("build_seconds"),
    }


def single_node_seed(workdir: Path) -> Path:
    spec = {"vip": "198.51.100.100", "defaultprim": "node1", "pulse_ms": 700,
            "timeout_ms": 30000, "replicated_dirs": ["/srv/mirrorha/data"],
            "nodes": {n: {"address": f"198.51.100.{i}/24", "mac": mac(i, 1),
                          "interfaces": [{"mac": mac(i, 0), "address": f"{MGMT_GUEST}/24",
                                          "gateway": MGMT_HOST}]}
                      for i, n in ((1, "node1"), (2, "node2"))}}
    return mkseed.write_all(spec, workdir / "seeds")["node1"]


def boot_once(vm: ApplianceVm) -> dict[str, Any]:
    vm.start()
    t0 = vm.started_at
    assert t0 is not None
    wait_until(lambda: vm.console_status("/health") is not None, BOOT_TIMEOUT,
               f"{vm.spec.name}'s console (serial: {vm.serial_log})", interval=0.25,
               error=BenchError)
    reachable = time.monotonic() - t0
    wait_until(lambda: vm.console_status("/health") == 200, BOOT_TIMEOUT,
               f"{vm.spec.name}'s daemon through /health", interval=0.25, error=BenchError)
    healthy = time.monotonic() - t0
    analyze = vm.agent.shell("systemd-analyze | head -n 1", 120).strip()
    vm.kill()
    return {"console_reachable_s": reachable, "health_200_s": healthy,
            "systemd_analyze": analyze}


def measure_boots(image: BuiltImage, modes: Sequence[str], runs: int) -> list[dict[str, Any]]:
    results = []
    with tempfile.TemporaryDirectory(prefix="mh-bench-image-") as tmp:
        seed = single_node_seed(Path(tmp))
        for mode in modes:
            for run in range(runs):
                vm = ApplianceVm(VmSpec("node1", 1, Path(tmp) / f"{mode}-{run}", seed, image,
                                        boot=mode), 2)
                try:
                    for boot in ("first", "again"):
                        r = {"mode": mode, "run": run, "boot": boot, **boot_once(vm)}
                        print(f"  {mode:6} {boot:5} console {r['console_reachable_s']:6.1f} s"
                              f"  health {r['health_200_s']:6.1f} s  ({r['systemd_analyze']})",
                              flush=True)
                        results.append(r)
                finally:
                    vm.kill()
    return results


def table(results: dict[str, Any]) -> str:
    s = results["sizes"]
    mib = 1024 * 1024
    lines = [
        f"image {results['image']}: kernel {s['kernel']}, mirrorha {s['mirrorha']}",
        f"  raw {s['raw_bytes'] / mib:.0f} MiB ({s['raw_allocated_bytes'] / mib:.0f} MiB "
        f"allocated), qcow2 {s['qcow2_bytes'] / mib:.0f} MiB (compressed), kernel "
        f"{s['kernel_bytes'] / mib:.1f} MiB, initrd {s['initrd_bytes'] / mib:.1f} MiB",
    ]
    if "build" in results:
        b = results["build"]
        lines.append(f"  build {b['build_s']:.0f} s (debootstrap cache "
                     f"{'present' if b['base_cached_before'] else 'empty'} before)")
    lines += ["", f"{'boot (TCG, nice ' + str(results['nice']) + ')':28} {'runs':>4} "
              f"{'console min':>12} {'median':>8} {'max':>8} {'health median':>14}",
              "-" * 80]
    for mode in results["modes"]:
        for boot in ("first", "again"):
            rows = [r for r in results["boots"] if r["mode"] == mode and r["boot"] == boot]
            console = Stats.of([r["console_reachable_s"] for r in rows])
            health = Stats.of([r["health_200_s"] for r in rows])
            if console is None or health is None:
                continue
            label = f"{'BIOS+GRUB disk' if mode == 'disk' else 'qemu -kernel'}, {boot} boot"
            lines.append(f"{label:28} {console.n:>4} {console.min:>12.1f} {console.median:>8.1f}"
                         f" {console.max:>8.1f} {health.median:>14.1f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--build", action="store_true", help="run image/build.sh first, timed")
    parser.add_argument("--runs", type=int, default=1, help="runs per boot mode")
    parser.add_argument("--quick", action="store_true", help="only the -kernel boot")
    args = parser.parse_args(argv)
    missing = qemu_available()
    if missing:
        print(f"bench.image: {missing} missing (scripts/bootstrap.sh installs it)",
              file=sys.stderr)
        return 1
    image = BuiltImage()
    results: dict[str, Any] = {"image": str(image.raw)}
    try:
        if args.build:
            results["build"] = build(image)
        if not image.exists():
            raise BenchError(f"no image in {image.directory}: run `make image` or --build")
        results["sizes"] = sizes(image)
        results["modes"] = ["kernel"] if args.quick else ["disk", "kernel"]
        results["nice"] = VmSpec("x", 1, Path("."), None).nice
        results["boots"] = measure_boots(image, results["modes"], args.runs)
    except (BenchError, subprocess.CalledProcessError) as e:
        print(f"bench.image: {e}", file=sys.stderr)
        return 1
    write_json(RESULTS, results)
    print(table(results))
    print(f"\nresults in {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
