/*
 * opcase.c: one collective test case on one rank (inputs, the op, the check
 * against ref.h) and the lists of cases that test-ops and test-nodes run.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "check.h"
#include "harness.h"
#include "opcase.h"
#include "ref.h"

/*
 * Inputs, references and tolerances:
 * - Integers: half the elements span the whole range of the type, the others
 *   are -5..5 (0..10 unsigned). SUM and PROD wrap: the reference computes
 *   them in the unsigned type. AVG is that wrapped sum read in the element
 *   type and divided by n with C's division (toward zero). Bit exact.
 * - float16, bfloat16: inputs with full significands (magnitudes 1/16..64
 *   resp. 1/256..1024; 0.5..2 for PROD). The reference widens to float,
 *   combines in float in rank order 0..n-1 and rounds once at the end, to
 *   nearest even (AVG: the float sum divided by n, then rounded). Bit exact
 *   on one daemon. A tolerant case (a job over several daemons, where each
 *   daemon rounds its partial and partials combine in an order the test does
 *   not know) allows SUM, PROD and AVG OC_TOL_ULPS ulps of the type at a
 *   scale S that bounds every partial and the result: SUM: the sum of the
 *   inputs' magnitudes; AVG: twice that over n; PROD: twice |reference|
 *   (product errors are relative). Each rounding costs at most half an ulp
 *   of S, so 4 covers three nodes' partials, two combining steps, the
 *   division and the reference's own rounding. MIN and MAX stay bit exact.
 * - float32, float64: multiples of 0.25 in -2..2, so SUM, PROD, MIN and MAX
 *   are exact in any order: bit exact. AVG within 1e-6 (float32) or 1e-12
 *   (float64) relative (absolute below 1).
 */
#define AVG_TOL_F32 1e-6
#define AVG_TOL_F64 1e-12

/* One op of one rank: its buffers and what they must hold. */
struct run {
	const struct oc_case *t;
	uint32_t seed;
	int r, n, root;
	size_t es;
	size_t sn, rn;        /* elements in the send and recv buffers */
	int s_in, r_out;      /* send holds input; recv receives output */
	struct ref_bufs b;    /* the allocations */
	char *send, *recv;    /* as passed to the op */
};

int oc_reduces(enum oc_kind k)
{
	return k == OC_AR || k == OC_RS || k == OC_RD;
}

static int has_root(enum oc_kind k)
{
	return k == OC_BC || k == OC_RD;
}

static const char *kind_name(enum oc_kind k)
{
	static const char *const names[] = { "allreduce", "reduce-scatter", "all-gather",
					      "broadcast", "reduce",    "all-to-all" };

	return names[k];
}

const char *oc_describe(const struct oc_case *t, int n, char *buf, size_t len)
{
	char root[48] = "";

	if (has_root(t->kind)) {
		if (t->root == OC_EVERY_ROOT)
			snprintf(root, sizeof root, " every root");
		else
			snprintf(root, sizeof root, " root=%d", t->root);
		if (t->null)
			snprintf(root + strlen(root), sizeof root - strlen(root),
				 ", non-root %s NULL", t->kind == OC_BC ? "send" : "recv");
	}
	snprintf(buf, len, "%s %s%s%s n=%d count=%zu%s %s%s", kind_name(t->kind),
		 ref_dtype_name(t->dt), oc_reduces(t->kind) ? " " : "",
		 oc_reduces(t->kind) ? ref_op_name(t->op) : "", n, t->count, root,
		 t->mode == OC_ZC ? "zero-copy" : "staged",
		 t->place == OC_INPLACE ? " in-place" : "");
	return buf;
}

/* --- inputs and the reference -------------------------------------------- */

/* 2^e as a double, for any e a float16 or bfloat16 needs. */
static double pow2(int e)
{
	double d = 1;

	for (; e > 0; e--)
		d *= 2;
	for (; e < 0; e++)
		d /= 2;
	return d;
}

/* 2^e as a float, for normal results (-126 <= e <= 127). */
static float pow2f(int e)
{
	uint32_t bits = (uint32_t)(e + 127) << 23;
	float f;

	memcpy(&f, &bits, sizeof f);
	return f;
}

/* Element idx of rank r's input in the case with this seed, as raw bits. */
static uint64_t gen(const struct oc_case *t, uint32_t seed, int r, size_t idx)
{
	uint64_t h = ref_hash(seed, r, idx);
	int wide = (int)(h & 1), neg = (int)((h >> 1) & 1);
	uint64_t u = h >> 2;
	float f;

	switch (t->dt) {
	case COMM_FLOAT16:
		if (t->op == COMM_PROD && oc_reduces(t->kind))
			f = (float)(1024 + (u & 1023)) * pow2f((int)((u >> 10) & 1) - 11);
		else
			f = (float)(1024 + (u & 1023)) * pow2f((int)((u >> 10) % 10) - 14);
		return ref_bits(t->dt, neg ? -f : f);
	case COMM_BFLOAT16:
		if (t->op == COMM_PROD && oc_reduces(t->kind))
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
static uint64_t fold(const struct oc_case *t, uint32_t seed, int n, size_t idx)
{
	uint64_t in[REF_MAX_RANKS];

	for (int q = 0; q < n; q++)
		in[q] = gen(t, seed, q, idx);
	return ref_fold(t->dt, t->op, in, n);
}

static double absd(double v)
{
	return v < 0 ? -v : v;
}

/* The float16 or bfloat16 ulp at magnitude v (v > 0; subnormal: the least). */
static double ulp16(comm_dtype_t dt, double v)
{
	int mant = dt == COMM_FLOAT16 ? 10 : 7, emin = dt == COMM_FLOAT16 ? -14 : -126, e = 0;

	while (v >= 2) {
		v /= 2;
		e++;
	}
	while (v < 1 && e > emin) {
		v *= 2;
		e--;
	}
	return pow2((e > emin ? e : emin) - mant);
}

/*
 * The tolerance of a tolerant float16/bfloat16 SUM, PROD or AVG at element
 * idx of the reduction (see the top of this file); 0 when bit exact.
 */
static double tolerance(const struct run *x, size_t idx, uint64_t want)
{
	const struct oc_case *t = x->t;
	double s = 0;

	if (!t->tolerant || !oc_reduces(t->kind) ||
	    (t->dt != COMM_FLOAT16 && t->dt != COMM_BFLOAT16) || t->op == COMM_MIN ||
	    t->op == COMM_MAX)
		return 0;
	if (t->op == COMM_PROD) {
		s = 2 * absd(ref_value(t->dt, want));
	} else {
		for (int q = 0; q < x->n; q++)
			s += absd(ref_value(t->dt, gen(t, x->seed, q, idx)));
		if (t->op == COMM_AVG)
			s = 2 * s / x->n;
	}
	return OC_TOL_ULPS * ulp16(t->dt, s > 0 ? s : 1);
}

/*
 * Whether got is want: bit exact, within tolerance for a float AVG, or for a
 * tolerant case (idx: the element of the reduction); *tol gets the latter.
 */
static int val_match(const struct run *x, size_t idx, uint64_t got, uint64_t want, double *tol)
{
	const struct oc_case *t = x->t;
	int avg = oc_reduces(t->kind) && t->op == COMM_AVG;

	*tol = 0;
	if (avg && t->dt == COMM_FLOAT32)
		return ref_near(t->dt, got, want, AVG_TOL_F32);
	if (avg && t->dt == COMM_FLOAT64)
		return ref_near(t->dt, got, want, AVG_TOL_F64);
	if (ref_same(t->dt, got, want))
		return 1;
	*tol = tolerance(x, idx, want);
	return *tol > 0 && absd(ref_value(t->dt, got) - ref_value(t->dt, want)) <= *tol;
}

/* --- one op of one rank ---------------------------------------------------- */

/* Elements of the send and recv buffers of kind k with n ranks. */
static void buf_elems(const struct oc_case *t, int n, size_t *sn, size_t *rn)
{
	size_t all = (size_t)n * t->count;

	*sn = t->kind == OC_RS || t->kind == OC_A2A ? all : t->count;
	*rn = t->kind == OC_AG || t->kind == OC_A2A ? all : t->count;
}

/* Allocate and fill x's buffers as its case says; -1 on failure (printed). */
static int run_setup(comm_t *c, struct run *x, const struct oc_case *t, uint32_t seed, int r,
		     int n, int root)
{
	int zc = t->mode == OC_ZC, is_root = r == root;
	int no_send = t->kind == OC_BC && !is_root && t->null;
	int no_recv = t->kind == OC_RD && !is_root && t->null;
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
	x->s_in = t->kind != OC_BC || is_root;
	x->r_out = t->kind != OC_RD || is_root;
	sb = x->sn * x->es;
	rb = x->rn * x->es;
	block = t->count * x->es;
	if (t->place == OC_OOP)
		rc = ref_bufs_alloc(c, &x->b, no_send ? 0 : sb + REF_GUARD, zc,
				    no_recv ? 0 : rb + REF_GUARD, zc, r);
	else
		rc = ref_bufs_alloc(c, &x->b, (sb > rb ? sb : rb) + REF_GUARD, zc, 0, zc, r);
	if (rc < 0)
		return -1;
	x->send = x->b.sbase;
	x->recv = t->place == OC_OOP ? x->b.rbase : x->b.sbase;
	if (t->place == OC_INPLACE && t->kind == OC_RS)
		x->recv = x->b.sbase + (size_t)r * block;
	if (t->place == OC_INPLACE && t->kind == OC_AG)
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
	const struct oc_case *t = x->t;

	switch (t->kind) {
	case OC_AR:
		return comm_allreduce(c, x->send, x->recv, t->count, t->dt, t->op, NULL);
	case OC_RS:
		return comm_reduce_scatter(c, x->send, x->recv, t->count, t->dt, t->op, NULL);
	case OC_AG:
		return comm_allgather(c, x->send, x->recv, t->count, t->dt, NULL);
	case OC_BC:
		return comm_broadcast(c, x->send, x->recv, t->count, t->dt, x->root, NULL);
	case OC_RD:
		return comm_reduce(c, x->send, x->recv, t->count, t->dt, t->op, x->root, NULL);
	default:
		return comm_alltoall(c, x->send, x->recv, t->count, t->dt, NULL);
	}
}

/* Which element of the reduction element j of rank x->r's output is. */
static size_t reduced_idx(const struct run *x, size_t j)
{
	return x->t->kind == OC_RS ? (size_t)x->r * x->t->count + j : j;
}

/* What element j of rank x->r's output must be. */
static uint64_t expect(const struct run *x, size_t j)
{
	const struct oc_case *t = x->t;
	size_t cnt = t->count;

	switch (t->kind) {
	case OC_AR:
	case OC_RD:
	case OC_RS:
		return fold(t, x->seed, x->n, reduced_idx(x, j));
	case OC_AG:
		return gen(t, x->seed, (int)(j / cnt), j % cnt);
	case OC_BC:
		return gen(t, x->seed, x->root, j);
	default:
		return gen(t, x->seed, (int)(j / cnt), (size_t)x->r * cnt + j % cnt);
	}
}

/* Check x's output, input, untouched buffers, guards and canary; 0 when all is well. */
static int run_check(const struct run *x)
{
	const struct oc_case *t = x->t;
	char what[200], g[48], w[48];
	uint64_t want, got;
	double tol;
	int bad = 0;

	oc_describe(t, x->n, what, sizeof what);
	if (has_root(t->kind))
		snprintf(what + strlen(what), sizeof what - strlen(what), " (root %d)", x->root);
	for (size_t j = 0; x->r_out && j < x->rn; j++) {
		want = expect(x, j);
		got = ref_load(t->dt, x->recv + j * x->es);
		if (!val_match(x, reduced_idx(x, j), got, want, &tol)) {
			ref_str(t->dt, got, g, sizeof g);
			ref_str(t->dt, want, w, sizeof w);
			fprintf(stderr, "rank %d: %s: element %zu of %zu is %s, expected %s", x->r,
				what, j, x->rn, g, w);
			if (tol > 0)
				fprintf(stderr, " (within %g: %d ulps at its scale)", tol,
					OC_TOL_ULPS);
			fputc('\n', stderr);
			bad = 1;
			break;
		}
	}
	/* inputs stay as they were unless in place (a non-root's reduce input always) */
	if (x->s_in && (t->place == OC_OOP || !x->r_out)) {
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
	return bad | ref_bufs_check(&x->b, t->place == OC_INPLACE, x->r, what);
}

int oc_run_case(comm_t *c, const struct oc_case *t, uint32_t seed, int r, int n)
{
	int first = t->root == OC_EVERY_ROOT ? 0 : t->root;
	int last = t->root == OC_EVERY_ROOT && has_root(t->kind) ? n - 1 : first;
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
				oc_describe(t, n, what, sizeof what), root, comm_result_name(rc),
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

/* th_plan's view of a case: run and described as a struct oc_case. */
static int run_any(comm_t *c, const void *t, uint32_t seed, int r, int n)
{
	return oc_run_case(c, t, seed, r, n);
}

static const char *describe_any(const void *t, int n, char *buf, size_t len)
{
	return oc_describe(t, n, buf, len);
}

void oc_add(struct th_plan *p, const struct oc_opts *o, enum oc_kind k, comm_dtype_t dt,
	    comm_redop_t op, size_t count, int root, enum oc_mode m, enum oc_place pl, int null)
{
	p->case_size = sizeof(struct oc_case);
	p->run = run_any;
	p->describe = describe_any;
	*(struct oc_case *)th_plan_add(p) = (struct oc_case){
		k, dt, oc_reduces(k) ? op : COMM_SUM, count, root, m, pl, null, o->tolerant
	};
}

void oc_plan_run(const struct th_daemon *d, struct th_plan *p, const char *prefix)
{
	static int next_job;

	p->seed = (uint32_t)(++next_job) * 65536 + 1;
	p->seed_step = 131;
	snprintf(p->job, sizeof p->job, "%s-%d", prefix, next_job);
	th_plan_run(d, p);
}

void oc_add_matrix(struct th_plan *p, const struct oc_opts *o)
{
	static const size_t sizes[] = { 0, 1, 7, 4097 };
	int ns = (int)(sizeof sizes / sizeof sizes[0]);

	for (int i = 0; i < REF_NDTYPES; i++) {
		for (int r = 0; r < REF_NREDOPS; r++) {
			for (int s = 0; s < ns; s++) {
				oc_add(p, o, OC_AR, ref_dtypes[i], ref_redops[r], sizes[s], 0,
				       OC_ZC, OC_OOP, 0);
				oc_add(p, o, OC_RS, ref_dtypes[i], ref_redops[r], sizes[s], 0,
				       OC_ZC, OC_OOP, 0);
				oc_add(p, o, OC_RD, ref_dtypes[i], ref_redops[r], sizes[s],
				       OC_EVERY_ROOT, OC_ZC, OC_OOP, (i + r + s) % 2);
			}
		}
		for (int s = 0; s < ns; s++) {
			oc_add(p, o, OC_AG, ref_dtypes[i], COMM_SUM, sizes[s], 0, OC_ZC, OC_OOP, 0);
			oc_add(p, o, OC_BC, ref_dtypes[i], COMM_SUM, sizes[s], OC_EVERY_ROOT, OC_ZC,
			       OC_OOP, (i + s) % 2);
			oc_add(p, o, OC_A2A, ref_dtypes[i], COMM_SUM, sizes[s], 0, OC_ZC, OC_OOP,
			       0);
		}
	}
}

void oc_add_world(struct th_plan *p, int n, const struct oc_opts *o)
{
	const size_t sizes[] = { 1, 7, 4097, o->big };
	int k = 0;

	for (int kind = OC_AR; kind <= OC_A2A; kind++) {
		for (size_t s = 0; s < sizeof sizes / sizeof sizes[0]; s++, k++) {
			comm_dtype_t dt = ref_dtypes[(k * 3 + n) % REF_NDTYPES];
			int root = sizes[s] == o->big ? (n - 1 + kind) % n : OC_EVERY_ROOT;

			oc_add(p, o, (enum oc_kind)kind, dt, COMM_SUM, sizes[s], root, OC_ZC,
			       OC_OOP, (int)(s + (size_t)n) % 2);
		}
		if (!oc_reduces((enum oc_kind)kind))
			continue;
		for (int r = 1; r < REF_NREDOPS; r++, k++)
			oc_add(p, o, (enum oc_kind)kind, ref_dtypes[(k * 7 + n) % REF_NDTYPES],
			       ref_redops[r], 4097, OC_EVERY_ROOT, OC_ZC, OC_OOP, r % 2);
	}
	/* the big count with the other reductions, on a few dtypes */
	oc_add(p, o, OC_AR, ref_dtypes[(n + 4) % REF_NDTYPES], COMM_MAX, o->big, 0, OC_ZC, OC_OOP,
	       0);
	oc_add(p, o, OC_RS, ref_dtypes[(n + 6) % REF_NDTYPES], COMM_AVG, o->big, 0, OC_ZC, OC_OOP,
	       0);
	oc_add(p, o, OC_RD, ref_dtypes[(n + 1) % REF_NDTYPES], COMM_MIN, o->big, n / 2, OC_ZC,
	       OC_OOP, 1);
}

void oc_add_place_mode(struct th_plan *p, int n, const struct oc_opts *o)
{
	static const comm_redop_t ops[] = { COMM_SUM, COMM_AVG, COMM_MAX };
	const size_t sizes[] = { 7, o->big };
	int k = 0;

	for (int m = OC_ZC; m <= OC_STAGED; m++) {
		for (int pl = OC_OOP; pl <= OC_INPLACE; pl++) {
			if (m == OC_ZC && pl == OC_OOP)
				continue; /* the other plans */
			for (int kind = OC_AR; kind <= OC_A2A; kind++) {
				for (size_t s = 0; s < sizeof sizes / sizeof sizes[0]; s++, k++) {
					int root = sizes[s] == o->big ? (kind + m) % n
								     : OC_EVERY_ROOT;

					oc_add(p, o, (enum oc_kind)kind,
					       ref_dtypes[(k * 3 + m) % REF_NDTYPES], ops[k % 3],
					       sizes[s], root, (enum oc_mode)m, (enum oc_place)pl,
					       k % 2);
				}
			}
		}
	}
}
