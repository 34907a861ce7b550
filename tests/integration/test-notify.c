/*
 * test-notify.c: what commd tells its service manager, read on a fake
 * NOTIFY_SOCKET as systemd would. READY=1 comes with MAINPID and a STATUS=
 * naming the socket, once a client can be served at once; WATCHDOG=1 comes
 * twice per WATCHDOG_USEC; STATUS= follows the jobs and ranks as they come
 * and go; SIGHUP gives RELOADING=1 then READY=1; SIGTERM gives STOPPING=1
 * (with a draining STATUS=) only once the socket takes no one, and a
 * SIGHUP while draining is ignored, with no RELOADING=1. That the
 * pings stop when the loop stalls is RELIABILITY.md's G3 (tests/matrix).
 */
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "check.h"
#include "comm.h"
#include "harness.h"

static long now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000L + ts.tv_nsec / 1000000;
}

static int pings; /* WATCHDOG=1 messages seen by next_msg */

/*
 * Read messages for up to ms until one holds want (NULL: none does; read
 * the whole time); WATCHDOG=1 alone is counted in pings. The message, or
 * "" on timeout, in out.
 */
static int next_msg(int fd, const char *want, int ms, char *out, size_t outlen)
{
	long t0 = now_ms();
	char buf[1024];

	*out = '\0';
	for (long left; (left = ms - (now_ms() - t0)) > 0;) {
		struct pollfd p = { .fd = fd, .events = POLLIN };
		ssize_t n;

		if (poll(&p, 1, (int)left) <= 0)
			continue;
		if ((n = recv(fd, buf, sizeof buf - 1, 0)) <= 0)
			continue;
		buf[n] = '\0';
		if (!strcmp(buf, "WATCHDOG=1")) {
			pings++;
			continue;
		}
		snprintf(out, outlen, "%s", buf);
		if (want && strstr(buf, want))
			return 1;
	}
	return 0;
}

/* Whether a client can connect to the socket now. */
static int can_connect(const char *path)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0), ok;

	snprintf(sa.sun_path, sizeof sa.sun_path, "%s", path);
	ok = fd >= 0 && connect(fd, (struct sockaddr *)&sa, sizeof sa) == 0;
	if (fd >= 0)
		close(fd);
	return ok;
}

/* A rank that joins, then holds its place until the test closes the pipe. */
static int rank_hold(int rank, int n, void *arg)
{
	int *hold = arg;
	char c;
	comm_t *comm;

	close(hold[1]);
	if (comm_init(&comm, NULL) != COMM_OK) {
		fprintf(stderr, "rank %d: comm_init: %s\n", rank, comm_last_error(NULL));
		return 1;
	}
	while (read(hold[0], &c, 1) < 0 && errno == EINTR)
		;
	comm_finalize(comm);
	return 0;
}

/* Rank 0 posts an all-reduce that rank 1 (holding as rank_hold) never joins. */
static int rank_post_or_hold(int rank, int n, void *arg)
{
	int *hold = arg;
	float x[4] = { 1, 2, 3, 4 };
	comm_t *comm;

	if (rank == 1)
		return rank_hold(rank, n, arg);
	close(hold[1]);
	if (comm_init(&comm, NULL) != COMM_OK)
		return 1;
	comm_allreduce(comm, x, x, 4, COMM_FLOAT32, COMM_SUM, NULL);
	comm_finalize(comm);
	return 0;
}

int main(void)
{
	struct th_daemon d;
	struct th_ranks rs;
	char msg[1024], want[256];
	int hold[2];

	setenv("WATCHDOG_USEC", "400000", 1);
	unsetenv("WATCHDOG_PID");
	REQUIRE(th_daemon_start(&d, NULL) == 0, "daemon start");

	/* READY=1: with MAINPID and what it serves, and serving already */
	CHECK(can_connect(d.sock), "READY=1 said, but the socket takes no client");
	snprintf(want, sizeof want, "MAINPID=%d\n", (int)d.pid);
	CHECK(strstr(d.ready, want), "READY=1 without %s: '%s'", want, d.ready);
	snprintf(want, sizeof want, "STATUS=serving %s: host", d.sock);
	CHECK(strstr(d.ready, want), "READY=1 without '%s': '%s'", want, d.ready);
	CHECK(strstr(d.ready, "; 0 jobs, 0 ranks"), "READY=1's STATUS is not idle: '%s'", d.ready);
	printf("ok: READY=1: '%s'\n", strstr(d.ready, "STATUS="));

	/* WATCHDOG_USEC 400 ms: a ping every 200 ms (the tick is 100 ms) */
	pings = 0;
	next_msg(d.notify_fd, NULL, 1000, msg, sizeof msg);
	CHECK(pings >= 3 && pings <= 7, "%d WATCHDOG=1 in 1 s, want about 5", pings);
	CHECK(!*msg, "a message nothing caused: '%s'", msg);
	printf("ok: %d WATCHDOG=1 in 1 s under WATCHDOG_USEC=400000\n", pings);

	/* STATUS= follows the jobs */
	REQUIRE(pipe(hold) == 0, "pipe");
	REQUIRE(th_ranks_start(&rs, &d, "held", 2, rank_hold, hold) == 0, "ranks");
	CHECK(next_msg(d.notify_fd, "; 1 job, 2 ranks", 5000, msg, sizeof msg),
	      "no STATUS= with the job: last '%s'", msg);
	printf("ok: a 2-rank job: '%s'\n", msg);
	close(hold[1]);
	close(hold[0]);
	CHECK(th_ranks_wait(&rs) == 0, "the held ranks failed");
	CHECK(next_msg(d.notify_fd, "; 0 jobs, 0 ranks", 5000, msg, sizeof msg),
	      "no STATUS= once the job left: last '%s'", msg);
	printf("ok: the job gone: '%s'\n", msg);

	/* SIGHUP: RELOADING=1, then READY=1 again */
	kill(d.pid, SIGHUP);
	CHECK(next_msg(d.notify_fd, "RELOADING=1", 3000, msg, sizeof msg),
	      "no RELOADING=1 on SIGHUP: last '%s'", msg);
	CHECK(strstr(msg, "MONOTONIC_USEC="), "RELOADING=1 without MONOTONIC_USEC: '%s'", msg);
	CHECK(next_msg(d.notify_fd, "READY=1", 3000, msg, sizeof msg),
	      "no READY=1 after the reload: last '%s'", msg);
	CHECK(strstr(msg, "STATUS=serving "), "READY=1 after reload without STATUS=: '%s'", msg);
	printf("ok: SIGHUP: RELOADING=1, then '%s'\n", msg);

	/* SIGTERM: STOPPING=1 once no client can connect */
	kill(d.pid, SIGTERM);
	CHECK(next_msg(d.notify_fd, "STOPPING=1", 5000, msg, sizeof msg),
	      "no STOPPING=1 on SIGTERM: last '%s'", msg);
	CHECK(!can_connect(d.sock), "STOPPING=1 said, but the socket still takes clients");
	CHECK(strstr(msg, "STATUS=draining: 0 ops in flight"), "STOPPING=1's STATUS: '%s'", msg);
	printf("ok: SIGTERM: '%s'\n", msg);
	CHECK(th_daemon_stop(&d) == 0, "daemon stop");

	/* SIGHUP while draining an op in flight: ignored, no RELOADING=1 after STOPPING=1 */
	REQUIRE(th_daemon_start(&d, "--drain-timeout", "5000", NULL) == 0, "daemon start");
	REQUIRE(pipe(hold) == 0, "pipe");
	REQUIRE(th_ranks_start(&rs, &d, "drained", 2, rank_post_or_hold, hold) == 0, "ranks");
	close(hold[0]);
	CHECK(next_msg(d.notify_fd, "; 1 job, 2 ranks", 5000, msg, sizeof msg),
	      "no STATUS= with the job: last '%s'", msg);
	usleep(500000); /* rank 0's all-reduce posted */
	kill(d.pid, SIGTERM);
	CHECK(next_msg(d.notify_fd, "STOPPING=1", 5000, msg, sizeof msg),
	      "no STOPPING=1 on SIGTERM: last '%s'", msg);
	CHECK(strstr(msg, "STATUS=draining: 1 ops in flight"), "STOPPING=1's STATUS: '%s'", msg);
	kill(d.pid, SIGHUP);
	CHECK(!next_msg(d.notify_fd, "RELOADING=1", 1000, msg, sizeof msg),
	      "SIGHUP while draining: '%s'", msg);
	CHECK(th_log_count(&d, "reload: draining", "SIGHUP ignored") == 1,
	      "SIGHUP while draining: not said ignored in the log");
	printf("ok: SIGHUP while draining: ignored, no RELOADING=1\n");
	close(hold[1]);
	CHECK(th_daemon_stop(&d) == 0, "daemon stop");
	th_ranks_wait(&rs);
	return CHECK_EXIT();
}
