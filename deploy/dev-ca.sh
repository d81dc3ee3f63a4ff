#!/usr/bin/env bash
# A development CA and certificates for Strata's controllers, agents and stratactl (openssl).
#
#   deploy/dev-ca.sh DIR NAME [NAME ...]
#
# Makes DIR/ca.pem (with DIR/ca-key.pem) once, then for each NAME that has none yet
# DIR/NAME.pem and DIR/NAME-key.pem: an ECDSA P-256 certificate for 825 days, signed by the CA,
# usable as a server and as a client certificate (extendedKeyUsage serverAuth, clientAuth), for
# the names DNS:NAME, DNS:localhost and IP:127.0.0.1, plus whatever STRATA_TLS_SANS adds (for
# example STRATA_TLS_SANS=IP:10.0.0.1,DNS:c1.example). Idempotent: existing files are kept.
# Keys are 0600. Not for production: keep a real CA's key offline.
set -euo pipefail
if [ "$#" -lt 2 ] || [ "$1" = "--help" ] || [ "$1" = "-h" ]; then
  sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'
  [ "$#" -ge 2 ] || exit 2
  exit 0
fi
dir=$1
shift
mkdir -p "$dir"
umask 077

if [ ! -s "$dir/ca.pem" ]; then
  openssl req -x509 -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:P-256 \
    -keyout "$dir/ca-key.pem" -out "$dir/ca.pem" -days 3650 -subj "/CN=Strata development CA" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
  chmod 0644 "$dir/ca.pem"
fi

for name in "$@"; do
  case "$name" in
    *[!A-Za-z0-9._-]* | "") echo "dev-ca: $name: use letters, digits, '.', '_' and '-'" >&2; exit 2 ;;
  esac
  [ -s "$dir/$name.pem" ] && continue
  sans="DNS:$name,DNS:localhost,IP:127.0.0.1${STRATA_TLS_SANS:+,$STRATA_TLS_SANS}"
  extensions=$(mktemp)
  trap 'rm -f "$extensions" "$dir/$name.csr"' EXIT
  printf '%s\n' \
    "basicConstraints=critical,CA:FALSE" \
    "keyUsage=critical,digitalSignature" \
    "extendedKeyUsage=serverAuth,clientAuth" \
    "subjectAltName=$sans" >"$extensions"
  openssl req -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:P-256 \
    -keyout "$dir/$name-key.pem" -out "$dir/$name.csr" -subj "/CN=$name" 2>/dev/null
  openssl x509 -req -in "$dir/$name.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca-key.pem" \
    -CAcreateserial -out "$dir/$name.pem" -days 825 -extfile "$extensions" 2>/dev/null
  chmod 0644 "$dir/$name.pem"
  rm -f "$extensions" "$dir/$name.csr"
  trap - EXIT
done
