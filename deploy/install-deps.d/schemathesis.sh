#!/usr/bin/env bash
# The API fuzzer (deploy/schemathesis.sh): schemathesis from PyPI, pinned, in its own venv.
# Idempotent: nothing is installed when the pinned version is already there.
set -euo pipefail

VERSION=4.32.5
VENV=/opt/strata-schemathesis
if [ -x "$VENV/bin/schemathesis" ] && "$VENV/bin/schemathesis" --version 2>/dev/null | grep -q "version $VERSION\$"; then
    echo "schemathesis deps: schemathesis $VERSION present"
    exit 0
fi

PYTHON="${PYTHON:-python3}"
if ! command -v "$PYTHON" >/dev/null 2>&1 || ! "$PYTHON" -m venv --help >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
    echo "schemathesis deps: installing python3 and venv"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends python3 python3-pip python3-venv >/dev/null
fi

# A venv keeps schemathesis and its pinned dependencies apart from the system's Python (and
# from moto's venv), and works where pip refuses system installs (PEP 668).
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install --quiet "schemathesis==$VERSION"
"$VENV/bin/schemathesis" --version
