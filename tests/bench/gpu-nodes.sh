#!/bin/bash
# gpu-nodes.sh: device collectives across two commd daemons on this machine
# against NCCL across two processes, each pair joined the same way: every
# daemon's GPU worker (and every nccl-bench process) has an NCCL_HOSTID of
# its own, so NCCL treats them as two hosts and moves the data over sockets
# on loopback (NCCL_SOCKET_IFNAME=lo), as between nodes without InfiniBand.
#
#   bash tests/bench/gpu-nodes.sh [--build DIR]    (default $BUILD, else .)
#
# Runs with -c 0, 1 rank per daemon against nccl-bench --hosts 2: all-reduce
# of float32 from 8 B to 1 GiB (factor 8) and send/recv (a ring of the 2
# ranks, staged through host memory by commd) from 8 B to 1 GiB (factor
# 64), each op alone (median), then every collective at 64 MiB back to
# back (-P); prints them side by side. On one GPU
# the two processes of each pair also share the GPU by time slices, which
# sets the small-size times of both. Binaries from DIR, or from $COMMD,
# $COMMD_GPU, $COMMBENCH, $NCCL_BENCH; WARMUP and ITERS (default 5 and 20).
# Exit 77 without a GPU.
set -eu

name=gpu-nodes.sh
. "$(dirname "$0")/gpu-bins.sh"
W=${WARMUP:-5} I=${ITERS:-20}
export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-lo} NCCL_IB_DISABLE=${NCCL_IB_DISABLE:-1}

tmp=$(mktemp -d /tmp/gpu-nodes-XXXXXX)
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done; rm -rf "$tmp"' EXIT

# Two daemons, peer listeners on free ports (read back from their logs).
peer=()
for d in a b; do
	NCCL_HOSTID=gpu-nodes-$d "$COMMD" --foreground --config /dev/null --socket "$tmp/$d.sock" \
		--gpu-worker "$COMMD_GPU" --peer-listen 127.0.0.1:0 2>"$tmp/$d.log" &
	pids+=($!)
	for t in $(seq 100); do
		p=$(sed -n 's/.*peer listener on \([^ ]*\).*/\1/p' "$tmp/$d.log" | head -1)
		[ -n "$p" ] && [ -S "$tmp/$d.sock" ] && break
		if [ "$t" = 100 ]; then
			cat "$tmp/$d.log" >&2
			exit 1
		fi
		sleep 0.1
	done
	peer+=("$p")
done

run() {
	local name=$1
	shift
	if ! "$@" >"$tmp/$name.txt" 2>"$tmp/$name.err"; then
		echo "gpu-nodes.sh: $name failed: $*" >&2
		cat "$tmp/$name.err" "$tmp/a.log" "$tmp/b.log" >&2
		exit 1
	fi
}
commd=("$COMMBENCH" -G --socket "$tmp/a.sock,$tmp/b.sock" --root "${peer[0]}" -n 2)
nccl=("$NCCL_BENCH" --hosts 2)
ar=(-o allreduce -b 8 -e 1G -f 8 -w "$W" -i "$I" -c 0)
sr=(-o sendrecv -b 8 -e 1G -f 64 -w "$W" -i "$I" -c 0)
run commd_ar "${commd[@]}" "${ar[@]}"
run nccl_ar "${nccl[@]}" "${ar[@]}"
run commd_sr "${commd[@]}" "${sr[@]}"
run nccl_sr "${nccl[@]}" "${sr[@]}"
for op in allreduce reduce_scatter allgather broadcast reduce alltoall; do
	one=(-o "$op" -b 64M -e 64M -w "$W" -i "$I" -c 0 -P)
	run "commd_$op" "${commd[@]}" "${one[@]}"
	run "nccl_$op" "${nccl[@]}" "${one[@]}"
done

rows() { grep -hv '^#' "$@" | awk 'NF { print $1, $6, $8 }'; }
echo "# commd-gpu --probe: $("$COMMD_GPU" --probe 2>&1 | head -1)"
echo "# 2 daemons x 1 rank (commbench -G) against 2 NCCL processes (nccl-bench --hosts 2),"
echo "# each an NCCL host of its own, -c 0; time (us), busbw (GB/s)"
# side NAME: commd's and NCCL's rows of NAME joined by size
side() {
	printf '#%11s  %10s %8s  %10s %8s  %10s\n' size commd busbw nccl busbw "commd-nccl"
	join <(rows "$tmp/commd_$1.txt" | sort -k1,1) <(rows "$tmp/nccl_$1.txt" | sort -k1,1) |
		sort -n |
		awk '{ printf "%12s  %10.1f %8.2f  %10.1f %8.2f  %10.1f\n", $1, $2, $3, $4, $5, $2 - $4 }'
}
echo "#"
echo "# all-reduce float32 sum, out of place, each op alone (median of $I)"
side ar
echo "#"
echo "# send/recv, a ring of the 2 ranks, each op alone (median of $I); commd stages"
echo "# device memory through host memory between daemons, NCCL sends it over its sockets"
side sr
echo "#"
echo "# every op, float32 (sum), 64 MiB, out of place, back to back (-P)"
printf '#%15s  %10s %8s  %10s %8s\n' op commd busbw nccl busbw
for op in allreduce reduce_scatter allgather broadcast reduce alltoall; do
	paste <(rows "$tmp/commd_$op.txt" | head -1) <(rows "$tmp/nccl_$op.txt" | head -1) |
		awk -v op="$op" '{ printf "%16s  %10.1f %8.2f  %10.1f %8.2f\n", op, $2, $3, $5, $6 }'
done
