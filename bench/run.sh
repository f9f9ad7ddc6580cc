#!/usr/bin/env bash
# bench/run.sh: mlm's benchmark suite in one command (bench/suite.py says what it runs and why).
#
#   bash bench/run.sh [--quick] [--mode auto|gpu|cpu] [--budget S] [--nsys] [other bench/suite.py options]
#
# On a GPU: mlm against the PyTorch reference trainer, eager fused Adam and torch.compile (batch 64 and 512,
# TF32 on and off), the device's copy bandwidth and SGEMM rate, and the roofline per kernel family. Without
# one: the CPU comparison, labelled as such, and the counted part of the roofline. Results go to
# bench/results/bench-<mode>-<host>-<date>.json and the table in bench/README.md is regenerated from it.
#
# Environment: MLM_BUILD_DIR (default build/; with MLM_BENCH_NO_BUILD=1 it is used as it is, e.g. the carried
# build-gpu/ on the GPU machine), MLM_BENCH_PYTHON (a python with torch; default: tools/python_env.sh's).
set -euo pipefail
cd "$(dirname "$0")/.."
build="${MLM_BUILD_DIR:-build}"
if [ "${MLM_BENCH_NO_BUILD:-0}" != 1 ]; then
  echo "[run.sh] building mlm and bench_emu_step in $build (Release)" >&2
  nice -n 10 cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release >/dev/null
  nice -n 10 cmake --build "$build" -j"$(nproc)" --target mlm >/dev/null
  # The counting build needs GCC and no sanitizer; without it the suite says the counts are missing.
  nice -n 10 cmake --build "$build" -j"$(nproc)" --target bench_emu_step >/dev/null 2>&1 ||
    echo "[run.sh] bench_emu_step could not be built here: the roofline's counts will be missing" >&2
fi
py="${MLM_BENCH_PYTHON:-}"
if [ -z "$py" ]; then
  py="$(bash tools/python_env.sh)" || { echo "[run.sh] no Python with PyTorch (tools/python_env.sh failed); set MLM_BENCH_PYTHON" >&2; exit 1; }
fi
exec "$py" bench/suite.py --build "$build" --python "$py" "$@"
