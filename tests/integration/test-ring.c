/*
 * test-ring.c: the shared-memory submission ring against the real commd:
 * more ops in flight than it has slots (ring and socket mixed), waits that
 * sleep, socket-only and mixed jobs, no CPU burnt while idle, bad RingAttach
 * input, a ring filled by hand, a ring kept full forever by a hog while
 * another client is served, and a ring rank killed mid-op.
 */
#include <dirent.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "check.h"
#include "comm.h"
#include "harness.h"
#include "raw.h"
#include "ring.h"

#define MANY 700             /* outstanding all-reduces per rank: past RING_SLOTS */
#define WIDTH 8              /* int32 elements of room per op (1..WIDTH used) */
#define GROUP 300            /* sends and recvs per rank in one group */
#define SLEEPY 200           /* all-reduce + barrier rounds with sleeping waits */
#define POISON ((int32_t)0x5a5a5a5a)
#define IDLE_US 1500000      /* how long the last rank keeps the others in a barrier */
#define CPU_MAX 0.3          /* seconds of CPU the idle side may use in that time */

static struct th_daemon d;

/* How the ranks of a job join: bit r set = rank r gets the setting. */
struct mode {
	unsigned spin0;  /* COMM_SPIN_US=0: every wait sleeps */
	unsigned noring; /* COMM_RING=0: the socket only */
};

static const struct mode ring_all = { 0, 0 };

/* What the ranks of the idle case measured (shared with the test). */
struct idle {
	double rank_cpu[4];
	double rank_wall[4];    /* how long their wait took: that the barrier held */
	double daemon_cpu;
	int measured;
};

static struct idle *idle;

/* --- helpers ----------------------------------------------------------------- */

static int count_eventfds(void)
{
	DIR *dp = opendir("/proc/self/fd");
	struct dirent *e;
	char path[300], target[64];
	int n = 0;

	if (!dp)
		return -1;
	while ((e = readdir(dp))) {
		ssize_t len;

		if (e->d_name[0] == '.')
			continue;
		snprintf(path, sizeof path, "/proc/self/fd/%s", e->d_name);
		len = readlink(path, target, sizeof target - 1);
		if (len < 0)
			continue;
		target[len] = '\0';
		n += strcmp(target, "anon_inode:[eventfd]") == 0;
	}
	closedir(dp);
	return n;
}

/*
 * Join with the environment m gives rank r. A ring rank holds one eventfd
 * more after comm_init, a socket-only rank none: that shows which path it is on.
 */
static int join(comm_t **c, int r, int n, const struct mode *m)
{
	int ring = !(m->noring >> r & 1), e0, e1;

	if (m->spin0 >> r & 1)
		setenv("COMM_SPIN_US", "0", 1);
	else
		unsetenv("COMM_SPIN_US");
	if (ring)
		unsetenv("COMM_RING");
	else
		setenv("COMM_RING", "0", 1);
	e0 = count_eventfds();
	if (th_join(c, r, n) < 0)
		return -1;
	e1 = count_eventfds();
	if (e1 - e0 != ring) {
		fprintf(stderr, "rank %d: %d eventfds before comm_init, %d after; want %d more "
			"(%s)\n", r, e0, e1, ring, ring ? "ring" : "COMM_RING=0");
		comm_abort(*c);
		return -1;
	}
	return 0;
}

/* Rank r's input for element k of op i of round t: distinct per rank, op and element. */
static int32_t val(int r, int t, int i, int k)
{
	return (int32_t)(r * 7919 + t * 100003 + i * 131 + k * 17 - 5000);
}

/* The reduction of val over n ranks, computed here, one rank at a time. */
static int32_t want(int n, comm_redop_t op, int t, int i, int k)
{
	int64_t acc = val(0, t, i, k);

	for (int r = 1; r < n; r++) {
		int32_t v = val(r, t, i, k);

		acc = op == COMM_MAX ? (v > acc ? v : acc) : acc + v;
	}
	return (int32_t)acc;
}

static int count_of(int i)
{
	return 1 + i % WIDTH;
}

static comm_redop_t op_of(int i)
{
	return i % 3 == 0 ? COMM_MAX : COMM_SUM;
}

static long clock_ticks(void)
{
	static long hz;

	if (!hz)
		hz = sysconf(_SC_CLK_TCK);
	return hz;
}

/* A process's CPU time (utime + stime) in seconds, from /proc/PID/stat; -1 on error. */
static double proc_cpu(pid_t pid)
{
	char path[64], buf[1024], *p;
	unsigned long ut, st;
	FILE *f;
	size_t len;

	snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
	f = fopen(path, "r");
	if (!f)
		return -1;
	len = fread(buf, 1, sizeof buf - 1, f);
	fclose(f);
	buf[len] = '\0';
	/* after "pid (comm) ": state is field 3, utime 14, stime 15 */
	p = strrchr(buf, ')');
	if (!p || sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu", &ut,
			 &st) != 2)
		return -1;
	return (double)(ut + st) / (double)clock_ticks();
}

static double self_cpu(void)
{
	struct rusage ru;

	getrusage(RUSAGE_SELF, &ru);
	return (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6 +
	       (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6;
}


static void run_job(int n, th_rank_fn fn, const void *arg, const char *what)
{
	static int next_job;
	struct timespec t0;
	char job[64];
	int failed;

	snprintf(job, sizeof job, "ring-%d", ++next_job);
	clock_gettime(CLOCK_MONOTONIC, &t0);
	failed = th_run_ranks(&d, job, n, fn, (void *)arg);
	CHECK(failed == 0, "%s: %d of %d ranks failed", what, failed, n);
	printf("%s: %s (%.1f s)\n", failed ? "FAIL" : "ok", what, th_secs_since(&t0));
	fflush(stdout);
}

/* --- a rank that leaves with a reply unread -------------------------------------- */

/*
 * Rank 0, by hand: a barrier whose answer it never reads, then Leave, then
 * close. Its socket held unread data, so commd sees an error on it
 * (ECONNRESET: POLLERR) with the Leave still to be read, as with a rank
 * whose wait took its answer from the ring while commd also sent it on the
 * socket. The leave must count: ranks 1 and 2 go on with sends and recvs
 * between them, which do not need rank 0.
 */
static int rank_unread(int r, int n, void *arg)
{
	comm_t *c;
	int bad = 0;

	(void)arg;
	if (r == 0) {
		Commpb__Envelope env = COMMPB__ENVELOPE__INIT;
		Commpb__Op op = COMMPB__OP__INIT;
		Commpb__BufRef none = COMMPB__BUF_REF__INIT;
		Commpb__Leave lv = COMMPB__LEAVE__INIT;
		struct frame_reader rd;
		int fd = raw_connect(getenv("COMM_SOCKET"));

		frame_reader_init(&rd);
		if (raw_hello_rank(fd, &rd, getenv("COMM_JOB"), getenv("COMM_TOKEN"), 0, n, NULL,
				   0) != COMM_OK)
			return 1;
		op.seq = 1;
		op.type = COMMPB__OP_TYPE__OP_BARRIER;
		op.dtype = COMM_UINT8; /* as libcomm's barrier */
		op.send = &none;
		op.recv = &none;
		env.id = 1;
		env.body_case = COMMPB__ENVELOPE__BODY_OP;
		env.op = &op;
		raw_send(fd, &env, NULL, 0);
		usleep(300 * 1000); /* the barrier's answer arrives, unread */
		env = (Commpb__Envelope)COMMPB__ENVELOPE__INIT;
		env.id = 2;
		env.body_case = COMMPB__ENVELOPE__BODY_LEAVE;
		env.leave = &lv;
		raw_send(fd, &env, NULL, 0);
		close(fd);
		frame_reader_free(&rd);
		return 0;
	}
	if (th_join(&c, r, n) < 0)
		return 1;
	if (comm_barrier(c, NULL) != COMM_OK) {
		fprintf(stderr, "rank %d: barrier: %s\n", r, comm_last_error(c));
		return th_bail(c);
	}
	usleep(600 * 1000); /* rank 0 has left */
	for (int round = 0; round < 20 && !bad; round++) {
		int32_t out = r * 100 + round, in = -1;
		comm_result_t rc;

		comm_group_start(c);
		comm_send(c, &out, 1, COMM_INT32, 3 - r, NULL);
		comm_recv(c, &in, 1, COMM_INT32, 3 - r, NULL);
		rc = comm_group_end(c);
		if (rc != COMM_OK || in != (3 - r) * 100 + round)
			bad = fprintf(stderr, "rank %d: round %d after rank 0 left: %s (%s), got %d\n",
				      r, round, comm_result_name(rc), comm_last_error(c), in) > 0;
	}
	return bad ? th_bail(c) : th_leave(c, r);
}

/* --- 1, 3: more ops in flight than the ring has slots ------------------------- */

/* Post MANY all-reduces with requests, wait them in order, check every element. */
static int many_allreduces(comm_t *c, int r, int n, int t)
{
	static comm_request_t *reqs[MANY];
	int32_t *in = comm_mem_alloc(c, MANY * WIDTH * sizeof *in);
	int32_t *out = comm_mem_alloc(c, MANY * WIDTH * sizeof *out);
	int bad = 0;

	if (!in || !out) {
		fprintf(stderr, "rank %d: comm_mem_alloc: %s\n", r, comm_last_error(c));
		return 1;
	}
	for (int i = 0; i < MANY; i++)
		for (int k = 0; k < WIDTH; k++) {
			in[i * WIDTH + k] = k < count_of(i) ? val(r, t, i, k) : POISON;
			out[i * WIDTH + k] = POISON;
		}
	for (int i = 0; i < MANY; i++) {
		comm_result_t rc = comm_allreduce(c, in + i * WIDTH, out + i * WIDTH,
						  (size_t)count_of(i), COMM_INT32, op_of(i),
						  &reqs[i]);

		if (rc != COMM_OK) {
			fprintf(stderr, "rank %d: round %d: posting op %d: %s: %s\n", r, t, i,
				comm_result_name(rc), comm_last_error(c));
			return th_bail(c);
		}
	}
	for (int i = 0; i < MANY; i++) {
		comm_result_t rc = comm_wait(reqs[i], -1);

		if (rc != COMM_OK) {
			fprintf(stderr, "rank %d: round %d: op %d: %s: %s\n", r, t, i,
				comm_result_name(rc), comm_last_error(c));
			return th_bail(c);
		}
	}
	for (int i = 0; i < MANY && bad < 5; i++)
		for (int k = 0; k < WIDTH; k++) {
			int32_t w = k < count_of(i) ? want(n, op_of(i), t, i, k) : POISON;
			int32_t v = k < count_of(i) ? val(r, t, i, k) : POISON;

			if (out[i * WIDTH + k] != w || in[i * WIDTH + k] != v) {
				fprintf(stderr,
					"rank %d: round %d: op %d element %d: out %d in %d, want "
					"out %d in %d\n",
					r, t, i, k, out[i * WIDTH + k], in[i * WIDTH + k], w, v);
				bad++;
				break;
			}
		}
	comm_mem_free(c, in);
	comm_mem_free(c, out);
	return bad ? 1 : 0;
}

static int rank_many(int r, int n, void *arg)
{
	comm_t *c;

	if (join(&c, r, n, arg) < 0)
		return 1;
	/* two rounds: the second reuses slots that the first's spill skipped */
	for (int t = 0; t < 2; t++)
		if (many_allreduces(c, r, n, t))
			return th_bail(c);
	return th_leave(c, r);
}

/* The j-th message from rank `from` in round t, element k. */
static int32_t msg(int from, int t, int j, int k)
{
	return (int32_t)(from * 1000003 + t * 50021 + j * 37 + k);
}

/*
 * A group of GROUP sends and GROUP recvs with the other rank (of 2): rank
 * 0 interleaves them, rank 1 puts every recv first, so the ring's slots run
 * out at different points on the two sides. Round 0 posts without requests
 * (group_end waits), round 1 with requests waited in order.
 */
static int group_exchange(comm_t *c, int r, int t)
{
	static comm_request_t *reqs[2 * GROUP];
	int32_t *sb = comm_mem_alloc(c, GROUP * WIDTH * sizeof *sb);
	int32_t *rb = comm_mem_alloc(c, GROUP * WIDTH * sizeof *rb);
	int peer = 1 - r, nreq = 0, bad = 0;
	comm_result_t rc;

	if (!sb || !rb) {
		fprintf(stderr, "rank %d: comm_mem_alloc: %s\n", r, comm_last_error(c));
		return 1;
	}
	for (int j = 0; j < GROUP; j++)
		for (int k = 0; k < WIDTH; k++) {
			sb[j * WIDTH + k] = msg(r, t, j, k);
			rb[j * WIDTH + k] = POISON;
		}
	comm_group_start(c);
	for (int pass = 0; pass < 2; pass++) {
		for (int j = 0; j < GROUP; j++) {
			int send = r == 0 || pass == 1, recv = r == 0 || pass == 0;
			size_t cnt = (size_t)count_of(j);

			if (r == 0 && pass == 1)
				break;
			if (recv) {
				rc = comm_recv(c, rb + j * WIDTH, cnt, COMM_INT32, peer,
					       t ? &reqs[nreq++] : NULL);
				if (rc != COMM_OK)
					goto fail;
			}
			if (send) {
				rc = comm_send(c, sb + j * WIDTH, cnt, COMM_INT32, peer,
					       t ? &reqs[nreq++] : NULL);
				if (rc != COMM_OK)
					goto fail;
			}
		}
	}
	rc = comm_group_end(c);
	if (rc != COMM_OK)
		goto fail;
	for (int i = 0; i < nreq; i++)
		if ((rc = comm_wait(reqs[i], -1)) != COMM_OK)
			goto fail;
	for (int j = 0; j < GROUP && bad < 5; j++)
		for (int k = 0; k < WIDTH; k++) {
			int32_t w = k < count_of(j) ? msg(peer, t, j, k) : POISON;

			if (rb[j * WIDTH + k] != w || sb[j * WIDTH + k] != msg(r, t, j, k)) {
				fprintf(stderr,
					"rank %d: round %d: message %d element %d: got %d, want %d "
					"(sent %d)\n",
					r, t, j, k, rb[j * WIDTH + k], w, sb[j * WIDTH + k]);
				bad++;
				break;
			}
		}
	comm_mem_free(c, sb);
	comm_mem_free(c, rb);
	return bad ? 1 : 0;
fail:
	fprintf(stderr, "rank %d: round %d: group exchange: %s: %s\n", r, t, comm_result_name(rc),
		comm_last_error(c));
	return th_bail(c);
}

static int rank_group(int r, int n, void *arg)
{
	comm_t *c;

	if (join(&c, r, n, arg) < 0)
		return 1;
	for (int t = 0; t < 2; t++)
		if (group_exchange(c, r, t))
			return th_bail(c);
	return th_leave(c, r);
}

/* --- 2: waits that sleep ------------------------------------------------------ */

/* SLEEPY rounds of a blocking all-reduce and a barrier; rank (i % 4) is late on some. */
static int rank_sleepy(int r, int n, void *arg)
{
	comm_t *c;
	int32_t *v;

	if (join(&c, r, n, arg) < 0)
		return 1;
	v = comm_mem_alloc(c, WIDTH * sizeof *v);
	if (!v)
		return th_bail(c);
	for (int i = 0; i < SLEEPY; i++) {
		comm_result_t rc;

		if (i % 3 == 0 && r == i % 4)
			usleep(3000);
		for (int k = 0; k < WIDTH; k++)
			v[k] = val(r, 7, i, k);
		rc = comm_allreduce(c, v, v, WIDTH, COMM_INT32, op_of(i), NULL);
		if (rc == COMM_OK)
			rc = comm_barrier(c, NULL);
		if (rc != COMM_OK) {
			fprintf(stderr, "rank %d: round %d: %s: %s\n", r, i, comm_result_name(rc),
				comm_last_error(c));
			return th_bail(c);
		}
		for (int k = 0; k < WIDTH; k++)
			if (v[k] != want(n, op_of(i), 7, i, k)) {
				fprintf(stderr, "rank %d: round %d element %d: %d, want %d\n", r, i,
					k, v[k], want(n, op_of(i), 7, i, k));
				return th_bail(c);
			}
	}
	return th_leave(c, r);
}

/* --- 4: idle burns no CPU --------------------------------------------------------- */

/*
 * A burst of ops, then every rank but 0 waits in a barrier that rank 0
 * reaches after IDLE_US. The waiting ranks measure their own CPU time
 * around the wait, rank 0 the daemon's over its sleep.
 */
static int rank_idle(int r, int n, void *arg)
{
	comm_t *c;
	comm_result_t rc;
	double t0;

	if (join(&c, r, n, arg) < 0)
		return 1;
	if (many_allreduces(c, r, n, 3))
		return th_bail(c);
	rc = comm_barrier(c, NULL);
	if (rc != COMM_OK)
		goto fail;
	if (r == 0) {
		t0 = proc_cpu(d.pid);
		usleep(IDLE_US);
		idle->daemon_cpu = t0 < 0 ? -1 : proc_cpu(d.pid) - t0;
		rc = comm_barrier(c, NULL);
	} else {
		struct timespec w0;

		clock_gettime(CLOCK_MONOTONIC, &w0);
		t0 = self_cpu();
		rc = comm_barrier(c, NULL);
		idle->rank_cpu[r] = self_cpu() - t0;
		idle->rank_wall[r] = th_secs_since(&w0);
	}
	if (rc != COMM_OK)
		goto fail;
	__atomic_fetch_add(&idle->measured, 1, __ATOMIC_SEQ_CST);
	return th_leave(c, r);
fail:
	fprintf(stderr, "rank %d: barrier: %s: %s\n", r, comm_result_name(rc), comm_last_error(c));
	return th_bail(c);
}

static void test_idle(void)
{
	memset(idle, 0, sizeof *idle);
	run_job(4, rank_idle, &ring_all, "idle: a burst, then 3 ranks wait 1.5 s in a barrier");
	CHECK(idle->measured == 4, "idle: %d of 4 ranks measured", idle->measured);
	for (int r = 1; r < 4; r++) {
		/* half the sleep: the barrier held (a rank may start its clock late) */
		CHECK(idle->rank_wall[r] > IDLE_US / 2e6,
		      "idle: rank %d left the barrier after %.3f s; rank 0 came after %.1f s", r,
		      idle->rank_wall[r], IDLE_US / 1e6);
		CHECK(idle->rank_cpu[r] < CPU_MAX,
		      "idle: rank %d used %.3f s of CPU waiting %.3f s in a barrier", r,
		      idle->rank_cpu[r], idle->rank_wall[r]);
	}
	CHECK(idle->daemon_cpu >= 0 && idle->daemon_cpu < CPU_MAX,
	      "idle: commd used %.3f s of CPU in %.1f s with every rank waiting", idle->daemon_cpu,
	      IDLE_US / 1e6);
	printf("ok: idle: waiting ranks used %.3f, %.3f, %.3f s of CPU in %.2f, %.2f, %.2f s; "
	       "commd %.3f s in %.1f s\n",
	       idle->rank_cpu[1], idle->rank_cpu[2], idle->rank_cpu[3], idle->rank_wall[1],
	       idle->rank_wall[2], idle->rank_wall[3], idle->daemon_cpu, IDLE_US / 1e6);
}

/* --- 5: RingAttach by hand ------------------------------------------------------- */

#define SEG_BYTES (512 * 1024) /* the raw rank's memfd: ring at 0, data from DATA_OFF */
#define DATA_OFF (256 * 1024)
#define HAND_COUNT 1000

/* A rank of a 1-rank job spoken for by hand, with one sealed memfd registered. */
struct raw_rank {
	int fd;
	struct frame_reader rd;
	uint8_t *mem;
	uint64_t mem_id;
	int efd;
};

/* vmax: the highest protocol version the rank says it speaks */
static void raw_rank_open(struct raw_rank *k, const char *job, uint32_t vmax)
{
	int mfd;

	k->fd = raw_connect(d.sock);
	frame_reader_init(&k->rd);
	raw_hello(k->fd, &k->rd, job, PROTO_VERSION_MIN, vmax, COMM_OK);
	mfd = memfd_create("test-ring", MFD_CLOEXEC | MFD_ALLOW_SEALING);
	REQUIRE(mfd >= 0 && ftruncate(mfd, SEG_BYTES) == 0 &&
			fcntl(mfd, F_ADD_SEALS, F_SEAL_SHRINK) == 0,
		"sealed memfd");
	k->mem = mmap(NULL, SEG_BYTES, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0);
	REQUIRE(k->mem != MAP_FAILED, "mmap memfd");
	REQUIRE(raw_register_fd(k->fd, &k->rd, mfd, SEG_BYTES, &k->mem_id) == COMM_OK,
		"register memfd");
	close(mfd);
	k->efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	REQUIRE(k->efd >= 0, "eventfd");
	memset(k->mem, 0, RING_BYTES);
	{
		struct ring_hdr *h = (struct ring_hdr *)k->mem;

		h->magic = RING_MAGIC;
		h->version = RING_VERSION;
		h->nslots = RING_SLOTS;
		h->slot_size = sizeof(struct ring_slot);
	}
}

static void raw_rank_close(struct raw_rank *k)
{
	close(k->fd);
	frame_reader_free(&k->rd);
	munmap(k->mem, SEG_BYTES);
	close(k->efd);
}

/* Send a RingAttach; the reply's status (-1: no RingAttachReply) and detail. */
static int raw_attach(struct raw_rank *k, uint64_t mem_id, uint64_t off, uint32_t slots,
		      int fd, char *detail, size_t len)
{
	return raw_ring_attach(k->fd, &k->rd, mem_id, off, slots, fd, detail, len);
}

/*
 * Publish an op of type (an all-reduce of int32 sums unless made up) at seq
 * in the ring, its slot naming slot_seq, as libcomm does.
 */
static void publish(struct raw_rank *k, uint64_t seq, uint64_t slot_seq, uint32_t type,
		    uint64_t send_off, uint64_t recv_off, uint64_t count)
{
	struct ring_hdr *h = (struct ring_hdr *)k->mem;
	struct ring_slot *s = ring_slot(k->mem, seq);
	uint64_t one = 1;

	memset(s, 0, offsetof(struct ring_slot, done));
	s->seq = slot_seq;
	s->count = count;
	s->send_mem = k->mem_id;
	s->send_off = send_off;
	s->recv_mem = k->mem_id;
	s->recv_off = recv_off;
	s->type = type;
	s->dtype = COMM_INT32;
	s->redop = COMM_SUM;
	atomic_store((_Atomic uint64_t *)&s->posted, seq + 1);
	if (atomic_load((_Atomic uint32_t *)&h->daemon_armed) &&
	    atomic_exchange((_Atomic uint32_t *)&h->daemon_armed, 0))
		CHECK(write(k->efd, &one, sizeof one) == sizeof one, "write eventfd");
}

/* Wait (up to 10 s: a hang guard, not a speed check) for commd's answer in seq's slot. */
static int answered(struct raw_rank *k, uint64_t seq)
{
	struct ring_slot *s = ring_slot(k->mem, seq);
	struct timespec t0;

	clock_gettime(CLOCK_MONOTONIC, &t0);
	while (atomic_load((_Atomic uint64_t *)&s->done) != seq + 1) {
		if (th_secs_since(&t0) > 10)
			return 0;
		usleep(1000);
	}
	s->detail[RING_DETAIL - 1] = '\0';
	return 1;
}

/* Op seq on k's ring by hand: input i * 3 - 500 + seq, output poisoned; check all of it. */
static void hand_op(struct raw_rank *k, uint64_t seq, int sleeping)
{
	int32_t *in = (int32_t *)(k->mem + DATA_OFF + (seq - 1) * 16384);
	int32_t *out = in + 2048;
	struct ring_hdr *h = (struct ring_hdr *)k->mem;
	struct ring_slot *s = ring_slot(k->mem, seq);
	int bad = 0;

	for (int i = 0; i < 2048; i++) {
		in[i] = i * 3 - 500 + (int32_t)seq;
		out[i] = POISON;
	}
	if (sleeping)
		atomic_store((_Atomic uint32_t *)&h->rank_sleeping, 1);
	publish(k, seq, seq, COMMPB__OP_TYPE__OP_ALLREDUCE, (uint64_t)((uint8_t *)in - k->mem),
		(uint64_t)((uint8_t *)out - k->mem), HAND_COUNT);
	REQUIRE(answered(k, seq), "hand-made op %llu: no answer in its slot",
		(unsigned long long)seq);
	CHECK(s->status == COMM_OK && s->detail[0] == '\0', "hand-made op %llu: status %d (%s)",
	      (unsigned long long)seq, s->status, s->detail);
	for (int i = 0; i < 2048 && bad < 3; i++) {
		int32_t w = i < HAND_COUNT ? i * 3 - 500 + (int32_t)seq : POISON;

		if (out[i] != w || in[i] != i * 3 - 500 + (int32_t)seq) {
			CHECK(0, "hand-made op %llu: out[%d] = %d (in %d), want %d",
			      (unsigned long long)seq, i, out[i], in[i], w);
			bad++;
		}
	}
	if (sleeping) {
		/* the rank said it sleeps: the answer comes over the socket as well */
		Commpb__Envelope *m = raw_recv(k->fd, &k->rd);

		CHECK(m && m->body_case == COMMPB__ENVELOPE__BODY_OP_DONE && m->id == 0 &&
			      m->op_done->seq == seq && m->op_done->status == COMM_OK,
		      "hand-made op %llu with rank_sleeping: no OpDone(id 0, seq %llu, OK) on the "
		      "socket",
		      (unsigned long long)seq, (unsigned long long)seq);
		if (m)
			commpb__envelope__free_unpacked(m, NULL);
		atomic_store((_Atomic uint32_t *)&h->rank_sleeping, 0);
	}
}

static void test_bad_attach(int fds0)
{
	struct raw_rank k;
	char detail[512], want_detail[128];
	int p[2], fds, st;

	raw_rank_open(&k, "ring-v1", 1);
	st = raw_attach(&k, k.mem_id, 0, RING_SLOTS, k.efd, detail, sizeof detail);
	CHECK(st == COMM_ERR_VERSION && strstr(detail, "needs protocol 2"),
	      "ring attach on a protocol 1 connection: status %d (%s)", st, detail);
	raw_rank_close(&k);

	raw_rank_open(&k, "ring-bad-attach", PROTO_VERSION);
	fds = th_count_fds(d.pid);

	st = raw_attach(&k, k.mem_id, 0, 128, k.efd, detail, sizeof detail);
	CHECK(st == COMM_ERR_UNSUPPORTED && strstr(detail, "128 slots"),
	      "ring attach with 128 slots: status %d (%s)", st, detail);
	CHECK(th_count_fds(d.pid) == fds, "ring attach with 128 slots: commd kept the eventfd");

	REQUIRE(pipe(p) == 0, "pipe");
	st = raw_attach(&k, k.mem_id, 0, RING_SLOTS, p[0], detail, sizeof detail);
	CHECK(st == COMM_ERR_INVALID_ARG && strstr(detail, "not an eventfd"),
	      "ring attach with a pipe: status %d (%s)", st, detail);
	CHECK(th_count_fds(d.pid) == fds, "ring attach with a pipe: commd kept the pipe");
	close(p[0]);
	close(p[1]);

	st = raw_attach(&k, k.mem_id, SEG_BYTES - 4096, RING_SLOTS, k.efd, detail, sizeof detail);
	snprintf(want_detail, sizeof want_detail, "offset %d", SEG_BYTES - 4096);
	CHECK(st == COMM_ERR_INVALID_ARG && strstr(detail, want_detail),
	      "ring attach past the memfd's end: status %d (%s)", st, detail);
	CHECK(th_count_fds(d.pid) == fds, "ring attach past the end: commd kept the eventfd");

	st = raw_attach(&k, k.mem_id + 1000, 0, RING_SLOTS, k.efd, detail, sizeof detail);
	snprintf(want_detail, sizeof want_detail, "no mem id %llu",
		 (unsigned long long)k.mem_id + 1000);
	CHECK(st == COMM_ERR_NOT_FOUND && strstr(detail, want_detail),
	      "ring attach with an unknown mem id: status %d (%s)", st, detail);
	CHECK(th_count_fds(d.pid) == fds, "ring attach, unknown mem: commd kept the eventfd");

	/* the connection is still good: a proper attach works, a second one is refused */
	st = raw_attach(&k, k.mem_id, 0, RING_SLOTS, k.efd, detail, sizeof detail);
	CHECK(st == COMM_OK, "ring attach after refused ones: status %d (%s)", st, detail);
	CHECK(th_count_fds(d.pid) == fds + 1, "attached ring: commd has %d fds, want %d",
	      th_count_fds(d.pid), fds + 1);
	st = raw_attach(&k, k.mem_id, 0, RING_SLOTS, k.efd, detail, sizeof detail);
	CHECK(st == COMM_ERR_INVALID_ARG && strstr(detail, "already attached"),
	      "second ring attach: status %d (%s)", st, detail);
	CHECK(th_count_fds(d.pid) == fds + 1, "second ring attach: commd kept its eventfd");
	printf("ok: RingAttach refused: protocol 1, 128 slots, a pipe, past the end, unknown mem, twice\n");

	/* and commd works on the ring, in the rank's memory, in place */
	hand_op(&k, 1, 0);
	hand_op(&k, 2, 1);
	/* ops that commd refuses are answered in their slots too, and the ring goes on */
	publish(&k, 3, 3, COMMPB__OP_TYPE__OP_ALLREDUCE, DATA_OFF, SEG_BYTES - 64, HAND_COUNT);
	REQUIRE(answered(&k, 3), "op 3 (output past the end): no answer in its slot");
	CHECK(ring_slot(k.mem, 3)->status == COMM_ERR_INVALID_ARG &&
		      strstr(ring_slot(k.mem, 3)->detail, "past the end"),
	      "op 3 (output past the end): status %d (%s)", ring_slot(k.mem, 3)->status,
	      ring_slot(k.mem, 3)->detail);
	publish(&k, 4, 4, 1000, DATA_OFF, DATA_OFF + 8192, 4);
	REQUIRE(answered(&k, 4), "op 4 (type 1000): no answer in its slot");
	CHECK(ring_slot(k.mem, 4)->status == COMM_ERR_INVALID_ARG &&
		      strstr(ring_slot(k.mem, 4)->detail, "type 1000"),
	      "op 4 (type 1000): status %d (%s)", ring_slot(k.mem, 4)->status,
	      ring_slot(k.mem, 4)->detail);
	hand_op(&k, 5, 0);
	printf("ok: ops published by hand in the ring: answered in their slots, outputs in place; "
	       "OpDone on the socket too while the rank sleeps; bad ops refused in their slots\n");
	raw_rank_close(&k);
	th_check_baseline(&d, fds0, "ring attach by hand");
}

/* A slot published for the next seq but naming another: Error PROTOCOL, connection closed. */
static void test_bad_seq(int fds0)
{
	struct raw_rank k;
	char detail[512];
	Commpb__Envelope *m;
	int st;

	raw_rank_open(&k, "ring-bad-seq", PROTO_VERSION);
	st = raw_attach(&k, k.mem_id, 0, RING_SLOTS, k.efd, detail, sizeof detail);
	REQUIRE(st == COMM_OK, "ring attach: status %d (%s)", st, detail);
	publish(&k, 1, 7, COMMPB__OP_TYPE__OP_ALLREDUCE, DATA_OFF, DATA_OFF + 8192, 4);
	m = raw_recv(k.fd, &k.rd);
	CHECK(m && m->body_case == COMMPB__ENVELOPE__BODY_ERROR &&
		      m->error->status == COMM_ERR_PROTOCOL && strstr(m->error->detail, "seq 7") &&
		      strstr(m->error->detail, "expected 1"),
	      "slot 1 holding seq 7: got %s %d (%s), want Error PROTOCOL naming seq 7",
	      m ? "type" : "nothing", m ? (int)m->body_case : 0,
	      m && m->body_case == COMMPB__ENVELOPE__BODY_ERROR ? m->error->detail : "");
	if (m)
		commpb__envelope__free_unpacked(m, NULL);
	CHECK(raw_closed_by_daemon(k.fd), "slot with a wrong seq: connection kept");
	raw_rank_close(&k);
	printf("ok: a slot with the wrong seq: Error PROTOCOL naming it, connection closed\n");
	th_check_baseline(&d, fds0, "a slot with the wrong seq");
}

/*
 * A hog keeps its ring full: a child publishes every slot with a barrier
 * (a 1-rank job's, answered at once) and each slot again the moment it is
 * answered, faster than commd takes them, until told to stop. commd must
 * still serve others: an admin client's status request is answered while
 * the hog runs (10 s is a hang guard, not a speed check). It is, because
 * commd answers an op on a later loop turn than it takes it: a turn takes
 * at most the RING_SLOTS ops published before it.
 */
static void test_hog(int fds0)
{
	_Atomic int *stop = mmap(NULL, sizeof *stop, PROT_READ | PROT_WRITE,
				 MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	struct frame_reader ar;
	struct raw_rank k;
	struct pollfd p;
	char detail[512];
	uint64_t *taken;
	pid_t hog;
	int admin, st, served;

	REQUIRE(stop != MAP_FAILED, "mmap");
	raw_rank_open(&k, "ring-hog", PROTO_VERSION);
	st = raw_attach(&k, k.mem_id, 0, RING_SLOTS, k.efd, detail, sizeof detail);
	REQUIRE(st == COMM_OK, "ring attach: status %d (%s)", st, detail);
	taken = (uint64_t *)(k.mem + DATA_OFF); /* the hog's count, seen by the test */
	*taken = 0;
	hog = fork();
	REQUIRE(hog >= 0, "fork");
	if (hog == 0) {
		for (uint64_t seq = 1; seq <= RING_SLOTS; seq++)
			publish(&k, seq, seq, COMMPB__OP_TYPE__OP_BARRIER, 0, 0, 0);
		for (uint64_t seq = 1; !atomic_load(stop); seq++) {
			struct ring_slot *s = ring_slot(k.mem, seq);

			while (atomic_load((_Atomic uint64_t *)&s->done) != seq + 1)
				if (atomic_load(stop))
					_exit(0);
			if (s->status != COMM_OK)
				_exit(1);
			atomic_store((_Atomic uint64_t *)taken, seq);
			publish(&k, seq + RING_SLOTS, seq + RING_SLOTS, COMMPB__OP_TYPE__OP_BARRIER,
				0, 0, 0);
		}
		_exit(0);
	}
	while (atomic_load((_Atomic uint64_t *)taken) < 4 * RING_SLOTS)
		usleep(1000);
	admin = raw_connect(d.sock);
	frame_reader_init(&ar);
	REQUIRE(raw_hello_admin(admin, &ar) == COMM_OK, "admin hello");
	{
		Commpb__Envelope env = COMMPB__ENVELOPE__INIT;
		Commpb__StatusRequest sr = COMMPB__STATUS_REQUEST__INIT;

		env.body_case = COMMPB__ENVELOPE__BODY_STATUS_REQUEST;
		env.status_request = &sr;
		raw_send(admin, &env, NULL, 0);
	}
	p = (struct pollfd){ .fd = admin, .events = POLLIN };
	served = poll(&p, 1, 10000) == 1;
	CHECK(served, "a status request got no answer in 10 s while a hog kept its ring full");
	atomic_store(stop, 1);
	REQUIRE(waitpid(hog, &st, 0) == hog, "waitpid");
	CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0, "the hog saw a barrier fail");
	if (served) {
		Commpb__Envelope *m = raw_recv(admin, &ar);

		CHECK(m && m->body_case == COMMPB__ENVELOPE__BODY_STATUS_REPLY, "no status reply");
		if (m)
			commpb__envelope__free_unpacked(m, NULL);
	}
	printf("%s: a hog kept its ring full (%llu barriers): another client was served meanwhile\n",
	       check_failures ? "FAIL" : "ok",
	       (unsigned long long)atomic_load((_Atomic uint64_t *)taken));
	close(admin);
	frame_reader_free(&ar);
	raw_rank_close(&k);
	munmap(stop, sizeof *stop);
	th_check_baseline(&d, fds0, "a ring kept full");
}

/* --- 6: a ring rank killed mid-op ------------------------------------------------- */

/* Rank 3 does two all-reduces, posts a third and dies; the others loop until told. */
static int rank_killed(int r, int n, void *arg)
{
	comm_request_t *req;
	comm_result_t rc;
	int32_t *v;
	comm_t *c;
	int done = 0;

	if (join(&c, r, n, arg) < 0)
		return 1;
	alarm(30); /* a hang guard: PEER_LOST comes long before */
	v = comm_mem_alloc(c, WIDTH * sizeof *v);
	if (!v)
		return th_bail(c);
	for (;; done++) {
		for (int k = 0; k < WIDTH; k++)
			v[k] = val(r, 9, done, k);
		if (r == n - 1 && done == 2) {
			comm_allreduce(c, v, v, WIDTH, COMM_INT32, COMM_SUM, &req);
			raise(SIGKILL);
		}
		rc = comm_allreduce(c, v, v, WIDTH, COMM_INT32, COMM_SUM, NULL);
		if (rc != COMM_OK)
			break;
		for (int k = 0; k < WIDTH; k++)
			if (v[k] != want(n, COMM_SUM, 9, done, k)) {
				fprintf(stderr, "rank %d: op %d element %d: %d, want %d\n", r, done,
					k, v[k], want(n, COMM_SUM, 9, done, k));
				return th_bail(c);
			}
	}
	/* op 2 may complete: rank 3 posted it before it died */
	if (rc != COMM_ERR_PEER_LOST || !strstr(comm_last_error(c), "rank 3") || done < 2) {
		fprintf(stderr, "rank %d: op %d: %s (%s), want PEER_LOST (rank 3) after op 1\n",
			r, done, comm_result_name(rc), comm_last_error(c));
		return th_bail(c);
	}
	comm_finalize(c);
	return 0;
}

static void test_killed(int fds0, const struct mode *m, const char *job, const char *what)
{
	struct th_ranks rs;
	int failed;

	REQUIRE(th_ranks_start(&rs, &d, job, 4, rank_killed, (void *)m) == 0, "ranks");
	failed = th_ranks_wait(&rs);
	CHECK(failed == 1, "%s: %d ranks failed, want only the one killed (see above)", what,
	      failed);
	th_check_baseline(&d, fds0, what);
	printf("%s: %s: the others got PEER_LOST naming rank 3\n", failed == 1 ? "ok" : "FAIL",
	       what);
}

/* A plain 2-rank job after the faults: exact results. */
static int rank_ok(int r, int n, void *arg)
{
	comm_t *c;

	if (join(&c, r, n, arg) < 0)
		return 1;
	return many_allreduces(c, r, n, 5) ? th_bail(c) : th_leave(c, r);
}

int main(void)
{
	static const struct mode spin0_all = { 0xf, 0 }, spin0_half = { 0x5, 0 },
				 noring_all = { 0, 0xf }, noring_half = { 0, 0x5 },
				 noring_r0 = { 0, 0x1 };
	int fds0;

	idle = mmap(NULL, sizeof *idle, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	REQUIRE(idle != MAP_FAILED, "mmap");
	REQUIRE(th_daemon_start(&d, NULL) == 0, "daemon start");
	/* the baseline, after a first job (READY=1 races the close of the notify fd) */
	run_job(2, rank_ok, &ring_all, "warm-up: 2 ranks, 700 all-reduces");
	for (int i = 0; i < 300 && th_count_memfd_maps(d.pid) != 0; i++)
		usleep(10 * 1000);
	fds0 = th_count_fds(d.pid);

	run_job(4, rank_many, &ring_all,
		"4 ranks post 700 all-reduces each (ring, then socket past 256), waited in order, "
		"twice");
	run_job(2, rank_group, &ring_all,
		"2 ranks: a group of 300 sends + 300 recvs each (ring and socket in one group), "
		"twice");
	run_job(4, rank_sleepy, &spin0_all,
		"COMM_SPIN_US=0 on all 4 ranks: 200 all-reduces + barriers, late ranks");
	run_job(4, rank_sleepy, &spin0_half,
		"COMM_SPIN_US=0 on ranks 0 and 2, default on 1 and 3: 200 all-reduces + barriers");
	run_job(4, rank_many, &noring_all, "COMM_RING=0 on all 4 ranks: 700 all-reduces, twice");
	run_job(4, rank_many, &noring_half,
		"COMM_RING=0 on ranks 0 and 2, ring on 1 and 3: 700 all-reduces, twice");
	run_job(2, rank_group, &noring_all, "COMM_RING=0 on both ranks: group of 300 + 300");
	run_job(2, rank_group, &noring_r0, "COMM_RING=0 on rank 0 only: group of 300 + 300");
	th_check_baseline(&d, fds0, "the ring and socket jobs");

	test_idle();
	th_check_baseline(&d, fds0, "the idle job");

	test_bad_attach(fds0);
	test_bad_seq(fds0);
	test_hog(fds0);
	run_job(2, rank_ok, &ring_all, "a 2-rank job after the bad rings");

	test_killed(fds0, &ring_all, "killed-spin", "ring rank killed mid-op, default spin");
	test_killed(fds0, &spin0_all, "killed-sleep", "ring rank killed mid-op, COMM_SPIN_US=0");
	run_job(2, rank_ok, &ring_all, "a 2-rank job after the kills");
	run_job(3, rank_unread, NULL,
		"rank 0 leaves with the barrier's answer unread (commd sees ECONNRESET with the "
		"Leave still queued): a clean leave, ranks 1 and 2 go on with sends and recvs");

	CHECK(th_daemon_alive(&d), "daemon died");
	CHECK(th_daemon_stop(&d) == 0, "daemon stop");
	return CHECK_EXIT();
}
