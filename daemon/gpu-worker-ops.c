/*
 * gpu-worker-ops.c: commd-gpu's NCCL communicators across this node's
 * devices, and an op on this node: checked and resolved into a plan, then
 * its reductions (own kernels, NCCL between devices) or copies queued.
 */
#include <config.h>

#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "dtype.h"
#include "gpu-worker-int.h"
#include "util.h"

/* --- NCCL ------------------------------------------------------------------------- */

/* -1 when comm failed (the detail says how), 1 while it is busy, else 0. */
static int comm_state(ncclComm_t comm, int dev, const char *what)
{
	ncclResult_t st = ncclSuccess, r = ncclCommGetAsyncError(comm, &st);

	if (r != ncclSuccess)
		st = r;
	if (st == ncclInProgress)
		return 1;
	if (st == ncclSuccess)
		return 0;
	fail("%s: device %d: %s (%s)", what, dev, ncclGetErrorString(st), ncclGetLastError(comm));
	return -1;
}

/* The same over every communicator: the devices' here, and the one across nodes. */
int nccl_state(const char *what)
{
	int busy = w.wcomm ? comm_state(w.wcomm, w.wdev, what) : 0;

	for (int i = 0; i < w.nccl_n && busy >= 0; i++) {
		int st = comm_state(w.nccl[i], w.nccl_dev[i], what);

		busy = st < 0 ? st : busy | st;
	}
	return busy;
}

/* Wait until no communicator is in progress, at most NCCL_WAIT_MS. */
int nccl_settle(const char *what)
{
	uint64_t deadline = now_ms() + NCCL_WAIT_MS;
	struct timespec pause = { 0, POLL_NS };
	int st;

	while ((st = nccl_state(what)) > 0) {
		if (now_ms() > deadline) {
			fail("%s: still in progress after %d s", what, NCCL_WAIT_MS / 1000);
			return -1;
		}
		nanosleep(&pause, NULL);
	}
	return st;
}

void nccl_abort(void)
{
	for (int i = 0; i < w.nccl_n; i++)
		ncclCommAbort(w.nccl[i]);
	w.nccl_n = 0;
	if (w.wcomm)
		ncclCommAbort(w.wcomm);
	w.wcomm = NULL;
}

/* Finalize (all, then wait: they finish together) and destroy the communicator. */
int nccl_close(void)
{
	int rc = 0;

	for (int i = 0; i < w.nccl_n && !rc; i++)
		rc = nccl_check(ncclCommFinalize(w.nccl[i]), "ncclCommFinalize");
	if (rc || nccl_settle("ncclCommFinalize")) {
		nccl_abort();
		return -1;
	}
	for (int i = 0; i < w.nccl_n; i++)
		ncclCommDestroy(w.nccl[i]);
	w.nccl_n = 0;
	return 0;
}

/* One NCCL rank per device in devs[0..k), in this process; kept while devs stay. */
static int nccl_ready(const int *devs, int k)
{
	ncclUniqueId id;
	ncclResult_t r = ncclSuccess;

	if (k == w.nccl_n && memcmp(devs, w.nccl_dev, (size_t)k * sizeof *devs) == 0)
		return 0;
	if ((w.nccl_n && nccl_close()) || nccl_check(ncclGetUniqueId(&id), "ncclGetUniqueId") ||
	    nccl_check(ncclGroupStart(), "ncclGroupStart"))
		return -1;
	for (int i = 0; i < k && (r == ncclSuccess || r == ncclInProgress); i++) {
		ncclConfig_t cfg = NCCL_CONFIG_INITIALIZER;

		cfg.blocking = 0;
		if (cuda_check(cudaSetDevice(devs[i]), "cudaSetDevice"))
			break;
		r = ncclCommInitRankConfig(&w.nccl[i], k, id, i, &cfg);
		if (r == ncclSuccess || r == ncclInProgress)
			w.nccl_dev[w.nccl_n++] = devs[i];
	}
	nccl_check(r, "ncclCommInitRankConfig");
	if (nccl_check(ncclGroupEnd(), "ncclGroupEnd") || w.nccl_n != k ||
	    nccl_settle("ncclCommInitRankConfig"))
		return -1;
	return 0;
}

/* The type NCCL combines the accumulators in: unsigned where the sum wraps. */
ncclDataType_t nccl_type(int dtype, int redop)
{
	int wraps = redop != COMM_MIN && redop != COMM_MAX;

	switch (dtype) {
	case COMM_INT8:
		return wraps ? ncclUint8 : ncclInt8;
	case COMM_UINT8:
		return ncclUint8;
	case COMM_INT32:
		return wraps ? ncclUint32 : ncclInt32;
	case COMM_UINT32:
		return ncclUint32;
	case COMM_INT64:
		return wraps ? ncclUint64 : ncclInt64;
	case COMM_UINT64:
		return ncclUint64;
	case COMM_FLOAT64:
		return ncclFloat64;
	default:
		return ncclFloat32; /* float32, and float16 and bfloat16's accumulators */
	}
}

ncclRedOp_t nccl_op(int redop)
{
	switch (redop) {
	case COMM_PROD:
		return ncclProd;
	case COMM_MIN:
		return ncclMin;
	case COMM_MAX:
		return ncclMax;
	default:
		return ncclSum; /* AVG divides afterwards, as on one device */
	}
}

/* --- ops --------------------------------------------------------------------------- */

/* Check and resolve rank r's input (out 0) or output buffer. */
static int plan_buf(struct plan *p, int r, int out)
{
	const struct gpu_op_rank *x = &p->op->rank[r];
	const char *what = out ? "recv" : "send";
	uint64_t id = out ? x->recv_mem : x->send_mem, off = out ? x->recv_off : x->send_off;
	size_t len = out ? p->out_len : p->in_len;
	int need = out ? p->spec->out : p->spec->in;
	int grank = p->world ? (int)p->op->rank[r].grank : r;
	int must = need == NEED_ALL || (need == NEED_ROOT && grank == p->op->root);
	const struct mem *m;

	(out ? p->out : p->in)[r] = NULL;
	(out ? p->out_dev : p->in_dev)[r] = -1;
	if (!id) {
		if (must)
			fail("rank %d has no %s buffer", r, what);
		return must ? -1 : 0;
	}
	m = mem_find(id);
	if (!m) {
		fail("rank %d: %s mem %" PRIu64 " is not open", r, what, id);
		return -1;
	}
	if (off > m->size || len > m->size - off) {
		fail("rank %d: %s buffer: %zu bytes at offset %" PRIu64 " overrun mem %" PRIu64
		     " of %zu bytes", r, what, len, off, id, m->size);
		return -1;
	}
	if (!must && need != NEED_ANY)
		return 0;
	/* a kernel's loads and stores must be aligned to the element: a misaligned one faults */
	if (p->spec->reduce && len && off % dtype_size((int)p->op->dtype)) {
		fail("rank %d: %s buffer: offset %" PRIu64 " is not a multiple of the element size "
		     "(%zu)", r, what, off, dtype_size((int)p->op->dtype));
		return -1;
	}
	if (m->dev < 0 && p->op->type != T(SEND)) {
		fail("rank %d: %s mem %" PRIu64 " is host memory, which only a send copies", r, what, id);
		return -1;
	}
	(out ? p->out : p->in)[r] = m->ptr + off;
	(out ? p->out_dev : p->in_dev)[r] = m->dev;
	if (m->dev >= 0)
		p->used[m->dev] = 1;
	return 0;
}

/* Check and resolve the op's done flags: 4 aligned bytes in an open mem each. */
static int plan_flags(struct plan *p)
{
	for (int i = 0; i < p->nflags; i++) {
		const struct gpu_flag *f = &p->flags[i];
		const struct mem *m = mem_find(f->mem);

		if (!m || m->dev < 0) {
			fail("done flag %d: mem %" PRIu64 " is %s", i, f->mem,
			     m ? "host memory" : "not open");
			return -1;
		}
		if (f->off % sizeof(uint32_t) || f->off > m->size - sizeof(uint32_t) ||
		    m->size < sizeof(uint32_t)) {
			fail("done flag %d: offset %" PRIu64 " of mem %" PRIu64
			     " (%zu bytes) is not 4 aligned bytes inside it", i, f->off, f->mem,
			     m->size);
			return -1;
		}
		p->flag[i] = m->ptr + f->off;
		p->flag_dev[i] = m->dev;
	}
	return 0;
}

/* The one device p's buffers are on; -1: none, -2: several. */
int used_device(const struct plan *p)
{
	int d = -1;

	for (int e = 0; e < w.ndev; e++) {
		if (!p->used[e])
			continue;
		if (d >= 0)
			return -2;
		d = e;
	}
	return d;
}

/*
 * An op across nodes: its ranks' granks index lidx, and everything it
 * touches here is on one device (wdev), the one the job's NCCL rank of
 * this node is on. A node whose ranks give no buffer uses that device too.
 */
static int plan_world(struct plan *p)
{
	int d;

	if (!w.world || p->op->world != w.world) {
		fail("an op across %u ranks, but WORLD said %u", p->op->world, w.world);
		return -1;
	}
	for (uint32_t g = 0; g < w.world; g++)
		w.lidx[g] = -1;
	for (int r = 0; r < p->n; r++) {
		uint32_t g = p->op->rank[r].grank;

		if (g >= w.world || w.node_of[g] != w.node || w.lidx[g] >= 0) {
			fail("rank %u is not one of this node's, or twice in the op", g);
			return -1;
		}
		w.lidx[g] = r;
	}
	for (uint32_t g = 0; g < w.world; g++) {
		if (w.node_of[g] == w.node && w.lidx[g] < 0) {
			fail("rank %u is this node's but not in the op", g);
			return -1;
		}
	}
	if ((d = used_device(p)) == -2) {
		fail("across nodes, a node's ranks use one device; these use several");
		return -1;
	}
	if (d < 0 && w.wcomm)
		d = w.wdev;
	for (size_t i = 0; d < 0 && i < w.nmem; i++)
		d = w.mem[i].dev; /* a staging buffer's is -1 */
	if (d < 0)
		d = 0;
	if (w.wcomm && d != w.wdev) {
		fail("across nodes, a node's ranks use one device: device %d, then %d", w.wdev, d);
		return -1;
	}
	p->wdev = d;
	p->used[d] = 1;
	return 0;
}

/* Check op (commd did already: this is the second line) and resolve it into p. */
int plan_op(struct plan *p, const struct gpu_op *op, size_t nranks)
{
	size_t es = dtype_size((int)op->dtype);

	memset(p->used, 0, sizeof p->used);
	p->op = op;
	p->n = (int)op->n;
	p->world = (int)op->world;
	p->nall = p->world ? p->world : p->n;
	p->nccl = 0;
	if (op->n < 1 || op->n > GPU_OP_MAX_RANKS || op->n != nranks) {
		fail("%u ranks in a packet that holds %zu (at most %d)", op->n, nranks,
		     GPU_OP_MAX_RANKS);
		return -1;
	}
	if (op->type == T(SEND) &&
	    (op->n > 2 || op->world ||
	     (op->n == 2 && (op->rank[1].send_mem || op->rank[1].recv_mem)))) {
		fail("a send copies 1 rank's buffer (a second entry holds the receiver's event "
		     "only), not %u of %u", op->n, op->world);
		return -1;
	}
	if (op->world && op->world < op->n) {
		fail("%u ranks of a world of %u", op->n, op->world);
		return -1;
	}
	if (!dtype_valid((int)op->dtype) || !redop_valid((int)op->redop)) {
		fail("dtype %u or redop %u is not one of comm.h's", op->dtype, op->redop);
		return -1;
	}
	if ((p->spec->in == NEED_ROOT || p->spec->out == NEED_ROOT) &&
	    (op->root < 0 || op->root >= p->nall)) {
		fail("root %d is not one of %d ranks", op->root, p->nall);
		return -1;
	}
	if (mul_overflow_size(op->count, es, &p->block) ||
	    mul_overflow_size(p->block, p->spec->in_blocks ? (size_t)p->nall : 1, &p->in_len) ||
	    mul_overflow_size(p->block, p->spec->out_blocks ? (size_t)p->nall : 1, &p->out_len) ||
	    p->in_len > SIZE_MAX / 2 || p->out_len > SIZE_MAX / 2) {
		fail("count %" PRIu64 " is too large", op->count);
		return -1;
	}
	for (int r = 0; r < p->n; r++) {
		if (op->type == T(SEND) && r == 1) { /* the receiver's event only */
			p->in[r] = p->out[r] = NULL;
			p->in_dev[r] = p->out_dev[r] = -1;
		} else if (plan_buf(p, r, 0) || plan_buf(p, r, 1)) {
			return -1;
		}
	}
	if (op->type == T(SEND) && p->block && p->in_dev[0] < 0 && p->out_dev[0] < 0) {
		fail("a send from host memory to host memory");
		return -1;
	}
	p->nflags = (int)op->nflags;
	p->flags = (const struct gpu_flag *)&op->rank[op->n];
	return plan_flags(p) || (p->world && plan_world(p)) ? -1 : 0;
}

/* Make every used stream wait for the client's events of all ranks. */
int plan_wait_events(const struct plan *p)
{
	int first = 0;

	while (first < w.ndev - 1 && !p->used[first])
		first++;
	for (int r = 0; r < p->n; r++) {
		int home = p->in_dev[r] >= 0 ? p->in_dev[r] : p->out_dev[r];
		cudaEvent_t ev;

		if (!p->op->rank[r].has_event)
			continue;
		if (p->op->type == T(SEND) && r == 1)
			home = p->out_dev[0]; /* the receiver's entry: its buffer is the output */
		ev = event_open(p->op->rank[r].ready_event, home >= 0 ? home : first);
		if (!ev)
			return -1;
		/* every stream: a copy on one device may read a buffer on another */
		for (int d = 0; d < w.ndev; d++)
			if (p->used[d] && cuda_check(cudaStreamWaitEvent(w.dev[d].stream, ev, 0),
						     "cudaStreamWaitEvent"))
				return -1;
	}
	return 0;
}

/* Order every used stream after what all of them have queued so far. */
static int plan_join(const struct plan *p)
{
	for (int d = 0; d < w.ndev; d++)
		if (p->used[d] && (cuda_check(cudaSetDevice(d), "cudaSetDevice") ||
				   cuda_check(cudaEventRecord(w.dev[d].mark, w.dev[d].stream),
					      "cudaEventRecord")))
			return -1;
	for (int d = 0; d < w.ndev; d++)
		for (int e = 0; e < w.ndev; e++)
			if (d != e && p->used[d] && p->used[e] &&
			    cuda_check(cudaStreamWaitEvent(w.dev[d].stream, w.dev[e].mark, 0),
				       "cudaStreamWaitEvent"))
				return -1;
	return 0;
}

int copy(int d, void *dst, const void *src, size_t len)
{
	if (dst == src || !len)
		return 0;
	if (cuda_check(cudaSetDevice(d), "cudaSetDevice") ||
	    cuda_check(cudaMemcpyAsync(dst, src, len, cudaMemcpyDefault, w.dev[d].stream),
		       "cudaMemcpyAsync"))
		return -1;
	return 0;
}

/* Combine the inputs that live on device d, in rank order, into its scratch. */
int reduce_on(const struct plan *p, int d, enum gk_mode mode, size_t elems, void *out,
		     const void *in_acc)
{
	struct gk_inputs in;
	int k = 0;

	if (mode == GK_FINISH)
		in.p[k++] = in_acc;
	else
		for (int r = 0; r < p->n; r++)
			if (p->in_dev[r] == d)
				in.p[k++] = p->in[r];
	if (cuda_check(cudaSetDevice(d), "cudaSetDevice") ||
	    cuda_check(gk_reduce(mode, (int)p->op->dtype, (int)p->op->redop, out, &in, k, elems,
				 mode == GK_FINISH ? p->nall : k, w.dev[d].stream),
		       "reduce kernel"))
		return -1;
	return 0;
}

static int nccl_allreduce(struct plan *p, const int *devs, int k, size_t elems)
{
	ncclDataType_t type = nccl_type((int)p->op->dtype, (int)p->op->redop);
	ncclRedOp_t op = nccl_op((int)p->op->redop);
	int rc = 0;

	if (nccl_ready(devs, k) || nccl_check(ncclGroupStart(), "ncclGroupStart"))
		return -1;
	for (int i = 0; i < k && !rc; i++) {
		struct dev *x = &w.dev[devs[i]];

		rc = cuda_check(cudaSetDevice(devs[i]), "cudaSetDevice") ||
		     nccl_check(ncclAllReduce(x->scratch, x->scratch, elems, type, op, w.nccl[i],
					      x->stream),
				"ncclAllReduce");
	}
	if (nccl_check(ncclGroupEnd(), "ncclGroupEnd") || rc)
		return -1;
	p->nccl = 1;
	/* nonblocking: only once settled is the work on the streams, ahead of ours */
	return nccl_settle("ncclAllReduce");
}

/*
 * Whether the inputs, all on device d, can be combined straight into the
 * outputs (all-reduce and reduce): every output on d too, every buffer
 * 16-byte aligned, at most GK_MAX_OUT outputs, and no output overlapping
 * an input or another output unless it is that buffer whole (in place, or
 * the same output twice).
 */
static int direct_ok(const struct plan *p, int d)
{
	int nout = 0;

	if (p->op->type == T(REDUCE_SCATTER))
		return 0;
	for (int a = 0; a < p->n; a++) {
		uintptr_t o = (uintptr_t)p->out[a], i = (uintptr_t)p->in[a];

		if ((i | o) % 16)
			return 0;
		if (!o)
			continue;
		if (p->out_dev[a] != d || ++nout > GK_MAX_OUT)
			return 0;
		for (int b = 0; b < p->n; b++) {
			uintptr_t x = (uintptr_t)p->out[b];

			i = (uintptr_t)p->in[b];
			if ((o != i && o < i + p->in_len && i < o + p->out_len) ||
			    (o != x && x && o < x + p->out_len && x < o + p->out_len))
				return 0;
		}
	}
	return 1;
}

/*
 * One device, direct: its inputs combined into every output at once (one
 * input: copied), reading each input once and writing each output once.
 */
static int reduce_direct(const struct plan *p, int d)
{
	struct gk_outputs out;
	struct gk_inputs in;
	int nin = 0, nout = 0;

	for (int r = 0; r < p->n; r++) {
		if (p->in[r])
			in.p[nin++] = p->in[r];
		if (p->out[r])
			out.p[nout++] = p->out[r];
	}
	if (nin == 1) {
		for (int j = 0; j < nout; j++)
			if (copy(d, out.p[j], in.p[0], p->out_len))
				return -1;
		return 0;
	}
	if (cuda_check(cudaSetDevice(d), "cudaSetDevice") ||
	    cuda_check(gk_reduce_direct((int)p->op->dtype, (int)p->op->redop, &out, nout, &in, nin,
					p->op->count, nin, w.dev[d].stream),
		       "reduce kernel"))
		return -1;
	return 0;
}

/*
 * All-reduce, reduce and reduce-scatter: on one device, straight into the
 * outputs where reduce_direct may; else each device combines its ranks'
 * inputs into its scratch; across devices NCCL all-reduces those partials
 * (kept as accumulators so float16 rounds once) and each device finishes
 * its copy. Every output is then copied from its rank's device's result.
 */
int op_reduce(struct plan *p)
{
	int rs = p->op->type == T(REDUCE_SCATTER);
	size_t elems = p->op->count * (rs ? (size_t)p->n : 1), fin = p->in_len;
	size_t acc = gk_acc_size((int)p->op->dtype) * elems, res = 0;
	int devs[MAX_DEVICES], k = 0;

	for (int d = 0; d < w.ndev; d++)
		for (int r = 0; r < p->n; r++)
			if (p->in_dev[r] == d) {
				devs[k++] = d;
				break;
			}
	if (k == 1 && direct_ok(p, devs[0]))
		return reduce_direct(p, devs[0]);
	if (k == 1) {
		struct dev *x = &w.dev[devs[0]];

		if (scratch(devs[0], fin) || reduce_on(p, devs[0], GK_FINAL, elems, x->scratch, NULL))
			return -1;
	} else {
		res = acc;
		for (int i = 0; i < k; i++)
			if (scratch(devs[i], acc + fin) ||
			    reduce_on(p, devs[i], GK_PARTIAL, elems, w.dev[devs[i]].scratch, NULL))
				return -1;
		if (nccl_allreduce(p, devs, k, elems))
			return -1;
		for (int i = 0; i < k; i++) {
			struct dev *x = &w.dev[devs[i]];

			if (reduce_on(p, devs[i], GK_FINISH, elems, x->scratch + res, x->scratch))
				return -1;
		}
	}
	for (int r = 0; r < p->n; r++) {
		int d = p->in_dev[r];

		if (p->out[r] && copy(d, p->out[r], w.dev[d].scratch + res + (rs ? r * p->block : 0),
				      p->out_len))
			return -1;
	}
	return 0;
}

/* Where rank r's output starts when its input sits in it as the op's in-place form. */
static uintptr_t in_place_out(const struct plan *p, int r)
{
	switch (p->op->type) {
	case T(ALLGATHER):
		return (uintptr_t)p->in[r] - (size_t)r * p->block;
	case T(ALLTOALL):
		return 0; /* no overlap is safe */
	default:
		return (uintptr_t)p->in[r];
	}
}

/*
 * Whether an output overlaps an input other than in the in-place form, where
 * the one overlapping copy is a no-op and the others never touch an input.
 */
int needs_staging(const struct plan *p)
{
	for (int a = 0; a < p->n; a++) {
		uintptr_t o = (uintptr_t)p->out[a];

		for (int b = 0; b < p->n && o; b++) {
			uintptr_t i = (uintptr_t)p->in[b];

			if (!i || o >= i + p->in_len || i >= o + p->out_len)
				continue;
			if (a != b || o != in_place_out(p, a))
				return 1;
		}
	}
	return 0;
}

/* Copy every input into its device's scratch first, for outputs that alias them. */
int stage_inputs(struct plan *p)
{
	size_t at[MAX_DEVICES] = { 0 };

	for (int r = 0; r < p->n; r++)
		if (p->in[r])
			at[p->in_dev[r]] += p->in_len;
	for (int d = 0; d < w.ndev; d++)
		if (at[d] && scratch(d, at[d]))
			return -1;
	memset(at, 0, sizeof at);
	for (int r = 0; r < p->n; r++) {
		int d = p->in_dev[r];
		uint8_t *dst;

		if (!p->in[r])
			continue;
		dst = w.dev[d].scratch + at[d];
		if (copy(d, dst, p->in[r], p->in_len))
			return -1;
		p->in[r] = dst;
		at[d] += p->in_len;
	}
	return plan_join(p);
}

/* All-gather, broadcast, all-to-all and send: copies on the receiver's device. */
int op_copy(struct plan *p)
{
	size_t blk = p->block;
	int rc = 0;

	if (needs_staging(p) && stage_inputs(p))
		return -1;
	for (int r = 0; r < p->n && !rc; r++) {
		if (!p->out[r])
			continue;
		switch (p->op->type) {
		case T(ALLGATHER):
			for (int b = 0; b < p->n && !rc; b++)
				rc = copy(p->out_dev[r], p->out[r] + b * blk, p->in[b], blk);
			break;
		case T(ALLTOALL):
			for (int s = 0; s < p->n && !rc; s++)
				rc = copy(p->out_dev[r], p->out[r] + s * blk, p->in[s] + r * blk, blk);
			break;
		case T(BROADCAST):
			rc = copy(p->out_dev[r], p->out[r], p->in[p->op->root], blk);
			break;
		default: /* a send: on the receiver's device, or the sender's (staging) */
			rc = copy(p->out_dev[r] >= 0 ? p->out_dev[r] : p->in_dev[r], p->out[r],
				  p->in[r], blk);
		}
	}
	return rc;
}

