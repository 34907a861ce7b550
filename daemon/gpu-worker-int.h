/*
 * gpu-worker-int.h: commd-gpu's insides (gpu-worker.c), shared by its
 * files: its limits, what it holds (w), the driver's functions (drv), an
 * op's plan, and the helpers one file lends the others.
 */
#ifndef DAEMON_GPU_WORKER_INT_H
#define DAEMON_GPU_WORKER_INT_H

#include <stddef.h>
#include <stdint.h>

#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>
#include <nccl.h>

#include "comm.h"
#include "commd.pb-c.h"
#include "gpu-kernels.h"
#include "gpu-proto.h"

#define T(x) COMMPB__OP_TYPE__OP_##x
#define MAX_DEVICES 64       /* devices one worker serves; any beyond are not used */
#define MAX_FDS 4            /* fds a packet may carry (a VMM open has one) */
#define NCCL_WAIT_MS 60000   /* an NCCL call still in progress after this has hung */
#define POLL_NS 20000        /* between looks at a stream that NCCL work is on */
#define SPIN_US 200          /* after an op, how long the next is looked for before sleeping */
#define MAX_QUEUED 64        /* ops on the streams not answered yet, at most */
#define QUEUED_SPIN_US 3     /* with ops queued: how long the oldest is watched between looks at the socket */
#define SCRATCH_ROUND (2u << 20)

struct dev {
	int ready;             /* stream and mark exist */
	cudaStream_t stream;   /* all the worker's work on this device */
	cudaStream_t flags;    /* queued ops' done flags, each after its op's event */
	cudaEvent_t mark;      /* orders the other devices' streams after this one */
	uint8_t *scratch;      /* results (or staged inputs) before they go out */
	size_t scratch_len;
	char uuid[GPU_UUID_LEN];
};

struct mem {
	uint64_t id;
	uint32_t kind;         /* enum gpu_mem_kind */
	int dev;               /* -1: host memory (GPU_MEM_HOST) */
	int pinned;            /* host memory cudaHostRegister took */
	int rank;
	uint8_t *ptr;
	size_t size;
	uint8_t handle[GPU_HANDLE_BYTES]; /* IPC: ids opened from one handle share ptr */
	CUmemGenericAllocationHandle vmm;
};

struct ipc_event {
	uint8_t handle[GPU_HANDLE_BYTES];
	cudaEvent_t ev;
};

/* An op queued on one device's stream, answered once its event has passed. */
struct queued {
	uint64_t id;
	const char *name;
	cudaEvent_t ev;        /* the op's end; made on first use, on dev; again when dev changes */
	cudaEvent_t fev;       /* its flags written (on the flag stream), when it has flags */
	int dev;
	int flagged;
};

struct worker_state {
	char job[GPU_JOB_NAME];
	char no_gpu[GPU_DETAIL]; /* why nothing can be served; "" once a GPU works */
	char err[GPU_DETAIL];    /* the current request's first failure */
	comm_result_t err_code;  /* what err stands for (gpu-result.h) */
	int scratch_short;       /* the current op found no memory for its scratch */
	int ndev;
	struct dev dev[MAX_DEVICES];
	struct mem *mem;
	size_t nmem, mem_cap;
	struct ipc_event *ev;
	size_t nev, ev_cap;
	int nccl_n;              /* devices in the communicator; 0: none yet */
	int nccl_dev[MAX_DEVICES];
	ncclComm_t nccl[MAX_DEVICES];
	/* a job over several nodes (WORLD): one NCCL rank per node, on device wdev */
	uint32_t world, nnodes, node;
	uint16_t node_of[GPU_WORLD_MAX_RANKS];
	int lidx[GPU_WORLD_MAX_RANKS]; /* the current op's: a rank's index in it, or -1 */
	uint8_t nccl_id[GPU_NCCL_ID_BYTES];
	ncclComm_t wcomm;        /* NULL until the first op across nodes */
	int wdev;
	struct queued q[MAX_QUEUED]; /* a ring: nq of them from qhead, oldest first */
	size_t qhead, nq;
	uint64_t spin_until;     /* now_us() before which the socket is polled */
	uint64_t ops;
};

/* The devices, memory, communicators and queued ops of the job (gpu-worker.c). */
extern struct worker_state w;

/* Driver functions, reached through the runtime: the worker never links libcuda. */
struct drv_fns {
	PFN_cuGetErrorString_v6000 error_string;
	PFN_cuMemGetAddressRange_v3020 address_range;
	PFN_cuMemImportFromShareableHandle_v10020 import;
	PFN_cuMemAddressReserve_v10020 reserve;
	PFN_cuMemMap_v10020 map;
	PFN_cuMemSetAccess_v10020 set_access;
	PFN_cuMemUnmap_v10020 unmap;
	PFN_cuMemAddressFree_v10020 address_free;
	PFN_cuMemRelease_v10020 release;
	PFN_cuStreamWriteValue32_v11070 write_value;
};

/* Loaded by gpu_open (gpu-worker-mem.c). */
extern struct drv_fns drv;

/* Which ranks' buffers an op needs: none, any that are given, root's, every rank's. */
enum need { NEED_NONE, NEED_ANY, NEED_ROOT, NEED_ALL };

/* What an op is and needs; specs (gpu-worker.c) has one for each type. */
struct op_spec {
	const char *name;
	uint8_t in, out;               /* enum need */
	uint8_t in_blocks, out_blocks; /* 1: the buffer holds n blocks of count */
	uint8_t reduce;
};

/* An op resolved to pointers: NULL where a rank's buffer is absent or unused. */
struct plan {
	const struct gpu_op *op;
	const struct op_spec *spec;
	int n;
	int world;                     /* op->world: the ranks here are some of world */
	int nall;                      /* ranks in all: world, or n */
	int wdev;                      /* world: the device the op runs on */
	size_t block, in_len, out_len; /* bytes: one block, one input, one output */
	uint8_t *in[GPU_OP_MAX_RANKS], *out[GPU_OP_MAX_RANKS];
	int in_dev[GPU_OP_MAX_RANKS], out_dev[GPU_OP_MAX_RANKS];
	int used[MAX_DEVICES];         /* devices whose stream the op runs on */
	int nccl;                      /* NCCL work is queued */
	int nflags;                    /* done flags to write once the results are in */
	const struct gpu_flag *flags;
	uint8_t *flag[2 * GPU_OP_MAX_RANKS];
	int flag_dev[2 * GPU_OP_MAX_RANKS];
};

/* --- gpu-worker.c: messages and errors ------------------------------------- */

/* A line on stderr, which commd logs, naming the job. */
void wlog(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* Keep the first failure of the current request as its detail, and code what it stands for. */
void fail_as(comm_result_t code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* fail_as for what the request got wrong (COMM_ERR_INVALID_ARG). */
void fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* 0 when e is cudaSuccess; else -1 with the failure kept (and the runtime's last error cleared). */
int cuda_check(cudaError_t e, const char *call);
/* 0 when r is CUDA_SUCCESS; else -1 with the failure kept. */
int cu_check(CUresult r, const char *call);
/* 0 when r is ncclSuccess or ncclInProgress (the communicators are nonblocking); else -1. */
int nccl_check(ncclResult_t r, const char *call);
/* Answer request id of type with status and detail; exits when the socket fails. */
void reply(uint32_t type, uint64_t id, comm_result_t status, const char *detail);

/* --- gpu-worker-mem.c: devices and memory ---------------------------------- */

/* The CUDA runtime's, driver's and NCCL's versions, for the hello and the probe. */
void versions(char *out, size_t len);
/* Find the devices, their UUIDs and the driver functions; -1 with why. */
int gpu_open(char *why, size_t len);
/* The device's stream and mark, made on first use. */
int dev_ready(int d);
/* At least len bytes of scratch on device d, after the ops queued there; NO_MEMORY if none. */
int scratch(int d, size_t len);
/* The memory of id in the table, or NULL. */
struct mem *mem_find(uint64_t id);
/* Open m (fd: its VMM allocation or host memory, or -1) into the table; the detail says why not. */
comm_result_t mem_open(const struct gpu_mem_open *m, int fd);
/* Unmap x, which is no longer in the table; failures are logged. */
void mem_release(const struct mem *x);
/* The client's event behind handle, opened once and kept while the worker lives; NULL on failure. */
cudaEvent_t event_open(const uint8_t *handle, int dev);

/* --- gpu-worker-ops.c: NCCL, and ops on this node -------------------------- */

/* The state of every communicator: the devices' here, and the one across nodes. */
int nccl_state(const char *what);
/* Wait until no communicator is in progress, at most NCCL_WAIT_MS. */
int nccl_settle(const char *what);
/* Abort every communicator, here and across nodes. */
void nccl_abort(void);
/* Finalize (all, then wait: they finish together) and destroy the communicator. */
int nccl_close(void);
/* The type NCCL combines the accumulators in: unsigned where the sum wraps. */
ncclDataType_t nccl_type(int dtype, int redop);
/* NCCL's reduction for redop (an average sums, and divides afterwards). */
ncclRedOp_t nccl_op(int redop);
/* The one device p's buffers are on; -1: none, -2: several. */
int used_device(const struct plan *p);
/* Check op (commd did already: this is the second line) and resolve it into p. */
int plan_op(struct plan *p, const struct gpu_op *op, size_t nranks);
/* Make every used stream wait for the client's events of all ranks. */
int plan_wait_events(const struct plan *p);
/* Copy len bytes on device d's stream (nothing where dst is src). */
int copy(int d, void *dst, const void *src, size_t len);
/* Combine the inputs that live on device d, in rank order, into its scratch. */
int reduce_on(const struct plan *p, int d, enum gk_mode mode, size_t elems, void *out,
		     const void *in_acc);
/* All-reduce, reduce and reduce-scatter on this node's devices. */
int op_reduce(struct plan *p);
/* Whether an output overlaps an input other than in the in-place form. */
int needs_staging(const struct plan *p);
/* Copy every input into its device's scratch first, for outputs that alias them. */
int stage_inputs(struct plan *p);
/* All-gather, broadcast, all-to-all and send: copies on the receiver's device. */
int op_copy(struct plan *p);

/* --- gpu-worker-run.c: ops across nodes, and running ops ------------------- */

/* The one device every used stream and done flag is on, or -1. */
int single_device(const struct plan *p);
/* Run p on several devices (or none) and wait for it; then write its flags. */
int op_run(struct plan *p);
/* Queue p, all on device d, behind the ops before it; reap answers it. */
int op_queue(struct plan *p, int d);
/* A device op failed: answer it, and end (a CUDA error may be sticky). */
_Noreturn void op_aborted(const char *name, uint64_t id);
/* Answer the queued ops that have finished, oldest first, waiting until at most keep are left. */
void reap(size_t keep);

#endif
