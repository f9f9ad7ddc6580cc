#!/usr/bin/env bash
# bench/cpu_vs_torch.sh: mlm's CPU backend against the reference model in PyTorch on the CPU, same machine,
# same thread count, reference configuration. Prints both, the ratio and GFLOP/s, and writes
# bench/results/cpu-<host>-<date>.json. Usage: bench/cpu_vs_torch.sh [THREADS] [STEPS]
set -euo pipefail
cd "$(dirname "$0")/.."
threads="${1:-$(nproc)}"
steps="${2:-30}"
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j"$(nproc)" --target bench_cpu_step >/dev/null
export OMP_NUM_THREADS="$threads" OPENBLAS_NUM_THREADS=1
mlm_json="$(./build/bench/bench_cpu_step --set train.threads="$threads" --steps "$steps")"
torch_json="$(python3 bench/torch_cpu_bench.py --threads "$threads" --steps "$steps")"
mkdir -p bench/results
out="bench/results/cpu-$(hostname -s)-$(date +%Y%m%d-%H%M%S).json"
python3 - "$mlm_json" "$torch_json" "$out" <<'PY'
import json, sys, platform, subprocess, datetime
mlm, torch, out = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
ratio = mlm["tokens_per_s"] / torch["tokens_per_s"]
try:
    commit = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
except Exception:
    commit = "unknown"
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
result = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "commit": commit, "cpu": cpu,
          "mlm": mlm, "torch": torch, "ratio_tokens_per_s": ratio}
json.dump(result, open(out, "w"), indent=1)
print(f"CPU: {cpu}, {mlm['threads']} threads, reference config (batch 64 x seq 32, 812,355 parameters)")
print(f"  mlm   {mlm['tokens_per_s']:>10.0f} tokens/s  {mlm['step_ms']:8.1f} ms/step  {mlm['gflops_per_s']:6.1f} GFLOP/s ({mlm['blas']})")
print(f"  torch {torch['tokens_per_s']:>10.0f} tokens/s  {torch['step_ms']:8.1f} ms/step  (PyTorch {torch['torch_version']})")
print(f"  ratio mlm / torch: {ratio:.2f}x   (written to {out})")
PY
