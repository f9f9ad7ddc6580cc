#!/usr/bin/env bash
# bench/cpu_vs_torch.sh: build mlm (Release, build/) and run bench/cpu_vs_torch.py, which times the main
# command (`mlm train --device cpu`) against PyTorch at the same thread counts. It sets no thread variables
# (it removes them): the figures are what a user gets. Arguments go to cpu_vs_torch.py, e.g.
#   bash bench/cpu_vs_torch.sh --threads 1 2 --repeats 3
set -euo pipefail
cd "$(dirname "$0")/.."
build="${MLM_BUILD_DIR:-build}"
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$build" -j"$(nproc)" --target mlm >/dev/null
exec python3 bench/cpu_vs_torch.py --mlm "$build/mlm" "$@"
