/*
 * bench-gpu.c: commbench's device buffers (--device): a probe that leaves
 * the parent without CUDA (its ranks are forked later), and a rank's
 * allocations and copies. Built without CUDA, each says so.
 */
#include <config.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "bench.h"

#ifdef HAVE_CUDA
#include <cuda_runtime.h>

/* In a child, so that the parent forks its ranks with CUDA untouched. */
int bench_gpu_probe(char *why, size_t len)
{
	char msg[256] = "";
	int p[2], st, n = 0;
	ssize_t k;
	pid_t pid;

	if (pipe(p) < 0) {
		snprintf(why, len, "pipe: %m");
		return 0;
	}
	fflush(NULL);
	pid = fork();
	if (pid < 0) {
		snprintf(why, len, "fork: %m");
		close(p[0]);
		close(p[1]);
		return 0;
	}
	if (pid == 0) {
		cudaError_t e = cudaGetDeviceCount(&n);

		close(p[0]);
		if (e != cudaSuccess)
			snprintf(msg, sizeof msg, "-cudaGetDeviceCount: %s", cudaGetErrorString(e));
		else
			snprintf(msg, sizeof msg, "%d", n);
		(void)!write(p[1], msg, strlen(msg));
		_exit(0);
	}
	close(p[1]);
	k = read(p[0], msg, sizeof msg - 1);
	close(p[0]);
	while (waitpid(pid, &st, 0) < 0 && errno == EINTR)
		;
	msg[k > 0 ? k : 0] = '\0';
	if (msg[0] == '-' || k <= 0) {
		snprintf(why, len, "%s", k > 0 ? msg + 1 : "the probe died");
		return 0;
	}
	n = atoi(msg);
	if (n < 1)
		snprintf(why, len, "cudaGetDeviceCount: no devices");
	return n;
}

int bench_gpu_alloc(int dev, size_t bytes, void **a, void **b, char *why, size_t len)
{
	cudaError_t e = cudaSetDevice(dev);

	*a = *b = NULL;
	if (e == cudaSuccess)
		e = cudaMalloc(a, bytes);
	if (e == cudaSuccess)
		e = cudaMalloc(b, bytes);
	if (e == cudaSuccess)
		e = cudaMemset(*a, 0, bytes);
	if (e == cudaSuccess)
		e = cudaMemset(*b, 0, bytes);
	if (e != cudaSuccess) {
		snprintf(why, len, "device %d: 2 x %zu bytes: %s", dev, bytes, cudaGetErrorString(e));
		bench_gpu_free(*a, *b);
		*a = *b = NULL;
		return -1;
	}
	return 0;
}

void bench_gpu_free(void *a, void *b)
{
	if (a)
		cudaFree(a);
	if (b)
		cudaFree(b);
}

int bench_gpu_memset(void *p, int byte, size_t len, char *why, size_t whylen)
{
	cudaError_t e = cudaMemset(p, byte, len);

	if (e != cudaSuccess)
		snprintf(why, whylen, "cudaMemset: %s", cudaGetErrorString(e));
	return e == cudaSuccess ? 0 : -1;
}

int bench_gpu_copy(void *dst, const void *src, size_t len, char *why, size_t whylen)
{
	cudaError_t e = cudaMemcpy(dst, src, len, cudaMemcpyDefault);

	if (e != cudaSuccess)
		snprintf(why, whylen, "cudaMemcpy: %s", cudaGetErrorString(e));
	return e == cudaSuccess ? 0 : -1;
}

#else /* !HAVE_CUDA */

int bench_gpu_probe(char *why, size_t len)
{
	snprintf(why, len, "commbench was built without CUDA");
	return -1;
}

int bench_gpu_alloc(int dev, size_t bytes, void **a, void **b, char *why, size_t len)
{
	*a = *b = NULL;
	snprintf(why, len, "commbench was built without CUDA");
	return -1;
}

void bench_gpu_free(void *a, void *b)
{
}

int bench_gpu_memset(void *p, int byte, size_t len, char *why, size_t whylen)
{
	snprintf(why, whylen, "commbench was built without CUDA");
	return -1;
}

int bench_gpu_copy(void *dst, const void *src, size_t len, char *why, size_t whylen)
{
	snprintf(why, whylen, "commbench was built without CUDA");
	return -1;
}

#endif
