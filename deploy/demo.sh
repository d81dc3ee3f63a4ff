#!/usr/bin/env bash
# The demo: installs what is missing, builds, starts a local 3-node control plane, two agents
# and an LB agent running HAProxy, applies the example web tier (strata-workload processes
# behind 127.0.0.1:8080) and shows the control plane placing, scaling and replacing instances
# while the load balancer's pool follows, also through a leader failure. Leaves everything
# running; stop it with deploy/cluster.sh stop (delete the tiers first to stop their instances).
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/install-deps.sh
cargo build --workspace --bins
deploy/cluster.sh start 3
deploy/cluster.sh agents 2
deploy/cluster.sh lb 1
eval "$(deploy/cluster.sh env)"
ctl=target/debug/stratactl

step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }
wait_ready() {
  local tier="$1" want="$2" deadline=$((SECONDS + 60))
  until [ "$($ctl get instances --tier "$tier" -o json | grep -c '"health": "Healthy"')" -ge "$want" ]; do
    if [ $SECONDS -gt $deadline ]; then echo "tier $tier did not reach $want healthy instances" >&2; return 1; fi
    sleep 0.5
  done
}

# Every answer of strata-workload names the instance that served it.
through_lb() {
  local n="$1" i
  for i in $(seq 1 "$n"); do
    curl -fsS --max-time 2 http://127.0.0.1:8080/ | sed -n 's/.*"instance_id":"\([0-9a-f]\{8\}\).*/served by \1/p'
  done | sort | uniq -c
}
wait_pool() {
  local tier="$1" want="$2" deadline=$((SECONDS + 60))
  until [ "$($ctl get pool "$tier" -o json | grep -c '"state": "ready"')" -eq "$want" ] \
        && curl -fsS --max-time 1 -o /dev/null http://127.0.0.1:8080/; do
    if [ $SECONDS -gt $deadline ]; then echo "pool of $tier did not reach $want ready servers" >&2; return 1; fi
    sleep 0.5
  done
  sleep 1  # one heartbeat for the LB agent to report the version it applied
}

step $ctl cluster status
sleep 2
step $ctl get nodes
step $ctl apply -f deploy/examples/web.yaml
wait_ready web 2
step $ctl get instances --tier web
wait_pool web 2
printf '\n\033[1mHAProxy on 127.0.0.1:8080 spreads requests over the pool (curl x6)\033[0m\n'
through_lb 6
step $ctl get pool web
step $ctl scale tier web --replicas 4
wait_ready web 4
wait_pool web 4
step $ctl get instances --tier web
printf '\n\033[1mthe pool followed the scale-out without a reload (curl x12)\033[0m\n'
through_lb 12
step $ctl get pool web

port=$($ctl get instances --tier web -o json | sed -n 's/.*"port": *\([0-9]*\).*/\1/p' | sed -n 1p)
printf '\n\033[1mthe instance on port %s fails its health check; the control plane replaces it\033[0m\n' "$port"
step curl -fsS -X POST "http://127.0.0.1:$port/fail"
sleep 4
wait_ready web 4
wait_pool web 4
step $ctl get instances --tier web
step $ctl get pool web

leader=$($ctl cluster status -o json | sed -n 's/.*"leader_id": *\([0-9]*\).*/\1/p')
printf '\n\033[1mkill -9 of the leader (node %s); the API keeps answering through the others\033[0m\n' "$leader"
kill -9 "$(cat .data/node-"$leader".pid)"
step $ctl scale tier web --replicas 3
step $ctl cluster status
deploy/cluster.sh start 3 >/dev/null
wait_ready web 3
step $ctl describe tier web
cat <<MSG

Everything is running (node $leader was restarted and rejoined). Try:
  eval "\$(deploy/cluster.sh env)"
  target/debug/stratactl get nodes
  target/debug/stratactl get events --object tier/web
  target/debug/stratactl get pool web          # what HAProxy on 127.0.0.1:8080 serves
  curl http://127.0.0.1:8080/                  # through the load balancer
  target/debug/stratactl delete tier web      # stops its instances
Stop it with: deploy/cluster.sh stop
MSG

# ---------------------------------------------------------------------------------------------
# Autoscaling: deploy/examples/shop.yaml tracks 50% CPU. wrk sends CPU-heavy requests
# (`?work_ms=10`) through HAProxy on 127.0.0.1:8081; the tier scales out within seconds, and
# back in to its min once the load is gone and its 30 s stabilization window has passed. Every
# decision is printed with what each policy saw.
# ---------------------------------------------------------------------------------------------
shop_desired() {
  $ctl get tier shop -o json | sed -n 's/^  *"desired": *\([0-9]*\).*/\1/p' | tail -1
}
watch_shop() {
  local seconds="$1" end=$((SECONDS + $1))
  while [ $SECONDS -lt "$end" ]; do
    printf '  t+%2ss  desired %s, %s healthy\n' "$((seconds - end + SECONDS))" "$(shop_desired)" \
      "$($ctl get instances --tier shop -o json | grep -c '"health": "Healthy"')"
    sleep 3
  done
}
printf '\n\033[1m== Autoscaling ==\033[0m\n'
step $ctl apply -f deploy/examples/shop.yaml
wait_ready shop 2
deadline=$((SECONDS + 60))
until curl -fsS --max-time 1 -o /dev/null http://127.0.0.1:8081/; do
  if [ $SECONDS -gt $deadline ]; then echo "HAProxy does not serve shop on 127.0.0.1:8081" >&2; exit 1; fi
  sleep 0.5
done
printf '\n\033[1mwrk: 2 connections of 10 ms CPU requests through HAProxy for 30 s\033[0m\n'
wrk -t1 -c2 -d30s 'http://127.0.0.1:8081/?work_ms=10' > .data/wrk-shop.txt 2>&1 &
wrk_pid=$!
watch_shop 30
wait "$wrk_pid" || true
cat .data/wrk-shop.txt   # "Non-2xx or 3xx responses" or "Socket errors" would show failed requests
step $ctl describe tier shop
printf '\n\033[1mthe load stopped; the tier scales back in once its 30 s window has passed\033[0m\n'
deadline=$((SECONDS + 120))
until [ "$(shop_desired)" = 2 ]; do
  if [ $SECONDS -gt $deadline ]; then echo "shop did not scale back in to 2" >&2; exit 1; fi
  sleep 2
done
wait_ready shop 2
step $ctl get events --object tier/shop
cat <<MSG

The autoscaler sized tier shop by itself. Try:
  wrk -t1 -c2 -d60s 'http://127.0.0.1:8081/?work_ms=10'   # load through HAProxy
  target/debug/stratactl describe tier shop      # recent decisions in plain words
  target/debug/stratactl scale tier shop 3       # a count by hand pauses its autoscaler
  target/debug/stratactl scale tier shop --auto  # and this hands it back
  curl -s http://127.0.0.1:7001/metrics | grep strata_autoscaler
MSG
