/*
 * main.c: commd's entry point: flags, signals, the service manager
 * notifications and the event loop.
 */
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "commd.h"
#include "log.h"
#include "util.h"

#define DEFAULT_SOCKET "/run/commd/commd.sock"

static void usage(FILE *f)
{
	fprintf(f, "usage: commd [--socket PATH] [--foreground] [--log-level LEVEL]\n"
		   "             [--threads N] [--timeout MS] [--topology FILE] [--dump-topology]\n"
		   "  --socket PATH      listen on this Unix socket (default %s)\n"
		   "  --foreground       stay in the foreground, log to stderr (default: daemonize\n"
		   "                     and log to syslog)\n"
		   "  --log-level LEVEL  error, warn, info (default) or debug\n"
		   "  --threads N        worker threads for the host backend (default: cores)\n"
		   "  --timeout MS       default op deadline for jobs (default 600000)\n"
		   "  --topology FILE    read the node's topology from FILE instead of discovering it\n"
		   "  --dump-topology    print the discovered topology in that format and exit\n"
		   "  --version          print the version and exit\n",
		   DEFAULT_SOCKET);
}

static void on_signal(uv_signal_t *h, int signum)
{
	if (srv.stopping)
		return;
	log_info("signal %d: shutting down", signum);
	notify_send("STOPPING=1");
	server_stop();
}

int main(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "socket", required_argument, NULL, 's' },
		{ "foreground", no_argument, NULL, 'f' },
		{ "log-level", required_argument, NULL, 'l' },
		{ "threads", required_argument, NULL, 't' },
		{ "timeout", required_argument, NULL, 'T' },
		{ "topology", required_argument, NULL, 'O' },
		{ "dump-topology", no_argument, NULL, 'D' },
		{ "version", no_argument, NULL, 'V' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	const char *path = DEFAULT_SOCKET, *topo_file = NULL;
	int dump_topo = 0, foreground = 0, threads = (int)sysconf(_SC_NPROCESSORS_ONLN), opt, lvl;
	long timeout = DEFAULT_TIMEOUT_MS;
	char status[512], err[512], summary[160];
	uv_loop_t *loop = uv_default_loop();

	while ((opt = getopt_long(argc, argv, "s:fl:t:T:Vh", opts, NULL)) != -1) {
		switch (opt) {
		case 's':
			path = optarg;
			break;
		case 'f':
			foreground = 1;
			break;
		case 'l':
			if ((lvl = log_parse_level(optarg)) < 0) {
				fprintf(stderr, "commd: --log-level: unknown level '%s'\n", optarg);
				return 2;
			}
			log_set_level((enum log_level)lvl);
			break;
		case 't':
			threads = atoi(optarg);
			if (threads < 1 || threads > 1024) {
				fprintf(stderr, "commd: --threads: '%s' is not in 1..1024\n", optarg);
				return 2;
			}
			break;
		case 'T':
			timeout = atol(optarg);
			if (timeout < 1 || timeout > 24L * 3600 * 1000) {
				fprintf(stderr, "commd: --timeout: '%s' is not in 1..86400000\n",
					optarg);
				return 2;
			}
			break;
		case 'O':
			topo_file = optarg;
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
	if (threads < 1)
		threads = 1;
	if (dump_topo) {
		topo_discover(&node_topo);
		topo_dump(&node_topo, stdout);
		return fflush(stdout) == 0 ? 0 : 1;
	}
	if (topo_file) {
		if (topo_load(&node_topo, topo_file, err, sizeof err) < 0) {
			fprintf(stderr, "commd: %s\n", err);
			return 1;
		}
	} else {
		topo_discover(&node_topo);
	}
	if (!foreground) {
		/* detached: no terminal, nothing of the caller's kept open; log to syslog */
		if (daemon(0, 0) < 0) {
			perror("commd: daemon");
			return 1;
		}
		log_use_syslog("commd");
	}
	signal(SIGPIPE, SIG_IGN);
	srv.default_timeout_ms = (uint32_t)timeout;
	srv.start_ms = now_ms();
	gpu_probe();
	if (be_host_start(loop, threads) < 0)
		return 1;
	if (server_start(loop, path) < 0) {
		be_host_stop();
		return 1;
	}
	uv_signal_init(loop, &srv.sig_term);
	uv_signal_start(&srv.sig_term, on_signal, SIGTERM);
	uv_signal_init(loop, &srv.sig_int);
	uv_signal_start(&srv.sig_int, on_signal, SIGINT);

	log_info("commd %s: pid %d, socket %s, %d worker threads, gpu: %s", COMMD_VERSION,
		 (int)getpid(), path, threads, srv.gpu_info);
	topo_summary(&node_topo, summary, sizeof summary);
	log_info("topology (%s): %s", node_topo.source, summary);
	snprintf(status, sizeof status, "READY=1\nMAINPID=%d\nSTATUS=serving %s (host backend)",
		 (int)getpid(), path);
	notify_send(status);

	uv_run(loop, UV_RUN_DEFAULT);

	be_host_stop();
	uv_run(loop, UV_RUN_DEFAULT); /* close callbacks */
	uv_loop_close(loop);
	log_info("stopped");
	return 0;
}
