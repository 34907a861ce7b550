/*
 * bench-table.c: the ops, busbw factors and column heads commbench and
 * nccl-bench print alike.
 */
#include <stdio.h>

#include "bench-table.h"

const struct bench_op_info bench_ops[NOPS] = {
	[OP_ALLREDUCE] = { "allreduce", 1, 0, 1 },
	[OP_REDUCE_SCATTER] = { "reduce_scatter", 1, 1, 1 },
	[OP_ALLGATHER] = { "allgather", 0, 1, 1 },
	[OP_BROADCAST] = { "broadcast", 0, 0, 1 },
	[OP_REDUCE] = { "reduce", 1, 0, 1 },
	[OP_ALLTOALL] = { "alltoall", 0, 1, 0 },
	[OP_ALLTOALLV] = { "alltoallv", 0, 1, 0 },
	[OP_SENDRECV] = { "sendrecv", 0, 0, 0 },
};

double bench_bus_factor(int op, int n)
{
	switch (op) {
	case OP_ALLREDUCE:
		return 2.0 * (n - 1) / n;
	case OP_REDUCE_SCATTER:
	case OP_ALLGATHER:
	case OP_ALLTOALL:
	case OP_ALLTOALLV:
		return (double)(n - 1) / n;
	default:
		return 1.0;
	}
}

void bench_print_columns(int inplace_only)
{
	const char *half = "     time   algbw   busbw  #wrong", *both = inplace_only ? "" : half;

	if (inplace_only)
		printf("#%51s%*s\n", "", 10 + 12, "in-place");
	else
		printf("#%51s%*s%*s\n", "", 10 + 12, "out-of-place", 11 + 12 + 8, "in-place");
	printf("#%11s  %12s  %8s  %6s  %6s%s%s\n", "size", "count", "type", "redop", "root", both,
	       half);
	half = "     (us)  (GB/s)  (GB/s)        ";
	printf("#%11s  %12s  %8s  %6s  %6s%s%s\n", "(B)", "(elements)", "", "", "",
	       inplace_only ? "" : half, half);
}
