/*
 * test-split.c: comm_split through the real commd. Six ranks of job "sp"
 * split by parity with keys that reverse them, then five of them with the
 * sixth out (COMM_SPLIT_NOCOLOR); the parent and its children interleaved;
 * memory from comm_mem_alloc on one comm used in place on another (parent,
 * child, grandchild) with no segment made to stage it; a bad color and a
 * split in an open group refused before any communication; the parent
 * finalized before its child. Then four ranks over two daemons split across
 * them and within each. The children's job names come from the daemons' logs.
 */
#include <pthread.h>
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

#define N 6                  /* ranks of job "sp", on one daemon */
#define NN 4                 /* ranks of job "nsp", 2 on commd A and 2 on B */
#define MAXN 8
/*
 * float32: 80 MiB. Staging it would take a block of a new segment (none of
 * a comm's is that large before), mapped in the rank for good (COMM_KEEP_MB
 * keeps it): a memfd mapping more after the op than before.
 */
#define BIG_COUNT ((size_t)20 << 20)

/* The cases, each passed or failed by every rank, in memory shared with them. */
enum { C_PARITY, C_NOCOLOR, C_INTERLEAVE, C_ZC_DOWN, C_ZC_UP, C_ZC_GRAND, C_INVALID,
       C_PARENT_FIRST, C_FORGET, C_AGREE, C_REFUSED, C_QUOTA, C_THREADS, C_SPAN, C_LOCAL, NCASES };
enum { NOT_RUN, PASSED, FAILED };
static int (*outcome)[MAXN];

static char poison_byte;
#define POISON ((comm_t *)(void *)&poison_byte) /* not a comm: comm_split must overwrite it */

/* --- what the splits should give, worked out here -------------------------------- */

/*
 * The ranks of comm that join rank r's new comm, in their new order (key,
 * then rank in comm), into members; how many (0 when r gives no color).
 */
static int expect_members(const int *color, const int *key, int n, int r, int *members)
{
	int m = 0;

	if (color[r] < 0)
		return 0;
	for (int p = 0; p < n; p++) {
		int at;

		if (color[p] != color[r])
			continue;
		/* p after the lower ranks of equal key: strictly greater keys move up */
		for (at = m++; at > 0 && key[members[at - 1]] > key[p]; at--)
			members[at] = members[at - 1];
		members[at] = p;
	}
	return m;
}

/* The world rank of comm rank q (world NULL: the comm is the world). */
static int world_of(const int *world, int q)
{
	return world ? world[q] : q;
}

/* The sum of world rank + 1 over the m members (world ranks). */
static int64_t sum_plus1(const int *w, int m)
{
	int64_t s = 0;

	for (int k = 0; k < m; k++)
		s += w[k] + 1;
	return s;
}

/* --- checks, in a rank: 0 right, 1 a wrong result, -1 a call that failed ------------ */

static int worst(int a, int b)
{
	return a < 0 || b < 0 ? -1 : a | b;
}

/* An int64 sum of v over c; want expected. */
static int sum_check(comm_t *c, int r, int64_t v, int64_t want, const char *what)
{
	int64_t x = v;

	if (!th_want_rc(c, r, what, comm_allreduce(c, &x, &x, 1, COMM_INT64, COMM_SUM, NULL),
		     COMM_OK))
		return -1;
	if (x == want)
		return 0;
	fprintf(stderr, "rank %d: %s: sum %lld, expected %lld\n", r, what, (long long)x,
		(long long)want);
	return 1;
}

/*
 * An in-place float32 sum over c of buf (BIG_COUNT elements from comm_mem_alloc,
 * on c or on another comm of its family), element i of world rank w being
 * (w + 1) * (i % 7 + 1): wsum * (i % 7 + 1) exactly (below 2^24). Also 1
 * when the rank mapped a memfd meanwhile: the op staged buf.
 */
static int big_check(comm_t *c, int w, float *buf, int64_t wsum, const char *what)
{
	int maps0, maps1;
	comm_result_t rc;

	for (size_t i = 0; i < BIG_COUNT; i++)
		buf[i] = (float)((w + 1) * (int)(i % 7 + 1));
	maps0 = th_count_memfd_maps(getpid());
	rc = comm_allreduce(c, buf, buf, BIG_COUNT, COMM_FLOAT32, COMM_SUM, NULL);
	maps1 = th_count_memfd_maps(getpid());
	if (!th_want_rc(c, w, what, rc, COMM_OK))
		return -1;
	if (maps0 < 0 || maps1 != maps0) {
		fprintf(stderr, "rank %d: %s: %d memfd mappings before the op, %d after: staged\n",
			w, what, maps0, maps1);
		return 1;
	}
	for (size_t i = 0; i < BIG_COUNT; i++) {
		float want = (float)(wsum * (int64_t)(i % 7 + 1));

		if (buf[i] != want) {
			fprintf(stderr, "rank %d: %s: element %zu is %g, expected %g\n", w, what, i,
				(double)buf[i], (double)want);
			return 1;
		}
	}
	return 0;
}

/*
 * comm_split(c, color[q], key[q], nc) on rank q of c's n, against
 * expect_members: COMM_OK; NULL without a color; else the rank and size
 * expected (-1 when not), an all-gather of the world ranks giving them in
 * the new order and an int64 sum of world rank + 1. world: as world_of.
 */
static int split_check(comm_t *c, int q, int n, const int *color, const int *key,
		       const int *world, comm_t **nc, const char *what)
{
	int members[MAXN], m = expect_members(color, key, n, q, members), me = -1, w, bad = 0;
	int32_t mine, all[MAXN];
	int64_t want = 0;

	w = world_of(world, q);
	*nc = POISON;
	if (!th_want_rc(c, w, what, comm_split(c, color[q], key[q], nc), COMM_OK))
		return -1;
	if (m == 0 || !*nc || *nc == POISON) {
		if (m == 0 && !*nc)
			return 0;
		fprintf(stderr, "rank %d: %s: newcomm %s, expected %s\n", w, what,
			*nc ? "set" : "NULL", m ? "a comm" : "NULL");
		return -1;
	}
	for (int k = 0; k < m; k++) {
		if (members[k] == q)
			me = k;
		members[k] = world_of(world, members[k]);
		want += members[k] + 1;
	}
	if (comm_rank(*nc) != me || comm_size(*nc) != m) {
		fprintf(stderr, "rank %d: %s: rank %d of %d, expected %d of %d\n", w, what,
			comm_rank(*nc), comm_size(*nc), me, m);
		return -1;
	}
	mine = w;
	if (!th_want_rc(*nc, w, what, comm_allgather(*nc, &mine, all, 1, COMM_INT32, NULL), COMM_OK))
		return -1;
	for (int k = 0; k < m; k++) {
		if (all[k] == members[k])
			continue;
		fprintf(stderr, "rank %d: %s: all-gather block %d is %d, expected %d\n", w, what, k,
			(int)all[k], members[k]);
		bad = 1;
	}
	return worst(bad, sum_check(*nc, w, w + 1, want, what));
}

/* color -2 and a split in an open group: refused before any communication. */
static int invalid_check(comm_t *c, int r, int n)
{
	comm_t *nc = POISON;
	comm_result_t rc = comm_split(c, -2, 0, &nc);
	int bad = 0;

	if (rc != COMM_ERR_INVALID_ARG || nc || !*comm_last_error(c)) {
		fprintf(stderr, "rank %d: color -2: %s, newcomm %s, detail \"%s\"; expected "
			"INVALID_ARG, NULL and a detail\n", r, comm_result_name(rc),
			nc ? "set" : "NULL", comm_last_error(c));
		bad = 1;
	}
	if (!th_want_rc(c, r, "group start", comm_group_start(c), COMM_OK))
		return -1;
	nc = POISON;
	rc = comm_split(c, 0, 0, &nc);
	if (rc != COMM_ERR_INVALID_ARG || nc) {
		fprintf(stderr, "rank %d: split in an open group: %s, newcomm %s; expected "
			"INVALID_ARG and NULL\n", r, comm_result_name(rc), nc ? "set" : "NULL");
		bad = 1;
	}
	if (!th_want_rc(c, r, "group end after the split refused", comm_group_end(c), COMM_OK))
		return -1;
	/* nothing went out: the next collective matches on every rank */
	return worst(bad, sum_check(c, r, 7 * (r + 1), 7 * n * (n + 1) / 2,
				    "all-reduce on sp after the refused splits"));
}

/* --- the ranks --------------------------------------------------------------------- */

/* Record case k's result rc on rank r; a call that failed (-1) ends the rank. */
#define CASE(k, expr)                                                          \
	do {                                                                   \
		int rc_ = (expr);                                              \
		outcome[k][r] = rc_ == 0 ? PASSED : FAILED;                    \
		if (rc_ < 0)                                                   \
			return th_bail(c);                                     \
		bad |= rc_;                                                    \
	} while (0)

/* Job "sp": cases a to f of main, in one run. */
static int rank_sp(int r, int n, void *arg)
{
	int color[MAXN], key[MAXN], mem[MAXN], gmem[MAXN], gworld[MAXN], m, gm, q, rc, bad = 0;
	comm_t *c, *ch = NULL, *c5 = NULL, *g = NULL;
	float *pbig, *cbig;

	if (th_join(&c, r, n) < 0)
		return 1;
	/* split.0: by parity, keys reversing the order */
	for (int p = 0; p < n; p++) {
		color[p] = p % 2;
		key[p] = -p;
	}
	m = expect_members(color, key, n, r, mem);
	CASE(C_PARITY, split_check(c, r, n, color, key, NULL, &ch, "split by parity"));
	/* split.1: the last rank out, the others in their order */
	for (int p = 0; p < n; p++) {
		color[p] = p == n - 1 ? COMM_SPLIT_NOCOLOR : 0;
		key[p] = 0;
	}
	rc = split_check(c, r, n, color, key, NULL, &c5, "split with the last rank out");
	if (rc >= 0 && c5)
		rc = th_want_rc(c5, r, "barrier on sp/split.1.0", comm_barrier(c5, NULL), COMM_OK)
			     ? worst(rc, sum_check(c5, r, 10 * (r + 1), 10 * (n - 1) * n / 2,
						   "all-reduce on sp/split.1.0"))
			     : -1;
	CASE(C_NOCOLOR, rc);
	/* the parent and the children in turn */
	rc = sum_check(c, r, r + 1, n * (n + 1) / 2, "all-reduce on sp after the splits");
	if (rc >= 0)
		rc = worst(rc, sum_check(ch, r, 100 + r, 100 * m + sum_plus1(mem, m) - m,
					 "all-reduce on sp/split.0.x"));
	if (rc >= 0 && c5)
		rc = worst(rc, sum_check(c5, r, -r, -(n - 2) * (n - 1) / 2,
					 "all-reduce on sp/split.1.0 again"));
	if (rc >= 0)
		rc = worst(rc, sum_check(c, r, 1000 * (r + 1), 1000 * n * (n + 1) / 2,
					 "all-reduce on sp again"));
	/* sp/split.1.0 finalized before its parent */
	if (rc >= 0 && c5 && th_leave(c5, r))
		rc = -1;
	CASE(C_INTERLEAVE, rc);
	/* memory of one comm in place on another */
	pbig = comm_mem_alloc(c, BIG_COUNT * sizeof *pbig);
	cbig = comm_mem_alloc(ch, BIG_COUNT * sizeof *cbig);
	if (!pbig || !cbig) {
		fprintf(stderr, "rank %d: comm_mem_alloc of 80 MiB: %s\n", r,
			comm_last_error(pbig ? ch : c));
		return th_bail(c);
	}
	CASE(C_ZC_DOWN, big_check(ch, r, pbig, sum_plus1(mem, m), "sp's memory on sp/split.0.x"));
	CASE(C_ZC_UP, big_check(c, r, cbig, n * (n + 1) / 2, "sp/split.0.x's memory on sp"));
	/* a grandchild: the child's first two ranks, and its third alone */
	for (int k = 0; k < m; k++) {
		color[k] = k < 2 ? 0 : 1;
		key[k] = 0;
	}
	q = comm_rank(ch);
	gm = expect_members(color, key, m, q, gmem);
	for (int k = 0; k < gm; k++)
		gworld[k] = mem[gmem[k]];
	rc = split_check(ch, q, m, color, key, mem, &g, "split of sp/split.0.x");
	if (rc >= 0)
		rc = worst(rc, big_check(g, r, pbig, sum_plus1(gworld, gm),
					 "sp's memory on sp/split.0.x/split.0.x"));
	if (rc >= 0 && th_leave(g, r))
		rc = -1;
	CASE(C_ZC_GRAND, rc);
	CASE(C_INVALID, invalid_check(c, r, n));
	/* sp finalized first: its child goes on, on its own memory */
	if (th_leave(c, r))
		return 1;
	rc = big_check(ch, r, cbig, sum_plus1(mem, m), "sp/split.0.x's memory after sp left");
	if (rc >= 0 && th_leave(ch, r))
		rc = -1;
	outcome[C_PARENT_FIRST][r] = rc == 0 ? PASSED : FAILED;
	if (rc < 0)
		return th_bail(ch);
	return bad | rc;
}

/* Wait up to 3 s for commd d to map want memfds; what it maps then. */
static int daemon_maps(const struct th_daemon *d, int want)
{
	int got = -1;

	for (int i = 0; i < 300 && (got = th_count_memfd_maps(d->pid)) != want; i++)
		usleep(10 * 1000);
	return got;
}

/*
 * Job "solo", one rank: its child registers the parent's 80 MiB segment
 * (commd maps the parent's two segments, the child's first and that one:
 * 4); the parent finalized (2 left), the child's next op, on its own
 * memory, forgets the borrowed one: commd maps the child's segment alone.
 */
static int rank_solo(int r, int n, void *arg)
{
	const struct th_daemon *d = arg;
	static const int want[3] = { 4, 2, 1 };
	const char *when[3] = { "the child used the parent's memory", "the parent left",
				"the child's next op" };
	int color = 0, key = 0, got[3], bad = 0;
	comm_t *c, *ch;
	float *pbig, *own;

	if (th_join(&c, r, n) < 0)
		return 1;
	if (!(pbig = comm_mem_alloc(c, BIG_COUNT * sizeof *pbig)) ||
	    split_check(c, r, n, &color, &key, NULL, &ch, "split of solo") != 0 ||
	    !(own = comm_mem_alloc(ch, 16 * sizeof *own)) ||
	    big_check(ch, r, pbig, 1, "solo's memory on solo/split.0.0") != 0)
		return th_bail(c);
	got[0] = daemon_maps(d, want[0]);
	if (th_leave(c, r))
		return 1;
	got[1] = daemon_maps(d, want[1]);
	for (int i = 0; i < 16; i++)
		own[i] = (float)i;
	if (!th_want_rc(ch, r, "all-reduce on solo/split.0.0", comm_allreduce(ch, own, own, 16,
			COMM_FLOAT32, COMM_SUM, NULL), COMM_OK))
		return th_bail(ch);
	got[2] = daemon_maps(d, want[2]);
	for (int k = 0; k < 3; k++) {
		if (got[k] == want[k])
			continue;
		fprintf(stderr, "rank %d: after %s commd maps %d memfds, expected %d\n", r, when[k],
			got[k], want[k]);
		bad = 1;
	}
	outcome[C_FORGET][r] = bad || th_leave(ch, r) ? FAILED : PASSED;
	return outcome[C_FORGET][r] != PASSED;
}

/* A one-rank job: split once, an all-reduce on the child, both finalized. */
static int rank_split_once(int r, int n, void *arg)
{
	int color = 0, key = 0, rc;
	comm_t *c, *ch;

	(void)arg;
	if (th_join(&c, r, n) < 0)
		return 1;
	rc = split_check(c, r, n, &color, &key, NULL, &ch, "split of a long-named job");
	if (rc < 0)
		return th_bail(c);
	return rc | th_leave(ch, r) | th_leave(c, r);
}

/*
 * The child of a job named name: "NAME/split.0.0", or when that passes 255
 * bytes, name's first 180 bytes, "~", its FNV-1a 64 hash in hex, "/split.0.0".
 */
static void child_name(const char *name, char *buf, size_t len)
{
	uint64_t h = 0xcbf29ce484222325ull;

	if (strlen(name) + strlen("/split.0.0") <= 255) {
		snprintf(buf, len, "%s/split.0.0", name);
		return;
	}
	for (const char *p = name; *p; p++) {
		h ^= (unsigned char)*p;
		h *= 0x100000001b3ull;
	}
	snprintf(buf, len, "%.180s~%016llx/split.0.0", name, (unsigned long long)h);
}

/*
 * Job "agree", two ranks, both color 0, while another process holds rank 1
 * of "agree/split.0.0": rank 0's join forms it with that squatter, rank 1's
 * is refused. Both comm_split calls fail (rank 1 with the refusal, rank 0
 * with COMM_ERR_ABORTED), neither rank keeps a comm, and "agree" goes on.
 */
static int rank_agree(int r, int n, void *arg)
{
	comm_t *c, *nc = POISON;
	comm_result_t rc;
	int bad;

	(void)arg;
	if (th_join(&c, r, n) < 0)
		return 1;
	rc = comm_split(c, 0, 0, &nc);
	bad = rc == COMM_OK || nc || (r == 0 && rc != COMM_ERR_ABORTED) ||
	      (r == 1 && rc == COMM_ERR_ABORTED);
	printf("# agree rank %d: comm_split: %s: %s\n", r, comm_result_name(rc), comm_last_error(c));
	fflush(stdout);
	if (bad)
		fprintf(stderr, "rank %d: comm_split with rank 1 of the child taken: %s, newcomm %s; "
			"expected a failure (rank 0: COMM_ERR_ABORTED) and NULL\n", r,
			comm_result_name(rc), nc ? "set" : "NULL");
	rc = sum_check(c, r, r + 1, n * (n + 1) / 2, "all-reduce on agree after the split failed");
	outcome[C_AGREE][r] = bad || rc ? FAILED : PASSED;
	if (rc < 0)
		return th_bail(c);
	return bad | rc | th_leave(c, r);
}

/*
 * A split where one rank's join is refused at once (its daemon takes 3
 * connections of the uid, the 2 parents and the first child's): that
 * rank fails saying why, the other once its own join gave up at half the
 * deadline (COMM_ERR_TIMEOUT naming the rank that did not join), before
 * the agreement on the parent could time out; the parent goes on.
 */
static int rank_refused(int r, int n, void *arg)
{
	comm_t *c, *nc = POISON;
	struct timespec t0;
	comm_result_t rc;
	double secs;
	int bad;

	(void)arg;
	if (th_join(&c, r, n) < 0)
		return 1;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	rc = comm_split(c, 0, 0, &nc);
	secs = th_secs_since(&t0);
	bad = nc != NULL ||
	      !((rc == COMM_ERR_BUSY && strstr(comm_last_error(c), "max-connections-per-uid")) ||
		(rc == COMM_ERR_TIMEOUT && strstr(comm_last_error(c), "did not join within 1500 ms")));
	printf("# refused rank %d: comm_split: %s in %.1f s: %s\n", r, comm_result_name(rc), secs,
	       comm_last_error(c));
	fflush(stdout);
	if (bad)
		fprintf(stderr, "rank %d: comm_split with one join refused: %s (%s), newcomm %s; "
			"expected COMM_ERR_BUSY naming the limit or COMM_ERR_TIMEOUT naming the "
			"rank that did not join, and NULL\n",
			r, comm_result_name(rc), comm_last_error(c), nc ? "set" : "NULL");
	rc = sum_check(c, r, r + 1, n * (n + 1) / 2, "all-reduce on the parent after");
	outcome[C_REFUSED][r] = bad || rc ? FAILED : PASSED;
	if (rc < 0)
		return th_bail(c);
	return bad | rc | th_leave(c, r);
}

/*
 * The squatter of rank_agree: rank 1 of "agree/split.0.0", joined before
 * the split; rank 0's join forms the job, and rank 0 aborts it once the
 * split failed: 0 when its barrier then fails with COMM_ERR_ABORTED.
 */
static int squat(const struct th_daemon *d, const char *token)
{
	comm_config_t cfg = COMM_CONFIG_INIT;
	comm_result_t rc;
	comm_t *c;

	cfg.socket = d->sock;
	cfg.job = "agree/split.0.0";
	cfg.token = token;
	cfg.rank = 1;
	cfg.world_size = 2;
	alarm(TH_WATCHDOG_S);
	if ((rc = comm_init(&c, &cfg)) != COMM_OK) {
		fprintf(stderr, "squatter: comm_init: %s: %s\n", comm_result_name(rc),
			comm_last_error(NULL));
		return 1;
	}
	rc = comm_barrier(c, NULL);
	comm_finalize(c);
	if (rc == COMM_ERR_ABORTED)
		return 0;
	fprintf(stderr, "squatter: barrier: %s, expected COMM_ERR_ABORTED\n", comm_result_name(rc));
	return 1;
}

/* An all-reduce of x[i] = i * (r + 1), 1024 floats, on comm cm: 0 when right. */
static int quota_sum(comm_t *cm, int r, int n, float *x, const char *what)
{
	int bad = 0;

	for (int i = 0; i < 1024; i++)
		x[i] = (float)(i * (r + 1));
	if (!th_want_rc(cm, r, what, comm_allreduce(cm, x, x, 1024, COMM_FLOAT32, COMM_SUM, NULL),
			COMM_OK))
		return -1;
	for (int i = 0; i < 1024; i++)
		bad |= x[i] != (float)(i * n * (n + 1) / 2);
	if (bad)
		fprintf(stderr, "rank %d: %s: wrong\n", r, what);
	return bad;
}

/*
 * One rank, on a commd whose jobs may register 150 MiB, segments going
 * once empty (COMM_KEEP_MB=0): the child, with 144 MiB of its own, cannot
 * register its parent's 80 MiB segment too, so ops on 4 KiB of it are
 * staged (through the child's first segment), not refused; the refusal is
 * asked once (test_quota counts it in the log), and comm_last_error does
 * not carry it. Then, both back to 64 MiB, the child registers a 66 MiB
 * parent segment (130 MiB), the parent frees that, and the child's 80 MiB
 * allocation fits: the registration of a segment that went is dropped
 * before commd is asked for more.
 */
static int rank_quota(int r, int n, void *arg)
{
	int color = 0, key = 0, bad = 0;
	comm_t *c, *ch;
	float *pbig, *cbig, *pmid;

	(void)arg;
	setenv("COMM_KEEP_MB", "0", 1);
	if (th_join(&c, r, n) < 0)
		return 1;
	if (!(pbig = comm_mem_alloc(c, BIG_COUNT * sizeof *pbig)) ||
	    split_check(c, r, n, &color, &key, NULL, &ch, "split of quota") != 0 ||
	    !(cbig = comm_mem_alloc(ch, BIG_COUNT * sizeof *cbig))) {
		fprintf(stderr, "rank %d: setting up: %s\n", r, comm_last_error(c));
		return th_bail(c);
	}
	for (int k = 0; k < 5 && !bad; k++)
		if ((bad = quota_sum(ch, r, n, pbig + 1024,
				     "all-reduce on 4 KiB of the parent's segment past the child's quota")) < 0)
			return th_bail(c);
	if (strstr(comm_last_error(ch), "max-job-memory")) {
		fprintf(stderr, "rank %d: the ops went on, but the child's last error is the refusal: "
			"%s\n", r, comm_last_error(ch));
		bad = 1;
	}
	comm_mem_free(ch, cbig);
	comm_mem_free(c, pbig);
	if (!(pmid = comm_mem_alloc(c, (size_t)65 << 20))) {
		fprintf(stderr, "rank %d: 65 MiB on the parent: %s\n", r, comm_last_error(c));
		return th_bail(c);
	}
	if ((bad |= quota_sum(ch, r, n, pmid, "all-reduce on the parent's 66 MiB segment")) < 0)
		return th_bail(c);
	comm_mem_free(c, pmid);
	if (!(cbig = comm_mem_alloc(ch, BIG_COUNT * sizeof *cbig))) {
		fprintf(stderr, "rank %d: 80 MiB on the child once the parent's 66 MiB went: %s\n", r,
			comm_last_error(ch));
		bad = 1;
	} else if ((bad |= quota_sum(ch, r, n, cbig, "all-reduce on the child's new 80 MiB")) < 0) {
		return th_bail(c);
	}
	outcome[C_QUOTA][r] = bad ? FAILED : PASSED;
	return bad | th_leave(ch, r) | th_leave(c, r);
}

/*
 * Job "threads", two ranks, and its child: one thread all-reduces on the
 * child, in the parent's memory (the family's lookups), while the other
 * makes and frees 70 MiB segments on the parent (COMM_KEEP_MB=0: each one
 * goes at once, changing the family's lists under the first thread).
 */
#define THREAD_ROUNDS 60

struct on_child {
	comm_t *ch;
	float *x;
	int r, n, bad;
};

static void *child_loop(void *arg)
{
	struct on_child *o = arg;

	for (int k = 0; k < THREAD_ROUNDS && !o->bad; k++) {
		for (int i = 0; i < 1024; i++)
			o->x[i] = (float)(k + i * (o->r + 1));
		if (!th_want_rc(o->ch, o->r, "all-reduce on the child, in the parent's memory",
				comm_allreduce(o->ch, o->x, o->x, 1024, COMM_FLOAT32, COMM_SUM,
					       NULL), COMM_OK)) {
			o->bad = -1;
			break;
		}
		for (int i = 0; i < 1024 && !o->bad; i++)
			if (o->x[i] != (float)(o->n * k + i * o->n * (o->n + 1) / 2))
				o->bad = 1;
	}
	return NULL;
}

static int rank_threads(int r, int n, void *arg)
{
	int color[2] = { 0, 0 }, key[2] = { 0, 0 }, bad = 0;
	struct on_child o = { .r = r, .n = n };
	comm_t *c;
	pthread_t t;

	(void)arg;
	setenv("COMM_KEEP_MB", "0", 1);
	if (th_join(&c, r, n) < 0)
		return 1;
	if (!(o.x = comm_mem_alloc(c, 1024 * sizeof *o.x)) ||
	    split_check(c, r, n, color, key, NULL, &o.ch, "split of threads") != 0)
		return th_bail(c);
	if (pthread_create(&t, NULL, child_loop, &o) != 0)
		return th_bail(c);
	for (int k = 0; k < THREAD_ROUNDS && !bad; k++) {
		int64_t *big = comm_mem_alloc(c, (size_t)70 << 20);

		if (!big) {
			fprintf(stderr, "rank %d: comm_mem_alloc of 70 MiB: %s\n", r,
				comm_last_error(c));
			bad = -1;
			break;
		}
		big[0] = k + r;
		if (!th_want_rc(c, r, "all-reduce on the parent, in a new segment",
				comm_allreduce(c, big, big, 1, COMM_INT64, COMM_SUM, NULL), COMM_OK))
			bad = -1;
		else if (big[0] != n * k + n * (n - 1) / 2)
			bad = 1;
		comm_mem_free(c, big);
	}
	pthread_join(t, NULL);
	if (o.bad || bad)
		fprintf(stderr, "rank %d: threads: child loop %d, parent loop %d\n", r, o.bad, bad);
	outcome[C_THREADS][r] = o.bad || bad ? FAILED : PASSED;
	if (o.bad < 0 || bad < 0)
		return th_bail(o.ch) | th_bail(c);
	return (o.bad || bad) | th_leave(o.ch, r) | th_leave(c, r);
}

/* Job "nsp" over two daemons: a split across them, one within each. */
static int rank_nsp(int r, int n, void *arg)
{
	static const char *const what[2] = { "split by parity, across A and B",
					     "split by rank / 2, within A and within B" };
	int color[MAXN], key[MAXN], mem[MAXN], m, rc, bad = 0;
	comm_t *c, *sub[2] = { NULL, NULL };
	float *pbig;

	if (th_join(&c, r, n) < 0)
		return 1;
	pbig = comm_mem_alloc(c, BIG_COUNT * sizeof *pbig);
	if (!pbig) {
		fprintf(stderr, "rank %d: comm_mem_alloc of 80 MiB: %s\n", r, comm_last_error(c));
		return th_bail(c);
	}
	for (int s = 0; s < 2; s++) {
		for (int p = 0; p < n; p++) {
			color[p] = s == 0 ? p % 2 : p / 2;
			key[p] = s == 0 ? 0 : -p;
		}
		m = expect_members(color, key, n, r, mem);
		rc = split_check(c, r, n, color, key, NULL, &sub[s], what[s]);
		if (rc >= 0)
			rc = worst(rc, big_check(sub[s], r, pbig, sum_plus1(mem, m), what[s]));
		CASE(s == 0 ? C_SPAN : C_LOCAL, rc);
	}
	rc = sum_check(c, r, r + 1, n * (n + 1) / 2, "all-reduce on nsp after the splits");
	if (rc < 0 || th_leave(sub[0], r) || th_leave(sub[1], r))
		return th_bail(c);
	return th_leave(c, r) | bad | rc;
}

/* --- the test ---------------------------------------------------------------------- */

/* One line for case k over n ranks: ok when every rank passed it. */
static void report(int k, int n, const char *what)
{
	int passed = 0;

	for (int r = 0; r < n; r++)
		passed += outcome[k][r] == PASSED;
	CHECK(passed == n, "%s: passed on %d of %d ranks", what, passed, n);
	printf("%s: %s\n", passed == n ? "ok" : "FAIL", what);
	fflush(stdout);
}

/* CHECK that d's log has want lines with both a and b. */
static void log_want(const struct th_daemon *d, char name, const char *a, const char *b, int want)
{
	int got = th_log_count(d, a, b);

	CHECK(got == want, "commd %c logged \"%s\"...\"%s\" %d times, expected %d", name, a, b,
	      got, want);
}

/* Wait for the warm-up's memfds to go, then d's fd count: the baseline. */
static int baseline(const struct th_daemon *d)
{
	for (int i = 0; i < 300 && th_count_memfd_maps(d->pid) != 0; i++)
		usleep(10 * 1000);
	return th_count_fds(d->pid);
}

/* rank_agree with its squatter, on d. */
static void test_agree(const struct th_daemon *d)
{
	char token[64];
	pid_t sq;
	int st, failed;
	long t0 = 0;

	/* the harness's token for job "agree" (th_ranks_start) */
	snprintf(token, sizeof token, "token-agree-%d", (int)getpid());
	fflush(NULL);
	REQUIRE((sq = fork()) >= 0, "fork");
	if (sq == 0)
		_exit(squat(d, token));
	for (; t0 < 500 && th_log_count(d, "job agree/split.0.0: created by uid", "") != 1; t0++)
		usleep(10 * 1000);
	CHECK(t0 < 500, "the squatter's job never showed in commd's log");
	failed = th_run_ranks(d, "agree", 2, rank_agree, NULL);
	REQUIRE(waitpid(sq, &st, 0) == sq, "waitpid");
	CHECK(failed == 0, "job agree: %d ranks failed", failed);
	CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0, "the squatter failed");
	report(C_AGREE, 2, "a split whose new comm formed on rank 0 alone (rank 1 of it taken): "
	       "both fail, rank 0 COMM_ERR_ABORTED, neither keeps a comm, the parent goes on");
}

/* rank_refused on a commd of its own, with a 3 s deadline. */
static void test_refused(void)
{
	struct th_daemon d;
	int failed, busy, aborted;

	REQUIRE(th_daemon_start(&d, "--max-connections-per-uid", "3", NULL) == 0,
		"commd did not start");
	setenv("COMM_TIMEOUT", "3000", 1);
	failed = th_run_ranks(&d, "refused", 2, rank_refused, NULL);
	setenv("COMM_TIMEOUT", "60000", 1); /* main's */
	CHECK(failed == 0, "job refused: %d ranks failed", failed);
	busy = th_log_count(&d, "max-connections-per-uid", "");
	aborted = th_log_count(&d, "job refused/split.0.0: failed", "did not join within 1500 ms");
	CHECK(busy >= 1 && aborted == 1,
	      "commd logged the refusal %d times and the child's join given up at 1500 ms %d "
	      "times, expected 1 or more and 1", busy, aborted);
	report(C_REFUSED, 2, "a split where one rank's join is refused (max-connections-per-uid): "
	       "it says why, the other COMM_ERR_TIMEOUT once its join gave up at half the 3 s "
	       "deadline, the parent goes on");
	CHECK(th_daemon_stop(&d) == 0, "commd did not stop cleanly");
}

/* rank_quota on a commd of its own, whose jobs may register 150 MiB. */
static void test_quota(void)
{
	struct th_daemon d;
	int failed;

	REQUIRE(th_daemon_start(&d, "--max-job-memory", "150M", NULL) == 0, "commd did not start");
	failed = th_run_ranks(&d, "quota", 1, rank_quota, NULL);
	CHECK(failed == 0, "job quota: its rank failed");
	log_want(&d, 'd', "job quota/split.0.0 would hold", "max-job-memory", 1);
	report(C_QUOTA, 1, "a child at its memory limit: 5 ops on its parent's segment staged, "
	       "not refused, and right, commd asked once; the child's registration of a parent "
	       "segment that went dropped before its next allocation, which then fits");
	CHECK(th_daemon_stop(&d) == 0, "commd did not stop cleanly");
}

static void test_one_daemon(void)
{
	static const struct {
		const char *job;
		int ranks;
	} jobs[] = {
		{ "sp/split.0.0", 3 },           { "sp/split.0.1", 3 },
		{ "sp/split.1.0", 5 },           { "sp/split.0.0/split.0.0", 2 },
		{ "sp/split.0.0/split.0.1", 1 }, { "sp/split.0.1/split.0.0", 2 },
		{ "sp/split.0.1/split.0.1", 1 },
	};
	struct th_daemon d;
	struct timespec t0;
	char line[512];
	int fds0, failed;

	REQUIRE(th_daemon_start(&d, NULL) == 0, "commd did not start");
	CHECK(th_run_ranks(&d, "sp-warm-up", 2, th_rank_sum, NULL) == 0, "warm-up job");
	fds0 = baseline(&d);
	REQUIRE(fds0 > 0, "the fds of commd");
	clock_gettime(CLOCK_MONOTONIC, &t0);
	failed = th_run_ranks(&d, "sp", N, rank_sp, NULL);
	CHECK(failed == 0, "job sp: %d of %d ranks failed", failed, N);
	report(C_PARITY, N, "6 ranks by rank % 2, key -rank: sp/split.0.0 = 4 2 0, sp/split.0.1 "
	       "= 5 3 1 (rank, size, all-gather of parent ranks, int64 sums 9 and 12)");
	report(C_NOCOLOR, N, "rank 5 NOCOLOR (NULL, COMM_OK), ranks 0-4 color 0 key 0: "
	       "sp/split.1.0 = 0 1 2 3 4, barrier, sum 150");
	report(C_INTERLEAVE, N, "sp, sp/split.0.x, sp/split.1.0, sp again: sums 21, 306 and 309, "
	       "-10, 21000; sp/split.1.0 finalized before sp");
	report(C_ZC_DOWN, N, "80 MiB from comm_mem_alloc on sp, all-reduced in place on "
	       "sp/split.0.x: sums 9 and 12 x (i % 7 + 1), no memfd mapped");
	report(C_ZC_UP, N, "80 MiB from comm_mem_alloc on sp/split.0.x, all-reduced in place on "
	       "sp: sum 21 x (i % 7 + 1), no memfd mapped");
	report(C_ZC_GRAND, N, "sp's 80 MiB on grandchildren sp/split.0.x/split.0.0 (2 ranks: sums "
	       "8, 10) and split.0.1 (1 rank: 1, 2), no memfd mapped");
	report(C_INVALID, N, "color -2 on every rank and a split in an open group: INVALID_ARG, "
	       "newcomm NULL, and sp's next all-reduce right");
	report(C_PARENT_FIRST, N, "sp finalized first on every rank, then an 80 MiB all-reduce on "
	       "sp/split.0.x's own memory, then it finalized");
	failed = th_run_ranks(&d, "solo", 1, rank_solo, &d);
	CHECK(failed == 0, "job solo: its rank failed");
	report(C_FORGET, 1, "a child's registration of its parent's 80 MiB segment dropped at its "
	       "first op after the parent left: commd maps 4, 2, then 1 memfd");
	/* names of 245 and 246 bytes: the child's is 255 bytes, or would be 256 */
	for (int len = 245; len <= 246; len++) {
		char name[256], child[300];

		memset(name, 'j', (size_t)len);
		name[len] = '\0';
		name[0] = 'L';
		child_name(name, child, sizeof child);
		failed = th_run_ranks(&d, name, 1, rank_split_once, NULL);
		snprintf(line, sizeof line, "job %s: formed, 1 rank", child);
		CHECK(failed == 0 && th_log_count(&d, line, "") == 1,
		      "a job named with %d bytes: its child %s did not form (%d failed)", len,
		      child, failed);
		printf("%s: a job named with %d bytes: its child is %s (%zu bytes)\n",
		       check_failures ? "FAIL" : "ok", len, len == 245 ? "NAME/split.0.0" :
		       strchr(child, '~'), strlen(child));
	}
	test_agree(&d);
	failed = th_run_ranks(&d, "threads", 2, rank_threads, NULL);
	CHECK(failed == 0, "job threads: %d ranks failed", failed);
	report(C_THREADS, 2, "60 all-reduces on a child in its parent's memory, in one thread, "
	       "while another makes and frees a 70 MiB segment of the parent for each of its 60");
	for (size_t i = 0; i < sizeof jobs / sizeof jobs[0]; i++) {
		snprintf(line, sizeof line, "job %s: formed, %d rank%s", jobs[i].job, jobs[i].ranks,
			 jobs[i].ranks == 1 ? "" : "s");
		log_want(&d, 'A', line, "", 1);
	}
	/* the refused splits made no job */
	log_want(&d, 'A', "job sp/", ": created by uid", (int)(sizeof jobs / sizeof jobs[0]));
	printf("%s: job names sp/split.0.0, sp/split.0.1, sp/split.1.0 and "
	       "sp/split.0.{0,1}/split.0.{0,1} in commd's log (%.1f s)\n",
	       check_failures ? "FAIL" : "ok", th_secs_since(&t0));
	th_check_baseline(&d, fds0, "the splits of sp");
	CHECK(th_daemon_stop(&d) == 0, "commd did not stop cleanly");
}

static void test_two_daemons(void)
{
	static const int of[NN] = { 0, 0, 1, 1 };
	static const struct {
		const char *job;
		int nodes;
		int on_b; /* whether it has ranks on B */
	} jobs[] = {
		{ "nsp/split.0.0", 2, 1 },
		{ "nsp/split.0.1", 2, 1 },
		{ "nsp/split.1.0", 1, 0 },
		{ "nsp/split.1.1", 1, 1 },
	};
	struct th_daemon a, b;
	const struct th_daemon *ds[2] = { &a, &b };
	struct timespec t0;
	char line[256];
	int fds0a, fds0b, failed, before = check_failures;

	REQUIRE(th_daemon_start_peer(&a, "--threads", "2", NULL) == 0, "commd A did not start");
	REQUIRE(th_daemon_start_peer(&b, "--threads", "2", NULL) == 0, "commd B did not start");
	/* UCX's connections between A and B, kept from the first job over both */
	failed = th_run_ranks_nodes(ds, of, a.peer, "nsp-warm-up", NN, th_rank_sum, NULL);
	CHECK(failed == 0, "a first job over A and B: %d ranks failed", failed);
	fds0a = baseline(&a);
	fds0b = baseline(&b);
	clock_gettime(CLOCK_MONOTONIC, &t0);
	failed = th_run_ranks_nodes(ds, of, a.peer, "nsp", NN, rank_nsp, NULL);
	CHECK(failed == 0, "job nsp: %d of %d ranks failed", failed, NN);
	report(C_SPAN, NN, "nsp (A: 0 1; B: 2 3) by rank % 2: nsp/split.0.0 = 0 2, nsp/split.0.1 "
	       "= 1 3 over A and B, sums 4 and 6, nsp's 80 MiB in place");
	report(C_LOCAL, NN, "nsp by rank / 2, key -rank: nsp/split.1.0 = 1 0 on A, nsp/split.1.1 "
	       "= 3 2 on B, sums 3 and 7, nsp's 80 MiB in place");
	for (size_t i = 0; i < sizeof jobs / sizeof jobs[0]; i++) {
		snprintf(line, sizeof line, "job %s: formed by the root over %d node%s, 2 ranks",
			 jobs[i].job, jobs[i].nodes, jobs[i].nodes == 1 ? "" : "s");
		log_want(&a, 'A', line, "", 1);
		snprintf(line, sizeof line, "job %s: formed by root ", jobs[i].job);
		log_want(&b, 'B', line, a.peer, jobs[i].on_b);
	}
	log_want(&b, 'B', "formed by the root", "", 0);
	printf("%s: the children of nsp formed by nsp's root, A (%s) (%.1f s)\n",
	       check_failures > before ? "FAIL" : "ok", a.peer, th_secs_since(&t0));
	th_check_baseline(&a, fds0a, "the splits of nsp (A)");
	th_check_baseline(&b, fds0b, "the splits of nsp (B)");
	CHECK(th_daemon_stop(&a) == 0, "commd A did not stop cleanly");
	CHECK(th_daemon_stop(&b) == 0, "commd B did not stop cleanly");
}

int main(void)
{
	struct timespec t0;

	/* an op that cannot complete fails after a minute instead of ten */
	setenv("COMM_TIMEOUT", "60000", 1);
	/* a staging segment stays mapped after its op (big_check counts mappings) */
	setenv("COMM_KEEP_MB", "1024", 1);
	outcome = mmap(NULL, sizeof(int[NCASES][MAXN]), PROT_READ | PROT_WRITE,
		       MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	REQUIRE(outcome != MAP_FAILED, "mmap");
	clock_gettime(CLOCK_MONOTONIC, &t0);
	test_one_daemon();
	test_refused();
	test_quota();
	test_two_daemons();
	printf("%s: %.1f s in all\n", check_failures ? "FAIL" : "ok", th_secs_since(&t0));
	return CHECK_EXIT();
}
