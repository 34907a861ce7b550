/*
 * peerraw.h: a test playing a daemon on the peer protocol (peer.c): frames
 * of a 4-byte little-endian length and one PeerMsg, over a TCP socket.
 */
#ifndef TESTS_PEERRAW_H
#define TESTS_PEERRAW_H

#include <stddef.h>
#include <stdint.h>

#include "commd.pb-c.h"

#define PEER_VERSION 3 /* the daemons' peer protocol (peer.c) */

/* A TCP connection to the listener at "HOST:PORT" (a loopback port); the fd, or -1. */
int pr_connect(const char *addr);
/* A frame holding m to fd; 0 or -1. */
int pr_send(int fd, const Commpb__PeerMsg *m);
/* len raw bytes to fd (a frame made by hand); 0 or -1. */
int pr_send_raw(int fd, const void *b, size_t len);
/* A PeerHello of this protocol (or version) naming node, with a UCX address or none. */
int pr_hello(int fd, uint32_t version, const char *node, const uint8_t *ucx, size_t ucx_len);
void pr_ping(int fd, uint64_t v);
/* The next frame on fd, waiting for it; NULL at end of file. The caller frees it. */
Commpb__PeerMsg *pr_read(int fd);
/*
 * The next message from one of fds[n] (its index in *from), answering
 * pings and pinging every 500 ms to feed the daemons' heartbeat; NULL
 * after ms. The caller frees it.
 */
Commpb__PeerMsg *pr_next(const int *fds, int n, int *from, int ms);
/* The daemon took in everything sent on fd so far: a ping answered. 0 or -1. */
int pr_sync(int fd);
/* Whether the daemon closes fd within ms (what it sends before is read and dropped). */
int pr_closed_within(int fd, int ms);

#endif
