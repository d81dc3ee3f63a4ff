#!/usr/bin/env bash
# The whole test suite: formatting, lints, every unit, component and end-to-end test, the API
# fuzzer (deploy/schemathesis.sh), and the benchmarks in smoke mode. Slow end-to-end tests run
# when STRATA_E2E=1 (set here).
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/install-deps.sh
export STRATA_E2E="${STRATA_E2E:-1}"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# The end-to-end tests start the real binaries, which test builds do not produce by themselves.
cargo build --workspace --bins
cargo nextest run --workspace --no-fail-fast
# The agents suite again, every link mutual TLS (controllers, peers, agents, clients).
STRATA_E2E_TLS=1 cargo nextest run -p strata-tests --test agents --no-fail-fast
# The API fuzzed against its OpenAPI document on a real 3-node cluster.
STRATA_BIN="${STRATA_TEST_BIN_DIR:-${CARGO_TARGET_DIR:-$PWD/target}/debug}" deploy/schemathesis.sh
if [ -x bench/smoke.sh ]; then
  bench/smoke.sh
fi
