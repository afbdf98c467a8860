#!/usr/bin/env bash
# Unpack the .debs of .gpu-debs/ (wrk and its libraries, fetched with `apt-get download` on a
# machine with network) into a folder, for a machine that has no wrk and no network.
#   bash loadtest/unpack_debs.sh [DEST] [DEBS_DIR]      (defaults: /tmp/debs, <repo>/.gpu-debs)
# dpkg -x only unpacks: nothing is installed and / is left alone. The load test finds
# DEST/usr/bin/wrk by itself when DEST is /tmp/debs (or LOADTEST_WRK names it) and sets
# LD_LIBRARY_PATH for wrk alone; the export line printed last is for running wrk by hand.
set -euo pipefail
dest="${1:-/tmp/debs}"
debs="${2:-$(cd "$(dirname "$0")/.." && pwd)/.gpu-debs}"
shopt -s nullglob
files=("$debs"/*.deb)
if [ "${#files[@]}" -eq 0 ]; then
  echo "unpack_debs: no .deb files in $debs" >&2
  exit 2
fi
mkdir -p "$dest"
for deb in "${files[@]}"; do
  dpkg -x "$deb" "$dest"
  echo "unpack_debs: $(basename "$deb")" >&2
done
if [ ! -x "$dest/usr/bin/wrk" ]; then
  echo "unpack_debs: $dest/usr/bin/wrk is missing after unpacking" >&2
  exit 1
fi
libs="$dest/usr/lib/x86_64-linux-gnu:$dest/lib/x86_64-linux-gnu"
echo "export PATH=$dest/usr/bin:\$PATH LD_LIBRARY_PATH=$libs\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH} LOADTEST_WRK=$dest/usr/bin/wrk"
