/*
 * test-malloc.c: commd when memory runs out (issue 8). failmalloc.so,
 * preloaded into the daemon alone, fails the k-th allocation of its loop
 * thread; each request kind is swept over k = 1, 2, ... until it needs fewer.
 * The requester must get the normal answer or an error it can see, and commd
 * must serve on, holding no fd or mapping more than before.
 */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "check.h"
#include "comm.h"
#include "failmalloc.h"
#include "frame.h"
#include "harness.h"
#include "raw.h"

#if defined(__has_feature)
#if __has_feature(address_sanitizer)
#define UNDER_ASAN 1
#endif
#endif
#if defined(__SANITIZE_ADDRESS__)
#define UNDER_ASAN 1
#endif

#define B(x) COMMPB__ENVELOPE__BODY_##x
#define T(x) COMMPB__OP_TYPE__OP_##x
#define NELEM 4       /* int32 elements of the all-reduce */
#define MEM_BYTES 4096
#define RECV_OFF 64   /* the all-reduce's output, after its input */
#define MAX_K 500     /* a request allocating more than this is a runaway */
#define MAX_WHAT 12

static struct th_daemon d;
static struct failmalloc *ctl;
static int fds0;
static size_t topo_devs0, topo_numa0;

struct rc {
	int fd;
	struct frame_reader r;
};

/* The answer a request got: the reply of its kind, or an Error, or nothing. */
struct ans {
	int replied;    /* a reply of the kind asked for came */
	int status;     /* its status (COMM_OK for replies that have none), or the Error's */
	int bad;        /* no answer, or closed without an error */
	char what[96];  /* "OK", "NO_MEMORY", "PROTOCOL (closed)", or what went wrong */
	char detail[160];
	Commpb__Envelope *env;
};

/* One step of a sweep: two ranks, an admin connection, their buffers. */
struct st {
	const char *kind;
	int k;
	char job[64];
	struct rc c[2], adm;
	int mfd[2];
	int32_t *v[2];
	uint64_t mem[2];
	struct ans a[2];
};

static void rc_open(struct rc *c)
{
	c->fd = raw_connect(d.sock);
	frame_reader_init(&c->r);
}

static void rc_close(struct rc *c)
{
	if (c->fd < 0)
		return;
	close(c->fd);
	c->fd = -1;
	frame_reader_free(&c->r);
}

/* Send env; the daemon may have closed the connection already (no check). */
static void send_quiet(struct rc *c, Commpb__Envelope *env, const int *fds, int nfds)
{
	uint8_t *f;
	size_t len = frame_pack(env, &f);

	REQUIRE(len > 0, "pack");
	(void)frame_send_all(c->fd, f, len, fds, nfds);
	free(f);
}

static void send_hello(struct rc *c, const char *job, int rank, int world, Commpb__Role role)
{
	Commpb__Envelope env = COMMPB__ENVELOPE__INIT;
	Commpb__Hello h = COMMPB__HELLO__INIT;

	h.version_min = PROTO_VERSION_MIN;
	h.version_max = PROTO_VERSION;
	h.role = role;
	h.job = (char *)job;
	h.rank = rank;
	h.world_size = world;
	env.id = 1;
	env.body_case = B(HELLO);
	env.hello = &h;
	send_quiet(c, &env, NULL, 0);
}

/* A result's name without its prefix: "NO_MEMORY". */
static const char *rname(int status)
{
	const char *n = comm_result_name(status);

	return strncmp(n, "COMM_ERR_", 9) ? n : n + 9;
}

static int reply_status(const Commpb__Envelope *e)
{
	switch (e->body_case) {
	case B(HELLO_REPLY):
		return e->hello_reply->status;
	case B(REGISTER_MEM_REPLY):
		return e->register_mem_reply->status;
	case B(FREE_MEM_REPLY):
		return e->free_mem_reply->status;
	case B(OP_DONE):
		return e->op_done->status;
	default:
		return COMM_OK;
	}
}

/* Sort message e (NULL: none came) on c, answering a request whose reply is of case want. */
static void classify(struct rc *c, Commpb__Envelope *e, unsigned want, struct ans *a)
{
	memset(a, 0, sizeof *a);
	if (e && e->body_case == want) {
		a->replied = 1;
		a->status = reply_status(e);
		snprintf(a->what, sizeof a->what, "%s",
			 a->status == COMM_OK ? "OK" : rname(a->status));
		a->env = e;
		return;
	}
	if (e && e->body_case == B(ERROR)) {
		a->status = e->error->status;
		snprintf(a->detail, sizeof a->detail, "%s", e->error->detail);
		snprintf(a->what, sizeof a->what, "%s (%s)", rname(a->status),
			 raw_closed_by_daemon(c->fd) ? "closed" : "error, still open");
	} else if (e) {
		a->bad = 1;
		snprintf(a->what, sizeof a->what, "an unexpected message (body %d)",
			 (int)e->body_case);
	} else {
		a->bad = 1;
		snprintf(a->what, sizeof a->what, "%s",
			 raw_closed_by_daemon(c->fd) ? "closed with no error" : "no answer in 5 s");
	}
	if (e)
		commpb__envelope__free_unpacked(e, NULL);
}

/* Read c's answer to a request whose reply is of body case want into a. */
static void answer(struct rc *c, unsigned want, struct ans *a)
{
	classify(c, raw_recv(c->fd, &c->r), want, a);
}

/* Whether a is the normal, successful reply. */
static int ans_ok(const struct ans *a)
{
	return a->replied && a->status == COMM_OK;
}

static void ans_free(struct ans *a)
{
	if (a->env)
		commpb__envelope__free_unpacked(a->env, NULL);
	a->env = NULL;
}

/* Hello as an admin (as commctl does) on a new connection. */
static void admin_open(struct rc *a)
{
	struct ans h;

	rc_open(a);
	send_hello(a, "", 0, 0, COMMPB__ROLE__ROLE_ADMIN);
	answer(a, B(HELLO_REPLY), &h);
	REQUIRE(h.replied && h.status == COMM_OK, "admin hello: %s", h.what);
	ans_free(&h);
}

static void send_status(struct rc *a, const char *job)
{
	Commpb__Envelope env = COMMPB__ENVELOPE__INIT;
	Commpb__StatusRequest sr = COMMPB__STATUS_REQUEST__INIT;

	sr.job = (char *)job;
	env.id = 7;
	env.body_case = B(STATUS_REQUEST);
	env.status_request = &sr;
	send_quiet(a, &env, NULL, 0);
}

/* A status reply on admin connection a (the test fails without one). */
static Commpb__Envelope *status(struct rc *a, const char *job)
{
	struct ans s;

	send_status(a, job);
	answer(a, B(STATUS_REPLY), &s);
	REQUIRE(s.replied, "status: %s %s", s.what, s.detail);
	return s.env;
}

static Commpb__JobInfo *job_in(const Commpb__Envelope *e, const char *job)
{
	for (size_t i = 0; i < e->status_reply->n_jobs; i++)
		if (!strcmp(e->status_reply->jobs[i]->name, job))
			return e->status_reply->jobs[i];
	return NULL;
}

/*
 * Open s->adm and wait until commd has nconns connections besides it and,
 * when job is given, that job has joined ranks and pending ops.
 */
static void settle(struct st *s, unsigned nconns, const char *job, int joined, unsigned pending)
{
	for (int i = 0; i < 1000; i++) {
		Commpb__Envelope *e;
		Commpb__JobInfo *ji;
		int ok;

		if (s->adm.fd < 0)
			admin_open(&s->adm);
		e = status(&s->adm, job ? job : "");
		ji = job ? job_in(e, job) : NULL;
		ok = e->status_reply->connections == nconns + 1 &&
		     (!job || (ji && ji->joined == joined && ji->ops_pending == pending));
		commpb__envelope__free_unpacked(e, NULL);
		if (ok)
			return;
		usleep(2000);
	}
	REQUIRE(0, "%s k=%d: commd did not settle (%u connections, job %s)", s->kind, s->k,
		nconns, job ? job : "-");
}

/* A sealed memfd of MEM_BYTES, mapped here as *v, for rank r's values. */
static int memfd(int32_t **v, int r)
{
	int fd = memfd_create("test-malloc", MFD_CLOEXEC | MFD_ALLOW_SEALING);

	REQUIRE(fd >= 0 && ftruncate(fd, MEM_BYTES) == 0 &&
			fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK) == 0,
		"memfd");
	*v = mmap(NULL, MEM_BYTES, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	REQUIRE(*v != MAP_FAILED, "mmap");
	for (int i = 0; i < NELEM; i++)
		(*v)[i] = (r + 1) * (i + 1);
	return fd;
}

/* Ranks 0..n-1 of s->job say hello; the replies are read when wait. */
static void join(struct st *s, int n, int world, int wait)
{
	for (int r = 0; r < n; r++) {
		rc_open(&s->c[r]);
		send_hello(&s->c[r], s->job, r, world, COMMPB__ROLE__ROLE_RANK);
	}
	for (int r = 0; wait && r < n; r++) {
		struct ans h;

		answer(&s->c[r], B(HELLO_REPLY), &h);
		REQUIRE(h.replied && h.status == COMM_OK, "%s: setup: hello of rank %d: %s",
			s->kind, r, h.what);
		ans_free(&h);
	}
}

static void reg(struct st *s, int r)
{
	s->mfd[r] = memfd(&s->v[r], r);
	REQUIRE(raw_register_fd(s->c[r].fd, &s->c[r].r, s->mfd[r], MEM_BYTES, &s->mem[r]) ==
			COMM_OK,
		"%s: setup: register", s->kind);
}

static void send_op(struct st *s, int r, Commpb__OpType type)
{
	Commpb__Envelope env = COMMPB__ENVELOPE__INIT;
	Commpb__Op op = COMMPB__OP__INIT;
	Commpb__BufRef in = COMMPB__BUF_REF__INIT, out = COMMPB__BUF_REF__INIT;

	op.seq = 1;
	op.type = type;
	if (type == T(ALLREDUCE)) {
		in.mem_id = out.mem_id = s->mem[r];
		out.offset = RECV_OFF;
		op.send = &in;
		op.recv = &out;
		op.count = NELEM;
		op.dtype = COMM_INT32;
		op.redop = COMM_SUM;
	}
	env.id = 100 + (uint64_t)r;
	env.body_case = B(OP);
	env.op = &op;
	send_quiet(&s->c[r], &env, NULL, 0);
}

/* The memfds commd maps, once it is done changing them (up to a second). */
static int maps_settled(int want)
{
	int n = -1;

	for (int i = 0; i < 100 && (n = th_count_memfd_maps(d.pid)) != want; i++)
		usleep(10 * 1000);
	return n;
}

/* --- the requests, each a setup (no failures), an act (armed), a check ---- */

static void hello_new_setup(struct st *s)
{
	rc_open(&s->c[0]);
	settle(s, 1, NULL, 0, 0);
}

static void hello_new_act(struct st *s)
{
	send_hello(&s->c[0], s->job, 0, 1, COMMPB__ROLE__ROLE_RANK);
	answer(&s->c[0], B(HELLO_REPLY), &s->a[0]);
}

static void hello_new_check(struct st *s)
{
	Commpb__Envelope *e = status(&s->adm, s->job);
	Commpb__JobInfo *ji = job_in(e, s->job);

	if (ans_ok(&s->a[0]))
		CHECK(ji && ji->joined == 1 && !strcmp(ji->state, "ready"),
		      "hello k=%d: OK, but job %s is %s", s->k, s->job, ji ? ji->state : "gone");
	commpb__envelope__free_unpacked(e, NULL);
}

static void hello_join_setup(struct st *s)
{
	join(s, 1, 2, 0);
	rc_open(&s->c[1]);
	settle(s, 2, s->job, 1, 0);
}

static void hello_join_act(struct st *s)
{
	send_hello(&s->c[1], s->job, 1, 2, COMMPB__ROLE__ROLE_RANK);
	answer(&s->c[1], B(HELLO_REPLY), &s->a[1]);
}

/* Once the job formed, rank 0 waiting in its hello must hear of it too. */
static void hello_join_check(struct st *s)
{
	Commpb__Envelope *e = status(&s->adm, s->job);
	Commpb__JobInfo *ji = job_in(e, s->job);
	int formed = ji && strcmp(ji->state, "forming");

	commpb__envelope__free_unpacked(e, NULL);
	if (ans_ok(&s->a[1]) || formed)
		answer(&s->c[0], B(HELLO_REPLY), &s->a[0]);
	else
		snprintf(s->a[0].what, sizeof s->a[0].what, "waits");
}

static void register_setup(struct st *s)
{
	join(s, 1, 1, 1);
	s->mfd[0] = memfd(&s->v[0], 0);
	settle(s, 1, NULL, 0, 0);
}

static void register_act(struct st *s)
{
	Commpb__Envelope env = COMMPB__ENVELOPE__INIT;
	Commpb__RegisterMem rm = COMMPB__REGISTER_MEM__INIT;

	rm.kind = COMMPB__MEM_KIND__MEM_MEMFD;
	rm.size = MEM_BYTES;
	env.id = 3;
	env.body_case = B(REGISTER_MEM);
	env.register_mem = &rm;
	send_quiet(&s->c[0], &env, &s->mfd[0], 1);
	answer(&s->c[0], B(REGISTER_MEM_REPLY), &s->a[0]);
}

static void register_check(struct st *s)
{
	int ok = ans_ok(&s->a[0]), maps = maps_settled(ok);

	CHECK(maps == ok, "register k=%d: %s, and commd maps %d memfds", s->k, s->a[0].what, maps);
	CHECK(!ok || s->a[0].env->register_mem_reply->mem_id,
	      "register k=%d: OK without a mem id", s->k);
}

static void free_setup(struct st *s)
{
	join(s, 1, 1, 1);
	reg(s, 0);
	settle(s, 1, NULL, 0, 0);
}

static void free_act(struct st *s)
{
	Commpb__Envelope env = COMMPB__ENVELOPE__INIT;
	Commpb__FreeMem fm = COMMPB__FREE_MEM__INIT;

	fm.mem_id = s->mem[0];
	env.id = 4;
	env.body_case = B(FREE_MEM);
	env.free_mem = &fm;
	send_quiet(&s->c[0], &env, NULL, 0);
	answer(&s->c[0], B(FREE_MEM_REPLY), &s->a[0]);
}

static void free_check(struct st *s)
{
	/* freed, or the connection (and its memory) gone; a refused free keeps it */
	int want = s->a[0].replied && s->a[0].status != COMM_OK ? 1 : 0, maps = maps_settled(want);

	CHECK(maps == want, "free k=%d: %s, and commd maps %d memfds", s->k, s->a[0].what, maps);
}

static void op_setup(struct st *s)
{
	join(s, 2, 2, 1);
	reg(s, 0);
	reg(s, 1);
	settle(s, 2, s->job, 2, 0);
}

static void op_act(struct st *s)
{
	send_op(s, 0, T(ALLREDUCE));
	send_op(s, 1, T(ALLREDUCE));
	answer(&s->c[0], B(OP_DONE), &s->a[0]);
	answer(&s->c[1], B(OP_DONE), &s->a[1]);
}

static void op_check(struct st *s)
{
	for (int r = 0; r < 2; r++) {
		int32_t *out = s->v[r] + RECV_OFF / sizeof(int32_t);

		if (!ans_ok(&s->a[r]))
			continue;
		for (int i = 0; i < NELEM; i++)
			CHECK(out[i] == 3 * (i + 1),
			      "op k=%d: OK, but rank %d has [%d] = %d, want %d", s->k, r, i, out[i],
			      3 * (i + 1));
	}
}

static void status_setup(struct st *s)
{
	join(s, 2, 2, 1);
	send_op(s, 0, T(BARRIER)); /* in flight: rank 1 never posts it */
	settle(s, 2, s->job, 2, 1);
}

static void status_act(struct st *s)
{
	send_status(&s->adm, "");
	answer(&s->adm, B(STATUS_REPLY), &s->a[0]);
}

static void status_check(struct st *s)
{
	const char *why = NULL;
	Commpb__JobInfo *ji;

	if (!s->a[0].replied)
		return;
	ji = job_in(s->a[0].env, s->job);
	if (!ji)
		why = "missing";
	else if (ji->ops_pending != 1)
		why = "no op pending";
	else if (ji->n_inflight + ji->inflight_omitted < 1)
		why = "its op in flight neither listed nor counted as left out";
	CHECK(!why, "status k=%d: OK, but job %s: %s", s->k, s->job, why);
}

static void topo_setup(struct st *s)
{
	settle(s, 0, NULL, 0, 0);
}

static void send_topo(struct rc *a)
{
	Commpb__Envelope env = COMMPB__ENVELOPE__INIT;
	Commpb__TopoRequest tr = COMMPB__TOPO_REQUEST__INIT;

	env.id = 8;
	env.body_case = B(TOPO_REQUEST);
	env.topo_request = &tr;
	send_quiet(a, &env, NULL, 0);
}

static void topo_act(struct st *s)
{
	send_topo(&s->adm);
	answer(&s->adm, B(TOPO_REPLY), &s->a[0]);
}

static void topo_check(struct st *s)
{
	const Commpb__TopoReply *tr;

	if (!s->a[0].replied)
		return;
	tr = s->a[0].env->topo_reply;
	CHECK(tr->n_devices == topo_devs0 && tr->n_numa == topo_numa0 &&
		      tr->n_matrix == topo_devs0 * topo_devs0,
	      "topo k=%d: OK with %zu devices, %zu NUMA nodes (want %zu, %zu)", s->k,
	      tr->n_devices, tr->n_numa, topo_devs0, topo_numa0);
}

static void leave_setup(struct st *s)
{
	join(s, 2, 2, 1);
	settle(s, 2, s->job, 2, 0);
}

/* Leave has no reply: a second hello behind it shows whether the rank left. */
static void leave_act(struct st *s)
{
	Commpb__Envelope env = COMMPB__ENVELOPE__INIT;
	Commpb__Leave lv = COMMPB__LEAVE__INIT;
	struct ans *a = &s->a[0];
	Commpb__Envelope *e;

	env.id = 5;
	env.body_case = B(LEAVE);
	env.leave = &lv;
	send_quiet(&s->c[0], &env, NULL, 0);
	send_hello(&s->c[0], s->job, 0, 2, COMMPB__ROLE__ROLE_RANK);
	e = raw_recv(s->c[0].fd, &s->c[0].r);
	if (e && e->body_case == B(ERROR) && strstr(e->error->detail, "hello twice")) {
		/* the probe's own answer, the connection kept: left if it names no job */
		memset(a, 0, sizeof *a);
		a->bad = strstr(e->error->detail, "rank 0 of job") != NULL;
		snprintf(a->what, sizeof a->what, "%s", a->bad ? "leave ignored" : "OK");
		commpb__envelope__free_unpacked(e, NULL);
		return;
	}
	classify(&s->c[0], e, B(HELLO_REPLY), a);
}

/* Rank 1's next collective needs rank 0, which left or was lost. */
static void leave_check(struct st *s)
{
	struct ans b;

	send_op(s, 1, T(BARRIER));
	answer(&s->c[1], B(OP_DONE), &b);
	CHECK(b.replied && b.status != COMM_OK,
	      "leave k=%d: rank 1's barrier without rank 0: %s", s->k, b.what);
	ans_free(&b);
}

struct kind {
	const char *name;
	void (*setup)(struct st *s);
	void (*act)(struct st *s);
	void (*check)(struct st *s);
};

static const struct kind kinds[] = {
	{ "hello (a new job)", hello_new_setup, hello_new_act, hello_new_check },
	{ "hello (joining a 2-rank job)", hello_join_setup, hello_join_act, hello_join_check },
	{ "register_mem (a sealed memfd)", register_setup, register_act, register_check },
	{ "op (a 2-rank int32 all-reduce)", op_setup, op_act, op_check },
	{ "free_mem", free_setup, free_act, free_check },
	{ "status (admin)", status_setup, status_act, status_check },
	{ "topo (admin)", topo_setup, topo_act, topo_check },
	{ "leave (and a hello behind it)", leave_setup, leave_act, leave_check },
};

/* --- the sweep --------------------------------------------------------------- */

struct tally {
	int n;
	char what[MAX_WHAT][200];
	int count[MAX_WHAT];
};

static void tally_add(struct tally *t, const char *what)
{
	int i;

	for (i = 0; i < t->n && strcmp(t->what[i], what); i++)
		;
	if (i == t->n) {
		if (t->n == MAX_WHAT)
			return;
		snprintf(t->what[t->n++], sizeof t->what[0], "%s", what);
	}
	t->count[i]++;
}

/* Close everything of step s; commd must be back to no connection and fds0 fds. */
static void teardown(struct st *s, const char *label)
{
	struct rc a = { .fd = -1 };

	for (int r = 0; r < 2; r++) {
		ans_free(&s->a[r]);
		rc_close(&s->c[r]);
		if (s->v[r])
			munmap(s->v[r], MEM_BYTES);
		if (s->mfd[r] >= 0)
			close(s->mfd[r]);
	}
	rc_close(&s->adm);
	admin_open(&a);
	for (int i = 0; i < 1000; i++) {
		Commpb__Envelope *e = status(&a, "");
		int alone = e->status_reply->connections == 1 && e->status_reply->n_jobs == 0;

		commpb__envelope__free_unpacked(e, NULL);
		if (alone)
			break;
		CHECK(i < 999, "after %s: commd still has connections or jobs", label);
		usleep(2000);
	}
	rc_close(&a);
	th_check_baseline(&d, fds0, label);
}

static void sweep(const struct kind *kd)
{
	struct tally t = { 0 };
	int k, bad = 0;

	for (k = 1; k <= MAX_K; k++) {
		struct st s = { .kind = kd->name, .k = k, .mfd = { -1, -1 } };
		char label[160], what[200];
		int failed0;

		s.c[0].fd = s.c[1].fd = s.adm.fd = -1;
		snprintf(s.job, sizeof s.job, "malloc-%d-%d", (int)(kd - kinds), k);
		kd->setup(&s);
		failed0 = ctl->failed;
		__atomic_store_n(&ctl->countdown, k, __ATOMIC_RELEASE);
		kd->act(&s);
		__atomic_store_n(&ctl->countdown, 0, __ATOMIC_RELEASE);
		REQUIRE(th_daemon_alive(&d), "%s k=%d: commd died", kd->name, k);
		kd->check(&s);
		snprintf(label, sizeof label, "%s, allocation %d failed", kd->name, k);
		if (ctl->failed == failed0) {
			/* it needs fewer than k: this one ran as it does with memory to spare */
			for (int r = 0; r < 2; r++)
				CHECK(!s.a[r].what[0] || !strcmp(s.a[r].what, "OK"),
				      "%s with no allocation failed: rank %d: %s %s", kd->name, r,
				      s.a[r].what, s.a[r].detail);
			teardown(&s, label);
			break;
		}
		for (int r = 0; r < 2; r++) {
			bad += s.a[r].bad;
			CHECK(!s.a[r].bad, "%s: allocation %d failed: rank %d: %s", kd->name, k, r,
			      s.a[r].what);
		}
		if (s.a[0].what[0] && s.a[1].what[0] && strcmp(s.a[0].what, s.a[1].what))
			snprintf(what, sizeof what, "%s / %s", s.a[0].what, s.a[1].what);
		else
			snprintf(what, sizeof what, "%s",
				 s.a[0].what[0] ? s.a[0].what : s.a[1].what);
		tally_add(&t, what);
		teardown(&s, label);
	}
	CHECK(k <= MAX_K, "%s: still allocating after %d", kd->name, MAX_K);
	printf("%s %s: %d allocation%s, each failed once:", bad ? "FAIL" : "ok", kd->name, k - 1,
	       k == 2 ? "" : "s");
	for (int i = 0; i < t.n; i++)
		printf("%s %d %s", i ? "," : "", t.count[i], t.what[i]);
	printf("\n");
	fflush(stdout);
}

/* --- set up and after ------------------------------------------------------- */

static int rank_ok(int rank, int n, void *arg)
{
	int32_t v[NELEM];
	comm_t *c;

	if (th_join(&c, rank, n) < 0)
		return 1;
	for (int i = 0; i < NELEM; i++)
		v[i] = (rank + 1) * (i + 1);
	if (comm_allreduce(c, v, v, NELEM, COMM_INT32, COMM_SUM, NULL) != COMM_OK)
		return th_bail(c);
	for (int i = 0; i < NELEM; i++) {
		if (v[i] != 3 * (i + 1)) {
			fprintf(stderr, "rank %d: all-reduce [%d] = %d, want %d\n", rank, i, v[i],
				3 * (i + 1));
			return th_bail(c);
		}
	}
	return th_leave(c, rank);
}

/* The control block, in a file commd maps at start (and unlinked once it has). */
static void make_ctl(char *path, size_t len)
{
	const char *tmp = getenv("TMPDIR");
	int fd;

	snprintf(path, len, "%s/commd-failmalloc-XXXXXX", tmp && *tmp ? tmp : "/tmp");
	fd = mkstemp(path);
	REQUIRE(fd >= 0 && ftruncate(fd, sizeof *ctl) == 0, "control file %s", path);
	ctl = mmap(NULL, sizeof *ctl, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	REQUIRE(ctl != MAP_FAILED, "mmap %s", path);
	close(fd);
}

int main(void)
{
	char path[256];
	struct rc a = { .fd = -1 };
	Commpb__Envelope *e;
	struct ans topo;
	int rc;

#ifdef UNDER_ASAN
	printf("skip: failmalloc.so cannot be preloaded into an ASan build of commd\n");
	return 77;
#endif
	if (getenv("COMMD_WRAPPER") && *getenv("COMMD_WRAPPER")) {
		printf("skip: under $COMMD_WRAPPER the daemon's allocations are the wrapper's\n");
		return 77;
	}
	REQUIRE(access(FAILMALLOC_SO, R_OK) == 0, "no shim at %s (make check builds it)",
		FAILMALLOC_SO);
	make_ctl(path, sizeof path);
	setenv("COMMD_FAILMALLOC", path, 1);
	setenv("LD_PRELOAD", FAILMALLOC_SO, 1);
	rc = th_daemon_start(&d, NULL);
	unsetenv("LD_PRELOAD");
	unsetenv("COMMD_FAILMALLOC");
	unlink(path);
	REQUIRE(rc == 0, "daemon start");
	ctl->pid = d.pid;

	CHECK(th_run_ranks(&d, "warm-up", 2, rank_ok, NULL) == 0, "warm-up job");
	admin_open(&a);
	send_topo(&a);
	answer(&a, B(TOPO_REPLY), &topo);
	REQUIRE(topo.replied, "topo: %s", topo.what);
	topo_devs0 = topo.env->topo_reply->n_devices;
	topo_numa0 = topo.env->topo_reply->n_numa;
	ans_free(&topo);
	e = status(&a, "");
	CHECK(e->status_reply->pid == d.pid, "status from pid %d, want %d", e->status_reply->pid,
	      (int)d.pid);
	commpb__envelope__free_unpacked(e, NULL);
	rc_close(&a);
	usleep(200 * 1000);
	fds0 = th_count_fds(d.pid);
	REQUIRE(ctl->failed == 0, "an allocation failed before the test armed one");

	for (size_t i = 0; i < sizeof kinds / sizeof kinds[0]; i++)
		sweep(&kinds[i]);

	th_check_baseline(&d, fds0, "every sweep");
	CHECK(th_run_ranks(&d, "after", 2, rank_ok, NULL) == 0, "a job after the sweeps");
	printf("ok: a 2-rank job runs after the sweeps (%d allocations failed in all)\n",
	       ctl->failed);
	CHECK(th_daemon_stop(&d) == 0, "daemon stop");
	return CHECK_EXIT();
}
