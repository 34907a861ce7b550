#!/bin/bash
# test-commbench.sh: commbench against a real commd: every op x dtype x
# reduction checked at small sizes on 4 and 3 ranks (and with -P), its --json and
# --reference lines, that it fails on wrong results and without a daemon, and
# that it refuses bad usage and sizes that leave nothing to measure.
set -u
. "$(dirname "$0")/../lib/daemon.sh"
: "${COMMBENCH:=./client/commbench}"
daemon_start commd-bench
failures=0

fail() {
	echo "FAIL: $*"
	failures=$((failures + 1))
}

small=(-b 8 -e 64K -f 8 -w 1 -i 2)
sizes="8 64 512 4096 32768"
ops="allreduce reduce_scatter allgather broadcast reduce alltoall alltoallv sendrecv"
dtypes="int8:1 uint8:1 int32:4 uint32:4 int64:8 uint64:8 half:2 bfloat16:2 float:4 double:8"

# want_rows N: table rows for -o all -d all -r all at $sizes (count 0 skipped).
want_rows() {
	local rows=0 op d es tables blocks size
	for op in $ops; do
		tables=1 blocks=1
		case $op in allreduce | reduce_scatter | reduce) tables=5 ;; esac
		case $op in reduce_scatter | allgather | alltoall | alltoallv) blocks=$1 ;; esac
		for d in $dtypes; do
			es=${d#*:}
			for size in $sizes; do
				((size / es / blocks > 0)) && rows=$((rows + tables))
			done
		done
	done
	echo $rows
}

# Every op, dtype and reduction, checked each iteration, on 4 and on 3 ranks.
for n in 4 3; do
	"$COMMBENCH" --socket "$sock" -n $n -o all -d all -r all "${small[@]}" \
		>"$dir/table$n" 2>"$dir/err$n"
	rc=$?
	[ $rc = 0 ] || fail "$n ranks: exit status $rc: $(head -5 "$dir/err$n")"
	[ -s "$dir/err$n" ] && fail "$n ranks: stderr: $(head -5 "$dir/err$n")"
	got=$(grep -c '^# Wrong values *: 0 OK$' "$dir/table$n")
	[ "$got" = 200 ] || fail "$n ranks: $got tables with no wrong value, want 200"
	got=$(grep -c '^# Wrong values' "$dir/table$n")
	[ "$got" = 200 ] || fail "$n ranks: $got tables, want 200"
	# a row: size count type redop root, then time algbw busbw #wrong twice
	awk -v n=$n '!/^#/ {
		if (NF != 13 || $9 != "0" || ($13 != "0" && $13 != "n/a") || $1 <= 0 || $2 <= 0) {
			print "bad row: " $0; bad = 1
		}
	} END { exit bad }' "$dir/table$n" || fail "$n ranks: rows with wrong values"
	got=$(grep -vc '^#' "$dir/table$n")
	[ "$got" = "$(want_rows $n)" ] || fail "$n ranks: $got rows, want $(want_rows $n)"
	got=$(awk '!/^#/ { print $3, $4 }' "$dir/table$n" | sort -u | wc -l)
	[ "$got" = 60 ] || fail "$n ranks: $got dtype x redop pairs, want 60"
	grep -q "^# commbench: $n ranks, commd at $sock" "$dir/table$n" ||
		fail "$n ranks: no banner"
done

# -P: the iterations back to back with requests, then one more checked.
"$COMMBENCH" --socket "$sock" -n 4 -P -o all -d all -r all "${small[@]}" >"$dir/tableP" \
	2>"$dir/errP"
rc=$?
[ $rc = 0 ] || fail "-P: exit status $rc: $(head -5 "$dir/errP")"
got=$(grep -c '^# Wrong values *: 0 OK$' "$dir/tableP")
[ "$got" = 200 ] || fail "-P: $got tables with no wrong value, want 200"
got=$(grep -vc '^#' "$dir/tableP")
[ "$got" = "$(want_rows 4)" ] || fail "-P: $got rows, want $(want_rows 4)"
grep -q "^#  dtype all redop all; time: iterations back to back, the whole / iters" \
	"$dir/tableP" || fail "-P: the banner does not say how it times"

# --json: one object per op, size and placement, with exactly these keys.
if ! "$COMMBENCH" --socket "$sock" --json -o all "${small[@]}" >"$dir/json" 2>"$dir/err"; then
	fail "json: exit status $?: $(head -5 "$dir/err")"
fi
python3 - "$dir/json" <<'PY' || fail "json: bad output: $(head -3 "$dir/json")"
import json, sys
keys = ["bench", "op", "bytes", "count", "dtype", "redop", "ranks", "inplace",
        "time_us", "algbw_gbs", "busbw_gbs", "wrong"]
factor = {"allreduce": 1.5, "reduce_scatter": 0.75, "allgather": 0.75,
          "alltoall": 0.75, "alltoallv": 0.75, "broadcast": 1, "reduce": 1, "sendrecv": 1}
seen = {}
for line in open(sys.argv[1]):
    o = json.loads(line)
    assert list(o) == keys, line
    assert o["bench"] == "commd" and o["dtype"] == "float32" and o["ranks"] == 4, line
    # algbw has 6 decimals: 8 B over more than 16 ms (a slow run) prints 0.000000
    assert o["wrong"] == 0 and o["time_us"] > 0 and o["algbw_gbs"] >= 0, line
    assert o["redop"] == ("sum" if o["op"] in ("allreduce", "reduce_scatter", "reduce")
                          else "none"), line
    blocks = 4 if o["op"] in ("reduce_scatter", "allgather", "alltoall", "alltoallv") else 1
    assert o["bytes"] == o["count"] * 4 * blocks, line
    assert abs(o["algbw_gbs"] - o["bytes"] / o["time_us"] / 1e3) <= 1e-3 * o["algbw_gbs"] + 1e-6
    assert abs(o["busbw_gbs"] - o["algbw_gbs"] * factor[o["op"]]) <= 1e-5 + 1e-5 * o["busbw_gbs"]
    seen[o["op"], o["inplace"]] = seen.get((o["op"], o["inplace"]), 0) + 1
want = {}
for op in factor:
    rows = 4 if op in ("reduce_scatter", "allgather", "alltoall", "alltoallv") else 5
    want[op, False] = rows
    if op not in ("alltoall", "alltoallv", "sendrecv"):
        want[op, True] = rows
assert seen == want, (seen, want)
PY

# --reference: each rank's time and bandwidth line per op, in the reference's
# format (smaller buffers here: the full 400 MB per rank is slow on 2 cores).
if ! "$COMMBENCH" --socket "$sock" --reference -e 4M >"$dir/ref" 2>"$dir/err"; then
	fail "reference: exit status $?: $(head -5 "$dir/err")"
fi
for op in all_reduce reduce_scatter; do
	got=$(grep -E "^\[$op\] Rank [0-3]: $op\(world_size=4, num_elements=1048576\) took [0-9]+\.[0-9]{2}ms$" \
		"$dir/ref" | cut -d' ' -f3 | sort -u | wc -l)
	[ "$got" = 4 ] || fail "reference: $op: $got ranks with a took line, want 4"
	got=$(grep -E "^\[$op\] Rank [0-3]: $op measured bandwidth = [0-9]+ GB/s$" "$dir/ref" |
		cut -d' ' -f3 | sort -u | wc -l)
	[ "$got" = 4 ] || fail "reference: $op: $got ranks with a bandwidth line, want 4"
done
got=$(sed -E 's/^\[([a-z_]+)\] Rank [0-3]: .*(took|bandwidth).*/\1 \2/' "$dir/ref" | uniq -c |
	awk '{ print $1, $2, $3 }' | tr '\n' ';')
[ "$got" = "4 all_reduce took;4 all_reduce bandwidth;4 reduce_scatter took;4 reduce_scatter bandwidth;" ] ||
	fail "reference: lines out of order or extra: $got"

# Results spoiled under the benchmark are counted: the shim adds 1 to the last
# element of every float32 all-reduce, so each rank has 1 wrong per iteration.
shim=$(dirname "$COMMBENCH")/../tests/integration/.libs/bench-corrupt.so
LD_PRELOAD=$shim "$COMMBENCH" --socket "$sock" -b 1K -e 4K -w 0 -i 2 >"$dir/out" 2>"$dir/err"
rc=$?
if grep -q 'runtime does not come first' "$dir/err"; then
	echo "skip: the corrupting shim cannot be preloaded under ASan"
else
	[ $rc = 1 ] || fail "corrupt: exit status $rc, want 1"
	got=$(awk '!/^#/ { print $9, $13 }' "$dir/out" | tr '\n' ';')
	[ "$got" = "8 8;8 8;8 8;" ] || fail "corrupt: #wrong columns '$got', want 8 in each"
	grep -q '^# Wrong values *: 48 FAILED$' "$dir/out" || fail "corrupt: no FAILED line"
	grep -q '^commbench: rank [0-3]: allreduce count 256 float32 out-of-place: 1 wrong, element 255 is [0-9-]*, expected [0-9-]*$' \
		"$dir/err" || fail "corrupt: no wrong-value message: $(head -3 "$dir/err")"
fi

# No daemon at the socket: a clear error and exit status 1.
"$COMMBENCH" --socket "$dir/nobody.sock" -n 2 -b 8 -e 8 >"$dir/out" 2>"$dir/err"
rc=$?
[ $rc = 1 ] || fail "no daemon: exit status $rc, want 1"
grep -q "^commbench: rank [01]: comm_init: COMM_ERR_DAEMON_UNREACHABLE" "$dir/err" ||
	fail "no daemon: message: $(cat "$dir/err")"
[ -s "$dir/out" ] && fail "no daemon: output on stdout"

# --spawn-daemon starts its own commd ($COMMD) and stops it cleanly: in
# $TMPDIR, and with --config /dev/null, so that a node's settings file (a
# peer-listen its own commd holds) cannot stop it. A stand-in $COMMD notes
# the arguments.
mkdir "$dir/tmp"
printf '#!/bin/sh\necho "$@" >%q\nexec %q "$@"\n' "$dir/commd.args" "$COMMD" >"$dir/commd-args"
chmod +x "$dir/commd-args"
COMMD=$dir/commd-args TMPDIR=$dir/tmp "$COMMBENCH" --spawn-daemon -n 2 -o sendrecv -b 8 -e 1K \
	-f 4 -w 0 -i 1 >"$dir/out" 2>"$dir/err" ||
	fail "spawn-daemon: exit status $?: $(head -5 "$dir/err")"
grep -q "^# commbench: 2 ranks, commd at $dir/tmp/commbench-" "$dir/out" ||
	fail "spawn-daemon: not in \$TMPDIR: $(grep '^# commbench' "$dir/out")"
grep -q -- "--config /dev/null " "$dir/commd.args" ||
	fail "spawn-daemon: commd started without --config /dev/null: $(cat "$dir/commd.args")"
[ -z "$(ls "$dir/tmp")" ] || fail "spawn-daemon: left in \$TMPDIR: $(ls "$dir/tmp")"
env -u TMPDIR COMMD="$COMMD" "$COMMBENCH" --spawn-daemon -n 2 -o sendrecv -b 8 -e 1K -f 4 \
	-w 0 -i 1 >"$dir/out" 2>"$dir/err" || fail "spawn-daemon: exit status $?: $(head -5 "$dir/err")"
grep -q '^# commbench: 2 ranks, commd at /tmp/commbench-' "$dir/out" || fail "spawn-daemon: banner"
# a $TMPDIR too long for a socket path in it: said, exit status 1
TMPDIR=/tmp/$(printf '%090d' 0) "$COMMBENCH" --spawn-daemon -n 1 -b 8 -e 8 >"$dir/out" 2>"$dir/err"
rc=$?
if [ $rc != 1 ] || ! grep -q "^commbench: TMPDIR /tmp/0*: too long for a socket in it" "$dir/err"; then
	fail "spawn-daemon: a long TMPDIR: exit status $rc: $(cat "$dir/err")"
fi

# --version, as commctl's: the name and the version, exit status 0.
for v in --version -V; do
	out=$("$COMMBENCH" "$v" 2>&1)
	rc=$?
	if [ $rc != 0 ] || ! [[ $out =~ ^commbench\ [0-9]+\.[0-9]+\.[0-9]+$ ]]; then
		fail "$v: exit status $rc: $out"
	fi
done

# Bad usage: exit status 2 and a message, before any rank starts. -b 0 would
# never reach -e (0 times the factor), and sizes too small for one element a
# rank leave nothing to measure: both are refused, not an endless loop or
# an empty table with exit status 0.
for args in "-o bogus" "-d float8" "-r xor" "-b 1M -e 8" "-f 1" "-n 0" "-c 2" "-b 3X" \
	"-n 2 -b 0 -e 64 -w 0 -i 1" "-b 0 -e 0" "-n 4 -b 1 -e 15 -o reduce_scatter" \
	"-n 4 -b 1 -e 7 -d double" "-n 3 -o all -d all -b 8 -e 16"; do
	# shellcheck disable=SC2086
	timeout 30 "$COMMBENCH" --socket "$sock" $args >"$dir/out" 2>"$dir/err"
	rc=$?
	[ $rc = 2 ] || fail "usage '$args': exit status $rc, want 2"
	[ -s "$dir/err" ] || fail "usage '$args': no message"
	[ -s "$dir/out" ] && fail "usage '$args': output on stdout: $(head -3 "$dir/out")"
done
"$COMMBENCH" --socket "$sock" -n 4 -b 1 -e 15 -o reduce_scatter >/dev/null 2>"$dir/err"
grep -qx 'commbench: nothing to measure: reduce_scatter of float over 4 ranks needs a size of at least 16 bytes; from -b 1 to -e 15 the largest is 8' \
	"$dir/err" || fail "nothing to measure: message: $(cat "$dir/err")"
# a bad value of an option of a few values lists them
while IFS='|' read -r args want; do
	# shellcheck disable=SC2086
	"$COMMBENCH" --socket "$sock" $args >/dev/null 2>"$dir/err"
	grep -qxF "commbench: $want" "$dir/err" || fail "usage '$args': message: $(cat "$dir/err")"
done <<'EOF'
-o allreduse|-o: bad value 'allreduse' (allreduce, reduce_scatter, allgather, broadcast, reduce, alltoall, alltoallv, sendrecv or all)
--datatype float8|-d: bad value 'float8' (int8, uint8, int32, uint32, int64, uint64, half (float16), bfloat16, float (float32), double (float64) or all)
-r xor|-r: bad value 'xor' (sum, prod, min, max, avg or all)
-c 2|-c: bad value '2' (0 or 1)
EOF
timeout 30 "$COMMBENCH" --socket "$sock" -b 0 -e 64 >/dev/null 2>"$dir/err"
grep -qx 'commbench: -b 0: the smallest size must be at least 1 byte' "$dir/err" ||
	fail "-b 0: message: $(cat "$dir/err")"
# The smallest sizes that do hold one element a rank are measured.
"$COMMBENCH" --socket "$sock" -n 4 -b 1 -e 16 -o reduce_scatter -w 0 -i 1 >"$dir/out" \
	2>"$dir/err" || fail "16 bytes of reduce_scatter: exit status $?: $(head -3 "$dir/err")"
got=$(awk '!/^#/ { print $1, $2 }' "$dir/out" | tr '\n' ';')
[ "$got" = "16 1;" ] || fail "16 bytes of reduce_scatter: rows '$got', want '16 1;'"

daemon_stop
if [ $failures -gt 0 ]; then
	echo "test-commbench: $failures failures"
	exit 1
fi
echo "ok: commbench checks every op, dtype and reduction"
