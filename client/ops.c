/*
 * ops.c: the collectives. Each names its buffers by (mem id, offset) in the
 * segments shared with commd or in device allocations registered with it;
 * other host pointers are staged through a segment.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "comm-int.h"
#include "util.h"

struct opdesc {
	Commpb__OpType type;
	const char *name;
	const void *send;
	void *recv;
	size_t count;
	size_t send_bytes;
	size_t recv_bytes;
	comm_dtype_t dtype;
	comm_redop_t redop;
	int root;
	int peer;
};

/* Where a buffer lives. */
enum where { IN_NONE, IN_SEGMENT, IN_HOST, IN_DEVICE };

struct buf {
	enum where where;
	int dev;                    /* IN_DEVICE: its device */
};

static const char *where_name(enum where w)
{
	return w == IN_DEVICE ? "device memory" : "host memory";
}

/*
 * Find where p (len bytes) lives; a segment's pointer is named in *ref at
 * once and never reaches CUDA. like: p's twin (send == recv) already found.
 */
static comm_result_t locate(comm_t *c, const struct opdesc *d, const void *p, size_t len,
			    const char *which, const struct buf *like, struct buf *b,
			    Commpb__BufRef *ref)
{
	comm_result_t rc;

	b->where = IN_NONE;
	b->dev = -1;
	if (len == 0)
		return COMM_OK;
	if (!p)
		return comm_set_error(c, COMM_ERR_INVALID_ARG, "%s: %s buffer is NULL", d->name,
				      which);
	switch (mem_lookup(c, p, len, &ref->mem_id, &ref->offset)) {
	case 1:
		b->where = IN_SEGMENT;
		return COMM_OK;
	case -1: /* another comm's segment, not registered here: staged */
		if (c->broken != COMM_OK) /* not for want of memory */
			return c->broken;
		b->where = IN_HOST;
		return COMM_OK;
	case -2:
		return comm_set_error(c, COMM_ERR_INVALID_ARG,
				      "%s: %s buffer of %zu bytes runs past its allocation", d->name,
				      which, len);
	}
	if (like && (like->where == IN_HOST || like->where == IN_DEVICE)) {
		*b = *like;
		return COMM_OK;
	}
	rc = gpu_locate(c, d->name, which, p, &b->dev);
	if (rc != COMM_OK)
		return rc;
	b->where = b->dev >= 0 ? IN_DEVICE : IN_HOST;
	return COMM_OK;
}

/* Stage a host pointer through a new block of len bytes, named in *ref. */
static comm_result_t stage(comm_t *c, size_t len, Commpb__BufRef *ref, void **block)
{
	comm_result_t rc;

	*block = comm_mem_alloc_rc(c, len, &rc);
	if (!*block)
		return rc;
	mem_lookup(c, *block, len, &ref->mem_id, &ref->offset);
	return COMM_OK;
}

/*
 * Name both buffers of d for r: segments as they are, other host pointers
 * staged, device memory registered (with the ready event in op, and for an
 * op posted with a request (async) a done flag for comm_stream_wait).
 */
static comm_result_t name_buffers(comm_t *c, const struct opdesc *d, comm_request_t *r,
				  Commpb__Op *op, int async)
{
	int same = d->recv == d->send;
	struct buf sb, rb;
	comm_result_t rc;

	rc = locate(c, d, d->send, d->send_bytes, "send", NULL, &sb, op->send);
	if (rc != COMM_OK)
		return rc;
	rc = locate(c, d, d->recv, d->recv_bytes, "recv", same ? &sb : NULL, &rb, op->recv);
	if (rc != COMM_OK)
		return rc;
	if ((sb.where == IN_DEVICE && rb.where != IN_NONE && rb.where != IN_DEVICE) ||
	    (rb.where == IN_DEVICE && sb.where != IN_NONE && sb.where != IN_DEVICE))
		return comm_set_error(c, COMM_ERR_UNSUPPORTED,
				      "%s: send buffer is %s and recv buffer %s; use one kind",
				      d->name, where_name(sb.where), where_name(rb.where));
	if (sb.where == IN_DEVICE || rb.where == IN_DEVICE) {
		int dev = sb.where == IN_DEVICE ? sb.dev : rb.dev;

		if (c->version < 3)
			return comm_set_error(c, COMM_ERR_UNSUPPORTED,
					      "device buffers need commd protocol 3, it speaks %u",
					      c->version);
		if (sb.where == IN_DEVICE && rb.where == IN_DEVICE && sb.dev != rb.dev)
			return comm_set_error(c, COMM_ERR_UNSUPPORTED,
					      "%s: send buffer is on device %d and recv buffer on "
					      "device %d; use one device",
					      d->name, sb.dev, rb.dev);
		if (sb.where == IN_DEVICE)
			rc = gpu_bufref(c, d->name, "send", d->send, d->send_bytes, dev, op->send);
		if (rc == COMM_OK && rb.where == IN_DEVICE)
			rc = gpu_bufref(c, d->name, "recv", d->recv, d->recv_bytes, dev, op->recv);
		if (rc == COMM_OK)
			rc = gpu_ready_event(c, d->name, r, dev, &op->ready_event);
		/* an op that moves no bytes never reaches the GPU worker: no flag */
		if (rc == COMM_OK && async && c->version >= 4 && (d->send_bytes || d->recv_bytes))
			gpu_done_flag(c, r, dev, op);
		return rc;
	}
	/* send == recv on a staged pointer: one block, big enough for both */
	if (sb.where == IN_HOST) {
		rc = stage(c, same && d->recv_bytes > d->send_bytes ? d->recv_bytes : d->send_bytes,
			   op->send, &r->stage_send);
		if (rc != COMM_OK)
			return rc;
	}
	if (same && r->stage_send) {
		r->stage_recv = r->stage_send;
		*op->recv = *op->send;
	} else if (rb.where == IN_HOST) {
		rc = stage(c, d->recv_bytes, op->recv, &r->stage_recv);
		if (rc != COMM_OK)
			return rc;
	}
	if (r->stage_send) {
		rc = req_settle(c, d->send, d->send_bytes);
		if (rc != COMM_OK)
			return rc;
		memcpy(r->stage_send, d->send, d->send_bytes);
	}
	if (r->stage_recv) {
		r->user_recv = d->recv;
		r->recv_bytes = d->recv_bytes;
		c->staged_out++;
	}
	return COMM_OK;
}

/* Post one op: in the ring when its slot is free, else as a message. */
static comm_result_t send_op(comm_t *c, Commpb__Op *op, comm_request_t *r)
{
	Commpb__Envelope env = COMMPB__ENVELOPE__INIT;
	comm_result_t rc;
	if (ring_post(c, op, r))
		return COMM_OK;
	env.body_case = COMMPB__ENVELOPE__BODY_OP;
	env.op = op;
	rc = comm_send_env(c, &env);
	r->id = env.id;
	r->unsent = 0;
	return rc;
}

/* Keep an op of an open group for comm_group_end. */
static comm_result_t group_add(comm_t *c, const Commpb__Op *op, comm_request_t *r, int blocking)
{
	struct group_op *g;

	if (c->group_n == c->group_cap) {
		size_t cap = c->group_cap ? 2 * c->group_cap : 16;
		struct group_op *ng = realloc(c->group, cap * sizeof *ng);

		if (!ng)
			return comm_set_error(c, COMM_ERR_NO_MEMORY, "group: out of memory");
		c->group = ng;
		c->group_cap = cap;
	}
	g = &c->group[c->group_n++];
	g->op = *op;
	g->sref = *op->send;
	g->rref = *op->recv;
	g->req = r;
	g->blocking = blocking;
	r->unsent = 1;
	return COMM_OK;
}

static comm_result_t submit(comm_t *c, const struct opdesc *d, comm_request_t **req)
{
	Commpb__Op op = COMMPB__OP__INIT;
	Commpb__BufRef sref = COMMPB__BUF_REF__INIT, rref = COMMPB__BUF_REF__INIT;
	comm_request_t *r;
	comm_result_t rc;

	if (req)
		*req = NULL;
	if (c->broken != COMM_OK)
		return c->broken;
	req_reap(c);
	r = req_new(c);
	if (!r)
		return comm_set_error(c, COMM_ERR_NO_MEMORY, "%s: out of memory", d->name);
	op.send = &sref;
	op.recv = &rref;
	rc = name_buffers(c, d, r, &op, req != NULL);
	if (rc != COMM_OK)
		goto fail;
	r->empty = !d->send_bytes && !d->recv_bytes;
	r->seq = c->next_seq++;
	op.seq = r->seq;
	op.type = d->type;
	op.count = d->count;
	op.dtype = (uint32_t)d->dtype;
	op.redop = (uint32_t)d->redop;
	op.root = d->root;
	op.peer = d->peer;
	if (c->group_depth > 0) {
		rc = group_add(c, &op, r, req == NULL);
		if (rc != COMM_OK) {
			c->next_seq--;
			goto fail;
		}
		if (req)
			*req = r;
		return COMM_OK;
	}
	rc = send_op(c, &op, r);
	if (rc != COMM_OK)
		goto fail;
	if (req) {
		*req = r;
		return COMM_OK;
	}
	return comm_wait(r, -1);
fail:
	r->rc = rc;
	req_finish(r);
	return rc;
}

COMM_API comm_result_t comm_group_start(comm_t *c)
{
	if (!c)
		return COMM_ERR_INVALID_ARG;
	c->group_depth++;
	return COMM_OK;
}

COMM_API comm_result_t comm_group_end(comm_t *c)
{
	comm_result_t rc = COMM_OK;
	size_t n;

	if (!c)
		return COMM_ERR_INVALID_ARG;
	if (c->group_depth == 0)
		return comm_set_error(c, COMM_ERR_INVALID_ARG, "group end: no group is open");
	if (--c->group_depth > 0)
		return COMM_OK;
	n = c->group_n;
	c->group_n = 0;
	/* all of the group goes out now; the daemon progresses it as one unit */
	for (size_t i = 0; i < n; i++) {
		struct group_op *g = &c->group[i];
		comm_result_t src;

		g->op.send = &g->sref;
		g->op.recv = &g->rref;
		g->op.group = c->group[0].op.seq;
		g->op.group_last = i == n - 1;
		src = send_op(c, &g->op, g->req);
		if (src != COMM_OK && rc == COMM_OK)
			rc = src;
	}
	for (size_t i = 0; i < n; i++) {
		comm_result_t wrc;

		if (!c->group[i].blocking)
			continue;
		wrc = comm_wait(c->group[i].req, -1);
		if (wrc != COMM_OK && rc == COMM_OK)
			rc = wrc;
	}
	return rc;
}

/* Check the arguments every op shares and size its buffers. */
static comm_result_t prepare(comm_t *c, struct opdesc *d, size_t send_mult, size_t recv_mult)
{
	size_t es = comm_dtype_size(d->dtype), block;

	if (!c)
		return COMM_ERR_INVALID_ARG;
	if (!es)
		return comm_set_error(c, COMM_ERR_INVALID_ARG, "%s: unknown dtype %d", d->name,
				      (int)d->dtype);
	if ((unsigned)d->redop > COMM_AVG)
		return comm_set_error(c, COMM_ERR_INVALID_ARG, "%s: unknown redop %d", d->name,
				      (int)d->redop);
	if (mul_overflow_size(d->count, es, &block) ||
	    mul_overflow_size(block, send_mult, &d->send_bytes) ||
	    mul_overflow_size(block, recv_mult, &d->recv_bytes))
		return comm_set_error(c, COMM_ERR_INVALID_ARG, "%s: count %zu overflows", d->name,
				      d->count);
	return COMM_OK;
}

COMM_API comm_result_t comm_allreduce(comm_t *c, const void *sendbuf, void *recvbuf,
				      size_t count, comm_dtype_t dtype, comm_redop_t op,
				      comm_request_t **req)
{
	struct opdesc d = { COMMPB__OP_TYPE__OP_ALLREDUCE, "allreduce", sendbuf, recvbuf, count,
			    0, 0, dtype, op, 0, 0 };
	comm_result_t rc = prepare(c, &d, 1, 1);

	return rc != COMM_OK ? rc : submit(c, &d, req);
}

COMM_API comm_result_t comm_reduce_scatter(comm_t *c, const void *sendbuf, void *recvbuf,
					   size_t recvcount, comm_dtype_t dtype, comm_redop_t op,
					   comm_request_t **req)
{
	struct opdesc d = { COMMPB__OP_TYPE__OP_REDUCE_SCATTER, "reduce_scatter", sendbuf,
			    recvbuf, recvcount, 0, 0, dtype, op, 0, 0 };
	comm_result_t rc = prepare(c, &d, c ? (size_t)c->size : 1, 1);

	return rc != COMM_OK ? rc : submit(c, &d, req);
}

COMM_API comm_result_t comm_allgather(comm_t *c, const void *sendbuf, void *recvbuf,
				      size_t sendcount, comm_dtype_t dtype, comm_request_t **req)
{
	struct opdesc d = { COMMPB__OP_TYPE__OP_ALLGATHER, "allgather", sendbuf, recvbuf,
			    sendcount, 0, 0, dtype, COMM_SUM, 0, 0 };
	comm_result_t rc = prepare(c, &d, 1, c ? (size_t)c->size : 1);

	return rc != COMM_OK ? rc : submit(c, &d, req);
}

COMM_API comm_result_t comm_broadcast(comm_t *c, const void *sendbuf, void *recvbuf,
				      size_t count, comm_dtype_t dtype, int root,
				      comm_request_t **req)
{
	struct opdesc d = { COMMPB__OP_TYPE__OP_BROADCAST, "broadcast", sendbuf, recvbuf, count,
			    0, 0, dtype, COMM_SUM, root, 0 };
	comm_result_t rc = prepare(c, &d, c && c->rank == root ? 1 : 0, 1);

	return rc != COMM_OK ? rc : submit(c, &d, req);
}

COMM_API comm_result_t comm_reduce(comm_t *c, const void *sendbuf, void *recvbuf, size_t count,
				   comm_dtype_t dtype, comm_redop_t op, int root,
				   comm_request_t **req)
{
	struct opdesc d = { COMMPB__OP_TYPE__OP_REDUCE, "reduce", sendbuf, recvbuf, count,
			    0, 0, dtype, op, root, 0 };
	comm_result_t rc = prepare(c, &d, 1, c && c->rank == root ? 1 : 0);

	return rc != COMM_OK ? rc : submit(c, &d, req);
}

COMM_API comm_result_t comm_alltoall(comm_t *c, const void *sendbuf, void *recvbuf,
				     size_t count, comm_dtype_t dtype, comm_request_t **req)
{
	struct opdesc d = { COMMPB__OP_TYPE__OP_ALLTOALL, "alltoall", sendbuf, recvbuf, count,
			    0, 0, dtype, COMM_SUM, 0, 0 };
	size_t n = c ? (size_t)c->size : 1;
	comm_result_t rc = prepare(c, &d, n, n);

	return rc != COMM_OK ? rc : submit(c, &d, req);
}

/* Whether block j of a buffer (counts, displs, es bytes an element) ends past SIZE_MAX. */
static int block_overflows(const size_t *counts, const size_t *displs, int j, size_t es)
{
	size_t end;

	return __builtin_add_overflow(displs[j], counts[j], &end) || mul_overflow_size(end, es, &end);
}

/* Take back the ops a call that failed with rc added to the open group from mark on. */
static void group_drop(comm_t *c, size_t mark, comm_result_t rc)
{
	while (c->group_n > mark) {
		comm_request_t *r = c->group[--c->group_n].req;

		c->next_seq--;
		r->unsent = 0;
		r->rc = rc;
		req_finish(r);
	}
}

/*
 * As NCCL users and torch's all_to_all_single do it: in a group, a recv
 * from and a send to every rank (itself too), rank + 1 first so that the
 * ranks do not all start with the same peer. Zero counts are sent too, so
 * that counts that disagree fail as a size mismatch, not at the deadline.
 */
COMM_API comm_result_t comm_alltoallv(comm_t *c, const void *sendbuf, const size_t *sendcounts,
				      const size_t *sdispls, void *recvbuf,
				      const size_t *recvcounts, const size_t *rdispls,
				      comm_dtype_t dtype, comm_request_t **req)
{
	size_t es = comm_dtype_size(dtype), mark;
	comm_request_t *all = NULL;
	comm_result_t rc = COMM_OK;
	int n;

	if (req)
		*req = NULL;
	if (!c)
		return COMM_ERR_INVALID_ARG;
	if (c->broken != COMM_OK)
		return c->broken;
	if (!es)
		return comm_set_error(c, COMM_ERR_INVALID_ARG, "alltoallv: unknown dtype %d",
				      (int)dtype);
	if (!sendcounts || !sdispls || !recvcounts || !rdispls)
		return comm_set_error(c, COMM_ERR_INVALID_ARG,
				      "alltoallv: counts and displacements are needed, one per rank");
	n = c->size;
	for (int j = 0; j < n; j++) {
		if (block_overflows(sendcounts, sdispls, j, es) ||
		    block_overflows(recvcounts, rdispls, j, es))
			return comm_set_error(c, COMM_ERR_INVALID_ARG,
					      "alltoallv: rank %d's block overflows", j);
		if ((sendcounts[j] && !sendbuf) || (recvcounts[j] && !recvbuf))
			return comm_set_error(c, COMM_ERR_INVALID_ARG,
					      "alltoallv: %s buffer is NULL, with %zu elements for "
					      "rank %d", sendcounts[j] && !sendbuf ? "send" : "recv",
					      sendcounts[j] && !sendbuf ? sendcounts[j] : recvcounts[j],
					      j);
	}
	if (req && !(all = req_new_parts(c, 2 * n)))
		return comm_set_error(c, COMM_ERR_NO_MEMORY, "alltoallv: out of memory");
	comm_group_start(c);
	mark = c->group_n;
	for (int k = 1; k <= n && rc == COMM_OK; k++) {
		int j = (c->rank + k) % n;
		const char *sb = sendcounts[j] ? (const char *)sendbuf + sdispls[j] * es : sendbuf;
		char *rb = recvcounts[j] ? (char *)recvbuf + rdispls[j] * es : recvbuf;

		rc = comm_recv(c, rb, recvcounts[j], dtype, j, all ? &all->parts[all->nparts] : NULL);
		if (rc == COMM_OK && all)
			all->nparts++;
		if (rc == COMM_OK)
			rc = comm_send(c, sb, sendcounts[j], dtype, j,
				       all ? &all->parts[all->nparts] : NULL);
		if (rc == COMM_OK && all)
			all->nparts++;
	}
	if (rc != COMM_OK) {
		group_drop(c, mark, rc);
		if (all) {
			all->nparts = 0;
			req_finish(all);
		}
		comm_group_end(c);
		return rc;
	}
	rc = comm_group_end(c);
	if (rc != COMM_OK && all) /* a part not sent: the request is not handed out */
		comm_wait(all, -1);
	else if (req)
		*req = all;
	return rc;
}

/* A send or recv with itself outside a group would wait for itself: refused (c is checked). */
static comm_result_t p2p_self(comm_t *c, const struct opdesc *d)
{
	if (d->peer == c->rank && !c->group_depth)
		return comm_set_error(c, COMM_ERR_INVALID_ARG,
				      "%s: peer %d is this rank: outside a group it would wait for "
				      "itself (comm_group_start)", d->name, d->peer);
	return COMM_OK;
}

COMM_API comm_result_t comm_send(comm_t *c, const void *buf, size_t count, comm_dtype_t dtype,
				 int peer, comm_request_t **req)
{
	struct opdesc d = { COMMPB__OP_TYPE__OP_SEND, "send", buf, NULL, count,
			    0, 0, dtype, COMM_SUM, 0, peer };
	comm_result_t rc = prepare(c, &d, 1, 0);

	if (rc == COMM_OK)
		rc = p2p_self(c, &d);

	return rc != COMM_OK ? rc : submit(c, &d, req);
}

COMM_API comm_result_t comm_recv(comm_t *c, void *buf, size_t count, comm_dtype_t dtype, int peer,
				 comm_request_t **req)
{
	struct opdesc d = { COMMPB__OP_TYPE__OP_RECV, "recv", NULL, buf, count,
			    0, 0, dtype, COMM_SUM, 0, peer };
	comm_result_t rc = prepare(c, &d, 0, 1);

	if (rc == COMM_OK)
		rc = p2p_self(c, &d);

	return rc != COMM_OK ? rc : submit(c, &d, req);
}

COMM_API comm_result_t comm_barrier(comm_t *c, comm_request_t **req)
{
	struct opdesc d = { COMMPB__OP_TYPE__OP_BARRIER, "barrier", NULL, NULL, 0,
			    0, 0, COMM_UINT8, COMM_SUM, 0, 0 };
	comm_result_t rc = prepare(c, &d, 0, 0);

	return rc != COMM_OK ? rc : submit(c, &d, req);
}
