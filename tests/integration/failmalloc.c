/*
 * failmalloc.c: an LD_PRELOAD shim for test-malloc. Armed through a shared
 * control file ($COMMD_FAILMALLOC), it makes the k-th allocation of one
 * process's main thread from now return NULL (ENOMEM), once.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "failmalloc.h"

/* glibc's own allocator, under the names it exports for shims like this one. */
extern void *__libc_malloc(size_t size);
extern void *__libc_calloc(size_t n, size_t size);
extern void *__libc_realloc(void *p, size_t size);
extern void *__libc_memalign(size_t align, size_t size);

static struct failmalloc *ctl;

__attribute__((constructor)) static void failmalloc_init(void)
{
	const char *path = getenv("COMMD_FAILMALLOC");
	void *p;
	int fd;

	if (!path || (fd = open(path, O_RDWR | O_CLOEXEC)) < 0)
		return;
	p = mmap(NULL, sizeof *ctl, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	close(fd);
	if (p != MAP_FAILED)
		ctl = p;
}

/* Whether this allocation is the one to fail: armed, our process, its main thread. */
static int should_fail(void)
{
	int left;

	if (!ctl || __atomic_load_n(&ctl->countdown, __ATOMIC_ACQUIRE) <= 0)
		return 0;
	if (getpid() != ctl->pid || syscall(SYS_gettid) != ctl->pid)
		return 0;
	left = __atomic_load_n(&ctl->countdown, __ATOMIC_ACQUIRE);
	while (left > 0) {
		if (__atomic_compare_exchange_n(&ctl->countdown, &left, left - 1, 0,
						__ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
			if (left > 1)
				return 0;
			__atomic_add_fetch(&ctl->failed, 1, __ATOMIC_RELEASE);
			errno = ENOMEM;
			return 1;
		}
	}
	return 0;
}

void *malloc(size_t size)
{
	return should_fail() ? NULL : __libc_malloc(size);
}

void *calloc(size_t n, size_t size)
{
	return should_fail() ? NULL : __libc_calloc(n, size);
}

void *realloc(void *p, size_t size)
{
	return should_fail() ? NULL : __libc_realloc(p, size);
}

void *aligned_alloc(size_t align, size_t size)
{
	return should_fail() ? NULL : __libc_memalign(align, size);
}

int posix_memalign(void **out, size_t align, size_t size)
{
	void *p;

	if (align < sizeof(void *) || (align & (align - 1)))
		return EINVAL;
	if (should_fail())
		return ENOMEM;
	p = __libc_memalign(align, size);
	if (!p)
		return ENOMEM;
	*out = p;
	return 0;
}
