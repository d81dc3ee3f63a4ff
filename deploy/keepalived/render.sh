#!/usr/bin/env bash
# Renders keepalived.conf for one LB host.
#   render.sh master|backup INTERFACE VIP/PREFIX CHECK_HOST:PORT [ROUTER_ID] [ADVERT_SECS]
# Writes the configuration to stdout; the check script is this directory's check-haproxy.sh.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
role="${1:?master or backup}"; interface="${2:?interface}"; vip="${3:?VIP/PREFIX}"
check="${4:?HOST:PORT of a frontend}"; router_id="${5:-51}"; advert="${6:-1}"
case "$role" in
  master) state=MASTER; priority=150 ;;
  backup) state=BACKUP; priority=100 ;;
  *) echo "render.sh: role must be master or backup, not $role" >&2; exit 2 ;;
esac
sed -e "s|@STATE@|$state|" -e "s|@PRIORITY@|$priority|" -e "s|@INTERFACE@|$interface|" \
    -e "s|@VIP@|$vip|" -e "s|@ROUTER_ID@|$router_id|" -e "s|@ADVERT@|$advert|" \
    -e "s|@CHECK_SCRIPT@|$here/check-haproxy.sh|" -e "s|@CHECK@|$check|" \
    "$here/keepalived.conf.in" | grep -v '^#'
