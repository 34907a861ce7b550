/*
 * req-job-abort.c: commctl abort: the operator fails a job that hangs or
 * must stop, as if one of its ranks had called comm_abort. Its ranks get
 * COMM_ERR_ABORTED saying who did it and why; over several daemons, the
 * others learn it as they learn any failure (peer_job_failed).
 */
#include <stdio.h>
#include <string.h>

#include "commd.h"
#include "log.h"

#define REASON_MAX 120 /* what of the operator's reason the ranks are told */

/* src without control bytes, cut to REASON_MAX, into dst. */
static void clean_reason(char *dst, const char *src)
{
	size_t n = 0;

	for (; *src && n < REASON_MAX; src++)
		dst[n++] = (unsigned char)*src < 0x20 || *src == 0x7f ? ' ' : *src;
	dst[n] = '\0';
}

int req_job_abort_exec(struct conn *c, const Commpb__Envelope *env, int *fds, int nfds)
{
	const Commpb__JobAbort *ja = env->job_abort;
	Commpb__Envelope reply = COMMPB__ENVELOPE__INIT;
	Commpb__JobAbortReply ar = COMMPB__JOB_ABORT_REPLY__INIT;
	char detail[640], reason[REASON_MAX + 1], uids[96] = "";
	struct job *j, *found = NULL;
	size_t ul = 0;
	int n = 0;

	(void)fds;
	(void)nfds;
	reply.id = env->id;
	reply.body_case = COMMPB__ENVELOPE__BODY_JOB_ABORT_REPLY;
	reply.job_abort_reply = &ar;
	ar.detail = detail;
	conn_is_admin(c);
	/* what the asker may see (as commctl status shows it), and of that uid */
	TAILQ_FOREACH(j, &srv.jobs, link) {
		if (strcmp(j->name, ja->job) || (ja->by_uid && j->uid != ja->uid) ||
		    (!c->admin && j->uid != c->uid))
			continue;
		if (ul < sizeof uids)
			ul += (size_t)snprintf(uids + ul, sizeof uids - ul, "%s%u", n ? ", " : "",
					       (unsigned)j->uid);
		found = j;
		n++;
	}
	if (n == 0) {
		ar.status = COMM_ERR_NOT_FOUND;
		snprintf(detail, sizeof detail, "abort: no job named %.*s%s", JOB_NAME_MAX, ja->job,
			 ja->by_uid ? " of that uid" : "");
		return conn_send(c, &reply);
	}
	if (n > 1) {
		ar.status = COMM_ERR_INVALID_ARG;
		snprintf(detail, sizeof detail,
			 "abort: %d jobs are named %.*s (uids %s): say whose with --uid", n,
			 JOB_NAME_MAX, ja->job, uids);
		return conn_send(c, &reply);
	}
	j = found;
	if (j->state == JOB_FAILED) {
		ar.already_failed = 1;
		snprintf(detail, sizeof detail, "job %s had already failed: %s: %s", j->name,
			 comm_result_name(j->fail_code), j->fail_detail);
		return conn_send(c, &reply);
	}
	clean_reason(reason, ja->reason);
	log_warn("job %s: aborted by uid %u (pid %d) with commctl%s%s", j->name, (unsigned)c->uid,
		 (int)c->pid, *reason ? ": " : "", reason);
	snprintf(detail, sizeof detail, "job %s (uid %u, %d rank%s, %s): aborted", j->name,
		 (unsigned)j->uid, j->world, j->world == 1 ? "" : "s", job_state_name(j->state));
	job_fail(j, COMM_ERR_ABORTED, "aborted by the operator (uid %u, commctl abort)%s%s",
		 (unsigned)c->uid, *reason ? ": " : "", reason);
	return conn_send(c, &reply);
}
