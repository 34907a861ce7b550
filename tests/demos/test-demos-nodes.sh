#!/bin/bash
# test-demos-nodes.sh: the reference workload over several daemons. Three
# commds on this machine (peer listeners on loopback, ports of the kernel's
# choice) stand for three nodes; the collectives demo and the three
# training demos run with their 4 ranks split 2+2, 1+3 and 2+1+1 (ranks 0
# and 3 on one daemon), each job rooted at another daemon, and every rank's
# output must equal, byte for byte, the same rank's output when all four ran
# on one daemon. Where a GPU works, the same for all four with --device
# (pipeline_parallel's sends between daemons staged through host memory);
# without one they exit 77 and that part is skipped. The collectives demo
# started by two commruns (--world, --first-rank, --root) prints the same.
# Then commctl status on a member lists the root as a peer, and the root
# marks its link to itself.
set -u
: "${COMMD:=./daemon/commd}" "${COMMCTL:=./client/commctl}" "${COMM_DEMOS:=./tests/demos}"
: "${COMMRUN:=./client/commrun}"

dir=$(mktemp -d /tmp/commd-nodes-XXXXXX)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; rm -rf "$dir"' EXIT

fail() {
	echo "FAIL: $*"
	for x in a b c; do echo "--- commd $x"; tail -30 "$dir/$x.log"; done
	exit 1
}

declare -A addr
# each daemon its own NCCL host (on one machine, one GPU), over loopback sockets
for x in a b c; do
	NCCL_HOSTID=commd-demo-node-$x NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-lo} NCCL_IB_DISABLE=1 \
		"$COMMD" --foreground --config /dev/null --socket "$dir/$x.sock" \
		--peer-listen 127.0.0.1:0 2>"$dir/$x.log" &
	pids+=($!)
done
for x in a b c; do
	for _ in $(seq 500); do
		json=$("$COMMCTL" --socket "$dir/$x.sock" status --json 2>/dev/null) && break
		sleep 0.02
	done
	addr[$x]=$(printf '%s' "$json" | sed -n 's/.*"peer_listen": "\([^"]*\)".*/\1/p')
	case "${addr[$x]}" in 127.0.0.1:[1-9]*) ;; *) fail "commd $x: no peer listener in status: $json" ;; esac
done

# run PROG NAME ROOT D0 D1 D2 D3: ranks 0-3 on those daemons (with the
# arguments in args), outputs in $dir/NAME.r; 77 when every rank skipped
run() {
	local prog=$1 name=$2 root=$3 r rc rpids=() skipped=0
	shift 3
	for r in 0 1 2 3; do
		local d=${1}; shift
		COMM_SOCKET=$dir/$d.sock COMM_ROOT=$root COMM_JOB=$name-$$ COMM_TOKEN=t-$$ \
			COMM_RANK=$r COMM_WORLD_SIZE=4 timeout 120 "$COMM_DEMOS/$prog" "${args[@]}" \
			>"$dir/$name.$r" 2>&1 &
		rpids+=($!)
	done
	for r in 0 1 2 3; do
		wait "${rpids[$r]}"
		rc=$?
		if [ $rc -eq 77 ]; then
			skipped=$((skipped + 1))
		elif [ $rc -ne 0 ]; then
			fail "$name: rank $r failed: $(tail -3 "$dir/$name.$r")"
		fi
	done
	[ $skipped -eq 0 ] && return 0
	[ $skipped -eq 4 ] || fail "$name: $skipped of 4 ranks skipped: $(cat "$dir/$name".*)"
	return 77
}

n=0
for mode in host device; do
	args=()
	[ $mode = device ] && args=(--device)
	for prog in collectives data_parallel tensor_parallel pipeline_parallel; do
		run "$prog" "$prog-$mode-one" "" a a a a
		if [ $? -eq 77 ]; then
			echo "note: --device over daemons is skipped: $(head -1 "$dir/$prog-$mode-one.0")"
			break
		fi
		for split in "2+2 ${addr[a]} a a b b" "1+3 ${addr[c]} a b b b" "2+1+1 ${addr[b]} a b c a"; do
			set -- $split
			name=$prog-$mode-$1
			run "$prog" "$name" "$2" "$3" "$4" "$5" "$6" || fail "$name: skipped"
			for r in 0 1 2 3; do
				cmp -s "$dir/$prog-$mode-one.$r" "$dir/$name.$r" ||
					fail "$prog${args[*]:+ ${args[*]}} split $1 (root $2): rank $r differs from one daemon:
$(diff "$dir/$prog-$mode-one.$r" "$dir/$name.$r" | head -10)"
			done
			echo "ok: $prog${args[*]:+ ${args[*]}} split $1 over daemons ($3 $4 $5 $6, root $2): 4 ranks' output as on one daemon"
			n=$((n + 1))
		done
	done
done

# one commrun a node: ranks 0-1 on c, 2-3 on b, rooted at a (which holds none)
crpids=()
for half in "c 0" "b 2"; do
	set -- $half
	COMM_TOKEN=cr-$$ timeout 120 "$COMMRUN" -n 2 --world 4 --first-rank "$2" --root "${addr[a]}" \
		--job commrun-$$ --socket "$dir/$1.sock" \
		sh -c 'exec "$0" >"$1.$COMM_RANK" 2>&1' "$COMM_DEMOS/collectives" "$dir/commrun" &
	crpids+=($!)
done
for p in "${crpids[@]}"; do wait "$p" || fail "a commrun over daemons failed: $(cat "$dir"/commrun.*)"; done
for r in 0 1 2 3; do
	cmp -s "$dir/collectives-host-one.$r" "$dir/commrun.$r" ||
		fail "collectives by two commruns: rank $r differs from one daemon:
$(diff "$dir/collectives-host-one.$r" "$dir/commrun.$r" | head -10)"
done
echo "ok: collectives by two commruns (-n 2 --world 4 --first-rank 0 and 2 --root) over daemons c and b: 4 ranks' output as on one daemon"

status=$("$COMMCTL" --socket "$dir/b.sock" status) || fail "status on b"
echo "$status" | grep -q "^peers: " || fail "no peers line: $status"
echo "$status" | grep -E "^[^ ]+ +${addr[a]} +root " >/dev/null ||
	fail "b does not list ${addr[a]} as a root: $status"
echo "ok: commctl status on a member lists the root daemon as a peer"
# a, root of jobs it held ranks of, reached its own listener: both ends marked
status=$("$COMMCTL" --socket "$dir/a.sock" status) || fail "status on a"
echo "$status" | grep -E "^[^ ]+ +${addr[a]} +root\(self\) " >/dev/null &&
	echo "$status" | grep -E " member\(self\) " >/dev/null ||
	fail "a does not mark its link to itself: $status"
echo "ok: commctl status on the root marks its link to its own listener root(self) and member(self)"

for i in 0 1 2; do
	kill -TERM "${pids[$i]}"
	wait "${pids[$i]}" || fail "commd $i did not exit cleanly"
done
pids=()
for x in a b c; do
	if grep -q " error: " "$dir/$x.log"; then fail "commd $x logged errors"; fi
done
echo "PASS: $n demo runs over several daemons"
