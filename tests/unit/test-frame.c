/*
 * test-frame.c: framing: split reads, the size limit, pack and unpack, and
 * fds riding with a frame over a real socketpair.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "check.h"
#include "frame.h"

static size_t make_frame(uint8_t **out, uint64_t id, const char *job)
{
	Commpb__Envelope env = COMMPB__ENVELOPE__INIT;
	Commpb__Hello h = COMMPB__HELLO__INIT;

	h.job = (char *)job;
	h.rank = 3;
	h.world_size = 4;
	env.id = id;
	env.body_case = COMMPB__ENVELOPE__BODY_HELLO;
	env.hello = &h;
	return frame_pack(&env, out);
}

/* Feed three frames one byte at a time; each comes out whole, in order. */
static void test_split_reads(void)
{
	struct frame_reader r;
	uint8_t *f[3], all[4096];
	size_t len[3], total = 0, got = 0;

	frame_reader_init(&r);
	for (int i = 0; i < 3; i++) {
		len[i] = make_frame(&f[i], (uint64_t)i + 1, i == 1 ? "a-longer-job-name" : "j");
		REQUIRE(len[i] > 0, "pack");
		memcpy(all + total, f[i], len[i]);
		total += len[i];
		free(f[i]);
	}
	for (size_t off = 0; off < total; off++) {
		const uint8_t *payload;
		size_t plen;

		frame_reader_feed(&r, all + off, 1);
		while (frame_next(&r, &payload, &plen) == FRAME_OK) {
			Commpb__Envelope *env = commpb__envelope__unpack(NULL, plen, payload);

			REQUIRE(env, "unpack frame %zu", got);
			CHECK(env->id == got + 1, "frame %zu has id %llu", got,
			      (unsigned long long)env->id);
			CHECK(env->body_case == COMMPB__ENVELOPE__BODY_HELLO &&
				      env->hello->rank == 3,
			      "frame %zu body", got);
			CHECK(plen + FRAME_HDR == len[got], "frame %zu length %zu", got, plen);
			commpb__envelope__free_unpacked(env, NULL);
			frame_consume(&r, plen);
			got++;
		}
	}
	CHECK(got == 3, "got %zu frames", got);
	CHECK(r.len == 0, "%zu bytes left over", r.len);
	frame_reader_free(&r);
}

/* Length prefixes over the limit are refused from the header alone. */
static void test_limits(void)
{
	static const uint32_t lens[] = { FRAME_MAX + 1, 0x7fffffffu, 0xffffffffu };
	uint8_t big[FRAME_HDR + 8];

	for (size_t i = 0; i < sizeof lens / sizeof lens[0]; i++) {
		struct frame_reader r;
		const uint8_t *p;
		size_t n;
		uint8_t hdr[4] = { (uint8_t)lens[i], (uint8_t)(lens[i] >> 8),
				   (uint8_t)(lens[i] >> 16), (uint8_t)(lens[i] >> 24) };

		frame_reader_init(&r);
		frame_reader_feed(&r, hdr, 4);
		CHECK(frame_next(&r, &p, &n) == FRAME_TOO_BIG, "length %u accepted", lens[i]);
		frame_reader_free(&r);
	}
	/* exactly FRAME_MAX is fine: it waits for the rest */
	{
		struct frame_reader r;
		const uint8_t *p;
		size_t n;
		uint32_t l = FRAME_MAX;
		uint8_t hdr[4] = { (uint8_t)l, (uint8_t)(l >> 8), (uint8_t)(l >> 16), 0 };

		frame_reader_init(&r);
		frame_reader_feed(&r, hdr, 4);
		CHECK(frame_next(&r, &p, &n) == FRAME_MORE, "FRAME_MAX refused");
		frame_reader_free(&r);
	}
	/* a message that would not fit is not packed */
	{
		Commpb__Envelope env = COMMPB__ENVELOPE__INIT;
		Commpb__Hello h = COMMPB__HELLO__INIT;
		char *job = malloc(FRAME_MAX + 1);
		uint8_t *out;

		memset(job, 'x', FRAME_MAX);
		job[FRAME_MAX] = '\0';
		h.job = job;
		env.body_case = COMMPB__ENVELOPE__BODY_HELLO;
		env.hello = &h;
		CHECK(frame_pack(&env, &out) == 0 && out == NULL, "oversized message packed");
		free(job);
	}
	(void)big;
}

/* An fd sent with a frame arrives with it and refers to the same file. */
static void test_fd_passing(void)
{
	int sv[2], fds[2], got_fd;
	uint8_t *f;
	size_t len = make_frame(&f, 7, "fds");
	struct frame_reader r;
	const uint8_t *p;
	size_t n;
	char buf[8] = "";

	REQUIRE(socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0, "socketpair");
	REQUIRE(pipe(fds) == 0, "pipe");
	CHECK(frame_send_all(sv[0], f, len, &fds[1], 1) == 0, "send with fd");
	frame_reader_init(&r);
	while (frame_next(&r, &p, &n) != FRAME_OK)
		REQUIRE(frame_reader_recv(&r, sv[1]) > 0, "recv");
	CHECK(r.nfds == 1, "%d fds queued", r.nfds);
	got_fd = frame_take_fd(&r);
	CHECK(got_fd >= 0 && got_fd != fds[1], "fd %d", got_fd);
	CHECK(write(got_fd, "hi", 2) == 2, "write through the passed fd");
	CHECK(read(fds[0], buf, 2) == 2 && memcmp(buf, "hi", 2) == 0, "read back '%s'", buf);
	CHECK(frame_take_fd(&r) == -1, "a second fd appeared");
	close(got_fd);
	frame_reader_free(&r);

	/* more fds than one message may carry: refused, and none are kept open */
	{
		int many[FRAME_MAX_FDS + 1], before, after;
		union {
			struct cmsghdr a;
			char b[CMSG_SPACE(sizeof many)];
		} ctl;
		struct msghdr msg = { 0 };
		struct iovec iov = { f, len };
		struct cmsghdr *c;

		for (int i = 0; i < FRAME_MAX_FDS + 1; i++)
			many[i] = fds[1];
		memset(&ctl, 0, sizeof ctl);
		msg.msg_iov = &iov;
		msg.msg_iovlen = 1;
		msg.msg_control = ctl.b;
		msg.msg_controllen = sizeof ctl.b;
		c = CMSG_FIRSTHDR(&msg);
		c->cmsg_level = SOL_SOCKET;
		c->cmsg_type = SCM_RIGHTS;
		c->cmsg_len = CMSG_LEN(sizeof many);
		memcpy(CMSG_DATA(c), many, sizeof many);
		before = dup(0);
		close(before);
		REQUIRE(sendmsg(sv[0], &msg, 0) == (ssize_t)len, "sendmsg");
		frame_reader_init(&r);
		CHECK(frame_reader_recv(&r, sv[1]) == -EPROTO, "too many fds accepted");
		CHECK(r.nfds == 0, "%d fds kept", r.nfds);
		frame_reader_free(&r);
		after = dup(0);
		close(after);
		CHECK(after == before, "fds leaked: lowest free fd %d, was %d", after, before);
	}
	free(f);
	close(fds[0]);
	close(fds[1]);
	close(sv[0]);
	close(sv[1]);
}

int main(void)
{
	test_split_reads();
	test_limits();
	test_fd_passing();
	return CHECK_EXIT();
}
