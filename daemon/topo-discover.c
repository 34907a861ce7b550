/*
 * topo-discover.c: finds the node's GPUs (CUDA runtime; NVLink through NVML
 * opened with dlopen), NICs (sysfs), NUMA nodes, CPU sets and PCIe paths
 * (hwloc, or sysfs without it).
 */
#include <config.h>
#include <ctype.h>
#include <dirent.h>
#include <dlfcn.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "commd.h"
#include "log.h"

#ifdef HAVE_HWLOC
#include <hwloc.h>
#endif
#ifdef HAVE_CUDA
#include <cuda_runtime.h>
#endif

static int is_bus(const char *s)
{
	unsigned d, b, v, f;
	char end;

	return strlen(s) == 12 && sscanf(s, "%4x:%2x:%2x.%1x%c", &d, &b, &v, &f, &end) == 4;
}

/* Read a small sysfs file into buf without its newline; -1 when absent. */
static int read_line(const char *path, char *buf, size_t len)
{
	FILE *f = fopen(path, "r");
	int rc = -1;

	if (!f)
		return -1;
	if (fgets(buf, (int)len, f)) {
		buf[strcspn(buf, "\n")] = '\0';
		rc = 0;
	}
	fclose(f);
	return rc;
}

/*
 * From the device's sysfs path (/sys/devices/pci0000:15/0000:15:01.0/.../
 * 0000:18:00.0[/virtio2]): its bus id, host bridge and the bridges above it.
 */
static int sysfs_pci(const char *syspath, struct topo_dev *d)
{
	char real[PATH_MAX], *save, *e, comps[TOPO_PATH_MAX + 1][TOPO_BUS_LEN];
	int n = 0;

	if (!realpath(syspath, real))
		return -1;
	d->npath = 0;
	for (e = strtok_r(real, "/", &save); e; e = strtok_r(NULL, "/", &save)) {
		if (strncmp(e, "pci", 3) == 0 && strlen(e) == 10 && e[7] == ':') {
			snprintf(comps[0], TOPO_BUS_LEN, "%s", e + 3);
			n = 1;
		} else if (n && is_bus(e) && n <= TOPO_PATH_MAX) {
			snprintf(comps[n++], TOPO_BUS_LEN, "%s", e);
		}
	}
	if (n < 2)
		return -1;
	snprintf(d->bus, sizeof d->bus, "%s", comps[n - 1]);
	for (int i = 0; i < n - 1; i++)
		strcpy(d->path[d->npath++], comps[i]);
	return 0;
}

/* The device's NUMA node from sysfs; -1 when the kernel does not say. */
static int sysfs_numa(const char *bus)
{
	char path[128], buf[32];

	snprintf(path, sizeof path, "/sys/bus/pci/devices/%s/numa_node", bus);
	return read_line(path, buf, sizeof buf) == 0 ? atoi(buf) : -1;
}

#ifdef HAVE_HWLOC
static hwloc_topology_t hw;

static void hwloc_numa(struct topo *t)
{
	hwloc_obj_t o = NULL;

	while ((o = hwloc_get_next_obj_by_type(hw, HWLOC_OBJ_NUMANODE, o)) &&
	       t->nnuma < TOPO_MAX_NUMA) {
		t->numa[t->nnuma].id = (int)o->os_index;
		hwloc_bitmap_list_snprintf(t->numa[t->nnuma].cpus, sizeof t->numa[0].cpus,
					   o->cpuset);
		t->nnuma++;
	}
}

/* NUMA node and PCIe path of d (bus id known) from hwloc's tree. */
static int hwloc_pci(struct topo *t, struct topo_dev *d)
{
	hwloc_obj_t o = hwloc_get_pcidev_by_busidstring(hw, d->bus), p, anc;
	char rev[TOPO_PATH_MAX][TOPO_BUS_LEN];
	int n = 0;

	if (!o)
		return -1;
	for (p = o->parent; p && p->type == HWLOC_OBJ_BRIDGE && n < TOPO_PATH_MAX; p = p->parent) {
		struct hwloc_bridge_attr_s *b = &p->attr->bridge;

		if (b->upstream_type == HWLOC_OBJ_BRIDGE_HOST)
			snprintf(rev[n++], TOPO_BUS_LEN, "%04x:%02x",
				 (uint16_t)b->downstream.pci.domain,
				 (uint8_t)b->downstream.pci.secondary_bus);
		else
			snprintf(rev[n++], TOPO_BUS_LEN, "%04x:%02x:%02x.%01x",
				 (uint16_t)b->upstream.pci.domain, (uint8_t)b->upstream.pci.bus,
				 (uint8_t)b->upstream.pci.dev, (uint8_t)(b->upstream.pci.func & 7));
	}
	if (!n)
		return -1;
	d->npath = 0;
	while (n)
		strcpy(d->path[d->npath++], rev[--n]);
	anc = hwloc_get_non_io_ancestor_obj(hw, o);
	d->numa = -1;
	if (anc && anc->nodeset && hwloc_bitmap_weight(anc->nodeset) == 1)
		d->numa = hwloc_bitmap_first(anc->nodeset);
	return 0;
}
#endif

static void sysfs_numa_nodes(struct topo *t)
{
	DIR *dir = opendir("/sys/devices/system/node");
	struct dirent *e;
	char path[300];

	while (dir && (e = readdir(dir)) && t->nnuma < TOPO_MAX_NUMA) {
		struct topo_numa *n = &t->numa[t->nnuma];

		if (strncmp(e->d_name, "node", 4) != 0 || !isdigit((unsigned char)e->d_name[4]))
			continue;
		snprintf(path, sizeof path, "/sys/devices/system/node/%s/cpulist", e->d_name);
		if (read_line(path, n->cpus, sizeof n->cpus) < 0 || !n->cpus[0])
			continue;
		n->id = atoi(e->d_name + 4);
		t->nnuma++;
	}
	if (dir)
		closedir(dir);
	if (!t->nnuma && read_line("/sys/devices/system/cpu/online", t->numa[0].cpus,
				   sizeof t->numa[0].cpus) == 0)
		t->nnuma = 1;
	/* readdir order is arbitrary: sort by id */
	for (int i = 1; i < t->nnuma; i++)
		for (int j = i; j > 0 && t->numa[j - 1].id > t->numa[j].id; j--) {
			struct topo_numa tmp = t->numa[j];

			t->numa[j] = t->numa[j - 1];
			t->numa[j - 1] = tmp;
		}
}

/* Bus id, path and NUMA node of d whose sysfs device link is syspath. */
static int locate(struct topo *t, struct topo_dev *d, const char *syspath)
{
	if (syspath && sysfs_pci(syspath, d) < 0)
		return -1;
	d->numa = sysfs_numa(d->bus);
#ifdef HAVE_HWLOC
	if (hw)
		hwloc_pci(t, d);
#endif
	if (d->numa < 0 && t->nnuma == 1)
		d->numa = t->numa[0].id;
	return 0;
}

static int nic_known(const struct topo *t, const char *bus)
{
	for (int i = 0; i < t->nnics; i++)
		if (strcmp(t->nic[i].bus, bus) == 0)
			return 1;
	return 0;
}

/* InfiniBand devices first (mlx5_N), then physical network interfaces. */
static void find_nics(struct topo *t, const char *cls)
{
	struct dirent **names;
	char path[PATH_MAX];
	int n = scandir(cls, &names, NULL, alphasort), dropped = 0;

	for (int i = 0; i < n; i++) {
		struct topo_dev d = { .kind = TOPO_NIC };

		if (names[i]->d_name[0] != '.' && t->nnics == TOPO_MAX_NICS)
			dropped++;
		if (names[i]->d_name[0] != '.' && t->nnics < TOPO_MAX_NICS &&
		    strlen(names[i]->d_name) < sizeof d.name) {
			snprintf(path, sizeof path, "%s/%s/device", cls, names[i]->d_name);
			strcpy(d.name, names[i]->d_name);
			if (locate(t, &d, path) == 0 && !nic_known(t, d.bus)) {
				d.index = t->nnics;
				t->nic[t->nnics++] = d;
			}
		}
		free(names[i]);
	}
	if (n > 0)
		free(names);
	if (dropped)
		log_warn("topology: %d NICs is the most shown; %d more entries of %s left out",
			 TOPO_MAX_NICS, dropped, cls);
}

#ifdef HAVE_CUDA
#define NVLINK_MAX_LINKS 18 /* links per GPU (Hopper); NVML says which are up */

/* NVML, loaded at run time: only the few calls and the struct it needs. */
typedef struct {
	char legacy[16];
	unsigned domain, bus, device, pci_device_id, pci_subsystem_id;
	char bus_id[32];
} nvml_pci_t;

static void find_nvlinks(struct topo *t)
{
	int (*init)(void), (*shutdown)(void), (*by_bus)(const char *, void **);
	int (*state)(void *, unsigned, int *), (*remote)(void *, unsigned, nvml_pci_t *);
	void *lib = dlopen("libnvidia-ml.so.1", RTLD_NOW | RTLD_LOCAL);

	if (!lib)
		return;
	*(void **)&init = dlsym(lib, "nvmlInit_v2");
	*(void **)&shutdown = dlsym(lib, "nvmlShutdown");
	*(void **)&by_bus = dlsym(lib, "nvmlDeviceGetHandleByPciBusId_v2");
	*(void **)&state = dlsym(lib, "nvmlDeviceGetNvLinkState");
	*(void **)&remote = dlsym(lib, "nvmlDeviceGetNvLinkRemotePciInfo_v2");
	int to_switch[TOPO_MAX_GPUS] = { 0 };

	if (!init || !shutdown || !by_bus || !state || !remote || init() != 0)
		goto out;
	for (int g = 0; g < t->ngpus; g++) {
		void *dev;

		if (by_bus(t->gpu[g].bus, &dev) != 0)
			continue;
		for (unsigned l = 0; l < NVLINK_MAX_LINKS; l++) {
			nvml_pci_t pci;
			char bus[TOPO_BUS_LEN];
			int active = 0, peer = 0;

			if (state(dev, l, &active) != 0 || !active || remote(dev, l, &pci) != 0)
				continue;
			snprintf(bus, sizeof bus, "%04x:%02x:%02x.0", (uint16_t)pci.domain,
				 (uint8_t)pci.bus, (uint8_t)pci.device);
			for (int h = 0; h < t->ngpus; h++) {
				if (h != g && strcmp(t->gpu[h].bus, bus) == 0) {
					t->nvlink[g][h]++;
					peer = 1;
				}
			}
			/* a link to no GPU of ours ends at an NVSwitch */
			if (!peer)
				to_switch[g]++;
		}
	}
	/*
	 * GPUs on NVSwitches reach each other over all their switch links, as
	 * nvidia-smi counts it (NV18 between every pair of an HGX H100).
	 */
	for (int g = 0; g < t->ngpus; g++)
		for (int h = 0; h < t->ngpus; h++)
			if (h != g && to_switch[g] && to_switch[h])
				t->nvlink[g][h] += to_switch[g] < to_switch[h] ? to_switch[g]
									 : to_switch[h];
	shutdown();
out:
	dlclose(lib);
}

static void find_gpus(struct topo *t)
{
	int n = 0;
	cudaError_t e = cudaGetDeviceCount(&n);

	if (e != cudaSuccess) {
		snprintf(t->gpu_note, sizeof t->gpu_note, "cuda: %s", cudaGetErrorString(e));
		return;
	}
	if (n > TOPO_MAX_GPUS)
		log_warn("topology: %d GPUs, only the first %d are shown", n, TOPO_MAX_GPUS);
	for (int i = 0; i < n && t->ngpus < TOPO_MAX_GPUS; i++) {
		struct topo_dev *d = &t->gpu[t->ngpus];
		struct cudaDeviceProp p;
		char bus[32];

		memset(d, 0, sizeof *d);
		d->kind = TOPO_GPU;
		d->index = t->ngpus;
		if (cudaGetDeviceProperties(&p, i) != cudaSuccess ||
		    cudaDeviceGetPCIBusId(bus, sizeof bus, i) != cudaSuccess)
			continue;
		for (char *c = bus; *c; c++)
			*c = (char)tolower((unsigned char)*c);
		if (strlen(bus) != TOPO_BUS_LEN - 1)
			continue;
		memcpy(d->bus, bus, TOPO_BUS_LEN);
		snprintf(d->name, sizeof d->name, "%.127s", p.name);
		d->memory = p.totalGlobalMem;
		snprintf(bus, sizeof bus, "/sys/bus/pci/devices/%s", d->bus);
		if (locate(t, d, bus) < 0)
			continue;
		t->ngpus++;
	}
	if (!t->ngpus)
		snprintf(t->gpu_note, sizeof t->gpu_note, "cuda: no device");
	find_nvlinks(t);
}
#else
static void find_gpus(struct topo *t)
{
	snprintf(t->gpu_note, sizeof t->gpu_note, "built without CUDA");
}
#endif

int topo_worker_cpus(int *cpus, int max)
{
	int n = 0;
#ifdef HAVE_HWLOC
	hwloc_topology_t cpu_hw;
	int ncores;

	if (hwloc_topology_init(&cpu_hw) < 0)
		return 0;
	hwloc_topology_set_components(cpu_hw, HWLOC_TOPOLOGY_COMPONENTS_FLAG_BLACKLIST, "pci");
	/* cores in hwloc's order walk the machine package by package, NUMA node by node */
	if (hwloc_topology_load(cpu_hw) == 0) {
		ncores = hwloc_get_nbobjs_by_type(cpu_hw, HWLOC_OBJ_CORE);
		for (int i = 0; i < ncores && n < max; i++) {
			hwloc_obj_t core = hwloc_get_obj_by_type(cpu_hw, HWLOC_OBJ_CORE, i);
			int pu = core && core->cpuset ? hwloc_bitmap_first(core->cpuset) : -1;

			if (pu >= 0)
				cpus[n++] = pu;
		}
	}
	hwloc_topology_destroy(cpu_hw);
#else
	(void)cpus;
	(void)max;
#endif
	return n;
}

void topo_discover(struct topo *t)
{
	memset(t, 0, sizeof *t);
	snprintf(t->source, sizeof t->source, "discovered");
#ifdef HAVE_HWLOC
	if (hwloc_topology_init(&hw) == 0) {
		/*
		 * PCI from sysfs (hwloc's linux component), not through the
		 * libpciaccess plugin, which leaks at every load.
		 */
		hwloc_topology_set_components(hw, HWLOC_TOPOLOGY_COMPONENTS_FLAG_BLACKLIST, "pci");
		hwloc_topology_set_type_filter(hw, HWLOC_OBJ_BRIDGE, HWLOC_TYPE_FILTER_KEEP_ALL);
		hwloc_topology_set_type_filter(hw, HWLOC_OBJ_PCI_DEVICE, HWLOC_TYPE_FILTER_KEEP_ALL);
		if (hwloc_topology_load(hw) == 0) {
			hwloc_numa(t);
		} else {
			hwloc_topology_destroy(hw);
			hw = NULL;
		}
	} else {
		hw = NULL;
	}
#endif
	if (!t->nnuma)
		sysfs_numa_nodes(t);
	find_gpus(t);
	find_nics(t, "/sys/class/infiniband");
	find_nics(t, "/sys/class/net");
#ifdef HAVE_HWLOC
	if (hw)
		hwloc_topology_destroy(hw);
	hw = NULL;
#endif
}
