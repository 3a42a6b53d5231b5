#!/usr/bin/env bash
# Dev-time: the f32 products of the benchmarked training steps (1024 rows =
# batch 8 x 128 tokens; the 6.8M and 33.7M models' projections and LM heads)
# and the square 2048 product, through the `gemm` crate (`fdpo bench gemm`),
# PyTorch's matmul and numpy's OpenBLAS, best of 15 each, one row per shape.
# Needs a release build and `pip install torch numpy`.
#   bash scripts/bench_gemm_shapes.sh [threads]
set -euo pipefail
threads=${1:-2}
fdpo=${FDPO:-target/release/fdpo}
printf '%-16s %10s %10s %10s\n' "MxKxN" "gemm" "torch" "openblas"
for shape in 2048x2048x2048 1024x256x768 1024x256x1376 1024x688x256 1024x256x4096 \
             1024x512x1536 1024x512x2752 1024x1376x512 1024x512x8192; do
  ours=$("$fdpo" bench gemm --shape "$shape" --steps 15 --threads "$threads" --json)
  ref=$(python3 scripts/bench_gemm.py --shape "$shape" --steps 15 --threads "$threads" --json)
  python3 - "$shape" "$ours" "$ref" <<'PY'
import json, sys
ours, ref = json.loads(sys.argv[2]), json.loads(sys.argv[3])
print(f"{sys.argv[1]:<16} {ours['gflops']:10.1f} {ref['torch_gflops']:10.1f} {ref['numpy_gflops']:10.1f}")
PY
done
