/*
 * tensor_parallel.c: the reference run's tensor-parallel forward pass. Run
 * as `commrun -n 4 tests/demos/tensor_parallel`: every rank holds a column
 * slice (1024 / ranks output columns) of each layer of the MLP in mlp.h,
 * computes its slice of the layer's output for the batch of 128, and the
 * slices are all-gathered into the whole activation for the next layer.
 * Checks that every rank ends with the same activations, equal to the
 * unsplit model's. With --device the activations are all-gathered in GPU
 * memory (rank r on device r mod the device count); the output is the same.
 */
#include <config.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "comm.h"
#include "demo-device.h"
#include "mlp.h"

/* max |ours - unsplit| / max |unsplit|. Each output element sums over the
 * same inputs in the same order either way, so it is 0 in practice. */
#define TOLERANCE 1e-5

static int fail(comm_t *c, const char *what, comm_result_t rc)
{
	fprintf(stderr, "[tensor_parallelism] Rank %d: %s: %s: %s\n", comm_rank(c), what,
		comm_strerror(rc), comm_last_error(c));
	comm_abort(c);
	return 1;
}

/*
 * All-gather block floats from each rank, ours at gathered + r * block,
 * through device memory d when not NULL.
 */
static comm_result_t gather(comm_t *c, float *gathered, float *d, size_t block)
{
	size_t r = (size_t)comm_rank(c), bytes = block * sizeof *gathered;
	comm_result_t rc;

	if (!d)
		return comm_allgather(c, gathered + r * block, gathered, block, COMM_FLOAT32, NULL);
	if (demo_copy(d + r * block, gathered + r * block, bytes, 1))
		return COMM_ERR_INTERNAL;
	rc = comm_allgather(c, d + r * block, d, block, COMM_FLOAT32, NULL);
	if (rc == COMM_OK && demo_copy(gathered, d, bytes * (size_t)comm_size(c), 0))
		return COMM_ERR_INTERNAL;
	return rc;
}

int main(int argc, char **argv)
{
	int on_device = argc == 2 && !strcmp(argv[1], "--device"), dev = 0;
	size_t an = (size_t)MLP_BATCH * MLP_DIM;
	float *slices[MLP_LAYERS] = { 0 }, *x, *act, *want, *gathered, *d_gathered = NULL;
	uint64_t *hashes;
	struct mlp m;
	comm_result_t rc;
	int r, n, cols, bad = 0;
	size_t block;
	double diff;
	char s[64];
	comm_t *c;

	if (argc > 1 && !on_device) {
		fprintf(stderr, "usage: tensor_parallel [--device]\n");
		return 2;
	}
	if (on_device && (bad = demo_device_open(&dev)))
		return bad;
	c = mlp_join("tensor_parallelism");
	if (!c)
		return 1;
	r = comm_rank(c);
	n = comm_size(c);
	if (MLP_DIM % n != 0) {
		fprintf(stderr,
			"[tensor_parallelism] Rank %d: %d columns do not split over %d ranks\n", r,
			MLP_DIM, n);
		comm_finalize(c);
		return 1;
	}
	cols = MLP_DIM / n;
	block = (size_t)MLP_BATCH * cols; /* one rank's slice of an activation */

	gathered = comm_mem_alloc(c, an * sizeof *gathered);
	hashes = comm_mem_alloc(c, (size_t)n * sizeof *hashes);
	if (!gathered || !hashes)
		return fail(c, "comm_mem_alloc", COMM_ERR_NO_MEMORY);
	if (on_device && !(d_gathered = demo_alloc(an * sizeof *gathered)))
		return fail(c, "cudaMalloc", COMM_ERR_NO_MEMORY);
	x = malloc(an * sizeof *x);
	act = malloc(an * sizeof *act);
	want = malloc(an * sizeof *want);
	if (!x || !act || !want || mlp_init(&m) < 0)
		return fail(c, "malloc", COMM_ERR_NO_MEMORY);
	/* our columns [r * cols, (r + 1) * cols) of each layer, dim x cols */
	for (int l = 0; l < MLP_LAYERS; l++) {
		slices[l] = malloc((size_t)MLP_DIM * cols * sizeof(float));
		if (!slices[l])
			return fail(c, "malloc", COMM_ERR_NO_MEMORY);
		for (int i = 0; i < MLP_DIM; i++)
			memcpy(slices[l] + (size_t)i * cols,
			       m.w[l] + (size_t)i * MLP_DIM + (size_t)r * cols,
			       (size_t)cols * sizeof(float));
	}
	mlp_batch(x, NULL);

	memcpy(act, x, an * sizeof *act);
	for (int l = 0; l < MLP_LAYERS; l++) {
		if (l > 0)
			mlp_relu(act, an);
		/* our 128 x cols slice, in place for the all-gather */
		mlp_matmul(MLP_BATCH, cols, MLP_DIM, act, MLP_DIM, slices[l], cols,
			   gathered + (size_t)r * block, cols);
		rc = gather(c, gathered, d_gathered, block);
		if (rc != COMM_OK)
			return fail(c, "all-gather of the activations", rc);
		/* rank q's block holds columns q * cols.. of every row: interleave */
		for (int q = 0; q < n; q++)
			for (int i = 0; i < MLP_BATCH; i++)
				memcpy(act + (size_t)i * MLP_DIM + q * cols,
				       gathered + q * block + (size_t)i * cols,
				       (size_t)cols * sizeof *act);
	}
	printf("[tensor_parallelism] Rank %d: forward pass produced activations %s\n", r,
	       mlp_summary(s, sizeof s, MLP_BATCH, MLP_DIM, act));

	if (mlp_forward(&m, 0, MLP_LAYERS, x, MLP_BATCH, want) < 0)
		return fail(c, "unsplit forward pass", COMM_ERR_NO_MEMORY);
	diff = mlp_rel_diff(act, want, an);
	if (!(diff <= TOLERANCE)) {
		fprintf(stderr,
			"[tensor_parallelism] Rank %d: activations differ from the unsplit model's "
			"by %.3g (relative), over %g\n",
			r, diff, TOLERANCE);
		bad = 1;
	}
	hashes[r] = mlp_hash(act, an * sizeof *act, MLP_HASH_INIT);
	rc = comm_allgather(c, hashes + r, hashes, 1, COMM_UINT64, NULL);
	if (rc != COMM_OK)
		return fail(c, "all-gather of the activation hashes", rc);
	for (int q = 0; q < n; q++) {
		if (hashes[q] != hashes[r]) {
			fprintf(stderr,
				"[tensor_parallelism] Rank %d: rank %d's activations differ from "
				"ours\n",
				r, q);
			bad = 1;
			break;
		}
	}

	for (int l = 0; l < MLP_LAYERS; l++)
		free(slices[l]);
	demo_free(d_gathered);
	mlp_free(&m);
	free(want);
	free(act);
	free(x);
	rc = comm_finalize(c);
	if (rc != COMM_OK) {
		fprintf(stderr, "[tensor_parallelism] Rank %d: comm_finalize: %s\n", r,
			comm_strerror(rc));
		return 1;
	}
	return bad;
}
