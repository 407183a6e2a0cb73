#!/usr/bin/env bash
# Generate a throw-away test PKI in libvirt's file layout:
#
#   DIR/cacert.pem  DIR/cakey.pem                     test CA (CA:TRUE, keyCertSign)
#   DIR/servercert.pem  DIR/serverkey.pem             server: serverAuth, CN=localhost,
#                                                     SAN DNS:localhost IP:127.0.0.1 IP:::1
#   DIR/clientcert.pem  DIR/clientkey.pem             client: clientAuth, CN=sparsevirt-test-client
#
# That is the layout libvirt clients expect behind `?pkipath=DIR`, and what libvirtd is pointed
# at with ca_file / cert_file / key_file. Our own daemon and tests use the same files.
#
# Idempotent: if DIR already holds a complete set that verifies against its CA and is valid for
# at least another day, nothing is regenerated (use --force to regenerate).
# Uses openssl when present, else GnuTLS certtool (package gnutls-bin). Never for production.
#
# usage: scripts/setup-tls.sh DIR [--force] [--days N] [--tool openssl|certtool]
set -euo pipefail

die() { echo "setup-tls: $*" >&2; exit 1; }
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

dir=""
force=0
days=3650
tool=""
while [ $# -gt 0 ]; do
  case "$1" in
    --force) force=1 ;;
    --days) [ $# -ge 2 ] || die "--days needs a value"; days="$2"; shift ;;
    --tool) [ $# -ge 2 ] || die "--tool needs a value"; tool="$2"; shift ;;
    -h|--help) usage; exit 0 ;;
    -*) die "unknown option: $1 (see --help)" ;;
    *) [ -z "$dir" ] || die "only one DIR"; dir="$1" ;;
  esac
  shift
done
[ -n "$dir" ] || { usage >&2; exit 2; }

if [ -z "$tool" ]; then
  if command -v openssl >/dev/null 2>&1; then tool=openssl
  elif command -v certtool >/dev/null 2>&1; then tool=certtool
  else die "neither openssl nor certtool found (apt-get install openssl)"; fi
fi
command -v "$tool" >/dev/null 2>&1 || die "$tool not found"

files=(cacert.pem cakey.pem servercert.pem serverkey.pem clientcert.pem clientkey.pem)

up_to_date() {
  local f
  for f in "${files[@]}"; do [ -s "$dir/$f" ] || return 1; done
  command -v openssl >/dev/null 2>&1 || return 0   # cannot check further; trust the files
  for f in servercert.pem clientcert.pem; do
    openssl verify -CAfile "$dir/cacert.pem" "$dir/$f" >/dev/null 2>&1 || return 1
    openssl x509 -in "$dir/$f" -noout -checkend 86400 >/dev/null 2>&1 || return 1
  done
  openssl x509 -in "$dir/cacert.pem" -noout -checkend 86400 >/dev/null 2>&1 || return 1
}

if [ "$force" = 0 ] && up_to_date; then
  echo "setup-tls: $dir already holds a valid test PKI (use --force to regenerate)"
  exit 0
fi

mkdir -p "$dir"
chmod 0755 "$dir"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

gen_openssl() {
  # CA
  openssl req -x509 -new -newkey rsa:2048 -nodes -sha256 -days "$days" \
    -keyout "$work/cakey.pem" -out "$work/cacert.pem" \
    -subj "/O=sparsevirt test/CN=sparsevirt test CA" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -addext "subjectKeyIdentifier=hash" 2>/dev/null
  local serial=1 who cn eku san
  for who in server client; do
    if [ "$who" = server ]; then
      cn=localhost; eku=serverAuth; san="subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1"
    else
      cn=sparsevirt-test-client; eku=clientAuth; san="subjectAltName=DNS:localhost,IP:127.0.0.1"
    fi
    cat >"$work/$who.ext" <<EXT
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=$eku
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid
$san
EXT
    openssl req -new -newkey rsa:2048 -nodes -sha256 \
      -keyout "$work/${who}key.pem" -out "$work/$who.csr" \
      -subj "/O=sparsevirt test/CN=$cn" 2>/dev/null
    serial=$((serial + 1))
    openssl x509 -req -sha256 -days "$days" -in "$work/$who.csr" \
      -CA "$work/cacert.pem" -CAkey "$work/cakey.pem" -set_serial "$serial" \
      -extfile "$work/$who.ext" -out "$work/${who}cert.pem" 2>/dev/null
  done
}

gen_certtool() {
  certtool --generate-privkey --key-type rsa --bits 2048 --outfile "$work/cakey.pem" 2>/dev/null
  cat >"$work/ca.info" <<EOT
organization = sparsevirt test
cn = sparsevirt test CA
ca
cert_signing_key
crl_signing_key
expiration_days = $days
EOT
  certtool --generate-self-signed --load-privkey "$work/cakey.pem" --template "$work/ca.info" \
    --outfile "$work/cacert.pem" 2>/dev/null
  local who cn purpose
  for who in server client; do
    if [ "$who" = server ]; then cn=localhost; purpose=tls_www_server; else cn=sparsevirt-test-client; purpose=tls_www_client; fi
    certtool --generate-privkey --key-type rsa --bits 2048 --outfile "$work/${who}key.pem" 2>/dev/null
    cat >"$work/$who.info" <<EOT
organization = sparsevirt test
cn = $cn
dns_name = localhost
ip_address = 127.0.0.1
$( [ "$who" = server ] && echo "ip_address = ::1" )
$purpose
encryption_key
signing_key
expiration_days = $days
EOT
    certtool --generate-certificate --load-privkey "$work/${who}key.pem" \
      --load-ca-certificate "$work/cacert.pem" --load-ca-privkey "$work/cakey.pem" \
      --template "$work/$who.info" --outfile "$work/${who}cert.pem" 2>/dev/null
  done
}

case "$tool" in
  openssl) gen_openssl ;;
  certtool) gen_certtool ;;
  *) die "unknown tool: $tool" ;;
esac

for f in "${files[@]}"; do
  [ -s "$work/$f" ] || die "generation with $tool failed: $f missing"
done
# Install atomically-ish: keys 0600, certs 0644.
for f in "${files[@]}"; do
  case "$f" in *key.pem) mode=0600 ;; *) mode=0644 ;; esac
  install -m "$mode" "$work/$f" "$dir/$f"
done
echo "setup-tls: wrote test PKI to $dir with $tool (CA, server CN=localhost SAN localhost/127.0.0.1/::1, client)"
