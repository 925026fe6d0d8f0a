#!/usr/bin/env bash
# The images the kind end-to-end check needs on a machine that reaches no image registry (issue 14),
# built offline from Debian's packages and Go modules, and cached:
#
#   node-image.sh        prints shell assignments of SLUICE_KIND_NODE_IMAGE, SLUICE_KIND_BASE_IMAGE
#                        and SLUICE_KIND_POSTGRES_IMAGE, after making sure that Docker has them
#   node-image.sh names  prints the same names without building anything
#
#   base      a Debian root filesystem made with debootstrap: systemd, containerd, runc, the CNI
#             plugins, iptables, PostgreSQL, CA certificates. Also the runtime base of the
#             project's images and of kube-proxy.
#   node      kind's node image: base + kind's node files (from the sigs.k8s.io/kind Go module) +
#             kubeadm, kubelet, kubectl, crictl + the control-plane images kubeadm expects, tagged
#             with their exact names (registry.k8s.io/kube-apiserver:v1.35.x, etcd, CoreDNS,
#             pause, kube-proxy, ...) and imported into the node's containerd at boot. The CNI is
#             the standard ptp plugin, as kind's own kindnet configures it (kind's own is turned off in the cluster config).
#   postgres  PostgreSQL from Debian's packages for the cluster (tests/kind/postgres/).
#
# Kubernetes binaries are built with `go build` from the module in tests/k8s (the same pin as the
# API-server harness), CoreDNS and crictl with `go install` from their modules, pause from the
# C source in the k8s.io/kubernetes module. The versions kubeadm expects for etcd, CoreDNS and
# pause are read from kubeadm's own constants in that module.
#
# Cache: the three images are saved with `docker save` to tools/kind-images-<version>-<key>.tar,
# where <key> hashes every input (these scripts, the versions); a later run loads that archive
# (or finds the images in Docker) and builds nothing. Environment: SLUICE_TOOLS_DIR moves tools/;
# SLUICE_DEBIAN_MIRROR (default: the machine's Debian mirror) and SLUICE_DEBIAN_SUITE (bookworm).
# Needs root (debootstrap), Docker, Go and a C compiler.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/../.." && pwd)
K8S_MODULE_DIR="$REPO_ROOT/tests/k8s"
TOOLS_DIR=${SLUICE_TOOLS_DIR:-$REPO_ROOT/tools}
KIND_VERSION=${KIND_VERSION:-v0.33.0}
# cri-tools publishes no v1.35 module; crictl speaks the same CRI v1 as any recent release.
CRICTL_VERSION=v1.34.0
DEBIAN_SUITE=${SLUICE_DEBIAN_SUITE:-bookworm}
DEBIAN_MIRROR=${SLUICE_DEBIAN_MIRROR:-http://deb.debian.org/debian}
# What the node and the images run: kind's base image list, with Debian's containerd, runc and CNI
# plugins, and PostgreSQL for the database image.
DEBIAN_PACKAGES=systemd,systemd-sysv,dbus,conntrack,iptables,nftables,iproute2,ethtool,util-linux,mount,kmod,libseccomp2,pigz,e2fsprogs,bash,ca-certificates,curl,jq,procps,containerd,runc,containernetworking-plugins,socat,postgresql

log() { printf 'node-image.sh: %s\n' "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

# The version that tests/k8s/go.mod requires of MODULE.
module_version() {
    local version
    version=$(awk -v module="$1" '{ for (i = 1; i < NF; i++) if ($i == module && $(i + 1) ~ /^v[0-9]/) print $(i + 1) }' \
        "$K8S_MODULE_DIR/go.mod" | head -n 1)
    [[ -n $version ]] || die "tests/k8s/go.mod requires no version of $1"
    printf '%s\n' "$version"
}

# The folder of MODULE@VERSION in Go's module cache (downloaded from the module proxy if needed).
module_dir() {
    (cd "$K8S_MODULE_DIR" && GOFLAGS=-mod=mod go mod download -json "$1" | jq -r .Dir)
}

# A string constant of kubeadm's app/constants package, e.g. DefaultEtcdVersion.
kubeadm_constant() {
    local value
    value=$(sed -n "s/^[[:space:]]*$1 = \"\\(.*\\)\"\$/\\1/p" "$KUBERNETES_DIR/cmd/kubeadm/app/constants/constants.go" | head -n 1)
    [[ -n $value ]] || die "kubeadm's constants have no $1"
    printf '%s\n' "$value"
}

KUBERNETES_VERSION=$(module_version k8s.io/kubernetes)
ETCD_VERSION=$(module_version go.etcd.io/etcd/server/v3)
KUBERNETES_DIR=$(module_dir "k8s.io/kubernetes@$KUBERNETES_VERSION")
ETCD_TAG=$(kubeadm_constant DefaultEtcdVersion)
COREDNS_VERSION=$(kubeadm_constant CoreDNSVersion)
PAUSE_VERSION=$(kubeadm_constant PauseVersion)
PAUSE_IMAGE=registry.k8s.io/pause:$PAUSE_VERSION

# Everything the images are made of, hashed: a change to any of it makes a new cache entry.
cache_key() {
    {
        printf '%s\n' "$KUBERNETES_VERSION" "$ETCD_VERSION" "$ETCD_TAG" "$COREDNS_VERSION" "$PAUSE_VERSION" \
            "$KIND_VERSION" "$CRICTL_VERSION" "$DEBIAN_SUITE" "$DEBIAN_PACKAGES"
        cat "$SCRIPT_DIR/node-image.sh" "$SCRIPT_DIR/oci-runtime-wrapper.sh" "$K8S_MODULE_DIR/go.sum"
        find "$SCRIPT_DIR/node" "$SCRIPT_DIR/postgres" -type f | LC_ALL=C sort | xargs cat
    } | sha256sum | cut -c1-12
}

KEY=$(cache_key)
TAG=$KUBERNETES_VERSION-$KEY
NODE_IMAGE=sluice-kind-node:$TAG
# The Debian base changes only with its packages: edits of these scripts do not debootstrap again
# while Docker still has it.
BASE_IMAGE=sluice-kind-base:$DEBIAN_SUITE-$(printf '%s\n' "$DEBIAN_MIRROR" "$DEBIAN_PACKAGES" | sha256sum | cut -c1-12)
POSTGRES_IMAGE=sluice-kind-postgres:$TAG
ARCHIVE=$TOOLS_DIR/kind-images-$TAG.tar

print_names() {
    printf 'SLUICE_KIND_NODE_IMAGE=%q\nSLUICE_KIND_BASE_IMAGE=%q\nSLUICE_KIND_POSTGRES_IMAGE=%q\n' \
        "$NODE_IMAGE" "$BASE_IMAGE" "$POSTGRES_IMAGE"
}

have_images() {
    docker image inspect "$NODE_IMAGE" "$BASE_IMAGE" "$POSTGRES_IMAGE" >/dev/null 2>&1
}

# docker build with BuildKit: the CLI's buildx plugin where it has one, else Debian's docker.io
# client (20.10), which speaks to the engine's BuildKit itself.
docker_build() {
    if docker buildx version >/dev/null 2>&1; then
        DOCKER_BUILDKIT=1 docker build "$@"
    elif [[ -x /usr/bin/docker ]]; then
        DOCKER_BUILDKIT=1 /usr/bin/docker build "$@"
    else
        DOCKER_BUILDKIT=0 docker build "$@"
    fi
}

# go_build PACKAGE OUTPUT: a Kubernetes command from the module in tests/k8s, versioned as
# Kubernetes' own build does it.
go_build() {
    local package=$1 output=$2 minor ldflags="-s -w" pkg
    [[ -x $output ]] && return
    minor=${KUBERNETES_VERSION#v1.}
    minor=${minor%%.*}
    for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
        ldflags+=" -X $pkg.gitVersion=$KUBERNETES_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
    done
    log "building $package $KUBERNETES_VERSION (go build)"
    mkdir -p "$(dirname "$output")"
    (cd "$K8S_MODULE_DIR" && CGO_ENABLED=0 GOFLAGS="-mod=readonly -buildvcs=false" \
        nice -n 10 go build -trimpath -ldflags "$ldflags" -o "$output.tmp" "$package")
    mv -f "$output.tmp" "$output"
}

# go_install MODULE_PATH@VERSION DIR: a tool from its own module, with its own go.mod.
go_install() {
    local target=$1 dir=$2 name
    name=$(basename "${target%@*}")
    [[ -x $dir/$name ]] && return
    log "building $target (go install)"
    mkdir -p "$dir"
    CGO_ENABLED=0 GOBIN="$dir" GOFLAGS="-buildvcs=false" nice -n 10 go install -trimpath -ldflags "-s -w" "$target"
}

build_binaries() {
    bash "$REPO_ROOT/tests/scripts/kube-apiserver.sh" build
    local out=$TOOLS_DIR/kubernetes-$KUBERNETES_VERSION command
    for command in kubeadm kubelet kubectl kube-controller-manager kube-scheduler kube-proxy; do
        go_build "k8s.io/kubernetes/cmd/$command" "$out/$command"
    done
    go_install "github.com/coredns/coredns@$COREDNS_VERSION" "$TOOLS_DIR/coredns-$COREDNS_VERSION"
    go_install "sigs.k8s.io/cri-tools/cmd/crictl@$CRICTL_VERSION" "$TOOLS_DIR/crictl-$CRICTL_VERSION"
    local pause=$TOOLS_DIR/pause-$PAUSE_VERSION/pause
    if [[ ! -x $pause ]]; then
        log "building pause $PAUSE_VERSION (from the k8s.io/kubernetes module's C source)"
        mkdir -p "$(dirname "$pause")"
        cc -Os -static -DVERSION="v$PAUSE_VERSION" -o "$pause.tmp" "$KUBERNETES_DIR/build/pause/linux/pause.c"
        strip "$pause.tmp"
        mv -f "$pause.tmp" "$pause"
    fi
}

build_base() {
    local rootfs=$WORK/rootfs
    log "debootstrap $DEBIAN_SUITE from $DEBIAN_MIRROR (a few minutes)"
    command -v debootstrap >/dev/null || {
        apt-get update -qq >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >&2
    }
    nice -n 10 debootstrap --variant=minbase --include="$DEBIAN_PACKAGES" \
        "$DEBIAN_SUITE" "$rootfs" "$DEBIAN_MIRROR" >"$WORK/debootstrap.log" 2>&1 || {
        tail -n 30 "$WORK/debootstrap.log" >&2
        die "debootstrap failed"
    }
    # No package lists, caches or the cluster that postgresql's installation made: the images
    # install nothing at run time, and the database image makes its own cluster.
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/* "$rootfs"/var/log/*.log \
        "$rootfs"/etc/postgresql/*/main "$rootfs"/var/lib/postgresql/*/main
    tar -C "$rootfs" --numeric-owner --exclude='./dev/*' --exclude='./proc/*' --exclude='./sys/*' -cf - . |
        docker import --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
            --change 'CMD ["/bin/bash"]' - "$BASE_IMAGE" >/dev/null
    rm -rf "$rootfs"
}

# image_from_scratch IMAGE BINARY PATH_IN_IMAGE: a one-binary image, as Kubernetes' distroless ones.
image_from_scratch() {
    local image=$1 binary=$2 path=$3 ctx
    ctx=$(mktemp -d "$WORK/image.XXXXXX")
    cp "$binary" "$ctx/binary"
    printf 'FROM scratch\nCOPY binary %s\nENV PATH=/usr/local/bin:/usr/bin:/bin\nENTRYPOINT ["%s"]\n' "$path" "$path" >"$ctx/Dockerfile"
    docker_build -q -t "$image" "$ctx" >/dev/null
}

build_node() {
    local bin=$TOOLS_DIR/kubernetes-$KUBERNETES_VERSION ctx=$WORK/node k8s=registry.k8s.io
    local images=("$k8s/kube-apiserver:$KUBERNETES_VERSION" "$k8s/kube-controller-manager:$KUBERNETES_VERSION"
        "$k8s/kube-scheduler:$KUBERNETES_VERSION" "$k8s/kube-proxy:$KUBERNETES_VERSION" "$k8s/etcd:$ETCD_TAG"
        "$k8s/coredns/coredns:$COREDNS_VERSION" "$PAUSE_IMAGE")
    log "control-plane images: ${images[*]}"
    image_from_scratch "${images[0]}" "$TOOLS_DIR/kube-apiserver-$KUBERNETES_VERSION/kube-apiserver" /usr/local/bin/kube-apiserver
    image_from_scratch "${images[1]}" "$bin/kube-controller-manager" /usr/local/bin/kube-controller-manager
    image_from_scratch "${images[2]}" "$bin/kube-scheduler" /usr/local/bin/kube-scheduler
    # kube-proxy programs iptables: it needs the tools, so its base is Debian's.
    mkdir -p "$WORK/kube-proxy"
    cp "$bin/kube-proxy" "$WORK/kube-proxy/kube-proxy"
    printf 'FROM %s\nCOPY kube-proxy /usr/local/bin/kube-proxy\nENTRYPOINT ["/usr/local/bin/kube-proxy"]\n' "$BASE_IMAGE" >"$WORK/kube-proxy/Dockerfile"
    docker_build -q -t "${images[3]}" "$WORK/kube-proxy" >/dev/null
    image_from_scratch "${images[4]}" "$TOOLS_DIR/etcd-$ETCD_VERSION/etcd" /usr/local/bin/etcd
    image_from_scratch "${images[5]}" "$TOOLS_DIR/coredns-$COREDNS_VERSION/coredns" /coredns
    image_from_scratch "${images[6]}" "$TOOLS_DIR/pause-$PAUSE_VERSION/pause" /pause

    mkdir -p "$ctx/bin" "$ctx/images"
    docker save -o "$ctx/images/kubernetes.tar" "${images[@]}"
    docker rmi "${images[@]}" >/dev/null
    cp "$bin/kubeadm" "$bin/kubelet" "$bin/kubectl" "$TOOLS_DIR/crictl-$CRICTL_VERSION/crictl" "$ctx/bin/"
    cp "$SCRIPT_DIR/oci-runtime-wrapper.sh" "$ctx/bin/sluice-runc"
    cp "$SCRIPT_DIR/node/sluice-node-setup" "$ctx/bin/"
    cp -r "$SCRIPT_DIR/node" "$ctx/node"
    cp -r "$(module_dir "sigs.k8s.io/kind@$KIND_VERSION")/images/base/files" "$ctx/kind-files"
    chmod -R u+w "$ctx/kind-files"
    log "node image $NODE_IMAGE"
    docker_build -t "$NODE_IMAGE" --build-arg BASE_IMAGE="$BASE_IMAGE" \
        --build-arg KUBERNETES_VERSION="$KUBERNETES_VERSION" --build-arg PAUSE_IMAGE="$PAUSE_IMAGE" \
        -f "$ctx/node/Dockerfile" "$ctx" >&2
}

build_postgres() {
    log "PostgreSQL image $POSTGRES_IMAGE"
    docker_build -t "$POSTGRES_IMAGE" --build-arg BASE_IMAGE="$BASE_IMAGE" "$SCRIPT_DIR/postgres" >&2
}

main() {
    command -v docker >/dev/null || die "docker is needed"
    if have_images; then
        log "images $TAG: in Docker already"
    elif [[ -f $ARCHIVE ]]; then
        log "images $TAG: loading $ARCHIVE"
        docker load -i "$ARCHIVE" >&2
    else
        [[ $(id -u) == 0 ]] || die "building the node image needs root (debootstrap)"
        local started=$SECONDS
        log "images $TAG: building (the first run takes a while; later runs load $ARCHIVE)"
        WORK=$(mktemp -d "${TMPDIR:-/tmp}/sluice-kind-images.XXXXXX")
        trap 'rm -rf "$WORK"' EXIT
        build_binaries
        docker image inspect "$BASE_IMAGE" >/dev/null 2>&1 || build_base
        build_node
        build_postgres
        mkdir -p "$TOOLS_DIR"
        # Older cache entries are of no use any more.
        rm -f "$TOOLS_DIR"/kind-images-*.tar
        docker save -o "$ARCHIVE.tmp" "$NODE_IMAGE" "$BASE_IMAGE" "$POSTGRES_IMAGE"
        mv -f "$ARCHIVE.tmp" "$ARCHIVE"
        log "images $TAG: built in $((SECONDS - started)) s, cached in $ARCHIVE"
    fi
    have_images || die "the images $TAG are not in Docker"
    print_names
}

case ${1:-} in
names) print_names ;;
"") main ;;
*)
    sed -n '2,7p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
    ;;
esac
