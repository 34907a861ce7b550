#!/bin/bash
# gpu-compare.sh: commd's device path against NCCL itself, all-reduce of
# float32 from 8 B to 1 GiB (factor 8, and 64 MiB), on this machine's GPU.
#
#   bash tests/bench/gpu-compare.sh [--build DIR]    (default $BUILD, else .)
#
# Starts commd on a temp socket and runs, with -c 0: commbench -G with 1 and
# with 4 ranks, commbench in host memory with 1 rank at 8 B (the round trip to
# commd alone: through the submission ring, and on the socket with COMM_RING=0)
# and tests/bench/nccl-bench on one GPU (a 1-rank communicator);
# prints them side by side, then commd's 1 rank against NCCL: out of place
# (in place, NCCL's 1-rank all-reduce launches nothing). Each op is timed
# alone (blocking), then again with -P: the iterations back to back, as
# nccl-tests times them (commd queues a job's device ops on its stream
# behind each other). Binaries from
# DIR, or from $COMMD, $COMMD_GPU, $COMMBENCH, $NCCL_BENCH (a carried bin dir);
# WARMUP and ITERS (default 10 and 50) for every run. Exit 77 without a GPU.
set -eu

name=gpu-compare.sh
. "$(dirname "$0")/gpu-bins.sh"
W=${WARMUP:-10} I=${ITERS:-50}

tmp=$(mktemp -d /tmp/gpu-compare-XXXXXX)
pid=
trap '[ -z "$pid" ] || kill "$pid" 2>/dev/null; rm -rf "$tmp"' EXIT

sock=$tmp/commd.sock
"$COMMD" --foreground --config /dev/null --socket "$sock" --gpu-worker "$COMMD_GPU" \
	2>"$tmp/commd.log" &
pid=$!

# run NAME CMD...: CMD's output in $tmp/NAME.txt; stop on failure
run() {
	local name=$1
	shift
	if ! "$@" >"$tmp/$name.txt" 2>"$tmp/$name.err"; then
		echo "gpu-compare.sh: $name failed: $*" >&2
		cat "$tmp/$name.err" "$tmp/commd.log" >&2
		exit 1
	fi
}

# The host path at 8 B, retried until commd accepts (at most 10 s).
for t in $(seq 100); do
	"$COMMBENCH" --socket "$sock" -n 1 -b 8 -e 8 -w 0 -i 1 -c 0 >/dev/null 2>"$tmp/ready" && break
	if ! kill -0 "$pid" 2>/dev/null || [ "$t" = 100 ]; then
		cat "$tmp/ready" "$tmp/commd.log" >&2
		exit 1
	fi
	sleep 0.1
done
host=(--socket "$sock" -n 1 -o allreduce -b 8 -e 8 -w "$W" -i "$I" -c 0)
run host "$COMMBENCH" "${host[@]}"
run host_socket env COMM_RING=0 "$COMMBENCH" "${host[@]}"

# sizes NAME CMD...: CMD over both size ranges; "size time algbw busbw" rows in NAME.rows
sizes() {
	local name=$1
	shift
	run "$name" "$@" -o allreduce -b 8 -e 1G -f 8 -w "$W" -i "$I" -c 0
	cp "$tmp/$name.txt" "$tmp/$name.all"
	run "$name" "$@" -o allreduce -b 64M -e 64M -w "$W" -i "$I" -c 0
	grep -hv '^#' "$tmp/$name.all" "$tmp/$name.txt" | awk '{ print $1, $6, $7, $8 }' |
		sort -n >"$tmp/$name.rows"
	head -1 "$tmp/$name.all"
}
sizes commd1 "$COMMBENCH" --socket "$sock" -G -n 1
sizes commd4 "$COMMBENCH" --socket "$sock" -G -n 4
sizes nccl "$NCCL_BENCH" -g 1
sizes commd1p "$COMMBENCH" --socket "$sock" -G -n 1 -P
sizes commd4p "$COMMBENCH" --socket "$sock" -G -n 4 -P
sizes ncclp "$NCCL_BENCH" -g 1 -P

# merge FILE...: the rows of the first file's sizes found in every file, joined
merge() {
	awk 'FNR == 1 { f++ } { k = $1; $1 = ""; r[f, k] = $0 } f == 1 { o[++n] = k }
	END { for (i = 1; i <= n; i++) { s = o[i]; all = 1
		for (j = 1; j <= f; j++) if ((j, o[i]) in r) s = s r[j, o[i]]; else all = 0
		if (all) print s } }' "$@"
}

# table HOW C1 C4 NCCL: the three side by side; then (one rank's busbw is 0:
# 2(n-1)/n) commd's 1 rank against NCCL by time and algbw
table() {
	echo "#"
	echo "# all-reduce float32 sum, out of place, -w $W -i $I -c 0, $1; time (us), busbw (GB/s)"
	printf '#%11s  %18s  %18s  %18s\n' "" "commd -G 1 rank" "commd -G 4 ranks" "nccl 1 GPU"
	printf '#%11s  %9s %8s  %9s %8s  %9s %8s\n' size time busbw time busbw time busbw
	merge "$tmp/$2.rows" "$tmp/$3.rows" "$tmp/$4.rows" |
		awk '{ printf "%12s  %9s %8s  %9s %8s  %9s %8s\n", $1, $2, $4, $5, $7, $8, $10 }'
	echo "#"
	echo "# $1: commd -G 1 rank against nccl 1 GPU: time (us), algbw (GB/s), commd / nccl"
	printf '#%11s  %9s %9s %9s  %8s %8s  %6s\n' size commd nccl diff commd nccl ratio
	merge "$tmp/$2.rows" "$tmp/$4.rows" |
		awk '{ printf "%12s  %9.2f %9.2f %9.2f  %8.2f %8.2f  %6.2f\n",
			$1, $2, $5, $2 - $5, $3, $6, ($5 > 0 ? $2 / $5 : 0) }'
}

echo "# commd-gpu --probe: $("$COMMD_GPU" --probe 2>&1 | head -1)"
grep -hv '^#' "$tmp/host.txt" "$tmp/host_socket.txt" | awk '{ t[NR] = $6 }
	END { printf "# host memory, 1 rank, 8 B (the round trip to commd alone): %s us through" \
		" the submission ring, %s us on the socket (COMM_RING=0)\n", t[1], t[2] }'
table "each op alone (median)" commd1 commd4 nccl
table "back to back (-P, whole / iters)" commd1p commd4p ncclp
