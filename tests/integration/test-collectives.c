/*
 * test-collectives.c: every collective, dtype and reduction through the real
 * commd, checked element by element against a reference each rank computes
 * itself; in place, staged, asynchronous, two jobs, memory and bad arguments.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "check.h"
#include "comm.h"
#include "harness.h"
#include "plan.h"
#include "ref.h"

#define BIG 1000003          /* the large count: threads, parts and chunks */
#define NREQ 64

/*
 * Inputs are small integers (-5..5) or multiples of 0.25 (-2..2), so every
 * SUM, PROD, MIN and MAX below is exact in every type and must match bit for
 * bit. Float AVG may round in the division: within 1e-6 relative (absolute
 * below 1). Integer AVG truncates toward zero (C division of the sum); the
 * "full-range" integer cases make SUM and PROD wrap, computed unsigned.
 */
#define AVG_TOL 1e-6

enum kind { AR, RS, AG };
enum mode { ZC, STAGED, SEND_STAGED, RECV_STAGED };
enum place { OOP, INPLACE, LITERAL };

struct tcase {
	enum kind kind;
	comm_dtype_t dt;
	comm_redop_t op;
	size_t count;    /* all-reduce count, reduce-scatter recvcount, all-gather sendcount */
	enum mode mode;
	enum place place;
	int wide;        /* integers over their whole range: SUM and PROD wrap */
};

/* One op of one rank: its buffers and where its input and output lie. */
struct run {
	const struct tcase *t;
	uint32_t seed;
	int r, n;
	size_t es, sn, rn;      /* element size, send and recv elements */
	struct ref_bufs b;      /* the allocations */
	char *send, *recv;      /* where in them the op's buffers lie */
};

static const comm_dtype_t dtypes[] = { COMM_INT32, COMM_INT64, COMM_FLOAT32, COMM_FLOAT64 };

static const char *kind_name(enum kind k)
{
	return k == AR ? "allreduce" : k == RS ? "reduce-scatter" : "all-gather";
}

static const char *describe(const struct tcase *t, int n, char *buf, size_t len)
{
	static const char *const modes[] = { "zero-copy", "staged", "staged send, zero-copy recv",
					     "zero-copy send, staged recv" };
	static const char *const places[] = { "", " in-place", " literal in-place (send == recv)" };

	snprintf(buf, len, "%s %s%s%s%s n=%d count=%zu %s%s", kind_name(t->kind),
		 t->wide ? "full-range " : "", ref_dtype_name(t->dt), t->kind == AG ? "" : " ",
		 t->kind == AG ? "" : ref_op_name(t->op), n, t->count, modes[t->mode],
		 places[t->place]);
	return buf;
}

/* Element idx of rank r's input in the case with this seed, as raw bits. */
static uint64_t gen(const struct tcase *t, uint32_t seed, int r, size_t idx)
{
	uint64_t h = ref_hash(seed, r, idx);

	if (t->wide && t->dt == COMM_INT32)
		return (uint32_t)h;
	if (t->wide && t->dt == COMM_INT64)
		return h;
	return ref_small(t->dt, h);
}

/* The reduction of element idx over ranks 0, 1, ..., n-1, in that order. */
static uint64_t fold(const struct run *x, size_t idx)
{
	uint64_t in[REF_MAX_RANKS];

	for (int q = 0; q < x->n; q++)
		in[q] = gen(x->t, x->seed, q, idx);
	return ref_fold(x->t->dt, x->t->op, in, x->n);
}

/* Whether got is want: exact, or within AVG_TOL for a float AVG. */
static int val_match(const struct tcase *t, uint64_t got, uint64_t want)
{
	return ref_near(t->dt, got, want, t->kind != AG && t->op == COMM_AVG ? AVG_TOL : 0);
}

/* Allocate and fill x's buffers as its case says; -1 on failure (printed). */
static int run_setup(comm_t *c, struct run *x, const struct tcase *t, uint32_t seed, int r,
		     int n)
{
	int szc = t->mode == ZC || t->mode == RECV_STAGED;
	int rzc = t->mode == ZC || t->mode == SEND_STAGED;
	size_t sb, rb, block;
	int rc;

	memset(x, 0, sizeof *x);
	x->t = t;
	x->seed = seed;
	x->r = r;
	x->n = n;
	x->es = comm_dtype_size(t->dt);
	x->sn = t->kind == RS ? (size_t)n * t->count : t->count;
	x->rn = t->kind == AG ? (size_t)n * t->count : t->count;
	sb = x->sn * x->es;
	rb = x->rn * x->es;
	block = t->count * x->es;
	if (t->place == OOP)
		rc = ref_bufs_alloc(c, &x->b, sb + REF_GUARD, szc, rb + REF_GUARD, rzc, r);
	else
		rc = ref_bufs_alloc(c, &x->b, (sb > rb ? sb : rb) + REF_GUARD, szc, 0, rzc, r);
	if (rc < 0)
		return -1;
	x->send = x->b.sbase;
	x->recv = t->place == OOP ? x->b.rbase : x->b.sbase;
	if (t->place == INPLACE && t->kind == RS)
		x->recv = x->b.sbase + (size_t)r * block;
	if (t->place == INPLACE && t->kind == AG)
		x->send = x->b.sbase + (size_t)r * block;
	for (size_t i = 0; i < x->sn; i++)
		ref_store(t->dt, gen(t, seed, r, i), x->send + i * x->es);
	/* a staged send: a write past its staging block lands in a canary */
	if (!szc && sb > 0 && ref_bufs_canary(c, &x->b, sb, r) < 0)
		return -1;
	return 0;
}

static comm_result_t run_post(comm_t *c, struct run *x, comm_request_t **req)
{
	const struct tcase *t = x->t;

	if (t->kind == AR)
		return comm_allreduce(c, x->send, x->recv, t->count, t->dt, t->op, req);
	if (t->kind == RS)
		return comm_reduce_scatter(c, x->send, x->recv, t->count, t->dt, t->op, req);
	return comm_allgather(c, x->send, x->recv, t->count, t->dt, req);
}

/* Check x's output, input, guards and canary; 0 when all is well. */
static int run_check(const struct run *x)
{
	const struct tcase *t = x->t;
	char what[160], g[48], w[48];
	uint64_t want, got;
	int bad = 0;

	describe(t, x->n, what, sizeof what);
	for (size_t j = 0; j < x->rn; j++) {
		if (t->kind == AR)
			want = fold(x, j);
		else if (t->kind == RS)
			want = fold(x, (size_t)x->r * t->count + j);
		else
			want = gen(t, x->seed, (int)(j / t->count), j % t->count);
		got = ref_load(t->dt, x->recv + j * x->es);
		if (!val_match(t, got, want)) {
			ref_str(t->dt, got, g, sizeof g);
			ref_str(t->dt, want, w, sizeof w);
			fprintf(stderr, "rank %d: %s: element %zu of %zu is %s, expected %s\n", x->r,
				what, j, x->rn, g, w);
			bad = 1;
			break;
		}
	}
	for (size_t i = 0; t->place == OOP && i < x->sn; i++) {
		uint64_t in = gen(t, x->seed, x->r, i);

		if (memcmp(x->send + i * x->es, &in, x->es) != 0) {
			fprintf(stderr, "rank %d: %s: input element %zu was changed\n", x->r, what,
				i);
			bad = 1;
			break;
		}
	}
	return bad | ref_bufs_check(&x->b, t->place != OOP, x->r, what);
}

/* One blocking op: 0 correct, 1 wrong values, -1 the job is out of step. */
static int run_one(comm_t *c, const struct tcase *t, uint32_t seed, int r, int n)
{
	struct run x;
	comm_result_t rc;
	char what[160];
	int bad;

	if (run_setup(c, &x, t, seed, r, n) < 0) {
		ref_bufs_free(c, &x.b);
		return -1;
	}
	rc = run_post(c, &x, NULL);
	if (rc != COMM_OK) {
		fprintf(stderr, "rank %d: %s: %s: %s\n", r, describe(t, n, what, sizeof what),
			comm_result_name(rc), comm_last_error(c));
		ref_bufs_free(c, &x.b);
		return -1;
	}
	bad = run_check(&x);
	ref_bufs_free(c, &x.b);
	return bad;
}

/* --- plans: lists of cases run by one job -------------------------------- */

static void add(struct th_plan *p, enum kind k, comm_dtype_t dt, comm_redop_t op, size_t count,
		enum mode m, enum place pl, int wide)
{
	p->case_size = sizeof(struct tcase);
	*(struct tcase *)th_plan_add(p) = (struct tcase){ k, dt, op, count, m, pl, wide };
}

static int next_job;

static void job_name(char *buf, size_t len, const char *tag)
{
	snprintf(buf, len, "coll-%d-%s", ++next_job, tag);
}

/* th_plan's view of a case: run and described as a struct tcase. */
static int run_any(comm_t *c, const void *t, uint32_t seed, int r, int n)
{
	return run_one(c, t, seed, r, n);
}

static const char *describe_any(const void *t, int n, char *buf, size_t len)
{
	return describe(t, n, buf, len);
}

/* Run every case of p in one job of p->world ranks; print a line a case. */
static void run_plan(const struct th_daemon *d, struct th_plan *p)
{
	p->seed = (uint32_t)next_job * 4096 + 1;
	p->seed_step = 1;
	job_name(p->job, sizeof p->job, "plan");
	p->run = run_any;
	p->describe = describe_any;
	th_plan_run(d, p);
}

/* Every dtype x op for all-reduce and reduce-scatter, all-gather per dtype. */
static void test_all_types(const struct th_daemon *d)
{
	static const size_t small[] = { 0, 1, 7 };
	struct th_plan p = { .title = "every dtype x op, n=4, zero-copy", .world = 4 };

	for (int k = AR; k <= RS; k++) {
		for (size_t i = 0; i < sizeof dtypes / sizeof dtypes[0]; i++) {
			for (size_t o = 0; o < REF_NREDOPS; o++) {
				for (size_t s = 0; s < sizeof small / sizeof small[0]; s++)
					add(&p, (enum kind)k, dtypes[i], ref_redops[o], small[s],
					    ZC, OOP, 0);
				add(&p, (enum kind)k, dtypes[i], ref_redops[o], BIG, ZC, OOP, 0);
			}
		}
	}
	for (size_t i = 0; i < sizeof dtypes / sizeof dtypes[0]; i++) {
		for (size_t s = 0; s < sizeof small / sizeof small[0]; s++)
			add(&p, AG, dtypes[i], COMM_SUM, small[s], ZC, OOP, 0);
		add(&p, AG, dtypes[i], COMM_SUM, BIG, ZC, OOP, 0);
	}
	/* integers over their whole range: wrapping SUM and PROD, signed MIN and MAX */
	for (int k = AR; k <= RS; k++)
		for (size_t i = 0; i < 2; i++)
			for (size_t o = 0; o < 4; o++)
				add(&p, (enum kind)k, dtypes[i], ref_redops[o], 2500, ZC, OOP, 1);
	/* between the loop thread's limit and the big count */
	add(&p, AR, COMM_FLOAT64, COMM_MAX, 70001, ZC, OOP, 0);
	add(&p, RS, COMM_INT32, COMM_AVG, 70001, ZC, OOP, 0);
	add(&p, AG, COMM_FLOAT32, COMM_SUM, 70001, ZC, OOP, 0);
	run_plan(d, &p);
}

/* A few combinations with 1, 2 and 3 ranks. */
static void test_other_sizes(const struct th_daemon *d)
{
	static const struct {
		enum kind k;
		comm_dtype_t dt;
		comm_redop_t op;
	} combos[] = {
		{ AR, COMM_FLOAT32, COMM_SUM }, { AR, COMM_INT32, COMM_AVG },
		{ AR, COMM_FLOAT64, COMM_AVG }, { AR, COMM_INT64, COMM_PROD },
		{ RS, COMM_FLOAT32, COMM_SUM }, { RS, COMM_INT32, COMM_AVG },
		{ RS, COMM_INT64, COMM_MIN },   { AG, COMM_FLOAT64, COMM_SUM },
		{ AG, COMM_INT32, COMM_SUM },
	};
	static const size_t counts[] = { 1, 7, BIG };
	static const char *const titles[] = { "", "a few combos, n=1", "a few combos, n=2",
					      "a few combos, n=3" };

	for (int n = 1; n <= 3; n++) {
		struct th_plan p = { .title = titles[n], .world = n };

		for (size_t i = 0; i < sizeof combos / sizeof combos[0]; i++)
			for (size_t s = 0; s < sizeof counts / sizeof counts[0]; s++)
				if (n > 1 || counts[s] != BIG)
					add(&p, combos[i].k, combos[i].dt, combos[i].op, counts[s],
					    ZC, OOP, 0);
		run_plan(d, &p);
	}
}

/* The in-place layouts of comm.h, and send == recv for all three ops. */
static void test_in_place(const struct th_daemon *d)
{
	static const struct {
		comm_dtype_t dt;
		comm_redop_t op;
		int big;
	} combos[] = {
		{ COMM_FLOAT32, COMM_SUM, 1 },
		{ COMM_INT64, COMM_MAX, 0 },
		{ COMM_FLOAT64, COMM_AVG, 1 },
		{ COMM_INT32, COMM_PROD, 0 },
	};
	static const size_t counts[] = { 1, 7, BIG };

	for (int n = 4; n >= 3; n--) {
		struct th_plan p = { .title = n == 4 ? "in place, n=4, zero-copy"
						  : "in place, n=3, zero-copy",
				  .world = n };

		for (size_t i = 0; i < sizeof combos / sizeof combos[0]; i++) {
			for (size_t s = 0; s < sizeof counts / sizeof counts[0]; s++) {
				comm_dtype_t dt = combos[i].dt;
				comm_redop_t op = combos[i].op;
				size_t cnt = counts[s];

				if (cnt == BIG && !combos[i].big)
					continue;
				add(&p, AR, dt, op, cnt, ZC, INPLACE, 0);
				add(&p, RS, dt, op, cnt, ZC, INPLACE, 0);
				add(&p, RS, dt, op, cnt, ZC, LITERAL, 0);
				add(&p, AG, dt, op, cnt, ZC, INPLACE, 0);
				add(&p, AG, dt, op, cnt, ZC, LITERAL, 0);
			}
		}
		run_plan(d, &p);
	}
}

/* Plain malloc'd buffers, staged through shared memory by the library. */
static void test_staged(const struct th_daemon *d)
{
	static const size_t counts[] = { 7, BIG };
	struct th_plan p = { .title = "staged (malloc) buffers, n=4", .world = 4 };

	for (size_t s = 0; s < sizeof counts / sizeof counts[0]; s++) {
		size_t cnt = counts[s];

		for (int k = AR; k <= AG; k++) {
			for (int m = STAGED; m <= RECV_STAGED; m++)
				add(&p, (enum kind)k, COMM_FLOAT32, COMM_SUM, cnt, (enum mode)m,
				    OOP, 0);
			add(&p, (enum kind)k, COMM_FLOAT32, COMM_SUM, cnt, STAGED, INPLACE, 0);
			if (k != AR)
				add(&p, (enum kind)k, COMM_FLOAT32, COMM_SUM, cnt, STAGED, LITERAL,
				    0);
		}
	}
	add(&p, AR, COMM_INT64, COMM_MAX, 7, STAGED, OOP, 0);
	add(&p, RS, COMM_FLOAT64, COMM_AVG, 7, STAGED, OOP, 0);
	add(&p, RS, COMM_INT32, COMM_MIN, 7, STAGED, INPLACE, 0);
	add(&p, AG, COMM_INT64, COMM_SUM, 7, STAGED, INPLACE, 0);
	run_plan(d, &p);
}

/*
 * Staging segments kept: two ranks all-reduce malloc'd buffers past the
 * 64 MiB first segment, so each op stages through a segment of its own.
 * After each op (a barrier: both ranks are past it), rank 0 counts the
 * segments commd maps: with COMM_KEEP_MB at its default, the op's
 * segments stay for the next op of that size (no growth from op to op);
 * at 0 each is given back at once; at 100, one of an out-of-place op's two
 * 96 MiB segments; and a larger op first gives back kept ones too small.
 * After each op the rank takes a small comm_mem_alloc block and keeps it:
 * it must not land in (and pin) a segment kept for the next op.
 */
#define KEEP_COUNT (24u << 20)  /* float32: 96 MiB */
#define KEEP_LARGER (40u << 20) /* float32: 160 MiB */

struct keep_case {
	const char *keep_mb;    /* COMM_KEEP_MB; NULL: unset */
	int oop;
	int maps[3];            /* commd's memfd maps after ops of KEEP_COUNT, KEEP_COUNT, KEEP_LARGER */
};

static int keep_step(comm_t *c, const struct keep_case *k, size_t count, int r, int n,
		     const struct th_daemon *d, int want)
{
	float *x = malloc(count * sizeof *x), *y = k->oop ? malloc(count * sizeof *y) : x;
	int bad = 0, maps;

	if (!x || !y)
		return 1;
	for (size_t i = 0; i < count; i += 4096)
		x[i] = (float)(r + 1);
	if (comm_allreduce(c, x, y, count, COMM_FLOAT32, COMM_SUM, NULL) != COMM_OK ||
	    comm_barrier(c, NULL) != COMM_OK)
		bad = 1;
	for (size_t i = 0; i < count && !bad; i += 4096)
		bad = y[i] != (float)(n * (n + 1) / 2);
	if (r == 0 && !bad && (maps = th_count_memfd_maps(d->pid)) != want) {
		fprintf(stderr, "COMM_KEEP_MB %s, %s, %zu MiB: commd maps %d segments, want %d\n",
			k->keep_mb ? k->keep_mb : "unset", k->oop ? "out of place" : "in place",
			count >> 18, maps, want);
		bad = 1;
	}
	bad |= comm_barrier(c, NULL) != COMM_OK;
	bad |= comm_mem_alloc(c, 4096) == NULL; /* freed at comm_finalize */
	if (k->oop)
		free(y);
	free(x);
	return bad;
}

static const struct th_daemon *keep_daemon;

static int rank_keep(int r, int n, void *arg)
{
	const struct keep_case *k = arg;
	comm_t *c;
	int bad;

	if (th_join(&c, r, n) < 0)
		return 1;
	/* the first segment, always kept, is the ring's; without one (COMM_RING=0) make it */
	if (!comm_mem_alloc(c, 4096))
		return th_bail(c);
	bad = keep_step(c, k, KEEP_COUNT, r, n, keep_daemon, k->maps[0]) ||
	      keep_step(c, k, KEEP_COUNT, r, n, keep_daemon, k->maps[1]) ||
	      keep_step(c, k, KEEP_LARGER, r, n, keep_daemon, k->maps[2]);
	return bad ? th_bail(c) : th_leave(c, r);
}

static void test_keep(const struct th_daemon *d)
{
	/* two ranks: each maps its first segment, and what it keeps */
	static const struct keep_case cases[] = {
		{ NULL, 0, { 4, 4, 4 } },   /* one 96 MiB kept; the 160 MiB one replaces it */
		{ NULL, 1, { 6, 6, 6 } },   /* two kept; too small for 160 MiB: two of those instead */
		{ "0", 0, { 2, 2, 2 } },    /* none kept */
		{ "100", 1, { 4, 4, 2 } },  /* one of two; 160 MiB is past 100 MiB */
	};
	char job[64];

	keep_daemon = d;
	for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
		const struct keep_case *k = &cases[i];
		int failed;

		if (k->keep_mb)
			setenv("COMM_KEEP_MB", k->keep_mb, 1);
		job_name(job, sizeof job, "keep");
		failed = th_run_ranks(d, job, 2, rank_keep, (void *)k);
		unsetenv("COMM_KEEP_MB");
		CHECK(failed == 0, "staging segments kept, COMM_KEEP_MB %s, %s: %d ranks failed",
		      k->keep_mb ? k->keep_mb : "unset", k->oop ? "out of place" : "in place",
		      failed);
		printf("%s: staged all-reduces of 96, 96, 160 MiB, %s, COMM_KEEP_MB %s: commd maps "
		       "%d, %d, %d segments after them\n",
		       failed ? "FAIL" : "ok", k->oop ? "out of place" : "in place",
		       k->keep_mb ? k->keep_mb : "unset", k->maps[0], k->maps[1], k->maps[2]);
	}
}

/* --- the reference workload ----------------------------------------------- */

static int check_floats(int r, const char *what, const float *got, const float *want, int n)
{
	for (int i = 0; i < n; i++) {
		if (got[i] != want[i]) {
			fprintf(stderr, "rank %d: %s: element %d is %g, expected %g\n", r, what, i,
				(double)got[i], (double)want[i]);
			return 1;
		}
	}
	return 0;
}

static int rank_reference(int r, int n, void *arg)
{
	static const float want[4] = { 6, 10, 14, 18 };
	float *in, *out, *one, mine[4];
	comm_result_t rc;
	comm_t *c;
	int bad = 0;

	if (th_join(&c, r, n) < 0)
		return 1;
	in = comm_mem_alloc(c, sizeof want);
	out = comm_mem_alloc(c, sizeof want);
	one = comm_mem_alloc(c, sizeof *one);
	if (!in || !out || !one) {
		fprintf(stderr, "rank %d: comm_mem_alloc: %s\n", r, comm_last_error(c));
		return th_bail(c);
	}
	for (int i = 0; i < 4; i++)
		mine[i] = in[i] = (float)(r + i);
	rc = comm_allreduce(c, in, out, 4, COMM_FLOAT32, COMM_SUM, NULL);
	if (rc != COMM_OK) {
		fprintf(stderr, "rank %d: all-reduce: %s\n", r, comm_result_name(rc));
		return th_bail(c);
	}
	bad |= check_floats(r, "all-reduce", out, want, 4);
	one[0] = -1;
	rc = comm_reduce_scatter(c, in, one, 1, COMM_FLOAT32, COMM_SUM, NULL);
	if (rc != COMM_OK) {
		fprintf(stderr, "rank %d: reduce-scatter: %s\n", r, comm_result_name(rc));
		return th_bail(c);
	}
	bad |= check_floats(r, "reduce-scatter", one, &want[r], 1);
	memset(out, 0, sizeof want);
	rc = comm_allgather(c, one, out, 1, COMM_FLOAT32, NULL);
	if (rc != COMM_OK) {
		fprintf(stderr, "rank %d: all-gather: %s\n", r, comm_result_name(rc));
		return th_bail(c);
	}
	bad |= check_floats(r, "all-gather", out, want, 4);
	bad |= check_floats(r, "input after the ops", in, mine, 4);
	return th_leave(c, r) | bad;
}

static void test_reference(const struct th_daemon *d)
{
	char job[64];
	int failed;

	job_name(job, sizeof job, "reference");
	failed = th_run_ranks(d, job, 4, rank_reference, NULL);
	CHECK(failed == 0, "reference workload: %d ranks failed", failed);
	printf("%s: reference workload n=4 float32: all-reduce sum -> [6,10,14,18], "
	       "reduce-scatter -> [6,10,14,18][r], all-gather -> [6,10,14,18]\n",
	       failed ? "FAIL" : "ok");
}

/* --- many outstanding requests -------------------------------------------- */

enum { BY_WAIT, BY_TEST, BY_WAIT_STAGED };

static int rank_outstanding(int r, int n, void *arg)
{
	int how = *(const int *)arg, left = NREQ, bad = 0;
	struct tcase *t = calloc(NREQ, sizeof *t);
	struct run *x = calloc(NREQ, sizeof *x);
	comm_request_t *req[NREQ];
	comm_result_t rc;
	comm_t *c;

	if (!t || !x || th_join(&c, r, n) < 0)
		return 1;
	for (int k = 0; k < NREQ; k++) {
		t[k] = (struct tcase){ AR, dtypes[k % 4], ref_redops[k % 5],
				       1 + (size_t)k * 397 % 5000,
				       how == BY_WAIT_STAGED ? STAGED : ZC, OOP, 0 };
		if (run_setup(c, &x[k], &t[k], 900 + (uint32_t)k, r, n) < 0)
			return th_bail(c);
		rc = run_post(c, &x[k], &req[k]);
		if (rc != COMM_OK) {
			fprintf(stderr, "rank %d: posting op %d: %s\n", r, k, comm_result_name(rc));
			return th_bail(c);
		}
	}
	if (how != BY_TEST) {
		for (int k = 0; k < NREQ; k++) {
			rc = comm_wait(req[k], -1);
			if (rc != COMM_OK) {
				fprintf(stderr, "rank %d: comm_wait op %d: %s\n", r, k,
					comm_result_name(rc));
				return th_bail(c);
			}
		}
	} else {
		/* newest first: completing one answers the older ones too */
		while (left > 0) {
			int progress = 0;

			for (int k = NREQ - 1; k >= 0; k--) {
				int done = 0;

				if (!req[k])
					continue;
				rc = comm_test(req[k], &done);
				if (rc != COMM_OK) {
					fprintf(stderr, "rank %d: comm_test op %d: %s\n", r, k,
						comm_result_name(rc));
					return th_bail(c);
				}
				if (done) {
					req[k] = NULL;
					left--;
					progress = 1;
				}
			}
			if (!progress)
				usleep(200);
		}
	}
	for (int k = 0; k < NREQ; k++) {
		bad |= run_check(&x[k]);
		ref_bufs_free(c, &x[k].b);
	}
	free(x);
	free(t);
	return th_leave(c, r) | bad;
}

/*
 * Rank 0 posts first and the others wait for its flag (shared memory) before
 * they post: comm_wait with a timeout and comm_test must say "in progress"
 * and leave the request valid.
 */
static int rank_timeout(int r, int n, void *arg)
{
	struct tcase t = { AR, COMM_FLOAT32, COMM_SUM, 1000, ZC, OOP, 0 };
	int *posted = arg, bad = 0, done = -1;
	comm_request_t *req;
	struct run x;
	comm_result_t rc;
	comm_t *c;

	if (th_join(&c, r, n) < 0)
		return 1;
	if (run_setup(c, &x, &t, 77, r, n) < 0)
		return th_bail(c);
	while (r != 0 && !__atomic_load_n(posted, __ATOMIC_ACQUIRE))
		usleep(1000);
	rc = run_post(c, &x, &req);
	if (rc != COMM_OK) {
		fprintf(stderr, "rank %d: posting: %s\n", r, comm_result_name(rc));
		return th_bail(c);
	}
	for (int ms = 0; r == 0 && req && ms <= 50; ms += 50) {
		rc = comm_wait(req, ms);
		if (rc != COMM_INPROGRESS) {
			fprintf(stderr, "rank 0: comm_wait(req, %d) before the others posted: %s, "
					"expected COMM_INPROGRESS\n",
				ms, comm_result_name(rc));
			bad = 1;
			req = NULL; /* it finished, so it was freed */
		}
	}
	if (r == 0 && req) {
		rc = comm_test(req, &done);
		if (rc != COMM_OK || done != 0) {
			fprintf(stderr, "rank 0: comm_test before the others posted: %s, done %d, "
					"expected COMM_OK and 0\n",
				comm_result_name(rc), done);
			bad = 1;
			if (done)
				req = NULL;
		}
	}
	if (r == 0)
		__atomic_store_n(posted, 1, __ATOMIC_RELEASE);
	if (req) {
		rc = comm_wait(req, -1);
		if (rc != COMM_OK) {
			fprintf(stderr, "rank %d: comm_wait: %s\n", r, comm_result_name(rc));
			return th_bail(c);
		}
	}
	bad |= run_check(&x);
	ref_bufs_free(c, &x.b);
	return th_leave(c, r) | bad;
}

static void test_outstanding(const struct th_daemon *d)
{
	static const char *const names[] = { "comm_wait in posting order", "comm_test polling",
					     "staged buffers, comm_wait" };
	char job[64];
	int failed, *posted;

	for (int how = BY_WAIT; how <= BY_WAIT_STAGED; how++) {
		job_name(job, sizeof job, "outstanding");
		failed = th_run_ranks(d, job, 4, rank_outstanding, &how);
		CHECK(failed == 0, "%d outstanding, %s: %d ranks failed", NREQ, names[how], failed);
		printf("%s: %d outstanding all-reduces (every dtype and op) n=4, %s\n",
		       failed ? "FAIL" : "ok", NREQ, names[how]);
	}
	posted = mmap(NULL, sizeof *posted, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS,
		      -1, 0);
	REQUIRE(posted != MAP_FAILED, "mmap");
	*posted = 0;
	job_name(job, sizeof job, "timeout");
	failed = th_run_ranks(d, job, 4, rank_timeout, posted);
	munmap(posted, sizeof *posted);
	CHECK(failed == 0, "comm_wait timeout 0: %d ranks failed", failed);
	printf("%s: comm_wait(req, 0), comm_wait(req, 50) and comm_test before the other ranks "
	       "post: in progress, then completes\n",
	       failed ? "FAIL" : "ok");
}

/*
 * Async ops on one malloc'd (staged) buffer keep posting order, as on
 * registered memory: two in-place all-reduces of x, a broadcast of x and an
 * all-reduce (max) of x into y, waited for newest first; then two
 * all-reduces from different inputs into the same z, waited for newest
 * first (z must hold the second's). int32, so every value is exact:
 * rank r's x[i] = r + 1 + i % 7.
 */
#define CHAIN_COUNT 4099

static int rank_chained(int r, int n, void *arg)
{
	int32_t *x = malloc(CHAIN_COUNT * sizeof *x), *y = malloc(CHAIN_COUNT * sizeof *y);
	int32_t *z = malloc(CHAIN_COUNT * sizeof *z), *in2 = malloc(CHAIN_COUNT * sizeof *in2);
	comm_request_t *req[6];
	comm_result_t rc = COMM_OK;
	int bad = 0;
	comm_t *c;

	(void)arg;
	if (!x || !y || !z || !in2 || th_join(&c, r, n) < 0)
		return 1;
	for (int i = 0; i < CHAIN_COUNT; i++) {
		x[i] = r + 1 + i % 7;
		in2[i] = 1000 * (r + 1);
	}
	if (comm_allreduce(c, x, x, CHAIN_COUNT, COMM_INT32, COMM_SUM, &req[0]) ||
	    comm_allreduce(c, x, x, CHAIN_COUNT, COMM_INT32, COMM_SUM, &req[1]) ||
	    comm_broadcast(c, x, x, CHAIN_COUNT, COMM_INT32, 1, &req[2]) ||
	    comm_allreduce(c, x, y, CHAIN_COUNT, COMM_INT32, COMM_MAX, &req[3]) ||
	    comm_allreduce(c, x, z, CHAIN_COUNT, COMM_INT32, COMM_SUM, &req[4]) ||
	    comm_allreduce(c, in2, z, CHAIN_COUNT, COMM_INT32, COMM_SUM, &req[5])) {
		fprintf(stderr, "rank %d: posting: %s\n", r, comm_last_error(c));
		return th_bail(c);
	}
	for (int k = 5; k >= 0; k--)
		if ((rc = comm_wait(req[k], -1)) != COMM_OK) {
			fprintf(stderr, "rank %d: op %d: %s: %s\n", r, k, comm_result_name(rc),
				comm_last_error(c));
			return th_bail(c);
		}
	for (int i = 0; i < CHAIN_COUNT && !bad; i++) {
		int32_t once = n * (n + 1) / 2 + n * (i % 7), twice = n * once;

		if (x[i] != twice || y[i] != twice || z[i] != 1000 * n * (n + 1) / 2) {
			fprintf(stderr, "rank %d: element %d: x %d, y %d (want %d), z %d (want %d)\n",
				r, i, x[i], y[i], twice, z[i], 1000 * n * (n + 1) / 2);
			bad = 1;
		}
	}
	free(x);
	free(y);
	free(z);
	free(in2);
	return th_leave(c, r) | bad;
}

/*
 * The same last-writer rule where the two answers come on two paths: 256
 * all-reduces fill the submission ring, so broadcast A into a malloc'd
 * buffer goes over the socket; once the ring has room, broadcast B into
 * the same buffer goes through it. commd answers A first, but rank 0,
 * asleep meanwhile, finds B's answer in the ring before it reads A's:
 * B's comm_test polled to done, then A's wait, must leave B's values
 * (rank 1 sends 111, then 222 from another buffer).
 */
#define WAW_FILL 256
#define WAW_COUNT 16

static int rank_two_paths(int r, int n, void *arg)
{
	int32_t *reg, *out = malloc(WAW_COUNT * sizeof *out), *out2;
	comm_request_t *fill[WAW_FILL], *a, *b;
	int bad = 0, done = 0, after_b;
	comm_t *c;

	(void)arg;
	if (!out || th_join(&c, r, n) < 0)
		return 1;
	out2 = r == 1 ? malloc(WAW_COUNT * sizeof *out2) : out;
	if (!(reg = comm_mem_alloc(c, WAW_FILL * sizeof *reg)) || !out2)
		return th_bail(c);
	for (int i = 0; i < WAW_COUNT; i++) {
		out[i] = r == 1 ? 111 : -1;
		out2[i] = r == 1 ? 222 : -1;
	}
	for (int k = 0; k < WAW_FILL; k++) {
		reg[k] = 1;
		if (comm_allreduce(c, reg + k, reg + k, 1, COMM_INT32, COMM_SUM, &fill[k]))
			return th_bail(c);
	}
	if (r == 1)
		usleep(300 * 1000); /* rank 0's ring stays full while it posts A */
	if (comm_broadcast(c, out, out, WAW_COUNT, COMM_INT32, 1, &a))
		return th_bail(c);
	if (r == 0) {
		usleep(200 * 1000);
		(void)comm_test(fill[0], &done); /* reaps the ring: B finds a slot */
		if (done)
			fill[0] = NULL;
	}
	if (comm_broadcast(c, out2, out2, WAW_COUNT, COMM_INT32, 1, &b))
		return th_bail(c);
	if (r == 0)
		usleep(500 * 1000); /* both answered meanwhile: B's waits in the ring, A's on the socket */
	for (done = 0; !done;)
		if (comm_test(b, &done) != COMM_OK)
			return th_bail(c);
	after_b = out2[0];
	if (comm_wait(a, -1) != COMM_OK)
		return th_bail(c);
	for (int k = 0; k < WAW_FILL; k++)
		if (fill[k] && comm_wait(fill[k], -1) != COMM_OK)
			return th_bail(c);
	for (int i = 0; i < WAW_COUNT && r == 0; i++)
		bad |= out[i] != 222;
	if (bad || (r == 0 && after_b != 222)) {
		fprintf(stderr, "rank 0: after B's test %d, after A's wait %d (want 222 both)\n",
			after_b, out[0]);
		bad = 1;
	}
	if (r == 1)
		free(out2);
	free(out);
	return th_leave(c, r) | bad;
}

static void test_chained(const struct th_daemon *d)
{
	char job[64];
	int failed;

	job_name(job, sizeof job, "chained");
	failed = th_run_ranks(d, job, 4, rank_chained, NULL);
	CHECK(failed == 0, "async ops chained on malloc'd buffers: %d ranks failed", failed);
	printf("%s: async ops on one malloc'd buffer, waited for newest first, n=4: each reads "
	       "the one before's result, the last writer wins\n", failed ? "FAIL" : "ok");
	job_name(job, sizeof job, "two-paths");
	failed = th_run_ranks(d, job, 2, rank_two_paths, NULL);
	CHECK(failed == 0, "two broadcasts into one malloc'd buffer, socket then ring: %d ranks "
	      "failed", failed);
	printf("%s: broadcast A over the socket (ring full), then B through the ring, into one "
	       "malloc'd buffer: B's values stay\n", failed ? "FAIL" : "ok");
}

/* --- two jobs on one daemon ----------------------------------------------- */

struct iter_arg {
	int iters;
	uint32_t salt;
};

static int rank_iters(int r, int n, void *arg)
{
	const struct iter_arg *a = arg;
	comm_t *c;
	int bad = 0;

	if (th_join(&c, r, n) < 0)
		return 1;
	for (int it = 0; it < a->iters; it++) {
		struct tcase t = { AR, dtypes[it % 4], ref_redops[it % 5],
				   1 + (size_t)it * 7919 % 3000, ZC, OOP, 0 };
		int rc = run_one(c, &t, a->salt + (uint32_t)it, r, n);

		if (rc < 0)
			return th_bail(c);
		bad |= rc;
	}
	return th_leave(c, r) | bad;
}

static void test_two_jobs(const struct th_daemon *d)
{
	struct iter_arg a = { 50, 5000 }, b = { 50, 6000 };
	struct th_ranks ja, jb;
	char na[64], nb[64];
	int fa, fb;

	job_name(na, sizeof na, "A");
	job_name(nb, sizeof nb, "B");
	fa = th_ranks_start(&ja, d, na, 4, rank_iters, &a);
	REQUIRE(fa == 0, "start job A");
	fb = th_ranks_start(&jb, d, nb, 3, rank_iters, &b);
	REQUIRE(fb == 0, "start job B");
	fa = th_ranks_wait(&ja);
	fb = th_ranks_wait(&jb);
	CHECK(fa == 0 && fb == 0, "two jobs: %d ranks of A, %d ranks of B failed", fa, fb);
	printf("%s: two jobs at once: A (n=4) and B (n=3), 50 all-reduces each\n",
	       fa || fb ? "FAIL" : "ok");
}

/* --- comm_mem_alloc and comm_mem_free ------------------------------------- */

#define NALLOC 40
#define MAX_ALLOC ((size_t)100 << 20)
#define STAMP 64

struct blk {
	char *p;
	size_t len;
	unsigned char tag;
};

static size_t rand_size(uint64_t *s)
{
	unsigned bits = (unsigned)((*s = ref_mix(*s)) % 28);
	size_t sz = 1 + (size_t)((*s = ref_mix(*s)) & (((uint64_t)1 << bits) - 1));

	return sz > MAX_ALLOC ? MAX_ALLOC : sz;
}

/* Write b's tag over its first and last STAMP bytes; or check they hold it. */
static int stamp(const struct blk *b, int check)
{
	size_t n = b->len < STAMP ? b->len : STAMP;

	if (!check) {
		memset(b->p, b->tag, n);
		memset(b->p + b->len - n, b->tag, n);
		return 0;
	}
	return ref_all_bytes(b->p, n, b->tag) && ref_all_bytes(b->p + b->len - n, n, b->tag);
}

/* An all-reduce from the start of b into its end (int32 or float32 sum). */
static int block_op(comm_t *c, const struct blk *b, int i, int r, int n)
{
	struct tcase t = { AR, i % 2 ? COMM_FLOAT32 : COMM_INT32, COMM_SUM, 0, ZC, OOP, 0 };
	size_t words = b->len / 4;
	struct run x;
	comm_result_t rc;

	t.count = b->len == MAX_ALLOC ? (size_t)1 << 20 : words / 2 < 16384 ? words / 2 : 16384;
	memset(&x, 0, sizeof x);
	x.t = &t;
	x.seed = 3000 + (uint32_t)i;
	x.r = r;
	x.n = n;
	x.es = 4;
	x.sn = x.rn = t.count;
	x.send = b->p;
	x.recv = b->p + (words - t.count) * 4;
	for (size_t k = 0; k < t.count; k++)
		ref_store(t.dt, gen(&t, x.seed, r, k), x.send + 4 * k);
	rc = run_post(c, &x, NULL);
	if (rc != COMM_OK) {
		fprintf(stderr, "rank %d: all-reduce in block %d (%zu bytes): %s: %s\n", r, i,
			b->len, comm_result_name(rc), comm_last_error(c));
		return -1;
	}
	return run_check(&x);
}

/* Free every block in a random order, checking the others stay intact. */
static int free_all(comm_t *c, struct blk *b, uint64_t *s, int r)
{
	int order[NALLOC], bad = 0;

	for (int i = 0; i < NALLOC; i++)
		order[i] = i;
	for (int i = NALLOC - 1; i > 0; i--) {
		int j = (int)((*s = ref_mix(*s)) % (uint64_t)(i + 1)), tmp = order[i];

		order[i] = order[j];
		order[j] = tmp;
	}
	for (int i = 0; i < NALLOC; i++) {
		comm_result_t rc;

		if (!b[order[i]].p)
			continue;
		rc = comm_mem_free(c, b[order[i]].p);
		if (rc != COMM_OK) {
			fprintf(stderr, "rank %d: comm_mem_free of block %d: %s\n", r, order[i],
				comm_result_name(rc));
			bad = 1;
		}
		b[order[i]].p = NULL;
		for (int k = 0; k < NALLOC; k++) {
			if (b[k].p && !stamp(&b[k], 1)) {
				fprintf(stderr, "rank %d: block %d changed when block %d was freed\n",
					r, k, order[i]);
				bad = 1;
			}
		}
	}
	return bad;
}

static int rank_mem(int r, int n, void *arg)
{
	struct blk b[NALLOC];
	uint64_t s = 12345; /* the same on every rank: their op counts must agree */
	comm_result_t rc;
	char *heap;
	comm_t *c;
	int bad = 0, local;

	if (th_join(&c, r, n) < 0)
		return 1;
	for (int round = 0; round < 2; round++) {
		for (int i = 0; i < NALLOC; i++) {
			b[i].len = i == 0 ? 1 : i == 1 ? MAX_ALLOC : rand_size(&s);
			b[i].tag = (unsigned char)(round * NALLOC + i + 1);
			b[i].p = comm_mem_alloc(c, b[i].len);
			if (!b[i].p) {
				fprintf(stderr, "rank %d: comm_mem_alloc(%zu): %s\n", r, b[i].len,
					comm_last_error(c));
				return th_bail(c);
			}
			stamp(&b[i], 0);
		}
		for (int i = 0; i < NALLOC; i++) {
			for (int k = i + 1; k < NALLOC; k++) {
				if (b[i].p < b[k].p + b[k].len && b[k].p < b[i].p + b[i].len) {
					fprintf(stderr, "rank %d: blocks %d and %d overlap\n", r, i,
						k);
					bad = 1;
				}
			}
			if (!stamp(&b[i], 1)) {
				fprintf(stderr, "rank %d: block %d (%zu bytes) was overwritten\n",
					r, i, b[i].len);
				bad = 1;
			}
		}
		for (int i = 0; i < NALLOC; i++) {
			if (b[i].len < 8)
				continue;
			int rc2 = block_op(c, &b[i], round * NALLOC + i, r, n);

			if (rc2 < 0)
				return th_bail(c);
			bad |= rc2;
			stamp(&b[i], 0);
		}
		if (round == 1)
			break;
		bad |= free_all(c, b, &s, r);
	}
	/* pointers that comm_mem_alloc did not return */
	heap = malloc(16);
	rc = comm_mem_free(c, heap);
	bad |= rc != COMM_ERR_INVALID_ARG;
	if (rc != COMM_ERR_INVALID_ARG)
		fprintf(stderr, "rank %d: comm_mem_free(malloc'd): %s\n", r, comm_result_name(rc));
	free(heap);
	rc = comm_mem_free(c, &local);
	bad |= rc != COMM_ERR_INVALID_ARG;
	if (rc != COMM_ERR_INVALID_ARG)
		fprintf(stderr, "rank %d: comm_mem_free(&local): %s\n", r, comm_result_name(rc));
	rc = comm_mem_free(c, b[1].p + 4096);
	bad |= rc != COMM_ERR_INVALID_ARG;
	if (rc != COMM_ERR_INVALID_ARG)
		fprintf(stderr, "rank %d: comm_mem_free(inside a block): %s\n", r,
			comm_result_name(rc));
	rc = comm_mem_free(c, b[2].p);
	if (rc == COMM_OK)
		rc = comm_mem_free(c, b[2].p);
	b[2].p = NULL;
	bad |= rc != COMM_ERR_INVALID_ARG;
	if (rc != COMM_ERR_INVALID_ARG)
		fprintf(stderr, "rank %d: comm_mem_free twice: %s\n", r, comm_result_name(rc));
	bad |= free_all(c, b, &s, r);
	return th_leave(c, r) | bad;
}

static void test_mem(const struct th_daemon *d)
{
	struct timespec t0;
	char job[64];
	int failed;

	job_name(job, sizeof job, "mem");
	clock_gettime(CLOCK_MONOTONIC, &t0);
	failed = th_run_ranks(d, job, 4, rank_mem, NULL);
	CHECK(failed == 0, "comm_mem_alloc: %d ranks failed", failed);
	printf("%s: comm_mem_alloc n=4: 2 x %d blocks of 1 B .. 100 MB, freed in random order, "
	       "an all-reduce in each; comm_mem_free of foreign pointers and twice (%.1f s)\n",
	       failed ? "FAIL" : "ok", NALLOC, th_secs_since(&t0));
}

/* --- argument errors ------------------------------------------------------- */

static int want_invalid(const comm_t *c, int r, const char *what, comm_result_t rc)
{
	if (rc != COMM_ERR_INVALID_ARG) {
		fprintf(stderr, "rank %d: %s: %s, expected COMM_ERR_INVALID_ARG\n", r, what,
			comm_result_name(rc));
		return 1;
	}
	if (c && !*comm_last_error(c)) {
		fprintf(stderr, "rank %d: %s: comm_last_error is empty\n", r, what);
		return 1;
	}
	return 0;
}

#define WANT_INVALID(cm, call) (bad |= want_invalid(cm, r, #call, call))

static int rank_args(int r, int n, void *arg)
{
	static const struct tcase after[] = {
		{ AR, COMM_FLOAT32, COMM_SUM, 7, ZC, OOP, 0 },
		{ RS, COMM_INT64, COMM_MAX, 7, ZC, OOP, 0 },
		{ AG, COMM_FLOAT64, COMM_SUM, 7, ZC, OOP, 0 },
		{ AR, COMM_INT32, COMM_SUM, 7, STAGED, OOP, 0 },
	};
	comm_request_t *req = NULL;
	float *s, *d, heap[64] = { 0 };
	comm_t *c;
	int bad = 0, done;

	if (th_join(&c, r, n) < 0)
		return 1;
	s = comm_mem_alloc(c, 64 * sizeof *s);
	d = comm_mem_alloc(c, 64 * sizeof *d);
	if (!s || !d)
		return th_bail(c);
	memset(s, 0, 64 * sizeof *s);
	/* a different number of refused calls on each rank: none reaches the job */
	for (int rep = 0; rep <= r; rep++) {
		WANT_INVALID(c, comm_allreduce(c, s, d, 4, (comm_dtype_t)99, COMM_SUM, NULL));
		WANT_INVALID(c, comm_allreduce(c, s, d, 4, (comm_dtype_t)-1, COMM_SUM, NULL));
		WANT_INVALID(c, comm_allreduce(c, s, d, 4, (comm_dtype_t)10, COMM_SUM, NULL));
		WANT_INVALID(c, comm_allreduce(c, s, d, 4, COMM_FLOAT32, (comm_redop_t)99, NULL));
		WANT_INVALID(c, comm_allreduce(c, s, d, 4, COMM_FLOAT32, (comm_redop_t)-1, NULL));
		WANT_INVALID(c, comm_allreduce(c, NULL, d, 4, COMM_FLOAT32, COMM_SUM, NULL));
		WANT_INVALID(c, comm_allreduce(c, s, NULL, 4, COMM_FLOAT32, COMM_SUM, NULL));
		WANT_INVALID(c, comm_allreduce(c, NULL, heap, 4, COMM_FLOAT32, COMM_SUM, NULL));
		WANT_INVALID(c, comm_allreduce(c, heap, NULL, 4, COMM_FLOAT32, COMM_SUM, NULL));
		WANT_INVALID(c, comm_allreduce(c, s, d, 4, (comm_dtype_t)99, COMM_SUM, &req));
		WANT_INVALID(c, comm_allreduce(c, NULL, d, 4, COMM_FLOAT32, COMM_SUM, &req));
		WANT_INVALID(c, comm_reduce_scatter(c, s, d, 1, (comm_dtype_t)99, COMM_SUM, NULL));
		WANT_INVALID(c, comm_reduce_scatter(c, s, d, 1, COMM_INT32, (comm_redop_t)99, NULL));
		WANT_INVALID(c, comm_reduce_scatter(c, NULL, d, 1, COMM_INT32, COMM_SUM, NULL));
		WANT_INVALID(c, comm_reduce_scatter(c, s, NULL, 1, COMM_INT32, COMM_SUM, NULL));
		WANT_INVALID(c, comm_allgather(c, s, d, 1, (comm_dtype_t)99, NULL));
		WANT_INVALID(c, comm_allgather(c, NULL, d, 1, COMM_INT32, NULL));
		WANT_INVALID(c, comm_allgather(c, s, NULL, 1, COMM_INT32, NULL));
		/* 68 MiB from a block of the first, 64 MiB segment: past its end */
		WANT_INVALID(c, comm_allreduce(c, s, d, 17u << 20, COMM_FLOAT32, COMM_SUM, NULL));
		if (!strstr(comm_last_error(c), "send buffer of 71303168 bytes runs past its "
						"allocation")) {
			fprintf(stderr, "rank %d: a send buffer past its segment's end: %s\n", r,
				comm_last_error(c));
			bad = 1;
		}
		WANT_INVALID(NULL, comm_allreduce(NULL, s, d, 4, COMM_FLOAT32, COMM_SUM, NULL));
		WANT_INVALID(NULL, comm_reduce_scatter(NULL, s, d, 1, COMM_FLOAT32, COMM_SUM, NULL));
		WANT_INVALID(NULL, comm_allgather(NULL, s, d, 1, COMM_FLOAT32, NULL));
		WANT_INVALID(NULL, comm_wait(NULL, 0));
		WANT_INVALID(NULL, comm_test(NULL, &done));
	}
	comm_mem_free(c, s);
	comm_mem_free(c, d);
	for (size_t i = 0; i < sizeof after / sizeof after[0]; i++) {
		int rc = run_one(c, &after[i], 7000 + (uint32_t)i, r, n);

		if (rc < 0)
			return th_bail(c);
		bad |= rc;
	}
	return th_leave(c, r) | bad;
}

static void test_args(const struct th_daemon *d)
{
	char job[64];
	int failed;

	job_name(job, sizeof job, "args");
	failed = th_run_ranks(d, job, 4, rank_args, NULL);
	CHECK(failed == 0, "argument errors: %d ranks failed", failed);
	printf("%s: unknown dtype/redop, NULL buffers and one past its segment's end give "
	       "COMM_ERR_INVALID_ARG locally; the job's next ops are correct\n",
	       failed ? "FAIL" : "ok");
}

int main(void)
{
	struct th_daemon d;
	struct timespec t0;
	int rc;

	/* an op that cannot complete fails after a minute instead of ten */
	setenv("COMM_TIMEOUT", "60000", 1);
	clock_gettime(CLOCK_MONOTONIC, &t0);
	rc = th_daemon_start(&d, "--threads", "3", NULL);
	REQUIRE(rc == 0, "commd did not start");
	test_reference(&d);
	test_all_types(&d);
	test_other_sizes(&d);
	test_in_place(&d);
	test_staged(&d);
	test_keep(&d);
	test_outstanding(&d);
	test_chained(&d);
	test_two_jobs(&d);
	test_mem(&d);
	test_args(&d);
	CHECK(th_daemon_alive(&d), "commd died during the tests");
	CHECK(th_daemon_stop(&d) == 0, "commd did not stop cleanly");
	printf("%s: %.1f s in all\n", check_failures ? "FAIL" : "ok", th_secs_since(&t0));
	return CHECK_EXIT();
}
