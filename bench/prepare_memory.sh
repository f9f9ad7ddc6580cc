#!/usr/bin/env bash
# bench/prepare_memory.sh: peak memory (max RSS from /usr/bin/time -v) of `mlm prepare` and of a few training
# steps over the shards (validation held to 0.1% of the documents so that its pass stays short), at two corpus sizes made from Tiny Shakespeare (bench/make_corpus.py: paragraphs
# shuffled and repeated). Flat figures mean prepare streams and training memory-maps instead of loading.
# usage: bash bench/prepare_memory.sh [MLM] [SIZES_MB...]   (default: build/mlm 50 200; writes under $TMPDIR)
set -euo pipefail
cd "$(dirname "$0")/.."
mlm="${1:-build/mlm}"
shift || true
sizes=(50 200)
[ $# -gt 0 ] && sizes=("$@")
vocab=../shared/data/bert-base-uncased-vocab.txt
text=../shared/data/tinyshakespeare.txt
work="${TMPDIR:-/tmp}/mlm_prepare_memory"
mkdir -p "$work"
py="${PYTHON:-python3}"
rss() { grep "Maximum resident" "$1" | awk '{print $NF}'; }
secs() { grep "Elapsed (wall" "$1" | awk '{print $NF}'; }
printf "%-8s %-10s %14s %10s %14s %12s\n" "corpus" "tokenizer" "prepare KB" "prepare s" "train KB" "tokens"
for mb in "${sizes[@]}"; do
  corpus="$work/corpus-${mb}MB.txt"
  [ -f "$corpus" ] || "$py" bench/make_corpus.py --text "$text" --mb "$mb" --out "$corpus" >/dev/null
  for tok in wordpiece byte; do
    out="$work/set-${mb}-${tok}"
    args=(-t "$tok")
    [ "$tok" = wordpiece ] && args+=(--vocab "$vocab")
    /usr/bin/time -v "$mlm" prepare -q --force "${args[@]}" --documents blank --valid-fraction 0.001 -o "$out" "$corpus" \
      2> "$work/prepare.time"
    run="$work/run-${mb}-${tok}"
    rm -rf "$run"
    /usr/bin/time -v "$mlm" train --config configs/bert-tiny.conf --set data.path="$out" --device cpu -q \
      --set train.batch_size=8 --set train.log_every=1 --set train.ckpt_every=0 --set train.ckpt_minutes=0 \
      --steps 3 --set data.sampling=random -o "$run" > "$work/train.log" 2> "$work/train.time" || true
    tokens=$(grep -E "^(train|valid)_tokens" "$out/manifest.txt" | awk '{s += $3} END {print s}')
    printf "%-8s %-10s %14s %10s %14s %12s\n" "${mb}MB" "$tok" "$(rss "$work/prepare.time")" \
      "$(secs "$work/prepare.time")" "$(rss "$work/train.time")" "$tokens"
  done
done
