/*
 * test-ops.c: every op (all-reduce, reduce-scatter, all-gather, broadcast,
 * reduce, all-to-all) x all ten dtypes x every reduction through the real
 * commd on 2, 3, 4 and 8 ranks, checked against a reference of its own.
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

#define BIG 1000003          /* the large count: worker threads, parts and chunks */
#define EVERY_ROOT -1

/*
 * Inputs, references and tolerances:
 * - Integers: half the elements span the whole range of the type, the others
 *   are -5..5 (0..10 unsigned). SUM and PROD wrap: the reference computes
 *   them in the unsigned type. AVG is that wrapped sum read in the element
 *   type and divided by n with C's division (toward zero). Bit exact.
 * - float16, bfloat16: inputs with full significands (magnitudes 1/16..64
 *   resp. 1/256..1024; 0.5..2 for PROD). The reference widens to float,
 *   combines in float in rank order 0..n-1 and rounds once at the end, to
 *   nearest even (AVG: the float sum divided by n, then rounded). Bit exact.
 * - float32, float64: multiples of 0.25 in -2..2, so SUM, PROD, MIN and MAX
 *   are exact: bit exact. AVG within 1e-6 (float32) or 1e-12 (float64)
 *   relative (absolute below 1).
 */
#define AVG_TOL_F32 1e-6
#define AVG_TOL_F64 1e-12

enum kind { AR, RS, AG, BC, RD, A2A };
enum mode { ZC, STAGED };
enum place { OOP, INPLACE };

struct tcase {
	enum kind kind;
	comm_dtype_t dt;
	comm_redop_t op;
	size_t count;  /* per-rank block: recvcount, sendcount, block of all-to-all */
	int root;      /* broadcast and reduce: a root, or EVERY_ROOT in turn */
	enum mode mode;
	enum place place;
	int null;      /* non-root broadcast sendbuf / reduce recvbuf NULL */
};

/* One op of one rank: its buffers and what they must hold. */
struct run {
	const struct tcase *t;
	uint32_t seed;
	int r, n, root;
	size_t es;
	size_t sn, rn;        /* elements in the send and recv buffers */
	int s_in, r_out;      /* send holds input; recv receives output */
	struct ref_bufs b;    /* the allocations */
	char *send, *recv;    /* as passed to the op */
};

static int reduces(enum kind k)
{
	return k == AR || k == RS || k == RD;
}

static int has_root(enum kind k)
{
	return k == BC || k == RD;
}

static const char *kind_name(enum kind k)
{
	static const char *const names[] = { "allreduce", "reduce-scatter", "all-gather",
					      "broadcast", "reduce",    "all-to-all" };

	return names[k];
}

static const char *describe(const struct tcase *t, int n, char *buf, size_t len)
{
	char root[48] = "";

	if (has_root(t->kind)) {
		if (t->root == EVERY_ROOT)
			snprintf(root, sizeof root, " every root");
		else
			snprintf(root, sizeof root, " root=%d", t->root);
		if (t->null)
			snprintf(root + strlen(root), sizeof root - strlen(root),
				 ", non-root %s NULL", t->kind == BC ? "send" : "recv");
	}
	snprintf(buf, len, "%s %s%s%s n=%d count=%zu%s %s%s", kind_name(t->kind),
		 ref_dtype_name(t->dt), reduces(t->kind) ? " " : "",
		 reduces(t->kind) ? ref_op_name(t->op) : "", n, t->count, root,
		 t->mode == ZC ? "zero-copy" : "staged", t->place == INPLACE ? " in-place" : "");
	return buf;
}

/* --- inputs and the reference -------------------------------------------- */

/* 2^e as a float, for normal results (-126 <= e <= 127). */
static float pow2f(int e)
{
	uint32_t bits = (uint32_t)(e + 127) << 23;
	float f;

	memcpy(&f, &bits, sizeof f);
	return f;
}

/* Element idx of rank r's input in the case with this seed, as raw bits. */
static uint64_t gen(const struct tcase *t, uint32_t seed, int r, size_t idx)
{
	uint64_t h = ref_hash(seed, r, idx);
	int wide = (int)(h & 1), neg = (int)((h >> 1) & 1);
	uint64_t u = h >> 2;
	float f;

	switch (t->dt) {
	case COMM_FLOAT16:
		if (t->op == COMM_PROD && reduces(t->kind))
			f = (float)(1024 + (u & 1023)) * pow2f((int)((u >> 10) & 1) - 11);
		else
			f = (float)(1024 + (u & 1023)) * pow2f((int)((u >> 10) % 10) - 14);
		return ref_bits(t->dt, neg ? -f : f);
	case COMM_BFLOAT16:
		if (t->op == COMM_PROD && reduces(t->kind))
			f = (float)(128 + (u & 127)) * pow2f((int)((u >> 7) & 1) - 8);
		else
			f = (float)(128 + (u & 127)) * pow2f((int)((u >> 7) % 18) - 15);
		return ref_bits(t->dt, neg ? -f : f);
	case COMM_FLOAT32:
	case COMM_FLOAT64:
		return ref_small(t->dt, u);
	default:
		return wide ? ref_mix(h) : ref_small(t->dt, u);
	}
}

/* The reduction of element idx over ranks 0 .. n-1, as raw bits. */
static uint64_t fold(const struct tcase *t, uint32_t seed, int n, size_t idx)
{
	uint64_t in[REF_MAX_RANKS];

	for (int q = 0; q < n; q++)
		in[q] = gen(t, seed, q, idx);
	return ref_fold(t->dt, t->op, in, n);
}

/* Whether got is want: bit exact, or within tolerance for a float AVG. */
static int val_match(const struct tcase *t, uint64_t got, uint64_t want)
{
	int avg = reduces(t->kind) && t->op == COMM_AVG;

	if (avg && t->dt == COMM_FLOAT32)
		return ref_near(t->dt, got, want, AVG_TOL_F32);
	if (avg && t->dt == COMM_FLOAT64)
		return ref_near(t->dt, got, want, AVG_TOL_F64);
	return ref_same(t->dt, got, want);
}

/* --- one op of one rank ---------------------------------------------------- */

/* Elements of the send and recv buffers of kind k with n ranks. */
static void buf_elems(const struct tcase *t, int n, size_t *sn, size_t *rn)
{
	size_t all = (size_t)n * t->count;

	*sn = t->kind == RS || t->kind == A2A ? all : t->count;
	*rn = t->kind == AG || t->kind == A2A ? all : t->count;
}

/* Allocate and fill x's buffers as its case says; -1 on failure (printed). */
static int run_setup(comm_t *c, struct run *x, const struct tcase *t, uint32_t seed, int r,
		     int n, int root)
{
	int zc = t->mode == ZC, is_root = r == root;
	int no_send = t->kind == BC && !is_root && t->null;
	int no_recv = t->kind == RD && !is_root && t->null;
	size_t sb, rb, block;
	int rc;

	memset(x, 0, sizeof *x);
	x->t = t;
	x->seed = seed;
	x->r = r;
	x->n = n;
	x->root = root;
	x->es = comm_dtype_size(t->dt);
	buf_elems(t, n, &x->sn, &x->rn);
	x->s_in = t->kind != BC || is_root;
	x->r_out = t->kind != RD || is_root;
	sb = x->sn * x->es;
	rb = x->rn * x->es;
	block = t->count * x->es;
	if (t->place == OOP)
		rc = ref_bufs_alloc(c, &x->b, no_send ? 0 : sb + REF_GUARD, zc,
				    no_recv ? 0 : rb + REF_GUARD, zc, r);
	else
		rc = ref_bufs_alloc(c, &x->b, (sb > rb ? sb : rb) + REF_GUARD, zc, 0, zc, r);
	if (rc < 0)
		return -1;
	x->send = x->b.sbase;
	x->recv = t->place == OOP ? x->b.rbase : x->b.sbase;
	if (t->place == INPLACE && t->kind == RS)
		x->recv = x->b.sbase + (size_t)r * block;
	if (t->place == INPLACE && t->kind == AG)
		x->send = x->b.sbase + (size_t)r * block;
	if (no_send)
		x->send = NULL;
	if (no_recv)
		x->recv = NULL;
	for (size_t i = 0; x->s_in && i < x->sn; i++)
		ref_store(t->dt, gen(t, seed, r, i), x->send + i * x->es);
	/* a staged send: a write past its staging block lands in a canary */
	if (!zc && x->send && x->s_in && sb > 0 && ref_bufs_canary(c, &x->b, sb, r) < 0)
		return -1;
	return 0;
}

static comm_result_t run_post(comm_t *c, const struct run *x)
{
	const struct tcase *t = x->t;

	switch (t->kind) {
	case AR:
		return comm_allreduce(c, x->send, x->recv, t->count, t->dt, t->op, NULL);
	case RS:
		return comm_reduce_scatter(c, x->send, x->recv, t->count, t->dt, t->op, NULL);
	case AG:
		return comm_allgather(c, x->send, x->recv, t->count, t->dt, NULL);
	case BC:
		return comm_broadcast(c, x->send, x->recv, t->count, t->dt, x->root, NULL);
	case RD:
		return comm_reduce(c, x->send, x->recv, t->count, t->dt, t->op, x->root, NULL);
	default:
		return comm_alltoall(c, x->send, x->recv, t->count, t->dt, NULL);
	}
}

/* What element j of rank x->r's output must be. */
static uint64_t expect(const struct run *x, size_t j)
{
	const struct tcase *t = x->t;
	size_t cnt = t->count;

	switch (t->kind) {
	case AR:
	case RD:
		return fold(t, x->seed, x->n, j);
	case RS:
		return fold(t, x->seed, x->n, (size_t)x->r * cnt + j);
	case AG:
		return gen(t, x->seed, (int)(j / cnt), j % cnt);
	case BC:
		return gen(t, x->seed, x->root, j);
	default:
		return gen(t, x->seed, (int)(j / cnt), (size_t)x->r * cnt + j % cnt);
	}
}

/* Check x's output, input, untouched buffers, guards and canary; 0 when all is well. */
static int run_check(const struct run *x)
{
	const struct tcase *t = x->t;
	char what[200], g[48], w[48];
	uint64_t want, got;
	int bad = 0;

	describe(t, x->n, what, sizeof what);
	if (has_root(t->kind))
		snprintf(what + strlen(what), sizeof what - strlen(what), " (root %d)", x->root);
	for (size_t j = 0; x->r_out && j < x->rn; j++) {
		want = expect(x, j);
		got = ref_load(t->dt, x->recv + j * x->es);
		if (!val_match(t, got, want)) {
			ref_str(t->dt, got, g, sizeof g);
			ref_str(t->dt, want, w, sizeof w);
			fprintf(stderr, "rank %d: %s: element %zu of %zu is %s, expected %s\n",
				x->r, what, j, x->rn, g, w);
			bad = 1;
			break;
		}
	}
	/* inputs stay as they were unless in place (a non-root's reduce input always) */
	if (x->s_in && (t->place == OOP || !x->r_out)) {
		for (size_t i = 0; i < x->sn; i++) {
			uint64_t in = gen(t, x->seed, x->r, i);

			if (memcmp(x->send + i * x->es, &in, x->es) != 0) {
				fprintf(stderr, "rank %d: %s: input element %zu was changed\n",
					x->r, what, i);
				bad = 1;
				break;
			}
		}
	}
	if (!x->s_in && x->send && x->send != x->recv &&
	    !ref_all_bytes(x->send, x->sn * x->es, REF_POISON)) {
		fprintf(stderr, "rank %d: %s: the non-root sendbuf was written\n", x->r, what);
		bad = 1;
	}
	if (!x->r_out && x->recv && x->recv != x->send &&
	    !ref_all_bytes(x->recv, x->rn * x->es, REF_POISON)) {
		fprintf(stderr, "rank %d: %s: the non-root recvbuf was written\n", x->r, what);
		bad = 1;
	}
	return bad | ref_bufs_check(&x->b, t->place == INPLACE, x->r, what);
}

/* One case (every root in turn): 0 correct, 1 wrong values, -1 out of step. */
static int run_case(comm_t *c, const struct tcase *t, uint32_t seed, int r, int n)
{
	int first = t->root == EVERY_ROOT ? 0 : t->root;
	int last = t->root == EVERY_ROOT && has_root(t->kind) ? n - 1 : first;
	int bad = 0;

	for (int root = first; root <= last; root++) {
		struct run x;
		comm_result_t rc;
		char what[200];

		alarm(TH_WATCHDOG_S);
		if (run_setup(c, &x, t, seed + (uint32_t)root * 7919, r, n, root) < 0) {
			ref_bufs_free(c, &x.b);
			return -1;
		}
		rc = run_post(c, &x);
		if (rc != COMM_OK) {
			fprintf(stderr, "rank %d: %s root %d: %s: %s\n", r,
				describe(t, n, what, sizeof what), root, comm_result_name(rc),
				comm_last_error(c));
			ref_bufs_free(c, &x.b);
			return -1;
		}
		bad |= run_check(&x);
		ref_bufs_free(c, &x.b);
	}
	return bad;
}

/* --- plans: lists of cases run by one job -------------------------------- */

static void add(struct th_plan *p, enum kind k, comm_dtype_t dt, comm_redop_t op, size_t count,
		int root, enum mode m, enum place pl, int null)
{
	p->case_size = sizeof(struct tcase);
	*(struct tcase *)th_plan_add(p) = (struct tcase){ k, dt, reduces(k) ? op : COMM_SUM, count,
							 root, m, pl, null };
}

static int next_job;

/* th_plan's view of a case: run and described as a struct tcase. */
static int run_any(comm_t *c, const void *t, uint32_t seed, int r, int n)
{
	return run_case(c, t, seed, r, n);
}

static const char *describe_any(const void *t, int n, char *buf, size_t len)
{
	return describe(t, n, buf, len);
}

/* Run every case of p in one job of p->world ranks; print a line a case. */
static void run_plan(const struct th_daemon *d, struct th_plan *p)
{
	p->seed = (uint32_t)(++next_job) * 65536 + 1;
	p->seed_step = 131;
	snprintf(p->job, sizeof p->job, "ops-%d", next_job);
	p->run = run_any;
	p->describe = describe_any;
	th_plan_run(d, p);
}

/* Every op x dtype x redop at the small sizes: n=4, zero-copy, out of place. */
static void test_matrix(const struct th_daemon *d)
{
	static const size_t sizes[] = { 0, 1, 7, 4097 };
	struct th_plan p = { .title = "every op x dtype x redop, n=4, zero-copy", .world = 4 };
	int ns = (int)(sizeof sizes / sizeof sizes[0]);

	for (int i = 0; i < REF_NDTYPES; i++) {
		for (int o = 0; o < REF_NREDOPS; o++) {
			for (int s = 0; s < ns; s++) {
				add(&p, AR, ref_dtypes[i], ref_redops[o], sizes[s], 0, ZC, OOP, 0);
				add(&p, RS, ref_dtypes[i], ref_redops[o], sizes[s], 0, ZC, OOP, 0);
				add(&p, RD, ref_dtypes[i], ref_redops[o], sizes[s], EVERY_ROOT, ZC,
				    OOP, (i + o + s) % 2);
			}
		}
		for (int s = 0; s < ns; s++) {
			add(&p, AG, ref_dtypes[i], COMM_SUM, sizes[s], 0, ZC, OOP, 0);
			add(&p, BC, ref_dtypes[i], COMM_SUM, sizes[s], EVERY_ROOT, ZC, OOP,
			    (i + s) % 2);
			add(&p, A2A, ref_dtypes[i], COMM_SUM, sizes[s], 0, ZC, OOP, 0);
		}
	}
	run_plan(d, &p);
}

/*
 * Each op on n ranks: SUM (and the copy-only ops) at 1, 7, 4097 and the big
 * count, the other reductions at 4097; dtypes vary with the op and n.
 */
static void test_world(const struct th_daemon *d, int n)
{
	static const size_t sizes[] = { 1, 7, 4097, BIG };
	struct th_plan p = { .world = n };
	char title[64];
	int k = 0;

	snprintf(title, sizeof title, "each op, n=%d", n);
	p.title = title;
	for (int kind = AR; kind <= A2A; kind++) {
		for (size_t s = 0; s < sizeof sizes / sizeof sizes[0]; s++, k++) {
			comm_dtype_t dt = ref_dtypes[(k * 3 + n) % REF_NDTYPES];
			int root = sizes[s] == BIG ? (n - 1 + kind) % n : EVERY_ROOT;

			add(&p, (enum kind)kind, dt, COMM_SUM, sizes[s], root, ZC, OOP,
			    (int)(s + (size_t)n) % 2);
		}
		if (!reduces((enum kind)kind))
			continue;
		for (int o = 1; o < REF_NREDOPS; o++, k++)
			add(&p, (enum kind)kind, ref_dtypes[(k * 7 + n) % REF_NDTYPES],
			    ref_redops[o], 4097, EVERY_ROOT, ZC, OOP, o % 2);
	}
	/* the big count with the other reductions, on a few dtypes */
	add(&p, AR, ref_dtypes[(n + 4) % REF_NDTYPES], COMM_MAX, BIG, 0, ZC, OOP, 0);
	add(&p, RS, ref_dtypes[(n + 6) % REF_NDTYPES], COMM_AVG, BIG, 0, ZC, OOP, 0);
	add(&p, RD, ref_dtypes[(n + 1) % REF_NDTYPES], COMM_MIN, BIG, n / 2, ZC, OOP, 1);
	run_plan(d, &p);
}

/* In place (every layout of comm.h) and staged, each op at 7 and the big count. */
static void test_place_mode(const struct th_daemon *d, int n)
{
	static const size_t sizes[] = { 7, BIG };
	static const comm_redop_t ops[] = { COMM_SUM, COMM_AVG, COMM_MAX };
	struct th_plan p = { .world = n };
	char title[64];
	int k = 0;

	snprintf(title, sizeof title, "in place and staged, n=%d", n);
	p.title = title;
	for (int m = ZC; m <= STAGED; m++) {
		for (int pl = OOP; pl <= INPLACE; pl++) {
			if (m == ZC && pl == OOP)
				continue; /* the other plans */
			for (int kind = AR; kind <= A2A; kind++) {
				for (size_t s = 0; s < sizeof sizes / sizeof sizes[0]; s++, k++) {
					int root = sizes[s] == BIG ? (kind + m) % n : EVERY_ROOT;

					add(&p, (enum kind)kind,
					    ref_dtypes[(k * 3 + m) % REF_NDTYPES], ops[k % 3],
					    sizes[s], root, (enum mode)m, (enum place)pl, k % 2);
				}
			}
		}
	}
	run_plan(d, &p);
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
	test_matrix(&d);
	test_world(&d, 2);
	test_world(&d, 3);
	test_world(&d, 4);
	test_world(&d, 8);
	test_place_mode(&d, 4);
	test_place_mode(&d, 3);
	CHECK(th_daemon_alive(&d), "commd died during the tests");
	CHECK(th_daemon_stop(&d) == 0, "commd did not stop cleanly");
	printf("%s: %.1f s in all\n", check_failures ? "FAIL" : "ok", th_secs_since(&t0));
	return CHECK_EXIT();
}
