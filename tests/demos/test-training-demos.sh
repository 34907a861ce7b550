#!/bin/bash
# test-training-demos.sh: the reference run's three parallel-training demos
# under `commrun -n 4` against a real commd: each exits 0 (it checks its own
# numbers against the unsplit model) and prints the reference's lines; where
# a GPU works, each of them with --device prints the same lines.
set -u
. "$(dirname "$0")/../lib/daemon.sh"
daemon_start commd-train

# same_on_device NAME: where a GPU works, NAME --device prints NAME's lines
same_on_device() {
	if "$COMMRUN" -n 4 --socket "$sock" "$COMM_DEMOS/$1" --device \
		>"$dir/$1-device.out" 2>"$dir/$1-device.err"; then
		if ! diff <(sort "$dir/$1.out") <(sort "$dir/$1-device.out"); then
			echo "FAIL: $1 --device: lines differ from the host run's"; exit 1
		fi
		echo "ok: $1 --device prints the host run's lines, bit for bit"
	elif grep -qE -- "--device: (no usable GPU|built without CUDA)" "$dir/$1-device.err"; then
		echo "note: $1 --device is skipped: $(grep -m1 -E -- '--device: ' "$dir/$1-device.err")"
	else
		echo "FAIL: $1 --device failed"; cat "$dir/$1-device.err" "$dir/commd.log"; exit 1
	fi
}

# run NAME: the demo's stdout in $dir/NAME.out; fails the test if it fails
run() {
	local start=$SECONDS
	if ! "$COMMRUN" -n 4 --socket "$sock" "$COMM_DEMOS/$1" \
		>"$dir/$1.out" 2>"$dir/$1.err"; then
		echo "FAIL: $1 failed"; cat "$dir/$1.out" "$dir/$1.err" "$dir/commd.log"; exit 1
	fi
	cat "$dir/$1.out"
	echo "# $1: $((SECONDS - start)) s"
}

# expect FILE COUNT REGEX: exactly COUNT lines of FILE match REGEX
expect() {
	local got
	got=$(grep -cE "$3" "$1")
	if [ "$got" -ne "$2" ]; then
		echo "FAIL: $(basename "$1"): $got lines match, expected $2: $3"; exit 1
	fi
}

# unique FILE REGEX WHAT: the lines matching REGEX, reduced to the part after
# WHAT, are all the same
unique() {
	local n
	n=$(grep -E "$2" "$1" | sed "s/.*$3//" | sort -u | wc -l)
	if [ "$n" -ne 1 ]; then
		echo "FAIL: $(basename "$1"): $n different values after '$3' in lines: $2"; exit 1
	fi
}

sum='-?[0-9]+\.[0-9]{4}\.\.\.\]'
w="'1024x1024\\[$sum'"

run data_parallel
out=$dir/data_parallel.out
expect "$out" 8 '.'
loss='[0-9][0-9.e+-]*' params="\[$w, $w, $w, $w\]"
expect "$out" 8 "^\[data_parallelism\] Rank [0-3]: step = [01], loss = $loss, params = $params\$"
for r in 0 1 2 3; do
	for s in 0 1; do
		expect "$out" 1 "^\[data_parallelism\] Rank $r: step = $s, "
	done
done
unique "$out" "step = 0," "params = "
unique "$out" "step = 1," "params = "

# The gradients all-reduced in GPU memory where a GPU works: the very same lines.
same_on_device data_parallel

run tensor_parallel
out=$dir/tensor_parallel.out
expect "$out" 4 '.'
for r in 0 1 2 3; do
	expect "$out" 1 \
		"^\[tensor_parallelism\] Rank $r: forward pass produced activations 128x1024\[$sum\$"
done
unique "$out" . "activations "
# the activations all-gathered in GPU memory
same_on_device tensor_parallel

run pipeline_parallel
out=$dir/pipeline_parallel.out
expect "$out" 25 '.'
for r in 0 1 2; do
	expect "$out" 4 \
		"^\[pipeline_parallelism\] Rank $r: sending 32x1024\[$sum to rank $((r + 1))\$"
done
for r in 1 2 3; do
	expect "$out" 4 \
		"^\[pipeline_parallelism\] Rank $r: received 32x1024\[$sum from rank $((r - 1))\$"
	# what rank r-1 sent, in order, is what rank r received
	if ! diff <(grep -E "Rank $((r - 1)): sending" "$out" | sed 's/.*sending \([^ ]*\) .*/\1/') \
		<(grep -E "Rank $r: received" "$out" | sed 's/.*received \([^ ]*\) .*/\1/'); then
		echo "FAIL: rank $r received other micro-batches than rank $((r - 1)) sent"; exit 1
	fi
done
expect "$out" 1 \
	"^\[pipeline_parallelism\] Rank 3: pipeline produced outputs 128x1024\[$sum\$"
# the micro-batches sent and received in GPU memory
same_on_device pipeline_parallel

daemon_stop
echo "ok: data, tensor and pipeline parallel training match the unsplit model"
