/*
 * matrix.h: the rows of ../shared/RELIABILITY.md's matrix as TAP test
 * points, each followed by the after-row check the matrix asks for: the
 * daemon is alive, its fds and memfd mappings are back to the baseline, and
 * a bystander job that ran through the whole row finished without an error.
 */
#ifndef TESTS_MATRIX_H
#define TESTS_MATRIX_H

#include "harness.h"

enum {
	/*
	 * The row starts (and stops) daemons of its own: no bystander, no
	 * baseline on the shared daemon; the row checks what it needs.
	 */
	MX_OWN_DAEMON = 1,
};

struct mx_row {
	const char *id;   /* "A1", as in the matrix */
	const char *what; /* the scenario, in the matrix's words */
	void (*run)(struct th_daemon *d);
	unsigned flags;
};

/*
 * Run the rows (all, or those whose ids are in argv[1..]) against one
 * daemon started with the extra arguments daemon_args (NULL-terminated, or
 * NULL); print TAP on stdout. Returns the exit status for main.
 */
int mx_main(int argc, char **argv, const struct mx_row *rows, int nrows,
	    const char *const *daemon_args);

/* A TAP diagnostic line ("# ...") on stdout. */
void mx_note(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* Milliseconds on CLOCK_MONOTONIC. */
long mx_now_ms(void);

/* All-reduces the bystander has finished so far (to see it go on during a row). */
long mx_bystander_ops(void);

/* The daemon's log contains s (the whole log, read now). */
int mx_log_has(const struct th_daemon *d, const char *s);

#endif
