/*
 * test-matrix-cd.c: RELIABILITY.md rows C (buffers and fds) and D (the
 * protocol), a TAP test point a row, spoken by hand to send what libcomm never would.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/inotify.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include "check.h"
#include "comm.h"
#include "frame.h"
#include "harness.h"
#include "matrix.h"
#include "raw.h"

#define FRAME_MS 1500     /* --frame-timeout */
#define HANDSHAKE_MS 1500 /* --handshake-timeout */
#define SCM_MAX 253       /* most fds Linux takes in one sendmsg (SCM_MAX_FD) */
#define MiB (1u << 20)
#define T(x) COMMPB__OP_TYPE__OP_##x

/* --- a hand-made rank ------------------------------------------------------ */

struct rc {
	int fd;
	struct frame_reader r;
};

#define RC_INIT { .fd = -1 } /* closed, nothing to free */

/* A buffer reference of an op: mem id and byte offset. */
struct buf {
	uint64_t id, off;
};

static void rc_open(struct rc *c, const struct th_daemon *d)
{
	c->fd = raw_connect(d->sock);
	frame_reader_init(&c->r);
}

static void rc_close(struct rc *c)
{
	if (c->fd >= 0)
		close(c->fd);
	c->fd = -1;
	frame_reader_free(&c->r);
}

static void send_hello(int fd, const char *job, int rank, int world, uint32_t vmin, uint32_t vmax)
{
	Commpb__Envelope env = COMMPB__ENVELOPE__INIT;
	Commpb__Hello h = COMMPB__HELLO__INIT;

	h.version_min = vmin;
	h.version_max = vmax;
	h.job = (char *)job;
	h.rank = rank;
	h.world_size = world;
	env.id = 1;
	env.body_case = COMMPB__ENVELOPE__BODY_HELLO;
	env.hello = &h;
	raw_send(fd, &env, NULL, 0);
}

/* Connect n ranks of job (no token) and wait until it formed; 0, or -1 (a failed check). */
static int join(const struct th_daemon *d, const char *job, int n, struct rc *cs)
{
	int ok = 1;

	for (int i = 0; i < n; i++) {
		rc_open(&cs[i], d);
		send_hello(cs[i].fd, job, i, n, PROTO_VERSION_MIN, PROTO_VERSION);
	}
	for (int i = 0; i < n; i++) {
		Commpb__Envelope *e = raw_recv(cs[i].fd, &cs[i].r);
		int st = e && e->body_case == COMMPB__ENVELOPE__BODY_HELLO_REPLY
				 ? e->hello_reply->status
				 : -1;

		CHECK(st == COMM_OK, "job %s rank %d: hello: %d (%s)", job, i, st,
		      st > 0 ? e->hello_reply->detail : "no reply");
		ok &= st == COMM_OK;
		if (e)
			commpb__envelope__free_unpacked(e, NULL);
	}
	return ok ? 0 : -1;
}

/* A memfd of size bytes named name, with seals added (0: none; -1: sealing not allowed). */
static int memfd_new(const char *name, size_t size, int seals)
{
	int fd = memfd_create(name, MFD_CLOEXEC | (seals >= 0 ? MFD_ALLOW_SEALING : 0));

	REQUIRE(fd >= 0 && ftruncate(fd, (off_t)size) == 0, "memfd %s", name);
	REQUIRE(seals <= 0 || fcntl(fd, F_ADD_SEALS, seals) == 0, "seal %s", name);
	return fd;
}

static void *map(int fd, size_t size)
{
	void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);

	REQUIRE(p != MAP_FAILED, "mmap");
	return p;
}

/* Register fd (size bytes) on c: the reply's status (-1: none), mem id and detail. */
static int reg(struct rc *c, int fd, uint64_t size, uint64_t *id, char *detail, size_t len)
{
	Commpb__Envelope env = COMMPB__ENVELOPE__INIT, *e;
	Commpb__RegisterMem rm = COMMPB__REGISTER_MEM__INIT;
	int st = -1;

	rm.size = size;
	env.body_case = COMMPB__ENVELOPE__BODY_REGISTER_MEM;
	env.register_mem = &rm;
	raw_send(c->fd, &env, &fd, 1);
	e = raw_recv(c->fd, &c->r);
	if (e && e->body_case == COMMPB__ENVELOPE__BODY_REGISTER_MEM_REPLY) {
		st = e->register_mem_reply->status;
		if (id)
			*id = e->register_mem_reply->mem_id;
		if (detail)
			snprintf(detail, len, "%s", e->register_mem_reply->detail);
	}
	if (e)
		commpb__envelope__free_unpacked(e, NULL);
	return st;
}

/* FreeMem id on c: the reply's status, -1 when none came. */
static int unreg(struct rc *c, uint64_t id)
{
	Commpb__Envelope env = COMMPB__ENVELOPE__INIT, *e;
	Commpb__FreeMem fm = COMMPB__FREE_MEM__INIT;
	int st = -1;

	fm.mem_id = id;
	env.body_case = COMMPB__ENVELOPE__BODY_FREE_MEM;
	env.free_mem = &fm;
	raw_send(c->fd, &env, NULL, 0);
	e = raw_recv(c->fd, &c->r);
	if (e && e->body_case == COMMPB__ENVELOPE__BODY_FREE_MEM_REPLY)
		st = e->free_mem_reply->status;
	if (e)
		commpb__envelope__free_unpacked(e, NULL);
	return st;
}

/* Post op seq on c: count elements of dtype (redop SUM), buffers s and r (NULL: none). */
static void post(struct rc *c, uint64_t seq, Commpb__OpType type, const struct buf *s,
		 const struct buf *r, uint64_t count, uint32_t dtype, int peer)
{
	Commpb__Envelope env = COMMPB__ENVELOPE__INIT;
	Commpb__Op op = COMMPB__OP__INIT;
	Commpb__BufRef sr = COMMPB__BUF_REF__INIT, rr = COMMPB__BUF_REF__INIT;

	op.seq = seq;
	op.type = type;
	op.count = count;
	op.dtype = dtype;
	op.redop = COMM_SUM;
	op.peer = peer;
	if (s) {
		sr.mem_id = s->id;
		sr.offset = s->off;
		op.send = &sr;
	}
	if (r) {
		rr.mem_id = r->id;
		rr.offset = r->off;
		op.recv = &rr;
	}
	env.id = 1000 + seq;
	env.body_case = COMMPB__ENVELOPE__BODY_OP;
	env.op = &op;
	raw_send(c->fd, &env, NULL, 0);
}

/* The answer to op seq on c: its status (-1: none came) and detail. */
static int done(struct rc *c, uint64_t seq, char *detail, size_t len)
{
	Commpb__Envelope *e = raw_recv(c->fd, &c->r);
	int st = -1;

	if (detail)
		detail[0] = '\0';
	if (e && e->body_case == COMMPB__ENVELOPE__BODY_OP_DONE && e->op_done->seq == seq) {
		st = e->op_done->status;
		if (detail)
			snprintf(detail, len, "%s", e->op_done->detail);
	}
	if (e)
		commpb__envelope__free_unpacked(e, NULL);
	return st;
}

/* An in-place all-reduce of count int32s at b on every rank of cs; how many were not OK. */
static int allreduce_all(struct rc *cs, int n, uint64_t seq, const struct buf *b, uint64_t count)
{
	char det[256];
	int bad = 0;

	for (int i = 0; i < n; i++)
		post(&cs[i], seq, T(ALLREDUCE), &b[i], &b[i], count, COMM_INT32, 0);
	for (int i = 0; i < n; i++) {
		int st = done(&cs[i], seq, det, sizeof det);

		if (st != COMM_OK) {
			fprintf(stderr, "rank %d: all-reduce %llu: %d (%s)\n", i,
				(unsigned long long)seq, st, det);
			bad++;
		}
	}
	return bad;
}

/*
 * Read what the daemon sends on c until it closes the connection (5 s at
 * most): CHECK that it was closed after an Error of status want whose
 * detail holds text. Returns the detail in det.
 */
static void expect_closed(struct rc *c, int want, const char *text, const char *what, char *det,
			  size_t len)
{
	Commpb__Envelope *e;
	int st = -1;

	det[0] = '\0';
	while ((e = raw_recv(c->fd, &c->r))) {
		if (e->body_case == COMMPB__ENVELOPE__BODY_ERROR) {
			st = e->error->status;
			snprintf(det, len, "%s", e->error->detail);
		}
		commpb__envelope__free_unpacked(e, NULL);
	}
	CHECK(st == want && strstr(det, text), "%s: error %d '%s', want %d with '%s'", what, st,
	      det, want, text);
	CHECK(raw_closed_by_daemon(c->fd), "%s: the connection was kept", what);
}

/* Bytes on a socket, as they are (a frame's prefix is the caller's); 0 or -errno. */
static int send_raw(int fd, const void *p, size_t len)
{
	const char *b = p;

	while (len) {
		ssize_t n = send(fd, b, len, MSG_NOSIGNAL);

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return -errno;
		b += n;
		len -= (size_t)n;
	}
	return 0;
}

/* A frame of payload with a right length prefix; 0 or -errno. */
static int send_payload(int fd, const uint8_t *p, size_t len)
{
	uint8_t hdr[4] = { (uint8_t)len, (uint8_t)(len >> 8), (uint8_t)(len >> 16),
			   (uint8_t)(len >> 24) };
	int rc = send_raw(fd, hdr, 4);

	return rc ? rc : send_raw(fd, p, len);
}

/* One sendmsg of len bytes with nfds fds (any number); bytes sent or -errno. */
static long send_fds(int sock, const void *p, size_t len, const int *fds, int nfds)
{
	union {
		struct cmsghdr align;
		char buf[CMSG_SPACE(SCM_MAX * sizeof(int))];
	} ctl;
	struct iovec iov = { (void *)p, len };
	struct msghdr msg = { 0 };
	struct cmsghdr *cm;
	ssize_t n;

	memset(&ctl, 0, sizeof ctl);
	msg.msg_iov = &iov;
	msg.msg_iovlen = 1;
	if (nfds) {
		msg.msg_control = ctl.buf;
		msg.msg_controllen = CMSG_SPACE((size_t)nfds * sizeof(int));
		cm = CMSG_FIRSTHDR(&msg);
		cm->cmsg_level = SOL_SOCKET;
		cm->cmsg_type = SCM_RIGHTS;
		cm->cmsg_len = CMSG_LEN((size_t)nfds * sizeof(int));
		memcpy(CMSG_DATA(cm), fds, (size_t)nfds * sizeof(int));
	}
	n = sendmsg(sock, &msg, MSG_NOSIGNAL);
	return n < 0 ? -errno : n;
}

/* --- what the daemon holds, seen from outside ------------------------------- */

/* Whether the daemon has an fd open on the file fd is open on (same device and inode). */
static int daemon_holds(pid_t pid, int fd)
{
	char path[64], link[600];
	struct stat mine, st;
	struct dirent *e;
	DIR *dp;
	int found = 0;

	snprintf(path, sizeof path, "/proc/%d/fd", (int)pid);
	if (fstat(fd, &mine) < 0 || !(dp = opendir(path)))
		return -1;
	while (!found && (e = readdir(dp))) {
		if (e->d_name[0] == '.')
			continue;
		snprintf(link, sizeof link, "%s/%s", path, e->d_name);
		found = stat(link, &st) == 0 && st.st_dev == mine.st_dev &&
			st.st_ino == mine.st_ino;
	}
	closedir(dp);
	return found;
}

/* Set the node's count of huge pages to n (n >= 0); the count, or -1 when it cannot be read. */
static long huge_pages(long n)
{
	const char *path = "/proc/sys/vm/nr_hugepages";
	long now = -1;
	FILE *f;

	if (n >= 0 && (f = fopen(path, "w"))) {
		fprintf(f, "%ld\n", n);
		fclose(f);
	}
	if ((f = fopen(path, "r"))) {
		if (fscanf(f, "%ld", &now) != 1)
			now = -1;
		fclose(f);
	}
	return now;
}

/* The daemon's mappings of the memfd named name. */
static int maps_of(pid_t pid, const char *name)
{
	char path[64], line[512], want[128];
	FILE *f;
	int n = 0;

	snprintf(path, sizeof path, "/proc/%d/maps", (int)pid);
	snprintf(want, sizeof want, "/memfd:%s ", name);
	if (!(f = fopen(path, "r")))
		return -1;
	while (fgets(line, sizeof line, f))
		n += strstr(line, want) != NULL;
	fclose(f);
	return n;
}

/* A kB field of /proc/PID/status ("VmRSS:"); -1 if missing. */
static long status_kb(pid_t pid, const char *key)
{
	char path[64], line[256];
	long kb = -1;
	FILE *f;

	snprintf(path, sizeof path, "/proc/%d/status", (int)pid);
	if (!(f = fopen(path, "r")))
		return -1;
	while (fgets(line, sizeof line, f))
		if (strncmp(line, key, strlen(key)) == 0)
			kb = strtol(line + strlen(key), NULL, 10);
	fclose(f);
	return kb;
}

/* Wait (3 s at most) for the daemon's fd count to be n; the count it has. */
static int fds_back_to(pid_t pid, int n)
{
	int now = th_count_fds(pid);

	for (int i = 0; i < 300 && now != n; i++) {
		usleep(10 * 1000);
		now = th_count_fds(pid);
	}
	return now;
}

/*
 * Files watched for their release, seen from the test, wherever the last
 * reference was (here, in the daemon, in flight on a socket): inotify
 * reports IN_CLOSE when the last reference to an open file goes, and
 * IN_IGNORED when its inode goes (a memfd: no close events, it is a
 * pseudo file; IN_IGNORED once its memory is freed).
 */
struct watch {
	int in, n, released;
	unsigned char gone[1024]; /* by watch descriptor */
};

static void watch_init(struct watch *w)
{
	w->in = inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
	REQUIRE(w->in >= 0, "inotify");
	w->n = w->released = 0;
	memset(w->gone, 0, sizeof w->gone);
}

/*
 * Watch the file fd is open on: fd must be its only open file (none from
 * another open() of it) and hold its own inode (not an anonymous one).
 */
static void watch_add(struct watch *w, int fd)
{
	char path[64];
	int wd;

	snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
	wd = inotify_add_watch(w->in, path, IN_CLOSE);
	REQUIRE(wd >= 0 && wd < (int)sizeof w->gone, "inotify_add_watch");
	w->n++;
}

/* A watched memfd (4 KiB, shrink-sealed: a valid buffer). */
static int watch_memfd(struct watch *w, const char *name)
{
	int fd = memfd_new(name, 4096, F_SEAL_SHRINK);

	watch_add(w, fd);
	return fd;
}

/* Once the test closed its copies: wait (3 s at most) for the files to go; how many did. */
static int watch_wait(struct watch *w)
{
	char buf[8192] __attribute__((aligned(__alignof__(struct inotify_event))));
	long t0 = mx_now_ms();

	while (w->released < w->n && mx_now_ms() - t0 < 3000) {
		struct pollfd p = { .fd = w->in, .events = POLLIN };
		ssize_t len;

		if (poll(&p, 1, 100) <= 0)
			continue;
		len = read(w->in, buf, sizeof buf);
		for (char *q = buf; len > 0 && q < buf + len;) {
			struct inotify_event *ev = (struct inotify_event *)q;

			if ((ev->mask & (IN_CLOSE | IN_IGNORED)) && ev->wd >= 0 &&
			    ev->wd < (int)sizeof w->gone && !w->gone[ev->wd]) {
				w->gone[ev->wd] = 1;
				w->released++;
			}
			q += sizeof *ev + ev->len;
		}
	}
	return w->released;
}

static void watch_free(struct watch *w)
{
	close(w->in);
}

/* --- C. Buffers and fds ----------------------------------------------------- */

/*
 * C1: the memfd a rank registered cannot shrink (F_SEAL_SHRINK, which
 * registration requires: an unsealed memfd is refused), not through the fd
 * it sent nor through a new open of it; growing is harmless. An all-reduce
 * on the buffer afterwards is exact.
 */
static void row_c1(struct th_daemon *d)
{
	const size_t size = 64 << 10, count = size / 4;
	struct rc c[2] = { RC_INIT, RC_INIT };
	struct buf b[2] = { { 0 } };
	int32_t *v[2] = { NULL, NULL };
	int mfd[2] = { -1, -1 }, fd, bad = 0;
	long huge0;
	char det[256], path[64];

	if (join(d, "c1", 2, c) < 0)
		goto out;
	for (int r = 0; r < 2; r++) {
		snprintf(path, sizeof path, "cdt-c1-%d", r);
		mfd[r] = memfd_new(path, size, F_SEAL_SHRINK);
		v[r] = map(mfd[r], size);
		CHECK(reg(&c[r], mfd[r], size, &b[r].id, det, sizeof det) == COMM_OK,
		      "rank %d: a shrink-sealed memfd refused: %s", r, det);
	}
	/* what registration demands: a memfd sealed against shrinking */
	fd = memfd_new("cdt-c1-unsealed", size, 0);
	CHECK(reg(&c[0], fd, size, NULL, det, sizeof det) == COMM_ERR_INVALID_ARG &&
		      strstr(det, "shrink"),
	      "an unsealed memfd: '%s'", det);
	mx_note("C1: unsealed memfd: %s", det);
	close(fd);
	fd = memfd_new("cdt-c1-nosealing", size, -1);
	CHECK(reg(&c[0], fd, size, NULL, det, sizeof det) == COMM_ERR_INVALID_ARG,
	      "a memfd that cannot be sealed: '%s'", det);
	close(fd);
	fd = memfd_new("cdt-c1-grow", size, F_SEAL_GROW | F_SEAL_SEAL);
	CHECK(reg(&c[0], fd, size, NULL, det, sizeof det) == COMM_ERR_INVALID_ARG,
	      "a memfd sealed against growing, not shrinking: '%s'", det);
	close(fd);

	/* the registered one cannot shrink, by the fd sent or by a new open */
	errno = 0;
	CHECK(ftruncate(mfd[0], 4096) < 0 && errno == EPERM, "shrinking to 4096: %s",
	      strerror(errno));
	errno = 0;
	CHECK(ftruncate(mfd[0], 0) < 0 && errno == EPERM, "shrinking to 0: %s", strerror(errno));
	snprintf(path, sizeof path, "/proc/self/fd/%d", mfd[0]);
	fd = open(path, O_RDWR | O_CLOEXEC);
	errno = 0;
	CHECK(fd >= 0 && ftruncate(fd, 0) < 0 && errno == EPERM, "shrinking through a new open: %s",
	      strerror(errno));
	if (fd >= 0)
		close(fd);
	CHECK(ftruncate(mfd[1], 2 * size) == 0, "growing: %s", strerror(errno));

	for (size_t i = 0; i < count; i++) {
		v[0][i] = (int32_t)i;
		v[1][i] = (int32_t)(3 * i);
	}
	CHECK(allreduce_all(c, 2, 1, b, count) == 0, "all-reduce after the shrink attempts");
	for (size_t i = 0; i < count; i++)
		bad += v[0][i] != (int32_t)(4 * i) || v[1][i] != (int32_t)(4 * i);
	CHECK(bad == 0, "all-reduce after the shrink attempts: %d wrong elements", bad);

	/*
	 * A hugetlb memfd registered for less than its huge page: commd maps a
	 * whole one, and unmaps it when freed. A node without huge pages gets
	 * two for the case when the test may set them (root), then none again.
	 */
	huge0 = huge_pages(-1);
	if (huge0 == 0)
		huge_pages(2);
	fd = memfd_create("cdt-c1-huge", MFD_CLOEXEC | MFD_ALLOW_SEALING | MFD_HUGETLB);
	if (fd >= 0) {
		struct stat st;
		uint64_t id = 0;
		int rc;

		REQUIRE(fstat(fd, &st) == 0 && ftruncate(fd, st.st_blksize) == 0 &&
				fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK) == 0,
			"hugetlb memfd");
		rc = reg(&c[0], fd, 4096, &id, det, sizeof det);
		if (rc == COMM_ERR_NO_MEMORY) {
			mx_note("C1: no huge pages to map: the hugetlb memfd case is skipped (%s)", det);
		} else {
			CHECK(rc == COMM_OK, "4096 bytes of a hugetlb memfd: %d '%s'", rc, det);
			CHECK(maps_of(d->pid, "cdt-c1-huge") == 1, "hugetlb memfd: commd maps it %d times",
			      maps_of(d->pid, "cdt-c1-huge"));
			CHECK(unreg(&c[0], id) == COMM_OK, "hugetlb memfd: free refused");
			CHECK(maps_of(d->pid, "cdt-c1-huge") == 0,
			      "hugetlb memfd registered for 4096 bytes: still mapped %d times after its "
			      "free", maps_of(d->pid, "cdt-c1-huge"));
		}
		close(fd);
	}
	if (huge0 == 0)
		huge_pages(0);
out:
	for (int r = 0; r < 2; r++) {
		if (v[r])
			munmap(v[r], size);
		if (mfd[r] >= 0)
			close(mfd[r]);
		rc_close(&c[r]);
	}
}

struct offer {
	const char *what;
	int fd;
	int watched; /* the file's release is watched (inotify) */
	int shared;  /* the daemon may hold the same file for itself (/dev/null) */
};

/*
 * C2: fds that are not a writable, shrink-sealed memfd, offered as a buffer:
 * each refused (INVALID_ARG, a detail that says why) and closed by the
 * daemon: it holds none of them after the reply, its fd count is back, and
 * from the test, each file is released once the test closes its copy (a
 * pipe's writer gets EPIPE, a socket's peer end of file). The connection
 * then registers a good one and runs an op.
 */
static void row_c2(struct th_daemon *d)
{
	struct offer o[12];
	struct watch w;
	struct rc c = RC_INIT;
	char det[256], path[64], dir[] = "/tmp/cdt-c2-XXXXXX", file[] = "/tmp/cdt-c2f-XXXXXX";
	int n = 0, p[2], s[2], fd, fds0, refused = 0, held = 0;
	struct buf b = { 0 };
	uint64_t id = 0;

	watch_init(&w);
	REQUIRE(pipe2(p, O_CLOEXEC) == 0 &&
			socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, s) == 0,
		"pipe, socketpair");
	REQUIRE(mkdtemp(dir), "mkdtemp");
	o[n++] = (struct offer){ "unsealed memfd", memfd_new("cdt-c2-unsealed", 4096, 0), 1, 0 };
	o[n++] = (struct offer){ "pipe", p[0], 0, 0 };
	o[n++] = (struct offer){ "socket", s[0], 0, 0 };
	o[n++] = (struct offer){ "directory", open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC), 1, 0 };
	fd = mkstemp(file);
	REQUIRE(fd >= 0 && ftruncate(fd, 4096) == 0, "mkstemp");
	close(fd);
	o[n++] = (struct offer){ "read-only file", open(file, O_RDONLY | O_CLOEXEC), 1, 0 };
	unlink(file);
	/* a sealed memfd opened again read-only; the first open closed before the watch */
	fd = memfd_new("cdt-c2-readonly", 4096, F_SEAL_SHRINK);
	snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
	o[n++] = (struct offer){ "read-only memfd", open(path, O_RDONLY | O_CLOEXEC), 1, 0 };
	o[n++] = (struct offer){ "O_PATH memfd", open(path, O_PATH | O_CLOEXEC), 0, 0 };
	close(fd);
	fd = memfd_new("cdt-c2-wseal", 4096, F_SEAL_SHRINK | F_SEAL_WRITE);
	o[n++] = (struct offer){ "write-sealed memfd", fd, 1, 0 };
	fd = memfd_new("cdt-c2-fwseal", 4096, F_SEAL_SHRINK | F_SEAL_FUTURE_WRITE);
	o[n++] = (struct offer){ "future-write-sealed memfd", fd, 1, 0 };
	o[n++] = (struct offer){ "/dev/null", open("/dev/null", O_RDWR | O_CLOEXEC), 0, 1 };
	/* an anonymous inode, shared by all eventfds (commd has its own) */
	o[n++] = (struct offer){ "eventfd", eventfd(0, EFD_CLOEXEC), 0, 1 };
	for (int i = 0; i < n; i++) {
		REQUIRE(o[i].fd >= 0, "open %s", o[i].what);
		if (o[i].watched)
			watch_add(&w, o[i].fd);
	}

	if (join(d, "c2", 1, &c) < 0)
		goto out;
	fds0 = th_count_fds(d->pid);
	for (int i = 0; i < n; i++) {
		int st = reg(&c, o[i].fd, 4096, NULL, det, sizeof det), now;

		CHECK(st == COMM_ERR_INVALID_ARG && strncmp(det, "mem register: ", 14) == 0 &&
			      strlen(det) > 24,
		      "%s offered as a buffer: %d '%s'", o[i].what, st, det);
		refused += st == COMM_ERR_INVALID_ARG;
		mx_note("C2: %s: %s", o[i].what, det);
		if (!o[i].shared && daemon_holds(d->pid, o[i].fd) != 0) {
			fprintf(stderr, "C2: commd still holds the %s after refusing it\n",
				o[i].what);
			held++;
		}
		now = fds_back_to(d->pid, fds0);
		CHECK(now == fds0, "after the %s: commd has %d fds, had %d", o[i].what, now, fds0);
	}
	CHECK(held == 0, "commd kept %d refused fds", held);

	/* the connection is unharmed: a good buffer and an op on it */
	fd = memfd_new("cdt-c2-good", 4096, F_SEAL_SHRINK);
	CHECK(reg(&c, fd, 4096, &id, det, sizeof det) == COMM_OK, "a good memfd: %s", det);
	close(fd);
	b.id = id;
	CHECK(allreduce_all(&c, 1, 1, &b, 1024) == 0, "an op after the refusals");
out:
	for (int i = 0; i < n; i++)
		close(o[i].fd);
	CHECK(watch_wait(&w) == w.n, "%d of %d refused files are still open somewhere",
	      w.n - w.released, w.n);
	errno = 0;
	CHECK(write(p[1], "x", 1) < 0 && errno == EPIPE,
	      "the refused pipe is still open somewhere");
	{
		struct pollfd pf = { .fd = s[1], .events = POLLIN };
		char ch;

		CHECK(poll(&pf, 1, 3000) == 1 && read(s[1], &ch, 1) == 0,
		      "the refused socket is still open somewhere");
	}
	mx_note("C2: %d offers refused, each released", refused);
	close(p[1]);
	close(s[1]);
	rmdir(dir);
	watch_free(&w);
	rc_close(&c);
}

/*
 * C3: ops whose buffers run past the end of the registration, with the
 * offset or the offset + length overflowing 64 bits, offsets that do not
 * start on an element, and counts whose count x dtype size (or x world
 * size) overflows: INVALID_ARG, the job
 * intact. Registrations past the memfd's end are refused as well. Just
 * inside the end works.
 */
static void row_c3(struct th_daemon *d)
{
	static const struct {
		uint64_t soff, roff, count;
		uint32_t dtype;
		const char *text;
	} bad[] = {
		{ (64 << 10) - 32, (64 << 10) - 32, 16, COMM_INT32, "past the end" },
		{ 64 << 10, 64 << 10, 1, COMM_INT8, "past the end" },
		{ (64 << 10) + 4096, 0, 1, COMM_INT8, "past the end" },
		{ 0, (64 << 10) - 8, 16, COMM_INT32, "past the end" }, /* the recv buffer only */
		{ UINT64_MAX - 15, UINT64_MAX - 15, 16, COMM_INT32, "past the end" },
		/* the kernels work on whole elements: a buffer must start on one */
		{ 2, 0, 16, COMM_INT32, "not a multiple of the element size" },
		{ 0, 4, 16, COMM_FLOAT64, "not a multiple of the element size" },
		{ 1ull << 63, 1ull << 63, 1ull << 63, COMM_INT8, "past the end" },
		{ 0, 0, UINT64_MAX, COMM_INT8, "past the end" },
		{ 0, 0, 1ull << 62, COMM_INT32, "overflows" },
		{ 0, 0, 1ull << 61, COMM_FLOAT64, "overflows" },
		{ 0, 0, 1ull << 63, COMM_FLOAT16, "overflows" },
	};
	const size_t size = 64 << 10;
	struct rc one = RC_INIT, pair[2] = { RC_INIT, RC_INIT };
	int32_t *v = NULL, *pv[2] = { NULL, NULL };
	int mfd = -1, pfd[2] = { -1, -1 }, st, wrong = 0;
	uint64_t seq = 1, id = 0, pid[2] = { 0, 0 };
	char det[256];

	if (join(d, "c3", 1, &one) < 0)
		goto out;
	mfd = memfd_new("cdt-c3", size, F_SEAL_SHRINK);
	v = map(mfd, size);
	CHECK(reg(&one, mfd, size + 1, NULL, det, sizeof det) == COMM_ERR_INVALID_ARG,
	      "a registration 1 byte past the memfd: '%s'", det);
	CHECK(reg(&one, mfd, 0, NULL, det, sizeof det) == COMM_ERR_INVALID_ARG,
	      "a registration of 0 bytes: '%s'", det);
	CHECK(reg(&one, mfd, size, &id, det, sizeof det) == COMM_OK, "register: %s", det);
	for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
		struct buf s = { id, bad[i].soff }, r = { id, bad[i].roff };

		post(&one, seq, T(ALLREDUCE), &s, &r, bad[i].count, bad[i].dtype, 0);
		st = done(&one, seq++, det, sizeof det);
		CHECK(st == COMM_ERR_INVALID_ARG && strstr(det, bad[i].text),
		      "all-reduce of %llu x dtype %u at %llu -> %llu: %d '%s', want '%s'",
		      (unsigned long long)bad[i].count, bad[i].dtype,
		      (unsigned long long)bad[i].soff, (unsigned long long)bad[i].roff, st, det,
		      bad[i].text);
		if (i == 0 || i == 4 || i == 7)
			mx_note("C3: %s", det);
	}
	/* a send of an unknown dtype, or to a peer far out of range */
	for (int k = 0; k < 2; k++) {
		struct buf s = { id, 0 };

		post(&one, seq, T(SEND), &s, NULL, 1, k ? COMM_INT32 : 99, 300000);
		st = done(&one, seq++, det, sizeof det);
		CHECK(st == COMM_ERR_INVALID_ARG, "a send of dtype %d to peer 300000: %d '%s'",
		      k ? COMM_INT32 : 99, st, det);
	}
	/* the last 16 int32s of the buffer: inside, exactly */
	for (int i = 0; i < 16; i++)
		v[size / 4 - 16 + i] = i * 5;
	{
		struct buf s = { id, size - 64 };

		post(&one, seq, T(ALLREDUCE), &s, &s, 16, COMM_INT32, 0);
		st = done(&one, seq++, det, sizeof det);
		CHECK(st == COMM_OK, "all-reduce of the buffer's last 64 bytes: %d '%s'", st, det);
		for (int i = 0; i < 16; i++)
			wrong += v[size / 4 - 16 + i] != i * 5;
	}

	/* two ranks: count x size fits, x world size does not */
	if (join(d, "c3-pair", 2, pair) < 0)
		goto out;
	for (int r = 0; r < 2; r++) {
		pfd[r] = memfd_new("cdt-c3-pair", size, F_SEAL_SHRINK);
		pv[r] = map(pfd[r], size);
		CHECK(reg(&pair[r], pfd[r], size, &pid[r], det, sizeof det) == COMM_OK,
		      "register: %s", det);
	}
	for (int r = 0; r < 2; r++) {
		struct buf s = { pid[r], 0 }, q = { pid[r], 1024 };

		post(&pair[r], 1, T(ALLGATHER), &s, &q, 1ull << 61, COMM_INT32, 0);
	}
	for (int r = 0; r < 2; r++) {
		st = done(&pair[r], 1, det, sizeof det);
		CHECK(st == COMM_ERR_INVALID_ARG && strstr(det, "overflows"),
		      "rank %d: all-gather of 2^61 int32s on 2 ranks: %d '%s'", r, st, det);
	}
	for (int r = 0; r < 2; r++) {
		struct buf s = { pid[r], 0 }, q = { pid[r], 1024 };

		for (int i = 0; i < 16; i++)
			pv[r][i] = r * 100 + i;
		post(&pair[r], 2, T(ALLGATHER), &s, &q, 16, COMM_INT32, 0);
	}
	for (int r = 0; r < 2; r++) {
		st = done(&pair[r], 2, det, sizeof det);
		CHECK(st == COMM_OK, "rank %d: an all-gather after the refusal: %d '%s'", r, st,
		      det);
		for (int i = 0; i < 32; i++)
			wrong += pv[r][256 + i] != (i / 16) * 100 + i % 16;
	}
	CHECK(wrong == 0, "%d wrong elements in the ops inside the buffers", wrong);
out:
	if (v)
		munmap(v, size);
	if (mfd >= 0)
		close(mfd);
	for (int r = 0; r < 2; r++) {
		if (pv[r])
			munmap(pv[r], size);
		if (pfd[r] >= 0)
			close(pfd[r]);
		rc_close(&pair[r]);
	}
	rc_close(&one);
}

/*
 * C4: mem ids are the connection's own. Rank 1 of a job tries rank 0's
 * ids (and 0, huge and random ones) in all-reduces and frees: NOT_FOUND
 * every time; an id both hold names each one's own buffer (a send from
 * rank 1's id 1 carries rank 1's data). A rank of another job tries them
 * too. Rank 0's buffers are untouched and work afterwards.
 */
static void row_c4(struct th_daemon *d)
{
	const size_t size = 4096;
	struct rc c[2] = { RC_INIT, RC_INIT }, other = RC_INIT;
	int32_t *v[4] = { NULL };
	int mfd[4] = { -1, -1, -1, -1 }, miss = 0, wrong = 0, st;
	uint64_t id[4], guess[80], x = 0xc4c4c4c4deadbeefull, seq = 1, oseq = 1;
	int nguess = 0;
	char det[256], name[32];

	if (join(d, "c4", 2, c) < 0 || join(d, "c4-other", 1, &other) < 0)
		goto out;
	/* rank 0: ids 1, 2, 3; rank 1: id 1 */
	for (int i = 0; i < 4; i++) {
		snprintf(name, sizeof name, "cdt-c4-%d", i);
		mfd[i] = memfd_new(name, size, F_SEAL_SHRINK);
		v[i] = map(mfd[i], size);
		for (size_t k = 0; k < size / 4; k++)
			v[i][k] = (int32_t)(i * 1000000 + k);
		CHECK(reg(&c[i < 3 ? 0 : 1], mfd[i], size, &id[i], det, sizeof det) == COMM_OK,
		      "register %d: %s", i, det);
	}
	CHECK(id[0] == 1 && id[3] == 1, "mem ids: rank 0 got %llu first, rank 1 %llu",
	      (unsigned long long)id[0], (unsigned long long)id[3]);
	guess[nguess++] = 0;
	guess[nguess++] = id[1];
	guess[nguess++] = id[2];
	guess[nguess++] = id[2] + 1;
	guess[nguess++] = UINT64_MAX;
	guess[nguess++] = 1ull << 63;
	while (nguess < (int)(sizeof guess / sizeof guess[0])) {
		x ^= x << 13, x ^= x >> 7, x ^= x << 17;
		if (x > 1) {
			guess[nguess] = nguess & 1 ? x : x % 64;
			nguess++;
		}
	}
	for (int g = 0; g < nguess; g++) {
		struct buf good = { id[0], 0 }, bad = { guess[g], 0 };
		int s0, s1;

		if (guess[g] == 1) /* rank 1's own */
			continue;
		/* rank 1 names the guess, rank 0 its own id 1: both fail, with rank 1's reason */
		post(&c[0], seq, T(ALLREDUCE), &good, &good, 16, COMM_INT32, 0);
		post(&c[1], seq, T(ALLREDUCE), &bad, &bad, 16, COMM_INT32, 0);
		s0 = done(&c[0], seq, NULL, 0);
		s1 = done(&c[1], seq++, det, sizeof det);
		miss += s1 != COMM_ERR_NOT_FOUND || s0 != COMM_ERR_NOT_FOUND;
		if (g == 1)
			mx_note("C4: rank 1 tries rank 0's id %llu: %s",
				(unsigned long long)guess[g], det);
		miss += unreg(&c[1], guess[g]) != COMM_ERR_NOT_FOUND;
		/* another job's rank, which holds no buffer */
		post(&other, oseq, T(ALLREDUCE), &bad, &bad, 16, COMM_INT32, 0);
		miss += done(&other, oseq++, NULL, 0) != COMM_ERR_NOT_FOUND;
		miss += unreg(&other, guess[g]) != COMM_ERR_NOT_FOUND;
	}
	for (int g = 1; g <= 3; g++) {
		struct buf bad = { (uint64_t)g, 0 };

		post(&other, oseq, T(ALLREDUCE), &bad, &bad, 16, COMM_INT32, 0);
		miss += done(&other, oseq++, NULL, 0) != COMM_ERR_NOT_FOUND;
		miss += unreg(&other, (uint64_t)g) != COMM_ERR_NOT_FOUND;
	}
	CHECK(miss == 0, "%d guesses of another connection's mem ids were not NOT_FOUND", miss);

	/* id 1 on rank 1 is rank 1's: its send lands in rank 0's id 2 */
	{
		struct buf s = { id[3], 0 }, r = { id[1], 0 };

		post(&c[1], seq, T(SEND), &s, NULL, size / 4, COMM_INT32, 0);
		post(&c[0], seq, T(RECV), NULL, &r, size / 4, COMM_INT32, 1);
		st = done(&c[0], seq, det, sizeof det);
		CHECK(st == COMM_OK, "recv on rank 0: %d '%s'", st, det);
		st = done(&c[1], seq++, det, sizeof det);
		CHECK(st == COMM_OK, "send on rank 1: %d '%s'", st, det);
		for (size_t k = 0; k < size / 4; k++)
			wrong += v[1][k] != (int32_t)(3 * 1000000 + k);
		CHECK(wrong == 0, "rank 1's id %llu did not carry rank 1's data",
		      (unsigned long long)id[3]);
	}
	/* rank 0's other buffers: untouched by the frees, and working */
	for (size_t k = 0; k < size / 4; k++)
		wrong += v[0][k] != (int32_t)k || v[2][k] != (int32_t)(2 * 1000000 + k);
	{
		struct buf b[2] = { { id[2], 0 }, { id[3], 0 } };

		CHECK(allreduce_all(c, 2, seq++, b, size / 4) == 0,
		      "an all-reduce after the guesses");
		for (size_t k = 0; k < size / 4; k++)
			wrong += v[2][k] != (int32_t)(5 * 1000000 + 2 * k) ||
				 v[3][k] != (int32_t)(5 * 1000000 + 2 * k);
	}
	CHECK(wrong == 0, "%d wrong elements in rank 0's buffers after the guesses", wrong);
out:
	for (int i = 0; i < 4; i++) {
		if (v[i])
			munmap(v[i], size);
		if (mfd[i] >= 0)
			close(mfd[i]);
	}
	rc_close(&c[0]);
	rc_close(&c[1]);
	rc_close(&other);
}

/*
 * C5: rank 0 frees a buffer that its posted all-reduce uses. The daemon
 * answers the free at once (OK) and defers it: the mapping stays until the
 * op ends, the op's result is exact, then the mapping goes and the id is
 * NOT_FOUND.
 */
/* The quota (128M) less one 16 KiB buffer: fits only once the freed one is not charged. */
#define C5_BIG ((128u << 20) - (16u << 10))
static void row_c5(struct th_daemon *d)
{
	const size_t size = 16 << 10, count = size / 4;
	uint64_t big_id = 0;
	int big = -1;
	struct rc c[2] = { RC_INIT, RC_INIT };
	struct buf b[2];
	int32_t *v[2] = { NULL, NULL };
	int mfd[2] = { -1, -1 }, st, freed, wrong = 0, during, after = -1;
	char det[256];

	if (join(d, "c5", 2, c) < 0)
		goto out;
	for (int r = 0; r < 2; r++) {
		mfd[r] = memfd_new(r ? "cdt-c5-b" : "cdt-c5-a", size, F_SEAL_SHRINK);
		v[r] = map(mfd[r], size);
		for (size_t i = 0; i < count; i++)
			v[r][i] = (int32_t)(r ? 1000 + i : i);
		b[r].off = 0;
		CHECK(reg(&c[r], mfd[r], size, &b[r].id, det, sizeof det) == COMM_OK,
		      "register: %s", det);
	}
	CHECK(maps_of(d->pid, "cdt-c5-a") == 1, "the buffer is not mapped once");
	post(&c[0], 1, T(ALLREDUCE), &b[0], &b[0], count, COMM_INT32, 0);
	freed = unreg(&c[0], b[0].id);
	during = maps_of(d->pid, "cdt-c5-a");
	CHECK(freed == COMM_OK || freed == COMM_ERR_BUSY, "free of a buffer in use: %d", freed);
	if (freed == COMM_OK)
		CHECK(during == 1, "freed while in use: commd maps it %d times before the op ends",
		      during);
	/* until the op ends the freed buffer still counts against max-job-memory */
	big = memfd_new("cdt-c5-big", C5_BIG, F_SEAL_SHRINK);
	st = reg(&c[1], big, C5_BIG, &big_id, det, sizeof det);
	CHECK(freed != COMM_OK || (st == COMM_ERR_NO_MEMORY && strstr(det, "max-job-memory")),
	      "a buffer that fits only if the freed one were not charged: %d '%s'", st, det);
	post(&c[1], 1, T(ALLREDUCE), &b[1], &b[1], count, COMM_INT32, 0);
	for (int r = 0; r < 2; r++) {
		st = done(&c[r], 1, det, sizeof det);
		CHECK(st == COMM_OK, "rank %d: the all-reduce on the freed buffer: %d '%s'", r, st,
		      det);
	}
	for (size_t i = 0; i < count; i++)
		wrong += v[0][i] != (int32_t)(1000 + 2 * i) || v[1][i] != (int32_t)(1000 + 2 * i);
	CHECK(wrong == 0, "%d wrong elements in the op on the freed buffer", wrong);
	if (freed == COMM_ERR_BUSY)
		CHECK(unreg(&c[0], b[0].id) == COMM_OK, "free once the op ended");
	for (int i = 0; i < 300 && (after = maps_of(d->pid, "cdt-c5-a")) != 0; i++)
		usleep(10 * 1000);
	CHECK(after == 0, "the freed buffer is still mapped after the op");
	/* and once it is gone, that buffer fits */
	CHECK((st = reg(&c[1], big, C5_BIG, &big_id, det, sizeof det)) == COMM_OK,
	      "the buffer that fits once the freed one is gone: %d '%s'", st, det);
	CHECK(st != COMM_OK || unreg(&c[1], big_id) == COMM_OK, "free of the big buffer");
	mx_note("C5: free while in use: %s; mapped %d time(s) until the op ended, then %d",
		freed == COMM_OK ? "OK, deferred" : "BUSY", during, after);
	/* the id is gone: an op naming it fails (its partner with it), a second free too */
	post(&c[0], 2, T(ALLREDUCE), &b[0], &b[0], count, COMM_INT32, 0);
	post(&c[1], 2, T(ALLREDUCE), &b[1], &b[1], count, COMM_INT32, 0);
	CHECK(done(&c[0], 2, det, sizeof det) == COMM_ERR_NOT_FOUND, "op on the freed id: '%s'",
	      det);
	CHECK(done(&c[1], 2, NULL, 0) == COMM_ERR_NOT_FOUND, "partner of the op on the freed id");
	CHECK(unreg(&c[0], b[0].id) == COMM_ERR_NOT_FOUND, "second free of the id");
	CHECK(maps_of(d->pid, "cdt-c5-b") == 1, "rank 1's buffer went with rank 0's");
out:
	for (int r = 0; r < 2; r++) {
		if (v[r])
			munmap(v[r], size);
		if (mfd[r] >= 0)
			close(mfd[r]);
		rc_close(&c[r]);
	}
	if (big >= 0)
		close(big);
}

/*
 * One C6 case: on a new connection (after a hello when hello is set) send
 * the frame env with nfds watched memfds, split into sendmsgs of at most
 * SCM_MAX fds; PROTOCOL, closed, every fd released and the daemon's fd
 * count back.
 */
static void fds_case(struct th_daemon *d, const char *what, Commpb__Envelope *env, int nfds,
		     int hello, int fds0)
{
	struct watch w;
	struct rc c;
	uint8_t *frame;
	size_t len = frame_pack(env, &frame), off = 0;
	int *fds = calloc((size_t)nfds, sizeof *fds), sent = 0, parts = 0, lost = 0, now;
	char det[256], name[32];

	REQUIRE(len && fds, "pack");
	watch_init(&w);
	for (int i = 0; i < nfds; i++) {
		snprintf(name, sizeof name, "cdt-c6-%d", i);
		fds[i] = watch_memfd(&w, name);
	}
	if (hello) {
		if (join(d, "c6", 1, &c) < 0)
			goto out;
	} else {
		rc_open(&c, d);
	}
	/* the frame's first bytes with the first SCM_MAX fds, the rest with the others */
	while (sent < nfds || off < len) {
		int k = nfds - sent < SCM_MAX ? nfds - sent : SCM_MAX;
		size_t chunk = sent + k < nfds ? 2 : len - off;
		long n = send_fds(c.fd, frame + off, chunk, fds + sent, k);

		if (n < 0) {
			lost = nfds - sent; /* the daemon closed already: never sent */
			break;
		}
		parts++;
		sent += k;
		off += (size_t)n;
	}
	expect_closed(&c, COMM_ERR_PROTOCOL, "fd", what, det, sizeof det);
	mx_note("C6: %s: %d sendmsg(s)%s: %s", what, parts,
		lost ? " (the rest refused: closed)" : "", det);
out:
	rc_close(&c);
	for (int i = 0; i < nfds; i++)
		close(fds[i]);
	CHECK(watch_wait(&w) == nfds, "%s: %d of %d fds sent are still open somewhere", what,
	      nfds - w.released, nfds);
	now = fds_back_to(d->pid, fds0);
	CHECK(now == fds0, "%s: commd has %d fds, had %d", what, now, fds0);
	watch_free(&w);
	free(fds);
	free(frame);
}

/*
 * C6: 100 fds in one frame, 300 (253 on the sendmsg that starts the frame,
 * the rest on the next), 5 (over max-fds-per-frame, under what the reader
 * queues), 2 on a RegisterMem that takes 1, and fds on messages that take
 * none (FreeMem, Op, Hello): a protocol error, the connection closed, and
 * every fd released.
 */
static void row_c6(struct th_daemon *d)
{
	Commpb__Envelope env = COMMPB__ENVELOPE__INIT;
	Commpb__RegisterMem rm = COMMPB__REGISTER_MEM__INIT;
	Commpb__FreeMem fm = COMMPB__FREE_MEM__INIT;
	Commpb__Op op = COMMPB__OP__INIT;
	Commpb__Hello h = COMMPB__HELLO__INIT;
	int fds0 = th_count_fds(d->pid), p[2];

	rm.size = 4096;
	env.body_case = COMMPB__ENVELOPE__BODY_REGISTER_MEM;
	env.register_mem = &rm;
	fds_case(d, "100 fds on a RegisterMem", &env, 100, 1, fds0);
	fds_case(d, "300 fds on a RegisterMem", &env, 300, 1, fds0);
	fds_case(d, "5 fds on a RegisterMem", &env, 5, 1, fds0);
	fds_case(d, "2 fds on a RegisterMem", &env, 2, 1, fds0);
	fm.mem_id = 1;
	env.body_case = COMMPB__ENVELOPE__BODY_FREE_MEM;
	env.free_mem = &fm;
	fds_case(d, "an fd on a FreeMem", &env, 1, 1, fds0);
	op.seq = 1;
	op.type = T(BARRIER);
	env.body_case = COMMPB__ENVELOPE__BODY_OP;
	env.op = &op;
	fds_case(d, "an fd on an Op", &env, 1, 1, fds0);
	h.version_min = PROTO_VERSION_MIN;
	h.version_max = PROTO_VERSION;
	h.job = "c6-hello";
	h.world_size = 1;
	env.body_case = COMMPB__ENVELOPE__BODY_HELLO;
	env.hello = &h;
	fds_case(d, "an fd on a Hello", &env, 1, 0, fds0);

	/* a pipe on a FreeMem; its writer sees the reader go */
	{
		struct rc c;
		char det[256];

		REQUIRE(pipe2(p, O_CLOEXEC) == 0, "pipe");
		if (join(d, "c6-pipe", 1, &c) == 0) {
			env.body_case = COMMPB__ENVELOPE__BODY_FREE_MEM;
			env.free_mem = &fm;
			raw_send(c.fd, &env, &p[0], 1);
			expect_closed(&c, COMM_ERR_PROTOCOL, "fd", "a pipe on a FreeMem", det,
				      sizeof det);
		}
		close(p[0]);
		rc_close(&c);
		usleep(50 * 1000);
		errno = 0;
		CHECK(write(p[1], "x", 1) < 0 && errno == EPIPE,
		      "the pipe sent on a FreeMem is still open somewhere");
		close(p[1]);
	}
}

/*
 * C7 through libcomm (ported from test-limits): its first segment (64 MiB)
 * holds 48 MiB; 120 MiB more would be a second segment past the limit, and
 * comm_mem_alloc says so. The 48 MiB still work.
 */
static int rank_quota(int rank, int n, void *arg)
{
	int32_t *a, *b;
	comm_t *c;

	if (th_join(&c, rank, n) < 0)
		return 1;
	a = comm_mem_alloc(c, 48 * MiB);
	b = a ? comm_mem_alloc(c, 120 * MiB) : NULL;
	if (!a || b || !strstr(comm_last_error(c), "max-job-memory")) {
		fprintf(stderr, "C7 libcomm: 48 MiB %s, then 120 MiB %s: '%s'\n",
			a ? "allocated" : "refused", b ? "allocated" : "refused",
			comm_last_error(c));
		return th_bail(c);
	}
	for (int i = 0; i < 1024; i++)
		a[i] = i;
	if (comm_allreduce(c, a, a, 1024, COMM_INT32, COMM_SUM, NULL) != COMM_OK ||
	    a[1023] != 1023) {
		fprintf(stderr, "C7 libcomm: an all-reduce after the refusal: %s\n",
			comm_last_error(c));
		return th_bail(c);
	}
	comm_mem_free(c, a);
	return th_leave(c, rank);
}

/*
 * C7: --max-job-memory 128M. A job of two raw ranks registers 96 MiB, then
 * 48 MiB more: NO_MEMORY naming the limit (for either rank: the quota is
 * the job's); up to the limit exactly works. Another job registers 96 MiB
 * meanwhile. The job's first buffers still give exact results; a free
 * gives the room back. Then the same through libcomm.
 */
static void row_c7(struct th_daemon *d)
{
	const size_t big = 96 * MiB, more = 48 * MiB, rest = 32 * MiB;
	struct rc c[2] = { RC_INIT, RC_INIT }, other = RC_INIT;
	int big_fd = -1, more_fd = -1, rest_fd = -1, other_fd = -1, st, wrong = 0;
	uint64_t big_id = 0, rest_id = 0, id;
	int32_t *v[2] = { NULL, NULL };
	char det[256];

	if (join(d, "c7", 2, c) < 0 || join(d, "c7-other", 1, &other) < 0)
		goto out;
	big_fd = memfd_new("cdt-c7-big", big, F_SEAL_SHRINK);
	more_fd = memfd_new("cdt-c7-more", more, F_SEAL_SHRINK);
	rest_fd = memfd_new("cdt-c7-rest", rest, F_SEAL_SHRINK);
	other_fd = memfd_new("cdt-c7-other", big, F_SEAL_SHRINK);
	CHECK(reg(&c[0], big_fd, big, &big_id, det, sizeof det) == COMM_OK, "96 MiB: %s", det);
	st = reg(&c[1], more_fd, more, NULL, det, sizeof det);
	CHECK(st == COMM_ERR_NO_MEMORY && strstr(det, "max-job-memory"),
	      "rank 1: 48 MiB more, over the job's 128 MiB: %d '%s'", st, det);
	mx_note("C7: %s", det);
	st = reg(&c[0], more_fd, more, NULL, det, sizeof det);
	CHECK(st == COMM_ERR_NO_MEMORY, "rank 0: 48 MiB more: %d '%s'", st, det);
	CHECK(reg(&other, other_fd, big, NULL, det, sizeof det) == COMM_OK,
	      "another job: 96 MiB while c7 is full: %s", det);
	CHECK(reg(&c[1], rest_fd, rest, &rest_id, det, sizeof det) == COMM_OK,
	      "rank 1: 32 MiB, up to the limit exactly: %s", det);
	st = reg(&c[1], rest_fd, 4096, NULL, det, sizeof det);
	CHECK(st == COMM_ERR_NO_MEMORY, "rank 1: 4 KiB past the limit: %d '%s'", st, det);

	/* the job's buffers work */
	v[0] = map(big_fd, 1 * MiB);
	v[1] = map(rest_fd, 1 * MiB);
	for (int i = 0; i < 4096; i++) {
		v[0][i] = i;
		v[1][i] = 7 * i;
	}
	{
		struct buf b[2] = { { big_id, 0 }, { rest_id, 0 } };

		CHECK(allreduce_all(c, 2, 1, b, 4096) == 0, "an all-reduce at the limit");
		for (int i = 0; i < 4096; i++)
			wrong += v[0][i] != 8 * i || v[1][i] != 8 * i;
		CHECK(wrong == 0, "%d wrong elements at the limit", wrong);
	}
	/* a free gives the room back */
	CHECK(unreg(&c[0], big_id) == COMM_OK, "free 96 MiB");
	CHECK(reg(&c[0], more_fd, more, &id, det, sizeof det) == COMM_OK, "48 MiB after a free: %s",
	      det);
	CHECK(th_run_ranks(d, "c7-libcomm", 1, rank_quota, NULL) == 0, "the quota through libcomm");
out:
	for (int r = 0; r < 2; r++)
		if (v[r])
			munmap(v[r], 1 * MiB);
	if (big_fd >= 0) {
		close(big_fd);
		close(more_fd);
		close(rest_fd);
		close(other_fd);
	}
	rc_close(&c[0]);
	rc_close(&c[1]);
	rc_close(&other);
}

/* --- D. Protocol ------------------------------------------------------------ */

static uint64_t rng_state;

static uint32_t rnd(void)
{
	uint64_t x = rng_state;

	x ^= x << 13, x ^= x >> 7, x ^= x << 17;
	rng_state = x;
	return (uint32_t)(x >> 16);
}

/* Whether len bytes at p unpack as an Envelope here (then they are not malformed). */
static int unpacks(const uint8_t *p, size_t len)
{
	Commpb__Envelope *e = commpb__envelope__unpack(NULL, len, p);

	if (e)
		commpb__envelope__free_unpacked(e, NULL);
	return e != NULL;
}

/* Messages to truncate: a hello, a RegisterMem, an Op with every field set. */
static size_t d1_template(int which, uint8_t **out)
{
	static uint8_t token[32], handle[64], event[64];
	Commpb__Envelope env = COMMPB__ENVELOPE__INIT;
	Commpb__Hello h = COMMPB__HELLO__INIT;
	Commpb__RegisterMem rm = COMMPB__REGISTER_MEM__INIT;
	Commpb__Op op = COMMPB__OP__INIT;
	Commpb__BufRef s = COMMPB__BUF_REF__INIT, r = COMMPB__BUF_REF__INIT;
	uint8_t *frame;
	size_t len;

	memset(token, 0x5a, sizeof token);
	memset(handle, 0xa5, sizeof handle);
	memset(event, 0x3c, sizeof event);
	env.id = 0x123456789abcull;
	if (which == 0) {
		h.version_min = 1;
		h.version_max = 3;
		h.job = "d1-a-job-name-of-some-length";
		h.token.data = token;
		h.token.len = sizeof token;
		h.rank = 3;
		h.world_size = 8;
		h.timeout_ms = 60000;
		h.root = "";
		env.body_case = COMMPB__ENVELOPE__BODY_HELLO;
		env.hello = &h;
	} else if (which == 1) {
		rm.kind = COMMPB__MEM_KIND__MEM_CUDA_IPC;
		rm.size = 1ull << 40;
		rm.cuda_handle.data = handle;
		rm.cuda_handle.len = sizeof handle;
		rm.gpu_uuid = "GPU-12345678-1234-1234-1234-123456789abc";
		rm.buffer_id = 77;
		env.body_case = COMMPB__ENVELOPE__BODY_REGISTER_MEM;
		env.register_mem = &rm;
	} else {
		s.mem_id = 1;
		s.offset = 1ull << 33;
		r.mem_id = 2;
		r.offset = 4096;
		op.seq = 1;
		op.type = T(REDUCE);
		op.send = &s;
		op.recv = &r;
		op.count = 1u << 20;
		op.dtype = COMM_FLOAT32;
		op.redop = COMM_MAX;
		op.root = 0;
		op.group = 1;
		op.group_last = 1;
		op.ready_event.data = event;
		op.ready_event.len = sizeof event;
		env.body_case = COMMPB__ENVELOPE__BODY_OP;
		env.op = &op;
	}
	len = frame_pack(&env, &frame);
	REQUIRE(len > FRAME_HDR, "pack");
	*out = malloc(len - FRAME_HDR);
	REQUIRE(*out, "malloc");
	memcpy(*out, frame + FRAME_HDR, len - FRAME_HDR);
	free(frame);
	return len - FRAME_HDR;
}

/*
 * D1: a few hundred malformed envelopes inside right length prefixes, each
 * on a new connection, before hello or after it (some with a buffer
 * registered, to release): random bytes, the templates truncated, and the
 * templates with a byte spoiled. Only bytes that fail to unpack here are
 * sent. Each: PROTOCOL "malformed", closed. The daemon's RSS does not creep.
 */
static void row_d1(struct th_daemon *d)
{
	uint8_t *tpl[3], buf[256];
	size_t tlen[3];
	int sent = 0, skipped = 0, failed = 0, by_kind[3] = { 0 };
	long rss0 = status_kb(d->pid, "VmRSS:"), rss1, t0 = mx_now_ms();

	rng_state = 0xd1d1d1d1cafef00dull;
	for (int i = 0; i < 3; i++) {
		tlen[i] = d1_template(i, &tpl[i]);
		REQUIRE(tlen[i] <= sizeof buf, "template %d: %zu bytes", i, tlen[i]);
	}
	for (int v = 0; sent < 300 && v < 3000; v++) {
		int kind = v % 3, which = (v / 3) % 3, hello = v % 2, with_mem = v % 4 == 1;
		size_t len;
		struct rc c;
		char det[256], job[32];

		if (kind == 0) { /* random bytes */
			len = 1 + rnd() % 200;
			for (size_t i = 0; i < len; i++)
				buf[i] = (uint8_t)rnd();
		} else if (kind == 1) { /* a template truncated */
			len = 1 + rnd() % (tlen[which] - 1);
			memcpy(buf, tpl[which], len);
		} else { /* a template with a byte spoiled */
			len = tlen[which];
			memcpy(buf, tpl[which], len);
			buf[rnd() % len] = (uint8_t)rnd();
		}
		if (unpacks(buf, len)) {
			skipped++;
			continue;
		}
		if (hello) {
			snprintf(job, sizeof job, "d1-%d", v);
			if (join(d, job, 1, &c) < 0) {
				rc_close(&c);
				failed++;
				continue;
			}
			if (with_mem) {
				int mfd = memfd_new("cdt-d1", 4096, F_SEAL_SHRINK);

				failed += reg(&c, mfd, 4096, NULL, det, sizeof det) != COMM_OK;
				close(mfd);
			}
		} else {
			rc_open(&c, d);
		}
		CHECK(send_payload(c.fd, buf, len) == 0, "send");
		{
			int f0 = check_failures;

			expect_closed(&c, COMM_ERR_PROTOCOL, "malformed", "a malformed envelope",
				      det, sizeof det);
			failed += check_failures != f0;
			if (check_failures != f0 && failed > 5) {
				rc_close(&c);
				break;
			}
		}
		if (sent == 0)
			mx_note("D1: %s", det);
		rc_close(&c);
		sent++;
		by_kind[kind]++;
	}
	rss1 = status_kb(d->pid, "VmRSS:");
	CHECK(sent >= 300, "only %d malformed envelopes sent", sent);
	CHECK(failed == 0, "%d of them not answered as they should be", failed);
	CHECK(rss1 - rss0 < 16 * 1024, "commd's RSS grew from %ld to %ld kB", rss0, rss1);
	mx_note("D1: %d malformed envelopes (%d random, %d truncated, %d spoiled; %d that unpacked "
		"skipped) in %.1f s; RSS %ld -> %ld kB",
		sent, by_kind[0], by_kind[1], by_kind[2], skipped, (mx_now_ms() - t0) / 1000.0,
		rss0, rss1);
	for (int i = 0; i < 3; i++)
		free(tpl[i]);
}

/*
 * D2: length prefixes of 64 KiB + 1, 2^31 - 1 and 2^32 - 1, before hello
 * and after it, alone or with some bytes behind: PROTOCOL "over the
 * limit", closed, and commd's RSS, peak RSS and peak virtual size did not
 * grow by anything like the claim. 64 KiB exactly is taken as a length
 * (and its 64 KiB of junk then refused as malformed).
 */
static void row_d2(struct th_daemon *d)
{
	static const uint32_t lens[] = { 64 * 1024 + 1, 0x7fffffffu, 0xffffffffu };
	long rss0 = status_kb(d->pid, "VmRSS:"), hwm0 = status_kb(d->pid, "VmHWM:");
	long peak0 = status_kb(d->pid, "VmPeak:"), rss1, hwm1, peak1;
	static uint8_t junk[64 * 1024];
	char det[256];

	memset(junk, 0xff, sizeof junk);
	for (int i = 0; i < 3; i++)
		for (int k = 0; k < 4; k++) {
			uint8_t hdr[4] = { (uint8_t)lens[i], (uint8_t)(lens[i] >> 8),
					   (uint8_t)(lens[i] >> 16), (uint8_t)(lens[i] >> 24) };
			char what[96];
			struct rc c;

			if (k & 1) {
				if (join(d, "d2", 1, &c) < 0) {
					rc_close(&c);
					continue;
				}
			} else {
				rc_open(&c, d);
			}
			CHECK(send_raw(c.fd, hdr, 4) == 0, "send");
			/* with bytes behind it: a send the closing daemon refuses is fine */
			if (k & 2)
				send_raw(c.fd, junk, 4096);
			snprintf(what, sizeof what, "length prefix %u%s%s", lens[i],
				 k & 1 ? " after hello" : "", k & 2 ? " and 4 KiB" : "");
			expect_closed(&c, COMM_ERR_PROTOCOL, "over the limit", what, det,
				      sizeof det);
			if (i == 2 && k == 0)
				mx_note("D2: %s", det);
			rc_close(&c);
		}
	{
		struct rc c;

		rc_open(&c, d);
		CHECK(send_payload(c.fd, junk, sizeof junk) == 0, "send");
		expect_closed(&c, COMM_ERR_PROTOCOL, "malformed", "64 KiB of junk", det,
			      sizeof det);
		mx_note("D2: length 65536: %s", det);
		rc_close(&c);
	}
	rss1 = status_kb(d->pid, "VmRSS:");
	hwm1 = status_kb(d->pid, "VmHWM:");
	peak1 = status_kb(d->pid, "VmPeak:");
	CHECK(rss1 - rss0 < 16 * 1024 && hwm1 - hwm0 < 16 * 1024,
	      "commd's RSS grew: %ld -> %ld kB, peak %ld -> %ld kB", rss0, rss1, hwm0, hwm1);
	CHECK(peak1 - peak0 < 1024 * 1024, "commd's peak virtual size grew: %ld -> %ld kB", peak0,
	      peak1);
	mx_note("D2: RSS %ld -> %ld kB, peak RSS %ld -> %ld kB, peak virtual %ld -> %ld kB", rss0,
		rss1, hwm0, hwm1, peak0, peak1);
}

/*
 * D3: five connections at once: after hello, 2 bytes of a length; after
 * hello, a length and half its message; after hello, a message trickled a
 * byte every 250 ms; before hello, nothing; before hello, half a hello.
 * Each closed with TIMEOUT naming its deadline, about FRAME_MS (or
 * HANDSHAKE_MS) after it began: not before, and not much after.
 */
static void row_d3(struct th_daemon *d)
{
	enum { HALF_LEN, HALF_MSG, TRICKLE, SILENT, HALF_HELLO, N };
	static const char *const what[N] = { "half a length", "half a message",
					     "a byte every 250 ms", "silence before hello",
					     "half a hello" };
	static const char *const text[N] = { "frame-timeout", "frame-timeout", "frame-timeout",
					     "handshake-timeout", "handshake-timeout" };
	struct rc c[N];
	long t0[N], t1[N], next_byte = 0;
	uint8_t msg[64];
	int open = N;

	memset(msg, 0x08, sizeof msg); /* field 1 varints: a valid message, were it whole */
	for (int i = 0; i < N; i++) {
		if (i < SILENT) {
			char job[32];

			snprintf(job, sizeof job, "d3-%d", i);
			if (join(d, job, 1, &c[i]) < 0) {
				for (int k = 0; k <= i; k++)
					rc_close(&c[k]);
				return;
			}
		} else {
			rc_open(&c[i], d);
		}
		t1[i] = -1;
	}
	for (int i = 0; i < N; i++) {
		static const uint8_t len64[4] = { 64, 0, 0, 0 };

		t0[i] = mx_now_ms();
		if (i == HALF_LEN)
			CHECK(send_raw(c[i].fd, len64, 2) == 0, "send");
		else if (i == HALF_MSG || i == TRICKLE)
			CHECK(send_raw(c[i].fd, len64, 4) == 0 &&
				      send_raw(c[i].fd, msg, i == HALF_MSG ? 32 : 1) == 0,
			      "send");
		else if (i == HALF_HELLO) {
			uint8_t *tpl, hdr[4];
			size_t len = d1_template(0, &tpl);

			hdr[0] = (uint8_t)len; /* a hello is well under 256 bytes */
			hdr[1] = hdr[2] = hdr[3] = 0;
			CHECK(send_raw(c[i].fd, hdr, 4) == 0 &&
				      send_raw(c[i].fd, tpl, len / 2) == 0,
			      "send");
			free(tpl);
		}
	}
	while (open && mx_now_ms() - t0[0] < 10000) {
		struct pollfd p[N];

		for (int i = 0; i < N; i++)
			p[i] = (struct pollfd){ .fd = t1[i] < 0 ? c[i].fd : -1, .events = POLLIN };
		poll(p, N, 50);
		for (int i = 0; i < N; i++)
			if (t1[i] < 0 && (p[i].revents & (POLLIN | POLLHUP | POLLERR)) &&
			    frame_reader_recv(&c[i].r, c[i].fd) <= 0) {
				t1[i] = mx_now_ms();
				open--;
			}
		if (t1[TRICKLE] < 0 && mx_now_ms() >= next_byte) {
			send_raw(c[TRICKLE].fd, msg, 1);
			next_byte = mx_now_ms() + 250;
		}
	}
	for (int i = 0; i < N; i++) {
		const uint8_t *pl;
		size_t len;
		Commpb__Envelope *e = NULL;
		double s = (t1[i] - t0[i]) / 1000.0;
		long limit = i < SILENT ? FRAME_MS : HANDSHAKE_MS;

		if (frame_next(&c[i].r, &pl, &len) == FRAME_OK)
			e = commpb__envelope__unpack(NULL, len, pl);
		CHECK(t1[i] >= 0, "%s: still open after 10 s", what[i]);
		CHECK(e && e->body_case == COMMPB__ENVELOPE__BODY_ERROR &&
			      e->error->status == COMM_ERR_TIMEOUT &&
			      strstr(e->error->detail, text[i]),
		      "%s: no TIMEOUT naming %s", what[i], text[i]);
		CHECK(t1[i] < 0 || (s >= limit / 1000.0 - 0.3 && s <= limit / 1000.0 + 4.0),
		      "%s: closed after %.2f s, the deadline is %.1f s", what[i], s,
		      limit / 1000.0);
		mx_note("D3: %s: closed after %.2f s (deadline %.1f s): %s", what[i], s,
			limit / 1000.0,
			e && e->body_case == COMMPB__ENVELOPE__BODY_ERROR ? e->error->detail
									  : "no error");
		if (e)
			commpb__envelope__free_unpacked(e, NULL);
		rc_close(&c[i]);
	}
}

/* An Envelope (id 7) with only field `field` (bytes "abc"): a type this daemon does not know. */
static size_t unknown_type(uint8_t *p, unsigned field)
{
	size_t n = 0;
	unsigned tag = field << 3 | 2;

	p[n++] = 0x08;
	p[n++] = 7;
	for (; tag >= 0x80; tag >>= 7)
		p[n++] = (uint8_t)(tag | 0x80);
	p[n++] = (uint8_t)tag;
	p[n++] = 3;
	memcpy(p + n, "abc", 3);
	return n + 3;
}

/* A hello speaking vmin..vmax: the reply's status, version and detail (in det). */
static int hello_versions(struct th_daemon *d, uint32_t vmin, uint32_t vmax, uint32_t *version,
			  char *det, size_t len)
{
	char range[32], job[32];
	Commpb__Envelope *e;
	struct rc c;
	int st = -1;

	snprintf(job, sizeof job, "d5-%u-%u", vmin, vmax);
	snprintf(range, sizeof range, "%d..%d", PROTO_VERSION_MIN, PROTO_VERSION);
	rc_open(&c, d);
	send_hello(c.fd, job, 0, 1, vmin, vmax);
	e = raw_recv(c.fd, &c.r);
	det[0] = '\0';
	if (e && e->body_case == COMMPB__ENVELOPE__BODY_HELLO_REPLY) {
		st = e->hello_reply->status;
		*version = e->hello_reply->version;
		snprintf(det, len, "%s", e->hello_reply->detail);
		CHECK(e->hello_reply->version_min == PROTO_VERSION_MIN &&
			      e->hello_reply->version_max == PROTO_VERSION,
		      "versions %u..%u: the reply gives the range %u..%u", vmin, vmax,
		      e->hello_reply->version_min, e->hello_reply->version_max);
	}
	if (st == COMM_ERR_VERSION) {
		CHECK(strstr(det, range) != NULL,
		      "versions %u..%u: the error does not name %s: '%s'", vmin, vmax, range, det);
		CHECK(raw_closed_by_daemon(c.fd), "versions %u..%u: the connection was kept", vmin,
		      vmax);
	}
	if (e)
		commpb__envelope__free_unpacked(e, NULL);
	rc_close(&c);
	return st;
}

/*
 * D5: an Envelope whose type (oneof field) this daemon does not know,
 * before and after hello: VERSION, naming the range commd speaks, closed.
 * A type it knows but takes from no client (a HelloReply): PROTOCOL,
 * closed. Hellos speaking only older or only newer versions: VERSION with
 * the range (in the reply's fields and its text), closed; overlapping
 * ranges agree on the highest version both speak.
 */
static void row_d5(struct th_daemon *d)
{
	static const uint32_t bad[][2] = { { 0, 0 },
					   { PROTO_VERSION + 1, PROTO_VERSION + 5 },
					   { 100, 200 },
					   { 0xffffffffu, 0xffffffffu } };
	char range[32], det[256];
	uint8_t p[32];
	uint32_t version = 0;
	unsigned next = 10;
	struct rc c;
	int st;

	snprintf(range, sizeof range, "%d..%d", PROTO_VERSION_MIN, PROTO_VERSION);
	/* the first body field number the Envelope does not have */
	while (protobuf_c_message_descriptor_get_field(&commpb__envelope__descriptor, next))
		next++;
	for (int k = 0; k < 4; k++) {
		unsigned field = k & 1 ? next : 99u + 1000u * (unsigned)(k >> 1);

		if (k < 2)
			rc_open(&c, d);
		else if (join(d, k == 2 ? "d5-a" : "d5-b", 1, &c) < 0) {
			rc_close(&c);
			continue;
		}
		CHECK(send_payload(c.fd, p, unknown_type(p, field)) == 0, "send");
		expect_closed(&c, COMM_ERR_VERSION, range, "an unknown message type", det,
			      sizeof det);
		if (k == 0)
			mx_note("D5: unknown type (field %u): %s", field, det);
		rc_close(&c);
	}
	{
		Commpb__Envelope env = COMMPB__ENVELOPE__INIT;
		Commpb__HelloReply hr = COMMPB__HELLO_REPLY__INIT;

		env.body_case = COMMPB__ENVELOPE__BODY_HELLO_REPLY;
		env.hello_reply = &hr;
		rc_open(&c, d);
		raw_send(c.fd, &env, NULL, 0);
		expect_closed(&c, COMM_ERR_PROTOCOL, "hello_reply", "a HelloReply from a client",
			      det, sizeof det);
		mx_note("D5: a HelloReply from a client: %s", det);
		rc_close(&c);
	}
	for (int i = 0; i < 4; i++) {
		st = hello_versions(d, bad[i][0], bad[i][1], &version, det, sizeof det);
		CHECK(st == COMM_ERR_VERSION, "versions %u..%u: %d '%s'", bad[i][0], bad[i][1], st,
		      det);
		if (i < 2)
			mx_note("D5: versions %u..%u: %s", bad[i][0], bad[i][1], det);
	}
	st = hello_versions(d, 0, PROTO_VERSION_MIN, &version, det, sizeof det);
	CHECK(st == COMM_OK && version == PROTO_VERSION_MIN, "versions 0..%d: %d, version %u",
	      PROTO_VERSION_MIN, st, version);
	st = hello_versions(d, PROTO_VERSION_MIN, 1000, &version, det, sizeof det);
	CHECK(st == COMM_OK && version == PROTO_VERSION, "versions %d..1000: %d, version %u",
	      PROTO_VERSION_MIN, st, version);
}

/*
 * D6: requests before hello (an Op, a StatusRequest, a RegisterMem with
 * its memfd): PROTOCOL "before hello", closed, the memfd released. Hello
 * twice, on rank 0 of a formed 2-rank job, naming another job: refused
 * with PROTOCOL "twice"; the connection stays rank 0 of its job (an
 * all-reduce on it is exact afterwards), and the other job was not
 * joined (its rank 0 joins after).
 */
static void row_d6(struct th_daemon *d)
{
	Commpb__Envelope env = COMMPB__ENVELOPE__INIT, *e;
	Commpb__Op op = COMMPB__OP__INIT;
	Commpb__StatusRequest sr = COMMPB__STATUS_REQUEST__INIT;
	Commpb__RegisterMem rm = COMMPB__REGISTER_MEM__INIT;
	struct rc c[2] = { RC_INIT, RC_INIT }, late = RC_INIT;
	struct buf b[2];
	int32_t *v[2] = { NULL, NULL };
	int mfd[2] = { -1, -1 }, wrong = 0;
	struct watch w;
	char det[256];

	op.seq = 1;
	op.type = T(BARRIER);
	for (int k = 0; k < 3; k++) {
		int fd = -1;

		rc_open(&c[0], d);
		if (k == 0) {
			env.body_case = COMMPB__ENVELOPE__BODY_OP;
			env.op = &op;
		} else if (k == 1) {
			env.body_case = COMMPB__ENVELOPE__BODY_STATUS_REQUEST;
			env.status_request = &sr;
		} else {
			watch_init(&w);
			fd = watch_memfd(&w, "cdt-d6");
			rm.size = 4096;
			env.body_case = COMMPB__ENVELOPE__BODY_REGISTER_MEM;
			env.register_mem = &rm;
		}
		raw_send(c[0].fd, &env, &fd, fd >= 0);
		expect_closed(&c[0], COMM_ERR_PROTOCOL, "before hello", "a request before hello",
			      det, sizeof det);
		if (k == 0)
			mx_note("D6: %s", det);
		rc_close(&c[0]);
		if (fd >= 0) {
			close(fd);
			CHECK(watch_wait(&w) == 1,
			      "the memfd sent before hello is still open somewhere");
			watch_free(&w);
		}
	}

	/* hello twice */
	if (join(d, "d6-twice", 2, c) < 0)
		goto out;
	for (int r = 0; r < 2; r++) {
		mfd[r] = memfd_new("cdt-d6-twice", 4096, F_SEAL_SHRINK);
		v[r] = map(mfd[r], 4096);
		for (int i = 0; i < 1024; i++)
			v[r][i] = (r + 1) * i;
		b[r].off = 0;
		CHECK(reg(&c[r], mfd[r], 4096, &b[r].id, det, sizeof det) == COMM_OK,
		      "register: %s", det);
	}
	send_hello(c[0].fd, "d6-other", 0, 1, PROTO_VERSION_MIN, PROTO_VERSION);
	e = raw_recv(c[0].fd, &c[0].r);
	CHECK(e && e->body_case == COMMPB__ENVELOPE__BODY_ERROR &&
		      e->error->status == COMM_ERR_PROTOCOL && strstr(e->error->detail, "twice"),
	      "a second hello: not refused with PROTOCOL");
	mx_note("D6: a second hello: %s",
		e && e->body_case == COMMPB__ENVELOPE__BODY_ERROR ? e->error->detail : "no error");
	if (e)
		commpb__envelope__free_unpacked(e, NULL);
	CHECK(allreduce_all(c, 2, 1, b, 1024) == 0,
	      "the job of a rank refused a second hello: an all-reduce failed");
	for (int i = 0; i < 1024; i++)
		wrong += v[0][i] != 3 * i || v[1][i] != 3 * i;
	CHECK(wrong == 0, "%d wrong elements after a second hello", wrong);
	/* the second hello joined nothing: d6-other's rank 0 is free */
	if (join(d, "d6-other", 1, &late) < 0)
		fprintf(stderr, "D6: the second hello took a rank of the job it named\n");
out:
	for (int r = 0; r < 2; r++) {
		if (v[r])
			munmap(v[r], 4096);
		if (mfd[r] >= 0)
			close(mfd[r]);
		rc_close(&c[r]);
	}
	rc_close(&late);
}

/*
 * Send junk of kind on fd for up to 30 s, stopping once the daemon closes
 * it; returns ms until then (-1: never) and what it sent before closing
 * (its first frame) in rd.
 */
static long flood(int fd, int kind, long *sent, struct frame_reader *rd)
{
	static const char http[] = "GET / HTTP/1.1\r\nHost: commd\r\nAccept: */*\r\n\r\n";
	uint8_t chunk[4096], in[4096];
	long t0 = mx_now_ms();

	*sent = 0;
	for (size_t i = 0; i < sizeof chunk; i++) {
		if (kind == 0)
			chunk[i] = (uint8_t)rnd();
		else if (kind == 1)
			chunk[i] = (uint8_t)http[i % (sizeof http - 1)];
		else /* 16-byte frames of 12 bytes that never unpack */
			chunk[i] = i % 16 == 0 ? 12 : i % 16 < 4 ? 0 : 0xff;
	}
	while (mx_now_ms() - t0 < 30000) {
		struct pollfd p = { .fd = fd, .events = POLLIN | POLLOUT };

		if (poll(&p, 1, 100) <= 0)
			continue;
		if (p.revents & (POLLIN | POLLHUP | POLLERR)) {
			ssize_t n = recv(fd, in, sizeof in, MSG_DONTWAIT);

			if (n > 0)
				frame_reader_feed(rd, in, (size_t)n);
			else if (n == 0 || errno != EAGAIN)
				return mx_now_ms() - t0;
			continue;
		}
		if (p.revents & POLLOUT) {
			ssize_t n = send(fd, chunk, sizeof chunk, MSG_NOSIGNAL | MSG_DONTWAIT);

			if (n > 0)
				*sent += n;
			else if (n < 0 && errno != EAGAIN && errno != EINTR)
				break;
		}
	}
	if (mx_now_ms() - t0 >= 30000)
		return -1;
	/* closed while we sent: what it said first is still to read */
	for (ssize_t n; (n = recv(fd, in, sizeof in, MSG_DONTWAIT)) > 0;)
		frame_reader_feed(rd, in, (size_t)n);
	return mx_now_ms() - t0;
}

/*
 * D7: junk for up to 30 s (random bytes, an HTTP request over and over,
 * frames of a right length that never unpack), before hello and after it:
 * closed at once with PROTOCOL, not when the junk stops; the sender stops
 * when it sees the close.
 */
static void row_d7(struct th_daemon *d)
{
	static const char *const kinds[] = { "random bytes", "HTTP requests", "unpackable frames" };

	CHECK(!unpacks((const uint8_t[]){ 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
					  0xff, 0xff, 0xff },
		       12),
	      "the junk frame unpacks");
	rng_state = 0xd7d7d7d7d7d7d7d7ull;
	for (int k = 0; k < 6; k++) {
		int kind = k % 3, hello = k / 3;
		struct rc c;
		const uint8_t *pl;
		size_t len;
		Commpb__Envelope *e = NULL;
		long sent, ms;

		if (hello) {
			if (join(d, kind == 0 ? "d7-a" : kind == 1 ? "d7-b" : "d7-c", 1, &c) < 0) {
				rc_close(&c);
				continue;
			}
		} else {
			rc_open(&c, d);
		}
		ms = flood(c.fd, kind, &sent, &c.r);
		if (frame_next(&c.r, &pl, &len) == FRAME_OK)
			e = commpb__envelope__unpack(NULL, len, pl);
		CHECK(ms >= 0 && ms < 3000, "%s%s: closed after %ld ms", kinds[kind],
		      hello ? " after hello" : "", ms);
		CHECK(e && e->body_case == COMMPB__ENVELOPE__BODY_ERROR &&
			      e->error->status == COMM_ERR_PROTOCOL,
		      "%s%s: no PROTOCOL error before the close", kinds[kind],
		      hello ? " after hello" : "");
		mx_note("D7: %s%s: closed after %ld ms, %ld bytes sent: %s", kinds[kind],
			hello ? " after hello" : "", ms, sent,
			e && e->body_case == COMMPB__ENVELOPE__BODY_ERROR ? e->error->detail : "-");
		if (e)
			commpb__envelope__free_unpacked(e, NULL);
		rc_close(&c);
	}
}

static const struct mx_row rows[] = {
	{ "C1", "client shrinks a registered memfd", row_c1, 0 },
	{ "C2", "unsealed memfd, pipe, socket, directory, read-only fd offered as a buffer", row_c2,
	  0 },
	{ "C3", "offset + length past the end; count x size overflowing", row_c3, 0 },
	{ "C4", "a buffer id registered by another connection", row_c4, 0 },
	{ "C5", "a buffer freed while an op uses it", row_c5, 0 },
	{ "C6", "100 or 300 fds in one frame; fds on a message that takes none", row_c6, 0 },
	{ "C7", "a job over its registered-memory quota", row_c7, 0 },
	{ "D1", "malformed protobuf (random, truncated)", row_d1, 0 },
	{ "D2", "length prefix of 64 KiB+1, 2^31-1, 2^32-1", row_d2, 0 },
	{ "D3", "half a frame, then silence", row_d3, 0 },
	{ "D5", "unknown message type; protocol version too old or new", row_d5, 0 },
	{ "D6", "op before hello; hello twice", row_d6, 0 },
	{ "D7", "a stream of junk for 30 s", row_d7, 0 },
};

int main(int argc, char **argv)
{
	/* FRAME_MS, HANDSHAKE_MS; 128M: the bystander's two 64 MiB segments fit, exactly */
	static const char *const args[] = { "--frame-timeout", "1500", "--handshake-timeout",
					    "1500", "--max-job-memory", "128M", NULL };
	struct rlimit rl;

	signal(SIGPIPE, SIG_IGN);
	/* C6 holds 300 memfds and has as many in flight */
	if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max && rl.rlim_cur < 4096) {
		rl.rlim_cur = rl.rlim_max < 4096 ? rl.rlim_max : 4096;
		setrlimit(RLIMIT_NOFILE, &rl);
	}
	return mx_main(argc, argv, rows, (int)(sizeof rows / sizeof rows[0]), args);
}
