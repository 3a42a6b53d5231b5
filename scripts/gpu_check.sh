#!/usr/bin/env bash
# The GPU check (#21), for a session that is lent a GPU machine. NOT YET RUN:
# no session so far has had one. Aim: under 8 minutes on one GPU.
#
# That machine has nvcc 13.0, the driver (580) and PyTorch, but no Rust
# toolchain and no network, so build here and carry the binary:
#
#   eval "$(bash scripts/setup-cuda.sh)"
#   # linking needs libcuda (the runtime wheel's stub), cuBLAS, cuRAND and NVRTC from PyPI:
#   python3 -m pip install -q --target ~/.cache/fdpo/cuda-libs nvidia-cublas nvidia-curand nvidia-cuda-nvrtc
#   RUSTFLAGS="-L $CUDA_ROOT/lib -L $CUDA_ROOT/lib/stubs $(ls -d ~/.cache/fdpo/cuda-libs/nvidia/*/lib | sed 's/^/-L /' | tr '\n' ' ')" \
#     cargo build --release -p fdpo-cli --features cuda
#   mkdir -p .gpu && cp target/release/fdpo .gpu/ && strip .gpu/fdpo   # and `echo /.gpu/ >> .git/info/exclude`
#   # then, with the device tool: run `bash scripts/gpu_check.sh .gpu/fdpo`, carry [".gpu"]
#
# Checks, each printing PASS or FAIL and the numbers:
#  1. log-probabilities of the three fixture families (Llama with GQA, Qwen2
#     with biases, GPT-2) on CUDA against the same binary on the CPU (which
#     CI checks against transformers): f32 within 1e-4 absolute per
#     sequence, bf16 within 5e-2 relative;
#  2. one f-DPO step on CUDA against the CPU: the logged loss and grad_norm
#     within 1e-4 relative;
#  3. a short f-DPO run on CUDA (20 steps) ends with a finite loss and final/.
# Not here: tokens/s and peak memory of the 0.5B shape (`fdpo bench train`
# has no --device yet) and TRL beside it (TRL is not installed there).
set -uo pipefail
cd "$(dirname "$0")/.."
BIN="${1:-target/release/fdpo}"
OUT="${OUT:-runs/gpu-check}"
mkdir -p "$OUT"
FIX=crates/fdpo-model/tests/fixtures
status=0
pass() { echo "PASS $*"; }
fail() { echo "FAIL $*"; status=1; }

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true

DATA="$OUT/prefs.jsonl"
cat >"$DATA" <<'JSONL'
{"prompt": "the film", "chosen": " was good", "rejected": " was bad"}
{"prompt": "a story about", "chosen": " a very good dog", "rejected": " nothing"}
{"prompt": "the plot", "chosen": " is good", "rejected": " is dull and long and slow"}
{"prompt": "the end", "chosen": " was fine", "rejected": " was awful"}
JSONL

# 1. Log-probabilities, CUDA against CPU.
for family in llama qwen2 gpt2; do
    "$BIN" logprobs --model "$FIX/$family" --data "$DATA" --out "$OUT/$family-cpu.jsonl" --device cpu >/dev/null 2>&1
    for dtype in f32 bf16; do
        if ! "$BIN" logprobs --model "$FIX/$family" --data "$DATA" --out "$OUT/$family-$dtype.jsonl" \
            --device cuda --dtype "$dtype" >"$OUT/$family-$dtype.log" 2>&1; then
            fail "logprobs $family $dtype: $(tail -1 "$OUT/$family-$dtype.log")"
            continue
        fi
        python3 - "$OUT/$family-cpu.jsonl" "$OUT/$family-$dtype.jsonl" "$family" "$dtype" <<'PY' && pass "logprobs $family $dtype" || fail "logprobs $family $dtype"
import json, sys
cpu = [json.loads(l) for l in open(sys.argv[1])]
gpu = [json.loads(l) for l in open(sys.argv[2])]
worst = 0.0
for a, b in zip(cpu, gpu):
    for k in a:
        if k.endswith("logprob"):
            d = abs(a[k] - b[k])
            worst = max(worst, d if sys.argv[4] == "f32" else d / max(1.0, abs(a[k])))
tol = 1e-4 if sys.argv[4] == "f32" else 5e-2
print(f"  {sys.argv[3]} {sys.argv[4]}: worst difference {worst:.3g} (tolerance {tol})")
sys.exit(0 if len(cpu) == len(gpu) and worst <= tol else 1)
PY
    done
done

# 2. One f-DPO step, CUDA against CPU.
for device in cpu cuda; do
    "$BIN" train --model "$FIX/llama" --train-file "$DATA" --output-dir "$OUT/step-$device" --device "$device" \
        --max-steps 1 --per-device-train-batch-size 4 --logging-steps 1 --learning-rate 1e-3 \
        --overwrite-output-dir >"$OUT/step-$device.log" 2>&1 || fail "train step on $device: $(tail -1 "$OUT/step-$device.log")"
done
python3 - "$OUT/step-cpu/metrics.jsonl" "$OUT/step-cuda/metrics.jsonl" <<'PY' && pass "one f-DPO step" || fail "one f-DPO step"
import json, sys
a, b = (json.loads(open(p).readline()) for p in sys.argv[1:3])
ok = True
for k in ("loss", "grad_norm", "logps/chosen", "logps/rejected"):
    rel = abs(a[k] - b[k]) / max(1e-12, abs(a[k]))
    print(f"  {k}: cpu {a[k]:.6g} cuda {b[k]:.6g} relative {rel:.2g}")
    ok &= rel <= 1e-4
sys.exit(0 if ok else 1)
PY

# 3. A short run.
if "$BIN" train --model "$FIX/llama" --train-file "$DATA" --output-dir "$OUT/run" --device cuda --max-steps 20 \
    --per-device-train-batch-size 2 --logging-steps 5 --overwrite-output-dir >"$OUT/run.log" 2>&1 \
    && [ -f "$OUT/run/final/model.safetensors" ]; then
    pass "20 f-DPO steps on CUDA: $(tail -1 "$OUT/run/metrics.jsonl" | cut -c1-160)"
else
    fail "20 f-DPO steps on CUDA: $(tail -1 "$OUT/run.log")"
fi
exit $status
