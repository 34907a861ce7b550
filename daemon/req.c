/*
 * req.c: the dispatch table and the checks every request passes, in one
 * place and in order: unpack, known type, handshake, role, fd count.
 */
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include "commd.h"
#include "log.h"
#include "util.h"

#define B(x) COMMPB__ENVELOPE__BODY_##x

static const struct req_type req_table[] = {
	[COMMPB__ENVELOPE__BODY__NOT_SET] = { "none", 0, 0, NULL },
	[B(HELLO)] = { "hello", REQ_F_BEFORE_HELLO, 0, req_hello_exec },
	[B(HELLO_REPLY)] = { "hello_reply", 0, 0, NULL },
	[B(REGISTER_MEM)] = { "register_mem", REQ_F_RANK, 1, req_mem_register_exec,
			      req_mem_register_fds },
	[B(REGISTER_MEM_REPLY)] = { "register_mem_reply", 0, 0, NULL },
	[B(FREE_MEM)] = { "free_mem", REQ_F_RANK, 0, req_mem_free_exec },
	[B(FREE_MEM_REPLY)] = { "free_mem_reply", 0, 0, NULL },
	[B(OP)] = { "op", REQ_F_RANK, 0, req_op_exec },
	[B(OP_DONE)] = { "op_done", 0, 0, NULL },
	[B(LEAVE)] = { "leave", REQ_F_RANK, 0, req_leave_exec },
	[B(ABORT)] = { "abort", REQ_F_RANK, 0, req_abort_exec },
	[B(ERROR)] = { "error", 0, 0, NULL },
	[B(STATUS_REQUEST)] = { "status_request", REQ_F_ADMIN, 0, req_status_exec },
	[B(STATUS_REPLY)] = { "status_reply", 0, 0, NULL },
	[B(TOPO_REQUEST)] = { "topo_request", REQ_F_ADMIN, 0, req_topo_exec },
	[B(TOPO_REPLY)] = { "topo_reply", 0, 0, NULL },
	[B(RING_ATTACH)] = { "ring_attach", REQ_F_RANK, 1, req_ring_attach_exec },
	[B(RING_ATTACH_REPLY)] = { "ring_attach_reply", 0, 0, NULL },
	[B(JOB_ABORT)] = { "job_abort", REQ_F_ADMIN, 0, req_job_abort_exec },
	[B(JOB_ABORT_REPLY)] = { "job_abort_reply", 0, 0, NULL },
};

const struct req_type *req_find(unsigned body_case)
{
	if (body_case >= ARRAY_SIZE(req_table))
		return NULL;
	return &req_table[body_case];
}

unsigned req_table_size(void)
{
	return ARRAY_SIZE(req_table);
}

/*
 * The fds of env were lost to commd's fd limit: refuse it with BUSY in its
 * own reply, so the rank may try again later and its job goes on.
 */
static void refuse_lost_fds(struct conn *c, const Commpb__Envelope *env, const char *name)
{
	static char detail[] = "commd is out of file descriptors: the fd of this request was "
			       "lost; try again later";
	Commpb__Envelope reply = COMMPB__ENVELOPE__INIT;
	Commpb__RegisterMemReply rr = COMMPB__REGISTER_MEM_REPLY__INIT;
	Commpb__RingAttachReply ra = COMMPB__RING_ATTACH_REPLY__INIT;

	log_warn("conn %llu (pid %d): %s: its fd was lost to the fd limit", (unsigned long long)c->id,
		 (int)c->pid, name);
	reply.id = env->id;
	if (env->body_case == B(REGISTER_MEM)) {
		rr.status = COMM_ERR_BUSY;
		rr.detail = detail;
		reply.body_case = B(REGISTER_MEM_REPLY);
		reply.register_mem_reply = &rr;
	} else {
		ra.status = COMM_ERR_BUSY;
		ra.detail = detail;
		reply.body_case = B(RING_ATTACH_REPLY);
		reply.ring_attach_reply = &ra;
	}
	conn_send(c, &reply);
}

int req_dispatch(struct conn *c, const uint8_t *payload, size_t len)
{
	Commpb__Envelope *env = commpb__envelope__unpack(NULL, len, payload);
	const struct req_type *t;
	int fds[FRAME_MAX_FDS], nfds = 0, want, rc = -1;

	if (!env) {
		conn_fail(c, COMM_ERR_PROTOCOL, "protocol: malformed message (%zu bytes)", len);
		return -1;
	}
	t = req_find(env->body_case);
	if (env->body_case == COMMPB__ENVELOPE__BODY__NOT_SET) {
		/* a type this daemon does not know: a newer client's, most likely */
		char what[32] = "none given";

		if (env->base.n_unknown_fields)
			snprintf(what, sizeof what, "field %u", env->base.unknown_fields[0].tag);
		conn_fail(c, COMM_ERR_VERSION,
			  "protocol: unknown message type (%s): commd %s speaks protocol %d..%d",
			  what, COMMD_VERSION, PROTO_VERSION_MIN, PROTO_VERSION);
		goto out;
	}
	if (!t || !t->name || !t->exec) {
		conn_fail(c, COMM_ERR_PROTOCOL, "protocol: unexpected message type %d%s%s",
			  (int)env->body_case, t && t->name ? " " : "", t && t->name ? t->name : "");
		goto out;
	}
	if (!c->hello_done && !(t->flags & REQ_F_BEFORE_HELLO)) {
		conn_fail(c, COMM_ERR_PROTOCOL, "protocol: %s before hello", t->name);
		goto out;
	}
	if (c->hello_done && (t->flags & REQ_F_BEFORE_HELLO)) {
		/* refused, not closed: the connection keeps its job and rank */
		if (c->job)
			conn_error(c, env->id, COMM_ERR_PROTOCOL,
			       "protocol: %s twice (rank %d of job %s already)", t->name, c->rank,
			       c->job->name);
		else
			conn_error(c, env->id, COMM_ERR_PROTOCOL, "protocol: %s twice", t->name);
		rc = 0;
		goto out;
	}
	if ((t->flags & REQ_F_RANK) && (c->role != COMMPB__ROLE__ROLE_RANK || !c->job)) {
		conn_fail(c, COMM_ERR_PROTOCOL, "protocol: %s needs a rank of a job", t->name);
		goto out;
	}
	if ((t->flags & REQ_F_ADMIN) && c->role != COMMPB__ROLE__ROLE_ADMIN) {
		conn_fail(c, COMM_ERR_PERMISSION, "%s: not an admin connection", t->name);
		goto out;
	}
	want = t->fds_of ? t->fds_of(env) : t->nfds;
	if (want > 0 && c->rd.nfds > 0 && c->rd.fds[0] == FRAME_FD_LOST) {
		frame_take_fd(&c->rd);
		refuse_lost_fds(c, env, t->name);
		rc = 0;
		goto out;
	}
	if (c->rd.nfds < want) {
		conn_fail(c, COMM_ERR_PROTOCOL, "protocol: %s needs %d fd%s, got %d", t->name,
			  want, want == 1 ? "" : "s", c->rd.nfds);
		goto out;
	}
	while (nfds < want)
		fds[nfds++] = frame_take_fd(&c->rd);
	rc = t->exec(c, env, fds, nfds);
out:
	commpb__envelope__free_unpacked(env, NULL);
	return rc;
}
