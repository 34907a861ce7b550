/*
 * check.h: the assertions every test program uses. A failed check prints
 * where and why, and the test exits 1 at the end (or at once with REQUIRE).
 */
#ifndef TESTS_CHECK_H
#define TESTS_CHECK_H

#include <stdio.h>
#include <stdlib.h>

extern int check_failures;

#define CHECK(cond, ...)                                                       \
	do {                                                                   \
		if (!(cond)) {                                                 \
			fprintf(stderr, "%s:%d: check failed: %s: ", __FILE__, \
				__LINE__, #cond);                              \
			fprintf(stderr, __VA_ARGS__);                          \
			fputc('\n', stderr);                                   \
			check_failures++;                                      \
		}                                                              \
	} while (0)

#define REQUIRE(cond, ...)                                                     \
	do {                                                                   \
		int check_ok_ = (cond) != 0;                                   \
		CHECK(check_ok_ && #cond, __VA_ARGS__);                        \
		if (!check_ok_)                                                \
			exit(1);                                               \
	} while (0)

/* Exit status for main: 0 when every check passed. */
#define CHECK_EXIT() (check_failures ? 1 : 0)

#endif
