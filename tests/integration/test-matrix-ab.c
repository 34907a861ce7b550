/*
 * test-matrix-ab.c: RELIABILITY.md rows A (client faults) and B (misuse
 * inside a job), a TAP test point a row. The ranks are forked processes that
 * report each call's result, detail and timing through shared memory; the
 * test checks them here.
 */
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
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
#include "matrix.h"
#include "raw.h"

#define MAXR 5                /* processes a row hears from */
#define MAXK 8                /* calls each one reports */
#define COUNT 1024            /* int32s of the rows' all-reduces */
#define BIG (16u << 20)       /* int32s of A5's all-reduce: 64 MiB a rank */
#define SENTINEL 0x5a5a5a5a   /* what a receive buffer holds before an op that must not run */
#define LONG_MS "60000"       /* a deadline no row waits for */
#define SHORT_MS 1500         /* the deadline of the rows that wait for one */
#define AT_ONCE_MS 500        /* "at once": a third of SHORT_MS, a hundredth of LONG_MS */
#define WRONG (-1)            /* a call's rc: it worked, but the result was wrong */

/* One call of a rank, as the rank saw it. */
struct call {
	volatile int done;
	int rc;
	int intact;      /* the buffers the call must not write held what they held before */
	long took_ms;    /* from the call to its answer */
	long at_ms;      /* when the answer came (mx_now_ms) */
	long long value; /* a result for the test to check */
	char detail[256];
};

/* Shared by the test and the ranks of the row that runs. */
static struct shared {
	volatile int go;            /* the test lets the ranks go on */
	volatile int fault;         /* the fault is there (A3: the rank is stopped) */
	volatile int late;          /* commd has seen the fault: late ranks post now */
	volatile int ready[MAXR];
	volatile long fault_ms;     /* when the fault happened */
	volatile long log_off;      /* where the row's part of the daemon's log begins */
	volatile unsigned long inode;
	struct call call[MAXR][MAXK];
} *S;

static void shared_reset(void)
{
	memset((void *)S, 0, sizeof *S);
}

static const char *rc_name(int rc)
{
	return rc == WRONG ? "a wrong result" : comm_result_name((comm_result_t)rc);
}

/* In a process of the row: record call k of slot r. */
static void record(int r, int k, int rc, const char *detail, long t0)
{
	struct call *x = &S->call[r][k];

	x->rc = rc;
	x->at_ms = mx_now_ms();
	x->took_ms = x->at_ms - t0;
	snprintf(x->detail, sizeof x->detail, "%s", detail);
	__sync_synchronize();
	x->done = 1;
}

static void put(int r, int k, int rc, const comm_t *c, long t0)
{
	record(r, k, rc, rc == COMM_OK ? "" : rc == WRONG ? "wrong result" : comm_last_error(c),
	       t0);
}

/* Wait (30 s of running at most) for *flag; 0, or -1. */
static int await(volatile int *flag)
{
	for (int i = 0; i < 30000 && !*flag; i++)
		usleep(1000);
	return *flag ? 0 : -1;
}

static int join_ms(comm_t **c, int rank, int n, const char *timeout_ms)
{
	setenv("COMM_TIMEOUT", timeout_ms, 1);
	return th_join(c, rank, n);
}

static void fill(int32_t *v, int count, int rank, int it)
{
	for (int i = 0; i < count; i++)
		v[i] = rank * 1000 + i + it;
}

/* Whether v is the sum over n ranks of what fill(v, count, rank, it) gives. */
static int sum_ok(const int32_t *v, int count, int n, int it)
{
	for (int i = 0; i < count; i++)
		if (v[i] != 1000 * n * (n - 1) / 2 + n * (i + it)) {
			fprintf(stderr, "element %d is %d, want %d\n", i, v[i],
				1000 * n * (n - 1) / 2 + n * (i + it));
			return 0;
		}
	return 1;
}

static int all_are(const int32_t *v, int count, int32_t x)
{
	for (int i = 0; i < count; i++)
		if (v[i] != x)
			return 0;
	return 1;
}

/* An all-reduce of count int32s, its result checked exactly; its rc, or WRONG. */
static int allreduce_exact(comm_t *c, int32_t *v, int count, int it)
{
	comm_result_t rc;

	fill(v, count, comm_rank(c), it);
	rc = comm_allreduce(c, v, v, count, COMM_INT32, COMM_SUM, NULL);
	if (rc != COMM_OK)
		return rc;
	return sum_ok(v, count, comm_size(c), it) ? COMM_OK : WRONG;
}

/* Op 1 of rows A1..A4: COUNT int32s in registered memory, all-reduced right (call 0). */
static int first_op(comm_t *c, int32_t **v, int rank)
{
	long t0 = mx_now_ms();
	int rc;

	if (!(*v = comm_mem_alloc(c, COUNT * sizeof **v)))
		return -1;
	rc = allreduce_exact(c, *v, COUNT, 1);
	put(rank, 0, rc, c, t0);
	return rc == COMM_OK ? 0 : -1;
}

/*
 * A rank that outlives the fault: op 2 (posted before the fault, or when
 * late, once commd has failed the job), then op 3; calls 1 and 2.
 */
static int survive(comm_t *c, int32_t *v, int rank, int late)
{
	comm_result_t rc;
	long t0;

	if (late && await(&S->late) < 0)
		return th_bail(c);
	t0 = mx_now_ms();
	rc = comm_allreduce(c, v, v, COUNT, COMM_INT32, COMM_SUM, NULL);
	put(rank, 1, rc, c, t0);
	t0 = mx_now_ms();
	rc = comm_allreduce(c, v, v, COUNT, COMM_INT32, COMM_SUM, NULL);
	put(rank, 2, rc, c, t0);
	return th_leave(c, rank);
}

/* A job that must just work: three all-reduces, exact. */
static int rank_plain(int rank, int n, void *arg)
{
	comm_t *c;
	int32_t *v;

	if (th_join(&c, rank, n) < 0)
		return 1;
	if (!(v = comm_mem_alloc(c, COUNT * sizeof *v)))
		return th_bail(c);
	for (int it = 0; it < 3; it++)
		if (allreduce_exact(c, v, COUNT, it) != COMM_OK) {
			fprintf(stderr, "rank %d: all-reduce %d failed: %s\n", rank, it,
				comm_last_error(c));
			return th_bail(c);
		}
	return th_leave(c, rank);
}

/* --- the test's side ---------------------------------------------------- */

static long log_size(const struct th_daemon *d)
{
	struct stat st;

	return stat(d->log, &st) == 0 ? (long)st.st_size : 0;
}

/*
 * Wait (ms at most) until every string (NULL-terminated) is in a line of the
 * daemon's log past *off; *off moves past the lines read. 1, or 0.
 */
static int wait_log(const struct th_daemon *d, long *off, int ms, ...)
{
	const char *want[8];
	int n = 0, left, found[8] = { 0 };
	long t0 = mx_now_ms();
	char line[2048];
	va_list ap;
	FILE *f;

	va_start(ap, ms);
	for (const char *s; n < 8 && (s = va_arg(ap, const char *));)
		want[n++] = s;
	va_end(ap);
	left = n;
	if (!(f = fopen(d->log, "r")))
		return 0;
	while (left) {
		fseek(f, *off, SEEK_SET);
		clearerr(f);
		while (left && fgets(line, sizeof line, f)) {
			size_t len = strlen(line);

			if (line[len - 1] != '\n')
				break; /* half written: read it again */
			*off += (long)len;
			for (int i = 0; i < n; i++)
				if (!found[i] && strstr(line, want[i])) {
					found[i] = 1;
					left--;
				}
		}
		if (!left || mx_now_ms() - t0 > ms)
			break;
		usleep(2000);
	}
	fclose(f);
	for (int i = 0; i < n; i++)
		if (!found[i])
			fprintf(stderr, "not in the daemon's log within %d ms: '%s'\n", ms, want[i]);
	return left == 0;
}

/* Wait (30 s at most) until the flags of slots 0..n-1's call k are all set. */
static int await_calls(int n, int k)
{
	for (int r = 0; r < n; r++)
		if (await(&S->call[r][k].done) < 0)
			return -1;
	return 0;
}

/* Whether call x has a detail holding every string (NULL-terminated). */
static int has_all(const struct call *x, va_list ap)
{
	for (const char *s; (s = va_arg(ap, const char *));)
		if (!strstr(x->detail, s))
			return 0;
	return 1;
}

/* CHECK that call k of slot r failed with code, its detail holding the strings (NULL-ended). */
static void want_err(const char *id, int r, int k, int code, ...)
{
	const struct call *x = &S->call[r][k];
	va_list ap;
	int ok;

	va_start(ap, code);
	ok = x->done && x->rc == code && has_all(x, ap);
	va_end(ap);
	CHECK(ok, "%s: process %d, call %d: %s (%s), want %s with the details named", id, r, k,
	      x->done ? rc_name(x->rc) : "no answer", x->detail, comm_result_name(code));
}

static void want_ok(const char *id, int r, int k)
{
	const struct call *x = &S->call[r][k];

	CHECK(x->done && x->rc == COMM_OK, "%s: process %d, call %d: %s (%s), want success", id, r,
	      k, x->done ? rc_name(x->rc) : "no answer", x->detail);
}

static void want_fast(const char *id, int r, int k)
{
	const struct call *x = &S->call[r][k];

	CHECK(x->done && x->took_ms <= AT_ONCE_MS,
	      "%s: process %d, call %d took %ld ms, want an answer at once (%d ms)", id, r, k,
	      x->took_ms, AT_ONCE_MS);
}

/* Reap pid (which the test killed); 1 when SIGKILL ended it. */
static int reap_killed(struct th_ranks *rs, int r)
{
	int status = 0;
	pid_t pid = rs->pids[r];

	rs->pids[r] = 0; /* th_ranks_wait counts it as one failed */
	return waitpid(pid, &status, 0) == pid && WIFSIGNALED(status) &&
	       WTERMSIG(status) == SIGKILL;
}

/* Whether pid is stopped ('T' in /proc/PID/stat), within 3 s. */
static int wait_stopped(pid_t pid)
{
	char path[64], buf[512], *p;

	snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
	for (int i = 0; i < 300; i++) {
		FILE *f = fopen(path, "r");
		size_t n = f ? fread(buf, 1, sizeof buf - 1, f) : 0;

		if (f)
			fclose(f);
		buf[n] = '\0';
		if ((p = strrchr(buf, ')')) && p[1] == ' ' && p[2] == 'T')
			return 1;
		usleep(10 * 1000);
	}
	return 0;
}

/* The inode of the mapping of /proc/PID/maps that holds address addr (0: none). */
static unsigned long maps_inode_at(pid_t pid, unsigned long addr)
{
	char path[64], line[512];
	unsigned long lo, hi, inode, found = 0;
	FILE *f;

	snprintf(path, sizeof path, "/proc/%d/maps", (int)pid);
	if (!(f = fopen(path, "r")))
		return 0;
	while (!found && fgets(line, sizeof line, f))
		if (sscanf(line, "%lx-%lx %*s %*s %*s %lu", &lo, &hi, &inode) == 3 && lo <= addr &&
		    addr < hi)
			found = inode;
	fclose(f);
	return found;
}

/* How many memfd mappings of /proc/PID/maps have inode inode. */
static int maps_count_inode(pid_t pid, unsigned long inode)
{
	char path[64], line[512];
	unsigned long got;
	int n = 0;
	FILE *f;

	snprintf(path, sizeof path, "/proc/%d/maps", (int)pid);
	if (!(f = fopen(path, "r")))
		return -1;
	while (fgets(line, sizeof line, f))
		if (strstr(line, "memfd:") &&
		    sscanf(line, "%*s %*s %*s %*s %lu", &got) == 1 && got == inode)
			n++;
	fclose(f);
	return n;
}

/* --- A1: a rank SIGKILLed with an all-reduce in flight --------------------- */

/*
 * Four ranks all-reduce once. Then ranks 0, 1 and 3 post op 2 (rank 2 holds
 * it back, so it stays in flight) and the test kills rank 3.
 */
static int a1_rank(int rank, int n, void *arg)
{
	comm_request_t *req;
	comm_t *c;
	int32_t *v;

	if (join_ms(&c, rank, n, LONG_MS) < 0)
		return 1;
	if (first_op(c, &v, rank) < 0)
		return th_bail(c);
	if (rank == 3) {
		if (comm_allreduce(c, v, v, COUNT, COMM_INT32, COMM_SUM, &req) != COMM_OK)
			return th_bail(c);
		for (;;)
			pause();
	}
	return survive(c, v, rank, rank == 2);
}

/* What A1 and A4 check: PEER_LOST naming lost within 1 s of the fault, later ops at once. */
static void check_lost(const char *id, int lost)
{
	char who[32];
	long worst = 0;

	snprintf(who, sizeof who, "rank %d ", lost);
	for (int r = 0; r < 4; r++)
		want_ok(id, r, 0);
	for (int r = 0; r < 3; r++) {
		const struct call *x = &S->call[r][1];

		/* ops 2 of ranks 0 and 1 were in flight; rank 2 posts its op 2 after the failure */
		want_err(id, r, 1, COMM_ERR_PEER_LOST, who, "op 2", NULL);
		want_err(id, r, 2, COMM_ERR_PEER_LOST, who, "op 3", NULL);
		if (r < 2) {
			CHECK(x->done && x->at_ms - S->fault_ms <= 1000,
			      "%s: rank %d heard of the loss %ld ms after it, want 1 s at most", id,
			      r, x->at_ms - S->fault_ms);
			worst = x->at_ms - S->fault_ms > worst ? x->at_ms - S->fault_ms : worst;
		} else {
			want_fast(id, r, 1);
		}
		want_fast(id, r, 2);
	}
	mx_note("%s: ranks 0, 1 got %s %ld ms after the fault at most; later ops took %ld, %ld, "
		"%ld ms; detail: %s",
		id, rc_name(S->call[0][1].rc), worst, S->call[0][2].took_ms, S->call[1][2].took_ms,
		S->call[2][2].took_ms, S->call[0][1].detail);
}

static void row_a1(struct th_daemon *d)
{
	long off = log_size(d);
	struct th_ranks rs;

	shared_reset();
	if (th_ranks_start(&rs, d, "a1-kill", 4, a1_rank, NULL) < 0) {
		CHECK(0, "A1: ranks did not start");
		return;
	}
	CHECK(wait_log(d, &off, 10000, "job a1-kill: rank 0 posts op 2:",
		       "job a1-kill: rank 1 posts op 2:", "job a1-kill: rank 3 posts op 2:", NULL),
	      "A1: op 2 is not in flight");
	kill(rs.pids[3], SIGKILL);
	S->fault_ms = mx_now_ms();
	CHECK(wait_log(d, &off, 10000, "job a1-kill: failed:", NULL), "A1: the job did not fail");
	S->late = 1;
	CHECK(reap_killed(&rs, 3), "A1: rank 3 did not die of SIGKILL");
	CHECK(th_ranks_wait(&rs) == 1, "A1: ranks 0..2 failed (see above)");
	check_lost("A1", 3);
	CHECK(th_run_ranks(d, "a1-after", 3, rank_plain, NULL) == 0,
	      "A1: a new job after the kill failed");
}

/* --- A2: a rank killed before posting, the others waiting ----------------- */

static int a2_rank(int rank, int n, void *arg)
{
	comm_t *c;
	int32_t *v;

	if (join_ms(&c, rank, n, LONG_MS) < 0)
		return 1;
	if (first_op(c, &v, rank) < 0)
		return th_bail(c);
	if (rank == 2)
		for (;;)
			pause(); /* killed before it posts op 2 */
	return survive(c, v, rank, 0);
}

static void row_a2(struct th_daemon *d)
{
	long off = log_size(d);
	struct th_ranks rs;

	shared_reset();
	if (th_ranks_start(&rs, d, "a2-kill", 3, a2_rank, NULL) < 0) {
		CHECK(0, "A2: ranks did not start");
		return;
	}
	CHECK(wait_log(d, &off, 10000, "job a2-kill: rank 0 posts op 2:",
		       "job a2-kill: rank 1 posts op 2:", NULL) &&
		      await(&S->call[2][0].done) == 0,
	      "A2: ranks 0 and 1 are not waiting in op 2");
	kill(rs.pids[2], SIGKILL);
	S->fault_ms = mx_now_ms();
	CHECK(reap_killed(&rs, 2), "A2: rank 2 did not die of SIGKILL");
	CHECK(th_ranks_wait(&rs) == 1, "A2: ranks 0 and 1 failed (see above)");
	for (int r = 0; r < 3; r++)
		want_ok("A2", r, 0);
	for (int r = 0; r < 2; r++) {
		const struct call *x = &S->call[r][1];

		want_err("A2", r, 1, COMM_ERR_PEER_LOST, "rank 2 ", "op 2", NULL);
		/* the deadline is 60 s: only the loss itself can answer this fast */
		CHECK(x->done && x->at_ms - S->fault_ms <= 1000,
		      "A2: rank %d heard of the loss %ld ms after it (deadline %s ms)", r,
		      x->at_ms - S->fault_ms, LONG_MS);
		want_err("A2", r, 2, COMM_ERR_PEER_LOST, "rank 2 ", "op 3", NULL);
		want_fast("A2", r, 2);
	}
	mx_note("A2: told %ld and %ld ms after the kill (deadline %s ms): %s",
		S->call[0][1].at_ms - S->fault_ms, S->call[1][1].at_ms - S->fault_ms, LONG_MS,
		S->call[0][1].detail);
}

/* --- A3: a rank SIGSTOPped mid-op ------------------------------------------ */

static int a3_rank(int rank, int n, void *arg)
{
	char ms[16];
	comm_result_t rc;
	comm_t *c;
	int32_t *v;
	long t0;

	snprintf(ms, sizeof ms, "%d", SHORT_MS);
	if (join_ms(&c, rank, n, ms) < 0)
		return 1;
	if (first_op(c, &v, rank) < 0)
		return th_bail(c);
	if (rank == 2) {
		S->ready[2] = 1;
		if (await(&S->go) < 0) /* stopped, and continued, in here */
			return th_bail(c);
	} else if (await(&S->fault) < 0) {
		return th_bail(c);
	}
	t0 = mx_now_ms();
	rc = comm_allreduce(c, v, v, COUNT, COMM_INT32, COMM_SUM, NULL);
	put(rank, 1, rc, c, t0);
	return th_leave(c, rank);
}

static void row_a3(struct th_daemon *d)
{
	struct th_ranks rs;

	shared_reset();
	if (th_ranks_start(&rs, d, "a3-stop", 3, a3_rank, NULL) < 0) {
		CHECK(0, "A3: ranks did not start");
		return;
	}
	CHECK(await(&S->ready[2]) == 0, "A3: rank 2 did not get ready");
	kill(rs.pids[2], SIGSTOP);
	CHECK(wait_stopped(rs.pids[2]), "A3: rank 2 did not stop");
	S->fault_ms = mx_now_ms();
	S->fault = 1; /* ranks 0 and 1 post op 2 now */
	CHECK(await_calls(2, 1) == 0, "A3: ranks 0 and 1 got no answer to op 2");
	S->go = 1;
	kill(rs.pids[2], SIGCONT);
	CHECK(th_ranks_wait(&rs) == 0, "A3: ranks failed (see above)");
	for (int r = 0; r < 3; r++)
		want_ok("A3", r, 0);
	for (int r = 0; r < 2; r++) {
		const struct call *x = &S->call[r][1];

		want_err("A3", r, 1, COMM_ERR_TIMEOUT, "rank 2 ", "op 2", NULL);
		CHECK(x->took_ms >= SHORT_MS - 300 && x->took_ms <= SHORT_MS + 2500,
		      "A3: rank %d got its answer after %ld ms, the deadline is %d ms", r,
		      x->took_ms, SHORT_MS);
	}
	/* continued, rank 2's next call fails at once with the job's error */
	want_err("A3", 2, 1, COMM_ERR_TIMEOUT, "rank 2 ", NULL);
	want_fast("A3", 2, 1);
	mx_note("A3: ranks 0, 1: %s after %ld and %ld ms (deadline %d ms): %s; rank 2, continued: "
		"%s in %ld ms",
		rc_name(S->call[0][1].rc), S->call[0][1].took_ms, S->call[1][1].took_ms, SHORT_MS,
		S->call[0][1].detail, rc_name(S->call[2][1].rc), S->call[2][1].took_ms);
}

/* --- A4: a rank closes its socket with ops pending ------------------------ */

/* Post op seq: an all-reduce in place of count int32s at the start of mem_id. */
static void raw_allreduce(int fd, uint64_t seq, uint64_t mem_id, uint64_t count)
{
	Commpb__Envelope env = COMMPB__ENVELOPE__INIT;
	Commpb__Op op = COMMPB__OP__INIT;
	Commpb__BufRef ref = COMMPB__BUF_REF__INIT;

	ref.mem_id = mem_id;
	op.seq = seq;
	op.type = COMMPB__OP_TYPE__OP_ALLREDUCE;
	op.send = &ref;
	op.recv = &ref;
	op.count = count;
	op.dtype = COMM_INT32;
	op.redop = COMM_SUM;
	env.id = seq;
	env.body_case = COMMPB__ENVELOPE__BODY_OP;
	env.op = &op;
	raw_send(fd, &env, NULL, 0);
}

/*
 * Rank 3 of A4, by hand: joins, registers a memfd, all-reduces once (checked
 * exactly), posts ops 2 and 3 (rank 2 holds them back) and, when the test
 * says, closes its socket.
 */
static int a4_raw_rank(int rank, int n)
{
	size_t bytes = COUNT * sizeof(int32_t);
	struct frame_reader rd;
	Commpb__Envelope *reply;
	char detail[256];
	uint64_t mem_id = 0;
	int fd, mfd, rc;
	long t0 = mx_now_ms();
	int32_t *v;

	alarm(TH_WATCHDOG_S);
	fd = raw_connect(getenv("COMM_SOCKET"));
	frame_reader_init(&rd);
	rc = raw_hello_rank(fd, &rd, getenv("COMM_JOB"), getenv("COMM_TOKEN"), rank, n, detail,
		      sizeof detail);
	mfd = memfd_create("a4-raw", MFD_CLOEXEC | MFD_ALLOW_SEALING);
	if (rc != COMM_OK || mfd < 0 || ftruncate(mfd, (off_t)bytes) < 0 ||
	    fcntl(mfd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW) < 0) {
		fprintf(stderr, "A4 raw rank: join %d (%s) or memfd failed\n", rc, detail);
		return 1;
	}
	v = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0);
	if (v == MAP_FAILED || raw_register_fd(fd, &rd, mfd, bytes, &mem_id) != COMM_OK)
		return 1;
	close(mfd);
	fill(v, COUNT, rank, 1);
	raw_allreduce(fd, 1, mem_id, COUNT);
	reply = raw_recv(fd, &rd);
	rc = reply && reply->body_case == COMMPB__ENVELOPE__BODY_OP_DONE ? reply->op_done->status
									  : COMM_ERR_PROTOCOL;
	if (rc == COMM_OK && !sum_ok(v, COUNT, n, 1))
		rc = WRONG;
	record(rank, 0, rc, reply && rc != COMM_OK && reply->op_done ? reply->op_done->detail : "",
	       t0);
	if (reply)
		commpb__envelope__free_unpacked(reply, NULL);
	raw_allreduce(fd, 2, mem_id, COUNT);
	raw_allreduce(fd, 3, mem_id, COUNT);
	if (await(&S->go) < 0)
		return 1;
	S->fault_ms = mx_now_ms();
	close(fd);
	frame_reader_free(&rd);
	munmap(v, bytes);
	return 0;
}

static int a4_rank(int rank, int n, void *arg)
{
	comm_t *c;
	int32_t *v;

	if (rank == 3)
		return a4_raw_rank(rank, n);
	if (join_ms(&c, rank, n, LONG_MS) < 0)
		return 1;
	if (first_op(c, &v, rank) < 0)
		return th_bail(c);
	return survive(c, v, rank, rank == 2);
}

static void row_a4(struct th_daemon *d)
{
	long off = log_size(d);
	struct th_ranks rs;

	shared_reset();
	if (th_ranks_start(&rs, d, "a4-close", 4, a4_rank, NULL) < 0) {
		CHECK(0, "A4: ranks did not start");
		return;
	}
	CHECK(wait_log(d, &off, 10000, "job a4-close: rank 0 posts op 2:",
		       "job a4-close: rank 1 posts op 2:", "job a4-close: rank 3 posts op 2:",
		       "job a4-close: rank 3 posts op 3:", NULL),
	      "A4: ops 2 and 3 are not pending");
	S->go = 1; /* rank 3 closes its socket */
	CHECK(wait_log(d, &off, 10000, "job a4-close: failed:", NULL), "A4: the job did not fail");
	S->late = 1;
	CHECK(th_ranks_wait(&rs) == 0, "A4: ranks failed (see above)");
	check_lost("A4", 3);
	CHECK(th_run_ranks(d, "a4-after", 3, rank_plain, NULL) == 0,
	      "A4: a new job after the close failed");
}

/* --- A5: a rank exits while the daemon has its memory mapped --------------- */

/*
 * Three ranks all-reduce 64 MiB each; rank 2 posts last and exits as soon as
 * commd has its op, which then runs on the memory of a process that is gone.
 */
static int a5_rank(int rank, int n, void *arg)
{
	comm_request_t *req;
	comm_result_t rc;
	comm_t *c;
	int32_t *v;
	long t0;

	if (join_ms(&c, rank, n, LONG_MS) < 0)
		return 1;
	if (!(v = comm_mem_alloc(c, BIG * sizeof *v)))
		return th_bail(c);
	for (uint32_t i = 0; i < BIG; i++)
		v[i] = (rank + 1) * (int32_t)(i & 1023);
	if (rank == 2) {
		long off = S->log_off;

		S->inode = maps_inode_at(getpid(), (unsigned long)v);
		if (await(&S->go) < 0 ||
		    comm_allreduce(c, v, v, BIG, COMM_INT32, COMM_SUM, &req) != COMM_OK ||
		    !wait_log(arg, &off, 10000, "job a5-exit: rank 2 posts op 1:", NULL))
			return th_bail(c);
		S->fault_ms = mx_now_ms();
		_exit(0);
	}
	t0 = mx_now_ms();
	rc = comm_allreduce(c, v, v, BIG, COMM_INT32, COMM_SUM, NULL);
	if (rc == COMM_OK)
		for (uint32_t i = 0; i < BIG && rc == COMM_OK; i++)
			if (v[i] != n * (n + 1) / 2 * (int32_t)(i & 1023))
				rc = WRONG;
	put(rank, 0, rc, c, t0);
	t0 = mx_now_ms();
	rc = comm_allreduce(c, v, v, 4, COMM_INT32, COMM_SUM, NULL);
	put(rank, 1, rc, c, t0);
	return th_leave(c, rank);
}

static void row_a5(struct th_daemon *d)
{
	long off = log_size(d), t_dead;
	struct th_ranks rs;
	siginfo_t si;
	int mapped, gone = -1;

	shared_reset();
	S->log_off = off;
	if (th_ranks_start(&rs, d, "a5-exit", 3, a5_rank, d) < 0) {
		CHECK(0, "A5: ranks did not start");
		return;
	}
	CHECK(wait_log(d, &off, 20000, "job a5-exit: rank 0 posts op 1:",
		       "job a5-exit: rank 1 posts op 1:", NULL),
	      "A5: ranks 0 and 1 did not post");
	S->go = 1;
	memset(&si, 0, sizeof si);
	CHECK(waitid(P_PID, (id_t)rs.pids[2], &si, WEXITED | WNOWAIT) == 0 &&
		      si.si_code == CLD_EXITED && si.si_status == 0,
	      "A5: rank 2 did not exit normally");
	t_dead = mx_now_ms();
	mapped = maps_count_inode(d->pid, S->inode);
	CHECK(await_calls(2, 0) == 0, "A5: ranks 0 and 1 got no answer to the op");
	for (int i = 0; i < 300 && (gone = maps_count_inode(d->pid, S->inode)) != 0; i++)
		usleep(10 * 1000);
	CHECK(th_ranks_wait(&rs) == 0, "A5: ranks failed (see above)");
	CHECK(S->inode != 0, "A5: rank 2 found no mapping of its buffer");
	if (S->call[0][0].rc == COMM_OK) {
		/* the op beat the exit: then it must have been right, and later ops see the loss */
		want_ok("A5", 1, 0);
		mx_note("A5: the all-reduce finished before rank 2 exited");
	} else {
		for (int r = 0; r < 2; r++)
			want_err("A5", r, 0, COMM_ERR_PEER_LOST, "rank 2 ", NULL);
		/* answered after the check: the op still ran then, on rank 2's memory */
		if (S->call[0][0].at_ms > t_dead + 50)
			CHECK(mapped > 0,
			      "A5: commd unmapped rank 2's memory while the op on it still ran");
	}
	for (int r = 0; r < 2; r++)
		want_err("A5", r, 1, COMM_ERR_PEER_LOST, "rank 2 ", NULL);
	CHECK(gone == 0, "A5: commd still maps rank 2's memory (%d) after the op failed", gone);
	mx_note("A5: rank 2 exited once commd had its op (reaped %ld ms later); its memory still "
		"mapped %d time(s) then; the op answered %ld ms after the exit: %s (%s)",
		t_dead - S->fault_ms, mapped, S->call[0][0].at_ms - t_dead,
		rc_name(S->call[0][0].rc), S->call[0][0].detail);
}

/* --- B1, B2: ranks that disagree on an op --------------------------------- */

#define BUF 64 /* int32s of the B rows' buffers */

/* B1 case k: one collective on the odd rank, another on the others. */
static comm_result_t b1_post(comm_t *c, int k, int odd, int32_t *a, int32_t *b)
{
	switch (k) {
	case 0:
		return odd ? comm_allgather(c, a, b, 4, COMM_INT32, NULL)
			   : comm_allreduce(c, a, b, 4, COMM_INT32, COMM_SUM, NULL);
	case 1:
		return odd ? comm_broadcast(c, a, b, 4, COMM_INT32, 0, NULL)
			   : comm_reduce(c, a, b, 4, COMM_INT32, COMM_SUM, 0, NULL);
	default:
		return odd ? comm_barrier(c, NULL)
			   : comm_allreduce(c, a, b, 4, COMM_INT32, COMM_SUM, NULL);
	}
}

/* B2 case k: the odd rank differs in count, dtype, redop, root. */
static comm_result_t b2_post(comm_t *c, int k, int odd, int32_t *a, int32_t *b)
{
	switch (k) {
	case 0:
		return comm_allreduce(c, a, b, odd ? 8 : 4, COMM_INT32, COMM_SUM, NULL);
	case 1:
		return comm_allreduce(c, a, b, 4, odd ? COMM_FLOAT32 : COMM_INT32, COMM_SUM, NULL);
	case 2:
		return comm_allreduce(c, a, b, 4, COMM_INT32, odd ? COMM_MAX : COMM_SUM, NULL);
	default:
		return comm_broadcast(c, a, b, 4, COMM_INT32, odd ? 1 : 0, NULL);
	}
}

#define B1_CASES 3
#define B2_CASES 4

/*
 * Each case of B1 (arg NULL) or B2: the send buffer holds data, the receive
 * buffer the sentinel; neither may change. Then ops that agree work.
 */
static int b12_rank(int rank, int n, void *arg)
{
	int b2 = arg != NULL, cases = b2 ? B2_CASES : B1_CASES;
	comm_result_t rc;
	int32_t *a, *b;
	comm_t *c;
	long t0;
	int k;

	if (join_ms(&c, rank, n, LONG_MS) < 0)
		return 1;
	a = comm_mem_alloc(c, BUF * sizeof *a);
	b = comm_mem_alloc(c, BUF * sizeof *b);
	if (!a || !b)
		return th_bail(c);
	for (k = 0; k < cases; k++) {
		int odd = b2 ? rank == 2 : rank == k % n;

		fill(a, BUF, rank, k);
		for (int i = 0; i < BUF; i++)
			b[i] = SENTINEL;
		t0 = mx_now_ms();
		rc = b2 ? b2_post(c, k, odd, a, b) : b1_post(c, k, odd, a, b);
		S->call[rank][k].intact = all_are(b, BUF, SENTINEL);
		fill(b, BUF, rank, k);
		S->call[rank][k].intact &= memcmp(a, b, BUF * sizeof *a) == 0;
		put(rank, k, rc, c, t0);
	}
	/* ops that agree: an all-reduce and a broadcast from rank 1, exact */
	t0 = mx_now_ms();
	rc = allreduce_exact(c, a, BUF, 7);
	if (rc == COMM_OK) {
		fill(a, BUF, rank, 9);
		rc = comm_broadcast(c, a, b, BUF, COMM_INT32, 1, NULL);
		fill(a, BUF, 1, 9);
		if (rc == COMM_OK && memcmp(a, b, BUF * sizeof *a) != 0)
			rc = WRONG;
	}
	put(rank, k, rc, c, t0);
	return th_leave(c, rank);
}

static void row_b1(struct th_daemon *d)
{
	static const char *const names[B1_CASES][2] = {
		{ "allreduce", "allgather" }, { "reduce", "broadcast" }, { "allreduce", "barrier" }
	};

	shared_reset();
	CHECK(th_run_ranks(d, "b1-coll", 3, b12_rank, NULL) == 0, "B1: ranks failed (see above)");
	for (int k = 0; k < B1_CASES; k++)
		for (int r = 0; r < 3; r++) {
			want_err("B1", r, k, COMM_ERR_MISMATCH, "type", names[k][0], names[k][1],
				 NULL);
			CHECK(S->call[r][k].intact, "B1: case %d: rank %d's buffers were written",
			      k, r);
		}
	for (int r = 0; r < 3; r++)
		want_ok("B1", r, B1_CASES);
	mx_note("B1: %s | %s | %s", S->call[0][0].detail, S->call[1][1].detail,
		S->call[2][2].detail);
}

static void row_b2(struct th_daemon *d)
{
	static const char *const what[B2_CASES][3] = {
		{ "count", "has 4", "has 8" },
		{ "dtype", "has int32", "has float32" },
		{ "redop", "has sum", "has max" },
		{ "root", "has 0", "has 1" },
	};

	shared_reset();
	CHECK(th_run_ranks(d, "b2-field", 3, b12_rank, "b2") == 0, "B2: ranks failed (see above)");
	for (int k = 0; k < B2_CASES; k++) {
		for (int r = 0; r < 3; r++) {
			want_err("B2", r, k, COMM_ERR_MISMATCH, what[k][0], what[k][1],
				 what[k][2], NULL);
			CHECK(S->call[r][k].intact, "B2: %s: rank %d's buffers were written",
			      what[k][0], r);
		}
		mx_note("B2: %s", S->call[0][k].detail);
	}
	for (int r = 0; r < 3; r++)
		want_ok("B2", r, B2_CASES);
}

/* --- B4, B5: joins that must be refused ------------------------------------ */

/* A process that joins with explicit settings and reports in slot. */
struct joiner {
	const char *job;
	int rank, world;
	int slot;
	int (*then)(comm_t *c, int slot); /* after a join that worked; its exit status */
};

static pid_t joiner_spawn(const struct th_daemon *d, const struct joiner *j)
{
	comm_config_t cfg = COMM_CONFIG_INIT;
	comm_result_t rc;
	comm_t *c;
	pid_t pid;
	long t0;

	fflush(NULL);
	if ((pid = fork()) != 0)
		return pid;
	alarm(60);
	cfg.socket = d->sock;
	cfg.job = j->job;
	cfg.token = "ab-token";
	cfg.rank = j->rank;
	cfg.world_size = j->world;
	cfg.timeout_ms = 60000;
	t0 = mx_now_ms();
	rc = comm_init(&c, &cfg);
	record(j->slot, 0, rc, rc == COMM_OK ? "" : comm_last_error(NULL), t0);
	if (rc != COMM_OK)
		_exit(0);
	_exit(j->then ? j->then(c, j->slot) : th_leave(c, j->rank));
}

/* A joiner's exit status, or -1. */
static int joiner_wait(pid_t pid)
{
	int status;

	if (pid < 0 || waitpid(pid, &status, 0) != pid || !WIFEXITED(status))
		return -1;
	return WEXITSTATUS(status);
}

/* B4's ranks: all-reduce their pids (call 1), then stay until the test is done. */
static int b4_then(comm_t *c, int slot)
{
	int64_t *v = comm_mem_alloc(c, sizeof *v);
	comm_result_t rc;
	long t0 = mx_now_ms();

	if (!v)
		return th_bail(c);
	*v = getpid();
	rc = comm_allreduce(c, v, v, 1, COMM_INT64, COMM_SUM, NULL);
	S->call[slot][1].value = *v;
	put(slot, 1, rc, c, t0);
	if (await(&S->go) < 0)
		return th_bail(c);
	return th_leave(c, comm_rank(c));
}

static void row_b4(struct th_daemon *d)
{
	struct joiner first = { "b4-dup", 0, 2, 0, b4_then }, second = { "b4-dup", 0, 2, 1, NULL },
		      other = { "b4-dup", 1, 2, 2, b4_then }, late = { "b4-dup", 0, 2, 3, NULL };
	long off = log_size(d);
	pid_t p0, p1, p2;
	char who[64];

	shared_reset();
	p0 = joiner_spawn(d, &first);
	CHECK(wait_log(d, &off, 10000, "job b4-dup: rank 0 joined", NULL),
	      "B4: the first rank 0 did not join");
	p1 = joiner_spawn(d, &second);
	CHECK(joiner_wait(p1) == 0, "B4: the second rank 0 did not end");
	p2 = joiner_spawn(d, &other);
	CHECK(await_calls(1, 1) == 0 && await(&S->call[2][1].done) == 0,
	      "B4: the job did not form");
	/* a third claim, after the job formed */
	CHECK(joiner_wait(joiner_spawn(d, &late)) == 0, "B4: the late rank 0 did not end");
	S->go = 1;
	CHECK(joiner_wait(p0) == 0 && joiner_wait(p2) == 0, "B4: the job's ranks failed");
	snprintf(who, sizeof who, "rank 0 has already joined (pid %d)", (int)p0);
	want_err("B4", 1, 0, COMM_ERR_INVALID_ARG, who, NULL);
	want_fast("B4", 1, 0);
	want_err("B4", 3, 0, COMM_ERR_BUSY, "already formed", NULL);
	want_ok("B4", 0, 0);
	want_ok("B4", 0, 1);
	want_ok("B4", 2, 1);
	/* the job is the first claimant and rank 1: the sum of their pids */
	for (int s = 0; s <= 2; s += 2)
		CHECK(S->call[s][1].value == (long long)p0 + p2,
		      "B4: the job summed pids to %lld, want %d + %d", S->call[s][1].value, (int)p0,
		      (int)p2);
	mx_note("B4: second claim: %s (%s); after the job formed: %s (%s)",
		rc_name(S->call[1][0].rc), S->call[1][0].detail, rc_name(S->call[3][0].rc),
		S->call[3][0].detail);
}

/*
 * B5's ranks, once the job formed: an all-reduce (call 1); a broadcast from
 * root 2 = world (call 2) and a reduce to root -1 (call 3), on every rank; a
 * broadcast where rank 1 alone names root 2 (call 4); an all-reduce (call 5).
 */
static int b5_then(comm_t *c, int slot)
{
	int rank = comm_rank(c);
	int32_t *a = comm_mem_alloc(c, BUF * sizeof *a), *b = comm_mem_alloc(c, BUF * sizeof *b);
	comm_result_t rc;
	long t0;

	if (!a || !b)
		return th_bail(c);
	t0 = mx_now_ms();
	put(slot, 1, allreduce_exact(c, a, BUF, 3), c, t0);
	for (int k = 2; k <= 4; k++) {
		fill(a, BUF, rank, k);
		for (int i = 0; i < BUF; i++)
			b[i] = SENTINEL;
		t0 = mx_now_ms();
		if (k == 2)
			rc = comm_broadcast(c, a, b, 4, COMM_INT32, 2, NULL);
		else if (k == 3)
			rc = comm_reduce(c, a, b, 4, COMM_INT32, COMM_SUM, -1, NULL);
		else
			rc = comm_broadcast(c, a, b, 4, COMM_INT32, rank == 1 ? 2 : 0, NULL);
		S->call[slot][k].intact = all_are(b, BUF, SENTINEL);
		put(slot, k, rc, c, t0);
	}
	t0 = mx_now_ms();
	put(slot, 5, allreduce_exact(c, a, BUF, 5), c, t0);
	return th_leave(c, rank);
}

/* A raw hello for job b5-job as rank of world; CHECK it is refused with want in the detail. */
static void b5_raw(const struct th_daemon *d, int rank, int world, const char *want)
{
	struct frame_reader rd;
	char detail[256];
	int fd = raw_connect(d->sock), st;

	frame_reader_init(&rd);
	st = raw_hello_rank(fd, &rd, "b5-job", "ab-token", rank, world, detail, sizeof detail);
	CHECK(st == COMM_ERR_INVALID_ARG && strstr(detail, want),
	      "B5: hello as rank %d of %d: %d (%s), want INVALID_ARG: %s", rank, world, st, detail,
	      want);
	CHECK(raw_closed_by_daemon(fd), "B5: hello as rank %d of %d: connection kept", rank, world);
	mx_note("B5: rank %d of %d: %s", rank, world, detail);
	frame_reader_free(&rd);
	close(fd);
}

static void row_b5(struct th_daemon *d)
{
	struct joiner r0 = { "b5-job", 0, 2, 0, b5_then }, r1 = { "b5-job", 1, 2, 1, b5_then },
		      world3 = { "b5-job", 1, 3, 2, NULL }, past = { "b5-job", 2, 2, 3, NULL };
	long off = log_size(d);
	pid_t p0, p1;

	shared_reset();
	p0 = joiner_spawn(d, &r0);
	CHECK(wait_log(d, &off, 10000, "job b5-job: rank 0 joined", NULL),
	      "B5: rank 0 did not join");
	/* while the job forms: ranks out of range (libcomm refuses rank 2 itself), world 3 */
	b5_raw(d, 2, 2, "rank 2 is not in 0..1");
	b5_raw(d, -1, 2, "rank -1 is not in 0..1");
	CHECK(joiner_wait(joiner_spawn(d, &past)) == 0, "B5: rank 2 of 2 did not end");
	want_err("B5", 3, 0, COMM_ERR_INVALID_ARG, "rank 2", NULL);
	CHECK(joiner_wait(joiner_spawn(d, &world3)) == 0, "B5: rank 1 of 3 did not end");
	want_err("B5", 2, 0, COMM_ERR_INVALID_ARG, "world size 2, but rank 1 says 3", NULL);
	/* the job is intact: the right rank 1 completes it */
	p1 = joiner_spawn(d, &r1);
	CHECK(joiner_wait(p0) == 0 && joiner_wait(p1) == 0, "B5: the job's ranks failed");
	for (int s = 0; s < 2; s++) {
		want_ok("B5", s, 0);
		want_ok("B5", s, 1);
		want_err("B5", s, 2, COMM_ERR_INVALID_ARG, "root 2 is not in 0..1", NULL);
		want_err("B5", s, 3, COMM_ERR_INVALID_ARG, "root -1 is not in 0..1", NULL);
		for (int k = 2; k <= 4; k++)
			CHECK(S->call[s][k].intact, "B5: rank %d, call %d: its buffer was written",
			      s, k);
		want_ok("B5", s, 5);
	}
	/* one rank's bad root: that rank is told why, its partner that the op was refused */
	want_err("B5", 1, 4, COMM_ERR_INVALID_ARG, "root 2 is not in 0..1", NULL);
	want_err("B5", 0, 4, COMM_ERR_INVALID_ARG, "refused on rank 1", NULL);
	mx_note("B5: world 3 in a job of 2: %s; root 2: %s; one rank's root 2, its partner: %s",
		S->call[2][0].detail, S->call[0][2].detail, S->call[0][4].detail);
}

/* --- B6: a send without a recv; sizes that disagree ------------------------ */

/*
 * Job b6-norecv (arg NULL): rank 0 sends, rank 1 never receives; rank 1 then
 * posts an op. Job b6-size: 16 bytes sent, 32 expected; then 16 and 16.
 */
static int b6_rank(int rank, int n, void *arg)
{
	int sizes = arg != NULL, slot = rank + (sizes ? 2 : 0);
	char ms[16];
	comm_result_t rc;
	int32_t *v;
	comm_t *c;
	long t0;

	snprintf(ms, sizeof ms, "%d", SHORT_MS);
	if (join_ms(&c, rank, n, ms) < 0)
		return 1;
	if (!(v = comm_mem_alloc(c, BUF * sizeof *v)))
		return th_bail(c);
	fill(v, BUF, rank, 0);
	if (!sizes) {
		if (rank == 1 && await(&S->call[0][0].done) < 0)
			return th_bail(c);
		t0 = mx_now_ms();
		rc = rank == 0 ? comm_send(c, v, 4, COMM_INT32, 1, NULL)
			       : comm_recv(c, v, 4, COMM_INT32, 0, NULL);
		put(slot, 0, rc, c, t0);
		return th_leave(c, rank);
	}
	for (int i = 0; rank == 1 && i < BUF; i++)
		v[i] = SENTINEL;
	t0 = mx_now_ms();
	rc = rank == 0 ? comm_send(c, v, 4, COMM_INT32, 1, NULL)
		       : comm_recv(c, v, 8, COMM_INT32, 0, NULL);
	S->call[slot][0].intact = rank == 0 || all_are(v, BUF, SENTINEL);
	put(slot, 0, rc, c, t0);
	t0 = mx_now_ms();
	rc = rank == 0 ? comm_send(c, v, 4, COMM_INT32, 1, NULL)
		       : comm_recv(c, v, 4, COMM_INT32, 0, NULL);
	if (rc == COMM_OK && rank == 1) {
		int32_t want[BUF];

		fill(want, 4, 0, 0);
		for (int i = 4; i < BUF; i++)
			want[i] = SENTINEL;
		rc = memcmp(v, want, sizeof want) == 0 ? COMM_OK : WRONG;
	}
	put(slot, 1, rc, c, t0);
	return th_leave(c, rank);
}

static void row_b6(struct th_daemon *d)
{
	struct th_ranks none, size;
	const struct call *x = &S->call[0][0];

	shared_reset();
	if (th_ranks_start(&none, d, "b6-norecv", 2, b6_rank, NULL) < 0 ||
	    th_ranks_start(&size, d, "b6-size", 2, b6_rank, "sizes") < 0) {
		CHECK(0, "B6: ranks did not start");
		return;
	}
	CHECK(th_ranks_wait(&none) == 0, "B6: the job without a recv failed (see above)");
	CHECK(th_ranks_wait(&size) == 0, "B6: the job with sizes that disagree failed");
	want_err("B6", 0, 0, COMM_ERR_TIMEOUT, "no matching recv", "rank 1", NULL);
	CHECK(x->took_ms >= SHORT_MS - 300 && x->took_ms <= SHORT_MS + 2500,
	      "B6: the send without a recv failed after %ld ms, the deadline is %d ms", x->took_ms,
	      SHORT_MS);
	want_err("B6", 1, 0, COMM_ERR_TIMEOUT, "no matching recv", NULL);
	want_fast("B6", 1, 0);
	for (int s = 2; s < 4; s++) {
		want_err("B6", s, 0, COMM_ERR_MISMATCH, "16 bytes sent, 32 expected", NULL);
		CHECK(S->call[s][0].took_ms < SHORT_MS / 2,
		      "B6: the size mismatch came after %ld ms, not at match time",
		      S->call[s][0].took_ms);
		want_ok("B6", s, 1);
	}
	CHECK(S->call[3][0].intact, "B6: the receiver's buffer was written after a size mismatch");
	mx_note("B6: no recv: %s after %ld ms (deadline %d ms): %s", rc_name(x->rc), x->took_ms,
		SHORT_MS, x->detail);
	mx_note("B6: sizes: %s after %ld ms (sender) and %ld ms (receiver): %s",
		rc_name(S->call[2][0].rc), S->call[2][0].took_ms, S->call[3][0].took_ms,
		S->call[2][0].detail);
}

/* --- B8: ops after the job failed ------------------------------------------ */

#define B8_CALLS 6

/* Rank 2 aborts after op 1; the others, once the job has failed, try ops of every kind. */
static int b8_rank(int rank, int n, void *arg)
{
	comm_request_t *req;
	comm_result_t rc;
	comm_t *c;
	int32_t *v;
	long t0;

	if (join_ms(&c, rank, n, LONG_MS) < 0)
		return 1;
	if (first_op(c, &v, rank) < 0)
		return th_bail(c);
	if (rank == 2) {
		comm_abort(c);
		return 0;
	}
	if (await(&S->go) < 0)
		return th_bail(c);
	for (int k = 1; k < B8_CALLS; k++) {
		t0 = mx_now_ms();
		switch (k) {
		case 1:
			rc = comm_allreduce(c, v, v, COUNT, COMM_INT32, COMM_SUM, NULL);
			break;
		case 2:
			rc = comm_broadcast(c, v, v, COUNT, COMM_INT32, 0, NULL);
			break;
		case 3:
			rc = comm_barrier(c, NULL);
			break;
		case 4:
			rc = rank == 0 ? comm_send(c, v, 4, COMM_INT32, 1, NULL)
				       : comm_recv(c, v, 4, COMM_INT32, 0, NULL);
			break;
		default:
			rc = comm_allreduce(c, v, v, COUNT, COMM_INT32, COMM_SUM, &req);
			if (rc == COMM_OK)
				rc = comm_wait(req, -1);
			break;
		}
		put(rank, k, rc, c, t0);
	}
	return th_leave(c, rank);
}

static void row_b8(struct th_daemon *d)
{
	long off = log_size(d), worst = 0;
	struct th_ranks rs;

	shared_reset();
	if (th_ranks_start(&rs, d, "b8-failed", 3, b8_rank, NULL) < 0) {
		CHECK(0, "B8: ranks did not start");
		return;
	}
	CHECK(wait_log(d, &off, 10000, "job b8-failed: failed: COMM_ERR_ABORTED", NULL),
	      "B8: the job did not fail");
	S->go = 1;
	CHECK(th_ranks_wait(&rs) == 0, "B8: ranks failed (see above)");
	for (int r = 0; r < 3; r++)
		want_ok("B8", r, 0);
	for (int r = 0; r < 2; r++)
		for (int k = 1; k < B8_CALLS; k++) {
			want_err("B8", r, k, COMM_ERR_ABORTED, "rank 2 ", "comm_abort", NULL);
			want_fast("B8", r, k);
			worst = S->call[r][k].took_ms > worst ? S->call[r][k].took_ms : worst;
		}
	mx_note("B8: %d ops after the failure, each answered in %ld ms at most (deadline %s ms): %s",
		2 * (B8_CALLS - 1), worst, LONG_MS, S->call[0][1].detail);
}

static const struct mx_row rows[] = {
	{ "A1", "rank SIGKILLed while an all-reduce is in flight", row_a1, 0 },
	{ "A2", "rank killed before posting, others already waiting", row_a2, 0 },
	{ "A3", "rank SIGSTOPped mid-op", row_a3, 0 },
	{ "A4", "rank closes its socket with ops pending", row_a4, 0 },
	{ "A5", "rank exits while the daemon has its memory mapped", row_a5, 0 },
	{ "B1", "ranks post different collectives at the same seq", row_b1, 0 },
	{ "B2", "same op, different count / dtype / op / root", row_b2, 0 },
	{ "B4", "two processes claim the same rank", row_b4, 0 },
	{ "B5", "rank >= world size, negative, world sizes disagree, root out of range", row_b5,
	  0 },
	{ "B6", "send without a matching recv; size mismatch", row_b6, 0 },
	{ "B8", "ops after the job failed", row_b8, 0 },
};

int main(int argc, char **argv)
{
	S = mmap(NULL, sizeof *S, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	REQUIRE(S != MAP_FAILED, "mmap");
	return mx_main(argc, argv, rows, (int)(sizeof rows / sizeof rows[0]), NULL);
}
