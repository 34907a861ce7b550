/*
 * test-nodes.c: jobs whose ranks are spread over three commd daemons
 * (--peer-listen, COMM_ROOT): test-ops' cases over three splits of four
 * ranks, send/recv rings and 4 MiB exchanges between daemons, barriers, and
 * a job on one daemon beside a job that spans it.
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

static uint64_t msg_seed(int tag, int from, int to, int round)
{
	return ref_mix(((uint64_t)(unsigned)tag << 48) ^ ((uint64_t)(unsigned)from << 36) ^
		       ((uint64_t)(unsigned)to << 24) ^ (uint64_t)(unsigned)round);
}

/* Whether b's recv block holds ref_fill(rseed) and its send block still sseed; printed. */
static int msg_check(const struct ref_bufs *b, size_t bytes, uint64_t sseed, uint64_t rseed,
		     int r, const char *what)
{
	size_t at = ref_first_diff(b->rbase, bytes, rseed);
	int bad = 0;

	if (at != bytes) {
		fprintf(stderr, "rank %d: %s: byte %zu of %zu received is wrong\n", r, what, at,
			bytes);
		bad = 1;
	}
	if (ref_first_diff(b->sbase, bytes, sseed) != bytes) {
		fprintf(stderr, "rank %d: %s: the send buffer was changed\n", r, what);
		bad = 1;
	}
	return bad | ref_bufs_check(b, 0, r, what);
}

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
	int next = (r + 1) % n, prev = (r + n - 1) % n, bad = 0;
	comm_t *c;

	if (th_join(&c, r, n) < 0)
		return 1;
	for (int round = 0; round < RING_ROUNDS; round++) {
		comm_dtype_t dt = ref_dtypes[round % REF_NDTYPES];
		size_t es = comm_dtype_size(dt);
		size_t count = round % 10 == 9 ? (4u << 20) / es : 1 + (size_t)round * 7919 % 5000;
		size_t bytes = count * es;
		int async = round >= RING_ROUNDS - RING_ASYNC_ROUNDS;
		uint64_t sseed = msg_seed(1, r, next, round), rseed = msg_seed(1, prev, r, round);
		comm_request_t *sreq = NULL, *rreq = NULL;
		struct ref_bufs b;
		char what[96];

		if (ref_bufs_alloc(c, &b, bytes + REF_GUARD, round % 2, bytes + REF_GUARD,
				   round % 3 != 0, r) < 0)
			return th_bail(c);
		ref_fill(b.sbase, bytes, sseed);
		OK_OR_BAIL(comm_group_start(c));
		if (round % 4 == 1) {
			OK_OR_BAIL(comm_recv(c, b.rbase, count, dt, prev, async ? &rreq : NULL));
			OK_OR_BAIL(comm_send(c, b.sbase, count, dt, next, async ? &sreq : NULL));
		} else {
			OK_OR_BAIL(comm_send(c, b.sbase, count, dt, next, async ? &sreq : NULL));
			OK_OR_BAIL(comm_recv(c, b.rbase, count, dt, prev, async ? &rreq : NULL));
		}
		OK_OR_BAIL(comm_group_end(c));
		if (async) {
			OK_OR_BAIL(comm_wait(rreq, -1));
			OK_OR_BAIL(comm_wait(sreq, -1));
		}
		snprintf(what, sizeof what, "ring round %d (%zu x %d bytes%s)", round, count,
			 (int)es, async ? ", requests" : "");
		bad |= msg_check(&b, bytes, sseed, rseed, r, what);
		ref_bufs_free(c, &b);
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
		uint64_t sseed = msg_seed(2, r, peer, v), rseed = msg_seed(2, peer, r, v);
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
		bad |= msg_check(&b, bytes, sseed, rseed, r, what);
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
	stop_all(started);
	printf("%s: %.1f s in all\n", check_failures ? "FAIL" : "ok", th_secs_since(&t0));
	return CHECK_EXIT();
}
