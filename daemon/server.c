/*
 * server.c: the Unix-socket listener, the daemon-wide state and the tick
 * that enforces deadlines.
 */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "commd.h"
#include "log.h"
#include "util.h"

#define TICK_MS 100

/* The socket file commd bound, so that it removes that one and no other. */
static dev_t bound_dev;
static ino_t bound_ino;

struct server srv = {
	.listen_fd = -1,
	.spare_fd = -1,
	.conns = TAILQ_HEAD_INITIALIZER(srv.conns),
	.jobs = TAILQ_HEAD_INITIALIZER(srv.jobs),
};

/*
 * Out of fds: give up the spare one to accept a client, tell it why it is
 * refused, and take the spare back. The listener stays armed, so a burst of
 * clients is answered, not left waiting in the backlog. 1: one refused; 0:
 * none waiting; -1: no spare fd.
 */
static int shed(void)
{
	Commpb__Envelope env = COMMPB__ENVELOPE__INIT;
	Commpb__Error err = COMMPB__ERROR__INIT;
	uint8_t *frame;
	size_t len;
	int fd;

	if (srv.spare_fd < 0)
		return -1;
	close(srv.spare_fd);
	fd = accept4(srv.listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
	if (fd >= 0) {
		err.status = COMM_ERR_BUSY;
		err.detail = "commd is out of file descriptors (its fd limit): try again later";
		env.body_case = COMMPB__ENVELOPE__BODY_ERROR;
		env.error = &err;
		if ((len = frame_pack(&env, &frame)) > 0) {
			if (send(fd, frame, len, MSG_DONTWAIT | MSG_NOSIGNAL) < 0)
				log_debug("shed: %s", strerror(errno));
			free(frame);
		}
		close(fd);
		srv.shed++;
	}
	srv.spare_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
	return fd >= 0;
}

static void on_accept(uv_poll_t *h, int status, int events)
{
	for (;;) {
		int fd = accept4(srv.listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);

		if (fd < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EMFILE || errno == ENFILE) {
				int rc = shed();

				if (rc > 0)
					continue;
				if (rc < 0) {
					/* no spare either: stop accepting until the next tick, not spin */
					log_warn("accept: out of file descriptors, no spare: not "
						 "accepting for %d ms", TICK_MS);
					uv_poll_stop(&srv.listen_poll);
					srv.accept_paused = 1;
				}
			} else if (errno != EAGAIN && errno != EWOULDBLOCK) {
				log_warn("accept: %s", strerror(errno));
			}
			return;
		}
		if (conn_open(fd) < 0)
			close(fd);
	}
}

/* Ops posted and not yet answered, over every job. */
static uint64_t ops_in_flight(void)
{
	uint64_t left = 0;
	struct job *j;

	TAILQ_FOREACH(j, &srv.jobs, link) {
		left += (uint64_t)j->tasks_out;
		for (int r = 0; r < j->world; r++)
			left += j->nposted[r];
	}
	return left;
}

void server_notify(const char *head)
{
	/* room for the longest: a 107-byte socket path and a 255-byte GPU line */
	static char last[512];
	char line[512], msg[640];
	unsigned jobs = 0, ranks = 0;
	struct job *j;

	TAILQ_FOREACH(j, &srv.jobs, link) {
		jobs++;
		ranks += (unsigned)j->attached;
	}
	if (srv.draining)
		snprintf(line, sizeof line, "draining: %llu ops in flight, %u job%s",
			 (unsigned long long)ops_in_flight(), jobs, jobs == 1 ? "" : "s");
	else
		snprintf(line, sizeof line, "serving %s: host%s%s, gpu: %s; %u job%s, %u rank%s",
			 srv.socket_path, net_available() ? ", net" : "",
			 srv.gpu_state == GPU_READY ? ", gpu" : "", srv.gpu_info, jobs,
			 jobs == 1 ? "" : "s", ranks, ranks == 1 ? "" : "s");
	if (!head && !strcmp(line, last))
		return;
	snprintf(last, sizeof last, "%s", line);
	snprintf(msg, sizeof msg, "%s%sSTATUS=%s", head ? head : "", head ? "\n" : "", line);
	notify_send(msg);
}

static void on_tick(uv_timer_t *t)
{
	/* from the loop itself: a stalled loop stops the pings, and systemd acts */
	if (srv.watchdog_ms && now_ms() - srv.watchdog_last_ms >= srv.watchdog_ms / 2) {
		notify_send("WATCHDOG=1");
		srv.watchdog_last_ms = now_ms();
	}
	if (srv.shed) {
		log_warn("out of file descriptors: refused %llu connection%s",
			 (unsigned long long)srv.shed, srv.shed == 1 ? "" : "s");
		srv.shed = 0;
	}
	if (srv.spare_fd < 0 && srv.listen_fd >= 0)
		srv.spare_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
	if (srv.accept_paused && srv.listen_fd >= 0) {
		srv.accept_paused = 0;
		uv_poll_start(&srv.listen_poll, UV_READABLE, on_accept);
	}
	job_check_deadlines(now_ms());
	conn_check_deadlines(now_ms());
	peer_tick(now_ms());
	if (!srv.stopping)
		server_notify(NULL);
	if (srv.draining && !srv.stopping) {
		uint64_t left = ops_in_flight(), unsent = 0;
		struct conn *c;

		/* and the answers are out of the door before the connections close */
		TAILQ_FOREACH(c, &srv.conns, link)
			unsent += c->wq_bytes;
		if ((!left && !unsent) || now_ms() >= srv.drain_until_ms) {
			if (left)
				log_info("drain: %llu ops still in flight after %u ms: failing them",
					 (unsigned long long)left, srv.drain_ms);
			server_shutdown();
		}
	}
}

/* Make the socket's directory (as /run/commd) when it is missing. */
static int make_parent(const char *path)
{
	char dir[sizeof(((struct sockaddr_un *)0)->sun_path)];
	char *slash;

	snprintf(dir, sizeof dir, "%s", path);
	slash = strrchr(dir, '/');
	if (!slash || slash == dir)
		return 0;
	*slash = '\0';
	if (mkdir(dir, 0755) < 0 && errno != EEXIST) {
		log_error("listen: cannot make %s: %s", dir, strerror(errno));
		return -1;
	}
	return 0;
}

/* Remove a socket file left by a daemon that is gone; refuse a live one. */
static int clear_stale(const char *path)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	struct stat st;
	int fd, rc;

	if (lstat(path, &st) < 0)
		return 0;
	if (!S_ISSOCK(st.st_mode)) {
		log_error("listen: %s exists and is not a socket", path);
		return -1;
	}
	strcpy(sa.sun_path, path);
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -1;
	rc = connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0 ? errno : 0;
	close(fd);
	if (rc == 0) {
		log_error("listen: %s: another commd is serving it", path);
		return -1;
	}
	/* only a refusal says no one listens: EACCES and the like may hide a live daemon */
	if (rc != ECONNREFUSED) {
		log_error("listen: %s: cannot tell whether a daemon serves it: %s", path,
			  strerror(rc));
		return -1;
	}
	if (unlink(path) < 0 && errno != ENOENT) {
		log_error("listen: %s: no daemon answers, and it cannot be removed: %s", path,
			  strerror(errno));
		return -1;
	}
	log_info("listen: %s: no daemon answers: removed it", path);
	return 0;
}

/*
 * The listening Unix socket the service manager passed (LISTEN_FDS: socket
 * activation), made ours: fd 3 with its path in path; 0 when there is none,
 * -1 when what was passed is not one.
 */
static int take_activated(char *path, size_t len)
{
	const char *pid = getenv("LISTEN_PID"), *nfds = getenv("LISTEN_FDS");
	struct sockaddr_un sa;
	socklen_t sl = sizeof sa, il = sizeof(int);
	int type = 0, listening = 0, fd = 3;
	long n = nfds ? strtol(nfds, NULL, 10) : 0;

	if (!pid || strtol(pid, NULL, 10) != (long)getpid() || n < 1)
		return 0;
	unsetenv("LISTEN_PID");
	unsetenv("LISTEN_FDS");
	unsetenv("LISTEN_FDNAMES");
	for (int extra = fd + 1; extra < fd + n; extra++)
		close(extra);
	if (n > 1)
		log_warn("listen: %ld sockets passed; serving the first", n);
	if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &il) < 0 || type != SOCK_STREAM ||
	    getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &il) < 0 || !listening ||
	    getsockname(fd, (struct sockaddr *)&sa, &sl) < 0 || sa.sun_family != AF_UNIX) {
		log_error("listen: the socket passed (fd 3) is not a listening Unix stream socket");
		return -1;
	}
	fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
	fcntl(fd, F_SETFD, FD_CLOEXEC);
	snprintf(path, len, "%.*s", (int)(sl - offsetof(struct sockaddr_un, sun_path)),
		 sa.sun_path);
	srv.listen_fd = fd;
	srv.activated = 1;
	return 1;
}

int server_start(uv_loop_t *loop, const char *path, int64_t gid)
{
	static char activated_path[sizeof(((struct sockaddr_un *)0)->sun_path) + 1];
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	struct stat st;
	int rc;

	srv.loop = loop;
	srv.socket_path = path;
	if ((rc = take_activated(activated_path, sizeof activated_path)) < 0)
		return -1;
	if (rc > 0) {
		srv.socket_path = activated_path;
		log_info("listen: %s, passed by the service manager", activated_path);
		goto serve;
	}
	if (strlen(path) >= sizeof sa.sun_path) {
		log_error("listen: socket path too long: %s", path);
		return -1;
	}
	if (make_parent(path) < 0 || clear_stale(path) < 0)
		return -1;
	strcpy(sa.sun_path, path);
	srv.listen_fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (srv.listen_fd < 0 || bind(srv.listen_fd, (struct sockaddr *)&sa, sizeof sa) < 0 ||
	    (gid >= 0 && chown(path, (uid_t)-1, (gid_t)gid) < 0) ||
	    chmod(path, gid >= 0 ? 0660 : 0666) < 0 || stat(path, &st) < 0 ||
	    listen(srv.listen_fd, 512) < 0) {
		log_error("listen: %s: %s", path, strerror(errno));
		if (srv.listen_fd >= 0)
			close(srv.listen_fd);
		srv.listen_fd = -1;
		return -1;
	}
	bound_dev = st.st_dev;
	bound_ino = st.st_ino;
serve:
	srv.spare_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
	uv_poll_init(loop, &srv.listen_poll, srv.listen_fd);
	uv_poll_start(&srv.listen_poll, UV_READABLE, on_accept);
	uv_timer_init(loop, &srv.tick);
	uv_timer_start(&srv.tick, on_tick, TICK_MS, TICK_MS);
	return 0;
}

static void close_listener(void)
{
	struct stat st;

	if (srv.listen_fd < 0)
		return;
	uv_close((uv_handle_t *)&srv.listen_poll, NULL);
	close(srv.listen_fd);
	/*
	 * An activated socket stays the manager's: clients wait there for the next
	 * commd. The file at the path is removed only if it is still the one bound:
	 * one put in its place since (another commd's) is not ours.
	 */
	if (!srv.activated && lstat(srv.socket_path, &st) == 0) {
		if (st.st_dev == bound_dev && st.st_ino == bound_ino)
			unlink(srv.socket_path);
		else
			log_info("listen: %s is no longer the socket commd bound: left in place",
				 srv.socket_path);
	}
	srv.listen_fd = -1;
	if (srv.spare_fd >= 0)
		close(srv.spare_fd);
	srv.spare_fd = -1;
}

void server_drain(void)
{
	srv.draining = 1;
	srv.drain_until_ms = now_ms() + srv.drain_ms;
	close_listener();
	log_info("drain: %llu ops in flight get up to %u ms to finish; no new ops or joins",
		 (unsigned long long)ops_in_flight(), srv.drain_ms);
	/* after the listener is closed: once the manager reads this, no client is taken */
	server_notify("STOPPING=1");
}

void server_shutdown(void)
{
	server_stop();
	gpu_stop();
	peer_stop();
	net_stop();
}

void server_stop(void)
{
	struct job *j;

	srv.stopping = 1;
	/* every rank hears why, before its connection goes */
	TAILQ_FOREACH(j, &srv.jobs, link)
		job_fail(j, COMM_ERR_SHUTDOWN, "commd is shutting down");
	conn_close_all();
	ring_stop();
	close_listener();
	uv_close((uv_handle_t *)&srv.tick, NULL);
	uv_close((uv_handle_t *)&srv.sig_term, NULL);
	uv_close((uv_handle_t *)&srv.sig_int, NULL);
	uv_close((uv_handle_t *)&srv.sig_hup, NULL);
	/*
	 * Closing them gave the signals their default action back: another
	 * SIGTERM while the workers and the data plane stop would kill commd
	 * (the status a signal's) instead of letting it exit 0.
	 */
	signal(SIGTERM, SIG_IGN);
	signal(SIGINT, SIG_IGN);
	signal(SIGHUP, SIG_IGN);
}
