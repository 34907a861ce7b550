/*
 * net-p2p.c: a send/recv across daemons (net.c): the sender's header, then
 * its data in chunks, each copied into the receiver's rank as it comes.
 */
#include <config.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "net-int.h"

#ifdef HAVE_UCX
/* --- send/recv ------------------------------------------------------------------------- */

static size_t p2p_chunk(size_t count)
{
	size_t c = (count + P2P_CHUNKS - 1) / P2P_CHUNKS;

	return c < RING_CHUNK_MIN ? RING_CHUNK_MIN : c;
}

/*
 * Post the sends of count bytes from buf (the rank's memory) to node pn,
 * chunk by chunk (tag: the header's).
 */
static void p2p_send_data(struct net_task *nt, int pn, uint64_t tag, const uint8_t *buf,
			  size_t count)
{
	size_t chunk = p2p_chunk(count);

	for (size_t at = 0, c = 0; at < count && nt->status == COMM_OK; at += chunk, c++)
		post_send(nt, pn, tag + 1 + c, buf + at, count - at < chunk ? count - at : chunk);
}

/*
 * Post the receives of count bytes into buf in chunks of chunk (the
 * sender's: p2p_chunk(count)); with slots kept, chunk c's arrival marks
 * slot c for p2p_take.
 */
static void p2p_recv_data(struct net_task *nt, uint64_t tag, uint8_t *buf, size_t count,
			  size_t chunk)
{
	for (size_t at = 0, c = 0; at < count && nt->status == COMM_OK; at += chunk, c++) {
		int before = nt->nreq;

		post_recv(nt, -1, tag + 1 + c, buf + at, count - at < chunk ? count - at : chunk);
		if (nt->slots && nt->nreq > before) {
			nt->slots[c].state = SLOT_POSTED;
			nt->reqs[nt->nreq - 1].ring = (int)c;
		}
	}
}

/* Copy the chunks that came into place; 1 once all are (or the task failed). */
int p2p_take(struct net_task *nt)
{
	for (int c = 0; c < nt->nslots && nt->status == COMM_OK; c++) {
		size_t at = (size_t)c * nt->chunk;

		if (nt->slots[c].state != SLOT_ARRIVED)
			continue;
		memcpy(nt->t->out[0] + at, nt->rbuf + at,
		       nt->t->count - at < nt->chunk ? nt->t->count - at : nt->chunk);
		nt->slots[c].state = SLOT_FREE;
		nt->left--;
		__atomic_store_n(&nt->show_in, nt->show_all - nt->left, __ATOMIC_RELAXED);
	}
	return nt->status != COMM_OK || (nt->left == 0 && nt->nreq == 0);
}

int p2p_step(struct net_task *nt)
{
	struct task *t = nt->t;
	int send = t->type == COMMPB__OP_TYPE__OP_SEND;
	int src = send ? t->local : t->peer, dst = send ? t->peer : t->local;
	int pn = nt->d->node_of[t->peer];
	uint32_t slot = send ? nt->d->nodes[pn].slot : nt->d->slot;

	switch (nt->state) {
	case S_START:
		if (send) {
			nt->out.magic = HDR_MAGIC;
			nt->out.status = t->status;
			nt->out.count = t->status == COMM_OK ? t->count : 0;
			snprintf(nt->out.detail, sizeof nt->out.detail, "%.199s", t->detail);
			post_send(nt, pn, TAG_P2P(slot, src, dst, t->cseq, 0), &nt->out, sizeof nt->out);
			if (t->status == COMM_OK)
				p2p_send_data(nt, pn, TAG_P2P(slot, src, dst, t->cseq, 0), t->in[0],
					      t->count);
			nt->to = pn;
			show(nt, SHOW_CHUNKS); /* "sending to node" */
			/* refused here: the receiver is told, and the send fails too */
			nt->deferred = t->status;
			snprintf(nt->deferred_detail, sizeof nt->deferred_detail, "%s", t->detail);
			nt->state = S_P2P_END;
		} else {
			post_recv(nt, -1, TAG_P2P(slot, src, dst, t->cseq, 0), &nt->in[0],
				  sizeof nt->in[0]);
			nt->state = S_P2P_DATA;
		}
		return 0;
	case S_P2P_DATA: {
		const struct hdr *h = &nt->in[0];

		if (h->magic != HDR_MAGIC) {
			nt->fatal = 1; /* its data is not taken: a later recv could meet it */
			fail(nt, COMM_ERR_PROTOCOL, "recv from rank %d: a bad header", src);
			return 1;
		}
		nt->in[0].detail[sizeof nt->in[0].detail - 1] = 0;
		if (h->status != COMM_OK) {
			nt->status = remote_status(h->status);
			snprintf(nt->detail, sizeof nt->detail, "%s", h->detail);
			return 1;
		}
		if (h->count != t->count || t->status != COMM_OK) {
			/*
			 * Take the data anyway, so the sender's send ends and nothing
			 * lingers; the error stands once it is in (failing now would
			 * cancel this receive).
			 */
			if (h->count && !(nt->rbuf = buf_get(h->count, &nt->rbuf_cap))) {
				nt->fatal = 1; /* the sender's data would linger */
				fail(nt, COMM_ERR_NO_MEMORY, "recv from rank %d: out of memory", src);
				return 1;
			}
			p2p_recv_data(nt, TAG_P2P(slot, src, dst, t->cseq, 0), nt->rbuf, h->count,
				      p2p_chunk(h->count));
			nt->deferred = t->status == COMM_OK ? COMM_ERR_MISMATCH : t->status;
			if (t->status == COMM_OK)
				snprintf(nt->deferred_detail, sizeof nt->deferred_detail,
					 "send from rank %d to rank %d: %llu bytes sent, %zu expected", src,
					 dst, (unsigned long long)h->count, t->count);
			else
				snprintf(nt->deferred_detail, sizeof nt->deferred_detail, "%s", t->detail);
			nt->state = S_P2P_END;
			return 0;
		}
		if (!t->count)
			return 1;
		/* through rbuf, as a ring's chunks (ring_alloc), each into place as it comes */
		nt->chunk = p2p_chunk(t->count);
		nt->nslots = nt->left = (int)((t->count + nt->chunk - 1) / nt->chunk);
		if (!(nt->rbuf = buf_get(t->count, &nt->rbuf_cap)) ||
		    !(nt->slots = calloc((size_t)nt->nslots, sizeof *nt->slots))) {
			nt->fatal = 1; /* the sender's data would linger */
			fail(nt, COMM_ERR_NO_MEMORY, "recv from rank %d: out of memory", src);
			return 1;
		}
		p2p_recv_data(nt, TAG_P2P(slot, src, dst, t->cseq, 0), nt->rbuf, t->count,
			      nt->chunk);
		nt->from = pn;
		nt->show_all = nt->left;
		show(nt, SHOW_CHUNKS);
		nt->state = S_P2P_RECV;
		return 0;
	}
	default:
		if (nt->deferred != COMM_OK)
			fail(nt, nt->deferred, "%s", nt->deferred_detail);
		return 1;
	}
}

#endif
