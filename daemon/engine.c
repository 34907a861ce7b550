/*
 * engine.c: op #k of a job runs when every rank has posted it and they
 * agree on it; answers go back to every rank in posting order.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "commd.h"
#include "dtype.h"
#include "log.h"
#include "util.h"

const char *op_type_name(Commpb__OpType t)
{
	switch (t) {
	case COMMPB__OP_TYPE__OP_ALLREDUCE:
		return "allreduce";
	case COMMPB__OP_TYPE__OP_REDUCE_SCATTER:
		return "reduce_scatter";
	case COMMPB__OP_TYPE__OP_ALLGATHER:
		return "allgather";
	default:
		return "?";
	}
}

static int op_reduces(Commpb__OpType t)
{
	return t == COMMPB__OP_TYPE__OP_ALLREDUCE || t == COMMPB__OP_TYPE__OP_REDUCE_SCATTER;
}

static void posted_free(struct posted *p)
{
	if (p->send.mem)
		mem_unref(p->send.mem);
	if (p->recv.mem)
		mem_unref(p->recv.mem);
	free(p);
}

/* Answer rank r's op p (if the rank is still there) and drop it. */
static void answer(struct job *j, int r, struct posted *p, comm_result_t code, const char *detail)
{
	Commpb__Envelope env = COMMPB__ENVELOPE__INIT;
	Commpb__OpDone done = COMMPB__OP_DONE__INIT;

	TAILQ_REMOVE(&j->posted[r], p, link);
	if (j->ranks[r] && p->error == COMM_OK) {
		done.seq = p->seq;
		done.status = code;
		done.detail = (char *)detail;
		env.id = p->req_id;
		env.body_case = COMMPB__ENVELOPE__BODY_OP_DONE;
		env.op_done = &done;
		conn_send(j->ranks[r], &env);
	}
	posted_free(p);
}

void engine_post(struct conn *c, struct posted *p)
{
	struct job *j = c->job;

	TAILQ_INSERT_TAIL(&j->posted[c->rank], p, link);
	j->next_post[c->rank] = p->seq + 1;
	engine_kick(j);
}

void engine_fail_pending(struct job *j, int only, comm_result_t code, const char *detail)
{
	for (int r = 0; r < j->world; r++) {
		struct posted *p, *tmp;

		if (only >= 0 && r != only)
			continue;
		TAILQ_FOREACH_SAFE(p, &j->posted[r], link, tmp) {
			/* The op on the workers is answered when it finishes. */
			if (j->running && p->seq == j->next_run)
				continue;
			answer(j, r, p, code, detail);
		}
	}
}

void engine_free(struct job *j)
{
	for (int r = 0; r < j->world; r++) {
		struct posted *p;

		while ((p = TAILQ_FIRST(&j->posted[r]))) {
			TAILQ_REMOVE(&j->posted[r], p, link);
			posted_free(p);
		}
	}
}

/* Answer op next_run on every rank with code and move on. */
static void finish_op(struct job *j, comm_result_t code, const char *detail)
{
	for (int r = 0; r < j->world; r++) {
		struct posted *p = TAILQ_FIRST(&j->posted[r]);

		if (p && p->seq == j->next_run)
			answer(j, r, p, code, detail);
	}
	if (code == COMM_OK)
		j->ops_completed++;
	else
		j->errors++;
	j->next_run++;
}

/* Compare every rank's op with rank 0's; on disagreement fill detail. */
static int disagree(struct job *j, struct posted **ops, char *detail, size_t len)
{
	const struct posted *a = ops[0];

	for (int r = 1; r < j->world; r++) {
		const struct posted *b = ops[r];
		unsigned long long seq = (unsigned long long)a->seq;

		if (a->type != b->type) {
			snprintf(detail, len, "op %llu: type: rank 0 posted %s, rank %d posted %s",
				 seq, op_type_name(a->type), r, op_type_name(b->type));
			return 1;
		}
		if (a->count != b->count) {
			snprintf(detail, len, "op %llu: %s count: rank 0 has %llu, rank %d has %llu",
				 seq, op_type_name(a->type), (unsigned long long)a->count, r,
				 (unsigned long long)b->count);
			return 1;
		}
		if (a->dtype != b->dtype) {
			snprintf(detail, len, "op %llu: %s dtype: rank 0 has %s, rank %d has %s",
				 seq, op_type_name(a->type), dtype_name((int)a->dtype), r,
				 dtype_name((int)b->dtype));
			return 1;
		}
		if (op_reduces(a->type) && a->redop != b->redop) {
			snprintf(detail, len, "op %llu: %s redop: rank 0 has %s, rank %d has %s",
				 seq, op_type_name(a->type), redop_name((int)a->redop), r,
				 redop_name((int)b->redop));
			return 1;
		}
	}
	return 0;
}

static struct task *task_new(struct job *j, struct posted **ops)
{
	struct task *t = calloc(1, sizeof *t);

	if (!t)
		return NULL;
	t->in = calloc((size_t)j->world, sizeof *t->in);
	t->out = calloc((size_t)j->world, sizeof *t->out);
	if (!t->in || !t->out) {
		free(t->in);
		free(t->out);
		free(t);
		return NULL;
	}
	t->job = j;
	t->type = ops[0]->type;
	t->n = j->world;
	t->dtype = ops[0]->dtype;
	t->redop = ops[0]->redop;
	t->count = ops[0]->count;
	t->esize = dtype_size((int)t->dtype);
	for (int r = 0; r < j->world; r++) {
		t->in[r] = ops[r]->send.mem->addr + ops[r]->send.off;
		t->out[r] = ops[r]->recv.mem->addr + ops[r]->recv.off;
		t->bytes += ops[r]->recv.len;
	}
	return t;
}

static void task_free(struct task *t)
{
	free(t->snapshot);
	free(t->in);
	free(t->out);
	free(t);
}

/* The op on the workers is finished: answer it (failed if the job failed). */
static void finish_task(struct task *t)
{
	struct job *j = t->job;

	j->running = NULL;
	if (t->status != COMM_OK) {
		finish_op(j, t->status, "host backend: out of memory");
	} else if (j->state == JOB_READY) {
		j->bytes_moved += t->bytes;
		srv.bytes_moved += t->bytes;
		srv.ops_completed++;
		finish_op(j, COMM_OK, "");
	} else {
		finish_op(j, j->fail_code, j->fail_detail);
	}
	task_free(t);
}

void engine_task_done(struct task *t)
{
	struct job *j = t->job;

	finish_task(t);
	if (!job_maybe_free(j))
		engine_kick(j);
}

void engine_kick(struct job *j)
{
	struct posted **ops;
	char detail[256];

	if (j->state != JOB_READY || j->running)
		return;
	ops = calloc((size_t)j->world, sizeof *ops);
	if (!ops) {
		job_fail(j, COMM_ERR_NO_MEMORY, "engine: out of memory");
		return;
	}
	while (j->state == JOB_READY && !j->running) {
		struct task *t;
		int bad = -1;

		for (int r = 0; r < j->world; r++) {
			ops[r] = TAILQ_FIRST(&j->posted[r]);
			if (!ops[r] || ops[r]->seq != j->next_run)
				goto out;
			if (ops[r]->error != COMM_OK && bad < 0)
				bad = r;
		}
		if (bad >= 0) {
			snprintf(detail, sizeof detail, "op %llu: refused on rank %d: %.200s",
				 (unsigned long long)j->next_run, bad, ops[bad]->detail);
			finish_op(j, ops[bad]->error, detail);
			continue;
		}
		if (disagree(j, ops, detail, sizeof detail)) {
			log_info("job %s: %s", j->name, detail);
			finish_op(j, COMM_ERR_MISMATCH, detail);
			continue;
		}
		if (ops[0]->count == 0) {
			srv.ops_completed++;
			finish_op(j, COMM_OK, "");
			continue;
		}
		t = task_new(j, ops);
		if (!t) {
			finish_op(j, COMM_ERR_NO_MEMORY, "engine: out of memory");
			continue;
		}
		j->running = t;
		if (be_host_run(t))
			finish_task(t);
	}
out:
	free(ops);
}
