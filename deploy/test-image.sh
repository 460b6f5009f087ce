#!/usr/bin/env bash
# Builds the container image with podman (deploy/build-image.sh, in a private
# store under a temporary folder, removed afterwards) and runs it: both
# binaries print their version, and `rotsweep plan` reads the bundled
# example spec and Pfam data, which proves the libraries, the loader and
# the data are all in the image. Then the coordinator runs in the image with
# its state on a volume, and its health service answers from outside and,
# as a Kubernetes exec probe would ask it, from inside.
#
# Prints one line per check and `N passed, N failed`; exits 1 if any
# failed. Needs root, podman and runc. Binaries: ROTSWEEP_BIN_DIR, else
# target/release, else target/debug.
#
# Runs containers with runc, low ulimits and no network: on CI machines
# without systemd (cgroups v1+v2 hybrid) crun refuses to start, and root
# may lack CAP_SYS_RESOURCE for the default ulimits.
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
if [[ -n ${ROTSWEEP_BIN_DIR:-} ]]; then
    bin_dir=$ROTSWEEP_BIN_DIR
elif [[ -x $repo/target/release/rotsweep && -x $repo/target/release/rotsweep-worker ]]; then
    bin_dir=$repo/target/release
else
    bin_dir=$repo/target/debug
fi

n_passed=0
n_failed=0
check() {
    local what=$1
    shift
    if "$@"; then
        n_passed=$((n_passed + 1))
        echo "ok   $what"
    else
        n_failed=$((n_failed + 1))
        echo "FAIL $what"
    fi
}

store=$(mktemp -d /tmp/rotsweep-image-test.XXXXXX)
podman=(podman --root "$store/root" --runroot "$store/run" --storage-driver vfs)
cleanup() {
    "${podman[@]}" rm --all --force >/dev/null 2>&1 || true
    "${podman[@]}" rmi --all --force >/dev/null 2>&1 || true
    # conmon, podman's per-container monitor, outlives its container by a
    # moment: wait for those of this store before removing it.
    for _ in $(seq 1 50); do
        pgrep -f -- "$store" >/dev/null || break
        sleep 0.1
    done
    rm -rf "$store"
    echo "$n_passed passed, $n_failed failed"
    ((n_failed == 0))
    exit
}
trap cleanup EXIT

tag=localhost/rotsweep:ci
engine_opts=()
for opt in "${podman[@]:1}"; do engine_opts+=(--engine-opt="$opt"); done
check "the image builds with podman" \
    bash -c '"$@" >"'"$store"'/build.log" 2>&1 || { tail -n 20 "'"$store"'/build.log"; exit 1; }' _ \
    "$here/build-image.sh" --engine podman --bin-dir "$bin_dir" --tag "$tag" "${engine_opts[@]}"

run=("${podman[@]}" run --rm --runtime runc --network none
    --ulimit nofile=1024:1024 --ulimit nproc=1024:1024)
expected=$("$bin_dir/rotsweep" --version)
check "rotsweep --version runs in the image ($expected)" \
    test "$("${run[@]}" "$tag" --version 2>&1)" = "$expected"
check "rotsweep-worker --version runs in the image" \
    test "$("${run[@]}" --entrypoint /usr/local/bin/rotsweep-worker "$tag" --version 2>&1)" = "rotsweep-worker ${expected#rotsweep }"
check "the bundled example spec and data are readable" \
    bash -c '"$@" 2>&1 | grep -q "^sweep quick: 6 jobs"' _ \
    "${run[@]}" "$tag" plan /opt/rotsweep/examples/quick.toml
check "the image runs as a non-root user" \
    test "$("${podman[@]}" image inspect --format '{{.Config.User}}' "$tag")" = 65532:65532
size=$("${podman[@]}" image inspect --format '{{.Size}}' "$tag")
check "the image is small (under 100 MB: $((size / 1000000)) MB)" test "$size" -lt 100000000

# The coordinator in the image, as a cluster runs it: a volume for its state,
# the health service asked from outside and, like a Kubernetes exec probe,
# from inside. Host networking, loopback only (no token, so the server
# refuses anything else).
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
install -d -o 65532 -g 65532 "$store/state"
started=0
if "${podman[@]}" run -d --name rotsweep-ci-coordinator --runtime runc --network host \
    --ulimit nofile=1024:1024 --ulimit nproc=1024:1024 -v "$store/state:/var/lib/rotsweep" \
    "$tag" serve --state /var/lib/rotsweep --listen "127.0.0.1:$port" >/dev/null; then
    started=1
fi
check "the coordinator starts in the image" test "$started" = 1
serving() { "$bin_dir/rotsweep" health --coordinator "http://127.0.0.1:$port" --timeout 2 >/dev/null 2>&1; }
for _ in $(seq 1 100); do
    serving && break
    sleep 0.1
done
check "its health service answers SERVING from outside" serving
inside() {
    "${podman[@]}" exec rotsweep-ci-coordinator /usr/local/bin/rotsweep "$@" \
        --coordinator "http://127.0.0.1:$port" 2>&1
}
probe_inside() { [[ $(inside health) == SERVING ]]; }
submit_inside() { [[ $(inside submit /opt/rotsweep/examples/quick.toml) == *"sweep quick with 6 jobs"* ]]; }
check "rotsweep health answers SERVING inside the container (the probe)" probe_inside
check "a bundled example submits inside the container" submit_inside
check "its state is on the volume" test -s "$store/state/state.sqlite"
"${podman[@]}" stop --time 10 rotsweep-ci-coordinator >/dev/null 2>&1
check "the coordinator stops on SIGTERM with status 0" \
    test "$("${podman[@]}" inspect --format '{{.State.ExitCode}}' rotsweep-ci-coordinator 2>&1)" = 0
"${podman[@]}" rm --force rotsweep-ci-coordinator >/dev/null 2>&1
