/*
 * comm.h: libcomm, the library a job's processes link to talk to commd.
 * This is the only public header; everything here is API and ABI.
 */
#ifndef COMM_H
#define COMM_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/*
 * Result codes. The values travel on the wire between commd and its clients:
 * append new codes at the end, never renumber. X(name, value, text).
 */
#define COMM_RESULT_LIST(X)                                                    \
	X(COMM_OK, 0, "success")                                               \
	X(COMM_ERR_INVALID_ARG, 1, "invalid argument")                         \
	X(COMM_ERR_DAEMON_UNREACHABLE, 2, "commd unreachable")                 \
	X(COMM_ERR_PROTOCOL, 3, "protocol error")                              \
	X(COMM_ERR_PEER_LOST, 4, "a peer rank was lost")                       \
	X(COMM_ERR_TIMEOUT, 5, "operation timed out")                          \
	X(COMM_ERR_MISMATCH, 6, "ranks disagree on the operation")             \
	X(COMM_ERR_PERMISSION, 7, "permission denied")                         \
	X(COMM_ERR_NO_MEMORY, 8, "out of memory")                              \
	X(COMM_ERR_UNSUPPORTED, 9, "not supported")                            \
	X(COMM_ERR_ABORTED, 10, "communicator aborted")                        \
	X(COMM_ERR_INTERNAL, 11, "internal error")                             \
	X(COMM_ERR_NOT_FOUND, 12, "not found")                                 \
	X(COMM_ERR_BUSY, 13, "resource busy")                                  \
	X(COMM_ERR_VERSION, 14, "protocol version not supported")             \
	X(COMM_ERR_SHUTDOWN, 15, "commd is shutting down")                     \
	X(COMM_INPROGRESS, 16, "operation still in progress")

typedef enum {
#define COMM_X_ENUM(name, value, text) name = value,
	COMM_RESULT_LIST(COMM_X_ENUM)
#undef COMM_X_ENUM
} comm_result_t;

/* Element types. Values travel on the wire: append, never renumber. */
typedef enum {
	COMM_INT8 = 0,
	COMM_UINT8 = 1,
	COMM_INT32 = 2,
	COMM_UINT32 = 3,
	COMM_INT64 = 4,
	COMM_UINT64 = 5,
	COMM_FLOAT16 = 6,
	COMM_BFLOAT16 = 7,
	COMM_FLOAT32 = 8,
	COMM_FLOAT64 = 9,
} comm_dtype_t;

/*
 * Reduction operations. COMM_AVG on integer types truncates toward zero.
 * COMM_MIN and COMM_MAX on floating types skip NaN (as fminf/fmaxf, and
 * NCCL): an element is NaN only where every rank's is.
 */
typedef enum {
	COMM_SUM = 0,
	COMM_PROD = 1,
	COMM_MIN = 2,
	COMM_MAX = 3,
	COMM_AVG = 4,
} comm_redop_t;

typedef struct comm comm_t;
typedef struct comm_request comm_request_t;

/*
 * How to join a job. A field left unset (NULL string, rank or world_size -1,
 * timeout_ms 0) is taken from the environment: COMM_SOCKET, COMM_JOB,
 * COMM_TOKEN, COMM_RANK, COMM_WORLD_SIZE, COMM_TIMEOUT (milliseconds),
 * COMM_ROOT; then from the launcher's own variables (torchrun, Open MPI,
 * Slurm).
 *
 * A job whose ranks run on several nodes names a root: the peer listener
 * (commd --peer-listen) of one node's daemon, as host:port. Every rank
 * connects to its own node's daemon and gives the same root; the root
 * forms the job once the daemons hold all world_size ranks. Under torchrun
 * with ranks on several nodes (LOCAL_WORLD_SIZE < WORLD_SIZE) and no
 * COMM_ROOT, the root is MASTER_ADDR on port COMM_ROOT_PORT (default 29600).
 * root "" or unset: the job is on this node's daemon alone.
 */
typedef struct {
	const char *socket;     /* daemon socket; default /run/commd/commd.sock */
	const char *job;        /* job name, shared by all ranks */
	const char *token;      /* job secret, shared by all ranks; may be empty */
	int rank;               /* 0 .. world_size-1 */
	int world_size;         /* number of ranks in the job */
	int timeout_ms;         /* op deadline in the daemon; default 10 minutes */
	const char *root;       /* ranks on several nodes: the root daemon's host:port */
} comm_config_t;

#define COMM_CONFIG_INIT                                                       \
	{ NULL, NULL, NULL, -1, -1, 0, NULL }

/* An all-unset config, as COMM_CONFIG_INIT. */
comm_config_t comm_config_default(void);

/*
 * Connect to the daemon and join the job. Blocks until every rank of the job
 * has joined (or the join fails). config NULL: everything from the
 * environment. On error *comm is NULL.
 *
 * A communicator belongs to the process that made it. A process forked
 * from it (a data loader's worker, say) holds a copy that is already cut
 * off from commd (the rank ends when its own process does): every call on
 * the copy fails with COMM_ERR_INVALID_ARG, but comm_finalize and
 * comm_abort, which free the copy (COMM_OK) and leave the parent's rank
 * as it is.
 */
comm_result_t comm_init(comm_t **comm, const comm_config_t *config);

/*
 * Wait for the requests still outstanding, leave the job and free the
 * communicator. Requests not yet waited on are freed; the memory from
 * comm_mem_alloc is released. Returns the first of those requests'
 * failures, else COMM_ERR_DAEMON_UNREACHABLE (or the code that cut the
 * connection) when the connection was gone, so the job was not left
 * cleanly; the communicator is freed all the same.
 */
comm_result_t comm_finalize(comm_t *comm);

/*
 * Leave at once: the other ranks' pending and later ops fail with
 * COMM_ERR_ABORTED. Frees the communicator and its outstanding requests.
 */
comm_result_t comm_abort(comm_t *comm);

int comm_rank(const comm_t *comm);
int comm_size(const comm_t *comm);

/*
 * Split comm into disjoint communicators, as MPI_Comm_split and
 * ncclCommSplit do. A collective: every rank of comm calls it, in the same
 * order as its other collectives on comm. The ranks that give the same
 * color (>= 0) form one new communicator, ranked by key, ties broken by
 * their rank in comm; a rank that gives COMM_SPLIT_NOCOLOR joins none and
 * gets *newcomm NULL. Each new communicator is a job of its own on the
 * daemons, named after comm's job ("JOB/split.N.COLOR", N counting comm's
 * splits from 0; past 255 bytes, JOB's first 180 and a hash of it stand for
 * JOB), with comm's socket, token, deadline, root and stream; it
 * is finalized on its own, before or after comm. Memory from
 * comm_mem_alloc on comm, or on any communicator split from it (or from
 * those), works in place on all of them: each registers another's segment
 * with commd the first time an op names it (where commd refuses it, such
 * as past the job's memory limit, the op stages it). The memory still
 * belongs to the communicator that allocated it: comm_mem_free it there,
 * and it goes with that communicator's comm_finalize. Every rank's new
 * communicator forms, or none does: on error *newcomm is NULL on every
 * rank and comm_last_error(comm) says why. A new communicator's join has
 * half comm's deadline, so that where one rank's join fails at once (its
 * daemon refuses the connection) the others' give up (COMM_ERR_TIMEOUT,
 * naming it) before comm's own deadline could fail comm. As with any collective, a rank
 * whose arguments are refused (a color below COMM_SPLIT_NOCOLOR, a split
 * inside a group: COMM_ERR_INVALID_ARG, before anything is sent) leaves
 * the others waiting until the deadline.
 */
#define COMM_SPLIT_NOCOLOR (-1)
comm_result_t comm_split(comm_t *comm, int color, int key, comm_t **newcomm);

/*
 * Zero-copy host memory, shared with the daemon. Carved out of a few large
 * registered segments. NULL on failure (see comm_last_error).
 */
void *comm_mem_alloc(comm_t *comm, size_t bytes);
comm_result_t comm_mem_free(comm_t *comm, void *ptr);

/*
 * Collectives. Buffers from comm_mem_alloc are used in place; any other host
 * pointer is staged through shared memory (one copy each way: the result
 * is copied out when commd answers, in posting order, and the call posting
 * an op whose input an earlier op's staged result overlaps blocks until
 * that op is done, outside a group, as an op queued behind it on one CUDA
 * stream would wait; so staged ops see each other's results as in-place
 * ones do);
 * device memory is used in place (see "Device memory" below). With req NULL
 * the call blocks until the result is in place; otherwise *req receives a
 * request to pass to comm_wait or comm_test. sendbuf == recvbuf (all-reduce),
 * recvbuf == sendbuf + rank * recvcount (reduce-scatter) and
 * sendbuf == recvbuf + rank * sendcount (all-gather) are in place. When an
 * op fails, its output buffer may hold part of the result (with ranks on
 * several daemons, what had arrived), as in NCCL and MPI.
 */
comm_result_t comm_allreduce(comm_t *comm, const void *sendbuf, void *recvbuf, size_t count,
			     comm_dtype_t dtype, comm_redop_t op, comm_request_t **req);
comm_result_t comm_reduce_scatter(comm_t *comm, const void *sendbuf, void *recvbuf,
				  size_t recvcount, comm_dtype_t dtype, comm_redop_t op,
				  comm_request_t **req);
comm_result_t comm_allgather(comm_t *comm, const void *sendbuf, void *recvbuf, size_t sendcount,
			     comm_dtype_t dtype, comm_request_t **req);

/*
 * broadcast: root's sendbuf goes to every rank's recvbuf (sendbuf is read
 * only on root; may be NULL elsewhere). reduce: the reduction of every
 * rank's sendbuf lands in root's recvbuf (recvbuf is written only on root;
 * may be NULL elsewhere). alltoall: block j of rank i's sendbuf goes to
 * block i of rank j's recvbuf; count elements per block, size blocks.
 */
comm_result_t comm_broadcast(comm_t *comm, const void *sendbuf, void *recvbuf, size_t count,
			     comm_dtype_t dtype, int root, comm_request_t **req);
comm_result_t comm_reduce(comm_t *comm, const void *sendbuf, void *recvbuf, size_t count,
			  comm_dtype_t dtype, comm_redop_t op, int root, comm_request_t **req);
comm_result_t comm_alltoall(comm_t *comm, const void *sendbuf, void *recvbuf, size_t count,
			    comm_dtype_t dtype, comm_request_t **req);

/*
 * alltoallv, as MPI_Alltoallv and torch's all_to_all_single with split
 * sizes: sendcounts[j] elements from sendbuf + sdispls[j] go to rank j,
 * which takes them in at recvbuf + rdispls[i] (recvcounts[i] elements, i
 * the sender); counts and displacements are in elements, one per rank. A
 * rank's recvcounts[i] must equal rank i's sendcounts[j] for it (zero
 * included): otherwise that pair fails as a send and recv of different
 * sizes do (below). It is a group of
 * a send to and a recv from each rank (see comm_group_start), so inside an
 * open group it joins that group; its request, if asked for, stands for
 * them all. sendbuf and recvbuf must not overlap.
 */
comm_result_t comm_alltoallv(comm_t *comm, const void *sendbuf, const size_t *sendcounts,
			     const size_t *sdispls, void *recvbuf, const size_t *recvcounts,
			     const size_t *rdispls, comm_dtype_t dtype, comm_request_t **req);

/*
 * Point to point. The k-th send from rank a to rank b matches the k-th recv
 * on b from a; the daemon copies once, from the sender's memory into the
 * receiver's. Sizes (count x dtype size) must agree: a mismatch fails the
 * recv with COMM_ERR_MISMATCH, and the send on one daemon (across daemons
 * the send may have ended before the receiver compared). A rank's sends and
 * recvs posted one after another outside a group progress together, as a
 * group's would: two ranks that each post a send with a request, then a
 * recv, meet (where NCCL would need a group); each is still answered in
 * posting order, after the ones before it. A blocking one, or the
 * collective after them, waits until its partner has posted. peer == own
 * rank needs a group: outside one it is COMM_ERR_INVALID_ARG.
 */
comm_result_t comm_send(comm_t *comm, const void *buf, size_t count, comm_dtype_t dtype,
			int peer, comm_request_t **req);
comm_result_t comm_recv(comm_t *comm, void *buf, size_t count, comm_dtype_t dtype, int peer,
			comm_request_t **req);

/* Completes on every rank once every rank has called it. */
comm_result_t comm_barrier(comm_t *comm, comm_request_t **req);

/*
 * Groups: the ops posted between comm_group_start and comm_group_end are
 * submitted together at comm_group_end and progress together, so a ring
 * where every rank sends to rank+1 and receives from rank-1 cannot
 * deadlock. Inside a group an op given req == NULL does not block: it is
 * complete when comm_group_end returns (comm_group_end waits for it); an op
 * given a request completes when that request is waited on. Groups nest
 * (only the outermost end submits).
 */
comm_result_t comm_group_start(comm_t *comm);
comm_result_t comm_group_end(comm_t *comm);

/*
 * Device memory. Built with CUDA and talking to commd protocol 3 or later,
 * the collectives and send/recv take device buffers: from cudaMalloc, or
 * from cuMemCreate with the POSIX fd handle type (as PyTorch's expandable
 * segments). A buffer lies inside one allocation, and an op's send and recv
 * buffers are both host or both device memory (COMM_ERR_UNSUPPORTED
 * otherwise). Managed and host-registered memory count as host memory.
 * libcomm registers an allocation with commd when an op first names it,
 * again when the allocation at that address changed, and keeps a bounded
 * number registered; freed ones are dropped at the next registration.
 *
 * An op on device memory follows the work enqueued on the comm's stream
 * before the op was posted: libcomm records an event there (unless that work
 * has all finished already) and commd starts the op once it has completed.
 * comm_wait and comm_test are unchanged: the op is done when its results are
 * in the buffers. comm_stream_wait orders a stream after the op instead.
 */

/*
 * The stream (a cudaStream_t; NULL: the legacy default stream, the initial
 * choice) that later ops on device memory follow. It must stay valid while
 * the comm uses it. Without CUDA in the build a non-NULL stream is
 * COMM_ERR_UNSUPPORTED.
 */
comm_result_t comm_set_stream(comm_t *comm, void *stream);

/*
 * Order the work enqueued on stream (a cudaStream_t) after req from now on,
 * without waiting on the host, then free req. For an op on device memory
 * posted with a request, while it is still running, libcomm enqueues on
 * stream a wait for the op's done flag (cuStreamWaitValue32), which commd's
 * GPU worker writes once the results are in place, and returns COMM_OK at
 * once: the op's own result then comes from comm_async_error. Otherwise
 * (a request already finished, a host op, a stream on another device than
 * the op's buffers, no done flag to be had: no stream memory operations in
 * the driver, no page for them, a commd older than protocol 4) the call
 * waits for req on the host, as comm_wait(req, -1) does, and returns the
 * op's result. Either way work enqueued on stream
 * after it returns sees the results. Without CUDA in the build a non-NULL
 * stream is COMM_ERR_UNSUPPORTED and req stays valid.
 */
comm_result_t comm_stream_wait(comm_request_t *req, void *stream);

/*
 * The first failure of an op handed to a stream by comm_stream_wait, once
 * libcomm has seen it (this call reads commd's answers without blocking),
 * or COMM_OK; it stays the comm's answer from then on, as NCCL's
 * ncclCommGetAsyncError. The failed op's waiting stream was let go, with
 * the op's output buffers as the failure left them; comm_last_error said
 * why when libcomm read the answer (a later failure may have replaced it). libcomm sees answers only inside its calls: a program that
 * blocks on such a stream while an op may fail should poll this call.
 */
comm_result_t comm_async_error(comm_t *comm);

/*
 * Wait for a request; timeout_ms -1 waits without limit. Returns the op's
 * result and frees req, or COMM_INPROGRESS when the time ran out (req stays
 * valid). Requests of one communicator complete in posting order.
 */
comm_result_t comm_wait(comm_request_t *req, int timeout_ms);

/* Poll a request without blocking: *done is 1 when it finished (then req is
 * freed and the op's result returned), 0 otherwise (COMM_OK returned). */
comm_result_t comm_test(comm_request_t *req, int *done);

const char *comm_strerror(comm_result_t rc);

/* The short upper-case name of a result code, e.g. "COMM_ERR_MISMATCH". */
const char *comm_result_name(comm_result_t rc);

/*
 * Detail of the communicator's last failure, "" when there was none. With
 * comm NULL: why the calling thread's last comm_init failed.
 */
const char *comm_last_error(const comm_t *comm);

/* Size in bytes of one element of dtype, 0 for an unknown dtype. */
size_t comm_dtype_size(comm_dtype_t dtype);

#ifdef __cplusplus
}
#endif

#endif
