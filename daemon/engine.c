/*
 * engine.c: matching the ops the ranks post. A collective runs when every
 * rank has it in its current unit (one op, a whole group, or a run of
 * sends and recvs outside groups) and they agree on it; a send runs when
 * its receiver has the matching recv in its current unit. A rank's ops are
 * answered in posting order: a group at once, any other op as it finishes;
 * but when the job fails, the ops not running are answered at once and a
 * running one when its task ends (libcomm delivers in posting order anyway).
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
	case COMMPB__OP_TYPE__OP_BROADCAST:
		return "broadcast";
	case COMMPB__OP_TYPE__OP_REDUCE:
		return "reduce";
	case COMMPB__OP_TYPE__OP_ALLTOALL:
		return "alltoall";
	case COMMPB__OP_TYPE__OP_SEND:
		return "send";
	case COMMPB__OP_TYPE__OP_RECV:
		return "recv";
	case COMMPB__OP_TYPE__OP_BARRIER:
		return "barrier";
	default:
		return "?";
	}
}

int op_is_collective(Commpb__OpType t)
{
	return t != COMMPB__OP_TYPE__OP_SEND && t != COMMPB__OP_TYPE__OP_RECV;
}

int op_reduces(Commpb__OpType t)
{
	return t == COMMPB__OP_TYPE__OP_ALLREDUCE || t == COMMPB__OP_TYPE__OP_REDUCE_SCATTER ||
	       t == COMMPB__OP_TYPE__OP_REDUCE;
}

static int op_has_root(Commpb__OpType t)
{
	return t == COMMPB__OP_TYPE__OP_BROADCAST || t == COMMPB__OP_TYPE__OP_REDUCE;
}

/* Drop p's memory and free it. */
static void posted_drop(struct posted *p)
{
	if (p->send.mem)
		mem_unref(p->send.mem);
	if (p->recv.mem)
		mem_unref(p->recv.mem);
	if (p->done_flag.mem)
		mem_unref(p->done_flag.mem);
	free(p);
}

/* Free p, which has left its rank's queue. */
static void posted_free(struct job *j, struct posted *p)
{
	j->nposted[p->rank]--;
	posted_drop(p);
}

/* Take p off its rank's queue. */
static void posted_unlink(struct job *j, struct posted *p)
{
	struct unit_marks *m = &j->marks[p->rank];

	if (m->last == p)
		m->last = NULL;
	if (m->p2p == p)
		m->p2p = NULL;
	if (m->coll == p)
		m->coll = NULL;
	if (m->fin == p)
		m->fin = NULL;
	TAILQ_REMOVE(&j->posted[p->rank], p, link);
}

/* Answer p (once) if its rank is still there. */
static void reply(struct job *j, struct posted *p, comm_result_t code, const char *detail)
{
	if (p->answered)
		return;
	p->answered = 1;
	if (j->ranks[p->rank])
		op_answer(j->ranks[p->rank], p, code, detail);
}

static void set_done(struct posted *p, comm_result_t code, const char *detail)
{
	p->done = 1;
	p->status = code;
	if (code != COMM_OK && detail != p->detail)
		snprintf(p->detail, sizeof p->detail, "%s", detail);
}

void engine_post(struct conn *c, struct posted *p)
{
	struct job *j = c->job;

	log_debug("job %s: rank %d posts op %llu: %s%s count %llu peer %d root %d group %llu%s",
		  j->name, c->rank, (unsigned long long)p->seq, op_type_name(p->type),
		  p->done ? " (refused)" : "", (unsigned long long)p->count, p->peer, p->root,
		  (unsigned long long)p->group, p->group_last ? " (last)" : "");
	TAILQ_INSERT_TAIL(&j->posted[c->rank], p, link);
	j->nposted[c->rank]++;
	/* a group progresses once all of it is there */
	if (!p->group || p->group_last)
		engine_kick(j);
}

/*
 * What op p answers when its job failed for detail: the op first, as
 * engine_rank_left words it, unless detail names an op itself (a deadline).
 */
static const char *failed_op_detail(const struct posted *p, const char *detail, char *buf,
				    size_t len)
{
	if (strncmp(detail, "op ", 3) == 0)
		return detail;
	snprintf(buf, len, "op %llu (%s): %s", (unsigned long long)p->seq, op_type_name(p->type),
		 detail);
	return buf;
}

void engine_fail_pending(struct job *j, int only, comm_result_t code, const char *detail)
{
	char buf[320];

	for (int r = 0; r < j->world; r++) {
		struct posted *p, *tmp;

		if (only >= 0 && r != only)
			continue;
		TAILQ_FOREACH_SAFE(p, &j->posted[r], link, tmp) {
			if (p->running)
				continue;
			reply(j, p, code, failed_op_detail(p, detail, buf, sizeof buf));
			posted_unlink(j, p);
			posted_free(j, p);
		}
	}
}

void engine_free(struct job *j)
{
	for (int r = 0; r < j->world; r++) {
		struct posted *p;

		while ((p = TAILQ_FIRST(&j->posted[r]))) {
			posted_unlink(j, p);
			posted_free(j, p);
		}
	}
}

/*
 * The last op of rank r's current unit: the group its first op opens, once
 * the group's last op has arrived; the run of sends and recvs outside
 * groups its first op starts, as far as they have arrived (so that ranks
 * that each isend, then irecv, meet as they would in a group, where NCCL
 * would need one); else its first op alone. NULL: nothing yet.
 */
static struct posted *unit_last(struct job *j, int r)
{
	struct posted *p = TAILQ_FIRST(&j->posted[r]), *q;

	if (p && !p->group && !op_is_collective(p->type)) {
		/* from where the last call saw it end: each op is walked once */
		if (j->marks[r].last)
			p = j->marks[r].last;
		while ((q = TAILQ_NEXT(p, link)) && !q->group && !op_is_collective(q->type))
			p = q;
		return j->marks[r].last = p;
	}
	if (!p || !p->group)
		return p;
	if (j->marks[r].last)
		return j->marks[r].last;
	for (; p; p = TAILQ_NEXT(p, link))
		if (p->group_last)
			return j->marks[r].last = p;
	return NULL;
}

#define UNIT_FOREACH(p, j, r, last)                                            \
	for ((p) = (last) ? TAILQ_FIRST(&(j)->posted[r]) : NULL; (p);          \
	     (p) = (p) == (last) ? NULL : TAILQ_NEXT(p, link))

/*
 * The first op of rank r's current unit (which ends at last) that may be
 * a send or recv still to pair: the ops before it are paired, collectives
 * or refused without a peer. Remembered, so that a unit of many sends and
 * recvs is not walked from its head for each pair.
 */
static struct posted *p2p_first(struct job *j, int r, struct posted *last)
{
	struct posted *p = j->marks[r].p2p ? j->marks[r].p2p : TAILQ_FIRST(&j->posted[r]);

	while (p != last && (op_is_collective(p->type) || p->matched || p->peer < 0))
		p = TAILQ_NEXT(p, link);
	return j->marks[r].p2p = p;
}

#define P2P_FOREACH(p, j, r, last)                                             \
	for ((p) = (last) ? p2p_first(j, r, last) : NULL; (p);                 \
	     (p) = (p) == (last) ? NULL : TAILQ_NEXT(p, link))

/*
 * Whether p is finished for everyone: done, and (when it was refused) seen
 * by its partners, which fail with it. A send or recv with another daemon's
 * rank is not until the data plane has had it (start_net_p2p takes it
 * even refused, or from a rank that left): once finished, an op stays so
 * (retire's mark relies on it).
 */
static int finished(const struct job *j, const struct posted *p)
{
	if (!p->done || p->running)
		return 0;
	if (p->coll)
		return p->cseq < j->next_coll || j->nleft;
	if (!p->matched && p->peer >= 0 && !dist_local(j, p->peer))
		return 0;
	return p->matched || p->peer < 0 || j->left[p->peer];
}

/* Answer every rank's finished units, in posting order. */
static void retire(struct job *j)
{
	for (int r = 0; r < j->world; r++) {
		struct posted *last, *p;

		while ((last = unit_last(j, r))) {
			int all_done;

			if (!TAILQ_FIRST(&j->posted[r])->group) /* each as it finishes */
				last = TAILQ_FIRST(&j->posted[r]);
			p = j->marks[r].fin ? j->marks[r].fin : TAILQ_FIRST(&j->posted[r]);
			while ((all_done = finished(j, p)) && p != last)
				p = TAILQ_NEXT(p, link);
			j->marks[r].fin = p;
			if (!all_done)
				break;
			do {
				p = TAILQ_FIRST(&j->posted[r]);
				reply(j, p, p->status, p->detail);
				posted_unlink(j, p);
				posted_free(j, p);
			} while (p != last);
		}
	}
}

/*
 * Rank r's collective number cseq, if it is in r's current unit. Asked for
 * the next to run (next_coll), the walk starts where the last such ended:
 * the collectives before that have run.
 */
static struct posted *unit_coll(struct job *j, int r, uint64_t cseq)
{
	struct posted *p = TAILQ_FIRST(&j->posted[r]), *last;

	if (!p || (!p->group && !op_is_collective(p->type))) /* a run holds none */
		return NULL;
	if (!(last = unit_last(j, r)))
		return NULL;
	if (cseq != j->next_coll) {
		UNIT_FOREACH(p, j, r, last)
			if (p->coll && p->cseq == cseq)
				return p;
		return NULL;
	}
	if (j->marks[r].coll)
		p = j->marks[r].coll;
	while (p != last && !(p->coll && p->cseq >= cseq))
		p = TAILQ_NEXT(p, link);
	j->marks[r].coll = p;
	return p->coll && p->cseq == cseq ? p : NULL;
}

/*
 * Compare the collective of every rank here with the first one's (rank 0 on
 * one node); on disagreement fill detail.
 */
static int disagree(struct job *j, struct posted **ops, char *detail, size_t len)
{
	const struct posted *a = NULL;
	int ra = -1;

	for (int r = 0; r < j->world; r++) {
		const struct posted *b = ops[r];
		unsigned long long seq;
		const char *name;

		if (!b)
			continue;
		if (!a) {
			a = b;
			ra = r;
			continue;
		}
		seq = (unsigned long long)a->cseq;
		name = op_type_name(a->type);
		if (a->type != b->type) {
			snprintf(detail, len,
				 "collective %llu: type: rank %d posted %s, rank %d posted %s", seq,
				 ra, name, r, op_type_name(b->type));
			return 1;
		}
		if (a->count != b->count) {
			snprintf(detail, len,
				 "collective %llu: %s count: rank %d has %llu, rank %d has %llu", seq,
				 name, ra, (unsigned long long)a->count, r,
				 (unsigned long long)b->count);
			return 1;
		}
		if (a->dtype != b->dtype) {
			snprintf(detail, len, "collective %llu: %s dtype: rank %d has %s, rank %d has %s",
				 seq, name, ra, dtype_name((int)a->dtype), r,
				 dtype_name((int)b->dtype));
			return 1;
		}
		if (op_reduces(a->type) && a->redop != b->redop) {
			snprintf(detail, len, "collective %llu: %s redop: rank %d has %s, rank %d has %s",
				 seq, name, ra, redop_name((int)a->redop), r,
				 redop_name((int)b->redop));
			return 1;
		}
		if (op_has_root(a->type) && a->root != b->root) {
			snprintf(detail, len, "collective %llu: %s root: rank %d has %d, rank %d has %d",
				 seq, name, ra, a->root, r, b->root);
			return 1;
		}
	}
	return 0;
}

static struct task *task_new(struct job *j, int nops, int n)
{
	struct task *t = calloc(1, sizeof *t);

	if (!t)
		return NULL;
	t->ops = calloc((size_t)nops, sizeof *t->ops);
	t->in = calloc((size_t)n, sizeof *t->in);
	t->out = calloc((size_t)n, sizeof *t->out);
	if (!t->ops || !t->in || !t->out) {
		free(t->ops);
		free(t->in);
		free(t->out);
		free(t);
		return NULL;
	}
	t->job = j;
	t->nops = nops;
	t->n = n;
	return t;
}

static void task_free(struct task *t)
{
	if (t->stage)
		gpu_stage_put(t);
	free(t->snapshot);
	free(t->ops);
	free(t->in);
	free(t->out);
	free(t);
}

static uint8_t *buf_addr(const struct bufspec *b)
{
	return b->mem ? b->mem->addr + b->off : NULL;
}

/*
 * The task of collective ops[0..world-1] (NULL for ranks on other nodes,
 * whose in and out stay NULL); NULL when memory ran out.
 */
static struct task *coll_task(struct job *j, struct posted **ops, int nlocal)
{
	struct task *t = task_new(j, nlocal, j->world);
	const struct posted *a = NULL;
	int i = 0;

	if (!t)
		return NULL;
	for (int r = 0; r < j->world; r++) {
		if (!ops[r])
			continue;
		a = a ? a : ops[r];
		t->ops[i++] = ops[r];
		t->in[r] = buf_addr(&ops[r]->send);
		t->out[r] = buf_addr(&ops[r]->recv);
		t->bytes += ops[r]->recv.len;
	}
	t->type = a->type;
	t->dtype = a->dtype;
	t->redop = a->redop;
	t->root = a->root;
	t->count = a->count;
	t->cseq = a->cseq;
	t->esize = dtype_size((int)t->dtype);
	return t;
}

/*
 * Start t on the backend its memory lives in (the host's threads, or the
 * job's GPU worker), or finish it at once: it ran inline, or could not run.
 */
static void start(struct job *j, struct task *t)
{
	int dev = gpu_task_on_device(t, t->detail, sizeof t->detail), done;

	for (int i = 0; i < t->nops; i++) {
		t->ops[i]->running = 1;
		t->ops[i]->task = t;
	}
	if (!t->net || t->peer < 0)
		j->running = t; /* one at a time, but device collectives queue behind it */
	j->tasks_out++;
	t->started_ms = now_ms();
	if (t->net) {
		t->device = dev > 0;
		if (dev < 0 && t->status == COMM_OK)
			t->status = COMM_ERR_UNSUPPORTED;
		else if (dev > 0 && t->status == COMM_OK)
			gpu_net_check(t);
		if (t->device && t->peer >= 0)
			gpu_p2p_start(t);
		else
			be_net_run(t);
		return;
	}
	if (dev < 0) {
		t->status = COMM_ERR_UNSUPPORTED;
		done = 1;
	} else {
		t->gpu = dev;
		done = dev ? be_gpu_run(t) : be_host_run(t);
	}
	if (done)
		engine_task_done(t);
}

/*
 * Across daemons every node runs every collective, failed or not, so that
 * the nodes agree on its outcome: the data plane swaps each node's verdict
 * (status, and the op as its first rank has it) before any data.
 */
static void start_net_collective(struct job *j, struct posted **ops, int nlocal,
				 comm_result_t code, const char *detail)
{
	struct task *t = coll_task(j, ops, nlocal);

	if (!t) {
		job_fail(j, COMM_ERR_NO_MEMORY, "engine: out of memory");
		return;
	}
	t->net = 1;
	t->peer = -1;
	t->status = code;
	if (code != COMM_OK)
		snprintf(t->detail, sizeof t->detail, "%s", detail);
	start(j, t);
}

/*
 * Rank r's collective number cseq, when it is the op right after those of
 * r's that are running (on the GPU worker), in a unit of its own. Not
 * behind a send or recv with another daemon: its data (and a device recv's
 * copy into place) may come after anything queued now.
 */
static struct posted *next_coll_behind(struct job *j, int r, uint64_t cseq)
{
	struct posted *p = TAILQ_FIRST(&j->posted[r]);

	while (p && p->running && (p->coll || dist_local(j, p->peer)))
		p = TAILQ_NEXT(p, link);
	return p && !p->group && p->coll && p->cseq == cseq ? p : NULL;
}

/* Whether op p moves only device memory (and moves some). */
static int posted_on_device(const struct posted *p)
{
	const struct bufspec *b[2] = { &p->send, &p->recv };
	int dev = 0;

	for (int k = 0; k < 2; k++) {
		if (!b[k]->mem)
			continue;
		if (b[k]->mem->kind == COMMPB__MEM_KIND__MEM_MEMFD)
			return 0;
		dev = 1;
	}
	return dev;
}

/*
 * Whether the collective in ops (this node's ranks') may start while device
 * ops run: when it is one too, and will surely run here. The worker runs a
 * job's ops in order on its streams, so the next one is queued behind the
 * last without a gap. Across daemons its verdicts are swapped meanwhile
 * (the other nodes may still refuse it, all together); it reaches the
 * worker after the one ahead did, since it starts only once that one is
 * there, so every node's worker gets them in the same order.
 */
static int may_queue_behind(struct job *j, struct posted **ops)
{
	const struct posted *a = NULL;
	char detail[256];

	for (int r = 0; r < j->world; r++) {
		if (!dist_local(j, r))
			continue;
		if (!ops[r] || ops[r]->done || !posted_on_device(ops[r]))
			return 0;
		a = a ? a : ops[r];
	}
	if (!a || a->type == COMMPB__OP_TYPE__OP_BARRIER || !a->count)
		return 0;
	return !disagree(j, ops, detail, sizeof detail);
}

/*
 * Try the next collective; 1 when something happened. behind_gpu: device
 * ops are running; only a device collective may start behind them.
 */
static int try_collective(struct job *j, int behind_gpu)
{
	struct posted **ops = j->scratch_ops;
	comm_result_t code = COMM_ERR_MISMATCH;
	char detail[256];
	int bad = -1, rc = 0, nlocal = 0;
	struct task *t;

	for (int r = 0; r < j->world; r++) {
		if (j->left[r]) /* none can run: engine_rank_left failed them */
			goto out;
		ops[r] = NULL;
		if (!dist_local(j, r))
			continue;
		ops[r] = behind_gpu ? next_coll_behind(j, r, j->next_coll)
				    : unit_coll(j, r, j->next_coll);
		if (!ops[r])
			goto out;
		if (ops[r]->done && bad < 0)
			bad = r;
		nlocal++;
	}
	if (behind_gpu && !may_queue_behind(j, ops))
		goto out;
	rc = 1;
	j->next_coll++;
	if (bad >= 0) {
		/* refused on one rank: the others fail the same way */
		code = ops[bad]->status;
		snprintf(detail, sizeof detail, "collective %llu: refused on rank %d: %.200s",
			 (unsigned long long)ops[bad]->cseq, bad, ops[bad]->detail);
	} else if (disagree(j, ops, detail, sizeof detail)) {
		log_info("job %s: %s", j->name, detail);
	} else if (dist_spans(j)) {
		start_net_collective(j, ops, nlocal, COMM_OK, "");
		goto out;
	} else if (ops[0]->type == COMMPB__OP_TYPE__OP_BARRIER || ops[0]->count == 0) {
		for (int r = 0; r < j->world; r++)
			set_done(ops[r], COMM_OK, "");
		j->ops_completed++;
		srv.ops_completed++;
		goto out;
	} else if ((t = coll_task(j, ops, nlocal))) {
		start(j, t);
		goto out;
	} else {
		code = COMM_ERR_NO_MEMORY;
		snprintf(detail, sizeof detail, "engine: out of memory");
	}
	if (dist_spans(j)) {
		/* the other nodes fail it too, with this detail */
		start_net_collective(j, ops, nlocal, code, detail);
		goto out;
	}
	j->errors++;
	for (int r = 0; r < j->world; r++)
		if (!ops[r]->done)
			set_done(ops[r], code, detail);
out:
	return rc;
}

/* The first unpaired recv from rank from in rank r's current unit. */
static struct posted *unit_recv_from(struct job *j, int r, int from)
{
	struct posted *last = unit_last(j, r), *p;

	P2P_FOREACH(p, j, r, last)
		if (p->type == COMMPB__OP_TYPE__OP_RECV && !p->matched && p->peer == from)
			return p;
	return NULL;
}

/*
 * Pair rank a's send s with its recv and run the copy (or fail both).
 * Returns 0 when the receiver has no matching recv in its current unit.
 */
static int pair(struct job *j, int a, struct posted *s)
{
	struct posted *q = unit_recv_from(j, s->peer, a);
	char detail[256];
	uint64_t sb, rb;
	struct task *t;

	if (!q)
		return 0;
	s->matched = q->matched = 1;
	sb = s->send.len;
	rb = q->recv.len;
	if (s->done || q->done) {
		struct posted *bad = s->done ? s : q, *other = s->done ? q : s;

		snprintf(detail, sizeof detail, "send from rank %d to rank %d: refused on rank %d: %.180s",
			 a, s->peer, bad->rank, bad->detail);
		if (!other->done)
			set_done(other, bad->status, detail);
		return 1;
	}
	if (sb != rb) {
		snprintf(detail, sizeof detail,
			 "send from rank %d to rank %d: %llu bytes sent, %llu expected", a, s->peer,
			 (unsigned long long)sb, (unsigned long long)rb);
		set_done(s, COMM_ERR_MISMATCH, detail);
		set_done(q, COMM_ERR_MISMATCH, detail);
		j->errors++;
		return 1;
	}
	if (sb == 0) {
		set_done(s, COMM_OK, "");
		set_done(q, COMM_OK, "");
		j->ops_completed++;
		srv.ops_completed++;
		return 1;
	}
	t = task_new(j, 2, 1);
	if (!t) {
		set_done(s, COMM_ERR_NO_MEMORY, "engine: out of memory");
		set_done(q, COMM_ERR_NO_MEMORY, "engine: out of memory");
		return 1;
	}
	t->type = COMMPB__OP_TYPE__OP_SEND;
	t->ops[0] = s;
	t->ops[1] = q;
	t->dtype = COMM_UINT8;
	t->esize = 1;
	t->count = sb;
	t->in[0] = buf_addr(&s->send);
	t->out[0] = buf_addr(&q->recv);
	t->bytes = sb;
	start(j, t);
	return 1;
}

/*
 * Messages rank a, on another daemon, sent rank b before it left (its
 * PeerRankLeft): b's recvs from a up to this index wait for their data.
 */
static uint32_t sent_before_left(const struct job *j, int a, int b)
{
	return j->dist->sent[a] ? j->dist->sent[a][b] : 0;
}

/* Whether p is a recv from rank a on another daemon. */
static int recv_from_remote(const struct job *j, const struct posted *p, int a)
{
	return p->type == COMMPB__OP_TYPE__OP_RECV && p->peer == a && !dist_local(j, a);
}

/* Why recv p fails: its sender left having sent no message p could get. */
static void recv_left_detail(const struct job *j, const struct posted *p, char *buf, size_t len)
{
	uint32_t n = sent_before_left(j, p->peer, p->rank);

	snprintf(buf, len, "op %llu (recv): rank %d left the job after sending rank %d %u message%s",
		 (unsigned long long)p->seq, p->peer, p->rank, n, n == 1 ? "" : "s");
}

/*
 * Start p, a send or recv whose partner is on another daemon, on the data
 * plane (refused ones too: the partner learns why). The k-th send from a to
 * b meets the k-th recv on b from a: each side counts its own. A recv from
 * a rank that left fails, unless that rank had sent its message.
 */
static void start_net_p2p(struct job *j, struct posted *p)
{
	int send = p->type == COMMPB__OP_TYPE__OP_SEND;
	uint32_t *count = send ? &j->dist->sent[p->rank][p->peer] : &j->dist->rcvd[p->rank][p->peer];
	struct task *t;

	p->matched = 1;
	if (!send && j->left[p->peer] && *count >= sent_before_left(j, p->peer, p->rank)) {
		char detail[256];

		recv_left_detail(j, p, detail, sizeof detail);
		++*count;
		if (!p->done)
			set_done(p, COMM_ERR_PEER_LOST, detail);
		return;
	}
	if (!(t = task_new(j, 1, 1))) {
		set_done(p, COMM_ERR_NO_MEMORY, "engine: out of memory");
		return;
	}
	t->type = p->type;
	t->ops[0] = p;
	t->net = 1;
	t->peer = p->peer;
	t->local = p->rank;
	t->cseq = ++*count;
	t->dtype = COMM_UINT8;
	t->esize = 1;
	t->in[0] = send ? buf_addr(&p->send) : NULL;
	t->out[0] = send ? NULL : buf_addr(&p->recv);
	t->count = send ? p->send.len : p->recv.len;
	t->bytes = t->count;
	if (p->done) {
		t->status = p->status;
		snprintf(t->detail, sizeof t->detail, "%s from rank %d to rank %d: refused on rank %d: %.180s",
			 send ? "send" : "recv", send ? p->rank : p->peer, send ? p->peer : p->rank,
			 p->rank, p->detail);
	}
	start(j, t);
}

/*
 * Pair a send with its recv; 1 when something happened. The k-th send from
 * a to b pairs with the k-th recv on b from a: once a send to b finds no
 * recv, later sends to b wait too (blocked, for this pass). A send or recv
 * whose partner is on another daemon goes to the data plane at once.
 */
static int try_p2p(struct job *j, int remote_only)
{
	uint8_t *blocked = j->scratch_blocked;
	int rc = 0;

	for (int a = 0; a < j->world && !rc; a++) {
		struct posted *last = unit_last(j, a), *s;
		int nblocked = 0;

		memset(blocked, 0, (size_t)j->world);
		P2P_FOREACH(s, j, a, last) {
			/* every other rank's recvs wait: no send of a's pairs this pass */
			if (nblocked && nblocked == j->world - 1 && !dist_spans(j))
				break;
			if (op_is_collective(s->type) || s->matched || s->peer < 0)
				continue;
			if (!dist_local(j, s->peer)) {
				start_net_p2p(j, s);
				rc = 1;
				break;
			}
			if (remote_only || s->type != COMMPB__OP_TYPE__OP_SEND || blocked[s->peer])
				continue;
			if ((rc = pair(j, a, s)))
				break;
			nblocked += !blocked[s->peer] && s->peer != a;
			blocked[s->peer] = 1;
		}
	}
	return rc;
}

/* The op on the workers is finished: mark its ops done (failed if the job failed). */
static void finish_task(struct task *t)
{
	char buf[320];
	struct job *j = t->job;
	comm_result_t code = t->status;
	const char *detail = code == COMM_OK ? ""
			     : *t->detail ? t->detail
					  : "host backend: out of memory";

	if (j->running == t) /* device ops queued before t may still run */
		j->running = gpu_job_task(j, 1);
	j->tasks_out--;
	if (code == COMM_OK && j->state != JOB_READY) {
		code = j->fail_code;
		detail = j->fail_detail;
	}
	if (code == COMM_OK) {
		j->ops_completed++;
		j->bytes_moved += t->bytes;
		srv.ops_completed++;
		srv.bytes_moved += t->bytes;
	} else {
		j->errors++;
	}
	for (int i = 0; i < t->nops; i++) {
		struct posted *p = t->ops[i];

		p->running = 0;
		p->task = NULL;
		if (!p->done || p->status == COMM_OK) /* a refused op keeps its reason */
			set_done(p, code, detail);
		if (j->state != JOB_READY) {
			/* everything else was answered when the job failed */
			reply(j, p, code,
			      detail == j->fail_detail ? failed_op_detail(p, detail, buf, sizeof buf)
						       : detail);
			posted_unlink(j, p);
			if (t->held) /* its job failed; engine_task_release frees it */
				j->nposted[p->rank]--;
			else
				posted_free(j, p);
		}
	}
	if (!t->held)
		task_free(t);
}

int engine_gpu_handoff(struct task *t)
{
	struct job *j = t->job;
	int rc;

	if (j->state != JOB_READY) { /* failed meanwhile: its worker may be gone, or about to be */
		t->status = j->fail_code;
		snprintf(t->detail, sizeof t->detail, "%s", j->fail_detail);
		return 1;
	}
	j->tasks_out++; /* a worker lost on the way finishes t at once, which could free j */
	rc = be_gpu_run(t);
	j->tasks_out--;
	if (!rc && j->state == JOB_READY)
		engine_kick(j); /* the next device collective may start behind it */
	else if (!rc)
		job_maybe_free(j);
	return rc;
}

void engine_task_release(struct task *t)
{
	for (int i = 0; i < t->nops; i++)
		posted_drop(t->ops[i]);
	task_free(t);
}

void engine_task_done(struct task *t)
{
	struct job *j = t->job;

	finish_task(t);
	if (j->state != JOB_READY)
		job_maybe_free(j);
	else
		engine_kick(j);
}

void engine_kick(struct job *j)
{
	/* an inline task finishes inside the loop below, which goes on by itself */
	if (j->kicking)
		return;
	j->kicking = 1;
	/* retiring a finished unit brings the next one to the head: try again */
	while (j->state == JOB_READY) {
		retire(j);
		/*
		 * While a collective runs across daemons (it may wait long for the
		 * others), sends and recvs with other daemons still start: their
		 * partners may need them before they reach the collective.
		 */
		if (j->running ? !(j->running->net && try_p2p(j, 1)) &&
					 !(j->running->gpu && try_collective(j, 1))
			       : !try_collective(j, 0) && !try_p2p(j, 0))
			break;
	}
	j->kicking = 0;
}

void engine_rank_left(struct job *j, int gone)
{
	char detail[256];

	for (int r = 0; r < j->world; r++) {
		struct posted *p;

		TAILQ_FOREACH(p, &j->posted[r], link) {
			/*
			 * A recv from another daemon's rank: what it sent may still
			 * be on its way; one under way past that fails now, one
			 * not started when it starts (start_net_p2p).
			 */
			if (recv_from_remote(j, p, gone)) {
				if (p->running && p->task && p->task->net &&
				    p->task->cseq > sent_before_left(j, gone, r)) {
					recv_left_detail(j, p, detail, sizeof detail);
					net_task_cancel(p->task, COMM_ERR_PEER_LOST, detail);
				}
				continue;
			}
			if (p->done || p->running)
				continue;
			if (p->coll) {
				snprintf(detail, sizeof detail, "op %llu (%s): %s",
					 (unsigned long long)p->seq, op_type_name(p->type),
					 j->left_detail);
				set_done(p, COMM_ERR_PEER_LOST, detail);
			} else if (p->peer == gone && !p->matched) {
				snprintf(detail, sizeof detail, "op %llu (%s): rank %d left the job",
					 (unsigned long long)p->seq, op_type_name(p->type), gone);
				set_done(p, COMM_ERR_PEER_LOST, detail);
			}
		}
	}
	engine_kick(j);
}

void engine_check_deadline(struct job *j, uint64_t now)
{
	struct posted *oldest = NULL;
	struct task *t;
	struct mem *m;
	char who[160] = "";
	size_t n = 0;

	if (j->state != JOB_READY)
		return;
	/* a registration of device memory: the worker can hang opening it */
	if ((m = gpu_job_opening(j)) && now - m->opening_ms >= j->timeout_ms) {
		job_fail(j, COMM_ERR_TIMEOUT, "the GPU worker did not open device memory of rank %d "
			 "within %u ms", m->conn ? m->conn->rank : -1, j->timeout_ms);
		return;
	}
	/* a send's or recv's copy to or from a staging buffer: the worker can hang in it too */
	if ((t = gpu_job_copy(j)) && now - t->started_ms >= j->timeout_ms) {
		job_fail(j, COMM_ERR_TIMEOUT, "op %llu (%s): the GPU worker did not copy it %s a "
			 "staging buffer within %u ms", (unsigned long long)t->ops[0]->seq,
			 op_type_name(t->type), t->type == COMMPB__OP_TYPE__OP_SEND ? "into" : "out of",
			 j->timeout_ms);
		return;
	}
	/* a host task always ends; a GPU worker can hang, a peer node can be late */
	if (j->running) {
		/* the oldest: device ops queue behind each other (the newest may be swapping verdicts) */
		t = gpu_job_task(j, 0);
		t = t ? t : j->running;

		if ((t->gpu || t->net) && now - t->started_ms >= j->timeout_ms)
			job_fail(j, COMM_ERR_TIMEOUT, "op %llu (%s): %s within %u ms",
				 (unsigned long long)t->ops[0]->seq, op_type_name(t->ops[0]->type),
				 t->gpu ? "the GPU worker did not finish it"
					: "the other daemons did not all run it",
				 j->timeout_ms);
		return;
	}
	for (int r = 0; r < j->world; r++) {
		struct posted *last = unit_last(j, r), *p;

		UNIT_FOREACH(p, j, r, last)
			if (!finished(j, p) && (!oldest || p->posted_ms < oldest->posted_ms))
				oldest = p;
	}
	if (!oldest || now - oldest->posted_ms < j->timeout_ms)
		return;
	if (oldest->coll) {
		int missing = 0;

		for (int r = 0; r < j->world && n < sizeof who; r++) {
			if (!dist_local(j, r) || unit_coll(j, r, oldest->cseq))
				continue;
			n += (size_t)snprintf(who + n, sizeof who - n, "%s%d", n ? ", " : "", r);
			missing++;
		}
		if (!missing)
			snprintf(who, sizeof who, "none: every rank reached it");
		job_fail(j, COMM_ERR_TIMEOUT, "op %llu (%s): rank%s %s did not reach it within %u ms",
			 (unsigned long long)oldest->seq, op_type_name(oldest->type),
			 missing == 1 ? "" : "s", who, j->timeout_ms);
	} else {
		int send = oldest->type == COMMPB__OP_TYPE__OP_SEND;

		job_fail(j, COMM_ERR_TIMEOUT,
			 "op %llu (%s %s rank %d on rank %d): no matching %s within %u ms",
			 (unsigned long long)oldest->seq, send ? "send" : "recv",
			 send ? "to" : "from", oldest->peer, oldest->rank, send ? "recv" : "send",
			 j->timeout_ms);
	}
}

/* "0-2,5": the ranks whose flag is set, as far as len allows ("..." past it). */
static void rank_list(const uint8_t *set, int n, char *buf, size_t len)
{
	size_t off = 0;

	buf[0] = 0;
	for (int r = 0; r < n; r++) {
		int e = r;
		int w;

		if (!set[r])
			continue;
		while (e + 1 < n && set[e + 1])
			e++;
		w = e > r ? snprintf(buf + off, len - off, "%s%d-%d", off ? "," : "", r, e)
			  : snprintf(buf + off, len - off, "%s%d", off ? "," : "", r);
		if (w < 0 || (size_t)w >= len - off) {
			snprintf(buf + (len > 4 ? len - 4 : 0), len > 4 ? 4 : len, "...");
			return;
		}
		off += (size_t)w;
		r = e;
	}
}

static void running_state(const struct job *j, char *buf, size_t len)
{
	const struct task *t = j->running;

	if (t->net && !t->gpu)
		net_task_state(t, buf, len);
	else
		snprintf(buf, len, "%s", t->gpu ? "running on the GPU worker" : "running");
}

static struct inflight *inflight_add(struct inflight *out, int max, int *n, uint32_t *omitted)
{
	if (*n == max) {
		(*omitted)++;
		return NULL;
	}
	memset(&out[*n], 0, sizeof out[*n]);
	commpb__op_in_flight__init(&out[*n].pb);
	return &out[(*n)++];
}

static void inflight_fill(struct inflight *f, const struct posted *p, uint64_t waited)
{
	uint64_t bytes = p->send.len > p->recv.len ? p->send.len : p->recv.len;

	snprintf(f->type, sizeof f->type, "%s", op_type_name(p->type));
	snprintf(f->dtype, sizeof f->dtype, "%s", dtype_name((int)p->dtype));
	f->pb.count = p->count;
	f->pb.bytes = bytes;
	f->pb.waited_ms = waited;
}

static int by_waited(const void *a, const void *b)
{
	const struct inflight *x = a, *y = b;

	return x->pb.waited_ms < y->pb.waited_ms ? 1 : x->pb.waited_ms > y->pb.waited_ms ? -1 : 0;
}

int engine_inflight(struct job *j, struct inflight *out, int max, uint32_t *omitted)
{
	struct posted **cur = calloc((size_t)j->world, sizeof *cur);
	uint8_t *set = calloc((size_t)j->world, 1), *miss = calloc((size_t)j->world, 1);
	uint64_t now = now_ms(), cmin = UINT64_MAX;
	int n = 0;

	*omitted = 0;
	if (!cur || !set || !miss) {
		/* out of memory: none listed, so every op posted counts as left out */
		for (int r = 0; r < j->world; r++)
			*omitted += j->nposted[r];
		free(cur);
		free(set);
		free(miss);
		return 0;
	}
	/* collectives: by number, each with the ranks here that posted it and not */
	for (int r = 0; r < j->world; r++) {
		struct posted *p;

		TAILQ_FOREACH(p, &j->posted[r], link) {
			if (!p->coll)
				continue;
			cmin = p->cseq < cmin ? p->cseq : cmin;
		}
		cur[r] = TAILQ_FIRST(&j->posted[r]);
	}
	/* from one collective number posted to the next (cursors only move forward) */
	for (uint64_t c = cmin; c != UINT64_MAX;) {
		const struct posted *first = NULL;
		uint64_t next = UINT64_MAX;
		uint64_t oldest = now;
		struct inflight *f;
		int any_missing = 0;

		for (int r = 0; r < j->world; r++) {
			struct posted *p = cur[r];

			set[r] = miss[r] = 0;
			while (p && (!p->coll || p->cseq < c))
				p = TAILQ_NEXT(p, link);
			cur[r] = p;
			if (p && p->cseq > c && p->cseq < next)
				next = p->cseq;
			if (p && p->cseq == c) {
				const struct posted *q = TAILQ_NEXT(p, link);

				while (q && !q->coll)
					q = TAILQ_NEXT(q, link);
				if (q && q->cseq < next)
					next = q->cseq;
				set[r] = 1;
				first = first ? first : p;
				oldest = p->posted_ms < oldest ? p->posted_ms : oldest;
			} else if (j->ranks[r] && dist_local(j, r) && j->next_cseq[r] <= c) {
				miss[r] = 1;
				any_missing++;
			}
		}
		c = next;
		if (!first || !(f = inflight_add(out, max, &n, omitted)))
			continue;
		inflight_fill(f, first, now - oldest);
		f->pb.collective = first->cseq;
		rank_list(set, j->world, f->posted, sizeof f->posted);
		rank_list(miss, j->world, f->missing, sizeof f->missing);
		if (first->running && j->running) /* or queued on the GPU worker behind it */
			running_state(j, f->state, sizeof f->state);
		else if (any_missing)
			snprintf(f->state, sizeof f->state, "waiting for rank%s %s",
				 any_missing > 1 ? "s" : "", f->missing);
		else if (dist_spans(j))
			snprintf(f->state, sizeof f->state, "every rank here posted it: queued");
		else
			snprintf(f->state, sizeof f->state, "queued");
		snprintf(f->detail, sizeof f->detail, "op %llu of rank %d",
			 (unsigned long long)first->seq, first->rank);
	}
	/* sends and recvs: each on its own */
	for (int r = 0; r < j->world; r++) {
		struct posted *p;

		TAILQ_FOREACH(p, &j->posted[r], link) {
			struct inflight *f;
			int send = p->type == COMMPB__OP_TYPE__OP_SEND;

			if (p->coll || p->answered || !(f = inflight_add(out, max, &n, omitted)))
				continue;
			inflight_fill(f, p, now - p->posted_ms);
			snprintf(f->posted, sizeof f->posted, "%d", r);
			if (p->done && !p->running) {
				snprintf(f->state, sizeof f->state, "done: answered after the ops before it");
			} else if (p->running && p->task && p->task->net) {
				net_task_state(p->task, f->state, sizeof f->state);
			} else if (p->running) {
				snprintf(f->state, sizeof f->state, "running");
			} else {
				snprintf(f->missing, sizeof f->missing, "%d", p->peer);
				snprintf(f->state, sizeof f->state, "waiting for rank %d's %s", p->peer,
					 send ? "recv" : "send");
			}
			snprintf(f->detail, sizeof f->detail, "op %llu: rank %d -> rank %d",
				 (unsigned long long)p->seq, send ? r : p->peer, send ? p->peer : r);
		}
	}
	qsort(out, (size_t)n, sizeof *out, by_waited);
	for (int i = 0; i < n; i++) {
		/* the strings are in the entry itself: point at them once it stays put */
		out[i].pb.type = out[i].type;
		out[i].pb.dtype = out[i].dtype;
		out[i].pb.posted = out[i].posted;
		out[i].pb.missing = out[i].missing;
		out[i].pb.state = out[i].state;
		out[i].pb.detail = out[i].detail;
	}
	free(cur);
	free(set);
	free(miss);
	return n;
}
