/*
 * net.c: the data plane between daemons, over UCX tag messages (not RMA,
 * which UCX emulates slowly over TCP). One thread owns the UCX worker and
 * runs every cross-node task as a small state machine: it posts a step's
 * sends and receives, and when they have all completed, works on what came
 * and posts the next step (a ring works on each chunk as it comes). So a
 * task that waits for a late node holds up no other job.
 *
 * Collectives are hierarchical: the node's ranks are combined in place
 * here, the nodes run a ring pipelined in chunks (reduce-scatter,
 * all-gather; an all-reduce's both), a chain pipelined the same way
 * (broadcast, reduce) or a direct exchange (all-to-all), and the result is
 * written into the ranks' memory. Every collective starts with each node's
 * verdict (status and the op as its first rank has it) sent to every other
 * node, so that all of them fail an op together or run it together; a
 * small op's data rides with it. On device memory the verdicts are all
 * there is here (node 0's carries the job's NCCL id); the GPU workers then
 * run it with NCCL (gpu.c). A send/recv goes from the sender's daemon to
 * the receiver's: a header (status, size), then the data in chunks, each
 * received into a staging buffer and copied into the rank's as it comes
 * (device memory: into commd's staging buffer, which the GPU worker copies
 * from, gpu.c). Nothing is received straight into a rank's memory: see
 * ring_alloc.
 *
 * Tags (64 bits) are in the receiver's namespace: its slot for the job,
 * then for a collective the sending node, the collective's number and the
 * step (a ring's: its hop and chunk); for a send/recv the two ranks, the
 * message's index and its part (the header, or a chunk of the data).
 */
#include <config.h>

#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "commd.h"
#include "dtype.h"
#include "log.h"
#include "reduce.h"
#include "util.h"

#ifdef HAVE_UCX
#include <ucp/api/ucp.h>

#define SLOTS 65536
#define SLOT_QUARANTINE_MS 30000 /* a freed slot's late messages are drained this long */
#define CANCEL_WAIT_MS 2000      /* a stopped task of a live job: its requests get this long, then it is held */
#define CLOSE_WAIT_MS 1000       /* at stop, endpoints closing with a flush get this long */
/* a held task's sends are ended by force before the receiver's slot could be used again */
#define HOLD_MAX_MS (SLOT_QUARANTINE_MS - 5000)
#define HDR_MAGIC 0x636f6d6du
#define BUF_CACHE_MAX (1ull << 30) /* staging buffers kept for the next ops */
#define BUF_IDLE_MS 5000         /* and given back after this long with no op */
#define TCP_SEG_SIZE "256k"      /* UCX's tcp segments, unless the environment says (net_start) */
/*
 * Ops of up to this much data (a rank's, or a reduce-scatter's or
 * all-gather's in all; is_small): verdict and data in one message, one
 * round trip. The verdict buffers are nodes x HSLOT: kept under malloc's
 * mmap threshold, since mapping and unmapping them each op made later
 * large ops 4x slower.
 */
#define SMALL_BYTES 16384
#define HSLOT (sizeof(struct hdr) + SMALL_BYTES)
/*
 * A ring moves each node's piece in chunks, pipelined: a chunk that
 * arrived and was taken in goes on to the next node at once. Chunks of
 * at least RING_CHUNK_MIN, at most RING_CHUNKS a piece (the tag
 * has 6 bits for it), at most RING_WINDOW received at once (rbuf's slots).
 * Smaller chunks cost more than they overlapped over UCX's tcp transport:
 * 128 KiB ones made 1-16 MiB all-reduces 10-20% slower on a 2-core VM.
 */
#define RING_CHUNK_MIN (1u << 20)
#define RING_CHUNKS 64
#define RING_WINDOW 8
#define ANY_LENGTH ((size_t)-1)

#define TAG_SLOT(s) ((uint64_t)(s) << 48)
#define TAG_SLOT_MASK (0xffffull << 48)
#define TAG_COLL(slot, node, cseq, step)                                       \
	(TAG_SLOT(slot) | (uint64_t)(node) << 39 | ((uint64_t)(cseq) & 0xffffff) << 15 | \
	 ((uint64_t)(step) & 0x7fff))
/* a ring's hop h (from 0) and chunk c; steps 0 and 1 are the verdict and the others' data */
#define RING_STEP(h, c) (((uint64_t)(h) + 1) << 6 | (uint64_t)(c))
/*
 * A send/recv's index between its two ranks and its part: 0 its header,
 * 1 + c its data's chunk c. The index wraps at 65536: safe because UCX
 * matches one sender's messages of a tag in the order sent, and every
 * part sent is received (a receiver that cannot take a message fails the
 * job, fatal), so the k-th recv never meets the data of an older send.
 */
#define TAG_P2P(slot, src, dst, idx, part)                                     \
	(TAG_SLOT(slot) | 1ull << 47 | (uint64_t)(src) << 35 | (uint64_t)(dst) << 23 | \
	 ((uint64_t)(idx) & 0xffff) << 7 | (uint64_t)(part))
/*
 * A send/recv's data goes in chunks, sized as a ring's: the receiver copies
 * each into place as it comes, while the next ones are on the wire. One
 * message of 128 MiB went at half the rate of 2 MiB ones over UCX's tcp
 * transport (a 16-core host, loopback).
 */
#define P2P_CHUNKS 64
_Static_assert(P2P_CHUNKS + 1 < 128, "a send/recv's part has 7 bits of the tag");

/* A node's verdict on a collective, or a send's header. Same layout everywhere. */
struct hdr {
	uint32_t magic;
	int32_t status;
	uint32_t type, dtype, redop;
	int32_t root;
	uint64_t count;
	int32_t first_rank;
	int32_t device;          /* the ranks' buffers are device memory: NCCL moves the data */
	char detail[200];
	uint8_t nccl_id[128];    /* device, from node 0: the job's NCCL communicator's id */
};

struct nreq {
	void *h;
	int recv;
	size_t want;             /* recv: the bytes that must arrive, or ANY_LENGTH */
	size_t *got;             /* recv: where to put the bytes that did, or NULL */
	int node;                /* the node it goes to or comes from (a recv: -1, see post_recv_any) */
	int ring;                /* a ring chunk's: recv, its slot; send, hop * RING_CHUNKS + chunk; else -1 */
};

/*
 * An endpoint to another daemon's worker, made once and shared by its jobs.
 * Once the control plane lost its daemon (dead, lost) nothing new is sent
 * on it, but it is closed only once no send is on it (busy), and then with
 * a flush (closing): the link may come back, and UCX 1.13's tcp transport
 * crashed the daemon in its progress when the link of an endpoint closed by
 * force came back. One that UCX failed itself (failed) is closed by force at
 * once, as UCX asks.
 */
struct nep {
	TAILQ_ENTRY(nep) link;
	uint8_t *addr;
	size_t len;
	ucp_ep_h ep;
	int dead, failed, lost;
	int busy;                /* sends on it not ended yet (held tasks' too) */
	void *closing;           /* its flush close, until that ends */
	char why[128];
};

enum { S_START, S_VERDICT, S_RING, S_FINISH, S_P2P_DATA, S_P2P_RECV, S_P2P_END };

/* What a task is doing, for status (net_task_state). */
/* SHOW_CHUNKS: a ring's, a chain's or a send/recv's chunks, "N of M in from node" or "sending to node" */
enum { SHOW_START, SHOW_VERDICTS, SHOW_LOCAL, SHOW_CHUNKS, SHOW_EXCHANGE, SHOW_WRITE, SHOW_STOPPING };
#define NODES_MAX 256 /* a job's nodes (peer.c refuses more): awaited's bits */

/* A slot of rbuf for one chunk of a ring. */
enum { SLOT_FREE, SLOT_POSTED, SLOT_ARRIVED };
struct ring_slot {
	int h, c, state;
};

struct net_task {
	TAILQ_ENTRY(net_task) link;
	/*
	 * A stopped task whose requests did not all end is held (hold): its
	 * task is answered, but it stays on N.held (the net thread's), its
	 * staging buffers and its task's memory kept, until UCX ends them.
	 */
	TAILQ_ENTRY(net_task) hlink; /* on N.held, then N.released */
	uint64_t held_ms;         /* when it was held; 0: it is not */
	int held_sends;           /* sends among them: its task is held too */
	size_t held_bytes;        /* its staging buffers, for net_status */
	struct task *t;
	struct job *j;
	const struct dist *d;
	int nn, me;
	struct nep **ep;          /* [nn], NULL for me */
	struct nreq *reqs;
	int nreq, cap;
	int state;
	comm_result_t status;
	char detail[256];
	/* set by the loop thread: code and detail first, then cancel (release) */
	int cancel;
	int doomed;               /* cancelled as its job failed (atomic) */
	comm_result_t cancel_code;
	char cancel_detail[256];
	/* the net thread's view of the cancel */
	int stopping;
	uint64_t stop_ms;
	int fatal;                /* the nodes may now disagree: the job must fail */
	comm_result_t deferred;   /* a recv's error, once the data it refused is drained; a refused send's */
	char deferred_detail[256];
	struct hdr out, *in;      /* in: [nn] */
	uint8_t *hbuf;            /* [nn] slots of HSLOT: each node's verdict (and data) */
	size_t *hlen;             /* [nn]: the bytes of each that arrived */
	int small;                /* its data rides with the verdicts (is_small) */
	uint8_t *nb, *sbuf, *rbuf;
	size_t nb_cap, sbuf_cap, rbuf_cap; /* the staging buffers' sizes (buf_get) */
	int first;                /* the lowest rank here */
	int nlocal;
	const uint8_t **lin;      /* the local ranks' inputs, in rank order */
	/*
	 * A pipelined ring or chain (S_RING, ring_alloc): an all-reduce's, a
	 * reduce-scatter's, an all-gather's ring; a broadcast's or reduce's
	 * chain. A recv's chunks (S_P2P_RECV) use slots, chunk, left, from,
	 * show_in and show_all too (a slot a chunk, all in rbuf); a send, to.
	 */
	uint8_t *data;            /* what it works on: nb, or a broadcast's rank buffer */
	int from, to;             /* the nodes it receives from and sends to */
	struct ring_slot *slots;  /* [nslots], chunk bytes each in rbuf */
	int nslots;
	size_t chunk;
	int h0, hops;             /* the hops it receives: h0 .. hops - 1 */
	int send0, send_end;      /* its first sends' hop (-1: none); no send of hop send_end */
	int next_h, next_c;       /* the next chunk to receive */
	int left;                 /* chunks still to receive and take in */
	uint64_t *sent;           /* [send_end]: bit c once hop h's send of chunk c ended */
	int *pos;                 /* reduce-scatter, all-gather: each rank's block in nb (node-major) */
	/*
	 * For status on the loop thread (net_task_state), written here with
	 * atomics: what it does (release: the fields it names are set), the
	 * nodes whose message it awaits, and a ring's chunks taken in.
	 */
	int show;
	uint64_t awaited[NODES_MAX / 64];
	int show_in, show_all;
};

struct discard {
	TAILQ_ENTRY(discard) link;
	void *h;
	void *buf;
};

/* A staging buffer kept for reuse: fresh pages fault, and faults are dear on a VM. */
struct cbuf {
	TAILQ_ENTRY(cbuf) link;
	void *p;
	size_t size;
};

/* The UCX address of a daemon the control plane lost: its endpoint goes. */
struct dead_peer {
	TAILQ_ENTRY(dead_peer) link;
	size_t len;
	uint8_t addr[];
};

struct dead_slot {
	TAILQ_ENTRY(dead_slot) link;
	uint32_t slot;
	uint64_t until_ms;
};

static struct {
	int available;
	char why[160];
	ucp_context_h ctx;
	ucp_worker_h worker;
	void *addr;
	size_t addr_len;
	pthread_t thread;
	int running;
	int wake_fd, worker_fd, ep_fd;
	pthread_mutex_t lock;
	TAILQ_HEAD(, net_task) submitted, active, done;
	TAILQ_HEAD(nt_head, net_task) released; /* under lock: held tasks whose requests ended */
	TAILQ_HEAD(, dead_slot) dead;     /* under lock */
	TAILQ_HEAD(, dead_peer) lost;     /* under lock */
	uint8_t *slot_used;               /* under lock */
	uint32_t next_slot;
	int stop;
	uv_async_t async;
	/* net thread only */
	TAILQ_HEAD(, nep) eps;
	TAILQ_HEAD(, discard) discards;
	struct nt_head held;              /* changed under lock, for net_status */
	int neps;                         /* on eps (atomic: net_status reads it) */
	uint64_t last_drain_ms;
	int spin_us;                      /* polling after the last event, before sleeping */
	TAILQ_HEAD(cbuf_head, cbuf) cache; /* most recently returned first */
	size_t cached;
	uint64_t last_task_ms;
} N = {
	.lock = PTHREAD_MUTEX_INITIALIZER,
	.submitted = TAILQ_HEAD_INITIALIZER(N.submitted),
	.active = TAILQ_HEAD_INITIALIZER(N.active),
	.done = TAILQ_HEAD_INITIALIZER(N.done),
	.dead = TAILQ_HEAD_INITIALIZER(N.dead),
	.lost = TAILQ_HEAD_INITIALIZER(N.lost),
	.eps = TAILQ_HEAD_INITIALIZER(N.eps),
	.discards = TAILQ_HEAD_INITIALIZER(N.discards),
	.released = TAILQ_HEAD_INITIALIZER(N.released),
	.held = TAILQ_HEAD_INITIALIZER(N.held),
	.cache = TAILQ_HEAD_INITIALIZER(N.cache),
	.wake_fd = -1,
	.ep_fd = -1,
};

#ifdef __SANITIZE_ADDRESS__
/*
 * LeakSanitizer (--enable-asan): where a peer daemon stopped answering,
 * net_stop leaves UCX to the exit (it asserts on a worker destroyed under
 * a request or a close still under way), and UCX keeps its pointers where
 * LeakSanitizer does not look (its shared memory segments): what UCX
 * allocated is UCX's, not reported. Every other allocation still is.
 */
const char *__lsan_default_suppressions(void);
const char *__lsan_default_suppressions(void)
{
	return "leak:libucs.so\nleak:libuct.so\nleak:libucp.so\n";
}
#endif

static void wake(void)
{
	uint64_t one = 1;

	if (N.wake_fd < 0)
		return;
	if (write(N.wake_fd, &one, sizeof one) < 0 && errno != EAGAIN)
		log_warn("net: wake: %s", strerror(errno));
}

/* --- endpoints ------------------------------------------------------------------ */

static void on_ep_error(void *arg, ucp_ep_h ep, ucs_status_t status)
{
	struct nep *e = arg;

	(void)ep;
	e->dead = e->failed = 1;
	snprintf(e->why, sizeof e->why, "%s", ucs_status_string(status));
	log_info("net: endpoint to a peer failed: %s", e->why);
}

static struct nep *ep_get(const uint8_t *addr, size_t len, char *err, size_t errlen)
{
	ucp_ep_params_t p = { 0 };
	struct nep *e;
	ucs_status_t st;

	TAILQ_FOREACH(e, &N.eps, link)
		if (!e->dead && e->len == len && !memcmp(e->addr, addr, len))
			return e;
	if (!(e = calloc(1, sizeof *e)) || !(e->addr = malloc(len))) {
		free(e);
		snprintf(err, errlen, "out of memory");
		return NULL;
	}
	memcpy(e->addr, addr, len);
	e->len = len;
	p.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE |
		       UCP_EP_PARAM_FIELD_ERR_HANDLER;
	p.address = (const ucp_address_t *)e->addr;
	p.err_mode = UCP_ERR_HANDLING_MODE_PEER;
	p.err_handler.cb = on_ep_error;
	p.err_handler.arg = e;
	if ((st = ucp_ep_create(N.worker, &p, &e->ep)) != UCS_OK) {
		snprintf(err, errlen, "UCX endpoint: %s", ucs_status_string(st));
		free(e->addr);
		free(e);
		return NULL;
	}
	TAILQ_INSERT_TAIL(&N.eps, e, link);
	__atomic_add_fetch(&N.neps, 1, __ATOMIC_RELAXED);
	return e;
}

static int task_names(const struct net_task *nt, const struct nep *e)
{
	for (int k = 0; nt->ep && k < nt->nn; k++)
		if (nt->ep[k] == e)
			return 1;
	return 0;
}

/* Whether a task still names e (a held one's sends end on it). */
static int ep_named(const struct nep *e)
{
	const struct net_task *nt;

	TAILQ_FOREACH(nt, &N.active, link)
		if (task_names(nt, e))
			return 1;
	TAILQ_FOREACH(nt, &N.held, hlink)
		if (task_names(nt, e))
			return 1;
	return 0;
}

/*
 * Free the dead endpoints that are closed and that no task names any
 * more: without this, each daemon lost (or restarted) left one behind
 * for as long as commd ran, and ep_get walked them all.
 */
static void eps_prune(void)
{
	struct nep *e, *tmp;

	TAILQ_FOREACH_SAFE(e, &N.eps, link, tmp) {
		if (!e->dead || e->ep || e->closing || e->busy || ep_named(e))
			continue;
		TAILQ_REMOVE(&N.eps, e, link);
		__atomic_sub_fetch(&N.neps, 1, __ATOMIC_RELAXED);
		free(e->addr);
		free(e);
	}
}

/* Close an endpoint for good: every request on it completes with an error. */
static void ep_kill(struct nep *e, const char *why)
{
	ucp_request_param_t rp = { .op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS,
				   .flags = UCP_EP_CLOSE_FLAG_FORCE };
	void *r;

	e->dead = 1;
	if (!*e->why)
		snprintf(e->why, sizeof e->why, "%s", why);
	if (!e->ep || e->closing)
		return;
	if (!N.stop)
		log_warn("net: an endpoint to another daemon closed by force (%s): the ops under "
			 "way on it, of any job, fail; the next ones get a new one", why);
	r = ucp_ep_close_nbx(e->ep, &rp);
	if (UCS_PTR_IS_PTR(r)) {
		while (ucp_request_check_status(r) == UCS_INPROGRESS)
			ucp_worker_progress(N.worker);
		ucp_request_free(r);
	}
	e->ep = NULL;
}

/* Close an idle endpoint with a flush: ends when its peer answers, or UCX fails it. */
static void ep_close_gently(struct nep *e)
{
	ucp_request_param_t rp = { 0 };
	void *r = ucp_ep_close_nbx(e->ep, &rp);

	log_debug("net: closing an idle endpoint to a lost daemon (%s)",
		  UCS_PTR_IS_PTR(r) ? "under way" : "done");
	if (UCS_PTR_IS_PTR(r))
		e->closing = r;
	else
		e->ep = NULL;
}

/* The endpoint's flush close is over for us: its request freed (UCX ends it, or the worker). */
static void ep_close_release(struct nep *e)
{
	ucp_request_free(e->closing);
	e->closing = NULL;
	e->ep = NULL;
}

/* Whether e's flush close is under way still; released once it ended. */
static int ep_closing(struct nep *e)
{
	ucs_status_t st;

	if (!e->closing || (st = ucp_request_check_status(e->closing)) == UCS_INPROGRESS)
		return e->closing != NULL;
	log_debug("net: an endpoint to a lost daemon closed: %s", ucs_status_string(st));
	ep_close_release(e);
	return 0;
}

/*
 * Endpoints whose daemon the control plane lost stop taking sends, and are
 * closed gently once idle; one that UCX failed is closed at once (outside
 * UCX's callback, as UCX asks): its requests complete with the error. Each
 * stays listed, dead, so that tasks see why.
 */
static void close_failed_eps(void)
{
	struct dead_peer *dp;
	struct nep *e;

	pthread_mutex_lock(&N.lock);
	while ((dp = TAILQ_FIRST(&N.lost))) {
		TAILQ_REMOVE(&N.lost, dp, link);
		TAILQ_FOREACH(e, &N.eps, link)
			if (!e->dead && e->len == dp->len && !memcmp(e->addr, dp->addr, dp->len)) {
				e->dead = e->lost = 1;
				snprintf(e->why, sizeof e->why, "its daemon was lost");
			}
		free(dp);
	}
	pthread_mutex_unlock(&N.lock);

	TAILQ_FOREACH(e, &N.eps, link) {
		if (!e->ep || e->closing)
			continue;
		if (e->failed)
			ep_kill(e, e->why);
		else if (e->lost && !e->busy)
			ep_close_gently(e);
	}
}

/* --- staging buffers (net thread only) --------------------------------------------- */

/* The smallest cached buffer of at least size bytes, else a new one; *cap: its size. */
static void *buf_get(size_t size, size_t *cap)
{
	struct cbuf *c, *best = NULL;
	void *p;

	TAILQ_FOREACH(c, &N.cache, link)
		if (c->size >= size && (!best || c->size < best->size))
			best = c;
	if (best) {
		TAILQ_REMOVE(&N.cache, best, link);
		N.cached -= best->size;
		p = best->p;
		*cap = best->size;
		free(best);
		return p;
	}
	*cap = size;
	return malloc(size);
}

static void buf_put(void *p, size_t cap)
{
	struct cbuf *c;

	if (!p)
		return;
	if (cap > BUF_CACHE_MAX || !(c = malloc(sizeof *c))) {
		free(p);
		return;
	}
	c->p = p;
	c->size = cap;
	TAILQ_INSERT_HEAD(&N.cache, c, link);
	N.cached += cap;
	while (N.cached > BUF_CACHE_MAX && (c = TAILQ_LAST(&N.cache, cbuf_head))) {
		TAILQ_REMOVE(&N.cache, c, link);
		N.cached -= c->size;
		free(c->p);
		free(c);
	}
}

static void buf_trim(void)
{
	struct cbuf *c;

	while ((c = TAILQ_FIRST(&N.cache))) {
		TAILQ_REMOVE(&N.cache, c, link);
		free(c->p);
		free(c);
	}
	N.cached = 0;
}

/* --- requests ---------------------------------------------------------------------- */

static int add_req(struct net_task *nt, void *h, int recv, size_t want, size_t *got, int node)
{
	if (nt->nreq == nt->cap) {
		int cap = nt->cap ? nt->cap * 2 : 8;
		struct nreq *r = realloc(nt->reqs, (size_t)cap * sizeof *r);

		if (!r)
			return -1;
		nt->reqs = r;
		nt->cap = cap;
	}
	nt->reqs[nt->nreq++] = (struct nreq){ h, recv, want, got, node, -1 };
	if (!recv)
		nt->ep[node]->busy++;
	return 0;
}

static void fail(struct net_task *nt, comm_result_t code, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
static void fail(struct net_task *nt, comm_result_t code, const char *fmt, ...)
{
	va_list ap;

	if (nt->status != COMM_OK)
		return;
	nt->status = code;
	va_start(ap, fmt);
	vsnprintf(nt->detail, sizeof nt->detail, fmt, ap);
	va_end(ap);
}

static const char *node_name(const struct net_task *nt, int k)
{
	return nt->d->nodes[k].name;
}

static void post_send(struct net_task *nt, int k, uint64_t tag, const void *buf, size_t len)
{
	ucp_request_param_t rp = { 0 };
	struct nep *e = nt->ep[k];
	void *r;

	if (nt->status != COMM_OK)
		return;
	if (e->dead) {
		nt->fatal = 1;
		fail(nt, COMM_ERR_PEER_LOST, "node %s: %s", node_name(nt, k), e->why);
		return;
	}
	r = ucp_tag_send_nbx(e->ep, buf, len, tag, &rp);
	if (UCS_PTR_IS_ERR(r) && (nt->fatal = 1))
		fail(nt, COMM_ERR_PEER_LOST, "send to node %s: %s", node_name(nt, k),
		     ucs_status_string(UCS_PTR_STATUS(r)));
	else if (r && add_req(nt, r, 0, 0, NULL, k) < 0) {
		/* UCX reads buf until the send ends: wait for it here rather than lose it */
		while (ucp_request_check_status(r) == UCS_INPROGRESS)
			ucp_worker_progress(N.worker);
		ucp_request_free(r);
		nt->fatal = 1;
		fail(nt, COMM_ERR_NO_MEMORY, "net: out of memory");
	}
}

static void show(struct net_task *nt, int what)
{
	__atomic_store_n(&nt->show, what, __ATOMIC_RELEASE);
}

/* Whether a message from node k is awaited (for status). */
static void await_node(struct net_task *nt, int k, int on)
{
	uint64_t bit = 1ull << (k % 64);

	if (on)
		__atomic_or_fetch(&nt->awaited[k / 64], bit, __ATOMIC_RELAXED);
	else
		__atomic_and_fetch(&nt->awaited[k / 64], ~bit, __ATOMIC_RELAXED);
}

/*
 * A receive of a message from node k, which status shows as awaited; -1:
 * not (a ring's chunk, which it counts instead; a send/recv's).
 */
static void post_recv_any(struct net_task *nt, int k, uint64_t tag, void *buf, size_t len,
			  size_t want, size_t *got)
{
	/* always a request: reap reads the length that arrived from it */
	ucp_request_param_t rp = { .op_attr_mask = UCP_OP_ATTR_FLAG_NO_IMM_CMPL };
	void *r;

	if (nt->status != COMM_OK)
		return;
	r = ucp_tag_recv_nbx(N.worker, buf, len, tag, ~0ull, &rp);
	if (UCS_PTR_IS_ERR(r) && (nt->fatal = 1))
		fail(nt, COMM_ERR_INTERNAL, "UCX receive: %s", ucs_status_string(UCS_PTR_STATUS(r)));
	else if (add_req(nt, r, 1, want, got, k) < 0) {
		ucp_request_cancel(N.worker, r);
		while (ucp_request_check_status(r) == UCS_INPROGRESS)
			ucp_worker_progress(N.worker);
		ucp_request_free(r);
		nt->fatal = 1;
		fail(nt, COMM_ERR_NO_MEMORY, "net: out of memory");
	} else if (k >= 0) {
		await_node(nt, k, 1);
	}
}

static void post_recv(struct net_task *nt, int k, uint64_t tag, void *buf, size_t len)
{
	post_recv_any(nt, k, tag, buf, len, len, NULL);
}

/* A ring chunk's request ended: its slot holds the chunk, or its hop's send of it is done. */
static void ring_ended(struct net_task *nt, int recv, int id)
{
	if (recv)
		nt->slots[id].state = SLOT_ARRIVED;
	else
		nt->sent[id / RING_CHUNKS] |= 1ull << (id % RING_CHUNKS);
}

/*
 * Reap the task's completed requests; 1 when none is left. An error fails
 * the task (a recv that was cancelled is not an error of its own).
 */
static int reap(struct net_task *nt)
{
	for (int i = 0; i < nt->nreq;) {
		struct nreq *q = &nt->reqs[i];
		ucp_tag_recv_info_t info = { 0 };
		ucs_status_t st = q->recv ? ucp_tag_recv_request_test(q->h, &info)
					  : ucp_request_check_status(q->h);

		if (st == UCS_INPROGRESS) {
			i++;
			continue;
		}
		if (st == UCS_ERR_CANCELED)
			;
		else if (st != UCS_OK && (nt->fatal = 1))
			fail(nt, COMM_ERR_PEER_LOST, "UCX %s: %s", q->recv ? "receive" : "send",
			     ucs_status_string(st));
		else if (q->recv && q->want != ANY_LENGTH && info.length != q->want)
			fail(nt, COMM_ERR_MISMATCH, "%zu bytes arrived from another node, %zu expected",
			     info.length, q->want);
		else if (q->got)
			*q->got = info.length;
		else if (q->ring >= 0 && st == UCS_OK)
			ring_ended(nt, q->recv, q->ring);
		if (!q->recv)
			nt->ep[q->node]->busy--;
		else if (q->node >= 0)
			await_node(nt, q->node, 0);
		ucp_request_free(q->h);
		*q = nt->reqs[--nt->nreq];
	}
	return nt->nreq == 0;
}

/* --- collectives ---------------------------------------------------------------------- */

static int prev_node(const struct net_task *nt)
{
	return (nt->me + nt->nn - 1) % nt->nn;
}

static int next_node(const struct net_task *nt)
{
	return (nt->me + 1) % nt->nn;
}

static int mod(int a, int n)
{
	return ((a % n) + n) % n;
}

/*
 * Piece k of the ring, the part of nb that node k ends up with: an
 * all-reduce's k-th slice of the count, split as evenly as it goes; a
 * reduce-scatter's or all-gather's blocks of node k's ranks (nb holds the
 * blocks node by node, so each node's are together). A chain's one piece
 * is the whole buffer.
 */
static void ring_piece(const struct net_task *nt, int k, size_t *off, size_t *len)
{
	size_t base = nt->t->count / (size_t)nt->nn, rem = nt->t->count % (size_t)nt->nn;
	size_t bl = nt->t->count * nt->t->esize;

	switch (nt->t->type) {
	case COMMPB__OP_TYPE__OP_ALLREDUCE:
		*off = ((size_t)k * base + ((size_t)k < rem ? (size_t)k : rem)) * nt->t->esize;
		*len = (base + ((size_t)k < rem)) * nt->t->esize;
		break;
	case COMMPB__OP_TYPE__OP_REDUCE_SCATTER:
	case COMMPB__OP_TYPE__OP_ALLGATHER:
		*off = (size_t)nt->pos[nt->d->nodes[k].ranks[0]] * bl;
		*len = (size_t)nt->d->nodes[k].nranks * bl;
		break;
	default:
		*off = 0;
		*len = bl;
		break;
	}
}

/* Chunk c of piece k: where it is in nb, and its bytes. */
static void ring_chunk(const struct net_task *nt, int k, int c, size_t *off, size_t *len)
{
	size_t po, pl, at = (size_t)c * nt->chunk;

	ring_piece(nt, k, &po, &pl);
	*off = po + at;
	*len = pl - at < nt->chunk ? pl - at : nt->chunk;
}

static int ring_nchunks(const struct net_task *nt, int k)
{
	size_t po, pl;

	ring_piece(nt, k, &po, &pl);
	return (int)((pl + nt->chunk - 1) / nt->chunk);
}

/* The rank after the run of ranks from r whose blocks follow each other in nb. */
static int run_end(const struct net_task *nt, int r)
{
	int e = r + 1;

	while (e < nt->j->world && nt->pos[e] == nt->pos[e - 1] + 1)
		e++;
	return e;
}

static uint64_t ctag(const struct net_task *nt, int to, int step)
{
	return TAG_COLL(nt->d->nodes[to].slot, nt->me, nt->t->cseq, step);
}

static uint64_t ctag_from(const struct net_task *nt, int from, int step)
{
	return TAG_COLL(nt->d->slot, from, nt->t->cseq, step);
}

/*
 * The node's ranks' inputs from byte off on, elems of them, combined into
 * dst (AVG: their sum; the division comes last).
 */
static void local_reduce(struct net_task *nt, uint8_t *dst, size_t off, size_t elems)
{
	struct task *t = nt->t;
	comm_redop_t op = t->redop == COMM_AVG ? COMM_SUM : (comm_redop_t)t->redop;

	for (int i = 0; i < nt->nlocal; i++)
		nt->lin[i] += off;
	reduce_n((comm_dtype_t)t->dtype, op, dst, (const void *const *)nt->lin, nt->nlocal, elems);
	for (int i = 0; i < nt->nlocal; i++)
		nt->lin[i] -= off;
}

static int root_node(const struct net_task *nt)
{
	return nt->d->node_of[nt->t->root];
}

static size_t round_up(size_t n)
{
	return n ? n : 1;
}

static int ring_recv_piece(const struct net_task *nt, int h)
{
	return mod(nt->me - h - 2, nt->nn);
}

static int ring_send_piece(const struct net_task *nt, int h)
{
	return mod(nt->me - h - 1, nt->nn);
}

/*
 * The ring's hops, chunk size, slots in rbuf and send marks. An
 * all-reduce's ring has 2 (nn - 1) hops: reduce-scatter, then all-gather;
 * a reduce-scatter's is the first half, an all-gather's the second. Each
 * node receives those hops from the node before it and sends them to the
 * next. A chain's hop h goes from its h-th node to the next: a
 * broadcast's from the root's node on along the ring, a reduce's back
 * along the ring to the root's node; each node receives one hop and sends
 * the next, but the first, which only sends, and the last.
 */
static int ring_alloc(struct net_task *nt)
{
	size_t es = nt->t->esize, po, pl, most = 0;
	int nn = nt->nn, at;

	nt->from = prev_node(nt);
	nt->to = next_node(nt);
	nt->h0 = nt->t->type == COMMPB__OP_TYPE__OP_ALLGATHER ? nn - 1 : 0;
	nt->hops = nt->t->type == COMMPB__OP_TYPE__OP_REDUCE_SCATTER ? nn - 1 : 2 * (nn - 1);
	nt->send0 = nt->h0;
	nt->send_end = nt->hops;
	if (nt->t->type == COMMPB__OP_TYPE__OP_BROADCAST ||
	    nt->t->type == COMMPB__OP_TYPE__OP_REDUCE) {
		/* a root the engine checked: only these two ops have one */
		if (nt->t->type == COMMPB__OP_TYPE__OP_BROADCAST) {
			at = mod(nt->me - root_node(nt), nn); /* from the root's node, the first */
		} else {
			at = mod(root_node(nt) - 1 - nt->me, nn); /* to the root's node, the last */
			nt->from = next_node(nt);
			nt->to = prev_node(nt);
		}
		nt->h0 = at ? at - 1 : 0;
		nt->hops = at; /* the first node receives nothing */
		nt->send0 = at ? -1 : 0;
		nt->send_end = nn - 1;
	}
	if (nt->t->type == COMMPB__OP_TYPE__OP_REDUCE_SCATTER ||
	    nt->t->type == COMMPB__OP_TYPE__OP_ALLGATHER) {
		/* each rank's block in nb: node by node, in rank order within a node */
		if (!(nt->pos = calloc((size_t)nt->j->world, sizeof *nt->pos)))
			return -1;
		for (int k = 0, b = 0; k < nn; k++)
			for (int i = 0; i < nt->d->nodes[k].nranks; i++)
				nt->pos[nt->d->nodes[k].ranks[i]] = b++;
	}
	for (int k = 0; k < nn; k++) {
		ring_piece(nt, k, &po, &pl);
		most = pl > most ? pl : most;
	}
	nt->chunk = (most + RING_CHUNKS - 1) / RING_CHUNKS;
	nt->chunk = nt->chunk < RING_CHUNK_MIN ? RING_CHUNK_MIN : (nt->chunk + es - 1) / es * es;
	if (most && nt->chunk > most) /* small pieces: slots of their size (whole elements) */
		nt->chunk = most;
	nt->next_h = nt->h0;
	nt->left = 0;
	for (int h = nt->h0; h < nt->hops; h++)
		nt->left += ring_nchunks(nt, ring_recv_piece(nt, h));
	nt->nslots = nt->left < RING_WINDOW ? nt->left : RING_WINDOW;
	if (!(nt->slots = calloc((size_t)round_up((size_t)nt->nslots), sizeof *nt->slots)) ||
	    !(nt->sent = calloc(round_up((size_t)nt->send_end), sizeof *nt->sent)))
		return -1;
	/*
	 * Chunks arrive in rbuf, never straight in a rank's memory: a receive
	 * UCX has matched cannot be cancelled, and may still write after the
	 * task stopped and its ranks had their answer (hold).
	 */
	if (!(nt->rbuf = buf_get(round_up((size_t)nt->nslots * nt->chunk), &nt->rbuf_cap)))
		return -1;
	return 0;
}

/* Post a ring chunk's send (to node to) or receive; id: what ring_ended gets. */
static void ring_post(struct net_task *nt, int recv, uint64_t tag, void *buf, size_t len, int id)
{
	int before = nt->nreq;

	if (recv)
		post_recv(nt, -1, tag, buf, len);
	else
		post_send(nt, nt->to, tag, buf, len);
	if (nt->nreq > before)
		nt->reqs[nt->nreq - 1].ring = id;
	else if (!recv && nt->status == COMM_OK) /* sent at once */
		ring_ended(nt, 0, id);
}

/*
 * Hop h's send of chunk c: of the piece this node has just taken in (at
 * hop h0: its partial of piece me - 1; an all-gather's: its own piece me).
 */
static void ring_send(struct net_task *nt, int h, int c)
{
	size_t off, len;

	ring_chunk(nt, ring_send_piece(nt, h), c, &off, &len);
	ring_post(nt, 0, ctag(nt, nt->to, RING_STEP(h, c)), nt->data + off, len,
		  h * RING_CHUNKS + c);
}

/* Receives for the next chunks, one in each free slot. */
static void ring_post_recvs(struct net_task *nt)
{
	for (int i = 0; i < nt->nslots && nt->status == COMM_OK; i++) {
		struct ring_slot *sl = &nt->slots[i];
		size_t off, len;

		if (sl->state != SLOT_FREE)
			continue;
		while (nt->next_h < nt->hops &&
		       nt->next_c >= ring_nchunks(nt, ring_recv_piece(nt, nt->next_h))) {
			nt->next_h++;
			nt->next_c = 0;
		}
		if (nt->next_h >= nt->hops)
			return;
		sl->h = nt->next_h;
		sl->c = nt->next_c++;
		sl->state = SLOT_POSTED;
		ring_chunk(nt, ring_recv_piece(nt, sl->h), sl->c, &off, &len);
		ring_post(nt, 1, ctag_from(nt, nt->from, RING_STEP(sl->h, sl->c)),
			  nt->rbuf + (size_t)i * nt->chunk, len, i);
	}
}

/*
 * Take in the chunks that arrived: combined into nb in the reduce-scatter
 * hops (h < nn - 1) and a reduce's, stored in the all-gather ones (a
 * broadcast's in the rank's buffer it fills), and sent on at once for the
 * next hop. In an all-reduce, a store waits until the send that read that
 * place in nb, nn - 1 hops before, has ended. 1 once every chunk is in and
 * every send has ended (or the task failed).
 */
static int ring_step(struct net_task *nt)
{
	struct task *t = nt->t;
	int nn = nt->nn, chain = t->type == COMMPB__OP_TYPE__OP_BROADCAST ||
				 t->type == COMMPB__OP_TYPE__OP_REDUCE;

	for (int i = 0; i < nt->nslots && nt->status == COMM_OK; i++) {
		struct ring_slot *sl = &nt->slots[i];
		const uint8_t *src = nt->rbuf + (size_t)i * nt->chunk;
		int h = sl->h, c = sl->c;
		size_t off, len;

		if (sl->state != SLOT_ARRIVED ||
		    (t->type == COMMPB__OP_TYPE__OP_ALLREDUCE && h >= nn - 1 &&
		     !(nt->sent[h + 1 - nn] >> c & 1)))
			continue;
		ring_chunk(nt, ring_recv_piece(nt, h), c, &off, &len);
		if (t->type == COMMPB__OP_TYPE__OP_REDUCE || (!chain && h < nn - 1))
			reduce_acc((comm_dtype_t)t->dtype, (comm_redop_t)t->redop, nt->data + off, src,
				   len / t->esize);
		else
			memcpy(nt->data + off, src, len);
		sl->state = SLOT_FREE;
		nt->left--;
		__atomic_store_n(&nt->show_in, nt->show_all - nt->left, __ATOMIC_RELAXED);
		if (h + 1 < nt->send_end)
			ring_send(nt, h + 1, c);
	}
	ring_post_recvs(nt);
	return nt->status != COMM_OK || (nt->left == 0 && nt->nreq == 0);
}

/* Start the ring, data ready (nb unless set): the first hop's sends (ring_send), and receives. */
static void ring_start(struct net_task *nt)
{
	nt->state = S_RING;
	nt->show_all = nt->left;
	show(nt, SHOW_CHUNKS);
	if (!nt->data)
		nt->data = nt->nb;
	for (int c = 0; nt->send0 >= 0 && c < ring_nchunks(nt, ring_send_piece(nt, nt->send0)); c++)
		ring_send(nt, nt->send0, c);
	ring_post_recvs(nt);
}

/* Buffers for the data phase, made before the verdicts so a shortage is one. */
static int alloc_buffers(struct net_task *nt)
{
	struct task *t = nt->t;
	size_t bl = t->count * t->esize, need_nb, piece;

	switch (t->type) {
	case COMMPB__OP_TYPE__OP_ALLTOALL:
		/* sbuf: what goes to every node, packed; rbuf: what comes from each */
		piece = bl * (size_t)nt->nlocal * (size_t)nt->j->world;
		return piece && (!(nt->sbuf = buf_get(piece, &nt->sbuf_cap)) ||
				 !(nt->rbuf = buf_get(piece, &nt->rbuf_cap))) ? -1 : 0;
	case COMMPB__OP_TYPE__OP_ALLREDUCE:
	case COMMPB__OP_TYPE__OP_REDUCE:
		need_nb = bl;
		break;
	case COMMPB__OP_TYPE__OP_REDUCE_SCATTER:
	case COMMPB__OP_TYPE__OP_ALLGATHER:
		need_nb = bl * (size_t)nt->j->world;
		break;
	case COMMPB__OP_TYPE__OP_BROADCAST: /* copied into the first rank's buffer */
		need_nb = 0;
		break;
	default: /* a barrier: verdicts alone */
		return 0;
	}
	/* the others run a ring or a chain */
	if (!bl)
		return 0;
	if (need_nb && !(nt->nb = buf_get(need_nb, &nt->nb_cap)))
		return -1;
	return ring_alloc(nt);
}

/* A status from another daemon, as one of ours (a value we never send: a protocol error). */
static comm_result_t remote_status(int32_t st)
{
	return st >= COMM_OK && st < COMM_INPROGRESS ? (comm_result_t)st : COMM_ERR_PROTOCOL;
}

/* Every node's verdict against node 0's: the first difference, as one node would say it. */
static void judge(struct net_task *nt)
{
	const struct hdr *a = &nt->in[0];
	const char *name = op_type_name((Commpb__OpType)a->type);
	unsigned long long seq = (unsigned long long)nt->t->cseq;

	for (int k = 0; k < nt->nn; k++) {
		if (nt->in[k].status != COMM_OK) {
			nt->status = remote_status(nt->in[k].status);
			snprintf(nt->detail, sizeof nt->detail, "%s", nt->in[k].detail);
			return;
		}
	}
	for (int k = 1; k < nt->nn; k++) {
		const struct hdr *b = &nt->in[k];
		int ra = a->first_rank, rb = b->first_rank;

		if (a->type != b->type)
			fail(nt, COMM_ERR_MISMATCH, "collective %llu: type: rank %d posted %s, rank %d posted %s",
			     seq, ra, name, rb, op_type_name((Commpb__OpType)b->type));
		else if (a->count != b->count)
			fail(nt, COMM_ERR_MISMATCH, "collective %llu: %s count: rank %d has %llu, rank %d has %llu",
			     seq, name, ra, (unsigned long long)a->count, rb,
			     (unsigned long long)b->count);
		else if (a->dtype != b->dtype)
			fail(nt, COMM_ERR_MISMATCH, "collective %llu: %s dtype: rank %d has %s, rank %d has %s",
			     seq, name, ra, dtype_name((int)a->dtype), rb, dtype_name((int)b->dtype));
		else if (op_reduces((Commpb__OpType)a->type) && a->redop != b->redop)
			fail(nt, COMM_ERR_MISMATCH, "collective %llu: %s redop: rank %d has %s, rank %d has %s",
			     seq, name, ra, redop_name((int)a->redop), rb, redop_name((int)b->redop));
		else if ((a->type == COMMPB__OP_TYPE__OP_BROADCAST ||
			  a->type == COMMPB__OP_TYPE__OP_REDUCE) && a->root != b->root)
			fail(nt, COMM_ERR_MISMATCH, "collective %llu: %s root: rank %d has %d, rank %d has %d",
			     seq, name, ra, a->root, rb, b->root);
		else if (a->device != b->device)
			fail(nt, COMM_ERR_MISMATCH,
			     "collective %llu: %s buffers: rank %d's are %s memory, rank %d's %s memory",
			     seq, name, ra, a->device ? "device" : "host", rb,
			     b->device ? "device" : "host");
	}
}

/*
 * A ring's or chain's result: an average divided (where it is a result:
 * all nb, this node's ranks' blocks, the reduce's root's node), then nb or
 * a broadcast's data (or part of it) to every local rank's output.
 */
static void write_out(struct net_task *nt)
{
	struct task *t = nt->t;
	size_t bl = t->count * t->esize, off = 0, len = bl;

	if (t->redop == COMM_AVG && op_reduces((Commpb__OpType)t->type) &&
	    (t->type != COMMPB__OP_TYPE__OP_REDUCE || nt->me == root_node(nt))) {
		if (t->type == COMMPB__OP_TYPE__OP_REDUCE_SCATTER)
			ring_piece(nt, nt->me, &off, &len);
		reduce_div((comm_dtype_t)t->dtype, nt->nb + off, len / t->esize, nt->j->world);
	}
	for (int r = 0; r < nt->j->world; r++) {
		if (!t->out[r] || !dist_local(nt->j, r))
			continue;
		switch (t->type) {
		case COMMPB__OP_TYPE__OP_ALLREDUCE:
			memcpy(t->out[r], nt->nb, bl);
			break;
		case COMMPB__OP_TYPE__OP_REDUCE_SCATTER:
			memcpy(t->out[r], nt->nb + (size_t)nt->pos[r] * bl, bl);
			break;
		case COMMPB__OP_TYPE__OP_REDUCE:
			if (r == t->root) /* on the root's node, the chain's last */
				memcpy(t->out[r], nt->nb, bl);
			break;
		case COMMPB__OP_TYPE__OP_BROADCAST:
			if (t->out[r] != nt->data) /* the buffer the chain filled or sent from */
				memcpy(t->out[r], nt->data, bl);
			break;
		case COMMPB__OP_TYPE__OP_ALLGATHER:
			/* back in rank order: in runs of ranks whose blocks follow each other */
			for (int a = 0, e; a < nt->j->world; a = e) {
				e = run_end(nt, a);
				memcpy(t->out[r] + (size_t)a * bl, nt->nb + (size_t)nt->pos[a] * bl,
				       (size_t)(e - a) * bl);
			}
			break;
		default:
			break;
		}
	}
}

static void alltoall_post(struct net_task *nt)
{
	struct task *t = nt->t;
	size_t bl = t->count * t->esize, so = 0, ro = 0;
	const struct dist_node *mine = &nt->d->nodes[nt->me];

	/* pack everything first: in place, the outputs are the inputs */
	for (int k = 0; k < nt->nn; k++) {
		const struct dist_node *dn = &nt->d->nodes[k];
		size_t start = so;

		for (int i = 0; i < mine->nranks; i++)
			for (int x = 0; x < dn->nranks; x++, so += bl)
				memcpy(nt->sbuf + so, t->in[mine->ranks[i]] + (size_t)dn->ranks[x] * bl,
				       bl);
		if (k != nt->me)
			post_send(nt, k, ctag(nt, k, 1), nt->sbuf + start, so - start);
	}
	for (int k = 0; k < nt->nn; k++) {
		size_t len = (size_t)nt->d->nodes[k].nranks * (size_t)mine->nranks * bl;

		if (k != nt->me)
			post_recv(nt, k, ctag_from(nt, k, 1), nt->rbuf + ro, len);
		ro += len;
	}
}

static void alltoall_finish(struct net_task *nt)
{
	struct task *t = nt->t;
	size_t bl = t->count * t->esize, ro = 0, so = 0;
	const struct dist_node *mine = &nt->d->nodes[nt->me];

	for (int k = 0; k < nt->nn; k++) {
		const struct dist_node *dn = &nt->d->nodes[k];
		const uint8_t *src;

		if (k == nt->me) {
			/* our own blocks: where alltoall_post packed them for "node me" */
			for (int kk = 0; kk < k; kk++)
				so += (size_t)mine->nranks * (size_t)nt->d->nodes[kk].nranks * bl;
			src = nt->sbuf + so;
			/* packed by sender i, then receiver x: the same order as a remote node's */
		} else {
			src = nt->rbuf + ro;
		}
		for (int i = 0; i < dn->nranks; i++)
			for (int x = 0; x < mine->nranks; x++, src += bl)
				memcpy(t->out[mine->ranks[x]] + (size_t)dn->ranks[i] * bl, src, bl);
		ro += (size_t)dn->nranks * (size_t)mine->nranks * bl;
	}
}

/*
 * Whether the op's data rides with the verdicts (one message to each node,
 * one round trip): an all-reduce, reduce or broadcast of up to SMALL_BYTES
 * a rank, a reduce-scatter or all-gather of up to SMALL_BYTES in all. The
 * same answer on every node that agrees on the op.
 */
static int is_small(const struct net_task *nt)
{
	const struct task *t = nt->t;
	size_t bl = t->count * t->esize;

	if (t->device || !bl)
		return 0;
	switch (t->type) {
	case COMMPB__OP_TYPE__OP_ALLREDUCE:
	case COMMPB__OP_TYPE__OP_REDUCE:
	case COMMPB__OP_TYPE__OP_BROADCAST:
		return bl <= SMALL_BYTES;
	case COMMPB__OP_TYPE__OP_REDUCE_SCATTER:
	case COMMPB__OP_TYPE__OP_ALLGATHER:
		return bl <= SMALL_BYTES / (size_t)nt->j->world;
	default:
		return 0;
	}
}

/*
 * The bytes node k contributes to a small op: its ranks' combined inputs
 * (all-reduce, reduce, reduce-scatter: every rank's block), its ranks'
 * blocks (all-gather), the root's buffer (broadcast, the root's node alone).
 */
static size_t small_data_len(const struct net_task *nt, int k)
{
	const struct task *t = nt->t;
	size_t bl = t->count * t->esize;

	switch (t->type) {
	case COMMPB__OP_TYPE__OP_REDUCE_SCATTER:
		return bl * (size_t)nt->j->world;
	case COMMPB__OP_TYPE__OP_ALLGATHER:
		return bl * (size_t)nt->d->nodes[k].nranks;
	case COMMPB__OP_TYPE__OP_BROADCAST:
		return k == root_node(nt) ? bl : 0;
	default:
		return bl;
	}
}

/*
 * What of it node from sends node to with its verdict: all of it, but a
 * reduce's, which only the root's node takes. (A reduce-scatter's goes
 * whole to every node, which takes its ranks' blocks: 16 KiB at most.)
 */
static size_t small_len(const struct net_task *nt, int from, int to)
{
	if (nt->t->type == COMMPB__OP_TYPE__OP_REDUCE && to != root_node(nt))
		return 0;
	return small_data_len(nt, from);
}

/* Node k's data of a small op, after its verdict in hbuf. */
static uint8_t *small_data(const struct net_task *nt, int k)
{
	return nt->hbuf + (size_t)k * HSLOT + sizeof(struct hdr);
}

/* This node's part of a small op, after its verdict in hbuf. */
static void small_pack(struct net_task *nt)
{
	struct task *t = nt->t;
	uint8_t *dst = small_data(nt, nt->me);
	size_t bl = t->count * t->esize;
	const struct dist_node *mine = &nt->d->nodes[nt->me];

	switch (t->type) {
	case COMMPB__OP_TYPE__OP_ALLGATHER:
		for (int i = 0; i < mine->nranks; i++)
			memcpy(dst + (size_t)i * bl, t->in[mine->ranks[i]], bl);
		break;
	case COMMPB__OP_TYPE__OP_BROADCAST:
		if (nt->me == root_node(nt))
			memcpy(dst, t->in[t->root], bl);
		break;
	default:
		local_reduce(nt, dst, 0, small_data_len(nt, nt->me) / t->esize);
		break;
	}
}

/*
 * Every node's data at byte off, elems of them, combined into dst in node
 * order (the same order on every node, so every node gets the same bits).
 */
static void small_combine(struct net_task *nt, uint8_t *dst, size_t off, size_t elems)
{
	struct task *t = nt->t;

	memcpy(dst, small_data(nt, 0) + off, elems * t->esize);
	for (int k = 1; k < nt->nn; k++)
		reduce_acc((comm_dtype_t)t->dtype, (comm_redop_t)t->redop, dst, small_data(nt, k) + off,
			   elems);
	if (t->redop == COMM_AVG)
		reduce_div((comm_dtype_t)t->dtype, dst, elems, nt->j->world);
}

/* Every node's data came with its verdict: the results, into the ranks' memory. */
static int small_finish(struct net_task *nt)
{
	struct task *t = nt->t;
	size_t bl = t->count * t->esize;
	const uint8_t *first = NULL;

	for (int k = 0; k < nt->nn; k++) {
		if (k != nt->me && nt->hlen[k] != sizeof(struct hdr) + small_len(nt, k, nt->me)) {
			nt->fatal = 1;
			fail(nt, COMM_ERR_PROTOCOL, "collective %llu: %zu bytes from node %s, %zu expected",
			     (unsigned long long)t->cseq, nt->hlen[k], node_name(nt, k),
			     sizeof(struct hdr) + small_len(nt, k, nt->me));
			return 1;
		}
	}
	for (int r = 0; r < nt->j->world; r++) {
		if (!t->out[r] || !dist_local(nt->j, r))
			continue;
		switch (t->type) {
		case COMMPB__OP_TYPE__OP_ALLREDUCE:
			/* combined once, copied to the node's other ranks */
			if (first)
				memcpy(t->out[r], first, bl);
			else
				small_combine(nt, t->out[r], 0, t->count);
			first = t->out[r];
			break;
		case COMMPB__OP_TYPE__OP_REDUCE:
			if (r == t->root) /* on the root's node, which alone got the data */
				small_combine(nt, t->out[r], 0, t->count);
			break;
		case COMMPB__OP_TYPE__OP_REDUCE_SCATTER:
			small_combine(nt, t->out[r], (size_t)r * bl, t->count);
			break;
		case COMMPB__OP_TYPE__OP_ALLGATHER:
			for (int k = 0; k < nt->nn; k++)
				for (int i = 0; i < nt->d->nodes[k].nranks; i++)
					memcpy(t->out[r] + (size_t)nt->d->nodes[k].ranks[i] * bl,
					       small_data(nt, k) + (size_t)i * bl, bl);
			break;
		default: /* broadcast */
			memcpy(t->out[r], small_data(nt, root_node(nt)), bl);
			break;
		}
	}
	return 1;
}

/* Run the collective's next step; 1 when it is finished (nt->status says how). */
static int coll_step(struct net_task *nt)
{
	struct task *t = nt->t;
	int nn = nt->nn, me = nt->me, k;
	size_t bl = t->count * t->esize;

	switch (nt->state) {
	case S_START:
		nt->out.magic = HDR_MAGIC;
		nt->out.status = t->status;
		nt->out.type = t->type;
		nt->out.dtype = t->dtype;
		nt->out.redop = t->redop;
		nt->out.root = t->root;
		nt->out.count = t->count;
		nt->out.first_rank = nt->first;
		nt->out.device = t->device;
		if (t->device && me == 0)
			memcpy(nt->out.nccl_id, nt->d->nccl_id, sizeof nt->out.nccl_id);
		snprintf(nt->out.detail, sizeof nt->out.detail, "%.199s", t->detail);
		if (!(nt->hbuf = malloc((size_t)nn * HSLOT)) ||
		    !(nt->hlen = calloc((size_t)nn, sizeof *nt->hlen))) {
			fail(nt, COMM_ERR_NO_MEMORY, "net: out of memory");
			nt->fatal = 1;
			return 1;
		}
		/* a small op: this node's data rides with its verdict, and needs no buffers */
		nt->small = t->status == COMM_OK && is_small(nt);
		if (t->status == COMM_OK && !t->device && !nt->small && alloc_buffers(nt) < 0) {
			nt->out.status = COMM_ERR_NO_MEMORY;
			snprintf(nt->out.detail, sizeof nt->out.detail,
				 "collective %llu: node %s is out of memory for it",
				 (unsigned long long)t->cseq, node_name(nt, me));
		}
		memcpy(nt->hbuf + (size_t)me * HSLOT, &nt->out, sizeof nt->out);
		nt->hlen[me] = sizeof nt->out;
		show(nt, SHOW_VERDICTS);
		if (nt->small)
			small_pack(nt);
		for (k = 0; k < nn; k++) {
			if (k == me)
				continue;
			post_send(nt, k, ctag(nt, k, 0), nt->hbuf + (size_t)me * HSLOT,
				  sizeof nt->out + (nt->small ? small_len(nt, me, k) : 0));
			post_recv_any(nt, k, ctag_from(nt, k, 0), nt->hbuf + (size_t)k * HSLOT, HSLOT,
				      ANY_LENGTH, &nt->hlen[k]);
		}
		nt->state = S_VERDICT;
		return 0;
	case S_VERDICT:
		for (k = 0; k < nn; k++) {
			if (nt->hlen[k] >= sizeof nt->in[k])
				memcpy(&nt->in[k], nt->hbuf + (size_t)k * HSLOT, sizeof nt->in[k]);
			nt->in[k].detail[sizeof nt->in[k].detail - 1] = 0;
			if (nt->hlen[k] < sizeof nt->in[k] || nt->in[k].magic != HDR_MAGIC) {
				fail(nt, COMM_ERR_PROTOCOL, "collective %llu: a bad header from node %s",
				     (unsigned long long)t->cseq, node_name(nt, k));
				return 1;
			}
		}
		judge(nt);
		/* device memory: the job's GPU workers run it next, with NCCL (on_done) */
		if (nt->status != COMM_OK || t->type == COMMPB__OP_TYPE__OP_BARRIER || !t->count ||
		    t->device)
			return 1;
		if (nt->small)
			return small_finish(nt);
		show(nt, SHOW_LOCAL);
		switch (t->type) {
		case COMMPB__OP_TYPE__OP_ALLREDUCE:
			local_reduce(nt, nt->nb, 0, t->count);
			ring_start(nt);
			return 0;
		case COMMPB__OP_TYPE__OP_REDUCE_SCATTER:
			/* every rank's block, combined over the node's ranks, to its place in nb */
			for (int r = 0, e; r < nt->j->world; r = e) {
				e = run_end(nt, r);
				local_reduce(nt, nt->nb + (size_t)nt->pos[r] * bl, (size_t)r * bl,
					     (size_t)(e - r) * t->count);
			}
			ring_start(nt);
			return 0;
		case COMMPB__OP_TYPE__OP_ALLGATHER:
			for (int r = 0; r < nt->j->world; r++)
				if (t->in[r] && dist_local(nt->j, r))
					memcpy(nt->nb + (size_t)nt->pos[r] * bl, t->in[r], bl);
			ring_start(nt);
			return 0;
		case COMMPB__OP_TYPE__OP_BROADCAST:
			/* the root's buffer, or the one the chain fills */
			nt->data = me == root_node(nt) ? t->in[t->root] : t->out[nt->first];
			ring_start(nt);
			return 0;
		case COMMPB__OP_TYPE__OP_REDUCE:
			local_reduce(nt, nt->nb, 0, t->count);
			ring_start(nt);
			return 0;
		case COMMPB__OP_TYPE__OP_ALLTOALL:
			show(nt, SHOW_EXCHANGE);
			alltoall_post(nt);
			nt->state = S_FINISH;
			return 0;
		default:
			fail(nt, COMM_ERR_INTERNAL, "net: op type %d", (int)t->type);
			return 1;
		}
	case S_FINISH:
		alltoall_finish(nt);
		return 1;
	}
	return 1;
}

/* --- send/recv ------------------------------------------------------------------------- */

static size_t p2p_chunk(size_t count)
{
	size_t c = (count + P2P_CHUNKS - 1) / P2P_CHUNKS;

	return c < RING_CHUNK_MIN ? RING_CHUNK_MIN : c;
}

/*
 * Post the sends of count bytes from buf (the rank's memory) to node pn,
 * chunk by chunk (tag: the header's).
 */
static void p2p_send_data(struct net_task *nt, int pn, uint64_t tag, const uint8_t *buf,
			  size_t count)
{
	size_t chunk = p2p_chunk(count);

	for (size_t at = 0, c = 0; at < count && nt->status == COMM_OK; at += chunk, c++)
		post_send(nt, pn, tag + 1 + c, buf + at, count - at < chunk ? count - at : chunk);
}

/*
 * Post the receives of count bytes into buf in chunks of chunk (the
 * sender's: p2p_chunk(count)); with slots kept, chunk c's arrival marks
 * slot c for p2p_take.
 */
static void p2p_recv_data(struct net_task *nt, uint64_t tag, uint8_t *buf, size_t count,
			  size_t chunk)
{
	for (size_t at = 0, c = 0; at < count && nt->status == COMM_OK; at += chunk, c++) {
		int before = nt->nreq;

		post_recv(nt, -1, tag + 1 + c, buf + at, count - at < chunk ? count - at : chunk);
		if (nt->slots && nt->nreq > before) {
			nt->slots[c].state = SLOT_POSTED;
			nt->reqs[nt->nreq - 1].ring = (int)c;
		}
	}
}

/* Copy the chunks that came into place; 1 once all are (or the task failed). */
static int p2p_take(struct net_task *nt)
{
	for (int c = 0; c < nt->nslots && nt->status == COMM_OK; c++) {
		size_t at = (size_t)c * nt->chunk;

		if (nt->slots[c].state != SLOT_ARRIVED)
			continue;
		memcpy(nt->t->out[0] + at, nt->rbuf + at,
		       nt->t->count - at < nt->chunk ? nt->t->count - at : nt->chunk);
		nt->slots[c].state = SLOT_FREE;
		nt->left--;
		__atomic_store_n(&nt->show_in, nt->show_all - nt->left, __ATOMIC_RELAXED);
	}
	return nt->status != COMM_OK || (nt->left == 0 && nt->nreq == 0);
}

static int p2p_step(struct net_task *nt)
{
	struct task *t = nt->t;
	int send = t->type == COMMPB__OP_TYPE__OP_SEND;
	int src = send ? t->local : t->peer, dst = send ? t->peer : t->local;
	int pn = nt->d->node_of[t->peer];
	uint32_t slot = send ? nt->d->nodes[pn].slot : nt->d->slot;

	switch (nt->state) {
	case S_START:
		if (send) {
			nt->out.magic = HDR_MAGIC;
			nt->out.status = t->status;
			nt->out.count = t->status == COMM_OK ? t->count : 0;
			snprintf(nt->out.detail, sizeof nt->out.detail, "%.199s", t->detail);
			post_send(nt, pn, TAG_P2P(slot, src, dst, t->cseq, 0), &nt->out, sizeof nt->out);
			if (t->status == COMM_OK)
				p2p_send_data(nt, pn, TAG_P2P(slot, src, dst, t->cseq, 0), t->in[0],
					      t->count);
			nt->to = pn;
			show(nt, SHOW_CHUNKS); /* "sending to node" */
			/* refused here: the receiver is told, and the send fails too */
			nt->deferred = t->status;
			snprintf(nt->deferred_detail, sizeof nt->deferred_detail, "%s", t->detail);
			nt->state = S_P2P_END;
		} else {
			post_recv(nt, -1, TAG_P2P(slot, src, dst, t->cseq, 0), &nt->in[0],
				  sizeof nt->in[0]);
			nt->state = S_P2P_DATA;
		}
		return 0;
	case S_P2P_DATA: {
		const struct hdr *h = &nt->in[0];

		if (h->magic != HDR_MAGIC) {
			nt->fatal = 1; /* its data is not taken: a later recv could meet it */
			fail(nt, COMM_ERR_PROTOCOL, "recv from rank %d: a bad header", src);
			return 1;
		}
		nt->in[0].detail[sizeof nt->in[0].detail - 1] = 0;
		if (h->status != COMM_OK) {
			nt->status = remote_status(h->status);
			snprintf(nt->detail, sizeof nt->detail, "%s", h->detail);
			return 1;
		}
		if (h->count != t->count || t->status != COMM_OK) {
			/*
			 * Take the data anyway, so the sender's send ends and nothing
			 * lingers; the error stands once it is in (failing now would
			 * cancel this receive).
			 */
			if (h->count && !(nt->rbuf = buf_get(h->count, &nt->rbuf_cap))) {
				nt->fatal = 1; /* the sender's data would linger */
				fail(nt, COMM_ERR_NO_MEMORY, "recv from rank %d: out of memory", src);
				return 1;
			}
			p2p_recv_data(nt, TAG_P2P(slot, src, dst, t->cseq, 0), nt->rbuf, h->count,
				      p2p_chunk(h->count));
			nt->deferred = t->status == COMM_OK ? COMM_ERR_MISMATCH : t->status;
			if (t->status == COMM_OK)
				snprintf(nt->deferred_detail, sizeof nt->deferred_detail,
					 "send from rank %d to rank %d: %llu bytes sent, %zu expected", src,
					 dst, (unsigned long long)h->count, t->count);
			else
				snprintf(nt->deferred_detail, sizeof nt->deferred_detail, "%s", t->detail);
			nt->state = S_P2P_END;
			return 0;
		}
		if (!t->count)
			return 1;
		/* through rbuf, as a ring's chunks (ring_alloc), each into place as it comes */
		nt->chunk = p2p_chunk(t->count);
		nt->nslots = nt->left = (int)((t->count + nt->chunk - 1) / nt->chunk);
		if (!(nt->rbuf = buf_get(t->count, &nt->rbuf_cap)) ||
		    !(nt->slots = calloc((size_t)nt->nslots, sizeof *nt->slots))) {
			nt->fatal = 1; /* the sender's data would linger */
			fail(nt, COMM_ERR_NO_MEMORY, "recv from rank %d: out of memory", src);
			return 1;
		}
		p2p_recv_data(nt, TAG_P2P(slot, src, dst, t->cseq, 0), nt->rbuf, t->count,
			      nt->chunk);
		nt->from = pn;
		nt->show_all = nt->left;
		show(nt, SHOW_CHUNKS);
		nt->state = S_P2P_RECV;
		return 0;
	}
	default:
		if (nt->deferred != COMM_OK)
			fail(nt, nt->deferred, "%s", nt->deferred_detail);
		return 1;
	}
}

/* --- the thread ---------------------------------------------------------------------------- */

static void task_release(struct net_task *nt)
{
	buf_put(nt->nb, nt->nb_cap);
	buf_put(nt->sbuf, nt->sbuf_cap);
	buf_put(nt->rbuf, nt->rbuf_cap);
	free(nt->hbuf);
	free(nt->hlen);
	free(nt->slots);
	free(nt->sent);
	free(nt->pos);
	nt->nb = nt->sbuf = nt->rbuf = nt->hbuf = NULL;
	nt->hlen = NULL;
	nt->slots = NULL;
	nt->sent = NULL;
	nt->pos = NULL;
}

/*
 * Hand nt to the loop thread, which frees it: once it is on the done list
 * this thread touches nothing of it (its buffers are given back first),
 * but for a held task's requests and buffers (holds_reap).
 */
static void finish(struct net_task *nt)
{
	if (!nt->held_ms)
		task_release(nt);
	pthread_mutex_lock(&N.lock);
	TAILQ_REMOVE(&N.active, nt, link);
	TAILQ_INSERT_TAIL(&N.done, nt, link);
	pthread_mutex_unlock(&N.lock);
	uv_async_send(&N.async);
}

static void start_task(struct net_task *nt)
{
	struct task *t = nt->t;
	char err[160];

	for (int k = 0; k < nt->nn; k++) {
		const struct dist_node *dn = &nt->d->nodes[k];

		if (k == nt->me)
			continue;
		if (t->peer >= 0 && k != nt->d->node_of[t->peer])
			continue;
		if (!(nt->ep[k] = ep_get(dn->ucx, dn->ucx_len, err, sizeof err))) {
			nt->fatal = 1; /* the others wait for this node */
			fail(nt, COMM_ERR_INTERNAL, "node %s: %s", dn->name, err);
			finish(nt);
			return;
		}
	}
	if ((t->peer >= 0 ? p2p_step(nt) : coll_step(nt)) || (nt->nreq == 0 && nt->status != COMM_OK))
		finish(nt);
}

/*
 * Hold nt, stopped with requests that did not end (sends a failed job's
 * receiver never takes, a receive UCX matched): its task is answered, its
 * requests and staging buffers stay until UCX ends them, and so does its
 * task's memory where sends read it (a rank's buffer, a device op's
 * staging buffer; engine_task_release). A send handed over may never
 * arrive: the job fails. Closing the endpoint by force instead would fail
 * every job's ops on it.
 */
static void hold(struct net_task *nt, uint64_t now)
{
	nt->held_ms = now;
	for (int i = 0; i < nt->nreq; i++)
		nt->held_sends |= !nt->reqs[i].recv;
	nt->fatal |= nt->held_sends;
	nt->held_bytes = nt->nb_cap + nt->sbuf_cap + nt->rbuf_cap;
	pthread_mutex_lock(&N.lock);
	TAILQ_INSERT_TAIL(&N.held, nt, hlink);
	pthread_mutex_unlock(&N.lock);
	log_info("net: job %s: a stopped op's %d requests did not end: held, with what they "
		 "use, until they do", nt->j->name, nt->nreq);
}

/*
 * Give back what the held tasks' ended requests used: a task whose all
 * ended goes to the loop thread (engine_task_release). Those held too long
 * have their sends' endpoints closed by force; force (commd is stopping,
 * every endpoint closed): all of them are let go, and the number that did
 * not end even so (a receive matched from a daemon gone silent, whose
 * endpoint is UCX's own) is returned.
 */
static int holds_reap(int force, uint64_t now)
{
	struct net_task *nt, *tmp;
	int unended = 0;

	TAILQ_FOREACH_SAFE(nt, &N.held, hlink, tmp) {
		if (!force && now - nt->held_ms >= HOLD_MAX_MS)
			for (int i = 0; i < nt->nreq; i++)
				if (!nt->reqs[i].recv)
					ep_kill(nt->ep[nt->reqs[i].node],
						"sends of a stopped op not taken in time");
		for (int i = 0; i < nt->nreq;) {
			struct nreq *q = &nt->reqs[i];

			if (force) {
				ucp_request_cancel(N.worker, q->h);
				for (int k = 0; k < 1000 && ucp_request_check_status(q->h) ==
								UCS_INPROGRESS; k++)
					ucp_worker_progress(N.worker);
				unended += ucp_request_check_status(q->h) == UCS_INPROGRESS;
			} else if (ucp_request_check_status(q->h) == UCS_INPROGRESS) {
				i++;
				continue;
			}
			if (!q->recv)
				nt->ep[q->node]->busy--;
			ucp_request_free(q->h);
			*q = nt->reqs[--nt->nreq];
		}
		if (nt->nreq)
			continue;
		task_release(nt);
		pthread_mutex_lock(&N.lock);
		TAILQ_REMOVE(&N.held, nt, hlink);
		TAILQ_INSERT_TAIL(&N.released, nt, hlink);
		pthread_mutex_unlock(&N.lock);
		uv_async_send(&N.async);
	}
	return unended;
}

/* Whether every send nt still waits for is to a node that is gone. */
static int sends_to_dead_only(const struct net_task *nt)
{
	for (int i = 0; i < nt->nreq; i++)
		if (!nt->reqs[i].recv && !nt->ep[nt->reqs[i].node]->dead)
			return 0;
	return 1;
}

/*
 * Advance nt if its step has completed; stopping tasks wind down. 1 when nt
 * finished: it is the loop thread's then, and may be freed already.
 */
static int advance(struct net_task *nt, uint64_t now)
{
	int idle;

	/* acquire: cancel_code and cancel_detail were written before cancel */
	if (nt->status == COMM_OK && __atomic_load_n(&nt->cancel, __ATOMIC_ACQUIRE))
		fail(nt, nt->cancel_code, "%s", nt->cancel_detail);
	if (nt->status != COMM_OK && !nt->stopping) {
		/* what is still to come from the others will not be waited for */
		nt->stopping = 1;
		nt->stop_ms = now;
		show(nt, SHOW_STOPPING);
		for (int i = 0; i < nt->nreq; i++)
			if (nt->reqs[i].recv)
				ucp_request_cancel(N.worker, nt->reqs[i].h);
	}
	idle = reap(nt);
	if (nt->status == COMM_OK && nt->state == S_RING) {
		if (!ring_step(nt) || nt->status != COMM_OK)
			return 0; /* a failure: stopped and ended on the next turn */
		show(nt, SHOW_WRITE);
		write_out(nt);
		finish(nt);
		return 1;
	}
	if (nt->status == COMM_OK && nt->state == S_P2P_RECV) {
		if (!p2p_take(nt) || nt->status != COMM_OK)
			return 0;
		finish(nt);
		return 1;
	}
	/*
	 * Requests that neither end nor fail: held, at once where the job
	 * failed (its ranks wait for nothing more) or commd stops, else after
	 * a while (the job may go on, and a hold fails it). At commd's stop
	 * net_stop ends the held ones by force: a receive UCX matched from a
	 * daemon gone silent never ends, and no endpoint of its own says so.
	 */
	if (!idle && nt->stopping &&
	    (N.stop || __atomic_load_n(&nt->doomed, __ATOMIC_RELAXED) || now - nt->stop_ms >= CANCEL_WAIT_MS ||
	     sends_to_dead_only(nt))) {
		hold(nt, now);
		finish(nt);
		return 1;
	}
	if (!idle)
		return 0;
	if (nt->status != COMM_OK || (nt->t->peer >= 0 ? p2p_step(nt) : coll_step(nt)) ||
	    (nt->nreq == 0 && nt->status != COMM_OK)) {
		finish(nt);
		return 1;
	}
	return 0;
}

/* Late messages to freed slots: received and thrown away. Held tasks and closes that ended: freed. */
static void drain(uint64_t now)
{
	struct dead_slot *ds, *dt;
	struct discard *dc, *dct;
	struct nep *e;

	holds_reap(0, now);
	TAILQ_FOREACH(e, &N.eps, link)
		ep_closing(e);
	eps_prune();

	TAILQ_FOREACH_SAFE(dc, &N.discards, link, dct) {
		if (ucp_request_check_status(dc->h) == UCS_INPROGRESS)
			continue;
		ucp_request_free(dc->h);
		free(dc->buf);
		TAILQ_REMOVE(&N.discards, dc, link);
		free(dc);
	}
	pthread_mutex_lock(&N.lock);
	TAILQ_FOREACH_SAFE(ds, &N.dead, link, dt) {
		ucp_tag_recv_info_t info;
		ucp_tag_message_h m;

		while ((m = ucp_tag_probe_nb(N.worker, TAG_SLOT(ds->slot), TAG_SLOT_MASK, 1, &info))) {
			ucp_request_param_t rp = { .op_attr_mask = UCP_OP_ATTR_FLAG_NO_IMM_CMPL };
			struct discard *d = calloc(1, sizeof *d);

			if (d)
				d->buf = malloc(info.length ? info.length : 1);
			if (!d || !d->buf) {
				free(d);
				break;
			}
			d->h = ucp_tag_msg_recv_nbx(N.worker, d->buf, info.length, m, &rp);
			if (UCS_PTR_IS_ERR(d->h)) {
				free(d->buf);
				free(d);
				continue;
			}
			TAILQ_INSERT_TAIL(&N.discards, d, link);
		}
		if (now >= ds->until_ms) {
			N.slot_used[ds->slot] = 0;
			TAILQ_REMOVE(&N.dead, ds, link);
			free(ds);
		}
	}
	pthread_mutex_unlock(&N.lock);
}

static void *net_thread(void *arg)
{
	struct epoll_event ev;
	uint64_t last_us = 0;

	(void)arg;
	while (1) {
		struct net_task *nt, *tmp;
		uint64_t now = now_ms();
		int did = 0;

		pthread_mutex_lock(&N.lock);
		if (N.stop && TAILQ_EMPTY(&N.active) && TAILQ_EMPTY(&N.submitted)) {
			pthread_mutex_unlock(&N.lock);
			break;
		}
		while ((nt = TAILQ_FIRST(&N.submitted))) {
			TAILQ_REMOVE(&N.submitted, nt, link);
			TAILQ_INSERT_TAIL(&N.active, nt, link);
			pthread_mutex_unlock(&N.lock);
			start_task(nt);
			did = 1;
			pthread_mutex_lock(&N.lock);
		}
		pthread_mutex_unlock(&N.lock);
		while (ucp_worker_progress(N.worker))
			did = 1;
		close_failed_eps();
		TAILQ_FOREACH_SAFE(nt, &N.active, link, tmp) {
			int before = nt->nreq;

			if (advance(nt, now))
				did = 1; /* and nt is gone */
			else
				did |= nt->nreq != before;
		}
		if (now - N.last_drain_ms >= 100) {
			N.last_drain_ms = now;
			drain(now);
		}
		if (!TAILQ_EMPTY(&N.active))
			N.last_task_ms = now;
		else if (N.cached && now - N.last_task_ms >= BUF_IDLE_MS)
			buf_trim();
		/* poll a little after each event: the next step's answer is often near */
		if (did) {
			last_us = now_us();
			continue;
		}
		if (!TAILQ_EMPTY(&N.active) &&
		    now_us() - last_us < (uint64_t)__atomic_load_n(&N.spin_us, __ATOMIC_RELAXED))
			continue;
		if (ucp_worker_arm(N.worker) == UCS_ERR_BUSY)
			continue;
		if (epoll_wait(N.ep_fd, &ev, 1, 100) > 0 && ev.data.fd == N.wake_fd) {
			uint64_t v;

			if (read(N.wake_fd, &v, sizeof v) < 0 && errno != EAGAIN)
				log_warn("net: wake: %s", strerror(errno));
		}
	}
	return NULL;
}

/* --- the loop thread's side ----------------------------------------------------------------- */

static void nt_free(struct net_task *nt)
{
	free(nt->reqs);
	free(nt->ep);
	free(nt->in);
	free(nt->lin);
	free(nt);
}

/*
 * Tasks finished: their ranks answered (held ones' memory kept); then held
 * tasks whose requests ended: freed. Those are taken first, so that each
 * was answered before (a task goes on the done list before it is released).
 */
static void on_done(uv_async_t *h)
{
	struct nt_head released = TAILQ_HEAD_INITIALIZER(released);
	struct net_task *nt;

	(void)h;
	pthread_mutex_lock(&N.lock);
	TAILQ_CONCAT(&released, &N.released, hlink);
	pthread_mutex_unlock(&N.lock);
	while (1) {
		struct task *t;

		pthread_mutex_lock(&N.lock);
		nt = TAILQ_FIRST(&N.done);
		if (nt)
			TAILQ_REMOVE(&N.done, nt, link);
		pthread_mutex_unlock(&N.lock);
		if (!nt)
			break;
		t = nt->t;
		t->status = nt->status;
		if (nt->status != COMM_OK)
			snprintf(t->detail, sizeof t->detail, "%s", nt->detail);
		/* data went astray: the other nodes may wait for what never comes */
		if (nt->fatal && t->job->state == JOB_READY)
			job_fail(t->job, nt->status, "%s", nt->detail);
		if (t->device && t->peer < 0 && t->status == COMM_OK && !t->job->dist->has_nccl_id) {
			memcpy(t->job->dist->nccl_id, nt->in[0].nccl_id, sizeof t->job->dist->nccl_id);
			t->job->dist->has_nccl_id = 1;
		}
		t->nt = NULL;
		/* a held task's requests are the net thread's still */
		t->held = nt->held_sends;
		if (!nt->held_ms)
			nt_free(nt);
		/* every node agreed to run it on device memory: each worker does its part */
		t->gpu = t->device && t->peer < 0 && t->status == COMM_OK;
		if (t->device && t->type == COMMPB__OP_TYPE__OP_RECV) {
			if (!gpu_p2p_received(t))
				engine_task_done(t);
		} else if (!t->gpu) {
			engine_task_done(t);
		} else if (engine_gpu_handoff(t)) {
			/* the other nodes' workers wait in NCCL for this one's: fail them now */
			if (t->job->state == JOB_READY)
				job_fail(t->job, t->status, "%s", t->detail);
			engine_task_done(t); /* last: it may free the job */
		}
	}
	while ((nt = TAILQ_FIRST(&released))) {
		struct task *t = nt->held_sends ? nt->t : NULL; /* else freed already */

		TAILQ_REMOVE(&released, nt, hlink);
		nt_free(nt);
		if (t)
			engine_task_release(t);
	}
}

void be_net_run(struct task *t)
{
	struct job *j = t->job;
	struct net_task *nt = calloc(1, sizeof *nt);
	int nn = j->dist->nnodes;

	if (!nt || !(nt->ep = calloc((size_t)nn, sizeof *nt->ep)) ||
	    !(nt->in = calloc((size_t)nn, sizeof *nt->in)) ||
	    !(nt->lin = calloc((size_t)j->world, sizeof *nt->lin))) {
		if (nt)
			nt_free(nt);
		/* the other nodes wait for this one: the job cannot go on */
		t->status = COMM_ERR_NO_MEMORY;
		snprintf(t->detail, sizeof t->detail, "net: out of memory");
		engine_task_done(t);
		job_fail(j, COMM_ERR_NO_MEMORY, "net: out of memory");
		return;
	}
	nt->t = t;
	nt->j = j;
	nt->d = j->dist;
	nt->nn = nn;
	nt->me = j->dist->self;
	nt->first = -1;
	for (int r = 0; r < j->world; r++) {
		if (!dist_local(j, r) || t->peer >= 0)
			continue;
		if (nt->first < 0)
			nt->first = r;
		nt->lin[nt->nlocal++] = t->in[r];
	}
	t->nt = nt;
	if (!N.available) {
		nt->status = COMM_ERR_UNSUPPORTED;
		snprintf(nt->detail, sizeof nt->detail, "no data plane between daemons: %s", N.why);
		pthread_mutex_lock(&N.lock);
		TAILQ_INSERT_TAIL(&N.done, nt, link);
		pthread_mutex_unlock(&N.lock);
		uv_async_send(&N.async);
		return;
	}
	pthread_mutex_lock(&N.lock);
	TAILQ_INSERT_TAIL(&N.submitted, nt, link);
	pthread_mutex_unlock(&N.lock);
	wake();
}

/* Stop nt with code and detail; doomed: as its job failed. */
static void cancel_locked(struct net_task *nt, comm_result_t code, const char *detail, int doomed)
{
	if (doomed)
		__atomic_store_n(&nt->doomed, 1, __ATOMIC_RELAXED);
	if (nt->cancel)
		return;
	nt->cancel_code = code;
	snprintf(nt->cancel_detail, sizeof nt->cancel_detail, "%s", detail);
	__atomic_store_n(&nt->cancel, 1, __ATOMIC_RELEASE);
}

void net_task_cancel(struct task *t, comm_result_t code, const char *detail)
{
	pthread_mutex_lock(&N.lock);
	if (t->nt)
		cancel_locked(t->nt, code, detail, 0);
	pthread_mutex_unlock(&N.lock);
	wake();
}

void net_peer_lost(const void *addr, size_t len)
{
	struct dead_peer *dp;

	if (!N.running || !len || !(dp = malloc(sizeof *dp + len)))
		return;
	dp->len = len;
	memcpy(dp->addr, addr, len);
	pthread_mutex_lock(&N.lock);
	TAILQ_INSERT_TAIL(&N.lost, dp, link);
	pthread_mutex_unlock(&N.lock);
	wake();
}

void net_job_failed(struct job *j)
{
	struct net_task *nt;

	if (!j->dist || !N.running)
		return;
	/*
	 * Nothing more is received for the job: what the other nodes still
	 * send it (their sends wait for a receiver) is drained from now on.
	 */
	if (!j->dist->slot_freed) {
		j->dist->slot_freed = 1;
		net_slot_free(j->dist->slot);
	}
	pthread_mutex_lock(&N.lock);
	TAILQ_FOREACH(nt, &N.submitted, link)
		if (nt->j == j)
			cancel_locked(nt, j->fail_code, j->fail_detail, 1);
	TAILQ_FOREACH(nt, &N.active, link)
		if (nt->j == j)
			cancel_locked(nt, j->fail_code, j->fail_detail, 1);
	pthread_mutex_unlock(&N.lock);
	wake();
}

uint32_t net_slot_alloc(void)
{
	uint32_t s = 0;

	if (!N.slot_used)
		return 0;
	pthread_mutex_lock(&N.lock);
	for (uint32_t i = 0; i < SLOTS; i++) {
		uint32_t t = (N.next_slot + i) % SLOTS;

		if (!N.slot_used[t]) {
			s = t;
			break;
		}
	}
	if (s) {
		N.slot_used[s] = 1;
		N.next_slot = s + 1;
	}
	pthread_mutex_unlock(&N.lock);
	return s;
}

void net_slot_free(uint32_t slot)
{
	struct dead_slot *ds;

	if (!N.slot_used)
		return;
	ds = calloc(1, sizeof *ds);
	pthread_mutex_lock(&N.lock);
	if (ds) {
		ds->slot = slot;
		ds->until_ms = now_ms() + SLOT_QUARANTINE_MS;
		TAILQ_INSERT_TAIL(&N.dead, ds, link);
	} else {
		N.slot_used[slot] = 0;
	}
	pthread_mutex_unlock(&N.lock);
}

const void *net_address(size_t *len)
{
	*len = N.available ? N.addr_len : 0;
	return N.available ? N.addr : NULL;
}

int net_set_spin(int us)
{
	cpu_set_t cpus;
	int cores = 1;

	/* auto: spin long only where a core for it is likely spare (of those commd may use) */
	if (us < 0) {
		if (sched_getaffinity(0, sizeof cpus, &cpus) == 0)
			cores = CPU_COUNT(&cpus);
		us = cores >= NET_SPIN_CORES ? NET_SPIN_LONG_US : NET_SPIN_SHORT_US;
	}
	__atomic_store_n(&N.spin_us, us, __ATOMIC_RELAXED);
	return us;
}

void net_start(uv_loop_t *loop)
{
	ucp_params_t cp = { 0 };
	ucp_worker_params_t wp = { 0 };
	ucp_config_t *cfg = NULL;
	struct epoll_event ev = { .events = EPOLLIN };
	ucp_address_t *a = NULL;
	ucs_status_t st;

	uv_async_init(loop, &N.async, on_done);
	if (!(N.slot_used = calloc(SLOTS, 1))) {
		snprintf(N.why, sizeof N.why, "out of memory");
		return;
	}
	N.slot_used[0] = 1; /* 0: no slot */
	N.next_slot = 1;
	/*
	 * UCX's tcp transport moves data in segments of its TCP_TX_SEG_SIZE
	 * and TCP_RX_SEG_SIZE, 8 KiB unless set: 256 KiB ones made send/recv
	 * between two daemons 3x as fast, all-reduce and broadcast 2x (README,
	 * "Across daemons"), for about 1 MB more a peer. Read from the
	 * environment when the transport starts (ucp_config_modify does not
	 * reach it); an operator's own setting stands.
	 */
	setenv("UCX_TCP_TX_SEG_SIZE", TCP_SEG_SIZE, 0);
	setenv("UCX_TCP_RX_SEG_SIZE", TCP_SEG_SIZE, 0);
	if ((st = ucp_config_read(NULL, NULL, &cfg)) != UCS_OK)
		goto ucx_fail;
	/*
	 * UCX 1.13's tcp transport can complete a zero-copy send twice when its
	 * peer dies (an assertion, and commd with it): copy instead, unless the
	 * operator says otherwise.
	 */
	if (!getenv("UCX_ZCOPY_THRESH"))
		ucp_config_modify(cfg, "ZCOPY_THRESH", "inf");
	cp.field_mask = UCP_PARAM_FIELD_FEATURES;
	cp.features = UCP_FEATURE_TAG | UCP_FEATURE_WAKEUP;
	st = ucp_init(&cp, cfg, &N.ctx);
	ucp_config_release(cfg);
	if (st != UCS_OK)
		goto ucx_fail;
	wp.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
	wp.thread_mode = UCS_THREAD_MODE_SINGLE;
	if ((st = ucp_worker_create(N.ctx, &wp, &N.worker)) != UCS_OK)
		goto ucx_fail;
	if ((st = ucp_worker_get_address(N.worker, &a, &N.addr_len)) != UCS_OK)
		goto ucx_fail;
	if (!(N.addr = malloc(N.addr_len))) {
		ucp_worker_release_address(N.worker, a);
		st = UCS_ERR_NO_MEMORY;
		goto ucx_fail;
	}
	memcpy(N.addr, a, N.addr_len);
	ucp_worker_release_address(N.worker, a);
	if ((st = ucp_worker_get_efd(N.worker, &N.worker_fd)) != UCS_OK)
		goto ucx_fail;
	N.wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	N.ep_fd = epoll_create1(EPOLL_CLOEXEC);
	if (N.wake_fd < 0 || N.ep_fd < 0) {
		snprintf(N.why, sizeof N.why, "eventfd/epoll: %s", strerror(errno));
		goto fail;
	}
	ev.data.fd = N.wake_fd;
	epoll_ctl(N.ep_fd, EPOLL_CTL_ADD, N.wake_fd, &ev);
	ev.data.fd = N.worker_fd;
	epoll_ctl(N.ep_fd, EPOLL_CTL_ADD, N.worker_fd, &ev);
	if (pthread_create(&N.thread, NULL, net_thread, NULL) != 0) {
		snprintf(N.why, sizeof N.why, "cannot start its thread");
		goto fail;
	}
	pthread_setname_np(N.thread, "commd-net");
	N.running = 1;
	N.available = 1;
	log_info("net: UCX %s data plane ready (%zu-byte worker address; polls %d us after an event)",
		 ucp_get_version_string(), N.addr_len, __atomic_load_n(&N.spin_us, __ATOMIC_RELAXED));
	return;
ucx_fail:
	snprintf(N.why, sizeof N.why, "UCX: %s", ucs_status_string(st));
fail:
	/* no net thread drains freed slots: jobs get numbers past them (peer_job_new) */
	free(N.slot_used);
	N.slot_used = NULL;
	log_warn("net: no data plane between daemons: %s", N.why);
}

static void close_async(uv_handle_t *h)
{
	(void)h;
}

void net_stop(void)
{
	struct nep *e;
	int stuck = 0;

	if (N.running) {
		pthread_mutex_lock(&N.lock);
		N.stop = 1;
		/* jobs were failed before: their tasks are stopping */
		pthread_mutex_unlock(&N.lock);
		wake();
		pthread_join(N.thread, NULL);
		N.running = 0;
		buf_trim();
		on_done(&N.async);
	}
	/* what was sent to jobs that are gone: taken, so UCX has nothing unmatched left */
	for (int i = 0; N.worker && i < 100000; i++) {
		ucp_request_param_t rp = { .op_attr_mask = UCP_OP_ATTR_FLAG_NO_IMM_CMPL };
		ucp_tag_recv_info_t info;
		ucp_tag_message_h m;
		void *buf, *r;

		while (ucp_worker_progress(N.worker))
			;
		if (!(m = ucp_tag_probe_nb(N.worker, 0, 0, 1, &info)))
			break;
		if (!(buf = malloc(info.length ? info.length : 1)))
			break;
		r = ucp_tag_msg_recv_nbx(N.worker, buf, info.length, m, &rp);
		if (UCS_PTR_IS_PTR(r)) {
			while (ucp_request_check_status(r) == UCS_INPROGRESS)
				ucp_worker_progress(N.worker);
			ucp_request_free(r);
		}
		free(buf);
	}
	while (!TAILQ_EMPTY(&N.discards) || !TAILQ_EMPTY(&N.dead)) {
		struct discard *dc = TAILQ_FIRST(&N.discards);
		struct dead_slot *ds = TAILQ_FIRST(&N.dead);

		if (dc) {
			ucp_request_cancel(N.worker, dc->h);
			while (ucp_request_check_status(dc->h) == UCS_INPROGRESS)
				ucp_worker_progress(N.worker);
			ucp_request_free(dc->h);
			free(dc->buf);
			TAILQ_REMOVE(&N.discards, dc, link);
			free(dc);
		} else {
			TAILQ_REMOVE(&N.dead, ds, link);
			free(ds);
		}
	}
	while (!TAILQ_EMPTY(&N.lost)) {
		struct dead_peer *dp = TAILQ_FIRST(&N.lost);

		TAILQ_REMOVE(&N.lost, dp, link);
		free(dp);
	}
	/* closes under way (a flush cannot be forced): the peers get a while to answer */
	for (uint64_t t0 = now_ms(); N.worker && now_ms() - t0 < CLOSE_WAIT_MS;) {
		int open = 0;

		ucp_worker_progress(N.worker);
		TAILQ_FOREACH(e, &N.eps, link)
			open += ep_closing(e);
		if (!open)
			break;
	}
	TAILQ_FOREACH(e, &N.eps, link) {
		if (e->closing) {
			/* UCX asserts on an endpoint still closing when its worker goes */
			log_warn("net: an endpoint to a lost daemon is still closing: UCX is left "
				 "for the exit to release");
			stuck = 1;
			ep_close_release(e);
		}
		ep_kill(e, "commd is stopping");
	}
	if (holds_reap(1, now_ms()) > 0) {
		/* UCX asserts on an endpoint with a request under way when its worker goes */
		log_warn("net: a held op's receive from a daemon that stopped answering did not "
			 "end: UCX is left for the exit to release");
		stuck = 1;
	}
	on_done(&N.async); /* the held tasks */
	buf_trim(); /* their buffers went back to the cache */
	while ((e = TAILQ_FIRST(&N.eps))) {
		TAILQ_REMOVE(&N.eps, e, link);
		free(e->addr);
		free(e);
	}
	N.neps = 0;
	if (!stuck) { /* else kept, reachable, for the exit to release */
		if (N.worker)
			ucp_worker_destroy(N.worker);
		if (N.ctx)
			ucp_cleanup(N.ctx);
		N.worker = NULL;
		N.ctx = NULL;
	}
	if (N.wake_fd >= 0)
		close(N.wake_fd);
	if (N.ep_fd >= 0)
		close(N.ep_fd);
	N.wake_fd = N.ep_fd = -1;
	free(N.addr);
	N.addr = NULL;
	N.available = 0;
	free(N.slot_used);
	N.slot_used = NULL;
	if (!uv_is_closing((uv_handle_t *)&N.async))
		uv_close((uv_handle_t *)&N.async, close_async);
}

int net_available(void)
{
	return N.available;
}

const char *net_why(void)
{
	return N.why;
}

/*
 * One line for commctl status: UCX's version, the tcp segment size and
 * the polling, then the held ops (hold): how many, how many still
 * sending, how long the oldest has been held and the staging memory kept.
 */
void net_status(char *buf, size_t len)
{
	const char *tx = getenv("UCX_TCP_TX_SEG_SIZE"), *rx = getenv("UCX_TCP_RX_SEG_SIZE");
	char seg[80];
	struct net_task *nt;
	uint64_t now = now_ms(), oldest = now;
	size_t bytes = 0;
	int n = 0, sending = 0, off, w;

	if (!N.available) {
		snprintf(buf, len, "unavailable (%s)", N.why);
		return;
	}
	pthread_mutex_lock(&N.lock);
	TAILQ_FOREACH(nt, &N.held, hlink) {
		n++;
		sending += nt->held_sends;
		bytes += nt->held_bytes;
		oldest = nt->held_ms < oldest ? nt->held_ms : oldest;
	}
	pthread_mutex_unlock(&N.lock);
	/* what net_start set, or the operator's */
	if (tx && rx && !strcmp(tx, rx))
		snprintf(seg, sizeof seg, "%.32s", tx);
	else
		snprintf(seg, sizeof seg, "%.32s out, %.32s in", tx ? tx : "UCX's",
			 rx ? rx : "UCX's");
	off = snprintf(buf, len, "ucx %s, tcp segments %s, polls %d us; held ops: ",
		       ucp_get_version_string(), seg,
		       __atomic_load_n(&N.spin_us, __ATOMIC_RELAXED));
	if (off < 0 || (size_t)off >= len)
		return;
	if (!n)
		w = snprintf(buf + off, len - (size_t)off, "none");
	else
		w = snprintf(buf + off, len - (size_t)off,
			     "%d (%d sending), the oldest for %llu s, %.1f MiB", n, sending,
			     (unsigned long long)((now - oldest) / 1000), (double)bytes / (1 << 20));
	if (w < 0 || (size_t)(off += w) >= len)
		return;
	snprintf(buf + off, len - (size_t)off, "; endpoints: %d",
		 __atomic_load_n(&N.neps, __ATOMIC_RELAXED));
}

/* Node k's ranks, "2-3,7", as far as len allows (they are sorted). */
static void node_ranks(const struct dist_node *dn, char *buf, size_t len)
{
	size_t off = 0;

	buf[0] = 0;
	for (int i = 0, e; i < dn->nranks && off < len; i = e + 1) {
		int w;

		for (e = i; e + 1 < dn->nranks && dn->ranks[e + 1] == dn->ranks[e] + 1; e++)
			;
		w = e > i ? snprintf(buf + off, len - off, "%s%d-%d", off ? "," : "", dn->ranks[i],
				     dn->ranks[e])
			  : snprintf(buf + off, len - off, "%s%d", off ? "," : "", dn->ranks[i]);
		if (w < 0)
			return;
		off += (size_t)w;
	}
}

void net_task_state(const struct task *t, char *buf, size_t len)
{
	const struct net_task *nt = t->nt;
	const struct dist *d = t->job->dist;
	char names[160] = "", ranks[64] = "";
	int what, n = 0, one = -1;
	size_t off = 0;

	if (!nt) {
		snprintf(buf, len, "running across daemons");
		return;
	}
	what = __atomic_load_n(&nt->show, __ATOMIC_ACQUIRE);
	for (int k = 0; k < nt->nn; k++) {
		if (!(__atomic_load_n(&nt->awaited[k / 64], __ATOMIC_RELAXED) >> (k % 64) & 1))
			continue;
		if (n++ < 3 && off < sizeof names)
			off += (size_t)snprintf(names + off, sizeof names - off, "%s%s",
						off ? ", " : "", d->nodes[k].name);
		one = k;
	}
	if (n > 3)
		snprintf(names + (off < sizeof names ? off : sizeof names - 1),
			 sizeof names - (off < sizeof names ? off : sizeof names - 1),
			 " and %d more", n - 3);
	if (n == 1)
		node_ranks(&d->nodes[one], ranks, sizeof ranks);
	switch (what) {
	case SHOW_VERDICTS:
		if (n == 1)
			snprintf(buf, len, "across daemons: waiting for node %s (ranks %s) to post it",
				 names, ranks);
		else if (n)
			snprintf(buf, len, "across daemons: waiting for nodes %s to post it", names);
		else
			snprintf(buf, len, "across daemons: every node posted it");
		break;
	case SHOW_LOCAL:
		snprintf(buf, len, "across daemons: taking in this node's ranks' data");
		break;
	case SHOW_CHUNKS:
		if (nt->show_all) /* a chain's first node and a send receive nothing */
			snprintf(buf, len, "across daemons: %d of %d chunks in from node %s",
				 __atomic_load_n(&nt->show_in, __ATOMIC_RELAXED), nt->show_all,
				 d->nodes[nt->from].name);
		else
			snprintf(buf, len, "across daemons: sending to node %s",
				 d->nodes[nt->to].name);
		break;
	case SHOW_EXCHANGE:
		if (n)
			snprintf(buf, len, "across daemons: waiting for data from node%s %s",
				 n > 1 ? "s" : "", names);
		else
			snprintf(buf, len, "across daemons: exchanging data");
		break;
	case SHOW_WRITE:
		snprintf(buf, len, "across daemons: writing the result to this node's ranks");
		break;
	case SHOW_STOPPING:
		snprintf(buf, len, "across daemons: failed, ending the transfers under way");
		break;
	default:
		snprintf(buf, len, "running across daemons");
		break;
	}
}

#else /* !HAVE_UCX */

void net_start(uv_loop_t *loop)
{
	(void)loop;
}

void net_stop(void)
{
}

int net_available(void)
{
	return 0;
}

const char *net_why(void)
{
	return "commd was built without UCX";
}

void net_status(char *buf, size_t len)
{
	snprintf(buf, len, "unavailable (%s)", net_why());
}

const void *net_address(size_t *len)
{
	*len = 0;
	return NULL;
}

int net_set_spin(int us)
{
	return us < 0 ? 0 : us;
}

uint32_t net_slot_alloc(void)
{
	return 0;
}

void net_slot_free(uint32_t slot)
{
	(void)slot;
}

void be_net_run(struct task *t)
{
	t->status = COMM_ERR_UNSUPPORTED;
	snprintf(t->detail, sizeof t->detail, "no data plane between daemons: %s", net_why());
	engine_task_done(t);
}

void net_job_failed(struct job *j)
{
	(void)j;
}

void net_peer_lost(const void *addr, size_t len)
{
	(void)addr;
	(void)len;
}

void net_task_state(const struct task *t, char *buf, size_t len)
{
	(void)t;
	snprintf(buf, len, "running across daemons");
}

void net_task_cancel(struct task *t, comm_result_t code, const char *detail)
{
	(void)t;
	(void)code;
	(void)detail;
}

#endif
