#!/usr/bin/env bash
# tools/python_env.sh: the Python virtual environment of the reference tests (PyTorch, labml_nn, Hugging Face).
#
# Prints the path of its interpreter on stdout (exit 0), or says on stderr why there is none (exit 1).
# The environment lives outside the checkout, keyed by a hash of the requirement files and the base Python,
#   ${MLM_VENV_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mlm}/venv-<hash>/
# so a fresh clone on the same machine (CI) reuses it: the first run installs (minutes, ~4 GB with PyTorch's
# CUDA wheels), later runs only check that it imports (seconds). An environment is used only once its
# install finished (a stamp file); a half-made one is removed and made again. A lock keeps two runs from
# installing into the same folder at once.
#
# usage: bash tools/python_env.sh            (or MLM_PYTHON_ENV=off to not make one)
#        MLM_BASE_PYTHON=python3.11 bash tools/python_env.sh
set -uo pipefail
cd "$(dirname "$0")/.."

say() { echo "   $*" >&2; }

if [ "${MLM_PYTHON_ENV:-on}" = off ]; then
  say "MLM_PYTHON_ENV=off: not preparing the Python reference environment"
  exit 1
fi
base="${MLM_BASE_PYTHON:-python3}"
if ! command -v "$base" >/dev/null; then
  say "no $base on PATH: cannot make the Python reference environment"
  exit 1
fi
reqs=(tools/requirements-test.txt tools/requirements-test-nodeps.txt)
key="$( { cat "${reqs[@]}"; "$base" -c 'import sys, platform; print(sys.version, platform.machine())'; } |
        sha256sum | cut -c1-16)"
cache="${MLM_VENV_CACHE:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/mlm}"
venv="$cache/venv-$key"
py="$venv/bin/python"
# The imports the tests need: a reused environment that no longer imports is made again.
check='import torch, numpy, safetensors.torch, transformers, tokenizers, labml_nn.transformers.mlm, labml_nn.transformers.models'

mkdir -p "$cache" || { say "cannot create $cache"; exit 1; }
exec 9>"$cache/venv.lock"
flock 9 || { say "cannot lock $cache/venv.lock"; exit 1; }

if [ -f "$venv/.mlm-complete" ] && "$py" -c "$check" 2>/dev/null; then
  say "reusing $venv"
  echo "$py"
  exit 0
fi

rm -rf "$venv"
say "installing the Python reference packages into $venv (first time: several minutes)"
t0=$(date +%s)
pip_opts=(--disable-pip-version-check --quiet --retries 2 --timeout 30)
log="$cache/venv-$key.log"
if "$base" -m venv "$venv" >"$log" 2>&1 &&
   "$py" -m pip install "${pip_opts[@]}" -r tools/requirements-test.txt >>"$log" 2>&1 &&
   "$py" -m pip install "${pip_opts[@]}" --no-deps -r tools/requirements-test-nodeps.txt >>"$log" 2>&1 &&
   "$py" -c "$check" >>"$log" 2>&1; then
  touch "$venv/.mlm-complete"
  say "installed in $(( $(date +%s) - t0 )) s"
  echo "$py"
  exit 0
fi
say "could not install the Python reference packages (is the package index reachable?); the last lines of $log:"
tail -n 5 "$log" | sed 's/^/     /' >&2
rm -rf "$venv"
exit 1
