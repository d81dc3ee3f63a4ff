#!/usr/bin/env bash
# Installs what the agent (its load-balancer role included), the guest image build
# (deploy/build-guest-image.sh) and the agent's tests need on a Debian host. Idempotent: it only
# calls apt-get when a package is missing, and refreshes the package lists at most once per run.
set -euo pipefail

packages=(
  qemu-system-x86   # qemu-system-x86_64 for the qemu driver
  cpio              # initramfs archive (newc)
  gzip              # initramfs compression
  busybox-static    # the guest's userland
  xz-utils          # Debian kernel modules may be .ko.xz
  zstd              # ... or .ko.zst
  kmod              # modinfo, to order module loading by dependency
  binutils          # strip, to keep the guest's copy of strata-workload small
  iproute2          # ip, for network-namespace test hosts
  procps            # ps, to look for stray instance processes when debugging
  haproxy           # the load-balancer role (--lb haproxy) and its tests
  wrk               # load generator for the load-balancer tests and benchmarks
)

missing=()
for package in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep "install ok installed" >/dev/null; then
    missing+=("$package")
  fi
done

if [ "${#missing[@]}" -eq 0 ]; then
  echo "agent deps: all present"
  exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
  sudo=sudo
else
  sudo=
fi

echo "agent deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
