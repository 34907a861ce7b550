#!/bin/bash
# test-man.sh: the man pages render without a warning and keep up with the
# code. Every option commd, commctl, commrun and commbench print in --help
# is in its page's OPTIONS, every key daemon/config.c takes is in commd.8's
# CONFIGURATION FILE, every commctl command in COMMANDS, every variable the
# programs and libcomm read or set in ENVIRONMENT, every symbol libcomm
# exports (client/libcomm.sym, its globs matched against comm.h and the built
# library) in libcomm.3's SYNOPSIS and text, and every result code, dtype and
# reduction of comm.h in libcomm.3. Options are written \-\- in the sources;
# each page's .TH names this commd's version; the EXAMPLE in libcomm.3
# compiles against comm.h; commd --help's usage lines name every option it
# describes. Skips (77) without groff.
# The lists of names below are split into words on purpose.
# shellcheck disable=SC2046,SC2086,SC2015
set -u
COMMD=${COMMD:-./daemon/commd}
COMMCTL=${COMMCTL:-./client/commctl}
COMMRUN=${COMMRUN:-./client/commrun}
COMMBENCH=${COMMBENCH:-./client/commbench}
src=$(cd "${srcdir:-.}" && pwd)
man=$src/man
fail=0
bad() { echo "FAIL: $*"; fail=1; }

command -v groff >/dev/null || { echo "no groff: skipped"; exit 77; }
dir=$(mktemp -d /tmp/commd-man-XXXXXX)
trap 'rm -rf "$dir"' EXIT
pages="commd.8 commctl.8 commrun.1 commbench.1 libcomm.3"

# --- rendering ---------------------------------------------------------------
# The text the checks below read: ASCII, no emphasis, and lines so long that
# no paragraph is broken (or hyphenated) in the middle of a name.
for p in $pages; do
	if [ ! -f "$man/$p" ]; then
		bad "$p: no such page in $man"
		continue
	fi
	err=$(groff -man -ww -z -Tutf8 "$man/$p" 2>&1 >/dev/null)
	if [ -z "$err" ]; then
		echo "ok: $p: groff -man -ww: no warnings"
	else
		bad "$p: groff -man -ww: $err"
	fi
	# man-db's man, as a reader would run it (its own complaints aside)
	if man --help 2>&1 | grep -q -- --warnings; then
		err=$(LC_ALL=C MANWIDTH=80 man --warnings -l "$man/$p" 2>&1 >/dev/null |
			grep -E 'warning|error')
		[ -z "$err" ] && echo "ok: $p: man --warnings -l: no warnings" ||
			bad "$p: man --warnings -l: $err"
	fi
	groff -man -Tascii -P-cbou -rLL=30000n "$man/$p" >"$dir/$p.txt" 2>/dev/null
	# a bare - before an option renders as a hyphen, not a minus one can type
	raw=$(grep -vE '^\.\\"' "$man/$p" | grep -nE '(^|[^\\a-zA-Z0-9])--?[a-zA-Z]' | head -3)
	[ -z "$raw" ] && echo "ok: $p: options are written \\-" ||
		bad "$p: an option written with a bare '-' (write \\-): $raw"
done

# The text of section $2 (its heading as rendered) of page $1.
section() {
	awk -v want="$2" '/^[A-Z]/ { on = ($0 == want); next } on' "$dir/$1.txt" 2>/dev/null
}

# Whether word $2 appears in text $1 on its own (not inside a longer name).
has_word() {
	grep -qE -e "(^|[^A-Za-z0-9_-])$2([^A-Za-z0-9_-]|\$)" <<<"$1"
}

# check PAGE SECTION WHAT WORD...: each WORD appears in SECTION of PAGE.
check() {
	local page=$1 sec=$2 what=$3 text w n=0 missing=0
	shift 3
	text=$(section "$page" "$sec")
	if [ -z "$text" ]; then
		bad "$page: no $sec section (looking for $what)"
		return
	fi
	if [ $# -eq 0 ]; then
		bad "$page: found no $what to look for"
		return
	fi
	for w in "$@"; do
		n=$((n + 1))
		if ! has_word "$text" "$w"; then
			bad "$page: $w ($what) is not in $sec"
			missing=1
		fi
	done
	[ $missing -eq 0 ] && echo "ok: $page: $sec has all $n $what"
}

# The string literals on the lines of files that call one of the functions $1
# (getenv|setenv, ...) or in arrays named *_vars, that look like variables.
env_names() {
	local calls=$1
	shift
	awk -v calls="$calls" '
		/_vars\[\] *=/ { arr = 1 }
		arr || $0 ~ "(" calls ")\\(" {
			s = $0
			while (match(s, /"[A-Z][A-Z0-9_]*"/)) {
				print substr(s, RSTART + 1, RLENGTH - 2)
				s = substr(s, RSTART + RLENGTH)
			}
		}
		arr && /};/ { arr = 0 }' "$@" | sort -u
}

help_longs() { grep -oE -- '--[a-z][a-z0-9-]*' | sort -u; }
help_shorts() { grep -oE -- '(^|[[:space:],[])-[a-zA-Z]([][[:space:],]|$)' | tr -d ' ,[]' | sort -u; }

# --- commd.8 -----------------------------------------------------------------
if help=$("$COMMD" --help 2>&1); then
	check commd.8 OPTIONS "options of commd --help" $(help_longs <<<"$help")
	# the usage lines, before the first option described, name every option
	synopsis=$(sed '/^  --/,$d' <<<"$help")
	missing=
	for o in $(sed -n '/^  --/,$p' <<<"$help" | help_longs); do
		grep -qE -e "\[$o[] ]" <<<"$synopsis" || missing="$missing $o"
	done
	[ -z "$missing" ] && echo "ok: commd --help: its usage lines name every option it describes" ||
		bad "commd --help: options described but not in its usage lines:$missing"
else
	bad "$COMMD --help failed: $help"
fi
keys=$(grep -oE 'strcmp\(key, "[a-z0-9-]+"\)' "$src/daemon/config.c" | sed 's/.*"\(.*\)".*/\1/' | sort -u)
check commd.8 "CONFIGURATION FILE" "keys of daemon/config.c" $keys
# the help says the keys are the long flags' names
nokey=
for k in $keys; do
	grep -qE -e "--$k([^a-z0-9-]|\$)" <<<"$help" || nokey="$nokey $k"
done
[ -z "$nokey" ] && echo "ok: every config key is a flag of commd --help" ||
	bad "config keys that are not flags of commd --help:$nokey"
check commd.8 ENVIRONMENT "variables daemon/ reads" \
	$(env_names getenv "$src"/daemon/*.c)

# --- commctl.8 ---------------------------------------------------------------
if help=$("$COMMCTL" --help 2>&1); then
	check commctl.8 OPTIONS "options of commctl --help" $(help_longs <<<"$help")
	cmds=$(sed -n '/^commands:/,$p' <<<"$help" | sed -n 's/^  \([a-z][a-z-]*\) .*/\1/p')
	# a command is a tag: at the start of a line of COMMANDS
	text=$(section commctl.8 COMMANDS)
	n=0
	missing=0
	for c in $cmds; do
		n=$((n + 1))
		grep -qE "^ +$c( |\$)" <<<"$text" || { bad "commctl.8: command $c is not in COMMANDS"; missing=1; }
	done
	[ $n -eq 0 ] && bad "commctl --help lists no commands"
	[ $n -gt 0 ] && [ $missing -eq 0 ] && echo "ok: commctl.8: COMMANDS has all $n commands of commctl --help"
else
	bad "$COMMCTL --help failed: $help"
fi
check commctl.8 ENVIRONMENT "variables commctl reads" \
	$(env_names getenv "$src/client/commctl.c" "$src"/client/ctl-*.c)

# --- commrun.1 ---------------------------------------------------------------
if help=$("$COMMRUN" --help 2>&1); then
	check commrun.1 OPTIONS "options of commrun --help" \
		$(help_longs <<<"$help") $(help_shorts <<<"$help")
	check commrun.1 ENVIRONMENT "variables commrun --help names" \
		$(grep -oE '\b[A-Z]+_[A-Z_]+\b' <<<"$help" | sort -u)
else
	bad "$COMMRUN --help failed: $help"
fi
check commrun.1 ENVIRONMENT "variables commrun sets or reads" \
	$(env_names 'getenv|setenv|set_env' "$src/client/commrun.c")

# --- commbench.1 -------------------------------------------------------------
if help=$("$COMMBENCH" --help 2>&1); then
	check commbench.1 OPTIONS "options of commbench --help" \
		$(help_longs <<<"$help") $(help_shorts <<<"$help")
	check commbench.1 ENVIRONMENT "variables commbench --help names" \
		$(grep -oE '\$[A-Z][A-Z_]*' <<<"$help" | tr -d '$' | sort -u)
else
	bad "$COMMBENCH --help failed: $help"
fi
check commbench.1 ENVIRONMENT "variables commbench reads" \
	$(env_names getenv "$src/client/commbench.c" "$src"/client/bench-*.c)

# --- libcomm.3 ---------------------------------------------------------------
# comm.h without its comments
awk '{
	s = $0; out = ""
	while (s != "") {
		if (inc) { i = index(s, "*/"); if (!i) { s = ""; break } s = substr(s, i + 2); inc = 0 }
		else { i = index(s, "/*"); if (!i) { out = out s; s = ""; break }
			out = out substr(s, 1, i - 1); s = substr(s, i + 2); inc = 1 }
	}
	print out }' "$src/client/comm.h" >"$dir/comm.h"
grep -oE '\bcomm_[a-z0-9_]+ *\(' "$dir/comm.h" | tr -d ' (' | sort -u >"$dir/declared"
lib=${LIBCOMM:-$(dirname "$COMMD")/../.libs/libcomm.so}
if [ -f "$lib" ] && command -v nm >/dev/null; then
	nm -D --defined-only "$lib" | awk '{ sub(/@.*/, "", $3); print $3 }' | grep . | sort -u >"$dir/exported"
else
	: >"$dir/exported"
fi
# the version script's global: names, its globs matched against both lists
syms=$(sed -n '/global:/,/local:/p' "$src/client/libcomm.sym" | sed '1d;$d' | tr -d ' \t;' | grep . |
	while read -r pat; do
		case $pat in
		*[*?[]*) cat "$dir/declared" "$dir/exported" | while read -r s; do
				# shellcheck disable=SC2254
				case $s in $pat) echo "$s" ;; esac
			done ;;
		*) echo "$pat" ;;
		esac
	done | sort -u)
check libcomm.3 SYNOPSIS "symbols of libcomm.sym" $syms
text=$(sed '/^SYNOPSIS$/,/^[A-Z]/d' "$dir/libcomm.3.txt")
missing=0
for s in $syms; do
	has_word "$text" "$s" || { bad "libcomm.3: $s is not described past SYNOPSIS"; missing=1; }
done
[ -n "$syms" ] && [ $missing -eq 0 ] && echo "ok: libcomm.3: every symbol is described past SYNOPSIS"
check libcomm.3 "RETURN VALUE" "result codes of comm.h" \
	$(grep -oE 'X\(COMM_[A-Z0-9_]+,' "$dir/comm.h" | sed 's/X(//; s/,//')
check libcomm.3 DESCRIPTION "dtypes and reductions of comm.h" \
	$(grep -oE '^[[:space:]]*COMM_[A-Z0-9_]+ = [0-9]+' "$dir/comm.h" | awk '{ print $1 }')
# libcomm's sources, as Makefile.am lists them
libsrc=$(awk -v src="$src" '/^libcomm_la_SOURCES *=/ { on = 1 }
	on { for (i = 1; i <= NF; i++) if ($i ~ /\.c$/) print src "/" $i; if (!/\\$/) on = 0 }' \
	"$src/Makefile.am" 2>/dev/null)
[ -n "$libsrc" ] || libsrc=$(ls "$src"/client/{comm,mem,ops,req,ring,gpu}.c)
check libcomm.3 ENVIRONMENT "variables libcomm reads" $(env_names getenv $libsrc)

# the EXAMPLE compiles against comm.h
if cc=${CC:-cc} && command -v "${cc%% *}" >/dev/null; then
	awk '/^\.SH EXAMPLE/ { e = 1 } e && /^\.EX/ { x = 1; next } x && /^\.EE/ { exit } x' \
		"$man/libcomm.3" | sed -e 's/\\e/\\/g' -e 's/\\-/-/g' >"$dir/example.c"
	if [ ! -s "$dir/example.c" ]; then
		bad "libcomm.3: no EXAMPLE program (.EX after .SH EXAMPLE)"
	elif out=$($cc -std=gnu11 -Wall -Wextra -Werror -fsyntax-only -I"$src/client" "$dir/example.c" 2>&1); then
		echo "ok: libcomm.3: the EXAMPLE compiles against comm.h"
	else
		bad "libcomm.3: the EXAMPLE does not compile: $out"
	fi
else
	echo "ok: libcomm.3: EXAMPLE not compiled (no C compiler)"
fi

# --- the version ---------------------------------------------------------------
ver=$("$COMMD" --version 2>/dev/null | awk '{ print $2 }')
stale=
for p in $pages; do
	[ -f "$man/$p" ] && ! grep -qE "^\.TH .*\"commd $ver\"" "$man/$p" && stale="$stale $p"
done
if [ -z "$ver" ]; then
	bad "$COMMD --version printed no version"
elif [ -z "$stale" ]; then
	echo "ok: every page is of commd $ver"
else
	bad "pages whose .TH is not of commd $ver:$stale"
fi
exit $fail
