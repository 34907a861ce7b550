/*
 * test-reduce.c: reduce_n against references computed here, for every dtype,
 * op, input count and length; NaN in MIN and MAX; the float16/bfloat16
 * conversions; the names.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "dtype.h"
#include "reduce.h"

#define NDTYPES (COMM_FLOAT64 + 1)
#define NOPS (COMM_AVG + 1)

/*
 * Tolerances for float32 and float64 against a float64 reference: SUM and AVG
 * within 1e-6 (float32) or 1e-12 (float64) of the sum of the inputs'
 * magnitudes (divided by n for AVG), PROD within that relative to |result|.
 * MIN, MAX and everything in float16/bfloat16 must match bit for bit.
 */
#define TOL_F32 1e-6
#define TOL_F64 1e-12

static uint64_t rng_state = 0x2545f4914f6cdd1dull;

static uint64_t rng(void)
{
	uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);

	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

/* Kept clear of libm, so the test links without -lm. */
static double absd(double x)
{
	return x < 0 ? -x : x;
}

static double pow2(int k)
{
	uint64_t x = (uint64_t)(k + 1023) << 52;
	double d;

	memcpy(&d, &x, sizeof(d));
	return d;
}

/* Uniform in [0, 1). */
static double rng_unit(void)
{
	return (double)(rng() >> 11) * 0x1p-53;
}

static uint32_t float_bits(float f)
{
	uint32_t x;

	memcpy(&x, &f, sizeof(x));
	return x;
}

static float bits_float(uint32_t x)
{
	float f;

	memcpy(&f, &x, sizeof(f));
	return f;
}

static int half_is_nan(uint16_t h)
{
	return (h & 0x7c00) == 0x7c00 && (h & 0x3ff) != 0;
}

static int bf16_is_nan(uint16_t b)
{
	return (b & 0x7f80) == 0x7f80 && (b & 0x7f) != 0;
}

/* float16 by gcc's _Float16. */
static float ref_h2f(uint16_t b)
{
	_Float16 h;

	memcpy(&h, &b, sizeof(h));
	return (float)h;
}

static uint16_t ref_f2h(float f)
{
	_Float16 h = (_Float16)f;
	uint16_t b;

	memcpy(&b, &h, sizeof(b));
	return b;
}

/* bfloat16 done here: the upper half of a float's bits. */
static float ref_b2f(uint16_t b)
{
	return bits_float((uint32_t)b << 16);
}

/* Magnitude of bfloat16 bits as a double; exponent 255 reads as 2^128 * 1.m. */
static double bf16_mag(uint32_t b)
{
	int e = (b >> 7) & 0xff;
	int m = b & 0x7f;

	return e ? (1.0 + m / 128.0) * pow2(e - 127) : m * pow2(-133);
}

/* Nearest bfloat16 by comparing distances to the two neighbours; ties even. */
static uint16_t ref_f2b(float f)
{
	uint32_t x = float_bits(f);
	uint32_t lo = x >> 16, hi = lo + 1;
	double d, dlo, dhi;

	if (isnan(f))
		return 0x7fc0;
	if ((x & 0xffff) == 0)
		return (uint16_t)lo;
	d = absd((double)f);
	dlo = d - bf16_mag(lo & 0x7fff);
	dhi = bf16_mag(hi & 0x7fff) - d;
	if (dlo < dhi || (dlo == dhi && !(lo & 1)))
		return (uint16_t)lo;
	return (uint16_t)hi;
}

static void test_names(void)
{
	static const size_t sizes[NDTYPES] = { 1, 1, 4, 4, 8, 8, 2, 2, 4, 8 };
	static const char *const dnames[NDTYPES] = {
		"int8", "uint8", "int32", "uint32", "int64",
		"uint64", "float16", "bfloat16", "float32", "float64",
	};
	static const char *const onames[NOPS] = { "sum", "prod", "min", "max", "avg" };

	for (int d = -3; d < NDTYPES + 3; d++) {
		int known = d >= 0 && d < NDTYPES;

		CHECK(!dtype_valid(d) == !known, "dtype %d", d);
		CHECK(dtype_size(d) == (known ? sizes[d] : 0), "dtype %d: size %zu", d,
		      dtype_size(d));
		CHECK(comm_dtype_size((comm_dtype_t)d) == dtype_size(d), "dtype %d", d);
		CHECK(strcmp(dtype_name(d), known ? dnames[d] : "?") == 0, "dtype %d: %s", d,
		      dtype_name(d));
	}
	for (int op = -3; op < NOPS + 3; op++) {
		int known = op >= 0 && op < NOPS;

		CHECK(!redop_valid(op) == !known, "op %d", op);
		CHECK(strcmp(redop_name(op), known ? onames[op] : "?") == 0, "op %d: %s", op,
		      redop_name(op));
	}
}

/* Check one float against the gcc/own reference, in both directions. */
static void check_f2h(float f)
{
	uint16_t got = float_to_half(f), want = ref_f2h(f);

	if (isnan(f))
		CHECK(half_is_nan(got) && (got & 0x8000) == (float_bits(f) >> 16 & 0x8000),
		      "float_to_half(%08x) = %04x", float_bits(f), got);
	else
		CHECK(got == want, "float_to_half(%08x = %a) = %04x, want %04x", float_bits(f),
		      (double)f, got, want);
}

static void check_f2b(float f)
{
	uint16_t got = float_to_bf16(f), want = ref_f2b(f);

	if (isnan(f))
		CHECK(bf16_is_nan(got) && (got & 0x8000) == (float_bits(f) >> 16 & 0x8000),
		      "float_to_bf16(%08x) = %04x", float_bits(f), got);
	else
		CHECK(got == want, "float_to_bf16(%08x = %a) = %04x, want %04x", float_bits(f),
		      (double)f, got, want);
}

/* Check f >= 0, its neighbours one ulp away, and the negatives of all three. */
static void check_around(float f)
{
	uint32_t x = float_bits(f);
	float v[3] = { f, bits_float(x ? x - 1 : 0), bits_float(x < 0x7f800000 ? x + 1 : x) };

	for (int i = 0; i < 3; i++) {
		check_f2h(v[i]);
		check_f2h(-v[i]);
		check_f2b(v[i]);
		check_f2b(-v[i]);
	}
}

static void test_convert(void)
{
	for (uint32_t h = 0; h <= 0xffff; h++) {
		float f = half_to_float((uint16_t)h), want = ref_h2f((uint16_t)h);
		uint16_t back = float_to_half(f);

		if (half_is_nan((uint16_t)h)) {
			CHECK(isnan(f), "half_to_float(%04x) = %a", h, (double)f);
			CHECK(half_is_nan(back) && (back & 0x8000) == (h & 0x8000),
			      "half %04x round trip: %04x", h, back);
			continue;
		}
		CHECK(float_bits(f) == float_bits(want), "half_to_float(%04x) = %a, want %a", h,
		      (double)f, (double)want);
		CHECK(back == h, "half %04x round trip: %04x", h, back);
	}
	for (uint32_t b = 0; b <= 0xffff; b++) {
		float f = bf16_to_float((uint16_t)b);
		uint16_t back = float_to_bf16(f);

		CHECK(float_bits(f) == float_bits(ref_b2f((uint16_t)b)), "bf16_to_float(%04x)", b);
		if (bf16_is_nan((uint16_t)b))
			CHECK(bf16_is_nan(back) && (back & 0x8000) == (b & 0x8000),
			      "bf16 %04x round trip: %04x", b, back);
		else
			CHECK(back == b, "bf16 %04x round trip: %04x", b, back);
	}

	/* every representable value and every halfway point, with neighbours */
	for (uint32_t h = 0; h < 0x7c00; h++) {
		float lo = ref_h2f((uint16_t)h);
		float hi = h + 1 < 0x7c00 ? ref_h2f((uint16_t)(h + 1)) : 65536.0f;

		check_around(lo);
		check_around((float)(((double)lo + hi) / 2));
	}
	for (uint32_t b = 0; b < 0x7f80; b++) {
		check_around(ref_b2f((uint16_t)b));
		check_around(bits_float(b << 16 | 0x8000));
	}

	/* a sweep through all float bit patterns: subnormals, inf, NaNs */
	for (uint64_t x = 0; x <= 0xffffffffu; x += 4099) {
		check_f2h(bits_float((uint32_t)x));
		check_f2b(bits_float((uint32_t)x));
	}
	check_around(INFINITY);
	check_around(FLT_MAX);
	check_around(0x1p-149f);
	check_f2h(NAN);
	check_f2b(NAN);
}

/* A random value fit for dtype and op: small for PROD, sometimes subnormal. */
static double fill_value(int op)
{
	double sign = rng() & 1 ? -1.0 : 1.0;

	if (op == COMM_PROD)
		return sign * (0.5 + 1.5 * rng_unit());
	if (rng() % 16 == 0)
		return sign * rng_unit() * 0x1p-20;
	return 200.0 * rng_unit() - 100.0;
}

static void fill(int dtype, int op, void *buf, size_t count)
{
	for (size_t i = 0; i < count; i++) {
		uint64_t r = rng();

		switch (dtype) {
		case COMM_INT8:
		case COMM_UINT8:
			((uint8_t *)buf)[i] = (uint8_t)r;
			break;
		case COMM_INT32:
		case COMM_UINT32:
			((uint32_t *)buf)[i] = (uint32_t)r;
			break;
		case COMM_INT64:
		case COMM_UINT64:
			((uint64_t *)buf)[i] = r;
			break;
		case COMM_FLOAT16:
			((uint16_t *)buf)[i] = ref_f2h((float)fill_value(op));
			break;
		case COMM_BFLOAT16:
			((uint16_t *)buf)[i] = ref_f2b((float)fill_value(op));
			break;
		case COMM_FLOAT32:
			((float *)buf)[i] = (float)fill_value(op);
			break;
		case COMM_FLOAT64:
			((double *)buf)[i] = fill_value(op);
			break;
		}
	}
}

/* Integers: SUM and PROD wrap in U; AVG is the wrapped sum, as S, over n. */
#define REF_INT(tag, U, S)                                                     \
	static void ref_##tag(int op, void *out, void *const *in, int n, size_t count) \
	{                                                                      \
		for (size_t i = 0; i < count; i++) {                           \
			U acc = ((const U *)in[0])[i];                         \
			S m = (S)acc;                                          \
			for (int j = 1; j < n; j++) {                          \
				U v = ((const U *)in[j])[i];                   \
				if (op == COMM_SUM || op == COMM_AVG)          \
					acc = (U)(acc + v);                    \
				else if (op == COMM_PROD)                      \
					acc = (U)(acc * v);                    \
				else if (op == COMM_MIN && (S)v < m)           \
					m = (S)v;                              \
				else if (op == COMM_MAX && (S)v > m)           \
					m = (S)v;                              \
			}                                                      \
			if (op == COMM_MIN || op == COMM_MAX)                  \
				acc = (U)m;                                    \
			else if (op == COMM_AVG)                               \
				acc = (U)((S)acc / n);                         \
			((U *)out)[i] = acc;                                   \
		}                                                              \
	}

REF_INT(i8, uint8_t, int8_t)
REF_INT(u8, uint8_t, uint8_t)
REF_INT(i32, uint32_t, int32_t)
REF_INT(u32, uint32_t, uint32_t)
REF_INT(i64, uint64_t, int64_t)
REF_INT(u64, uint64_t, uint64_t)

static float combine_float(int op, float acc, float v)
{
	switch (op) {
	case COMM_PROD:
		return acc * v;
	case COMM_MIN:
		return v < acc ? v : acc;
	case COMM_MAX:
		return v > acc ? v : acc;
	}
	return acc + v;
}

/* float16 and bfloat16: in float, in input order, rounded once at the end. */
static void ref_half(int dtype, int op, void *out, void *const *in, int n, size_t count)
{
	float (*load)(uint16_t) = dtype == COMM_FLOAT16 ? ref_h2f : ref_b2f;
	uint16_t (*store)(float) = dtype == COMM_FLOAT16 ? ref_f2h : ref_f2b;

	for (size_t i = 0; i < count; i++) {
		float acc = load(((const uint16_t *)in[0])[i]);

		for (int j = 1; j < n; j++)
			acc = combine_float(op, acc, load(((const uint16_t *)in[j])[i]));
		if (op == COMM_AVG)
			acc = acc / (float)n;
		((uint16_t *)out)[i] = store(acc);
	}
}

static double load_wide(int dtype, const void *buf, size_t i)
{
	return dtype == COMM_FLOAT32 ? ((const float *)buf)[i] : ((const double *)buf)[i];
}

/* float32 and float64: a float64 reference and the tolerance it allows. */
static void check_wide(int dtype, int op, const void *out, void *const *in, int n, size_t count,
		       const char *what)
{
	double tol = dtype == COMM_FLOAT32 ? TOL_F32 : TOL_F64;

	for (size_t i = 0; i < count; i++) {
		double acc = load_wide(dtype, in[0], i), mag = absd(acc), got, bound;

		for (int j = 1; j < n; j++) {
			double v = load_wide(dtype, in[j], i);

			mag += absd(v);
			if (op == COMM_PROD)
				acc *= v;
			else if (op == COMM_MIN)
				acc = v < acc ? v : acc;
			else if (op == COMM_MAX)
				acc = v > acc ? v : acc;
			else
				acc += v;
		}
		if (op == COMM_AVG) {
			acc /= n;
			mag /= n;
		}
		got = load_wide(dtype, out, i);
		bound = op == COMM_PROD ? tol * absd(acc) : tol * mag;
		if (op == COMM_MIN || op == COMM_MAX)
			bound = 0;
		if (!(absd(got - acc) <= bound)) {
			CHECK(absd(got - acc) <= bound, "%s: [%zu] = %.17g, want %.17g", what, i,
			      got, acc);
			return;
		}
	}
}

static void run_case(int dtype, int op, int n, size_t count)
{
	size_t size = dtype_size(dtype);
	void *in[8], *bufs[8], *out, *ref;
	char what[96];

	snprintf(what, sizeof(what), "%s %s n=%d count=%zu", dtype_name(dtype), redop_name(op), n,
		 count);
	/* inputs start 0, 1 or 2 elements into their buffers: not all aligned */
	for (int j = 0; j < n; j++) {
		bufs[j] = malloc((count + 2) * size);
		REQUIRE(bufs[j], "%s: out of memory", what);
		in[j] = (char *)bufs[j] + (size_t)(j % 3) * size;
		fill(dtype, op, in[j], count);
	}
	out = malloc((count + 1) * size);
	ref = malloc((count + 1) * size);
	REQUIRE(out && ref, "%s: out of memory", what);
	memset(out, 0xa5, (count + 1) * size);

	reduce_n(dtype, op, out, (const void *const *)in, n, count);

	for (size_t b = count * size; b < (count + 1) * size; b++)
		CHECK(((unsigned char *)out)[b] == 0xa5, "%s: wrote past the end", what);
	switch (dtype) {
	case COMM_INT8:
		ref_i8(op, ref, in, n, count);
		break;
	case COMM_UINT8:
		ref_u8(op, ref, in, n, count);
		break;
	case COMM_INT32:
		ref_i32(op, ref, in, n, count);
		break;
	case COMM_UINT32:
		ref_u32(op, ref, in, n, count);
		break;
	case COMM_INT64:
		ref_i64(op, ref, in, n, count);
		break;
	case COMM_UINT64:
		ref_u64(op, ref, in, n, count);
		break;
	case COMM_FLOAT16:
	case COMM_BFLOAT16:
		ref_half(dtype, op, ref, in, n, count);
		break;
	}
	if (dtype == COMM_FLOAT32 || dtype == COMM_FLOAT64) {
		check_wide(dtype, op, out, in, n, count, what);
	} else {
		for (size_t i = 0; i < count; i++) {
			if (memcmp((char *)out + i * size, (char *)ref + i * size, size) != 0) {
				CHECK(0, "%s: element %zu differs", what, i);
				break;
			}
		}
	}

	free(ref);
	free(out);
	for (int j = 0; j < n; j++)
		free(bufs[j]);
}

static void test_reduce(void)
{
	static const int ns[] = { 1, 2, 3, 4, 5, 6, 7, 8 };
	static const size_t counts[] = { 0, 1, 7, 1000, 4097 };

	for (int d = 0; d < NDTYPES; d++)
		for (int op = 0; op < NOPS; op++)
			for (size_t a = 0; a < sizeof(ns) / sizeof(ns[0]); a++)
				for (size_t c = 0; c < sizeof(counts) / sizeof(counts[0]); c++)
					run_case(d, op, ns[a], counts[c]);
}

/* Unknown dtype or op and n < 1 leave out alone. */
/* Element i of rank j in the NaN test: NaN where j == i % n, else a small integer. */
static int nan_at(int j, size_t i, int n, size_t count)
{
	return i == count - 1 || (n > 1 && (size_t)j == i % (size_t)n);
}

static double nan_value(int j, size_t i)
{
	return (double)((j * 5 + (int)(i % 11)) % 11) - 3;
}

static void nan_store(int dtype, void *buf, size_t i, double v, int nan)
{
	float f = nan ? bits_float(0x7fc00000u) : (float)v;

	if (dtype == COMM_FLOAT16)
		((uint16_t *)buf)[i] = ref_f2h(f);
	else if (dtype == COMM_BFLOAT16)
		((uint16_t *)buf)[i] = ref_f2b(f);
	else if (dtype == COMM_FLOAT32)
		((float *)buf)[i] = f;
	else
		((double *)buf)[i] = nan ? (double)f : v;
}

/* The element as a double; NaN stays NaN. */
static double nan_load(int dtype, const void *buf, size_t i)
{
	if (dtype == COMM_FLOAT16)
		return ref_h2f(((const uint16_t *)buf)[i]);
	if (dtype == COMM_BFLOAT16)
		return ref_b2f(((const uint16_t *)buf)[i]);
	return load_wide(dtype, buf, i);
}

/*
 * MIN and MAX skip NaN, as NCCL's fminf/fmaxf do: whichever input holds it
 * (every position in turn), the result is the min or max of the others; NaN
 * only where all inputs are NaN (the last element). reduce_n and reduce_acc.
 */
static void test_nan(void)
{
	static const int dts[] = { COMM_FLOAT16, COMM_BFLOAT16, COMM_FLOAT32, COMM_FLOAT64 };
	const size_t count = 1031;

	for (size_t d = 0; d < sizeof dts / sizeof dts[0]; d++)
		for (int op = COMM_MIN; op <= COMM_MAX; op++)
			for (int n = 1; n <= 6; n++) {
				size_t size = dtype_size(dts[d]);
				void *in[6], *out = malloc(count * size), *acc = malloc(count * size);
				char what[96];

				snprintf(what, sizeof what, "NaN: %s %s n=%d", dtype_name(dts[d]),
					 redop_name(op), n);
				REQUIRE(out && acc, "%s: out of memory", what);
				for (int j = 0; j < n; j++) {
					in[j] = malloc(count * size);
					REQUIRE(in[j], "%s: out of memory", what);
					for (size_t i = 0; i < count; i++)
						nan_store(dts[d], in[j], i, nan_value(j, i),
							  nan_at(j, i, n, count));
				}
				reduce_n(dts[d], op, out, (const void *const *)in, n, count);
				memcpy(acc, in[0], count * size);
				for (int j = 1; j < n; j++)
					reduce_acc(dts[d], op, acc, in[j], count);
				for (size_t i = 0; i < count; i++) {
					double want = 0, got = nan_load(dts[d], out, i);
					double got_acc = nan_load(dts[d], acc, i);
					int any = 0;

					for (int j = 0; j < n; j++) {
						double v = nan_value(j, i);

						if (nan_at(j, i, n, count))
							continue;
						if (!any || (op == COMM_MIN ? v < want : v > want))
							want = v;
						any = 1;
					}
					if (!any) {
						CHECK(got != got && got_acc != got_acc,
						      "%s: [%zu] all NaN gave %g, %g (acc)", what, i, got,
						      got_acc);
					} else if (got != want || got_acc != want) {
						CHECK(0, "%s: [%zu] = %g, %g (acc), want %g", what, i, got,
						      got_acc, want);
						break;
					}
				}
				for (int j = 0; j < n; j++)
					free(in[j]);
				free(out);
				free(acc);
			}
}

static void test_reject(void)
{
	uint64_t a[4] = { 1, 2, 3, 4 }, out[4] = { 9, 9, 9, 9 };
	const void *in[1] = { a };

	reduce_n((comm_dtype_t)NDTYPES, COMM_SUM, out, in, 1, 4);
	reduce_n((comm_dtype_t)-1, COMM_SUM, out, in, 1, 4);
	reduce_n(COMM_UINT64, (comm_redop_t)NOPS, out, in, 1, 4);
	reduce_n(COMM_UINT64, (comm_redop_t)-1, out, in, 1, 4);
	reduce_n(COMM_UINT64, COMM_SUM, out, in, 0, 4);
	for (int i = 0; i < 4; i++)
		CHECK(out[i] == 9, "out[%d] = %llu", i, (unsigned long long)out[i]);
}

int main(void)
{
	test_names();
	test_convert();
	test_reduce();
	test_nan();
	test_reject();
	return CHECK_EXIT();
}
