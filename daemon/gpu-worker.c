/*
 * gpu-worker.c: commd-gpu, one job's GPU worker. It serves commd on fd 3
 * (common/gpu-proto.h): opens the ranks' device memory and runs their ops,
 * with its own kernels on one device, NCCL across several, and (a job over
 * several daemons) NCCL across the nodes' workers, one NCCL rank per node.
 * It owns every CUDA and NCCL object of the job, so a GPU fault ends this
 * process only.
 */
#include <config.h>

#include <errno.h>
#include <inttypes.h>
#include <sched.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <signal.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>
#include <nccl.h>

#include "comm.h"
#include "commd.pb-c.h"
#include "dtype.h"
#include "gpu-kernels.h"
#include "gpu-proto.h"
#include "gpu-result.h"
#include "gpu-worker.h"
#include "util.h"

#define T(x) COMMPB__OP_TYPE__OP_##x
#define MAX_DEVICES 64       /* devices one worker serves; any beyond are not used */
#define MAX_FDS 4            /* fds a packet may carry (a VMM open has one) */
#define NCCL_WAIT_MS 60000   /* an NCCL call still in progress after this has hung */
#define POLL_NS 20000        /* between looks at a stream that NCCL work is on */
#define SPIN_US 200          /* after an op, how long the next is looked for before sleeping */
#define MAX_QUEUED 64        /* ops on the streams not answered yet, at most */
#define QUEUED_SPIN_US 3     /* with ops queued: how long the oldest is watched between looks at the socket */
#define SCRATCH_ROUND (2u << 20)

_Static_assert(sizeof(cudaIpcMemHandle_t) == GPU_HANDLE_BYTES, "IPC memory handle size");
_Static_assert(sizeof(cudaIpcEventHandle_t) == GPU_HANDLE_BYTES, "IPC event handle size");
_Static_assert(sizeof(ncclUniqueId) == GPU_NCCL_ID_BYTES, "NCCL id size");
_Static_assert(sizeof(struct gpu_world) + GPU_WORLD_MAX_RANKS * sizeof(uint16_t) <= GPU_MSG_MAX,
	       "a WORLD message fits a packet");

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

static struct {
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
} w;

/* Driver functions, reached through the runtime: the worker never links libcuda. */
static struct {
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
} drv;

/* --- messages and errors ---------------------------------------------------- */

static void wlog(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void wlog(const char *fmt, ...)
{
	char line[1024];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(line, sizeof line, fmt, ap);
	va_end(ap);
	if (w.job[0])
		fprintf(stderr, "commd-gpu[job %s]: %s\n", w.job, line);
	else
		fprintf(stderr, "commd-gpu: %s\n", line);
}

static _Noreturn void malformed(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static _Noreturn void malformed(const char *fmt, ...)
{
	char why[256];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(why, sizeof why, fmt, ap);
	va_end(ap);
	wlog("malformed packet from commd: %s", why);
	exit(GPU_WORKER_EXIT_PROTOCOL);
}

/* Keep the first failure of the current request as its detail, and code what it stands for. */
static void vfail_as(comm_result_t code, const char *fmt, va_list ap)
	__attribute__((format(printf, 2, 0)));
static void vfail_as(comm_result_t code, const char *fmt, va_list ap)
{
	if (w.err[0])
		return;
	vsnprintf(w.err, sizeof w.err, fmt, ap);
	w.err_code = code;
}

static void fail_as(comm_result_t code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void fail_as(comm_result_t code, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vfail_as(code, fmt, ap);
	va_end(ap);
}

/* fail_as for what the request got wrong (COMM_ERR_INVALID_ARG). */
static void fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void fail(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vfail_as(COMM_ERR_INVALID_ARG, fmt, ap);
	va_end(ap);
}

/*
 * 0 when e is cudaSuccess; else -1 with the failure kept. The runtime's
 * last error is cleared so that a handled failure does not resurface at the
 * next kernel launch (a sticky one comes back from every call anyway).
 */
static int cuda_check(cudaError_t e, const char *call)
{
	if (e == cudaSuccess)
		return 0;
	(void)cudaGetLastError();
	fail_as(gpu_cuda_result(e), "%s: %s", call, cudaGetErrorString(e));
	return -1;
}

static int cu_check(CUresult r, const char *call)
{
	const char *s = NULL;

	if (r == CUDA_SUCCESS)
		return 0;
	if (drv.error_string(r, &s) != CUDA_SUCCESS || !s)
		s = "unknown driver error";
	fail_as(gpu_cu_result(r), "%s: %s (%d)", call, s, (int)r);
	return -1;
}

/* ncclInProgress is fine: the communicators are nonblocking. */
static int nccl_check(ncclResult_t r, const char *call)
{
	if (r == ncclSuccess || r == ncclInProgress)
		return 0;
	fail("%s: %s (%s)", call, ncclGetErrorString(r), ncclGetLastError(NULL));
	return -1;
}

/* Send a status (or one that starts with one), filled in; exits when the socket fails. */
static void send_status(struct gpu_status *s, size_t len, uint32_t type, uint64_t id,
			comm_result_t status, const char *detail)
{
	ssize_t n;

	s->h.type = type;
	s->h.version = GPU_PROTO_VERSION;
	s->id = id;
	s->status = status;
	snprintf(s->detail, sizeof s->detail, "%s", status == COMM_OK ? "" : detail);
	do
		n = send(GPU_WORKER_FD, s, len, MSG_NOSIGNAL);
	while (n < 0 && errno == EINTR);
	if (n != (ssize_t)len) {
		wlog("send on fd %d: %s", GPU_WORKER_FD, n < 0 ? strerror(errno) : "short");
		exit(GPU_WORKER_EXIT_PROTOCOL);
	}
}

static void reply(uint32_t type, uint64_t id, comm_result_t status, const char *detail)
{
	struct gpu_status s;

	memset(&s, 0, sizeof s);
	send_status(&s, sizeof s, type, id, status, detail);
}

/* --- devices -------------------------------------------------------------------- */

static void versions(char *out, size_t len)
{
	int rt = 0, drvv = 0, nccl = 0;

	cudaRuntimeGetVersion(&rt);
	cudaDriverGetVersion(&drvv);
	ncclGetVersion(&nccl);
	if (drvv)
		snprintf(out, len, "cuda runtime %d, driver %d, nccl %d.%d.%d", rt, drvv,
			 nccl / 10000, nccl / 100 % 100, nccl % 100);
	else
		snprintf(out, len, "cuda runtime %d, nccl %d.%d.%d", rt, nccl / 10000,
			 nccl / 100 % 100, nccl % 100);
}

/* The number of devices (at most MAX_DEVICES), or 0 with why there is none. */
static int gpu_count(char *why, size_t len)
{
	char v[128];
	int n = 0;
	cudaError_t e = cudaGetDeviceCount(&n);

	if (e == cudaSuccess && n > 0)
		return n < MAX_DEVICES ? n : MAX_DEVICES;
	versions(v, sizeof v);
	snprintf(why, len, "cudaGetDeviceCount: %s (%s)",
		 e == cudaSuccess ? "no CUDA device" : cudaGetErrorString(e), v);
	return 0;
}

static int drv_load(char *why, size_t len)
{
	const struct {
		const char *name;
		void **fn;
	} syms[] = {
		{ "cuGetErrorString", (void **)&drv.error_string },
		{ "cuMemGetAddressRange", (void **)&drv.address_range },
		{ "cuMemImportFromShareableHandle", (void **)&drv.import },
		{ "cuMemAddressReserve", (void **)&drv.reserve },
		{ "cuMemMap", (void **)&drv.map },
		{ "cuMemSetAccess", (void **)&drv.set_access },
		{ "cuMemUnmap", (void **)&drv.unmap },
		{ "cuMemAddressFree", (void **)&drv.address_free },
		{ "cuMemRelease", (void **)&drv.release },
		{ "cuStreamWriteValue32", (void **)&drv.write_value },
	};

	for (size_t i = 0; i < ARRAY_SIZE(syms); i++) {
		enum cudaDriverEntryPointQueryResult q = cudaDriverEntryPointSymbolNotFound;
		cudaError_t e = cudaGetDriverEntryPointByVersion(syms[i].name, syms[i].fn, 12000,
								 cudaEnableDefault, &q);

		if (e != cudaSuccess || q != cudaDriverEntryPointSuccess || !*syms[i].fn) {
			snprintf(why, len, "cudaGetDriverEntryPointByVersion: %s: %s (result %d)",
				 syms[i].name, cudaGetErrorString(e), (int)q);
			return -1;
		}
	}
	return 0;
}

/* Find the devices, their UUIDs and the driver functions; -1 with why. */
static int gpu_open(char *why, size_t len)
{
	w.ndev = gpu_count(why, len);
	if (!w.ndev || drv_load(why, len))
		return -1;
	for (int d = 0; d < w.ndev; d++) {
		struct cudaDeviceProp prop;
		cudaError_t e = cudaGetDeviceProperties(&prop, d);

		if (e != cudaSuccess) {
			snprintf(why, len, "cudaGetDeviceProperties: device %d: %s", d,
				 cudaGetErrorString(e));
			return -1;
		}
		gpu_uuid_format((const unsigned char *)prop.uuid.bytes, w.dev[d].uuid);
	}
	return 0;
}

static int dev_find(const char *uuid)
{
	for (int d = 0; d < w.ndev; d++)
		if (strcmp(w.dev[d].uuid, uuid) == 0)
			return d;
	return -1;
}

/* The device's stream and mark, made on first use. */
static int dev_ready(int d)
{
	struct dev *x = &w.dev[d];

	if (x->ready)
		return 0;
	if (cuda_check(cudaSetDevice(d), "cudaSetDevice") ||
	    cuda_check(cudaStreamCreateWithFlags(&x->stream, cudaStreamNonBlocking),
		       "cudaStreamCreateWithFlags"))
		return -1;
	if (cuda_check(cudaStreamCreateWithFlags(&x->flags, cudaStreamNonBlocking),
		       "cudaStreamCreateWithFlags")) {
		cudaStreamDestroy(x->stream);
		return -1;
	}
	if (cuda_check(cudaEventCreateWithFlags(&x->mark, cudaEventDisableTiming),
		       "cudaEventCreateWithFlags")) {
		cudaStreamDestroy(x->flags);
		cudaStreamDestroy(x->stream);
		return -1;
	}
	x->ready = 1;
	return 0;
}

/*
 * At least len bytes of scratch on device d, after the ops queued there
 * (they may use the old). Out of device memory, the op fails NO_MEMORY
 * and the worker goes on: nothing of the op has touched an output yet,
 * and the old scratch is freed, so a smaller op still finds room.
 */
static int scratch(int d, size_t len)
{
	struct dev *x = &w.dev[d];
	cudaError_t e;
	void *p = NULL;

	if (len <= x->scratch_len)
		return 0;
	len = (len + SCRATCH_ROUND - 1) / SCRATCH_ROUND * SCRATCH_ROUND;
	if (cuda_check(cudaSetDevice(d), "cudaSetDevice") ||
	    cuda_check(cudaStreamSynchronize(x->stream), "cudaStreamSynchronize") ||
	    cuda_check(cudaFree(x->scratch), "cudaFree"))
		return -1;
	x->scratch = NULL;
	x->scratch_len = 0;
	e = cudaMalloc(&p, len);
	if (e == cudaErrorMemoryAllocation) {
		(void)cudaGetLastError();
		w.scratch_short = 1;
		fail_as(COMM_ERR_NO_MEMORY, "device %d has no room for %zu bytes of scratch", d, len);
		return -1;
	}
	if (cuda_check(e, "cudaMalloc (scratch)"))
		return -1;
	x->scratch = p;
	x->scratch_len = len;
	return 0;
}

/* --- memory ----------------------------------------------------------------------- */

static struct mem *mem_find(uint64_t id)
{
	for (size_t i = 0; i < w.nmem; i++)
		if (w.mem[i].id == id)
			return &w.mem[i];
	return NULL;
}

static int mem_open_ipc(struct mem *x)
{
	cudaIpcMemHandle_t h;
	CUdeviceptr base = 0;
	size_t len = 0;
	void *p = NULL;
	int opened = 0, rc = -1;

	/* a process maps a handle once: ids opened from one handle share the mapping */
	for (size_t i = 0; i < w.nmem && !p; i++)
		if (w.mem[i].kind == GPU_MEM_IPC && w.mem[i].dev == x->dev &&
		    memcmp(w.mem[i].handle, x->handle, sizeof x->handle) == 0)
			p = w.mem[i].ptr;
	memcpy(&h, x->handle, sizeof h);
	if (cuda_check(cudaSetDevice(x->dev), "cudaSetDevice"))
		goto out;
	if (!p) {
		if (cuda_check(cudaIpcOpenMemHandle(&p, h, cudaIpcMemLazyEnablePeerAccess),
			       "cudaIpcOpenMemHandle"))
			goto out;
		opened = 1;
	}
	if (cu_check(drv.address_range(&base, &len, (CUdeviceptr)(uintptr_t)p),
		     "cuMemGetAddressRange"))
		goto out;
	if (x->size > len) {
		fail("the allocation is %zu bytes, not %zu", len, x->size);
		goto out;
	}
	x->ptr = p;
	rc = 0;
out:
	if (rc && opened)
		cudaIpcCloseMemHandle(p);
	return rc;
}

static int mem_open_vmm(struct mem *x, int fd)
{
	CUmemAccessDesc acc[MAX_DEVICES];
	CUdeviceptr va = 0;
	int nacc = 0, imported = 0, mapped = 0, rc = -1;

	if (cuda_check(cudaSetDevice(x->dev), "cudaSetDevice") ||
	    cu_check(drv.import(&x->vmm, (void *)(uintptr_t)fd,
				CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR),
		     "cuMemImportFromShareableHandle"))
		goto out;
	imported = 1;
	if (cu_check(drv.reserve(&va, x->size, 0, 0, 0), "cuMemAddressReserve"))
		goto out;
	if (cu_check(drv.map(va, x->size, 0, x->vmm, 0), "cuMemMap"))
		goto out;
	mapped = 1;
	/* every device that can reach it, so that copies and NCCL may run on any */
	for (int d = 0; d < w.ndev; d++) {
		int can = d == x->dev;

		if (!can && cudaDeviceCanAccessPeer(&can, d, x->dev) != cudaSuccess) {
			(void)cudaGetLastError();
			can = 0;
		}
		if (can)
			acc[nacc++] = (CUmemAccessDesc){
				.location = { .type = CU_MEM_LOCATION_TYPE_DEVICE, .id = d },
				.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
			};
	}
	if (cu_check(drv.set_access(va, x->size, acc, (size_t)nacc), "cuMemSetAccess"))
		goto out;
	x->ptr = (uint8_t *)(uintptr_t)va;
	rc = 0;
out:
	if (rc && mapped)
		drv.unmap(va, x->size);
	if (rc && va)
		drv.address_free(va, x->size);
	if (rc && imported)
		drv.release(x->vmm);
	return rc;
}

static void mem_release(const struct mem *x);

/*
 * Map commd's staging buffer and pin it, so that copies to and from it are
 * DMA that does not hold up the stream; unpinned it still works, slower.
 */
static int mem_open_host(struct mem *x, int fd)
{
	void *p = mmap(NULL, x->size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	cudaError_t e;

	if (p == MAP_FAILED) {
		/* commd's memfd: no fault of the rank's */
		fail_as(errno == ENOMEM ? COMM_ERR_NO_MEMORY : COMM_ERR_INTERNAL,
			"mmap of %zu bytes: %s", x->size, strerror(errno));
		return -1;
	}
	x->ptr = p;
	e = cudaHostRegister(p, x->size, cudaHostRegisterPortable);
	x->pinned = e == cudaSuccess;
	if (!x->pinned) {
		(void)cudaGetLastError();
		wlog("staging buffer of %zu bytes not pinned (%s): copies are slower",
		     x->size, cudaGetErrorString(e));
	}
	return 0;
}

/* Open m (fd: its VMM allocation or host memory, or -1) into the table; the detail says why not. */
static comm_result_t mem_open(const struct gpu_mem_open *m, int fd)
{
	struct mem x = { .id = m->id, .kind = m->kind, .rank = m->rank, .size = m->size };
	char uuid[GPU_UUID_LEN];
	int rc;

	memcpy(uuid, m->uuid, sizeof uuid);
	uuid[sizeof uuid - 1] = '\0';
	memcpy(x.handle, m->handle, sizeof x.handle);
	if (mem_find(m->id)) {
		fail("mem %" PRIu64 " is open already", m->id);
		return COMM_ERR_INVALID_ARG;
	}
	x.dev = m->kind == GPU_MEM_HOST ? -1 : dev_find(uuid);
	if (x.dev < 0 && m->kind != GPU_MEM_HOST) {
		fail("no device %s on this node", uuid);
		return COMM_ERR_NOT_FOUND;
	}
	if (m->size == 0 || m->size > SIZE_MAX / 2) {
		fail("size %" PRIu64 " is out of range", m->size);
		return COMM_ERR_INVALID_ARG;
	}
	if (m->kind == GPU_MEM_IPC) {
		rc = mem_open_ipc(&x);
	} else if (m->kind == GPU_MEM_VMM) {
		if (fd < 0)
			fail("a VMM allocation comes with its fd, this one has none");
		rc = fd < 0 ? -1 : mem_open_vmm(&x, fd);
	} else if (m->kind == GPU_MEM_HOST) {
		if (fd < 0)
			fail("host memory comes with its memfd, this one has none");
		rc = fd < 0 ? -1 : mem_open_host(&x, fd);
	} else {
		fail("unknown memory kind %u", m->kind);
		rc = -1;
	}
	if (rc) /* out of memory is NO_MEMORY, a driver failing INTERNAL (gpu-result.h) */
		return w.err[0] ? w.err_code : COMM_ERR_INTERNAL;
	if (w.nmem == w.mem_cap) {
		size_t cap = w.mem_cap ? 2 * w.mem_cap : 64;
		struct mem *grown = realloc(w.mem, cap * sizeof *grown);

		if (!grown) {
			mem_release(&x); /* clears w.err: the reason comes after */
			fail("out of memory");
			return COMM_ERR_NO_MEMORY;
		}
		w.mem = grown;
		w.mem_cap = cap;
	}
	w.mem[w.nmem++] = x;
	return COMM_OK;
}

/* Unmap x, which is no longer in the table; failures are logged. */
static void mem_release(const struct mem *x)
{
	w.err[0] = '\0';
	if (x->kind == GPU_MEM_HOST) {
		if (x->pinned)
			cuda_check(cudaHostUnregister(x->ptr), "cudaHostUnregister");
		munmap(x->ptr, x->size);
	} else if (x->kind == GPU_MEM_IPC) {
		for (size_t i = 0; i < w.nmem; i++)
			if (w.mem[i].ptr == x->ptr)
				return; /* another id still uses the mapping */
		if (!cuda_check(cudaSetDevice(x->dev), "cudaSetDevice"))
			cuda_check(cudaIpcCloseMemHandle(x->ptr), "cudaIpcCloseMemHandle");
	} else {
		CUdeviceptr va = (CUdeviceptr)(uintptr_t)x->ptr;

		cu_check(drv.unmap(va, x->size), "cuMemUnmap");
		cu_check(drv.address_free(va, x->size), "cuMemAddressFree");
		cu_check(drv.release(x->vmm), "cuMemRelease");
	}
	if (w.err[0])
		wlog("mem close: mem %" PRIu64 " of rank %d: %s", x->id, x->rank, w.err);
}

/*
 * The client's event behind handle, opened (on the device of the rank that
 * recorded it) once and kept while the worker lives; NULL on failure.
 */
static cudaEvent_t event_open(const uint8_t *handle, int dev)
{
	cudaIpcEventHandle_t h;
	cudaEvent_t ev;

	for (size_t i = 0; i < w.nev; i++)
		if (memcmp(w.ev[i].handle, handle, GPU_HANDLE_BYTES) == 0)
			return w.ev[i].ev;
	if (w.nev == w.ev_cap) {
		size_t cap = w.ev_cap ? 2 * w.ev_cap : 16;
		struct ipc_event *grown = realloc(w.ev, cap * sizeof *grown);

		if (!grown) {
			fail("out of memory");
			return NULL;
		}
		w.ev = grown;
		w.ev_cap = cap;
	}
	memcpy(&h, handle, sizeof h);
	if (cuda_check(cudaSetDevice(dev), "cudaSetDevice") ||
	    cuda_check(cudaIpcOpenEventHandle(&ev, h), "cudaIpcOpenEventHandle"))
		return NULL;
	memcpy(w.ev[w.nev].handle, handle, GPU_HANDLE_BYTES);
	w.ev[w.nev++].ev = ev;
	return ev;
}

/* --- NCCL ------------------------------------------------------------------------- */

/* -1 when comm failed (the detail says how), 1 while it is busy, else 0. */
static int comm_state(ncclComm_t comm, int dev, const char *what)
{
	ncclResult_t st = ncclSuccess, r = ncclCommGetAsyncError(comm, &st);

	if (r != ncclSuccess)
		st = r;
	if (st == ncclInProgress)
		return 1;
	if (st == ncclSuccess)
		return 0;
	fail("%s: device %d: %s (%s)", what, dev, ncclGetErrorString(st), ncclGetLastError(comm));
	return -1;
}

/* The same over every communicator: the devices' here, and the one across nodes. */
static int nccl_state(const char *what)
{
	int busy = w.wcomm ? comm_state(w.wcomm, w.wdev, what) : 0;

	for (int i = 0; i < w.nccl_n && busy >= 0; i++) {
		int st = comm_state(w.nccl[i], w.nccl_dev[i], what);

		busy = st < 0 ? st : busy | st;
	}
	return busy;
}

/* Wait until no communicator is in progress, at most NCCL_WAIT_MS. */
static int nccl_settle(const char *what)
{
	uint64_t deadline = now_ms() + NCCL_WAIT_MS;
	struct timespec pause = { 0, POLL_NS };
	int st;

	while ((st = nccl_state(what)) > 0) {
		if (now_ms() > deadline) {
			fail("%s: still in progress after %d s", what, NCCL_WAIT_MS / 1000);
			return -1;
		}
		nanosleep(&pause, NULL);
	}
	return st;
}

static void nccl_abort(void)
{
	for (int i = 0; i < w.nccl_n; i++)
		ncclCommAbort(w.nccl[i]);
	w.nccl_n = 0;
	if (w.wcomm)
		ncclCommAbort(w.wcomm);
	w.wcomm = NULL;
}

/* Finalize (all, then wait: they finish together) and destroy the communicator. */
static int nccl_close(void)
{
	int rc = 0;

	for (int i = 0; i < w.nccl_n && !rc; i++)
		rc = nccl_check(ncclCommFinalize(w.nccl[i]), "ncclCommFinalize");
	if (rc || nccl_settle("ncclCommFinalize")) {
		nccl_abort();
		return -1;
	}
	for (int i = 0; i < w.nccl_n; i++)
		ncclCommDestroy(w.nccl[i]);
	w.nccl_n = 0;
	return 0;
}

/* One NCCL rank per device in devs[0..k), in this process; kept while devs stay. */
static int nccl_ready(const int *devs, int k)
{
	ncclUniqueId id;
	ncclResult_t r = ncclSuccess;

	if (k == w.nccl_n && memcmp(devs, w.nccl_dev, (size_t)k * sizeof *devs) == 0)
		return 0;
	if ((w.nccl_n && nccl_close()) || nccl_check(ncclGetUniqueId(&id), "ncclGetUniqueId") ||
	    nccl_check(ncclGroupStart(), "ncclGroupStart"))
		return -1;
	for (int i = 0; i < k && (r == ncclSuccess || r == ncclInProgress); i++) {
		ncclConfig_t cfg = NCCL_CONFIG_INITIALIZER;

		cfg.blocking = 0;
		if (cuda_check(cudaSetDevice(devs[i]), "cudaSetDevice"))
			break;
		r = ncclCommInitRankConfig(&w.nccl[i], k, id, i, &cfg);
		if (r == ncclSuccess || r == ncclInProgress)
			w.nccl_dev[w.nccl_n++] = devs[i];
	}
	nccl_check(r, "ncclCommInitRankConfig");
	if (nccl_check(ncclGroupEnd(), "ncclGroupEnd") || w.nccl_n != k ||
	    nccl_settle("ncclCommInitRankConfig"))
		return -1;
	return 0;
}

/* The type NCCL combines the accumulators in: unsigned where the sum wraps. */
static ncclDataType_t nccl_type(int dtype, int redop)
{
	int wraps = redop != COMM_MIN && redop != COMM_MAX;

	switch (dtype) {
	case COMM_INT8:
		return wraps ? ncclUint8 : ncclInt8;
	case COMM_UINT8:
		return ncclUint8;
	case COMM_INT32:
		return wraps ? ncclUint32 : ncclInt32;
	case COMM_UINT32:
		return ncclUint32;
	case COMM_INT64:
		return wraps ? ncclUint64 : ncclInt64;
	case COMM_UINT64:
		return ncclUint64;
	case COMM_FLOAT64:
		return ncclFloat64;
	default:
		return ncclFloat32; /* float32, and float16 and bfloat16's accumulators */
	}
}

static ncclRedOp_t nccl_op(int redop)
{
	switch (redop) {
	case COMM_PROD:
		return ncclProd;
	case COMM_MIN:
		return ncclMin;
	case COMM_MAX:
		return ncclMax;
	default:
		return ncclSum; /* AVG divides afterwards, as on one device */
	}
}

/* --- ops --------------------------------------------------------------------------- */

/* Which ranks' buffers an op needs: none, any that are given, root's, every rank's. */
enum need { NEED_NONE, NEED_ANY, NEED_ROOT, NEED_ALL };

static const struct op_spec {
	const char *name;
	uint8_t in, out;               /* enum need */
	uint8_t in_blocks, out_blocks; /* 1: the buffer holds n blocks of count */
	uint8_t reduce;
} specs[] = {
	[T(ALLREDUCE)] = { "all-reduce", NEED_ALL, NEED_ANY, 0, 0, 1 },
	[T(REDUCE_SCATTER)] = { "reduce-scatter", NEED_ALL, NEED_ALL, 1, 0, 1 },
	[T(ALLGATHER)] = { "all-gather", NEED_ALL, NEED_ANY, 0, 1, 0 },
	[T(BROADCAST)] = { "broadcast", NEED_ROOT, NEED_ANY, 0, 0, 0 },
	[T(REDUCE)] = { "reduce", NEED_ALL, NEED_ROOT, 0, 0, 1 },
	[T(ALLTOALL)] = { "all-to-all", NEED_ALL, NEED_ALL, 1, 1, 0 },
	[T(SEND)] = { "send", NEED_ALL, NEED_ALL, 0, 0, 0 },
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

/* Check and resolve rank r's input (out 0) or output buffer. */
static int plan_buf(struct plan *p, int r, int out)
{
	const struct gpu_op_rank *x = &p->op->rank[r];
	const char *what = out ? "recv" : "send";
	uint64_t id = out ? x->recv_mem : x->send_mem, off = out ? x->recv_off : x->send_off;
	size_t len = out ? p->out_len : p->in_len;
	int need = out ? p->spec->out : p->spec->in;
	int grank = p->world ? (int)p->op->rank[r].grank : r;
	int must = need == NEED_ALL || (need == NEED_ROOT && grank == p->op->root);
	const struct mem *m;

	(out ? p->out : p->in)[r] = NULL;
	(out ? p->out_dev : p->in_dev)[r] = -1;
	if (!id) {
		if (must)
			fail("rank %d has no %s buffer", r, what);
		return must ? -1 : 0;
	}
	m = mem_find(id);
	if (!m) {
		fail("rank %d: %s mem %" PRIu64 " is not open", r, what, id);
		return -1;
	}
	if (off > m->size || len > m->size - off) {
		fail("rank %d: %s buffer: %zu bytes at offset %" PRIu64 " overrun mem %" PRIu64
		     " of %zu bytes", r, what, len, off, id, m->size);
		return -1;
	}
	if (!must && need != NEED_ANY)
		return 0;
	/* a kernel's loads and stores must be aligned to the element: a misaligned one faults */
	if (p->spec->reduce && len && off % dtype_size((int)p->op->dtype)) {
		fail("rank %d: %s buffer: offset %" PRIu64 " is not a multiple of the element size "
		     "(%zu)", r, what, off, dtype_size((int)p->op->dtype));
		return -1;
	}
	if (m->dev < 0 && p->op->type != T(SEND)) {
		fail("rank %d: %s mem %" PRIu64 " is host memory, which only a send copies", r, what, id);
		return -1;
	}
	(out ? p->out : p->in)[r] = m->ptr + off;
	(out ? p->out_dev : p->in_dev)[r] = m->dev;
	if (m->dev >= 0)
		p->used[m->dev] = 1;
	return 0;
}

/* Check and resolve the op's done flags: 4 aligned bytes in an open mem each. */
static int plan_flags(struct plan *p)
{
	for (int i = 0; i < p->nflags; i++) {
		const struct gpu_flag *f = &p->flags[i];
		const struct mem *m = mem_find(f->mem);

		if (!m || m->dev < 0) {
			fail("done flag %d: mem %" PRIu64 " is %s", i, f->mem,
			     m ? "host memory" : "not open");
			return -1;
		}
		if (f->off % sizeof(uint32_t) || f->off > m->size - sizeof(uint32_t) ||
		    m->size < sizeof(uint32_t)) {
			fail("done flag %d: offset %" PRIu64 " of mem %" PRIu64
			     " (%zu bytes) is not 4 aligned bytes inside it", i, f->off, f->mem,
			     m->size);
			return -1;
		}
		p->flag[i] = m->ptr + f->off;
		p->flag_dev[i] = m->dev;
	}
	return 0;
}

/* The one device p's buffers are on; -1: none, -2: several. */
static int used_device(const struct plan *p)
{
	int d = -1;

	for (int e = 0; e < w.ndev; e++) {
		if (!p->used[e])
			continue;
		if (d >= 0)
			return -2;
		d = e;
	}
	return d;
}

/*
 * An op across nodes: its ranks' granks index lidx, and everything it
 * touches here is on one device (wdev), the one the job's NCCL rank of
 * this node is on. A node whose ranks give no buffer uses that device too.
 */
static int plan_world(struct plan *p)
{
	int d;

	if (!w.world || p->op->world != w.world) {
		fail("an op across %u ranks, but WORLD said %u", p->op->world, w.world);
		return -1;
	}
	for (uint32_t g = 0; g < w.world; g++)
		w.lidx[g] = -1;
	for (int r = 0; r < p->n; r++) {
		uint32_t g = p->op->rank[r].grank;

		if (g >= w.world || w.node_of[g] != w.node || w.lidx[g] >= 0) {
			fail("rank %u is not one of this node's, or twice in the op", g);
			return -1;
		}
		w.lidx[g] = r;
	}
	for (uint32_t g = 0; g < w.world; g++) {
		if (w.node_of[g] == w.node && w.lidx[g] < 0) {
			fail("rank %u is this node's but not in the op", g);
			return -1;
		}
	}
	if ((d = used_device(p)) == -2) {
		fail("across nodes, a node's ranks use one device; these use several");
		return -1;
	}
	if (d < 0 && w.wcomm)
		d = w.wdev;
	for (size_t i = 0; d < 0 && i < w.nmem; i++)
		d = w.mem[i].dev; /* a staging buffer's is -1 */
	if (d < 0)
		d = 0;
	if (w.wcomm && d != w.wdev) {
		fail("across nodes, a node's ranks use one device: device %d, then %d", w.wdev, d);
		return -1;
	}
	p->wdev = d;
	p->used[d] = 1;
	return 0;
}

/* Check op (commd did already: this is the second line) and resolve it into p. */
static int plan_op(struct plan *p, const struct gpu_op *op, size_t nranks)
{
	size_t es = dtype_size((int)op->dtype);

	memset(p->used, 0, sizeof p->used);
	p->op = op;
	p->n = (int)op->n;
	p->world = (int)op->world;
	p->nall = p->world ? p->world : p->n;
	p->nccl = 0;
	if (op->n < 1 || op->n > GPU_OP_MAX_RANKS || op->n != nranks) {
		fail("%u ranks in a packet that holds %zu (at most %d)", op->n, nranks,
		     GPU_OP_MAX_RANKS);
		return -1;
	}
	if (op->type == T(SEND) &&
	    (op->n > 2 || op->world ||
	     (op->n == 2 && (op->rank[1].send_mem || op->rank[1].recv_mem)))) {
		fail("a send copies 1 rank's buffer (a second entry holds the receiver's event "
		     "only), not %u of %u", op->n, op->world);
		return -1;
	}
	if (op->world && op->world < op->n) {
		fail("%u ranks of a world of %u", op->n, op->world);
		return -1;
	}
	if (!dtype_valid((int)op->dtype) || !redop_valid((int)op->redop)) {
		fail("dtype %u or redop %u is not one of comm.h's", op->dtype, op->redop);
		return -1;
	}
	if ((p->spec->in == NEED_ROOT || p->spec->out == NEED_ROOT) &&
	    (op->root < 0 || op->root >= p->nall)) {
		fail("root %d is not one of %d ranks", op->root, p->nall);
		return -1;
	}
	if (mul_overflow_size(op->count, es, &p->block) ||
	    mul_overflow_size(p->block, p->spec->in_blocks ? (size_t)p->nall : 1, &p->in_len) ||
	    mul_overflow_size(p->block, p->spec->out_blocks ? (size_t)p->nall : 1, &p->out_len) ||
	    p->in_len > SIZE_MAX / 2 || p->out_len > SIZE_MAX / 2) {
		fail("count %" PRIu64 " is too large", op->count);
		return -1;
	}
	for (int r = 0; r < p->n; r++) {
		if (op->type == T(SEND) && r == 1) { /* the receiver's event only */
			p->in[r] = p->out[r] = NULL;
			p->in_dev[r] = p->out_dev[r] = -1;
		} else if (plan_buf(p, r, 0) || plan_buf(p, r, 1)) {
			return -1;
		}
	}
	if (op->type == T(SEND) && p->block && p->in_dev[0] < 0 && p->out_dev[0] < 0) {
		fail("a send from host memory to host memory");
		return -1;
	}
	p->nflags = (int)op->nflags;
	p->flags = (const struct gpu_flag *)&op->rank[op->n];
	return plan_flags(p) || (p->world && plan_world(p)) ? -1 : 0;
}

/* Make every used stream wait for the client's events of all ranks. */
static int plan_wait_events(const struct plan *p)
{
	int first = 0;

	while (first < w.ndev - 1 && !p->used[first])
		first++;
	for (int r = 0; r < p->n; r++) {
		int home = p->in_dev[r] >= 0 ? p->in_dev[r] : p->out_dev[r];
		cudaEvent_t ev;

		if (!p->op->rank[r].has_event)
			continue;
		if (p->op->type == T(SEND) && r == 1)
			home = p->out_dev[0]; /* the receiver's entry: its buffer is the output */
		ev = event_open(p->op->rank[r].ready_event, home >= 0 ? home : first);
		if (!ev)
			return -1;
		/* every stream: a copy on one device may read a buffer on another */
		for (int d = 0; d < w.ndev; d++)
			if (p->used[d] && cuda_check(cudaStreamWaitEvent(w.dev[d].stream, ev, 0),
						     "cudaStreamWaitEvent"))
				return -1;
	}
	return 0;
}

/* Order every used stream after what all of them have queued so far. */
static int plan_join(const struct plan *p)
{
	for (int d = 0; d < w.ndev; d++)
		if (p->used[d] && (cuda_check(cudaSetDevice(d), "cudaSetDevice") ||
				   cuda_check(cudaEventRecord(w.dev[d].mark, w.dev[d].stream),
					      "cudaEventRecord")))
			return -1;
	for (int d = 0; d < w.ndev; d++)
		for (int e = 0; e < w.ndev; e++)
			if (d != e && p->used[d] && p->used[e] &&
			    cuda_check(cudaStreamWaitEvent(w.dev[d].stream, w.dev[e].mark, 0),
				       "cudaStreamWaitEvent"))
				return -1;
	return 0;
}

static int copy(int d, void *dst, const void *src, size_t len)
{
	if (dst == src || !len)
		return 0;
	if (cuda_check(cudaSetDevice(d), "cudaSetDevice") ||
	    cuda_check(cudaMemcpyAsync(dst, src, len, cudaMemcpyDefault, w.dev[d].stream),
		       "cudaMemcpyAsync"))
		return -1;
	return 0;
}

/* Combine the inputs that live on device d, in rank order, into its scratch. */
static int reduce_on(const struct plan *p, int d, enum gk_mode mode, size_t elems, void *out,
		     const void *in_acc)
{
	struct gk_inputs in;
	int k = 0;

	if (mode == GK_FINISH)
		in.p[k++] = in_acc;
	else
		for (int r = 0; r < p->n; r++)
			if (p->in_dev[r] == d)
				in.p[k++] = p->in[r];
	if (cuda_check(cudaSetDevice(d), "cudaSetDevice") ||
	    cuda_check(gk_reduce(mode, (int)p->op->dtype, (int)p->op->redop, out, &in, k, elems,
				 mode == GK_FINISH ? p->nall : k, w.dev[d].stream),
		       "reduce kernel"))
		return -1;
	return 0;
}

static int nccl_allreduce(struct plan *p, const int *devs, int k, size_t elems)
{
	ncclDataType_t type = nccl_type((int)p->op->dtype, (int)p->op->redop);
	ncclRedOp_t op = nccl_op((int)p->op->redop);
	int rc = 0;

	if (nccl_ready(devs, k) || nccl_check(ncclGroupStart(), "ncclGroupStart"))
		return -1;
	for (int i = 0; i < k && !rc; i++) {
		struct dev *x = &w.dev[devs[i]];

		rc = cuda_check(cudaSetDevice(devs[i]), "cudaSetDevice") ||
		     nccl_check(ncclAllReduce(x->scratch, x->scratch, elems, type, op, w.nccl[i],
					      x->stream),
				"ncclAllReduce");
	}
	if (nccl_check(ncclGroupEnd(), "ncclGroupEnd") || rc)
		return -1;
	p->nccl = 1;
	/* nonblocking: only once settled is the work on the streams, ahead of ours */
	return nccl_settle("ncclAllReduce");
}

/*
 * Whether the inputs, all on device d, can be combined straight into the
 * outputs (all-reduce and reduce): every output on d too, every buffer
 * 16-byte aligned, at most GK_MAX_OUT outputs, and no output overlapping
 * an input or another output unless it is that buffer whole (in place, or
 * the same output twice).
 */
static int direct_ok(const struct plan *p, int d)
{
	int nout = 0;

	if (p->op->type == T(REDUCE_SCATTER))
		return 0;
	for (int a = 0; a < p->n; a++) {
		uintptr_t o = (uintptr_t)p->out[a], i = (uintptr_t)p->in[a];

		if ((i | o) % 16)
			return 0;
		if (!o)
			continue;
		if (p->out_dev[a] != d || ++nout > GK_MAX_OUT)
			return 0;
		for (int b = 0; b < p->n; b++) {
			uintptr_t x = (uintptr_t)p->out[b];

			i = (uintptr_t)p->in[b];
			if ((o != i && o < i + p->in_len && i < o + p->out_len) ||
			    (o != x && x && o < x + p->out_len && x < o + p->out_len))
				return 0;
		}
	}
	return 1;
}

/*
 * One device, direct: its inputs combined into every output at once (one
 * input: copied), reading each input once and writing each output once.
 */
static int reduce_direct(const struct plan *p, int d)
{
	struct gk_outputs out;
	struct gk_inputs in;
	int nin = 0, nout = 0;

	for (int r = 0; r < p->n; r++) {
		if (p->in[r])
			in.p[nin++] = p->in[r];
		if (p->out[r])
			out.p[nout++] = p->out[r];
	}
	if (nin == 1) {
		for (int j = 0; j < nout; j++)
			if (copy(d, out.p[j], in.p[0], p->out_len))
				return -1;
		return 0;
	}
	if (cuda_check(cudaSetDevice(d), "cudaSetDevice") ||
	    cuda_check(gk_reduce_direct((int)p->op->dtype, (int)p->op->redop, &out, nout, &in, nin,
					p->op->count, nin, w.dev[d].stream),
		       "reduce kernel"))
		return -1;
	return 0;
}

/*
 * All-reduce, reduce and reduce-scatter: on one device, straight into the
 * outputs where reduce_direct may; else each device combines its ranks'
 * inputs into its scratch; across devices NCCL all-reduces those partials
 * (kept as accumulators so float16 rounds once) and each device finishes
 * its copy. Every output is then copied from its rank's device's result.
 */
static int op_reduce(struct plan *p)
{
	int rs = p->op->type == T(REDUCE_SCATTER);
	size_t elems = p->op->count * (rs ? (size_t)p->n : 1), fin = p->in_len;
	size_t acc = gk_acc_size((int)p->op->dtype) * elems, res = 0;
	int devs[MAX_DEVICES], k = 0;

	for (int d = 0; d < w.ndev; d++)
		for (int r = 0; r < p->n; r++)
			if (p->in_dev[r] == d) {
				devs[k++] = d;
				break;
			}
	if (k == 1 && direct_ok(p, devs[0]))
		return reduce_direct(p, devs[0]);
	if (k == 1) {
		struct dev *x = &w.dev[devs[0]];

		if (scratch(devs[0], fin) || reduce_on(p, devs[0], GK_FINAL, elems, x->scratch, NULL))
			return -1;
	} else {
		res = acc;
		for (int i = 0; i < k; i++)
			if (scratch(devs[i], acc + fin) ||
			    reduce_on(p, devs[i], GK_PARTIAL, elems, w.dev[devs[i]].scratch, NULL))
				return -1;
		if (nccl_allreduce(p, devs, k, elems))
			return -1;
		for (int i = 0; i < k; i++) {
			struct dev *x = &w.dev[devs[i]];

			if (reduce_on(p, devs[i], GK_FINISH, elems, x->scratch + res, x->scratch))
				return -1;
		}
	}
	for (int r = 0; r < p->n; r++) {
		int d = p->in_dev[r];

		if (p->out[r] && copy(d, p->out[r], w.dev[d].scratch + res + (rs ? r * p->block : 0),
				      p->out_len))
			return -1;
	}
	return 0;
}

/* Where rank r's output starts when its input sits in it as the op's in-place form. */
static uintptr_t in_place_out(const struct plan *p, int r)
{
	switch (p->op->type) {
	case T(ALLGATHER):
		return (uintptr_t)p->in[r] - (size_t)r * p->block;
	case T(ALLTOALL):
		return 0; /* no overlap is safe */
	default:
		return (uintptr_t)p->in[r];
	}
}

/*
 * Whether an output overlaps an input other than in the in-place form, where
 * the one overlapping copy is a no-op and the others never touch an input.
 */
static int needs_staging(const struct plan *p)
{
	for (int a = 0; a < p->n; a++) {
		uintptr_t o = (uintptr_t)p->out[a];

		for (int b = 0; b < p->n && o; b++) {
			uintptr_t i = (uintptr_t)p->in[b];

			if (!i || o >= i + p->in_len || i >= o + p->out_len)
				continue;
			if (a != b || o != in_place_out(p, a))
				return 1;
		}
	}
	return 0;
}

/* Copy every input into its device's scratch first, for outputs that alias them. */
static int stage_inputs(struct plan *p)
{
	size_t at[MAX_DEVICES] = { 0 };

	for (int r = 0; r < p->n; r++)
		if (p->in[r])
			at[p->in_dev[r]] += p->in_len;
	for (int d = 0; d < w.ndev; d++)
		if (at[d] && scratch(d, at[d]))
			return -1;
	memset(at, 0, sizeof at);
	for (int r = 0; r < p->n; r++) {
		int d = p->in_dev[r];
		uint8_t *dst;

		if (!p->in[r])
			continue;
		dst = w.dev[d].scratch + at[d];
		if (copy(d, dst, p->in[r], p->in_len))
			return -1;
		p->in[r] = dst;
		at[d] += p->in_len;
	}
	return plan_join(p);
}

/* All-gather, broadcast, all-to-all and send: copies on the receiver's device. */
static int op_copy(struct plan *p)
{
	size_t blk = p->block;
	int rc = 0;

	if (needs_staging(p) && stage_inputs(p))
		return -1;
	for (int r = 0; r < p->n && !rc; r++) {
		if (!p->out[r])
			continue;
		switch (p->op->type) {
		case T(ALLGATHER):
			for (int b = 0; b < p->n && !rc; b++)
				rc = copy(p->out_dev[r], p->out[r] + b * blk, p->in[b], blk);
			break;
		case T(ALLTOALL):
			for (int s = 0; s < p->n && !rc; s++)
				rc = copy(p->out_dev[r], p->out[r] + s * blk, p->in[s] + r * blk, blk);
			break;
		case T(BROADCAST):
			rc = copy(p->out_dev[r], p->out[r], p->in[p->op->root], blk);
			break;
		default: /* a send: on the receiver's device, or the sender's (staging) */
			rc = copy(p->out_dev[r] >= 0 ? p->out_dev[r] : p->in_dev[r], p->out[r],
				  p->in[r], blk);
		}
	}
	return rc;
}

/* --- ops across nodes: this node's part, NCCL between the nodes ----------------------- */

/* The communicator across nodes on device d, made (by every node at once) on first use. */
static int world_comm(int d)
{
	ncclConfig_t cfg = NCCL_CONFIG_INITIALIZER;
	ncclUniqueId id;

	if (w.wcomm)
		return 0;
	cfg.blocking = 0;
	memcpy(&id, w.nccl_id, sizeof id);
	if (cuda_check(cudaSetDevice(d), "cudaSetDevice") ||
	    nccl_check(ncclCommInitRankConfig(&w.wcomm, (int)w.nnodes, id, (int)w.node, &cfg),
		       "ncclCommInitRankConfig (across nodes)"))
		return -1;
	w.wdev = d;
	wlog("NCCL rank %u of %u nodes on device %d", w.node, w.nnodes, d);
	return nccl_settle("ncclCommInitRankConfig (across nodes)");
}

/* The NCCL calls since world_begin are issued: wait until they are on the stream. */
static int world_end(struct plan *p, const char *what)
{
	p->nccl = 1;
	return nccl_check(ncclGroupEnd(), "ncclGroupEnd") || nccl_settle(what) ? -1 : 0;
}

/* world_end, rc: a call that failed since world_begin; then src (len bytes) to every output. */
static int world_end_out(struct plan *p, const char *what, int rc, const uint8_t *src, size_t len)
{
	if (world_end(p, what) || rc)
		return -1;
	for (int r = 0; r < p->n; r++)
		if (p->out[r] && copy(p->wdev, p->out[r], src, len))
			return -1;
	return 0;
}

static int world_begin(const struct plan *p)
{
	return world_comm(p->wdev) || cuda_check(cudaSetDevice(p->wdev), "cudaSetDevice") ||
			       nccl_check(ncclGroupStart(), "ncclGroupStart")
		       ? -1
		       : 0;
}

/* The end of the run of ranks from g on that are on one node. */
static int run_end(const struct plan *p, int g)
{
	int e = g + 1;

	while (e < p->nall && w.node_of[e] == w.node_of[g])
		e++;
	return e;
}

/*
 * All-reduce, reduce and reduce-scatter: this node's inputs combined into
 * accumulators, which NCCL all-reduces (reduces to the root's node; for a
 * reduce-scatter, each run of ranks' blocks to their node, in one group);
 * each node finishes its copy and writes its ranks' outputs (reduce-scatter:
 * each rank's block). AVG divides by the whole world.
 */
static int world_reduce(struct plan *p)
{
	int rs = p->op->type == T(REDUCE_SCATTER), rd = p->op->type == T(REDUCE);
	int d = p->wdev, home = rd ? w.node_of[p->op->root] : -1, rc = 0;
	size_t elems = p->op->count * (rs ? (size_t)p->nall : 1);
	size_t asz = gk_acc_size((int)p->op->dtype), acc = asz * elems;
	struct dev *x = &w.dev[d];
	ncclDataType_t type = nccl_type((int)p->op->dtype, (int)p->op->redop);
	ncclRedOp_t op = nccl_op((int)p->op->redop);

	if (scratch(d, acc + p->in_len) || reduce_on(p, d, GK_PARTIAL, elems, x->scratch, NULL) ||
	    world_begin(p))
		return -1;
	if (rd)
		rc = nccl_check(ncclReduce(x->scratch, x->scratch, elems, type, op, home, w.wcomm,
					   x->stream), "ncclReduce");
	else if (!rs)
		rc = nccl_check(ncclAllReduce(x->scratch, x->scratch, elems, type, op, w.wcomm,
					      x->stream), "ncclAllReduce");
	for (int g = 0, e; rs && g < p->nall && !rc; g = e) {
		uint8_t *at = x->scratch + (size_t)g * p->op->count * asz;

		e = run_end(p, g);
		rc = nccl_check(ncclReduce(at, at, (size_t)(e - g) * p->op->count, type, op,
					   w.node_of[g], w.wcomm, x->stream), "ncclReduce");
	}
	if (world_end(p, rd || rs ? "ncclReduce" : "ncclAllReduce") || rc)
		return -1;
	if (rd && home != (int)w.node)
		return 0;
	if (reduce_on(p, d, GK_FINISH, elems, x->scratch + acc, x->scratch))
		return -1;
	for (int r = 0; r < p->n; r++)
		if (p->out[r] &&
		    copy(d, p->out[r], x->scratch + acc + (rs ? p->op->rank[r].grank * p->block : 0),
			 p->out_len))
			return -1;
	return 0;
}

/* Broadcast: from the root's input on its node, into scratch on the others. */
static int world_broadcast(struct plan *p)
{
	int d = p->wdev, home = w.node_of[p->op->root], rc;
	uint8_t *buf;

	if (home == (int)w.node) {
		if (needs_staging(p) && stage_inputs(p))
			return -1;
		buf = p->in[w.lidx[p->op->root]];
	} else {
		if (scratch(d, p->block))
			return -1;
		buf = w.dev[d].scratch;
	}
	if (world_begin(p))
		return -1;
	rc = nccl_check(ncclBroadcast(buf, buf, p->block, ncclUint8, home, w.wcomm,
				      w.dev[d].stream), "ncclBroadcast");
	return world_end_out(p, "ncclBroadcast", rc, buf, p->block);
}

/*
 * All-gather: every block into place in scratch, this node's from its
 * ranks, the others' broadcast from their nodes (one broadcast per run of
 * ranks on one node); then the whole to each rank.
 */
static int world_allgather(struct plan *p)
{
	int d = p->wdev, rc = 0;
	uint8_t *all;

	if (scratch(d, p->out_len))
		return -1;
	all = w.dev[d].scratch;
	for (int r = 0; r < p->n; r++)
		if (copy(d, all + p->op->rank[r].grank * p->block, p->in[r], p->block))
			return -1;
	if (world_begin(p))
		return -1;
	for (int g = 0, e; g < p->nall && !rc; g = e) {
		e = run_end(p, g);
		rc = nccl_check(ncclBroadcast(all + g * p->block, all + g * p->block,
					      (size_t)(e - g) * p->block, ncclUint8, w.node_of[g],
					      w.wcomm, w.dev[d].stream), "ncclBroadcast");
	}
	return world_end_out(p, "ncclBroadcast", rc, all, p->out_len);
}

/*
 * All-to-all: blocks between this node's ranks are copied; the others go
 * by NCCL send and receive, issued in (sender, receiver) order on every
 * node, so that each pair of nodes matches them up.
 */
static int world_alltoall(struct plan *p)
{
	int d = p->wdev, rc = 0;
	size_t blk = p->block;

	if (needs_staging(p) && stage_inputs(p))
		return -1;
	for (int s = 0; s < p->n; s++)
		for (int r = 0; r < p->n; r++)
			if (copy(d, p->out[r] + p->op->rank[s].grank * blk,
				 p->in[s] + p->op->rank[r].grank * blk, blk))
				return -1;
	if (world_begin(p))
		return -1;
	for (int gs = 0; gs < p->nall && !rc; gs++) {
		for (int gr = 0; gr < p->nall && !rc; gr++) {
			int ls = w.lidx[gs], lr = w.lidx[gr];

			if (ls >= 0 && lr < 0)
				rc = nccl_check(ncclSend(p->in[ls] + gr * blk, blk, ncclUint8,
							 w.node_of[gr], w.wcomm, w.dev[d].stream),
						"ncclSend");
			else if (ls < 0 && lr >= 0)
				rc = nccl_check(ncclRecv(p->out[lr] + gs * blk, blk, ncclUint8,
							 w.node_of[gs], w.wcomm, w.dev[d].stream),
						"ncclRecv");
		}
	}
	return world_end(p, "ncclSend/ncclRecv") || rc ? -1 : 0;
}

static int op_world(struct plan *p)
{
	switch (p->op->type) {
	case T(BROADCAST):
		return world_broadcast(p);
	case T(ALLGATHER):
		return world_allgather(p);
	case T(ALLTOALL):
		return world_alltoall(p);
	default:
		return world_reduce(p);
	}
}

/* Wait for the op's streams; with NCCL work on them, watch the communicator too. */
static int streams_wait(const struct plan *p)
{
	struct timespec pause = { 0, POLL_NS };

	for (int d = 0; d < w.ndev; d++) {
		cudaError_t e;

		if (!p->used[d])
			continue;
		if (!p->nccl) {
			if (cuda_check(cudaStreamSynchronize(w.dev[d].stream), "cudaStreamSynchronize"))
				return -1;
			continue;
		}
		while ((e = cudaStreamQuery(w.dev[d].stream)) == cudaErrorNotReady) {
			if (nccl_state("ncclAllReduce") < 0)
				return -1;
			nanosleep(&pause, NULL);
		}
		if (cuda_check(e, "cudaStreamQuery"))
			return -1;
	}
	return 0;
}

/* The one device every used stream and done flag is on, or -1. */
static int single_device(const struct plan *p)
{
	int d = used_device(p);

	if (d < 0)
		return -1;
	for (int i = 0; i < p->nflags; i++)
		if (p->flag_dev[i] != d)
			return -1;
	return d;
}

/*
 * Write the done flags on the streams given (each flag's device's), then
 * wait for the writes when wait (the op's own streams are idle already).
 */
static int write_flags(const struct plan *p, int flag_stream, int wait)
{
	for (int i = 0; i < p->nflags; i++) {
		int d = p->flag_dev[i];
		struct dev *x = &w.dev[d];

		if (dev_ready(d) || cuda_check(cudaSetDevice(d), "cudaSetDevice") ||
		    cu_check(drv.write_value((CUstream)(flag_stream ? x->flags : x->stream),
					     (CUdeviceptr)(uintptr_t)p->flag[i], p->flags[i].value,
					     CU_STREAM_WRITE_VALUE_DEFAULT),
			     "cuStreamWriteValue32"))
			return -1;
	}
	for (int i = 0; wait && i < p->nflags; i++)
		if (cuda_check(cudaStreamSynchronize(w.dev[p->flag_dev[i]].stream),
			       "cudaStreamSynchronize"))
			return -1;
	return 0;
}

/* Queue p's work on the streams it uses. */
static int op_launch(struct plan *p)
{
	for (int d = 0; d < w.ndev; d++)
		if (p->used[d] && dev_ready(d))
			return -1;
	if (plan_wait_events(p))
		return -1;
	if (p->world)
		return op_world(p);
	return p->spec->reduce ? op_reduce(p) : op_copy(p);
}

/* Run p on several devices (or none) and wait for it; then write its flags. */
static int op_run(struct plan *p)
{
	if (!p->block)
		return write_flags(p, 0, 1);
	if (op_launch(p) || streams_wait(p))
		return -1;
	return p->nflags ? write_flags(p, 0, 1) : 0;
}

/* The queued slot's event ev (or fev) on device d, made on first use. */
static int queued_event(cudaEvent_t *ev, int d)
{
	return !*ev && (cuda_check(cudaSetDevice(d), "cudaSetDevice") ||
			cuda_check(cudaEventCreateWithFlags(ev, cudaEventDisableTiming),
				   "cudaEventCreateWithFlags"));
}

/*
 * Queue p, all on device d, behind the ops before it; an event marks its
 * end. Its done flags are written on the device's flag stream once that
 * event passed, so the next op on the stream does not wait for them, and a
 * second event marks them written. reap answers it once they are.
 */
static int op_queue(struct plan *p, int d)
{
	struct queued *q = &w.q[(w.qhead + w.nq) % MAX_QUEUED];

	if (op_launch(p))
		return -1;
	if (q->dev != d) {
		if (q->ev)
			cudaEventDestroy(q->ev);
		if (q->fev)
			cudaEventDestroy(q->fev);
		q->ev = q->fev = NULL;
	}
	q->dev = d;
	if (queued_event(&q->ev, d) ||
	    cuda_check(cudaEventRecord(q->ev, w.dev[d].stream), "cudaEventRecord"))
		return -1;
	q->flagged = p->nflags > 0;
	if (q->flagged &&
	    (queued_event(&q->fev, d) ||
	     cuda_check(cudaStreamWaitEvent(w.dev[d].flags, q->ev, 0), "cudaStreamWaitEvent") ||
	     write_flags(p, 1, 0) ||
	     cuda_check(cudaEventRecord(q->fev, w.dev[d].flags), "cudaEventRecord")))
		return -1;
	q->id = p->op->id;
	q->name = p->spec->name;
	w.nq++;
	return 0;
}

/* A device op failed: answer it, and end (a CUDA error may be sticky). */
static _Noreturn void op_aborted(const char *name, uint64_t id)
{
	char detail[GPU_DETAIL];

	snprintf(detail, sizeof detail, "%s %" PRIu64 ": %.200s", name, id, w.err);
	reply(GPU_MSG_OP_DONE, id, COMM_ERR_ABORTED, detail);
	wlog("%s; exiting", detail);
	nccl_abort();
	exit(GPU_WORKER_EXIT_DEVICE);
}

/*
 * Answer the queued ops that have finished, oldest first, waiting until at
 * most keep are left. Commd counts on answers in the order it sent the ops.
 */
static void reap(size_t keep)
{
	while (w.nq) {
		struct queued *q = &w.q[w.qhead];
		cudaEvent_t ev = q->flagged ? q->fev : q->ev;
		int wait = w.nq > keep;
		cudaError_t e = wait ? cudaEventSynchronize(ev) : cudaEventQuery(ev);

		if (e == cudaErrorNotReady)
			return;
		w.qhead = (w.qhead + 1) % MAX_QUEUED;
		w.nq--;
		if (e != cudaSuccess) {
			w.err[0] = '\0';
			cuda_check(e, wait ? "cudaEventSynchronize" : "cudaEventQuery");
			op_aborted(q->name, q->id);
		}
		reply(GPU_MSG_OP_DONE, q->id, COMM_OK, "");
		w.spin_until = now_us() + SPIN_US; /* the job's next op tends to follow */
		w.ops++;
	}
}

/* --- requests ----------------------------------------------------------------------- */

/* Node 0 of a job over several nodes: the id of its communicator, to commd. */
static void send_nccl_id(void)
{
	struct gpu_nccl_id m;
	ncclUniqueId id;
	ncclResult_t r = ncclGetUniqueId(&id);

	memset(&m, 0, sizeof m);
	memcpy(m.nccl_id, &id, sizeof m.nccl_id);
	w.err[0] = '\0';
	nccl_check(r, "ncclGetUniqueId");
	if (r != ncclSuccess)
		wlog("%s", w.err);
	send_status(&m.st, sizeof m, GPU_MSG_NCCL_ID, 0, r == ncclSuccess ? COMM_OK : COMM_ERR_INTERNAL,
		    w.err);
}

static void on_hello(const struct gpu_hello *m)
{
	memcpy(w.job, m->job, sizeof w.job);
	w.job[sizeof w.job - 1] = '\0';
	if (gpu_open(w.no_gpu, sizeof w.no_gpu)) {
		wlog("no GPU to serve: %s", w.no_gpu);
		reply(GPU_MSG_HELLO_REPLY, 0, COMM_ERR_UNSUPPORTED, w.no_gpu);
		return;
	}
	wlog("serving %u ranks on %d device%s", m->world, w.ndev, w.ndev == 1 ? "" : "s");
	reply(GPU_MSG_HELLO_REPLY, 0, COMM_OK, "");
	if (m->nnodes > 1 && m->node == 0)
		send_nccl_id();
}

/* The job's nodes; its communicator across them is made at its first op. */
static void on_world(const struct gpu_world *m)
{
	if (w.world)
		malformed("a second WORLD");
	if (m->nnodes < 2 || m->nnodes > m->world || m->node >= m->nnodes)
		malformed("WORLD: node %u of %u nodes, %u ranks", m->node, m->nnodes, m->world);
	for (uint32_t r = 0; r < m->world; r++)
		if (m->node_of[r] >= m->nnodes)
			malformed("WORLD: rank %u on node %u of %u", r, m->node_of[r], m->nnodes);
	w.world = m->world;
	w.nnodes = m->nnodes;
	w.node = m->node;
	memcpy(w.node_of, m->node_of, m->world * sizeof *m->node_of);
	memcpy(w.nccl_id, m->nccl_id, sizeof w.nccl_id);
}

/* fd: the VMM allocation's, or -1; closed before the answer, so commd may count on it. */
static void on_mem_open(const struct gpu_mem_open *m, int fd)
{
	char detail[GPU_DETAIL];
	comm_result_t rc;

	w.err[0] = '\0';
	if (w.no_gpu[0]) {
		if (fd >= 0)
			close(fd);
		reply(GPU_MSG_MEM_OPENED, m->id, COMM_ERR_UNSUPPORTED, w.no_gpu);
		return;
	}
	rc = mem_open(m, fd);
	if (fd >= 0)
		close(fd);
	snprintf(detail, sizeof detail, "mem open: rank %d: %s", m->rank, w.err);
	if (rc != COMM_OK)
		wlog("%s", detail);
	reply(GPU_MSG_MEM_OPENED, m->id, rc, detail);
}

static void on_mem_close(const struct gpu_mem_close *m)
{
	struct mem *x = mem_find(m->id), gone;

	if (!x) {
		if (!w.no_gpu[0])
			wlog("mem close: mem %" PRIu64 " is not open", m->id);
		return;
	}
	gone = *x;
	*x = w.mem[--w.nmem];
	mem_release(&gone);
}

/*
 * An op on one device is queued behind the ones before it and answered by
 * reap; any other is run and answered here, after those before it.
 */
static void on_op(const struct gpu_op *op, size_t nranks)
{
	static struct plan p;
	char detail[GPU_DETAIL];
	comm_result_t rc = COMM_OK;
	const char *name;
	int d;

	w.err[0] = '\0';
	w.scratch_short = 0;
	if (w.no_gpu[0]) {
		reply(GPU_MSG_OP_DONE, op->id, COMM_ERR_UNSUPPORTED, w.no_gpu);
		return;
	}
	p.spec = op->type < ARRAY_SIZE(specs) ? &specs[op->type] : NULL;
	name = p.spec && p.spec->name ? p.spec->name : "op";
	if (!p.spec || !p.spec->name) {
		fail("op type %u is not served by the GPU worker", op->type);
		rc = COMM_ERR_INVALID_ARG;
	} else if (plan_op(&p, op, nranks)) {
		rc = COMM_ERR_INVALID_ARG;
		if (p.world) { /* the other nodes' workers wait for this one: end, so the job fails */
			reap(0);
			op_aborted(name, op->id);
		}
	} else if (p.block && !p.world && (d = single_device(&p)) >= 0) {
		reap(MAX_QUEUED - 1);
		if (!op_queue(&p, d))
			return;
		reap(0); /* answers the ops before it first (reap keeps w.err) */
		if (!w.scratch_short)
			op_aborted(name, op->id);
		rc = COMM_ERR_NO_MEMORY;
	}
	reap(0);
	/* an op over nodes leaves the other workers waiting in NCCL: end, so the job fails */
	if (rc == COMM_OK && op_run(&p)) {
		if (!w.scratch_short || p.world)
			op_aborted(name, op->id);
		rc = COMM_ERR_NO_MEMORY;
	}
	snprintf(detail, sizeof detail, "%s %" PRIu64 ": %s", name, op->id, w.err);
	reply(GPU_MSG_OP_DONE, op->id, rc, detail);
	if (rc != COMM_OK)
		wlog("%s", detail);
	w.ops++;
}

/* Free everything the worker holds, at EOF: commd is done with the job. */
static void release_all(void)
{
	if (w.nccl_n && nccl_close())
		wlog("release: %s", w.err);
	/* the other nodes' workers may be gone: nothing to finalize with */
	if (w.wcomm)
		ncclCommAbort(w.wcomm);
	while (w.nmem) {
		struct mem gone = w.mem[--w.nmem];

		mem_release(&gone);
	}
	for (size_t i = 0; i < w.nev; i++)
		cudaEventDestroy(w.ev[i].ev);
	for (size_t i = 0; i < MAX_QUEUED; i++) {
		if (w.q[i].ev)
			cudaEventDestroy(w.q[i].ev);
		if (w.q[i].fev)
			cudaEventDestroy(w.q[i].fev);
	}
	for (int d = 0; d < w.ndev; d++) {
		struct dev *x = &w.dev[d];

		if (!x->ready)
			continue;
		cudaSetDevice(d);
		cudaStreamDestroy(x->stream);
		cudaStreamDestroy(x->flags);
		cudaEventDestroy(x->mark);
		cudaFree(x->scratch);
	}
	free(w.mem);
	free(w.ev);
}

/* --- the loop ------------------------------------------------------------------------- */

/*
 * The next packet into buf, with its fds; 0 at EOF. Exits when the socket
 * fails. While ops are queued, and for SPIN_US after the last op came or
 * was answered, the socket is polled without sleeping (queued ops are
 * answered between looks): a job's next op usually comes within
 * microseconds, and a wake-up from sleep costs about as much as the op.
 */
static size_t recv_packet(void *buf, int *fds, int *nfds)
{
	union {
		struct cmsghdr h;
		char b[CMSG_SPACE(MAX_FDS * sizeof(int))];
	} ctl;
	struct iovec iov = { .iov_base = buf, .iov_len = GPU_MSG_MAX };
	struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl.b,
			      .msg_controllen = sizeof ctl.b };
	ssize_t n;

	for (;;) {
		/* with ops queued, their ends are looked for between looks at the socket */
		int poll = w.nq || now_us() < w.spin_until;

		n = recvmsg(GPU_WORKER_FD, &msg, MSG_CMSG_CLOEXEC | (poll ? MSG_DONTWAIT : 0));
		if (n >= 0 || (errno != EINTR && errno != EAGAIN))
			break;
		if (errno != EAGAIN)
			continue;
		if (w.nq) { /* spinning, as cudaStreamSynchronize would */
			uint64_t until = now_us() + QUEUED_SPIN_US;
			size_t nq = w.nq;

			do
				reap(MAX_QUEUED);
			while (w.nq == nq && now_us() < until);
		} else {
			sched_yield(); /* polling: let anything runnable on this core go first */
		}
	}
	if (n < 0) {
		wlog("recvmsg on fd %d: %s", GPU_WORKER_FD, strerror(errno));
		exit(GPU_WORKER_EXIT_PROTOCOL);
	}
	*nfds = 0;
	for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
		size_t k = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);

		if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
			continue;
		for (size_t i = 0; i < k && *nfds < MAX_FDS; i++)
			memcpy(&fds[(*nfds)++], CMSG_DATA(c) + i * sizeof(int), sizeof(int));
	}
	if (msg.msg_flags & MSG_TRUNC)
		malformed("longer than %zu bytes", GPU_MSG_MAX);
	if (msg.msg_flags & MSG_CTRUNC)
		malformed("more than %d fds", MAX_FDS);
	return (size_t)n;
}

/* Exit unless buf holds a whole message that commd may send now. */
static void check_packet(const struct gpu_hdr *h, size_t len, int hello_seen)
{
	static const size_t size[] = {
		[GPU_MSG_HELLO] = sizeof(struct gpu_hello),
		[GPU_MSG_MEM_OPEN] = sizeof(struct gpu_mem_open),
		[GPU_MSG_MEM_CLOSE] = sizeof(struct gpu_mem_close),
		[GPU_MSG_OP] = sizeof(struct gpu_op),
		[GPU_MSG_WORLD] = sizeof(struct gpu_world),
	};
	size_t want;

	if (len < sizeof *h)
		malformed("%zu bytes, shorter than a header", len);
	if (h->version != GPU_PROTO_VERSION)
		malformed("version %u, this worker speaks %d", h->version, GPU_PROTO_VERSION);
	if (h->type >= ARRAY_SIZE(size) || !size[h->type])
		malformed("type %u is not one commd sends", h->type);
	want = size[h->type];
	if (h->type == GPU_MSG_OP && len >= want) {
		const struct gpu_op *op = (const struct gpu_op *)h;

		/* its done flags last, whole ranks before them; plan_op checks n */
		if (op->nflags > 2 * GPU_OP_MAX_RANKS)
			malformed("an op with %u done flags (at most %d)", op->nflags,
				  2 * GPU_OP_MAX_RANKS);
		want += op->nflags * sizeof(struct gpu_flag);
		if (len >= want && (len - want) % sizeof(struct gpu_op_rank) == 0)
			want = len;
	}
	if (h->type == GPU_MSG_WORLD && len >= want) {
		const struct gpu_world *m = (const struct gpu_world *)h;

		if (m->world > GPU_WORLD_MAX_RANKS)
			malformed("WORLD of %u ranks (at most %d)", m->world, GPU_WORLD_MAX_RANKS);
		want += m->world * sizeof(uint16_t);
	}
	if (len != want)
		malformed("type %u of %zu bytes, expected %zu%s", h->type, len, want,
			  h->type == GPU_MSG_OP ? " plus whole ranks" : "");
	if (!hello_seen && h->type != GPU_MSG_HELLO)
		malformed("type %u before hello", h->type);
	if (hello_seen && h->type == GPU_MSG_HELLO)
		malformed("a second hello");
}

static int serve(void)
{
	uint8_t *buf = malloc(GPU_MSG_MAX);
	int hello_seen = 0;

	if (!buf) {
		wlog("out of memory");
		return GPU_WORKER_EXIT_PROTOCOL;
	}
	for (;;) {
		int fds[MAX_FDS], nfds;
		size_t len = recv_packet(buf, fds, &nfds);
		const struct gpu_hdr *h = (const struct gpu_hdr *)buf;
		int vmm_fd = -1;

		if (len == 0)
			break;
		check_packet(h, len, hello_seen);
		/* a VMM or host open's one fd is its memory; any other fd is closed unused */
		if (h->type == GPU_MSG_MEM_OPEN && nfds == 1 &&
		    (((const struct gpu_mem_open *)buf)->kind == GPU_MEM_VMM ||
		     ((const struct gpu_mem_open *)buf)->kind == GPU_MEM_HOST))
			vmm_fd = fds[--nfds];
		for (int i = 0; i < nfds; i++)
			close(fds[i]);
		switch (h->type) {
		case GPU_MSG_HELLO:
			on_hello((const struct gpu_hello *)buf);
			hello_seen = 1;
			break;
		case GPU_MSG_MEM_OPEN:
			on_mem_open((const struct gpu_mem_open *)buf, vmm_fd);
			break;
		case GPU_MSG_MEM_CLOSE:
			on_mem_close((const struct gpu_mem_close *)buf);
			break;
		case GPU_MSG_WORLD:
			on_world((const struct gpu_world *)buf);
			break;
		default:
			on_op((const struct gpu_op *)buf,
			      (len - sizeof(struct gpu_op) -
			       ((const struct gpu_op *)buf)->nflags * sizeof(struct gpu_flag)) /
				      sizeof(struct gpu_op_rank));
			w.spin_until = now_us() + SPIN_US;
		}
		reap(MAX_QUEUED);
	}
	reap(0);
	if (!w.no_gpu[0] && hello_seen)
		wlog("commd closed the socket after %" PRIu64 " ops; releasing", w.ops);
	release_all();
	free(buf);
	return GPU_WORKER_EXIT_OK;
}

/* --- command line ------------------------------------------------------------------------ */

/* Whether a context starts on device d; else the failing call, its error in *e. */
static const char *dev_try(int d, struct cudaDeviceProp *prop, cudaError_t *e)
{
	if ((*e = cudaGetDeviceProperties(prop, d)) != cudaSuccess)
		return "cudaGetDeviceProperties";
	if ((*e = cudaSetDevice(d)) != cudaSuccess)
		return "cudaSetDevice";
	if ((*e = cudaFree(NULL)) != cudaSuccess)
		return "cudaFree";
	return NULL;
}

/*
 * Whether e, from finding the devices or starting one, means that there is
 * no GPU to use rather than one that fails: none, no driver (or a stub
 * libcuda), a driver older than the runtime (a setup to mend, not a
 * failing GPU), or a device in exclusive-process mode that another process
 * holds.
 */
static int no_gpu(cudaError_t e)
{
	return e == cudaErrorNoDevice || e == cudaErrorInsufficientDriver ||
	       e == cudaErrorStubLibrary || e == cudaErrorDevicesUnavailable;
}

/*
 * One line on the node's GPUs. 0 when the devices work (one held by
 * another process is listed unusable); NO_GPU when none can be used for a
 * no_gpu reason; BROKEN when the driver or a device is there but fails
 * (commd does not start then: a GPU node that went on serving host memory
 * only would hide it). Every device is tried, whatever the line can show.
 */
static int probe(void)
{
	char v[128], names[1024] = "", bad[GPU_DETAIL] = "", why[GPU_DETAIL] = "";
	int n = 0, ok = 0;
	size_t at = 0;
	cudaError_t e = cudaGetDeviceCount(&n);

	versions(v, sizeof v);
	if (e != cudaSuccess || n <= 0) {
		int none = e == cudaSuccess || no_gpu(e);

		printf("%s: cudaGetDeviceCount: %s (%s)\n", none ? "unavailable" : "broken",
		       e == cudaSuccess ? "no CUDA device" : cudaGetErrorString(e), v);
		return none ? GPU_WORKER_EXIT_NO_GPU : GPU_WORKER_EXIT_BROKEN;
	}
	n = n < MAX_DEVICES ? n : MAX_DEVICES;
	for (int d = 0; d < n; d++) {
		struct cudaDeviceProp prop;
		const char *call = dev_try(d, &prop, &e);
		char *out = !call ? NULL : no_gpu(e) ? why : bad;

		if (out && !*out)
			snprintf(out, GPU_DETAIL, "device %d: %s: %s", d, call, cudaGetErrorString(e));
		ok += !call;
		if (at >= sizeof names)
			continue;
		if (call)
			at += (size_t)snprintf(names + at, sizeof names - at, "%sunusable (%s: %s)",
					       d ? ", " : "", call, cudaGetErrorString(e));
		else
			at += (size_t)snprintf(names + at, sizeof names - at, "%s%s", d ? ", " : "",
					       prop.name);
	}
	if (*bad) {
		printf("broken: %s; %d device%s: %s (%s)\n", bad, n, n == 1 ? "" : "s", names, v);
		return GPU_WORKER_EXIT_BROKEN;
	}
	if (!ok) {
		printf("unavailable: %s (%s)\n", why, v);
		return GPU_WORKER_EXIT_NO_GPU;
	}
	printf("%d device%s: %s (%s)\n", n, n == 1 ? "" : "s", names, v);
	return GPU_WORKER_EXIT_OK;
}

static void usage(FILE *f)
{
	fprintf(f, "usage: commd-gpu [--worker | --probe | --version | --help]\n"
		   "  --worker   serve commd on fd %d (the default; commd starts it so)\n"
		   "  --probe    print one line on this node's GPUs; exit 0 if they work,\n"
		   "             1 if there is none (or no driver), 5 if one fails\n",
		GPU_WORKER_FD);
}

int main(int argc, char **argv)
{
	const char *a = argc > 1 ? argv[1] : "--worker";

	if (argc > 2) {
		usage(stderr);
		return GPU_WORKER_EXIT_USAGE;
	}
	if (strcmp(a, "--worker") == 0) {
		pid_t parent = getppid();

		/*
		 * In a session of its own (commd's spawn), no terminal signal reaches
		 * it, so it dies with commd, even hung in the driver. A commd already
		 * gone (before prctl took) has closed fd 3: the same as EOF there.
		 */
		if (prctl(PR_SET_PDEATHSIG, SIGKILL) < 0 || getppid() != parent)
			return GPU_WORKER_EXIT_OK;
		return serve();
	}
	if (strcmp(a, "--probe") == 0)
		return probe();
	if (strcmp(a, "--version") == 0) {
		printf("commd-gpu %s\n", COMMD_VERSION);
		return GPU_WORKER_EXIT_OK;
	}
	if (strcmp(a, "--help") == 0) {
		usage(stdout);
		return GPU_WORKER_EXIT_OK;
	}
	usage(stderr);
	return GPU_WORKER_EXIT_USAGE;
}
