#!/usr/bin/env bash
# Build qlayer's test guest from Debian packages only (apt-get download + dpkg-deb -x; nothing is
# installed on the host): a cloud kernel, a busybox initramfs, and an ext4 root disk with busybox,
# an init that reports on the serial port, and the QEMU guest agent. See vm-fixtures/README.md.
#
# Output: $cache/<key>/ {vmlinuz, vmlinux, initramfs.img, base.qcow2, base-gpt.qcow2, manifest.json}
# and the symlink $cache/current -> <key>. The key hashes this script, the files in guest/, the
# resolved package versions (with their archive sha256) and the host tools that shape the output,
# so a run with the same inputs only checks the key and returns.
#
# Usage: vm-fixtures/build.sh [--force] [--print-dir]
#   QLAYER_FIXTURES_CACHE  cache folder (default: <repo>/.cache/vm-fixtures)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
cache="${QLAYER_FIXTURES_CACHE:-$repo/.cache/vm-fixtures}"
force=0
print_dir=0
for arg in "$@"; do
  case "$arg" in
    --force) force=1 ;;
    --print-dir) print_dir=1 ;;
    *) echo "build.sh: unknown argument $arg" >&2; exit 2 ;;
  esac
done

log() { echo "vm-fixtures: $*" >&2; }
die() { echo "vm-fixtures: error: $*" >&2; exit 1; }

for tool in apt-get apt-cache dpkg-deb mke2fs debugfs sgdisk qemu-img sha256sum flock; do
  command -v "$tool" >/dev/null || die "$tool is missing (run scripts/setup-host.sh)"
done

# Root filesystem size (bytes) and the fixed identities that make the images reproducible.
fs_size=$((256 * 1024 * 1024))
part_offset=$((1024 * 1024))
fs_uuid=5f1c0a7e-91d2-4b6e-8f3a-0c1d2e3f4a5b
disk_guid=8a6f3c2e-1b4d-4e5f-9a0b-1c2d3e4f5a6b
part_guid=3d2c1b0a-9f8e-4d7c-8b6a-5f4e3d2c1b0a
# no_timer_check: under TCG on an overloaded host (load 18 on 2 cores was seen) the kernel's
# IO-APIC timer check can fail and panic the guest at boot ("IO-APIC + timer doesn't work!"),
# which no test is about; most VMs skip the check for the same reason.
cmdline_base="console=ttyS0 panic=-1 quiet no_timer_check"
modules=(virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk virtio_console)

mkdir -p "$cache/debs"
exec 9>"$cache/lock"
flock 9 # one build at a time per cache folder

# --- Resolve the inputs -------------------------------------------------------------------------
# The kernel metapackage points at linux-image-6.1.0-NN-cloud-amd64, NN moves with security updates.
kernel_pkg="$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-/{print $2; exit}')"
[ -n "$kernel_pkg" ] || die "cannot resolve linux-image-cloud-amd64 (apt-get update?)"
# qemu-ga and the libraries it links against: its Depends, recursively (PreDepends only pull in
# the package manager's helpers, not libraries).
agent_pkgs="$(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks \
  --no-replaces --no-enhances --no-pre-depends qemu-guest-agent | grep -v '^ ' | grep -v '^<' | sort -u)"
pkgs=("$kernel_pkg" busybox-static $agent_pkgs)

# Lines: 'URI' file size SHA256:hex, one per package. apt's lists can be mid-update (another
# process running apt-get update): retry a few times before refreshing them ourselves.
# (From an empty folder: --print-uris leaves out packages whose .deb is in the current folder.)
resolve_dir="$(mktemp -d)"
resolve_uris() { (cd "$resolve_dir" && apt-get download --print-uris "${pkgs[@]}" 2>&1) | grep "^'" | sort; }
uris=""
for attempt in 1 2 3 4; do
  uris="$(resolve_uris || true)"
  [ -n "$uris" ] && [ "$(wc -l <<<"$uris")" -eq "${#pkgs[@]}" ] && break
  if [ "$attempt" -eq 3 ]; then log "apt-get update"; apt-get update -qq >/dev/null 2>&1 || true; else sleep 2; fi
done
[ -n "$uris" ] && [ "$(wc -l <<<"$uris")" -eq "${#pkgs[@]}" ] ||
  die "apt-get resolved $(grep -c . <<<"$uris") of ${#pkgs[@]} packages (${pkgs[*]}): $(apt-get download --print-uris "${pkgs[@]}" 2>&1 | grep -v "^'" | head -3)"
rmdir "$resolve_dir"

key="$({
  cat "$0"
  (cd "$here/guest" && find . -type f | LC_ALL=C sort | xargs sha256sum)
  awk '{print $2, $4}' <<<"$uris"
  mke2fs -V 2>&1 | head -1
  sgdisk --version | head -1
  qemu-img --version | head -1
} | sha256sum | cut -c1-16)"
out="$cache/$key"

if [ "$force" -eq 0 ] && [ -f "$out/manifest.json" ]; then
  ln -sfn "$key" "$cache/current"
  log "up to date ($out)"
  [ "$print_dir" -eq 0 ] || echo "$out"
  exit 0
fi

started=$(date +%s)
work="$(mktemp -d "$cache/build.XXXXXX")"
trap 'rm -rf "$work"' EXIT

# --- Fetch and unpack ---------------------------------------------------------------------------
# apt-get download fetches the candidate versions, which are the ones --print-uris resolved.
missing=()
while read -r _ file _ _; do
  [ -f "$cache/debs/$file" ] || missing+=("${file%%_*}")
done <<<"$uris"
if ((${#missing[@]})); then
  log "download ${missing[*]}"
  # _apt cannot write into every folder; download into the work folder and move.
  mkdir -p "$work/dl"
  (cd "$work/dl" && apt-get download -q "${missing[@]}" >/dev/null 2>&1) || die "apt-get download ${missing[*]} failed"
  mv "$work/dl/"*.deb "$cache/debs/"
fi
while read -r _ file _ sum; do
  deb="$cache/debs/$file"
  [ -f "$deb" ] || die "apt-get download did not produce $file"
  [ "$(sha256sum "$deb" | cut -d' ' -f1)" = "${sum#SHA256:}" ] || { rm -f "$deb"; die "$file: sha256 mismatch (removed, rerun)"; }
  dpkg-deb -x "$deb" "$work/pkgs"
done <<<"$uris"
x="$work/pkgs"

kernel_release="${kernel_pkg#linux-image-}"
kernel_version="$(awk -v p="$kernel_pkg" '$2 ~ "^"p"_" {split($2, a, "_"); print a[2]}' <<<"$uris")"
agent_version="$(awk '$2 ~ /^qemu-guest-agent_/ {split($2, a, "_"); print a[2]}' <<<"$uris" | sed 's/%3a/:/')"
bzimage="$x/boot/vmlinuz-$kernel_release"
moddir="$x/lib/modules/$kernel_release/kernel"
[ -f "$bzimage" ] || die "no $bzimage in $kernel_pkg"

mkdir -p "$out.tmp"
rm -rf "${out:?}.tmp/"*
cp "$bzimage" "$out.tmp/vmlinuz"

# --- Kernel: also the ELF vmlinux, bootable as PVH (skips the bzImage's self-decompression, which
# is slow under TCG). The cloud bzImage is LZ4 legacy-framed: find the frame magic and decode from
# there; lz4 exits non-zero on the trailer after the stream, so check the result is an ELF, and
# the kernel's config says it has the PVH entry point.
vmlinux_ok=0
if command -v lz4 >/dev/null && grep -q '^CONFIG_PVH=y' "$x/boot/config-$kernel_release" 2>/dev/null; then
  for off in $(grep -obUaP '\x02\x21\x4c\x18' "$bzimage" | cut -d: -f1 | head -3); do
    tail -c +$((off + 1)) "$bzimage" | lz4 -dc >"$work/vmlinux" 2>/dev/null || true
    if [ "$(head -c 4 "$work/vmlinux" | od -An -tx1 | tr -d ' ')" = 7f454c46 ] && [ "$(stat -c %s "$work/vmlinux")" -gt $((8 * 1024 * 1024)) ]; then
      mv "$work/vmlinux" "$out.tmp/vmlinux"
      vmlinux_ok=1
      break
    fi
  done
fi
[ "$vmlinux_ok" -eq 1 ] || log "no PVH vmlinux (lz4 missing, no CONFIG_PVH, or not an LZ4 bzImage); vmlinuz only"

# --- Initramfs: static busybox, the virtio modules, stage-1 init --------------------------------
ir="$work/initramfs"
mkdir -p "$ir"/{bin,dev,proc,sys,newroot,lib/modules}
cp "$x/bin/busybox" "$ir/bin/busybox"
for applet in sh mount umount insmod sleep cat switch_root poweroff sync dd grep od tr; do ln -s busybox "$ir/bin/$applet"; done
for m in "${modules[@]}"; do
  ko="$(find "$moddir" -name "$m.ko" | head -1)"
  [ -n "$ko" ] || die "module $m.ko not in $kernel_pkg"
  cp "$ko" "$ir/lib/modules/"
done
cp "$here/guest/initramfs-init" "$ir/init"
chmod 755 "$ir/init"
# The kernel opens /dev/console before /init runs: it must exist in the archive.
mknod -m 600 "$ir/dev/console" c 5 1
find "$ir" -exec touch -h -d @0 {} +
(cd "$ir" && find . | LC_ALL=C sort | "$x/bin/busybox" cpio -o -H newc 2>/dev/null) | gzip -9n >"$out.tmp/initramfs.img"

# --- Root filesystem -----------------------------------------------------------------------------
rf="$work/rootfs"
mkdir -p "$rf"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,run,tmp,root,mnt,var,home/qlayer}
ln -s ../run "$rf/var/run"
chmod 1777 "$rf/tmp"
cp "$x/bin/busybox" "$rf/bin/busybox"
while read -r applet; do
  [ -e "$rf/$applet" ] || ln -s /bin/busybox "$rf/$applet"
done < <("$x/bin/busybox" --list-full)
cp "$here/guest/init" "$rf/sbin/init.qlayer" && mv -f "$rf/sbin/init.qlayer" "$rf/sbin/init"
cp "$here/guest/shutdown" "$rf/sbin/shutdown.qlayer" && mv -f "$rf/sbin/shutdown.qlayer" "$rf/sbin/shutdown"
chmod 755 "$rf/sbin/init" "$rf/sbin/shutdown"
printf 'root:x:0:0:root:/root:/bin/sh\nqlayer:x:1000:1000:qlayer:/home/qlayer:/bin/sh\n' >"$rf/etc/passwd"
printf 'root:x:0:\nqlayer:x:1000:\n' >"$rf/etc/group"
chown 1000:1000 "$rf/home/qlayer"
ln -s /proc/mounts "$rf/etc/mtab"
echo qlayer-guest >"$rf/etc/hostname"

# qemu-ga and exactly the libraries its loader resolves from the unpacked packages (not the host's).
cp "$x/usr/sbin/qemu-ga" "$rf/usr/sbin/qemu-ga"
loader="$(find "$x/lib/x86_64-linux-gnu" "$x/usr/lib/x86_64-linux-gnu" -name 'ld-linux-x86-64.so.2' -type f 2>/dev/null | head -1)"
[ -n "$loader" ] || die "no ld-linux-x86-64.so.2 in libc6"
libpath="$x/lib/x86_64-linux-gnu:$x/usr/lib/x86_64-linux-gnu"
listing="$("$loader" --library-path "$libpath" --list "$x/usr/sbin/qemu-ga")"
! grep -q 'not found' <<<"$listing" || die "qemu-ga needs libraries no package provided: $(grep 'not found' <<<"$listing" | tr '\n' ' ')"
while read -r lib; do
  rel="${lib#"$x"}"
  mkdir -p "$rf$(dirname "$rel")"
  cp -L "$lib" "$rf$rel"
done < <(awk '/=> \//{print $3}' <<<"$listing")
mkdir -p "$rf/lib64"
cp -L "$loader" "$rf/lib64/ld-linux-x86-64.so.2"
lib_count="$(awk '/=> \//' <<<"$listing" | wc -l)"

find "$rf" -exec touch -h -d @0 {} +
# Fixed UUID, hash seed and clock: the same inputs give the same filesystem bytes.
E2FSPROGS_FAKE_TIME=1700000000 MKE2FS_CONFIG="$here/guest/mke2fs.conf" \
  mke2fs -q -F -t ext4 -b 4096 -L qlayer-root -U "$fs_uuid" -E "hash_seed=$fs_uuid" \
  -d "$rf" "$work/root.ext4" "$((fs_size / 1024))k" >/dev/null
# mke2fs -d copies each file's ctime, which no one can set: zero them with debugfs.
(cd "$rf" && find . -mindepth 1 | sed 's|^\.||' | LC_ALL=C sort | sed 's|^|sif "|; s|$|" ctime 0|'; echo 'sif / ctime 0') >"$work/ctimes.debugfs"
E2FSPROGS_FAKE_TIME=1700000000 debugfs -w -f "$work/ctimes.debugfs" "$work/root.ext4" >/dev/null 2>&1 || die "debugfs could not reset ctimes"
qemu-img convert -f raw -O qcow2 "$work/root.ext4" "$out.tmp/base.qcow2"

# Same filesystem in a GPT partition at 1 MiB (backup GPT needs the last 33 sectors).
gpt_size=$((part_offset + fs_size + part_offset))
truncate -s "$gpt_size" "$work/disk.raw"
# (No -q: sgdisk 1.0.9 with -q silently creates no partition here.)
sgdisk -a 2048 -U "$disk_guid" -n "1:$((part_offset / 512)):+$((fs_size / 512))" \
  -t 1:8300 -c 1:qlayer-root -u "1:$part_guid" "$work/disk.raw" >/dev/null 2>&1 || die "sgdisk failed"
sgdisk -i 1 "$work/disk.raw" 2>/dev/null | grep -q "First sector: $((part_offset / 512)) " || die "sgdisk did not create partition 1"
dd if="$work/root.ext4" of="$work/disk.raw" bs=1M seek=1 conv=notrunc,sparse status=none
qemu-img convert -f raw -O qcow2 "$work/disk.raw" "$out.tmp/base-gpt.qcow2"

# --- Manifest ------------------------------------------------------------------------------------
fileinfo() { echo "\"path\": \"$1\", \"size\": $(stat -c %s "$out.tmp/$1"), \"sha256\": \"$(sha256sum "$out.tmp/$1" | cut -d' ' -f1)\""; }
vsize() { qemu-img info --output=json "$out.tmp/$1" | awk -F'[:,]' '/"virtual-size"/{gsub(/ /, "", $2); print $2; exit}'; }
pkg_json="$(awk '{split($2, a, "_"); sub(/%3a/, ":", a[2]); printf "%s{\"name\": \"%s\", \"version\": \"%s\", \"sha256\": \"%s\"}", (NR > 1 ? ", " : ""), a[1], a[2], substr($4, 8)}' <<<"$uris")"
kernel_entry="vmlinuz"
[ "$vmlinux_ok" -eq 0 ] || kernel_entry="vmlinux"
cat >"$out.tmp/manifest.json" <<EOF
{
  "schema": 1,
  "key": "$key",
  "kernel": { $(fileinfo "$kernel_entry"), "release": "$kernel_release", "package": "$kernel_pkg", "version": "$kernel_version", "pvh": $([ "$vmlinux_ok" -eq 1 ] && echo true || echo false) },
  "bzImage": { $(fileinfo vmlinuz) },
  "initrd": { $(fileinfo initramfs.img), "modules": [$(printf '"%s",' "${modules[@]}" | sed 's/,$//')] },
  "cmdline": "$cmdline_base",
  "images": {
    "base": { $(fileinfo base.qcow2), "format": "qcow2", "virtualSize": $(vsize base.qcow2), "rootDevice": "/dev/vda", "cmdline": "$cmdline_base root=/dev/vda",
      "filesystem": { "type": "ext4", "blockSize": 4096, "offset": 0, "size": $fs_size, "uuid": "$fs_uuid", "label": "qlayer-root" } },
    "base-gpt": { $(fileinfo base-gpt.qcow2), "format": "qcow2", "virtualSize": $(vsize base-gpt.qcow2), "rootDevice": "/dev/vda1", "cmdline": "$cmdline_base root=/dev/vda1",
      "partitionTable": "gpt", "partition": { "number": 1, "offset": $part_offset, "size": $fs_size, "guid": "$part_guid" },
      "filesystem": { "type": "ext4", "blockSize": 4096, "offset": $part_offset, "size": $fs_size, "uuid": "$fs_uuid", "label": "qlayer-root" } }
  },
  "serial": {
    "port": "ttyS0",
    "linePrefix": "QLAYER: ",
    "bootMarker": "QLAYER: booted",
    "readyMarker": "QLAYER: ready",
    "lines": {
      "booted <kernel-release>": "the root disk's /sbin/init runs",
      "wrote <sha256> <path>": "qlayer.write=<path>[,<path>...] wrote and synced the file",
      "sha256 <sha256> <path>": "qlayer.sha256=<path>[,<path>...]: the file's hash as the guest reads it",
      "missing <path>": "a qlayer.sha256 path does not exist",
      "agent started | agent absent": "qemu-ga runs on org.qemu.guest_agent.0, or there is no such channel",
      "ready": "requests done, agent started; the guest idles (qlayer.then=stay, the default)",
      "poweroff | reboot | halt": "/sbin/shutdown synced and remounted / read-only; qlayer.then=poweroff or guest-shutdown",
      "error <what>": "something failed; the guest powers off if it cannot boot"
    },
    "requests": ["qlayer.write=/a,/b", "qlayer.sha256=/a,/b", "qlayer.then=poweroff|stay", "root=/dev/vda|/dev/vda1"]
  },
  "agent": { "channel": "org.qemu.guest_agent.0", "version": "$agent_version", "libraries": $lib_count },
  "packages": [$pkg_json]
}
EOF
node -e 'JSON.parse(require("fs").readFileSync(process.argv[1], "utf8"))' "$out.tmp/manifest.json" 2>/dev/null \
  || { command -v node >/dev/null && die "manifest.json is not valid JSON"; }

rm -rf "$out"
mv "$out.tmp" "$out"
ln -sfn "$key" "$cache/current"
# Keep the cache small, but not at the expense of a test that still runs on an older build (its
# overlays name that build's base.qcow2): keep the three newest builds. The .debs stay too.
kept=0
for old in $(ls -1dt "$cache"/*/ 2>/dev/null); do
  old="${old%/}"
  case "${old##*/}" in debian-*) continue ;; esac # the Debian guest's builds (build-debian.sh) keep their own count
  [ -L "$old" ] || [ ! -f "$old/manifest.json" ] || [ "$old" = "$out" ] && continue
  kept=$((kept + 1))
  [ "$kept" -le 2 ] || rm -rf "$old"
done
log "built $out in $(($(date +%s) - started)) s (kernel $kernel_release, qemu-ga $agent_version)"
[ "$print_dir" -eq 0 ] || echo "$out"
