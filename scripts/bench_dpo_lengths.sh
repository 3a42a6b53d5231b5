#!/usr/bin/env bash
# Dev-time: the f-DPO step on realistic lengths, fdpo packed with shared
# prompts, fdpo padded, and TRL's DPOTrainer, on the same random model and
# the same pairs (fdpo draws them from a length profile and writes them;
# scripts/bench_dpo.py reads them in the same order), then a table of
# medians over the rounds. Each round runs every (shape, profile) as a
# shared / padded / TRL triple, so the VM's drift hits all three alike.
# Needs a release build and `pip install torch transformers trl datasets`.
#   bash scripts/bench_dpo_lengths.sh [threads] [rounds] [profiles]
set -euo pipefail
threads=${1:-2}
rounds=${2:-3}
profiles=${3:-"hh ultrafeedback"}
fdpo=${FDPO:-target/release/fdpo}
out=$(mktemp)
lengths=$(mktemp)
small="--arch llama --vocab 4096 --hidden 256 --layers 6 --heads 8 --intermediate 688 --batch 8 --seq 1024 --steps 5 --threads $threads"
large="--arch llama --vocab 8192 --hidden 512 --layers 8 --heads 8 --intermediate 1376 --batch 8 --seq 1024 --steps 2 --threads $threads"
for round in $(seq "$rounds"); do
  for cfg in "6.8M|$small" "33.7M|$large"; do
    name=${cfg%%|*}; args=${cfg#*|}
    for profile in $profiles; do
      key="$name $profile"
      echo "$key shared $("$fdpo" bench dpo $args --lengths "$profile" --layout shared --write-lengths "$lengths" --json)" >> "$out"
      echo "$key padded $("$fdpo" bench dpo $args --lengths "$profile" --layout padded --json)" >> "$out"
      echo "$key trl $(python3 scripts/bench_dpo.py $args --pairs "$lengths" --json 2>/dev/null | tail -1)" >> "$out"
      echo "round $round: $key done" >&2
    done
  done
done
python3 - "$out" "$rounds" <<'PY'
import json, statistics, sys
rows = {}
for line in open(sys.argv[1]):
    shape, profile, who, js = line.split(" ", 3)
    rows.setdefault((shape, profile), {}).setdefault(who, []).append(json.loads(js))
med = statistics.median
print(f"rounds: {sys.argv[2]}; medians, ranges in brackets")
print("| model | lengths | tokens a step | fdpo shared tokens/s | fdpo padded tokens/s | TRL tokens/s "
      "| shared / TRL | shared / padded | peak RSS shared / padded / TRL |")
print("|---|---|---|---|---|---|---|---|---|")
for (shape, profile), r in rows.items():
    s, p, t = r["shared"], r["padded"], r["trl"]
    tps = lambda xs: [x["tokens_per_s"] for x in xs]
    ratio = lambda a, b: [x / y for x, y in zip(tps(a), tps(b))]
    def show(xs):
        return f"{med(xs):.2f}×" + (f" ({min(xs):.2f}–{max(xs):.2f})" if len(xs) > 1 else "")
    rss = lambda xs: f"{max(x['peak_rss_bytes'] for x in xs) / 2**20:,.0f}"
    print(f"| Llama {shape} | {profile} | {med([x['tokens_per_step'] for x in s]):,.0f} "
          f"| {med(tps(s)):,.0f} | {med(tps(p)):,.0f} | {med(tps(t)):,.0f} "
          f"| {show(ratio(s, t))} | {show(ratio(s, p))} | {rss(s)} / {rss(p)} / {rss(t)} MiB |")
PY
rm -f "$out" "$lengths"
