/*
 * test-faults.c: what happens when things go wrong: a rank killed mid-op or
 * before posting, ranks that disagree, bad joins, bad frames and bad fds,
 * and a daemon that dies. After each, the daemon serves a new job and its
 * fds and mappings are back to where they started.
 */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "check.h"
#include "comm.h"
#include "frame.h"
#include "harness.h"
#include "raw.h"

#define N 4

static struct th_daemon d;

/* Shared between the forked ranks and the test: when the victim died. */
static volatile long *kill_ms;

static long mono_ms(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

static comm_t *join(int rank)
{
	comm_t *c;
	comm_result_t rc = comm_init(&c, NULL);

	if (rc != COMM_OK) {
		fprintf(stderr, "rank %d: comm_init: %s: %s\n", rank, comm_strerror(rc),
			comm_last_error(NULL));
		return NULL;
	}
	return c;
}

/* Ranks 0..N-2 loop on all-reduces until one fails; rank N-1 dies. */
static int rank_killed(int rank, int n, void *arg)
{
	int before_post = *(int *)arg;
	size_t count = 1 << 20;
	float *buf;
	comm_t *c = join(rank);
	comm_result_t rc;
	long waited;

	if (!c)
		return 1;
	buf = comm_mem_alloc(c, count * sizeof *buf);
	if (!buf)
		return 1;
	for (size_t i = 0; i < count; i++)
		buf[i] = 1;
	if (rank == n - 1) {
		comm_request_t *req;

		if (before_post) {
			usleep(300 * 1000);
		} else {
			/* two ops: the victim dies with the second in flight */
			comm_allreduce(c, buf, buf, count, COMM_FLOAT32, COMM_SUM, NULL);
			comm_allreduce(c, buf, buf, count, COMM_FLOAT32, COMM_SUM, &req);
		}
		*kill_ms = mono_ms();
		raise(SIGKILL);
	}
	do
		rc = comm_allreduce(c, buf, buf, count, COMM_FLOAT32, COMM_SUM, NULL);
	while (rc == COMM_OK);
	waited = mono_ms() - *kill_ms;
	if (rc != COMM_ERR_PEER_LOST || !strstr(comm_last_error(c), "rank 3")) {
		fprintf(stderr, "rank %d: got %s (%s), want PEER_LOST naming rank 3\n", rank,
			comm_result_name(rc), comm_last_error(c));
		return 1;
	}
	if (waited > 2000) {
		fprintf(stderr, "rank %d: PEER_LOST came %ld ms after the kill\n", rank, waited);
		return 1;
	}
	/* the communicator stays failed: later ops fail at once */
	rc = comm_allreduce(c, buf, buf, 4, COMM_FLOAT32, COMM_SUM, NULL);
	if (rc != COMM_ERR_PEER_LOST) {
		fprintf(stderr, "rank %d: op after the failure: %s\n", rank, comm_result_name(rc));
		return 1;
	}
	comm_finalize(c);
	return 0;
}

/* A plain job: a few all-reduces with exact results. */
static int rank_ok(int rank, int n, void *arg)
{
	comm_t *c = join(rank);
	int32_t *v;

	if (!c)
		return 1;
	v = comm_mem_alloc(c, 1000 * sizeof *v);
	for (int it = 0; it < 5; it++) {
		for (int i = 0; i < 1000; i++)
			v[i] = rank * 1000 + i + it;
		if (comm_allreduce(c, v, v, 1000, COMM_INT32, COMM_SUM, NULL) != COMM_OK) {
			fprintf(stderr, "rank %d: %s\n", rank, comm_last_error(c));
			return 1;
		}
		for (int i = 0; i < 1000; i++) {
			int32_t want = 1000 * n * (n - 1) / 2 + n * (i + it);

			if (v[i] != want) {
				fprintf(stderr, "rank %d: v[%d] = %d, want %d\n", rank, i, v[i], want);
				return 1;
			}
		}
	}
	return comm_finalize(c) == COMM_OK ? 0 : 1;
}

/* Each of four ops disagrees in one field; the fifth agrees and works. */
static int rank_mismatch(int rank, int n, void *arg)
{
	static const char *const field[] = { "count", "type", "dtype", "redop" };
	comm_t *c = join(rank);
	float *a, *b;
	comm_result_t rc;

	if (!c)
		return 1;
	a = comm_mem_alloc(c, 64 * sizeof *a);
	b = comm_mem_alloc(c, 64 * sizeof *b);
	for (int k = 0; k < 4; k++) {
		int odd = rank == 2;

		switch (k) {
		case 0:
			rc = comm_allreduce(c, a, b, odd ? 8 : 4, COMM_FLOAT32, COMM_SUM, NULL);
			break;
		case 1:
			rc = odd ? comm_allgather(c, a, b, 4, COMM_FLOAT32, NULL)
				 : comm_allreduce(c, a, b, 4, COMM_FLOAT32, COMM_SUM, NULL);
			break;
		case 2:
			rc = comm_allreduce(c, a, b, 4, odd ? COMM_INT32 : COMM_FLOAT32, COMM_SUM,
					    NULL);
			break;
		default:
			rc = comm_allreduce(c, a, b, 4, COMM_FLOAT32, odd ? COMM_MAX : COMM_SUM,
					    NULL);
			break;
		}
		if (rc != COMM_ERR_MISMATCH || !strstr(comm_last_error(c), field[k])) {
			fprintf(stderr, "rank %d: op %d: got %s (%s), want MISMATCH on %s\n", rank,
				k + 1, comm_result_name(rc), comm_last_error(c), field[k]);
			return 1;
		}
	}
	for (int i = 0; i < 4; i++)
		a[i] = (float)(rank + i);
	rc = comm_allreduce(c, a, b, 4, COMM_FLOAT32, COMM_SUM, NULL);
	if (rc != COMM_OK || b[0] != 6 || b[3] != 18) {
		fprintf(stderr, "rank %d: op after mismatches: %s, b = %g..%g\n", rank,
			comm_result_name(rc), (double)b[0], (double)b[3]);
		return 1;
	}
	return comm_finalize(c) == COMM_OK ? 0 : 1;
}

/* Rank 0 posts one op more than the daemon keeps in flight per rank; rank 1 waits. */
#define OPS_CAP 65536

static int rank_flood(int rank, int n, void *arg)
{
	comm_request_t **reqs = calloc(OPS_CAP + 1, sizeof *reqs);
	comm_t *c = join(rank);
	comm_result_t rc;

	if (!c || !reqs)
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
	if (rc != COMM_ERR_NO_MEMORY || !strstr(comm_last_error(c), "in flight")) {
		fprintf(stderr, "rank 0: op %d: got %s (%s), want NO_MEMORY\n", OPS_CAP + 1,
			comm_result_name(rc), comm_last_error(c));
		return 1;
	}
	return 0;
}

/* Join with explicit settings; returns the result of comm_init (+ one op). */
static comm_result_t join_as(const char *job, const char *token, int rank, int world,
			     int timeout_ms)
{
	comm_config_t cfg = COMM_CONFIG_INIT;
	comm_t *c;
	comm_result_t rc;
	int v = 1;

	cfg.socket = d.sock;
	cfg.job = job;
	cfg.token = token;
	cfg.rank = rank;
	cfg.world_size = world;
	cfg.timeout_ms = timeout_ms;
	rc = comm_init(&c, &cfg);
	if (rc != COMM_OK)
		return rc;
	rc = comm_allreduce(c, &v, &v, 1, COMM_INT32, COMM_SUM, NULL);
	comm_finalize(c);
	return rc == COMM_OK && v == world ? COMM_OK : COMM_ERR_INTERNAL;
}

/* Fork join_as; the child's exit status is the result code. */
static pid_t spawn_join(const char *job, const char *token, int rank, int world, int timeout_ms)
{
	pid_t pid;

	fflush(NULL);
	pid = fork();
	if (pid == 0)
		_exit(join_as(job, token, rank, world, timeout_ms));
	return pid;
}

static int result_of(pid_t pid)
{
	int status;

	if (waitpid(pid, &status, 0) < 0 || !WIFEXITED(status))
		return -1;
	return WEXITSTATUS(status);
}

static void test_bad_joins(void)
{
	pid_t a, b, c;
	int ra, rb, rc;

	/* two processes claim rank 0: exactly one is refused */
	a = spawn_join("dup", "t", 0, 2, 0);
	b = spawn_join("dup", "t", 0, 2, 0);
	usleep(200 * 1000);
	c = spawn_join("dup", "t", 1, 2, 0);
	ra = result_of(a);
	rb = result_of(b);
	rc = result_of(c);
	CHECK((ra == COMM_OK && rb == COMM_ERR_INVALID_ARG) ||
		      (rb == COMM_OK && ra == COMM_ERR_INVALID_ARG),
	      "duplicate rank 0: results %d and %d", ra, rb);
	CHECK(rc == COMM_OK, "rank 1 of the job with a duplicate: %d", rc);

	/* wrong token: refused; the job forms with the right one */
	a = spawn_join("tok", "secret", 0, 2, 0);
	usleep(100 * 1000);
	CHECK(join_as("tok", "guess", 1, 2, 0) == COMM_ERR_PERMISSION, "wrong token accepted");
	b = spawn_join("tok", "secret", 1, 2, 0);
	CHECK(result_of(a) == COMM_OK && result_of(b) == COMM_OK, "job with the right token");

	/* world sizes disagree: refused; the forming job times out */
	a = spawn_join("world", "t", 0, 2, 800);
	usleep(100 * 1000);
	CHECK(join_as("world", "t", 1, 3, 800) == COMM_ERR_INVALID_ARG, "world 3 joined world 2");
	CHECK((ra = result_of(a)) == COMM_ERR_TIMEOUT, "lone rank of a forming job: %d", ra);

	/* rank out of range, and no daemon at all */
	CHECK(join_as("range", "t", 5, 4, 0) == COMM_ERR_INVALID_ARG, "rank 5 of 4 accepted");
	{
		comm_config_t cfg = COMM_CONFIG_INIT;
		comm_t *cm;

		cfg.socket = "/nonexistent/commd.sock";
		cfg.job = "x";
		cfg.rank = 0;
		cfg.world_size = 1;
		CHECK(comm_init(&cm, &cfg) == COMM_ERR_DAEMON_UNREACHABLE && cm == NULL,
		      "init against no daemon");
		CHECK(strstr(comm_last_error(NULL), "/nonexistent/commd.sock"),
		      "init error does not name the socket: %s", comm_last_error(NULL));
	}
	printf("ok: duplicate rank, wrong token, world size disagreement, no daemon\n");
}

static void test_protocol(void)
{
	struct frame_reader r;
	int fd, mfd, p[2];

	/* garbage where a frame should be */
	fd = raw_connect(d.sock);
	CHECK(write(fd, "\x05\x00\x00\x00garbage!", 12) == 12, "write");
	CHECK(raw_closed_by_daemon(fd), "garbage frame: connection kept");
	close(fd);

	/* length prefixes over the limit */
	{
		static const char *const lens[] = { "\x01\x00\x01\x00", "\xff\xff\xff\x7f",
						     "\xff\xff\xff\xff" };

		for (int i = 0; i < 3; i++) {
			fd = raw_connect(d.sock);
			CHECK(write(fd, lens[i], 4) == 4, "write");
			CHECK(raw_closed_by_daemon(fd), "length prefix %d: connection kept", i);
			close(fd);
		}
	}

	/* a request before hello */
	{
		Commpb__Envelope env = COMMPB__ENVELOPE__INIT, *reply;
		Commpb__StatusRequest sr = COMMPB__STATUS_REQUEST__INIT;

		fd = raw_connect(d.sock);
		frame_reader_init(&r);
		env.body_case = COMMPB__ENVELOPE__BODY_STATUS_REQUEST;
		env.status_request = &sr;
		raw_send(fd, &env, NULL, 0);
		reply = raw_recv(fd, &r);
		CHECK(reply && reply->body_case == COMMPB__ENVELOPE__BODY_ERROR &&
			      strstr(reply->error->detail, "before hello"),
		      "request before hello not refused");
		if (reply)
			commpb__envelope__free_unpacked(reply, NULL);
		CHECK(raw_closed_by_daemon(fd), "request before hello: connection kept");
		frame_reader_free(&r);
		close(fd);
	}

	/* versions the daemon does not speak */
	fd = raw_connect(d.sock);
	frame_reader_init(&r);
	raw_hello(fd, &r, "v", 100, 200, COMM_ERR_VERSION);
	CHECK(raw_closed_by_daemon(fd), "version error: connection kept");
	frame_reader_free(&r);
	close(fd);

	/* hello twice */
	fd = raw_connect(d.sock);
	frame_reader_init(&r);
	raw_hello(fd, &r, "twice", PROTO_VERSION_MIN, PROTO_VERSION, COMM_OK);
	{
		Commpb__Envelope env = COMMPB__ENVELOPE__INIT, *reply;
		Commpb__Hello h = COMMPB__HELLO__INIT;

		h.job = "twice";
		h.world_size = 1;
		env.body_case = COMMPB__ENVELOPE__BODY_HELLO;
		env.hello = &h;
		raw_send(fd, &env, NULL, 0);
		reply = raw_recv(fd, &r);
		CHECK(reply && reply->body_case == COMMPB__ENVELOPE__BODY_ERROR,
		      "second hello not refused");
		if (reply)
			commpb__envelope__free_unpacked(reply, NULL);
	}
	frame_reader_free(&r);
	close(fd);

	/* memory that is not a sealed, writable memfd */
	fd = raw_connect(d.sock);
	frame_reader_init(&r);
	raw_hello(fd, &r, "badmem", PROTO_VERSION_MIN, PROTO_VERSION, COMM_OK);
	mfd = memfd_create("unsealed", MFD_CLOEXEC);
	CHECK(ftruncate(mfd, 4096) == 0, "ftruncate");
	CHECK(raw_register_fd(fd, &r, mfd, 4096, NULL) == COMM_ERR_INVALID_ARG,
	      "unsealed memfd accepted");
	close(mfd);
	CHECK(pipe(p) == 0, "pipe");
	CHECK(raw_register_fd(fd, &r, p[0], 4096, NULL) == COMM_ERR_INVALID_ARG,
	      "pipe accepted");
	close(p[0]);
	close(p[1]);
	mfd = memfd_create("sealed", MFD_CLOEXEC | MFD_ALLOW_SEALING);
	CHECK(ftruncate(mfd, 4096) == 0 && fcntl(mfd, F_ADD_SEALS, F_SEAL_SHRINK) == 0, "seal");
	CHECK(raw_register_fd(fd, &r, mfd, 8192, NULL) == COMM_ERR_INVALID_ARG,
	      "size past the memfd");
	CHECK(raw_register_fd(fd, &r, mfd, 4096, NULL) == COMM_OK, "sealed memfd refused");
	close(mfd);
	mfd = open("/dev/null", O_RDONLY | O_CLOEXEC);
	CHECK(raw_register_fd(fd, &r, mfd, 4096, NULL) == COMM_ERR_INVALID_ARG,
	      "/dev/null accepted");
	close(mfd);
	mfd = memfd_create("readonly", MFD_CLOEXEC | MFD_ALLOW_SEALING);
	CHECK(ftruncate(mfd, 4096) == 0 &&
		      fcntl(mfd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_WRITE) == 0,
	      "seal");
	CHECK(raw_register_fd(fd, &r, mfd, 4096, NULL) == COMM_ERR_INVALID_ARG,
	      "write-sealed memfd accepted");
	close(mfd);
	/* a send refused for its dtype, with a peer far out of range: refused, no crash */
	{
		Commpb__Envelope env = COMMPB__ENVELOPE__INIT, *reply;
		Commpb__Op op = COMMPB__OP__INIT;

		op.seq = 1;
		op.type = COMMPB__OP_TYPE__OP_SEND;
		op.count = 1;
		op.dtype = 99;
		op.peer = 300000;
		env.body_case = COMMPB__ENVELOPE__BODY_OP;
		env.op = &op;
		raw_send(fd, &env, NULL, 0);
		reply = raw_recv(fd, &r);
		CHECK(reply && reply->body_case == COMMPB__ENVELOPE__BODY_OP_DONE &&
			      reply->op_done->status == COMM_ERR_INVALID_ARG,
		      "send with dtype 99 and peer 300000 not refused");
		if (reply)
			commpb__envelope__free_unpacked(reply, NULL);
	}
	/* an fd on a message that takes none */
	{
		Commpb__Envelope env = COMMPB__ENVELOPE__INIT;
		Commpb__FreeMem fm = COMMPB__FREE_MEM__INIT;

		CHECK(pipe(p) == 0, "pipe");
		fm.mem_id = 99;
		env.body_case = COMMPB__ENVELOPE__BODY_FREE_MEM;
		env.free_mem = &fm;
		raw_send(fd, &env, &p[0], 1);
		CHECK(raw_closed_by_daemon(fd), "fd on free_mem: connection kept");
		close(p[0]);
		close(p[1]);
	}
	frame_reader_free(&r);
	close(fd);
	printf("ok: garbage, oversized lengths, request before hello, version, hello twice, "
	       "bad memory fds, a bad peer, stray fds\n");
}


/*
 * A rank whose daemon is killed gets DAEMON_UNREACHABLE, not a hang; one
 * whose daemon is stopped (SIGTERM) gets COMM_ERR_SHUTDOWN.
 */
static int rank_daemon_dies(int rank, int n, void *arg)
{
	comm_result_t want = *(comm_result_t *)arg, rc;
	comm_t *c = join(rank);
	int v = 1;

	if (!c)
		return 1;
	if (rank == 1) {
		/* never posts; the test kills the daemon */
		pause();
		return 1;
	}
	rc = comm_allreduce(c, &v, &v, 1, COMM_INT32, COMM_SUM, NULL);
	if (rc != want) {
		fprintf(stderr, "rank 0: daemon gone: got %s (%s), want %s\n", comm_result_name(rc),
			comm_last_error(c), comm_result_name(want));
		return 1;
	}
	comm_finalize(c);
	return 0;
}

/*
 * SIGTERM drains: an all-reduce of 128 MiB a rank that both ranks posted
 * before the signal finishes, right, within the drain budget (20 s here;
 * first touches of fresh pages are slow on a VM); the next op is refused.
 */
#define DRAIN_COUNT (32u << 20)
static int drain_pipe[2];

static int rank_drain(int rank, int n, void *arg)
{
	comm_t *c = join(rank);
	comm_request_t *req;
	comm_result_t rc;
	float *v;
	int v2 = 1;

	if (!c || !(v = comm_mem_alloc(c, DRAIN_COUNT * sizeof *v)))
		return 1;
	for (size_t i = 0; i < DRAIN_COUNT; i++)
		v[i] = (float)(rank + 1);
	if (comm_allreduce(c, v, v, DRAIN_COUNT, COMM_FLOAT32, COMM_SUM, &req) != COMM_OK)
		return 1;
	usleep(50 * 1000); /* commd has it by now */
	if (write(drain_pipe[1], "x", 1) != 1)
		return 1;
	if ((rc = comm_wait(req, -1)) != COMM_OK) {
		fprintf(stderr, "rank %d: the op in flight at SIGTERM: %s (%s)\n", rank,
			comm_result_name(rc), comm_last_error(c));
		return 1;
	}
	for (size_t i = 0; i < DRAIN_COUNT; i += 4099)
		if (v[i] != 3.0f) {
			fprintf(stderr, "rank %d: element %zu is %g, want 3\n", rank, i, v[i]);
			return 1;
		}
	rc = comm_allreduce(c, &v2, &v2, 1, COMM_INT32, COMM_SUM, NULL);
	if (rc != COMM_ERR_SHUTDOWN && rc != COMM_ERR_DAEMON_UNREACHABLE) {
		fprintf(stderr, "rank %d: an op after SIGTERM: %s, want SHUTDOWN\n", rank,
			comm_result_name(rc));
		return 1;
	}
	return 0;
}

static void test_drain(void)
{
	struct th_daemon d3;
	struct th_ranks rs;
	char line[512], ch;
	int status, drained = 0;
	FILE *f;

	REQUIRE(pipe(drain_pipe) == 0, "pipe");
	REQUIRE(th_daemon_start(&d3, "--drain-timeout", "20000", NULL) == 0, "drain daemon");
	REQUIRE(th_ranks_start(&rs, &d3, "draining", 2, rank_drain, NULL) == 0, "ranks");
	for (int i = 0; i < 2; i++)
		REQUIRE(read(drain_pipe[0], &ch, 1) == 1, "rank %d did not post", i);
	kill(d3.pid, SIGTERM);
	CHECK(th_ranks_wait(&rs) == 0, "the op in flight at SIGTERM did not finish right");
	REQUIRE(waitpid(d3.pid, &status, 0) == d3.pid, "waitpid");
	CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0, "drained commd: status 0x%x", status);
	if ((f = fopen(d3.log, "r"))) {
		while (fgets(line, sizeof line, f))
			drained |= strstr(line, "drain: 2 ops in flight") != NULL;
		fclose(f);
	}
	CHECK(drained, "no 'drain: 2 ops in flight' in the log: SIGTERM came too late");
	if (!drained)
		th_daemon_dump_log(&d3);
	th_daemon_cleanup(&d3);
	close(drain_pipe[0]);
	close(drain_pipe[1]);
	printf("ok: SIGTERM with a 128 MiB all-reduce in flight: it finishes right, the next op "
	       "gets SHUTDOWN, exit 0\n");
}

static void test_daemon_killed(void)
{
	comm_result_t unreachable = COMM_ERR_DAEMON_UNREACHABLE, shutdown = COMM_ERR_SHUTDOWN;
	struct th_daemon d2;
	struct th_ranks rs;
	int status;

	/* SIGTERM: after the drain, the waiting rank is told the daemon is shutting down */
	REQUIRE(th_daemon_start(&d2, NULL) == 0, "third daemon");
	REQUIRE(th_ranks_start(&rs, &d2, "stopping", 2, rank_daemon_dies, &shutdown) == 0, "ranks");
	usleep(500 * 1000);
	CHECK(th_daemon_stop(&d2) == 0, "daemon with a job did not stop cleanly");
	kill(rs.pids[1], SIGKILL);
	CHECK(th_ranks_wait(&rs) == 1, "rank 0 did not hear of the shutdown");
	printf("ok: SIGTERM under a waiting rank: COMM_ERR_SHUTDOWN, exit 0\n");

	REQUIRE(th_daemon_start(&d2, NULL) == 0, "second daemon");
	REQUIRE(th_ranks_start(&rs, &d2, "orphans", 2, rank_daemon_dies, &unreachable) == 0,
		"ranks");
	usleep(500 * 1000);
	kill(d2.pid, SIGKILL);
	waitpid(d2.pid, &status, 0);
	kill(rs.pids[1], SIGKILL);
	CHECK(th_ranks_wait(&rs) == 1, "rank 0 did not see the daemon die");
	th_daemon_cleanup(&d2);
	printf("ok: daemon killed under a waiting rank\n");
}

int main(void)
{
	int fds0, before = 1, mid = 0;
	struct th_ranks rs, other;

	kill_ms = mmap(NULL, sizeof *kill_ms, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS,
		       -1, 0);
	REQUIRE(kill_ms != MAP_FAILED, "mmap");
	REQUIRE(th_daemon_start(&d, NULL) == 0, "daemon start");
	/*
	 * The baseline: after a first job (READY=1 races the daemon's close of
	 * its notify fd), once the daemon has dropped that job's memory (so
	 * its connections are closed too).
	 */
	CHECK(th_run_ranks(&d, "warm-up", 2, rank_ok, NULL) == 0, "warm-up job");
	for (int i = 0; i < 300 && th_count_memfd_maps(d.pid) != 0; i++)
		usleep(10 * 1000);
	fds0 = th_count_fds(d.pid);

	/* A1/A5: killed with an op in flight; a job beside it is untouched */
	REQUIRE(th_ranks_start(&other, &d, "bystander", 3, rank_ok, NULL) == 0, "bystander");
	REQUIRE(th_ranks_start(&rs, &d, "kill-mid-op", N, rank_killed, &mid) == 0, "ranks");
	CHECK(th_ranks_wait(&rs) == 1, "killed mid-op: survivors failed (see above)");
	CHECK(th_ranks_wait(&other) == 0, "bystander job failed");
	th_check_baseline(&d, fds0, "a rank killed mid-op");
	printf("ok: rank killed mid-op: PEER_LOST on the others, bystander job fine\n");

	/* A2: killed before posting, the others already waiting */
	REQUIRE(th_ranks_start(&rs, &d, "kill-before-post", N, rank_killed, &before) == 0, "ranks");
	CHECK(th_ranks_wait(&rs) == 1, "killed before posting: survivors failed (see above)");
	CHECK(th_run_ranks(&d, "after-kill", N, rank_ok, NULL) == 0, "new job after kills");
	th_check_baseline(&d, fds0, "a rank killed before posting");
	printf("ok: rank killed before posting: PEER_LOST at once; a new job runs\n");

	CHECK(th_run_ranks(&d, "mismatch", N, rank_mismatch, NULL) == 0, "mismatch");
	th_check_baseline(&d, fds0, "mismatches");
	printf("ok: count, type, dtype and redop mismatches reported to every rank\n");

	CHECK(th_run_ranks(&d, "flood", 2, rank_flood, NULL) == 0, "ops in flight cap");
	th_check_baseline(&d, fds0, "a flood of ops");
	printf("ok: a rank past %d ops in flight is cut off (NO_MEMORY); its peer gets PEER_LOST\n",
	       OPS_CAP);

	test_bad_joins();
	th_check_baseline(&d, fds0, "bad joins");
	test_protocol();
	th_check_baseline(&d, fds0, "bad frames");
	CHECK(th_daemon_alive(&d), "daemon died");
	CHECK(th_run_ranks(&d, "after-all", N, rank_ok, NULL) == 0, "job after everything");

	CHECK(th_daemon_stop(&d) == 0, "daemon stop");
	test_daemon_killed();
	test_drain();
	return CHECK_EXIT();
}
