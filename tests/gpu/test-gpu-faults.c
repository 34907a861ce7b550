/*
 * test-gpu-faults.c: RELIABILITY.md's rows A1, B1, G1 and H2 with device
 * memory over two daemons, where each daemon's GPU worker is an NCCL rank
 * of its own (NCCL_HOSTID set per daemon, NCCL over loopback sockets), so
 * that a fault leaves a worker waiting inside NCCL for one that will not
 * come. A 2+2 job loops on 64 MiB float32 all-reduces of cudaMalloc
 * buffers, each result checked; then
 *   B1: one rank posts another count: MISMATCH on every rank, and the
 *       job's next all-reduce is right (nothing reached NCCL);
 *   A1: a rank on B SIGKILLed in the middle of an all-reduce;
 *   G1: daemon B stopped (SIGTERM) in the middle of one: it drains and
 *       exits 0;
 *   H2: daemon B SIGKILLed in the middle of one; its GPU worker, left
 *       behind, must then exit within FAULT_LIMIT_MS (PR_SET_PDEATHSIG).
 * In A1, G1 and H2 every rank that is left must get an error within
 * FAULT_LIMIT_MS, daemon A must live on, its fds come back to where they
 * were, and a new job on device memory must then run right: over A and a
 * fresh B (A1, G1), or on A alone (H2). Exits 77 without a GPU.
 */
#include <cuda_runtime.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "check.h"
#include "comm.h"
#include "gpu-count.h"
#include "harness.h"

#include "../integration/nodes-seen.h"

#define COUNT (16u << 20)      /* float32: 64 MiB */
#define FAULT_LIMIT_MS 10000   /* the ranks left hear of a fault within this */
#define SMALL (1u << 20)       /* the all-reduce of the job after a fault */

static struct th_daemon da, db;
static int ndev;
static int mismatch; /* the ranks forked next do B1 */
static const int split[N] = { 0, 0, 1, 1 }; /* ranks 0, 1 on A; 2, 3 on B */

static int cuda_bad(cudaError_t e, int r, const char *what)
{
	if (e == cudaSuccess)
		return 0;
	fprintf(stderr, "rank %d: %s: %s\n", r, what, cudaGetErrorString(e));
	return 1;
}

/* A device buffer of count floats, each v; NULL when CUDA failed. */
static float *dev_filled(size_t count, float v, int r)
{
	float *host = malloc(count * sizeof *host), *dev = NULL;

	if (!host)
		return NULL;
	for (size_t i = 0; i < count; i++)
		host[i] = v;
	if (cuda_bad(cudaMalloc((void **)&dev, count * sizeof *dev), r, "cudaMalloc") ||
	    cuda_bad(cudaMemcpy(dev, host, count * sizeof *dev, cudaMemcpyHostToDevice), r,
		     "cudaMemcpy")) {
		cudaFree(dev);
		dev = NULL;
	}
	free(host);
	return dev;
}

/* Whether elements 0, the middle and the last of dev[count] are want. */
static int dev_right(const float *dev, size_t count, float want, int r)
{
	size_t probe[3] = { 0, count / 2 + 1, count - 1 };

	for (int i = 0; i < 3; i++) {
		float got;

		if (cuda_bad(cudaMemcpy(&got, dev + probe[i], sizeof got, cudaMemcpyDeviceToHost), r,
			     "cudaMemcpy") ||
		    got != want) {
			fprintf(stderr, "rank %d: element %zu is %g, not %g\n", r, probe[i],
				(double)got, (double)want);
			return 0;
		}
	}
	return 1;
}

/*
 * The rows' job: 64 MiB all-reduces of rank + 1 until one fails (each
 * result checked). With mismatch set, after two of them rank 3 posts one
 * of another count (B1): every rank must get MISMATCH naming the count,
 * and the loop goes on, right.
 */
static int rank_loop(int r, int n, void *arg)
{
	struct seen *s = arg;
	float want = (float)(n * (n + 1) / 2), *in, *out;
	int odd = !mismatch; /* 1 once the mismatched one is done */
	comm_result_t rc;
	comm_t *c;

	setenv("COMM_TIMEOUT", "30000", 1); /* a hang fails, a 64 MiB op needs far less */
	alarm(TH_WATCHDOG_S);
	if (cuda_bad(cudaSetDevice(r % ndev), r, "cudaSetDevice") || th_join(&c, r, n) < 0) {
		seen_note(s, r, COMM_ERR_INTERNAL, "set-up failed (see above)");
		return 1;
	}
	if (!(in = dev_filled(COUNT, (float)(r + 1), r)) || !(out = dev_filled(COUNT, 0, r))) {
		seen_note(s, r, COMM_ERR_NO_MEMORY, "cudaMalloc failed");
		return th_bail(c);
	}
	/* the first starts the job's GPU workers and NCCL: not counted, nor timed */
	if ((rc = comm_allreduce(c, in, out, COUNT, COMM_FLOAT32, COMM_SUM, NULL)) != COMM_OK ||
	    !dev_right(out, COUNT, want, r)) {
		seen_note(s, r, rc == COMM_OK ? COMM_ERR_INTERNAL : rc, "the first all-reduce failed");
		return th_bail(c);
	}
	s->start_ms[r] = mono_ms();
	for (;;) {
		long k = __atomic_load_n(&s->kill_ms, __ATOMIC_ACQUIRE);

		alarm(TH_WATCHDOG_S);
		if (k && mono_ms() - k > 2 * FAULT_LIMIT_MS) {
			seen_note(s, r, COMM_OK, "all-reduces still succeed long after the fault");
			return th_bail(c);
		}
		if (!odd && s->iters[r] == 2) {
			odd = 1;
			rc = comm_allreduce(c, in, out, r == 3 ? COUNT - 1 : COUNT, COMM_FLOAT32,
					    COMM_SUM, NULL);
			if (rc != COMM_ERR_MISMATCH || !strstr(comm_last_error(c), "count")) {
				fprintf(stderr, "rank %d: all-reduce of mismatched counts: %s (%s)\n",
					r, comm_result_name(rc), comm_last_error(c));
				seen_note(s, r, rc == COMM_OK ? COMM_ERR_INTERNAL : rc,
					  "no MISMATCH naming the count");
				return th_bail(c);
			}
			continue;
		}
		rc = comm_allreduce(c, in, out, COUNT, COMM_FLOAT32, COMM_SUM, NULL);
		if (rc != COMM_OK)
			break;
		if (!dev_right(out, COUNT, want, r)) {
			seen_note(s, r, COMM_OK, "wrong values");
			return th_bail(c);
		}
		__atomic_fetch_add(&s->iters[r], 1, __ATOMIC_RELEASE);
	}
	seen_note(s, r, rc, comm_last_error(c));
	alarm(20); /* leaving must not hang either */
	comm_finalize(c);
	return 0;
}

/* The job after a fault: one all-reduce of SMALL floats, every element checked. */
static int rank_after(int r, int n, void *arg)
{
	float want = (float)(n * (n + 1) / 2), *in, *out, *host;
	comm_result_t rc;
	size_t bad = SMALL;
	comm_t *c;

	(void)arg;
	if (cuda_bad(cudaSetDevice(r % ndev), r, "cudaSetDevice") || th_join(&c, r, n) < 0)
		return 1;
	if (!(in = dev_filled(SMALL, (float)(r + 1), r)) || !(out = dev_filled(SMALL, 0, r)) ||
	    !(host = malloc(SMALL * sizeof *host)))
		return th_bail(c);
	rc = comm_allreduce(c, in, out, SMALL, COMM_FLOAT32, COMM_SUM, NULL);
	if (rc == COMM_OK &&
	    !cuda_bad(cudaMemcpy(host, out, SMALL * sizeof *host, cudaMemcpyDeviceToHost), r,
		      "cudaMemcpy"))
		for (size_t i = 0; i < SMALL && bad == SMALL; i++)
			if (host[i] != want)
				bad = i;
	if (rc != COMM_OK || bad != SMALL) {
		fprintf(stderr, "rank %d: all-reduce after the fault: %s (%s), element %zu wrong\n",
			r, comm_result_name(rc), comm_last_error(c), bad);
		return th_bail(c);
	}
	return th_leave(c, r);
}

/* Start daemon d ('A' or 'B'), an NCCL host of its own. */
static int start(struct th_daemon *d, char name)
{
	char host[32];
	int rc;

	snprintf(host, sizeof host, "commd-gpu-faults-%c", name);
	setenv("NCCL_HOSTID", host, 1);
	rc = th_daemon_start_peer(d, NULL);
	unsetenv("NCCL_HOSTID");
	if (rc < 0)
		CHECK(0, "commd %c (with --peer-listen) did not start", name);
	return rc;
}

enum fault { RANK_KILLED, B_STOPPED, B_KILLED };

/*
 * Run the job, do the fault about half way through an all-reduce, and
 * check what the ranks left saw; B1 first (mismatch) in the first run.
 */
static void test_fault(enum fault f, int b1, int fds0)
{
	static const char *const what[] = { "rank 3 (on B) SIGKILLed", "commd B stopped (SIGTERM)",
					    "commd B SIGKILLed" };
	const struct th_daemon *ds[2] = { &da, &db };
	struct seen *s = seen_new();
	struct th_ranks rs;
	char job[32], after[32];
	long per_op;
	int failed, b_rc = 0;
	pid_t worker = 0;

	snprintf(job, sizeof job, "gpu-faults-%d", (int)f);
	snprintf(after, sizeof after, "gpu-faults-%d-after", (int)f);
	mismatch = b1;
	REQUIRE(th_ranks_start_nodes(&rs, ds, split, da.peer, job, N, rank_loop, s) == 0, "fork");
	/* the mismatched one (B1) after two, then two more */
	if ((per_op = seen_half_way(s, b1 ? 4 : 2)) < 0)
		CHECK(0, "the 2+2 job made no progress within %d ms", PROGRESS_LIMIT_MS);
	else if (b1)
		printf("ok: B1: a count mismatch across daemons on device memory: MISMATCH on "
		       "every rank, and the next all-reduces right\n");
	__atomic_store_n(&s->kill_ms, mono_ms(), __ATOMIC_RELEASE);
	if (f == RANK_KILLED) {
		kill(rs.pids[3], SIGKILL);
	} else if (f == B_STOPPED) {
		b_rc = th_daemon_stop(&db);
	} else {
		th_children(db.pid, "commd-gpu", &worker);
		kill(db.pid, SIGKILL);
		waitpid(db.pid, NULL, 0);
		th_daemon_cleanup(&db);
	}
	if (f == B_KILLED) {
		CHECK(worker > 0, "%s: it had no commd-gpu child in the middle of an all-reduce",
		      what[f]);
		if (worker > 0) {
			int gone = th_gone_within(worker, FAULT_LIMIT_MS);

			CHECK(gone, "%s: its GPU worker %d outlived it by %d ms", what[f], (int)worker,
			      FAULT_LIMIT_MS);
			printf("%s: %s: its GPU worker (pid %d) %s\n", gone ? "ok" : "FAIL", what[f],
			       (int)worker, gone ? "exited with it" : "outlived it");
		}
	}
	failed = th_ranks_wait(&rs);
	CHECK(failed == (f == RANK_KILLED), "%s: %d ranks failed (see above)", what[f], failed);
	CHECK(b_rc == 0, "%s: it did not exit 0 (see above)", what[f]);
	CHECK(th_daemon_alive(&da), "%s: commd A died", what[f]);
	for (int r = 0; r < N; r++) {
		long ms = s->err_ms[r] - s->kill_ms;
		comm_result_t rc = (comm_result_t)s->rc[r];
		/*
		 * Stopped: every rank hears that B shuts down. Otherwise A's ranks
		 * hear of the lost rank or daemon, or of their worker killed out
		 * of NCCL (whichever comes first); B's own, killed, any error.
		 */
		int ok = f == B_STOPPED ? rc == COMM_ERR_SHUTDOWN
			 : split[r] == 0 || f == RANK_KILLED
			     ? rc == COMM_ERR_PEER_LOST || rc == COMM_ERR_ABORTED
			     : rc != COMM_OK;

		if (f == RANK_KILLED && r == 3)
			continue;
		if (!s->done[r]) {
			CHECK(0, "%s: rank %d never returned from its loop", what[f], r);
			continue;
		}
		ok &= ms >= 0 && ms <= FAULT_LIMIT_MS;
		CHECK(ok, "%s: rank %d: %s after %ld ms (limit %d): %s", what[f], r,
		      comm_result_name(rc), ms, FAULT_LIMIT_MS, s->detail[r]);
		printf("%s: %s after %ld all-reduces of 64 MiB (%ld ms each): rank %d on %c: %s "
		       "after %ld ms: \"%s\"\n",
		       ok ? "ok" : "FAIL", what[f], (long)s->iters[0], per_op, r,
		       split[r] ? 'B' : 'A', comm_result_name(rc), ms, s->detail[r]);
	}
	munmap(s, sizeof *s);
	if (f == B_KILLED) {
		const struct th_daemon *a[1] = { &da };

		failed = th_run_ranks_nodes(a, NULL, NULL, after, 2, rank_after, NULL);
	} else {
		if (f == B_STOPPED)
			REQUIRE(start(&db, 'B') == 0, "commd B did not start again");
		failed = th_run_ranks_nodes(ds, split, da.peer, after, N, rank_after, NULL);
	}
	CHECK(failed == 0, "after %s: a new job on device memory: %d ranks failed", what[f],
	      failed);
	th_check_baseline(&da, fds0, what[f]);
	printf("%s: after %s, a new job on device memory %s ran right; commd A's fds back to %d\n",
	       check_failures ? "FAIL" : "ok", what[f], f == B_KILLED ? "on A alone" : "over A and B",
	       fds0);
	fflush(stdout);
}

int main(void)
{
	struct timespec t0;
	int fds0;

	setvbuf(stdout, NULL, _IOLBF, 0);
	ndev = count_devices();
	if (ndev < 1)
		return 77;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	/* NCCL between the daemons' workers goes over loopback sockets */
	setenv("NCCL_SOCKET_IFNAME", "lo", 0);
	setenv("NCCL_IB_DISABLE", "1", 0);
	setenv("COMM_TIMEOUT", "60000", 1);
	if (start(&da, 'A') < 0 || start(&db, 'B') < 0)
		return CHECK_EXIT();
	/* the peer connection and UCX endpoint between A and B stay from the first job on */
	CHECK(th_run_ranks_nodes((const struct th_daemon *[]){ &da, &db }, split, da.peer,
				 "gpu-faults-first", N, th_rank_sum, NULL) == 0,
	      "a first job over A and B failed");
	fds0 = th_count_fds(da.pid);
	test_fault(RANK_KILLED, 1, fds0);
	test_fault(B_STOPPED, 0, fds0);
	test_fault(B_KILLED, 0, fds0);
	CHECK(th_daemon_stop(&da) == 0, "commd A did not stop cleanly");
	printf("%s: %.1f s in all\n", check_failures ? "FAIL" : "ok", th_secs_since(&t0));
	return CHECK_EXIT();
}
