/*
 * test-ctl.c: commctl against a real daemon with a job running: status and
 * jobs, as text and JSON, and its errors; and a job that hangs, which
 * `commctl jobs JOB` explains: the op, the ranks that posted it, the rank
 * that never did; over two daemons, on the one whose ranks all posted it,
 * the node (and its ranks) it waits for. `commctl abort` fails a hung job,
 * forming or formed, on one daemon or over two, and no other job; who may,
 * and its errors. A daemon that does not answer (stopped, its backlog
 * full) costs commctl its --timeout, not for ever.
 */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "check.h"
#include "comm.h"
#include "harness.h"

static int hold[2], ready[2];

/* Join, do one all-reduce, tell the test, then wait until it lets go. */
static int rank_hold(int rank, int n, void *arg)
{
	comm_t *c;
	int v = rank + 1;
	char ch;

	close(hold[1]);
	close(ready[0]);
	if (comm_init(&c, NULL) != COMM_OK)
		return 1;
	if (comm_allreduce(c, &v, &v, 1, COMM_INT32, COMM_SUM, NULL) != COMM_OK || v != 3)
		return 1;
	if (write(ready[1], "x", 1) != 1)
		return 1;
	while (read(hold[0], &ch, 1) > 0)
		;
	return comm_finalize(c) == COMM_OK ? 0 : 1;
}

/*
 * hang-job: a hang to diagnose. Ranks 0 and 1 post an all-reduce of 1000
 * float32 that rank 2 holds back until go1; then rank 0 posts a send that
 * rank 1 does not receive until go2. Each phase is announced on hang_ready.
 */
static int hang_ready[2], go1[2], go2[2];

static int rank_hang(int rank, int n, void *arg)
{
	float *buf = calloc(1000, sizeof *buf);
	comm_request_t *req = NULL;
	char ch;
	comm_t *c;
	int rc = 0;

	if (!buf || comm_init(&c, NULL) != COMM_OK)
		return 1;
	if (rank < 2) {
		rc |= comm_allreduce(c, buf, buf, 1000, COMM_FLOAT32, COMM_SUM, &req) != COMM_OK;
		rc |= write(hang_ready[1], "x", 1) != 1;
		rc |= comm_wait(req, -1) != COMM_OK;
	} else {
		rc |= write(hang_ready[1], "x", 1) != 1;
		rc |= read(go1[0], &ch, 1) != 1;
		rc |= comm_allreduce(c, buf, buf, 1000, COMM_FLOAT32, COMM_SUM, NULL) != COMM_OK;
	}
	if (rank == 0) {
		rc |= comm_send(c, buf, 10, COMM_FLOAT32, 1, &req) != COMM_OK;
		rc |= write(hang_ready[1], "x", 1) != 1;
		rc |= comm_wait(req, -1) != COMM_OK;
	} else {
		rc |= write(hang_ready[1], "x", 1) != 1;
		if (rank == 1) {
			rc |= read(go2[0], &ch, 1) != 1;
			rc |= comm_recv(c, buf, 10, COMM_FLOAT32, 0, NULL) != COMM_OK;
		}
	}
	free(buf);
	return rc | (comm_finalize(c) != COMM_OK);
}

/* Run the shell command line cmd; returns its exit status, its stdout in out. */
static int sh(char *out, size_t len, const char *cmd)
{
	FILE *p;
	size_t n;
	int status;

	p = popen(cmd, "r");
	if (!p)
		return -1;
	n = fread(out, 1, len - 1, p);
	out[n] = '\0';
	status = pclose(p);
	return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

static const char *ctl_bin(void)
{
	return getenv("COMMCTL") ? getenv("COMMCTL") : "./client/commctl";
}

/* Run commctl with args; returns its exit status, output in out. */
static int ctl(char *out, size_t len, const char *args)
{
	char cmd[1024];

	snprintf(cmd, sizeof cmd, "%s %s 2>&1", ctl_bin(), args);
	return sh(out, len, cmd);
}

/* Run commctl with args, its stdout on /dev/full; returns its exit status, stderr in out. */
static int ctl_full(char *out, size_t len, const char *args)
{
	char cmd[1024];

	snprintf(cmd, sizeof cmd, "%s %s 2>&1 >/dev/full", ctl_bin(), args);
	return sh(out, len, cmd);
}

/* commctl as uid 65534 (nobody) with the gid REGID names: setpriv --clear-groups. */
static int ctl_as(char *out, size_t len, const char *regid, const char *args)
{
	char cmd[1024];

	snprintf(cmd, sizeof cmd, "setpriv --reuid=65534 %s --clear-groups %s %s 2>&1", regid,
		 ctl_bin(), args);
	return sh(out, len, cmd);
}

#define ABORT_REASON "stuck since noon"
#define ABORT_SAYS "aborted by the operator (uid 0, commctl abort): " ABORT_REASON

/*
 * A hung job for commctl abort: every rank but the last posts an
 * all-reduce that the last holds back until abort_go; each says it joined
 * on abort_ready. Every all-reduce, those waiting and the late one, must
 * fail with COMM_ERR_ABORTED and the operator's words.
 */
static int abort_ready[2], abort_go[2];

static int rank_aborted(int rank, int n, void *arg)
{
	int32_t v = rank;
	comm_t *c;
	char ch;
	int rc = 0;

	(void)arg;
	if (th_join(&c, rank, n) < 0)
		return 1;
	rc |= write(abort_ready[1], "x", 1) != 1;
	if (rank == n - 1)
		rc |= read(abort_go[0], &ch, 1) != 1;
	rc |= !th_want_rc(c, rank, "all-reduce of an aborted job",
			  comm_allreduce(c, &v, &v, 1, COMM_INT32, COMM_SUM, NULL),
			  COMM_ERR_ABORTED);
	if (!strstr(comm_last_error(c), ABORT_SAYS)) {
		fprintf(stderr, "rank %d: the abort does not say who and why: %s\n", rank,
			comm_last_error(c));
		rc = 1;
	}
	return rc | th_leave(c, rank);
}

/* Rank 0 of 2 of a job that never forms: its join fails with the operator's words. */
static int rank_abort_forming(int rank, int n, void *arg)
{
	comm_config_t cfg = COMM_CONFIG_INIT;
	comm_t *c;
	int rc;

	(void)arg;
	cfg.world_size = n + 1;
	rc = write(abort_ready[1], "x", 1) != 1;
	if (!th_want_rc(NULL, rank, "join of an aborted job", comm_init(&c, &cfg),
			COMM_ERR_ABORTED))
		return 1;
	if (!strstr(comm_last_error(NULL), ABORT_SAYS)) {
		fprintf(stderr, "join: the abort does not say who and why: %s\n",
			comm_last_error(NULL));
		rc = 1;
	}
	return rc;
}

/* Poll `args` (a commctl command line) until its output holds want; 1 when it did. */
static int ctl_until(char *out, size_t len, const char *args, const char *want)
{
	for (int i = 0; i < 200; i++) {
		if (ctl(out, len, args) == 0 && strstr(out, want))
			return 1;
		usleep(25 * 1000);
	}
	return 0;
}

/*
 * commctl abort on d: a forming job, a hung one (and not ctl-job, which
 * the other ranks hold), then who may and the errors.
 */
/* commctl's usage errors around abort: arguments after --socket, exit status, what it says */
static const struct {
	const char *args;
	int rc;
	const char *says;
} usage_errors[] = {
	{ "abort", 2, "which JOB" },
	{ "abort no-such-job", 1, "no job named no-such-job" },
	{ "abort ctl-job --uid root", 2, "--uid wants a number" },
	{ "abort -- -x", 1, "no job named -x" },
	{ "status --reason x", 2, "--reason is an option of abort only" },
	{ "--uid 0 jobs", 2, "--uid is an option of abort only" },
	{ "jobs --uid 0", 2, "--uid is an option of abort only" },
};

static void test_abort(const struct th_daemon *d)
{
	struct th_ranks rs;
	char out[8192], args[512], ch;

	REQUIRE(pipe(abort_ready) == 0 && pipe(abort_go) == 0, "pipes");
	/* forming: 1 of 2 ranks joined */
	REQUIRE(th_ranks_start(&rs, d, "abort-forming", 1, rank_abort_forming, NULL) == 0,
		"forming rank");
	REQUIRE(read(abort_ready[0], &ch, 1) == 1, "forming rank not ready");
	snprintf(args, sizeof args, "--socket %s jobs abort-forming", d->sock);
	CHECK(ctl_until(out, sizeof out, args, "forming"), "abort-forming never shows:\n%s", out);
	snprintf(args, sizeof args, "--socket %s abort abort-forming --reason '" ABORT_REASON "'",
		 d->sock);
	CHECK(ctl(out, sizeof out, args) == 0 && strstr(out, "forming): aborted"),
	      "abort of a forming job: %s", out);
	CHECK(th_ranks_wait(&rs) == 0, "the forming job's rank did not fail as it should");

	/* formed, ranks 0-1 waiting in an all-reduce for rank 2 */
	REQUIRE(th_ranks_start(&rs, d, "abort-job", 3, rank_aborted, NULL) == 0, "abort ranks");
	for (int i = 0; i < 3; i++)
		REQUIRE(read(abort_ready[0], &ch, 1) == 1, "abort rank %d not ready", i);
	snprintf(args, sizeof args, "--socket %s jobs abort-job", d->sock);
	CHECK(ctl_until(out, sizeof out, args, "waiting for rank 2"),
	      "the all-reduce never waits for rank 2:\n%s", out);
	if (system("setpriv --reuid=65534 --regid=65534 --clear-groups true 2>/dev/null") == 0) {
		snprintf(args, sizeof args, "--socket %s abort abort-job", d->sock);
		CHECK(ctl_as(out, sizeof out, "--regid=65534", args) == 1 &&
			      strstr(out, "COMM_ERR_NOT_FOUND: abort: no job named abort-job"),
		      "uid 65534 aborts root's job: %s", out);
	}
	snprintf(args, sizeof args, "--uid 65534 --socket %s abort abort-job", d->sock);
	CHECK(ctl(out, sizeof out, args) == 1 && strstr(out, "no job named abort-job of that uid"),
	      "abort of another uid's job of that name: %s", out);
	snprintf(args, sizeof args, "--socket %s jobs abort-job", d->sock);
	CHECK(ctl(out, sizeof out, args) == 0 && strstr(out, "waiting for rank 2"),
	      "a refused abort touched the job:\n%s", out);
	/* options before the command, as after it */
	snprintf(args, sizeof args, "--socket %s --uid=0 --reason '" ABORT_REASON "' abort abort-job",
		 d->sock);
	CHECK(ctl(out, sizeof out, args) == 0 &&
		      strstr(out, "job abort-job (uid 0, 3 ranks, ready): aborted"),
	      "abort: %s", out);
	snprintf(args, sizeof args, "--socket %s abort abort-job --json", d->sock);
	CHECK(ctl(out, sizeof out, args) == 0 && strstr(out, "\"already_failed\": true") &&
		      strstr(out, "had already failed: COMM_ERR_ABORTED: " ABORT_SAYS),
	      "a second abort: %s", out);
	snprintf(args, sizeof args, "--socket %s abort abort-job", d->sock);
	CHECK(ctl_full(out, sizeof out, args) == 1 && strstr(out, "No space left on device"),
	      "abort's answer to a full disk: %s", out);
	CHECK(write(abort_go[1], "x", 1) == 1, "abort_go");
	CHECK(th_ranks_wait(&rs) == 0, "a rank of the aborted job did not see the abort");

	/* the other jobs go on */
	snprintf(args, sizeof args, "--socket %s jobs ctl-job", d->sock);
	CHECK(ctl(out, sizeof out, args) == 0 && strstr(out, "ready"), "ctl-job:\n%s", out);
	CHECK(th_run_ranks(d, "after-abort", 2, th_rank_sum, NULL) == 0,
	      "a job after the abort failed");

	/* errors: the arguments after --socket, the exit status, what the output holds */
	for (size_t i = 0; i < sizeof usage_errors / sizeof usage_errors[0]; i++) {
		snprintf(args, sizeof args, "--socket %s %s", d->sock, usage_errors[i].args);
		CHECK(ctl(out, sizeof out, args) == usage_errors[i].rc &&
			      strstr(out, usage_errors[i].says),
		      "commctl %s: %s", usage_errors[i].args, out);
	}
	printf("ok: commctl abort, forming and formed, and its errors\n");
}

/*
 * span-job over commd A and B, ranks 0-1 on A and 2-3 on B: rank 3 holds
 * back an all-reduce of 1000 int32 until span_go; each rank checks the sum.
 */
static int span_ready[2], span_go[2];

static int rank_span(int rank, int n, void *arg)
{
	int32_t buf[1000];
	char ch;
	comm_t *c;
	int rc = 0;

	(void)arg;
	for (int i = 0; i < 1000; i++)
		buf[i] = rank * 1000 + i;
	if (comm_init(&c, NULL) != COMM_OK)
		return 1;
	rc |= write(span_ready[1], "x", 1) != 1;
	if (rank == 3)
		rc |= read(span_go[0], &ch, 1) != 1;
	rc |= comm_allreduce(c, buf, buf, 1000, COMM_INT32, COMM_SUM, NULL) != COMM_OK;
	for (int i = 0; i < 1000; i++)
		rc |= buf[i] != 1000 * (0 + 1 + 2 + 3) + n * i;
	return rc | (comm_finalize(c) != COMM_OK);
}

static void test_span(void)
{
	static const int of[4] = { 0, 0, 1, 1 };
	struct th_daemon a, b;
	const struct th_daemon *ds[2] = { &a, &b };
	struct th_ranks rs;
	char out[8192], args[512], want[160], ch;
	int seen;

	REQUIRE(th_daemon_start_peer(&a, NULL) == 0 && th_daemon_start_peer(&b, NULL) == 0,
		"span: commd A and B did not start");
	REQUIRE(pipe(span_ready) == 0 && pipe(span_go) == 0, "pipes");
	REQUIRE(th_ranks_start_nodes(&rs, ds, of, a.peer, "span-job", 4, rank_span, NULL) == 0,
		"span ranks");
	for (int i = 0; i < 4; i++)
		REQUIRE(read(span_ready[0], &ch, 1) == 1, "span rank %d not ready", i);
	/* B's node name is HOST:PORT, its listener's port */
	snprintf(want, sizeof want, ":%s (ranks 2-3) to post it", strrchr(b.peer, ':') + 1);
	snprintf(args, sizeof args, "--socket %s jobs span-job", a.sock);
	seen = ctl_until(out, sizeof out, args, want);
	printf("%s", out);
	CHECK(seen && strstr(out, "across daemons: waiting for node ") && strstr(out, " 0-1 "),
	      "on A, the all-reduce does not say it waits for node B (\"%s\"):\n%s", want, out);
	/* rank 2 said it is ready just before it posted: B may not have it yet */
	snprintf(args, sizeof args, "--socket %s jobs span-job", b.sock);
	CHECK(ctl_until(out, sizeof out, args, "waiting for rank 3"),
	      "on B, the all-reduce does not wait for rank 3:\n%s", out);
	printf("%s", out);
	CHECK(write(span_go[1], "x", 1) == 1, "span_go");
	CHECK(th_ranks_wait(&rs) == 0, "span ranks failed");

	/* commctl abort on B reaches the ranks on A, through the root */
	REQUIRE(th_ranks_start_nodes(&rs, ds, of, a.peer, "span-abort", 4, rank_aborted, NULL) == 0,
		"span-abort ranks");
	for (int i = 0; i < 4; i++)
		REQUIRE(read(abort_ready[0], &ch, 1) == 1, "span-abort rank %d not ready", i);
	snprintf(args, sizeof args, "--socket %s jobs span-abort", b.sock);
	CHECK(ctl_until(out, sizeof out, args, "waiting for rank 3"),
	      "on B, the all-reduce never waits for rank 3:\n%s", out);
	snprintf(args, sizeof args, "--socket %s abort span-abort --reason '" ABORT_REASON "'",
		 b.sock);
	CHECK(ctl(out, sizeof out, args) == 0 && strstr(out, "span-abort (uid 0, 4 ranks"),
	      "abort on B: %s", out);
	CHECK(write(abort_go[1], "x", 1) == 1, "abort_go");
	CHECK(th_ranks_wait(&rs) == 0, "a rank of span-abort did not see the abort");
	printf("ok: commctl abort on one daemon fails the job's ranks on both\n");
	CHECK(th_daemon_stop(&b) == 0 && th_daemon_stop(&a) == 0, "span: a daemon did not stop");
}

/*
 * Whether every line of a `commctl jobs` table (from its JOB header on)
 * has its UID column end where the header's does: a long name widens the
 * JOB column for all.
 */
static int jobs_aligned(const char *out)
{
	const char *head = strstr(out, "JOB "), *l;
	long end;

	if (!head || !strstr(head, "UID"))
		return 0;
	end = strstr(head, "UID") - head + 3;
	for (l = strchr(head, '\n'); l && l[1] && l[1] != '\n'; l = strchr(l + 1, '\n')) {
		const char *p = l + 1;

		while (*p && *p != ' ')
			p++;
		while (*p == ' ')
			p++;
		while (*p >= '0' && *p <= '9')
			p++;
		if (p - (l + 1) != end)
			return 0;
	}
	return 1;
}

static double now_s(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

/* ctl, and how long it took in *secs. */
static int ctl_timed(char *out, size_t len, const char *args, double *secs)
{
	double t0 = now_s();
	int rc = ctl(out, len, args);

	*secs = now_s() - t0;
	return rc;
}

/* A socket at path that listens (with that backlog) and never accepts; its fd. */
static int silent_listener(const char *path, int backlog)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	int fd;

	REQUIRE(snprintf(sa.sun_path, sizeof sa.sun_path, "%s", path) < (int)sizeof sa.sun_path,
		"socket path too long");
	fd = socket(AF_UNIX, SOCK_STREAM, 0);
	REQUIRE(fd >= 0 && bind(fd, (struct sockaddr *)&sa, sizeof sa) == 0 && listen(fd, backlog) == 0,
		"listener %s: %s", path, strerror(errno));
	return fd;
}

/*
 * A daemon that never answers: d stopped (SIGSTOP), then a listener of the
 * test's own whose backlog is full, so that connect itself waits. commctl
 * gives up after --timeout (10 s by default), naming the socket, exit 1.
 */
static void test_timeout(const struct th_daemon *d)
{
	static const char *const bad[] = { "x", "-1", "1s", "", "nan", "86401" };
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	char out[8192], args[512];
	int lfd, cfd[8], ncfd = 0;
	double secs;

	REQUIRE(kill(d->pid, SIGSTOP) == 0, "SIGSTOP");
	snprintf(args, sizeof args, "--timeout 1 --socket %s status", d->sock);
	CHECK(ctl_timed(out, sizeof out, args, &secs) == 1 && strstr(out, d->sock) &&
		      strstr(out, "commd did not answer within 1 s") && secs >= 0.9 && secs < 5,
	      "status of a stopped daemon, --timeout 1 (%.1f s): %s", secs, out);
	snprintf(args, sizeof args, "--socket %s jobs ctl-job --timeout=0.5 --json", d->sock);
	CHECK(ctl_timed(out, sizeof out, args, &secs) == 1 &&
		      strstr(out, "did not answer within 0.5 s") && secs >= 0.4 && secs < 5,
	      "jobs of a stopped daemon, --timeout=0.5 (%.1f s): %s", secs, out);
	snprintf(args, sizeof args, "--socket %s status", d->sock);
	CHECK(ctl_timed(out, sizeof out, args, &secs) == 1 &&
		      strstr(out, "did not answer within 10 s") && secs >= 9.5 && secs < 20,
	      "status of a stopped daemon, the default timeout (%.1f s): %s", secs, out);
	REQUIRE(kill(d->pid, SIGCONT) == 0, "SIGCONT");
	snprintf(args, sizeof args, "--socket %s status --timeout 0", d->sock);
	CHECK(ctl(out, sizeof out, args) == 0 && strstr(out, "ctl-job"),
	      "status once the daemon goes on: %s", out);

	/* connect waits: the backlog of a listener that never accepts is full */
	REQUIRE(snprintf(sa.sun_path, sizeof sa.sun_path, "%s/silent.sock", d->dir) <
			(int)sizeof sa.sun_path,
		"socket path too long");
	lfd = silent_listener(sa.sun_path, 0);
	for (;;) {
		int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0);

		REQUIRE(fd >= 0 && ncfd < 8, "filling the backlog");
		if (connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
			REQUIRE(errno == EAGAIN, "filling the backlog: %s", strerror(errno));
			close(fd);
			break;
		}
		cfd[ncfd++] = fd;
	}
	snprintf(args, sizeof args, "--socket %s --timeout 1 topo", sa.sun_path);
	CHECK(ctl_timed(out, sizeof out, args, &secs) == 1 && strstr(out, sa.sun_path) &&
		      strstr(out, "did not answer within 1 s") && secs >= 0.9 && secs < 5,
	      "topo of a full backlog, --timeout 1 (%.1f s): %s", secs, out);
	while (ncfd)
		close(cfd[--ncfd]);
	close(lfd);
	unlink(sa.sun_path);

	/* bad values */
	for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
		snprintf(args, sizeof args, "--socket %s status --timeout '%s'", d->sock, bad[i]);
		CHECK(ctl(out, sizeof out, args) == 2 && strstr(out, "--timeout wants seconds"),
		      "--timeout '%s': %s", bad[i], out);
	}
	printf("ok: commctl gives up on a daemon that does not answer after --timeout\n");
}

/*
 * EACCES from connect, as uid 65534: a socket of mode 0660 and group
 * daemon (--socket-group) is named with its group, the way in; a socket
 * behind a closed directory says so. Inside the group the same socket
 * lets commctl in.
 */
static void test_denied(const struct th_daemon *d)
{
	char out[8192], args[512], grouped[256], closed[256], hidden[300];
	int gfd, cfd;

	snprintf(grouped, sizeof grouped, "%s/grouped.sock", d->dir);
	snprintf(closed, sizeof closed, "%s/closed", d->dir);
	snprintf(hidden, sizeof hidden, "%s/closed/hidden.sock", d->dir);
	gfd = silent_listener(grouped, 8);
	REQUIRE(chown(grouped, 0, 1) == 0 && chmod(grouped, 0660) == 0, "chown grouped.sock");
	REQUIRE(mkdir(closed, 0700) == 0, "mkdir closed");
	cfd = silent_listener(hidden, 8);

	snprintf(args, sizeof args, "--socket %s status", grouped);
	CHECK(ctl_as(out, sizeof out, "--regid=65534", args) == 1 && strstr(out, grouped) &&
		      strstr(out, "permission denied: the socket is mode 0660, group daemon "
				  "(commd --socket-group); run commctl as root or as a member of "
				  "group daemon") &&
		      !strstr(out, "is commd running"),
	      "a socket of another group: %s", out);
	snprintf(args, sizeof args, "--socket %s --timeout 0.2 status", grouped);
	CHECK(ctl_as(out, sizeof out, "--regid=1", args) == 1 &&
		      strstr(out, "did not answer within 0.2 s"),
	      "a member of the socket's group is not let in: %s", out);
	snprintf(args, sizeof args, "--socket %s status", hidden);
	CHECK(ctl_as(out, sizeof out, "--regid=65534", args) == 1 && strstr(out, hidden) &&
		      strstr(out, "permission denied: a directory on the way is closed to you"),
	      "a socket behind a closed directory: %s", out);

	close(cfd);
	close(gfd);
	unlink(hidden);
	rmdir(closed);
	unlink(grouped);
	printf("ok: permission denied says the socket's group, or the closed directory\n");
}

#define LONG_JOB "ctl-job-whose-name-is-longer-than-the-column"

int main(void)
{
	struct th_daemon d;
	struct th_ranks rs, rs_long;
	char out[8192], args[512];
	char ch;

	REQUIRE(th_daemon_start(&d, "--admin-group", "daemon", NULL) == 0, "daemon start");
	chmod(d.dir, 0755); /* other users reach the socket (it is 0666) */
	REQUIRE(pipe(hold) == 0 && pipe(ready) == 0, "pipes");
	REQUIRE(th_ranks_start(&rs, &d, "ctl-job", 2, rank_hold, NULL) == 0, "ranks");
	REQUIRE(th_ranks_start(&rs_long, &d, LONG_JOB, 2, rank_hold, NULL) == 0, "ranks");
	close(hold[0]);
	close(ready[1]);
	for (int i = 0; i < 4; i++)
		REQUIRE(read(ready[0], &ch, 1) == 1, "rank %d not ready", i);

	snprintf(args, sizeof args, "--socket %s status", d.sock);
	CHECK(ctl(out, sizeof out, args) == 0, "status failed: %s", out);
	CHECK(strstr(out, "commd ") && strstr(out, "pid "), "no version/pid line:\n%s", out);
	CHECK(strstr(out, d.sock), "socket not shown:\n%s", out);
	CHECK(strstr(out, "backends:    host"), "backends not shown:\n%s", out);
	CHECK(strstr(out, "gpu:"), "gpu line missing:\n%s", out);
	CHECK(strstr(out, "ctl-job") && strstr(out, "2/2") && strstr(out, "ready"),
	      "job not shown with 2/2 ranks, ready:\n%s", out);
	printf("%s", out);

	snprintf(args, sizeof args, "status --help");
	CHECK(ctl(out, sizeof out, args) == 0 && strstr(out, "usage: commctl"),
	      "status --help: %s", out);
	snprintf(args, sizeof args, "-j status --socket=%s", d.sock);
	CHECK(ctl(out, sizeof out, args) == 0 && out[0] == '{', "-j status --socket=PATH: %s", out);
	snprintf(args, sizeof args, "status --socket=%s -j", d.sock);
	CHECK(ctl(out, sizeof out, args) == 0 && out[0] == '{', "status --socket=PATH -j: %s",
	      out);
	snprintf(args, sizeof args, "--socket %s status --json", d.sock);
	CHECK(ctl(out, sizeof out, args) == 0, "status --json failed: %s", out);
	/* host, and net where UCX works; no gpu here */
	CHECK(out[0] == '{' &&
		      (strstr(out, "\"backends\": [\"host\"]") ||
		       strstr(out, "\"backends\": [\"host\", \"net\"]")) &&
		      strstr(out, "\"peers\": []") && strstr(out, "\"peer_listen\": \"\"") &&
		      strstr(out, "\"name\": \"ctl-job\"") && strstr(out, "\"world_size\": 2") &&
		      strstr(out, "\"joined\": 2") && strstr(out, "\"state\": \"ready\"") &&
		      strstr(out, "\"ops_completed\": 1"),
	      "json status:\n%s", out);

	snprintf(args, sizeof args, "jobs --socket %s", d.sock);
	CHECK(ctl(out, sizeof out, args) == 0 && strstr(out, "ctl-job") && strstr(out, "2/2"),
	      "jobs:\n%s", out);
	CHECK(strstr(out, LONG_JOB " ") && jobs_aligned(out),
	      "jobs: the columns do not line up under a name of %zu bytes:\n%s",
	      strlen(LONG_JOB), out);

	/* another user sees its own jobs only, and no peers; the admin group sees all */
	if (system("setpriv --reuid=65534 --regid=65534 --clear-groups true 2>/dev/null") == 0) {
		snprintf(args, sizeof args, "--socket %s status", d.sock);
		CHECK(ctl_as(out, sizeof out, "--regid=65534", args) == 0 &&
			      strstr(out, "jobs:        0 (yours only") && !strstr(out, "ctl-job"),
		      "uid 65534 sees root's job:\n%s", out);
		snprintf(args, sizeof args, "--socket %s status --json", d.sock);
		CHECK(ctl_as(out, sizeof out, "--regid=65534", args) == 0 &&
			      strstr(out, "\"own_jobs_only\": true") && strstr(out, "\"jobs\": []"),
		      "uid 65534, json:\n%s", out);
		snprintf(args, sizeof args, "--socket %s jobs ctl-job", d.sock);
		CHECK(ctl_as(out, sizeof out, "--regid=65534", args) == 1 && strstr(out, "no job named"),
		      "uid 65534 reads root's job by name:\n%s", out);
		snprintf(args, sizeof args, "--socket %s status", d.sock);
		CHECK(ctl_as(out, sizeof out, "--regid=1", args) == 0 && strstr(out, "ctl-job") &&
			      !strstr(out, "yours only"),
		      "a member of the admin group (daemon) does not see every job:\n%s", out);
		printf("ok: uid 65534 sees its own jobs only; in the admin group, every job\n");
		test_denied(&d);
	} else {
		printf("skipped: setpriv cannot change the uid here\n");
	}
	snprintf(args, sizeof args, "--socket %s status --json", d.sock);
	CHECK(ctl(out, sizeof out, args) == 0 && strstr(out, "\"own_jobs_only\": false"),
	      "root's status is restricted:\n%s", out);

	/* errors: no daemon, unknown command, stray argument */
	CHECK(ctl(out, sizeof out, "--socket /nonexistent/sock status") == 1 &&
		      strstr(out, "/nonexistent/sock"),
	      "no daemon: %s", out);
	/* a directory or a file where the socket should be: said, not "Connection refused" */
	snprintf(args, sizeof args, "--socket %s status", d.dir);
	CHECK(ctl(out, sizeof out, args) == 1 && strstr(out, d.dir) &&
		      strstr(out, "is not a socket (a directory)") && !strstr(out, "refused"),
	      "a directory as the socket: %s", out);
	snprintf(args, sizeof args, "--socket %s status", d.log);
	CHECK(ctl(out, sizeof out, args) == 1 && strstr(out, "is not a socket (a file)") &&
		      !strstr(out, "refused"),
	      "a file as the socket: %s", out);
	CHECK(ctl(out, sizeof out, "frobnicate") == 2 && strstr(out, "unknown command"),
	      "unknown command: %s", out);
	snprintf(args, sizeof args, "--socket %s status --bogus", d.sock);
	CHECK(ctl(out, sizeof out, args) == 2, "stray argument accepted: %s", out);
	CHECK(ctl(out, sizeof out, "--help") == 0 && strstr(out, "status"), "help: %s", out);

	/* output that cannot be written is a failure, said on stderr */
	{
		static const char *const cmds[] = { "status", "status --json", "jobs", "jobs ctl-job",
						     "topo", "topo --json" };

		for (size_t i = 0; i < sizeof cmds / sizeof cmds[0]; i++) {
			snprintf(args, sizeof args, "--socket %s %s", d.sock, cmds[i]);
			CHECK(ctl_full(out, sizeof out, args) == 1 &&
				      strstr(out, "commctl: write standard output: No space left on device"),
			      "%s > /dev/full: %s", cmds[i], out);
		}
		CHECK(ctl_full(out, sizeof out, "--help") == 1 && strstr(out, "No space left"),
		      "--help > /dev/full: %s", out);
		CHECK(ctl_full(out, sizeof out, "--version") == 1 && strstr(out, "No space left"),
		      "--version > /dev/full: %s", out);
		printf("ok: commctl fails, saying why, when its output cannot be written\n");
	}

	/* what a hang waits for: the op, who posted it, who never did */
	{
		struct th_ranks hr;

		REQUIRE(pipe(hang_ready) == 0 && pipe(go1) == 0 && pipe(go2) == 0, "pipes");
		REQUIRE(th_ranks_start(&hr, &d, "hang-job", 3, rank_hang, NULL) == 0, "hang ranks");
		for (int i = 0; i < 3; i++)
			REQUIRE(read(hang_ready[0], &ch, 1) == 1, "hang rank %d not ready", i);
		usleep(300 * 1000);
		snprintf(args, sizeof args, "--socket %s jobs hang-job", d.sock);
		CHECK(ctl(out, sizeof out, args) == 0, "jobs hang-job: %s", out);
		printf("%s", out);
		CHECK(strstr(out, "ops in flight in hang-job") && strstr(out, "allreduce") &&
			      strstr(out, "1000") && strstr(out, "float32") &&
			      strstr(out, " 0-1 ") && strstr(out, "waiting for rank 2"),
		      "the all-reduce that rank 2 holds back is not shown:\n%s", out);
		snprintf(args, sizeof args, "--json --socket %s jobs hang-job", d.sock);
		CHECK(ctl(out, sizeof out, args) == 0 &&
			      strstr(out, "\"collective\": 1, \"type\": \"allreduce\"") &&
			      strstr(out, "\"posted\": \"0-1\"") && strstr(out, "\"missing\": \"2\""),
		      "jobs hang-job --json:\n%s", out);
		snprintf(args, sizeof args, "--socket %s status", d.sock);
		CHECK(ctl(out, sizeof out, args) == 0 && strstr(out, "waiting for rank 2"),
		      "status does not show the waiting all-reduce:\n%s", out);
		CHECK(write(go1[1], "x", 1) == 1, "go1");
		for (int i = 0; i < 3; i++)
			REQUIRE(read(hang_ready[0], &ch, 1) == 1, "hang rank %d not ready again", i);
		usleep(300 * 1000);
		snprintf(args, sizeof args, "--socket %s jobs hang-job", d.sock);
		CHECK(ctl(out, sizeof out, args) == 0 && strstr(out, "send") &&
			      strstr(out, "waiting for rank 1's recv") &&
			      strstr(out, "rank 0 -> rank 1") && !strstr(out, "allreduce       "),
		      "the send that rank 1 does not receive yet:\n%s", out);
		printf("%s", out);
		CHECK(write(go2[1], "x", 1) == 1, "go2");
		CHECK(th_ranks_wait(&hr) == 0, "hang ranks failed");
		snprintf(args, sizeof args, "--socket %s jobs no-such-job", d.sock);
		CHECK(ctl(out, sizeof out, args) == 1 && strstr(out, "no job named no-such-job"),
		      "jobs of an unknown job: %s", out);
		snprintf(args, sizeof args, "--socket %s jobs a b", d.sock);
		CHECK(ctl(out, sizeof out, args) == 2, "jobs with two names accepted: %s", out);
	}

	test_timeout(&d);
	test_abort(&d);
	test_span();

	close(hold[1]);
	CHECK(th_ranks_wait(&rs) == 0, "ranks failed");
	CHECK(th_ranks_wait(&rs_long) == 0, "the ranks of " LONG_JOB " failed");
	snprintf(args, sizeof args, "--socket %s status", d.sock);
	for (int i = 0; i < 100; i++) {
		CHECK(ctl(out, sizeof out, args) == 0, "status after the job");
		if (strstr(out, "jobs:        0"))
			break;
		usleep(20 * 1000);
	}
	CHECK(strstr(out, "jobs:        0"), "job not freed after its ranks left:\n%s", out);
	CHECK(th_daemon_stop(&d) == 0, "daemon stop");
	return CHECK_EXIT();
}
