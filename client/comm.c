/*
 * comm.c: joining a job, the connection to commd (send, read, wait for a
 * reply) and leaving. The library never prints and never exits.
 */
#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "comm-int.h"
#include "util.h"

#define JOB_NAME_LIMIT 255 /* commd's longest job name */

COMM_API comm_config_t comm_config_default(void)
{
	comm_config_t cfg = COMM_CONFIG_INIT;

	return cfg;
}

COMM_API int comm_rank(const comm_t *c)
{
	return c ? c->rank : -1;
}

COMM_API int comm_size(const comm_t *c)
{
	return c ? c->size : -1;
}

/* Why the calling thread's last comm_init failed. */
static __thread char init_error[256];

COMM_API const char *comm_last_error(const comm_t *c)
{
	return c ? c->last_error : init_error;
}

comm_result_t comm_set_error(comm_t *c, comm_result_t rc, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(c->last_error, sizeof c->last_error, fmt, ap);
	va_end(ap);
	c->last_rc = rc;
	return rc;
}

comm_result_t comm_refuse(comm_t *c, const char *what)
{
	return comm_set_error(c, c->broken, "%s: %s", what,
			      c->forked ? c->forked_why : "the connection to commd is gone");
}

/*
 * The process's live comms (from their connect on), for fork(): a child's
 * copy of a comm is its parent's rank (its connection, ring and registered
 * memory), so the child closes its copies of the connection's fds at once
 * (commd sees the rank go when the parent goes, not when the last child
 * does) and every use of the copy is refused but comm_finalize and
 * comm_abort, which free the child's copy and tell commd nothing. Only the
 * forking thread lives on in the child: a family lock another thread held
 * is made anew.
 */
static pthread_mutex_t live_lock = PTHREAD_MUTEX_INITIALIZER;
static comm_t *live;
static pthread_once_t live_once = PTHREAD_ONCE_INIT;

static void fork_prepare(void)
{
	pthread_mutex_lock(&live_lock);
}

static void fork_parent(void)
{
	pthread_mutex_unlock(&live_lock);
}

static void fork_child(void)
{
	for (comm_t *c = live; c; c = c->live_next) {
		if (c->fd >= 0)
			close(c->fd);
		c->fd = -1;
		ring_detach(c);
		if (c->fam)
			pthread_mutex_init(&c->fam->lock, NULL);
		c->forked = 1;
		c->broken = COMM_ERR_INVALID_ARG;
		snprintf(c->forked_why, sizeof c->forked_why,
			 "this communicator is process %d's (rank %d of job %s); a process forked "
			 "from it cannot use it (comm_finalize frees the copy)",
			 (int)getppid(), c->rank, c->job ? c->job : "?");
		snprintf(c->last_error, sizeof c->last_error, "%s", c->forked_why);
		c->last_rc = c->broken;
	}
	pthread_mutex_unlock(&live_lock);
}

static void live_init(void)
{
	pthread_atfork(fork_prepare, fork_parent, fork_child);
}

static void live_add(comm_t *c)
{
	pthread_once(&live_once, live_init);
	pthread_mutex_lock(&live_lock);
	c->live_next = live;
	live = c;
	pthread_mutex_unlock(&live_lock);
}

static void live_remove(comm_t *c)
{
	pthread_mutex_lock(&live_lock);
	for (comm_t **p = &live; *p; p = &(*p)->live_next) {
		if (*p == c) {
			*p = c->live_next;
			break;
		}
	}
	pthread_mutex_unlock(&live_lock);
}

/* The connection is gone or unusable: every outstanding request fails. */
static comm_result_t comm_break(comm_t *c, comm_result_t rc, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
static comm_result_t comm_break(comm_t *c, comm_result_t rc, const char *fmt, ...)
{
	va_list ap;

	if (c->broken != COMM_OK)
		return c->broken;
	va_start(ap, fmt);
	vsnprintf(c->last_error, sizeof c->last_error, fmt, ap);
	va_end(ap);
	c->last_rc = rc;
	c->broken = rc;
	req_fail_all(c, rc);
	return rc;
}

static void handle(comm_t *c, Commpb__Envelope *env)
{
	if (env->body_case == COMMPB__ENVELOPE__BODY_OP_DONE && env->id == 0) {
		/* a ring op, answered on the socket because we slept */
		for (comm_request_t *r = c->reqs; r; r = r->next) {
			if (r->ring && !r->done && r->seq == env->op_done->seq) {
				ring_complete(r, env->op_done->status, env->op_done->detail);
				break;
			}
		}
	} else if (env->body_case == COMMPB__ENVELOPE__BODY_OP_DONE) {
		for (comm_request_t *r = c->reqs; r; r = r->next) {
			if (r->id == env->id) {
				r->done = 1;
				r->rc = err_known(env->op_done->status) ? env->op_done->status
									: COMM_ERR_PROTOCOL;
				if (r->rc != COMM_OK)
					comm_set_error(c, r->rc, "%s", env->op_done->detail);
				req_done(r);
				break;
			}
		}
	} else if (env->body_case == COMMPB__ENVELOPE__BODY_ERROR) {
		comm_break(c, err_known(env->error->status) ? env->error->status
							    : COMM_ERR_PROTOCOL,
			   "commd: %s", env->error->detail);
	} else if (c->await_id && env->id == c->await_id && !c->await_reply) {
		c->await_reply = env;
		return;
	}
	commpb__envelope__free_unpacked(env, NULL);
}

comm_result_t comm_pump(comm_t *c, int timeout_ms)
{
	struct pollfd pfd = { .fd = c->fd, .events = POLLIN };
	const uint8_t *payload;
	size_t len;
	long n;
	int rc;

	if (c->broken != COMM_OK)
		return c->broken;
	/* a signal ends a wait with a limit: the caller counts the time left */
	do
		rc = poll(&pfd, 1, timeout_ms);
	while (rc < 0 && errno == EINTR && timeout_ms < 0);
	if (rc < 0 && errno == EINTR)
		return COMM_OK;
	if (rc < 0)
		return comm_break(c, COMM_ERR_DAEMON_UNREACHABLE, "waiting for commd: %s",
				  strerror(errno));
	if (rc == 0)
		return COMM_OK;
	n = frame_reader_recv(&c->rd, c->fd);
	if (n == -EAGAIN)
		return COMM_OK;
	if (n == 0)
		return comm_break(c, COMM_ERR_DAEMON_UNREACHABLE, "commd closed the connection");
	if (n < 0)
		return comm_break(c, COMM_ERR_DAEMON_UNREACHABLE, "reading from commd: %s",
				  strerror((int)-n));
	for (;;) {
		enum frame_status st = frame_next(&c->rd, &payload, &len);
		Commpb__Envelope *env;

		if (st == FRAME_MORE)
			break;
		if (st == FRAME_TOO_BIG)
			return comm_break(c, COMM_ERR_PROTOCOL, "commd sent an oversized frame");
		env = commpb__envelope__unpack(NULL, len, payload);
		frame_consume(&c->rd, len);
		if (!env)
			return comm_break(c, COMM_ERR_PROTOCOL, "commd sent a malformed message");
		handle(c, env);
	}
	return c->broken;
}

static comm_result_t send_frame(comm_t *c, Commpb__Envelope *env, const int *fds, int nfds)
{
	uint8_t *frame;
	size_t len;
	int rc;

	if (c->broken != COMM_OK)
		return c->broken;
	env->id = c->next_id++;
	len = frame_pack(env, &frame);
	if (!len)
		return comm_break(c, COMM_ERR_NO_MEMORY, "packing a request failed");
	rc = frame_send_all(c->fd, frame, len, fds, nfds);
	free(frame);
	if (rc < 0) {
		comm_pump(c, 0); /* what commd said before it closed the connection, if anything */
		return comm_break(c, COMM_ERR_DAEMON_UNREACHABLE, "writing to commd: %s",
				  strerror(-rc));
	}
	return COMM_OK;
}

comm_result_t comm_send_env(comm_t *c, Commpb__Envelope *env)
{
	return send_frame(c, env, NULL, 0);
}

/*
 * How long libcomm waits for commd's answer to a request: the job's
 * deadline and CALL_SLACK_MS more, commd answering a join (or anything) by
 * then, but never less than CALL_MIN_MS (COMM_DAEMON_WAIT), the time a
 * commd that systemd (re)starts under its socket may take to be ready (its
 * GPU probe alone may take a minute). Past it, commd is stopped or hung.
 */
#define CALL_SLACK_MS 5000
#define CALL_MIN_MS 90000

/* CALL_MIN_MS, or COMM_DAEMON_WAIT (ms, 1..86400000) where it is set. */
static int call_min_ms(void)
{
	const char *v = getenv("COMM_DAEMON_WAIT");
	char *end;
	long ms;

	if (!v || !*v)
		return CALL_MIN_MS;
	errno = 0;
	ms = strtol(v, &end, 10);
	return errno || *end || ms < 1 || ms > 86400000 ? CALL_MIN_MS : (int)ms;
}

comm_result_t comm_call(comm_t *c, Commpb__Envelope *env, const int *fds, int nfds,
			Commpb__Envelope **reply)
{
	comm_result_t rc = send_frame(c, env, fds, nfds);
	int limit = c->timeout_ms > 0 && c->timeout_ms < INT_MAX - CALL_SLACK_MS
			    ? c->timeout_ms + CALL_SLACK_MS
			    : -1;
	int floor_ms = call_min_ms();
	uint64_t start = now_ms();

	if (limit > 0 && limit < floor_ms)
		limit = floor_ms;

	*reply = NULL;
	if (rc != COMM_OK)
		return rc;
	c->await_id = env->id;
	c->await_reply = NULL;
	while (!c->await_reply && c->broken == COMM_OK) {
		int left = -1;

		if (limit > 0) {
			uint64_t spent = now_ms() - start;

			if (spent >= (uint64_t)limit) {
				comm_break(c, COMM_ERR_TIMEOUT,
					   "commd did not answer within %d ms (is it stopped or hung?)",
					   limit);
				break;
			}
			left = limit - (int)spent;
		}
		comm_pump(c, left);
	}
	c->await_id = 0;
	*reply = c->await_reply;
	c->await_reply = NULL;
	return *reply ? COMM_OK : c->broken;
}

/* The first variable of names that is set and non-empty, or NULL. */
static const char *env_first(const char *const *names)
{
	for (; *names; names++) {
		const char *v = getenv(*names);

		if (v && *v)
			return v;
	}
	return NULL;
}

static int env_int(const char *const *names, int *out)
{
	const char *v = env_first(names);
	char *end;
	long n;

	if (!v)
		return 0;
	errno = 0;
	n = strtol(v, &end, 10);
	if (errno || *end || n < 0 || n > 1 << 30)
		return -1;
	*out = (int)n;
	return 1;
}

/* The job name: ours, then torchrun's, Slurm's, Open MPI's (PMIx). */
static const char *job_from_env(char *buf, size_t len)
{
	const char *v, *port;

	if ((v = getenv("COMM_JOB")) && *v)
		return v;
	if ((v = getenv("TORCHELASTIC_RUN_ID")) && *v && strcmp(v, "none") != 0) {
		snprintf(buf, len, "torchrun-%s", v);
		return buf;
	}
	if ((v = getenv("MASTER_ADDR")) && *v && (port = getenv("MASTER_PORT")) && *port) {
		snprintf(buf, len, "torchrun-%s:%s", v, port);
		return buf;
	}
	if ((v = getenv("SLURM_JOB_ID")) && *v) {
		const char *step = getenv("SLURM_STEP_ID");

		snprintf(buf, len, "slurm-%s.%s", v, step && *step ? step : "0");
		return buf;
	}
	if ((v = getenv("PMIX_NAMESPACE")) && *v) {
		snprintf(buf, len, "pmix-%s", v);
		return buf;
	}
	return NULL;
}

/*
 * The root daemon of a job on several nodes: COMM_ROOT, else under torchrun
 * with ranks on other nodes too, MASTER_ADDR:COMM_ROOT_PORT (default 29600).
 */
static const char *root_from_env(char *buf, size_t len)
{
	const char *v = getenv("COMM_ROOT"), *local = getenv("LOCAL_WORLD_SIZE");
	const char *world = getenv("WORLD_SIZE"), *master = getenv("MASTER_ADDR");
	const char *port = getenv("COMM_ROOT_PORT");

	if (v)
		return v;
	if (!local || !world || !master || !*master || atoi(local) >= atoi(world))
		return "";
	snprintf(buf, len, "%s:%s", master, port && *port ? port : "29600");
	return buf;
}

static comm_result_t resolve_config(const comm_config_t *in, comm_config_t *out, char *jobbuf,
				    size_t joblen, char *rootbuf, size_t rootlen, char *err,
				    size_t errlen)
{
	static const char *const rank_vars[] = { "COMM_RANK", "RANK", "OMPI_COMM_WORLD_RANK",
						 "PMI_RANK", "SLURM_PROCID", NULL };
	static const char *const size_vars[] = { "COMM_WORLD_SIZE", "WORLD_SIZE",
						 "OMPI_COMM_WORLD_SIZE", "PMI_SIZE",
						 "SLURM_NTASKS", NULL };
	static const char *const timeout_vars[] = { "COMM_TIMEOUT", NULL };
	comm_config_t none = COMM_CONFIG_INIT;
	const char *v;
	int rc;

	if (!in)
		in = &none;
	*out = *in;
	if (!out->socket)
		out->socket = (v = getenv("COMM_SOCKET")) && *v ? v : COMM_DEFAULT_SOCKET;
	if (!out->job && !(out->job = job_from_env(jobbuf, joblen))) {
		snprintf(err, errlen, "init: no job name: set COMM_JOB (or run under commrun, "
				      "torchrun, Slurm or Open MPI)");
		return COMM_ERR_INVALID_ARG;
	}
	if (!out->token)
		out->token = (v = getenv("COMM_TOKEN")) ? v : "";
	if (out->rank < 0 && (rc = env_int(rank_vars, &out->rank)) <= 0) {
		snprintf(err, errlen, rc ? "init: the rank in the environment is not a number"
					 : "init: no rank: set COMM_RANK (or the launcher's RANK)");
		return COMM_ERR_INVALID_ARG;
	}
	if (out->world_size < 0 && (rc = env_int(size_vars, &out->world_size)) <= 0) {
		snprintf(err, errlen, rc ? "init: the world size in the environment is not a number"
					 : "init: no world size: set COMM_WORLD_SIZE");
		return COMM_ERR_INVALID_ARG;
	}
	if (!out->root)
		out->root = root_from_env(rootbuf, rootlen);
	if (out->timeout_ms == 0 && env_int(timeout_vars, &out->timeout_ms) < 0) {
		snprintf(err, errlen, "init: COMM_TIMEOUT is not a number of milliseconds");
		return COMM_ERR_INVALID_ARG;
	}
	if (out->world_size < 1) {
		snprintf(err, errlen, "init: world size %d: must be at least 1", out->world_size);
		return COMM_ERR_INVALID_ARG;
	}
	if (out->rank >= out->world_size) {
		snprintf(err, errlen, "init: rank %d is not in 0..%d", out->rank,
			 out->world_size - 1);
		return COMM_ERR_INVALID_ARG;
	}
	if (out->timeout_ms < 0) {
		snprintf(err, errlen, "init: timeout %d ms is negative", out->timeout_ms);
		return COMM_ERR_INVALID_ARG;
	}
	return COMM_OK;
}

/* What path is when it exists and is not a socket ("a directory"); NULL otherwise. */
static const char *not_a_socket(const char *path)
{
	struct stat st;

	if (stat(path, &st) < 0 || S_ISSOCK(st.st_mode))
		return NULL;
	return S_ISDIR(st.st_mode) ? "a directory" : S_ISREG(st.st_mode) ? "a file" : "not a socket";
}

/*
 * Connect c to commd at path: c->fd is the socket from its making on, set
 * under live_lock, so that a fork meanwhile closes it in the child.
 * COMM_OK; COMM_ERR_INVALID_ARG for a path no Unix socket can have (the
 * caller's mistake), else COMM_ERR_DAEMON_UNREACHABLE; the reason in err.
 */
static comm_result_t connect_to(comm_t *c, const char *path, char *err, size_t errlen)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	const char *kind;
	int rc = 0, e;

	if (strlen(path) >= sizeof sa.sun_path) {
		snprintf(err, errlen, "init: socket path too long (%zu bytes, at most %zu): %s",
			 strlen(path), sizeof sa.sun_path - 1, path);
		return COMM_ERR_INVALID_ARG;
	}
	strcpy(sa.sun_path, path);
	pthread_mutex_lock(&live_lock);
	c->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	pthread_mutex_unlock(&live_lock);
	/* a Unix socket's connect interrupted (commd's backlog full) left it unconnected */
	while (c->fd >= 0 && (rc = connect(c->fd, (struct sockaddr *)&sa, sizeof sa)) < 0 &&
	       errno == EINTR)
		;
	if (c->fd >= 0 && rc == 0)
		return COMM_OK;
	e = errno;
	/* a directory or file there: ECONNREFUSED, as from a socket no daemon serves */
	if ((kind = not_a_socket(path)))
		snprintf(err, errlen,
			 "init: connect %s: is not a socket (%s): set COMM_SOCKET, or commrun "
			 "--socket, to commd's socket",
			 path, kind);
	else
		snprintf(err, errlen,
			 "init: connect %s: %s (is commd running? set COMM_SOCKET, or commrun "
			 "--socket, to its socket)",
			 path, strerror(e));
	pthread_mutex_lock(&live_lock);
	if (c->fd >= 0)
		close(c->fd);
	c->fd = -1;
	pthread_mutex_unlock(&live_lock);
	return COMM_ERR_DAEMON_UNREACHABLE;
}

static void comm_free(comm_t *c)
{
	live_remove(c);
	if (!c->forked) /* a fork's child cannot use its parent's CUDA state */
		gpu_free_all(c, 0);
	ring_detach(c);
	free(c->group);
	req_free_all(c);
	mem_family_leave(c);
	mem_free_all(c);
	free(c->socket_path);
	free(c->job);
	free(c->token);
	free(c->root);
	frame_reader_free(&c->rd);
	if (c->fd >= 0)
		close(c->fd);
	free(c);
}

/*
 * comm_init, with the join's own deadline (0: the op deadline's) where
 * comm_split needs it shorter.
 */
static comm_result_t join(comm_t **out, const comm_config_t *config, uint32_t join_timeout_ms)
{
	Commpb__Envelope env = COMMPB__ENVELOPE__INIT, *reply = NULL;
	Commpb__Hello hello = COMMPB__HELLO__INIT;
	comm_config_t cfg;
	char jobbuf[256], rootbuf[300];
	comm_result_t rc;
	comm_t *c;

	if (!out)
		return COMM_ERR_INVALID_ARG;
	*out = NULL;
	c = calloc(1, sizeof *c);
	if (!c) {
		snprintf(init_error, sizeof init_error, "init: out of memory");
		return COMM_ERR_NO_MEMORY;
	}
	c->fd = -1;
	c->ring_efd = -1;
	c->next_id = 1;
	c->next_seq = 1;
	mem_init(c);
	frame_reader_init(&c->rd);
	rc = resolve_config(config, &cfg, jobbuf, sizeof jobbuf, rootbuf, sizeof rootbuf,
			    c->last_error, sizeof c->last_error);
	if (rc != COMM_OK)
		goto out;
	/* kept for comm_split; before the hello, so that a shortage fails no job */
	c->timeout_ms = cfg.timeout_ms;
	if (!(c->socket_path = strdup(cfg.socket)) || !(c->job = strdup(cfg.job)) ||
	    !(c->token = strdup(cfg.token)) || !(c->root = strdup(cfg.root))) {
		rc = comm_set_error(c, COMM_ERR_NO_MEMORY, "init: out of memory");
		goto out;
	}
	live_add(c); /* a fork while it joins leaves the child no connection either */
	rc = connect_to(c, cfg.socket, c->last_error, sizeof c->last_error);
	if (rc != COMM_OK)
		goto out;
	hello.version_min = PROTO_VERSION_MIN;
	hello.version_max = PROTO_VERSION;
	hello.role = COMMPB__ROLE__ROLE_RANK;
	hello.job = (char *)cfg.job;
	hello.token.data = (uint8_t *)cfg.token;
	hello.token.len = strlen(cfg.token);
	hello.rank = cfg.rank;
	hello.world_size = cfg.world_size;
	hello.timeout_ms = (uint32_t)cfg.timeout_ms;
	hello.root = (char *)cfg.root;
	hello.join_timeout_ms = join_timeout_ms;
	env.body_case = COMMPB__ENVELOPE__BODY_HELLO;
	env.hello = &hello;
	rc = comm_call(c, &env, NULL, 0, &reply);
	if (rc != COMM_OK)
		goto out;
	if (reply->body_case != COMMPB__ENVELOPE__BODY_HELLO_REPLY) {
		rc = comm_set_error(c, COMM_ERR_PROTOCOL, "init: unexpected answer to hello");
		goto out;
	}
	rc = err_known(reply->hello_reply->status) ? reply->hello_reply->status
						    : COMM_ERR_PROTOCOL;
	if (rc != COMM_OK) {
		comm_set_error(c, rc, "%s", reply->hello_reply->detail);
		goto out;
	}
	c->rank = cfg.rank;
	c->size = cfg.world_size;
	c->version = reply->hello_reply->version;
	if (reply->hello_reply->timeout_ms) /* the daemon's default, where cfg left it to it */
		c->timeout_ms = (int)reply->hello_reply->timeout_ms;
	ring_attach(c);
	if (c->broken != COMM_OK) {
		rc = c->broken;
		goto out;
	}
	*out = c;
out:
	if (reply)
		commpb__envelope__free_unpacked(reply, NULL);
	if (rc != COMM_OK) {
		snprintf(init_error, sizeof init_error, "%s", c->last_error);
		comm_free(c);
	}
	return rc;
}

COMM_API comm_result_t comm_init(comm_t **out, const comm_config_t *config)
{
	return join(out, config, 0);
}

/*
 * The job name of c's split n for color: "JOB/split.N.COLOR"; where that
 * is too long, JOB's first 180 bytes and a hash of all of it stand for
 * JOB, the same on every rank.
 */
static void split_name(const comm_t *c, unsigned n, int color, char *buf, size_t len)
{
	uint64_t h = 14695981039346656037ull; /* FNV-1a */

	if (snprintf(buf, len, "%s/split.%u.%d", c->job, n, color) <= JOB_NAME_LIMIT)
		return;
	for (const char *p = c->job; *p; p++)
		h = (h ^ (uint8_t)*p) * 1099511628211ull;
	snprintf(buf, len, "%.180s~%016llx/split.%u.%d", c->job, (unsigned long long)h, n, color);
}

COMM_API comm_result_t comm_split(comm_t *c, int color, int key, comm_t **out)
{
	comm_config_t cfg = COMM_CONFIG_INIT;
	char name[JOB_NAME_LIMIT + 64], why[256] = "";
	comm_t *child = NULL;
	int32_t *all;
	int n = 0, rank = 0;
	unsigned k;
	comm_result_t rc, joined = COMM_OK;

	if (!c || !out)
		return COMM_ERR_INVALID_ARG;
	*out = NULL;
	/* counted whether it fails or not: the next split's name agrees across ranks */
	k = c->splits++;
	if (color < COMM_SPLIT_NOCOLOR)
		return comm_set_error(c, COMM_ERR_INVALID_ARG,
				      "split: color %d: must be >= 0 or COMM_SPLIT_NOCOLOR", color);
	if (c->group_depth > 0)
		return comm_set_error(c, COMM_ERR_INVALID_ARG, "split: inside a group");
	if (c->broken != COMM_OK)
		return comm_refuse(c, "split");
	if (mem_family_start(c) < 0)
		return comm_set_error(c, COMM_ERR_NO_MEMORY, "split: out of memory");
	if (!(all = comm_mem_alloc_rc(c, 2 * sizeof *all * (size_t)c->size, &rc)))
		return rc; /* its detail says why */
	all[2 * c->rank] = color;
	all[2 * c->rank + 1] = key;
	rc = comm_allgather(c, all + 2 * c->rank, all, 2, COMM_INT32, NULL);
	if (rc != COMM_OK)
		goto out;
	/* my place among my color's ranks: by key, then by rank in c */
	for (int r = 0; r < c->size; r++) {
		if (all[2 * r] != color)
			continue;
		n++;
		rank += all[2 * r + 1] < key || (all[2 * r + 1] == key && r < c->rank);
	}
	if (color != COMM_SPLIT_NOCOLOR) {
		split_name(c, k, color, name, sizeof name);
		cfg.socket = c->socket_path;
		cfg.job = name;
		cfg.token = c->token;
		cfg.rank = rank;
		cfg.world_size = n;
		cfg.timeout_ms = c->timeout_ms;
		cfg.root = c->root;
		/*
		 * Half the deadline: where another rank's join failed at once and
		 * it waits in the agreement below, this one's join ends well
		 * before that agreement's deadline would fail comm.
		 */
		if ((joined = join(&child, &cfg,
				   (uint32_t)(c->timeout_ms > 1 ? c->timeout_ms / 2 : c->timeout_ms))) !=
		    COMM_OK)
			snprintf(why, sizeof why, "%s", init_error);
	}
	/* every rank's new comm formed, or none is kept: a half-made one would fail its first op */
	all[0] = joined == COMM_OK;
	rc = comm_allreduce(c, all, all, 1, COMM_INT32, COMM_MIN, NULL);
	if (rc == COMM_OK && !all[0])
		rc = joined != COMM_OK
			     ? comm_set_error(c, joined, "split: %s", why)
			     : comm_set_error(c, COMM_ERR_ABORTED,
					      "split: another rank's new communicator did not form");
	if (rc != COMM_OK) {
		if (child)
			comm_abort(child);
		goto out;
	}
	if (child) {
		child->stream = c->stream;
		mem_family_join(c, child);
		*out = child;
	}
out:
	comm_mem_free(c, all);
	return rc;
}

COMM_API comm_result_t comm_finalize(comm_t *c)
{
	Commpb__Envelope env = COMMPB__ENVELOPE__INIT;
	Commpb__Leave leave = COMMPB__LEAVE__INIT;
	comm_result_t rc = COMM_OK;

	if (!c)
		return COMM_ERR_INVALID_ARG;
	if (c->forked) {
		comm_free(c);
		return COMM_OK;
	}
	if (c->group_depth > 0) {
		/* a group left open: it goes out as if ended here */
		c->group_depth = 1;
		comm_group_end(c);
	}
	while (c->reqs && c->broken == COMM_OK) {
		comm_request_t *r = c->reqs;

		comm_result_t rrc;

		if (r->parts) { /* answered through its parts, which follow it on the list */
			rrc = comm_wait(r, -1);
		} else {
			ring_wait(r, -1);
			rrc = req_finish(r);
		}
		if (rrc != COMM_OK && rc == COMM_OK)
			rc = rrc;
	}
	gpu_free_all(c, 1);
	env.body_case = COMMPB__ENVELOPE__BODY_LEAVE;
	env.leave = &leave;
	if (c->broken == COMM_OK)
		comm_send_env(c, &env);
	/* not left cleanly, whenever the connection was found gone */
	if (rc == COMM_OK)
		rc = c->broken;
	comm_free(c);
	return rc;
}

COMM_API comm_result_t comm_abort(comm_t *c)
{
	Commpb__Envelope env = COMMPB__ENVELOPE__INIT;
	Commpb__Abort ab = COMMPB__ABORT__INIT;

	if (!c)
		return COMM_ERR_INVALID_ARG;
	ab.reason = "comm_abort";
	env.body_case = COMMPB__ENVELOPE__BODY_ABORT;
	env.abort = &ab;
	if (c->broken == COMM_OK)
		comm_send_env(c, &env);
	comm_free(c);
	return COMM_OK;
}
