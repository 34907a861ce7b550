/* req-topo.c: what commctl topo shows: the devices and their relation matrix. */
#include <stdlib.h>

#include "commd.h"

int req_topo_exec(struct conn *c, const Commpb__Envelope *env, int *fds, int nfds)
{
	const struct topo *t = &node_topo;
	Commpb__Envelope reply = COMMPB__ENVELOPE__INIT;
	Commpb__TopoReply tr = COMMPB__TOPO_REPLY__INIT;
	int n = t->ngpus + t->nnics, rc = -1;
	Commpb__TopoDevice *devs = calloc((size_t)n + 1, sizeof *devs);
	Commpb__TopoDevice **pdevs = calloc((size_t)n + 1, sizeof *pdevs);
	Commpb__TopoNuma *numa = calloc((size_t)t->nnuma + 1, sizeof *numa);
	Commpb__TopoNuma **pnuma = calloc((size_t)t->nnuma + 1, sizeof *pnuma);
	char **matrix = calloc((size_t)n * n + 1, sizeof *matrix);
	char (*cells)[16] = calloc((size_t)n * n + 1, sizeof *cells);
	char (*paths)[TOPO_PATH_MAX * TOPO_BUS_LEN] = calloc((size_t)n + 1, sizeof *paths);

	if (!devs || !pdevs || !numa || !pnuma || !matrix || !cells || !paths) {
		conn_fail(c, COMM_ERR_NO_MEMORY, "topo: out of memory");
		goto out;
	}
	for (int i = 0; i < n; i++) {
		const struct topo_dev *d = topo_dev(t, i);
		const char *cpus = topo_numa_cpus(t, d->numa);
		char *p = paths[i];

		commpb__topo_device__init(&devs[i]);
		devs[i].kind = d->kind == TOPO_GPU ? "gpu" : "nic";
		devs[i].index = d->index;
		devs[i].name = (char *)d->name;
		devs[i].bus = (char *)d->bus;
		devs[i].numa = d->numa;
		devs[i].cpus = cpus ? (char *)cpus : "";
		devs[i].memory = d->memory;
		for (int k = 0; k < d->npath; k++)
			p += sprintf(p, "%s%s", k ? "/" : "", d->path[k]);
		devs[i].pcipath = paths[i];
		pdevs[i] = &devs[i];
		for (int j = 0; j < n; j++) {
			char *cell = cells[i * n + j];
			const char *r = topo_relation(t, i, j, cell, sizeof cells[0]);

			if (r != cell)
				snprintf(cell, sizeof cells[0], "%s", r);
			matrix[i * n + j] = cell;
		}
	}
	for (int i = 0; i < t->nnuma; i++) {
		commpb__topo_numa__init(&numa[i]);
		numa[i].id = t->numa[i].id;
		numa[i].cpus = (char *)t->numa[i].cpus;
		pnuma[i] = &numa[i];
	}
	tr.source = (char *)t->source;
	tr.gpu_note = (char *)t->gpu_note;
	tr.n_devices = (size_t)n;
	tr.devices = pdevs;
	tr.n_matrix = (size_t)n * n;
	tr.matrix = matrix;
	tr.n_numa = (size_t)t->nnuma;
	tr.numa = pnuma;
	reply.id = env->id;
	reply.body_case = COMMPB__ENVELOPE__BODY_TOPO_REPLY;
	reply.topo_reply = &tr;
	rc = conn_send(c, &reply);
out:
	free(paths);
	free(cells);
	free(matrix);
	free(pnuma);
	free(numa);
	free(pdevs);
	free(devs);
	return rc;
}
