/*
 * test-nodes-stale.c: messages of a job incarnation that is gone (reliability
 * row H4), at two real member daemons A and B: a failed job's messages
 * arriving while a new incarnation of it runs, the same on a daemon without
 * a data plane, and a member's late key-0 fail at a real root; and a peer
 * that speaks an older peer protocol, refused.
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "check.h"
#include "comm.h"
#include "commd.pb-c.h"
#include "harness.h"
#include "peerraw.h"

#include "nodes-seen.h"

static struct th_daemon da, db; /* two member daemons; A is the root in the last row */

/* --- H4: a failed incarnation's messages while the next one runs ------------------ */

/*
 * The test plays the root daemon of job "h4" (commd A and B are its
 * members): it forms incarnation 1 and fails it, forms incarnation 2 of the
 * same name and ranks, and sends both daemons incarnation 1's messages
 * before and while incarnation 2 runs. They must be dropped, logged as stale.
 */

#define H4_OPS 6                 /* all-reduces before the stale messages, and after */
#define H4_COUNT (1u << 16)      /* int32 elements */
#define H4_KEY1 0x4841000000000001ull
#define H4_KEY2 0x4841000000000002ull
#define H4_STALE 8               /* stale messages sent to each daemon */

/* What each member daemon told the test root. */
struct h4_member {
	int fd;
	uint8_t ucx[1024];
	size_t ucx_len;
	char node[128];
	uint32_t slot;           /* from its join with both of its ranks */
	int ranks[2];
	int hello, joined;       /* its hello came; that join came */
};

/* Note what member i said: its hello, its join with both of its ranks. */
static void h4_take(struct h4_member *m, int i, const Commpb__PeerMsg *in)
{
	if (in->body_case == COMMPB__PEER_MSG__BODY_HELLO) {
		REQUIRE(in->hello->ucx_address.len <= sizeof m[i].ucx, "ucx address");
		if (in->hello->ucx_address.len) /* none from a daemon without a data plane */
			memcpy(m[i].ucx, in->hello->ucx_address.data, in->hello->ucx_address.len);
		m[i].ucx_len = in->hello->ucx_address.len;
		snprintf(m[i].node, sizeof m[i].node, "%s", in->hello->node);
		m[i].hello = 1;
	} else if (in->body_case == COMMPB__PEER_MSG__BODY_JOIN && in->join->n_ranks == 2 &&
		   !strcmp(in->join->job, "h4")) {
		int a = in->join->ranks[0], b = in->join->ranks[1];

		m[i].slot = in->join->slot;
		m[i].ranks[0] = a < b ? a : b;
		m[i].ranks[1] = a < b ? b : a;
		m[i].joined = 1;
	}
}

/* Accept the nm members (1 or 2) and trade hellos; 0 or -1. */
static int h4_accept(int lfd, struct h4_member *m, int nm)
{
	int fds[2];

	for (int i = 0; i < nm; i++) {
		struct pollfd pf = { .fd = lfd, .events = POLLIN };

		if (poll(&pf, 1, 10000) <= 0 || (m[i].fd = accept(lfd, NULL, NULL)) < 0)
			return -1;
		fds[i] = m[i].fd;
		pr_hello(m[i].fd, PEER_VERSION, "h4-test-root", NULL, 0);
	}
	while (!m[0].hello || !m[nm - 1].hello) {
		int i;
		Commpb__PeerMsg *in = pr_next(fds, nm, &i, 10000);

		if (!in)
			return -1;
		h4_take(m, i, in);
		commpb__peer_msg__free_unpacked(in, NULL);
	}
	return 0;
}

/* Wait for each member's join with both of its ranks (from m->joined 0); 0 or -1. */
static int h4_joins(struct h4_member *m, int nm)
{
	int fds[2] = { m[0].fd, m[nm - 1].fd };

	while (!m[0].joined || !m[nm - 1].joined) {
		int i;
		Commpb__PeerMsg *in = pr_next(fds, nm, &i, 20000);

		if (!in)
			return -1;
		h4_take(m, i, in);
		commpb__peer_msg__free_unpacked(in, NULL);
	}
	return 0;
}

/* Send PeerFormed with key to the nm members (slots: theirs for that incarnation). */
static void h4_form(const struct h4_member *m, int nm, uint64_t key, const uint32_t *slots)
{
	Commpb__PeerMsg out = COMMPB__PEER_MSG__INIT;
	Commpb__PeerFormed f = COMMPB__PEER_FORMED__INIT;
	Commpb__PeerNode nodes[2], *np[2];
	int32_t ranks[2][2];
	int first = nm == 1 || m[0].ranks[0] < m[1].ranks[0] ? 0 : 1;

	for (int k = 0; k < nm; k++) {
		const struct h4_member *x = &m[k ? !first : first];

		commpb__peer_node__init(&nodes[k]);
		nodes[k].node = (char *)x->node;
		nodes[k].ucx_address.data = (uint8_t *)x->ucx;
		nodes[k].ucx_address.len = x->ucx_len;
		nodes[k].slot = slots[k ? !first : first];
		ranks[k][0] = x->ranks[0];
		ranks[k][1] = x->ranks[1];
		nodes[k].ranks = ranks[k];
		nodes[k].n_ranks = 2;
		np[k] = &nodes[k];
	}
	f.job = "h4";
	f.key = key;
	f.nodes = np;
	f.n_nodes = (size_t)nm;
	out.body_case = COMMPB__PEER_MSG__BODY_FORMED;
	out.formed = &f;
	for (int i = 0; i < nm; i++) {
		f.self = (uint32_t)(i == first ? 0 : 1);
		pr_send(m[i].fd, &out);
	}
}

static void h4_fail(int fd, uint64_t key, uint32_t slot, const char *detail)
{
	Commpb__PeerMsg out = COMMPB__PEER_MSG__INIT;
	Commpb__PeerFail f = COMMPB__PEER_FAIL__INIT;

	f.job = "h4";
	f.key = key;
	f.slot = slot;
	f.status = COMM_ERR_PEER_LOST;
	f.detail = (char *)detail;
	out.body_case = COMMPB__PEER_MSG__BODY_FAIL;
	out.fail = &f;
	pr_send(fd, &out);
}

static void h4_rank_left(int fd, uint64_t key, int rank)
{
	Commpb__PeerMsg out = COMMPB__PEER_MSG__INIT;
	Commpb__PeerRankLeft rl = COMMPB__PEER_RANK_LEFT__INIT;

	rl.key = key;
	rl.rank = rank;
	rl.detail = "h4: a rank of incarnation 1 left";
	out.body_case = COMMPB__PEER_MSG__BODY_RANK_LEFT;
	out.rank_left = &rl;
	pr_send(fd, &out);
}

/* Incarnation 1 of each member's messages, now stale: 4 per member per call. */
static void h4_stale(const struct h4_member *m, int nm, const uint32_t *old)
{
	h4_form(m, nm, H4_KEY1, old);
	for (int i = 0; i < nm; i++) {
		h4_fail(m[i].fd, 0, old[i], "h4: stale: incarnation 1 failed while forming");
		h4_fail(m[i].fd, H4_KEY1, old[i], "h4: stale: incarnation 1 failed");
		h4_rank_left(m[i].fd, H4_KEY1, nm == 2 ? m[!i].ranks[0] : m[i].ranks[1]);
	}
}

/* Pump the connections until each of n ranks is done, or ms passed; 1 when all are. */
static int h4_pump(const struct h4_member *m, int nm, struct seen *s, int n, int ms)
{
	int fds[2] = { m[0].fd, m[nm - 1].fd };
	long t0 = mono_ms();

	while (mono_ms() - t0 < ms) {
		int i, all = 1;
		Commpb__PeerMsg *in;

		for (int r = 0; r < n; r++)
			all &= __atomic_load_n(&s->done[r], __ATOMIC_ACQUIRE);
		if (all)
			return 1;
		if ((in = pr_next(fds, nm, &i, 200)))
			commpb__peer_msg__free_unpacked(in, NULL);
	}
	return 0;
}

/* The members took in everything sent so far: a ping answered by each. */
static int h4_sync(const struct h4_member *m, int nm)
{
	int fds[2] = { m[0].fd, m[nm - 1].fd }, have[2] = { 0, nm < 2 };

	for (int i = 0; i < nm; i++)
		pr_ping(m[i].fd, 4804);
	while (!have[0] || !have[1]) {
		int i;
		Commpb__PeerMsg *in = pr_next(fds, nm, &i, 10000);

		if (!in)
			return -1;
		if (in->body_case == COMMPB__PEER_MSG__BODY_PONG && in->pong->sent_us == 4804)
			have[i] = 1;
		commpb__peer_msg__free_unpacked(in, NULL);
	}
	return 0;
}

/* H4_OPS exact all-reduces of rank + 1 + op, counted in s->iters; the failed op's result. */
static comm_result_t h4_ops(comm_t *c, struct seen *s, int r, int n, int32_t *buf)
{
	for (int k = 0; k < H4_OPS; k++) {
		int32_t want = n * (n + 1) / 2 + n * s->iters[r];
		comm_result_t rc;

		for (size_t i = 0; i < H4_COUNT; i++)
			buf[i] = r + 1 + s->iters[r];
		alarm(TH_WATCHDOG_S);
		if ((rc = comm_allreduce(c, buf, buf, H4_COUNT, COMM_INT32, COMM_SUM, NULL)))
			return rc;
		for (size_t i = 0; i < H4_COUNT; i += 4099)
			if (buf[i] != want) {
				fprintf(stderr, "rank %d: h4 all-reduce %d: element %zu is %d, not %d\n",
					r, s->iters[r], i, buf[i], want);
				return COMM_ERR_INTERNAL;
			}
		__atomic_fetch_add(&s->iters[r], 1, __ATOMIC_RELEASE);
	}
	return COMM_OK;
}

/* Join and take an op buffer of count int32s; -1, noted for the test, when either fails. */
static int join_buf(struct seen *s, int r, int n, comm_t **c, int32_t **buf, size_t count)
{
	if (th_join(c, r, n) < 0) {
		seen_note(s, r, COMM_ERR_INTERNAL, "comm_init failed (see above)");
		return -1;
	}
	if (!(*buf = comm_mem_alloc(*c, count * sizeof **buf))) {
		seen_note(s, r, COMM_ERR_NO_MEMORY, comm_last_error(*c));
		th_bail(*c);
		return -1;
	}
	return 0;
}

/* Incarnation 1: all-reduces until the root fails the job. */
static int rank_h4_first(int r, int n, void *arg)
{
	struct seen *s = arg;
	comm_result_t rc;
	int32_t *buf;
	comm_t *c;

	if (join_buf(s, r, n, &c, &buf, H4_COUNT) < 0)
		return 1;
	while ((rc = h4_ops(c, s, r, n, buf)) == COMM_OK)
		;
	seen_note(s, r, rc, comm_last_error(c));
	alarm(20);
	comm_finalize(c);
	return 0;
}

/* Incarnation 2: all-reduces before and after the stale messages, all exact. */
static int rank_h4_second(int r, int n, void *arg)
{
	struct seen *s = arg;
	comm_result_t rc;
	int32_t *buf;
	comm_t *c;

	if (join_buf(s, r, n, &c, &buf, H4_COUNT) < 0)
		return 1;
	if ((rc = h4_ops(c, s, r, n, buf)) == COMM_OK) {
		alarm(TH_WATCHDOG_S);
		while (!__atomic_load_n(&s->injected, __ATOMIC_ACQUIRE))
			usleep(1000);
		rc = h4_ops(c, s, r, n, buf);
	}
	if (rc != COMM_OK) {
		seen_note(s, r, rc, comm_last_error(c));
		return th_bail(c);
	}
	seen_note(s, r, COMM_OK, "");
	return th_leave(c, r);
}

/* The test root's listener on loopback, its address in root; the fd. */
static int h4_listen(char *root, size_t len)
{
	struct sockaddr_in sa = { .sin_family = AF_INET };
	socklen_t salen = sizeof sa;
	int lfd;

	sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	REQUIRE(lfd >= 0 && bind(lfd, (struct sockaddr *)&sa, sizeof sa) == 0 && listen(lfd, 4) == 0 &&
			getsockname(lfd, (struct sockaddr *)&sa, &salen) == 0,
		"the test root's listener");
	snprintf(root, len, "127.0.0.1:%d", ntohs(sa.sin_port));
	return lfd;
}

/* Pump the members until each of n ranks did iters all-reduces or is done (bounded). */
static void h4_until(const struct h4_member *m, int nm, struct seen *s, int n, int iters)
{
	for (long t = mono_ms(); mono_ms() - t < PROGRESS_LIMIT_MS;) {
		int all = 1, i;
		Commpb__PeerMsg *in;

		for (int r = 0; r < n; r++)
			all &= __atomic_load_n(&s->iters[r], __ATOMIC_ACQUIRE) >= iters ||
			       __atomic_load_n(&s->done[r], __ATOMIC_ACQUIRE);
		if (all)
			break;
		if ((in = pr_next((int[]){ m[0].fd, m[nm - 1].fd }, nm, &i, 100)))
			commpb__peer_msg__free_unpacked(in, NULL);
	}
}

/* Lines of d's log that say a stale message was dropped. */
static int count_stale(const struct th_daemon *d)
{
	return th_log_count(d, "stale", "dropped");
}

static void test_stale(void)
{
	static const int of[N] = { 0, 0, 1, 1 };
	const struct th_daemon *ds[2] = { &da, &db };
	struct h4_member m[2] = { { .fd = -1 }, { .fd = -1 } };
	struct seen *s = seen_new();
	struct timespec t0;
	struct th_ranks rs;
	uint32_t old[2], now[2];
	char root[64];
	int lfd, failed, stale0[2] = { count_stale(&da), count_stale(&db) }, ok;

	clock_gettime(CLOCK_MONOTONIC, &t0);
	lfd = h4_listen(root, sizeof root);

	/* incarnation 1 forms, runs, fails */
	REQUIRE(th_ranks_start_nodes(&rs, ds, of, root, "h4", N, rank_h4_first, s) == 0, "fork");
	REQUIRE(h4_accept(lfd, m, 2) == 0, "h4: A and B did not connect to the test root");
	REQUIRE(h4_joins(m, 2) == 0, "h4: incarnation 1: A and B did not send their joins");
	old[0] = m[0].slot;
	old[1] = m[1].slot;
	h4_form(m, 2, H4_KEY1, old);
	h4_until(m, 2, s, N, 1);
	for (int i = 0; i < 2; i++)
		h4_fail(m[i].fd, H4_KEY1, old[i], "h4: incarnation 1 failed at the test root");
	CHECK(h4_pump(m, 2, s, N, PROGRESS_LIMIT_MS), "h4: incarnation 1 did not end when failed");
	failed = th_ranks_wait(&rs);
	ok = !failed;
	for (int r = 0; r < N; r++)
		ok &= s->done[r] && s->iters[r] >= 1 && s->rc[r] == COMM_ERR_PEER_LOST;
	printf("%s: h4 incarnation 1 (key %016llx, slots %u and %u): %d all-reduces, then failed "
	       "by the root: rank 0: %s \"%s\"\n",
	       ok ? "ok" : "FAIL", H4_KEY1, old[0], old[1], s->iters[0],
	       comm_result_name((comm_result_t)s->rc[0]), s->detail[0]);
	CHECK(ok, "h4: incarnation 1 did not run and fail with COMM_ERR_PEER_LOST (%d ranks failed)",
	      failed);

	/* incarnation 2: same name, user and ranks; incarnation 1's messages around it */
	memset(s, 0, sizeof *s);
	m[0].joined = m[1].joined = 0;
	REQUIRE(th_ranks_start_nodes(&rs, ds, of, root, "h4", N, rank_h4_second, s) == 0, "fork");
	REQUIRE(h4_joins(m, 2) == 0, "h4: incarnation 2: A and B did not send their joins");
	now[0] = m[0].slot;
	now[1] = m[1].slot;
	CHECK(now[0] != old[0] && now[1] != old[1], "h4: incarnation 2 has the slots of 1");
	h4_stale(m, 2, old);
	h4_form(m, 2, H4_KEY2, now);
	h4_until(m, 2, s, N, H4_OPS);
	h4_stale(m, 2, old);
	CHECK(h4_sync(m, 2) == 0, "h4: A or B did not answer a ping after the stale messages");
	__atomic_store_n(&s->injected, 1, __ATOMIC_RELEASE);
	CHECK(h4_pump(m, 2, s, N, PROGRESS_LIMIT_MS), "h4: incarnation 2 did not finish");
	failed = th_ranks_wait(&rs);
	for (int r = 0; r < N; r++) {
		ok = s->done[r] && s->rc[r] == COMM_OK && s->iters[r] == 2 * H4_OPS;
		printf("%s: h4 incarnation 2, rank %d on %c: %d exact all-reduces of %u int32 "
		       "around 2 x %d stale messages to each daemon%s%s\n",
		       ok ? "ok" : "FAIL", r, of[r] ? 'B' : 'A', s->iters[r], H4_COUNT, H4_STALE / 2,
		       ok ? "" : ": ", ok ? "" : s->detail[r]);
		CHECK(ok, "h4: incarnation 2: rank %d: %s after %d all-reduces: %s", r,
		      comm_result_name((comm_result_t)s->rc[r]), s->iters[r], s->detail[r]);
	}
	CHECK(failed == 0, "h4: incarnation 2: %d ranks failed", failed);
	for (int i = 0; i < 2; i++) {
		const struct th_daemon *d = i ? &db : &da;
		int n = count_stale(d) - stale0[i];

		printf("%s: commd %c logged %d stale messages as dropped (want %d)\n",
		       n == H4_STALE ? "ok" : "FAIL", 'A' + i, n, H4_STALE);
		CHECK(n == H4_STALE, "h4: commd %c logged %d stale drops, want %d", 'A' + i, n,
		      H4_STALE);
	}
	for (int i = 0; i < 2; i++)
		close(m[i].fd);
	close(lfd);
	printf("%s: h4 row: %.1f s\n", check_failures ? "FAIL" : "ok", th_secs_since(&t0));
	fflush(stdout);
	munmap(s, sizeof *s);
}

/* --- H4 without a data plane ----------------------------------------------------- */

/*
 * A commd whose UCX found no transport (UCX_TLS=bogus) has no data plane;
 * its jobs that name a root still get a number from its tag slots (a build
 * without UCX numbers them past the slots, 65536 and up), another for each
 * incarnation. The test plays the root of job "h4" with both ranks on such
 * a commd: incarnation 1 forms, runs and fails; incarnation 2 gets another
 * number, and incarnation 1's PeerFormed, PeerFail (key-0 and keyed) and
 * PeerRankLeft, sent before it forms and while it runs, are dropped as
 * stale while its all-reduces (on the one node) stay exact.
 */
static void test_stale_nodata(void)
{
	static const int of[2] = { 0, 0 };
	struct th_daemon dn;
	const struct th_daemon *ds[1] = { &dn };
	struct h4_member m[1] = { { .fd = -1 } };
	struct seen *s = seen_new();
	struct th_ranks rs;
	uint32_t old[1], now[1];
	char root[64];
	int lfd, failed, n, ok;

	setenv("UCX_TLS", "bogus", 1);
	n = th_daemon_start_peer(&dn, "--threads", "2", NULL);
	unsetenv("UCX_TLS");
	REQUIRE(n == 0, "commd without a data plane did not start");
	lfd = h4_listen(root, sizeof root);

	REQUIRE(th_ranks_start_nodes(&rs, ds, of, root, "h4", 2, rank_h4_first, s) == 0, "fork");
	REQUIRE(h4_accept(lfd, m, 1) == 0, "h4 (no data plane): the member did not connect");
	REQUIRE(h4_joins(m, 1) == 0, "h4 (no data plane): incarnation 1: no join");
	old[0] = m[0].slot;
	h4_form(m, 1, H4_KEY1, old);
	h4_until(m, 1, s, 2, 1);
	h4_fail(m[0].fd, H4_KEY1, old[0], "h4: incarnation 1 failed at the test root");
	CHECK(h4_pump(m, 1, s, 2, PROGRESS_LIMIT_MS), "h4 (no data plane): incarnation 1 went on");
	failed = th_ranks_wait(&rs);
	ok = !failed && s->rc[0] == COMM_ERR_PEER_LOST && s->rc[1] == COMM_ERR_PEER_LOST &&
	     s->iters[0] >= 1 && old[0] != 0;
	printf("%s: h4 without a data plane: incarnation 1 numbered %u, %d all-reduces, then "
	       "failed by the root\n", ok ? "ok" : "FAIL", old[0], s->iters[0]);
	CHECK(ok, "h4 (no data plane): incarnation 1 (number %u): %s, %s after %d all-reduces",
	      old[0], comm_result_name((comm_result_t)s->rc[0]),
	      comm_result_name((comm_result_t)s->rc[1]), s->iters[0]);

	memset(s, 0, sizeof *s);
	m[0].joined = 0;
	REQUIRE(th_ranks_start_nodes(&rs, ds, of, root, "h4", 2, rank_h4_second, s) == 0, "fork");
	REQUIRE(h4_joins(m, 1) == 0, "h4 (no data plane): incarnation 2: no join");
	now[0] = m[0].slot;
	h4_stale(m, 1, old);
	h4_form(m, 1, H4_KEY2, now);
	h4_until(m, 1, s, 2, H4_OPS);
	h4_stale(m, 1, old);
	CHECK(h4_sync(m, 1) == 0, "h4 (no data plane): no pong after the stale messages");
	__atomic_store_n(&s->injected, 1, __ATOMIC_RELEASE);
	CHECK(h4_pump(m, 1, s, 2, PROGRESS_LIMIT_MS), "h4 (no data plane): incarnation 2 hung");
	failed = th_ranks_wait(&rs);
	n = count_stale(&dn);
	ok = !failed && now[0] != 0 && now[0] != old[0] && n == H4_STALE;
	for (int r = 0; r < 2; r++)
		ok &= s->done[r] && s->rc[r] == COMM_OK && s->iters[r] == 2 * H4_OPS;
	printf("%s: h4 without a data plane: incarnation 2 numbered %u, %d and %d exact "
	       "all-reduces around 2 x 4 stale messages, %d logged as dropped (want %d)\n",
	       ok ? "ok" : "FAIL", now[0], s->iters[0], s->iters[1], n, H4_STALE);
	CHECK(ok, "h4 (no data plane): incarnation 2 (number %u after %u): rank 0 %s \"%s\", "
	      "%d drops", now[0], old[0], comm_result_name((comm_result_t)s->rc[0]), s->detail[0], n);
	close(m[0].fd);
	close(lfd);
	CHECK(th_daemon_stop(&dn) == 0, "commd without a data plane did not stop cleanly");
	munmap(s, sizeof *s);
}

/* --- H4 at the root: a member's key-0 fail just after the job formed ------------- */

/*
 * commd A is the root of job "h4root" (world 4): ranks 0 and 1 on commd B,
 * ranks 2 and 3 on a member the test plays over raw TCP. Once A sent it
 * PeerFormed, the fake member sends a key-0 PeerFail naming the job by its
 * slot, as a member that failed while it thought the job was still forming
 * does. A must fail the formed job and tell B at once: B's ranks, blocked in
 * an all-reduce that waits for ranks 2 and 3, fail with that status and
 * detail well before the job's 30 s deadline, and A logs no stale drop for
 * it. A key-0 PeerFail with a slot A never saw is dropped as stale.
 */

#define H4R_SLOT 0xfff1u         /* the fake member's slot (its tag slot on A's worker) */
#define H4R_BOGUS 0xfff2u        /* a slot A never saw */
#define H4R_TIMEOUT "30000"      /* the job's deadline (COMM_TIMEOUT) */
#define H4R_LIMIT_MS 5000        /* B's ranks fail within this of the fake's fail */
#define H4R_DETAIL "h4root: rank 2 failed on the fake member while the job formed"

/* Ranks 0 and 1 (on B): join, then one all-reduce that cannot finish without 2 and 3. */
static int rank_h4root(int r, int n, void *arg)
{
	struct seen *s = arg;
	comm_result_t rc;
	int32_t *buf;
	comm_t *c;

	if (r >= 2)
		return 0; /* ranks 2 and 3 are the fake member's */
	setenv("COMM_TIMEOUT", H4R_TIMEOUT, 1);
	if (join_buf(s, r, n, &c, &buf, 16) < 0)
		return 1;
	for (int i = 0; i < 16; i++)
		buf[i] = r + 1;
	alarm(TH_WATCHDOG_S);
	__atomic_store_n(&s->start_ms[r], mono_ms(), __ATOMIC_RELEASE);
	rc = comm_allreduce(c, buf, buf, 16, COMM_INT32, COMM_SUM, NULL);
	seen_note(s, r, rc, rc ? comm_last_error(c) : "the all-reduce finished without ranks 2, 3");
	alarm(20);
	comm_finalize(c);
	return 0;
}

/* A key-0 PeerFail for "h4root" from the fake member, naming the job by slot. */
static void h4r_fail(int fd, uint32_t slot, const char *detail)
{
	Commpb__PeerMsg out = COMMPB__PEER_MSG__INIT;
	Commpb__PeerFail f = COMMPB__PEER_FAIL__INIT;

	f.job = "h4root";
	f.key = 0;
	f.status = COMM_ERR_PEER_LOST;
	f.detail = (char *)detail;
	f.slot = slot;
	out.body_case = COMMPB__PEER_MSG__BODY_FAIL;
	out.fail = &f;
	pr_send(fd, &out);
}

static void test_stale_root(void)
{
	static const int of[N] = { 0, 0, 0, 0 };
	const struct th_daemon *ds[1] = { &db };
	struct seen *s = seen_new();
	Commpb__PeerMsg out = COMMPB__PEER_MSG__INIT, *in;
	Commpb__PeerJoin jn = COMMPB__PEER_JOIN__INIT;
	struct timespec t0;
	struct th_ranks rs;
	uint8_t ucx[1024];
	size_t ucx_len = 0;
	uint64_t key = 0;
	int32_t ranks[2] = { 2, 3 };
	char token[64], bogus[32];
	long fail_ms;
	int fd, i, failed, ok, stale0 = count_stale(&da), n;

	clock_gettime(CLOCK_MONOTONIC, &t0);
	snprintf(bogus, sizeof bogus, "slot %u:", H4R_BOGUS);
	REQUIRE((fd = pr_connect(da.peer)) >= 0,
		"h4root: the fake member could not connect to commd A at %s", da.peer);
	/*
	 * A's hello first; the fake member claims A's own UCX address (B's sends
	 * to it wait). Read without pr_next, whose pings must not come before
	 * the fake member's hello: A drops a peer whose first message is not one.
	 */
	while (!ucx_len) {
		struct pollfd pf = { .fd = fd, .events = POLLIN };

		REQUIRE(poll(&pf, 1, 10000) == 1 && (in = pr_read(fd)),
			"h4root: no hello from commd A");
		if (in->body_case == COMMPB__PEER_MSG__BODY_HELLO) {
			size_t len = in->hello->ucx_address.len;

			REQUIRE(len && len <= sizeof ucx, "h4root: commd A has no UCX address");
			memcpy(ucx, in->hello->ucx_address.data, len);
			ucx_len = len;
		}
		commpb__peer_msg__free_unpacked(in, NULL);
	}
	pr_hello(fd, PEER_VERSION, "h4root-fake-member", ucx, ucx_len);

	/* ranks 2 and 3 join through the fake member, 0 and 1 through B */
	snprintf(token, sizeof token, "token-%s-%d", "h4root", (int)getpid());
	jn.job = "h4root";
	jn.token.data = (uint8_t *)token;
	jn.token.len = strlen(token);
	jn.world_size = N;
	jn.timeout_ms = (uint32_t)atoi(H4R_TIMEOUT);
	jn.ranks = ranks;
	jn.n_ranks = 2;
	jn.slot = H4R_SLOT;
	jn.uid = (uint32_t)getuid();
	out.body_case = COMMPB__PEER_MSG__BODY_JOIN;
	out.join = &jn;
	pr_send(fd, &out);
	REQUIRE(th_ranks_start_nodes(&rs, ds, of, da.peer, "h4root", N, rank_h4root, s) == 0,
		"fork");
	while (!key && (in = pr_next(&fd, 1, &i, 20000))) {
		if (in->body_case == COMMPB__PEER_MSG__BODY_FORMED &&
		    !strcmp(in->formed->job, "h4root"))
			key = in->formed->key;
		else if (in->body_case == COMMPB__PEER_MSG__BODY_FAIL)
			printf("FAIL: h4root: commd A failed the job while forming: %s\n",
			       in->fail->detail);
		commpb__peer_msg__free_unpacked(in, NULL);
	}
	CHECK(key != 0, "h4root: commd A did not send the fake member PeerFormed");
	if (!key) {
		th_daemon_dump_log(&da);
		th_daemon_dump_log(&db);
	}

	/* B's ranks blocked in their all-reduce; then the fake member's late key-0 fail */
	for (long t = mono_ms(); key && mono_ms() - t < 20000;) {
		int posted = 1;

		for (int r = 0; r < 2; r++)
			posted &= __atomic_load_n(&s->start_ms[r], __ATOMIC_ACQUIRE) != 0 ||
				  __atomic_load_n(&s->done[r], __ATOMIC_ACQUIRE);
		if (posted)
			break;
		if ((in = pr_next(&fd, 1, &i, 50)))
			commpb__peer_msg__free_unpacked(in, NULL);
	}
	for (long t = mono_ms(); mono_ms() - t < 300;)
		if ((in = pr_next(&fd, 1, &i, 50)))
			commpb__peer_msg__free_unpacked(in, NULL);
	fail_ms = mono_ms();
	h4r_fail(fd, H4R_SLOT, H4R_DETAIL);
	for (long t = mono_ms(); mono_ms() - t < 2 * atoi(H4R_TIMEOUT);) {
		if (__atomic_load_n(&s->done[0], __ATOMIC_ACQUIRE) &&
		    __atomic_load_n(&s->done[1], __ATOMIC_ACQUIRE))
			break;
		if ((in = pr_next(&fd, 1, &i, 50)))
			commpb__peer_msg__free_unpacked(in, NULL);
	}
	failed = th_ranks_wait(&rs);
	CHECK(failed == 0, "h4root: %d ranks failed (see above)", failed);
	if (failed && key) { /* formed for the fake member: what did A tell B? */
		th_daemon_dump_log(&da);
		th_daemon_dump_log(&db);
	}
	for (int r = 0; r < 2; r++) {
		long ms = s->err_ms[r] - fail_ms;

		ok = s->done[r] && s->rc[r] == COMM_ERR_PEER_LOST && ms <= H4R_LIMIT_MS &&
		     strstr(s->detail[r], H4R_DETAIL);
		printf("%s: h4root rank %d on B: all-reduce gave %s %ld ms after the fake member's "
		       "key-0 fail (limit %d, deadline %s): \"%s\"\n",
		       ok ? "ok" : "FAIL", r, comm_result_name((comm_result_t)s->rc[r]), ms,
		       H4R_LIMIT_MS, H4R_TIMEOUT, s->detail[r]);
		CHECK(ok, "h4root: rank %d: %s %ld ms after the key-0 fail, want "
			  "COMM_ERR_PEER_LOST within %d ms with \"%s\"",
		      r, comm_result_name((comm_result_t)s->rc[r]), ms, H4R_LIMIT_MS, H4R_DETAIL);
	}
	CHECK(pr_sync(fd) == 0, "h4root: commd A did not answer a ping");
	n = count_stale(&da) - stale0;
	printf("%s: commd A logged %d stale drops for the fake member's fail (want 0)\n",
	       n == 0 ? "ok" : "FAIL", n);
	CHECK(n == 0, "h4root: commd A logged %d stale drops: the key-0 fail of a formed job", n);

	/* a key-0 fail with a slot A never saw: dropped, said so */
	h4r_fail(fd, H4R_BOGUS, "h4root: a fail for a slot the root never saw");
	CHECK(pr_sync(fd) == 0, "h4root: commd A did not answer a ping");
	n = count_stale(&da) - stale0;
	ok = n == 1 && th_log_count(&da, "stale fail dropped", bogus) == 1;
	printf("%s: a key-0 fail with slot %u the root never saw: commd A logged %d stale drop "
	       "(want 1: \"stale fail dropped ... %s\")\n",
	       ok ? "ok" : "FAIL", H4R_BOGUS, n, bogus);
	CHECK(ok, "h4root: commd A logged %d stale drops after the unknown slot, want 1 \"%s\"", n,
	      bogus);
	close(fd);
	CHECK(th_daemon_alive(&da) && th_daemon_alive(&db), "h4root: commd A or B died");
	printf("%s: h4root row: %.1f s\n", check_failures ? "FAIL" : "ok", th_secs_since(&t0));
	fflush(stdout);
	munmap(s, sizeof *s);
}

/* --- a peer of another protocol version ------------------------------------------ */

/*
 * A daemon of the last release connects to A's listener: A says why in its
 * log and closes the link, rather than run a job whose data both sides
 * would frame differently.
 */
static void test_old_version(void)
{
	Commpb__PeerMsg *in;
	int fd, closed = 0;

	REQUIRE((fd = pr_connect(da.peer)) >= 0, "old version: could not connect to commd A at %s",
		da.peer);
	pr_hello(fd, PEER_VERSION - 1, "old-release", NULL, 0);
	/* A's own hello may come first; then EOF */
	for (int i = 0; i < 10 && !closed; i++) {
		struct pollfd pf = { .fd = fd, .events = POLLIN };

		if (poll(&pf, 1, 5000) != 1)
			break;
		if (!(in = pr_read(fd)))
			closed = 1;
		else
			commpb__peer_msg__free_unpacked(in, NULL);
	}
	close(fd);
	CHECK(closed, "old version: commd A kept the link of a peer speaking protocol %d",
	      PEER_VERSION - 1);
	CHECK(th_log_count(&da, "it speaks peer protocol 2,", "we speak 3") == 1,
	      "old version: commd A did not log why it dropped the peer");
	CHECK(th_daemon_alive(&da), "old version: commd A died");
	printf("ok: a peer speaking protocol %d is dropped, the log says why\n", PEER_VERSION - 1);
}

int main(void)
{
	struct timespec t0;

	setenv("COMM_TIMEOUT", "60000", 1);
	clock_gettime(CLOCK_MONOTONIC, &t0);
	if (nodes_start(&da, &db) < 0)
		return CHECK_EXIT();
	test_stale();
	test_stale_nodata();
	test_stale_root();
	test_old_version();
	CHECK(th_daemon_alive(&da) && th_daemon_alive(&db), "commd A or B died");
	CHECK(th_daemon_stop(&db) == 0, "commd B did not stop cleanly");
	CHECK(th_daemon_stop(&da) == 0, "commd A did not stop cleanly");
	printf("%s: %.1f s in all\n", check_failures ? "FAIL" : "ok", th_secs_since(&t0));
	return CHECK_EXIT();
}
