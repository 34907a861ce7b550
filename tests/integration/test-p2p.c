/*
 * test-p2p.c: send and recv (matching order, sizes, self, rings, large),
 * groups, barrier, every op interleaved, many outstanding requests, bad
 * arguments and a rank that leaves early, through the real commd.
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
#include "ref.h"

#define BIG 1000003          /* the large count: worker threads */
#define NOUT 300             /* outstanding requests per rank */

/* --- message contents: bytes from a seed ---------------------------------- */


/* A buffer of bytes (+ REF_GUARD poisoned bytes): comm_mem_alloc'd or malloc'd. */
struct buf {
	char *p;
	size_t len;
	int zc;
};

static int buf_get(comm_t *c, struct buf *b, size_t bytes, int zc, int r)
{
	b->len = bytes;
	b->zc = zc;
	b->p = ref_buf_alloc(c, zc, bytes + REF_GUARD);
	if (!b->p) {
		fprintf(stderr, "rank %d: allocating %zu bytes: %s\n", r, bytes + REF_GUARD,
			zc ? comm_last_error(c) : "malloc");
		return -1;
	}
	memset(b->p, REF_POISON, bytes + REF_GUARD);
	return 0;
}

static void buf_put(comm_t *c, struct buf *b)
{
	ref_buf_free(c, b->zc, b->p);
	b->p = NULL;
}

/* Whether b holds ref_fill(seed) and its guard is intact; prints why not. */
static int buf_check(const struct buf *b, uint64_t seed, int r, const char *what)
{
	size_t at = ref_first_diff(b->p, b->len, seed);

	if (at != b->len) {
		fprintf(stderr, "rank %d: %s: byte %zu of %zu is wrong\n", r, what, at, b->len);
		return 1;
	}
	if (!ref_guard_ok(b->p + b->len)) {
		fprintf(stderr, "rank %d: %s: written past the end of the buffer\n", r, what);
		return 1;
	}
	return 0;
}

/* --- joining, leaving, results --------------------------------------------- */

#define OK_OR_BAIL(call)                                                       \
	do {                                                                   \
		if (!th_want_rc(c, r, #call, (call), COMM_OK))                    \
			return th_bail(c);                                        \
	} while (0)

static int next_job;

/* Run fn on n ranks as a new job; print one line. */
static void run_job(const struct th_daemon *d, int n, th_rank_fn fn, void *arg,
		    const char *what)
{
	struct timespec t0;
	char job[64];
	int failed;

	snprintf(job, sizeof job, "p2p-%d", ++next_job);
	clock_gettime(CLOCK_MONOTONIC, &t0);
	failed = th_run_ranks(d, job, n, fn, arg);
	CHECK(failed == 0, "%s: %d of %d ranks failed", what, failed, n);
	printf("%s: %s (%.1f s)\n", failed ? "FAIL" : "ok", what, th_secs_since(&t0));
	fflush(stdout);
}

/* --- exact values for every dtype and reduction ---------------------------- */

/*
 * The collectives here (mixed ops, outstanding requests, the checks after a
 * bad argument) use small inputs: integers -5..5 (0..5 unsigned), float16
 * and bfloat16 multiples of 0.5 in -2..2, float32 and float64 multiples of
 * 0.25 in -2..2. With n <= 4 every SUM, PROD, MIN, MAX and AVG of them is
 * exact in double, and so exact in the element type once integers wrap
 * (PROD), integer AVG truncates and floats divide: compared bit for bit.
 */
static uint64_t val(comm_dtype_t dt, uint64_t seed, int r, size_t idx)
{
	uint64_t h = ref_mix(seed ^ ((uint64_t)(unsigned)r << 40) ^ idx);

	if (dt == COMM_UINT8 || dt == COMM_UINT32 || dt == COMM_UINT64)
		return h % 6;
	return ref_small(dt, h);
}

/* The reduction of element idx over n ranks. */
static uint64_t fold(comm_dtype_t dt, comm_redop_t op, uint64_t seed, int n, size_t idx)
{
	uint64_t in[REF_MAX_RANKS];

	for (int q = 0; q < n; q++)
		in[q] = val(dt, seed, q, idx);
	return ref_fold(dt, op, in, n);
}

/* Whether element j of p is v as dt; prints why not. */
static int elem_ok(comm_dtype_t dt, const char *p, size_t j, uint64_t v, int r,
		   const char *what)
{
	uint64_t want = 0, got = ref_load(dt, p + j * ref_size(dt));

	ref_store(dt, v, &want);
	if (got == want)
		return 1;
	fprintf(stderr, "rank %d: %s: element %zu is 0x%llx, expected 0x%llx (%g)\n", r, what, j,
		(unsigned long long)got, (unsigned long long)want, ref_value(dt, want));
	return 0;
}

/* --- send/recv matching order ---------------------------------------------- */

#define NMSG 5

static const struct {
	comm_dtype_t dt;
	size_t count;
} msgs[NMSG] = {
	{ COMM_INT8, 3 },          { COMM_FLOAT32, 4097 }, { COMM_INT64, 1 },
	{ COMM_FLOAT16, 70001 },   { COMM_FLOAT64, 300007 },
};

/*
 * Rank 0 posts five sends of different sizes (requests, waited at the end);
 * rank 1 receives them in order, blocking. Then the other way round: rank 1
 * posts five recvs first, rank 0 sends them blocking.
 */
static int rank_order(int r, int n, void *arg)
{
	comm_request_t *req[NMSG];
	struct buf b[NMSG];
	comm_t *c;
	int bad = 0;

	if (th_join(&c, r, n) < 0)
		return 1;
	for (int round = 0; round < 2; round++) {
		int async = round == 0 ? r == 0 : r == 1;

		for (int k = 0; k < NMSG; k++) {
			size_t bytes = msgs[k].count * comm_dtype_size(msgs[k].dt);

			/* zero-copy and staged on either side */
			if (buf_get(c, &b[k], bytes, (k + r + round) % 2, r) < 0)
				return th_bail(c);
			if (r == 0)
				ref_fill(b[k].p, bytes, ref_msg_seed(round, 0, 1, k));
			if (!async) {
				req[k] = NULL;
				continue;
			}
			if (r == 0)
				OK_OR_BAIL(comm_send(c, b[k].p, msgs[k].count, msgs[k].dt, 1,
						     &req[k]));
			else
				OK_OR_BAIL(comm_recv(c, b[k].p, msgs[k].count, msgs[k].dt, 0,
						     &req[k]));
		}
		for (int k = 0; k < NMSG; k++) {
			char what[64];

			if (async) {
				OK_OR_BAIL(comm_wait(req[k], -1));
			} else if (r == 0) {
				OK_OR_BAIL(comm_send(c, b[k].p, msgs[k].count, msgs[k].dt, 1,
						     NULL));
			} else {
				OK_OR_BAIL(comm_recv(c, b[k].p, msgs[k].count, msgs[k].dt, 0,
						     NULL));
			}
			snprintf(what, sizeof what, "round %d message %d (%zu bytes)", round, k,
				 b[k].len);
			bad |= buf_check(&b[k], ref_msg_seed(round, 0, 1, k), r, what);
		}
		for (int k = 0; k < NMSG; k++)
			buf_put(c, &b[k]);
	}
	return th_leave(c, r) | bad;
}

/* --- mismatched sizes ------------------------------------------------------ */

/* A float32 all-reduce of 7 elements; 0 when its result is right. */
static int check_allreduce(comm_t *c, int r, int n, uint64_t seed, const char *after)
{
	float *s = comm_mem_alloc(c, 7 * sizeof *s), *d = comm_mem_alloc(c, 7 * sizeof *d);
	char what[128];
	comm_result_t rc;
	int bad = 0;

	if (!s || !d) {
		fprintf(stderr, "rank %d: comm_mem_alloc: %s\n", r, comm_last_error(c));
		return -1;
	}
	snprintf(what, sizeof what, "all-reduce after %s", after);
	for (size_t i = 0; i < 7; i++)
		ref_store(COMM_FLOAT32, val(COMM_FLOAT32, seed, r, i), &s[i]);
	rc = comm_allreduce(c, s, d, 7, COMM_FLOAT32, COMM_SUM, NULL);
	if (!th_want_rc(c, r, what, rc, COMM_OK)) {
		bad = -1;
	} else {
		for (size_t i = 0; i < 7 && !bad; i++)
			bad = !elem_ok(COMM_FLOAT32, (char *)d, i,
				       fold(COMM_FLOAT32, COMM_SUM, seed, n, i), r, what);
	}
	comm_mem_free(c, s);
	comm_mem_free(c, d);
	return bad;
}

static int rank_mismatch(int r, int n, void *arg)
{
	struct buf b;
	comm_result_t rc;
	comm_t *c;
	int bad = 0, ar;

	if (th_join(&c, r, n) < 0)
		return 1;
	if (buf_get(c, &b, 64, 1, r) < 0)
		return th_bail(c);
	/* 4 int32 sent, 8 expected: both fail; rank 2 is not involved */
	if (r == 0) {
		rc = comm_send(c, b.p, 4, COMM_INT32, 1, NULL);
		bad |= !th_want_rc(c, r, "send of 4 int32 to a recv of 8", rc, COMM_ERR_MISMATCH);
	} else if (r == 1) {
		rc = comm_recv(c, b.p, 8, COMM_INT32, 0, NULL);
		bad |= !th_want_rc(c, r, "recv of 8 int32 from a send of 4", rc, COMM_ERR_MISMATCH);
	}
	/* the other way round, with requests */
	if (r == 0 || r == 1) {
		comm_request_t *req = NULL;

		rc = r == 1 ? comm_send(c, b.p, 8, COMM_INT64, 0, &req)
			    : comm_recv(c, b.p, 3, COMM_INT64, 1, &req);
		if (rc == COMM_OK)
			rc = comm_wait(req, -1);
		bad |= !th_want_rc(c, r, "8 int64 against 3 int64, with requests", rc,
				COMM_ERR_MISMATCH);
	}
	ar = check_allreduce(c, r, n, 11, "a mismatched send/recv");
	if (ar < 0)
		return th_bail(c);
	bad |= ar;
	/* the same bytes in another dtype match: 4 int64 against 8 int32 */
	if (r == 0) {
		ref_fill(b.p, 32, ref_msg_seed(2, 0, 1, 0));
		OK_OR_BAIL(comm_send(c, b.p, 4, COMM_INT64, 1, NULL));
		OK_OR_BAIL(comm_send(c, b.p, 16, COMM_INT8, 1, NULL));
	} else if (r == 1) {
		OK_OR_BAIL(comm_recv(c, b.p, 8, COMM_INT32, 0, NULL));
		b.len = 32;
		bad |= buf_check(&b, ref_msg_seed(2, 0, 1, 0), r, "4 int64 received as 8 int32");
		memset(b.p, REF_POISON, 64 + REF_GUARD);
		OK_OR_BAIL(comm_recv(c, b.p, 8, COMM_FLOAT16, 0, NULL));
		b.len = 16;
		bad |= buf_check(&b, ref_msg_seed(2, 0, 1, 0), r, "16 int8 received as 8 float16");
	}
	ar = check_allreduce(c, r, n, 12, "the matching send/recv");
	if (ar < 0)
		return th_bail(c);
	bad |= ar;
	buf_put(c, &b);
	return th_leave(c, r) | bad;
}

/* --- send to self ---------------------------------------------------------- */

static int rank_self(int r, int n, void *arg)
{
	struct buf s[2], d[2];
	comm_t *c;
	int bad = 0;

	if (th_join(&c, r, n) < 0)
		return 1;
	for (int round = 0; round < 4; round++) {
		size_t count = round < 2 ? 1000 : BIG;
		int zc = round % 2;

		for (int k = 0; k < 2; k++) {
			if (buf_get(c, &s[k], (count + (size_t)k) * 4, zc, r) < 0 ||
			    buf_get(c, &d[k], (count + (size_t)k) * 4, !zc, r) < 0)
				return th_bail(c);
			ref_fill(s[k].p, s[k].len, ref_msg_seed(10 + round, r, r, k));
		}
		/* two messages to self: the first send pairs with the first recv */
		OK_OR_BAIL(comm_group_start(c));
		if (round % 2) {
			OK_OR_BAIL(comm_recv(c, d[0].p, count, COMM_FLOAT32, r, NULL));
			OK_OR_BAIL(comm_recv(c, d[1].p, count + 1, COMM_FLOAT32, r, NULL));
		}
		OK_OR_BAIL(comm_send(c, s[0].p, count, COMM_FLOAT32, r, NULL));
		OK_OR_BAIL(comm_send(c, s[1].p, count + 1, COMM_FLOAT32, r, NULL));
		if (!(round % 2)) {
			OK_OR_BAIL(comm_recv(c, d[0].p, count, COMM_FLOAT32, r, NULL));
			OK_OR_BAIL(comm_recv(c, d[1].p, count + 1, COMM_FLOAT32, r, NULL));
		}
		OK_OR_BAIL(comm_group_end(c));
		for (int k = 0; k < 2; k++) {
			char what[64];

			snprintf(what, sizeof what, "self message %d of %zu floats", k,
				 count + (size_t)k);
			bad |= buf_check(&d[k], ref_msg_seed(10 + round, r, r, k), r, what);
			bad |= buf_check(&s[k], ref_msg_seed(10 + round, r, r, k), r,
					 "self-send input");
			buf_put(c, &s[k]);
			buf_put(c, &d[k]);
		}
	}
	return th_leave(c, r) | bad;
}

/* --- rings in groups --------------------------------------------------------- */

#define RING_ROUNDS 100
#define RING_ASYNC_ROUNDS 20

static int rank_ring(int r, int n, void *arg)
{
	int bad = 0, rc;
	comm_t *c;

	if (th_join(&c, r, n) < 0)
		return 1;
	for (int round = 0; round < RING_ROUNDS + RING_ASYNC_ROUNDS; round++) {
		comm_dtype_t dt = ref_dtypes[round % REF_NDTYPES];

		rc = ref_ring_round(c, r, n, 20, round, dt, 1 + (size_t)round * 7919 % 3000,
				    round >= RING_ROUNDS);
		if (rc < 0)
			return th_bail(c);
		bad |= rc;
	}
	return th_leave(c, r) | bad;
}

/* --- sends and recvs with requests, no group ------------------------------------ */

/*
 * Each rank isends to the next and the one before, then irecvs from both,
 * all with requests and no group (as torch's batch_isend_irecv posts them
 * on a backend other than NCCL), 20 rounds of growing sizes, zero-copy and
 * staged: the run of sends and recvs progresses as a group would, so no
 * rank waits for a partner stuck behind its own send. Then an all-reduce.
 */
static int rank_isend_irecv(int r, int n, void *arg)
{
	int next = (r + 1) % n, prev = (r + n - 1) % n, bad = 0;
	comm_t *c;

	(void)arg;
	if (th_join(&c, r, n) < 0)
		return 1;
	for (int round = 0; round < 20; round++) {
		size_t count = 1 + (size_t)round * 7919 % 50000;
		comm_request_t *req[4];
		struct buf s[2], d[2];
		char what[96];

		for (int k = 0; k < 2; k++)
			if (buf_get(c, &s[k], count * 4, (round + k) % 2, r) < 0 ||
			    buf_get(c, &d[k], count * 4, round % 3 == k, r) < 0)
				return th_bail(c);
		ref_fill(s[0].p, s[0].len, ref_msg_seed(40, r, next, round));
		ref_fill(s[1].p, s[1].len, ref_msg_seed(41, r, prev, round));
		OK_OR_BAIL(comm_send(c, s[0].p, count, COMM_FLOAT32, next, &req[0]));
		OK_OR_BAIL(comm_send(c, s[1].p, count, COMM_FLOAT32, prev, &req[1]));
		OK_OR_BAIL(comm_recv(c, d[0].p, count, COMM_FLOAT32, prev, &req[2]));
		OK_OR_BAIL(comm_recv(c, d[1].p, count, COMM_FLOAT32, next, &req[3]));
		for (int k = 0; k < 4; k++)
			OK_OR_BAIL(comm_wait(req[k], -1));
		snprintf(what, sizeof what, "round %d: %zu floats from rank %d", round, count, prev);
		bad |= buf_check(&d[0], ref_msg_seed(40, prev, r, round), r, what);
		snprintf(what, sizeof what, "round %d: %zu floats from rank %d", round, count, next);
		bad |= buf_check(&d[1], ref_msg_seed(41, next, r, round), r, what);
		for (int k = 0; k < 2; k++) {
			buf_put(c, &s[k]);
			buf_put(c, &d[k]);
		}
	}
	{
		int32_t v = r + 1;

		OK_OR_BAIL(comm_allreduce(c, &v, &v, 1, COMM_INT32, COMM_SUM, NULL));
		if (v != n * (n + 1) / 2)
			bad = fprintf(stderr, "rank %d: the all-reduce after: %d\n", r, v) > 0;
	}
	return th_leave(c, r) | bad;
}

/*
 * Many ops in one unit: rank 0 posts NMANY sends of one int32 each, half
 * to rank 1 and half to rank 2, before they post their recvs (a moment
 * later). *grouped 0: with requests and no group (one run); 1: in one
 * group with an all-reduce in its middle, on every rank. Every value
 * exact, then an all-reduce.
 */
#define NMANY 6000

static int rank_many(int r, int n, void *arg)
{
	int grouped = *(const int *)arg, bad = 0, nreq = 0, per = NMANY / 2;
	comm_request_t **req = calloc(NMANY + 1, sizeof *req);
	int32_t *v, sum = r + 1;
	comm_t *c;

	if (!req || th_join(&c, r, n) < 0)
		return 1;
	if (!(v = comm_mem_alloc(c, NMANY * sizeof *v)))
		return th_bail(c);
	for (int i = 0; i < NMANY; i++)
		v[i] = r == 0 ? i * 7 + 1 : -1;
	if (r != 0)
		usleep(200 * 1000); /* rank 0's sends are queued first */
	if (grouped)
		OK_OR_BAIL(comm_group_start(c));
	for (int i = 0; i < NMANY; i++) {
		int to = 1 + i / per;

		if (grouped && i == per)
			OK_OR_BAIL(comm_allreduce(c, &sum, &sum, 1, COMM_INT32, COMM_SUM, &req[nreq++]));
		if (r == 0)
			OK_OR_BAIL(comm_send(c, &v[i], 1, COMM_INT32, to, &req[nreq++]));
		else if (r == to)
			OK_OR_BAIL(comm_recv(c, &v[i], 1, COMM_INT32, 0, &req[nreq++]));
	}
	if (grouped)
		OK_OR_BAIL(comm_group_end(c));
	for (int i = 0; i < nreq; i++)
		OK_OR_BAIL(comm_wait(req[i], -1));
	for (int i = 0; i < NMANY && !bad; i++)
		if (r != 0 && r == 1 + i / per && v[i] != i * 7 + 1)
			bad = fprintf(stderr, "rank %d: message %d: %d, want %d\n", r, i, v[i],
				      i * 7 + 1) > 0;
	if (grouped && sum != n * (n + 1) / 2)
		bad = fprintf(stderr, "rank %d: the all-reduce in the group: %d\n", r, sum) > 0;
	sum = r + 1;
	OK_OR_BAIL(comm_allreduce(c, &sum, &sum, 1, COMM_INT32, COMM_SUM, NULL));
	if (sum != n * (n + 1) / 2)
		bad = fprintf(stderr, "rank %d: the all-reduce after: %d\n", r, sum) > 0;
	comm_mem_free(c, v);
	free(req);
	return th_leave(c, r) | bad;
}

/* Run fn on n ranks over two new daemons, rank r on of[r] (0: A, the root; 1: B); one line. */
static void run_two_daemons(const int *of, int n, th_rank_fn fn, const char *job,
			    const char *what)
{
	struct th_daemon a, b;
	const struct th_daemon *ds[2] = { &a, &b };
	struct timespec t0;
	int failed;

	REQUIRE(th_daemon_start_peer(&a, NULL) == 0 && th_daemon_start_peer(&b, NULL) == 0,
		"commd A and B did not start");
	clock_gettime(CLOCK_MONOTONIC, &t0);
	failed = th_run_ranks_nodes(ds, of, a.peer, job, n, fn, NULL);
	CHECK(failed == 0, "%s: %d of %d ranks failed", what, failed, n);
	printf("%s: %s (%.1f s)\n", failed ? "FAIL" : "ok", what, th_secs_since(&t0));
	fflush(stdout);
	CHECK(th_daemon_stop(&a) == 0 && th_daemon_stop(&b) == 0, "commd A or B did not stop");
}

/*
 * Over two daemons (A: ranks 0 and 2, B: rank 1): rank 1 leaves at once,
 * rank 2 sends rank 0 one int, and rank 0 then posts a group of a send to
 * rank 1 (gone: PEER_LOST, but still handed to the data plane) and the recv
 * from rank 2. The group is answered only once the data plane is done with
 * the send (commd once freed it while its task still ran: under ASan, a
 * use after free).
 */
static int rank_left_remote(int r, int n, void *arg)
{
	int32_t *v;
	comm_t *c;
	int bad = 0;

	(void)arg;
	if (th_join(&c, r, n) < 0)
		return 1;
	if (!(v = comm_mem_alloc(c, 4 * sizeof *v)))
		return th_bail(c);
	v[0] = 1000 + r;
	if (r == 1)
		return th_leave(c, r);
	usleep(500 * 1000); /* rank 1 has left */
	if (r == 2) {
		OK_OR_BAIL(comm_send(c, &v[0], 1, COMM_INT32, 0, NULL));
	} else {
		comm_request_t *sreq, *rreq;

		usleep(300 * 1000); /* rank 2's send is there */
		v[1] = -1;
		OK_OR_BAIL(comm_group_start(c));
		OK_OR_BAIL(comm_send(c, &v[0], 1, COMM_INT32, 1, &sreq));
		OK_OR_BAIL(comm_recv(c, &v[1], 1, COMM_INT32, 2, &rreq));
		OK_OR_BAIL(comm_group_end(c));
		bad |= !th_want_rc(c, r, "send to rank 1, gone", comm_wait(sreq, -1),
				   COMM_ERR_PEER_LOST);
		bad |= !th_want_rc(c, r, "recv from rank 2", comm_wait(rreq, -1), COMM_OK);
		if (v[1] != 1002)
			bad = fprintf(stderr, "rank 0: from rank 2: %d, want 1002\n", v[1]) > 0;
	}
	return th_leave(c, r) | bad;
}

/* --- blocking exchange without groups ---------------------------------------- */

static int rank_exchange(int r, int n, void *arg)
{
	int peer = r % 2 ? r - 1 : r + 1, bad = 0;
	comm_t *c;

	if (th_join(&c, r, n) < 0)
		return 1;
	for (int round = 0; round < 50; round++) {
		size_t count = (size_t)round * 1237 % 20000;
		struct buf s, d;
		char what[64];

		if (buf_get(c, &s, count * 8, round % 2, r) < 0 ||
		    buf_get(c, &d, count * 8, round % 3 == 0, r) < 0)
			return th_bail(c);
		ref_fill(s.p, s.len, ref_msg_seed(30, r, peer, round));
		if (r % 2 == 0) {
			OK_OR_BAIL(comm_send(c, s.p, count, COMM_UINT64, peer, NULL));
			OK_OR_BAIL(comm_recv(c, d.p, count, COMM_UINT64, peer, NULL));
		} else {
			OK_OR_BAIL(comm_recv(c, d.p, count, COMM_UINT64, peer, NULL));
			OK_OR_BAIL(comm_send(c, s.p, count, COMM_UINT64, peer, NULL));
		}
		snprintf(what, sizeof what, "exchange round %d (%zu uint64)", round, count);
		bad |= buf_check(&d, ref_msg_seed(30, peer, r, round), r, what);
		buf_put(c, &s);
		buf_put(c, &d);
	}
	return th_leave(c, r) | bad;
}

/* --- large messages ------------------------------------------------------------ */

static int rank_large(int r, int n, void *arg)
{
	static const char *const modes[] = { "zero-copy", "staged", "zero-copy send, staged recv",
					     "staged send, zero-copy recv" };
	int peer = 1 - r, bad = 0;
	comm_t *c;

	if (th_join(&c, r, n) < 0)
		return 1;
	for (int m = 0; m < 4; m++) {
		struct buf s, d;
		char what[96];

		if (buf_get(c, &s, (size_t)BIG * 8, m == 0 || m == 2, r) < 0 ||
		    buf_get(c, &d, (size_t)BIG * 8, m == 0 || m == 3, r) < 0)
			return th_bail(c);
		/* one way, blocking */
		ref_fill(s.p, s.len, ref_msg_seed(40 + m, 0, 1, 0));
		if (r == 0) {
			OK_OR_BAIL(comm_send(c, s.p, BIG, COMM_FLOAT64, 1, NULL));
		} else {
			OK_OR_BAIL(comm_recv(c, d.p, BIG, COMM_FLOAT64, 0, NULL));
			snprintf(what, sizeof what, "%d float64 from rank 0, %s", BIG, modes[m]);
			bad |= buf_check(&d, ref_msg_seed(40 + m, 0, 1, 0), r, what);
		}
		/* both ways at once in a group */
		ref_fill(s.p, s.len, ref_msg_seed(50 + m, r, peer, 0));
		memset(d.p, REF_POISON, d.len);
		OK_OR_BAIL(comm_group_start(c));
		OK_OR_BAIL(comm_send(c, s.p, BIG, COMM_FLOAT64, peer, NULL));
		OK_OR_BAIL(comm_recv(c, d.p, BIG, COMM_FLOAT64, peer, NULL));
		OK_OR_BAIL(comm_group_end(c));
		snprintf(what, sizeof what, "%d float64 both ways in a group, %s", BIG, modes[m]);
		bad |= buf_check(&d, ref_msg_seed(50 + m, peer, r, 0), r, what);
		bad |= buf_check(&s, ref_msg_seed(50 + m, r, peer, 0), r, "large send input");
		buf_put(c, &s);
		buf_put(c, &d);
	}
	return th_leave(c, r) | bad;
}

/* --- barrier ------------------------------------------------------------------- */

static void test_barrier(const struct th_daemon *d, int n)
{
	struct th_barrier *st = th_barrier_new();
	char what[96];
	int early;

	REQUIRE(st != NULL, "mmap");
	snprintf(what, sizeof what, "barrier n=%d, %d rounds, ranks arrive 25 ms apart", n,
		 TH_BARRIER_ROUNDS);
	run_job(d, n, th_barrier_rank, st, what);
	early = th_barrier_early(st, n);
	CHECK(early == 0, "barrier n=%d: %d ranks left before the last one entered", n, early);
	printf("%s: barrier n=%d: nobody leaves before the last rank entered\n",
	       early ? "FAIL" : "ok", n);
	th_barrier_free(st);
}

/* --- an op posted while the one before runs on the worker threads --------------- */

/*
 * Every rank posts a large op with a request (it runs on commd's worker
 * threads) and at once a small one behind it: the small one must run when
 * the large one is done. variant 0: all-reduces; 1: sends and recvs (n=2).
 * A short deadline, so that a hang fails in seconds.
 */
static int rank_behind(int r, int n, void *arg)
{
	int variant = *(const int *)arg, peer = 1 - r, bad = 0;
	comm_request_t *req = NULL;
	struct buf s, d, s2, d2;
	comm_t *c;

	setenv("COMM_TIMEOUT", "5000", 1);
	if (th_join(&c, r, n) < 0)
		return 1;
	if (buf_get(c, &s, (size_t)BIG * 4, 1, r) < 0 ||
	    buf_get(c, &d, (size_t)BIG * 4, 1, r) < 0 || buf_get(c, &s2, 7 * 4, 1, r) < 0 ||
	    buf_get(c, &d2, 7 * 4, 1, r) < 0)
		return th_bail(c);
	if (variant == 0) {
		for (size_t i = 0; i < BIG; i++)
			ref_store(COMM_FLOAT32, val(COMM_FLOAT32, 81, r, i), s.p + 4 * i);
		for (size_t i = 0; i < 7; i++)
			ref_store(COMM_FLOAT32, val(COMM_FLOAT32, 82, r, i), s2.p + 4 * i);
		OK_OR_BAIL(comm_allreduce(c, s.p, d.p, BIG, COMM_FLOAT32, COMM_SUM, &req));
		OK_OR_BAIL(comm_allreduce(c, s2.p, d2.p, 7, COMM_FLOAT32, COMM_SUM, NULL));
		OK_OR_BAIL(comm_wait(req, -1));
		for (size_t i = 0; i < BIG && !bad; i++)
			bad = !elem_ok(COMM_FLOAT32, d.p, i, fold(COMM_FLOAT32, COMM_SUM, 81, n, i),
				       r, "large all-reduce");
		for (size_t i = 0; i < 7 && !bad; i++)
			bad = !elem_ok(COMM_FLOAT32, d2.p, i,
				       fold(COMM_FLOAT32, COMM_SUM, 82, n, i), r,
				       "small all-reduce posted behind it");
	} else if (r == 0) {
		ref_fill(s.p, s.len, ref_msg_seed(90, 0, 1, 0));
		ref_fill(s2.p, s2.len, ref_msg_seed(90, 0, 1, 1));
		OK_OR_BAIL(comm_send(c, s.p, BIG, COMM_FLOAT32, peer, &req));
		OK_OR_BAIL(comm_send(c, s2.p, 7, COMM_FLOAT32, peer, NULL));
		OK_OR_BAIL(comm_wait(req, -1));
	} else {
		OK_OR_BAIL(comm_recv(c, d.p, BIG, COMM_FLOAT32, peer, &req));
		OK_OR_BAIL(comm_recv(c, d2.p, 7, COMM_FLOAT32, peer, NULL));
		OK_OR_BAIL(comm_wait(req, -1));
		bad |= buf_check(&d, ref_msg_seed(90, 0, 1, 0), r, "large recv");
		bad |= buf_check(&d2, ref_msg_seed(90, 0, 1, 1), r, "small recv posted behind it");
	}
	buf_put(c, &s);
	buf_put(c, &d);
	buf_put(c, &s2);
	buf_put(c, &d2);
	return th_leave(c, r) | bad;
}

/* --- a group on one side, requests on the other ---------------------------------- */

/* Shared with the ranks: which rank groups, and whether the other has posted. */
struct onesided {
	int grouped;
	int posted;
};

/*
 * Rank 0 sends five messages to rank 1. One side posts its five ops with
 * requests, outside a group; then (so that commd has them queued first) the
 * other side posts its five in one group. The k-th send must pair with the
 * k-th recv, whichever side grouped.
 */
static int rank_one_sided(int r, int n, void *arg)
{
	struct onesided *o = arg;
	comm_request_t *req[NMSG];
	struct buf b[NMSG];
	comm_t *c;
	int bad = 0;

	setenv("COMM_TIMEOUT", "5000", 1);
	if (th_join(&c, r, n) < 0)
		return 1;
	for (int k = 0; k < NMSG; k++) {
		if (buf_get(c, &b[k], (size_t)(1 + 100 * k) * 4, 1, r) < 0)
			return th_bail(c);
		if (r == 0)
			ref_fill(b[k].p, b[k].len, ref_msg_seed(95, 0, 1, k));
	}
	if (r == o->grouped) {
		while (!__atomic_load_n(&o->posted, __ATOMIC_ACQUIRE))
			usleep(1000);
		usleep(100000);
		OK_OR_BAIL(comm_group_start(c));
		for (int k = 0; k < NMSG; k++) {
			if (r == 0)
				OK_OR_BAIL(comm_send(c, b[k].p, 1 + 100 * (size_t)k, COMM_INT32, 1,
						     NULL));
			else
				OK_OR_BAIL(comm_recv(c, b[k].p, 1 + 100 * (size_t)k, COMM_INT32, 0,
						     NULL));
		}
		OK_OR_BAIL(comm_group_end(c));
	} else {
		for (int k = 0; k < NMSG; k++) {
			if (r == 0)
				OK_OR_BAIL(comm_send(c, b[k].p, 1 + 100 * (size_t)k, COMM_INT32, 1,
						     &req[k]));
			else
				OK_OR_BAIL(comm_recv(c, b[k].p, 1 + 100 * (size_t)k, COMM_INT32, 0,
						     &req[k]));
		}
		__atomic_store_n(&o->posted, 1, __ATOMIC_RELEASE);
		for (int k = 0; k < NMSG; k++)
			OK_OR_BAIL(comm_wait(req[k], -1));
	}
	for (int k = 0; k < NMSG; k++) {
		char what[64];

		snprintf(what, sizeof what, "message %d, %s", k,
			 r == o->grouped ? "grouped here" : "grouped on the sender");
		if (r == 1)
			bad |= buf_check(&b[k], ref_msg_seed(95, 0, 1, k), r, what);
		buf_put(c, &b[k]);
	}
	return th_leave(c, r) | bad;
}

/* --- every op interleaved -------------------------------------------------------- */

enum kind { AR, RS, AG, BC, RD, A2A, RING, BARRIER, NKINDS };

struct mop {
	enum kind kind;
	comm_dtype_t dt;
	comm_redop_t op;
	size_t count;
	int root;
	int zc, inplace, async;
	uint64_t seed;
};

static uint64_t rng_next(uint64_t *s)
{
	return *s = ref_mix(*s);
}

/* The next op of the mixed sequence; every rank draws the same. */
static struct mop draw(uint64_t *s, int n, int it)
{
	struct mop m;
	uint64_t big = rng_next(s) % 50;

	m.kind = (enum kind)(rng_next(s) % NKINDS);
	m.dt = ref_dtypes[rng_next(s) % REF_NDTYPES];
	m.op = (comm_redop_t)(rng_next(s) % 5);
	m.count = big == 0 ? 0 : big == 1 ? 20000 + rng_next(s) % 50000 : rng_next(s) % 3000;
	m.root = (int)(rng_next(s) % (uint64_t)n);
	m.zc = (int)(rng_next(s) % 3 != 0);
	m.inplace = (int)(rng_next(s) % 4 == 0);
	m.async = (int)(rng_next(s) % 3 == 0);
	m.seed = ref_mix(0x5eed0000ull + (uint64_t)it);
	return m;
}

static const char *kind_name(enum kind k)
{
	static const char *const names[] = { "allreduce", "reduce-scatter", "all-gather",
					     "broadcast", "reduce",         "all-to-all",
					     "ring",      "barrier" };

	return names[k];
}

/* What element j of rank r's output must be. */
static uint64_t mop_expect(const struct mop *m, int r, int n, size_t j)
{
	size_t cnt = m->count;

	switch (m->kind) {
	case AR:
	case RD:
		return fold(m->dt, m->op, m->seed, n, j);
	case RS:
		return fold(m->dt, m->op, m->seed, n, (size_t)r * cnt + j);
	case AG:
		return val(m->dt, m->seed, (int)(j / cnt), j % cnt);
	case BC:
		return val(m->dt, m->seed, m->root, j);
	case A2A:
		return val(m->dt, m->seed, (int)(j / cnt), (size_t)r * cnt + j % cnt);
	default: /* ring: rank r-1's input */
		return val(m->dt, m->seed, (r + n - 1) % n, j);
	}
}

static comm_result_t mop_post(comm_t *c, const struct mop *m, int r, int n, void *send,
			      void *recv, comm_request_t **req, comm_request_t **req2)
{
	comm_result_t rc, rc2;

	switch (m->kind) {
	case AR:
		return comm_allreduce(c, send, recv, m->count, m->dt, m->op, req);
	case RS:
		return comm_reduce_scatter(c, send, recv, m->count, m->dt, m->op, req);
	case AG:
		return comm_allgather(c, send, recv, m->count, m->dt, req);
	case BC:
		return comm_broadcast(c, send, recv, m->count, m->dt, m->root, req);
	case RD:
		return comm_reduce(c, send, recv, m->count, m->dt, m->op, m->root, req);
	case A2A:
		return comm_alltoall(c, send, recv, m->count, m->dt, req);
	case BARRIER:
		return comm_barrier(c, req);
	default:
		comm_group_start(c);
		rc = comm_send(c, send, m->count, m->dt, (r + 1) % n, req);
		rc2 = comm_recv(c, recv, m->count, m->dt, (r + n - 1) % n, req2);
		if (rc == COMM_OK)
			rc = rc2;
		rc2 = comm_group_end(c);
		return rc != COMM_OK ? rc : rc2;
	}
}

/* One op of the mixed sequence in flight: its buffers and requests. */
struct mrun {
	struct mop m;
	int it, r, n;
	int inplace, root_only_out;
	size_t es, sn, rn;
	struct buf s, d;
	char *send, *recv;
	comm_request_t *req, *req2;
	char what[160];
};

static void mop_free(comm_t *c, struct mrun *x)
{
	buf_put(c, &x->s);
	buf_put(c, &x->d);
}

/* Allocate, fill and post x's op (blocking unless it has requests); -1 on failure. */
static int mop_start(comm_t *c, struct mrun *x, const struct mop *m, int r, int n, int it)
{
	size_t all = (size_t)n * m->count, block;
	comm_result_t rc;

	memset(x, 0, sizeof *x);
	x->m = *m;
	x->it = it;
	x->r = r;
	x->n = n;
	x->es = comm_dtype_size(m->dt);
	x->inplace = m->inplace && m->kind != RING && m->kind != BARRIER;
	x->root_only_out = m->kind == RD && r != m->root;
	snprintf(x->what, sizeof x->what, "mixed op %d: %s %s %s count %zu root %d%s%s%s", it,
		 kind_name(m->kind), ref_dtype_name(m->dt), ref_op_name(m->op), m->count, m->root,
		 m->zc ? " zero-copy" : " staged", x->inplace ? " in-place" : "",
		 m->async ? " with a request" : "");
	x->sn = m->kind == RS || m->kind == A2A ? all : m->count;
	x->rn = m->kind == AG || m->kind == A2A ? all : m->count;
	block = m->count * x->es;
	if (m->kind == BARRIER)
		x->sn = x->rn = 0;
	if (buf_get(c, &x->s, (x->inplace && x->rn > x->sn ? x->rn : x->sn) * x->es, m->zc, r) <
		    0 ||
	    (!x->inplace && buf_get(c, &x->d, x->rn * x->es, m->zc, r) < 0)) {
		mop_free(c, x);
		return -1;
	}
	x->send = x->s.p;
	x->recv = x->inplace ? x->s.p : x->d.p;
	if (x->inplace && m->kind == RS)
		x->recv = x->s.p + (size_t)r * block;
	if (x->inplace && m->kind == AG)
		x->send = x->s.p + (size_t)r * block;
	if (m->kind != BC || r == m->root)
		for (size_t i = 0; i < x->sn; i++)
			ref_store(m->dt, val(m->dt, m->seed, r, i), x->send + i * x->es);
	if (m->kind == BC && r != m->root && !x->inplace) {
		buf_put(c, &x->s);
		x->send = NULL;
	}
	if (x->root_only_out && !x->inplace && r % 2) {
		buf_put(c, &x->d);
		x->recv = NULL;
	}
	rc = mop_post(c, m, r, n, x->send, x->recv, m->async ? &x->req : NULL,
		      m->async && m->kind == RING ? &x->req2 : NULL);
	if (!th_want_rc(c, r, x->what, rc, COMM_OK)) {
		mop_free(c, x);
		return -1;
	}
	return 0;
}

/* Wait for x and check it: 0 right, 1 wrong values, -1 the op failed. */
static int mop_finish(comm_t *c, struct mrun *x)
{
	const struct mop *m = &x->m;
	comm_result_t rc = COMM_OK;
	int r = x->r, bad = 0;

	if (x->req)
		rc = comm_wait(x->req, -1);
	if (rc == COMM_OK && x->req2)
		rc = comm_wait(x->req2, -1);
	if (!th_want_rc(c, r, x->what, rc, COMM_OK)) {
		mop_free(c, x);
		return -1;
	}
	for (size_t j = 0; !x->root_only_out && m->kind != BARRIER && j < x->rn; j++) {
		if (!elem_ok(m->dt, x->recv, j, mop_expect(m, r, x->n, j), r, x->what)) {
			bad = 1;
			break;
		}
	}
	/* inputs out of place (and a non-root's reduce input) stay as they were */
	for (size_t i = 0; x->send && (m->kind != BC || r == m->root) &&
			   (!x->inplace || x->root_only_out) && i < x->sn;
	     i++) {
		if (!elem_ok(m->dt, x->send, i, val(m->dt, m->seed, r, i), r, x->what)) {
			fprintf(stderr, "rank %d: %s: (the input was changed)\n", r, x->what);
			bad = 1;
			break;
		}
	}
	if (x->root_only_out && x->recv && x->recv != x->send &&
	    !ref_all_bytes(x->recv, x->rn * x->es, REF_POISON)) {
		fprintf(stderr, "rank %d: %s: the non-root recvbuf was written\n", r, x->what);
		bad = 1;
	}
	if ((x->s.p && !ref_guard_ok(x->s.p + x->s.len)) ||
	    (x->d.p && !ref_guard_ok(x->d.p + x->d.len))) {
		fprintf(stderr, "rank %d: %s: written past the end of a buffer\n", r, x->what);
		bad = 1;
	}
	mop_free(c, x);
	return bad;
}

#define MIXED_ITERS 1000
#define MIXED_WINDOW 4   /* ops with requests left in flight while later ones run */

static int rank_mixed(int r, int n, void *arg)
{
	struct mrun fly[MIXED_WINDOW];
	uint64_t s = 20240601; /* the same on every rank */
	int head = 0, nfly = 0, bad = 0;
	comm_t *c;

	setenv("COMM_TIMEOUT", "15000", 1); /* every op here is small: fail fast on a hang */
	if (th_join(&c, r, n) < 0)
		return 1;
	for (int it = 0; it < MIXED_ITERS + MIXED_WINDOW && !bad; it++) {
		struct mrun now, *x;
		struct mop m;
		int rc;

		/* the oldest op in flight, when the window is full or at the end */
		if (nfly == MIXED_WINDOW || (it >= MIXED_ITERS && nfly > 0)) {
			rc = mop_finish(c, &fly[head]);
			head = (head + 1) % MIXED_WINDOW;
			nfly--;
			if (rc < 0)
				return th_bail(c);
			bad |= rc;
		}
		if (it >= MIXED_ITERS)
			continue;
		m = draw(&s, n, it);
		x = m.async ? &fly[(head + nfly) % MIXED_WINDOW] : &now;
		if (mop_start(c, x, &m, r, n, it) < 0)
			return th_bail(c);
		if (m.async) {
			nfly++;
			continue;
		}
		rc = mop_finish(c, x);
		if (rc < 0)
			return th_bail(c);
		bad |= rc;
	}
	return th_leave(c, r) | bad;
}

/* --- many outstanding requests ------------------------------------------------ */

struct oreq {
	comm_request_t *req;
	struct buf s, d;
	comm_dtype_t dt;
	comm_redop_t op;
	size_t count;
	uint64_t seed;
};

static int out_post(comm_t *c, struct oreq *o, int k, int phase, int r)
{
	size_t es;

	o->dt = ref_dtypes[(k + phase) % REF_NDTYPES];
	o->op = (comm_redop_t)((k / REF_NDTYPES + phase) % 5);
	o->count = 1 + (size_t)(k * 37 + phase * 11) % 500;
	o->seed = ref_mix(0x07 + (uint64_t)phase * 1000 + (uint64_t)k);
	es = comm_dtype_size(o->dt);
	/* phase 1: every other request staged */
	if (buf_get(c, &o->s, o->count * es, phase != 1 || k % 2, r) < 0 ||
	    buf_get(c, &o->d, o->count * es, phase != 1 || k % 2, r) < 0)
		return -1;
	for (size_t i = 0; i < o->count; i++)
		ref_store(o->dt, val(o->dt, o->seed, r, i), o->s.p + i * es);
	return comm_allreduce(c, o->s.p, o->d.p, o->count, o->dt, o->op, &o->req) == COMM_OK ? 0
											      : -1;
}

static int out_check(comm_t *c, struct oreq *o, int k, int r, int n)
{
	char what[64];
	int bad = 0;

	snprintf(what, sizeof what, "outstanding all-reduce %d", k);
	for (size_t j = 0; j < o->count && !bad; j++)
		bad = !elem_ok(o->dt, o->d.p, j, fold(o->dt, o->op, o->seed, n, j), r, what);
	if (!ref_guard_ok(o->d.p + o->d.len)) {
		fprintf(stderr, "rank %d: %s: written past the end\n", r, what);
		bad = 1;
	}
	buf_put(c, &o->s);
	buf_put(c, &o->d);
	return bad;
}

/* comm_test on requests 0..k-1, each must be finished (and OK): 0 when so. */
static int all_done_before(struct oreq *o, int from, int to, int r, const char *after)
{
	int bad = 0;

	for (int k = from; k < to; k++) {
		comm_result_t rc;
		int done = 0;

		if (!o[k].req)
			continue;
		rc = comm_test(o[k].req, &done);
		if (rc != COMM_OK || !done) {
			fprintf(stderr,
				"rank %d: request %d after %s: comm_test says %s, done %d; "
				"expected COMM_OK, done 1\n",
				r, k, after, comm_result_name(rc), done);
			bad = 1;
		}
		if (done)
			o[k].req = NULL;
	}
	return bad;
}

/*
 * NOUT all-reduces posted with requests, then: phase 0 waits them in order;
 * phase 1 (half staged) waits the last one first, then every earlier one
 * must test done; phase 2 waits the middle one, tests the ones before it,
 * polls the last with comm_test, then tests the rest.
 */
static int rank_outstanding(int r, int n, void *arg)
{
	struct oreq *o = calloc(NOUT, sizeof *o);
	comm_t *c;
	int bad = 0;

	if (!o || th_join(&c, r, n) < 0)
		return 1;
	for (int phase = 0; phase < 3; phase++) {
		for (int k = 0; k < NOUT; k++) {
			if (out_post(c, &o[k], k, phase, r) < 0) {
				fprintf(stderr, "rank %d: phase %d: posting request %d: %s\n", r,
					phase, k, comm_last_error(c));
				return th_bail(c);
			}
		}
		if (phase == 0) {
			for (int k = 0; k < NOUT; k++) {
				OK_OR_BAIL(comm_wait(o[k].req, -1));
				o[k].req = NULL;
			}
		} else if (phase == 1) {
			OK_OR_BAIL(comm_wait(o[NOUT - 1].req, -1));
			o[NOUT - 1].req = NULL;
			bad |= all_done_before(o, 0, NOUT - 1, r, "waiting the last one");
		} else {
			int done = 0;

			OK_OR_BAIL(comm_wait(o[NOUT / 2].req, -1));
			o[NOUT / 2].req = NULL;
			bad |= all_done_before(o, 0, NOUT / 2, r, "waiting the middle one");
			while (!done) {
				OK_OR_BAIL(comm_test(o[NOUT - 1].req, &done));
				if (!done)
					usleep(100);
			}
			o[NOUT - 1].req = NULL;
			bad |= all_done_before(o, NOUT / 2 + 1, NOUT - 1, r,
					       "comm_test said the last one is done");
		}
		for (int k = 0; k < NOUT; k++) {
			if (o[k].req) /* not finished when tested: reported above */
				OK_OR_BAIL(comm_wait(o[k].req, -1));
			bad |= out_check(c, &o[k], k, r, n);
		}
	}
	free(o);
	return th_leave(c, r) | bad;
}

/* --- bad arguments ------------------------------------------------------------- */

#define WANT_INVALID(call)                                                     \
	do {                                                                   \
		comm_result_t rc_ = (call);                                    \
		bad |= !th_want_rc(c, r, #call, rc_, COMM_ERR_INVALID_ARG);       \
		if (rc_ == COMM_ERR_INVALID_ARG && !*comm_last_error(c)) {     \
			fprintf(stderr, "rank %d: %s: comm_last_error is empty\n", \
				r, #call);                                     \
			bad = 1;                                               \
		}                                                              \
	} while (0)

#define THEN_ALLREDUCE(after)                                                  \
	do {                                                                   \
		int ar_ = check_allreduce(c, r, n, (uint64_t)__LINE__, after); \
		if (ar_ < 0)                                                   \
			return th_bail(c);                                        \
		bad |= ar_;                                                    \
	} while (0)

static int rank_invalid(int r, int n, void *arg)
{
	comm_request_t *req = NULL;
	char *s, *d;
	comm_t *c;
	int bad = 0;

	if (th_join(&c, r, n) < 0)
		return 1;
	s = comm_mem_alloc(c, 4096);
	d = comm_mem_alloc(c, 4096);
	if (!s || !d)
		return th_bail(c);
	memset(s, 0, 4096);
	/* the same bad root on every rank: every rank is told */
	WANT_INVALID(comm_broadcast(c, s, d, 4, COMM_INT32, n, NULL));
	THEN_ALLREDUCE("broadcast root n");
	WANT_INVALID(comm_broadcast(c, s, d, 4, COMM_INT32, -1, NULL));
	THEN_ALLREDUCE("broadcast root -1");
	WANT_INVALID(comm_reduce(c, s, d, 4, COMM_FLOAT32, COMM_SUM, n, NULL));
	THEN_ALLREDUCE("reduce root n");
	WANT_INVALID(comm_reduce(c, s, d, 4, COMM_FLOAT32, COMM_MAX, -7, NULL));
	THEN_ALLREDUCE("reduce root -7");
	/* with a request: refused at once, or by comm_wait */
	{
		comm_result_t rc = comm_reduce(c, s, d, 4, COMM_INT64, COMM_SUM, n + 3, &req);

		if (rc == COMM_OK)
			rc = comm_wait(req, -1);
		else if (req)
			fprintf(stderr, "rank %d: refused reduce left *req set\n", r);
		bad |= !th_want_rc(c, r, "reduce root n+3 with a request", rc,
				COMM_ERR_INVALID_ARG);
	}
	THEN_ALLREDUCE("reduce root n+3 with a request");
	/* peers out of range, on each rank alone */
	WANT_INVALID(comm_send(c, s, 4, COMM_INT32, n, NULL));
	WANT_INVALID(comm_send(c, s, 4, COMM_INT32, -1, NULL));
	WANT_INVALID(comm_recv(c, d, 4, COMM_INT32, n + 5, NULL));
	WANT_INVALID(comm_recv(c, d, 4, COMM_INT32, -2, NULL));
	THEN_ALLREDUCE("send/recv to peers out of range");
	/* itself outside a group: refused at once, not a wait for itself */
	WANT_INVALID(comm_send(c, s, 4, COMM_INT32, r, NULL));
	WANT_INVALID(comm_recv(c, d, 4, COMM_INT32, r, &req));
	bad |= !strstr(comm_last_error(c), "is this rank");
	THEN_ALLREDUCE("send/recv with itself outside a group");
	/* in a group: refused when posted, or by comm_group_end, which waits for it */
	{
		comm_result_t rc, rc2;

		OK_OR_BAIL(comm_group_start(c));
		rc = comm_send(c, s, 4, COMM_INT32, n, NULL);
		rc2 = comm_group_end(c);
		if (rc != COMM_ERR_INVALID_ARG)
			bad |= !th_want_rc(c, r, "a send to peer n in a group, then group end",
					rc == COMM_OK ? rc2 : rc, COMM_ERR_INVALID_ARG);
	}
	THEN_ALLREDUCE("a bad peer in a group");
	/* counts that overflow: refused locally, a different number on each rank */
	for (int rep = 0; rep <= r; rep++) {
		WANT_INVALID(comm_allreduce(c, s, d, SIZE_MAX / 2, COMM_INT64, COMM_SUM, NULL));
		WANT_INVALID(comm_reduce_scatter(c, s, d, SIZE_MAX / 2, COMM_INT64, COMM_SUM,
						 NULL));
		WANT_INVALID(comm_allgather(c, s, d, SIZE_MAX / 2, COMM_INT64, NULL));
		WANT_INVALID(comm_broadcast(c, s, d, SIZE_MAX / 2, COMM_INT64, 0, NULL));
		WANT_INVALID(comm_reduce(c, s, d, SIZE_MAX / 2, COMM_INT64, COMM_SUM, 0, NULL));
		WANT_INVALID(comm_alltoall(c, s, d, SIZE_MAX / 2, COMM_INT64, NULL));
		WANT_INVALID(comm_alltoall(c, s, d, SIZE_MAX / 8 / 2, COMM_INT64, NULL));
		WANT_INVALID(comm_send(c, s, SIZE_MAX / 2, COMM_INT64, (r + 1) % n, NULL));
		WANT_INVALID(comm_recv(c, d, SIZE_MAX / 2, COMM_INT64, (r + 1) % n, &req));
	}
	THEN_ALLREDUCE("counts that overflow");
	comm_mem_free(c, s);
	comm_mem_free(c, d);
	return th_leave(c, r) | bad;
}

/* --- a rank that leaves early ---------------------------------------------------- */

/* Shared with the ranks: pending 1 makes ranks 1 and 2 post an all-reduce first. */
struct early {
	int pending;
	int posted;     /* ranks that posted it */
	int left;       /* rank 0 has finalized */
};

static int rank_early_leave(int r, int n, void *arg)
{
	struct early *e = arg;
	comm_request_t *req = NULL;
	struct buf s, d;
	comm_result_t rc;
	comm_t *c;
	int bad = 0, peer = 3 - r;

	if (th_join(&c, r, n) < 0)
		return 1;
	if (r == 0) {
		while (e->pending && __atomic_load_n(&e->posted, __ATOMIC_ACQUIRE) < 2)
			usleep(1000);
		if (e->pending)
			usleep(50000); /* let commd queue them */
		rc = comm_finalize(c);
		__atomic_store_n(&e->left, 1, __ATOMIC_RELEASE);
		return !th_want_rc(NULL, r, "comm_finalize", rc, COMM_OK);
	}
	if (buf_get(c, &s, 64, 1, r) < 0 || buf_get(c, &d, 64, 1, r) < 0)
		return th_bail(c);
	if (e->pending) {
		OK_OR_BAIL(comm_allreduce(c, s.p, d.p, 4, COMM_FLOAT32, COMM_SUM, &req));
		__atomic_fetch_add(&e->posted, 1, __ATOMIC_RELEASE);
	}
	while (!__atomic_load_n(&e->left, __ATOMIC_ACQUIRE))
		usleep(1000);
	if (req) {
		rc = comm_wait(req, -1);
		bad |= !th_want_rc(c, r, "all-reduce pending when rank 0 left", rc,
				COMM_ERR_PEER_LOST);
	}
	buf_put(c, &s);
	buf_put(c, &d);
	/* ranks 1 and 2 go on between themselves */
	for (int k = 0; k < 50; k++) {
		size_t count = 1 + (size_t)k * 211 % 5000;
		char what[64];

		if (buf_get(c, &s, count * 4, k % 2, r) < 0 || buf_get(c, &d, count * 4, 1, r) < 0)
			return th_bail(c);
		ref_fill(s.p, s.len, ref_msg_seed(60, r, peer, k));
		if ((r == 1) == (k % 2 == 0)) {
			OK_OR_BAIL(comm_send(c, s.p, count, COMM_UINT32, peer, NULL));
			OK_OR_BAIL(comm_recv(c, d.p, count, COMM_UINT32, peer, NULL));
		} else {
			OK_OR_BAIL(comm_recv(c, d.p, count, COMM_UINT32, peer, NULL));
			OK_OR_BAIL(comm_send(c, s.p, count, COMM_UINT32, peer, NULL));
		}
		snprintf(what, sizeof what, "message %d after rank 0 left", k);
		bad |= buf_check(&d, ref_msg_seed(60, peer, r, k), r, what);
		buf_put(c, &s);
		buf_put(c, &d);
	}
	if (buf_get(c, &s, 64, 1, r) < 0 || buf_get(c, &d, 64, 1, r) < 0)
		return th_bail(c);
	/* anything that needs rank 0 fails, and does not hang */
	rc = comm_allreduce(c, s.p, d.p, 4, COMM_FLOAT32, COMM_SUM, NULL);
	bad |= !th_want_rc(c, r, "all-reduce after rank 0 left", rc, COMM_ERR_PEER_LOST);
	rc = comm_barrier(c, NULL);
	bad |= !th_want_rc(c, r, "barrier after rank 0 left", rc, COMM_ERR_PEER_LOST);
	rc = comm_send(c, s.p, 4, COMM_FLOAT32, 0, NULL);
	bad |= !th_want_rc(c, r, "send to rank 0 after it left", rc, COMM_ERR_PEER_LOST);
	/* and the two of them still can talk */
	ref_fill(s.p, 64, ref_msg_seed(61, r, peer, 0));
	OK_OR_BAIL(comm_group_start(c));
	OK_OR_BAIL(comm_send(c, s.p, 16, COMM_FLOAT32, peer, NULL));
	OK_OR_BAIL(comm_recv(c, d.p, 16, COMM_FLOAT32, peer, NULL));
	OK_OR_BAIL(comm_group_end(c));
	bad |= buf_check(&d, ref_msg_seed(61, peer, r, 0), r, "a group exchange after the failures");
	buf_put(c, &s);
	buf_put(c, &d);
	return th_leave(c, r) | bad;
}

/* --- comm_wait inside a group ---------------------------------------------------- */

static int rank_group_wait(int r, int n, void *arg)
{
	comm_request_t *req = NULL, *areq = NULL;
	struct buf b, s, d;
	comm_result_t rc;
	comm_t *c;
	int bad = 0, done = -1;

	if (th_join(&c, r, n) < 0)
		return 1;
	if (buf_get(c, &b, 400, r, r) < 0 || buf_get(c, &s, 28, 1, r) < 0 ||
	    buf_get(c, &d, 28, 1, r) < 0)
		return th_bail(c);
	if (r == 0)
		ref_fill(b.p, b.len, ref_msg_seed(70, 0, 1, 0));
	for (size_t i = 0; i < 7; i++)
		ref_store(COMM_INT32, val(COMM_INT32, 77, r, i), s.p + 4 * i);
	OK_OR_BAIL(comm_group_start(c));
	if (r == 0)
		OK_OR_BAIL(comm_send(c, b.p, 100, COMM_INT32, 1, &req));
	else
		OK_OR_BAIL(comm_recv(c, b.p, 100, COMM_INT32, 0, &req));
	OK_OR_BAIL(comm_allreduce(c, s.p, d.p, 7, COMM_INT32, COMM_SUM, &areq));
	rc = comm_wait(req, -1);
	bad |= !th_want_rc(c, r, "comm_wait(req, -1) before comm_group_end", rc,
			COMM_ERR_INVALID_ARG);
	rc = comm_wait(req, 0);
	bad |= !th_want_rc(c, r, "comm_wait(req, 0) before comm_group_end", rc,
			COMM_ERR_INVALID_ARG);
	rc = comm_test(req, &done);
	bad |= !th_want_rc(c, r, "comm_test before comm_group_end", rc, COMM_ERR_INVALID_ARG);
	rc = comm_wait(areq, -1);
	bad |= !th_want_rc(c, r, "comm_wait(all-reduce) before comm_group_end", rc,
			COMM_ERR_INVALID_ARG);
	OK_OR_BAIL(comm_group_end(c));
	/* the requests are still valid and complete now */
	OK_OR_BAIL(comm_wait(req, -1));
	OK_OR_BAIL(comm_wait(areq, -1));
	if (r == 1)
		bad |= buf_check(&b, ref_msg_seed(70, 0, 1, 0), r, "recv waited after the group");
	for (size_t i = 0; i < 7; i++)
		if (!elem_ok(COMM_INT32, d.p, i, fold(COMM_INT32, COMM_SUM, 77, n, i), r,
			     "all-reduce waited after the group"))
			bad = 1;
	buf_put(c, &b);
	buf_put(c, &s);
	buf_put(c, &d);
	return th_leave(c, r) | bad;
}

/*
 * One group of BIG_GROUP sends and as many recvs between two ranks; it
 * must be matched in about linear time, not rescanned per op.
 */
#define BIG_GROUP 4000

static int rank_big_group(int r, int n, void *arg)
{
	int32_t *out = malloc(BIG_GROUP * sizeof *out), *in = malloc(BIG_GROUP * sizeof *in);
	comm_t *c;
	int bad = 0;

	if (!out || !in || th_join(&c, r, n) < 0)
		return 1;
	for (int i = 0; i < BIG_GROUP; i++) {
		out[i] = r * 100000 + i;
		in[i] = -1;
	}
	OK_OR_BAIL(comm_group_start(c));
	for (int i = 0; i < BIG_GROUP; i++) {
		OK_OR_BAIL(comm_send(c, &out[i], 1, COMM_INT32, 1 - r, NULL));
		OK_OR_BAIL(comm_recv(c, &in[i], 1, COMM_INT32, 1 - r, NULL));
	}
	OK_OR_BAIL(comm_group_end(c));
	for (int i = 0; i < BIG_GROUP && !bad; i++) {
		if (in[i] != (1 - r) * 100000 + i) {
			fprintf(stderr, "rank %d: message %d is %d\n", r, i, in[i]);
			bad = 1;
		}
	}
	free(out);
	free(in);
	return th_leave(c, r) | bad;
}

/* comm_wait(req, 0) polled in a loop completes: it reads before it gives up. */
static int rank_wait_zero(int r, int n, void *arg)
{
	comm_request_t *req;
	comm_result_t rc;
	comm_t *c;
	int v = r + 1, polls = 0;

	if (th_join(&c, r, n) < 0)
		return 1;
	OK_OR_BAIL(comm_allreduce(c, &v, &v, 1, COMM_INT32, COMM_SUM, &req));
	while ((rc = comm_wait(req, 0)) == COMM_INPROGRESS && polls < 10000000)
		polls++;
	if (rc != COMM_OK || v != n * (n + 1) / 2) {
		fprintf(stderr, "rank %d: comm_wait(req, 0) polled %d times: %s, v = %d\n", r, polls,
			comm_result_name(rc), v);
		return th_bail(c);
	}
	return th_leave(c, r);
}

int main(void)
{
	static const int ring_sizes[] = { 2, 3, 4, 8 };
	struct th_daemon d;
	struct timespec t0;
	char what[128];
	struct onesided *one;
	struct early *early;
	int rc, variant;

	/* an op that cannot complete fails after a minute instead of ten */
	setenv("COMM_TIMEOUT", "60000", 1);
	clock_gettime(CLOCK_MONOTONIC, &t0);
	rc = th_daemon_start(&d, "--threads", "3", NULL);
	REQUIRE(rc == 0, "commd did not start");
	run_job(&d, 2, rank_order, NULL,
		"5 sends of different sizes and dtypes with requests, received in order; "
		"then 5 recvs with requests");
	run_job(&d, 3, rank_mismatch, NULL,
		"send/recv of different byte sizes: COMM_ERR_MISMATCH on both sides; equal "
		"bytes in other dtypes match; the job goes on");
	run_job(&d, 3, rank_self, NULL, "send to self in a group, 1000 and 1000003 floats, n=3");
	for (size_t i = 0; i < sizeof ring_sizes / sizeof ring_sizes[0]; i++) {
		snprintf(what, sizeof what, "ring in groups n=%d: %d rounds, then %d with requests",
			 ring_sizes[i], RING_ROUNDS, RING_ASYNC_ROUNDS);
		run_job(&d, ring_sizes[i], rank_ring, NULL, what);
	}
	run_job(&d, 2, rank_isend_irecv, NULL,
		"isend to and irecv from both neighbours, requests and no group, 20 rounds, n=2");
	run_job(&d, 4, rank_isend_irecv, NULL,
		"isend to and irecv from both neighbours, requests and no group, 20 rounds, n=4");
	{
		static const int alternate[4] = { 0, 1, 0, 1 }, gone[3] = { 0, 1, 0 };

		run_two_daemons(alternate, 4, rank_isend_irecv, "p2p-nodes",
				"isend to and irecv from both neighbours, requests and no group, "
				"n=4 over two daemons (A: 0 2, B: 1 3)");
		run_two_daemons(gone, 3, rank_left_remote, "p2p-left",
				"a group of a send to rank 1, gone from B, and a recv on A: "
				"PEER_LOST and the value");
	}
	variant = 0;
	run_job(&d, 3, rank_many, &variant,
		"6000 sends of rank 0 with requests, no group, before ranks 1 and 2 post their "
		"recvs, n=3");
	variant = 1;
	run_job(&d, 3, rank_many, &variant,
		"the same in one group with an all-reduce in its middle, n=3");
	run_job(&d, 4, rank_exchange, NULL,
		"blocking exchange without groups n=4: even ranks send first, odd ranks recv "
		"first, 50 rounds");
	run_job(&d, 2, rank_large, NULL,
		"1000003 float64 send/recv and a group exchange: zero-copy, staged, mixed");
	test_barrier(&d, 4);
	test_barrier(&d, 8);
	variant = 0;
	run_job(&d, 4, rank_behind, &variant,
		"an all-reduce posted by every rank while a 1000003-float one runs on the "
		"worker threads, n=4");
	variant = 1;
	run_job(&d, 2, rank_behind, &variant,
		"a send/recv posted while a 1000003-float one runs on the worker threads, n=2");
	one = mmap(NULL, sizeof *one, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	REQUIRE(one != MAP_FAILED, "mmap");
	for (int g = 0; g < 2; g++) {
		one->grouped = g;
		one->posted = 0;
		snprintf(what, sizeof what,
			 "5 messages grouped on rank %d, posted with requests on rank %d first", g,
			 1 - g);
		run_job(&d, 2, rank_one_sided, one, what);
	}
	munmap(one, sizeof *one);
	run_job(&d, 4, rank_mixed, NULL,
		"1000 ops of every kind interleaved, random sizes, dtypes, roots, n=4");
	snprintf(what, sizeof what,
		 "%d outstanding all-reduces per rank: waited in order, last first, polled", NOUT);
	run_job(&d, 4, rank_outstanding, NULL, what);
	run_job(&d, 3, rank_invalid, NULL,
		"root or peer out of range: COMM_ERR_INVALID_ARG; count overflow refused locally; "
		"the job goes on");
	early = mmap(NULL, sizeof *early, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1,
		     0);
	REQUIRE(early != MAP_FAILED, "mmap");
	memset(early, 0, sizeof *early);
	run_job(&d, 3, rank_early_leave, early,
		"rank 0 finalizes at once: ranks 1 and 2 exchange 50 messages, then their "
		"all-reduce fails with COMM_ERR_PEER_LOST");
	memset(early, 0, sizeof *early);
	early->pending = 1;
	run_job(&d, 3, rank_early_leave, early,
		"rank 0 finalizes while ranks 1 and 2 wait in an all-reduce: COMM_ERR_PEER_LOST; "
		"they go on with send/recv");
	munmap(early, sizeof *early);
	run_job(&d, 2, rank_group_wait, NULL,
		"comm_wait/comm_test inside a group: COMM_ERR_INVALID_ARG; complete after "
		"comm_group_end");
	snprintf(what, sizeof what, "one group of %d sends and %d recvs per rank, n=2", BIG_GROUP,
		 BIG_GROUP);
	run_job(&d, 2, rank_big_group, NULL, what);
	run_job(&d, 3, rank_wait_zero, NULL, "comm_wait(req, 0) polled until the op is done");
	CHECK(th_daemon_alive(&d), "commd died during the tests");
	CHECK(th_daemon_stop(&d) == 0, "commd did not stop cleanly");
	printf("%s: %.1f s in all\n", check_failures ? "FAIL" : "ok", th_secs_since(&t0));
	return CHECK_EXIT();
}
