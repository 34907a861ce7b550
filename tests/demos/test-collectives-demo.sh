#!/bin/bash
# test-collectives-demo.sh: `commrun -n 4 collectives` against a real commd
# prints exactly the reference run's collective lines (the host-memory
# spelling: tensor([...]) without a device), then broadcast, reduce,
# all-to-all and barrier lines in the same style; where a GPU works, again
# with the tensors in device memory, each line naming its device.
set -u
. "$(dirname "$0")/../lib/daemon.sh"
daemon_start commd-demo

if ! "$COMMRUN" -n 4 --socket "$sock" "$COMM_DEMOS/collectives" >"$dir/out" 2>"$dir/err"; then
	echo "FAIL: the demo failed"; cat "$dir/err" "$dir/commd.log"; exit 1
fi
# the reference run's 24 lines, then the other collectives'
cp "$(dirname "$0")/../fixtures/reference-collectives.txt" "$dir/want"
cat >>"$dir/want" <<'WANT'
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

# The same on device memory where a GPU works: every tensor says its device
# (as the reference's lines do), and without that the lines are the same.
if "$COMMRUN" -n 4 --socket "$sock" "$COMM_DEMOS/collectives" --device >"$dir/dout" 2>"$dir/derr"; then
	tensors=$(grep -o 'tensor(' "$dir/dout" | wc -l)
	devices=$(grep -oE "\], device='cuda:[0-9]+'\)" "$dir/dout" | wc -l)
	if [ "$tensors" != "$devices" ] || [ "$tensors" = 0 ]; then
		echo "FAIL: --device: $tensors tensors, $devices with their device"; cat "$dir/dout"; exit 1
	fi
	if ! diff <(sort "$dir/want") <(sed -E "s/\], device='cuda:[0-9]+'\)/])/g" "$dir/dout" | sort); then
		echo "FAIL: --device: output differs from the reference lines"; exit 1
	fi
	cat "$dir/dout"
	echo "ok: the same on device memory"
elif grep -qE -- "--device: (no usable GPU|built without CUDA)" "$dir/derr"; then
	echo "note: the device run is skipped: $(grep -m1 -E -- '--device: ' "$dir/derr")"
else
	echo "FAIL: the demo failed on device memory"; cat "$dir/derr" "$dir/commd.log"; exit 1
fi
daemon_stop
echo "ok: the reference collectives, exactly"
