/* barrier.c: the barrier-that-holds check shared by test-p2p and test-nodes. */
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "barrier.h"
#include "comm.h"
#include "harness.h"

static int64_t now_ns(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

struct th_barrier *th_barrier_new(void)
{
	struct th_barrier *b = mmap(NULL, sizeof *b, PROT_READ | PROT_WRITE,
				    MAP_SHARED | MAP_ANONYMOUS, -1, 0);

	if (b == MAP_FAILED)
		return NULL;
	memset(b, 0, sizeof *b);
	return b;
}

void th_barrier_free(struct th_barrier *b)
{
	munmap(b, sizeof *b);
}

int th_barrier_rank(int r, int n, void *arg)
{
	struct th_barrier *b = arg;
	comm_result_t rc;
	comm_t *c;

	if (th_join(&c, r, n) < 0)
		return 1;
	for (int round = 0; round < TH_BARRIER_ROUNDS; round++) {
		comm_request_t *req = NULL;

		/* a different rank comes last each round */
		usleep((useconds_t)((r + round) % n) * 25000);
		b->enter[round][r] = now_ns();
		if (round % 2) {
			rc = comm_barrier(c, &req);
			if (rc == COMM_OK)
				rc = comm_wait(req, -1);
		} else {
			rc = comm_barrier(c, NULL);
		}
		if (rc != COMM_OK) {
			fprintf(stderr, "rank %d: barrier round %d: %s (%s)\n", r, round,
				comm_result_name(rc), comm_last_error(c));
			return th_bail(c);
		}
		b->leave[round][r] = now_ns();
	}
	return th_leave(c, r);
}

int th_barrier_early(const struct th_barrier *b, int n)
{
	int early = 0;

	for (int round = 0; round < TH_BARRIER_ROUNDS; round++) {
		int64_t last_in = 0;

		for (int r = 0; r < n; r++)
			last_in = b->enter[round][r] > last_in ? b->enter[round][r] : last_in;
		for (int r = 0; r < n; r++) {
			if (b->leave[round][r] && b->leave[round][r] < last_in) {
				fprintf(stderr,
					"barrier round %d: rank %d left %.3f ms before the last "
					"rank entered\n",
					round, r, (double)(last_in - b->leave[round][r]) / 1e6);
				early++;
			}
		}
	}
	return early;
}
