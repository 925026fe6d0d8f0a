#!/bin/sh
# An OCI runtime in front of runc, for machines whose capability bounding set lacks
# CAP_SYS_RESOURCE (issue 14). Docker (for kind's privileged node containers) and the node's own
# containerd (for privileged pods) ask runc for every capability; runc then fails with "unable to
# apply caps: operation not permitted". Kubelet also gives pod sandboxes an oom_score_adj of -998,
# and lowering it needs the same capability ("can't get final child's PID from pipe: EOF").
#
# So before `create`/`run` this edits the bundle's config.json, and before `exec` the --process
# file: CAP_SYS_RESOURCE is removed from every capability set and a negative oomScoreAdj becomes 0.
# Everything else goes to runc unchanged. Registered with
#   dockerd --add-runtime sluice-runc=PATH --default-runtime sluice-runc
# or as containerd's CRI runc `BinaryName`. Needs jq.
set -eu

runc=""
for candidate in /usr/sbin/runc /usr/bin/runc /usr/local/sbin/runc /usr/local/bin/runc; do
    if [ -x "$candidate" ] && [ "$candidate" != "$0" ]; then
        runc=$candidate
        break
    fi
done
[ -n "$runc" ] || { echo "oci-runtime-wrapper: no runc found" >&2; exit 127; }

# The subcommand is the first argument that is neither a global flag nor a global flag's value.
command="" bundle="" process="" previous=""
for arg in "$@"; do
    case $previous in
    --bundle | -b) bundle=$arg ;;
    --process | -p) process=$arg ;;
    esac
    case $arg in
    --bundle=*) bundle=${arg#--bundle=} ;;
    --process=*) process=${arg#--process=} ;;
    esac
    if [ -z "$command" ]; then
        case $previous in
        --root | --log | --log-format | --criu) ;;
        *) case $arg in -*) ;; *) command=$arg ;; esac ;;
        esac
    fi
    previous=$arg
done

fix='def fix:
  (if .capabilities then .capabilities |= with_entries(.value |= map(select(. != "CAP_SYS_RESOURCE"))) else . end)
  | (if (.oomScoreAdj // 0) < 0 then .oomScoreAdj = 0 else . end);'

# edit FILE FILTER: rewrites FILE in place when it asks for what this machine cannot give.
edit() {
    [ -f "$1" ] || return 0
    grep -q -e CAP_SYS_RESOURCE -e '"oomScoreAdj": *-' "$1" || return 0
    jq -c "$fix $2" "$1" >"$1.sluice-tmp"
    chmod --reference="$1" "$1.sluice-tmp" 2>/dev/null || true
    mv -f "$1.sluice-tmp" "$1"
}

case $command in
create | run) edit "${bundle:-.}/config.json" 'if .process then .process |= fix else . end' ;;
exec) [ -z "$process" ] || edit "$process" 'fix' ;;
esac
exec "$runc" "$@"
