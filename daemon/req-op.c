/*
 * req-op.c: a rank posts an op: check it against the rank's own buffers,
 * then hand it to the engine. Also Leave and Abort.
 */
#include <stdio.h>
#include <stdlib.h>

#include "commd.h"
#include "dtype.h"
#include "log.h"
#include "util.h"

/* Resolve a buffer reference of len bytes; fills p->error on failure. */
static int resolve(struct conn *c, struct posted *p, const Commpb__BufRef *ref, uint64_t len,
		   const char *which, struct bufspec *out)
{
	struct mem *m;
	uint64_t end;

	if (!ref) {
		p->error = COMM_ERR_INVALID_ARG;
		snprintf(p->detail, sizeof p->detail, "op %llu: no %s buffer",
			 (unsigned long long)p->seq, which);
		return -1;
	}
	m = mem_find(c, ref->mem_id);
	if (!m) {
		p->error = COMM_ERR_NOT_FOUND;
		snprintf(p->detail, sizeof p->detail, "op %llu: %s buffer: no mem id %llu",
			 (unsigned long long)p->seq, which, (unsigned long long)ref->mem_id);
		return -1;
	}
	if (__builtin_add_overflow(ref->offset, len, &end) || end > m->size) {
		p->error = COMM_ERR_INVALID_ARG;
		snprintf(p->detail, sizeof p->detail,
			 "op %llu: %s buffer: offset %llu + %llu bytes is past the end of mem %llu "
			 "(%zu bytes)",
			 (unsigned long long)p->seq, which, (unsigned long long)ref->offset,
			 (unsigned long long)len, (unsigned long long)m->id, m->size);
		return -1;
	}
	mem_ref(m);
	out->mem = m;
	out->off = ref->offset;
	out->len = len;
	return 0;
}

/* Check o as posted by c; on failure p->error and p->detail say why. */
static void check_op(struct conn *c, const Commpb__Op *o, struct posted *p)
{
	int world = c->job->world;
	uint64_t block, sendlen, recvlen;
	size_t es = dtype_size((int)o->dtype);

	switch (o->type) {
	case COMMPB__OP_TYPE__OP_ALLREDUCE:
	case COMMPB__OP_TYPE__OP_REDUCE_SCATTER:
		if (!redop_valid((int)o->redop)) {
			p->error = COMM_ERR_INVALID_ARG;
			snprintf(p->detail, sizeof p->detail, "op %llu: unknown redop %u",
				 (unsigned long long)o->seq, o->redop);
			return;
		}
		break;
	case COMMPB__OP_TYPE__OP_ALLGATHER:
		break;
	default:
		p->error = COMM_ERR_INVALID_ARG;
		snprintf(p->detail, sizeof p->detail, "op %llu: unknown op type %d",
			 (unsigned long long)o->seq, (int)o->type);
		return;
	}
	if (!es) {
		p->error = COMM_ERR_INVALID_ARG;
		snprintf(p->detail, sizeof p->detail, "op %llu: unknown dtype %u",
			 (unsigned long long)o->seq, o->dtype);
		return;
	}
	if (__builtin_mul_overflow(o->count, es, &block) ||
	    __builtin_mul_overflow(block, (uint64_t)world, &sendlen)) {
		p->error = COMM_ERR_INVALID_ARG;
		snprintf(p->detail, sizeof p->detail, "op %llu: count %llu overflows",
			 (unsigned long long)o->seq, (unsigned long long)o->count);
		return;
	}
	if (o->count == 0)
		return; /* nothing is read or written: no buffers needed */
	recvlen = block;
	if (o->type == COMMPB__OP_TYPE__OP_ALLREDUCE)
		sendlen = block;
	else if (o->type == COMMPB__OP_TYPE__OP_ALLGATHER) {
		recvlen = sendlen;
		sendlen = block;
	}
	if (resolve(c, p, o->send, sendlen, "send", &p->send) < 0 ||
	    resolve(c, p, o->recv, recvlen, "recv", &p->recv) < 0)
		return;
}

int req_op_exec(struct conn *c, const Commpb__Envelope *env, int *fds, int nfds)
{
	const Commpb__Op *o = env->op;
	struct job *j = c->job;
	struct posted *p;

	if (j->state == JOB_FORMING) {
		conn_fail(c, COMM_ERR_PROTOCOL, "protocol: op before the job formed");
		return -1;
	}
	if (o->seq != j->next_post[c->rank]) {
		conn_fail(c, COMM_ERR_PROTOCOL, "protocol: op seq %llu, expected %llu",
			  (unsigned long long)o->seq, (unsigned long long)j->next_post[c->rank]);
		return -1;
	}
	p = calloc(1, sizeof *p);
	if (!p) {
		conn_fail(c, COMM_ERR_NO_MEMORY, "op: out of memory");
		return -1;
	}
	p->seq = o->seq;
	p->req_id = env->id;
	p->posted_ms = now_ms();
	p->type = o->type;
	p->count = o->count;
	p->dtype = o->dtype;
	p->redop = o->redop;
	p->root = o->root;
	if (j->state > JOB_READY) {
		p->error = j->fail_code;
		snprintf(p->detail, sizeof p->detail, "%s", j->fail_detail);
	} else {
		check_op(c, o, p);
	}
	if (p->error != COMM_OK) {
		Commpb__Envelope reply = COMMPB__ENVELOPE__INIT;
		Commpb__OpDone done = COMMPB__OP_DONE__INIT;

		done.seq = p->seq;
		done.status = p->error;
		done.detail = p->detail;
		reply.id = env->id;
		reply.body_case = COMMPB__ENVELOPE__BODY_OP_DONE;
		reply.op_done = &done;
		conn_send(c, &reply);
		if (j->state > JOB_READY) {
			j->next_post[c->rank] = p->seq + 1;
			free(p);
			return 0;
		}
	}
	engine_post(c, p);
	return 0;
}

int req_leave_exec(struct conn *c, const Commpb__Envelope *env, int *fds, int nfds)
{
	log_debug("job %s: rank %d leaves", c->job->name, c->rank);
	job_detach(c, COMM_OK, "left the job (comm_finalize)");
	return 0;
}

int req_abort_exec(struct conn *c, const Commpb__Envelope *env, int *fds, int nfds)
{
	char why[200];

	snprintf(why, sizeof why, "aborted%s%.160s", *env->abort->reason ? ": " : "",
		 env->abort->reason);
	job_detach(c, COMM_ERR_ABORTED, why);
	return 0;
}
