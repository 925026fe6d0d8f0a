#!/usr/bin/env bash
# Toxiproxy (Shopify's TCP proxy that injects network faults), built from its Go module, for
# tests that need a faulty network between two processes.
#
#   toxiproxy.sh install          build the server once into tools/toxiproxy-<version>/ (git-ignored)
#                                 and print its path
#   toxiproxy.sh start DIR PORT   start a server whose API listens on 127.0.0.1:PORT (0: a free
#                                 port), write DIR/env (export SLUICE_TEST_TOXIPROXY_URL=http://...)
#                                 and return when it answers
#   toxiproxy.sh stop DIR         stop that server (idempotent)
#
# Only the Go module proxy is needed: go install fetches the module and its dependencies.
set -euo pipefail

version=${SLUICE_TOXIPROXY_VERSION:-v2.12.0}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
dir=${SLUICE_TOOLS_DIR:-$root/tools}/toxiproxy-${version#v}
binary=$dir/toxiproxy-server

die() { echo "toxiproxy.sh: $*" >&2; exit 1; }

install() {
  [ -x "$binary" ] && return
  command -v go >/dev/null 2>&1 || die "go is not installed (https://go.dev/dl/)"
  echo "toxiproxy.sh: building toxiproxy $version into $dir" >&2
  mkdir -p "$dir"
  GOFLAGS=-mod=mod GOBIN="$dir" go install "github.com/Shopify/toxiproxy/v2/cmd/server@$version"
  mv "$dir/server" "$binary"
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

start() {
  local run=$1 port=$2 _
  install
  [ "$port" = 0 ] && port=$(free_port)
  mkdir -p "$run"
  run=$(cd "$run" && pwd)
  "$binary" -host 127.0.0.1 -port "$port" >"$run/server.log" 2>&1 &
  echo $! >"$run/pid"
  for _ in $(seq 100); do
    if curl -fsS "http://127.0.0.1:$port/version" >/dev/null 2>&1; then
      echo "export SLUICE_TEST_TOXIPROXY_URL=http://127.0.0.1:$port" >"$run/env"
      echo "toxiproxy.sh: toxiproxy $version API on 127.0.0.1:$port" >&2
      return
    fi
    kill -0 "$(cat "$run/pid")" 2>/dev/null || { cat "$run/server.log" >&2; die "the server exited"; }
    sleep 0.1
  done
  cat "$run/server.log" >&2
  die "the server did not answer on 127.0.0.1:$port"
}

stop() {
  local run=$1 pid
  [ -f "$run/pid" ] || return 0
  pid=$(cat "$run/pid")
  kill "$pid" 2>/dev/null || true
  rm -f "$run/pid"
}

case "${1:-}" in
  install) [ $# -eq 1 ] || die "usage: $0 install"; install; echo "$binary" ;;
  start) [ $# -eq 3 ] || die "usage: $0 start DIR PORT"; start "$2" "$3" ;;
  stop) [ $# -eq 2 ] || die "usage: $0 stop DIR"; stop "$2" ;;
  *) die "usage: $0 install | start DIR PORT | stop DIR" ;;
esac
