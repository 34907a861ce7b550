/*
 * collectives.c: the reference run's collectives through commd. Run as
 * `commrun -n 4 tests/demos/collectives`; each rank prints the before and
 * after lines of ../shared/reference/reference-run.txt and checks its values.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "comm.h"

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
	snprintf(buf + off, len > off ? len - off : 0, "])");
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

int main(void)
{
	char a[512], b[512];
	comm_t *c;
	comm_result_t rc = comm_init(&c, NULL);
	float *in, *out, *one, *want;
	int r, n, bad = 0;

	if (rc != COMM_OK) {
		fprintf(stderr, "comm_init: %s\n", comm_strerror(rc));
		return 1;
	}
	r = comm_rank(c);
	n = comm_size(c);
	in = comm_mem_alloc(c, (size_t)n * sizeof *in);
	out = comm_mem_alloc(c, (size_t)n * sizeof *out);
	one = comm_mem_alloc(c, sizeof *one);
	want = calloc((size_t)n, sizeof *want);
	if (!in || !out || !one || !want)
		return fail(c, "comm_mem_alloc", COMM_ERR_NO_MEMORY);
	/* rank r holds [r, r+1, ...]; the sum over ranks of element i is n*i + n(n-1)/2 */
	for (int i = 0; i < n; i++) {
		in[i] = (float)(r + i);
		want[i] = (float)(n * i + n * (n - 1) / 2);
	}

	printf("Rank %d [before all-reduce]: %s\n", r, tensor_str(in, n, a, sizeof a));
	memcpy(out, in, (size_t)n * sizeof *in);
	rc = comm_allreduce(c, out, out, (size_t)n, COMM_FLOAT32, COMM_SUM, NULL);
	if (rc != COMM_OK)
		return fail(c, "all-reduce", rc);
	printf("Rank %d [after all-reduce]: %s\n", r, tensor_str(out, n, a, sizeof a));
	bad |= check(r, "all-reduce", out, want, n);

	one[0] = 0;
	printf("Rank %d [before reduce-scatter]: input = %s, output = %s\n", r,
	       tensor_str(in, n, a, sizeof a), tensor_str(one, 1, b, sizeof b));
	rc = comm_reduce_scatter(c, in, one, 1, COMM_FLOAT32, COMM_SUM, NULL);
	if (rc != COMM_OK)
		return fail(c, "reduce-scatter", rc);
	printf("Rank %d [after reduce-scatter]: input = %s, output = %s\n", r,
	       tensor_str(in, n, a, sizeof a), tensor_str(one, 1, b, sizeof b));
	bad |= check(r, "reduce-scatter", one, &want[r], 1);

	memcpy(out, in, (size_t)n * sizeof *in);
	printf("Rank %d [before all-gather]: input = %s, output = %s\n", r,
	       tensor_str(one, 1, a, sizeof a), tensor_str(out, n, b, sizeof b));
	rc = comm_allgather(c, one, out, 1, COMM_FLOAT32, NULL);
	if (rc != COMM_OK)
		return fail(c, "all-gather", rc);
	printf("Rank %d [after all-gather]: input = %s, output = %s\n", r,
	       tensor_str(one, 1, a, sizeof a), tensor_str(out, n, b, sizeof b));
	bad |= check(r, "all-gather", out, want, n);

	/* broadcast: rank 0's [0, 1, ...] reaches everyone */
	for (int i = 0; i < n; i++) {
		out[i] = (float)(r + i);
		want[i] = (float)i;
	}
	printf("Rank %d [before broadcast]: %s\n", r, tensor_str(out, n, a, sizeof a));
	rc = comm_broadcast(c, out, out, (size_t)n, COMM_FLOAT32, 0, NULL);
	if (rc != COMM_OK)
		return fail(c, "broadcast", rc);
	printf("Rank %d [after broadcast]: %s\n", r, tensor_str(out, n, a, sizeof a));
	bad |= check(r, "broadcast", out, want, n);

	/* reduce: the all-reduce's sums, on rank 0 only */
	memset(out, 0, (size_t)n * sizeof *out);
	rc = comm_reduce(c, in, out, (size_t)n, COMM_FLOAT32, COMM_SUM, 0, NULL);
	if (rc != COMM_OK)
		return fail(c, "reduce", rc);
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
	rc = comm_alltoall(c, in, out, 1, COMM_FLOAT32, NULL);
	if (rc != COMM_OK)
		return fail(c, "all-to-all", rc);
	printf("Rank %d [after all-to-all]: input = %s, output = %s\n", r,
	       tensor_str(in, n, a, sizeof a), tensor_str(out, n, b, sizeof b));
	bad |= check(r, "all-to-all", out, want, n);

	rc = comm_barrier(c, NULL);
	if (rc != COMM_OK)
		return fail(c, "barrier", rc);
	printf("Rank %d [barrier]: every rank has arrived\n", r);

	free(want);
	rc = comm_finalize(c);
	if (rc != COMM_OK) {
		fprintf(stderr, "Rank %d: comm_finalize: %s\n", r, comm_strerror(rc));
		return 1;
	}
	return bad;
}
