/* frame.c: length-prefixed frames and SCM_RIGHTS fd passing. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "frame.h"

void frame_reader_init(struct frame_reader *r)
{
	memset(r, 0, sizeof *r);
	r->max_len = FRAME_MAX;
	r->max_fds = FRAME_MAX_FDS;
}

void frame_reader_free(struct frame_reader *r)
{
	for (int i = 0; i < r->nfds; i++)
		if (r->fds[i] >= 0)
			close(r->fds[i]);
	free(r->buf);
	frame_reader_init(r);
}

static int reserve(struct frame_reader *r, size_t extra)
{
	size_t cap = r->cap ? r->cap : 4096;
	uint8_t *p;

	if (r->len + extra <= r->cap)
		return 0;
	while (cap < r->len + extra)
		cap *= 2;
	p = realloc(r->buf, cap);
	if (!p)
		return -ENOMEM;
	r->buf = p;
	r->cap = cap;
	return 0;
}

int frame_reader_feed(struct frame_reader *r, const void *data, size_t len)
{
	if (reserve(r, len) < 0)
		return -ENOMEM;
	memcpy(r->buf + r->len, data, len);
	r->len += len;
	return 0;
}

/*
 * Queue the fds of one recvmsg. Past max_fds or the queue, close them all:
 * -EPROTO. Truncated below our buffer's room, the kernel could not give us
 * all that came (we are out of fds): close what did come and queue one
 * FRAME_FD_LOST in their place.
 */
static int queue_fds(struct frame_reader *r, struct msghdr *msg)
{
	int nfds0 = r->nfds, got = 0, lost;

	for (struct cmsghdr *c = CMSG_FIRSTHDR(msg); c; c = CMSG_NXTHDR(msg, c)) {
		int n, *fds;

		if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
			continue;
		n = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
		fds = (int *)CMSG_DATA(c);
		for (int i = 0; i < n; i++, got++) {
			if (r->nfds < FRAME_FDS_CAP)
				r->fds[r->nfds++] = fds[i];
			else
				close(fds[i]);
		}
	}
	lost = (msg->msg_flags & MSG_CTRUNC) && got < FRAME_FDS_CAP;
	if (!(msg->msg_flags & MSG_CTRUNC) && got <= r->max_fds && nfds0 + got <= FRAME_FDS_CAP)
		return 0;
	while (r->nfds > nfds0)
		close(r->fds[--r->nfds]);
	if (!lost || r->nfds == FRAME_FDS_CAP)
		return -EPROTO;
	r->fds[r->nfds++] = FRAME_FD_LOST;
	return 0;
}

long frame_reader_recv(struct frame_reader *r, int sock)
{
	union {
		struct cmsghdr align;
		char buf[CMSG_SPACE(FRAME_FDS_CAP * sizeof(int))];
	} ctl;
	struct msghdr msg = { 0 };
	struct iovec iov;
	ssize_t n;
	int rc;

	if (reserve(r, 16384) < 0)
		return -ENOMEM;
	iov.iov_base = r->buf + r->len;
	iov.iov_len = r->cap - r->len;
	msg.msg_iov = &iov;
	msg.msg_iovlen = 1;
	msg.msg_control = ctl.buf;
	msg.msg_controllen = sizeof ctl.buf;
	do
		n = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
	while (n < 0 && errno == EINTR);
	if (n < 0)
		return -errno;
	r->len += (size_t)n;
	rc = queue_fds(r, &msg);
	return rc < 0 ? rc : n;
}

enum frame_status frame_next(const struct frame_reader *r, const uint8_t **payload, size_t *len)
{
	uint32_t n;

	if (r->len < FRAME_HDR)
		return FRAME_MORE;
	n = (uint32_t)r->buf[0] | (uint32_t)r->buf[1] << 8 | (uint32_t)r->buf[2] << 16 |
	    (uint32_t)r->buf[3] << 24;
	if (n > r->max_len)
		return FRAME_TOO_BIG;
	if (r->len - FRAME_HDR < n)
		return FRAME_MORE;
	*payload = r->buf + FRAME_HDR;
	*len = n;
	return FRAME_OK;
}

void frame_consume(struct frame_reader *r, size_t len)
{
	size_t n = FRAME_HDR + len;

	memmove(r->buf, r->buf + n, r->len - n);
	r->len -= n;
}

int frame_take_fd(struct frame_reader *r)
{
	int fd;

	if (r->nfds == 0)
		return -1;
	fd = r->fds[0];
	memmove(r->fds, r->fds + 1, (size_t)(r->nfds - 1) * sizeof(int));
	r->nfds--;
	return fd;
}

size_t frame_pack(const Commpb__Envelope *env, uint8_t **out)
{
	size_t n = commpb__envelope__get_packed_size(env);
	uint8_t *p;

	*out = NULL;
	if (n > FRAME_MAX)
		return 0;
	p = malloc(FRAME_HDR + n);
	if (!p)
		return 0;
	p[0] = (uint8_t)n;
	p[1] = (uint8_t)(n >> 8);
	p[2] = (uint8_t)(n >> 16);
	p[3] = (uint8_t)(n >> 24);
	commpb__envelope__pack(env, p + FRAME_HDR);
	*out = p;
	return FRAME_HDR + n;
}

int frame_send_some(int sock, const uint8_t *frame, size_t len, size_t *off, const int *fds,
		    int nfds)
{
	union {
		struct cmsghdr align;
		char buf[CMSG_SPACE(FRAME_MAX_FDS * sizeof(int))];
	} ctl;

	while (*off < len) {
		struct msghdr msg = { 0 };
		struct iovec iov = { (void *)(frame + *off), len - *off };
		ssize_t n;

		msg.msg_iov = &iov;
		msg.msg_iovlen = 1;
		if (*off == 0 && nfds > 0) {
			struct cmsghdr *c;

			if (nfds > FRAME_MAX_FDS)
				return -EINVAL;
			memset(&ctl, 0, sizeof ctl);
			msg.msg_control = ctl.buf;
			msg.msg_controllen = CMSG_SPACE((size_t)nfds * sizeof(int));
			c = CMSG_FIRSTHDR(&msg);
			c->cmsg_level = SOL_SOCKET;
			c->cmsg_type = SCM_RIGHTS;
			c->cmsg_len = CMSG_LEN((size_t)nfds * sizeof(int));
			memcpy(CMSG_DATA(c), fds, (size_t)nfds * sizeof(int));
		}
		n = sendmsg(sock, &msg, MSG_NOSIGNAL);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN || errno == EWOULDBLOCK)
				return 0;
			return -errno;
		}
		*off += (size_t)n;
	}
	return 1;
}

int frame_send_all(int sock, const uint8_t *frame, size_t len, const int *fds, int nfds)
{
	size_t off = 0;
	int rc = frame_send_some(sock, frame, len, &off, fds, nfds);

	/* A blocking socket only returns 0 here if it was made non-blocking. */
	return rc == 1 ? 0 : rc == 0 ? -EAGAIN : rc;
}
