#!/usr/bin/env bash
# A single-node Ceph cluster on loopback for sparsevirt's RBD code and tests. Idempotent; run as
# root. Works without systemd (CI containers): the daemons run as plain background processes.
#
#   1. installs (apt, noninteractive, --no-install-recommends) what is missing of
#      ceph-mon ceph-osd ceph-mgr ceph-common librbd1 librados2, and for libvirt and the bench
#      libvirt-daemon-driver-storage-rbd qemu-block-extra. Services are not started or restarted
#      by the packages (a policy-rc.d denies it while apt runs): libvirtd loads the RBD backend
#      only when it is (re)started, which this script leaves to its caller.
#   2. one mon (a), one mgr (x), one OSD (0) with the memstore object store (data in the OSD's
#      memory, capped by SPARSEVIRT_CEPH_STORE_BYTES), cephx required everywhere, on 127.0.0.1
#      (v2 port 3300, v1 port 6789). Objects are plain buffers (`memstore page set = false`): the
#      paged objects miscount their usage after sparse writes, and removing them then wraps the
#      OSD's usage round to 16 EiB, which marks the OSD full and stops every write for good
#      (`rbd bench` of 40 MiB of random 4 KiB writes into a 1 GiB image, then `rbd rm`, does it).
#   3. a pool `rbd` initialised for RBD, and a user client.libvirt with
#      mon 'profile rbd' osd 'profile rbd pool=rbd' (what libvirt's pool XML would name).
#   4. writes what clients need into $CEPH_DIR (default /var/lib/sparsevirt-ceph):
#        ceph.conf                      the cluster's config (also /etc/ceph/ceph.conf, see below)
#        ceph.client.admin.keyring      client.admin (all caps)
#        ceph.client.libvirt.keyring    client.libvirt
#        client.libvirt.key             its key, base64: the value of a libvirt `ceph` secret
#        cluster.json, cluster.env      all of the above, for tests (JSON) and shells (sourced)
#      /etc/ceph/ceph.conf and the two keyrings are installed there too (so `ceph`, `rbd` and
#      `qemu-img rbd:...` work without options), unless /etc/ceph/ceph.conf belongs to another
#      cluster, which is left alone.
#
# A cluster that answers is reused. A monitor or manager of ours that died is started again; when
# the OSD died (its memstore data with it) or the cluster still does not come up, it is stopped,
# wiped and made anew (a new fsid and new keys: read them from cluster.json each time).
#
# Options:
#   --no-install   do not run apt-get (fail if something is missing)
#   --reset        stop and wipe the cluster, then make a new one
#   --stop         stop the cluster's daemons and exit (the memstore OSD's data is lost)
#   --status       print whether the cluster answers and exit (0 when it does)
# Environment:
#   CEPH_DIR (default /var/lib/sparsevirt-ceph)
#   SPARSEVIRT_CEPH_STORE_BYTES (default 6 GiB: the memstore cap)
set -euo pipefail

CEPH_DIR="${CEPH_DIR:-/var/lib/sparsevirt-ceph}"
STORE_BYTES="${SPARSEVIRT_CEPH_STORE_BYTES:-$((6 << 30))}"
CONF="$CEPH_DIR/ceph.conf"
MARK="# sparsevirt scripts/setup-ceph.sh"
MON_ID=a MGR_ID=x
MON_V2=127.0.0.1:3300 MON_V1=127.0.0.1:6789
POOL=rbd PG_NUM=8
LIBVIRT_USER=libvirt

install=1 reset=0 stop=0 status=0
for arg in "$@"; do
  case "$arg" in
    --no-install) install=0 ;;
    --reset) reset=1 ;;
    --stop) stop=1 ;;
    --status) status=1 ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "setup-ceph: unknown option $arg (see --help)" >&2; exit 2 ;;
  esac
done

t0=$SECONDS
say() { echo "setup-ceph: [t+$((SECONDS - t0))s] $*"; }
die() { echo "setup-ceph: ERROR: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root (apt and the cluster's directories need it)"

# ---------------------------------------------------------------------------- 1. packages
install_packages() {
  local -A pkg_of=(
    [ceph-mon]=ceph-mon [ceph-osd]=ceph-osd [ceph-mgr]=ceph-mgr [ceph]=ceph-common
    [rbd]=ceph-common [ceph-authtool]=ceph-common [monmaptool]=ceph-base
  )
  local missing=() bin pkg
  for bin in "${!pkg_of[@]}"; do
    command -v "$bin" >/dev/null 2>&1 || missing+=("${pkg_of[$bin]}")
  done
  for pkg in librbd1 librados2 libvirt-daemon-driver-storage-rbd qemu-block-extra; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
  done
  if [ "${#missing[@]}" -eq 0 ]; then
    say "packages present (ceph $(ceph --version 2>/dev/null | awk '{print $3}'))"
    return
  fi
  mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
  [ "$install" = 1 ] || die "missing packages: ${missing[*]} (and --no-install given)"
  say "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # No service may be started or restarted by a package's scripts (libvirtd is running).
  local policy=/usr/sbin/policy-rc.d ours=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod 0755 "$policy"; ours=1
  fi
  local log=/tmp/setup-ceph-apt.log rc=0
  {
    # an old or missing package list cannot resolve ceph's dependencies
    if ! apt-get -o DPkg::Lock::Timeout=300 install -y -q --no-install-recommends "${missing[@]}"; then
      apt-get -o DPkg::Lock::Timeout=300 update -q &&
      apt-get -o DPkg::Lock::Timeout=300 install -y -q --no-install-recommends "${missing[@]}"
    fi
  } >"$log" 2>&1 || rc=$?
  [ "$ours" = 1 ] && rm -f "$policy"
  [ "$rc" = 0 ] || { tail -n 30 "$log" >&2; die "apt-get install failed (log: $log)"; }
  say "installed (ceph $(ceph --version | awk '{print $3}'))"
}

# ---------------------------------------------------------------------------- helpers
# Every ceph CLI call is bounded: a monitor that does not answer must not hang the script.
cephq() { timeout 30 ceph -c "$CONF" --connect-timeout 15 "$@"; }
pid_of() {  # pid of our daemon $1 (mon.a, osd.0, mgr.x) if it runs
  local f="$CEPH_DIR/run/ceph-$1.pid" pid
  [ -s "$f" ] || return 1
  pid="$(cat "$f" 2>/dev/null)" || return 1
  [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "$CONF" || return 1
  echo "$pid"
}
stop_daemons() {
  local d pid pids=()
  # a memstore OSD writes all its data to disk on a clean shutdown: it is killed instead (the
  # data is disposable)
  if pid="$(pid_of osd.0)"; then kill -KILL "$pid" 2>/dev/null || true; pids+=("$pid"); fi
  for d in mgr.$MGR_ID mon.$MON_ID; do
    if pid="$(pid_of "$d")"; then kill -TERM "$pid" 2>/dev/null || true; pids+=("$pid"); fi
  done
  # daemons started from this conf whose pid files are gone
  for pid in $(pgrep -f -- "-c $CONF" || true); do
    case "$(cat "/proc/$pid/comm" 2>/dev/null)" in
      ceph-osd) kill -KILL "$pid" 2>/dev/null || true; pids+=("$pid") ;;
      ceph-mon|ceph-mgr) kill -TERM "$pid" 2>/dev/null || true; pids+=("$pid") ;;
    esac
  done
  local i
  for i in $(seq 1 50); do
    local alive=0
    for pid in "${pids[@]}"; do [ -d "/proc/$pid" ] && alive=1; done
    [ "$alive" = 0 ] && return 0
    sleep 0.1
  done
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  sleep 0.2
}
osd_up() { [ "$(cephq osd stat -f json 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin).get("num_up_osds", 0))' 2>/dev/null)" = 1 ]; }
# pool statistics (rados_ioctx_pool_stat, libvirt's pool allocation) come from the manager
mgr_up() { [ "$(cephq mgr stat -f json 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin).get("available", False))' 2>/dev/null)" = True ]; }
# The cluster is usable: the monitor answers for client.admin, the OSD is up, a manager is
# active, the pool and the libvirt user exist, and client.libvirt can list the pool.
healthy() {
  [ -s "$CONF" ] && pid_of mon.$MON_ID >/dev/null && pid_of osd.0 >/dev/null && pid_of mgr.$MGR_ID >/dev/null || return 1
  osd_up && mgr_up || return 1
  # a full OSD takes no writes until data is removed: tests cannot use it
  ! cephq health 2>/dev/null | grep -qwE 'full osd|pool\(s\) full' || return 1
  timeout 10 rbd -c "$CONF" --id "$LIBVIRT_USER" --keyring "$CEPH_DIR/ceph.client.$LIBVIRT_USER.keyring" \
    ls "$POOL" >/dev/null 2>&1
}
wait_for() {  # wait_for SECONDS WHAT CMD...
  local limit=$1 what=$2; shift 2
  local end=$((SECONDS + limit))
  until "$@"; do
    [ "$SECONDS" -lt "$end" ] || return 1
    sleep 0.5
  done
  say "$what"
}

if [ "$stop" = 1 ]; then stop_daemons; say "stopped"; exit 0; fi
if [ "$status" = 1 ]; then
  if healthy; then say "cluster answers ($CONF)"; exit 0; else say "cluster does not answer"; exit 1; fi
fi

install_packages

# ---------------------------------------------------------------------------- 2. reuse or repair
write_outputs() {
  local key; key="$(cat "$CEPH_DIR/client.$LIBVIRT_USER.key")"
  cat >"$CEPH_DIR/cluster.env" <<ENV
# $MARK: source this file
CEPH_CONF=$CONF
CEPH_DIR=$CEPH_DIR
CEPH_MON_HOST=$MON_V1
CEPH_MON_HOST_V2=$MON_V2
CEPH_POOL=$POOL
CEPH_ADMIN_KEYRING=$CEPH_DIR/ceph.client.admin.keyring
CEPH_LIBVIRT_USER=$LIBVIRT_USER
CEPH_LIBVIRT_KEYRING=$CEPH_DIR/ceph.client.$LIBVIRT_USER.keyring
CEPH_LIBVIRT_KEY=$key
ENV
  cat >"$CEPH_DIR/cluster.json" <<JSON
{
  "conf": "$CONF",
  "dir": "$CEPH_DIR",
  "fsid": "$(cat "$CEPH_DIR/fsid")",
  "monitors": [{ "host": "127.0.0.1", "port": 6789 }],
  "monHostV2": "$MON_V2",
  "pool": "$POOL",
  "admin": { "user": "admin", "keyring": "$CEPH_DIR/ceph.client.admin.keyring", "key": "$(cat "$CEPH_DIR/client.admin.key")" },
  "libvirt": { "user": "$LIBVIRT_USER", "keyring": "$CEPH_DIR/ceph.client.$LIBVIRT_USER.keyring", "key": "$key" },
  "storeBytes": $STORE_BYTES
}
JSON
  # /etc/ceph: only when it is free or already ours
  mkdir -p /etc/ceph
  if [ ! -e /etc/ceph/ceph.conf ] || grep -q "$MARK" /etc/ceph/ceph.conf 2>/dev/null; then
    install -m 0644 "$CONF" /etc/ceph/ceph.conf
    install -m 0600 "$CEPH_DIR/ceph.client.admin.keyring" /etc/ceph/ceph.client.admin.keyring
    install -m 0600 "$CEPH_DIR/ceph.client.$LIBVIRT_USER.keyring" "/etc/ceph/ceph.client.$LIBVIRT_USER.keyring"
    etc_note="/etc/ceph/ceph.conf and keyrings installed"
  else
    etc_note="/etc/ceph/ceph.conf belongs to another cluster: left alone (use -c $CONF)"
  fi
}
report() {
  write_outputs
  say "ready in $((SECONDS - t0)) s: $1"
  say "conf $CONF; monitors v1 $MON_V1, v2 $MON_V2; pool $POOL; users client.admin, client.$LIBVIRT_USER"
  say "keyrings $CEPH_DIR/ceph.client.{admin,$LIBVIRT_USER}.keyring; libvirt secret value in $CEPH_DIR/client.$LIBVIRT_USER.key"
  say "for tests and shells: $CEPH_DIR/cluster.json, $CEPH_DIR/cluster.env; $etc_note"
}

# The daemons fork into the background; what they print before that goes to their log directory.
start_mon() { ceph-mon -c "$CONF" -i $MON_ID >>"$CEPH_DIR/log/start.log" 2>&1; }
start_osd() { ceph-osd -c "$CONF" -i 0 >>"$CEPH_DIR/log/start.log" 2>&1; }
start_mgr() { ceph-mgr -c "$CONF" -i $MGR_ID >>"$CEPH_DIR/log/start.log" 2>&1; }

# a cluster made by an older version of this script (its OSD on paged objects) is made anew
if [ "$reset" = 0 ] && [ -s "$CONF" ] && grep -q "$MARK" "$CONF" && grep -q '^memstore page set = false$' "$CONF" \
  && [ -s "$CEPH_DIR/client.$LIBVIRT_USER.key" ]; then
  if healthy; then report "reused the running cluster"; exit 0; fi
  # Repair what can be: a monitor or manager that died is started again (their state is on
  # disk). An OSD that died lost its memstore data: then the cluster is made anew.
  if pid_of osd.0 >/dev/null; then
    repaired=1
    if ! pid_of mon.$MON_ID >/dev/null; then
      if [ -e "$CEPH_DIR/mon/ceph-$MON_ID/done" ]; then say "starting mon.$MON_ID"; start_mon || repaired=0; else repaired=0; fi
    fi
    if [ "$repaired" = 1 ] && ! pid_of mgr.$MGR_ID >/dev/null; then
      if [ -s "$CEPH_DIR/mgr/ceph-$MGR_ID/keyring" ]; then say "starting mgr.$MGR_ID"; start_mgr || repaired=0; else repaired=0; fi
    fi
    if [ "$repaired" = 1 ] && wait_for 30 "cluster repaired" healthy; then
      report "repaired the cluster"; exit 0
    fi
    say "the cluster does not come up: making it anew"
  else
    say "osd.0 is not running (its memstore data is gone): making the cluster anew"
  fi
fi

# ---------------------------------------------------------------------------- 3. a new cluster
stop_daemons
rm -rf "$CEPH_DIR"
mkdir -p "$CEPH_DIR"/{run,log,mon,osd/ceph-0,mgr/ceph-$MGR_ID}
chmod 0700 "$CEPH_DIR"
fsid="$(cat /proc/sys/kernel/random/uuid)"
echo "$fsid" >"$CEPH_DIR/fsid"

cat >"$CONF" <<CONF
$MARK: a one-node cluster on loopback for tests
[global]
fsid = $fsid
mon host = [v2:$MON_V2,v1:$MON_V1]
public network = 127.0.0.0/8
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
auth allow insecure global id reclaim = false
osd pool default size = 1
osd pool default min size = 1
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon warn on insecure global id reclaim allowed = false
ms bind ipv6 = false
run dir = $CEPH_DIR/run
pid file = $CEPH_DIR/run/\$cluster-\$name.pid
admin socket = $CEPH_DIR/run/\$cluster-\$name.asok
log file = $CEPH_DIR/log/\$cluster-\$name.log
keyring = $CEPH_DIR/\$cluster.\$name.keyring
[mon]
mon data = $CEPH_DIR/mon/\$cluster-\$id
keyring = $CEPH_DIR/mon/\$cluster-\$id/keyring
mon data avail warn = 2
mon data avail crit = 1
[mgr]
mgr data = $CEPH_DIR/mgr/\$cluster-\$id
keyring = $CEPH_DIR/mgr/\$cluster-\$id/keyring
[osd]
osd data = $CEPH_DIR/osd/\$cluster-\$id
keyring = $CEPH_DIR/osd/\$cluster-\$id/keyring
osd objectstore = memstore
memstore device bytes = $STORE_BYTES
memstore page set = false
osd op num threads per shard = 1
osd op num shards = 2
CONF

say "keyrings"
ceph-authtool --create-keyring "$CEPH_DIR/mon.keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
ceph-authtool --create-keyring "$CEPH_DIR/ceph.client.admin.keyring" --gen-key -n client.admin \
  --cap mon 'allow *' --cap osd 'allow *' --cap mds 'allow *' --cap mgr 'allow *' >/dev/null
ceph-authtool "$CEPH_DIR/mon.keyring" --import-keyring "$CEPH_DIR/ceph.client.admin.keyring" >/dev/null
ceph-authtool -p -n client.admin "$CEPH_DIR/ceph.client.admin.keyring" >"$CEPH_DIR/client.admin.key"
monmaptool --create --fsid "$fsid" --addv $MON_ID "[v2:$MON_V2,v1:$MON_V1]" "$CEPH_DIR/monmap" >/dev/null

say "mon.$MON_ID"
ceph-mon -c "$CONF" --mkfs -i $MON_ID --monmap "$CEPH_DIR/monmap" --keyring "$CEPH_DIR/mon.keyring"
touch "$CEPH_DIR/mon/ceph-$MON_ID/done"
start_mon
mon_answers() { cephq mon stat >/dev/null 2>&1; }
wait_for 30 "mon.$MON_ID answers" mon_answers || die "mon.$MON_ID does not answer (log: $CEPH_DIR/log/ceph-mon.$MON_ID.log)"

say "mgr.$MGR_ID"
cephq auth get-or-create mgr.$MGR_ID mon 'allow profile mgr' osd 'allow *' mds 'allow *' \
  >"$CEPH_DIR/mgr/ceph-$MGR_ID/keyring"
start_mgr

say "osd.0"
osd_uuid="$(cat /proc/sys/kernel/random/uuid)"
osd_key="$(ceph-authtool --gen-print-key)"
osd_id="$(printf '{"cephx_secret": "%s"}' "$osd_key" | cephq osd new "$osd_uuid" -i -)"
[ "$osd_id" = 0 ] || die "expected osd id 0, the monitor gave '$osd_id'"
ceph-authtool --create-keyring "$CEPH_DIR/osd/ceph-0/keyring" --name osd.0 --add-key "$osd_key" >/dev/null
ceph-osd -c "$CONF" -i 0 --mkfs --osd-uuid "$osd_uuid" >"$CEPH_DIR/log/osd-mkfs.log" 2>&1 \
  || { tail -n 20 "$CEPH_DIR/log/osd-mkfs.log" >&2; die "ceph-osd --mkfs failed"; }
touch "$CEPH_DIR/osd/ceph-0/mkfs-done"
start_osd
wait_for 60 "osd.0 up" osd_up || die "osd.0 did not come up (log: $CEPH_DIR/log/ceph-osd.0.log)"

say "pool $POOL, client.$LIBVIRT_USER"
cephq osd pool create "$POOL" $PG_NUM $PG_NUM >/dev/null 2>&1
timeout 60 rbd -c "$CONF" pool init "$POOL"
cephq auth get-or-create "client.$LIBVIRT_USER" mon 'profile rbd' osd "profile rbd pool=$POOL" \
  >"$CEPH_DIR/ceph.client.$LIBVIRT_USER.keyring"
chmod 0600 "$CEPH_DIR"/*.keyring
cephq auth get-key "client.$LIBVIRT_USER" >"$CEPH_DIR/client.$LIBVIRT_USER.key"
wait_for 30 "client.$LIBVIRT_USER lists pool $POOL" healthy || die "the new cluster does not answer for client.$LIBVIRT_USER"
report "a new cluster (fsid $fsid)"
