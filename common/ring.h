/*
 * ring.h: the submission ring a rank shares with commd, the fast path for
 * ops. It lives in one of the rank's registered segments; the rank attaches
 * it once (RingAttach, with an eventfd) and from then on posts an op by
 * filling the slot of its sequence number and publishing it, and commd
 * answers in the same slot. The socket stays the slow path: ops that find
 * their slot busy go over it, and it wakes whichever side sleeps.
 *
 * Wake-ups, without a lost one (each side stores its flag, then looks at
 * the other's data; sequentially consistent, so one of the two sees):
 * - commd sets `daemon_armed` before it sleeps and looks at the next slot
 *   once more; a rank that publishes a slot and finds the flag set clears
 *   it and writes the eventfd.
 * - a rank sets `rank_sleeping` before it sleeps in poll() on the socket
 *   and looks at its slot once more; commd, after answering a slot, sends
 *   the answer over the socket as well while the flag is set.
 *
 * Everything commd reads here is the rank's to write at any time: commd
 * copies a slot out before it checks it, as it would a message.
 */
#ifndef COMMON_RING_H
#define COMMON_RING_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#define RING_MAGIC 0x676e6972u /* "ring" */
#define RING_VERSION 2
#define RING_SLOTS 256         /* ops a rank may have on its ring at once */
#define RING_DETAIL 372

#define RING_F_GROUP_LAST 1u
#define RING_F_EVENT 2u        /* ready_event holds the op's (Op.ready_event) */
#define RING_F_DONE 4u         /* done_* name its done flag (Op.done, done_value) */

/*
 * The ring's words are plain fields shared with another process: access them
 * atomically (acquire/release, or sequentially consistent for the flags).
 */
#define RING_LOAD(p) atomic_load_explicit((_Atomic __typeof__(*(p)) *)(p), memory_order_acquire)
#define RING_STORE(p, v)                                                       \
	atomic_store_explicit((_Atomic __typeof__(*(p)) *)(p), (v), memory_order_release)
#define RING_LOAD_SC(p) atomic_load((_Atomic __typeof__(*(p)) *)(p))
#define RING_STORE_SC(p, v) atomic_store((_Atomic __typeof__(*(p)) *)(p), (v))
#define RING_XCHG(p, v) atomic_exchange((_Atomic __typeof__(*(p)) *)(p), (v))

/* 640 bytes: the rank's part and commd's on separate cache lines. */
struct ring_slot {
	/* written by the rank */
	uint64_t posted;       /* seq + 1 once the fields below are filled */
	uint64_t seq;
	uint64_t group;        /* 0: not in a group */
	uint64_t count;
	uint64_t send_mem, send_off;
	uint64_t recv_mem, recv_off;
	uint32_t type, dtype, redop, flags;
	int32_t root, peer;
	uint64_t done_mem, done_off;
	uint32_t done_value;
	uint8_t ready_event[64];
	uint8_t pad0[256 - 172];
	/* written by commd */
	uint64_t done;         /* seq + 1 once status and detail are filled */
	int32_t status;
	char detail[RING_DETAIL];
};

struct ring_hdr {
	uint32_t magic;
	uint32_t version;
	uint32_t nslots;
	uint32_t slot_size;
	_Alignas(64) uint32_t daemon_armed;  /* commd sleeps: write the eventfd */
	_Alignas(64) uint32_t rank_sleeping; /* the rank sleeps: answer on the socket too */
	uint8_t pad[64 - 4];
};

#define RING_BYTES (sizeof(struct ring_hdr) + RING_SLOTS * sizeof(struct ring_slot))

static inline struct ring_slot *ring_slot(void *ring, uint64_t seq)
{
	return (struct ring_slot *)((uint8_t *)ring + sizeof(struct ring_hdr)) +
	       seq % RING_SLOTS;
}

_Static_assert(sizeof(struct ring_slot) == 640, "ring slot layout");
_Static_assert(offsetof(struct ring_slot, done) == 256, "ring slot: commd's part on its own lines");
_Static_assert(sizeof(struct ring_hdr) == 192, "ring header layout");

#endif
