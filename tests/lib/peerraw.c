/*
 * peerraw.c: a test playing a daemon on the peer protocol (see peerraw.h).
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "check.h"
#include "peerraw.h"

static long now_ms(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

int pr_connect(const char *addr)
{
	struct sockaddr_in sa = { .sin_family = AF_INET };
	const char *colon = strrchr(addr, ':');
	int fd;

	if (!colon)
		return -1;
	sa.sin_port = htons((uint16_t)atoi(colon + 1));
	sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	if ((fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0)) < 0)
		return -1;
	if (connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
		close(fd);
		return -1;
	}
	return fd;
}

int pr_send_raw(int fd, const void *b, size_t len)
{
	size_t off = 0;

	while (off < len) {
		ssize_t n = send(fd, (const uint8_t *)b + off, len - off, MSG_NOSIGNAL);

		if (n <= 0)
			return -1;
		off += (size_t)n;
	}
	return 0;
}

int pr_send(int fd, const Commpb__PeerMsg *m)
{
	size_t len = commpb__peer_msg__get_packed_size(m);
	uint8_t *f = malloc(len + 4);
	int rc;

	REQUIRE(f, "malloc");
	f[0] = (uint8_t)len;
	f[1] = (uint8_t)(len >> 8);
	f[2] = (uint8_t)(len >> 16);
	f[3] = (uint8_t)(len >> 24);
	commpb__peer_msg__pack(m, f + 4);
	rc = pr_send_raw(fd, f, len + 4);
	free(f);
	return rc;
}

int pr_hello(int fd, uint32_t version, const char *node, const uint8_t *ucx, size_t ucx_len)
{
	Commpb__PeerMsg out = COMMPB__PEER_MSG__INIT;
	Commpb__PeerHello h = COMMPB__PEER_HELLO__INIT;

	h.version = version;
	h.node = (char *)node;
	h.ucx_address.data = (uint8_t *)ucx;
	h.ucx_address.len = ucx_len;
	out.body_case = COMMPB__PEER_MSG__BODY_HELLO;
	out.hello = &h;
	return pr_send(fd, &out);
}

static int read_full(int fd, uint8_t *b, size_t len)
{
	size_t off = 0;

	while (off < len) {
		ssize_t n = read(fd, b + off, len - off);

		if (n <= 0)
			return -1;
		off += (size_t)n;
	}
	return 0;
}

void pr_ping(int fd, uint64_t v)
{
	Commpb__PeerMsg m = COMMPB__PEER_MSG__INIT;
	Commpb__PeerPing ping = COMMPB__PEER_PING__INIT;

	ping.sent_us = v;
	m.body_case = COMMPB__PEER_MSG__BODY_PING;
	m.ping = &ping;
	pr_send(fd, &m);
}

Commpb__PeerMsg *pr_read(int fd)
{
	uint8_t h[4], *b;
	size_t len;
	Commpb__PeerMsg *m;

	if (read_full(fd, h, 4) < 0)
		return NULL;
	len = h[0] | (size_t)h[1] << 8 | (size_t)h[2] << 16 | (size_t)h[3] << 24;
	REQUIRE(len < (1u << 20) && (b = malloc(len + 1)), "peer frame of %zu bytes", len);
	if (read_full(fd, b, len) < 0) {
		free(b);
		return NULL;
	}
	m = commpb__peer_msg__unpack(NULL, len, b);
	free(b);
	REQUIRE(m, "a peer frame that does not unpack");
	return m;
}

Commpb__PeerMsg *pr_next(const int *fds, int n, int *from, int ms)
{
	static long pinged;
	long t0 = now_ms();

	while (now_ms() - t0 < ms) {
		struct pollfd pf[8];
		int got = 0;

		REQUIRE(n <= 8, "pr_next: %d fds", n);
		for (int i = 0; i < n; i++)
			pf[i] = (struct pollfd){ .fd = fds[i], .events = POLLIN };
		if (now_ms() - pinged >= 500) {
			for (int i = 0; i < n; i++)
				pr_ping(fds[i], 1);
			pinged = now_ms();
		}
		if (poll(pf, (nfds_t)n, 300) <= 0)
			continue;
		for (int i = 0; i < n && !got; i++) {
			Commpb__PeerMsg *m;

			if (!(pf[i].revents & (POLLIN | POLLHUP | POLLERR)))
				continue;
			got = 1;
			if (!(m = pr_read(fds[i])))
				return NULL;
			if (m->body_case == COMMPB__PEER_MSG__BODY_PING) {
				Commpb__PeerMsg out = COMMPB__PEER_MSG__INIT;
				Commpb__PeerPong pong = COMMPB__PEER_PONG__INIT;

				pong.sent_us = m->ping->sent_us;
				out.body_case = COMMPB__PEER_MSG__BODY_PONG;
				out.pong = &pong;
				pr_send(fds[i], &out);
			} else if (m->body_case != COMMPB__PEER_MSG__BODY_PONG || m->pong->sent_us != 1) {
				*from = i;
				return m;
			}
			commpb__peer_msg__free_unpacked(m, NULL);
		}
	}
	return NULL;
}

int pr_sync(int fd)
{
	pr_ping(fd, 4805);
	for (;;) {
		int i, got;
		Commpb__PeerMsg *in = pr_next(&fd, 1, &i, 10000);

		if (!in)
			return -1;
		got = in->body_case == COMMPB__PEER_MSG__BODY_PONG && in->pong->sent_us == 4805;
		commpb__peer_msg__free_unpacked(in, NULL);
		if (got)
			return 0;
	}
}

int pr_closed_within(int fd, int ms)
{
	long t0 = now_ms();
	uint8_t b[4096];

	while (now_ms() - t0 < ms) {
		struct pollfd pf = { .fd = fd, .events = POLLIN };
		ssize_t n;

		if (poll(&pf, 1, 100) != 1)
			continue;
		if ((n = read(fd, b, sizeof b)) <= 0)
			return 1;
	}
	return 0;
}
