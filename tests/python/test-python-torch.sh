#!/bin/bash
# test-python-torch.sh: torch.distributed.init_process_group("commd") after
# `import commd.backend`: 4 ranks under commrun run test_torch_backend.py
# (the collectives, every reduction, lists, all_to_all, send/recv, barrier,
# async ops and an averaged gradient, each checked exactly) against a real
# commd. Skips without a python3 that has torch.
set -u
. "${srcdir:-.}/tests/python/env.sh" torch.distributed
. "$srcdir/tests/lib/daemon.sh"
daemon_start commd-torch

timeout 300 "$COMMRUN" -n 4 --socket "$sock" --timeout 30000 \
	"$py" "$srcdir/tests/python/test_torch_backend.py" "$dir/store" >"$dir/out" 2>&1
rc=$?
ok=$(grep -c '^rank [0-9]: torch.distributed backend commd: [0-9]* checks ok$' "$dir/out")
if [ $rc != 0 ] || [ "$ok" != 4 ]; then
	echo "FAIL: torch.distributed over commd (commrun exit $rc)"; cat "$dir/out" "$dir/commd.log"
	exit 1
fi
cat "$dir/out"
daemon_stop
echo "ok: $py: torch.distributed backend \"commd\", 4 ranks, every check exact"
