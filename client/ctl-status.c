/* ctl-status.c: `commctl status` and `commctl jobs`, as text or JSON. */
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "ctl.h"

static Commpb__Envelope *fetch(struct ctl *ctl, const char *job)
{
	Commpb__Envelope env = COMMPB__ENVELOPE__INIT, *reply;
	Commpb__StatusRequest req = COMMPB__STATUS_REQUEST__INIT;

	req.job = (char *)(job ? job : "");
	env.body_case = COMMPB__ENVELOPE__BODY_STATUS_REQUEST;
	env.status_request = &req;
	reply = ctl_call(ctl, &env);
	if (reply && reply->body_case != COMMPB__ENVELOPE__BODY_STATUS_REPLY) {
		fprintf(stderr, "commctl: unexpected answer to status\n");
		commpb__envelope__free_unpacked(reply, NULL);
		return NULL;
	}
	return reply;
}

static void human_bytes(uint64_t b, char *buf, size_t len)
{
	static const char *const units[] = { "B", "KiB", "MiB", "GiB", "TiB" };
	double v = (double)b;
	int u = 0;

	while (v >= 1024 && u < 4) {
		v /= 1024;
		u++;
	}
	snprintf(buf, len, u ? "%.1f %s" : "%.0f %s", v, units[u]);
}

static void print_jobs_text(const Commpb__StatusReply *s)
{
	char moved[32], mem[32];
	int w = 24; /* the JOB column: 24, or the longest name where that is longer */

	if (s->n_jobs == 0) {
		printf("no jobs\n");
		return;
	}
	if (s->jobs_omitted)
		printf("(%u more jobs not shown)\n", s->jobs_omitted);
	for (size_t i = 0; i < s->n_jobs; i++)
		if ((int)strlen(s->jobs[i]->name) > w)
			w = (int)strlen(s->jobs[i]->name);
	printf("%-*s %5s %6s %5s %-9s %10s %8s %10s %10s %7s\n", w, "JOB", "UID", "RANKS", "NODES",
	       "STATE", "OPS", "PENDING", "MOVED", "MEMORY", "ERRORS");
	for (size_t i = 0; i < s->n_jobs; i++) {
		const Commpb__JobInfo *j = s->jobs[i];
		char ranks[32];

		snprintf(ranks, sizeof ranks, "%d/%d", j->joined, j->world_size);
		human_bytes(j->bytes_moved, moved, sizeof moved);
		human_bytes(j->mem_registered, mem, sizeof mem);
		printf("%-*s %5u %6s %5d %-9s %10" PRIu64 " %8" PRIu64 " %10s %10s %7" PRIu64 "\n",
		       w, j->name, j->uid, ranks, j->nodes ? j->nodes : 1, j->state, j->ops_completed,
		       j->ops_pending, moved, mem, j->errors);
	}
	for (size_t i = 0, first = 1; i < s->n_jobs; i++) {
		if (!*s->jobs[i]->gpu)
			continue;
		if (first)
			printf("\ngpu workers:\n");
		first = 0;
		printf("  %-*s %s\n", w, s->jobs[i]->name, s->jobs[i]->gpu);
	}
}

static void print_inflight_text(const Commpb__StatusReply *s)
{
	for (size_t i = 0; i < s->n_jobs; i++) {
		const Commpb__JobInfo *j = s->jobs[i];

		if (!j->n_inflight)
			continue;
		printf("\nops in flight in %s (oldest first; %s):\n", j->name,
		       j->nodes > 1 ? "the ranks of this daemon" : "every rank");
		printf("  %6s %-15s %10s %-9s %9s %-10s %-10s %s\n", "COLL", "TYPE", "COUNT", "DTYPE",
		       "WAITED", "POSTED", "MISSING", "STATE");
		for (size_t k = 0; k < j->n_inflight; k++) {
			const Commpb__OpInFlight *o = j->inflight[k];
			char coll[24] = "-", waited[24];

			if (o->collective)
				snprintf(coll, sizeof coll, "%" PRIu64, o->collective);
			snprintf(waited, sizeof waited, "%.1f s", (double)o->waited_ms / 1000);
			printf("  %6s %-15s %10" PRIu64 " %-9s %9s %-10s %-10s %s (%s)\n", coll, o->type,
			       o->count, o->dtype, waited, o->posted, *o->missing ? o->missing : "-",
			       o->state, o->detail);
		}
		if (j->inflight_omitted)
			printf("  (and %u more; commctl jobs %s shows up to 100)\n", j->inflight_omitted,
			       j->name);
	}
}

static void print_peers_text(const Commpb__StatusReply *s)
{
	printf("%-24s %-22s %-12s %9s %5s  %s\n", "PEER", "ADDRESS", "ROLE", "RTT", "JOBS", "STATE");
	for (size_t i = 0; i < s->n_peers; i++) {
		const Commpb__PeerInfo *p = s->peers[i];
		char rtt[16] = "-";

		if (p->rtt_us)
			snprintf(rtt, sizeof rtt, "%u us", p->rtt_us);
		printf("%-24s %-22s %-12s %9s %5u  %s\n", p->node, p->address, p->role, rtt, p->jobs,
		       p->state);
	}
}

static void print_peers_json(const Commpb__StatusReply *s)
{
	printf("[");
	for (size_t i = 0; i < s->n_peers; i++) {
		const Commpb__PeerInfo *p = s->peers[i];

		printf("%s{\"node\": ", i ? ", " : "");
		ctl_json_str(p->node);
		printf(", \"address\": ");
		ctl_json_str(p->address);
		printf(", \"role\": ");
		ctl_json_str(p->role);
		printf(", \"state\": ");
		ctl_json_str(p->state);
		printf(", \"rtt_us\": %u, \"jobs\": %u}", p->rtt_us, p->jobs);
	}
	printf("]");
}

static void print_jobs_json(const Commpb__StatusReply *s)
{
	printf("[");
	for (size_t i = 0; i < s->n_jobs; i++) {
		const Commpb__JobInfo *j = s->jobs[i];

		printf("%s{\"name\": ", i ? ", " : "");
		ctl_json_str(j->name);
		printf(", \"uid\": %u, \"world_size\": %d, \"joined\": %d, \"state\": ", j->uid,
		       j->world_size, j->joined);
		ctl_json_str(j->state);
		printf(", \"ops_completed\": %" PRIu64 ", \"ops_pending\": %" PRIu64
		       ", \"bytes_moved\": %" PRIu64 ", \"mem_registered\": %" PRIu64
		       ", \"errors\": %" PRIu64 ", \"nodes\": %d, \"root\": ",
		       j->ops_completed, j->ops_pending, j->bytes_moved, j->mem_registered,
		       j->errors, j->nodes ? j->nodes : 1);
		ctl_json_str(j->root);
		printf(", \"gpu\": ");
		ctl_json_str(j->gpu);
		printf(", \"inflight_omitted\": %u, \"inflight\": [", j->inflight_omitted);
		for (size_t k = 0; k < j->n_inflight; k++) {
			const Commpb__OpInFlight *o = j->inflight[k];

			printf("%s{\"collective\": %" PRIu64 ", \"type\": ", k ? ", " : "",
			       o->collective);
			ctl_json_str(o->type);
			printf(", \"count\": %" PRIu64 ", \"dtype\": ", o->count);
			ctl_json_str(o->dtype);
			printf(", \"bytes\": %" PRIu64 ", \"waited_ms\": %" PRIu64 ", \"posted\": ",
			       o->bytes, o->waited_ms);
			ctl_json_str(o->posted);
			printf(", \"missing\": ");
			ctl_json_str(o->missing);
			printf(", \"state\": ");
			ctl_json_str(o->state);
			printf(", \"detail\": ");
			ctl_json_str(o->detail);
			printf("}");
		}
		printf("]}");
	}
	printf("]");
}

int ctl_status(struct ctl *ctl, int argc, char **argv)
{
	Commpb__Envelope *reply = fetch(ctl, NULL);
	const Commpb__StatusReply *s;
	uint64_t up;
	char moved[32];

	if (!reply)
		return 1;
	s = reply->status_reply;
	up = s->uptime_ms / 1000;
	if (ctl->json) {
		printf("{\"version\": ");
		ctl_json_str(s->version);
		printf(", \"pid\": %d, \"uptime_ms\": %" PRIu64 ", \"socket\": ", s->pid,
		       s->uptime_ms);
		ctl_json_str(s->socket);
		printf(", \"backends\": [");
		for (size_t i = 0; i < s->n_backends; i++) {
			printf("%s", i ? ", " : "");
			ctl_json_str(s->backends[i]);
		}
		printf("], \"gpu\": ");
		ctl_json_str(s->gpu);
		printf(", \"nccl\": ");
		ctl_json_str(s->nccl);
		printf(", \"net\": ");
		ctl_json_str(s->net);
		printf(", \"topology\": ");
		ctl_json_str(s->topology);
		printf(", \"own_jobs_only\": %s, \"node\": ", s->own_jobs_only ? "true" : "false");
		ctl_json_str(s->node);
		printf(", \"peer_listen\": ");
		ctl_json_str(s->peer_listen);
		printf(", \"peers\": ");
		print_peers_json(s);
		printf(", \"worker_threads\": %u, \"connections\": %" PRIu64
		       ", \"ops_completed\": %" PRIu64 ", \"bytes_moved\": %" PRIu64
		       ", \"errors\": %" PRIu64 ", \"jobs_omitted\": %u, \"jobs\": ",
		       s->worker_threads, s->connections, s->ops_completed, s->bytes_moved,
		       s->errors, s->jobs_omitted);
		print_jobs_json(s);
		printf("}\n");
	} else {
		human_bytes(s->bytes_moved, moved, sizeof moved);
		printf("commd %s, pid %d, up %" PRIu64 "d %02" PRIu64 ":%02" PRIu64 ":%02" PRIu64
		       "\n",
		       s->version, s->pid, up / 86400, up / 3600 % 24, up / 60 % 60, up % 60);
		printf("socket:      %s\n", s->socket);
		printf("backends:   ");
		for (size_t i = 0; i < s->n_backends; i++)
			printf(" %s", s->backends[i]);
		printf(" (%u worker threads)\n", s->worker_threads);
		printf("gpu:         %s\n", s->gpu);
		printf("nccl:        %s\n", s->nccl);
		printf("net:         %s\n", s->net);
		printf("topology:    %s\n", s->topology);
		printf("node:        %s\n", s->node);
		printf("peers:       %zu%s%s\n", s->n_peers,
		       *s->peer_listen ? ", listening on " : " (no peer listener)", s->peer_listen);
		printf("connections: %" PRIu64 "\n", s->connections);
		printf("ops:         %" PRIu64 " completed, %s moved, %" PRIu64 " errors\n",
		       s->ops_completed, moved, s->errors);
		printf("jobs:        %zu%s\n", s->n_jobs + s->jobs_omitted,
		       s->own_jobs_only ? " (yours only: you are not root or in commd's admin group)" : "");
		if (s->n_peers) {
			printf("\n");
			print_peers_text(s);
		}
		if (s->n_jobs) {
			printf("\n");
			print_jobs_text(s);
			print_inflight_text(s);
		}
	}
	commpb__envelope__free_unpacked(reply, NULL);
	return 0;
}

int ctl_jobs(struct ctl *ctl, int argc, char **argv)
{
	const char *job = argc > 0 ? argv[0] : NULL;
	Commpb__Envelope *reply;

	if (!(reply = fetch(ctl, job)))
		return 1;
	if (job && !reply->status_reply->n_jobs) {
		fprintf(stderr, "commctl: no job named %s\n", job);
		commpb__envelope__free_unpacked(reply, NULL);
		return 1;
	}
	if (ctl->json) {
		print_jobs_json(reply->status_reply);
		printf("\n");
	} else {
		print_jobs_text(reply->status_reply);
		print_inflight_text(reply->status_reply);
	}
	commpb__envelope__free_unpacked(reply, NULL);
	return 0;
}
