/*
 * mlp.c: the MLP shared by the parallel-training demos (see mlp.h): plain C,
 * a register-tiled matmul that gcc vectorises at -O2, no BLAS.
 */
#include "mlp.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define SEED_WEIGHTS 0x636f6d6d64ull /* "commd" */
#define SEED_INPUT 0x696e707574ull   /* "input" */
#define SEED_TARGET 0x7461726774ull  /* "targt" */

/* The matmul's tile: MR rows x NR columns of c kept in registers, k in
 * blocks of KC so a block of b stays in cache. */
#define MR 4
#define NR 16
#define KC 256

static uint64_t splitmix64(uint64_t *s)
{
	uint64_t z = (*s += 0x9e3779b97f4a7c15ull);

	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

/* n floats uniform in [lo, hi) from seed. */
static void fill_uniform(float *v, size_t n, uint64_t seed, float lo, float hi)
{
	uint64_t s = seed;

	for (size_t i = 0; i < n; i++) {
		float u = (float)(splitmix64(&s) >> 40) * 0x1p-24f;
		v[i] = lo + (hi - lo) * u;
	}
}

int mlp_init(struct mlp *m)
{
	size_t n = (size_t)MLP_DIM * MLP_DIM;
	float bound = 1.0f / sqrtf((float)MLP_DIM);

	memset(m, 0, sizeof *m);
	m->layers = MLP_LAYERS;
	m->dim = MLP_DIM;
	for (int l = 0; l < m->layers; l++) {
		m->w[l] = malloc(n * sizeof(float));
		if (!m->w[l]) {
			mlp_free(m);
			return -1;
		}
		fill_uniform(m->w[l], n, SEED_WEIGHTS + (uint64_t)l, -bound, bound);
	}
	return 0;
}

void mlp_free(struct mlp *m)
{
	for (int l = 0; l < MLP_LAYERS; l++) {
		free(m->w[l]);
		m->w[l] = NULL;
	}
}

void mlp_batch(float *x, float *t)
{
	size_t n = (size_t)MLP_BATCH * MLP_DIM;

	if (x)
		fill_uniform(x, n, SEED_INPUT, -1.0f, 1.0f);
	if (t)
		fill_uniform(t, n, SEED_TARGET, -0.2f, 0.2f);
}

/* One MR x NR tile of c over k: fixed trip counts, so gcc -O2 vectorises
 * the j loops. first: start from zero rather than from c. */
static void tile(int k, const float *restrict a, int lda, const float *restrict b, int ldb,
		 float *restrict c, int ldc, int first)
{
	float acc[MR][NR];

	for (int r = 0; r < MR; r++)
		for (int j = 0; j < NR; j++)
			acc[r][j] = first ? 0.0f : c[r * ldc + j];
	for (int p = 0; p < k; p++) {
		const float *bp = b + (size_t)p * ldb;

		for (int r = 0; r < MR; r++) {
			float av = a[r * lda + p];

			for (int j = 0; j < NR; j++)
				acc[r][j] += av * bp[j];
		}
	}
	for (int r = 0; r < MR; r++)
		for (int j = 0; j < NR; j++)
			c[r * ldc + j] = acc[r][j];
}

/* The same sums, one element at a time, for the edges tiles do not cover. */
static void edge(int m, int n, int k, const float *a, int lda, const float *b, int ldb, float *c,
		 int ldc, int first)
{
	for (int i = 0; i < m; i++) {
		for (int j = 0; j < n; j++) {
			float acc = first ? 0.0f : c[(size_t)i * ldc + j];

			for (int p = 0; p < k; p++)
				acc += a[(size_t)i * lda + p] * b[(size_t)p * ldb + j];
			c[(size_t)i * ldc + j] = acc;
		}
	}
}

void mlp_matmul(int m, int n, int k, const float *a, int lda, const float *b, int ldb, float *c,
		int ldc)
{
	int mt = m - m % MR, nt = n - n % NR;

	if (k == 0) {
		for (int i = 0; i < m; i++)
			memset(c + (size_t)i * ldc, 0, (size_t)n * sizeof *c);
		return;
	}
	for (int p = 0; p < k; p += KC) {
		int kc = k - p < KC ? k - p : KC;
		const float *ap = a + p, *bp = b + (size_t)p * ldb;

		for (int j = 0; j < nt; j += NR)
			for (int i = 0; i < mt; i += MR)
				tile(kc, ap + (size_t)i * lda, lda, bp + j, ldb,
				     c + (size_t)i * ldc + j, ldc, p == 0);
		if (nt < n)
			edge(m, n - nt, kc, ap, lda, bp + nt, ldb, c + nt, ldc, p == 0);
		if (mt < m)
			edge(m - mt, nt, kc, ap + (size_t)mt * lda, lda, bp, ldb,
			     c + (size_t)mt * ldc, ldc, p == 0);
	}
}

void mlp_transpose(int rows, int cols, const float *a, int lda, float *t, int ldt)
{
	enum { B = 32 };

	for (int i0 = 0; i0 < rows; i0 += B)
		for (int j0 = 0; j0 < cols; j0 += B)
			for (int i = i0; i < rows && i < i0 + B; i++)
				for (int j = j0; j < cols && j < j0 + B; j++)
					t[(size_t)j * ldt + i] = a[(size_t)i * lda + j];
}

void mlp_relu(float *x, size_t n)
{
	for (size_t i = 0; i < n; i++)
		x[i] = x[i] > 0.0f ? x[i] : 0.0f;
}

int mlp_forward(const struct mlp *m, int first, int last, const float *x, int rows, float *y)
{
	size_t n = (size_t)rows * m->dim;
	float *in = malloc(n * sizeof *in);

	if (!in)
		return -1;
	if (y != x)
		memcpy(y, x, n * sizeof *y);
	for (int l = first; l < last; l++) {
		memcpy(in, y, n * sizeof *in);
		if (l > 0)
			mlp_relu(in, n);
		mlp_matmul(rows, m->dim, m->dim, in, m->dim, m->w[l], m->dim, y, m->dim);
	}
	free(in);
	return 0;
}

float mlp_grad(const struct mlp *m, const float *x, const float *t, int rows, float *grad)
{
	int d = m->dim, nl = m->layers;
	size_t n = (size_t)rows * d, wn = (size_t)d * d;
	float *ins = malloc((size_t)nl * n * sizeof *ins); /* layer l's input */
	float *y = malloc(n * sizeof *y), *dy = malloc(n * sizeof *dy);
	float *dx = malloc(n * sizeof *dx), *xt = malloc(n * sizeof *xt);
	float *wt = malloc(wn * sizeof *wt);
	double sum = 0;
	float loss = NAN;

	if (!ins || !y || !dy || !dx || !xt || !wt)
		goto out;

	memcpy(ins, x, n * sizeof *ins);
	for (int l = 0; l < nl; l++) {
		float *out = l + 1 < nl ? ins + (size_t)(l + 1) * n : y;

		mlp_matmul(rows, d, d, ins + (size_t)l * n, d, m->w[l], d, out, d);
		if (l + 1 < nl)
			mlp_relu(out, n);
	}
	/* loss = mean (y - t)^2; dloss/dy = 2 (y - t) / n */
	for (size_t i = 0; i < n; i++) {
		float e = y[i] - t[i];

		sum += (double)e * e;
		dy[i] = 2.0f * e / (float)n;
	}
	loss = (float)(sum / (double)n);

	for (int l = nl - 1; l >= 0; l--) {
		const float *in = ins + (size_t)l * n;
		float *tmp;

		/* dW = in^T @ dy */
		mlp_transpose(rows, d, in, d, xt, rows);
		mlp_matmul(d, d, rows, xt, rows, dy, d, grad + (size_t)l * wn, d);
		if (l == 0)
			break;
		/* dx = dy @ W^T, through the ReLU that made in */
		mlp_transpose(d, d, m->w[l], d, wt, d);
		mlp_matmul(rows, d, d, dy, d, wt, d, dx, d);
		for (size_t i = 0; i < n; i++)
			if (!(in[i] > 0.0f))
				dx[i] = 0.0f;
		tmp = dy;
		dy = dx;
		dx = tmp;
	}
out:
	free(wt);
	free(xt);
	free(dx);
	free(dy);
	free(y);
	free(ins);
	return loss;
}

void mlp_sgd(struct mlp *m, const float *grad, float lr)
{
	size_t wn = (size_t)m->dim * m->dim;

	for (int l = 0; l < m->layers; l++)
		for (size_t i = 0; i < wn; i++)
			m->w[l][i] -= lr * grad[(size_t)l * wn + i];
}

double mlp_rel_diff(const float *a, const float *b, size_t n)
{
	double diff = 0, max = 0;

	for (size_t i = 0; i < n; i++) {
		double e = fabs((double)a[i] - (double)b[i]);

		if (!(e <= diff)) /* NaN sticks */
			diff = e;
		if (fabs((double)b[i]) > max)
			max = fabs((double)b[i]);
	}
	return max > 0 ? diff / max : diff;
}

uint64_t mlp_hash(const void *p, size_t n, uint64_t h)
{
	const unsigned char *s = p;

	for (size_t i = 0; i < n; i++) {
		h ^= s[i];
		h *= 0x100000001b3ull;
	}
	return h;
}

char *mlp_summary(char *buf, size_t len, int rows, int cols, const float *v)
{
	snprintf(buf, len, "%dx%d[%.4f...]", rows, cols, (double)v[0]);
	return buf;
}

char *mlp_params_str(char *buf, size_t len, const struct mlp *m)
{
	size_t off = 0;
	char s[64];

	off += (size_t)snprintf(buf, len, "[");
	for (int l = 0; l < m->layers && off < len; l++)
		off += (size_t)snprintf(buf + off, len - off, "%s'%s'", l ? ", " : "",
					mlp_summary(s, sizeof s, m->dim, m->dim, m->w[l]));
	if (off < len)
		snprintf(buf + off, len - off, "]");
	return buf;
}

char *mlp_repr(char *buf, size_t len, double v)
{
	char s[64];
	int prec = 1, exp;
	char *e;

	if (isnan(v) || isinf(v)) {
		snprintf(buf, len, "%s", isnan(v) ? "nan" : v > 0 ? "inf" : "-inf");
		return buf;
	}
	/* the fewest significant digits that read back as v */
	for (; prec < 17; prec++) {
		snprintf(s, sizeof s, "%.*e", prec - 1, v);
		if (strtod(s, NULL) == v)
			break;
	}
	snprintf(s, sizeof s, "%.*e", prec - 1, v);
	e = strchr(s, 'e');
	exp = e ? atoi(e + 1) : 0;
	/* Python writes positional notation for exponents -4 .. 15 */
	if (exp >= -4 && exp < 16) {
		int decimals = prec - 1 - exp;

		snprintf(buf, len, "%.*f%s", decimals > 0 ? decimals : 0, v,
			 decimals > 0 ? "" : ".0");
	} else {
		/* the mantissa as printed ("1.e" never happens: prec 1 prints no point) */
		snprintf(buf, len, "%.*se%c%02d", (int)(e - s), s, exp < 0 ? '-' : '+', abs(exp));
	}
	return buf;
}

comm_t *mlp_join(const char *tag)
{
	comm_t *c;
	comm_result_t rc;

	setvbuf(stdout, NULL, _IOLBF, 0);
	rc = comm_init(&c, NULL);
	if (rc != COMM_OK) {
		fprintf(stderr, "[%s] comm_init: %s: %s\n", tag, comm_strerror(rc),
			comm_last_error(NULL));
		return NULL;
	}
	return c;
}
