#!/usr/bin/env bash
# CI's benchmark step (deploy/test.sh runs it): the Strata vs etcd comparison in smoke mode,
# 8 clients, 3 s of writes and 2 leader kills per system. It checks that the benchmark still
# runs end to end; it never judges a figure, so debug binaries (already built by the tests) do.
# The JSON report is kept in target/bench-smoke.json and echoed to stderr.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

if ! command -v etcd >/dev/null 2>&1; then
    echo "bench smoke: etcd is missing; run deploy/install-deps.d/bench.sh" >&2
    exit 1
fi

cargo build --quiet -p strata-controller -p strata-bench
target="${CARGO_TARGET_DIR:-$repo/target}"
report="$target/bench-smoke.json"
"$target/debug/strata-bench" compare --smoke \
    --strata-bin "$target/debug/strata-controller" "$@" > "$report"
cat "$report" >&2
echo "bench smoke: report in $report" >&2
