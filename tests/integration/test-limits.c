/*
 * test-limits.c: the limits that no row of the reliability matrix
 * (test-matrix-*) sets, each set low by its flag, each refusal a clear error
 * naming the key, and the daemon serving on: connections per uid, message
 * size, fds per message, ops in flight per rank, host memory registrations
 * per uid; and one connection's
 * pipelined requests served a few dozen a loop turn, others served between.
 */
#include <fcntl.h>
#include <grp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "check.h"
#include "comm.h"
#include "frame.h"
#include "harness.h"
#include "raw.h"

static struct th_daemon d;

static void test_connections(void)
{
	int fds[3], fd;
	char detail[256];

	/* --max-connections-per-uid 3: a fourth of ours is refused, naming the limit */
	for (int i = 0; i < 3; i++)
		fds[i] = raw_connect(d.sock);
	usleep(100 * 1000);
	fd = raw_connect(d.sock);
	CHECK(raw_error(fd, -1, detail, sizeof detail) == COMM_ERR_BUSY &&
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
}

/* A hello of `bytes` bytes (a long job name), sent raw; the Error's status and detail. */
static int big_hello(size_t bytes, char *detail, size_t len)
{
	Commpb__Envelope env = COMMPB__ENVELOPE__INIT;
	Commpb__Hello h = COMMPB__HELLO__INIT;
	char *name = malloc(bytes);
	int fd = raw_connect(d.sock), st;

	REQUIRE(name, "malloc");
	memset(name, 'x', bytes - 1);
	name[bytes - 1] = '\0';
	h.version_min = 1;
	h.version_max = 3;
	h.job = name;
	h.world_size = 1;
	env.body_case = COMMPB__ENVELOPE__BODY_HELLO;
	env.hello = &h;
	raw_send(fd, &env, NULL, 0);
	st = raw_error(fd, -1, detail, len);
	close(fd);
	free(name);
	return st;
}

/* --max-frame-size 4K: a 5000-byte message is refused before it is read, naming the key. */
static void test_frame_size(void)
{
	char detail[256];

	CHECK(big_hello(5000, detail, sizeof detail) == COMM_ERR_PROTOCOL &&
		      strstr(detail, "max-frame-size"),
	      "a 5000-byte hello: '%s'", detail);
	/* 3000 bytes pass the frame limit, and meet the job name's */
	CHECK(big_hello(3000, detail, sizeof detail) != COMM_ERR_PROTOCOL ||
		      !strstr(detail, "max-frame-size"),
	      "a 3000-byte hello refused for its size: '%s'", detail);
	printf("ok: max-frame-size 4K: a 5000-byte message is refused\n");
}

/* --max-fds-per-frame 1: a registration carrying two fds is a protocol error, both closed. */
static void test_fds_per_frame(void)
{
	Commpb__Envelope env = COMMPB__ENVELOPE__INIT;
	Commpb__RegisterMem rm = COMMPB__REGISTER_MEM__INIT;
	struct frame_reader r;
	char detail[256];
	int fd = raw_connect(d.sock), m[2];

	frame_reader_init(&r);
	raw_hello(fd, &r, "limits-fds", 1, 3, COMM_OK);
	frame_reader_free(&r);
	for (int i = 0; i < 2; i++)
		m[i] = raw_memfd(4096);
	rm.kind = COMMPB__MEM_KIND__MEM_MEMFD;
	rm.size = 4096;
	env.body_case = COMMPB__ENVELOPE__BODY_REGISTER_MEM;
	env.register_mem = &rm;
	raw_send(fd, &env, m, 2);
	CHECK(raw_error(fd, -1, detail, sizeof detail) == COMM_ERR_PROTOCOL &&
		      strstr(detail, "max-fds-per-frame"),
	      "two fds with max-fds-per-frame 1: '%s'", detail);
	close(fd);
	close(m[0]);
	close(m[1]);
	printf("ok: max-fds-per-frame 1: a message with two fds is refused\n");
}

/* --max-ops-per-rank 100: rank 0's 101st op in flight is refused; rank 1 hears PEER_LOST. */
#define OPS_CAP 100
static int rank_flood(int rank, int n, void *arg)
{
	comm_request_t *reqs[OPS_CAP + 1];
	comm_result_t rc;
	comm_t *c;

	if (th_join(&c, rank, n) < 0)
		return 1;
	if (rank == 1) {
		int v;

		/* a recv that rank 0 never matches: it waits until rank 0 is gone */
		rc = comm_recv(c, &v, 1, COMM_INT32, 0, NULL);
		if (rc != COMM_ERR_PEER_LOST) {
			fprintf(stderr, "rank 1: flooded peer: got %s, want PEER_LOST\n",
				comm_result_name(rc));
			return 1;
		}
		return 0;
	}
	for (int i = 0; i <= OPS_CAP; i++)
		if (comm_allreduce(c, NULL, NULL, 0, COMM_INT32, COMM_SUM, &reqs[i]) != COMM_OK)
			break;
	rc = comm_wait(reqs[OPS_CAP], -1);
	if (rc != COMM_ERR_NO_MEMORY || !strstr(comm_last_error(c), "max-ops-per-rank")) {
		fprintf(stderr, "rank 0: op %d: got %s (%s), want NO_MEMORY\n", OPS_CAP + 1,
			comm_result_name(rc), comm_last_error(c));
		return 1;
	}
	printf("ok: max-ops-per-rank %d: the next op is refused: %s\n", OPS_CAP,
	       comm_last_error(c));
	fflush(stdout);
	return 0;
}

#define MAPS_CAP 6

/* A sealed memfd of 4 KiB registered on fd: the status. */
static int reg4k(int fd, struct frame_reader *r)
{
	int mfd = raw_memfd(4096), st;

	st = raw_register_fd(fd, r, mfd, 4096, NULL);
	close(mfd);
	return st;
}

/*
 * --max-registrations-per-uid 6: one uid's registrations of host memory
 * over two connections (jobs) stop at 6, naming the key; another uid's go
 * on; closing a connection gives its registrations back.
 */
static void test_maps_per_uid(void)
{
	struct frame_reader ra, rb;
	int a, b, ok = 0, st, p[2];
	pid_t pid;

	a = raw_connect(d.sock);
	frame_reader_init(&ra);
	raw_hello(a, &ra, "maps-a", 1, PROTO_VERSION, COMM_OK);
	b = raw_connect(d.sock);
	frame_reader_init(&rb);
	raw_hello(b, &rb, "maps-b", 1, PROTO_VERSION, COMM_OK);
	for (int i = 0; i < 4; i++)
		ok += reg4k(a, &ra) == COMM_OK;
	for (int i = 0; i < 2; i++)
		ok += reg4k(b, &rb) == COMM_OK;
	CHECK(ok == MAPS_CAP, "%d of %d registrations under the cap", ok, MAPS_CAP);
	st = reg4k(b, &rb);
	CHECK(st == COMM_ERR_NO_MEMORY, "a 7th registration of one uid: %d", st);
	CHECK(th_log_count(&d, "max-registrations-per-uid", "uid 0") > 0,
	      "the refusal does not name max-registrations-per-uid");

	/* uid 65534 registers while root is at its cap */
	REQUIRE(pipe(p) == 0, "pipe");
	chmod(d.dir, 0755);
	pid = fork();
	REQUIRE(pid >= 0, "fork");
	if (pid == 0) {
		struct frame_reader rn;
		int n, rc = -1;

		if (setgroups(0, NULL) == 0 && setgid(65534) == 0 && setuid(65534) == 0) {
			n = raw_connect(d.sock);
			frame_reader_init(&rn);
			raw_hello(n, &rn, "maps-nobody", 1, PROTO_VERSION, COMM_OK);
			rc = reg4k(n, &rn);
		}
		_exit(write(p[1], &rc, sizeof rc) == sizeof rc ? 0 : 1);
	}
	close(p[1]);
	if (read(p[0], &st, sizeof st) != sizeof st)
		st = -1;
	close(p[0]);
	waitpid(pid, NULL, 0);
	CHECK(st == COMM_OK, "another uid's registration while root is at its cap: %d", st);

	close(a); /* its 4 go back */
	frame_reader_free(&ra);
	usleep(200 * 1000);
	st = reg4k(b, &rb);
	CHECK(st == COMM_OK, "a registration once another connection of the uid closed: %d", st);
	close(b);
	frame_reader_free(&rb);
	printf("%s: max-registrations-per-uid %d: the 7th of one uid refused over two "
	       "connections, another uid's served, and one after a connection closed\n",
	       check_failures ? "FAIL" : "ok", MAPS_CAP);
}

#define FAIR_OPS 6000

/* Ask for status on admin connection fd. */
static void ops_done_ask(int fd)
{
	Commpb__Envelope env = COMMPB__ENVELOPE__INIT;
	Commpb__StatusRequest sr = COMMPB__STATUS_REQUEST__INIT;

	env.body_case = COMMPB__ENVELOPE__BODY_STATUS_REQUEST;
	env.status_request = &sr;
	raw_send(fd, &env, NULL, 0);
}

/* The daemon's ops completed, from the status reply on fd. */
static uint64_t ops_done_reply(int fd, struct frame_reader *r)
{
	Commpb__Envelope *reply = raw_recv(fd, r);
	uint64_t n;

	REQUIRE(reply && reply->body_case == COMMPB__ENVELOPE__BODY_STATUS_REPLY, "status reply");
	n = reply->status_reply->ops_completed;
	commpb__envelope__free_unpacked(reply, NULL);
	return n;
}

/*
 * One connection's pipelined requests are served a few dozen a loop turn,
 * the rest in later turns, so others are served between: with commd
 * stopped, a rank queues FAIR_OPS barriers in one write and an admin
 * client a status request; once commd goes on, the status reply counts the
 * ops done before it: a turn's worth, not all of them (as when a
 * connection's whole buffer was served in one turn). Every barrier is then
 * answered, in order.
 */
static void test_fair_turns(void)
{
	Commpb__Envelope env = COMMPB__ENVELOPE__INIT, *reply;
	Commpb__Op op = COMMPB__OP__INIT;
	struct frame_reader hr, ar;
	uint8_t *burst = malloc(FAIR_OPS * 32), *f;
	uint64_t done0, before;
	size_t n = 0, len;
	int hog, admin, answered = 0;

	REQUIRE(burst, "out of memory");
	hog = raw_connect(d.sock);
	frame_reader_init(&hr);
	raw_hello(hog, &hr, "fair-hog", 1, PROTO_VERSION, COMM_OK);
	admin = raw_connect(d.sock);
	frame_reader_init(&ar);
	REQUIRE(raw_hello_admin(admin, &ar) == COMM_OK, "admin hello");
	ops_done_ask(admin);
	done0 = ops_done_reply(admin, &ar);

	op.type = COMMPB__OP_TYPE__OP_BARRIER;
	env.body_case = COMMPB__ENVELOPE__BODY_OP;
	env.op = &op;
	for (int i = 1; i <= FAIR_OPS; i++) {
		op.seq = (uint64_t)i;
		REQUIRE((len = frame_pack(&env, &f)) > 0 && n + len <= FAIR_OPS * 32, "pack");
		memcpy(burst + n, f, len);
		n += len;
		free(f);
	}
	REQUIRE(kill(d.pid, SIGSTOP) == 0, "SIGSTOP commd");
	REQUIRE(write(hog, burst, n) == (ssize_t)n, "the burst of %zu bytes in one write", n);
	ops_done_ask(admin);
	REQUIRE(kill(d.pid, SIGCONT) == 0, "SIGCONT commd");
	before = ops_done_reply(admin, &ar) - done0;
	for (int i = 1; i <= FAIR_OPS; i++) {
		reply = raw_recv(hog, &hr);
		if (!reply)
			break;
		if (reply->body_case == COMMPB__ENVELOPE__BODY_OP_DONE &&
		    reply->op_done->seq == (uint64_t)i && reply->op_done->status == COMM_OK)
			answered++;
		commpb__envelope__free_unpacked(reply, NULL);
	}
	CHECK(answered == FAIR_OPS, "%d of %d barriers answered in order", answered, FAIR_OPS);
	CHECK(before < FAIR_OPS / 4,
	      "a status request waited for %llu of one connection's %d queued barriers",
	      (unsigned long long)before, FAIR_OPS);
	printf("%s: %d barriers queued in one write: another client's request was served after "
	       "%llu of them\n",
	       check_failures ? "FAIL" : "ok", FAIR_OPS, (unsigned long long)before);
	close(hog);
	close(admin);
	frame_reader_free(&hr);
	frame_reader_free(&ar);
	free(burst);
}

int main(void)
{
	int fds0;

	REQUIRE(th_daemon_start(&d, "--max-connections-per-uid", "3", "--max-frame-size", "4K",
				"--max-fds-per-frame", "1", "--max-ops-per-rank", "100",
				"--max-registrations-per-uid", "6", NULL) == 0,
		"daemon start");
	CHECK(th_run_ranks(&d, "warm-up", 2, th_rank_sum, NULL) == 0, "warm-up job");
	usleep(200 * 1000);
	fds0 = th_count_fds(d.pid);
	test_connections();
	test_frame_size();
	test_fds_per_frame();
	test_fair_turns();
	test_maps_per_uid();
	CHECK(th_run_ranks(&d, "limits-ops", 2, rank_flood, NULL) == 0, "ops in flight cap");
	CHECK(th_run_ranks(&d, "after", 2, th_rank_sum, NULL) == 0, "a job after the refusals");
	printf("ok: a 2-rank job runs after every refusal\n");
	th_check_baseline(&d, fds0, "the refusals");
	CHECK(th_daemon_stop(&d) == 0, "daemon stop");
	return CHECK_EXIT();
}
