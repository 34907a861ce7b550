/*
 * demo-device.h: --device for the demos: rank r uses GPU r mod the device
 * count. Exits 77 (a skip) with why where no GPU works or CUDA is not built in.
 */
#ifndef TESTS_DEMOS_DEMO_DEVICE_H
#define TESTS_DEMOS_DEMO_DEVICE_H

#include <stdio.h>
#include <stdlib.h>

#ifdef HAVE_CUDA
#include <cuda_runtime.h>
#endif

/* Use device COMM_RANK mod count: 0 with *dev set, 77 with why, 1 on failure. */
static inline int demo_device_open(int *dev)
{
	const char *v = getenv("COMM_RANK");
	int rank = v ? atoi(v) : 0;
#ifdef HAVE_CUDA
	int n = 0;
	cudaError_t e = cudaGetDeviceCount(&n);

	if (e != cudaSuccess || n < 1) {
		fprintf(stderr, "Rank %d: --device: no usable GPU (%s)\n", rank,
			e != cudaSuccess ? cudaGetErrorString(e) : "no devices");
		return 77;
	}
	*dev = rank % n;
	return cudaSetDevice(*dev) == cudaSuccess ? 0 : 1;
#else
	(void)dev;
	fprintf(stderr, "Rank %d: --device: built without CUDA\n", rank);
	return 77;
#endif
}

/* n bytes of device memory, or NULL (printed why). */
static inline void *demo_alloc(size_t n)
{
#ifdef HAVE_CUDA
	void *p = NULL;
	cudaError_t e = cudaMalloc(&p, n);

	if (e == cudaSuccess)
		return p;
	fprintf(stderr, "cudaMalloc of %zu bytes: %s\n", n, cudaGetErrorString(e));
#else
	(void)n;
#endif
	return NULL;
}

static inline void demo_free(void *p)
{
#ifdef HAVE_CUDA
	cudaFree(p);
#else
	(void)p;
#endif
}

/* Copy n bytes to the device (to_dev) or from it: 0, or -1 (printed why). */
static inline int demo_copy(void *dst, const void *src, size_t n, int to_dev)
{
#ifdef HAVE_CUDA
	cudaError_t e = cudaMemcpy(dst, src, n, to_dev ? cudaMemcpyHostToDevice
						       : cudaMemcpyDeviceToHost);

	if (e == cudaSuccess)
		return 0;
	fprintf(stderr, "cudaMemcpy of %zu bytes: %s\n", n, cudaGetErrorString(e));
#else
	(void)dst, (void)src, (void)n, (void)to_dev;
#endif
	return -1;
}

#endif
