/*
 * gpu-ops.c: device memory registered with a job's worker, and the ops on
 * it: sent to the worker (with a WORLD first across nodes), answered in
 * order; and a job's worker killed when the job fails or goes.
 */
#include <config.h>

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "gpu-int.h"
#include "log.h"
#include "util.h"

static uv_idle_t killed_idle;
static int killed_ready;

/* --- device memory --------------------------------------------------------------- */

comm_result_t gpu_mem_register(struct conn *c, const Commpb__RegisterMem *r, int fd,
			       uint64_t req_id, char *err, size_t errlen)
{
	int vmm = r->kind == COMMPB__MEM_KIND__MEM_CUDA_VMM;
	struct gpu_mem_open mo = { { GPU_MSG_MEM_OPEN, GPU_PROTO_VERSION }, 0, 0, 0, 0, { 0 },
				   "" };
	struct gpu_worker *w;
	comm_result_t rc;
	struct mem *m;

	if (c->version < 3) {
		rc = COMM_ERR_VERSION;
		snprintf(err, errlen, "mem register: device memory needs protocol 3, the "
			 "connection speaks %u", c->version);
		goto fail;
	}
	rc = COMM_ERR_INVALID_ARG;
	if (r->size == 0 || r->size > GPU_MEM_MAX) {
		snprintf(err, errlen, "mem register: device memory of %llu bytes (1 to 2^48)",
			 (unsigned long long)r->size);
		goto fail;
	}
	if (!vmm && r->cuda_handle.len != GPU_HANDLE_BYTES) {
		snprintf(err, errlen, "mem register: a CUDA IPC handle has %d bytes, not %zu",
			 GPU_HANDLE_BYTES, r->cuda_handle.len);
		goto fail;
	}
	if (vmm != (fd >= 0)) {
		snprintf(err, errlen, "mem register: %s", vmm ? "VMM memory comes with its fd"
							: "CUDA IPC memory comes with no fd");
		goto fail;
	}
	if (!*r->gpu_uuid || strlen(r->gpu_uuid) >= sizeof mo.uuid) {
		snprintf(err, errlen, "mem register: device memory needs its GPU's UUID");
		goto fail;
	}
	if (c->nmems >= MEM_MAX_PER_CONN) {
		rc = COMM_ERR_NO_MEMORY;
		snprintf(err, errlen, "mem register: already %d registrations on this connection",
			 c->nmems);
		goto fail;
	}
	if (srv.gpu_state == GPU_NONE) {
		rc = COMM_ERR_UNSUPPORTED;
		snprintf(err, errlen, "device memory: no GPU here (%s)", srv.gpu_info);
		goto fail;
	}
	w = c->job->gpu;
	if (w && w->refused) {
		rc = COMM_ERR_UNSUPPORTED;
		snprintf(err, errlen, "device memory: %s", w->reason);
		goto fail;
	}
	if (w && w->fd < 0) {
		rc = COMM_ERR_ABORTED;
		snprintf(err, errlen, "device memory: the job's gpu worker is gone (%s)", w->reason);
		goto fail;
	}
	if (!w) {
		w = c->job->gpu = worker_start(c->job, &rc, err, errlen);
		if (!w) {
			log_info("job %s: rank %d: %s", c->job->name, c->rank, err);
			goto fail;
		}
	}
	m = calloc(1, sizeof *m);
	if (!m) {
		rc = COMM_ERR_NO_MEMORY;
		snprintf(err, errlen, "mem register: out of memory");
		goto fail;
	}
	m->id = c->next_mem_id++;
	m->size = r->size;
	m->refs = 2; /* the connection's, and the opening's until the worker answers */
	m->job = c->job;
	m->kind = (int)r->kind;
	m->gpu_id = ++srv.next_gpu_mem;
	m->gw = w;
	m->conn = c;
	m->reply_id = req_id;
	m->unanswered = 1;
	snprintf(m->uuid, sizeof m->uuid, "%s", r->gpu_uuid);
	m->opening_ms = now_ms();
	w->refs++;
	*job_charge(c->job, m) += m->size;
	TAILQ_INSERT_TAIL(&c->mems, m, link);
	c->nmems++;
	TAILQ_INSERT_TAIL(&w->opening, m, gpu_link);
	mo.id = m->gpu_id;
	mo.kind = vmm ? GPU_MEM_VMM : GPU_MEM_IPC;
	mo.rank = c->rank;
	mo.size = r->size;
	if (!vmm)
		memcpy(mo.handle, r->cuda_handle.data, GPU_HANDLE_BYTES);
	snprintf(mo.uuid, sizeof mo.uuid, "%s", r->gpu_uuid);
	if (worker_send(w, &mo, sizeof mo, fd) < 0 && m->unanswered)
		open_failed(w, m, COMM_ERR_NO_MEMORY, "device memory: out of memory");
	return COMM_INPROGRESS;
fail:
	if (fd >= 0)
		close(fd);
	return rc;
}

void gpu_mem_gone(struct mem *m)
{
	struct gpu_worker *w = m->gw;
	struct gpu_mem_close mc = { { GPU_MSG_MEM_CLOSE, GPU_PROTO_VERSION }, m->gpu_id };

	if (m->opened)
		worker_send(w, &mc, sizeof mc, -1);
	free(m);
	worker_put(w);
}

/* --- ops --------------------------------------------------------------------------- */

int gpu_task_on_device(const struct task *t, char *err, size_t errlen)
{
	int dev = 0, host = 0;

	for (int i = 0; i < t->nops; i++) {
		const struct bufspec *b[3] = { &t->ops[i]->send, &t->ops[i]->recv,
					       &t->ops[i]->done_flag };

		for (int k = 0; k < 3; k++) {
			if (!b[k]->mem)
				continue;
			if (b[k]->mem->kind == COMMPB__MEM_KIND__MEM_MEMFD)
				host = 1;
			else
				dev = 1;
		}
	}
	if (dev && host) {
		snprintf(err, errlen, "%s: the ranks' buffers mix host and device memory; "
			 "use one kind", op_type_name(t->type));
		return -1;
	}
	return dev;
}

static void put_buf(const struct bufspec *b, uint64_t *mem, uint64_t *off)
{
	*mem = b->mem ? b->mem->gpu_id : 0;
	*off = b->mem ? b->off : 0;
}

static void put_event(const struct posted *p, struct gpu_op_rank *gr)
{
	if (!p->has_event || gr->has_event)
		return;
	memcpy(gr->ready_event, p->ready_event, GPU_HANDLE_BYTES);
	gr->has_event = 1;
}

/* The done flags of t's ops, after the n ranks of op; returns how many. */
static uint32_t put_flags(const struct task *t, struct gpu_op *op, int n)
{
	struct gpu_flag *f = (struct gpu_flag *)&op->rank[n];
	uint32_t k = 0;

	for (int i = 0; i < t->nops; i++) {
		const struct posted *p = t->ops[i];

		if (!p->done_flag.mem)
			continue;
		f[k].mem = p->done_flag.mem->gpu_id;
		f[k].off = p->done_flag.off;
		f[k].value = p->done_value;
		k++;
	}
	return k;
}

/*
 * The device all of t's buffers are on (done flags aside: each is written
 * on its own device), "" when it has none; NULL with why in t->detail
 * when they are on several.
 */
static const char *task_device(struct task *t)
{
	const char *dev = "";

	for (int i = 0; i < t->nops; i++) {
		const struct bufspec *b[2] = { &t->ops[i]->send, &t->ops[i]->recv };

		for (int k = 0; k < 2; k++) {
			if (!b[k]->mem)
				continue;
			if (*dev && strcmp(dev, b[k]->mem->uuid)) {
				snprintf(t->detail, sizeof t->detail,
					 "%s: across daemons a node's ranks use one device, these use "
					 "%.60s and %.60s", op_type_name(t->type), dev, b[k]->mem->uuid);
				return NULL;
			}
			dev = b[k]->mem->uuid;
		}
	}
	return dev;
}

/* Node 0 of a job over daemons: why its worker gave no NCCL id. */
static const char *no_id_why(const struct gpu_worker *w)
{
	return w->no_id[0] ? w->no_id : "device memory came before the job formed";
}

/*
 * Everything that could make this node's worker refuse its part is checked
 * here, before the verdicts: once they agree, the other nodes' workers are
 * in NCCL calls that wait for this one.
 */
void gpu_net_check(struct task *t)
{
	struct job *j = t->job;
	const struct gpu_worker *w = j->gpu;
	const char *name = op_type_name(t->type), *dev;

	t->status = COMM_ERR_ABORTED;
	if (!w || w->fd < 0 || w->refused) {
		snprintf(t->detail, sizeof t->detail, "%s: the job's gpu worker is gone (%.200s)",
			 name, w ? w->reason : "never started");
		return;
	}
	t->status = COMM_OK;
	if (t->peer >= 0) /* staged through host memory (gpu_p2p_start): no NCCL */
		return;
	t->status = COMM_ERR_UNSUPPORTED;
	if (j->world > GPU_WORLD_MAX_RANKS || t->nops > GPU_OP_MAX_RANKS) {
		snprintf(t->detail, sizeof t->detail,
			 "%s: device ops across daemons span at most %d ranks, %d on a node", name,
			 GPU_WORLD_MAX_RANKS, GPU_OP_MAX_RANKS);
		return;
	}
	if (!(dev = task_device(t)))
		return;
	if (*dev && j->dist->nccl_dev[0] && strcmp(dev, j->dist->nccl_dev)) {
		snprintf(t->detail, sizeof t->detail,
			 "%s: across daemons a node's ranks use one device: %.60s, then %.60s", name,
			 j->dist->nccl_dev, dev);
		return;
	}
	t->status = COMM_ERR_ABORTED;
	if (j->dist->self == 0 && !j->dist->has_nccl_id) {
		snprintf(t->detail, sizeof t->detail,
			 "%s: the gpu worker of node 0 has no NCCL id (%.180s)", name, no_id_why(w));
		return;
	}
	if (*dev)
		snprintf(j->dist->nccl_dev, sizeof j->dist->nccl_dev, "%s", dev);
	t->status = COMM_OK;
}

/* The job's nodes and NCCL id to w, once, before its first op across nodes. */
static int world_send(struct gpu_worker *w, const struct job *j)
{
	const struct dist *d = j->dist;
	size_t len = sizeof(struct gpu_world) + (size_t)j->world * sizeof(uint16_t);
	struct gpu_world *m;
	int rc;

	if (w->world_sent)
		return 0;
	m = calloc(1, len);
	if (!m)
		return -1;
	m->h.type = GPU_MSG_WORLD;
	m->h.version = GPU_PROTO_VERSION;
	m->world = (uint32_t)j->world;
	m->nnodes = (uint32_t)d->nnodes;
	m->node = (uint32_t)d->self;
	memcpy(m->nccl_id, d->nccl_id, GPU_NCCL_ID_BYTES);
	for (int r = 0; r < j->world; r++)
		m->node_of[r] = (uint16_t)d->node_of[r];
	rc = worker_send(w, m, len, -1);
	free(m);
	w->world_sent = rc == 0 && w->fd >= 0; /* worker_send may have lost it */
	return w->world_sent ? 0 : -1;
}

int be_gpu_run(struct task *t)
{
	struct gpu_worker *w = t->job->gpu;
	int world = t->net && t->peer < 0; /* NCCL across nodes; a net send/recv is staged */
	/* a send on this node: the receiver's ready event rides in a second entry */
	int n = t->net		    ? (world ? t->nops : 1)
		: t->type == T(SEND) ? 1 + (t->ops[1]->has_event != 0)
				    : t->n;
	size_t len = sizeof(struct gpu_op) + (size_t)n * sizeof(struct gpu_op_rank) +
		     (size_t)t->nops * sizeof(struct gpu_flag);
	struct gpu_op *op;

	t->status = COMM_ERR_ABORTED;
	if (!w || w->fd < 0) {
		snprintf(t->detail, sizeof t->detail, "%s: the job's gpu worker is gone (%.200s)",
			 op_type_name(t->type), w ? w->reason : "never started");
		return 1;
	}
	if (world && (!t->job->dist->has_nccl_id || world_send(w, t->job) < 0)) {
		snprintf(t->detail, sizeof t->detail, "%s: %s", op_type_name(t->type),
			 !t->job->dist->has_nccl_id ? "node 0 sent no NCCL id"
			 : w->fd < 0		    ? "the job's gpu worker is gone"
						    : "out of memory");
		return 1;
	}
	if (n > GPU_OP_MAX_RANKS) {
		t->status = COMM_ERR_UNSUPPORTED;
		snprintf(t->detail, sizeof t->detail, "%s: device ops span at most %d ranks",
			 op_type_name(t->type), GPU_OP_MAX_RANKS);
		return 1;
	}
	op = calloc(1, len);
	if (!op) {
		t->status = COMM_ERR_NO_MEMORY;
		snprintf(t->detail, sizeof t->detail, "%s: out of memory", op_type_name(t->type));
		return 1;
	}
	op->h.type = GPU_MSG_OP;
	op->h.version = GPU_PROTO_VERSION;
	op->id = (uint64_t)(uintptr_t)t;
	op->type = world || !t->net ? (uint32_t)t->type : T(SEND); /* staging: a copy */
	op->dtype = t->dtype;
	op->redop = t->redop;
	op->root = t->root;
	op->count = t->count;
	op->n = (uint32_t)n;
	op->world = world ? (uint32_t)t->n : 0;
	if (t->net && !world) {
		/* staging: the rank's buffer into the staging buffer, or back */
		const struct posted *p = t->ops[0];
		struct gpu_op_rank *x = &op->rank[0];

		if (t->type == T(SEND)) {
			put_buf(&p->send, &x->send_mem, &x->send_off);
			x->recv_mem = t->stage->gpu_id;
		} else {
			x->send_mem = t->stage->gpu_id;
			put_buf(&p->recv, &x->recv_mem, &x->recv_off);
		}
		put_event(p, x);
	} else if (t->type == T(SEND)) {
		/* the pair: the sender's buffer into the receiver's, after both ranks' work */
		put_buf(&t->ops[0]->send, &op->rank[0].send_mem, &op->rank[0].send_off);
		put_buf(&t->ops[1]->recv, &op->rank[0].recv_mem, &op->rank[0].recv_off);
		put_event(t->ops[0], &op->rank[0]);
		if (n == 2)
			put_event(t->ops[1], &op->rank[1]);
	} else {
		for (int r = 0; r < n; r++) {
			put_buf(&t->ops[r]->send, &op->rank[r].send_mem, &op->rank[r].send_off);
			put_buf(&t->ops[r]->recv, &op->rank[r].recv_mem, &op->rank[r].recv_off);
			put_event(t->ops[r], &op->rank[r]);
			op->rank[r].grank = (uint32_t)t->ops[r]->rank;
		}
	}
	op->nflags = put_flags(t, op, n);
	len -= ((size_t)t->nops - op->nflags) * sizeof(struct gpu_flag);
	TAILQ_INSERT_TAIL(&w->tasks, t, link);
	t->status = COMM_OK;
	if (worker_send(w, op, len, -1) < 0 && TAILQ_LAST(&w->tasks, task_q) == t) {
		TAILQ_REMOVE(&w->tasks, t, link);
		t->status = COMM_ERR_NO_MEMORY;
		snprintf(t->detail, sizeof t->detail, "%s: out of memory", op_type_name(t->type));
		free(op);
		return 1;
	}
	free(op);
	/* worker_send may have lost the worker, which finished t already */
	return 0;
}

struct task *gpu_job_task(struct job *j, int newest)
{
	struct gpu_worker *w = j->gpu;
	struct task *t;

	if (!w)
		return NULL;
	/* a staging copy is a send's or recv's: never the job's running op */
	for (t = newest ? TAILQ_LAST(&w->tasks, task_q) : TAILQ_FIRST(&w->tasks); t && t->stage;
	     t = newest ? TAILQ_PREV(t, task_q, link) : TAILQ_NEXT(t, link))
		;
	return t;
}

struct task *gpu_job_copy(struct job *j)
{
	struct task *t = j->gpu ? TAILQ_FIRST(&j->gpu->tasks) : NULL;

	return t && t->stage ? t : NULL;
}

void gpu_job_line(const struct job *j, char *buf, size_t len)
{
	const struct gpu_worker *w = j->gpu;
	const struct dist *d = j->dist;
	const struct gpu_stage *g;
	size_t at, n = 0, bytes = 0;

	*buf = '\0';
	if (!w)
		return;
	if (w->refused || w->fd < 0)
		at = (size_t)snprintf(buf, len, "worker gone: %s", w->reason);
	else
		at = (size_t)snprintf(buf, len, "worker pid %d", w->proc.pid);
	if (d && d->nnodes > 1 && at < len) {
		if (d->self == 0 && !d->has_nccl_id)
			at += (size_t)snprintf(buf + at, len - at, "; across %d nodes, no NCCL id: %s",
					       d->nnodes, no_id_why(w));
		else if (d->nccl_dev[0])
			at += (size_t)snprintf(buf + at, len - at,
					       "; across %d nodes: NCCL rank %d on %s", d->nnodes,
					       d->self, d->nccl_dev);
		else
			at += (size_t)snprintf(buf + at, len - at,
					       "; across %d nodes: NCCL rank %d, no device op yet",
					       d->nnodes, d->self);
	}
	/* host memory it holds pinned for sends and recvs across daemons */
	TAILQ_FOREACH(g, &w->stages, link) {
		n++;
		bytes += g->cap;
	}
	if (n && at < len)
		snprintf(buf + at, len - at, "; %zu staging buffer%s (%zu KiB), %d idle", n,
			 n == 1 ? "" : "s", bytes >> 10, w->stages_idle);
}

struct mem *gpu_job_opening(struct job *j)
{
	return j->gpu ? TAILQ_FIRST(&j->gpu->opening) : NULL;
}

static void on_killed(uv_idle_t *h)
{
	struct gpu_worker *w;

	while ((w = TAILQ_FIRST(&killed))) {
		TAILQ_REMOVE(&killed, w, killed_link);
		w->killed = 0;
		if (w->fd >= 0) /* not lost meanwhile (its exit came first) */
			worker_lost(w, w->killed_why);
	}
	uv_idle_stop(h);
}

/*
 * A worker busy with an op or a mem that nobody will wait for (its job
 * failed or is gone) may be stuck in CUDA: kill it, and answer what it had
 * on the next turn rather than when it exits, which a process stuck in the
 * driver may never do. Not now: answering the last op of a job no rank is
 * attached to frees the job, under job_fail's feet.
 */
static void worker_kill_busy(struct gpu_worker *w, const char *why)
{
	if (TAILQ_EMPTY(&w->tasks) && TAILQ_EMPTY(&w->opening))
		return;
	if (w->alive) {
		log_info("job %s: killing its gpu worker (pid %d), %s", w->job_name, w->proc.pid,
			 why);
		uv_process_kill(&w->proc, SIGKILL);
	}
	if (w->fd < 0 || w->killed)
		return;
	w->killed = 1;
	w->killed_why = why;
	TAILQ_INSERT_TAIL(&killed, w, killed_link);
	if (!killed_ready) {
		uv_idle_init(gpu_loop, &killed_idle);
		uv_unref((uv_handle_t *)&killed_idle);
		killed_ready = 1;
	}
	uv_idle_start(&killed_idle, on_killed);
}

void gpu_job_failed(struct job *j)
{
	if (j->gpu)
		worker_kill_busy(j->gpu, "busy when the job failed");
}

void gpu_job_gone(struct job *j)
{
	struct gpu_worker *w = j->gpu;

	if (!w)
		return;
	j->gpu = NULL;
	w->job = NULL;
	worker_kill_busy(w, "still opening memory when the job ended");
	worker_put(w);
}

void gpu_stop(void)
{
	struct gpu_worker *w, *tmp;

	probe_stop();
	if (killed_ready)
		uv_close((uv_handle_t *)&killed_idle, NULL);
	killed_ready = 0;
	TAILQ_FOREACH_SAFE(w, &workers, link, tmp) {
		int busy = !TAILQ_EMPTY(&w->tasks) || !TAILQ_EMPTY(&w->opening);

		/* an idle worker exits at EOF; a busy one may be stuck in CUDA */
		if (busy && w->alive)
			uv_process_kill(&w->proc, SIGKILL);
		if (busy && w->fd >= 0)
			worker_lost(w, "commd is shutting down");
		worker_hangup(w);
	}
}
