#!/usr/bin/env bash
# tests/fuzz/make_seeds.sh: real files for the fuzz harnesses' seed corpora, made by the mlm binary itself:
# checkpoints of two tiny runs (different masking, optimizer, init and vocabulary), their resolved configs,
# their metrics.jsonl lines, the corpus text. tools/test.sh runs it before each fuzz run, so the seeds
# always have the current file formats; tests/fuzz/corpus/ holds a committed copy plus hand-made edge cases.
#
# usage: bash tests/fuzz/make_seeds.sh BUILD/mlm OUT_DIR     (writes OUT_DIR/<harness>/*)
set -euo pipefail
mlm="$1"
out="$2"
here="$(cd "$(dirname "$0")" && pwd)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$out"/{config,json,utf8,safetensors,checkpoint,ckpt_model}

# Two small texts: plain ASCII, and one with 2-, 3- and 4-byte characters (and a newline).
printf 'to be or not to be, that is the question. %.0s' {1..6} > "$tmp/ascii.txt"
printf 'Ça va? — naïve café, 東京 → 𝄞 music; ça va. %.0s\n' {1..6} > "$tmp/utf8.txt"
tiny=(--set model.d_model=4 --set model.n_heads=2 --set model.n_layers=1 --set model.d_ff=4 --set data.seq_len=4
      --set train.batch_size=2 --set train.ckpt_every=0 --set train.samples=false --set train.log_every=1
      --set train.threads=1 --set train.seed=7)
"$mlm" train --data "$tmp/ascii.txt" --out "$tmp/a" --steps 3 -q "${tiny[@]}" >/dev/null
"$mlm" train --data "$tmp/utf8.txt" --out "$tmp/b" --steps 2 -q "${tiny[@]}" --set mask.scheme=bert \
  --set optim.name=adamw --set optim.schedule=cosine --set optim.lr=0.001 --set model.init=pytorch \
  --set 'mask.no_mask=\n' --set model.dropout=0 >/dev/null

for run in a b; do
  ck="$(ls "$tmp/$run"/checkpoints/ckpt-*.safetensors)"
  for h in safetensors checkpoint ckpt_model; do cp "$ck" "$out/$h/ckpt-$run.safetensors"; done
  cp "$tmp/$run/config.conf" "$out/config/run-$run.conf"
  n=0
  while IFS= read -r line; do
    n=$((n + 1))
    printf '%s\n' "$line" > "$out/json/metrics-$run-$n.json"
  done < "$tmp/$run/metrics.jsonl"
done
cp "$here/../../configs/"*.conf "$out/config/"
cp "$tmp/ascii.txt" "$tmp/utf8.txt" "$out/utf8/"
