/*
 * commbench.c: an nccl-tests-style benchmark of commd. Forks its ranks
 * against a running daemon (or one it starts) and waits for them.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "bench.h"
#include "util.h"

#ifndef COMMD_SBINDIR
#define COMMD_SBINDIR "/usr/local/sbin"
#endif

#define MAX_RANKS 1024
#define REF_ELEMENTS 104857600 /* the reference run's buffers, in float32 */
#define READY_MS 10000 /* for a spawned commd to accept */
#define GRACE_MS 10000 /* after a rank fails, for the others */

enum { OPT_INPLACE = 256, OPT_JSON, OPT_SOCKET, OPT_SPAWN, OPT_REFERENCE, OPT_ROOT };

struct daemon {
	pid_t pid;           /* 0: none, or reaped */
	int status;          /* once reaped */
	char dir[97];        /* temp dir in $TMPDIR: the socket and the log */
	char sock[108];      /* dir/commd.sock, which fits a sun_path */
	char log[108];
};

static const struct option long_opts[] = {
	{ "nranks", required_argument, NULL, 'n' },
	{ "op", required_argument, NULL, 'o' },
	{ "datatype", required_argument, NULL, 'd' },
	{ "redop", required_argument, NULL, 'r' },
	{ "minbytes", required_argument, NULL, 'b' },
	{ "maxbytes", required_argument, NULL, 'e' },
	{ "stepfactor", required_argument, NULL, 'f' },
	{ "warmup_iters", required_argument, NULL, 'w' },
	{ "iters", required_argument, NULL, 'i' },
	{ "check", required_argument, NULL, 'c' },
	{ "inplace", no_argument, NULL, OPT_INPLACE },
	{ "json", no_argument, NULL, OPT_JSON },
	{ "socket", required_argument, NULL, OPT_SOCKET },
	{ "spawn-daemon", no_argument, NULL, OPT_SPAWN },
	{ "root", required_argument, NULL, OPT_ROOT },
	{ "reference", no_argument, NULL, OPT_REFERENCE },
	{ "device", no_argument, NULL, 'G' },
	{ "pipeline", no_argument, NULL, 'P' },
	{ "help", no_argument, NULL, 'h' },
	{ "version", no_argument, NULL, 'V' },
	{ NULL, 0, NULL, 0 },
};

static void usage(FILE *f)
{
	fprintf(f,
		"usage: commbench [-n RANKS] [-o OP] [-d DTYPE] [-r REDOP] [-b MIN] [-e MAX]\n"
		"                 [-f FACTOR] [-w WARMUP] [-i ITERS] [-c 0|1] [--inplace]\n"
		"                 [--json] [--socket PATH[,PATH...] --root HOST:PORT]\n"
		"                 [--spawn-daemon] [--reference] [-G] [-P]\n"
		"\n"
		"Measure commd's collectives as nccl-tests does, with RANKS forked ranks.\n"
		"\n"
		"  -n RANKS          ranks, 1 to %d (default 4)\n"
		"  -o OP             allreduce, reduce_scatter, allgather, broadcast, reduce,\n"
		"                    alltoall, alltoallv, sendrecv or all (default allreduce)\n"
		"  -d DTYPE          int8 uint8 int32 uint32 int64 uint64 half (float16)\n"
		"                    bfloat16 float (float32) double (float64) or all;\n"
		"                    default float\n"
		"  -r REDOP          sum prod min max avg or all (default sum)\n"
		"  -b MIN, -e MAX    sizes in bytes, K M G suffixes (1024s); default 8 to 64M;\n"
		"                    MIN at least 1, and some size must hold an element (n\n"
		"                    of them for the ops of n blocks, below)\n"
		"  -f FACTOR         each size is FACTOR times the last (default 2)\n"
		"  -w WARMUP         untimed iterations per size (default 5)\n"
		"  -i ITERS          timed iterations per size (default 20)\n"
		"  -c 0|1            check every result, each iteration (default 1)\n"
		"  --inplace         only the in-place half of the table\n"
		"  --json            one JSON object a line for each op, size and placement\n"
		"  --socket PATH     commd's socket (default $COMM_SOCKET, else the library's)\n"
		"  --socket A,B,...  several daemons (nodes): ranks in equal blocks, the first\n"
		"                    on A; with --root, the job's root daemon (its\n"
		"                    --peer-listen address)\n"
		"  --root HOST:PORT  the job's root daemon (a job over several daemons)\n"
		"  --spawn-daemon    start a commd on a temp socket for the run ($COMMD, else\n"
		"                    the one beside commbench, else in PATH), in $TMPDIR\n"
		"                    (default /tmp), with --config /dev/null: no settings file\n"
		"  --reference       the reference run's lines: all-reduce and reduce-scatter\n"
		"                    of 104857600 float32 per rank, or -e MAX bytes of them\n"
		"                    (default -w 1 -i 3; the time is each rank's median)\n"
		"  -G, --device      buffers in device memory: cudaMalloc on device\n"
		"                    rank %% (number of devices); -c 1 checks a copy back\n"
		"  -P, --pipeline    post each size's ITERS ops back to back with requests and\n"
		"                    wait for them all (nccl-tests' timing): the time is the\n"
		"                    whole over ITERS, of the slowest rank; -c 1 checks the\n"
		"                    outputs they leave (out of place) and one more run,\n"
		"                    blocking\n"
		"  -h, --help        print this help\n"
		"  -V, --version     print the version and exit\n"
		"\n"
		"For all-reduce, broadcast, reduce and send/recv the size is each rank's\n"
		"buffer; for reduce-scatter, all-gather and all-to-all the full buffer of n\n"
		"blocks (count is then per rank). Time is the median over iterations of the\n"
		"slowest rank (-P: the whole over ITERS); algbw = size / time (GB = 1e9 B),\n"
		"busbw = algbw x 2(n-1)/n (all-reduce), (n-1)/n (reduce-scatter,\n"
		"all-gather, all-to-all) or 1.\n"
		"With -c 1 each rank fills its inputs before every iteration and checks\n"
		"its outputs after it, outside the timed call (-P: fills once before the\n"
		"warm-up, then fills and checks one more, blocking run).\n"
		"Exit status: 0 when every op ran and every value was right, 1 otherwise,\n"
		"2 on bad usage, sizes that leave an op nothing to measure (and for\n"
		"--device when built without CUDA).\n",
		MAX_RANKS);
}

static int parse_op(const char *s)
{
	if (!strcmp(s, "all"))
		return -1;
	for (int i = 0; i < NOPS; i++)
		if (!strcmp(s, bench_ops[i].name))
			return i;
	return -2;
}

/* Set o from one option; -1 if its value is bad. */
static int parse_opt(int c, const char *arg, struct bench_opts *o, int *warmup, int *iters)
{
	int v = 0;

	switch (c) {
	case 'n':
		return parse_int_in(arg, 1, MAX_RANKS, &o->nranks);
	case 'o':
		o->op = parse_op(arg);
		return o->op == -2 ? -1 : 0;
	case 'd':
		o->dtype = bench_dtype_parse(arg);
		return o->dtype == -2 ? -1 : 0;
	case 'r':
		o->redop = bench_redop_parse(arg);
		return o->redop == -2 ? -1 : 0;
	case 'b':
		return parse_bytes(arg, &o->min_bytes);
	case 'e':
		o->ref_elements = 0;
		if (parse_bytes(arg, &o->max_bytes) < 0)
			return -1;
		o->ref_elements = o->max_bytes / 4;
		return 0;
	case 'f':
		if (parse_int_in(arg, 2, 1024, &v) < 0)
			return -1;
		o->factor = (size_t)v;
		return 0;
	case 'w':
		return parse_int_in(arg, 0, 100000, warmup);
	case 'i':
		return parse_int_in(arg, 1, 100000, iters);
	default:
		return parse_int_in(arg, 0, 1, &o->check);
	}
}

/* The values option c takes, for its bad-value message: "" for a number. */
static const char *choices(int c, char *buf, size_t len)
{
	size_t n = 0;
	int last = c == 'o' ? NOPS - 1 : c == 'd' ? COMM_FLOAT64 : COMM_AVG;

	if (c == 'c')
		return " (0 or 1)";
	if (c != 'o' && c != 'd' && c != 'r')
		return "";
	for (int i = 0; i <= last && n < len; i++) {
		const char *name = c == 'o'   ? bench_ops[i].name
				   : c == 'd' ? bench_dtype_name((comm_dtype_t)i)
					      : bench_redop_name((comm_redop_t)i);

		n += (size_t)snprintf(buf + n, len - n, "%s%s", i ? ", " : " (", name);
		/* half (float16): libcomm's name too, where it differs */
		if (c == 'd' && strcmp(name, bench_dtype_json((comm_dtype_t)i)) && n < len)
			n += (size_t)snprintf(buf + n, len - n, " (%s)",
					      bench_dtype_json((comm_dtype_t)i));
	}
	if (n < len)
		snprintf(buf + n, len - n, " or all)");
	return buf;
}

/* 0, or 2 (usage) with a message. */
static char *socket_list; /* o->sockets point into it, for the whole run */

static void free_socket_list(void)
{
	free(socket_list);
}

/* --socket A,B,...: one daemon a block of ranks. */
static int split_sockets(struct bench_opts *o)
{
	char *list = strdup(o->socket), *save = NULL, *tok;

	if (!list)
		return -1;
	socket_list = list;
	atexit(free_socket_list);
	for (tok = strtok_r(list, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
		if (o->nsockets == BENCH_MAX_DAEMONS) {
			fprintf(stderr, "commbench: --socket: at most %d daemons\n", BENCH_MAX_DAEMONS);
			return -1;
		}
		o->sockets[o->nsockets++] = tok;
	}
	if (o->nsockets > o->nranks) {
		fprintf(stderr, "commbench: --socket: %d daemons for %d ranks\n", o->nsockets,
			o->nranks);
		return -1;
	}
	return 0;
}

/*
 * 0 if every op and dtype chosen gets at least one size with a whole
 * element per rank (block); else -1 with a message: a run would print
 * empty tables, having measured nothing.
 */
static int check_sizes(const struct bench_opts *o)
{
	size_t top = o->min_bytes, need;
	int d0 = o->dtype < 0 ? 0 : o->dtype, d1 = o->dtype < 0 ? COMM_FLOAT64 : d0;

	/* the largest size the run reaches, as run_op steps */
	while (top <= o->max_bytes / o->factor)
		top *= o->factor;
	for (int op = 0; op < NOPS; op++) {
		if (o->op >= 0 && o->op != op)
			continue;
		for (int d = d0; d <= d1; d++) {
			need = comm_dtype_size((comm_dtype_t)d) *
			       (bench_ops[op].split ? (size_t)o->nranks : 1);
			if (top >= need)
				continue;
			fprintf(stderr,
				"commbench: nothing to measure: %s of %s over %d ranks needs a "
				"size of at least %zu bytes; from -b %zu to -e %zu the largest "
				"is %zu\n",
				bench_ops[op].name, bench_dtype_name((comm_dtype_t)d), o->nranks,
				need, o->min_bytes, o->max_bytes, top);
			return -1;
		}
	}
	return 0;
}

static int parse_opts(int argc, char **argv, struct bench_opts *o, int *spawn)
{
	int c, warmup = -1, iters = -1, max_given = 0;
	char buf[256];

	while ((c = getopt_long(argc, argv, "n:o:d:r:b:e:f:w:i:c:hGPV", long_opts, NULL)) != -1) {
		switch (c) {
		case OPT_INPLACE:
			o->inplace_only = 1;
			break;
		case OPT_JSON:
			o->json = 1;
			break;
		case OPT_SOCKET:
			o->socket = optarg;
			break;
		case OPT_SPAWN:
			*spawn = 1;
			break;
		case OPT_ROOT:
			o->root = optarg;
			break;
		case OPT_REFERENCE:
			o->reference = 1;
			break;
		case 'G':
			o->device = 1;
			break;
		case 'P':
			o->pipeline = 1;
			break;
		case 'h':
			usage(stdout);
			exit(0);
		case 'V':
			printf("commbench %s\n", COMMD_VERSION);
			exit(0);
		case '?':
			usage(stderr);
			return 2;
		default:
			max_given |= c == 'e';
			if (parse_opt(c, optarg, o, &warmup, &iters) < 0) {
				fprintf(stderr, "commbench: -%c: bad value '%s'%s\n", c, optarg,
					choices(c, buf, sizeof buf));
				return 2;
			}
		}
	}
	if (optind != argc) {
		fprintf(stderr, "commbench: unexpected argument '%s'\n", argv[optind]);
		return 2;
	}
	if (o->min_bytes == 0) {
		/* 0 times the factor stays 0: the sizes would never reach -e */
		fprintf(stderr, "commbench: -b 0: the smallest size must be at least 1 byte\n");
		return 2;
	}
	if (o->min_bytes > o->max_bytes) {
		fprintf(stderr, "commbench: -b %zu is larger than -e %zu\n", o->min_bytes,
			o->max_bytes);
		return 2;
	}
	if (!o->reference && check_sizes(o) < 0)
		return 2;
	if (o->socket && strchr(o->socket, ',') && split_sockets(o) < 0)
		return 2;
	if (o->nsockets > 1 && !o->root) {
		fprintf(stderr, "commbench: --socket with several daemons needs --root\n");
		return 2;
	}
	if (!max_given)
		o->ref_elements = REF_ELEMENTS;
	if (o->reference && o->ref_elements < (size_t)o->nranks) {
		fprintf(stderr, "commbench: --reference: -e %zu holds fewer than %d float32\n",
			o->max_bytes, o->nranks);
		return 2;
	}
	o->warmup = warmup >= 0 ? warmup : o->reference ? 1 : 5;
	o->iters = iters >= 0 ? iters : o->reference ? 3 : 20;
	return 0;
}

/* The commd to start: $COMMD, beside us (or the build tree's), sbin, PATH. */
static const char *find_commd(char *buf, size_t len)
{
	const char *env = getenv("COMMD");
	static const char *const rel[] = { "/commd", "/../daemon/commd", "/../sbin/commd" };
	char exe[PATH_MAX], *slash;
	ssize_t k;

	if (env && *env)
		return env;
	k = readlink("/proc/self/exe", exe, sizeof exe - 1);
	if (k > 0) {
		exe[k] = '\0';
		if ((slash = strrchr(exe, '/')))
			*slash = '\0';
		/* libtool's uninstalled binary lives in client/.libs */
		if ((slash = strrchr(exe, '/')) && !strcmp(slash, "/.libs"))
			*slash = '\0';
		for (size_t i = 0; i < sizeof rel / sizeof rel[0]; i++) {
			snprintf(buf, len, "%s%s", exe, rel[i]);
			if (access(buf, X_OK) == 0)
				return buf;
		}
	}
	snprintf(buf, len, "%s/commd", COMMD_SBINDIR);
	if (access(buf, X_OK) == 0)
		return buf;
	return "commd";
}

static void show_log(const struct daemon *d)
{
	char line[512];
	FILE *f = fopen(d->log, "r");

	if (!f)
		return;
	while (fgets(line, sizeof line, f))
		fprintf(stderr, "commd: %s", line);
	fclose(f);
}

static int can_connect(const char *path)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0), ok;

	if (fd < 0)
		return 0;
	snprintf(sa.sun_path, sizeof sa.sun_path, "%s", path);
	ok = connect(fd, (struct sockaddr *)&sa, sizeof sa) == 0;
	close(fd);
	return ok;
}

/*
 * Start commd on a socket in a new temp dir ($TMPDIR, else /tmp) and wait
 * until it accepts. It reads no settings file (--config /dev/null): the
 * node's, say a peer-listen another commd holds, would stop it.
 */
static int daemon_start(struct daemon *d)
{
	char buf[PATH_MAX];
	const char *path = find_commd(buf, sizeof buf), *tmp = getenv("TMPDIR");
	int fd, st;

	if (!tmp || !*tmp)
		tmp = "/tmp";
	if ((size_t)snprintf(d->dir, sizeof d->dir, "%s/commbench-XXXXXX", tmp) >= sizeof d->dir) {
		fprintf(stderr, "commbench: TMPDIR %s: too long for a socket in it (at most %zu "
				"bytes)\n",
			tmp, sizeof d->dir - sizeof "/commbench-XXXXXX");
		return -1;
	}
	if (!mkdtemp(d->dir)) {
		fprintf(stderr, "commbench: mkdtemp %s: %s\n", d->dir, strerror(errno));
		return -1;
	}
	snprintf(d->sock, sizeof d->sock, "%s/commd.sock", d->dir);
	snprintf(d->log, sizeof d->log, "%s/commd.log", d->dir);
	fflush(NULL);
	d->pid = fork();
	if (d->pid < 0) {
		fprintf(stderr, "commbench: fork: %s\n", strerror(errno));
		d->pid = 0;
		return -1;
	}
	if (d->pid == 0) {
		prctl(PR_SET_PDEATHSIG, SIGTERM);
		fd = open(d->log, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
		if (fd >= 0) {
			dup2(fd, STDOUT_FILENO);
			dup2(fd, STDERR_FILENO);
		}
		execlp(path, path, "--foreground", "--config", "/dev/null", "--socket", d->sock,
		       (char *)NULL);
		fprintf(stderr, "exec %s: %s\n", path, strerror(errno));
		_exit(127);
	}
	for (int ms = 0; ms < READY_MS; ms += 10) {
		if (waitpid(d->pid, &st, WNOHANG) == d->pid) {
			d->pid = 0;
			fprintf(stderr, "commbench: %s exited before it was ready\n", path);
			show_log(d);
			return -1;
		}
		if (can_connect(d->sock))
			return 0;
		nanosleep(&(struct timespec){ 0, 10000000 }, NULL);
	}
	fprintf(stderr, "commbench: %s did not accept on %s in %d ms\n", path, d->sock,
		READY_MS);
	return -1;
}

/* SIGTERM the daemon, wait, tidy up; -1 unless it exited 0. */
static int daemon_stop(struct daemon *d)
{
	int err = 0;

	if (d->pid > 0) {
		kill(d->pid, SIGTERM);
		while (waitpid(d->pid, &d->status, 0) < 0 && errno == EINTR)
			;
		d->pid = -1;
	}
	if (d->pid < 0 && (!WIFEXITED(d->status) || WEXITSTATUS(d->status) != 0)) {
		fprintf(stderr, "commbench: commd did not exit cleanly (wait status 0x%x)\n",
			d->status);
		show_log(d);
		err = -1;
	}
	unlink(d->log);
	unlink(d->sock);
	rmdir(d->dir);
	return err;
}

/* Forget rank process pid; 1 when it failed. */
static int rank_failed(pid_t pid, int st, pid_t *pids, int n)
{
	for (int r = 0; r < n; r++) {
		if (pids[r] != pid)
			continue;
		pids[r] = 0;
		if (WIFSIGNALED(st))
			fprintf(stderr, "commbench: rank %d killed by signal %d\n", r, WTERMSIG(st));
		return !WIFEXITED(st) || WEXITSTATUS(st) != 0;
	}
	return 0;
}

/* Wait for the ranks; after the first failure the rest get GRACE_MS. */
static int wait_ranks(pid_t *pids, int n, struct daemon *d)
{
	int left = n, failed = 0, st, grace = -1; /* ms left; -1: no failure yet */
	pid_t pid;

	while (left > 0) {
		pid = waitpid(-1, &st, grace > 0 ? WNOHANG : 0);
		if (pid < 0 && errno == EINTR)
			continue;
		if (pid < 0)
			break;
		if (pid == 0) {
			nanosleep(&(struct timespec){ 0, 20000000 }, NULL);
			if ((grace -= 20) <= 0)
				for (int r = 0; r < n; r++)
					if (pids[r] > 0)
						kill(pids[r], SIGKILL);
			continue;
		}
		if (pid == d->pid) {
			d->pid = -1;
			d->status = st;
			continue;
		}
		left--;
		if (rank_failed(pid, st, pids, n) && !failed) {
			failed = 1;
			grace = GRACE_MS;
		}
	}
	return failed ? -1 : 0;
}

int main(int argc, char **argv)
{
	struct bench_opts o = {
		.nranks = 4, .op = OP_ALLREDUCE, .dtype = COMM_FLOAT32, .redop = COMM_SUM,
		.min_bytes = 8, .max_bytes = 64 << 20, .factor = 2, .check = 1,
	};
	struct daemon d = { 0 };
	int spawn = 0, err = 0, rc;
	pid_t *pids, parent;

	rc = parse_opts(argc, argv, &o, &spawn);
	if (rc)
		return rc;
	if (o.device) {
		char why[256];

		o.ndev = bench_gpu_probe(why, sizeof why);
		if (o.ndev < 0) {
			fprintf(stderr, "commbench: --device: %s\n", why);
			return 2;
		}
		if (o.ndev == 0) {
			fprintf(stderr, "commbench: --device: no usable GPU: %s\n", why);
			return 1;
		}
	}
	if (!o.socket && getenv("COMM_SOCKET") && *getenv("COMM_SOCKET"))
		o.socket = getenv("COMM_SOCKET");
	snprintf(o.job, sizeof o.job, "commbench-%d-%lld", (int)getpid(), (long long)time(NULL));
	pids = calloc((size_t)o.nranks, sizeof *pids);
	if (!pids) {
		fprintf(stderr, "commbench: out of memory\n");
		return 1;
	}
	if (spawn) {
		if (daemon_start(&d) < 0) {
			daemon_stop(&d);
			free(pids);
			return 1;
		}
		o.socket = d.sock;
	}
	fflush(NULL);
	parent = getpid();
	for (int r = 0; r < o.nranks && !err; r++) {
		pids[r] = fork();
		if (pids[r] < 0) {
			fprintf(stderr, "commbench: fork: %s\n", strerror(errno));
			pids[r] = 0;
			err = -1;
		} else if (pids[r] == 0) {
			if (prctl(PR_SET_PDEATHSIG, SIGKILL) < 0 || getppid() != parent)
				_exit(1);
			setvbuf(stdout, NULL, _IOLBF, 0);
			exit(bench_rank_main(&o, r));
		}
	}
	if (err)
		for (int r = 0; r < o.nranks; r++)
			if (pids[r] > 0)
				kill(pids[r], SIGKILL);
	if (wait_ranks(pids, o.nranks, &d) < 0)
		err = -1;
	if (spawn && daemon_stop(&d) < 0)
		err = -1;
	free(pids);
	return err ? 1 : 0;
}
