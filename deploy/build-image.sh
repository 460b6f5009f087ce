#!/usr/bin/env bash
# Builds the rotsweep container image (deploy/Containerfile) from binaries
# already built on this machine: stages a build context with the binaries
# (stripped), the shared libraries they load and their loader (copied from
# this machine, so the image needs no base image), the CA bundle and the
# examples, then runs podman (or docker, or buildah) build.
#
#   build-image.sh [--bin-dir DIR] [--tag TAG] [--engine ENGINE]
#                  [--engine-opt OPT]... [-- BUILD-ARGS...]
#
# --bin-dir  folder with rotsweep and rotsweep-worker (default
#            target/release); a static build (RUSTFLAGS='-C
#            target-feature=+crt-static') needs no libraries
# --tag      image name (default rotsweep:VERSION)
# --engine   podman, docker or buildah (default: the first found)
# --engine-opt  an option for the engine itself, before `build` (e.g.
#            --engine-opt=--root=DIR for a private podman store)
# Arguments after -- go to the engine's build command.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
bin_dir=$repo/target/release
tag=""
engine=""
engine_opts=()
extra=()
while (($#)); do
    case $1 in
        --bin-dir) bin_dir=${2:?--bin-dir needs a folder}; shift 2 ;;
        --tag) tag=${2:?--tag needs a name}; shift 2 ;;
        --engine) engine=${2:?--engine needs a name}; shift 2 ;;
        --engine-opt) engine_opts+=("${2:?--engine-opt needs a value}"); shift 2 ;;
        --engine-opt=*) engine_opts+=("${1#*=}"); shift ;;
        --) shift; extra=("$@"); break ;;
        -h | --help) sed -n '2,21p' "$0"; exit 0 ;;
        *) echo "build-image.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
die() {
    echo "build-image.sh: error: $*" >&2
    exit 1
}
for exe in rotsweep rotsweep-worker; do
    [[ -x $bin_dir/$exe ]] || die "$bin_dir/$exe is missing (cargo build --release)"
done
if [[ -z $engine ]]; then
    for candidate in podman docker buildah; do
        command -v "$candidate" >/dev/null && { engine=$candidate; break; }
    done
fi
[[ -n $engine ]] || die "no podman, docker or buildah found"
version=$("$bin_dir/rotsweep" --version | awk '{print $2}')
tag=${tag:-rotsweep:$version}

context=$(mktemp -d)
trap 'rm -rf "$context"' EXIT
root=$context/rootfs
install -d -m 755 "$root" "$root/usr/local/bin" "$root/var/lib/rotsweep" "$root/tmp" "$root/opt/rotsweep"
chmod 1777 "$root/tmp"
for exe in rotsweep rotsweep-worker; do
    cp "$bin_dir/$exe" "$root/usr/local/bin/$exe"
    # Line tables make up most of the file; backtraces keep function names.
    if command -v strip >/dev/null; then
        strip --strip-debug "$root/usr/local/bin/$exe"
    fi
done

# Every library the binaries load, and the loader, at the same paths.
for exe in rotsweep rotsweep-worker; do
    ldd "$bin_dir/$exe" 2>/dev/null | grep -o '/[^ ]*' || true
done | sort -u | while read -r lib; do
    install -D -m 755 "$(readlink -f "$lib")" "$root$lib"
done
[[ -f /etc/ssl/certs/ca-certificates.crt ]] &&
    install -D -m 644 /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
cp -r "$repo/examples" "$root/opt/rotsweep/examples"
chown -R 0:0 "$root" 2>/dev/null || true
chown 65532:65532 "$root/var/lib/rotsweep" 2>/dev/null || true
cp "$here/Containerfile" "$context/Containerfile"

case $engine in
    buildah) buildah "${engine_opts[@]}" bud "${extra[@]}" -f "$context/Containerfile" -t "$tag" "$context" ;;
    *) "$engine" "${engine_opts[@]}" build "${extra[@]}" -f "$context/Containerfile" -t "$tag" "$context" ;;
esac
echo "built $tag"
