/*
 * fuzz-input.h: how fuzz-conn reads an input, shared with make-corpus, which
 * writes the seeds. An input is a list of records, each a control byte, a
 * 2-byte little-endian length and that many bytes (fewer at the end of the
 * input: what is left).
 */
#ifndef TESTS_FUZZ_INPUT_H
#define TESTS_FUZZ_INPUT_H

#define FZ_CLIENTS 4            /* client connections at once, at most */
#define FZ_REC_HDR 3            /* control byte, length (2 bytes) */
#define FZ_MEMFD_SIZE (256u << 10) /* each memfd a record carries: room for a ring */

/* The control byte. */
#define FZ_CLIENT(ctl) ((ctl) & 3u)        /* which client: 0..3, connected on first use */
#define FZ_NFDS(ctl) (((ctl) >> 2) & 7u)   /* fds sent with the bytes: over 4 is a protocol error */
#define FZ_NFDS_SHIFT 2
#define FZ_EVENTFD 0x20u /* the first fd is an eventfd (for RingAttach), the others memfds */
#define FZ_HOLD 0x40u    /* do not run the daemon after this record: bytes pile up */
#define FZ_CLOSE 0x80u   /* close the client's end after this record (a later record reconnects) */

/*
 * A record with FZ_EVENTFD but no fds sends nothing. With 4 bytes or more it
 * is a poke, the rank writing its shared memory: the first 4 bytes (LE) are
 * an offset, bits 0..17 into one of the memfds the client sent, bits 18..21
 * which one (modulo how many), and the rest is written there; then the
 * client's last eventfd is written, to wake a ring. With fewer bytes it is a
 * tick: the daemon's deadline checks run as if that many times 10 ms had
 * passed (the bytes LE; none: a day and a millisecond).
 */
#define FZ_POKE_OFF(v) ((v) & ((1u << 18) - 1))
#define FZ_POKE_FD(v) (((v) >> 18) & 15u)

#endif
