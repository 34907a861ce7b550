/*
 * reduce.h: the host reduction kernels: n input arrays combined element by
 * element into one output, for every comm_dtype_t and comm_redop_t.
 */
#ifndef COMMON_REDUCE_H
#define COMMON_REDUCE_H

#include <stddef.h>

#include "comm.h"

/*
 * out[i] = in[0][i] op in[1][i] op ... op in[n-1][i] for i < count, combined
 * in input order. n >= 1; out must not overlap any input (inputs may overlap
 * each other). Integer SUM and PROD wrap; AVG is the wrapped SUM divided by n
 * (integers truncate toward zero). float16 and bfloat16 accumulate in float
 * and round once at the end; float32 and float64 in their own type. An
 * unknown dtype or op, or n < 1, leaves out untouched: check before calling.
 */
void reduce_n(comm_dtype_t dtype, comm_redop_t op, void *out, const void *const *in, int n,
	      size_t count);

/*
 * acc[i] = acc[i] op in[i] for i < count; AVG accumulates the SUM (finish
 * with reduce_div). Integer SUM and PROD wrap; float16 and bfloat16 widen,
 * combine and round at each call. in must not overlap acc.
 */
void reduce_acc(comm_dtype_t dtype, comm_redop_t op, void *acc, const void *in, size_t count);

/* buf[i] /= n as reduce_n's AVG divides its sum (integers toward zero). */
void reduce_div(comm_dtype_t dtype, void *buf, size_t count, int n);

#endif
