/*
 * net-int.h: the data plane's insides (net.c), shared by its files: tags
 * and limits, a task's and an endpoint's state, the net thread's state N,
 * and the helpers one file lends the others. UCX builds only.
 */
#ifndef DAEMON_NET_INT_H
#define DAEMON_NET_INT_H

#ifdef HAVE_UCX
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#include <ucp/api/ucp.h>

#include "commd.h"

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

struct net_state {
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
};

/* The net thread's state, and the loop thread's handles on it (net.c). */
extern struct net_state N;

/* --- net-ep.c: endpoints, staging buffers, requests ------------------------ */

/* The endpoint to the daemon at addr, made on first use; NULL (err says why) if none can be. */
struct nep *ep_get(const uint8_t *addr, size_t len, char *err, size_t errlen);
/* Free the dead endpoints that are closed and that no task names any more. */
void eps_prune(void);
/* Close an endpoint for good: every request on it completes with an error. */
void ep_kill(struct nep *e, const char *why);
/* The endpoint's flush close is over for us: its request freed. */
void ep_close_release(struct nep *e);
/* Whether e's flush close is under way still; released once it ended. */
int ep_closing(struct nep *e);
/* Close the endpoints whose daemon was lost (gently, once idle) or that UCX failed (at once). */
void close_failed_eps(void);
/* The smallest cached buffer of at least size bytes, else a new one; *cap: its size. */
void *buf_get(size_t size, size_t *cap);
/* Keep a staging buffer for reuse; the least recently kept go past BUF_CACHE_MAX. */
void buf_put(void *p, size_t cap);
/* Free every cached staging buffer. */
void buf_trim(void);
/* Fail the task with code and a message, unless it failed already. */
void fail(struct net_task *nt, comm_result_t code, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
/* Node k's name, for messages. */
const char *node_name(const struct net_task *nt, int k);
/* Post a send of len bytes to node k under tag; a dead endpoint or a refusal fails the task. */
void post_send(struct net_task *nt, int k, uint64_t tag, const void *buf, size_t len);
/* What the task is doing, for status (one of SHOW_*). */
void show(struct net_task *nt, int what);
/* A receive of a message from node k, which status shows as awaited (k -1: none is). */
void post_recv_any(struct net_task *nt, int k, uint64_t tag, void *buf, size_t len,
			  size_t want, size_t *got);
/* A receive of exactly len bytes from node k. */
void post_recv(struct net_task *nt, int k, uint64_t tag, void *buf, size_t len);
/* A ring chunk's request ended: its slot holds the chunk, or its hop's send of it is done. */
void ring_ended(struct net_task *nt, int recv, int id);
/* Reap the task's completed requests; 1 when none is left. */
int reap(struct net_task *nt);

/* --- net-coll.c: collectives ----------------------------------------------- */

/* Take in the ring's or chain's chunks that arrived; 1 once all are in and sent. */
int ring_step(struct net_task *nt);
/* A status from another daemon, as one of ours. */
comm_result_t remote_status(int32_t st);
/* A ring's or chain's result, into every local rank's output. */
void write_out(struct net_task *nt);
/* Run the collective's next step; 1 when it is finished (nt->status says how). */
int coll_step(struct net_task *nt);

/* --- net-p2p.c: send/recv -------------------------------------------------- */

/* Copy the chunks that came into place; 1 once all are (or the task failed). */
int p2p_take(struct net_task *nt);
/* Run the send's or recv's next step; 1 when it is finished (nt->status says how). */
int p2p_step(struct net_task *nt);

/* --- net-thread.c: the thread ---------------------------------------------- */

/* Give back what the held tasks' ended requests used; force: let them all go. */
int holds_reap(int force, uint64_t now);
/* The net thread's body: it runs every task (net_start starts it). */
void *net_thread(void *arg);

#endif /* HAVE_UCX */

#endif
