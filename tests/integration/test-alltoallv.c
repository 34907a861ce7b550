/*
 * test-alltoallv.c: comm_alltoallv through the real commd: uneven and zero
 * counts, the rank's own block, gaps between blocks left alone; zero-copy
 * and staged buffers; blocking, with a request waited on or polled or left
 * to comm_finalize, two in one group; counts that disagree; bad arguments, one refused after part
 * of it was added to the group; on one daemon and over two.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "check.h"
#include "comm.h"
#include "harness.h"
#include "ref.h"

#define MAXN 8
#define GAP 0xa5a5a5a5u  /* the element between two blocks of a buffer */
/*
 * The daemons' --max-job-memory: room for 4 ranks' first 64 MiB segments,
 * not for a staged BIG block besides (2 ranks' on a daemon included).
 */
#define QUOTA "300M"
#define BIG (200u << 20)

enum mode { M_BLOCK, M_WAIT, M_TEST, M_GROUP, M_FINALIZE };

struct a2av {
	int zc;            /* comm_mem_alloc'd buffers, else malloc'd (staged) */
	enum mode mode;
	size_t scale;      /* elements per unit of count */
	uint32_t seed;
};

static const char *const mode_name[] = { "blocking", "request waited on", "request polled",
					 "two in one group", "request left to comm_finalize" };

/* Elements rank i sends to rank j: 0 to 5 units (0 about a sixth of the time). */
static size_t count_of(const struct a2av *a, int i, int j)
{
	return (size_t)(ref_mix(a->seed * 4096u + (uint32_t)(i * MAXN + j)) % 6) * a->scale;
}

/* Element e of what rank i sends to rank j (e < 2^24). */
static uint32_t value(int i, int j, size_t e, uint32_t seed)
{
	return (uint32_t)i << 28 | (uint32_t)j << 24 | (uint32_t)((e + seed) & 0xffffff);
}

/* One rank's side: counts, displacements (a GAP element after each block) and buffers. */
struct side {
	size_t sc[MAXN], sd[MAXN], rc[MAXN], rd[MAXN];
	size_t slen, rlen;      /* elements */
	uint32_t *sb, *rb;
};

static int side_make(comm_t *c, const struct a2av *a, int me, int n, struct side *s)
{
	s->slen = s->rlen = 0;
	for (int j = 0; j < n; j++) {
		s->sc[j] = count_of(a, me, j);
		s->sd[j] = s->slen;
		s->slen += s->sc[j] + 1;
		s->rc[j] = count_of(a, j, me);
		s->rd[j] = s->rlen;
		s->rlen += s->rc[j] + 1;
	}
	s->sb = ref_buf_alloc(c, a->zc, s->slen * 4);
	s->rb = ref_buf_alloc(c, a->zc, s->rlen * 4);
	if (!s->sb || !s->rb) {
		fprintf(stderr, "rank %d: allocating: %s\n", me, a->zc ? comm_last_error(c) : "malloc");
		return -1;
	}
	for (int j = 0; j < n; j++)
		for (size_t e = 0; e < s->sc[j]; e++)
			s->sb[s->sd[j] + e] = value(me, j, e, a->seed);
	for (size_t e = 0; e < s->rlen; e++)
		s->rb[e] = GAP;
	return 0;
}

static void side_free(comm_t *c, const struct a2av *a, struct side *s)
{
	ref_buf_free(c, a->zc, s->sb);
	ref_buf_free(c, a->zc, s->rb);
}

/* Whether every block arrived and every gap is untouched; prints the first fault. */
static int side_check(const struct a2av *a, int me, int n, const struct side *s)
{
	for (int i = 0; i < n; i++) {
		for (size_t e = 0; e < s->rc[i]; e++) {
			uint32_t got = s->rb[s->rd[i] + e], want = value(i, me, e, a->seed);

			if (got != want) {
				fprintf(stderr, "rank %d: element %zu from rank %d: %#x, want %#x\n", me,
					e, i, got, want);
				return 1;
			}
		}
		if (s->rb[s->rd[i] + s->rc[i]] != GAP) {
			fprintf(stderr, "rank %d: the gap after rank %d's block was written\n", me, i);
			return 1;
		}
	}
	return 0;
}

static comm_result_t post(comm_t *c, struct side *s, comm_request_t **req)
{
	return comm_alltoallv(c, s->sb, s->sc, s->sd, s->rb, s->rc, s->rd, COMM_UINT32, req);
}

/*
 * One alltoallv (two in M_GROUP, the second with the seed + 1) the way
 * a->mode says; M_FINALIZE (staged buffers only) finalizes c: -1 when right.
 */
static int exchange(comm_t *c, const struct a2av *a, int me, int n)
{
	struct a2av b = *a;
	struct side s[2];
	comm_request_t *req[2] = { NULL, NULL };
	comm_result_t rc = COMM_OK;
	int bad = 0, done = 0, sides = a->mode == M_GROUP ? 2 : 1;

	b.seed = a->seed + 1;
	if (side_make(c, a, me, n, &s[0]) || (sides == 2 && side_make(c, &b, me, n, &s[1])))
		return 1;
	switch (a->mode) {
	case M_BLOCK:
		rc = post(c, &s[0], NULL);
		break;
	case M_WAIT:
		rc = post(c, &s[0], &req[0]);
		if (rc == COMM_OK) {
			CHECK(req[0] != NULL, "rank %d: no request", me);
			rc = comm_wait(req[0], -1);
		}
		break;
	case M_TEST:
		rc = post(c, &s[0], &req[0]);
		while (rc == COMM_OK && !done)
			rc = comm_test(req[0], &done);
		break;
	case M_FINALIZE: /* it waits for the request; the staged blocks are then in place */
		rc = post(c, &s[0], &req[0]);
		if (rc == COMM_OK && (rc = comm_finalize(c)) == COMM_OK) {
			bad = side_check(a, me, n, &s[0]);
			free(s[0].sb);
			free(s[0].rb);
			return bad ? bad : -1;
		}
		break;
	case M_GROUP:
		comm_group_start(c);
		rc = post(c, &s[0], &req[0]);
		if (rc == COMM_OK)
			rc = post(c, &s[1], NULL);
		if (rc == COMM_OK) {
			comm_result_t early = comm_wait(req[0], 0);

			bad |= !th_want_rc(c, me, "wait before the group ends", early,
					   COMM_ERR_INVALID_ARG);
		}
		if (rc == COMM_OK)
			rc = comm_group_end(c);
		if (rc == COMM_OK)
			rc = comm_wait(req[0], -1);
		break;
	}
	if (rc != COMM_OK) {
		fprintf(stderr, "rank %d: alltoallv (%s): %s: %s\n", me, mode_name[a->mode],
			comm_strerror(rc), comm_last_error(c));
		return th_bail(c);
	}
	bad |= side_check(a, me, n, &s[0]);
	if (sides == 2)
		bad |= side_check(&b, me, n, &s[1]);
	for (int k = 0; k < sides; k++)
		side_free(c, k ? &b : a, &s[k]);
	return bad;
}

static int rank_exchange(int me, int n, void *arg)
{
	comm_t *c;
	int bad;

	if (th_join(&c, me, n))
		return 1;
	bad = exchange(c, arg, me, n);
	if (bad < 0) /* finalized by exchange */
		return 0;
	return bad ? bad : th_leave(c, me);
}

/* An all-reduce of rank + 1 after the case: the job goes on. */
static int sum_after(comm_t *c, int me, int n)
{
	int32_t v = me + 1;
	comm_result_t rc = comm_allreduce(c, &v, &v, 1, COMM_INT32, COMM_SUM, NULL);

	if (!th_want_rc(c, me, "the all-reduce after", rc, COMM_OK))
		return 1;
	if (v != n * (n + 1) / 2) {
		fprintf(stderr, "rank %d: the all-reduce after: %d, want %d\n", me, v, n * (n + 1) / 2);
		return 1;
	}
	return 0;
}

/*
 * Rank 0 sends 3 elements to rank 1, which expects 2: rank 1 gets
 * COMM_ERR_MISMATCH naming the byte counts, and so does rank 0 on one
 * daemon (across daemons (arg non-NULL) its send may have ended before
 * rank 1 compared: COMM_OK too); the pairs that agree deliver, and the
 * job goes on. Then a zero-count recv that gets 1 element, through
 * comm_stream_wait.
 */
static int rank_mismatch(int me, int n, void *arg)
{
	size_t sc[MAXN], sd[MAXN], rc_[MAXN], rd[MAXN];
	uint32_t sb[MAXN * 3], rb[MAXN * 3];
	comm_request_t *req;
	comm_result_t rc;
	comm_t *c;
	int bad = 0;

	if (th_join(&c, me, n))
		return 1;
	for (int j = 0; j < n; j++) {
		sc[j] = rc_[j] = 2;
		sd[j] = rd[j] = (size_t)j * 3;
		for (int e = 0; e < 3; e++) {
			sb[j * 3 + e] = value(me, j, (size_t)e, 0);
			rb[j * 3 + e] = GAP;
		}
	}
	if (me == 0)
		sc[1] = 3;
	rc = comm_alltoallv(c, sb, sc, sd, rb, rc_, rd, COMM_UINT32, NULL);
	if (!(arg && me == 0 && rc == COMM_OK))
		bad |= !th_want_rc(c, me, "alltoallv", rc, me < 2 ? COMM_ERR_MISMATCH : COMM_OK);
	if (rc != COMM_OK && !strstr(comm_last_error(c), "bytes")) {
		fprintf(stderr, "rank %d: the mismatch's message names no byte counts: %s\n", me,
			comm_last_error(c));
		bad = 1;
	}
	for (int i = 0; i < n; i++) {
		if ((me == 1 && i == 0) || (me == 0 && i == 1))
			continue;
		for (int e = 0; e < 2; e++)
			if (rb[i * 3 + e] != value(i, me, (size_t)e, 0)) {
				fprintf(stderr, "rank %d: element %d from rank %d: %#x\n", me, e, i,
					rb[i * 3 + e]);
				bad = 1;
			}
	}
	bad |= sum_after(c, me, n);

	/*
	 * Then rank 1 sends 1 element to rank 0, which expects none, and each
	 * waits through comm_stream_wait: on host memory that is comm_wait, the
	 * zero-count part's failure included, and no async error.
	 */
	for (int j = 0; j < n; j++)
		sc[j] = rc_[j] = 1;
	if (me == 0)
		rc_[1] = 0;
	rc = comm_alltoallv(c, sb, sc, sd, rb, rc_, rd, COMM_UINT32, &req);
	if (rc == COMM_OK)
		rc = comm_stream_wait(req, NULL);
	if (!(arg && me == 1 && rc == COMM_OK))
		bad |= !th_want_rc(c, me, "alltoallv, stream wait", rc,
				   me < 2 ? COMM_ERR_MISMATCH : COMM_OK);
	bad |= !th_want_rc(c, me, "comm_async_error", comm_async_error(c), COMM_OK);
	bad |= sum_after(c, me, n);
	return bad ? bad : th_leave(c, me);
}

/*
 * Refused before anything is sent, on every rank alike: missing counts, a
 * bad dtype, a NULL buffer with a count, a block whose end overflows, and (rank + 2's send block, BIG
 * bytes of static memory to stage, past the job's memory limit) one refused after
 * the recv and send for rank + 1 were added to the group, which are taken
 * back. Then a good alltoallv and an all-reduce: no op was left half-posted.
 */
static int rank_invalid(int me, int n, void *arg)
{
	struct a2av a = { .zc = 1, .mode = M_BLOCK, .scale = 7, .seed = 99 };
	size_t z[MAXN] = { 0 }, huge[MAXN] = { 0 };
	static char big[BIG];
	uint32_t one = 0;
	comm_result_t rc;
	comm_t *c;
	int bad = 0;

	(void)arg;
	if (th_join(&c, me, n))
		return 1;
	/*
	 * Every rank's first segment registered before the BIG block is
	 * staged (the job's limit is first come, first served): one made here
	 * (the ring's, where there is one), then a barrier.
	 */
	if (!comm_mem_alloc(c, 4096) || comm_barrier(c, NULL) != COMM_OK) {
		fprintf(stderr, "rank %d: setting up: %s\n", me, comm_last_error(c));
		return th_bail(c);
	}
	rc = comm_alltoallv(c, &one, NULL, z, &one, z, z, COMM_UINT32, NULL);
	bad |= !th_want_rc(c, me, "no sendcounts", rc, COMM_ERR_INVALID_ARG);
	rc = comm_alltoallv(c, &one, z, z, &one, z, z, (comm_dtype_t)99, NULL);
	bad |= !th_want_rc(c, me, "dtype 99", rc, COMM_ERR_INVALID_ARG);
	huge[n - 1] = 1;
	rc = comm_alltoallv(c, NULL, huge, z, &one, z, z, COMM_UINT32, NULL);
	bad |= !th_want_rc(c, me, "a NULL send buffer with 1 element for the last rank", rc,
			   COMM_ERR_INVALID_ARG);
	rc = comm_alltoallv(c, &one, z, z, NULL, huge, z, COMM_UINT32, NULL);
	bad |= !th_want_rc(c, me, "a NULL recv buffer with 1 element from the last rank", rc,
			   COMM_ERR_INVALID_ARG);
	huge[n - 1] = SIZE_MAX / 2;
	rc = comm_alltoallv(c, &one, z, z, &one, z, huge, COMM_UINT32, NULL);
	bad |= !th_want_rc(c, me, "an overflowing displacement", rc, COMM_ERR_INVALID_ARG);
	huge[n - 1] = 0;
	huge[(me + 2) % n] = sizeof big / 4;
	rc = comm_alltoallv(c, big, huge, z, big, z, z, COMM_UINT32, NULL);
	bad |= !th_want_rc(c, me, "a 200 MiB staged block", rc, COMM_ERR_NO_MEMORY);
	bad |= exchange(c, &a, me, n);
	bad |= sum_after(c, me, n);
	return bad ? bad : th_leave(c, me);
}

static int next_job;

static void run_case(const struct th_daemon *const *ds, const int *of, const char *root, int n,
		     th_rank_fn fn, void *arg, const char *what)
{
	struct timespec t0;
	char job[64];
	int failed;

	snprintf(job, sizeof job, "a2av-%d", ++next_job);
	clock_gettime(CLOCK_MONOTONIC, &t0);
	failed = of ? th_run_ranks_nodes(ds, of, root, job, n, fn, arg)
		    : th_run_ranks(ds[0], job, n, fn, arg);
	CHECK(failed == 0, "%s: %d of %d ranks failed", what, failed, n);
	printf("%s: %s (%.1f s)\n", failed ? "FAIL" : "ok", what, th_secs_since(&t0));
	fflush(stdout);
}

/* Every mode and buffer kind, small and large blocks, n ranks placed by of (NULL: one daemon). */
static void exchanges(const struct th_daemon *const *ds, const int *of, const char *root, int n,
		      const char *where)
{
	static const size_t scales[] = { 1, 50000 };
	char what[160];

	for (size_t k = 0; k < sizeof scales / sizeof scales[0]; k++)
		for (int m = M_BLOCK; m <= M_FINALIZE; m++)
			for (int zc = m == M_FINALIZE ? 0 : 1; zc >= 0; zc--) {
				struct a2av a = { .zc = zc, .mode = (enum mode)m,
						  .scale = scales[k], .seed = (uint32_t)(k * 16 + m * 2 + zc) };

				snprintf(what, sizeof what,
					 "n=%d %s: blocks of 0-5 x %zu uint32, %s, %s", n, where,
					 scales[k], zc ? "zero-copy" : "staged", mode_name[m]);
				run_case(ds, of, root, n, rank_exchange, &a, what);
			}
}

int main(void)
{
	static const int split[4] = { 0, 1, 0, 1 };
	struct th_daemon a, b;
	const struct th_daemon *ds[2] = { &a, &b };
	struct a2av one = { .zc = 1, .mode = M_BLOCK, .scale = 3, .seed = 7 };
	int fds0a, fds0b;

	setenv("COMM_TIMEOUT", "60000", 1);
	REQUIRE(th_daemon_start_peer(&a, "--threads", "2", "--max-job-memory", QUOTA, NULL) == 0,
		"commd A did not start");
	REQUIRE(th_daemon_start_peer(&b, "--threads", "2", "--max-job-memory", QUOTA, NULL) == 0,
		"commd B did not start");
	run_case(ds, split, a.peer, 4, th_rank_sum, NULL, "a first job over A and B");
	fds0a = th_count_fds(a.pid);
	fds0b = th_count_fds(b.pid);

	run_case(ds, NULL, NULL, 1, rank_exchange, &one, "n=1: its own block only");
	exchanges(ds, NULL, NULL, 4, "on one daemon");
	run_case(ds, NULL, NULL, 4, rank_mismatch, NULL,
		 "rank 0 sends 3 to rank 1, which expects 2: both COMM_ERR_MISMATCH, the rest "
		 "delivered, the job goes on");
	run_case(ds, NULL, NULL, 4, rank_invalid, NULL,
		 "bad arguments refused before anything is sent, one after half a group was "
		 "built; then an alltoallv and an all-reduce work");
	exchanges(ds, split, a.peer, 4, "over A (0 2) and B (1 3)");
	run_case(ds, split, a.peer, 4, rank_mismatch, &one,
		 "the mismatch over A and B (rank 0's COMM_OK or COMM_ERR_MISMATCH)");
	run_case(ds, split, a.peer, 4, rank_invalid, NULL, "the bad arguments over A and B");

	th_check_baseline(&a, fds0a, "the alltoallv cases (A)");
	th_check_baseline(&b, fds0b, "the alltoallv cases (B)");
	CHECK(th_daemon_stop(&a) == 0, "commd A did not stop cleanly");
	CHECK(th_daemon_stop(&b) == 0, "commd B did not stop cleanly");
	return CHECK_EXIT();
}
