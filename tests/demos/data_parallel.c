/*
 * data_parallel.c: the reference run's data-parallel training. Run as
 * `commrun -n 4 tests/demos/data_parallel`: every rank holds the whole MLP
 * (mlp.h: four 1024x1024 layers, no biases), trains on its slice of the
 * batch of 128 and all-reduces the gradients (AVG) before each SGD step.
 * Checks that the parameters are bitwise the same on every rank after each
 * step and, on rank 0, equal to one process training on the whole batch.
 * With --device the gradients and losses are all-reduced in GPU memory
 * (copied there after the backward pass and back before the step): the
 * lines are the host run's, bit for bit.
 */
#include <config.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "comm.h"
#include "demo-device.h"
#include "mlp.h"

#define STEPS 2
/* max |params - unsplit params| / max |unsplit params|. Float rounding of
 * the sums over the batch makes it about 6e-8; an all-reduce left out or
 * summing rather than averaging makes it 5e-4 or more. */
#define TOLERANCE 1e-5

static int fail(comm_t *c, const char *what, comm_result_t rc)
{
	fprintf(stderr, "[data_parallelism] Rank %d: %s: %s: %s\n", comm_rank(c), what,
		comm_strerror(rc), comm_last_error(c));
	comm_abort(c);
	return 1;
}

static uint64_t params_hash(const struct mlp *m)
{
	uint64_t h = MLP_HASH_INIT;

	for (int l = 0; l < m->layers; l++)
		h = mlp_hash(m->w[l], (size_t)m->dim * m->dim * sizeof(float), h);
	return h;
}

/* Rank 0: the unsplit model's step on the whole batch, compared with ours. */
static int check_unsplit(struct mlp *ref, const struct mlp *m, const float *x, const float *t,
			 float *grad, int step, float avg_loss)
{
	size_t wn = (size_t)m->dim * m->dim;
	float loss = mlp_grad(ref, x, t, MLP_BATCH, grad);
	double diff = 0;
	int bad = 0;

	if (isnan(loss)) {
		fprintf(stderr, "[data_parallelism] Rank 0: unsplit model: out of memory\n");
		return 1;
	}
	mlp_sgd(ref, grad, MLP_LR);
	for (int l = 0; l < m->layers; l++) {
		double d = mlp_rel_diff(m->w[l], ref->w[l], wn);

		if (!(d <= diff))
			diff = d;
	}
	if (!(diff <= TOLERANCE)) {
		fprintf(stderr,
			"[data_parallelism] Rank 0: step %d: parameters differ from the unsplit "
			"model's by %.3g (relative), over %g\n",
			step, diff, TOLERANCE);
		bad = 1;
	}
	/* the mean of the ranks' losses is the loss over the whole batch */
	if (!(fabs((double)avg_loss - loss) <= TOLERANCE * fabs((double)loss))) {
		fprintf(stderr,
			"[data_parallelism] Rank 0: step %d: mean loss over ranks %.9g, the "
			"unsplit model's %.9g\n",
			step, (double)avg_loss, (double)loss);
		bad = 1;
	}
	return bad;
}

/* All-reduce (AVG) count floats of buf in place, through device memory d when not NULL. */
static comm_result_t allreduce_avg(comm_t *c, float *buf, float *d, size_t count)
{
	size_t bytes = count * sizeof *buf;
	comm_result_t rc;

	if (!d)
		return comm_allreduce(c, buf, buf, count, COMM_FLOAT32, COMM_AVG, NULL);
	if (demo_copy(d, buf, bytes, 1))
		return COMM_ERR_INTERNAL;
	rc = comm_allreduce(c, d, d, count, COMM_FLOAT32, COMM_AVG, NULL);
	if (rc == COMM_OK && demo_copy(buf, d, bytes, 0))
		return COMM_ERR_INTERNAL;
	return rc;
}

int main(int argc, char **argv)
{
	size_t wn = (size_t)MLP_DIM * MLP_DIM, count = MLP_LAYERS * wn;
	float *x = NULL, *t = NULL, *grad, *ref_grad = NULL, *lossbuf;
	struct mlp m, ref = { 0 };
	uint64_t *hashes;
	float *d_grad = NULL, *d_loss = NULL; /* --device: where the all-reduces run */
	int on_device = argc == 2 && !strcmp(argv[1], "--device"), dev = 0;
	comm_result_t rc;
	int r, n, rows, bad = 0;
	comm_t *c;

	if (argc > 1 && !on_device) {
		fprintf(stderr, "usage: data_parallel [--device]\n");
		return 2;
	}
	if (on_device && (bad = demo_device_open(&dev)))
		return bad;
	c = mlp_join("data_parallelism");
	if (!c)
		return 1;
	r = comm_rank(c);
	n = comm_size(c);
	if (MLP_BATCH % n != 0) {
		fprintf(stderr,
			"[data_parallelism] Rank %d: a batch of %d does not split over %d ranks\n",
			r, MLP_BATCH, n);
		comm_finalize(c);
		return 1;
	}
	rows = MLP_BATCH / n;

	grad = comm_mem_alloc(c, count * sizeof *grad);
	hashes = comm_mem_alloc(c, (size_t)n * sizeof *hashes);
	lossbuf = comm_mem_alloc(c, sizeof *lossbuf);
	if (!grad || !hashes || !lossbuf)
		return fail(c, "comm_mem_alloc", COMM_ERR_NO_MEMORY);
	if (on_device && (!(d_grad = demo_alloc(count * sizeof *grad)) ||
			  !(d_loss = demo_alloc(sizeof *lossbuf))))
		return fail(c, "cudaMalloc", COMM_ERR_NO_MEMORY);
	x = malloc((size_t)MLP_BATCH * MLP_DIM * sizeof *x);
	t = malloc((size_t)MLP_BATCH * MLP_DIM * sizeof *t);
	if (!x || !t || mlp_init(&m) < 0)
		return fail(c, "malloc", COMM_ERR_NO_MEMORY);
	if (r == 0 && (mlp_init(&ref) < 0 || !(ref_grad = malloc(count * sizeof *ref_grad))))
		return fail(c, "malloc", COMM_ERR_NO_MEMORY);
	mlp_batch(x, t);

	for (int step = 0; step < STEPS; step++) {
		size_t off = (size_t)r * rows * MLP_DIM; /* our rows of the batch */
		const float *xs = x + off, *ts = t + off;
		float loss = mlp_grad(&m, xs, ts, rows, grad);
		char ls[64], ps[256];

		if (isnan(loss))
			return fail(c, "forward and backward", COMM_ERR_NO_MEMORY);
		rc = allreduce_avg(c, grad, d_grad, count);
		if (rc != COMM_OK)
			return fail(c, "all-reduce of the gradients", rc);
		mlp_sgd(&m, grad, MLP_LR);
		printf("[data_parallelism] Rank %d: step = %d, loss = %s, params = %s\n", r, step,
		       mlp_repr(ls, sizeof ls, (double)loss), mlp_params_str(ps, sizeof ps, &m));

		/* every rank must now hold the very same parameters */
		hashes[r] = params_hash(&m);
		rc = comm_allgather(c, hashes + r, hashes, 1, COMM_UINT64, NULL);
		if (rc != COMM_OK)
			return fail(c, "all-gather of the parameter hashes", rc);
		for (int q = 0; q < n; q++) {
			if (hashes[q] != hashes[r]) {
				fprintf(stderr,
					"[data_parallelism] Rank %d: step %d: rank %d's parameters "
					"differ from ours (hash %016llx, ours %016llx)\n",
					r, step, q, (unsigned long long)hashes[q],
					(unsigned long long)hashes[r]);
				bad = 1;
				break;
			}
		}
		lossbuf[0] = loss;
		rc = allreduce_avg(c, lossbuf, d_loss, 1);
		if (rc != COMM_OK)
			return fail(c, "all-reduce of the losses", rc);
		if (r == 0)
			bad |= check_unsplit(&ref, &m, x, t, ref_grad, step, lossbuf[0]);
	}

	demo_free(d_grad);
	demo_free(d_loss);
	free(ref_grad);
	mlp_free(&ref);
	mlp_free(&m);
	free(t);
	free(x);
	rc = comm_finalize(c);
	if (rc != COMM_OK) {
		fprintf(stderr, "[data_parallelism] Rank %d: comm_finalize: %s\n", r,
			comm_strerror(rc));
		return 1;
	}
	return bad;
}
