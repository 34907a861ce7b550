/*
 * commd.h: the daemon's own types and the functions its files share: the
 * server, connections, the dispatch table, registered memory, jobs and the
 * op engine with its host backend.
 */
#ifndef DAEMON_COMMD_H
#define DAEMON_COMMD_H

#include <stdint.h>
#include <stdio.h>
#include <sys/queue.h>
#include <sys/types.h>
#include <uv.h>

#include "comm.h"
#include "commd.pb-c.h"
#include "frame.h"

#ifndef TAILQ_FOREACH_SAFE
#define TAILQ_FOREACH_SAFE(var, head, field, tvar)                             \
	for ((var) = TAILQ_FIRST(head); (var) && ((tvar) = TAILQ_NEXT(var, field), 1); \
	     (var) = (tvar))
#endif

#define MEM_MAX_PER_CONN 4096  /* registrations one connection may hold */
#define GPU_MEM_MAX (1ull << 48) /* no device allocation is larger: claims past it are refused */
#define TIMEOUT_MAX_MS (24u * 3600 * 1000)
#define JOB_NAME_MAX 255
#define TOKEN_MAX 256
#define WORLD_MAX 4096
#define DEFAULT_TIMEOUT_MS (10u * 60 * 1000)

struct conn;
struct job;

/* --- server.c: the listener and the daemon-wide state --------------------- */

struct server {
	uv_loop_t *loop;
	const char *socket_path;
	int listen_fd;
	int activated;         /* listen_fd came from the service manager (LISTEN_FDS) */
	uv_poll_t listen_poll;
	uv_timer_t tick;
	uv_signal_t sig_term;
	uv_signal_t sig_int;
	uv_signal_t sig_hup;   /* reload the settings that may change at run time */
	TAILQ_HEAD(, conn) conns;
	TAILQ_HEAD(, job) jobs;
	uint64_t start_ms;
	uint64_t nconns;
	uint64_t ops_completed;
	uint64_t bytes_moved;
	uint64_t errors;
	uint32_t default_timeout_ms;
	int stopping;
	int draining;          /* SIGTERM: no new ops; those in flight may finish */
	uint64_t drain_until_ms;
	uint32_t drain_ms;     /* the drain budget */
	int64_t admin_gid;     /* members see every job in status; -1: root alone */
	struct limits {        /* config: refusals past them are clear errors */
		uint32_t conns;        /* connections at once */
		uint32_t conns_per_uid;
		uint32_t handshake_ms; /* from accept to the hello */
		uint32_t frame_ms;     /* a frame begun must be whole within this */
		uint64_t job_mem;      /* host memory one job may register, bytes */
		uint32_t frame_bytes;  /* longest message a client may send */
		int fds_per_frame;     /* most fds one message may carry */
		uint32_t ops_per_rank; /* ops a rank may have posted and not had answered */
		uint32_t maps_per_uid; /* host memory registrations (mappings) of one uid */
		uint64_t wq_bytes;     /* replies queued to a client that does not read */
	} lim;
	char admin_group[64];
	int spare_fd;          /* given up to accept and refuse a client when out of fds */
	int accept_paused;     /* out of fds, no spare: the tick re-arms the listener */
	uint64_t shed;         /* connections refused for want of fds, since the last log */
	uint32_t watchdog_ms;  /* WATCHDOG=1 from the tick twice per this; 0: none asked */
	uint64_t watchdog_last_ms;
	int gpu_state;         /* GPU_PROBING, GPU_READY or GPU_NONE */
	char gpu_info[256];    /* commd-gpu --probe's line, or why there is none */
	uint64_t next_gpu_mem; /* ids of device memory, unique in the daemon */
};

extern struct server srv;

/*
 * Listen on the socket the service manager passed (socket activation), else
 * on path: mode 0666, or 0660 and group gid when gid >= 0.
 */
int server_start(uv_loop_t *loop, const char *path, int64_t gid);
/*
 * SIGTERM: stop accepting, refuse new joins and ops (COMM_ERR_SHUTDOWN), let
 * the ops in flight finish for up to srv.drain_ms, then server_shutdown.
 */
void server_drain(void);
/*
 * Tell the service manager head (READY=1, STOPPING=1, ...; NULL: nothing)
 * with STATUS=, what commd serves and how many jobs and ranks it has, or
 * how much is left to drain. With no head, only when STATUS= changed.
 */
void server_notify(const char *head);
/* Fail what is left with COMM_ERR_SHUTDOWN, close everything, stop the backends. */
void server_shutdown(void);
/* Stop accepting, close every connection and the listener. */
void server_stop(void);

/* --- config.c: settings from the config file, then the flags ------------- */

#define CONFIG_DEFAULT_FILE COMMD_SYSCONFDIR "/commd/commd.conf"
#define CONFIG_DEFAULT_SOCKET "/run/commd/commd.sock"

struct config {
	char socket[108];      /* sun_path's size */
	char topology[4096];   /* "" : discover */
	char gpu_worker[4096]; /* "" : commd-gpu beside commd, else in pkglibexecdir */
	char peer_listen[256]; /* host:port for other daemons; "": none */
	char admin_group[64];  /* "" : root alone sees every job */
	char socket_group[64]; /* "" : the socket is 0666; else 0660 and this group */
	int log_level;
	int threads;
	int pin_workers;       /* bind worker i to core i */
	uint32_t timeout_ms;
	uint32_t drain_ms;     /* SIGTERM: how long ops in flight may take to finish */
	int net_spin_us;       /* net_set_spin's; -1: auto */
	struct limits lim;
};

/* The defaults: the socket above, log level info, a thread a core, 10 minutes. */
void config_init(struct config *cfg);
/* Set key (a flag's long name) from text; -1 with "key: why" in err. */
int config_set(struct config *cfg, const char *key, const char *val, char *err, size_t errlen);
/*
 * Read `key = value` lines from path over cfg. A missing file is fine unless
 * must_exist. -1 with "path:line: why" in err.
 */
int config_load(struct config *cfg, const char *path, int must_exist, char *err, size_t errlen);

/* --- notify.c: the service manager's notify socket ------------------------ */

/* Send one sd_notify-style message if NOTIFY_SOCKET is set; 0 or -errno. */
int notify_send(const char *msg);
/*
 * The service manager's watchdog interval (WATCHDOG_USEC, for this pid when
 * WATCHDOG_PID says) in ms; 0 when it has none.
 */
uint32_t notify_watchdog_ms(void);

/* --- gpu.c, gpu-stage.c, gpu-ops.c: device memory and ops, a worker per job --- */

enum { GPU_PROBING, GPU_READY, GPU_NONE, GPU_BROKEN };

struct gpu_worker;
struct gpu_stage;
struct mem;
struct task;

/*
 * Start `WORKER --probe` (worker "": commd-gpu beside commd, else in
 * pkglibexecdir); srv.gpu_state is GPU_PROBING until it answers with
 * srv.gpu_info: GPU_READY, GPU_NONE, or GPU_BROKEN (a GPU that fails: commd
 * does not start). Without CUDA in the build and no worker named, or
 * worker "none": GPU_NONE.
 */
void gpu_probe(uv_loop_t *loop, const char *worker);
/* Run the loop until the probe has answered (at most a minute, then it is killed). */
void gpu_probe_wait(void);
/* Kill every worker (daemon shutdown); their handles close in the loop. */
void gpu_stop(void);
/*
 * Register device memory (RegisterMem of a MEM_CUDA_* kind) for rank c: the
 * job's worker opens it, and the answer to request req_id goes out when it
 * has. COMM_INPROGRESS then; otherwise the error, explained in err. Takes fd
 * (-1 for none), closed in all cases.
 */
comm_result_t gpu_mem_register(struct conn *c, const Commpb__RegisterMem *r, int fd,
			       uint64_t req_id, char *err, size_t errlen);
/* The last reference to device memory m is gone: the worker closes it. */
void gpu_mem_gone(struct mem *m);
/*
 * Whether t's buffers are device memory (1), host memory (0), or both (-1,
 * why in err).
 */
int gpu_task_on_device(const struct task *t, char *err, size_t errlen);
/*
 * Run t on the job's worker: 0 when started (engine_task_done follows), 1
 * when it failed at once (t->status and t->detail say why).
 */
int be_gpu_run(struct task *t);
/*
 * A device op across daemons, before its verdicts: fail t (status, detail)
 * when this node cannot run its part on the job's worker.
 */
void gpu_net_check(struct task *t);
/*
 * A send or recv of device memory across daemons (t->net, t->peer >= 0),
 * staged through host memory: a send is copied out by the worker, then
 * goes to the data plane; a recv goes to the data plane first.
 */
void gpu_p2p_start(struct task *t);
/*
 * Such a recv came in: 1 when the worker copies it into the rank's buffer
 * (engine_task_done follows), 0 when it is done (failed, t->status says).
 */
int gpu_p2p_received(struct task *t);
/* Give back t's staging buffer (t->stage). */
void gpu_stage_put(struct task *t);
/* The oldest (newest: the newest) op on the job's worker, staging copies aside, or NULL. */
struct task *gpu_job_task(struct job *j, int newest);
/* The oldest op on the job's worker when it is a staging copy, else NULL. */
struct task *gpu_job_copy(struct job *j);
/* The oldest device mem the job's worker is still opening, or NULL. */
struct mem *gpu_job_opening(struct job *j);
/* The job failed: a busy worker is killed; its ops and opens end on the next turn. */
void gpu_job_failed(struct job *j);
/* The job is freed: its worker goes once its device memory is closed (killed if still opening). */
void gpu_job_gone(struct job *j);
/*
 * The job's GPU worker in one line, for status: "" when it has none, else
 * its pid (or why it is gone) and, over several daemons, its NCCL rank.
 */
void gpu_job_line(const struct job *j, char *buf, size_t len);
/* "available (nccl X.Y.Z)" or "unavailable (why)", for status. */
void gpu_nccl_line(char *buf, size_t len);

/* --- peer.c: the control plane between daemons (TCP) ----------------------- */

#define PEER_DEADLINE_MS 3000  /* a peer silent this long is lost */

struct peer;

/* A node of a job that spans daemons, as the root's table has it. */
struct dist_node {
	char name[128];
	uint8_t *ucx;          /* its daemon's UCX worker address */
	size_t ucx_len;
	uint32_t slot;         /* its tag slot for the job */
	int nranks;
	int *ranks;            /* ascending */
};

/* A job whose ranks are spread over several daemons (Hello.root). */
struct dist {
	char root[256];        /* the root daemon's host:port */
	struct peer *peer;     /* the connection to it; NULL once lost */
	uint64_t key;          /* the root's name for the formed job; 0 while forming */
	uint32_t slot;         /* our tag slot for the job (net.c); names it to the root */
	int slot_freed;        /* given back: what still comes to it is drained */
	int remote;            /* the failure came from the root: not sent back */
	int nnodes;            /* 0 while forming */
	int self;              /* our index in nodes */
	struct dist_node *nodes;
	int *node_of;          /* by rank: its node's index */
	uint8_t nccl_id[128];  /* the job's NCCL communicator's (gpu-proto.h), once has_nccl_id */
	int has_nccl_id;
	char nccl_dev[48];     /* the device of this node's NCCL rank (a UUID), "" until known */
	/*
	 * [a][b]: messages rank a sent to rank b; for a here, and for a on
	 * another node once it left (as its PeerRankLeft says), else NULL
	 */
	uint32_t **sent;
	uint32_t **rcvd;       /* [b][a], b here: messages rank b received from rank a */
};

/* Listen for other daemons on listen_addr (host:port; "" none). 0 or -1. */
int peer_start(uv_loop_t *loop, const char *listen_addr);
/* Close the listener and every peer connection (daemon shutdown). */
void peer_stop(void);
/* Free what peer_stop left, once the loop has run its close callbacks. */
void peer_free_all(void);
/* Heartbeats, connect deadlines and the root's forming deadlines. */
void peer_tick(uint64_t now);
/* Make j a job formed by root (host:port): COMM_OK, or why not with err. */
comm_result_t peer_job_new(struct job *j, const char *root, char *err, size_t errlen);
/* The job's local ranks changed while it forms: tell the root. */
void peer_job_update(struct job *j);
/* j failed here: tell the root, which tells the other members. */
void peer_job_failed(struct job *j);
/* Rank r (here) left j cleanly: the other members learn it through the root. */
void peer_rank_left(struct job *j, int r);
/* j is freed here: the root forgets this member; free j->dist. */
void peer_job_gone(struct job *j);
/* Whether rank r of j is on this daemon (always, for a one-daemon job). */
int dist_local(const struct job *j, int r);
/* Whether j's ranks are on more than one daemon. */
int dist_spans(const struct job *j);
const char *peer_node_name(void);
const char *peer_listen_addr(void);
/* Fill out[0..max-1] (and their state strings) for status; returns how many. */
int peer_status(Commpb__PeerInfo **out, int max, char (*state)[192]);

/* --- net.c: the data plane between daemons (UCX) --------------------------- */

/* Start UCX and its thread; without UCX (or when it fails) jobs stay on one node. */
void net_start(uv_loop_t *loop);
void net_stop(void);
/* Whether cross-node jobs can run, and why not. */
int net_available(void);
const char *net_why(void);
/* One line for commctl status: how the data plane is set, and the ops it holds. */
void net_status(char *buf, size_t len);
/* This daemon's UCX worker address (NULL, 0 without UCX). */
const void *net_address(size_t *len);
/*
 * How long the data plane's thread polls after its last event while an op
 * across daemons is in flight, before it sleeps (net-spin-us): us, or with
 * us < 0 (auto) NET_SPIN_LONG_US where commd may run on NET_SPIN_CORES
 * cores or more (its affinity), else
 * NET_SPIN_SHORT_US. Returns what it set. Any thread, any time.
 */
#define NET_SPIN_CORES 8
#define NET_SPIN_LONG_US 500
#define NET_SPIN_SHORT_US 50
#define NET_SPIN_MAX_US 100000
int net_set_spin(int us);
/* A tag slot for a new job, and giving it back (its late messages are drained). */
uint32_t net_slot_alloc(void);
void net_slot_free(uint32_t slot);
/*
 * Run t across the daemons of its job: a collective (every node runs it) or
 * one half of a send/recv whose partner is on another node. Always
 * asynchronous: engine_task_done(t) follows on the loop thread.
 */
void be_net_run(struct task *t);
/* The job failed: its tasks on the data plane stop and finish with its error. */
void net_job_failed(struct job *j);
/* The control plane lost the daemon at this UCX address: its endpoint goes now. */
void net_peer_lost(const void *addr, size_t len);
/* Stop t (it cannot finish): it finishes with code and detail. */
void net_task_cancel(struct task *t, comm_result_t code, const char *detail);
/*
 * What t does now, for status (loop thread): waiting for which nodes to post
 * it, taking in this node's data, how many of a ring's chunks are in, ...
 */
void net_task_state(const struct task *t, char *buf, size_t len);

/* --- topo.c, topo-discover.c: the node's GPUs, NICs, NUMA nodes, PCIe tree --- */

#define TOPO_MAX_GPUS 32        /* 64 devices: the reply stays well under a frame */
#define TOPO_MAX_NICS 32
#define TOPO_MAX_NUMA 64
#define TOPO_PATH_MAX 16     /* host bridge + bridges above a device */
#define TOPO_BUS_LEN 13      /* "dddd:bb:dd.f" and its NUL */

enum topo_kind { TOPO_GPU, TOPO_NIC };

struct topo_dev {
	enum topo_kind kind;
	int index;
	char name[128];
	char bus[TOPO_BUS_LEN];
	int numa;                          /* -1: unknown */
	uint64_t memory;                   /* bytes; GPUs only, 0: unknown */
	int npath;                         /* path[0] is the host bridge "dddd:bb" */
	char path[TOPO_PATH_MAX][TOPO_BUS_LEN];
};

struct topo_numa {
	int id;
	char cpus[256];                    /* a cpulist: "0-31,64-95" */
};

struct topo {
	int ngpus, nnics, nnuma;
	struct topo_dev gpu[TOPO_MAX_GPUS];
	struct topo_dev nic[TOPO_MAX_NICS];
	struct topo_numa numa[TOPO_MAX_NUMA];
	int nvlink[TOPO_MAX_GPUS][TOPO_MAX_GPUS]; /* bonded links between GPU pairs */
	char source[256];                  /* "discovered" or "file PATH" */
	char gpu_note[256];                /* why there is no GPU, or "" */
};

extern struct topo node_topo;

/* Discover the node into t (never fails: what is not found is absent). */
void topo_discover(struct topo *t);
/*
 * Load a topology file into t. On error returns -1 with a message naming
 * the file and line in err.
 */
int topo_load(struct topo *t, const char *path, char *err, size_t errlen);
/* Write t in the topology file format. */
void topo_dump(const struct topo *t, FILE *f);
/* Device i of the combined list: GPUs first, then NICs. */
const struct topo_dev *topo_dev(const struct topo *t, int i);
/* The relation of devices a and b (nvidia-smi's legend) into buf. */
const char *topo_relation(const struct topo *t, int a, int b, char *buf, size_t len);
/* The NUMA node's cpulist, or NULL when unknown. */
const char *topo_numa_cpus(const struct topo *t, int numa);
/* One line: "8 GPUs, 10 NICs, 2 NUMA nodes, NVLink yes". */
void topo_summary(const struct topo *t, char *buf, size_t len);
/*
 * Put the n distinct GPUs of gpus (indices into t->gpu) into order[n] as a
 * ring: NVLink neighbours adjacent first, then PCIe neighbours; the same
 * input gives the same ring, starting at the lowest GPU. -1 when a GPU is
 * unknown or repeated. For the engine's rings; no backend uses it yet.
 */
int topo_ring_order(const struct topo *t, const int *gpus, int n, int *order);
/*
 * The first CPU of each core this process may run on, package by package
 * and NUMA node by NUMA node (hwloc's order), at most max; 0 without hwloc.
 */
int topo_worker_cpus(int *cpus, int max);

/* --- conn.c: one client connection ---------------------------------------- */

struct wbuf {
	TAILQ_ENTRY(wbuf) link;
	uint8_t *data;
	size_t len;
	size_t off;
};

struct conn {
	TAILQ_ENTRY(conn) link;
	uint64_t id;
	int fd;
	uv_poll_t poll;
	int events;
	int closing;
	const char *doomed;    /* why it closes on the next loop turn, or NULL */
	TAILQ_ENTRY(conn) doom_link;
	int backlogged;        /* whole requests wait for the next turn (FRAMES_PER_TURN) */
	TAILQ_ENTRY(conn) backlog_link;
	struct frame_reader rd;
	TAILQ_HEAD(, wbuf) wq;
	size_t wq_bytes;
	pid_t pid;
	uid_t uid;
	gid_t gid;
	int hello_done;
	uint32_t version;      /* the protocol version agreed at hello */
	uint64_t hello_id;     /* envelope id of the hello, echoed when the job forms */
	int role;              /* COMMPB__ROLE__ROLE_RANK or _ADMIN */
	int admin;             /* -1 unknown; 1: root or in the admin group (sees all jobs) */
	uint64_t opened_ms;
	uint64_t partial_ms;   /* when the frame now half read began, 0: none */
	struct job *job;       /* the job this rank belongs to, or NULL */
	int rank;
	TAILQ_HEAD(, mem) mems;
	int nmems;
	int nmaps;             /* of them, host memory commd maps (max-registrations-per-uid) */
	uint64_t next_mem_id;
	struct ring *ring;     /* the rank's submission ring, or NULL */
};

/* Whether c's user is root or in the admin group (looked up once). */
int conn_is_admin(struct conn *c);
/* Take ownership of an accepted socket and start reading from it. */
int conn_open(int fd);
/* Detach from the job (failing it), release memory, close the socket. */
void conn_close(struct conn *c, const char *why);
/* Close every connection (daemon shutdown). */
void conn_close_all(void);
/* Close connections past their handshake or partial-frame deadline. */
void conn_check_deadlines(uint64_t now);
/*
 * Close c on the next turn of the loop, not now: for failures found while
 * another connection's request is being served (a full write queue).
 * why must outlive the connection (a string literal).
 */
void conn_doom(struct conn *c, const char *why);
/* Pack env and queue it; fds are not sent (replies carry none). 0 or -1. */
int conn_send(struct conn *c, const Commpb__Envelope *env);
/* Send an Error envelope (if the socket takes it now) and close. */
void conn_fail(struct conn *c, comm_result_t code, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
/* Send an Error envelope answering request id; the connection stays as it was. */
void conn_error(struct conn *c, uint64_t id, comm_result_t code, const char *fmt, ...)
	__attribute__((format(printf, 4, 5)));

/* --- req.c: the dispatch table --------------------------------------------- */

enum {
	REQ_F_BEFORE_HELLO = 1 << 0, /* allowed (only) as the first message */
	REQ_F_RANK = 1 << 1,         /* needs a rank that has joined a job */
	REQ_F_ADMIN = 1 << 2,        /* needs an admin connection */
};

/* Returns 0 to go on, -1 when the connection must be closed. */
typedef int (*req_exec_fn)(struct conn *c, const Commpb__Envelope *env, int *fds, int nfds);

struct req_type {
	const char *name;
	int flags;
	int nfds;               /* fds the message must carry */
	req_exec_fn exec;       /* NULL: a reply type a client must not send */
	int (*fds_of)(const Commpb__Envelope *env); /* when nfds depends on the message */
};

/* The entry for a body case, NULL when the case is out of range. */
const struct req_type *req_find(unsigned body_case);
unsigned req_table_size(void);
/*
 * Check and run one frame's payload. Claims the fds the frame carries from
 * the connection's reader. Returns 0 to go on, -1 to close the connection.
 */
int req_dispatch(struct conn *c, const uint8_t *payload, size_t len);

int req_hello_exec(struct conn *c, const Commpb__Envelope *env, int *fds, int nfds);
int req_mem_register_exec(struct conn *c, const Commpb__Envelope *env, int *fds, int nfds);
int req_mem_register_fds(const Commpb__Envelope *env);
int req_mem_free_exec(struct conn *c, const Commpb__Envelope *env, int *fds, int nfds);
int req_op_exec(struct conn *c, const Commpb__Envelope *env, int *fds, int nfds);
int req_leave_exec(struct conn *c, const Commpb__Envelope *env, int *fds, int nfds);
int req_abort_exec(struct conn *c, const Commpb__Envelope *env, int *fds, int nfds);
int req_status_exec(struct conn *c, const Commpb__Envelope *env, int *fds, int nfds);
int req_topo_exec(struct conn *c, const Commpb__Envelope *env, int *fds, int nfds);
int req_ring_attach_exec(struct conn *c, const Commpb__Envelope *env, int *fds, int nfds);
int req_job_abort_exec(struct conn *c, const Commpb__Envelope *env, int *fds, int nfds);

/* --- req-op.c: posting an op ---------------------------------------------- */

struct posted;

/*
 * Post op o of rank c, from an Op message (req_id its envelope id) or from
 * the rank's ring (ring 1, req_id 0). 0 to go on, -1 when c was failed.
 */
int op_post(struct conn *c, const Commpb__Op *o, uint64_t req_id, int ring);
/* Answer p to its rank, over the socket or in its ring slot. */
void op_answer(struct conn *c, const struct posted *p, comm_result_t code, const char *detail);

/* --- ring.c: the shared-memory submission ring (common/ring.h) ------------- */

/* Post what the rank published in its ring, in seq order, then arm it. */
void ring_drain(struct conn *c);
/* Answer op seq in its slot; over the socket too while the rank sleeps. */
void ring_answer(struct conn *c, uint64_t seq, comm_result_t code, const char *detail);
/* Detach the ring (the connection closes). */
void ring_close(struct conn *c);
/* Close the poller (daemon shutdown, after every connection closed). */
void ring_stop(void);

/* --- mem.c: registered memory ----------------------------------------------- */

struct mem {
	TAILQ_ENTRY(mem) link;
	uint64_t id;
	uint8_t *addr;         /* host memory: commd's mapping; device memory: NULL */
	size_t size;
	size_t map_len;        /* host memory: the bytes mapped, size in whole pages of the file's */
	int refs;              /* the owning connection holds one; each op one */
	struct job *job;       /* charged to this job, or NULL */
	/* device memory (kind MEM_CUDA_IPC or MEM_CUDA_VMM) */
	int kind;              /* Commpb__MemKind */
	uint64_t gpu_id;       /* its name in the worker */
	struct gpu_worker *gw; /* the worker that has (or is opening) it */
	struct conn *conn;     /* registered by it; freed host memory keeps it until its ops end */
	int freed;             /* host memory its rank freed while ops used it */
	uint64_t reply_id;     /* the RegisterMem request to answer once opened */
	int unanswered;        /* that request has had no answer yet */
	int opened;            /* the worker has it open: ops may use it */
	uint64_t opening_ms;   /* when it went to the worker to open (the job's deadline applies) */
	char uuid[48];
	TAILQ_ENTRY(mem) gpu_link; /* on its worker's list of opening mems */
};

/* Map a sealed memfd of size bytes for c. Takes fd (closed in all cases). */
comm_result_t mem_register(struct conn *c, int fd, uint64_t size, struct mem **out, char *err,
			   size_t errlen);
struct mem *mem_find(struct conn *c, uint64_t id);
void mem_ref(struct mem *m);
/* Drop a reference; the last one unmaps (and unlists a freed mem from its connection). */
void mem_unref(struct mem *m);
/*
 * Take the mem out of its connection's table and drop that reference; host
 * memory that ops still use stays listed (unseen) and charged until they end.
 */
void mem_release(struct conn *c, struct mem *m);

/* --- job.c: jobs, their ranks and their lifecycle ------------------------- */

/* A failed job runs no op any more: later ones fail with fail_code. */
enum job_state { JOB_FORMING, JOB_READY, JOB_FAILED };

struct posted;

/*
 * Places in a rank's current unit (engine.c) that its walks reached, so
 * that a unit of many ops is not walked from its head for every step; an
 * op leaving the queue is cleared from them.
 */
struct unit_marks {
	struct posted *last; /* the unit's last op, as far as seen (unit_last) */
	struct posted *p2p;  /* no send/recv to pair before it (p2p_first) */
	struct posted *coll; /* no collective still to run before it (unit_coll) */
	struct posted *fin;  /* every op before it finished (retire) */
};

struct job {
	TAILQ_ENTRY(job) link;
	char name[JOB_NAME_MAX + 1];
	uint8_t token[TOKEN_MAX];
	size_t token_len;
	uid_t uid;
	int world;
	int joined;
	int attached;          /* connections still attached */
	struct conn **ranks;   /* by rank; NULL when not (or no longer) there */
	enum job_state state;
	comm_result_t fail_code;
	char fail_detail[256];
	uint32_t timeout_ms;
	uint32_t join_timeout_ms; /* at most timeout_ms */
	uint64_t created_ms;
	char refused[160];     /* forming: the last join refused to it, for the deadline's word */
	/* engine state */
	TAILQ_HEAD(, posted) *posted; /* per rank, in seq order */
	uint64_t *next_post;           /* per rank: the seq it must post next */
	uint64_t *next_cseq;           /* per rank: the cseq of its next collective */
	uint32_t *nposted;             /* per rank: ops queued */
	struct unit_marks *marks;      /* per rank: where engine.c's walks of its unit got to */
	struct posted **scratch_ops;   /* per rank: the engine's working space, */
	uint8_t *scratch_blocked;      /* made once with the job */
	uint64_t *open_group;          /* per rank: the group being posted, or 0 */
	uint64_t next_coll;            /* cseq of the collective that runs next */
	uint8_t *left;                 /* per rank: left cleanly (comm_finalize) */
	int nleft;
	char left_detail[160];         /* who left first, for the ops that needed them */
	struct task *running;          /* the task started last, while it runs (device ops queue) */
	int kicking;                   /* engine_kick is on the stack */
	uint64_t ops_completed;
	uint64_t bytes_moved;
	uint64_t errors;
	uint64_t mem_bytes;            /* host memory its ranks registered (max-job-memory) */
	uint64_t dev_bytes;            /* device memory they registered (shown, not limited) */
	struct gpu_worker *gpu; /* its GPU worker, once it registered device memory */
	struct dist *dist;      /* spread over several daemons, or NULL */
	int tasks_out;          /* tasks on a backend (running, queued on the GPU worker, remote send/recv) */
};

/* The count of j's that m is charged to: host memory (max-job-memory) or device memory. */
static inline uint64_t *job_charge(struct job *j, const struct mem *m)
{
	return m->kind == COMMPB__MEM_KIND__MEM_MEMFD ? &j->mem_bytes : &j->dev_bytes;
}

/* Attach c as a rank of the job named in hello, creating the job. */
comm_result_t job_join(struct conn *c, const Commpb__Hello *hello, char *err, size_t errlen);
/* Tell every rank of a job that just formed: their hello replies. */
void job_announce(struct job *j);
/*
 * c leaves its job: why explains it; code is what the others are told
 * (COMM_OK: a clean leave, the others' ops fail with COMM_ERR_PEER_LOST).
 */
void job_detach(struct conn *c, comm_result_t code, const char *why);
/* Fail the job: every pending op of every rank gets code and detail. */
void job_fail(struct job *j, comm_result_t code, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
/* Free the job once no connection and no op uses it; 1 when freed. */
int job_maybe_free(struct job *j);
/* Called every tick: deadlines of forming jobs and of waiting ops. */
void job_check_deadlines(uint64_t now);
const char *job_state_name(enum job_state s);

/* --- engine.c: matching op #k across ranks --------------------------------- */

struct bufspec {
	struct mem *mem;
	uint64_t off;
	uint64_t len;
};

struct posted {
	TAILQ_ENTRY(posted) link;
	int rank;
	uint64_t seq;
	uint64_t req_id;
	uint64_t posted_ms;
	Commpb__OpType type;
	struct bufspec send;
	struct bufspec recv;
	uint64_t count;
	uint32_t dtype;
	uint32_t redop;
	int32_t root;
	int32_t peer;
	uint64_t group;        /* 0: not in a group */
	int group_last;
	int coll;              /* a collective: matched across ranks by cseq */
	uint64_t cseq;         /* the rank's collective count, from 1 */
	int matched;           /* send/recv: paired with its partner */
	int running;           /* part of the task on the workers */
	struct task *task;     /* that task while running (for status) */
	int done;              /* finished with status; answered when its unit retires */
	int answered;          /* the rank already has its OpDone */
	int ring;              /* posted in the ring: answered in its slot */
	int has_event;         /* device buffers: wait for ready_event first */
	uint8_t ready_event[64];
	struct bufspec done_flag; /* device: written with done_value once the results are in */
	uint32_t done_value;
	comm_result_t status;
	char detail[256];
};

/*
 * Queue an op posted by c: validated, or refused (done, answered) so that
 * its partners fail too. Runs what became ready.
 */
void engine_post(struct conn *c, struct posted *p);
/* Run every op of j that is ready and answer every unit that is finished. */
void engine_kick(struct job *j);
/*
 * Answer and drop every posted op of rank r (or of all ranks when r < 0),
 * except those of the running task, which are answered when it finishes.
 */
void engine_fail_pending(struct job *j, int r, comm_result_t code, const char *detail);
/*
 * Rank r has left cleanly: every collective (now or later) and every
 * send/recv with r fails with COMM_ERR_PEER_LOST; the rest goes on.
 */
void engine_rank_left(struct job *j, int r);
/* Fail the job if its oldest waiting op (or its op on the GPU) is past the deadline. */
void engine_check_deadline(struct job *j, uint64_t now);
/* Whether ops of type t are matched across all ranks. */
int op_is_collective(Commpb__OpType t);
/* Whether ops of type t take a reduction. */
int op_reduces(Commpb__OpType t);
/* Free the posted ops still queued (job teardown). */
void engine_free(struct job *j);
const char *op_type_name(Commpb__OpType t);

/* An op in flight for status, with room for its strings. */
struct inflight {
	Commpb__OpInFlight pb;
	char type[24], dtype[16], posted[96], missing[96], state[128], detail[96];
};

/*
 * j's ops in flight, oldest first, into out[0..max-1]: collectives by number
 * with the ranks here that posted each and those that did not, and each
 * send and recv. Returns how many; *omitted: how many more there were.
 */
int engine_inflight(struct job *j, struct inflight *out, int max, uint32_t *omitted);

/* --- be-host.c: collectives on host memory by the daemon's threads --------- */

struct task {
	struct job *job;
	Commpb__OpType type;   /* OP_SEND: a send/recv pair, in[0] -> out[0] */
	struct posted **ops;   /* the posted ops it serves */
	int nops;
	int root;
	int n;                 /* ranks (1 for a send/recv pair) */
	uint32_t dtype;
	uint32_t redop;
	size_t count;          /* elements per rank block (see proto Op.count) */
	size_t esize;
	uint8_t **in;          /* per rank, in the daemon's mapping; NULL: unused */
	uint8_t **out;
	uint8_t *snapshot;     /* inputs copied when outputs alias them unsafely */
	size_t snap_len;       /* bytes per rank to copy there first, or 0 */
	int direct;            /* no output shares memory with an input */
	int swap;              /* all-to-all in place on every rank: block pairs swapped */
	comm_result_t status;  /* COMM_OK unless the backend failed */
	char detail[256];      /* why, when it failed */
	int gpu;               /* on device memory: runs on the job's GPU worker */
	int net;               /* across daemons: runs on the data plane (net.c) */
	int device;            /* net, on device memory: after the verdicts, on the GPU worker */
	uint64_t cseq;         /* net: the collective's number, or the message's index */
	int peer;              /* net send/recv: the rank on the other node */
	int local;             /* net send/recv: the rank here */
	struct net_task *nt;   /* net: the data plane's state */
	/*
	 * net: stopped with sends still reading its ranks' memory (or stage):
	 * answered (its job failed), but that memory stays until
	 * engine_task_release
	 */
	int held;
	struct gpu_stage *stage; /* net send/recv on device memory: its host staging buffer */
	uint64_t started_ms;
	size_t parts;
	size_t next_part;      /* guarded by the pool lock */
	size_t parts_left;     /* guarded by the pool lock */
	uint64_t bytes;
	TAILQ_ENTRY(task) link; /* on the host pool's queues, or on its GPU worker's */
};

/* nthreads workers, each pinned to a core of its own when pin_workers. */
int be_host_start(uv_loop_t *loop, int nthreads, int pin_workers);
void be_host_stop(void);
int be_host_threads(void);
/*
 * Run t: inline when small (returns 1, done), else on the worker threads
 * (returns 0; engine_task_done(t) is called on the loop thread when done).
 */
int be_host_run(struct task *t);
void engine_task_done(struct task *t);
/*
 * A held task's sends ended: its ops' memory and staging buffer go (its
 * job may be gone already).
 */
void engine_task_release(struct task *t);
/*
 * A device collective across daemons whose verdicts agreed: hand it to the
 * job's GPU worker (be_gpu_run), then let the next one start behind it. 1
 * when the worker could not take it: t is still the caller's.
 */
int engine_gpu_handoff(struct task *t);

#endif
