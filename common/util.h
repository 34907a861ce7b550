/* util.h: small helpers shared by the daemon, the library and the tools. */
#ifndef COMMON_UTIL_H
#define COMMON_UTIL_H

#include <stddef.h>
#include <stdint.h>

#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))

/* Monotonic clock in milliseconds. */
uint64_t now_ms(void);
/* The same in microseconds. */
uint64_t now_us(void);

/* *out = a * b; returns -1 when the product overflows size_t. */
int mul_overflow_size(size_t a, size_t b, size_t *out);

/* Parse all of s as a decimal in [min, max] into *out; -1 if it is not one. */
int parse_long_in(const char *s, long min, long max, long *out);
/* The same for an int. */
int parse_int_in(const char *s, int min, int max, int *out);
/* A byte count of at most 1 TiB with an optional K, M or G (powers of 1024); -1 if bad. */
int parse_bytes(const char *s, size_t *out);

/* Compare two byte strings in time that depends only on their lengths. */
int const_time_eq(const void *a, size_t alen, const void *b, size_t blen);

#endif
