/*
 * fake-gpu-worker.c: a stand-in for commd-gpu that speaks its protocol
 * (common/gpu-proto.h) without a GPU, so that test-gpu-plumbing can drive
 * commd's side of device memory on any machine: the registrations and ops
 * commd forwards, the answers it relays, and what it does when a worker
 * refuses, crashes or hangs. It moves no data and claims none: every
 * message it gets is written to $FAKE_GPU_LOG for the test to check.
 * The one exception is memory that comes with an fd it can map (a "VMM"
 * allocation the test made of a memfd, and commd's staging buffers): a
 * send op between two such is really copied, so that a test can check the
 * data of a device send across daemons end to end.
 *
 * A hello that says the job spans daemons and this is node 0 gets a fake
 * NCCL id (FAKE_NCCL_ID) after the reply, as commd-gpu sends its real one;
 * WORLD and every op's world and ranks' granks are logged.
 *
 * $FAKE_GPU_MODE: ok (default: answer everything with success), refuse
 * (the hello says no device), crash (SIGKILL itself on an op), hang (never
 * answer an op), hangopen (never answer a MEM_OPEN, as a driver stuck in
 * cudaIpcOpenMemHandle), noprobe (--probe says unavailable), broken (--probe says
 * a device fails, exit 5), queue (hold the
 * answers until 3 ops are held, or no message came for half a second, as
 * a worker holds ops queued on its stream; then answer them in order),
 * noid (node 0 of a job over daemons: NCCL_ID says there is no id),
 * rogue (break the protocol as the job's name says, then ignore EOF and
 * wait to be killed: rehello, a second hello reply; early, a MEM_OPENED
 * before the hello reply; unknown, a message of type 42; huge, a 64 KiB
 * packet; badstatus, a MEM_OPENED with status 9999; strayopen, a
 * MEM_OPENED for a mem never opened; strayid, an NCCL id nobody asked
 * for; strayop, an op's answer with the wrong id; extraop, an op answered
 * twice; deaf, serve but ignore EOF, as a worker stuck in the driver;
 * mute, answer a MEM_OPEN, then close its socket and live on).
 */
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include "comm.h"
#include "commd.pb-c.h"
#include "gpu-proto.h"

#define QUEUE_HOLD 3        /* queue mode: answers held until this many ops */
#define QUEUE_PAUSE_MS 500  /* or until nothing came for this long */
#define FAKE_NCCL_ID "fake-nccl-id"

#define MAX_MAPS 64

static const char *mode = "ok";
static struct map {
	uint64_t id;
	uint8_t *p;
	size_t size;
} maps[MAX_MAPS];
static FILE *wlog;
static uint64_t held[QUEUE_HOLD];
static int nheld;
static char rogue[GPU_JOB_NAME]; /* rogue mode: how (the job's name) */

static void say(struct gpu_hdr h, uint64_t id, int status, const char *detail)
{
	struct gpu_status st = { { 0, GPU_PROTO_VERSION }, id, status, 0, "" };

	st.h.type = h.type;
	snprintf(st.detail, sizeof st.detail, "%s", detail);
	if (send(GPU_WORKER_FD, &st, sizeof st, MSG_NOSIGNAL) != (ssize_t)sizeof st)
		exit(5);
}

static void answer(uint32_t type, uint64_t id, int refused)
{
	struct gpu_hdr h = { type, GPU_PROTO_VERSION };

	say(h, id, refused ? COMM_ERR_UNSUPPORTED : COMM_OK, refused ? "fake: no device" : "");
}

/* rogue mode: having broken the protocol, wait to be killed (EOF is not heeded). */
static _Noreturn void park(const char *what)
{
	fprintf(wlog, "rogue: %s\n", what);
	for (;;)
		pause();
}

/* rogue mode, at the hello: the ways to break the protocol that need no request. */
static void rogue_hello(void)
{
	static uint8_t huge[64 << 10];
	struct gpu_nccl_id id;

	if (!strcmp(rogue, "early")) {
		say((struct gpu_hdr){ GPU_MSG_MEM_OPENED, GPU_PROTO_VERSION }, 1, COMM_OK, "");
		park(rogue);
	}
	answer(GPU_MSG_HELLO_REPLY, 0, 0);
	if (!strcmp(rogue, "rehello")) {
		answer(GPU_MSG_HELLO_REPLY, 0, 0);
	} else if (!strcmp(rogue, "unknown")) {
		say((struct gpu_hdr){ 42, GPU_PROTO_VERSION }, 0, COMM_OK, "");
	} else if (!strcmp(rogue, "huge")) {
		memcpy(huge, &(struct gpu_hdr){ GPU_MSG_OP_DONE, GPU_PROTO_VERSION },
		       sizeof(struct gpu_hdr));
		if (send(GPU_WORKER_FD, huge, sizeof huge, MSG_NOSIGNAL) != (ssize_t)sizeof huge)
			exit(5);
	} else if (!strcmp(rogue, "strayid")) {
		memset(&id, 0, sizeof id);
		id.st.h = (struct gpu_hdr){ GPU_MSG_NCCL_ID, GPU_PROTO_VERSION };
		if (send(GPU_WORKER_FD, &id, sizeof id, MSG_NOSIGNAL) != (ssize_t)sizeof id)
			exit(5);
	} else {
		return; /* one that breaks it later */
	}
	park(rogue);
}

/* rogue mode: a MEM_OPEN (op 0) or an OP answered wrongly, or 0 when this one is not. */
static int rogue_answer(uint32_t type, uint64_t id)
{
	struct gpu_hdr h = { type, GPU_PROTO_VERSION };

	if (type == GPU_MSG_MEM_OPENED && !strcmp(rogue, "badstatus")) {
		say(h, id, 9999, "fake: no such code");
	} else if (type == GPU_MSG_MEM_OPENED && !strcmp(rogue, "strayopen")) {
		answer(type, id + 1000, 0);
	} else if (type == GPU_MSG_OP_DONE && !strcmp(rogue, "strayop")) {
		answer(type, id + 1, 0);
	} else if (type == GPU_MSG_OP_DONE && !strcmp(rogue, "extraop")) {
		answer(type, id, 0);
		answer(type, id, 0);
	} else if (type == GPU_MSG_MEM_OPENED && !strcmp(rogue, "mute")) {
		answer(type, id, 0);
		close(GPU_WORKER_FD);
	} else {
		return 0;
	}
	park(rogue);
}

/* Read one packet (and the fd it carries, or -1); its length, 0 at EOF. */
static ssize_t next(void *buf, size_t len, int *fd)
{
	union {
		char b[CMSG_SPACE(sizeof(int))];
		struct cmsghdr align;
	} u;
	struct iovec iov = { buf, len };
	struct msghdr mh = { 0 };
	struct cmsghdr *cm;
	ssize_t n;

	mh.msg_iov = &iov;
	mh.msg_iovlen = 1;
	mh.msg_control = u.b;
	mh.msg_controllen = sizeof u.b;
	do
		n = recvmsg(GPU_WORKER_FD, &mh, MSG_CMSG_CLOEXEC);
	while (n < 0 && errno == EINTR);
	*fd = -1;
	cm = CMSG_FIRSTHDR(&mh);
	if (n > 0 && cm && cm->cmsg_type == SCM_RIGHTS)
		memcpy(fd, CMSG_DATA(cm), sizeof(int));
	return n;
}

/* queue mode: answer the held ops, oldest first. */
static void release(const char *why)
{
	fprintf(wlog, "answered %d op%s %s\n", nheld, nheld == 1 ? "" : "s", why);
	for (int i = 0; i < nheld; i++)
		answer(GPU_MSG_OP_DONE, held[i], 0);
	nheld = 0;
}

/* Node 0 of a job over daemons: the id (noid mode: why there is none). */
static void send_id(void)
{
	struct gpu_nccl_id m;

	memset(&m, 0, sizeof m);
	m.st.h.type = GPU_MSG_NCCL_ID;
	m.st.h.version = GPU_PROTO_VERSION;
	if (!strcmp(mode, "noid")) {
		m.st.status = COMM_ERR_INTERNAL;
		snprintf(m.st.detail, sizeof m.st.detail, "fake: ncclGetUniqueId failed");
	} else {
		memcpy(m.nccl_id, FAKE_NCCL_ID, sizeof FAKE_NCCL_ID);
	}
	if (send(GPU_WORKER_FD, &m, sizeof m, MSG_NOSIGNAL) != (ssize_t)sizeof m)
		exit(5);
}

static void log_world(const struct gpu_world *w)
{
	fprintf(wlog, "world %u ranks %u nodes node %u id %.*s nodes of ranks", w->world,
		w->nnodes, w->node, (int)sizeof FAKE_NCCL_ID - 1, (const char *)w->nccl_id);
	for (uint32_t r = 0; r < w->world; r++)
		fprintf(wlog, " %u", w->node_of[r]);
	fprintf(wlog, "\n");
}

static void log_op(const struct gpu_op *op)
{
	fprintf(wlog, "op type %u dtype %u redop %u root %d count %llu n %u world %u\n", op->type,
		op->dtype, op->redop, op->root, (unsigned long long)op->count, op->n, op->world);
	for (uint32_t r = 0; r < op->n; r++) {
		const struct gpu_op_rank *k = &op->rank[r];

		fprintf(wlog, "rank %u send %llu+%llu recv %llu+%llu event %s%02x grank %u\n", r,
			(unsigned long long)k->send_mem, (unsigned long long)k->send_off,
			(unsigned long long)k->recv_mem, (unsigned long long)k->recv_off,
			k->has_event ? "" : "none ", k->ready_event[0], k->grank);
	}
	for (uint32_t i = 0; i < op->nflags; i++) {
		const struct gpu_flag *f = (const struct gpu_flag *)&op->rank[op->n] + i;

		fprintf(wlog, "flag %llu+%llu value %u\n", (unsigned long long)f->mem,
			(unsigned long long)f->off, f->value);
	}
}

static struct map *map_find(uint64_t id)
{
	for (int i = 0; i < MAX_MAPS; i++)
		if (maps[i].p && maps[i].id == id)
			return &maps[i];
	return NULL;
}

/* Map an open's fd when it can be (an eventfd cannot). */
static void map_add(const struct gpu_mem_open *mo, int fd)
{
	void *p;

	if (fd < 0 || mo->size == 0)
		return;
	p = mmap(NULL, mo->size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (p == MAP_FAILED)
		return;
	for (int i = 0; i < MAX_MAPS; i++) {
		if (!maps[i].p) {
			maps[i] = (struct map){ mo->id, p, mo->size };
			return;
		}
	}
	munmap(p, mo->size);
}

static void map_drop(uint64_t id)
{
	struct map *m = map_find(id);

	if (m) {
		munmap(m->p, m->size);
		m->p = NULL;
	}
}

/* A send between two mapped mems: copy it, as commd-gpu would on the device. */
static void copy_send(const struct gpu_op *op)
{
	const struct gpu_op_rank *k = &op->rank[0];
	struct map *a = map_find(k->send_mem), *b = map_find(k->recv_mem);

	/* n 2: the second entry carries the receiver's ready event only */
	if (op->type != COMMPB__OP_TYPE__OP_SEND || op->n > 2 || op->world || !a || !b)
		return;
	if (k->send_off > a->size || op->count > a->size - k->send_off ||
	    k->recv_off > b->size || op->count > b->size - k->recv_off) {
		fprintf(wlog, "copy out of bounds\n");
		exit(6);
	}
	memcpy(b->p + k->recv_off, a->p + k->send_off, op->count);
	fprintf(wlog, "copied %llu bytes from %llu to %llu\n", (unsigned long long)op->count,
		(unsigned long long)k->send_mem, (unsigned long long)k->recv_mem);
}

int main(int argc, char **argv)
{
	static union {
		struct gpu_hdr h;
		struct gpu_hello hello;
		struct gpu_world world;
		struct gpu_mem_open mo;
		struct gpu_mem_close mc;
		struct gpu_op op;
		uint8_t raw[GPU_MSG_MAX];
	} m;
	const char *path = getenv("FAKE_GPU_LOG");
	int refused, fd;
	ssize_t n;

	if (getenv("FAKE_GPU_MODE"))
		mode = getenv("FAKE_GPU_MODE");
	if (argc == 2 && !strcmp(argv[1], "--probe")) {
		if (!strcmp(mode, "noprobe")) {
			printf("unavailable: fake: no driver\n");
			return 1;
		}
		if (!strcmp(mode, "broken")) {
			printf("broken: device 1: cudaSetDevice: fake: uncorrectable ECC error "
			       "encountered; 2 devices: Fake GPU, unusable (...)\n");
			return 5;
		}
		printf("1 device(s): Fake GPU (cuda runtime 0, driver 0, nccl 9.9.9)\n");
		return 0;
	}
	wlog = fopen(path ? path : "/dev/null", "a");
	if (!wlog)
		return 4;
	setvbuf(wlog, NULL, _IOLBF, 0);
	/* commd starts a worker in a session of its own, out of reach of its terminal */
	fprintf(wlog, "session: %s\n", getsid(0) == getpid() ? "own" : "commd's");
	refused = !strcmp(mode, "refuse");
	for (;;) {
		struct pollfd pf = { GPU_WORKER_FD, POLLIN, 0 };

		if (nheld && poll(&pf, 1, QUEUE_PAUSE_MS) == 0)
			release("after a pause");
		if ((n = next(&m, sizeof m, &fd)) <= 0) {
			if (!strcmp(rogue, "deaf"))
				park("deaf at eof");
			break;
		}
		switch (m.h.type) {
		case GPU_MSG_HELLO:
			fprintf(wlog, "hello nodes %u node %u\n", m.hello.nnodes, m.hello.node);
			if (!strcmp(mode, "rogue")) {
				snprintf(rogue, sizeof rogue, "%.*s", (int)sizeof m.hello.job - 1,
					 m.hello.job);
				rogue_hello();
				break;
			}
			answer(GPU_MSG_HELLO_REPLY, 0, refused);
			if (!refused && m.hello.nnodes > 1 && m.hello.node == 0)
				send_id();
			break;
		case GPU_MSG_WORLD:
			log_world(&m.world);
			break;
		case GPU_MSG_MEM_OPEN:
			if (!strcmp(mode, "hangopen")) {
				fprintf(wlog, "hanging in open %llu\n", (unsigned long long)m.mo.id);
				for (;;)
					pause();
			}
			fprintf(wlog, "open %llu kind %u rank %d size %llu uuid %s fd %s\n",
				(unsigned long long)m.mo.id, m.mo.kind, m.mo.rank,
				(unsigned long long)m.mo.size, m.mo.uuid, fd >= 0 ? "yes" : "no");
			if (!refused)
				map_add(&m.mo, fd);
			if (!rogue_answer(GPU_MSG_MEM_OPENED, m.mo.id))
				answer(GPU_MSG_MEM_OPENED, m.mo.id, refused);
			break;
		case GPU_MSG_MEM_CLOSE:
			fprintf(wlog, "close %llu\n", (unsigned long long)m.mc.id);
			map_drop(m.mc.id);
			break;
		case GPU_MSG_OP:
			log_op(&m.op);
			if (!strcmp(mode, "crash"))
				raise(SIGKILL);
			if (!strcmp(mode, "hang"))
				for (;;)
					pause();
			if (!refused)
				copy_send(&m.op);
			if (!strcmp(mode, "queue")) {
				held[nheld++] = m.op.id;
				if (nheld == QUEUE_HOLD)
					release("at once");
				break;
			}
			if (!rogue_answer(GPU_MSG_OP_DONE, m.op.id))
				answer(GPU_MSG_OP_DONE, m.op.id, refused);
			break;
		default:
			fprintf(wlog, "unknown %u\n", m.h.type);
			return 3;
		}
		if (fd >= 0)
			close(fd);
	}
	fprintf(wlog, "eof\n");
	return 0;
}
