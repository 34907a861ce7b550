/*
 * gpu-proto.h: what commd and a job's GPU worker (commd-gpu) say to each
 * other. commd starts one worker per job that registers device memory and
 * talks to it over a SOCK_SEQPACKET socketpair (the worker's fd 3): one
 * message per packet, fixed layouts, both ends built from the same tree
 * (the version field catches a stale binary). The worker owns every CUDA
 * and NCCL object of the job, so a CUDA fault or a hung NCCL call takes
 * down that worker and fails that job, never commd or another job.
 *
 * Flow: commd sends HELLO first; the worker answers HELLO_REPLY (status
 * COMM_OK, or why it cannot serve: no driver, no device) and then serves
 * MEM_OPEN (answered by MEM_OPENED), MEM_CLOSE (no answer), WORLD (no
 * answer) and OP (answered by OP_DONE once the results are in the ranks'
 * memory and the op's done flags are written), in the order they come.
 * commd may send the next OPs of a job before the earlier ones are
 * answered: the worker queues those on one device behind each other (an
 * op across nodes runs once those before it are done) and answers the OPs
 * in the order they came. EOF on the socket: the worker releases
 * everything and exits 0. commd takes nothing else from a worker: a
 * packet of another length or version, one before HELLO_REPLY or a second
 * HELLO_REPLY, NCCL_ID unasked or twice, an answer to no outstanding open
 * or op (or not to the oldest op), or a status that is no comm_result_t
 * gets the worker killed and its job failed ("broke the protocol").
 *
 * MEM_OPENED's status, which commd passes on to the rank as its
 * registration's: NOT_FOUND (no device of that UUID here), UNSUPPORTED
 * (no GPU, or the device or driver cannot: cudaErrorNotSupported,
 * NotPermitted), NO_MEMORY (cudaErrorMemoryAllocation, CUDA_ERROR_OUT_OF_
 * MEMORY, TooManyPeers, the worker's own malloc or mmap), INVALID_ARG
 * (what the rank got wrong: a handle or fd that is no allocation,
 * InvalidValue, InvalidResourceHandle, MapBufferObjectFailed, a size past
 * the allocation), BUSY (DevicesUnavailable) and INTERNAL (any other CUDA
 * error: the driver or device failing). daemon/gpu-result.h has the table.
 *
 * A job spread over several daemons has a worker on each node, and one
 * NCCL communicator across them, one NCCL rank per node (its index in the
 * job's node order). Node 0's worker makes the ncclUniqueId when its hello
 * says the job spans nodes, and sends it in NCCL_ID after HELLO_REPLY; the
 * daemons pass it on with their verdicts on each device collective
 * (net-coll.c), and each daemon sends its worker WORLD (the id, and every
 * rank's node) before its first op across nodes. A send or recv across
 * nodes is not one of these: commd stages it through host memory it shares
 * with the worker (GPU_MEM_HOST), and the worker only copies.
 *
 * `commd-gpu --probe` instead prints one line about the node's GPUs
 * ("2 devices (...)" or "unavailable: why") and exits 0 when a GPU works.
 */
#ifndef COMMON_GPU_PROTO_H
#define COMMON_GPU_PROTO_H

#include <stdint.h>
#include <stdio.h>

#define GPU_PROTO_VERSION 5
#define GPU_WORKER_FD 3          /* the worker's end of the socketpair */
#define GPU_HANDLE_BYTES 64      /* cudaIpcMemHandle_t, cudaIpcEventHandle_t */
#define GPU_UUID_LEN 48          /* "GPU-" + 36 characters + NUL, rounded up */
#define GPU_DETAIL 256
#define GPU_JOB_NAME 256
#define GPU_OP_MAX_RANKS 256     /* ranks of one job one op may span on a node */
#define GPU_WORLD_MAX_RANKS 4096 /* ranks of a job whose device ops span nodes */
#define GPU_NCCL_ID_BYTES 128    /* ncclUniqueId */
/* the longest message: an op (a WORLD message is shorter, gpu-worker.c checks) */
#define GPU_MSG_MAX \
	(sizeof(struct gpu_op) + GPU_OP_MAX_RANKS * (sizeof(struct gpu_op_rank) + sizeof(struct gpu_flag)))

enum gpu_msg_type {
	GPU_MSG_HELLO = 1,       /* commd -> worker: struct gpu_hello */
	GPU_MSG_HELLO_REPLY = 2, /* worker -> commd: struct gpu_status, id 0 */
	GPU_MSG_MEM_OPEN = 3,    /* commd -> worker: struct gpu_mem_open (+ 1 fd for VMM) */
	GPU_MSG_MEM_OPENED = 4,  /* worker -> commd: struct gpu_status, id = the mem's id */
	GPU_MSG_MEM_CLOSE = 5,   /* commd -> worker: struct gpu_mem_close, no answer */
	GPU_MSG_OP = 6,          /* commd -> worker: struct gpu_op with n ranks */
	GPU_MSG_OP_DONE = 7,     /* worker -> commd: struct gpu_status, id = the op's id */
	GPU_MSG_WORLD = 8,       /* commd -> worker: struct gpu_world with world nodes */
	GPU_MSG_NCCL_ID = 9,     /* worker -> commd: struct gpu_nccl_id, after HELLO_REPLY */
};

/* Memory kinds, as proto MemKind. */
enum gpu_mem_kind {
	GPU_MEM_IPC = 1,         /* handle: cudaIpcMemHandle_t of a cudaMalloc allocation */
	GPU_MEM_VMM = 2,         /* the packet carries the POSIX fd of a cuMemCreate allocation */
	/*
	 * commd's host memory: the packet carries a memfd, which the worker maps
	 * and pins. A staging buffer for a send or recv of device memory across
	 * daemons (no uuid, rank: the rank it serves first).
	 */
	GPU_MEM_HOST = 3,
};

struct gpu_hdr {
	uint32_t type;           /* enum gpu_msg_type */
	uint32_t version;        /* GPU_PROTO_VERSION */
};

struct gpu_hello {
	struct gpu_hdr h;
	char job[GPU_JOB_NAME];  /* for the worker's log lines */
	uint32_t world;
	uint32_t nnodes;         /* the job's daemons (1: this one only) */
	uint32_t node;           /* this daemon's index among them */
	uint32_t pad;
};

/* HELLO_REPLY, MEM_OPENED, OP_DONE. */
struct gpu_status {
	struct gpu_hdr h;
	uint64_t id;
	int32_t status;          /* comm_result_t */
	uint32_t pad;
	char detail[GPU_DETAIL]; /* NUL-terminated; "" when status is COMM_OK */
};

/* NCCL_ID: node 0's id for the job's communicator, or (status) why there is none. */
struct gpu_nccl_id {
	struct gpu_status st;
	uint8_t nccl_id[GPU_NCCL_ID_BYTES];
};

/*
 * The job over several nodes, sent once before its first op across them:
 * world ranks, node_of[r] the node of rank r, and node 0's ncclUniqueId.
 */
struct gpu_world {
	struct gpu_hdr h;
	uint32_t world;
	uint32_t nnodes;
	uint32_t node;
	uint32_t pad;
	uint8_t nccl_id[GPU_NCCL_ID_BYTES];
	uint16_t node_of[];
};

/*
 * Open one allocation of a rank. id is commd's, unique in the daemon; ops
 * name the memory by it. size is the whole allocation's.
 */
struct gpu_mem_open {
	struct gpu_hdr h;
	uint64_t id;
	uint32_t kind;           /* enum gpu_mem_kind */
	int32_t rank;            /* for messages */
	uint64_t size;
	uint8_t handle[GPU_HANDLE_BYTES];
	char uuid[GPU_UUID_LEN]; /* the device the memory lives on */
};

/* Sent once no op uses the mem (commd has its answers): close it at once. */
struct gpu_mem_close {
	struct gpu_hdr h;
	uint64_t id;
};

/*
 * One rank's part of an op: mem 0 means no buffer. Offsets count from the
 * start of the allocation (what cudaIpcOpenMemHandle maps), as RegisterMem's
 * size does.
 */
struct gpu_op_rank {
	uint64_t send_mem, send_off;
	uint64_t recv_mem, recv_off;
	uint8_t ready_event[GPU_HANDLE_BYTES]; /* cudaIpcEventHandle_t to wait for */
	uint32_t has_event;
	uint32_t grank;          /* the rank's number in the job (ops across nodes) */
};

/*
 * A rank's done flag (comm_stream_wait): once the op's results are in
 * place, the worker writes value into the 4 bytes at off in mem from its
 * stream, so that the rank's stream, waiting for it, goes on.
 */
struct gpu_flag {
	uint64_t mem, off;
	uint32_t value;
	uint32_t pad;
};

/*
 * One op over n ranks, with the meaning of the host backend's struct task:
 * - ALLREDUCE: out[r] = in[0] op in[1] op ... in[n-1], count elements each.
 * - REDUCE: the same into out[root] only.
 * - REDUCE_SCATTER: in[r] holds n blocks of count; out[r] = block r reduced.
 * - ALLGATHER: in[r] holds count; out[r] holds n blocks, block b = in[b].
 * - BROADCAST: out[r] = in[root] (count elements), for every r with a buffer.
 * - ALLTOALL: in[s] and out[r] hold n blocks; block s of out[r] = block r of in[s].
 * - SEND: count bytes (dtype UINT8) from in[0] to out[0]. One of them may
 *   be host memory (GPU_MEM_HOST): a staging copy. n is 1, or 2 where the
 *   receiver on this node has a ready event of its own: rank[1] then
 *   carries that event only (no buffer), and the copy waits for both.
 * type, dtype and redop carry proto OpType, comm_dtype_t and comm_redop_t
 * values. Outputs may alias inputs (in place); the results are those of the
 * inputs as they were before the op. Float reductions over ranks on one
 * device combine in rank order, like the host backend.
 *
 * world > 0: an op across nodes, after WORLD. rank[] holds this node's
 * ranks, each with its grank; n above stands for world (blocks, AVG's
 * divisor), and root is a grank. Every node's worker gets the op, and NCCL
 * carries what crosses nodes. SEND is not one of these.
 */
struct gpu_op {
	struct gpu_hdr h;
	uint64_t id;
	uint32_t type;
	uint32_t dtype;
	uint32_t redop;
	int32_t root;
	uint64_t count;          /* elements per rank block */
	uint32_t n;              /* entries in rank[] */
	uint32_t nflags;         /* struct gpu_flag entries after rank[n] */
	uint32_t world;          /* 0: the ranks are all on this node */
	uint32_t pad;
	struct gpu_op_rank rank[];
};

/* A device UUID's 16 bytes as nvidia-smi prints them: GPU-8-4-4-4-12 hex digits. */
static inline void gpu_uuid_format(const unsigned char b[16], char out[GPU_UUID_LEN])
{
	snprintf(out, GPU_UUID_LEN,
		 "GPU-%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", b[0],
		 b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13],
		 b[14], b[15]);
}

#endif
