/*
 * gpu-worker.h: how commd-gpu (gpu-worker.c) ends, for commd, which starts
 * one per job and reads its exit status. The protocol is common/gpu-proto.h.
 */
#ifndef DAEMON_GPU_WORKER_H
#define DAEMON_GPU_WORKER_H

enum gpu_worker_exit {
	GPU_WORKER_EXIT_OK = 0,       /* EOF on fd 3, everything released; --probe: a GPU works */
	GPU_WORKER_EXIT_NO_GPU = 1,   /* --probe: no GPU can be used (the line says why) */
	GPU_WORKER_EXIT_USAGE = 2,    /* unknown arguments */
	GPU_WORKER_EXIT_PROTOCOL = 3, /* a malformed packet, or fd 3 failed */
	GPU_WORKER_EXIT_DEVICE = 4,   /* a CUDA or NCCL error, answered as COMM_ERR_ABORTED */
	GPU_WORKER_EXIT_BROKEN = 5,   /* --probe: the driver or a device is there but fails */
};

#endif
