/*
 * test-chaos.c: a randomized soak over two daemons joined over loopback.
 * Several jobs run at once (1-5 ranks on A, on B or over both), each
 * looping random ops checked against references computed in the rank;
 * some are victims of a fault (a rank killed, stopped past the deadline,
 * `commctl abort`, a rank that leaves early, calls comm_abort or exits with
 * ops out, a mismatched op) whose survivors must get a fitting error in
 * time, while the others go on, right.
 *
 * COMM_CHAOS_SEED replays a run, COMM_CHAOS_SECONDS bounds it,
 * COMM_CHAOS_VICTIMS (percent) sets how many jobs are victims,
 * COMM_CHAOS_FREEZE=MS (off by default) SIGSTOPs a daemon every few seconds
 * for 100 to 100 + MS ms (keep it under the peers' 3 s), and
 * COMM_CHAOS_KEEP_LOGS (a directory) keeps the daemons' logs (copied
 * before they stop).
 */
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "check.h"
#include "comm.h"
#include "harness.h"
#include "ref.h"

#define DEFAULT_SEED 20240611u
#define DEFAULT_SECONDS 40
#define DEFAULT_VICTIMS 30       /* percent of the jobs */
#define MAX_RANKS 5
#define MAX_SLOTS 5              /* jobs running at once, at most */
#define MAX_OUT 3                /* a rank's requests outstanding at once */
#define MAX_ELEMS (512u << 10)   /* elements in an op's largest buffer (4 MiB of int64) */
#define STOP_ELEMS (64u << 10)   /* the same where a rank is to be stopped: a short deadline */
#define AGREE_EVERY 8            /* ops between the all-reduces that agree on stopping */
#define CLEAN_TIMEOUT_MS 60000   /* a clean job's op deadline: a hang, not a slow op */
#define STOP_TIMEOUT_MS 3000     /* where a rank is to be stopped: what that costs the others */
#define VICTIM_MAX_MS 60000      /* a victim job that no fault reached stops after this */
#define ERROR_LIMIT_MS 10000     /* a fault's survivors hear of it within this */
#define HANG_LIMIT_MS 30000      /* a job this far past its end (or its fault) hangs */

/* --- what a job is, shared between the test and its ranks ------------------ */

enum fault { F_NONE, F_KILL, F_STOP, F_ABORT, F_LEAVE, F_MISMATCH, F_RABORT, F_EXIT, F_NKINDS };

static const char *const fault_names[F_NKINDS] = { "none",  "kill",     "stop",
						    "abort", "leave",    "mismatch",
						    "comm_abort", "exit" };

/* How the mismatched op differs on the victim rank */
enum mis { MIS_COUNT, MIS_DTYPE, MIS_REDOP, MIS_ROOT, MIS_TYPE, MIS_NKINDS };

static const char *const mis_names[MIS_NKINDS] = { "count", "dtype", "redop", "broadcast root",
						    "op type" };

struct rank_state {
	int ops;            /* ops that completed and were checked right */
	int wrong;          /* ops that completed with a wrong result */
	int ok_after;       /* ops that completed after one had failed */
	int rc;             /* the first failure (COMM_OK: none) */
	long err_ms;        /* and when it came */
	int err_op;         /* and at which op */
	int after_ok;       /* mismatch: the all-reduce after it was right */
	int fin_rc;         /* comm_finalize's result */
	int done;           /* out of its loop */
	int cur_op;         /* the op it is in (for a hang's report) */
	int cur_kind;
	int cur_waiting;    /* in a wait, not posting */
	char detail[200];   /* comm_last_error of the first failure */
	char wrong_what[400];
};

struct job {
	char name[32];
	uint64_t seed;      /* the ops: every rank draws the same ones */
	int n;
	int daemon_of[MAX_RANKS];
	int root;           /* COMM_ROOT: -1 none, else the daemon */
	int ring_off;       /* COMM_RING=0 */
	int keep_off;       /* COMM_KEEP_MB=0 */
	int cycle;          /* op kinds in turn rather than drawn */
	int reused;         /* the name of a job that just ended */
	int budget_ms;      /* a clean job stops agreeing after this long */
	enum fault fault;
	enum mis mis;
	int victim;         /* the rank the fault is about */
	int fault_op;       /* leave, mismatch: at this op */
	long fault_ms;      /* when the fault came (0: not yet) */
	struct rank_state rs[MAX_RANKS];
};

static struct th_daemon da, db;
static const struct th_daemon *ds[2] = { &da, &db };

static long mono_ms(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

/* splitmix64 */
static uint64_t rnd(uint64_t *s)
{
	*s += 0x9e3779b97f4a7c15ull;
	return ref_mix(*s);
}

/* --- values and references -------------------------------------------------- */

enum kind { K_AR, K_RS, K_AG, K_BC, K_RD, K_A2A, K_BARRIER, K_RING, K_SPLIT, K_CHAIN, K_NKINDS };

static const char *const kind_names[K_NKINDS] = { "allreduce", "reduce-scatter", "allgather",
						   "broadcast", "reduce", "alltoall", "barrier",
						   "send/recv ring", "split", "chained all-reduces" };

static const comm_dtype_t dtypes[] = { COMM_INT8, COMM_INT32, COMM_UINT32,
				       COMM_INT64, COMM_FLOAT32, COMM_FLOAT64 };
#define NDTYPES (sizeof dtypes / sizeof dtypes[0])

struct op {
	enum kind kind;
	comm_dtype_t dt;
	comm_redop_t redop;
	size_t count;       /* per rank: recvcount, sendcount, block */
	int root;
	int inplace;
	uint64_t seed;
	int k;              /* its index in the job */
};

/*
 * Element i of rank q's input to the op seeded s: an integer in -8..8
 * (0..16 unsigned), so every SUM, PROD, MIN and MAX of five of them is
 * exact in every type here (int8 wraps, alike everywhere).
 */
static uint64_t in_val(comm_dtype_t dt, uint64_t s, int q, size_t i)
{
	uint32_t h = (uint32_t)(s ^ (s >> 32)) + (uint32_t)q * 0x85ebca77u +
		     (uint32_t)i * 0x9e3779b1u;

	h ^= h >> 15;
	h *= 0x2c1b3c6du;
	h ^= h >> 12;
	h *= 0x297a2d39u;
	h ^= h >> 15;
	return ref_bits(dt, dt == COMM_UINT32 ? (double)(h % 17) : (double)((int)(h % 17) - 8));
}

static uint64_t fold(const struct op *o, int n, size_t idx)
{
	uint64_t in[MAX_RANKS];

	for (int q = 0; q < n; q++)
		in[q] = in_val(o->dt, o->seed, q, idx);
	return ref_fold(o->dt, o->redop, in, n);
}

/* What element j of rank r's output must be. */
static uint64_t expect(const struct op *o, int r, int n, size_t j)
{
	size_t c = o->count;

	switch (o->kind) {
	case K_AR:
	case K_RD:
		return fold(o, n, j);
	case K_RS:
		return fold(o, n, (size_t)r * c + j);
	case K_AG:
		return in_val(o->dt, o->seed, (int)(j / c), j % c);
	case K_BC:
		return in_val(o->dt, o->seed, o->root, j);
	case K_A2A:
		return in_val(o->dt, o->seed, (int)(j / c), (size_t)r * c + j % c);
	default: /* the ring: from the rank before */
		return in_val(o->dt, o->seed, (r + n - 1) % n, j);
	}
}

static int reduces(enum kind k)
{
	return k == K_AR || k == K_RS || k == K_RD;
}

static int matches(const struct op *o, uint64_t got, uint64_t want)
{
	if (reduces(o->kind) && o->redop == COMM_AVG && o->dt == COMM_FLOAT32)
		return ref_near(o->dt, got, want, 1e-6);
	if (reduces(o->kind) && o->redop == COMM_AVG && o->dt == COMM_FLOAT64)
		return ref_near(o->dt, got, want, 1e-12);
	return ref_same(o->dt, got, want);
}

/* Elements of the send and recv buffers of o on n ranks. */
static void elems(const struct op *o, int n, size_t *sn, size_t *rn)
{
	size_t all = (size_t)n * o->count;

	*sn = *rn = o->count;
	if (o->kind == K_RS || o->kind == K_A2A)
		*sn = all;
	if (o->kind == K_AG || o->kind == K_A2A)
		*rn = all;
	if (o->kind == K_BARRIER)
		*sn = *rn = 0;
}

/* The next op of a job: every rank draws the same from g. */
static void op_draw(uint64_t *g, const struct job *j, int k, struct op *o)
{
	size_t cap = j->fault == F_STOP ? STOP_ELEMS : MAX_ELEMS, mul, max;
	uint64_t u;

	o->k = k;
	o->kind = (enum kind)(j->cycle ? (uint64_t)k % K_NKINDS : rnd(g) % K_NKINDS);
	/* a split's join waits half the deadline for a rank a fault took: none in victims */
	if (o->kind == K_SPLIT && j->fault != F_NONE)
		o->kind = K_AR;
	o->dt = dtypes[rnd(g) % NDTYPES];
	o->redop = (comm_redop_t)(rnd(g) % 5);
	mul = o->kind == K_RS || o->kind == K_AG || o->kind == K_A2A ? (size_t)j->n : 1;
	max = cap / mul;
	u = rnd(g) % 100;
	if (u < 50)
		o->count = 1 + rnd(g) % 64;
	else if (u < 80)
		o->count = 65 + rnd(g) % 16320;
	else if (u < 95)
		o->count = 16385 + rnd(g) % (128u << 10);
	else
		o->count = 1 + rnd(g) % max;
	if (o->count > max)
		o->count = max;
	o->root = (int)(rnd(g) % (uint64_t)j->n);
	o->inplace = o->kind != K_RING && rnd(g) % 2;
	o->seed = rnd(g);
}

/* --- a rank ---------------------------------------------------------------- */

struct buf {
	char *p;
	size_t len;  /* without the guard */
	int zc;
};

/* One op of a rank, posted and maybe not yet waited for. */
struct pend {
	struct op o;
	struct buf s, rv;   /* rv unused in place */
	char *send, *recv;  /* what was passed (NULL where allowed) */
	size_t sn, rn;
	int s_in, r_out;    /* the rank gives input, gets output */
	comm_request_t *req[2];
	int nreq;
};

static int buf_get(comm_t *c, struct buf *b, size_t bytes, int zc)
{
	b->len = bytes;
	b->zc = zc;
	b->p = ref_buf_alloc(c, zc, bytes + REF_GUARD);
	if (!b->p)
		return -1;
	memset(b->p, REF_POISON, bytes + REF_GUARD);
	return 0;
}

static void buf_put(comm_t *c, struct buf *b)
{
	if (b->p)
		ref_buf_free(c, b->zc, b->p);
	b->p = NULL;
}

/* Buffers for o on rank r, the input in place; lr draws the rank's own choices. */
static int pend_setup(comm_t *c, struct pend *p, const struct op *o, int r, int n, uint64_t *lr)
{
	size_t es = ref_size(o->dt), blk = o->count * es;
	int is_root = r == o->root, nul = (int)(rnd(lr) % 2);

	memset(p, 0, sizeof *p);
	p->o = *o;
	elems(o, n, &p->sn, &p->rn);
	p->s_in = o->kind != K_BC || is_root;
	p->r_out = o->kind != K_RD || is_root;
	if (o->kind == K_BARRIER)
		return 0;
	if (o->inplace) {
		if (buf_get(c, &p->s, (p->sn > p->rn ? p->sn : p->rn) * es, (int)(rnd(lr) % 2)) < 0)
			return -1;
		p->send = p->recv = p->s.p;
		if (o->kind == K_RS)
			p->recv = p->s.p + (size_t)r * blk;
		if (o->kind == K_AG)
			p->send = p->s.p + (size_t)r * blk;
	} else {
		if (p->s_in || !nul) {
			if (buf_get(c, &p->s, p->sn * es, (int)(rnd(lr) % 2)) < 0)
				return -1;
			p->send = p->s.p;
		}
		if (p->r_out || !nul) {
			if (buf_get(c, &p->rv, p->rn * es, (int)(rnd(lr) % 2)) < 0)
				return -1;
			p->recv = p->rv.p;
		}
	}
	for (size_t i = 0; p->s_in && i < p->sn; i++)
		ref_store(o->dt, in_val(o->dt, o->seed, r, i), p->send + i * es);
	return 0;
}

static void pend_free(comm_t *c, struct pend *p)
{
	buf_put(c, &p->s);
	buf_put(c, &p->rv);
}

/* Post p; with async its requests are in p->req. The call's result. */
static comm_result_t pend_post(comm_t *c, struct pend *p, int r, int n, int async, uint64_t *lr)
{
	const struct op *o = &p->o;
	comm_request_t **rq = async ? &p->req[0] : NULL;
	comm_result_t rc, rc2, rc3;
	int next = (r + 1) % n, prev = (r + n - 1) % n;

	p->nreq = async;
	switch (o->kind) {
	case K_AR:
		return comm_allreduce(c, p->send, p->recv, o->count, o->dt, o->redop, rq);
	case K_RS:
		return comm_reduce_scatter(c, p->send, p->recv, o->count, o->dt, o->redop, rq);
	case K_AG:
		return comm_allgather(c, p->send, p->recv, o->count, o->dt, rq);
	case K_BC:
		return comm_broadcast(c, p->send, p->recv, o->count, o->dt, o->root, rq);
	case K_RD:
		return comm_reduce(c, p->send, p->recv, o->count, o->dt, o->redop, o->root, rq);
	case K_A2A:
		return comm_alltoall(c, p->send, p->recv, o->count, o->dt, rq);
	case K_BARRIER:
		return comm_barrier(c, rq);
	default:
		break;
	}
	/* the ring: in a group (blocking, or with requests), or two requests without one */
	p->nreq = 0;
	if (async && n > 1 && rnd(lr) % 2) {
		if (rnd(lr) % 2) {
			rc = comm_send(c, p->send, o->count, o->dt, next, &p->req[0]);
			if (rc != COMM_OK)
				return rc;
			p->nreq = 1;
			rc = comm_recv(c, p->recv, o->count, o->dt, prev, &p->req[1]);
		} else {
			rc = comm_recv(c, p->recv, o->count, o->dt, prev, &p->req[0]);
			if (rc != COMM_OK)
				return rc;
			p->nreq = 1;
			rc = comm_send(c, p->send, o->count, o->dt, next, &p->req[1]);
		}
		p->nreq += rc == COMM_OK;
		return rc;
	}
	rc = comm_group_start(c);
	if (rc != COMM_OK)
		return rc;
	rc = comm_send(c, p->send, o->count, o->dt, next, async ? &p->req[0] : NULL);
	if (rc == COMM_OK && async)
		p->nreq = 1;
	rc2 = comm_recv(c, p->recv, o->count, o->dt, prev, async ? &p->req[p->nreq] : NULL);
	if (rc2 == COMM_OK && async)
		p->nreq++;
	rc3 = comm_group_end(c);
	return rc != COMM_OK ? rc : rc2 != COMM_OK ? rc2 : rc3;
}

/* Wait for p's requests; the first failure, or COMM_OK. */
static comm_result_t pend_wait(struct pend *p)
{
	comm_result_t rc = COMM_OK, w;

	for (int i = 0; i < p->nreq; i++) {
		w = comm_wait(p->req[i], -1);
		if (rc == COMM_OK)
			rc = w;
	}
	p->nreq = 0;
	return rc;
}

/* Whether p's results, inputs, untouched buffers and guards are right; why not in why. */
static int pend_check(const struct pend *p, int r, int n, char *why, size_t len)
{
	const struct op *o = &p->o;
	size_t es = ref_size(o->dt);
	char g[48], w[48];

	if (o->kind == K_BARRIER)
		return 1;
	for (size_t j = 0; p->r_out && j < p->rn; j++) {
		uint64_t want = expect(o, r, n, j), got = ref_load(o->dt, p->recv + j * es);

		if (!matches(o, got, want)) {
			ref_str(o->dt, got, g, sizeof g);
			ref_str(o->dt, want, w, sizeof w);
			snprintf(why, len, "element %zu of %zu is %s, expected %s", j, p->rn, g, w);
			return 0;
		}
	}
	/* inputs stay as they were unless in place (a non-root's reduce input always) */
	for (size_t i = 0; p->s_in && (!o->inplace || !p->r_out) && i < p->sn; i++) {
		uint64_t in = in_val(o->dt, o->seed, r, i);

		if (memcmp(p->send + i * es, &in, es) != 0) {
			snprintf(why, len, "input element %zu of %zu was changed", i, p->sn);
			return 0;
		}
	}
	if (!o->inplace && !p->s_in && p->send && !ref_all_bytes(p->send, p->sn * es, REF_POISON)) {
		snprintf(why, len, "the non-root's sendbuf was written");
		return 0;
	}
	if (!o->inplace && !p->r_out && p->recv && !ref_all_bytes(p->recv, p->rn * es, REF_POISON)) {
		snprintf(why, len, "the non-root's recvbuf was written");
		return 0;
	}
	if ((p->s.p && !ref_guard_ok(p->s.p + p->s.len)) ||
	    (p->rv.p && !ref_guard_ok(p->rv.p + p->rv.len))) {
		snprintf(why, len, "written past the end of a buffer");
		return 0;
	}
	return 1;
}

struct rank {
	comm_t *c;
	struct job *j;
	struct rank_state *me;
	int r, n;
	uint64_t lr;              /* the rank's own choices */
	struct pend q[MAX_OUT];   /* outstanding, oldest first */
	int nq;
};

static void note_failure(struct rank *k, comm_result_t rc, int op)
{
	struct rank_state *me = k->me;

	if (me->rc != COMM_OK)
		return;
	snprintf(me->detail, sizeof me->detail, "%s", comm_last_error(k->c));
	me->err_op = op;
	me->err_ms = mono_ms();
	__atomic_store_n(&me->rc, rc, __ATOMIC_RELEASE);
}

/* An op is over with result rc: check it, count it, free it. */
static void pend_finish(struct rank *k, struct pend *p, comm_result_t rc)
{
	struct rank_state *me = k->me;
	char why[160];

	if (rc == COMM_OK) {
		if (!pend_check(p, k->r, k->n, why, sizeof why)) {
			if (!me->wrong++)
				snprintf(me->wrong_what, sizeof me->wrong_what,
					 "op %d (%s, %s, %s, %zu, root %d%s%s): %s", p->o.k,
					 kind_names[p->o.kind], ref_dtype_name(p->o.dt),
					 ref_op_name(p->o.redop), p->o.count, p->o.root,
					 p->o.inplace ? ", in place" : "",
					 p->s.zc || p->rv.zc ? "" : ", staged", why);
		} else {
			__atomic_add_fetch(&me->ops, 1, __ATOMIC_RELEASE);
		}
		if (me->rc != COMM_OK)
			me->ok_after++;
	} else {
		note_failure(k, rc, p->o.k);
	}
	pend_free(k->c, p);
}

/* Wait for the oldest outstanding op. */
static void drain_one(struct rank *k)
{
	struct pend p = k->q[0];

	memmove(&k->q[0], &k->q[1], (size_t)(k->nq - 1) * sizeof k->q[0]);
	k->nq--;
	k->me->cur_waiting = 1;
	pend_finish(k, &p, pend_wait(&p));
	k->me->cur_waiting = 0;
}

static void drain(struct rank *k)
{
	while (k->nq > 0)
		drain_one(k);
}

/*
 * Split the job by colors and keys drawn from the op's seed (some ranks
 * in none); in each new communicator check rank and size, all-reduce the
 * parent ranks, and finalize it.
 */
static void split_op(struct rank *k, const struct op *o)
{
	int color[MAX_RANKS], key[MAX_RANKS], r = k->r, want_rank = 0, want_size = 0;
	int32_t v[1000];
	long want_sum = 0;
	comm_t *child = NULL;
	comm_result_t rc;
	size_t count = 1 + o->seed % 1000;

	for (int q = 0; q < k->n; q++) {
		unsigned c = (unsigned)(o->seed >> (q * 4)) & 3;

		color[q] = c == 3 ? COMM_SPLIT_NOCOLOR : (int)(c % 2);
		key[q] = (int)(o->seed >> (24 + q * 4)) & 3;
	}
	for (int q = 0; q < k->n; q++) {
		if (color[q] != color[r])
			continue;
		want_size++;
		want_sum += q + 1;
		want_rank += key[q] < key[r] || (key[q] == key[r] && q < r);
	}
	drain(k);
	rc = comm_split(k->c, color[r], key[r], &child);
	if (rc != COMM_OK) {
		note_failure(k, rc, o->k);
		return;
	}
	if (color[r] == COMM_SPLIT_NOCOLOR) {
		if (child) {
			snprintf(k->me->wrong_what, sizeof k->me->wrong_what,
				 "op %d (split): no color, yet a communicator", o->k);
			k->me->wrong++;
			comm_finalize(child);
		} else {
			k->me->ops++;
		}
		return;
	}
	if (!child || comm_rank(child) != want_rank || comm_size(child) != want_size) {
		snprintf(k->me->wrong_what, sizeof k->me->wrong_what,
			 "op %d (split, color %d, key %d): rank %d of %d, expected %d of %d", o->k,
			 color[r], key[r], child ? comm_rank(child) : -1,
			 child ? comm_size(child) : -1, want_rank, want_size);
		k->me->wrong++;
		if (child)
			comm_abort(child);
		return;
	}
	for (size_t i = 0; i < count; i++)
		v[i] = r + 1 + (int32_t)i;
	rc = comm_allreduce(child, v, v, count, COMM_INT32, COMM_SUM, NULL);
	if (rc != COMM_OK) {
		snprintf(k->me->detail, sizeof k->me->detail, "split's all-reduce: %s",
			 comm_last_error(child));
		comm_abort(child);
		k->me->err_op = o->k;
		k->me->err_ms = mono_ms();
		__atomic_store_n(&k->me->rc, rc, __ATOMIC_RELEASE);
		return;
	}
	for (size_t i = 0; i < count; i++) {
		if (v[i] != want_sum + (long)want_size * (long)i) {
			snprintf(k->me->wrong_what, sizeof k->me->wrong_what,
				 "op %d (split's all-reduce of %zu): element %zu is %d, expected %ld",
				 o->k, count, i, v[i], want_sum + (long)want_size * (long)i);
			k->me->wrong++;
			break;
		}
	}
	rc = comm_finalize(child);
	if (rc != COMM_OK) {
		snprintf(k->me->detail, sizeof k->me->detail, "split's comm_finalize");
		k->me->err_op = o->k;
		k->me->err_ms = mono_ms();
		__atomic_store_n(&k->me->rc, rc, __ATOMIC_RELEASE);
		return;
	}
	k->me->ops++;
}

/*
 * Two in-place SUM all-reduces of one buffer, both posted before either is
 * waited for: the second reads the first's result (staged too: libcomm
 * holds it back until the first is in), so every rank ends with n times
 * the sum.
 */
static void chain_op(struct rank *k, const struct op *o)
{
	static const comm_dtype_t dts[] = { COMM_INT32, COMM_INT64, COMM_FLOAT32, COMM_FLOAT64 };
	comm_dtype_t dt = dts[o->seed % 4];
	size_t es = ref_size(dt);
	comm_request_t *req[2];
	comm_result_t rc = COMM_OK, w;
	struct op sum = *o;
	struct buf b;
	int posted = 0;

	sum.dt = dt;
	sum.redop = COMM_SUM;
	drain(k);
	if (buf_get(k->c, &b, o->count * es, (int)(rnd(&k->lr) % 2)) < 0) {
		k->me->wrong++;
		snprintf(k->me->wrong_what, sizeof k->me->wrong_what, "op %d: no memory", o->k);
		note_failure(k, COMM_ERR_NO_MEMORY, o->k);
		return;
	}
	for (size_t i = 0; i < o->count; i++)
		ref_store(dt, in_val(dt, o->seed, k->r, i), b.p + i * es);
	for (; posted < 2 && rc == COMM_OK; posted += rc == COMM_OK)
		rc = comm_allreduce(k->c, b.p, b.p, o->count, dt, COMM_SUM, &req[posted]);
	k->me->cur_waiting = 1;
	for (int i = 0; i < posted; i++) {
		w = comm_wait(req[i], -1);
		if (rc == COMM_OK)
			rc = w;
	}
	k->me->cur_waiting = 0;
	if (rc != COMM_OK) {
		note_failure(k, rc, o->k);
		buf_put(k->c, &b);
		return;
	}
	for (size_t i = 0; i < o->count; i++) {
		uint64_t want = ref_bits(dt, ref_value(dt, fold(&sum, k->n, i)) * k->n);
		uint64_t got = ref_load(dt, b.p + i * es);

		if (!ref_same(dt, got, want) || !ref_guard_ok(b.p + b.len)) {
			char g[48], wv[48];

			ref_str(dt, got, g, sizeof g);
			ref_str(dt, want, wv, sizeof wv);
			k->me->wrong++;
			snprintf(k->me->wrong_what, sizeof k->me->wrong_what,
				 "op %d (two chained all-reduces, %s, %zu%s): element %zu is %s, "
				 "expected %s (or the guard was hit)",
				 o->k, ref_dtype_name(dt), o->count, b.zc ? "" : ", staged", i, g,
				 wv);
			break;
		}
	}
	if (!k->me->wrong)
		k->me->ops++;
	if (k->me->rc != COMM_OK)
		k->me->ok_after++;
	buf_put(k->c, &b);
}

/* Draw, post and (blocking, or when too many are out) check one op. */
static void one_op(struct rank *k, const struct op *o)
{
	struct pend *p = &k->q[k->nq];
	int async = rnd(&k->lr) % 100 < 40;
	comm_result_t rc;

	k->me->cur_op = o->k;
	k->me->cur_kind = o->kind;
	if (o->kind == K_SPLIT) {
		split_op(k, o);
		return;
	}
	if (o->kind == K_CHAIN) {
		chain_op(k, o);
		return;
	}
	if (pend_setup(k->c, p, o, k->r, k->n, &k->lr) < 0) {
		snprintf(k->me->wrong_what, sizeof k->me->wrong_what,
			 "op %d: %zu elements: no memory: %s", o->k, o->count,
			 comm_last_error(k->c));
		k->me->wrong++;
		note_failure(k, COMM_ERR_NO_MEMORY, o->k);
		pend_free(k->c, p);
		return;
	}
	rc = pend_post(k->c, p, k->r, k->n, async, &k->lr);
	if (rc != COMM_OK || !async || p->nreq == 0) {
		struct pend now = *p;

		if (async)
			rc = rc != COMM_OK ? (pend_wait(&now), rc) : pend_wait(&now);
		/* the ops posted before it are over (answers come in posting order): theirs first */
		drain(k);
		pend_finish(k, &now, rc);
		return;
	}
	if (++k->nq == MAX_OUT)
		drain_one(k);
}

/*
 * Every rank of job j posts the mismatched op (blocking; the victim's
 * differs as j->mis says): MISMATCH everywhere; then an all-reduce that
 * must be right.
 */
static void mismatch(struct rank *k)
{
	struct job *j = k->j;
	int victim = k->r == j->victim, root = 0, n = k->n;
	int32_t v[1000], out[1000 * MAX_RANKS];
	comm_result_t rc;

	for (int i = 0; i < 1000; i++)
		v[i] = k->r + 1 + i;
	if (victim)
		__atomic_store_n(&j->fault_ms, mono_ms(), __ATOMIC_RELEASE);
	switch (j->mis) {
	case MIS_COUNT:
		rc = comm_allreduce(k->c, v, out, victim ? 1000 : 999, COMM_INT32, COMM_SUM, NULL);
		break;
	case MIS_DTYPE:
		rc = comm_allreduce(k->c, v, out, 999, victim ? COMM_FLOAT32 : COMM_INT32, COMM_SUM,
				    NULL);
		break;
	case MIS_REDOP:
		rc = comm_allreduce(k->c, v, out, 999, COMM_INT32, victim ? COMM_MAX : COMM_SUM, NULL);
		break;
	case MIS_ROOT:
		root = victim ? 1 % n : 0;
		if (j->victim == 1 % n) /* the victim names a root the others do not */
			root = victim ? 0 : 1 % n;
		rc = comm_broadcast(k->c, v, out, 999, COMM_INT32, root, NULL);
		break;
	default:
		rc = victim ? comm_allgather(k->c, v, out, 999, COMM_INT32, NULL)
			    : comm_allreduce(k->c, v, out, 999, COMM_INT32, COMM_SUM, NULL);
		break;
	}
	if (rc == COMM_OK)
		k->me->ok_after++; /* judged as no error where MISMATCH was due */
	note_failure(k, rc, -1);
	rc = comm_allreduce(k->c, v, v, 1000, COMM_INT32, COMM_SUM, NULL);
	k->me->after_ok = rc == COMM_OK;
	for (int i = 0; rc == COMM_OK && i < 1000; i++)
		if (v[i] != n * (n + 1) / 2 + n * i)
			k->me->after_ok = 0;
	if (rc != COMM_OK)
		snprintf(k->me->wrong_what, sizeof k->me->wrong_what,
			 "the all-reduce after the mismatch: %s: %s", comm_result_name(rc),
			 comm_last_error(k->c));
}

/*
 * A rank of a chaos job: random ops until the ranks agree to stop (a clean
 * job's budget ran out) or one fails; then leave. What it saw goes to the
 * shared job; it exits 0 unless it could not join.
 */
static int rank_chaos(int r, int n, void *arg)
{
	struct job *j = arg;
	struct rank k = { .j = j, .me = &j->rs[r], .r = r, .n = n };
	uint64_t g = j->seed;
	char tmo[16];
	long t0;
	int stop = 0;

	k.lr = j->seed ^ ((uint64_t)(r + 1) << 48);
	if (j->fault == F_STOP)
		snprintf(tmo, sizeof tmo, "%d", STOP_TIMEOUT_MS);
	else
		snprintf(tmo, sizeof tmo, "%d", CLEAN_TIMEOUT_MS);
	setenv("COMM_TIMEOUT", tmo, 1);
	if (j->ring_off)
		setenv("COMM_RING", "0", 1);
	if (j->keep_off)
		setenv("COMM_KEEP_MB", "0", 1);
	if (th_join(&k.c, r, n) < 0) {
		k.me->rc = COMM_ERR_INTERNAL;
		snprintf(k.me->detail, sizeof k.me->detail, "comm_init failed: %s",
			 comm_last_error(NULL));
		k.me->done = 1;
		return 1;
	}
	t0 = mono_ms();
	for (int op = 0; !stop && k.me->rc == COMM_OK; op++) {
		struct op o;

		if (j->fault == F_LEAVE && r == j->victim && op == j->fault_op) {
			drain(&k);
			__atomic_store_n(&j->fault_ms, mono_ms(), __ATOMIC_RELEASE);
			k.me->fin_rc = comm_finalize(k.c);
			k.me->done = 1;
			return 0;
		}
		if (j->fault == F_RABORT && r == j->victim && op == j->fault_op) {
			/* with its requests outstanding */
			__atomic_store_n(&j->fault_ms, mono_ms(), __ATOMIC_RELEASE);
			k.me->fin_rc = comm_abort(k.c);
			k.me->done = 1;
			return 0;
		}
		if (j->fault == F_EXIT && r == j->victim && op == j->fault_op) {
			/* its socket closed by the kernel, its requests outstanding */
			__atomic_store_n(&j->fault_ms, mono_ms(), __ATOMIC_RELEASE);
			k.me->done = 1;
			_exit(0);
		}
		if (j->fault == F_MISMATCH && op == j->fault_op) {
			drain(&k);
			mismatch(&k);
			break;
		}
		if (op % AGREE_EVERY == AGREE_EVERY - 1) {
			int32_t want, got;
			comm_result_t rc;

			drain(&k);
			if (k.me->rc != COMM_OK)
				break;
			want = mono_ms() - t0 > (j->fault != F_NONE ? VICTIM_MAX_MS : j->budget_ms);
			got = want;
			k.me->cur_op = op;
			k.me->cur_kind = -1;
			rc = comm_allreduce(k.c, &got, &got, 1, COMM_INT32, COMM_MAX, NULL);
			if (rc != COMM_OK) {
				note_failure(&k, rc, op);
				break;
			}
			if (got != 0 && got != 1) {
				k.me->wrong++;
				snprintf(k.me->wrong_what, sizeof k.me->wrong_what,
					 "op %d (the all-reduce to stop): MAX of 0 and 1 is %d", op,
					 (int)got);
			}
			k.me->ops++;
			stop = got != 0;
			continue;
		}
		op_draw(&g, j, op, &o);
		one_op(&k, &o);
	}
	drain(&k);
	alarm(60); /* comm_finalize has an end too */
	k.me->fin_rc = comm_finalize(k.c);
	__atomic_store_n(&k.me->done, 1, __ATOMIC_RELEASE);
	return 0;
}

/* --- the test: jobs in slots, faults, judgement ------------------------------ */

struct slot {
	int used;
	struct job *j;          /* shared with its ranks */
	struct th_ranks rs;
	int status[MAX_RANKS];
	int reaped[MAX_RANKS];
	int left;               /* ranks not yet reaped */
	long start_ms;
	long ops_from_ms;       /* every rank had finished an op (0: not yet) */
	int delay_ms;           /* kill, stop, abort: this long after ops_from_ms */
	long cont_ms;           /* stop: when to SIGCONT the victim (0: not stopped) */
	int hung;
	int abort_rc;
};

static struct {
	int jobs, clean, victims, failed;
	long ops;
	int faults[F_NKINDS];
	int wrong, hangs, early, late, wrong_code;
	long worst_ms[F_NKINDS]; /* the longest a survivor waited for its error */
} tally;

static int next_id;

/* COMM_CHAOS_FREEZE: the daemon frozen now (-1: none); thawed before commctl asks it anything */
static int frozen = -1;

static void thaw(void)
{
	if (frozen >= 0)
		kill(ds[frozen]->pid, SIGCONT);
	frozen = -1;
}

/* Names of jobs just ended, for new jobs to take again (as a restarted job would) */
#define NRECENT 8
static char recent[NRECENT][32];
static int nrecent;

static void recent_add(const char *name)
{
	if (nrecent == NRECENT)
		memmove(recent[0], recent[1], sizeof recent[0] * (NRECENT - 1));
	else
		nrecent++;
	snprintf(recent[nrecent - 1], sizeof recent[0], "%s", name);
}

static const char *ctl_bin(void)
{
	return getenv("COMMCTL") ? getenv("COMMCTL") : "./client/commctl";
}

/* Draw job j from g; a victim with victim_pct percent. */
static void job_plan(struct job *j, uint64_t *g, int victim_pct)
{
	int where;

	memset(j, 0, sizeof *j);
	snprintf(j->name, sizeof j->name, "chaos-%d", ++next_id);
	if (victim_pct > 0 && nrecent > 0 && rnd(g) % 4 == 0) {
		int i = (int)(rnd(g) % (uint64_t)nrecent);

		snprintf(j->name, sizeof j->name, "%s", recent[i]);
		memmove(recent[i], recent[i + 1], sizeof recent[0] * (size_t)(nrecent - i - 1));
		nrecent--;
		j->reused = 1;
	}
	j->seed = rnd(g);
	j->n = 1 + (int)(rnd(g) % MAX_RANKS);
	where = (int)(rnd(g) % (j->n == 1 ? 2 : 3));
	j->root = -1;
	for (int r = 0; r < j->n; r++)
		j->daemon_of[r] = where < 2 ? where : (int)(rnd(g) % 2);
	if (where == 2) {
		j->daemon_of[rnd(g) % (uint64_t)j->n] = 0;
		for (int r = 0, b = 0; r < j->n && !b; r++)
			if ((b = j->daemon_of[r] == 1) == 0 && r == j->n - 1)
				j->daemon_of[r] = 1;
		j->root = (int)(rnd(g) % 2);
	} else if (rnd(g) % 4 == 0) {
		/* one daemon's job named by a root: that daemon, or the other with none of its ranks */
		j->root = (int)(rnd(g) % 2);
	}
	j->ring_off = rnd(g) % 4 == 0;
	j->keep_off = rnd(g) % 4 == 0;
	j->budget_ms = 1000 + (int)(rnd(g) % 5000);
	if ((int)(rnd(g) % 100) < victim_pct) {
		j->fault = j->n == 1 ? (rnd(g) % 2 ? F_KILL : F_ABORT)
				     : (enum fault)(1 + rnd(g) % (F_NKINDS - 1));
		j->victim = (int)(rnd(g) % (uint64_t)j->n);
		j->fault_op = 2 + (int)(rnd(g) % 40);
		j->mis = (enum mis)(rnd(g) % MIS_NKINDS);
	}
}

/* "A A B, root B, ring off" */
static void job_describe(const struct job *j, char *buf, size_t len)
{
	size_t n = 0;

	for (int r = 0; r < j->n; r++)
		n += (size_t)snprintf(buf + n, len - n, "%s%c", r ? " " : "",
				      j->daemon_of[r] ? 'B' : 'A');
	if (j->root >= 0)
		n += (size_t)snprintf(buf + n, len - n, ", root %c", j->root ? 'B' : 'A');
	if (j->ring_off)
		n += (size_t)snprintf(buf + n, len - n, ", COMM_RING=0");
	if (j->keep_off)
		n += (size_t)snprintf(buf + n, len - n, ", COMM_KEEP_MB=0");
	if (j->reused)
		snprintf(buf + n, len - n, ", name taken again");
}

static void slot_start(struct slot *s, const struct job *plan)
{
	struct job *j = mmap(NULL, sizeof *j, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS,
			     -1, 0);

	REQUIRE(j != MAP_FAILED, "mmap");
	*j = *plan;
	memset(s, 0, sizeof *s);
	s->j = j;
	s->used = 1;
	s->left = j->n;
	s->start_ms = mono_ms();
	s->delay_ms = j->seed % 4 ? 100 + (int)(j->seed % 2500) : (int)(j->seed % 50);
	REQUIRE(th_ranks_start_nodes(&s->rs, ds, j->daemon_of, j->root < 0 ? NULL : ds[j->root]->peer,
				     j->name, j->n, rank_chaos, j) == 0,
		"%s: fork", j->name);
}

/* The fault of s's job, now. */
static void slot_inject(struct slot *s, long now)
{
	struct job *j = s->j;
	pid_t pid = s->rs.pids[j->victim];
	char cmd[512];

	__atomic_store_n(&j->fault_ms, now, __ATOMIC_RELEASE);
	switch (j->fault) {
	case F_KILL:
		kill(pid, SIGKILL);
		break;
	case F_STOP:
		kill(pid, SIGSTOP);
		s->cont_ms = now + STOP_TIMEOUT_MS + 2000;
		break;
	default:
		snprintf(cmd, sizeof cmd, "%s --socket %s abort %s --reason chaos >/dev/null 2>&1",
			 ctl_bin(), ds[j->daemon_of[j->victim]]->sock, j->name);
		s->abort_rc = system(cmd);
		break;
	}
}

/* What a hung job's ranks are doing, and what the daemons say of it; then kill them. */
static void slot_hang(struct slot *s)
{
	struct job *j = s->j;
	char cmd[512];

	fprintf(stderr, "job %s (seed %llu, fault %s) hangs %.1f s after it started:\n", j->name,
		(unsigned long long)j->seed, fault_names[j->fault],
		(mono_ms() - s->start_ms) / 1000.0);
	for (int r = 0; r < j->n; r++) {
		struct rank_state *m = &j->rs[r];

		fprintf(stderr, "  rank %d on %c: %s, op %d (%s), %s; %d ops right; %s: %s\n", r,
			j->daemon_of[r] ? 'B' : 'A', s->reaped[r] ? "gone" : "alive", m->cur_op,
			m->cur_kind < 0 ? "the all-reduce to stop" : kind_names[m->cur_kind],
			m->cur_waiting ? "waiting" : "posting", m->ops,
			comm_result_name((comm_result_t)m->rc), m->detail);
	}
	fflush(stderr);
	thaw();
	for (int d = 0; d < 2; d++) {
		snprintf(cmd, sizeof cmd, "%s --socket %s jobs %s 1>&2", ctl_bin(), ds[d]->sock,
			 j->name);
		if (system(cmd) != 0)
			fprintf(stderr, "  (commctl jobs on %c failed)\n", d ? 'B' : 'A');
	}
	for (int r = 0; r < j->n; r++) {
		if (s->reaped[r])
			continue;
		kill(s->rs.pids[r], SIGKILL);
		kill(s->rs.pids[r], SIGCONT);
	}
	s->hung = 1;
}

/* The error a fault's survivors must get. */
static comm_result_t fitting_code(enum fault f)
{
	switch (f) {
	case F_KILL:
	case F_LEAVE:
	case F_EXIT:
		return COMM_ERR_PEER_LOST;
	case F_STOP:
		return COMM_ERR_TIMEOUT;
	case F_ABORT:
	case F_RABORT:
		return COMM_ERR_ABORTED;
	default:
		return COMM_ERR_MISMATCH;
	}
}

/* How rank r ended: "exit 0", "signal 9" */
static const char *ended(int st, char *buf, size_t len)
{
	if (WIFEXITED(st))
		snprintf(buf, len, "exit %d", WEXITSTATUS(st));
	else if (WIFSIGNALED(st))
		snprintf(buf, len, "signal %d (%s)", WTERMSIG(st), strsignal(WTERMSIG(st)));
	else
		snprintf(buf, len, "status %#x", st);
	return buf;
}

/* Judge a job whose ranks are all gone: print its line; 1 when it did as it should. */
static int slot_judge(struct slot *s)
{
	struct job *j = s->j;
	char where[128], why[1024] = "", how[48];
	size_t wn = 0;
	long worst = -1;
	int ops = 0, bad = 0;

#define WHY(...)                                                                       \
	do {                                                                           \
		if (wn < sizeof why)                                                   \
			wn += (size_t)snprintf(why + wn, sizeof why - wn, "%s", wn ? "; " : ""); \
		if (wn < sizeof why)                                                   \
			wn += (size_t)snprintf(why + wn, sizeof why - wn, __VA_ARGS__); \
		bad = 1;                                                               \
	} while (0)

	job_describe(j, where, sizeof where);
	for (int r = 0; r < j->n; r++) {
		struct rank_state *m = &j->rs[r];

		ops += m->ops;
		if (m->wrong) {
			WHY("rank %d: %d wrong: %s", r, m->wrong, m->wrong_what);
			tally.wrong++;
		}
	}
	if (s->hung) {
		WHY("hung (its ranks killed)");
		tally.hangs++;
	}
	if (j->fault == F_NONE) {
		for (int r = 0; r < j->n; r++) {
			struct rank_state *m = &j->rs[r];

			if (!WIFEXITED(s->status[r]) || WEXITSTATUS(s->status[r]) != 0)
				WHY("rank %d: %s", r, ended(s->status[r], how, sizeof how));
			if (m->rc != COMM_OK)
				WHY("rank %d: op %d: %s: %s", r, m->err_op,
				    comm_result_name((comm_result_t)m->rc), m->detail);
			if (m->fin_rc != COMM_OK)
				WHY("rank %d: comm_finalize: %s", r,
				    comm_result_name((comm_result_t)m->fin_rc));
		}
	} else {
		long f = j->fault_ms;

		if (!f)
			WHY("the fault never came");
		for (int r = 0; r < j->n && !f; r++)
			if (j->rs[r].rc != COMM_OK)
				WHY("rank %d: op %d: %s: %s", r, j->rs[r].err_op,
				    comm_result_name((comm_result_t)j->rs[r].rc), j->rs[r].detail);
		if (j->fault == F_ABORT && s->abort_rc != 0)
			WHY("commctl abort: status %#x", s->abort_rc);
		for (int r = 0; r < j->n; r++) {
			struct rank_state *m = &j->rs[r];
			int victim = r == j->victim;
			int survivor = !victim || j->fault == F_ABORT || j->fault == F_MISMATCH;
			long ms = m->err_ms - f;

			if (victim && j->fault == F_KILL) {
				if (!WIFSIGNALED(s->status[r]) || WTERMSIG(s->status[r]) != SIGKILL)
					WHY("the killed rank %d: %s", r,
					    ended(s->status[r], how, sizeof how));
				continue;
			}
			if (!WIFEXITED(s->status[r]) || WEXITSTATUS(s->status[r]) != 0)
				WHY("rank %d: %s", r, ended(s->status[r], how, sizeof how));
			if (victim && (j->fault == F_LEAVE || j->fault == F_RABORT)) {
				if (m->fin_rc != COMM_OK)
					WHY("the leaving rank %d: %s: %s", r,
					    j->fault == F_LEAVE ? "comm_finalize" : "comm_abort",
					    comm_result_name((comm_result_t)m->fin_rc));
				continue;
			}
			if (victim && j->fault == F_EXIT)
				continue;
			if (victim && j->fault == F_STOP) {
				if (m->rc == COMM_OK)
					WHY("the stopped rank %d got no error", r);
				continue;
			}
			if (!survivor || !f)
				continue;
			if (m->rc == COMM_OK) {
				WHY("rank %d: no error", r);
				tally.wrong_code++;
				continue;
			}
			if (m->rc != (int)fitting_code(j->fault)) {
				WHY("rank %d: %s at op %d: %s", r, comm_result_name((comm_result_t)m->rc),
				    m->err_op, m->detail);
				tally.wrong_code++;
			}
			if (ms < 0) {
				WHY("rank %d: %s %ld ms before the fault: %s", r,
				    comm_result_name((comm_result_t)m->rc), -ms, m->detail);
				tally.early++;
			} else if (ms > ERROR_LIMIT_MS) {
				WHY("rank %d: %s only %ld ms after the fault", r,
				    comm_result_name((comm_result_t)m->rc), ms);
				tally.late++;
			}
			if (ms > worst)
				worst = ms;
			if (m->ok_after && j->fault != F_LEAVE)
				WHY("rank %d: %d ops succeeded after its first failure", r,
				    m->ok_after);
			if (j->fault == F_MISMATCH && !m->after_ok)
				WHY("rank %d: %s", r, m->wrong_what);
		}
		if (worst > tally.worst_ms[j->fault])
			tally.worst_ms[j->fault] = worst;
	}
#undef WHY
	tally.jobs++;
	tally.ops += ops;
	if (j->fault == F_NONE) {
		tally.clean++;
		printf("job %s: %d rank%s (%s): %s%d ops right in %.1f s%s%s\n", j->name, j->n,
		       j->n > 1 ? "s" : "", where, bad ? "FAILED: " : "", ops,
		       (mono_ms() - s->start_ms) / 1000.0, bad ? ": " : "", why);
	} else {
		char fault[96];

		tally.victims++;
		tally.faults[j->fault] += j->fault_ms != 0;
		if (j->fault == F_MISMATCH)
			snprintf(fault, sizeof fault, "mismatch (%s) by rank %d at op %d",
				 mis_names[j->mis], j->victim, j->fault_op);
		else if (j->fault == F_LEAVE || j->fault == F_RABORT || j->fault == F_EXIT)
			snprintf(fault, sizeof fault, "rank %d %s at op %d", j->victim,
				 j->fault == F_LEAVE	? "leaves (comm_finalize)"
				 : j->fault == F_RABORT ? "calls comm_abort"
							: "exits with its ops out",
				 j->fault_op);
		else if (j->fault == F_ABORT)
			snprintf(fault, sizeof fault, "commctl abort on %c",
				 j->daemon_of[j->victim] ? 'B' : 'A');
		else
			snprintf(fault, sizeof fault, "rank %d %s", j->victim,
				 j->fault == F_KILL ? "SIGKILLed" : "SIGSTOPped");
		printf("job %s: %d rank%s (%s): victim, %s: %s%d ops right, survivors' errors "
		       "within %ld ms%s%s\n",
		       j->name, j->n, j->n > 1 ? "s" : "", where, fault, bad ? "FAILED: " : "", ops,
		       worst < 0 ? 0 : worst, bad ? ": " : "", why);
	}
	if (bad) {
		tally.failed++;
		CHECK(0, "job %s (seed %llu): %s", j->name, (unsigned long long)j->seed, why);
	}
	return !bad;
}

/* Reap, inject, watch: 1 once s's job is over (judged, the slot free). */
static int slot_poll(struct slot *s, int *ok)
{
	struct job *j = s->j;
	long now = mono_ms(), limit;

	for (int r = 0; r < j->n; r++) {
		if (s->reaped[r] || waitpid(s->rs.pids[r], &s->status[r], WNOHANG) != s->rs.pids[r])
			continue;
		s->reaped[r] = 1;
		s->left--;
	}
	if (!s->ops_from_ms) {
		int all = 1;

		for (int r = 0; r < j->n; r++)
			all &= __atomic_load_n(&j->rs[r].ops, __ATOMIC_ACQUIRE) > 0;
		if (all)
			s->ops_from_ms = now;
	}
	if ((j->fault == F_KILL || j->fault == F_STOP || j->fault == F_ABORT) && !j->fault_ms &&
	    s->ops_from_ms && now >= s->ops_from_ms + s->delay_ms && !s->reaped[j->victim] &&
	    (j->fault != F_ABORT || frozen < 0))
		slot_inject(s, now);
	if (s->cont_ms && now >= s->cont_ms) {
		kill(s->rs.pids[j->victim], SIGCONT);
		s->cont_ms = 0;
	}
	if (j->fault == F_NONE)
		limit = s->start_ms + j->budget_ms + HANG_LIMIT_MS;
	else if (j->fault_ms)
		limit = j->fault_ms + HANG_LIMIT_MS;
	else
		limit = s->start_ms + VICTIM_MAX_MS + HANG_LIMIT_MS;
	if (s->left && now > limit && !s->hung)
		slot_hang(s);
	if (s->left)
		return 0;
	*ok = slot_judge(s);
	recent_add(j->name);
	free(s->rs.pids);
	munmap(s->j, sizeof *s->j);
	s->used = 0;
	return 1;
}

/* Run one job to its end; 1 when it did as it should. */
static int run_alone(const struct job *plan)
{
	struct slot s;
	int ok = 0;

	slot_start(&s, plan);
	while (!slot_poll(&s, &ok))
		usleep(10 * 1000);
	return ok;
}

/* A clean job of n ranks over both daemons (A B A B ...), every kind of op in turn. */
static void job_over_both(struct job *j, int n, int root, int budget_ms)
{
	uint64_t g = 0x5eed0000u + (uint64_t)next_id;

	job_plan(j, &g, 0);
	j->n = n;
	for (int r = 0; r < n; r++)
		j->daemon_of[r] = r % 2;
	j->root = root;
	j->ring_off = j->keep_off = 0;
	j->cycle = 1;
	j->budget_ms = budget_ms;
}

static int ctl_status_ok(const struct th_daemon *d)
{
	char cmd[512], line[512];
	int lines = 0, st;
	FILE *p;

	snprintf(cmd, sizeof cmd, "%s --socket %s status 2>&1", ctl_bin(), d->sock);
	p = popen(cmd, "r");
	if (!p)
		return 0;
	while (fgets(line, sizeof line, p))
		lines++;
	st = pclose(p);
	return WIFEXITED(st) && WEXITSTATUS(st) == 0 && lines > 0;
}

int main(void)
{
	const char *e;
	unsigned seed = DEFAULT_SEED;
	int seconds = DEFAULT_SECONDS, victims = DEFAULT_VICTIMS, fds0[2], ok, cap = 4, before;
	int final_ok, faults = 0;
	struct slot slots[MAX_SLOTS];
	struct job plan;
	uint64_t g;
	long t0, end, freeze_at = 0, thaw_at = 0;
	int freeze = 0, freezes = 0;

	setvbuf(stdout, NULL, _IOLBF, 0);
	if ((e = getenv("COMM_CHAOS_SEED")) && *e)
		seed = (unsigned)strtoul(e, NULL, 0);
	if ((e = getenv("COMM_CHAOS_SECONDS")) && *e)
		seconds = atoi(e);
	if ((e = getenv("COMM_CHAOS_VICTIMS")) && *e)
		victims = atoi(e);
	if ((e = getenv("COMM_CHAOS_FREEZE")) && *e)
		freeze = atoi(e);
	g = seed;
	printf("chaos: seed %u (COMM_CHAOS_SEED=%u replays it), %d s (COMM_CHAOS_SECONDS), %d%% of "
	       "jobs victims (COMM_CHAOS_VICTIMS)\n",
	       seed, seed, seconds, victims);
	REQUIRE(th_daemon_start_peer(&da, "--threads", "2", NULL) == 0, "commd A did not start");
	REQUIRE(th_daemon_start_peer(&db, "--threads", "2", NULL) == 0, "commd B did not start");

	/* warm-up: jobs over both, rooted on each, so what stays (endpoints) is there */
	job_over_both(&plan, 2, 0, 300);
	CHECK(run_alone(&plan), "warm-up job over A and B (root A) failed");
	job_over_both(&plan, 3, 1, 300);
	CHECK(run_alone(&plan), "warm-up job over A and B (root B) failed");
	usleep(200 * 1000);
	fds0[0] = th_count_fds(da.pid);
	fds0[1] = th_count_fds(db.pid);
	before = check_failures;
	memset(&tally, 0, sizeof tally);

	memset(slots, 0, sizeof slots);
	t0 = mono_ms();
	end = t0 + (long)seconds * 1000;
	for (;;) {
		int active = 0;

		for (int i = 0; i < MAX_SLOTS; i++)
			if (slots[i].used)
				active += !slot_poll(&slots[i], &ok);
		if (mono_ms() < end && active < cap) {
			for (int i = 0; i < MAX_SLOTS; i++) {
				if (slots[i].used)
					continue;
				job_plan(&plan, &g, victims);
				slot_start(&slots[i], &plan);
				cap = 3 + (int)(rnd(&g) % 3);
				active++;
				break;
			}
		}
		/* a daemon frozen for a moment (well within the peers' 3 s): nobody may notice */
		if (freeze && frozen < 0 && mono_ms() >= freeze_at && mono_ms() < end) {
			frozen = (int)(rnd(&g) % 2);
			kill(ds[frozen]->pid, SIGSTOP);
			thaw_at = mono_ms() + 100 + (long)(rnd(&g) % (uint64_t)freeze);
			freezes++;
		}
		if (frozen >= 0 && mono_ms() >= thaw_at) {
			thaw();
			freeze_at = mono_ms() + 1000 + (long)(rnd(&g) % 3000);
		}
		if (!active && mono_ms() >= end && frozen < 0)
			break;
		usleep(10 * 1000);
	}
	if (freeze)
		printf("(froze a daemon %d times, for up to %d ms)\n", freezes, 100 + freeze);

	printf("%s: %d clean jobs, every op right (none touched by the faults beside them)\n",
	       tally.clean && tally.failed == 0 ? "ok" : "FAIL", tally.clean);
	printf("%s: %d victim jobs, every survivor got its error within %d ms:",
	       tally.wrong_code || tally.early || tally.late ? "FAIL" : "ok", tally.victims,
	       ERROR_LIMIT_MS);
	for (int f = F_KILL; f < F_NKINDS; f++)
		printf("%s %s %d (%s, at worst %ld ms)", f == F_KILL ? "" : ",", fault_names[f],
		       tally.faults[f], comm_result_name(fitting_code((enum fault)f)),
		       tally.worst_ms[f]);
	printf("\n");
	printf("%s: no wrong value in any job (%d wrong), no hang (%d)\n",
	       tally.wrong || tally.hangs ? "FAIL" : "ok", tally.wrong, tally.hangs);
	CHECK(tally.clean > 0 && tally.victims > 0, "the run had %d clean jobs and %d victims",
	      tally.clean, tally.victims);

	ok = th_daemon_alive(&da) && th_daemon_alive(&db);
	CHECK(ok, "a daemon died");
	ok = ok && ctl_status_ok(&da) && ctl_status_ok(&db);
	CHECK(ok, "commctl status did not answer on both daemons");
	printf("%s: both daemons alive, commctl status answers on both\n", ok ? "ok" : "FAIL");

	job_over_both(&plan, 4, 0, 1500);
	final_ok = run_alone(&plan);
	CHECK(final_ok, "the final clean job failed");
	printf("%s: a final clean job over A and B (A B A B), every kind of op, right\n",
	       final_ok ? "ok" : "FAIL");

	before = check_failures;
	th_check_baseline(&da, fds0[0], "the chaos (A)");
	th_check_baseline(&db, fds0[1], "the chaos (B)");
	printf("%s: fds back to baseline (A %d, B %d), no memfd mapped\n",
	       check_failures == before ? "ok" : "FAIL", fds0[0], fds0[1]);
	if ((e = getenv("COMM_CHAOS_KEEP_LOGS")) && *e) {
		char cmd[1024];

		snprintf(cmd, sizeof cmd, "cp %s %s/commd-a.log && cp %s %s/commd-b.log", da.log, e,
			 db.log, e);
		CHECK(system(cmd) == 0, "%s", cmd);
	}
	before = check_failures;
	CHECK(th_daemon_stop(&da) == 0, "commd A did not stop cleanly");
	CHECK(th_daemon_stop(&db) == 0, "commd B did not stop cleanly");
	printf("%s: both daemons stop cleanly (exit 0, no error line)\n",
	       check_failures == before ? "ok" : "FAIL");
	for (int f = F_KILL; f < F_NKINDS; f++)
		faults += tally.faults[f];
	printf("chaos: seed %u, %.1f s: %d jobs (%d clean, the final one included; %d victims; "
	       "%d failed), %ld ops checked, %d faults injected\n",
	       seed, (mono_ms() - t0) / 1000.0, tally.jobs, tally.clean, tally.victims,
	       tally.failed, tally.ops, faults);
	return CHECK_EXIT();
}
