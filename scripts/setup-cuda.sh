#!/usr/bin/env bash
# CUDA's compiler and headers from PyPI (nvidia-cuda-nvcc, nvidia-cuda-crt,
# nvidia-nvvm, nvidia-cuda-cccl, nvidia-cuda-runtime; no driver and no GPU
# needed) into ~/.cache/fdpo/cuda-<version>, then the environment that
# candle's kernels build with, printed for eval:
#
#   eval "$(bash scripts/setup-cuda.sh)"
#   cargo check --features fdpo-cli/cuda       # what CI proves
#
# 13.0 by default: the lent GPUs' driver (580) loads PTX of CUDA 13.0, not
# newer. CUDA_COMPUTE_CAP defaults to 90 (H100/H200); nvidia-smi is not
# needed. A no-op download once installed.
set -euo pipefail
VERSION="${FDPO_CUDA_VERSION:-13.0}"
PREFIX="${FDPO_CUDA_PREFIX:-$HOME/.cache/fdpo/cuda-$VERSION}"
ROOT="$PREFIX/nvidia/cu${VERSION%%.*}"
if [ ! -x "$ROOT/bin/nvcc" ] || [ ! -f "$ROOT/include/crt/host_config.h" ] || [ ! -x "$ROOT/nvvm/bin/cicc" ]; then
    # The versions pinned together, without pip's unpinned dependencies.
    python3 -m pip install -q --no-deps --upgrade --target "$PREFIX" \
        "nvidia-cuda-nvcc==$VERSION.*" "nvidia-cuda-crt==$VERSION.*" "nvidia-nvvm==$VERSION.*" \
        "nvidia-cuda-cccl==$VERSION.*" "nvidia-cuda-runtime==$VERSION.*" >&2
fi
if [ ! -x "$ROOT/bin/nvcc" ] || [ ! -f "$ROOT/include/crt/host_config.h" ] || [ ! -x "$ROOT/nvvm/bin/cicc" ]; then
    echo "setup-cuda.sh: no nvcc (or its crt headers, or cicc) under $ROOT after installing; the wheels' layout changed?" >&2
    exit 1
fi
MAJOR="${VERSION%%.*}"
MINOR="${VERSION#*.}"
# cudarc's version number: 13.0 -> 13000.
printf 'export PATH="%s/bin:$PATH"\n' "$ROOT"
printf 'export CUDA_ROOT="%s" CUDA_PATH="%s"\n' "$ROOT" "$ROOT"
printf 'export CUDARC_CUDA_VERSION=%d%03d\n' "$MAJOR" "$((MINOR * 10))"
printf 'export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"\n'
