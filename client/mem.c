/*
 * mem.c: comm_mem_alloc. Memory comes from a few large memfd segments,
 * sealed and registered with commd once each; blocks are carved out of them
 * first-fit, so a small allocation costs no system call. Segments emptied
 * are kept for the next blocks (a staged op's, of the same size as its
 * last), up to COMM_KEEP_MB in all: making, registering and faulting in a
 * segment cost far more than the copy a staged op makes. A family of comms
 * (comm_split) names each other's segments: each registers another's memfd
 * with commd the first time an op of its names it, and forgets it once the
 * owner freed it.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "comm-int.h"
#include "util.h"

#define KEEP_MB_DEFAULT 1024

static size_t round_up(size_t n, size_t to)
{
	return (n + to - 1) / to * to;
}

/* Segment uids: never reused in the process, so a borrow never names a newer segment. */
static uint64_t next_uid = 1;

/* Register memfd fd of size bytes with commd; 0 and *mem_id, or -1 (the comm's error set). */
static int mem_register(comm_t *c, int fd, size_t size, uint64_t *mem_id)
{
	Commpb__Envelope env = COMMPB__ENVELOPE__INIT, *reply = NULL;
	Commpb__RegisterMem reg = COMMPB__REGISTER_MEM__INIT;
	int rc = -1;

	reg.kind = COMMPB__MEM_KIND__MEM_MEMFD;
	reg.size = size;
	env.body_case = COMMPB__ENVELOPE__BODY_REGISTER_MEM;
	env.register_mem = &reg;
	if (comm_call(c, &env, &fd, 1, &reply) != COMM_OK)
		return -1;
	if (reply->body_case != COMMPB__ENVELOPE__BODY_REGISTER_MEM_REPLY)
		comm_set_error(c, COMM_ERR_PROTOCOL, "mem alloc: unexpected answer");
	else if (reply->register_mem_reply->status != COMM_OK)
		comm_set_error(c, reply->register_mem_reply->status, "%s",
			       reply->register_mem_reply->detail);
	else
		rc = 0;
	if (rc == 0)
		*mem_id = reply->register_mem_reply->mem_id;
	commpb__envelope__free_unpacked(reply, NULL);
	return rc;
}

static void fam_lock(comm_t *c)
{
	if (c->fam)
		pthread_mutex_lock(&c->fam->lock);
}

static void fam_unlock(comm_t *c)
{
	if (c->fam)
		pthread_mutex_unlock(&c->fam->lock);
}

/* Make a sealed memfd of size bytes, map it, register it with commd. */
static struct seg *seg_new(comm_t *c, size_t size)
{
	struct seg *s = calloc(1, sizeof *s);
	struct block *b = calloc(1, sizeof *b);
	int fd = -1;

	if (!s || !b) {
		comm_set_error(c, COMM_ERR_NO_MEMORY, "mem alloc: out of memory");
		goto fail;
	}
	fd = memfd_create("comm-segment", MFD_CLOEXEC | MFD_ALLOW_SEALING);
	if (fd < 0 || ftruncate(fd, (off_t)size) < 0 ||
	    fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) < 0) {
		comm_set_error(c, COMM_ERR_NO_MEMORY, "mem alloc: memfd of %zu bytes: %s", size,
			       strerror(errno));
		goto fail;
	}
	s->base = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (s->base == MAP_FAILED) {
		s->base = NULL;
		comm_set_error(c, COMM_ERR_NO_MEMORY, "mem alloc: mmap of %zu bytes: %s", size,
			       strerror(errno));
		goto fail;
	}
	s->size = size;
	if (mem_register(c, fd, size, &s->mem_id) < 0)
		goto fail;
	s->fd = fd;
	s->uid = __atomic_fetch_add(&next_uid, 1, __ATOMIC_RELAXED);
	b->size = size;
	s->blocks = b;
	fam_lock(c);
	s->next = c->segs;
	c->segs = s;
	fam_unlock(c);
	return s;
fail:
	if (s && s->base)
		munmap(s->base, s->size);
	if (fd >= 0)
		close(fd);
	free(b);
	free(s);
	return NULL;
}

void mem_forget(comm_t *c, uint64_t mem_id)
{
	Commpb__Envelope env = COMMPB__ENVELOPE__INIT, *reply = NULL;
	Commpb__FreeMem fm = COMMPB__FREE_MEM__INIT;

	if (c->broken != COMM_OK)
		return;
	fm.mem_id = mem_id;
	env.body_case = COMMPB__ENVELOPE__BODY_FREE_MEM;
	env.free_mem = &fm;
	if (comm_call(c, &env, NULL, 0, &reply) == COMM_OK)
		commpb__envelope__free_unpacked(reply, NULL);
}

/*
 * Take *sp off the comm's list, unregister and unmap it (the daemon keeps
 * it while ops use it); the family's others forget it at their next op.
 */
static void seg_free(comm_t *c, struct seg **sp, int tell_daemon)
{
	struct seg *s = *sp;

	fam_lock(c);
	*sp = s->next;
	if (c->fam)
		__atomic_add_fetch(&c->fam->gen, 1, __ATOMIC_RELAXED);
	fam_unlock(c);
	if (tell_daemon)
		mem_forget(c, s->mem_id);
	while (s->blocks) {
		struct block *b = s->blocks;

		s->blocks = b->next;
		free(b);
	}
	munmap(s->base, s->size);
	close(s->fd);
	free(s);
}

/* First fit in s; splits the free block it takes. */
static void *seg_take(struct seg *s, size_t size)
{
	for (struct block *b = s->blocks; b; b = b->next) {
		if (b->used || b->size < size)
			continue;
		if (b->size > size) {
			struct block *rest = calloc(1, sizeof *rest);

			if (!rest)
				return NULL;
			rest->off = b->off + size;
			rest->size = b->size - size;
			rest->next = b->next;
			b->next = rest;
			b->size = size;
		}
		b->used = 1;
		return s->base + b->off;
	}
	return NULL;
}

/* Empty: one block, free. */
static int seg_empty(const struct seg *s)
{
	return !s->blocks->used && !s->blocks->next;
}

/* Bytes of the empty segments kept, but the first (the list's last, always kept). */
static size_t idle_bytes(const comm_t *c)
{
	size_t n = 0;

	for (const struct seg *s = c->segs; s; s = s->next)
		if (s->next && seg_empty(s))
			n += s->size;
	return n;
}

/* Give back the empty segments kept (but the first). */
static void trim_idle(comm_t *c)
{
	for (struct seg **sp = &c->segs; *sp;) {
		struct seg *s = *sp;

		if (s->next && seg_empty(s))
			seg_free(c, sp, 1);
		else
			sp = &s->next;
	}
}

void mem_init(comm_t *c)
{
	const char *v = getenv("COMM_KEEP_MB");
	long mb;

	if (!v || parse_long_in(v, 0, 1L << 30, &mb) < 0)
		mb = KEEP_MB_DEFAULT;
	c->keep = (size_t)mb << 20;
}

/*
 * A block of size bytes from a segment in use or the first, else from the
 * smallest empty one kept that it fits in: a large one kept stays whole for
 * the op it was made for, rather than take small blocks that would pin it.
 */
static void *take(comm_t *c, size_t size)
{
	struct seg *best = NULL;
	void *p;

	for (struct seg *s = c->segs; s; s = s->next) {
		if (s->next && seg_empty(s)) {
			if (s->size >= size && (!best || s->size < best->size))
				best = s;
		} else if ((p = seg_take(s, size))) {
			return p;
		}
	}
	return best ? seg_take(best, size) : NULL;
}

static void borrows_purge(comm_t *c);

COMM_API void *comm_mem_alloc(comm_t *c, size_t bytes)
{
	struct seg *s;
	size_t size;
	void *p;

	if (!c)
		return NULL;
	if (c->broken != COMM_OK) {
		comm_refuse(c, "mem alloc");
		return NULL;
	}
	if (bytes == 0 || bytes > ((size_t)1 << 46)) {
		comm_set_error(c, COMM_ERR_INVALID_ARG, "mem alloc: %zu bytes", bytes);
		return NULL;
	}
	size = round_up(bytes, SEG_ALIGN);
	if ((p = take(c, size)))
		return p;
	/* the empty ones kept are too small for it: given back first (the job's quota) */
	trim_idle(c);
	if (c->borrows) /* and the registrations of others' segments that went */
		borrows_purge(c);
	s = seg_new(c, size > SEG_MIN_BYTES ? round_up(size, 2u << 20) : SEG_MIN_BYTES);
	if (!s)
		return NULL;
	p = seg_take(s, size);
	if (!p)
		comm_set_error(c, COMM_ERR_NO_MEMORY, "mem alloc: out of memory");
	return p;
}

void *comm_mem_alloc_rc(comm_t *c, size_t bytes, comm_result_t *rc)
{
	void *p;

	c->last_rc = COMM_OK;
	p = comm_mem_alloc(c, bytes);
	*rc = p ? COMM_OK : c->last_rc != COMM_OK ? c->last_rc : COMM_ERR_NO_MEMORY;
	return p;
}

COMM_API comm_result_t comm_mem_free(comm_t *c, void *ptr)
{
	struct seg **sp;

	if (!c)
		return COMM_ERR_INVALID_ARG;
	if (!ptr)
		return COMM_OK;
	for (sp = &c->segs; *sp; sp = &(*sp)->next) {
		struct seg *s = *sp;
		struct block *b, *prev = NULL;

		if ((uint8_t *)ptr < s->base || (uint8_t *)ptr >= s->base + s->size)
			continue;
		for (b = s->blocks; b; prev = b, b = b->next)
			if (s->base + b->off == ptr && b->used)
				break;
		if (!b)
			break;
		b->used = 0;
		if (b->next && !b->next->used) {
			struct block *n = b->next;

			b->size += n->size;
			b->next = n->next;
			free(n);
		}
		if (prev && !prev->used) {
			prev->size += b->size;
			prev->next = b->next;
			free(b);
		}
		/* the first segment is kept; others once empty while they fit in keep */
		if (s->next && seg_empty(s) && idle_bytes(c) > c->keep)
			seg_free(c, sp, 1);
		return COMM_OK;
	}
	return comm_set_error(c, COMM_ERR_INVALID_ARG,
			      "mem free: %p was not returned by comm_mem_alloc", ptr);
}

/* Whether [p, p + len) lies in s; len 0: whether p does. */
static int in_seg(const struct seg *s, const void *p, size_t len)
{
	const uint8_t *q = p;

	return q >= s->base && q < s->base + s->size && len <= s->size - (size_t)(q - s->base);
}

/* The family's segment other than c's own holding p (len bytes), or NULL; under the lock. */
static const struct seg *family_seg(const comm_t *c, const void *p, size_t len)
{
	for (const struct comm *m = c->fam->members; m; m = m->fam_next)
		for (const struct seg *s = m != c ? m->segs : NULL; s; s = s->next)
			if (in_seg(s, p, len))
				return s;
	return NULL;
}

/* Whether segment uid still lives in the family; under the lock. */
static int family_has(const comm_t *c, uint64_t uid)
{
	for (const struct comm *m = c->fam->members; m; m = m->fam_next)
		for (const struct seg *s = m->segs; s; s = s->next)
			if (s->uid == uid)
				return 1;
	return 0;
}

/* Forget the borrows whose segment went since the last look. */
static void borrows_purge(comm_t *c)
{
	struct borrow *gone = NULL;
	uint64_t gen = __atomic_load_n(&c->fam->gen, __ATOMIC_RELAXED);

	if (gen == c->fam_gen)
		return;
	pthread_mutex_lock(&c->fam->lock);
	c->fam_gen = c->fam->gen;
	for (struct borrow **bp = &c->borrows; *bp;) {
		struct borrow *b = *bp;

		if (!b->refused && family_has(c, b->uid)) {
			bp = &b->next;
			continue;
		}
		*bp = b->next;
		b->next = gone;
		gone = b;
	}
	pthread_mutex_unlock(&c->fam->lock);
	while (gone) {
		struct borrow *b = gone;

		gone = b->next;
		if (!b->refused)
			mem_forget(c, b->mem_id);
		free(b);
	}
}

/*
 * p in another family member's segment: named by c's own registration of
 * it, made now if it is the first time (1). 0 when p is in none; -2 when
 * it starts in one but runs past its end; -1 when
 * the registration failed (the daemon's quota, no fd left): the op then
 * stages it. A refusal is kept, so that the next ops stage at once, until
 * a segment of the family goes (memory freed: it is asked again); the op
 * goes on, so it leaves comm_last_error as it was.
 */
static int borrow_lookup(comm_t *c, const void *p, size_t len, uint64_t *mem_id, uint64_t *off)
{
	struct borrow *b = NULL;
	const struct seg *s;
	struct borrow nb = { 0 };
	int fd = -1, past = 0;

	pthread_mutex_lock(&c->fam->lock);
	if (!(s = family_seg(c, p, len))) {
		past = family_seg(c, p, 0) != NULL;
	} else {
		nb.uid = s->uid;
		nb.base = s->base;
		nb.size = s->size;
		for (b = c->borrows; b && b->uid != nb.uid; b = b->next)
			;
		if (!b)
			fd = fcntl(s->fd, F_DUPFD_CLOEXEC, 0);
	}
	pthread_mutex_unlock(&c->fam->lock);
	if (!s)
		return past ? -2 : 0;
	if (!b) {
		/*
		 * Should its owner free it meanwhile (under this op's buffer: the
		 * caller's error), the borrow goes at the next purge.
		 */
		char was[sizeof c->last_error];

		if (fd < 0 || !(b = malloc(sizeof *b))) {
			if (fd >= 0)
				close(fd);
			return -1;
		}
		memcpy(was, c->last_error, sizeof was);
		if (mem_register(c, fd, nb.size, &nb.mem_id) < 0) {
			nb.refused = 1;
			if (c->broken == COMM_OK)
				memcpy(c->last_error, was, sizeof was);
		}
		close(fd);
		*b = nb;
		b->next = c->borrows;
		c->borrows = b;
	}
	if (b->refused)
		return -1;
	*mem_id = b->mem_id;
	*off = (uint64_t)((const uint8_t *)p - b->base);
	return 1;
}

int mem_lookup(comm_t *c, const void *p, size_t len, uint64_t *mem_id, uint64_t *off)
{
	if (c->borrows)
		borrows_purge(c);
	for (struct seg *s = c->segs; s; s = s->next) {
		if (in_seg(s, p, len)) {
			*mem_id = s->mem_id;
			*off = (uint64_t)((const uint8_t *)p - s->base);
			return 1;
		}
		if (in_seg(s, p, 0))
			return -2;
	}
	return c->fam ? borrow_lookup(c, p, len, mem_id, off) : 0;
}

void mem_free_all(comm_t *c)
{
	while (c->segs)
		seg_free(c, &c->segs, 0);
	while (c->borrows) {
		struct borrow *b = c->borrows;

		c->borrows = b->next;
		free(b);
	}
}

int mem_family_start(comm_t *c)
{
	struct family *f;

	if (c->fam)
		return 0;
	if (!(f = calloc(1, sizeof *f)))
		return -1;
	pthread_mutex_init(&f->lock, NULL);
	f->members = c;
	c->fam = f;
	return 0;
}

void mem_family_join(comm_t *parent, comm_t *child)
{
	struct family *f = parent->fam;

	pthread_mutex_lock(&f->lock);
	child->fam = f;
	child->fam_gen = f->gen;
	child->fam_next = f->members;
	f->members = child;
	pthread_mutex_unlock(&f->lock);
}

void mem_family_leave(comm_t *c)
{
	struct family *f = c->fam;
	int last;

	if (!f)
		return;
	pthread_mutex_lock(&f->lock);
	for (struct comm **mp = &f->members; *mp; mp = &(*mp)->fam_next) {
		if (*mp == c) {
			*mp = c->fam_next;
			break;
		}
	}
	__atomic_add_fetch(&f->gen, 1, __ATOMIC_RELAXED); /* its segments are gone for the others */
	last = !f->members;
	pthread_mutex_unlock(&f->lock);
	c->fam = NULL;
	if (last) {
		pthread_mutex_destroy(&f->lock);
		free(f);
	}
}
