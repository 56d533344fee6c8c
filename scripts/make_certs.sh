#!/usr/bin/env bash
# Make a private CA, a server certificate and a client certificate for the service's and the
# sidecar's TLS / mutual TLS (docs/security.md). Development and self-hosted use: the CA's
# key is written next to the certificates; keep it out of the containers.
#
#   scripts/make_certs.sh OUT_DIR [SERVER_NAME ...]
#
# OUT_DIR gets (a fresh set each run, keys mode 0600):
#   ca.pem      the CA certificate: --tls-client-ca-file of the servers, --tls-ca-file of
#               clients, --telemetry-tls-ca-file of the service
#   server.pem  server.key   --tls-cert-file / --tls-key-file of the service and the sidecar;
#               valid for localhost, 127.0.0.1, ::1 and every SERVER_NAME (e.g. the compose
#               service names: service sidecar)
#   client.pem  client.key   a client certificate for mutual TLS (the reporter, specdec-client)
set -euo pipefail

if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
  echo "usage: $0 OUT_DIR [SERVER_NAME ...]" >&2
  exit 2
fi
out=$1
shift
days=${SPECDEC_CERT_DAYS:-365}
mkdir -p "$out"
umask 077
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

san="DNS:localhost,IP:127.0.0.1,IP:::1"
for name in "$@"; do
  san="$san,DNS:$name"
done

key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

key "$out/ca.key"
openssl req -x509 -new -key "$out/ca.key" -sha256 -days "$days" -subj "/CN=specdec private CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
  -out "$out/ca.pem"

issue() {  # issue NAME CN EXTENSIONS
  key "$out/$1.key"
  openssl req -new -key "$out/$1.key" -subj "/CN=$2" -out "$work/$1.csr"
  printf '%s\n' "$3" > "$work/$1.ext"
  openssl x509 -req -in "$work/$1.csr" -CA "$out/ca.pem" -CAkey "$out/ca.key" -CAcreateserial \
    -CAserial "$work/ca.srl" -sha256 -days "$days" -extfile "$work/$1.ext" -out "$out/$1.pem" 2>/dev/null
}

issue server "specdec server" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=$san"
issue client "specdec client" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth"

chmod 0644 "$out/ca.pem" "$out/server.pem" "$out/client.pem"
echo "wrote $out/{ca,server,client}.{pem,key}; server.pem is valid for $san"
