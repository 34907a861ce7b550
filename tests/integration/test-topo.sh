#!/bin/bash
# test-topo.sh: commd --topology / --dump-topology and commctl topo: the
# reference node's table byte for byte, other node shapes, the discovered
# node, and bad files.
set -u
. "$(dirname "$0")/../lib/daemon.sh"
fix=$(cd "$(dirname "$0")/../fixtures" && pwd)
fail=0
bad() { echo "FAIL: $*"; fail=1; }

# 1. the reference node from a file: header through the NIC legend, exactly
daemon_start commd-topo --topology "$fix/h100x8.topo"
"$COMMCTL" --socket "$sock" topo >"$dir/topo.out" || bad "commctl topo failed"
head -n "$(wc -l <"$fix/h100x8.expected")" "$dir/topo.out" | cmp -s - "$fix/h100x8.expected" ||
	{ bad "commctl topo differs from the reference table:"; diff "$fix/h100x8.expected" "$dir/topo.out"; }
grep -q '^  node 1: CPUs 32-63$' "$dir/topo.out" || bad "numa nodes not listed"
"$COMMCTL" --socket "$sock" topo --json >"$dir/topo.json" || bad "commctl topo --json failed"
grep -q '"label": "GPU7", "kind": "gpu", "index": 7, "name": "NVIDIA H100 80GB HBM3", "bus": "0000:da:00.0"' "$dir/topo.json" ||
	bad "json: GPU7 missing: $(cat "$dir/topo.json")"
"$COMMCTL" --socket "$sock" status >"$dir/status.out" || bad "status failed"
grep -q '^topology:    8 GPUs, 10 NICs, 2 NUMA nodes, NVLink yes$' "$dir/status.out" ||
	bad "status topology line: $(cat "$dir/status.out")"
daemon_stop
rm -rf "$dir"; trap - EXIT

# 2. other shapes: the table through the NUMA nodes, runs of blanks ignored
check_table() { # NAME STATUS-LINE
	daemon_start commd-topo --topology "$fix/$1.topo"
	"$COMMCTL" --socket "$sock" topo >"$dir/topo.out" || bad "$1: commctl topo failed"
	head -n "$(wc -l <"$fix/$1.expected")" "$dir/topo.out" | diff -b "$fix/$1.expected" - >"$dir/diff" ||
		{ bad "$1: commctl topo differs from $1.expected:"; cat "$dir/diff"; }
	"$COMMCTL" --socket "$sock" status >"$dir/status.out" || bad "$1: status failed"
	grep -q "^topology:    $2\$" "$dir/status.out" || bad "$1: status topology line: $(cat "$dir/status.out")"
	daemon_stop
	rm -rf "$dir"; trap - EXIT
}
check_table pcie-switches "4 GPUs, 2 NICs, 1 NUMA node, NVLink no"
check_table nvlink-pair "2 GPUs, 1 NIC, 1 NUMA node, NVLink yes"

# 3. the discovered node: dump, load it back, the same table
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

# 4. bad files fail at start, naming the line
check_file() { # NAME LINE WORDS: $tmp/bad.topo stops commd, naming line LINE
	# a commd that accepted the file would serve forever: timeout makes that a failure
	if timeout 10 "$COMMD" --foreground --socket "$tmp/bad.sock" --topology "$tmp/bad.topo" 2>"$tmp/bad.err"; then
		bad "$1: accepted"
	elif ! grep -q "bad.topo:$2: .*$3" "$tmp/bad.err"; then
		bad "$1: message does not name line $2 ($3): $(cat "$tmp/bad.err")"
	fi
}
check_bad() { # NAME LINE WORDS TEXT
	printf '%s\n' "$4" >"$tmp/bad.topo"
	check_file "$1" "$2" "$3"
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
# a file cut inside a line, even where what is left would parse
printf '%s\n%s\n%s' "$numa" "$gpu" 'gpu 1 name "NVIDIA' >"$tmp/bad.topo"
check_file "cut in a quote" 3 "file ends inside the line (truncated?)"
head -c -2 "$fix/h100x8.topo" >"$tmp/bad.topo" # "nvlink 6 7 18" -> "nvlink 6 7 1"
check_file "cut after a digit" "$(wc -l <"$fix/h100x8.topo")" "file ends inside the line"
timeout 10 "$COMMD" --foreground --socket "$tmp/bad.sock" --topology "$tmp/none.topo" 2>"$tmp/bad.err" &&
	bad "missing file accepted"
grep -q "none.topo: No such file" "$tmp/bad.err" || bad "missing file: $(cat "$tmp/bad.err")"

[ "$fail" = 0 ] && echo "PASS: test-topo"
exit "$fail"
