/*
 * bench-data.c: commbench's inputs and expected outputs. Every value is a
 * function of (rank, element, iteration), so each rank knows every result
 * in closed form and checks it exactly, for every dtype and reduction.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "bench.h"

/*
 * Values: m = (11 * g + 5 * seq) mod 251 for element g of iteration seq.
 * Data that moves: (m + 37 * src) mod 251, minus 125 for signed and float
 * types, so ranks and positions differ. Reductions: m (minus 125) plus
 * x mod 3 where x = (rank + g + seq) mod n, so over the n ranks the extra
 * terms are 0, 1, ..., n-1 mod 3 and sum, min and max have closed forms.
 * PROD: 2 on the rank where x is 0, 1 elsewhere, negated on the last rank
 * where (g + seq) mod 5 is 0 for signed types: products are 2 or -2. Every
 * input is a small integer, exact in every dtype (bfloat16 holds integers
 * up to 256); results are rounded once, as the daemon rounds them.
 */
#define MOD 251

struct cur {
	unsigned m; /* (11 g + 5 seq) mod 251 */
	unsigned x; /* (rank + g + seq) mod n */
	unsigned q; /* (g + seq) mod 5 */
};

static const struct {
	const char *nccl; /* printed in the table */
	const char *json; /* printed by --json */
	const char *alias;
} dtypes[] = {
	[COMM_INT8] = { "int8", "int8", "char" },
	[COMM_UINT8] = { "uint8", "uint8", "uchar" },
	[COMM_INT32] = { "int32", "int32", "int" },
	[COMM_UINT32] = { "uint32", "uint32", "uint" },
	[COMM_INT64] = { "int64", "int64", "long" },
	[COMM_UINT64] = { "uint64", "uint64", "ulong" },
	[COMM_FLOAT16] = { "half", "float16", "fp16" },
	[COMM_BFLOAT16] = { "bfloat16", "bfloat16", "bf16" },
	[COMM_FLOAT32] = { "float", "float32", "fp32" },
	[COMM_FLOAT64] = { "double", "float64", "fp64" },
};

static const char *const redops[] = { "sum", "prod", "min", "max", "avg" };

const char *bench_dtype_name(comm_dtype_t dtype)
{
	return dtypes[dtype].nccl;
}

const char *bench_dtype_json(comm_dtype_t dtype)
{
	return dtypes[dtype].json;
}

const char *bench_redop_name(comm_redop_t op)
{
	return redops[op];
}

int bench_dtype_parse(const char *s)
{
	if (!strcmp(s, "all"))
		return -1;
	for (int i = 0; i < (int)(sizeof dtypes / sizeof dtypes[0]); i++)
		if (!strcasecmp(s, dtypes[i].nccl) || !strcasecmp(s, dtypes[i].json) ||
		    !strcasecmp(s, dtypes[i].alias))
			return i;
	return -2;
}

int bench_redop_parse(const char *s)
{
	if (!strcmp(s, "all"))
		return -1;
	for (int i = 0; i < (int)(sizeof redops / sizeof redops[0]); i++)
		if (!strcasecmp(s, redops[i]))
			return i;
	return -2;
}

/* h, plus one when the dropped bits rem are over half, or half and h is odd. */
static uint32_t round_even(uint32_t h, uint32_t rem, uint32_t half)
{
	if (rem > half || (rem == half && (h & 1)))
		h++;
	return h;
}

/* float to IEEE binary16 bits, to nearest even, written out plainly. */
static uint16_t to_half(float f)
{
	uint32_t x, sign, mant, shift;
	int e;

	memcpy(&x, &f, sizeof x);
	sign = (x >> 16) & 0x8000;
	e = (int)((x >> 23) & 0xff) - 127;
	mant = x & 0x7fffff;
	if (e == 128)
		return (uint16_t)(sign | 0x7c00 | (mant ? 0x200 : 0));
	if (e > 15)
		return (uint16_t)(sign | 0x7c00);
	if (e >= -14) /* a carry out of the mantissa bumps the exponent, maybe to inf */
		return (uint16_t)(sign | round_even((uint32_t)(e + 15) << 10 | mant >> 13,
						    mant & 0x1fff, 0x1000));
	if (e < -25)
		return (uint16_t)sign;
	/* subnormal: the value in units of 2^-24 is (1.mant << 23) >> shift */
	mant |= 0x800000;
	shift = (uint32_t)(-e - 1);
	return (uint16_t)(sign | round_even(mant >> shift, mant & ((1u << shift) - 1),
					    1u << (shift - 1)));
}

/* float to bfloat16 bits, to nearest even. */
static uint16_t to_bf16(float f)
{
	uint32_t x;

	memcpy(&x, &f, sizeof x);
	if ((x & 0x7fffffff) > 0x7f800000)
		return (uint16_t)(x >> 16 | 0x40);
	return (uint16_t)round_even(x >> 16, x & 0xffff, 0x8000);
}

static int is_unsigned(comm_dtype_t t)
{
	return t == COMM_UINT8 || t == COMM_UINT32 || t == COMM_UINT64;
}

/* One element of any dtype. */
union elem {
	int8_t i8;
	uint8_t u8;
	int32_t i32;
	uint32_t u32;
	int64_t i64;
	uint64_t u64;
	uint16_t h;
	float f;
	double d;
};

/*
 * Store v in dst as dtype t; with avg > 0 store v / avg as the daemon
 * computes an average: integers wrap, then divide (truncating toward zero);
 * floats divide in their own type (float for the 16-bit ones), then round.
 */
static void store(comm_dtype_t t, void *dst, int64_t v, int avg)
{
	union elem u;
	float f = (float)v;

	switch (t) {
	case COMM_INT8:
		u.i8 = (int8_t)(uint8_t)v;
		if (avg)
			u.i8 = (int8_t)(u.i8 / avg);
		break;
	case COMM_UINT8:
		u.u8 = (uint8_t)v;
		if (avg)
			u.u8 = (uint8_t)(u.u8 / avg);
		break;
	case COMM_INT32:
		u.i32 = (int32_t)(uint32_t)v;
		if (avg)
			u.i32 /= avg;
		break;
	case COMM_UINT32:
		u.u32 = (uint32_t)v;
		if (avg)
			u.u32 /= (uint32_t)avg;
		break;
	case COMM_INT64:
		u.i64 = v;
		if (avg)
			u.i64 /= avg;
		break;
	case COMM_UINT64:
		u.u64 = (uint64_t)v;
		if (avg)
			u.u64 /= (uint64_t)avg;
		break;
	case COMM_FLOAT16:
	case COMM_BFLOAT16:
		if (avg)
			f /= (float)avg;
		u.h = t == COMM_FLOAT16 ? to_half(f) : to_bf16(f);
		break;
	case COMM_FLOAT32:
		u.f = avg ? f / (float)avg : f;
		break;
	case COMM_FLOAT64:
		u.d = avg ? (double)v / avg : (double)v;
		break;
	}
	memcpy(dst, &u, comm_dtype_size(t));
}

static void cur_init(struct cur *k, const struct bench_case *c, uint64_t g)
{
	unsigned n = (unsigned)c->n;

	k->m = (unsigned)((g % MOD * 11 + c->seq % MOD * 5) % MOD);
	k->x = (unsigned)((g % n + (unsigned)c->rank % n + c->seq % n) % n);
	k->q = (unsigned)((g % 5 + c->seq % 5) % 5);
}

static void cur_next(struct cur *k, int n)
{
	k->m = k->m + 11 >= MOD ? k->m + 11 - MOD : k->m + 11;
	k->x = k->x + 1 == (unsigned)n ? 0 : k->x + 1;
	k->q = k->q == 4 ? 0 : k->q + 1;
}

/* The base value of element k: m, shifted to be centred on 0 where signed. */
static int64_t base(const struct bench_case *c, unsigned m)
{
	return (int64_t)m - (is_unsigned(c->dtype) ? 0 : 125);
}

/* Data that moves: what rank src holds at the element under k. */
static int64_t moved(const struct bench_case *c, const struct cur *k, int src)
{
	return base(c, (k->m + 37 * (unsigned)src) % MOD);
}

/* This rank's input to a reduction at the element under k. */
static int64_t red_in(const struct bench_case *c, const struct cur *k)
{
	int64_t v;

	if (c->redop == COMM_PROD) {
		v = k->x == 0 ? 2 : 1;
		return !is_unsigned(c->dtype) && c->rank == c->n - 1 && k->q == 0 ? -v : v;
	}
	return base(c, k->m) + k->x % 3;
}

/* Store the reduction over all ranks at the element under k in dst. */
static void red_out(const struct bench_case *c, const struct cur *k, void *dst)
{
	int64_t s = base(c, k->m), extra = 0;

	for (int x = 0; x < c->n; x++)
		extra += x % 3;
	switch (c->redop) {
	case COMM_SUM:
		store(c->dtype, dst, c->n * s + extra, 0);
		break;
	case COMM_AVG:
		store(c->dtype, dst, c->n * s + extra, c->n);
		break;
	case COMM_PROD:
		store(c->dtype, dst, !is_unsigned(c->dtype) && k->q == 0 ? -2 : 2, 0);
		break;
	case COMM_MIN:
		store(c->dtype, dst, s, 0);
		break;
	case COMM_MAX:
		store(c->dtype, dst, s + (c->n < 3 ? c->n - 1 : 2), 0);
		break;
	}
}

#define RED_OUT -1 /* as a source: the reduction over all ranks */
#define RED_IN -2  /* as a source: this rank's input to the reduction */

static void element(const struct bench_case *c, const struct cur *k, int src, void *dst)
{
	if (src == RED_IN)
		store(c->dtype, dst, red_in(c, k), 0);
	else if (src == RED_OUT)
		red_out(c, k, dst);
	else
		store(c->dtype, dst, moved(c, k, src), 0);
}

/* After how many elements src's values repeat: m, q and x have periods 251, 5, n. */
static size_t period(const struct bench_case *c, int src)
{
	size_t a = 5 * MOD, b = (size_t)c->n, t;

	if (src >= 0)
		return MOD;
	if (src == RED_OUT)
		return 5 * MOD;
	while (b) {
		t = a % b;
		a = b;
		b = t;
	}
	return 5 * MOD / a * (size_t)c->n;
}

/* Elements g0 .. g0+len-1 of src into dst: one period computed, the rest copied. */
static void span_fill(const struct bench_case *c, int src, uint64_t g0, size_t len, char *dst)
{
	size_t es = comm_dtype_size(c->dtype), plen = period(c, src), done;
	struct cur k;

	if (plen > len)
		plen = len;
	cur_init(&k, c, g0);
	for (size_t i = 0; i < plen; i++, cur_next(&k, c->n))
		element(c, &k, src, dst + i * es);
	for (done = plen; done < len; done *= 2)
		memcpy(dst + done * es, dst, (len - done < done ? len - done : done) * es);
}

/* Wrong elements of out against span_fill's; the first (base + i) in *first. */
static uint64_t span_check(const struct bench_case *c, int src, uint64_t g0, size_t len,
			   const char *out, size_t base, long long *first)
{
	size_t es = comm_dtype_size(c->dtype), plen = period(c, src), k;
	uint64_t wrong = 0;
	char *want;

	if (plen > len)
		plen = len;
	want = malloc(plen * es);
	if (!want) {
		fprintf(stderr, "commbench: out of memory for the check\n");
		return len;
	}
	span_fill(c, src, g0, plen, want);
	for (size_t off = 0; off < len; off += plen, out += plen * es) {
		k = len - off < plen ? len - off : plen;
		if (memcmp(out, want, k * es) == 0)
			continue;
		for (size_t i = 0; i < k; i++) {
			if (memcmp(out + i * es, want + i * es, es) == 0)
				continue;
			if (wrong++ == 0 && *first < 0)
				*first = (long long)(base + off + i);
		}
	}
	free(want);
	return wrong;
}

void bench_fill(const struct bench_case *c, void *in)
{
	size_t len = c->count;

	if (c->op == OP_BROADCAST && c->rank != 0)
		return;
	if (bench_ops[c->op].split && c->op != OP_ALLGATHER)
		len *= (size_t)c->n;
	span_fill(c, bench_ops[c->op].reduces ? RED_IN : c->op == OP_BROADCAST ? 0 : c->rank, 0,
		  len, in);
}

/* Where element i of out comes from: a rank or RED_OUT, at element *g. */
static int source(const struct bench_case *c, size_t i, uint64_t *g)
{
	size_t block = i / c->count, k = i % c->count;

	*g = k;
	switch (c->op) {
	case OP_REDUCE_SCATTER:
		*g = (uint64_t)c->rank * c->count + k;
		return RED_OUT;
	case OP_ALLGATHER:
		return (int)block;
	case OP_BROADCAST:
		return 0;
	case OP_ALLTOALL:
	case OP_ALLTOALLV:
		*g = (uint64_t)c->rank * c->count + k;
		return (int)block;
	case OP_SENDRECV:
		return (c->rank + c->n - 1) % c->n;
	default:
		return RED_OUT;
	}
}

uint64_t bench_verify(const struct bench_case *c, const void *out, long long *first)
{
	size_t es = comm_dtype_size(c->dtype), nblocks = 1;
	uint64_t wrong = 0, g;
	int src;

	*first = -1;
	if (c->op == OP_REDUCE && c->rank != 0)
		return 0;
	if (c->op == OP_ALLGATHER || c->op == OP_ALLTOALL || c->op == OP_ALLTOALLV)
		nblocks = (size_t)c->n;
	for (size_t b = 0; b < nblocks; b++) {
		src = source(c, b * c->count, &g);
		wrong += span_check(c, src, g, c->count, (const char *)out + b * c->count * es,
				    b * c->count, first);
	}
	return wrong;
}

static void elem_str(comm_dtype_t t, const void *p, char *buf, size_t len)
{
	union elem u;

	memcpy(&u, p, comm_dtype_size(t));
	switch (t) {
	case COMM_INT8:
		snprintf(buf, len, "%d", u.i8);
		break;
	case COMM_UINT8:
		snprintf(buf, len, "%u", u.u8);
		break;
	case COMM_INT32:
		snprintf(buf, len, "%d", u.i32);
		break;
	case COMM_UINT32:
		snprintf(buf, len, "%u", u.u32);
		break;
	case COMM_INT64:
		snprintf(buf, len, "%lld", (long long)u.i64);
		break;
	case COMM_UINT64:
		snprintf(buf, len, "%llu", (unsigned long long)u.u64);
		break;
	case COMM_FLOAT16:
	case COMM_BFLOAT16:
		snprintf(buf, len, "0x%04x", u.h);
		break;
	case COMM_FLOAT32:
		snprintf(buf, len, "%.9g", (double)u.f);
		break;
	case COMM_FLOAT64:
		snprintf(buf, len, "%.17g", u.d);
		break;
	}
}

void bench_describe(const struct bench_case *c, const void *out, long long i, char *buf,
		    size_t len)
{
	size_t es = comm_dtype_size(c->dtype);
	unsigned char want[8];
	char got_s[32], want_s[32];
	struct cur k;
	uint64_t g;
	int src = source(c, (size_t)i, &g);

	cur_init(&k, c, g);
	element(c, &k, src, want);
	elem_str(c->dtype, (const char *)out + (size_t)i * es, got_s, sizeof got_s);
	elem_str(c->dtype, want, want_s, sizeof want_s);
	snprintf(buf, len, "element %lld is %s, expected %s", i, got_s, want_s);
}
