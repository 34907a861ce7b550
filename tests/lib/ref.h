/*
 * ref.h: values and reference results for every dtype and op, computed
 * independently of the daemon's kernels, and the poisoned buffers they are
 * checked in. An element travels as its raw bits in the low bytes of a
 * uint64_t (little endian: the bytes it has in memory).
 */
#ifndef TESTS_REF_H
#define TESTS_REF_H

#include <stddef.h>
#include <stdint.h>

#include "comm.h"

#define REF_GUARD 64            /* poisoned bytes after every buffer */
#define REF_POISON 0xa5
#define REF_CANARY (64u << 10)  /* comm_mem_alloc block next to a staging block */
#define REF_CANARY_BYTE 0x5a
#define REF_MAX_RANKS 64        /* the most inputs a caller gives ref_fold */

#define REF_NDTYPES 10
#define REF_NREDOPS 5

/* Every dtype, int8 .. float64, and every reduction, sum .. avg. */
extern const comm_dtype_t ref_dtypes[REF_NDTYPES];
extern const comm_redop_t ref_redops[REF_NREDOPS];

/* "int8" .. "float64", "sum" .. "avg"; "?" for a value out of range. */
const char *ref_dtype_name(comm_dtype_t dt);
const char *ref_op_name(comm_redop_t op);

/* splitmix64's finalizer: well-mixed bits that every rank draws alike. */
uint64_t ref_mix(uint64_t x);
/* The hash behind element idx of rank r's input in a case with this seed. */
uint64_t ref_hash(uint32_t seed, int r, size_t idx);

/* Bytes of one dt element (the reference's own table, not libcomm's). */
size_t ref_size(comm_dtype_t dt);

/*
 * v as dt: integers through int64_t, wrapped to the type; float16 and
 * bfloat16 from (float)v, rounded once to nearest even; float32, float64.
 */
uint64_t ref_bits(comm_dtype_t dt, double v);
/* The value of the dt element bits (integers sign- or zero-extended). */
double ref_value(comm_dtype_t dt, uint64_t bits);
/* The dt element at p, or stored at p (ref_size(dt) bytes). */
uint64_t ref_load(comm_dtype_t dt, const void *p);
void ref_store(comm_dtype_t dt, uint64_t bits, void *p);

/*
 * A small dt value drawn from u: integers -5..5 (unsigned 0..10), float16
 * and bfloat16 multiples of 0.5 in -2..2, float32 and float64 multiples of
 * 0.25 in -2..2; SUM, PROD, MIN and MAX of a few of them are exact.
 */
uint64_t ref_small(comm_dtype_t dt, uint64_t u);

/*
 * in[0] op in[1] op ... op in[n-1], in that order (n >= 1). Integers in the
 * unsigned type: SUM and PROD wrap; MIN and MAX compare in the element type;
 * AVG is the wrapped sum read in the element type divided by n (toward
 * zero). Floats widened to float (float64: double), combined in rank order
 * and rounded to dt once at the end, to nearest even; AVG divides by n first.
 */
uint64_t ref_fold(comm_dtype_t dt, comm_redop_t op, const uint64_t *in, int n);

/* Whether a and b are the same dt element, bit for bit. */
int ref_same(comm_dtype_t dt, uint64_t a, uint64_t b);
/*
 * Whether got is want as a number: integers equal; floats equal or within
 * tol relative to want (absolute when |want| < 1).
 */
int ref_near(comm_dtype_t dt, uint64_t got, uint64_t want, double tol);
/* The dt element v for a message: "%d", "%.9g", "1.5 (0x3e00)", ... */
void ref_str(comm_dtype_t dt, uint64_t v, char *buf, size_t len);

/* Fill bytes at p with bytes drawn from seed (ref_mix of seed + offset). */
void ref_fill(void *p, size_t bytes, uint64_t seed);
/* The first byte of p that ref_fill(p, bytes, seed) would not have written, or bytes. */
size_t ref_first_diff(const void *p, size_t bytes, uint64_t seed);

/* bytes from comm_mem_alloc when zc, else from malloc; NULL on failure. */
void *ref_buf_alloc(comm_t *c, int zc, size_t bytes);
/* Free p from ref_buf_alloc(c, zc, ...); NULL is ignored. */
void ref_buf_free(comm_t *c, int zc, void *p);
/* Whether all len bytes at p are byte. */
int ref_all_bytes(const void *p, size_t len, int byte);
/* Whether the REF_GUARD bytes from guard on still hold REF_POISON. */
int ref_guard_ok(const void *guard);

/* One op's send and recv allocations, each ending in REF_GUARD poisoned bytes. */
struct ref_bufs {
	char *sbase, *rbase;  /* NULL: none (rbase in place) */
	size_t slen, rlen;    /* bytes, the guard included */
	int szc, rzc;         /* from comm_mem_alloc, else malloc */
	char *canary;         /* see ref_bufs_canary; NULL: none */
};

/*
 * Allocate slen and rlen bytes (0: none) into b and poison them all; 0, or
 * -1 with the reason printed for rank r. Free with ref_bufs_free either way.
 */
int ref_bufs_alloc(comm_t *c, struct ref_bufs *b, size_t slen, int szc, size_t rlen, int rzc,
		   int r);
/*
 * Give b a REF_CANARY block of REF_CANARY_BYTE where a write past a staged
 * send of bytes would land: the library stages it in the first free block
 * that fits, so a hole of exactly that size is left just before the canary.
 * 0, or -1 with the reason printed for rank r.
 */
int ref_bufs_canary(comm_t *c, struct ref_bufs *b, size_t bytes, int r);
/*
 * 0 when b's guards and canary are intact; else 1, with what was overwritten
 * printed as "rank r: what: ..." (sbase is "the buffer" in place).
 */
int ref_bufs_check(const struct ref_bufs *b, int inplace, int r, const char *what);
/* Free b's allocations and canary; b is left empty. */
void ref_bufs_free(comm_t *c, struct ref_bufs *b);

/* The seed of the message tag from rank from to rank to in a round. */
uint64_t ref_msg_seed(int tag, int from, int to, int round);
/*
 * Whether b's recv block holds ref_fill(rseed) and its send block still
 * sseed (bytes each), guards intact; prints why not for rank r. 0 or 1.
 */
int ref_msg_check(const struct ref_bufs *b, size_t bytes, uint64_t sseed, uint64_t rseed, int r,
		  const char *what);
/*
 * One round of a ring in a group: rank r sends count dt to r+1 and receives
 * from r-1 (messages seeded by tag and round); zero-copy or staged, send or
 * recv first, blocking or with requests (async), all by round. 0; 1 when the
 * data was wrong; -1 when an op failed (printed: the caller bails).
 */
int ref_ring_round(comm_t *c, int r, int n, int tag, int round, comm_dtype_t dt, size_t count,
		   int async);

#endif
