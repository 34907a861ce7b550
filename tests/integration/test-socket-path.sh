#!/bin/bash
# test-socket-path.sh: the collective, op and send/recv suites again with
# COMM_RING=0, so the socket path (Op/OpDone messages) stays covered now
# that libcomm posts through the shared-memory ring. The ranks the suites
# fork inherit the environment.
set -u

COMMD=${COMMD:-./daemon/commd}
case $COMMD in
*/daemon/commd) top=${COMMD%/daemon/commd} ;;
*) top=. ;;
esac
export COMM_RING=0
fail=0
for t in test-collectives test-ops test-p2p; do
	echo "== COMM_RING=0 $t"
	if ! "$top/tests/integration/$t"; then
		echo "FAIL: $t with COMM_RING=0"
		fail=1
	fi
done
exit $fail
