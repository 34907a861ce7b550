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

/* Give back staging blocks (quietly: the comm may be broken). */
static void unstage(comm_request_t *r)
{
	if (r->stage_send && r->stage_send != r->stage_recv)
		comm_mem_free(r->comm, r->stage_send);
	if (r->stage_recv)
		comm_mem_free(r->comm, r->stage_recv);
	r->stage_send = r->stage_recv = NULL;
}

comm_result_t req_finish(comm_request_t *r)
{
	comm_result_t rc = r->rc;

	if (rc == COMM_OK && r->stage_recv)
		memcpy(r->user_recv, r->stage_recv, r->recv_bytes);
	unstage(r);
	if (r->detached && rc != COMM_OK && r->comm->async_error == COMM_OK)
		r->comm->async_error = rc;
	gpu_req_release(r);
	req_unlink(r);
	free(r);
	return rc;
}

void req_fail_all(comm_t *c, comm_result_t rc)
{
	for (comm_request_t *r = c->reqs; r; r = r->next) {
		if (!r->done) {
			r->done = 1;
			r->rc = rc;
			gpu_req_done(r);
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
		free(r);
	}
	c->reqs_tail = NULL;
}

COMM_API comm_result_t comm_wait(comm_request_t *r, int timeout_ms)
{
	if (!r || r->detached)
		return COMM_ERR_INVALID_ARG;
	if (r->unsent)
		return comm_set_error(r->comm, COMM_ERR_INVALID_ARG,
				      "wait: the request's group has not ended yet");
	ring_wait(r, timeout_ms);
	return r->done ? req_finish(r) : COMM_INPROGRESS;
}

COMM_API comm_result_t comm_test(comm_request_t *r, int *done)
{
	if (!r || !done || r->detached)
		return COMM_ERR_INVALID_ARG;
	if (r->unsent)
		return comm_set_error(r->comm, COMM_ERR_INVALID_ARG,
				      "test: the request's group has not ended yet");
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
	ring_reap(c);
	if (c->broken == COMM_OK)
		comm_pump(c, 0);
	req_reap(c);
	return c->async_error;
}
