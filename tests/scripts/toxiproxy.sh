#!/usr/bin/env bash
# Toxiproxy, Shopify's TCP proxy that injects network faults (partitions, latency, resets) on
# command, for tests that need a faulty network between two processes.
#
#   toxiproxy.sh install          build the server once into tools/toxiproxy-<version>/ and print
#                                 its path
#   toxiproxy.sh start DIR PORT   start a server whose HTTP API listens on 127.0.0.1:PORT (0: a
#                                 free port), write DIR/env (SLUICE_TEST_TOXIPROXY_URL); returns
#                                 when the API answers
#   toxiproxy.sh stop DIR         stop that server; safe to repeat
#
# The server is built with `go install` from its Go module (only the Go module proxy is needed)
# and cached in tools/toxiproxy-<version>/, which git ignores. The proxies themselves are made by
# the tests, through the API (tests/src/toxiproxy.rs).
#
# Environment: SLUICE_TOOLS_DIR (default <repo>/tools) moves the binary cache;
# SLUICE_TOXIPROXY_VERSION (default v2.12.0) picks another release.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/../.." && pwd)
VERSION=${SLUICE_TOXIPROXY_VERSION:-v2.12.0}
TOOLS_DIR=${SLUICE_TOOLS_DIR:-$REPO_ROOT/tools}
BIN_DIR=$TOOLS_DIR/toxiproxy-${VERSION#v}
BIN=$BIN_DIR/toxiproxy-server

log() { printf 'toxiproxy.sh: %s\n' "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

usage() {
    sed -n '2,11p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

cmd_install() {
    if [[ -x $BIN ]]; then
        log "toxiproxy $VERSION: cached at $BIN"
        return
    fi
    command -v go >/dev/null || die "the Go toolchain is needed to build toxiproxy (go is not on PATH)"
    log "building toxiproxy $VERSION from its Go module"
    local work
    work=$(mktemp -d "${TMPDIR:-/tmp}/sluice-toxiproxy.XXXXXX")
    # -mod=mod: the module is built with its own go.mod, outside any module of ours.
    if ! (cd "$work" && CGO_ENABLED=0 GOFLAGS=-mod=mod GOBIN="$work" \
        go install -trimpath -ldflags "-s -w" "github.com/Shopify/toxiproxy/v2/cmd/server@$VERSION"); then
        rm -rf "$work"
        die "go install of toxiproxy $VERSION failed"
    fi
    mkdir -p "$BIN_DIR"
    mv -f "$work/server" "$BIN"
    rm -rf "$work"
    log "toxiproxy $VERSION: built $BIN"
}

# A TCP port on 127.0.0.1 that no socket uses now, below the kernel's ephemeral range.
free_port() {
    local port hex tries
    for ((tries = 0; tries < 200; tries++)); do
        port=$((20000 + RANDOM % 12000))
        printf -v hex ':%04X ' "$port"
        if ! grep -q -- "$hex" /proc/net/tcp /proc/net/tcp6 2>/dev/null; then
            printf '%s\n' "$port"
            return
        fi
    done
    die "found no free loopback port"
}

# The pid in DIR/toxiproxy.pid if that process is alive and is still toxiproxy-server.
running_pid() {
    local dir=$1 pid
    [[ -f $dir/toxiproxy.pid ]] || return 1
    pid=$(<"$dir/toxiproxy.pid")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    [[ "$(readlink "/proc/$pid/exe" 2>/dev/null)" == "$BIN" ]] || return 1
    printf '%s\n' "$pid"
}

cmd_start() {
    local dir=${1:?usage: toxiproxy.sh start DIR PORT} port=${2:?usage: toxiproxy.sh start DIR PORT}
    [[ $port =~ ^[0-9]+$ ]] || die "PORT must be a number, not $port"
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    running_pid "$dir" >/dev/null && die "a server is already running in $dir; run: $0 stop $dir"
    cmd_install
    command -v curl >/dev/null || die "curl is needed to wait for the API"
    ((port != 0)) || port=$(free_port)
    rm -f "$dir/env"
    "$BIN" -host 127.0.0.1 -port "$port" </dev/null >"$dir/toxiproxy.log" 2>&1 &
    printf '%s\n' "$!" >"$dir/toxiproxy.pid"
    local i
    for ((i = 0; i < 200; i++)); do
        if curl --silent --fail --max-time 2 "http://127.0.0.1:$port/version" >/dev/null 2>&1; then
            printf 'export SLUICE_TEST_TOXIPROXY_URL=%q\n' "http://127.0.0.1:$port" >"$dir/env"
            log "toxiproxy $VERSION: API at http://127.0.0.1:$port"
            return
        fi
        if ! running_pid "$dir" >/dev/null; then
            tail -n 20 "$dir/toxiproxy.log" >&2 || true
            die "toxiproxy exited before its API answered; see $dir/toxiproxy.log"
        fi
        sleep 0.1
    done
    cmd_stop "$dir"
    die "toxiproxy's API did not answer on 127.0.0.1:$port within 20 s"
}

cmd_stop() {
    local dir=${1:?usage: toxiproxy.sh stop DIR} pid i
    [[ -d $dir ]] || return 0
    if pid=$(running_pid "$dir"); then
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 50; i++)); do
            running_pid "$dir" >/dev/null || break
            sleep 0.1
        done
        if running_pid "$dir" >/dev/null; then
            log "toxiproxy (pid $pid) did not stop within 5 s; killing it"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$dir/toxiproxy.pid" "$dir/env"
}

main() {
    local command=${1:-}
    [[ $# -gt 0 ]] && shift
    case $command in
    install) cmd_install && printf '%s\n' "$BIN" ;;
    start) cmd_start "$@" ;;
    stop) cmd_stop "$@" ;;
    *) usage ;;
    esac
}

main "$@"
