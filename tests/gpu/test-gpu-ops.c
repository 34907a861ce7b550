/*
 * test-gpu-ops.c: every op x dtype x reduction on cudaMalloc buffers through
 * the real commd and its GPU worker, with 1, 2 and 4 ranks (rank r on device
 * r % devices), in place and out of place, at offsets on and off 16 bytes
 * (the worker's direct and staged paths), and a float32 all-reduce of
 * 64 MiB and 3 elements, each compared element by element with the same op
 * on host buffers in the same job. Then the same over three daemons on this
 * machine (--peer-listen), 4 ranks split 2+2, 1+3 and 2+1+1, where each
 * daemon's GPU worker is an NCCL rank of its own (NCCL_HOSTID set per
 * daemon, so that NCCL treats them as separate hosts on one GPU): every
 * collective and a ring of sends (staged through host memory across
 * daemons), and sends between device memory on one daemon and host memory
 * on another, both ways. With the argument "nodes" only that part runs.
 * Exits 77 without a GPU.
 */
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "check.h"
#include "gpu-count.h"
#include "comm.h"
#include "harness.h"
#include "plan.h"
#include "ref.h"

/*
 * Inputs: integers half over their whole range (SUM and PROD wrap), floats
 * small multiples of 0.25 (float16, bfloat16: 0.5) in -2..2, whose sums,
 * products, extremes and averages over 1, 2 or 4 ranks are exact in any
 * order and precision. The device result must be the host path's:
 * integers exactly; float32 and float64 within 1e-5 relative, float16 and
 * bfloat16 within 1e-2 (absolute below 1).
 */
#define TOL_FLOAT 1e-5
#define TOL_HALF 1e-2
#define MEDIUM 65537
#define LARGE ((64u << 20) / 4 + 3) /* float32: past one pass of the direct kernel's grid, and a tail */

enum kind { AR, RS, AG, BC, RD, A2A, P2P, BARRIER };
enum place { OOP, INPLACE };

struct tcase {
	enum kind kind;
	comm_dtype_t dt;
	comm_redop_t op;
	size_t count;    /* per-rank block */
	int root;
	enum place place;
	size_t offset;   /* of the device buffers in their allocations, in bytes */
};

/* One side (host or device) of a case: allocations and the op's pointers. */
struct side {
	char *sbase, *rbase; /* rbase NULL in place */
	char *send, *recv;
};

/* A case on one rank: sizes, roles and both sides. */
struct run {
	const struct tcase *t;
	uint32_t seed;
	int r, n;
	size_t es, sn, rn;   /* element size, send and recv elements */
	size_t slen, rlen;   /* allocation bytes, guards included */
	int s_in, r_out;     /* send holds input; recv receives output */
	struct side h, d;
};

#define NNODES 3

static int ndev;          /* devices, found before the ranks are forked */
static char *arena[2];    /* a rank's device allocations, reused across cases */
static size_t arena_len;

static int reduces(enum kind k)
{
	return k == AR || k == RS || k == RD;
}

static const char *describe(const struct tcase *t, int n, char *buf, size_t len)
{
	static const char *const names[] = { "allreduce", "reduce-scatter", "all-gather",
					     "broadcast", "reduce",         "all-to-all",
					     "send/recv", "barrier" };

	char root[24] = "";

	if (t->kind == BC || t->kind == RD)
		snprintf(root, sizeof root, " root=%d", t->root % n);
	snprintf(buf, len, "device %s %s%s%s n=%d count=%zu%s%s offset=%zu", names[t->kind],
		 ref_dtype_name(t->dt), reduces(t->kind) ? " " : "",
		 reduces(t->kind) ? ref_op_name(t->op) : "", n, t->count, root,
		 t->place == INPLACE ? " in-place" : "", t->offset);
	return buf;
}

/*
 * Element idx of rank r's input, as raw bits: integers half over their
 * whole range, floats (all four) small multiples of 0.25 or 0.5.
 */
static uint64_t gen(const struct tcase *t, uint32_t seed, int r, size_t idx)
{
	uint64_t h = ref_hash(seed, r, idx);
	int fp = t->dt == COMM_FLOAT16 || t->dt == COMM_BFLOAT16 || t->dt == COMM_FLOAT32 ||
		 t->dt == COMM_FLOAT64;

	return !fp && (h & 1) ? ref_mix(h) : ref_small(t->dt, h >> 1);
}

static double tolerance(comm_dtype_t dt)
{
	if (dt == COMM_FLOAT16 || dt == COMM_BFLOAT16)
		return TOL_HALF;
	return dt == COMM_FLOAT32 || dt == COMM_FLOAT64 ? TOL_FLOAT : 0;
}

static int cuda_ok(cudaError_t e, int r, const char *what)
{
	if (e == cudaSuccess)
		return 1;
	fprintf(stderr, "rank %d: %s: %s\n", r, what, cudaGetErrorString(e));
	return 0;
}

/* The rank's device, and device allocations of at least len bytes each. */
static int arena_get(int r, size_t len)
{
	static int dev = -1;

	if (dev < 0) {
		if (!cuda_ok(cudaSetDevice(r % ndev), r, "cudaSetDevice"))
			return -1;
		dev = r % ndev;
	}
	if (len <= arena_len)
		return 0;
	for (int i = 0; i < 2; i++) {
		if (arena[i])
			cudaFree(arena[i]);
		arena[i] = NULL;
		if (!cuda_ok(cudaMalloc((void **)&arena[i], len), r, "cudaMalloc"))
			return -1;
	}
	arena_len = len;
	return 0;
}

/* Point s's send and recv into its allocations as the case's layout says. */
static void layout(const struct run *x, struct side *s)
{
	size_t block = x->t->count * x->es;

	s->send = s->sbase;
	s->recv = s->rbase ? s->rbase : s->sbase;
	if (!s->rbase && x->t->kind == RS)
		s->recv = s->sbase + (size_t)x->r * block;
	if (!s->rbase && x->t->kind == AG)
		s->send = s->sbase + (size_t)x->r * block;
}

static void sizes(struct run *x, const struct tcase *t, uint32_t seed, int r, int n)
{
	size_t all = (size_t)n * t->count, sb, rb;
	int root = t->root % n;

	memset(x, 0, sizeof *x);
	x->t = t;
	x->seed = seed;
	x->r = r;
	x->n = n;
	x->es = comm_dtype_size(t->dt);
	x->sn = t->kind == RS || t->kind == A2A ? all : t->kind == BARRIER ? 0 : t->count;
	x->rn = t->kind == AG || t->kind == A2A ? all : t->kind == BARRIER ? 0 : t->count;
	x->s_in = t->kind != BC || r == root;
	x->r_out = t->kind != RD || r == root;
	sb = x->sn * x->es;
	rb = x->rn * x->es;
	x->slen = (t->place == INPLACE && rb > sb ? rb : sb) + REF_GUARD;
	x->rlen = t->place == INPLACE ? 0 : rb + REF_GUARD;
}

/* Both sides allocated, poisoned and given the inputs; -1 on failure. */
static int setup(comm_t *c, struct run *x)
{
	size_t sb = x->sn * x->es;
	char *in = malloc(sb + 1);
	int ok;

	if (!in || arena_get(x->r, x->t->offset + (x->slen > x->rlen ? x->slen : x->rlen)) < 0) {
		free(in);
		return -1;
	}
	x->h.sbase = comm_mem_alloc(c, x->slen);
	x->h.rbase = x->rlen ? comm_mem_alloc(c, x->rlen) : NULL;
	if (!x->h.sbase || (x->rlen && !x->h.rbase)) {
		fprintf(stderr, "rank %d: comm_mem_alloc: %s\n", x->r, comm_last_error(c));
		free(in);
		return -1;
	}
	x->d.sbase = arena[0] + x->t->offset;
	x->d.rbase = x->rlen ? arena[1] + x->t->offset : NULL;
	layout(x, &x->h);
	layout(x, &x->d);
	memset(x->h.sbase, REF_POISON, x->slen);
	if (x->rlen)
		memset(x->h.rbase, REF_POISON, x->rlen);
	for (size_t i = 0; i < x->sn; i++)
		ref_store(x->t->dt, gen(x->t, x->seed, x->r, i), in + i * x->es);
	if (x->s_in)
		memcpy(x->h.send, in, sb);
	ok = cuda_ok(cudaMemset(x->d.sbase, REF_POISON, x->slen), x->r, "cudaMemset") &&
	     (!x->rlen ||
	      cuda_ok(cudaMemset(x->d.rbase, REF_POISON, x->rlen), x->r, "cudaMemset")) &&
	     (!x->s_in || !sb ||
	      cuda_ok(cudaMemcpy(x->d.send, in, sb, cudaMemcpyHostToDevice), x->r, "cudaMemcpy"));
	free(in);
	return ok ? 0 : -1;
}

static comm_result_t post(comm_t *c, const struct run *x, const struct side *s)
{
	const struct tcase *t = x->t;
	int root = t->root % x->n;
	comm_result_t rc, rc2;

	switch (t->kind) {
	case AR:
		return comm_allreduce(c, s->send, s->recv, t->count, t->dt, t->op, NULL);
	case RS:
		return comm_reduce_scatter(c, s->send, s->recv, t->count, t->dt, t->op, NULL);
	case AG:
		return comm_allgather(c, s->send, s->recv, t->count, t->dt, NULL);
	case BC:
		return comm_broadcast(c, s->send, s->recv, t->count, t->dt, root, NULL);
	case RD:
		return comm_reduce(c, s->send, s->recv, t->count, t->dt, t->op, root, NULL);
	case A2A:
		return comm_alltoall(c, s->send, s->recv, t->count, t->dt, NULL);
	case P2P:
		rc = comm_group_start(c);
		if (rc == COMM_OK)
			rc = comm_send(c, s->send, t->count, t->dt, (x->r + 1) % x->n, NULL);
		if (rc == COMM_OK)
			rc = comm_recv(c, s->recv, t->count, t->dt, (x->r + x->n - 1) % x->n, NULL);
		rc2 = comm_group_end(c);
		return rc != COMM_OK ? rc : rc2;
	default:
		return comm_barrier(c, NULL);
	}
}

/* The device's bytes at p (len of them) in a new host buffer, NULL on failure. */
static char *fetch(const struct run *x, const char *p, size_t len)
{
	char *h = malloc(len + 1);

	if (h && cuda_ok(cudaMemcpy(h, p, len, cudaMemcpyDeviceToHost), x->r, "cudaMemcpy"))
		return h;
	free(h);
	return NULL;
}

/* Compare the device side with the host side; 0 when all is well. */
static int check(const struct run *x)
{
	const struct tcase *t = x->t;
	size_t sb = x->sn * x->es, rb = x->rn * x->es;
	size_t soff = (size_t)(x->h.send - x->h.sbase), roff;
	char *ds = fetch(x, x->d.sbase, x->slen), *dr = x->rlen ? fetch(x, x->d.rbase, x->rlen) : NULL;
	const char *dsend, *drecv, *hrecv = x->h.recv, *dend;
	char what[200], g[48], w[48];
	int bad = 0;

	describe(t, x->n, what, sizeof what);
	if (!ds || (x->rlen && !dr)) {
		free(ds);
		free(dr);
		return 1;
	}
	roff = (size_t)(x->h.recv - (x->rlen ? x->h.rbase : x->h.sbase));
	dsend = ds + soff;
	drecv = (dr ? dr : ds) + roff;
	for (size_t j = 0; x->r_out && j < x->rn; j++) {
		uint64_t got = ref_load(t->dt, drecv + j * x->es);
		uint64_t want = ref_load(t->dt, hrecv + j * x->es);

		if (!ref_near(t->dt, got, want, tolerance(t->dt))) {
			ref_str(t->dt, got, g, sizeof g);
			ref_str(t->dt, want, w, sizeof w);
			fprintf(stderr, "rank %d: %s: element %zu of %zu is %s on the device, %s on "
					"the host\n",
				x->r, what, j, x->rn, g, w);
			bad = 1;
			break;
		}
	}
	/* inputs stay unless in place (a non-root's reduce input always) */
	if (x->s_in && (t->place == OOP || !x->r_out)) {
		for (size_t i = 0; i < x->sn; i++) {
			uint64_t in = gen(t, x->seed, x->r, i);

			if (memcmp(dsend + i * x->es, &in, x->es) != 0) {
				fprintf(stderr, "rank %d: %s: device input element %zu was changed\n",
					x->r, what, i);
				bad = 1;
				break;
			}
		}
	}
	if (t->place == OOP && !x->r_out && !ref_all_bytes(drecv, rb, REF_POISON)) {
		fprintf(stderr, "rank %d: %s: the non-root device recvbuf was written\n", x->r,
			what);
		bad = 1;
	}
	if (t->place == OOP && !x->s_in && !ref_all_bytes(dsend, sb, REF_POISON)) {
		fprintf(stderr, "rank %d: %s: the non-root device sendbuf was written\n", x->r,
			what);
		bad = 1;
	}
	dend = ds + x->slen - REF_GUARD;
	if (!ref_guard_ok(dend) || (dr && !ref_guard_ok(dr + x->rlen - REF_GUARD))) {
		fprintf(stderr, "rank %d: %s: written past the end of a device buffer\n", x->r,
			what);
		bad = 1;
	}
	free(ds);
	free(dr);
	return bad;
}

/* th_plan's run: the op on host buffers, then on device buffers, compared. */
static int run_case(comm_t *c, const void *tc, uint32_t seed, int r, int n)
{
	const struct tcase *t = tc;
	struct run x;
	comm_result_t rc;
	char what[200];
	int bad = -1;

	alarm(TH_WATCHDOG_S);
	sizes(&x, t, seed, r, n);
	if (setup(c, &x) < 0)
		goto out;
	rc = post(c, &x, &x.h);
	if (rc == COMM_OK)
		rc = post(c, &x, &x.d);
	if (rc != COMM_OK) {
		fprintf(stderr, "rank %d: %s: %s: %s\n", r, describe(t, n, what, sizeof what),
			comm_result_name(rc), comm_last_error(c));
		goto out;
	}
	bad = check(&x);
out:
	comm_mem_free(c, x.h.sbase);
	comm_mem_free(c, x.h.rbase);
	return bad;
}

static const char *describe_any(const void *t, int n, char *buf, size_t len)
{
	return describe(t, n, buf, len);
}

static void add(struct th_plan *p, enum kind k, comm_dtype_t dt, comm_redop_t op, size_t count,
		enum place pl)
{
	static unsigned k_all;
	struct tcase *t;

	p->case_size = sizeof(struct tcase);
	t = th_plan_add(p);
	k_all++;
	/* every third case one element off 16 bytes: the worker's aligned and unaligned paths */
	*t = (struct tcase){ k, dt, op, count, (int)(k_all % 5), pl,
			     (k_all % 4) * 256 + (k_all % 3 ? 0 : comm_dtype_size(dt)) };
}

static int has_inplace(enum kind k)
{
	return k != P2P && k != BARRIER;
}

/* Ranks over daemons: rank r on daemon of[r]; COMM_ROOT is daemon root's. */
struct split {
	const char *name;
	int of[4];
	int root;
};

/*
 * Every op x dtype x reduction at a small count, and a medium count of a
 * few; over the daemons ds as sp says when sp is given.
 */
static void test_world(const struct th_daemon *d, int n, const struct th_daemon *const *ds,
		       const struct split *sp)
{
	static const comm_dtype_t medium[] = { COMM_INT8, COMM_INT64, COMM_FLOAT16,
					       COMM_BFLOAT16, COMM_FLOAT32, COMM_FLOAT64 };
	struct th_plan p = { .world = n };
	char title[64];

	if (sp)
		snprintf(title, sizeof title, "device buffers, n=%d over daemons %s", n, sp->name);
	else
		snprintf(title, sizeof title, "device buffers, n=%d", n);
	p.title = title;
	if (sp) {
		p.ds = ds;
		p.daemon_of_rank = sp->of;
		p.root = ds[sp->root]->peer;
	}
	for (int k = AR; k <= P2P; k++) {
		for (int pl = OOP; pl <= (has_inplace((enum kind)k) ? INPLACE : OOP); pl++) {
			for (int i = 0; i < REF_NDTYPES; i++) {
				for (int o = 0; o < (reduces((enum kind)k) ? REF_NREDOPS : 1); o++)
					add(&p, (enum kind)k, ref_dtypes[i], ref_redops[o], 7,
					    (enum place)pl);
			}
			for (size_t i = 0; i < sizeof medium / sizeof medium[0]; i++)
				add(&p, (enum kind)k, medium[i], ref_redops[i % REF_NREDOPS], MEDIUM,
				    (enum place)pl);
		}
	}
	add(&p, AR, COMM_FLOAT32, COMM_SUM, LARGE, OOP);
	add(&p, AR, COMM_FLOAT32, COMM_SUM, LARGE, INPLACE);
	add(&p, BARRIER, COMM_UINT8, COMM_SUM, 0, OOP);
	snprintf(p.job, sizeof p.job, "gpu-ops-%d%s%s", n, sp ? "-" : "", sp ? sp->name : "");
	p.seed = 1000u * (uint32_t)n + 1;
	p.seed_step = 1;
	p.run = run_case;
	p.describe = describe_any;
	th_plan_run(d, &p);
}

#define MIXED_BYTES ((1u << 20) + 3)

/*
 * Rank 0 (node 0) sends MIXED_BYTES from device memory to rank 3's host
 * memory on another daemon, and rank 3 sends back from host memory into
 * rank 0's device memory; each byte checked.
 */
static int rank_p2p_mixed(int r, int n, void *arg)
{
	comm_t *c;
	unsigned char *host = NULL, *dev = NULL;
	comm_result_t rc = COMM_OK;
	size_t bad = MIXED_BYTES;
	int fail = 0;

	(void)arg;
	if (th_join(&c, r, n))
		return 1;
	if (r == 0 || r == 3) {
		host = malloc(MIXED_BYTES);
		if (!host || !cuda_ok(cudaSetDevice(r % ndev), r, "cudaSetDevice") ||
		    !cuda_ok(cudaMalloc((void **)&dev, MIXED_BYTES), r, "cudaMalloc"))
			return 1;
	}
	if (r == 0) {
		for (size_t i = 0; i < MIXED_BYTES; i++)
			host[i] = (unsigned char)(i * 13 + 1);
		if (!cuda_ok(cudaMemcpy(dev, host, MIXED_BYTES, cudaMemcpyHostToDevice), r,
			     "cudaMemcpy"))
			return 1;
		rc = comm_send(c, dev, MIXED_BYTES, COMM_UINT8, 3, NULL);
		if (rc == COMM_OK && cuda_ok(cudaMemset(dev, 0, MIXED_BYTES), r, "cudaMemset"))
			rc = comm_recv(c, dev, MIXED_BYTES, COMM_UINT8, 3, NULL);
		if (rc == COMM_OK &&
		    cuda_ok(cudaMemcpy(host, dev, MIXED_BYTES, cudaMemcpyDeviceToHost), r, "cudaMemcpy"))
			for (size_t i = 0; i < MIXED_BYTES && bad == MIXED_BYTES; i++)
				if (host[i] != (unsigned char)(i * 5 + 2))
					bad = i;
	} else if (r == 3) {
		memset(host, 0, MIXED_BYTES);
		rc = comm_recv(c, host, MIXED_BYTES, COMM_UINT8, 0, NULL);
		for (size_t i = 0; rc == COMM_OK && i < MIXED_BYTES && bad == MIXED_BYTES; i++)
			if (host[i] != (unsigned char)(i * 13 + 1))
				bad = i;
		for (size_t i = 0; i < MIXED_BYTES; i++)
			host[i] = (unsigned char)(i * 5 + 2);
		if (rc == COMM_OK)
			rc = comm_send(c, host, MIXED_BYTES, COMM_UINT8, 0, NULL);
	}
	if (rc != COMM_OK || bad != MIXED_BYTES) {
		printf("rank %d: device and host memory across daemons: %s (%s), byte %zu wrong\n", r,
		       comm_strerror(rc), comm_last_error(c), bad);
		fail = 1;
	}
	if (comm_barrier(c, NULL) != COMM_OK) {
		printf("rank %d: the barrier after it: %s\n", r, comm_last_error(c));
		fail = 1;
	}
	cudaFree(dev);
	free(host);
	return th_leave(c, r) | fail;
}

/*
 * Three daemons, each its own NCCL host; every op over three splits of
 * 4 ranks, and sends between device and host memory across daemons.
 */
static void test_nodes(void)
{
	static const struct split splits[] = {
		{ "2+2", { 0, 0, 1, 1 }, 0 },
		{ "1+3", { 0, 1, 1, 1 }, 1 },
		{ "2+1+1", { 0, 1, 2, 0 }, 2 },
	};
	static struct th_daemon node[NNODES];
	static const struct th_daemon *const ds[NNODES] = { &node[0], &node[1], &node[2] };
	int started = 0;

	/* NCCL between the daemons' workers goes over loopback sockets */
	setenv("NCCL_SOCKET_IFNAME", "lo", 0);
	setenv("NCCL_IB_DISABLE", "1", 0);
	for (; started < NNODES; started++) {
		char host[32];

		snprintf(host, sizeof host, "commd-test-node-%c", 'A' + started);
		setenv("NCCL_HOSTID", host, 1);
		if (th_daemon_start_peer(&node[started], NULL) < 0)
			break;
	}
	unsetenv("NCCL_HOSTID");
	CHECK(started == NNODES, "commd %c (with --peer-listen) did not start", 'A' + started);
	if (started == NNODES) {
		for (size_t i = 0; i < sizeof splits / sizeof splits[0]; i++)
			test_world(NULL, 4, ds, &splits[i]);
		CHECK(th_run_ranks_nodes(ds, splits[0].of, node[0].peer, "gpu-p2p-mixed", 4,
					 rank_p2p_mixed, NULL) == 0,
		      "sends between device and host memory across daemons failed");
	}
	for (int i = 0; i < started; i++) {
		CHECK(th_daemon_alive(&node[i]), "commd %c died during the tests", 'A' + i);
		if (check_failures)
			th_daemon_dump_log(&node[i]);
		CHECK(th_daemon_stop(&node[i]) == 0, "commd %c did not stop cleanly", 'A' + i);
	}
}

int main(int argc, char **argv)
{
	int nodes_only = argc > 1 && strcmp(argv[1], "nodes") == 0;
	struct th_daemon d;
	struct timespec t0;

	setvbuf(stdout, NULL, _IOLBF, 0);
	ndev = count_devices();
	if (ndev < 1)
		return 77;
	printf("%d device(s); rank r uses device r %% %d\n", ndev, ndev);
	setenv("COMM_TIMEOUT", "60000", 1);
	clock_gettime(CLOCK_MONOTONIC, &t0);
	if (!nodes_only) {
		REQUIRE(th_daemon_start(&d, NULL) == 0, "commd did not start");
		test_world(&d, 1, NULL, NULL);
		test_world(&d, 2, NULL, NULL);
		test_world(&d, 4, NULL, NULL);
		CHECK(th_daemon_alive(&d), "commd died during the tests");
		CHECK(th_daemon_stop(&d) == 0, "commd did not stop cleanly");
	}
	test_nodes();
	printf("%s: %.1f s in all\n", check_failures ? "FAIL" : "ok", th_secs_since(&t0));
	return CHECK_EXIT();
}
