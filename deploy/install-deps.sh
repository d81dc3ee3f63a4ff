#!/usr/bin/env bash
# Installs everything Strata's build, demo and tests need on a Debian machine. Idempotent: a
# second run installs nothing. Pieces add their own needs in deploy/install-deps.d/*.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

# Debian packages every part needs.
packages=(ca-certificates curl git pkg-config build-essential iproute2 procps openssl)
missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep "install ok installed" >/dev/null || missing+=("$package")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "install-deps: installing ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
fi

# The Rust toolchain comes from rustup; install it only where it is missing.
if ! command -v cargo >/dev/null 2>&1; then
  if [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
  else
    echo "install-deps: cargo not found; install Rust with rustup first (https://rustup.rs)" >&2
    exit 1
  fi
fi

# The workspace's rust-version (what the AWS SDK crates need): update an older toolchain.
need_rust="1.94.1"
have_rust="$(rustc --version | awk '{print $2}')"
if [ "$(printf '%s\n%s\n' "$need_rust" "$have_rust" | sort -V | head -n1)" != "$need_rust" ]; then
  if command -v rustup >/dev/null 2>&1; then
    echo "install-deps: rustc $have_rust is older than $need_rust; rustup update stable"
    rustup update stable
  else
    echo "install-deps: rustc $have_rust is older than $need_rust; update Rust (https://rustup.rs)" >&2
    exit 1
  fi
fi

# cargo-nextest runs the test suite; fall back to building it from crates.io.
if ! cargo nextest --version >/dev/null 2>&1; then
  echo "install-deps: installing cargo-nextest"
  cargo install --locked cargo-nextest
fi

for part in deploy/install-deps.d/*.sh; do
  [ -e "$part" ] || continue
  bash "$part"
done
