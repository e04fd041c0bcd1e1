# The mirrorha appliance, built by Packer's qemu builder from the same scripts as `make image`.
#
#   image/build.sh --packer-base            # base disk + wheels + temporary SSH key (build/image)
#   packer build packer/                    # with KVM
#   packer build -var accelerator=tcg packer/   # without KVM (slow: emulated CPU)
#
# The base disk is image/build.sh's stage 1 (Debian 12, kernel, GRUB) with a temporary sshd
# and root key; Packer boots it, uploads image/ and the wheels, runs image/provision.sh inside
# the VM (what image/build.sh runs in a chroot), then removes the SSH login and powers off.
# Written for Packer 1.6.6 (Debian 12's package): HCL2, no required_plugins block.

variable "accelerator" {
  type        = string
  default     = "kvm"
  description = "kvm where /dev/kvm works, tcg (software emulation) elsewhere"
}

variable "build_dir" {
  type        = string
  default     = "build/image"
  description = "where image/build.sh --packer-base left packer-base.raw, the wheels and the key"
}

variable "output_dir" {
  type    = string
  default = "build/packer"
}

variable "memory" {
  type    = number
  default = 1024
}

source "qemu" "mirrorha" {
  iso_url          = "${var.build_dir}/packer-base.raw"
  iso_checksum     = "none"
  disk_image       = true
  format           = "qcow2"
  disk_compression = true
  disk_interface   = "virtio"
  disk_size        = "2049M"
  accelerator      = var.accelerator
  memory           = var.memory
  cpus             = 2
  net_device       = "virtio-net"
  headless         = true
  boot_wait        = "1s"
  qemuargs         = [["-serial", "file:${var.output_dir}-serial.log"]]

  communicator         = "ssh"
  ssh_username         = "root"
  ssh_private_key_file = "${var.build_dir}/packer_ed25519"
  # TCG boots take minutes on a busy machine.
  ssh_timeout = "30m"

  # The last step runs as the shutdown command: it removes sshd and the key, then powers off
  # (a later SSH session would find no server).
  shutdown_command = "sh /tmp/mirrorha-build/provision.sh packer-cleanup && systemctl poweroff"
  shutdown_timeout = "10m"

  output_directory = var.output_dir
  vm_name          = "mirrorha-appliance.qcow2"
}

build {
  sources = ["source.qemu.mirrorha"]

  provisioner "shell" {
    inline = ["rm -rf /tmp/mirrorha-build", "mkdir -p /tmp/mirrorha-build"]
  }

  # image/'s provisioning script and the files it installs, and the wheels built on the host.
  provisioner "file" {
    sources     = ["image/provision.sh", "image/files", "image/seed", "${var.build_dir}/wheels"]
    destination = "/tmp/mirrorha-build/"
  }

  provisioner "shell" {
    inline = ["sh /tmp/mirrorha-build/provision.sh vm"]
  }

  # The raw disk beside the qcow2, as `make image` gives both.
  post-processor "shell-local" {
    inline = ["qemu-img convert -O raw ${var.output_dir}/mirrorha-appliance.qcow2 ${var.output_dir}/mirrorha-appliance.raw"]
  }
}
