#!/usr/bin/env bash
# A real Kubernetes control plane for the tests, as controller-runtime's envtest gives one: etcd and
# kube-apiserver on loopback, no kubelet, no controller manager (issue 3).
#
#   kube-apiserver.sh build        build the binaries, once: they are cached under tools/
#   kube-apiserver.sh start DIR    start etcd + kube-apiserver, write DIR/{admin,restricted}.kubeconfig
#                                  and DIR/env; returns when /readyz answers ok
#   kube-apiserver.sh stop DIR     stop both and everything they started; safe to repeat
#   kube-apiserver.sh down DIR etcd|kube-apiserver
#                                  stop one of the pair, keeping its data, ports and credentials
#   kube-apiserver.sh up DIR etcd|kube-apiserver
#                                  start it again as `start` did; returns when it is healthy
#   kube-apiserver.sh restart DIR etcd|kube-apiserver
#                                  down, then up: for tests of a control plane that restarts
#
# Both binaries are built with `go build` from the Go module in tests/k8s (its go.mod pins the
# versions and explains them) and cached in tools/kube-apiserver-<version>/ and tools/etcd-<version>/;
# GOCACHE and GOMODCACHE are Go's own defaults, so another clone on the same machine rebuilds
# quickly. (Debian's etcd-server, 3.4.23, was tried: it lacks the watch progress requests that
# kube-apiserver 1.35 needs to serve streaming lists, so a kube-rs watcher with streaming_lists()
# failed against it.)
#
# Identities in the kubeconfigs: `admin` is a client certificate in group system:masters;
# `restricted` is a client certificate for user sluice-restricted with no group, so RBAC grants it
# nothing until a test binds a role to it. Only the system:public-info-viewer endpoints (/readyz,
# /version, ...) are open to it, as on any cluster.
#
# Environment: SLUICE_TOOLS_DIR (default <repo>/tools) moves the binary cache;
# SLUICE_KUBE_READY_TIMEOUT (seconds, default 180) bounds the wait for /readyz.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/../.." && pwd)
K8S_MODULE_DIR="$REPO_ROOT/tests/k8s"
TOOLS_DIR=${SLUICE_TOOLS_DIR:-$REPO_ROOT/tools}
READY_TIMEOUT=${SLUICE_KUBE_READY_TIMEOUT:-180}
RESTRICTED_USER=sluice-restricted

log() { printf 'kube-apiserver.sh: %s\n' "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

usage() {
    sed -n '2,15p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

# The version that tests/k8s/go.mod requires of MODULE (k8s.io/kubernetes, go.etcd.io/etcd/server/v3).
module_version() {
    local module=$1 version
    version=$(awk -v module="$module" '{ for (i = 1; i < NF; i++) if ($i == module && $(i + 1) ~ /^v[0-9]/) print $(i + 1) }' \
        "$K8S_MODULE_DIR/go.mod" | head -n 1)
    [[ -n $version ]] || die "$K8S_MODULE_DIR/go.mod requires no version of $module"
    printf '%s\n' "$version"
}

kube_version() { module_version k8s.io/kubernetes; }
etcd_version() { module_version go.etcd.io/etcd/server/v3; }
apiserver_bin() { printf '%s/kube-apiserver-%s/kube-apiserver\n' "$TOOLS_DIR" "$(kube_version)"; }
etcd_bin() { printf '%s/etcd-%s/etcd\n' "$TOOLS_DIR" "$(etcd_version)"; }

# go_build PACKAGE OUTPUT LDFLAGS: builds a tool of the wrapper module into OUTPUT, atomically.
go_build() {
    local package=$1 output=$2 ldflags=$3 tmp
    command -v go >/dev/null || die "the Go toolchain is needed to build $package (go is not on PATH)"
    mkdir -p "$(dirname "$output")"
    tmp="$output.tmp.$$"
    # -mod=readonly: the committed go.sum must be complete; a build never rewrites it.
    # -buildvcs=false: the binary needs no git stamp, and git may refuse a clone owned by another
    # user, which would fail the build.
    if ! (cd "$K8S_MODULE_DIR" && CGO_ENABLED=0 GOFLAGS="${GOFLAGS:-} -mod=readonly -buildvcs=false" \
        go build -trimpath -ldflags "$ldflags" -o "$tmp" "$package"); then
        rm -f "$tmp"
        die "go build of $package failed"
    fi
    mv -f "$tmp" "$output"
}

build_etcd() {
    local version bin
    version=$(etcd_version)
    bin=$(etcd_bin)
    if [[ -x $bin ]]; then
        log "etcd $version: cached at $bin"
        return
    fi
    log "building etcd $version from Go modules"
    go_build go.etcd.io/etcd/server/v3 "$bin" "-s -w"
    log "etcd $version: built $bin"
}

build_apiserver() {
    local version bin minor pkg
    version=$(kube_version)
    bin=$(apiserver_bin)
    if [[ -x $bin ]]; then
        log "kube-apiserver $version: cached at $bin"
        return
    fi
    minor=${version#v1.}
    minor=${minor%%.*}
    # What `kubectl version` and /version report; Kubernetes' own build sets the same variables.
    local ldflags="-s -w"
    for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
        ldflags+=" -X $pkg.gitVersion=$version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
    done
    log "building kube-apiserver $version from Go modules (the first build takes several minutes)"
    go_build k8s.io/kubernetes/cmd/kube-apiserver "$bin" "$ldflags"
    log "kube-apiserver $version: built $bin"
}

cmd_build() {
    build_etcd
    build_apiserver
}

# A TCP port on 127.0.0.1 that no socket uses now. Chosen below the kernel's ephemeral range so that
# outgoing connections do not take it between this check and the server's bind.
free_port() {
    local port hex tries
    for ((tries = 0; tries < 200; tries++)); do
        port=$((20000 + RANDOM % 12000))
        printf -v hex ':%04X ' "$port"
        if ! grep -q -- "$hex" /proc/net/tcp /proc/net/tcp6 2>/dev/null && [[ " ${USED_PORTS:-} " != *" $port "* ]]; then
            USED_PORTS="${USED_PORTS:-} $port"
            printf '%s\n' "$port"
            return
        fi
    done
    die "found no free loopback port"
}

# Writes an EC P-256 key and a certificate signed by the run's CA.
#   issue_cert NAME SUBJECT EXTENSIONS
issue_cert() {
    local name=$1 subject=$2 extensions=$3
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$PKI/$name.key" 2>/dev/null
    openssl req -new -key "$PKI/$name.key" -subj "$subject" -out "$PKI/$name.csr" 2>/dev/null
    printf '%s\n' "$extensions" >"$PKI/$name.ext"
    openssl x509 -req -in "$PKI/$name.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" -CAcreateserial \
        -days 7 -sha256 -extfile "$PKI/$name.ext" -out "$PKI/$name.crt" 2>/dev/null
    rm -f "$PKI/$name.csr" "$PKI/$name.ext"
}

generate_pki() {
    mkdir -p "$PKI"
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$PKI/ca.key" 2>/dev/null
    openssl req -x509 -new -key "$PKI/ca.key" -subj "/CN=sluice-test-ca" -days 7 -sha256 \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -out "$PKI/ca.crt" 2>/dev/null
    issue_cert apiserver "/CN=kube-apiserver" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
    local client="basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth"
    issue_cert admin "/O=system:masters/CN=sluice-admin" "$client"
    issue_cert restricted "/CN=$RESTRICTED_USER" "$client"
    # Service-account tokens: the API server signs them with this key and verifies them with it.
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$PKI/service-account.key" 2>/dev/null
    openssl pkey -in "$PKI/service-account.key" -pubout -out "$PKI/service-account.pub" 2>/dev/null
    chmod 600 "$PKI"/*.key
}

b64() { base64 -w0 <"$1"; }

# Credentials are embedded so that the file is all a client (kubectl, kube-rs) needs.
write_kubeconfig() {
    local file=$1 user=$2 name=$3
    cat >"$file" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: sluice-test
  cluster:
    server: https://127.0.0.1:$APISERVER_PORT
    certificate-authority-data: $(b64 "$PKI/ca.crt")
users:
- name: $user
  user:
    client-certificate-data: $(b64 "$PKI/$name.crt")
    client-key-data: $(b64 "$PKI/$name.key")
contexts:
- name: $user
  context:
    cluster: sluice-test
    user: $user
current-context: $user
EOF
    chmod 600 "$file"
}

# When process PID started, in clock ticks since boot (field 22 of /proc/PID/stat; the fields are
# counted after the parenthesised command name, which may contain spaces).
start_time() {
    local stat
    { stat=$(<"/proc/$1/stat"); } 2>/dev/null || return 1
    stat=${stat##*) }
    awk '{ print $20 }' <<<"$stat"
}

# The pid in DIR/NAME.pid, if that process is alive and is the one we started: DIR/NAME.started
# holds its start time, so a stale pid file (after a reboot, say) never makes `stop` kill an
# unrelated process that reuses the pid.
running_pid() {
    local dir=$1 name=$2 pid started
    [[ -f $dir/$name.pid && -f $dir/$name.started ]] || return 1
    pid=$(<"$dir/$name.pid")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    started=$(start_time "$pid") || return 1
    [[ $started == "$(<"$dir/$name.started")" ]] || return 1
    printf '%s\n' "$pid"
}

# Stops the process group that NAME leads (it was started with setsid, so its children are in it).
stop_one() {
    local dir=$1 name=$2 pid i
    if pid=$(running_pid "$dir" "$name"); then
        kill -TERM -- "-$pid" 2>/dev/null || true
        for ((i = 0; i < 100; i++)); do
            kill -0 -- "-$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 -- "-$pid" 2>/dev/null; then
            log "$name (pid $pid) did not stop within 10 s; killing it"
            kill -KILL -- "-$pid" 2>/dev/null || true
            for ((i = 0; i < 50; i++)); do
                kill -0 -- "-$pid" 2>/dev/null || break
                sleep 0.1
            done
        fi
    fi
    rm -f "$dir/$name.pid" "$dir/$name.started"
}

cmd_stop() {
    local dir=${1:?usage: kube-apiserver.sh stop DIR}
    [[ -d $dir ]] || return 0
    stop_one "$dir" kube-apiserver
    stop_one "$dir" etcd
    # The credentials point at a server that is gone.
    rm -f "$dir/env"
}

show_logs() {
    local dir=$1 name
    for name in etcd kube-apiserver; do
        if [[ -s $dir/$name.log ]]; then
            log "last lines of $dir/$name.log:"
            tail -n 25 "$dir/$name.log" >&2
        fi
    done
}

fail_start() {
    local dir=$1
    shift
    log "error: $*"
    show_logs "$dir"
    cmd_stop "$dir"
    exit 1
}

# Starts a program in its own session (so `stop` can signal it and its children as one group) with
# its output in DIR/NAME.log, and records its pid in DIR/NAME.pid.
spawn() {
    local dir=$1 name=$2
    shift 2
    setsid "$@" </dev/null >"$dir/$name.log" 2>&1 &
    local pid=$!
    printf '%s\n' "$pid" >"$dir/$name.pid"
    start_time "$pid" >"$dir/$name.started" || die "$name exited at once; see $dir/$name.log"
}

# Polls URL until it answers 200 or DEADLINE (epoch seconds) passes; fails early if NAME exited.
wait_healthy() {
    local dir=$1 name=$2 url=$3 deadline=$4
    shift 4
    until curl --silent --fail --max-time 5 "$@" "$url" >/dev/null 2>&1; do
        running_pid "$dir" "$name" >/dev/null || fail_start "$dir" "$name exited before it was ready"
        ((SECONDS < deadline)) || fail_start "$dir" "$name was not ready within ${READY_TIMEOUT} s ($url)"
        sleep 0.25
    done
}

# The ports that `start` chose (DIR/ports): `up` brings a server back where its clients expect it.
load_ports() {
    local dir=$1
    [[ -f $dir/ports ]] || die "no server was started in $dir; run: $0 start $dir"
    # shellcheck source=/dev/null
    source "$dir/ports"
    PKI="$dir/pki"
}

# spawn_etcd DIR new|existing: a new cluster, or the one whose data is in DIR/etcd-data.
spawn_etcd() {
    local dir=$1 state=$2
    spawn "$dir" etcd "$(etcd_bin)" \
        --name sluice-test \
        --data-dir "$dir/etcd-data" \
        --listen-client-urls "http://127.0.0.1:$ETCD_PORT" \
        --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
        --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
        --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
        --initial-cluster "sluice-test=http://127.0.0.1:$ETCD_PEER_PORT" \
        --initial-cluster-state "$state" \
        --unsafe-no-fsync \
        --watch-progress-notify-interval 5s \
        --log-level warn
}

wait_etcd() { wait_healthy "$1" etcd "http://127.0.0.1:$ETCD_PORT/health" "$2"; }

# Without a controller manager no namespace gets a `default` ServiceAccount, so the
# ServiceAccount admission plugin would refuse every Pod; envtest turns it off for the same
# reason. The service IP range is bookkeeping only: nothing routes to it.
spawn_apiserver() {
    local dir=$1
    spawn "$dir" kube-apiserver "$(apiserver_bin)" \
        --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
        --bind-address 127.0.0.1 \
        --advertise-address 127.0.0.1 \
        --secure-port "$APISERVER_PORT" \
        --tls-cert-file "$PKI/apiserver.crt" \
        --tls-private-key-file "$PKI/apiserver.key" \
        --client-ca-file "$PKI/ca.crt" \
        --authorization-mode RBAC \
        --service-account-issuer https://kubernetes.default.svc.cluster.local \
        --service-account-key-file "$PKI/service-account.pub" \
        --service-account-signing-key-file "$PKI/service-account.key" \
        --service-cluster-ip-range 10.0.0.0/16 \
        --disable-admission-plugins ServiceAccount \
        --allow-privileged=true \
        --cert-dir "$PKI"
}

wait_apiserver() {
    wait_healthy "$1" kube-apiserver "https://127.0.0.1:$APISERVER_PORT/readyz" "$2" \
        --cacert "$PKI/ca.crt" --cert "$PKI/admin.crt" --key "$PKI/admin.key"
}

server_name() {
    case ${1:-} in
    etcd | kube-apiserver) printf '%s\n' "$1" ;;
    *) die "name etcd or kube-apiserver, not '${1:-}'" ;;
    esac
}

cmd_down() {
    local dir=${1:?usage: kube-apiserver.sh down DIR etcd|kube-apiserver} name
    name=$(server_name "${2:-}")
    load_ports "$dir"
    stop_one "$dir" "$name"
    log "$name in $dir stopped (data and ports kept; bring it back with: $0 up $dir $name)"
}

# A log of its own per start: the last one a failure shows is the one that failed.
cmd_up() {
    local dir=${1:?usage: kube-apiserver.sh up DIR etcd|kube-apiserver} name
    name=$(server_name "${2:-}")
    dir=$(cd "$dir" && pwd)
    load_ports "$dir"
    if running_pid "$dir" "$name" >/dev/null; then
        log "$name in $dir is already running"
        return
    fi
    [[ -f $dir/$name.log ]] && mv -f "$dir/$name.log" "$dir/$name.log.previous"
    local deadline=$((SECONDS + READY_TIMEOUT))
    if [[ $name == etcd ]]; then
        spawn_etcd "$dir" existing
        wait_etcd "$dir" "$deadline"
    else
        spawn_apiserver "$dir"
        wait_apiserver "$dir" "$deadline"
    fi
    log "$name in $dir is back"
}

cmd_start() {
    local dir=${1:?usage: kube-apiserver.sh start DIR}
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    if running_pid "$dir" etcd >/dev/null || running_pid "$dir" kube-apiserver >/dev/null; then
        die "a server is already running in $dir; run: $0 stop $dir"
    fi
    local apiserver etcd
    apiserver=$(apiserver_bin)
    etcd=$(etcd_bin)
    if [[ ! -x $apiserver || ! -x $etcd ]]; then
        cmd_build
    fi
    command -v openssl >/dev/null || die "openssl is needed to make the test certificates"
    command -v curl >/dev/null || die "curl is needed to wait for /readyz"

    # Whatever was started is stopped again if `start` is interrupted.
    trap 'fail_start "$dir" "interrupted"' INT TERM

    # Every start is a new cluster: new keys, empty etcd. Its data is thrown away after the run,
    # so etcd skips fsync (--unsafe-no-fsync): a slow disk then costs the tests nothing.
    rm -rf "$dir/pki" "$dir/etcd-data" "$dir"/*.log "$dir"/*.kubeconfig "$dir/env"
    PKI="$dir/pki"
    generate_pki

    USED_PORTS=""
    {
        printf 'ETCD_PORT=%s\n' "$(free_port)"
        printf 'ETCD_PEER_PORT=%s\n' "$(free_port)"
        printf 'APISERVER_PORT=%s\n' "$(free_port)"
    } >"$dir/ports"
    # shellcheck source=/dev/null
    source "$dir/ports"
    local started=$SECONDS
    local deadline=$((SECONDS + READY_TIMEOUT))

    spawn_etcd "$dir" new
    wait_etcd "$dir" "$deadline"
    spawn_apiserver "$dir"
    write_kubeconfig "$dir/admin.kubeconfig" admin admin
    write_kubeconfig "$dir/restricted.kubeconfig" restricted restricted
    wait_apiserver "$dir" "$deadline"

    {
        printf '# Written by tests/scripts/kube-apiserver.sh start; source it before cargo test.\n'
        printf 'export SLUICE_TEST_KUBECONFIG=%q\n' "$dir/admin.kubeconfig"
        printf 'export SLUICE_TEST_KUBECONFIG_RESTRICTED=%q\n' "$dir/restricted.kubeconfig"
        printf 'export SLUICE_TEST_KUBE_RESTRICTED_USER=%q\n' "$RESTRICTED_USER"
    } >"$dir/env"
    trap - INT TERM
    log "ready in $((SECONDS - started)) s at https://127.0.0.1:$APISERVER_PORT (kubeconfig: $dir/admin.kubeconfig)"
}

main() {
    local command=${1:-}
    [[ $# -gt 0 ]] && shift
    case $command in
    build) cmd_build ;;
    start) cmd_start "$@" ;;
    stop) cmd_stop "$@" ;;
    down) cmd_down "$@" ;;
    up) cmd_up "$@" ;;
    restart)
        cmd_down "$@"
        cmd_up "$@"
        ;;
    *) usage ;;
    esac
}

main "$@"
