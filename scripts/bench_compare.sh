#!/usr/bin/env bash
# Dev-time: fdpo's benchmarks next to PyTorch's / TRL's on this machine, one
# JSON line each, then a table (fdpo tokens/s, reference tokens/s, ratio,
# GFLOP/s, % of the gemm peak). Needs a release build and
# `pip install torch transformers trl`.
#   bash scripts/bench_compare.sh [threads]
set -euo pipefail
threads=${1:-2}
fdpo=${FDPO:-target/release/fdpo}
out=$(mktemp)
small="--vocab 4096 --hidden 256 --layers 6 --heads 8 --intermediate 688 --batch 8 --seq 128 --steps 10 --threads $threads"
large="--vocab 8192 --hidden 512 --layers 8 --heads 8 --intermediate 1376 --batch 8 --seq 128 --steps 5 --threads $threads"
"$fdpo" bench gemm --threads "$threads" --json | sed 's/^/gemm /' >> "$out"
for cfg in "llama-6.8M|--arch llama $small" "gpt2|--arch gpt2 $small" "llama-30M|--arch llama $large"; do
  name=${cfg%%|*}; args=${cfg#*|}
  echo "train-$name fdpo $("$fdpo" bench train $args --json)" >> "$out"
  echo "train-$name ref $(python3 scripts/bench_train.py $args --json)" >> "$out"
done
echo "dpo-llama-6.8M fdpo $("$fdpo" bench dpo --arch llama $small --json)" >> "$out"
echo "dpo-llama-6.8M ref $(python3 scripts/bench_dpo.py --arch llama $small --json 2>/dev/null | tail -1)" >> "$out"
echo "generate-llama-6.8M fdpo $("$fdpo" bench generate --arch llama $small --json)" >> "$out"
echo "generate-llama-6.8M ref $(python3 scripts/bench_generate.py --arch llama ${small/--steps 10/--steps 3} --json 2>/dev/null | tail -1)" >> "$out"
python3 - "$out" <<'PY'
import json, sys
rows, peak = {}, None
for line in open(sys.argv[1]):
    if line.startswith("gemm "):
        peak = json.loads(line[5:])["gflops"]
        continue
    name, who, js = line.split(" ", 2)
    rows.setdefault(name, {})[who] = json.loads(js)
print(f"gemm peak: {peak:.1f} GFLOP/s")
print("| benchmark | fdpo tokens/s | reference tokens/s | ratio | fdpo GFLOP/s (% of peak) | reference GFLOP/s (% of peak) | fdpo peak RSS | reference peak RSS |")
print("|---|---|---|---|---|---|---|---|")
for name, r in rows.items():
    f, p = r["fdpo"], r["ref"]
    if "gflops_per_s" not in f:
        print(f"| {name} | {f['tokens_per_s']:,.0f} | {p['tokens_per_s']:,.0f} | {f['tokens_per_s'] / p['tokens_per_s']:.2f}x | — | — | "
              f"{f['peak_rss_bytes'] / 2**20:,.0f} MiB | {p['peak_rss_bytes'] / 2**20:,.0f} MiB |")
        continue
    print(f"| {name} | {f['tokens_per_s']:,.0f} | {p['tokens_per_s']:,.0f} | {f['tokens_per_s'] / p['tokens_per_s']:.2f}x | "
          f"{f['gflops_per_s']:.0f} ({100 * f['gflops_per_s'] / peak:.0f}%) | {p['gflops_per_s']:.0f} ({100 * p['gflops_per_s'] / peak:.0f}%) | "
          f"{f['peak_rss_bytes'] / 2**20:,.0f} MiB | {p['peak_rss_bytes'] / 2**20:,.0f} MiB |")
PY
rm -f "$out"
