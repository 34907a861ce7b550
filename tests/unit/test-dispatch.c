/*
 * test-dispatch.c: every body of the Envelope's oneof has an entry in the
 * daemon's dispatch table: a request with a handler, or a reply without.
 */
#include <string.h>

#include "check.h"
#include "../../daemon/req.c"

/* req.c's handlers and helpers, never called here: only their addresses count. */
#define HANDLER(name)                                                          \
	int name(struct conn *c, const Commpb__Envelope *env, int *fds, int nfds) \
	{                                                                      \
		return 0;                                                      \
	}
HANDLER(req_hello_exec)
HANDLER(req_mem_register_exec)
HANDLER(req_mem_free_exec)
HANDLER(req_op_exec)
HANDLER(req_leave_exec)
HANDLER(req_abort_exec)
HANDLER(req_status_exec)
HANDLER(req_topo_exec)
HANDLER(req_ring_attach_exec)
HANDLER(req_job_abort_exec)

int req_mem_register_fds(const Commpb__Envelope *env)
{
	return 1;
}

void conn_fail(struct conn *c, comm_result_t code, const char *fmt, ...)
{
}

void conn_error(struct conn *c, uint64_t id, comm_result_t code, const char *fmt, ...)
{
}

int conn_send(struct conn *c, const Commpb__Envelope *env)
{
	return 0;
}

int main(void)
{
	const ProtobufCMessageDescriptor *d = &commpb__envelope__descriptor;
	unsigned bodies = 0;

	for (unsigned i = 0; i < d->n_fields; i++) {
		const ProtobufCFieldDescriptor *f = &d->fields[i];
		const struct req_type *t;
		int is_reply;

		if (!(f->flags & PROTOBUF_C_FIELD_FLAG_ONEOF))
			continue;
		bodies++;
		t = req_find(f->id);
		CHECK(t && t->name, "body %s (%u) has no dispatch entry", f->name, f->id);
		if (!t || !t->name)
			continue;
		CHECK(strcmp(t->name, f->name) == 0, "entry %u is named %s, body is %s", f->id,
		      t->name, f->name);
		is_reply = strstr(f->name, "_reply") || strcmp(f->name, "op_done") == 0 ||
			   strcmp(f->name, "error") == 0;
		CHECK(is_reply ? t->exec == NULL : t->exec != NULL,
		      "body %s: a %s must %shave a handler", f->name, is_reply ? "reply" : "request",
		      is_reply ? "not " : "");
	}
	CHECK(bodies > 0, "no oneof bodies found");
	/* and every named entry is a body of the oneof */
	for (unsigned c = 1; c < req_table_size(); c++) {
		const struct req_type *t = req_find(c);
		const ProtobufCFieldDescriptor *f =
			protobuf_c_message_descriptor_get_field(d, c);

		if (t->name)
			CHECK(f && (f->flags & PROTOBUF_C_FIELD_FLAG_ONEOF),
			      "entry %u (%s) is no body of the envelope", c, t->name);
	}
	/* out of range cases are refused, not read past the table */
	CHECK(req_find(req_table_size()) == NULL, "case past the table");
	CHECK(req_find(100000) == NULL, "case far past the table");
	return CHECK_EXIT();
}
