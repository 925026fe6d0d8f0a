#!/usr/bin/env bash
# A Docker engine for the kind end-to-end check (issue 14).
#
#   docker.sh start DIR   install Debian's docker.io when dockerd is missing; start dockerd when no
#                         engine answers, with its state (pid, log, runtime wrapper) in DIR
#   docker.sh stop DIR    stop the dockerd that `start DIR` started, if any; safe to repeat
#
# An engine that already runs is used as it is, and `stop` leaves it alone. When this machine's
# capability bounding set lacks CAP_SYS_RESOURCE (read from /proc/self/status), privileged
# containers, such as kind's nodes, cannot start under plain runc, so the dockerd started here
# runs them through tests/kind/oci-runtime-wrapper.sh (it drops that capability from the
# container's spec). Images and the build cache stay in Docker's data root (/var/lib/docker)
# between runs.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/../.." && pwd)

log() { printf 'docker.sh: %s\n' "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

# True when the capability bounding set lacks CAP_SYS_RESOURCE (capability 24).
needs_runtime_wrapper() {
    local bounding
    bounding=$(awk '/^CapBnd:/ { print $2 }' /proc/self/status)
    (((16#$bounding >> 24 & 1) == 0))
}

engine_answers() { timeout 20 docker version --format '{{.Server.Version}}' >/dev/null 2>&1; }

install_packages() {
    local missing=()
    command -v dockerd >/dev/null || missing+=(docker.io)
    command -v jq >/dev/null || missing+=(jq)
    command -v iptables >/dev/null || missing+=(iptables)
    ((${#missing[@]} == 0)) && return
    [[ $(id -u) == 0 ]] || die "needs ${missing[*]} (Debian packages) and is not root to install them"
    log "installing ${missing[*]} from Debian's packages"
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
}

cmd_start() {
    local dir=${1:?usage: docker.sh start DIR}
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    install_packages
    command -v docker >/dev/null || die "no docker client on PATH"
    if engine_answers; then
        log "using the Docker engine that already runs ($(docker version --format '{{.Server.Version}}'))"
        if needs_runtime_wrapper && [[ $(docker info --format '{{.DefaultRuntime}}') == runc ]]; then
            log "warning: this machine lacks CAP_SYS_RESOURCE and the running engine's default runtime is plain runc: privileged containers (kind nodes) may fail to start"
        fi
        return
    fi
    [[ $(id -u) == 0 ]] || die "no Docker engine answers, and starting one needs root"
    local args=(--pidfile "$dir/dockerd.pid")
    if needs_runtime_wrapper; then
        log "CAP_SYS_RESOURCE is not in the capability bounding set: containers run through the runtime wrapper"
        install -m 0755 "$REPO_ROOT/tests/kind/oci-runtime-wrapper.sh" "$dir/sluice-runc"
        args+=(--add-runtime "sluice-runc=$dir/sluice-runc" --default-runtime sluice-runc)
    fi
    log "starting dockerd (log: $dir/dockerd.log)"
    setsid dockerd "${args[@]}" </dev/null >"$dir/dockerd.log" 2>&1 &
    echo $! >"$dir/dockerd.started-by-sluice"
    local i
    for ((i = 0; i < 120; i++)); do
        engine_answers && return
        kill -0 "$(<"$dir/dockerd.started-by-sluice")" 2>/dev/null || break
        sleep 0.5
    done
    tail -n 30 "$dir/dockerd.log" >&2 || true
    cmd_stop "$dir"
    die "dockerd did not start"
}

cmd_stop() {
    local dir=${1:?usage: docker.sh stop DIR} pid i
    [[ -f $dir/dockerd.started-by-sluice ]] || return 0
    pid=$(<"$dir/dockerd.started-by-sluice")
    if [[ $pid =~ ^[0-9]+$ ]] && [[ $(cat "/proc/$pid/comm" 2>/dev/null) == dockerd ]]; then
        log "stopping dockerd (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 300; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -0 "$pid" 2>/dev/null && kill -KILL -- "-$pid" 2>/dev/null
    fi
    rm -f "$dir/dockerd.started-by-sluice"
}

case ${1:-} in
start) cmd_start "${@:2}" ;;
stop) cmd_stop "${@:2}" ;;
*)
    sed -n '2,7p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
    ;;
esac
