#!/bin/bash
# test-collectives-demo.sh: `commrun -n 4 collectives` against a real commd
# prints exactly the reference run's collective lines (the host-memory
# spelling: tensor([...]) without a device), then broadcast, reduce,
# all-to-all and barrier lines in the same style.
set -u
: "${COMMD:=./daemon/commd}" "${COMMRUN:=./client/commrun}" "${COMM_DEMOS:=./tests/demos}"
dir=$(mktemp -d /tmp/commd-demo-XXXXXX)
trap 'kill "$pid" 2>/dev/null; rm -rf "$dir"' EXIT

"$COMMD" --foreground --socket "$dir/commd.sock" 2>"$dir/commd.log" &
pid=$!
# ready when it answers commctl (connect + handshake), not after a fixed sleep
until "${COMMCTL:-./client/commctl}" --socket "$dir/commd.sock" status >/dev/null 2>&1; do
	kill -0 "$pid" 2>/dev/null || { echo "FAIL: commd exited"; cat "$dir/commd.log"; exit 1; }
	sleep 0.02
done

if ! "$COMMRUN" -n 4 --socket "$dir/commd.sock" "$COMM_DEMOS/collectives" >"$dir/out" 2>"$dir/err"; then
	echo "FAIL: the demo failed"; cat "$dir/err" "$dir/commd.log"; exit 1
fi
cat >"$dir/want" <<'WANT'
Rank 0 [before all-reduce]: tensor([0., 1., 2., 3.])
Rank 1 [before all-reduce]: tensor([1., 2., 3., 4.])
Rank 2 [before all-reduce]: tensor([2., 3., 4., 5.])
Rank 3 [before all-reduce]: tensor([3., 4., 5., 6.])
Rank 0 [after all-reduce]: tensor([ 6., 10., 14., 18.])
Rank 1 [after all-reduce]: tensor([ 6., 10., 14., 18.])
Rank 2 [after all-reduce]: tensor([ 6., 10., 14., 18.])
Rank 3 [after all-reduce]: tensor([ 6., 10., 14., 18.])
Rank 0 [before reduce-scatter]: input = tensor([0., 1., 2., 3.]), output = tensor([0.])
Rank 1 [before reduce-scatter]: input = tensor([1., 2., 3., 4.]), output = tensor([0.])
Rank 2 [before reduce-scatter]: input = tensor([2., 3., 4., 5.]), output = tensor([0.])
Rank 3 [before reduce-scatter]: input = tensor([3., 4., 5., 6.]), output = tensor([0.])
Rank 0 [after reduce-scatter]: input = tensor([0., 1., 2., 3.]), output = tensor([6.])
Rank 1 [after reduce-scatter]: input = tensor([1., 2., 3., 4.]), output = tensor([10.])
Rank 2 [after reduce-scatter]: input = tensor([2., 3., 4., 5.]), output = tensor([14.])
Rank 3 [after reduce-scatter]: input = tensor([3., 4., 5., 6.]), output = tensor([18.])
Rank 0 [before all-gather]: input = tensor([6.]), output = tensor([0., 1., 2., 3.])
Rank 1 [before all-gather]: input = tensor([10.]), output = tensor([1., 2., 3., 4.])
Rank 2 [before all-gather]: input = tensor([14.]), output = tensor([2., 3., 4., 5.])
Rank 3 [before all-gather]: input = tensor([18.]), output = tensor([3., 4., 5., 6.])
Rank 0 [after all-gather]: input = tensor([6.]), output = tensor([ 6., 10., 14., 18.])
Rank 1 [after all-gather]: input = tensor([10.]), output = tensor([ 6., 10., 14., 18.])
Rank 2 [after all-gather]: input = tensor([14.]), output = tensor([ 6., 10., 14., 18.])
Rank 3 [after all-gather]: input = tensor([18.]), output = tensor([ 6., 10., 14., 18.])
Rank 0 [before broadcast]: tensor([0., 1., 2., 3.])
Rank 1 [before broadcast]: tensor([1., 2., 3., 4.])
Rank 2 [before broadcast]: tensor([2., 3., 4., 5.])
Rank 3 [before broadcast]: tensor([3., 4., 5., 6.])
Rank 0 [after broadcast]: tensor([0., 1., 2., 3.])
Rank 1 [after broadcast]: tensor([0., 1., 2., 3.])
Rank 2 [after broadcast]: tensor([0., 1., 2., 3.])
Rank 3 [after broadcast]: tensor([0., 1., 2., 3.])
Rank 0 [after reduce to rank 0]: input = tensor([0., 1., 2., 3.]), output = tensor([ 6., 10., 14., 18.])
Rank 1 [after reduce to rank 0]: input = tensor([1., 2., 3., 4.]), output = tensor([0., 0., 0., 0.])
Rank 2 [after reduce to rank 0]: input = tensor([2., 3., 4., 5.]), output = tensor([0., 0., 0., 0.])
Rank 3 [after reduce to rank 0]: input = tensor([3., 4., 5., 6.]), output = tensor([0., 0., 0., 0.])
Rank 0 [after all-to-all]: input = tensor([0., 1., 2., 3.]), output = tensor([ 0.,  4.,  8., 12.])
Rank 1 [after all-to-all]: input = tensor([4., 5., 6., 7.]), output = tensor([ 1.,  5.,  9., 13.])
Rank 2 [after all-to-all]: input = tensor([ 8.,  9., 10., 11.]), output = tensor([ 2.,  6., 10., 14.])
Rank 3 [after all-to-all]: input = tensor([12., 13., 14., 15.]), output = tensor([ 3.,  7., 11., 15.])
Rank 0 [barrier]: every rank has arrived
Rank 1 [barrier]: every rank has arrived
Rank 2 [barrier]: every rank has arrived
Rank 3 [barrier]: every rank has arrived
WANT
# Ranks print concurrently: compare as sets of lines.
if ! diff <(sort "$dir/want") <(sort "$dir/out"); then
	echo "FAIL: output differs from the reference lines"; exit 1
fi
cat "$dir/out"
kill -TERM "$pid"
if ! wait "$pid"; then echo "FAIL: commd did not exit cleanly"; cat "$dir/commd.log"; exit 1; fi
if grep -q " error: " "$dir/commd.log"; then echo "FAIL: commd logged errors"; cat "$dir/commd.log"; exit 1; fi
echo "ok: the reference collectives, exactly"
