#!/bin/sh
# test-fuzz.sh: a minute of libFuzzer on commd's connection code
# (tests/fuzz/fuzz-conn) from a copy of the seed corpus and of the inputs
# that once found a bug (tests/fuzz/regress). Passes unless it
# finds a crash, a leak, undefined behaviour or a hang; skips (77) when
# configure found no clang to build the fuzzer with.
fuzz=${FUZZ_CONN:-tests/fuzz/fuzz-conn}
secs=${FUZZ_SECONDS:-60}
seeds=${srcdir:-.}/tests/fuzz/corpus
regress=${srcdir:-.}/tests/fuzz/regress
crashes=tests/fuzz/crashes

if [ ! -x "$fuzz" ]; then
	echo "fuzz-conn: not built: configure found no clang that links" \
		"-fsanitize=fuzzer (FUZZ_CC); skipped"
	exit 77
fi
work=$(mktemp -d "${TMPDIR:-/tmp}/test-fuzz.XXXXXX") || exit 1
trap 'rm -rf "$work"' EXIT
mkdir "$work/corpus" && mkdir -p "$crashes" || exit 1
cp "$seeds"/* "$regress"/* "$work/corpus/" || exit 1

# A crash, leak or hang is saved under $crashes/ and ends the run at once.
"$fuzz" -max_total_time="$secs" -print_final_stats=1 -timeout=10 -rss_limit_mb=2048 \
	-error_exitcode=1 -timeout_exitcode=1 -artifact_prefix="$crashes/" \
	"$work/corpus" >"$work/log" 2>&1
rc=$?
execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$work/log")
cov=$(grep -o 'cov: [0-9]* ft: [0-9]*' "$work/log" | tail -n 1)
stats="${cov:-no coverage line}, corpus $(ls "$work/corpus" | wc -l) inputs"
rmdir "$crashes" 2>/dev/null
if [ "$rc" -ne 0 ]; then
	tail -n 80 "$work/log"
	echo "fuzz-conn: failed (exit $rc) after ${execs:-?} execs ($stats); the input is in" \
		"$crashes/: run $fuzz FILE to reproduce (COMMD_FUZZ_LOG=debug for commd's log)"
	exit 1
fi
echo "fuzz-conn: ${execs:-?} execs in $secs s ($stats)"
exit 0
