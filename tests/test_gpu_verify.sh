#!/usr/bin/env bash
# test_gpu_verify.sh (unit, tools): the plumbing of tools/gpu_verify.sh without a GPU (MLM_VERIFY_STUB=1: every
# GPU step is a fast stand-in). Two runs, ~20 s in all:
#   1. everything passes: every step is reported, OUTDIR holds at most 8 plain files and no folder, the
#      summary says so, the JSON parses and carries the 20 epochs of both runs, ten throughput figures and
#      issue 23's goal ratios computed from them,
#      the tarball holds the logs and no checkpoint;
#   2. a 14 s deadline with a step that hangs, a failing GPU test and a sanitizer that reports an unsupported
#      device: the hanging step is stopped at the time left (its cap cut), the failing test is re-run with
#      CUDA_LAUNCH_BLOCKING=1 and the script goes on (never stops early), the sanitizer step is a skip with
#      the tool's words, the steps with no time left are skips that say so, and the whole run ends within
#      the deadline plus a few seconds, leaving no stand-in process behind.
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
command -v python3 >/dev/null || { echo "SKIP: python3 is needed for the summary writer"; exit 77; }
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
checks=0 failures=0
check() {  # check DESCRIPTION COMMAND...
  local what=$1
  shift
  checks=$((checks + 1))
  if ! "$@" >/dev/null 2>&1; then
    failures=$((failures + 1))
    echo "FAILED: $what"
  fi
}
step_status() { awk -v s="$2" '$1 == "PASS" || $1 == "FAIL" || $1 == "SKIP" { if ($2 == s) st = $1 } END { print st }' "$1"; }
is() { [ "$(step_status "$1" "$2")" = "$3" ]; }

export MLM_VERIFY_STUB=1 MLM_VERIFY_RESERVE=2 MLM_VERIFY_MIN_STEP=2

# ---- 1. all pass -------------------------------------------------------------------------------------------
out="$tmp/ok"
t0=$SECONDS
MLM_VERIFY_DEADLINE=90 bash "$root/tools/gpu_verify.sh" "$out" >"$tmp/ok.log" 2>&1
rc=$?
echo "run 1 (all pass): exit status $rc in $((SECONDS - t0)) s"
check "run 1 exits 0" [ $rc -eq 0 ]
check "run 1 wrote summary.txt" [ -s "$out/summary.txt" ]
n_files=$(find "$out" -mindepth 1 -type f | wc -l)
n_other=$(find "$out" -mindepth 1 ! -type f | wc -l)
echo "run 1: OUTDIR holds $n_files files and $n_other other entries"
check "at most 8 files come back" [ "$n_files" -le 8 ]
check "no folders or links in OUTDIR" [ "$n_other" -eq 0 ]
for s in build test_gpu_mask test_gpu_ops test_gpu_model test_gpu_sparse test_gpu_bert test_gpu_bf16 test_gpu_bf16_model test_gpu_memory memcheck-model memcheck-mask racecheck-model \
  racecheck-mask ref-20ep agree-cpu mlm-20ep agree-gpu-vs-cpu oom-message resume-bit-identical nccl-one-rank subword-gpu-vs-cpu \
  bf16-gpu-vs-cpu long-seq-gpu-vs-cpu tput-mlm-b64-tf32 tput-mlm-b64-fp32 tput-mlm-b64-bf16 tput-mlm-b512-tf32 tput-reference \
  tput-bert-t128-bf16 tput-torch-bert-t128-bf16 tput-bert-t128-tf32 tput-bert-t512-bf16 tput-torch-bert-t512-bf16 \
  bench-suite ncu-top5; do
  check "run 1: step $s passed" is "$out/summary.txt" "$s" PASS
done
check "run 1: overall line" grep -q '^steps: 35 passed, 0 failed, 0 skipped: every step passed' "$out/summary.txt"
check "run 1: stand-in runs say so" grep -q '^STAND-IN RUN' "$out/summary.txt"
check "run 1: 20-epoch verdict" grep -q 'verdict: AGREE: 20 common epochs' "$out/summary.txt"
check "run 1: ten throughput figures" [ "$(grep -cE '^  (mlm|PyTorch).* tokens/s +[0-9.]+ ms/step$' "$out/summary.txt")" -eq 10 ]
# The stand-ins' figures: mlm 1,000,0xx tokens/s, PyTorch's BERT 500,128 and 500,512, so the ratios are known.
check "run 1: issue 23's goals computed from the figures" grep -qE '^  mlm BF16 / PyTorch BF16 \(autocast, SDPA\), bert-base T 128: 2\.00x \(goal 1\.5x: met\)$' "$out/summary.txt"
check "run 1: BF16 over TF32" grep -qE '^  mlm BF16 / mlm TF32, bert-base T 128: 1\.00x \(goal 1\.8x: NOT met\)$' "$out/summary.txt"
check "run 1: the JSON parses with both curves and the throughput" python3 -c "
import glob, json, sys
d = json.load(open(glob.glob(sys.argv[1] + '/gpu-*.json')[0]))
assert d['stub'] is True and len(d['epochs']['mlm']) == 20 and len(d['epochs']['reference']) == 20
assert d['epochs']['verdict'].startswith('AGREE') and len(d['throughput']) == 10
assert all(v['status'] == 'pass' for v in d['steps'].values()) and len(d['steps']) == 35
assert [g['goal'] for g in d['goals']] == [1.5, 1.8, None] and all(g['ratio'] > 0 for g in d['goals'])
" "$out"
check "run 1: the tarball holds the logs" tar -tzf "$out/logs.tar.gz" logs/results.tsv logs/mlm-20ep.log
check "run 1: no checkpoint in the tarball" bash -c "! tar -tzf '$out/logs.tar.gz' | grep -q safetensors"

# ---- 2. a deadline, a hang, a failure, an unsupported device ------------------------------------------------
out="$tmp/bad"
# The hanging stand-in sleeps for a duration unique to this run (1000.PID s), so that the check below that it was
# stopped looks for this run's process only, not another test_gpu_verify's running beside it on the machine.
hang_s="1000.$$"
t0=$SECONDS
MLM_VERIFY_DEADLINE=14 MLM_VERIFY_STUB_HANG=mlm-20ep MLM_VERIFY_STUB_HANG_S="$hang_s" MLM_VERIFY_STUB_FAIL=test_gpu_model \
  MLM_VERIFY_STUB_UNSUPPORTED=racecheck-model bash "$root/tools/gpu_verify.sh" "$out" >"$tmp/bad.log" 2>&1
rc=$?
took=$((SECONDS - t0))
echo "run 2 (deadline 14 s, a hang, a failure, an unsupported device): exit status $rc in $took s"
check "run 2 exits 1 (a step failed) after writing everything" [ $rc -eq 1 ]
check "run 2 ends within the deadline plus 6 s" [ $took -le 20 ]
check "run 2 wrote summary.txt" [ -s "$out/summary.txt" ]
check "run 2: at most 8 files" [ "$(find "$out" -mindepth 1 -type f | wc -l)" -le 8 ]
check "run 2: the failing test failed" is "$out/summary.txt" test_gpu_model FAIL
check "run 2: and was re-run with CUDA_LAUNCH_BLOCKING=1" is "$out/summary.txt" test_gpu_model-blocking FAIL
check "run 2: later steps still ran (never stops early)" is "$out/summary.txt" memcheck-model PASS
check "run 2: the unsupported device is a skip" is "$out/summary.txt" racecheck-model SKIP
check "run 2: with the tool's words" grep -q 'SKIP racecheck-model .*Device not supported' "$out/summary.txt"
check "run 2: the hang was stopped at the time left" \
  grep -qE 'FAIL mlm-20ep .*timed out after [0-9]+ s \(its 300 s cap cut to the time left\)' "$out/summary.txt"
check "run 2: steps after the deadline are skips that say why" \
  grep -q 'SKIP tput-reference .*no time left' "$out/summary.txt"
check "run 2: the overall line names the failures" \
  grep -q '^steps: .* FAILED: test_gpu_model, test_gpu_model-blocking, mlm-20ep' "$out/summary.txt"
check "run 2: the reference's epochs are still compared" grep -q 'reference epochs logged: 20' "$out/summary.txt"
check "run 2: no stand-in left running" bash -c "! pgrep -f '^sleep $hang_s\$' >/dev/null"

echo "test_gpu_verify: $checks checks, $failures failed"
if [ $failures -ne 0 ]; then
  echo "--- run 1 output"; cat "$tmp/ok.log"
  echo "--- run 2 output"; cat "$tmp/bad.log"
  exit 1
fi
exit 0
