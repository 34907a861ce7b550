/*
 * gpu-worker-run.c: commd-gpu's ops across nodes (this node's part, NCCL
 * between the nodes), and how an op runs: launched and waited for, or
 * queued on its device's stream and answered once done (reap).
 */
#include <config.h>

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "gpu-worker-int.h"
#include "gpu-worker.h"
#include "util.h"

/* --- ops across nodes: this node's part, NCCL between the nodes ----------------------- */

/* The communicator across nodes on device d, made (by every node at once) on first use. */
static int world_comm(int d)
{
	ncclConfig_t cfg = NCCL_CONFIG_INITIALIZER;
	ncclUniqueId id;

	if (w.wcomm)
		return 0;
	cfg.blocking = 0;
	memcpy(&id, w.nccl_id, sizeof id);
	if (cuda_check(cudaSetDevice(d), "cudaSetDevice") ||
	    nccl_check(ncclCommInitRankConfig(&w.wcomm, (int)w.nnodes, id, (int)w.node, &cfg),
		       "ncclCommInitRankConfig (across nodes)"))
		return -1;
	w.wdev = d;
	wlog("NCCL rank %u of %u nodes on device %d", w.node, w.nnodes, d);
	return nccl_settle("ncclCommInitRankConfig (across nodes)");
}

/* The NCCL calls since world_begin are issued: wait until they are on the stream. */
static int world_end(struct plan *p, const char *what)
{
	p->nccl = 1;
	return nccl_check(ncclGroupEnd(), "ncclGroupEnd") || nccl_settle(what) ? -1 : 0;
}

/* world_end, rc: a call that failed since world_begin; then src (len bytes) to every output. */
static int world_end_out(struct plan *p, const char *what, int rc, const uint8_t *src, size_t len)
{
	if (world_end(p, what) || rc)
		return -1;
	for (int r = 0; r < p->n; r++)
		if (p->out[r] && copy(p->wdev, p->out[r], src, len))
			return -1;
	return 0;
}

static int world_begin(const struct plan *p)
{
	return world_comm(p->wdev) || cuda_check(cudaSetDevice(p->wdev), "cudaSetDevice") ||
			       nccl_check(ncclGroupStart(), "ncclGroupStart")
		       ? -1
		       : 0;
}

/* The end of the run of ranks from g on that are on one node. */
static int run_end(const struct plan *p, int g)
{
	int e = g + 1;

	while (e < p->nall && w.node_of[e] == w.node_of[g])
		e++;
	return e;
}

/*
 * All-reduce, reduce and reduce-scatter: this node's inputs combined into
 * accumulators, which NCCL all-reduces (reduces to the root's node; for a
 * reduce-scatter, each run of ranks' blocks to their node, in one group);
 * each node finishes its copy and writes its ranks' outputs (reduce-scatter:
 * each rank's block). AVG divides by the whole world.
 */
static int world_reduce(struct plan *p)
{
	int rs = p->op->type == T(REDUCE_SCATTER), rd = p->op->type == T(REDUCE);
	int d = p->wdev, home = rd ? w.node_of[p->op->root] : -1, rc = 0;
	size_t elems = p->op->count * (rs ? (size_t)p->nall : 1);
	size_t asz = gk_acc_size((int)p->op->dtype), acc = asz * elems;
	struct dev *x = &w.dev[d];
	ncclDataType_t type = nccl_type((int)p->op->dtype, (int)p->op->redop);
	ncclRedOp_t op = nccl_op((int)p->op->redop);

	if (scratch(d, acc + p->in_len) || reduce_on(p, d, GK_PARTIAL, elems, x->scratch, NULL) ||
	    world_begin(p))
		return -1;
	if (rd)
		rc = nccl_check(ncclReduce(x->scratch, x->scratch, elems, type, op, home, w.wcomm,
					   x->stream), "ncclReduce");
	else if (!rs)
		rc = nccl_check(ncclAllReduce(x->scratch, x->scratch, elems, type, op, w.wcomm,
					      x->stream), "ncclAllReduce");
	for (int g = 0, e; rs && g < p->nall && !rc; g = e) {
		uint8_t *at = x->scratch + (size_t)g * p->op->count * asz;

		e = run_end(p, g);
		rc = nccl_check(ncclReduce(at, at, (size_t)(e - g) * p->op->count, type, op,
					   w.node_of[g], w.wcomm, x->stream), "ncclReduce");
	}
	if (world_end(p, rd || rs ? "ncclReduce" : "ncclAllReduce") || rc)
		return -1;
	if (rd && home != (int)w.node)
		return 0;
	if (reduce_on(p, d, GK_FINISH, elems, x->scratch + acc, x->scratch))
		return -1;
	for (int r = 0; r < p->n; r++)
		if (p->out[r] &&
		    copy(d, p->out[r], x->scratch + acc + (rs ? p->op->rank[r].grank * p->block : 0),
			 p->out_len))
			return -1;
	return 0;
}

/* Broadcast: from the root's input on its node, into scratch on the others. */
static int world_broadcast(struct plan *p)
{
	int d = p->wdev, home = w.node_of[p->op->root], rc;
	uint8_t *buf;

	if (home == (int)w.node) {
		if (needs_staging(p) && stage_inputs(p))
			return -1;
		buf = p->in[w.lidx[p->op->root]];
	} else {
		if (scratch(d, p->block))
			return -1;
		buf = w.dev[d].scratch;
	}
	if (world_begin(p))
		return -1;
	rc = nccl_check(ncclBroadcast(buf, buf, p->block, ncclUint8, home, w.wcomm,
				      w.dev[d].stream), "ncclBroadcast");
	return world_end_out(p, "ncclBroadcast", rc, buf, p->block);
}

/*
 * All-gather: every block into place in scratch, this node's from its
 * ranks, the others' broadcast from their nodes (one broadcast per run of
 * ranks on one node); then the whole to each rank.
 */
static int world_allgather(struct plan *p)
{
	int d = p->wdev, rc = 0;
	uint8_t *all;

	if (scratch(d, p->out_len))
		return -1;
	all = w.dev[d].scratch;
	for (int r = 0; r < p->n; r++)
		if (copy(d, all + p->op->rank[r].grank * p->block, p->in[r], p->block))
			return -1;
	if (world_begin(p))
		return -1;
	for (int g = 0, e; g < p->nall && !rc; g = e) {
		e = run_end(p, g);
		rc = nccl_check(ncclBroadcast(all + g * p->block, all + g * p->block,
					      (size_t)(e - g) * p->block, ncclUint8, w.node_of[g],
					      w.wcomm, w.dev[d].stream), "ncclBroadcast");
	}
	return world_end_out(p, "ncclBroadcast", rc, all, p->out_len);
}

/*
 * All-to-all: blocks between this node's ranks are copied; the others go
 * by NCCL send and receive, issued in (sender, receiver) order on every
 * node, so that each pair of nodes matches them up.
 */
static int world_alltoall(struct plan *p)
{
	int d = p->wdev, rc = 0;
	size_t blk = p->block;

	if (needs_staging(p) && stage_inputs(p))
		return -1;
	for (int s = 0; s < p->n; s++)
		for (int r = 0; r < p->n; r++)
			if (copy(d, p->out[r] + p->op->rank[s].grank * blk,
				 p->in[s] + p->op->rank[r].grank * blk, blk))
				return -1;
	if (world_begin(p))
		return -1;
	for (int gs = 0; gs < p->nall && !rc; gs++) {
		for (int gr = 0; gr < p->nall && !rc; gr++) {
			int ls = w.lidx[gs], lr = w.lidx[gr];

			if (ls >= 0 && lr < 0)
				rc = nccl_check(ncclSend(p->in[ls] + gr * blk, blk, ncclUint8,
							 w.node_of[gr], w.wcomm, w.dev[d].stream),
						"ncclSend");
			else if (ls < 0 && lr >= 0)
				rc = nccl_check(ncclRecv(p->out[lr] + gs * blk, blk, ncclUint8,
							 w.node_of[gs], w.wcomm, w.dev[d].stream),
						"ncclRecv");
		}
	}
	return world_end(p, "ncclSend/ncclRecv") || rc ? -1 : 0;
}

static int op_world(struct plan *p)
{
	switch (p->op->type) {
	case T(BROADCAST):
		return world_broadcast(p);
	case T(ALLGATHER):
		return world_allgather(p);
	case T(ALLTOALL):
		return world_alltoall(p);
	default:
		return world_reduce(p);
	}
}

/* Wait for the op's streams; with NCCL work on them, watch the communicator too. */
static int streams_wait(const struct plan *p)
{
	struct timespec pause = { 0, POLL_NS };

	for (int d = 0; d < w.ndev; d++) {
		cudaError_t e;

		if (!p->used[d])
			continue;
		if (!p->nccl) {
			if (cuda_check(cudaStreamSynchronize(w.dev[d].stream), "cudaStreamSynchronize"))
				return -1;
			continue;
		}
		while ((e = cudaStreamQuery(w.dev[d].stream)) == cudaErrorNotReady) {
			if (nccl_state("ncclAllReduce") < 0)
				return -1;
			nanosleep(&pause, NULL);
		}
		if (cuda_check(e, "cudaStreamQuery"))
			return -1;
	}
	return 0;
}

/* The one device every used stream and done flag is on, or -1. */
int single_device(const struct plan *p)
{
	int d = used_device(p);

	if (d < 0)
		return -1;
	for (int i = 0; i < p->nflags; i++)
		if (p->flag_dev[i] != d)
			return -1;
	return d;
}

/*
 * Write the done flags on the streams given (each flag's device's), then
 * wait for the writes when wait (the op's own streams are idle already).
 */
static int write_flags(const struct plan *p, int flag_stream, int wait)
{
	for (int i = 0; i < p->nflags; i++) {
		int d = p->flag_dev[i];
		struct dev *x = &w.dev[d];

		if (dev_ready(d) || cuda_check(cudaSetDevice(d), "cudaSetDevice") ||
		    cu_check(drv.write_value((CUstream)(flag_stream ? x->flags : x->stream),
					     (CUdeviceptr)(uintptr_t)p->flag[i], p->flags[i].value,
					     CU_STREAM_WRITE_VALUE_DEFAULT),
			     "cuStreamWriteValue32"))
			return -1;
	}
	for (int i = 0; wait && i < p->nflags; i++)
		if (cuda_check(cudaStreamSynchronize(w.dev[p->flag_dev[i]].stream),
			       "cudaStreamSynchronize"))
			return -1;
	return 0;
}

/* Queue p's work on the streams it uses. */
static int op_launch(struct plan *p)
{
	for (int d = 0; d < w.ndev; d++)
		if (p->used[d] && dev_ready(d))
			return -1;
	if (plan_wait_events(p))
		return -1;
	if (p->world)
		return op_world(p);
	return p->spec->reduce ? op_reduce(p) : op_copy(p);
}

/* Run p on several devices (or none) and wait for it; then write its flags. */
int op_run(struct plan *p)
{
	if (!p->block)
		return write_flags(p, 0, 1);
	if (op_launch(p) || streams_wait(p))
		return -1;
	return p->nflags ? write_flags(p, 0, 1) : 0;
}

/* The queued slot's event ev (or fev) on device d, made on first use. */
static int queued_event(cudaEvent_t *ev, int d)
{
	return !*ev && (cuda_check(cudaSetDevice(d), "cudaSetDevice") ||
			cuda_check(cudaEventCreateWithFlags(ev, cudaEventDisableTiming),
				   "cudaEventCreateWithFlags"));
}

/*
 * Queue p, all on device d, behind the ops before it; an event marks its
 * end. Its done flags are written on the device's flag stream once that
 * event passed, so the next op on the stream does not wait for them, and a
 * second event marks them written. reap answers it once they are.
 */
int op_queue(struct plan *p, int d)
{
	struct queued *q = &w.q[(w.qhead + w.nq) % MAX_QUEUED];

	if (op_launch(p))
		return -1;
	if (q->dev != d) {
		if (q->ev)
			cudaEventDestroy(q->ev);
		if (q->fev)
			cudaEventDestroy(q->fev);
		q->ev = q->fev = NULL;
	}
	q->dev = d;
	if (queued_event(&q->ev, d) ||
	    cuda_check(cudaEventRecord(q->ev, w.dev[d].stream), "cudaEventRecord"))
		return -1;
	q->flagged = p->nflags > 0;
	if (q->flagged &&
	    (queued_event(&q->fev, d) ||
	     cuda_check(cudaStreamWaitEvent(w.dev[d].flags, q->ev, 0), "cudaStreamWaitEvent") ||
	     write_flags(p, 1, 0) ||
	     cuda_check(cudaEventRecord(q->fev, w.dev[d].flags), "cudaEventRecord")))
		return -1;
	q->id = p->op->id;
	q->name = p->spec->name;
	w.nq++;
	return 0;
}

/* A device op failed: answer it, and end (a CUDA error may be sticky). */
_Noreturn void op_aborted(const char *name, uint64_t id)
{
	char detail[GPU_DETAIL];

	snprintf(detail, sizeof detail, "%s %" PRIu64 ": %.200s", name, id, w.err);
	reply(GPU_MSG_OP_DONE, id, COMM_ERR_ABORTED, detail);
	wlog("%s; exiting", detail);
	nccl_abort();
	exit(GPU_WORKER_EXIT_DEVICE);
}

/*
 * Answer the queued ops that have finished, oldest first, waiting until at
 * most keep are left. Commd counts on answers in the order it sent the ops.
 */
void reap(size_t keep)
{
	while (w.nq) {
		struct queued *q = &w.q[w.qhead];
		cudaEvent_t ev = q->flagged ? q->fev : q->ev;
		int wait = w.nq > keep;
		cudaError_t e = wait ? cudaEventSynchronize(ev) : cudaEventQuery(ev);

		if (e == cudaErrorNotReady)
			return;
		w.qhead = (w.qhead + 1) % MAX_QUEUED;
		w.nq--;
		if (e != cudaSuccess) {
			w.err[0] = '\0';
			cuda_check(e, wait ? "cudaEventSynchronize" : "cudaEventQuery");
			op_aborted(q->name, q->id);
		}
		reply(GPU_MSG_OP_DONE, q->id, COMM_OK, "");
		w.spin_until = now_us() + SPIN_US; /* the job's next op tends to follow */
		w.ops++;
	}
}

