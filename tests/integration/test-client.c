/*
 * test-client.c: libcomm inside a rank's process, against the real commd:
 * a fork's child holds a copy of the comm that is cut off from commd (its
 * use refused, comm_finalize frees it and leaves the parent's rank as it
 * was; a rank killed while a child of its lives is lost to the others at
 * once, not at the deadline); comm_wait's limit holds while signals keep
 * coming; and once commd is gone a staged op fails with
 * COMM_ERR_DAEMON_UNREACHABLE (not NO_MEMORY) and so does comm_finalize,
 * whether or not libcomm had noticed before. In a CUDA build, a rank that
 * never used CUDA does not load the driver library (which would start the
 * driver, and CUDA could then not be used in the rank's fork children): the
 * test runs itself again with a stand-in libcuda.so.1 in its library path
 * that marks its loading.
 */
#include <config.h>

#include <dlfcn.h>
#include <errno.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "check.h"
#include "comm.h"
#include "harness.h"

#define COUNT 1024
#define LATE_MS 1500          /* how late rank 1 comes to the op comm_wait waits for */
#define WAIT_MS 200           /* that comm_wait's limit */
#define BIG ((size_t)100 << 20) /* a staged buffer past every segment made yet */

static struct th_daemon d, d2;

static _Atomic int *child_go; /* shared: the test lets rank_killed's child go */
static _Atomic int *held;     /* shared: rank_holding's ranks that have formed; 0 lets them go */

/* All-reduce rank + 1 + i on c and check it; 0 when right. */
static int sum_right(comm_t *c, int r, int n, int i)
{
	int32_t v[COUNT];
	comm_result_t rc;

	for (int k = 0; k < COUNT; k++)
		v[k] = r + 1 + i + k;
	rc = comm_allreduce(c, v, v, COUNT, COMM_INT32, COMM_SUM, NULL);
	if (!th_want_rc(c, r, "all-reduce", rc, COMM_OK))
		return 1;
	for (int k = 0; k < COUNT; k++) {
		if (v[k] != n * (n + 1) / 2 + n * (i + k)) {
			fprintf(stderr, "rank %d: element %d: %d, want %d\n", r, k, v[k],
				n * (n + 1) / 2 + n * (i + k));
			return 1;
		}
	}
	return 0;
}

/* Join and do a first all-reduce, right; -1 (the comm gone) when not. */
static int join_summed(comm_t **c, int r, int n)
{
	if (th_join(c, r, n) < 0)
		return -1;
	if (sum_right(*c, r, n, 0)) {
		th_bail(*c);
		return -1;
	}
	return 0;
}

/*
 * Rank 0 forks mid-job; the child's every call on the copy is refused,
 * naming the fork, and its comm_finalize frees the copy; then both ranks
 * go on with all-reduces, right.
 */
static int rank_forked(int r, int n, void *arg)
{
	comm_request_t *req = NULL;
	comm_t *c;
	int32_t v = 1;
	char why[256];
	pid_t pid;
	int st;

	(void)arg;
	if (join_summed(&c, r, n) < 0)
		return 1;
	if (r == 0) {
		/* an op outstanding across the fork: the child cannot wait for it */
		if (comm_barrier(c, &req) != COMM_OK)
			return th_bail(c);
		pid = fork();
		if (pid < 0)
			return th_bail(c);
		if (pid == 0) {
			comm_result_t a = comm_allreduce(c, &v, &v, 1, COMM_INT32, COMM_SUM, NULL);
			int bad = !strstr(comm_last_error(c), "forked");
			comm_result_t w = comm_wait(req, 100);
			comm_result_t f;

			bad |= comm_mem_alloc(c, 64) != NULL;
			/* the refusal before it is not nested in this one's text */
			bad |= strncmp(comm_last_error(c), "mem alloc: this communicator is process",
				       39) != 0 || !strstr(comm_last_error(c), "forked");
			snprintf(why, sizeof why, "%s", comm_last_error(c));
			f = comm_finalize(c);
			if (a != COMM_ERR_INVALID_ARG || w != COMM_ERR_INVALID_ARG || bad ||
			    f != COMM_OK) {
				fprintf(stderr, "forked child: all-reduce %s, wait %s, finalize %s, "
					"last error: %s\n", comm_result_name(a),
					comm_result_name(w), comm_result_name(f),
					why);
				_exit(1);
			}
			_exit(0);
		}
		if (waitpid(pid, &st, 0) != pid || !WIFEXITED(st) || WEXITSTATUS(st) != 0) {
			fprintf(stderr, "rank 0: its forked child failed (status %#x)\n", st);
			return th_bail(c);
		}
		if (!th_want_rc(c, r, "barrier posted before the fork", comm_wait(req, -1),
				COMM_OK))
			return th_bail(c);
	} else if (comm_barrier(c, NULL) != COMM_OK) {
		return th_bail(c);
	}
	for (int i = 1; i <= 3; i++)
		if (sum_right(c, r, n, i))
			return th_bail(c);
	return th_leave(c, r);
}

/*
 * Rank 0 forks a child that lingers (up to a minute, until the test lets it
 * go), then is SIGKILLed: rank 1's next all-reduce gets PEER_LOST. The
 * job's deadline is 10 s: TIMEOUT would mean commd did not see rank 0 go,
 * because the child held its connection.
 */
static int rank_killed(int r, int n, void *arg)
{
	comm_t *c;
	comm_result_t rc;
	int32_t v = 1;

	(void)arg;
	if (join_summed(&c, r, n) < 0)
		return 1;
	if (r == 0) {
		if (fork() == 0) {
			for (int i = 0; i < 6000 && !atomic_load(child_go); i++)
				usleep(10000);
			_exit(0);
		}
		raise(SIGKILL);
	}
	rc = comm_allreduce(c, &v, &v, 1, COMM_INT32, COMM_SUM, NULL);
	if (!th_want_rc(c, r, "all-reduce after rank 0 was killed", rc, COMM_ERR_PEER_LOST))
		return th_bail(c);
	comm_finalize(c);
	return 0;
}

static void on_tick(int sig)
{
	(void)sig;
}

/*
 * Rank 0 waits WAIT_MS for an all-reduce rank 1 comes to LATE_MS late,
 * with a SIGALRM every 5 ms (SA_RESTART): COMM_INPROGRESS after about
 * WAIT_MS, not COMM_OK once rank 1 came; then the op completes, right.
 */
static int rank_ticked(int r, int n, void *arg)
{
	struct sigaction sa = { .sa_handler = on_tick, .sa_flags = SA_RESTART };
	struct itimerval tick = { { 0, 5000 }, { 0, 5000 } }, off = { { 0, 0 }, { 0, 0 } };
	comm_request_t *req;
	struct timespec t0;
	comm_result_t rc;
	comm_t *c;
	int32_t v[COUNT];
	double took;

	(void)arg;
	if (th_join(&c, r, n) < 0)
		return 1;
	alarm(0); /* the watchdog's SIGALRM is the tick's now; the test's own limit guards */
	if (r == 1) {
		usleep(LATE_MS * 1000);
		if (sum_right(c, r, n, 7))
			return th_bail(c);
		return th_leave(c, r);
	}
	for (int k = 0; k < COUNT; k++)
		v[k] = r + 1 + 7 + k;
	if (comm_allreduce(c, v, v, COUNT, COMM_INT32, COMM_SUM, &req) != COMM_OK)
		return th_bail(c);
	sigaction(SIGALRM, &sa, NULL);
	setitimer(ITIMER_REAL, &tick, NULL);
	clock_gettime(CLOCK_MONOTONIC, &t0);
	rc = comm_wait(req, WAIT_MS);
	took = th_secs_since(&t0);
	setitimer(ITIMER_REAL, &off, NULL);
	if (rc != COMM_INPROGRESS || took * 1000 >= LATE_MS) {
		fprintf(stderr, "rank 0: comm_wait(%d ms) under a 5 ms timer: %s after %.0f ms "
			"(rank 1 came after %d ms)\n", WAIT_MS, comm_result_name(rc), took * 1000,
			LATE_MS);
		return th_bail(c);
	}
	if (!th_want_rc(c, r, "the wait without limit", comm_wait(req, -1), COMM_OK))
		return th_bail(c);
	for (int k = 0; k < COUNT; k++)
		if (v[k] != n * (n + 1) / 2 + n * (7 + k))
			return th_bail(c);
	return th_leave(c, r);
}

/*
 * One rank; commd is SIGKILLed under it. A staged all-reduce past every
 * segment (a new one to register) then fails DAEMON_UNREACHABLE, and so
 * does comm_finalize after it; a second comm, broken unnoticed until
 * finalize, gives the same.
 */
static int rank_orphaned(int r, int n, void *arg)
{
	const pid_t *daemon = arg;
	comm_t *c, *c2;
	comm_result_t a, f, f2;
	int32_t *big = malloc(BIG);
	comm_config_t cfg = COMM_CONFIG_INIT;
	comm_request_t *req;
	int32_t v = 1;

	if (!big || th_join(&c, r, n) < 0)
		return 1;
	cfg.job = "client-orphaned-2";
	cfg.rank = 0;
	cfg.world_size = 1;
	if (!th_want_rc(c, r, "a second comm", comm_init(&c2, &cfg), COMM_OK))
		return th_bail(c);
	if (comm_barrier(c2, &req) != COMM_OK || comm_wait(req, -1) != COMM_OK)
		return th_bail(c);
	memset(big, 1, BIG);
	kill(*daemon, SIGKILL);
	usleep(100 * 1000);
	a = comm_allreduce(c, big, big, BIG / sizeof *big, COMM_INT32, COMM_SUM, NULL);
	if (!th_want_rc(c, r, "a staged all-reduce of 100 MB with commd gone", a,
			COMM_ERR_DAEMON_UNREACHABLE))
		return 1;
	f = comm_finalize(c);
	if (!th_want_rc(NULL, r, "comm_finalize after that", f, COMM_ERR_DAEMON_UNREACHABLE))
		return 1;
	(void)comm_allreduce(c2, &v, &v, 1, COMM_INT32, COMM_SUM, &req); /* unnoticed yet */
	f2 = comm_finalize(c2);
	if (!th_want_rc(NULL, r, "comm_finalize of a comm with an op out, commd gone", f2,
			COMM_ERR_DAEMON_UNREACHABLE))
		return 1;
	free(big);
	return 0;
}

/* A rank of a job that forms, then holds until the test lets it go. */
static int rank_holding(int r, int n, void *arg)
{
	comm_t *c;

	(void)arg;
	if (th_join(&c, r, n) < 0)
		return 1;
	atomic_fetch_add(held, 1);
	while (atomic_load(held) > 0)
		usleep(10 * 1000);
	return th_leave(c, r);
}

/*
 * A second run of a job whose name a formed job holds (its own token, as
 * commrun draws one a run): COMM_ERR_BUSY telling it to choose another name.
 */
static int rank_second_run(int r, int n, void *arg)
{
	comm_result_t rc;
	comm_t *c = NULL;

	(void)r;
	(void)n;
	(void)arg;
	alarm(TH_WATCHDOG_S);
	setenv("COMM_TOKEN", "a-token-of-another-run", 1);
	setenv("COMM_WORLD_SIZE", "2", 1);
	rc = comm_init(&c, NULL);
	if (rc != COMM_ERR_BUSY || !strstr(comm_last_error(NULL), "choose another job name")) {
		fprintf(stderr, "a second run of a formed job: %s: %s\n", comm_result_name(rc),
			comm_last_error(NULL));
		if (c)
			comm_finalize(c);
		return 1;
	}
	return 0;
}

/*
 * Rank 1 says world size 3 to a job rank 0 made with 2: refused at once;
 * rank 0's join then times out (COMM_TIMEOUT=1500) naming rank 1's refusal.
 */
static int rank_refused_join(int r, int n, void *arg)
{
	comm_result_t rc;
	comm_t *c = NULL;
	int ok;

	(void)n;
	(void)arg;
	alarm(TH_WATCHDOG_S);
	setenv("COMM_TIMEOUT", "1500", 1);
	if (r == 1) {
		/* rank 0 makes the job: wait for commd's log to say so */
		for (int i = 0; i < 500 && th_log_count(&d, "job client-refused: created", "") < 1;
		     i++)
			usleep(20 * 1000);
		setenv("COMM_WORLD_SIZE", "3", 1);
	}
	rc = comm_init(&c, NULL);
	ok = r == 1 ? rc == COMM_ERR_INVALID_ARG
		    : rc == COMM_ERR_TIMEOUT && strstr(comm_last_error(NULL), "rank 1") &&
			      strstr(comm_last_error(NULL), "was refused") &&
			      strstr(comm_last_error(NULL), "says 3");
	if (!ok) {
		fprintf(stderr, "rank %d: %s: %s\n", r, comm_result_name(rc), comm_last_error(NULL));
		if (c)
			comm_finalize(c);
	}
	return !ok;
}

/*
 * A rank between ops while its commd stops (SIGTERM, nothing in flight):
 * its next op fails COMM_ERR_SHUTDOWN saying commd shut down, not
 * DAEMON_UNREACHABLE "commd closed the connection".
 */
static int rank_idle_at_stop(int r, int n, void *arg)
{
	int32_t v = 1;
	comm_result_t rc;
	comm_t *c;

	(void)arg;
	if (th_join(&c, r, n) < 0)
		return 1;
	atomic_store(held, 1);
	while (atomic_load(held) == 1)
		usleep(10 * 1000);
	rc = comm_allreduce(c, &v, &v, 1, COMM_INT32, COMM_SUM, NULL);
	if (!th_want_rc(c, r, "all-reduce after commd stopped", rc, COMM_ERR_SHUTDOWN) ||
	    !strstr(comm_last_error(c), "shutting down")) {
		fprintf(stderr, "rank %d: %s\n", r, comm_last_error(c));
		comm_abort(c);
		return 1;
	}
	comm_finalize(c);
	return 0;
}

/*
 * commd stopped (SIGSTOP) by the test: comm_init with COMM_TIMEOUT=1000
 * and COMM_DAEMON_WAIT=6000 gives up 6 s later with COMM_ERR_TIMEOUT
 * saying commd did not answer, not never.
 */
static int rank_unanswered(int r, int n, void *arg)
{
	struct timespec t0;
	comm_result_t rc;
	comm_t *c = NULL;
	double took;

	(void)r;
	(void)n;
	(void)arg;
	alarm(TH_WATCHDOG_S); /* a wait without limit ends there */
	setenv("COMM_TIMEOUT", "1000", 1);
	setenv("COMM_DAEMON_WAIT", "6000", 1); /* 90 s by default */
	clock_gettime(CLOCK_MONOTONIC, &t0);
	rc = comm_init(&c, NULL);
	took = th_secs_since(&t0);
	if (rc != COMM_ERR_TIMEOUT || !strstr(comm_last_error(NULL), "did not answer") ||
	    took < 5.5 || took > 20) {
		fprintf(stderr, "comm_init under a stopped commd: %s after %.1f s: %s\n",
			comm_result_name(rc), took, comm_last_error(NULL));
		return 1;
	}
	return 0;
}

#ifdef HAVE_CUDA
static char driver_dir[64]; /* the stand-in libcuda.so.1 and the file it marks */

/*
 * Run this program again with the stand-in libcuda.so.1 first in the
 * library path. The loader reads LD_LIBRARY_PATH only at the start, so
 * the ranks forked from the run again find the stand-in and the commd it
 * starts, given the path as it was, does not. Returns when it is the run
 * again; -1 when the stand-in is missing.
 */
static int driver_stand_in(char **argv)
{
	const char *top = getenv("abs_top_builddir"), *dir = getenv("TEST_CLIENT_DRIVER_DIR");
	const char *path = getenv("LD_LIBRARY_PATH");
	char lib[512], link[128], *paths;

	if (dir) {
		/* the loader keeps the path it started with; commd gets the old one */
		snprintf(driver_dir, sizeof driver_dir, "%s", dir);
		path += strlen(dir);
		if (*path)
			setenv("LD_LIBRARY_PATH", path + 1, 1);
		else
			unsetenv("LD_LIBRARY_PATH");
		return 0;
	}
	if (!top)
		return -1;
	snprintf(lib, sizeof lib, "%s/tests/integration/.libs/fake-libcuda.so", top);
	if (access(lib, R_OK) != 0) {
		fprintf(stderr, "%s: %s\n", lib, strerror(errno));
		return -1;
	}
	snprintf(driver_dir, sizeof driver_dir, "/tmp/test-client-XXXXXX");
	REQUIRE(mkdtemp(driver_dir), "mkdtemp");
	snprintf(link, sizeof link, "%s/libcuda.so.1", driver_dir);
	REQUIRE(symlink(lib, link) == 0, "symlink %s", link);
	REQUIRE(asprintf(&paths, "%s%s%s", driver_dir, path && *path ? ":" : "",
			 path ? path : "") > 0, "asprintf");
	setenv("LD_LIBRARY_PATH", paths, 1);
	setenv("TEST_CLIENT_DRIVER_DIR", driver_dir, 1);
	snprintf(link, sizeof link, "%s/loaded", driver_dir);
	setenv("FAKE_LIBCUDA_MARK", link, 1);
	execv("/proc/self/exe", argv);
	REQUIRE(0, "execv /proc/self/exe: %s", strerror(errno));
	return -1;
}

/*
 * Every rank so far did staged ops on host memory only: none may have
 * loaded the driver. Then a child that loads it makes the mark, which
 * shows the stand-in was there to be found.
 */
static void driver_untouched(void)
{
	char mark[128], dir_link[128];
	pid_t pid;
	int st = -1, none;

	snprintf(mark, sizeof mark, "%s/loaded", driver_dir);
	none = access(mark, F_OK) != 0;
	CHECK(none, "a host-only rank loaded libcuda.so.1 (%s lists its pid)", mark);
	pid = fork();
	if (pid == 0)
		_exit(dlopen("libcuda.so.1", RTLD_NOW) ? 0 : 1);
	REQUIRE(pid > 0, "fork");
	waitpid(pid, &st, 0);
	CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0 && access(mark, F_OK) == 0,
	      "a child's dlopen(\"libcuda.so.1\") did not load the stand-in");
	printf("%s: host-only ranks never load the CUDA driver library\n",
	       none ? "ok" : "FAIL");
	unlink(mark);
	snprintf(dir_link, sizeof dir_link, "%s/libcuda.so.1", driver_dir);
	unlink(dir_link);
	rmdir(driver_dir);
}
#endif

int main(int argc, char **argv)
{
	struct th_ranks rs;
	int fds0, failed;

	(void)argc;
	setvbuf(stdout, NULL, _IOLBF, 0);
#ifdef HAVE_CUDA
	CHECK(driver_stand_in(argv) == 0, "no stand-in libcuda.so.1 (build it: make check)");
#else
	(void)argv;
#endif
	child_go = mmap(NULL, sizeof *child_go, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS,
			-1, 0);
	REQUIRE(child_go != MAP_FAILED, "mmap");
	held = mmap(NULL, sizeof *held, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	REQUIRE(held != MAP_FAILED, "mmap");
	setenv("COMM_TIMEOUT", "60000", 1);
	REQUIRE(th_daemon_start(&d, NULL) == 0, "daemon start");
	CHECK(th_run_ranks(&d, "warm-up", 2, th_rank_sum, NULL) == 0, "warm-up job");
	usleep(200 * 1000);
	fds0 = th_count_fds(d.pid);

	failed = th_run_ranks(&d, "client-forked", 2, rank_forked, NULL);
	CHECK(failed == 0, "fork: %d ranks failed", failed);
	printf("%s: a fork's child: its calls on the comm refused (naming the fork), its "
	       "comm_finalize frees its copy; the parent's rank goes on, right\n",
	       failed ? "FAIL" : "ok");

	setenv("COMM_TIMEOUT", "10000", 1);
	REQUIRE(th_ranks_start(&rs, &d, "client-killed", 2, rank_killed, NULL) == 0, "fork");
	failed = th_ranks_wait(&rs);
	setenv("COMM_TIMEOUT", "60000", 1);
	atomic_store(child_go, 1); /* the orphan exits; init reaps it */
	CHECK(failed == 1, "a rank with a live child killed: %d ranks failed, want rank 0 only",
	      failed);
	printf("%s: a rank SIGKILLed while its forked child lives: the other gets PEER_LOST\n",
	       failed == 1 ? "ok" : "FAIL");

	failed = th_run_ranks(&d, "client-ticked", 2, rank_ticked, NULL);
	CHECK(failed == 0, "wait under signals: %d ranks failed", failed);
	printf("%s: comm_wait(%d ms) under a 5 ms timer returns COMM_INPROGRESS in time\n",
	       failed ? "FAIL" : "ok", WAIT_MS);
	th_check_baseline(&d, fds0, "the fork and signal jobs");
#ifdef HAVE_CUDA
	if (*driver_dir)
		driver_untouched();
#endif

	REQUIRE(th_ranks_start(&rs, &d, "client-named", 2, rank_holding, NULL) == 0, "fork");
	for (int i = 0; i < 2000 && atomic_load(held) < 2; i++)
		usleep(10 * 1000);
	failed = th_run_ranks(&d, "client-named", 1, rank_second_run, NULL);
	atomic_store(held, 0);
	CHECK(failed == 0, "a second run of a formed job's name: not told BUSY");
	CHECK(th_ranks_wait(&rs) == 0, "the job holding the name failed");
	printf("%s: a second run under a formed job's name (another token) is told BUSY: choose "
	       "another job name\n", failed ? "FAIL" : "ok");

	failed = th_run_ranks(&d, "client-refused", 2, rank_refused_join, NULL);
	CHECK(failed == 0, "a join refused: %d ranks failed", failed);
	printf("%s: a join refused (world size 3 to a job of 2): the job's deadline names it\n",
	       failed ? "FAIL" : "ok");

	REQUIRE(th_daemon_start(&d2, NULL) == 0, "second daemon start");
	atomic_store(held, 0);
	REQUIRE(th_ranks_start(&rs, &d2, "client-idle", 1, rank_idle_at_stop, NULL) == 0, "fork");
	for (int i = 0; i < 2000 && atomic_load(held) != 1; i++)
		usleep(10 * 1000);
	CHECK(th_daemon_stop(&d2) == 0, "the second commd did not stop cleanly");
	atomic_store(held, 2);
	failed = th_ranks_wait(&rs);
	CHECK(failed == 0, "a rank idle while commd stopped: not told SHUTDOWN");
	printf("%s: a rank idle while commd stops: its next op fails COMM_ERR_SHUTDOWN\n",
	       failed ? "FAIL" : "ok");

	kill(d.pid, SIGSTOP);
	failed = th_run_ranks(&d, "client-unanswered", 1, rank_unanswered, NULL);
	kill(d.pid, SIGCONT);
	CHECK(failed == 0, "comm_init under a stopped commd: the rank failed");
	printf("%s: comm_init under a stopped commd fails COMM_ERR_TIMEOUT at COMM_DAEMON_WAIT\n",
	       failed ? "FAIL" : "ok");

	failed = th_run_ranks(&d, "client-orphaned", 1, rank_orphaned, &d.pid);
	CHECK(failed == 0, "commd gone: the rank failed");
	printf("%s: commd SIGKILLed: a staged op and comm_finalize say DAEMON_UNREACHABLE\n",
	       failed ? "FAIL" : "ok");
	waitpid(d.pid, NULL, 0);
	th_daemon_cleanup(&d);
	return CHECK_EXIT();
}
