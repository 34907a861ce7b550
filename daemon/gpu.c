/*
 * gpu.c: what the daemon can tell of the node's GPUs at start. Built with
 * CUDA, it asks the runtime; a node without a GPU or driver says so.
 */
#include <config.h>
#include <stdio.h>

#include "commd.h"

#ifdef HAVE_CUDA
#include <cuda_runtime.h>
#include <nccl.h>

void gpu_probe(void)
{
	int n = 0, nccl = 0, rt = 0;
	cudaError_t e;

	ncclGetVersion(&nccl);
	cudaRuntimeGetVersion(&rt);
	e = cudaGetDeviceCount(&n);
	if (e != cudaSuccess)
		snprintf(srv.gpu_info, sizeof srv.gpu_info,
			 "none (cuda runtime %d, nccl %d: %s)", rt, nccl, cudaGetErrorString(e));
	else
		snprintf(srv.gpu_info, sizeof srv.gpu_info,
			 "%d device%s (cuda runtime %d, nccl %d); device buffers not served yet", n,
			 n == 1 ? "" : "s", rt, nccl);
}
#else
void gpu_probe(void)
{
	snprintf(srv.gpu_info, sizeof srv.gpu_info, "none (built without CUDA)");
}
#endif
