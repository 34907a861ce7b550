/* notify.c: READY=1 and friends to the service manager ($NOTIFY_SOCKET). */
#include <errno.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "commd.h"

/*
 * One socket for the daemon's life, opened by the first message (READY=1, at
 * start): at the fd limit the watchdog pings still go out.
 */
static int notify_fd = -1;

int notify_send(const char *msg)
{
	const char *path = getenv("NOTIFY_SOCKET");
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	size_t plen;
	socklen_t salen;

	if (!path || !*path)
		return 0;
	plen = strlen(path);
	if ((path[0] != '/' && path[0] != '@') || plen >= sizeof sa.sun_path)
		return -EINVAL;
	memcpy(sa.sun_path, path, plen);
	if (path[0] == '@')
		sa.sun_path[0] = '\0'; /* abstract namespace */
	salen = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + plen);
	if (notify_fd < 0 && (notify_fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0)) < 0)
		return -errno;
	/* never block the loop: a manager that stops reading misses the message */
	if (sendto(notify_fd, msg, strlen(msg), MSG_NOSIGNAL | MSG_DONTWAIT, (struct sockaddr *)&sa,
		   salen) < 0)
		return -errno;
	return 0;
}

uint32_t notify_watchdog_ms(void)
{
	const char *usec = getenv("WATCHDOG_USEC"), *pid = getenv("WATCHDOG_PID");
	unsigned long long v;
	char *end;

	if (!usec || !*usec || (pid && *pid && strtol(pid, NULL, 10) != (long)getpid()))
		return 0;
	errno = 0;
	v = strtoull(usec, &end, 10);
	if (errno || *end || v == 0)
		return 0;
	return v / 1000 > UINT32_MAX ? UINT32_MAX : v / 1000 ? (uint32_t)(v / 1000) : 1;
}
