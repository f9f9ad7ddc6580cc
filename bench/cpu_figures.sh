#!/usr/bin/env bash
# bench/cpu_figures.sh: every CPU figure of issue 18 in one command (bench/README.md, "The fast default").
# Builds mlm twice, CPU-only Release, with OpenBLAS (MLM_BLAS=AUTO; tools/install_deps.sh installs it where it
# can) and with the built-in GEMM (MLM_BLAS=OFF), in build-bench-openblas/ and build-bench-builtin/, then:
#   1. bench/matmul_bench: the built-in GEMM against OpenBLAS on every product of a shakespeare and a bert-mini
#      training step, 1 and 2 threads, alternated (goal: at least 60% of OpenBLAS's throughput);
#   2. bench/cpu_vs_torch.py: `mlm train` of both builds against the seed's PyTorch step, alternated, at 1 and 2
#      threads and at the default (nothing set), then at the default with one busy process beside (goal: at least
#      2x at 1 and 2 threads with either build; beside a busy process mlm keeps at least the share of its
#      unloaded speed that PyTorch keeps, and stays at least 2x PyTorch).
# Every figure is a same-run ratio; load averages are recorded beside them. Environment: nothing set (thread
# variables are removed). Results: bench/results/cpu-<host>-<date>.json and the printed tables.
#   bash bench/cpu_figures.sh [--repeats N] [--quick]      (about 30 min on an idle 2-core VM; --quick: one repeat,
#                                                           shorter runs, matmul_bench on shakespeare only)
set -euo pipefail
cd "$(dirname "$0")/.."
repeats=3; steps=40; torch_steps=20; mm_repeats=5; mm_models=all
while [ $# -gt 0 ]; do
  case "$1" in
    --repeats) repeats="$2"; shift ;;
    --quick) repeats=1; steps=25; torch_steps=10; mm_repeats=1; mm_models=shakespeare ;;
    *) echo "usage: bash bench/cpu_figures.sh [--repeats N] [--quick]" >&2; exit 2 ;;
  esac
  shift
done
bash tools/install_deps.sh blas
export MLM_DATA_MIRROR="${MLM_DATA_MIRROR:-$(cd .. && pwd)/shared/data}"
for variant in openblas builtin; do
  blas=AUTO; [ "$variant" = builtin ] && blas=OFF
  cmake -S . -B "build-bench-$variant" -DCMAKE_BUILD_TYPE=Release -DMLM_CUDA=OFF -DMLM_MPI=OFF -DMLM_BUILD_TESTS=OFF \
    -DMLM_BLAS="$blas" | grep "mlm: CPU matmuls"
  cmake --build "build-bench-$variant" -j"$(nproc)" --target mlm matmul_bench >/dev/null
done
if ! ./build-bench-openblas/mlm --version | grep -q OpenBLAS; then
  echo "bench/cpu_figures.sh: no OpenBLAS for build-bench-openblas (see above); the OpenBLAS figures need it" >&2
  exit 1
fi
py="${MLM_BENCH_PYTHON:-$(bash tools/python_env.sh)}"
echo "== load average: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "== 1. built-in GEMM vs OpenBLAS on the model's products"
env -u OMP_NUM_THREADS -u OMP_WAIT_POLICY -u GOMP_SPINCOUNT -u OPENBLAS_NUM_THREADS \
  ./build-bench-builtin/bench/matmul_bench --threads 1 2 --repeats "$mm_repeats" --model "$mm_models"
echo "== 2. mlm train (OpenBLAS and built-in) against the seed's PyTorch step"
"$py" bench/cpu_vs_torch.py --python "$py" --mlm openblas=build-bench-openblas/mlm builtin=build-bench-builtin/mlm \
  --threads 1 2 default --busy-peer default --repeats "$repeats" --steps "$steps" --torch-steps "$torch_steps" \
  --note "bench/cpu_figures.sh"
