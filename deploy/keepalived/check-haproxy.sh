#!/usr/bin/env bash
# keepalived's check: succeeds while the local HAProxy accepts connections on HOST:PORT (a
# frontend it serves), fails within a second otherwise. keepalived gives the virtual IP up
# after `fall` failures in a row.
set -u
target="${1:?usage: check-haproxy.sh HOST:PORT}"
host="${target%:*}"
port="${target##*:}"
exec timeout 1 bash -c "exec 3<>/dev/tcp/${host}/${port}" 2>/dev/null
