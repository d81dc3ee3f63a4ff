#!/usr/bin/env bash
# Load-balancer role and its tests: HAProxy (driven by `strata-agent --lb haproxy`),
# keepalived (the LB1/LB2 virtual IP), wrk (the load generator of the pool benchmarks and the
# demo). Idempotent. Debian starts the haproxy and keepalived services on install where it can;
# the agent runs its own HAProxy and the tests their own keepalived, so stop and disable them.
set -euo pipefail

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

packages=(haproxy keepalived wrk)
missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep "install ok installed" >/dev/null || missing+=("$package")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "lb deps: installing ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  echo "lb deps: all present"
fi

for service in haproxy keepalived; do
  if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    $SUDO systemctl disable --now "$service" >/dev/null 2>&1 || true
  elif [ -x "/etc/init.d/$service" ]; then
    $SUDO "/etc/init.d/$service" stop >/dev/null 2>&1 || true
  fi
done
