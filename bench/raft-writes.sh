#!/usr/bin/env bash
# Raft writes and failover, Strata vs etcd 3.4, on a 3-member cluster of each on loopback.
#
#   bench/raft-writes.sh            full run: 64 clients, 20 s of writes, 5 leader kills each
#   bench/raft-writes.sh --smoke    CI: 8 clients, 3 s of writes, 2 kills each
#
# Other arguments go to `strata-bench compare` (see `--help`). The JSON report goes to stdout,
# progress to stderr. Exits non-zero only when the benchmark could not run, never because a
# figure missed its target: targets are reported in the JSON, not enforced.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

if ! command -v etcd >/dev/null 2>&1; then
    echo "etcd is not installed; run deploy/install-deps.d/bench.sh (Debian package etcd-server)" >&2
    exit 1
fi

# Release builds: debug binaries would measure the compiler's optimisation level, not Raft.
cargo build --release --quiet -p strata-controller -p strata-bench >&2
target="${CARGO_TARGET_DIR:-$repo/target}"
exec "$target/release/strata-bench" compare \
    --strata-bin "$target/release/strata-controller" "$@"
