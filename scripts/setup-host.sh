#!/usr/bin/env bash
# Make this Debian machine ready for qlayer: the apt packages it runs, virtlogd/libvirtd
# started (there is no systemd on the test machines), and with --test-host the libvirt
# settings that make `virsh create` fast on a test machine (see README "Host set-up").
# Idempotent: it installs only what is missing and starts only what is not running.
set -euo pipefail

test_host=0
for arg in "$@"; do
  case "$arg" in
    --test-host) test_host=1 ;;
    *) echo "setup-host: unknown argument $arg" >&2; exit 2 ;;
  esac
done

packages=(qemu-system-x86 qemu-utils libvirt-daemon-system libvirt-clients libvirt-dev
  e2fsprogs fdisk gdisk busybox-static libxml2-utils zstd
  lz4 # lz4: vm-fixtures/build.sh extracts the PVH vmlinux from the LZ4 bzImage
  musl-tools # musl-tools: a small static native/build/qlayer-guest-alloc (scripts/build-native.mjs)
  xfsprogs # xfsprogs: the reflink tests put a store on an XFS made in a file
  mmdebstrap # mmdebstrap: vm-fixtures/build-debian.sh builds the Debian test guest
  lvm2 # lvm2: test/fs/lvm-oracle.test.ts and build-debian.sh --root lvm write VGs with lvm2's own tools
  ovmf # ovmf: UEFI firmware for desktops with boot.firmware uefi (libvirt finds it by its descriptors)
  dosfstools mtools # dosfstools, mtools: the EFI system partition of build-debian.sh --firmware uefi
  virtinst) # virtinst: test/e2e/libvirt-native.test.ts makes an ordinary VM with virt-install --import to adopt

missing=()
for pkg in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  echo "setup-host: installing ${missing[*]}" >&2
  sudo_cmd=()
  [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ((test_host)); then
  # Test hosts only: QEMU as root skips libvirt's 45 s capability re-probe per define here.
  conf=/etc/libvirt/qemu.conf
  if ! grep -qE '^user = "root"' "$conf"; then
    printf '\n# qlayer test host\nuser = "root"\ngroup = "root"\n' >>"$conf"
    # A running libvirtd only reads qemu.conf at start.
    pkill -x libvirtd 2>/dev/null && sleep 1 || true
  fi
fi

mkdir -p /var/lib/libvirt/qemu /var/log/libvirt/qemu /run/libvirt
pgrep -x virtlogd >/dev/null || virtlogd -d
if ! pgrep -x libvirtd >/dev/null; then
  libvirtd -d
fi
for _ in $(seq 1 50); do
  [ -S /run/libvirt/libvirt-sock ] && virsh -c qemu:///system version >/dev/null 2>&1 && break
  sleep 0.2
done
virsh -c qemu:///system version >/dev/null 2>&1 || { echo "setup-host: libvirtd did not come up" >&2; exit 1; }
echo "setup-host: ready (libvirtd running, qemu $(qemu-img --version | head -1 | awk '{print $3}'))" >&2
