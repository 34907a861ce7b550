/*
 * gpu-io.c: commd's end of a worker's socket: each message the worker sends
 * (on_status), reading them (on_worker_io), and starting a job's worker.
 */
#include <config.h>

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "err.h"
#include "gpu-int.h"
#include "gpu-worker.h"
#include "log.h"

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

void on_worker_io(uv_poll_t *h, int status, int events)
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
struct gpu_worker *worker_start(struct job *j, comm_result_t *code, char *err,
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

