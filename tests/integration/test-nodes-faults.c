/*
 * test-nodes-faults.c: jobs over two daemons when things go wrong: a root
 * address where nothing listens, a job that fails under a send or a
 * broadcast between the daemons beside one that must not notice, and a
 * member daemon stopped, then killed, under a running job while a job on
 * the other alone must not notice. The surviving daemon fails what spanned
 * the lost one, serves a new job and stops cleanly; B stopped while A,
 * sending to it, is frozen exits anyway. Stale messages (H4)
 * are test-nodes-stale.c's.
 */
#include <dirent.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "check.h"
#include "comm.h"
#include "harness.h"
#include "opcase.h"

#include "nodes-seen.h"

#define LOOP_COUNT (16u << 20)  /* float32: a 64 MiB all-reduce */
#define KILL_LIMIT_MS 5000      /* ops spanning a dead daemon fail within this */
#define DRAIN_MS 2000           /* commd's default drain budget at SIGTERM */
#define CONNECT_LIMIT_MS 8000   /* commd's connect timeout to a root (5 s) and some slack */

static struct th_daemon da, db; /* A, the root, and B */

/* --- a root where nothing listens --------------------------------------------- */

static int rank_noroot(int r, int n, void *arg)
{
	struct seen *s = arg;
	comm_result_t rc;
	comm_t *c = NULL;

	alarm(TH_WATCHDOG_S);
	s->start_ms[r] = mono_ms();
	rc = comm_init(&c, NULL);
	seen_note(s, r, rc, rc == COMM_OK ? "" : comm_last_error(NULL));
	if (rc == COMM_OK)
		comm_abort(c);
	return 0;
}

static void test_noroot(int fds0)
{
	struct seen *s = seen_new();
	const struct th_daemon *ds[1] = { &da };
	char root[64];
	int port = th_free_port(), failed;

	REQUIRE(port > 0, "no free port");
	snprintf(root, sizeof root, "127.0.0.1:%d", port);
	failed = th_run_ranks_nodes(ds, NULL, root, "faults-noroot", 2, rank_noroot, s);
	CHECK(failed == 0, "no root: %d ranks failed", failed);
	for (int r = 0; r < 2; r++) {
		long ms = s->err_ms[r] - s->start_ms[r];
		int ok = (s->rc[r] == COMM_ERR_PEER_LOST ||
			  s->rc[r] == COMM_ERR_DAEMON_UNREACHABLE) &&
			 ms <= CONNECT_LIMIT_MS && *s->detail[r];

		printf("%s: rank %d on A, COMM_ROOT=%s where nothing listens: comm_init gave %s "
		       "after %ld ms: \"%s\"\n",
		       ok ? "ok" : "FAIL", r, root, comm_result_name((comm_result_t)s->rc[r]), ms,
		       s->detail[r]);
		CHECK(s->rc[r] == COMM_ERR_PEER_LOST || s->rc[r] == COMM_ERR_DAEMON_UNREACHABLE,
		      "no root: rank %d: comm_init gave %s, expected COMM_ERR_PEER_LOST or "
		      "COMM_ERR_DAEMON_UNREACHABLE",
		      r, comm_result_name((comm_result_t)s->rc[r]));
		CHECK(ms <= CONNECT_LIMIT_MS, "no root: rank %d: comm_init took %ld ms, limit %d",
		      r, ms, CONNECT_LIMIT_MS);
		CHECK(*s->detail[r], "no root: rank %d: comm_last_error is empty", r);
	}
	/* a root that is no HOST:PORT at all: the join is refused as a bad argument */
	memset(s, 0, sizeof *s);
	failed = th_run_ranks_nodes(ds, NULL, "nonsense", "faults-badroot", 1, rank_noroot, s);
	CHECK(failed == 0 && s->rc[0] == COMM_ERR_INVALID_ARG &&
	      strstr(s->detail[0], "root 'nonsense' is not host:port"),
	      "COMM_ROOT=nonsense: comm_init gave %s: \"%s\" (want COMM_ERR_INVALID_ARG naming it)",
	      comm_result_name((comm_result_t)s->rc[0]), s->detail[0]);
	printf("%s: COMM_ROOT=nonsense: comm_init gave %s: \"%s\"\n",
	       s->rc[0] == COMM_ERR_INVALID_ARG ? "ok" : "FAIL",
	       comm_result_name((comm_result_t)s->rc[0]), s->detail[0]);
	/* a root with a control character: refused before it reaches the log */
	memset(s, 0, sizeof *s);
	failed = th_run_ranks_nodes(ds, NULL, "host\n[fake] line:1", "faults-ctlroot", 1,
				    rank_noroot, s);
	CHECK(failed == 0 && s->rc[0] == COMM_ERR_INVALID_ARG &&
	      strstr(s->detail[0], "printable"),
	      "COMM_ROOT with a newline: comm_init gave %s: \"%s\" (want COMM_ERR_INVALID_ARG)",
	      comm_result_name((comm_result_t)s->rc[0]), s->detail[0]);
	CHECK(th_log_count(&da, "[fake] line", "") == 0, "a root's newline reached commd's log");
	CHECK(th_daemon_alive(&da), "commd A died after a job named a root that is not there");
	th_check_baseline(&da, fds0, "a job named a root that is not there");
	printf("%s: commd A alive, fds back to %d, no memfd mapped\n",
	       check_failures ? "FAIL" : "ok", fds0);
	fflush(stdout);
	munmap(s, sizeof *s);
}

/* --- a job's failure under a send between daemons stays in that job ------------- */

#define ISO_SEND (256u << 20)   /* bytes rank 0 of job X sends to rank 1 */
#define ISO_COUNT (1u << 18)    /* float32 in each of job Y's all-reduces */
#define ISO_RUN_MS 8000         /* how long Y goes on after X failed */

/* How job X fails: what is under way from A to B when the test kills a rank of X */
enum iso_mode {
	ISO_UNTAKEN, /* a send that B never takes in; a rank on B killed */
	ISO_TAKEN,   /* a send that B is taking in; a rank on B killed */
	ISO_BCAST,   /* a broadcast that B is taking in; B stopped, a rank on A killed */
};

struct iso {
	enum iso_mode mode;
	int posted[4];              /* X's ranks posted their op */
	long fail_ms;               /* X failed (the test killed a rank) */
	int x_rc[4];                /* what X's ranks got */
	int answered[4];            /* and when (set after x_rc) */
	int y_ops[2], y_rc[2];      /* Y's all-reduces done, and the first failure */
	char y_detail[2][200];
};

/* The rank of job X the test kills */
static int iso_victim(enum iso_mode mode)
{
	return mode == ISO_BCAST ? 3 : mode == ISO_TAKEN ? 2 : 1;
}

/*
 * Job X over A and B: rank 0 (on A) sends ISO_SEND bytes to rank 1 (on B),
 * or broadcasts them to ranks 1, 2 (on B) and 3 (on A). Not taken: rank 1
 * never posts its recv and the test kills it (B drains what came for X once
 * X failed there). Taken: rank 1 posts the recv and the test kills rank 2
 * while the chunks come in. Broadcast: the test stops daemon B while the
 * chunks come in and kills rank 3. Rank 2, unless killed, waits (in a
 * barrier, or in the broadcast), then a while before it leaves.
 */
static int rank_iso_x(int r, int n, void *arg)
{
	struct iso *s = arg;
	int victim = iso_victim(s->mode);
	comm_request_t *req = NULL;
	comm_result_t rc;
	uint8_t *buf = NULL;
	comm_t *c;

	setenv("COMM_TIMEOUT", "30000", 1);
	if (th_join(&c, r, n) < 0)
		return 1;
	if (r == victim && s->mode != ISO_BCAST)
		for (;;)
			pause();
	if (r < 2 || s->mode == ISO_BCAST) {
		if (!(buf = comm_mem_alloc(c, ISO_SEND)))
			return th_bail(c);
		memset(buf, r == 0 ? 0x5a : 0, ISO_SEND);
		if (s->mode == ISO_BCAST)
			rc = comm_broadcast(c, buf, buf, ISO_SEND, COMM_UINT8, 0, &req);
		else
			rc = r == 0 ? comm_send(c, buf, ISO_SEND, COMM_UINT8, 1, &req)
				    : comm_recv(c, buf, ISO_SEND, COMM_UINT8, 0, &req);
		__atomic_store_n(&s->posted[r], 1, __ATOMIC_RELEASE);
		if (rc == COMM_OK)
			rc = comm_wait(req, -1);
	} else {
		rc = comm_barrier(c, NULL);
	}
	s->x_rc[r] = rc;
	__atomic_store_n(&s->answered[r], 1, __ATOMIC_RELEASE);
	if (r == 2)
		usleep(ISO_RUN_MS * 1000);
	alarm(20);
	comm_finalize(c);
	return r > 0 && rc == COMM_OK; /* X fails; a send may have ended before (buffered) */
}

/*
 * Job Y over A and B: all-reduces until ISO_RUN_MS after X failed, each
 * checked; element 1 carries each rank's wish to stop, so both stop after
 * the same one.
 */
static int rank_iso_y(int r, int n, void *arg)
{
	struct iso *s = arg;
	float *in, *out;
	comm_result_t rc = COMM_OK;
	comm_t *c;
	long f;

	setenv("COMM_TIMEOUT", "30000", 1);
	if (th_join(&c, r, n) < 0)
		return 1;
	in = comm_mem_alloc(c, ISO_COUNT * sizeof *in);
	out = comm_mem_alloc(c, ISO_COUNT * sizeof *out);
	if (!in || !out)
		return th_bail(c);
	for (size_t i = 0; i < ISO_COUNT; i++)
		in[i] = (float)(r + 1);
	for (;;) {
		f = __atomic_load_n(&s->fail_ms, __ATOMIC_ACQUIRE);
		in[1] = f && mono_ms() - f >= ISO_RUN_MS ? 1.0f : 0.0f;
		alarm(TH_WATCHDOG_S);
		rc = comm_allreduce(c, in, out, ISO_COUNT, COMM_FLOAT32, COMM_SUM, NULL);
		if (rc != COMM_OK) {
			snprintf(s->y_detail[r], sizeof s->y_detail[r], "%s", comm_last_error(c));
			break;
		}
		if (out[0] != 3.0f || out[ISO_COUNT - 1] != 3.0f) {
			snprintf(s->y_detail[r], sizeof s->y_detail[r], "wrong values");
			rc = COMM_ERR_INTERNAL;
			break;
		}
		s->y_ops[r]++;
		if (out[1] > 0.0f)
			break;
	}
	s->y_rc[r] = rc;
	if (rc != COMM_OK)
		return th_bail(c);
	return th_leave(c, r);
}

/*
 * Whether commctl jobs on d shows an op of job part way in ("N of M chunks
 * in from node", 0 < N < M; N <= M / 2 when half) within 10 s: then it
 * stops looking.
 */
static int chunks_part_in(const struct th_daemon *d, const char *job, int half)
{
	const char *bin = getenv("COMMCTL") ? getenv("COMMCTL") : "./client/commctl";
	char cmd[512], line[512];
	long t0 = mono_ms();

	snprintf(cmd, sizeof cmd, "%s --socket %s jobs %s 2>/dev/null", bin, d->sock, job);
	while (mono_ms() - t0 < 10000) {
		FILE *p = popen(cmd, "r");
		int in = 0, all = 0, part = 0;
		const char *at;

		while (p && fgets(line, sizeof line, p))
			if ((at = strstr(line, "across daemons: ")) &&
			    sscanf(at, "across daemons: %d of %d chunks in", &in, &all) == 2)
				part |= in > 0 && in < all && (!half || in <= all / 2);
		if (p)
			pclose(p);
		if (part)
			return 1;
	}
	return 0;
}

/* The net: line of commctl status on d (the data plane, and the ops it holds). */
static void net_line(const struct th_daemon *d, char *buf, size_t len)
{
	const char *bin = getenv("COMMCTL") ? getenv("COMMCTL") : "./client/commctl";
	char cmd[512], line[512];
	FILE *p;

	snprintf(buf, len, "(no net: line)");
	snprintf(cmd, sizeof cmd, "%s --socket %s status 2>&1", bin, d->sock);
	if (!(p = popen(cmd, "r")))
		return;
	while (fgets(line, sizeof line, p))
		if (!strncmp(line, "net:", 4)) {
			line[strcspn(line, "\n")] = '\0';
			snprintf(buf, len, "%s", line);
		}
	pclose(p);
}

/*
 * Promise 2 of RELIABILITY.md across daemons: job X fails with 256 MiB
 * under way from A to B (iso_mode); job Y over the same two daemons (the
 * same UCX endpoints) goes on for 8 s after, every all-reduce right. What
 * A sent for X and B did not take is left to UCX, the memory it reads held,
 * and X's ranks are answered meanwhile: in ISO_BCAST, rank 0 while B is
 * stopped, and A's status shows the op held. No endpoint is closed by force
 * (that fails Y's ops on it too), and once B drops X, fds and mappings are
 * back to where they were, and A holds nothing.
 */
static void test_isolation(enum iso_mode mode, int fds0a, int fds0b)
{
	static const char *const what[] = { "a send nobody took", "a send being taken in",
					    "a broadcast being taken in" };
	static const int x_of[4] = { 0, 1, 1, 0 }, y_of[2] = { 0, 1 };
	const struct th_daemon *ds[2] = { &da, &db };
	struct iso *s = mmap(NULL, sizeof *s, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1,
			     0);
	int victim = iso_victim(mode), nx = mode == ISO_BCAST ? 4 : 3, fx, fy, ready;
	int other = mode == ISO_TAKEN ? 1 : 2; /* a rank of X on B that is not killed */
	int forced = th_log_count(&da, "closed by force", "") + th_log_count(&db, "closed by force", "");
	int early = 0;
	char held[512] = "", after[512];
	struct th_ranks rx, ry;
	long t0 = mono_ms();

	REQUIRE(s != MAP_FAILED, "mmap");
	memset(s, 0, sizeof *s);
	s->mode = mode;
	REQUIRE(th_ranks_start_nodes(&ry, ds, y_of, da.peer, "iso-y", 2, rank_iso_y, s) == 0, "fork");
	REQUIRE(th_ranks_start_nodes(&rx, ds, x_of, da.peer, "iso-x", nx, rank_iso_x, s) == 0, "fork");
	do {
		ready = 1;
		for (int r = 0; r < (mode == ISO_UNTAKEN ? 1 : nx); r++)
			ready &= (r == victim && mode == ISO_TAKEN) || /* it never posts */
				 __atomic_load_n(&s->posted[r], __ATOMIC_ACQUIRE);
		usleep(2000);
	} while (!ready && mono_ms() - t0 < PROGRESS_LIMIT_MS);
	if (mode != ISO_UNTAKEN)
		CHECK(chunks_part_in(&db, "iso-x", mode == ISO_BCAST),
		      "job X: commctl jobs on B never showed the data part way in");
	else
		usleep(150 * 1000); /* the send's chunks are on their way */
	if (mode == ISO_BCAST) {
		/*
		 * B takes nothing in: A's sends cannot end, and rank 0 is answered
		 * only if A holds them. At most 1 s: B's peers lose it after 3 s
		 * of silence, and it pings each second.
		 */
		kill(db.pid, SIGSTOP);
		kill(rx.pids[victim], SIGKILL);
		__atomic_store_n(&s->fail_ms, mono_ms(), __ATOMIC_RELEASE);
		for (long t1 = mono_ms(); mono_ms() - t1 < 1000; usleep(1000))
			if ((early = __atomic_load_n(&s->answered[0], __ATOMIC_ACQUIRE)))
				break;
		if (early)
			net_line(&da, held, sizeof held);
		kill(db.pid, SIGCONT);
		CHECK(early, "job X: rank 0's broadcast was not answered while B was stopped (1 s)");
		CHECK(!early || strstr(held, "held ops: 1 (1 sending)"),
		      "job X: A's status does not show the broadcast's sends held: %s", held);
	} else {
		kill(rx.pids[victim], SIGKILL);
		__atomic_store_n(&s->fail_ms, mono_ms(), __ATOMIC_RELEASE);
	}
	fx = th_ranks_wait(&rx);
	fy = th_ranks_wait(&ry);
	CHECK(fx == 1, "job X: %d ranks failed, expected the killed one alone", fx);
	for (int r = 1; r < 3; r++)
		CHECK(r == victim || s->x_rc[r] != COMM_OK, "job X's rank %d: %s", r,
		      comm_result_name((comm_result_t)s->x_rc[r]));
	CHECK(mode != ISO_BCAST || s->x_rc[0] != COMM_OK, "job X's rank 0: COMM_OK");
	for (int r = 0; r < 2; r++)
		CHECK(s->y_rc[r] == COMM_OK, "job Y, rank %d: %s after %d all-reduces: %s", r,
		      comm_result_name((comm_result_t)s->y_rc[r]), s->y_ops[r], s->y_detail[r]);
	forced = th_log_count(&da, "closed by force", "") + th_log_count(&db, "closed by force", "") -
		 forced;
	CHECK(forced == 0, "job X's failure closed %d endpoints by force", forced);
	th_check_baseline(&da, fds0a, "job X failed");
	th_check_baseline(&db, fds0b, "job X failed");
	net_line(&da, after, sizeof after);
	CHECK(strstr(after, "held ops: none"), "job X: A still holds ops: %s", after);
	printf("%s: job X failed under %s from A to B (rank 0: %s%s, rank %d: %s); job Y over the "
	       "same daemons ran %d all-reduces, the last %d s after%s; %d endpoints closed by "
	       "force; fds and mappings back%s%s\n",
	       check_failures ? "FAIL" : "ok", what[mode], comm_result_name((comm_result_t)s->x_rc[0]),
	       early ? ", while B was stopped" : "", other,
	       comm_result_name((comm_result_t)s->x_rc[other]), s->y_ops[0], ISO_RUN_MS / 1000,
	       fy ? ", some failed" : ", all right", forced,
	       *held ? "; A's status while B was stopped: " : "", held + (*held ? 13 : 0));
	munmap(s, sizeof *s);
}

/* --- daemon B killed under a job ------------------------------------------------- */

/* Ranks loop on a 64 MiB float32 all-reduce (exact: sum of 1..n) until one fails. */
static int rank_loop(int r, int n, void *arg)
{
	struct seen *s = arg;
	float *in, *out, want = (float)(n * (n + 1) / 2);
	size_t probe[3] = { 0, LOOP_COUNT / 2 + 1, LOOP_COUNT - 1 };
	comm_result_t rc;
	comm_t *c;

	setenv("COMM_TIMEOUT", "20000", 1); /* a hang fails in 20 s, a 64 MiB op needs far less */
	if (th_join(&c, r, n) < 0) {
		seen_note(s, r, COMM_ERR_INTERNAL, "comm_init failed (see above)");
		return 1;
	}
	in = comm_mem_alloc(c, LOOP_COUNT * sizeof *in);
	out = comm_mem_alloc(c, LOOP_COUNT * sizeof *out);
	if (!in || !out) {
		fprintf(stderr, "rank %d: comm_mem_alloc: %s\n", r, comm_last_error(c));
		seen_note(s, r, COMM_ERR_NO_MEMORY, "comm_mem_alloc failed");
		return th_bail(c);
	}
	for (size_t i = 0; i < LOOP_COUNT; i++)
		in[i] = (float)(r + 1);
	s->start_ms[r] = mono_ms();
	for (;;) {
		long k = __atomic_load_n(&s->kill_ms, __ATOMIC_ACQUIRE);

		alarm(TH_WATCHDOG_S);
		if (k && mono_ms() - k > 2 * KILL_LIMIT_MS) {
			seen_note(s, r, COMM_OK, "all-reduces still succeed long after the kill");
			return th_bail(c);
		}
		rc = comm_allreduce(c, in, out, LOOP_COUNT, COMM_FLOAT32, COMM_SUM, NULL);
		if (rc != COMM_OK)
			break;
		for (int i = 0; i < 3; i++) {
			if (out[probe[i]] != want) {
				fprintf(stderr,
					"rank %d: all-reduce %d: element %zu is %g, not %g\n", r,
					s->iters[r], probe[i], (double)out[probe[i]],
					(double)want);
				seen_note(s, r, COMM_OK, "wrong values");
				return th_bail(c);
			}
		}
		__atomic_fetch_add(&s->iters[r], 1, __ATOMIC_RELEASE);
	}
	seen_note(s, r, rc, comm_last_error(c));
	alarm(20); /* leaving must not hang either */
	comm_finalize(c);
	return 0;
}

/*
 * H2: B SIGKILLed under a 2+2 job's all-reduces, or (G1 across daemons)
 * stopped with SIGTERM: it drains (the all-reduce under way ends, the
 * next is refused), every rank gets COMM_ERR_SHUTDOWN, and B exits 0.
 * Either way A's ranks fail within the bound, and a job on A alone runs
 * all-reduces all the while (rank_iso_y), and 8 s after, untouched.
 */
static void test_lose_member(int stop)
{
	static const int of[N] = { 0, 0, 1, 1 };
	const char *how = stop ? "stopped (SIGTERM)" : "killed";
	const struct th_daemon *ds[2] = { &da, &db };
	struct seen *s = seen_new();
	struct iso *by = mmap(NULL, sizeof *by, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS,
			      -1, 0);
	struct th_ranks rs, rby;
	long per_op, limit = KILL_LIMIT_MS + (stop ? DRAIN_MS : 0);
	int failed, b_rc = 0;

	REQUIRE(by != MAP_FAILED, "mmap");
	memset(by, 0, sizeof *by);
	REQUIRE(th_ranks_start(&rby, &da, stop ? "faults-bystander-stop" : "faults-bystander", 2,
			       rank_iso_y, by) == 0, "fork");
	REQUIRE(th_ranks_start_nodes(&rs, ds, of, da.peer, stop ? "faults-stop" : "faults-kill", N,
				     rank_loop, s) == 0, "fork");
	/* B goes about half way through an all-reduce */
	if ((per_op = seen_half_way(s, 2)) >= 0) {
		printf("ok: 2+2 job over A and B ran %d all-reduces of 64 MiB (%ld ms each); B %s\n",
		       __atomic_load_n(&s->iters[0], __ATOMIC_ACQUIRE), per_op, how);
	} else {
		CHECK(0, "the 2+2 job over A and B did not run two all-reduces within %d ms",
		      PROGRESS_LIMIT_MS);
		printf("FAIL: the 2+2 job over A and B made no progress; B %s anyway\n", how);
	}
	fflush(stdout);
	__atomic_store_n(&s->kill_ms, mono_ms(), __ATOMIC_RELEASE);
	__atomic_store_n(&by->fail_ms, s->kill_ms, __ATOMIC_RELEASE);
	if (stop) {
		b_rc = th_daemon_stop(&db); /* exit 0, no error logged */
	} else {
		kill(db.pid, SIGKILL);
		waitpid(db.pid, NULL, 0);
		th_daemon_cleanup(&db);
	}
	CHECK(b_rc == 0, "commd B did not stop cleanly (see above)");
	failed = th_ranks_wait(&rs);
	CHECK(failed == 0, "B %s: %d ranks failed (see above)", how, failed);
	if (!th_daemon_alive(&da)) {
		CHECK(0, "commd A died when B was %s", how);
		printf("FAIL: commd A died when B was %s\n", how);
	}
	for (int r = 0; r < N; r++) {
		long ms = s->err_ms[r] - s->kill_ms;
		int on_a = of[r] == 0, ok;
		/*
		 * Stopped: every rank hears that B shuts down (A's, that B refused
		 * the next op for it). Killed: A's that B is lost; B's own lost
		 * their daemon, and any error will do, as long as it comes.
		 */
		comm_result_t want = stop ? COMM_ERR_SHUTDOWN : on_a ? COMM_ERR_PEER_LOST : COMM_OK;

		if (!s->done[r]) {
			CHECK(0, "B %s: rank %d on %c never returned from its loop", how, r,
			      on_a ? 'A' : 'B');
			continue;
		}
		ok = s->rc[r] != COMM_OK && ms >= 0 && ms <= limit && (!want || (comm_result_t)s->rc[r] == want);
		printf("%s: rank %d on %c, after %d all-reduces: %s %ld ms after B was %s: "
		       "\"%s\" (want %s)\n",
		       ok ? "ok" : "FAIL", r, on_a ? 'A' : 'B', s->iters[r],
		       comm_result_name((comm_result_t)s->rc[r]), ms, how, s->detail[r],
		       want ? comm_result_name(want) : "any error");
		CHECK(ok, "B %s: rank %d: %s after %ld ms (limit %ld), want %s: %s", how, r,
		      comm_result_name((comm_result_t)s->rc[r]), ms, limit,
		      want ? comm_result_name(want) : "any error", s->detail[r]);
	}
	failed = th_ranks_wait(&rby);
	for (int r = 0; r < 2; r++)
		CHECK(by->y_rc[r] == COMM_OK, "B %s: the job on A alone, rank %d: %s after %d "
		      "all-reduces: %s", how, r, comm_result_name((comm_result_t)by->y_rc[r]),
		      by->y_ops[r], by->y_detail[r]);
	CHECK(failed == 0, "B %s: the job on A alone: %d ranks failed", how, failed);
	printf("%s: a job on A alone ran %d all-reduces meanwhile, the last %d s after B was %s, "
	       "every one right\n",
	       failed || by->y_rc[0] || by->y_rc[1] ? "FAIL" : "ok", by->y_ops[0],
	       ISO_RUN_MS / 1000, how);
	fflush(stdout);
	munmap(by, sizeof *by);
	munmap(s, sizeof *s);
}

/* --- a sender that leaves with its messages on their way --------------------- */

#define LS_MSGS 4               /* messages rank 0 sends rank 1, then it leaves */

/* What the ranks of a left-sender case share with the test. */
struct leftsend {
	int early;                  /* rank 1 posts its recvs before rank 0 sends */
	int go;                     /* rank 1's recvs are posted */
	int left;                   /* rank 0 left (comm_finalize returned) */
	long left_ms;
	int rc[LS_MSGS + 1];        /* rank 1's recvs; the last has no message */
	long last_ms;               /* when the last one failed */
	char detail[200];
	int bad;                    /* a message arrived wrong */
};

static size_t ls_len(int early, int k)
{
	/* recvs posted late meet sends that ended before them: small, sent eagerly */
	static const size_t late[LS_MSGS] = { 100, 1000, 2000, 4000 };
	static const size_t soon[LS_MSGS] = { 100, 4096, 1u << 20, (3u << 20) + 5 };

	return early ? soon[k] : late[k];
}

/*
 * Rank 0 (on A) sends rank 1 (on B) LS_MSGS messages and leaves at once;
 * rank 1 posts LS_MSGS + 1 recvs, before the sends (early) or only once B
 * knows rank 0 left (a barrier fails). Its leave may reach B before its
 * messages do: the first LS_MSGS recvs must get them, byte for byte, and
 * the last must fail PEER_LOST saying how many it sent, at once, not at
 * the deadline.
 */
static int rank_leftsend(int r, int n, void *arg)
{
	struct leftsend *s = arg;
	comm_request_t *req[LS_MSGS + 1];
	uint8_t *buf[LS_MSGS + 1];
	comm_t *c;

	setenv("COMM_TIMEOUT", "30000", 1);
	if (th_join(&c, r, n) < 0)
		return 1;
	for (int k = 0; k <= LS_MSGS; k++)
		if (!(buf[k] = comm_mem_alloc(c, k < LS_MSGS ? ls_len(s->early, k) : 64)))
			return th_bail(c);
	if (r == 0) {
		while (s->early && !__atomic_load_n(&s->go, __ATOMIC_ACQUIRE))
			usleep(1000);
		for (int k = 0; k < LS_MSGS; k++) {
			for (size_t i = 0; i < ls_len(s->early, k); i++)
				buf[k][i] = (uint8_t)(i * 7 + k);
			if (comm_send(c, buf[k], ls_len(s->early, k), COMM_UINT8, 1, NULL) != COMM_OK)
				return th_bail(c);
		}
		comm_finalize(c);
		s->left_ms = mono_ms();
		__atomic_store_n(&s->left, 1, __ATOMIC_RELEASE);
		return 0;
	}
	if (!s->early) {
		comm_result_t rc;

		while (!__atomic_load_n(&s->left, __ATOMIC_ACQUIRE))
			usleep(1000);
		/* a collective fails once B knows rank 0 left: recvs posted then find it gone */
		if ((rc = comm_barrier(c, NULL)) != COMM_ERR_PEER_LOST) {
			fprintf(stderr, "rank 1: a barrier after rank 0 left: %s, want PEER_LOST\n",
				comm_result_name(rc));
			return th_bail(c);
		}
	}
	comm_group_start(c);
	for (int k = 0; k <= LS_MSGS; k++)
		comm_recv(c, buf[k], k < LS_MSGS ? ls_len(s->early, k) : 64, COMM_UINT8, 0, &req[k]);
	comm_group_end(c);
	__atomic_store_n(&s->go, 1, __ATOMIC_RELEASE);
	for (int k = 0; k <= LS_MSGS; k++) {
		alarm(TH_WATCHDOG_S);
		s->rc[k] = comm_wait(req[k], -1);
		if (k == LS_MSGS) {
			s->last_ms = mono_ms();
			snprintf(s->detail, sizeof s->detail, "%s", comm_last_error(c));
		}
		for (size_t i = 0; k < LS_MSGS && s->rc[k] == COMM_OK && i < ls_len(s->early, k); i++)
			s->bad |= buf[k][i] != (uint8_t)(i * 7 + k);
	}
	return th_leave(c, r);
}

static void test_left_sender(int early)
{
	static const int of[2] = { 0, 1 };
	const struct th_daemon *ds[2] = { &da, &db };
	struct leftsend *s = mmap(NULL, sizeof *s, PROT_READ | PROT_WRITE,
				  MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	long ms;
	int failed, ok = 1;

	REQUIRE(s != MAP_FAILED, "mmap");
	memset(s, 0, sizeof *s);
	s->early = early;
	failed = th_run_ranks_nodes(ds, of, da.peer, early ? "faults-left-early" : "faults-left-late",
				    2, rank_leftsend, s);
	CHECK(failed == 0, "a sender that left: %d ranks failed", failed);
	for (int k = 0; k < LS_MSGS; k++) {
		ok &= s->rc[k] == COMM_OK;
		CHECK(s->rc[k] == COMM_OK, "recv %d of a message sent before its sender left: %s", k + 1,
		      comm_result_name((comm_result_t)s->rc[k]));
	}
	CHECK(!s->bad, "a message from a sender that left arrived wrong");
	ms = s->last_ms - s->left_ms;
	ok &= !s->bad && s->rc[LS_MSGS] == COMM_ERR_PEER_LOST && ms <= KILL_LIMIT_MS &&
	      strstr(s->detail, "after sending rank 1 4 messages");
	CHECK(s->rc[LS_MSGS] == COMM_ERR_PEER_LOST, "the recv with no message: %s, want PEER_LOST",
	      comm_result_name((comm_result_t)s->rc[LS_MSGS]));
	CHECK(ms <= KILL_LIMIT_MS, "the recv with no message failed %ld ms after the leave", ms);
	CHECK(strstr(s->detail, "after sending rank 1 4 messages"),
	      "the recv with no message: \"%s\" does not say how many were sent", s->detail);
	printf("%s: rank 0 on A sent rank 1 on B %d messages and left, rank 1's recvs posted %s: "
	       "all %d in, byte for byte; the next recv failed %ld ms after the leave: %s: \"%s\"\n",
	       ok ? "ok" : "FAIL", LS_MSGS, early ? "before the sends" : "after the leave",
	       LS_MSGS, ms, comm_result_name((comm_result_t)s->rc[LS_MSGS]), s->detail);
	munmap(s, sizeof *s);
}

/* --- A goes on alone ----------------------------------------------------------------- */

static int rank_after(int r, int n, void *arg)
{
	static const struct oc_case cases[] = {
		{ OC_AR, COMM_FLOAT32, COMM_SUM, 7, 0, OC_ZC, OC_OOP, 0, 0 },
		{ OC_AR, COMM_INT32, COMM_SUM, 1u << 20, 0, OC_ZC, OC_OOP, 0, 0 },
		{ OC_AR, COMM_FLOAT16, COMM_SUM, 4097, 0, OC_STAGED, OC_INPLACE, 0, 0 },
	};
	comm_t *c;
	int bad = 0;

	if (th_join(&c, r, n) < 0)
		return 1;
	for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
		int rc = oc_run_case(c, &cases[i], 0xafe00001u + (uint32_t)i * 131, r, n);

		if (rc < 0)
			return th_bail(c);
		bad |= rc;
	}
	return th_leave(c, r) | bad;
}

/* --- B stopped (SIGTERM) while A, sending to it, is frozen ----------------------- */

#define FROZEN_BYTES (64u << 20)
#define FROZEN_ROUNDS 3          /* the stop raced the net thread: it hung about 1 in 2 */
#define FROZEN_STOP_LIMIT_MS (DRAIN_MS + 5000)

/* Rank 0 on A sends 64 MiB messages to rank 1 on B until one fails; *got counts B's. */
static int rank_frozen(int r, int n, void *arg)
{
	int *got = arg;
	comm_result_t rc;
	comm_t *c;
	unsigned char *buf;

	if (th_join(&c, r, n) < 0)
		return 1;
	if (!(buf = comm_mem_alloc(c, FROZEN_BYTES))) {
		fprintf(stderr, "rank %d: comm_mem_alloc: %s\n", r, comm_last_error(c));
		return th_bail(c);
	}
	for (int i = 0;; i++) {
		alarm(TH_WATCHDOG_S);
		buf[0] = (unsigned char)i;
		rc = r == 0 ? comm_send(c, buf, FROZEN_BYTES, COMM_UINT8, 1, NULL)
			    : comm_recv(c, buf, FROZEN_BYTES, COMM_UINT8, 0, NULL);
		if (rc != COMM_OK)
			break;
		if (r == 1 && buf[0] != (unsigned char)i) {
			fprintf(stderr, "rank 1: message %d starts with %d\n", i, buf[0]);
			return th_bail(c);
		}
		if (r == 1)
			__atomic_store_n(got, i + 1, __ATOMIC_RELEASE);
	}
	alarm(20);
	comm_finalize(c);
	return 0; /* the job fails with B gone: any error ends the loop */
}

/* Whether process pid has a thread named name. */
static int has_thread(pid_t pid, const char *name)
{
	char path[300], comm[32];
	struct dirent *e;
	int found = 0;
	DIR *dp;

	snprintf(path, sizeof path, "/proc/%d/task", (int)pid);
	if (!(dp = opendir(path)))
		return 0;
	while (!found && (e = readdir(dp))) {
		FILE *f;

		if (e->d_name[0] == '.')
			continue;
		snprintf(path, sizeof path, "/proc/%d/task/%s/comm", (int)pid, e->d_name);
		if ((f = fopen(path, "r"))) {
			found = fgets(comm, sizeof comm, f) && strcspn(comm, "\n") == strlen(name) &&
				strncmp(comm, name, strlen(name)) == 0;
			fclose(f);
		}
	}
	closedir(dp);
	return found;
}

/*
 * B gets SIGTERM while A, whose rank sends it 64 MiB messages, is frozen
 * (SIGSTOP) mid-message: B's receive of it, matched by UCX, never ends,
 * and no endpoint of B's says so. B's data plane thread (commd-net) must
 * end within the drain and a few seconds all the same, FROZEN_ROUNDS
 * times (B started afresh each time); then A is thawed, so that B's
 * close of its endpoint to A ends too, and B must exit 0, A going on.
 */
static void test_frozen_sender(void)
{
	const struct th_daemon *ds[2] = { &da, &db };
	int *got = mmap(NULL, sizeof *got, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	struct timespec t0;
	struct th_ranks rs;

	REQUIRE(got != MAP_FAILED, "mmap");
	for (int round = 0; round < FROZEN_ROUNDS; round++) {
		int rc, failed, ended;
		long ms;

		*got = 0;
		REQUIRE(th_daemon_start_peer(&db, "--threads", "2", NULL) == 0,
			"commd B did not start (frozen round %d)", round);
		REQUIRE(th_ranks_start_nodes(&rs, ds, (const int[]){ 0, 1 }, da.peer, "faults-frozen",
					     2, rank_frozen, got) == 0, "fork");
		for (int i = 0; i < 2000 && __atomic_load_n(got, __ATOMIC_ACQUIRE) < 2; i++)
			usleep(10 * 1000);
		CHECK(*got >= 2, "frozen round %d: B took %d messages in 20 s", round, *got);
		CHECK(has_thread(db.pid, "commd-net"), "frozen round %d: B has no thread commd-net",
		      round);
		usleep(100 * 1000 * (round + 1)); /* mid-message, at a new place each round */
		kill(da.pid, SIGSTOP);
		usleep(300 * 1000);
		kill(db.pid, SIGTERM);
		clock_gettime(CLOCK_MONOTONIC, &t0);
		while (!(ended = !has_thread(db.pid, "commd-net")) &&
		       th_secs_since(&t0) * 1000 < FROZEN_STOP_LIMIT_MS)
			usleep(10 * 1000);
		ms = (long)(th_secs_since(&t0) * 1000);
		kill(da.pid, SIGCONT);
		rc = th_daemon_reap(&db);
		CHECK(ended, "frozen round %d: B's data plane thread still runs %ld ms after SIGTERM "
		      "(limit %d)", round, ms, FROZEN_STOP_LIMIT_MS);
		CHECK(rc == 0, "frozen round %d: B did not stop cleanly (see above)", round);
		failed = th_ranks_wait(&rs);
		CHECK(failed == 0, "frozen round %d: %d ranks failed", round, failed);
		printf("%s: B stopped (SIGTERM) with A frozen mid-message (%d messages of 64 MiB in): "
		       "its data plane thread ended after %ld ms, exit %s\n",
		       ended && rc == 0 && !failed ? "ok" : "FAIL", *got, ms, rc ? "unclean" : "0");
		fflush(stdout);
		CHECK(th_daemon_alive(&da), "frozen round %d: commd A died", round);
	}
	munmap(got, sizeof *got);
}

/*
 * By now A has talked to 5 incarnations of B, each with an endpoint of
 * its own, all gone: A frees each once it is closed and no op names it.
 */
static void test_endpoints_freed(void)
{
	char line[512];
	int freed = 0;

	for (int i = 0; i < 100 && !freed; i++) {
		net_line(&da, line, sizeof line);
		if (!(freed = strstr(line, "; endpoints: 0") != NULL))
			usleep(50 * 1000);
	}
	CHECK(freed, "A keeps endpoints to daemons gone: %s", line);
	printf("%s: A, after 5 incarnations of B gone: %s\n", freed ? "ok" : "FAIL", line);
}

int main(void)
{
	struct timespec t0;
	int fds0, fds0a, fds0b, failed;

	setenv("COMM_TIMEOUT", "60000", 1);
	clock_gettime(CLOCK_MONOTONIC, &t0);
	if (nodes_start(&da, &db) < 0)
		return CHECK_EXIT();
	printf("commd A: peers %s; commd B: peers %s\n", da.peer, db.peer);
	fds0 = th_count_fds(da.pid);
	test_noroot(fds0);
	/* UCX's connections between A and B, kept from the first job over both */
	failed = th_run_ranks_nodes((const struct th_daemon *[]){ &da, &db }, (const int[]){ 0, 1 },
				    da.peer, "faults-first", 2, th_rank_sum, NULL);
	CHECK(failed == 0, "a first job over A and B: %d ranks failed", failed);
	fds0a = th_count_fds(da.pid);
	fds0b = th_count_fds(db.pid);
	for (int m = ISO_UNTAKEN; m <= ISO_BCAST; m++)
		test_isolation((enum iso_mode)m, fds0a, fds0b);
	test_left_sender(0);
	test_left_sender(1);
	test_lose_member(1);
	REQUIRE(th_daemon_start_peer(&db, "--threads", "2", NULL) == 0, "commd B did not start again");
	test_lose_member(0);
	if (!th_daemon_alive(&da)) {
		th_daemon_dump_log(&da);
		th_daemon_cleanup(&da);
		printf("FAIL: %.1f s in all\n", th_secs_since(&t0));
		return CHECK_EXIT();
	}
	test_frozen_sender();
	test_endpoints_freed();
	failed = th_run_ranks(&da, "faults-after", 2, rank_after, NULL);
	CHECK(failed == 0, "a 2-rank job on A after B died: %d ranks failed", failed);
	printf("%s: a new 2-rank job on A alone: all-reduces of 7, 1 Mi and 4097 elements\n",
	       failed ? "FAIL" : "ok");
	CHECK(th_daemon_alive(&da), "commd A died");
	CHECK(th_daemon_stop(&da) == 0, "commd A did not stop cleanly");
	printf("%s: %.1f s in all\n", check_failures ? "FAIL" : "ok", th_secs_since(&t0));
	return CHECK_EXIT();
}
