/*
 * raw.h: a client that speaks commd's protocol by hand (frames, fds, the
 * handshake), for tests that send what libcomm never would.
 */
#ifndef TESTS_RAW_H
#define TESTS_RAW_H

#include <stddef.h>
#include <stdint.h>

#include "frame.h"

/* Connect to the daemon's socket (exits the test if that fails). */
int raw_connect(const char *sock);
/* Send env with nfds fds (SCM_RIGHTS); a failed send is a failed check. */
void raw_send(int fd, Commpb__Envelope *env, const int *fds, int nfds);
/* The next message (the caller frees it), or NULL at end of file or after 5 s. */
Commpb__Envelope *raw_recv(int fd, struct frame_reader *r);
/* Whether the daemon closes fd (after any messages) within 5 s. */
int raw_closed_by_daemon(int fd);
/*
 * Hello as rank 0 of a 1-rank job named job (no token), speaking versions
 * vmin..vmax; checks the reply's status against want.
 */
void raw_hello(int fd, struct frame_reader *r, const char *job, uint32_t vmin, uint32_t vmax,
	       int want);
/*
 * The Error commd sends on fd (waiting ms for one to start; -1: raw_recv's
 * 5 s): its status and detail; -1 when none came (or something else did).
 */
int raw_error(int fd, int ms, char *detail, size_t len);
/*
 * Hello as rank `rank` of a world-rank job with token (the daemon's default
 * op deadline); the reply's status, or -1, and its detail in detail (if not NULL).
 */
int raw_hello_rank(int fd, struct frame_reader *r, const char *job, const char *token, int rank,
		   int world, char *detail, size_t len);
/* A memfd of size bytes sealed against shrinking, as commd takes them (REQUIREd). */
int raw_memfd(size_t size);
/* Hello as an admin client (commctl's role): the reply's status, or -1. */
int raw_hello_admin(int fd, struct frame_reader *r);
/* Register memfd mfd of size bytes; the reply's status, and its mem id in *mem_id if not NULL. */
int raw_register_fd(int sock, struct frame_reader *r, int mfd, uint64_t size, uint64_t *mem_id);
/*
 * RingAttach of a ring of slots slots at (mem_id, off), waking commd through
 * efd; the reply's status (-1: no RingAttachReply) and its detail.
 */
int raw_ring_attach(int sock, struct frame_reader *r, uint64_t mem_id, uint64_t off,
		    uint32_t slots, int efd, char *detail, size_t len);

#endif
