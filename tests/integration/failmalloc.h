/*
 * failmalloc.h: the control block failmalloc.so maps from the file named by
 * $COMMD_FAILMALLOC, shared with the test that arms it (test-malloc.c).
 */
#ifndef TESTS_FAILMALLOC_H
#define TESTS_FAILMALLOC_H

struct failmalloc {
	volatile int pid;       /* the process whose main thread may fail */
	volatile int countdown; /* > 0: that thread's countdown-th allocation from now fails */
	volatile int failed;    /* allocations failed so far */
};

#endif
