#!/usr/bin/env bash
# tools/gpu_check.sh LOGDIR [STAGE...]: the checks a session with a GPU runs in one go, every log under LOGDIR.
#
# Stages (default: all, in this order; name some to split the work over several calls, the build is kept):
#   build     configure (sm_90) and build into build-gpu/
#   gpu       ctest -L gpu (the GPU tests must pass, not skip)
#   sanitize  compute-sanitizer memcheck (with leak check) and racecheck over every GPU test binary
#             (test_gpu_model --quick: 8 determinism steps instead of 50 under the sanitizers)
#   smoke     `mlm train --device cuda --steps 200` (default configuration), then the first 20 steps on the CPU
#             and on the GPU (TF32 off), whose logged losses must agree to 1e-3 relative, and the
#             out-of-memory message of a batch that cannot fit
#   suite     the whole CTest suite on this host (train.device = auto trains on the GPU in test_resume,
#             test_commands and test_learning)
#
# Prints one line per check and a summary; exits 1 if any check failed. Each check has a time limit.
set -uo pipefail
if [ $# -lt 1 ] || [ "$1" = -h ] || [ "$1" = --help ]; then
  echo "usage: $0 LOGDIR [build|gpu|sanitize|smoke|suite ...]" >&2
  exit 2
fi
mkdir -p "$1" || exit 1
logs="$(cd "$1" && pwd)"
shift
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(build gpu sanitize smoke suite)
want() { local s; for s in "${stages[@]}"; do [ "$s" = "$1" ] && return 0; done; return 1; }

cd "$(dirname "$0")/.." || exit 1
root="$(pwd)"
build="$root/build-gpu"
export MLM_DATA_MIRROR="${MLM_DATA_MIRROR:-$(cd .. && pwd)/shared/data}"
corpus="$MLM_DATA_MIRROR/tinyshakespeare.txt"
export MLM_SOURCE_DIR="$root"  # the fixture path for test binaries run outside ctest
jobs="$(nproc 2>/dev/null || echo 4)"
PATH="$PATH:/usr/local/cuda/bin"
failed=()

# check NAME SECONDS CMD...: run CMD with a time limit, output to LOGDIR/NAME.log.
check() {
  local name="$1" secs="$2"
  shift 2
  local t0=$SECONDS
  printf '%-40s ' "$name"
  timeout "$secs" "$@" >"$logs/$name.log" 2>&1
  local rc=$?
  if [ $rc -eq 0 ]; then
    echo "ok ($((SECONDS - t0)) s)"
  elif [ $rc -eq 124 ]; then
    echo "TIMEOUT after ${secs} s: $logs/$name.log"
    failed+=("$name")
  else
    echo "FAILED (rc $rc): $logs/$name.log"
    failed+=("$name")
  fi
  return $rc
}

{ nvidia-smi; nvcc --version; } >"$logs/environment.log" 2>&1
echo "logs in $logs (corpus $corpus; stages ${stages[*]})"

if want build || [ ! -x "$build/mlm" ]; then
  check configure 300 cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90 \
    -DMLM_TEST_CORPUS="$corpus" || { echo "configure failed; stopping"; exit 1; }
  check build 500 cmake --build "$build" -j"$jobs" || { echo "build failed; stopping"; exit 1; }
  grep -iE 'warning' "$logs/build.log" >"$logs/build-warnings.log" && echo "build WARNINGS: $logs/build-warnings.log"
fi

if want gpu; then
  check ctest-gpu 300 bash -c "cd '$build' && ctest -L gpu --output-on-failure"
  # A skip means the GPU was not usable: a failure here.
  if grep -qE 'Skipped|Not Run' "$logs/ctest-gpu.log"; then
    echo "GPU tests were SKIPPED (see $logs/ctest-gpu.log)"
    failed+=("ctest-gpu-skipped")
  fi
fi

if want sanitize; then
  if command -v compute-sanitizer >/dev/null; then
    for t in "$build"/tests/test_gpu_*; do
      [ -x "$t" ] || continue
      name="$(basename "$t")"
      args=()
      [ "$name" = test_gpu_model ] && args=(--quick)
      check "memcheck-$name" 400 compute-sanitizer --tool memcheck --leak-check full --error-exitcode 1 \
        "$t" "${args[@]}"
      check "racecheck-$name" 400 compute-sanitizer --tool racecheck --racecheck-report all --error-exitcode 1 \
        "$t" "${args[@]}"
    done
  else
    echo "compute-sanitizer not found (PATH, /usr/local/cuda/bin): sanitizer checks NOT run"
    failed+=("compute-sanitizer-missing")
  fi
fi

if want smoke; then
  # The default configuration on the GPU.
  rm -rf "$logs/smoke-run"
  check smoke-train 300 "$build/mlm" train --device cuda --steps 200 --data "$corpus" --out "$logs/smoke-run" \
    --set train.log_every=20
  tail -n 5 "$logs/smoke-train.log" 2>/dev/null | sed 's/^/    /'

  # CPU and GPU on the first 20 steps of the default configuration (TF32 off): same data, masks and dropout,
  # so the logged losses differ only by float32 rounding (the bound is loose for a 20-step trajectory).
  rm -rf "$logs/agree-cpu" "$logs/agree-gpu"
  common=(--steps 20 --data "$corpus" --set train.log_every=1 --set train.tf32=false --set train.samples=false -q)
  check agree-train-cpu 300 "$build/mlm" train --device cpu --out "$logs/agree-cpu" "${common[@]}"
  check agree-train-gpu 300 "$build/mlm" train --device cuda --out "$logs/agree-gpu" "${common[@]}"
  cat >"$logs/agree_compare.py" <<'PY'
import json, sys
def steps(path):
    return [(r["step"], r["loss"], r.get("grad_norm")) for r in map(json.loads, open(path)) if r["kind"] == "train"]
a, b = steps(sys.argv[1]), steps(sys.argv[2])
assert len(a) == len(b) == 20, (len(a), len(b))
worst = 0.0
for (s, la, ga), (_, lb, gb) in zip(a, b):
    r = abs(la - lb) / abs(la)
    worst = max(worst, r)
    print(f"step {s:3d}: loss cpu {la:.7f} gpu {lb:.7f} rel {r:.2e}; |g| cpu {ga:.6g} gpu {gb:.6g}")
print(f"worst relative loss difference {worst:.2e} (bound 1e-3)")
sys.exit(0 if worst <= 1e-3 else 1)
PY
  check agree-compare 60 python3 "$logs/agree_compare.py" "$logs/agree-cpu/metrics.jsonl" \
    "$logs/agree-gpu/metrics.jsonl"
  tail -n 1 "$logs/agree-compare.log" 2>/dev/null | sed 's/^/    /'

  # A model that cannot fit: exit status 1 and a message naming the bytes, the free memory and the keys.
  rm -rf "$logs/oom-run"
  check oom-message 120 bash -c "'$build/mlm' train --device cuda --steps 1 --data '$corpus' --out '$logs/oom-run' \
    --set train.batch_size=1000000 -q; rc=\$?; echo \"exit status \$rc\"; [ \$rc -eq 1 ]" &&
    ! grep -q 'CUDA out of memory: .* bytes .* free of .* train.batch_size' "$logs/oom-message.log" &&
    { echo "    the out-of-memory message lacks sizes or keys: $logs/oom-message.log"; failed+=("oom-message-text"); }
  grep -m1 'out of memory' "$logs/oom-message.log" 2>/dev/null | cut -c1-200 | sed 's/^/    /'
fi

if want suite; then
  check ctest-all 580 bash -c "cd '$build' && ctest --output-on-failure -j4"
fi

if [ ${#failed[@]} -eq 0 ]; then
  echo "all GPU checks passed"
  exit 0
fi
echo "FAILED: ${failed[*]}"
exit 1
