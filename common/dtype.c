/* dtype.c: sizes and names of the element types and reduction operations. */
#include "dtype.h"

static const struct {
	size_t size;
	const char *name;
} dtypes[] = {
	[COMM_INT8] = { 1, "int8" },
	[COMM_UINT8] = { 1, "uint8" },
	[COMM_INT32] = { 4, "int32" },
	[COMM_UINT32] = { 4, "uint32" },
	[COMM_INT64] = { 8, "int64" },
	[COMM_UINT64] = { 8, "uint64" },
	[COMM_FLOAT16] = { 2, "float16" },
	[COMM_BFLOAT16] = { 2, "bfloat16" },
	[COMM_FLOAT32] = { 4, "float32" },
	[COMM_FLOAT64] = { 8, "float64" },
};

static const char *const redops[] = {
	[COMM_SUM] = "sum",
	[COMM_PROD] = "prod",
	[COMM_MIN] = "min",
	[COMM_MAX] = "max",
	[COMM_AVG] = "avg",
};

/* Nonzero for a known dtype: the table above has an entry for it. */
int dtype_valid(int dtype)
{
	return dtype >= 0 && (size_t)dtype < sizeof(dtypes) / sizeof(dtypes[0]);
}

/* Bytes per element, 0 for an unknown dtype. */
size_t dtype_size(int dtype)
{
	return dtype_valid(dtype) ? dtypes[dtype].size : 0;
}

/* Short name of the dtype, "?" for an unknown one. */
const char *dtype_name(int dtype)
{
	return dtype_valid(dtype) ? dtypes[dtype].name : "?";
}

/* Nonzero for a known reduction operation. */
int redop_valid(int op)
{
	return op >= 0 && (size_t)op < sizeof(redops) / sizeof(redops[0]);
}

/* Short name of the operation, "?" for an unknown one. */
const char *redop_name(int op)
{
	return redop_valid(op) ? redops[op] : "?";
}

/* Public face of dtype_size. */
COMM_API size_t comm_dtype_size(comm_dtype_t dtype)
{
	return dtype_size((int)dtype);
}
