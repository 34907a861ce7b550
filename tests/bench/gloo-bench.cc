/*
 * gloo-bench.cc: the Gloo peer of tests/bench/compare.sh. Forks N ranks that
 * meet through a FileStore in a temp dir and talk over Gloo's TCP transport on
 * loopback; times float32-sum collectives as mpi-bench.c does (JSON lines).
 */
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <csignal>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "gloo/allgather.h"
#include "gloo/allreduce.h"
#include "gloo/barrier.h"
#include "gloo/broadcast.h"
#include "gloo/math.h"
#include "gloo/reduce_scatter.h"
#include "gloo/rendezvous/context.h"
#include "gloo/rendezvous/file_store.h"
#include "gloo/rendezvous/prefix_store.h"
#include "gloo/transport/tcp/device.h"

#include "bench-common.h"

struct bench {
	enum op op;
	int rank, nranks;
	size_t count; /* elements in the larger buffer (nccl-tests' size / 4) */
	size_t part;  /* elements per rank for reduce_scatter and allgather */
	float *send, *recv;
};

/* What the ranks leave for the launcher: per-iteration times, wrong counts. */
struct shared {
	int done; /* ranks past their last op */
	long wrong[64];
	int failed[64];
	double t[]; /* [rank * iters + i] */
};

static void usage(void)
{
	fprintf(stderr, "usage: gloo-bench [-n RANKS] -o allreduce|reduce_scatter|allgather|broadcast\n"
			"                  -s SIZE[,SIZE...] [-w WARMUP] [-i ITERS]\n"
			"SIZE in bytes, with K, M or G (powers of 1024)\n");
	exit(2);
}

static double now()
{
	return std::chrono::duration<double>(
		       std::chrono::steady_clock::now().time_since_epoch())
		.count();
}

static long check(const bench &b)
{
	long wrong = 0;

	switch (b.op) {
	case OP_ALLREDUCE:
		for (size_t i = 0; i < b.count; i++) {
			float want = 0;
			for (int r = 0; r < b.nranks; r++)
				want += val(r, i);
			wrong += b.recv[i] != want;
		}
		break;
	case OP_REDUCE_SCATTER: /* in place: the result is at the start of send */
		for (size_t i = 0; i < b.part; i++) {
			float want = 0;
			for (int r = 0; r < b.nranks; r++)
				want += val(r, b.rank * b.part + i);
			wrong += b.send[i] != want;
		}
		break;
	case OP_ALLGATHER:
		for (size_t i = 0; i < b.count; i++)
			wrong += b.recv[i] != val((int)(i / b.part), i);
		break;
	case OP_BROADCAST:
		for (size_t i = 0; i < b.count; i++)
			wrong += b.recv[i] != val(0, i);
		break;
	}
	return wrong;
}

/* One rank: join, check once, warm up, time; results go to sh. */
static void rank_main(bench &b, const std::string &dir, const std::string &prefix, int warmup,
		      int iters, shared *sh)
{
	gloo::transport::tcp::attr attr;
	attr.hostname = "127.0.0.1";
	attr.ai_family = AF_INET;
	auto dev = gloo::transport::tcp::CreateDevice(attr);
	gloo::rendezvous::FileStore fstore(dir);
	gloo::rendezvous::PrefixStore store(prefix, fstore);
	auto ctx = std::make_shared<gloo::rendezvous::Context>(b.rank, b.nranks);
	ctx->setTimeout(std::chrono::seconds(600));
	ctx->connectFullMesh(store, dev);

	std::vector<float> send(b.op == OP_ALLGATHER ? b.part : b.count);
	std::vector<float> recv(b.op == OP_REDUCE_SCATTER ? 1 : b.count, -1.0f);
	b.send = send.data();
	b.recv = recv.data();
	for (size_t i = 0; i < send.size(); i++)
		send[i] = b.op == OP_ALLGATHER ? val(b.rank, b.rank * b.part + i) : val(b.rank, i);

	std::function<void()> run;
	std::unique_ptr<gloo::AllreduceOptions> ar;
	std::unique_ptr<gloo::AllgatherOptions> ag;
	std::unique_ptr<gloo::BroadcastOptions> bc;
	std::unique_ptr<gloo::ReduceScatterHalvingDoubling<float>> rs;
	switch (b.op) {
	case OP_ALLREDUCE:
		ar.reset(new gloo::AllreduceOptions(ctx));
		ar->setInput(b.send, b.count);
		ar->setOutput(b.recv, b.count);
		ar->setAlgorithm(gloo::AllreduceOptions::Algorithm::RING);
		ar->setReduceFunction(
			static_cast<void (*)(void *, const void *, const void *, size_t)>(
				&gloo::sum<float>));
		ar->setTag(1);
		run = [&] { gloo::allreduce(*ar); };
		break;
	case OP_REDUCE_SCATTER:
		/* Gloo's only reduce-scatter works in place on the full buffer. */
		rs.reset(new gloo::ReduceScatterHalvingDoubling<float>(
			ctx, std::vector<float *>{ b.send }, (int)b.count,
			std::vector<int>(b.nranks, (int)b.part)));
		run = [&] { rs->run(); };
		break;
	case OP_ALLGATHER:
		ag.reset(new gloo::AllgatherOptions(ctx));
		ag->setInput(b.send, b.part);
		ag->setOutput(b.recv, b.count);
		ag->setTag(2);
		run = [&] { gloo::allgather(*ag); };
		break;
	case OP_BROADCAST:
		bc.reset(new gloo::BroadcastOptions(ctx));
		if (b.rank == 0)
			bc->setInput(b.send, b.count);
		bc->setOutput(b.recv, b.count);
		bc->setRoot(0);
		bc->setTag(3);
		run = [&] { gloo::broadcast(*bc); };
		break;
	}

	gloo::BarrierOptions bar(ctx);
	bar.setTag(4);

	run();
	sh->wrong[b.rank] = check(b);
	if (b.op == OP_REDUCE_SCATTER) /* later runs reduce zeros, never overflow */
		std::fill(send.begin(), send.end(), 0.0f);
	/* A barrier before each call, as commbench does. */
	for (int i = 0; i < warmup + iters; i++) {
		gloo::barrier(bar);
		double t0 = now();
		run();
		if (i >= warmup)
			sh->t[(size_t)b.rank * iters + i - warmup] = now() - t0;
	}

	/* Close no connection while a peer may still send on it (Gloo then fails
	 * that peer with "Connection closed by peer"). */
	gloo::barrier(bar);
	__atomic_add_fetch(&sh->done, 1, __ATOMIC_SEQ_CST);
	for (int ms = 0; ms < 10000 && __atomic_load_n(&sh->done, __ATOMIC_SEQ_CST) < b.nranks; ms++)
		usleep(1000);
}

/* Fork the ranks for one size, wait for them, print the JSON line. */
static int bench_size(enum op op, int nranks, size_t bytes, int warmup, int iters,
		      const std::string &dir, int seq)
{
	bench b = {};
	b.op = op;
	b.nranks = nranks;
	b.count = bytes / sizeof(float);
	b.part = b.count / nranks;
	if (op == OP_REDUCE_SCATTER || op == OP_ALLGATHER)
		b.count = b.part * nranks;
	if (b.count == 0) {
		fprintf(stderr, "gloo-bench: %s of %zu bytes has nothing per rank, skipped\n",
			op_names[op], bytes);
		return 0;
	}

	size_t shbytes = sizeof(shared) + sizeof(double) * nranks * iters;
	auto *sh = (shared *)mmap(NULL, shbytes, PROT_READ | PROT_WRITE,
				  MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (sh == MAP_FAILED) {
		perror("gloo-bench: mmap");
		return 1;
	}
	std::vector<pid_t> pids;
	fflush(stdout);
	for (int r = 0; r < nranks; r++) {
		pid_t pid = fork();
		if (pid == 0) {
			prctl(PR_SET_PDEATHSIG, SIGKILL); /* a launcher killed by timeout takes its ranks */
			b.rank = r;
			try {
				rank_main(b, dir, "size" + std::to_string(seq), warmup, iters, sh);
			} catch (const std::exception &e) {
				fprintf(stderr, "gloo-bench: rank %d: %s\n", r, e.what());
				sh->failed[r] = 1;
				_exit(1);
			}
			_exit(0);
		}
		if (pid < 0) {
			perror("gloo-bench: fork");
			return 1;
		}
		pids.push_back(pid);
	}
	int failed = 0;
	for (pid_t pid : pids) {
		int st;
		if (waitpid(pid, &st, 0) < 0 || !WIFEXITED(st) || WEXITSTATUS(st) != 0)
			failed = 1;
	}
	if (!failed) {
		std::vector<double> tmax(iters, 0.0);
		long wrong = 0;
		for (int r = 0; r < nranks; r++) {
			wrong += sh->wrong[r];
			for (int i = 0; i < iters; i++)
				tmax[i] = std::max(tmax[i], sh->t[(size_t)r * iters + i]);
		}
		std::sort(tmax.begin(), tmax.end());
		double sec = iters % 2 ? tmax[iters / 2] : (tmax[iters / 2 - 1] + tmax[iters / 2]) / 2;
		double algbw = (double)(b.count * sizeof(float)) / sec / 1e9;
		printf("{\"bench\":\"gloo\",\"op\":\"%s\",\"bytes\":%zu,\"count\":%zu,"
		       "\"dtype\":\"float32\",\"redop\":\"sum\",\"ranks\":%d,\"inplace\":%s,"
		       "\"time_us\":%.3f,\"algbw_gbs\":%.4f,\"busbw_gbs\":%.4f,\"wrong\":%ld}\n",
		       op_names[op], b.count * sizeof(float), b.count, nranks,
		       op == OP_REDUCE_SCATTER ? "true" : "false", sec * 1e6, algbw,
		       algbw * busbw_factor(op, nranks), wrong);
		fflush(stdout);
	}
	munmap(sh, shbytes);
	return failed;
}

int main(int argc, char **argv)
{
	const char *sizes = NULL, *opname = NULL;
	int nranks = 4, warmup = 5, iters = 20, op = -1, rc = 0, seq = 0;

	for (int i = 1; i < argc; i++) {
		if (i + 1 >= argc)
			usage();
		if (!strcmp(argv[i], "-n"))
			nranks = atoi(argv[++i]);
		else if (!strcmp(argv[i], "-o"))
			opname = argv[++i];
		else if (!strcmp(argv[i], "-s"))
			sizes = argv[++i];
		else if (!strcmp(argv[i], "-w"))
			warmup = atoi(argv[++i]);
		else if (!strcmp(argv[i], "-i"))
			iters = atoi(argv[++i]);
		else
			usage();
	}
	op = op_find(opname);
	if (op < 0 || !sizes || nranks < 1 || nranks > 64 || warmup < 0 || iters < 1)
		usage();

	const char *tmp = getenv("TMPDIR");
	std::string templ = std::string(tmp && *tmp ? tmp : "/tmp") + "/gloo-bench.XXXXXX";
	std::vector<char> dir(templ.begin(), templ.end());
	dir.push_back('\0');
	if (!mkdtemp(dir.data())) {
		perror("gloo-bench: mkdtemp");
		return 1;
	}
	std::string list(sizes);
	size_t pos = 0;
	while (pos <= list.size()) {
		size_t comma = list.find(',', pos);
		if (comma == std::string::npos)
			comma = list.size();
		std::string tok = list.substr(pos, comma - pos);
		if (!tok.empty() &&
		    bench_size((enum op)op, nranks, parse_size(tok.c_str()), warmup, iters, dir.data(),
			       seq++))
			rc = 1;
		pos = comma + 1;
	}
	std::string rm = std::string("rm -rf ") + dir.data();
	if (system(rm.c_str()) != 0)
		rc = 1;
	return rc;
}
