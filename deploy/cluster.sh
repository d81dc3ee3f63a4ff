#!/usr/bin/env bash
# A local Strata control plane on one machine, for the quickstart and the demo.
#
#   deploy/cluster.sh start [N]   start N controllers (1, 3 or 5; default 3) on 127.0.0.1:7001..
#   deploy/cluster.sh agents [N]  start N agents (default 2), nodes host-1..host-N on this machine
#   deploy/cluster.sh lb [N]      start N LB agents (default 1), nodes lb-1..lb-N, each running
#                                 its own HAProxy that serves every tier's load_balancer.listen
#   deploy/cluster.sh moto        start a moto server (the EC2 API, deploy/install-deps.d/ec2.sh) on
#                                 127.0.0.1:5000 with a VPC and two subnets; controllers started
#                                 afterwards launch EC2 tiers there (--ec2-endpoint)
#   deploy/cluster.sh stop        stop agents, controllers and moto (SIGTERM; instances keep running
#                                 until their tiers are deleted or the agents come back)
#   deploy/cluster.sh status      show the cluster as node 1 sees it
#   deploy/cluster.sh env         print the exports that point stratactl at this cluster
#
# State lives in STRATA_HOME (default .data/ in the checkout): one data dir and log per node,
# the tokens in STRATA_HOME/env (for stratactl) and one file each in STRATA_HOME/secrets (0600),
# which the controllers and agents read (--*-file): no secret is in their argv or environment,
# where any process of the same user (an instance, too) could read it in /proc. Binaries come from target/debug unless STRATA_BIN is set.
#
# Every link is mutual TLS: deploy/dev-ca.sh makes a development CA in STRATA_HOME/pki with
# certificates for the controllers, the agents and stratactl (`env` exports the latter's).
# STRATA_TLS=0 runs plain HTTP instead (--insecure-http).
set -euo pipefail
cd "$(dirname "$0")/.."
home="${STRATA_HOME:-$PWD/.data}"
bin="${STRATA_BIN:-$PWD/target/debug}"
base_port="${STRATA_BASE_PORT:-7001}"
moto_port="${STRATA_MOTO_PORT:-5000}"
tls="${STRATA_TLS:-1}"
pki="$home/pki"
scheme=https
[ "$tls" = 1 ] || scheme=http

# A pid counts as running unless it is gone or a zombie (a killed node whose parent has not
# reaped it yet still answers kill -0).
alive() {
  local state
  state=$(ps -o stat= -p "$1" 2>/dev/null) && [ -n "$state" ] && [[ "$state" != Z* ]]
}

ensure_env() {
  mkdir -p "$home"
  if [ ! -f "$home/env" ]; then
    umask 077
    {
      echo "export STRATA_TOKEN=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
      echo "export STRATA_VIEWER_TOKEN=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
      echo "export STRATA_CLUSTER_SECRET=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
      echo "export STRATA_JOIN_TOKEN=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
    } > "$home/env"
  fi
  # shellcheck disable=SC1091
  . "$home/env"
  mkdir -p "$home/secrets"
  chmod 700 "$home/secrets"
  if [ "$tls" = 1 ]; then
    bash deploy/dev-ca.sh "$pki" controller agent client
  fi
  (
    umask 077
    echo "$STRATA_TOKEN" > "$home/secrets/admin-token"
    echo "$STRATA_VIEWER_TOKEN" > "$home/secrets/viewer-token"
    echo "$STRATA_CLUSTER_SECRET" > "$home/secrets/cluster-secret"
    echo "$STRATA_JOIN_TOKEN" > "$home/secrets/join-token"
  )
}

# Runs a command without the tokens (and stratactl's TLS settings) in its environment.
# `exec`: started in the background (`clean ... &`), the function's subshell becomes the
# program, so $! is the program's pid and `stop` reaches it.
clean() {
  exec env -u STRATA_TOKEN -u STRATA_VIEWER_TOKEN -u STRATA_CLUSTER_SECRET -u STRATA_JOIN_TOKEN \
    -u STRATA_ADMIN_TOKEN -u STRATA_CA_CERT -u STRATA_TLS_CERT -u STRATA_TLS_KEY "$@"
}

# The TLS flags of a controller, and of an agent.
controller_tls() {
  if [ "$tls" = 1 ]; then
    echo "--tls-cert $pki/controller.pem --tls-key $pki/controller-key.pem --client-ca $pki/ca.pem"
  else
    echo "--insecure-http"
  fi
}
agent_tls() {
  if [ "$tls" = 1 ]; then
    echo "--ca-cert $pki/ca.pem --tls-cert $pki/agent.pem --tls-key $pki/agent-key.pem"
  fi
}

# curl with the admin token and, under TLS, stratactl's client certificate.
api() {
  local path="$1"
  shift
  if [ "$tls" = 1 ]; then
    set -- --cacert "$pki/ca.pem" --cert "$pki/client.pem" --key "$pki/client-key.pem" "$@"
  fi
  curl -fsS -H "Authorization: Bearer $STRATA_TOKEN" "$@" "$scheme://127.0.0.1:$base_port$path"
}

servers() {
  local n="$1" list=""
  for i in $(seq 1 "$n"); do list="$list${list:+,}127.0.0.1:$((base_port + i - 1))"; done
  echo "$list"
}

start() {
  local n="${1:-3}"
  ensure_env
  [ -x "$bin/strata-controller" ] || cargo build -p strata-controller -p strata-api
  local peers=""
  for i in $(seq 1 "$n"); do peers="$peers${peers:+,}$i=127.0.0.1:$((base_port + i - 1))"; done
  echo "$n" > "$home/nodes"
  for i in $(seq 1 "$n"); do
    if [ -f "$home/node-$i.pid" ] && alive "$(cat "$home/node-$i.pid")"; then
      echo "node $i already running (pid $(cat "$home/node-$i.pid"))"
      continue
    fi
    # With `moto` started first: EC2 tiers go to it, with the credentials moto accepts
    # (through the standard AWS chain, as against real AWS).
    local ec2=()
    if [ -f "$home/ec2-endpoint" ]; then
      ec2=(env AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_EC2_METADATA_DISABLED=true
           STRATA_EC2_ENDPOINT="$(cat "$home/ec2-endpoint")")
    fi
    clean nohup "${ec2[@]}" "$bin/strata-controller" --node-id "$i" --listen "127.0.0.1:$((base_port + i - 1))" \
      --data-dir "$home/node-$i" --peers "$peers" \
      --admin-token-file "$home/secrets/admin-token" \
      --viewer-token-file "$home/secrets/viewer-token" \
      --cluster-secret-file "$home/secrets/cluster-secret" \
      --join-token-file "$home/secrets/join-token" $(controller_tls) \
      >> "$home/node-$i.log" 2>&1 &
    echo $! > "$home/node-$i.pid"
    echo "node $i: pid $!, $scheme://127.0.0.1:$((base_port + i - 1)), log $home/node-$i.log"
  done
  local deadline=$((SECONDS + 30))
  until api /v1/cluster 2>/dev/null | grep '"leader_id":[0-9]' >/dev/null; do
    if [ $SECONDS -gt $deadline ]; then echo "no leader after 30s; see $home/node-*.log" >&2; exit 1; fi
    sleep 0.2
  done
  echo "cluster ready; point stratactl at it with:  eval \"\$(deploy/cluster.sh env)\""
}

agents() {
  local n="${1:-2}" nodes
  ensure_env
  nodes="$(cat "$home/nodes" 2>/dev/null || echo 3)"
  [ -x "$bin/strata-agent" ] || cargo build -p strata-agent
  for i in $(seq 1 "$n"); do
    if [ -f "$home/agent-$i.pid" ] && alive "$(cat "$home/agent-$i.pid")"; then
      echo "agent host-$i already running (pid $(cat "$home/agent-$i.pid"))"
      continue
    fi
    # PATH carries the build dir so tiers can name strata-workload without a path.
    PATH="$bin:$PATH" clean nohup "$bin/strata-agent" --node-id "host-$i" \
      --controllers "$(servers "$nodes")" --join-token-file "$home/secrets/join-token" \
      --data-dir "$home/agent-$i" --zone "zone-$(( (i - 1) % 2 + 1 ))" --labels "disk=ssd" \
      --cpu 2 --memory-mb 2048 --heartbeat-interval 1s $(agent_tls) \
      >> "$home/agent-$i.log" 2>&1 &
    echo $! > "$home/agent-$i.pid"
    echo "agent host-$i: pid $!, log $home/agent-$i.log"
  done
}

balancers() {
  local n="${1:-1}" nodes
  ensure_env
  nodes="$(cat "$home/nodes" 2>/dev/null || echo 3)"
  [ -x "$bin/strata-agent" ] || cargo build -p strata-agent
  for i in $(seq 1 "$n"); do
    if [ -f "$home/lb-$i.pid" ] && alive "$(cat "$home/lb-$i.pid")"; then
      echo "LB agent lb-$i already running (pid $(cat "$home/lb-$i.pid"))"
      continue
    fi
    clean nohup "$bin/strata-agent" --node-id "lb-$i" --lb haproxy \
      --controllers "$(servers "$nodes")" --join-token-file "$home/secrets/join-token" \
      --data-dir "$home/lb-$i" --heartbeat-interval 1s $(agent_tls) \
      >> "$home/lb-$i.log" 2>&1 &
    echo $! > "$home/lb-$i.pid"
    echo "LB agent lb-$i: pid $!, log $home/lb-$i.log"
  done
}

# moto_server on 127.0.0.1:$moto_port, a VPC and a subnet in each of two zones (their ids in
# $home/ec2-subnets), and the endpoint in $home/ec2-endpoint for controllers started next.
# moto answers the EC2 Query API without checking signatures, so curl creates them.
moto() {
  ensure_env
  if ! command -v moto_server >/dev/null 2>&1; then
    echo "moto_server not found; install it with deploy/install-deps.d/ec2.sh" >&2
    return 1
  fi
  local endpoint="http://127.0.0.1:$moto_port" deadline=$((SECONDS + 30)) vpc subnets="" zone n=0
  if [ -f "$home/moto.pid" ] && alive "$(cat "$home/moto.pid")" && [ -s "$home/ec2-subnets" ]; then
    echo "moto already running (pid $(cat "$home/moto.pid")), subnets $(cat "$home/ec2-subnets")"
    return 0
  fi
  clean nohup moto_server -H 127.0.0.1 -p "$moto_port" >> "$home/moto.log" 2>&1 &
  echo $! > "$home/moto.pid"
  ec2_call() {
    curl -fsS "$endpoint/?Version=2016-11-15&$1" \
      -H "Authorization: AWS4-HMAC-SHA256 Credential=testing/20260101/us-east-1/ec2/aws4_request, SignedHeaders=host, Signature=0"
  }
  until ec2_call "Action=DescribeVpcs" >/dev/null 2>&1; do
    if [ $SECONDS -gt $deadline ]; then echo "moto_server did not answer on $endpoint; see $home/moto.log" >&2; return 1; fi
    sleep 0.2
  done
  vpc=$(ec2_call "Action=CreateVpc&CidrBlock=10.40.0.0/16" | sed -n 's/.*<vpcId>\([^<]*\)<.*/\1/p')
  for zone in us-east-1a us-east-1b; do
    subnets="$subnets${subnets:+ }$(ec2_call "Action=CreateSubnet&VpcId=$vpc&CidrBlock=10.40.$n.0/24&AvailabilityZone=$zone" \
      | sed -n 's/.*<subnetId>\([^<]*\)<.*/\1/p')"
    n=$((n + 1))
  done
  echo "$subnets" > "$home/ec2-subnets"
  echo "$endpoint" > "$home/ec2-endpoint"
  echo "moto: pid $(cat "$home/moto.pid"), $endpoint, VPC $vpc, subnets $subnets"
}

# SIGTERM to every process, then waits (up to 30 s) until they have exited: agents stop their
# instances and controllers close their databases on the way out.
stop() {
  local pids=() pidfile pid deadline=$((SECONDS + 30))
  for pidfile in "$home"/lb-*.pid "$home"/agent-*.pid "$home"/node-*.pid "$home"/moto.pid; do
    [ -e "$pidfile" ] || continue
    pid="$(cat "$pidfile")"
    kill "$pid" 2>/dev/null && pids+=("$pid")
    rm -f "$pidfile"
  done
  for pid in "${pids[@]}"; do
    # A zombie has exited (its parent may be gone and nobody reaps it): not running.
    while [ -n "$(ps -o stat= -p "$pid" 2>/dev/null | grep -v '^Z')" ]; do
      if [ $SECONDS -gt $deadline ]; then
        echo "process $pid did not exit within 30 s of SIGTERM" >&2
        return 1
      fi
      sleep 0.1
    done
  done
  # moto keeps its state in memory: the next `moto` makes a new VPC.
  rm -f "$home/ec2-endpoint" "$home/ec2-subnets"
  echo "stopped"
}

case "${1:-}" in
  start) start "${2:-3}" ;;
  agents) agents "${2:-2}" ;;
  lb) balancers "${2:-1}" ;;
  moto) moto ;;
  stop) stop ;;
  status)
    ensure_env
    api /v1/cluster; echo ;;
  env)
    ensure_env
    cat "$home/env"
    echo "export STRATA_SERVER=$(servers "$(cat "$home/nodes" 2>/dev/null || echo 3)")"
    if [ "$tls" = 1 ]; then
      echo "export STRATA_CA_CERT=$pki/ca.pem STRATA_TLS_CERT=$pki/client.pem STRATA_TLS_KEY=$pki/client-key.pem"
    fi ;;
  *) sed -n '2,24p' "$0"; exit 2 ;;
esac
