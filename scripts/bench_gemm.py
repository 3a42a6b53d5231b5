"""Reference counterpart of `fdpo bench gemm` (dev-time only): the same f32
product timed through PyTorch's `matmul` and numpy's (OpenBLAS in the PyPI
wheels), best of --steps after one warm-up, so the `gemm` crate that fdpo
uses is compared with both BLAS libraries on one machine.

    python scripts/bench_gemm.py --shape 1024x256x768 --steps 15 --threads 2 --json
"""
import argparse
import json
import os
import time

p = argparse.ArgumentParser()
p.add_argument("--size", type=int, default=2048)
p.add_argument("--shape", default=None, help="MxKxN: an MxK by KxN product (overrides --size)")
p.add_argument("--steps", type=int, default=5)
p.add_argument("--threads", type=int, default=None)
p.add_argument("--json", action="store_true")
a = p.parse_args()
if a.threads:
    # OpenBLAS reads its thread count when numpy is first imported.
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(a.threads)

import numpy as np  # noqa: E402
import torch  # noqa: E402

if a.threads:
    torch.set_num_threads(a.threads)
m, k, n = map(int, a.shape.lower().split("x")) if a.shape else (a.size,) * 3


def best_seconds(product):
    best = float("inf")
    for step in range(a.steps + 1):
        t0 = time.perf_counter()
        product()
        if step > 0:
            best = min(best, time.perf_counter() - t0)
    return best


x, y = torch.rand(m, k) * 2 - 1, torch.rand(k, n) * 2 - 1
xn, yn = x.numpy(), y.numpy()
record = {"benchmark": "gemm", "m": m, "k": k, "n": n, "threads": torch.get_num_threads()}
for name, product in (("torch", lambda: x @ y), ("numpy", lambda: xn @ yn)):
    seconds = best_seconds(product)
    record[f"{name}_gflops"] = 2 * m * k * n / seconds / 1e9
if a.json:
    print(json.dumps(record))
else:
    print(
        f"f32 gemm {m}x{k}x{n}, {record['threads']} threads: torch {record['torch_gflops']:.1f}, "
        f"numpy {record['numpy_gflops']:.1f} GFLOP/s ({np.__version__}, torch {torch.__version__})"
    )
