#!/usr/bin/env bash
# tools/relu_tie_matrix.sh: the CUDA-vs-CPU comparisons of the emu tests against every CPU matmul. Each matmul
# rounds the CPU's feed-forward pre-activations its own way, so each decides a different handful of ReLU units
# at zero differently from the device; test_emu_model and test_emu_sparse must pass with all of them (the ties
# are recognised, tests/relu_ties.c, docs/testing.md). Builds two CPU-only trees (no nvcc needed; the CUDA sources
# run on the CPU execution layer): OpenBLAS, run once per kernel family forced with OPENBLAS_CORETYPE (Debian's
# OpenBLAS is built with DYNAMIC_ARCH), and the built-in matmul (-DMLM_WITH_BLAS=OFF). Prints one row per matmul:
# the core OpenBLAS reports it ran (a core the CPU cannot run falls back, and the row says so), the ReLU ties found
# and taken the device's way, and each test's result.
#
#   bash tools/relu_tie_matrix.sh               # MLM_TIES_DIR (default build-ties) holds the builds, reused
#   MLM_TIES_CORES="Haswell Zen" bash tools/relu_tie_matrix.sh
#   MLM_TIES_BUILTIN_ENVS="VAR=a VAR=b" bash tools/relu_tie_matrix.sh   # one more built-in row per setting (a
#                                                                       # variable that picks the built-in's kernel)
#
# About 2 minutes on 2 cores once built (the first build: a few minutes). Exit status 0 when every row passes.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
work="${MLM_TIES_DIR:-$root/build-ties}"
cores="${MLM_TIES_CORES:-Haswell Zen SkylakeX Cooperlake Sandybridge}"
jobs="$(nproc 2>/dev/null || echo 2)"
tests=(test_emu_model test_emu_sparse)
mkdir -p "$work"

build() {  # build DIR CMAKE_ARGS...: configure (again: what CMake found is read from its log), build the two tests
  local dir="$1"; shift
  cmake -S "$root" -B "$work/$dir" -DCMAKE_BUILD_TYPE=Release -DMLM_CUDA=OFF "$@" >"$work/$dir.configure.log" 2>&1 ||
    { echo "relu_tie_matrix: configuring $dir failed: $work/$dir.configure.log"; exit 1; }
  cmake --build "$work/$dir" -j"$jobs" --target "${tests[@]}" >"$work/$dir.build.log" 2>&1 ||
    { echo "relu_tie_matrix: building $dir failed: $work/$dir.build.log"; exit 1; }
}

failures=0
# Each row runs the tests as CTest does (forward thread order, --quick for the model) and summarises them.
# row LABEL DIR WANT_CORE [VAR=VALUE]: WANT_CORE forced with OPENBLAS_CORETYPE (empty: none), VAR=VALUE set too.
row() {
  local label="$1" dir="$2" want="$3" extra="${4:-}" log result core ties taken status=""
  for t in "${tests[@]}"; do
    log="$work/$dir.$label.$t.log"
    local args=()
    [ "$t" = test_emu_model ] && args=(--quick)
    if env ${want:+OPENBLAS_CORETYPE="$want"} ${extra:+"$extra"} MLM_SOURCE_DIR="$root" MLM_EMU_ORDER=forward \
        MLM_EMU_SEED=7 MLM_EMU_QUIET=1 OMP_NUM_THREADS=2 OMP_WAIT_POLICY=PASSIVE "$work/$dir/tests/emu/$t" "${args[@]}" \
        >"$log" 2>&1; then
      result="pass"
    else
      result="FAIL ($log)"
      failures=$((failures + 1))
    fi
    status="$status $t: $result;"
  done
  log="$work/$dir.$label.test_emu_model.log"
  core="$(grep -m1 -oE 'CPU matmul: .*' "$log" | sed 's/CPU matmul: //')"
  if [ -n "$want" ] && ! grep -qi "core $want)" <<<"$core"; then core="$core [asked for $want: not run]"; fi
  ties="$(grep -E 'ReLU ties:' "$log" | awk '{n += $3; k += $(NF-4)} END {print n + 0}')"
  taken="$(grep -E 'ReLU ties:' "$log" | awk '{k += $(NF-4)} END {print k + 0}')"
  printf '%-12s | %-40s | %3s ties, %2s taken |%s\n' "$label" "${core:-?}" "$ties" "$taken" "$status"
}

echo "== building in $work"
build builtin -DMLM_WITH_BLAS=OFF
build openblas -DMLM_WITH_BLAS=ON
have_openblas=1
grep -qiE 'matmul.*OpenBLAS' "$work/openblas.configure.log" || have_openblas=0
echo "matmul       | ran                                      | ReLU ties (test_emu_model) | results"
row builtin builtin ""
for e in ${MLM_TIES_BUILTIN_ENVS:-}; do row "builtin:${e#*=}" builtin "" "$e"; done
if [ "$have_openblas" = 1 ]; then
  for c in $cores; do row "$c" openblas "$c"; done
else
  echo "OpenBLAS     | not found by CMake (apt-get install libopenblas-dev): its rows are not run"
  failures=$((failures + 1))
fi
echo "relu_tie_matrix: $([ "$failures" = 0 ] && echo "every row passes" || echo "$failures failures")"
[ "$failures" = 0 ]
