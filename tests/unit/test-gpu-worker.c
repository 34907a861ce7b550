/*
 * test-gpu-worker.c: commd-gpu ($COMMD_GPU) over a real socketpair: its
 * replies, the packets that make it exit, the fds it must not keep; where a
 * GPU works, real ops on IPC and VMM memory checked against reduce_n, and
 * copies to and from host memory (commd's staging buffers).
 */
#include <config.h>

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>

#include "check.h"
#include "comm.h"
#include "commd.pb-c.h"
#include "dtype.h"
#include "gpu-proto.h"
#include "gpu-result.h"
#include "gpu-worker.h"
#include "reduce.h"

#define T(x) COMMPB__OP_TYPE__OP_##x

static const char *worker_path;

struct worker {
	pid_t pid;
	int fd;
	char log[64];
};

static void worker_start(struct worker *wk)
{
	int sv[2], logfd;

	REQUIRE(socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) == 0, "socketpair: %s",
		strerror(errno));
	snprintf(wk->log, sizeof wk->log, "/tmp/test-gpu-worker-XXXXXX");
	logfd = mkostemp(wk->log, O_CLOEXEC);
	REQUIRE(logfd >= 0, "mkostemp: %s", strerror(errno));
	wk->pid = fork();
	REQUIRE(wk->pid >= 0, "fork: %s", strerror(errno));
	if (wk->pid == 0) {
		/* above 10 first, so that dup2 never meets its own fd and keeps CLOEXEC */
		int s = fcntl(sv[1], F_DUPFD_CLOEXEC, 10), l = fcntl(logfd, F_DUPFD_CLOEXEC, 10);

		if (s < 0 || l < 0 || dup2(s, GPU_WORKER_FD) < 0 || dup2(l, 2) < 0)
			_exit(127);
		execl(worker_path, worker_path, (char *)NULL);
		_exit(127);
	}
	close(sv[1]);
	close(logfd);
	wk->fd = sv[0];
}

/* Close our end (EOF for the worker) and return its exit status; 128+sig if killed. */
static int worker_stop(struct worker *wk)
{
	int st;

	close(wk->fd);
	REQUIRE(waitpid(wk->pid, &st, 0) == wk->pid, "waitpid: %s", strerror(errno));
	return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

/* Whether the worker's stderr holds s; the log is removed when done. */
static int worker_logged(struct worker *wk, const char *s, int done)
{
	char buf[16384];
	FILE *f = fopen(wk->log, "r");
	size_t n = f ? fread(buf, 1, sizeof buf - 1, f) : 0;

	if (f)
		fclose(f);
	buf[n] = '\0';
	if (done)
		unlink(wk->log);
	return strstr(buf, s) != NULL;
}

static void send_pkt(int fd, const void *buf, size_t len, int passfd)
{
	union {
		struct cmsghdr h;
		char b[CMSG_SPACE(sizeof(int))];
	} ctl;
	struct iovec iov = { .iov_base = (void *)buf, .iov_len = len };
	struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1 };

	if (passfd >= 0) {
		struct cmsghdr *c;

		memset(&ctl, 0, sizeof ctl);
		msg.msg_control = ctl.b;
		msg.msg_controllen = sizeof ctl.b;
		c = CMSG_FIRSTHDR(&msg);
		c->cmsg_level = SOL_SOCKET;
		c->cmsg_type = SCM_RIGHTS;
		c->cmsg_len = CMSG_LEN(sizeof(int));
		memcpy(CMSG_DATA(c), &passfd, sizeof(int));
	}
	REQUIRE(sendmsg(fd, &msg, MSG_NOSIGNAL) == (ssize_t)len, "sendmsg: %s", strerror(errno));
}

/* The worker's next packet, which must be a whole reply of type. */
static struct gpu_status recv_status(int fd, uint32_t type)
{
	union {
		struct gpu_status s;
		char b[sizeof(struct gpu_status) + 16];
	} u;
	struct pollfd pfd = { .fd = fd, .events = POLLIN };
	ssize_t n;

	REQUIRE(poll(&pfd, 1, 60000) == 1, "no reply from the worker in 60 s");
	n = recv(fd, u.b, sizeof u.b, 0);
	REQUIRE(n == (ssize_t)sizeof u.s, "reply of %zd bytes, expected %zu", n, sizeof u.s);
	CHECK(u.s.h.version == GPU_PROTO_VERSION, "reply version %u", u.s.h.version);
	REQUIRE(u.s.h.type == type, "reply type %u, expected %u", u.s.h.type, type);
	REQUIRE(memchr(u.s.detail, '\0', sizeof u.s.detail), "detail is not terminated");
	return u.s;
}

static struct gpu_status hello(struct worker *wk)
{
	struct gpu_hello h = { .h = { GPU_MSG_HELLO, GPU_PROTO_VERSION }, .world = 3 };

	snprintf(h.job, sizeof h.job, "test-job");
	send_pkt(wk->fd, &h, sizeof h, -1);
	return recv_status(wk->fd, GPU_MSG_HELLO_REPLY);
}

static struct gpu_mem_open mem_msg(uint64_t id, uint32_t kind, uint64_t size, const char *uuid)
{
	struct gpu_mem_open m = { .h = { GPU_MSG_MEM_OPEN, GPU_PROTO_VERSION }, .id = id,
				  .kind = kind, .rank = 1, .size = size };

	snprintf(m.uuid, sizeof m.uuid, "%s", uuid);
	return m;
}

static struct gpu_status mem_open(struct worker *wk, const struct gpu_mem_open *m, int fd)
{
	struct gpu_status s;

	send_pkt(wk->fd, m, sizeof *m, fd);
	s = recv_status(wk->fd, GPU_MSG_MEM_OPENED);
	CHECK(s.id == m->id, "mem opened id %llu, sent %llu", (unsigned long long)s.id,
	      (unsigned long long)m->id);
	return s;
}

static void mem_close(struct worker *wk, uint64_t id)
{
	struct gpu_mem_close m = { .h = { GPU_MSG_MEM_CLOSE, GPU_PROTO_VERSION }, .id = id };

	send_pkt(wk->fd, &m, sizeof m, -1);
}

/* Send an op of n ranks (the packet may claim another n) and return its OP_DONE. */
static struct gpu_status op_run(struct worker *wk, uint64_t id, uint32_t type, int dtype,
				int redop, int root, size_t count, int n, uint32_t claim_n,
				const struct gpu_op_rank *ranks)
{
	size_t len = sizeof(struct gpu_op) + (size_t)n * sizeof(struct gpu_op_rank);
	struct gpu_op *op = calloc(1, len);
	struct gpu_status s;

	REQUIRE(op, "calloc");
	*op = (struct gpu_op){ .h = { GPU_MSG_OP, GPU_PROTO_VERSION }, .id = id, .type = type,
			       .dtype = (uint32_t)dtype, .redop = (uint32_t)redop, .root = root,
			       .count = count, .n = claim_n };
	memcpy(op->rank, ranks, (size_t)n * sizeof *ranks);
	send_pkt(wk->fd, op, len, -1);
	free(op);
	s = recv_status(wk->fd, GPU_MSG_OP_DONE);
	CHECK(s.id == id, "op done id %llu, sent %llu", (unsigned long long)s.id,
	      (unsigned long long)id);
	return s;
}

static int fd_count(pid_t pid)
{
	char path[64];
	struct dirent *e;
	DIR *d;
	int n = 0;

	snprintf(path, sizeof path, "/proc/%d/fd", (int)pid);
	d = opendir(path);
	REQUIRE(d, "opendir %s: %s", path, strerror(errno));
	while ((e = readdir(d)))
		n += e->d_name[0] != '.';
	closedir(d);
	return n;
}

/* --probe: one line, and its exit status says whether a GPU works. */
static int test_probe(void)
{
	char cmd[4200], line[1024], more[64];
	FILE *f;
	int st, gpu;

	snprintf(cmd, sizeof cmd, "'%s' --probe", worker_path);
	f = popen(cmd, "r");
	REQUIRE(f, "popen: %s", strerror(errno));
	REQUIRE(fgets(line, sizeof line, f), "--probe printed nothing");
	CHECK(!fgets(more, sizeof more, f), "--probe printed a second line: %s", more);
	st = pclose(f);
	REQUIRE(WIFEXITED(st), "--probe did not exit");
	gpu = WEXITSTATUS(st) == 0;
	if (gpu) {
		CHECK(strstr(line, " device") && strstr(line, "cuda runtime") && strstr(line, "nccl"),
		      "--probe: %s", line);
	} else {
		CHECK(WEXITSTATUS(st) == GPU_WORKER_EXIT_NO_GPU, "--probe exit %d", WEXITSTATUS(st));
		CHECK(strncmp(line, "unavailable: ", 13) == 0, "--probe: %s", line);
		/* "device 0: ..." where every device is held by another process */
		CHECK(strstr(line, "cudaGetDeviceCount: ") || strstr(line, "device 0: "),
		      "--probe names no failing call: %s", line);
	}
	printf("probe: %s", line);
	return gpu;
}

/*
 * The codes a failed open answers (gpu-result.h): out of memory is
 * NO_MEMORY and a driver failing INTERNAL, never INVALID_ARG (they all were).
 */
static void test_results(void)
{
	static const struct {
		cudaError_t e;
		comm_result_t want;
	} rt[] = {
		{ cudaSuccess, COMM_OK },
		{ cudaErrorMemoryAllocation, COMM_ERR_NO_MEMORY },
		{ cudaErrorTooManyPeers, COMM_ERR_NO_MEMORY },
		{ cudaErrorInvalidValue, COMM_ERR_INVALID_ARG },
		{ cudaErrorInvalidResourceHandle, COMM_ERR_INVALID_ARG },
		{ cudaErrorMapBufferObjectFailed, COMM_ERR_INVALID_ARG },
		{ cudaErrorNotSupported, COMM_ERR_UNSUPPORTED },
		{ cudaErrorDevicesUnavailable, COMM_ERR_BUSY },
		{ cudaErrorInsufficientDriver, COMM_ERR_INTERNAL },
		{ cudaErrorECCUncorrectable, COMM_ERR_INTERNAL },
		{ cudaErrorLaunchFailure, COMM_ERR_INTERNAL },
		{ cudaErrorUnknown, COMM_ERR_INTERNAL },
	};
	static const struct {
		CUresult r;
		comm_result_t want;
	} drv[] = {
		{ CUDA_SUCCESS, COMM_OK },
		{ CUDA_ERROR_OUT_OF_MEMORY, COMM_ERR_NO_MEMORY },
		{ CUDA_ERROR_INVALID_VALUE, COMM_ERR_INVALID_ARG },
		{ CUDA_ERROR_INVALID_HANDLE, COMM_ERR_INVALID_ARG },
		{ CUDA_ERROR_NOT_SUPPORTED, COMM_ERR_UNSUPPORTED },
		{ CUDA_ERROR_NOT_PERMITTED, COMM_ERR_UNSUPPORTED },
		{ CUDA_ERROR_DEVICE_UNAVAILABLE, COMM_ERR_BUSY },
		{ CUDA_ERROR_NOT_INITIALIZED, COMM_ERR_INTERNAL },
		{ CUDA_ERROR_ECC_UNCORRECTABLE, COMM_ERR_INTERNAL },
		{ CUDA_ERROR_UNKNOWN, COMM_ERR_INTERNAL },
	};

	for (size_t i = 0; i < sizeof rt / sizeof rt[0]; i++)
		CHECK(gpu_cuda_result(rt[i].e) == rt[i].want, "%s is %s, not %s",
		      cudaGetErrorName(rt[i].e), comm_result_name(gpu_cuda_result(rt[i].e)),
		      comm_result_name(rt[i].want));
	for (size_t i = 0; i < sizeof drv / sizeof drv[0]; i++)
		CHECK(gpu_cu_result(drv[i].r) == drv[i].want, "CUresult %d is %s, not %s",
		      (int)drv[i].r, comm_result_name(gpu_cu_result(drv[i].r)),
		      comm_result_name(drv[i].want));
}

/* Without a GPU: every request answered COMM_ERR_UNSUPPORTED, with its id. */
static void test_unsupported(void)
{
	struct worker wk;
	struct gpu_status s;
	struct gpu_op_rank r[2] = { { .send_mem = 41, .recv_mem = 41 }, { .send_mem = 42 } };
	struct gpu_mem_open m = mem_msg(41, GPU_MEM_IPC, 4096, "GPU-00000000-0000-0000-0000-000000000000");

	worker_start(&wk);
	s = hello(&wk);
	CHECK(s.id == 0, "hello reply id %llu", (unsigned long long)s.id);
	CHECK(s.status == COMM_ERR_UNSUPPORTED, "hello status %d", s.status);
	CHECK(strstr(s.detail, "cudaGetDeviceCount"), "hello detail: %s", s.detail);
	s = mem_open(&wk, &m, -1);
	CHECK(s.status == COMM_ERR_UNSUPPORTED && s.detail[0], "mem open: %d %s", s.status, s.detail);
	mem_close(&wk, 41); /* answered by nothing: the next reply is the op's */
	s = op_run(&wk, 7, T(ALLREDUCE), COMM_FLOAT32, COMM_SUM, 0, 16, 2, 2, r);
	CHECK(s.status == COMM_ERR_UNSUPPORTED && strstr(s.detail, "cudaGetDeviceCount"),
	      "op: %d %s", s.status, s.detail);
	CHECK(worker_stop(&wk) == GPU_WORKER_EXIT_OK, "exit after EOF");
	CHECK(!worker_logged(&wk, "malformed", 1), "a well-formed session was called malformed");
}

/* Each packet, after a good hello when after_hello, makes the worker exit 3. */
static void expect_malformed(const char *what, const void *pkt, size_t len, int after_hello)
{
	struct worker wk;
	struct gpu_status s;
	struct pollfd pfd = { .events = POLLIN };
	int rc;

	worker_start(&wk);
	pfd.fd = wk.fd;
	if (after_hello)
		hello(&wk);
	send_pkt(wk.fd, pkt, len, -1);
	/* the worker must close its end unprompted, not answer */
	REQUIRE(poll(&pfd, 1, 10000) == 1, "%s: the worker neither answered nor exited", what);
	CHECK(recv(wk.fd, &s, sizeof s, 0) == 0, "%s: the worker answered", what);
	rc = worker_stop(&wk);
	CHECK(rc == GPU_WORKER_EXIT_PROTOCOL, "%s: exit %d, expected %d", what, rc,
	      GPU_WORKER_EXIT_PROTOCOL);
	CHECK(worker_logged(&wk, "commd-gpu", 1), "%s: nothing logged", what);
}

static void test_malformed(void)
{
	struct gpu_hello h = { .h = { GPU_MSG_HELLO, GPU_PROTO_VERSION + 1 } };
	struct gpu_mem_close c = { .h = { GPU_MSG_MEM_CLOSE, GPU_PROTO_VERSION }, .id = 1 };
	struct gpu_hdr unknown = { 99, GPU_PROTO_VERSION }, reply = { GPU_MSG_OP_DONE, GPU_PROTO_VERSION };
	uint8_t op[sizeof(struct gpu_op) + 8] = { 0 };
	struct gpu_hdr oph = { GPU_MSG_OP, GPU_PROTO_VERSION };
	struct gpu_hello again = { .h = { GPU_MSG_HELLO, GPU_PROTO_VERSION } };

	memcpy(op, &oph, sizeof oph);
	expect_malformed("wrong version", &h, sizeof h, 0);
	expect_malformed("short packet", &h, 4, 0);
	expect_malformed("short hello", &again, sizeof again - 1, 0);
	expect_malformed("mem close before hello", &c, sizeof c, 0);
	expect_malformed("long mem close", &again, sizeof c + 1, 1); /* type HELLO: second hello */
	expect_malformed("unknown type", &unknown, sizeof unknown, 1);
	expect_malformed("a reply type", &reply, sizeof reply, 1);
	expect_malformed("op with part of a rank", op, sizeof op, 1);
	expect_malformed("second hello", &again, sizeof again, 1);
	c.h.version = 0;
	expect_malformed("version 0 after hello", &c, sizeof c, 1);
}

/* EOF before and after hello: exit 0. */
static void test_eof(void)
{
	struct worker wk;

	worker_start(&wk);
	CHECK(worker_stop(&wk) == GPU_WORKER_EXIT_OK, "EOF before hello");
	worker_logged(&wk, "", 1);
	worker_start(&wk);
	hello(&wk);
	CHECK(worker_stop(&wk) == GPU_WORKER_EXIT_OK, "EOF after hello");
	worker_logged(&wk, "", 1);
}

/*
 * fds riding with packets are closed: a VMM open's (refused: a memfd is no
 * CUDA allocation) and a stray one. The first round lets CUDA open its own.
 */
static void test_fds(const char *uuid)
{
	struct worker wk;
	struct gpu_mem_open vmm = mem_msg(51, GPU_MEM_VMM, 1 << 20, uuid);
	struct gpu_mem_open ipc = mem_msg(52, GPU_MEM_IPC, 1 << 20, uuid);
	struct gpu_status s;
	int mfd = memfd_create("test-gpu-worker", MFD_CLOEXEC), before = 0;

	REQUIRE(mfd >= 0 && ftruncate(mfd, 1 << 20) == 0, "memfd: %s", strerror(errno));
	worker_start(&wk);
	hello(&wk);
	for (int round = 0; round < 3; round++) {
		s = mem_open(&wk, &vmm, mfd);
		CHECK(s.status != COMM_OK, "a memfd opened as VMM memory");
		s = mem_open(&wk, &ipc, mfd);
		CHECK(s.status != COMM_OK, "a zero IPC handle opened");
		if (round == 1)
			before = fd_count(wk.pid);
	}
	CHECK(fd_count(wk.pid) == before, "worker holds %d fds, had %d", fd_count(wk.pid), before);
	CHECK(worker_stop(&wk) == GPU_WORKER_EXIT_OK, "exit after EOF");
	worker_logged(&wk, "", 1);
	close(mfd);
}

/* --- with a GPU: real ops ---------------------------------------------------------- */

#define ALLOC_BYTES (16u << 20)
#define NALLOC 4 /* 3 by cudaMalloc (IPC), 1 by cuMemCreate (VMM) */
#define CUDA_REQ(call) cuda_req((call), #call)
#define CU_REQ(call) cu_req((call), #call)

static void cuda_req(cudaError_t e, const char *call)
{
	REQUIRE(e == cudaSuccess, "%s: %s", call, cudaGetErrorString(e));
}

static void cu_req(CUresult r, const char *call)
{
	REQUIRE(r == CUDA_SUCCESS, "%s: CUresult %d", call, (int)r);
}

static struct alloc {
	uint64_t id;
	uint8_t *dev;
	size_t size;
	uint8_t *before, *after, *got;
} al[NALLOC];

/* One rank of a test op: its buffers at offsets into allocation a (id: another id of it). */
struct trank {
	int a, send, recv;
	size_t soff, roff;
	uint64_t id;
};
#define TR(a, send, recv, soff, roff) { a, send, recv, soff, roff, 0 }
#define TRID(a, send, recv, soff, roff, id) { a, send, recv, soff, roff, id }

static struct {
	PFN_cuMemCreate_v10020 create;
	PFN_cuMemExportToShareableHandle_v10020 export_fd;
	PFN_cuMemGetAllocationGranularity_v10020 granularity;
	PFN_cuMemAddressReserve_v10020 reserve;
	PFN_cuMemMap_v10020 map;
	PFN_cuMemSetAccess_v10020 set_access;
} du;

static cudaIpcEventHandle_t ev_handle;
static uint64_t next_op = 100;

static void du_load(void)
{
	const struct {
		const char *name;
		void **fn;
	} syms[] = {
		{ "cuMemCreate", (void **)&du.create },
		{ "cuMemExportToShareableHandle", (void **)&du.export_fd },
		{ "cuMemGetAllocationGranularity", (void **)&du.granularity },
		{ "cuMemAddressReserve", (void **)&du.reserve },
		{ "cuMemMap", (void **)&du.map },
		{ "cuMemSetAccess", (void **)&du.set_access },
	};

	for (size_t i = 0; i < sizeof syms / sizeof syms[0]; i++) {
		enum cudaDriverEntryPointQueryResult q;

		REQUIRE(cudaGetDriverEntryPointByVersion(syms[i].name, syms[i].fn, 12000,
							 cudaEnableDefault, &q) == cudaSuccess &&
				q == cudaDriverEntryPointSuccess,
			"driver entry point %s", syms[i].name);
	}
}

/* A VMM allocation on device 0 mapped here; *fd exports it. */
static void vmm_alloc(struct alloc *a, int *fd)
{
	CUmemAllocationProp prop = {
		.type = CU_MEM_ALLOCATION_TYPE_PINNED,
		.location = { .type = CU_MEM_LOCATION_TYPE_DEVICE, .id = 0 },
		.requestedHandleTypes = CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR,
	};
	CUmemAccessDesc acc = { .location = prop.location, .flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE };
	CUmemGenericAllocationHandle h;
	CUdeviceptr va;
	size_t g;

	du_load();
	CU_REQ(du.granularity(&g, &prop, CU_MEM_ALLOC_GRANULARITY_MINIMUM));
	a->size = (ALLOC_BYTES + g - 1) / g * g;
	CU_REQ(du.create(&h, a->size, &prop, 0));
	CU_REQ(du.export_fd(fd, h, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0));
	CU_REQ(du.reserve(&va, a->size, 0, 0, 0));
	CU_REQ(du.map(va, a->size, 0, h, 0));
	CU_REQ(du.set_access(va, a->size, &acc, 1));
	a->dev = (uint8_t *)(uintptr_t)va;
}

/* Random values that are finite in every float type, any bits in the integers. */
static void fill(uint8_t *p, size_t len, int dtype)
{
	size_t es = dtype_size(dtype);

	for (size_t i = 0; i + es <= len; i += es) {
		int v = rand() % 20001 - 10000;
		float f = (float)v / 7.0f;
		double d = (double)v / 7.0;
		uint16_t h = dtype == COMM_FLOAT16 ? float_to_half(f / 370.0f) : float_to_bf16(f);

		if (dtype == COMM_FLOAT16 || dtype == COMM_BFLOAT16)
			memcpy(p + i, &h, 2);
		else if (dtype == COMM_FLOAT32)
			memcpy(p + i, &f, 4);
		else if (dtype == COMM_FLOAT64)
			memcpy(p + i, &d, 8);
		else
			for (size_t k = 0; k < es; k++)
				p[i + k] = (uint8_t)rand();
	}
}

/* What the op must leave in the allocations: after[] from before[]. */
static void ref_op(uint32_t type, int dtype, int redop, int root, size_t count, int n,
		   const struct trank *tr)
{
	size_t blk = count * dtype_size(dtype);
	const void *in[8];
	uint8_t *out[8], *tmp = malloc(blk * (size_t)n + 1);

	REQUIRE(tmp, "malloc");
	for (int r = 0; r < n; r++) {
		in[r] = tr[r].send ? al[tr[r].a].before + tr[r].soff : NULL;
		out[r] = tr[r].recv ? al[tr[r].a].after + tr[r].roff : NULL;
	}
	if (type == T(ALLREDUCE) || type == T(REDUCE) || type == T(REDUCE_SCATTER))
		reduce_n(dtype, redop, tmp, in, n, type == T(REDUCE_SCATTER) ? count * n : count);
	for (int r = 0; r < n; r++) {
		if (!out[r] || (type == T(REDUCE) && r != root))
			continue;
		if (type == T(ALLREDUCE) || type == T(REDUCE))
			memcpy(out[r], tmp, blk);
		else if (type == T(REDUCE_SCATTER))
			memcpy(out[r], tmp + r * blk, blk);
		else if (type == T(BROADCAST))
			memcpy(out[r], in[root], blk);
		else if (type == T(ALLGATHER))
			for (int b = 0; b < n; b++)
				memcpy(out[r] + b * blk, in[b], blk);
		else if (type == T(ALLTOALL))
			for (int b = 0; b < n; b++)
				memcpy(out[r] + b * blk, (const uint8_t *)in[b] + r * blk, blk);
		else
			memcpy(out[r], in[r], blk); /* send */
	}
	free(tmp);
}

/* Run one op on fresh data and compare every touched allocation with ref_op's. */
static void gpu_case(struct worker *wk, const char *what, uint32_t type, int dtype, int redop,
		     int root, size_t count, int n, const struct trank *tr, int ev_rank)
{
	int in_n = type == T(REDUCE_SCATTER) || type == T(ALLTOALL);
	int out_n = type == T(ALLGATHER) || type == T(ALLTOALL);
	size_t blk = count * dtype_size(dtype), span = 0;
	struct gpu_op_rank ranks[8];
	struct gpu_status s;
	int used[NALLOC] = { 0 };

	memset(ranks, 0, sizeof ranks);
	for (int r = 0; r < n; r++) {
		size_t s_end = tr[r].soff + blk * (in_n ? n : 1), r_end = tr[r].roff + blk * (out_n ? n : 1);
		uint64_t id = tr[r].id ? tr[r].id : al[tr[r].a].id;

		span = tr[r].send && s_end > span ? s_end : span;
		span = tr[r].recv && r_end > span ? r_end : span;
		used[tr[r].a] = 1;
		ranks[r] = (struct gpu_op_rank){ .send_mem = tr[r].send ? id : 0, .send_off = tr[r].soff,
						 .recv_mem = tr[r].recv ? id : 0, .recv_off = tr[r].roff };
	}
	span = (span + 4096 + 7) / 8 * 8;
	REQUIRE(span <= ALLOC_BYTES, "%s: span %zu", what, span);
	for (int a = 0; a < NALLOC; a++) {
		if (!used[a])
			continue;
		fill(al[a].before, span, dtype);
		memcpy(al[a].after, al[a].before, span);
		CUDA_REQ(cudaMemcpy(al[a].dev, al[a].before, span, cudaMemcpyHostToDevice));
	}
	if (ev_rank >= 0) {
		memcpy(ranks[ev_rank].ready_event, &ev_handle, sizeof ev_handle);
		ranks[ev_rank].has_event = 1;
	}
	ref_op(type, dtype, redop, root, count, n, tr);
	s = op_run(wk, next_op++, type, dtype, redop, root, count, n, (uint32_t)n, ranks);
	CHECK(s.status == COMM_OK, "%s: status %d: %s", what, s.status, s.detail);
	for (int a = 0; a < NALLOC; a++) {
		if (!used[a])
			continue;
		CUDA_REQ(cudaMemcpy(al[a].got, al[a].dev, span, cudaMemcpyDeviceToHost));
		for (size_t i = 0; i < span; i++)
			if (al[a].got[i] != al[a].after[i]) {
				CHECK(0, "%s: allocation %d byte %zu is %02x, want %02x (was %02x)", what,
				      a, i, al[a].got[i], al[a].after[i], al[a].before[i]);
				break;
			}
	}
}

static void gpu_setup(struct worker *wk, const char *uuid)
{
	cudaEvent_t ev;
	cudaStream_t st;
	int vfd;

	CUDA_REQ(cudaSetDevice(0));
	for (int a = 0; a < NALLOC; a++) {
		struct gpu_mem_open m;
		struct gpu_status s;

		al[a].id = 1000 + (uint64_t)a;
		al[a].before = malloc(ALLOC_BYTES);
		al[a].after = malloc(ALLOC_BYTES);
		al[a].got = malloc(ALLOC_BYTES);
		REQUIRE(al[a].before && al[a].after && al[a].got, "malloc");
		if (a < NALLOC - 1) {
			cudaIpcMemHandle_t h;

			al[a].size = ALLOC_BYTES;
			CUDA_REQ(cudaMalloc((void **)&al[a].dev, ALLOC_BYTES));
			CUDA_REQ(cudaIpcGetMemHandle(&h, al[a].dev));
			m = mem_msg(al[a].id, GPU_MEM_IPC, al[a].size, uuid);
			memcpy(m.handle, &h, sizeof h);
			vfd = -1;
		} else {
			vmm_alloc(&al[a], &vfd);
			m = mem_msg(al[a].id, GPU_MEM_VMM, al[a].size, uuid);
		}
		s = mem_open(wk, &m, vfd);
		REQUIRE(s.status == COMM_OK, "mem open %d: %d %s", a, s.status, s.detail);
		if (vfd >= 0)
			close(vfd);
	}
	CUDA_REQ(cudaStreamCreate(&st));
	CUDA_REQ(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming | cudaEventInterprocess));
	CUDA_REQ(cudaEventRecord(ev, st));
	CUDA_REQ(cudaIpcGetEventHandle(&ev_handle, ev));
}

/* The ops, their in-place forms and aliasing, on IPC and VMM memory. */
static void test_gpu_ops(struct worker *wk)
{
	const size_t half = ALLOC_BYTES / 2;
	struct trank oop[3] = { TR(0, 1, 1, 256, half), TR(1, 1, 1, 512, half + 64), TR(2, 1, 1, 0, half) };
	struct trank inp[3] = { TR(0, 1, 1, 256, 256), TR(1, 1, 1, 0, 0), TR(2, 1, 1, 8, 8) };
	char what[64];

	for (int dt = COMM_INT8; dt <= COMM_FLOAT64; dt++)
		for (int op = COMM_SUM; op <= COMM_AVG; op++) {
			snprintf(what, sizeof what, "all-reduce %s %s", dtype_name(dt), redop_name(op));
			gpu_case(wk, what, T(ALLREDUCE), dt, op, 0, 1001, 3, oop, 1);
			snprintf(what, sizeof what, "reduce-scatter %s %s", dtype_name(dt), redop_name(op));
			gpu_case(wk, what, T(REDUCE_SCATTER), dt, op, 0, 333, 3, oop, -1);
		}
	gpu_case(wk, "all-reduce, grid-stride", T(ALLREDUCE), COMM_FLOAT32, COMM_SUM, 0, 1200000, 2,
		 (struct trank[]){ TR(0, 1, 1, 0, half), TR(3, 1, 1, 0, half) }, 0);
	gpu_case(wk, "all-reduce in place", T(ALLREDUCE), COMM_BFLOAT16, COMM_AVG, 0, 777, 3, inp, 2);
	gpu_case(wk, "all-reduce, out 1 on in 0", T(ALLREDUCE), COMM_INT32, COMM_SUM, 0, 500, 2,
		 (struct trank[]){ TR(0, 1, 1, 0, 8192), TR(0, 1, 1, 4096, 0) }, -1);
	gpu_case(wk, "reduce to root 2", T(REDUCE), COMM_FLOAT64, COMM_MAX, 2, 999, 3, oop, -1);
	gpu_case(wk, "reduce-scatter in place", T(REDUCE_SCATTER), COMM_FLOAT32, COMM_SUM, 0, 100, 3,
		 (struct trank[]){ TR(0, 1, 1, 0, 0), TR(1, 1, 1, 0, 400), TR(2, 1, 1, 0, 800) }, -1);
	gpu_case(wk, "all-gather out of place, rank 2 without output", T(ALLGATHER), COMM_INT64, 0, 0,
		 301, 3, (struct trank[]){ TR(0, 1, 1, 0, half), TR(1, 1, 1, 8, half), TR(2, 1, 0, 16, 0) }, -1);
	gpu_case(wk, "all-gather in place", T(ALLGATHER), COMM_UINT8, 0, 0, 1003, 3,
		 (struct trank[]){ TR(0, 1, 1, 4096, 4096), TR(1, 1, 1, 4096 + 1003, 4096),
				   TR(2, 1, 1, 4096 + 2006, 4096) }, -1);
	gpu_case(wk, "broadcast from 1, in place at root", T(BROADCAST), COMM_FLOAT32, 0, 1, 999, 3,
		 (struct trank[]){ TR(0, 0, 0, 0, 0), TR(1, 1, 1, 64, 64), TR(3, 0, 1, 0, 128) }, 1);
	gpu_case(wk, "all-to-all", T(ALLTOALL), COMM_INT32, 0, 0, 500, 3, oop, -1);
	gpu_case(wk, "all-to-all in place", T(ALLTOALL), COMM_UINT64, 0, 0, 77, 3, inp, -1);
	gpu_case(wk, "send", T(SEND), COMM_UINT8, 0, 0, 4097, 1,
		 (struct trank[]){ TR(3, 1, 1, 0, 4104) }, 0);
	gpu_case(wk, "send within one allocation, shifted", T(SEND), COMM_UINT8, 0, 0, 4096, 1,
		 (struct trank[]){ TR(1, 1, 1, 0, 1000) }, -1);
}

/* A second id of one IPC handle, bad requests answered and the worker still serving. */
static void test_gpu_requests(struct worker *wk, const char *uuid)
{
	struct gpu_mem_open m = mem_msg(2000, GPU_MEM_IPC, ALLOC_BYTES, uuid);
	struct gpu_op_rank bad[2] = { { .send_mem = 1000, .recv_mem = 1000 },
				      { .send_mem = 999, .recv_mem = 1001 } };
	cudaIpcMemHandle_t h;
	struct gpu_status s;

	CUDA_REQ(cudaIpcGetMemHandle(&h, al[0].dev));
	memcpy(m.handle, &h, sizeof h);
	s = mem_open(wk, &m, -1);
	CHECK(s.status == COMM_OK, "second id of one handle: %d %s", s.status, s.detail);
	gpu_case(wk, "all-reduce, two ids of one allocation", T(ALLREDUCE), COMM_INT8, COMM_MAX, 0, 4000,
		 2, (struct trank[]){ TR(0, 1, 1, 0, ALLOC_BYTES / 2), TRID(0, 1, 1, 8192, 16384, 2000) }, -1);
	mem_close(wk, 2000); /* the mapping stays for id 1000 */
	s = mem_open(wk, &m, -1);
	CHECK(s.status == COMM_OK, "reopen: %d %s", s.status, s.detail);
	s = mem_open(wk, &m, -1);
	CHECK(s.status == COMM_ERR_INVALID_ARG, "duplicate id: %d %s", s.status, s.detail);
	m = mem_msg(2001, GPU_MEM_IPC, ALLOC_BYTES, "GPU-ffffffff-ffff-ffff-ffff-ffffffffffff");
	s = mem_open(wk, &m, -1);
	CHECK(s.status == COMM_ERR_NOT_FOUND && strstr(s.detail, "GPU-ffffffff"), "unknown uuid: %d %s",
	      s.status, s.detail);
	m = mem_msg(2002, GPU_MEM_IPC, 2 * ALLOC_BYTES, uuid);
	memcpy(m.handle, &h, sizeof h);
	s = mem_open(wk, &m, -1);
	CHECK(s.status == COMM_ERR_INVALID_ARG, "size beyond the allocation: %d %s", s.status, s.detail);
	s = op_run(wk, next_op++, T(ALLREDUCE), COMM_FLOAT32, COMM_SUM, 0, 16, 2, 2, bad);
	CHECK(s.status == COMM_ERR_INVALID_ARG && strstr(s.detail, "999"), "unknown mem: %d %s",
	      s.status, s.detail);
	bad[1].send_mem = 1001;
	bad[1].send_off = ALLOC_BYTES - 32;
	s = op_run(wk, next_op++, T(ALLREDUCE), COMM_FLOAT32, COMM_SUM, 0, 16, 2, 2, bad);
	CHECK(s.status == COMM_ERR_INVALID_ARG && strstr(s.detail, "overrun"), "overrun: %d %s",
	      s.status, s.detail);
	bad[1].send_off = 2; /* a float32 off its 4-byte boundary: the kernel would fault */
	s = op_run(wk, next_op++, T(ALLREDUCE), COMM_FLOAT32, COMM_SUM, 0, 16, 2, 2, bad);
	CHECK(s.status == COMM_ERR_INVALID_ARG && strstr(s.detail, "element size"),
	      "misaligned float32: %d %s", s.status, s.detail);
	/* a send's second entry carries the receiver's event only, never a buffer */
	s = op_run(wk, next_op++, T(SEND), COMM_UINT8, 0, 0, 16, 2, 2, bad);
	CHECK(s.status == COMM_ERR_INVALID_ARG && strstr(s.detail, "event"),
	      "a send naming two buffers: %d %s", s.status, s.detail);
	s = op_run(wk, next_op++, T(ALLREDUCE), COMM_FLOAT32, COMM_SUM, 0, 16, 2, 3, bad);
	CHECK(s.status == COMM_ERR_INVALID_ARG, "n beyond the packet: %d %s", s.status, s.detail);
	s = op_run(wk, next_op++, T(BROADCAST), COMM_FLOAT32, COMM_SUM, 2, 16, 2, 2, bad);
	CHECK(s.status == COMM_ERR_INVALID_ARG, "root out of range: %d %s", s.status, s.detail);
	s = op_run(wk, next_op++, T(ALLREDUCE), 10, COMM_SUM, 0, 16, 2, 2, bad);
	CHECK(s.status == COMM_ERR_INVALID_ARG, "dtype 10: %d %s", s.status, s.detail);
	s = op_run(wk, next_op++, T(BARRIER), COMM_FLOAT32, COMM_SUM, 0, 16, 2, 2, bad);
	CHECK(s.status == COMM_ERR_INVALID_ARG, "barrier: %d %s", s.status, s.detail);
	mem_close(wk, 4242); /* unknown: logged, no answer */
	/* a garbage legacy IPC handle (RELIABILITY.md): refused; the all-reduce below runs */
	m = mem_msg(2003, GPU_MEM_IPC, ALLOC_BYTES, uuid);
	for (size_t i = 0; i < sizeof m.handle; i++)
		m.handle[i] = (uint8_t)(rand() >> 7);
	s = mem_open(wk, &m, -1);
	CHECK(s.status != COMM_OK && strstr(s.detail, "cudaIpcOpenMemHandle"),
	      "garbage IPC handle: %d %s", s.status, s.detail);
	gpu_case(wk, "all-reduce after the refusals", T(ALLREDUCE), COMM_FLOAT16, COMM_PROD, 0, 100, 2,
		 (struct trank[]){ TR(0, 1, 1, 0, 4096), TR(3, 1, 1, 0, 4096) }, -1);
}

#define HOG_MAX 4096

/*
 * The device's memory taken away from the worker, then given back: an op
 * whose scratch (8 MiB, more than any op before it needed) finds no room
 * is refused NO_MEMORY and the worker goes on; with the memory back the
 * same op runs right.
 */
static void test_gpu_scratch_short(struct worker *wk)
{
	static void *hog[HOG_MAX];
	const size_t half = ALLOC_BYTES / 2, count = (1u << 20);
	struct trank tr[2] = { TR(0, 1, 1, 0, half), TR(1, 1, 1, 0, half) };
	struct gpu_op_rank ranks[2];
	struct gpu_status s;
	size_t free_b = 0, total = 0;
	int nhog = 0;

	/* down to less than 2 MiB free: 1 GiB pieces, then 128, 16 and 2 MiB ones */
	for (size_t sz = (size_t)1 << 30; sz >= (2u << 20) && nhog < HOG_MAX;) {
		if (cudaMalloc(&hog[nhog], sz) == cudaSuccess) {
			nhog++;
			continue;
		}
		(void)cudaGetLastError();
		sz >>= 3;
	}
	CUDA_REQ(cudaMemGetInfo(&free_b, &total));
	memset(ranks, 0, sizeof ranks);
	for (int r = 0; r < 2; r++)
		ranks[r] = (struct gpu_op_rank){ .send_mem = al[tr[r].a].id, .recv_mem = al[tr[r].a].id,
						 .recv_off = half };
	for (int a = 0; a < 2; a++)
		CUDA_REQ(cudaMemcpy(al[a].before, al[a].dev, ALLOC_BYTES, cudaMemcpyDeviceToHost));
	s = op_run(wk, next_op++, T(REDUCE_SCATTER), COMM_INT32, COMM_SUM, 0, count, 2, 2, ranks);
	CHECK(s.status == COMM_ERR_NO_MEMORY && strstr(s.detail, "scratch"),
	      "reduce-scatter with %zu bytes of the device free: %d %s", free_b, s.status, s.detail);
	for (int a = 0; a < 2; a++) {
		CUDA_REQ(cudaMemcpy(al[a].got, al[a].dev, ALLOC_BYTES, cudaMemcpyDeviceToHost));
		CHECK(memcmp(al[a].got, al[a].before, ALLOC_BYTES) == 0,
		      "the refused reduce-scatter changed allocation %d", a);
	}
	while (nhog)
		CUDA_REQ(cudaFree(hog[--nhog]));
	gpu_case(wk, "reduce-scatter once the memory is back", T(REDUCE_SCATTER), COMM_INT32,
		 COMM_SUM, 0, count, 2, tr, -1);
}

#define ORPHAN_BYTES (1u << 20)
#define ORPHAN_BYTE(i) ((uint8_t)((i) * 13 + 5))

/*
 * The --export-vmm child (a process of its own, as CUDA does not survive a
 * fork): VMM memory filled with ORPHAN_BYTE, its fd and size sent on sock;
 * then it exits without freeing it.
 */
static int export_vmm(int sock)
{
	struct alloc a = { 0 };
	uint8_t *h = malloc(ORPHAN_BYTES);
	uint64_t size;
	int fd;

	REQUIRE(h, "malloc");
	CUDA_REQ(cudaSetDevice(0));
	vmm_alloc(&a, &fd);
	for (size_t i = 0; i < ORPHAN_BYTES; i++)
		h[i] = ORPHAN_BYTE(i);
	CUDA_REQ(cudaMemcpy(a.dev, h, ORPHAN_BYTES, cudaMemcpyHostToDevice));
	CUDA_REQ(cudaDeviceSynchronize());
	size = a.size;
	send_pkt(sock, &size, sizeof size, fd);
	return 0;
}

/*
 * A VMM allocation exported as an fd stays valid after the exporter exits
 * (RELIABILITY.md): a child process makes and fills one, hands over its fd
 * and exits; the worker then opens it and copies it into IPC memory, every
 * byte checked.
 */
static void test_gpu_orphan_vmm(struct worker *wk, const char *self, const char *uuid)
{
	union {
		struct cmsghdr h;
		char b[CMSG_SPACE(sizeof(int))];
	} ctl;
	uint64_t size = 0;
	struct iovec iov = { .iov_base = &size, .iov_len = sizeof size };
	struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl.b,
			      .msg_controllen = sizeof ctl.b };
	struct gpu_op_rank x = { .send_mem = 4000, .recv_mem = al[0].id, .recv_off = 0 };
	struct cmsghdr *c;
	struct gpu_mem_open m;
	struct gpu_status s;
	uint8_t *got = malloc(ORPHAN_BYTES);
	int sv[2], fd = -1, st;
	struct pollfd pfd;
	size_t bad;
	pid_t pid;

	REQUIRE(got && ORPHAN_BYTES <= ALLOC_BYTES, "malloc");
	REQUIRE(socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) == 0, "socketpair: %s",
		strerror(errno));
	pid = fork();
	REQUIRE(pid >= 0, "fork: %s", strerror(errno));
	if (pid == 0) {
		char arg[16];
		int keep = fcntl(sv[1], F_DUPFD, 10); /* without CLOEXEC: the child's */

		snprintf(arg, sizeof arg, "%d", keep);
		execl(self, self, "--export-vmm", arg, (char *)NULL);
		_exit(127);
	}
	close(sv[1]);
	pfd = (struct pollfd){ .fd = sv[0], .events = POLLIN };
	if (poll(&pfd, 1, 60000) != 1) {
		kill(pid, SIGKILL);
		waitpid(pid, NULL, 0);
		REQUIRE(0, "the exporter sent nothing in 60 s");
	}
	REQUIRE(recvmsg(sv[0], &msg, 0) == (ssize_t)sizeof size, "no fd from the exporter");
	for (c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c))
		if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS)
			memcpy(&fd, CMSG_DATA(c), sizeof fd);
	close(sv[0]);
	REQUIRE(waitpid(pid, &st, 0) == pid && WIFEXITED(st) && WEXITSTATUS(st) == 0,
		"the exporter: status 0x%x", st);
	REQUIRE(fd >= 0 && size >= ORPHAN_BYTES, "the exporter's fd %d, size %llu", fd,
		(unsigned long long)size);
	m = mem_msg(4000, GPU_MEM_VMM, size, uuid);
	s = mem_open(wk, &m, fd);
	close(fd);
	CHECK(s.status == COMM_OK, "VMM memory of an exporter that exited: %d %s", s.status,
	      s.detail);
	if (s.status != COMM_OK) {
		free(got);
		return;
	}
	s = op_run(wk, next_op++, T(SEND), COMM_UINT8, 0, 0, ORPHAN_BYTES, 1, 1, &x);
	CHECK(s.status == COMM_OK, "copy out of it: %d %s", s.status, s.detail);
	CUDA_REQ(cudaMemcpy(got, al[0].dev, ORPHAN_BYTES, cudaMemcpyDeviceToHost));
	for (bad = 0; bad < ORPHAN_BYTES && got[bad] == ORPHAN_BYTE(bad); bad++)
		;
	CHECK(bad == ORPHAN_BYTES, "VMM memory of an exporter that exited: byte %zu is %u, not %u",
	      bad, bad < ORPHAN_BYTES ? got[bad] : 0, ORPHAN_BYTE(bad));
	mem_close(wk, 4000);
	free(got);
}

/*
 * Host memory commd shares (GPU_MEM_HOST, a memfd), as it stages a send or
 * recv across daemons: copies from it into IPC and VMM memory and back,
 * every byte checked; host to host, and host memory in a collective,
 * refused; a closed one is not open any more.
 */
static void test_gpu_staging(struct worker *wk)
{
	const size_t size = 256u << 10, n1 = 100000, n2 = 50001;
	struct gpu_mem_open m = mem_msg(3000, GPU_MEM_HOST, size, "");
	struct gpu_op_rank x = { 0 };
	uint8_t *host, *got = malloc(n1);
	struct gpu_status s;
	size_t bad;
	int mfd = memfd_create("test-gpu-staging", MFD_CLOEXEC);

	REQUIRE(got && mfd >= 0 && ftruncate(mfd, (off_t)size) == 0, "memfd");
	host = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0);
	REQUIRE(host != MAP_FAILED, "mmap");
	for (size_t i = 0; i < n1; i++)
		host[i] = (uint8_t)(i * 31 + 7);
	s = mem_open(wk, &m, mfd);
	close(mfd);
	REQUIRE(s.status == COMM_OK, "host memory open: %d %s", s.status, s.detail);
	/* host into device (IPC), as a recv's copy into place */
	x = (struct gpu_op_rank){ .send_mem = 3000, .recv_mem = al[0].id, .recv_off = 4096 };
	s = op_run(wk, next_op++, T(SEND), COMM_UINT8, 0, 0, n1, 1, 1, &x);
	CHECK(s.status == COMM_OK, "host to device: %d %s", s.status, s.detail);
	CUDA_REQ(cudaMemcpy(got, al[0].dev + 4096, n1, cudaMemcpyDeviceToHost));
	for (bad = 0; bad < n1 && got[bad] == host[bad]; bad++)
		;
	CHECK(bad == n1, "host to device: byte %zu differs", bad);
	/* device (VMM) into host, as a send's copy out */
	for (size_t i = 0; i < n2; i++)
		got[i] = (uint8_t)(i * 17 + 3);
	CUDA_REQ(cudaMemcpy(al[NALLOC - 1].dev + 8, got, n2, cudaMemcpyHostToDevice));
	/*
	 * From pageable memory cudaMemcpy may return before its DMA lands, and
	 * this op has no ready event: without the wait, the worker copied the
	 * allocation's old bytes (every run on an H200).
	 */
	CUDA_REQ(cudaDeviceSynchronize());
	x = (struct gpu_op_rank){ .send_mem = al[NALLOC - 1].id, .send_off = 8, .recv_mem = 3000,
				  .recv_off = 1000 };
	s = op_run(wk, next_op++, T(SEND), COMM_UINT8, 0, 0, n2, 1, 1, &x);
	CHECK(s.status == COMM_OK, "device to host: %d %s", s.status, s.detail);
	for (bad = 0; bad < n2 && host[1000 + bad] == got[bad]; bad++)
		;
	CHECK(bad == n2, "device to host: byte %zu is %u, not %u", bad,
	      bad < n2 ? host[1000 + bad] : 0, bad < n2 ? got[bad] : 0);
	x = (struct gpu_op_rank){ .send_mem = 3000, .recv_mem = 3000, .recv_off = 128 << 10 };
	s = op_run(wk, next_op++, T(SEND), COMM_UINT8, 0, 0, 64, 1, 1, &x);
	CHECK(s.status == COMM_ERR_INVALID_ARG && strstr(s.detail, "host memory to host memory"),
	      "host to host: %d %s", s.status, s.detail);
	x = (struct gpu_op_rank){ .send_mem = 3000, .recv_mem = al[0].id };
	s = op_run(wk, next_op++, T(ALLREDUCE), COMM_FLOAT32, COMM_SUM, 0, 16, 1, 1, &x);
	CHECK(s.status == COMM_ERR_INVALID_ARG && strstr(s.detail, "host memory"),
	      "host memory in an all-reduce: %d %s", s.status, s.detail);
	m.id = 3001;
	s = mem_open(wk, &m, -1);
	CHECK(s.status == COMM_ERR_INVALID_ARG && strstr(s.detail, "memfd"),
	      "host memory without its memfd: %d %s", s.status, s.detail);
	mem_close(wk, 3000);
	x = (struct gpu_op_rank){ .send_mem = 3000, .recv_mem = al[0].id };
	s = op_run(wk, next_op++, T(SEND), COMM_UINT8, 0, 0, 64, 1, 1, &x);
	CHECK(s.status == COMM_ERR_INVALID_ARG && strstr(s.detail, "not open"),
	      "closed host memory: %d %s", s.status, s.detail);
	munmap(host, size);
	free(got);
}

static void test_gpu(const char *self)
{
	struct worker wk;
	struct cudaDeviceProp prop;
	char uuid[GPU_UUID_LEN];
	struct gpu_status s;
	int rc;

	CUDA_REQ(cudaGetDeviceProperties(&prop, 0));
	gpu_uuid_format((const unsigned char *)prop.uuid.bytes, uuid);
	worker_start(&wk);
	s = hello(&wk);
	REQUIRE(s.status == COMM_OK, "hello with a GPU: %d %s", s.status, s.detail);
	gpu_setup(&wk, uuid);
	test_gpu_ops(&wk);
	test_gpu_requests(&wk, uuid);
	test_gpu_scratch_short(&wk);
	test_gpu_staging(&wk);
	test_gpu_orphan_vmm(&wk, self, uuid);
	rc = worker_stop(&wk);
	CHECK(rc == GPU_WORKER_EXIT_OK, "exit %d after EOF", rc);
	CHECK(!worker_logged(&wk, "exiting", 0), "the worker hit a CUDA error");
	CHECK(worker_logged(&wk, "mem 4242 is not open", 1), "an unknown mem close was not logged");
	test_fds(uuid);
}

int main(int argc, char **argv)
{
	char self[4096];
	ssize_t n;

	if (argc == 3 && !strcmp(argv[1], "--export-vmm"))
		return export_vmm(atoi(argv[2]));
	n = readlink("/proc/self/exe", self, sizeof self - 1);
	REQUIRE(n > 0, "readlink /proc/self/exe: %s", strerror(errno));
	self[n] = '\0';
	worker_path = getenv("COMMD_GPU");
	if (!worker_path) {
		fprintf(stderr, "test-gpu-worker: COMMD_GPU is not set (make check sets it)\n");
		return 77;
	}
	alarm(300);
	srand(12345);
	test_results();
	test_malformed();
	test_eof();
	if (test_probe()) {
		test_gpu(self);
	} else {
		test_unsupported();
		test_fds("GPU-00000000-0000-0000-0000-000000000000");
	}
	return CHECK_EXIT();
}
