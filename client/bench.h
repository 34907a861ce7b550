/*
 * bench.h: commbench's parts: the options its ranks share, the operations
 * it measures, and the deterministic data that lets it check every result.
 */
#ifndef BENCH_H
#define BENCH_H

#include <stddef.h>
#include <stdint.h>

#include "bench-table.h"
#include "comm.h"

#define BENCH_MAX_DAEMONS 16

struct bench_opts {
	int nranks;
	int op;                 /* an enum bench_op, or -1 for all of them */
	int dtype;              /* a comm_dtype_t, or -1 for all of them */
	int redop;              /* a comm_redop_t, or -1 for all of them */
	size_t min_bytes;
	size_t max_bytes;
	size_t factor;
	int warmup;
	int iters;
	int check;
	int inplace_only;
	int json;
	int reference;
	int device;             /* --device: buffers in device memory */
	int pipeline;           /* -P: each size's iterations posted back to back */
	int ndev;               /* with --device: the node's devices; rank r uses r % ndev */
	size_t ref_elements;    /* float32 per rank in --reference */
	const char *socket;     /* NULL: the library's default */
	/* --socket A,B,...: ranks in blocks over several daemons, joined by --root */
	char *sockets[BENCH_MAX_DAEMONS];
	int nsockets;
	const char *root;       /* the root daemon's host:port, or NULL */
	char job[64];
};

/* Run rank's part of the benchmark; the process's exit status. */
int bench_rank_main(const struct bench_opts *o, int rank);
/* With --socket A,B,...: the index of rank's daemon (equal blocks of ranks). */
int bench_daemon_of(const struct bench_opts *o, int rank);

/* The dtype's names: nccl-tests' ("float") and libcomm's ("float32"). */
const char *bench_dtype_name(comm_dtype_t dtype);
const char *bench_dtype_json(comm_dtype_t dtype);
const char *bench_redop_name(comm_redop_t op);

/* Parse a dtype or reduction by any of its names; -1 for "all", -2 if unknown. */
int bench_dtype_parse(const char *s);
int bench_redop_parse(const char *s);

/*
 * One op on one rank, as the data sees it: which rank this is, of how many,
 * count as the op is called with, the iteration's seed.
 */
struct bench_case {
	int op;
	comm_dtype_t dtype;
	comm_redop_t redop;
	int rank;
	int n;
	size_t count;
	unsigned seq;
};

/* Fill the op's input buffer for c (count or n * count elements). */
void bench_fill(const struct bench_case *c, void *in);

/*
 * Count the elements of out that differ from what c must produce; report
 * the first one through *first (an element index), -1 when none differ.
 * 0 on ranks whose out the op leaves undefined (reduce off the root).
 */
uint64_t bench_verify(const struct bench_case *c, const void *out, long long *first);

/* Print element i of out and its expected value into buf. */
void bench_describe(const struct bench_case *c, const void *out, long long i, char *buf,
		    size_t len);

/*
 * Device memory for --device (bench-gpu.c). The probe runs CUDA in a child
 * and returns the number of devices (0: none, with why); -1 when commbench
 * was built without CUDA. The others return 0, or -1 with why.
 */
int bench_gpu_probe(char *why, size_t len);
/* Two buffers of bytes on device dev (made current), zeroed. */
int bench_gpu_alloc(int dev, size_t bytes, void **a, void **b, char *why, size_t len);
void bench_gpu_free(void *a, void *b);
int bench_gpu_memset(void *p, int byte, size_t len, char *why, size_t whylen);
/* Copy len bytes, either way between host and device (synchronous). */
int bench_gpu_copy(void *dst, const void *src, size_t len, char *why, size_t whylen);

#endif
