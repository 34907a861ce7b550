/*
 * test-env.c: comm_init(&c, NULL) finds job, rank and world size in the
 * environment of each launcher (ours, torchrun, Open MPI, Slurm), and an
 * explicit config wins over the environment; a socket path where no commd
 * can be is said to be so, and one too long is a bad argument.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "comm.h"
#include "harness.h"

/* Variables each launcher sets: name=value pairs, %r for the rank. */
static const char *const launchers[][6] = {
	{ "torchrun", "RANK=%r", "WORLD_SIZE=3", "MASTER_ADDR=127.0.0.1", "MASTER_PORT=29500",
	  NULL },
	{ "openmpi", "OMPI_COMM_WORLD_RANK=%r", "OMPI_COMM_WORLD_SIZE=3", "PMIX_NAMESPACE=ns42",
	  NULL, NULL },
	{ "slurm", "SLURM_PROCID=%r", "SLURM_NTASKS=3", "SLURM_JOB_ID=77", "SLURM_STEP_ID=1", NULL },
};

static const char *const ours[] = { "COMM_JOB", "COMM_RANK", "COMM_WORLD_SIZE", NULL };

/* Replace the harness's COMM_* variables by one launcher's, then join. */
static int rank_launcher(int rank, int n, void *arg)
{
	const char *const *vars = arg;
	int v = 1, rc;
	comm_t *c;

	for (int i = 0; ours[i]; i++)
		unsetenv(ours[i]);
	for (int i = 1; i < 6 && vars[i]; i++) {
		char name[64], value[64];
		const char *eq = strchr(vars[i], '=');

		snprintf(name, sizeof name, "%.*s", (int)(eq - vars[i]), vars[i]);
		snprintf(value, sizeof value, "%s", eq + 1);
		if (strcmp(value, "%r") == 0)
			snprintf(value, sizeof value, "%d", rank);
		setenv(name, value, 1);
	}
	if (comm_init(&c, NULL) != COMM_OK) {
		fprintf(stderr, "%s rank %d: comm_init: %s\n", vars[0], rank, comm_last_error(NULL));
		return 1;
	}
	rc = comm_rank(c) == rank && comm_size(c) == 3 &&
	     comm_allreduce(c, &v, &v, 1, COMM_INT32, COMM_SUM, NULL) == COMM_OK && v == 3;
	if (!rc)
		fprintf(stderr, "%s rank %d: rank %d size %d sum %d\n", vars[0], rank, comm_rank(c),
			comm_size(c), v);
	comm_finalize(c);
	return rc ? 0 : 1;
}

/* The config's fields win; unset ones still come from the environment. */
static int rank_config(int rank, int n, void *arg)
{
	comm_config_t cfg = comm_config_default();
	comm_t *c;
	int v = rank;

	CHECK(cfg.socket == NULL && cfg.job == NULL && cfg.token == NULL && cfg.rank == -1 &&
		      cfg.world_size == -1 && cfg.timeout_ms == 0,
	      "comm_config_default is not all unset");
	setenv("COMM_RANK", "999", 1); /* overridden below */
	cfg.rank = rank;
	cfg.job = "explicit-config";
	if (comm_init(&c, &cfg) != COMM_OK) {
		fprintf(stderr, "config rank %d: %s\n", rank, comm_last_error(NULL));
		return 1;
	}
	CHECK(comm_allreduce(c, &v, &v, 1, COMM_INT32, COMM_MAX, NULL) == COMM_OK && v == n - 1,
	      "max over ranks: %d", v);
	comm_finalize(c);
	return check_failures ? 1 : 0;
}

/* Nothing names the job: a clear error, no connection attempt needed. */
static int rank_no_job(int rank, int n, void *arg)
{
	comm_t *c = NULL;

	unsetenv("COMM_JOB");
	if (comm_init(&c, NULL) != COMM_ERR_INVALID_ARG || c ||
	    !strstr(comm_last_error(NULL), "COMM_JOB")) {
		fprintf(stderr, "no job: %s\n", comm_last_error(NULL));
		return 1;
	}
	return 0;
}

/* comm_init of a job of 1 on socket: its result, the message in err. */
static comm_result_t init_on(const char *socket, char *err, size_t len)
{
	comm_config_t cfg = comm_config_default();
	comm_result_t rc;
	comm_t *c = NULL;

	cfg.socket = socket;
	cfg.job = "unreachable";
	cfg.rank = 0;
	cfg.world_size = 1;
	rc = comm_init(&c, &cfg);
	snprintf(err, len, "%s", comm_last_error(NULL));
	if (c)
		comm_finalize(c);
	return rc;
}

/*
 * No commd at the socket: the reason, then where to look; a directory or
 * a file where the socket should be is said to be one. A path too long for
 * a socket is a bad argument.
 */
static void test_unreachable(const struct th_daemon *d)
{
	char err[512], path[256], want[512];

	snprintf(path, sizeof path, "%s/none.sock", d->dir);
	snprintf(want, sizeof want,
		 "init: connect %s: No such file or directory (is commd running? set "
		 "COMM_SOCKET, or commrun --socket, to its socket)",
		 path);
	CHECK(init_on(path, err, sizeof err) == COMM_ERR_DAEMON_UNREACHABLE && !strcmp(err, want),
	      "no socket: %s", err);
	CHECK(init_on(d->dir, err, sizeof err) == COMM_ERR_DAEMON_UNREACHABLE &&
		      strstr(err, "is not a socket (a directory): set COMM_SOCKET"),
	      "a directory as the socket: %s", err);
	CHECK(init_on(d->log, err, sizeof err) == COMM_ERR_DAEMON_UNREACHABLE &&
		      strstr(err, "is not a socket (a file): set COMM_SOCKET"),
	      "a file as the socket: %s", err);
	printf("ok: no commd at the socket: where to look; a directory or file is said to be one\n");
	/* 108 bytes: no Unix socket has such a path, the caller's mistake */
	snprintf(path, sizeof path, "/tmp/%0103d", 0);
	CHECK(init_on(path, err, sizeof err) == COMM_ERR_INVALID_ARG &&
		      strstr(err, "init: socket path too long (108 bytes, at most 107)"),
	      "a socket path of 108 bytes: %s", err);
	printf("ok: a socket path too long is COMM_ERR_INVALID_ARG\n");
}

int main(void)
{
	struct th_daemon d;

	REQUIRE(th_daemon_start(&d, NULL) == 0, "daemon start");
	for (size_t i = 0; i < sizeof launchers / sizeof launchers[0]; i++) {
		CHECK(th_run_ranks(&d, launchers[i][0], 3, rank_launcher, (void *)launchers[i]) == 0,
		      "launcher %s", launchers[i][0]);
		printf("ok: %s environment\n", launchers[i][0]);
	}
	CHECK(th_run_ranks(&d, "config", 4, rank_config, NULL) == 0, "explicit config");
	CHECK(th_run_ranks(&d, "nojob", 1, rank_no_job, NULL) == 0, "no job name");
	printf("ok: explicit config, missing job name\n");
	test_unreachable(&d);
	CHECK(th_daemon_stop(&d) == 0, "daemon stop");
	return CHECK_EXIT();
}
