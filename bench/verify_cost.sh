#!/usr/bin/env bash
# bench/verify_cost.sh: what verifying a shard set costs when a run opens it (issue 22), measured as a user runs
# the program, against the time of an epoch measured in the same run.
#   A: `mlm train --dry-run` on a large byte set (Tiny Shakespeare N times over): the verification's MB/s, from
#      the line mlm prints ("# shard set: ... MB verified ... in S s, R MB/s");
#   B: the reference configuration (configs/shakespeare.conf) training STEPS steps on Tiny Shakespeare prepared as a
#      char set (blank-line documents, 10% held out): the verification seconds from the same line, the seconds per
#      step from metrics.jsonl (steps 3.. STEPS, after the warm-up), the batches per epoch from the header, so
#      ratio = verification s / (batches per epoch x s per step).
# A and B alternate (A B A B ...), so a loaded machine loads both alike; medians are printed. Rerun it on an idle
# machine with the same command.
# usage: bash bench/verify_cost.sh [MLM (build/mlm)] [ROUNDS (3)] [COPIES (64)] [STEPS (8)]   (writes under $TMPDIR)
set -euo pipefail
cd "$(dirname "$0")/.."
mlm="$(realpath "${1:-build/mlm}")"
rounds="${2:-3}"
copies="${3:-64}"
steps="${4:-8}"
text="$(realpath ../shared/data/tinyshakespeare.txt)"
work="$(mktemp -d "${TMPDIR:-/tmp}/mlm_verify_cost.XXXXXX")"
trap 'rm -rf "$work"' EXIT
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-passive}"

for _ in $(seq "$copies"); do cat "$text"; echo; done > "$work/big.txt"
"$mlm" prepare -q -t byte --documents blank --valid-fraction 0.01 -o "$work/big" "$work/big.txt"
"$mlm" prepare -q -t char --documents blank --valid-fraction 0.1 -o "$work/ref" "$text"
rm "$work/big.txt"

median() { sort -g | awk '{a[NR] = $1} END {print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2}'; }
verified() { grep -o '[0-9.]* MB verified (checksums and token ids) in [0-9.]* s' "$1" | awk '{print $1, $9}'; }

: > "$work/a.txt"
: > "$work/b.txt"
for r in $(seq "$rounds"); do
  # A: a large set (several shards: every core verifies one at a time).
  "$mlm" train --config configs/shakespeare.conf --set data.path="$work/big" --device cpu --dry-run > "$work/a.log" 2>&1
  verified "$work/a.log" >> "$work/a.txt"
  # B: the reference configuration on the reference corpus as a set; a fresh run directory each round, so the
  # verification is not skipped (it is remembered per run).
  rm -rf "$work/run"
  "$mlm" train --config configs/shakespeare.conf --set data.path="$work/ref" --device cpu --steps "$steps" \
    --set train.samples=false --set train.log_every=1 -o "$work/run" > "$work/b.log" 2>&1
  batches=$(grep -o '[0-9]* batches' "$work/b.log" | head -n 1 | awk '{print $1}')
  step_s=$(grep '"kind":"train"' "$work/run/metrics.jsonl" |
           python3 -c 'import json,sys; t=[json.loads(l) for l in sys.stdin]; t=[x for x in t if x["step"] >= 2];
print((t[-1]["time_s"] - t[0]["time_s"]) / (t[-1]["step"] - t[0]["step"]))')
  echo "$(verified "$work/b.log") $batches $step_s" >> "$work/b.txt"
  echo "round $r: A $(tail -n 1 "$work/a.txt") | B $(tail -n 1 "$work/b.txt")" >&2
done
mbps=$(awk '{print $1 / $2}' "$work/a.txt" | median)
big_mb=$(awk '{print $1}' "$work/a.txt" | head -n 1)
ref_mb=$(awk '{print $1}' "$work/b.txt" | head -n 1)
ref_s=$(awk '{print $2}' "$work/b.txt" | median)
batches=$(awk '{print $3}' "$work/b.txt" | head -n 1)
step_s=$(awk '{print $4}' "$work/b.txt" | median)
ratio=$(awk -v v="$ref_s" -v b="$batches" -v s="$step_s" 'BEGIN {printf "%.2g", v / (b * s)}')
echo "machine: $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg); $rounds rounds, medians"
echo "A  verification of a ${big_mb} MB byte set: $(printf '%.0f' "$mbps") MB/s"
echo "B  the reference run's set: ${ref_mb} MB verified in ${ref_s} s; epoch = $batches batches x ${step_s} s = $(awk -v b="$batches" -v s="$step_s" 'BEGIN {printf "%.0f", b * s}') s"
echo "   verification / epoch = $ratio (the requirement: below 0.05)"
awk -v r="$ratio" 'BEGIN {exit !(r < 0.05)}' || { echo "FAIL: verification costs 5% of an epoch or more"; exit 1; }
