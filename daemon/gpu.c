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
 *
 * gpu.c holds the probe, a worker's lifetime and the packets to it;
 * gpu-stage.c the staging buffers; gpu-io.c the worker's messages and its
 * start; gpu-ops.c device memory and the ops. gpu-int.h is what they share.
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
#include "gpu-int.h"
#include "gpu-proto.h"
#include "gpu-worker.h"
#include "log.h"
#include "util.h"

struct gpu_workers workers = TAILQ_HEAD_INITIALIZER(workers);
/* workers killed busy, whose ops and opens are answered on the next turn */
struct gpu_workers killed = TAILQ_HEAD_INITIALIZER(killed);
uv_loop_t *gpu_loop;
static const char *worker_cfg; /* the configured worker program, or "" */

/* --- the probe --------------------------------------------------------------- */

/*
 * The worker program: the configured one, else commd-gpu beside commd (a
 * build tree), else where it is installed. -1 when it is not executable.
 */
int worker_path(char *path, size_t len)
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

void probe_stop(void)
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

void stage_free(struct gpu_worker *w, struct gpu_stage *g)
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
void on_grace(uv_timer_t *t)
{
	struct gpu_worker *w = t->data;

	if (!w->alive)
		return;
	log_info("job %s: killing its gpu worker (pid %d), still there %d ms after its "
		 "connection ended", w->job_name, w->proc.pid, GPU_EOF_GRACE_MS);
	uv_process_kill(&w->proc, SIGKILL);
}

/* Stop talking to w: the worker sees EOF and exits, or is killed GPU_EOF_GRACE_MS later. */
void worker_hangup(struct gpu_worker *w)
{
	if (w->fd < 0)
		return;
	uv_close((uv_handle_t *)&w->poll, on_handle_closed);
	close(w->fd);
	w->fd = -1;
	if (w->alive)
		uv_timer_start(&w->grace, on_grace, GPU_EOF_GRACE_MS, 0);
}

void worker_put(struct gpu_worker *w)
{
	if (--w->refs > 0)
		return;
	worker_hangup(w);
	worker_free_maybe(w);
}

void reply_register(struct mem *m, comm_result_t code, const char *detail)
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
void open_failed(struct gpu_worker *w, struct mem *m, comm_result_t code,
			const char *detail)
{
	TAILQ_REMOVE(&w->opening, m, gpu_link);
	reply_register(m, code, detail);
	if (m->conn)
		mem_release(m->conn, m);
	mem_unref(m); /* the opening's own reference */
}

/* The worker is gone (exited, or said something commd cannot read). */
void worker_lost(struct gpu_worker *w, const char *why)
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
void worker_bad(struct gpu_worker *w, const char *why)
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

void on_worker_exit(uv_process_t *p, int64_t status, int sig)
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

void update_poll(struct gpu_worker *w)
{
	if (w->fd >= 0)
		uv_poll_start(&w->poll, UV_READABLE | (TAILQ_EMPTY(&w->outq) ? 0 : UV_WRITABLE),
			      on_worker_io);
}

/* Write what is queued; -1 when the socket failed. */
int flush(struct gpu_worker *w)
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
int worker_send(struct gpu_worker *w, const void *data, size_t len, int fd)
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

