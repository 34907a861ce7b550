# gpu-bins.sh: sourced by gpu-compare.sh and gpu-nodes.sh, with $name (the
# script's) set: their --build DIR option (default $BUILD, else .), the
# binaries from DIR or from $COMMD, $COMMD_GPU, $COMMBENCH, $NCCL_BENCH (a
# carried bin dir), and the exits without them: 1 without commd's own,
# 77 (a skip) without the CUDA ones, or without a GPU (nccl-bench says why).

build=${BUILD:-.}
while [ $# -gt 0 ]; do
	case $1 in
	--build) build=$2; shift 2 ;;
	--build=*) build=${1#--build=}; shift ;;
	*) echo "usage: $name [--build DIR]" >&2; exit 2 ;;
	esac
done
COMMD=${COMMD:-$build/daemon/commd}
COMMD_GPU=${COMMD_GPU:-$(dirname "$COMMD")/commd-gpu}
COMMBENCH=${COMMBENCH:-$build/client/commbench}
NCCL_BENCH=${NCCL_BENCH:-$build/tests/bench/nccl-bench}
for b in "$COMMD" "$COMMBENCH" "$COMMD_GPU" "$NCCL_BENCH"; do
	[ -x "$b" ] && continue
	echo "$name: no $b (--build DIR, or set COMMD ...)" >&2
	case $b in "$COMMD_GPU" | "$NCCL_BENCH") exit 77 ;; *) exit 1 ;; esac # no CUDA: a skip
done
rc=0
probe=$("$NCCL_BENCH" -g 1 -b 8 -e 8 -w 0 -i 1 2>&1 >/dev/null) || rc=$?
if [ "$rc" != 0 ]; then
	echo "$probe" >&2
	exit "$rc"
fi
