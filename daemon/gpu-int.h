/*
 * gpu-int.h: commd's side of the GPU workers (gpu.c), shared by its files:
 * a worker's and a staging buffer's state, the lists of workers, and the
 * helpers one file lends the others.
 */
#ifndef DAEMON_GPU_INT_H
#define DAEMON_GPU_INT_H

#include <stddef.h>
#include <stdint.h>

#include "commd.h"
#include "gpu-proto.h"

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

/* A list of workers, linked by link (workers) or by killed_link (killed). */
TAILQ_HEAD(gpu_workers, gpu_worker);

/* Every worker that is not freed yet (gpu.c). */
extern struct gpu_workers workers;
/* Workers killed busy, answered on the next turn (gpu-ops.c, worker_kill_busy). */
extern struct gpu_workers killed;
/* commd's loop, which gpu_probe was given (gpu.c). */
extern uv_loop_t *gpu_loop;

/* --- gpu.c: the probe, a worker's lifetime, packets ------------------------ */

/* The worker program's path; -1 when it is not executable. */
int worker_path(char *path, size_t len);
/* Kill the probe if it still runs. */
void probe_stop(void);
/* Unmap and free a staging buffer, taken off its worker's list. */
void stage_free(struct gpu_worker *w, struct gpu_stage *g);
/* A worker still there GPU_EOF_GRACE_MS after its connection ended: killed. */
void on_grace(uv_timer_t *t);
/* Stop talking to w: the worker sees EOF and exits, or is killed GPU_EOF_GRACE_MS later. */
void worker_hangup(struct gpu_worker *w);
/* Drop a reference to w: the last hangs up, and frees it once its process and handles are gone. */
void worker_put(struct gpu_worker *w);
/* Answer m's registration with code and detail, if it is unanswered and its rank still there. */
void reply_register(struct mem *m, comm_result_t code, const char *detail);
/* The worker will not open m: answer the rank, drop the registration. */
void open_failed(struct gpu_worker *w, struct mem *m, comm_result_t code,
			const char *detail);
/* The worker is gone (exited, or said something commd cannot read). */
void worker_lost(struct gpu_worker *w, const char *why);
/* The worker broke the protocol: it is killed, and its job fails saying why. */
void worker_bad(struct gpu_worker *w, const char *why);
/* The worker's process exited: lost, unless its connection had ended. */
void on_worker_exit(uv_process_t *p, int64_t status, int sig);
/* Poll w's socket for reading, and for writing while packets are queued. */
void update_poll(struct gpu_worker *w);
/* Write what is queued; -1 when the socket failed. */
int flush(struct gpu_worker *w);
/* Queue a packet (and fd, which it then owns) for w, in order. -1: out of memory. */
int worker_send(struct gpu_worker *w, const void *data, size_t len, int fd);

/* --- gpu-stage.c: staging buffers ------------------------------------------ */

/* MEM_OPENED for a staging buffer: 1 when st was one, -1 when it was answered already. */
int stage_opened(struct gpu_worker *w, const struct gpu_status *st);
/* The worker staged a send (or failed to): the data plane sends it, or tells the receiver why not. */
void staged_send(struct task *t);

/* --- gpu-io.c: the worker's messages, and its start ------------------------ */

void on_worker_io(uv_poll_t *h, int status, int events);
/* Start the job's worker; NULL with the code and the reason in err. */
struct gpu_worker *worker_start(struct job *j, comm_result_t *code, char *err,
				       size_t errlen);

#endif
