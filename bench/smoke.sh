#!/usr/bin/env bash
# CI's benchmark step (deploy/test.sh runs it): the Strata vs etcd comparison in smoke mode,
# 8 clients, 3 s of writes and 2 leader kills per system; then heartbeat capacity with 200
# simulated agents, start latency with 2 process scale-ups (each about 10 s), fleet-scale
# state at 200 nodes and 2,000 instances, the autoscaling simulator on its built-in traces
# with the real ones cut short (a few seconds of computation, no cluster), and pool
# propagation over 3 tiers x 3 simulated servers with 3 s wrk runs through HAProxy with and
# without churn and through the reload approach (about 20 s), writes and heartbeats with plain
# HTTP against mutual TLS (8 clients, 200 agents), an EC2 scale-out to 10 against moto (clean
# and 10% throttled); as root, leader cuts in
# namespaces. It checks that the benchmarks still run end to end; it never judges a figure, so
# debug binaries (already built by the tests) do. The JSON reports are kept in
# target/bench-smoke.json and target/bench-<name>-smoke.json for the others (heartbeats,
# start-latency, fleet, autoscale, pools, tls, ec2, partition).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

if ! command -v etcd >/dev/null 2>&1; then
    echo "bench smoke: etcd is missing; run deploy/install-deps.d/bench.sh" >&2
    exit 1
fi

if ! command -v moto_server >/dev/null 2>&1; then
    echo "bench smoke: moto_server is missing; run deploy/install-deps.d/ec2.sh" >&2
    exit 1
fi

# Debian installs haproxy in /usr/sbin, which a non-root PATH may lack.
export PATH="$PATH:/usr/sbin"
for tool in haproxy wrk; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "bench smoke: $tool is missing; run deploy/install-deps.d/lb.sh" >&2
        exit 1
    fi
done

cargo build --quiet -p strata-controller -p strata-agent -p strata-bench
target="${CARGO_TARGET_DIR:-$repo/target}"
# The binaries: those just built, or STRATA_TEST_BIN_DIR's (as for the tests).
bin="${STRATA_TEST_BIN_DIR:-$target/debug}"
report="$target/bench-smoke.json"
"$bin/strata-bench" compare --smoke \
    --strata-bin "$bin/strata-controller" "$@" > "$report"
cat "$report" >&2
echo "bench smoke: report in $report" >&2

for bench in heartbeats start-latency fleet pools tls ec2; do
    report="$target/bench-$bench-smoke.json"
    "$bin/strata-bench" "$bench" --smoke \
        --strata-bin "$bin/strata-controller" > "$report"
    cat "$report" >&2
    echo "bench smoke: $bench report in $report" >&2
done

report="$target/bench-autoscale-smoke.json"
"$bin/strata-bench" autoscale --smoke > "$report"
echo "bench smoke: autoscale report in $report" >&2

# Leader cut off, not killed: needs root for network namespaces (CI runs as root).
if [ "$(id -u)" = 0 ]; then
    report="$target/bench-partition-smoke.json"
    "$bin/strata-bench" partition --cuts 2 \
        --strata-bin "$bin/strata-controller" > "$report"
    cat "$report" >&2
    echo "bench smoke: partition report in $report" >&2
else
    echo "bench smoke: skipped: partition needs root for network namespaces" >&2
fi
