#!/usr/bin/env bash
# An sshd on 127.0.0.1 for the tests of sparsevirt's ssh transport (qemu+ssh://). Idempotent; run
# as root. Works without systemd: starts its own `sshd -f` with a config file of its own, on a port
# of its own, so a distro sshd (if any) is never touched.
#
#   1. installs (apt, noninteractive) what is missing of openssh-server, openssh-client and
#      netcat-openbsd (libvirt's fallback proxy when virt-ssh-helper is missing)
#   2. makes a key pair for the tests in $SSH_DIR (id_ed25519), authorized for root by a file of
#      the test sshd's own (root's ~/.ssh is left alone), and the test sshd's host key there too
#   3. starts `sshd -f $SSH_DIR/sshd_config` on 127.0.0.1:$SSH_PORT unless it answers already,
#      and waits until `ssh ... true` works (20 s)
#
# Environment: SSH_DIR (default /etc/pki/sparsevirt-test/ssh), SSH_PORT (default 2222)
set -euo pipefail

SSH_DIR="${SSH_DIR:-/etc/pki/sparsevirt-test/ssh}"
SSH_PORT="${SSH_PORT:-2222}"
say() { echo "setup-ssh: $*"; }
die() { echo "setup-ssh: ERROR: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root"

missing=()
[ -x /usr/sbin/sshd ] || missing+=(openssh-server)
command -v ssh >/dev/null 2>&1 || missing+=(openssh-client)
# netcat with unix sockets (-U): OpenBSD's; netcat-traditional has no -U
nc -h 2>&1 | grep -q -- '-U' || missing+=(netcat-openbsd)
if [ "${#missing[@]}" -gt 0 ]; then
  say "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # the package must not start a distro sshd (no systemd here, and port 22 is not ours)
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    trap 'rm -f /usr/sbin/policy-rc.d; exit 130' INT TERM
  fi
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/tmp/setup-ssh-apt.log 2>&1 \
    || { tail -n 30 /tmp/setup-ssh-apt.log >&2; die "apt-get install failed"; }
fi

mkdir -p "$SSH_DIR" /run/sshd
chmod 700 "$SSH_DIR"
[ -f "$SSH_DIR/id_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -C sparsevirt-test -f "$SSH_DIR/id_ed25519"
cp "$SSH_DIR/id_ed25519.pub" "$SSH_DIR/authorized_keys"
chmod 600 "$SSH_DIR/authorized_keys"
[ -f "$SSH_DIR/ssh_host_ed25519_key" ] || ssh-keygen -q -t ed25519 -N '' -C sparsevirt-test-host -f "$SSH_DIR/ssh_host_ed25519_key"
# sshd without PAM refuses an account whose password field starts with '!' ("locked") even for a
# key; '*' locks out passwords just the same
if getent shadow root | cut -d: -f2 | grep -q '^!'; then
  say "root's password field starts with '!': setting it to '*' (no password login either way)"
  usermod -p '*' root
fi
cat > "$SSH_DIR/sshd_config" <<CONF
ListenAddress 127.0.0.1
Port $SSH_PORT
HostKey $SSH_DIR/ssh_host_ed25519_key
PidFile /run/sparsevirt-test-sshd.pid
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
AuthorizedKeysFile $SSH_DIR/authorized_keys
StrictModes no
UsePAM no
MaxStartups 64:30:128
MaxSessions 64
Subsystem sftp internal-sftp
CONF

probe() {
  timeout 10 ssh -q -p "$SSH_PORT" -i "$SSH_DIR/id_ed25519" -o BatchMode=yes -o StrictHostKeyChecking=no \
    -o UserKnownHostsFile=/dev/null -o ConnectTimeout=5 root@127.0.0.1 true 2>/dev/null
}
if probe; then
  say "sshd answers on 127.0.0.1:$SSH_PORT"
  exit 0
fi
/usr/sbin/sshd -t -f "$SSH_DIR/sshd_config" || die "sshd rejects its config"
if (exec 3<>"/dev/tcp/127.0.0.1/$SSH_PORT") 2>/dev/null; then
  die "127.0.0.1:$SSH_PORT is taken by something that is not our test sshd (SSH_PORT=... to choose another)"
fi
/usr/sbin/sshd -f "$SSH_DIR/sshd_config" || die "sshd did not start (see above)"
for _ in $(seq 40); do
  if probe; then say "sshd started on 127.0.0.1:$SSH_PORT (key $SSH_DIR/id_ed25519)"; exit 0; fi
  sleep 0.5
done
die "sshd did not answer on 127.0.0.1:$SSH_PORT"
