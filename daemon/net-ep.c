/*
 * net-ep.c: the data plane's endpoints to other daemons (made once, shared
 * by jobs, closed gently or by force), its cache of staging buffers, and a
 * task's UCX requests: posting sends and receives, and reaping them.
 */
#include <config.h>

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "net-int.h"

#ifdef HAVE_UCX
/* --- endpoints ------------------------------------------------------------------ */

static void on_ep_error(void *arg, ucp_ep_h ep, ucs_status_t status)
{
	struct nep *e = arg;

	(void)ep;
	e->dead = e->failed = 1;
	snprintf(e->why, sizeof e->why, "%s", ucs_status_string(status));
	log_info("net: endpoint to a peer failed: %s", e->why);
}

struct nep *ep_get(const uint8_t *addr, size_t len, char *err, size_t errlen)
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
void eps_prune(void)
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
void ep_kill(struct nep *e, const char *why)
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
void ep_close_release(struct nep *e)
{
	ucp_request_free(e->closing);
	e->closing = NULL;
	e->ep = NULL;
}

/* Whether e's flush close is under way still; released once it ended. */
int ep_closing(struct nep *e)
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
void close_failed_eps(void)
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
void *buf_get(size_t size, size_t *cap)
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

void buf_put(void *p, size_t cap)
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

void buf_trim(void)
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

void fail(struct net_task *nt, comm_result_t code, const char *fmt, ...)
{
	va_list ap;

	if (nt->status != COMM_OK)
		return;
	nt->status = code;
	va_start(ap, fmt);
	vsnprintf(nt->detail, sizeof nt->detail, fmt, ap);
	va_end(ap);
}

const char *node_name(const struct net_task *nt, int k)
{
	return nt->d->nodes[k].name;
}

void post_send(struct net_task *nt, int k, uint64_t tag, const void *buf, size_t len)
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

void show(struct net_task *nt, int what)
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
void post_recv_any(struct net_task *nt, int k, uint64_t tag, void *buf, size_t len,
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

void post_recv(struct net_task *nt, int k, uint64_t tag, void *buf, size_t len)
{
	post_recv_any(nt, k, tag, buf, len, len, NULL);
}

/* A ring chunk's request ended: its slot holds the chunk, or its hop's send of it is done. */
void ring_ended(struct net_task *nt, int recv, int id)
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
int reap(struct net_task *nt)
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

#endif
