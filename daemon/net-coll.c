/*
 * net-coll.c: a collective's steps across daemons (net.c): the verdicts,
 * the pipelined ring or chain, the direct all-to-all and small ops whose
 * data rides with their verdicts, and the result written to the ranks.
 */
#include <config.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dtype.h"
#include "log.h"
#include "net-int.h"
#include "reduce.h"

#ifdef HAVE_UCX
/* --- collectives ---------------------------------------------------------------------- */

static int prev_node(const struct net_task *nt)
{
	return (nt->me + nt->nn - 1) % nt->nn;
}

static int next_node(const struct net_task *nt)
{
	return (nt->me + 1) % nt->nn;
}

static int mod(int a, int n)
{
	return ((a % n) + n) % n;
}

/*
 * Piece k of the ring, the part of nb that node k ends up with: an
 * all-reduce's k-th slice of the count, split as evenly as it goes; a
 * reduce-scatter's or all-gather's blocks of node k's ranks (nb holds the
 * blocks node by node, so each node's are together). A chain's one piece
 * is the whole buffer.
 */
static void ring_piece(const struct net_task *nt, int k, size_t *off, size_t *len)
{
	size_t base = nt->t->count / (size_t)nt->nn, rem = nt->t->count % (size_t)nt->nn;
	size_t bl = nt->t->count * nt->t->esize;

	switch (nt->t->type) {
	case COMMPB__OP_TYPE__OP_ALLREDUCE:
		*off = ((size_t)k * base + ((size_t)k < rem ? (size_t)k : rem)) * nt->t->esize;
		*len = (base + ((size_t)k < rem)) * nt->t->esize;
		break;
	case COMMPB__OP_TYPE__OP_REDUCE_SCATTER:
	case COMMPB__OP_TYPE__OP_ALLGATHER:
		*off = (size_t)nt->pos[nt->d->nodes[k].ranks[0]] * bl;
		*len = (size_t)nt->d->nodes[k].nranks * bl;
		break;
	default:
		*off = 0;
		*len = bl;
		break;
	}
}

/* Chunk c of piece k: where it is in nb, and its bytes. */
static void ring_chunk(const struct net_task *nt, int k, int c, size_t *off, size_t *len)
{
	size_t po, pl, at = (size_t)c * nt->chunk;

	ring_piece(nt, k, &po, &pl);
	*off = po + at;
	*len = pl - at < nt->chunk ? pl - at : nt->chunk;
}

static int ring_nchunks(const struct net_task *nt, int k)
{
	size_t po, pl;

	ring_piece(nt, k, &po, &pl);
	return (int)((pl + nt->chunk - 1) / nt->chunk);
}

/* The rank after the run of ranks from r whose blocks follow each other in nb. */
static int run_end(const struct net_task *nt, int r)
{
	int e = r + 1;

	while (e < nt->j->world && nt->pos[e] == nt->pos[e - 1] + 1)
		e++;
	return e;
}

static uint64_t ctag(const struct net_task *nt, int to, int step)
{
	return TAG_COLL(nt->d->nodes[to].slot, nt->me, nt->t->cseq, step);
}

static uint64_t ctag_from(const struct net_task *nt, int from, int step)
{
	return TAG_COLL(nt->d->slot, from, nt->t->cseq, step);
}

/*
 * The node's ranks' inputs from byte off on, elems of them, combined into
 * dst (AVG: their sum; the division comes last).
 */
static void local_reduce(struct net_task *nt, uint8_t *dst, size_t off, size_t elems)
{
	struct task *t = nt->t;
	comm_redop_t op = t->redop == COMM_AVG ? COMM_SUM : (comm_redop_t)t->redop;

	for (int i = 0; i < nt->nlocal; i++)
		nt->lin[i] += off;
	reduce_n((comm_dtype_t)t->dtype, op, dst, (const void *const *)nt->lin, nt->nlocal, elems);
	for (int i = 0; i < nt->nlocal; i++)
		nt->lin[i] -= off;
}

static int root_node(const struct net_task *nt)
{
	return nt->d->node_of[nt->t->root];
}

static size_t round_up(size_t n)
{
	return n ? n : 1;
}

static int ring_recv_piece(const struct net_task *nt, int h)
{
	return mod(nt->me - h - 2, nt->nn);
}

static int ring_send_piece(const struct net_task *nt, int h)
{
	return mod(nt->me - h - 1, nt->nn);
}

/*
 * The ring's hops, chunk size, slots in rbuf and send marks. An
 * all-reduce's ring has 2 (nn - 1) hops: reduce-scatter, then all-gather;
 * a reduce-scatter's is the first half, an all-gather's the second. Each
 * node receives those hops from the node before it and sends them to the
 * next. A chain's hop h goes from its h-th node to the next: a
 * broadcast's from the root's node on along the ring, a reduce's back
 * along the ring to the root's node; each node receives one hop and sends
 * the next, but the first, which only sends, and the last.
 */
static int ring_alloc(struct net_task *nt)
{
	size_t es = nt->t->esize, po, pl, most = 0;
	int nn = nt->nn, at;

	nt->from = prev_node(nt);
	nt->to = next_node(nt);
	nt->h0 = nt->t->type == COMMPB__OP_TYPE__OP_ALLGATHER ? nn - 1 : 0;
	nt->hops = nt->t->type == COMMPB__OP_TYPE__OP_REDUCE_SCATTER ? nn - 1 : 2 * (nn - 1);
	nt->send0 = nt->h0;
	nt->send_end = nt->hops;
	if (nt->t->type == COMMPB__OP_TYPE__OP_BROADCAST ||
	    nt->t->type == COMMPB__OP_TYPE__OP_REDUCE) {
		/* a root the engine checked: only these two ops have one */
		if (nt->t->type == COMMPB__OP_TYPE__OP_BROADCAST) {
			at = mod(nt->me - root_node(nt), nn); /* from the root's node, the first */
		} else {
			at = mod(root_node(nt) - 1 - nt->me, nn); /* to the root's node, the last */
			nt->from = next_node(nt);
			nt->to = prev_node(nt);
		}
		nt->h0 = at ? at - 1 : 0;
		nt->hops = at; /* the first node receives nothing */
		nt->send0 = at ? -1 : 0;
		nt->send_end = nn - 1;
	}
	if (nt->t->type == COMMPB__OP_TYPE__OP_REDUCE_SCATTER ||
	    nt->t->type == COMMPB__OP_TYPE__OP_ALLGATHER) {
		/* each rank's block in nb: node by node, in rank order within a node */
		if (!(nt->pos = calloc((size_t)nt->j->world, sizeof *nt->pos)))
			return -1;
		for (int k = 0, b = 0; k < nn; k++)
			for (int i = 0; i < nt->d->nodes[k].nranks; i++)
				nt->pos[nt->d->nodes[k].ranks[i]] = b++;
	}
	for (int k = 0; k < nn; k++) {
		ring_piece(nt, k, &po, &pl);
		most = pl > most ? pl : most;
	}
	nt->chunk = (most + RING_CHUNKS - 1) / RING_CHUNKS;
	nt->chunk = nt->chunk < RING_CHUNK_MIN ? RING_CHUNK_MIN : (nt->chunk + es - 1) / es * es;
	if (most && nt->chunk > most) /* small pieces: slots of their size (whole elements) */
		nt->chunk = most;
	nt->next_h = nt->h0;
	nt->left = 0;
	for (int h = nt->h0; h < nt->hops; h++)
		nt->left += ring_nchunks(nt, ring_recv_piece(nt, h));
	nt->nslots = nt->left < RING_WINDOW ? nt->left : RING_WINDOW;
	if (!(nt->slots = calloc((size_t)round_up((size_t)nt->nslots), sizeof *nt->slots)) ||
	    !(nt->sent = calloc(round_up((size_t)nt->send_end), sizeof *nt->sent)))
		return -1;
	/*
	 * Chunks arrive in rbuf, never straight in a rank's memory: a receive
	 * UCX has matched cannot be cancelled, and may still write after the
	 * task stopped and its ranks had their answer (hold).
	 */
	if (!(nt->rbuf = buf_get(round_up((size_t)nt->nslots * nt->chunk), &nt->rbuf_cap)))
		return -1;
	return 0;
}

/* Post a ring chunk's send (to node to) or receive; id: what ring_ended gets. */
static void ring_post(struct net_task *nt, int recv, uint64_t tag, void *buf, size_t len, int id)
{
	int before = nt->nreq;

	if (recv)
		post_recv(nt, -1, tag, buf, len);
	else
		post_send(nt, nt->to, tag, buf, len);
	if (nt->nreq > before)
		nt->reqs[nt->nreq - 1].ring = id;
	else if (!recv && nt->status == COMM_OK) /* sent at once */
		ring_ended(nt, 0, id);
}

/*
 * Hop h's send of chunk c: of the piece this node has just taken in (at
 * hop h0: its partial of piece me - 1; an all-gather's: its own piece me).
 */
static void ring_send(struct net_task *nt, int h, int c)
{
	size_t off, len;

	ring_chunk(nt, ring_send_piece(nt, h), c, &off, &len);
	ring_post(nt, 0, ctag(nt, nt->to, RING_STEP(h, c)), nt->data + off, len,
		  h * RING_CHUNKS + c);
}

/* Receives for the next chunks, one in each free slot. */
static void ring_post_recvs(struct net_task *nt)
{
	for (int i = 0; i < nt->nslots && nt->status == COMM_OK; i++) {
		struct ring_slot *sl = &nt->slots[i];
		size_t off, len;

		if (sl->state != SLOT_FREE)
			continue;
		while (nt->next_h < nt->hops &&
		       nt->next_c >= ring_nchunks(nt, ring_recv_piece(nt, nt->next_h))) {
			nt->next_h++;
			nt->next_c = 0;
		}
		if (nt->next_h >= nt->hops)
			return;
		sl->h = nt->next_h;
		sl->c = nt->next_c++;
		sl->state = SLOT_POSTED;
		ring_chunk(nt, ring_recv_piece(nt, sl->h), sl->c, &off, &len);
		ring_post(nt, 1, ctag_from(nt, nt->from, RING_STEP(sl->h, sl->c)),
			  nt->rbuf + (size_t)i * nt->chunk, len, i);
	}
}

/*
 * Take in the chunks that arrived: combined into nb in the reduce-scatter
 * hops (h < nn - 1) and a reduce's, stored in the all-gather ones (a
 * broadcast's in the rank's buffer it fills), and sent on at once for the
 * next hop. In an all-reduce, a store waits until the send that read that
 * place in nb, nn - 1 hops before, has ended. 1 once every chunk is in and
 * every send has ended (or the task failed).
 */
int ring_step(struct net_task *nt)
{
	struct task *t = nt->t;
	int nn = nt->nn, chain = t->type == COMMPB__OP_TYPE__OP_BROADCAST ||
				 t->type == COMMPB__OP_TYPE__OP_REDUCE;

	for (int i = 0; i < nt->nslots && nt->status == COMM_OK; i++) {
		struct ring_slot *sl = &nt->slots[i];
		const uint8_t *src = nt->rbuf + (size_t)i * nt->chunk;
		int h = sl->h, c = sl->c;
		size_t off, len;

		if (sl->state != SLOT_ARRIVED ||
		    (t->type == COMMPB__OP_TYPE__OP_ALLREDUCE && h >= nn - 1 &&
		     !(nt->sent[h + 1 - nn] >> c & 1)))
			continue;
		ring_chunk(nt, ring_recv_piece(nt, h), c, &off, &len);
		if (t->type == COMMPB__OP_TYPE__OP_REDUCE || (!chain && h < nn - 1))
			reduce_acc((comm_dtype_t)t->dtype, (comm_redop_t)t->redop, nt->data + off, src,
				   len / t->esize);
		else
			memcpy(nt->data + off, src, len);
		sl->state = SLOT_FREE;
		nt->left--;
		__atomic_store_n(&nt->show_in, nt->show_all - nt->left, __ATOMIC_RELAXED);
		if (h + 1 < nt->send_end)
			ring_send(nt, h + 1, c);
	}
	ring_post_recvs(nt);
	return nt->status != COMM_OK || (nt->left == 0 && nt->nreq == 0);
}

/* Start the ring, data ready (nb unless set): the first hop's sends (ring_send), and receives. */
static void ring_start(struct net_task *nt)
{
	nt->state = S_RING;
	nt->show_all = nt->left;
	show(nt, SHOW_CHUNKS);
	if (!nt->data)
		nt->data = nt->nb;
	for (int c = 0; nt->send0 >= 0 && c < ring_nchunks(nt, ring_send_piece(nt, nt->send0)); c++)
		ring_send(nt, nt->send0, c);
	ring_post_recvs(nt);
}

/* Buffers for the data phase, made before the verdicts so a shortage is one. */
static int alloc_buffers(struct net_task *nt)
{
	struct task *t = nt->t;
	size_t bl = t->count * t->esize, need_nb, piece;

	switch (t->type) {
	case COMMPB__OP_TYPE__OP_ALLTOALL:
		/* sbuf: what goes to every node, packed; rbuf: what comes from each */
		piece = bl * (size_t)nt->nlocal * (size_t)nt->j->world;
		return piece && (!(nt->sbuf = buf_get(piece, &nt->sbuf_cap)) ||
				 !(nt->rbuf = buf_get(piece, &nt->rbuf_cap))) ? -1 : 0;
	case COMMPB__OP_TYPE__OP_ALLREDUCE:
	case COMMPB__OP_TYPE__OP_REDUCE:
		need_nb = bl;
		break;
	case COMMPB__OP_TYPE__OP_REDUCE_SCATTER:
	case COMMPB__OP_TYPE__OP_ALLGATHER:
		need_nb = bl * (size_t)nt->j->world;
		break;
	case COMMPB__OP_TYPE__OP_BROADCAST: /* copied into the first rank's buffer */
		need_nb = 0;
		break;
	default: /* a barrier: verdicts alone */
		return 0;
	}
	/* the others run a ring or a chain */
	if (!bl)
		return 0;
	if (need_nb && !(nt->nb = buf_get(need_nb, &nt->nb_cap)))
		return -1;
	return ring_alloc(nt);
}

/* A status from another daemon, as one of ours (a value we never send: a protocol error). */
comm_result_t remote_status(int32_t st)
{
	return st >= COMM_OK && st < COMM_INPROGRESS ? (comm_result_t)st : COMM_ERR_PROTOCOL;
}

/* Every node's verdict against node 0's: the first difference, as one node would say it. */
static void judge(struct net_task *nt)
{
	const struct hdr *a = &nt->in[0];
	const char *name = op_type_name((Commpb__OpType)a->type);
	unsigned long long seq = (unsigned long long)nt->t->cseq;

	for (int k = 0; k < nt->nn; k++) {
		if (nt->in[k].status != COMM_OK) {
			nt->status = remote_status(nt->in[k].status);
			snprintf(nt->detail, sizeof nt->detail, "%s", nt->in[k].detail);
			return;
		}
	}
	for (int k = 1; k < nt->nn; k++) {
		const struct hdr *b = &nt->in[k];
		int ra = a->first_rank, rb = b->first_rank;

		if (a->type != b->type)
			fail(nt, COMM_ERR_MISMATCH, "collective %llu: type: rank %d posted %s, rank %d posted %s",
			     seq, ra, name, rb, op_type_name((Commpb__OpType)b->type));
		else if (a->count != b->count)
			fail(nt, COMM_ERR_MISMATCH, "collective %llu: %s count: rank %d has %llu, rank %d has %llu",
			     seq, name, ra, (unsigned long long)a->count, rb,
			     (unsigned long long)b->count);
		else if (a->dtype != b->dtype)
			fail(nt, COMM_ERR_MISMATCH, "collective %llu: %s dtype: rank %d has %s, rank %d has %s",
			     seq, name, ra, dtype_name((int)a->dtype), rb, dtype_name((int)b->dtype));
		else if (op_reduces((Commpb__OpType)a->type) && a->redop != b->redop)
			fail(nt, COMM_ERR_MISMATCH, "collective %llu: %s redop: rank %d has %s, rank %d has %s",
			     seq, name, ra, redop_name((int)a->redop), rb, redop_name((int)b->redop));
		else if ((a->type == COMMPB__OP_TYPE__OP_BROADCAST ||
			  a->type == COMMPB__OP_TYPE__OP_REDUCE) && a->root != b->root)
			fail(nt, COMM_ERR_MISMATCH, "collective %llu: %s root: rank %d has %d, rank %d has %d",
			     seq, name, ra, a->root, rb, b->root);
		else if (a->device != b->device)
			fail(nt, COMM_ERR_MISMATCH,
			     "collective %llu: %s buffers: rank %d's are %s memory, rank %d's %s memory",
			     seq, name, ra, a->device ? "device" : "host", rb,
			     b->device ? "device" : "host");
	}
}

/*
 * A ring's or chain's result: an average divided (where it is a result:
 * all nb, this node's ranks' blocks, the reduce's root's node), then nb or
 * a broadcast's data (or part of it) to every local rank's output.
 */
void write_out(struct net_task *nt)
{
	struct task *t = nt->t;
	size_t bl = t->count * t->esize, off = 0, len = bl;

	if (t->redop == COMM_AVG && op_reduces((Commpb__OpType)t->type) &&
	    (t->type != COMMPB__OP_TYPE__OP_REDUCE || nt->me == root_node(nt))) {
		if (t->type == COMMPB__OP_TYPE__OP_REDUCE_SCATTER)
			ring_piece(nt, nt->me, &off, &len);
		reduce_div((comm_dtype_t)t->dtype, nt->nb + off, len / t->esize, nt->j->world);
	}
	for (int r = 0; r < nt->j->world; r++) {
		if (!t->out[r] || !dist_local(nt->j, r))
			continue;
		switch (t->type) {
		case COMMPB__OP_TYPE__OP_ALLREDUCE:
			memcpy(t->out[r], nt->nb, bl);
			break;
		case COMMPB__OP_TYPE__OP_REDUCE_SCATTER:
			memcpy(t->out[r], nt->nb + (size_t)nt->pos[r] * bl, bl);
			break;
		case COMMPB__OP_TYPE__OP_REDUCE:
			if (r == t->root) /* on the root's node, the chain's last */
				memcpy(t->out[r], nt->nb, bl);
			break;
		case COMMPB__OP_TYPE__OP_BROADCAST:
			if (t->out[r] != nt->data) /* the buffer the chain filled or sent from */
				memcpy(t->out[r], nt->data, bl);
			break;
		case COMMPB__OP_TYPE__OP_ALLGATHER:
			/* back in rank order: in runs of ranks whose blocks follow each other */
			for (int a = 0, e; a < nt->j->world; a = e) {
				e = run_end(nt, a);
				memcpy(t->out[r] + (size_t)a * bl, nt->nb + (size_t)nt->pos[a] * bl,
				       (size_t)(e - a) * bl);
			}
			break;
		default:
			break;
		}
	}
}

static void alltoall_post(struct net_task *nt)
{
	struct task *t = nt->t;
	size_t bl = t->count * t->esize, so = 0, ro = 0;
	const struct dist_node *mine = &nt->d->nodes[nt->me];

	/* pack everything first: in place, the outputs are the inputs */
	for (int k = 0; k < nt->nn; k++) {
		const struct dist_node *dn = &nt->d->nodes[k];
		size_t start = so;

		for (int i = 0; i < mine->nranks; i++)
			for (int x = 0; x < dn->nranks; x++, so += bl)
				memcpy(nt->sbuf + so, t->in[mine->ranks[i]] + (size_t)dn->ranks[x] * bl,
				       bl);
		if (k != nt->me)
			post_send(nt, k, ctag(nt, k, 1), nt->sbuf + start, so - start);
	}
	for (int k = 0; k < nt->nn; k++) {
		size_t len = (size_t)nt->d->nodes[k].nranks * (size_t)mine->nranks * bl;

		if (k != nt->me)
			post_recv(nt, k, ctag_from(nt, k, 1), nt->rbuf + ro, len);
		ro += len;
	}
}

static void alltoall_finish(struct net_task *nt)
{
	struct task *t = nt->t;
	size_t bl = t->count * t->esize, ro = 0, so = 0;
	const struct dist_node *mine = &nt->d->nodes[nt->me];

	for (int k = 0; k < nt->nn; k++) {
		const struct dist_node *dn = &nt->d->nodes[k];
		const uint8_t *src;

		if (k == nt->me) {
			/* our own blocks: where alltoall_post packed them for "node me" */
			for (int kk = 0; kk < k; kk++)
				so += (size_t)mine->nranks * (size_t)nt->d->nodes[kk].nranks * bl;
			src = nt->sbuf + so;
			/* packed by sender i, then receiver x: the same order as a remote node's */
		} else {
			src = nt->rbuf + ro;
		}
		for (int i = 0; i < dn->nranks; i++)
			for (int x = 0; x < mine->nranks; x++, src += bl)
				memcpy(t->out[mine->ranks[x]] + (size_t)dn->ranks[i] * bl, src, bl);
		ro += (size_t)dn->nranks * (size_t)mine->nranks * bl;
	}
}

/*
 * Whether the op's data rides with the verdicts (one message to each node,
 * one round trip): an all-reduce, reduce or broadcast of up to SMALL_BYTES
 * a rank, a reduce-scatter or all-gather of up to SMALL_BYTES in all. The
 * same answer on every node that agrees on the op.
 */
static int is_small(const struct net_task *nt)
{
	const struct task *t = nt->t;
	size_t bl = t->count * t->esize;

	if (t->device || !bl)
		return 0;
	switch (t->type) {
	case COMMPB__OP_TYPE__OP_ALLREDUCE:
	case COMMPB__OP_TYPE__OP_REDUCE:
	case COMMPB__OP_TYPE__OP_BROADCAST:
		return bl <= SMALL_BYTES;
	case COMMPB__OP_TYPE__OP_REDUCE_SCATTER:
	case COMMPB__OP_TYPE__OP_ALLGATHER:
		return bl <= SMALL_BYTES / (size_t)nt->j->world;
	default:
		return 0;
	}
}

/*
 * The bytes node k contributes to a small op: its ranks' combined inputs
 * (all-reduce, reduce, reduce-scatter: every rank's block), its ranks'
 * blocks (all-gather), the root's buffer (broadcast, the root's node alone).
 */
static size_t small_data_len(const struct net_task *nt, int k)
{
	const struct task *t = nt->t;
	size_t bl = t->count * t->esize;

	switch (t->type) {
	case COMMPB__OP_TYPE__OP_REDUCE_SCATTER:
		return bl * (size_t)nt->j->world;
	case COMMPB__OP_TYPE__OP_ALLGATHER:
		return bl * (size_t)nt->d->nodes[k].nranks;
	case COMMPB__OP_TYPE__OP_BROADCAST:
		return k == root_node(nt) ? bl : 0;
	default:
		return bl;
	}
}

/*
 * What of it node from sends node to with its verdict: all of it, but a
 * reduce's, which only the root's node takes. (A reduce-scatter's goes
 * whole to every node, which takes its ranks' blocks: 16 KiB at most.)
 */
static size_t small_len(const struct net_task *nt, int from, int to)
{
	if (nt->t->type == COMMPB__OP_TYPE__OP_REDUCE && to != root_node(nt))
		return 0;
	return small_data_len(nt, from);
}

/* Node k's data of a small op, after its verdict in hbuf. */
static uint8_t *small_data(const struct net_task *nt, int k)
{
	return nt->hbuf + (size_t)k * HSLOT + sizeof(struct hdr);
}

/* This node's part of a small op, after its verdict in hbuf. */
static void small_pack(struct net_task *nt)
{
	struct task *t = nt->t;
	uint8_t *dst = small_data(nt, nt->me);
	size_t bl = t->count * t->esize;
	const struct dist_node *mine = &nt->d->nodes[nt->me];

	switch (t->type) {
	case COMMPB__OP_TYPE__OP_ALLGATHER:
		for (int i = 0; i < mine->nranks; i++)
			memcpy(dst + (size_t)i * bl, t->in[mine->ranks[i]], bl);
		break;
	case COMMPB__OP_TYPE__OP_BROADCAST:
		if (nt->me == root_node(nt))
			memcpy(dst, t->in[t->root], bl);
		break;
	default:
		local_reduce(nt, dst, 0, small_data_len(nt, nt->me) / t->esize);
		break;
	}
}

/*
 * Every node's data at byte off, elems of them, combined into dst in node
 * order (the same order on every node, so every node gets the same bits).
 */
static void small_combine(struct net_task *nt, uint8_t *dst, size_t off, size_t elems)
{
	struct task *t = nt->t;

	memcpy(dst, small_data(nt, 0) + off, elems * t->esize);
	for (int k = 1; k < nt->nn; k++)
		reduce_acc((comm_dtype_t)t->dtype, (comm_redop_t)t->redop, dst, small_data(nt, k) + off,
			   elems);
	if (t->redop == COMM_AVG)
		reduce_div((comm_dtype_t)t->dtype, dst, elems, nt->j->world);
}

/* Every node's data came with its verdict: the results, into the ranks' memory. */
static int small_finish(struct net_task *nt)
{
	struct task *t = nt->t;
	size_t bl = t->count * t->esize;
	const uint8_t *first = NULL;

	for (int k = 0; k < nt->nn; k++) {
		if (k != nt->me && nt->hlen[k] != sizeof(struct hdr) + small_len(nt, k, nt->me)) {
			nt->fatal = 1;
			fail(nt, COMM_ERR_PROTOCOL, "collective %llu: %zu bytes from node %s, %zu expected",
			     (unsigned long long)t->cseq, nt->hlen[k], node_name(nt, k),
			     sizeof(struct hdr) + small_len(nt, k, nt->me));
			return 1;
		}
	}
	for (int r = 0; r < nt->j->world; r++) {
		if (!t->out[r] || !dist_local(nt->j, r))
			continue;
		switch (t->type) {
		case COMMPB__OP_TYPE__OP_ALLREDUCE:
			/* combined once, copied to the node's other ranks */
			if (first)
				memcpy(t->out[r], first, bl);
			else
				small_combine(nt, t->out[r], 0, t->count);
			first = t->out[r];
			break;
		case COMMPB__OP_TYPE__OP_REDUCE:
			if (r == t->root) /* on the root's node, which alone got the data */
				small_combine(nt, t->out[r], 0, t->count);
			break;
		case COMMPB__OP_TYPE__OP_REDUCE_SCATTER:
			small_combine(nt, t->out[r], (size_t)r * bl, t->count);
			break;
		case COMMPB__OP_TYPE__OP_ALLGATHER:
			for (int k = 0; k < nt->nn; k++)
				for (int i = 0; i < nt->d->nodes[k].nranks; i++)
					memcpy(t->out[r] + (size_t)nt->d->nodes[k].ranks[i] * bl,
					       small_data(nt, k) + (size_t)i * bl, bl);
			break;
		default: /* broadcast */
			memcpy(t->out[r], small_data(nt, root_node(nt)), bl);
			break;
		}
	}
	return 1;
}

/* Run the collective's next step; 1 when it is finished (nt->status says how). */
int coll_step(struct net_task *nt)
{
	struct task *t = nt->t;
	int nn = nt->nn, me = nt->me, k;
	size_t bl = t->count * t->esize;

	switch (nt->state) {
	case S_START:
		nt->out.magic = HDR_MAGIC;
		nt->out.status = t->status;
		nt->out.type = t->type;
		nt->out.dtype = t->dtype;
		nt->out.redop = t->redop;
		nt->out.root = t->root;
		nt->out.count = t->count;
		nt->out.first_rank = nt->first;
		nt->out.device = t->device;
		if (t->device && me == 0)
			memcpy(nt->out.nccl_id, nt->d->nccl_id, sizeof nt->out.nccl_id);
		snprintf(nt->out.detail, sizeof nt->out.detail, "%.199s", t->detail);
		if (!(nt->hbuf = malloc((size_t)nn * HSLOT)) ||
		    !(nt->hlen = calloc((size_t)nn, sizeof *nt->hlen))) {
			fail(nt, COMM_ERR_NO_MEMORY, "net: out of memory");
			nt->fatal = 1;
			return 1;
		}
		/* a small op: this node's data rides with its verdict, and needs no buffers */
		nt->small = t->status == COMM_OK && is_small(nt);
		if (t->status == COMM_OK && !t->device && !nt->small && alloc_buffers(nt) < 0) {
			nt->out.status = COMM_ERR_NO_MEMORY;
			snprintf(nt->out.detail, sizeof nt->out.detail,
				 "collective %llu: node %s is out of memory for it",
				 (unsigned long long)t->cseq, node_name(nt, me));
		}
		memcpy(nt->hbuf + (size_t)me * HSLOT, &nt->out, sizeof nt->out);
		nt->hlen[me] = sizeof nt->out;
		show(nt, SHOW_VERDICTS);
		if (nt->small)
			small_pack(nt);
		for (k = 0; k < nn; k++) {
			if (k == me)
				continue;
			post_send(nt, k, ctag(nt, k, 0), nt->hbuf + (size_t)me * HSLOT,
				  sizeof nt->out + (nt->small ? small_len(nt, me, k) : 0));
			post_recv_any(nt, k, ctag_from(nt, k, 0), nt->hbuf + (size_t)k * HSLOT, HSLOT,
				      ANY_LENGTH, &nt->hlen[k]);
		}
		nt->state = S_VERDICT;
		return 0;
	case S_VERDICT:
		for (k = 0; k < nn; k++) {
			if (nt->hlen[k] >= sizeof nt->in[k])
				memcpy(&nt->in[k], nt->hbuf + (size_t)k * HSLOT, sizeof nt->in[k]);
			nt->in[k].detail[sizeof nt->in[k].detail - 1] = 0;
			if (nt->hlen[k] < sizeof nt->in[k] || nt->in[k].magic != HDR_MAGIC) {
				fail(nt, COMM_ERR_PROTOCOL, "collective %llu: a bad header from node %s",
				     (unsigned long long)t->cseq, node_name(nt, k));
				return 1;
			}
		}
		judge(nt);
		/* device memory: the job's GPU workers run it next, with NCCL (on_done) */
		if (nt->status != COMM_OK || t->type == COMMPB__OP_TYPE__OP_BARRIER || !t->count ||
		    t->device)
			return 1;
		if (nt->small)
			return small_finish(nt);
		show(nt, SHOW_LOCAL);
		switch (t->type) {
		case COMMPB__OP_TYPE__OP_ALLREDUCE:
			local_reduce(nt, nt->nb, 0, t->count);
			ring_start(nt);
			return 0;
		case COMMPB__OP_TYPE__OP_REDUCE_SCATTER:
			/* every rank's block, combined over the node's ranks, to its place in nb */
			for (int r = 0, e; r < nt->j->world; r = e) {
				e = run_end(nt, r);
				local_reduce(nt, nt->nb + (size_t)nt->pos[r] * bl, (size_t)r * bl,
					     (size_t)(e - r) * t->count);
			}
			ring_start(nt);
			return 0;
		case COMMPB__OP_TYPE__OP_ALLGATHER:
			for (int r = 0; r < nt->j->world; r++)
				if (t->in[r] && dist_local(nt->j, r))
					memcpy(nt->nb + (size_t)nt->pos[r] * bl, t->in[r], bl);
			ring_start(nt);
			return 0;
		case COMMPB__OP_TYPE__OP_BROADCAST:
			/* the root's buffer, or the one the chain fills */
			nt->data = me == root_node(nt) ? t->in[t->root] : t->out[nt->first];
			ring_start(nt);
			return 0;
		case COMMPB__OP_TYPE__OP_REDUCE:
			local_reduce(nt, nt->nb, 0, t->count);
			ring_start(nt);
			return 0;
		case COMMPB__OP_TYPE__OP_ALLTOALL:
			show(nt, SHOW_EXCHANGE);
			alltoall_post(nt);
			nt->state = S_FINISH;
			return 0;
		default:
			fail(nt, COMM_ERR_INTERNAL, "net: op type %d", (int)t->type);
			return 1;
		}
	case S_FINISH:
		alltoall_finish(nt);
		return 1;
	}
	return 1;
}

#endif
