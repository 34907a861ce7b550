/*
 * gpu-kernels.h: the GPU worker's reduction kernel (gpu-kernels.cu), for C.
 * It combines like common/reduce.h: in rank order, integer SUM and PROD
 * wrapping, float16 and bfloat16 accumulated in float and rounded once.
 */
#ifndef DAEMON_GPU_KERNELS_H
#define DAEMON_GPU_KERNELS_H

#include <stddef.h>

#include <cuda_runtime_api.h>

#include "gpu-proto.h"

/* Device pointers to the inputs, passed to the kernel by value. */
struct gk_inputs {
	const void *p[GPU_OP_MAX_RANKS];
};

/* Device pointers to the outputs of gk_reduce_direct, by value too. */
#define GK_MAX_OUT 64
struct gk_outputs {
	void *p[GK_MAX_OUT];
};

enum gk_mode {
	GK_FINAL,   /* out (dtype) = in[0] op ... op in[nin-1]; AVG divides by navg */
	GK_PARTIAL, /* out (accumulator type) = the same, AVG left as its SUM */
	GK_FINISH,  /* out (dtype) = in[0] (accumulator type, nin 1); AVG divides by navg */
};

#ifdef __cplusplus
extern "C" {
#endif

/*
 * Bytes of one element of dtype's accumulator: float for float16 and
 * bfloat16 (so that partials of several devices round once), else dtype's.
 */
size_t gk_acc_size(int dtype);

/*
 * Queue the kernel on stream (of the current device) over count elements;
 * dtype and redop are valid comm_dtype_t and comm_redop_t values, 1 <= nin.
 * Returns the launch's error.
 */
cudaError_t gk_reduce(enum gk_mode mode, int dtype, int redop, void *out,
		      const struct gk_inputs *in, int nin, size_t count, int navg,
		      cudaStream_t stream);

/*
 * GK_FINAL straight into nout outputs (1 <= nout <= GK_MAX_OUT), 16 bytes
 * per thread: every input and output 16-byte aligned, and an output may
 * alias an input only whole (the same address), as in place.
 */
cudaError_t gk_reduce_direct(int dtype, int redop, const struct gk_outputs *out, int nout,
			     const struct gk_inputs *in, int nin, size_t count, int navg,
			     cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif
