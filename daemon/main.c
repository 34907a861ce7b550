/*
 * main.c: commd's entry point: flags, signals, the service manager
 * notifications and the event loop.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <grp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "commd.h"
#include "log.h"
#include "util.h"

static void usage(FILE *f)
{
	fprintf(f, "usage: commd [--config FILE] [--socket PATH] [--foreground] [--log-level LEVEL]\n"
		   "             [--threads N] [--pin-workers yes|no] [--timeout MS]\n"
		   "             [--topology FILE] [--dump-topology] [--gpu-worker PATH]\n"
		   "             [--peer-listen HOST:PORT] [--drain-timeout MS] [--admin-group GROUP]\n"
		   "             [--max-connections N] [--max-connections-per-uid N]\n"
		   "             [--handshake-timeout MS] [--frame-timeout MS] [--max-job-memory SIZE]\n"
		   "             [--max-frame-size SIZE] [--max-fds-per-frame N] [--max-ops-per-rank N]\n"
		   "             [--max-registrations-per-uid N] [--max-write-queue SIZE]\n"
		   "             [--socket-group GROUP]\n"
		   "             [--net-spin-us auto|US] [--version] [--help]\n"
		   "  --config FILE      read settings from FILE (default %s, if it exists);\n"
		   "                     its keys are the long flags' names; flags win\n"
		   "  --socket PATH      listen on this Unix socket (default %s)\n"
		   "  --socket-group GROUP  the socket is 0660 and this group's; others cannot\n"
		   "                     connect (default: 0666, anyone may)\n"
		   "  --foreground       stay in the foreground, log to stderr (default: daemonize,\n"
		   "                     in the same directory, and log to syslog, returning once\n"
		   "                     ready, or with the exit status of a start that failed)\n"
		   "  --log-level LEVEL  error, warn, info (default) or debug\n"
		   "  --threads N        worker threads for the host backend (default: cores)\n"
		   "  --pin-workers yes|no  bind worker i to core i, in hwloc's order (default yes)\n"
		   "  --timeout MS       default op deadline for jobs (default 600000)\n"
		   "  --topology FILE    read the node's topology from FILE instead of discovering it\n"
		   "  --dump-topology    print the discovered topology in that format and exit\n"
		   "  --gpu-worker PATH  the GPU worker program (default: commd-gpu beside commd,\n"
		   "                     else %s/commd-gpu),\n"
		   "                     or none: host memory only. A GPU that fails its probe\n"
		   "                     stops commd (exit 3 with --foreground)\n"
		   "  --peer-listen HOST:PORT  listen for other daemons there (TCP), so that jobs\n"
		   "                     naming this daemon as their root (COMM_ROOT) can span\n"
		   "                     nodes (default: none)\n"
		   "  --drain-timeout MS on SIGTERM, how long ops in flight may take to finish;\n"
		   "                     new ops and joins are refused meanwhile (default 2000)\n"
		   "  --admin-group GROUP  its members (and root) see every job in commctl status;\n"
		   "                     others see their own jobs only (default: root alone)\n"
		   "  --max-connections N, --max-connections-per-uid N  connections at once, in all\n"
		   "                     and of one user (default 4096, 1024); past them refused\n"
		   "  --handshake-timeout MS  a connection must say hello within this (10000)\n"
		   "  --frame-timeout MS a message begun must arrive whole within this (10000)\n"
		   "  --max-job-memory SIZE  host memory one job may register (K M G T;\n"
		   "                     default: the machine's memory)\n"
		   "  --max-frame-size SIZE  longest message a client may send (1K..64K; 64K)\n"
		   "  --max-fds-per-frame N  most fds one message may carry (1..16; 4)\n"
		   "  --max-ops-per-rank N   ops a rank may have in flight (65536)\n"
		   "  --max-registrations-per-uid N  host memory registrations one user's\n"
		   "                     connections may hold (default: vm.max_map_count / 4)\n"
		   "  --max-write-queue SIZE replies queued to a client that does not read them\n"
		   "                     before it is dropped (128K or more; 16M)\n"
		   "  --net-spin-us auto|US  while an op across daemons is in flight, how long\n"
		   "                     the data plane polls after its last event before it\n"
		   "                     sleeps (0..%d; auto: %d on %d cores or more, else %d)\n"
		   "  --version          print the version and exit\n"
		   "  --help             print this help and exit\n",
		   CONFIG_DEFAULT_FILE, CONFIG_DEFAULT_SOCKET, COMMD_PKGLIBEXECDIR, NET_SPIN_MAX_US,
		   NET_SPIN_LONG_US, NET_SPIN_CORES, NET_SPIN_SHORT_US);
}

static void on_signal(uv_signal_t *h, int signum)
{
	if (srv.stopping)
		return;
	if (srv.draining) {
		log_info("signal %d again: stopping now", signum);
		server_shutdown();
		return;
	}
	log_info("signal %d: shutting down", signum);
	server_drain(); /* closes the listener, then says STOPPING=1 */
}

/* The gid of the group a config key names in *gid; -1, "key: why" in err, when there is none. */
static int group_id(const char *key, const char *name, gid_t *gid, char *err, size_t errlen)
{
	struct group *g = getgrnam(name);

	if (!g) {
		snprintf(err, errlen, "%s: no group named '%s'", key, name);
		return -1;
	}
	*gid = g->gr_gid;
	return 0;
}

/* The groups cfg names, looked up; -1 with "key: why" in err. */
static int check_groups(const struct config *cfg, gid_t *socket_gid, gid_t *admin_gid, char *err,
			size_t errlen)
{
	if (*cfg->socket_group &&
	    group_id("socket-group", cfg->socket_group, socket_gid, err, errlen) < 0)
		return -1;
	if (*cfg->admin_group &&
	    group_id("admin-group", cfg->admin_group, admin_gid, err, errlen) < 0)
		return -1;
	return 0;
}

/* The settings commd started with; SIGHUP compares those it cannot change to them. */
static const struct config *started;

/* The keys of the settings a restart needs whose value in cfg is not the one in force. */
static void restart_keys(const struct config *cfg, char *out, size_t len)
{
	const struct {
		const char *key;
		int differs;
	} keys[] = {
		/* an activated socket is the manager's: these two are not used */
		{ "socket", !srv.activated && strcmp(cfg->socket, started->socket) },
		{ "socket-group", !srv.activated && strcmp(cfg->socket_group, started->socket_group) },
		{ "admin-group", strcmp(cfg->admin_group, started->admin_group) != 0 },
		{ "threads", cfg->threads != started->threads },
		{ "pin-workers", cfg->pin_workers != started->pin_workers },
		{ "topology", strcmp(cfg->topology, started->topology) != 0 },
		{ "gpu-worker", strcmp(cfg->gpu_worker, started->gpu_worker) != 0 },
		{ "peer-listen", strcmp(cfg->peer_listen, started->peer_listen) != 0 },
	};
	size_t n = 0;

	*out = '\0';
	for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++)
		if (keys[i].differs && n < len)
			n += (size_t)snprintf(out + n, len - n, "%s%s", n ? ", " : "", keys[i].key);
}

/* The value flags, by their long names, kept to apply over the config file. */
struct flag_val {
	const char *key;
	const char *val;
};

/* Where the settings come from, kept for SIGHUP: the file, then the flags. */
static struct {
	const char *file; /* NULL: the default file, if it exists */
	struct flag_val flags[32];
	int nflags;
} src;

/* The settings file src reads: --config's, else the default where it exists; NULL: none. */
static const char *settings_file(void)
{
	if (src.file)
		return src.file;
	return access(CONFIG_DEFAULT_FILE, F_OK) == 0 ? CONFIG_DEFAULT_FILE : NULL;
}

/* Settings from src into cfg; -1 with "where: why" in err. */
static int load_settings(struct config *cfg, char *err, size_t errlen)
{
	char why[448];

	config_init(cfg);
	if (config_load(cfg, src.file ? src.file : CONFIG_DEFAULT_FILE, src.file != NULL, why,
			sizeof why) < 0) {
		snprintf(err, errlen, "config: %s", why);
		return -1;
	}
	for (int i = 0; i < src.nflags; i++)
		if (config_set(cfg, src.flags[i].key, src.flags[i].val, why, sizeof why) < 0) {
			snprintf(err, errlen, "--%s", why);
			return -1;
		}
	return 0;
}

/*
 * SIGHUP: read the settings again and apply what may change under running
 * jobs: the log level, the limits (the per-message ones for connections
 * made from now on), the default op deadline, the drain budget and the
 * data plane's polling. The others are checked: a group that does not
 * exist keeps every setting in force, one changed is said to need a
 * restart. Draining, it is ignored: commd is on its way out.
 */
static void on_hangup(uv_signal_t *h, int signum)
{
	struct config cfg;
	char err[512], msg[64], restart[128];
	gid_t gid;
	int spin;

	if (srv.draining || srv.stopping) {
		log_info("reload: draining: SIGHUP ignored");
		return;
	}
	/* RELOADING=1, then READY=1 whether or not the new settings took */
	snprintf(msg, sizeof msg, "RELOADING=1\nMONOTONIC_USEC=%llu", (unsigned long long)now_us());
	notify_send(msg);
	if (load_settings(&cfg, err, sizeof err) < 0 ||
	    check_groups(&cfg, &gid, &gid, err, sizeof err) < 0) {
		log_warn("reload: %s: the settings in force stay", err);
		server_notify("READY=1");
		return;
	}
	log_set_level((enum log_level)cfg.log_level);
	srv.lim = cfg.lim;
	srv.default_timeout_ms = cfg.timeout_ms;
	srv.drain_ms = cfg.drain_ms;
	spin = net_set_spin(cfg.net_spin_us);
	log_info("reload: %s: log level, limits, timeout, drain-timeout and net-spin-us (%d us) "
		 "applied (socket, threads, topology, peers and groups need a restart)",
		 settings_file() ? settings_file() : "flags only", spin);
	restart_keys(&cfg, restart, sizeof restart);
	if (*restart)
		log_warn("reload: %s changed: the values commd started with stay until a restart",
			 restart);
	server_notify("READY=1");
}

static int ready_fd = -1; /* detached: the pipe the starting process waits on */

/*
 * Detach as daemon(3) does (a child in a session of its own, in the same
 * directory), but the process that started commd waits until commd is
 * ready or has failed and exits with its status: a start that fails (the
 * socket served already, a GPU broken) is not reported as success. Until
 * then, stderr still reaches whoever started it.
 */
static int detach(void)
{
	unsigned char status;
	ssize_t n;
	pid_t pid;
	int p[2];

	if (pipe2(p, O_CLOEXEC) < 0)
		return -1;
	pid = fork();
	if (pid < 0) {
		close(p[0]);
		close(p[1]);
		return -1;
	}
	if (pid > 0) {
		close(p[1]);
		do
			n = read(p[0], &status, 1);
		while (n < 0 && errno == EINTR);
		if (n == 1)
			_exit(status);
		fprintf(stderr, "commd: it ended before it was ready (see the system log)\n");
		_exit(1);
	}
	close(p[0]);
	setsid();
	ready_fd = p[1];
	return 0;
}

/*
 * Detached: tell the starting process how the start ended (0: ready); once
 * ready, stdin, stdout and stderr go to /dev/null and only syslog is written.
 */
static void start_done(int status)
{
	unsigned char b = (unsigned char)status;
	int null;

	if (ready_fd < 0)
		return;
	if (write(ready_fd, &b, 1) != 1)
		log_warn("telling the starting process: %s", strerror(errno));
	close(ready_fd);
	ready_fd = -1;
	if (status)
		return;
	log_use_syslog("commd", 0);
	null = open("/dev/null", O_RDWR | O_CLOEXEC);
	if (null >= 0) {
		dup2(null, STDIN_FILENO);
		dup2(null, STDOUT_FILENO);
		dup2(null, STDERR_FILENO);
		if (null > STDERR_FILENO)
			close(null);
	}
}

static int run(int argc, char **argv);

int main(int argc, char **argv)
{
	int rc = run(argc, argv);

	start_done(rc);
	return rc;
}

static int run(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "config", required_argument, NULL, 'c' },
		{ "socket", required_argument, NULL, 's' },
		{ "foreground", no_argument, NULL, 'f' },
		{ "log-level", required_argument, NULL, 'l' },
		{ "threads", required_argument, NULL, 't' },
		/* 'k': a config key of the same name */
		{ "pin-workers", required_argument, NULL, 'k' },
		{ "timeout", required_argument, NULL, 'T' },
		{ "topology", required_argument, NULL, 'k' },
		{ "dump-topology", no_argument, NULL, 'D' },
		{ "gpu-worker", required_argument, NULL, 'k' },
		{ "peer-listen", required_argument, NULL, 'k' },
		{ "drain-timeout", required_argument, NULL, 'k' },
		{ "net-spin-us", required_argument, NULL, 'k' },
		{ "admin-group", required_argument, NULL, 'k' },
		{ "socket-group", required_argument, NULL, 'k' },
		{ "max-connections", required_argument, NULL, 'k' },
		{ "max-connections-per-uid", required_argument, NULL, 'k' },
		{ "handshake-timeout", required_argument, NULL, 'k' },
		{ "frame-timeout", required_argument, NULL, 'k' },
		{ "max-job-memory", required_argument, NULL, 'k' },
		{ "max-frame-size", required_argument, NULL, 'k' },
		{ "max-fds-per-frame", required_argument, NULL, 'k' },
		{ "max-ops-per-rank", required_argument, NULL, 'k' },
		{ "max-registrations-per-uid", required_argument, NULL, 'k' },
		{ "max-write-queue", required_argument, NULL, 'k' },
		{ "version", no_argument, NULL, 'V' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	static struct config cfg; /* the server keeps pointers into it */
	int dump_topo = 0, foreground = 0, opt, idx;
	gid_t socket_gid = 0, admin_gid = 0;
	char ready[64], err[512], summary[160];
	uv_loop_t *loop = uv_default_loop();

	while ((opt = getopt_long(argc, argv, "s:fl:t:T:Vh", opts, &idx)) != -1) {
		const char *key = opt == 'k' ? opts[idx].name : NULL;


		switch (opt) {
		case 'c':
			src.file = optarg;
			break;
		case 's':
		case 'l':
		case 't':
		case 'T':
		case 'k':
			if (src.nflags == (int)(sizeof src.flags / sizeof src.flags[0])) {
				fprintf(stderr, "commd: too many flags\n");
				return 2;
			}
			for (idx = 0; !key && opts[idx].val != opt; idx++)
				;
			src.flags[src.nflags++] = (struct flag_val){ key ? key : opts[idx].name, optarg };
			break;
		case 'f':
			foreground = 1;
			break;
		case 'D':
			dump_topo = 1;
			break;
		case 'V':
			printf("commd %s (protocol %d..%d)\n", COMMD_VERSION, PROTO_VERSION_MIN,
			       PROTO_VERSION);
			return 0;
		case 'h':
			usage(stdout);
			return 0;
		default:
			usage(stderr);
			return 2;
		}
	}
	if (optind != argc) {
		usage(stderr);
		return 2;
	}
	if (load_settings(&cfg, err, sizeof err) < 0) {
		fprintf(stderr, "commd: %s\n", err);
		return 2;
	}
	log_set_level((enum log_level)cfg.log_level);
	if (dump_topo) {
		topo_discover(&node_topo);
		topo_dump(&node_topo, stdout);
		return fflush(stdout) == 0 ? 0 : 1;
	}
	if (*cfg.topology) {
		if (topo_load(&node_topo, cfg.topology, err, sizeof err) < 0) {
			fprintf(stderr, "commd: %s\n", err);
			return 1;
		}
	} else {
		topo_discover(&node_topo);
	}
	/* before detaching, while stderr still reaches whoever started commd */
	if (check_groups(&cfg, &socket_gid, &admin_gid, err, sizeof err) < 0) {
		fprintf(stderr, "commd: %s\n", err);
		return 2;
	}
	started = &cfg;
	if (!foreground) {
		/*
		 * detached: no terminal, nothing of the caller's kept open; log to syslog.
		 * It stays in its directory: relative paths (--socket, --config, read
		 * again on SIGHUP, --gpu-worker, topology) mean what they meant at start.
		 */
		if (detach() < 0) {
			perror("commd: fork");
			return 1;
		}
		log_use_syslog("commd", 1);
	}
	signal(SIGPIPE, SIG_IGN);
	srv.default_timeout_ms = cfg.timeout_ms;
	srv.drain_ms = cfg.drain_ms;
	srv.lim = cfg.lim;
	srv.admin_gid = *cfg.admin_group ? (int64_t)admin_gid : -1;
	snprintf(srv.admin_group, sizeof srv.admin_group, "%s", cfg.admin_group);
	srv.start_ms = now_ms();
	gpu_probe(loop, cfg.gpu_worker);
	gpu_probe_wait();
	if (srv.gpu_state == GPU_BROKEN) {
		/* RELIABILITY.md G4: loud, not a GPU node quietly serving host memory only */
		log_error("gpu: %s", srv.gpu_info);
		log_error("not starting: a GPU of this node does not work. Mend it, leave it out "
			  "(CUDA_VISIBLE_DEVICES in commd's environment), or set gpu-worker = none "
			  "to serve host memory only");
		server_notify("STATUS=not starting: a GPU of this node does not work (see the log)");
		return 3;
	}
	if (be_host_start(loop, cfg.threads, cfg.pin_workers) < 0)
		return 1;
	net_set_spin(cfg.net_spin_us);
	net_start(loop);
	if (peer_start(loop, cfg.peer_listen) < 0 || server_start(loop, cfg.socket, *cfg.socket_group ? (int64_t)socket_gid : -1) < 0) {
		net_stop();
		be_host_stop();
		return 1;
	}
	uv_signal_init(loop, &srv.sig_term);
	uv_signal_start(&srv.sig_term, on_signal, SIGTERM);
	uv_signal_init(loop, &srv.sig_int);
	uv_signal_start(&srv.sig_int, on_signal, SIGINT);
	uv_signal_init(loop, &srv.sig_hup);
	uv_signal_start(&srv.sig_hup, on_hangup, SIGHUP);

	log_info("commd %s: pid %d, socket %s, %d worker threads%s, gpu: %s", COMMD_VERSION,
		 (int)getpid(), srv.socket_path, cfg.threads, cfg.pin_workers ? " (pinned)" : "",
		 srv.gpu_info);
	if (settings_file())
		log_info("config: %s", settings_file());
	else
		log_info("config: none (defaults; no %s)", CONFIG_DEFAULT_FILE);
	topo_summary(&node_topo, summary, sizeof summary);
	log_info("topology (%s): %s", node_topo.source, summary);
	snprintf(ready, sizeof ready, "READY=1\nMAINPID=%d", (int)getpid());
	server_notify(ready);
	start_done(0);
	if ((srv.watchdog_ms = notify_watchdog_ms()))
		log_info("watchdog: WATCHDOG=1 every %u ms while the loop runs (its tick is 100 ms)",
			 srv.watchdog_ms / 2 < 100 ? 100 : srv.watchdog_ms / 2);

	uv_run(loop, UV_RUN_DEFAULT);

	be_host_stop();
	uv_run(loop, UV_RUN_DEFAULT); /* close callbacks */
	peer_free_all();
	uv_loop_close(loop);
	log_info("stopped");
	return 0;
}
