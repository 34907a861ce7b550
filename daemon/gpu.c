/*
 * gpu.c: device memory and the ops on it. commd itself only lists the
 * node's devices (topo-discover.c) and never holds a CUDA context or an
 * allocation: each job that registers device memory gets a worker process, commd-gpu
 * (common/gpu-proto.h), which opens the ranks' allocations and runs the
 * ops with its kernels and NCCL. A CUDA fault, a sticky error or a hung
 * NCCL call ends that worker: its job fails with COMM_ERR_ABORTED and the
 * reason, and commd and the other jobs go on. At start commd runs
 * `commd-gpu --probe` once, so a node without a GPU refuses device memory
 * at once with the probe's reason.
 */
#include <config.h>

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include "commd.h"
#include "err.h"
#include "gpu-proto.h"
#include "gpu-worker.h"
#include "log.h"
#include "util.h"

#define T(x) COMMPB__OP_TYPE__OP_##x
#define GPU_PROBE_TIMEOUT_S 60 /* a driver's first initialisation can take seconds */
#define STAGE_MIN (64u << 10)  /* a staging buffer's smallest size */
#define STAGE_IDLE_MAX 8       /* idle staging buffers a worker keeps, */
#define STAGE_IDLE_BYTES (256ull << 20) /* and the bytes they may hold */
#define GPU_EOF_GRACE_MS 5000  /* what a worker gets to exit once its connection ended */

struct gpu_pkt {
	TAILQ_ENTRY(gpu_pkt) link;
	int fd;                /* rides with the packet, or -1; closed once sent */
	size_t len;
	uint8_t data[];
};

/*
 * Host memory shared with the worker (a memfd it maps and pins), where a
 * send or recv of device memory across daemons passes through.
 */
struct gpu_stage {
	TAILQ_ENTRY(gpu_stage) link;
	struct gpu_worker *w;
	uint64_t gpu_id;       /* its mem id in the worker */
	uint8_t *p;
	size_t cap;
	int busy;              /* a task has it */
	int answered;          /* MEM_OPENED came */
	int gone;              /* given back before it came: freed when it does */
	char failed[GPU_DETAIL]; /* why the worker could not open it; "" */
};

struct gpu_worker {
	TAILQ_ENTRY(gpu_worker) link;
	struct job *job;       /* NULL once the job is freed */
	char job_name[JOB_NAME_MAX + 1];
	uv_process_t proc;
	uv_poll_t poll;
	uv_timer_t grace;      /* from the connection's end: a worker still there then is killed */
	int fd;                /* commd's end of the socketpair, -1 once closed */
	int refs;              /* the job's, one per device mem it has, one per busy staging buffer */
	int alive;             /* the process has not exited */
	int handles;           /* libuv handles not yet closed */
	int said_hello;        /* HELLO_REPLY came: the rest may follow */
	int refused;           /* its hello said no: reason says why */
	int wants_id;          /* node 0 of a job over nodes: one NCCL_ID is to come */
	char reason[GPU_DETAIL];
	int world_sent;        /* WORLD went: ops across nodes may follow */
	char no_id[GPU_DETAIL]; /* node 0 of a job over nodes: why NCCL_ID brought no id */
	TAILQ_HEAD(task_q, task) tasks; /* the ops sent to it, oldest first: it answers in order */
	TAILQ_HEAD(, gpu_pkt) outq;
	TAILQ_HEAD(, mem) opening; /* mems waiting for MEM_OPENED */
	TAILQ_HEAD(, gpu_stage) stages;
	int stages_idle;
	size_t stage_idle_bytes;
	int killed;            /* SIGKILLed busy: lost on the next turn (killed_why), not at exit */
	const char *killed_why;
	TAILQ_ENTRY(gpu_worker) killed_link;
};

static TAILQ_HEAD(, gpu_worker) workers = TAILQ_HEAD_INITIALIZER(workers);
/* workers killed busy, whose ops and opens are answered on the next turn */
static TAILQ_HEAD(, gpu_worker) killed = TAILQ_HEAD_INITIALIZER(killed);
static uv_idle_t killed_idle;
static int killed_ready;
static uv_loop_t *gpu_loop;
static const char *worker_cfg; /* the configured worker program, or "" */

/* --- the probe --------------------------------------------------------------- */

/*
 * The worker program: the configured one, else commd-gpu beside commd (a
 * build tree), else where it is installed. -1 when it is not executable.
 */
static int worker_path(char *path, size_t len)
{
	char self[PATH_MAX];
	ssize_t n;
	char *slash;

	if (*worker_cfg) {
		snprintf(path, len, "%s", worker_cfg);
		return access(path, X_OK);
	}
	n = readlink("/proc/self/exe", self, sizeof self - 1);
	if (n > 0) {
		self[n] = '\0';
		slash = strrchr(self, '/');
		if (slash) {
			*slash = '\0';
			if (snprintf(path, len, "%s/commd-gpu", self) < (int)len &&
			    access(path, X_OK) == 0)
				return 0;
		}
	}
	snprintf(path, len, "%s/commd-gpu", COMMD_PKGLIBEXECDIR);
	return access(path, X_OK);
}

static struct {
	uv_process_t proc;
	uv_pipe_t out;
	char line[sizeof srv.gpu_info];
	size_t len;
	int exited, status, pipe_done, timed_out;
} probe;

static void probe_settle(void)
{
	char *nl;

	if (!probe.exited || !probe.pipe_done)
		return;
	probe.line[probe.len] = '\0';
	if ((nl = strchr(probe.line, '\n')))
		*nl = '\0';
	if (probe.status == GPU_WORKER_EXIT_OK && *probe.line) {
		srv.gpu_state = GPU_READY;
		snprintf(srv.gpu_info, sizeof srv.gpu_info, "%s", probe.line);
	} else if (probe.status == GPU_WORKER_EXIT_BROKEN || probe.status > 128) {
		/* it said so, or it hung (the timeout's SIGKILL) or crashed in the driver */
		srv.gpu_state = GPU_BROKEN;
		if (probe.status == GPU_WORKER_EXIT_BROKEN && *probe.line)
			snprintf(srv.gpu_info, sizeof srv.gpu_info, "%s", probe.line);
		else if (!probe.timed_out)
			snprintf(srv.gpu_info, sizeof srv.gpu_info,
				 "broken: commd-gpu --probe was killed by signal %d", probe.status - 128);
		else
			snprintf(srv.gpu_info, sizeof srv.gpu_info,
				 "broken: commd-gpu --probe took over %d s", GPU_PROBE_TIMEOUT_S);
		return; /* main logs it, and stops */
	} else {
		srv.gpu_state = GPU_NONE;
		snprintf(srv.gpu_info, sizeof srv.gpu_info, "%s",
			 *probe.line ? probe.line : "unavailable: commd-gpu --probe said nothing");
	}
	log_info("gpu: %s", srv.gpu_info);
}

static void probe_alloc(uv_handle_t *h, size_t hint, uv_buf_t *buf)
{
	size_t room = sizeof probe.line - 1 - probe.len;
	static char sink[256];

	/* past the first line's room the rest is read and dropped */
	*buf = room ? uv_buf_init(probe.line + probe.len, (unsigned)room)
		    : uv_buf_init(sink, sizeof sink);
}

static void probe_read(uv_stream_t *s, ssize_t n, const uv_buf_t *buf)
{
	if (n > 0 && buf->base != probe.line + probe.len)
		return;
	if (n > 0) {
		probe.len += (size_t)n;
		return;
	}
	if (n < 0) {
		uv_close((uv_handle_t *)s, NULL);
		probe.pipe_done = 1;
		probe_settle();
	}
}

static void probe_exit(uv_process_t *p, int64_t status, int sig)
{
	probe.exited = 1;
	probe.status = sig ? 128 + sig : (int)status;
	uv_close((uv_handle_t *)p, NULL);
	probe_settle();
}

void gpu_probe(uv_loop_t *loop, const char *worker)
{
	uv_process_options_t o = { 0 };
	uv_stdio_container_t io[3];
	char path[PATH_MAX];
	char *args[3];
	int rc;

	gpu_loop = loop;
	worker_cfg = worker;
	if (!strcmp(worker, "none")) {
		srv.gpu_state = GPU_NONE;
		snprintf(srv.gpu_info, sizeof srv.gpu_info, "unavailable: gpu-worker is none");
		return;
	}
#ifndef HAVE_CUDA
	if (!*worker) {
		srv.gpu_state = GPU_NONE;
		snprintf(srv.gpu_info, sizeof srv.gpu_info,
			 "unavailable: commd was built without CUDA");
		return;
	}
#endif
	if (worker_path(path, sizeof path) < 0) {
		srv.gpu_state = GPU_NONE;
		snprintf(srv.gpu_info, sizeof srv.gpu_info, "unavailable: no GPU worker at %.200s",
			 path);
		return;
	}
	args[0] = path;
	args[1] = "--probe";
	args[2] = NULL;
	uv_pipe_init(loop, &probe.out, 0);
	io[0].flags = UV_IGNORE;
	io[1].flags = UV_CREATE_PIPE | UV_WRITABLE_PIPE;
	io[1].data.stream = (uv_stream_t *)&probe.out;
	io[2].flags = UV_INHERIT_FD;
	io[2].data.fd = 2;
	o.file = path;
	o.args = args;
	o.stdio = io;
	o.stdio_count = 3;
	o.exit_cb = probe_exit;
	srv.gpu_state = GPU_PROBING;
	snprintf(srv.gpu_info, sizeof srv.gpu_info, "probing (%.200s --probe)", path);
	rc = uv_spawn(loop, &probe.proc, &o);
	if (rc < 0) {
		uv_close((uv_handle_t *)&probe.proc, NULL); /* in the loop even so */
		uv_close((uv_handle_t *)&probe.out, NULL);
		srv.gpu_state = GPU_NONE;
		snprintf(srv.gpu_info, sizeof srv.gpu_info, "unavailable: %.160s: %s", path,
			 uv_strerror(rc));
		return;
	}
	uv_read_start((uv_stream_t *)&probe.out, probe_alloc, probe_read);
}

static void probe_stop(void)
{
	if (srv.gpu_state == GPU_PROBING && !probe.exited)
		uv_process_kill(&probe.proc, SIGKILL);
}

static void on_probe_timeout(uv_timer_t *t)
{
	probe.timed_out = 1;
	probe_stop();
}

void gpu_probe_wait(void)
{
	uv_timer_t t;

	if (srv.gpu_state != GPU_PROBING)
		return;
	uv_timer_init(gpu_loop, &t);
	uv_timer_start(&t, on_probe_timeout, GPU_PROBE_TIMEOUT_S * 1000, 0);
	while (srv.gpu_state == GPU_PROBING)
		uv_run(gpu_loop, UV_RUN_ONCE);
	uv_close((uv_handle_t *)&t, NULL);
	uv_run(gpu_loop, UV_RUN_NOWAIT);
}

void gpu_nccl_line(char *buf, size_t len)
{
	static const char none[] = "unavailable: ";
	const char *v = strstr(srv.gpu_info, "nccl ");
	size_t vlen = v ? strcspn(v, ",)") : 0;

	if (srv.gpu_state == GPU_READY)
		snprintf(buf, len, "available (%.*s)", (int)vlen, v ? v : "");
	else
		snprintf(buf, len, "unavailable (%s)",
			 strncmp(srv.gpu_info, none, sizeof none - 1) ? srv.gpu_info
								: srv.gpu_info + sizeof none - 1);
}

/* --- a worker's lifetime ------------------------------------------------------- */

static void stage_free(struct gpu_worker *w, struct gpu_stage *g)
{
	TAILQ_REMOVE(&w->stages, g, link);
	munmap(g->p, g->cap);
	free(g);
}

static void worker_free_maybe(struct gpu_worker *w)
{
	if (w->refs > 0 || w->alive || w->handles > 0)
		return;
	if (w->killed)
		TAILQ_REMOVE(&killed, w, killed_link);
	while (!TAILQ_EMPTY(&w->stages))
		stage_free(w, TAILQ_FIRST(&w->stages)); /* idle all: each busy one holds a ref */
	while (!TAILQ_EMPTY(&w->outq)) {
		struct gpu_pkt *k = TAILQ_FIRST(&w->outq);

		TAILQ_REMOVE(&w->outq, k, link);
		if (k->fd >= 0)
			close(k->fd);
		free(k);
	}
	TAILQ_REMOVE(&workers, w, link);
	free(w);
}

static void on_handle_closed(uv_handle_t *h)
{
	struct gpu_worker *w = h->data;

	w->handles--;
	worker_free_maybe(w);
}

/*
 * A worker is still there GPU_EOF_GRACE_MS after its connection ended: it
 * did not heed commd's hang-up (stuck in the driver, or rogue), or closed
 * its socket and did not exit.
 */
static void on_grace(uv_timer_t *t)
{
	struct gpu_worker *w = t->data;

	if (!w->alive)
		return;
	log_info("job %s: killing its gpu worker (pid %d), still there %d ms after its "
		 "connection ended", w->job_name, w->proc.pid, GPU_EOF_GRACE_MS);
	uv_process_kill(&w->proc, SIGKILL);
}

/* Stop talking to w: the worker sees EOF and exits, or is killed GPU_EOF_GRACE_MS later. */
static void worker_hangup(struct gpu_worker *w)
{
	if (w->fd < 0)
		return;
	uv_close((uv_handle_t *)&w->poll, on_handle_closed);
	close(w->fd);
	w->fd = -1;
	if (w->alive)
		uv_timer_start(&w->grace, on_grace, GPU_EOF_GRACE_MS, 0);
}

static void worker_put(struct gpu_worker *w)
{
	if (--w->refs > 0)
		return;
	worker_hangup(w);
	worker_free_maybe(w);
}

static void reply_register(struct mem *m, comm_result_t code, const char *detail)
{
	Commpb__Envelope env = COMMPB__ENVELOPE__INIT;
	Commpb__RegisterMemReply rr = COMMPB__REGISTER_MEM_REPLY__INIT;

	if (!m->conn || !m->unanswered)
		return;
	rr.status = code;
	rr.detail = (char *)detail;
	if (code == COMM_OK)
		rr.mem_id = m->id;
	env.id = m->reply_id;
	env.body_case = COMMPB__ENVELOPE__BODY_REGISTER_MEM_REPLY;
	env.register_mem_reply = &rr;
	m->unanswered = 0;
	conn_send(m->conn, &env);
}

/* The worker will not open m: answer the rank, drop the registration. */
static void open_failed(struct gpu_worker *w, struct mem *m, comm_result_t code,
			const char *detail)
{
	TAILQ_REMOVE(&w->opening, m, gpu_link);
	reply_register(m, code, detail);
	if (m->conn)
		mem_release(m->conn, m);
	mem_unref(m); /* the opening's own reference */
}

/* The worker is gone (exited, or said something commd cannot read). */
static void worker_lost(struct gpu_worker *w, const char *why)
{
	char detail[GPU_DETAIL + 64];
	struct task *t;

	if (!*w->reason || !w->refused)
		snprintf(w->reason, sizeof w->reason, "%s", why);
	snprintf(detail, sizeof detail, "gpu worker of job %.60s: %.200s", w->job_name,
		 w->reason);
	log_info("%s", detail);
	if (w->job)
		job_fail(w->job, COMM_ERR_ABORTED, "%s", detail);
	/* killed because the job failed (a deadline): that is the reason */
	while (!TAILQ_EMPTY(&w->opening)) {
		struct job *j = w->job;
		int failed = j && j->state == JOB_FAILED;

		open_failed(w, TAILQ_FIRST(&w->opening), failed ? j->fail_code : COMM_ERR_ABORTED,
			    failed ? j->fail_detail : detail);
	}
	/*
	 * Hang up first: finishing a task may close a mem, and a MEM_CLOSE sent
	 * to the dead worker would come back here and finish (and free) the rest.
	 */
	worker_hangup(w);
	while ((t = TAILQ_FIRST(&w->tasks))) {
		struct job *j = t->job;

		TAILQ_REMOVE(&w->tasks, t, link);
		t->status = j->state == JOB_FAILED ? j->fail_code : COMM_ERR_ABORTED;
		snprintf(t->detail, sizeof t->detail, "%.250s",
			 j->state == JOB_FAILED ? j->fail_detail : detail);
		engine_task_done(t);
	}
}

/*
 * The worker broke the protocol. It is our own program, but one that says
 * what it should not may not heed EOF either: it is killed, and its job
 * fails saying why.
 */
static void worker_bad(struct gpu_worker *w, const char *why)
{
	char reason[GPU_DETAIL];

	snprintf(reason, sizeof reason, "broke the protocol: %s", why);
	if (w->alive) {
		log_info("job %s: killing its gpu worker (pid %d), %s", w->job_name, w->proc.pid,
			 reason);
		uv_process_kill(&w->proc, SIGKILL);
	}
	worker_lost(w, reason);
}

static void on_worker_exit(uv_process_t *p, int64_t status, int sig)
{
	struct gpu_worker *w = p->data;
	char why[96];

	w->alive = 0;
	if (sig)
		snprintf(why, sizeof why, "killed by signal %d (%s)", sig, strsignal(sig));
	else
		snprintf(why, sizeof why, "exited with status %lld%s", (long long)status,
			 status == GPU_WORKER_EXIT_PROTOCOL ? " (a malformed message, or its socket failed)"
			 : status == GPU_WORKER_EXIT_DEVICE ? " (a CUDA or NCCL error)"
							     : "");
	/* an exit after EOF is the normal end; anything else fails the job */
	if (w->fd >= 0)
		worker_lost(w, why);
	uv_close((uv_handle_t *)&w->grace, on_handle_closed);
	uv_close((uv_handle_t *)p, on_handle_closed);
}

/* --- packets -------------------------------------------------------------------- */

static int send_pkt(int fd, const void *data, size_t len, int pass_fd)
{
	struct iovec iov = { (void *)data, len };
	union {
		char buf[CMSG_SPACE(sizeof(int))];
		struct cmsghdr align;
	} u;
	struct msghdr mh = { 0 };
	ssize_t n;

	mh.msg_iov = &iov;
	mh.msg_iovlen = 1;
	if (pass_fd >= 0) {
		struct cmsghdr *cm;

		memset(&u, 0, sizeof u);
		mh.msg_control = u.buf;
		mh.msg_controllen = sizeof u.buf;
		cm = CMSG_FIRSTHDR(&mh);
		cm->cmsg_level = SOL_SOCKET;
		cm->cmsg_type = SCM_RIGHTS;
		cm->cmsg_len = CMSG_LEN(sizeof(int));
		memcpy(CMSG_DATA(cm), &pass_fd, sizeof(int));
	}
	do
		n = sendmsg(fd, &mh, MSG_NOSIGNAL);
	while (n < 0 && errno == EINTR);
	if (n < 0)
		return errno == EAGAIN || errno == EWOULDBLOCK ? 0 : -1;
	return 1;
}

static void on_worker_io(uv_poll_t *h, int status, int events);

static void update_poll(struct gpu_worker *w)
{
	if (w->fd >= 0)
		uv_poll_start(&w->poll, UV_READABLE | (TAILQ_EMPTY(&w->outq) ? 0 : UV_WRITABLE),
			      on_worker_io);
}

/* Write what is queued; -1 when the socket failed. */
static int flush(struct gpu_worker *w)
{
	struct gpu_pkt *k;

	while ((k = TAILQ_FIRST(&w->outq))) {
		int rc = send_pkt(w->fd, k->data, k->len, k->fd);

		if (rc < 0)
			return -1;
		if (rc == 0)
			break;
		TAILQ_REMOVE(&w->outq, k, link);
		if (k->fd >= 0)
			close(k->fd);
		free(k);
	}
	update_poll(w);
	return 0;
}

/* Queue a packet (and fd, which it then owns) for w, in order. -1: out of memory. */
static int worker_send(struct gpu_worker *w, const void *data, size_t len, int fd)
{
	struct gpu_pkt *k;

	if (w->fd < 0) {
		if (fd >= 0)
			close(fd);
		return -1;
	}
	k = malloc(sizeof *k + len);
	if (!k) {
		if (fd >= 0)
			close(fd);
		return -1;
	}
	memcpy(k->data, data, len);
	k->len = len;
	k->fd = fd;
	TAILQ_INSERT_TAIL(&w->outq, k, link);
	if (flush(w) < 0)
		worker_lost(w, "its socket failed");
	return 0;
}

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
static int stage_opened(struct gpu_worker *w, const struct gpu_status *st)
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
static void staged_send(struct task *t)
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

static struct mem *find_opening(struct gpu_worker *w, uint64_t id)
{
	struct mem *m;

	TAILQ_FOREACH(m, &w->opening, gpu_link)
		if (m->gpu_id == id)
			return m;
	return NULL;
}

/*
 * One message from the worker, well formed. Anything out of the protocol
 * (a message before the hello reply or a second one, an answer to nothing
 * outstanding, an NCCL id not asked for, a status that is no result code)
 * is the worker's fault: worker_bad.
 */
static void on_status(struct gpu_worker *w, const struct gpu_status *st)
{
	char why[96];
	struct mem *m;
	struct task *t;
	int rc;

	if (!err_known(st->status) || st->status == COMM_INPROGRESS) {
		snprintf(why, sizeof why, "it answered status %d, no result code", (int)st->status);
		worker_bad(w, why);
		return;
	}
	if (!w->said_hello && st->h.type != GPU_MSG_HELLO_REPLY) {
		snprintf(why, sizeof why, "it sent a message of type %u before its hello reply",
			 st->h.type);
		worker_bad(w, why);
		return;
	}
	switch (st->h.type) {
	case GPU_MSG_HELLO_REPLY:
		if (w->said_hello) {
			worker_bad(w, "it sent a second hello reply");
			return;
		}
		w->said_hello = 1;
		if (st->status != COMM_OK) {
			w->refused = 1;
			w->wants_id = 0; /* a worker that serves nothing makes no id */
			snprintf(w->reason, sizeof w->reason, "%s", st->detail);
			log_info("gpu worker of job %s: %s", w->job_name, w->reason);
		}
		return;
	case GPU_MSG_MEM_OPENED:
		if ((rc = stage_opened(w, st)) < 0)
			worker_bad(w, "it answered a staging buffer twice");
		if (rc)
			return;
		m = find_opening(w, st->id);
		if (!m) {
			worker_bad(w, "it answered a mem it was not opening");
			return;
		}
		if (st->status != COMM_OK) {
			open_failed(w, m, st->status, st->detail);
			return;
		}
		TAILQ_REMOVE(&w->opening, m, gpu_link);
		m->opened = 1;
		reply_register(m, COMM_OK, "");
		mem_unref(m); /* the opening's reference; closed when the rest go */
		return;
	case GPU_MSG_NCCL_ID:
		if (!w->wants_id) {
			worker_bad(w, "it sent an NCCL id it was not asked for");
			return;
		}
		w->wants_id = 0;
		if (st->status != COMM_OK) {
			snprintf(w->no_id, sizeof w->no_id, "%s", st->detail);
			log_info("gpu worker of job %s: no NCCL id: %s", w->job_name, w->no_id);
		} else if (w->job && w->job->dist) {
			memcpy(w->job->dist->nccl_id, ((const struct gpu_nccl_id *)st)->nccl_id,
			       GPU_NCCL_ID_BYTES);
			w->job->dist->has_nccl_id = 1;
		}
		return;
	case GPU_MSG_OP_DONE:
		t = TAILQ_FIRST(&w->tasks);
		if (!t || (uint64_t)(uintptr_t)t != st->id) {
			worker_bad(w, t ? "it answered an op other than its oldest"
					: "it answered an op it did not have");
			return;
		}
		TAILQ_REMOVE(&w->tasks, t, link);
		t->status = st->status;
		snprintf(t->detail, sizeof t->detail, "%s", st->detail);
		if (t->stage && t->stage->failed[0] && t->status != COMM_OK)
			snprintf(t->detail, sizeof t->detail, "%s: staging buffer: %.200s",
				 op_type_name(t->type), t->stage->failed);
		if (t->net && t->type == T(SEND)) /* staged: the data plane sends it, or why not */
			staged_send(t);
		else
			engine_task_done(t);
		return;
	default:
		snprintf(why, sizeof why, "it sent a message of unknown type %u", st->h.type);
		worker_bad(w, why);
	}
}

static void on_worker_io(uv_poll_t *h, int status, int events)
{
	struct gpu_worker *w = h->data;

	if (status < 0) {
		worker_lost(w, "its socket failed");
		return;
	}
	if ((events & UV_WRITABLE) && flush(w) < 0) {
		worker_lost(w, "its socket failed");
		return;
	}
	while (w->fd >= 0 && (events & UV_READABLE)) {
		union {
			struct gpu_status st;
			struct gpu_nccl_id id;
		} m;
		struct gpu_status *st = &m.st;
		ssize_t n = recv(w->fd, &m, sizeof m, MSG_DONTWAIT | MSG_TRUNC);

		if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
			return;
		if (n == 0 && w->alive) {
			/* it is exiting: its exit status is the better reason; one that lives on is killed */
			uv_poll_stop(&w->poll);
			if (!uv_is_active((uv_handle_t *)&w->grace)) /* from the first EOF on */
				uv_timer_start(&w->grace, on_grace, GPU_EOF_GRACE_MS, 0);
			return;
		}
		if (n <= 0) {
			worker_lost(w, n == 0 ? "it closed its socket" : "its socket failed");
			return;
		}
		/* MSG_TRUNC: n is the packet's length, however long; what is past m is dropped */
		if ((size_t)n < sizeof st->h ||
		    (size_t)n != (st->h.type == GPU_MSG_NCCL_ID ? sizeof m.id : sizeof m.st) ||
		    st->h.version != GPU_PROTO_VERSION) {
			char why[96];

			snprintf(why, sizeof why, "a malformed message (%zd bytes%s)", n,
				 (size_t)n > sizeof m ? ", too long" : "");
			worker_bad(w, why);
			return;
		}
		st->detail[sizeof st->detail - 1] = '\0';
		on_status(w, st);
	}
}

/* A failed spawn's handle is in the loop all the same: w goes once it is closed. */
static void on_spawn_closed(uv_handle_t *h)
{
	free(h->data);
}

/*
 * Whether errno e says commd is out of fds, memory or processes; a libuv
 * error is the negative errno (UV_EMFILE is -EMFILE on Unix).
 */
static int out_of_resources(int e)
{
	e = e < 0 ? -e : e;
	return e == EMFILE || e == ENFILE || e == ENOMEM || e == ENOBUFS || e == EAGAIN;
}

/* What a worker that cannot start for e (an errno, or a libuv error) tells the rank, beside the reason. */
static const char *start_hint(int e)
{
	e = e < 0 ? -e : e;
	if (e == EMFILE)
		return " (commd is out of file descriptors: see its open files limit)";
	if (e == ENFILE)
		return " (the system is out of file descriptors)";
	return "";
}

/*
 * Start the job's worker; NULL with the code and the reason in err:
 * COMM_ERR_NO_MEMORY when commd is out of fds, memory or processes (the
 * job may try again), COMM_ERR_UNSUPPORTED when the worker cannot run.
 */
static struct gpu_worker *worker_start(struct job *j, comm_result_t *code, char *err,
				       size_t errlen)
{
	uv_process_options_t o = { 0 };
	uv_stdio_container_t io[4];
	struct gpu_hello hello = { { GPU_MSG_HELLO, GPU_PROTO_VERSION }, "", 0, 1, 0, 0 };
	struct gpu_worker *w;
	char path[PATH_MAX];
	char *args[3];
	int sv[2], rc;

	*code = COMM_ERR_UNSUPPORTED;
	if (worker_path(path, sizeof path) < 0) {
		snprintf(err, errlen, "device memory: no GPU worker at %s", path);
		return NULL;
	}
	*code = COMM_ERR_NO_MEMORY;
	w = calloc(1, sizeof *w);
	if (!w) {
		snprintf(err, errlen, "device memory: out of memory");
		return NULL;
	}
	if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) < 0) {
		int e = errno;

		if (!out_of_resources(e))
			*code = COMM_ERR_INTERNAL;
		snprintf(err, errlen, "device memory: cannot start the gpu worker: socketpair: %s%s",
			 strerror(e), start_hint(e));
		free(w);
		return NULL;
	}
	args[0] = path;
	args[1] = "--worker";
	args[2] = NULL;
	io[0].flags = UV_IGNORE;
	io[1].flags = UV_INHERIT_FD;
	io[1].data.fd = 2; /* its stdout and stderr go where commd's log goes */
	io[2].flags = UV_INHERIT_FD;
	io[2].data.fd = 2;
	io[GPU_WORKER_FD].flags = UV_INHERIT_FD;
	io[GPU_WORKER_FD].data.fd = sv[1];
	o.file = path;
	o.args = args;
	o.stdio = io;
	o.stdio_count = 4;
	/*
	 * Its own session: a Ctrl-C at a foreground commd's terminal drains commd,
	 * and the jobs' ops on the GPU finish, not die with SIGINT. commd stops its
	 * workers itself; one outliving commd is killed (PR_SET_PDEATHSIG).
	 */
	o.flags = UV_PROCESS_DETACHED;
	o.exit_cb = on_worker_exit;
	w->proc.data = w;
	rc = uv_spawn(gpu_loop, &w->proc, &o);
	close(sv[1]);
	if (rc < 0) {
		if (!out_of_resources(rc))
			*code = COMM_ERR_UNSUPPORTED;
		snprintf(err, errlen, "device memory: cannot start %s: %s%s", path, uv_strerror(rc),
			 start_hint(rc));
		close(sv[0]);
		uv_close((uv_handle_t *)&w->proc, on_spawn_closed); /* freed there, not now */
		return NULL;
	}
	fcntl(sv[0], F_SETFL, fcntl(sv[0], F_GETFL) | O_NONBLOCK);
	w->fd = sv[0];
	w->alive = 1;
	w->handles = 3; /* the process, the poll and the grace timer */
	w->refs = 1;    /* the job's */
	w->job = j;
	snprintf(w->job_name, sizeof w->job_name, "%s", j->name);
	TAILQ_INIT(&w->outq);
	TAILQ_INIT(&w->opening);
	TAILQ_INIT(&w->tasks);
	TAILQ_INIT(&w->stages);
	uv_poll_init(gpu_loop, &w->poll, w->fd);
	w->poll.data = w;
	uv_timer_init(gpu_loop, &w->grace);
	w->grace.data = w;
	TAILQ_INSERT_TAIL(&workers, w, link);
	update_poll(w);
	snprintf(hello.job, sizeof hello.job, "%s", j->name);
	hello.world = (uint32_t)j->world;
	if (j->dist && j->dist->nnodes > 1) {
		hello.nnodes = (uint32_t)j->dist->nnodes;
		hello.node = (uint32_t)j->dist->self;
		w->wants_id = hello.node == 0;
	}
	worker_send(w, &hello, sizeof hello, -1);
	log_info("job %s: gpu worker started (pid %d)", j->name, w->proc.pid);
	return w;
}

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
