/*
 * barrier.h: a barrier that must hold: ranks arrive 25 ms apart, a different
 * one last each round, and none may leave before the last one entered.
 */
#ifndef TESTS_BARRIER_H
#define TESTS_BARRIER_H

#include <stdint.h>

#define TH_BARRIER_ROUNDS 6
#define TH_BARRIER_MAX_RANKS 8

/* enter[round][rank] and leave[round][rank], CLOCK_MONOTONIC ns, shared with the ranks. */
struct th_barrier {
	int64_t enter[TH_BARRIER_ROUNDS][TH_BARRIER_MAX_RANKS];
	int64_t leave[TH_BARRIER_ROUNDS][TH_BARRIER_MAX_RANKS];
};

/* Zeroed stamps in shared memory (the ranks are forked); NULL if mmap fails. */
struct th_barrier *th_barrier_new(void);
void th_barrier_free(struct th_barrier *b);
/* A rank (th_rank_fn, arg a struct th_barrier): the rounds, blocking and with a request. */
int th_barrier_rank(int r, int n, void *arg);
/* How many times a rank left before the last one entered, each printed on stderr. */
int th_barrier_early(const struct th_barrier *b, int n);

#endif
