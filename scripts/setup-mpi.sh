#!/usr/bin/env bash
# Installs what `--features mpi` builds and runs with: OpenMPI (Debian's
# libopenmpi-dev, openmpi-bin) and libclang-dev (bindgen reads mpi.h).
# Does nothing when mpirun and libclang are already there.
set -euo pipefail
if command -v mpirun >/dev/null && ls /usr/lib/llvm-*/lib/libclang.so >/dev/null 2>&1; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q libopenmpi-dev openmpi-bin libclang-dev pkg-config
