/*
 * opcase.h: collective test cases (every op x dtype x redop, roots, in
 * place, staged) checked element by element against ref.h, and the lists
 * of them that test-ops (one daemon) and test-nodes (several) run as plans.
 */
#ifndef TESTS_OPCASE_H
#define TESTS_OPCASE_H

#include <stddef.h>
#include <stdint.h>

#include "comm.h"
#include "plan.h"

#define OC_BIG 1000003          /* test-ops' large count: worker threads, parts and chunks */
#define OC_EVERY_ROOT -1

enum oc_kind { OC_AR, OC_RS, OC_AG, OC_BC, OC_RD, OC_A2A };
enum oc_mode { OC_ZC, OC_STAGED };
enum oc_place { OC_OOP, OC_INPLACE };

struct oc_case {
	enum oc_kind kind;
	comm_dtype_t dt;
	comm_redop_t op;
	size_t count;   /* per-rank block: recvcount, sendcount, block of all-to-all */
	int root;       /* broadcast and reduce: a root, or OC_EVERY_ROOT in turn */
	enum oc_mode mode;
	enum oc_place place;
	int null;       /* non-root broadcast sendbuf / reduce recvbuf NULL */
	int tolerant;   /* float16/bfloat16 SUM, PROD, AVG within OC_TOL_ULPS (see opcase.c) */
};

/* What the plan builders below vary. */
struct oc_opts {
	size_t big;     /* the large count (test-ops: OC_BIG) */
	int tolerant;   /* the job spans daemons: every case is tolerant */
};

/* The ulps of float16/bfloat16 a tolerant case allows (see opcase.c). */
#define OC_TOL_ULPS 4

/* Whether ops of kind k reduce (and so take a redop). */
int oc_reduces(enum oc_kind k);
/* One line about t for a world of n ranks, in buf. */
const char *oc_describe(const struct oc_case *t, int n, char *buf, size_t len);
/*
 * Run t (every root in turn) on rank r of n with this seed and check every
 * rank's output, untouched inputs, guards and canary: 0 correct, 1 wrong
 * values (printed), -1 an op failed (printed; the caller gives up).
 */
int oc_run_case(comm_t *c, const struct oc_case *t, uint32_t seed, int r, int n);

/* Append a case to p (which it sets up to run oc_case's); tolerant from o. */
void oc_add(struct th_plan *p, const struct oc_opts *o, enum oc_kind k, comm_dtype_t dt,
	    comm_redop_t op, size_t count, int root, enum oc_mode m, enum oc_place pl, int null);
/* Every op x dtype x redop at counts 0, 1, 7, 4097: n=4, zero-copy, out of place. */
void oc_add_matrix(struct th_plan *p, const struct oc_opts *o);
/*
 * Each op on n ranks: SUM (and the copy-only ops) at 1, 7, 4097 and o->big,
 * the other reductions at 4097, and the big count with MAX, AVG and MIN.
 */
void oc_add_world(struct th_plan *p, int n, const struct oc_opts *o);
/* Each op in place and staged (and both) on n ranks, at 7 and o->big. */
void oc_add_place_mode(struct th_plan *p, int n, const struct oc_opts *o);
/*
 * Name p's job "<prefix>-<k>" and seed it (k counts the plans this process
 * ran), then th_plan_run it on d or p->ds.
 */
void oc_plan_run(const struct th_daemon *d, struct th_plan *p, const char *prefix);

#endif
