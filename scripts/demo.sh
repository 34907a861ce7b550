#!/bin/bash
# demo.sh: install, build, start a commd on a temp socket and run the
# reference workload through it with 4 ranks: the topology table of the
# reference node, the collectives, the benchmark lines and the three
# parallel-training demos; then show `commctl status` and stop it.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
bash scripts/install-deps.sh
# autoreconf's chatter only when it fails
[ -x configure ] || out=$(autoreconf -fi 2>&1) || { echo "$out" >&2; exit 1; }
mkdir -p build
cd build
[ -f Makefile ] || ../configure -q
make -j"$(nproc)" >/dev/null
make -j"$(nproc)" tests/demos/collectives tests/demos/data_parallel tests/demos/tensor_parallel \
	tests/demos/pipeline_parallel >/dev/null

dir=$(mktemp -d /tmp/commd-demo-XXXXXX)
sock=$dir/commd.sock
./daemon/commd --foreground --config /dev/null --socket "$sock" \
	--topology "$top/tests/fixtures/h100x8.topo" 2>"$dir/commd.log" &
pid=$!
trap 'kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; rm -rf "$dir"' EXIT
until ./client/commctl --socket "$sock" status >/dev/null 2>&1; do
	kill -0 "$pid" 2>/dev/null || { cat "$dir/commd.log"; exit 1; }
	sleep 0.05
done
./client/commctl --socket "$sock" topo | sed -n '1,/^NIC Legend/p;/^NIC Legend/{n;p;};/^  NIC/p'
echo
./client/commrun -n 4 --socket "$sock" ./tests/demos/collectives
./client/commbench -n 4 --socket "$sock" --reference
for demo in data_parallel tensor_parallel pipeline_parallel; do
	./client/commrun -n 4 --socket "$sock" "./tests/demos/$demo"
done
echo
./client/commctl --socket "$sock" status
