/*
 * req-mem.c: a rank registers a sealed memfd or device memory, or frees a
 * registration. Device memory is answered once the job's GPU worker has
 * opened it (gpu-ops.c).
 */
#include <stdio.h>
#include <unistd.h>

#include "commd.h"
#include "log.h"

/* A memfd or VMM allocation rides with the message; an IPC handle is in it. */
int req_mem_register_fds(const Commpb__Envelope *env)
{
	return env->register_mem->kind == COMMPB__MEM_KIND__MEM_CUDA_IPC ? 0 : 1;
}

int req_mem_register_exec(struct conn *c, const Commpb__Envelope *env, int *fds, int nfds)
{
	const Commpb__RegisterMem *r = env->register_mem;
	Commpb__Envelope reply = COMMPB__ENVELOPE__INIT;
	Commpb__RegisterMemReply rr = COMMPB__REGISTER_MEM_REPLY__INIT;
	char err[256] = "";
	struct mem *m;

	if (r->kind == COMMPB__MEM_KIND__MEM_CUDA_IPC || r->kind == COMMPB__MEM_KIND__MEM_CUDA_VMM) {
		rr.status = gpu_mem_register(c, r, nfds ? fds[0] : -1, env->id, err, sizeof err);
		if (rr.status == COMM_INPROGRESS)
			return 0;
		log_info("job %s rank %d: %s", c->job->name, c->rank, err);
	} else if (r->kind != COMMPB__MEM_KIND__MEM_MEMFD) {
		close(fds[0]);
		rr.status = COMM_ERR_UNSUPPORTED;
		snprintf(err, sizeof err, "mem register: unknown kind %d", (int)r->kind);
	} else {
		rr.status = mem_register(c, fds[0], r->size, &m, err, sizeof err);
		if (rr.status == COMM_OK)
			rr.mem_id = m->id;
		else
			log_info("job %s rank %d: %s", c->job->name, c->rank, err);
	}
	rr.detail = err;
	reply.id = env->id;
	reply.body_case = COMMPB__ENVELOPE__BODY_REGISTER_MEM_REPLY;
	reply.register_mem_reply = &rr;
	conn_send(c, &reply);
	return 0;
}

int req_mem_free_exec(struct conn *c, const Commpb__Envelope *env, int *fds, int nfds)
{
	Commpb__Envelope reply = COMMPB__ENVELOPE__INIT;
	Commpb__FreeMemReply fr = COMMPB__FREE_MEM_REPLY__INIT;
	struct mem *m = mem_find(c, env->free_mem->mem_id);
	char err[128] = "";

	if (m) {
		/* Ops still using it keep the mapping until they finish. */
		mem_release(c, m);
		fr.status = COMM_OK;
	} else {
		fr.status = COMM_ERR_NOT_FOUND;
		snprintf(err, sizeof err, "mem free: no mem id %llu",
			 (unsigned long long)env->free_mem->mem_id);
	}
	fr.detail = err;
	reply.id = env->id;
	reply.body_case = COMMPB__ENVELOPE__BODY_FREE_MEM_REPLY;
	reply.free_mem_reply = &fr;
	conn_send(c, &reply);
	return 0;
}
