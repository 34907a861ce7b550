/*
 * bench-corrupt.c: an LD_PRELOAD shim for test-commbench.sh. A blocking
 * float32 all-reduce returns with its last element one too large, so a run of
 * commbench under it must count wrong values and fail.
 */
#include <dlfcn.h>

#include "comm.h"

typedef comm_result_t (*allreduce_fn)(comm_t *, const void *, void *, size_t, comm_dtype_t,
				      comm_redop_t, comm_request_t **);

comm_result_t comm_allreduce(comm_t *comm, const void *sendbuf, void *recvbuf, size_t count,
			     comm_dtype_t dtype, comm_redop_t op, comm_request_t **req)
{
	allreduce_fn real = (allreduce_fn)dlsym(RTLD_NEXT, "comm_allreduce");
	comm_result_t rc;

	if (!real)
		return COMM_ERR_INTERNAL;
	rc = real(comm, sendbuf, recvbuf, count, dtype, op, req);
	if (rc == COMM_OK && !req && dtype == COMM_FLOAT32 && count > 0)
		((float *)recvbuf)[count - 1] += 1;
	return rc;
}
