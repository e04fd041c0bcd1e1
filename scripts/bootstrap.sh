#!/usr/bin/env bash
# Installs everything mirrorha needs on a Debian 12 machine, idempotently:
# Debian packages (only when one is missing) and a virtualenv in .venv built from pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  iproute2 iputils-arping iputils-ping util-linux procps psmisc curl
  rsync                 # the comparison point of bench/replication's reintegration
  keepalived            # the comparison point of bench/failover
  fuse3 libfuse3-dev pkg-config   # FUSE over-mounts (pyfuse3 builds against libfuse3)
  postgresql-15         # the end-to-end RPO test runs a real PostgreSQL on a replicated dir
  debootstrap zstd      # `make image`: the appliance's Debian 12 root filesystem (cached as .tar.zst)
  fdisk grub-pc-bin     # `make image`: partition table of the raw disk and its BIOS boot loader
  dosfstools mtools     # the first-boot seed disk (vfat, written without mounting)
  qemu-system-x86 qemu-utils   # the appliance VM test and bench (TCG), qcow2 output
  packer                # packer/ template (`packer validate`; Debian 12 ships 1.6.6)
  prometheus prometheus-alertmanager   # promtool for the alert rules; the monitoring e2e test
  chromium              # the console's browser test (Playwright drives /usr/bin/chromium)
)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "bootstrap: installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
  # keepalived's package may try to start the service; it must never run outside the lab.
  systemctl disable --now keepalived >/dev/null 2>&1 || true
  # Same for PostgreSQL's default cluster: tests start their own servers.
  systemctl disable --now postgresql >/dev/null 2>&1 || true
  # And Prometheus/Alertmanager: the monitoring test runs its own, inside the lab.
  systemctl disable --now prometheus prometheus-alertmanager prometheus-node-exporter \
    >/dev/null 2>&1 || true
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv 2>/dev/null || {
    apt-get install -y -qq python3-venv && "$PY" -m venv .venv; }
fi
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ]; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[dev]'
  rm -f .venv/.installed-* && touch "$stamp"
fi
