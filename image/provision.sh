#!/bin/sh
# Turns a Debian 12 root filesystem (image/build.sh's stage 1) into the mirrorha appliance.
# Runs as root *inside* the target: in a chroot (image/build.sh) or in the running VM of the
# Packer build (packer/mirrorha.pkr.hcl). Idempotent.
#
#   provision.sh chroot | vm    the appliance; its payload beside it: files/, seed/, wheels/
#   provision.sh packer-base    only a temporary SSH login for Packer (key beside it)
#   provision.sh packer-cleanup removes that login again (last step of the Packer build)
set -eu

MODE=${1:?usage: provision.sh chroot|vm|packer-base|packer-cleanup}
PAYLOAD=$(cd "$(dirname "$0")" && pwd)
VENV=/opt/mirrorha
export DEBIAN_FRONTEND=noninteractive

say() { echo "provision: $*"; }

install_mirrorha() {
  say "venv $VENV with mirrorha from the wheel"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  # Only the wheels built on the host: no index, no network from inside the image.
  "$VENV/bin/pip" install -q --no-index --find-links "$PAYLOAD/wheels" --no-cache-dir mirrorha
  "$VENV/bin/pip" uninstall -q -y pip setuptools wheel 2>/dev/null || true
  "$VENV/bin/python3" -c 'from importlib.metadata import version; print(version("mirrorha"))' \
    > "$VENV/VERSION"
  ln -sf "$VENV/bin/mirrorha" /usr/local/bin/mirrorha
}

install_files() {
  say "units, seed tool, network and journal defaults"
  cp -a "$PAYLOAD/files/." /
  install -m 0755 "$PAYLOAD/seed/mirrorha_seed.py" /usr/local/sbin/mirrorha-seed
  chmod 0755 /usr/share/mirrorha/sample/start_prim /usr/share/mirrorha/sample/stop_prim
  # The default firewall (default heartbeat port); the seed rewrites it with its own ports.
  /usr/local/sbin/mirrorha-seed firewall
}

install_units() {
  # mirrorha.service exactly as `mirrorha boot on` writes it (appliance/cli.py unit_text); in a
  # chroot systemd is not running, so the command only writes it and systemctl enables it.
  mirrorha boot on
  systemctl enable mirrorha.service mirrorha-seed.service systemd-networkd.service \
    nftables.service
  if "$VENV/bin/python3" -c 'import appliance.console' 2>/dev/null; then
    say "console found in the wheel: mirrorha-console.service enabled"
    cp "$PAYLOAD/files/etc/systemd/system/mirrorha-console.service.in" \
      /etc/systemd/system/mirrorha-console.service
    systemctl enable mirrorha-console.service
  else
    say "no appliance.console in this wheel: no console unit"
  fi
  rm -f /etc/systemd/system/mirrorha-console.service.in
  # Nothing on the appliance that the appliance does not need at boot or that would ask
  # questions on the console (systemd-firstboot prompts for a root password on first boot).
  systemctl mask systemd-firstboot.service apt-daily.timer apt-daily-upgrade.timer \
    e2scrub_all.timer e2scrub_reap.service dpkg-db-backup.timer fstrim.timer >/dev/null
  systemctl set-default multi-user.target
}

harden() {
  say "root locked, no serial autologin, fresh machine-id per VM"
  usermod -p '!' root
  # Empty: systemd makes a new machine-id at the first boot of each copy of the disk.
  : > /etc/machine-id
  rm -f /var/lib/dbus/machine-id
  echo mirrorha > /etc/hostname
  printf '127.0.0.1\tlocalhost\n127.0.1.1\tmirrorha\n' > /etc/hosts
  echo 'LANG=C.UTF-8' > /etc/default/locale
  # debootstrap copied the build host's resolver configuration; the appliance needs no DNS.
  : > /etc/resolv.conf
}

slim() {
  say "documentation and caches removed"
  # Keep the copyright files (licences); no man pages or docs on an appliance.
  cat > /etc/dpkg/dpkg.cfg.d/appliance-nodoc <<'EOF'
path-exclude=/usr/share/man/*
path-exclude=/usr/share/doc/*
path-include=/usr/share/doc/*/copyright
path-exclude=/usr/share/locale/*
EOF
  find /usr/share/doc -mindepth 1 ! -name copyright ! -type d -delete 2>/dev/null || true
  rm -rf /usr/share/man/* /usr/share/locale/* /var/cache/apt/* /var/lib/apt/lists/*
  rm -rf /var/log/*.log /var/log/apt/* 2>/dev/null || true
  # /tmp, except this payload: in the Packer build, packer-cleanup still runs from it.
  find /tmp -mindepth 1 -maxdepth 1 ! -path "$PAYLOAD" -exec rm -rf {} + 2>/dev/null || true
}

packer_base() {
  # A temporary login for the Packer build only: sshd with root key authentication. Removed
  # by packer-cleanup; never in the image image/build.sh makes.
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends openssh-server
  mkdir -p /root/.ssh
  install -m 0600 "$PAYLOAD/packer_ed25519.pub" /root/.ssh/authorized_keys
  : > /etc/machine-id
  echo mirrorha-packer > /etc/hostname
  systemctl enable systemd-networkd.service ssh.service
  systemctl mask systemd-firstboot.service
  mkdir -p /etc/systemd/network
  printf '[Match]\nType=ether\n\n[Network]\nDHCP=ipv4\n' \
    > /etc/systemd/network/99-packer.network
}

packer_cleanup() {
  apt-get purge -y -qq openssh-server openssh-sftp-server openssh-client >/dev/null
  apt-get autoremove -y -qq >/dev/null
  rm -rf /root/.ssh /etc/ssh/ssh_host_* /etc/systemd/network/99-packer.network
  rm -rf "$PAYLOAD"
}

case "$MODE" in
  chroot|vm)
    install_mirrorha
    install_files
    install_units
    harden
    slim
    ;;
  packer-base) packer_base ;;
  packer-cleanup) packer_cleanup; harden; slim; rm -rf /root/.ssh ;;
  *) echo "provision.sh: unknown mode $MODE" >&2; exit 2 ;;
esac
say "done ($MODE)"
