/*
 * req-hello.c: the version handshake that opens every connection, and the
 * join of a rank to its job (answered once the whole job is there).
 */
#include <stdio.h>

#include "commd.h"
#include "log.h"

int req_hello_exec(struct conn *c, const Commpb__Envelope *env, int *fds, int nfds)
{
	const Commpb__Hello *h = env->hello;
	Commpb__Envelope reply = COMMPB__ENVELOPE__INIT;
	Commpb__HelloReply hr = COMMPB__HELLO_REPLY__INIT;
	char err[256];
	comm_result_t rc;

	hr.version_min = PROTO_VERSION_MIN;
	hr.version_max = PROTO_VERSION;
	hr.daemon_version = COMMD_VERSION;
	reply.id = env->id;
	reply.body_case = COMMPB__ENVELOPE__BODY_HELLO_REPLY;
	reply.hello_reply = &hr;

	if (h->version_max < PROTO_VERSION_MIN || h->version_min > PROTO_VERSION) {
		hr.status = COMM_ERR_VERSION;
		snprintf(err, sizeof err,
			 "hello: client speaks protocol %u..%u, commd %s speaks %d..%d",
			 h->version_min, h->version_max, COMMD_VERSION, PROTO_VERSION_MIN,
			 PROTO_VERSION);
		hr.detail = err;
		log_info("conn %llu: %s", (unsigned long long)c->id, err);
		conn_send(c, &reply);
		return -1;
	}
	hr.version = h->version_max < PROTO_VERSION ? h->version_max : PROTO_VERSION;
	c->version = hr.version;
	c->hello_done = 1;
	c->role = h->role;

	if (h->role == COMMPB__ROLE__ROLE_ADMIN) {
		hr.status = COMM_OK;
		return conn_send(c, &reply);
	}
	if (h->role != COMMPB__ROLE__ROLE_RANK) {
		conn_fail(c, COMM_ERR_INVALID_ARG, "hello: unknown role %d", (int)h->role);
		return -1;
	}
	if (srv.draining) {
		hr.status = COMM_ERR_SHUTDOWN;
		hr.detail = "join: commd is shutting down";
		conn_send(c, &reply);
		return -1;
	}
	rc = job_join(c, h, err, sizeof err);
	if (rc != COMM_OK) {
		hr.status = rc;
		hr.detail = err;
		log_info("conn %llu (pid %d): %s", (unsigned long long)c->id, (int)c->pid, err);
		conn_send(c, &reply);
		return -1;
	}
	c->hello_id = env->id;
	/* The last rank to join answers everyone's hello. */
	if (c->job->state == JOB_READY)
		job_announce(c->job);
	return 0;
}
