#!/bin/bash
# test-topo.sh: commd --topology / --dump-topology and commctl topo: the
# reference node's table byte for byte, the discovered node, and bad files.
set -u
. "$(dirname "$0")/../lib/daemon.sh"
data=$(cd "$(dirname "$0")/../data" && pwd)
fail=0
bad() { echo "FAIL: $*"; fail=1; }

# 1. the reference node from a file: header through the NIC legend, exactly
daemon_start commd-topo --topology "$data/h100x8.topo"
"$COMMCTL" --socket "$sock" topo >"$dir/topo.out" || bad "commctl topo failed"
head -n "$(wc -l <"$data/h100x8.expected")" "$dir/topo.out" | cmp -s - "$data/h100x8.expected" ||
	{ bad "commctl topo differs from the reference table:"; diff "$data/h100x8.expected" "$dir/topo.out"; }
grep -q '^  node 1: CPUs 32-63$' "$dir/topo.out" || bad "numa nodes not listed"
"$COMMCTL" --socket "$sock" topo --json >"$dir/topo.json" || bad "commctl topo --json failed"
grep -q '"label": "GPU7", "kind": "gpu", "index": 7, "name": "NVIDIA H100 80GB HBM3", "bus": "0000:da:00.0"' "$dir/topo.json" ||
	bad "json: GPU7 missing: $(cat "$dir/topo.json")"
"$COMMCTL" --socket "$sock" status >"$dir/status.out" || bad "status failed"
grep -q '^topology:    8 GPUs, 10 NICs, 2 NUMA nodes, NVLink yes$' "$dir/status.out" ||
	bad "status topology line: $(cat "$dir/status.out")"
daemon_stop
rm -rf "$dir"; trap - EXIT

# 2. the discovered node: dump, load it back, the same table
tmp=$(mktemp -d /tmp/commd-topo-XXXXXX)
trap 'rm -rf "$tmp"' EXIT
"$COMMD" --dump-topology >"$tmp/node.topo" || bad "--dump-topology failed"
grep -q '^numa 0 cpus ' "$tmp/node.topo" || bad "dump has no numa line: $(cat "$tmp/node.topo")"
daemon_start commd-topo
"$COMMCTL" --socket "$sock" topo >"$tmp/discovered.out" || bad "commctl topo (discovered) failed"
"$COMMCTL" --socket "$sock" status >"$tmp/status.out" || bad "status failed"
daemon_stop
rm -rf "$dir"; trap 'rm -rf "$tmp"' EXIT
if ! grep -q '^gpu ' "$tmp/node.topo"; then
	grep -q '^No GPU found (' "$tmp/discovered.out" || bad "no-GPU node does not say so: $(cat "$tmp/discovered.out")"
fi
cpus=$(cat /sys/devices/system/node/node0/cpulist 2>/dev/null || cat /sys/devices/system/cpu/online)
grep -q "^  node 0: CPUs $cpus\$" "$tmp/discovered.out" || bad "numa node 0 ($cpus) not shown: $(cat "$tmp/discovered.out")"
grep -q '^topology:    .* NUMA node' "$tmp/status.out" || bad "status has no topology line"
daemon_start commd-topo --topology "$tmp/node.topo"
"$COMMCTL" --socket "$sock" topo >"$tmp/loaded.out" || bad "commctl topo (loaded dump) failed"
daemon_stop
rm -rf "$dir"; trap 'rm -rf "$tmp"' EXIT
diff <(sed '$d' "$tmp/discovered.out" | grep -v '^No GPU found') <(sed '$d' "$tmp/loaded.out" | grep -v '^No GPU found') >/dev/null ||
	bad "the dumped topology loads differently: $(diff "$tmp/discovered.out" "$tmp/loaded.out")"

# 3. bad files fail at start, naming the line
check_bad() { # NAME LINE WORDS TEXT
	printf '%s\n' "$4" >"$tmp/bad.topo"
	if "$COMMD" --foreground --socket "$tmp/bad.sock" --topology "$tmp/bad.topo" 2>"$tmp/bad.err"; then
		bad "$1: accepted"
	elif ! grep -q "bad.topo:$2: .*$3" "$tmp/bad.err"; then
		bad "$1: message does not name line $2 ($3): $(cat "$tmp/bad.err")"
	fi
}
numa='numa 0 cpus 0-3'
gpu='gpu 0 name "G" bus 0000:18:00.0 numa 0 pcipath 0000:15/0000:15:01.0'
check_bad "unknown keyword" 2 "unknown keyword 'switch'" "$numa"$'\nswitch 0'
check_bad "bad bus id" 2 "bad bus id '0000:18:00'" "$numa"$'\ngpu 0 name "G" bus 0000:18:00 numa 0 pcipath 0000:15'
check_bad "upper-case bus id" 2 "bad bus id" "$numa"$'\ngpu 0 name "G" bus 0000:1A:00.0 numa 0 pcipath 0000:15'
check_bad "duplicate index" 4 "duplicate index" "$numa"$'\n'"$gpu"$'\n# comment\n'"$gpu"
check_bad "duplicate numa" 2 "duplicate index" "$numa"$'\n'"$numa"
check_bad "nvlink to a missing GPU" 3 "no such GPU" "$numa"$'\n'"$gpu"$'\nnvlink 0 1 18'
check_bad "undeclared numa" 1 "not a numa node" "$gpu"
check_bad "missing attribute" 2 "needs name, bus, numa and pcipath" "$numa"$'\nnic 0 name mlx5_0 bus 0000:19:00.0 numa 0'
check_bad "bad pcipath" 2 "pcipath" "$numa"$'\nnic 0 name mlx5_0 bus 0000:19:00.0 numa 0 pcipath 0000:15:01.0'
check_bad "bad quote" 2 "quoting" "$numa"$'\ngpu 0 name "G bus 0000:18:00.0'
"$COMMD" --foreground --socket "$tmp/bad.sock" --topology "$tmp/none.topo" 2>"$tmp/bad.err" &&
	bad "missing file accepted"
grep -q "none.topo: No such file" "$tmp/bad.err" || bad "missing file: $(cat "$tmp/bad.err")"

[ "$fail" = 0 ] && echo "PASS: test-topo"
exit "$fail"
