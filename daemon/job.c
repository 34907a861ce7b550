/*
 * job.c: jobs and their ranks: joining (with the job's token), forming,
 * failing when a rank is lost, deadlines, and freeing.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "commd.h"
#include "log.h"
#include "util.h"

const char *job_state_name(enum job_state s)
{
	switch (s) {
	case JOB_FORMING:
		return "forming";
	case JOB_READY:
		return "ready";
	case JOB_FAILED:
		return "failed";
	}
	return "?";
}

/*
 * Job names are per uid: another user cannot squat a name. Root's own job
 * of that name comes first; failing that, root joins another user's job
 * whose token it presents (not empty). Else NULL: a new job of the uid's.
 */
static struct job *job_find(const char *name, uid_t uid, const ProtobufCBinaryData *token)
{
	struct job *j, *other = NULL;

	TAILQ_FOREACH(j, &srv.jobs, link) {
		if (strcmp(j->name, name))
			continue;
		if (j->uid == uid)
			return j;
		if (uid == 0 && !other && token->len &&
		    const_time_eq(j->token, j->token_len, token->data, token->len))
			other = j;
	}
	return other;
}

static int printable(const char *s)
{
	for (; *s; s++)
		if ((unsigned char)*s < 0x20 || *s == 0x7f)
			return 0;
	return 1;
}

static void job_free(struct job *j)
{
	peer_job_gone(j);
	free(j->ranks);
	free(j->posted);
	free(j->next_post);
	free(j->next_cseq);
	free(j->open_group);
	free(j->left);
	free(j->nposted);
	free(j->marks);
	free(j->scratch_ops);
	free(j->scratch_blocked);
	free(j);
}

static struct job *job_new(const struct conn *c, const Commpb__Hello *h)
{
	struct job *j = calloc(1, sizeof *j);
	int w = h->world_size;

	if (!j)
		return NULL;
	j->ranks = calloc((size_t)w, sizeof *j->ranks);
	j->posted = calloc((size_t)w, sizeof *j->posted);
	j->next_post = calloc((size_t)w, sizeof *j->next_post);
	j->next_cseq = calloc((size_t)w, sizeof *j->next_cseq);
	j->open_group = calloc((size_t)w, sizeof *j->open_group);
	j->left = calloc((size_t)w, sizeof *j->left);
	j->nposted = calloc((size_t)w, sizeof *j->nposted);
	j->marks = calloc((size_t)w, sizeof *j->marks);
	j->scratch_ops = calloc((size_t)w, sizeof *j->scratch_ops);
	j->scratch_blocked = calloc((size_t)w, sizeof *j->scratch_blocked);
	if (!j->ranks || !j->posted || !j->next_post || !j->next_cseq || !j->open_group ||
	    !j->left || !j->nposted || !j->marks || !j->scratch_ops || !j->scratch_blocked) {
		job_free(j);
		return NULL;
	}
	for (int r = 0; r < w; r++) {
		TAILQ_INIT(&j->posted[r]);
		j->next_post[r] = 1;
		j->next_cseq[r] = 1;
	}
	snprintf(j->name, sizeof j->name, "%s", h->job);
	if (h->token.len)
		memcpy(j->token, h->token.data, h->token.len);
	j->token_len = h->token.len;
	j->uid = c->uid;
	j->world = w;
	j->next_coll = 1;
	j->timeout_ms = h->timeout_ms ? h->timeout_ms : srv.default_timeout_ms;
	if (j->timeout_ms > TIMEOUT_MAX_MS)
		j->timeout_ms = TIMEOUT_MAX_MS;
	j->join_timeout_ms = h->join_timeout_ms && h->join_timeout_ms < j->timeout_ms
				     ? h->join_timeout_ms
				     : j->timeout_ms;
	j->created_ms = now_ms();
	j->state = JOB_FORMING;
	TAILQ_INSERT_TAIL(&srv.jobs, j, link);
	log_info("job %s: created by uid %d, %d rank%s", j->name, (int)j->uid, w,
		 w == 1 ? "" : "s");
	return j;
}

comm_result_t job_join(struct conn *c, const Commpb__Hello *h, char *err, size_t errlen)
{
	size_t nlen = strlen(h->job);
	comm_result_t rc;
	struct job *j;

	if (nlen == 0 || nlen > JOB_NAME_MAX || !printable(h->job)) {
		snprintf(err, errlen, "join: job name must be 1..%d printable bytes", JOB_NAME_MAX);
		return COMM_ERR_INVALID_ARG;
	}
	if (h->token.len > TOKEN_MAX) {
		snprintf(err, errlen, "join: job token over %d bytes", TOKEN_MAX);
		return COMM_ERR_INVALID_ARG;
	}
	if (h->world_size < 1 || h->world_size > WORLD_MAX) {
		snprintf(err, errlen, "join: world size %d is not in 1..%d", h->world_size,
			 WORLD_MAX);
		return COMM_ERR_INVALID_ARG;
	}
	if (h->rank < 0 || h->rank >= h->world_size) {
		snprintf(err, errlen, "join: rank %d is not in 0..%d", h->rank, h->world_size - 1);
		return COMM_ERR_INVALID_ARG;
	}
	if (strlen(h->root) > 255 || !printable(h->root)) {
		snprintf(err, errlen, "join: root address must be at most 255 printable bytes");
		return COMM_ERR_INVALID_ARG;
	}
	j = job_find(h->job, c->uid, &h->token);
	if (j) {
		/* a wrong token is the caller's own job (names are per uid): say what holds it */
		int token_ok = const_time_eq(j->token, j->token_len, h->token.data, h->token.len);

		if (j->state != JOB_FORMING) {
			snprintf(err, errlen, "join: job %s has already formed (%s)%s", j->name,
				 job_state_name(j->state),
				 token_ok ? "" : ": another run of yours holds the name; choose another "
						 "job name");
			return COMM_ERR_BUSY;
		}
		/* a join refused here is named when the job's deadline passes */
		rc = COMM_ERR_INVALID_ARG;
		if (!token_ok) {
			snprintf(err, errlen, "join: job %s: permission denied: its ranks so far hold "
				 "another token (another run of yours forming under the name, or "
				 "COMM_TOKEN differs between its ranks)", h->job);
			rc = COMM_ERR_PERMISSION;
		} else if (j->world != h->world_size) {
			snprintf(err, errlen, "join: job %s: world size %d, but rank %d says %d",
				 j->name, j->world, h->rank, h->world_size);
		} else if (strcmp(j->dist ? j->dist->root : "", h->root)) {
			snprintf(err, errlen, "join: job %s: rank %d names root '%s', the job has '%s'",
				 j->name, h->rank, h->root, j->dist ? j->dist->root : "");
		} else if (j->ranks[h->rank]) {
			snprintf(err, errlen, "join: job %s: rank %d has already joined (pid %d)",
				 j->name, h->rank, (int)j->ranks[h->rank]->pid);
		} else {
			rc = COMM_OK;
		}
		if (rc != COMM_OK) {
			snprintf(j->refused, sizeof j->refused, "rank %d (pid %d) was refused: %s",
				 h->rank, (int)c->pid, token_ok ? err : "another token");
			return rc;
		}
	} else if (!(j = job_new(c, h))) {
		snprintf(err, errlen, "join: out of memory");
		return COMM_ERR_NO_MEMORY;
	} else if (*h->root && (rc = peer_job_new(j, h->root, err, errlen)) != COMM_OK) {
		TAILQ_REMOVE(&srv.jobs, j, link);
		job_free(j);
		return rc;
	}
	j->ranks[h->rank] = c;
	j->joined++;
	j->attached++;
	c->job = j;
	c->rank = h->rank;
	log_debug("job %s: rank %d joined (pid %d), %d of %d", j->name, h->rank, (int)c->pid,
		  j->joined, j->world);
	if (j->dist)
		peer_job_update(j); /* the root forms it */
	else if (j->joined == j->world)
		j->state = JOB_READY;
	return COMM_OK;
}

/* Send each joined rank its hello reply: status OK or the job's failure. */
static void job_answer_hellos(struct job *j, comm_result_t code, const char *detail)
{
	Commpb__Envelope env = COMMPB__ENVELOPE__INIT;
	Commpb__HelloReply hr = COMMPB__HELLO_REPLY__INIT;

	hr.status = code;
	hr.detail = (char *)detail;
	hr.version_min = PROTO_VERSION_MIN;
	hr.version_max = PROTO_VERSION;
	hr.daemon_version = COMMD_VERSION;
	hr.timeout_ms = j->timeout_ms;
	env.body_case = COMMPB__ENVELOPE__BODY_HELLO_REPLY;
	env.hello_reply = &hr;
	for (int r = 0; r < j->world; r++) {
		if (!j->ranks[r])
			continue;
		env.id = j->ranks[r]->hello_id;
		hr.version = j->ranks[r]->version;
		conn_send(j->ranks[r], &env);
	}
}

void job_announce(struct job *j)
{
	log_info("job %s: formed, %d rank%s", j->name, j->world, j->world == 1 ? "" : "s");
	job_answer_hellos(j, COMM_OK, "");
}

int job_maybe_free(struct job *j)
{
	if (j->attached > 0 || j->tasks_out)
		return 0;
	log_info("job %s: freed (%s, %llu ops, %llu errors)", j->name, job_state_name(j->state),
		 (unsigned long long)j->ops_completed, (unsigned long long)j->errors);
	engine_free(j);
	gpu_job_gone(j);
	TAILQ_REMOVE(&srv.jobs, j, link);
	job_free(j);
	return 1;
}

void job_fail(struct job *j, comm_result_t code, const char *fmt, ...)
{
	va_list ap;

	if (j->state == JOB_FAILED)
		return;
	va_start(ap, fmt);
	vsnprintf(j->fail_detail, sizeof j->fail_detail, fmt, ap);
	va_end(ap);
	j->fail_code = code;
	j->errors++;
	srv.errors++;
	log_info("job %s: failed: %s: %s", j->name, comm_result_name(code), j->fail_detail);
	if (j->state == JOB_FORMING) {
		j->state = JOB_FAILED;
		peer_job_failed(j);
		job_answer_hellos(j, code, j->fail_detail);
		for (int r = 0; r < j->world; r++)
			if (j->ranks[r])
				conn_doom(j->ranks[r], "job failed while forming");
		return;
	}
	j->state = JOB_FAILED;
	peer_job_failed(j);
	engine_fail_pending(j, -1, code, j->fail_detail);
	gpu_job_failed(j);
	net_job_failed(j);
}

void job_detach(struct conn *c, comm_result_t code, const char *why)
{
	struct job *j = c->job;
	struct mem *m;
	int r = c->rank;

	TAILQ_FOREACH(m, &c->mems, link) {
		*job_charge(j, m) -= m->size;
		m->job = NULL;
	}
	c->job = NULL;
	j->ranks[r] = NULL;
	j->attached--;
	if (j->state == JOB_FORMING && code == COMM_ERR_ABORTED) {
		j->joined--;
		job_fail(j, code, "rank %d (pid %d): %s", r, (int)c->pid, why);
	} else if (j->state == JOB_FORMING) {
		/* its slot is free again: a restarted rank may take it */
		j->joined--;
		log_debug("job %s: rank %d left before the job formed", j->name, r);
		peer_job_update(j);
	} else if (code == COMM_OK && j->state == JOB_READY && TAILQ_EMPTY(&j->posted[r])) {
		/* a clean leave: only what needs this rank fails */
		if (!j->nleft++)
			snprintf(j->left_detail, sizeof j->left_detail, "rank %d (pid %d) %s", r,
				 (int)c->pid, why);
		j->left[r] = 1;
		log_debug("job %s: rank %d (pid %d) %s", j->name, r, (int)c->pid, why);
		peer_rank_left(j, r);
		engine_rank_left(j, r);
	} else {
		job_fail(j, code == COMM_OK ? COMM_ERR_PEER_LOST : code, "rank %d (pid %d): %s", r,
			 (int)c->pid, why);
		engine_fail_pending(j, r, j->fail_code, j->fail_detail);
	}
	job_maybe_free(j);
}

void job_check_deadlines(uint64_t now)
{
	struct job *j, *tmp;
	char ranks[128];

	TAILQ_FOREACH_SAFE(j, &srv.jobs, link, tmp) {
		if (j->state == JOB_FORMING) {
			/* a job formed by a root times out there (peer_tick) */
			if (!j->dist && now - j->created_ms >= j->join_timeout_ms) {
				int n = 0, missing = j->world - j->joined;

				for (int r = 0; r < j->world && n < 100; r++)
					if (!j->ranks[r])
						n += snprintf(ranks + n, sizeof ranks - (size_t)n,
							      "%s%d", n ? ", " : "", r);
				job_fail(j, COMM_ERR_TIMEOUT,
					 "join: rank%s %s did not join within %u ms%s%s",
					 missing == 1 ? "" : "s", ranks, j->join_timeout_ms,
					 *j->refused ? "; " : "", j->refused);
			}
			continue;
		}
		engine_check_deadline(j, now);
	}
}
