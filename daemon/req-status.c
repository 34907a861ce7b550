/* req-status.c: what commctl status shows: the daemon, its backends, its jobs. */
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "commd.h"
#include "util.h"

/* Most jobs one reply lists: with 255-byte names they still fit one frame. */
#define STATUS_MAX_JOBS 150
#define STATUS_MAX_PEERS 32
/*
 * Ops in flight one reply lists: for one job asked by name, and over all
 * jobs (4 a job at most, none past 50 jobs), so the reply fits one frame.
 */
#define STATUS_INFLIGHT_ONE 100
#define STATUS_INFLIGHT_ALL 60
#define STATUS_INFLIGHT_PER_JOB 4
#define GPU_LINE 256 /* a job's gpu line */

/* Every job for an admin; for anyone else, their own jobs only. */
static int wanted(const struct job *j, const char *name, const struct conn *c)
{
	return (!*name || !strcmp(j->name, name)) && (c->admin || j->uid == c->uid);
}

int req_status_exec(struct conn *c, const Commpb__Envelope *env, int *fds, int nfds)
{
	Commpb__Envelope reply = COMMPB__ENVELOPE__INIT;
	Commpb__StatusReply sr = COMMPB__STATUS_REPLY__INIT;
	Commpb__JobInfo *infos = NULL, **jobs = NULL;
	char (*gpul)[GPU_LINE] = NULL;
	const char *name = env->status_request->job;
	struct inflight *inflight = NULL;
	Commpb__OpInFlight **ifp = NULL;
	int ninfl = 0, budget;
	char *backends[3] = { "host" };
	Commpb__PeerInfo pinfo[STATUS_MAX_PEERS], *peers[STATUS_MAX_PEERS];
	char pstate[STATUS_MAX_PEERS][192];
	char topo[160], nccl[sizeof srv.gpu_info + 32], net[256];
	size_t n = 0, i = 0;
	struct job *j;
	int rc;

	conn_is_admin(c);
	TAILQ_FOREACH(j, &srv.jobs, link)
		n += wanted(j, name, c);
	budget = *name ? STATUS_INFLIGHT_ONE : n <= 50 ? STATUS_INFLIGHT_ALL : 0;
	if (n > STATUS_MAX_JOBS) {
		sr.jobs_omitted = (uint32_t)(n - STATUS_MAX_JOBS);
		n = STATUS_MAX_JOBS;
	}
	if (n) {
		infos = calloc(n, sizeof *infos);
		jobs = calloc(n, sizeof *jobs);
		gpul = calloc(n, sizeof *gpul);
		inflight = budget ? calloc((size_t)budget, sizeof *inflight) : NULL;
		ifp = budget ? calloc((size_t)budget, sizeof *ifp) : NULL;
		if (!infos || !jobs || !gpul || (budget && (!inflight || !ifp))) {
			free(infos);
			free(jobs);
			free(gpul);
			free(inflight);
			free(ifp);
			conn_fail(c, COMM_ERR_NO_MEMORY, "status: out of memory");
			return -1;
		}
	}
	TAILQ_FOREACH(j, &srv.jobs, link) {
		Commpb__JobInfo *ji;
		uint64_t pending = 0;

		if (i == n)
			break;
		if (!wanted(j, name, c))
			continue;
		ji = &infos[i];
		commpb__job_info__init(ji);
		for (int r = 0; r < j->world; r++)
			pending += j->nposted[r];
		ji->name = j->name;
		ji->world_size = j->world;
		ji->joined = j->joined;
		ji->state = (char *)job_state_name(j->state);
		ji->ops_completed = j->ops_completed;
		ji->bytes_moved = j->bytes_moved;
		ji->errors = j->errors;
		ji->uid = j->uid;
		ji->ops_pending = pending;
		ji->mem_registered = j->mem_bytes + j->dev_bytes;
		ji->nodes = j->dist ? j->dist->nnodes : 1;
		ji->root = j->dist ? j->dist->root : (char *)"";
		gpu_job_line(j, gpul[i], sizeof gpul[i]);
		ji->gpu = gpul[i];
		if (budget > ninfl) {
			int room = budget - ninfl, got;

			if (!*name && room > STATUS_INFLIGHT_PER_JOB)
				room = STATUS_INFLIGHT_PER_JOB;
			got = engine_inflight(j, inflight + ninfl, room, &ji->inflight_omitted);
			for (int k = 0; k < got; k++)
				ifp[ninfl + k] = &inflight[ninfl + k].pb;
			ji->inflight = ifp + ninfl;
			ji->n_inflight = (size_t)got;
			ninfl += got;
		} else {
			ji->inflight_omitted = (uint32_t)pending;
		}
		jobs[i++] = ji;
	}
	sr.version = COMMD_VERSION;
	sr.pid = getpid();
	sr.uptime_ms = now_ms() - srv.start_ms;
	sr.socket = (char *)srv.socket_path;
	sr.n_backends = 1;
	if (srv.gpu_state == GPU_READY)
		backends[sr.n_backends++] = "gpu";
	if (net_available())
		backends[sr.n_backends++] = "net";
	sr.backends = backends;
	for (int k = 0; k < STATUS_MAX_PEERS; k++)
		peers[k] = &pinfo[k];
	/* the other daemons and their addresses are for admins */
	sr.n_peers = c->admin ? (size_t)peer_status(peers, STATUS_MAX_PEERS, pstate) : 0;
	sr.own_jobs_only = !c->admin;
	sr.peers = peers;
	sr.peer_listen = (char *)peer_listen_addr();
	sr.node = (char *)peer_node_name();
	sr.gpu = srv.gpu_info;
	gpu_nccl_line(nccl, sizeof nccl);
	sr.nccl = nccl;
	net_status(net, sizeof net);
	sr.net = net;
	topo_summary(&node_topo, topo, sizeof topo);
	sr.topology = topo;
	sr.n_jobs = n;
	sr.jobs = jobs;
	sr.connections = srv.nconns;
	sr.ops_completed = srv.ops_completed;
	sr.bytes_moved = srv.bytes_moved;
	sr.errors = srv.errors;
	sr.worker_threads = (uint32_t)be_host_threads();
	reply.id = env->id;
	reply.body_case = COMMPB__ENVELOPE__BODY_STATUS_REPLY;
	reply.status_reply = &sr;
	/* long names and roots can still overflow a frame: ops in flight go first, then jobs */
	for (size_t k = sr.n_jobs; k-- > 0 &&
	     commpb__envelope__get_packed_size(&reply) > FRAME_MAX - 64;) {
		sr.jobs[k]->inflight_omitted += (uint32_t)sr.jobs[k]->n_inflight;
		sr.jobs[k]->n_inflight = 0;
	}
	while (sr.n_jobs && commpb__envelope__get_packed_size(&reply) > FRAME_MAX - 64) {
		sr.n_jobs--;
		sr.jobs_omitted++;
	}
	rc = conn_send(c, &reply);
	free(infos);
	free(jobs);
	free(gpul);
	free(inflight);
	free(ifp);
	return rc;
}
