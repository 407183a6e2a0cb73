#!/usr/bin/env bash
# Define/build/start (up) or destroy/undefine/remove (down) a libvirt dir pool for tests.
# The target lives on tmpfs by default: NEVER fully allocate large volumes there; create them
# with `virsh vol-create-as POOL VOL SIZE --allocation 0 --format raw`.
#
# usage: scripts/scratch-pool.sh up   NAME [TARGET_DIR]   (default TARGET_DIR=/dev/shm/NAME)
#        scripts/scratch-pool.sh down NAME
# env:   LIBVIRT_URI (default qemu:///system)
set -euo pipefail

uri="${LIBVIRT_URI:-qemu:///system}"
die() { echo "scratch-pool: $*" >&2; exit 1; }
v() { virsh -q -c "$uri" "$@"; }

[ $# -ge 2 ] || { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2; exit 2; }
cmd="$1"; name="$2"; target="${3:-/dev/shm/$name}"

pool_exists() { v pool-info "$name" >/dev/null 2>&1; }
# (no `virsh … | grep -q`: with pipefail, grep's early exit makes virsh's SIGPIPE fail the test)
pool_active() { local info; info="$(v pool-info "$name" 2>/dev/null)" || return 1; [[ "$info" =~ State:[[:space:]]+running ]]; }
pool_target() { local xml; xml="$(v pool-dumpxml "$name" 2>/dev/null)" || return 0; sed -n 's:.*<path>\(.*\)</path>.*:\1:p' <<<"$xml" | sed -n 1p; }

case "$cmd" in
  up)
    if pool_exists; then
      cur="$(pool_target)"
      if [ "$cur" != "$target" ]; then
        die "pool $name exists with target '$cur', not '$target' (run: $0 down $name)"
      fi
    else
      v pool-define-as "$name" dir --target "$target" >/dev/null
    fi
    mkdir -p "$target"
    v pool-build "$name" >/dev/null 2>&1 || true   # a dir that exists already is fine
    pool_active || v pool-start "$name" >/dev/null
    v pool-refresh "$name" >/dev/null
    echo "scratch-pool: $name is running, target $target"
    ;;
  down)
    if pool_exists; then
      cur="$(pool_target)"
      pool_active && v pool-destroy "$name" >/dev/null
      v pool-undefine "$name" >/dev/null
      case "$cur" in
        /dev/shm/*|/tmp/*) rm -rf -- "$cur" ;;
        *) echo "scratch-pool: left $cur in place (not under /dev/shm or /tmp)" ;;
      esac
      echo "scratch-pool: removed $name"
    else
      echo "scratch-pool: no pool $name"
    fi
    ;;
  *) die "unknown command $cmd (up|down)" ;;
esac
