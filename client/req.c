/* req.c: requests: waiting, testing, unstaging and freeing them. */
#include <stdlib.h>
#include <string.h>

#include "comm-int.h"
#include "util.h"

comm_request_t *req_new(comm_t *c)
{
	comm_request_t *r = calloc(1, sizeof *r);

	if (!r)
		return NULL;
	r->comm = c;
	if (c->reqs_tail)
		c->reqs_tail->next = r;
	else
		c->reqs = r;
	c->reqs_tail = r;
	return r;
}

static void req_unlink(comm_request_t *r)
{
	comm_t *c = r->comm;
	comm_request_t **pp, *prev = NULL;

	for (pp = &c->reqs; *pp; prev = *pp, pp = &(*pp)->next) {
		if (*pp == r) {
			*pp = r->next;
			if (c->reqs_tail == r)
				c->reqs_tail = prev;
			break;
		}
	}
}

/*
 * A request of n ops (comm_alltoallv), each posted with a request of its
 * own stored in parts: it is done when they all are, its result their
 * first error. On the list before its parts, so comm_finalize waits for
 * it through them and a broken comm's req_free_all frees it.
 */
comm_request_t *req_new_parts(comm_t *c, int n)
{
	comm_request_t *r = req_new(c);

	if (!r)
		return NULL;
	if (!(r->parts = calloc(n ? (size_t)n : 1, sizeof *r->parts))) {
		req_unlink(r);
		free(r);
		return NULL;
	}
	return r;
}

/* Part i of r has finished with rc. */
static void part_done(comm_request_t *r, int i, comm_result_t rc)
{
	if (rc != COMM_OK && r->rc == COMM_OK)
		r->rc = rc;
	r->parts[i] = r->parts[--r->nparts];
}

/* Give back staging blocks (quietly: the comm may be broken). */
static void unstage(comm_request_t *r)
{
	if (r->stage_send && r->stage_send != r->stage_recv)
		comm_mem_free(r->comm, r->stage_send);
	if (r->stage_recv)
		comm_mem_free(r->comm, r->stage_recv);
	r->stage_send = r->stage_recv = NULL;
}

/*
 * Copy out the staged results of the answered requests, oldest first, up
 * to the first one not answered yet. commd answers in posting order, but
 * a ring slot's answer may be read before one sent on the socket earlier:
 * a later op's result must land last, as in registered memory. A request
 * of parts (comm_alltoallv) stands for its parts, which are on the list.
 */
static void deliver(comm_t *c)
{
	for (comm_request_t *q = c->reqs; q && c->staged_out; q = q->next) {
		if (q->parts || q->unsent)
			continue;
		if (!q->done)
			return;
		if (q->user_recv) {
			if (q->rc == COMM_OK)
				memcpy(q->user_recv, q->stage_recv, q->recv_bytes);
			q->user_recv = NULL;
			c->staged_out--;
		}
	}
}

/*
 * r was answered, or is about to be waited for: r and every op posted
 * before it answered (their answers come before r's), then their staged
 * results out. On a broken comm every request is answered already.
 */
static void deliver_through(comm_request_t *r)
{
	for (comm_request_t *q = r->comm->reqs; q; q = q->next) {
		if (!q->parts && !q->unsent && !q->done)
			ring_wait(q, -1);
		if (q == r)
			break;
	}
	deliver(r->comm);
}

/*
 * r has its answer. Staged results go to the caller's buffers now, in
 * posting order (deliver), not when their requests are waited for: a
 * later op staging such a buffer as its input, or writing it too, then
 * comes after them, as in registered memory.
 */
void req_done(comm_request_t *r)
{
	deliver(r->comm);
	gpu_req_done(r);
}

/*
 * An op about to stage [p, p + n) as its input: the ops posted before it
 * (not in the open group, whose ops run together) whose staged result
 * lands there are waited for first, so that it reads their result, as an
 * op queued behind them on one CUDA stream would. The posting call blocks
 * meanwhile.
 */
comm_result_t req_settle(comm_t *c, const void *p, size_t n)
{
	const char *a = p;

	for (comm_request_t *q = c->reqs; q && c->staged_out; q = q->next) {
		const char *u = q->user_recv;

		if (!u || q->unsent || !(a < u + q->recv_bytes && u < a + n))
			continue;
		deliver_through(q);
		if (c->broken != COMM_OK)
			return c->broken;
	}
	return COMM_OK;
}

comm_result_t req_finish(comm_request_t *r)
{
	comm_result_t rc = r->rc;

	if (r->user_recv && r->done)
		deliver_through(r);
	if (r->user_recv) { /* never answered: its op failed before it was sent */
		r->user_recv = NULL;
		r->comm->staged_out--;
	}
	unstage(r);
	if (r->detached && rc != COMM_OK && r->comm->async_error == COMM_OK)
		r->comm->async_error = rc;
	gpu_req_release(r);
	req_unlink(r);
	free(r->parts);
	free(r);
	return rc;
}

void req_fail_all(comm_t *c, comm_result_t rc)
{
	for (comm_request_t *r = c->reqs; r; r = r->next) {
		if (!r->done && !r->parts) { /* a request of parts fails through them */
			r->done = 1;
			r->rc = rc;
			req_done(r);
		}
	}
}

void req_reap(comm_t *c)
{
	comm_request_t *r = c->reqs, *next;

	for (; r; r = next) {
		next = r->next;
		if (r->detached && r->done)
			req_finish(r);
	}
}

void req_free_all(comm_t *c)
{
	while (c->reqs) {
		comm_request_t *r = c->reqs;

		c->reqs = r->next;
		free(r->parts);
		free(r);
	}
	c->reqs_tail = NULL;
}

/* A part still in an open group makes the whole unsent. */
static int unsent(const comm_request_t *r)
{
	return r->parts ? r->nparts && r->parts[0]->unsent : r->unsent;
}

static comm_result_t parts_wait(comm_request_t *r, int timeout_ms)
{
	uint64_t end = now_ms() + (uint64_t)(timeout_ms > 0 ? timeout_ms : 0);

	while (r->nparts) {
		uint64_t now = now_ms();
		int left = timeout_ms < 0 ? -1 : now >= end ? 0 : (int)(end - now);
		comm_result_t rc = comm_wait(r->parts[0], left);

		if (rc == COMM_INPROGRESS)
			return rc;
		part_done(r, 0, rc);
	}
	return req_finish(r);
}

static comm_result_t parts_test(comm_request_t *r, int *done)
{
	for (int i = 0; i < r->nparts;) {
		int d = 0;
		comm_result_t rc = comm_test(r->parts[i], &d);

		if (!d)
			i++;
		else
			part_done(r, i, rc);
	}
	*done = r->nparts == 0;
	return *done ? req_finish(r) : COMM_OK;
}

/*
 * Each part handed to the stream. On device memory, a part that moves no
 * bytes has nothing for the stream to wait for (and no done flag): it is
 * let go as the stream's parts are (freed once answered, a failure kept
 * for comm_async_error) instead of waited for on the host. On host memory
 * (no part has a flag) every part is waited for, as comm_wait does.
 */
comm_result_t req_parts_stream_wait(comm_request_t *r, void *stream)
{
	int device = 0;

	if (unsent(r))
		return comm_set_error(r->comm, COMM_ERR_INVALID_ARG,
				      "stream wait: the request's group has not ended yet");
	for (int i = 0; i < r->nparts; i++)
		device |= r->parts[i]->flag != NULL;
	while (r->nparts) {
		comm_request_t *p = r->parts[0];

		if (device && p->empty && !p->done) {
			p->detached = 1;
			part_done(r, 0, COMM_OK);
		} else {
			part_done(r, 0, comm_stream_wait(p, stream));
		}
	}
	return req_finish(r);
}

COMM_API comm_result_t comm_wait(comm_request_t *r, int timeout_ms)
{
	if (!r || r->detached)
		return COMM_ERR_INVALID_ARG;
	if (r->comm->forked)
		return comm_refuse(r->comm, "wait");
	if (unsent(r))
		return comm_set_error(r->comm, COMM_ERR_INVALID_ARG,
				      "wait: the request's group has not ended yet");
	if (r->parts)
		return parts_wait(r, timeout_ms);
	ring_wait(r, timeout_ms);
	return r->done ? req_finish(r) : COMM_INPROGRESS;
}

COMM_API comm_result_t comm_test(comm_request_t *r, int *done)
{
	if (!r || !done || r->detached)
		return COMM_ERR_INVALID_ARG;
	if (r->comm->forked)
		return comm_refuse(r->comm, "test");
	if (unsent(r))
		return comm_set_error(r->comm, COMM_ERR_INVALID_ARG,
				      "test: the request's group has not ended yet");
	if (r->parts)
		return parts_test(r, done);
	ring_reap(r->comm);
	if (!r->done)
		comm_pump(r->comm, 0);
	req_reap(r->comm);
	*done = r->done;
	return r->done ? req_finish(r) : COMM_OK;
}

COMM_API comm_result_t comm_async_error(comm_t *c)
{
	if (!c)
		return COMM_ERR_INVALID_ARG;
	if (c->forked)
		return comm_refuse(c, "async error");
	ring_reap(c);
	if (c->broken == COMM_OK)
		comm_pump(c, 0);
	req_reap(c);
	return c->async_error;
}
