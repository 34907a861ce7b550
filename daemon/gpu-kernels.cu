// gpu-kernels.cu: the GPU worker's reduction kernel, one instance per element
// type, value type and op, and the C launcher that picks it. The arithmetic
// is common/reduce.c's, so a device and the host give the same bits.
#include <stdint.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "comm.h"
#include "gpu-kernels.h"

namespace {

constexpr unsigned kThreads = 256;
constexpr size_t kMaxBlocks = 4096; // grid-stride loops cover the rest
constexpr int kUnroll = 4;          // vectors in flight per thread in direct_kernel

// Conversions between stored and computed types; 16-bit floats round to
// nearest even when stored, like float_to_half and float_to_bf16.
template <typename To, typename From> struct conv {
	static __device__ To go(From x) { return (To)x; }
};
template <> struct conv<float, __half> {
	static __device__ float go(__half x) { return __half2float(x); }
};
template <> struct conv<float, __nv_bfloat16> {
	static __device__ float go(__nv_bfloat16 x) { return __bfloat162float(x); }
};
template <> struct conv<__half, float> {
	static __device__ __half go(float x) { return __float2half_rn(x); }
};
template <> struct conv<__nv_bfloat16, float> {
	static __device__ __nv_bfloat16 go(float x) { return __float2bfloat16_rn(x); }
};

// OP_SUM ... OP_MAX of reduce.c; the cast wraps the unsigned types.
template <int Op, typename V> __device__ V combine(V a, V b)
{
	if constexpr (Op == COMM_PROD)
		return (V)(a * b);
	else if constexpr (Op == COMM_MIN) // a NaN is skipped, as in reduce.c
		return b < a || a != a ? b : a;
	else if constexpr (Op == COMM_MAX)
		return b > a || a != a ? b : a;
	else
		return (V)(a + b);
}

// out[i] = in[0][i] op ... op in[nin-1][i] computed in V; navg > 0 then
// divides in S, as reduce.c's FIN_DIV does.
template <typename In, typename V, typename S, typename Out, int Op>
__global__ void reduce_kernel(gk_inputs in, int nin, Out *out, size_t count, int navg)
{
	size_t stride = (size_t)gridDim.x * blockDim.x;

	for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < count; i += stride) {
		V acc = conv<V, In>::go(static_cast<const In *>(in.p[0])[i]);

		for (int j = 1; j < nin; j++)
			acc = combine<Op>(acc, conv<V, In>::go(static_cast<const In *>(in.p[j])[i]));
		if (navg > 0)
			acc = (V)((S)acc / navg);
		out[i] = conv<Out, V>::go(acc);
	}
}

// 16 bytes of T, loaded and stored at once.
template <typename T> struct alignas(16) vec16 {
	T v[16 / sizeof(T)];
};

// The final value of element i of the inputs (as reduce_kernel's GK_FINAL).
template <typename T, typename V, typename S, int Op>
__device__ T final_at(const gk_inputs &in, int nin, size_t i, int navg)
{
	V acc = conv<V, T>::go(static_cast<const T *>(in.p[0])[i]);

	for (int j = 1; j < nin; j++)
		acc = combine<Op>(acc, conv<V, T>::go(static_cast<const T *>(in.p[j])[i]));
	if (navg > 0)
		acc = (V)((S)acc / navg);
	return conv<T, V>::go(acc);
}

// GK_FINAL into every output, 16 bytes at a time: each thread takes kUnroll
// vectors a stride apart, loading them all before it combines, so that
// enough loads are in flight to keep the memory busy. The count % W
// elements past the last whole vector go to the first threads one each.
template <typename T, typename V, typename S, int Op>
__global__ void direct_kernel(gk_inputs in, int nin, gk_outputs out, int nout, size_t count,
			      int navg)
{
	constexpr int W = 16 / sizeof(T);
	size_t nvec = count / W, stride = (size_t)gridDim.x * blockDim.x;
	size_t id = (size_t)blockIdx.x * blockDim.x + threadIdx.x;

	for (size_t i0 = id; i0 < nvec; i0 += stride * kUnroll) {
		V acc[kUnroll][W];
		vec16<T> x[kUnroll] = {};

#pragma unroll
		for (int u = 0; u < kUnroll; u++)
			if (i0 + u * stride < nvec)
				x[u] = static_cast<const vec16<T> *>(in.p[0])[i0 + u * stride];
#pragma unroll
		for (int u = 0; u < kUnroll; u++)
#pragma unroll
			for (int k = 0; k < W; k++)
				acc[u][k] = conv<V, T>::go(x[u].v[k]);
		for (int j = 1; j < nin; j++) {
#pragma unroll
			for (int u = 0; u < kUnroll; u++)
				if (i0 + u * stride < nvec)
					x[u] = static_cast<const vec16<T> *>(in.p[j])[i0 + u * stride];
#pragma unroll
			for (int u = 0; u < kUnroll; u++)
#pragma unroll
				for (int k = 0; k < W; k++)
					acc[u][k] = combine<Op>(acc[u][k], conv<V, T>::go(x[u].v[k]));
		}
#pragma unroll
		for (int u = 0; u < kUnroll; u++) {
			if (i0 + u * stride >= nvec)
				continue;
#pragma unroll
			for (int k = 0; k < W; k++) {
				V a = acc[u][k];

				if (navg > 0)
					a = (V)((S)a / navg);
				x[u].v[k] = conv<T, V>::go(a);
			}
			for (int j = 0; j < nout; j++)
				static_cast<vec16<T> *>(out.p[j])[i0 + u * stride] = x[u];
		}
	}
	if (id < count - nvec * W) {
		size_t i = nvec * W + id;
		T y = final_at<T, V, S, Op>(in, nin, i, navg);

		for (int j = 0; j < nout; j++)
			static_cast<T *>(out.p[j])[i] = y;
	}
}

template <typename T, typename V, typename S, int Op>
cudaError_t launch_direct(const gk_outputs *out, int nout, const gk_inputs *in, int nin,
			  size_t count, int navg, cudaStream_t stream)
{
	size_t per_block = (size_t)kThreads * kUnroll;
	size_t blocks = (count / (16 / sizeof(T)) + per_block - 1) / per_block;

	if (count == 0)
		return cudaSuccess;
	if (blocks > kMaxBlocks)
		blocks = kMaxBlocks;
	if (blocks == 0)
		blocks = 1;
	direct_kernel<T, V, S, Op><<<(unsigned)blocks, kThreads, 0, stream>>>(*in, nin, *out, nout,
									      count, navg);
	return cudaGetLastError();
}

template <typename In, typename V, typename S, typename Out, int Op>
cudaError_t launch(const gk_inputs *in, int nin, void *out, size_t count, int navg,
		   cudaStream_t stream)
{
	size_t blocks = (count + kThreads - 1) / kThreads;

	if (count == 0)
		return cudaSuccess;
	if (blocks > kMaxBlocks)
		blocks = kMaxBlocks;
	reduce_kernel<In, V, S, Out, Op><<<(unsigned)blocks, kThreads, 0, stream>>>(
		*in, nin, static_cast<Out *>(out), count, navg);
	return cudaGetLastError();
}

// T is stored, V computed in, S the type AVG divides in.
template <typename T, typename V, typename S, int Op>
cudaError_t by_mode(gk_mode mode, int avg, const gk_inputs *in, int nin, void *out,
		    size_t count, int navg, cudaStream_t stream)
{
	switch (mode) {
	case GK_PARTIAL:
		return launch<T, V, S, V, Op>(in, nin, out, count, 0, stream);
	case GK_FINISH:
		return launch<V, V, S, T, COMM_SUM>(in, 1, out, count, avg ? navg : 0, stream);
	default:
		return launch<T, V, S, T, Op>(in, nin, out, count, avg ? navg : 0, stream);
	}
}

// gk_reduce_direct's op dispatch, with by_op's types.
template <typename T, typename U, typename S>
cudaError_t direct_op(int redop, const gk_outputs *out, int nout, const gk_inputs *in, int nin,
		      size_t count, int navg, cudaStream_t stream)
{
	switch (redop) {
	case COMM_PROD:
		return launch_direct<T, U, S, COMM_PROD>(out, nout, in, nin, count, 0, stream);
	case COMM_MIN:
		return launch_direct<T, S, S, COMM_MIN>(out, nout, in, nin, count, 0, stream);
	case COMM_MAX:
		return launch_direct<T, S, S, COMM_MAX>(out, nout, in, nin, count, 0, stream);
	default:
		return launch_direct<T, U, S, COMM_SUM>(out, nout, in, nin, count,
						       redop == COMM_AVG ? navg : 0, stream);
	}
}

// SUM, PROD and AVG compute in U (unsigned for integers, so they wrap), MIN
// and MAX in S (the element's own type for integers).
template <typename T, typename U, typename S>
cudaError_t by_op(gk_mode mode, int redop, const gk_inputs *in, int nin, void *out,
		  size_t count, int navg, cudaStream_t stream)
{
	switch (redop) {
	case COMM_PROD:
		return by_mode<T, U, S, COMM_PROD>(mode, 0, in, nin, out, count, navg, stream);
	case COMM_MIN:
		return by_mode<T, S, S, COMM_MIN>(mode, 0, in, nin, out, count, navg, stream);
	case COMM_MAX:
		return by_mode<T, S, S, COMM_MAX>(mode, 0, in, nin, out, count, navg, stream);
	default:
		return by_mode<T, U, S, COMM_SUM>(mode, redop == COMM_AVG, in, nin, out, count,
						  navg, stream);
	}
}

} // namespace

extern "C" size_t gk_acc_size(int dtype)
{
	switch (dtype) {
	case COMM_INT8:
	case COMM_UINT8:
		return 1;
	case COMM_INT64:
	case COMM_UINT64:
	case COMM_FLOAT64:
		return 8;
	default:
		return 4; // 32-bit types, and float for float16 and bfloat16
	}
}

extern "C" cudaError_t gk_reduce(gk_mode mode, int dtype, int redop, void *out,
				 const gk_inputs *in, int nin, size_t count, int navg,
				 cudaStream_t stream)
{
	switch (dtype) {
	case COMM_INT8:
		return by_op<int8_t, uint8_t, int8_t>(mode, redop, in, nin, out, count, navg, stream);
	case COMM_UINT8:
		return by_op<uint8_t, uint8_t, uint8_t>(mode, redop, in, nin, out, count, navg, stream);
	case COMM_INT32:
		return by_op<int32_t, uint32_t, int32_t>(mode, redop, in, nin, out, count, navg, stream);
	case COMM_UINT32:
		return by_op<uint32_t, uint32_t, uint32_t>(mode, redop, in, nin, out, count, navg,
							   stream);
	case COMM_INT64:
		return by_op<int64_t, uint64_t, int64_t>(mode, redop, in, nin, out, count, navg, stream);
	case COMM_UINT64:
		return by_op<uint64_t, uint64_t, uint64_t>(mode, redop, in, nin, out, count, navg,
							   stream);
	case COMM_FLOAT16:
		return by_op<__half, float, float>(mode, redop, in, nin, out, count, navg, stream);
	case COMM_BFLOAT16:
		return by_op<__nv_bfloat16, float, float>(mode, redop, in, nin, out, count, navg,
							  stream);
	case COMM_FLOAT32:
		return by_op<float, float, float>(mode, redop, in, nin, out, count, navg, stream);
	case COMM_FLOAT64:
		return by_op<double, double, double>(mode, redop, in, nin, out, count, navg, stream);
	default:
		return cudaErrorInvalidValue;
	}
}

extern "C" cudaError_t gk_reduce_direct(int dtype, int redop, const gk_outputs *out, int nout,
					const gk_inputs *in, int nin, size_t count, int navg,
					cudaStream_t stream)
{
	switch (dtype) {
	case COMM_INT8:
		return direct_op<int8_t, uint8_t, int8_t>(redop, out, nout, in, nin, count, navg, stream);
	case COMM_UINT8:
		return direct_op<uint8_t, uint8_t, uint8_t>(redop, out, nout, in, nin, count, navg,
							    stream);
	case COMM_INT32:
		return direct_op<int32_t, uint32_t, int32_t>(redop, out, nout, in, nin, count, navg,
							     stream);
	case COMM_UINT32:
		return direct_op<uint32_t, uint32_t, uint32_t>(redop, out, nout, in, nin, count, navg,
							       stream);
	case COMM_INT64:
		return direct_op<int64_t, uint64_t, int64_t>(redop, out, nout, in, nin, count, navg,
							     stream);
	case COMM_UINT64:
		return direct_op<uint64_t, uint64_t, uint64_t>(redop, out, nout, in, nin, count, navg,
							       stream);
	case COMM_FLOAT16:
		return direct_op<__half, float, float>(redop, out, nout, in, nin, count, navg, stream);
	case COMM_BFLOAT16:
		return direct_op<__nv_bfloat16, float, float>(redop, out, nout, in, nin, count, navg,
							      stream);
	case COMM_FLOAT32:
		return direct_op<float, float, float>(redop, out, nout, in, nin, count, navg, stream);
	case COMM_FLOAT64:
		return direct_op<double, double, double>(redop, out, nout, in, nin, count, navg, stream);
	default:
		return cudaErrorInvalidValue;
	}
}
