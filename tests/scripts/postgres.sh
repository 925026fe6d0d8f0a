#!/usr/bin/env bash
# A throwaway PostgreSQL server for the tests.
#
#   postgres.sh start DIR   initdb into DIR/data, start on a free loopback port, write DIR/env
#                           (export SLUICE_TEST_POSTGRES_URL=postgres://...) and return when ready
#   postgres.sh stop DIR    stop the server (idempotent)
#   postgres.sh restart DIR fast|immediate
#                           stop the server in that shutdown mode (immediate: a crash, recovered
#                           from the WAL on start) and start it again on the same port
#
# PostgreSQL refuses to run as root, so as root the server runs as the `postgres` user.
set -euo pipefail

die() { echo "postgres.sh: $*" >&2; exit 1; }

pg_bin() {
  local dir
  if command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then
    dirname "$(readlink -f "$(command -v initdb)")"
    return
  fi
  for dir in /usr/lib/postgresql/*/bin; do
    [ -x "$dir/initdb" ] && { echo "$dir"; return; }
  done
  return 1
}

ensure_installed() {
  pg_bin >/dev/null && return
  echo "postgres.sh: installing PostgreSQL from Debian's packages" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq postgresql >/dev/null
  # The package starts a cluster of its own; the tests use only theirs.
  service postgresql stop >/dev/null 2>&1 || true
  pg_bin >/dev/null || die "PostgreSQL is still not installed"
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# Runs a command as the server's owner.
as_owner() {
  if [ "$(id -u)" = 0 ]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

start() {
  local dir=$1 bin port
  ensure_installed
  bin=$(pg_bin)
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  [ "$(id -u)" = 0 ] && chown postgres "$dir"
  as_owner "$bin/initdb" -D "$dir/data" -U postgres --auth=trust --encoding=UTF8 --locale=C.UTF-8 >"$dir/initdb.log" 2>&1 \
    || { cat "$dir/initdb.log" >&2; die "initdb failed"; }
  port=$(free_port)
  # Tuned for tests: durability stays on (acknowledgement means commit), connections are plenty.
  as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
    -o "-c listen_addresses=127.0.0.1 -p $port -k $dir -c max_connections=300 -c shared_buffers=256MB" start >/dev/null \
    || { tail -n 30 "$dir/server.log" >&2; die "the server did not start"; }
  echo "export SLUICE_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:$port/postgres" >"$dir/env"
  echo "postgres.sh: PostgreSQL ready on 127.0.0.1:$port (data in $dir/data)" >&2
}

stop() {
  local dir=$1 bin
  [ -d "$dir/data" ] || return 0
  bin=$(pg_bin) || return 0
  as_owner "$bin/pg_ctl" -D "$dir/data" -m immediate -w stop >/dev/null 2>&1 || true
}

restart() {
  local dir=$1 mode=$2 bin
  bin=$(pg_bin)
  # pg_ctl restart starts the server with the options it was started with (postmaster.opts).
  as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -m "$mode" -w -t 60 restart >/dev/null \
    || { tail -n 30 "$dir/server.log" >&2; die "the server did not restart"; }
}

case "${1:-}" in
  start) [ $# -eq 2 ] || die "usage: $0 start DIR"; start "$2" ;;
  stop) [ $# -eq 2 ] || die "usage: $0 stop DIR"; stop "$2" ;;
  restart) [ $# -eq 3 ] || die "usage: $0 restart DIR fast|immediate"; restart "$2" "$3" ;;
  *) die "usage: $0 start|stop DIR | restart DIR fast|immediate" ;;
esac
