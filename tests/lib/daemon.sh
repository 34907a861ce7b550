# daemon.sh: sourced by the shell tests: a commd on a socket in a temp dir,
# ready when it answers commctl (connect + handshake), and a clean stop.
: "${COMMD:=./daemon/commd}" "${COMMCTL:=./client/commctl}" "${COMMRUN:=./client/commrun}"
: "${COMM_DEMOS:=./tests/demos}"

# daemon_start PREFIX [COMMD ARGS]: sets $dir, $sock and $pid; removes $dir at exit
daemon_start() {
	local b
	for b in "$COMMD" "$COMMCTL"; do
		[ -x "$b" ] || { echo "FAIL: no program $b (set COMMD and COMMCTL)"; exit 1; }
	done
	dir=$(mktemp -d "/tmp/$1-XXXXXX")
	shift
	sock=$dir/commd.sock
	trap 'kill "$pid" 2>/dev/null; rm -rf "$dir"' EXIT
	"$COMMD" --foreground --config /dev/null --socket "$sock" "$@" 2>"$dir/commd.log" &
	pid=$!
	until "$COMMCTL" --socket "$sock" status >/dev/null 2>&1; do
		kill -0 "$pid" 2>/dev/null || { echo "FAIL: commd exited"; cat "$dir/commd.log"; exit 1; }
		sleep 0.02
	done
}

# daemon_stop: SIGTERM; fails the test unless commd exits 0 with no error line
daemon_stop() {
	kill -TERM "$pid"
	if ! wait "$pid"; then echo "FAIL: commd did not exit cleanly"; cat "$dir/commd.log"; exit 1; fi
	if grep -q " error: " "$dir/commd.log"; then echo "FAIL: commd logged errors"; cat "$dir/commd.log"; exit 1; fi
}
