/* ctl-abort.c: commctl abort JOB: the operator fails a job (req-job-abort.c). */
#include <stdio.h>

#include "comm.h"
#include "ctl.h"

int ctl_abort(struct ctl *ctl, int argc, char **argv)
{
	Commpb__Envelope env = COMMPB__ENVELOPE__INIT, *reply;
	Commpb__JobAbort ja = COMMPB__JOB_ABORT__INIT;
	const Commpb__JobAbortReply *ar;
	int rc;

	(void)argc;
	ja.job = argv[0];
	ja.reason = (char *)ctl->reason;
	ja.by_uid = ctl->uid >= 0;
	ja.uid = ja.by_uid ? (uint32_t)ctl->uid : 0;
	env.id = 1;
	env.body_case = COMMPB__ENVELOPE__BODY_JOB_ABORT;
	env.job_abort = &ja;
	if (!(reply = ctl_call(ctl, &env)))
		return 1;
	if (reply->body_case != COMMPB__ENVELOPE__BODY_JOB_ABORT_REPLY) {
		fprintf(stderr, "commctl: abort: unexpected answer\n");
		commpb__envelope__free_unpacked(reply, NULL);
		return 1;
	}
	ar = reply->job_abort_reply;
	rc = ar->status != COMM_OK;
	if (ctl->json) {
		printf("{\"job\": ");
		ctl_json_str(argv[0]);
		printf(", \"status\": \"%s\", \"already_failed\": %s, \"detail\": ",
		       comm_result_name(ar->status), ar->already_failed ? "true" : "false");
		ctl_json_str(ar->detail);
		printf("}\n");
	} else if (rc) {
		fprintf(stderr, "commctl: %s: %s\n", comm_result_name(ar->status), ar->detail);
	} else {
		printf("%s\n", ar->detail);
	}
	commpb__envelope__free_unpacked(reply, NULL);
	return rc;
}
