/*
 * gpu-count.h: how many GPUs work, for the tests in tests/gpu. Asked in a
 * child: CUDA initialised in the test process would not work in the ranks
 * it forks. 0 with why printed (a skip) when none.
 */
#ifndef TESTS_GPU_COUNT_H
#define TESTS_GPU_COUNT_H

#include <cuda_runtime.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "check.h"

static inline int count_devices(void)
{
	int p[2], n = 0, st;
	char msg[256] = "";
	ssize_t k;
	pid_t pid;

	REQUIRE(pipe(p) == 0, "pipe");
	fflush(NULL);
	pid = fork();
	REQUIRE(pid >= 0, "fork");
	if (pid == 0) {
		cudaError_t e = cudaGetDeviceCount(&n);

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
	waitpid(pid, &st, 0);
	msg[k > 0 ? k : 0] = '\0';
	n = msg[0] == '-' || k <= 0 ? 0 : atoi(msg);
	if (n < 1)
		printf("skip: no usable GPU (%s)\n",
		       k <= 0 ? "the probe died" : msg[0] == '-' ? msg + 1 : "no devices");
	return n;
}

#endif
