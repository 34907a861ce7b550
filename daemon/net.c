/*
 * net.c: the data plane between daemons, over UCX tag messages (not RMA,
 * which UCX emulates slowly over TCP). One thread owns the UCX worker and
 * runs every cross-node task as a small state machine: it posts a step's
 * sends and receives, and when they have all completed, works on what came
 * and posts the next step (a ring works on each chunk as it comes). So a
 * task that waits for a late node holds up no other job.
 *
 * Collectives are hierarchical: the node's ranks are combined in place
 * here, the nodes run a ring pipelined in chunks (reduce-scatter,
 * all-gather; an all-reduce's both), a chain pipelined the same way
 * (broadcast, reduce) or a direct exchange (all-to-all), and the result is
 * written into the ranks' memory. Every collective starts with each node's
 * verdict (status and the op as its first rank has it) sent to every other
 * node, so that all of them fail an op together or run it together; a
 * small op's data rides with it. On device memory the verdicts are all
 * there is here (node 0's carries the job's NCCL id); the GPU workers then
 * run it with NCCL (gpu.c). A send/recv goes from the sender's daemon to
 * the receiver's: a header (status, size), then the data in chunks, each
 * received into a staging buffer and copied into the rank's as it comes
 * (device memory: into commd's staging buffer, which the GPU worker copies
 * from, gpu.c). Nothing is received straight into a rank's memory: see
 * ring_alloc.
 *
 * Tags (64 bits) are in the receiver's namespace: its slot for the job,
 * then for a collective the sending node, the collective's number and the
 * step (a ring's: its hop and chunk); for a send/recv the two ranks, the
 * message's index and its part (the header, or a chunk of the data).
 *
 * net.c holds the loop thread's side; net-ep.c the endpoints, staging
 * buffers and requests; net-coll.c the collectives; net-p2p.c send/recv;
 * net-thread.c the thread. net-int.h is what they share.
 */
#include <config.h>

#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "commd.h"
#include "dtype.h"
#include "log.h"
#include "net-int.h"
#include "reduce.h"
#include "util.h"

#ifdef HAVE_UCX
struct net_state N = {
	.lock = PTHREAD_MUTEX_INITIALIZER,
	.submitted = TAILQ_HEAD_INITIALIZER(N.submitted),
	.active = TAILQ_HEAD_INITIALIZER(N.active),
	.done = TAILQ_HEAD_INITIALIZER(N.done),
	.dead = TAILQ_HEAD_INITIALIZER(N.dead),
	.lost = TAILQ_HEAD_INITIALIZER(N.lost),
	.eps = TAILQ_HEAD_INITIALIZER(N.eps),
	.discards = TAILQ_HEAD_INITIALIZER(N.discards),
	.released = TAILQ_HEAD_INITIALIZER(N.released),
	.held = TAILQ_HEAD_INITIALIZER(N.held),
	.cache = TAILQ_HEAD_INITIALIZER(N.cache),
	.wake_fd = -1,
	.ep_fd = -1,
};

#ifdef __SANITIZE_ADDRESS__
/*
 * LeakSanitizer (--enable-asan): where a peer daemon stopped answering,
 * net_stop leaves UCX to the exit (it asserts on a worker destroyed under
 * a request or a close still under way), and UCX keeps its pointers where
 * LeakSanitizer does not look (its shared memory segments): what UCX
 * allocated is UCX's, not reported. Every other allocation still is.
 */
const char *__lsan_default_suppressions(void);
const char *__lsan_default_suppressions(void)
{
	return "leak:libucs.so\nleak:libuct.so\nleak:libucp.so\n";
}
#endif

static void wake(void)
{
	uint64_t one = 1;

	if (N.wake_fd < 0)
		return;
	if (write(N.wake_fd, &one, sizeof one) < 0 && errno != EAGAIN)
		log_warn("net: wake: %s", strerror(errno));
}

/* --- the loop thread's side ----------------------------------------------------------------- */

static void nt_free(struct net_task *nt)
{
	free(nt->reqs);
	free(nt->ep);
	free(nt->in);
	free(nt->lin);
	free(nt);
}

/*
 * Tasks finished: their ranks answered (held ones' memory kept); then held
 * tasks whose requests ended: freed. Those are taken first, so that each
 * was answered before (a task goes on the done list before it is released).
 */
static void on_done(uv_async_t *h)
{
	struct nt_head released = TAILQ_HEAD_INITIALIZER(released);
	struct net_task *nt;

	(void)h;
	pthread_mutex_lock(&N.lock);
	TAILQ_CONCAT(&released, &N.released, hlink);
	pthread_mutex_unlock(&N.lock);
	while (1) {
		struct task *t;

		pthread_mutex_lock(&N.lock);
		nt = TAILQ_FIRST(&N.done);
		if (nt)
			TAILQ_REMOVE(&N.done, nt, link);
		pthread_mutex_unlock(&N.lock);
		if (!nt)
			break;
		t = nt->t;
		t->status = nt->status;
		if (nt->status != COMM_OK)
			snprintf(t->detail, sizeof t->detail, "%s", nt->detail);
		/* data went astray: the other nodes may wait for what never comes */
		if (nt->fatal && t->job->state == JOB_READY)
			job_fail(t->job, nt->status, "%s", nt->detail);
		if (t->device && t->peer < 0 && t->status == COMM_OK && !t->job->dist->has_nccl_id) {
			memcpy(t->job->dist->nccl_id, nt->in[0].nccl_id, sizeof t->job->dist->nccl_id);
			t->job->dist->has_nccl_id = 1;
		}
		t->nt = NULL;
		/* a held task's requests are the net thread's still */
		t->held = nt->held_sends;
		if (!nt->held_ms)
			nt_free(nt);
		/* every node agreed to run it on device memory: each worker does its part */
		t->gpu = t->device && t->peer < 0 && t->status == COMM_OK;
		if (t->device && t->type == COMMPB__OP_TYPE__OP_RECV) {
			if (!gpu_p2p_received(t))
				engine_task_done(t);
		} else if (!t->gpu) {
			engine_task_done(t);
		} else if (engine_gpu_handoff(t)) {
			/* the other nodes' workers wait in NCCL for this one's: fail them now */
			if (t->job->state == JOB_READY)
				job_fail(t->job, t->status, "%s", t->detail);
			engine_task_done(t); /* last: it may free the job */
		}
	}
	while ((nt = TAILQ_FIRST(&released))) {
		struct task *t = nt->held_sends ? nt->t : NULL; /* else freed already */

		TAILQ_REMOVE(&released, nt, hlink);
		nt_free(nt);
		if (t)
			engine_task_release(t);
	}
}

void be_net_run(struct task *t)
{
	struct job *j = t->job;
	struct net_task *nt = calloc(1, sizeof *nt);
	int nn = j->dist->nnodes;

	if (!nt || !(nt->ep = calloc((size_t)nn, sizeof *nt->ep)) ||
	    !(nt->in = calloc((size_t)nn, sizeof *nt->in)) ||
	    !(nt->lin = calloc((size_t)j->world, sizeof *nt->lin))) {
		if (nt)
			nt_free(nt);
		/* the other nodes wait for this one: the job cannot go on */
		t->status = COMM_ERR_NO_MEMORY;
		snprintf(t->detail, sizeof t->detail, "net: out of memory");
		engine_task_done(t);
		job_fail(j, COMM_ERR_NO_MEMORY, "net: out of memory");
		return;
	}
	nt->t = t;
	nt->j = j;
	nt->d = j->dist;
	nt->nn = nn;
	nt->me = j->dist->self;
	nt->first = -1;
	for (int r = 0; r < j->world; r++) {
		if (!dist_local(j, r) || t->peer >= 0)
			continue;
		if (nt->first < 0)
			nt->first = r;
		nt->lin[nt->nlocal++] = t->in[r];
	}
	t->nt = nt;
	if (!N.available) {
		nt->status = COMM_ERR_UNSUPPORTED;
		snprintf(nt->detail, sizeof nt->detail, "no data plane between daemons: %s", N.why);
		pthread_mutex_lock(&N.lock);
		TAILQ_INSERT_TAIL(&N.done, nt, link);
		pthread_mutex_unlock(&N.lock);
		uv_async_send(&N.async);
		return;
	}
	pthread_mutex_lock(&N.lock);
	TAILQ_INSERT_TAIL(&N.submitted, nt, link);
	pthread_mutex_unlock(&N.lock);
	wake();
}

/* Stop nt with code and detail; doomed: as its job failed. */
static void cancel_locked(struct net_task *nt, comm_result_t code, const char *detail, int doomed)
{
	if (doomed)
		__atomic_store_n(&nt->doomed, 1, __ATOMIC_RELAXED);
	if (nt->cancel)
		return;
	nt->cancel_code = code;
	snprintf(nt->cancel_detail, sizeof nt->cancel_detail, "%s", detail);
	__atomic_store_n(&nt->cancel, 1, __ATOMIC_RELEASE);
}

void net_task_cancel(struct task *t, comm_result_t code, const char *detail)
{
	pthread_mutex_lock(&N.lock);
	if (t->nt)
		cancel_locked(t->nt, code, detail, 0);
	pthread_mutex_unlock(&N.lock);
	wake();
}

void net_peer_lost(const void *addr, size_t len)
{
	struct dead_peer *dp;

	if (!N.running || !len || !(dp = malloc(sizeof *dp + len)))
		return;
	dp->len = len;
	memcpy(dp->addr, addr, len);
	pthread_mutex_lock(&N.lock);
	TAILQ_INSERT_TAIL(&N.lost, dp, link);
	pthread_mutex_unlock(&N.lock);
	wake();
}

void net_job_failed(struct job *j)
{
	struct net_task *nt;

	if (!j->dist || !N.running)
		return;
	/*
	 * Nothing more is received for the job: what the other nodes still
	 * send it (their sends wait for a receiver) is drained from now on.
	 */
	if (!j->dist->slot_freed) {
		j->dist->slot_freed = 1;
		net_slot_free(j->dist->slot);
	}
	pthread_mutex_lock(&N.lock);
	TAILQ_FOREACH(nt, &N.submitted, link)
		if (nt->j == j)
			cancel_locked(nt, j->fail_code, j->fail_detail, 1);
	TAILQ_FOREACH(nt, &N.active, link)
		if (nt->j == j)
			cancel_locked(nt, j->fail_code, j->fail_detail, 1);
	pthread_mutex_unlock(&N.lock);
	wake();
}

uint32_t net_slot_alloc(void)
{
	uint32_t s = 0;

	if (!N.slot_used)
		return 0;
	pthread_mutex_lock(&N.lock);
	for (uint32_t i = 0; i < SLOTS; i++) {
		uint32_t t = (N.next_slot + i) % SLOTS;

		if (!N.slot_used[t]) {
			s = t;
			break;
		}
	}
	if (s) {
		N.slot_used[s] = 1;
		N.next_slot = s + 1;
	}
	pthread_mutex_unlock(&N.lock);
	return s;
}

void net_slot_free(uint32_t slot)
{
	struct dead_slot *ds;

	if (!N.slot_used)
		return;
	ds = calloc(1, sizeof *ds);
	pthread_mutex_lock(&N.lock);
	if (ds) {
		ds->slot = slot;
		ds->until_ms = now_ms() + SLOT_QUARANTINE_MS;
		TAILQ_INSERT_TAIL(&N.dead, ds, link);
	} else {
		N.slot_used[slot] = 0;
	}
	pthread_mutex_unlock(&N.lock);
}

const void *net_address(size_t *len)
{
	*len = N.available ? N.addr_len : 0;
	return N.available ? N.addr : NULL;
}

int net_set_spin(int us)
{
	cpu_set_t cpus;
	int cores = 1;

	/* auto: spin long only where a core for it is likely spare (of those commd may use) */
	if (us < 0) {
		if (sched_getaffinity(0, sizeof cpus, &cpus) == 0)
			cores = CPU_COUNT(&cpus);
		us = cores >= NET_SPIN_CORES ? NET_SPIN_LONG_US : NET_SPIN_SHORT_US;
	}
	__atomic_store_n(&N.spin_us, us, __ATOMIC_RELAXED);
	return us;
}

void net_start(uv_loop_t *loop)
{
	ucp_params_t cp = { 0 };
	ucp_worker_params_t wp = { 0 };
	ucp_config_t *cfg = NULL;
	struct epoll_event ev = { .events = EPOLLIN };
	ucp_address_t *a = NULL;
	ucs_status_t st;

	uv_async_init(loop, &N.async, on_done);
	if (!(N.slot_used = calloc(SLOTS, 1))) {
		snprintf(N.why, sizeof N.why, "out of memory");
		return;
	}
	N.slot_used[0] = 1; /* 0: no slot */
	N.next_slot = 1;
	/*
	 * UCX's tcp transport moves data in segments of its TCP_TX_SEG_SIZE
	 * and TCP_RX_SEG_SIZE, 8 KiB unless set: 256 KiB ones made send/recv
	 * between two daemons 3x as fast, all-reduce and broadcast 2x (README,
	 * "Across daemons"), for about 1 MB more a peer. Read from the
	 * environment when the transport starts (ucp_config_modify does not
	 * reach it); an operator's own setting stands.
	 */
	setenv("UCX_TCP_TX_SEG_SIZE", TCP_SEG_SIZE, 0);
	setenv("UCX_TCP_RX_SEG_SIZE", TCP_SEG_SIZE, 0);
	if ((st = ucp_config_read(NULL, NULL, &cfg)) != UCS_OK)
		goto ucx_fail;
	/*
	 * UCX 1.13's tcp transport can complete a zero-copy send twice when its
	 * peer dies (an assertion, and commd with it): copy instead, unless the
	 * operator says otherwise.
	 */
	if (!getenv("UCX_ZCOPY_THRESH"))
		ucp_config_modify(cfg, "ZCOPY_THRESH", "inf");
	cp.field_mask = UCP_PARAM_FIELD_FEATURES;
	cp.features = UCP_FEATURE_TAG | UCP_FEATURE_WAKEUP;
	st = ucp_init(&cp, cfg, &N.ctx);
	ucp_config_release(cfg);
	if (st != UCS_OK)
		goto ucx_fail;
	wp.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
	wp.thread_mode = UCS_THREAD_MODE_SINGLE;
	if ((st = ucp_worker_create(N.ctx, &wp, &N.worker)) != UCS_OK)
		goto ucx_fail;
	if ((st = ucp_worker_get_address(N.worker, &a, &N.addr_len)) != UCS_OK)
		goto ucx_fail;
	if (!(N.addr = malloc(N.addr_len))) {
		ucp_worker_release_address(N.worker, a);
		st = UCS_ERR_NO_MEMORY;
		goto ucx_fail;
	}
	memcpy(N.addr, a, N.addr_len);
	ucp_worker_release_address(N.worker, a);
	if ((st = ucp_worker_get_efd(N.worker, &N.worker_fd)) != UCS_OK)
		goto ucx_fail;
	N.wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	N.ep_fd = epoll_create1(EPOLL_CLOEXEC);
	if (N.wake_fd < 0 || N.ep_fd < 0) {
		snprintf(N.why, sizeof N.why, "eventfd/epoll: %s", strerror(errno));
		goto fail;
	}
	ev.data.fd = N.wake_fd;
	epoll_ctl(N.ep_fd, EPOLL_CTL_ADD, N.wake_fd, &ev);
	ev.data.fd = N.worker_fd;
	epoll_ctl(N.ep_fd, EPOLL_CTL_ADD, N.worker_fd, &ev);
	if (pthread_create(&N.thread, NULL, net_thread, NULL) != 0) {
		snprintf(N.why, sizeof N.why, "cannot start its thread");
		goto fail;
	}
	pthread_setname_np(N.thread, "commd-net");
	N.running = 1;
	N.available = 1;
	log_info("net: UCX %s data plane ready (%zu-byte worker address; polls %d us after an event)",
		 ucp_get_version_string(), N.addr_len, __atomic_load_n(&N.spin_us, __ATOMIC_RELAXED));
	return;
ucx_fail:
	snprintf(N.why, sizeof N.why, "UCX: %s", ucs_status_string(st));
fail:
	/* no net thread drains freed slots: jobs get numbers past them (peer_job_new) */
	free(N.slot_used);
	N.slot_used = NULL;
	log_warn("net: no data plane between daemons: %s", N.why);
}

static void close_async(uv_handle_t *h)
{
	(void)h;
}

void net_stop(void)
{
	struct nep *e;
	int stuck = 0;

	if (N.running) {
		pthread_mutex_lock(&N.lock);
		N.stop = 1;
		/* jobs were failed before: their tasks are stopping */
		pthread_mutex_unlock(&N.lock);
		wake();
		pthread_join(N.thread, NULL);
		N.running = 0;
		buf_trim();
		on_done(&N.async);
	}
	/* what was sent to jobs that are gone: taken, so UCX has nothing unmatched left */
	for (int i = 0; N.worker && i < 100000; i++) {
		ucp_request_param_t rp = { .op_attr_mask = UCP_OP_ATTR_FLAG_NO_IMM_CMPL };
		ucp_tag_recv_info_t info;
		ucp_tag_message_h m;
		void *buf, *r;

		while (ucp_worker_progress(N.worker))
			;
		if (!(m = ucp_tag_probe_nb(N.worker, 0, 0, 1, &info)))
			break;
		if (!(buf = malloc(info.length ? info.length : 1)))
			break;
		r = ucp_tag_msg_recv_nbx(N.worker, buf, info.length, m, &rp);
		if (UCS_PTR_IS_PTR(r)) {
			while (ucp_request_check_status(r) == UCS_INPROGRESS)
				ucp_worker_progress(N.worker);
			ucp_request_free(r);
		}
		free(buf);
	}
	while (!TAILQ_EMPTY(&N.discards) || !TAILQ_EMPTY(&N.dead)) {
		struct discard *dc = TAILQ_FIRST(&N.discards);
		struct dead_slot *ds = TAILQ_FIRST(&N.dead);

		if (dc) {
			ucp_request_cancel(N.worker, dc->h);
			while (ucp_request_check_status(dc->h) == UCS_INPROGRESS)
				ucp_worker_progress(N.worker);
			ucp_request_free(dc->h);
			free(dc->buf);
			TAILQ_REMOVE(&N.discards, dc, link);
			free(dc);
		} else {
			TAILQ_REMOVE(&N.dead, ds, link);
			free(ds);
		}
	}
	while (!TAILQ_EMPTY(&N.lost)) {
		struct dead_peer *dp = TAILQ_FIRST(&N.lost);

		TAILQ_REMOVE(&N.lost, dp, link);
		free(dp);
	}
	/* closes under way (a flush cannot be forced): the peers get a while to answer */
	for (uint64_t t0 = now_ms(); N.worker && now_ms() - t0 < CLOSE_WAIT_MS;) {
		int open = 0;

		ucp_worker_progress(N.worker);
		TAILQ_FOREACH(e, &N.eps, link)
			open += ep_closing(e);
		if (!open)
			break;
	}
	TAILQ_FOREACH(e, &N.eps, link) {
		if (e->closing) {
			/* UCX asserts on an endpoint still closing when its worker goes */
			log_warn("net: an endpoint to a lost daemon is still closing: UCX is left "
				 "for the exit to release");
			stuck = 1;
			ep_close_release(e);
		}
		ep_kill(e, "commd is stopping");
	}
	if (holds_reap(1, now_ms()) > 0) {
		/* UCX asserts on an endpoint with a request under way when its worker goes */
		log_warn("net: a held op's receive from a daemon that stopped answering did not "
			 "end: UCX is left for the exit to release");
		stuck = 1;
	}
	on_done(&N.async); /* the held tasks */
	buf_trim(); /* their buffers went back to the cache */
	while ((e = TAILQ_FIRST(&N.eps))) {
		TAILQ_REMOVE(&N.eps, e, link);
		free(e->addr);
		free(e);
	}
	N.neps = 0;
	if (!stuck) { /* else kept, reachable, for the exit to release */
		if (N.worker)
			ucp_worker_destroy(N.worker);
		if (N.ctx)
			ucp_cleanup(N.ctx);
		N.worker = NULL;
		N.ctx = NULL;
	}
	if (N.wake_fd >= 0)
		close(N.wake_fd);
	if (N.ep_fd >= 0)
		close(N.ep_fd);
	N.wake_fd = N.ep_fd = -1;
	free(N.addr);
	N.addr = NULL;
	N.available = 0;
	free(N.slot_used);
	N.slot_used = NULL;
	if (!uv_is_closing((uv_handle_t *)&N.async))
		uv_close((uv_handle_t *)&N.async, close_async);
}

int net_available(void)
{
	return N.available;
}

const char *net_why(void)
{
	return N.why;
}

/*
 * One line for commctl status: UCX's version, the tcp segment size and
 * the polling, then the held ops (hold): how many, how many still
 * sending, how long the oldest has been held and the staging memory kept.
 */
void net_status(char *buf, size_t len)
{
	const char *tx = getenv("UCX_TCP_TX_SEG_SIZE"), *rx = getenv("UCX_TCP_RX_SEG_SIZE");
	char seg[80];
	struct net_task *nt;
	uint64_t now = now_ms(), oldest = now;
	size_t bytes = 0;
	int n = 0, sending = 0, off, w;

	if (!N.available) {
		snprintf(buf, len, "unavailable (%s)", N.why);
		return;
	}
	pthread_mutex_lock(&N.lock);
	TAILQ_FOREACH(nt, &N.held, hlink) {
		n++;
		sending += nt->held_sends;
		bytes += nt->held_bytes;
		oldest = nt->held_ms < oldest ? nt->held_ms : oldest;
	}
	pthread_mutex_unlock(&N.lock);
	/* what net_start set, or the operator's */
	if (tx && rx && !strcmp(tx, rx))
		snprintf(seg, sizeof seg, "%.32s", tx);
	else
		snprintf(seg, sizeof seg, "%.32s out, %.32s in", tx ? tx : "UCX's",
			 rx ? rx : "UCX's");
	off = snprintf(buf, len, "ucx %s, tcp segments %s, polls %d us; held ops: ",
		       ucp_get_version_string(), seg,
		       __atomic_load_n(&N.spin_us, __ATOMIC_RELAXED));
	if (off < 0 || (size_t)off >= len)
		return;
	if (!n)
		w = snprintf(buf + off, len - (size_t)off, "none");
	else
		w = snprintf(buf + off, len - (size_t)off,
			     "%d (%d sending), the oldest for %llu s, %.1f MiB", n, sending,
			     (unsigned long long)((now - oldest) / 1000), (double)bytes / (1 << 20));
	if (w < 0 || (size_t)(off += w) >= len)
		return;
	snprintf(buf + off, len - (size_t)off, "; endpoints: %d",
		 __atomic_load_n(&N.neps, __ATOMIC_RELAXED));
}

/* Node k's ranks, "2-3,7", as far as len allows (they are sorted). */
static void node_ranks(const struct dist_node *dn, char *buf, size_t len)
{
	size_t off = 0;

	buf[0] = 0;
	for (int i = 0, e; i < dn->nranks && off < len; i = e + 1) {
		int w;

		for (e = i; e + 1 < dn->nranks && dn->ranks[e + 1] == dn->ranks[e] + 1; e++)
			;
		w = e > i ? snprintf(buf + off, len - off, "%s%d-%d", off ? "," : "", dn->ranks[i],
				     dn->ranks[e])
			  : snprintf(buf + off, len - off, "%s%d", off ? "," : "", dn->ranks[i]);
		if (w < 0)
			return;
		off += (size_t)w;
	}
}

void net_task_state(const struct task *t, char *buf, size_t len)
{
	const struct net_task *nt = t->nt;
	const struct dist *d = t->job->dist;
	char names[160] = "", ranks[64] = "";
	int what, n = 0, one = -1;
	size_t off = 0;

	if (!nt) {
		snprintf(buf, len, "running across daemons");
		return;
	}
	what = __atomic_load_n(&nt->show, __ATOMIC_ACQUIRE);
	for (int k = 0; k < nt->nn; k++) {
		if (!(__atomic_load_n(&nt->awaited[k / 64], __ATOMIC_RELAXED) >> (k % 64) & 1))
			continue;
		if (n++ < 3 && off < sizeof names)
			off += (size_t)snprintf(names + off, sizeof names - off, "%s%s",
						off ? ", " : "", d->nodes[k].name);
		one = k;
	}
	if (n > 3)
		snprintf(names + (off < sizeof names ? off : sizeof names - 1),
			 sizeof names - (off < sizeof names ? off : sizeof names - 1),
			 " and %d more", n - 3);
	if (n == 1)
		node_ranks(&d->nodes[one], ranks, sizeof ranks);
	switch (what) {
	case SHOW_VERDICTS:
		if (n == 1)
			snprintf(buf, len, "across daemons: waiting for node %s (ranks %s) to post it",
				 names, ranks);
		else if (n)
			snprintf(buf, len, "across daemons: waiting for nodes %s to post it", names);
		else
			snprintf(buf, len, "across daemons: every node posted it");
		break;
	case SHOW_LOCAL:
		snprintf(buf, len, "across daemons: taking in this node's ranks' data");
		break;
	case SHOW_CHUNKS:
		if (nt->show_all) /* a chain's first node and a send receive nothing */
			snprintf(buf, len, "across daemons: %d of %d chunks in from node %s",
				 __atomic_load_n(&nt->show_in, __ATOMIC_RELAXED), nt->show_all,
				 d->nodes[nt->from].name);
		else
			snprintf(buf, len, "across daemons: sending to node %s",
				 d->nodes[nt->to].name);
		break;
	case SHOW_EXCHANGE:
		if (n)
			snprintf(buf, len, "across daemons: waiting for data from node%s %s",
				 n > 1 ? "s" : "", names);
		else
			snprintf(buf, len, "across daemons: exchanging data");
		break;
	case SHOW_WRITE:
		snprintf(buf, len, "across daemons: writing the result to this node's ranks");
		break;
	case SHOW_STOPPING:
		snprintf(buf, len, "across daemons: failed, ending the transfers under way");
		break;
	default:
		snprintf(buf, len, "running across daemons");
		break;
	}
}

#else /* !HAVE_UCX */

void net_start(uv_loop_t *loop)
{
	(void)loop;
}

void net_stop(void)
{
}

int net_available(void)
{
	return 0;
}

const char *net_why(void)
{
	return "commd was built without UCX";
}

void net_status(char *buf, size_t len)
{
	snprintf(buf, len, "unavailable (%s)", net_why());
}

const void *net_address(size_t *len)
{
	*len = 0;
	return NULL;
}

int net_set_spin(int us)
{
	return us < 0 ? 0 : us;
}

uint32_t net_slot_alloc(void)
{
	return 0;
}

void net_slot_free(uint32_t slot)
{
	(void)slot;
}

void be_net_run(struct task *t)
{
	t->status = COMM_ERR_UNSUPPORTED;
	snprintf(t->detail, sizeof t->detail, "no data plane between daemons: %s", net_why());
	engine_task_done(t);
}

void net_job_failed(struct job *j)
{
	(void)j;
}

void net_peer_lost(const void *addr, size_t len)
{
	(void)addr;
	(void)len;
}

void net_task_state(const struct task *t, char *buf, size_t len)
{
	(void)t;
	snprintf(buf, len, "running across daemons");
}

void net_task_cancel(struct task *t, comm_result_t code, const char *detail)
{
	(void)t;
	(void)code;
	(void)detail;
}

#endif
