#!/usr/bin/env bash
# The demo: installs what is missing, builds, starts a local 3-node control plane, applies the
# example tiers and shows what the cluster holds. Leaves the cluster running; stop it with
# deploy/cluster.sh stop.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/install-deps.sh
cargo build --workspace --bins
deploy/cluster.sh start 3
eval "$(deploy/cluster.sh env)"
ctl=target/debug/stratactl

step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }
step $ctl cluster status
step $ctl apply -f deploy/examples/web.yaml
step $ctl apply -f deploy/examples/api.yaml
step $ctl get tiers
step $ctl scale tier web --replicas 4
step $ctl describe tier web

leader=$($ctl cluster status -o json | sed -n 's/.*"leader_id": *\([0-9]*\).*/\1/p')
printf '\n\033[1mkill -9 of the leader (node %s); the API keeps answering through the others\033[0m\n' "$leader"
kill -9 "$(cat .data/node-"$leader".pid)"
step $ctl scale tier web --replicas 5
step $ctl cluster status
deploy/cluster.sh start 3 >/dev/null
cat <<MSG

The cluster is running (node $leader was restarted and rejoined). Try:
  eval "\$(deploy/cluster.sh env)"
  target/debug/stratactl get tiers -o yaml
Stop it with: deploy/cluster.sh stop
MSG
