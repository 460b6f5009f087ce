#!/usr/bin/env bash
# Makes what the Kubernetes manifests expect in two Secrets: a random bearer
# token, and a private CA with a server certificate for the coordinator's
# Service names and localhost (for the in-pod probes and kubectl exec).
#
#   make-secrets.sh [--namespace NS] [--apply] DIR
#
# Writes DIR/token, DIR/ca.crt, DIR/ca.key, DIR/tls.crt, DIR/tls.key (all
# but ca.crt mode 600; keep DIR private, and keep ca.key to issue a new
# certificate later) and prints the `kubectl create secret` commands, or
# runs them with --apply. Needs openssl (and kubectl for --apply).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
namespace=default
apply=0
dir=""
while (($#)); do
    case $1 in
        --namespace) namespace=${2:?--namespace needs a name}; shift 2 ;;
        --namespace=*) namespace=${1#*=}; shift ;;
        --apply) apply=1; shift ;;
        -h | --help) sed -n '2,11p' "$0"; exit 0 ;;
        -*) echo "make-secrets.sh: unknown option $1" >&2; exit 2 ;;
        *) dir=$1; shift ;;
    esac
done
[[ -n $dir ]] || { echo "usage: $0 [--namespace NS] [--apply] DIR" >&2; exit 2; }

umask 077
mkdir -p "$dir"
if [[ ! -s $dir/token ]]; then
    od -An -N32 -tx1 /dev/urandom | tr -d ' \n' >"$dir/token"
fi
service=rotsweep-coordinator
"$here/../issue-cert.sh" "$dir" "$dir/tls.crt" "$dir/tls.key" \
    "$service" "$service.$namespace" "$service.$namespace.svc" \
    "$service.$namespace.svc.cluster.local" localhost 127.0.0.1

# Prints the command (quoted for a shell), or runs it with --apply.
secret() {
    local command=(kubectl --namespace "$namespace" create secret generic "$@")
    if ((apply)); then
        "${command[@]}"
    else
        printf '%q ' "${command[@]}"
        echo
    fi
}
secret rotsweep-token --from-file=token="$dir/token"
secret rotsweep-tls --from-file=tls.crt="$dir/tls.crt" --from-file=tls.key="$dir/tls.key" \
    --from-file=ca.crt="$dir/ca.crt"
