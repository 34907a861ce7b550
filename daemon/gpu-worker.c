/*
 * gpu-worker.c: commd-gpu, one job's GPU worker. It serves commd on fd 3
 * (common/gpu-proto.h): opens the ranks' device memory and runs their ops,
 * with its own kernels on one device, NCCL across several, and (a job over
 * several daemons) NCCL across the nodes' workers, one NCCL rank per node.
 * It owns every CUDA and NCCL object of the job, so a GPU fault ends this
 * process only.
 *
 * gpu-worker.c holds the messages, the requests, the loop and the command
 * line; gpu-worker-mem.c the devices and memory; gpu-worker-ops.c NCCL
 * and the ops on this node; gpu-worker-run.c the ops across nodes and how
 * an op is run. gpu-worker-int.h is what they share.
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
#include "gpu-worker-int.h"
#include "gpu-worker.h"
#include "util.h"

_Static_assert(sizeof(cudaIpcMemHandle_t) == GPU_HANDLE_BYTES, "IPC memory handle size");
_Static_assert(sizeof(cudaIpcEventHandle_t) == GPU_HANDLE_BYTES, "IPC event handle size");
_Static_assert(sizeof(ncclUniqueId) == GPU_NCCL_ID_BYTES, "NCCL id size");
_Static_assert(sizeof(struct gpu_world) + GPU_WORLD_MAX_RANKS * sizeof(uint16_t) <= GPU_MSG_MAX,
	       "a WORLD message fits a packet");

struct worker_state w;
struct drv_fns drv;

/* --- messages and errors ---------------------------------------------------- */

void wlog(const char *fmt, ...)
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

void fail_as(comm_result_t code, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vfail_as(code, fmt, ap);
	va_end(ap);
}

void fail(const char *fmt, ...)
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
int cuda_check(cudaError_t e, const char *call)
{
	if (e == cudaSuccess)
		return 0;
	(void)cudaGetLastError();
	fail_as(gpu_cuda_result(e), "%s: %s", call, cudaGetErrorString(e));
	return -1;
}

int cu_check(CUresult r, const char *call)
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
int nccl_check(ncclResult_t r, const char *call)
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

void reply(uint32_t type, uint64_t id, comm_result_t status, const char *detail)
{
	struct gpu_status s;

	memset(&s, 0, sizeof s);
	send_status(&s, sizeof s, type, id, status, detail);
}

/* --- requests ----------------------------------------------------------------------- */

/* Each op type's needs, by its number (on_op looks an op's up). */
static const struct op_spec specs[] = {
	[T(ALLREDUCE)] = { "all-reduce", NEED_ALL, NEED_ANY, 0, 0, 1 },
	[T(REDUCE_SCATTER)] = { "reduce-scatter", NEED_ALL, NEED_ALL, 1, 0, 1 },
	[T(ALLGATHER)] = { "all-gather", NEED_ALL, NEED_ANY, 0, 1, 0 },
	[T(BROADCAST)] = { "broadcast", NEED_ROOT, NEED_ANY, 0, 0, 0 },
	[T(REDUCE)] = { "reduce", NEED_ALL, NEED_ROOT, 0, 0, 1 },
	[T(ALLTOALL)] = { "all-to-all", NEED_ALL, NEED_ALL, 1, 1, 0 },
	[T(SEND)] = { "send", NEED_ALL, NEED_ALL, 0, 0, 0 },
};

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
