/*
 * frame.h: length-prefixed frames on a Unix stream socket. A frame is a
 * 4-byte little-endian length and one packed commpb Envelope; file
 * descriptors ride with SCM_RIGHTS on the sendmsg that starts the frame.
 */
#ifndef COMMON_FRAME_H
#define COMMON_FRAME_H

#include <stddef.h>
#include <stdint.h>

#include "commd.pb-c.h"

#define FRAME_HDR 4
#define FRAME_MAX (64 * 1024)  /* largest envelope ever, in bytes (a reader may take less) */
#define FRAME_MAX_FDS 4        /* most fds one recvmsg may carry, unless the reader says */
#define FRAME_FDS_CAP 16       /* most fds a reader queues (and its max_fds at most) */
#define FRAME_FD_LOST (-2)     /* queued in place of fds the kernel could not give us */
#define PROTO_VERSION 4 /* 2: the submission ring (RingAttach); 3: device memory; 4: done flags */
#define PROTO_VERSION_MIN 1

/*
 * Reading side: bytes and fds as they arrive. fds are queued in arrival
 * order; the frame that takes fds claims them from the front. The reader
 * owns queued fds until frame_take_fd hands one out.
 */
struct frame_reader {
	uint8_t *buf;
	size_t len;
	size_t cap;
	int fds[FRAME_FDS_CAP];
	int nfds;
	uint32_t max_len; /* longest envelope taken (FRAME_MAX after init) */
	int max_fds;      /* most fds one recvmsg may carry (FRAME_MAX_FDS after init) */
};

enum frame_status {
	FRAME_OK = 0,       /* a whole frame is there */
	FRAME_MORE = 1,     /* need more bytes */
	FRAME_TOO_BIG = -1, /* the length prefix is over the reader's max_len */
};

/* An empty reader taking envelopes up to FRAME_MAX and FRAME_MAX_FDS fds a recvmsg. */
void frame_reader_init(struct frame_reader *r);
/* Closes queued fds and frees the buffer. */
void frame_reader_free(struct frame_reader *r);

/*
 * One recvmsg from sock into r. Returns bytes read (> 0), 0 at end of file,
 * or -errno (-EAGAIN on a non-blocking socket with nothing to read;
 * -EPROTO when more fds came than max_fds or the queue takes, all of them
 * closed). Fds the kernel could not hand over for want of fds (the process
 * at its limit) are queued as one FRAME_FD_LOST, for the frame that wanted
 * them to be refused alone.
 */
long frame_reader_recv(struct frame_reader *r, int sock);

/* Append bytes (for tests and fuzzing). */
int frame_reader_feed(struct frame_reader *r, const void *data, size_t len);

/* Look for a whole frame at the front: FRAME_OK sets *payload and *len. */
enum frame_status frame_next(const struct frame_reader *r, const uint8_t **payload, size_t *len);

/* Drop the frame at the front whose payload is len bytes. */
void frame_consume(struct frame_reader *r, size_t len);

/* Hand the oldest queued fd to the caller (who then owns it), or FRAME_FD_LOST; -1 if none. */
int frame_take_fd(struct frame_reader *r);

/*
 * Pack env into a new buffer holding the whole frame (header included).
 * Returns its size, 0 when env would exceed FRAME_MAX or memory ran out.
 */
size_t frame_pack(const Commpb__Envelope *env, uint8_t **out);

/*
 * Write a whole frame on a blocking socket, fds attached to the first byte.
 * Returns 0 or -errno.
 */
int frame_send_all(int sock, const uint8_t *frame, size_t len, const int *fds, int nfds);

/*
 * Write what fits of a frame on a non-blocking socket starting at *off; fds
 * go with the first byte (off == 0). Returns 1 when done, 0 when the socket
 * is full, -errno on error.
 */
int frame_send_some(int sock, const uint8_t *frame, size_t len, size_t *off, const int *fds,
		    int nfds);

#endif
