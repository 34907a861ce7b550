/*
 * ref.c: the tests' own idea of every dtype and reduction, written apart
 * from common/dtype.c and common/reduce.c so that it can check them.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ref.h"

const comm_dtype_t ref_dtypes[REF_NDTYPES] = {
	COMM_INT8,  COMM_UINT8,   COMM_INT32,    COMM_UINT32,  COMM_INT64,
	COMM_UINT64, COMM_FLOAT16, COMM_BFLOAT16, COMM_FLOAT32, COMM_FLOAT64,
};
const comm_redop_t ref_redops[REF_NREDOPS] = { COMM_SUM, COMM_PROD, COMM_MIN, COMM_MAX,
					       COMM_AVG };

const char *ref_dtype_name(comm_dtype_t dt)
{
	static const char *const names[] = { "int8",    "uint8",    "int32",   "uint32",
					     "int64",   "uint64",   "float16", "bfloat16",
					     "float32", "float64" };

	return (unsigned)dt < sizeof names / sizeof names[0] ? names[dt] : "?";
}

const char *ref_op_name(comm_redop_t op)
{
	static const char *const names[] = { "sum", "prod", "min", "max", "avg" };

	return (unsigned)op <= COMM_AVG ? names[op] : "?";
}

uint64_t ref_mix(uint64_t x)
{
	x += 0x9e3779b97f4a7c15ull;
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
	return x ^ (x >> 31);
}

uint64_t ref_hash(uint32_t seed, int r, size_t idx)
{
	return ref_mix(((uint64_t)seed << 40) ^ ((uint64_t)(unsigned)r << 32) ^ idx);
}

size_t ref_size(comm_dtype_t dt)
{
	switch (dt) {
	case COMM_INT8:
	case COMM_UINT8:
		return 1;
	case COMM_FLOAT16:
	case COMM_BFLOAT16:
		return 2;
	case COMM_INT32:
	case COMM_UINT32:
	case COMM_FLOAT32:
		return 4;
	default:
		return 8;
	}
}

/* --- elements as bits ------------------------------------------------------ */

static float f32_of(uint64_t bits)
{
	uint32_t b = (uint32_t)bits;
	float f;

	memcpy(&f, &b, sizeof f);
	return f;
}

static uint64_t bits_f32(float f)
{
	uint32_t b;

	memcpy(&b, &f, sizeof b);
	return b;
}

static double f64_of(uint64_t bits)
{
	double d;

	memcpy(&d, &bits, sizeof d);
	return d;
}

static uint64_t bits_f64(double d)
{
	uint64_t b;

	memcpy(&b, &d, sizeof b);
	return b;
}

/* float16 through gcc's _Float16 (libgcc rounds to nearest even). */
static float f16_of(uint64_t bits)
{
	uint16_t b = (uint16_t)bits;
	_Float16 h;

	memcpy(&h, &b, sizeof h);
	return (float)h;
}

static uint64_t bits_f16(float f)
{
	_Float16 h = (_Float16)f;
	uint16_t b;

	memcpy(&b, &h, sizeof b);
	return b;
}

static float bf16_of(uint64_t bits)
{
	return f32_of((uint64_t)(uint16_t)bits << 16);
}

/* float -> bfloat16, to nearest, ties to even (no NaN among the inputs). */
static uint64_t bits_bf16(float f)
{
	uint32_t x = (uint32_t)bits_f32(f), hi = x >> 16, lo = x & 0xffff;

	if (lo > 0x8000 || (lo == 0x8000 && (hi & 1)))
		hi++;
	return (uint16_t)hi;
}

uint64_t ref_bits(comm_dtype_t dt, double v)
{
	switch (dt) {
	case COMM_FLOAT16:
		return bits_f16((float)v);
	case COMM_BFLOAT16:
		return bits_bf16((float)v);
	case COMM_FLOAT32:
		return bits_f32((float)v);
	case COMM_FLOAT64:
		return bits_f64(v);
	default:
		return (uint64_t)(int64_t)v;
	}
}

double ref_value(comm_dtype_t dt, uint64_t bits)
{
	switch (dt) {
	case COMM_INT8:
		return (int8_t)bits;
	case COMM_UINT8:
		return (uint8_t)bits;
	case COMM_INT32:
		return (int32_t)bits;
	case COMM_UINT32:
		return (uint32_t)bits;
	case COMM_INT64:
		return (double)(int64_t)bits;
	case COMM_UINT64:
		return (double)bits;
	case COMM_FLOAT16:
		return f16_of(bits);
	case COMM_BFLOAT16:
		return bf16_of(bits);
	case COMM_FLOAT32:
		return f32_of(bits);
	default:
		return f64_of(bits);
	}
}

uint64_t ref_load(comm_dtype_t dt, const void *p)
{
	uint64_t v = 0;

	memcpy(&v, p, ref_size(dt));
	return v;
}

void ref_store(comm_dtype_t dt, uint64_t bits, void *p)
{
	memcpy(p, &bits, ref_size(dt));
}

uint64_t ref_small(comm_dtype_t dt, uint64_t u)
{
	switch (dt) {
	case COMM_INT8:
	case COMM_INT32:
	case COMM_INT64:
		return (uint64_t)((int64_t)(u % 11) - 5);
	case COMM_UINT8:
	case COMM_UINT32:
	case COMM_UINT64:
		return u % 11;
	case COMM_FLOAT16:
	case COMM_BFLOAT16:
		return ref_bits(dt, (double)((int)(u % 9) - 4) * 0.5);
	case COMM_FLOAT32:
		return bits_f32((float)((int)(u % 17) - 8) * 0.25f);
	default:
		return bits_f64((double)((int)(u % 17) - 8) * 0.25);
	}
}

/* --- the reduction ------------------------------------------------------- */

/* Integer fold in the unsigned type U; MIN, MAX and AVG read it as S. */
#define FOLD_INT(U, S)                                                         \
	do {                                                                   \
		U acc_ = (U)in[0];                                             \
		for (int q_ = 1; q_ < n; q_++) {                               \
			U v_ = (U)in[q_];                                      \
			switch (op) {                                          \
			case COMM_SUM:                                         \
			case COMM_AVG:                                         \
				acc_ = (U)(acc_ + v_);                         \
				break;                                         \
			case COMM_PROD:                                        \
				acc_ = (U)(acc_ * v_);                         \
				break;                                         \
			case COMM_MIN:                                         \
				if ((S)v_ < (S)acc_)                           \
					acc_ = v_;                             \
				break;                                         \
			default:                                               \
				if ((S)v_ > (S)acc_)                           \
					acc_ = v_;                             \
				break;                                         \
			}                                                      \
		}                                                              \
		if (op == COMM_AVG)                                            \
			acc_ = (U)((S)acc_ / (S)n);                            \
		return (uint64_t)acc_;                                         \
	} while (0)

/* Float fold in T over LOAD'ed inputs, rank order; STORE rounds once. */
#define FOLD_FLT(T, LOAD, STORE)                                               \
	do {                                                                   \
		T acc_ = LOAD(in[0]);                                          \
		for (int q_ = 1; q_ < n; q_++) {                               \
			T v_ = LOAD(in[q_]);                                   \
			switch (op) {                                          \
			case COMM_SUM:                                         \
			case COMM_AVG:                                         \
				acc_ = acc_ + v_;                              \
				break;                                         \
			case COMM_PROD:                                        \
				acc_ = acc_ * v_;                              \
				break;                                         \
			case COMM_MIN:                                         \
				if (v_ < acc_)                                 \
					acc_ = v_;                             \
				break;                                         \
			default:                                               \
				if (v_ > acc_)                                 \
					acc_ = v_;                             \
				break;                                         \
			}                                                      \
		}                                                              \
		if (op == COMM_AVG)                                            \
			acc_ = acc_ / (T)n;                                    \
		return STORE(acc_);                                            \
	} while (0)

uint64_t ref_fold(comm_dtype_t dt, comm_redop_t op, const uint64_t *in, int n)
{
	switch (dt) {
	case COMM_INT8:
		FOLD_INT(uint8_t, int8_t);
	case COMM_UINT8:
		FOLD_INT(uint8_t, uint8_t);
	case COMM_INT32:
		FOLD_INT(uint32_t, int32_t);
	case COMM_UINT32:
		FOLD_INT(uint32_t, uint32_t);
	case COMM_INT64:
		FOLD_INT(uint64_t, int64_t);
	case COMM_UINT64:
		FOLD_INT(uint64_t, uint64_t);
	case COMM_FLOAT16:
		FOLD_FLT(float, f16_of, bits_f16);
	case COMM_BFLOAT16:
		FOLD_FLT(float, bf16_of, bits_bf16);
	case COMM_FLOAT32:
		FOLD_FLT(float, f32_of, bits_f32);
	default:
		FOLD_FLT(double, f64_of, bits_f64);
	}
}

/* --- comparing and printing ----------------------------------------------- */

static double absd(double v)
{
	return v < 0 ? -v : v;
}

int ref_same(comm_dtype_t dt, uint64_t a, uint64_t b)
{
	size_t es = ref_size(dt);
	uint64_t mask = es == 8 ? ~(uint64_t)0 : ((uint64_t)1 << (8 * es)) - 1;

	return ((a ^ b) & mask) == 0;
}

int ref_near(comm_dtype_t dt, uint64_t got, uint64_t want, double tol)
{
	double g, w;

	if (dt <= COMM_UINT64)
		return ref_same(dt, got, want);
	g = ref_value(dt, got);
	w = ref_value(dt, want);
	return g == w || absd(g - w) <= tol * (absd(w) > 1 ? absd(w) : 1);
}

void ref_str(comm_dtype_t dt, uint64_t v, char *buf, size_t len)
{
	switch (dt) {
	case COMM_INT8:
		snprintf(buf, len, "%d", (int)(int8_t)v);
		break;
	case COMM_UINT8:
		snprintf(buf, len, "%u", (unsigned)(uint8_t)v);
		break;
	case COMM_INT32:
		snprintf(buf, len, "%d", (int)(int32_t)v);
		break;
	case COMM_UINT32:
		snprintf(buf, len, "%u", (unsigned)(uint32_t)v);
		break;
	case COMM_INT64:
		snprintf(buf, len, "%lld", (long long)v);
		break;
	case COMM_UINT64:
		snprintf(buf, len, "%llu", (unsigned long long)v);
		break;
	case COMM_FLOAT16:
		snprintf(buf, len, "%.6g (0x%04x)", (double)f16_of(v), (unsigned)(uint16_t)v);
		break;
	case COMM_BFLOAT16:
		snprintf(buf, len, "%.5g (0x%04x)", (double)bf16_of(v), (unsigned)(uint16_t)v);
		break;
	case COMM_FLOAT32:
		snprintf(buf, len, "%.9g", (double)f32_of(v));
		break;
	default:
		snprintf(buf, len, "%.17g", f64_of(v));
		break;
	}
}

/* --- message bytes and guarded buffers --------------------------------------- */

void ref_fill(void *p, size_t bytes, uint64_t seed)
{
	uint8_t *b = p;

	for (size_t i = 0; i < bytes; i += 8) {
		uint64_t v = ref_mix(seed + i);

		memcpy(b + i, &v, bytes - i < 8 ? bytes - i : 8);
	}
}

size_t ref_first_diff(const void *p, size_t bytes, uint64_t seed)
{
	const uint8_t *b = p;

	for (size_t i = 0; i < bytes; i += 8) {
		uint64_t v = ref_mix(seed + i);
		size_t n = bytes - i < 8 ? bytes - i : 8;

		if (memcmp(b + i, &v, n) != 0)
			for (size_t k = 0; k < n; k++)
				if (b[i + k] != ((const uint8_t *)&v)[k])
					return i + k;
	}
	return bytes;
}

void *ref_buf_alloc(comm_t *c, int zc, size_t bytes)
{
	return zc ? comm_mem_alloc(c, bytes) : malloc(bytes);
}

void ref_buf_free(comm_t *c, int zc, void *p)
{
	if (p && zc)
		comm_mem_free(c, p);
	else
		free(p);
}

int ref_all_bytes(const void *p, size_t len, int byte)
{
	const unsigned char *b = p;

	for (size_t i = 0; i < len; i++)
		if (b[i] != byte)
			return 0;
	return 1;
}

int ref_guard_ok(const void *guard)
{
	return ref_all_bytes(guard, REF_GUARD, REF_POISON);
}

int ref_bufs_alloc(comm_t *c, struct ref_bufs *b, size_t slen, int szc, size_t rlen, int rzc,
		   int r)
{
	memset(b, 0, sizeof *b);
	b->slen = slen;
	b->rlen = rlen;
	b->szc = szc;
	b->rzc = rzc;
	b->sbase = slen ? ref_buf_alloc(c, szc, slen) : NULL;
	b->rbase = rlen ? ref_buf_alloc(c, rzc, rlen) : NULL;
	if ((slen && !b->sbase) || (rlen && !b->rbase)) {
		fprintf(stderr, "rank %d: allocating %zu + %zu bytes failed: %s\n", r, slen, rlen,
			szc || rzc ? comm_last_error(c) : "malloc");
		return -1;
	}
	if (b->sbase)
		memset(b->sbase, REF_POISON, slen);
	if (b->rbase)
		memset(b->rbase, REF_POISON, rlen);
	return 0;
}

int ref_bufs_canary(comm_t *c, struct ref_bufs *b, size_t bytes, int r)
{
	void *hole = comm_mem_alloc(c, bytes);

	b->canary = comm_mem_alloc(c, REF_CANARY);
	if (!hole || !b->canary) {
		fprintf(stderr, "rank %d: comm_mem_alloc for the canary: %s\n", r,
			comm_last_error(c));
		ref_buf_free(c, 1, hole);
		return -1;
	}
	memset(b->canary, REF_CANARY_BYTE, REF_CANARY);
	comm_mem_free(c, hole);
	return 0;
}

int ref_bufs_check(const struct ref_bufs *b, int inplace, int r, const char *what)
{
	int bad = 0;

	if (b->sbase && !ref_guard_ok(b->sbase + b->slen - REF_GUARD)) {
		fprintf(stderr, "rank %d: %s: written past the end of the %sbuffer\n", r, what,
			inplace ? "" : "send ");
		bad = 1;
	}
	if (b->rbase && !ref_guard_ok(b->rbase + b->rlen - REF_GUARD)) {
		fprintf(stderr, "rank %d: %s: written past the end of the recv buffer\n", r, what);
		bad = 1;
	}
	if (b->canary && !ref_all_bytes(b->canary, REF_CANARY, REF_CANARY_BYTE)) {
		fprintf(stderr,
			"rank %d: %s: a comm_mem_alloc block next to the staging block was "
			"overwritten\n",
			r, what);
		bad = 1;
	}
	return bad;
}

void ref_bufs_free(comm_t *c, struct ref_bufs *b)
{
	ref_buf_free(c, 1, b->canary);
	ref_buf_free(c, b->szc, b->sbase);
	ref_buf_free(c, b->rzc, b->rbase);
	b->canary = b->sbase = b->rbase = NULL;
}

uint64_t ref_msg_seed(int tag, int from, int to, int round)
{
	return ref_mix(((uint64_t)(unsigned)tag << 48) ^ ((uint64_t)(unsigned)from << 36) ^
		       ((uint64_t)(unsigned)to << 24) ^ (uint64_t)(unsigned)round);
}

int ref_msg_check(const struct ref_bufs *b, size_t bytes, uint64_t sseed, uint64_t rseed, int r,
		  const char *what)
{
	size_t at = ref_first_diff(b->rbase, bytes, rseed);
	int bad = 0;

	if (at != bytes) {
		fprintf(stderr, "rank %d: %s: byte %zu of %zu received is wrong\n", r, what, at,
			bytes);
		bad = 1;
	}
	if (ref_first_diff(b->sbase, bytes, sseed) != bytes) {
		fprintf(stderr, "rank %d: %s: the send buffer was changed\n", r, what);
		bad = 1;
	}
	return bad | ref_bufs_check(b, 0, r, what);
}

/* Run call; on failure print it for rank r and return -1 from the caller. */
#define RING_OK(call)                                                          \
	do {                                                                   \
		comm_result_t rc_ = (call);                                    \
		if (rc_ != COMM_OK) {                                          \
			fprintf(stderr, "rank %d: %s: %s (%s)\n", r, #call,    \
				comm_result_name(rc_), comm_last_error(c));    \
			ref_bufs_free(c, &b);                                  \
			return -1;                                             \
		}                                                              \
	} while (0)

int ref_ring_round(comm_t *c, int r, int n, int tag, int round, comm_dtype_t dt, size_t count,
		   int async)
{
	int next = (r + 1) % n, prev = (r + n - 1) % n, bad;
	size_t bytes = count * comm_dtype_size(dt);
	uint64_t sseed = ref_msg_seed(tag, r, next, round), rseed = ref_msg_seed(tag, prev, r, round);
	comm_request_t *sreq = NULL, *rreq = NULL;
	struct ref_bufs b;
	char what[96];

	if (ref_bufs_alloc(c, &b, bytes + REF_GUARD, round % 2, bytes + REF_GUARD, round % 3 != 0,
			   r) < 0)
		return -1;
	ref_fill(b.sbase, bytes, sseed);
	RING_OK(comm_group_start(c));
	if (round % 4 == 1) {
		RING_OK(comm_recv(c, b.rbase, count, dt, prev, async ? &rreq : NULL));
		RING_OK(comm_send(c, b.sbase, count, dt, next, async ? &sreq : NULL));
	} else {
		RING_OK(comm_send(c, b.sbase, count, dt, next, async ? &sreq : NULL));
		RING_OK(comm_recv(c, b.rbase, count, dt, prev, async ? &rreq : NULL));
	}
	RING_OK(comm_group_end(c));
	if (async) {
		/* the recv first: requests complete in posting order either way */
		RING_OK(comm_wait(rreq, -1));
		RING_OK(comm_wait(sreq, -1));
	}
	snprintf(what, sizeof what, "ring round %d (%zu x %d bytes%s)", round, count,
		 (int)comm_dtype_size(dt), async ? ", requests" : "");
	bad = ref_msg_check(&b, bytes, sseed, rseed, r, what);
	ref_bufs_free(c, &b);
	return bad;
}
