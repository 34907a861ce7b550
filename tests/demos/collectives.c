/*
 * collectives.c: the reference run's collectives through commd. Run as
 * `commrun -n 4 tests/demos/collectives [--device]`; each rank prints the
 * before and after lines of ../shared/reference/reference-run.txt and checks
 * its values. With --device the tensors live in GPU memory (rank r on device
 * r mod the device count) and the lines end in `, device='cuda:N'` as the
 * reference's do; it exits 77 where no GPU works (or CUDA is not built in).
 */
#include <config.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "comm.h"
#include "demo-device.h"

/* Where the ranks' tensors live: the host, or device `dev`. */
static int on_device, dev;
static char suffix[32];

static void *tensor_alloc(comm_t *c, size_t bytes)
{
	return on_device ? demo_alloc(bytes) : comm_mem_alloc(c, bytes);
}

/* Copy between the host view and the tensor (the same memory on the host). */
static void put(void *t, const void *h, size_t bytes)
{
	if (on_device)
		demo_copy(t, h, bytes, 1);
}

static void get(void *h, const void *t, size_t bytes)
{
	if (on_device)
		demo_copy(h, t, bytes, 0);
}

static void tensor_free(void *t, void *h)
{
	if (!on_device)
		return;
	demo_free(t);
	free(h);
}

/* Format like torch prints a small float tensor: tensor([ 6., 10.]). */
static char *tensor_str(const float *v, int n, char *buf, size_t len)
{
	char items[64][32];
	int width = 0, integral = 1;
	size_t off;

	for (int i = 0; i < n; i++)
		if (v[i] != floorf(v[i]))
			integral = 0;
	for (int i = 0; i < n && i < 64; i++) {
		int w = integral ? snprintf(items[i], sizeof items[i], "%.0f.", (double)v[i])
				 : snprintf(items[i], sizeof items[i], "%.4f", (double)v[i]);
		if (w > width)
			width = w;
	}
	off = (size_t)snprintf(buf, len, "tensor([");
	for (int i = 0; i < n && i < 64 && off < len; i++)
		off += (size_t)snprintf(buf + off, len - off, "%s%*s", i ? ", " : "", width,
					items[i]);
	snprintf(buf + off, len > off ? len - off : 0, "]%s)", suffix);
	return buf;
}

static int fail(comm_t *c, const char *what, comm_result_t rc)
{
	fprintf(stderr, "Rank %d: %s: %s: %s\n", comm_rank(c), what, comm_strerror(rc),
		comm_last_error(c));
	return 1;
}

/* Compare got with want; print the first difference. */
static int check(int rank, const char *what, const float *got, const float *want, int n)
{
	for (int i = 0; i < n; i++) {
		if (got[i] != want[i]) {
			fprintf(stderr, "Rank %d: %s: element %d is %g, expected %g\n", rank, what,
				i, (double)got[i], (double)want[i]);
			return 1;
		}
	}
	return 0;
}

int main(int argc, char **argv)
{
	char a[512], b[512];
	comm_t *c;
	comm_result_t rc;
	float *in, *out, *one, *want, *t_in, *t_out, *t_one;
	int r, n, bad = 0;
	size_t row;

	on_device = argc == 2 && !strcmp(argv[1], "--device");
	if (argc > 1 && !on_device) {
		fprintf(stderr, "usage: collectives [--device]\n");
		return 2;
	}
	if (on_device && (bad = demo_device_open(&dev)))
		return bad;
	if (on_device)
		snprintf(suffix, sizeof suffix, ", device='cuda:%d'", dev);
	rc = comm_init(&c, NULL);
	if (rc != COMM_OK) {
		fprintf(stderr, "comm_init: %s: %s\n", comm_strerror(rc), comm_last_error(NULL));
		return 1;
	}
	r = comm_rank(c);
	n = comm_size(c);
	row = (size_t)n * sizeof *in;
	/* t_*: the tensors the ops take; in, out, one: what the host prints and checks */
	t_in = tensor_alloc(c, row);
	t_out = tensor_alloc(c, row);
	t_one = tensor_alloc(c, sizeof *one);
	in = on_device ? malloc(row) : t_in;
	out = on_device ? malloc(row) : t_out;
	one = on_device ? malloc(sizeof *one) : t_one;
	want = calloc((size_t)n, sizeof *want);
	if (!t_in || !t_out || !t_one || !in || !out || !one || !want)
		return fail(c, "allocating the tensors", COMM_ERR_NO_MEMORY);
	/* rank r holds [r, r+1, ...]; the sum over ranks of element i is n*i + n(n-1)/2 */
	for (int i = 0; i < n; i++) {
		in[i] = (float)(r + i);
		want[i] = (float)(n * i + n * (n - 1) / 2);
	}

	printf("Rank %d [before all-reduce]: %s\n", r, tensor_str(in, n, a, sizeof a));
	memcpy(out, in, row);
	put(t_in, in, row);
	put(t_out, out, row);
	rc = comm_allreduce(c, t_out, t_out, (size_t)n, COMM_FLOAT32, COMM_SUM, NULL);
	if (rc != COMM_OK)
		return fail(c, "all-reduce", rc);
	get(out, t_out, row);
	printf("Rank %d [after all-reduce]: %s\n", r, tensor_str(out, n, a, sizeof a));
	bad |= check(r, "all-reduce", out, want, n);

	one[0] = 0;
	put(t_one, one, sizeof *one);
	printf("Rank %d [before reduce-scatter]: input = %s, output = %s\n", r,
	       tensor_str(in, n, a, sizeof a), tensor_str(one, 1, b, sizeof b));
	rc = comm_reduce_scatter(c, t_in, t_one, 1, COMM_FLOAT32, COMM_SUM, NULL);
	if (rc != COMM_OK)
		return fail(c, "reduce-scatter", rc);
	get(one, t_one, sizeof *one);
	printf("Rank %d [after reduce-scatter]: input = %s, output = %s\n", r,
	       tensor_str(in, n, a, sizeof a), tensor_str(one, 1, b, sizeof b));
	bad |= check(r, "reduce-scatter", one, &want[r], 1);

	memcpy(out, in, row);
	put(t_out, out, row);
	printf("Rank %d [before all-gather]: input = %s, output = %s\n", r,
	       tensor_str(one, 1, a, sizeof a), tensor_str(out, n, b, sizeof b));
	rc = comm_allgather(c, t_one, t_out, 1, COMM_FLOAT32, NULL);
	if (rc != COMM_OK)
		return fail(c, "all-gather", rc);
	get(out, t_out, row);
	printf("Rank %d [after all-gather]: input = %s, output = %s\n", r,
	       tensor_str(one, 1, a, sizeof a), tensor_str(out, n, b, sizeof b));
	bad |= check(r, "all-gather", out, want, n);

	/* broadcast: rank 0's [0, 1, ...] reaches everyone */
	for (int i = 0; i < n; i++) {
		out[i] = (float)(r + i);
		want[i] = (float)i;
	}
	put(t_out, out, row);
	printf("Rank %d [before broadcast]: %s\n", r, tensor_str(out, n, a, sizeof a));
	rc = comm_broadcast(c, t_out, t_out, (size_t)n, COMM_FLOAT32, 0, NULL);
	if (rc != COMM_OK)
		return fail(c, "broadcast", rc);
	get(out, t_out, row);
	printf("Rank %d [after broadcast]: %s\n", r, tensor_str(out, n, a, sizeof a));
	bad |= check(r, "broadcast", out, want, n);

	/* reduce: the all-reduce's sums, on rank 0 only */
	memset(out, 0, row);
	put(t_out, out, row);
	rc = comm_reduce(c, t_in, t_out, (size_t)n, COMM_FLOAT32, COMM_SUM, 0, NULL);
	if (rc != COMM_OK)
		return fail(c, "reduce", rc);
	get(out, t_out, row);
	printf("Rank %d [after reduce to rank 0]: input = %s, output = %s\n", r,
	       tensor_str(in, n, a, sizeof a), tensor_str(out, n, b, sizeof b));
	for (int i = 0; i < n; i++)
		want[i] = r == 0 ? (float)(n * i + n * (n - 1) / 2) : 0;
	bad |= check(r, "reduce", out, want, n);

	/* all-to-all: element j of rank r goes to rank j, as element r */
	for (int i = 0; i < n; i++) {
		in[i] = (float)(n * r + i);
		want[i] = (float)(n * i + r);
	}
	put(t_in, in, row);
	rc = comm_alltoall(c, t_in, t_out, 1, COMM_FLOAT32, NULL);
	if (rc != COMM_OK)
		return fail(c, "all-to-all", rc);
	get(out, t_out, row);
	printf("Rank %d [after all-to-all]: input = %s, output = %s\n", r,
	       tensor_str(in, n, a, sizeof a), tensor_str(out, n, b, sizeof b));
	bad |= check(r, "all-to-all", out, want, n);

	rc = comm_barrier(c, NULL);
	if (rc != COMM_OK)
		return fail(c, "barrier", rc);
	printf("Rank %d [barrier]: every rank has arrived\n", r);

	free(want);
	rc = comm_finalize(c);
	/* device tensors outlive the comm that had them registered, as in torch */
	tensor_free(t_in, in);
	tensor_free(t_out, out);
	tensor_free(t_one, one);
	if (rc != COMM_OK) {
		fprintf(stderr, "Rank %d: comm_finalize: %s\n", r, comm_strerror(rc));
		return 1;
	}
	return bad;
}
