/*
 * req-op.c: a rank posts an op: check it against the rank's own buffers,
 * then hand it to the engine. Also Leave and Abort.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "commd.h"
#include "dtype.h"
#include "log.h"
#include "util.h"

#define T(x) COMMPB__OP_TYPE__OP_##x

/* Refuse p: it is answered in its turn, and its partners fail when they match it. */
static void refuse(struct posted *p, comm_result_t code, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
static void refuse(struct posted *p, comm_result_t code, const char *fmt, ...)
{
	va_list ap;

	if (p->done)
		return;
	va_start(ap, fmt);
	vsnprintf(p->detail, sizeof p->detail, fmt, ap);
	va_end(ap);
	p->done = 1;
	p->status = code;
}

/* Resolve a buffer reference of len bytes of es-byte elements into out; refuses p on failure. */
static void resolve(struct conn *c, struct posted *p, const Commpb__BufRef *ref, uint64_t len,
		    size_t es, const char *which, struct bufspec *out)
{
	unsigned long long seq = (unsigned long long)p->seq;
	struct mem *m;
	uint64_t end;

	if (p->done || len == 0)
		return;
	if (!ref) {
		refuse(p, COMM_ERR_INVALID_ARG, "op %llu: no %s buffer", seq, which);
		return;
	}
	m = mem_find(c, ref->mem_id);
	if (!m) {
		refuse(p, COMM_ERR_NOT_FOUND, "op %llu: %s buffer: no mem id %llu", seq, which,
		       (unsigned long long)ref->mem_id);
		return;
	}
	/* the kernels work on whole elements: a buffer must start on one */
	if (ref->offset % es) {
		refuse(p, COMM_ERR_INVALID_ARG,
		       "op %llu: %s buffer: offset %llu is not a multiple of the element size (%zu)",
		       seq, which, (unsigned long long)ref->offset, es);
		return;
	}
	if (__builtin_add_overflow(ref->offset, len, &end) || end > m->size) {
		refuse(p, COMM_ERR_INVALID_ARG,
		       "op %llu: %s buffer: offset %llu + %llu bytes is past the end of mem %llu "
		       "(%zu bytes)",
		       seq, which, (unsigned long long)ref->offset, (unsigned long long)len,
		       (unsigned long long)m->id, m->size);
		return;
	}
	mem_ref(m);
	out->mem = m;
	out->off = ref->offset;
	out->len = len;
}

/* Check o as posted by rank r of a world; refuses p with the reason. */
static void check_op(struct conn *c, const Commpb__Op *o, struct posted *p)
{
	unsigned long long seq = (unsigned long long)o->seq;
	int world = c->job->world, rank = c->rank, root = o->root;
	uint64_t block, all, sendlen = 0, recvlen = 0;
	size_t es = dtype_size((int)o->dtype);

	if (o->type == T(BARRIER))
		return;
	if (!es) {
		refuse(p, COMM_ERR_INVALID_ARG, "op %llu: unknown dtype %u", seq, o->dtype);
		return;
	}
	if (op_reduces(o->type) && !redop_valid((int)o->redop)) {
		refuse(p, COMM_ERR_INVALID_ARG, "op %llu: unknown redop %u", seq, o->redop);
		return;
	}
	if ((o->type == T(BROADCAST) || o->type == T(REDUCE)) && (root < 0 || root >= world)) {
		refuse(p, COMM_ERR_INVALID_ARG, "op %llu: %s root %d is not in 0..%d", seq,
		       op_type_name(o->type), root, world - 1);
		return;
	}
	if (__builtin_mul_overflow(o->count, es, &block) ||
	    __builtin_mul_overflow(block, (uint64_t)world, &all)) {
		refuse(p, COMM_ERR_INVALID_ARG, "op %llu: count %llu overflows", seq,
		       (unsigned long long)o->count);
		return;
	}
	switch (o->type) {
	case T(ALLREDUCE):
		sendlen = recvlen = block;
		break;
	case T(REDUCE_SCATTER):
		sendlen = all;
		recvlen = block;
		break;
	case T(ALLGATHER):
		sendlen = block;
		recvlen = all;
		break;
	case T(BROADCAST):
		sendlen = rank == root ? block : 0;
		recvlen = block;
		break;
	case T(REDUCE):
		sendlen = block;
		recvlen = rank == root ? block : 0;
		break;
	case T(ALLTOALL):
		sendlen = recvlen = all;
		break;
	case T(SEND):
	case T(RECV):
		if (p->peer < 0) {
			refuse(p, COMM_ERR_INVALID_ARG, "op %llu: %s peer %d is not in 0..%d", seq,
			       op_type_name(o->type), o->peer, world - 1);
			return;
		}
		if (o->type == T(SEND))
			sendlen = block;
		else
			recvlen = block;
		break;
	default:
		refuse(p, COMM_ERR_INVALID_ARG, "op %llu: unknown op type %d", seq, (int)o->type);
		return;
	}
	resolve(c, p, o->send, sendlen, es, "send", &p->send);
	resolve(c, p, o->recv, recvlen, es, "recv", &p->recv);
}

/*
 * The done flag of an op on device memory (protocol 4): 4 bytes of device
 * memory that the GPU worker writes once the results are in. Only an op
 * that has device buffers with data reaches the worker, so only such an
 * op may name one.
 */
static void check_done(struct conn *c, const Commpb__Op *o, struct posted *p)
{
	unsigned long long seq = (unsigned long long)p->seq;
	const struct bufspec *data = p->send.mem ? &p->send : &p->recv;

	if (c->version < 4) {
		refuse(p, COMM_ERR_VERSION, "op %llu: a done flag needs protocol 4, the connection "
			  "speaks %u", seq, c->version);
		return;
	}
	resolve(c, p, o->done, sizeof(uint32_t), sizeof(uint32_t), "done flag", &p->done_flag);
	p->done_value = o->done_value;
	if (p->done)
		return;
	if (p->done_flag.mem->kind == COMMPB__MEM_KIND__MEM_MEMFD)
		refuse(p, COMM_ERR_INVALID_ARG,
		       "op %llu: the done flag is in host memory; it must be device memory", seq);
	else if (!data->mem || data->mem->kind == COMMPB__MEM_KIND__MEM_MEMFD)
		refuse(p, COMM_ERR_INVALID_ARG,
		       "op %llu: a done flag needs an op that moves device memory", seq);
}

/* A group is posted whole: ops of one group id, the last one marked. */
static int check_group(struct conn *c, const Commpb__Op *o)
{
	uint64_t *open = &c->job->open_group[c->rank];

	if (*open && o->group != *open) {
		conn_fail(c, COMM_ERR_PROTOCOL, "protocol: op %llu is not in open group %llu",
			  (unsigned long long)o->seq, (unsigned long long)*open);
		return -1;
	}
	if (!o->group && o->group_last) {
		conn_fail(c, COMM_ERR_PROTOCOL, "protocol: op %llu ends a group it is not in",
			  (unsigned long long)o->seq);
		return -1;
	}
	*open = o->group && !o->group_last ? o->group : 0;
	return 0;
}

void op_answer(struct conn *c, const struct posted *p, comm_result_t code, const char *detail)
{
	Commpb__Envelope env = COMMPB__ENVELOPE__INIT;
	Commpb__OpDone done = COMMPB__OP_DONE__INIT;

	if (p->ring) {
		ring_answer(c, p->seq, code, detail);
		return;
	}
	done.seq = p->seq;
	done.status = code;
	done.detail = (char *)detail;
	env.id = p->req_id;
	env.body_case = COMMPB__ENVELOPE__BODY_OP_DONE;
	env.op_done = &done;
	conn_send(c, &env);
}

int op_post(struct conn *c, const Commpb__Op *o, uint64_t req_id, int ring)
{
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
	if (check_group(c, o) < 0)
		return -1;
	if (j->nposted[c->rank] >= srv.lim.ops_per_rank) {
		conn_fail(c, COMM_ERR_NO_MEMORY,
			  "op %llu: %u ops already in flight on rank %d (max-ops-per-rank)",
			  (unsigned long long)o->seq, srv.lim.ops_per_rank, c->rank);
		return -1;
	}
	p = calloc(1, sizeof *p);
	if (!p) {
		conn_fail(c, COMM_ERR_NO_MEMORY, "op: out of memory");
		return -1;
	}
	j->next_post[c->rank]++;
	p->rank = c->rank;
	p->seq = o->seq;
	p->req_id = req_id;
	p->ring = ring;
	p->posted_ms = now_ms();
	p->type = o->type;
	p->count = o->count;
	p->dtype = o->dtype;
	p->redop = o->redop;
	p->root = o->root;
	/* a peer is only ever used as an index once it is known to be in range */
	p->peer = !op_is_collective(o->type) && o->peer >= 0 && o->peer < j->world ? o->peer : -1;
	p->group = o->group;
	p->group_last = o->group_last;
	p->coll = op_is_collective(o->type);
	if (p->coll)
		p->cseq = j->next_cseq[c->rank]++;
	if (j->state == JOB_FAILED) {
		char detail[320];

		/* the job has failed: answer at once, nothing will run; the op first, as engine.c */
		snprintf(detail, sizeof detail, "op %llu (%s): %s", (unsigned long long)p->seq,
			 op_type_name(p->type), j->fail_detail);
		op_answer(c, p, j->fail_code,
			  strncmp(j->fail_detail, "op ", 3) ? detail : j->fail_detail);
		free(p);
		return 0;
	}
	/* a refused op is queued all the same: answered in order, and its partners fail */
	check_op(c, o, p);
	if (o->ready_event.len == sizeof p->ready_event) {
		memcpy(p->ready_event, o->ready_event.data, sizeof p->ready_event);
		p->has_event = 1;
	} else if (o->ready_event.len) {
		refuse(p, COMM_ERR_INVALID_ARG, "op %llu: a ready event has %zu bytes, not %zu",
		       (unsigned long long)p->seq, o->ready_event.len, sizeof p->ready_event);
	}
	if (o->done)
		check_done(c, o, p);
	if (srv.draining)
		refuse(p, COMM_ERR_SHUTDOWN, "op %llu (%s): commd is shutting down: no new ops",
		       (unsigned long long)p->seq, op_type_name(p->type));
	else if (p->coll && j->nleft)
		refuse(p, COMM_ERR_PEER_LOST, "op %llu (%s): %s", (unsigned long long)p->seq,
		       op_type_name(p->type), j->left_detail);
	/* a recv from another daemon's rank that left may get what it sent (start_net_p2p) */
	else if (!p->coll && p->peer >= 0 && j->left[p->peer] &&
		 (p->type != COMMPB__OP_TYPE__OP_RECV || dist_local(j, p->peer)))
		refuse(p, COMM_ERR_PEER_LOST, "op %llu (%s): rank %d left the job",
		       (unsigned long long)p->seq, op_type_name(p->type), p->peer);
	engine_post(c, p);
	return 0;
}

int req_op_exec(struct conn *c, const Commpb__Envelope *env, int *fds, int nfds)
{
	/* ops of the ring published before this one come first (seq order) */
	ring_drain(c);
	if (c->closing || c->doomed)
		return 0;
	if (op_post(c, env->op, env->id, 0) < 0)
		return -1;
	ring_drain(c);
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
