/*
 * conn.c: one client connection: non-blocking reads into frames, a write
 * queue for replies, and an orderly close that releases what it held.
 */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "commd.h"
#include "log.h"
#include "util.h"

#define FRAMES_PER_TURN 64 /* requests served from one connection per loop turn */

static uint64_t next_conn_id = 1;
static TAILQ_HEAD(, conn) doomed = TAILQ_HEAD_INITIALIZER(doomed);
static uv_idle_t reaper;
static int reaper_ready;
/* connections with whole requests left over from their last turn */
static TAILQ_HEAD(, conn) backlog = TAILQ_HEAD_INITIALIZER(backlog);
static int backlog_len;
static uv_idle_t backlog_idle;
static int backlog_ready;

static void on_backlog(uv_idle_t *h);

static void backlog_add(struct conn *c)
{
	c->backlogged = 1;
	TAILQ_INSERT_TAIL(&backlog, c, backlog_link);
	backlog_len++;
	if (!backlog_ready) {
		uv_idle_init(srv.loop, &backlog_idle);
		uv_unref((uv_handle_t *)&backlog_idle);
		backlog_ready = 1;
	}
	uv_idle_start(&backlog_idle, on_backlog);
}

static void backlog_remove(struct conn *c)
{
	TAILQ_REMOVE(&backlog, c, backlog_link);
	backlog_len--;
	c->backlogged = 0;
}

static void on_io(uv_poll_t *h, int status, int events);

static void set_events(struct conn *c, int events)
{
	if (c->closing || c->events == events)
		return;
	c->events = events;
	uv_poll_start(&c->poll, events, on_io);
}

int conn_is_admin(struct conn *c)
{
	gid_t some[64], *groups = some;
	socklen_t len = sizeof some;

	if (c->admin >= 0)
		return c->admin;
	c->admin = c->uid == 0 || (srv.admin_gid >= 0 && c->gid == (gid_t)srv.admin_gid);
	if (c->admin || srv.admin_gid < 0)
		return c->admin;
	/* or a member by the supplementary groups the process had when it connected */
	if (getsockopt(c->fd, SOL_SOCKET, SO_PEERGROUPS, groups, &len) < 0 &&
	    (errno != ERANGE || !(groups = malloc(len)) ||
	     getsockopt(c->fd, SOL_SOCKET, SO_PEERGROUPS, groups, &len) < 0))
		len = 0;
	for (size_t i = 0; i < len / sizeof *groups && !c->admin; i++)
		c->admin = groups[i] == (gid_t)srv.admin_gid;
	if (groups != some)
		free(groups);
	return c->admin;
}

int conn_open(int fd)
{
	struct conn *c = calloc(1, sizeof *c);
	struct ucred cred;
	socklen_t len = sizeof cred;

	if (!c) {
		log_warn("accept: out of memory, connection refused");
		return -1;
	}
	if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0) {
		free(c);
		return -1;
	}
	c->id = next_conn_id++;
	c->fd = fd;
	c->pid = cred.pid;
	c->uid = cred.uid;
	c->gid = cred.gid;
	c->rank = -1;
	c->admin = -1;
	c->next_mem_id = 1;
	frame_reader_init(&c->rd);
	c->rd.max_len = srv.lim.frame_bytes;
	c->rd.max_fds = srv.lim.fds_per_frame;
	TAILQ_INIT(&c->wq);
	TAILQ_INIT(&c->mems);
	uv_poll_init(srv.loop, &c->poll, fd);
	c->poll.data = c;
	c->opened_ms = now_ms();
	TAILQ_INSERT_TAIL(&srv.conns, c, link);
	srv.nconns++;
	set_events(c, UV_READABLE);
	log_debug("conn %llu: pid %d uid %d connected", (unsigned long long)c->id, (int)c->pid,
		  (int)c->uid);
	if (srv.nconns > srv.lim.conns) {
		conn_fail(c, COMM_ERR_BUSY, "commd has %u connections already (max-connections)",
			  srv.lim.conns);
	} else {
		struct conn *o;
		uint32_t mine = 0;

		TAILQ_FOREACH(o, &srv.conns, link)
			mine += o->uid == c->uid && !o->closing;
		if (mine > srv.lim.conns_per_uid)
			conn_fail(c, COMM_ERR_BUSY,
				  "uid %d has %u connections to commd already (max-connections-per-uid)",
				  (int)c->uid, srv.lim.conns_per_uid);
	}
	return 0;
}

void conn_check_deadlines(uint64_t now)
{
	struct conn *c, *tmp;

	TAILQ_FOREACH_SAFE(c, &srv.conns, link, tmp) {
		if (c->closing || c->doomed)
			continue;
		if (!c->hello_done && now - c->opened_ms >= srv.lim.handshake_ms)
			conn_fail(c, COMM_ERR_TIMEOUT, "no hello within %u ms (handshake-timeout)",
				  srv.lim.handshake_ms);
		else if (c->partial_ms && now - c->partial_ms >= srv.lim.frame_ms)
			conn_fail(c, COMM_ERR_TIMEOUT,
				  "a message begun %llu ms ago is still not whole (frame-timeout)",
				  (unsigned long long)(now - c->partial_ms));
	}
}

static void on_closed(uv_handle_t *h)
{
	free(h->data);
}

void conn_close(struct conn *c, const char *why)
{
	struct wbuf *w;
	struct mem *m;

	if (c->closing)
		return;
	c->closing = 1;
	if (c->doomed)
		TAILQ_REMOVE(&doomed, c, doom_link);
	if (c->backlogged)
		backlog_remove(c);
	log_debug("conn %llu: closed: %s", (unsigned long long)c->id, why);
	if (c->job)
		job_detach(c, COMM_ERR_PEER_LOST, why);
	ring_close(c);
	while ((m = TAILQ_FIRST(&c->mems)))
		mem_release(c, m);
	while ((w = TAILQ_FIRST(&c->wq))) {
		TAILQ_REMOVE(&c->wq, w, link);
		free(w->data);
		free(w);
	}
	frame_reader_free(&c->rd);
	TAILQ_REMOVE(&srv.conns, c, link);
	srv.nconns--;
	uv_close((uv_handle_t *)&c->poll, on_closed);
	close(c->fd);
}

static void on_reap(uv_idle_t *h)
{
	struct conn *c;

	while ((c = TAILQ_FIRST(&doomed)))
		conn_close(c, c->doomed);
	uv_idle_stop(h);
}

void conn_close_all(void)
{
	Commpb__Envelope env = COMMPB__ENVELOPE__INIT;
	Commpb__Error err = COMMPB__ERROR__INIT;
	struct conn *c, *tmp;

	/*
	 * A rank between ops hears why its connection goes, not just its end
	 * (one with ops queued has them answered with the job's failure).
	 */
	err.status = COMM_ERR_SHUTDOWN;
	err.detail = "commd is shutting down";
	env.body_case = COMMPB__ENVELOPE__BODY_ERROR;
	env.error = &err;
	TAILQ_FOREACH_SAFE(c, &srv.conns, link, tmp) {
		if (c->job && c->rank >= 0 && c->rank < c->job->world && !c->job->nposted[c->rank])
			conn_send(c, &env);
		conn_close(c, "daemon shutting down");
	}
	if (reaper_ready)
		uv_close((uv_handle_t *)&reaper, NULL);
	reaper_ready = 0;
	if (backlog_ready)
		uv_close((uv_handle_t *)&backlog_idle, NULL);
	backlog_ready = 0;
}

void conn_doom(struct conn *c, const char *why)
{
	if (c->closing || c->doomed)
		return;
	c->doomed = why;
	TAILQ_INSERT_TAIL(&doomed, c, doom_link);
	if (!reaper_ready) {
		uv_idle_init(srv.loop, &reaper);
		uv_unref((uv_handle_t *)&reaper);
		reaper_ready = 1;
	}
	uv_idle_start(&reaper, on_reap);
}

/* Write what the socket takes; returns -1 on a write error. */
static int flush(struct conn *c)
{
	struct wbuf *w;

	while ((w = TAILQ_FIRST(&c->wq))) {
		int rc = frame_send_some(c->fd, w->data, w->len, &w->off, NULL, 0);

		if (rc < 0)
			return -1;
		if (rc == 0)
			break;
		TAILQ_REMOVE(&c->wq, w, link);
		c->wq_bytes -= w->len;
		free(w->data);
		free(w);
	}
	set_events(c, TAILQ_EMPTY(&c->wq) ? UV_READABLE : UV_READABLE | UV_WRITABLE);
	return 0;
}

/*
 * Out of memory for a reply to request id, which the client would wait for
 * forever: tell it so (a frame on the stack, when nothing is queued before
 * it, if the socket takes it now) and close on the next turn.
 */
static void lost_reply(struct conn *c, uint64_t id)
{
	Commpb__Envelope env = COMMPB__ENVELOPE__INIT;
	Commpb__Error err = COMMPB__ERROR__INIT;
	uint8_t frame[FRAME_HDR + 128];
	size_t n, off = 0;

	log_warn("conn %llu (pid %d): out of memory: a reply was lost, closing",
		 (unsigned long long)c->id, (int)c->pid);
	err.status = COMM_ERR_NO_MEMORY;
	err.detail = "commd is out of memory: a reply was lost";
	env.id = id;
	env.body_case = COMMPB__ENVELOPE__BODY_ERROR;
	env.error = &err;
	n = commpb__envelope__get_packed_size(&env);
	if (TAILQ_EMPTY(&c->wq) && n <= sizeof frame - FRAME_HDR) {
		for (int i = 0; i < FRAME_HDR; i++)
			frame[i] = (uint8_t)(n >> 8 * i); /* little-endian, as frame_pack */
		commpb__envelope__pack(&env, frame + FRAME_HDR);
		frame_send_some(c->fd, frame, FRAME_HDR + n, &off, NULL, 0);
	}
	conn_doom(c, "out of memory: a reply was lost");
}

int conn_send(struct conn *c, const Commpb__Envelope *env)
{
	struct wbuf *w;
	uint8_t *data;
	size_t len;

	if (c->closing || c->doomed)
		return -1;
	len = frame_pack(env, &data);
	if (len == 0 && commpb__envelope__get_packed_size(env) <= FRAME_MAX) {
		lost_reply(c, env->id);
		return -1;
	}
	if (len == 0) {
		log_warn("conn %llu: reply could not be packed", (unsigned long long)c->id);
		return -1;
	}
	if (c->wq_bytes + len > srv.lim.wq_bytes) {
		free(data);
		log_warn("conn %llu (pid %d): write queue over max-write-queue (%llu bytes): the "
			 "client does not read its replies", (unsigned long long)c->id, (int)c->pid,
			 (unsigned long long)srv.lim.wq_bytes);
		conn_doom(c, "write queue full");
		return -1;
	}
	w = calloc(1, sizeof *w);
	if (!w) {
		free(data);
		lost_reply(c, env->id);
		return -1;
	}
	w->data = data;
	w->len = len;
	TAILQ_INSERT_TAIL(&c->wq, w, link);
	c->wq_bytes += len;
	if (flush(c) < 0) {
		conn_doom(c, "write error");
		return -1;
	}
	return 0;
}

/* Log detail and send it in an Error answering request id (0: none in particular). */
static void send_error(struct conn *c, uint64_t id, comm_result_t code, const char *detail)
{
	Commpb__Envelope env = COMMPB__ENVELOPE__INIT;
	Commpb__Error err = COMMPB__ERROR__INIT;

	log_info("conn %llu (pid %d): %s", (unsigned long long)c->id, (int)c->pid, detail);
	err.status = code;
	err.detail = (char *)detail;
	env.id = id;
	env.body_case = COMMPB__ENVELOPE__BODY_ERROR;
	env.error = &err;
	/* Best effort: the reply goes out if the socket takes it now. */
	conn_send(c, &env);
}

void conn_error(struct conn *c, uint64_t id, comm_result_t code, const char *fmt, ...)
{
	char detail[256];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(detail, sizeof detail, fmt, ap);
	va_end(ap);
	send_error(c, id, code, detail);
}

void conn_fail(struct conn *c, comm_result_t code, const char *fmt, ...)
{
	char detail[256];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(detail, sizeof detail, fmt, ap);
	va_end(ap);
	send_error(c, 0, code, detail);
	if (!c->closing)
		conn_close(c, detail);
}

/*
 * Serve c's whole frames, at most *budget of them (taken off it; NULL: all):
 * 1 when whole frames are left for a later turn, -1 when c closed or is
 * doomed, else 0.
 */
static int serve(struct conn *c, int *budget)
{
	const uint8_t *payload;
	size_t len;
	int served = 0, left = 0;

	if (c->closing || c->doomed)
		return -1;
	for (;;) {
		enum frame_status st;

		if (budget && *budget == 0) {
			left = frame_next(&c->rd, &payload, &len) != FRAME_MORE;
			break;
		}
		st = frame_next(&c->rd, &payload, &len);
		if (st == FRAME_MORE)
			break;
		if (st == FRAME_TOO_BIG) {
			conn_fail(c, COMM_ERR_PROTOCOL,
				  "protocol: frame length over the limit of %u bytes (max-frame-size)",
				  c->rd.max_len);
			return -1;
		}
		if (req_dispatch(c, payload, len) < 0 || c->closing) {
			if (!c->closing)
				conn_close(c, "request refused");
			return -1;
		}
		frame_consume(&c->rd, len);
		served++;
		if (budget)
			--*budget;
		if (c->doomed)
			return -1;
	}
	if (!left && c->rd.len == 0 && c->rd.nfds > 0) {
		conn_fail(c, COMM_ERR_PROTOCOL, "protocol: fds sent with a message that takes none");
		return -1;
	}
	/* a message half here: the frame-timeout clock runs until one is whole */
	if (!c->rd.len)
		c->partial_ms = 0;
	else if (served || !c->partial_ms)
		c->partial_ms = now_ms();
	return left;
}

static void on_backlog(uv_idle_t *h)
{
	/* each once, in turn: one served again joins the tail for the next turn */
	for (int n = backlog_len; n > 0 && !TAILQ_EMPTY(&backlog); n--) {
		struct conn *c = TAILQ_FIRST(&backlog);

		int budget = FRAMES_PER_TURN;

		TAILQ_REMOVE(&backlog, c, backlog_link);
		backlog_len--;
		c->backlogged = 0;
		if (serve(c, &budget) > 0)
			backlog_add(c);
	}
	if (TAILQ_EMPTY(&backlog))
		uv_idle_stop(h);
}

/*
 * Read and serve what c sent: a few reads and FRAMES_PER_TURN frames a
 * turn, so that one client pipelining small requests cannot hold the loop
 * (and every other job) up. What is left waits in the backlog, served
 * before c's socket is read again.
 */
static void on_readable(struct conn *c)
{
	int budget = FRAMES_PER_TURN;

	if (c->backlogged)
		return;
	for (int reads = 0; reads < 8 && budget > 0; reads++) {
		long n = frame_reader_recv(&c->rd, c->fd);
		int rc;

		if (n == -EAGAIN || n == -EWOULDBLOCK)
			return;
		if (n == -ENOMEM) {
			conn_fail(c, COMM_ERR_NO_MEMORY,
				  "commd is out of memory: no room to read this message");
			return;
		}
		if (n == -EPROTO) {
			conn_fail(c, COMM_ERR_PROTOCOL,
				  "protocol: more than %d fds in one message (max-fds-per-frame), or "
				  "more than %d waiting", c->rd.max_fds, FRAME_FDS_CAP);
			return;
		}
		if (n <= 0) {
			conn_close(c, n == 0 ? "connection closed by the client" : strerror((int)-n));
			return;
		}
		rc = serve(c, &budget);
		if (rc) {
			if (rc > 0)
				backlog_add(c);
			return;
		}
	}
}

/*
 * The socket failed: what c sent before is served first, all of it (a
 * Leave among it is a clean leave), then c closes.
 */
static void on_failed(struct conn *c, const char *why)
{
	if (c->backlogged)
		backlog_remove(c);
	for (int i = 0; i < 1024 && !c->closing && !c->doomed; i++) {
		long n = frame_reader_recv(&c->rd, c->fd);

		if (n <= 0 || serve(c, NULL) < 0)
			break;
	}
	if (!c->closing && !c->doomed && serve(c, NULL) >= 0)
		conn_close(c, why);
}

static void on_io(uv_poll_t *h, int status, int events)
{
	struct conn *c = h->data;

	if (c->closing || c->doomed)
		return;
	if (status < 0) {
		/*
		 * An error on the socket (libuv says EBADF for any POLLERR): a
		 * client that closed with replies unread leaves ECONNRESET here.
		 * What it sent before, a Leave included, is read first: the
		 * kernel hands it over before the error.
		 */
		on_failed(c, uv_strerror(status));
		return;
	}
	if ((events & UV_WRITABLE) && flush(c) < 0) {
		conn_close(c, "write error");
		return;
	}
	if (events & (UV_READABLE | UV_DISCONNECT))
		on_readable(c);
}
