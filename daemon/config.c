/*
 * config.c: commd's settings. The config file (default /etc/commd/commd.conf,
 * `key = value` lines, `#` or `;` comment lines and `;` comments after a
 * space, each key once, read with inih, whose lines are 199 bytes
 * at most) sets them first;
 * command-line flags of the same names override it. Both go through
 * config_set, so a value means the same wherever it is written.
 */
#include <errno.h>
#include <ini.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "commd.h"
#include "log.h"
#include "util.h"

/*
 * A quarter of the mappings the kernel allows a process (vm.max_map_count),
 * so that one user's registrations leave room for the others' and for
 * commd's own (thread stacks, large mallocs).
 */
static uint32_t default_maps_per_uid(void)
{
	FILE *f = fopen("/proc/sys/vm/max_map_count", "r");
	long n = 0;

	if (f) {
		if (fscanf(f, "%ld", &n) != 1)
			n = 0;
		fclose(f);
	}
	if (n < 4096)
		n = 65530; /* the kernel's default */
	return (uint32_t)(n / 4 < (1 << 24) ? n / 4 : 1 << 24);
}

void config_init(struct config *cfg)
{
	long cores = sysconf(_SC_NPROCESSORS_ONLN);

	memset(cfg, 0, sizeof *cfg);
	snprintf(cfg->socket, sizeof cfg->socket, "%s", CONFIG_DEFAULT_SOCKET);
	cfg->log_level = LVL_INFO;
	cfg->threads = cores < 1 ? 1 : cores > 1024 ? 1024 : (int)cores;
	cfg->pin_workers = 1;
	cfg->timeout_ms = DEFAULT_TIMEOUT_MS;
	cfg->drain_ms = 2000;
	cfg->net_spin_us = -1;
	cfg->lim.conns = 4096;
	cfg->lim.conns_per_uid = 1024;
	cfg->lim.handshake_ms = 10000;
	cfg->lim.frame_ms = 10000;
	cfg->lim.job_mem = (uint64_t)sysconf(_SC_PHYS_PAGES) * (uint64_t)sysconf(_SC_PAGESIZE);
	cfg->lim.frame_bytes = FRAME_MAX;
	cfg->lim.fds_per_frame = FRAME_MAX_FDS;
	cfg->lim.ops_per_rank = 65536;
	cfg->lim.maps_per_uid = default_maps_per_uid();
	cfg->lim.wq_bytes = 16u << 20;
}

/* Bytes, with an optional K, M, G or T (powers of 1024); -1 if it is not that. */
static int parse_size(const char *s, uint64_t *out)
{
	static const char units[] = "KMGT";
	unsigned long long v;
	char *end;

	errno = 0;
	v = strtoull(s, &end, 10);
	if (errno || end == s || *s == '-')
		return -1;
	if (*end) {
		const char *u = strchr(units, *end);

		if (!u || end[1] || v > (UINT64_MAX >> (10 * (u - units + 1))))
			return -1;
		v <<= 10 * (u - units + 1);
	}
	*out = v;
	return 0;
}

static int set_path(char *dst, size_t len, const char *key, const char *val, char *err,
		    size_t errlen)
{
	if (!*val || strlen(val) >= len) {
		snprintf(err, errlen, "%s: '%.200s' is empty or longer than %zu bytes", key, val,
			 len - 1);
		return -1;
	}
	memcpy(dst, val, strlen(val) + 1);
	return 0;
}

int config_set(struct config *cfg, const char *key, const char *val, char *err, size_t errlen)
{
	long v;
	int lvl;

	if (!strcmp(key, "socket"))
		return set_path(cfg->socket, sizeof cfg->socket, key, val, err, errlen);
	if (!strcmp(key, "topology"))
		return set_path(cfg->topology, sizeof cfg->topology, key, val, err, errlen);
	if (!strcmp(key, "peer-listen")) {
		const char *colon = strrchr(val, ':');

		if (!colon || colon == val || parse_long_in(colon + 1, 0, 65535, &v) < 0) {
			snprintf(err, errlen, "%s: '%.200s' is not HOST:PORT (port 0..65535)", key,
				 val);
			return -1;
		}
		return set_path(cfg->peer_listen, sizeof cfg->peer_listen, key, val, err, errlen);
	}
	if (!strcmp(key, "admin-group"))
		return set_path(cfg->admin_group, sizeof cfg->admin_group, key, val, err, errlen);
	if (!strcmp(key, "socket-group"))
		return set_path(cfg->socket_group, sizeof cfg->socket_group, key, val, err, errlen);
	if (!strcmp(key, "gpu-worker"))
		return set_path(cfg->gpu_worker, sizeof cfg->gpu_worker, key, val, err, errlen);
	if (!strcmp(key, "log-level")) {
		if ((lvl = log_parse_level(val)) < 0) {
			snprintf(err, errlen, "%s: unknown level '%.200s' (error, warn, info, debug)",
				 key, val);
			return -1;
		}
		cfg->log_level = lvl;
		return 0;
	}
	if (!strcmp(key, "threads")) {
		if (parse_long_in(val, 1, 1024, &v) < 0) {
			snprintf(err, errlen, "%s: '%.200s' is not in 1..1024", key, val);
			return -1;
		}
		cfg->threads = (int)v;
		return 0;
	}
	if (!strcmp(key, "pin-workers")) {
		if (!strcmp(val, "yes") || !strcmp(val, "true") || !strcmp(val, "1"))
			cfg->pin_workers = 1;
		else if (!strcmp(val, "no") || !strcmp(val, "false") || !strcmp(val, "0"))
			cfg->pin_workers = 0;
		else {
			snprintf(err, errlen, "%s: '%.200s' is not yes or no", key, val);
			return -1;
		}
		return 0;
	}
	if (!strcmp(key, "timeout")) {
		if (parse_long_in(val, 1, TIMEOUT_MAX_MS, &v) < 0) {
			snprintf(err, errlen, "%s: '%.200s' is not in 1..%u (milliseconds)", key,
				 val, TIMEOUT_MAX_MS);
			return -1;
		}
		cfg->timeout_ms = (uint32_t)v;
		return 0;
	}
	if (!strcmp(key, "max-connections") || !strcmp(key, "max-connections-per-uid")) {
		if (parse_long_in(val, 1, 1000000, &v) < 0) {
			snprintf(err, errlen, "%s: '%.200s' is not in 1..1000000", key, val);
			return -1;
		}
		*(strstr(key, "uid") ? &cfg->lim.conns_per_uid : &cfg->lim.conns) = (uint32_t)v;
		return 0;
	}
	if (!strcmp(key, "handshake-timeout") || !strcmp(key, "frame-timeout")) {
		if (parse_long_in(val, 1, 3600000, &v) < 0) {
			snprintf(err, errlen, "%s: '%.200s' is not in 1..3600000 (milliseconds)", key,
				 val);
			return -1;
		}
		*(key[0] == 'h' ? &cfg->lim.handshake_ms : &cfg->lim.frame_ms) = (uint32_t)v;
		return 0;
	}
	if (!strcmp(key, "max-job-memory")) {
		if (parse_size(val, &cfg->lim.job_mem) < 0 || !cfg->lim.job_mem) {
			snprintf(err, errlen, "%s: '%.200s' is not a size (bytes, or with K M G T)",
				 key, val);
			return -1;
		}
		return 0;
	}
	if (!strcmp(key, "max-frame-size")) {
		uint64_t b;

		if (parse_size(val, &b) < 0 || b < 1024 || b > FRAME_MAX) {
			snprintf(err, errlen, "%s: '%.200s' is not a size in 1K..%dK", key, val,
				 FRAME_MAX >> 10);
			return -1;
		}
		cfg->lim.frame_bytes = (uint32_t)b;
		return 0;
	}
	if (!strcmp(key, "max-fds-per-frame")) {
		if (parse_long_in(val, 1, FRAME_FDS_CAP, &v) < 0) {
			snprintf(err, errlen, "%s: '%.200s' is not in 1..%d", key, val, FRAME_FDS_CAP);
			return -1;
		}
		cfg->lim.fds_per_frame = (int)v;
		return 0;
	}
	if (!strcmp(key, "max-ops-per-rank")) {
		if (parse_long_in(val, 1, 1 << 24, &v) < 0) {
			snprintf(err, errlen, "%s: '%.200s' is not in 1..%d", key, val, 1 << 24);
			return -1;
		}
		cfg->lim.ops_per_rank = (uint32_t)v;
		return 0;
	}
	if (!strcmp(key, "max-registrations-per-uid")) {
		if (parse_long_in(val, 1, 1 << 24, &v) < 0) {
			snprintf(err, errlen, "%s: '%.200s' is not in 1..%d", key, val, 1 << 24);
			return -1;
		}
		cfg->lim.maps_per_uid = (uint32_t)v;
		return 0;
	}
	if (!strcmp(key, "max-write-queue")) {
		if (parse_size(val, &cfg->lim.wq_bytes) < 0 || cfg->lim.wq_bytes < 2 * FRAME_MAX) {
			snprintf(err, errlen, "%s: '%.200s' is not a size of %dK or more", key, val,
				 2 * FRAME_MAX >> 10);
			return -1;
		}
		return 0;
	}
	if (!strcmp(key, "drain-timeout")) {
		if (parse_long_in(val, 0, 600000, &v) < 0) {
			snprintf(err, errlen, "%s: '%.200s' is not in 0..600000 (milliseconds)", key,
				 val);
			return -1;
		}
		cfg->drain_ms = (uint32_t)v;
		return 0;
	}
	if (!strcmp(key, "net-spin-us")) {
		if (!strcmp(val, "auto")) {
			cfg->net_spin_us = -1;
			return 0;
		}
		if (parse_long_in(val, 0, NET_SPIN_MAX_US, &v) < 0) {
			snprintf(err, errlen, "%s: '%.200s' is not auto or in 0..%d (microseconds)",
				 key, val, NET_SPIN_MAX_US);
			return -1;
		}
		cfg->net_spin_us = (int)v;
		return 0;
	}
	snprintf(err, errlen, "unknown key '%.200s'", key);
	return -1;
}

struct load_ctx {
	struct config *cfg;
	char err[256];
	char seen[32][32]; /* the keys set so far: each may be set once */
	int nseen;
};

static int on_entry(void *user, const char *section, const char *key, const char *val)
{
	struct load_ctx *ctx = user;
	char err[256];

	if (*ctx->err)
		return 0;
	if (*section) {
		snprintf(ctx->err, sizeof ctx->err, "section [%.200s]: commd.conf has no sections",
			 section);
		return 0;
	}
	/* inih hands an indented line to the key above it again: refused as a repeat */
	for (int i = 0; i < ctx->nseen; i++)
		if (!strcmp(ctx->seen[i], key)) {
			snprintf(ctx->err, sizeof ctx->err,
				 "%.60s is set twice (an indented line continues the key above)", key);
			return 0;
		}
	if (config_set(ctx->cfg, key, val, err, sizeof err) < 0) {
		snprintf(ctx->err, sizeof ctx->err, "%s", err);
		return 0;
	}
	/* a known key (config_set took it): there are fewer than 32, none that long */
	if (ctx->nseen < (int)(sizeof ctx->seen / sizeof ctx->seen[0]))
		snprintf(ctx->seen[ctx->nseen++], sizeof ctx->seen[0], "%s", key);
	return 1;
}

/* What read_line reads from, and where it stopped. */
struct line_reader {
	FILE *f;
	int line;     /* the lines read so far */
	int max;      /* the longest line inih's buffer holds */
	int too_long; /* line is longer than that: not handed over */
};

/*
 * inih's reader: fgets, but a line longer than inih's buffer (num - 1
 * bytes) is never split, as inih would read its tail as a line of its own:
 * a comment's tail is skipped, any other such line ends the file with
 * too_long set.
 */
static char *read_line(char *str, int num, void *stream)
{
	struct line_reader *r = stream;
	const char *p = str;
	size_t len;
	int c;

	if (r->too_long || !fgets(str, num, r->f))
		return NULL;
	r->line++;
	r->max = num - 1;
	len = strlen(str);
	if (!len || str[len - 1] == '\n')
		return str;
	/* a full buffer: the line may end right there */
	if ((c = getc(r->f)) == EOF || c == '\n')
		return str;
	ungetc(c, r->f);
	if (r->line == 1 && !strncmp(p, "\xEF\xBB\xBF", 3))
		p += 3; /* a UTF-8 byte order mark, which inih skips */
	p += strspn(p, " \t\r\v\f");
	if (*p == '#' || *p == ';') {
		while ((c = getc(r->f)) != EOF && c != '\n')
			;
		return str;
	}
	r->too_long = 1;
	return NULL;
}

int config_load(struct config *cfg, const char *path, int must_exist, char *err, size_t errlen)
{
	struct load_ctx ctx = { .cfg = cfg };
	struct line_reader r = { fopen(path, "r"), 0, 0, 0 };
	struct stat st;
	int line;

	if (!r.f) {
		if (errno == ENOENT && !must_exist)
			return 0;
		snprintf(err, errlen, "%s: %s", path, strerror(errno));
		return -1;
	}
	/* a directory opens, and reads as nothing: every setting would be its default */
	if (fstat(fileno(r.f), &st) == 0 && S_ISDIR(st.st_mode)) {
		fclose(r.f);
		snprintf(err, errlen, "%s: is a directory, not a config file", path);
		return -1;
	}
	line = ini_parse_stream(read_line, &r, on_entry, &ctx);
	fclose(r.f);
	if (line == 0 && r.too_long) {
		snprintf(err, errlen, "%s:%d: longer than %d bytes (a longer value can be given as "
			 "its flag)", path, r.line, r.max);
		return -1;
	}
	if (line == 0)
		return 0;
	/* inih reports the first bad line; a line it cannot parse has no message of ours */
	snprintf(err, errlen, "%s:%d: %s", path, line,
		 *ctx.err ? ctx.err : "not a 'key = value' line");
	return -1;
}
