#!/bin/bash
# compare.sh: race commd (commbench) against Open MPI, MPICH and Gloo on this
# machine, 4 ranks, float32 sum, and print one table with the targets of the
# benchmark issue. Not part of make check; run as root on Debian 12.
set -eu

usage() {
	cat <<'EOF'
usage: bash tests/bench/compare.sh [--build DIR] [--no-install] [--quick]
           [--rounds N] [--out FILE] [--report FILE] [--peers LIST] [--timeout SEC] [--keep]
           [--allreduce-sizes LIST] [--sizes LIST] [--nodes N]

  --build DIR   build directory with daemon/commd and client/commbench
                (default: $BUILD, else build-ci or build under the repository;
                if none exists, the repository is built in a temp dir)
  --no-install  do not apt-get install the peers (Open MPI, MPICH, Gloo, g++)
  --quick       small sizes and fewer iterations, to try the script end to end
  --rounds N    run every bench N times, in turn, and take each figure's
                median over the rounds (default 3; 1 with --quick)
  --out FILE    where the raw JSON lines go (default /tmp/commd-compare-DATE.jsonl)
  --report FILE print the table of the JSON lines of an earlier run, run nothing
  --peers LIST  comma list out of openmpi,openmpi-ucx,mpich,gloo,openmpi-tcp
                (default: all but openmpi-tcp; with --nodes: openmpi-tcp)
  --nodes N     commd as N daemons on this machine (peer listeners on
                loopback), the ranks in equal blocks over them, joined by a
                root: the path of a job over N nodes. The peer is then Open
                MPI forced over TCP (pml ob1, btl tcp,self); no targets
  --timeout SEC limit of one benchmark run (one op at one size), default 300
  --keep        keep the work dir (binaries, logs)
  --allreduce-sizes LIST, --sizes LIST
                bytes (K, M, G suffixes) for allreduce and for reduce_scatter,
                allgather, broadcast (also $AR_SIZES, $COLL_SIZES)
EOF
	exit 2
}

root=$(cd "$(dirname "$0")/../.." && pwd)
bench_src=$root/tests/bench
build=${BUILD:-}
install=1
quick=0
rounds=
report=
out=
peers=
nodes=1
limit=300
keep=0
ranks=4
ar_sizes=${AR_SIZES:-8,64K,1M,16M,64M,400M}
coll_sizes=${COLL_SIZES:-1M,16M,64M,400M}
ar_set=${AR_SIZES:+1}
coll_set=${COLL_SIZES:+1}

while [ $# -gt 0 ]; do
	case $1 in
	--build) build=${2:?}; shift ;;
	--no-install) install=0 ;;
	--quick) quick=1 ;;
	--rounds) rounds=${2:?}; shift ;;
	--out) out=${2:?}; shift ;;
	--report) report=${2:?}; shift ;;
	--peers) peers=${2:?}; shift ;;
	--timeout) limit=${2:?}; shift ;;
	--keep) keep=1 ;;
	--allreduce-sizes) ar_sizes=${2:?}; ar_set=1; shift ;;
	--sizes) coll_sizes=${2:?}; coll_set=1; shift ;;
	--nodes) nodes=${2:?}; shift ;;
	-h | --help) usage ;;
	*) echo "compare.sh: unknown argument $1" >&2; usage ;;
	esac
	shift
done
[ -n "$rounds" ] || { [ "$quick" = 1 ] && rounds=1 || rounds=3; }
case $nodes in '' | *[!0-9]* | 0) echo "compare.sh: --nodes wants a positive number" >&2; usage ;; esac
[ -n "$peers" ] || { [ "$nodes" -gt 1 ] && peers=openmpi-tcp || peers=openmpi,openmpi-ucx,mpich,gloo; }
case $rounds in '' | *[!0-9]* | 0) echo "compare.sh: --rounds wants a positive number" >&2; usage ;; esac
if [ "$quick" = 1 ]; then
	[ -n "${ar_set:-}" ] || ar_sizes=8,64K,1M
	[ -n "${coll_set:-}" ] || coll_sizes=1M
fi
[ -n "$out" ] || out=/tmp/commd-compare-$(date +%Y%m%d-%H%M%S).jsonl
if [ -x /usr/bin/python3 ]; then py=/usr/bin/python3; else py=python3; fi

work=$(mktemp -d /tmp/commd-compare.XXXXXX)
daemon_pids=()
cleanup() {
	if [ ${#daemon_pids[@]} -gt 0 ]; then
		kill -TERM "${daemon_pids[@]}" 2>/dev/null || true
		wait "${daemon_pids[@]}" 2>/dev/null || true
	fi
	if [ "$keep" = 1 ]; then echo "work dir kept: $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM
[ -n "$report" ] && out=$report || : >"$out"
notes=$work/notes
: >"$notes"
note() { echo "$*" >>"$notes"; echo "compare.sh: $*" >&2; }
start_time=$(date +%s)

if [ -z "$report" ]; then
# --- packages -----------------------------------------------------------------
if [ "$install" = 1 ]; then
	pkgs=(openmpi-bin libopenmpi-dev mpich libmpich-dev libgloo-dev g++ gcc)
	echo "installing: ${pkgs[*]}" >&2
	export DEBIAN_FRONTEND=noninteractive
	if ! apt-get install -y -qq "${pkgs[@]}" >"$work/apt.log" 2>&1; then
		apt-get update -qq >>"$work/apt.log" 2>&1 || true
		apt-get install -y -qq "${pkgs[@]}" >>"$work/apt.log" 2>&1 ||
			{ tail -5 "$work/apt.log" >&2; note "apt-get install failed (see above); going on with what is there"; }
	fi
fi

# --- commd and commbench -------------------------------------------------------
if [ -z "$build" ]; then
	for d in "$root/build-ci" "$root/build"; do
		if [ -x "$d/daemon/commd" ]; then build=$d; break; fi
	done
fi
if [ -z "$build" ]; then
	echo "no build dir found: building the repository in $work/build" >&2
	[ "$install" = 0 ] || bash "$root/scripts/install-deps.sh" >"$work/deps.log" 2>&1 || true
	(cd "$root" && autoreconf -fi) >"$work/build.log" 2>&1
	mkdir "$work/build"
	(cd "$work/build" && "$root/configure" -q && make -j"$(nproc)") >>"$work/build.log" 2>&1 ||
		{ tail -20 "$work/build.log" >&2; echo "compare.sh: build failed" >&2; exit 1; }
	build=$work/build
fi
[ -d "$build" ] || [ ! -d "$root/$build" ] || build=$root/$build
[ -d "$build" ] || { echo "compare.sh: no build dir $build" >&2; exit 1; }
build=$(cd "$build" && pwd)
commd=$build/daemon/commd
commbench=$build/client/commbench
have_commd=1
[ -x "$commd" ] || { note "commd: no $commd"; have_commd=0; }
[ -x "$commbench" ] || { note "commd: no $commbench (commbench not built yet)"; have_commd=0; }

# --- the peers' benchmarks -------------------------------------------------------
gcc -std=gnu11 -O2 -ftree-vectorize -fvect-cost-model=dynamic -pthread \
	-o "$work/membw" "$bench_src/membw.c"
have_peer() {
	case ,$peers, in *,$1,*) return 0 ;; esac
	return 1
}
if have_peer openmpi || have_peer openmpi-ucx || have_peer openmpi-tcp; then
	mpicc.openmpi -O2 -o "$work/mpi-bench-openmpi" "$bench_src/mpi-bench.c" 2>"$work/cc-openmpi.log" ||
		note "openmpi: mpicc.openmpi failed: $(head -1 "$work/cc-openmpi.log")"
fi
if have_peer mpich; then
	mpicc.mpich -O2 -o "$work/mpi-bench-mpich" "$bench_src/mpi-bench.c" 2>"$work/cc-mpich.log" ||
		note "mpich: mpicc.mpich failed: $(head -1 "$work/cc-mpich.log")"
fi
if have_peer gloo; then
	g++ -std=c++17 -O2 -pthread -o "$work/gloo-bench" "$bench_src/gloo-bench.cc" -lgloo \
		2>"$work/cc-gloo.log" || note "gloo: build failed: $(head -1 "$work/cc-gloo.log")"
fi

# --- the schedule: warmup and iterations for a size ------------------------------
to_bytes() {
	case $1 in
	*[Kk]) echo $((${1%?} * 1024)) ;;
	*[Mm]) echo $((${1%?} * 1024 * 1024)) ;;
	*[Gg]) echo $((${1%?} * 1024 * 1024 * 1024)) ;;
	*) echo "$1" ;;
	esac
}
# Many iterations for latency, a few for 400 MiB (several seconds an op for some
# peers; fewer when there are rounds to take the median over); three rounds take
# about 25 minutes on a 2-core VM, one about 10.
schedule() {
	local b=$1 w i
	if [ "$b" -le 4096 ]; then w=100; i=1000
	elif [ "$b" -le 262144 ]; then w=20; i=200
	elif [ "$b" -le 4194304 ]; then w=10; i=100
	elif [ "$b" -le 33554432 ]; then w=5; i=30
	elif [ "$b" -le 134217728 ]; then w=2; i=10
	else w=1; i=5; fi
	if [ "$rounds" -gt 1 ] && [ "$b" -gt 33554432 ]; then w=1; i=$((i / 2 + 1)); fi
	if [ "$quick" = 1 ]; then w=$(((w + 4) / 5)); i=$(((i + 4) / 5)); fi
	echo "$w $i"
}

# One run of one bench at one op and size; its JSON lines go to $out.
run_point() {
	local name=$1 op=$2 bytes=$3 w i log rc=0 args why last
	read -r w i <<<"$(schedule "$bytes")"
	read -ra args <<<"$(point_args "$name" "$bytes" "$w" "$i")"
	log=$work/logs/$name-$op-$bytes-$round.log
	shift 3
	printf '  %-12s %-15s %10s B  (%s warmup, %s iters)\n' "$name" "$op" "$bytes" "$w" "$i" >&2
	timeout -k 10 "$limit" "$@" -o "$op" "${args[@]}" >"$log.out" 2>"$log" || rc=$?
	grep '^{' "$log.out" | sed "s/^{/{\"round\":$round,/" >>"$out" || true
	if [ "$rc" != 0 ]; then
		[ "$rc" = 124 ] && why="timed out after ${limit}s" || why="exit $rc"
		last=$(grep -v '^$' "$log" | tail -1 | cut -c1-160) || true
		note "$name $op $bytes B: $why${last:+: $last}"
	fi
}
point_args() {
	case $1 in
	commd) echo "-d float -r sum -b $2 -e $2 -f 2 -w $3 -i $4 -c 0 --json" ;;
	*) echo "-s $2 -w $3 -i $4" ;;
	esac
}
run_all() {
	local name=$1 s
	shift
	for s in ${ar_sizes//,/ }; do run_point "$name" allreduce "$(to_bytes "$s")" "$@"; done
	for op in reduce_scatter allgather broadcast; do
		for s in ${coll_sizes//,/ }; do run_point "$name" $op "$(to_bytes "$s")" "$@"; done
	done
}
mkdir -p "$work/logs"

# --- run ----------------------------------------------------------------------------
# Every bench once per round, in turn, so a slow spell of the machine hits one
# round of each rather than all of one bench.
run_round() {
	echo "membw" >&2
	"$work/membw" 400 2 5 | sed "s/^{/{\"round\":$round,/" >>"$out" || note "membw failed in round $round"

	if [ "$have_commd" = 1 ]; then
		echo "commd ($build, $nodes daemon(s))" >&2
		socks=
		root_addr=
		for d in $(seq "$nodes"); do
			sock=$work/commd-$d.sock
			rm -f "$sock"
			listen=()
			[ "$nodes" -gt 1 ] && listen=(--peer-listen 127.0.0.1:0)
			"$commd" --foreground --config /dev/null --socket "$sock" "${listen[@]}" \
				>"$work/commd-$d.log" 2>&1 &
			daemon_pids+=($!)
			for _ in $(seq 100); do
				json=$("$build/client/commctl" --socket "$sock" status --json 2>/dev/null) && break
				sleep 0.1
			done
			[ -n "$root_addr" ] || root_addr=$(printf '%s' "$json" | sed -n 's/.*"peer_listen": "\([^"]*\)".*/\1/p')
			socks=${socks:+$socks,}$sock
		done
		if [ -S "$sock" ]; then
			if [ "$nodes" -gt 1 ]; then
				run_all commd "$commbench" -n "$ranks" --socket "$socks" --root "$root_addr"
			else
				run_all commd "$commbench" -n "$ranks" --socket "$sock"
			fi
		else
			note "commd: the daemon did not start: $(tail -1 "$work/commd-$nodes.log")"
		fi
		kill -TERM "${daemon_pids[@]}" 2>/dev/null || true
		wait "${daemon_pids[@]}" 2>/dev/null || note "commd: a daemon exited non-zero"
		daemon_pids=()
	fi

	if have_peer openmpi && [ -x "$work/mpi-bench-openmpi" ]; then
		echo "openmpi (pml ob1, btl vader)" >&2
		run_all openmpi "${ompi_run[@]}" --mca pml ob1 --mca btl self,vader \
			"$work/mpi-bench-openmpi" --bench openmpi
	fi
	if have_peer openmpi-ucx && [ -x "$work/mpi-bench-openmpi" ]; then
		echo "openmpi-ucx (pml ucx)" >&2
		run_all openmpi-ucx "${ompi_run[@]}" --mca pml ucx --mca pml_ucx_tls any --mca pml_ucx_devices any \
			"$work/mpi-bench-openmpi" --bench openmpi-ucx
	fi
	if have_peer openmpi-tcp && [ -x "$work/mpi-bench-openmpi" ]; then
		echo "openmpi-tcp (pml ob1, btl tcp,self)" >&2
		run_all openmpi-tcp "${ompi_run[@]}" --mca pml ob1 --mca btl self,tcp \
			"$work/mpi-bench-openmpi" --bench openmpi-tcp
	fi
	if have_peer mpich && [ -x "$work/mpi-bench-mpich" ]; then
		echo "mpich" >&2
		run_all mpich mpirun.mpich -np "$ranks" "$work/mpi-bench-mpich" --bench mpich
	fi
	if have_peer gloo && [ -x "$work/gloo-bench" ]; then
		echo "gloo (tcp on loopback)" >&2
		run_all gloo env TMPDIR="$work" "$work/gloo-bench" -n "$ranks"
	fi
}
ompi_run=(mpirun.openmpi --allow-run-as-root --oversubscribe -np "$ranks")
for round in $(seq "$rounds"); do
	echo "round $round of $rounds" >&2
	run_round
done

fi

# --- the table ------------------------------------------------------------------------
mem_kib=$(awk '/^MemTotal/ { print $2 }' /proc/meminfo)
cpu=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
{
	echo "machine: $(nproc) cores, ${cpu:-unknown CPU}, $((mem_kib / 1024 / 1024)) GiB memory, $(uname -sr)"
	echo "peers: Open MPI $(dpkg-query -W -f='${Version}' openmpi-bin 2>/dev/null || echo '?')," \
		"MPICH $(dpkg-query -W -f='${Version}' mpich 2>/dev/null || echo '?')," \
		"Gloo $(dpkg-query -W -f='${Version}' libgloo-dev 2>/dev/null || echo '?');" \
		"$ranks ranks, float32 sum, out of place"
	[ "$nodes" -gt 1 ] && echo "commd: $nodes daemons on this machine joined by a root (loopback), $((ranks / nodes)) ranks each; Open MPI over TCP"
	if [ -n "$report" ]; then
		echo "report of $report (the machine line is this one's)"
	else
		echo "run: $(($(date +%s) - start_time)) s, $rounds round(s); raw JSON lines: $out"
	fi
} >"$work/header"
"$py" - "$out" "$work/header" "$notes" "$ranks" "$peers" "$ar_sizes" "$coll_sizes" "$nodes" <<'EOF'
import json, sys

out, header, notes, ranks, peers, ar_sizes, coll_sizes, nodes = sys.argv[1:]
ranks = int(ranks)
nodes = int(nodes)
peers = peers.split(",")
benches = ["commd"] + peers


def to_bytes(s):
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1:].upper(), 1)
    return int(s[:-1] if mult > 1 else s) * mult


def human(b):
    for unit, div in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if b >= div and b % div == 0:
            return "%d %s" % (b // div, unit)
    return "%d B" % b


def median(v):
    v = sorted(v)
    return v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2


runs = {}
membws = []
for line in open(out):
    try:
        r = json.loads(line)
    except ValueError:
        continue
    if r.get("bench") == "membw":
        membws.append(r)
        continue
    if r.get("ranks") != ranks or r.get("dtype") != "float32":
        continue
    runs.setdefault((r["bench"], r["op"], int(r["bytes"])), []).append(r)

# One row per bench, op and size: the median over the rounds, out of place where
# the bench has it (Gloo's reduce-scatter is in place only); wrong if any round was.
rows = {}
for key, rs in runs.items():
    oop = [r for r in rs if not r.get("inplace")]
    rs = oop or rs
    row = dict(rs[0])
    row["rounds"] = len(rs)
    row["wrong"] = sum(r.get("wrong") or 0 for r in rs)
    for f in ("time_us", "busbw_gbs"):
        row[f] = median([r[f] for r in rs])
    rows[key] = row
membw = None
if membws:
    membw = dict(membws[0])
    membw["gbs"] = median([m["gbs"] for m in membws])
    membw["median_gbs"] = median([m["median_gbs"] for m in membws])
    membw["rounds"] = len(membws)

points = [("allreduce", to_bytes(s)) for s in ar_sizes.split(",") if s]
points += [(op, to_bytes(s)) for op in ("reduce_scatter", "allgather", "broadcast")
           for s in coll_sizes.split(",") if s]


def target(op, b):
    """(kind, factor): kind 'lat' = commd time <= factor x best peer time."""
    if nodes > 1:
        return None
    if op == "allreduce" and b <= 8:
        return ("lat", 2.0)
    if op == "allreduce" and b >= 64 << 20:
        return ("bw", 5.0)
    if op == "reduce_scatter" and b >= 16 << 20:
        return ("bw", 3.0)
    if op in ("allgather", "broadcast") and b >= 16 << 20:
        return ("bw", 1.2)
    return None


def fmt(v, lat):
    if v is None:
        return "-"
    return "%.1f" % v if lat else "%.3f" % v


head = ["op", "size"] + benches + ["best peer", "commd/best", "target", ""]
table = []
passed = missed = 0
for op, b in points:
    lat = op == "allreduce" and b <= 8
    field = "time_us" if lat else "busbw_gbs"
    vals = {}
    for name in benches:
        r = rows.get((name, op, b))
        ok = r is not None and not r.get("wrong")
        vals[name] = r[field] if ok else None
    have = [(vals[p], p) for p in peers if vals[p] is not None and vals[p] > 0]
    best = (min(have) if lat else max(have)) if have else None
    ratio = None
    if best and vals["commd"]:
        ratio = vals["commd"] / best[0]
    tgt = target(op, b)
    verdict = ""
    tgt_s = ""
    if tgt:
        kind, f = tgt
        tgt_s = ("<= %gx" if kind == "lat" else ">= %gx") % f
        if ratio is None:
            verdict = "-"
        elif (ratio <= f) if kind == "lat" else (ratio >= f):
            verdict = "PASS"
            passed += 1
        else:
            verdict = "MISS"
            missed += 1
    table.append([op, human(b) + (" (us)" if lat else "")]
                 + [fmt(vals[n], lat) for n in benches]
                 + ["%s %s" % (fmt(best[0], lat), best[1]) if best else "-",
                    "%.2fx" % ratio if ratio is not None else "-", tgt_s, verdict])

print(open(header).read().rstrip())
print("busbw in GB/s (nccl-tests' bus bandwidth, 1 GB = 1e9 B); 8 B all-reduce: time in us;")
print("commd: commbench -c 0 (inputs filled once); peers: results checked once, exactly")
print("each figure: the median over the rounds of one run's median (time of the slowest rank)")
print()
widths = [max(len(str(row[i])) for row in [head] + table) for i in range(len(head))]
for k, row in enumerate([head] + table):
    cells = [str(c).ljust(widths[i]) if i < 2 else str(c).rjust(widths[i])
             for i, c in enumerate(row)]
    print("  ".join(cells).rstrip())
    if k == 0:
        print("  ".join("-" * w for w in widths))

print()
if membw:
    bw = membw["gbs"] * 1e9
    print("memory: %.1f GB/s (4-buffer float32 sum, %d threads, %d MiB buffers, best of %d;"
          " median %.1f; medians over %d rounds)"
          % (membw["gbs"], membw.get("threads", 0), membw.get("buffer_mib", 0),
             membw.get("runs", 0), membw.get("median_gbs", 0), membw["rounds"]))
    # Each round's commd time against the bandwidth measured in that round,
    # then the median of those percentages.
    bw_of = {m.get("round", 0): m["gbs"] * 1e9 for m in membws}
    for b in (64 << 20, 400 << 20):
        # across daemons the network, not memory, is the bound
        if ("allreduce", b) not in points or nodes > 1:
            continue
        bound_us = 2.0 * ranks * b / bw * 1e6
        pcts = []
        for r in runs.get(("commd", "allreduce", b), []):
            rbw = bw_of.get(r.get("round", 0))
            if r.get("inplace") or r.get("wrong") or not rbw or r["time_us"] <= 0:
                continue
            pcts.append(2.0 * ranks * b / rbw * 1e6 / r["time_us"] * 100)
        if pcts:
            pct = median(pcts)
            ok = pct >= 50
            passed += ok
            missed += not ok
            print("allreduce %-8s memory bound %.0f us (2*N*S bytes), commd %.0f us: %.0f%% of bound"
                  " (rounds: %s)   target >= 50%%  %s"
                  % (human(b), bound_us, rows[("commd", "allreduce", b)]["time_us"], pct,
                     " ".join("%.0f%%" % x for x in pcts), "PASS" if ok else "MISS"))
        else:
            print("allreduce %-8s memory bound %.0f us, commd -   target >= 50%%  -"
                  % (human(b), bound_us))
else:
    print("memory: membw gave no result")
print()
if nodes == 1:
    print("targets: %d PASS, %d MISS" % (passed, missed))
if any(r.get("wrong") for r in rows.values()):
    print("wrong results (shown as -): " + ", ".join(
        "%s %s %s" % k for k, r in sorted(rows.items()) if r.get("wrong")))
if any(k[0] == "gloo" and k[1] == "reduce_scatter" for k in rows):
    print("note: gloo reduce_scatter is ReduceScatterHalvingDoubling, in place (Gloo has no other)")
for line in open(notes):
    print("note: " + line.rstrip())
EOF
