#!/usr/bin/env bash
# bench/bf16_curves.sh: train.precision = bf16 against fp32 on the CPU reference (issue 23's verification): for each
# workload, two FP32 runs that differ only in their seed and one BF16 run with the first seed, the same steps; then
# the tools/compare_runs.py rule: the BF16 run's validation accuracy must lie, at every epoch, within 3.2 standard
# deviations of a run-to-run difference of the FP32 seeds (the RMS of the two FP32 runs' per-epoch differences,
# floored by the sampling noise of a validation pass of that workload); the training losses are summarised beside it
# (RMS over the logged steps of BF16 - FP32 against FP32 seed 2 - FP32 seed 1).
#
#   bash bench/bf16_curves.sh [--steps N] [--only shakespeare|bert-mini] [--out DIR] [--mlm PATH] [--threads N]
#
# Workloads: `shakespeare` is configs/shakespeare.conf (the reference configuration); `bert-mini` is
# configs/bert-mini.conf on Tiny Shakespeare prepared with the BERT uncased vocabulary, at batch 8 with warm-up 200
# (its batch of 256 and warm-up of 10,000 make 2,000 steps take days on a small CPU and leave the learning rate at 2%
# of its peak), sparse prediction on. Runs are sequential, each with --device cpu and the given OpenMP threads;
# results in DIR/summary.txt. Corpus and vocabulary: MLM_DATA (default ../shared/data).
set -euo pipefail
cd "$(dirname "$0")/.."
steps=2000
only=""
out="runs/bf16-curves"
mlm="build/mlm"
threads="${OMP_NUM_THREADS:-2}"
data="${MLM_DATA:-../shared/data}"
while [ $# -gt 0 ]; do
  case "$1" in
    --steps) steps="$2"; shift 2 ;;
    --only) only="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --mlm) mlm="$2"; shift 2 ;;
    --threads) threads="$2"; shift 2 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "bf16_curves: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ -x "$mlm" ] || { echo "bf16_curves: $mlm not found; build it first (cmake --build build --target mlm)" >&2; exit 2; }
corpus="$data/tinyshakespeare.txt"
vocab="$data/bert-base-uncased-vocab.txt"
[ -f "$corpus" ] || { echo "bf16_curves: no corpus at $corpus (set MLM_DATA)" >&2; exit 2; }
mkdir -p "$out"
summary="$out/summary.txt"
{
  echo "# bench/bf16_curves.sh --steps $steps, $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $(date -u +%Y-%m-%dT%H:%MZ)"
  echo "# load average at the start: $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo '?'), $threads OpenMP threads"
} >"$summary"

# run NAME SEED PRECISION ARGS...: one training run (skipped when its metrics already hold the last step).
run() {
  local name="$1" seed="$2" precision="$3"
  shift 3
  local dir="$out/$name"
  if [ -f "$dir/metrics.jsonl" ] && grep -q "\"kind\":\"train\",\"step\":$steps," "$dir/metrics.jsonl"; then
    echo "== $name: done before, kept"
    return
  fi
  rm -rf "$dir"
  echo "== $name: seed $seed, train.precision = $precision, $steps steps"
  local t0=$SECONDS
  OMP_NUM_THREADS="$threads" nice -n 10 "$mlm" train "$@" --device cpu --steps "$steps" --out "$dir" \
    --set train.seed="$seed" --set train.precision="$precision" --set train.samples=false \
    --set train.ckpt_every=0 --set train.ckpt_minutes=0 >"$dir.log" 2>&1 || {
    echo "   failed: see $dir.log"; tail -3 "$dir.log"; return 1; }
  echo "   $((SECONDS - t0)) s"
}

# judge WORKLOAD TARGETS: the compare_runs rule on the three runs of a workload.
judge() {
  local w="$1" targets="$2" a="$out/$1-fp32-a/metrics.jsonl" b="$out/$1-fp32-b/metrics.jsonl"
  local h="$out/$1-bf16/metrics.jsonl"
  local noise tol verdict
  noise="$(python3 tools/compare_runs.py noise "$a" "$b" --targets "$targets")"
  tol="$(echo "$noise" | sed -n 's/.*tolerance 3.2 sigma = \([0-9.]*\).*/\1/p')"
  verdict="$(python3 tools/compare_runs.py epochs "$h" "$a" --tol "$tol" || true)"
  local losses
  losses="$(python3 - "$a" "$b" "$h" <<'EOF'
import json, math, sys
def train(path):
    out = {}
    for line in open(path):
        r = json.loads(line)
        if r.get('kind') == 'train' and r.get('loss') is not None:
            out[r['step']] = r['loss']
    return out
a, b, h = (train(p) for p in sys.argv[1:4])
steps = sorted(set(a) & set(b) & set(h))
rms = lambda d: math.sqrt(sum(x * x for x in d) / len(d)) if d else float('nan')
seeds = rms([b[s] - a[s] for s in steps])
bf16 = rms([h[s] - a[s] for s in steps])
last = steps[-1] if steps else 0
print(f'train loss over {len(steps)} logged steps: RMS(bf16 - fp32) {bf16:.4f} against RMS(fp32 seed 2 - seed 1) '
      f'{seeds:.4f}; at step {last}: fp32 {a.get(last, float("nan")):.4f} / {b.get(last, float("nan")):.4f}, '
      f'bf16 {h.get(last, float("nan")):.4f}')
EOF
)"
  {
    echo
    echo "## $w"
    echo "$noise"
    echo "$verdict"
    echo "$losses"
  } | tee -a "$summary"
}

if [ -z "$only" ] || [ "$only" = shakespeare ]; then
  common=(--config configs/shakespeare.conf --data "$corpus" --set train.log_every=50)
  run shakespeare-fp32-a 1234 fp32 "${common[@]}"
  run shakespeare-fp32-b 1235 fp32 "${common[@]}"
  run shakespeare-bf16 1234 bf16 "${common[@]}"
  # 3,485 validation sequences of 32 characters, 15% of them scored.
  judge shakespeare 16700
fi

if [ -z "$only" ] || [ "$only" = bert-mini ]; then
  [ -f "$vocab" ] || { echo "bf16_curves: no BERT vocabulary at $vocab (set MLM_DATA)" >&2; exit 2; }
  shards="$out/bert-shards"
  [ -f "$shards/manifest.txt" ] || "$mlm" prepare --tokenizer wordpiece --vocab "$vocab" --documents blank \
    --out "$shards" "$corpus" >"$out/prepare.log" 2>&1
  common=(--config configs/bert-mini.conf --set data.path="$shards" --set train.batch_size=8 --set optim.warmup=200
          --set train.sparse_prediction=true --set train.log_every=50)
  run bert-mini-fp32-a 1234 fp32 "${common[@]}"
  run bert-mini-fp32-b 1235 fp32 "${common[@]}"
  run bert-mini-bf16 1234 bf16 "${common[@]}"
  # 15% of the validation split's tokens are scored (its manifest's valid_tokens).
  targets=$(awk -F' = ' '$1 == "valid_tokens" { printf "%d", $2 * 0.15 }' "$shards/manifest.txt")
  judge bert-mini "${targets:-2000}"
fi
echo "summary: $summary"
