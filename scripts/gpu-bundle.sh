#!/bin/bash
# gpu-bundle.sh: build what the GPU checks need into a bundle that runs on a
# machine with a GPU but none of this build's packages (a GPU machine with
# CUDA and NCCL, without libuv, protobuf-c or UCX): the programs, linked
# with a static libcomm; the shared libraries they need, but for glibc's
# and NCCL's (the GPU machine's own NCCL is found at run time); UCX's
# transport modules; and run.sh, which runs the GPU tests and benchmarks
# from the source tree with them.
#
#   bash scripts/gpu-bundle.sh [DIR]        (default .gpu; DIR/build is the build)
#   bash DIR/run.sh [tests|bench|all]       (on the GPU machine, from the source tree)
#
# The bundle is DIR/bin, DIR/lib and DIR/run.sh (its size is printed at the
# end): what to carry to a lent GPU machine beside the source tree.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
out=$(mkdir -p "${1:-$top/.gpu}" && cd "${1:-$top/.gpu}" && pwd)
progs=(daemon/commd daemon/commd-gpu client/commctl client/commrun client/commbench
	tests/bench/nccl-bench tests/unit/test-gpu-worker tests/gpu/test-gpu-ops
	tests/gpu/test-gpu-mem tests/gpu/test-gpu-faults tests/demos/collectives tests/demos/data_parallel
	tests/demos/tensor_parallel tests/demos/pipeline_parallel)

cd "$top"
[ -x configure ] || log=$(autoreconf -fi 2>&1) || { echo "$log" >&2; exit 1; }
mkdir -p "$out/build"
cd "$out/build"
if [ ! -f Makefile ]; then
	"$top/configure" -q --disable-shared
	grep -q "^#define HAVE_CUDA 1" config.h ||
		{ echo "gpu-bundle.sh: configure found no CUDA: nothing to bundle" >&2; exit 1; }
fi
make -j"$(nproc)" >/dev/null
make -j"$(nproc)" "${progs[@]}" >/dev/null

rm -rf "$out/bin" "$out/lib"
mkdir -p "$out/bin" "$out/lib/ucx"
for p in "${progs[@]}"; do
	install -s "$p" "$out/bin/"
done
# bundle LIB...: copy the shared libraries LIB need into DIR/lib, but for
# the system's own (glibc, the C++ runtime), the driver's and NCCL
bundle() {
	for p in "$@"; do
		ldd "$p" | awk '$3 ~ /^\// { print $3 }'
	done | sort -u | while read -r lib; do
		case ${lib##*/} in
		libc.so* | libm.so* | libdl.so* | librt.so* | libpthread.so* | ld-linux* | \
			libstdc++.so* | libgcc_s.so* | libcuda.so* | libnvidia* | libnccl.so*) ;;
		*) [ -e "$out/lib/${lib##*/}" ] || cp -L "$lib" "$out/lib/" ;;
		esac
	done
}
bundle "${progs[@]}"
ucx=$(dirname "$(ldconfig -p | awk '/libucs.so.0 / { print $NF; exit }')")/ucx
cp -L "$ucx"/*.so* "$out/lib/ucx/"
bundle "$out"/lib/ucx/*.so* # their own libraries: ibverbs, rdmacm, ...

cat >"$out/run.sh" <<'EOF'
#!/bin/bash
# run.sh: the GPU checks with this bundle (made by scripts/gpu-bundle.sh),
# run from the source tree. tests: test-gpu-worker, test-gpu-ops (over one
# daemon and over three), test-gpu-mem, test-gpu-faults, and the four
# reference demos with --device on one daemon and over three; bench:
# tests/bench/gpu-compare.sh and gpu-nodes.sh. Each prints its result; the
# exit status is 1 when one failed (77, a skip, where no GPU works, is not
# a failure).
set -u
G=$(cd "$(dirname "$0")" && pwd)
what=${1:-tests}
# NCCL is the machine's own (pip's nvidia-nccl, or the CUDA toolkit's)
nccl=$(find / -xdev -name 'libnccl.so.2*' 2>/dev/null | head -1)
export LD_LIBRARY_PATH=$G/lib${nccl:+:$(dirname "$nccl")}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export UCX_MODULE_DIR=$G/lib/ucx
export COMMD=$G/bin/commd COMMD_GPU=$G/bin/commd-gpu COMMCTL=$G/bin/commctl \
	COMMRUN=$G/bin/commrun COMMBENCH=$G/bin/commbench NCCL_BENCH=$G/bin/nccl-bench \
	COMM_DEMOS=$G/bin
echo "# $("$COMMD_GPU" --probe 2>&1 | head -1); nccl: ${nccl:-not found}"
failed=0
check() {
	local name=$1 start=$SECONDS rc
	shift
	"$@" >"/tmp/gpu-check-$name.log" 2>&1
	rc=$?
	case $rc in
	0) echo "PASS: $name ($((SECONDS - start)) s)" ;;
	77) echo "SKIP: $name: $(tail -1 "/tmp/gpu-check-$name.log")" ;;
	*) echo "FAIL: $name (exit $rc, $((SECONDS - start)) s)"; tail -40 "/tmp/gpu-check-$name.log"
	   failed=1 ;;
	esac
}
if [ "$what" = tests ] || [ "$what" = all ]; then
	check test-gpu-worker "$G/bin/test-gpu-worker"
	check test-gpu-ops "$G/bin/test-gpu-ops"
	check test-gpu-mem "$G/bin/test-gpu-mem"
	check test-gpu-faults "$G/bin/test-gpu-faults"
	check test-training-demos bash tests/demos/test-training-demos.sh
	check test-demos-nodes bash tests/demos/test-demos-nodes.sh
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
	check gpu-compare bash tests/bench/gpu-compare.sh
	check gpu-nodes bash tests/bench/gpu-nodes.sh
	cat /tmp/gpu-check-gpu-compare.log /tmp/gpu-check-gpu-nodes.log 2>/dev/null
fi
exit $failed
EOF
chmod +x "$out/run.sh"
echo "gpu-bundle.sh: $(du -sh "$out/bin" "$out/lib" | awk '{ printf "%s %s  ", $2, $1 }')"
echo "gpu-bundle.sh: on the GPU machine, from the source tree: bash ${out#"$top"/}/run.sh [tests|bench|all]"
