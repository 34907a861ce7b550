/*
 * net-thread.c: the data plane's thread (net.c): it starts the tasks the
 * loop thread submits, advances each as its requests end, stops the
 * cancelled ones (holding those UCX has not let go) and drains late messages.
 */
#include <config.h>

#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <unistd.h>

#include "log.h"
#include "net-int.h"
#include "util.h"

#ifdef HAVE_UCX
/* --- the thread ---------------------------------------------------------------------------- */

static void task_release(struct net_task *nt)
{
	buf_put(nt->nb, nt->nb_cap);
	buf_put(nt->sbuf, nt->sbuf_cap);
	buf_put(nt->rbuf, nt->rbuf_cap);
	free(nt->hbuf);
	free(nt->hlen);
	free(nt->slots);
	free(nt->sent);
	free(nt->pos);
	nt->nb = nt->sbuf = nt->rbuf = nt->hbuf = NULL;
	nt->hlen = NULL;
	nt->slots = NULL;
	nt->sent = NULL;
	nt->pos = NULL;
}

/*
 * Hand nt to the loop thread, which frees it: once it is on the done list
 * this thread touches nothing of it (its buffers are given back first),
 * but for a held task's requests and buffers (holds_reap).
 */
static void finish(struct net_task *nt)
{
	if (!nt->held_ms)
		task_release(nt);
	pthread_mutex_lock(&N.lock);
	TAILQ_REMOVE(&N.active, nt, link);
	TAILQ_INSERT_TAIL(&N.done, nt, link);
	pthread_mutex_unlock(&N.lock);
	uv_async_send(&N.async);
}

static void start_task(struct net_task *nt)
{
	struct task *t = nt->t;
	char err[160];

	for (int k = 0; k < nt->nn; k++) {
		const struct dist_node *dn = &nt->d->nodes[k];

		if (k == nt->me)
			continue;
		if (t->peer >= 0 && k != nt->d->node_of[t->peer])
			continue;
		if (!(nt->ep[k] = ep_get(dn->ucx, dn->ucx_len, err, sizeof err))) {
			nt->fatal = 1; /* the others wait for this node */
			fail(nt, COMM_ERR_INTERNAL, "node %s: %s", dn->name, err);
			finish(nt);
			return;
		}
	}
	if ((t->peer >= 0 ? p2p_step(nt) : coll_step(nt)) || (nt->nreq == 0 && nt->status != COMM_OK))
		finish(nt);
}

/*
 * Hold nt, stopped with requests that did not end (sends a failed job's
 * receiver never takes, a receive UCX matched): its task is answered, its
 * requests and staging buffers stay until UCX ends them, and so does its
 * task's memory where sends read it (a rank's buffer, a device op's
 * staging buffer; engine_task_release). A send handed over may never
 * arrive: the job fails. Closing the endpoint by force instead would fail
 * every job's ops on it.
 */
static void hold(struct net_task *nt, uint64_t now)
{
	nt->held_ms = now;
	for (int i = 0; i < nt->nreq; i++)
		nt->held_sends |= !nt->reqs[i].recv;
	nt->fatal |= nt->held_sends;
	nt->held_bytes = nt->nb_cap + nt->sbuf_cap + nt->rbuf_cap;
	pthread_mutex_lock(&N.lock);
	TAILQ_INSERT_TAIL(&N.held, nt, hlink);
	pthread_mutex_unlock(&N.lock);
	log_info("net: job %s: a stopped op's %d requests did not end: held, with what they "
		 "use, until they do", nt->j->name, nt->nreq);
}

/*
 * Give back what the held tasks' ended requests used: a task whose all
 * ended goes to the loop thread (engine_task_release). Those held too long
 * have their sends' endpoints closed by force; force (commd is stopping,
 * every endpoint closed): all of them are let go, and the number that did
 * not end even so (a receive matched from a daemon gone silent, whose
 * endpoint is UCX's own) is returned.
 */
int holds_reap(int force, uint64_t now)
{
	struct net_task *nt, *tmp;
	int unended = 0;

	TAILQ_FOREACH_SAFE(nt, &N.held, hlink, tmp) {
		if (!force && now - nt->held_ms >= HOLD_MAX_MS)
			for (int i = 0; i < nt->nreq; i++)
				if (!nt->reqs[i].recv)
					ep_kill(nt->ep[nt->reqs[i].node],
						"sends of a stopped op not taken in time");
		for (int i = 0; i < nt->nreq;) {
			struct nreq *q = &nt->reqs[i];

			if (force) {
				ucp_request_cancel(N.worker, q->h);
				for (int k = 0; k < 1000 && ucp_request_check_status(q->h) ==
								UCS_INPROGRESS; k++)
					ucp_worker_progress(N.worker);
				unended += ucp_request_check_status(q->h) == UCS_INPROGRESS;
			} else if (ucp_request_check_status(q->h) == UCS_INPROGRESS) {
				i++;
				continue;
			}
			if (!q->recv)
				nt->ep[q->node]->busy--;
			ucp_request_free(q->h);
			*q = nt->reqs[--nt->nreq];
		}
		if (nt->nreq)
			continue;
		task_release(nt);
		pthread_mutex_lock(&N.lock);
		TAILQ_REMOVE(&N.held, nt, hlink);
		TAILQ_INSERT_TAIL(&N.released, nt, hlink);
		pthread_mutex_unlock(&N.lock);
		uv_async_send(&N.async);
	}
	return unended;
}

/* Whether every send nt still waits for is to a node that is gone. */
static int sends_to_dead_only(const struct net_task *nt)
{
	for (int i = 0; i < nt->nreq; i++)
		if (!nt->reqs[i].recv && !nt->ep[nt->reqs[i].node]->dead)
			return 0;
	return 1;
}

/*
 * Advance nt if its step has completed; stopping tasks wind down. 1 when nt
 * finished: it is the loop thread's then, and may be freed already.
 */
static int advance(struct net_task *nt, uint64_t now)
{
	int idle;

	/* acquire: cancel_code and cancel_detail were written before cancel */
	if (nt->status == COMM_OK && __atomic_load_n(&nt->cancel, __ATOMIC_ACQUIRE))
		fail(nt, nt->cancel_code, "%s", nt->cancel_detail);
	if (nt->status != COMM_OK && !nt->stopping) {
		/* what is still to come from the others will not be waited for */
		nt->stopping = 1;
		nt->stop_ms = now;
		show(nt, SHOW_STOPPING);
		for (int i = 0; i < nt->nreq; i++)
			if (nt->reqs[i].recv)
				ucp_request_cancel(N.worker, nt->reqs[i].h);
	}
	idle = reap(nt);
	if (nt->status == COMM_OK && nt->state == S_RING) {
		if (!ring_step(nt) || nt->status != COMM_OK)
			return 0; /* a failure: stopped and ended on the next turn */
		show(nt, SHOW_WRITE);
		write_out(nt);
		finish(nt);
		return 1;
	}
	if (nt->status == COMM_OK && nt->state == S_P2P_RECV) {
		if (!p2p_take(nt) || nt->status != COMM_OK)
			return 0;
		finish(nt);
		return 1;
	}
	/*
	 * Requests that neither end nor fail: held, at once where the job
	 * failed (its ranks wait for nothing more) or commd stops, else after
	 * a while (the job may go on, and a hold fails it). At commd's stop
	 * net_stop ends the held ones by force: a receive UCX matched from a
	 * daemon gone silent never ends, and no endpoint of its own says so.
	 */
	if (!idle && nt->stopping &&
	    (N.stop || __atomic_load_n(&nt->doomed, __ATOMIC_RELAXED) || now - nt->stop_ms >= CANCEL_WAIT_MS ||
	     sends_to_dead_only(nt))) {
		hold(nt, now);
		finish(nt);
		return 1;
	}
	if (!idle)
		return 0;
	if (nt->status != COMM_OK || (nt->t->peer >= 0 ? p2p_step(nt) : coll_step(nt)) ||
	    (nt->nreq == 0 && nt->status != COMM_OK)) {
		finish(nt);
		return 1;
	}
	return 0;
}

/* Late messages to freed slots: received and thrown away. Held tasks and closes that ended: freed. */
static void drain(uint64_t now)
{
	struct dead_slot *ds, *dt;
	struct discard *dc, *dct;
	struct nep *e;

	holds_reap(0, now);
	TAILQ_FOREACH(e, &N.eps, link)
		ep_closing(e);
	eps_prune();

	TAILQ_FOREACH_SAFE(dc, &N.discards, link, dct) {
		if (ucp_request_check_status(dc->h) == UCS_INPROGRESS)
			continue;
		ucp_request_free(dc->h);
		free(dc->buf);
		TAILQ_REMOVE(&N.discards, dc, link);
		free(dc);
	}
	pthread_mutex_lock(&N.lock);
	TAILQ_FOREACH_SAFE(ds, &N.dead, link, dt) {
		ucp_tag_recv_info_t info;
		ucp_tag_message_h m;

		while ((m = ucp_tag_probe_nb(N.worker, TAG_SLOT(ds->slot), TAG_SLOT_MASK, 1, &info))) {
			ucp_request_param_t rp = { .op_attr_mask = UCP_OP_ATTR_FLAG_NO_IMM_CMPL };
			struct discard *d = calloc(1, sizeof *d);

			if (d)
				d->buf = malloc(info.length ? info.length : 1);
			if (!d || !d->buf) {
				free(d);
				break;
			}
			d->h = ucp_tag_msg_recv_nbx(N.worker, d->buf, info.length, m, &rp);
			if (UCS_PTR_IS_ERR(d->h)) {
				free(d->buf);
				free(d);
				continue;
			}
			TAILQ_INSERT_TAIL(&N.discards, d, link);
		}
		if (now >= ds->until_ms) {
			N.slot_used[ds->slot] = 0;
			TAILQ_REMOVE(&N.dead, ds, link);
			free(ds);
		}
	}
	pthread_mutex_unlock(&N.lock);
}

void *net_thread(void *arg)
{
	struct epoll_event ev;
	uint64_t last_us = 0;

	(void)arg;
	while (1) {
		struct net_task *nt, *tmp;
		uint64_t now = now_ms();
		int did = 0;

		pthread_mutex_lock(&N.lock);
		if (N.stop && TAILQ_EMPTY(&N.active) && TAILQ_EMPTY(&N.submitted)) {
			pthread_mutex_unlock(&N.lock);
			break;
		}
		while ((nt = TAILQ_FIRST(&N.submitted))) {
			TAILQ_REMOVE(&N.submitted, nt, link);
			TAILQ_INSERT_TAIL(&N.active, nt, link);
			pthread_mutex_unlock(&N.lock);
			start_task(nt);
			did = 1;
			pthread_mutex_lock(&N.lock);
		}
		pthread_mutex_unlock(&N.lock);
		while (ucp_worker_progress(N.worker))
			did = 1;
		close_failed_eps();
		TAILQ_FOREACH_SAFE(nt, &N.active, link, tmp) {
			int before = nt->nreq;

			if (advance(nt, now))
				did = 1; /* and nt is gone */
			else
				did |= nt->nreq != before;
		}
		if (now - N.last_drain_ms >= 100) {
			N.last_drain_ms = now;
			drain(now);
		}
		if (!TAILQ_EMPTY(&N.active))
			N.last_task_ms = now;
		else if (N.cached && now - N.last_task_ms >= BUF_IDLE_MS)
			buf_trim();
		/* poll a little after each event: the next step's answer is often near */
		if (did) {
			last_us = now_us();
			continue;
		}
		if (!TAILQ_EMPTY(&N.active) &&
		    now_us() - last_us < (uint64_t)__atomic_load_n(&N.spin_us, __ATOMIC_RELAXED))
			continue;
		if (ucp_worker_arm(N.worker) == UCS_ERR_BUSY)
			continue;
		if (epoll_wait(N.ep_fd, &ev, 1, 100) > 0 && ev.data.fd == N.wake_fd) {
			uint64_t v;

			if (read(N.wake_fd, &v, sizeof v) < 0 && errno != EAGAIN)
				log_warn("net: wake: %s", strerror(errno));
		}
	}
	return NULL;
}

#endif
