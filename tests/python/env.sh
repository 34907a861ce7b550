# env.sh: sourced by the Python tests with the module they need (numpy or
# torch): $py, the first of $PYTHON (configure's), python3 and Debian's
# /usr/bin/python3 that imports it (the python3 first in PATH, pyenv's say,
# may lack what apt installed); the package from the source tree, libcomm
# from the build. Skips (77) without such a python, and when libcomm is
# built with ASan (a python that did not start with its runtime cannot load it).
: "${srcdir:=.}" "${abs_top_builddir:=$(pwd)}"
srcdir=$(cd "$srcdir" && pwd)
if [ -n "${SAN_LDFLAGS:-}" ]; then
	echo "SKIP: libcomm is built with ASan"; exit 77
fi
py=
for p in ${PYTHON:+"$PYTHON"} python3 /usr/bin/python3; do
	[ "$p" != : ] && "$p" -c "import $1" 2>/dev/null && { py=$p; break; }
done
if [ -z "$py" ]; then echo "SKIP: no python3 with $1"; exit 77; fi
export PYTHONPATH=$srcdir/client/python${PYTHONPATH:+:$PYTHONPATH}
export COMMD_LIBCOMM=$abs_top_builddir/.libs/libcomm.so.0
export PYTHONDONTWRITEBYTECODE=1 # no __pycache__ in the source tree
