/*
 * harness.h: the real commd on a socket in a temp dir, ready when it says
 * READY=1 on its notify socket, and rank processes forked against it.
 */
#ifndef TESTS_HARNESS_H
#define TESTS_HARNESS_H

#include <sys/types.h>
#include <time.h>

#include "comm.h"

#define TH_WATCHDOG_S 120 /* a rank that hangs dies of SIGALRM */

struct th_daemon {
	char dir[128];
	char sock[192];
	char log[192];
	char peer[64];          /* --peer-listen address "HOST:PORT"; "" when none */
	pid_t pid;
	int notify_fd;          /* the fake NOTIFY_SOCKET, for the messages after READY=1 */
	char ready[512];        /* the message that said READY=1 */
};

/*
 * Start $COMMD (under $COMMD_WRAPPER when set) with --socket in a new temp
 * dir and the extra arguments (NULL-terminated); wait for READY=1.
 * Returns 0, or -1 with the reason printed.
 */
int th_daemon_start(struct th_daemon *d, ...);
/* th_daemon_start with the extra arguments in a NULL-terminated array (NULL: none). */
int th_daemon_startv(struct th_daemon *d, const char *const *args);
/*
 * th_daemon_start that also listens for other daemons on a free port of
 * 127.0.0.1 (--peer-listen); d->peer holds the address, for COMM_ROOT.
 */
int th_daemon_start_peer(struct th_daemon *d, ...);
/* SIGTERM; requires exit status 0 and no "error:" line in the log. 0 or -1. */
int th_daemon_stop(struct th_daemon *d);
/* th_daemon_stop's wait, for a daemon already sent its signal: 30 s at most, then SIGKILL. */
int th_daemon_reap(struct th_daemon *d);
/* Remove the temp dir of a daemon that is gone (killed by the test). */
void th_daemon_cleanup(struct th_daemon *d);
/* Print the daemon's log to stderr (for a failing test). */
void th_daemon_dump_log(const struct th_daemon *d);
/* Lines of the daemon's log with both a and b in them; -1 when it cannot be read. */
int th_log_count(const struct th_daemon *d, const char *a, const char *b);
/* Whether the daemon process is still alive; when not, says how it ended (once). */
int th_daemon_alive(const struct th_daemon *d);

typedef int (*th_rank_fn)(int rank, int size, void *arg);

struct th_ranks {
	int n;
	pid_t *pids;
};

/*
 * Fork n processes with COMM_SOCKET, COMM_JOB=job, COMM_TOKEN, COMM_RANK
 * and COMM_WORLD_SIZE set (COMM_ROOT unset); each exits with fn's return value.
 */
int th_ranks_start(struct th_ranks *rs, const struct th_daemon *d, const char *job, int n,
		   th_rank_fn fn, void *arg);
/*
 * th_ranks_start for a job over several daemons: rank r connects to
 * ds[daemon_of_rank[r]] and every rank has COMM_ROOT=root (the peer-listen
 * address of one of them; NULL leaves COMM_ROOT unset).
 */
int th_ranks_start_nodes(struct th_ranks *rs, const struct th_daemon *const *ds,
			 const int *daemon_of_rank, const char *root, const char *job, int n,
			 th_rank_fn fn, void *arg);
/* Wait for all; returns how many failed (non-zero exit or a signal). */
int th_ranks_wait(struct th_ranks *rs);
/* Both of the above. */
int th_run_ranks(const struct th_daemon *d, const char *job, int n, th_rank_fn fn, void *arg);
int th_run_ranks_nodes(const struct th_daemon *const *ds, const int *daemon_of_rank,
		       const char *root, const char *job, int n, th_rank_fn fn, void *arg);

/* A TCP port of 127.0.0.1 free a moment ago (bound to port 0, then closed); -1 on failure. */
int th_free_port(void);

/*
 * In a rank: comm_init from the environment and check rank and size, with
 * a watchdog alarm armed; 0, or -1 with the reason printed.
 */
int th_join(comm_t **c, int rank, int size);
/* comm_finalize; 0, or 1 with the reason printed. */
int th_leave(comm_t *c, int rank);
/* Whether rc is want; prints what happened otherwise (rank r, c's last error). */
int th_want_rc(comm_t *c, int r, const char *what, comm_result_t rc, comm_result_t want);
/* Give up after an op failed on this rank (the others' ops then fail too); returns 1. */
int th_bail(comm_t *c);

/* A rank function: join, all-reduce rank + 1 and check the sum, leave (0 when right). */
int th_rank_sum(int rank, int size, void *arg);

/* Seconds on CLOCK_MONOTONIC since t0 (taken with clock_gettime). */
double th_secs_since(const struct timespec *t0);

/* Count the open fds of a process (from /proc/PID/fd). */
int th_count_fds(pid_t pid);
/* Count the shared memfd mappings of a process (from /proc/PID/maps). */
int th_count_memfd_maps(pid_t pid);
/*
 * The live (not zombie) children of parent whose name (/proc's comm, 15
 * bytes at most) starts with name; *first (when not NULL) gets one of
 * them, 0 when none.
 */
int th_children(pid_t parent, const char *name, pid_t *first);
/* Whether process pid is gone, or a zombie, within limit_ms. */
int th_gone_within(pid_t pid, long limit_ms);
/*
 * CHECK that the daemon is back (within 3 s) to at most fds0 open fds and no
 * memfd mapped, after the part of the test named by after.
 */
void th_check_baseline(const struct th_daemon *d, int fds0, const char *after);

#endif
