/*
 * nccl-bench.c: the direct NCCL baseline for commbench -G (see
 * tests/bench/gpu-compare.sh). One process drives one NCCL rank per GPU
 * (ncclCommInitAll), with commbench's options, sizes, table and busbw
 * factors. Each op is timed from its launch until every GPU's stream is
 * idle: what a blocking commd op costs. With --hosts N instead, N processes
 * are one NCCL rank each, each its own NCCL host (NCCL_HOSTID), as commd's
 * daemons on one machine are to each other (tests/bench/gpu-nodes.sh). Exit status 0, 1 on an error or a
 * wrong value, 2 on bad usage, 77 without a usable GPU.
 */
#include <errno.h>
#include <getopt.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <strings.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cuda_runtime.h>
#include <nccl.h>

#include "bench-table.h"
#include "util.h"

#define MAX_DEV 64
#define MAX_REPORTS 8


enum kind { K_INT, K_UINT, K_HALF, K_BF16, K_FLOAT, K_DOUBLE };

/* commbench's dtypes, in its order, with its names. */
static const struct {
	const char *name, *json, *alias;
	ncclDataType_t nccl;
	size_t size;
	enum kind kind;
	double eps;     /* unit roundoff, for the float tolerance */
} dtypes[] = {
	{ "int8", "int8", "char", ncclInt8, 1, K_INT, 0 },
	{ "uint8", "uint8", "uchar", ncclUint8, 1, K_UINT, 0 },
	{ "int32", "int32", "int", ncclInt32, 4, K_INT, 0 },
	{ "uint32", "uint32", "uint", ncclUint32, 4, K_UINT, 0 },
	{ "int64", "int64", "long", ncclInt64, 8, K_INT, 0 },
	{ "uint64", "uint64", "ulong", ncclUint64, 8, K_UINT, 0 },
	{ "half", "float16", "fp16", ncclFloat16, 2, K_HALF, 0x1p-11 },
	{ "bfloat16", "bfloat16", "bf16", ncclBfloat16, 2, K_BF16, 0x1p-8 },
	{ "float", "float32", "fp32", ncclFloat32, 4, K_FLOAT, 0x1p-24 },
	{ "double", "float64", "fp64", ncclFloat64, 8, K_DOUBLE, 0x1p-53 },
};
#define NDTYPES ((int)(sizeof dtypes / sizeof dtypes[0]))
#define DT_FLOAT 8

enum { R_SUM, R_PROD, R_MIN, R_MAX, R_AVG, NREDOPS };
static const char *const redops[NREDOPS] = { "sum", "prod", "min", "max", "avg" };
static const ncclRedOp_t nccl_redops[NREDOPS] = { ncclSum, ncclProd, ncclMin, ncclMax, ncclAvg };

struct opts {
	int ngpu;               /* 0: every visible GPU */
	int hosts;              /* --hosts: processes, one NCCL rank and host each; 0: one process */
	int op, dtype, redop;   /* -1: all */
	size_t min_bytes, max_bytes, factor;
	int warmup, iters, check, inplace_only, json;
	int pipeline;           /* -P: iterations launched back to back */
};

/* The communicator and every device's buffers. */
struct bench {
	const struct opts *o;
	int n;                  /* ranks in this process */
	int rank0;              /* the rank of its first (--hosts: of its one) */
	int nranks;             /* ranks in all */
	int dev[MAX_DEV];       /* each rank's device */
	ncclComm_t comm[MAX_DEV];
	cudaStream_t stream[MAX_DEV];
	char *send[MAX_DEV], *recv[MAX_DEV];
	size_t bytes;           /* of each device buffer */
	char *hbuf;             /* -c 1: host staging, bytes */
	double *times;          /* iters */
	unsigned seq;           /* iterations so far: seeds the data */
	int reports;
	uint64_t wrong_all;
};

/* One op, dtype, redop and size, as every rank sees it. */
struct bench_case {
	int op, dt, red, n;
	size_t count;           /* as the op is called with (per rank for split ops) */
	unsigned seq;
};

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int cuda_ok(cudaError_t e, const char *what, int dev)
{
	if (e == cudaSuccess)
		return 1;
	fprintf(stderr, "nccl-bench: device %d: %s: %s\n", dev, what, cudaGetErrorString(e));
	return 0;
}

static int nccl_ok(ncclResult_t r, const char *what)
{
	if (r == ncclSuccess)
		return 1;
	fprintf(stderr, "nccl-bench: %s: %s (%s)\n", what, ncclGetErrorString(r),
		ncclGetLastError(NULL));
	return 0;
}

/*
 * The data: small non-negative integers, exact in every dtype, so sums,
 * minima, maxima and products are exact whatever order NCCL combines them
 * in (up to 18 ranks for int8). Data that moves: (11 g + 37 src + 5 seq) mod
 * 101 at element g of rank src. Reductions: (11 g + 37 rank + 5 seq) mod 8;
 * prod: 2 on the rank where (g + rank + seq) mod n is 0, else 1.
 */
#define MOVE_PERIOD 101
static int64_t moved(const struct bench_case *c, int src, uint64_t g)
{
	return (int64_t)((g % 101 * 11 + (unsigned)src * 37u + c->seq % 101 * 5) % 101);
}

static int64_t red_in(const struct bench_case *c, int rank, uint64_t g)
{
	if (c->red == R_PROD)
		return (g % (unsigned)c->n + (unsigned)rank + c->seq % (unsigned)c->n) %
		       (unsigned)c->n == 0 ? 2 : 1;
	return (int64_t)((g % 8 * 11 + (unsigned)rank * 37u + c->seq % 8 * 5) % 8);
}

/* Both periods divide this (as functions of g). */
static size_t red_period(const struct bench_case *c)
{
	return 8 * (size_t)c->n;
}

/* Small integer v (|v| < 2048) as IEEE binary16 bits: exact. */
static uint16_t half_of(int64_t v)
{
	uint16_t s = v < 0 ? 0x8000 : 0;
	unsigned a = (unsigned)(v < 0 ? -v : v);
	int e = 0;

	if (!a)
		return s;
	while ((a >> (e + 1)) != 0)
		e++;
	return (uint16_t)(s | (unsigned)(e + 15) << 10 | ((a << (10 - e)) & 0x3ff));
}

static float float_of_bits(uint32_t x)
{
	float f;

	memcpy(&f, &x, sizeof f);
	return f;
}

static double half_value(uint16_t h)
{
	uint32_t s = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff;
	double v;

	if (e == 0)
		v = m / 16777216.0;
	else if (e == 31)
		return (double)float_of_bits(s | 0x7f800000 | m << 13);
	else
		return (double)float_of_bits(s | (e + 112) << 23 | m << 13);
	return s ? -v : v;
}

/* Integer v into dst as dtype dt (integers wrap as C converts them). */
static void store(int dt, void *dst, int64_t v)
{
	union { int8_t i8; int32_t i32; int64_t i64; uint16_t h; float f; double d; } u;
	uint32_t bits;

	switch (dtypes[dt].kind) {
	case K_INT:
	case K_UINT:
		if (dtypes[dt].size == 1)
			u.i8 = (int8_t)(uint8_t)v;
		else if (dtypes[dt].size == 4)
			u.i32 = (int32_t)(uint32_t)v;
		else
			u.i64 = v;
		break;
	case K_HALF:
		u.h = half_of(v);
		break;
	case K_BF16: /* small integers have at most 8 significant bits: exact */
		u.f = (float)v;
		memcpy(&bits, &u.f, sizeof bits);
		u.h = (uint16_t)(bits >> 16);
		break;
	case K_FLOAT:
		u.f = (float)v;
		break;
	default:
		u.d = (double)v;
		break;
	}
	memcpy(dst, &u, dtypes[dt].size);
}

/* Element p of dtype dt: integers as int64 in *iv, every dtype as a double. */
static double load(int dt, const void *p, int64_t *iv)
{
	int8_t i8;
	int32_t i32;
	uint16_t h;
	float f;
	double d;

	*iv = 0;
	switch (dtypes[dt].kind) {
	case K_INT:
	case K_UINT:
		if (dtypes[dt].size == 1) {
			memcpy(&i8, p, 1);
			*iv = dtypes[dt].kind == K_INT ? i8 : (int64_t)(uint8_t)i8;
		} else if (dtypes[dt].size == 4) {
			memcpy(&i32, p, 4);
			*iv = dtypes[dt].kind == K_INT ? i32 : (int64_t)(uint32_t)i32;
		} else {
			memcpy(iv, p, 8);
		}
		return (double)*iv;
	case K_HALF:
		memcpy(&h, p, 2);
		return half_value(h);
	case K_BF16:
		memcpy(&h, p, 2);
		return (double)float_of_bits((uint32_t)h << 16);
	case K_FLOAT:
		memcpy(&f, p, 4);
		return (double)f;
	default:
		memcpy(&d, p, 8);
		return d;
	}
}

/* Source of a value: a rank's moved data, or (RED) the reduction over all ranks. */
#define RED (-1)

/*
 * The expected value at element g from src, computed on the host rank by
 * rank: as an int64 in *iv for the integer dtypes (wrapped as the dtype
 * wraps; an average is the sum divided, truncated), as a double for all.
 */
static double expect(const struct bench_case *c, int src, uint64_t g, int64_t *iv)
{
	int floating = dtypes[c->dt].kind != K_INT && dtypes[c->dt].kind != K_UINT;
	int64_t acc, v;
	char tmp[8];

	if (src != RED) {
		*iv = moved(c, src, g);
		return (double)*iv;
	}
	acc = red_in(c, 0, g);
	for (int r = 1; r < c->n; r++) {
		v = red_in(c, r, g);
		switch (c->red) {
		case R_PROD: acc *= v; break;
		case R_MIN: acc = v < acc ? v : acc; break;
		case R_MAX: acc = v > acc ? v : acc; break;
		default: acc += v; break;
		}
	}
	if (floating) {
		*iv = 0;
		return c->red == R_AVG ? (double)acc / c->n : (double)acc;
	}
	store(c->dt, tmp, acc);
	load(c->dt, tmp, iv);
	if (c->red == R_AVG)
		*iv /= c->n;
	return (double)*iv;
}

/* len elements from element g0 of src (its values repeat every period) into dst. */
static void span_fill(const struct bench_case *c, int src, int rank, uint64_t g0, size_t len,
		      char *dst)
{
	size_t es = dtypes[c->dt].size, plen = src == RED ? red_period(c) : MOVE_PERIOD, done;

	if (plen > len)
		plen = len;
	for (size_t i = 0; i < plen; i++)
		store(c->dt, dst + i * es, src == RED ? red_in(c, rank, g0 + i)
						      : moved(c, src, g0 + i));
	for (done = plen; done < len; done *= 2)
		memcpy(dst + done * es, dst, (len - done < done ? len - done : done) * es);
}

/*
 * Wrong elements of out (len, from element g0 of src); the first, at
 * base + i, in *first. Exact for the integers; for the floats within
 * 2 n eps (n ranks, eps the dtype's unit roundoff) of the value.
 */
static uint64_t span_check(const struct bench_case *c, int src, uint64_t g0, size_t len,
			   const char *out, size_t base, long long *first, double *got_v,
			   double *want_v)
{
	size_t es = dtypes[c->dt].size, plen = src == RED ? red_period(c) : MOVE_PERIOD;
	int exact = dtypes[c->dt].kind == K_INT || dtypes[c->dt].kind == K_UINT;
	double want[8 * MAX_DEV], tol[8 * MAX_DEV], got, a;
	int64_t wi[8 * MAX_DEV], gi;
	uint64_t wrong = 0;

	if (plen > len)
		plen = len;
	for (size_t j = 0; j < plen; j++) {
		want[j] = expect(c, src, g0 + j, &wi[j]);
		a = want[j] < 0 ? -want[j] : want[j];
		tol[j] = 2 * c->n * dtypes[c->dt].eps * (a > 1 ? a : 1);
	}
	for (size_t i = 0, j = 0; i < len; i++, j = j + 1 == plen ? 0 : j + 1) {
		got = load(c->dt, out + i * es, &gi);
		if (exact ? gi == wi[j] : (got - want[j] <= tol[j] && want[j] - got <= tol[j]))
			continue;
		wrong++;
		if (*first < 0 || (long long)(base + i) < *first) {
			*first = (long long)(base + i);
			*got_v = got;
			*want_v = want[j];
		}
	}
	return wrong;
}

/* What the op's output on rank r holds, block by block; the wrong elements. */
static uint64_t verify(struct bench *b, const struct bench_case *c, int r, const char *out)
{
	size_t es = dtypes[c->dt].size, k = c->count, nblocks = 1;
	long long first = -1;
	double got = 0, want = 0;
	uint64_t wrong = 0;

	if (c->op == OP_REDUCE && r != 0)
		return 0;
	if (c->op == OP_ALLGATHER || c->op == OP_ALLTOALL || c->op == OP_ALLTOALLV)
		nblocks = (size_t)c->n;
	for (size_t j = 0; j < nblocks; j++) {
		const char *o = out + j * k * es;
		uint64_t rk = (uint64_t)r * k;

		switch (c->op) {
		case OP_REDUCE_SCATTER:
			wrong += span_check(c, RED, rk, k, o, 0, &first, &got, &want);
			break;
		case OP_ALLGATHER:
			wrong += span_check(c, (int)j, 0, k, o, j * k, &first, &got, &want);
			break;
		case OP_BROADCAST:
			wrong += span_check(c, 0, 0, k, o, 0, &first, &got, &want);
			break;
		case OP_ALLTOALL:
		case OP_ALLTOALLV:
			wrong += span_check(c, (int)j, rk, k, o, j * k, &first, &got, &want);
			break;
		case OP_SENDRECV:
			wrong += span_check(c, (r + c->n - 1) % c->n, 0, k, o, 0, &first, &got, &want);
			break;
		default:
			wrong += span_check(c, RED, 0, k, o, 0, &first, &got, &want);
		}
	}
	if (wrong && b->reports++ < MAX_REPORTS)
		fprintf(stderr, "nccl-bench: rank %d: %s count %zu %s: %llu wrong, element %lld is "
			"%.9g, expected %.9g\n", r, bench_ops[c->op].name, c->count, dtypes[c->dt].json,
			(unsigned long long)wrong, first, got, want);
	return wrong;
}

/* The op's input and output on this process's rank l for a placement; *outlen in elements. */
static void buffers(struct bench *b, const struct bench_case *c, int l, int inplace, char **in,
		    char **out, size_t *outlen)
{
	size_t blk = c->count * dtypes[c->dt].size;
	int r = b->rank0 + l;

	*outlen = c->op == OP_ALLGATHER || c->op == OP_ALLTOALL || c->op == OP_ALLTOALLV
			  ? c->count * (size_t)c->n
			  : c->count;
	*in = b->send[l];
	*out = b->recv[l];
	if (!inplace)
		return;
	*in = b->recv[l];
	if (c->op == OP_REDUCE_SCATTER)
		*out = b->recv[l] + (size_t)r * blk;
	else if (c->op == OP_ALLGATHER)
		*in = b->recv[l] + (size_t)r * blk;
}

/* Poison every output (when checking) and fill every input, then wait for the GPUs. */
static int fill(struct bench *b, const struct bench_case *c, int inplace)
{
	size_t es = dtypes[c->dt].size, inlen, outlen;
	char *in, *out;

	for (int l = 0; l < b->n; l++) {
		int r = b->rank0 + l, d = b->dev[l];

		buffers(b, c, l, inplace, &in, &out, &outlen);
		inlen = bench_ops[c->op].split && c->op != OP_ALLGATHER ? c->count * (size_t)c->n
								       : c->count;
		if (!cuda_ok(cudaSetDevice(d), "cudaSetDevice", d) ||
		    (b->o->check && !cuda_ok(cudaMemset(out, 0xa5, outlen * es), "cudaMemset", d)))
			return -1;
		if (c->op == OP_BROADCAST && r != 0)
			continue;
		span_fill(c, bench_ops[c->op].reduces ? RED : c->op == OP_BROADCAST ? 0 : r, r, 0, inlen,
			  b->hbuf);
		if (!cuda_ok(cudaMemcpy(in, b->hbuf, inlen * es, cudaMemcpyHostToDevice),
			     "cudaMemcpy", d))
			return -1;
	}
	for (int l = 0; l < b->n; l++)
		if (!cuda_ok(cudaSetDevice(b->dev[l]), "cudaSetDevice", b->dev[l]) ||
		    !cuda_ok(cudaDeviceSynchronize(), "cudaDeviceSynchronize", b->dev[l]))
			return -1;
	return 0;
}

/* Launch the op on every rank in one group. */
static int launch(struct bench *b, const struct bench_case *c, int inplace)
{
	ncclDataType_t t = dtypes[c->dt].nccl;
	ncclRedOp_t red = nccl_redops[c->red];
	size_t k = c->count, blk = k * dtypes[c->dt].size, outlen;
	ncclResult_t rc = ncclGroupStart();
	char *in, *out;

	for (int l = 0; l < b->n && rc == ncclSuccess; l++) {
		ncclComm_t cm = b->comm[l];
		cudaStream_t s = b->stream[l];
		int r = b->rank0 + l;

		buffers(b, c, l, inplace, &in, &out, &outlen);
		switch (c->op) {
		case OP_ALLREDUCE:
			rc = ncclAllReduce(in, out, k, t, red, cm, s);
			break;
		case OP_REDUCE_SCATTER:
			rc = ncclReduceScatter(in, out, k, t, red, cm, s);
			break;
		case OP_ALLGATHER:
			rc = ncclAllGather(in, out, k, t, cm, s);
			break;
		case OP_BROADCAST:
			rc = ncclBroadcast(in, out, k, t, 0, cm, s);
			break;
		case OP_REDUCE:
			rc = ncclReduce(in, out, k, t, red, 0, cm, s);
			break;
		case OP_ALLTOALL:
		case OP_ALLTOALLV: /* NCCL has no alltoall of its own: both are these groups */
			for (int j = 0; j < c->n && rc == ncclSuccess; j++) {
				rc = ncclSend(in + (size_t)j * blk, k, t, j, cm, s);
				if (rc == ncclSuccess)
					rc = ncclRecv(out + (size_t)j * blk, k, t, j, cm, s);
			}
			break;
		default:
			rc = ncclSend(in, k, t, (r + 1) % c->n, cm, s);
			if (rc == ncclSuccess)
				rc = ncclRecv(out, k, t, (r + c->n - 1) % c->n, cm, s);
		}
	}
	if (rc != ncclSuccess) {
		nccl_ok(rc, bench_ops[c->op].name);
		ncclGroupEnd();
		return -1;
	}
	return nccl_ok(ncclGroupEnd(), "ncclGroupEnd") ? 0 : -1;
}

static int cmp_double(const void *x, const void *y)
{
	double a = *(const double *)x, d = *(const double *)y;

	return (a > d) - (a < d);
}

static int sync_all(struct bench *b)
{
	for (int l = 0; l < b->n; l++)
		if (!cuda_ok(cudaStreamSynchronize(b->stream[l]), "cudaStreamSynchronize", b->dev[l]))
			return -1;
	return 0;
}

/* -P: k launches back to back, then every stream synchronized; *each: the whole / k. */
static int launch_many(struct bench *b, struct bench_case *c, int inplace, int k, double *each)
{
	double t0 = now();

	for (int i = 0; i < k; i++)
		if (launch(b, c, inplace) < 0)
			return -1;
	if (sync_all(b) < 0)
		return -1;
	*each = (now() - t0) / k;
	return 0;
}

/*
 * warmup + iters runs; each timed from its launch until every stream is
 * idle. Fill and check outside the timed part (-P: the runs back to back
 * after one fill, then one more run filled and checked). *time: the
 * median (s).
 */
static int measure(struct bench *b, struct bench_case *c, int inplace, double *time_s,
		   uint64_t *wrong)
{
	const struct opts *o = b->o;
	size_t es = dtypes[c->dt].size, outlen;
	int runs = o->pipeline ? 0 : o->warmup + o->iters;
	char *in, *out;
	double t0, each;

	*wrong = 0;
	if (o->pipeline) {
		c->seq = b->seq++;
		if (fill(b, c, inplace) < 0 ||
		    (o->warmup && launch_many(b, c, inplace, o->warmup, &each) < 0) ||
		    launch_many(b, c, inplace, o->iters, &each) < 0)
			return -1;
		for (int i = 0; i < o->iters; i++)
			b->times[i] = each;
		if (o->check) /* the inputs may have changed in place: once more, alone */
			runs = o->warmup + o->iters + 1;
	}
	for (int i = o->pipeline ? runs - 1 : 0; i < runs; i++) {
		c->seq = b->seq++;
		if ((i == 0 || o->pipeline || o->check) && fill(b, c, inplace) < 0)
			return -1;
		t0 = now();
		if (launch(b, c, inplace) < 0 || sync_all(b) < 0)
			return -1;
		if (i >= o->warmup && i - o->warmup < o->iters)
			b->times[i - o->warmup] = now() - t0;
		for (int l = 0; o->check && l < b->n; l++) {
			buffers(b, c, l, inplace, &in, &out, &outlen);
			if (!cuda_ok(cudaMemcpy(b->hbuf, out, outlen * es, cudaMemcpyDeviceToHost),
				     "cudaMemcpy", b->dev[l]))
				return -1;
			*wrong += verify(b, c, b->rank0 + l, b->hbuf);
		}
	}
	qsort(b->times, (size_t)o->iters, sizeof *b->times, cmp_double);
	*time_s = o->iters % 2 ? b->times[o->iters / 2]
			       : (b->times[o->iters / 2 - 1] + b->times[o->iters / 2]) / 2;
	return 0;
}

static void print_head(const struct bench *b, const struct bench_case *c)
{
	printf("#\n# %s %s%s%s\n#\n", bench_ops[c->op].name, dtypes[c->dt].name,
	       bench_ops[c->op].reduces ? " " : "", bench_ops[c->op].reduces ? redops[c->red] : "");
	bench_print_columns(b->o->inplace_only);
}

/* Every size of c's op, dtype and redop: one table, or JSON lines. */
static int run_op(struct bench *b, struct bench_case *c, double *bw_sum, int *bw_n,
		  uint64_t *wrong_sum)
{
	const struct opts *o = b->o;
	size_t es = dtypes[c->dt].size, blocks = bench_ops[c->op].split ? (size_t)c->n : 1;
	size_t size = o->min_bytes, bytes, last = 0;
	double t[2] = { 0, 0 }, algbw, f = bench_bus_factor(c->op, c->n);
	uint64_t w[2] = { 0, 0 };
	int ran[2] = { 0, 0 };
	char ts[32];

	if (!o->json)
		print_head(b, c);
	for (;;) {
		c->count = size / es / blocks;
		bytes = c->count * es * blocks;
		if (c->count > 0 && bytes != last) {
			for (int ip = o->inplace_only; ip < 2; ip++) {
				ran[ip] = ip == 0 || bench_ops[c->op].inplace;
				if (!ran[ip])
					continue;
				if (measure(b, c, ip, &t[ip], &w[ip]) < 0)
					return -1;
				*wrong_sum += w[ip];
				algbw = (double)bytes / t[ip] / 1e9;
				if (o->json)
					printf("{\"bench\":\"nccl\",\"op\":\"%s\",\"bytes\":%zu,"
					       "\"count\":%zu,\"dtype\":\"%s\",\"redop\":\"%s\","
					       "\"ranks\":%d,\"inplace\":%s,\"time_us\":%.3f,"
					       "\"algbw_gbs\":%.6f,\"busbw_gbs\":%.6f,\"wrong\":%llu}\n",
					       bench_ops[c->op].name, bytes, c->count, dtypes[c->dt].json,
					       bench_ops[c->op].reduces ? redops[c->red] : "none", c->n,
					       ip ? "true" : "false", t[ip] * 1e6, algbw, algbw * f,
					       (unsigned long long)w[ip]);
			}
			if (!o->json) {
				printf("%12zu  %12zu  %8s  %6s  %6d", bytes, c->count,
				       dtypes[c->dt].name, bench_ops[c->op].reduces ? redops[c->red] : "none",
				       c->op == OP_BROADCAST || c->op == OP_REDUCE ? 0 : -1);
				for (int ip = o->inplace_only; ip < 2; ip++) {
					double us = t[ip] * 1e6;

					if (!ran[ip]) {
						printf("  %7s  %6s  %6s  %6s", "n/a", "n/a", "n/a", "n/a");
						continue;
					}
					algbw = (double)bytes / t[ip] / 1e9;
					snprintf(ts, sizeof ts, us >= 10000 ? "%7.0f" : us >= 100 ? "%7.1f"
						 : "%7.2f", us);
					printf("  %7s  %6.2f  %6.2f  %6llu", ts, algbw, algbw * f,
					       (unsigned long long)w[ip]);
					*bw_sum += algbw * f;
					(*bw_n)++;
				}
				printf("\n");
			}
			fflush(stdout);
			last = bytes;
		}
		if (size > o->max_bytes / o->factor)
			break;
		size *= o->factor;
	}
	return 0;
}

static int run_all(struct bench *b)
{
	const struct opts *o = b->o;
	int d0 = o->dtype < 0 ? 0 : o->dtype, d1 = o->dtype < 0 ? NDTYPES - 1 : d0;

	for (int op = 0; op < NOPS; op++) {
		int r0 = o->redop < 0 ? 0 : o->redop, r1 = o->redop < 0 ? NREDOPS - 1 : r0;

		if (o->op >= 0 && o->op != op)
			continue;
		if (!bench_ops[op].reduces)
			r1 = r0;
		for (int d = d0; d <= d1; d++) {
			for (int red = r0; red <= r1; red++) {
				struct bench_case c = { op, d, red, b->nranks, 0, 0 };
				double bw_sum = 0;
				int bw_n = 0;
				uint64_t wrong_sum = 0;

				if (run_op(b, &c, &bw_sum, &bw_n, &wrong_sum) < 0)
					return -1;
				b->wrong_all += wrong_sum;
				if (!o->json) {
					printf("# Wrong values         : %llu %s\n",
					       (unsigned long long)wrong_sum, wrong_sum ? "FAILED" : "OK");
					printf("# Avg bus bandwidth    : %g\n", bw_n ? bw_sum / bw_n : 0.0);
				}
			}
		}
	}
	return 0;
}

static void usage(FILE *f)
{
	fprintf(f,
		"usage: nccl-bench [-g GPUS] [-o OP] [-d DTYPE] [-r REDOP] [-b MIN] [-e MAX]\n"
		"                  [-f FACTOR] [-w WARMUP] [-i ITERS] [-c 0|1] [--inplace] [--json]\n"
		"                  [-P] [--hosts N]\n"
		"\n"
		"The direct NCCL baseline for commbench -G: one process, one NCCL rank per\n"
		"GPU (ncclCommInitAll), buffers from cudaMalloc; commbench's sizes, table and\n"
		"busbw factors.\n"
		"\n"
		"  -g GPUS           ranks: devices 0 .. GPUS-1 (default every visible GPU)\n"
		"  --hosts N         instead N processes, rank h on device h mod GPUs, each with\n"
		"                    NCCL_HOSTID of its own, so NCCL joins them as separate\n"
		"                    hosts (sockets); rank 0 prints the table. Time with -c 0:\n"
		"                    the ranks fill their buffers each on its own\n"
		"  -o OP             allreduce, reduce_scatter, allgather, broadcast, reduce,\n"
		"                    alltoall (grouped ncclSend/ncclRecv), sendrecv (a ring)\n"
		"                    or all (default allreduce)\n"
		"  -d DTYPE          int8 uint8 int32 uint32 int64 uint64 half (float16)\n"
		"                    bfloat16 float (float32) double (float64) or all;\n"
		"                    default float\n"
		"  -r REDOP          sum prod min max avg or all (default sum)\n"
		"  -b MIN, -e MAX    sizes in bytes, K M G suffixes (1024s); default 8 to 64M\n"
		"  -f FACTOR         each size is FACTOR times the last (default 2)\n"
		"  -w WARMUP         untimed iterations per size (default 5)\n"
		"  -i ITERS          timed iterations per size (default 20)\n"
		"  -c 0|1            check every result, each iteration (default 1)\n"
		"  --inplace         only the in-place half of the table\n"
		"  --json            one JSON object a line (\"bench\":\"nccl\"), as commbench's\n"
		"  -P, --pipeline    launch each size's ITERS ops back to back, then synchronize\n"
		"                    (nccl-tests' timing): the time is the whole over ITERS;\n"
		"                    -c 1 checks one more run\n"
		"  -h, --help        print this help\n"
		"\n"
		"Sizes as commbench's: for reduce-scatter, all-gather and all-to-all the full\n"
		"buffer of n blocks (count is then per rank), else each rank's buffer. Time is\n"
		"the median over iterations of one op launched on every GPU in a group until\n"
		"every GPU's stream is idle (-P: the whole over ITERS); algbw = size / time\n"
		"(GB = 1e9 B), busbw = algbw x 2(n-1)/n (all-reduce), (n-1)/n\n"
		"(reduce-scatter, all-gather, all-to-all) or 1.\n"
		"-c 1 checks every output element against a host reference (exact for the\n"
		"integers; for the floats within 2 n eps of it). Exit status: 0, 1 on an error\n"
		"or a wrong value, 2 on bad usage, 77 without a usable GPU.\n");
}

/* Index of s in a table of names (any of up to 3 per entry); -1 for "all", -2 if unknown. */
static int parse_name(const char *s, int what)
{
	if (!strcmp(s, "all"))
		return -1;
	if (what == 'o') {
		for (int i = 0; i < NOPS; i++)
			if (!strcmp(s, bench_ops[i].name))
				return i;
	} else if (what == 'd') {
		for (int i = 0; i < NDTYPES; i++)
			if (!strcasecmp(s, dtypes[i].name) || !strcasecmp(s, dtypes[i].json) ||
			    !strcasecmp(s, dtypes[i].alias))
				return i;
	} else {
		for (int i = 0; i < NREDOPS; i++)
			if (!strcasecmp(s, redops[i]))
				return i;
	}
	return -2;
}

static int parse_opts(int argc, char **argv, struct opts *o)
{
	static const struct option long_opts[] = {
		{ "gpus", required_argument, NULL, 'g' },
		{ "op", required_argument, NULL, 'o' },
		{ "datatype", required_argument, NULL, 'd' },
		{ "redop", required_argument, NULL, 'r' },
		{ "minbytes", required_argument, NULL, 'b' },
		{ "maxbytes", required_argument, NULL, 'e' },
		{ "stepfactor", required_argument, NULL, 'f' },
		{ "warmup_iters", required_argument, NULL, 'w' },
		{ "iters", required_argument, NULL, 'i' },
		{ "check", required_argument, NULL, 'c' },
		{ "inplace", no_argument, NULL, 'I' },
		{ "pipeline", no_argument, NULL, 'P' },
		{ "json", no_argument, NULL, 'J' },
		{ "hosts", required_argument, NULL, 'H' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	int c, v = 0, bad;

	while ((c = getopt_long(argc, argv, "g:o:d:r:b:e:f:w:i:c:hP", long_opts, NULL)) != -1) {
		switch (c) {
		case 'g': bad = parse_int_in(optarg, 1, MAX_DEV, &o->ngpu); break;
		case 'o': bad = (o->op = parse_name(optarg, 'o')) == -2; break;
		case 'd': bad = (o->dtype = parse_name(optarg, 'd')) == -2; break;
		case 'r': bad = (o->redop = parse_name(optarg, 'r')) == -2; break;
		case 'b': bad = parse_bytes(optarg, &o->min_bytes); break;
		case 'e': bad = parse_bytes(optarg, &o->max_bytes); break;
		case 'f':
			bad = parse_int_in(optarg, 2, 1024, &v);
			o->factor = (size_t)v;
			break;
		case 'w': bad = parse_int_in(optarg, 0, 100000, &o->warmup); break;
		case 'i': bad = parse_int_in(optarg, 1, 100000, &o->iters); break;
		case 'c': bad = parse_int_in(optarg, 0, 1, &o->check); break;
		case 'I': o->inplace_only = 1; continue;
		case 'P': o->pipeline = 1; continue;
		case 'J': o->json = 1; continue;
		case 'H': bad = parse_int_in(optarg, 2, MAX_DEV, &o->hosts); break;
		case 'h': usage(stdout); exit(0);
		default: usage(stderr); return 2;
		}
		if (bad) {
			fprintf(stderr, "nccl-bench: -%c: bad value '%s'\n", c, optarg);
			return 2;
		}
	}
	if (optind != argc) {
		fprintf(stderr, "nccl-bench: unexpected argument '%s'\n", argv[optind]);
		return 2;
	}
	if (o->hosts && o->ngpu) {
		fprintf(stderr, "nccl-bench: -g and --hosts: one or the other\n");
		return 2;
	}
	if (o->min_bytes > o->max_bytes) {
		fprintf(stderr, "nccl-bench: -b %zu is larger than -e %zu\n", o->min_bytes,
			o->max_bytes);
		return 2;
	}
	return 0;
}

static const char *dev_name(int dev, struct cudaDeviceProp *p)
{
	return cudaGetDeviceProperties(p, dev) == cudaSuccess ? p->name : "?";
}

static void print_banner(const struct bench *b)
{
	const struct opts *o = b->o;
	struct cudaDeviceProp p;
	char host[256] = "?", bus[32];
	int v = 0;

	gethostname(host, sizeof host - 1);
	ncclGetVersion(&v);
	if (o->hosts)
		printf("# nccl-bench: NCCL %d.%d.%d, %d processes, each an NCCL host of its own (%s)\n",
		       v / 10000, v / 100 % 100, v % 100, o->hosts, dev_name(b->dev[0], &p));
	else
		printf("# nccl-bench: NCCL %d.%d.%d, %d GPU%s (", v / 10000, v / 100 % 100, v % 100,
		       b->n, b->n == 1 ? "" : "s");
	for (int r = 0; r < b->n && !o->hosts; r++)
		printf("%s%s", r ? ", " : "", dev_name(r, &p));
	printf("%s#  minBytes %zu maxBytes %zu step: %zu(factor) warmup iters: %d iters: %d "
	       "validation: %d\n", o->hosts ? "" : ")\n", o->min_bytes, o->max_bytes, o->factor,
	       o->warmup, o->iters, o->check);
	printf("#  dtype %s redop %s; time: %s; GB = 1e9 B\n#\n# Using devices\n",
	       o->dtype < 0 ? "all" : dtypes[o->dtype].name, o->redop < 0 ? "all" : redops[o->redop],
	       o->pipeline ? "iterations launched back to back, then synchronized, the whole / iters"
			   : "median over iterations of launch + every stream synchronized");
	for (int l = 0; l < b->n; l++) {
		if (cudaDeviceGetPCIBusId(bus, sizeof bus, b->dev[l]) != cudaSuccess)
			snprintf(bus, sizeof bus, "?");
		printf("#  Rank %2d Pid %7d on %s device %d [%s] %s\n", b->rank0 + l, (int)getpid(),
		       host, b->dev[l], bus, dev_name(b->dev[l], &p));
	}
}

/* The communicator (id: --hosts'), streams and buffers; 0, or -1 with a message. */
static int setup(struct bench *b, ncclUniqueId id)
{
	b->bytes = b->o->max_bytes < 64 ? 64 : b->o->max_bytes;
	b->times = calloc((size_t)b->o->iters, sizeof *b->times);
	b->hbuf = malloc(b->bytes);
	if (!b->times || !b->hbuf) {
		fprintf(stderr, "nccl-bench: out of memory\n");
		return -1;
	}
	for (int l = 0; l < b->n; l++) {
		int d = b->dev[l];

		if (!cuda_ok(cudaSetDevice(d), "cudaSetDevice", d) ||
		    !cuda_ok(cudaStreamCreateWithFlags(&b->stream[l], cudaStreamNonBlocking),
			     "cudaStreamCreate", d) ||
		    !cuda_ok(cudaMalloc((void **)&b->send[l], b->bytes), "cudaMalloc", d) ||
		    !cuda_ok(cudaMalloc((void **)&b->recv[l], b->bytes), "cudaMalloc", d) ||
		    !cuda_ok(cudaMemset(b->send[l], 0, b->bytes), "cudaMemset", d) ||
		    !cuda_ok(cudaMemset(b->recv[l], 0, b->bytes), "cudaMemset", d))
			return -1;
	}
	if (b->o->hosts ? nccl_ok(ncclCommInitRank(&b->comm[0], b->nranks, id, b->rank0),
				  "ncclCommInitRank")
			: nccl_ok(ncclCommInitAll(b->comm, b->n, b->dev), "ncclCommInitAll"))
		return 0;
	memset(b->comm, 0, sizeof b->comm);
	return -1;
}

static void teardown(struct bench *b)
{
	for (int r = 0; r < b->n; r++) {
		if (b->comm[r])
			ncclCommDestroy(b->comm[r]);
		cudaSetDevice(b->dev[r]);
		if (b->send[r])
			cudaFree(b->send[r]);
		if (b->recv[r])
			cudaFree(b->recv[r]);
		if (b->stream[r])
			cudaStreamDestroy(b->stream[r]);
	}
	free(b->times);
	free(b->hbuf);
}

static pid_t host_kids[MAX_DEV]; /* --hosts: rank 0's children, by rank */
static int host_n;

static void kill_hosts(void)
{
	for (int h = 1; h < host_n; h++)
		if (host_kids[h] > 0)
			kill(host_kids[h], SIGKILL);
}

/*
 * Rank 0: a rank that failed leaves the others waiting in NCCL for it
 * forever: end them all. (Its status stays for wait_hosts: WNOWAIT.) One
 * that found no GPU (77) is left alone: rank 0 finds none either and says so.
 */
static void on_child(int sig)
{
	siginfo_t si;

	(void)sig;
	for (int h = 1; h < host_n; h++) {
		memset(&si, 0, sizeof si);
		if (host_kids[h] <= 0 ||
		    waitid(P_PID, (id_t)host_kids[h], &si, WEXITED | WNOHANG | WNOWAIT) < 0 ||
		    !si.si_pid ||
		    (si.si_code == CLD_EXITED && (si.si_status == 0 || si.si_status == 77)))
			continue;
		kill_hosts();
		_exit(1);
	}
}

/*
 * --hosts N: start ranks 1 .. N-1 as child processes (before any CUDA call:
 * a forked CUDA context does not work), each with its own NCCL_HOSTID and
 * its stdout on /dev/null; this process, rank 0, makes the NCCL id and
 * hands it to them over a pipe. The children die with rank 0, and rank 0
 * ends them all when one fails. *rank: the caller's. 0, or -1.
 */
static int spawn_hosts(int hosts, int *rank, ncclUniqueId *id)
{
	char hostid[32];
	int p[2], ok = 1;

	if (pipe(p) < 0) {
		fprintf(stderr, "nccl-bench: pipe: %s\n", strerror(errno));
		return -1;
	}
	fflush(NULL);
	for (int h = 1; h < hosts; h++) {
		pid_t pid = fork();

		if (pid < 0) {
			fprintf(stderr, "nccl-bench: fork: %s\n", strerror(errno));
			ok = 0;
			break;
		}
		if (pid == 0) {
			close(p[1]);
			prctl(PR_SET_PDEATHSIG, SIGKILL);
			*rank = h;
			snprintf(hostid, sizeof hostid, "nccl-bench-host-%d", h);
			setenv("NCCL_HOSTID", hostid, 1);
			if (!freopen("/dev/null", "w", stdout) ||
			    read(p[0], id, sizeof *id) != (ssize_t)sizeof *id)
				_exit(1); /* rank 0 failed first, and says why */
			close(p[0]);
			return 0;
		}
		host_kids[h] = pid;
		host_n = h + 1;
	}
	signal(SIGCHLD, on_child);
	close(p[0]);
	*rank = 0;
	setenv("NCCL_HOSTID", "nccl-bench-host-0", 1);
	ok = ok && nccl_ok(ncclGetUniqueId(id), "ncclGetUniqueId");
	for (int h = 1; h < hosts && ok; h++) /* each read takes one whole id: PIPE_BUF */
		ok = write(p[1], id, sizeof *id) == (ssize_t)sizeof *id;
	close(p[1]);
	return ok ? 0 : -1;
}

/* --hosts: rank 0 waits for the others (failed: ends them first); 1 when one failed. */
static int wait_hosts(int failed)
{
	int bad = 0, st;

	signal(SIGCHLD, SIG_DFL);
	if (failed)
		kill_hosts();
	for (int h = 1; h < host_n; h++)
		if (host_kids[h] > 0 && (waitpid(host_kids[h], &st, 0) < 0 || !WIFEXITED(st) ||
					 WEXITSTATUS(st) != 0))
			bad = 1;
	return bad;
}

int main(int argc, char **argv)
{
	struct opts o = {
		.op = OP_ALLREDUCE, .dtype = DT_FLOAT, .redop = R_SUM, .min_bytes = 8,
		.max_bytes = 64 << 20, .factor = 2, .warmup = 5, .iters = 20, .check = 1,
	};
	struct bench b = { .o = &o };
	ncclUniqueId id;
	int ndev = 0, rc, rank = 0;
	cudaError_t e;

	rc = parse_opts(argc, argv, &o);
	if (rc)
		return rc;
	memset(&id, 0, sizeof id);
	if (o.hosts && spawn_hosts(o.hosts, &rank, &id) < 0) {
		wait_hosts(1);
		return 1;
	}
	e = cudaGetDeviceCount(&ndev);
	if (e != cudaSuccess || ndev < 1) {
		fprintf(stderr, "nccl-bench: no usable GPU: cudaGetDeviceCount: %s\n",
			e != cudaSuccess ? cudaGetErrorString(e) : "no devices");
		if (o.hosts && rank == 0)
			wait_hosts(0);
		return 77;
	}
	if (o.ngpu > ndev) {
		fprintf(stderr, "nccl-bench: -g %d: only %d GPU%s visible\n", o.ngpu, ndev,
			ndev == 1 ? "" : "s");
		return 2;
	}
	b.n = o.hosts ? 1 : o.ngpu ? o.ngpu : ndev < MAX_DEV ? ndev : MAX_DEV;
	b.rank0 = rank;
	b.nranks = o.hosts ? o.hosts : b.n;
	for (int l = 0; l < b.n; l++)
		b.dev[l] = (rank + l) % ndev;
	rc = setup(&b, id);
	if (!rc) {
		if (!o.json)
			print_banner(&b);
		rc = run_all(&b);
	}
	fflush(stdout);
	teardown(&b);
	if (o.hosts && rank == 0 && wait_hosts(rc != 0))
		rc = 1;
	if (rc)
		return 1;
	if (b.wrong_all)
		fprintf(stderr, "nccl-bench: %llu wrong values\n", (unsigned long long)b.wrong_all);
	return b.wrong_all ? 1 : 0;
}
