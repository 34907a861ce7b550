/*
 * gpu.c: device buffers. Tells device from host pointers, registers each
 * device allocation with commd once (its cudaIpc handle, or its VMM fd) and
 * records the event an op waits for. Driver functions come through the
 * runtime's entry points: libcomm never links libcuda.
 */
#include <config.h>

#include <link.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "comm-int.h"

#ifdef HAVE_CUDA
#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>

#include "gpu-proto.h"

#define CACHE_MAX 64     /* device allocations a comm keeps registered */
#define FLAG_SLOTS 1024  /* done flags in one device's page */
#define DRIVER_ABI 12000 /* the driver functions' ABI asked for */

_Static_assert(sizeof(cudaIpcMemHandle_t) == GPU_HANDLE_BYTES, "cudaIpcMemHandle_t size");
_Static_assert(sizeof(cudaIpcEventHandle_t) == GPU_HANDLE_BYTES, "cudaIpcEventHandle_t size");

/* A device allocation registered with commd, known by (base, size, buffer id). */
struct dmem {
	struct dmem *next;
	CUdeviceptr base;
	size_t size;
	unsigned long long buffer_id;
	uint64_t mem_id;
	uint64_t last_seq;          /* the op that named it last */
};

/* An interprocess event; busy while an op that carries it is unanswered. */
struct gpu_event {
	struct gpu_event *next;
	cudaEvent_t ev;
	int dev;
	int busy;
	uint8_t handle[GPU_HANDLE_BYTES];
};

/*
 * A device's done flags: 4-byte words in one allocation registered with
 * commd. A slot is busy while its request lives; its value only grows, so
 * a stream waiting for (cyclic) value >= v goes on however late it gets
 * there.
 */
struct flag_page {
	struct flag_page *next;
	int dev;
	uint32_t *ptr;
	uint64_t mem_id;
	cudaStream_t stream;        /* non-blocking: lets a failed op's stream go */
	uint32_t value[FLAG_SLOTS]; /* the last value handed out */
	uint8_t busy[FLAG_SLOTS];
};

struct gpu {
	int ready;                  /* a driver and a device: pointers are asked about */
	int ndev;
	int ctx_seen;               /* a CUDA context was alive in the process */
	const char *missing;        /* a driver function the entry points lack */
	struct {
		PFN_cuGetErrorString_v6000 error_string;
		PFN_cuDeviceGet_v2000 device_get;
		PFN_cuDevicePrimaryCtxGetState_v7000 primary_state;
		PFN_cuCtxGetCurrent_v4000 ctx_get;
		PFN_cuCtxSetCurrent_v4000 ctx_set;
		PFN_cuPointerGetAttribute_v4000 pointer_attr;
		PFN_cuMemGetAddressRange_v3020 address_range;
		PFN_cuMemRetainAllocationHandle_v11000 retain;
		PFN_cuMemGetAllocationPropertiesFromHandle_v10020 properties;
		PFN_cuMemExportToShareableHandle_v10020 export_handle;
		PFN_cuMemRelease_v10020 release;
		PFN_cuStreamWaitValue32_v11070 wait_value; /* NULL: comm_stream_wait waits on the host */
	} cu;
	struct dmem *mems;
	int nmems;
	struct gpu_event *events;
	struct flag_page *flags;
	int no_flags;               /* a page could not be made: no more tries */
	char (*uuid)[GPU_UUID_LEN]; /* per device, "" until asked */
};

/* The caller's context, put back after work on another device. */
struct dev_save {
	CUcontext ctx;
	int switched;
};

/* The runtime's answers that mean: no usable driver or device here. */
static int no_device(cudaError_t e)
{
	return e == cudaErrorInsufficientDriver || e == cudaErrorNoDevice ||
	       e == cudaErrorStubLibrary || e == cudaErrorInitializationError ||
	       e == cudaErrorSystemDriverMismatch || e == cudaErrorCompatNotSupportedOnDevice ||
	       e == cudaErrorDevicesUnavailable;
}

/* The runtime's error string; the failed call's error is not left pending. */
static const char *rt_str(cudaError_t e)
{
	(void)cudaGetLastError();
	return cudaGetErrorString(e);
}

static const char *cu_str(const struct gpu *g, CUresult e)
{
	const char *s = NULL;

	if (g->cu.error_string && g->cu.error_string(e, &s) == CUDA_SUCCESS && s)
		return s;
	return "unknown CUDA driver error";
}

static void entry(struct gpu *g, const char *name, void **fn)
{
	enum cudaDriverEntryPointQueryResult q = cudaDriverEntryPointSymbolNotFound;

	*fn = NULL;
	if (cudaGetDriverEntryPointByVersion(name, fn, DRIVER_ABI, cudaEnableDefault, &q) !=
		    cudaSuccess ||
	    q != cudaDriverEntryPointSuccess || !*fn) {
		(void)cudaGetLastError();
		*fn = NULL;
		if (!g->missing)
			g->missing = name;
	}
}

/* The comm's state: is there a driver and a device, and the driver functions. */
static struct gpu *gpu_start(comm_t *c)
{
	struct gpu *g = calloc(1, sizeof *g);
	int n = 0;

	if (!g)
		return NULL;
	if (cudaGetDeviceCount(&n) != cudaSuccess || n < 1) {
		(void)cudaGetLastError();
		c->gpu = g; /* not ready: every pointer is host memory from now on */
		return g;
	}
	g->uuid = calloc((size_t)n, sizeof *g->uuid);
	if (!g->uuid) {
		free(g);
		return NULL;
	}
	g->ndev = n;
	entry(g, "cuGetErrorString", (void **)&g->cu.error_string);
	entry(g, "cuDeviceGet", (void **)&g->cu.device_get);
	entry(g, "cuDevicePrimaryCtxGetState", (void **)&g->cu.primary_state);
	entry(g, "cuCtxGetCurrent", (void **)&g->cu.ctx_get);
	entry(g, "cuCtxSetCurrent", (void **)&g->cu.ctx_set);
	entry(g, "cuPointerGetAttribute", (void **)&g->cu.pointer_attr);
	entry(g, "cuMemGetAddressRange", (void **)&g->cu.address_range);
	entry(g, "cuMemRetainAllocationHandle", (void **)&g->cu.retain);
	entry(g, "cuMemGetAllocationPropertiesFromHandle", (void **)&g->cu.properties);
	entry(g, "cuMemExportToShareableHandle", (void **)&g->cu.export_handle);
	entry(g, "cuMemRelease", (void **)&g->cu.release);
	if (cudaGetDriverEntryPointByVersion("cuStreamWaitValue32", (void **)&g->cu.wait_value,
					     DRIVER_ABI, cudaEnableDefault, NULL) != cudaSuccess) {
		(void)cudaGetLastError();
		g->cu.wait_value = NULL;
	}
	g->ready = 1;
	c->gpu = g;
	return g;
}

/*
 * Whether device memory can exist: a CUDA context is current here or a
 * primary context is active. Until one is, every pointer is host memory
 * without asking cudaPointerGetAttributes, which would create a context on
 * a process that never used CUDA.
 */
static int ctx_alive(struct gpu *g)
{
	CUcontext cur = NULL;

	if (g->ctx_seen || !g->cu.ctx_get || !g->cu.device_get || !g->cu.primary_state)
		return 1;
	if (g->cu.ctx_get(&cur) == CUDA_SUCCESS && cur)
		return g->ctx_seen = 1;
	for (int i = 0; i < g->ndev; i++) {
		unsigned int flags = 0;
		int active = 0;
		CUdevice d;

		if (g->cu.device_get(&d, i) == CUDA_SUCCESS &&
		    g->cu.primary_state(d, &flags, &active) == CUDA_SUCCESS && active)
			return g->ctx_seen = 1;
	}
	return 0;
}

/* What a look through the loaded objects knows: the count of loads, then and now. */
struct driver_look {
	unsigned long long known, now;
	int first;
};

/* dl_iterate_phdr's step: 1 when this object is the driver, -1 when nothing new was loaded. */
static int driver_step(struct dl_phdr_info *info, size_t size, void *arg)
{
	struct driver_look *l = arg;
	const char *base;

	if (l->first) {
		l->first = 0;
		if (size >= offsetof(struct dl_phdr_info, dlpi_subs)) {
			l->now = info->dlpi_adds;
			if (l->now == l->known)
				return -1;
		}
	}
	base = strrchr(info->dlpi_name, '/');
	base = base ? base + 1 : info->dlpi_name;
	return strncmp(base, "libcuda.so", 10) == 0;
}

/*
 * Whether the process has the CUDA driver library loaded. The runtime loads
 * it at the process's first CUDA call, so without it no pointer can be
 * device memory, and asking the runtime anything (cudaGetDeviceCount) would
 * start the driver: a process that never used CUDA could then not use it in
 * the children it forks. A look with nothing loaded since the last one
 * stops at the first object.
 */
static int driver_loaded(void)
{
	static _Atomic unsigned long long seen;
	struct driver_look l = {atomic_load_explicit(&seen, memory_order_relaxed), 0, 1};
	int r = dl_iterate_phdr(driver_step, &l);

	if (r == 0 && l.now)
		atomic_store_explicit(&seen, l.now, memory_order_relaxed);
	return r == 1;
}

comm_result_t gpu_locate(comm_t *c, const char *op, const char *which, const void *p, int *dev)
{
	struct cudaPointerAttributes a;
	struct gpu *g = c->gpu;
	cudaError_t e;

	*dev = -1;
	if (!g && !driver_loaded())
		return COMM_OK;
	if (!g && !(g = gpu_start(c)))
		return comm_set_error(c, COMM_ERR_NO_MEMORY, "%s: out of memory", op);
	if (!g->ready || !ctx_alive(g))
		return COMM_OK;
	memset(&a, 0, sizeof a);
	e = cudaPointerGetAttributes(&a, p);
	if (e == cudaSuccess) {
		/* managed and host-registered memory take the host path */
		if (a.type == cudaMemoryTypeDevice)
			*dev = a.device;
		return COMM_OK;
	}
	if (no_device(e)) {
		(void)cudaGetLastError();
		g->ready = 0;
		return COMM_OK;
	}
	return comm_set_error(c, COMM_ERR_INVALID_ARG,
			      "%s: %s buffer %p: cannot tell host from device memory: "
			      "cudaPointerGetAttributes: %s",
			      op, which, p, rt_str(e));
}

/* Make dev's primary context current, unless the caller's already is dev's. */
static comm_result_t dev_enter(comm_t *c, const char *op, int dev, struct dev_save *s)
{
	struct gpu *g = c->gpu;
	cudaError_t e;
	int cur = -1;

	s->ctx = NULL;
	s->switched = 0;
	if (g->cu.ctx_get(&s->ctx) == CUDA_SUCCESS && s->ctx && cudaGetDevice(&cur) == cudaSuccess &&
	    cur == dev)
		return COMM_OK;
	e = cudaSetDevice(dev);
	if (e != cudaSuccess)
		return comm_set_error(c, COMM_ERR_INVALID_ARG, "%s: cudaSetDevice(%d): %s", op, dev,
				      rt_str(e));
	s->switched = 1;
	return COMM_OK;
}

/* Put the caller's context back (none, if it had none). */
static void dev_leave(comm_t *c, struct dev_save *s)
{
	if (s->switched)
		c->gpu->cu.ctx_set(s->ctx);
	s->switched = 0;
}

static void mem_unregister(comm_t *c, struct dmem *m, int tell_daemon)
{
	if (tell_daemon)
		mem_forget(c, m->mem_id);
	free(m);
}

/* Unlink *mp from the cache and unregister it. */
static void cache_drop(comm_t *c, struct dmem **mp)
{
	struct dmem *m = *mp;

	*mp = m->next;
	c->gpu->nmems--;
	mem_unregister(c, m, 1);
}

/* The entry for (base, size, id); entries overlapping it are stale: dropped. */
static struct dmem *cache_find(comm_t *c, CUdeviceptr base, size_t size, unsigned long long id)
{
	struct dmem **mp = &c->gpu->mems, *hit = NULL;

	while (*mp) {
		struct dmem *m = *mp;

		if (m->base == base && m->size == size && m->buffer_id == id)
			hit = m;
		else if (m->base < base + size && base < m->base + m->size) {
			cache_drop(c, mp);
			continue;
		}
		mp = &m->next;
	}
	return hit;
}

/*
 * Drop the entries whose allocation is gone (freed, or another in its
 * place), then, when the cache is full, the one least recently used by an
 * op other than the one being posted.
 */
static void cache_trim(comm_t *c)
{
	struct gpu *g = c->gpu;
	struct dmem **mp = &g->mems, **lru = NULL;
	uint64_t keep_from = c->next_seq;

	while (*mp) {
		struct dmem *m = *mp;
		unsigned long long id = 0;
		CUdeviceptr b = 0;
		size_t sz = 0;

		if (g->cu.address_range(&b, &sz, m->base) != CUDA_SUCCESS || b != m->base ||
		    sz != m->size ||
		    g->cu.pointer_attr(&id, CU_POINTER_ATTRIBUTE_BUFFER_ID, m->base) != CUDA_SUCCESS ||
		    id != m->buffer_id) {
			cache_drop(c, mp);
			continue;
		}
		mp = &m->next;
	}
	if (g->nmems < CACHE_MAX)
		return;
	/*
	 * Never one the op being named uses, nor one an op of the open group
	 * does: those ops go out at comm_group_end, after the FreeMem would.
	 */
	if (c->group_depth > 0 && c->group_n > 0)
		keep_from = c->group[0].op.seq;
	for (mp = &g->mems; *mp; mp = &(*mp)->next)
		if ((*mp)->last_seq < keep_from && (!lru || (*mp)->last_seq < (*lru)->last_seq))
			lru = mp;
	if (lru)
		cache_drop(c, lru);
}

/* The POSIX fd of the cuMemCreate allocation at base, for commd. */
static comm_result_t vmm_export(comm_t *c, const char *op, const char *which, CUdeviceptr base,
				int *fd)
{
	struct gpu *g = c->gpu;
	CUmemGenericAllocationHandle h;
	CUmemAllocationProp prop;
	comm_result_t rc = COMM_OK;
	CUresult e;

	e = g->cu.retain(&h, (void *)(uintptr_t)base);
	if (e != CUDA_SUCCESS)
		return comm_set_error(c, COMM_ERR_UNSUPPORTED,
				      "%s: %s buffer is device memory from neither cudaMalloc nor "
				      "cuMemCreate (cuMemRetainAllocationHandle: %s); cudaMallocAsync "
				      "pools are not supported",
				      op, which, cu_str(g, e));
	memset(&prop, 0, sizeof prop);
	e = g->cu.properties(&prop, h);
	if (e == CUDA_SUCCESS && !(prop.requestedHandleTypes & CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR))
		rc = comm_set_error(c, COMM_ERR_UNSUPPORTED,
				    "%s: %s buffer's cuMemCreate allocation is not shareable: create "
				    "it with CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR in "
				    "requestedHandleTypes",
				    op, which);
	else if ((e = g->cu.export_handle(fd, h, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0)) !=
		 CUDA_SUCCESS)
		rc = comm_set_error(c, COMM_ERR_UNSUPPORTED,
				    "%s: %s buffer's cuMemCreate allocation cannot be exported (%s): "
				    "create it with CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR in "
				    "requestedHandleTypes",
				    op, which, cu_str(g, e));
	g->cu.release(h);
	return rc;
}

/* The UUID of device dev, "GPU-...". */
static comm_result_t dev_uuid(comm_t *c, const char *op, int dev, const char **uuid)
{
	struct gpu *g = c->gpu;
	struct cudaDeviceProp prop;
	cudaError_t e;

	if (dev < 0 || dev >= g->ndev)
		return comm_set_error(c, COMM_ERR_INTERNAL, "%s: device %d of %d", op, dev, g->ndev);
	if (!g->uuid[dev][0]) {
		e = cudaGetDeviceProperties(&prop, dev);
		if (e != cudaSuccess)
			return comm_set_error(c, COMM_ERR_INVALID_ARG,
					      "%s: cudaGetDeviceProperties(%d): %s", op, dev,
					      rt_str(e));
		gpu_uuid_format((const unsigned char *)prop.uuid.bytes, g->uuid[dev]);
	}
	*uuid = g->uuid[dev];
	return COMM_OK;
}

/* Register with commd the allocation [base, base+size) with buffer id id, on dev. */
static comm_result_t mem_register(comm_t *c, const char *op, const char *which, int dev,
				  CUdeviceptr base, size_t size, unsigned long long id,
				  uint64_t *mem_id)
{
	Commpb__Envelope env = COMMPB__ENVELOPE__INIT, *reply = NULL;
	Commpb__RegisterMem reg = COMMPB__REGISTER_MEM__INIT;
	struct gpu *g = c->gpu;
	cudaIpcMemHandle_t ipc;
	struct dev_save save;
	const char *uuid = "";
	comm_result_t rc;
	int fd = -1, legacy = 0;
	cudaError_t ce;
	CUresult e;

	rc = dev_uuid(c, op, dev, &uuid);
	if (rc != COMM_OK)
		return rc;
	rc = dev_enter(c, op, dev, &save);
	if (rc != COMM_OK)
		return rc;
	e = g->cu.pointer_attr(&legacy, CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE, base);
	if (e != CUDA_SUCCESS) {
		rc = comm_set_error(c, COMM_ERR_UNSUPPORTED, "%s: %s buffer: cuPointerGetAttribute: %s",
				    op, which, cu_str(g, e));
	} else if (legacy) {
		ce = cudaIpcGetMemHandle(&ipc, (void *)(uintptr_t)base);
		if (ce != cudaSuccess)
			rc = comm_set_error(c, COMM_ERR_UNSUPPORTED,
					    "%s: %s buffer cannot be shared with commd: "
					    "cudaIpcGetMemHandle: %s",
					    op, which, rt_str(ce));
		reg.kind = COMMPB__MEM_KIND__MEM_CUDA_IPC;
		reg.cuda_handle.data = (uint8_t *)ipc.reserved;
		reg.cuda_handle.len = sizeof ipc;
	} else {
		rc = vmm_export(c, op, which, base, &fd);
		reg.kind = COMMPB__MEM_KIND__MEM_CUDA_VMM;
	}
	dev_leave(c, &save);
	if (rc != COMM_OK)
		goto out;
	reg.size = size;
	reg.gpu_uuid = (char *)uuid;
	reg.buffer_id = id;
	env.body_case = COMMPB__ENVELOPE__BODY_REGISTER_MEM;
	env.register_mem = &reg;
	rc = comm_call(c, &env, fd >= 0 ? &fd : NULL, fd >= 0 ? 1 : 0, &reply);
	if (rc != COMM_OK)
		goto out;
	if (reply->body_case != COMMPB__ENVELOPE__BODY_REGISTER_MEM_REPLY)
		rc = comm_set_error(c, COMM_ERR_PROTOCOL, "%s: %s buffer: unexpected answer", op,
				    which);
	else if (reply->register_mem_reply->status != COMM_OK)
		rc = comm_set_error(c,
				    err_known(reply->register_mem_reply->status)
					    ? reply->register_mem_reply->status
					    : COMM_ERR_PROTOCOL,
				    "%s: %s buffer: %s", op, which, reply->register_mem_reply->detail);
	else
		*mem_id = reply->register_mem_reply->mem_id;
out:
	if (reply)
		commpb__envelope__free_unpacked(reply, NULL);
	if (fd >= 0)
		close(fd);
	return rc;
}

comm_result_t gpu_bufref(comm_t *c, const char *op, const char *which, const void *p,
			 size_t len, int dev, Commpb__BufRef *ref)
{
	struct gpu *g = c->gpu;
	CUdeviceptr q = (CUdeviceptr)(uintptr_t)p, base = 0;
	unsigned long long id = 0;
	size_t size = 0, off;
	struct dmem *m;
	comm_result_t rc;
	CUresult e;

	if (g->missing)
		return comm_set_error(c, COMM_ERR_UNSUPPORTED,
				      "%s: %s buffer is device memory, but the CUDA driver lacks %s",
				      op, which, g->missing);
	e = g->cu.address_range(&base, &size, q);
	if (e == CUDA_SUCCESS)
		e = g->cu.pointer_attr(&id, CU_POINTER_ATTRIBUTE_BUFFER_ID, q);
	if (e != CUDA_SUCCESS)
		return comm_set_error(c, COMM_ERR_INVALID_ARG,
				      "%s: %s buffer %p: no device allocation holds it: %s", op, which,
				      p, cu_str(g, e));
	off = (size_t)(q - base);
	if (len > size - off)
		return comm_set_error(c, COMM_ERR_INVALID_ARG,
				      "%s: %s buffer of %zu bytes at offset %zu runs past its device "
				      "allocation of %zu bytes",
				      op, which, len, off, size);
	m = cache_find(c, base, size, id);
	if (!m) {
		cache_trim(c);
		m = calloc(1, sizeof *m);
		if (!m)
			return comm_set_error(c, COMM_ERR_NO_MEMORY, "%s: out of memory", op);
		rc = mem_register(c, op, which, dev, base, size, id, &m->mem_id);
		if (rc != COMM_OK) {
			free(m);
			return rc;
		}
		m->base = base;
		m->size = size;
		m->buffer_id = id;
		m->next = g->mems;
		g->mems = m;
		g->nmems++;
	}
	m->last_seq = c->next_seq;
	ref->mem_id = m->mem_id;
	ref->offset = off;
	return COMM_OK;
}

/* A free event of device dev from the pool, or a new one. */
static comm_result_t event_get(comm_t *c, const char *op, int dev, struct gpu_event **out)
{
	struct gpu *g = c->gpu;
	struct gpu_event *ev;
	cudaError_t e;

	for (ev = g->events; ev; ev = ev->next) {
		if (!ev->busy && ev->dev == dev) {
			*out = ev;
			return COMM_OK;
		}
	}
	ev = calloc(1, sizeof *ev);
	if (!ev)
		return comm_set_error(c, COMM_ERR_NO_MEMORY, "%s: out of memory", op);
	e = cudaEventCreateWithFlags(&ev->ev, cudaEventDisableTiming | cudaEventInterprocess);
	if (e != cudaSuccess) {
		free(ev);
		return comm_set_error(c, COMM_ERR_INVALID_ARG,
				      "%s: an interprocess event on device %d: %s", op, dev,
				      rt_str(e));
	}
	e = cudaIpcGetEventHandle((cudaIpcEventHandle_t *)ev->handle, ev->ev);
	if (e != cudaSuccess) {
		comm_set_error(c, COMM_ERR_UNSUPPORTED, "%s: cudaIpcGetEventHandle: %s", op,
			       rt_str(e));
		cudaEventDestroy(ev->ev);
		free(ev);
		return COMM_ERR_UNSUPPORTED;
	}
	ev->dev = dev;
	ev->next = g->events;
	g->events = ev;
	*out = ev;
	return COMM_OK;
}

comm_result_t gpu_ready_event(comm_t *c, const char *op, comm_request_t *r, int dev,
			      ProtobufCBinaryData *ready)
{
	cudaStream_t stream = (cudaStream_t)c->stream;
	struct gpu_event *ev = NULL;
	struct dev_save save;
	comm_result_t rc;
	cudaError_t e;

	/* the event lives on the stream's device (the legacy stream: the buffers') */
	if (stream && (e = cudaStreamGetDevice(stream, &dev)) != cudaSuccess)
		return comm_set_error(c, COMM_ERR_INVALID_ARG,
				      "%s: the comm's stream: cudaStreamGetDevice: %s", op, rt_str(e));
	rc = dev_enter(c, op, dev, &save);
	if (rc != COMM_OK)
		return rc;
	/*
	 * Nothing queued on the stream is still running: no event to wait for.
	 * Recording one would make the GPU switch to this process's context
	 * and back for every op, which costs a few hundred microseconds
	 * without MPS.
	 */
	if (cudaStreamQuery(stream) == cudaSuccess) {
		dev_leave(c, &save);
		ready->len = 0;
		return COMM_OK;
	}
	rc = event_get(c, op, dev, &ev);
	if (rc == COMM_OK && (e = cudaEventRecord(ev->ev, stream)) != cudaSuccess)
		rc = comm_set_error(c, COMM_ERR_INVALID_ARG,
				    "%s: recording its ready event on the comm's stream: %s", op,
				    rt_str(e));
	dev_leave(c, &save);
	if (rc != COMM_OK)
		return rc;
	ev->busy = 1;
	r->event = ev;
	ready->data = ev->handle;
	ready->len = sizeof ev->handle;
	return COMM_OK;
}

/* Write slot's value from the host, letting go a stream that waits for it. */
static void flag_release(struct flag_page *f, int slot)
{
	cudaError_t e = cudaMemcpyAsync(&f->ptr[slot], &f->value[slot], sizeof *f->ptr,
					cudaMemcpyHostToDevice, f->stream);

	if (e == cudaSuccess)
		e = cudaStreamSynchronize(f->stream);
	if (e != cudaSuccess)
		(void)cudaGetLastError();
}

/* A new page of flags on dev, registered with commd; NULL on failure. */
static struct flag_page *flag_page_new(comm_t *c, int dev)
{
	struct gpu *g = c->gpu;
	struct flag_page *f = calloc(1, sizeof *f);
	unsigned long long id = 0;
	struct dev_save save;
	void *p = NULL;
	int ok;

	if (!f || dev_enter(c, "done flags", dev, &save) != COMM_OK) {
		free(f);
		return NULL;
	}
	/* zeroed on the page's own stream, done before the worker may write */
	ok = cudaMalloc(&p, FLAG_SLOTS * sizeof *f->ptr) == cudaSuccess &&
	     cudaStreamCreateWithFlags(&f->stream, cudaStreamNonBlocking) == cudaSuccess &&
	     cudaMemsetAsync(p, 0, FLAG_SLOTS * sizeof *f->ptr, f->stream) == cudaSuccess &&
	     cudaStreamSynchronize(f->stream) == cudaSuccess;
	ok = ok && g->cu.pointer_attr(&id, CU_POINTER_ATTRIBUTE_BUFFER_ID,
				      (CUdeviceptr)(uintptr_t)p) == CUDA_SUCCESS;
	dev_leave(c, &save);
	if (ok && mem_register(c, "done flags", "flag", dev, (CUdeviceptr)(uintptr_t)p,
			       FLAG_SLOTS * sizeof *f->ptr, id, &f->mem_id) == COMM_OK) {
		f->dev = dev;
		f->ptr = p;
		f->next = g->flags;
		g->flags = f;
		return f;
	}
	if (!ok)
		(void)cudaGetLastError();
	if (f->stream)
		cudaStreamDestroy(f->stream);
	cudaFree(p);
	free(f);
	return NULL;
}

void gpu_done_flag(comm_t *c, comm_request_t *r, int dev, Commpb__Op *op)
{
	struct gpu *g = c->gpu;
	struct flag_page *f;
	int slot = -1;

	if (!g->cu.wait_value || g->no_flags)
		return;
	for (f = g->flags; f && slot < 0; f = f->next) {
		if (f->dev != dev)
			continue;
		for (int i = 0; i < FLAG_SLOTS && slot < 0; i++)
			if (!f->busy[i])
				slot = i;
		if (slot >= 0)
			break;
	}
	if (slot < 0) {
		f = flag_page_new(c, dev);
		if (!f) {
			g->no_flags = 1;
			return;
		}
		slot = 0;
	}
	f->busy[slot] = 1;
	f->value[slot]++;
	r->flag = f;
	r->flag_slot = slot;
	r->done_ref = (Commpb__BufRef)COMMPB__BUF_REF__INIT;
	r->done_ref.mem_id = f->mem_id;
	r->done_ref.offset = (uint64_t)slot * sizeof *f->ptr;
	op->done = &r->done_ref;
	op->done_value = f->value[slot];
}

void gpu_req_done(comm_request_t *r)
{
	/* the worker writes the flag only for an op that ran */
	if (r->flag && r->detached && r->rc != COMM_OK && !r->flag_set) {
		flag_release(r->flag, r->flag_slot);
		r->flag_set = 1;
	}
}

void gpu_req_release(comm_request_t *r)
{
	if (r->event)
		r->event->busy = 0;
	r->event = NULL;
	if (!r->flag)
		return;
	gpu_req_done(r);
	r->flag->busy[r->flag_slot] = 0;
	r->flag = NULL;
}

void gpu_free_all(comm_t *c, int tell_daemon)
{
	struct gpu *g = c->gpu;

	if (!g)
		return;
	while (g->mems) {
		struct dmem *m = g->mems;

		g->mems = m->next;
		mem_unregister(c, m, tell_daemon);
	}
	while (g->events) {
		struct gpu_event *ev = g->events;

		g->events = ev->next;
		cudaEventDestroy(ev->ev);
		free(ev);
	}
	/* streams still waiting for an op of a comm that goes away go on */
	for (comm_request_t *r = c->reqs; r; r = r->next) {
		if (r->flag && r->detached && !r->flag_set)
			flag_release(r->flag, r->flag_slot);
		r->event = NULL;
		r->flag = NULL;
	}
	while (g->flags) {
		struct flag_page *f = g->flags;

		g->flags = f->next;
		if (tell_daemon)
			mem_forget(c, f->mem_id);
		cudaStreamDestroy(f->stream);
		cudaFree(f->ptr);
		free(f);
	}
	free(g->uuid);
	free(g);
	c->gpu = NULL;
}

COMM_API comm_result_t comm_set_stream(comm_t *c, void *stream)
{
	if (!c)
		return COMM_ERR_INVALID_ARG;
	c->stream = stream;
	return COMM_OK;
}

COMM_API comm_result_t comm_stream_wait(comm_request_t *r, void *stream)
{
	comm_t *c;
	struct dev_save save;
	int dev = -1;
	CUresult e;

	if (!r)
		return COMM_ERR_INVALID_ARG;
	c = r->comm;
	if (c->forked)
		return comm_refuse(c, "stream wait");
	if (r->parts)
		return req_parts_stream_wait(r, stream);
	if (r->unsent)
		return comm_set_error(c, COMM_ERR_INVALID_ARG,
				      "stream wait: the request's group has not ended yet");
	if (r->detached)
		return comm_set_error(c, COMM_ERR_INVALID_ARG,
				      "stream wait: the request was handed to a stream already");
	ring_reap(c);
	if (c->broken == COMM_OK)
		comm_pump(c, 0);
	req_reap(c);
	/* done already (results in place), or no flag on the stream's device: the host waits */
	if (r->done || !r->flag)
		return comm_wait(r, -1);
	if (cudaStreamGetDevice((cudaStream_t)stream, &dev) != cudaSuccess) {
		(void)cudaGetLastError();
		return comm_wait(r, -1);
	}
	if (dev != r->flag->dev)
		return comm_wait(r, -1);
	if (dev_enter(c, "stream wait", dev, &save) != COMM_OK)
		return comm_wait(r, -1);
	e = c->gpu->cu.wait_value((CUstream)stream,
				  (CUdeviceptr)(uintptr_t)&r->flag->ptr[r->flag_slot],
				  r->flag->value[r->flag_slot], CU_STREAM_WAIT_VALUE_GEQ);
	dev_leave(c, &save);
	if (e != CUDA_SUCCESS) {
		comm_set_error(c, COMM_ERR_INVALID_ARG, "stream wait: cuStreamWaitValue32: %s",
			       cu_str(c->gpu, e));
		return comm_wait(r, -1);
	}
	r->detached = 1;
	return COMM_OK;
}

#else /* !HAVE_CUDA */

comm_result_t gpu_locate(comm_t *c, const char *op, const char *which, const void *p, int *dev)
{
	*dev = -1;
	return COMM_OK;
}

comm_result_t gpu_bufref(comm_t *c, const char *op, const char *which, const void *p,
			 size_t len, int dev, Commpb__BufRef *ref)
{
	return comm_set_error(c, COMM_ERR_UNSUPPORTED, "%s: libcomm was built without CUDA", op);
}

comm_result_t gpu_ready_event(comm_t *c, const char *op, comm_request_t *r, int dev,
			      ProtobufCBinaryData *ready)
{
	return comm_set_error(c, COMM_ERR_UNSUPPORTED, "%s: libcomm was built without CUDA", op);
}

void gpu_done_flag(comm_t *c, comm_request_t *r, int dev, Commpb__Op *op)
{
}

void gpu_req_done(comm_request_t *r)
{
}

void gpu_req_release(comm_request_t *r)
{
}

void gpu_free_all(comm_t *c, int tell_daemon)
{
}

COMM_API comm_result_t comm_set_stream(comm_t *c, void *stream)
{
	if (!c)
		return COMM_ERR_INVALID_ARG;
	if (stream)
		return comm_set_error(c, COMM_ERR_UNSUPPORTED,
				      "set stream: libcomm was built without CUDA");
	return COMM_OK;
}

COMM_API comm_result_t comm_stream_wait(comm_request_t *r, void *stream)
{
	if (!r)
		return COMM_ERR_INVALID_ARG;
	if (stream)
		return comm_set_error(r->comm, COMM_ERR_UNSUPPORTED,
				      "stream wait: libcomm was built without CUDA");
	return comm_wait(r, -1);
}

#endif
