/*
 * bench-common.h: what the peer benchmarks of tests/bench/compare.sh share
 * (mpi-bench.c in C, gloo-bench.cc in C++): the ops, sizes on the command
 * line, the values they fill in and nccl-tests' busbw factors.
 */
#ifndef TESTS_BENCH_COMMON_H
#define TESTS_BENCH_COMMON_H

#include <stddef.h>
#include <stdlib.h>
#include <string.h>

enum op { OP_ALLREDUCE, OP_REDUCE_SCATTER, OP_ALLGATHER, OP_BROADCAST };

static const char *op_names[] = { "allreduce", "reduce_scatter", "allgather", "broadcast" };

/* The op named name, or -1. */
static int op_find(const char *name)
{
	for (int i = 0; name && i < (int)(sizeof op_names / sizeof op_names[0]); i++)
		if (!strcmp(name, op_names[i]))
			return i;
	return -1;
}

/* The program's own usage message; it exits. */
static void usage(void);

/* A size in bytes, with K, M or G (powers of 1024). */
static size_t parse_size(const char *s)
{
	char *end;
	double v = strtod(s, &end);

	switch (*end) {
	case 'K': case 'k': v *= 1024; break;
	case 'M': case 'm': v *= 1024 * 1024; break;
	case 'G': case 'g': v *= 1024.0 * 1024 * 1024; break;
	case '\0': break;
	default: usage();
	}
	return (size_t)v;
}

/* Small integers, so every float sum of them is exact. */
static float val(int rank, size_t i)
{
	return (float)((i + (size_t)rank * 3) % 7);
}

/* nccl-tests' busbw = algbw * factor. */
static double busbw_factor(enum op op, int n)
{
	switch (op) {
	case OP_ALLREDUCE:
		return 2.0 * (n - 1) / n;
	case OP_REDUCE_SCATTER:
	case OP_ALLGATHER:
		return (double)(n - 1) / n;
	default:
		return 1.0;
	}
}

#endif
