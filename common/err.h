/*
 * err.h: the one error table. The codes themselves are public (comm.h,
 * COMM_RESULT_LIST); this gives their names and texts to every program.
 */
#ifndef COMMON_ERR_H
#define COMMON_ERR_H

#include "comm.h"

/* Mark a function as part of libcomm's exported API. */
#define COMM_API __attribute__((visibility("default")))

/* Nonzero when rc is one of the codes in COMM_RESULT_LIST. */
int err_known(int rc);

#endif
