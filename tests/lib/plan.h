/*
 * plan.h: a list of test cases run by one job: every rank runs them in
 * order, and the test prints a line per case and a summary.
 */
#ifndef TESTS_PLAN_H
#define TESTS_PLAN_H

#include <stddef.h>
#include <stdint.h>

#include "harness.h"

/* Run one case on one rank: 0 right, 1 wrong (go on), -1 the op failed (stop). */
typedef int (*th_case_run)(comm_t *c, const void *tcase, uint32_t seed, int r, int n);
/* One line about a case, for a world of n ranks. */
typedef const char *(*th_case_describe)(const void *tcase, int n, char *buf, size_t len);

struct th_plan {
	const char *title;
	int world;
	char job[64];           /* the job's name */
	uint32_t seed;          /* case i runs with seed + i * seed_step */
	uint32_t seed_step;
	size_t case_size;
	th_case_run run;
	th_case_describe describe;
	/* a job over several daemons (th_ranks_start_nodes); ds NULL: all on one */
	const struct th_daemon *const *ds;
	const int *daemon_of_rank;
	const char *root;
	int n, cap;
	void *cases;
	int *failed;            /* ranks that found case i wrong (shared with the ranks) */
	int *ran;               /* ranks that finished case i */
};

/* A new zeroed case at the end of p (exits when out of memory). */
void *th_plan_add(struct th_plan *p);
/*
 * Run every case of p in one job of p->world ranks on d (or, with p->ds
 * set, over those daemons); print "ok/FAIL: case" lines and
 * "== title: ok, N cases, T s"; CHECK that nothing failed. Frees the cases
 * and leaves p zeroed but for what the caller set up to reuse.
 */
void th_plan_run(const struct th_daemon *d, struct th_plan *p);

#endif
