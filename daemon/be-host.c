/*
 * be-host.c: the host backend. Worker threads split an op into parts; each
 * part walks cache-sized chunks, reducing the ranks' inputs into a local
 * buffer and writing it straight into every output, in the ranks' memory.
 */
#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>

#include "commd.h"
#include "log.h"
#include "reduce.h"

#define CHUNK_BYTES (32u << 10)   /* one chunk: stays in L1/L2 */
#define PART_BYTES (1u << 20)     /* one part: what one thread takes at a time */
/*
 * An op touching fewer bytes (inputs and outputs over all ranks) than
 * INLINE_SCALE / workers, or than INLINE_MIN_BYTES, runs on the loop
 * thread: handing it to the workers and back costs two wake-ups, 60-150 us
 * on a 2-core machine whose ranks spin on the cores, as long as the loop
 * thread takes for 8 MiB (README, "Small ops on the loop thread").
 */
#define INLINE_SCALE (16u << 20)
#define INLINE_MIN_BYTES (256u << 10)

static struct {
	pthread_mutex_t lock;
	pthread_cond_t wake;
	TAILQ_HEAD(, task) queue;   /* tasks with parts not yet taken */
	TAILQ_HEAD(, task) done;    /* finished, for the loop thread */
	pthread_t *threads;
	int nthreads;
	int stop;
	int inflight;               /* loop thread only */
	size_t inline_bytes;        /* ops touching less run on the loop thread */
	uv_async_t async;
	uint8_t *inline_tmp;        /* the loop thread's chunk buffer */
} pool = {
	.lock = PTHREAD_MUTEX_INITIALIZER,
	.wake = PTHREAD_COND_INITIALIZER,
	.queue = TAILQ_HEAD_INITIALIZER(pool.queue),
	.done = TAILQ_HEAD_INITIALIZER(pool.done),
};

#define T(x) COMMPB__OP_TYPE__OP_##x

/*
 * Elements in the task's index space: one rank's block for all-reduce,
 * broadcast, reduce and a send; n blocks for reduce-scatter and all-gather
 * (block b: rank b's); n * n blocks for all-to-all (block r*n+s: what rank s
 * sends rank r).
 */
static size_t task_elems(const struct task *t)
{
	size_t n = (size_t)t->n;

	switch (t->type) {
	case T(REDUCE_SCATTER):
	case T(ALLGATHER):
		return t->count * n;
	case T(ALLTOALL):
		return t->count * n * n;
	default:
		return t->count;
	}
}

/* Copy n bytes to every output at off, except where it already is. */
static void copy_out(struct task *t, size_t off, const uint8_t *src, size_t n)
{
	for (int r = 0; r < t->n; r++)
		if (t->out[r] && t->out[r] + off != src)
			memcpy(t->out[r] + off, src, n);
}

/* The first output's bytes at off, or NULL when no rank has an output. */
static uint8_t *first_out(const struct task *t, size_t off)
{
	for (int r = 0; r < t->n; r++)
		if (t->out[r])
			return t->out[r] + off;
	return NULL;
}

/*
 * Do elements [lo, hi) of t's index space, chunk by chunk: a reduction goes
 * into an output while still in cache (or into tmp when outputs share
 * memory with inputs), copies straight from input to output.
 */
static void run_range(struct task *t, size_t lo, size_t hi, uint8_t *tmp, const void **src)
{
	size_t es = t->esize, chunk = CHUNK_BYTES / es;

	while (lo < hi) {
		size_t n = hi - lo < chunk ? hi - lo : chunk, b = lo / t->count, o = lo % t->count;

		/* a chunk never crosses a block */
		if (n > t->count - o)
			n = t->count - o;
		switch (t->type) {
		case T(ALLREDUCE):
		case T(REDUCE):
		case T(REDUCE_SCATTER): {
			uint8_t *dst = t->type == T(REDUCE_SCATTER) ? t->out[b] + o * es
				     : t->type == T(REDUCE)	    ? t->out[t->root] + lo * es
								    : first_out(t, lo * es);

			for (int r = 0; r < t->n; r++)
				src[r] = t->in[r] + lo * es;
			if (!t->direct || !dst)
				dst = tmp;
			reduce_n(t->dtype, t->redop, dst, src, t->n, n);
			if (t->type == T(ALLREDUCE))
				copy_out(t, lo * es, dst, n * es);
			else if (dst == tmp)
				memcpy(t->type == T(REDUCE) ? t->out[t->root] + lo * es
							    : t->out[b] + o * es,
				       tmp, n * es);
			break;
		}
		case T(ALLGATHER):
			copy_out(t, lo * es, t->in[b] + o * es, n * es);
			break;
		case T(BROADCAST):
			copy_out(t, lo * es, t->in[t->root] + lo * es, n * es);
			break;
		case T(ALLTOALL): {
			size_t r = b / (size_t)t->n, from = b % (size_t)t->n;
			uint8_t *to = t->out[r] + (from * t->count + o) * es;
			uint8_t *at = t->in[from] + (r * t->count + o) * es;

			if (!t->swap) {
				memcpy(to, at, n * es);
			} else if (r < from) { /* at is out[from]'s block r: the pair trades */
				memcpy(tmp, to, n * es);
				memcpy(to, at, n * es);
				memcpy(at, tmp, n * es);
			}
			break;
		}
		case T(SEND):
			if (t->out[0] != t->in[0])
				memcpy(t->out[0] + lo, t->in[0] + lo, n);
			break;
		default:
			break;
		}
		lo += n;
	}
}

static int run_part(struct task *t, size_t i, uint8_t *tmp);

/* A worker thread; arg: its chunk buffer, made by be_host_start, freed here. */
static void *worker(void *arg)
{
	uint8_t *tmp = arg;

	pthread_mutex_lock(&pool.lock);
	for (;;) {
		struct task *t;
		size_t i;
		int rc;

		while (!pool.stop && TAILQ_EMPTY(&pool.queue))
			pthread_cond_wait(&pool.wake, &pool.lock);
		if (pool.stop)
			break;
		t = TAILQ_FIRST(&pool.queue);
		i = t->next_part++;
		if (t->next_part == t->parts)
			TAILQ_REMOVE(&pool.queue, t, link);
		pthread_mutex_unlock(&pool.lock);
		rc = run_part(t, i, tmp);
		pthread_mutex_lock(&pool.lock);
		if (rc < 0)
			t->status = COMM_ERR_NO_MEMORY;
		if (--t->parts_left == 0) {
			TAILQ_INSERT_TAIL(&pool.done, t, link);
			uv_async_send(&pool.async);
		}
	}
	pthread_mutex_unlock(&pool.lock);
	free(tmp);
	return NULL;
}

static void on_done(uv_async_t *h)
{
	for (;;) {
		struct task *t;

		pthread_mutex_lock(&pool.lock);
		t = TAILQ_FIRST(&pool.done);
		if (t)
			TAILQ_REMOVE(&pool.done, t, link);
		pthread_mutex_unlock(&pool.lock);
		if (!t)
			break;
		if (--pool.inflight == 0)
			uv_unref((uv_handle_t *)&pool.async);
		engine_task_done(t);
	}
}

static int overlaps(const uint8_t *a, size_t alen, const uint8_t *b, size_t blen)
{
	return a < b + blen && b < a + alen;
}

/*
 * Outputs may alias inputs only in the in-place layouts (see comm.h); any
 * other overlap would let one chunk overwrite what another still reads.
 * *any: whether any output overlaps any input at all.
 */
static int needs_snapshot(const struct task *t, size_t inlen, size_t outlen, int *any)
{
	size_t block = t->count * t->esize;

	*any = 0;
	for (int a = 0; a < t->n; a++) {
		for (int b = 0; b < t->n; b++) {
			const uint8_t *expect = NULL;

			if (!t->out[a] || !t->in[b] || !overlaps(t->out[a], outlen, t->in[b], inlen))
				continue;
			*any = 1;
			if (a != b)
				return 1;
			switch (t->type) {
			case T(ALLREDUCE):
			case T(BROADCAST):
			case T(REDUCE):
			case T(SEND):
				expect = t->in[a];
				break;
			case T(REDUCE_SCATTER):
				expect = t->in[a] + (size_t)a * block;
				break;
			case T(ALLGATHER):
				expect = t->in[a] - (size_t)a * block;
				break;
			default:
				break; /* all-to-all: no overlap is safe */
			}
			if (t->out[a] != expect)
				return 1;
		}
	}
	return 0;
}

/*
 * An all-to-all in place on every rank, no two ranks' buffers overlapping:
 * rank r's block s and rank s's block r trade places, which needs no copy
 * of the inputs (n times a rank's buffer, in commd's own memory).
 */
static int swaps_in_place(const struct task *t, size_t len)
{
	for (int a = 0; a < t->n; a++) {
		if (!t->in[a] || t->out[a] != t->in[a])
			return 0;
		for (int b = 0; b < a; b++)
			if (overlaps(t->in[a], len, t->in[b], len))
				return 0;
	}
	return 1;
}

/* Copy every input aside so that outputs can be written in any order. */
static int take_snapshot(struct task *t, size_t inlen)
{
	t->snapshot = malloc(inlen * (size_t)t->n);
	if (!t->snapshot)
		return -1;
	for (int r = 0; r < t->n; r++) {
		if (!t->in[r])
			continue;
		memcpy(t->snapshot + (size_t)r * inlen, t->in[r], inlen);
		t->in[r] = t->snapshot + (size_t)r * inlen;
	}
	return 0;
}

/*
 * Run part i of t (first taking the snapshot, for a task of one part that
 * needs it); returns -1 when memory ran out.
 */
static int run_part(struct task *t, size_t i, uint8_t *tmp)
{
	size_t elems = task_elems(t), per = (elems + t->parts - 1) / t->parts;
	size_t lo = i * per, hi = lo + per < elems ? lo + per : elems;
	const void **src;

	if (t->snap_len && take_snapshot(t, t->snap_len) < 0)
		return -1;
	src = malloc((size_t)t->n * sizeof *src);
	if (!src)
		return -1;
	if (lo < hi)
		run_range(t, lo, hi, tmp, src);
	free(src);
	return 0;
}

int be_host_run(struct task *t)
{
	size_t block = t->count * t->esize, inlen = block, outlen = block;
	int any = 0;

	if (t->type == T(REDUCE_SCATTER) || t->type == T(ALLTOALL))
		inlen *= (size_t)t->n;
	if (t->type == T(ALLGATHER) || t->type == T(ALLTOALL))
		outlen *= (size_t)t->n;
	/* an unsafe overlap: copy the inputs aside first, off the loop thread if large */
	t->swap = t->type == T(ALLTOALL) && swaps_in_place(t, inlen);
	if (!t->swap && needs_snapshot(t, inlen, outlen, &any))
		t->snap_len = inlen;
	/* reductions then go straight into an output, which no input shares */
	t->direct = !t->swap && (!any || t->snap_len);
	if ((inlen + outlen) * (size_t)t->n < pool.inline_bytes) {
		t->parts = 1;
		if (run_part(t, 0, pool.inline_tmp) < 0)
			t->status = COMM_ERR_NO_MEMORY;
		return 1;
	}
	if (t->snap_len) {
		t->parts = 1; /* one worker copies, then runs the op */
	} else {
		t->parts = (task_elems(t) * t->esize + PART_BYTES - 1) / PART_BYTES;
		if (t->parts < (size_t)pool.nthreads)
			t->parts = (size_t)pool.nthreads;
		if (t->parts > task_elems(t))
			t->parts = task_elems(t);
	}
	t->parts_left = t->parts;
	t->next_part = 0;
	if (pool.inflight++ == 0)
		uv_ref((uv_handle_t *)&pool.async);
	pthread_mutex_lock(&pool.lock);
	TAILQ_INSERT_TAIL(&pool.queue, t, link);
	pthread_cond_broadcast(&pool.wake);
	pthread_mutex_unlock(&pool.lock);
	return 0;
}

/*
 * Worker i runs on core i (of the cores hwloc lists), so the threads spread
 * over the cores and NUMA nodes in order instead of piling up where the
 * scheduler started them; more workers than cores wrap around.
 */
static void pin(pthread_t th, int i, const int *cpus, int ncpus)
{
	cpu_set_t set;
	int rc;

	if (ncpus == 0)
		return;
	CPU_ZERO(&set);
	CPU_SET(cpus[i % ncpus], &set);
	rc = pthread_setaffinity_np(th, sizeof set, &set);
	if (rc != 0)
		log_warn("host backend: worker %d: cannot pin to CPU %d: %s", i, cpus[i % ncpus],
			 strerror(rc));
}

int be_host_start(uv_loop_t *loop, int nthreads, int pin_workers)
{
	int cpus[1024], ncpus = pin_workers ? topo_worker_cpus(cpus, 1024) : 0;
	char name[32]; /* a thread name: 15 characters at most */

	pool.inline_tmp = aligned_alloc(64, CHUNK_BYTES);
	pool.threads = calloc((size_t)nthreads, sizeof *pool.threads);
	if (!pool.inline_tmp || !pool.threads) {
		log_error("host backend: out of memory");
		return -1;
	}
	uv_async_init(loop, &pool.async, on_done);
	uv_unref((uv_handle_t *)&pool.async);
	/* a worker that cannot start is none: its share of each op goes to the others */
	for (int i = 0; i < nthreads; i++) {
		uint8_t *tmp = aligned_alloc(64, CHUNK_BYTES);

		if (!tmp || pthread_create(&pool.threads[i], NULL, worker, tmp) != 0) {
			log_error("host backend: cannot start worker thread %d: %s", i,
				  tmp ? "pthread_create failed" : "out of memory");
			free(tmp);
			break;
		}
		snprintf(name, sizeof name, "commd-host-%d", i);
		pthread_setname_np(pool.threads[i], name); /* for top -H and gdb */
		pin(pool.threads[i], i, cpus, ncpus);
		pool.nthreads++;
	}
	/* no worker: every op runs inline */
	pool.inline_bytes = pool.nthreads ? INLINE_SCALE / (size_t)pool.nthreads : SIZE_MAX;
	if (pool.inline_bytes < INLINE_MIN_BYTES)
		pool.inline_bytes = INLINE_MIN_BYTES;
	return 0;
}

int be_host_threads(void)
{
	return pool.nthreads;
}

void be_host_stop(void)
{
	pthread_mutex_lock(&pool.lock);
	pool.stop = 1;
	pthread_cond_broadcast(&pool.wake);
	pthread_mutex_unlock(&pool.lock);
	for (int i = 0; i < pool.nthreads; i++)
		pthread_join(pool.threads[i], NULL);
	pool.nthreads = 0;
	free(pool.threads);
	free(pool.inline_tmp);
	uv_close((uv_handle_t *)&pool.async, NULL);
}
