#!/bin/bash
# test-config.sh: commd's config file: every key takes effect, flags win over
# the file, commd logs the file it read (or none), the topology key loads a
# description like --topology, a bad key, value, section, over-long line or
# directory stops commd at start naming the file and line, SIGHUP reloads
# what may change under running jobs (and names what needs a restart,
# refusing a group that does not exist), and
# the socket file: stale removed, live or untried refused, only its own removed;
# detached, commd keeps its directory, so relative paths keep their meaning.
set -u
. "$(dirname "$0")/../lib/daemon.sh"
fix=$(cd "$(dirname "$0")/../fixtures" && pwd)
fail=0
bad() { echo "FAIL: $*"; fail=1; }
tmp=$(mktemp -d /tmp/commd-config-XXXXXX)
trap 'rm -rf "$tmp"' EXIT

# 1. a file with every key; commctl status shows what the daemon took
cat >"$tmp/commd.conf" <<EOF
# commd.conf for the test
socket = $tmp/from-file.sock
threads = 3
pin-workers = no
timeout = 1500
log-level = debug
topology = $fix/nvlink-pair.topo
peer-listen = 127.0.0.1:0
drain-timeout = 1234
net-spin-us = 700
EOF
"$COMMD" --foreground --config "$tmp/commd.conf" 2>"$tmp/commd.log" &
pid=$!
until "$COMMCTL" --socket "$tmp/from-file.sock" status >"$tmp/status" 2>/dev/null; do
	kill -0 "$pid" 2>/dev/null || { bad "commd with a config file exited: $(cat "$tmp/commd.log")"; break; }
	sleep 0.02
done
grep -q "^topology:    2 GPUs, 1 NIC, 1 NUMA node, NVLink yes\$" "$tmp/status" ||
	bad "topology key not used: $(cat "$tmp/status")"
grep -q "3 worker threads," "$tmp/commd.log" || bad "threads or pin-workers key not used: $(cat "$tmp/commd.log")"
grep -q " info: config: $tmp/commd.conf\$" "$tmp/commd.log" ||
	bad "the config file read is not logged: $(cat "$tmp/commd.log")"
grep -q " debug: " "$tmp/commd.log" || bad "log-level key not used: no debug lines"
grep -q "data plane ready .*polls 700 us after an event" "$tmp/commd.log" ||
	bad "net-spin-us key not used: $(grep "net: " "$tmp/commd.log")"
grep -q "^peers:       0, listening on 127.0.0.1:[1-9]" "$tmp/status" ||
	bad "peer-listen key not used: $(cat "$tmp/status")"
kill -TERM "$pid"; wait "$pid" || bad "commd did not exit cleanly"
grep -q "up to 1234 ms to finish" "$tmp/commd.log" || bad "drain-timeout key not used: $(tail -3 "$tmp/commd.log")"

# the job deadline from the file: rank 0 of a job of 2 whose rank 1 never
# comes fails its join after 1.5 s, not the 10-minute default
"$COMMD" --foreground --config "$tmp/commd.conf" 2>"$tmp/commd.log" &
pid=$!
until "$COMMCTL" --socket "$tmp/from-file.sock" status >/dev/null 2>&1; do sleep 0.02; done
"$COMMCTL" --socket "$tmp/from-file.sock" status --json | grep -q '"worker_threads": 3' ||
	bad "threads key not in status: $("$COMMCTL" --socket "$tmp/from-file.sock" status --json)"
start=$(date +%s)
COMM_SOCKET=$tmp/from-file.sock COMM_JOB=lonely COMM_RANK=0 COMM_WORLD_SIZE=2 \
	timeout 60 "$COMM_DEMOS/collectives" >/dev/null 2>"$tmp/rank.err" && bad "a lonely rank joined"
took=$(($(date +%s) - start))
grep -q "timed out" "$tmp/rank.err" || bad "lonely rank: no timeout: $(cat "$tmp/rank.err")"
[ "$took" -le 10 ] || bad "timeout key not used: the join took ${took}s"
kill -TERM "$pid"; wait "$pid" || bad "commd did not exit cleanly"

# 2. flags override the file
daemon_start commd-config --config "$tmp/commd.conf" --threads 1 --log-level info --pin-workers yes \
	--net-spin-us auto
grep -q "1 worker threads (pinned)" "$dir/commd.log" || bad "--threads or --pin-workers does not override the file"
# auto: 500 us on 8 cores or more, else 50
[ "$(nproc)" -ge 8 ] && spin=500 || spin=50
grep -q "polls $spin us after an event" "$dir/commd.log" ||
	bad "--net-spin-us auto on $(nproc) cores: $(grep "net: " "$dir/commd.log")"
grep -q " debug: " "$dir/commd.log" && bad "--log-level does not override the file"
[ -S "$tmp/from-file.sock" ] && bad "--socket does not override the file"
daemon_stop
rm -rf "$dir"; trap 'rm -rf "$tmp"' EXIT

# no --config, and no file at the default path: commd says it read none
def=$("$COMMD" --help | sed -n 's/.*read settings from FILE (default \(.*\), if it exists);$/\1/p')
if [ -z "$def" ]; then
	bad "commd --help names no default config file"
elif [ -e "$def" ]; then
	echo "skip: $def exists: commd without --config would read it"
else
	"$COMMD" --foreground --socket "$tmp/nofile.sock" 2>"$tmp/nofile.log" &
	pid=$!
	until "$COMMCTL" --socket "$tmp/nofile.sock" status >/dev/null 2>&1; do
		kill -0 "$pid" 2>/dev/null || { bad "commd without a config file exited: $(cat "$tmp/nofile.log")"; break; }
		sleep 0.02
	done
	kill -TERM "$pid"; wait "$pid" || bad "commd did not exit cleanly"
	grep -q " info: config: none (defaults; no $def)\$" "$tmp/nofile.log" ||
		bad "no config file is not logged: $(cat "$tmp/nofile.log")"
fi

# 3. bad files stop commd at start, naming the line
check_bad() { # NAME LINE WORDS TEXT
	printf '%s\n' "$4" >"$tmp/bad.conf"
	# a commd that accepted the file would serve forever: timeout makes that a failure
	if timeout 10 "$COMMD" --foreground --config "$tmp/bad.conf" --socket "$tmp/bad.sock" 2>"$tmp/bad.err"; then
		bad "$1: accepted"
	elif ! grep -q "bad.conf:$2: .*$3" "$tmp/bad.err"; then
		bad "$1: message does not name line $2 ($3): $(cat "$tmp/bad.err")"
	fi
}
check_bad "unknown key" 2 "unknown key 'thread'" $'# comment\nthread = 2'
check_bad "threads zero" 1 "threads: '0' is not in 1..1024" 'threads = 0'
check_bad "threads not a number" 1 "threads: '2x'" 'threads = 2x'
check_bad "timeout too long" 1 "timeout: '86400001' is not in" 'timeout = 86400001'
check_bad "pin-workers" 1 "pin-workers: 'maybe' is not yes or no" 'pin-workers = maybe'
check_bad "drain-timeout" 1 "drain-timeout: '-1' is not in 0..600000" 'drain-timeout = -1'
check_bad "net-spin-us" 1 "net-spin-us: 'fast' is not auto or in 0..100000" 'net-spin-us = fast'
check_bad "net-spin-us too long" 1 "net-spin-us: '100001' is not auto" 'net-spin-us = 100001'
check_bad "peer-listen" 1 "peer-listen: '127.0.0.1' is not HOST:PORT" 'peer-listen = 127.0.0.1'
check_bad "max-job-memory" 1 "max-job-memory: '12Q' is not a size" 'max-job-memory = 12Q'
check_bad "handshake-timeout" 1 "handshake-timeout: '0' is not in 1..3600000" 'handshake-timeout = 0'
check_bad "max-connections" 1 "max-connections-per-uid: 'many' is not in" 'max-connections-per-uid = many'
timeout 10 "$COMMD" --foreground --config /dev/null --socket "$tmp/g.sock" --admin-group no-such-grp \
	2>"$tmp/g.err"
[ $? = 2 ] && grep -q "admin-group: no group named 'no-such-grp'" "$tmp/g.err" ||
	bad "an unknown admin group: $(cat "$tmp/g.err")"
check_bad "log level" 3 "unknown level 'loud'" $'threads = 1\n\nlog-level = loud'
check_bad "section" 2 "has no sections" $'[commd]\nthreads = 1'
check_bad "not key = value" 2 "not a 'key = value' line" $'threads = 1\njust words'
check_bad "empty socket" 1 "socket: '' is empty" 'socket ='
check_bad "a key twice" 3 "threads is set twice" $'threads = 1\nlog-level = info\nthreads = 2'
check_bad "an indented line" 2 "threads is set twice" $'threads = 2\n  1'
check_bad "a # after a value" 1 "threads: '2 # two' is not in" 'threads = 2 # two'
# inih reads 199 bytes a line: a longer line is refused whole, naming its line, not
# split with its tail read as a line of its own; a long comment is only a comment
long=$(printf '%0250d' 0)
check_bad "a long line" 2 "longer than 199 bytes" $'threads = 1\ntopology = /'"$long"$'\nthreads = 2'
check_bad "a line of 199 bytes" 2 "unknown key 'thread'" "# ${long:0:197}"$'\nthread = 2'
printf '# %s threads = 0\n; %s threads = 0\n' "$long" "$long" >"$tmp/long.conf"
timeout 10 "$COMMD" --config "$tmp/long.conf" --dump-topology >/dev/null 2>"$tmp/long.err" ||
	bad "a long comment line: $(cat "$tmp/long.err")"
# a directory opens and reads as nothing: refused, not every setting at its default
timeout 10 "$COMMD" --foreground --config "$tmp" --socket "$tmp/dir.sock" 2>"$tmp/bad.err"
[ $? = 2 ] && grep -q "config: $tmp: is a directory" "$tmp/bad.err" ||
	bad "--config a directory: $(cat "$tmp/bad.err")"
printf 'topology = %s\n' "$tmp/none.topo" >"$tmp/bad.conf"
timeout 10 "$COMMD" --foreground --config "$tmp/bad.conf" 2>"$tmp/bad.err" && bad "missing topology file accepted"
grep -q "none.topo: No such file" "$tmp/bad.err" || bad "missing topology file: $(cat "$tmp/bad.err")"
timeout 10 "$COMMD" --foreground --config "$tmp/none.conf" 2>"$tmp/bad.err" && bad "missing --config file accepted"
grep -q "none.conf: No such file" "$tmp/bad.err" || bad "missing --config file: $(cat "$tmp/bad.err")"
timeout 10 "$COMMD" --foreground --config /dev/null --threads 0 2>"$tmp/bad.err" && bad "--threads 0 accepted"
grep -q -- "--threads: '0' is not in 1..1024" "$tmp/bad.err" || bad "--threads 0: $(cat "$tmp/bad.err")"

# 4. SIGHUP reloads the log level, the limits and net-spin-us; a job waiting meanwhile goes on
printf 'socket = %s\nlog-level = info\n' "$tmp/hup.sock" >"$tmp/hup.conf"
"$COMMD" --foreground --config "$tmp/hup.conf" 2>"$tmp/hup.log" &
pid=$!
until "$COMMCTL" --socket "$tmp/hup.sock" status >/dev/null 2>&1; do sleep 0.02; done
# rank 0 of 2 waits for a rank 1 that never comes while the signal lands
COMM_SOCKET=$tmp/hup.sock COMM_JOB=held COMM_RANK=0 COMM_WORLD_SIZE=2 COMM_TIMEOUT=5000 \
	"$COMM_DEMOS/collectives" >/dev/null 2>&1 &
held=$!
sleep 0.3
printf 'socket = %s\nlog-level = debug\nmax-connections = 2\nnet-spin-us = 0\n' "$tmp/hup.sock" \
	>"$tmp/hup.conf"
kill -HUP "$pid"
for _ in $(seq 100); do grep -q "reload: " "$tmp/hup.log" && break; sleep 0.05; done
grep -q "reload: $tmp/hup.conf: log level, limits, .* net-spin-us (0 us) applied" "$tmp/hup.log" ||
	bad "SIGHUP: no reload (with net-spin-us 0) in the log: $(tail -3 "$tmp/hup.log")"
# the held rank and one commctl fill max-connections 2; a third is refused
COMM_SOCKET=$tmp/hup.sock COMM_JOB=third COMM_RANK=0 COMM_WORLD_SIZE=2 COMM_TIMEOUT=3000 \
	"$COMM_DEMOS/collectives" >/dev/null 2>&1 &
third=$!
# until the third has connected (commctl is served meanwhile), then refused
for _ in $(seq 50); do
	out=$("$COMMCTL" --socket "$tmp/hup.sock" status 2>&1)
	grep -q "max-connections" <<<"$out" && break
	sleep 0.1
done
grep -q "max-connections" <<<"$out" || bad "max-connections not reloaded: $out"
kill "$third" 2>/dev/null; wait "$third" 2>/dev/null
sleep 0.2
"$COMMCTL" --socket "$tmp/hup.sock" jobs 2>&1 | grep -q "held" || bad "SIGHUP dropped a waiting job"
grep -q " debug: " "$tmp/hup.log" || bad "log-level not reloaded: no debug lines"
# what needs a restart is checked: a group that does not exist keeps every setting
# in force; a changed socket or pin-workers is applied at the next restart, and said
hup() { # WANT: SIGHUP, then wait for a line with WANT
	kill -HUP "$pid"
	for _ in $(seq 100); do grep -q "$1" "$tmp/hup.log" && break; sleep 0.05; done
}
cp "$tmp/hup.conf" "$tmp/hup.conf.good"
printf 'admin-group = no-such-grp\n' >>"$tmp/hup.conf"
hup "no group named"
grep -q "reload: admin-group: no group named 'no-such-grp': the settings in force stay" \
	"$tmp/hup.log" || bad "an unknown admin-group on SIGHUP: $(tail -2 "$tmp/hup.log")"
printf 'socket = %s\nlog-level = debug\nmax-connections = 2\nnet-spin-us = 0\npin-workers = no\n' \
	"$tmp/hup2.sock" >"$tmp/hup.conf"
hup "until a restart"
grep -q "reload: socket, pin-workers changed: the values commd started with stay until a restart" \
	"$tmp/hup.log" || bad "a changed socket on SIGHUP: $(tail -2 "$tmp/hup.log")"
[ -e "$tmp/hup2.sock" ] && bad "a changed socket on SIGHUP was opened"
cp "$tmp/hup.conf.good" "$tmp/hup.conf"
# a bad file on SIGHUP: said in the log, the settings in force stay
echo 'threads = none' >>"$tmp/hup.conf"
kill -HUP "$pid"
for _ in $(seq 100); do grep -q "the settings in force stay" "$tmp/hup.log" && break; sleep 0.05; done
grep -q "reload: config: .*hup.conf:5: threads" "$tmp/hup.log" ||
	bad "a bad file on SIGHUP: $(tail -2 "$tmp/hup.log")"
# the file replaced by a directory: said, the settings in force stay
mv "$tmp/hup.conf" "$tmp/hup.conf.old" && mkdir "$tmp/hup.conf"
kill -HUP "$pid"
for _ in $(seq 100); do grep -q "is a directory" "$tmp/hup.log" && break; sleep 0.05; done
grep -q "reload: config: $tmp/hup.conf: is a directory.*: the settings in force stay" "$tmp/hup.log" ||
	bad "a directory on SIGHUP: $(tail -2 "$tmp/hup.log")"
n=$(wc -l <"$tmp/hup.log")
"$COMMCTL" --socket "$tmp/hup.sock" status >/dev/null 2>&1
sleep 0.2
tail -n +$((n + 1)) "$tmp/hup.log" | grep -q " debug: " ||
	bad "a directory on SIGHUP reset the log level: $(tail -3 "$tmp/hup.log")"
kill "$held" 2>/dev/null; wait "$held" 2>/dev/null
kill -TERM "$pid"; wait "$pid" || bad "commd did not exit cleanly after SIGHUP"

# 5. the socket file: one left by a commd that is gone is removed (and said);
# one a live commd answers on, or one that cannot be tried, stops a second
# commd; at stop commd removes the file it bound, not one put in its place
sd=$tmp/sockets
mkdir -m 0777 "$sd"
chmod 0711 "$tmp"
s=$sd/commd.sock
start_on() { # LOG [COMMD ARGS]: a commd on $s, its pid in $p
	local log=$1
	shift
	"$@" "$COMMD" --foreground --config /dev/null --socket "$s" 2>"$log" &
	p=$!
	until "$COMMCTL" --socket "$s" status >/dev/null 2>&1; do
		kill -0 "$p" 2>/dev/null || { bad "commd on $s exited: $(cat "$log")"; return 1; }
		sleep 0.02
	done
}
start_on "$tmp/s1.log"
kill -KILL "$p"; wait "$p" 2>/dev/null
grep -q " info: config: /dev/null\$" "$tmp/s1.log" || bad "--config /dev/null is not logged: $(cat "$tmp/s1.log")"
[ -S "$s" ] || bad "a killed commd left no socket file to test with"
start_on "$tmp/s2.log"
grep -q "listen: $s: no daemon answers: removed it" "$tmp/s2.log" ||
	bad "a stale socket was not said to be removed: $(cat "$tmp/s2.log")"
timeout 10 "$COMMD" --foreground --config /dev/null --socket "$s" 2>"$tmp/s3.log"
[ $? = 1 ] && grep -q "another commd is serving it" "$tmp/s3.log" ||
	bad "a second commd on a live socket: $(cat "$tmp/s3.log")"
# a commd that may not connect (another user's, here mode 000) must not take the path over
chmod 000 "$s"
[ "$(id -u)" = 0 ] && other="setpriv --reuid=65534 --regid=65534 --clear-groups" || other=
timeout 10 $other "$COMMD" --foreground --config /dev/null --socket "$s" --gpu-worker none \
	2>"$tmp/s4.log"
[ $? = 1 ] && grep -q "cannot tell whether a daemon serves it: Permission denied" "$tmp/s4.log" ||
	bad "a commd that may not connect to a live socket: $(cat "$tmp/s4.log")"
chmod 0666 "$s"
"$COMMCTL" --socket "$s" status >/dev/null 2>&1 || bad "the live commd lost its socket"
# another commd's socket in the place of this one's: left to it at stop
mv "$s" "$s.moved"
first=$p
start_on "$tmp/s5.log"
kill -TERM "$first"; wait "$first" || bad "commd did not exit cleanly"
grep -q "is no longer the socket commd bound: left in place" "$tmp/s2.log" ||
	bad "a replaced socket: $(tail -2 "$tmp/s2.log")"
"$COMMCTL" --socket "$s" status >/dev/null 2>&1 || bad "stopping commd removed another's socket"
kill -TERM "$p"; wait "$p" || bad "commd did not exit cleanly"
[ -e "$s" ] && bad "commd left the socket it bound"

# 6. detached (no --foreground), commd stays in its directory: a relative
# --config and the relative socket path in it mean there what they meant at
# start; the command returns once commd serves, and a second start on the
# same socket fails with commd's status and its error on stderr
run=$tmp/run
mkdir -p "$run/rel/b"
printf 'socket = rel/b/commd.sock\ngpu-worker = none\n' >"$run/rel.conf"
(cd "$run" && "$COMMD" --config rel.conf) || bad "commd did not detach: exit $?"
"$COMMCTL" --socket "$run/rel/b/commd.sock" status --json >"$tmp/rel.json" 2>&1 ||
	bad "a detached commd did not serve when its start returned: $(cat "$tmp/rel.json")"
(cd "$run" && timeout 30 "$COMMD" --config rel.conf 2>"$tmp/rel2.err")
rc=$?
[ "$rc" = 1 ] && grep -q "another commd is serving it" "$tmp/rel2.err" ||
	bad "a detached start on a served socket: exit $rc: $(cat "$tmp/rel2.err")"
p=$(sed -n 's/.*"pid": \([0-9]*\).*/\1/p' "$tmp/rel.json")
if [ -z "$p" ]; then
	bad "a detached commd with a relative --config and socket does not serve"
else
	[ "$(readlink "/proc/$p/cwd")" = "$run" ] || bad "a detached commd left $run: $(readlink "/proc/$p/cwd")"
	kill -TERM "$p"
	for _ in $(seq 250); do kill -0 "$p" 2>/dev/null || break; sleep 0.02; done
	kill -0 "$p" 2>/dev/null && bad "a detached commd did not stop on SIGTERM"
fi

[ "$fail" = 0 ] && echo "PASS: test-config"
exit "$fail"
