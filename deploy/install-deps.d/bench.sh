#!/usr/bin/env bash
# Dependencies of bench/: etcd 3.4 (Debian's etcd-server), the system Strata is compared with.
# Idempotent. The benchmark starts its own etcd members on free loopback ports, so a system
# etcd service left running by the package would only hold port 2379/2380 and CPU: stop and
# disable it.
set -euo pipefail

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

if ! command -v etcd >/dev/null 2>&1; then
    echo "install-deps: installing etcd-server"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq etcd-server >/dev/null
fi

if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    $SUDO systemctl disable --now etcd >/dev/null 2>&1 || true
elif [ -x /etc/init.d/etcd ]; then
    $SUDO /etc/init.d/etcd stop >/dev/null 2>&1 || true
    $SUDO update-rc.d etcd disable >/dev/null 2>&1 || true
fi

etcd --version | sed -n 1p
