/*
 * test-gpu-plumbing: commd's side of device memory, on any machine. commd
 * runs with --gpu-worker naming fake-gpu-worker, which speaks the worker
 * protocol without a GPU and logs what it gets; raw ranks register device
 * memory and post ops by hand. Checked: the worker in a session of its
 * own (out of reach of commd's terminal), what commd forwards (mem kinds,
 * handles, fds, the op's buffers and ready event), the answers it relays,
 * a host/device mix refused, frees reaching the worker, a worker that
 * refuses, crashes or hangs failing only its job (a host job beside it
 * runs on), shutdown with a hung worker, no fd left behind, and a job over
 * two daemons (the NCCL id's way to every worker, what is refused before
 * any worker sees it, and sends between them staged through host memory,
 * which the fake worker copies for real: the data is checked; a worker
 * hung in such a copy fails the job at its deadline). A worker hung
 * opening device memory: the registration fails at the job's deadline, at
 * once when another rank dies, and the worker is killed when the job ends
 * with the registration unanswered; device memory does not count against
 * max-job-memory (host memory); commd out of fds for a new worker answers
 * NO_MEMORY and starts one once it has them again; a worker that breaks
 * the protocol is killed and its job failed saying how. Then the
 * real no-GPU path: commd with its own commd-gpu on a machine without a
 * GPU says so in status and refuses device memory with the reason.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include "check.h"
#include "harness.h"
#include "raw.h"
#include "ring.h"

static struct th_daemon d;
static char logpath[256];

#define UUID "GPU-11111111-2222-3333-4444-555555555555"
#define UUID2 "GPU-66666666-7777-8888-9999-000000000000"

static const char *reg_uuid = UUID; /* the device reg_dev names */

/* A raw rank of a job. */
struct rank {
	int fd;
	struct frame_reader rd;
};

/* Rank r of a world-rank raw job, joined (every rank's hello must be sent before any reply). */
static void hello_rank(struct rank *k, const char *job, int r, int world, uint32_t vmax,
		       uint32_t timeout_ms)
{
	Commpb__Envelope env = COMMPB__ENVELOPE__INIT;
	Commpb__Hello h = COMMPB__HELLO__INIT;

	k->fd = raw_connect(d.sock);
	frame_reader_init(&k->rd);
	h.version_min = 1;
	h.version_max = vmax;
	h.job = (char *)job;
	h.rank = r;
	h.world_size = world;
	h.timeout_ms = timeout_ms;
	env.body_case = COMMPB__ENVELOPE__BODY_HELLO;
	env.hello = &h;
	raw_send(k->fd, &env, NULL, 0);
}

static void hello_done(struct rank *k)
{
	Commpb__Envelope *reply = raw_recv(k->fd, &k->rd);

	REQUIRE(reply && reply->body_case == COMMPB__ENVELOPE__BODY_HELLO_REPLY &&
			reply->hello_reply->status == COMM_OK,
		"hello");
	commpb__envelope__free_unpacked(reply, NULL);
}

/* Rank 0 of a 1-rank job, speaking protocol up to vmax, joined. */
static void open_rank(struct rank *k, const char *job, uint32_t vmax, uint32_t timeout_ms)
{
	hello_rank(k, job, 0, 1, vmax, timeout_ms);
	hello_done(k);
}

static void close_rank(struct rank *k)
{
	close(k->fd);
	frame_reader_free(&k->rd);
}

/*
 * Register device memory: kind, handle of hlen bytes (IPC) or fd (VMM, -1:
 * none sent). The status; mem id and detail when asked for.
 */
static void reg_dev_post(struct rank *k, Commpb__MemKind kind, size_t hlen, int fd,
			 uint64_t size)
{
	Commpb__Envelope env = COMMPB__ENVELOPE__INIT;
	Commpb__RegisterMem reg = COMMPB__REGISTER_MEM__INIT;
	uint8_t handle[64];

	memset(handle, 0xab, sizeof handle);
	reg.kind = kind;
	reg.size = size;
	reg.cuda_handle.data = handle;
	reg.cuda_handle.len = hlen;
	reg.gpu_uuid = (char *)reg_uuid;
	reg.buffer_id = 77;
	env.body_case = COMMPB__ENVELOPE__BODY_REGISTER_MEM;
	env.register_mem = &reg;
	raw_send(k->fd, &env, fd >= 0 ? &fd : NULL, fd >= 0);
}

/* The answer to a registration k posted: its status; mem id and detail when asked for. */
static int reg_dev_answer(struct rank *k, uint64_t *mem_id, char *detail, size_t dlen)
{
	Commpb__Envelope *reply = raw_recv(k->fd, &k->rd);
	int status;

	if (!reply || reply->body_case != COMMPB__ENVELOPE__BODY_REGISTER_MEM_REPLY) {
		if (reply)
			commpb__envelope__free_unpacked(reply, NULL);
		return -1;
	}
	status = reply->register_mem_reply->status;
	if (mem_id)
		*mem_id = reply->register_mem_reply->mem_id;
	if (detail)
		snprintf(detail, dlen, "%s", reply->register_mem_reply->detail);
	commpb__envelope__free_unpacked(reply, NULL);
	return status;
}

static int reg_dev(struct rank *k, Commpb__MemKind kind, size_t hlen, int fd, uint64_t size,
		   uint64_t *mem_id, char *detail, size_t dlen)
{
	reg_dev_post(k, kind, hlen, fd, size);
	return reg_dev_answer(k, mem_id, detail, dlen);
}

/* size bytes of host memory (a sealed memfd) registered by k: its mem id; mapped here into *map. */
static uint64_t reg_host_map(struct rank *k, size_t size, uint8_t **map)
{
	int mfd = raw_memfd(size);
	uint64_t h = 0;

	if (map)
		REQUIRE((*map = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0)) !=
				MAP_FAILED, "mmap");
	REQUIRE(raw_register_fd(k->fd, &k->rd, mfd, size, &h) == COMM_OK, "register memfd");
	close(mfd);
	return h;
}

/*
 * size bytes of "device memory" the fake worker can reach: a memfd
 * registered as a VMM allocation (the worker maps its fd), mapped here too.
 */
static uint64_t reg_fake_dev(struct rank *k, size_t size, uint8_t **map)
{
	int mfd = memfd_create("gpu-plumbing-dev", MFD_CLOEXEC);
	uint64_t id = 0;

	REQUIRE(mfd >= 0 && ftruncate(mfd, (off_t)size) == 0 &&
			(*map = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0)) !=
				MAP_FAILED,
		"memfd");
	REQUIRE(reg_dev(k, COMMPB__MEM_KIND__MEM_CUDA_VMM, 0, mfd, size, &id, NULL, 0) == COMM_OK,
		"register a memfd as device memory");
	close(mfd);
	return id;
}

/* 4096 bytes of host memory (a sealed memfd) registered by k: its mem id. */
static uint64_t reg_host(struct rank *k)
{
	return reg_host_map(k, 4096, NULL);
}

/* The next OpDone's status (and seq, detail when not NULL); -1 for anything else. */
static int op_reply(struct rank *k, uint64_t *seq, char *detail, size_t dlen)
{
	Commpb__Envelope *reply = raw_recv(k->fd, &k->rd);
	int status;

	if (!reply || reply->body_case != COMMPB__ENVELOPE__BODY_OP_DONE) {
		if (reply)
			commpb__envelope__free_unpacked(reply, NULL);
		return -1;
	}
	if (seq)
		*seq = reply->op_done->seq;
	status = reply->op_done->status;
	if (detail)
		snprintf(detail, dlen, "%s", reply->op_done->detail);
	commpb__envelope__free_unpacked(reply, NULL);
	return status;
}

/*
 * Post an allreduce of 16 float32 from (smem, soff) to (rmem, roff), with a
 * ready event when event is set and the done flag done (value seq + 1000)
 * when it is not NULL.
 */
static void post_allreduce(struct rank *k, uint64_t seq, uint64_t smem, uint64_t soff,
			   uint64_t rmem, uint64_t roff, int event, Commpb__BufRef *done)
{
	Commpb__Envelope env = COMMPB__ENVELOPE__INIT;
	Commpb__Op op = COMMPB__OP__INIT;
	Commpb__BufRef s = COMMPB__BUF_REF__INIT, r = COMMPB__BUF_REF__INIT;
	uint8_t ev[64];

	memset(ev, 0x5c, sizeof ev);
	s.mem_id = smem;
	s.offset = soff;
	r.mem_id = rmem;
	r.offset = roff;
	op.seq = seq;
	op.type = COMMPB__OP_TYPE__OP_ALLREDUCE;
	op.send = &s;
	op.recv = &r;
	op.count = 16;
	op.dtype = COMM_FLOAT32;
	op.redop = COMM_SUM;
	if (event) {
		op.ready_event.data = ev;
		op.ready_event.len = sizeof ev;
	}
	op.done = done;
	op.done_value = done ? (uint32_t)seq + 1000 : 0;
	env.body_case = COMMPB__ENVELOPE__BODY_OP;
	env.op = &op;
	raw_send(k->fd, &env, NULL, 0);
}

/* post_allreduce, and its OpDone status. */
static int allreduce(struct rank *k, uint64_t seq, uint64_t smem, uint64_t soff, uint64_t rmem,
		     uint64_t roff, int event, Commpb__BufRef *done, char *detail, size_t dlen)
{
	post_allreduce(k, seq, smem, soff, rmem, roff, event, done);
	return op_reply(k, NULL, detail, dlen);
}

/* Daemon dd's status reply (the caller frees it). */
static Commpb__Envelope *status_of(const struct th_daemon *dd)
{
	Commpb__Envelope env = COMMPB__ENVELOPE__INIT, *reply;
	Commpb__StatusRequest sr = COMMPB__STATUS_REQUEST__INIT;
	struct frame_reader rd;
	int fd = raw_connect(dd->sock);

	frame_reader_init(&rd);
	REQUIRE(raw_hello_admin(fd, &rd) == COMM_OK, "admin hello");
	env.body_case = COMMPB__ENVELOPE__BODY_STATUS_REQUEST;
	env.status_request = &sr;
	raw_send(fd, &env, NULL, 0);
	reply = raw_recv(fd, &rd);
	REQUIRE(reply && reply->body_case == COMMPB__ENVELOPE__BODY_STATUS_REPLY, "status reply");
	close(fd);
	frame_reader_free(&rd);
	return reply;
}

static Commpb__Envelope *status(void)
{
	return status_of(&d);
}

/* Whether daemon dd's status shows job's GPU worker line holding want. */
static int gpu_line_has(const struct th_daemon *dd, const char *job, const char *want)
{
	Commpb__Envelope *st = status_of(dd);
	int found = 0;

	for (size_t i = 0; i < st->status_reply->n_jobs; i++) {
		const Commpb__JobInfo *j = st->status_reply->jobs[i];

		if (!strcmp(j->name, job)) {
			found = strstr(j->gpu, want) != NULL;
			if (!found)
				printf("job %s's gpu line: \"%s\", no \"%s\"\n", job, j->gpu, want);
		}
	}
	commpb__envelope__free_unpacked(st, NULL);
	return found;
}

/* Whether the worker's log has a line starting with want (within 3 s). */
static int logged(const char *want)
{
	char line[512];

	for (int i = 0; i < 60; i++) {
		FILE *f = fopen(logpath, "r");

		while (f && fgets(line, sizeof line, f))
			if (!strncmp(line, want, strlen(want))) {
				fclose(f);
				return 1;
			}
		if (f)
			fclose(f);
		usleep(50 * 1000);
	}
	return 0;
}

/* The daemon's open fds once the admin connections of status() have closed. */
static int quiet_fds(void)
{
	int n = th_count_fds(d.pid), prev = -1;

	for (int i = 0; i < 40 && n != prev; i++) {
		usleep(50 * 1000);
		prev = n;
		n = th_count_fds(d.pid);
	}
	return n;
}

static void start(const char *mode, int fake)
{
	setenv("FAKE_GPU_MODE", mode, 1);
	unlink(logpath);
	REQUIRE((fake ? th_daemon_start(&d, "--gpu-worker", getenv("FAKE_GPU_WORKER"), NULL)
		      : th_daemon_start(&d, NULL)) == 0,
		"daemon start (%s)", mode);
}

/* A 2-rank host job beside the device one: exact all-reduce. */
static int host_rank(int r, int n, void *arg)
{
	comm_t *c;
	int32_t *buf;
	int bad = 0;

	if (th_join(&c, r, n) < 0)
		return 1;
	buf = comm_mem_alloc(c, 1024 * sizeof *buf);
	if (!buf)
		return th_bail(c);
	for (int i = 0; i < 1024; i++)
		buf[i] = r * 1000 + i;
	if (comm_allreduce(c, buf, buf, 1024, COMM_INT32, COMM_SUM, NULL) != COMM_OK)
		return th_bail(c);
	for (int i = 0; i < 1024; i++)
		bad += buf[i] != 1000 + 2 * i;
	comm_mem_free(c, buf);
	return th_leave(c, r) || bad;
}

static void test_forwarding(void)
{
	struct rank k, old;
	uint64_t a = 0, b = 0, h = 0, v3 = 0;
	char detail[256], want[256];
	Commpb__Envelope *st;
	int fds0, p[2];

	start("ok", 1);
	st = status();
	CHECK(!strcmp(st->status_reply->gpu,
		      "1 device(s): Fake GPU (cuda runtime 0, driver 0, nccl 9.9.9)"),
	      "status gpu: %s", st->status_reply->gpu);
	CHECK(!strcmp(st->status_reply->nccl, "available (nccl 9.9.9)"), "status nccl: %s",
	      st->status_reply->nccl);
	/* host, gpu, then net where UCX works */
	CHECK(st->status_reply->n_backends >= 2 && !strcmp(st->status_reply->backends[1], "gpu"),
	      "gpu backend not listed");
	commpb__envelope__free_unpacked(st, NULL);
	fds0 = quiet_fds();

	open_rank(&k, "dev", PROTO_VERSION, 0);
	CHECK(reg_dev(&k, COMMPB__MEM_KIND__MEM_CUDA_IPC, 64, -1, 4096, &a, detail,
		      sizeof detail) == COMM_OK,
	      "IPC registration: %s", detail);
	CHECK(logged("hello"), "the worker got no hello");
	CHECK(logged("session: own"), "the worker is in commd's session: a Ctrl-C at commd's "
	      "terminal would kill its ops");
	CHECK(logged("open 1 kind 1 rank 0 size 4096 uuid " UUID " fd no"),
	      "the worker did not get the IPC mem");
	REQUIRE(pipe(p) == 0, "pipe");
	CHECK(reg_dev(&k, COMMPB__MEM_KIND__MEM_CUDA_VMM, 0, p[0], 8192, &b, detail,
		      sizeof detail) == COMM_OK,
	      "VMM registration: %s", detail);
	close(p[0]);
	close(p[1]);
	CHECK(logged("open 2 kind 2 rank 0 size 8192 uuid " UUID " fd yes"),
	      "the worker did not get the VMM mem with its fd");
	CHECK(a != b && a && b, "mem ids %llu %llu", (unsigned long long)a, (unsigned long long)b);

	/* an op on device memory reaches the worker whole, and its answer comes back */
	CHECK(allreduce(&k, 1, a, 0, b, 128, 1, NULL, detail, sizeof detail) == COMM_OK,
	      "device allreduce: %s", detail);
	CHECK(logged("op type 1 dtype 8 redop 0 root 0 count 16 n 1"), "op header not forwarded");
	CHECK(logged("rank 0 send 1+0 recv 2+128 event 5c"), "op buffers or event not forwarded");
	CHECK(allreduce(&k, 2, a, 64, a, 64, 0, NULL, detail, sizeof detail) == COMM_OK,
	      "in-place device allreduce without event: %s", detail);
	CHECK(logged("rank 0 send 1+64 recv 1+64 event none"), "in-place op not forwarded");
	/* past the end of the allocation: commd refuses it before the worker sees it */
	CHECK(allreduce(&k, 3, a, 4096 - 32, a, 0, 0, NULL, detail, sizeof detail) ==
		      COMM_ERR_INVALID_ARG && strstr(detail, "past the end"),
	      "overrun not refused: %s", detail);

	/* host and device buffers in one op */
	h = reg_host(&k);
	CHECK(allreduce(&k, 4, h, 0, a, 0, 0, NULL, detail, sizeof detail) == COMM_ERR_UNSUPPORTED &&
		      strstr(detail, "mix host and device"),
	      "host/device mix: %s", detail);

	/* a done flag (comm_stream_wait) reaches the worker; bad ones are refused */
	{
		Commpb__BufRef f = COMMPB__BUF_REF__INIT;

		f.mem_id = a;
		f.offset = 256;
		CHECK(allreduce(&k, 5, a, 0, b, 128, 0, &f, detail, sizeof detail) == COMM_OK,
		      "op with a done flag: %s", detail);
		CHECK(logged("flag 1+256 value 1005"), "done flag not forwarded");
		f.mem_id = h;
		f.offset = 0;
		CHECK(allreduce(&k, 6, a, 0, b, 128, 0, &f, detail, sizeof detail) ==
			      COMM_ERR_INVALID_ARG && strstr(detail, "done flag is in host memory"),
		      "done flag in host memory: %s", detail);
		f.mem_id = a;
		f.offset = 2;
		CHECK(allreduce(&k, 7, a, 0, b, 128, 0, &f, detail, sizeof detail) ==
			      COMM_ERR_INVALID_ARG && strstr(detail, "done flag buffer: offset 2 is not"),
		      "misaligned done flag: %s", detail);
		f.offset = 4096;
		CHECK(allreduce(&k, 8, a, 0, b, 128, 0, &f, detail, sizeof detail) ==
			      COMM_ERR_INVALID_ARG && strstr(detail, "done flag buffer: offset 4096 + 4"),
		      "done flag past the end: %s", detail);
		f.offset = 256;
		CHECK(allreduce(&k, 9, h, 0, h, 64, 0, &f, detail, sizeof detail) ==
			      COMM_ERR_INVALID_ARG && strstr(detail, "needs an op that moves device"),
		      "done flag on a host op: %s", detail);
		CHECK(!logged("value 1006") && !logged("value 1007") && !logged("value 1008") &&
			      !logged("value 1009"),
		      "a refused done flag reached the worker");
		/* a version 3 connection knows no done flags */
		open_rank(&old, "dev-v3", 3, 0);
		CHECK(reg_dev(&old, COMMPB__MEM_KIND__MEM_CUDA_IPC, 64, -1, 4096, &v3, detail,
			      sizeof detail) == COMM_OK,
		      "registration on a version 3 connection: %s", detail);
		f.mem_id = v3;
		CHECK(allreduce(&old, 1, v3, 0, v3, 0, 0, &f, detail, sizeof detail) ==
			      COMM_ERR_VERSION && strstr(detail, "needs protocol 4"),
		      "done flag on a version 3 connection: %s", detail);
		close_rank(&old);
	}

	/* bad registrations */
	CHECK(reg_dev(&k, COMMPB__MEM_KIND__MEM_CUDA_IPC, 10, -1, 4096, NULL, detail,
		      sizeof detail) == COMM_ERR_INVALID_ARG &&
		      strstr(detail, "64 bytes"),
	      "short IPC handle: %s", detail);
	CHECK(reg_dev(&k, COMMPB__MEM_KIND__MEM_CUDA_IPC, 64, -1, 0, NULL, detail,
		      sizeof detail) == COMM_ERR_INVALID_ARG,
	      "0-byte device memory: %s", detail);
	CHECK(reg_dev(&k, COMMPB__MEM_KIND__MEM_CUDA_IPC, 64, -1, UINT64_MAX - 4095, NULL, detail,
		      sizeof detail) == COMM_ERR_INVALID_ARG &&
		      strstr(detail, "2^48"),
	      "device memory of 2^64 - 4096 bytes: %s", detail);
	open_rank(&old, "dev-v2", 2, 0);
	CHECK(reg_dev(&old, COMMPB__MEM_KIND__MEM_CUDA_IPC, 64, -1, 4096, NULL, detail,
		      sizeof detail) == COMM_ERR_VERSION && strstr(detail, "protocol 3"),
	      "device memory on a version 2 connection: %s", detail);
	close_rank(&old);

	/* a free reaches the worker */
	{
		Commpb__Envelope env = COMMPB__ENVELOPE__INIT, *reply;
		Commpb__FreeMem fm = COMMPB__FREE_MEM__INIT;

		fm.mem_id = a;
		env.body_case = COMMPB__ENVELOPE__BODY_FREE_MEM;
		env.free_mem = &fm;
		raw_send(k.fd, &env, NULL, 0);
		reply = raw_recv(k.fd, &k.rd);
		CHECK(reply && reply->body_case == COMMPB__ENVELOPE__BODY_FREE_MEM_REPLY &&
			      reply->free_mem_reply->status == COMM_OK,
		      "free of device memory");
		if (reply)
			commpb__envelope__free_unpacked(reply, NULL);
	}
	CHECK(logged("close 1"), "the worker was not told to close mem 1");
	snprintf(want, sizeof want, "op %llu: send buffer: no mem id %llu", 10ULL,
		 (unsigned long long)a);
	CHECK(allreduce(&k, 10, a, 0, b, 0, 0, NULL, detail, sizeof detail) == COMM_ERR_NOT_FOUND &&
		      !strcmp(detail, want),
	      "freed device mem still usable: %s", detail);

	/* VMM memory with no fd: a protocol error */
	CHECK(reg_dev(&k, COMMPB__MEM_KIND__MEM_CUDA_VMM, 0, -1, 4096, NULL, NULL, 0) == -1,
	      "VMM registration without its fd answered");
	CHECK(raw_closed_by_daemon(k.fd), "VMM without fd: connection kept");
	close_rank(&k);
	CHECK(logged("close 2"), "the closed rank's mem was not closed in the worker");
	CHECK(logged("eof"), "the worker of a finished job was not let go");
	th_check_baseline(&d, fds0, "device memory forwarding");
	CHECK(th_daemon_stop(&d) == 0, "daemon stop");
}

/* The fake worker's "answered ..." lines, each ended by '|'. */
static void answered(char *out, size_t len)
{
	FILE *f = fopen(logpath, "r");
	char line[256];
	size_t at = 0;

	out[0] = '\0';
	while (f && fgets(line, sizeof line, f) && at < len)
		if (!strncmp(line, "answered", 8))
			at += (size_t)snprintf(out + at, len - at, "%.*s|",
					       (int)strcspn(line, "\n"), line);
	if (f)
		fclose(f);
}

/*
 * commd sends a job's device ops to its worker without waiting for the
 * answer to the one before (the worker queues them on its stream), relays
 * the answers in order, and lets no host op, nor a device op after one,
 * past them.
 */
static void test_queued(void)
{
	struct rank k;
	uint64_t a = 0, h = 0, seq = 0;
	char detail[256], got[256];
	int fds0, rc;

	start("queue", 1);
	fds0 = quiet_fds();
	open_rank(&k, "dev-queue", PROTO_VERSION, 0);
	REQUIRE(reg_dev(&k, COMMPB__MEM_KIND__MEM_CUDA_IPC, 64, -1, 4096, &a, detail,
			sizeof detail) == COMM_OK,
		"IPC registration: %s", detail);
	h = reg_host(&k);
	for (uint64_t i = 1; i <= 3; i++)
		post_allreduce(&k, i, a, 64 * i, a, 2048 + 64 * i, 0, NULL);
	/* 4: device, 5: host, 6: device */
	post_allreduce(&k, 4, a, 0, a, 2048, 0, NULL);
	post_allreduce(&k, 5, h, 0, h, 64, 0, NULL);
	post_allreduce(&k, 6, a, 0, a, 2048, 0, NULL);
	for (uint64_t i = 1; i <= 6; i++) {
		rc = op_reply(&k, &seq, detail, sizeof detail);
		CHECK(rc == COMM_OK && seq == i, "op %llu: answered op %llu with %d (%s)",
		      (unsigned long long)i, (unsigned long long)seq, rc, detail);
	}
	answered(got, sizeof got);
	CHECK(!strcmp(got, "answered 3 ops at once|answered 1 op after a pause|"
			   "answered 1 op after a pause|"),
	      "the worker's answers: %s (want 3 ops queued at once, then the ops before "
	      "and after the host op alone)", got);
	close_rank(&k);
	CHECK(logged("eof"), "the worker of a finished job was not let go");
	th_check_baseline(&d, fds0, "queued device ops");
	CHECK(th_daemon_stop(&d) == 0, "daemon stop");
	printf("%s: device ops went to the worker before the one ahead was answered, were "
	       "answered in order, and no host op or later device op got past them\n",
	       check_failures ? "FAIL" : "ok");
}

/*
 * A device op posted in the submission ring, as libcomm posts it: its ready
 * event and done flag reach the worker as from an Op message, and the
 * answer comes back in the slot.
 */
static void test_ring_device(void)
{
	size_t bytes = (RING_BYTES + 4095) / 4096 * 4096;
	struct rank k;
	uint64_t a = 0, seg = 0, one = 1;
	char detail[256], want[128];
	struct ring_hdr *h;
	struct ring_slot *sl;
	uint8_t *mem;
	int mfd, efd;

	start("ok", 1);
	open_rank(&k, "dev-ring", PROTO_VERSION, 0);
	REQUIRE(reg_dev(&k, COMMPB__MEM_KIND__MEM_CUDA_IPC, 64, -1, 4096, &a, detail,
			sizeof detail) == COMM_OK,
		"IPC registration: %s", detail);
	mfd = raw_memfd(bytes);
	mem = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0);
	REQUIRE(mem != MAP_FAILED, "mmap");
	REQUIRE(raw_register_fd(k.fd, &k.rd, mfd, bytes, &seg) == COMM_OK, "register the ring's memfd");
	close(mfd);
	h = (struct ring_hdr *)mem;
	h->magic = RING_MAGIC;
	h->version = RING_VERSION;
	h->nslots = RING_SLOTS;
	h->slot_size = sizeof(struct ring_slot);
	efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	REQUIRE(efd >= 0, "eventfd");
	/* the ring itself must be host memory: commd has no mapping of device memory */
	CHECK(raw_ring_attach(k.fd, &k.rd, a, 0, RING_SLOTS, efd, detail, sizeof detail) ==
			      COMM_ERR_INVALID_ARG &&
		      strstr(detail, "is device memory"),
	      "ring attach in device memory: %s", detail);
	REQUIRE(th_daemon_alive(&d), "commd died of a ring in device memory");
	REQUIRE(raw_ring_attach(k.fd, &k.rd, seg, 0, RING_SLOTS, efd, detail, sizeof detail) ==
			COMM_OK,
		"ring attach: %s", detail);

	sl = ring_slot(mem, 1);
	sl->seq = 1;
	sl->type = COMMPB__OP_TYPE__OP_ALLREDUCE;
	sl->count = 16;
	sl->dtype = COMM_FLOAT32;
	sl->redop = COMM_SUM;
	sl->send_mem = sl->recv_mem = sl->done_mem = a;
	sl->recv_off = 1024;
	sl->done_off = 512;
	sl->done_value = 77;
	memset(sl->ready_event, 0x5c, sizeof sl->ready_event);
	sl->flags = RING_F_EVENT | RING_F_DONE;
	RING_STORE_SC(&sl->posted, 2);
	CHECK(write(efd, &one, sizeof one) == sizeof one, "eventfd write");
	for (int ms = 0; ms < 5000 && RING_LOAD(&sl->done) != 2; ms++)
		usleep(1000);
	CHECK(RING_LOAD(&sl->done) == 2 && sl->status == COMM_OK,
	      "device op in the ring: no answer in its slot (done %llu, status %d)",
	      (unsigned long long)sl->done, sl->status);
	snprintf(want, sizeof want, "rank 0 send %llu+0 recv %llu+1024 event 5c",
		 (unsigned long long)a, (unsigned long long)a);
	CHECK(logged(want), "the ring's device op did not reach the worker with its event");
	snprintf(want, sizeof want, "flag %llu+512 value 77", (unsigned long long)a);
	CHECK(logged(want), "the ring's done flag did not reach the worker");
	printf("%s: a ring in device memory refused; a device op in the ring reached the worker "
	       "with its ready event and done flag; answered in its slot\n", check_failures ? "FAIL" : "ok");
	close_rank(&k);
	munmap(mem, bytes);
	close(efd);
	CHECK(th_daemon_stop(&d) == 0, "daemon stop");
}

/* Live fake workers commd started. */
static int workers_alive(void)
{
	return th_children(d.pid, "fake-gpu-worker", NULL);
}

/* Wait (up to 5 s) until commd has no live worker: 1 when so. */
static int workers_gone(void)
{
	for (int i = 0; i < 100; i++) {
		if (!workers_alive())
			return 1;
		usleep(50 * 1000);
	}
	return 0;
}

/* mode: crash or hang. The device job fails; a host job beside it runs. */
static void test_bad_worker(const char *mode)
{
	struct rank k;
	uint64_t a = 0;
	char detail[256];
	int fds0, rc, hang = !strcmp(mode, "hang");

	start(mode, 1);
	fds0 = quiet_fds();
	open_rank(&k, "dev", PROTO_VERSION, hang ? 1500 : 0);
	CHECK(reg_dev(&k, COMMPB__MEM_KIND__MEM_CUDA_IPC, 64, -1, 4096, &a, detail,
		      sizeof detail) == COMM_OK,
	      "%s: registration: %s", mode, detail);
	rc = allreduce(&k, 1, a, 0, a, 0, 0, NULL, detail, sizeof detail);
	if (hang)
		CHECK(rc == COMM_ERR_TIMEOUT && strstr(detail, "did not finish it within 1500 ms"),
		      "hung worker: %d %s", rc, detail);
	else
		CHECK(rc == COMM_ERR_ABORTED && strstr(detail, "gpu worker of job dev") &&
			      strstr(detail, "signal 9"),
		      "crashed worker: %d %s", rc, detail);
	CHECK(reg_dev(&k, COMMPB__MEM_KIND__MEM_CUDA_IPC, 64, -1, 4096, NULL, detail,
		      sizeof detail) != COMM_OK &&
		      strstr(detail, hang ? "busy when the job failed" : "signal 9"),
	      "%s: registration after the worker died: %s", mode, detail);
	CHECK(th_run_ranks(&d, "host", 2, host_rank, NULL) == 0, "%s: host job beside failed", mode);
	CHECK(th_daemon_alive(&d), "%s: daemon died", mode);
	close_rank(&k);
	th_check_baseline(&d, fds0, mode);
	CHECK(th_daemon_stop(&d) == 0, "daemon stop");
}

/*
 * The job's last rank goes while its op hangs on the worker: the job fails,
 * the worker is killed and the op answered with no rank left to hear it,
 * which frees the job; commd lives on, fds back, a host job runs after.
 */
static void test_last_rank_gone(void)
{
	struct rank k;
	uint64_t a = 0;
	int fds0;

	start("hang", 1);
	fds0 = quiet_fds();
	open_rank(&k, "dev-last", PROTO_VERSION, 0);
	REQUIRE(reg_dev(&k, COMMPB__MEM_KIND__MEM_CUDA_IPC, 64, -1, 4096, &a, NULL, 0) == COMM_OK,
		"registration");
	post_allreduce(&k, 1, a, 0, a, 0, 0, NULL);
	CHECK(logged("op type 1"), "the op did not reach the worker");
	close_rank(&k);
	CHECK(workers_gone(), "the worker hung in the op outlived its job");
	CHECK(th_daemon_alive(&d), "commd died when the last rank of a job went mid-op");
	th_check_baseline(&d, fds0, "the last rank gone mid-op");
	CHECK(th_run_ranks(&d, "host", 2, host_rank, NULL) == 0, "host job after");
	CHECK(th_daemon_stop(&d) == 0, "daemon stop");
	printf("%s: the last rank gone while its op hangs on the worker: worker killed, commd "
	       "on\n", check_failures ? "FAIL" : "ok");
}

/* SIGTERM while a worker hangs in an op: commd answers the op and exits 0. */
/* A commd with a mode-mode fake worker, and k a rank of job with 4096 bytes of device memory: its id. */
static uint64_t dev_rank(struct rank *k, const char *mode, const char *job)
{
	uint64_t a = 0;

	start(mode, 1);
	open_rank(k, job, PROTO_VERSION, 0);
	REQUIRE(reg_dev(k, COMMPB__MEM_KIND__MEM_CUDA_IPC, 64, -1, 4096, &a, NULL, 0) == COMM_OK,
		"registration");
	return a;
}

/* commd's wait status once it ended, looked for every 50 ms, polls times at most; -1 if not. */
static int commd_end(int polls)
{
	int st = -1;

	for (int i = 0; i < polls && waitpid(d.pid, &st, WNOHANG) == 0; i++)
		usleep(50 * 1000);
	return st;
}

/*
 * commd stopping waits (up to 5 s) for a worker that does not heed EOF;
 * SIGTERM, SIGINT and SIGHUP sent then are one too many, not a kill: commd
 * still exits 0 (it died of the second SIGTERM, the default action being
 * back once its signal watchers closed).
 */
static void test_signal_while_stopping(void)
{
	struct rank k;
	int st;

	dev_rank(&k, "rogue", "deaf");
	kill(d.pid, SIGTERM);
	for (int i = 0; i < 100 && !logged("rogue: deaf at eof"); i++)
		usleep(20 * 1000);
	CHECK(logged("rogue: deaf at eof"), "commd stopping did not hang up on its worker");
	kill(d.pid, SIGTERM);
	kill(d.pid, SIGINT);
	kill(d.pid, SIGHUP);
	st = commd_end(300);
	CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0,
	      "signals while commd waited for a deaf worker: status %#x", st);
	printf("%s: SIGTERM, SIGINT and SIGHUP while commd stops: it still exits 0\n",
	       check_failures ? "FAIL" : "ok");
	close_rank(&k);
	th_daemon_cleanup(&d);
}

static void test_shutdown_hung(void)
{
	Commpb__Envelope env = COMMPB__ENVELOPE__INIT, *reply;
	Commpb__Op op = COMMPB__OP__INIT;
	Commpb__BufRef s = COMMPB__BUF_REF__INIT;
	struct timespec t0;
	struct rank k;
	int st;

	s.mem_id = dev_rank(&k, "hang", "dev");
	op.seq = 1;
	op.type = COMMPB__OP_TYPE__OP_ALLREDUCE;
	op.send = &s;
	op.recv = &s;
	op.count = 4;
	op.dtype = COMM_INT32;
	env.body_case = COMMPB__ENVELOPE__BODY_OP;
	env.op = &op;
	raw_send(k.fd, &env, NULL, 0);
	CHECK(logged("op type 1"), "the op did not reach the worker");
	clock_gettime(CLOCK_MONOTONIC, &t0);
	kill(d.pid, SIGTERM);
	reply = raw_recv(k.fd, &k.rd);
	if (reply) {
		CHECK(reply->body_case == COMMPB__ENVELOPE__BODY_OP_DONE &&
			      reply->op_done->status != COMM_OK,
		      "the hung op was not failed at shutdown");
		commpb__envelope__free_unpacked(reply, NULL);
	}
	st = commd_end(100);
	CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0, "commd with a hung worker: status %#x", st);
	CHECK(th_secs_since(&t0) < 5, "shutdown took %.1f s", th_secs_since(&t0));
	close_rank(&k);
	th_daemon_cleanup(&d);
}

/*
 * A worker that never answers MEM_OPEN (a driver stuck opening a handle):
 * the rank hears TIMEOUT at the job's deadline, or PEER_LOST at once when
 * another rank dies; a job that ends with the registration unanswered has
 * its worker killed. Each time the worker is gone and the fds are back.
 */
static void test_hung_open(void)
{
	struct rank k0, k1;
	struct timespec t0;
	char detail[256] = "";
	int fds0, rc;

	start("hangopen", 1);
	fds0 = quiet_fds();
	open_rank(&k0, "open-deadline", PROTO_VERSION, 1500);
	clock_gettime(CLOCK_MONOTONIC, &t0);
	rc = reg_dev(&k0, COMMPB__MEM_KIND__MEM_CUDA_IPC, 64, -1, 4096, NULL, detail,
		     sizeof detail);
	CHECK(rc == COMM_ERR_TIMEOUT && strstr(detail, "did not open device memory of rank 0 "
						   "within 1500 ms"),
	      "registration on a worker hung in open: %d %s", rc, detail);
	CHECK(th_secs_since(&t0) < 4, "the deadline answer took %.1f s", th_secs_since(&t0));
	CHECK(workers_gone(), "the hung worker was not killed at the deadline");
	close_rank(&k0);
	th_check_baseline(&d, fds0, "a registration past its deadline");

	hello_rank(&k0, "open-peer", 0, 2, PROTO_VERSION, 60000);
	hello_rank(&k1, "open-peer", 1, 2, PROTO_VERSION, 60000);
	hello_done(&k0);
	hello_done(&k1);
	unlink(logpath);
	reg_dev_post(&k0, COMMPB__MEM_KIND__MEM_CUDA_IPC, 64, -1, 4096);
	CHECK(logged("hanging in open"), "the registration did not reach the worker");
	clock_gettime(CLOCK_MONOTONIC, &t0);
	close_rank(&k1); /* rank 1 dies while the worker hangs in rank 0's open */
	rc = reg_dev_answer(&k0, NULL, detail, sizeof detail);
	CHECK(rc == COMM_ERR_PEER_LOST && th_secs_since(&t0) < 4,
	      "registration after the other rank died: %d %s (%.1f s)", rc, detail,
	      th_secs_since(&t0));
	CHECK(workers_gone(), "the hung worker outlived its failed job");
	close_rank(&k0);
	th_check_baseline(&d, fds0, "a registration on a failed job");

	open_rank(&k0, "open-gone", PROTO_VERSION, 60000);
	unlink(logpath);
	reg_dev_post(&k0, COMMPB__MEM_KIND__MEM_CUDA_IPC, 64, -1, 4096);
	CHECK(logged("hanging in open"), "the registration did not reach the worker");
	close_rank(&k0); /* the job ends with its registration unanswered */
	CHECK(workers_gone(), "a worker hung in open outlived its job");
	th_check_baseline(&d, fds0, "a job gone with a registration unanswered");
	CHECK(th_run_ranks(&d, "host", 2, host_rank, NULL) == 0, "host job after the hung opens");
	CHECK(th_daemon_stop(&d) == 0, "daemon stop");
	printf("%s: a worker hung opening memory: TIMEOUT at the deadline, PEER_LOST when a rank "
	       "died, killed when its job ended\n", check_failures ? "FAIL" : "ok");
}

/* The lowest n fd numbers free in process pid (below 4096). */
static void free_fds(pid_t pid, int *out, int n)
{
	static char used[4096];
	char path[64];
	struct dirent *e;
	DIR *dp;
	int k = 0;

	memset(used, 0, sizeof used);
	snprintf(path, sizeof path, "/proc/%d/fd", (int)pid);
	REQUIRE((dp = opendir(path)), "opendir %s", path);
	while ((e = readdir(dp)))
		if (*e->d_name != '.' && atoi(e->d_name) < (int)sizeof used)
			used[atoi(e->d_name)] = 1;
	closedir(dp);
	for (int fd = 0; fd < (int)sizeof used && k < n; fd++)
		if (!used[fd])
			out[k++] = fd;
	REQUIRE(k == n, "%d free fds below %zu", n, sizeof used);
}

/* commd's soft limit on fds set to lim (its hard limit kept). */
static void fd_limit(rlim_t lim)
{
	struct rlimit rl;

	REQUIRE(prlimit(d.pid, RLIMIT_NOFILE, NULL, &rl) == 0, "prlimit: %s", strerror(errno));
	rl.rlim_cur = lim;
	REQUIRE(prlimit(d.pid, RLIMIT_NOFILE, &rl, NULL) == 0, "prlimit: %s", strerror(errno));
}

/*
 * commd out of fds when a job's first device memory needs a worker: the
 * socketpair fails, then (2 fds left) the spawn's own pipe: each answered
 * NO_MEMORY saying so (it was UNSUPPORTED, and the failed spawn's process
 * handle was freed while still in the loop); with the limit back, the next
 * registration starts the worker and commd exits cleanly.
 */
static void test_no_fds(void)
{
	struct rlimit rl;
	struct rank k;
	char detail[256] = "";
	int fds0, fr[3], rc;

	if (getenv("COMMD_WRAPPER") && *getenv("COMMD_WRAPPER")) {
		printf("skip: out of fds: under $COMMD_WRAPPER the fds are the wrapper's too\n");
		return;
	}
	start("ok", 1);
	fds0 = quiet_fds();
	REQUIRE(prlimit(d.pid, RLIMIT_NOFILE, NULL, &rl) == 0, "prlimit: %s", strerror(errno));
	open_rank(&k, "nofd", PROTO_VERSION, 0);
	free_fds(d.pid, fr, 3);
	fd_limit((rlim_t)fr[0]);
	rc = reg_dev(&k, COMMPB__MEM_KIND__MEM_CUDA_IPC, 64, -1, 4096, NULL, detail, sizeof detail);
	CHECK(rc == COMM_ERR_NO_MEMORY && strstr(detail, "socketpair") &&
		      strstr(detail, "out of file descriptors"),
	      "registration with no fd left: %d %s", rc, detail);
	fd_limit((rlim_t)fr[2]);
	rc = reg_dev(&k, COMMPB__MEM_KIND__MEM_CUDA_IPC, 64, -1, 4096, NULL, detail, sizeof detail);
	CHECK(rc == COMM_ERR_NO_MEMORY && strstr(detail, "cannot start") &&
		      strstr(detail, "out of file descriptors"),
	      "registration with 2 fds left: %d %s", rc, detail);
	CHECK(!logged("hello"), "a worker started with no fd left for it");
	fd_limit(rl.rlim_cur);
	rc = reg_dev(&k, COMMPB__MEM_KIND__MEM_CUDA_IPC, 64, -1, 4096, NULL, detail, sizeof detail);
	CHECK(rc == COMM_OK, "registration with the fds back: %d %s", rc, detail);
	close_rank(&k);
	CHECK(workers_gone(), "the worker outlived its job");
	th_check_baseline(&d, fds0, "out of fds");
	CHECK(th_daemon_stop(&d) == 0, "daemon stop after running out of fds");
	printf("%s: out of fds for a worker: NO_MEMORY, saying so; the next one starts\n",
	       check_failures ? "FAIL" : "ok");
}

/*
 * A worker that breaks the protocol (fake-gpu-worker's rogue mode, the job
 * named for how) and then ignores EOF: its job fails saying why, it is
 * killed, and commd, its fds and a host job go on. Before, a second hello
 * reply or an NCCL id nobody asked for was taken, a status that is no
 * result code reached the rank, and a worker that broke it was only hung
 * up on, so one that did not heed EOF stayed. A worker that serves but
 * ignores EOF when its job ends (stuck in the driver) is killed 5 s later:
 * it stayed, and held commd at shutdown.
 */
static void test_rogue_worker(void)
{
	static const struct {
		const char *job;
		int at_op; /* 1: the registration succeeds, the op fails; 2: a second op does */
		const char *why;
	} cases[] = {
		{ "rehello", 0, "broke the protocol: it sent a second hello reply" },
		{ "early", 0, "broke the protocol: it sent a message of type 4 before its hello reply" },
		{ "unknown", 0, "broke the protocol: it sent a message of unknown type 42" },
		{ "huge", 0, "broke the protocol: a malformed message (65536 bytes, too long)" },
		{ "strayid", 0, "broke the protocol: it sent an NCCL id it was not asked for" },
		{ "badstatus", 0, "broke the protocol: it answered status 9999, no result code" },
		{ "strayopen", 0, "broke the protocol: it answered a mem it was not opening" },
		{ "strayop", 1, "broke the protocol: it answered an op other than its oldest" },
		{ "extraop", 2, "broke the protocol: it answered an op" },
	};
	char detail[256], want[128];
	struct timespec t0;
	struct rank k;
	uint64_t a = 0;
	int fds0, rc;

	start("rogue", 1);
	fds0 = quiet_fds();
	for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
		const char *job = cases[i].job;

		snprintf(want, sizeof want, "gpu worker of job %s: %s", job, cases[i].why);
		open_rank(&k, job, PROTO_VERSION, 0);
		detail[0] = '\0';
		rc = reg_dev(&k, COMMPB__MEM_KIND__MEM_CUDA_IPC, 64, -1, 4096, &a, detail,
			     sizeof detail);
		if (cases[i].at_op) {
			CHECK(rc == COMM_OK, "%s: registration: %d %s", job, rc, detail);
			rc = allreduce(&k, 1, a, 0, a, 0, 0, NULL, detail, sizeof detail);
		}
		if (cases[i].at_op == 2) {
			CHECK(rc == COMM_OK, "%s: the first op: %d %s", job, rc, detail);
			rc = allreduce(&k, 2, a, 0, a, 0, 0, NULL, detail, sizeof detail);
		}
		CHECK(rc == COMM_ERR_ABORTED && strstr(detail, want), "%s: %d %s", job, rc, detail);
		CHECK(workers_gone(), "%s: the worker that broke the protocol was not killed", job);
		close_rank(&k);
		CHECK(th_daemon_alive(&d), "%s: commd died", job);
		th_check_baseline(&d, fds0, job);
	}
	/* one that serves but does not heed EOF once its job is gone: killed 5 s later */
	open_rank(&k, "deaf", PROTO_VERSION, 0);
	rc = reg_dev(&k, COMMPB__MEM_KIND__MEM_CUDA_IPC, 64, -1, 4096, &a, detail, sizeof detail);
	CHECK(rc == COMM_OK, "deaf: registration: %d %s", rc, detail);
	close_rank(&k);
	CHECK(logged("rogue: deaf at eof"), "deaf: the worker saw no EOF when its job ended");
	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (int i = 0; i < 200 && workers_alive(); i++)
		usleep(50 * 1000);
	CHECK(!workers_alive() && th_secs_since(&t0) > 3,
	      "deaf: a worker that ignored EOF was %s after %.1f s",
	      workers_alive() ? "still there" : "killed", th_secs_since(&t0));
	th_check_baseline(&d, fds0, "deaf");
	/*
	 * One that closes its socket after a registration and lives on: killed
	 * 5 s later (it stayed, its job waiting for its exit), and the job's
	 * next op fails saying so.
	 */
	open_rank(&k, "mute", PROTO_VERSION, 0);
	rc = reg_dev(&k, COMMPB__MEM_KIND__MEM_CUDA_IPC, 64, -1, 4096, &a, detail, sizeof detail);
	CHECK(rc == COMM_OK, "mute: registration: %d %s", rc, detail);
	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (int i = 0; i < 200 && workers_alive(); i++)
		usleep(50 * 1000);
	CHECK(!workers_alive() && th_secs_since(&t0) > 3,
	      "mute: a worker that closed its socket and lived on was %s after %.1f s",
	      workers_alive() ? "still there" : "killed", th_secs_since(&t0));
	rc = allreduce(&k, 1, a, 0, a, 0, 0, NULL, detail, sizeof detail);
	CHECK(rc == COMM_ERR_ABORTED && strstr(detail, "signal 9"),
	      "mute: the op after: %d %s (want ABORTED, the worker killed)", rc, detail);
	close_rank(&k);
	th_check_baseline(&d, fds0, "mute");
	CHECK(th_run_ranks(&d, "host", 2, host_rank, NULL) == 0, "host job after the rogue workers");
	CHECK(th_daemon_stop(&d) == 0, "daemon stop");
	printf("%s: workers that break the protocol: killed, their jobs failed saying why; one "
	       "that ignores EOF killed 5 s after\n",
	       check_failures ? "FAIL" : "ok");
}

/* Job's registered bytes (host and device) by status; -1 when it is not listed. */
static long long job_registered(const char *job)
{
	Commpb__Envelope *st = status();
	long long v = -1;

	for (size_t i = 0; i < st->status_reply->n_jobs; i++)
		if (!strcmp(st->status_reply->jobs[i]->name, job))
			v = (long long)st->status_reply->jobs[i]->mem_registered;
	commpb__envelope__free_unpacked(st, NULL);
	return v;
}

/*
 * max-job-memory is host memory: device registrations do not use it up,
 * though status counts them in the job's registered bytes.
 */
static void test_device_not_charged(void)
{
	struct rank k;
	uint64_t id = 0;
	char detail[256] = "";
	int mfd, rc;

	setenv("FAKE_GPU_MODE", "ok", 1);
	unlink(logpath);
	REQUIRE(th_daemon_start(&d, "--gpu-worker", getenv("FAKE_GPU_WORKER"), "--max-job-memory",
				"1M", NULL) == 0,
		"daemon start (max-job-memory 1M)");
	open_rank(&k, "charge", PROTO_VERSION, 0);
	rc = reg_dev(&k, COMMPB__MEM_KIND__MEM_CUDA_IPC, 64, -1, 64ull << 20, NULL, detail,
		     sizeof detail);
	CHECK(rc == COMM_OK, "64 MiB of device memory against max-job-memory 1M: %d %s", rc,
	      detail);
	mfd = raw_memfd(512 << 10);
	rc = raw_register_fd(k.fd, &k.rd, mfd, 512 << 10, &id);
	CHECK(rc == COMM_OK, "512 KiB of host memory after 64 MiB of device memory: %d", rc);
	close(mfd);
	CHECK(job_registered("charge") == (64ll << 20) + (512 << 10),
	      "status: job charge has %lld bytes registered, not its 64 MiB + 512 KiB",
	      job_registered("charge"));
	mfd = raw_memfd(768 << 10);
	rc = raw_register_fd(k.fd, &k.rd, mfd, 768 << 10, &id);
	CHECK(rc == COMM_ERR_NO_MEMORY, "host memory past max-job-memory: %d", rc);
	close(mfd);
	close_rank(&k);
	CHECK(th_daemon_stop(&d) == 0, "daemon stop");
	printf("%s: device memory does not count against max-job-memory (status shows it); host "
	       "memory does\n",
	       check_failures ? "FAIL" : "ok");
}

/* A worker whose hello says no device; then a probe that says no GPU at all. */
static void test_refusals(void)
{
	struct rank k;
	Commpb__Envelope *st;
	char detail[256];

	start("refuse", 1);
	open_rank(&k, "dev", PROTO_VERSION, 0);
	CHECK(reg_dev(&k, COMMPB__MEM_KIND__MEM_CUDA_IPC, 64, -1, 4096, NULL, detail,
		      sizeof detail) == COMM_ERR_UNSUPPORTED &&
		      !strcmp(detail, "fake: no device"),
	      "refusing worker: %s", detail);
	CHECK(reg_dev(&k, COMMPB__MEM_KIND__MEM_CUDA_IPC, 64, -1, 4096, NULL, detail,
		      sizeof detail) == COMM_ERR_UNSUPPORTED &&
		      strstr(detail, "fake: no device"),
	      "second registration on a refusing worker: %s", detail);
	close_rank(&k);
	CHECK(th_daemon_stop(&d) == 0, "daemon stop");

	start("noprobe", 1);
	st = status();
	CHECK(!strcmp(st->status_reply->nccl, "unavailable (fake: no driver)"), "nccl: %s",
	      st->status_reply->nccl);
	for (size_t i = 0; i < st->status_reply->n_backends; i++)
		CHECK(strcmp(st->status_reply->backends[i], "gpu"), "gpu backend listed without a GPU");
	commpb__envelope__free_unpacked(st, NULL);
	open_rank(&k, "dev", PROTO_VERSION, 0);
	CHECK(reg_dev(&k, COMMPB__MEM_KIND__MEM_CUDA_IPC, 64, -1, 4096, NULL, detail,
		      sizeof detail) == COMM_ERR_UNSUPPORTED &&
		      !strcmp(detail, "device memory: no GPU here (unavailable: fake: no driver)"),
	      "no GPU: %s", detail);
	close_rank(&k);
	CHECK(!logged("hello"), "a worker was started on a node without a GPU");
	CHECK(th_daemon_stop(&d) == 0, "daemon stop");
}

/* commd's own worker (or none) on this machine: where no GPU works, it says so. */
static void test_this_machine(void)
{
	Commpb__Envelope *st;
	struct rank k;
	char detail[256];

	start("ok", 0);
	st = status();
	printf("# this machine: gpu: %s; nccl: %s\n", st->status_reply->gpu,
	       st->status_reply->nccl);
	if (!strncmp(st->status_reply->gpu, "unavailable: ", 13)) {
		CHECK(!strncmp(st->status_reply->nccl, "unavailable (", 13) &&
			      strlen(st->status_reply->nccl) > 15,
		      "nccl line without a reason: %s", st->status_reply->nccl);
		open_rank(&k, "dev", PROTO_VERSION, 0);
		CHECK(reg_dev(&k, COMMPB__MEM_KIND__MEM_CUDA_IPC, 64, -1, 4096, NULL, detail,
			      sizeof detail) == COMM_ERR_UNSUPPORTED &&
			      strstr(detail, "no GPU here (unavailable: "),
		      "device memory without a GPU: %s", detail);
		close_rank(&k);
	}
	commpb__envelope__free_unpacked(st, NULL);
	CHECK(th_run_ranks(&d, "host", 2, host_rank, NULL) == 0, "host job failed");
	CHECK(th_daemon_stop(&d) == 0, "daemon stop");
}

/* --- a job over two daemons ------------------------------------------------------- */

/*
 * Rank r of a 2-rank job over daemons (root: the root's peer address), its
 * deadline timeout_ms (0: the default): the hello only.
 */
static void join_send(struct rank *k, const struct th_daemon *dd, const char *job, int r,
		      const char *root, uint32_t timeout_ms)
{
	Commpb__Envelope env = COMMPB__ENVELOPE__INIT;
	Commpb__Hello h = COMMPB__HELLO__INIT;

	k->fd = raw_connect(dd->sock);
	frame_reader_init(&k->rd);
	h.version_min = 1;
	h.version_max = PROTO_VERSION;
	h.job = (char *)job;
	h.rank = r;
	h.world_size = 2;
	h.root = (char *)root;
	h.timeout_ms = timeout_ms;
	env.body_case = COMMPB__ENVELOPE__BODY_HELLO;
	env.hello = &h;
	raw_send(k->fd, &env, NULL, 0);
}

/* ... and its reply, once both ranks joined. */
static void join_wait(struct rank *k, const char *job)
{
	Commpb__Envelope *reply = raw_recv(k->fd, &k->rd);

	REQUIRE(reply && reply->body_case == COMMPB__ENVELOPE__BODY_HELLO_REPLY &&
			reply->hello_reply->status == COMM_OK,
		"hello of job %s over two daemons", job);
	commpb__envelope__free_unpacked(reply, NULL);
}

/* Post a send to (or a recv from) peer of count bytes at mem, with a ready event when event is set. */
static void post_p2p_event(struct rank *k, uint64_t seq, int send, uint64_t mem, int peer,
			   size_t count, int event)
{
	Commpb__Envelope env = COMMPB__ENVELOPE__INIT;
	Commpb__Op op = COMMPB__OP__INIT;
	Commpb__BufRef b = COMMPB__BUF_REF__INIT;
	uint8_t ev[64];

	memset(ev, 0x5d, sizeof ev);
	if (event) {
		op.ready_event.data = ev;
		op.ready_event.len = sizeof ev;
	}
	b.mem_id = mem;
	op.seq = seq;
	op.type = send ? COMMPB__OP_TYPE__OP_SEND : COMMPB__OP_TYPE__OP_RECV;
	if (send)
		op.send = &b;
	else
		op.recv = &b;
	op.count = count;
	op.dtype = COMM_UINT8;
	op.peer = peer;
	env.body_case = COMMPB__ENVELOPE__BODY_OP;
	env.op = &op;
	raw_send(k->fd, &env, NULL, 0);
}

static void post_p2p(struct rank *k, uint64_t seq, int send, uint64_t mem, int peer, size_t count)
{
	post_p2p_event(k, seq, send, mem, peer, count, 0);
}

/*
 * A send between two ranks of one daemon waits for both ranks' work: the
 * receiver's ready event reaches the worker too, in a second entry that
 * names no buffer (before, only the sender's went: the copy could land
 * while the receiver's stream still used its buffer). The bytes arrive.
 */
static void test_local_send_event(void)
{
	struct rank k[2];
	uint64_t mem[2];
	uint8_t *map[2];
	char detail[2][256];
	int st[2];

	start("ok", 1);
	for (int r = 0; r < 2; r++)
		hello_rank(&k[r], "local-send", r, 2, PROTO_VERSION, 0);
	for (int r = 0; r < 2; r++)
		hello_done(&k[r]);
	for (int r = 0; r < 2; r++)
		mem[r] = reg_fake_dev(&k[r], 4096, &map[r]);
	memset(map[0], 0x37, 16);
	memset(map[1], 0, 16);
	post_p2p(&k[0], 1, 1, mem[0], 1, 16);
	post_p2p_event(&k[1], 1, 0, mem[1], 0, 16, 1);
	for (int r = 0; r < 2; r++)
		st[r] = op_reply(&k[r], NULL, detail[r], sizeof detail[r]);
	CHECK(st[0] == COMM_OK && st[1] == COMM_OK, "local device send: %d (%s), %d (%s)", st[0],
	      detail[0], st[1], detail[1]);
	CHECK(logged("op type 7 dtype 1 redop 0 root 0 count 16 n 2"),
	      "the send did not reach the worker with a second entry");
	CHECK(logged("rank 1 send 0+0 recv 0+0 event 5d"),
	      "the receiver's ready event did not reach the worker");
	CHECK(map[1][0] == 0x37 && map[1][15] == 0x37, "the bytes did not arrive: %02x %02x",
	      map[1][0], map[1][15]);
	printf("%s: a send on one daemon: the receiver's ready event reaches the worker too\n",
	       check_failures ? "FAIL" : "ok");
	for (int r = 0; r < 2; r++) {
		munmap(map[r], 4096);
		close_rank(&k[r]);
	}
	CHECK(th_daemon_stop(&d) == 0, "daemon stop");
}

/* Both ranks' OpDone: each status want, each detail holding has (NULL: any). */
static void both_done(struct rank *k, int want, const char *has, const char *what)
{
	char detail[2][256];

	for (int r = 0; r < 2; r++) {
		int st = op_reply(&k[r], NULL, detail[r], sizeof detail[r]);

		CHECK(st == want && (!has || strstr(detail[r], has)),
		      "%s: rank %d got %d (%s), expected %d with \"%s\"", what, r, st, detail[r], want,
		      has ? has : "");
	}
}

/* How many lines of the worker log hold want. */
static int logged_times(const char *want)
{
	FILE *f = fopen(logpath, "r");
	char line[512];
	int n = 0;

	if (!f)
		return 0;
	while (fgets(line, sizeof line, f))
		n += strstr(line, want) != NULL;
	fclose(f);
	return n;
}

/*
 * A send of n bytes from node from's rank to the other's, staged through
 * host memory: device or host memory on each side; every byte checked
 * (the pattern depends on mark).
 */
static void staged_send(struct rank *k, uint64_t *seq, int dev_src, int dev_dst, int from,
			size_t n, int mark)
{
	int to = 1 - from;
	size_t size = n < 4096 ? 4096 : n, bad = n;
	uint8_t *map[2];
	uint64_t mem[2];
	char what[96];

	for (int side = 0; side < 2; side++) {
		int r = side ? to : from, dev = side ? dev_dst : dev_src;

		mem[r] = dev ? reg_fake_dev(&k[r], size, &map[r]) : reg_host_map(&k[r], size, &map[r]);
	}
	for (size_t i = 0; i < n; i++)
		map[from][i] = (uint8_t)(i * 7 + (size_t)mark + 1);
	memset(map[to], 0, size);
	snprintf(what, sizeof what, "a send of %zu bytes from %s on node %d to %s on node %d", n,
		 dev_src ? "device" : "host", from, dev_dst ? "device" : "host", to);
	++*seq;
	post_p2p(&k[from], *seq, 1, mem[from], to, n);
	post_p2p(&k[to], *seq, 0, mem[to], from, n);
	both_done(k, COMM_OK, NULL, what);
	for (size_t i = 0; i < n && bad == n; i++)
		if (map[to][i] != (uint8_t)(i * 7 + (size_t)mark + 1))
			bad = i;
	CHECK(bad == n, "%s: byte %zu is %u, sent %u", what, bad, bad < n ? map[to][bad] : 0,
	      (uint8_t)(bad * 7 + (size_t)mark + 1));
	for (int r = 0; r < 2; r++)
		munmap(map[r], size);
}

/*
 * Sends between the two daemons' ranks staged through host memory: device
 * to device both ways, small and larger than a staging buffer's first
 * size, device to host and host to device; every byte checked. Then a
 * small one again, which reuses a staging buffer on each node: 2 made on
 * each, 4 in all. Then sizes that differ: the receiver says so.
 */
static void staged_p2p(struct rank *k, uint64_t *seq)
{
	static const struct {
		int dev_src, dev_dst, from;
		size_t count;
	} cases[] = {
		{ 1, 1, 0, 16 }, { 1, 1, 1, 300000 }, { 1, 0, 0, 4096 }, { 0, 1, 1, 4096 },
		{ 1, 1, 0, 100 },
	};
	uint8_t *map[2];
	uint64_t mem[2];
	char why[2][256];
	int st[2];

	for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++)
		staged_send(k, seq, cases[c].dev_src, cases[c].dev_dst, cases[c].from,
			    cases[c].count, (int)c);
	CHECK(logged_times(" kind 3 ") == 4, "%d staging buffers opened, expected 4 (2 a node)",
	      logged_times(" kind 3 "));
	/* 100 bytes sent to a recv of 200: the receiver's MISMATCH names both; both return */
	for (int r = 0; r < 2; r++)
		mem[r] = reg_fake_dev(&k[r], 4096, &map[r]);
	++*seq;
	post_p2p(&k[0], *seq, 1, mem[0], 1, 100);
	post_p2p(&k[1], *seq, 0, mem[1], 0, 200);
	for (int r = 0; r < 2; r++)
		st[r] = op_reply(&k[r], NULL, why[r], sizeof why[r]);
	CHECK(st[1] == COMM_ERR_MISMATCH && strstr(why[1], "100 bytes sent, 200 expected"),
	      "a staged send of 100 bytes to a recv of 200: the receiver got %d (%s)", st[1], why[1]);
	CHECK(st[0] == COMM_OK || st[0] == COMM_ERR_MISMATCH,
	      "a staged send of 100 bytes to a recv of 200: the sender got %d (%s)", st[0], why[0]);
	for (int r = 0; r < 2; r++)
		munmap(map[r], 4096);
}

/* Status on node n shows its 2 idle staging buffers: 64 KiB and 320 KiB (300,000 rounded). */
static void staged_status(const struct th_daemon *nd, const char *job)
{
	for (int n = 0; n < 2; n++)
		CHECK(gpu_line_has(&nd[n], job, "; 2 staging buffers (384 KiB), 2 idle"),
		      "status on node %d does not show its 2 idle staging buffers", n);
}

/*
 * A worker keeps the staging buffers used last: sends of 8 growing sizes
 * (384-832 KiB, each larger than every idle buffer, so each makes one on
 * both nodes) leave the 8 newest idle, the 2 older ones closed. The
 * largest sent again reuses its buffers; when the newest was the one
 * given up, each such send made and pinned a buffer again.
 */
static void staged_lru(struct rank *k, uint64_t *seq, const struct th_daemon *nd,
		       const char *job)
{
	int before = logged_times(" kind 3 ");

	for (int i = 1; i <= 8; i++)
		staged_send(k, seq, 1, 1, 0, (size_t)(320 + 64 * i) << 10, 10 + i);
	CHECK(logged_times(" kind 3 ") == before + 16, "%d staging buffers opened, expected %d",
	      logged_times(" kind 3 "), before + 16);
	staged_send(k, seq, 1, 1, 0, 832u << 10, 20);
	CHECK(logged_times(" kind 3 ") == before + 16,
	      "the largest send again opened %d staging buffers, expected none",
	      logged_times(" kind 3 ") - before - 16);
	for (int n = 0; n < 2; n++)
		CHECK(gpu_line_has(&nd[n], job, "; 8 staging buffers (4864 KiB), 8 idle"),
		      "status on node %d does not show its 8 newest staging buffers idle", n);
}

/*
 * A host all-reduce over the two daemons, large enough for their ring
 * (32 KiB of int32), whose root field is junk: only broadcast and reduce
 * read it, so it must run, and exactly (each rank holds its rank + i).
 */
static void junk_root_allreduce(struct rank *k, uint64_t *seq)
{
	Commpb__Envelope env = COMMPB__ENVELOPE__INIT;
	Commpb__Op op = COMMPB__OP__INIT;
	Commpb__BufRef b[2] = { COMMPB__BUF_REF__INIT, COMMPB__BUF_REF__INIT };
	enum { COUNT = 8192 };
	uint8_t *map[2];
	int32_t *v;
	int bad = 0;

	++*seq;
	for (int r = 0; r < 2; r++) {
		b[r].mem_id = reg_host_map(&k[r], COUNT * sizeof *v, &map[r]);
		v = (int32_t *)map[r];
		for (int i = 0; i < COUNT; i++)
			v[i] = r + i;
		op.seq = *seq;
		op.type = COMMPB__OP_TYPE__OP_ALLREDUCE;
		op.send = op.recv = &b[r];
		op.count = COUNT;
		op.dtype = COMM_INT32;
		op.redop = COMM_SUM;
		op.root = 1 << 30;
		env.body_case = COMMPB__ENVELOPE__BODY_OP;
		env.op = &op;
		raw_send(k[r].fd, &env, NULL, 0);
	}
	both_done(k, COMM_OK, NULL, "a host all-reduce with a junk root field over two daemons");
	for (int r = 0; r < 2; r++) {
		v = (int32_t *)map[r];
		for (int i = 0; i < COUNT; i++)
			bad += v[i] != 1 + 2 * i;
		munmap(map[r], COUNT * sizeof *v);
	}
	CHECK(!bad, "a host all-reduce with a junk root field: %d wrong values", bad);
}

/*
 * Device memory across daemons, on two daemons with fake workers: node
 * 0's worker hands commd an NCCL id, the verdicts carry it to node 1,
 * both workers get WORLD with it and the op with each rank's grank;
 * refused before any worker sees them: buffers of device memory on one
 * node and host memory on the other, two devices on one node; the job
 * goes on after each. Sends between them, staged (staged_p2p). Then a node 0 whose worker
 * has no id: the op fails on both nodes, saying so.
 */
static void test_across_daemons(void)
{
	struct th_daemon nd[2];
	struct rank k[2];
	uint64_t dev[2], host, dev2, seq = 1;
	char job[32];

	for (int round = 0; round < 2; round++) {
		snprintf(job, sizeof job, "dev-nodes-%d", round);
		unlink(logpath);
		for (int n = 0; n < 2; n++) {
			setenv("FAKE_GPU_MODE", round && n == 0 ? "noid" : "ok", 1);
			REQUIRE(th_daemon_start_peer(&nd[n], "--gpu-worker", getenv("FAKE_GPU_WORKER"),
						     NULL) == 0, "daemon %d with a peer listener", n);
		}
		for (int r = 0; r < 2; r++)
			join_send(&k[r], &nd[r], job, r, nd[0].peer, 0);
		for (int r = 0; r < 2; r++)
			join_wait(&k[r], job);
		for (int r = 0; r < 2; r++)
			REQUIRE(reg_dev(&k[r], COMMPB__MEM_KIND__MEM_CUDA_IPC, 64, -1, 4096, &dev[r],
					NULL, 0) == COMM_OK, "register device memory on node %d", r);
		CHECK(logged("hello nodes 2 node 0") && logged("hello nodes 2 node 1"),
		      "the workers were not told the job spans 2 nodes");
		seq = 1;
		if (round) {
			for (int r = 0; r < 2; r++)
				post_allreduce(&k[r], seq, dev[r], 0, dev[r], 64, 0, NULL);
			both_done(k, COMM_ERR_ABORTED, "fake: ncclGetUniqueId failed",
				  "node 0's worker has no NCCL id");
			CHECK(gpu_line_has(&nd[0], job,
					   "across 2 nodes, no NCCL id: fake: ncclGetUniqueId failed"),
			      "status does not say that node 0 has no NCCL id");
			CHECK(!logged("world"), "a worker got WORLD without an id");
		} else {
			for (int r = 0; r < 2; r++)
				post_allreduce(&k[r], seq, dev[r], 0, dev[r], 64, 0, NULL);
			both_done(k, COMM_OK, NULL, "device all-reduce over two daemons");
			CHECK(logged("world 2 ranks 2 nodes node 0 id fake-nccl-id nodes of ranks 0 1") &&
				      logged("world 2 ranks 2 nodes node 1 id fake-nccl-id nodes of ranks 0 1"),
			      "WORLD with node 0's id did not reach both workers");
			CHECK(logged("op type 1 dtype 8 redop 0 root 0 count 16 n 1 world 2"),
			      "the op did not reach the workers as an op across nodes");
			CHECK(gpu_line_has(&nd[0], job, "across 2 nodes: NCCL rank 0 on " UUID) &&
				      gpu_line_has(&nd[1], job, "across 2 nodes: NCCL rank 1 on " UUID) &&
				      gpu_line_has(&nd[1], job, "worker pid "),
			      "status does not show each node's NCCL rank and device");
			CHECK(logged("rank 0 send 1+0 recv 1+64 event none 00 grank 0") &&
				      logged("rank 0 send 1+0 recv 1+64 event none 00 grank 1"),
			      "the ranks' granks did not reach the workers");
			/* host memory on node 1: refused on both, by the verdicts */
			host = reg_host(&k[1]);
			seq++;
			post_allreduce(&k[0], seq, dev[0], 0, dev[0], 64, 0, NULL);
			post_allreduce(&k[1], seq, host, 0, host, 64, 0, NULL);
			both_done(k, COMM_ERR_MISMATCH, "host memory", "device on one node, host on the other");
			/* two devices on node 0 */
			reg_uuid = UUID2;
			REQUIRE(reg_dev(&k[0], COMMPB__MEM_KIND__MEM_CUDA_IPC, 64, -1, 4096, &dev2, NULL,
					0) == COMM_OK, "register memory on a second device");
			reg_uuid = UUID;
			seq++;
			post_allreduce(&k[0], seq, dev[0], 0, dev2, 64, 0, NULL);
			post_allreduce(&k[1], seq, dev[1], 0, dev[1], 64, 0, NULL);
			both_done(k, COMM_ERR_UNSUPPORTED, "use one device", "two devices on one node");
			staged_p2p(k, &seq);
			staged_status(nd, job);
			staged_lru(k, &seq, nd, job);
			junk_root_allreduce(k, &seq);
			/* and the job goes on */
			seq++;
			for (int r = 0; r < 2; r++)
				post_allreduce(&k[r], seq, dev[r], 0, dev[r], 64, 0, NULL);
			both_done(k, COMM_OK, NULL, "a device all-reduce after the refusals");
		}
		printf("%s: device memory over two daemons%s\n", check_failures ? "FAIL" : "ok",
		       round ? ", node 0's worker without an NCCL id" : ": id, WORLD, granks, refusals, staged sends");
		for (int r = 0; r < 2; r++)
			close_rank(&k[r]);
		for (int n = 0; n < 2; n++)
			CHECK(th_daemon_stop(&nd[n]) == 0, "daemon %d did not stop cleanly", n);
	}
}

/*
 * Device collectives across daemons queue as on one node: the next one's
 * verdicts are swapped while the one ahead is on the worker, and it goes
 * to the worker before that one is answered. Both workers hold their
 * answers (queue mode) until 3 ops came: with 4 all-reduces posted back to
 * back, each must get the first 3 before answering any.
 */
static void test_queued_nodes(void)
{
	struct th_daemon nd[2];
	struct rank k[2];
	uint64_t dev[2], seq;
	char detail[256];

	unlink(logpath);
	setenv("FAKE_GPU_MODE", "queue", 1);
	for (int n = 0; n < 2; n++)
		REQUIRE(th_daemon_start_peer(&nd[n], "--gpu-worker", getenv("FAKE_GPU_WORKER"),
					     NULL) == 0, "daemon %d with a peer listener", n);
	setenv("FAKE_GPU_MODE", "ok", 1);
	for (int r = 0; r < 2; r++)
		join_send(&k[r], &nd[r], "dev-nodes-queue", r, nd[0].peer, 0);
	for (int r = 0; r < 2; r++)
		join_wait(&k[r], "dev-nodes-queue");
	for (int r = 0; r < 2; r++)
		REQUIRE(reg_dev(&k[r], COMMPB__MEM_KIND__MEM_CUDA_IPC, 64, -1, 4096, &dev[r], NULL,
				0) == COMM_OK, "register device memory on node %d", r);
	for (uint64_t i = 1; i <= 4; i++)
		for (int r = 0; r < 2; r++)
			post_allreduce(&k[r], i, dev[r], 64 * i, dev[r], 2048 + 64 * i, 0, NULL);
	for (uint64_t i = 1; i <= 4; i++) {
		for (int r = 0; r < 2; r++) {
			int rc = op_reply(&k[r], &seq, detail, sizeof detail);

			CHECK(rc == COMM_OK && seq == i, "rank %d, op %llu: answered op %llu with %d (%s)",
			      r, (unsigned long long)i, (unsigned long long)seq, rc, detail);
		}
	}
	CHECK(logged_times("answered 3 ops at once") == 2,
	      "%d of the 2 workers got 3 device ops across daemons before answering one",
	      logged_times("answered 3 ops at once"));
	printf("%s: device collectives across daemons queue on both workers, answered in order\n",
	       check_failures ? "FAIL" : "ok");
	for (int r = 0; r < 2; r++)
		close_rank(&k[r]);
	for (int n = 0; n < 2; n++)
		CHECK(th_daemon_stop(&nd[n]) == 0, "daemon %d did not stop cleanly", n);
}

/*
 * A worker that hangs in a send's copy into its staging buffer: the job
 * fails at its deadline, saying so, on both ranks; the hung worker is
 * killed and its daemon stops cleanly. One that crashes in it: the job
 * fails at once (ABORTED, the signal named) on both.
 */
static void test_staged_fault(const char *mode)
{
	int hang = !strcmp(mode, "hang");
	struct th_daemon nd[2];
	struct rank k[2];
	uint64_t mem[2];
	uint8_t *map[2];
	char detail[2][256];
	int st[2];

	unlink(logpath);
	for (int n = 0; n < 2; n++) {
		setenv("FAKE_GPU_MODE", n == 0 ? mode : "ok", 1);
		REQUIRE(th_daemon_start_peer(&nd[n], "--gpu-worker", getenv("FAKE_GPU_WORKER"),
					     NULL) == 0, "daemon %d with a peer listener", n);
	}
	for (int r = 0; r < 2; r++)
		join_send(&k[r], &nd[r], mode, r, nd[0].peer, hang ? 1500 : 60000);
	for (int r = 0; r < 2; r++)
		join_wait(&k[r], mode);
	for (int r = 0; r < 2; r++)
		mem[r] = reg_fake_dev(&k[r], 4096, &map[r]);
	post_p2p(&k[0], 1, 1, mem[0], 1, 16);
	usleep(700 * 1000); /* so that the receiver's own deadline comes later */
	post_p2p(&k[1], 1, 0, mem[1], 0, 16);
	for (int r = 0; r < 2; r++)
		st[r] = op_reply(&k[r], NULL, detail[r], sizeof detail[r]);
	if (hang)
		CHECK(st[0] == COMM_ERR_TIMEOUT &&
			      strstr(detail[0], "did not copy it into a staging buffer"),
		      "rank 0, its worker hung in the copy: %d (%s)", st[0], detail[0]);
	else
		CHECK(st[0] == COMM_ERR_ABORTED && strstr(detail[0], "signal 9"),
		      "rank 0, its worker crashed in the copy: %d (%s)", st[0], detail[0]);
	CHECK(st[1] != COMM_OK && st[1] != -1, "rank 1, the receiver: %d (%s)", st[1], detail[1]);
	printf("%s: a worker %s in a staging copy fails the job%s\n", check_failures ? "FAIL" : "ok",
	       hang ? "hung" : "crashed", hang ? " at its deadline" : "");
	for (int r = 0; r < 2; r++) {
		munmap(map[r], 4096);
		close_rank(&k[r]);
	}
	for (int n = 0; n < 2; n++)
		CHECK(th_daemon_stop(&nd[n]) == 0, "daemon %d did not stop cleanly", n);
	setenv("FAKE_GPU_MODE", "ok", 1);
}

int main(void)
{
	char dir[] = "/tmp/test-gpu-plumbing.XXXXXX";

	REQUIRE(getenv("FAKE_GPU_WORKER"), "FAKE_GPU_WORKER is not set");
	REQUIRE(mkdtemp(dir), "mkdtemp");
	snprintf(logpath, sizeof logpath, "%s/worker.log", dir);
	setenv("FAKE_GPU_LOG", logpath, 1);
	test_forwarding();
	test_ring_device();
	test_queued();
	test_local_send_event();
	test_bad_worker("crash");
	test_bad_worker("hang");
	test_shutdown_hung();
	test_signal_while_stopping();
	test_hung_open();
	test_last_rank_gone();
	test_device_not_charged();
	test_no_fds();
	test_rogue_worker();
	test_refusals();
	test_across_daemons();
	test_queued_nodes();
	test_staged_fault("hang");
	test_staged_fault("crash");
	test_this_machine();
	unlink(logpath);
	rmdir(dir);
	return CHECK_EXIT();
}
