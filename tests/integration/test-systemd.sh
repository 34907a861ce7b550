#!/bin/bash
# test-systemd.sh: the units as systemd reads them, and commd under socket
# activation. systemd-analyze verify and security --offline on
# systemd/commd.service (ExecStart pointing at this build) and commd.socket:
# no complaint, exposure 3.0 at most; KillMode=mixed, so a stop drains; the sysusers.d file parses. systemd-socket-activate hands commd a
# listening socket (LISTEN_FDS): it serves a job there, says so in its log,
# and leaves the socket file to its owner when it stops. Skips (77) without
# systemd's tools.
set -u
COMMD=${COMMD:-./daemon/commd}
COMMCTL=${COMMCTL:-./client/commctl}
COMMRUN=${COMMRUN:-./client/commrun}
DEMOS=${COMM_DEMOS:-./tests/demos}
src=$(cd "${srcdir:-.}" && pwd)
fail=0
bad() { echo "FAIL: $*"; fail=1; }

for t in systemd-analyze systemd-socket-activate; do
	command -v "$t" >/dev/null || { echo "no $t: skipped"; exit 77; }
done
dir=$(mktemp -d /tmp/commd-systemd-XXXXXX)
trap 'kill $act 2>/dev/null; rm -rf "$dir"' EXIT
act=

# the units, with ExecStart at this build's commd
sed "s|@unit_sbindir@|$(cd "$(dirname "$COMMD")" && pwd)|" "$src/systemd/commd.service.in" \
	>"$dir/commd.service"
cp "$src/systemd/commd.socket" "$dir/"
if out=$(systemd-analyze verify --man=no "$dir/commd.service" "$dir/commd.socket" 2>&1) &&
	[ -z "$out" ]; then
	echo "ok: systemd-analyze verify: no complaint"
else
	bad "systemd-analyze verify: $out"
fi
# systemctl stop drains: SIGTERM to commd alone, not its GPU workers in the same
# cgroup, and time for the default drain-timeout (2 s) within TimeoutStopSec
if grep -qx "KillMode=mixed" "$dir/commd.service" &&
	stop=$(sed -n 's/^TimeoutStopSec=\([0-9]*\)s$/\1/p' "$dir/commd.service") &&
	[ -n "$stop" ] && [ "$stop" -gt 2 ]; then
	echo "ok: KillMode=mixed, TimeoutStopSec=${stop}s"
else
	bad "commd.service: KillMode=mixed and a TimeoutStopSec past the drain: $(grep -E "^(KillMode|TimeoutStopSec)" "$dir/commd.service")"
fi
exposure=$(systemd-analyze security --offline=true "$dir/commd.service" 2>&1 |
	sed -n 's/.*Overall exposure level for commd.service: \([0-9.]*\).*/\1/p')
if [ -n "$exposure" ] && awk -v e="$exposure" 'BEGIN { exit !(e <= 3.0) }'; then
	echo "ok: systemd-analyze security --offline: exposure $exposure (3.0 at most)"
else
	bad "systemd-analyze security: exposure '${exposure:-none}', want 3.0 at most"
fi

# the sysusers.d file makes the user and group the units name
if out=$(systemd-sysusers --dry-run "$src/systemd/commd.sysusers" 2>&1) &&
	grep -qE "user 'commd'|commd.*already exists|Creating user" <<<"$out"; then
	echo "ok: systemd-sysusers --dry-run: $(head -1 <<<"$out")"
else
	bad "systemd-sysusers: $out"
fi

# socket activation: the manager listens; commd takes fd 3 on the first client
sock=$dir/commd.sock
systemd-socket-activate -l "$sock" "$COMMD" --foreground --config /dev/null \
	--log-level debug >"$dir/log" 2>&1 &
act=$!
for _ in $(seq 50); do [ -S "$sock" ] && break; sleep 0.1; done
out=$("$COMMRUN" -n 2 --socket "$sock" "$DEMOS/collectives" 2>&1)
if grep -q "Rank 1 \[after all-reduce\]: tensor(\[1., 3.\])" <<<"$out"; then
	echo "ok: a 2-rank job on the activated socket"
else
	bad "the job on the activated socket: $out"
fi
st=$("$COMMCTL" --socket "$sock" status 2>&1)
grep -q "socket:      $sock" <<<"$st" || bad "status does not show the socket: $st"
grep -q "listen: $sock, passed by the service manager" "$dir/log" ||
	bad "commd did not take the passed socket: $(cat "$dir/log")"
kill -TERM $act
wait $act
rc=$?
[ $rc -eq 0 ] || bad "commd under systemd-socket-activate exited $rc"
[ -S "$sock" ] || bad "commd removed the socket it was given"
grep -q "error:" "$dir/log" && bad "errors in the log: $(grep error: "$dir/log")"
act=
[ $fail -eq 0 ] && echo "ok: socket activation: served, shown, socket left to its owner, exit 0"
exit $fail
