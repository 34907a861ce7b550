/*
 * gpu-stage.c: staging buffers, the host memory a worker shares with commd
 * where a send or recv of device memory across daemons passes through.
 */
#include <config.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "gpu-int.h"
#include "log.h"
#include "util.h"

/* --- staging: device memory sent or received across daemons ---------------------- */

/*
 * A send or recv of device memory whose partner is on another daemon goes
 * through host memory here, so that the data plane moves it like any
 * other (and the other side may be host memory). A send: the worker copies
 * the rank's buffer into a staging buffer (the rank's done flag is written
 * then: its buffer may be reused), and the data plane sends that. A recv:
 * the data plane receives into a staging buffer, and the worker copies it
 * into the rank's buffer. These are local copies, which never wait for
 * another node: they may run before, between or after the job's device
 * collectives in any order without a deadlock.
 */

static void stage_close(struct gpu_worker *w, struct gpu_stage *g)
{
	struct gpu_mem_close mc = { { GPU_MSG_MEM_CLOSE, GPU_PROTO_VERSION }, g->gpu_id };

	if (w->fd >= 0 && !g->failed[0])
		worker_send(w, &mc, sizeof mc, -1);
	stage_free(w, g);
}

/* MEM_OPENED for a staging buffer: 1 when st was one, -1 when it was answered already. */
int stage_opened(struct gpu_worker *w, const struct gpu_status *st)
{
	struct gpu_stage *g;

	TAILQ_FOREACH(g, &w->stages, link)
		if (g->gpu_id == st->id)
			break;
	if (!g)
		return 0;
	if (g->answered)
		return -1;
	g->answered = 1;
	if (st->status != COMM_OK) {
		snprintf(g->failed, sizeof g->failed, "%s", st->detail);
		log_info("gpu worker of job %s: staging buffer: %s", w->job_name, g->failed);
		if (!g->busy && !g->gone) { /* idle already: of no use */
			w->stages_idle--;
			w->stage_idle_bytes -= g->cap;
			g->gone = 1;
		}
	}
	if (g->gone)
		stage_close(w, g);
	return 1;
}

/* Give t a staging buffer of len bytes, new or idle; -1 with why in t->detail. */
static int stage_get(struct gpu_worker *w, struct task *t, size_t len)
{
	struct gpu_mem_open mo = { { GPU_MSG_MEM_OPEN, GPU_PROTO_VERSION }, 0, GPU_MEM_HOST, 0, 0,
				   { 0 }, "" };
	struct gpu_stage *g, *best = NULL;
	size_t cap = STAGE_MIN;
	int fd;

	TAILQ_FOREACH(g, &w->stages, link)
		if (!g->busy && !g->gone && !g->failed[0] && g->cap >= len &&
		    (!best || g->cap < best->cap))
			best = g;
	if (best) {
		w->stages_idle--;
		w->stage_idle_bytes -= best->cap;
		g = best;
		goto got;
	}
	if (len > SIZE_MAX - STAGE_MIN) {
		snprintf(t->detail, sizeof t->detail, "%s: %zu bytes is too large",
			 op_type_name(t->type), len);
		return -1;
	}
	if (len > cap) /* a multiple of STAGE_MIN: the next op of this size reuses it */
		cap = (len + STAGE_MIN - 1) / STAGE_MIN * STAGE_MIN;
	g = calloc(1, sizeof *g);
	fd = memfd_create("commd-stage", MFD_CLOEXEC);
	if (!g || fd < 0 || ftruncate(fd, (off_t)cap) < 0 ||
	    (g->p = mmap(NULL, cap, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)) == MAP_FAILED) {
		snprintf(t->detail, sizeof t->detail, "%s: a staging buffer of %zu bytes: %s",
			 op_type_name(t->type), cap, strerror(errno));
		if (fd >= 0)
			close(fd);
		free(g);
		return -1;
	}
	g->w = w;
	g->cap = cap;
	g->gpu_id = ++srv.next_gpu_mem;
	TAILQ_INSERT_TAIL(&w->stages, g, link);
	mo.id = g->gpu_id;
	mo.rank = t->local;
	mo.size = cap;
	/* its answer is not waited for: an op on a buffer the worker could not open fails */
	if (worker_send(w, &mo, sizeof mo, fd) < 0) {
		snprintf(t->detail, sizeof t->detail, "%s: %s", op_type_name(t->type),
			 w->fd < 0 ? "the job's gpu worker is gone" : "out of memory");
		stage_free(w, g);
		return -1;
	}
got:
	g->busy = 1;
	w->refs++; /* the worker (and so the mapping) stays while the task has it */
	t->stage = g;
	return 0;
}

/* Give up g, which is not busy (nor idle any more): closed, or once its MEM_OPENED came. */
static void stage_drop(struct gpu_worker *w, struct gpu_stage *g)
{
	if (w->fd >= 0 && !g->answered)
		g->gone = 1;
	else
		stage_close(w, g);
}

/* Whether an idle buffer of cap bytes has room beside the idle ones. */
static int stage_fits(const struct gpu_worker *w, size_t cap)
{
	return w->stages_idle < STAGE_IDLE_MAX && w->stage_idle_bytes + cap <= STAGE_IDLE_BYTES;
}

/*
 * t is done with its staging buffer: kept idle as the one used last (the
 * list runs from the one used longest ago), the oldest idle ones closed to
 * make room. A job's sends tend to repeat their sizes, so the last used
 * is the likeliest to fit the next; kept first come, a sweep of sizes
 * filled the room with the small ones and made and pinned every large
 * buffer again.
 */
void gpu_stage_put(struct task *t)
{
	struct gpu_stage *g = t->stage, *x = NULL;
	struct gpu_worker *w = g->w;

	t->stage = NULL;
	g->busy = 0;
	/*
	 * One at a time from the list's head: closing one may find the worker
	 * gone (worker_lost), which gives back the buffers of the tasks it had
	 * and may free any other (the task's reference keeps w and g).
	 */
	while (w->fd >= 0 && !g->failed[0] && g->cap <= STAGE_IDLE_BYTES && !stage_fits(w, g->cap)) {
		TAILQ_FOREACH(x, &w->stages, link)
			if (x != g && !x->busy && !x->gone && !x->failed[0])
				break;
		if (!x)
			break;
		w->stages_idle--;
		w->stage_idle_bytes -= x->cap;
		stage_drop(w, x);
	}
	if (w->fd < 0 || g->failed[0] || !stage_fits(w, g->cap)) {
		stage_drop(w, g);
	} else {
		TAILQ_REMOVE(&w->stages, g, link);
		TAILQ_INSERT_TAIL(&w->stages, g, link);
		w->stages_idle++;
		w->stage_idle_bytes += g->cap;
	}
	worker_put(w);
}

/*
 * The worker staged a send (or failed to): the data plane sends it, or
 * tells the receiver why not; unless the job failed meanwhile (the other
 * nodes know, and nothing would cancel it there).
 */
void staged_send(struct task *t)
{
	if (t->job->state != JOB_READY) {
		engine_task_done(t);
		return;
	}
	if (t->status == COMM_OK)
		t->in[0] = t->stage->p;
	be_net_run(t);
}

/* Copy t's data to (send) or from its staging buffer on the worker; 1 when that failed at once. */
static int stage_copy(struct task *t)
{
	t->started_ms = now_ms(); /* the worker's deadline counts from here */
	return be_gpu_run(t);
}

void gpu_p2p_start(struct task *t)
{
	int send = t->type == T(SEND);

	if (t->status == COMM_OK && stage_get(t->job->gpu, t, t->count) < 0)
		t->status = COMM_ERR_NO_MEMORY;
	if (t->status == COMM_OK && send) {
		if (stage_copy(t))
			staged_send(t);
		return;
	}
	if (t->status == COMM_OK)
		t->out[0] = t->stage->p;
	be_net_run(t);
}

int gpu_p2p_received(struct task *t)
{
	return t->status == COMM_OK && t->stage && !stage_copy(t);
}

