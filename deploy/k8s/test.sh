#!/usr/bin/env bash
# Checks the Kubernetes deployment offline (no cluster can run here):
#   - every manifest in deploy/k8s validates strictly against the real
#     Kubernetes JSON schemas of an older and the newest supported version
#     (validate.py over PyPI kubernetes-validate, installed in a venv), plus
#     the API-server rules validate.py adds;
#   - every deliberately broken manifest in testdata/ fails, with the error
#     its `# expect:` line names (so the check is proven able to fail);
#   - make-secrets.sh makes a private token and a certificate that verifies
#     against its CA for the Service's names and localhost.
# Prints one line per check and `N passed, N failed`; exits 1 if any failed.
#
# Settings: K8S_VERSIONS (default "1.30.0 1.37.0"), ROTSWEEP_K8S_VENV (the
# venv, default /tmp/rotsweep-k8s-venv; made on first use, needs
# python3-venv and the package index).
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
venv=${ROTSWEEP_K8S_VENV:-/tmp/rotsweep-k8s-venv}
versions=${K8S_VERSIONS:-1.30.0 1.37.0}
n_passed=0
n_failed=0
pass() {
    n_passed=$((n_passed + 1))
    echo "ok   $1"
}
fail() {
    n_failed=$((n_failed + 1))
    echo "FAIL $1"
}
finish() {
    echo "$n_passed passed, $n_failed failed"
    ((n_failed == 0))
    exit
}

if [[ ! -x $venv/bin/python ]] || ! "$venv/bin/python" -c 'import kubernetes_validate' 2>/dev/null; then
    if ! { python3 -m venv "$venv" && "$venv/bin/pip" install --quiet kubernetes-validate==1.37.0; }; then
        fail "installing kubernetes-validate into $venv"
        finish
    fi
fi
version_args=()
for v in $versions; do version_args+=(-k "$v"); done
validate() { "$venv/bin/python" "$here/validate.py" "${version_args[@]}" "$@"; }

# The manifests, all together (the cross-document rules see each other).
manifests=("$here"/*.yaml)
if out=$(validate "${manifests[@]}"); then
    pass "${#manifests[@]} manifests validate strictly against Kubernetes $versions ($(grep -c '^ok' <<<"$out") checks)"
else
    fail "the manifests validate"
    echo "$out" | grep -v '^ok' | sed 's/^/    /'
fi

for broken in "$here"/testdata/broken-*.yaml; do
    expect=$(sed -n 's/^# expect: //p' "$broken")
    name=$(basename "$broken")
    if [[ -z $expect ]]; then
        fail "$name has no '# expect:' line"
    elif out=$(validate "$broken"); then
        fail "$name is refused (it passed)"
    elif grep -qF -- "$expect" <<<"$out"; then
        pass "$name is refused: $expect"
    else
        fail "$name is refused for the wrong reason"
        echo "$out" | grep -v '^ok' | sed 's/^/    /'
    fi
done

# The secrets the manifests mount.
secrets=$(mktemp -d)
trap 'rm -rf "$secrets"' EXIT
if "$here/make-secrets.sh" --namespace sweeps "$secrets/out" >/dev/null; then
    pass "make-secrets.sh runs"
else
    fail "make-secrets.sh runs"
fi
modes=$(stat -c '%a %n' "$secrets/out"/{token,tls.key,ca.key} 2>&1)
if [[ $(grep -c '^600 ' <<<"$modes") == 3 ]]; then
    pass "the token and the keys are private (600)"
else
    fail "the token and the keys are private: $modes"
fi
for host in rotsweep-coordinator rotsweep-coordinator.sweeps.svc localhost; do
    if openssl verify -CAfile "$secrets/out/ca.crt" "$secrets/out/tls.crt" >/dev/null 2>&1 &&
        openssl x509 -in "$secrets/out/tls.crt" -noout -checkhost "$host" 2>/dev/null | grep -q 'does match'; then
        pass "the certificate verifies against the CA for $host"
    else
        fail "the certificate verifies against the CA for $host"
    fi
done
if openssl x509 -in "$secrets/out/tls.crt" -noout -checkhost elsewhere.example 2>/dev/null | grep -q 'does match'; then
    fail "the certificate is refused for another host"
else
    pass "the certificate is refused for another host"
fi
finish
