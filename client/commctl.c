/*
 * commctl.c: the operator's tool. Parses the global flags, picks the
 * sub-command and keeps the admin connection to commd.
 */
#include <errno.h>
#include <getopt.h>
#include <grp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "comm.h"
#include "ctl.h"
#include "frame.h"

#define CTL_TIMEOUT_S 10 /* --timeout's default */
#define CTL_TIMEOUT_MAX_S 86400

/* --timeout: seconds for the whole exchange (0: none), and when they end */
static double timeout_s = CTL_TIMEOUT_S;
static long long deadline_ms; /* CLOCK_MONOTONIC, set by ctl_connect */

static const struct {
	const char *name;
	const char *args;
	int min_args, max_args;
	int (*run)(struct ctl *, int, char **);
	const char *help;
} commands[] = {
	{ "status", "", 0, 0, ctl_status,
	  "the daemon, its backends, peers, jobs, their oldest ops in flight, counters" },
	{ "jobs", "[JOB]", 0, 1, ctl_jobs,
	  "one line per job, and each job's GPU worker (over several daemons: its\n"
	  "                 NCCL rank and device); with JOB, every op in flight in it:\n"
	  "                 which ranks posted it and which never did (what a hang waits for)" },
	{ "topo", "", 0, 0, ctl_topo, "the node's GPUs and NICs and how they connect (nvidia-smi topo -m)" },
	{ "abort", "JOB", 1, 1, ctl_abort,
	  "fail the job on every rank and every daemon it spans, as comm_abort would:\n"
	  "                 its ops end with COMM_ERR_ABORTED naming you and --reason TEXT;\n"
	  "                 --uid UID picks the job of that user where names repeat\n"
	  "                 (the job's owner may, as may root and commd's admin group)" },
};

static void usage(FILE *f)
{
	fprintf(f, "usage: commctl [OPTIONS] COMMAND [ARG] [OPTIONS]\n"
		   "options, before or after the command:\n"
		   "  -s, --socket PATH      the daemon's socket (default: $COMM_SOCKET or\n"
		   "                         /run/commd/commd.sock)\n"
		   "  -j, --json             machine-readable output\n"
		   "      --timeout SECONDS  give up when commd has not answered by then\n"
		   "                         (default %d; 0 waits for ever)\n"
		   "      --reason TEXT      abort: what the ranks are told\n"
		   "      --uid UID          abort: the job of that user, where names repeat\n"
		   "  -h, --help             this summary\n"
		   "  -V, --version          commctl's version\n"
		   "commands:\n",
		CTL_TIMEOUT_S);
	for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
		fprintf(f, "  %-6s %-8s %s\n", commands[i].name, commands[i].args, commands[i].help);
}

/* A uid in decimal, into *uid: 0, or -1 when s is not one. */
static int parse_uid(const char *s, long *uid)
{
	char *end;

	errno = 0;
	*uid = strtol(s, &end, 10);
	return errno || end == s || *end || *uid < 0 || *uid > 0xfffffffe ? -1 : 0;
}

/* --timeout's SECONDS (a fraction too) into *t: 0, or -1 when s is not one. */
static int parse_timeout(const char *s, double *t)
{
	char *end;

	errno = 0;
	*t = strtod(s, &end);
	/* NaN fails both comparisons */
	return errno || end == s || *end || !(*t >= 0 && *t <= CTL_TIMEOUT_MAX_S) ? -1 : 0;
}

static long long now_ms(void)
{
	struct timespec now;

	clock_gettime(CLOCK_MONOTONIC, &now);
	return now.tv_sec * 1000LL + now.tv_nsec / 1000000;
}

/* Milliseconds left before the deadline (0 once past it), or -1 for no timeout. */
static int ms_left(void)
{
	long long ms = deadline_ms - now_ms();

	if (timeout_s <= 0)
		return -1;
	return ms < 0 ? 0 : (int)ms;
}

/*
 * Bound the next connect (to a listener whose backlog is full) or send by
 * the time left: SO_SNDTIMEO, as neither can be polled for on a blocking
 * Unix socket.
 */
static void send_timeout(int fd)
{
	int ms = ms_left();
	struct timeval tv = { ms / 1000, ms % 1000 * 1000 };

	if (ms < 0)
		return;
	if (!ms)
		tv.tv_usec = 1; /* 0 would mean no limit */
	setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
}

/* What a commd that never answers (stopped, hung, its backlog full) gets said. */
static void say_timeout(const struct ctl *ctl)
{
	fprintf(stderr,
		"commctl: %s: commd did not answer within %g s (is it stopped or hung? "
		"--timeout SECONDS waits longer)\n",
		ctl->socket, timeout_s);
}

/*
 * Why connect said EACCES, and what to do: the socket's mode and group
 * (commd --socket-group) decide who may connect, or a directory on the
 * way is closed.
 */
static void say_denied(const struct ctl *ctl)
{
	struct stat st;
	const struct group *gr;
	char gid[16];

	if (stat(ctl->socket, &st) < 0) {
		fprintf(stderr,
			"commctl: connect %s: permission denied: a directory on the way is closed "
			"to you; run commctl as root\n",
			ctl->socket);
		return;
	}
	gr = getgrgid(st.st_gid);
	snprintf(gid, sizeof gid, "%u", (unsigned)st.st_gid);
	fprintf(stderr,
		"commctl: connect %s: permission denied: the socket is mode %04o, group %s "
		"(commd --socket-group); run commctl as root or as a member of group %s\n",
		ctl->socket, (unsigned)(st.st_mode & 07777), gr ? gr->gr_name : gid,
		gr ? gr->gr_name : gid);
}

/* What path is when it exists and is not a socket ("a directory"); NULL otherwise. */
static const char *not_a_socket(const char *path)
{
	struct stat st;

	if (stat(path, &st) < 0 || S_ISSOCK(st.st_mode))
		return NULL;
	return S_ISDIR(st.st_mode) ? "a directory" : S_ISREG(st.st_mode) ? "a file" : "not a socket";
}

int ctl_connect(struct ctl *ctl)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	Commpb__Envelope env = COMMPB__ENVELOPE__INIT, *reply;
	Commpb__Hello hello = COMMPB__HELLO__INIT;
	const char *kind;
	int e;

	if (strlen(ctl->socket) >= sizeof sa.sun_path) {
		fprintf(stderr, "commctl: socket path too long: %s\n", ctl->socket);
		return -1;
	}
	strcpy(sa.sun_path, ctl->socket);
	deadline_ms = now_ms() + (long long)(timeout_s * 1000);
	ctl->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (ctl->fd < 0) {
		fprintf(stderr, "commctl: socket: %s\n", strerror(errno));
		return -1;
	}
	send_timeout(ctl->fd);
	if (connect(ctl->fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
		e = errno;
		/* a directory or file there: ECONNREFUSED, as from a socket no daemon serves */
		kind = not_a_socket(ctl->socket);
		if (e == EAGAIN || e == EINPROGRESS)
			say_timeout(ctl);
		else if (e == EACCES)
			say_denied(ctl);
		else if (kind)
			fprintf(stderr,
				"commctl: connect %s: is not a socket (%s): name commd's with "
				"--socket or COMM_SOCKET\n",
				ctl->socket, kind);
		else
			fprintf(stderr, "commctl: connect %s: %s (is commd running?)\n",
				ctl->socket, strerror(e));
		return -1;
	}
	hello.version_min = PROTO_VERSION_MIN;
	hello.version_max = PROTO_VERSION;
	hello.role = COMMPB__ROLE__ROLE_ADMIN;
	env.body_case = COMMPB__ENVELOPE__BODY_HELLO;
	env.hello = &hello;
	reply = ctl_call(ctl, &env);
	if (!reply)
		return -1;
	if (reply->body_case != COMMPB__ENVELOPE__BODY_HELLO_REPLY ||
	    reply->hello_reply->status != COMM_OK) {
		fprintf(stderr, "commctl: hello refused: %s\n",
			reply->body_case == COMMPB__ENVELOPE__BODY_HELLO_REPLY
				? reply->hello_reply->detail
				: "unexpected answer");
		commpb__envelope__free_unpacked(reply, NULL);
		return -1;
	}
	commpb__envelope__free_unpacked(reply, NULL);
	return 0;
}

Commpb__Envelope *ctl_call(struct ctl *ctl, Commpb__Envelope *env)
{
	struct frame_reader rd;
	Commpb__Envelope *reply = NULL;
	const uint8_t *payload;
	uint8_t *frame;
	size_t len;
	int rc;

	len = frame_pack(env, &frame);
	if (!len) {
		fprintf(stderr, "commctl: request too large\n");
		return NULL;
	}
	send_timeout(ctl->fd);
	rc = frame_send_all(ctl->fd, frame, len, NULL, 0);
	free(frame);
	if (rc == -EAGAIN) {
		say_timeout(ctl);
		return NULL;
	}
	/* a refused connection: commd said why before it closed; read that */
	if (rc < 0 && rc != -EPIPE && rc != -ECONNRESET) {
		fprintf(stderr, "commctl: write: %s\n", strerror(-rc));
		return NULL;
	}
	frame_reader_init(&rd);
	for (;;) {
		enum frame_status st = frame_next(&rd, &payload, &len);
		struct pollfd pfd;
		long n;

		if (st == FRAME_OK) {
			reply = commpb__envelope__unpack(NULL, len, payload);
			if (!reply)
				fprintf(stderr, "commctl: malformed reply\n");
			break;
		}
		if (st == FRAME_TOO_BIG) {
			fprintf(stderr, "commctl: oversized reply\n");
			break;
		}
		pfd.fd = ctl->fd;
		pfd.events = POLLIN;
		if (poll(&pfd, 1, ms_left()) == 0) {
			say_timeout(ctl);
			break;
		}
		n = frame_reader_recv(&rd, ctl->fd);
		if (n <= 0 && rc < 0) {
			fprintf(stderr, "commctl: write: %s\n", strerror(-rc));
			break;
		}
		if (n <= 0) {
			fprintf(stderr, "commctl: read: %s\n",
				n == 0 ? "commd closed the connection" : strerror((int)-n));
			break;
		}
	}
	frame_reader_free(&rd);
	if (reply && reply->body_case == COMMPB__ENVELOPE__BODY_ERROR) {
		fprintf(stderr, "commctl: %s: %s\n", comm_result_name(reply->error->status),
			reply->error->detail);
		commpb__envelope__free_unpacked(reply, NULL);
		reply = NULL;
	}
	return reply;
}

void ctl_json_str(const char *s)
{
	putchar('"');
	for (; *s; s++) {
		unsigned char ch = (unsigned char)*s;

		if (ch == '"' || ch == '\\')
			printf("\\%c", ch);
		else if (ch < 0x20)
			printf("\\u%04x", ch);
		else
			putchar(ch);
	}
	putchar('"');
}

/*
 * The end of a run: output that never reached its file (a full disk, a
 * closed pipe) fails the run, said on stderr, so that a script does not
 * take a truncated answer for a whole one. Returns rc, or 1.
 */
static int close_stdout(int rc)
{
	errno = 0;
	if (fflush(stdout) == 0 && !ferror(stdout) && fclose(stdout) == 0)
		return rc;
	fprintf(stderr, "commctl: write standard output: %s\n",
		errno ? strerror(errno) : "write error");
	return 1;
}

int main(int argc, char **argv)
{
	enum { OPT_REASON = 256, OPT_UID, OPT_TIMEOUT };
	static const struct option opts[] = {
		{ "socket", required_argument, NULL, 's' },
		{ "json", no_argument, NULL, 'j' },
		{ "reason", required_argument, NULL, OPT_REASON },
		{ "uid", required_argument, NULL, OPT_UID },
		{ "timeout", required_argument, NULL, OPT_TIMEOUT },
		{ "help", no_argument, NULL, 'h' },
		{ "version", no_argument, NULL, 'V' },
		{ NULL, 0, NULL, 0 },
	};
	struct ctl ctl = { .fd = -1, .uid = -1, .reason = "" };
	/* the command and its arguments, in order; nwords counts past the array's end */
	char *words[4];
	int nwords = 0, opt, rc;
	const char *abort_only = NULL; /* --reason or --uid, when given */

	ctl.socket = getenv("COMM_SOCKET");
	if (!ctl.socket || !*ctl.socket)
		ctl.socket = "/run/commd/commd.sock";
	/*
	 * "-": options anywhere, as the man page says, and each other word
	 * handed back in order (case 1), POSIXLY_CORRECT or not; after "--"
	 * every word is one (a job named "-x").
	 */
	while ((opt = getopt_long(argc, argv, "-s:jhV", opts, NULL)) != -1) {
		switch (opt) {
		case 1:
			if (nwords < (int)(sizeof words / sizeof words[0]))
				words[nwords] = optarg;
			nwords++;
			break;
		case 's':
			ctl.socket = optarg;
			break;
		case 'j':
			ctl.json = 1;
			break;
		case OPT_REASON:
			ctl.reason = optarg;
			abort_only = "--reason";
			break;
		case OPT_UID:
			if (parse_uid(optarg, &ctl.uid) < 0) {
				fprintf(stderr, "commctl: abort: --uid wants a number, not '%s'\n",
					optarg);
				return 2;
			}
			abort_only = "--uid";
			break;
		case OPT_TIMEOUT:
			if (parse_timeout(optarg, &timeout_s) < 0) {
				fprintf(stderr,
					"commctl: --timeout wants seconds, 0 to %d (0: wait for ever), "
					"not '%s'\n",
					CTL_TIMEOUT_MAX_S, optarg);
				return 2;
			}
			break;
		case 'h':
			usage(stdout);
			return close_stdout(0);
		case 'V':
			printf("commctl %s\n", COMMD_VERSION);
			return close_stdout(0);
		default:
			usage(stderr);
			return 2;
		}
	}
	for (; optind < argc; optind++, nwords++)
		if (nwords < (int)(sizeof words / sizeof words[0]))
			words[nwords] = argv[optind];
	if (nwords == 0) {
		usage(stderr);
		return 2;
	}
	for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++) {
		int nargs = nwords - 1;

		if (strcmp(words[0], commands[i].name) != 0)
			continue;
		if (nargs > commands[i].max_args) {
			fprintf(stderr, "commctl: %s: unknown argument '%s'\n", commands[i].name,
				words[1 + commands[i].max_args]);
			return 2;
		}
		if (nargs < commands[i].min_args) {
			fprintf(stderr, "commctl: %s: which %s?\n", commands[i].name, commands[i].args);
			return 2;
		}
		if (abort_only && commands[i].run != ctl_abort) {
			fprintf(stderr, "commctl: %s: %s is an option of abort only\n",
				commands[i].name, abort_only);
			return 2;
		}
		if (ctl_connect(&ctl) < 0)
			return 1;
		rc = commands[i].run(&ctl, nargs, words + 1);
		close(ctl.fd);
		return close_stdout(rc);
	}
	fprintf(stderr, "commctl: unknown command '%s'\n", words[0]);
	usage(stderr);
	return 2;
}
