# shellcheck shell=bash
# Sourced by tests/run.sh and tests/bench.sh: a run folder for the throwaway servers, started on
# demand and all stopped on exit (also on failure or interrupt). Not executable on its own.
#
#   servers_begin NAME     make the run folder and the exit trap
#   start_postgres         start PostgreSQL, export SLUICE_TEST_POSTGRES_URL
#   start_kube             build (once) and start etcd + kube-apiserver, export SLUICE_TEST_KUBECONFIG*
#   start_toxiproxy        build (once) and start Toxiproxy, export SLUICE_TEST_TOXIPROXY_URL

servers_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

servers_begin() {
  servers_dir=$(mktemp -d "${TMPDIR:-/tmp}/sluice-$1.XXXXXX")
  # PostgreSQL runs as its own user when we are root, and must reach its folder.
  chmod 755 "$servers_dir"
  trap servers_end EXIT INT TERM
}

servers_end() {
  local status=$?
  bash "$servers_root/tests/scripts/toxiproxy.sh" stop "$servers_dir/toxiproxy" || true
  bash "$servers_root/tests/scripts/kube-apiserver.sh" stop "$servers_dir/kube" || true
  bash "$servers_root/tests/scripts/postgres.sh" stop "$servers_dir/postgres" || true
  rm -rf "$servers_dir"
  exit "$status"
}

start_postgres() {
  bash "$servers_root/tests/scripts/postgres.sh" start "$servers_dir/postgres"
  # shellcheck source=/dev/null
  source "$servers_dir/postgres/env"
}

start_kube() {
  bash "$servers_root/tests/scripts/kube-apiserver.sh" build
  bash "$servers_root/tests/scripts/kube-apiserver.sh" start "$servers_dir/kube"
  # shellcheck source=/dev/null
  source "$servers_dir/kube/env"
}

start_toxiproxy() {
  bash "$servers_root/tests/scripts/toxiproxy.sh" start "$servers_dir/toxiproxy" 0
  # shellcheck source=/dev/null
  source "$servers_dir/toxiproxy/env"
}
