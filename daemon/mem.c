/*
 * mem.c: memory the ranks register, named by an id private to the
 * connection: sealed memfds mapped once and unmapped after the last op on
 * them, and device memory, which the job's GPU worker holds (gpu-ops.c).
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "commd.h"
#include "log.h"

/* Host memory registrations uid's connections hold (each one of commd's mappings). */
static uint32_t uid_maps(uid_t uid)
{
	const struct conn *c;
	uint32_t n = 0;

	TAILQ_FOREACH(c, &srv.conns, link)
		if (c->uid == uid)
			n += (uint32_t)c->nmaps;
	return n;
}

comm_result_t mem_register(struct conn *c, int fd, uint64_t size, struct mem **out, char *err,
			   size_t errlen)
{
	comm_result_t rc = COMM_ERR_INVALID_ARG;
	struct mem *m = NULL;
	struct stat st;
	uint64_t maplen;
	void *addr;
	int seals, fl;

	*out = NULL;
	if (c->nmems >= MEM_MAX_PER_CONN) {
		rc = COMM_ERR_NO_MEMORY;
		snprintf(err, errlen, "mem register: already %d registrations on this connection",
			 c->nmems);
		goto out;
	}
	if (uid_maps(c->uid) >= srv.lim.maps_per_uid) {
		rc = COMM_ERR_NO_MEMORY;
		snprintf(err, errlen, "mem register: uid %d holds %u registrations of host memory "
			 "already (max-registrations-per-uid)", (int)c->uid, srv.lim.maps_per_uid);
		goto out;
	}
	seals = fcntl(fd, F_GET_SEALS);
	if (seals < 0) {
		snprintf(err, errlen, "mem register: fd is not a memfd (%s)", strerror(errno));
		goto out;
	}
	if (!(seals & F_SEAL_SHRINK)) {
		snprintf(err, errlen, "mem register: memfd is not sealed against shrinking");
		goto out;
	}
	if (seals & (F_SEAL_WRITE | F_SEAL_FUTURE_WRITE)) {
		snprintf(err, errlen, "mem register: memfd is sealed against writing");
		goto out;
	}
	fl = fcntl(fd, F_GETFL);
	if (fl < 0 || (fl & O_ACCMODE) != O_RDWR) {
		snprintf(err, errlen, "mem register: memfd is not open for reading and writing");
		goto out;
	}
	if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode) || st.st_blksize <= 0) {
		snprintf(err, errlen, "mem register: fd is not a regular memfd");
		goto out;
	}
	if (size == 0 || size > (uint64_t)st.st_size) {
		snprintf(err, errlen, "mem register: size %llu, but the memfd holds %lld bytes",
			 (unsigned long long)size, (long long)st.st_size);
		goto out;
	}
	if (c->job->mem_bytes + size > srv.lim.job_mem) {
		rc = COMM_ERR_NO_MEMORY;
		snprintf(err, errlen,
			 "mem register: job %s would hold %llu bytes, over %llu (max-job-memory)",
			 c->job->name, (unsigned long long)(c->job->mem_bytes + size),
			 (unsigned long long)srv.lim.job_mem);
		goto out;
	}
	m = calloc(1, sizeof *m);
	if (!m) {
		rc = COMM_ERR_NO_MEMORY;
		snprintf(err, errlen, "mem register: out of memory");
		goto out;
	}
	/*
	 * Whole pages of the file's: a hugetlb memfd is mapped, and must be
	 * unmapped, in huge pages (munmap of less fails, and the mapping stays).
	 */
	maplen = (size + (uint64_t)st.st_blksize - 1) / (uint64_t)st.st_blksize *
		 (uint64_t)st.st_blksize;
	addr = mmap(NULL, maplen, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (addr == MAP_FAILED) {
		rc = COMM_ERR_NO_MEMORY;
		snprintf(err, errlen, "mem register: mmap of %llu bytes: %s",
			 (unsigned long long)size, strerror(errno));
		free(m);
		m = NULL;
		goto out;
	}
	m->id = c->next_mem_id++;
	m->addr = addr;
	m->size = size;
	m->map_len = maplen;
	m->refs = 1;
	m->job = c->job;
	m->conn = c;
	*job_charge(c->job, m) += size;
	TAILQ_INSERT_TAIL(&c->mems, m, link);
	c->nmems++;
	c->nmaps++;
	*out = m;
	rc = COMM_OK;
out:
	close(fd);
	return rc;
}

struct mem *mem_find(struct conn *c, uint64_t id)
{
	struct mem *m;

	TAILQ_FOREACH(m, &c->mems, link)
		if (m->id == id && !m->freed)
			return m->kind == COMMPB__MEM_KIND__MEM_MEMFD || m->opened ? m : NULL;
	return NULL;
}

void mem_ref(struct mem *m)
{
	m->refs++;
}

/* Out of its connection's table, and no longer charged to its job. */
static void unlist(struct mem *m)
{
	TAILQ_REMOVE(&m->conn->mems, m, link);
	m->conn->nmems--;
	if (m->kind == COMMPB__MEM_KIND__MEM_MEMFD)
		m->conn->nmaps--;
	if (m->job)
		*job_charge(m->job, m) -= m->size;
	m->job = NULL;
	m->conn = NULL;
}

void mem_unref(struct mem *m)
{
	if (--m->refs > 0)
		return;
	if (m->kind != COMMPB__MEM_KIND__MEM_MEMFD) {
		gpu_mem_gone(m);
		return;
	}
	if (m->conn) /* freed while ops used it: it leaves the table with the last of them */
		unlist(m);
	munmap(m->addr, m->map_len);
	free(m);
}

void mem_release(struct conn *c, struct mem *m)
{
	if (m->freed) {
		/* its owner's reference went with the FreeMem; the ops keep theirs */
		unlist(m);
		return;
	}
	if (m->refs > 1 && m->kind == COMMPB__MEM_KIND__MEM_MEMFD && !c->closing) {
		/*
		 * Ops still use it: mapped, charged to the job (max-job-memory)
		 * and in the table, out of mem_find's sight, until they end.
		 */
		m->freed = 1;
		m->refs--;
		return;
	}
	unlist(m);
	mem_unref(m);
}
