/*
 * pipeline_parallel.c: the reference run's pipeline-parallel forward pass.
 * Run as `commrun -n 4 tests/demos/pipeline_parallel`: each rank holds a
 * contiguous block of the layers of the MLP in mlp.h; the batch of 128 goes
 * through in micro-batches of 32, each sent rank to rank. Checks that the
 * last rank's output equals the unsplit model's.
 *
 * Four layers over n ranks: rank r gets 4 / n layers, the first 4 % n ranks
 * one more (so 3 ranks hold 2, 1, 1); more ranks than layers is refused.
 * With --device the micro-batches are sent and received in GPU memory
 * (rank r on device r mod the device count); the output is the same.
 */
#include <config.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "comm.h"
#include "demo-device.h"
#include "mlp.h"

#define MICRO_BATCHES 4
/* max |ours - unsplit| / max |unsplit|. Each row goes through the same
 * sums in the same order either way, so it is 0 in practice. */
#define TOLERANCE 1e-5

static int fail(comm_t *c, const char *what, comm_result_t rc)
{
	fprintf(stderr, "[pipeline_parallelism] Rank %d: %s: %s: %s\n", comm_rank(c), what,
		comm_strerror(rc), comm_last_error(c));
	comm_abort(c);
	return 1;
}

/* The first layer of rank r's block out of n. */
static int first_layer(int r, int n)
{
	int base = MLP_LAYERS / n, extra = MLP_LAYERS % n;

	return r * base + (r < extra ? r : extra);
}

/* Send (or receive) count floats of buf, through device memory d when not NULL. */
static comm_result_t pass_on(comm_t *c, int send, float *buf, float *d, size_t count, int peer)
{
	comm_result_t rc;

	if (!d)
		return send ? comm_send(c, buf, count, COMM_FLOAT32, peer, NULL)
			    : comm_recv(c, buf, count, COMM_FLOAT32, peer, NULL);
	if (send && demo_copy(d, buf, count * sizeof *buf, 1))
		return COMM_ERR_INTERNAL;
	rc = send ? comm_send(c, d, count, COMM_FLOAT32, peer, NULL)
		  : comm_recv(c, d, count, COMM_FLOAT32, peer, NULL);
	if (rc == COMM_OK && !send && demo_copy(buf, d, count * sizeof *buf, 0))
		return COMM_ERR_INTERNAL;
	return rc;
}

int main(int argc, char **argv)
{
	int on_device = argc == 2 && !strcmp(argv[1], "--device"), dev = 0;
	int r, n, first, last, rows = MLP_BATCH / MICRO_BATCHES, bad = 0;
	size_t an = (size_t)MLP_BATCH * MLP_DIM, mn = (size_t)rows * MLP_DIM;
	float *x, *out = NULL, *want = NULL, *buf, *d_buf = NULL;
	struct mlp m;
	comm_result_t rc;
	char s[64];
	comm_t *c;

	if (argc > 1 && !on_device) {
		fprintf(stderr, "usage: pipeline_parallel [--device]\n");
		return 2;
	}
	if (on_device && (bad = demo_device_open(&dev)))
		return bad;
	c = mlp_join("pipeline_parallelism");
	if (!c)
		return 1;
	r = comm_rank(c);
	n = comm_size(c);
	if (n > MLP_LAYERS) {
		fprintf(stderr,
			"[pipeline_parallelism] Rank %d: %d layers do not split over %d ranks\n",
			r, MLP_LAYERS, n);
		comm_finalize(c);
		return 1;
	}
	first = first_layer(r, n);
	last = first_layer(r + 1, n);

	buf = comm_mem_alloc(c, mn * sizeof *buf);
	if (!buf)
		return fail(c, "comm_mem_alloc", COMM_ERR_NO_MEMORY);
	if (on_device && !(d_buf = demo_alloc(mn * sizeof *buf)))
		return fail(c, "cudaMalloc", COMM_ERR_NO_MEMORY);
	x = malloc(an * sizeof *x);
	if (!x || mlp_init(&m) < 0)
		return fail(c, "malloc", COMM_ERR_NO_MEMORY);
	if (r == n - 1) { /* the outputs, and the unsplit model's to check them */
		out = malloc(an * sizeof *out);
		want = malloc(an * sizeof *want);
		if (!out || !want)
			return fail(c, "malloc", COMM_ERR_NO_MEMORY);
	}
	mlp_batch(x, NULL);

	for (int k = 0; k < MICRO_BATCHES; k++) {
		if (r == 0) {
			memcpy(buf, x + k * mn, mn * sizeof *buf);
		} else {
			rc = pass_on(c, 0, buf, d_buf, mn, r - 1);
			if (rc != COMM_OK)
				return fail(c, "recv", rc);
			printf("[pipeline_parallelism] Rank %d: received %s from rank %d\n", r,
			       mlp_summary(s, sizeof s, rows, MLP_DIM, buf), r - 1);
		}
		if (mlp_forward(&m, first, last, buf, rows, buf) < 0)
			return fail(c, "forward pass", COMM_ERR_NO_MEMORY);
		if (r < n - 1) {
			printf("[pipeline_parallelism] Rank %d: sending %s to rank %d\n", r,
			       mlp_summary(s, sizeof s, rows, MLP_DIM, buf), r + 1);
			rc = pass_on(c, 1, buf, d_buf, mn, r + 1);
			if (rc != COMM_OK)
				return fail(c, "send", rc);
		} else {
			memcpy(out + k * mn, buf, mn * sizeof *out);
		}
	}

	if (r == n - 1) {
		double diff;

		printf("[pipeline_parallelism] Rank %d: pipeline produced outputs %s\n", r,
		       mlp_summary(s, sizeof s, MLP_BATCH, MLP_DIM, out));
		if (mlp_forward(&m, 0, MLP_LAYERS, x, MLP_BATCH, want) < 0)
			return fail(c, "unsplit forward pass", COMM_ERR_NO_MEMORY);
		diff = mlp_rel_diff(out, want, an);
		if (!(diff <= TOLERANCE)) {
			fprintf(stderr,
				"[pipeline_parallelism] Rank %d: outputs differ from the unsplit "
				"model's by %.3g (relative), over %g\n",
				r, diff, TOLERANCE);
			bad = 1;
		}
	}

	demo_free(d_buf);
	free(want);
	free(out);
	mlp_free(&m);
	free(x);
	rc = comm_finalize(c);
	if (rc != COMM_OK) {
		fprintf(stderr, "[pipeline_parallelism] Rank %d: comm_finalize: %s\n", r,
			comm_strerror(rc));
		return 1;
	}
	return bad;
}
