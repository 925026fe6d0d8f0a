#!/usr/bin/env bash
# The operator's peak RSS with 5,000 Secrets of 10 KB in its namespace (issue 11, item 4):
#
#   bash tests/secrets_rss.sh [OTHER_OPERATOR_BINARY ...]
#
# Builds sluice-operator (debug, as the tests run it), then runs tests/examples/secrets_rss.rs: a
# private etcd + kube-apiserver and PostgreSQL, the Secrets, and each binary in turn reconciling
# one integration; it prints each one's peak RSS (VmHWM). Give an older build's binary to compare.
# Knobs: BENCH_SECRETS (default 5000), BENCH_SECRET_KIB (default 10). Prints; asserts nothing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cargo build -p sluice-operator --bins
cargo run -q -p sluice-tests --example secrets_rss -- "$@" target/debug/sluice-operator
