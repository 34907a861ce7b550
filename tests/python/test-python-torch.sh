#!/bin/bash
# test-python-torch.sh: torch.distributed.init_process_group("commd") after
# `import commd.backend`: 4 ranks under commrun run test_torch_backend.py
# (the collectives, every reduction, lists, all_to_all, send/recv, barrier,
# async ops and an averaged gradient, each checked exactly; process groups
# made again after destroy_process_group(), one over a destroyed world whose
# stuck irecv it aborts) against a real commd, then 2-rank scripts that end after destroy_process_group() or
# without it, whose jobs must end cleanly, one whose irecv is never matched,
# which must still exit within a bound, and the checks again on CUDA
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
# the one job that failed: the destroyed world rank 0 aborted on purpose
if grep -a 'failed: ' "$dir/commd.log" | grep -av ': failed: COMM_ERR_ABORTED: rank 0 (pid [0-9]*): aborted: comm_abort$'; then
	echo "FAIL: a job of the torch run failed"; cat "$dir/commd.log"; exit 1
fi

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
lines=$(wc -l <"$dir/commd.log") # the jobs before: one was aborted on purpose
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
if tail -n +$((lines + 1)) "$dir/commd.log" | grep -a 'failed: '; then
	echo "FAIL: a torch script's job failed at its end"; cat "$dir/commd.log"; exit 1
fi
echo "ok: scripts that end after destroy_process_group() and without it leave cleanly"

# A script that ends with an op never matched (rank 0's irecv; rank 1 stays
# in the job) still exits once the backend's exit wait is over, through
# the real atexit hooks, not at the op's deadline (torch's 30 minutes).
cat >"$dir/hangs.py" <<'PY'
import os, sys, time, torch, torch.distributed as dist, commd.backend
rank, n = int(os.environ["COMM_RANK"]), int(os.environ["COMM_WORLD_SIZE"])
dist.init_process_group("commd", init_method=f"file://{sys.argv[1]}", rank=rank, world_size=n)
commd.backend._EXIT_WAIT_S = 2
mark = f"{sys.argv[1]}.rank0"
if rank == 0:
    dist.irecv(torch.zeros(1), src=1)
    with open(mark + ".tmp", "w") as f:
        f.write(f"{os.getpid()} {time.monotonic()}")
    os.rename(mark + ".tmp", mark)
    sys.exit(0)
while not os.path.exists(mark):
    time.sleep(0.05)
pid, end = open(mark).read().split()
while time.monotonic() - float(end) < 60:
    try:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                break
    except FileNotFoundError:
        break
    time.sleep(0.1)
print(f"rank 0 exited {time.monotonic() - float(end):.1f} s after its script", flush=True)
os._exit(0)  # the job failed with rank 0's connection: nothing to leave
PY
timeout 120 "$COMMRUN" -n 2 --socket "$sock" --timeout 30000 \
	"$py" "$dir/hangs.py" "$dir/store-hangs" >"$dir/out-hangs" 2>&1
s=$(sed -n 's/^rank 0 exited \([0-9]*\)\.[0-9] s after its script$/\1/p' "$dir/out-hangs")
if [ -z "$s" ] || [ "$s" -ge 12 ]; then
	echo "FAIL: a script with an unmatched irecv did not exit within 12 s"
	cat "$dir/out-hangs"; exit 1
fi
grep -q 'ops still running after 2 s at exit' "$dir/out-hangs" ||
	{ echo "FAIL: no warning of the ops left at exit"; cat "$dir/out-hangs"; exit 1; }
echo "ok: a script ending with an unmatched irecv exits $s s after its end (its wait: 2 s)"

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
