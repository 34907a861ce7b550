/*
 * gpu-worker-mem.c: commd-gpu's devices (found, the driver's functions
 * loaded, each one's stream and scratch made on first use) and the ranks'
 * memory it opens: IPC handles, VMM allocations, host memory, events.
 */
#include <config.h>

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "gpu-worker-int.h"
#include "util.h"

/* --- devices -------------------------------------------------------------------- */

void versions(char *out, size_t len)
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
int gpu_open(char *why, size_t len)
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
int dev_ready(int d)
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
int scratch(int d, size_t len)
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

struct mem *mem_find(uint64_t id)
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
comm_result_t mem_open(const struct gpu_mem_open *m, int fd)
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
void mem_release(const struct mem *x)
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
cudaEvent_t event_open(const uint8_t *handle, int dev)
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

