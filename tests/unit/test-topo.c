/*
 * test-topo.c: topo_relation and topo_ring_order on the fixtures of
 * tests/fixtures: every relation of the legend, rings that keep NVLink and
 * PCIe neighbours adjacent, bad GPU lists refused, and topo_dump's output
 * loaded back.
 */
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "check.h"
#include "../../daemon/topo.c"

#ifndef TOPO_FIXTURES
#error "build with -DTOPO_FIXTURES='\"DIR\"'"
#endif

static void load(struct topo *t, const char *name)
{
	char path[512], err[512];

	snprintf(path, sizeof path, "%s/%s.topo", TOPO_FIXTURES, name);
	REQUIRE(topo_load(t, path, err, sizeof err) == 0, "%s", err);
}

/* Device a and b (GPUs first, then NICs) are related as want, both ways. */
static void relation(const struct topo *t, const char *name, int a, int b, const char *want)
{
	char buf[16];
	const char *r = topo_relation(t, a, b, buf, sizeof buf);

	CHECK(strcmp(r, want) == 0, "%s: devices %d and %d are %s, want %s", name, a, b, r, want);
	r = topo_relation(t, b, a, buf, sizeof buf);
	CHECK(strcmp(r, want) == 0, "%s: devices %d and %d are %s, want %s", name, b, a, r, want);
}

/* The ring of gpus[n] holds each of them once and equals want. */
static void ring(const struct topo *t, const char *name, const int *gpus, int n, const int *want)
{
	int order[TOPO_MAX_GPUS], seen[TOPO_MAX_GPUS] = { 0 };

	REQUIRE(topo_ring_order(t, gpus, n, order) == 0, "%s: ring of %d refused", name, n);
	for (int i = 0; i < n; i++) {
		int in = 0;

		for (int j = 0; j < n; j++)
			in |= gpus[j] == order[i];
		CHECK(in && !seen[order[i]]++, "%s: ring place %d: GPU %d is %s", name, i,
		      order[i], in ? "there twice" : "not asked for");
	}
	for (int i = 0; i < n; i++)
		if (order[i] != want[i]) {
			CHECK(order[i] == want[i], "%s: ring place %d is GPU %d, want GPU %d", name,
			      i, order[i], want[i]);
			break;
		}
}

/* Are GPUs a and b next to each other in the ring order[n]? */
static int adjacent(const int *order, int n, int a, int b)
{
	for (int i = 0; i < n; i++)
		if ((order[i] == a && order[(i + 1) % n] == b) ||
		    (order[i] == b && order[(i + 1) % n] == a))
			return 1;
	return 0;
}

static void h100x8(void)
{
	static struct topo t;
	const int all[] = { 7, 6, 5, 4, 3, 2, 1, 0 }, some[] = { 6, 1, 4, 3 };
	int order[8], sys = 0;

	load(&t, "h100x8");
	relation(&t, "h100x8", 0, 0, "X");
	relation(&t, "h100x8", 0, 7, "NV18");
	relation(&t, "h100x8", 0, 8, "PIX");   /* GPU0, NIC0: one switch */
	relation(&t, "h100x8", 11, 12, "PIX"); /* NIC3, NIC4: two ports of one card */
	relation(&t, "h100x8", 0, 9, "NODE");  /* GPU0, NIC1: other host bridge */
	relation(&t, "h100x8", 0, 14, "SYS");  /* GPU0, NIC6: other socket */
	relation(&t, "h100x8", 8, 17, "SYS");

	/* NV18 everywhere: the sockets decide; the ring crosses between them twice */
	ring(&t, "h100x8", all, 8, (const int[]){ 0, 1, 2, 3, 4, 5, 6, 7 });
	REQUIRE(topo_ring_order(&t, all, 8, order) == 0, "h100x8: ring refused");
	for (int i = 0; i < 8; i++)
		sys += pcie_relation(&t.gpu[order[i]], &t.gpu[order[(i + 1) % 8]]) == PCIE_SYS;
	CHECK(sys == 2, "h100x8: the ring crosses sockets %d times", sys);
	ring(&t, "h100x8 subset", some, 4, (const int[]){ 1, 3, 4, 6 });
}

static void pcie_switches(void)
{
	static struct topo t;
	const int all[] = { 0, 1, 2, 3 };
	int order[4];

	load(&t, "pcie-switches");
	relation(&t, "pcie-switches", 2, 2, "X");
	relation(&t, "pcie-switches", 0, 2, "PIX"); /* switch A */
	relation(&t, "pcie-switches", 1, 3, "PIX"); /* switch C */
	relation(&t, "pcie-switches", 0, 1, "PHB");
	relation(&t, "pcie-switches", 2, 3, "PHB");
	relation(&t, "pcie-switches", 0, 4, "PXB"); /* GPU0, NIC0: switches A and B */
	relation(&t, "pcie-switches", 2, 4, "PXB");
	relation(&t, "pcie-switches", 1, 4, "PHB");
	relation(&t, "pcie-switches", 3, 5, "PHB"); /* NIC1 on its own root port */
	relation(&t, "pcie-switches", 4, 5, "PHB");

	/* the pairs on one switch stay together */
	ring(&t, "pcie-switches", all, 4, (const int[]){ 0, 2, 1, 3 });
	REQUIRE(topo_ring_order(&t, all, 4, order) == 0, "pcie-switches: ring refused");
	CHECK(adjacent(order, 4, 0, 2) && adjacent(order, 4, 1, 3),
	      "pcie-switches: switch pairs apart: %d %d %d %d", order[0], order[1], order[2],
	      order[3]);

	/* NVLink bridges across the switches come before them: 0-1 and 2-3 */
	t.nvlink[0][1] = t.nvlink[1][0] = 4;
	t.nvlink[2][3] = t.nvlink[3][2] = 4;
	relation(&t, "pcie-switches + nvlink", 0, 1, "NV4");
	ring(&t, "pcie-switches + nvlink", all, 4, (const int[]){ 0, 1, 3, 2 });

	/*
	 * Greedy goes 0 -> 3 (NV8) -> 1 (NV4, and 1-3 is PIX) -> 2, closing
	 * through two links without NVLink; 2-opt makes it 0 3 2 1 (NV 8+4+4).
	 */
	memset(t.nvlink, 0, sizeof t.nvlink);
	t.nvlink[0][3] = t.nvlink[3][0] = 8;
	t.nvlink[0][1] = t.nvlink[1][0] = 4;
	t.nvlink[1][3] = t.nvlink[3][1] = 4;
	t.nvlink[2][3] = t.nvlink[3][2] = 4;
	ring(&t, "pcie-switches 2-opt", all, 4, (const int[]){ 0, 3, 2, 1 });
}

static void nvlink_pair(void)
{
	static struct topo t;

	load(&t, "nvlink-pair");
	relation(&t, "nvlink-pair", 1, 1, "X");
	relation(&t, "nvlink-pair", 0, 1, "NV4");
	relation(&t, "nvlink-pair", 0, 2, "NODE"); /* GPU0, NIC0: other host bridge */
	relation(&t, "nvlink-pair", 1, 2, "PHB");  /* GPU1, NIC0: two root ports */
	ring(&t, "nvlink-pair", (const int[]){ 1, 0 }, 2, (const int[]){ 0, 1 });
	ring(&t, "nvlink-pair one", (const int[]){ 1 }, 1, (const int[]){ 1 });
}

static void refused(void)
{
	static struct topo t;
	int order[4];

	load(&t, "pcie-switches");
	CHECK(topo_ring_order(&t, (const int[]){ 0 }, 0, order) < 0, "an empty ring accepted");
	CHECK(topo_ring_order(&t, (const int[]){ 0, 4 }, 2, order) < 0, "GPU 4 of 4 accepted");
	CHECK(topo_ring_order(&t, (const int[]){ 0, -1 }, 2, order) < 0, "GPU -1 accepted");
	CHECK(topo_ring_order(&t, (const int[]){ 1, 2, 1 }, 3, order) < 0,
	      "a repeated GPU accepted");
}

/*
 * topo_dump's output loads back as it was, a device name with a '"' in it
 * too (a NIC's may have one: Linux allows it), which is dumped as '\''.
 */
static void dump_loads(void)
{
	static struct topo t, back;
	char path[] = "/tmp/test-topo-XXXXXX", err[512];
	int fd = mkstemp(path);
	FILE *f;

	REQUIRE(fd >= 0 && (f = fdopen(fd, "w")), "mkstemp");
	load(&t, "pcie-switches");
	REQUIRE(t.nnics > 0 && t.ngpus > 0, "pcie-switches has no NIC or GPU");
	snprintf(t.nic[0].name, sizeof t.nic[0].name, "eth\"0");
	snprintf(t.gpu[0].name, sizeof t.gpu[0].name, "GPU \"A\"");
	topo_dump(&t, f);
	fclose(f);
	CHECK(topo_load(&back, path, err, sizeof err) == 0, "a dump with '\"' in names: %s", err);
	unlink(path);
	CHECK(back.nnics == t.nnics && back.ngpus == t.ngpus, "the dump loads %d GPUs and %d NICs",
	      back.ngpus, back.nnics);
	CHECK(strcmp(back.nic[0].name, "eth'0") == 0, "NIC 0 loads named %s", back.nic[0].name);
	CHECK(strcmp(back.gpu[0].name, "GPU 'A'") == 0, "GPU 0 loads named %s", back.gpu[0].name);
	for (int i = 1; i < t.ngpus; i++)
		CHECK(strcmp(back.gpu[i].name, t.gpu[i].name) == 0 &&
			      strcmp(back.gpu[i].bus, t.gpu[i].bus) == 0,
		      "GPU %d loads as %s %s", i, back.gpu[i].name, back.gpu[i].bus);
}

int main(void)
{
	dump_loads();
	h100x8();
	pcie_switches();
	nvlink_pair();
	refused();
	return CHECK_EXIT();
}
