#!/usr/bin/env bash
# Make a real libvirtd available on this machine for sparsevirt's integration tests and bench.
# Idempotent; run as root. Works without systemd (CI containers): starts the monolithic
# `libvirtd -d` with its own config file, so a distro /etc/libvirt/libvirtd.conf is never edited.
#
#   1. installs (apt, noninteractive, --no-install-recommends) what is missing of
#      libvirt-daemon libvirt-clients nbdkit libnbd-bin qemu-utils time strace bsdutils python3-libvirt
#      (+ openssl with --tcp-tls); python3-libvirt is libvirt's Python client, for /usr/bin/python3;
#      and for sparsevirtd's service tests systemd (systemd-analyze, systemd-socket-activate,
#      systemd-notify; not started: it need not be PID 1) and groff-base (man pages)
#   2. creates /var/log/libvirt, /var/run/libvirt and the qemu driver's user libvirt-qemu (groups
#      libvirt-qemu, kvm): without them the qemu driver, and so libvirtd, refuses to start
#   3. writes /etc/libvirt/sparsevirt-libvirtd.conf and starts libvirtd unless one answers already
#   4. waits until `virsh -c qemu:///system pool-list --all` answers (30 s; prints the log on failure)
#   5. defines + starts the scratch dir pool `svtest` with target /dev/shm/svtest
#
# Options:
#   --tcp-tls      also listen on 127.0.0.1:16509 (TCP, auth none) and 127.0.0.1:16514 (TLS) with a
#                  test PKI made by scripts/setup-tls.sh in $PKI_DIR. Restarts a libvirtd that was
#                  started without listeners (refuses when systemd manages it).
#   --no-install   do not run apt-get (fail if something is missing)
#   --no-pool      do not create the svtest pool
#   --restart      restart a libvirtd started by this script (e.g. after a config change)
#   --stop         stop a libvirtd started by this script and exit
# Environment:
#   PKI_DIR   (default /etc/pki/sparsevirt-test)   SVTEST_POOL (default svtest)
#   SVTEST_POOL_DIR (default /dev/shm/$SVTEST_POOL)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PKI_DIR="${PKI_DIR:-/etc/pki/sparsevirt-test}"
SVTEST_POOL="${SVTEST_POOL:-svtest}"
SVTEST_POOL_DIR="${SVTEST_POOL_DIR:-/dev/shm/$SVTEST_POOL}"
CONF=/etc/libvirt/sparsevirt-libvirtd.conf
PIDFILE=/run/libvirtd.pid
SOCK=/var/run/libvirt/libvirt-sock
LOG=/var/log/libvirt/libvirtd.log
URI=qemu:///system

tcp_tls=0 install=1 pool=1 restart=0 stop=0
for arg in "$@"; do
  case "$arg" in
    --tcp-tls) tcp_tls=1 ;;
    --no-install) install=0 ;;
    --no-pool) pool=0 ;;
    --restart) restart=1 ;;
    --stop) stop=1 ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "setup-libvirt: unknown option $arg (see --help)" >&2; exit 2 ;;
  esac
done

say() { echo "setup-libvirt: $*"; }
die() { echo "setup-libvirt: ERROR: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root (libvirtd's system instance and apt need it)"

# ---------------------------------------------------------------------------- 1. packages
declare -A pkg_of=(
  [libvirtd]=libvirt-daemon [virsh]=libvirt-clients [nbdkit]=nbdkit [nbdcopy]=libnbd-bin
  [qemu-img]=qemu-utils [/usr/bin/time]=time [strace]=strace [script]=bsdutils
  [systemd-analyze]=systemd [systemd-socket-activate]=systemd [systemd-notify]=systemd [groff]=groff-base
)
missing=()
for bin in "${!pkg_of[@]}"; do
  command -v "$bin" >/dev/null 2>&1 || missing+=("${pkg_of[$bin]}")
done
# libvirt's Python binding, for Debian's own interpreter (test/daemon-python.test.ts)
if ! /usr/bin/python3 -c 'import libvirt' >/dev/null 2>&1; then
  missing+=(python3-libvirt)
fi
if [ "$tcp_tls" = 1 ] && ! command -v openssl >/dev/null 2>&1 && ! command -v certtool >/dev/null 2>&1; then
  missing+=(openssl)
fi
if [ "${#missing[@]}" -gt 0 ]; then
  mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
  [ "$install" = 1 ] || die "missing packages: ${missing[*]} (and --no-install given)"
  say "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/tmp/setup-libvirt-apt.log 2>&1 \
    || { tail -n 30 /tmp/setup-libvirt-apt.log >&2; die "apt-get install failed"; }
else
  say "packages present (libvirtd virsh nbdkit nbdcopy qemu-img time strace script python3-libvirt systemd groff)"
fi

# ---------------------------------------------------------------------------- helpers
virsh_ok() { timeout 10 virsh -q -c "$URI" "$@" >/dev/null 2>&1; }
our_pid() {  # pid of a running libvirtd started with our config, if any
  local pid
  [ -s "$PIDFILE" ] || return 1
  pid="$(cat "$PIDFILE" 2>/dev/null)" || return 1
  [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || return 1
  local cmdline; cmdline="$(tr '\0' ' ' <"/proc/$pid/cmdline")"
  [[ "$cmdline" == *"$CONF"* ]] || return 1
  echo "$pid"
}
stop_ours() {
  local pid i
  pid="$(our_pid)" || return 0
  say "stopping libvirtd (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 1 100); do [ -d "/proc/$pid" ] || return 0; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  sleep 0.2
}
systemd_managed() { [ -d /run/systemd/system ]; }
# `virsh version` is no liveness probe here: it fails with "Cannot find suitable emulator" as no
# qemu-system binary is installed (not needed for storage). `pool-list --all` is what we need.
listeners_up() {
  timeout 10 virsh -q -c "qemu+tcp://127.0.0.1:16509/system" pool-list --all >/dev/null 2>&1 &&
  timeout 10 virsh -q -c "qemu+tls://127.0.0.1:16514/system?pkipath=$PKI_DIR" pool-list --all >/dev/null 2>&1
}

if [ "$stop" = 1 ]; then stop_ours; exit 0; fi

# ---------------------------------------------------------------------------- 2. dirs, user
mkdir -p /var/log/libvirt /var/run/libvirt /var/lib/libvirt /etc/libvirt
# Debian 12's qemu driver runs guests as libvirt-qemu:libvirt-qemu (and wants group kvm for
# /dev/kvm); without them the driver, and with it the whole daemon, refuses to initialise.
getent group kvm >/dev/null || groupadd --system kvm
getent group libvirt-qemu >/dev/null || groupadd --system libvirt-qemu
if ! getent passwd libvirt-qemu >/dev/null; then
  useradd --system --gid libvirt-qemu --groups kvm --home-dir /var/lib/libvirt --no-create-home \
    --shell /usr/sbin/nologin --comment "libvirt qemu (sparsevirt test setup)" libvirt-qemu
fi

# ---------------------------------------------------------------------------- 3. config
if [ "$tcp_tls" = 1 ]; then
  "$here/setup-tls.sh" "$PKI_DIR"
fi
conf_new="$(mktemp)"
{
  echo "# written by sparsevirt scripts/setup-libvirt.sh; started as: libvirtd -d -f $CONF [--listen]"
  echo 'log_outputs = "3:file:/var/log/libvirt/libvirtd.log"'
  echo 'unix_sock_rw_perms = "0770"'
  echo 'auth_unix_rw = "none"'
  echo 'auth_unix_ro = "none"'
  if [ "$tcp_tls" = 1 ]; then
    cat <<CONF
listen_addr = "127.0.0.1"
listen_tcp = 1
listen_tls = 1
tcp_port = "16509"
tls_port = "16514"
auth_tcp = "none"
auth_tls = "none"
ca_file = "$PKI_DIR/cacert.pem"
cert_file = "$PKI_DIR/servercert.pem"
key_file = "$PKI_DIR/serverkey.pem"
CONF
  fi
} >"$conf_new"
conf_changed=0
if ! cmp -s "$conf_new" "$CONF" 2>/dev/null; then
  install -m 0644 "$conf_new" "$CONF"
  conf_changed=1
fi
rm -f "$conf_new"

# ---------------------------------------------------------------------------- 4. daemon
start_daemon() {
  local args=(-d -f "$CONF")
  [ "$tcp_tls" = 1 ] && args+=(--listen)
  say "starting: libvirtd ${args[*]}"
  : >>"$LOG"
  local logstart; logstart="$(wc -l <"$LOG")"
  libvirtd "${args[@]}" || { tail -n 40 "$LOG" >&2; die "libvirtd failed to start"; }
  local i pid=""
  for i in $(seq 1 300); do   # 30 s
    if [ -S "$SOCK" ] && virsh_ok pool-list --all; then
      say "libvirtd answers on $SOCK (pid $(cat "$PIDFILE" 2>/dev/null || echo '?'))"
      return 0
    fi
    # The daemon writes its pid file early; once it is gone, it has died: stop waiting.
    [ -z "$pid" ] && [ -s "$PIDFILE" ] && pid="$(cat "$PIDFILE")"
    if [ -n "$pid" ] && [ ! -d "/proc/$pid" ]; then break; fi
    if [ -z "$pid" ] && [ "$i" -ge 50 ] && ! pidof libvirtd >/dev/null; then break; fi
    sleep 0.1
  done
  echo "---- $LOG (since start) ----" >&2
  tail -n "+$((logstart + 1))" "$LOG" | tail -n 60 >&2
  die "libvirtd did not answer (died, or no answer within 30 s); dmidecode, /dev/kvm, dnsmasq and D-Bus errors above are harmless"
}

if [ "$restart" = 1 ] || { [ "$conf_changed" = 1 ] && our_pid >/dev/null; }; then
  stop_ours
fi

if [ -S "$SOCK" ] && virsh_ok pool-list --all; then
  if [ "$tcp_tls" = 1 ] && ! listeners_up; then
    if our_pid >/dev/null || ! systemd_managed; then
      say "libvirtd runs without TCP/TLS listeners: restarting it with --listen"
      if our_pid >/dev/null; then stop_ours; else
        pid="$(cat "$PIDFILE" 2>/dev/null || pidof libvirtd || true)"
        [ -n "$pid" ] && kill -TERM $pid && sleep 1
      fi
      start_daemon
    else
      die "libvirtd is managed by systemd here; enable its TCP/TLS sockets yourself (libvirtd-tcp.socket, libvirtd-tls.socket)"
    fi
  else
    say "libvirtd already answers on $SOCK"
  fi
else
  # Not answering: a stale pid file is fine (libvirtd locks it), a hung daemon is not.
  if pid="$(pidof libvirtd)"; then
    say "a libvirtd ($pid) runs but does not answer; stopping it"
    kill -TERM $pid || true; sleep 1
  fi
  start_daemon
fi

virsh_ok pool-list --all || die "virsh -c $URI pool-list --all does not answer"

if [ "$tcp_tls" = 1 ]; then
  if listeners_up; then
    say "TCP 127.0.0.1:16509 (auth none) and TLS 127.0.0.1:16514 answer (pkipath=$PKI_DIR)"
  else
    tail -n 30 "$LOG" >&2
    die "TCP/TLS listeners do not answer"
  fi
fi

# ---------------------------------------------------------------------------- 5. scratch pool
if [ "$pool" = 1 ]; then
  "$here/scratch-pool.sh" up "$SVTEST_POOL" "$SVTEST_POOL_DIR"
fi

say "ready: virsh $(virsh --version), libvirtd $(libvirtd --version | awk '{print $NF}'), URI $URI"
