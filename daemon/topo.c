/*
 * topo.c: the node's topology as commd knows it: the file format (load and
 * dump), the relation between two devices, as nvidia-smi topo -m has it, and
 * the order of GPUs in a ring.
 */
#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "commd.h"
#include "util.h"

struct topo node_topo;

#define MAX_TOKENS 32

const struct topo_dev *topo_dev(const struct topo *t, int i)
{
	if (i < 0 || i >= t->ngpus + t->nnics)
		return NULL;
	return i < t->ngpus ? &t->gpu[i] : &t->nic[i - t->ngpus];
}

const char *topo_numa_cpus(const struct topo *t, int numa)
{
	for (int i = 0; i < t->nnuma; i++)
		if (t->numa[i].id == numa)
			return t->numa[i].cpus;
	return NULL;
}

/* PCIe relations, nearest first */
enum { PCIE_PIX, PCIE_PXB, PCIE_PHB, PCIE_NODE, PCIE_SYS };
static const char *const pcie_name[] = { "PIX", "PXB", "PHB", "NODE", "SYS" };

/*
 * Through PCIe: different NUMA nodes: SYS; different host bridges: NODE;
 * meeting only at the host bridge: PHB; else below the bridge where the
 * paths part, at most two bridges in all (one switch): PIX, more: PXB.
 */
static int pcie_relation(const struct topo_dev *x, const struct topo_dev *y)
{
	int k = 0;

	if (x->numa != y->numa || x->numa < 0)
		return PCIE_SYS;
	if (!x->npath || !y->npath || strcmp(x->path[0], y->path[0]) != 0)
		return PCIE_NODE;
	while (k < x->npath && k < y->npath && strcmp(x->path[k], y->path[k]) == 0)
		k++;
	if (k == 1)
		return PCIE_PHB;
	return (x->npath - k) + (y->npath - k) <= 2 ? PCIE_PIX : PCIE_PXB;
}

const char *topo_relation(const struct topo *t, int a, int b, char *buf, size_t len)
{
	const struct topo_dev *x = topo_dev(t, a), *y = topo_dev(t, b);

	if (a == b)
		return "X";
	if (x->kind == TOPO_GPU && y->kind == TOPO_GPU && t->nvlink[x->index][y->index] > 0) {
		snprintf(buf, len, "NV%d", t->nvlink[x->index][y->index]);
		return buf;
	}
	return pcie_name[pcie_relation(x, y)];
}

/*
 * How good it is for GPUs a and b to be ring neighbours: the NVLinks between
 * them first, then PCIe nearness. A ring's sum of these compares the same
 * way, NVLinks first, as the PCIe part of a ring of 32 stays under 1024.
 */
static int ring_link(const struct topo *t, int a, int b)
{
	return t->nvlink[a][b] * 1024 + (PCIE_SYS - pcie_relation(&t->gpu[a], &t->gpu[b]));
}

static void reverse(int *order, int i, int j)
{
	for (; i < j; i++, j--) {
		int g = order[i];

		order[i] = order[j];
		order[j] = g;
	}
}

/*
 * A ring is better with more NVLinks along it, then with nearer PCIe links
 * (PIX, PXB, PHB, NODE, SYS). Greedy from the lowest GPU: each next GPU is
 * the best linked to the last of those left (ties: the lowest index). Then
 * 2-opt: reverse the stretch order[i..j] (i >= 1, so the ring still starts
 * at the lowest GPU) wherever that makes the ring strictly better, the first
 * such (i, j) in order, until none does.
 */
int topo_ring_order(const struct topo *t, const int *gpus, int n, int *order)
{
	int left[TOPO_MAX_GPUS] = { 0 };

	if (n < 1 || n > t->ngpus)
		return -1;
	for (int i = 0; i < n; i++) {
		if (gpus[i] < 0 || gpus[i] >= t->ngpus || left[gpus[i]])
			return -1;
		left[gpus[i]] = 1;
	}
	order[0] = -1;
	for (int g = 0; g < t->ngpus && order[0] < 0; g++)
		if (left[g])
			order[0] = g;
	left[order[0]] = 0;
	for (int i = 1; i < n; i++) {
		int best = -1;

		for (int g = 0; g < t->ngpus; g++)
			if (left[g] && (best < 0 || ring_link(t, order[i - 1], g) >
							    ring_link(t, order[i - 1], best)))
				best = g;
		order[i] = best;
		left[best] = 0;
	}
	for (int better = 1; better;) {
		better = 0;
		for (int i = 1; i < n - 1 && !better; i++)
			for (int j = i + 1; j < n && !better; j++) {
				/* the reversal swaps two links of the ring for two others */
				int a = order[i - 1], b = order[i], c = order[j], d = order[(j + 1) % n];

				if (ring_link(t, a, c) + ring_link(t, b, d) >
				    ring_link(t, a, b) + ring_link(t, c, d)) {
					reverse(order, i, j);
					better = 1;
				}
			}
	}
	return 0;
}

void topo_summary(const struct topo *t, char *buf, size_t len)
{
	int nvl = 0;

	for (int i = 0; i < t->ngpus; i++)
		for (int j = 0; j < t->ngpus; j++)
			nvl |= t->nvlink[i][j] > 0;
	snprintf(buf, len, "%d GPU%s, %d NIC%s, %d NUMA node%s, NVLink %s", t->ngpus,
		 t->ngpus == 1 ? "" : "s", t->nnics, t->nnics == 1 ? "" : "s", t->nnuma,
		 t->nnuma == 1 ? "" : "s", nvl ? "yes" : "no");
}

/* --- the file format ---------------------------------------------------------- */

static int is_hex(const char *s, int n)
{
	for (int i = 0; i < n; i++)
		if (!isxdigit((unsigned char)s[i]) || isupper((unsigned char)s[i]))
			return 0;
	return 1;
}

/* "dddd:bb:dd.f", lower-case hex */
static int valid_bus(const char *s)
{
	return strlen(s) == 12 && is_hex(s, 4) && s[4] == ':' && is_hex(s + 5, 2) &&
	       s[7] == ':' && is_hex(s + 8, 2) && s[10] == '.' && s[11] >= '0' && s[11] <= '7';
}

/* "dddd:bb", a host bridge */
static int valid_host(const char *s)
{
	return strlen(s) == 7 && is_hex(s, 4) && s[4] == ':' && is_hex(s + 5, 2);
}

/* a cpulist: "N" or "N-M", comma separated */
static int valid_cpulist(const char *s)
{
	if (!*s)
		return 0;
	for (; *s; s++)
		if (!isdigit((unsigned char)*s) && *s != ',' && *s != '-')
			return 0;
	return 1;
}

/* Split line into tokens; "quoted strings" are one token. -1 on a bad quote. */
static int tokenize(char *line, char **tok, int max)
{
	int n = 0;
	char *p = line;

	for (;;) {
		while (*p == ' ' || *p == '\t')
			p++;
		if (!*p || *p == '#')
			return n;
		if (n == max)
			return -1;
		if (*p == '"') {
			tok[n++] = ++p;
			while (*p && *p != '"')
				p++;
			if (*p != '"' || (p[1] && p[1] != ' ' && p[1] != '\t'))
				return -1;
			*p++ = '\0';
			continue;
		}
		tok[n++] = p;
		while (*p && *p != ' ' && *p != '\t')
			p++;
		if (*p)
			*p++ = '\0';
	}
}

static int parse_path(struct topo_dev *d, char *s, char *err, size_t errlen)
{
	char *save, *e;

	d->npath = 0;
	for (e = strtok_r(s, "/", &save); e; e = strtok_r(NULL, "/", &save)) {
		if (d->npath == TOPO_PATH_MAX) {
			snprintf(err, errlen, "pcipath longer than %d", TOPO_PATH_MAX);
			return -1;
		}
		if (d->npath == 0 ? !valid_host(e) : !valid_bus(e)) {
			snprintf(err, errlen, "pcipath: bad %s '%s'",
				 d->npath ? "bridge (want dddd:bb:dd.f)" : "host bridge (want dddd:bb)", e);
			return -1;
		}
		strcpy(d->path[d->npath++], e);
	}
	if (!d->npath) {
		snprintf(err, errlen, "pcipath is empty");
		return -1;
	}
	return 0;
}

/* gpu|nic INDEX name NAME bus BUS numa N [memory BYTES] pcipath PATH */
static int parse_dev(struct topo *t, char **tok, int n, char *err, size_t errlen)
{
	int gpu = strcmp(tok[0], "gpu") == 0;
	struct topo_dev *arr = gpu ? t->gpu : t->nic, *d;
	int *count = gpu ? &t->ngpus : &t->nnics, max = gpu ? TOPO_MAX_GPUS : TOPO_MAX_NICS;
	int seen_name = 0, seen_bus = 0, seen_numa = 0, seen_path = 0;
	long v;

	if (n < 2 || parse_long_in(tok[1], 0, max - 1, &v) < 0) {
		snprintf(err, errlen, "%s: index must be 0..%d", tok[0], max - 1);
		return -1;
	}
	if (v != *count) {
		snprintf(err, errlen, "%s %ld: %s", tok[0], v,
			 v < *count ? "duplicate index" : "indices must count up from 0");
		return -1;
	}
	d = &arr[*count];
	memset(d, 0, sizeof *d);
	d->kind = gpu ? TOPO_GPU : TOPO_NIC;
	d->index = (int)v;
	for (int i = 2; i < n; i += 2) {
		const char *k = tok[i], *val = i + 1 < n ? tok[i + 1] : NULL;

		if (!val) {
			snprintf(err, errlen, "%s %d: '%s' has no value", tok[0], d->index, k);
			return -1;
		}
		if (strcmp(k, "name") == 0 && !seen_name++) {
			if (!*val || strlen(val) >= sizeof d->name) {
				snprintf(err, errlen, "%s %d: bad name", tok[0], d->index);
				return -1;
			}
			strcpy(d->name, val);
		} else if (strcmp(k, "bus") == 0 && !seen_bus++) {
			if (!valid_bus(val)) {
				snprintf(err, errlen, "%s %d: bad bus id '%s' (want dddd:bb:dd.f)",
					 tok[0], d->index, val);
				return -1;
			}
			strcpy(d->bus, val);
		} else if (strcmp(k, "numa") == 0 && !seen_numa++) {
			if (parse_long_in(val, -1, INT32_MAX, &v) < 0 ||
			    (v >= 0 && !topo_numa_cpus(t, (int)v))) {
				snprintf(err, errlen, "%s %d: numa '%s' is not a numa node declared above",
					 tok[0], d->index, val);
				return -1;
			}
			d->numa = (int)v;
		} else if (strcmp(k, "memory") == 0 && gpu && !d->memory) {
			char *end;

			errno = 0;
			d->memory = strtoull(val, &end, 10);
			if (errno || *end || !isdigit((unsigned char)*val) || !d->memory) {
				snprintf(err, errlen, "%s %d: bad memory '%s'", tok[0], d->index, val);
				return -1;
			}
		} else if (strcmp(k, "pcipath") == 0 && !seen_path++) {
			if (parse_path(d, tok[i + 1], err, errlen) < 0)
				return -1;
		} else {
			snprintf(err, errlen, "%s %d: unknown or repeated attribute '%s'", tok[0],
				 d->index, k);
			return -1;
		}
	}
	if (!seen_name || !seen_bus || !seen_numa || !seen_path) {
		snprintf(err, errlen, "%s %d: needs name, bus, numa and pcipath", tok[0], d->index);
		return -1;
	}
	(*count)++;
	return 0;
}

static int parse_line(struct topo *t, char **tok, int n, char *err, size_t errlen)
{
	long a, b, c;

	if (strcmp(tok[0], "numa") == 0) {
		if (n != 4 || strcmp(tok[2], "cpus") != 0) {
			snprintf(err, errlen, "want: numa ID cpus LIST");
			return -1;
		}
		if (parse_long_in(tok[1], 0, INT32_MAX, &a) < 0) {
			snprintf(err, errlen, "numa: bad id '%s'", tok[1]);
			return -1;
		}
		if (topo_numa_cpus(t, (int)a)) {
			snprintf(err, errlen, "numa %ld: duplicate index", a);
			return -1;
		}
		if (!valid_cpulist(tok[3]) || strlen(tok[3]) >= sizeof t->numa[0].cpus) {
			snprintf(err, errlen, "numa %ld: bad cpu list '%s'", a, tok[3]);
			return -1;
		}
		if (t->nnuma == TOPO_MAX_NUMA) {
			snprintf(err, errlen, "more than %d numa nodes", TOPO_MAX_NUMA);
			return -1;
		}
		t->numa[t->nnuma].id = (int)a;
		strcpy(t->numa[t->nnuma++].cpus, tok[3]);
		return 0;
	}
	if (strcmp(tok[0], "gpu") == 0 || strcmp(tok[0], "nic") == 0)
		return parse_dev(t, tok, n, err, errlen);
	if (strcmp(tok[0], "nvlink") == 0) {
		if (n != 4 || parse_long_in(tok[1], 0, TOPO_MAX_GPUS - 1, &a) < 0 ||
		    parse_long_in(tok[2], 0, TOPO_MAX_GPUS - 1, &b) < 0 ||
		    parse_long_in(tok[3], 1, 1000, &c) < 0) {
			snprintf(err, errlen, "want: nvlink GPU GPU COUNT (count 1..1000)");
			return -1;
		}
		if (a >= t->ngpus || b >= t->ngpus || a == b) {
			snprintf(err, errlen, "nvlink %ld %ld: %s", a, b,
				 a == b ? "a GPU to itself" : "no such GPU declared above");
			return -1;
		}
		if (t->nvlink[a][b]) {
			snprintf(err, errlen, "nvlink %ld %ld: duplicate", a, b);
			return -1;
		}
		t->nvlink[a][b] = t->nvlink[b][a] = (int)c;
		return 0;
	}
	snprintf(err, errlen, "unknown keyword '%s'", tok[0]);
	return -1;
}

int topo_load(struct topo *t, const char *path, char *err, size_t errlen)
{
	FILE *f = fopen(path, "r");
	char line[4096], msg[512];
	char *tok[MAX_TOKENS];
	int lineno = 0, n, rc = -1;

	memset(t, 0, sizeof *t);
	if (!f) {
		snprintf(err, errlen, "topology %s: %s", path, strerror(errno));
		return -1;
	}
	while (fgets(line, sizeof line, f)) {
		size_t len = strlen(line);

		lineno++;
		if (len && line[len - 1] == '\n') {
			line[--len] = '\0';
		} else if (!feof(f)) {
			snprintf(err, errlen, "topology %s:%d: line too long", path, lineno);
			goto out;
		} else {
			/* a cut line may still parse ("nvlink 0 1 1" of "... 18"): refuse it */
			snprintf(err, errlen, "topology %s:%d: file ends inside the line (truncated?)",
				 path, lineno);
			goto out;
		}
		n = tokenize(line, tok, MAX_TOKENS);
		if (n < 0) {
			snprintf(err, errlen, "topology %s:%d: bad quoting or too many words", path,
				 lineno);
			goto out;
		}
		if (n && parse_line(t, tok, n, msg, sizeof msg) < 0) {
			snprintf(err, errlen, "topology %s:%d: %s", path, lineno, msg);
			goto out;
		}
	}
	if (ferror(f)) {
		snprintf(err, errlen, "topology %s: read error", path);
		goto out;
	}
	snprintf(t->source, sizeof t->source, "file %s", path);
	if (!t->ngpus)
		snprintf(t->gpu_note, sizeof t->gpu_note, "the topology file lists no GPU");
	rc = 0;
out:
	fclose(f);
	return rc;
}

/* One device's line; a '"' in its name (a NIC's may have one) is written as '\''. */
static void dump_dev(const struct topo_dev *d, FILE *f)
{
	fprintf(f, "%s %d name \"", d->kind == TOPO_GPU ? "gpu" : "nic", d->index);
	for (const char *c = d->name; *c; c++)
		fputc(*c == '"' ? '\'' : *c, f);
	fprintf(f, "\" bus %s numa %d", d->bus, d->numa);
	if (d->memory)
		fprintf(f, " memory %" PRIu64, d->memory);
	fprintf(f, " pcipath ");
	for (int i = 0; i < d->npath; i++)
		fprintf(f, "%s%s", i ? "/" : "", d->path[i]);
	fprintf(f, "\n");
}

void topo_dump(const struct topo *t, FILE *f)
{
	fprintf(f, "# commd topology (%s)\n", t->source);
	if (t->gpu_note[0])
		fprintf(f, "# no GPU: %s\n", t->gpu_note);
	for (int i = 0; i < t->nnuma; i++)
		fprintf(f, "numa %d cpus %s\n", t->numa[i].id, t->numa[i].cpus);
	for (int i = 0; i < t->ngpus; i++)
		dump_dev(&t->gpu[i], f);
	for (int i = 0; i < t->nnics; i++)
		dump_dev(&t->nic[i], f);
	for (int i = 0; i < t->ngpus; i++)
		for (int j = i + 1; j < t->ngpus; j++)
			if (t->nvlink[i][j])
				fprintf(f, "nvlink %d %d %d\n", i, j, t->nvlink[i][j]);
}
