/* rank.c: what a test's rank process does to join, leave or give up. */
#include <stdio.h>
#include <unistd.h>

#include "harness.h"

int th_join(comm_t **c, int r, int n)
{
	comm_result_t rc;

	alarm(TH_WATCHDOG_S);
	rc = comm_init(c, NULL);
	if (rc != COMM_OK) {
		fprintf(stderr, "rank %d: comm_init: %s: %s\n", r, comm_result_name(rc),
			comm_last_error(NULL));
		return -1;
	}
	if (comm_rank(*c) != r || comm_size(*c) != n) {
		fprintf(stderr, "rank %d: comm_rank %d, comm_size %d, expected %d of %d\n", r,
			comm_rank(*c), comm_size(*c), r, n);
		comm_abort(*c);
		return -1;
	}
	return 0;
}

int th_leave(comm_t *c, int r)
{
	comm_result_t rc = comm_finalize(c);

	if (rc != COMM_OK) {
		fprintf(stderr, "rank %d: comm_finalize: %s\n", r, comm_result_name(rc));
		return 1;
	}
	return 0;
}

int th_want_rc(comm_t *c, int r, const char *what, comm_result_t rc, comm_result_t want)
{
	if (rc == want)
		return 1;
	fprintf(stderr, "rank %d: %s: %s (%s), expected %s\n", r, what, comm_result_name(rc),
		c ? comm_last_error(c) : "", comm_result_name(want));
	return 0;
}

int th_bail(comm_t *c)
{
	comm_abort(c);
	return 1;
}

int th_rank_sum(int rank, int n, void *arg)
{
	comm_result_t rc;
	comm_t *c;
	int v = rank + 1;

	if (th_join(&c, rank, n) < 0)
		return 1;
	rc = comm_allreduce(c, &v, &v, 1, COMM_INT32, COMM_SUM, NULL);
	if (rc != COMM_OK || v != n * (n + 1) / 2) {
		fprintf(stderr, "rank %d: all-reduce of rank + 1: %s, %d (want %d)\n", rank,
			comm_result_name(rc), v, n * (n + 1) / 2);
		return th_bail(c);
	}
	return th_leave(c, rank);
}
