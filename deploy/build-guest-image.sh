#!/usr/bin/env bash
# Builds the small guest the qemu driver boots: a Debian kernel and a busybox initramfs that
# brings up virtio-net and runs strata-workload.
#
#   deploy/build-guest-image.sh OUTDIR [WORKLOAD_BINARY]
#
# Outputs OUTDIR/vmlinuz and OUTDIR/initrd.img (use them as a tier's template.image.kernel and
# .initrd). WORKLOAD_BINARY defaults to $STRATA_WORKLOAD_BIN, else a release build of
# strata-workload from this repository.
#
# Nothing is installed on the host: the kernel and busybox packages are fetched with
# `apt-get download` and unpacked with `dpkg-deb -x` into OUTDIR/cache. Idempotent: when the
# inputs (packages, workload binary, this script) are unchanged, it does nothing.
#
# The guest reads PORT (default 8080) and STRATA_INSTANCE_ID from the kernel command line,
# configures eth0 for qemu user networking (10.0.2.15/24, gateway 10.0.2.2), prints
# "STRATA-GUEST-READY" on the serial console and runs strata-workload on PORT. When the
# workload exits, the guest powers off, so qemu exits too.
#
# Needs: apt-get (with package lists: deploy/install-deps.d/agent.sh), dpkg-deb, cpio, gzip,
# xz/zstd (only if modules are compressed), modinfo (kmod), ldd.
set -euo pipefail

usage() {
  echo "usage: $0 OUTDIR [WORKLOAD_BINARY]" >&2
  exit 2
}
die() {
  echo "build-guest-image: $*" >&2
  exit 1
}
log() {
  echo "build-guest-image: $*" >&2
}

[ $# -ge 1 ] && [ $# -le 2 ] || usage
outdir=$1
workload=${2:-${STRATA_WORKLOAD_BIN:-}}
script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo_root=$(cd "$script_dir/.." && pwd)

# The virtio drivers qemu's `-device virtio-net-pci` needs; their dependencies (virtio,
# virtio_ring, virtio_pci_modern_dev/legacy_dev, failover, net_failover) are found with
# modinfo and loaded first.
wanted_modules=(virtio_pci virtio_net)

for tool in apt-get apt-cache dpkg-deb cpio gzip modinfo ldd sha256sum; do
  command -v "$tool" >/dev/null || die "missing $tool (run deploy/install-deps.d/agent.sh)"
done

mkdir -p "$outdir/cache"
outdir=$(cd "$outdir" && pwd)
cache=$outdir/cache

if [ -z "$workload" ]; then
  log "building strata-workload (release)"
  (cd "$repo_root" && cargo build --release --quiet -p strata-agent --bin strata-workload)
  workload=${CARGO_TARGET_DIR:-$repo_root/target}/release/strata-workload
fi
[ -x "$workload" ] || die "workload binary $workload is not an executable file"

# linux-image-amd64 is a metapackage; the kernel itself is its versioned dependency.
kernel_package=$(apt-cache depends linux-image-amd64 2>/dev/null |
  awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
[ -n "$kernel_package" ] ||
  die "cannot resolve linux-image-amd64 to a kernel package (run apt-get update first)"

# Downloads a package into the cache unless a .deb of it is there already; prints its path.
fetch() {
  local package=$1 version deb
  version=$(apt-cache policy "$package" | awk '/Candidate:/ { print $2; exit }')
  [ -n "$version" ] && [ "$version" != "(none)" ] || die "no candidate version of $package"
  # apt-get download escapes ':' in epochs as %3a.
  deb="$cache/${package}_${version//:/%3a}_amd64.deb"
  if [ ! -s "$deb" ]; then
    log "downloading $package $version"
    # _apt cannot write to an arbitrary directory; downloading as the caller is fine here.
    (cd "$cache" && apt-get download -o APT::Sandbox::User=root -q "$package=$version" >&2)
  fi
  [ -s "$deb" ] || die "download of $package did not produce $deb"
  echo "$deb"
}

kernel_deb=$(fetch "$kernel_package")
busybox_deb=$(fetch busybox-static)
# Older kernels (Debian ships a new ABI every few months) would otherwise pile up.
find "$cache" -maxdepth 1 -name 'linux-image-*.deb' ! -name "$(basename "$kernel_deb")" -delete
find "$cache" -maxdepth 1 -name 'busybox-static_*.deb' ! -name "$(basename "$busybox_deb")" -delete

stamp=$(
  {
    sha256sum "${BASH_SOURCE[0]}" | cut -d' ' -f1
    basename "$kernel_deb"
    basename "$busybox_deb"
    sha256sum "$workload" | cut -d' ' -f1
  } | sha256sum | cut -d' ' -f1
)
if [ -s "$outdir/vmlinuz" ] && [ -s "$outdir/initrd.img" ] &&
  [ "$(cat "$outdir/stamp" 2>/dev/null || true)" = "$stamp" ]; then
  log "up to date: $outdir/vmlinuz $outdir/initrd.img"
  exit 0
fi

work=$outdir/work
rm -rf "$work"
mkdir -p "$work/kernel" "$work/busybox" "$work/root"
dpkg-deb -x "$kernel_deb" "$work/kernel"
dpkg-deb -x "$busybox_deb" "$work/busybox"

vmlinuz=$(find "$work/kernel/boot" -maxdepth 1 -name 'vmlinuz-*' -print -quit)
[ -n "$vmlinuz" ] || die "no vmlinuz in $kernel_deb"
moddir=$(find "$work/kernel" -type d -path '*/lib/modules/*' -prune -name '[0-9]*' -print -quit)
[ -n "$moddir" ] || die "no lib/modules/VERSION in $kernel_deb"

root=$work/root
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,etc,lib/modules}

# An index "normalized-name<TAB>path" of every module file, built once: '-' and '_' are
# interchangeable in module names.
module_index=$work/module-index
find "$moddir/kernel" \( -name '*.ko' -o -name '*.ko.xz' -o -name '*.ko.zst' -o -name '*.ko.gz' \) \
  -printf '%f\t%p\n' |
  awk -F'\t' '{ name = $1; sub(/\.ko.*$/, "", name); gsub(/-/, "_", name); print name "\t" $2 }' \
    >"$module_index"

# Prints the file of a module, or fails when there is none.
module_file() {
  awk -F'\t' -v name="${1//-/_}" '$1 == name { print $2; found = 1; exit } END { exit !found }' \
    "$module_index"
}

# Copies a module into the initramfs uncompressed (busybox insmod reads plain .ko files).
install_module() {
  local source=$1 name=$2 target=$root/lib/modules/$2.ko
  case "$source" in
    *.ko.xz) xz -dc "$source" >"$target" ;;
    *.ko.zst) zstd -qdc "$source" >"$target" ;;
    *.ko.gz) gzip -dc "$source" >"$target" ;;
    *.ko) cp "$source" "$target" ;;
    *) die "unknown module format: $source" ;;
  esac
}

declare -A seen=()
load_order=()
# Depth-first over `depends`, so every module comes after the modules it needs.
resolve() {
  local name=${1//-/_} file dependency
  [ -n "${seen[$name]:-}" ] && return 0
  seen[$name]=1
  if ! file=$(module_file "$name"); then
    if grep -qE "/${name//_/[-_]}\.ko$" "$moddir/modules.builtin" 2>/dev/null; then
      return 0 # built into the kernel
    fi
    die "module $name is neither a module file nor built in"
  fi
  install_module "$file" "$name"
  for dependency in $(modinfo -F depends "$root/lib/modules/$name.ko" | tr ',' ' '); do
    resolve "$dependency"
  done
  load_order+=("$name")
}
for module in "${wanted_modules[@]}"; do
  resolve "$module"
done
printf '%s\n' "${load_order[@]}" >"$root/lib/modules/load-order"
log "modules: ${load_order[*]}"

cp "$work/busybox/bin/busybox" "$root/bin/busybox"

# The workload and the shared libraries it links (none if it is static).
if command -v strip >/dev/null; then
  strip -o "$root/bin/strata-workload" "$workload"
else
  cp "$workload" "$root/bin/strata-workload"
fi
chmod 755 "$root/bin/strata-workload"
while IFS= read -r library; do
  mkdir -p "$root$(dirname "$library")"
  cp -L "$library" "$root$library"
done < <(ldd "$workload" 2>/dev/null | grep -oE '/[^ ]+' || true)

echo strata-guest >"$root/etc/hostname"
# The console device must exist before /init runs; without root this fails and /init
# reopens its output on devtmpfs's console instead.
mknod -m 600 "$root/dev/console" c 5 1 2>/dev/null || true

cat >"$root/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
hostname strata-guest

say() { echo "strata-guest: $*"; }

while read -r module; do
  insmod "/lib/modules/$module.ko" || say "insmod $module failed"
done </lib/modules/load-order

PORT=${PORT:-}
STRATA_INSTANCE_ID=${STRATA_INSTANCE_ID:-}
for word in $(cat /proc/cmdline); do
  case "$word" in
    PORT=*) PORT=${word#PORT=} ;;
    STRATA_INSTANCE_ID=*) STRATA_INSTANCE_ID=${word#STRATA_INSTANCE_ID=} ;;
  esac
done
export PORT=${PORT:-8080} STRATA_INSTANCE_ID

ip link set lo up
tries=0
while [ ! -e /sys/class/net/eth0 ] && [ "$tries" -lt 100 ]; do
  sleep 0.1
  tries=$((tries + 1))
done
[ -e /sys/class/net/eth0 ] || say "no eth0 (virtio-net did not come up)"
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
ip route add default via 10.0.2.2

echo "STRATA-GUEST-READY port=$PORT instance=$STRATA_INSTANCE_ID"
/bin/strata-workload --port "$PORT" &
wait $!
say "strata-workload exited with status $?; powering off"
poweroff -f
INIT
chmod 755 "$root/init"

cp "$vmlinuz" "$work/vmlinuz"
(cd "$root" && find . -print0 | cpio --null --create --format=newc --owner=0:0 --quiet) |
  gzip -6 >"$work/initrd.img"

# Replace the outputs only when both are complete.
mv -f "$work/vmlinuz" "$outdir/vmlinuz"
mv -f "$work/initrd.img" "$outdir/initrd.img"
echo "$stamp" >"$outdir/stamp"
rm -rf "$work"
log "built $outdir/vmlinuz and $outdir/initrd.img ($(du -h "$outdir/initrd.img" | cut -f1))"
