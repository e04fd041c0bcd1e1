#!/usr/bin/env bash
# Builds the mirrorha appliance: a bootable Debian 12 disk image (raw + qcow2).
#
#   image/build.sh                 everything, outputs in $BUILD_DIR (default build/image)
#   image/build.sh --packer-base   the base disk Packer provisions (packer/README.md)
#   image/build.sh --base          only stage 1 (fill the cache)
#
# Stages:
#   1. base   debootstrap of Debian 12 with the kernel, systemd and the runtime packages,
#             cached as build/image/cache/base-<hash>.tar.zst (keyed by mirror + package list):
#             a rebuild skips the download and the package installation.
#   2. wheel  the project's wheel and every dependency's (pyfuse3 is compiled here, against the
#             host's libfuse3-dev; host and image are both Debian 12 / Python 3.11).
#   3. provision  image/provision.sh inside the root filesystem (chroot here, the running VM in
#             the Packer build): venv /opt/mirrorha, units, first-boot seed, firewall, cleanup.
#   4. disk   ext4 made from the directory (mkfs.ext4 -d: no mount, no loop device), an MBR
#             partition table and GRUB for BIOS written with dd; qcow2 by qemu-img; the kernel,
#             initrd and command line copied beside them for `qemu -kernel` (fast TCG boots).
#
# Run as root on Debian 12; the only network used is the Debian mirror apt uses and PyPI.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(dirname "$HERE")
BUILD_DIR=${BUILD_DIR:-$REPO/build/image}
CACHE_DIR=$BUILD_DIR/cache
SUITE=bookworm
NAME=mirrorha-appliance
ROOT_SIZE_MB=${ROOT_SIZE_MB:-2048}
# linux-image-cloud-amd64: the Debian kernel for virtual machines (virtio, no drivers for
# physical hardware): 105 MB installed against 400 MB for linux-image-amd64. For bare metal
# build with KERNEL_PACKAGE=linux-image-amd64.
KERNEL_PACKAGE=${KERNEL_PACKAGE:-linux-image-cloud-amd64}
# Kernel command line: serial console (ttyS0) for headless hypervisors, tty0 for a screen.
CMDLINE_EXTRA="ro console=tty0 console=ttyS0,115200n8 quiet"

# Runtime packages of the appliance, one group per reason.
PACKAGES=(
  "$KERNEL_PACKAGE" initramfs-tools zstd   # kernel + initramfs (zstd-compressed)
  systemd systemd-sysv udev dbus           # init; networkd for addresses, journald for logs
  e2fsprogs                                # fsck of the root filesystem at boot
  python3 python3-venv                     # the venv /opt/mirrorha is created from it
  fuse3 libfuse3-3                         # the replicated dirs' FUSE over-mounts (pyfuse3)
  iproute2 iputils-arping iputils-ping     # VIP (pyroute2 + gratuitous ARP), witness ping
  procps                                   # pkill/pgrep in start_prim/stop_prim scripts
  nftables                                 # firewall: only the console, metrics and cluster ports
  mtools                                   # mirrorha-seed reads the vfat seed disk unmounted
  qemu-guest-agent                         # hypervisor channel (virtio-serial only, no network)
)

log() { printf '[image %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }

require_tools() {
  [ "$(id -u)" = 0 ] || die "run as root (debootstrap and chroot need it)"
  local tool missing=()
  for tool in debootstrap mkfs.ext4 sfdisk grub-mkimage qemu-img zstd; do
    command -v "$tool" >/dev/null || missing+=("$tool")
  done
  [ ${#missing[@]} -eq 0 ] || die "missing ${missing[*]}: run scripts/bootstrap.sh (make setup)"
  [ -d /usr/lib/grub/i386-pc ] || die "missing grub-pc-bin (/usr/lib/grub/i386-pc)"
}

# The Debian mirror the machine's apt uses (deb822 .sources or sources.list), so the build
# needs nothing apt cannot already reach. MIRROR=... overrides.
apt_mirror() {
  if [ -n "${MIRROR:-}" ]; then echo "$MIRROR"; return; fi
  local uri
  # deb822: the first stanza whose Suites has plain bookworm (not -security, not another
  # vendor's repository).
  uri=$(awk -v suite="$SUITE" '
      /^[[:space:]]*$/ { if (u != "" && s) { print u; exit } u = ""; s = 0; next }
      $1 == "URIs:" { u = $2 }
      $1 == "Suites:" { for (i = 2; i <= NF; i++) if ($i == suite) s = 1 }
      END { if (u != "" && s) print u }' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n1)
  [ -n "$uri" ] || uri=$(awk -v suite="$SUITE" '$1 == "deb" {
      for (i = 2; i < NF; i++) if ($i ~ /^[a-z]+:\/\//) { if ($(i + 1) == suite) print $i; break }
    }' /etc/apt/sources.list 2>/dev/null | head -n1)
  echo "${uri:-http://deb.debian.org/debian}"
}

# Runs "$@" in a private mount namespace with /proc, /sys and /dev mounted in the root
# filesystem: the mounts vanish with the namespace, even if the build is killed.
in_chroot() {
  local root=$1; shift
  unshare --mount --propagation private -- /bin/sh -ec '
    root=$1; shift
    mount -t proc proc "$root/proc"
    mount -t sysfs sysfs "$root/sys"
    mount --rbind /dev "$root/dev"
    exec chroot "$root" /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
      LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive "$@"' sh "$root" "$@"
}

# -- stage 1: base root filesystem (cached) ---------------------------------------------------

base_tarball() {
  local mirror key
  mirror=$(apt_mirror)
  key=$(printf '%s\n' "$SUITE" "$mirror" "${PACKAGES[@]}" "$(declare -f make_base)" \
        | sha256sum | cut -c1-16)
  echo "$CACHE_DIR/base-$key.tar.zst"
}

make_base() {
  local out=$1 mirror tmp
  mirror=$(apt_mirror)
  tmp=$BUILD_DIR/base.tmp
  rm -rf "$tmp"
  log "debootstrap $SUITE from $mirror (cached afterwards in $out)"
  local include
  include=$(IFS=,; echo "${PACKAGES[*]}")
  debootstrap --variant=minbase --include="$include" "$SUITE" "$tmp" "$mirror" \
    > "$BUILD_DIR/debootstrap.log" 2>&1 || {
      tail -n 30 "$BUILD_DIR/debootstrap.log" >&2
      [ -f "$tmp/debootstrap/debootstrap.log" ] && tail -n 30 "$tmp/debootstrap/debootstrap.log" >&2
      die "debootstrap failed (log: $BUILD_DIR/debootstrap.log)"; }
  # The appliance's own apt sources: the same mirror, plus security updates.
  cat > "$tmp/etc/apt/sources.list" <<EOF
deb $mirror $SUITE main
deb $mirror $SUITE-updates main
deb http://deb.debian.org/debian-security $SUITE-security main
EOF
  in_chroot "$tmp" apt-get clean
  rm -rf "$tmp"/var/lib/apt/lists/* "$tmp"/var/cache/apt/*.bin
  mkdir -p "$CACHE_DIR"
  tar --numeric-owner --xattrs --xattrs-include='*' -C "$tmp" -I 'zstd -T0 -3' \
    -cf "$out.tmp" .
  mv "$out.tmp" "$out"
  # Older bases (another package list or mirror) are not used again.
  find "$CACHE_DIR" -name 'base-*.tar.zst' ! -name "$(basename "$out")" -delete
  rm -rf "$tmp"
}

unpack_base() {
  local root=$1 tarball
  tarball=$(base_tarball)
  [ -f "$tarball" ] || make_base "$tarball"
  log "root filesystem from $(basename "$tarball")"
  rm -rf "$root"
  mkdir -p "$root"
  tar --numeric-owner --xattrs --xattrs-include='*' -C "$root" -I zstd -xf "$tarball"
}

# -- stage 2: wheels -----------------------------------------------------------------------------

build_wheels() {
  local out=$1 pip=$REPO/.venv/bin/pip
  [ -x "$pip" ] || pip="python3 -m pip"
  rm -rf "$out"
  mkdir -p "$out"
  log "wheels of mirrorha and its dependencies"
  # Only the runtime dependencies (no extras): the appliance never runs the tests.
  (cd "$REPO" && $pip wheel -q --wheel-dir "$out" .) > "$BUILD_DIR/wheels.log" 2>&1 || {
    tail -n 30 "$BUILD_DIR/wheels.log" >&2; die "pip wheel failed"; }
}

# -- stage 3: provisioning -----------------------------------------------------------------------

stage_payload() {
  # What provision.sh needs inside the target: itself, the files/ tree and the wheels.
  local dest=$1 wheels=$2
  rm -rf "$dest"
  mkdir -p "$dest"
  cp -a "$HERE/provision.sh" "$HERE/files" "$HERE/seed" "$dest/"
  cp -a "$wheels" "$dest/wheels"
}

provision() {
  local root=$1 wheels=$2 mode=$3
  stage_payload "$root/tmp/mirrorha-build" "$wheels"
  log "provisioning ($mode) in the root filesystem"
  in_chroot "$root" /bin/sh /tmp/mirrorha-build/provision.sh "$mode" \
    > "$BUILD_DIR/provision.log" 2>&1 || {
      tail -n 40 "$BUILD_DIR/provision.log" >&2; die "provision.sh failed"; }
  rm -rf "$root/tmp/mirrorha-build"
}

# The Packer base: the same root filesystem, provisioned only far enough for Packer to log in
# (a temporary SSH key; packer/README.md). Packer then runs provision.sh inside the VM.
packer_prepare() {
  local root=$1 key=$BUILD_DIR/packer_ed25519
  [ -f "$key" ] || ssh-keygen -q -t ed25519 -N '' -C mirrorha-packer -f "$key"
  mkdir -p "$root/tmp/mirrorha-build"
  cp -a "$HERE/provision.sh" "$key.pub" "$root/tmp/mirrorha-build/"
  in_chroot "$root" /bin/sh /tmp/mirrorha-build/provision.sh packer-base \
    > "$BUILD_DIR/provision.log" 2>&1 || {
      tail -n 40 "$BUILD_DIR/provision.log" >&2; die "provision.sh packer-base failed"; }
  rm -rf "$root/tmp/mirrorha-build"
}

# -- stage 4: disk -------------------------------------------------------------------------------

write_boot_config() {
  local root=$1 uuid=$2
  cat > "$root/etc/fstab" <<EOF
# The root filesystem, by UUID (the image's; each copy of the disk keeps it).
UUID=$uuid / ext4 errors=remount-ro 0 1
EOF
  # GRUB's modules beside its configuration, so the embedded core can load more if needed.
  mkdir -p "$root/boot/grub/i386-pc"
  cp /usr/lib/grub/i386-pc/*.mod /usr/lib/grub/i386-pc/*.lst "$root/boot/grub/i386-pc/"
  # /vmlinuz and /initrd.img: Debian's kernel packages keep these links on the newest kernel,
  # so a kernel update inside the appliance needs no GRUB reconfiguration.
  cat > "$root/boot/grub/grub.cfg" <<EOF
serial --unit=0 --speed=115200
terminal_input serial console
terminal_output serial console
set timeout=1
set default=0
menuentry "mirrorha appliance (Debian 12)" {
  search --no-floppy --fs-uuid --set=root $uuid
  linux /vmlinuz root=UUID=$uuid $CMDLINE_EXTRA
  initrd /initrd.img
}
EOF
}

grub_install_dd() {
  # BIOS boot without grub-install (which wants a block device): boot.img in the MBR's first
  # 440 bytes (it loads sector 1), core.img in the gap before the partition (grub-mkimage
  # records its own length in the first sector's block list). The core carries what is needed
  # to reach grub.cfg on the ext4 partition.
  local disk=$1 core=$BUILD_DIR/core.img
  grub-mkimage -O i386-pc -o "$core" -p '(hd0,msdos1)/boot/grub' \
    biosdisk part_msdos ext2 normal linux search search_fs_uuid configfile serial terminal echo
  [ "$(stat -c %s "$core")" -lt $((2047 * 512)) ] || die "GRUB core too large for the MBR gap"
  dd if=/usr/lib/grub/i386-pc/boot.img of="$disk" bs=440 count=1 conv=notrunc status=none
  dd if="$core" of="$disk" bs=512 seek=1 conv=notrunc status=none
}

make_disk() {
  local root=$1 out=$2 uuid fs=$BUILD_DIR/root.ext4
  uuid=$(cat /proc/sys/kernel/random/uuid)
  write_boot_config "$root" "$uuid"
  log "ext4 root filesystem (${ROOT_SIZE_MB} MiB) from the directory"
  rm -f "$fs"
  mkfs.ext4 -q -F -L mhroot -U "$uuid" -E root_owner=0:0 -d "$root" "$fs" "${ROOT_SIZE_MB}M"
  log "disk image: MBR, one bootable partition at 1 MiB, GRUB"
  rm -f "$out.tmp"
  truncate -s $((ROOT_SIZE_MB + 1))M "$out.tmp"
  printf 'label: dos\nstart=2048, type=83, bootable\n' | sfdisk -q "$out.tmp"
  dd if="$fs" of="$out.tmp" bs=1M seek=1 conv=notrunc,sparse status=none
  rm -f "$fs"
  grub_install_dd "$out.tmp"
  mv "$out.tmp" "$out"
}

export_kernel() {
  # The kernel, initrd and command line, for `qemu -kernel ... -initrd ... -append ...`:
  # skips BIOS and GRUB (the same files GRUB loads from the disk).
  local root=$1 prefix=$2 uuid
  uuid=$(awk '$2 == "/" {sub("UUID=", "", $1); print $1}' "$root/etc/fstab")
  cp "$(readlink -f "$root/vmlinuz")" "$prefix.vmlinuz"
  cp "$(readlink -f "$root/initrd.img")" "$prefix.initrd"
  echo "root=UUID=$uuid $CMDLINE_EXTRA" > "$prefix.cmdline"
}

write_manifest() {
  local root=$1 prefix=$2 started=$3
  local version kernel
  version=$(cat "$root/opt/mirrorha/VERSION" 2>/dev/null || echo unknown)
  kernel=$(basename "$(readlink -f "$root/vmlinuz")" | sed 's/^vmlinuz-//')
  cat > "$prefix.json" <<EOF
{
  "name": "$NAME",
  "debian": "$SUITE",
  "kernel": "$kernel",
  "mirrorha": "$version",
  "root_size_mb": $ROOT_SIZE_MB,
  "raw_bytes": $(stat -c %s "$prefix.raw"),
  "raw_allocated_bytes": $(( $(stat -c %b "$prefix.raw") * 512 )),
  "qcow2_bytes": $(stat -c %s "$prefix.qcow2"),
  "build_seconds": $(( $(date +%s) - started )),
  "built": "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
}
EOF
}

main() {
  local mode=full started
  started=$(date +%s)
  case "${1:-}" in
    --packer-base) mode=packer-base ;;
    --base) mode=base ;;
    "") ;;
    *) die "usage: $0 [--packer-base | --base]" ;;
  esac
  require_tools
  mkdir -p "$BUILD_DIR"
  local root=$BUILD_DIR/rootfs prefix=$BUILD_DIR/$NAME
  if [ "$mode" = base ]; then
    [ -f "$(base_tarball)" ] || make_base "$(base_tarball)"
    log "base root filesystem cached: $(base_tarball)"
    return
  fi
  unpack_base "$root"
  if [ "$mode" = packer-base ]; then
    build_wheels "$BUILD_DIR/wheels"
    packer_prepare "$root"
    make_disk "$root" "$BUILD_DIR/packer-base.raw"
    rm -rf "$root"
    log "done: $BUILD_DIR/packer-base.raw, wheels/ and the key packer_ed25519: packer build packer/"
    return
  fi
  build_wheels "$BUILD_DIR/wheels"
  provision "$root" "$BUILD_DIR/wheels" chroot
  make_disk "$root" "$prefix.raw"
  export_kernel "$root" "$prefix"
  log "qcow2 (compressed)"
  qemu-img convert -c -O qcow2 "$prefix.raw" "$prefix.qcow2.tmp"
  mv "$prefix.qcow2.tmp" "$prefix.qcow2"
  write_manifest "$root" "$prefix" "$started"
  rm -rf "$root"
  log "done in $(( $(date +%s) - started )) s: $prefix.raw, $prefix.qcow2 (+ .vmlinuz .initrd" \
      ".cmdline .json)"
}

main "$@"
