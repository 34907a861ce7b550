/*
 * fake-libcuda.c: a stand-in for the CUDA driver library, for test-client.
 * Put in a rank's library path as libcuda.so.1, it is what the CUDA runtime
 * would load at the process's first CUDA call. It has no driver functions,
 * so the runtime gives up on it; its loading appends the loader's pid to
 * the file $FAKE_LIBCUDA_MARK, so the test sees whether anything asked.
 */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

__attribute__((constructor)) static void fake_libcuda_loaded(void)
{
	const char *mark = getenv("FAKE_LIBCUDA_MARK");
	char line[32];
	int fd, n;

	if (!mark || !*mark)
		return;
	fd = open(mark, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
	if (fd < 0)
		return;
	n = snprintf(line, sizeof line, "%ld\n", (long)getpid());
	if (write(fd, line, (size_t)n) != n)
		perror("fake-libcuda: write");
	close(fd);
}
