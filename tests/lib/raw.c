/* raw.c: a hand-made protocol client for the tests (see raw.h). */
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "check.h"
#include "comm.h"
#include "raw.h"
#include "ring.h"

int raw_connect(const char *sock)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);

	REQUIRE(fd >= 0 && strlen(sock) < sizeof sa.sun_path, "socket");
	strcpy(sa.sun_path, sock);
	REQUIRE(connect(fd, (struct sockaddr *)&sa, sizeof sa) == 0, "connect %s", sock);
	return fd;
}

void raw_send(int fd, Commpb__Envelope *env, const int *fds, int nfds)
{
	uint8_t *f;
	size_t len = frame_pack(env, &f);

	REQUIRE(len > 0, "pack");
	CHECK(frame_send_all(fd, f, len, fds, nfds) == 0, "send");
	free(f);
}

Commpb__Envelope *raw_recv(int fd, struct frame_reader *r)
{
	const uint8_t *p;
	size_t len;
	Commpb__Envelope *env;

	while (frame_next(r, &p, &len) != FRAME_OK) {
		struct pollfd pfd = { .fd = fd, .events = POLLIN };

		if (poll(&pfd, 1, 5000) <= 0 || frame_reader_recv(r, fd) <= 0)
			return NULL;
	}
	env = commpb__envelope__unpack(NULL, len, p);
	frame_consume(r, len);
	return env;
}

int raw_closed_by_daemon(int fd)
{
	struct pollfd pfd = { .fd = fd, .events = POLLIN };
	char buf[4096];

	while (poll(&pfd, 1, 5000) > 0) {
		ssize_t n = read(fd, buf, sizeof buf);

		if (n <= 0)
			return 1;
	}
	return 0;
}

void raw_hello(int fd, struct frame_reader *r, const char *job, uint32_t vmin, uint32_t vmax,
	       int want)
{
	Commpb__Envelope env = COMMPB__ENVELOPE__INIT, *reply;
	Commpb__Hello h = COMMPB__HELLO__INIT;

	h.version_min = vmin;
	h.version_max = vmax;
	h.job = (char *)job;
	h.rank = 0;
	h.world_size = 1;
	env.body_case = COMMPB__ENVELOPE__BODY_HELLO;
	env.hello = &h;
	raw_send(fd, &env, NULL, 0);
	reply = raw_recv(fd, r);
	REQUIRE(reply && reply->body_case == COMMPB__ENVELOPE__BODY_HELLO_REPLY, "hello reply");
	CHECK(reply->hello_reply->status == want, "hello: status %d (%s), want %d",
	      reply->hello_reply->status, reply->hello_reply->detail, want);
	if (want == COMM_ERR_VERSION)
		CHECK(reply->hello_reply->version_min == PROTO_VERSION_MIN &&
			      reply->hello_reply->version_max == PROTO_VERSION &&
			      strstr(reply->hello_reply->detail, "speaks"),
		      "version error without the supported range: %s", reply->hello_reply->detail);
	commpb__envelope__free_unpacked(reply, NULL);
}

int raw_memfd(size_t size)
{
	int fd = memfd_create("raw", MFD_CLOEXEC | MFD_ALLOW_SEALING);

	REQUIRE(fd >= 0 && ftruncate(fd, (off_t)size) == 0 &&
			fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK) == 0,
		"a sealed memfd of %zu bytes", size);
	return fd;
}

int raw_hello_admin(int fd, struct frame_reader *r)
{
	Commpb__Envelope env = COMMPB__ENVELOPE__INIT, *reply;
	Commpb__Hello h = COMMPB__HELLO__INIT;
	int status = -1;

	h.version_min = PROTO_VERSION_MIN;
	h.version_max = PROTO_VERSION;
	h.role = COMMPB__ROLE__ROLE_ADMIN;
	env.body_case = COMMPB__ENVELOPE__BODY_HELLO;
	env.hello = &h;
	raw_send(fd, &env, NULL, 0);
	reply = raw_recv(fd, r);
	if (reply && reply->body_case == COMMPB__ENVELOPE__BODY_HELLO_REPLY)
		status = reply->hello_reply->status;
	if (reply)
		commpb__envelope__free_unpacked(reply, NULL);
	return status;
}

int raw_register_fd(int sock, struct frame_reader *r, int mfd, uint64_t size, uint64_t *mem_id)
{
	Commpb__Envelope env = COMMPB__ENVELOPE__INIT, *reply;
	Commpb__RegisterMem reg = COMMPB__REGISTER_MEM__INIT;
	int status;

	reg.size = size;
	env.body_case = COMMPB__ENVELOPE__BODY_REGISTER_MEM;
	env.register_mem = &reg;
	raw_send(sock, &env, &mfd, 1);
	reply = raw_recv(sock, r);
	REQUIRE(reply && reply->body_case == COMMPB__ENVELOPE__BODY_REGISTER_MEM_REPLY,
		"register reply");
	status = reply->register_mem_reply->status;
	if (mem_id)
		*mem_id = reply->register_mem_reply->mem_id;
	commpb__envelope__free_unpacked(reply, NULL);
	return status;
}

int raw_error(int fd, int ms, char *detail, size_t len)
{
	struct pollfd p = { .fd = fd, .events = POLLIN };
	struct frame_reader r;
	Commpb__Envelope *env;
	int status = -1;

	detail[0] = '\0';
	if (ms >= 0 && poll(&p, 1, ms) <= 0)
		return -1;
	frame_reader_init(&r);
	env = raw_recv(fd, &r);
	if (env && env->body_case == COMMPB__ENVELOPE__BODY_ERROR) {
		status = env->error->status;
		snprintf(detail, len, "%s", env->error->detail);
	}
	if (env)
		commpb__envelope__free_unpacked(env, NULL);
	frame_reader_free(&r);
	return status;
}

int raw_hello_rank(int fd, struct frame_reader *r, const char *job, const char *token, int rank,
		   int world, char *detail, size_t len)
{
	Commpb__Envelope env = COMMPB__ENVELOPE__INIT, *reply;
	Commpb__Hello h = COMMPB__HELLO__INIT;
	int st = -1;

	h.version_min = PROTO_VERSION_MIN;
	h.version_max = PROTO_VERSION;
	h.job = (char *)job;
	h.token.data = (uint8_t *)token;
	h.token.len = strlen(token);
	h.rank = rank;
	h.world_size = world;
	env.body_case = COMMPB__ENVELOPE__BODY_HELLO;
	env.hello = &h;
	raw_send(fd, &env, NULL, 0);
	reply = raw_recv(fd, r);
	if (detail)
		detail[0] = '\0';
	if (reply && reply->body_case == COMMPB__ENVELOPE__BODY_HELLO_REPLY) {
		st = reply->hello_reply->status;
		if (detail)
			snprintf(detail, len, "%s", reply->hello_reply->detail);
	}
	if (reply)
		commpb__envelope__free_unpacked(reply, NULL);
	return st;
}

int raw_ring_attach(int sock, struct frame_reader *r, uint64_t mem_id, uint64_t off,
		    uint32_t slots, int efd, char *detail, size_t len)
{
	Commpb__Envelope env = COMMPB__ENVELOPE__INIT, *reply;
	Commpb__RingAttach ra = COMMPB__RING_ATTACH__INIT;
	Commpb__BufRef ref = COMMPB__BUF_REF__INIT;
	int status = -1;

	ref.mem_id = mem_id;
	ref.offset = off;
	ra.ring = &ref;
	ra.slots = slots;
	ra.slot_size = sizeof(struct ring_slot);
	env.id = 42;
	env.body_case = COMMPB__ENVELOPE__BODY_RING_ATTACH;
	env.ring_attach = &ra;
	raw_send(sock, &env, &efd, 1);
	reply = raw_recv(sock, r);
	snprintf(detail, len, "no reply");
	if (reply && reply->body_case == COMMPB__ENVELOPE__BODY_RING_ATTACH_REPLY) {
		status = reply->ring_attach_reply->status;
		snprintf(detail, len, "%s", reply->ring_attach_reply->detail);
		CHECK(reply->id == 42, "ring attach reply: id %llu, want 42",
		      (unsigned long long)reply->id);
	} else if (reply) {
		snprintf(detail, len, "message type %d", (int)reply->body_case);
	}
	if (reply)
		commpb__envelope__free_unpacked(reply, NULL);
	return status;
}
