/*
 * gpu-result.h: the comm_result_t commd-gpu (gpu-worker.c) answers for a
 * CUDA error, as an NCCL user would read it: out of memory is NO_MEMORY,
 * a handle or value the rank got wrong is INVALID_ARG, what the device or
 * driver cannot do is UNSUPPORTED, devices held elsewhere are BUSY, and
 * any other failure (the driver failing, a fault) is INTERNAL, NCCL's
 * ncclUnhandledCudaError. The table is common/gpu-proto.h's MEM_OPENED.
 */
#ifndef DAEMON_GPU_RESULT_H
#define DAEMON_GPU_RESULT_H

#include <cuda.h>
#include <cuda_runtime.h>

#include "comm.h"

/* The result a CUDA runtime error stands for (COMM_OK for cudaSuccess). */
static inline comm_result_t gpu_cuda_result(cudaError_t e)
{
	switch (e) {
	case cudaSuccess:
		return COMM_OK;
	case cudaErrorMemoryAllocation:
	case cudaErrorTooManyPeers: /* the devices' peer mappings are used up */
		return COMM_ERR_NO_MEMORY;
	case cudaErrorInvalidValue:
	case cudaErrorInvalidDevicePointer:
	case cudaErrorInvalidResourceHandle:
	case cudaErrorMapBufferObjectFailed: /* an IPC handle that cannot be mapped (freed, or ours) */
		return COMM_ERR_INVALID_ARG;
	case cudaErrorNotSupported:
	case cudaErrorNotPermitted:
		return COMM_ERR_UNSUPPORTED;
	case cudaErrorDevicesUnavailable: /* exclusive-process mode, held by another */
		return COMM_ERR_BUSY;
	default:
		return COMM_ERR_INTERNAL;
	}
}

/* The result a CUDA driver error stands for, as gpu_cuda_result. */
static inline comm_result_t gpu_cu_result(CUresult r)
{
	switch (r) {
	case CUDA_SUCCESS:
		return COMM_OK;
	case CUDA_ERROR_OUT_OF_MEMORY:
	case CUDA_ERROR_TOO_MANY_PEERS:
		return COMM_ERR_NO_MEMORY;
	case CUDA_ERROR_INVALID_VALUE:
	case CUDA_ERROR_INVALID_HANDLE: /* a VMM fd that is no allocation's */
		return COMM_ERR_INVALID_ARG;
	case CUDA_ERROR_NOT_SUPPORTED:
	case CUDA_ERROR_NOT_PERMITTED:
		return COMM_ERR_UNSUPPORTED;
	case CUDA_ERROR_DEVICE_UNAVAILABLE:
		return COMM_ERR_BUSY;
	default:
		return COMM_ERR_INTERNAL;
	}
}

#endif
