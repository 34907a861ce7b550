/*
 * test-ops.c: every op (all-reduce, reduce-scatter, all-gather, broadcast,
 * reduce, all-to-all) x all ten dtypes x every reduction through the real
 * commd on 2, 3, 4 and 8 ranks, checked against a reference of its own
 * (the cases, inputs and tolerances: tests/lib/opcase.c).
 */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "check.h"
#include "harness.h"
#include "opcase.h"
#include "plan.h"

static const struct oc_opts opts = { .big = OC_BIG };

/* Every op x dtype x redop at the small sizes: n=4, zero-copy, out of place. */
static void test_matrix(const struct th_daemon *d)
{
	struct th_plan p = { .title = "every op x dtype x redop, n=4, zero-copy", .world = 4 };

	oc_add_matrix(&p, &opts);
	oc_plan_run(d, &p, "ops");
}

/* Each op on n ranks, every reduction, up to the big count. */
static void test_world(const struct th_daemon *d, int n)
{
	struct th_plan p = { .world = n };
	char title[64];

	snprintf(title, sizeof title, "each op, n=%d", n);
	p.title = title;
	oc_add_world(&p, n, &opts);
	oc_plan_run(d, &p, "ops");
}

/* In place (every layout of comm.h) and staged, each op at 7 and the big count. */
static void test_place_mode(const struct th_daemon *d, int n)
{
	struct th_plan p = { .world = n };
	char title[64];

	snprintf(title, sizeof title, "in place and staged, n=%d", n);
	p.title = title;
	oc_add_place_mode(&p, n, &opts);
	oc_plan_run(d, &p, "ops");
}

int main(void)
{
	struct th_daemon d;
	struct timespec t0;
	int rc;

	/* an op that cannot complete fails after a minute instead of ten */
	setenv("COMM_TIMEOUT", "60000", 1);
	clock_gettime(CLOCK_MONOTONIC, &t0);
	rc = th_daemon_start(&d, "--threads", "3", NULL);
	REQUIRE(rc == 0, "commd did not start");
	test_matrix(&d);
	test_world(&d, 2);
	test_world(&d, 3);
	test_world(&d, 4);
	test_world(&d, 8);
	test_place_mode(&d, 4);
	test_place_mode(&d, 3);
	CHECK(th_daemon_alive(&d), "commd died during the tests");
	CHECK(th_daemon_stop(&d) == 0, "commd did not stop cleanly");
	printf("%s: %.1f s in all\n", check_failures ? "FAIL" : "ok", th_secs_since(&t0));
	return CHECK_EXIT();
}
