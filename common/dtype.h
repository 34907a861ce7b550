/*
 * dtype.h: element types and reduction operations (sizes, names, checks) and
 * the float16/bfloat16 <-> float conversions the reduction kernels use.
 */
#ifndef COMMON_DTYPE_H
#define COMMON_DTYPE_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "comm.h"

/* Mark a function as part of libcomm's exported API (also in err.h). */
#ifndef COMM_API
#define COMM_API __attribute__((visibility("default")))
#endif

/* Size in bytes of one element of dtype (a comm_dtype_t), 0 when unknown. */
size_t dtype_size(int dtype);

/* Nonzero when dtype is one of the comm_dtype_t values. */
int dtype_valid(int dtype);

/* The dtype's short name, e.g. "bfloat16"; "?" when unknown. */
const char *dtype_name(int dtype);

/* Nonzero when op is one of the comm_redop_t values. */
int redop_valid(int op);

/* The op's short name, e.g. "sum"; "?" when unknown. */
const char *redop_name(int op);

/*
 * IEEE 754 binary16 and bfloat16 on their uint16_t bits. Narrowing rounds to
 * nearest, ties to even; subnormals are exact, values too large become inf,
 * NaN stays NaN (quieted, sign kept). Widening is exact. Branch free
 * (selects by mask) so that gcc vectorises the loops that call them; they
 * assume the default rounding mode (float_to_half adds 0.5f for subnormals).
 */
static inline float half_to_float(uint16_t h)
{
	uint32_t sign = (uint32_t)(h & 0x8000) << 16;
	uint32_t x = (uint32_t)(h & 0x7fff) << 13;
	uint32_t e = x & 0x0f800000;
	uint32_t special = -(uint32_t)(e == 0x0f800000);
	uint32_t tiny = -(uint32_t)(e == 0);
	uint32_t d;
	float f;

	/* rebias; inf and NaN to exponent 255; subnormals: 2^-14 * 1.m - 2^-14 */
	x += (112u << 23) + (special & (112u << 23)) + (tiny & (1u << 23));
	memcpy(&f, &x, sizeof(f));
	f -= 0x1p-14f;
	memcpy(&d, &f, sizeof(d));
	x = sign | (d & tiny) | (x & ~tiny);
	memcpy(&f, &x, sizeof(f));
	return f;
}

static inline uint16_t float_to_half(float f)
{
	uint32_t x, sign, ax, sub, norm, big, nan, large, normal;
	float a;

	memcpy(&x, &f, sizeof(x));
	sign = (x >> 16) & 0x8000;
	ax = x & 0x7fffffff;
	/* below 2^-14: adding 0.5 leaves the rounded 2^-24 units in the low bits */
	memcpy(&a, &ax, sizeof(a));
	a += 0.5f;
	memcpy(&sub, &a, sizeof(sub));
	sub -= 0x3f000000;
	/* 2^-14 up to 2^16: rebias, round to nearest even on the dropped 13 bits */
	norm = (ax - (112u << 23) + 0xfff + ((ax >> 13) & 1)) >> 13;
	/* 2^16 and up: inf, or a quiet NaN keeping the top of the payload */
	nan = -(uint32_t)(ax > 0x7f800000);
	big = 0x7c00 | (nan & (0x200 | ((ax >> 13) & 0x3ff)));
	large = -(uint32_t)(ax >= 0x47800000);
	normal = -(uint32_t)(ax >= 0x38800000) & ~large;
	return (uint16_t)(sign | (big & large) | (norm & normal) | (sub & ~(large | normal)));
}

static inline float bf16_to_float(uint16_t b)
{
	uint32_t bits = (uint32_t)b << 16;
	float f;

	memcpy(&f, &bits, sizeof(f));
	return f;
}

static inline uint16_t float_to_bf16(float f)
{
	uint32_t x;

	memcpy(&x, &f, sizeof(x));
	if ((x & 0x7fffffff) > 0x7f800000)
		return (uint16_t)((x >> 16) | 0x40);
	x += 0x7fff + ((x >> 16) & 1);
	return (uint16_t)(x >> 16);
}

#endif
