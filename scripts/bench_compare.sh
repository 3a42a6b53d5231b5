#!/usr/bin/env bash
# Dev-time: fdpo's benchmarks next to PyTorch's / TRL's on this machine, one
# JSON line each, then a table (fdpo tokens/s, reference tokens/s, ratio,
# GFLOP/s, % of the gemm peak). Needs a release build and
# `pip install torch transformers trl`.
#   bash scripts/bench_compare.sh [threads] [rounds]
# This VM's speed drifts by 10-20% between runs, so each round runs every
# benchmark as an fdpo/reference pair, and the table gives medians over the
# rounds: tokens/s, the per-round ratio (with its range), GFLOP/s.
set -euo pipefail
threads=${1:-2}
rounds=${2:-1}
fdpo=${FDPO:-target/release/fdpo}
out=$(mktemp)
small="--vocab 4096 --hidden 256 --layers 6 --heads 8 --intermediate 688 --batch 8 --seq 128 --steps 10 --threads $threads"
large="--vocab 8192 --hidden 512 --layers 8 --heads 8 --intermediate 1376 --batch 8 --seq 128 --steps 5 --threads $threads"
for round in $(seq "$rounds"); do
  "$fdpo" bench gemm --threads "$threads" --json | sed 's/^/gemm /' >> "$out"
  for cfg in "llama-6.8M|--arch llama $small" "gpt2|--arch gpt2 $small" "llama-30M|--arch llama $large"; do
    name=${cfg%%|*}; args=${cfg#*|}
    echo "train-$name fdpo $("$fdpo" bench train $args --json)" >> "$out"
    echo "train-$name ref $(python3 scripts/bench_train.py $args --json)" >> "$out"
  done
  echo "dpo-llama-6.8M fdpo $("$fdpo" bench dpo --arch llama $small --json)" >> "$out"
  echo "dpo-llama-6.8M ref $(python3 scripts/bench_dpo.py --arch llama $small --json 2>/dev/null | tail -1)" >> "$out"
  for arch in llama gpt2; do
    echo "generate-$arch-6.8M fdpo $("$fdpo" bench generate --arch $arch $small --json)" >> "$out"
    echo "generate-$arch-6.8M ref $(python3 scripts/bench_generate.py --arch $arch ${small/--steps 10/--steps 3} --json 2>/dev/null | tail -1)" >> "$out"
  done
done
python3 - "$out" "$rounds" <<'PY'
import json, statistics, sys
rows, peaks = {}, []
for line in open(sys.argv[1]):
    if line.startswith("gemm "):
        peaks.append(json.loads(line[5:])["gflops"])
        continue
    name, who, js = line.split(" ", 2)
    rows.setdefault(name, {}).setdefault(who, []).append(json.loads(js))
med = statistics.median
peak = med(peaks)
print(f"rounds: {sys.argv[2]}; gemm peak (median): {peak:.1f} GFLOP/s")
print("| benchmark | fdpo tokens/s | reference tokens/s | ratio (range) | fdpo GFLOP/s (% of peak) | reference GFLOP/s (% of peak) | fdpo peak RSS | reference peak RSS |")
print("|---|---|---|---|---|---|---|---|")
for name, r in rows.items():
    f, p = r["fdpo"], r["ref"]
    ratios = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(f, p)]
    tok = lambda xs: f"{med([x['tokens_per_s'] for x in xs]):,.0f}"
    rss = lambda xs: f"{max(x['peak_rss_bytes'] for x in xs) / 2**20:,.0f} MiB"
    ratio = f"{med(ratios):.2f}x" + (f" ({min(ratios):.2f}-{max(ratios):.2f})" if len(ratios) > 1 else "")
    if "gflops_per_s" in f[0]:
        gf, gp = med([x["gflops_per_s"] for x in f]), med([x["gflops_per_s"] for x in p])
        rate = f"{gf:.0f} ({100 * gf / peak:.0f}%) | {gp:.0f} ({100 * gp / peak:.0f}%)"
    else:
        rate = "— | —"
    print(f"| {name} | {tok(f)} | {tok(p)} | {ratio} | {rate} | {rss(f)} | {rss(p)} |")
PY
rm -f "$out"
