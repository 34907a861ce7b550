/* ctl-topo.c: `commctl topo`: the node's topology matrix as nvidia-smi topo -m prints it. */
#include <inttypes.h>
#include <stdio.h>

#include "ctl.h"

static const char legend[] =
	"Legend:\n"
	"\n"
	"  X    = Self\n"
	"  SYS  = Connection traversing PCIe as well as the SMP interconnect between NUMA nodes "
	"(e.g., QPI/UPI)\n"
	"  NODE = Connection traversing PCIe as well as the interconnect between PCIe Host Bridges "
	"within a NUMA node\n"
	"  PHB  = Connection traversing PCIe as well as a PCIe Host Bridge (typically the CPU)\n"
	"  PXB  = Connection traversing multiple PCIe bridges (without traversing the PCIe Host "
	"Bridge)\n"
	"  PIX  = Connection traversing at most a single PCIe bridge\n"
	"  NV#  = Connection traversing a bonded set of # NVLinks\n";

static void label(const Commpb__TopoDevice *d)
{
	printf("%s%d", d->kind[0] == 'g' ? "GPU" : "NIC", d->index);
}

static void print_text(const Commpb__TopoReply *t)
{
	size_t n = t->n_devices;

	if (t->gpu_note[0])
		printf("No GPU found (%s).\n\n", t->gpu_note);
	for (size_t j = 0; j < n; j++) {
		printf("\t");
		label(t->devices[j]);
	}
	printf("\tCPU Affinity\tNUMA Affinity\tGPU NUMA ID\n");
	for (size_t i = 0; i < n; i++) {
		const Commpb__TopoDevice *d = t->devices[i];

		label(d);
		for (size_t j = 0; j < n; j++) {
			const char *r = t->matrix[i * n + j];

			printf("\t%s", r[0] == 'X' && !r[1] ? " X " : r);
		}
		if (d->kind[0] == 'g') {
			if (d->numa >= 0)
				printf("\t%s\t%d\t\tN/A\n", d->cpus[0] ? d->cpus : "N/A", d->numa);
			else
				printf("\tN/A\tN/A\t\tN/A\n");
		} else {
			printf("\t\t\t\t\n");
		}
	}
	printf("\n%s", legend);
	if (t->n_devices > 0 && t->devices[n - 1]->kind[0] == 'n') {
		printf("\nNIC Legend:\n\n");
		for (size_t i = 0; i < n; i++)
			if (t->devices[i]->kind[0] == 'n')
				printf("  NIC%d: %s\n", t->devices[i]->index, t->devices[i]->name);
	}
	printf("\nNUMA nodes:\n\n");
	for (size_t i = 0; i < t->n_numa; i++)
		printf("  node %d: CPUs %s\n", t->numa[i]->id, t->numa[i]->cpus);
	printf("\nTopology source: %s\n", t->source);
}

static void print_json(const Commpb__TopoReply *t)
{
	size_t n = t->n_devices;

	printf("{\"source\": ");
	ctl_json_str(t->source);
	printf(", \"gpu_note\": ");
	ctl_json_str(t->gpu_note);
	printf(", \"numa\": [");
	for (size_t i = 0; i < t->n_numa; i++) {
		printf("%s{\"id\": %d, \"cpus\": ", i ? ", " : "", t->numa[i]->id);
		ctl_json_str(t->numa[i]->cpus);
		printf("}");
	}
	printf("], \"devices\": [");
	for (size_t i = 0; i < n; i++) {
		const Commpb__TopoDevice *d = t->devices[i];

		printf("%s{\"label\": \"", i ? ", " : "");
		label(d);
		printf("\", \"kind\": ");
		ctl_json_str(d->kind);
		printf(", \"index\": %d, \"name\": ", d->index);
		ctl_json_str(d->name);
		printf(", \"bus\": ");
		ctl_json_str(d->bus);
		printf(", \"numa\": %d, \"cpus\": ", d->numa);
		ctl_json_str(d->cpus);
		printf(", \"memory\": %" PRIu64 ", \"pcipath\": ", d->memory);
		ctl_json_str(d->pcipath);
		printf(", \"links\": [");
		for (size_t j = 0; j < n; j++) {
			printf("%s", j ? ", " : "");
			ctl_json_str(t->matrix[i * n + j]);
		}
		printf("]}");
	}
	printf("]}\n");
}

int ctl_topo(struct ctl *ctl, int argc, char **argv)
{
	Commpb__Envelope env = COMMPB__ENVELOPE__INIT, *reply;
	Commpb__TopoRequest req = COMMPB__TOPO_REQUEST__INIT;
	const Commpb__TopoReply *t;

	env.body_case = COMMPB__ENVELOPE__BODY_TOPO_REQUEST;
	env.topo_request = &req;
	reply = ctl_call(ctl, &env);
	if (!reply)
		return 1;
	if (reply->body_case != COMMPB__ENVELOPE__BODY_TOPO_REPLY ||
	    reply->topo_reply->n_matrix !=
		    reply->topo_reply->n_devices * reply->topo_reply->n_devices) {
		fprintf(stderr, "commctl: unexpected answer to topo\n");
		commpb__envelope__free_unpacked(reply, NULL);
		return 1;
	}
	t = reply->topo_reply;
	if (ctl->json)
		print_json(t);
	else
		print_text(t);
	commpb__envelope__free_unpacked(reply, NULL);
	return 0;
}
