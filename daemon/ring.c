/*
 * ring.c: the submission ring a rank shares with commd (common/ring.h):
 * attaching it, taking the ops the rank publishes there in seq order,
 * answering them in their slots, and waking the rank when it sleeps.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <sched.h>
#include <string.h>
#include <unistd.h>

#include "commd.h"
#include "log.h"
#include "ring.h"
#include "util.h"


/* How long commd keeps polling a ring that went quiet before it sleeps. */
#define RING_SPIN_US 100

struct ring {
	struct conn *conn;     /* NULL once the connection closed */
	struct mem *mem;       /* the segment the ring lives in; one reference */
	uint8_t *base;
	int efd;
	uv_poll_t poll;
	int hot;               /* on the poller's list: not armed */
	uint64_t last_us;      /* when it last had an op */
	TAILQ_ENTRY(ring) hot_link;
};

/* Rings with recent ops, polled on every turn of the loop instead of armed. */
static TAILQ_HEAD(, ring) hot = TAILQ_HEAD_INITIALIZER(hot);
static uv_idle_t poller;
static int poller_ready;

static void on_wake(uv_poll_t *h, int status, int events);

/* Whether fd is an eventfd (the only kind of fd a ring wakes commd with). */
static int is_eventfd(int fd)
{
	char path[64], target[64];
	ssize_t n;

	snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
	n = readlink(path, target, sizeof target - 1);
	if (n < 0)
		return 0;
	target[n] = '\0';
	return strcmp(target, "anon_inode:[eventfd]") == 0;
}

static comm_result_t attach(struct conn *c, const Commpb__RingAttach *ra, int efd, char *err,
			    size_t errlen)
{
	struct ring *r;
	struct mem *m;
	uint64_t end;

	if (c->version < 2) {
		snprintf(err, errlen, "ring attach: needs protocol 2, the connection speaks %u",
			 c->version);
		return COMM_ERR_VERSION;
	}
	if (c->ring) {
		snprintf(err, errlen, "ring attach: a ring is already attached");
		return COMM_ERR_INVALID_ARG;
	}
	if (ra->slots != RING_SLOTS || ra->slot_size != sizeof(struct ring_slot)) {
		snprintf(err, errlen, "ring attach: %u slots of %u bytes; commd takes %d of %zu",
			 ra->slots, ra->slot_size, RING_SLOTS, sizeof(struct ring_slot));
		return COMM_ERR_UNSUPPORTED;
	}
	if (!ra->ring || !(m = mem_find(c, ra->ring->mem_id))) {
		snprintf(err, errlen, "ring attach: no mem id %llu",
			 ra->ring ? (unsigned long long)ra->ring->mem_id : 0ULL);
		return COMM_ERR_NOT_FOUND;
	}
	if (m->kind != COMMPB__MEM_KIND__MEM_MEMFD) {
		snprintf(err, errlen, "ring attach: mem %llu is device memory; the ring must be in "
			 "host memory (a memfd)", (unsigned long long)m->id);
		return COMM_ERR_INVALID_ARG;
	}
	if (ra->ring->offset % 64 || __builtin_add_overflow(ra->ring->offset, RING_BYTES, &end) ||
	    end > m->size) {
		snprintf(err, errlen,
			 "ring attach: offset %llu: %zu bytes aligned to 64 do not fit mem %llu",
			 (unsigned long long)ra->ring->offset, RING_BYTES,
			 (unsigned long long)m->id);
		return COMM_ERR_INVALID_ARG;
	}
	if (!is_eventfd(efd)) {
		snprintf(err, errlen, "ring attach: the fd is not an eventfd");
		return COMM_ERR_INVALID_ARG;
	}
	if (fcntl(efd, F_SETFL, fcntl(efd, F_GETFL) | O_NONBLOCK) < 0) {
		snprintf(err, errlen, "ring attach: eventfd: %s", strerror(errno));
		return COMM_ERR_INTERNAL;
	}
	r = calloc(1, sizeof *r);
	if (!r) {
		snprintf(err, errlen, "ring attach: out of memory");
		return COMM_ERR_NO_MEMORY;
	}
	mem_ref(m);
	r->conn = c;
	r->mem = m;
	r->base = m->addr + ra->ring->offset;
	r->efd = efd;
	uv_poll_init(srv.loop, &r->poll, efd);
	r->poll.data = r;
	uv_poll_start(&r->poll, UV_READABLE, on_wake);
	c->ring = r;
	return COMM_OK;
}

int req_ring_attach_exec(struct conn *c, const Commpb__Envelope *env, int *fds, int nfds)
{
	Commpb__Envelope reply = COMMPB__ENVELOPE__INIT;
	Commpb__RingAttachReply rr = COMMPB__RING_ATTACH_REPLY__INIT;
	char err[256] = "";

	rr.status = attach(c, env->ring_attach, fds[0], err, sizeof err);
	if (rr.status != COMM_OK) {
		close(fds[0]);
		log_info("job %s rank %d: %s", c->job->name, c->rank, err);
	}
	rr.detail = err;
	reply.id = env->id;
	reply.body_case = COMMPB__ENVELOPE__BODY_RING_ATTACH_REPLY;
	reply.ring_attach_reply = &rr;
	conn_send(c, &reply);
	if (rr.status == COMM_OK)
		ring_drain(c);
	return 0;
}

/* Post the op in slot s, copied out first: the rank may change it under us. */
static int take(struct conn *c, const struct ring_slot *s)
{
	struct ring_slot o;
	Commpb__Op op = COMMPB__OP__INIT;
	Commpb__BufRef send = COMMPB__BUF_REF__INIT, recv = COMMPB__BUF_REF__INIT;
	Commpb__BufRef done = COMMPB__BUF_REF__INIT;

	memcpy(&o, s, offsetof(struct ring_slot, pad0));
	op.seq = o.seq;
	op.type = (Commpb__OpType)o.type;
	send.mem_id = o.send_mem;
	send.offset = o.send_off;
	recv.mem_id = o.recv_mem;
	recv.offset = o.recv_off;
	op.send = &send;
	op.recv = &recv;
	op.count = o.count;
	op.dtype = o.dtype;
	op.redop = o.redop;
	op.root = o.root;
	op.peer = o.peer;
	op.group = o.group;
	op.group_last = (o.flags & RING_F_GROUP_LAST) != 0;
	if (o.flags & RING_F_EVENT) {
		op.ready_event.data = o.ready_event;
		op.ready_event.len = sizeof o.ready_event;
	}
	if (o.flags & RING_F_DONE) {
		done.mem_id = o.done_mem;
		done.offset = o.done_off;
		op.done = &done;
		op.done_value = o.done_value;
	}
	return op_post(c, &op, 0, 1);
}

/* Post what the ring holds in seq order; the number of ops taken. */
static int drain(struct conn *c)
{
	int taken = 0;

	for (;;) {
		struct ring *r = c->ring;
		struct ring_slot *s;
		uint64_t seq;

		if (!r || c->closing || c->doomed || !c->job)
			return taken;
		seq = c->job->next_post[c->rank];
		s = ring_slot(r->base, seq);
		if (RING_LOAD(&s->posted) != seq + 1)
			return taken;
		if (take(c, s) < 0)
			return taken;
		taken++;
	}
}

/* Sleep on r's eventfd: arm, then look once more (see ring.h). 1 if there is work. */
static int arm(struct ring *r)
{
	struct ring_hdr *h = (struct ring_hdr *)r->base;
	uint64_t seq = r->conn->job->next_post[r->conn->rank];

	RING_STORE_SC(&h->daemon_armed, 1);
	if (RING_LOAD_SC(&ring_slot(r->base, seq)->posted) != seq + 1)
		return 0;
	RING_STORE(&h->daemon_armed, 0);
	return 1;
}

static void on_poll(uv_idle_t *h);

static void heat(struct ring *r)
{
	r->last_us = now_us();
	if (r->hot)
		return;
	r->hot = 1;
	TAILQ_INSERT_TAIL(&hot, r, hot_link);
	if (!poller_ready) {
		uv_idle_init(srv.loop, &poller);
		poller_ready = 1;
	}
	uv_idle_start(&poller, on_poll);
}

static void cool(struct ring *r)
{
	if (!r->hot)
		return;
	r->hot = 0;
	TAILQ_REMOVE(&hot, r, hot_link);
	if (TAILQ_EMPTY(&hot) && poller_ready)
		uv_idle_stop(&poller);
}

/*
 * The poller: while some ring had an op in the last RING_SPIN_US, the loop
 * does not sleep; it looks at those rings every turn and yields the CPU in
 * between, so a rank's next op is taken without a wake-up.
 */
static void on_poll(uv_idle_t *h)
{
	struct ring *r, *tmp;
	uint64_t now = now_us();

	TAILQ_FOREACH_SAFE(r, &hot, hot_link, tmp) {
		if (drain(r->conn) > 0)
			r->last_us = now;
		else if (!r->conn || !r->conn->job || r->conn->closing)
			cool(r); /* it left or was closed: nothing more to take */
		else if (now - r->last_us > RING_SPIN_US && !arm(r))
			cool(r);
	}
	if (!TAILQ_EMPTY(&hot))
		sched_yield();
}

void ring_drain(struct conn *c)
{
	struct ring *r = c->ring;

	if (!r)
		return;
	if (drain(c) > 0 || r->hot) {
		if (c->ring == r && !c->closing)
			heat(r);
		return;
	}
	if (c->ring == r && !c->closing && !c->doomed && c->job && arm(r))
		heat(r);
}

static void on_wake(uv_poll_t *h, int status, int events)
{
	struct ring *r = h->data;
	uint64_t n;

	if (!r->conn)
		return;
	/* reset the count; a failed read only means another wake-up already did */
	if (read(r->efd, &n, sizeof n) < 0 && errno != EAGAIN)
		log_debug("conn %llu: ring eventfd: %s", (unsigned long long)r->conn->id,
			  strerror(errno));
	ring_drain(r->conn);
}

void ring_answer(struct conn *c, uint64_t seq, comm_result_t code, const char *detail)
{
	struct ring *r = c->ring;
	struct ring_slot *s;
	struct ring_hdr *h;

	if (!r)
		return;
	h = (struct ring_hdr *)r->base;
	s = ring_slot(r->base, seq);
	s->status = code;
	snprintf(s->detail, sizeof s->detail, "%s", detail ? detail : "");
	RING_STORE_SC(&s->done, seq + 1);
	if (RING_LOAD_SC(&h->rank_sleeping)) {
		Commpb__Envelope env = COMMPB__ENVELOPE__INIT;
		Commpb__OpDone done = COMMPB__OP_DONE__INIT;

		done.seq = seq;
		done.status = code;
		done.detail = (char *)(detail ? detail : "");
		env.body_case = COMMPB__ENVELOPE__BODY_OP_DONE;
		env.op_done = &done;
		conn_send(c, &env);
	}
}

static void on_closed(uv_handle_t *h)
{
	struct ring *r = h->data;

	close(r->efd);
	free(r);
}

void ring_close(struct conn *c)
{
	struct ring *r = c->ring;

	if (!r)
		return;
	c->ring = NULL;
	r->conn = NULL;
	cool(r);
	mem_unref(r->mem);
	uv_close((uv_handle_t *)&r->poll, on_closed);
}

void ring_stop(void)
{
	if (poller_ready)
		uv_close((uv_handle_t *)&poller, NULL);
	poller_ready = 0;
}
