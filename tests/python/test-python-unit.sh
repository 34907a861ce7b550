#!/bin/bash
# test-python-unit.sh: the Python package's unit tests (test_commd_unit.py),
# run by both ranks of a commrun -n 2 job against a real commd, with the
# package from the source tree and libcomm from the build. Skips without a
# python3 that has numpy.
set -u
. "${srcdir:-.}/tests/python/env.sh" numpy
. "$srcdir/tests/lib/daemon.sh"
daemon_start commd-python

# the ranks signal each other through files in $TMPDIR: the test's own
TMPDIR=$dir timeout 300 "$COMMRUN" -n 2 --socket "$sock" --timeout 30000 \
	"$py" "$srcdir/tests/python/test_commd_unit.py" >"$dir/out" 2>&1
rc=$?
summary=$(grep -E '^rank [0-9]+: [0-9]+ tests, [0-9]+ failed, [0-9]+ skipped$' "$dir/out" | sort)
if [ $rc != 0 ] || [ "$(echo "$summary" | grep -c ' 0 failed, ')" != 2 ] ||
	[ "$(echo "$summary" | cut -d: -f2 | sort -u | wc -l)" != 1 ]; then
	echo "FAIL: the ranks' unit tests (commrun exit $rc)"; cat "$dir/out" "$dir/commd.log"; exit 1
fi
cat "$dir/out"
daemon_stop
echo "ok: $py, each rank: $(echo "$summary" | head -1 | cut -d" " -f3-)"
