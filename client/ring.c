/*
 * ring.c: the rank's side of the submission ring (common/ring.h): attach it
 * at join, post ops in it, collect the answers commd writes there, and wait
 * for them by spinning briefly, then sleeping on the socket.
 */
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "comm-int.h"
#include "ring.h"
#include "util.h"


#define SPIN_US_DEFAULT 200

/* COMM_RING=0 keeps every op on the socket; COMM_SPIN_US bounds the spinning. */
static void read_env(comm_t *c)
{
	const char *v = getenv("COMM_SPIN_US");
	long n;

	c->spin_us = SPIN_US_DEFAULT;
	if (v && parse_long_in(v, 0, 1000000, &n) == 0)
		c->spin_us = (int)n;
}

void ring_attach(comm_t *c)
{
	Commpb__Envelope env = COMMPB__ENVELOPE__INIT, *reply = NULL;
	Commpb__RingAttach ra = COMMPB__RING_ATTACH__INIT;
	Commpb__BufRef ref = COMMPB__BUF_REF__INIT;
	const char *v = getenv("COMM_RING");
	struct ring_hdr *h;
	void *ring;
	int efd;

	read_env(c);
	if ((v && !strcmp(v, "0")) || c->version < 2)
		return;
	ring = comm_mem_alloc(c, RING_BYTES);
	if (!ring)
		return;
	memset(ring, 0, RING_BYTES);
	h = ring;
	h->magic = RING_MAGIC;
	h->version = RING_VERSION;
	h->nslots = RING_SLOTS;
	h->slot_size = sizeof(struct ring_slot);
	efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (efd < 0 || mem_lookup(c, ring, RING_BYTES, &ref.mem_id, &ref.offset) != 1)
		goto fail;
	ra.ring = &ref;
	ra.slots = RING_SLOTS;
	ra.slot_size = sizeof(struct ring_slot);
	env.body_case = COMMPB__ENVELOPE__BODY_RING_ATTACH;
	env.ring_attach = &ra;
	/* a daemon without rings (or that refuses this one): the socket serves */
	if (comm_call(c, &env, &efd, 1, &reply) != COMM_OK ||
	    reply->body_case != COMMPB__ENVELOPE__BODY_RING_ATTACH_REPLY ||
	    reply->ring_attach_reply->status != COMM_OK)
		goto fail;
	commpb__envelope__free_unpacked(reply, NULL);
	c->ring = ring;
	c->ring_efd = efd;
	return;
fail:
	if (reply)
		commpb__envelope__free_unpacked(reply, NULL);
	if (efd >= 0)
		close(efd);
	comm_mem_free(c, ring);
}

void ring_detach(comm_t *c)
{
	if (c->ring_efd >= 0)
		close(c->ring_efd);
	c->ring_efd = -1;
	c->ring = NULL;
}

int ring_post(comm_t *c, const Commpb__Op *op, comm_request_t *r)
{
	struct ring_hdr *h = c->ring;
	struct ring_slot *s;
	uint64_t one = 1;

	if (!h || c->ring_busy[op->seq % RING_SLOTS])
		return 0;
	s = ring_slot(h, op->seq);
	s->seq = op->seq;
	s->group = op->group;
	s->count = op->count;
	s->send_mem = op->send->mem_id;
	s->send_off = op->send->offset;
	s->recv_mem = op->recv->mem_id;
	s->recv_off = op->recv->offset;
	s->type = (uint32_t)op->type;
	s->dtype = op->dtype;
	s->redop = op->redop;
	s->flags = op->group_last ? RING_F_GROUP_LAST : 0;
	s->root = op->root;
	s->peer = op->peer;
	if (op->ready_event.len == sizeof s->ready_event) {
		memcpy(s->ready_event, op->ready_event.data, sizeof s->ready_event);
		s->flags |= RING_F_EVENT;
	}
	if (op->done) {
		s->done_mem = op->done->mem_id;
		s->done_off = op->done->offset;
		s->done_value = op->done_value;
		s->flags |= RING_F_DONE;
	}
	RING_STORE_SC(&s->posted, op->seq + 1);
	atomic_thread_fence(memory_order_seq_cst);
	c->ring_busy[op->seq % RING_SLOTS] = 1;
	r->ring = 1;
	r->unsent = 0;
	/*
	 * commd sleeps: wake it (only the poster that clears the flag writes).
	 * The write fails only when the count is about to overflow, which
	 * means commd has wake-ups pending anyway.
	 */
	if (RING_LOAD(&h->daemon_armed) && RING_XCHG(&h->daemon_armed, 0))
		(void)!write(c->ring_efd, &one, sizeof one);
	return 1;
}

/* r's answer is in its slot, or came over the socket: record it, free the slot. */
void ring_complete(comm_request_t *r, comm_result_t rc, const char *detail)
{
	comm_t *c = r->comm;

	r->done = 1;
	r->rc = err_known(rc) ? rc : COMM_ERR_PROTOCOL;
	if (r->rc != COMM_OK)
		comm_set_error(c, r->rc, "%s", detail);
	c->ring_busy[r->seq % RING_SLOTS] = 0;
	req_done(r);
}

void ring_reap(comm_t *c)
{
	if (!c->ring)
		return;
	for (comm_request_t *r = c->reqs; r; r = r->next) {
		struct ring_slot *s;

		if (!r->ring || r->done)
			continue;
		s = ring_slot(c->ring, r->seq);
		if (RING_LOAD(&s->done) != r->seq + 1)
			continue;
		s->detail[RING_DETAIL - 1] = '\0';
		ring_complete(r, s->status, s->detail);
	}
}

void ring_wait(comm_request_t *r, int timeout_ms)
{
	comm_t *c = r->comm;
	uint64_t start = now_us();
	struct ring_hdr *h = c->ring;

	for (;;) {
		uint64_t waited;
		int left = -1;

		ring_reap(c);
		if (r->done || c->broken != COMM_OK)
			return;
		waited = now_us() - start;
		if (h && r->ring && waited < (uint64_t)c->spin_us) {
			sched_yield();
			continue;
		}
		if (timeout_ms >= 0) {
			if (waited >= (uint64_t)timeout_ms * 1000)
				left = 0;
			else
				left = (int)(((uint64_t)timeout_ms * 1000 - waited + 999) / 1000);
		}
		/* sleep on the socket: commd answers there too while the flag is up */
		if (h) {
			RING_STORE_SC(&h->rank_sleeping, 1);
			atomic_thread_fence(memory_order_seq_cst);
		}
		ring_reap(c);
		if (!r->done)
			comm_pump(c, left);
		if (h)
			RING_STORE(&h->rank_sleeping, 0);
		ring_reap(c);
		if (r->done || left == 0)
			return;
	}
}
