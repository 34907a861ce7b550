/*
 * bench-table.h: what commbench and the NCCL baseline (tests/bench/nccl-bench)
 * share so that their tables line up: the ops, their busbw factors and the
 * table's column heads.
 */
#ifndef CLIENT_BENCH_TABLE_H
#define CLIENT_BENCH_TABLE_H

enum bench_op {
	OP_ALLREDUCE,
	OP_REDUCE_SCATTER,
	OP_ALLGATHER,
	OP_BROADCAST,
	OP_REDUCE,
	OP_ALLTOALL,
	OP_ALLTOALLV,           /* comm_alltoallv with equal counts: a group of sends and recvs */
	OP_SENDRECV,
	NOPS,
};

/* What one operation is, for the tables and the checks. */
struct bench_op_info {
	const char *name;       /* as -o spells it and --json prints it */
	int reduces;            /* takes a reduction */
	int split;              /* size is n blocks: count per rank = size / elem / n */
	int inplace;            /* has an in-place form */
};

extern const struct bench_op_info bench_ops[NOPS];

/* busbw / algbw for op on n ranks, as nccl-tests counts it. */
double bench_bus_factor(int op, int n);

/* The table's head after its "# op dtype redop" line: both halves, or in place only. */
void bench_print_columns(int inplace_only);

#endif
