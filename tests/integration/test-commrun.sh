#!/bin/bash
# test-commrun.sh: the launcher alone, no daemon: environment per rank, exit
# codes, the grace period and signal forwarding. COMMRUN names the binary.
# shellcheck disable=SC2016 # the ranks' sh -c scripts expand their own $vars
set -u

COMMRUN=${COMMRUN:-./client/commrun}
case $COMMRUN in /*) ;; *) COMMRUN=$PWD/$COMMRUN ;; esac
if [ ! -x "$COMMRUN" ]; then
	echo "test-commrun: $COMMRUN: not executable" >&2
	exit 1
fi

dir=$(mktemp -d "${TMPDIR:-/tmp}/test-commrun.XXXXXX") || exit 1
trap 'rm -rf "$dir"' EXIT
failures=0

fail() {
	echo "FAIL: $*" >&2
	failures=$((failures + 1))
}

# expect WHAT GOT WANT
expect() {
	[ "$2" = "$3" ] || fail "$1: got '$2', want '$3'"
}

# expect_match WHAT GOT REGEX
expect_match() {
	[[ $2 =~ $3 ]] || fail "$1: '$2' does not match '$3'"
}

now_ms() {
	echo $(($(date +%s%N) / 1000000))
}

# count_files PATTERN: how many files under $dir match.
count_files() {
	compgen -G "$dir/$1" | wc -l
}

# wait_zombie PID: until the process has ended and waits to be reaped, at
# most 5 s.
wait_zombie() {
	local i
	for ((i = 0; i < 100; i++)); do
		[ "$(sed 's/.*) //; s/ .*//' "/proc/$1/stat" 2> /dev/null)" = Z ] && return 0
		sleep 0.05
	done
	return 1
}

# watchdog PID SEC: SIGKILL PID in SEC seconds, so that a commrun that hangs
# fails the test rather than hanging it; kill $dog (SIGTERM) to call it off.
watchdog() {
	(
		trap 'kill $s 2> /dev/null; exit 0' TERM
		sleep "$2" &
		s=$!
		wait $s
		kill -KILL "$1" 2> /dev/null
	) &
	dog=$!
}

# wait_files PATTERN COUNT: until COUNT files match, at most 5 s.
wait_files() {
	local i
	for ((i = 0; i < 100; i++)); do
		[ "$(count_files "$1")" -ge "$2" ] && return 0
		sleep 0.05
	done
	return 1
}

# Environment: every rank its own rank, the rest shared.
mkdir "$dir/env"
env -u COMM_TOKEN -u COMM_SOCKET -u COMM_TIMEOUT \
	"$COMMRUN" -n 4 --job testjob --socket "$dir/s.sock" --timeout 1234 \
	sh -c 'env > "$0/$COMM_RANK"' "$dir/env"
expect "env: exit status" $? 0
expect "env: ranks" "$(cd "$dir/env" && echo *)" "0 1 2 3"
tokens=""
for r in 0 1 2 3; do
	f=$dir/env/$r
	[ -f "$f" ] || { fail "env: rank $r wrote nothing"; continue; }
	get() { sed -n "s/^$1=//p" "$f"; }
	expect "env: rank $r COMM_RANK" "$(get COMM_RANK)" $r
	expect "env: rank $r LOCAL_RANK" "$(get LOCAL_RANK)" $r
	expect "env: rank $r COMM_WORLD_SIZE" "$(get COMM_WORLD_SIZE)" 4
	expect "env: rank $r LOCAL_WORLD_SIZE" "$(get LOCAL_WORLD_SIZE)" 4
	expect "env: rank $r COMM_JOB" "$(get COMM_JOB)" testjob
	expect "env: rank $r COMM_SOCKET" "$(get COMM_SOCKET)" "$dir/s.sock"
	expect "env: rank $r COMM_TIMEOUT" "$(get COMM_TIMEOUT)" 1234
	expect_match "env: rank $r COMM_TOKEN" "$(get COMM_TOKEN)" '^[0-9a-f]{32}$'
	tokens+="$(get COMM_TOKEN)"$'\n'
done
expect "env: distinct tokens" "$(printf %s "$tokens" | sort -u | wc -l)" 1

# One node's part of a job over several: ranks from --first-rank, the
# world from --world, LOCAL_* this node's, COMM_ROOT from --root.
out=$(COMM_TOKEN=shared "$COMMRUN" -n 2 --world 5 --first-rank 3 --root host-a:29600 --job big \
	sh -c 'echo "$COMM_RANK $LOCAL_RANK $COMM_WORLD_SIZE $LOCAL_WORLD_SIZE $COMM_ROOT $COMM_JOB $COMM_TOKEN"' |
	sort)
expect "node part: exit status" $? 0
expect "node part: env" "$out" "3 0 5 2 host-a:29600 big shared
4 1 5 2 host-a:29600 big shared"
env -u COMM_ROOT COMM_TOKEN=shared "$COMMRUN" -n 2 --world 4 --first-rank 2 --job big \
	sh -c 'exit $LOCAL_RANK' 2>"$dir/err"
expect "node part: the failed rank's name" "$(tail -1 "$dir/err")" "commrun: rank 3 exited with status 1"
# no root: said, since the other ranks must then come to this daemon
expect "node part without a root: the note" "$(head -1 "$dir/err")" \
	"commrun: note: no --root: the job's other 2 ranks must join on this node's daemon"
# without a job name or token given, the nodes' commruns could not agree
env -u COMM_TOKEN "$COMMRUN" -n 2 --world 4 --job big true 2>"$dir/err"
expect "node part without COMM_TOKEN: exit status" $? 2
grep -q "give --job and set COMM_TOKEN, the same on every node" "$dir/err" ||
	fail "node part without COMM_TOKEN: $(cat "$dir/err")"
COMM_TOKEN=shared "$COMMRUN" -n 2 --world 4 true 2>"$dir/err"
expect "node part without --job: exit status" $? 2
COMM_TOKEN=shared "$COMMRUN" -n 2 --world 4 --first-rank 3 --job big true 2>"$dir/err"
expect "ranks past the world: exit status" $? 2
expect "ranks past the world: message" "$(head -1 "$dir/err")" \
	"commrun: ranks 3 to 4 are not all in a world of 4"

# Defaults: a generated job name, a fresh token per run, the environment's
# COMM_TOKEN and COMM_SOCKET kept, no COMM_TIMEOUT.
out=$(env -u COMM_TOKEN -u COMM_TIMEOUT COMM_SOCKET=/keep.sock "$COMMRUN" -n2 \
	sh -c 'echo "$COMM_JOB ${COMM_TIMEOUT-unset} $COMM_SOCKET"')
expect "defaults: exit status" $? 0
expect "defaults: lines" "$(echo "$out" | sort -u | wc -l)" 1
expect_match "defaults: values" "$(echo "$out" | head -1)" \
	'^commrun-[0-9]+-[0-9]+ unset /keep.sock$'
t1=$(env -u COMM_TOKEN "$COMMRUN" -n 1 sh -c 'echo $COMM_TOKEN')
t2=$(env -u COMM_TOKEN "$COMMRUN" -n 1 sh -c 'echo $COMM_TOKEN')
[ "$t1" != "$t2" ] || fail "defaults: two runs share token $t1"
out=$(COMM_TOKEN=given "$COMMRUN" --np 3 sh -c 'echo $COMM_TOKEN' | sort -u)
expect "defaults: kept token" "$out" given

# Exit codes, a line for every failed rank and one for the first.
"$COMMRUN" -n 3 true
expect "all succeed: exit status" $? 0
"$COMMRUN" -n 1 -- sh -c 'exit 0'
expect "after --: exit status" $? 0
"$COMMRUN" -n 4 sh -c 'exit $COMM_RANK' 2> "$dir/err"
expect "exit non-zero: exit status" $? 1
expect "exit non-zero: rank lines" "$(grep '^commrun: rank' "$dir/err" | sort)" \
	"commrun: rank 1 exited with status 1
commrun: rank 2 exited with status 2
commrun: rank 3 exited with status 3"
expect_match "exit non-zero: last line" "$(tail -1 "$dir/err")" \
	'^commrun: 3 of 4 ranks failed; the first was rank ([123]), exited with status \1$'
"$COMMRUN" -n 2 sh -c '[ $COMM_RANK = 1 ] && kill -KILL $$; exit 0' \
	2> "$dir/err"
expect "signal: exit status" $? 137
expect "signal: message" "$(cat "$dir/err")" \
	"commrun: rank 1 killed by signal 9 (SIGKILL)"
# A program that is not there, or not executable, is one message and 127,
# before any rank starts; PATH is searched as execvp does.
"$COMMRUN" -n 2 "$dir/no-such-prog" 2> "$dir/err"
expect "exec fails: exit status" $? 127
expect "exec fails: message" "$(cat "$dir/err")" \
	"commrun: $dir/no-such-prog: No such file or directory"
mkdir "$dir/bin1" "$dir/bin2"
PATH=$dir/bin1:$PATH "$COMMRUN" -n 2 no-such-prog 2> "$dir/err"
expect "not in PATH: exit status" $? 127
expect "not in PATH: message" "$(cat "$dir/err")" "commrun: no-such-prog: command not found"
printf '#!/bin/sh\necho bin$COMM_RANK\n' > "$dir/bin1/tool"
PATH=$dir/bin1:$PATH "$COMMRUN" -n 2 tool 2> "$dir/err"
expect "not executable: exit status" $? 127
expect "not executable: message" "$(cat "$dir/err")" "commrun: tool: Permission denied"
"$COMMRUN" -n 2 "$dir/bin1" 2> "$dir/err"
expect "a directory: exit status" $? 127
expect "a directory: message" "$(cat "$dir/err")" "commrun: $dir/bin1: Is a directory"
cp "$dir/bin1/tool" "$dir/bin2/tool"
chmod +x "$dir/bin2/tool"
out=$(PATH=$dir/bin1:$dir/bin2:$PATH "$COMMRUN" -n 2 tool | sort)
expect "later in PATH: exit status" $? 0
expect "later in PATH: output" "$out" "bin0
bin1"

# Ranks that end together, as the others do when one dies and libcomm tells
# them their peer is lost: commrun is stopped while they end, so one waitpid
# batch holds them all, the victims first in the kernel's order. The rank
# killed, or exiting with a status other than 1, is the first.
for how in "kill -KILL \$\$" "exit 3"; do
	rm -rf "$dir/batch"
	mkdir "$dir/batch"
	"$COMMRUN" -n 4 sh -c 'echo $$ > "$0/pid.$COMM_RANK"
		until [ -e "$0/go.$COMM_RANK" ]; do sleep 0.02; done
		[ $COMM_RANK = 1 ] && '"$how"'; exit 1' "$dir/batch" 2> "$dir/err" &
	run=$!
	if wait_files 'batch/pid.*' 4; then
		kill -STOP $run
		touch "$dir/batch/go.1"
		wait_zombie "$(cat "$dir/batch/pid.1")" || fail "batch '$how': rank 1 still running"
		touch "$dir/batch/go."{0,2,3}
		for r in 0 2 3; do
			wait_zombie "$(cat "$dir/batch/pid.$r")" ||
				fail "batch '$how': rank $r still running"
		done
		kill -CONT $run
	else
		fail "batch '$how': ranks did not start"
		kill -KILL $run
	fi
	wait $run
	rc=$?
	if [ "$how" = "exit 3" ]; then
		want=1 first="exited with status 3"
	else
		want=137 first="killed by signal 9 (SIGKILL)"
	fi
	expect "batch '$how': exit status" $rc $want
	expect "batch '$how': messages" "$(cat "$dir/err")" \
		"commrun: rank 0 exited with status 1
commrun: rank 1 $first
commrun: rank 2 exited with status 1
commrun: rank 3 exited with status 1
commrun: 4 of 4 ranks failed; the first was rank 1, $first"
done

# Grace: the others may finish by themselves...
"$COMMRUN" -n 2 --grace 5 sh -c \
	'[ $COMM_RANK = 0 ] && exit 3; sleep 0.5; touch "$0/late"' "$dir" \
	2> "$dir/err"
expect "grace, finishing: exit status" $? 1
[ -e "$dir/late" ] || fail "grace, finishing: rank 1 did not finish"
grep -q SIGTERM "$dir/err" && fail "grace, finishing: SIGTERM sent"

# ... and get SIGTERM once it is over.
start=$(now_ms)
"$COMMRUN" -n 3 --grace 1 sh -c '[ $COMM_RANK = 0 ] && exit 3; exec sleep 60' \
	2> "$dir/err"
rc=$?
took=$(($(now_ms) - start))
expect "grace over: exit status" $rc 1
((took >= 1000 && took < 4000)) || fail "grace over: took $took ms"
expect "grace over: messages" "$(head -2 "$dir/err")" \
	"commrun: rank 0 exited with status 3
commrun: grace period over: sent SIGTERM to 2 ranks"
expect "grace over: the ranks stopped" "$(sed -n '3,4p' "$dir/err" | sort)" \
	"commrun: rank 1 killed by signal 15 (SIGTERM)
commrun: rank 2 killed by signal 15 (SIGTERM)"
expect "grace over: the first" "$(sed -n '5,$p' "$dir/err")" \
	"commrun: 3 of 3 ranks failed; the first was rank 0, exited with status 3"

# A rank that ignores SIGTERM gets SIGKILL 5 s later.
start=$(now_ms)
"$COMMRUN" -n 2 --grace 0 sh -c \
	'if [ $COMM_RANK = 0 ]; then
		until [ -e "$0/trapped" ]; do sleep 0.02; done
		exit 3
	fi
	trap "" TERM; touch "$0/trapped"; while :; do sleep 0.1; done' "$dir" \
	2> "$dir/err"
rc=$?
took=$(($(now_ms) - start))
expect "sigkill: exit status" $rc 1
((took >= 5000 && took < 9000)) || fail "sigkill: took $took ms"
grep -q '^commrun: sent SIGKILL to 1 rank still running$' "$dir/err" ||
	fail "sigkill: no SIGKILL message"

# Signals to commrun reach every rank: SIGTERM kills sleeping ranks...
mkdir "$dir/pid"
"$COMMRUN" -n 3 sh -c 'echo $$ > "$0/$COMM_RANK"; exec sleep 60' "$dir/pid" \
	2> "$dir/err" &
run=$!
if wait_files 'pid/*' 3; then
	sleep 0.1 # the pid files are written just before the exec
	start=$(now_ms)
	kill -TERM $run
	wait $run
	rc=$?
	took=$(($(now_ms) - start))
	expect "sigterm: exit status" $rc 143
	((took < 3000)) || fail "sigterm: took $took ms"
	for f in "$dir"/pid/*; do
		kill -0 "$(cat "$f")" 2> /dev/null &&
			fail "sigterm: rank ${f##*/} still running"
	done
	expect "sigterm: rank lines" "$(grep -c '^commrun: rank [012] killed by signal 15 (SIGTERM)$' "$dir/err")" 3
	expect_match "sigterm: last line" "$(tail -1 "$dir/err")" \
		'^commrun: 3 of 3 ranks failed; the first was rank [012], killed by signal 15 \(SIGTERM\)$'
else
	fail "sigterm: ranks did not start"
	kill -KILL $run
	wait $run
fi

# Ranks that ignore SIGINT and SIGTERM: a second SIGTERM sends them SIGKILL at
# once, and after one they get it 5 s later (--grace 0: 5 s at least).
for n in 2 1; do
	what="stop, $n signal$([ $n = 2 ] && echo s)"
	rm -rf "$dir/stop"
	mkdir "$dir/stop"
	"$COMMRUN" -n 2 --grace 0 sh -c 'trap "" INT TERM; echo $$ > "$0/$COMM_RANK"
		while :; do sleep 0.1; done' "$dir/stop" 2> "$dir/err" &
	run=$!
	watchdog $run 12
	if wait_files 'stop/*' 2; then
		sleep 0.1 # the pid files are written just before the trap is set
		start=$(now_ms)
		kill -TERM $run
		sleep 0.5
		kill -0 $run 2> /dev/null || fail "$what: commrun gone at the first SIGTERM"
		[ $n = 2 ] && kill -TERM $run
		wait $run
		rc=$?
		took=$(($(now_ms) - start))
		expect "$what: exit status" $rc 137
		for f in "$dir"/stop/*; do
			kill -0 "$(cat "$f")" 2> /dev/null && fail "$what: rank ${f##*/} still running"
		done
		if [ $n = 2 ]; then
			((took < 3000)) || fail "$what: took $took ms"
			want="commrun: SIGTERM while stopping: sent SIGKILL to 2 ranks"
		else
			((took >= 5000 && took < 9000)) || fail "$what: took $took ms"
			want="commrun: sent SIGKILL to 2 ranks still running"
		fi
		expect "$what: message" "$(head -1 "$dir/err")" "$want"
	else
		fail "$what: ranks did not start"
		kill -KILL $run
		wait $run
	fi
	kill $dog 2> /dev/null
	wait $dog
done

# Two SIGTERMs at once, as timeout(1) sends them (to commrun, then to its
# group): one request, not the second that sends SIGKILL. The ranks finish
# their handler and exit 0.
rm -rf "$dir/twice"
mkdir "$dir/twice"
"$COMMRUN" -n 2 sh -c 'trap "sleep 0.5; exit 0" TERM; echo $$ > "$0/$COMM_RANK"
	while :; do sleep 0.1; done' "$dir/twice" 2> "$dir/err" &
run=$!
if wait_files 'twice/*' 2; then
	sleep 0.1 # the pid files are written just before the trap is set
	kill -TERM $run
	sleep 0.05 # commrun has taken the first: the second comes while it stops
	kill -TERM $run
	wait $run
	expect "two SIGTERMs at once: exit status" $? 0
	grep -q SIGKILL "$dir/err" && fail "two SIGTERMs at once: $(cat "$dir/err")"
else
	fail "two SIGTERMs at once: ranks did not start"
	kill -KILL $run
	wait $run
fi

# ... and SIGUSR1 reaches a rank that handles it.
mkdir "$dir/usr1"
"$COMMRUN" -n 3 sh -c \
	'trap "kill \$!; touch \"$0/got.$COMM_RANK\"; exit 0" USR1
	touch "$0/ready.$COMM_RANK"; sleep 60 & wait' "$dir/usr1" &
run=$!
if wait_files 'usr1/ready.*' 3; then
	kill -USR1 $run
	wait $run
	expect "sigusr1: exit status" $? 0
	expect "sigusr1: ranks" "$(count_files 'usr1/got.*')" 3
else
	fail "sigusr1: ranks did not start"
	kill -KILL $run
	wait $run
fi

# Usage.
"$COMMRUN" -h > "$dir/out"
expect "help: exit status" $? 0
grep -q '^usage: commrun' "$dir/out" || fail "help: no usage on stdout"
for v in --version -V; do
	out=$("$COMMRUN" "$v" 2>&1)
	expect "$v: exit status" $? 0
	expect_match "$v" "$out" '^commrun [0-9]+\.[0-9]+\.[0-9]+$'
done
for args in "" "-n 0 true" "-n 4097 true" "-n x true" "-n 2" "--bogus -n 1 true" \
	"-n 1 --grace -1 true" "-n 1 --timeout 0 true" "-n 1 --timeout 86400001 true" "--job" \
	"-n 1 --world 0 true" "-n 1 --world 4097 true" "-n 1 --first-rank -1 true" \
	"-n 1 --root nohost true" "-n 1 --root"; do
	# shellcheck disable=SC2086
	"$COMMRUN" $args > "$dir/out" 2> "$dir/err"
	expect "usage '$args': exit status" $? 2
	[ -s "$dir/err" ] || fail "usage '$args': no message"
	[ -s "$dir/out" ] && fail "usage '$args': output on stdout"
done
out=$("$COMMRUN" -n2 sh -c 'echo $COMM_WORLD_SIZE' | sort -u)
expect "-nN form" "$out" 2

if [ $failures -gt 0 ]; then
	echo "test-commrun: $failures failures" >&2
	exit 1
fi
echo "test-commrun: ok"
exit 0
