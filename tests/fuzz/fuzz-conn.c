/*
 * fuzz-conn.c: libFuzzer over commd's frame reader, dispatcher and handlers:
 * an input plays up to four clients on socketpairs (fuzz-input.h); once they
 * hang up, commd must hold no connection, job or fd more than before.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include "commd.h"
#include "fuzz-input.h"
#include "log.h"
#include "util.h"

#ifndef FUZZ_TOPO
#define FUZZ_TOPO "tests/fixtures/nvlink-pair.topo"
#endif

#define OWN_FDS_MAX 32    /* memfds and eventfds one input may send in all */
#define SEND_TRIES 1000   /* a full socket: run the daemon and try again, this often */
#define SETTLE_MAX 256    /* loop turns for the daemon to go idle after a record */
#define DRAIN_MAX 100000  /* loop turns for everything to go once the clients hung up */

struct client {
	int fd;                 /* our end; -1: not connected */
	int efd;                /* the last eventfd it sent; -1: none */
	struct frame_reader rd; /* the daemon's replies */
};

/* An fd the input sent: kept (and a memfd mapped) for pokes until the input ends. */
struct own_fd {
	int fd;
	int client;
	uint8_t *addr;          /* a memfd's mapping; NULL for an eventfd */
};

static struct client cl[FZ_CLIENTS];
static struct own_fd own[OWN_FDS_MAX];
static int nown;

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int __real_peer_job_new(struct job *j, const char *root, char *err, size_t errlen);
int __wrap_peer_job_new(struct job *j, const char *root, char *err, size_t errlen);

static void die(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static void die(const char *fmt, ...)
{
	va_list ap;

	fprintf(stderr, "fuzz-conn: ");
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fprintf(stderr, "\n");
	abort();
}

/*
 * Hello.root makes commd connect to another daemon over TCP, which has no
 * place here: such a join fails as one to an unreachable root does. A root
 * with no port fails in peer.c before any connection, so that path stays real.
 */
int __wrap_peer_job_new(struct job *j, const char *root, char *err, size_t errlen)
{
	if (!strchr(root, ':'))
		return __real_peer_job_new(j, root, err, errlen);
	snprintf(err, errlen, "join: root daemon %.200s: out of the fuzz harness's reach", root);
	return -1;
}

static int count_fds(void)
{
	DIR *d = opendir("/proc/self/fd");
	struct dirent *e;
	int n = 0;

	if (!d)
		die("/proc/self/fd: %s", strerror(errno));
	while ((e = readdir(d)))
		n += e->d_name[0] != '.';
	closedir(d);
	return n;
}

static void dump_fds(void)
{
	DIR *d = opendir("/proc/self/fd");
	struct dirent *e;

	if (!d)
		return;
	while ((e = readdir(d))) {
		char path[300], target[256];
		ssize_t n;

		if (e->d_name[0] == '.')
			continue;
		snprintf(path, sizeof path, "/proc/self/fd/%s", e->d_name);
		n = readlink(path, target, sizeof target - 1);
		target[n < 0 ? 0 : n] = '\0';
		fprintf(stderr, "  fd %s -> %s\n", e->d_name, target);
	}
	closedir(d);
}

/* What the daemon sends is well formed: whole frames of reply types, no fds. */
static void check_replies(struct client *c)
{
	const uint8_t *payload;
	size_t len;
	enum frame_status st;

	while ((st = frame_next(&c->rd, &payload, &len)) == FRAME_OK) {
		Commpb__Envelope *env = commpb__envelope__unpack(NULL, len, payload);

		if (!env)
			die("the daemon sent a frame that does not unpack (%zu bytes)", len);
		switch (env->body_case) {
		case COMMPB__ENVELOPE__BODY_HELLO_REPLY:
		case COMMPB__ENVELOPE__BODY_REGISTER_MEM_REPLY:
		case COMMPB__ENVELOPE__BODY_FREE_MEM_REPLY:
		case COMMPB__ENVELOPE__BODY_OP_DONE:
		case COMMPB__ENVELOPE__BODY_ERROR:
		case COMMPB__ENVELOPE__BODY_STATUS_REPLY:
		case COMMPB__ENVELOPE__BODY_TOPO_REPLY:
		case COMMPB__ENVELOPE__BODY_RING_ATTACH_REPLY:
		case COMMPB__ENVELOPE__BODY_JOB_ABORT_REPLY:
			break;
		default:
			die("the daemon sent a message of type %d, not a reply", (int)env->body_case);
		}
		commpb__envelope__free_unpacked(env, NULL);
		frame_consume(&c->rd, len);
	}
	if (st == FRAME_TOO_BIG)
		die("the daemon sent a frame over %d bytes", FRAME_MAX);
	if (c->rd.nfds)
		die("the daemon sent %d fds", c->rd.nfds);
}

static void read_replies(void)
{
	for (int i = 0; i < FZ_CLIENTS; i++) {
		if (cl[i].fd < 0)
			continue;
		while (frame_reader_recv(&cl[i].rd, cl[i].fd) > 0)
			check_replies(&cl[i]);
	}
}

/* 2: a task is out on the workers; 1: a connection has work to do; 0: idle. */
static int busy(void)
{
	struct conn *c;
	struct job *j;

	TAILQ_FOREACH(j, &srv.jobs, link)
		if (j->tasks_out)
			return 2;
	TAILQ_FOREACH(c, &srv.conns, link) {
		struct pollfd p = { .fd = c->fd, .events = POLLIN };

		if (c->doomed || c->wq_bytes || poll(&p, 1, 0) > 0)
			return 1;
	}
	return 0;
}

/* Run the daemon until it has taken in what was sent and finished what it started. */
static void settle(void)
{
	for (int turn = 0; turn < SETTLE_MAX; turn++) {
		int b = busy();

		if (!b && turn >= 2)
			return;
		/* a task on the workers: sleep until it is done (the async wakes the loop) */
		uv_run(srv.loop, b == 2 ? UV_RUN_ONCE : UV_RUN_NOWAIT);
		read_replies();
	}
}

static void client_open(struct client *c)
{
	int sv[2];

	if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv) < 0)
		die("socketpair: %s", strerror(errno));
	c->fd = sv[0];
	c->efd = -1;
	frame_reader_init(&c->rd);
	/* as server.c's on_accept does */
	if (conn_open(sv[1]) < 0)
		close(sv[1]);
}

static void client_close(struct client *c)
{
	if (c->fd < 0)
		return;
	close(c->fd);
	frame_reader_free(&c->rd);
	c->fd = -1;
	c->efd = -1;
}

/* A sealed memfd (as libcomm makes them) or an eventfd, kept for pokes; -1 past the cap. */
static int own_fd_new(int client, int eventfd_kind)
{
	struct own_fd *o = &own[nown];
	int fd;

	if (nown == OWN_FDS_MAX)
		return -1;
	if (eventfd_kind) {
		fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
		if (fd < 0)
			die("eventfd: %s", strerror(errno));
		cl[client].efd = fd;
		*o = (struct own_fd){ fd, client, NULL };
	} else {
		void *addr;

		fd = memfd_create("fuzz-conn", MFD_CLOEXEC | MFD_ALLOW_SEALING);
		if (fd < 0 || ftruncate(fd, FZ_MEMFD_SIZE) < 0 ||
		    fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW) < 0)
			die("memfd: %s", strerror(errno));
		addr = mmap(NULL, FZ_MEMFD_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
		if (addr == MAP_FAILED)
			die("mmap: %s", strerror(errno));
		*o = (struct own_fd){ fd, client, addr };
	}
	nown++;
	return fd;
}

static void own_fds_free(void)
{
	for (int i = 0; i < nown; i++) {
		if (own[i].addr)
			munmap(own[i].addr, FZ_MEMFD_SIZE);
		close(own[i].fd);
	}
	nown = 0;
}

/* Write len bytes (fds with the first), running the daemon while the socket is full. */
static void send_bytes(struct client *c, const uint8_t *data, size_t len, const int *fds, int nfds)
{
	union {
		struct cmsghdr align;
		char buf[CMSG_SPACE(7 * sizeof(int))];
	} ctl;
	size_t off = 0;

	for (int tries = 0; off < len && c->fd >= 0 && tries < SEND_TRIES; tries++) {
		struct msghdr msg = { 0 };
		struct iovec iov = { (void *)(data + off), len - off };
		ssize_t n;

		msg.msg_iov = &iov;
		msg.msg_iovlen = 1;
		if (off == 0 && nfds > 0) {
			struct cmsghdr *h;

			memset(&ctl, 0, sizeof ctl);
			msg.msg_control = ctl.buf;
			msg.msg_controllen = CMSG_SPACE((size_t)nfds * sizeof(int));
			h = CMSG_FIRSTHDR(&msg);
			h->cmsg_level = SOL_SOCKET;
			h->cmsg_type = SCM_RIGHTS;
			h->cmsg_len = CMSG_LEN((size_t)nfds * sizeof(int));
			memcpy(CMSG_DATA(h), fds, (size_t)nfds * sizeof(int));
		}
		n = sendmsg(c->fd, &msg, MSG_NOSIGNAL);
		if (n > 0)
			off += (size_t)n;
		else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
			settle();
		else if (n < 0 && errno != EINTR)
			return; /* the daemon closed its end */
	}
}

/* The deadline checks of the daemon's tick, as if time had moved on. */
static void tick(const uint8_t *d, size_t len)
{
	uint64_t ms = len ? 0 : TIMEOUT_MAX_MS + 1ull, now;

	for (size_t i = len; i-- > 0;)
		ms = ms << 8 | d[i];
	now = now_ms() + ms * (len ? 10 : 1);
	job_check_deadlines(now);
	conn_check_deadlines(now);
}

/* The rank writes its shared memory (a ring slot, say), then wakes the daemon. */
static void poke(int client, const uint8_t *d, size_t len)
{
	uint32_t v = (uint32_t)d[0] | (uint32_t)d[1] << 8 | (uint32_t)d[2] << 16 |
		     (uint32_t)d[3] << 24;
	struct own_fd *mine[OWN_FDS_MAX], *o;
	size_t off = FZ_POKE_OFF(v), n = len - 4;
	int k = 0;

	for (int i = 0; i < nown; i++)
		if (own[i].client == client && own[i].addr)
			mine[k++] = &own[i];
	if (!k)
		return;
	o = mine[FZ_POKE_FD(v) % (uint32_t)k];
	if (n > FZ_MEMFD_SIZE - off)
		n = FZ_MEMFD_SIZE - off;
	memcpy(o->addr + off, d + 4, n);
	if (cl[client].efd >= 0) {
		uint64_t one = 1;
		ssize_t w = write(cl[client].efd, &one, sizeof one);

		(void)w; /* a full counter wakes the daemon all the same */
	}
}

static void record(unsigned ctl, const uint8_t *body, size_t len)
{
	int ci = (int)FZ_CLIENT(ctl), want = (int)FZ_NFDS(ctl), fds[7], nfds = 0;
	struct client *c = &cl[ci];

	if (!want && (ctl & FZ_EVENTFD)) {
		if (len >= 4)
			poke(ci, body, len);
		else
			tick(body, len);
	} else {
		if (c->fd < 0)
			client_open(c);
		/* fds ride with bytes: none are sent with an empty record */
		for (int i = 0; len && i < want; i++) {
			int fd = own_fd_new(ci, i == 0 && (ctl & FZ_EVENTFD));

			if (fd >= 0)
				fds[nfds++] = fd;
		}
		send_bytes(c, body, len, fds, nfds);
	}
	if (ctl & FZ_CLOSE)
		client_close(c);
	if (!(ctl & FZ_HOLD))
		settle();
}

static void die_state(const char *when)
{
	struct conn *c;
	struct job *j;

	fprintf(stderr, "fuzz-conn: %s, the daemon still holds:\n", when);
	TAILQ_FOREACH(c, &srv.conns, link)
		fprintf(stderr, "  conn %llu: fd %d, hello %d, job %s rank %d, mems %d, closing %d, "
			"doomed %s, %zu bytes queued\n", (unsigned long long)c->id, c->fd,
			c->hello_done, c->job ? c->job->name : "-", c->rank, c->nmems, c->closing,
			c->doomed ? c->doomed : "no", c->wq_bytes);
	TAILQ_FOREACH(j, &srv.jobs, link)
		fprintf(stderr, "  job %s: %s, world %d, joined %d, attached %d, tasks out %d, "
			"%llu bytes of memory\n", j->name, job_state_name(j->state), j->world,
			j->joined, j->attached, j->tasks_out, (unsigned long long)j->mem_bytes);
	die("state left behind");
}

/* Every client hangs up; the daemon must then let go of everything. */
static void finish(void)
{
	struct job *j;

	for (int i = 0; i < FZ_CLIENTS; i++)
		client_close(&cl[i]);
	for (int turn = 0; turn < DRAIN_MAX; turn++) {
		int out = 0;

		if (TAILQ_EMPTY(&srv.conns) && TAILQ_EMPTY(&srv.jobs))
			break;
		TAILQ_FOREACH(j, &srv.jobs, link)
			out += j->tasks_out;
		uv_run(srv.loop, out ? UV_RUN_ONCE : UV_RUN_NOWAIT);
	}
	if (!TAILQ_EMPTY(&srv.conns) || !TAILQ_EMPTY(&srv.jobs))
		die_state("every client hung up");
	/* the close callbacks (a ring's eventfd is closed in one) */
	uv_run(srv.loop, UV_RUN_NOWAIT);
	uv_run(srv.loop, UV_RUN_NOWAIT);
	if (srv.nconns)
		die("no connection is left, but srv.nconns is %llu", (unsigned long long)srv.nconns);
	own_fds_free();
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
	static struct config cfg;
	const char *topo = getenv("COMMD_FUZZ_TOPO"), *level = getenv("COMMD_FUZZ_LOG");
	char err[512];

	signal(SIGPIPE, SIG_IGN);
	config_init(&cfg);
	/* quiet unless asked (COMMD_FUZZ_LOG=debug to follow a reproducer) */
	log_set_level(level && log_parse_level(level) >= 0 ? (enum log_level)log_parse_level(level)
							   : LVL_ERROR);
	if (topo_load(&node_topo, topo ? topo : FUZZ_TOPO, err, sizeof err) < 0) {
		fprintf(stderr, "fuzz-conn: %s: going on without GPUs or NICs\n", err);
		memset(&node_topo, 0, sizeof node_topo);
	}
	/* as main.c sets the server up, with no listener, GPU or peers */
	srv.loop = uv_default_loop();
	srv.socket_path = "fuzz-conn";
	srv.default_timeout_ms = cfg.timeout_ms;
	srv.drain_ms = cfg.drain_ms;
	srv.lim = cfg.lim;
	/* small enough that inputs reach them: a fifth connection, a fifth memfd of a job */
	srv.lim.conns = srv.lim.conns_per_uid = FZ_CLIENTS;
	srv.lim.job_mem = 4 * (uint64_t)FZ_MEMFD_SIZE;
	srv.admin_gid = -1;
	srv.start_ms = now_ms();
	srv.gpu_state = GPU_NONE;
	snprintf(srv.gpu_info, sizeof srv.gpu_info, "none in the fuzz harness");
	if (be_host_start(srv.loop, 1, 0) < 0 || peer_start(srv.loop, "") < 0)
		die("cannot start the host backend");
	for (int i = 0; i < FZ_CLIENTS; i++)
		cl[i].fd = cl[i].efd = -1;
	return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	int before = count_fds(), after;
	size_t pos = 0;

	while (size - pos >= FZ_REC_HDR) {
		unsigned ctl = data[pos];
		size_t len = (size_t)data[pos + 1] | (size_t)data[pos + 2] << 8;

		pos += FZ_REC_HDR;
		if (len > size - pos)
			len = size - pos;
		record(ctl, data + pos, len);
		pos += len;
	}
	finish();
	after = count_fds();
	if (after != before) {
		fprintf(stderr, "fuzz-conn: %d fds open before the input, %d after:\n", before,
			after);
		dump_fds();
		die("fd leak");
	}
	return 0;
}
