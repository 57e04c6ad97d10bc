#!/usr/bin/env bash
# Make a throw-away CA, a broker certificate and client certificates with openssl, for tests and a first
# bench set-up. NOT for production keys: use your plant PKI there (keys generated on the device, a CA kept
# offline, real expiry and revocation).
#
#   make-certs.sh OUTDIR [--host NAME]... [--ip ADDR]... [--client NAME]... [--days N]
#
# Writes OUTDIR/ca.{crt,key}, OUTDIR/server.{crt,key} (subjectAltName: localhost, 127.0.0.1, ::1 plus
# every --host/--ip) and OUTDIR/<client>.{crt,key}. Keys are EC P-256, mode 0600. Existing files are
# kept, so a rerun only adds what is missing.
set -euo pipefail
umask 077

usage() { sed -n '2,11s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; exit "${1:-0}"; }

(($#)) || usage 2
[[ "$1" == -h || "$1" == --help ]] && usage 0
out="$1"
shift
sans=("DNS:localhost" "IP:127.0.0.1" "IP:::1")
clients=()
days=825
while (($#)); do
    case "$1" in
        --host) sans+=("DNS:${2:?--host needs a name}"); shift 2 ;;
        --ip) sans+=("IP:${2:?--ip needs an address}"); shift 2 ;;
        --client) clients+=("${2:?--client needs a name}"); shift 2 ;;
        --days) days="${2:?--days needs a number}"; shift 2 ;;
        -h | --help) usage 0 ;;
        *) echo "make-certs.sh: unknown argument '$1'" >&2; usage 2 ;;
    esac
done
mkdir -p "$out"

# Sign OUTDIR/<name>.crt for a new key; $2 is the extensions section (server or client usage).
issue() {
    local name="$1" extensions="$2"
    [[ -f "$out/$name.crt" ]] && return 0
    openssl req -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:P-256 -subj "/CN=$name" \
        -keyout "$out/$name.key" -out "$out/$name.csr" 2>/dev/null
    openssl x509 -req -in "$out/$name.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" -CAcreateserial \
        -days "$days" -sha256 -extfile <(printf '%s' "$extensions") -out "$out/$name.crt" 2>/dev/null
    rm -f "$out/$name.csr"
    chmod 0644 "$out/$name.crt"
}

if [[ ! -f "$out/ca.crt" ]]; then
    openssl req -x509 -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:P-256 -days "$days" -sha256 \
        -subj "/CN=tdad-inspector test CA" -keyout "$out/ca.key" -out "$out/ca.crt" \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
        2>/dev/null
    chmod 0644 "$out/ca.crt"
fi
san_list="$(IFS=,; echo "${sans[*]}")"
issue server "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=$san_list
"
for client in "${clients[@]}"; do
    issue "$client" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth
"
done
echo "make-certs.sh: test certificates in $out (not for production)"
