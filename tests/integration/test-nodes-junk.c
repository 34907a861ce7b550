/*
 * test-nodes-junk.c: bad input at a daemon's peer listener, the TCP port
 * other daemons join jobs through. The test plays a broken or hostile
 * daemon against commd A: frames too long or that do not unpack, no hello
 * or two, a root's message sent to a root, half a frame, silence, a frame
 * dripped a byte at a time, joins with every field out of range, a wrong
 * token, more forming jobs than the root takes, and 200 such connections at
 * once. Each is dropped or answered with a PeerFail that names what was
 * wrong; A logs why, lists none of them as peers, serves a real job over A
 * and B all along (one runs during the flood), and is back to its fds.
 */
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "check.h"
#include "comm.h"
#include "commd.pb-c.h"
#include "harness.h"
#include "peerraw.h"

#include "nodes-seen.h"

#define DROP_MS 6000   /* a bad link is closed within this (the hello deadline is 3 s) */
#define FLOOD 200      /* connections at once */
#define FORMING_CAP 8  /* commd C's max-connections: the forming jobs a member may have */

static struct th_daemon da, db, dc; /* A, the root; B, a member; C, with a low cap */

/* Run a real job over A and B (ranks 0, 1 on A; 2, 3 on B, rooted at A); 0 when right. */
static int real_job(const char *job)
{
	static const int of[N] = { 0, 0, 1, 1 };
	const struct th_daemon *ds[2] = { &da, &db };

	return th_run_ranks_nodes(ds, of, da.peer, job, N, th_rank_sum, NULL);
}

/* A link to d's listener whose hello came, with ours sent; -1 on failure. */
static int hello_link(const struct th_daemon *d, const char *node)
{
	int fd = pr_connect(d->peer);

	if (fd < 0 || pr_hello(fd, PEER_VERSION, node, NULL, 0) < 0 || pr_sync(fd) < 0) {
		if (fd >= 0)
			close(fd);
		return -1;
	}
	return fd;
}

#define DROPPED "dropped before a hello was accepted" /* commd's log line */

/* Send raw bytes on a new link to A; check A drops it within DROP_MS, logging why. */
static void row_dropped(const char *what, const void *bytes, size_t len, const char *why)
{
	int fd = pr_connect(da.peer), before = th_log_count(&da, DROPPED, why);

	REQUIRE(fd >= 0, "%s: could not connect to commd A at %s", what, da.peer);
	if (len)
		pr_send_raw(fd, bytes, len);
	CHECK(pr_closed_within(fd, DROP_MS), "%s: commd A kept the link %d ms", what, DROP_MS);
	close(fd);
	for (int i = 0; i < 50 && th_log_count(&da, DROPPED, why) == before; i++)
		usleep(20000);
	CHECK(th_log_count(&da, DROPPED, why) == before + 1,
	      "%s: commd A did not log \"%s\"", what, why);
	printf("%s: %s: dropped, logged \"%s\"\n", check_failures ? "FAIL" : "ok", what, why);
}

/* A message after a hello that A must drop the link for, logging why. */
static void row_dropped_after_hello(const char *what, const Commpb__PeerMsg *m, const char *why)
{
	int fd = hello_link(&da, "junk-peer");

	REQUIRE(fd >= 0, "%s: no hello from commd A", what);
	pr_send(fd, m);
	CHECK(pr_closed_within(fd, DROP_MS), "%s: commd A kept the link", what);
	close(fd);
	usleep(200000);
	CHECK(th_log_count(&da, "junk-peer", why) >= 1, "%s: commd A did not log \"%s\"", what,
	      why);
	printf("%s: %s: dropped, logged \"%s\"\n", check_failures ? "FAIL" : "ok", what, why);
}

static void test_frames(void)
{
	static const uint8_t big[4] = { 0x01, 0x00, 0x10, 0x00 };  /* 1 MiB + 1 */
	static const uint8_t huge[4] = { 0xff, 0xff, 0xff, 0xff }; /* 4 GiB - 1 */
	static const uint8_t half[14] = { 100, 0, 0, 0, 0x0a, 0x04 };
	uint8_t junk[4 + 64];
	Commpb__PeerMsg m = COMMPB__PEER_MSG__INIT;
	Commpb__PeerLeave lv = COMMPB__PEER_LEAVE__INIT;
	Commpb__PeerFormed f = COMMPB__PEER_FORMED__INIT;
	Commpb__PeerHello h = COMMPB__PEER_HELLO__INIT;
	int fd;

	row_dropped("a length of 1 MiB + 1", big, sizeof big, "a frame of 1048577 bytes");
	row_dropped("a length of 2^32 - 1", huge, sizeof huge, "a frame of 4294967295 bytes");
	/* field 1 of wire type 7, which no protobuf has */
	junk[0] = 64;
	junk[1] = junk[2] = junk[3] = 0;
	memset(junk + 4, 0x0f, 64);
	row_dropped("64 bytes that are no PeerMsg", junk, sizeof junk, "does not unpack");
	row_dropped("half a frame, then silence", half, sizeof half, "silent for");
	row_dropped("silence", NULL, 0, "silent for");

	/* a frame a byte every 500 ms: no whole message, so no sign of life */
	REQUIRE((fd = pr_connect(da.peer)) >= 0, "drip: connect");
	{
		long t0 = mono_ms();
		int closed = 0;

		for (int i = 0; i < 20 && !closed; i++) {
			uint8_t b = i < 4 ? (i ? 0 : 200) : 0x0a;

			pr_send_raw(fd, &b, 1);
			closed = pr_closed_within(fd, 500);
		}
		CHECK(closed && mono_ms() - t0 <= DROP_MS,
		      "a byte every 500 ms: commd A kept the link %ld ms", mono_ms() - t0);
		printf("%s: a frame dripped a byte every 500 ms: dropped after %ld ms\n",
		       closed ? "ok" : "FAIL", mono_ms() - t0);
	}
	close(fd);

	lv.job = "junk";
	m.body_case = COMMPB__PEER_MSG__BODY_LEAVE;
	m.leave = &lv;
	REQUIRE((fd = pr_connect(da.peer)) >= 0, "no hello: connect");
	pr_send(fd, &m);
	CHECK(pr_closed_within(fd, DROP_MS), "a leave before any hello: commd A kept the link");
	close(fd);
	usleep(200000);
	CHECK(th_log_count(&da, DROPPED, "the first message was not a hello") == 1,
	      "a leave before any hello: not logged");
	printf("%s: a leave before any hello: dropped\n", check_failures ? "FAIL" : "ok");

	h.version = PEER_VERSION;
	h.node = "junk-peer";
	m.body_case = COMMPB__PEER_MSG__BODY_HELLO;
	m.hello = &h;
	row_dropped_after_hello("a second hello", &m, "a second hello");
	f.job = "junk";
	f.key = 1;
	m.body_case = COMMPB__PEER_MSG__BODY_FORMED;
	m.formed = &f;
	row_dropped_after_hello("a root's PeerFormed sent to a root", &m,
				"unexpected message 3 from a member");
}

/* Send a join for ranks[n] of job on fd, as the member's slot for it. */
static void send_join(int fd, const char *job, const char *token, int world,
		      const int32_t *ranks, size_t n, uint32_t slot)
{
	Commpb__PeerMsg m = COMMPB__PEER_MSG__INIT;
	Commpb__PeerJoin jn = COMMPB__PEER_JOIN__INIT;

	jn.job = (char *)job;
	jn.token.data = (uint8_t *)token;
	jn.token.len = strlen(token);
	jn.world_size = world;
	jn.timeout_ms = 60000;
	jn.ranks = (int32_t *)ranks;
	jn.n_ranks = n;
	jn.slot = slot;
	jn.uid = (uint32_t)getuid();
	m.body_case = COMMPB__PEER_MSG__BODY_JOIN;
	m.join = &jn;
	pr_send(fd, &m);
}

/* send_join; the PeerFail A answers with (NULL after 10 s), the caller frees. */
static Commpb__PeerMsg *join_answer(int fd, const char *job, const char *token, int world,
				    const int32_t *ranks, size_t n, uint32_t slot)
{
	Commpb__PeerMsg *in;
	int i;

	send_join(fd, job, token, world, ranks, n, slot);
	while ((in = pr_next(&fd, 1, &i, 10000)) && in->body_case != COMMPB__PEER_MSG__BODY_FAIL)
		commpb__peer_msg__free_unpacked(in, NULL);
	return in;
}

/* A join A must refuse with code and a detail holding want; the link stays up. */
static void row_join(int fd, const char *what, const char *job, const char *token, int world,
		     const int32_t *ranks, size_t n, comm_result_t code, const char *want)
{
	static uint32_t slot = 100;
	Commpb__PeerMsg *in = join_answer(fd, job, token, world, ranks, n, ++slot);
	int ok = in && in->fail->status == (int32_t)code && in->fail->slot == slot &&
		 strstr(in->fail->detail, want);

	printf("%s: %s: %s \"%s\"\n", ok ? "ok" : "FAIL", what,
	       in ? comm_result_name((comm_result_t)in->fail->status) : "no answer",
	       in ? in->fail->detail : "");
	CHECK(ok, "%s: want %s with \"%s\"", what, comm_result_name(code), want);
	if (in)
		commpb__peer_msg__free_unpacked(in, NULL);
	CHECK(pr_sync(fd) == 0, "%s: commd A dropped the link", what);
}

static void test_joins(void)
{
	static const int32_t r0[1] = { 0 }, r1[1] = { 1 }, r3[3] = { 0, 1, 2 };
	static const int32_t rneg[1] = { -1 }, rdup[2] = { 1, 1 }, rout[1] = { 2 };
	char name[300], token[300];
	int fd = hello_link(&da, "junk-joiner"), fd2;

	REQUIRE(fd >= 0, "joins: no hello from commd A");
	memset(name, 'j', 299);
	name[299] = '\0';
	memset(token, 't', 257);
	token[257] = '\0';
	row_join(fd, "a join with no job name", "", "t", 2, r0, 1, COMM_ERR_INVALID_ARG,
		 "a job name of 0 bytes");
	row_join(fd, "a job name of 299 bytes", name, "t", 2, r0, 1, COMM_ERR_INVALID_ARG,
		 "a job name of 299 bytes");
	row_join(fd, "world size 0", "jw", "t", 0, r0, 0, COMM_ERR_INVALID_ARG, "world size 0");
	row_join(fd, "world size 4097", "jw", "t", 4097, r0, 1, COMM_ERR_INVALID_ARG,
		 "world size 4097");
	row_join(fd, "a token of 257 bytes", "jw", token, 2, r0, 1, COMM_ERR_INVALID_ARG,
		 "a token of 257 bytes");
	row_join(fd, "3 ranks in a world of 2", "jw", "t", 2, r3, 3, COMM_ERR_INVALID_ARG,
		 "3 ranks in a world of 2");
	row_join(fd, "rank -1", "jneg", "t", 2, rneg, 1, COMM_ERR_INVALID_ARG, "sent rank -1");
	row_join(fd, "rank 2 of 2", "jout", "t", 2, rout, 1, COMM_ERR_INVALID_ARG, "sent rank 2");
	row_join(fd, "rank 1 twice", "jdup", "t", 2, rdup, 2, COMM_ERR_INVALID_ARG, "sent rank 1");

	/* a second node joins the forming job "jt" with another token, then another world */
	send_join(fd, "jt", "right", 2, r0, 1, 7);
	CHECK(pr_sync(fd) == 0, "jt: commd A dropped the first node");
	REQUIRE((fd2 = hello_link(&da, "junk-second")) >= 0, "jt: no hello for the second node");
	row_join(fd2, "a wrong token", "jt", "wrong", 2, r1, 1, COMM_ERR_PERMISSION,
		 "join: job jt: permission denied by the root daemon");
	row_join(fd2, "world size 3 for a job of 2", "jt", "right", 3, r1, 1, COMM_ERR_INVALID_ARG,
		 "job jt: world size 3 differs from the root's 2");
	close(fd2);
	close(fd);
	CHECK(th_daemon_alive(&da), "joins: commd A died");
}

/* C, with max-connections FORMING_CAP: a node may have that many jobs forming there. */
static void test_forming_cap(void)
{
	static const int32_t r0[1] = { 0 };
	char job[32];
	int fd = hello_link(&dc, "junk-many"), ok;
	Commpb__PeerMsg *in;

	REQUIRE(fd >= 0, "cap: no hello from commd C");
	for (int k = 0; k < FORMING_CAP; k++) {
		snprintf(job, sizeof job, "many-%d", k);
		send_join(fd, job, "", 2, r0, 1, (uint32_t)k + 1);
	}
	in = join_answer(fd, "many-last", "", 2, r0, 1, 99);
	ok = in && in->fail->status == COMM_ERR_NO_MEMORY &&
	     strstr(in->fail->detail, "has 8 jobs forming at the root already");
	printf("%s: job %d forming from one node (max-connections %d): %s \"%s\"\n",
	       ok ? "ok" : "FAIL", FORMING_CAP + 1, FORMING_CAP,
	       in ? comm_result_name((comm_result_t)in->fail->status) : "no answer",
	       in ? in->fail->detail : "");
	CHECK(ok, "cap: want NO_MEMORY past %d forming jobs", FORMING_CAP);
	if (in)
		commpb__peer_msg__free_unpacked(in, NULL);
	close(fd);
	/* the node is gone: its forming jobs with it */
	for (int i = 0; i < 100 && th_log_count(&dc, "no member left", "many-") < FORMING_CAP; i++)
		usleep(50000);
	CHECK(th_log_count(&dc, "no member left", "many-") == FORMING_CAP,
	      "cap: commd C did not forget the lost node's %d forming jobs", FORMING_CAP);
	CHECK(th_daemon_alive(&dc), "cap: commd C died");
}

/* FLOOD links at once, each silent or sending junk, while a real job runs over A and B. */
static void test_flood(void)
{
	static const uint8_t junk[8] = { 4, 0, 0, 0, 0x0f, 0x0f, 0x0f, 0x0f };
	int fds[FLOOD], opened = 0, closed = 0, job_rc;
	long t0 = mono_ms();
	pid_t pid;

	for (int i = 0; i < FLOOD; i++)
		if ((fds[i] = pr_connect(da.peer)) >= 0) {
			opened++;
			if (i % 2)
				pr_send_raw(fds[i], junk, sizeof junk);
		}
	fflush(stdout);
	pid = fork();
	REQUIRE(pid >= 0, "fork");
	if (pid == 0)
		_exit(real_job("junk-flood") ? 1 : 0);
	for (int i = 0; i < FLOOD; i++)
		if (fds[i] >= 0) {
			closed += pr_closed_within(fds[i], DROP_MS + 4000 - (int)(mono_ms() - t0));
			close(fds[i]);
		}
	REQUIRE(waitpid(pid, &job_rc, 0) == pid, "waitpid");
	CHECK(opened == FLOOD, "flood: %d of %d connections made", opened, FLOOD);
	CHECK(closed == opened, "flood: commd A closed %d of %d links within %d ms", closed, opened,
	      DROP_MS + 4000);
	CHECK(WIFEXITED(job_rc) && WEXITSTATUS(job_rc) == 0,
	      "flood: the real job over A and B failed during the flood");
	printf("%s: %d junk links at once: all closed in %ld ms; a job over A and B ran meanwhile\n",
	       check_failures ? "FAIL" : "ok", opened, mono_ms() - t0);
}

/* A's status lists B and no stranger; the junk-peer links that did say hello are lost. */
static void check_status(void)
{
	const char *bin = getenv("COMMCTL") ? getenv("COMMCTL") : "./client/commctl";
	char cmd[512], out[65536];
	size_t n;
	FILE *p;

	snprintf(cmd, sizeof cmd, "%s --socket %s status --json 2>&1", bin, da.sock);
	REQUIRE((p = popen(cmd, "r")), "popen");
	n = fread(out, 1, sizeof out - 1, p);
	out[n] = '\0';
	CHECK(pclose(p) == 0, "commctl status failed:\n%s", out);
	CHECK(!strstr(out, "\"node\": \"?\"") && strstr(out, "\"node\": \"junk-joiner\""),
	      "status on A lists a stranger, or not the junk peers that said hello:\n%s", out);
	printf("%s: status on A lists no connection that never said hello\n",
	       check_failures ? "FAIL" : "ok");
}

int main(void)
{
	struct timespec t0;
	int fds0;

	setenv("COMM_TIMEOUT", "60000", 1);
	clock_gettime(CLOCK_MONOTONIC, &t0);
	if (nodes_start(&da, &db) < 0)
		return CHECK_EXIT();
	REQUIRE(th_daemon_start_peer(&dc, "--max-connections", "8", NULL) == 0,
		"commd C did not start");
	CHECK(real_job("junk-before") == 0, "a job over A and B failed before any junk");
	fds0 = th_count_fds(da.pid);
	test_frames();
	test_joins();
	test_forming_cap();
	test_flood();
	CHECK(real_job("junk-after") == 0, "a job over A and B failed after the junk");
	check_status();
	th_check_baseline(&da, fds0, "the junk at its peer listener");
	CHECK(th_daemon_alive(&da) && th_daemon_alive(&db), "commd A or B died");
	CHECK(th_daemon_stop(&dc) == 0, "commd C did not stop cleanly");
	CHECK(th_daemon_stop(&db) == 0, "commd B did not stop cleanly");
	CHECK(th_daemon_stop(&da) == 0, "commd A did not stop cleanly");
	printf("%s: %.1f s in all\n", check_failures ? "FAIL" : "ok", th_secs_since(&t0));
	return CHECK_EXIT();
}
