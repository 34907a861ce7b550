/*
 * test-matrix-efg.c: RELIABILITY.md rows E (isolation), F (resource
 * exhaustion) and G (the daemon's lifecycle), a TAP test point a row.
 */
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include "check.h"
#include "comm.h"
#include "frame.h"
#include "harness.h"
#include "matrix.h"
#include "raw.h"

#define NOBODY 65534
#define GID_DAEMON 1 /* Debian's group "daemon": the shared daemon's admin group */

/* The shared daemon's settings, which rows F1-F3 count on. */
#define MAX_CONNS 512
#define DEADLINE_MS 3000 /* handshake and frame deadlines */

/*
 * In a child: drop to uid and gid NOBODY, with the supplementary group
 * GID_DAEMON when in_daemon_group, else none.
 */
static void become_nobody_in(int in_daemon_group)
{
	gid_t g = GID_DAEMON;

	if (setgroups(in_daemon_group ? 1 : 0, &g) < 0 || setresgid(NOBODY, NOBODY, NOBODY) < 0 ||
	    setresuid(NOBODY, NOBODY, NOBODY) < 0) {
		perror("become nobody");
		_exit(100);
	}
}

static void become_nobody(void)
{
	become_nobody_in(0);
}

struct join {
	const char *job, *token;
	int rank, world, timeout_ms, nobody;
};

/*
 * Join as j says (and do one all-reduce of 1s when it works); the result,
 * and comm_last_error's text in detail.
 */
static comm_result_t join_once(const struct th_daemon *d, const struct join *j, char *detail,
			       size_t len)
{
	comm_config_t cfg = COMM_CONFIG_INIT;
	comm_result_t rc;
	comm_t *c;
	int v = 1;

	cfg.socket = d->sock;
	cfg.job = j->job;
	cfg.token = j->token;
	cfg.rank = j->rank;
	cfg.world_size = j->world;
	cfg.timeout_ms = j->timeout_ms;
	rc = comm_init(&c, &cfg);
	snprintf(detail, len, "%s", comm_last_error(NULL));
	if (rc != COMM_OK)
		return rc;
	rc = comm_allreduce(c, &v, &v, 1, COMM_INT32, COMM_SUM, NULL);
	if (rc == COMM_OK && v != j->world)
		rc = COMM_ERR_INTERNAL;
	comm_finalize(c);
	return rc;
}

/*
 * join_once in a child (as nobody when j->nobody); its result and detail
 * come back through a pipe. Returns the pid; collect with joined().
 */
static pid_t join_spawn(const struct th_daemon *d, const struct join *j, int *rfd)
{
	int p[2];
	pid_t pid;

	REQUIRE(pipe(p) == 0, "pipe");
	fflush(NULL);
	pid = fork();
	REQUIRE(pid >= 0, "fork");
	if (pid == 0) {
		char detail[512];
		comm_result_t rc;

		close(p[0]);
		alarm(60);
		if (j->nobody)
			become_nobody();
		rc = join_once(d, j, detail, sizeof detail);
		if (write(p[1], &rc, sizeof rc) != sizeof rc ||
		    write(p[1], detail, strlen(detail) + 1) < 0)
			_exit(101);
		_exit(0);
	}
	close(p[1]);
	*rfd = p[0];
	return pid;
}

/* The result of a join_spawn child; its detail in detail. -1 when it died. */
static int joined(pid_t pid, int rfd, char *detail, size_t len)
{
	comm_result_t rc = -1;
	ssize_t n;
	int status;

	detail[0] = '\0';
	if (read(rfd, &rc, sizeof rc) != sizeof rc)
		rc = -1;
	n = read(rfd, detail, len - 1);
	detail[n > 0 ? n : 0] = '\0';
	close(rfd);
	if (waitpid(pid, &status, 0) != pid || !WIFEXITED(status) || WEXITSTATUS(status))
		return -1;
	return (int)rc;
}

static int join_as(const struct th_daemon *d, const struct join *j, char *detail, size_t len)
{
	int rfd;
	pid_t pid = join_spawn(d, j, &rfd);

	return joined(pid, rfd, detail, len);
}

/* Replace every occurrence of what in s with "X" (to compare two answers). */
static void blank(char *s, const char *what)
{
	size_t wl = strlen(what);
	char *p;

	while ((p = strstr(s, what))) {
		*p = 'X';
		memmove(p + 1, p + wl, strlen(p + wl) + 1);
	}
}

/*
 * The other way round: another uid's forming job cannot take a name from
 * root. Root without its token gets a job of its own of that name (before,
 * PERMISSION); with the token, root joins the other's job, which forms.
 */
static int wait_ctl(const struct th_daemon *d, const char *args, const char *s);

static void e2_squat(struct th_daemon *d)
{
	struct join squatter = { "e2-squat", "e2-nobody", 0, 2, 8000, 1 };
	struct join root_own = { "e2-squat", "", 0, 1, 8000, 0 };
	struct join root_in = { "e2-squat", "e2-nobody", 1, 2, 8000, 0 };
	char d0[512], d1[512];
	int rfd;
	pid_t p0;

	p0 = join_spawn(d, &squatter, &rfd);
	CHECK(wait_ctl(d, "jobs", "e2-squat"), "the other uid's job did not show up");
	CHECK(join_as(d, &root_own, d1, sizeof d1) == COMM_OK,
	      "root's own job, named as another uid's forming one: %s", d1);
	CHECK(join_as(d, &root_in, d1, sizeof d1) == COMM_OK,
	      "root joining the other uid's job with its token: %s", d1);
	CHECK(joined(p0, rfd, d0, sizeof d0) == COMM_OK, "the other uid's rank 0: %s", d0);
}

/*
 * E2: job names are per uid, so another uid cannot even name root's job:
 * presenting it (with the right token) joins nothing of root's and gets the
 * answer a name that exists nowhere gets. Root's job then forms and runs.
 */
static void row_e2(struct th_daemon *d)
{
	struct join owner0 = { "e2-job", "e2-token", 0, 2, 8000, 0 };
	struct join owner1 = { "e2-job", "e2-token", 1, 2, 8000, 0 };
	struct join intruder = { "e2-job", "e2-token", 1, 2, 600, 1 };
	struct join stranger = { "e2-none", "e2-token", 1, 2, 600, 1 };
	char d1[512], d2[512], d0[512];
	int r1, r2, rfd;
	pid_t p0;

	chmod(d->dir, 0755); /* the socket is 0666; let nobody reach it */
	p0 = join_spawn(d, &owner0, &rfd);
	usleep(200 * 1000);
	r1 = join_as(d, &intruder, d1, sizeof d1);
	r2 = join_as(d, &stranger, d2, sizeof d2);
	blank(d1, "e2-job");
	blank(d2, "e2-none");
	CHECK(r1 != COMM_OK && r1 == r2 && strcmp(d1, d2) == 0,
	      "another uid presenting root's job: %d '%s'; a job that does not exist: %d '%s'", r1,
	      d1, r2, d2);
	mx_note("E2: another uid, root's job: %s (%s); no such job: %s", comm_result_name(r1), d1,
		comm_result_name(r2));
	CHECK(join_as(d, &owner1, d2, sizeof d2) == COMM_OK, "root's rank 1: %s", d2);
	CHECK(joined(p0, rfd, d0, sizeof d0) == COMM_OK, "root's rank 0: %s", d0);
	e2_squat(d);
}

/* Whether the daemon's log or status output holds s anywhere. */
static int ctl_has(const struct th_daemon *d, const char *args, const char *s)
{
	char cmd[512], line[4096];
	const char *bin = getenv("COMMCTL") ? getenv("COMMCTL") : "./client/commctl";
	int found = 0;
	FILE *p;

	snprintf(cmd, sizeof cmd, "%s --socket %s %s 2>&1", bin, d->sock, args);
	if (!(p = popen(cmd, "r")))
		return -1;
	while (fgets(line, sizeof line, p))
		found |= strstr(line, s) != NULL;
	pclose(p);
	return found;
}

/* Wait (5 s at most) until commctl's output for args holds s; 1 when it does. */
static int wait_ctl(const struct th_daemon *d, const char *args, const char *s)
{
	for (int i = 0; i < 100; i++) {
		if (ctl_has(d, args, s) == 1)
			return 1;
		usleep(50 * 1000);
	}
	return 0;
}

/*
 * E3: a wrong token is refused (PERMISSION, naming another token); the job
 * then forms with the right one. No token (the right one, the guess, the
 * bystander's) is in the log, at debug level, or in commctl's output.
 */
static void row_e3(struct th_daemon *d)
{
	struct join owner0 = { "e3-job", "e3-right-token", 0, 2, 8000, 0 };
	struct join guess = { "e3-job", "e3-wrong-guess", 1, 2, 2000, 0 };
	struct join owner1 = { "e3-job", "e3-right-token", 1, 2, 8000, 0 };
	char det[512], det0[512], by_token[64];
	int rfd, rc;
	pid_t p0;

	p0 = join_spawn(d, &owner0, &rfd);
	CHECK(wait_ctl(d, "jobs e3-job", "1/2"), "rank 0 of e3-job did not join");
	rc = join_as(d, &guess, det, sizeof det);
	CHECK(rc == COMM_ERR_PERMISSION && strstr(det, "permission denied") &&
		      strstr(det, "another token"),
	      "wrong token: %d '%s'", rc, det);
	CHECK(ctl_has(d, "jobs e3-job", "1/2") == 1, "the job lost its rank 0 to a wrong token");
	CHECK(join_as(d, &owner1, det, sizeof det) == COMM_OK, "rank 1, right token: %s", det);
	CHECK(joined(p0, rfd, det0, sizeof det0) == COMM_OK, "rank 0: %s", det0);

	/* the harness's tokens are "token-JOB-PID" */
	snprintf(by_token, sizeof by_token, "token-bystander-E3-%d", (int)getpid());
	CHECK(!mx_log_has(d, "e3-right-token") && !mx_log_has(d, "e3-wrong-guess") &&
		      !mx_log_has(d, by_token) && !mx_log_has(d, "token-"),
	      "a token is in the daemon's log");
	CHECK(ctl_has(d, "status --json", "token-") == 0 &&
		      ctl_has(d, "jobs bystander-E3 --json", "token-") == 0,
	      "a token is in commctl's output");
}

/* Send one Op all-reduce naming mem id (offset 0) and one FreeMem of it; both NOT_FOUND. */
static int probe_ids(int fd, struct frame_reader *r, uint64_t seq, uint64_t id)
{
	Commpb__Envelope env = COMMPB__ENVELOPE__INIT, *reply;
	Commpb__Op op = COMMPB__OP__INIT;
	Commpb__BufRef ref = COMMPB__BUF_REF__INIT;
	Commpb__FreeMem fm = COMMPB__FREE_MEM__INIT;
	int ok;

	ref.mem_id = id;
	op.seq = seq;
	op.type = COMMPB__OP_TYPE__OP_ALLREDUCE;
	op.send = &ref;
	op.recv = &ref;
	op.count = 16;
	op.dtype = COMM_INT32;
	op.redop = COMM_SUM;
	env.body_case = COMMPB__ENVELOPE__BODY_OP;
	env.op = &op;
	raw_send(fd, &env, NULL, 0);
	reply = raw_recv(fd, r);
	ok = reply && reply->body_case == COMMPB__ENVELOPE__BODY_OP_DONE &&
	     reply->op_done->status == COMM_ERR_NOT_FOUND;
	if (!ok)
		fprintf(stderr, "op on mem id %llu: not NOT_FOUND\n", (unsigned long long)id);
	if (reply)
		commpb__envelope__free_unpacked(reply, NULL);
	fm.mem_id = id;
	env.body_case = COMMPB__ENVELOPE__BODY_FREE_MEM;
	env.free_mem = &fm;
	raw_send(fd, &env, NULL, 0);
	reply = raw_recv(fd, r);
	if (!reply || reply->body_case != COMMPB__ENVELOPE__BODY_FREE_MEM_REPLY ||
	    reply->free_mem_reply->status != COMM_ERR_NOT_FOUND) {
		fprintf(stderr, "free of mem id %llu: not NOT_FOUND\n", (unsigned long long)id);
		ok = 0;
	}
	if (reply)
		commpb__envelope__free_unpacked(reply, NULL);
	return ok;
}

/*
 * E4: a one-rank job guesses buffer ids (1..512, the ids the bystander's
 * connections hold, and random 64-bit ones) in ops and frees: NOT_FOUND
 * every time, and the bystander's results stay right.
 */
static void row_e4(struct th_daemon *d)
{
	struct frame_reader r;
	int fd = raw_connect(d->sock), bad = 0;
	uint64_t seq = 1, x = 0x9e3779b97f4a7c15ull;

	frame_reader_init(&r);
	raw_hello(fd, &r, "e4-guesser", PROTO_VERSION_MIN, PROTO_VERSION, COMM_OK);
	for (uint64_t id = 0; id <= 512; id++)
		bad += !probe_ids(fd, &r, seq++, id);
	for (int i = 0; i < 512; i++) {
		x ^= x << 13, x ^= x >> 7, x ^= x << 17;
		bad += !probe_ids(fd, &r, seq++, x);
	}
	CHECK(bad == 0, "%d guessed ids were not NOT_FOUND", bad);
	frame_reader_free(&r);
	close(fd);
}

/* Connect to path; the fd, or -errno. */
static int try_connect(const char *path, int nonblock)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | (nonblock ? SOCK_NONBLOCK : 0), 0);

	if (fd < 0)
		return -errno;
	snprintf(sa.sun_path, sizeof sa.sun_path, "%s", path);
	if (connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
		int e = errno;

		close(fd);
		return -e;
	}
	return fd;
}

/*
 * In a child as nobody (in the group daemon when in_group): connect to the
 * socket and say hello; its exit status is 0 served, 1 refused by the
 * socket (EACCES), 2 otherwise.
 */
static int connect_as_nobody(const char *sock, int in_group)
{
	int status;
	pid_t pid;

	fflush(NULL);
	if ((pid = fork()) == 0) {
		struct frame_reader r;
		int fd;

		become_nobody_in(in_group);
		fd = try_connect(sock, 0);
		if (fd == -EACCES)
			_exit(1);
		if (fd < 0)
			_exit(2);
		frame_reader_init(&r);
		raw_hello(fd, &r, "e1-job", PROTO_VERSION_MIN, PROTO_VERSION, COMM_OK);
		_exit(check_failures ? 2 : 0);
	}
	if (pid < 0 || waitpid(pid, &status, 0) != pid || !WIFEXITED(status))
		return -1;
	return WEXITSTATUS(status);
}

/*
 * E1: with --socket-group daemon the socket is 0660 root:daemon; nobody
 * outside the group cannot connect (EACCES from the kernel, before commd
 * sees anything); nobody in the group and root are served.
 */
static void row_e1(struct th_daemon *shared)
{
	struct th_daemon d;
	struct stat st;
	int rc;

	if (th_daemon_start(&d, "--socket-group", "daemon", NULL) < 0) {
		CHECK(0, "commd --socket-group daemon did not start");
		return;
	}
	chmod(d.dir, 0755);
	CHECK(stat(d.sock, &st) == 0 && (st.st_mode & 0777) == 0660 && st.st_gid == GID_DAEMON,
	      "socket mode %o gid %d, want 660 and %d", st.st_mode & 0777, (int)st.st_gid,
	      GID_DAEMON);
	CHECK((rc = connect_as_nobody(d.sock, 0)) == 1, "nobody outside the group: %d", rc);
	CHECK((rc = connect_as_nobody(d.sock, 1)) == 0, "nobody in the group: %d", rc);
	{
		struct frame_reader r;
		int fd = raw_connect(d.sock);

		frame_reader_init(&r);
		raw_hello(fd, &r, "e1-root", PROTO_VERSION_MIN, PROTO_VERSION, COMM_OK);
		frame_reader_free(&r);
		close(fd);
	}
	CHECK(th_daemon_stop(&d) == 0, "commd --socket-group did not stop cleanly");
}

enum who { ROOT, NOBODY_ALONE, NOBODY_ADMIN };

/*
 * commctl where nobody may run it: a copy beside the socket (the build tree
 * may sit in a directory only root can enter, as a fresh clone in mktemp's).
 */
static const char *ctl_for_nobody(const char *sock, const char *bin, char *path, size_t len)
{
	char buf[65536];
	ssize_t n;
	int in, out;

	snprintf(path, len, "%.*s/commctl", (int)(strrchr(sock, '/') - sock), sock);
	if (access(path, X_OK) == 0)
		return path;
	in = open(bin, O_RDONLY | O_CLOEXEC);
	out = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0755);
	while (in >= 0 && out >= 0 && (n = read(in, buf, sizeof buf)) > 0)
		if (write(out, buf, (size_t)n) != n)
			break;
	if (in >= 0)
		close(in);
	if (out >= 0)
		close(out);
	return path;
}

/* Run commctl --socket SOCK ARGS as who; its exit status, its output in out. */
static int ctl_as(enum who who, const char *sock, const char *args, char *out, size_t len)
{
	const char *bin = getenv("COMMCTL") ? getenv("COMMCTL") : "./client/commctl";
	char cmd[512], copy[256];
	size_t n = 0;
	ssize_t k;
	int p[2], status;
	pid_t pid;

	if (who != ROOT)
		bin = ctl_for_nobody(sock, bin, copy, sizeof copy);
	REQUIRE(pipe(p) == 0, "pipe");
	fflush(NULL);
	if ((pid = fork()) == 0) {
		dup2(p[1], 1);
		dup2(p[1], 2);
		close(p[0]);
		close(p[1]);
		if (who != ROOT)
			become_nobody_in(who == NOBODY_ADMIN);
		snprintf(cmd, sizeof cmd, "exec %s --socket %s %s", bin, sock, args);
		execl("/bin/sh", "sh", "-c", cmd, (char *)NULL);
		_exit(127);
	}
	close(p[1]);
	while (n < len - 1 && (k = read(p[0], out + n, len - 1 - n)) > 0)
		n += (size_t)k;
	out[n] = '\0';
	close(p[0]);
	if (waitpid(pid, &status, 0) != pid || !WIFEXITED(status))
		return -1;
	return WEXITSTATUS(status);
}

/*
 * E7: the shared daemon's admin group is "daemon". nobody sees its own
 * forming job and nothing of root's (the bystander), in text and JSON, and
 * cannot read root's job by name; nobody in the group sees every job.
 */
static void row_e7(struct th_daemon *d)
{
	struct join own = { "e7-own", "e7-token", 0, 2, 3000, 1 };
	char out[16384];
	int rfd, rc;
	pid_t pid;

	chmod(d->dir, 0755);
	pid = join_spawn(d, &own, &rfd);
	CHECK(wait_ctl(d, "status", "e7-own"), "nobody's job did not form");
	rc = ctl_as(NOBODY_ALONE, d->sock, "status", out, sizeof out);
	CHECK(rc == 0 && strstr(out, "yours only") && strstr(out, "e7-own") &&
		      !strstr(out, "bystander"),
	      "status as nobody (exit %d):\n%s", rc, out);
	rc = ctl_as(NOBODY_ALONE, d->sock, "status --json", out, sizeof out);
	CHECK(rc == 0 && strstr(out, "\"own_jobs_only\": true") && strstr(out, "e7-own") &&
		      !strstr(out, "bystander") && strstr(out, "\"peers\": []"),
	      "status --json as nobody (exit %d):\n%s", rc, out);
	rc = ctl_as(NOBODY_ALONE, d->sock, "jobs bystander-E7", out, sizeof out);
	CHECK(rc != 0 && strstr(out, "no job named"), "jobs bystander-E7 as nobody (exit %d):\n%s",
	      rc, out);
	rc = ctl_as(NOBODY_ADMIN, d->sock, "status", out, sizeof out);
	CHECK(rc == 0 && strstr(out, "bystander-E7") && strstr(out, "e7-own") &&
		      !strstr(out, "yours only"),
	      "status as nobody in the admin group (exit %d):\n%s", rc, out);
	rc = ctl_as(ROOT, d->sock, "jobs bystander-E7", out, sizeof out);
	CHECK(rc == 0 && strstr(out, "bystander-E7"), "jobs bystander-E7 as root:\n%s", out);
	/* the lone rank's join runs out (3 s), as any job that never forms */
	CHECK(joined(pid, rfd, out, sizeof out) == COMM_ERR_TIMEOUT, "nobody's own job: %s", out);
}

/* Raise our own fd limit to at least n (or as far as the hard limit goes); the soft limit. */
static long raise_nofile(long n)
{
	struct rlimit rl;

	if (getrlimit(RLIMIT_NOFILE, &rl) < 0)
		return -1;
	if ((long)rl.rlim_cur < n) {
		rl.rlim_cur = (long)rl.rlim_max < n ? rl.rlim_max : (rlim_t)n;
		setrlimit(RLIMIT_NOFILE, &rl);
		getrlimit(RLIMIT_NOFILE, &rl);
	}
	return (long)rl.rlim_cur;
}

/* The daemon's connections now (commctl's own included), from status --json. */
static int daemon_conns(const struct th_daemon *d)
{
	char out[65536], *p;
	int n;

	if (ctl_as(ROOT, d->sock, "status --json", out, sizeof out) != 0 ||
	    !(p = strstr(out, "\"connections\": ")) || sscanf(p + 15, "%d", &n) != 1)
		return -1;
	return n;
}

/*
 * F1: 1000 connections at once against --max-connections 512: those up to
 * the cap are served (each says hello and gets an answer), the rest are
 * refused with BUSY naming the limit; the bystander goes on meanwhile.
 */
#define F1_CONNS 1000
static void row_f1(struct th_daemon *d)
{
	static int fds[F1_CONNS];
	int served = 0, refused = 0, other = 0, open0, want, n = F1_CONNS;
	long ops0 = 0;
	char detail[256];

	if (raise_nofile(F1_CONNS + 64) < F1_CONNS + 64) {
		n = (int)raise_nofile(0) - 64;
		mx_note("F1: our fd limit allows %d connections, not %d", n, F1_CONNS);
	}
	open0 = daemon_conns(d) - 1; /* not commctl's */
	want = MAX_CONNS - open0;
	ops0 = mx_bystander_ops();
	for (int i = 0; i < n; i++)
		fds[i] = try_connect(d->sock, 0);
	/* a refusal is an Error at once; a served connection hears nothing until its hello */
	usleep(1000 * 1000);
	for (int i = 0; i < n; i++) {
		int st = fds[i] < 0 ? -2 : raw_error(fds[i], 0, detail, sizeof detail);

		if (st == COMM_ERR_BUSY && strstr(detail, "max-connections"))
			refused++;
		else if (st == -1)
			served++;
		else
			other++;
	}
	CHECK(served == want && refused == n - want && other == 0,
	      "%d connections with %d open and a cap of %d: %d served, %d refused, %d else", n,
	      open0, MAX_CONNS, served, refused, other);
	/* the served ones really are (before the handshake deadline): a hello on a few */
	for (int i = 0; i < 3 && i < want; i++) {
		struct frame_reader r;
		char job[32];

		frame_reader_init(&r);
		snprintf(job, sizeof job, "f1-%d", i);
		raw_hello(fds[i], &r, job, PROTO_VERSION_MIN, PROTO_VERSION, COMM_OK);
		frame_reader_free(&r);
	}
	CHECK(mx_bystander_ops() > ops0, "the bystander did no op during the flood");
	mx_note("F1: %d connections: %d served, %d refused (BUSY: %s)", n, served, refused, detail);
	for (int i = 0; i < n; i++)
		if (fds[i] >= 0)
			close(fds[i]);
}

/*
 * F2: 500 connections that trickle the first frame a byte a second (the
 * matrix's "a byte every 4 s" against 10 s deadlines, scaled to this
 * daemon's 3 s): every one is closed at the handshake deadline though it
 * never stops sending.
 */
#define F2_CONNS 500
static void row_f2(struct th_daemon *d)
{
	static int fds[F2_CONNS];
	static long closed_ms[F2_CONNS];
	long t0 = mx_now_ms(), last = 0, worst = 0;
	int open = 0;

	raise_nofile(F2_CONNS + 64);
	for (int i = 0; i < F2_CONNS; i++) {
		fds[i] = try_connect(d->sock, 1);
		closed_ms[i] = 0;
		open += fds[i] >= 0;
	}
	CHECK(open == F2_CONNS, "only %d of %d connections opened", open, F2_CONNS);
	while (open > 0 && mx_now_ms() - t0 < DEADLINE_MS + 5000) {
		if (mx_now_ms() - last >= 1000) {
			/* a byte of a length prefix that would be 16 bytes */
			for (int i = 0; i < F2_CONNS; i++)
				if (fds[i] >= 0 && !closed_ms[i] &&
				    send(fds[i], "\x10", 1, MSG_NOSIGNAL | MSG_DONTWAIT) < 0 &&
				    errno != EAGAIN)
					closed_ms[i] = mx_now_ms();
			last = mx_now_ms();
		}
		for (int i = 0; i < F2_CONNS; i++) {
			char buf[512];
			ssize_t k;

			if (fds[i] < 0 || closed_ms[i])
				continue;
			while ((k = recv(fds[i], buf, sizeof buf, MSG_DONTWAIT)) > 0)
				;
			if (k == 0 || (k < 0 && errno != EAGAIN))
				closed_ms[i] = mx_now_ms();
		}
		open = 0;
		for (int i = 0; i < F2_CONNS; i++)
			open += fds[i] >= 0 && !closed_ms[i];
		usleep(20 * 1000);
	}
	for (int i = 0; i < F2_CONNS; i++) {
		if (closed_ms[i] - t0 > worst)
			worst = closed_ms[i] - t0;
		if (fds[i] >= 0)
			close(fds[i]);
	}
	CHECK(open == 0, "%d of %d trickling connections still open %ld ms on", open, F2_CONNS,
	      mx_now_ms() - t0);
	CHECK(worst >= DEADLINE_MS - 200, "a trickling connection closed after %ld ms, before the "
	      "%d ms deadline", worst, DEADLINE_MS);
	mx_note("F2: %d connections trickling a byte a second: the last closed after %ld ms "
		"(deadline %d ms)", F2_CONNS, worst, DEADLINE_MS);
}

/* F3's rank 1: an all-reduce that must end in PEER_LOST naming rank 0. */
static int rank_f3(int rank, int n, void *arg)
{
	comm_config_t cfg = COMM_CONFIG_INIT;
	const struct th_daemon *d = arg;
	comm_result_t rc;
	comm_t *c;
	int v = 1;

	alarm(60);
	cfg.socket = d->sock;
	cfg.job = "f3-job";
	cfg.token = "f3-token";
	cfg.rank = 1;
	cfg.world_size = 2;
	if ((rc = comm_init(&c, &cfg)) != COMM_OK) {
		fprintf(stderr, "F3 rank 1: init: %s\n", comm_last_error(NULL));
		return 1;
	}
	rc = comm_allreduce(c, &v, &v, 1, COMM_INT32, COMM_SUM, NULL);
	if (rc != COMM_ERR_PEER_LOST || !strstr(comm_last_error(c), "rank 0")) {
		fprintf(stderr, "F3 rank 1: %s (%s), want PEER_LOST naming rank 0\n",
			comm_result_name(rc), comm_last_error(c));
		return 1;
	}
	comm_finalize(c);
	return 0;
}

/*
 * F3: rank 0 (by hand) asks for replies (frees of a buffer it never had)
 * and never reads them: once the kernel's buffer and --max-write-queue
 * 128K are full, commd drops it, and its peer hears PEER_LOST as for A4.
 */
static void row_f3(struct th_daemon *d)
{
	Commpb__Envelope env = COMMPB__ENVELOPE__INIT;
	Commpb__FreeMem fm = COMMPB__FREE_MEM__INIT;
	struct frame_reader r;
	struct th_ranks rs;
	uint8_t *frame;
	size_t len;
	int fd, sent = 0;
	long t0;

	REQUIRE(th_ranks_start(&rs, d, "f3-job", 1, rank_f3, d) == 0, "rank 1");
	fd = raw_connect(d->sock);
	frame_reader_init(&r);
	CHECK(raw_hello_rank(fd, &r, "f3-job", "f3-token", 0, 2, NULL, 0) == COMM_OK, "rank 0's hello");
	frame_reader_free(&r);
	fm.mem_id = 12345;
	env.body_case = COMMPB__ENVELOPE__BODY_FREE_MEM;
	env.free_mem = &fm;
	REQUIRE((len = frame_pack(&env, &frame)) > 0, "pack");
	t0 = mx_now_ms();
	while (mx_now_ms() - t0 < 20000 &&
	       send(fd, frame, len, MSG_NOSIGNAL) == (ssize_t)len)
		sent++;
	free(frame);
	CHECK(raw_closed_by_daemon(fd), "the client that never reads was not dropped");
	close(fd);
	CHECK(th_ranks_wait(&rs) == 0, "its peer did not hear PEER_LOST");
	CHECK(mx_log_has(d, "max-write-queue"), "no word of max-write-queue in the log");
	mx_note("F3: dropped after %d requests whose replies it never read", sent);
}

/*
 * F5: the daemon's fd limit (prlimit on its pid) set just above what it has
 * open: new connections are refused with BUSY "out of file descriptors"
 * (never left hanging in the backlog), the bystander goes on, and a rank
 * of a running job whose new buffer's fd is lost gets BUSY for that
 * allocation while its job goes on; with the limit back, a new connection
 * is served.
 */
static int f5_ready[2], f5_go[2];

static int rank_f5(int rank, int n, void *arg)
{
	comm_t *c;
	void *big;
	char ch;
	int v = rank + 1;

	if (th_join(&c, rank, n) < 0)
		return 1;
	/* both ranks' staging segments are made (an fd each) before the limit tightens */
	if (comm_allreduce(c, &v, &v, 1, COMM_INT32, COMM_SUM, NULL) != COMM_OK || v != 3) {
		fprintf(stderr, "F5 rank %d: the first all-reduce: %s\n", rank, comm_last_error(c));
		return th_bail(c);
	}
	v = rank + 1;
	if (rank == 0) {
		if (write(f5_ready[1], "r", 1) != 1 || read(f5_go[0], &ch, 1) != 1)
			return th_bail(c);
		/* past the first segment: a new memfd, whose fd commd cannot take now */
		big = comm_mem_alloc(c, 256u << 20);
		if (big || !strstr(comm_last_error(c), "out of file descriptors")) {
			fprintf(stderr, "F5 rank 0: a new segment at the fd limit: %s (%s)\n",
				big ? "allocated" : "refused", comm_last_error(c));
			return th_bail(c);
		}
	}
	if (comm_allreduce(c, &v, &v, 1, COMM_INT32, COMM_SUM, NULL) != COMM_OK || v != 3) {
		fprintf(stderr, "F5 rank %d: the all-reduce after the refusal: %s\n", rank,
			comm_last_error(c));
		return th_bail(c);
	}
	return th_leave(c, rank);
}

static void row_f5(struct th_daemon *d)
{
	struct rlimit old, tight;
	struct th_ranks job;
	int fds[40], refused = 0, served = 0, have;
	long ops0 = mx_bystander_ops();
	char detail[256] = "";

	REQUIRE(pipe(f5_ready) == 0 && pipe(f5_go) == 0, "pipes");
	REQUIRE(th_ranks_start(&job, d, "f5-job", 2, rank_f5, NULL) == 0, "ranks");
	REQUIRE(read(f5_ready[0], detail, 1) == 1, "rank 0 not ready");
	have = th_count_fds(d->pid);
	REQUIRE(prlimit(d->pid, RLIMIT_NOFILE, NULL, &old) == 0, "prlimit");
	tight = old;
	tight.rlim_cur = (rlim_t)have + 3;
	REQUIRE(prlimit(d->pid, RLIMIT_NOFILE, &tight, NULL) == 0, "prlimit %d", have + 3);
	for (int i = 0; i < 40; i++)
		fds[i] = try_connect(d->sock, 0);
	usleep(500 * 1000);
	for (int i = 0; i < 40; i++) {
		char det[256];
		int st = fds[i] < 0 ? -2 : raw_error(fds[i], 0, det, sizeof det);

		if (st == COMM_ERR_BUSY && strstr(det, "out of file descriptors")) {
			refused++;
			snprintf(detail, sizeof detail, "%s", det);
		} else if (st == -1) {
			served++;
		}
	}
	usleep(300 * 1000);
	CHECK(mx_bystander_ops() > ops0, "the bystander stalled at the fd limit");
	CHECK(refused >= 30 && served + refused == 40,
	      "at the fd limit: %d refused, %d served of 40", refused, served);
	/* the fds are all taken: a running rank asks for a new buffer */
	CHECK(write(f5_go[1], "g", 1) == 1, "go");
	CHECK(th_ranks_wait(&job) == 0, "a job at the fd limit failed");
	for (int i = 0; i < 40; i++)
		if (fds[i] >= 0)
			close(fds[i]);
	REQUIRE(prlimit(d->pid, RLIMIT_NOFILE, &old, NULL) == 0, "prlimit back");
	for (int i = 0; i < 2; i++) {
		close(f5_ready[i]);
		close(f5_go[i]);
	}
	{
		struct frame_reader r;
		int fd = raw_connect(d->sock);

		frame_reader_init(&r);
		raw_hello(fd, &r, "f5-after", PROTO_VERSION_MIN, PROTO_VERSION, COMM_OK);
		frame_reader_free(&r);
		close(fd);
	}
	CHECK(mx_log_has(d, "out of file descriptors: refused"), "no word of it in the log");
	mx_note("F5: fd limit %d: %d of 40 refused (%s), %d served", have + 3, refused, detail,
		served);
}

/* The next notify message that holds what, within ms; 1 seen, 0 not. */
static int notify_wait(int nfd, const char *what, int ms)
{
	long t0 = mx_now_ms();
	char buf[512];

	while (mx_now_ms() - t0 < ms) {
		struct pollfd p = { .fd = nfd, .events = POLLIN };
		ssize_t n;

		if (poll(&p, 1, 50) <= 0)
			continue;
		if ((n = recv(nfd, buf, sizeof buf - 1, 0)) <= 0)
			continue;
		buf[n] = '\0';
		if (strstr(buf, what))
			return 1;
	}
	return 0;
}

/*
 * G1's jobs: "fin" posts an 8M-float all-reduce on both ranks; in "stuck"
 * rank 0 posts it and rank 1 a recv from rank 0 instead, which never match.
 */
#define G1_COUNT (8u << 20)
static int g1_posted[2], g1_go[2]; /* each rank: its op is posted; SIGTERM was sent */

static int rank_g1(int rank, int n, void *arg)
{
	int finishing = *(const int *)arg;
	comm_request_t *req;
	comm_result_t rc, want;
	comm_t *c;
	float *v;
	int one = 1;
	char go;

	close(g1_go[1]); /* so that a test that gave up leaves this rank an EOF */
	if (th_join(&c, rank, n) < 0)
		return 1;
	if (!(v = comm_mem_alloc(c, G1_COUNT * sizeof *v)))
		return 1;
	for (size_t i = 0; i < G1_COUNT; i++)
		v[i] = (float)(rank + 1 + i % 7);
	if (!finishing && rank == 1)
		rc = comm_recv(c, v, 1, COMM_FLOAT32, 0, &req);
	else
		rc = comm_allreduce(c, v, v, G1_COUNT, COMM_FLOAT32, COMM_SUM, &req);
	if (rc != COMM_OK)
		return 1;
	if (write(g1_posted[1], "x", 1) != 1)
		return 1;
	rc = comm_wait(req, -1);
	want = finishing ? COMM_OK : COMM_ERR_SHUTDOWN;
	if (rc != want) {
		fprintf(stderr, "G1 %s rank %d: the op in flight at SIGTERM: %s (%s), want %s\n",
			finishing ? "fin" : "stuck", rank, comm_result_name(rc), comm_last_error(c),
			comm_result_name(want));
		return 1;
	}
	if (finishing)
		for (size_t i = 0; i < G1_COUNT; i += 4099)
			if (v[i] != (float)(3 + 2 * (i % 7))) {
				fprintf(stderr, "G1 rank %d: element %zu is %g, want %g\n", rank, i,
					(double)v[i], (double)(3 + 2 * (i % 7)));
				return 1;
			}
	/* the next op only once commd has had SIGTERM (the first may end before it) */
	if (read(g1_go[0], &go, 1) != 1)
		return 1;
	rc = comm_allreduce(c, &one, &one, 1, COMM_INT32, COMM_SUM, NULL);
	if (rc != COMM_ERR_SHUTDOWN && rc != COMM_ERR_DAEMON_UNREACHABLE) {
		fprintf(stderr, "G1 rank %d: an op after SIGTERM: %s, want SHUTDOWN\n", rank,
			comm_result_name(rc));
		return 1;
	}
	return 0;
}

/*
 * G1: SIGTERM with two jobs in flight, a 6 s drain budget: STOPPING=1 goes
 * to the service manager, the socket stops taking connections, the op
 * both ranks posted finishes with the right values, the op a rank never
 * matched fails with SHUTDOWN when the budget runs out, and commd exits 0.
 */
static void row_g1(struct th_daemon *shared)
{
	int fin = 1, stuck = 0, status, e;
	struct th_ranks a, b;
	struct th_daemon d;
	long t0;
	char ch;

	REQUIRE(pipe(g1_posted) == 0 && pipe(g1_go) == 0, "pipe");
	if (th_daemon_start(&d, "--drain-timeout", "6000", NULL) < 0) {
		CHECK(0, "commd did not start");
		return;
	}
	REQUIRE(th_ranks_start(&a, &d, "g1-fin", 2, rank_g1, &fin) == 0, "ranks");
	REQUIRE(th_ranks_start(&b, &d, "g1-stuck", 2, rank_g1, &stuck) == 0, "ranks");
	for (int i = 0; i < 4; i++)
		REQUIRE(read(g1_posted[0], &ch, 1) == 1, "a rank did not post");
	/* and commd has all four ops (its debug log says so) before the signal */
	for (int i = 0; i < 1000; i++) {
		int have = 0;

		for (int k = 0; k < 4; k++) {
			char what[64];

			snprintf(what, sizeof what, "job g1-%s: rank %d posts op 1:",
				 k < 2 ? "fin" : "stuck", k % 2);
			have += mx_log_has(&d, what);
		}
		if (have == 4)
			break;
		usleep(10 * 1000);
	}
	t0 = mx_now_ms();
	kill(d.pid, SIGTERM);
	CHECK(notify_wait(d.notify_fd, "STOPPING=1", 2000), "no STOPPING=1 after SIGTERM");
	REQUIRE(write(g1_go[1], "xxxx", 4) == 4, "pipe");
	e = try_connect(d.sock, 0);
	CHECK(e < 0, "a new connection was taken while draining");
	if (e >= 0)
		close(e);
	CHECK(th_ranks_wait(&a) == 0, "the op both ranks posted did not finish right");
	CHECK(th_ranks_wait(&b) == 0, "the unmatched ops did not fail with SHUTDOWN");
	REQUIRE(waitpid(d.pid, &status, 0) == d.pid, "waitpid");
	CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0, "drained commd: status 0x%x", status);
	CHECK(mx_log_has(&d, "drain: 2 ops still in flight after 6000 ms: failing them"),
	      "the log does not say the drain ran out");
	mx_note("G1: SIGTERM: exit 0 after %ld ms", mx_now_ms() - t0);
	th_daemon_cleanup(&d);
	close(g1_posted[0]);
	close(g1_posted[1]);
	close(g1_go[0]);
	close(g1_go[1]);
}

/* G2's rank 0: all-reduce alone (rank 1 holds back) and expect DAEMON_UNREACHABLE soon. */
static int rank_g2(int rank, int n, void *arg)
{
	volatile long *killed_ms = arg;
	comm_result_t rc;
	comm_t *c;
	int v = 1;

	if (th_join(&c, rank, n) < 0)
		return 1;
	if (rank == 1) {
		pause();
		return 1;
	}
	rc = comm_allreduce(c, &v, &v, 1, COMM_INT32, COMM_SUM, NULL);
	if (rc != COMM_ERR_DAEMON_UNREACHABLE || mx_now_ms() - *killed_ms > 1000) {
		fprintf(stderr, "G2 rank 0: %s (%s) %ld ms after the kill, want DAEMON_UNREACHABLE "
			"within 1 s\n", comm_result_name(rc), comm_last_error(c),
			mx_now_ms() - *killed_ms);
		return 1;
	}
	comm_abort(c);
	return 0;
}

/*
 * G2: commd SIGKILLed under a waiting rank: the rank gets
 * DAEMON_UNREACHABLE within a second, never a hang, and so does a new rank
 * while it is down; a new commd on the same socket path (the old file is
 * stale) serves a new job.
 */
static void row_g2(struct th_daemon *shared)
{
	volatile long *killed_ms = mmap(NULL, sizeof *killed_ms, PROT_READ | PROT_WRITE,
					MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	struct th_daemon d, d2;
	struct th_ranks rs;

	REQUIRE(killed_ms != MAP_FAILED, "mmap");
	*killed_ms = mx_now_ms() + 3600 * 1000;
	if (th_daemon_start(&d, NULL) < 0) {
		CHECK(0, "commd did not start");
		return;
	}
	REQUIRE(th_ranks_start(&rs, &d, "g2-job", 2, rank_g2, (void *)killed_ms) == 0, "ranks");
	usleep(500 * 1000);
	*killed_ms = mx_now_ms();
	kill(d.pid, SIGKILL);
	waitpid(d.pid, NULL, 0);
	kill(rs.pids[1], SIGKILL);
	CHECK(th_ranks_wait(&rs) == 1, "rank 0 did not hear the daemon was lost");
	/* while it is down, a new rank is told so, with the socket it tried */
	{
		comm_config_t cfg = COMM_CONFIG_INIT;
		comm_t *c;

		cfg.socket = d.sock;
		cfg.job = "g2-down";
		cfg.rank = 0;
		cfg.world_size = 1;
		CHECK(comm_init(&c, &cfg) == COMM_ERR_DAEMON_UNREACHABLE && c == NULL &&
			      strstr(comm_last_error(NULL), d.sock),
		      "init with commd down: %s", comm_last_error(NULL));
	}
	if (th_daemon_start(&d2, "--socket", d.sock, NULL) < 0) {
		CHECK(0, "a new commd on the old socket path did not start");
	} else {
		struct th_daemon at_old = d2;

		snprintf(at_old.sock, sizeof at_old.sock, "%s", d.sock);
		CHECK(th_run_ranks(&at_old, "g2-after", 2, th_rank_sum, NULL) == 0,
		      "a job on the restarted commd");
		CHECK(th_daemon_stop(&d2) == 0, "the restarted commd did not stop cleanly");
	}
	th_daemon_cleanup(&d);
	munmap((void *)killed_ms, sizeof *killed_ms);
}

/* WATCHDOG=1 messages on nfd within ms. */
static int pings(int nfd, int ms)
{
	long t0 = mx_now_ms();
	int n = 0;
	char buf[512];

	while (mx_now_ms() - t0 < ms) {
		struct pollfd p = { .fd = nfd, .events = POLLIN };
		ssize_t k;

		if (poll(&p, 1, 20) > 0 && (k = recv(nfd, buf, sizeof buf - 1, 0)) > 0) {
			buf[k] = '\0';
			n += strstr(buf, "WATCHDOG=1") != NULL;
		}
	}
	return n;
}

/* Read what is in fd (non-blocking) and throw it away. */
static void drain_fd(int fd)
{
	char buf[65536];

	while (read(fd, buf, sizeof buf) > 0)
		;
}

/*
 * G3: commd under a watchdog (WATCHDOG_USEC 400 ms: a ping every 200 ms)
 * logging to a pipe. While the loop runs, pings come; once nobody reads
 * the log and it fills (as a stuck journal would), the loop blocks in
 * write and the pings stop; read the pipe again and they come back.
 */
static void row_g3(struct th_daemon *shared)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	char dir[] = "/tmp/commd-g3-XXXXXX", sock[64], notify[64];
	const char *commd = getenv("COMMD") ? getenv("COMMD") : "./daemon/commd";
	int logp[2], nfd, before, during = -1, after, status;
	long t0;
	pid_t pid;

	REQUIRE(mkdtemp(dir), "mkdtemp");
	snprintf(sock, sizeof sock, "%s/commd.sock", dir);
	snprintf(notify, sizeof notify, "%s/notify.sock", dir);
	snprintf(sa.sun_path, sizeof sa.sun_path, "%s", notify);
	nfd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	REQUIRE(nfd >= 0 && bind(nfd, (struct sockaddr *)&sa, sizeof sa) == 0, "notify socket");
	REQUIRE(pipe2(logp, O_CLOEXEC) == 0, "pipe");
	fcntl(logp[0], F_SETFL, O_NONBLOCK);
	fcntl(logp[1], F_SETPIPE_SZ, 4096);
	fflush(NULL);
	if ((pid = fork()) == 0) {
		dup2(logp[1], 2);
		setenv("NOTIFY_SOCKET", notify, 1);
		setenv("WATCHDOG_USEC", "400000", 1);
		unsetenv("WATCHDOG_PID");
		execl(commd, commd, "--foreground", "--config", "/dev/null", "--log-level", "debug",
		      "--socket", sock, (char *)NULL);
		_exit(127);
	}
	close(logp[1]);
	t0 = mx_now_ms();
	while (mx_now_ms() - t0 < 10000 && !notify_wait(nfd, "READY=1", 100))
		drain_fd(logp[0]);
	drain_fd(logp[0]);
	before = pings(nfd, 1000);
	drain_fd(logp[0]);
	/* stop reading the log; bad frames make commd log until the pipe is full */
	for (int round = 0; round < 50; round++) {
		for (int i = 0; i < 20; i++) {
			int fd = try_connect(sock, 1);

			/* fails once the backlog is full: commd is stuck then */
			if (fd >= 0) {
				send(fd, "\x05\x00\x00\x00junk!", 9, MSG_NOSIGNAL);
				close(fd);
			}
		}
		if ((during = pings(nfd, 1200)) == 0)
			break;
	}
	CHECK(before >= 3, "%d watchdog pings in 1 s while healthy, want 5", before);
	CHECK(during == 0, "%d watchdog pings in 1.2 s while the loop was stuck", during);
	/* read the log again: the loop goes on and so do the pings */
	t0 = mx_now_ms();
	after = 0;
	while (mx_now_ms() - t0 < 3000 && after < 2) {
		drain_fd(logp[0]);
		after += pings(nfd, 100);
	}
	CHECK(after >= 2, "the pings did not come back once the log was read: %d", after);
	mx_note("G3: pings in 1 s: %d healthy, 0 stuck for 1.2 s, back once the log drained",
		before);
	kill(pid, SIGTERM);
	t0 = mx_now_ms();
	while (waitpid(pid, &status, WNOHANG) == 0 && mx_now_ms() - t0 < 10000) {
		drain_fd(logp[0]);
		usleep(10 * 1000);
	}
	CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0, "commd: status 0x%x", status);
	close(logp[0]);
	close(nfd);
	unlink(notify);
	unlink(sock);
	rmdir(dir);
}

/* Whether the file at path has a line with want in it. */
static int file_has(const char *path, const char *want)
{
	FILE *f = fopen(path, "r");
	char line[1024];
	int found = 0;

	while (f && !found && fgets(line, sizeof line, f))
		found = strstr(line, want) != NULL;
	if (f)
		fclose(f);
	return found;
}

/*
 * G4: the GPU worker's probe (the stand-in's) finds a device that fails
 * to initialise: commd logs the probe's line and why it stops, exits 3
 * within the probe's time, never says READY=1 and leaves no socket. With
 * gpu-worker none it starts and serves host memory.
 */
static void row_g4(struct th_daemon *shared)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	char dir[] = "/tmp/commd-g4-XXXXXX", sock[64], notify[64], log[64], buf[512];
	const char *commd = getenv("COMMD") ? getenv("COMMD") : "./daemon/commd";
	const char *fake = getenv("FAKE_GPU_WORKER");
	int nfd, status = -1, ready = 0, logfd;
	struct th_daemon d;
	struct stat st;
	long t0, took;
	ssize_t n;
	pid_t pid;

	(void)shared;
	REQUIRE(fake, "FAKE_GPU_WORKER is not set (make check sets it)");
	REQUIRE(mkdtemp(dir), "mkdtemp");
	snprintf(sock, sizeof sock, "%s/commd.sock", dir);
	snprintf(notify, sizeof notify, "%s/notify.sock", dir);
	snprintf(log, sizeof log, "%s/commd.log", dir);
	snprintf(sa.sun_path, sizeof sa.sun_path, "%s", notify);
	nfd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	REQUIRE(nfd >= 0 && bind(nfd, (struct sockaddr *)&sa, sizeof sa) == 0, "notify socket");
	logfd = open(log, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	REQUIRE(logfd >= 0, "%s: %s", log, strerror(errno));
	fflush(NULL);
	t0 = mx_now_ms();
	if ((pid = fork()) == 0) {
		dup2(logfd, 2);
		setenv("NOTIFY_SOCKET", notify, 1);
		setenv("FAKE_GPU_MODE", "broken", 1);
		execl(commd, commd, "--foreground", "--config", "/dev/null", "--socket", sock,
		      "--gpu-worker", fake, (char *)NULL);
		_exit(127);
	}
	close(logfd);
	while (waitpid(pid, &status, WNOHANG) == 0 && mx_now_ms() - t0 < 10000)
		usleep(10 * 1000);
	took = mx_now_ms() - t0;
	if (waitpid(pid, NULL, WNOHANG) == 0) {
		kill(pid, SIGKILL);
		waitpid(pid, &status, 0);
	}
	while ((n = recv(nfd, buf, sizeof buf - 1, MSG_DONTWAIT)) > 0) {
		buf[n] = '\0';
		ready |= strstr(buf, "READY=1") != NULL;
	}
	CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 3,
	      "commd with a failing GPU: status 0x%x after %ld ms, expected exit 3", status, took);
	CHECK(!ready, "commd with a failing GPU said READY=1");
	CHECK(file_has(log, "gpu: broken: device 1: cudaSetDevice: fake: uncorrectable ECC error") &&
		      file_has(log, "not starting: a GPU of this node does not work") &&
		      file_has(log, "gpu-worker = none"),
	      "commd's log does not name the failing device and the way out");
	CHECK(stat(sock, &st) < 0, "commd with a failing GPU left its socket");
	mx_note("G4: exit 3 after %ld ms, no READY=1, the device and the way out logged", took);
	close(nfd);
	unlink(notify);
	unlink(log);
	rmdir(dir);
	/* gpu-worker none: host memory only */
	if (th_daemon_start(&d, "--gpu-worker", "none", NULL) < 0) {
		CHECK(0, "commd with gpu-worker none did not start");
		return;
	}
	CHECK(th_log_count(&d, "gpu: unavailable: gpu-worker is none", "commd ") == 1,
	      "commd with gpu-worker none does not say so");
	CHECK(th_run_ranks(&d, "g4-host", 2, th_rank_sum, NULL) == 0,
	      "a host job on commd with gpu-worker none");
	CHECK(th_daemon_stop(&d) == 0, "commd with gpu-worker none did not stop cleanly");
}

static const struct mx_row rows[] = {
	{ "E1", "a uid outside the socket's group connects", row_e1, MX_OWN_DAEMON },
	{ "E2", "another uid presents a job that exists", row_e2, 0 },
	{ "E3", "wrong job token", row_e3, 0 },
	{ "E4", "ids of another job's buffers, tried in a loop", row_e4, 0 },
	{ "E7", "commctl status by a non-admin", row_e7, 0 },
	{ "F1", "1000 connections at once", row_f1, 0 },
	{ "F2", "500 connections sending a byte every second", row_f2, 0 },
	{ "F3", "a client that never reads its replies", row_f3, 0 },
	{ "F5", "daemon at its fd limit", row_f5, 0 },
	{ "G1", "SIGTERM with ops in flight", row_g1, MX_OWN_DAEMON },
	{ "G2", "daemon killed, restarted", row_g2, MX_OWN_DAEMON },
	{ "G3", "event loop stalled", row_g3, MX_OWN_DAEMON },
	{ "G4", "start with a GPU that fails to initialise", row_g4, MX_OWN_DAEMON },
};

int main(int argc, char **argv)
{
	static const char *const args[] = { "--admin-group", "daemon", "--max-connections", "512",
					    "--handshake-timeout", "3000", "--frame-timeout",
					    "3000", "--max-write-queue", "128K", NULL };

	signal(SIGPIPE, SIG_IGN);
	return mx_main(argc, argv, rows, (int)(sizeof rows / sizeof rows[0]), args);
}
