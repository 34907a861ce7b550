#!/bin/bash
# test-install.sh: what `make install` puts on a node, used as a user would.
# Installs this build under a temp DESTDIR; every program, the library, its
# header and pkg-config file, the units, the sysusers.d file, the settings
# file and the man pages are there; a job built with
# `cc job.c $(pkg-config --cflags --libs comm)` runs 4 ranks under the
# installed commrun against the installed commd, values checked exactly, and
# so does a Python job with the installed package (where the system's python
# finds it); the installed commd.conf starts commd as it is and with every default
# written out, and names every key commd takes. Skips (77) without a C
# compiler or pkg-config.
set -u
src=$(cd "${srcdir:-.}" && pwd)
top=${abs_top_builddir:-$(pwd)}
CC=${CC:-cc}
fail=0
bad() { echo "FAIL: $*"; fail=1; }

for t in "$CC" pkg-config make; do
	command -v "$t" >/dev/null || { echo "no $t: skipped"; exit 77; }
done
tmp=$(mktemp -d /tmp/commd-install-XXXXXX)
pid=
trap '[ -n "$pid" ] && kill -9 $pid 2>/dev/null; rm -rf "$tmp"' EXIT
root=$tmp/root

# the make running this test shares nothing with this one: no jobserver
if ! env -u MAKEFLAGS -u MFLAGS -u MAKELEVEL make -s -C "$top" install DESTDIR="$root" \
	>"$tmp/install.log" 2>&1; then
	bad "make install DESTDIR=...: $(tail -20 "$tmp/install.log")"
	exit 1
fi
vars=$(env -u MAKEFLAGS -u MFLAGS -u MAKELEVEL make -s -C "$top" --no-print-directory \
	-f Makefile -f - print-dirs <<'EOF'
print-dirs:
	@echo "sbindir=$(sbindir) bindir=$(bindir) libdir=$(libdir) includedir=$(includedir)"
	@echo "sysconfdir=$(sysconfdir) mandir=$(mandir) unitdir=$(systemdsystemunitdir)"
	@echo "sysusersdir=$(sysusersdir) pythondir=$(pythondir) prefix=$(prefix)"
EOF
)
eval "$(sed 's/ /\n/g' <<<"$vars")"
for f in "$sbindir/commd" "$bindir/commctl" "$bindir/commrun" "$bindir/commbench" \
	"$libdir/libcomm.so" "$includedir/comm.h" "$libdir/pkgconfig/comm.pc" \
	"$unitdir/commd.service" "$unitdir/commd.socket" "$sysusersdir/commd.conf" \
	"$sysconfdir/commd/commd.conf" "$mandir/man8/commd.8" "$mandir/man8/commctl.8" \
	"$mandir/man1/commrun.1" "$mandir/man1/commbench.1" "$mandir/man3/libcomm.3"; do
	[ -e "$root$f" ] || bad "make install did not install $f"
done
[ -e "$root$libdir/libcomm.a" ] && bad "a static libcomm.a was installed"
grep -q "^ExecStart=$sbindir/commd " "$root$unitdir/commd.service" ||
	bad "the installed commd.service does not start $sbindir/commd: $(grep ExecStart "$root$unitdir/commd.service")"
[ $fail -eq 0 ] && echo "ok: make install: programs, library, header, comm.pc, units, sysusers.d, commd.conf, man pages"

# a job built the way libcomm(3) says, against the installed files alone
cat >"$tmp/job.c" <<'EOF'
#include <comm.h>
#include <stdio.h>

int main(void)
{
	comm_t *c;
	int v[3], all[12], r, n, bad = 0;

	if (comm_init(&c, NULL) != COMM_OK) {
		fprintf(stderr, "comm_init: %s\n", comm_last_error(NULL));
		return 1;
	}
	r = comm_rank(c);
	n = comm_size(c);
	for (int i = 0; i < 3; i++)
		v[i] = (r + 1) * (i + 1);
	if (comm_allreduce(c, v, v, 3, COMM_INT32, COMM_SUM, NULL) != COMM_OK ||
	    comm_allgather(c, &r, all, 1, COMM_INT32, NULL) != COMM_OK) {
		fprintf(stderr, "rank %d: %s\n", r, comm_last_error(c));
		return 1;
	}
	for (int i = 0; i < 3; i++)
		bad |= v[i] != n * (n + 1) / 2 * (i + 1);
	for (int i = 0; i < n; i++)
		bad |= all[i] != i;
	printf("rank %d of %d: sum %d %d %d, gather ok %d\n", r, n, v[0], v[1], v[2], !bad);
	comm_finalize(c);
	return bad;
}
EOF
export PKG_CONFIG_SYSROOT_DIR=$root PKG_CONFIG_LIBDIR=$root$libdir/pkgconfig
flags=$(pkg-config --cflags --libs comm 2>&1) || bad "pkg-config --cflags --libs comm: $flags"
unset PKG_CONFIG_SYSROOT_DIR PKG_CONFIG_LIBDIR
case $flags in
*"-I$root$includedir"*"-L$root$libdir"*"-lcomm"*) ;;
*) bad "pkg-config --cflags --libs comm: '$flags'" ;;
esac
# (and this build's sanitizers, which the installed libcomm was built with)
# shellcheck disable=SC2086 # flags are words
if ! out=$("$CC" ${SAN_LDFLAGS:-} -o "$tmp/job" "$tmp/job.c" $flags 2>&1); then
	bad "cc job.c \$(pkg-config --cflags --libs comm): $out"
fi
export LD_LIBRARY_PATH=$root$libdir
lib=$(ldd "$tmp/job" 2>/dev/null | sed -n 's/.*libcomm.so.* => \([^ ]*\).*/\1/p')
[ "$lib" = "$root$libdir/libcomm.so.0" ] || bad "the job found libcomm at '$lib', not the installed one"

# serving SOCK LOG: wait up to 30 s for the installed commd to answer on SOCK
serving() {
	for _ in $(seq 300); do
		"$root$bindir/commctl" --socket "$1" status >/dev/null 2>&1 && return 0
		kill -0 "$pid" 2>/dev/null || break
		sleep 0.1
	done
	bad "the installed commd does not answer on $1: $(tail -5 "$2")"
	return 1
}

conf=$root$sysconfdir/commd/commd.conf
"$root$sbindir/commd" --foreground --config "$conf" --socket "$tmp/commd.sock" \
	2>"$tmp/commd.log" &
pid=$!
serving "$tmp/commd.sock" "$tmp/commd.log"
jobout=$("$root$bindir/commrun" -n 4 --socket "$tmp/commd.sock" "$tmp/job" 2>&1)
n=$(grep -c "sum 10 20 30, gather ok 1" <<<"$jobout")
[ "$n" = 4 ] || bad "the installed job under the installed commrun and commd: $jobout"
st=$("$root$bindir/commctl" --socket "$tmp/commd.sock" status 2>&1)
grep -q "^commd [0-9.]*, pid $pid, " <<<"$st" || bad "the installed commctl status: $st"
# the Python package, where the system's python finds it, loading the
# installed libcomm.so.0 through the dynamic linker (LD_LIBRARY_PATH above)
# shellcheck disable=SC2154 # pythondir and prefix come from print-dirs
if [ "${PYTHON:-:}" != : ] && [ -z "${SAN_LDFLAGS:-}" ] && "$PYTHON" -c 'import numpy' 2>/dev/null; then
	[ -e "$root$pythondir/commd/__init__.py" ] || bad "the Python package is not in $pythondir"
	case $prefix in
	/usr | /usr/local)
		"$PYTHON" -c "import sys; sys.exit('$pythondir' not in sys.path)" ||
			bad "$pythondir is not in $PYTHON's sys.path" ;;
	esac
	cat >"$tmp/job.py" <<'EOF'
import sys
import numpy as np
import commd
commd.init()
v = np.arange(3, dtype=np.int64) + commd.get_rank()
commd.all_reduce(v)
sys.stdout.write(f"rank {commd.get_rank()}: {v.tolist()} from {commd.__file__}\n")  # one write
commd.finalize()
EOF
	out=$(env -u COMMD_LIBCOMM PYTHONPATH="$root$pythondir" PYTHONDONTWRITEBYTECODE=1 \
		"$root$bindir/commrun" -n 2 --socket "$tmp/commd.sock" "$PYTHON" "$tmp/job.py" 2>&1)
	[ "$(grep -c "^rank [01]: \[1, 3, 5\] from $root$pythondir/commd/__init__.py$" <<<"$out")" = 2 ] ||
		bad "a Python job with the installed package: $out"
	[ $fail -eq 0 ] && echo "ok: python: the installed package in $pythondir ran a 2-rank job"
else
	echo "ok: python: skipped (no python with numpy, or an ASan build)"
fi

kill -TERM $pid
wait $pid || bad "the installed commd exited $? (log: $(tail -5 "$tmp/commd.log"))"
pid=
[ $fail -eq 0 ] && echo "ok: a job built with pkg-config ran 4 ranks on the installed commd: ${jobout%%$'\n'*}"

# the settings file: every default written out still starts commd, and it
# names every key (the long flags of commd --help that take a value)
sed 's/^#\([a-z-]* = \)/\1/' "$conf" >"$tmp/defaults.conf"
grep -q "^max-write-queue = 16M$" "$tmp/defaults.conf" || bad "uncommenting the defaults failed"
"$root$sbindir/commd" --foreground --config "$tmp/defaults.conf" --socket "$tmp/d.sock" \
	2>"$tmp/defaults.log" &
pid=$!
serving "$tmp/d.sock" "$tmp/defaults.log"
kill -TERM $pid
wait $pid || bad "commd with the defaults exited $?"
pid=
keys=$("$root$sbindir/commd" --help 2>&1 | grep -o -- '--[a-z-]* [A-Z|a-z]' |
	sed 's/^--\([a-z-]*\) .*/\1/' | grep -v '^config$' | sort -u)
missing=
for k in $keys; do
	grep -qE "^#? ?$k = " "$conf" || missing="$missing $k"
done
[ -z "$missing" ] || bad "commd.conf does not name these keys:$missing"
[ $fail -eq 0 ] && echo "ok: commd.conf: starts commd as installed and with its defaults written out; names all $(wc -w <<<"$keys") keys"
exit $fail
