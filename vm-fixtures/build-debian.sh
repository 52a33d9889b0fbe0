#!/usr/bin/env bash
# Build the Debian 12 test guest: a real distribution system, from Debian packages with
# mmdebstrap, that boots through its own bootloader from a GPT disk, runs systemd, dbus and udev,
# and Debian's qemu-guest-agent (started by udev when the virtio channel appears). Two firmwares:
# --firmware bios (the default): grub-pc, its core image in a BIOS boot partition;
# --firmware uefi: grub-efi as EFI/BOOT/BOOTX64.EFI (the removable-media path, so the firmware
#   needs no NVRAM boot entry) on an EFI system partition, for OVMF on q35.
# See vm-fixtures/README.md ("The Debian guest").
#
# --root lvm (BIOS only): the root filesystem on an LVM2 logical volume instead of partition 2:
#   partition 2 is a PV of VG qlayerdeb, whose LV root (in two pieces, with the LV spare between
#   them) holds the ext4; lvm2 is installed so that the initramfs activates the VG, and grub reads
#   the LV itself.
#
# Output: $cache/debian-<key>/ {base.qcow2, manifest.json, packages.txt} and the symlink
# $cache/debian-current -> debian-<key> (UEFI: debian-uefi-<key>/ and debian-uefi-current; LVM:
# debian-lvm-<key>/ and debian-lvm-current). The
# key hashes this script and the versions (with archive sha256) of every package the build can
# install, plus the host tools that shape the disk, so a run with the same inputs only checks the
# key and returns (a few seconds).
#
# The apt mirror is the host's: its apt sources are handed to mmdebstrap at run time and are
# removed from the guest afterwards; no mirror is written into any file of this repository.
#
# Usage: vm-fixtures/build-debian.sh [--firmware bios|uefi] [--root partition|lvm] [--force] [--print-dir]
#   QLAYER_FIXTURES_CACHE  cache folder (default: <repo>/.cache/vm-fixtures)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
cache="${QLAYER_FIXTURES_CACHE:-$repo/.cache/vm-fixtures}"
force=0
print_dir=0
firmware=bios
root_kind=partition
while (($#)); do
  case "$1" in
    --force) force=1 ;;
    --print-dir) print_dir=1 ;;
    --firmware)
      (($# >= 2)) || { echo "build-debian.sh: --firmware needs a value (bios or uefi)" >&2; exit 2; }
      firmware="$2"
      shift
      ;;
    --firmware=*) firmware="${1#--firmware=}" ;;
    --root)
      (($# >= 2)) || { echo "build-debian.sh: --root needs a value (partition or lvm)" >&2; exit 2; }
      root_kind="$2"
      shift
      ;;
    --root=*) root_kind="${1#--root=}" ;;
    *) echo "build-debian.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
case "$firmware" in
  bios | uefi) ;;
  *) echo "build-debian.sh: --firmware must be bios or uefi, not $firmware" >&2; exit 2 ;;
esac
case "$root_kind" in
  partition) ;;
  lvm) [ "$firmware" = bios ] || { echo "build-debian.sh: --root lvm is built for --firmware bios only" >&2; exit 2; } ;;
  *) echo "build-debian.sh: --root must be partition or lvm, not $root_kind" >&2; exit 2 ;;
esac

log() { echo "vm-fixtures (debian): $*" >&2; }
die() { echo "vm-fixtures (debian): error: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "building the Debian guest needs root (mmdebstrap --mode=root)"
for tool in mmdebstrap apt-cache mke2fs sgdisk qemu-img sha256sum flock perl; do
  command -v "$tool" >/dev/null || die "$tool is missing (run scripts/setup-host.sh)"
done
if [ "$firmware" = uefi ]; then
  # mkfs.vfat (dosfstools) makes the EFI system partition, mtools fills it without a mount.
  for tool in mkfs.vfat mmd mcopy mdir; do
    command -v "$tool" >/dev/null || die "$tool is missing (run scripts/setup-host.sh: dosfstools, mtools)"
  done
fi
if [ "$root_kind" = lvm ]; then
  for tool in lvm losetup; do command -v "$tool" >/dev/null || die "$tool is missing (run scripts/setup-host.sh)"; done
fi

suite=bookworm
# The disk: 3 GiB virtual, GPT. BIOS: partition 1 = BIOS boot (grub's core.img), partition 2 = ext4
# root. UEFI: partition 1 = EFI system partition (FAT32, grub's BOOTX64.EFI), partition 2 = ext4 root.
disk_size=$((3 * 1024 * 1024 * 1024))
bios_start=2048                    # sectors
bios_sectors=2048                  # 1 MiB
esp_start=2048                     # sectors (UEFI)
esp_sectors=$((100 * 2048))        # 100 MiB: FAT32 (what UEFI requires of an ESP) with 512-byte clusters needs over 32 MiB
esp_volume_id=51a7e0f1             # the FAT volume serial (fstab: UUID=51A7-E0F1); after --invariant, which sets its own
if [ "$firmware" = uefi ]; then
  root_start=$((esp_start + esp_sectors))
else
  root_start=$((bios_start + bios_sectors))
fi
root_size=$((disk_size - root_start * 512 - 1024 * 1024)) # the last MiB holds the backup GPT
fs_uuid=6a1d2b3c-4e5f-4a6b-8c7d-9e0f1a2b3c4d
disk_guid=0b1c2d3e-4f50-4617-8293-a4b5c6d7e8f9
root_part_guid=1c2d3e4f-5061-4728-93a4-b5c6d7e8f901
esp_part_guid=2d3e4f50-6172-4839-a4b5-c6d7e8f90112
user_name=user
user_uid=1000
cmdline="console=ttyS0"
if [ "$firmware" = uefi ]; then
  # grub-efi-amd64-bin: grub's x86_64-efi modules and grub-mkimage, without the postinst of
  # grub-efi-amd64 that runs grub-install; grub2-common: update-grub for the guest's own kernels.
  packages=(systemd-sysv dbus udev qemu-guest-agent linux-image-cloud-amd64 initramfs-tools grub-efi-amd64-bin grub2-common e2fsprogs)
  variant=debian-uefi
else
  packages=(systemd-sysv dbus udev qemu-guest-agent linux-image-cloud-amd64 initramfs-tools grub-pc e2fsprogs)
  variant=debian
fi
# How the kernel and fstab name the root, what grub's first stage needs to reach it and where it
# looks first.
root_arg="root=UUID=$fs_uuid"
fstab_root="UUID=$fs_uuid"
grub_bios_modules=(biosdisk part_gpt ext2 search_fs_uuid)
grub_hint="hd0,gpt2"
root_part_type=8300
if [ "$root_kind" = lvm ]; then
  vg=qlayerdeb
  packages+=(lvm2)
  variant=debian-lvm
  # initramfs-tools' lvm2 script activates the LV that root= names as /dev/mapper/VG-LV.
  root_arg="root=/dev/mapper/$vg-root"
  fstab_root="/dev/mapper/$vg-root"
  grub_bios_modules=(biosdisk part_gpt lvm ext2 search_fs_uuid)
  grub_hint="lvm/$vg-root"
  root_part_type=8e00
fi

mkdir -p "$cache/debian-debs"
exec 9>"$cache/debian.lock"
flock 9 # one build at a time per cache folder

# --- The key ---------------------------------------------------------------------------------------
# Every package the build can install: the Essential set and the Depends/Pre-Depends closure of the
# packages above, each with the candidate version and its sha256 (apt-cache show of the candidate).
# A superset of what mmdebstrap installs is fine: the key only has to change when an input does.
closure() {
  local essential
  essential="$(apt-cache dumpavail 2>/dev/null | awk '/^Package:/{p=$2} /^Essential: yes/{print p}' | sort -u)"
  # shellcheck disable=SC2086
  apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks \
    --no-replaces --no-enhances "${packages[@]}" $essential 2>/dev/null | grep -v '^ ' | grep -v '^<' | sort -u
}
pkg_lines="$(closure | xargs apt-cache show --no-all-versions 2>/dev/null | awk '/^Package:/{p=$2} /^Version:/{v=$2} /^SHA256:/{print p, v, $2}' | sort -u)"
[ "$(grep -c '^linux-image-' <<<"$pkg_lines")" -ge 1 ] || die "cannot resolve linux-image-cloud-amd64 (apt-get update?)"
kernel_pkg="$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-/{print $2; exit}')"
[ -n "$kernel_pkg" ] || die "cannot resolve linux-image-cloud-amd64 (apt-get update?)"
kernel_release="${kernel_pkg#linux-image-}"

key="$({
  cat "$0"
  echo "$pkg_lines"
  mmdebstrap --version
  mke2fs -V 2>&1 | head -1
  sgdisk --version | head -1
  qemu-img --version | head -1
  if [ "$firmware" = uefi ]; then
    echo "firmware uefi"
    dpkg-query -W -f='${Package} ${Version}\n' dosfstools mtools 2>/dev/null
  fi
  if [ "$root_kind" = lvm ]; then
    echo "root lvm"
    LVM_SUPPRESS_FD_WARNINGS=1 lvm version 2>/dev/null | head -1
  fi
} | sha256sum | cut -c1-16)"
name="$variant-$key"
out="$cache/$name"

if [ "$force" -eq 0 ] && [ -f "$out/manifest.json" ]; then
  ln -sfn "$name" "$cache/$variant-current"
  log "up to date ($out)"
  [ "$print_dir" -eq 0 ] || echo "$out"
  exit 0
fi

started=$(date +%s)
work="$(mktemp -d "$cache/debian-build.XXXXXX")"
trap 'rm -rf "$work"' EXIT
rf="$work/rootfs"

# --- The root filesystem tree (mmdebstrap) -----------------------------------------------------------
# The host's apt sources name the mirror (deb822 .sources or one-line .list files).
sources=()
for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list; do
  [ -f "$f" ] && [ -s "$f" ] && sources+=("$f")
done
((${#sources[@]})) || die "the host has no apt sources (/etc/apt/sources.list{,.d})"

# Hooks (run by mmdebstrap with the root folder as $1):
# - before the packages: initramfs-tools with the few modules a virtio disk needs (MODULES=list and
#   a hook: the cloud kernel has ext4 built in), and no docs, man pages or translations;
# - after: fstab by UUID, hostname, the ordinary user, the guest's own apt sources removed.
essential_hook="$(cat <<'HOOK'
set -e
mkdir -p "$1/etc/initramfs-tools/conf.d" "$1/etc/initramfs-tools/hooks"
echo MODULES=list >"$1/etc/initramfs-tools/conf.d/qlayer.conf"
cat >"$1/etc/initramfs-tools/hooks/qlayer-virtio" <<'EOF'
#!/bin/sh
# qlayer: the modules a virtio disk and the guest agent's channel need (MODULES=list)
case "$1" in prereqs) exit 0 ;; esac
. /usr/share/initramfs-tools/hook-functions
for m in virtio_pci virtio_blk virtio_console; do force_load "$m"; done
EOF
chmod 755 "$1/etc/initramfs-tools/hooks/qlayer-virtio"
HOOK
)"
if [ "$root_kind" = lvm ]; then
  # The root LV needs device-mapper before the root is mounted (lvm2's own hook adds the tools).
  essential_hook+=$'\necho "force_load dm_mod" >>"$1/etc/initramfs-tools/hooks/qlayer-virtio"'
fi
customize_hook="$(cat <<HOOK
set -e
echo '$fstab_root / ext4 errors=remount-ro 0 1' >"\$1/etc/fstab"
echo qlayer-debian >"\$1/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 qlayer-debian\n' >"\$1/etc/hosts"
chroot "\$1" useradd --create-home --uid $user_uid --user-group --shell /bin/bash $user_name
rm -f "\$1"/etc/apt/sources.list "\$1"/etc/apt/sources.list.d/*
rm -f "\$1"/var/cache/apt/archives/*.deb
HOOK
)"

log "mmdebstrap $suite (${packages[*]})"
# Downloaded .debs are kept in $cache/debian-debs between builds (sync-in / sync-out).
mmdebstrap --mode=root --format=directory --variant=essential \
  --aptopt='Acquire::Check-Valid-Until "false"' \
  --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
  --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
  --include="$(IFS=,; echo "${packages[*]}")" \
  --essential-hook="$essential_hook" \
  --skip=download/empty --skip=essential/unlink \
  --setup-hook='mkdir -p "$1"/var/cache/apt/archives/' \
  --setup-hook="sync-in $cache/debian-debs /var/cache/apt/archives/" \
  --customize-hook="sync-out /var/cache/apt/archives $cache/debian-debs" \
  --customize-hook="$customize_hook" \
  "$suite" "$rf" "${sources[@]}" >"$work/mmdebstrap.log" 2>&1 ||
  die "mmdebstrap failed: $(tail -5 "$work/mmdebstrap.log")"
# The .debs of older versions are not needed again.
find "$cache/debian-debs" -name '*.deb' -mtime +30 -delete 2>/dev/null || true

[ -f "$rf/boot/vmlinuz-$kernel_release" ] || die "no /boot/vmlinuz-$kernel_release in the guest"
[ -f "$rf/boot/initrd.img-$kernel_release" ] || die "no /boot/initrd.img-$kernel_release in the guest"
installed="$(chroot "$rf" dpkg-query -W -f='${Package} ${Version}\n' | sort)"
echo "$installed" >"$work/packages.txt"

# --- grub's configuration (both firmwares) -----------------------------------------------------------
# grub-install cannot run here: it must find the disk behind /boot/grub, and loop devices on these
# machines have no partitions (losetup -P makes none). The pieces are grub's own: grub-mkimage
# builds the first stage with an embedded config that finds the root by UUID and loads
# /boot/grub/grub.cfg from it; the firmware-specific functions below place that first stage.
write_grub_cfg() {
  chroot "$rf" grub-editenv /boot/grub/grubenv create
  cat >"$rf/boot/grub/grub.cfg" <<CFG
# Written by qlayer's vm-fixtures/build-debian.sh (update-grub in the guest rewrites it).
serial --unit=0 --speed=115200
terminal_input serial console
terminal_output serial console
set default=0
set timeout=0
insmod part_gpt
$([ "$root_kind" != lvm ] || echo 'insmod lvm')
insmod ext2
search --no-floppy --fs-uuid --set=root $fs_uuid
menuentry 'Debian GNU/Linux ($kernel_release)' {
  linux /boot/vmlinuz-$kernel_release $root_arg ro $cmdline
  initrd /boot/initrd.img-$kernel_release
}
CFG
  mkdir -p "$rf/etc/default/grub.d"
  echo "GRUB_CMDLINE_LINUX=\"$cmdline\"" >"$rf/etc/default/grub.d/qlayer.cfg"
  printf 'GRUB_TIMEOUT=0\nGRUB_TERMINAL="serial console"\n' >>"$rf/etc/default/grub.d/qlayer.cfg"
}

# The early config grub-mkimage embeds: find the root by UUID (the partition is a hint only).
write_load_cfg() {
  cat >"$rf/tmp/qlayer-load.cfg" <<CFG
search.fs_uuid $fs_uuid root $grub_hint
set prefix=(\$root)/boot/grub
CFG
}

# --- BIOS: grub-pc's modules in /boot/grub/i386-pc, core.img for the BIOS boot partition ---------------
# boot.img and core.img are placed and patched by place_grub_bios below, exactly as grub-bios-setup
# does for a GPT disk with a BIOS boot partition.
grub_files_bios() {
  gdir="$rf/boot/grub/i386-pc"
  mkdir -p "$gdir"
  cp "$rf"/usr/lib/grub/i386-pc/*.mod "$rf"/usr/lib/grub/i386-pc/*.lst "$rf/usr/lib/grub/i386-pc/boot.img" "$gdir/"
  write_load_cfg
  chroot "$rf" grub-mkimage -O i386-pc -o /boot/grub/i386-pc/core.img -c /tmp/qlayer-load.cfg \
    -p /boot/grub "${grub_bios_modules[@]}" >/dev/null 2>&1 || die "grub-mkimage failed"
  rm -f "$rf/tmp/qlayer-load.cfg"
  write_grub_cfg
  core_size="$(stat -c %s "$gdir/core.img")"
  [ "$core_size" -le $((bios_sectors * 512)) ] || die "core.img ($core_size bytes) does not fit the BIOS boot partition"
}

# --- UEFI: grub-efi's modules in /boot/grub/x86_64-efi, BOOTX64.EFI for the EFI system partition -------
# The image goes to the ESP's removable-media path EFI/BOOT/BOOTX64.EFI, which UEFI firmware boots
# from a disk with no NVRAM boot entry: a new desktop's NVRAM (a copy of OVMF's template) has none.
# It is unsigned: the domain runs with secure boot off. The ESP is mounted at /boot/efi as on an
# installed Debian (nofail: a missing vfat module must not stop the boot).
grub_files_uefi() {
  gdir="$rf/boot/grub/x86_64-efi"
  mkdir -p "$gdir" "$rf/boot/efi"
  cp "$rf"/usr/lib/grub/x86_64-efi/*.mod "$rf"/usr/lib/grub/x86_64-efi/*.lst "$gdir/"
  write_load_cfg
  chroot "$rf" grub-mkimage -O x86_64-efi -o /tmp/qlayer-BOOTX64.EFI -c /tmp/qlayer-load.cfg \
    -p /boot/grub part_gpt ext2 search_fs_uuid >/dev/null 2>&1 || die "grub-mkimage -O x86_64-efi failed"
  mv "$rf/tmp/qlayer-BOOTX64.EFI" "$work/BOOTX64.EFI"
  rm -f "$rf/tmp/qlayer-load.cfg"
  write_grub_cfg
  esp_uuid="$(echo "$esp_volume_id" | tr a-f A-F | sed 's/^\(....\)/\1-/')"
  echo "UUID=$esp_uuid /boot/efi vfat umask=0077,nofail 0 0" >>"$rf/etc/fstab"
}

# --- The disk: the root filesystem, then the partitions -------------------------------------------------
# Each firmware's partitioning is its own function; a layout for another root (LVM, say) is a sibling.
make_root_fs() { # [size in bytes, default: partition 2's]
  E2FSPROGS_FAKE_TIME=1700000000 mke2fs -q -F -t ext4 -b 4096 -L qlayer-debian -U "$fs_uuid" -E "hash_seed=$fs_uuid" \
    -d "$rf" "$work/root.ext4" "$((${1:-$root_size} / 1024))k" >/dev/null || die "mke2fs failed"
}

# Partition 2 is the root filesystem.
place_root_partition() {
  dd if="$work/root.ext4" of="$work/disk.raw" bs=1M seek=$((root_start * 512 / 1048576)) conv=notrunc,sparse status=none
  rm -f "$work/root.ext4"
  fs_offset=$((root_start * 512))
  fs_size=$root_size
  root_device=/dev/vda2
  lvm_json=""
}

# Partition 2 is an LVM PV; LV root holds the filesystem in two pieces (64 MiB, then the rest
# after the 16 MiB LV spare, as an lvextend after another LV was created leaves it), spare holds
# random bytes. lvm2 writes the metadata on a loop device at the partition's offset, with
# --driverloaded n (nothing is activated on this host) and a private LVM_SYSTEM_DIR whose filter
# admits only that loop device (no other PV or VG of this host is scanned or touched). The ext4
# is made at the LV's size and copied piece by piece to where lvm2 reports the LV's extents.
place_root_lvm() {
  local conf="$work/lvm-etc"
  mkdir -p "$conf"
  lvm_loop="$(losetup --find --show --offset $((root_start * 512)) --sizelimit "$root_size" "$work/disk.raw")" || die "losetup failed"
  trap 'losetup -d "$lvm_loop" 2>/dev/null; rm -rf "$work"' EXIT
  cat >"$conf/lvm.conf" <<EOF
devices { filter = [ "a|^$lvm_loop\$|", "r|.*|" ] global_filter = [ "a|^$lvm_loop\$|", "r|.*|" ] obtain_device_list_from_udev = 0 use_devicesfile = 0 write_cache_state = 0 }
activation { udev_sync = 0 udev_rules = 0 }
backup { backup = 0 archive = 0 }
EOF
  lvmq() { LVM_SYSTEM_DIR="$conf" LVM_SUPPRESS_FD_WARNINGS=1 lvm "$1" --driverloaded n "${@:2}" 2>>"$work/lvm.log" || die "lvm $*: $(tail -3 "$work/lvm.log")"; }
  lvmq pvcreate -q "$lvm_loop" >/dev/null
  lvmq vgcreate -q -s 4M "$vg" "$lvm_loop" >/dev/null
  lvmq lvcreate -q -an -Zn -Wn -L 64M -n root "$vg" >/dev/null
  lvmq lvcreate -q -an -Zn -Wn -L 16M -n spare "$vg" >/dev/null
  lvmq lvextend -q -l +100%FREE "$vg/root" >/dev/null
  local extent pe_start lv_size lv start size range first pieces=0
  extent="$(lvmq vgs --noheadings --units b --nosuffix -o vg_extent_size "$vg" | tr -d ' ')"
  pe_start="$(lvmq pvs --noheadings --units b --nosuffix -o pe_start "$lvm_loop" | tr -d ' ')"
  lv_size="$(lvmq lvs --noheadings --units b --nosuffix -o lv_size "$vg/root" | tr -d ' ')"
  local mib=1048576 per=$((extent / 1048576)) base=$(((root_start * 512 + pe_start) / 1048576))
  (((root_start * 512 + pe_start) % mib == 0 && extent % mib == 0)) || die "the PV's extents are not aligned to 1 MiB"
  make_root_fs "$lv_size"
  # lvs: "start_pe size_pe /dev/loopN:first-last" per segment, in LV order.
  for lv in root spare; do
    while read -r start size range; do
      first="${range##*:}"
      first="${first%-*}"
      if [ "$lv" = root ]; then
        dd if="$work/root.ext4" of="$work/disk.raw" bs=1M skip=$((start * per)) seek=$((base + first * per)) \
          count=$((size * per)) conv=notrunc,sparse status=none || die "copying a piece of the root LV failed"
        [ "$pieces" -ne 0 ] || fs_offset=$((root_start * 512 + pe_start + first * extent))
        pieces=$((pieces + 1))
      else
        head -c $((size * extent)) /dev/urandom | dd of="$work/disk.raw" bs=1M seek=$((base + first * per)) \
          conv=notrunc iflag=fullblock status=none || die "filling the spare LV failed"
      fi
    done < <(lvmq lvs --segments --noheadings -o seg_start_pe,seg_size_pe,seg_pe_ranges "$vg/$lv")
  done
  [ "$pieces" -eq 2 ] || die "the root LV has $pieces pieces, expected 2"
  losetup -d "$lvm_loop"
  trap 'rm -rf "$work"' EXIT
  rm -f "$work/root.ext4"
  fs_size=$lv_size
  root_device="/dev/mapper/$vg-root"
  lvm_json=", \"lvm\": { \"vg\": \"$vg\", \"pv\": 2, \"extentSize\": $extent, \"lvs\": [{ \"name\": \"root\", \"size\": $lv_size, \"pieces\": $pieces }, { \"name\": \"spare\", \"size\": $((16 * 1048576)) }] }"
}

# GPT with a BIOS boot partition (1) and the root (2: the filesystem, or an LVM PV holding it);
# grub-bios-setup's work done by hand.
partition_disk_bios() {
  truncate -s "$disk_size" "$work/disk.raw"
  sgdisk -a 2048 -U "$disk_guid" \
    -n "1:$bios_start:+$bios_sectors" -t 1:ef02 -c 1:bios-boot \
    -n "2:$root_start:+$((root_size / 512))" -t "2:$root_part_type" -c 2:root -u "2:$root_part_guid" \
    "$work/disk.raw" >/dev/null 2>&1 || die "sgdisk failed"
  sgdisk -i 2 "$work/disk.raw" 2>/dev/null | grep -q "First sector: $root_start " || die "sgdisk did not create partition 2"
  "place_root_$root_kind"

  # grub-bios-setup's work: core.img at the BIOS boot partition's first sector; its first sector
  # (diskboot.img) lists the rest: start sector (le64 at 0x1f4; the length at 0x1fc is grub-mkimage's);
  # boot.img in the MBR's code area (the partition table is kept) with the core's sector (le64 at 0x5c),
  # boot drive 0xff (= the one the BIOS booted from) and the drive check replaced by two nops (0x66).
  perl -e '
    my ($disk, $boot, $core, $lba) = @ARGV;
    local $/;
    open(my $b, "<:raw", $boot) or die; my $bi = <$b>; close $b;
    open(my $c, "<:raw", $core) or die; my $ci = <$c>; close $c;
    length($bi) == 512 or die "boot.img is not 512 bytes\n";
    unpack("v", substr($ci, 0x1fc, 2)) == int((length($ci) + 511) / 512) - 1 or die "unexpected core.img blocklist length\n";
    substr($ci, 0x1f4, 8) = pack("Q<", $lba + 1);
    substr($bi, 0x5c, 8) = pack("Q<", $lba);
    substr($bi, 0x64, 1) = "\xff";
    substr($bi, 0x66, 2) = "\x90\x90";
    open(my $d, "+<:raw", $disk) or die;
    seek($d, 0, 0); print $d substr($bi, 0, 0x1b8);
    seek($d, $lba * 512, 0); print $d $ci;
    close $d or die;
  ' "$work/disk.raw" "$gdir/boot.img" "$gdir/core.img" "$bios_start" || die "placing grub's boot.img and core.img failed"
  partitions_json="{ \"number\": 1, \"type\": \"bios-boot\", \"offset\": $((bios_start * 512)), \"size\": $((bios_sectors * 512)) }"
}

# GPT with an EFI system partition (1: FAT32 made in a file by mkfs.vfat, filled by mtools, no mount)
# and the root (2).
partition_disk_uefi() {
  truncate -s "$disk_size" "$work/disk.raw"
  sgdisk -a 2048 -U "$disk_guid" \
    -n "1:$esp_start:+$esp_sectors" -t 1:ef00 -c 1:esp -u "1:$esp_part_guid" \
    -n "2:$root_start:+$((root_size / 512))" -t 2:8300 -c 2:root -u "2:$root_part_guid" \
    "$work/disk.raw" >/dev/null 2>&1 || die "sgdisk failed"
  sgdisk -i 1 "$work/disk.raw" 2>/dev/null | grep -q "First sector: $esp_start " || die "sgdisk did not create partition 1"
  sgdisk -i 2 "$work/disk.raw" 2>/dev/null | grep -q "First sector: $root_start " || die "sgdisk did not create partition 2"
  rm -f "$work/esp.vfat"
  mkfs.vfat -C -F 32 --invariant -i "$esp_volume_id" -n EFI "$work/esp.vfat" $((esp_sectors / 2)) >/dev/null || die "mkfs.vfat failed"
  MTOOLS_SKIP_CHECK=1 mmd -i "$work/esp.vfat" ::/EFI ::/EFI/BOOT || die "mmd failed"
  MTOOLS_SKIP_CHECK=1 mcopy -i "$work/esp.vfat" "$work/BOOTX64.EFI" ::/EFI/BOOT/BOOTX64.EFI || die "mcopy failed"
  MTOOLS_SKIP_CHECK=1 mdir -i "$work/esp.vfat" ::/EFI/BOOT 2>/dev/null | grep -q BOOTX64 || die "BOOTX64.EFI is not on the ESP"
  dd if="$work/esp.vfat" of="$work/disk.raw" bs=1M seek=$((esp_start * 512 / 1048576)) conv=notrunc,sparse status=none
  dd if="$work/root.ext4" of="$work/disk.raw" bs=1M seek=$((root_start * 512 / 1048576)) conv=notrunc,sparse status=none
  rm -f "$work/esp.vfat" "$work/root.ext4"
  fs_offset=$((root_start * 512))
  fs_size=$root_size
  root_device=/dev/vda2
  lvm_json=""
  partitions_json="{ \"number\": 1, \"type\": \"efi-system\", \"offset\": $((esp_start * 512)), \"size\": $((esp_sectors * 512)), \"guid\": \"$esp_part_guid\", \"filesystem\": { \"type\": \"vfat\", \"uuid\": \"$esp_uuid\", \"label\": \"EFI\" }, \"bootFile\": \"EFI/BOOT/BOOTX64.EFI\" }"
}

if [ "$firmware" = uefi ]; then
  grub_files_uefi
  make_root_fs
  partition_disk_uefi
  bootloader="grub-efi-amd64-bin $(awk '$1 == "grub-efi-amd64-bin" {print $2; exit}' <<<"$installed")"
else
  grub_files_bios
  [ "$root_kind" = lvm ] || make_root_fs # LVM: made at the LV's size once the LV exists
  partition_disk_bios
  bootloader="grub-pc $(awk '$1 == "grub-pc" {print $2; exit}' <<<"$installed")"
fi

mkdir -p "$out.tmp"
rm -rf "${out:?}.tmp/"*
qemu-img convert -f raw -O qcow2 "$work/disk.raw" "$out.tmp/base.qcow2"
mv "$work/packages.txt" "$out.tmp/packages.txt"
rm -f "$work/disk.raw"

# --- Manifest ------------------------------------------------------------------------------------------
allocated="$(qemu-img info --output=json "$out.tmp/base.qcow2" | awk -F'[:,]' '/"actual-size"/{gsub(/ /, "", $2); print $2; exit}')"
version_of() { awk -v p="$1" '$1 == p {print $2; exit}' <<<"$installed"; }
pkg_json="$(awk '{printf "%s{\"name\": \"%s\", \"version\": \"%s\"}", (NR > 1 ? ", " : ""), $1, $2}' <<<"$installed")"
cat >"$out.tmp/manifest.json" <<EOF
{
  "schema": 1,
  "kind": "debian",
  "key": "$key",
  "suite": "$suite",
  "image": { "path": "base.qcow2", "size": $(stat -c %s "$out.tmp/base.qcow2"), "allocated": $allocated, "sha256": "$(sha256sum "$out.tmp/base.qcow2" | cut -d' ' -f1)",
    "format": "qcow2", "virtualSize": $disk_size, "rootDevice": "$root_device", "partitionTable": "gpt",
    "partitions": [
      $partitions_json,
      { "number": 2, "type": "$([ "$root_kind" = lvm ] && echo lvm || echo linux)", "offset": $((root_start * 512)), "size": $root_size, "guid": "$root_part_guid" }
    ],
    "filesystem": { "type": "ext4", "blockSize": 4096, "offset": $fs_offset, "size": $fs_size, "uuid": "$fs_uuid", "label": "qlayer-debian" }$lvm_json },
  "boot": { "mode": "firmware", "firmware": "$firmware", "bootloader": "$bootloader", "cmdline": "$root_arg ro $cmdline" },
  "kernel": { "release": "$kernel_release", "package": "$kernel_pkg", "version": "$(version_of "$kernel_pkg")" },
  "user": { "name": "$user_name", "uid": $user_uid, "home": "/home/$user_name" },
  "agent": { "channel": "org.qemu.guest_agent.0", "version": "$(version_of qemu-guest-agent)" },
  "systemd": "$(version_of systemd)",
  "packages": [$pkg_json]
}
EOF
node -e 'JSON.parse(require("fs").readFileSync(process.argv[1], "utf8"))' "$out.tmp/manifest.json" 2>/dev/null \
  || { command -v node >/dev/null && die "manifest.json is not valid JSON"; }

rm -rf "$out"
mv "$out.tmp" "$out"
ln -sfn "$name" "$cache/$variant-current"
# Keep the two newest builds of this variant (a test may still run on the older one); another
# variant's builds (debian-uefi-<key>, debian-lvm-<key> beside debian-<key>) are not this one's to prune.
kept=0
for old in $(ls -1dt "$cache/$variant"-*/ 2>/dev/null); do
  old="${old%/}"
  [[ "${old##*/}" =~ ^$variant-[0-9a-f]{16}$ ]] || continue
  [ -L "$old" ] || [ ! -f "$old/manifest.json" ] || [ "$old" = "$out" ] && continue
  kept=$((kept + 1))
  [ "$kept" -le 1 ] || rm -rf "$old"
done
log "built $out in $(($(date +%s) - started)) s (kernel $kernel_release, $((allocated / 1048576)) MiB allocated of $((disk_size / 1048576)) MiB)"
[ "$print_dir" -eq 0 ] || echo "$out"
