/*
 * matrix.c: run RELIABILITY.md's rows as TAP test points, a bystander job
 * beside each, and the after-row check.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "check.h"
#include "comm.h"
#include "matrix.h"

#define BY_COUNT 4096 /* int32 elements of the bystander's all-reduces */

/* Shared by the bystander's ranks and the test. */
struct bystander {
	volatile int stop; /* the test asks the job to end */
	volatile long ops; /* all-reduces finished, as rank 0 saw them */
	volatile long max_us;
};

static struct bystander *by;

long mx_now_ms(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

void mx_note(const char *fmt, ...)
{
	va_list ap;

	fputs("# ", stdout);
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	fputc('\n', stdout);
	fflush(stdout);
}

long mx_bystander_ops(void)
{
	return by->ops;
}

int mx_log_has(const struct th_daemon *d, const char *s)
{
	return th_log_count(d, s, "") > 0;
}

/*
 * The bystander: two ranks all-reduce BY_COUNT int32s in registered memory
 * until rank 0 sees the stop flag; element 0 carries rank 0's decision, so
 * both ranks stop after the same op. Every result is checked exactly.
 */
static int rank_bystander(int rank, int n, void *arg)
{
	struct timespec t0;
	comm_t *c;
	int32_t *v;
	comm_result_t rc;

	if (th_join(&c, rank, n) < 0)
		return 1;
	if (!(v = comm_mem_alloc(c, BY_COUNT * sizeof *v)))
		return th_bail(c);
	for (long it = 0;; it++) {
		long us;

		v[0] = rank == 0 ? by->stop : 0;
		for (int i = 1; i < BY_COUNT; i++)
			v[i] = (int32_t)(rank * 7 + i + it);
		clock_gettime(CLOCK_MONOTONIC, &t0);
		rc = comm_allreduce(c, v, v, BY_COUNT, COMM_INT32, COMM_SUM, NULL);
		if (rc != COMM_OK) {
			fprintf(stderr, "bystander rank %d: all-reduce %ld: %s (%s)\n", rank, it,
				comm_result_name(rc), comm_last_error(c));
			return th_bail(c);
		}
		for (int i = 1; i < BY_COUNT; i++)
			if (v[i] != (int32_t)(7 + 2 * (i + it))) {
				fprintf(stderr, "bystander rank %d: op %ld element %d is %d, want %d\n",
					rank, it, i, v[i], (int)(7 + 2 * (i + it)));
				return th_bail(c);
			}
		us = (long)(th_secs_since(&t0) * 1e6);
		if (rank == 0) {
			by->ops = it + 1;
			if (us > by->max_us)
				by->max_us = us;
		}
		if (v[0])
			break;
	}
	comm_mem_free(c, v);
	return th_leave(c, rank);
}

/* Start the bystander and wait until it has done an op (0), or -1. */
static int bystander_start(struct th_ranks *rs, const struct th_daemon *d, const char *id)
{
	char job[64];

	by->stop = 0;
	by->ops = 0;
	by->max_us = 0;
	snprintf(job, sizeof job, "bystander-%s", id);
	if (th_ranks_start(rs, d, job, 2, rank_bystander, NULL) < 0)
		return -1;
	for (int i = 0; i < 1000 && by->ops == 0; i++)
		usleep(10 * 1000);
	return by->ops > 0 ? 0 : -1;
}

/* Wait (3 s at most) for fds0 fds and no memfd mapped; 0, or -1 with the reason. */
static int baseline(const struct th_daemon *d, int fds0)
{
	int fds = -1, maps = -1;

	for (int i = 0; i < 300; i++) {
		fds = th_count_fds(d->pid);
		maps = th_count_memfd_maps(d->pid);
		if (fds == fds0 && maps == 0)
			return 0;
		usleep(10 * 1000);
	}
	fprintf(stderr, "after the row: commd has %d fds (baseline %d) and %d memfds mapped (0)\n",
		fds, fds0, maps);
	return -1;
}

static int selected(const char *id, int argc, char **argv)
{
	if (argc < 2)
		return 1;
	for (int i = 1; i < argc; i++)
		if (strcmp(argv[i], id) == 0)
			return 1;
	return 0;
}

/* Start the shared daemon and take its baseline after a first job; fds0 or -1. */
static int daemon_up(struct th_daemon *d, const char *const *args)
{
	struct th_ranks rs;

	if (th_daemon_startv(d, args) < 0)
		return -1;
	/* READY=1 races the daemon's close of its notify fd: the baseline comes after a job */
	if (bystander_start(&rs, d, "warm-up") < 0)
		return -1;
	by->stop = 1;
	if (th_ranks_wait(&rs) != 0)
		return -1;
	/* once the job's memory is unmapped and commd's fd count holds still for 0.3 s */
	for (int i = 0, same = 0, last = -1; i < 500 && same < 30; i++) {
		int fds = th_count_fds(d->pid);

		same = fds == last && th_count_memfd_maps(d->pid) == 0 ? same + 1 : 0;
		last = fds;
		usleep(10 * 1000);
	}
	return th_count_fds(d->pid);
}

int mx_main(int argc, char **argv, const struct mx_row *rows, int nrows,
	    const char *const *daemon_args)
{
	struct th_daemon d;
	int n = 0, k = 0, failed = 0, fds0;

	by = mmap(NULL, sizeof *by, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	REQUIRE(by != MAP_FAILED, "mmap");
	setvbuf(stdout, NULL, _IOLBF, 0);
	for (int i = 0; i < nrows; i++)
		n += selected(rows[i].id, argc, argv);
	printf("1..%d\n", n);
	fds0 = daemon_up(&d, daemon_args);
	if (fds0 < 0) {
		printf("Bail out! commd did not start or ran no job\n");
		return 1;
	}
	for (int i = 0; i < nrows; i++) {
		const struct mx_row *row = &rows[i];
		int failures0 = check_failures, ok;
		struct th_ranks rs;
		long t0;

		if (!selected(row->id, argc, argv))
			continue;
		k++;
		fprintf(stderr, "=== %s: %s\n", row->id, row->what);
		t0 = mx_now_ms();
		if (row->flags & MX_OWN_DAEMON) {
			row->run(&d);
			ok = check_failures == failures0;
		} else {
			int by_ok = bystander_start(&rs, &d, row->id) == 0;

			CHECK(by_ok, "%s: the bystander job did not start", row->id);
			row->run(&d);
			by->stop = 1;
			if (by_ok) {
				CHECK(th_ranks_wait(&rs) == 0, "%s: the bystander job failed", row->id);
				mx_note("%s: bystander: %ld all-reduces, slowest %.1f ms", row->id,
					by->ops, by->max_us / 1000.0);
			}
			CHECK(th_daemon_alive(&d), "%s: commd died", row->id);
			if (th_daemon_alive(&d))
				CHECK(baseline(&d, fds0) == 0, "%s: not back to the baseline", row->id);
			ok = check_failures == failures0;
		}
		printf("%s %d - %s %s (%.1f s)\n", ok ? "ok" : "not ok", k, row->id, row->what,
		       (mx_now_ms() - t0) / 1000.0);
		failed += !ok;
		if (!th_daemon_alive(&d)) {
			th_daemon_dump_log(&d);
			th_daemon_cleanup(&d);
			if ((fds0 = daemon_up(&d, daemon_args)) < 0) {
				printf("Bail out! commd did not restart\n");
				return 1;
			}
		}
	}
	if (th_daemon_stop(&d) != 0) {
		fprintf(stderr, "commd did not stop cleanly after the rows\n");
		return 1;
	}
	return failed ? 1 : 0;
}
