/*
 * comm-int.h: libcomm's insides, shared by its files: the communicator,
 * requests, the shared-memory segments and the connection to commd.
 */
#ifndef CLIENT_COMM_INT_H
#define CLIENT_COMM_INT_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#include "comm.h"
#include "commd.pb-c.h"
#include "err.h"
#include "frame.h"
#include "ring.h"

#define COMM_DEFAULT_SOCKET "/run/commd/commd.sock"
#define SEG_MIN_BYTES (64u << 20) /* smallest segment registered with commd */
#define SEG_ALIGN 256             /* alignment of every comm_mem_alloc block */

/* A block of a segment: allocated or free, in address order. */
struct block {
	struct block *next;
	size_t off;
	size_t size;
	int used;
};

/* A memfd shared with the daemon, carved into blocks. */
struct seg {
	struct seg *next;
	uint8_t *base;
	size_t size;
	uint64_t mem_id;
	struct block *blocks;
	int fd;                     /* kept: another comm of the family may register it */
	uint64_t uid;               /* never reused in the process: names it to the family */
};

/*
 * Another comm's segment this comm registered too (the family's): used
 * while that segment lives (its uid still in the family), forgotten once
 * it is gone.
 */
struct borrow {
	struct borrow *next;
	uint64_t uid;
	uint8_t *base;
	size_t size;
	uint64_t mem_id;
	int refused;                /* commd refused it: staged, not asked again until a segment goes */
};

/*
 * A comm and those split from it (and from those): each may name the
 * others' segments. The lock guards the members list, every member's
 * segment list (changed by its owner under it, read by the others) and gen.
 */
struct family {
	pthread_mutex_t lock;
	struct comm *members;
	uint64_t gen;               /* bumped when a member's segment goes */
};

struct comm_request {
	struct comm_request *next;  /* outstanding requests, in posting order */
	comm_t *comm;
	uint64_t id;                /* envelope id of the op */
	uint64_t seq;
	int done;
	comm_result_t rc;
	/* staging for pointers not from comm_mem_alloc */
	void *stage_send;
	void *stage_recv;
	void *user_recv;            /* where the staged result goes; NULL once it went */
	size_t recv_bytes;
	int unsent;                 /* posted in a group that has not ended yet */
	int ring;                   /* posted in the ring: answered in its slot */
	struct gpu_event *event;    /* its ready event (gpu.c), pooled again at req_finish */
	struct flag_page *flag;     /* its done flag (gpu.c), for comm_stream_wait; or NULL */
	int flag_slot;
	int flag_set;               /* libcomm wrote the flag itself (the op failed) */
	int detached;               /* handed to a stream by comm_stream_wait: libcomm frees it */
	int empty;                  /* the op moves no bytes */
	Commpb__BufRef done_ref;    /* the flag as the Op names it */
	/* a request of several ops (comm_alltoallv): the parts not finished yet */
	int nparts;
	struct comm_request **parts; /* NULL: a request of one op */
};

/* An op of an open group, sent at comm_group_end. */
struct group_op {
	Commpb__Op op;
	Commpb__BufRef sref;
	Commpb__BufRef rref;
	comm_request_t *req;
	int blocking;               /* posted with req NULL: group_end waits for it */
};

struct comm {
	int fd;
	uint32_t version;           /* the protocol version agreed with commd */
	int rank;
	int size;
	struct frame_reader rd;
	uint64_t next_id;
	uint64_t next_seq;
	struct seg *segs;
	size_t keep;                /* bytes of emptied segments kept registered (COMM_KEEP_MB) */
	struct comm_request *reqs;  /* outstanding, oldest first */
	int staged_out;             /* of them, with a staged result still to copy out */
	struct comm_request *reqs_tail;
	uint64_t await_id;          /* a call waiting for its reply */
	Commpb__Envelope *await_reply;
	comm_result_t broken;       /* COMM_OK while the connection is usable */
	int group_depth;
	struct group_op *group;     /* the open group's ops */
	size_t group_n;
	size_t group_cap;
	void *ring;                 /* the submission ring (in a segment), or NULL */
	int ring_efd;               /* wakes commd */
	int spin_us;                /* how long a wait spins before it sleeps */
	uint8_t ring_busy[RING_SLOTS]; /* slot holds an op not answered yet */
	struct gpu *gpu;            /* device memory state (gpu.c); NULL until a pointer needs it */
	void *stream;               /* cudaStream_t device ops follow; NULL: the legacy stream */
	comm_result_t async_error;  /* the first failure of a detached request */
	char last_error[256];
	comm_result_t last_rc;      /* last_error's code */
	/* how it joined, for comm_split */
	char *socket_path;
	char *job;
	char *token;
	char *root;
	int timeout_ms;
	unsigned splits;            /* comm_split calls so far */
	struct family *fam;         /* NULL until the first split */
	struct comm *fam_next;
	struct borrow *borrows;
	uint64_t fam_gen;           /* the family's gen when borrows were last checked */
	int forked;                 /* this is a fork's child's copy: refused (comm.c) */
	char forked_why[200];       /* why, the same for every refusal */
	struct comm *live_next;     /* the process's comms, for fork */
};

/* Record a failure's detail and code as the communicator's last error; returns rc. */
comm_result_t comm_set_error(comm_t *c, comm_result_t rc, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

/*
 * c cannot serve "what" (the connection is gone, or c is a forked child's
 * copy): its last error says so, with why, and its code is returned.
 */
comm_result_t comm_refuse(comm_t *c, const char *what);

/* comm_mem_alloc, and why it failed in *rc (the code of its last error). */
void *comm_mem_alloc_rc(comm_t *c, size_t bytes, comm_result_t *rc);

/* Send env (with fds) and read until its reply arrives. */
comm_result_t comm_call(comm_t *c, Commpb__Envelope *env, const int *fds, int nfds,
			Commpb__Envelope **reply);
/* Send env without waiting. */
comm_result_t comm_send_env(comm_t *c, Commpb__Envelope *env);
/* Read and handle what the daemon sent, waiting up to timeout_ms (-1: no limit). */
comm_result_t comm_pump(comm_t *c, int timeout_ms);

/* mem.c */
/*
 * Find the segment holding [p, p+len): 1 and (*mem_id, *off); 0 if p is in
 * none; -1 when it is another family member's that this comm could not
 * register (stage the buffer); -2 when p is in a segment of the family but
 * p+len runs past its end.
 */
int mem_lookup(comm_t *c, const void *p, size_t len, uint64_t *mem_id, uint64_t *off);
/* Tell commd to drop registration mem_id (FreeMem), unless the comm is broken. */
void mem_forget(comm_t *c, uint64_t mem_id);
void mem_free_all(comm_t *c);
/* Give c a family, with c alone in it, unless it has one. 0, or -1 out of memory. */
int mem_family_start(comm_t *c);
/* Put child in parent's family (mem_family_start made it). */
void mem_family_join(comm_t *parent, comm_t *child);
/* Take c out of its family (freed with its last member). */
void mem_family_leave(comm_t *c);
/* COMM_KEEP_MB into c->keep. */
void mem_init(comm_t *c);

/* ring.c */
/* Attach a submission ring if commd takes one (COMM_RING=0: never). */
void ring_attach(comm_t *c);
void ring_detach(comm_t *c);
/* Post op in the ring: 1 posted, 0 its slot is busy (use the socket). */
int ring_post(comm_t *c, const Commpb__Op *op, comm_request_t *r);
/* Record the answers commd wrote in the ring. */
void ring_reap(comm_t *c);
/* Record r's answer (from its slot or the socket) and free its slot. */
void ring_complete(comm_request_t *r, comm_result_t rc, const char *detail);
/*
 * Wait for r: spin on the ring (yielding) up to COMM_SPIN_US, then sleep on
 * the socket. Returns when r is done, the comm broke, or timeout_ms passed.
 */
void ring_wait(comm_request_t *r, int timeout_ms);

/* gpu.c: device buffers; without CUDA in the build every pointer is host memory */
/*
 * Where p (in no segment) lives: *dev the device ordinal of device memory,
 * -1 for host memory (also managed or host-registered memory, and always
 * when there is no driver or device, which the comm then remembers).
 */
comm_result_t gpu_locate(comm_t *c, const char *op, const char *which, const void *p, int *dev);
/*
 * Name device buffer p of len bytes for commd as (mem id, offset), its
 * allocation registered once and again whenever the allocation at that
 * address changed.
 */
comm_result_t gpu_bufref(comm_t *c, const char *op, const char *which, const void *p,
			 size_t len, int dev, Commpb__BufRef *ref);
/*
 * Record a pooled event on the comm's stream for r, an op on device memory
 * of device dev, and put its IPC handle in *ready (valid while r lives);
 * *ready stays empty when nothing on the stream is still running.
 */
comm_result_t gpu_ready_event(comm_t *c, const char *op, comm_request_t *r, int dev,
			      ProtobufCBinaryData *ready);
/*
 * Give r, an op on device memory of device dev posted with a request, a
 * done flag from the comm's pool and name it in op; without one (no pool
 * on this device, no stream memory operations) comm_stream_wait waits on
 * the host.
 */
void gpu_done_flag(comm_t *c, comm_request_t *r, int dev, Commpb__Op *op);
/*
 * r was answered or failed: when it failed while a stream waits for its
 * flag, write the flag from the host so that the stream goes on. Called
 * wherever a request is marked done.
 */
void gpu_req_done(comm_request_t *r);
/* Give r's event and flag back to their pools (r was answered, failed, or never sent). */
void gpu_req_release(comm_request_t *r);
/* Forget the device registrations (tell_daemon: FreeMem each) and free the state. */
void gpu_free_all(comm_t *c, int tell_daemon);

/* req.c */
comm_request_t *req_new(comm_t *c);
comm_request_t *req_new_parts(comm_t *c, int n);
/* r was answered (or failed): its staged result, if any, copied out. */
void req_done(comm_request_t *r);
/* Wait for the earlier ops whose staged results land in [p, p + n). */
comm_result_t req_settle(comm_t *c, const void *p, size_t n);
/* Take a finished request off the list, unstage it and free it. */
comm_result_t req_finish(comm_request_t *r);
/* comm_stream_wait of a request of several ops: each part handed to stream. */
comm_result_t req_parts_stream_wait(comm_request_t *r, void *stream);
/* Fail every outstanding request with rc (the connection is gone). */
void req_fail_all(comm_t *c, comm_result_t rc);
/* Finish the detached requests (comm_stream_wait) that are done. */
void req_reap(comm_t *c);
void req_free_all(comm_t *c);

#endif
