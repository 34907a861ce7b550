/*
 * make-corpus.c: writes fuzz-conn's seed corpus (tests/fuzz/corpus): real
 * Envelopes packed with protobuf-c into the records of fuzz-input.h, one
 * file per scenario. `make fuzz-corpus` remakes the checked-in files.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "comm.h"
#include "frame.h"
#include "fuzz-input.h"
#include "ring.h"

#define T(x) COMMPB__OP_TYPE__OP_##x
#define EVENTFD_ONE (FZ_EVENTFD | 1u << FZ_NFDS_SHIFT)
#define MEMFD_ONE (1u << FZ_NFDS_SHIFT)

static uint8_t buf[1 << 20];
static size_t blen;
static const char *outdir;
static uint64_t next_id = 1;

/* One record: the control byte, the length, the bytes. */
static void rec(unsigned ctl, const void *data, size_t len)
{
	if (len > 0xffff || blen + FZ_REC_HDR + len > sizeof buf) {
		fprintf(stderr, "make-corpus: record of %zu bytes does not fit\n", len);
		exit(1);
	}
	buf[blen++] = (uint8_t)ctl;
	buf[blen++] = (uint8_t)len;
	buf[blen++] = (uint8_t)(len >> 8);
	memcpy(buf + blen, data, len);
	blen += len;
}

/* env as one frame in one record. */
static void msg(unsigned ctl, Commpb__Envelope *env)
{
	uint8_t *frame;
	size_t n;

	env->id = next_id++;
	n = frame_pack(env, &frame);
	if (!n) {
		fprintf(stderr, "make-corpus: frame_pack failed\n");
		exit(1);
	}
	rec(ctl, frame, n);
	free(frame);
}

static void save(const char *name)
{
	char path[4096];
	FILE *f;

	snprintf(path, sizeof path, "%s/%s", outdir, name);
	f = fopen(path, "wb");
	if (!f || fwrite(buf, 1, blen, f) != blen || fclose(f) != 0) {
		fprintf(stderr, "make-corpus: %s: %s\n", path, strerror(errno));
		exit(1);
	}
	blen = 0;
	next_id = 1;
}

static void hello_full(unsigned ctl, Commpb__Role role, const char *job, int rank, int world,
		       unsigned vmin, unsigned vmax, const char *root)
{
	Commpb__Envelope env = COMMPB__ENVELOPE__INIT;
	Commpb__Hello h = COMMPB__HELLO__INIT;

	h.version_min = vmin;
	h.version_max = vmax;
	h.role = role;
	h.job = (char *)job;
	h.token.data = (uint8_t *)"token";
	h.token.len = 5;
	h.rank = rank;
	h.world_size = world;
	h.root = (char *)root;
	env.body_case = COMMPB__ENVELOPE__BODY_HELLO;
	env.hello = &h;
	msg(ctl, &env);
}

static void hello(unsigned ctl, int rank, int world)
{
	hello_full(ctl, COMMPB__ROLE__ROLE_RANK, "fz", rank, world, PROTO_VERSION_MIN, PROTO_VERSION,
		   "");
}

static void admin(unsigned ctl)
{
	hello_full(ctl, COMMPB__ROLE__ROLE_ADMIN, "", 0, 0, PROTO_VERSION_MIN, PROTO_VERSION, "");
}

/* RegisterMem of kind with one memfd attached (none for CUDA IPC). */
static void reg_kind(unsigned ctl, Commpb__MemKind kind, uint64_t size)
{
	static uint8_t handle[64];
	Commpb__Envelope env = COMMPB__ENVELOPE__INIT;
	Commpb__RegisterMem r = COMMPB__REGISTER_MEM__INIT;

	r.kind = kind;
	r.size = size;
	if (kind != COMMPB__MEM_KIND__MEM_MEMFD) {
		r.gpu_uuid = "GPU-00000000-0000-0000-0000-000000000000";
		if (kind == COMMPB__MEM_KIND__MEM_CUDA_IPC) {
			r.cuda_handle.data = handle;
			r.cuda_handle.len = sizeof handle;
		}
	}
	env.body_case = COMMPB__ENVELOPE__BODY_REGISTER_MEM;
	env.register_mem = &r;
	msg(kind == COMMPB__MEM_KIND__MEM_CUDA_IPC ? ctl : ctl | MEMFD_ONE, &env);
}

static void reg(unsigned ctl)
{
	reg_kind(ctl, COMMPB__MEM_KIND__MEM_MEMFD, FZ_MEMFD_SIZE);
}

static void free_mem(unsigned ctl, uint64_t id)
{
	Commpb__Envelope env = COMMPB__ENVELOPE__INIT;
	Commpb__FreeMem fm = COMMPB__FREE_MEM__INIT;

	fm.mem_id = id;
	env.body_case = COMMPB__ENVELOPE__BODY_FREE_MEM;
	env.free_mem = &fm;
	msg(ctl, &env);
}

struct opspec {
	uint64_t seq;
	Commpb__OpType type;
	uint64_t send_off, recv_off, count;
	uint32_t dtype, redop;
	int32_t root, peer;
	uint64_t group;
	int last;
};

/* An op on the client's mem 1 (float32 sum unless said otherwise). */
static void op(unsigned ctl, struct opspec s)
{
	Commpb__Envelope env = COMMPB__ENVELOPE__INIT;
	Commpb__Op o = COMMPB__OP__INIT;
	Commpb__BufRef send = COMMPB__BUF_REF__INIT, recv = COMMPB__BUF_REF__INIT;

	send.mem_id = recv.mem_id = 1;
	send.offset = s.send_off;
	recv.offset = s.recv_off;
	o.seq = s.seq;
	o.type = s.type;
	o.send = &send;
	o.recv = &recv;
	o.count = s.count;
	o.dtype = s.dtype ? s.dtype : COMM_FLOAT32;
	o.redop = s.redop;
	o.root = s.root;
	o.peer = s.peer;
	o.group = s.group;
	o.group_last = s.last;
	env.body_case = COMMPB__ENVELOPE__BODY_OP;
	env.op = &o;
	msg(ctl, &env);
}

static void leave(unsigned ctl)
{
	Commpb__Envelope env = COMMPB__ENVELOPE__INIT;
	Commpb__Leave l = COMMPB__LEAVE__INIT;

	env.body_case = COMMPB__ENVELOPE__BODY_LEAVE;
	env.leave = &l;
	msg(ctl, &env);
}

static void abort_job(unsigned ctl, const char *reason)
{
	Commpb__Envelope env = COMMPB__ENVELOPE__INIT;
	Commpb__Abort a = COMMPB__ABORT__INIT;

	a.reason = (char *)reason;
	env.body_case = COMMPB__ENVELOPE__BODY_ABORT;
	env.abort = &a;
	msg(ctl, &env);
}

static void status(unsigned ctl, const char *job)
{
	Commpb__Envelope env = COMMPB__ENVELOPE__INIT;
	Commpb__StatusRequest s = COMMPB__STATUS_REQUEST__INIT;

	s.job = (char *)job;
	env.body_case = COMMPB__ENVELOPE__BODY_STATUS_REQUEST;
	env.status_request = &s;
	msg(ctl, &env);
}

/* commctl abort JOB [--reason R] [--uid U] (uid < 0: none) */
static void job_abort(unsigned ctl, const char *job, const char *reason, long uid)
{
	Commpb__Envelope env = COMMPB__ENVELOPE__INIT;
	Commpb__JobAbort a = COMMPB__JOB_ABORT__INIT;

	a.job = (char *)job;
	a.reason = (char *)reason;
	a.by_uid = uid >= 0;
	a.uid = uid >= 0 ? (uint32_t)uid : 0;
	env.body_case = COMMPB__ENVELOPE__BODY_JOB_ABORT;
	env.job_abort = &a;
	msg(ctl, &env);
}

static void topo(unsigned ctl)
{
	Commpb__Envelope env = COMMPB__ENVELOPE__INIT;
	Commpb__TopoRequest t = COMMPB__TOPO_REQUEST__INIT;

	env.body_case = COMMPB__ENVELOPE__BODY_TOPO_REQUEST;
	env.topo_request = &t;
	msg(ctl, &env);
}

/* RingAttach of a ring at offset 0 of mem 1, with an eventfd attached. */
static void ring_attach(unsigned ctl)
{
	Commpb__Envelope env = COMMPB__ENVELOPE__INIT;
	Commpb__RingAttach ra = COMMPB__RING_ATTACH__INIT;
	Commpb__BufRef ref = COMMPB__BUF_REF__INIT;

	ref.mem_id = 1;
	ra.ring = &ref;
	ra.slots = RING_SLOTS;
	ra.slot_size = sizeof(struct ring_slot);
	env.body_case = COMMPB__ENVELOPE__BODY_RING_ATTACH;
	env.ring_attach = &ra;
	msg(ctl | EVENTFD_ONE, &env);
}

/* The rank posts op seq in its ring's slot (the ring at offset 0 of its first memfd). */
static void ring_post(unsigned client, uint64_t seq, uint64_t send_off, uint64_t recv_off,
		      uint64_t count)
{
	uint8_t poke[4 + sizeof(struct ring_slot)];
	struct ring_slot s;
	uint32_t off = (uint32_t)(sizeof(struct ring_hdr) + (seq % RING_SLOTS) * sizeof s);

	memset(&s, 0, sizeof s);
	s.posted = seq + 1;
	s.seq = seq;
	s.count = count;
	s.send_mem = s.recv_mem = 1;
	s.send_off = send_off;
	s.recv_off = recv_off;
	s.type = T(ALLREDUCE);
	s.dtype = COMM_FLOAT32;
	poke[0] = (uint8_t)off;
	poke[1] = (uint8_t)(off >> 8);
	poke[2] = (uint8_t)(off >> 16);
	poke[3] = (uint8_t)(off >> 24);
	memcpy(poke + 4, &s, sizeof s);
	rec(client | FZ_EVENTFD, poke, sizeof poke);
}

/* The daemon's clock jumps a day: every deadline passes. */
static void tick_day(void)
{
	rec(FZ_EVENTFD, NULL, 0);
}

int main(int argc, char **argv)
{
	const uint64_t K = 1024;
	uint8_t *frame;
	size_t n;

	if (argc != 2) {
		fprintf(stderr, "usage: make-corpus DIR\n");
		return 2;
	}
	outdir = argv[1];

	/* commctl: status and topo */
	admin(0);
	status(0, "");
	topo(0);
	save("admin-status-topo");

	/* a job of one rank: register, all-reduce in place and not, free, leave */
	hello(0, 0, 1);
	reg(0);
	op(0, (struct opspec){ .seq = 1, .type = T(ALLREDUCE), .send_off = 0, .recv_off = 0,
			       .count = 1024 });
	op(0, (struct opspec){ .seq = 2, .type = T(ALLREDUCE), .send_off = 0, .recv_off = 8 * K,
			       .count = 256, .dtype = COMM_INT32, .redop = 1 });
	free_mem(0, 1);
	leave(0);
	save("rank1-allreduce");

	/* two ranks: a large all-reduce (on the worker threads), then leave */
	hello(0, 0, 2);
	hello(1, 1, 2);
	reg(0);
	reg(1);
	op(0, (struct opspec){ .seq = 1, .type = T(ALLREDUCE), .recv_off = 64 * K, .count = 16 * K });
	op(1, (struct opspec){ .seq = 1, .type = T(ALLREDUCE), .recv_off = 64 * K, .count = 16 * K });
	leave(0);
	leave(1);
	save("rank2-allreduce-large");

	/* two ranks: every other collective */
	hello(0, 0, 2);
	hello(1, 1, 2);
	reg(0);
	reg(1);
	for (unsigned c = 0; c < 2; c++) {
		op(c, (struct opspec){ .seq = 1, .type = T(REDUCE_SCATTER), .recv_off = 8 * K,
				       .count = 256 });
		op(c, (struct opspec){ .seq = 2, .type = T(ALLGATHER), .recv_off = 8 * K,
				       .count = 256 });
		op(c, (struct opspec){ .seq = 3, .type = T(BROADCAST), .recv_off = 8 * K,
				       .count = 256, .root = 1 });
		op(c, (struct opspec){ .seq = 4, .type = T(REDUCE), .recv_off = 8 * K, .count = 256,
				       .redop = 2 });
		op(c, (struct opspec){ .seq = 5, .type = T(ALLTOALL), .recv_off = 8 * K,
				       .count = 128 });
		op(c, (struct opspec){ .seq = 6, .type = T(BARRIER) });
	}
	save("rank2-collectives");

	/* two ranks: send/recv, then a group of two, held so both arrive together */
	hello(0, 0, 2);
	hello(1, 1, 2);
	reg(0);
	reg(1);
	op(0, (struct opspec){ .seq = 1, .type = T(SEND), .count = 512, .peer = 1 });
	op(1, (struct opspec){ .seq = 1, .type = T(RECV), .recv_off = 4 * K, .count = 512,
			       .peer = 0 });
	op(FZ_HOLD | 0, (struct opspec){ .seq = 2, .type = T(SEND), .count = 64, .peer = 1,
					 .group = 2 });
	op(FZ_HOLD | 0, (struct opspec){ .seq = 3, .type = T(RECV), .recv_off = 4 * K, .count = 64,
					 .peer = 1, .group = 2, .last = 1 });
	op(FZ_HOLD | 1, (struct opspec){ .seq = 2, .type = T(RECV), .recv_off = 4 * K, .count = 64,
					 .peer = 0, .group = 2 });
	op(1, (struct opspec){ .seq = 3, .type = T(SEND), .count = 64, .peer = 0, .group = 2,
			       .last = 1 });
	save("rank2-sendrecv-group");

	/* rank 0 leaves cleanly; rank 1's collective then fails; an admin asks */
	hello(0, 0, 2);
	hello(1, 1, 2);
	reg(1);
	leave(0);
	op(1, (struct opspec){ .seq = 1, .type = T(ALLREDUCE), .count = 16 });
	admin(2);
	status(2, "fz");
	save("rank2-leave");

	/* a rank aborts its job while another waits in an all-reduce */
	hello(0, 0, 2);
	hello(1, 1, 2);
	reg(1);
	op(1, (struct opspec){ .seq = 1, .type = T(ALLREDUCE), .count = 16 });
	admin(2);
	status(2, "");
	abort_job(0, "fuzz");
	save("rank2-abort");

	/* commctl abort: another uid's, the job while rank 1 waits, again, unknown */
	hello(0, 0, 2);
	hello(1, 1, 2);
	reg(1);
	op(1, (struct opspec){ .seq = 1, .type = T(ALLREDUCE), .count = 16 });
	admin(2);
	job_abort(2, "fz", "", 1000);
	job_abort(2, "fz", "fuzz\tstop", -1);
	op(0, (struct opspec){ .seq = 1, .type = T(ALLREDUCE), .count = 16 });
	job_abort(2, "fz", "again", 0);
	job_abort(2, "none", "", -1);
	save("admin-abort-job");

	/* the submission ring: attach, post one op in a slot, one over the socket */
	hello(0, 0, 1);
	reg(0);
	ring_attach(0);
	ring_post(0, 1, 192 * K, 200 * K, 256);
	op(0, (struct opspec){ .seq = 2, .type = T(ALLREDUCE), .send_off = 192 * K,
			       .recv_off = 200 * K, .count = 256 });
	save("rank1-ring");

	/* device memory with no GPU: an IPC handle, and VMM with its fd */
	hello(0, 0, 1);
	reg_kind(0, COMMPB__MEM_KIND__MEM_CUDA_IPC, 1 << 20);
	reg_kind(0, COMMPB__MEM_KIND__MEM_CUDA_VMM, 1 << 20);
	save("rank1-cuda-mem");

	/* deadlines: a job that never forms, an op its peer never posts */
	hello(0, 0, 2);
	tick_day();
	save("deadline-forming");
	hello(0, 0, 2);
	hello(1, 1, 2);
	reg(0);
	op(0, (struct opspec){ .seq = 1, .type = T(ALLREDUCE), .count = 16 });
	tick_day();
	save("deadline-op");

	/* a rank hangs up before the job forms and joins again on a new connection */
	hello(FZ_CLOSE | 0, 0, 2);
	hello(0, 0, 2);
	hello(1, 1, 2);
	save("rank2-rejoin");

	/* refusals at hello: a version from the future, a root daemon elsewhere, a bad root */
	hello_full(0, COMMPB__ROLE__ROLE_RANK, "fz", 0, 1, 9, 9, "");
	hello_full(1, COMMPB__ROLE__ROLE_RANK, "fz", 0, 2, 1, 3, "127.0.0.1:29600");
	hello_full(2, COMMPB__ROLE__ROLE_RANK, "fz", 0, 2, 1, 3, "no-port");
	save("hello-refused");

	/* frames cut in pieces: a hello in three writes, the next frame torn off */
	n = 0;
	{
		Commpb__Envelope env = COMMPB__ENVELOPE__INIT;
		Commpb__Hello h = COMMPB__HELLO__INIT;

		h.version_min = PROTO_VERSION_MIN;
		h.version_max = PROTO_VERSION;
		h.role = COMMPB__ROLE__ROLE_ADMIN;
		env.id = 1;
		env.body_case = COMMPB__ENVELOPE__BODY_HELLO;
		env.hello = &h;
		n = frame_pack(&env, &frame);
	}
	if (!n)
		return 1;
	rec(FZ_HOLD, frame, 2);
	rec(FZ_HOLD, frame + 2, 3);
	rec(0, frame + 5, n - 5);
	rec(0, frame, n - 1);
	save("split-truncated");
	free(frame);

	/* a length prefix over FRAME_MAX */
	{
		static const uint8_t big[] = { 0x00, 0x00, 0x10, 0x00, 0x0a, 0x00 };

		rec(0, big, sizeof big);
		save("oversized");
	}

	/* five fds with one frame: more than a message may carry */
	admin(0);
	rec(FZ_EVENTFD | 5u << FZ_NFDS_SHIFT, "\x03\x00\x00\x00\xba\x01\x00", 7);
	save("too-many-fds");
	return 0;
}
