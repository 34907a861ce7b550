/*
 * nodes-seen.h: for the two-daemon fault tests (test-nodes-faults.c,
 * test-nodes-stale.c): their two daemons, and what their ranks saw, shared
 * with the test process.
 */
#ifndef TESTS_NODES_SEEN_H
#define TESTS_NODES_SEEN_H

#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "check.h"
#include "comm.h"
#include "harness.h"

#define N 4                     /* ranks of the jobs over two daemons */
#define PROGRESS_LIMIT_MS 60000 /* for a job to make the progress a test waits for */

static inline long mono_ms(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

/* What each rank saw, shared between the ranks and the test. */
struct seen {
	long kill_ms;              /* when B was killed (0: not yet) */
	long start_ms[N];          /* first all-reduce posted */
	int iters[N];              /* all-reduces finished */
	int rc[N];                 /* the failed op's result (or comm_init's) */
	long err_ms[N];            /* when it failed */
	int done[N];               /* the rank is out of its loop */
	int injected;              /* H4: the stale messages were all taken in */
	char detail[N][200];
};

static inline struct seen *seen_new(void)
{
	struct seen *s = mmap(NULL, sizeof *s, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS,
			      -1, 0);

	REQUIRE(s != MAP_FAILED, "mmap");
	memset(s, 0, sizeof *s);
	return s;
}

static inline void seen_note(struct seen *s, int r, comm_result_t rc, const char *detail)
{
	s->rc[r] = rc;
	s->err_ms[r] = mono_ms();
	snprintf(s->detail[r], sizeof s->detail[r], "%s", detail);
	__atomic_store_n(&s->done[r], 1, __ATOMIC_RELEASE);
}

/*
 * Wait until every rank finished want all-reduces (or one gave up), then
 * until about half way through rank 0's next one: its time per op in ms,
 * or -1 when they made no such progress within PROGRESS_LIMIT_MS.
 */
static inline long seen_half_way(struct seen *s, int want)
{
	long t0 = mono_ms(), per_op;
	int ready = 0, it;

	while (!ready && mono_ms() - t0 < PROGRESS_LIMIT_MS) {
		ready = 1;
		for (int r = 0; r < N; r++) {
			if (__atomic_load_n(&s->done[r], __ATOMIC_ACQUIRE))
				return -1;
			ready &= __atomic_load_n(&s->iters[r], __ATOMIC_ACQUIRE) >= want;
		}
		usleep(2000);
	}
	if (!ready)
		return -1;
	it = __atomic_load_n(&s->iters[0], __ATOMIC_ACQUIRE);
	per_op = (mono_ms() - s->start_ms[0]) / (it ? it : 1);
	while (__atomic_load_n(&s->iters[0], __ATOMIC_ACQUIRE) == it &&
	       !__atomic_load_n(&s->done[0], __ATOMIC_ACQUIRE))
		usleep(500);
	usleep((useconds_t)(per_op / 2) * 1000);
	return per_op;
}

/* Start commd A and B, each with a peer listener; -1 (a failed check) if either did not. */
static inline int nodes_start(struct th_daemon *a, struct th_daemon *b)
{
	REQUIRE(th_daemon_start_peer(a, "--threads", "2", NULL) == 0,
		"commd A (with --peer-listen) did not start");
	if (th_daemon_start_peer(b, "--threads", "2", NULL) < 0) {
		CHECK(0, "commd B (with --peer-listen) did not start");
		th_daemon_stop(a);
		return -1;
	}
	return 0;
}

#endif
