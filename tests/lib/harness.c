/*
 * harness.c: start the real daemon for a test, fork ranks against it, and
 * require a clean stop.
 */
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "check.h"
#include "harness.h"

#define MAX_ARGS 32

static long ms_since(const struct timespec *t0)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return (t.tv_sec - t0->tv_sec) * 1000 + (t.tv_nsec - t0->tv_nsec) / 1000000;
}

double th_secs_since(const struct timespec *t0)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)(t.tv_sec - t0->tv_sec) + (double)(t.tv_nsec - t0->tv_nsec) / 1e9;
}

void th_daemon_dump_log(const struct th_daemon *d)
{
	char line[1024];
	FILE *f = fopen(d->log, "r");

	if (!f)
		return;
	fprintf(stderr, "--- commd log (%s) ---\n", d->log);
	while (fgets(line, sizeof line, f))
		fputs(line, stderr);
	fprintf(stderr, "--- end of log ---\n");
	fclose(f);
}

int th_log_count(const struct th_daemon *d, const char *a, const char *b)
{
	char line[2048];
	FILE *f = fopen(d->log, "r");
	int n = 0;

	if (!f)
		return -1;
	while (fgets(line, sizeof line, f))
		n += strstr(line, a) && strstr(line, b);
	fclose(f);
	return n;
}

int th_free_port(void)
{
	struct sockaddr_in sa = { .sin_family = AF_INET,
				  .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	socklen_t len = sizeof sa;
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0), port = -1;

	if (fd < 0) {
		perror("harness: socket");
		return -1;
	}
	if (bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0 ||
	    getsockname(fd, (struct sockaddr *)&sa, &len) < 0)
		perror("harness: a free port");
	else
		port = ntohs(sa.sin_port);
	close(fd);
	return port;
}

/*
 * The address the daemon's peer listener took, from its log line "peer
 * listener on HOST:PORT (...)", into d->peer. 0 or -1.
 */
static int learn_peer(struct th_daemon *d)
{
	char line[1024];
	FILE *f = fopen(d->log, "r");
	int rc = -1;

	if (!f)
		return -1;
	while (rc && fgets(line, sizeof line, f)) {
		const char *p = strstr(line, "peer listener on ");

		if (p && sscanf(p + strlen("peer listener on "), "%63s", d->peer) == 1)
			rc = 0;
	}
	fclose(f);
	return rc;
}

/*
 * th_daemon_start's work; peer: --peer-listen on 127.0.0.1, at a port the
 * kernel picks when the daemon binds (one picked before could be taken by
 * then by another test running beside this one).
 */
static int daemon_start_args(struct th_daemon *d, int peer, const char *const *args)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	char notify[192], *argv[MAX_ARGS], *wrap = NULL, buf[512];
	const char *commd = getenv("COMMD"), *wrapper = getenv("COMMD_WRAPPER");
	struct timespec t0;
	int argc = 0, limit_ms = wrapper && *wrapper ? 60000 : 10000;

	memset(d, 0, sizeof *d);
	d->notify_fd = -1;
	if (!commd)
		commd = "./daemon/commd";
	snprintf(d->dir, sizeof d->dir, "/tmp/commd-test-XXXXXX");
	if (!mkdtemp(d->dir)) {
		perror("harness: mkdtemp");
		return -1;
	}
	snprintf(d->sock, sizeof d->sock, "%s/commd.sock", d->dir);
	snprintf(d->log, sizeof d->log, "%s/commd.log", d->dir);
	snprintf(notify, sizeof notify, "%s/notify.sock", d->dir);
	strcpy(sa.sun_path, notify);
	d->notify_fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (d->notify_fd < 0 || bind(d->notify_fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
		perror("harness: notify socket");
		return -1;
	}
	if (wrapper && *wrapper) {
		wrap = strdup(wrapper);
		for (char *tok = strtok(wrap, " "); tok && argc < MAX_ARGS / 2;
		     tok = strtok(NULL, " "))
			argv[argc++] = tok;
	}
	argv[argc++] = (char *)commd;
	argv[argc++] = "--foreground";
	argv[argc++] = "--config"; /* hermetic: not the host's /etc/commd/commd.conf */
	argv[argc++] = "/dev/null";
	argv[argc++] = "--log-level";
	argv[argc++] = "debug";
	argv[argc++] = "--socket";
	argv[argc++] = d->sock;
	if (peer) {
		argv[argc++] = "--peer-listen";
		argv[argc++] = "127.0.0.1:0";
	}
	for (; args && *args && argc < MAX_ARGS - 1; args++)
		argv[argc++] = (char *)*args;
	argv[argc] = NULL;

	d->pid = fork();
	if (d->pid < 0) {
		perror("harness: fork");
		return -1;
	}
	if (d->pid == 0) {
		int fd = open(d->log, O_WRONLY | O_CREAT | O_TRUNC, 0644);

		if (fd >= 0) {
			dup2(fd, 2);
			close(fd);
		}
		setenv("NOTIFY_SOCKET", notify, 1);
		/* a test that dies (a failed REQUIRE) leaves no daemon behind */
		prctl(PR_SET_PDEATHSIG, SIGKILL);
		execvp(argv[0], argv);
		fprintf(stderr, "harness: exec %s: %s\n", argv[0], strerror(errno));
		_exit(127);
	}
	free(wrap);
	clock_gettime(CLOCK_MONOTONIC, &t0);
	while (ms_since(&t0) < limit_ms) {
		struct pollfd p = { .fd = d->notify_fd, .events = POLLIN };
		ssize_t n;

		if (poll(&p, 1, 100) > 0) {
			n = recv(d->notify_fd, buf, sizeof buf - 1, 0);
			if (n > 0) {
				buf[n] = '\0';
				if (strstr(buf, "READY=1")) {
					snprintf(d->ready, sizeof d->ready, "%s", buf);
					if (peer && learn_peer(d) < 0) {
						fprintf(stderr, "harness: commd logged no peer "
								"listener\n");
						th_daemon_dump_log(d);
						return -1;
					}
					return 0;
				}
			}
		}
		if (!th_daemon_alive(d)) {
			fprintf(stderr, "harness: commd exited before it was ready\n");
			th_daemon_dump_log(d);
			return -1;
		}
	}
	fprintf(stderr, "harness: commd not ready after %d ms\n", limit_ms);
	th_daemon_dump_log(d);
	kill(d->pid, SIGKILL);
	waitpid(d->pid, NULL, 0);
	return -1;
}

static int daemon_vstart(struct th_daemon *d, int peer, va_list ap)
{
	const char *args[MAX_ARGS];
	int n = 0;

	for (const char *a; (a = va_arg(ap, const char *)) && n < MAX_ARGS - 1;)
		args[n++] = a;
	args[n] = NULL;
	return daemon_start_args(d, peer, args);
}

int th_daemon_start(struct th_daemon *d, ...)
{
	va_list ap;
	int rc;

	va_start(ap, d);
	rc = daemon_vstart(d, 0, ap);
	va_end(ap);
	return rc;
}

int th_daemon_startv(struct th_daemon *d, const char *const *args)
{
	return daemon_start_args(d, 0, args);
}

int th_daemon_start_peer(struct th_daemon *d, ...)
{
	va_list ap;
	int rc;

	va_start(ap, d);
	rc = daemon_vstart(d, 1, ap);
	va_end(ap);
	return rc;
}

int th_daemon_alive(const struct th_daemon *d)
{
	int status = 0;
	pid_t w;

	if (d->pid <= 0)
		return 0;
	w = waitpid(d->pid, &status, WNOHANG);
	if (w == d->pid && WIFSIGNALED(status))
		fprintf(stderr, "harness: commd (pid %d, %s) was killed by signal %d (%s)\n",
			(int)d->pid, d->dir, WTERMSIG(status), strsignal(WTERMSIG(status)));
	else if (w == d->pid)
		fprintf(stderr, "harness: commd (pid %d, %s) exited with status %d\n",
			(int)d->pid, d->dir, WEXITSTATUS(status));
	return w == 0;
}

/* Lines of the log that report an error of the daemon itself. */
static int log_errors(const struct th_daemon *d)
{
	char line[1024];
	int n = 0;
	FILE *f = fopen(d->log, "r");

	if (!f)
		return 0;
	while (fgets(line, sizeof line, f))
		if (strstr(line, " error: ") || strstr(line, "ERROR: AddressSanitizer") ||
		    strstr(line, "runtime error:") || strstr(line, "LeakSanitizer"))
			n++;
	fclose(f);
	return n;
}

static void remove_dir(const char *dir)
{
	DIR *dp = opendir(dir);
	struct dirent *e;
	char path[512];

	if (!dp)
		return;
	while ((e = readdir(dp))) {
		if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
			continue;
		snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
		unlink(path);
	}
	closedir(dp);
	rmdir(dir);
}

void th_daemon_cleanup(struct th_daemon *d)
{
	if (d->notify_fd >= 0)
		close(d->notify_fd);
	d->notify_fd = -1;
	remove_dir(d->dir);
	d->pid = 0;
}

int th_daemon_stop(struct th_daemon *d)
{
	if (d->pid <= 0)
		return -1;
	kill(d->pid, SIGTERM);
	return th_daemon_reap(d);
}

int th_daemon_reap(struct th_daemon *d)
{
	struct timespec t0;
	int status = 0, rc = -1, errs;
	pid_t w = 0;

	if (d->pid <= 0)
		return -1;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	while (ms_since(&t0) < 30000 && (w = waitpid(d->pid, &status, WNOHANG)) == 0)
		usleep(10000);
	if (w == 0) {
		fprintf(stderr, "harness: commd did not stop within 30 s of SIGTERM\n");
		kill(d->pid, SIGKILL);
		waitpid(d->pid, &status, 0);
	} else if (w < 0) {
		fprintf(stderr, "harness: commd had already exited\n");
	} else if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
		fprintf(stderr, "harness: commd stopped with status 0x%x\n", status);
	} else if ((errs = log_errors(d)) > 0) {
		fprintf(stderr, "harness: commd logged %d error line%s\n", errs,
			errs == 1 ? "" : "s");
	} else {
		rc = 0;
	}
	if (rc < 0)
		th_daemon_dump_log(d);
	close(d->notify_fd);
	if (rc == 0)
		remove_dir(d->dir);
	d->pid = 0;
	return rc;
}

int th_ranks_start_nodes(struct th_ranks *rs, const struct th_daemon *const *ds,
			 const int *daemon_of_rank, const char *root, const char *job, int n,
			 th_rank_fn fn, void *arg)
{
	char token[64];

	rs->n = n;
	rs->pids = calloc((size_t)n, sizeof *rs->pids);
	if (!rs->pids)
		return -1;
	snprintf(token, sizeof token, "token-%s-%d", job, (int)getpid());
	fflush(NULL);
	for (int r = 0; r < n; r++) {
		pid_t pid = fork();

		if (pid < 0) {
			perror("harness: fork");
			return -1;
		}
		if (pid == 0) {
			char buf[32];

			setenv("COMM_SOCKET", ds[daemon_of_rank ? daemon_of_rank[r] : 0]->sock, 1);
			if (root)
				setenv("COMM_ROOT", root, 1);
			else
				unsetenv("COMM_ROOT");
			setenv("COMM_JOB", job, 1);
			setenv("COMM_TOKEN", token, 1);
			snprintf(buf, sizeof buf, "%d", r);
			setenv("COMM_RANK", buf, 1);
			snprintf(buf, sizeof buf, "%d", n);
			setenv("COMM_WORLD_SIZE", buf, 1);
			_exit(fn(r, n, arg));
		}
		rs->pids[r] = pid;
	}
	return 0;
}

int th_ranks_start(struct th_ranks *rs, const struct th_daemon *d, const char *job, int n,
		   th_rank_fn fn, void *arg)
{
	return th_ranks_start_nodes(rs, &d, NULL, NULL, job, n, fn, arg);
}

int th_ranks_wait(struct th_ranks *rs)
{
	int failed = 0;

	for (int r = 0; r < rs->n; r++) {
		int status;

		if (rs->pids[r] <= 0 || waitpid(rs->pids[r], &status, 0) < 0) {
			failed++;
			continue;
		}
		if (WIFEXITED(status) && WEXITSTATUS(status) == 0)
			continue;
		failed++;
		if (WIFSIGNALED(status))
			fprintf(stderr, "harness: rank %d killed by signal %d\n", r,
				WTERMSIG(status));
		else
			fprintf(stderr, "harness: rank %d exited with %d\n", r,
				WEXITSTATUS(status));
	}
	free(rs->pids);
	rs->pids = NULL;
	return failed;
}

int th_run_ranks(const struct th_daemon *d, const char *job, int n, th_rank_fn fn, void *arg)
{
	struct th_ranks rs;

	if (th_ranks_start(&rs, d, job, n, fn, arg) < 0)
		return n;
	return th_ranks_wait(&rs);
}

int th_run_ranks_nodes(const struct th_daemon *const *ds, const int *daemon_of_rank,
		       const char *root, const char *job, int n, th_rank_fn fn, void *arg)
{
	struct th_ranks rs;

	if (th_ranks_start_nodes(&rs, ds, daemon_of_rank, root, job, n, fn, arg) < 0)
		return n;
	return th_ranks_wait(&rs);
}

int th_count_fds(pid_t pid)
{
	char path[64];
	struct dirent *e;
	DIR *dp;
	int n = 0;

	snprintf(path, sizeof path, "/proc/%d/fd", (int)pid);
	dp = opendir(path);
	if (!dp)
		return -1;
	while ((e = readdir(dp)))
		if (e->d_name[0] != '.')
			n++;
	closedir(dp);
	return n;
}

int th_count_memfd_maps(pid_t pid)
{
	char path[64], line[512];
	FILE *f;
	int n = 0;

	snprintf(path, sizeof path, "/proc/%d/maps", (int)pid);
	f = fopen(path, "r");
	if (!f)
		return -1;
	while (fgets(line, sizeof line, f))
		if (strstr(line, "/memfd:"))
			n++;
	fclose(f);
	return n;
}

/* From /proc/PID/stat: the state and parent of process pid; -1 when it is gone. */
static int proc_stat(const char *pid, char *comm, size_t len, char *state, int *ppid)
{
	char path[300], line[512], *open_paren, *close_paren;
	FILE *f;
	int ok;

	snprintf(path, sizeof path, "/proc/%s/stat", pid);
	if (!(f = fopen(path, "r")))
		return -1;
	ok = fgets(line, sizeof line, f) != NULL;
	fclose(f);
	/* "pid (comm) state ppid ...": comm may hold spaces and ')' */
	if (!ok || !(open_paren = strchr(line, '(')) || !(close_paren = strrchr(line, ')')) ||
	    sscanf(close_paren + 1, " %c %d", state, ppid) != 2)
		return -1;
	*close_paren = '\0';
	snprintf(comm, len, "%s", open_paren + 1);
	return 0;
}

int th_children(pid_t parent, const char *name, pid_t *first)
{
	DIR *dp = opendir("/proc");
	struct dirent *e;
	int n = 0;

	if (first)
		*first = 0;
	while (dp && (e = readdir(dp))) {
		char comm[64], state;
		int ppid;

		if (*e->d_name < '1' || *e->d_name > '9' ||
		    proc_stat(e->d_name, comm, sizeof comm, &state, &ppid) < 0 || ppid != parent ||
		    state == 'Z' || strncmp(comm, name, strlen(name)) != 0)
			continue;
		if (first && !*first)
			*first = (pid_t)atoi(e->d_name);
		n++;
	}
	if (dp)
		closedir(dp);
	return n;
}

int th_gone_within(pid_t pid, long limit_ms)
{
	struct timespec t0;
	char id[16];

	clock_gettime(CLOCK_MONOTONIC, &t0);
	snprintf(id, sizeof id, "%d", (int)pid);
	do {
		char comm[64], state;
		int ppid;

		if (proc_stat(id, comm, sizeof comm, &state, &ppid) < 0 || state == 'Z')
			return 1;
		usleep(20000);
	} while (th_secs_since(&t0) * 1000 < limit_ms);
	return 0;
}

void th_check_baseline(const struct th_daemon *d, int fds0, const char *after)
{
	int fds = -1, maps = -1;

	/*
	 * Fewer fds than at the baseline is no leak: commd's start-up GPU probe
	 * (a child and its pipe) may still have been running when it was taken.
	 */
	for (int i = 0; i < 300; i++) {
		fds = th_count_fds(d->pid);
		maps = th_count_memfd_maps(d->pid);
		if (fds <= fds0 && maps == 0)
			break;
		usleep(10 * 1000);
	}
	CHECK(fds <= fds0, "after %s: daemon has %d fds, had %d", after, fds, fds0);
	CHECK(maps == 0, "after %s: daemon still maps %d memfds", after, maps);
}
