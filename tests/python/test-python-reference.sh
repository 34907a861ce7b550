#!/bin/bash
# test-python-reference.sh: tests/python/reference.py, the reference run in
# torch over the commd Python package, under `commrun -n 4` against a real
# commd. Its collective lines are exactly the reference run's (and the C
# collectives demo's), its benchmark lines are well formed, its parameters
# and batch are bitwise mlp.c's, and its training lines are those the C demos
# print under the same daemon, within the tolerances below. reference.py
# itself checks each parallel result against one process running the unsplit
# model, and exits non-zero when one differs. Skips (77) without a python3
# that has numpy and torch (env.sh).
set -u
here=$(cd "$(dirname "$0")" && pwd)
: "${srcdir:=$here/../..}" "${abs_top_builddir:=$PWD}"
: "${COMMCTL:=$abs_top_builddir/client/commctl}"
export COMMCTL
# $py; PYTHONPATH, COMMD_LIBCOMM
. "$here/env.sh" "numpy, torch"

# A summary ('32x1024[0.1234...]') may differ in its last digit where torch's
# sums, taken in another order than mlp.c's, put the first element on the
# other side of a rounding boundary: at most 1e-4, one unit of that digit.
SUMMARY_TOL=1e-4
# The printed losses differ by float rounding alone, about 1e-7 of the loss;
# a missing or wrong collective moves them by 1e-4 or more. Relative:
LOSS_TOL=1e-5
# Elements the benchmark's ops take: the reference's 104857600 is minutes on
# a small machine; 1 Mi float32 keeps the lines and the formulas.
BENCH_ELEMENTS=1048576

. "$here/../lib/daemon.sh"
daemon_start commd-python

# run NAME PROG [ARGS]: 4 ranks of PROG, stdout in $dir/NAME.out
run() {
	local name=$1 start=$SECONDS
	shift
	if ! "$COMMRUN" -n 4 --socket "$sock" "$@" >"$dir/$name.out" 2>"$dir/$name.err"; then
		echo "FAIL: $name failed"; cat "$dir/$name.out" "$dir/$name.err" "$dir/commd.log"
		exit 1
	fi
	echo "# $name: $((SECONDS - start)) s"
}

run python "$py" "$here/reference.py" --bench-elements "$BENCH_ELEMENTS" --all-collectives
cat "$dir/python.out"
for demo in collectives data_parallel tensor_parallel pipeline_parallel; do
	run "$demo" "$COMM_DEMOS/$demo"
done

# mlp.c's parameters, batch and targets, raw float32, for the bitwise check
cat >"$dir/dump.c" <<'C'
#include <stdio.h>
#include <stdlib.h>
#include "mlp.h"

int main(void)
{
	size_t n = (size_t)MLP_BATCH * MLP_DIM;
	float *x = malloc(n * sizeof *x), *t = malloc(n * sizeof *t);
	struct mlp m;

	if (!x || !t || mlp_init(&m) < 0)
		return 1;
	mlp_batch(x, t);
	for (int l = 0; l < m.layers; l++)
		fwrite(m.w[l], sizeof(float), (size_t)m.dim * m.dim, stdout);
	fwrite(x, sizeof *x, n, stdout);
	fwrite(t, sizeof *t, n, stdout);
	return fflush(stdout) != 0;
}
C
if ! ${CC:-cc} -O2 -I"$srcdir/tests/demos" -I"$srcdir/client" -o "$dir/dump" "$dir/dump.c" \
	"$srcdir/tests/demos/mlp.c" "$COMMD_LIBCOMM" -Wl,-rpath,"$abs_top_builddir/.libs" -lm \
	>"$dir/cc.log" 2>&1 || ! "$dir/dump" >"$dir/mlp.bin"; then
	echo "FAIL: building or running the mlp.c dump"; cat "$dir/cc.log"; exit 1
fi

# The reference run's collective lines: the host spelling of
# shared/reference/reference-run.txt's (no device suffix), and rank 0's output
# before the all-gather as the C demo prints it (the reference shows it
# half-overwritten by the reduce-scatter: [ 0., 10., 14., 18.]).
cp "$srcdir/tests/fixtures/reference-collectives.txt" "$dir/reference-lines"

if ! "$py" - "$dir" "$here" "$BENCH_ELEMENTS" "$SUMMARY_TOL" "$LOSS_TOL" <<'PY'; then
import re
import sys

import numpy as np

d, here, elements = sys.argv[1], sys.argv[2], int(sys.argv[3])
summary_tol, loss_tol = float(sys.argv[4]), float(sys.argv[5])
world = 4
bad = []


def lines(name):
    with open(f"{d}/{name}") as f:
        return f.read().splitlines()


py = lines("python.out")
seen = set()  # indices of the Python lines some check has accounted for


def take(pred):
    got = [(i, s) for i, s in enumerate(py) if pred(s)]
    seen.update(i for i, _ in got)
    return [s for _, s in got]


# 1. Collectives: the reference's lines exactly, and every collective line
# of the C demo (with broadcast, reduce, all-to-all, barrier) and no other.
coll = take(lambda s: s.startswith("Rank "))
missing = [s for s in lines("reference-lines") if s not in coll]
if missing:
    bad.append("reference collective lines missing:\n  " + "\n  ".join(missing))
if sorted(coll) != sorted(lines("collectives.out")):
    extra = sorted(set(coll) - set(lines("collectives.out")))
    lack = sorted(set(lines("collectives.out")) - set(coll))
    bad.append("collective lines differ from the C demo's: extra %s, missing %s" % (extra, lack))

# 2. Benchmark: one time and one bandwidth line per op and rank, and the
# bandwidth the commbench formula gives for that time (GiB/s of bus traffic),
# within what printing the time to 0.01 ms allows.
factor = {"all_reduce": 2.0 * (world - 1) / world, "reduce_scatter": (world - 1) / world}
n = elements // world * world
for tag in factor:
    for r in range(world):
        took = take(lambda s: s.startswith(f"[{tag}] Rank {r}: {tag}("))
        bw = take(lambda s: s.startswith(f"[{tag}] Rank {r}: {tag} measured"))
        head = rf"\[{tag}\] Rank {r}: {tag}"
        m1 = re.fullmatch(rf"{head}\(world_size={world}, num_elements={n}\) took (\d+\.\d\d)ms",
                          took[0]) if len(took) == 1 else None
        m2 = re.fullmatch(rf"{head} measured bandwidth = (\d+) GB/s",
                          bw[0]) if len(bw) == 1 else None
        if not m1 or not m2:
            bad.append(f"{tag} rank {r}: malformed or missing lines: {took + bw}")
            continue
        ms, gbs = float(m1.group(1)), int(m2.group(1))
        if ms > 0:
            lo = n * 4 * factor[tag] / ((ms + 0.005) / 1e3) / 2**30
            hi = n * 4 * factor[tag] / (max(ms - 0.005, 1e-9) / 1e3) / 2**30
            if not lo - 0.5 <= gbs <= hi + 0.5:
                bad.append(f"{tag} rank {r}: {gbs} GB/s, but {ms} ms gives {lo:.1f}..{hi:.1f}")

# 3. Training: rank by rank, line by line, the C demos' lines; the words
# exactly, the numbers within the tolerances above.
NUM = re.compile(r"-?\d+\.\d+(?:e[+-]?\d+)?|-?\d+e[+-]?\d+")
stats = {"summaries": 0, "summaries exact": 0, "losses": 0, "max loss diff": 0.0}


def compare(where, c, p):
    if NUM.sub("#", c) != NUM.sub("#", p):
        return f"{where}: the C demo prints\n    {c}\n  reference.py\n    {p}"
    for mc, mp in zip(NUM.finditer(c), NUM.finditer(p)):
        a, b = float(mc.group()), float(mp.group())
        if c[mc.end():].startswith("...]"):
            stats["summaries"] += 1
            stats["summaries exact"] += mc.group() == mp.group()
            if not abs(a - b) <= summary_tol * 1.001:
                return f"{where}: summary {mp.group()}, the C demo's {mc.group()}"
        elif c[:mc.start()].endswith("loss = "):
            stats["losses"] += 1
            rel = abs(a - b) / abs(a) if a else abs(b)
            stats["max loss diff"] = max(stats["max loss diff"], rel)
            if not rel <= loss_tol:
                return (f"{where}: loss {mp.group()}, the C demo's {mc.group()} "
                        f"({rel:.2g} relative)")
        elif mc.group() != mp.group():
            return f"{where}: {mp.group()}, the C demo's {mc.group()}"
    return None


for demo, tag in [("data_parallel", "data_parallelism"), ("tensor_parallel", "tensor_parallelism"),
                  ("pipeline_parallel", "pipeline_parallelism")]:
    c_lines = lines(f"{demo}.out")
    p_lines = take(lambda s: s.startswith(f"[{tag}] "))
    if not c_lines:
        bad.append(f"{demo}: the C demo printed nothing")
    for r in range(world):
        pre = f"[{tag}] Rank {r}: "
        cs = [s for s in c_lines if s.startswith(pre)]
        ps = [s for s in p_lines if s.startswith(pre)]
        if len(cs) != len(ps):
            bad.append(f"{tag} rank {r}: {len(ps)} lines, the C demo {len(cs)}")
            continue
        for k, (c, p) in enumerate(zip(cs, ps)):
            why = compare(f"{tag} rank {r} line {k + 1}", c, p)
            if why:
                bad.append(why)

left = [s for i, s in enumerate(py) if i not in seen]
if left:
    bad.append("lines no check expects:\n  " + "\n  ".join(left))

# 4. The parameters, batch and targets reference.py builds are mlp.c's, bit
# for bit.
sys.path.insert(0, here)
import reference  # noqa: E402

raw = np.fromfile(f"{d}/mlp.bin", dtype=np.float32)
x, t = reference.mlp_batch()
mine = np.concatenate([w.numpy().ravel() for w in reference.mlp_weights()]
                      + [x.numpy().ravel(), t.numpy().ravel()])
if raw.size != mine.size or not np.array_equal(raw.view(np.uint32), mine.view(np.uint32)):
    diff = (raw.view(np.uint32) != mine.view(np.uint32)).sum() if raw.size == mine.size else "all"
    bad.append(f"parameters, batch and targets: {diff} of {raw.size} floats differ from mlp.c's")

for b in bad:
    print("FAIL:", b)
print("# %(summaries exact)d of %(summaries)d summaries exactly the C demos'; " % stats
      + "losses (%(losses)d) within %(max loss diff).2g (relative) of theirs" % stats)
sys.exit(1 if bad else 0)
PY
	exit 1
fi

daemon_stop
echo "ok: reference.py prints the reference run's lines, and the C demos' numbers"
