/* plan.c: run a list of test cases in one job and report each. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#include "check.h"
#include "plan.h"

void *th_plan_add(struct th_plan *p)
{
	void *slot;

	if (p->n == p->cap) {
		p->cap = p->cap ? 2 * p->cap : 64;
		p->cases = realloc(p->cases, (size_t)p->cap * p->case_size);
		REQUIRE(p->cases, "out of memory");
	}
	slot = (char *)p->cases + (size_t)p->n++ * p->case_size;
	memset(slot, 0, p->case_size);
	return slot;
}

static const void *plan_case(const struct th_plan *p, int i)
{
	return (const char *)p->cases + (size_t)i * p->case_size;
}

static int rank_plan(int r, int n, void *arg)
{
	const struct th_plan *p = arg;
	comm_t *c;
	int bad = 0;

	if (th_join(&c, r, n) < 0)
		return 1;
	for (int i = 0; i < p->n; i++) {
		int rc = p->run(c, plan_case(p, i), p->seed + (uint32_t)i * p->seed_step, r, n);

		if (rc)
			__atomic_fetch_add(&p->failed[i], 1, __ATOMIC_RELAXED);
		if (rc < 0)
			return th_bail(c); /* the others' ops fail too, rather than wait */
		__atomic_fetch_add(&p->ran[i], 1, __ATOMIC_RELAXED);
		bad |= rc;
	}
	return th_leave(c, r) | bad;
}

void th_plan_run(const struct th_daemon *d, struct th_plan *p)
{
	size_t bytes = 2 * (size_t)(p->n ? p->n : 1) * sizeof *p->failed;
	struct timespec t0;
	char what[200];
	int failed, nbad = 0;

	p->failed = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	REQUIRE(p->failed != MAP_FAILED, "mmap");
	p->ran = p->failed + (p->n ? p->n : 1);
	clock_gettime(CLOCK_MONOTONIC, &t0);
	if (p->ds)
		failed = th_run_ranks_nodes(p->ds, p->daemon_of_rank, p->root, p->job, p->world,
					    rank_plan, p);
	else
		failed = th_run_ranks(d, p->job, p->world, rank_plan, p);
	for (int i = 0; i < p->n; i++) {
		const char *st = p->failed[i] ? "FAIL" : p->ran[i] == p->world ? "ok" : "not run";

		nbad += p->failed[i] > 0;
		printf("%s: %s\n", st, p->describe(plan_case(p, i), p->world, what, sizeof what));
	}
	CHECK(failed == 0 && nbad == 0, "%s: %d of %d ranks failed, %d of %d cases wrong",
	      p->title, failed, p->world, nbad, p->n);
	printf("== %s: %s, %d cases, %.1f s\n", p->title, failed || nbad ? "FAIL" : "ok", p->n,
	       th_secs_since(&t0));
	fflush(stdout);
	munmap(p->failed, bytes);
	free(p->cases);
	p->cases = NULL;
	p->n = p->cap = 0;
}
