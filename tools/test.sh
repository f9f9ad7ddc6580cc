#!/usr/bin/env bash
# tools/test.sh: the README's test command. Builds mlm (Release) and runs the whole CTest suite, then a
# CPU-only build (its emu tests with the kernels compiled with FMA contraction), the emu tests with blocks in
# parallel under ThreadSanitizer, then builds with AddressSanitizer + UndefinedBehaviorSanitizer and runs the
# suite again (slow tests excluded there), then fuzzes the file readers for a bounded time (tests/fuzz/). GPU tests report "Skipped" with the
# reason where there is no GPU. First, the Python reference packages go into a cached virtual environment.
set -euo pipefail
cd "$(dirname "$0")/.."

# Optional system packages (tools/install_deps.sh, shared with the README's first command): OpenBLAS makes the CPU
# backend fast (without it mlm builds its own GEMM, never a reference BLAS); Open MPI for the data-parallel tests
# (issue 13, tests/test_dp.c, label `mpi`; without it the mpi-labelled test skips, saying why). Installed when
# this runs as root or with passwordless sudo; otherwise it says what to install.
bash tools/install_deps.sh blas mpi

# The corpus for the data tests: ../shared/data (CI) unless MLM_DATA_MIRROR points elsewhere.
export MLM_DATA_MIRROR="${MLM_DATA_MIRROR:-$(cd .. && pwd)/shared/data}"
corpus="$MLM_DATA_MIRROR/tinyshakespeare.txt"
jobs="$(nproc 2>/dev/null || echo 2)"

# CTest reports a skipped test as "Skipped"; print the reason each one gave (its "SKIP:" line).
skip_reasons() {
  grep -h "^SKIP:" "$1/Testing/Temporary/LastTest.log" 2>/dev/null | sort | uniq -c | sed 's/^/   skipped:/' || true
}

# ---- Python reference environment (block owned by the fuzz/python work; tools/python_env.sh) ----------------
# PyTorch, labml_nn 0.4.137, transformers, tokenizers in a virtual environment outside the checkout (reused
# by later runs and fresh clones on this machine) for the tests labelled `python`. MLM_PYTHON_ENV=off skips it.
echo "== Python reference environment (tools/requirements-test*.txt)"
if py="$(bash tools/python_env.sh)"; then
  py_args=(-DMLM_PYTHON3="$py")
  echo "   the python-labelled tests run with $py"
else
  py_args=(-UMLM_PYTHON3)
  echo "   NOT PREPARED: the python-labelled tests run with the python3 on PATH and skip where it lacks the packages"
fi
# ---- end of the Python reference environment block ---------------------------------------------------------

echo "== release build"
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DMLM_TEST_CORPUS="$corpus" "${py_args[@]}" >/dev/null
cmake --build build -j"$jobs"
(cd build && ctest --output-on-failure -j"$jobs")
skip_reasons build

# A CPU-only configure (MLM_CUDA=OFF), as on a machine without the CUDA Toolkit: the CPU trainer builds, its
# unit tests pass, the GPU tests skip with the reason, the CUDA code still runs on the CPU layer (emu), and
# --device cuda says the binary has no CUDA. About 40 s on 2 cores (no nvcc involved). It uses the built-in GEMM
# (MLM_BLAS=OFF), as a machine without OpenBLAS does, so that the emu tests compare the CUDA step with it too. Its
# emu tests run with the kernels compiled as nvcc rounds them (MLM_EMU_FP_CONTRACT: a * b + c fused into FMAs, the
# device's expf/logf error), the other builds' without: every emu test passes both ways, so no tolerance rests on
# the emulator's roundings.
echo "== CPU-only build (MLM_CUDA=OFF, built-in GEMM; emu kernels with FMA contraction)"
cmake -S . -B build-cpu -DCMAKE_BUILD_TYPE=Release -DMLM_CUDA=OFF -DMLM_BLAS=OFF -DMLM_EMU_FP_CONTRACT=ON -DMLM_TEST_CORPUS="$corpus" >/dev/null
cmake --build build-cpu -j"$jobs"
(cd build-cpu && ctest --output-on-failure -j"$jobs" -L "unit|gpu|emu")
skip_reasons build-cpu
if out="$(./build-cpu/mlm train --device cuda --steps 1 -o "$(mktemp -u)" 2>&1)" ||
   ! grep -q "built without CUDA" <<<"$out"; then
  echo "FAIL: a CPU-only mlm given --device cuda should refuse, saying it was built without CUDA; it said: $out"
  exit 1
fi
echo "   --device cuda refused as expected: ${out#mlm: error: }"

# The emu tests once more with the blocks of every grid on a pool of threads under ThreadSanitizer (MLM_EMU_TSAN,
# tests/emu): device atomics and __threadfence are C11 atomics and fences there, so an inter-block race (a
# last-block reduction without its fence, a counter two blocks share without an atomic) fails. CPU-only (no nvcc),
# the emu targets alone.
echo "== emu tests, blocks in parallel under ThreadSanitizer (MLM_EMU_TSAN)"
cmake -S . -B build-tsan -DCMAKE_BUILD_TYPE=Release -DMLM_CUDA=OFF -DMLM_EMU_TSAN=ON -DMLM_TEST_CORPUS="$corpus" >/dev/null
cmake --build build-tsan -j"$jobs" --target emu_tests
(cd build-tsan && ctest --output-on-failure -j"$jobs" -L emu)

echo "== sanitizer build (ASan + UBSan)"
cmake -S . -B build-san -DCMAKE_BUILD_TYPE=Debug -DMLM_SANITIZE=ON -DMLM_TEST_CORPUS="$corpus" "${py_args[@]}" >/dev/null
cmake --build build-san -j"$jobs"
(cd build-san && ctest --output-on-failure -j"$jobs" -LE slow)
skip_reasons build-san

# ---- Fuzzing (block owned by the fuzz work; tests/fuzz/run.sh, tests/fuzz/README.md) ------------------------
# libFuzzer harnesses built with clang in build-fuzz/, each run MLM_FUZZ_SECONDS (default 15) on its seeds;
# skipped, with the reason, where clang or libFuzzer's runtime is missing. MLM_FUZZ_SECONDS=0 skips it.
fuzz_secs="${MLM_FUZZ_SECONDS:-15}"
if [ "$fuzz_secs" = 0 ]; then
  echo "== fuzzing: skipped (MLM_FUZZ_SECONDS=0)"
else
  echo "== fuzzing (libFuzzer, $fuzz_secs s per harness)"
  fuzz_rc=0
  MLM_BIN=build/mlm bash tests/fuzz/run.sh "$fuzz_secs" || fuzz_rc=$?
  if [ "$fuzz_rc" = 77 ]; then
    echo "   fuzzing skipped (see the SKIP line above)"
  elif [ "$fuzz_rc" != 0 ]; then
    exit "$fuzz_rc"
  fi
fi
# ---- end of the fuzzing block ------------------------------------------------------------------------------
