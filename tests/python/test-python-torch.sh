#!/bin/bash
# test-python-torch.sh: torch.distributed.init_process_group("commd") after
# `import commd.backend`: 4 ranks under commrun run test_torch_backend.py
# (the collectives, every reduction, lists, all_to_all, send/recv, barrier,
# async ops and an averaged gradient, each checked exactly) against a real
# commd, then 2-rank scripts that end after destroy_process_group() or
# without it, whose jobs must end cleanly, and the checks again on CUDA
# tensors where torch sees a GPU. Skips without a
# python3 that has torch.
set -u
. "${srcdir:-.}/tests/python/env.sh" torch.distributed
. "$srcdir/tests/lib/daemon.sh"
daemon_start commd-torch

export COMMCTL # the test asks it which jobs are left
timeout 300 "$COMMRUN" -n 4 --socket "$sock" --timeout 30000 \
	"$py" "$srcdir/tests/python/test_torch_backend.py" "$dir/store" >"$dir/out" 2>&1
rc=$?
ok=$(grep -c '^rank [0-9]: torch.distributed backend commd: [0-9]* checks ok$' "$dir/out")
if [ $rc != 0 ] || [ "$ok" != 4 ]; then
	echo "FAIL: torch.distributed over commd (commrun exit $rc)"; cat "$dir/out" "$dir/commd.log"
	exit 1
fi
cat "$dir/out"

# A script that ends after destroy_process_group(), or without it, leaves
# its job cleanly (not a connection closed under commd, a failed job).
cat >"$dir/ends.py" <<'PY'
import os, sys, torch, torch.distributed as dist, commd.backend
rank, n = int(os.environ["COMM_RANK"]), int(os.environ["COMM_WORLD_SIZE"])
dist.init_process_group("commd", init_method=f"file://{sys.argv[1]}", rank=rank, world_size=n)
t = torch.ones(2)
dist.all_reduce(t)
assert t.tolist() == [n, n]
if sys.argv[2] == "destroy":
    dist.destroy_process_group()
PY
freed=$(grep -ac ': freed (' "$dir/commd.log")
for how in destroy exit; do
	timeout 120 "$COMMRUN" -n 2 --socket "$sock" --timeout 30000 \
		"$py" "$dir/ends.py" "$dir/store-$how" $how >"$dir/out-$how" 2>&1 ||
		{ echo "FAIL: ends with $how: commrun exit $?"; cat "$dir/out-$how"; exit 1; }
done
# commd frees a job once its last rank is gone
for _ in $(seq 100); do
	[ "$(grep -ac ': freed (' "$dir/commd.log")" -ge $((freed + 2)) ] && break
	sleep 0.1
done
if [ "$(grep -ac ': freed (' "$dir/commd.log")" -lt $((freed + 2)) ]; then
	echo "FAIL: the torch scripts' jobs were not freed within 10 s"; cat "$dir/commd.log"; exit 1
fi
if grep -a 'failed: ' "$dir/commd.log"; then
	echo "FAIL: a torch script's job failed at its end"; cat "$dir/commd.log"; exit 1
fi
echo "ok: scripts that end after destroy_process_group() and without it leave cleanly"
# The same checks on CUDA tensors where torch sees a GPU.
if "$py" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
	COMMD_TEST_DEVICE=cuda timeout 300 "$COMMRUN" -n 4 --socket "$sock" --timeout 30000 \
		"$py" "$srcdir/tests/python/test_torch_backend.py" "$dir/cstore" >"$dir/cout" 2>&1
	rc=$?
	ok=$(grep -c '^rank [0-9]: torch.distributed backend commd: [0-9]* checks ok$' "$dir/cout")
	if [ $rc != 0 ] || [ "$ok" != 4 ]; then
		echo "FAIL: torch.distributed over commd on CUDA tensors (commrun exit $rc)"
		cat "$dir/cout" "$dir/commd.log"; exit 1
	fi
	echo "ok: the same checks on CUDA tensors"
else
	echo "note: no GPU for torch: the checks on CUDA tensors are skipped"
fi
daemon_stop
echo "ok: $py: torch.distributed backend \"commd\", 4 ranks, every check exact"
