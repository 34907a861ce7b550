/*
 * test-limits.c: commd's limits, each set low by its flag, each refusal a
 * clear error to whoever passed it, and the daemon serving on: connections
 * in all and per uid, the handshake and partial-frame deadlines, and the
 * host memory one job may register.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "check.h"
#include "comm.h"
#include "harness.h"
#include "raw.h"

static struct th_daemon d;

/* The Error (or reply) commd sends on fd before closing it: its status and detail. */
static int error_of(int fd, char *detail, size_t len)
{
	struct frame_reader r;
	Commpb__Envelope *env;
	int status = -1;

	frame_reader_init(&r);
	detail[0] = 0;
	env = raw_recv(fd, &r);
	if (env && env->body_case == COMMPB__ENVELOPE__BODY_ERROR) {
		status = env->error->status;
		snprintf(detail, len, "%s", env->error->detail);
	}
	if (env)
		commpb__envelope__free_unpacked(env, NULL);
	frame_reader_free(&r);
	return status;
}

static void test_connections(void)
{
	int fds[3], fd;
	char detail[256];

	/* --max-connections-per-uid 3: a fourth of ours is refused, naming the limit */
	for (int i = 0; i < 3; i++)
		fds[i] = raw_connect(d.sock);
	usleep(100 * 1000);
	fd = raw_connect(d.sock);
	CHECK(error_of(fd, detail, sizeof detail) == COMM_ERR_BUSY &&
		      strstr(detail, "max-connections-per-uid"),
	      "a 4th connection of one uid: '%s'", detail);
	CHECK(raw_closed_by_daemon(fd), "the 4th connection was not closed");
	close(fd);
	printf("ok: max-connections-per-uid 3: the 4th is refused: %s\n", detail);
	for (int i = 0; i < 3; i++)
		close(fds[i]);
	usleep(200 * 1000);
	/* and the next ones are welcome again */
	fd = raw_connect(d.sock);
	{
		struct frame_reader r;

		frame_reader_init(&r);
		raw_hello(fd, &r, "limits-conn", 1, 3, COMM_OK);
		frame_reader_free(&r);
	}
	close(fd);
	printf("ok: once they close, a new connection is served\n");

	/* --max-connections 2 on another daemon: the 3rd is refused */
	{
		struct th_daemon d2;

		REQUIRE(th_daemon_start(&d2, "--max-connections", "2", NULL) == 0, "daemon 2");
		fds[0] = raw_connect(d2.sock);
		fds[1] = raw_connect(d2.sock);
		usleep(100 * 1000);
		fd = raw_connect(d2.sock);
		CHECK(error_of(fd, detail, sizeof detail) == COMM_ERR_BUSY &&
			      strstr(detail, "(max-connections)"),
		      "a 3rd connection: '%s'", detail);
		close(fd);
		close(fds[0]);
		close(fds[1]);
		CHECK(th_daemon_stop(&d2) == 0, "daemon 2 stop");
		printf("ok: max-connections 2: the 3rd is refused: %s\n", detail);
	}
}

static void test_deadlines(void)
{
	char detail[256];
	int fd;

	/* --handshake-timeout 400: a connection that says nothing */
	fd = raw_connect(d.sock);
	CHECK(error_of(fd, detail, sizeof detail) == COMM_ERR_TIMEOUT &&
		      strstr(detail, "handshake-timeout"),
	      "a silent connection: '%s'", detail);
	close(fd);
	printf("ok: a connection silent past the handshake deadline is closed: %s\n", detail);

	/* --frame-timeout 400: two bytes of a length, then nothing */
	fd = raw_connect(d.sock);
	{
		struct frame_reader r;

		frame_reader_init(&r);
		raw_hello(fd, &r, "limits-frame", 1, 3, COMM_OK);
		frame_reader_free(&r);
	}
	CHECK(write(fd, "\x10\x00", 2) == 2, "write");
	CHECK(error_of(fd, detail, sizeof detail) == COMM_ERR_TIMEOUT &&
		      strstr(detail, "frame-timeout"),
	      "half a frame: '%s'", detail);
	close(fd);
	printf("ok: half a message left past the frame deadline closes it: %s\n", detail);
}

/*
 * --max-job-memory 160M: libcomm registers a 64 MiB segment at the start; 48
 * MiB fit in it, 120 MiB more would be a second segment past the limit.
 */
static int rank_memory(int rank, int n, void *arg)
{
	comm_t *c;
	void *a, *b;

	if (th_join(&c, rank, n) < 0)
		return 1;
	a = comm_mem_alloc(c, 48u << 20);
	b = a ? comm_mem_alloc(c, 120u << 20) : NULL;
	if (!a || b) {
		fprintf(stderr, "rank %d: 48 MiB %s, then 120 MiB %s (want: yes, then refused)\n",
			rank, a ? "allocated" : "refused", b ? "allocated" : "refused");
		return 1;
	}
	if (!strstr(comm_last_error(c), "max-job-memory")) {
		fprintf(stderr, "rank %d: the refusal does not name the limit: %s\n", rank,
			comm_last_error(c));
		return 1;
	}
	printf("ok: max-job-memory 160M: 48 MiB, then 120 MiB more refused: %s\n",
	       comm_last_error(c));
	fflush(stdout);
	return th_leave(c, rank);
}

static int rank_ok(int rank, int n, void *arg)
{
	comm_t *c;
	int v = rank + 1;

	if (th_join(&c, rank, n) < 0)
		return 1;
	if (comm_allreduce(c, &v, &v, 1, COMM_INT32, COMM_SUM, NULL) != COMM_OK || v != 3) {
		fprintf(stderr, "rank %d: all-reduce after the refusals\n", rank);
		return th_bail(c);
	}
	return th_leave(c, rank);
}

int main(void)
{
	int fds0;

	REQUIRE(th_daemon_start(&d, "--max-connections-per-uid", "3", "--handshake-timeout",
				"400", "--frame-timeout", "400", "--max-job-memory", "160M",
				NULL) == 0,
		"daemon start");
	CHECK(th_run_ranks(&d, "warm-up", 2, rank_ok, NULL) == 0, "warm-up job");
	usleep(200 * 1000);
	fds0 = th_count_fds(d.pid);
	test_connections();
	test_deadlines();
	CHECK(th_run_ranks(&d, "limits-mem", 1, rank_memory, NULL) == 0, "memory limit");
	CHECK(th_run_ranks(&d, "after", 2, rank_ok, NULL) == 0, "a job after the refusals");
	printf("ok: a 2-rank job runs after every refusal\n");
	th_check_baseline(&d, fds0, "the refusals");
	CHECK(th_daemon_stop(&d) == 0, "daemon stop");
	return CHECK_EXIT();
}
