#!/bin/bash
# demo.sh: install, build, start a commd on a temp socket, run the reference
# collectives with 4 ranks through it, show `commctl status`, stop it.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
bash scripts/install-deps.sh
[ -x configure ] || autoreconf -fi >/dev/null
mkdir -p build
cd build
[ -f Makefile ] || ../configure -q
make -j"$(nproc)" >/dev/null
make -j"$(nproc)" tests/demos/collectives >/dev/null

dir=$(mktemp -d /tmp/commd-demo-XXXXXX)
sock=$dir/commd.sock
./daemon/commd --foreground --socket "$sock" 2>"$dir/commd.log" &
pid=$!
trap 'kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; rm -rf "$dir"' EXIT
until ./client/commctl --socket "$sock" status >/dev/null 2>&1; do
	kill -0 "$pid" 2>/dev/null || { cat "$dir/commd.log"; exit 1; }
	sleep 0.05
done
./client/commrun -n 4 --socket "$sock" ./tests/demos/collectives
echo
./client/commctl --socket "$sock" status
