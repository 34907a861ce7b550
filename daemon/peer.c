/*
 * peer.c: the control plane between daemons. A job whose ranks name a root
 * daemon (Hello.root) is formed by that root: every member daemon (one
 * holding some of its ranks; the root may be one) connects to the root's
 * peer listener over TCP and tells it which ranks it holds; once they add up
 * to the world the root fixes the node order and sends every member the
 * table. Failures, clean leaves and the end of the job go through the root
 * to the other members. Heartbeats and TCP_USER_TIMEOUT turn a dead or cut
 * off peer into COMM_ERR_PEER_LOST for the jobs that span it.
 */
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <unistd.h>

#include "commd.h"
#include "log.h"
#include "util.h"

/*
 * 2: small ops' data with the verdicts; RS/AG rings and broadcast/reduce
 * chains in chunks. 3: send/recv data in chunks (net-int.h's TAG_P2P).
 */
#define PEER_VERSION 3
#define PEER_FRAME_MAX (1u << 20)
#define PEER_WQ_MAX (64u << 20)  /* unsent bytes before a peer is dropped */
#define PING_MS 1000
#define CONNECT_MS 5000          /* resolving and connecting to a root */
#define LOST_KEEP_MS 60000       /* how long status shows a lost peer */
#define FORM_GRACE_MS 2000       /* a member waits this long past the root's deadline */

enum peer_state { P_CONNECTING, P_HELLO, P_UP, P_LOST };

struct pframe {
	TAILQ_ENTRY(pframe) link;
	uv_buf_t buf;
};

struct peer {
	TAILQ_ENTRY(peer) link;
	uv_tcp_t tcp;
	uv_getaddrinfo_t gai;
	uv_connect_t creq;
	int outgoing;          /* we connected: it is a root of our jobs */
	enum peer_state state;
	int handle_open;       /* tcp initialised and not yet closed */
	int busy;              /* a resolve or connect callback is still due */
	char addr[256];        /* outgoing: as the job named it; incoming: ip:port */
	char node[128];        /* from its hello */
	char why[160];         /* P_LOST: what happened */
	char broken[160];      /* a write failed: lost on the next tick, not in the middle of a send */
	uint8_t *ucx;          /* its UCX worker address */
	size_t ucx_len;
	uint8_t *rbuf;
	size_t rlen, rcap;
	TAILQ_HEAD(, pframe) pending; /* written once connected */
	uint64_t since_ms;     /* of the current state */
	uint64_t last_rx_ms;
	uint64_t last_ping_ms;
	uint32_t rtt_us;
};

/* The root's view of a job being formed (or formed) through it. */
struct rmember {
	struct peer *p;
	uint32_t slot;
	int nranks;
	int *ranks;
};

struct rjob {
	TAILQ_ENTRY(rjob) link;
	char name[JOB_NAME_MAX + 1];
	uint8_t token[TOKEN_MAX];
	size_t token_len;
	int world;
	uint32_t uid;          /* jobs of different users never merge */
	uint32_t timeout_ms;
	uint64_t created_ms;
	uint64_t key;          /* 0 until formed */
	int failed;
	int nm;
	struct rmember *m;
};

static struct {
	uv_loop_t *loop;
	uv_tcp_t listener;
	int listening;
	char listen_addr[256];
	char node[128];
	TAILQ_HEAD(, peer) peers;
	TAILQ_HEAD(, rjob) rjobs;
	uint32_t untagged;     /* jobs named without a tag slot (no data plane) */
} P = { .peers = TAILQ_HEAD_INITIALIZER(P.peers), .rjobs = TAILQ_HEAD_INITIALIZER(P.rjobs) };

static void peer_lost(struct peer *p, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void on_read(uv_stream_t *s, ssize_t n, const uv_buf_t *buf);
static void alloc_cb(uv_handle_t *h, size_t hint, uv_buf_t *buf);

const char *peer_node_name(void)
{
	return P.node;
}

/* Split "host:port" (or "[v6]:port") into host and port; -1 when malformed. */
static int split_addr(const char *a, char *host, size_t hlen, char *port, size_t plen)
{
	const char *colon = strrchr(a, ':'), *h = a;
	size_t n;
	long v;

	if (!colon || parse_long_in(colon + 1, 0, 65535, &v) < 0)
		return -1;
	n = (size_t)(colon - a);
	if (n >= 2 && a[0] == '[' && a[n - 1] == ']') {
		h = a + 1;
		n -= 2;
	}
	if (n == 0 || n >= hlen)
		return -1;
	memcpy(host, h, n);
	host[n] = 0;
	snprintf(port, plen, "%ld", v);
	return 0;
}

/* --- framing ------------------------------------------------------------------ */

static void on_written(uv_write_t *w, int status)
{
	(void)status;
	free(w->data);
	free(w);
}

/*
 * Queue a frame. A failure marks the peer broken (peer_tick loses it), since
 * callers are often walking the jobs that losing it would change.
 */
static void write_frame(struct peer *p, uint8_t *frame, size_t len)
{
	uv_write_t *w = malloc(sizeof *w);
	uv_buf_t b = uv_buf_init((char *)frame, (unsigned)len);

	if (*p->broken || !w) {
		free(frame);
		free(w);
		if (!*p->broken)
			snprintf(p->broken, sizeof p->broken, "out of memory");
		return;
	}
	w->data = frame;
	if (uv_write(w, (uv_stream_t *)&p->tcp, &b, 1, on_written) < 0) {
		free(frame);
		free(w);
		snprintf(p->broken, sizeof p->broken, "write failed");
		return;
	}
	if (p->tcp.write_queue_size > PEER_WQ_MAX)
		snprintf(p->broken, sizeof p->broken, "%zu bytes unsent: the peer does not read",
			 p->tcp.write_queue_size);
}

static void peer_send(struct peer *p, const Commpb__PeerMsg *m)
{
	size_t len = commpb__peer_msg__get_packed_size(m);
	uint8_t *frame;

	if (p->state == P_LOST)
		return;
	if (len > PEER_FRAME_MAX || !(frame = malloc(len + 4))) {
		log_warn("peer %s: a message of %zu bytes cannot be sent", p->addr, len);
		return;
	}
	frame[0] = (uint8_t)len;
	frame[1] = (uint8_t)(len >> 8);
	frame[2] = (uint8_t)(len >> 16);
	frame[3] = (uint8_t)(len >> 24);
	commpb__peer_msg__pack(m, frame + 4);
	if (p->state == P_CONNECTING) {
		struct pframe *f = malloc(sizeof *f);

		if (!f) {
			free(frame);
			snprintf(p->broken, sizeof p->broken, "out of memory");
			return;
		}
		f->buf = uv_buf_init((char *)frame, (unsigned)(len + 4));
		TAILQ_INSERT_TAIL(&p->pending, f, link);
		return;
	}
	write_frame(p, frame, len + 4);
}

static void send_hello(struct peer *p)
{
	Commpb__PeerMsg m = COMMPB__PEER_MSG__INIT;
	Commpb__PeerHello h = COMMPB__PEER_HELLO__INIT;

	h.version = PEER_VERSION;
	h.node = P.node;
	h.ucx_address.data = (uint8_t *)net_address(&h.ucx_address.len);
	m.body_case = COMMPB__PEER_MSG__BODY_HELLO;
	m.hello = &h;
	peer_send(p, &m);
}

static void send_fail(struct peer *p, const char *job, uint64_t key, uint32_t slot,
		      comm_result_t code, const char *fmt, ...) __attribute__((format(printf, 6, 7)));
static void send_fail(struct peer *p, const char *job, uint64_t key, uint32_t slot,
		      comm_result_t code, const char *fmt, ...)
{
	Commpb__PeerMsg m = COMMPB__PEER_MSG__INIT;
	Commpb__PeerFail f = COMMPB__PEER_FAIL__INIT;
	char detail[256];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(detail, sizeof detail, fmt, ap);
	va_end(ap);
	f.job = (char *)job;
	f.key = key;
	f.slot = slot;
	f.status = code;
	f.detail = detail;
	m.body_case = COMMPB__PEER_MSG__BODY_FAIL;
	m.fail = &f;
	peer_send(p, &m);
}

/* --- connections ---------------------------------------------------------------- */

static struct peer *peer_new(int outgoing, const char *addr)
{
	struct peer *p = calloc(1, sizeof *p);

	if (!p)
		return NULL;
	p->outgoing = outgoing;
	p->state = P_CONNECTING;
	p->since_ms = p->last_rx_ms = now_ms();
	snprintf(p->addr, sizeof p->addr, "%s", addr);
	TAILQ_INIT(&p->pending);
	p->tcp.data = p;
	p->gai.data = p;
	p->creq.data = p;
	TAILQ_INSERT_TAIL(&P.peers, p, link);
	return p;
}

/* A connection to our listener that never said a hello: not a daemon we know. */
static int stranger(const struct peer *p)
{
	return !p->outgoing && !*p->node;
}

static void peer_free(struct peer *p)
{
	struct pframe *f;

	while ((f = TAILQ_FIRST(&p->pending))) {
		TAILQ_REMOVE(&p->pending, f, link);
		free(f->buf.base);
		free(f);
	}
	TAILQ_REMOVE(&P.peers, p, link);
	free(p->ucx);
	free(p->rbuf);
	free(p);
}

static void on_closed(uv_handle_t *h)
{
	struct peer *p = h->data;

	p->handle_open = 0;
}

static void tune_socket(uv_tcp_t *t)
{
	uv_os_fd_t fd;
	int v = 3000;

	uv_tcp_nodelay(t, 1);
	if (uv_fileno((uv_handle_t *)t, &fd) == 0)
		setsockopt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT, &v, sizeof v);
}

static void peer_up(struct peer *p)
{
	p->state = P_UP;
	p->since_ms = now_ms();
	log_info("peer %s (%s): up, as %s", p->node, p->addr,
		 p->outgoing ? "a root of our jobs" : "a member of jobs rooted here");
}

static void on_connect(uv_connect_t *req, int status)
{
	struct peer *p = req->data;
	struct pframe *f;

	p->busy = 0;
	if (p->state == P_LOST)
		return;
	if (status < 0) {
		peer_lost(p, "connect: %s", uv_strerror(status));
		return;
	}
	tune_socket(&p->tcp);
	p->state = P_HELLO;
	p->since_ms = p->last_rx_ms = now_ms();
	uv_read_start((uv_stream_t *)&p->tcp, alloc_cb, on_read);
	/* the hello was queued first, then whatever the jobs asked for */
	while ((f = TAILQ_FIRST(&p->pending))) {
		TAILQ_REMOVE(&p->pending, f, link);
		write_frame(p, (uint8_t *)f->buf.base, f->buf.len);
		free(f);
		if (p->state == P_LOST)
			return;
	}
}

static void alloc_cb(uv_handle_t *h, size_t hint, uv_buf_t *buf)
{
	struct peer *p = h->data;

	(void)hint;
	if (p->rcap - p->rlen < 65536) {
		size_t cap = p->rcap ? p->rcap * 2 : 131072;
		uint8_t *nb = realloc(p->rbuf, cap);

		if (!nb) {
			*buf = uv_buf_init(NULL, 0);
			return;
		}
		p->rbuf = nb;
		p->rcap = cap;
	}
	*buf = uv_buf_init((char *)p->rbuf + p->rlen, (unsigned)(p->rcap - p->rlen));
}

static void on_resolved(uv_getaddrinfo_t *req, int status, struct addrinfo *ai)
{
	struct peer *p = req->data;
	int rc;

	p->busy = 0;
	if (p->state == P_LOST) {
		uv_freeaddrinfo(ai);
		return;
	}
	if (status < 0) {
		peer_lost(p, "resolve: %s", uv_strerror(status));
		return;
	}
	uv_tcp_init(P.loop, &p->tcp);
	p->handle_open = 1;
	rc = uv_tcp_connect(&p->creq, &p->tcp, ai->ai_addr, on_connect);
	uv_freeaddrinfo(ai);
	if (rc < 0) {
		peer_lost(p, "connect: %s", uv_strerror(rc));
		return;
	}
	p->busy = 1;
}

/*
 * The connection to root daemon addr, made when there is none (or it was
 * lost); NULL with *rc and err saying why.
 */
static struct peer *peer_to_root(const char *addr, comm_result_t *rc_out, char *err,
				 size_t errlen)
{
	struct addrinfo hints = { .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM };
	char host[256], port[8];
	struct peer *p;
	int rc;

	TAILQ_FOREACH(p, &P.peers, link)
		if (p->outgoing && p->state != P_LOST && !strcmp(p->addr, addr))
			return p;
	if (split_addr(addr, host, sizeof host, port, sizeof port) < 0) {
		*rc_out = COMM_ERR_INVALID_ARG;
		snprintf(err, errlen, "join: root '%.200s' is not host:port", addr);
		return NULL;
	}
	if (!(p = peer_new(1, addr))) {
		*rc_out = COMM_ERR_NO_MEMORY;
		snprintf(err, errlen, "join: out of memory");
		return NULL;
	}
	send_hello(p); /* queued until connected */
	rc = uv_getaddrinfo(P.loop, &p->gai, on_resolved, host, port, &hints);
	if (rc < 0) {
		peer_lost(p, "resolve: %s", uv_strerror(rc));
		*rc_out = COMM_ERR_DAEMON_UNREACHABLE;
		snprintf(err, errlen, "join: root daemon %s: %s", addr, p->why);
		return NULL;
	}
	p->busy = 1;
	log_info("peer %s: connecting (root of a job)", addr);
	return p;
}

static void on_accept(uv_stream_t *server, int status)
{
	struct sockaddr_storage ss;
	int len = sizeof ss;
	char host[64] = "?", name[128];
	struct peer *p;

	if (status < 0)
		return;
	if (!(p = peer_new(0, "?")))
		return;
	uv_tcp_init(P.loop, &p->tcp);
	p->handle_open = 1;
	if (uv_accept(server, (uv_stream_t *)&p->tcp) < 0) {
		peer_lost(p, "accept failed");
		return;
	}
	if (uv_tcp_getpeername(&p->tcp, (struct sockaddr *)&ss, &len) == 0) {
		if (ss.ss_family == AF_INET) {
			struct sockaddr_in *in = (struct sockaddr_in *)&ss;

			uv_ip4_name(in, host, sizeof host);
			snprintf(name, sizeof name, "%s:%d", host, ntohs(in->sin_port));
		} else {
			struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)&ss;

			uv_ip6_name(in6, host, sizeof host);
			snprintf(name, sizeof name, "[%s]:%d", host, ntohs(in6->sin6_port));
		}
		snprintf(p->addr, sizeof p->addr, "%s", name);
	}
	tune_socket(&p->tcp);
	p->state = P_HELLO;
	send_hello(p);
	uv_read_start((uv_stream_t *)&p->tcp, alloc_cb, on_read);
}

/* --- the root's side -------------------------------------------------------------- */

/* A job forming under name for uid, to join. */
static struct rjob *rjob_forming(const char *name, uint32_t uid)
{
	struct rjob *r;

	TAILQ_FOREACH(r, &P.rjobs, link)
		if (!r->key && !r->failed && r->uid == uid && !strcmp(r->name, name))
			return r;
	return NULL;
}

/* Member p's entry in r: by its slot for the job (any slot: -1). */
static int rjob_member(const struct rjob *r, const struct peer *p, int64_t slot)
{
	for (int i = 0; i < r->nm; i++)
		if (r->m[i].p == p && (slot < 0 || r->m[i].slot == (uint32_t)slot))
			return i;
	return -1;
}

/*
 * The job member p names: by the root's key once formed, else by its own
 * slot, which names one incarnation (a member never gives the same slot to
 * two jobs the root may still remember), formed since or not.
 */
static struct rjob *rjob_of(const struct peer *p, uint64_t key, uint32_t slot, int *i)
{
	struct rjob *r;

	TAILQ_FOREACH(r, &P.rjobs, link) {
		if (key && r->key != key)
			continue;
		if ((*i = rjob_member(r, p, key ? -1 : (int64_t)slot)) >= 0)
			return r;
	}
	return NULL;
}

/* A message for a job incarnation that is gone (or never was) here: dropped. */
static void drop_stale(const struct peer *p, const char *what, const char *job, uint64_t key,
		       uint32_t slot)
{
	log_debug("peer %s: stale %s dropped: job %.100s, key %016llx, slot %u: no such incarnation",
		  p->node, what, *job ? job : "?", (unsigned long long)key, slot);
}

static void rjob_free(struct rjob *r)
{
	for (int i = 0; i < r->nm; i++)
		free(r->m[i].ranks);
	free(r->m);
	TAILQ_REMOVE(&P.rjobs, r, link);
	free(r);
}

static void rjob_drop_member(struct rjob *r, int i)
{
	free(r->m[i].ranks);
	r->m[i] = r->m[--r->nm];
	if (!r->nm) {
		log_info("job %s: no member left, forgotten by the root", r->name);
		rjob_free(r);
	}
}

/* Fail r for every member but skip (NULL: all). */
static void rjob_fail(struct rjob *r, const struct peer *skip, comm_result_t code,
		      const char *fmt, ...) __attribute__((format(printf, 4, 5)));
static void rjob_fail(struct rjob *r, const struct peer *skip, comm_result_t code,
		      const char *fmt, ...)
{
	char detail[256];
	va_list ap;

	if (r->failed)
		return;
	r->failed = 1;
	va_start(ap, fmt);
	vsnprintf(detail, sizeof detail, fmt, ap);
	va_end(ap);
	log_info("job %s: failed at the root: %s", r->name, detail);
	for (int i = 0; i < r->nm; i++)
		if (r->m[i].p != skip)
			send_fail(r->m[i].p, r->name, r->key, r->m[i].slot, code, "%s", detail);
}

static int cmp_lowest_rank(const void *a, const void *b)
{
	const struct rmember *x = a, *y = b;

	return x->ranks[0] - y->ranks[0];
}

static int cmp_int(const void *a, const void *b)
{
	return *(const int *)a - *(const int *)b;
}

static void rjob_form(struct rjob *r)
{
	Commpb__PeerNode *nodes = calloc((size_t)r->nm, sizeof *nodes);
	Commpb__PeerNode **np = calloc((size_t)r->nm, sizeof *np);
	Commpb__PeerMsg m = COMMPB__PEER_MSG__INIT;
	Commpb__PeerFormed f = COMMPB__PEER_FORMED__INIT;

	if (!nodes || !np) {
		free(nodes);
		free(np);
		rjob_fail(r, NULL, COMM_ERR_NO_MEMORY, "join: the root ran out of memory");
		return;
	}
	for (int i = 0; i < r->nm && r->nm > 1; i++) {
		if (!r->m[i].p->ucx_len) {
			free(nodes);
			free(np);
			rjob_fail(r, NULL, COMM_ERR_UNSUPPORTED,
				  "join: job %s spans %d daemons, and node %s has no UCX data plane",
				  r->name, r->nm, r->m[i].p->node);
			return;
		}
	}
	while (!r->key)
		if (getrandom(&r->key, sizeof r->key, 0) != sizeof r->key)
			r->key = now_us() ^ ((uint64_t)getpid() << 40);
	qsort(r->m, (size_t)r->nm, sizeof *r->m, cmp_lowest_rank);
	for (int i = 0; i < r->nm; i++) {
		commpb__peer_node__init(&nodes[i]);
		nodes[i].node = r->m[i].p->node;
		nodes[i].ucx_address.data = r->m[i].p->ucx;
		nodes[i].ucx_address.len = r->m[i].p->ucx_len;
		nodes[i].slot = r->m[i].slot;
		nodes[i].ranks = r->m[i].ranks;
		nodes[i].n_ranks = (size_t)r->m[i].nranks;
		np[i] = &nodes[i];
	}
	f.job = r->name;
	f.key = r->key;
	f.nodes = np;
	f.n_nodes = (size_t)r->nm;
	m.body_case = COMMPB__PEER_MSG__BODY_FORMED;
	m.formed = &f;
	for (int i = 0; i < r->nm; i++) {
		f.self = (uint32_t)i;
		peer_send(r->m[i].p, &m);
	}
	log_info("job %s: formed by the root over %d node%s, %d ranks", r->name, r->nm,
		 r->nm == 1 ? "" : "s", r->world);
	free(nodes);
	free(np);
}

static void root_join(struct peer *p, const Commpb__PeerJoin *jn)
{
	struct rjob *r;
	int i, total = 0, *ranks;

	if (!*jn->job || strlen(jn->job) > JOB_NAME_MAX) {
		send_fail(p, "", 0, jn->slot, COMM_ERR_INVALID_ARG,
			  "join: a job name of %zu bytes from node %s (1..%d)", strlen(jn->job),
			  p->node, JOB_NAME_MAX);
		return;
	}
	if (jn->world_size < 1 || jn->world_size > WORLD_MAX) {
		send_fail(p, jn->job, 0, jn->slot, COMM_ERR_INVALID_ARG,
			  "join: job %s from node %s: world size %d (1..%d)", jn->job, p->node,
			  jn->world_size, WORLD_MAX);
		return;
	}
	if (jn->token.len > TOKEN_MAX || jn->n_ranks > (size_t)jn->world_size) {
		send_fail(p, jn->job, 0, jn->slot, COMM_ERR_INVALID_ARG,
			  "join: job %s from node %s: %zu ranks in a world of %d, a token of %zu "
			  "bytes (%d at most)",
			  jn->job, p->node, jn->n_ranks, jn->world_size, jn->token.len, TOKEN_MAX);
		return;
	}
	if (!(r = rjob_forming(jn->job, jn->uid))) {
		int forming = 0;

		TAILQ_FOREACH(r, &P.rjobs, link)
			forming += !r->key && rjob_member(r, p, -1) >= 0;
		if ((uint32_t)forming >= srv.lim.conns) {
			send_fail(p, jn->job, 0, jn->slot, COMM_ERR_NO_MEMORY,
				  "join: node %s has %d jobs forming at the root already "
				  "(max-connections)",
				  p->node, forming);
			return;
		}
		if (!(r = calloc(1, sizeof *r))) {
			send_fail(p, jn->job, 0, jn->slot, COMM_ERR_NO_MEMORY,
				  "join: the root ran out of memory");
			return;
		}
		snprintf(r->name, sizeof r->name, "%s", jn->job);
		if (jn->token.len)
			memcpy(r->token, jn->token.data, jn->token.len);
		r->token_len = jn->token.len;
		r->world = jn->world_size;
		r->uid = jn->uid;
		r->timeout_ms = jn->timeout_ms ? jn->timeout_ms : srv.default_timeout_ms;
		if (r->timeout_ms > TIMEOUT_MAX_MS)
			r->timeout_ms = TIMEOUT_MAX_MS;
		r->created_ms = now_ms();
		TAILQ_INSERT_TAIL(&P.rjobs, r, link);
		log_info("job %s: forming at the root, %d ranks", r->name, r->world);
	}
	if (!const_time_eq(r->token, r->token_len, jn->token.data, jn->token.len)) {
		send_fail(p, jn->job, 0, jn->slot, COMM_ERR_PERMISSION,
			  "join: job %s: permission denied by the root daemon", jn->job);
		return;
	}
	if (r->world != jn->world_size) {
		send_fail(p, jn->job, 0, jn->slot, COMM_ERR_INVALID_ARG,
			  "join: job %s: world size %d differs from the root's %d", jn->job,
			  jn->world_size, r->world);
		return;
	}
	if ((i = rjob_member(r, p, jn->slot)) < 0) {
		struct rmember *nm = realloc(r->m, (size_t)(r->nm + 1) * sizeof *nm);

		if (!nm || r->nm >= 256) {
			if (nm)
				r->m = nm;
			send_fail(p, jn->job, 0, jn->slot, COMM_ERR_NO_MEMORY,
				  "join: too many nodes (256 at most)");
			return;
		}
		r->m = nm;
		i = r->nm++;
		memset(&r->m[i], 0, sizeof r->m[i]);
		r->m[i].p = p;
	}
	if (!(ranks = malloc((jn->n_ranks + 1) * sizeof *ranks))) {
		rjob_fail(r, NULL, COMM_ERR_NO_MEMORY, "join: the root ran out of memory");
		return;
	}
	for (size_t k = 0; k < jn->n_ranks; k++)
		ranks[k] = jn->ranks[k];
	qsort(ranks, jn->n_ranks, sizeof *ranks, cmp_int);
	free(r->m[i].ranks);
	r->m[i].ranks = ranks;
	r->m[i].nranks = (int)jn->n_ranks;
	r->m[i].slot = jn->slot;
	if (!r->m[i].nranks) {
		rjob_drop_member(r, i);
		return;
	}
	for (int a = 0; a < r->nm; a++) {
		for (int k = 0; k < r->m[a].nranks; k++) {
			int rk = r->m[a].ranks[k];

			if (rk < 0 || rk >= r->world || (k && r->m[a].ranks[k - 1] == rk)) {
				rjob_fail(r, NULL, COMM_ERR_INVALID_ARG, "join: node %s sent rank %d",
					  r->m[a].p->node, rk);
				return;
			}
			for (int b = a + 1; b < r->nm; b++)
				if (bsearch(&rk, r->m[b].ranks, (size_t)r->m[b].nranks, sizeof(int),
					    cmp_int)) {
					rjob_fail(r, NULL, COMM_ERR_INVALID_ARG,
						  "join: job %s: rank %d joined on node %s and on node %s",
						  r->name, rk, r->m[a].p->node, r->m[b].p->node);
					return;
				}
		}
		total += r->m[a].nranks;
	}
	if (total == r->world)
		rjob_form(r);
}

static void root_msg(struct peer *p, const Commpb__PeerMsg *m)
{
	struct rjob *r;
	int i;

	switch (m->body_case) {
	case COMMPB__PEER_MSG__BODY_JOIN:
		root_join(p, m->join);
		break;
	case COMMPB__PEER_MSG__BODY_FAIL:
		if ((r = rjob_of(p, m->fail->key, m->fail->slot, &i)))
			rjob_fail(r, p, (comm_result_t)m->fail->status, "%s", m->fail->detail);
		else
			drop_stale(p, "fail", m->fail->job, m->fail->key, m->fail->slot);
		break;
	case COMMPB__PEER_MSG__BODY_RANK_LEFT:
		if (m->rank_left->key && (r = rjob_of(p, m->rank_left->key, 0, &i))) {
			Commpb__PeerMsg out = *m;

			for (i = 0; i < r->nm; i++)
				if (r->m[i].p != p)
					peer_send(r->m[i].p, &out);
		} else {
			drop_stale(p, "rank-left", "", m->rank_left->key, 0);
		}
		break;
	case COMMPB__PEER_MSG__BODY_LEAVE:
		if ((r = rjob_of(p, m->leave->key, m->leave->slot, &i)))
			rjob_drop_member(r, i);
		else
			drop_stale(p, "leave", m->leave->job, m->leave->key, m->leave->slot);
		break;
	default:
		peer_lost(p, "unexpected message %d from a member", (int)m->body_case);
		break;
	}
}

/* --- the member's side ------------------------------------------------------------- */

/* Our job the root names: by its key once formed, else by our slot for it. */
static struct job *member_job(const struct peer *p, uint64_t key, uint32_t slot)
{
	struct job *j;

	TAILQ_FOREACH(j, &srv.jobs, link)
		if (j->dist && j->dist->peer == p &&
		    (key ? j->dist->key == key : !j->dist->key && j->dist->slot == slot))
			return j;
	return NULL;
}

static void dist_free_tables(struct dist *d, int world)
{
	for (int r = 0; r < world; r++) {
		if (d->sent)
			free(d->sent[r]);
		if (d->rcvd)
			free(d->rcvd[r]);
	}
	free(d->sent);
	free(d->rcvd);
	for (int i = 0; i < d->nnodes; i++) {
		free(d->nodes[i].ucx);
		free(d->nodes[i].ranks);
	}
	free(d->nodes);
	d->nodes = NULL;
	d->nnodes = 0;
}

static void member_formed(struct job *j, const Commpb__PeerFormed *f)
{
	struct dist *d = j->dist;
	int self = (int)f->self, n = (int)f->n_nodes, count = 0;

	d->key = f->key; /* a failure from here on names the formed job */
	if (f->n_nodes < 1 || f->n_nodes > 256 || f->self >= f->n_nodes || j->state != JOB_FORMING) {
		job_fail(j, COMM_ERR_PROTOCOL, "join: the root sent a bad table");
		return;
	}
	if (!(d->nodes = calloc((size_t)n, sizeof *d->nodes))) {
		job_fail(j, COMM_ERR_NO_MEMORY, "join: out of memory");
		return;
	}
	d->nnodes = n;
	for (int r = 0; r < j->world; r++)
		d->node_of[r] = -1;
	for (int i = 0; i < n; i++) {
		const Commpb__PeerNode *pn = f->nodes[i];
		struct dist_node *dn = &d->nodes[i];

		snprintf(dn->name, sizeof dn->name, "%s", pn->node);
		dn->slot = pn->slot;
		if (n > 1 && !pn->ucx_address.len) {
			job_fail(j, COMM_ERR_PROTOCOL, "join: node %.100s has no UCX address", pn->node);
			return;
		}
		if (!pn->n_ranks) { /* the root drops a member whose ranks all left */
			job_fail(j, COMM_ERR_PROTOCOL, "join: the root sent a bad table");
			return;
		}
		dn->ucx = malloc(pn->ucx_address.len + 1);
		dn->ranks = malloc((pn->n_ranks + 1) * sizeof *dn->ranks);
		if (!dn->ucx || !dn->ranks) {
			job_fail(j, COMM_ERR_NO_MEMORY, "join: out of memory");
			return;
		}
		if (pn->ucx_address.len)
			memcpy(dn->ucx, pn->ucx_address.data, pn->ucx_address.len);
		dn->ucx_len = pn->ucx_address.len;
		dn->nranks = (int)pn->n_ranks;
		for (size_t k = 0; k < pn->n_ranks; k++) {
			int r = pn->ranks[k];

			if (r < 0 || r >= j->world || d->node_of[r] >= 0) {
				job_fail(j, COMM_ERR_PROTOCOL, "join: the root sent a bad table");
				return;
			}
			d->node_of[r] = i;
			dn->ranks[k] = r;
			count++;
		}
	}
	if (count != j->world) {
		job_fail(j, COMM_ERR_PROTOCOL, "join: the root's table has %d of %d ranks", count,
			 j->world);
		return;
	}
	d->self = self;
	if (!(d->sent = calloc((size_t)j->world, sizeof *d->sent)) ||
	    !(d->rcvd = calloc((size_t)j->world, sizeof *d->rcvd))) {
		job_fail(j, COMM_ERR_NO_MEMORY, "join: out of memory");
		return;
	}
	for (int r = 0; r < j->world; r++) {
		if (d->node_of[r] != self)
			continue;
		if (!(d->sent[r] = calloc((size_t)j->world, sizeof **d->sent)) ||
		    !(d->rcvd[r] = calloc((size_t)j->world, sizeof **d->rcvd))) {
			job_fail(j, COMM_ERR_NO_MEMORY, "join: out of memory");
			return;
		}
	}
	for (int r = 0; r < j->world; r++) {
		if ((d->node_of[r] == self) != (j->ranks[r] != NULL)) {
			job_fail(j, COMM_ERR_PEER_LOST, "join: rank %d %s", r,
				 j->ranks[r] ? "is here, but the root placed it elsewhere"
					     : "left before the job formed");
			return;
		}
	}
	if (n > 1 && !net_available()) {
		job_fail(j, COMM_ERR_UNSUPPORTED,
			 "join: the job spans %d daemons, and this commd has no UCX data plane (%s)",
			 n, net_why());
		return;
	}
	j->state = JOB_READY;
	log_info("job %s: formed by root %s: node %d of %d (%s)", j->name, d->root, self + 1, n,
		 P.node);
	job_announce(j);
}

static void member_msg(struct peer *p, const Commpb__PeerMsg *m)
{
	struct job *j;

	switch (m->body_case) {
	case COMMPB__PEER_MSG__BODY_FORMED: {
		const Commpb__PeerFormed *f = m->formed;
		uint32_t slot = f->self < f->n_nodes ? f->nodes[f->self]->slot : 0;

		if (f->self < f->n_nodes && (j = member_job(p, 0, slot)))
			member_formed(j, f);
		else
			drop_stale(p, "formed", f->job, f->key, slot);
		break;
	}
	case COMMPB__PEER_MSG__BODY_FAIL:
		if ((j = member_job(p, m->fail->key, m->fail->slot))) {
			comm_result_t code = (comm_result_t)m->fail->status;

			if (code <= COMM_OK || code >= COMM_INPROGRESS)
				code = COMM_ERR_PEER_LOST;
			j->dist->remote = 1;
			job_fail(j, code, "%s", m->fail->detail);
		} else {
			drop_stale(p, "fail", m->fail->job, m->fail->key, m->fail->slot);
		}
		break;
	case COMMPB__PEER_MSG__BODY_RANK_LEFT: {
		const Commpb__PeerRankLeft *rl = m->rank_left;

		if (!rl->key || !(j = member_job(p, rl->key, 0))) {
			drop_stale(p, "rank-left", "", rl->key, 0);
			break;
		}
		if (j->state == JOB_READY && rl->rank >= 0 && rl->rank < j->world &&
		    !j->left[rl->rank] && !j->ranks[rl->rank]) {
			if (!j->nleft++)
				snprintf(j->left_detail, sizeof j->left_detail, "%s", rl->detail);
			j->left[rl->rank] = 1;
			/* a collective the rank never reached cannot finish */
			if (j->running && j->running->net && j->running->peer < 0 &&
			    j->running->cseq > rl->collectives)
				net_task_cancel(j->running, COMM_ERR_PEER_LOST, rl->detail);
			/* recvs from it wait for what it sent (unknown: none) */
			if (rl->n_sent == (size_t)j->world &&
			    (j->dist->sent[rl->rank] = calloc((size_t)j->world, sizeof **j->dist->sent)))
				memcpy(j->dist->sent[rl->rank], rl->sent,
				       (size_t)j->world * sizeof **j->dist->sent);
			engine_rank_left(j, rl->rank);
		}
		break;
	}
	default:
		peer_lost(p, "unexpected message %d from a root", (int)m->body_case);
		break;
	}
}

/* --- both ---------------------------------------------------------------------------- */

static void peer_msg(struct peer *p, const Commpb__PeerMsg *m)
{
	p->last_rx_ms = now_ms();
	if (p->state == P_HELLO) {
		const Commpb__PeerHello *h = m->hello;

		if (m->body_case != COMMPB__PEER_MSG__BODY_HELLO) {
			peer_lost(p, "the first message was not a hello");
			return;
		}
		if (h->version != PEER_VERSION) {
			peer_lost(p, "it speaks peer protocol %u, we speak %d", h->version,
				  PEER_VERSION);
			return;
		}
		snprintf(p->node, sizeof p->node, "%.120s", *h->node ? h->node : p->addr);
		if (!(p->ucx = malloc(h->ucx_address.len + 1))) {
			peer_lost(p, "out of memory");
			return;
		}
		if (h->ucx_address.len)
			memcpy(p->ucx, h->ucx_address.data, h->ucx_address.len);
		p->ucx_len = h->ucx_address.len;
		peer_up(p);
		return;
	}
	switch (m->body_case) {
	case COMMPB__PEER_MSG__BODY_PING: {
		Commpb__PeerMsg out = COMMPB__PEER_MSG__INIT;
		Commpb__PeerPong pong = COMMPB__PEER_PONG__INIT;

		pong.sent_us = m->ping->sent_us;
		out.body_case = COMMPB__PEER_MSG__BODY_PONG;
		out.pong = &pong;
		peer_send(p, &out);
		return;
	}
	case COMMPB__PEER_MSG__BODY_PONG: {
		uint64_t now = now_us();

		if (m->pong->sent_us <= now)
			p->rtt_us = (uint32_t)(now - m->pong->sent_us);
		return;
	}
	case COMMPB__PEER_MSG__BODY_HELLO:
		peer_lost(p, "a second hello");
		return;
	default:
		break;
	}
	if (p->outgoing)
		member_msg(p, m);
	else
		root_msg(p, m);
}

static void on_read(uv_stream_t *s, ssize_t n, const uv_buf_t *buf)
{
	struct peer *p = s->data;
	size_t off = 0;

	(void)buf;
	if (n < 0) {
		peer_lost(p, "%s", n == UV_EOF ? "connection closed" : uv_strerror((int)n));
		return;
	}
	p->rlen += (size_t)n;
	while (p->state != P_LOST && p->rlen - off >= 4) {
		const uint8_t *h = p->rbuf + off;
		size_t len = h[0] | (size_t)h[1] << 8 | (size_t)h[2] << 16 | (size_t)h[3] << 24;
		Commpb__PeerMsg *m;

		if (len > PEER_FRAME_MAX) {
			peer_lost(p, "a frame of %zu bytes", len);
			return;
		}
		if (p->rlen - off - 4 < len)
			break;
		m = commpb__peer_msg__unpack(NULL, len, h + 4);
		off += 4 + len;
		if (!m) {
			peer_lost(p, "a frame that does not unpack");
			return;
		}
		peer_msg(p, m);
		commpb__peer_msg__free_unpacked(m, NULL);
	}
	if (p->state == P_LOST)
		return;
	memmove(p->rbuf, p->rbuf + off, p->rlen - off);
	p->rlen -= off;
}

static void peer_lost(struct peer *p, const char *fmt, ...)
{
	int unreached = p->state == P_CONNECTING;
	char detail[256];
	struct rjob *r, *rt;
	struct job *j, *jt;
	va_list ap;

	if (p->state == P_LOST)
		return;
	va_start(ap, fmt);
	vsnprintf(p->why, sizeof p->why, fmt, ap);
	va_end(ap);
	p->state = P_LOST;
	p->since_ms = now_ms();
	if (stranger(p))
		log_info("peer listener: %s dropped before a hello was accepted: %s", p->addr, p->why);
	else
		log_info("peer %s (%s): lost: %s", *p->node ? p->node : "?", p->addr, p->why);
	if (p->ucx_len)
		net_peer_lost(p->ucx, p->ucx_len);
	if (p->handle_open) {
		uv_read_stop((uv_stream_t *)&p->tcp);
		uv_close((uv_handle_t *)&p->tcp, on_closed);
	}
	/* its jobs fail; a root tells the other members */
	TAILQ_FOREACH_SAFE(r, &P.rjobs, link, rt) {
		int i = rjob_member(r, p, -1);

		if (i < 0)
			continue;
		rjob_fail(r, p, COMM_ERR_PEER_LOST, "node %s (%s) lost: %s", p->node, p->addr, p->why);
		rjob_drop_member(r, i);
	}
	snprintf(detail, sizeof detail, "root daemon %.80s %s: %.140s", p->addr,
		 unreached ? "unreachable" : "lost", p->why);
	TAILQ_FOREACH_SAFE(j, &srv.jobs, link, jt) {
		if (!j->dist || j->dist->peer != p)
			continue;
		j->dist->peer = NULL;
		j->dist->remote = 1;
		job_fail(j, unreached ? COMM_ERR_DAEMON_UNREACHABLE : COMM_ERR_PEER_LOST, "%s", detail);
	}
}

/* --- what jobs ask ---------------------------------------------------------------------- */

comm_result_t peer_job_new(struct job *j, const char *root, char *err, size_t errlen)
{
	struct dist *d = calloc(1, sizeof *d);
	comm_result_t rc;

	if (!d || !(d->node_of = calloc((size_t)j->world, sizeof *d->node_of))) {
		free(d);
		snprintf(err, errlen, "join: out of memory");
		return COMM_ERR_NO_MEMORY;
	}
	snprintf(d->root, sizeof d->root, "%s", root);
	d->slot = net_slot_alloc();
	d->slot_freed = !d->slot; /* 0: none taken, none to give back */
	j->dist = d;
	if (!d->slot && net_available()) {
		snprintf(err, errlen, "join: all %d tag slots of the data plane are in use", 65535);
		return COMM_ERR_BUSY;
	}
	/* no data plane (a job on this node alone): a number past the slots names it */
	if (!d->slot)
		d->slot = 65536 + P.untagged++ % 0x7fff0000u;
	if (!(d->peer = peer_to_root(root, &rc, err, errlen)))
		return rc;
	return COMM_OK;
}

void peer_job_update(struct job *j)
{
	Commpb__PeerMsg m = COMMPB__PEER_MSG__INIT;
	Commpb__PeerJoin jn = COMMPB__PEER_JOIN__INIT;
	int32_t ranks[WORLD_MAX];
	size_t n = 0;

	if (!j->dist || !j->dist->peer || j->state != JOB_FORMING)
		return;
	for (int r = 0; r < j->world; r++)
		if (j->ranks[r])
			ranks[n++] = r;
	jn.job = j->name;
	jn.token.data = j->token;
	jn.token.len = j->token_len;
	jn.world_size = j->world;
	jn.timeout_ms = j->join_timeout_ms; /* the root's deadline for forming it */
	jn.ranks = ranks;
	jn.n_ranks = n;
	jn.slot = j->dist->slot;
	jn.uid = (uint32_t)j->uid;
	m.body_case = COMMPB__PEER_MSG__BODY_JOIN;
	m.join = &jn;
	peer_send(j->dist->peer, &m);
}

void peer_job_failed(struct job *j)
{
	struct dist *d = j->dist;

	if (!d || d->remote || !d->peer)
		return;
	send_fail(d->peer, j->name, d->key, d->slot, j->fail_code, "%s", j->fail_detail);
}

void peer_rank_left(struct job *j, int r)
{
	Commpb__PeerMsg m = COMMPB__PEER_MSG__INIT;
	Commpb__PeerRankLeft rl = COMMPB__PEER_RANK_LEFT__INIT;

	if (!j->dist || !j->dist->peer || !j->dist->key)
		return;
	rl.key = j->dist->key;
	rl.rank = r;
	rl.detail = j->left_detail;
	rl.collectives = j->next_cseq[r] - 1;
	rl.n_sent = (size_t)j->world;
	rl.sent = j->dist->sent[r];
	m.body_case = COMMPB__PEER_MSG__BODY_RANK_LEFT;
	m.rank_left = &rl;
	peer_send(j->dist->peer, &m);
}

void peer_job_gone(struct job *j)
{
	Commpb__PeerMsg m = COMMPB__PEER_MSG__INIT;
	Commpb__PeerLeave lv = COMMPB__PEER_LEAVE__INIT;
	struct dist *d = j->dist;

	if (!d)
		return;
	if (d->peer) {
		lv.job = j->name;
		lv.key = d->key;
		lv.slot = d->slot;
		m.body_case = COMMPB__PEER_MSG__BODY_LEAVE;
		m.leave = &lv;
		peer_send(d->peer, &m);
	}
	if (!d->slot_freed)
		net_slot_free(d->slot);
	dist_free_tables(d, j->world);
	free(d->node_of);
	free(d);
	j->dist = NULL;
}

int dist_local(const struct job *j, int r)
{
	return !j->dist || !j->dist->nodes || j->dist->node_of[r] == j->dist->self;
}

int dist_spans(const struct job *j)
{
	return j->dist && j->dist->nnodes > 1;
}

/* --- the listener, the tick and status ------------------------------------------------ */

int peer_start(uv_loop_t *loop, const char *listen_addr)
{
	struct addrinfo hints = { .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM,
				  .ai_flags = AI_PASSIVE | AI_NUMERICSERV };
	char host[256], port[8], hn[64] = "localhost";
	struct addrinfo *ai = NULL;
	int rc;

	P.loop = loop;
	gethostname(hn, sizeof hn - 1);
	if (!*listen_addr) {
		snprintf(P.node, sizeof P.node, "%s[%d]", hn, (int)getpid());
		return 0;
	}
	if (split_addr(listen_addr, host, sizeof host, port, sizeof port) < 0) {
		log_error("peer-listen '%s' is not host:port", listen_addr);
		return -1;
	}
	if ((rc = getaddrinfo(host, port, &hints, &ai)) != 0) {
		log_error("peer-listen %s: %s", listen_addr, gai_strerror(rc));
		return -1;
	}
	uv_tcp_init(loop, &P.listener);
	rc = uv_tcp_bind(&P.listener, ai->ai_addr, 0);
	freeaddrinfo(ai);
	if (rc == 0)
		rc = uv_listen((uv_stream_t *)&P.listener, 128, on_accept);
	if (rc < 0) {
		log_error("peer-listen %s: %s", listen_addr, uv_strerror(rc));
		uv_close((uv_handle_t *)&P.listener, NULL);
		return -1;
	}
	P.listening = 1;
	if (!strcmp(port, "0")) {
		/* port 0: the kernel's choice, which status then shows */
		struct sockaddr_storage ss;
		int len = sizeof ss;

		if (uv_tcp_getsockname(&P.listener, (struct sockaddr *)&ss, &len) == 0)
			snprintf(port, sizeof port, "%d",
				 ntohs(ss.ss_family == AF_INET6
					       ? ((struct sockaddr_in6 *)&ss)->sin6_port
					       : ((struct sockaddr_in *)&ss)->sin_port));
	}
	snprintf(P.listen_addr, sizeof P.listen_addr, "%s%.200s%s:%s", strchr(host, ':') ? "[" : "",
		 host, strchr(host, ':') ? "]" : "", port);
	snprintf(P.node, sizeof P.node, "%s:%s", hn, port);
	log_info("peer listener on %s (node %s)", P.listen_addr, P.node);
	return 0;
}

void peer_stop(void)
{
	struct peer *p;

	if (P.listening) {
		uv_close((uv_handle_t *)&P.listener, NULL);
		P.listening = 0;
	}
	TAILQ_FOREACH(p, &P.peers, link)
		if (p->state != P_LOST)
			peer_lost(p, "commd is shutting down");
}

/* After the loop has stopped: free what is left. */
void peer_free_all(void)
{
	struct peer *p;
	struct rjob *r;

	while ((r = TAILQ_FIRST(&P.rjobs)))
		rjob_free(r);
	while ((p = TAILQ_FIRST(&P.peers)))
		peer_free(p);
}

void peer_tick(uint64_t now)
{
	struct peer *p, *pt;
	struct rjob *r, *rt;
	struct job *j;

	TAILQ_FOREACH_SAFE(p, &P.peers, link, pt) {
		if (*p->broken && p->state != P_LOST)
			peer_lost(p, "%s", p->broken);
		switch (p->state) {
		case P_CONNECTING:
			if (now - p->since_ms >= CONNECT_MS)
				peer_lost(p, "no connection within %d ms", CONNECT_MS);
			break;
		case P_HELLO:
		case P_UP:
			if (now - p->last_rx_ms >= PEER_DEADLINE_MS) {
				peer_lost(p, "silent for %llu ms (heartbeat every %d ms)",
					  (unsigned long long)(now - p->last_rx_ms), PING_MS);
				break;
			}
			if (p->state == P_UP && now - p->last_ping_ms >= PING_MS) {
				Commpb__PeerMsg m = COMMPB__PEER_MSG__INIT;
				Commpb__PeerPing ping = COMMPB__PEER_PING__INIT;

				ping.sent_us = now_us();
				m.body_case = COMMPB__PEER_MSG__BODY_PING;
				m.ping = &ping;
				p->last_ping_ms = now;
				peer_send(p, &m);
			}
			break;
		case P_LOST: /* kept a while for status; a stranger that never said hello is not */
			if (!p->busy && !p->handle_open &&
			    (now - p->since_ms >= LOST_KEEP_MS || stranger(p)))
				peer_free(p);
			break;
		}
	}
	/* the root decides when a job did not form; members wait a little longer */
	TAILQ_FOREACH_SAFE(r, &P.rjobs, link, rt) {
		char missing[128];
		int n = 0, count = 0;

		if (r->key || r->failed || now - r->created_ms < r->timeout_ms)
			continue;
		for (int rk = 0; rk < r->world && n < 100; rk++) {
			int found = 0;

			for (int i = 0; i < r->nm && !found; i++)
				found = bsearch(&rk, r->m[i].ranks, (size_t)r->m[i].nranks,
						sizeof(int), cmp_int) != NULL;
			if (!found) {
				n += snprintf(missing + n, sizeof missing - (size_t)n, "%s%d",
					      n ? ", " : "", rk);
				count++;
			}
		}
		rjob_fail(r, NULL, COMM_ERR_TIMEOUT, "join: rank%s %s did not join within %u ms",
			  count == 1 ? "" : "s", missing, r->timeout_ms);
	}
	TAILQ_FOREACH(j, &srv.jobs, link)
		if (j->dist && j->state == JOB_FORMING &&
		    now - j->created_ms >= (uint64_t)j->join_timeout_ms + FORM_GRACE_MS)
			job_fail(j, COMM_ERR_TIMEOUT,
				 "join: root daemon %s did not form the job within %u ms",
				 j->dist->root, j->join_timeout_ms);
}

const char *peer_listen_addr(void)
{
	return P.listen_addr;
}

int peer_status(Commpb__PeerInfo **out, int max, char (*state)[192])
{
	uint64_t now = now_ms();
	struct peer *p;
	int n = 0;

	TAILQ_FOREACH(p, &P.peers, link) {
		Commpb__PeerInfo *pi = out[n];
		struct rjob *r;
		struct job *j;
		uint32_t jobs = 0;

		if (n == max)
			break;
		if (p->state == P_LOST && stranger(p))
			continue;
		commpb__peer_info__init(pi);
		pi->node = *p->node ? p->node : (char *)"?";
		pi->address = p->addr;
		/* a root that holds ranks of its job too reaches its own listener: both ends here */
		if (*p->node && !strcmp(p->node, P.node))
			pi->role = p->outgoing ? (char *)"root(self)" : (char *)"member(self)";
		else
			pi->role = p->outgoing ? (char *)"root" : (char *)"member";
		switch (p->state) {
		case P_CONNECTING:
			snprintf(state[n], sizeof state[n], "connecting");
			break;
		case P_HELLO:
			snprintf(state[n], sizeof state[n], "handshake");
			break;
		case P_UP:
			snprintf(state[n], sizeof state[n], "up");
			break;
		case P_LOST:
			snprintf(state[n], sizeof state[n], "lost %llu s ago (%.150s)",
				 (unsigned long long)((now - p->since_ms) / 1000), p->why);
			break;
		}
		pi->state = state[n];
		pi->rtt_us = p->rtt_us;
		TAILQ_FOREACH(r, &P.rjobs, link)
			jobs += rjob_member(r, p, -1) >= 0;
		TAILQ_FOREACH(j, &srv.jobs, link)
			jobs += j->dist && j->dist->peer == p;
		pi->jobs = jobs;
		n++;
	}
	return n;
}
