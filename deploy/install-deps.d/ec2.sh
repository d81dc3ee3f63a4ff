#!/usr/bin/env bash
# EC2 provider tests: a moto server (the EC2 API on loopback), from PyPI with pip.
# Idempotent: nothing is installed when `moto_server` already runs. The tests start their own
# server on a free loopback port (`strata_tests::Moto`); nothing here starts one.
set -euo pipefail

if command -v moto_server >/dev/null 2>&1 && moto_server --help >/dev/null 2>&1; then
    echo "ec2 deps: moto_server present"
    exit 0
fi

PYTHON="${PYTHON:-python3}"
if ! command -v "$PYTHON" >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
    echo "ec2 deps: installing python3 and pip"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends python3 python3-pip python3-venv >/dev/null
fi

# Debian's system Python refuses `pip install` outside a venv (PEP 668); a venv under
# /opt keeps moto apart from the system's packages either way.
if "$PYTHON" -m pip --version >/dev/null 2>&1 && ! "$PYTHON" -m pip install --dry-run --quiet pip >/dev/null 2>&1; then
    VENV=/opt/strata-moto
    [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
    "$VENV/bin/pip" install --quiet 'moto[server]>=5,<6'
    ln -sf "$VENV/bin/moto_server" /usr/local/bin/moto_server
else
    "$PYTHON" -m pip install --quiet 'moto[server]>=5,<6'
fi
moto_server --help >/dev/null
echo "ec2 deps: moto_server installed"
