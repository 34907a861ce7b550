/*
 * commrun.c: the launcher. Starts N ranks of a program on this node with the
 * COMM_* environment libcomm reads, forwards signals to them and waits. A
 * job over several nodes is one commrun a node, each given the world size,
 * its first rank and the root daemon.
 */
#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_RANKS 4096
#define MAX_WORLD 4096 /* ranks of a job, on every node together (commd's WORLD_MAX) */
#define DEFAULT_GRACE 10 /* seconds after the first failure */
#define KILL_DELAY_MS 5000 /* from SIGTERM to SIGKILL */
#define REPEAT_MS 250      /* signals closer to the first one than this are that one again */
#define TOKEN_BYTES 16

enum { OPT_JOB = 256, OPT_SOCKET, OPT_TIMEOUT, OPT_GRACE, OPT_ROOT, OPT_WORLD, OPT_FIRST };

/* What happens to the ranks still running; each phase has a deadline. */
enum phase {
	PHASE_RUN,   /* no failure yet */
	PHASE_GRACE, /* a rank failed; the others may still finish */
	PHASE_TERM,  /* SIGTERM sent, or SIGINT or SIGTERM forwarded */
	PHASE_KILL,  /* SIGKILL sent */
};

struct opts {
	int nranks;
	int world;           /* 0: nranks */
	int first;           /* the global rank of local rank 0 */
	const char *root;    /* exported as COMM_ROOT */
	const char *job;
	const char *socket;
	const char *timeout; /* checked, passed on as given */
	int64_t grace_ms;
	char **argv;         /* PROG [ARGS...] */
};

/* A rank reaped, and how it ended. */
struct ended {
	int rank;   /* local */
	int status; /* from waitpid */
};

struct run {
	pid_t *pids;      /* per rank; 0 once reaped or never started */
	struct ended *batch; /* the failures one reap() found, nranks long */
	int nranks;
	int first;        /* the job's rank of pids[0]'s, for messages */
	int running;      /* ranks started and not yet reaped */
	int failed;       /* a failure is recorded: status is set */
	int status;       /* commrun's exit status */
	int nfailed;      /* ranks that ended other than by exit 0 */
	struct ended cause; /* the rank taken as the first to fail; rank -1: none */
	int64_t grace_ms;
	enum phase phase;
	int64_t deadline; /* CLOCK_MONOTONIC ms, in GRACE and TERM */
	int64_t term_ms;  /* when the ranks were told to stop (TERM) */
};

static const int forwarded[] = { SIGINT, SIGTERM, SIGHUP, SIGUSR1, SIGUSR2 };

static const struct option long_opts[] = {
	{ "np", required_argument, NULL, 'n' },
	{ "job", required_argument, NULL, OPT_JOB },
	{ "socket", required_argument, NULL, OPT_SOCKET },
	{ "timeout", required_argument, NULL, OPT_TIMEOUT },
	{ "grace", required_argument, NULL, OPT_GRACE },
	{ "root", required_argument, NULL, OPT_ROOT },
	{ "world", required_argument, NULL, OPT_WORLD },
	{ "first-rank", required_argument, NULL, OPT_FIRST },
	{ "help", no_argument, NULL, 'h' },
	{ "version", no_argument, NULL, 'V' },
	{ NULL, 0, NULL, 0 },
};

static void usage(FILE *f)
{
	fprintf(f,
	    "usage: commrun -n N [--job NAME] [--socket PATH] [--timeout MS]\n"
	    "               [--grace SEC] [--root HOST:PORT --world W --first-rank R]\n"
	    "               PROG [ARGS...]\n"
	    "\n"
	    "Start N ranks of PROG on this node and wait for them.\n"
	    "\n"
	    "  -n, --np N        number of ranks here, 1 to %d\n"
	    "  --job NAME        job name (default commrun-<pid>-<time>)\n"
	    "  --socket PATH     commd socket, exported as COMM_SOCKET\n"
	    "  --timeout MS      op deadline (1..86400000), exported as COMM_TIMEOUT\n"
	    "  --grace SEC       after a rank fails, wait SEC seconds (default %d)\n"
	    "                    for the others, then SIGTERM them, and SIGKILL\n"
	    "                    %d seconds later\n"
	    "  --root HOST:PORT  the job's root daemon (its --peer-listen address),\n"
	    "                    exported as COMM_ROOT: a job over several nodes\n"
	    "  --world W         ranks of the job on every node together (default N)\n"
	    "  --first-rank R    the job's rank of this node's first rank (default 0):\n"
	    "                    the ranks here are R to R+N-1\n"
	    "  -h, --help        print this help\n"
	    "  -V, --version     print the version and exit\n"
	    "  --                end of options\n"
	    "\n"
	    "Each rank gets COMM_RANK, COMM_WORLD_SIZE, COMM_JOB, COMM_TOKEN\n"
	    "(random, unless already set), LOCAL_RANK and LOCAL_WORLD_SIZE.\n"
	    "A job with ranks elsewhere (W above N) needs the same --job and\n"
	    "COMM_TOKEN on every node: commrun then wants both given.\n"
	    "SIGINT, SIGTERM, SIGHUP, SIGUSR1 and SIGUSR2 are forwarded to the\n"
	    "ranks (a SIGINT typed at the terminal reaches them already and is\n"
	    "not sent twice). After a SIGINT or SIGTERM, the ranks still running\n"
	    "--grace seconds later (%d at least), or at the next SIGINT or\n"
	    "SIGTERM, get SIGKILL.\n"
	    "Ranks get SIGKILL if commrun itself dies.\n"
	    "\n"
	    "Every rank that fails is named on stderr, then the first to fail; of\n"
	    "ranks that end together, one killed by a signal comes first, then\n"
	    "one exiting other than 1 (the status of a rank whose peer is lost),\n"
	    "then the lowest rank. Exit status: 0 if every rank exited 0; 1 if\n"
	    "the first rank to fail exited non-zero; 128+SIG if it was killed by\n"
	    "signal SIG; 2 on bad usage; 127 if PROG is not found or cannot be\n"
	    "executed (no rank is started).\n",
	    MAX_RANKS, DEFAULT_GRACE, KILL_DELAY_MS / 1000, KILL_DELAY_MS / 1000);
}

/* Parse a whole decimal number in [min, max]; -1 if it is not one. */
static int parse_long(const char *s, long min, long max, long *out)
{
	char *end;
	long v;

	errno = 0;
	v = strtol(s, &end, 10);
	if (errno != 0 || end == s || *end != '\0' || v < min || v > max)
		return -1;
	*out = v;
	return 0;
}

static int64_t now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Fill hex with 2 * TOKEN_BYTES hex digits and a NUL. */
static int make_token(char *hex)
{
	unsigned char raw[TOKEN_BYTES];
	size_t got = 0;
	ssize_t n;
	int i;

	while (got < sizeof raw) {
		n = getrandom(raw + got, sizeof raw - got, 0);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			fprintf(stderr, "commrun: getrandom: %s\n",
			    strerror(errno));
			return -1;
		}
		got += n;
	}
	for (i = 0; i < TOKEN_BYTES; i++)
		sprintf(hex + 2 * i, "%02x", raw[i]);
	return 0;
}

static int set_env(const char *name, const char *value)
{
	if (setenv(name, value, 1) < 0) {
		fprintf(stderr, "commrun: setenv %s: %s\n", name,
		    strerror(errno));
		return -1;
	}
	return 0;
}

/* 0 if path is a file this process may execute, else an errno. */
static int can_exec(const char *path)
{
	struct stat st;

	if (stat(path, &st) < 0)
		return errno;
	if (S_ISDIR(st.st_mode))
		return EISDIR;
	if (!S_ISREG(st.st_mode) || access(path, X_OK) < 0)
		return EACCES;
	return 0;
}

/*
 * Find PROG as execvp will: as given if it has a slash, else in each
 * directory of PATH (an empty one is the current directory; no PATH is
 * /bin:/usr/bin). 0 if found, else the errno execvp would give.
 */
static int find_prog(const char *prog)
{
	const char *dirs = getenv("PATH"), *p, *end;
	char path[PATH_MAX];
	int err, ret = ENOENT;
	size_t len;

	if (*prog == '\0')
		return ENOENT;
	if (strchr(prog, '/'))
		return can_exec(prog);
	if (dirs == NULL)
		dirs = "/bin:/usr/bin";
	for (p = dirs;; p = end + 1) {
		end = strchrnul(p, ':');
		len = end - p;
		if (snprintf(path, sizeof path, "%.*s%s%s", (int)len, p, len ? "/" : "",
		    prog) < (int)sizeof path) {
			err = can_exec(path);
			if (err == 0)
				return 0;
			if (err == EACCES)
				ret = EACCES; /* execvp goes on, and says so if none is found */
		}
		if (*end == '\0')
			return ret;
	}
}

/* In the child: finish the rank's environment and exec PROG. */
static void __attribute__((noreturn))
exec_rank(int rank, int first, char **argv, const sigset_t *mask, pid_t parent)
{
	char buf[16], local[16];

	snprintf(buf, sizeof buf, "%d", first + rank);
	snprintf(local, sizeof local, "%d", rank);
	if (setenv("COMM_RANK", buf, 1) < 0 || setenv("LOCAL_RANK", local, 1) < 0) {
		fprintf(stderr, "commrun: rank %d: setenv: %s\n", first + rank,
		    strerror(errno));
		_exit(127);
	}
	/* No orphans: if commrun dies, so do the ranks. */
	if (prctl(PR_SET_PDEATHSIG, SIGKILL) < 0 || getppid() != parent)
		_exit(127);
	sigprocmask(SIG_SETMASK, mask, NULL);
	execvp(argv[0], argv);
	fprintf(stderr, "commrun: %s: %s\n", argv[0], strerror(errno));
	_exit(127);
}

/* Send sig to every rank not yet reaped; returns how many. */
static int signal_all(struct run *run, int sig)
{
	int r, n = 0;

	for (r = 0; r < run->nranks; r++) {
		if (run->pids[r] > 0 && kill(run->pids[r], sig) == 0)
			n++;
	}
	return n;
}

/* Record the first failure and start the grace period. */
static void fail(struct run *run, int status)
{
	if (run->failed)
		return;
	run->failed = 1;
	run->status = status;
	if (run->phase == PHASE_RUN) {
		run->phase = PHASE_GRACE;
		run->deadline = now_ms() + run->grace_ms;
	}
}

/* Say how a rank ended: "exited with status 3", "killed by signal 9 (SIGKILL)". */
static void describe(int status, char *buf, size_t size)
{
	const char *name;
	int sig;

	if (WIFSIGNALED(status)) {
		sig = WTERMSIG(status);
		name = sigabbrev_np(sig);
		snprintf(buf, size, "killed by signal %d (%s%s)", sig, name ? "SIG" : "",
		    name ? name : "unknown");
	} else {
		snprintf(buf, size, "exited with status %d", WEXITSTATUS(status));
	}
}

/*
 * How likely a failure is to be the job's cause rather than its echo: a rank
 * whose peer is lost sees COMM_ERR_PEER_LOST and, like most programs on an
 * error, exits 1; a signal or another status is its own story.
 */
static int cause_rank(int status)
{
	if (WIFSIGNALED(status))
		return 2;
	return WEXITSTATUS(status) != 1;
}

static int by_rank(const void *a, const void *b)
{
	return ((const struct ended *)a)->rank - ((const struct ended *)b)->rank;
}

/*
 * Report the n failures one reap found, in rank order; if none came before,
 * take the likeliest cause among them as the first failure. Which of ranks
 * that ended together waitpid returns first is the kernel's order, not the
 * order they failed in, so it must not decide.
 */
static void report(struct run *run, struct ended *batch, int n)
{
	char how[64];
	int i, best = 0;

	qsort(batch, n, sizeof *batch, by_rank);
	for (i = 0; i < n; i++) {
		describe(batch[i].status, how, sizeof how);
		fprintf(stderr, "commrun: rank %d %s\n", run->first + batch[i].rank, how);
		if (cause_rank(batch[i].status) > cause_rank(batch[best].status))
			best = i;
	}
	run->nfailed += n;
	if (n == 0 || run->failed)
		return;
	run->cause = batch[best];
	if (WIFSIGNALED(batch[best].status))
		fail(run, 128 + WTERMSIG(batch[best].status));
	else
		fail(run, 1);
}

/* Reap every rank that has ended, without blocking. */
static void reap(struct run *run)
{
	pid_t pid;
	int r, status, n = 0;

	while (run->running > 0) {
		pid = waitpid(-1, &status, WNOHANG);
		if (pid < 0 && errno == EINTR)
			continue;
		if (pid < 0) {
			/* Cannot happen while ranks run; do not wait forever. */
			fprintf(stderr, "commrun: waitpid: %s\n",
			    strerror(errno));
			report(run, run->batch, n);
			fail(run, 1);
			run->running = 0;
			return;
		}
		if (pid == 0)
			break;
		for (r = 0; r < run->nranks && run->pids[r] != pid; r++)
			;
		if (r == run->nranks)
			continue; /* a child we inherited, not a rank */
		run->pids[r] = 0;
		run->running--;
		if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
			run->batch[n++] = (struct ended){ r, status };
	}
	report(run, run->batch, n);
}

/* Move to the next phase once the current one's deadline has passed. */
static void advance(struct run *run)
{
	int n;

	if (run->phase != PHASE_GRACE && run->phase != PHASE_TERM)
		return;
	if (now_ms() < run->deadline)
		return;
	if (run->phase == PHASE_GRACE) {
		n = signal_all(run, SIGTERM);
		fprintf(stderr, "commrun: grace period over: sent SIGTERM to "
		    "%d rank%s\n", n, n == 1 ? "" : "s");
		run->phase = PHASE_TERM;
		run->term_ms = now_ms();
		run->deadline = run->term_ms + KILL_DELAY_MS;
	} else {
		n = signal_all(run, SIGKILL);
		fprintf(stderr, "commrun: sent SIGKILL to %d rank%s still "
		    "running\n", n, n == 1 ? "" : "s");
		run->phase = PHASE_KILL;
	}
}

/*
 * A SIGINT or SIGTERM for commrun: pass it on (unless the terminal sent it
 * to the ranks too) and SIGKILL the ranks that outlast the grace period, or
 * KILL_DELAY_MS if that is longer; if they have had one already, SIGKILL
 * them now. One within REPEAT_MS of that one is the same request sent twice
 * (timeout(1) signals its child, then the child's group).
 */
static void stop(struct run *run, int sig, const siginfo_t *info)
{
	int n;

	if ((run->phase == PHASE_TERM || run->phase == PHASE_KILL) &&
	    now_ms() - run->term_ms < REPEAT_MS)
		return;
	if (run->phase == PHASE_TERM || run->phase == PHASE_KILL) {
		n = signal_all(run, SIGKILL);
		fprintf(stderr, "commrun: SIG%s while stopping: sent SIGKILL to %d "
		    "rank%s\n", sigabbrev_np(sig), n, n == 1 ? "" : "s");
		run->phase = PHASE_KILL;
		return;
	}
	/* from the terminal: the ranks, in our group, got it */
	if (sig != SIGINT || info->si_code != SI_KERNEL)
		signal_all(run, sig);
	run->phase = PHASE_TERM;
	run->term_ms = now_ms();
	run->deadline = run->term_ms + (run->grace_ms > KILL_DELAY_MS ? run->grace_ms : KILL_DELAY_MS);
}

/* Wait for the blocked signals in set until every rank is reaped. */
static void wait_ranks(struct run *run, const sigset_t *set)
{
	struct timespec ts;
	siginfo_t info;
	int64_t left;
	int sig;

	while (run->running > 0) {
		advance(run);
		if (run->phase == PHASE_GRACE || run->phase == PHASE_TERM) {
			left = run->deadline - now_ms();
			if (left < 0)
				left = 0;
			ts.tv_sec = left / 1000;
			ts.tv_nsec = (left % 1000) * 1000000;
			sig = sigtimedwait(set, &info, &ts);
		} else {
			sig = sigwaitinfo(set, &info);
		}
		if (sig < 0) {
			if (errno == EINTR || errno == EAGAIN)
				continue;
			fprintf(stderr, "commrun: sigwaitinfo: %s\n",
			    strerror(errno));
			fail(run, 1);
			signal_all(run, SIGKILL);
			run->phase = PHASE_KILL;
			while (waitpid(-1, NULL, 0) > 0 || errno == EINTR)
				;
			return;
		}
		if (sig == SIGCHLD)
			reap(run);
		else if (sig == SIGINT || sig == SIGTERM)
			stop(run, sig, &info);
		else
			signal_all(run, sig);
	}
}

/*
 * Parse the command line into o; 0 to go on, 1 when help or the version was
 * printed, -1 on bad usage (the message printed).
 */
static int parse_args(int argc, char **argv, struct opts *o)
{
	long v;
	int c;

	opterr = 0;
	while ((c = getopt_long(argc, argv, "+:hVn:", long_opts, NULL)) != -1) {
		switch (c) {
		case 'h':
			usage(stdout);
			return 1;
		case 'V':
			printf("commrun %s\n", COMMD_VERSION);
			return 1;
		case 'n':
			if (parse_long(optarg, 1, MAX_RANKS, &v) < 0) {
				fprintf(stderr, "commrun: -n: '%s' is not a "
				    "number from 1 to %d\n", optarg, MAX_RANKS);
				return -1;
			}
			o->nranks = (int)v;
			break;
		case OPT_JOB:
			if (*optarg == '\0') {
				fprintf(stderr, "commrun: --job: empty name\n");
				return -1;
			}
			o->job = optarg;
			break;
		case OPT_SOCKET:
			if (*optarg == '\0') {
				fprintf(stderr, "commrun: --socket: empty path\n");
				return -1;
			}
			o->socket = optarg;
			break;
		case OPT_TIMEOUT:
			/* commd's range for a deadline: a day at most */
			if (parse_long(optarg, 1, 86400000, &v) < 0) {
				fprintf(stderr, "commrun: --timeout: '%s' is not "
				    "a number of ms in 1..86400000\n", optarg);
				return -1;
			}
			o->timeout = optarg;
			break;
		case OPT_GRACE:
			if (parse_long(optarg, 0, INT_MAX, &v) < 0) {
				fprintf(stderr, "commrun: --grace: '%s' is not "
				    "a number of seconds\n", optarg);
				return -1;
			}
			o->grace_ms = (int64_t)v * 1000;
			break;
		case OPT_ROOT:
			if (*optarg == '\0' || !strchr(optarg, ':')) {
				fprintf(stderr, "commrun: --root: '%s' is not "
				    "HOST:PORT\n", optarg);
				return -1;
			}
			o->root = optarg;
			break;
		case OPT_WORLD:
		case OPT_FIRST:
			/* commd's largest job */
			if (parse_long(optarg, c == OPT_WORLD, MAX_WORLD - (c == OPT_FIRST), &v) < 0) {
				fprintf(stderr, "commrun: %s: '%s' is not a number "
				    "from %d to %d\n", c == OPT_WORLD ? "--world" :
				    "--first-rank", optarg, c == OPT_WORLD,
				    MAX_WORLD - (c == OPT_FIRST));
				return -1;
			}
			*(c == OPT_WORLD ? &o->world : &o->first) = (int)v;
			break;
		case ':':
			fprintf(stderr, "commrun: option '%s' needs an argument\n",
			    argv[optind - 1]);
			return -1;
		default:
			if (optopt > 0 && optopt < 256)
				fprintf(stderr, "commrun: unknown option '-%c'\n",
				    optopt);
			else
				fprintf(stderr, "commrun: unknown option '%s'\n",
				    argv[optind - 1]);
			return -1;
		}
	}
	if (o->nranks == 0) {
		fprintf(stderr, "commrun: missing -n N\n");
		return -1;
	}
	if (optind >= argc) {
		fprintf(stderr, "commrun: missing program\n");
		return -1;
	}
	if (!o->world)
		o->world = o->nranks;
	if (o->first + o->nranks > o->world) {
		fprintf(stderr, "commrun: ranks %d to %d are not all in a world "
		    "of %d\n", o->first, o->first + o->nranks - 1, o->world);
		return -1;
	}
	/* the other nodes' commruns must name the same job with the same token */
	if (o->world > o->nranks && (!o->job || !getenv("COMM_TOKEN"))) {
		fprintf(stderr, "commrun: a world of %d with %d ranks here: give "
		    "--job and set COMM_TOKEN, the same on every node\n",
		    o->world, o->nranks);
		return -1;
	}
	if (o->world > o->nranks && !o->root && !getenv("COMM_ROOT"))
		fprintf(stderr, "commrun: note: no --root: the job's other %d ranks "
		    "must join on this node's daemon\n", o->world - o->nranks);
	o->argv = argv + optind;
	return 0;
}

/* Export what every rank shares; the per-rank values come in exec_rank. */
static int setup_env(const struct opts *o, pid_t self)
{
	char token[2 * TOKEN_BYTES + 1], buf[64];
	const char *job = o->job;

	if (job == NULL) {
		snprintf(buf, sizeof buf, "commrun-%ld-%lld", (long)self,
		    (long long)time(NULL));
		job = buf;
	}
	if (set_env("COMM_JOB", job) < 0)
		return -1;
	if (getenv("COMM_TOKEN") == NULL) {
		if (make_token(token) < 0 || set_env("COMM_TOKEN", token) < 0)
			return -1;
	}
	if (o->socket != NULL && set_env("COMM_SOCKET", o->socket) < 0)
		return -1;
	if (o->timeout != NULL && set_env("COMM_TIMEOUT", o->timeout) < 0)
		return -1;
	if (o->root != NULL && set_env("COMM_ROOT", o->root) < 0)
		return -1;
	snprintf(buf, sizeof buf, "%d", o->world);
	if (set_env("COMM_WORLD_SIZE", buf) < 0)
		return -1;
	snprintf(buf, sizeof buf, "%d", o->nranks);
	if (set_env("LOCAL_WORLD_SIZE", buf) < 0)
		return -1;
	return 0;
}

/* Parse the command line, start the ranks and wait for them. */
int main(int argc, char **argv)
{
	struct opts o = { .grace_ms = DEFAULT_GRACE * 1000 };
	struct run run = { 0 };
	sigset_t set, oldmask;
	pid_t self, pid;
	size_t i;
	int r, ret;

	ret = parse_args(argc, argv, &o);
	if (ret != 0) {
		if (ret < 0)
			fprintf(stderr, "try 'commrun --help'\n");
		return ret < 0 ? 2 : 0;
	}
	/* once, rather than a failed exec a rank */
	ret = find_prog(o.argv[0]);
	if (ret != 0) {
		if (ret == ENOENT && !strchr(o.argv[0], '/'))
			fprintf(stderr, "commrun: %s: command not found\n", o.argv[0]);
		else
			fprintf(stderr, "commrun: %s: %s\n", o.argv[0], strerror(ret));
		return 127;
	}
	self = getpid();
	if (setup_env(&o, self) < 0)
		return 1;

	run.nranks = o.nranks;
	run.first = o.first;
	run.grace_ms = o.grace_ms;
	run.cause.rank = -1;
	run.pids = calloc(o.nranks, sizeof *run.pids);
	run.batch = calloc(o.nranks, sizeof *run.batch);
	if (run.pids == NULL || run.batch == NULL) {
		fprintf(stderr, "commrun: out of memory\n");
		free(run.batch);
		free(run.pids);
		return 1;
	}

	/*
	 * Block what we wait for before the first fork, so nothing is lost;
	 * SIGCHLD must not be ignored or the ranks would reap themselves.
	 */
	signal(SIGCHLD, SIG_DFL);
	sigemptyset(&set);
	sigaddset(&set, SIGCHLD);
	for (i = 0; i < sizeof forwarded / sizeof forwarded[0]; i++)
		sigaddset(&set, forwarded[i]);
	sigprocmask(SIG_BLOCK, &set, &oldmask);

	for (r = 0; r < run.nranks; r++) {
		pid = fork();
		if (pid < 0) {
			fprintf(stderr, "commrun: fork: rank %d: %s\n", o.first + r,
			    strerror(errno));
			fail(&run, 1);
			run.deadline = now_ms(); /* SIGTERM the rest at once */
			break;
		}
		if (pid == 0)
			exec_rank(r, o.first, o.argv, &oldmask, self);
		run.pids[r] = pid;
		run.running++;
	}

	wait_ranks(&run, &set);
	if (run.nfailed > 1 && run.cause.rank >= 0) {
		char how[64];

		describe(run.cause.status, how, sizeof how);
		fprintf(stderr, "commrun: %d of %d ranks failed; the first was rank %d, %s\n",
		    run.nfailed, run.nranks, run.first + run.cause.rank, how);
	}
	free(run.batch);
	free(run.pids);
	return run.failed ? run.status : 0;
}
