#!/usr/bin/env bash
# Issues a TLS server certificate for the rotsweep coordinator from a
# private CA, creating the CA on first use. Used by the Slurm coordinator
# job and by deploy/k8s/make-secrets.sh; needs openssl.
#
#   issue-cert.sh CA_DIR CERT KEY NAME [NAME...]
#
# CA_DIR holds ca.crt (what clients trust: ROTSWEEP_TLS_CA or --tls-ca)
# and ca.key (mode 600; whoever reads it can mint certificates clients
# trust, so keep it where the token is). CERT and KEY receive the server's
# certificate and key (mode 600), valid for every NAME (host names or IP
# addresses; the first is also the subject's common name) for
# ROTSWEEP_CERT_DAYS days (default 365). Keys are ECDSA P-256.
set -euo pipefail

if (($# < 4)); then
    echo "usage: $0 CA_DIR CERT KEY NAME [NAME...]" >&2
    exit 2
fi
ca_dir=$1 cert=$2 key=$3
shift 3
days=${ROTSWEEP_CERT_DAYS:-365}
command -v openssl >/dev/null || {
    echo "issue-cert.sh: openssl not found" >&2
    exit 1
}

umask 077
mkdir -p "$ca_dir"
if [[ ! -s $ca_dir/ca.crt ]]; then
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
        -keyout "$ca_dir/ca.key" -out "$ca_dir/ca.crt.tmp" -days 3650 \
        -subj "/CN=rotsweep private CA" \
        -addext basicConstraints=critical,CA:TRUE \
        -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null
    chmod 644 "$ca_dir/ca.crt.tmp"
    mv "$ca_dir/ca.crt.tmp" "$ca_dir/ca.crt"
fi

# subjectAltName: IP: for addresses, DNS: for names.
sans=()
for name in "$@"; do
    if [[ $name =~ ^[0-9.]+$ || $name == *:* ]]; then
        sans+=("IP:$name")
    else
        sans+=("DNS:$name")
    fi
done
san=$(
    IFS=,
    echo "${sans[*]}"
)

csr=$(mktemp)
ext=$(mktemp)
trap 'rm -f "$csr" "$ext"' EXIT
printf 'subjectAltName=%s\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n' \
    "$san" >"$ext"
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout "$key" -out "$csr" -subj "/CN=$1" 2>/dev/null
openssl x509 -req -in "$csr" -days "$days" \
    -CA "$ca_dir/ca.crt" -CAkey "$ca_dir/ca.key" \
    -set_serial "0x$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')" \
    -extfile "$ext" -out "$cert" 2>/dev/null
openssl verify -CAfile "$ca_dir/ca.crt" "$cert" >/dev/null
