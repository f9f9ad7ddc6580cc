#!/usr/bin/env bash
# bench/dp_scaling.sh: weak scaling of the CPU backend over MPI ranks (tokens/s per rank, 32 sequences per rank
# per step, one thread per rank) and the cost of gradient accumulation in one process (batch 64 cut into 1, 2, 4
# micro-batches). The reference model (d_model 128, 6 layers, seq 32). Figures: the median tokens/s of the
# metrics lines after the first (warm-up) interval, as written by rank 0 to RUN/metrics.jsonl; and, since wall
# time means little on a machine shared with other jobs, the CPU seconds (user + system, all ranks, validation at
# the end included) per rank, from /usr/bin/time.
# Usage: bash bench/dp_scaling.sh [MLM_BINARY] [STEPS]   (default build/mlm, 60 steps; ~2 minutes on 2 cores)
set -euo pipefail
mlm="${1:-build/mlm}"
steps="${2:-60}"
out="$(mktemp -d /tmp/mlm_dp_bench_XXXXXX)"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export MLM_DATA_MIRROR="${MLM_DATA_MIRROR:-$(cd "$(dirname "$0")/../.." && pwd)/shared/data}"
common=(--device cpu --steps "$steps" --set train.log_every=10 --set train.samples=false --set train.ckpt_every=0 -q)

# median tokens/s of RUN/metrics.jsonl's train lines, the first left out
median_tps() {
  grep '"kind":"train"' "$1/metrics.jsonl" | tail -n +2 | sed 's/.*"tokens_per_s":\([0-9.e+]*\).*/\1/' |
    sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'
}

echo "weak scaling: 32 sequences x 32 characters per rank per step, 1 thread per rank, $steps steps"
for n in 1 2; do
  run="$out/ranks$n"
  if [ "$n" = 1 ]; then
    /usr/bin/time -f "%U %S" -o "$run.cpu" "$mlm" train "${common[@]}" --set train.threads=1 --set train.batch_size=32 \
      --out "$run" >/dev/null
  else
    /usr/bin/time -f "%U %S" -o "$run.cpu" mpirun -np "$n" --oversubscribe "$mlm" train "${common[@]}" --set train.threads=1 \
      --set train.batch_size=$((32 * n)) --set train.accum_steps="$n" --out "$run" >/dev/null
  fi
  tps="$(median_tps "$run")"
  read -r u sy < "$run.cpu"
  awk -v n="$n" -v t="$tps" -v c="$(awk -v u="$u" -v s="$sy" 'BEGIN {print u + s}')" \
    'BEGIN {printf "  %d rank(s): %8.0f tokens/s in all, %8.0f per rank; %.1f CPU s per rank\n", n, t, t / n, c / n}'
done

echo "accumulation in one process: batch 64, 2 threads, $steps steps"
for k in 1 2 4; do
  run="$out/accum$k"
  /usr/bin/time -f "%U %S" -o "$run.cpu" "$mlm" train "${common[@]}" --set train.threads=2 --set train.accum_steps="$k" \
    --out "$run" >/dev/null
  read -r u sy < "$run.cpu"
  printf "  accum_steps=%d (micro-batch %2d): %8.0f tokens/s; %s CPU s\n" "$k" $((64 / k)) "$(median_tps "$run")" \
    "$(awk -v u="$u" -v s="$sy" 'BEGIN {print u + s}')"
done
rm -rf "$out"
