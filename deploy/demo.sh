#!/usr/bin/env bash
# The demo: installs what is missing, builds, starts a local 3-node control plane, two agents
# and an LB agent running HAProxy, applies the example web tier (strata-workload processes
# behind 127.0.0.1:8080) and shows the control plane placing, scaling and replacing instances
# while the load balancer's pool follows: a scale-out, a failed health check, a kill -9 of an
# instance under a request stream, and a leader failure; then a second tier that the
# autoscaler sizes under load through HAProxy, and an EC2 tier launched through aws-sdk-ec2
# against a moto server on loopback. Leaves everything running; stop it with
# deploy/cluster.sh stop (delete the tiers first to stop their instances).
#
# Each part of the demo is a function `demo_*`; the list at the end runs them in order. A new
# part is a new function and one more line in that list.
set -euo pipefail
cd "$(dirname "$0")/.."
ctl=target/debug/stratactl
frontend=http://127.0.0.1:8080

say() { printf '\n\033[1m%s\033[0m\n' "$*"; }
step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }

# Waits until the tier has at least WANT healthy instances.
wait_ready() {
  local tier="$1" want="$2" deadline=$((SECONDS + 60))
  until [ "$($ctl get instances --tier "$tier" -o json | grep -c '"health": "Healthy"')" -ge "$want" ]; do
    if [ $SECONDS -gt $deadline ]; then echo "tier $tier did not reach $want healthy instances" >&2; return 1; fi
    sleep 0.5
  done
}

# Waits until the tier's pool has exactly WANT ready servers and the frontend answers.
wait_pool() {
  local tier="$1" want="$2" deadline=$((SECONDS + 60))
  until [ "$($ctl get pool "$tier" -o json | grep -c '"state": "ready"')" -eq "$want" ] \
        && curl -fsS --max-time 1 -o /dev/null "$frontend/"; do
    if [ $SECONDS -gt $deadline ]; then echo "pool of $tier did not reach $want ready servers" >&2; return 1; fi
    sleep 0.5
  done
  sleep 1  # one heartbeat for the LB agent to report the version it applied
}

# N requests through the load balancer, counted by the instance that answered (every answer
# of strata-workload names it).
through_lb() {
  local n="$1" i
  for i in $(seq 1 "$n"); do
    curl -fsS --max-time 2 "$frontend/" | sed -n 's/.*"instance_id":"\([0-9a-f]\{8\}\).*/served by \1/p'
    echo
  done | grep . | sort | uniq -c
}

# A request stream through the load balancer in the background: one request every 20 ms
# until $stream_dir/stop exists; each outcome is a line in $stream_dir/ok or $stream_dir/failed.
start_stream() {
  stream_dir="$(mktemp -d)"
  (
    while [ ! -e "$stream_dir/stop" ]; do
      if curl -fsS --max-time 2 -o /dev/null "$frontend/"; then echo >> "$stream_dir/ok"; else echo >> "$stream_dir/failed"; fi
      sleep 0.02
    done
  ) 2>/dev/null &
  stream_pid=$!
}
stop_stream() {
  touch "$stream_dir/stop"
  wait "$stream_pid" || true
  local ok=0 failed=0
  [ ! -f "$stream_dir/ok" ] || ok=$(wc -l < "$stream_dir/ok")
  [ ! -f "$stream_dir/failed" ] || failed=$(wc -l < "$stream_dir/failed")
  say "request stream through $frontend: $ok ok, $failed failed"
  rm -rf "$stream_dir"
}

# Waits until no server of the tier's pool is on PORT.
wait_left_pool() {
  local tier="$1" port="$2" deadline=$((SECONDS + 30)) pool
  while pool=$($ctl get pool "$tier" -o json | tr -d '\n ') && [[ "$pool" == *"\"port\":$port,"* ]]; do
    if [ $SECONDS -gt $deadline ]; then echo "the server on port $port did not leave the pool of $tier" >&2; return 1; fi
    sleep 0.2
  done
}

# The pid of the instance on PORT: strata-workload says it in every answer.
pid_on_port() {
  curl -fsS --max-time 2 "http://127.0.0.1:$1/" | sed -n 's/.*"pid":\([0-9]*\).*/\1/p'
}
# The port of the first Running instance of the tier.
first_port() {
  $ctl get instances --tier "$1" -o json \
    | tr -d '\n ' | grep -o '"port":[0-9]*,"phase":"Running"' | sed -n '1s/"port":\([0-9]*\).*/\1/p'
}

demo_setup() {
  bash deploy/install-deps.sh
  cargo build --workspace --bins
  # The EC2 API on loopback, before the controllers, which then take it as their endpoint.
  deploy/cluster.sh moto || say "no moto server: the EC2 part is skipped"
  deploy/cluster.sh start 3
  deploy/cluster.sh agents 2
  deploy/cluster.sh lb 1
  eval "$(deploy/cluster.sh env)"
  step $ctl cluster status
  sleep 2
  step $ctl get nodes
}

demo_apply() {
  step $ctl apply -f deploy/examples/web.yaml
  wait_ready web 2
  step $ctl get instances --tier web
  wait_pool web 2
  say "HAProxy on 127.0.0.1:8080 spreads requests over the pool (curl x6)"
  through_lb 6
  step $ctl get pool web
}

demo_scale_out() {
  step $ctl scale tier web --replicas 4
  wait_ready web 4
  wait_pool web 4
  step $ctl get instances --tier web
  say "the pool followed the scale-out without a reload (curl x12)"
  through_lb 12
  step $ctl get pool web
}

demo_failed_health_check() {
  local port
  port=$(first_port web)
  say "the instance on port $port fails its health check; the control plane replaces it"
  step curl -fsS -X POST "http://127.0.0.1:$port/fail"
  echo
  sleep 4
  wait_ready web 4
  wait_pool web 4
  step $ctl get instances --tier web
  step $ctl get pool web
}

demo_kill_instance() {
  local port pid
  port=$(first_port web)
  pid=$(pid_on_port "$port")
  say "kill -9 of the instance on port $port (pid $pid) under a request stream through HAProxy"
  start_stream
  sleep 1
  step kill -9 "$pid"
  local killed=$SECONDS
  wait_left_pool web "$port"
  say "the killed instance left the pool within $((SECONDS - killed))s; a replacement starts"
  wait_ready web 4
  wait_pool web 4
  sleep 1
  stop_stream
  say "the replacement joined the pool; HAProxy retried the requests it had sent to the dead one"
  step $ctl get pool web
  step $ctl get events --object tier/web
}

demo_leader_failure() {
  local leader
  leader=$($ctl cluster status -o json | sed -n 's/.*"leader_id": *\([0-9]*\).*/\1/p')
  say "kill -9 of the leader (node $leader); the API keeps answering through the others"
  kill -9 "$(cat .data/node-"$leader".pid)"
  step $ctl scale tier web --replicas 3
  step $ctl cluster status
  deploy/cluster.sh start 3 >/dev/null
  wait_ready web 3
  wait_pool web 3
  step $ctl describe tier web
  demo_restarted_node=$leader
}

# Autoscaling: deploy/examples/shop.yaml tracks 50% CPU. wrk sends CPU-heavy requests
# (`?work_ms=10`) through HAProxy on 127.0.0.1:8081; the tier scales out within seconds, and
# back in to its min once the load is gone and its 30 s stabilization window has passed. Every
# decision is printed with what each policy saw.
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
demo_autoscaling() {
  local deadline wrk_pid
  printf '\n\033[1m== Autoscaling ==\033[0m\n'
  step $ctl apply -f deploy/examples/shop.yaml
  wait_ready shop 2
  deadline=$((SECONDS + 60))
  until curl -fsS --max-time 1 -o /dev/null http://127.0.0.1:8081/; do
    if [ $SECONDS -gt $deadline ]; then echo "HAProxy does not serve shop on 127.0.0.1:8081" >&2; exit 1; fi
    sleep 0.5
  done
  say "wrk: 2 connections of 10 ms CPU requests through HAProxy for 30 s"
  wrk -t1 -c2 -d30s 'http://127.0.0.1:8081/?work_ms=10' > .data/wrk-shop.txt 2>&1 &
  wrk_pid=$!
  watch_shop 30
  wait "$wrk_pid" || true
  cat .data/wrk-shop.txt   # "Non-2xx or 3xx responses" or "Socket errors" would show failed requests
  step $ctl describe tier shop
  say "the load stopped; the tier scales back in once its 30 s window has passed"
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
  curl -s --cacert .data/pki/ca.pem --cert .data/pki/client.pem --key .data/pki/client-key.pem \
    https://127.0.0.1:7001/metrics | grep strata_autoscaler   # mutual TLS: stratactl's certificate
MSG
}

# How many of the tier's instances are Running.
running_count() {
  $ctl get instances --tier "$1" -o json | grep -c '"phase": "Running"'
}

demo_ec2() {
  local subnets deadline
  [ -s .data/ec2-subnets ] || return 0
  printf '\n\033[1m== EC2 tier (moto on 127.0.0.1:5000) ==\033[0m\n'
  read -r -a subnets < .data/ec2-subnets
  # deploy/examples/ec2.yaml with moto's subnets and one of its AMIs, without a target group.
  sed -e "s/subnet-0aaaaaaaaaaaaaaaa, subnet-0bbbbbbbbbbbbbbbb/${subnets[0]}, ${subnets[1]}/" \
      -e 's/ami-0123456789abcdef0/ami-12c6146b/' -e '/security_groups/d' \
      -e '/^load_balancer:/,$d' -e 's/min: 2/min: 0/' \
      deploy/examples/ec2.yaml > .data/ec2-demo.yaml
  step $ctl apply -f .data/ec2-demo.yaml
  step $ctl scale tier ec2-web --replicas 4
  deadline=$((SECONDS + 60))
  until [ "$(running_count ec2-web)" -ge 4 ]; do
    if [ $SECONDS -gt $deadline ]; then echo "ec2-web did not reach 4 Running instances" >&2; exit 1; fi
    sleep 0.5
  done
  say "four EC2 instances, spread over the two subnets' zones, each recorded before its launch"
  step $ctl get instances --tier ec2-web
  step $ctl scale tier ec2-web --replicas 1
  deadline=$((SECONDS + 60))
  until [ "$($ctl get instances --tier ec2-web -o json | grep -c '"phase": "Terminated"')" -ge 3 ]; do
    if [ $SECONDS -gt $deadline ]; then echo "ec2-web did not scale in to 1" >&2; exit 1; fi
    sleep 0.5
  done
  step $ctl get events --object tier/ec2-web
}

demo_done() {
  cat <<MSG

Everything is running${demo_restarted_node:+ (node $demo_restarted_node was restarted and rejoined)}. Try:
  eval "\$(deploy/cluster.sh env)"
  target/debug/stratactl get nodes
  target/debug/stratactl get events --object tier/web
  target/debug/stratactl get pool web          # what HAProxy on 127.0.0.1:8080 serves
  curl $frontend/                  # through the load balancer
  target/debug/stratactl delete tier web      # stops its instances
  target/debug/stratactl get instances --tier ec2-web   # the EC2 tier's instances (in moto)
Stop it with: deploy/cluster.sh stop
MSG
}

demo_setup
demo_apply
demo_scale_out
demo_failed_health_check
demo_kill_instance
demo_leader_failure
demo_autoscaling
demo_ec2
demo_done
