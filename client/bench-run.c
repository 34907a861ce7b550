/*
 * bench-run.c: one rank of commbench: joins the job, runs every size of the
 * chosen ops, times and checks them, and (rank 0) prints the table.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "bench.h"

#define MAX_REPORTS 8               /* wrong-value lines per rank */

struct rank {
	const struct bench_opts *o;
	comm_t *c;
	int rank;
	int n;
	char *sendbuf;      /* each bytes, from comm_mem_alloc (--device: cudaMalloc) */
	char *recvbuf;
	size_t bytes;
	char *hsend;        /* --device: host copies of sendbuf and recvbuf */
	char *hrecv;
	double *times;      /* iters, comm memory: the slowest rank's times */
	uint64_t *wrong;    /* comm memory: the wrong elements of all ranks */
	double *mine;       /* iters: this rank's times */
	size_t *vcounts;    /* alltoallv: n counts, then n displacements */
	comm_request_t **reqs; /* -P: 2 per op (a send and a recv) */
	unsigned seq;       /* iterations so far: seeds the data */
	int reports;
	double bw_sum;      /* busbw over the table's measurements */
	int bw_n;
	uint64_t wrong_sum; /* over the table */
	uint64_t wrong_all; /* over the run */
};

/* One placement of one size. */
struct result {
	int ran;
	double time;        /* seconds */
	uint64_t wrong;
};

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int fail(struct rank *r, const char *what, comm_result_t rc)
{
	const char *detail = comm_last_error(r->c);

	fprintf(stderr, "commbench: rank %d: %s: %s (%s)%s%s\n", r->rank, what,
		comm_result_name(rc), comm_strerror(rc), *detail ? ": " : "", detail);
	return -1;
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return (x > y) - (x < y);
}

static double median(double *v, int n)
{
	qsort(v, (size_t)n, sizeof *v, cmp_double);
	return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

/* --device: where device pointer p of a buffer is mirrored on the host. */
static char *mirror(struct rank *r, const char *p)
{
	if (p >= r->sendbuf && p < r->sendbuf + r->bytes)
		return r->hsend + (p - r->sendbuf);
	return r->hrecv + (p - r->recvbuf);
}

/*
 * Poison out (when checking) and fill in for bc; device memory through its
 * host mirror.
 */
static int fill(struct rank *r, const struct bench_case *bc, char *in, char *out,
		size_t outbytes)
{
	size_t es = comm_dtype_size(bc->dtype), inlen = bc->count;
	char why[256];

	if (!r->o->device) {
		if (r->o->check)
			memset(out, 0xa5, outbytes);
		bench_fill(bc, in);
		return 0;
	}
	if (bench_ops[bc->op].split && bc->op != OP_ALLGATHER)
		inlen *= (size_t)r->n;
	if (bc->op == OP_BROADCAST && r->rank != 0)
		inlen = 0;
	bench_fill(bc, mirror(r, in));
	if ((r->o->check && bench_gpu_memset(out, 0xa5, outbytes, why, sizeof why) < 0) ||
	    (inlen && bench_gpu_copy(in, mirror(r, in), inlen * es, why, sizeof why) < 0)) {
		fprintf(stderr, "commbench: rank %d: %s\n", r->rank, why);
		return -1;
	}
	return 0;
}

/* The op's output where the host can read it: device memory copied back. */
static const char *result(struct rank *r, const char *out, size_t outbytes)
{
	char why[256];

	if (!r->o->device)
		return out;
	if (bench_gpu_copy(mirror(r, out), out, outbytes, why, sizeof why) < 0) {
		fprintf(stderr, "commbench: rank %d: %s\n", r->rank, why);
		return NULL;
	}
	return mirror(r, out);
}

/* comm_alltoallv of count elements to and from each rank, block j at j x count. */
static comm_result_t alltoallv(struct rank *r, const struct bench_case *bc, const void *in,
			       void *out, comm_request_t **req)
{
	size_t *v = r->vcounts;

	for (int j = 0; j < r->n; j++) {
		v[j] = bc->count;
		v[r->n + j] = (size_t)j * bc->count;
	}
	return comm_alltoallv(r->c, in, v, v + r->n, out, v, v + r->n, bc->dtype, req);
}

/*
 * Post op; req NULL: and wait for it, else its requests go to req[0] and
 * (send/recv) req[1], which stays NULL for the others.
 */
static comm_result_t post(struct rank *r, const struct bench_case *bc, const void *in,
			  void *out, comm_request_t **req)
{
	comm_request_t **req1 = req ? &req[1] : NULL;
	comm_t *c = r->c;
	comm_result_t rc, rc2;

	if (req)
		req[1] = NULL;
	switch (bc->op) {
	case OP_ALLREDUCE:
		return comm_allreduce(c, in, out, bc->count, bc->dtype, bc->redop, req);
	case OP_REDUCE_SCATTER:
		return comm_reduce_scatter(c, in, out, bc->count, bc->dtype, bc->redop, req);
	case OP_ALLGATHER:
		return comm_allgather(c, in, out, bc->count, bc->dtype, req);
	case OP_BROADCAST:
		return comm_broadcast(c, in, out, bc->count, bc->dtype, 0, req);
	case OP_REDUCE:
		return comm_reduce(c, in, out, bc->count, bc->dtype, bc->redop, 0, req);
	case OP_ALLTOALL:
		return comm_alltoall(c, in, out, bc->count, bc->dtype, req);
	case OP_ALLTOALLV:
		return alltoallv(r, bc, in, out, req);
	default:
		rc = comm_group_start(c);
		if (rc != COMM_OK)
			return rc;
		rc = comm_send(c, in, bc->count, bc->dtype, (r->rank + 1) % r->n, req);
		if (rc == COMM_OK)
			rc = comm_recv(c, out, bc->count, bc->dtype, (r->rank + r->n - 1) % r->n,
				       req1);
		rc2 = comm_group_end(c);
		return rc != COMM_OK ? rc : rc2;
	}
}

/* The op's input and output for a placement; *outlen in elements. */
static void buffers(struct rank *r, const struct bench_case *bc, int inplace, char **in,
		    char **out, size_t *outlen)
{
	size_t blk = bc->count * comm_dtype_size(bc->dtype);

	*outlen = bc->op == OP_ALLGATHER || bc->op == OP_ALLTOALL || bc->op == OP_ALLTOALLV
			  ? bc->count * (size_t)r->n
			  : bc->count;
	*in = r->sendbuf;
	*out = r->recvbuf;
	if (!inplace)
		return;
	*in = r->recvbuf;
	if (bc->op == OP_REDUCE_SCATTER)
		*out = r->recvbuf + (size_t)r->rank * blk;
	else if (bc->op == OP_ALLGATHER)
		*in = r->recvbuf + (size_t)r->rank * blk;
}

static void report(struct rank *r, const struct bench_case *bc, const char *out, uint64_t wrong,
		   long long first, const char *where)
{
	char what[128];

	if (r->reports++ >= MAX_REPORTS)
		return;
	bench_describe(bc, out, first, what, sizeof what);
	fprintf(stderr, "commbench: rank %d: %s count %zu %s %s: %llu wrong, %s\n", r->rank,
		bench_ops[bc->op].name, bc->count, bench_dtype_json(bc->dtype), where,
		(unsigned long long)wrong, what);
}

/* Add the wrong elements of out (outbytes) to *wrong; -1 when it cannot be read. */
static int check(struct rank *r, const struct bench_case *bc, const char *out, size_t outbytes,
		 int inplace, uint64_t *wrong)
{
	const char *got = result(r, out, outbytes);
	long long first;
	uint64_t w;

	if (!got)
		return -1;
	w = bench_verify(bc, got, &first);
	if (w)
		report(r, bc, got, w, first, inplace ? "in-place" : "out-of-place");
	*wrong += w;
	return 0;
}

/*
 * -P: k ops posted back to back with requests after a barrier, then all
 * waited for, as nccl-tests times them; *each: the whole over k.
 */
static int post_many(struct rank *r, const struct bench_case *bc, const void *in, void *out,
		     int k, double *each)
{
	comm_result_t rc = comm_barrier(r->c, NULL), rc2;
	int posted = 0;
	double t0;

	if (rc != COMM_OK)
		return fail(r, "barrier", rc);
	t0 = now();
	while (posted < k && rc == COMM_OK)
		if ((rc = post(r, bc, in, out, &r->reqs[2 * posted])) == COMM_OK)
			posted++;
	for (int i = 0; i < 2 * posted; i++)
		if (r->reqs[i] && (rc2 = comm_wait(r->reqs[i], -1)) != COMM_OK && rc == COMM_OK)
			rc = rc2;
	*each = (now() - t0) / k;
	return rc == COMM_OK ? 0 : fail(r, bench_ops[bc->op].name, rc);
}

/*
 * warmup + iters runs of bc with a barrier before each; fill and check
 * outside the timed call (-P: both once, and the iterations back to back,
 * their outputs checked out of place; then one more run to check). res: the median of the slowest rank's
 * times and the wrong elements of all ranks. own: time on this rank's
 * median instead.
 */
static int measure(struct rank *r, struct bench_case *bc, int inplace, int own,
		   struct result *res)
{
	const struct bench_opts *o = r->o;
	size_t es = comm_dtype_size(bc->dtype), outlen;
	int runs = o->pipeline ? 0 : o->warmup + o->iters;
	uint64_t wrong = 0;
	comm_result_t rc;
	char *in, *out;
	double t0, each;

	buffers(r, bc, inplace, &in, &out, &outlen);
	if (o->pipeline) {
		bc->seq = o->reference ? 0 : r->seq++;
		if (fill(r, bc, in, out, outlen * es) < 0 ||
		    (o->warmup && post_many(r, bc, in, out, o->warmup, &each)) ||
		    post_many(r, bc, in, out, o->iters, &each))
			return -1;
		for (int i = 0; i < o->iters; i++)
			r->mine[i] = each;
		/* out of place the inputs are as filled: the last iteration's outputs are checked */
		if (o->check && !inplace && !o->reference &&
		    check(r, bc, out, outlen * es, inplace, &wrong) < 0)
			return -1;
		if (o->check) /* in place the inputs changed: once more, blocking */
			runs = o->warmup + o->iters + 1;
	}
	for (int i = o->pipeline ? runs - 1 : 0; i < runs; i++) {
		bc->seq = o->reference ? 0 : r->seq++;
		if ((i == 0 || o->pipeline || (o->check && !o->reference)) &&
		    fill(r, bc, in, out, outlen * es) < 0)
			return -1;
		rc = comm_barrier(r->c, NULL);
		if (rc != COMM_OK)
			return fail(r, "barrier", rc);
		t0 = now();
		rc = post(r, bc, in, out, NULL);
		if (i >= o->warmup && i - o->warmup < o->iters)
			r->mine[i - o->warmup] = now() - t0;
		if (rc != COMM_OK)
			return fail(r, bench_ops[bc->op].name, rc);
		if (o->check && (!o->reference || i == runs - 1) &&
		    check(r, bc, out, outlen * es, inplace, &wrong) < 0)
			return -1;
	}
	memcpy(r->times, r->mine, (size_t)o->iters * sizeof *r->times);
	rc = comm_allreduce(r->c, r->times, r->times, (size_t)o->iters, COMM_FLOAT64, COMM_MAX,
			    NULL);
	if (rc != COMM_OK)
		return fail(r, "allreduce of the times", rc);
	*r->wrong = wrong;
	rc = comm_allreduce(r->c, r->wrong, r->wrong, 1, COMM_UINT64, COMM_SUM, NULL);
	if (rc != COMM_OK)
		return fail(r, "allreduce of the wrong counts", rc);
	res->ran = 1;
	res->time = median(own ? r->mine : r->times, o->iters);
	res->wrong = *r->wrong;
	return 0;
}

static void print_half(struct rank *r, const struct result *res, double bytes, double factor)
{
	double us = res->time * 1e6, algbw = bytes / res->time / 1e9;
	char t[32];

	if (!res->ran) {
		printf("  %7s  %6s  %6s  %6s", "n/a", "n/a", "n/a", "n/a");
		return;
	}
	snprintf(t, sizeof t, us >= 10000 ? "%7.0f" : us >= 100 ? "%7.1f" : "%7.2f", us);
	printf("  %7s  %6.2f  %6.2f  %6llu", t, algbw, algbw * factor,
	       (unsigned long long)res->wrong);
	r->bw_sum += algbw * factor;
	r->bw_n++;
}

static void print_json(struct rank *r, const struct bench_case *bc, size_t bytes, int inplace,
		       const struct result *res)
{
	double algbw = (double)bytes / res->time / 1e9;

	printf("{\"bench\":\"commd\",\"op\":\"%s\",\"bytes\":%zu,\"count\":%zu,\"dtype\":\"%s\","
	       "\"redop\":\"%s\",\"ranks\":%d,\"inplace\":%s,\"time_us\":%.3f,"
	       "\"algbw_gbs\":%.6f,\"busbw_gbs\":%.6f,\"wrong\":%llu}\n",
	       bench_ops[bc->op].name, bytes, bc->count, bench_dtype_json(bc->dtype),
	       bench_ops[bc->op].reduces ? bench_redop_name(bc->redop) : "none", r->n,
	       inplace ? "true" : "false", res->time * 1e6, algbw,
	       algbw * bench_bus_factor(bc->op, r->n), (unsigned long long)res->wrong);
}

static void print_head(struct rank *r, const struct bench_case *bc)
{
	printf("#\n# %s %s", bench_ops[bc->op].name, bench_dtype_name(bc->dtype));
	printf("%s%s\n#\n", bench_ops[bc->op].reduces ? " " : "",
	       bench_ops[bc->op].reduces ? bench_redop_name(bc->redop) : "");
	bench_print_columns(r->o->inplace_only);
}

/* Every size of op: one table, or one JSON line per measurement. */
static int run_op(struct rank *r, int op, comm_dtype_t dtype, comm_redop_t redop)
{
	const struct bench_opts *o = r->o;
	const struct bench_op_info *info = &bench_ops[op];
	size_t es = comm_dtype_size(dtype), blocks = info->split ? (size_t)r->n : 1;
	size_t size = o->min_bytes, bytes, last = 0;
	struct bench_case bc = { op, dtype, redop, r->rank, r->n, 0, 0 };
	struct result res[2];
	int print = r->rank == 0;

	r->bw_sum = 0;
	r->bw_n = 0;
	r->wrong_sum = 0;
	if (print && !o->json)
		print_head(r, &bc);
	for (;;) {
		bc.count = size / es / blocks;
		bytes = bc.count * es * blocks;
		if (bc.count > 0 && bytes != last) {
			memset(res, 0, sizeof res);
			for (int ip = o->inplace_only; ip < 2; ip++) {
				if (ip && !info->inplace)
					continue;
				if (measure(r, &bc, ip, 0, &res[ip]) < 0)
					return -1;
				r->wrong_sum += res[ip].wrong;
				if (print && o->json)
					print_json(r, &bc, bytes, ip, &res[ip]);
			}
			if (print && !o->json) {
				printf("%12zu  %12zu  %8s  %6s  %6d", bytes, bc.count,
				       bench_dtype_name(dtype),
				       info->reduces ? bench_redop_name(redop) : "none",
				       op == OP_BROADCAST || op == OP_REDUCE ? 0 : -1);
				for (int ip = o->inplace_only; ip < 2; ip++)
					print_half(r, &res[ip], (double)bytes,
						   bench_bus_factor(op, r->n));
				printf("\n");
			}
			last = bytes;
		}
		if (size > o->max_bytes / o->factor)
			break;
		size *= o->factor;
	}
	r->wrong_all += r->wrong_sum;
	if (print && !o->json) {
		printf("# Wrong values         : %llu %s\n", (unsigned long long)r->wrong_sum,
		       r->wrong_sum ? "FAILED" : "OK");
		printf("# Avg bus bandwidth    : %g\n", r->bw_n ? r->bw_sum / r->bw_n : 0.0);
	}
	return 0;
}

/* op for every dtype and reduction chosen (reductions only where it reduces). */
static int run_dtypes(struct rank *r, int op)
{
	int d0 = r->o->dtype < 0 ? 0 : r->o->dtype, d1 = r->o->dtype < 0 ? COMM_FLOAT64 : d0;
	int r0 = r->o->redop < 0 ? 0 : r->o->redop, r1 = r->o->redop < 0 ? COMM_AVG : r0;

	if (!bench_ops[op].reduces)
		r1 = r0;
	for (int d = d0; d <= d1; d++)
		for (int op2 = r0; op2 <= r1; op2++)
			if (run_op(r, op, (comm_dtype_t)d, (comm_redop_t)op2) < 0)
				return -1;
	return 0;
}

/* The reference run's lines for one op: each rank's time and bandwidth. */
static int run_reference(struct rank *r, int op)
{
	const char *tag = op == OP_ALLREDUCE ? "all_reduce" : "reduce_scatter";
	struct bench_case bc = { op, COMM_FLOAT32, COMM_SUM, r->rank, r->n, r->o->ref_elements, 0 };
	size_t in_elems;
	struct result res;
	comm_result_t rc;

	if (op == OP_REDUCE_SCATTER)
		bc.count = r->o->ref_elements / (size_t)r->n;
	in_elems = op == OP_REDUCE_SCATTER ? bc.count * (size_t)r->n : bc.count;
	if (measure(r, &bc, 0, 1, &res) < 0)
		return -1;
	r->wrong_all += res.wrong;
	printf("[%s] Rank %d: %s(world_size=%d, num_elements=%zu) took %.2fms\n", tag, r->rank,
	       tag, r->n, in_elems, res.time * 1e3);
	rc = comm_barrier(r->c, NULL);
	if (rc != COMM_OK)
		return fail(r, "barrier", rc);
	/* busbw in GiB/s: the reference run's numbers follow from its times so */
	printf("[%s] Rank %d: %s measured bandwidth = %.0f GB/s\n", tag, r->rank, tag,
	       (double)in_elems * 4 * bench_bus_factor(op, r->n) / res.time / (1 << 30));
	rc = comm_barrier(r->c, NULL);
	if (rc != COMM_OK)
		return fail(r, "barrier", rc);
	return 0;
}

static void print_banner(struct rank *r, const int64_t *pids)
{
	const struct bench_opts *o = r->o;
	const char *sock = o->socket ? o->socket : "/run/commd/commd.sock (default)";
	char host[256] = "?";

	gethostname(host, sizeof host - 1);
	if (o->nsockets > 1)
		printf("# commbench: %d ranks over %d daemons (%s), root %s, job %s\n", r->n,
		       o->nsockets, sock, o->root, o->job);
	else
		printf("# commbench: %d ranks, commd at %s, job %s\n", r->n, sock, o->job);
	printf("#  minBytes %zu maxBytes %zu step: %zu(factor) warmup iters: %d iters: %d "
	       "validation: %d\n", o->min_bytes, o->max_bytes, o->factor, o->warmup, o->iters,
	       o->check);
	printf("#  dtype %s redop %s; time: %s of the slowest rank; GB = 1e9 B\n#\n"
	       "# Using ranks\n", o->dtype < 0 ? "all" : bench_dtype_name(o->dtype),
	       o->redop < 0 ? "all" : bench_redop_name(o->redop),
	       o->pipeline ? "iterations back to back, the whole / iters"
			   : "median over iterations");
	for (int i = 0; i < r->n; i++) {
		if (o->device)
			printf("#  Rank %2d Pid %7lld on %s device %d\n", i, (long long)pids[i], host,
			       i % o->ndev);
		else if (o->nsockets > 1)
			printf("#  Rank %2d Pid %7lld on %s (host memory) via %s\n", i,
			       (long long)pids[i], host, o->sockets[bench_daemon_of(o, i)]);
		else
			printf("#  Rank %2d Pid %7lld on %s (host memory)\n", i, (long long)pids[i],
			       host);
	}
}

/* --device: the buffers on device rank % ndev, and their host mirrors. */
static int setup_device(struct rank *r)
{
	int dev = r->rank % r->o->ndev;
	void *a, *b;
	char why[256];

	r->hsend = malloc(r->bytes);
	r->hrecv = malloc(r->bytes);
	if (!r->hsend || !r->hrecv) {
		fprintf(stderr, "commbench: rank %d: out of memory\n", r->rank);
		return -1;
	}
	if (bench_gpu_alloc(dev, r->bytes, &a, &b, why, sizeof why) < 0) {
		fprintf(stderr, "commbench: rank %d: --device: %s\n", r->rank, why);
		return -1;
	}
	r->sendbuf = a;
	r->recvbuf = b;
	return 0;
}

/* Allocate the buffers; gather the ranks' pids for the banner. */
static int setup(struct rank *r)
{
	const struct bench_opts *o = r->o;
	size_t bytes = o->reference ? o->ref_elements * 4 : o->max_bytes;
	int64_t *pids;
	comm_result_t rc;

	if (bytes < 64)
		bytes = 64;
	r->bytes = bytes;
	r->mine = calloc((size_t)o->iters, sizeof *r->mine);
	r->vcounts = calloc(2 * (size_t)r->n, sizeof *r->vcounts);
	if (o->pipeline &&
	    !(r->reqs = calloc(2 * (size_t)(o->iters > o->warmup ? o->iters : o->warmup),
			       sizeof *r->reqs))) {
		fprintf(stderr, "commbench: rank %d: out of memory\n", r->rank);
		return -1;
	}
	if (o->device && setup_device(r) < 0)
		return -1;
	if (!o->device) {
		r->sendbuf = comm_mem_alloc(r->c, bytes);
		r->recvbuf = comm_mem_alloc(r->c, bytes);
	}
	r->times = comm_mem_alloc(r->c, (size_t)o->iters * sizeof *r->times);
	r->wrong = comm_mem_alloc(r->c, sizeof *r->wrong);
	pids = comm_mem_alloc(r->c, (size_t)r->n * sizeof *pids);
	if (!r->mine || !r->vcounts || !r->sendbuf || !r->recvbuf || !r->times || !r->wrong || !pids) {
		fprintf(stderr, "commbench: rank %d: cannot allocate 2 x %zu bytes: %s\n",
			r->rank, bytes, comm_last_error(r->c));
		return -1;
	}
	pids[r->rank] = getpid();
	rc = comm_allgather(r->c, pids + r->rank, pids, 1, COMM_INT64, NULL);
	if (rc != COMM_OK)
		return fail(r, "allgather of the pids", rc);
	if (r->rank == 0 && !o->json && !o->reference)
		print_banner(r, pids);
	comm_mem_free(r->c, pids);
	return 0;
}

/* After the comm is gone, which had the device buffers registered. */
static void free_device(struct rank *r)
{
	if (!r->o->device)
		return;
	bench_gpu_free(r->sendbuf, r->recvbuf);
	free(r->hsend);
	free(r->hrecv);
}

int bench_daemon_of(const struct bench_opts *o, int rank)
{
	return (int)((long)rank * o->nsockets / o->nranks);
}

int bench_rank_main(const struct bench_opts *o, int rank)
{
	comm_config_t cfg = comm_config_default();
	struct rank r = { .o = o, .rank = rank, .n = o->nranks };
	comm_result_t rc;
	int err = 0;

	cfg.socket = o->nsockets ? o->sockets[bench_daemon_of(o, rank)] : o->socket;
	cfg.root = o->root;
	cfg.job = o->job;
	cfg.rank = rank;
	cfg.world_size = o->nranks;
	rc = comm_init(&r.c, &cfg);
	if (rc != COMM_OK) {
		fprintf(stderr, "commbench: rank %d: comm_init: %s (%s): %s\n", rank,
			comm_result_name(rc), comm_strerror(rc), comm_last_error(NULL));
		return 1;
	}
	err = setup(&r);
	if (o->reference) {
		if (!err)
			err = run_reference(&r, OP_ALLREDUCE);
		if (!err)
			err = run_reference(&r, OP_REDUCE_SCATTER);
	}
	for (int op = 0; op < NOPS && !o->reference && !err; op++)
		if (o->op < 0 || o->op == op)
			err = run_dtypes(&r, op);
	free(r.mine);
	free(r.vcounts);
	free(r.reqs);
	fflush(stdout);
	if (err) {
		comm_abort(r.c);
		free_device(&r);
		return 1;
	}
	rc = comm_finalize(r.c);
	free_device(&r);
	if (rc != COMM_OK) {
		fprintf(stderr, "commbench: rank %d: comm_finalize: %s (%s)\n", rank,
			comm_result_name(rc), comm_strerror(rc));
		return 1;
	}
	if (r.wrong_all && rank == 0)
		fprintf(stderr, "commbench: %llu wrong values\n", (unsigned long long)r.wrong_all);
	return r.wrong_all ? 1 : 0;
}
