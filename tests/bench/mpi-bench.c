/*
 * mpi-bench.c: the peer benchmark for tests/bench/compare.sh, built once with
 * Open MPI's mpicc and once with MPICH's. Times float32-sum collectives as
 * commbench does (barrier, call; median of the slowest rank) and prints one
 * JSON line per size.
 */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench-common.h"

struct bench {
	enum op op;
	int rank, nranks;
	size_t bytes;	     /* nccl-tests' size: the larger of send and recv */
	size_t count;	     /* elements in that buffer */
	size_t part;	     /* elements per rank for reduce_scatter and allgather */
	float *send, *recv;
};

static void usage(void)
{
	fprintf(stderr, "usage: mpi-bench --bench NAME -o allreduce|reduce_scatter|allgather|broadcast\n"
			"                 -s SIZE[,SIZE...] [-w WARMUP] [-i ITERS]\n"
			"SIZE in bytes, with K, M or G (powers of 1024)\n");
	exit(2);
}

static void *xalloc(size_t bytes)
{
	void *p = NULL;

	if (posix_memalign(&p, 4096, bytes ? bytes : 64) != 0) {
		fprintf(stderr, "mpi-bench: out of memory for %zu bytes\n", bytes);
		MPI_Abort(MPI_COMM_WORLD, 1);
	}
	return p;
}

static void fill(struct bench *b)
{
	size_t nsend = b->op == OP_ALLGATHER ? b->part : b->count;
	size_t nrecv = b->op == OP_REDUCE_SCATTER ? b->part : b->count;

	for (size_t i = 0; i < nsend; i++)
		b->send[i] = b->op == OP_ALLGATHER ? val(b->rank, b->rank * b->part + i)
						   : val(b->rank, i);
	for (size_t i = 0; i < nrecv; i++)
		b->recv[i] = -1.0f;
}

static void run(struct bench *b)
{
	switch (b->op) {
	case OP_ALLREDUCE:
		MPI_Allreduce(b->send, b->recv, (int)b->count, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
		break;
	case OP_REDUCE_SCATTER:
		MPI_Reduce_scatter_block(b->send, b->recv, (int)b->part, MPI_FLOAT, MPI_SUM,
					 MPI_COMM_WORLD);
		break;
	case OP_ALLGATHER:
		MPI_Allgather(b->send, (int)b->part, MPI_FLOAT, b->recv, (int)b->part, MPI_FLOAT,
			      MPI_COMM_WORLD);
		break;
	case OP_BROADCAST:
		/* MPI_Bcast has one buffer: the root sends its input, the others receive. */
		MPI_Bcast(b->rank == 0 ? b->send : b->recv, (int)b->count, MPI_FLOAT, 0,
			  MPI_COMM_WORLD);
		break;
	}
}

/* Number of wrong elements in this rank's output. */
static long check(const struct bench *b)
{
	long wrong = 0;

	switch (b->op) {
	case OP_ALLREDUCE:
		for (size_t i = 0; i < b->count; i++) {
			float want = 0;
			for (int r = 0; r < b->nranks; r++)
				want += val(r, i);
			wrong += b->recv[i] != want;
		}
		break;
	case OP_REDUCE_SCATTER:
		for (size_t i = 0; i < b->part; i++) {
			float want = 0;
			for (int r = 0; r < b->nranks; r++)
				want += val(r, b->rank * b->part + i);
			wrong += b->recv[i] != want;
		}
		break;
	case OP_ALLGATHER:
		for (size_t i = 0; i < b->count; i++)
			wrong += b->recv[i] != val((int)(i / b->part), i);
		break;
	case OP_BROADCAST:
		if (b->rank != 0)
			for (size_t i = 0; i < b->count; i++)
				wrong += b->recv[i] != val(0, i);
		break;
	}
	return wrong;
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return (x > y) - (x < y);
}

static void bench_size(const char *name, struct bench *b, int warmup, int iters)
{
	double *t = calloc((size_t)iters, sizeof *t), *tmax = calloc((size_t)iters, sizeof *tmax);
	long wrong, wrong_all = 0;

	b->count = b->bytes / sizeof(float);
	b->part = b->count / (size_t)b->nranks;
	if (b->op == OP_REDUCE_SCATTER || b->op == OP_ALLGATHER)
		b->count = b->part * (size_t)b->nranks;
	if (b->count == 0) {
		if (b->rank == 0)
			fprintf(stderr, "mpi-bench: %s of %zu bytes has nothing per rank, skipped\n",
				op_names[b->op], b->bytes);
		free(t);
		free(tmax);
		return;
	}
	b->send = xalloc(b->count * sizeof(float));
	b->recv = xalloc(b->count * sizeof(float));
	fill(b);

	run(b);
	wrong = check(b);
	MPI_Reduce(&wrong, &wrong_all, 1, MPI_LONG, MPI_SUM, 0, MPI_COMM_WORLD);

	/* A barrier before each call, as commbench does. */
	for (int i = 0; i < warmup + iters; i++) {
		double t0;
		MPI_Barrier(MPI_COMM_WORLD);
		t0 = MPI_Wtime();
		run(b);
		if (i >= warmup)
			t[i - warmup] = MPI_Wtime() - t0;
	}
	MPI_Reduce(t, tmax, iters, MPI_DOUBLE, MPI_MAX, 0, MPI_COMM_WORLD);

	if (b->rank == 0) {
		int n = b->nranks;
		double sec, algbw;

		qsort(tmax, (size_t)iters, sizeof *tmax, cmp_double);
		sec = iters % 2 ? tmax[iters / 2] : (tmax[iters / 2 - 1] + tmax[iters / 2]) / 2;
		algbw = (double)(b->count * sizeof(float)) / sec / 1e9;
		printf("{\"bench\":\"%s\",\"op\":\"%s\",\"bytes\":%zu,\"count\":%zu,"
		       "\"dtype\":\"float32\",\"redop\":\"sum\",\"ranks\":%d,\"inplace\":false,"
		       "\"time_us\":%.3f,\"algbw_gbs\":%.4f,\"busbw_gbs\":%.4f,\"wrong\":%ld}\n",
		       name, op_names[b->op], b->count * sizeof(float), b->count, n, sec * 1e6,
		       algbw, algbw * busbw_factor(b->op, n), wrong_all);
		fflush(stdout);
	}
	free(b->send);
	free(b->recv);
	free(t);
	free(tmax);
}

int main(int argc, char **argv)
{
	const char *name = NULL, *sizes = NULL, *opname = NULL;
	int warmup = 5, iters = 20;
	struct bench b = { 0 };
	char *list, *tok, *save;

	MPI_Init(&argc, &argv);
	for (int i = 1; i < argc; i++) {
		if (i + 1 >= argc)
			usage();
		if (!strcmp(argv[i], "--bench"))
			name = argv[++i];
		else if (!strcmp(argv[i], "-o"))
			opname = argv[++i];
		else if (!strcmp(argv[i], "-s"))
			sizes = argv[++i];
		else if (!strcmp(argv[i], "-w"))
			warmup = atoi(argv[++i]);
		else if (!strcmp(argv[i], "-i"))
			iters = atoi(argv[++i]);
		else
			usage();
	}
	if (!name || !sizes || !opname || warmup < 0 || iters < 1)
		usage();
	if (op_find(opname) < 0)
		usage();
	b.op = (enum op)op_find(opname);
	MPI_Comm_rank(MPI_COMM_WORLD, &b.rank);
	MPI_Comm_size(MPI_COMM_WORLD, &b.nranks);

	list = strdup(sizes);
	for (tok = strtok_r(list, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
		b.bytes = parse_size(tok);
		bench_size(name, &b, warmup, iters);
	}
	free(list);
	MPI_Finalize();
	return 0;
}
