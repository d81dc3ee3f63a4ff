#!/usr/bin/env bash
# CI's benchmark step (deploy/test.sh runs it): the Strata vs etcd comparison in smoke mode,
# 8 clients, 3 s of writes and 2 leader kills per system; then heartbeat capacity with 200
# simulated agents and start latency with 2 process scale-ups (each about 10 s), and the
# autoscaling simulator on its built-in traces with the real ones cut short (a few seconds of
# computation, no cluster). It checks that
# the benchmarks still run end to end; it never judges a figure, so debug binaries (already
# built by the tests) do. The JSON reports are kept in target/bench-smoke.json,
# target/bench-heartbeats-smoke.json, target/bench-start-latency-smoke.json and
# target/bench-autoscale-smoke.json.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

if ! command -v etcd >/dev/null 2>&1; then
    echo "bench smoke: etcd is missing; run deploy/install-deps.d/bench.sh" >&2
    exit 1
fi

cargo build --quiet -p strata-controller -p strata-agent -p strata-bench
target="${CARGO_TARGET_DIR:-$repo/target}"
report="$target/bench-smoke.json"
"$target/debug/strata-bench" compare --smoke \
    --strata-bin "$target/debug/strata-controller" "$@" > "$report"
cat "$report" >&2
echo "bench smoke: report in $report" >&2

for bench in heartbeats start-latency; do
    report="$target/bench-$bench-smoke.json"
    "$target/debug/strata-bench" "$bench" --smoke \
        --strata-bin "$target/debug/strata-controller" > "$report"
    cat "$report" >&2
    echo "bench smoke: $bench report in $report" >&2
done

report="$target/bench-autoscale-smoke.json"
"$target/debug/strata-bench" autoscale --smoke > "$report"
echo "bench smoke: autoscale report in $report" >&2
