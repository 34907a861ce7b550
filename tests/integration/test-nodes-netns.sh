#!/bin/bash
# test-nodes-netns.sh: two daemons as two real "nodes": each commd runs in
# its own network namespace, joined by a veth pair, and UCX is held to tcp
# (namespaces do not hide shared memory from UCX). The collectives demo split
# 2+2 prints what it prints on one daemon. Then the link is taken down under
# a loop of all-reduces, and again under broadcasts (a silent partition: no
# FIN, no RST): every rank gets an error within the peer deadline
# (heartbeats, TCP_USER_TIMEOUT), both daemons live on, and a new job on
# each runs; once the link is back a job over both runs again. Exit 77 where
# namespaces cannot be made (not root, no ip).
set -u
: "${COMMD:=./daemon/commd}" "${COMMCTL:=./client/commctl}" "${COMM_DEMOS:=./tests/demos}"
: "${COMMBENCH:=./client/commbench}"

command -v ip >/dev/null || { echo "SKIP: no ip command"; exit 77; }
tag=cm$$
na=$tag-a nb=$tag-b
if ! ip netns add "$na" 2>/dev/null; then echo "SKIP: cannot make a network namespace"; exit 77; fi
dir=$(mktemp -d /tmp/commd-netns-XXXXXX)
pids=()
cleanup() {
	kill -9 "${pids[@]}" 2>/dev/null
	wait 2>/dev/null
	ip netns del "$na" 2>/dev/null
	ip netns del "$nb" 2>/dev/null
	rm -rf "$dir"
}
trap cleanup EXIT
fail() {
	echo "FAIL: $*"
	for x in a b; do echo "--- commd $x"; tail -25 "$dir/$x.log"; done
	exit 1
}

ip netns add "$nb" || fail "netns $nb"
ip link add "$tag-va" type veth peer name "$tag-vb" || { echo "SKIP: no veth"; exit 77; }
ip link set "$tag-va" netns "$na" && ip link set "$tag-vb" netns "$nb" || fail "veth into namespaces"
ip -n "$na" addr add 10.231.7.1/24 dev "$tag-va" && ip -n "$nb" addr add 10.231.7.2/24 dev "$tag-vb" ||
	fail "addresses"
for n in "$na" "$nb"; do ip -n "$n" link set lo up; done
ip -n "$na" link set "$tag-va" up && ip -n "$nb" link set "$tag-vb" up || fail "links up"

start() { # start NAME NETNS ADDR: a commd in that namespace, listening on ADDR
	UCX_TLS=tcp ip netns exec "$2" "$COMMD" --foreground --config /dev/null \
		--socket "$dir/$1.sock" --peer-listen "$3:0" >"$dir/$1.log" 2>&1 &
	pids+=($!)
}
listen_addr() { # listen_addr NAME: its peer listener, once it answers
	local json=
	for _ in $(seq 500); do
		json=$("$COMMCTL" --socket "$dir/$1.sock" status --json 2>/dev/null) && break
		sleep 0.02
	done
	printf '%s' "$json" | sed -n 's/.*"peer_listen": "\([^"]*\)".*/\1/p'
}
start a "$na" 10.231.7.1
start b "$nb" 10.231.7.2
root=$(listen_addr a)
listen_addr b >/dev/null
case $root in 10.231.7.1:[1-9]*) ;; *) fail "no peer listener on a: '$root'" ;; esac

# run NAME ROOT D0 D1 D2 D3 PROG [ARGS]: outputs in $dir/NAME.r, statuses in $dir/NAME.rc.r
run() {
	local name=$1 rt=$2 r d rpids=()
	local ds=("$3" "$4" "$5" "$6")
	shift 6
	for r in 0 1 2 3; do
		d=${ds[$r]}
		( COMM_SOCKET=$dir/$d.sock COMM_ROOT=$rt COMM_JOB=$name-$$ COMM_TOKEN=t-$$ \
			COMM_RANK=$r COMM_WORLD_SIZE=4 COMM_TIMEOUT=60000 timeout 90 "$@" \
			>"$dir/$name.$r" 2>&1; echo $? >"$dir/$name.rc.$r" ) &
		rpids+=($!)
	done
	wait "${rpids[@]}"
}

run one "" a a a a "$COMM_DEMOS/collectives"
run split "$root" a a b b "$COMM_DEMOS/collectives"
for r in 0 1 2 3; do
	[ "$(cat "$dir/split.rc.$r")" = 0 ] || fail "demo rank $r: $(tail -3 "$dir/split.$r")"
	cmp -s "$dir/one.$r" "$dir/split.$r" || fail "demo rank $r differs:
$(diff "$dir/one.$r" "$dir/split.$r" | head)"
done
echo "ok: the collectives demo over two namespaces (UCX over tcp on a veth pair) as on one daemon"

# the round trip is known from the first heartbeat's answer (one a second)
for _ in $(seq 50); do
	"$COMMCTL" --socket "$dir/b.sock" status | grep -qE "^[^ ]+ +$root +root +[0-9]+ us " && break
	sleep 0.1
done
"$COMMCTL" --socket "$dir/b.sock" status | grep -E "^[^ ]+ +$root +root +[0-9]+ us " >/dev/null ||
	fail "b does not list the root with a round trip: $("$COMMCTL" --socket "$dir/b.sock" status)"
echo "ok: commctl status on b lists root $root, up, with its heartbeat round trip"

# A silent partition under a loop of ops (commbench spreads its 4 ranks
# 2+2), then the link back up: the daemons connect afresh (new control
# connections, new UCX endpoints; the failed job's late messages went to a
# drained slot) and a new job over both forms and runs clean. An all-reduce's
# sends read staging buffers, a broadcast's the ranks' memory (so a stopped
# one's sends are not handed to UCX to finish: its endpoint is closed).
partition() { # partition OP
	local op=$1 bench ms lost t0
	COMM_TIMEOUT=60000 timeout 90 "$COMMBENCH" -n 4 --socket "$dir/a.sock,$dir/b.sock" \
		--root "$root" -o "$op" -b 16M -e 16M -w 0 -i 100000 -c 0 >"$dir/cut.out" 2>"$dir/cut.err" &
	bench=$!
	sleep 2
	kill -0 "$bench" 2>/dev/null || fail "$op: commbench ended early: $(tail -3 "$dir/cut.err")"
	t0=$(date +%s%N)
	ip -n "$na" link set "$tag-va" down
	wait "$bench" && fail "$op: commbench finished although the link went down"
	ms=$((($(date +%s%N) - t0) / 1000000))
	lost=$(grep -c "PEER_LOST" "$dir/cut.err")
	[ "$lost" -ge 4 ] || fail "$op: $lost of 4 ranks reported COMM_ERR_PEER_LOST: $(cat "$dir/cut.err")"
	[ "$ms" -lt 8000 ] || fail "$op: the ranks learned of the partition after $ms ms"
	echo "ok: link down under 16 MiB ${op}s: all 4 ranks failed with COMM_ERR_PEER_LOST, commbench done $ms ms later"
	grep "PEER_LOST" "$dir/cut.err" | head -2 | cut -c1-200 | sed 's/^/    /'

	kill -0 "${pids[0]}" 2>/dev/null || fail "$op: commd a died"
	kill -0 "${pids[1]}" 2>/dev/null || fail "$op: commd b died"
	for x in a b; do
		run alone-$x "" $x $x $x $x "$COMM_DEMOS/collectives"
		for r in 0 1 2 3; do
			cmp -s "$dir/one.$r" "$dir/alone-$x.$r" ||
				fail "$op: a job on $x alone, rank $r: $(tail -2 "$dir/alone-$x.$r")"
		done
	done
	echo "ok: both daemons alive after the partition; a new job on each alone runs the demo"

	ip -n "$na" link set "$tag-va" up || fail "link up"
	sleep 1
	COMM_TIMEOUT=60000 timeout 90 "$COMMBENCH" -n 4 --socket "$dir/a.sock,$dir/b.sock" \
		--root "$root" -o "$op" -b 1M -e 16M -f 16 -w 2 -i 5 -c 1 >"$dir/healed.out" \
		2>"$dir/healed.err" || fail "$op: a job over the healed link: $(tail -3 "$dir/healed.err")"
	grep -q "Wrong values *: 0 OK" "$dir/healed.out" || fail "$op: healed link: $(tail -3 "$dir/healed.out")"
	kill -0 "${pids[0]}" 2>/dev/null && kill -0 "${pids[1]}" 2>/dev/null ||
		fail "$op: a daemon died once the link came back"
	echo "ok: the link back up: a new job of ${op}s over both daemons runs, every value right"
}
partition allreduce
partition broadcast

for i in 0 1; do kill -TERM "${pids[$i]}"; wait "${pids[$i]}" || fail "commd $i did not exit cleanly"; done
pids=()
for x in a b; do ! grep -q " error: " "$dir/$x.log" || fail "commd $x logged errors"; done
echo "PASS"
