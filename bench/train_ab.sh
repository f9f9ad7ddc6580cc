#!/usr/bin/env bash
# bench/train_ab.sh: the CPU speed of `mlm train` of two builds, side by side (A B A B ...), as a user runs it: the
# reference configuration (configs/shakespeare.conf, --device cpu) for STEPS steps, each run a whole process. Prints
# every run's wall and CPU seconds and the training tokens/s of its metrics.jsonl (the mean over its logged steps),
# then the medians and the median of the pairwise ratios A/B (pairing keeps a ratio meaningful while the machine's
# speed drifts). One command, e.g. the branch against main:
#
#   git worktree add /tmp/mlm-main main && cmake -S /tmp/mlm-main -B /tmp/mlm-main/build -DCMAKE_BUILD_TYPE=Release \
#     && cmake --build /tmp/mlm-main/build -j --target mlm
#   bash bench/train_ab.sh build/mlm /tmp/mlm-main/build/mlm [RUNS=8] [STEPS=60]
#
# The corpus is found as mlm finds it (data/, $MLM_DATA_MIRROR); OMP_NUM_THREADS, if set, applies to both.
set -euo pipefail
cd "$(dirname "$0")/.."
a="${1:?usage: bench/train_ab.sh MLM_A MLM_B [RUNS] [STEPS]}"
b="${2:?usage: bench/train_ab.sh MLM_A MLM_B [RUNS] [STEPS]}"
runs="${3:-8}"
steps="${4:-60}"
work="$(mktemp -d /tmp/mlm-train-ab-XXXXXX)"
trap 'rm -rf "$work"' EXIT

# One run: "wall cpu tokens_per_s" on stdout.
one() {
  local bin="$1" out="$work/run-$2"
  local t0 t1
  t0="$(date +%s.%N)"
  /usr/bin/env time -f "%U %S" -o "$work/time" "$bin" train --config configs/shakespeare.conf --device cpu \
    --steps "$steps" --set train.log_every=20 --set train.ckpt_every=0 --set train.samples=false --out "$out" -q \
    >"$work/log" 2>&1 || { echo "run failed: $bin (see its output below)" >&2; cat "$work/log" >&2; exit 1; }
  t1="$(date +%s.%N)"
  python3 - "$out/metrics.jsonl" "$t0" "$t1" "$(cat "$work/time")" <<'EOF'
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1]) if '"train"' in l]
tps = sum(l["tokens_per_s"] for l in lines) / len(lines)
user, sys_s = (float(x) for x in sys.argv[4].split())
print(f"{float(sys.argv[3]) - float(sys.argv[2]):.3f} {user + sys_s:.3f} {tps:.1f}")
EOF
  rm -rf "$out"
}

one "$a" warm-a >/dev/null  # one warm-up each (page cache, first-touch)
one "$b" warm-b >/dev/null
printf "%-4s %10s %10s %12s\n" run wall_s cpu_s tokens/s
for i in $(seq 1 "$runs"); do
  ra="$(one "$a" "a$i")"; printf "A%-3s %10s %10s %12s\n" "$i" $ra; echo "A $ra" >>"$work/all"
  rb="$(one "$b" "b$i")"; printf "B%-3s %10s %10s %12s\n" "$i" $rb; echo "B $rb" >>"$work/all"
done
python3 - "$work/all" <<'EOF'
import statistics as st, sys
a, b = [], []
for line in open(sys.argv[1]):
    k, *v = line.split()
    (a if k == "A" else b).append([float(x) for x in v])
names = ["wall s", "cpu s", "tokens/s"]
print(f"{'median':<10}{'A':>12}{'B':>12}{'A/B (pairwise)':>18}")
for i, n in enumerate(names):
    ratios = [x[i] / y[i] for x, y in zip(a, b)]
    print(f"{n:<10}{st.median(x[i] for x in a):>12.3f}{st.median(y[i] for y in b):>12.3f}"
          f"{st.median(ratios):>12.3f} [{min(ratios):.3f}, {max(ratios):.3f}]")
EOF
