/*
 * test-nodes.c: jobs whose ranks are spread over three commd daemons
 * (--peer-listen, COMM_ROOT): test-ops' cases over three splits of four
 * ranks, send/recv rings and 4 MiB exchanges between daemons, barriers, a
 * job on one daemon beside a job that spans it, all-reduces of 9-21 MB
 * (the pipelined ring's chunks and slots); and, over 2+2 and 2+1+1,
 * collectives whose ranks disagree between daemons or that one daemon
 * refuses, send/recv sizes that differ, and a rank that leaves: every rank
 * told, and the job goes on.
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
#include "barrier.h"
#include "harness.h"
#include "opcase.h"
#include "plan.h"
#include "ref.h"

#define N 4                  /* ranks of every job here */
#define NNODES 3
#define BIG_NODES 300007     /* the large count: 1.2 MB of float32, 2.4 MB of float64 */
#define XCHG_COUNT (1u << 20) /* float32 in a 4 MiB exchange */
/*
 * All-reduces whose pipelined ring (net-coll.c) has many 1 MiB chunks a slice,
 * more than its 8 receive slots over the hops, and a last chunk cut short.
 */
#define RING_BIG_INT32 5000011   /* 20 MB */
#define RING_BIG_FLOAT64 2621447 /* 21 MB */
#define RING_BIG_UINT8 9437189   /* 9 MB */
/*
 * Reduce-scatters and all-gathers whose rings have pieces of 1 to 3 ranks'
 * blocks (so of several sizes), in up to 15 chunks, some cut short; and
 * broadcasts and reduces whose chains (every root in turn) move 9-21 MB in
 * chunks, more than their 8 receive slots.
 */
#define RING_RS_INT32 1250003    /* 5 MB a block */
#define RING_RS_FLOAT32 786433   /* 3 MB */
#define RING_AG_UINT8 2359297    /* 2.25 MB */
#define RING_AG_INT32 786433     /* 3 MB */

static struct th_daemon node[NNODES];
static const struct th_daemon *const nodes[NNODES] = { &node[0], &node[1], &node[2] };

/* Ranks over daemons: rank r on node[of[r]]; COMM_ROOT is node[root]'s address. */
struct split {
	const char *name;
	int of[N];
	int root;
};

static const struct split splits[] = {
	{ "2+2", { 0, 0, 1, 1 }, 0 },
	{ "1+3", { 0, 1, 1, 1 }, 1 },
	{ "2+1+1", { 0, 1, 2, 0 }, 2 },
};

/* "2+2 (A: 0 1; B: 2 3; root A)" */
static const char *split_str(const struct split *sp, char *buf, size_t len)
{
	size_t at = (size_t)snprintf(buf, len, "%s (", sp->name);

	for (int d = 0; d < NNODES; d++) {
		int first = 1;

		for (int r = 0; r < N; r++) {
			if (sp->of[r] != d || at >= len)
				continue;
			if (first)
				at += (size_t)snprintf(buf + at, len - at, "%c:", 'A' + d);
			if (at < len)
				at += (size_t)snprintf(buf + at, len - at, " %d", r);
			first = 0;
		}
		if (!first && at < len)
			at += (size_t)snprintf(buf + at, len - at, "; ");
	}
	if (at < len)
		snprintf(buf + at, len - at, "root %c)", 'A' + sp->root);
	return buf;
}

static int next_job;

/* Run fn on the N ranks of sp as a new job; print one line. 0 when it passed. */
static int run_split_job(const struct split *sp, th_rank_fn fn, void *arg, const char *what)
{
	struct timespec t0;
	char job[64], where[96];
	int failed;

	snprintf(job, sizeof job, "nodes-p2p-%d", ++next_job);
	clock_gettime(CLOCK_MONOTONIC, &t0);
	failed = th_run_ranks_nodes(nodes, sp->of, nodes[sp->root]->peer, job, N, fn, arg);
	split_str(sp, where, sizeof where);
	CHECK(failed == 0, "%s, %s: %d of %d ranks failed", what, where, failed, N);
	printf("%s: %s, %s (%.1f s)\n", failed ? "FAIL" : "ok", what, where, th_secs_since(&t0));
	fflush(stdout);
	return failed;
}

/* --- send and recv between daemons ----------------------------------------- */


#define OK_OR_BAIL(call)                                                       \
	do {                                                                   \
		comm_result_t rc_ = (call);                                    \
		if (rc_ != COMM_OK) {                                          \
			fprintf(stderr, "rank %d: %s: %s (%s)\n", r, #call,    \
				comm_result_name(rc_), comm_last_error(c));    \
			return th_bail(c);                                     \
		}                                                              \
	} while (0)

#define RING_ROUNDS 40
#define RING_ASYNC_ROUNDS 10 /* the last ones, with requests */

/*
 * Every rank sends to rank+1 and receives from rank-1 in a group: dtypes,
 * sizes up to 4 MiB, zero-copy and staged, send or recv posted first.
 */
static int rank_ring(int r, int n, void *arg)
{
	int bad = 0, rc;
	comm_t *c;

	if (th_join(&c, r, n) < 0)
		return 1;
	for (int round = 0; round < RING_ROUNDS; round++) {
		comm_dtype_t dt = ref_dtypes[round % REF_NDTYPES];
		size_t es = comm_dtype_size(dt);
		size_t count = round % 10 == 9 ? (4u << 20) / es : 1 + (size_t)round * 7919 % 5000;

		rc = ref_ring_round(c, r, n, 1, round, dt, count, round >= RING_ROUNDS - RING_ASYNC_ROUNDS);
		if (rc < 0)
			return th_bail(c);
		bad |= rc;
	}
	return th_leave(c, r) | bad;
}

/*
 * Ranks r and r^2 (on different daemons in the 2+2 and 2+1+1 splits) send
 * each other 4 MiB at once in one group: send or recv first, zero-copy or
 * staged, with or without requests. Must not deadlock.
 */
static int rank_exchange(int r, int n, void *arg)
{
	int peer = r ^ 2, bad = 0;
	size_t bytes = (size_t)XCHG_COUNT * 4;
	comm_t *c;

	if (th_join(&c, r, n) < 0)
		return 1;
	for (int v = 0; v < 8; v++) {
		int recv_first = v & 1, zc = !(v & 2), async = v & 4;
		uint64_t sseed = ref_msg_seed(2, r, peer, v), rseed = ref_msg_seed(2, peer, r, v);
		comm_request_t *sreq = NULL, *rreq = NULL;
		struct ref_bufs b;
		char what[128];

		if (ref_bufs_alloc(c, &b, bytes + REF_GUARD, zc, bytes + REF_GUARD, zc, r) < 0)
			return th_bail(c);
		ref_fill(b.sbase, bytes, sseed);
		OK_OR_BAIL(comm_group_start(c));
		if (recv_first)
			OK_OR_BAIL(comm_recv(c, b.rbase, XCHG_COUNT, COMM_FLOAT32, peer,
					     async ? &rreq : NULL));
		OK_OR_BAIL(comm_send(c, b.sbase, XCHG_COUNT, COMM_FLOAT32, peer,
				     async ? &sreq : NULL));
		if (!recv_first)
			OK_OR_BAIL(comm_recv(c, b.rbase, XCHG_COUNT, COMM_FLOAT32, peer,
					     async ? &rreq : NULL));
		OK_OR_BAIL(comm_group_end(c));
		if (async) {
			OK_OR_BAIL(comm_wait(sreq, -1));
			OK_OR_BAIL(comm_wait(rreq, -1));
		}
		snprintf(what, sizeof what, "4 MiB both ways with rank %d, %s first, %s%s", peer,
			 recv_first ? "recv" : "send", zc ? "zero-copy" : "staged",
			 async ? ", requests" : "");
		bad |= ref_msg_check(&b, bytes, sseed, rseed, r, what);
		ref_bufs_free(c, &b);
	}
	return th_leave(c, r) | bad;
}

/* --- barrier ------------------------------------------------------------------- */

static void test_barrier(const struct split *sp)
{
	struct th_barrier *st = th_barrier_new();
	int early;

	REQUIRE(st != NULL, "mmap");
	run_split_job(sp, th_barrier_rank, st, "barrier, 6 rounds, ranks arrive 25 ms apart");
	early = th_barrier_early(st, N);
	CHECK(early == 0, "barrier over %s: %d ranks left before the last one entered", sp->name,
	      early);
	printf("%s: barrier over %s: nobody leaves before the last rank entered\n",
	       early ? "FAIL" : "ok", sp->name);
	th_barrier_free(st);
}

/* --- every op over one split ------------------------------------------------------ */

static void test_split(const struct split *sp)
{
	static const struct oc_opts o = { .big = BIG_NODES, .tolerant = 1 };
	struct th_plan p = { .world = N, .ds = nodes, .daemon_of_rank = sp->of };
	char where[96], title[192];

	p.root = nodes[sp->root]->peer;
	p.title = title;
	split_str(sp, where, sizeof where);
	snprintf(title, sizeof title, "every op x dtype x redop, n=4, zero-copy, %s", where);
	oc_add_matrix(&p, &o);
	oc_plan_run(NULL, &p, "nodes");
	snprintf(title, sizeof title, "each op, n=4, up to %d elements, %s", BIG_NODES, where);
	oc_add_world(&p, N, &o);
	oc_plan_run(NULL, &p, "nodes");
	snprintf(title, sizeof title, "in place and staged, n=4, %s", where);
	oc_add_place_mode(&p, N, &o);
	oc_plan_run(NULL, &p, "nodes");
	snprintf(title, sizeof title, "all-reduce of 9-21 MB (the pipelined ring), n=4, %s", where);
	oc_add(&p, &o, OC_AR, COMM_INT32, COMM_SUM, RING_BIG_INT32, 0, OC_ZC, OC_OOP, 0);
	oc_add(&p, &o, OC_AR, COMM_FLOAT64, COMM_AVG, RING_BIG_FLOAT64, 0, OC_ZC, OC_INPLACE, 0);
	oc_add(&p, &o, OC_AR, COMM_UINT8, COMM_MAX, RING_BIG_UINT8, 0, OC_STAGED, OC_OOP, 0);
	oc_plan_run(NULL, &p, "nodes");
	/* 16 KiB a rank (all-reduce, reduce, broadcast) or in all (reduce-scatter, all-gather) */
	snprintf(title, sizeof title, "each op at and past the 16 KiB data-with-the-verdict limit, "
		 "n=4, %s", where);
	for (size_t extra = 0; extra < 2; extra++) {
		oc_add(&p, &o, OC_AR, COMM_FLOAT32, COMM_SUM, 4096 + extra, 0, OC_ZC, OC_INPLACE, 0);
		oc_add(&p, &o, OC_RD, COMM_FLOAT64, COMM_AVG, 2048 + extra, 0, OC_ZC, OC_OOP, 0);
		oc_add(&p, &o, OC_BC, COMM_INT32, COMM_SUM, 4096 + extra, 0, OC_ZC, OC_INPLACE, 0);
		oc_add(&p, &o, OC_RS, COMM_INT8, COMM_MIN, 4096 + extra, 0, OC_ZC, OC_OOP, 0);
		oc_add(&p, &o, OC_RS, COMM_FLOAT32, COMM_AVG, 1024 + extra, 0, OC_STAGED, OC_INPLACE, 0);
		oc_add(&p, &o, OC_AG, COMM_UINT8, COMM_SUM, 4096 + extra, 0, OC_ZC, OC_INPLACE, 0);
		oc_add(&p, &o, OC_AG, COMM_BFLOAT16, COMM_SUM, 2048 + extra, 0, OC_STAGED, OC_OOP, 0);
	}
	oc_plan_run(NULL, &p, "nodes");
	snprintf(title, sizeof title, "reduce-scatter, all-gather, broadcast and reduce of 9-21 MB "
		 "(their rings and chains), n=4, %s", where);
	oc_add(&p, &o, OC_BC, COMM_INT32, COMM_SUM, RING_BIG_INT32, 0, OC_ZC, OC_OOP, 0);
	oc_add(&p, &o, OC_BC, COMM_UINT8, COMM_SUM, RING_BIG_UINT8, 0, OC_STAGED, OC_INPLACE, 0);
	oc_add(&p, &o, OC_RD, COMM_FLOAT64, COMM_AVG, RING_BIG_FLOAT64, 0, OC_ZC, OC_OOP, 0);
	oc_add(&p, &o, OC_RD, COMM_UINT8, COMM_MAX, RING_BIG_UINT8, 0, OC_ZC, OC_INPLACE, 0);
	oc_add(&p, &o, OC_RS, COMM_INT32, COMM_SUM, RING_RS_INT32, 0, OC_ZC, OC_OOP, 0);
	oc_add(&p, &o, OC_RS, COMM_FLOAT32, COMM_AVG, RING_RS_FLOAT32, 0, OC_ZC, OC_INPLACE, 0);
	oc_add(&p, &o, OC_AG, COMM_UINT8, COMM_SUM, RING_AG_UINT8, 0, OC_STAGED, OC_OOP, 0);
	oc_add(&p, &o, OC_AG, COMM_INT32, COMM_SUM, RING_AG_INT32, 0, OC_ZC, OC_INPLACE, 0);
	oc_plan_run(NULL, &p, "nodes");
	run_split_job(sp, rank_ring, NULL,
		      "ring in groups: 40 rounds of every dtype up to 4 MiB, the last 10 with "
		      "requests");
	run_split_job(sp, rank_exchange, NULL,
		      "4 MiB both ways between ranks r and r^2 in one group, 8 variants");
	test_barrier(sp);
}

/* --- a job on one daemon beside one that spans it ----------------------------------- */

#define BESIDE_REPS 8

/* The cases a rank runs BESIDE_REPS times over, and the seed of the first. */
struct caselist {
	const struct oc_case *cases;
	int n;
	uint32_t seed;
};

static int rank_cases(int r, int n, void *arg)
{
	const struct caselist *l = arg;
	comm_t *c;
	int bad = 0;

	if (th_join(&c, r, n) < 0)
		return 1;
	for (int rep = 0; rep < BESIDE_REPS; rep++) {
		for (int i = 0; i < l->n; i++) {
			int rc = oc_run_case(c, &l->cases[i],
					     l->seed + (uint32_t)(rep * l->n + i) * 131, r, n);

			if (rc < 0)
				return th_bail(c);
			bad |= rc;
		}
	}
	return th_leave(c, r) | bad;
}

static void test_beside(void)
{
	/* run once exact (alone on B) and once tolerant (over A and B) */
	struct oc_case cases[2][6];
	const struct oc_case base[6] = {
		{ OC_AR, COMM_FLOAT32, COMM_SUM, 4097, 0, OC_ZC, OC_OOP, 0, 0 },
		{ OC_AR, COMM_BFLOAT16, COMM_SUM, BIG_NODES, 0, OC_ZC, OC_OOP, 0, 0 },
		{ OC_RS, COMM_INT64, COMM_PROD, 4097, 0, OC_STAGED, OC_OOP, 0, 0 },
		{ OC_AG, COMM_UINT8, COMM_SUM, 70001, 0, OC_ZC, OC_INPLACE, 0, 0 },
		{ OC_BC, COMM_FLOAT64, COMM_SUM, 7, OC_EVERY_ROOT, OC_ZC, OC_OOP, 1, 0 },
		{ OC_RD, COMM_FLOAT16, COMM_AVG, 4097, 2, OC_STAGED, OC_OOP, 1, 0 },
	};
	struct caselist alone = { cases[0], 6, 0xb0000001u }, spread = { cases[1], 6, 0xb1000001u };
	const struct split *sp = &splits[0];
	struct th_ranks ra, rs;
	struct timespec t0;
	char where[96];
	int fa, fs;

	for (int k = 0; k < 6; k++) {
		cases[0][k] = cases[1][k] = base[k];
		cases[1][k].tolerant = 1;
	}
	clock_gettime(CLOCK_MONOTONIC, &t0);
	REQUIRE(th_ranks_start_nodes(&rs, nodes, sp->of, nodes[sp->root]->peer, "nodes-beside-2",
				     N, rank_cases, &spread) == 0,
		"fork");
	REQUIRE(th_ranks_start(&ra, &node[1], "nodes-beside-1", N, rank_cases, &alone) == 0,
		"fork");
	fs = th_ranks_wait(&rs);
	fa = th_ranks_wait(&ra);
	split_str(sp, where, sizeof where);
	CHECK(fa == 0, "a job alone on B beside one over A and B: %d of %d ranks failed", fa, N);
	CHECK(fs == 0, "a job over %s beside one alone on B: %d of %d ranks failed", where, fs,
	      N);
	printf("%s: a 4-rank job alone on B and one over %s at once, %d ops each (%.1f s)\n",
	       fa || fs ? "FAIL" : "ok", where, BESIDE_REPS * 6, th_secs_since(&t0));
	fflush(stdout);
}

/* --- ranks that disagree, an op refused, sizes that differ, a rank that leaves -------- */

#define FAULT_TIMEOUT "20000" /* COMM_TIMEOUT in these jobs: a hang fails in 20 s */
#define FAULT_LIMIT_MS 5000   /* an op that fails or a send nobody takes returns within this */
#define EDGE_COUNT 4096       /* float32: 16 KiB, the most that rides with the verdict */
#define MAX_CHECKS 16         /* outcomes kept per job */
#define NOT_RUN (-1)          /* an outcome a rank never got to */

/* One collective as the ranks of one side post it. */
struct side {
	enum oc_kind kind;
	comm_dtype_t dt;
	comm_redop_t op;
	size_t count;
	int root;
};

/*
 * Ranks on B post odd, the others good (refused: only the last rank on B,
 * whose op commd refuses). Then every rank runs an agreeing float32 sum of
 * then elements.
 */
struct disagreement {
	const char *what;       /* the line printed */
	const char *field;      /* the word the detail must name */
	int refused;
	struct side good, odd;
	size_t then;
};

#define AR_F32(n) OC_AR, COMM_FLOAT32, COMM_SUM, (n), 0
static const struct disagreement disagreements[] = {
	{ "all-reduce count 4, 5 on B", "count", 0, { AR_F32(4) }, { AR_F32(5) }, 4 },
	{ "all-reduce count 4096 (16 KiB, data with the verdict), 4097 on B (not)", "count", 0,
	  { AR_F32(EDGE_COUNT) }, { AR_F32(EDGE_COUNT + 1) }, EDGE_COUNT },
	{ "all-reduce count 1000003, 1000004 on B", "count", 0, { AR_F32(OC_BIG) },
	  { AR_F32(OC_BIG + 1) }, OC_BIG },
	{ "all-reduce of 7 float32, int32 on B", "dtype", 0, { AR_F32(7) },
	  { OC_AR, COMM_INT32, COMM_SUM, 7, 0 }, 7 },
	{ "all-reduce of 4096 float32 (16 KiB), float64 on B (32 KiB)", "dtype", 0,
	  { AR_F32(EDGE_COUNT) }, { OC_AR, COMM_FLOAT64, COMM_SUM, EDGE_COUNT, 0 }, EDGE_COUNT },
	{ "all-reduce of 1000003 float32 sum, max on B", "redop", 0, { AR_F32(OC_BIG) },
	  { OC_AR, COMM_FLOAT32, COMM_MAX, OC_BIG, 0 }, OC_BIG },
	{ "all-reduce of 7 float32 sum, prod on B", "redop", 0, { AR_F32(7) },
	  { OC_AR, COMM_FLOAT32, COMM_PROD, 7, 0 }, 7 },
	{ "broadcast of 7 float32 root 0, root 1 on B", "root", 0,
	  { OC_BC, COMM_FLOAT32, COMM_SUM, 7, 0 }, { OC_BC, COMM_FLOAT32, COMM_SUM, 7, 1 }, 7 },
	{ "broadcast of 1000003 float32 root 0, root 1 on B", "root", 0,
	  { OC_BC, COMM_FLOAT32, COMM_SUM, OC_BIG, 0 },
	  { OC_BC, COMM_FLOAT32, COMM_SUM, OC_BIG, 1 }, OC_BIG },
	{ "all-reduce of 7 float32, all-gather on B", "type", 0, { AR_F32(7) },
	  { OC_AG, COMM_FLOAT32, COMM_SUM, 7, 0 }, 7 },
	{ "all-reduce of 1000003 float32, all-gather on B", "type", 0, { AR_F32(OC_BIG) },
	  { OC_AG, COMM_FLOAT32, COMM_SUM, OC_BIG, 0 }, OC_BIG },
	{ "broadcast of 7 float32 root 0, root 4 (= world size) on one rank of B", "root", 1,
	  { OC_BC, COMM_FLOAT32, COMM_SUM, 7, 0 }, { OC_BC, COMM_FLOAT32, COMM_SUM, 7, N }, 7 },
	{ "reduce of 1000003 float32 root 0, root -1 on one rank of B", "root", 1,
	  { OC_RD, COMM_FLOAT32, COMM_SUM, OC_BIG, 0 },
	  { OC_RD, COMM_FLOAT32, COMM_SUM, OC_BIG, -1 }, OC_BIG },
};
#define NDISAGREE (int)(sizeof disagreements / sizeof disagreements[0])
_Static_assert(NDISAGREE <= MAX_CHECKS, "MAX_CHECKS outcomes per job");

/* What one rank got from one op, kept where the test reads it. */
struct outcome {
	int rc;                 /* NOT_RUN: never returned */
	long ms;                /* how long it took, or since the leave */
	int then_bad;           /* what followed it (oc_run_case, send/recv): wrong or not run */
	char detail[200];
};

/* Shared between the ranks of a job and the test. */
struct faultjob {
	const struct split *sp;
	int pending;            /* the leave job: the others post their all-reduce first */
	int posted;             /* ranks that posted it */
	int left;               /* the leaver has finalized */
	long left_ms;
	struct outcome o[MAX_CHECKS][N];
};

static long mono_ms(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

static struct faultjob *faultjob_new(const struct split *sp)
{
	struct faultjob *fj = mmap(NULL, sizeof *fj, PROT_READ | PROT_WRITE,
				   MAP_SHARED | MAP_ANONYMOUS, -1, 0);

	REQUIRE(fj != MAP_FAILED, "mmap");
	memset(fj, 0, sizeof *fj);
	fj->sp = sp;
	for (int k = 0; k < MAX_CHECKS; k++)
		for (int r = 0; r < N; r++) {
			fj->o[k][r].rc = NOT_RUN;
			fj->o[k][r].then_bad = 1; /* until the rank says otherwise */
		}
	return fj;
}

static void note(struct outcome *o, comm_result_t rc, long ms, comm_t *c)
{
	o->rc = rc;
	o->ms = ms;
	snprintf(o->detail, sizeof o->detail, "%s", rc == COMM_OK ? "" : comm_last_error(c));
}

/* The first and the last rank of sp on daemon d. */
static int first_on(const struct split *sp, int d)
{
	for (int r = 0; r < N; r++)
		if (sp->of[r] == d)
			return r;
	return -1;
}

static int last_on(const struct split *sp, int d)
{
	for (int r = N - 1; r >= 0; r--)
		if (sp->of[r] == d)
			return r;
	return -1;
}

/* Whether rank r posts the odd side of t. */
static int is_odd(const struct split *sp, const struct disagreement *t, int r)
{
	return t->refused ? r == last_on(sp, 1) : sp->of[r] == 1;
}

/* Bytes of the send and recv buffers side s needs. */
static void side_bytes(const struct side *s, size_t *sb, size_t *rb)
{
	size_t block = s->count * comm_dtype_size(s->dt);

	*sb = block;
	*rb = s->kind == OC_AG ? block * N : block;
}

static comm_result_t side_post(comm_t *c, const struct side *s, void *send, void *recv)
{
	switch (s->kind) {
	case OC_AR:
		return comm_allreduce(c, send, recv, s->count, s->dt, s->op, NULL);
	case OC_AG:
		return comm_allgather(c, send, recv, s->count, s->dt, NULL);
	case OC_BC:
		return comm_broadcast(c, send, recv, s->count, s->dt, s->root, NULL);
	default:
		return comm_reduce(c, send, recv, s->count, s->dt, s->op, s->root, NULL);
	}
}

/* An agreeing float32 sum of count elements, exact: oc_run_case's 0, 1 or -1. */
static int agreeing_allreduce(comm_t *c, size_t count, uint32_t seed, int r, int n)
{
	const struct oc_case t = { OC_AR, COMM_FLOAT32, COMM_SUM, count, 0, OC_ZC, OC_OOP, 0, 0 };

	return oc_run_case(c, &t, seed, r, n);
}

static int rank_disagree(int r, int n, void *arg)
{
	struct faultjob *fj = arg;
	size_t smax = 0, rmax = 0;
	char *send, *recv;
	comm_t *c;
	int bad = 0;

	setenv("COMM_TIMEOUT", FAULT_TIMEOUT, 1);
	if (th_join(&c, r, n) < 0)
		return 1;
	for (int k = 0; k < NDISAGREE; k++) {
		size_t sb, rb;

		side_bytes(is_odd(fj->sp, &disagreements[k], r) ? &disagreements[k].odd
								: &disagreements[k].good,
			   &sb, &rb);
		smax = sb > smax ? sb : smax;
		rmax = rb > rmax ? rb : rmax;
	}
	send = comm_mem_alloc(c, smax);
	recv = comm_mem_alloc(c, rmax);
	if (!send || !recv) {
		fprintf(stderr, "rank %d: comm_mem_alloc: %s\n", r, comm_last_error(c));
		return th_bail(c);
	}
	memset(send, 0, smax);
	for (int k = 0; k < NDISAGREE; k++) {
		const struct disagreement *t = &disagreements[k];
		struct outcome *o = &fj->o[k][r];
		long t0 = mono_ms();
		comm_result_t rc;
		int then;

		rc = side_post(c, is_odd(fj->sp, t, r) ? &t->odd : &t->good, send, recv);
		note(o, rc, mono_ms() - t0, c);
		then = agreeing_allreduce(c, t->then, 0xd1500001u + (uint32_t)k * 131, r, n);
		o->then_bad = then != 0;
		if (then < 0)
			return th_bail(c);
		bad |= then;
	}
	comm_mem_free(c, send);
	comm_mem_free(c, recv);
	return th_leave(c, r) | bad;
}

/* Whether s holds the number v as a word of its own ("100", not "1000"). */
static int has_number(const char *s, unsigned long long v)
{
	char num[24];
	size_t len = (size_t)snprintf(num, sizeof num, "%llu", v);

	for (const char *p = s; (p = strstr(p, num)); p++)
		if ((p == s || p[-1] < '0' || p[-1] > '9') && (p[len] < '0' || p[len] > '9'))
			return 1;
	return 0;
}

/* Whether detail names ("rank 2") a rank of t's odd side and one of its good side. */
static int names_both_sides(const char *detail, const struct split *sp,
			    const struct disagreement *t)
{
	int odd = 0, good = 0, v;

	for (const char *p = detail; (p = strstr(p, "rank ")); p++) {
		if (sscanf(p + 5, "%d", &v) != 1 || v < 0 || v >= N)
			continue;
		if (is_odd(sp, t, v))
			odd = 1;
		else
			good = 1;
	}
	return odd && good;
}

/* The name commd gives the op of side s. */
static const char *daemon_op_name(const struct side *s)
{
	static const char *const names[] = { "allreduce", "reduce_scatter", "allgather",
					      "broadcast", "reduce",    "alltoall" };

	return names[s->kind];
}

/* Print outcomes o[0..N-1]: "rank 0, 1: COMM_ERR_X \"detail\"" for each distinct one. */
static void print_outcomes(const struct outcome *o, const char *indent)
{
	for (int r = 0; r < N; r++) {
		int seen = 0;

		for (int q = 0; q < r && !seen; q++)
			seen = o[q].rc == o[r].rc && strcmp(o[q].detail, o[r].detail) == 0;
		if (seen)
			continue;
		printf("%srank %d", indent, r);
		for (int q = r + 1; q < N; q++)
			if (o[q].rc == o[r].rc && strcmp(o[q].detail, o[r].detail) == 0)
				printf(", %d", q);
		if (o[r].rc == NOT_RUN)
			printf(": never returned\n");
		else
			printf(": %s \"%s\"\n", comm_result_name((comm_result_t)o[r].rc),
			       o[r].detail);
	}
}

static void check_disagreements(const struct faultjob *fj, const char *where)
{
	for (int k = 0; k < NDISAGREE; k++) {
		const struct disagreement *t = &disagreements[k];
		const struct outcome *o = fj->o[k];
		int refused_rank = last_on(fj->sp, 1), fail = 0, then_bad = 0;

		for (int r = 0; r < N; r++) {
			const char *d = o[r].detail, *got;
			int ok;

			got = comm_result_name((comm_result_t)o[r].rc);

			then_bad |= o[r].then_bad;
			if (t->refused && r == refused_rank) {
				ok = o[r].rc == COMM_ERR_INVALID_ARG && strstr(d, t->field) &&
				     !strstr(d, "refused on rank");
				CHECK(ok,
				      "%s, %s: the refused rank %d got %s \"%s\", expected "
				      "COMM_ERR_INVALID_ARG with its own reason",
				      t->what, where, r, got, d);
			} else if (t->refused) {
				char want[32];

				snprintf(want, sizeof want, "refused on rank %d", refused_rank);
				ok = o[r].rc != COMM_OK && o[r].rc != NOT_RUN && strstr(d, want);
				CHECK(ok, "%s, %s: rank %d got %s \"%s\", expected an error naming "
				      "\"%s\"",
				      t->what, where, r, got, d, want);
			} else {
				ok = o[r].rc == COMM_ERR_MISMATCH && strstr(d, "collective ") &&
				     strstr(d, t->field) &&
				     (strstr(d, daemon_op_name(&t->good)) ||
				      strstr(d, daemon_op_name(&t->odd))) &&
				     names_both_sides(d, fj->sp, t);
				CHECK(ok,
				      "%s, %s: rank %d got %s \"%s\", expected COMM_ERR_MISMATCH "
				      "naming the collective, its %s and a rank of each side",
				      t->what, where, r, got, d, t->field);
			}
			fail |= !ok;
		}
		CHECK(!then_bad, "%s, %s: the agreeing all-reduce of %zu after it failed", t->what,
		      where, t->then);
		printf("%s: %s, %s: %s; then %zu float32 summed exactly%s\n",
		       fail || then_bad ? "FAIL" : "ok", t->what, where,
		       t->refused ? "refused there, an error on every rank"
				  : "COMM_ERR_MISMATCH on every rank",
		       t->then, then_bad ? ": NOT on every rank" : "");
		print_outcomes(o, "    ");
	}
}

/*
 * Between rank a (the first on A) and rank b (the first on B), each message
 * sent with one size and expected with another; then each sent as expected,
 * and an all-reduce.
 */
static const struct p2p_msg {
	int from_b;             /* b sends it to a, else a to b */
	size_t sent, want;
} p2p_msgs[] = {
	{ 0, 100, 200 },
	{ 1, 200, 100 },
	{ 0, 2u << 20, 4u << 20 },
	{ 1, 4u << 20, 2u << 20 },
	/* chunks of a 64th, the last one short; then sent as expected */
	{ 0, (1u << 20) + 1, (65u << 20) + 13 },
	/* no data, each way; then 100 bytes, and an empty send/recv */
	{ 0, 0, 100 },
	{ 1, 100, 0 },
};
#define NP2P (int)(sizeof p2p_msgs / sizeof p2p_msgs[0])
_Static_assert(NP2P < MAX_CHECKS, "MAX_CHECKS outcomes per job");
#define P2P_MAX ((65u << 20) + 13)

static int rank_p2p_sizes(int r, int n, void *arg)
{
	struct faultjob *fj = arg;
	int a = first_on(fj->sp, 0), b = first_on(fj->sp, 1), peer = r == a ? b : a;
	struct ref_bufs rb;
	comm_result_t rc;
	comm_t *c;
	int bad = 0, ar;

	setenv("COMM_TIMEOUT", FAULT_TIMEOUT, 1);
	if (th_join(&c, r, n) < 0)
		return 1;
	if (r == a || r == b) {
		if (ref_bufs_alloc(c, &rb, P2P_MAX + REF_GUARD, 1, P2P_MAX + REF_GUARD, 1, r) < 0)
			return th_bail(c);
		for (int k = 0; k < NP2P; k++) {
			const struct p2p_msg *m = &p2p_msgs[k];
			long t0 = mono_ms();

			if ((r == b) == m->from_b) {
				ref_fill(rb.sbase, m->sent, ref_msg_seed(3, r, peer, k));
				rc = comm_send(c, rb.sbase, m->sent, COMM_UINT8, peer, NULL);
			} else {
				rc = comm_recv(c, rb.rbase, m->want, COMM_UINT8, peer, NULL);
			}
			note(&fj->o[k][r], rc, mono_ms() - t0, c);
		}
		/* each again, sent as expected */
		for (int k = 0; k < NP2P && !bad; k++) {
			const struct p2p_msg *m = &p2p_msgs[k];
			uint64_t seed = ref_msg_seed(4, m->from_b ? b : a, m->from_b ? a : b, k);

			if ((r == b) == m->from_b) {
				ref_fill(rb.sbase, m->want, seed);
				OK_OR_BAIL(comm_send(c, rb.sbase, m->want, COMM_UINT8, peer, NULL));
				continue;
			}
			memset(rb.rbase, REF_POISON, P2P_MAX + REF_GUARD);
			OK_OR_BAIL(comm_recv(c, rb.rbase, m->want, COMM_UINT8, peer, NULL));
			if (ref_first_diff(rb.rbase, m->want, seed) != m->want ||
			    !ref_all_bytes(rb.rbase + m->want, P2P_MAX + REF_GUARD - m->want,
					   REF_POISON)) {
				fprintf(stderr, "rank %d: %zu bytes from rank %d: wrong\n", r,
					m->want, peer);
				bad = 1;
			}
		}
		bad |= ref_bufs_check(&rb, 0, r, "send/recv after the mismatches");
		ref_bufs_free(c, &rb);
	}
	ar = agreeing_allreduce(c, 7, 0xd2500001u, r, n);
	fj->o[NP2P][r].then_bad = bad || ar;
	if (ar < 0)
		return th_bail(c);
	return th_leave(c, r) | bad | ar;
}

static void check_p2p_sizes(const struct faultjob *fj, const char *where)
{
	int a = first_on(fj->sp, 0), b = first_on(fj->sp, 1), then_bad = 0;

	for (int k = 0; k < NP2P; k++) {
		const struct p2p_msg *m = &p2p_msgs[k];
		int from = m->from_b ? b : a, to = m->from_b ? a : b;
		const struct outcome *s = &fj->o[k][from], *q = &fj->o[k][to];
		int rok = q->rc == COMM_ERR_MISMATCH && has_number(q->detail, m->sent) &&
			  has_number(q->detail, m->want) && q->ms <= FAULT_LIMIT_MS;
		int sok = (s->rc == COMM_OK || s->rc == COMM_ERR_MISMATCH) &&
			  s->ms <= FAULT_LIMIT_MS;

		CHECK(rok,
		      "send/recv %s: receiver rank %d got %s \"%s\" in %ld ms, expected "
		      "COMM_ERR_MISMATCH naming %zu and %zu within %d ms",
		      where, to, comm_result_name((comm_result_t)q->rc), q->detail, q->ms, m->sent,
		      m->want, FAULT_LIMIT_MS);
		CHECK(sok,
		      "send/recv %s: sender rank %d got %s \"%s\" in %ld ms, expected COMM_OK or "
		      "COMM_ERR_MISMATCH within %d ms",
		      where, from, comm_result_name((comm_result_t)s->rc), s->detail, s->ms,
		      FAULT_LIMIT_MS);
		printf("%s: rank %d sends %zu bytes, rank %d expects %zu, %s: receiver %s \"%s\" "
		       "(%ld ms); sender %s%s%s%s (%ld ms)\n",
		       rok && sok ? "ok" : "FAIL", from, m->sent, to, m->want, where,
		       comm_result_name((comm_result_t)q->rc), q->detail, q->ms,
		       comm_result_name((comm_result_t)s->rc), *s->detail ? " \"" : "", s->detail,
		       *s->detail ? "\"" : "", s->ms);
	}
	for (int r = 0; r < N; r++)
		then_bad |= fj->o[NP2P][r].then_bad;
	CHECK(!then_bad, "send/recv %s: the messages sent as expected or the all-reduce failed",
	      where);
	printf("%s: then each message between ranks %d and %d as expected, and an all-reduce, "
	       "%s\n",
	       then_bad ? "FAIL" : "ok", a, b, where);
}

/*
 * The last rank on B finalizes; the others' all-reduce (posted before that
 * when fj->pending) fails with COMM_ERR_PEER_LOST. Then ranks 0 and 2 (on
 * different daemons) exchange a message.
 */
static int rank_leave(int r, int n, void *arg)
{
	struct faultjob *fj = arg;
	int leaver = last_on(fj->sp, 1), peer = r == 0 ? 2 : 0, bad = 0;
	comm_request_t *req = NULL;
	struct ref_bufs b;
	comm_result_t rc;
	comm_t *c;

	setenv("COMM_TIMEOUT", FAULT_TIMEOUT, 1);
	if (th_join(&c, r, n) < 0)
		return 1;
	if (r == leaver) {
		while (fj->pending && __atomic_load_n(&fj->posted, __ATOMIC_ACQUIRE) < n - 1)
			usleep(1000);
		if (fj->pending)
			usleep(50000); /* let the daemons take them */
		__atomic_store_n(&fj->left_ms, mono_ms(), __ATOMIC_RELEASE);
		rc = comm_finalize(c);
		fj->o[0][r].rc = rc;
		__atomic_store_n(&fj->left, 1, __ATOMIC_RELEASE);
		return rc != COMM_OK;
	}
	if (ref_bufs_alloc(c, &b, 64 + REF_GUARD, 1, 64 + REF_GUARD, 1, r) < 0)
		return th_bail(c);
	if (fj->pending) {
		OK_OR_BAIL(comm_allreduce(c, b.sbase, b.rbase, 4, COMM_FLOAT32, COMM_SUM, &req));
		__atomic_fetch_add(&fj->posted, 1, __ATOMIC_RELEASE);
	}
	while (!__atomic_load_n(&fj->left, __ATOMIC_ACQUIRE))
		usleep(1000);
	if (req)
		rc = comm_wait(req, -1);
	else
		rc = comm_allreduce(c, b.sbase, b.rbase, 4, COMM_FLOAT32, COMM_SUM, NULL);
	note(&fj->o[0][r], rc, mono_ms() - __atomic_load_n(&fj->left_ms, __ATOMIC_ACQUIRE), c);
	if (r == 0 || r == 2) {
		uint64_t sseed = ref_msg_seed(4, r, peer, 0), rseed = ref_msg_seed(4, peer, r, 0);

		ref_fill(b.sbase, 64, sseed);
		OK_OR_BAIL(comm_group_start(c));
		OK_OR_BAIL(comm_send(c, b.sbase, 64, COMM_UINT8, peer, NULL));
		OK_OR_BAIL(comm_recv(c, b.rbase, 64, COMM_UINT8, peer, NULL));
		OK_OR_BAIL(comm_group_end(c));
		bad = ref_msg_check(&b, 64, sseed, rseed, r, "a message after the leave");
		fj->o[1][r].then_bad = bad;
	}
	ref_bufs_free(c, &b);
	return th_leave(c, r) | bad;
}

static void check_leave(const struct faultjob *fj, const char *where)
{
	int leaver = last_on(fj->sp, 1), fail = 0;
	char want[16];

	snprintf(want, sizeof want, "rank %d", leaver);
	CHECK(fj->o[0][leaver].rc == COMM_OK, "leave %s: rank %d's comm_finalize gave %s", where,
	      leaver, comm_result_name((comm_result_t)fj->o[0][leaver].rc));
	for (int r = 0; r < N; r++) {
		const struct outcome *o = &fj->o[0][r];
		int ok;

		if (r == leaver)
			continue;
		ok = o->rc == COMM_ERR_PEER_LOST && o->ms <= FAULT_LIMIT_MS &&
		     strstr(o->detail, want);
		CHECK(ok,
		      "leave %s: rank %d's all-reduce got %s \"%s\" %ld ms after rank %d left; "
		      "expected COMM_ERR_PEER_LOST naming %s within %d ms",
		      where, r, comm_result_name((comm_result_t)o->rc), o->detail, o->ms, leaver,
		      want, FAULT_LIMIT_MS);
		fail |= !ok;
	}
	printf("%s: rank %d on B finalizes %s, %s: comm_finalize %s; the others "
	       "COMM_ERR_PEER_LOST within %d ms\n",
	       fail ? "FAIL" : "ok", leaver,
	       fj->pending ? "while the others wait in an all-reduce"
			   : "before the others post an all-reduce",
	       where,
	       comm_result_name((comm_result_t)fj->o[0][leaver].rc), FAULT_LIMIT_MS);
	for (int r = 0; r < N; r++)
		if (r != leaver)
			printf("    rank %d: %s %ld ms after the leave: \"%s\"\n", r,
			       comm_result_name((comm_result_t)fj->o[0][r].rc), fj->o[0][r].ms,
			       fj->o[0][r].detail);
	CHECK(!fj->o[1][0].then_bad && !fj->o[1][2].then_bad,
	      "leave %s: ranks 0 and 2 could not exchange a message after it", where);
	printf("%s: then ranks 0 and 2 exchange 64 bytes, %s\n",
	       fj->o[1][0].then_bad || fj->o[1][2].then_bad ? "FAIL" : "ok", where);
}

static void test_faults(const struct split *sp)
{
	struct faultjob *fj;
	char where[96];

	split_str(sp, where, sizeof where);
	fj = faultjob_new(sp);
	run_split_job(sp, rank_disagree, fj,
		      "collectives that disagree between daemons, one refused on one rank, each "
		      "followed by an agreeing all-reduce");
	check_disagreements(fj, where);
	munmap(fj, sizeof *fj);
	fj = faultjob_new(sp);
	run_split_job(sp, rank_p2p_sizes, fj,
		      "send/recv between daemons of 100 bytes against 200, 2 MiB against 4 MiB, "
		      "1 MiB + 1 against 65 MiB + 13, 0 against 100 and 100 against 0, and back");
	check_p2p_sizes(fj, where);
	munmap(fj, sizeof *fj);
	for (int pending = 0; pending < 2; pending++) {
		fj = faultjob_new(sp);
		fj->pending = pending;
		run_split_job(sp, rank_leave, fj,
			      pending ? "a rank on B leaves while the others wait in an all-reduce"
				      : "a rank on B leaves, then the others post an all-reduce");
		check_leave(fj, where);
		munmap(fj, sizeof *fj);
	}
	fflush(stdout);
}

/* --- first: can a job span two daemons at all? ------------------------------------ */

static int rank_probe(int r, int n, void *arg)
{
	int32_t v = r + 1;
	comm_t *c;

	setenv("COMM_TIMEOUT", "10000", 1);
	if (th_join(&c, r, n) < 0)
		return 1;
	OK_OR_BAIL(comm_allreduce(c, &v, &v, 1, COMM_INT32, COMM_SUM, NULL));
	if (v != n * (n + 1) / 2) {
		fprintf(stderr, "rank %d: probe all-reduce gave %d, expected %d\n", r, v,
			n * (n + 1) / 2);
		return th_bail(c);
	}
	return th_leave(c, r);
}

static int probe(void)
{
	static const int of[2] = { 0, 1 };
	int failed = th_run_ranks_nodes(nodes, of, node[0].peer, "nodes-probe", 2, rank_probe,
					NULL);

	printf("%s: probe: a 2-rank all-reduce, rank 0 on A, rank 1 on B, COMM_ROOT=%s (A)\n",
	       failed ? "FAIL" : "ok", node[0].peer);
	fflush(stdout);
	return failed;
}

static void stop_all(int started)
{
	for (int i = 0; i < started; i++) {
		CHECK(th_daemon_alive(&node[i]), "commd %c died during the tests", 'A' + i);
		CHECK(th_daemon_stop(&node[i]) == 0, "commd %c did not stop cleanly", 'A' + i);
	}
}

int main(void)
{
	struct timespec t0;
	int started = 0;

	/* an op that cannot complete fails after a minute instead of ten */
	setenv("COMM_TIMEOUT", "60000", 1);
	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (; started < NNODES; started++) {
		if (th_daemon_start_peer(&node[started], "--threads", "2", NULL) < 0) {
			CHECK(0, "commd %c (with --peer-listen) did not start", 'A' + started);
			stop_all(started);
			return CHECK_EXIT();
		}
		printf("commd %c: socket %s, peers %s\n", 'A' + started, node[started].sock,
		       node[started].peer);
	}
	if (probe() != 0) {
		CHECK(0, "a job over two daemons does not work: skipping the rest");
		for (int i = 0; i < 2; i++)
			th_daemon_dump_log(&node[i]);
		stop_all(started);
		return CHECK_EXIT();
	}
	for (size_t i = 0; i < sizeof splits / sizeof splits[0]; i++)
		test_split(&splits[i]);
	test_beside();
	test_faults(&splits[0]);
	test_faults(&splits[2]);
	stop_all(started);
	printf("%s: %.1f s in all\n", check_failures ? "FAIL" : "ok", th_secs_since(&t0));
	return CHECK_EXIT();
}
