#!/bin/bash
# install-deps.sh: the Debian 12 packages commd needs to build and test.
# Run as root. CUDA and NCCL are not Debian packages: configure finds them in
# /usr/local/cuda when they are there and builds without them otherwise.
set -euo pipefail
pkgs=(build-essential autoconf automake libtool pkg-config
      libuv1-dev libprotobuf-c-dev protobuf-c-compiler libinih-dev
      libucx-dev libhwloc-dev libsystemd-dev libcmocka-dev systemd
      groff-base man-db  # test-man.sh renders the man pages
      python3 python3-numpy python3-torch  # the Python package's tests
      clang libclang-rt-14-dev)  # clang and its libFuzzer: tests/fuzz/fuzz-conn
missing=()
for p in "${pkgs[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
