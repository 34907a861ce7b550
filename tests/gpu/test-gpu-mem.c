/*
 * test-gpu-mem.c: device memory around the ops, through the real commd and
 * its GPU worker: stream order (an op sees the work enqueued before it, a
 * recv the work enqueued before it on the receiver's stream), the
 * registration cache across cudaFree and cudaMalloc (right results, bounded
 * registered memory), VMM allocations, many outstanding device ops beside
 * host ones, a group naming more allocations than libcomm keeps registered,
 * the refusals, and communicators split from a device job.
 * Exits 77 without a GPU.
 */
#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "check.h"
#include "gpu-count.h"
#include "comm.h"
#include "harness.h"
#include "raw.h"

#define STREAM_COUNT (1 << 20)  /* int32 per rank in the stream-order ops */
#define STREAM_HOLD_US 200000   /* how long a host function holds the stream */
#define REALLOC_ITERS 12
#define NOUT 48                 /* outstanding ops per round */
#define OUT_COUNT 4096

static struct th_daemon d;
static int ndev;

/* Print "rank r: ..." and return 1 (a failed step of a rank). */
#define FAIL(r, ...)                                                           \
	(fprintf(stderr, "rank %d: ", (r)), fprintf(stderr, __VA_ARGS__),     \
	 fputc('\n', stderr), 1)

static int cuda_bad(cudaError_t e, int r, const char *what)
{
	if (e == cudaSuccess)
		return 0;
	return FAIL(r, "%s: %s", what, cudaGetErrorString(e));
}

static int use_device(int r)
{
	return cuda_bad(cudaSetDevice(r % ndev), r, "cudaSetDevice") ||
	       cuda_bad(cudaFree(NULL), r, "cudaFree(NULL)");
}

/* The op's result, or a line about its failure and 1. */
static int op_bad(comm_t *c, comm_result_t rc, int r, const char *what)
{
	if (rc == COMM_OK)
		return 0;
	return FAIL(r, "%s: %s: %s", what, comm_result_name(rc), comm_last_error(c));
}

/* --- stream order ------------------------------------------------------------ */

static void CUDART_CB hold_stream(void *arg)
{
	usleep(STREAM_HOLD_US);
}

/*
 * buf holds 0x01 bytes; on stream s a host function holds the stream, then
 * a memset to 0x02 is enqueued, then the op is posted at once: it must see
 * the 0x02s. async: posted with a request and ended by comm_stream_wait.
 */
static int stream_case(comm_t *c, int r, int n, cudaStream_t s, int async, const char *what)
{
	size_t bytes = STREAM_COUNT * sizeof(int32_t);
	int32_t *buf = NULL, *out = NULL, *h = malloc(bytes);
	int32_t want = n * 0x02020202;
	comm_request_t *req = NULL;
	comm_result_t rc;
	int bad = 0;

	if (!h || cuda_bad(cudaMalloc((void **)&buf, bytes), r, "cudaMalloc") ||
	    cuda_bad(cudaMalloc((void **)&out, bytes), r, "cudaMalloc") ||
	    cuda_bad(cudaMemset(buf, 0x01, bytes), r, "cudaMemset") ||
	    cuda_bad(cudaMemset(out, 0, bytes), r, "cudaMemset") ||
	    cuda_bad(cudaDeviceSynchronize(), r, "cudaDeviceSynchronize")) {
		bad = -1;
		goto out;
	}
	rc = comm_set_stream(c, s);
	if (op_bad(c, rc, r, "comm_set_stream") ||
	    cuda_bad(cudaLaunchHostFunc(s, hold_stream, NULL), r, "cudaLaunchHostFunc") ||
	    cuda_bad(cudaMemsetAsync(buf, 0x02, bytes, s), r, "cudaMemsetAsync")) {
		bad = -1;
		goto out;
	}
	rc = comm_allreduce(c, buf, out, STREAM_COUNT, COMM_INT32, COMM_SUM, async ? &req : NULL);
	if (rc == COMM_OK && async)
		rc = comm_stream_wait(req, s);
	if (op_bad(c, rc, r, what) ||
	    cuda_bad(cudaMemcpyAsync(h, out, bytes, cudaMemcpyDeviceToHost, s), r, "copy back") ||
	    cuda_bad(cudaStreamSynchronize(s), r, "cudaStreamSynchronize")) {
		bad = -1;
		goto out;
	}
	for (size_t i = 0; i < STREAM_COUNT; i++) {
		if (h[i] != want) {
			bad = FAIL(r, "%s: element %zu is 0x%08x, expected 0x%08x (the op did not "
				      "follow the memset on its stream)",
				   what, i, (unsigned)h[i], (unsigned)want);
			break;
		}
	}
out:
	comm_set_stream(c, NULL);
	cudaFree(buf);
	cudaFree(out);
	free(h);
	return bad;
}

static int rank_stream(int r, int n, void *arg)
{
	cudaStream_t s = NULL;
	comm_t *c;
	int bad;

	if (use_device(r) ||
	    cuda_bad(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), r, "cudaStreamCreate"))
		return 1;
	if (th_join(&c, r, n) < 0)
		return 1;
	bad = stream_case(c, r, n, NULL, 0, "legacy stream, blocking op");
	if (bad >= 0)
		bad |= stream_case(c, r, n, s, 0, "own stream, blocking op");
	if (bad >= 0)
		bad |= stream_case(c, r, n, s, 1, "own stream, comm_stream_wait");
	if (bad < 0)
		return th_bail(c);
	bad |= th_leave(c, r);
	cudaStreamDestroy(s);
	return bad;
}

/*
 * A recv follows its own stream too: the receiver's buffer starts at 0x01;
 * on its stream a host function holds the stream, then a memset to 0xaa
 * is enqueued, and the recv is posted at once; rank 0 sends 0x55 bytes.
 * The memset comes first, so the buffer ends at 0x55 (were the copy to
 * wait for the sender's stream only, it would land first and the memset
 * would leave 0xaa).
 */
static int rank_recv_stream(int r, int n, void *arg)
{
	size_t bytes = STREAM_COUNT;
	uint8_t *buf = NULL, *h = malloc(bytes);
	cudaStream_t s = NULL;
	comm_result_t rc;
	comm_t *c;
	int bad = 0;

	(void)arg;
	if (!h || use_device(r) ||
	    cuda_bad(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), r, "cudaStreamCreate") ||
	    cuda_bad(cudaMalloc((void **)&buf, bytes), r, "cudaMalloc") ||
	    cuda_bad(cudaMemset(buf, r == 0 ? 0x55 : 0x01, bytes), r, "cudaMemset") ||
	    cuda_bad(cudaDeviceSynchronize(), r, "cudaDeviceSynchronize"))
		return 1;
	if (th_join(&c, r, n) < 0)
		return 1;
	if (r == 0) {
		rc = comm_send(c, buf, bytes, COMM_UINT8, 1, NULL);
		bad = op_bad(c, rc, r, "send");
	} else {
		rc = comm_set_stream(c, s);
		if (op_bad(c, rc, r, "comm_set_stream") ||
		    cuda_bad(cudaLaunchHostFunc(s, hold_stream, NULL), r, "cudaLaunchHostFunc") ||
		    cuda_bad(cudaMemsetAsync(buf, 0xaa, bytes, s), r, "cudaMemsetAsync"))
			return th_bail(c);
		rc = comm_recv(c, buf, bytes, COMM_UINT8, 0, NULL);
		if (op_bad(c, rc, r, "recv") ||
		    cuda_bad(cudaMemcpyAsync(h, buf, bytes, cudaMemcpyDeviceToHost, s), r,
			     "copy back") ||
		    cuda_bad(cudaStreamSynchronize(s), r, "cudaStreamSynchronize"))
			return th_bail(c);
		for (size_t i = 0; i < bytes && !bad; i++)
			if (h[i] != 0x55)
				bad = FAIL(r, "byte %zu is 0x%02x, expected 0x55 (the recv did not "
					      "follow the memset on the receiver's stream)",
					   i, h[i]);
		comm_set_stream(c, NULL);
	}
	if (bad)
		return th_bail(c);
	bad = th_leave(c, r);
	cudaFree(buf);
	cudaStreamDestroy(s);
	free(h);
	return bad;
}

/* --- the cache across cudaFree and cudaMalloc -------------------------------- */

/* The job's registered bytes by commd's status, -1 when it is not listed. */
static long long job_mem(const char *job)
{
	Commpb__Envelope env = COMMPB__ENVELOPE__INIT, *reply = NULL;
	Commpb__StatusRequest sr = COMMPB__STATUS_REQUEST__INIT;
	struct frame_reader rd;
	int fd = raw_connect(d.sock);
	long long v = -1;

	frame_reader_init(&rd);
	if (raw_hello_admin(fd, &rd) == COMM_OK) {
		env.body_case = COMMPB__ENVELOPE__BODY_STATUS_REQUEST;
		env.status_request = &sr;
		raw_send(fd, &env, NULL, 0);
		reply = raw_recv(fd, &rd);
		for (size_t i = 0; reply && reply->body_case == COMMPB__ENVELOPE__BODY_STATUS_REPLY &&
				   i < reply->status_reply->n_jobs;
		     i++)
			if (!strcmp(reply->status_reply->jobs[i]->name, job))
				v = (long long)reply->status_reply->jobs[i]->mem_registered;
	}
	if (reply)
		commpb__envelope__free_unpacked(reply, NULL);
	frame_reader_free(&rd);
	close(fd);
	return v;
}

/*
 * Each iteration: cudaMalloc (a size twice in a row, so the same address may
 * come back with a new buffer id; other sizes where old ones were), an
 * in-place uint8 sum, the bytes checked, cudaFree. Rank 0 checks that the
 * job's registered memory holds this iteration's allocations, not all.
 */
static int rank_realloc(int r, int n, void *arg)
{
	const size_t sizes[3] = { 1u << 20, (1u << 20) + (256u << 10), (1u << 20) + (512u << 10) };
	static const int pick[REALLOC_ITERS] = { 0, 0, 1, 1, 2, 0, 2, 2, 1, 0, 0, 2 };
	const long long bound = (long long)n * 2 * (2 << 20); /* each rank's largest, 2 MiB up, x2 */
	const char *job = getenv("COMM_JOB");
	long long base = 0, m;
	uint8_t *p = NULL, *h = malloc(sizes[2]);
	comm_t *c;
	int bad = 0;

	if (!h || use_device(r) || th_join(&c, r, n) < 0)
		return 1;
	if (op_bad(c, comm_barrier(c, NULL), r, "barrier"))
		return th_bail(c);
	if (r == 0)
		base = job_mem(job);
	for (int it = 0; it < REALLOC_ITERS; it++) {
		size_t size = sizes[pick[it]];
		uint8_t want = 0;

		for (int q = 0; q < n; q++)
			want = (uint8_t)(want + q + it + 1);
		if (cuda_bad(cudaMalloc((void **)&p, size), r, "cudaMalloc") ||
		    cuda_bad(cudaMemset(p, r + it + 1, size), r, "cudaMemset"))
			return th_bail(c);
		if (op_bad(c, comm_allreduce(c, p, p, size, COMM_UINT8, COMM_SUM, NULL), r,
			   "realloc: allreduce") ||
		    cuda_bad(cudaMemcpy(h, p, size, cudaMemcpyDeviceToHost), r, "copy back"))
			return th_bail(c);
		for (size_t i = 0; i < size; i++) {
			if (h[i] != want) {
				bad |= FAIL(r, "realloc %d (%zu bytes at %p): byte %zu is %u, expected %u",
					    it, size, (void *)p, i, h[i], want);
				break;
			}
		}
		if (op_bad(c, comm_barrier(c, NULL), r, "barrier"))
			return th_bail(c);
		if (r == 0) {
			m = job_mem(job) - base;
			if (m < (long long)size * n || m > bound)
				bad |= FAIL(r, "realloc %d: the job has %lld device bytes registered, "
					       "expected %lld to %lld",
					    it, m, (long long)size * n, bound);
		}
		cudaFree(p);
	}
	free(h);
	return th_leave(c, r) | bad;
}

/* --- VMM allocations ------------------------------------------------------- */

static struct {
	PFN_cuMemGetAllocationGranularity_v10020 granularity;
	PFN_cuMemCreate_v10020 create;
	PFN_cuMemAddressReserve_v10020 reserve;
	PFN_cuMemMap_v10020 map;
	PFN_cuMemSetAccess_v10020 set_access;
	PFN_cuMemUnmap_v10020 unmap;
	PFN_cuMemAddressFree_v10020 address_free;
	PFN_cuMemRelease_v10020 release;
} cu;

static int entry(const char *name, void **fn, int r)
{
	enum cudaDriverEntryPointQueryResult q = cudaDriverEntryPointSymbolNotFound;

	if (cudaGetDriverEntryPointByVersion(name, fn, 12000, cudaEnableDefault, &q) ==
		    cudaSuccess &&
	    q == cudaDriverEntryPointSuccess && *fn)
		return 0;
	return FAIL(r, "no driver entry point %s", name);
}

static int vmm_entries(int r)
{
	return entry("cuMemGetAllocationGranularity", (void **)&cu.granularity, r) ||
	       entry("cuMemCreate", (void **)&cu.create, r) ||
	       entry("cuMemAddressReserve", (void **)&cu.reserve, r) ||
	       entry("cuMemMap", (void **)&cu.map, r) ||
	       entry("cuMemSetAccess", (void **)&cu.set_access, r) ||
	       entry("cuMemUnmap", (void **)&cu.unmap, r) ||
	       entry("cuMemAddressFree", (void **)&cu.address_free, r) ||
	       entry("cuMemRelease", (void **)&cu.release, r);
}

/* A reserved range of nchunks chunks, each its own cuMemCreate allocation. */
struct vmm {
	CUdeviceptr va;
	size_t chunk;
	int nchunks;
	CUmemGenericAllocationHandle h[2];
	CUmemAllocationProp prop;
};

static int cu_bad(CUresult e, int r, const char *what)
{
	return e == CUDA_SUCCESS ? 0 : FAIL(r, "%s: CUDA driver error %d", what, (int)e);
}

/* Create chunk i and map it at its place (again, after vmm_unmap_chunk). */
static int vmm_map_chunk(struct vmm *v, int i, int r)
{
	CUmemAccessDesc a = { { CU_MEM_LOCATION_TYPE_DEVICE, r % ndev },
			      CU_MEM_ACCESS_FLAGS_PROT_READWRITE };

	return cu_bad(cu.create(&v->h[i], v->chunk, &v->prop, 0), r, "cuMemCreate") ||
	       cu_bad(cu.map(v->va + (size_t)i * v->chunk, v->chunk, 0, v->h[i], 0), r,
		      "cuMemMap") ||
	       cu_bad(cu.set_access(v->va + (size_t)i * v->chunk, v->chunk, &a, 1), r,
		      "cuMemSetAccess");
}

static void vmm_unmap_chunk(struct vmm *v, int i)
{
	cu.unmap(v->va + (size_t)i * v->chunk, v->chunk);
	cu.release(v->h[i]);
}

static int vmm_alloc(struct vmm *v, int nchunks, int shareable, int r)
{
	memset(v, 0, sizeof *v);
	v->nchunks = nchunks;
	v->prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
	v->prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
	v->prop.location.id = r % ndev;
	v->prop.requestedHandleTypes =
		shareable ? CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR : CU_MEM_HANDLE_TYPE_NONE;
	if (cu_bad(cu.granularity(&v->chunk, &v->prop, CU_MEM_ALLOC_GRANULARITY_MINIMUM), r,
		   "cuMemGetAllocationGranularity") ||
	    cu_bad(cu.reserve(&v->va, v->chunk * (size_t)nchunks, 0, 0, 0), r,
		   "cuMemAddressReserve"))
		return 1;
	for (int i = 0; i < nchunks; i++)
		if (vmm_map_chunk(v, i, r))
			return 1;
	return 0;
}

static void vmm_free(struct vmm *v)
{
	for (int i = 0; i < v->nchunks; i++)
		vmm_unmap_chunk(v, i);
	if (v->va)
		cu.address_free(v->va, v->chunk * (size_t)v->nchunks);
}

/* A float32 sum of count elements from send into recv (device pointers); 0 right. */
static int vmm_sum(comm_t *c, int r, int n, CUdeviceptr send, CUdeviceptr recv, size_t count,
		   const char *what)
{
	float *h = malloc(count * sizeof *h);
	int bad = 0;

	if (!h)
		return FAIL(r, "out of memory");
	for (size_t i = 0; i < count; i++)
		h[i] = (float)((int)(i % 13) - 6) * 0.25f + (float)r;
	if (cuda_bad(cudaMemcpy((void *)send, h, count * sizeof *h, cudaMemcpyHostToDevice), r,
		     "cudaMemcpy") ||
	    op_bad(c, comm_allreduce(c, (void *)send, (void *)recv, count, COMM_FLOAT32, COMM_SUM,
				     NULL),
		   r, what) ||
	    cuda_bad(cudaMemcpy(h, (void *)recv, count * sizeof *h, cudaMemcpyDeviceToHost), r,
		     "cudaMemcpy")) {
		free(h);
		return -1;
	}
	for (size_t i = 0; i < count; i++) {
		float want = (float)n * ((float)((int)(i % 13) - 6) * 0.25f) +
			     (float)(n * (n - 1) / 2);

		if (h[i] != want) {
			bad = FAIL(r, "%s: element %zu is %g, expected %g", what, i, (double)h[i],
				   (double)want);
			break;
		}
	}
	free(h);
	return bad;
}

/*
 * Two adjacent chunks of one reserved range, as PyTorch's expandable
 * segments map them: a buffer in either chunk works (offsets from its own
 * chunk), one across both is refused, and a chunk unmapped and made anew at
 * the same address is registered again. An allocation made without the
 * POSIX fd handle type is refused with what to do.
 */
static int rank_vmm(int r, int n, void *arg)
{
	struct vmm v, u;
	size_t count;
	comm_result_t rc;
	comm_t *c;
	int bad = 0;

	if (use_device(r) || vmm_entries(r) || vmm_alloc(&v, 2, 1, r) || vmm_alloc(&u, 1, 0, r))
		return 1;
	if (th_join(&c, r, n) < 0)
		return 1;
	count = v.chunk / sizeof(float) - 256;
	if (vmm_sum(c, r, n, v.va + 256, v.va + v.chunk + 512, count, "vmm: chunk 0 to chunk 1") ||
	    vmm_sum(c, r, n, v.va + v.chunk, v.va + v.chunk, 1024, "vmm: in place in chunk 1"))
		return th_bail(c);
	rc = comm_allreduce(c, (void *)(v.va + v.chunk - 64), (void *)(v.va + v.chunk - 64), 32,
			    COMM_FLOAT32, COMM_SUM, NULL);
	if (rc != COMM_ERR_INVALID_ARG || !strstr(comm_last_error(c), "runs past its device"))
		bad |= FAIL(r, "vmm: a buffer across two chunks: %s (%s), expected "
			       "COMM_ERR_INVALID_ARG",
			    comm_result_name(rc), comm_last_error(c));
	vmm_unmap_chunk(&v, 1);
	if (vmm_map_chunk(&v, 1, r) ||
	    vmm_sum(c, r, n, v.va + v.chunk, v.va + v.chunk + 4096, 1024, "vmm: chunk 1 remade"))
		return th_bail(c);
	rc = comm_allreduce(c, (void *)u.va, (void *)u.va, 1024, COMM_FLOAT32, COMM_SUM, NULL);
	if (rc != COMM_ERR_UNSUPPORTED ||
	    !strstr(comm_last_error(c), "CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR"))
		bad |= FAIL(r, "vmm: an allocation without a POSIX fd handle type: %s (%s), "
			       "expected COMM_ERR_UNSUPPORTED naming the handle type",
			    comm_result_name(rc), comm_last_error(c));
	bad |= th_leave(c, r);
	vmm_free(&v);
	vmm_free(&u);
	return bad;
}

/* --- refusals, and memory that takes the host path --------------------------- */

/* An in-place int32 sum over p (host-accessible memory of some kind); 0 right. */
static int host_kind_sum(comm_t *c, int r, int n, int32_t *p, const char *what)
{
	comm_request_t *req;

	for (int i = 0; i < 1024; i++)
		p[i] = r * 100 + i;
	if (op_bad(c, comm_allreduce(c, p, p, 1024, COMM_INT32, COMM_SUM, &req), r, what) ||
	    op_bad(c, comm_stream_wait(req, NULL), r, what))
		return -1;
	for (int i = 0; i < 1024; i++)
		if (p[i] != 100 * n * (n - 1) / 2 + n * i)
			return FAIL(r, "%s: element %d is %d, expected %d", what, i, p[i],
				    100 * n * (n - 1) / 2 + n * i);
	return 0;
}

static int expect_refusal(comm_t *c, int r, comm_result_t rc, comm_result_t want,
			  const char *detail, const char *what)
{
	if (rc == want && strstr(comm_last_error(c), detail))
		return 0;
	return FAIL(r, "%s: %s (%s), expected %s with \"%s\"", what, comm_result_name(rc),
		    comm_last_error(c), comm_result_name(want), detail);
}

static int rank_kinds(int r, int n, void *arg)
{
	int32_t *dev = NULL, *managed = NULL, *pinned = NULL, *heap = malloc(4096), *seg;
	comm_t *c;
	int bad = 0;

	if (!heap || use_device(r) || cuda_bad(cudaMalloc((void **)&dev, 4096), r, "cudaMalloc") ||
	    cuda_bad(cudaMallocManaged((void **)&managed, 4096, cudaMemAttachGlobal), r,
		     "cudaMallocManaged") ||
	    cuda_bad(cudaMallocHost((void **)&pinned, 4096), r, "cudaMallocHost"))
		return 1;
	if (th_join(&c, r, n) < 0)
		return 1;
	seg = comm_mem_alloc(c, 4096);
	if (!seg)
		return th_bail(c);
	bad |= expect_refusal(c, r, comm_allreduce(c, heap, dev, 1024, COMM_INT32, COMM_SUM, NULL),
			      COMM_ERR_UNSUPPORTED,
			      "allreduce: send buffer is host memory and recv buffer device "
			      "memory; use one kind",
			      "malloc send, device recv");
	bad |= expect_refusal(c, r, comm_allreduce(c, dev, seg, 1024, COMM_INT32, COMM_SUM, NULL),
			      COMM_ERR_UNSUPPORTED,
			      "allreduce: send buffer is device memory and recv buffer host "
			      "memory; use one kind",
			      "device send, comm_mem_alloc recv");
	bad |= expect_refusal(c, r,
			      comm_allreduce(c, dev, dev, 1 << 20, COMM_INT32, COMM_SUM, NULL),
			      COMM_ERR_INVALID_ARG, "runs past its device allocation",
			      "a buffer past its cudaMalloc allocation");
	bad |= expect_refusal(c, r, comm_set_stream(c, NULL), COMM_OK, "",
			      "comm_set_stream(NULL)");
	if (host_kind_sum(c, r, n, managed, "managed memory (staged)") < 0 ||
	    host_kind_sum(c, r, n, pinned, "cudaMallocHost memory (staged)") < 0 ||
	    host_kind_sum(c, r, n, heap, "malloc memory, after device ops") < 0)
		return th_bail(c);
	bad |= th_leave(c, r);
	cudaFree(dev);
	cudaFree(managed);
	cudaFreeHost(pinned);
	free(heap);
	return bad;
}

/* --- many outstanding ops ---------------------------------------------------- */

/*
 * Rounds of NOUT int32 sums posted before any is waited for, every fourth
 * on host memory (the ring) and the others on slices of one device
 * allocation (the socket, one pooled event each); waited in order, or
 * polled with comm_test newest first.
 */
static int rank_outstanding(int r, int n, void *arg)
{
	size_t bytes = (size_t)NOUT * OUT_COUNT * sizeof(int32_t);
	int32_t *dbuf = NULL, *hbuf, *h = malloc(bytes);
	comm_request_t *req[NOUT];
	comm_t *c;
	int bad = 0;

	if (!h || use_device(r) || cuda_bad(cudaMalloc((void **)&dbuf, bytes), r, "cudaMalloc"))
		return 1;
	if (th_join(&c, r, n) < 0)
		return 1;
	hbuf = comm_mem_alloc(c, bytes);
	if (!hbuf)
		return th_bail(c);
	for (int round = 0; round < 3; round++) {
		int left = NOUT;

		for (size_t i = 0; i < (size_t)NOUT * OUT_COUNT; i++)
			h[i] = r * 1000 + round * 7 + (int)(i % 5);
		memcpy(hbuf, h, bytes);
		if (cuda_bad(cudaMemcpy(dbuf, h, bytes, cudaMemcpyHostToDevice), r, "cudaMemcpy"))
			return th_bail(c);
		for (int k = 0; k < NOUT; k++) {
			int32_t *p = (k % 4 == 3 ? hbuf : dbuf) + (size_t)k * OUT_COUNT;

			if (op_bad(c, comm_allreduce(c, p, p, OUT_COUNT, COMM_INT32, COMM_SUM,
						     &req[k]),
				   r, "posting"))
				return th_bail(c);
		}
		while (left > 0) {
			for (int k = NOUT - 1; k >= 0; k--) {
				int done = 0;

				if (!req[k])
					continue;
				if (round == 1 ? op_bad(c, comm_test(req[k], &done), r, "comm_test")
					       : op_bad(c, comm_wait(req[k], -1), r, "comm_wait"))
					return th_bail(c);
				if (round != 1 || done) {
					req[k] = NULL;
					left--;
				}
			}
		}
		if (cuda_bad(cudaMemcpy(h, dbuf, bytes, cudaMemcpyDeviceToHost), r, "copy back"))
			return th_bail(c);
		for (int k = 0; k < NOUT && !bad; k++) {
			const int32_t *got = (k % 4 == 3 ? hbuf : h) + (size_t)k * OUT_COUNT;

			for (int i = 0; i < OUT_COUNT; i++) {
				int32_t want = 1000 * n * (n - 1) / 2 +
					       n * (round * 7 + (int)(((size_t)k * OUT_COUNT + i) % 5));

				if (got[i] != want) {
					bad = FAIL(r, "round %d op %d (%s): element %d is %d, "
						      "expected %d",
						   round, k, k % 4 == 3 ? "host" : "device", i,
						   got[i], want);
					break;
				}
			}
		}
	}
	bad |= th_leave(c, r);
	cudaFree(dbuf);
	free(h);
	return bad;
}

/* --- a group naming more allocations than libcomm keeps registered ------------ */

#define GROUP_BUFS 80   /* distinct cudaMalloc buffers in one group: past libcomm's 64 */
#define GROUP_COUNT 256

/*
 * One group of GROUP_BUFS all-reduces, each on a buffer of its own: the
 * group's ops go out at comm_group_end, so none of their registrations may
 * be given back while the group is open (each would be NOT_FOUND). Then
 * each buffer holds the sum over ranks, and a second group reuses them.
 */
static int rank_group_many(int r, int n, void *arg)
{
	int32_t *buf[GROUP_BUFS], h[GROUP_COUNT];
	comm_t *c;
	int bad = 0;

	(void)arg;
	if (use_device(r))
		return 1;
	for (int k = 0; k < GROUP_BUFS; k++)
		if (cuda_bad(cudaMalloc((void **)&buf[k], sizeof h), r, "cudaMalloc"))
			return 1;
	if (th_join(&c, r, n) < 0)
		return 1;
	for (int round = 0; round < 2 && !bad; round++) {
		for (int k = 0; k < GROUP_BUFS; k++) {
			for (int i = 0; i < GROUP_COUNT; i++)
				h[i] = r + k + i + round;
			if (cuda_bad(cudaMemcpy(buf[k], h, sizeof h, cudaMemcpyHostToDevice), r,
				     "cudaMemcpy"))
				return th_bail(c);
		}
		if (op_bad(c, comm_group_start(c), r, "group start"))
			return th_bail(c);
		for (int k = 0; k < GROUP_BUFS; k++)
			if (op_bad(c, comm_allreduce(c, buf[k], buf[k], GROUP_COUNT, COMM_INT32,
						     COMM_SUM, NULL),
				   r, "posting in the group"))
				return th_bail(c);
		if (op_bad(c, comm_group_end(c), r, "group end"))
			return th_bail(c);
		for (int k = 0; k < GROUP_BUFS && !bad; k++) {
			if (cuda_bad(cudaMemcpy(h, buf[k], sizeof h, cudaMemcpyDeviceToHost), r,
				     "copy back"))
				return th_bail(c);
			for (int i = 0; i < GROUP_COUNT; i++) {
				int32_t want = n * (n - 1) / 2 + n * (k + i + round);

				if (h[i] != want) {
					bad = FAIL(r, "round %d buffer %d: element %d is %d, expected %d",
						   round, k, i, h[i], want);
					break;
				}
			}
		}
	}
	bad |= th_leave(c, r);
	for (int k = 0; k < GROUP_BUFS; k++)
		cudaFree(buf[k]);
	return bad;
}

/* --- comm_stream_wait without the host ---------------------------------------- */

#define NOWAIT_COUNT 4096
#define NOWAIT_LIMIT_MS 20000   /* a rank waiting longer than this has hung */

static int go[2];               /* rank 0 tells rank 1 to post: a pipe */

/* Rank 1: wait for rank 0's byte; 1 when it never came. */
static int wait_go(void)
{
	struct pollfd pf = { go[0], POLLIN, 0 };
	char b;

	return poll(&pf, 1, NOWAIT_LIMIT_MS) != 1 || read(go[0], &b, 1) != 1;
}

/* Wait for stream s to go idle, polling comm_async_error; the stream's last answer. */
static cudaError_t stream_idle(comm_t *c, cudaStream_t s, comm_result_t *async)
{
	cudaError_t e = cudaErrorNotReady;

	for (int ms = 0; ms < NOWAIT_LIMIT_MS && e == cudaErrorNotReady; ms++) {
		*async = comm_async_error(c);
		e = cudaStreamQuery(s);
		if (e == cudaErrorNotReady)
			usleep(1000);
	}
	return e;
}

/*
 * Rank 0 posts an all-reduce with a request, hands it to its stream with
 * comm_stream_wait and enqueues a copy of the result behind it; only then
 * does it let rank 1 post. Were comm_stream_wait to wait on the host, rank
 * 1 would never post and rank 0 would hang. Then the same with rank 1
 * posting a different count: the op fails, rank 0's stream is let go and
 * comm_async_error says MISMATCH.
 */
static int rank_nowait(int r, int n, void *arg)
{
	size_t bytes = NOWAIT_COUNT * sizeof(int32_t);
	int32_t *buf = NULL, *h = NULL;
	comm_request_t *req = NULL;
	comm_result_t rc, async = COMM_OK;
	cudaStream_t s = NULL;
	comm_t *c;
	int bad = 0;

	/* pinned: a copy into pageable memory would hold the host until the stream ran */
	if (use_device(r) || cuda_bad(cudaMallocHost((void **)&h, bytes), r, "cudaMallocHost") ||
	    cuda_bad(cudaMalloc((void **)&buf, bytes), r, "cudaMalloc") ||
	    cuda_bad(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), r, "cudaStreamCreate"))
		return 1;
	for (int i = 0; i < NOWAIT_COUNT; i++)
		h[i] = (r + 1) * i;
	if (cuda_bad(cudaMemcpy(buf, h, bytes, cudaMemcpyHostToDevice), r, "cudaMemcpy") ||
	    th_join(&c, r, n) < 0)
		return 1;
	if (r == 1) {
		if (wait_go())
			return FAIL(r, "rank 0 never let rank 1 post: comm_stream_wait blocked");
		rc = comm_allreduce(c, buf, buf, NOWAIT_COUNT, COMM_INT32, COMM_SUM, NULL);
		if (op_bad(c, rc, r, "all-reduce"))
			return th_bail(c);
		if (wait_go())
			return FAIL(r, "rank 0 never let rank 1 post the mismatched op");
		rc = comm_allreduce(c, buf, buf, NOWAIT_COUNT - 1, COMM_INT32, COMM_SUM, NULL);
		if (rc != COMM_ERR_MISMATCH)
			bad |= FAIL(r, "mismatched all-reduce: %s, expected MISMATCH",
				    comm_result_name(rc));
		comm_finalize(c);
		return bad;
	}
	rc = comm_allreduce(c, buf, buf, NOWAIT_COUNT, COMM_INT32, COMM_SUM, &req);
	if (rc == COMM_OK)
		rc = comm_stream_wait(req, s);
	if (op_bad(c, rc, r, "comm_stream_wait") ||
	    cuda_bad(cudaMemcpyAsync(h, buf, bytes, cudaMemcpyDeviceToHost, s), r, "copy back"))
		return th_bail(c);
	if (cudaStreamQuery(s) != cudaErrorNotReady)
		bad |= FAIL(r, "the stream ran on before rank 1 posted the op");
	if (write(go[1], "g", 1) != 1)
		return FAIL(r, "pipe");
	if (cuda_bad(stream_idle(c, s, &async), r, "the stream behind the op"))
		return th_bail(c);
	for (int i = 0; i < NOWAIT_COUNT && !bad; i++)
		if (h[i] != 3 * i)
			bad |= FAIL(r, "element %d is %d, expected %d", i, h[i], 3 * i);
	if (async != COMM_OK)
		bad |= FAIL(r, "comm_async_error: %s", comm_result_name(async));

	/* a failing op lets the stream go, and comm_async_error tells */
	rc = comm_allreduce(c, buf, buf, NOWAIT_COUNT, COMM_INT32, COMM_SUM, &req);
	if (rc == COMM_OK)
		rc = comm_stream_wait(req, s);
	if (op_bad(c, rc, r, "comm_stream_wait on the mismatched op"))
		return th_bail(c);
	if (write(go[1], "g", 1) != 1)
		return FAIL(r, "pipe");
	if (stream_idle(c, s, &async) != cudaSuccess)
		bad |= FAIL(r, "the stream behind the failed op was never let go");
	if (async != COMM_ERR_MISMATCH || !strstr(comm_last_error(c), "count"))
		bad |= FAIL(r, "comm_async_error after the failed op: %s (%s), expected MISMATCH",
			    comm_result_name(async), comm_last_error(c));
	if (comm_async_error(c) != async)
		bad |= FAIL(r, "comm_async_error did not stay");
	comm_finalize(c);
	cudaStreamDestroy(s);
	cudaFree(buf);
	cudaFreeHost(h);
	return bad;
}

/* --- main -------------------------------------------------------------------- */

static void run(const char *job, int n, th_rank_fn fn, const char *what)
{
	struct timespec t0;
	int failed;

	clock_gettime(CLOCK_MONOTONIC, &t0);
	failed = th_run_ranks(&d, job, n, fn, NULL);
	CHECK(failed == 0, "%s: %d of %d ranks failed", what, failed, n);
	printf("%s: %s, n=%d, %.1f s\n", failed ? "FAIL" : "ok", what, n, th_secs_since(&t0));
}

/* --- a chain of ops through one stream ---------------------------------------- */

#define CHAIN_OPS 8
#define CHAIN_COUNT (1 << 18)

/*
 * CHAIN_OPS all-reduces in place on one buffer, each posted with a request
 * and handed to the comm's stream: every op after the first follows the
 * stream's wait for the one before (its ready event waits for that flag),
 * while commd queues it on the worker right behind that one: a flag written
 * behind the next op would hold both forever. The buffer starts at 1: it
 * ends at n^CHAIN_OPS.
 */
static int rank_chain(int r, int n, void *arg)
{
	size_t bytes = CHAIN_COUNT * sizeof(int32_t);
	int32_t *buf = NULL, *h = malloc(bytes), want = 1;
	cudaStream_t s = NULL;
	comm_request_t *req;
	comm_result_t rc = COMM_OK, async = COMM_OK;
	comm_t *c;
	int bad = 0;

	for (int i = 0; i < CHAIN_OPS; i++)
		want *= n;
	for (size_t i = 0; h && i < CHAIN_COUNT; i++)
		h[i] = 1;
	if (!h || use_device(r) ||
	    cuda_bad(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), r, "cudaStreamCreate") ||
	    cuda_bad(cudaMalloc((void **)&buf, bytes), r, "cudaMalloc") ||
	    cuda_bad(cudaMemcpy(buf, h, bytes, cudaMemcpyHostToDevice), r, "cudaMemcpy") ||
	    th_join(&c, r, n) < 0)
		return 1;
	if (op_bad(c, comm_set_stream(c, s), r, "comm_set_stream"))
		return th_bail(c);
	for (int i = 0; i < CHAIN_OPS && rc == COMM_OK; i++) {
		rc = comm_allreduce(c, buf, buf, CHAIN_COUNT, COMM_INT32, COMM_SUM, &req);
		if (rc == COMM_OK)
			rc = comm_stream_wait(req, s);
	}
	if (op_bad(c, rc, r, "chained all-reduce") ||
	    cuda_bad(cudaMemcpyAsync(h, buf, bytes, cudaMemcpyDeviceToHost, s), r, "copy back"))
		return th_bail(c);
	if (stream_idle(c, s, &async) == cudaErrorNotReady)
		return FAIL(r, "the stream never went on after the chain (a flag that waits "
			       "for the op after it?)");
	if (cuda_bad(cudaStreamSynchronize(s), r, "cudaStreamSynchronize"))
		return th_bail(c);
	if (async != COMM_OK)
		bad = FAIL(r, "chain: comm_async_error says %s", comm_result_name(async));
	for (size_t i = 0; i < CHAIN_COUNT; i++)
		if (h[i] != want) {
			bad = FAIL(r, "chain: element %zu is %d, expected %d", i, h[i], want);
			break;
		}
	comm_set_stream(c, NULL);
	bad |= th_leave(c, r);
	cudaFree(buf);
	cudaStreamDestroy(s);
	free(h);
	return bad;
}

/* --- split communicators on device memory --------------------------------- */

#define SPLIT_COUNT (1 << 20)

/* An int32 sum over c of (v + i % 5) at element i, from device memory: want + n_c * (i % 5). */
static int split_sum(comm_t *c, int r, int32_t *buf, int32_t *h, int32_t v, int32_t want,
		     const char *what)
{
	size_t bytes = SPLIT_COUNT * sizeof *h;
	int n = comm_size(c);

	for (size_t i = 0; i < SPLIT_COUNT; i++)
		h[i] = v + (int32_t)(i % 5);
	if (cuda_bad(cudaMemcpy(buf, h, bytes, cudaMemcpyHostToDevice), r, "cudaMemcpy") ||
	    op_bad(c, comm_allreduce(c, buf, buf, SPLIT_COUNT, COMM_INT32, COMM_SUM, NULL), r,
		   what) ||
	    cuda_bad(cudaMemcpy(h, buf, bytes, cudaMemcpyDeviceToHost), r, "cudaMemcpy back"))
		return 1;
	for (size_t i = 0; i < SPLIT_COUNT; i++)
		if (h[i] != want + n * (int32_t)(i % 5))
			return FAIL(r, "%s: element %zu is %d, expected %d", what, i, h[i],
				    want + n * (int32_t)(i % 5));
	return 0;
}

/*
 * comm_split by parity of a job on device memory: each child is a job of
 * its own, with its own GPU worker; sums on the children and the parent in
 * turn, one device buffer for all of them.
 */
static int rank_split(int r, int n, void *arg)
{
	int32_t *buf = NULL, *h = malloc(SPLIT_COUNT * sizeof *h), odd = 0, even = 0;
	comm_t *c, *ch = NULL;
	comm_result_t rc;
	int bad;

	(void)arg;
	for (int p = 0; p < n; p++)
		*(p % 2 ? &odd : &even) += p + 1;
	if (!h || use_device(r) ||
	    cuda_bad(cudaMalloc((void **)&buf, SPLIT_COUNT * sizeof *h), r, "cudaMalloc") ||
	    th_join(&c, r, n) < 0)
		return 1;
	if ((rc = comm_split(c, r % 2, r, &ch)) != COMM_OK)
		return op_bad(c, rc, r, "comm_split") | th_bail(c);
	bad = split_sum(ch, r, buf, h, r + 1, r % 2 ? odd : even, "sum on the child") ||
	      split_sum(c, r, buf, h, r + 1, n * (n + 1) / 2, "sum on the parent") ||
	      split_sum(ch, r, buf, h, 2 * (r + 1), 2 * (r % 2 ? odd : even),
			"sum on the child again");
	if (bad)
		return th_bail(ch) | th_bail(c);
	bad = th_leave(ch, r) | th_leave(c, r);
	cudaFree(buf);
	free(h);
	return bad;
}

/*
 * comm_alltoallv on device memory, 4 ranks: rank i sends (i + j) % 3 x
 * A2AV_UNIT int32 to rank j (none where that is 0), blocking, then again
 * with a request handed to the stream (comm_stream_wait); every element
 * and the gaps between blocks checked on the host.
 */
#define A2AV_UNIT 100003

static int rank_alltoallv(int r, int n, void *arg)
{
	size_t sc[8], sd[8], rc_[8], rd[8], slen = 0, rlen = 0;
	int32_t *sbuf = NULL, *rbuf = NULL, *hs, *hr;
	comm_request_t *req;
	comm_result_t rc;
	comm_t *c;
	int bad = 0;

	(void)arg;
	for (int j = 0; j < n; j++) {
		sc[j] = (size_t)((r + j) % 3) * A2AV_UNIT;
		rc_[j] = (size_t)((j + r) % 3) * A2AV_UNIT;
		sd[j] = slen;
		rd[j] = rlen;
		slen += sc[j] + 1;
		rlen += rc_[j] + 1;
	}
	hs = malloc(slen * sizeof *hs);
	hr = malloc(rlen * sizeof *hr);
	if (!hs || !hr || use_device(r) ||
	    cuda_bad(cudaMalloc((void **)&sbuf, slen * sizeof *hs), r, "cudaMalloc") ||
	    cuda_bad(cudaMalloc((void **)&rbuf, rlen * sizeof *hr), r, "cudaMalloc") ||
	    th_join(&c, r, n) < 0)
		return 1;
	for (size_t e = 0; e < slen; e++)
		hs[e] = -1;
	for (int j = 0; j < n; j++)
		for (size_t e = 0; e < sc[j]; e++)
			hs[sd[j] + e] = (int32_t)(r * 1000000 + j * 100000) + (int32_t)(e % 99991);
	for (int round = 0; round < 2 && !bad; round++) {
		if (cuda_bad(cudaMemcpy(sbuf, hs, slen * sizeof *hs, cudaMemcpyHostToDevice), r,
			     "cudaMemcpy") ||
		    cuda_bad(cudaMemset(rbuf, 0x7f, rlen * sizeof *hr), r, "cudaMemset"))
			return th_bail(c);
		if (round == 0) {
			rc = comm_alltoallv(c, sbuf, sc, sd, rbuf, rc_, rd, COMM_INT32, NULL);
		} else {
			rc = comm_alltoallv(c, sbuf, sc, sd, rbuf, rc_, rd, COMM_INT32, &req);
			if (rc == COMM_OK)
				rc = comm_stream_wait(req, NULL);
		}
		if (op_bad(c, rc, r, round ? "alltoallv, handed to the stream" : "alltoallv"))
			return th_bail(c);
		if (cuda_bad(cudaMemcpy(hr, rbuf, rlen * sizeof *hr, cudaMemcpyDeviceToHost), r,
			     "cudaMemcpy back"))
			return th_bail(c);
		for (int i = 0; i < n && !bad; i++) {
			for (size_t e = 0; e < rc_[i] && !bad; e++)
				if (hr[rd[i] + e] != (int32_t)(i * 1000000 + r * 100000) +
							    (int32_t)(e % 99991))
					bad = FAIL(r, "round %d: element %zu from rank %d: %d", round,
						   e, i, hr[rd[i] + e]);
			if (!bad && hr[rd[i] + rc_[i]] != 0x7f7f7f7f)
				bad = FAIL(r, "round %d: the gap after rank %d's block was written",
					   round, i);
		}
	}
	if (bad)
		return th_bail(c);
	bad = th_leave(c, r);
	cudaFree(sbuf);
	cudaFree(rbuf);
	free(hs);
	free(hr);
	return bad;
}

int main(void)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	ndev = count_devices();
	if (ndev < 1)
		return 77;
	setenv("COMM_TIMEOUT", "60000", 1);
	REQUIRE(th_daemon_start(&d, NULL) == 0, "commd did not start");
	run("gpu-stream", 2, rank_stream,
	    "stream order: an op follows a memset held back on its stream (legacy and own "
	    "stream, comm_stream_wait)");
	run("gpu-recv-stream", 2, rank_recv_stream,
	    "stream order: a recv on one daemon follows a memset held back on the receiver's "
	    "stream");
	REQUIRE(pipe(go) == 0, "pipe");
	run("gpu-nowait", 2, rank_nowait,
	    "comm_stream_wait returns before the op can run; the stream waits, then sees the "
	    "result; a failed op lets the stream go and comm_async_error says MISMATCH");
	run("gpu-chain", 2, rank_chain,
	    "8 all-reduces in place, each handed to the stream the next one follows");
	run("gpu-realloc", 2, rank_realloc,
	    "cudaFree and cudaMalloc between ops: right results, bounded registered memory");
	run("gpu-vmm", 2, rank_vmm,
	    "cuMemCreate memory: two chunks of one range, a chunk remade, an unshareable one");
	run("gpu-kinds", 2, rank_kinds,
	    "host/device mix and overrun refused; managed and pinned memory staged");
	run("gpu-outstanding", 4, rank_outstanding,
	    "48 outstanding sums, device and host mixed, waited and polled, 3 rounds");
	run("gpu-group-many", 2, rank_group_many,
	    "a group of 80 all-reduces on 80 cudaMalloc buffers (past the 64 kept registered), "
	    "twice, exact");
	run("gpu-split", 4, rank_split,
	    "comm_split by parity on device memory: sums on each child (a GPU worker each) and "
	    "the parent in turn, exact");
	run("gpu-alltoallv", 4, rank_alltoallv,
	    "comm_alltoallv on device memory, uneven blocks (some empty), blocking and handed to "
	    "the stream, every element and gap checked");
	CHECK(th_daemon_alive(&d), "commd died during the tests");
	CHECK(th_daemon_stop(&d) == 0, "commd did not stop cleanly");
	return CHECK_EXIT();
}
