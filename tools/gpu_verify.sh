#!/usr/bin/env bash
# gpu_verify.sh: the whole GPU verification of mlm in one command under one deadline, for a GPU machine
# that receives only the checkout (plus carried build-gpu/ and data/) and gives back a few files.
#
#   bash tools/gpu_verify.sh OUTDIR
#   bash tools/gpu_verify.sh --stamp    (here, after building build-gpu/: records what it was built from)
#
# OUTDIR receives at most 8 files, none deeper than OUTDIR/: summary.txt (every step pass/fail/skip with its
# reason, both 20-epoch curves and their verdict, throughput, versions), gpu-<date>.json (the figures, for
# bench/results/), bench-<date>.json (the benchmark suite's results, for bench/results/), mlm-20ep.jsonl and
# ref-20ep.jsonl (the two runs' metrics) and logs.tar.gz (every log; no weights or checkpoints). Scratch (runs, checkpoints) lives in a temporary folder that is removed.
#
# Steps, in order; a failure never stops the script, and every step's timeout is cut to the time left:
#   0. environment (nvidia-smi, nvcc, python/torch versions), and the build: build-gpu/ as carried when its
#      SOURCE_STAMP matches these sources and its binaries load (ldd) and run, else a fresh configure +
#      build in build-gpu-local/ (sm_90, no BLAS)
#   1. in the background: the PyTorch reference for MLM_VERIFY_EPOCHS (20) epochs on the GPU, TF32 off; and
#      the CPU half of the agreement run
#   2. the GPU tests, each run once (the BF16 step against the CPU reference among them: test_gpu_bf16_model);
#      a failing one is re-run with CUDA_LAUNCH_BLOCKING=1
#   3. compute-sanitizer memcheck (leak check) and racecheck on test_gpu_model --quick and test_gpu_mask,
#      the four at once, each capped; "device not supported" is a skip, not a failure
#   4. mlm for the same epochs on the reference configuration, TF32 off; the GPU half of the agreement run
#      (20 steps vs the CPU, TF32 off, losses within 1e-3); the out-of-memory message; an interrupted and
#      resumed GPU run against an uninterrupted one, bit for bit; a one-rank NCCL run against the plain step,
#      bit for bit; a WordPiece BERT-tiny run (sparse prediction, whole words, 2 micro-batches) GPU vs CPU
#   4b. BF16 and long sequences (issue 23): a BERT-tiny run in train.precision = bf16 on the GPU against the CPU's
#      BF16 reference mode; a BERT-tiny run at seq_len 512 (tiled attention) GPU vs CPU, TF32 off
#   5. throughput once the reference has finished (mlm batch 64 TF32, FP32 and BF16, batch 512, the reference
#      trainer for 300 steps); bert-base at T 128 and 512 in BF16 and at T 128 in TF32 against transformers'
#      BertForMaskedLM with torch.autocast(bfloat16) and SDPA attention at the same batch (issue 23's goals:
#      mlm BF16 at least 1.5x PyTorch's and 1.8x mlm's TF32 at T 128); the benchmark suite (bench/run.sh --quick: mlm against the reference trainer,
#      fused Adam and torch.compile, device rates, roofline; its JSON comes back as bench-<date>.json); ncu on
#      the five slowest kernels of one step if time is left
#   6. summary.txt, gpu-<date>.json, logs.tar.gz
#
# Why 20 epochs fit: an epoch is 491 steps at batch 64 plus 55 validation batches. The reference trainer is
# eager PyTorch, launch-bound at this size: ~40 modules x forward + backward plus clip and the foreach Adam
# is ~1,000 kernel launches a step, ~5-10 ms at 5-10 us each, so 2.5-5 s an epoch and 50-100 s for 20; mlm
# launches ~450 kernels and one sync a step (~2-3 ms), ~25-60 s for 20 epochs. Both start early (the
# reference at t = 0), so 20 epochs fit the 480 s deadline even at 3x these estimates. If the reference is
# still running at the deadline it is stopped, and the summary compares the epochs both runs reached and
# says how many that was (its metrics are written line by line).
#
# Environment: MLM_VERIFY_DEADLINE (seconds, default 480), MLM_VERIFY_EPOCHS (20), MLM_VERIFY_RESERVE
# (seconds kept for packing, 15), MLM_VERIFY_PYTHON (python3), MLM_VERIFY_STUB=1 (no GPU: every GPU step is
# replaced by a fast stand-in, for tests/test_gpu_verify.sh; MLM_VERIFY_STUB_FAIL / _HANG / _UNSUPPORTED
# name steps whose stand-in fails, hangs or reports an unsupported device).
set -uo pipefail
# Every step runs as `timeout T bash gpu_verify.sh --step FUNCTION ARGS` (timeout stops the step's whole
# process group), so the settings below travel to the steps through the environment.
SELF="$(readlink -f "$0")"
# A digest of the sources a build is made from (no git needed: the GPU machine may get the files without .git).
source_stamp() {
  (cd "$(dirname "$SELF")/.." && find src include tests -type f \( -name '*.c' -o -name '*.cu' -o -name '*.h' \
    -o -name CMakeLists.txt \) | LC_ALL=C sort | xargs cat CMakeLists.txt | md5sum | cut -d' ' -f1)
}
if [ "${1:-}" = --stamp ]; then  # after building build-gpu/ here: record what it was built from
  source_stamp >"$(dirname "$SELF")/../build-gpu/SOURCE_STAMP" && exit 0
  exit 1
fi
if [ "${1:-}" != --step ]; then
  if [ $# -ne 1 ] || [ "$1" = -h ] || [ "$1" = --help ]; then
    sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'
    exit 2
  fi
  mkdir -p "$1" || { echo "cannot create $1" >&2; exit 2; }
  export VERIFY_OUT="$(cd "$1" && pwd)"
  export VERIFY_T0=$(date +%s)
  export DEADLINE=${MLM_VERIFY_DEADLINE:-480}
  export RESERVE=${MLM_VERIFY_RESERVE:-15}
  export MIN_STEP=${MLM_VERIFY_MIN_STEP:-5}  # a step with less time than this left is skipped
  export EPOCHS=${MLM_VERIFY_EPOCHS:-20}
  export PY=${MLM_VERIFY_PYTHON:-python3}
  export STUB=${MLM_VERIFY_STUB:-0}
  export ROOT="$(cd "$(dirname "$SELF")/.." && pwd)"
  export WORK="$(mktemp -d "${TMPDIR:-/tmp}/mlm-verify.XXXXXX")" || exit 2
  export LOGS="$WORK/logs" RUNS="$WORK/runs"
  export RESULTS="$LOGS/results.tsv"  # step <TAB> pass|fail|skip <TAB> seconds <TAB> detail (a later line wins)
  export FACTS="$LOGS/facts.txt"      # key=value lines for the summary
  export JOBS="$(nproc 2>/dev/null || echo 4)"
  export MLM_SOURCE_DIR="$ROOT" PYTHONUNBUFFERED=1 PATH="$PATH:/usr/local/cuda/bin"
  # mlm re-executes itself once to make OpenMP wait passively unless this is set; set it so that every
  # process the profilers and sanitizers see is the one they started.
  export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-passive}"
  export BUILD="$ROOT/build-gpu" CORPUS=""
  # The toolkit's libraries (cudart, cuBLAS, cuRAND) wherever this machine keeps them, for carried binaries.
  for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
    "$(dirname "$(command -v nvcc 2>/dev/null || echo /nonexistent/bin/nvcc)")/../lib64"; do
    [ -d "$d" ] && LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$d"
  done
  export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}"
  mkdir -p "$LOGS" "$RUNS"
  : >"$RESULTS"
  : >"$FACTS"
fi
OUT="${VERIFY_OUT:-}"
cd "$ROOT" || exit 2

# ---- time and results -------------------------------------------------------------------------------------

elapsed() { echo $(($(date +%s) - VERIFY_T0)); }
# Seconds left before the packing reserve.
left() { echo $((DEADLINE - RESERVE - ($(date +%s) - VERIFY_T0))); }
fact() { printf '%s=%s\n' "$1" "$2" >>"$FACTS"; }
record() {  # record NAME STATUS SECONDS DETAIL
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$RESULTS"
  printf '[%4ss] %-28s %-4s %s\n' "$(elapsed)" "$1" "$2" "$4"
}

# Seconds a step may take: its own cap cut to the time left; 0 when too little is left to start it.
budget() {
  local cap=$1 l
  l=$(left)
  [ "$l" -lt "$cap" ] && cap=$l
  [ "$cap" -lt "$MIN_STEP" ] && cap=0
  echo "$cap"
}

# run_step NAME CAP CMD...: run CMD (output to LOGS/NAME.log) with the budget's timeout and record the result.
# Returns CMD's status (124 on timeout, 125 when skipped for lack of time).
run_step() {
  local name=$1 cap=$2 t
  shift 2
  t=$(budget "$cap")
  if [ "$t" -eq 0 ]; then
    record "$name" skip 0 "no time left ($(left) s before the packing reserve of a ${DEADLINE} s deadline)"
    return 125
  fi
  local s0=$SECONDS
  timeout -k 5 "$t" bash "$SELF" --step "$@" >"$LOGS/$name.log" 2>&1
  local rc=$?
  local took=$((SECONDS - s0))
  if [ $rc -eq 0 ]; then
    record "$name" pass "$took" "$(step_note "$name")"
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    local why="timed out after ${t} s"
    [ "$t" -lt "$cap" ] && why="$why (its ${cap} s cap cut to the time left)"
    record "$name" fail "$took" "$why; log $name.log"
  else
    record "$name" fail "$took" "exit status $rc; log $name.log: $(last_error_line "$LOGS/$name.log")"
  fi
  return $rc
}

# A short note for a passing step: its log's verdict line if it has one.
step_note() { grep -h -m1 -E '^(verdict|throughput):' "$LOGS/$1.log" 2>/dev/null | cut -c1-160; }
last_error_line() { grep -v '^\s*$' "$1" 2>/dev/null | grep -iE 'error|fail|fatal|mismatch|differ|not ' | tail -n 1 | cut -c1-160; }

# ---- stand-ins for the GPU steps (MLM_VERIFY_STUB=1) --------------------------------------------------------

in_list() { case ",$1," in *",$2,"*) return 0 ;; esac; return 1; }
# stub NAME KIND [ARGS]: what a GPU step's command becomes without a GPU. KIND says which artifacts to fake:
# none; epochs DIR N ACC0 (valid lines as mlm and the reference write them); steps DIR N (train lines and a
# checkpoint file).
stub() {
  local name=$1 kind=$2
  shift 2
  if in_list "${MLM_VERIFY_STUB_HANG:-}" "$name"; then sleep "${MLM_VERIFY_STUB_HANG_S:-1000}"; fi
  if in_list "${MLM_VERIFY_STUB_UNSUPPORTED:-}" "$name"; then
    echo "========= Error: Device not supported (stand-in)"
    return 1
  fi
  if in_list "${MLM_VERIFY_STUB_FAIL:-}" "$name"; then
    echo "stand-in for $name: error: planted failure"
    return 1
  fi
  case $kind in
    epochs)
      mkdir -p "$1"
      awk -v n="$2" -v a="$3" 'BEGIN { for (e = 0; e < n; e++) {
        printf "{\"kind\":\"train\",\"step\":%d,\"epoch\":%d,\"loss\":2.5,\"accuracy\":0.3,\"tokens_per_s\":%d}\n", 491 * (e + 1), e, 900000 + e
        printf "{\"kind\":\"valid\",\"step\":%d,\"epoch\":%d,\"loss\":%.4f,\"accuracy\":%.4f}\n", 491 * (e + 1), e, 3.0 - 0.05 * e, a + 0.01 * e } }' \
        >>"$1/metrics.jsonl" ;;
    steps)
      mkdir -p "$1/checkpoints"
      awk -v n="$2" 'BEGIN { for (s = 1; s <= n; s++)
        printf "{\"kind\":\"train\",\"step\":%d,\"epoch\":0,\"loss\":%.9g,\"accuracy\":0.1,\"tokens_per_s\":%d}\n", s, 4.2 - 0.0001 * s, 1000000 + s }' \
        >>"$1/metrics.jsonl"
      # A one-tensor safetensors file (8-byte little-endian header length, JSON header, one float 1.0).
      local h='{"params":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
      printf "$(printf '\\x%02x' ${#h})\\x00\\x00\\x00\\x00\\x00\\x00\\x00%s\\x00\\x00\\x80\\x3f" "$h" \
        >"$1/checkpoints/ckpt-$(printf %08d "$2").safetensors" ;;
  esac
  echo "stand-in for $name: ok"
  return 0
}

# ---- the steps (each runs as `gpu_verify.sh --step FUNCTION ARGS` under its timeout) -----------------------

MLM="$BUILD/mlm"
REF_CONF=(--config "$ROOT/configs/shakespeare.conf" --data "$CORPUS" -q)  # mlm's reference configuration
REF_DIR="$RUNS/ref-20ep"
MLM_DIR="$RUNS/mlm-20ep"
AGREE_COMMON=(--steps 20 --set train.log_every=1 --set train.tf32=false --set train.samples=false
  --set train.ckpt_every=0)
RESUME_STEPS=3000  # ~3-10 s on the GPU: long enough to interrupt it mid-way
INT_AT=400

environment() {
  echo "== date"; date -u
  echo "== uname"; uname -a
  echo "== nvidia-smi"; nvidia-smi 2>&1 | head -40
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
  echo "== nvcc"; nvcc --version 2>&1 | tail -n 2
  echo "== python"
  "$PY" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())' 2>&1
  echo "== tools"; command -v compute-sanitizer ncu cmake gcc 2>&1
  echo "== cpus"; nproc
  echo "== carried build"; ls -la "$ROOT/build-gpu" 2>&1 | head -20
}

# Does the build in $1 come from these sources, hold the binaries, and do they load and run here?
build_usable() {
  local b=$1 f
  if [ -f "$b/SOURCE_STAMP" ] && [ "$(cat "$b/SOURCE_STAMP")" != "$(source_stamp)" ]; then
    echo "$b was built from other sources (SOURCE_STAMP differs)"
    return 1
  fi
  [ -f "$b/SOURCE_STAMP" ] || echo "note: $b has no SOURCE_STAMP; assuming it matches these sources"
  for f in mlm tests/test_gpu_model tests/test_gpu_ops tests/test_gpu_mask tests/test_gpu_sparse tests/test_gpu_bert \
           tests/test_gpu_bf16 tests/test_gpu_bf16_model tests/test_gpu_memory; do
    [ -x "$b/$f" ] || { echo "missing $b/$f"; return 1; }
    if ldd "$b/$f" 2>&1 | grep -q 'not found'; then
      echo "$b/$f: $(ldd "$b/$f" | grep 'not found' | tr -s ' \t' ' ' | tr '\n' ';')"
      return 1
    fi
  done
  "$b/mlm" --help >/dev/null 2>&1 || { echo "$b/mlm --help fails"; return 1; }
  echo "usable: $b"
}
build_fresh() {
  [ "$STUB" = 1 ] && { stub build none; return; }
  cmake -S "$ROOT" -B "$ROOT/build-gpu-local" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90 \
    -DMLM_WITH_BLAS=OFF -DMLM_MPI=OFF && cmake --build "$ROOT/build-gpu-local" -j"$JOBS" \
    --target mlm test_gpu_model test_gpu_ops test_gpu_mask test_gpu_sparse test_gpu_bert test_gpu_bf16 \
    test_gpu_bf16_model test_gpu_memory
}

reference_epochs() {
  [ "$STUB" = 1 ] && { stub ref-20ep epochs "$REF_DIR" "$EPOCHS" 0.30; return; }
  "$PY" "$ROOT/tools/reference/train_reference.py" --device cuda --epochs "$EPOCHS" --seed 0 --data "$CORPUS" \
    --log-every 491 --out "$REF_DIR"
}
agree_cpu() {
  [ "$STUB" = 1 ] && { stub agree-cpu steps "$RUNS/agree-cpu" 20; return; }
  "$MLM" train "${REF_CONF[@]}" --device cpu --out "$RUNS/agree-cpu" "${AGREE_COMMON[@]}" \
    --set train.threads=$((JOBS > 8 ? 8 : JOBS))
}
agree_gpu() {
  if [ "$STUB" = 1 ]; then
    stub agree-gpu steps "$RUNS/agree-gpu" 20 || return
  else
    "$MLM" train "${REF_CONF[@]}" --device cuda --out "$RUNS/agree-gpu" "${AGREE_COMMON[@]}" || return
  fi
  bg_wait agree-cpu "$(left)" || { echo "error: the CPU half is still running"; return 1; }
  "$PY" "$ROOT/tools/compare_runs.py" steps "$RUNS/agree-cpu/metrics.jsonl" "$RUNS/agree-gpu/metrics.jsonl" \
    --rel 1e-3 --steps 20
}

gpu_test() {  # gpu_test NAME [ARGS]: a GPU test binary run directly; a skip (77) counts as a failure here
  local t=$1
  shift
  [ "$STUB" = 1 ] && { stub "$t" none; return; }
  "$BUILD/tests/$t" "$@"
  local rc=$?
  [ $rc -eq 77 ] && echo "error: the GPU test SKIPPED (status 77): no usable GPU"
  return $rc
}

sanitize() {  # sanitize NAME TOOL TEST [ARGS]
  local name=$1 tool=$2 t=$3
  shift 3
  [ "$STUB" = 1 ] && { stub "$name" none; return; }
  command -v compute-sanitizer >/dev/null || { echo "compute-sanitizer not found (PATH, /usr/local/cuda/bin)"; return 3; }
  local opts=(--tool "$tool" --error-exitcode 1)
  [ "$tool" = memcheck ] && opts+=(--leak-check full)
  [ "$tool" = racecheck ] && opts+=(--racecheck-report all)
  compute-sanitizer "${opts[@]}" "$BUILD/tests/$t" "$@"
}

mlm_epochs() {
  [ "$STUB" = 1 ] && { stub mlm-20ep epochs "$MLM_DIR" "$EPOCHS" 0.305; return; }
  "$MLM" train "${REF_CONF[@]}" --device cuda --out "$MLM_DIR" --set train.epochs="$EPOCHS" \
    --set train.tf32=false --set train.samples=false --set train.log_every=491 --set train.ckpt_every=0 \
    --set train.keep_ckpts=1
}

oom_message() {
  local out rc
  if [ "$STUB" = 1 ]; then
    stub oom-message none || return
    out="CUDA out of memory: 1 bytes (0.0 MiB) requested for x, but the device has 0.0 MiB free of 0.0 MiB; shrink train.batch_size (stand-in)"
    rc=1
  else
    out=$("$MLM" train "${REF_CONF[@]}" --device cuda --steps 1 --out "$RUNS/oom" --set train.batch_size=1000000 2>&1)
    rc=$?
  fi
  echo "$out"
  echo "exit status $rc"
  [ $rc -eq 1 ] || { echo "error: expected exit status 1"; return 1; }
  echo "$out" | grep -qE 'CUDA out of memory: .* bytes .* free of .* train\.batch_size' ||
    { echo "error: the message lacks the sizes or the keys to shrink"; return 1; }
  echo "verdict: a clear out-of-memory message and exit status 1"
}

# Interrupt a GPU run with SIGINT once it has logged INT_AT steps, resume it, and compare it with a run that
# was never interrupted: per-step losses and the final checkpoint's tensors, bit for bit.
resume_identity() {
  local a="$RUNS/resume-straight" b="$RUNS/resume-interrupted"
  local common=(--device cuda --steps $RESUME_STEPS --set train.log_every=1 --set train.samples=false
    --set train.ckpt_every=0)
  if [ "$STUB" = 1 ]; then
    { stub resume-straight steps "$a" $RESUME_STEPS && stub resume-interrupted steps "$b" $RESUME_STEPS; } || return
  else
    "$MLM" train "${REF_CONF[@]}" "${common[@]}" --out "$a" || { echo "error: the straight run failed"; return 1; }
    "$MLM" train "${REF_CONF[@]}" "${common[@]}" --out "$b" &
    local pid=$! n=0
    while kill -0 $pid 2>/dev/null; do
      n=$(grep -c '"kind":"train"' "$b/metrics.jsonl" 2>/dev/null)
      [ "${n:-0}" -ge $INT_AT ] && break
      sleep 0.05
    done
    kill -INT $pid 2>/dev/null
    wait $pid
    local rc=$?
    echo "interrupted after about $n logged steps of $RESUME_STEPS; exit status $rc (130: checkpointed on SIGINT)"
    [ $rc -eq 130 ] || { echo "error: the run was not interrupted mid-way (exit status $rc)"; return 1; }
    "$MLM" train --resume "$b" -q || { echo "error: the resume failed"; return 1; }
  fi
  "$PY" "$ROOT/tools/compare_runs.py" identical "$a" "$b"
}

# ---- dp (issue 13): a one-rank NCCL run (train.nccl: the micro-batch into the device's gradient sum, NCCL's
# all-reduce over one rank, clip + Adam) against the plain GPU step (one captured graph): per-step losses and the
# final tensors, bit for bit (test_emu_dp checks the same on the CPU execution layer). Several GPUs
# (scaling, N ranks against one) are owed until a machine has them.
nccl_one_rank() {
  local a="$RUNS/nccl-plain" b="$RUNS/nccl-one-rank"
  local common=(--device cuda --steps 50 --set train.log_every=1 --set train.samples=false --set train.ckpt_every=0)
  if [ "$STUB" = 1 ]; then
    { stub nccl-plain steps "$a" 50 && stub nccl-one-rank steps "$b" 50; } || return
  else
    "$MLM" train "${REF_CONF[@]}" "${common[@]}" --out "$a" || { echo "error: the plain GPU run failed"; return 1; }
    "$MLM" train "${REF_CONF[@]}" "${common[@]}" --set train.nccl=true --out "$b" ||
      { echo "error: the one-rank NCCL run failed"; return 1; }
  fi
  "$PY" "$ROOT/tools/compare_runs.py" identical "$a" "$b"
}
# ---- end of the dp block

# ---- issues 11 and 20 on the GPU: a WordPiece shard set (a slice of the corpus, the BERT vocabulary from data/ beside
# the corpus), configs/bert-tiny.conf (model.arch = bert: BertForMaskedLM, its [PAD] keys masked, the tied decoder)
# with sparse prediction, whole-word masking and 2 micro-batches a step, 10 steps on the CPU and on the GPU (TF32
# off): per-step losses within 1e-3 relative, as agree-gpu-vs-cpu for the reference.
SUBWORD_STEPS=10
subword_gpu_vs_cpu() {
  local set="$RUNS/subword-set"
  if [ "$STUB" != 1 ]; then
    head -c 400000 "$CORPUS" >"$RUNS/subword.txt"
    wordpiece_set "$set" "$RUNS/subword.txt" || return
  fi
  bert_pair subword "$set" $SUBWORD_STEPS 1e-3 --set train.accum_steps=2 --set train.sparse_prediction=true \
    --set mask.whole_word=true --set train.tf32=false
}

# wordpiece_set DIR TEXT: TEXT prepared into DIR with BERT's uncased vocabulary (data/ beside the corpus).
wordpiece_set() {
  local vocab
  vocab="$(dirname "${CORPUS:-.}")/bert-base-uncased-vocab.txt"
  [ -f "$vocab" ] || { echo "no $vocab: copy ../shared/data/bert-base-uncased-vocab.txt into data/ with the corpus"; return 3; }
  "$MLM" prepare -q --tokenizer wordpiece --vocab "$vocab" --documents blank --out "$1" "$2" ||
    { echo "error: mlm prepare failed"; return 1; }
}
# A BERT-tiny run (configs/bert-tiny.conf: WordPiece, model.arch = bert) on the CPU and on the GPU, batch 16, and
# their per-step losses compared: bert_pair NAME SET STEPS REL SETTINGS...
bert_pair() {
  local name=$1 set=$2 steps=$3 rel=$4 a="$RUNS/$1-cpu" b="$RUNS/$1-gpu"
  shift 4
  if [ "$STUB" = 1 ]; then
    { stub "$name-cpu" steps "$a" "$steps" && stub "$name-gpu" steps "$b" "$steps"; } || return
  else
    local common=(--config "$ROOT/configs/bert-tiny.conf" --set data.path="$set" --steps "$steps" -q
      --set train.batch_size=16 --set train.log_every=1 --set train.samples=false --set train.ckpt_every=0 "$@")
    "$MLM" train "${common[@]}" --device cpu --set train.threads=$((JOBS > 8 ? 8 : JOBS)) --out "$a" ||
      { echo "error: the CPU run failed"; return 1; }
    "$MLM" train "${common[@]}" --device cuda --out "$b" || { echo "error: the GPU run failed"; return 1; }
  fi
  "$PY" "$ROOT/tools/compare_runs.py" steps "$a/metrics.jsonl" "$b/metrics.jsonl" --rel "$rel" --steps "$steps"
}

throughput_mlm() {  # throughput_mlm NAME BATCH PRECISION (fp32 | tf32 | bf16)
  local dir="$RUNS/$1"
  if [ "$STUB" = 1 ]; then
    stub "$1" steps "$dir" 300 || return
  else
    "$MLM" train "${REF_CONF[@]}" --device cuda --steps 300 --out "$dir" --set train.batch_size="$2" \
      --set train.precision="$3" --set train.log_every=50 --set train.samples=false --set train.ckpt_every=0 || return
  fi
  "$PY" "$ROOT/tools/compare_runs.py" throughput "$dir/metrics.jsonl" --tokens-per-step $(($2 * 32))
}
throughput_ref() {
  local dir="$RUNS/tput-reference"
  if [ "$STUB" = 1 ]; then
    stub tput-reference steps "$dir" 300 || return
  else
    "$PY" "$ROOT/tools/reference/train_reference.py" --device cuda --epochs 1 --max-steps 300 --no-valid \
      --seed 0 --data "$CORPUS" --log-every 50 --out "$dir" --quiet || return
  fi
  "$PY" "$ROOT/tools/compare_runs.py" throughput "$dir/metrics.jsonl" --tokens-per-step 2048
}

# ---- BF16 and long sequences (issue 23) ----
# The corpus three times over prepared with BERT's uncased vocabulary (once; the steps run one after another and
# reuse it): about 0.9 M tokens, so that 60 steps of 8,192 tokens stay inside the first epoch and no validation
# falls in a timed interval.
BERT_SET="$RUNS/bert-set"
BERT_STEPS=60
bert_set() {
  [ "$STUB" = 1 ] || [ -f "$BERT_SET/manifest.txt" ] && return 0
  cat "$CORPUS" "$CORPUS" "$CORPUS" >"$RUNS/bert-corpus.txt"
  wordpiece_set "$BERT_SET" "$RUNS/bert-corpus.txt"
}
# BF16: both backends round the same tensors to BF16 at the same points (the CPU's reference mode), so they differ
# only where their FP32 sums (cuBLAS's order against the CPU's) fall on either side of a BF16 rounding boundary:
# one BF16 ulp (2^-8 relative) on a small fraction of the elements. The tight comparison is test_gpu_bf16_model
# part (run above on this GPU); over 20 training steps the losses agree within 1e-2 relative.
bf16_gpu_vs_cpu() { bert_set && bert_pair bf16-gpu-vs-cpu "$BERT_SET" 20 1e-2 --set train.precision=bf16; }
# Long sequences: seq_len 512 through the tiled attention on both backends, FP32 (TF32 off), as the FP32
# agreement run above.
long_seq_gpu_vs_cpu() { bert_set && bert_pair long-seq-gpu-vs-cpu "$BERT_SET" 10 1e-3 --set data.seq_len=512 --set train.batch_size=4 \
  --set train.precision=fp32; }

throughput_bert() {  # throughput_bert NAME SEQ_LEN BATCH PRECISION: mlm, configs/bert-base.conf
  local dir="$RUNS/$1"
  if [ "$STUB" = 1 ]; then
    stub "$1" steps "$dir" "$BERT_STEPS" || return
  else
    bert_set || return
    "$MLM" train --config "$ROOT/configs/bert-base.conf" --set data.path="$BERT_SET" --device cuda -q \
      --steps "$BERT_STEPS" --out "$dir" --set data.seq_len="$2" --set train.batch_size="$3" \
      --set train.precision="$4" --set train.log_every=10 --set train.samples=false --set train.ckpt_every=0 \
      --set train.ckpt_minutes=0 || return
  fi
  "$PY" "$ROOT/tools/compare_runs.py" throughput "$dir/metrics.jsonl" --tokens-per-step $(($2 * $3))
}
throughput_torch_bert() {  # throughput_torch_bert NAME SEQ_LEN BATCH: BertForMaskedLM, autocast BF16, SDPA
  if [ "$STUB" = 1 ]; then
    stub "$1" none || return
    echo "throughput: $((500000 + $2)) tokens/s, 1.000 ms/step (stand-in)"
    return 0
  fi
  "$PY" "$ROOT/bench/torch_bert_gpu_bench.py" --device cuda --precision bf16 --seq-len "$2" --batch "$3" \
    --attention sdpa --warmup 5 --windows 5 --window 10
}

# ---- bench step (owner: bench/, issue 12) ----
# The benchmark suite in --quick form under what is left of its cap (bench/suite.py cuts every part to it);
# the counts come from BUILD/bench/bench_emu_step when the carried build has it. Its results file goes to
# OUTDIR as bench-<date>.json (for bench/results/).
BENCH_CAP=150
bench_suite() {
  local b
  b=$(budget $BENCH_CAP)
  b=$((b > 20 ? b - 10 : b))
  if [ "$STUB" = 1 ]; then
    stub bench-suite none || return
    "$PY" "$ROOT/bench/report.py" --check "$ROOT/tests/fixtures/bench/gpu-result-small.json" || return
    echo "throughput: bench suite stand-in (no GPU); the results schema checked on the fixture"
    return 0
  fi
  mkdir -p "$WORK/bench"
  "$PY" "$ROOT/bench/suite.py" --quick --mode gpu --build "$BUILD" --python "$PY" --budget "$b" \
    --results-dir "$WORK/bench" --readme '' --note "tools/gpu_verify.sh bench step, ${b} s budget"
  local rc=$? f
  f=$(ls -t "$WORK/bench"/bench-*.json 2>/dev/null | head -n1)
  [ -n "$f" ] && cp "$f" "$OUT/bench-$(date -u +%Y%m%d-%H%M%S).json"
  [ -n "$f" ] && echo "throughput: bench suite results in $(basename "$f")"
  return $rc
}
# ---- end of the bench step ----

# ncu: one pass for the durations of step 10's kernels, then the default sections of the five slowest.
ncu_top5() {
  [ "$STUB" = 1 ] && { stub ncu-top5 none; return; }
  command -v ncu >/dev/null || { echo "ncu not found"; return 3; }
  local run=(train "${REF_CONF[@]}" --device cuda --steps 11 --profile-steps 10:10 --set train.samples=false
    --set train.ckpt_every=0)
  ncu --profile-from-start off --clock-control none --metrics gpu__time_duration.sum --csv \
    --kernel-name-base function "$MLM" "${run[@]}" --out "$RUNS/ncu-1" >"$LOGS/ncu-times.csv" 2>&1
  local regex
  regex=$("$PY" - "$LOGS/ncu-times.csv" <<'PY'
import csv, re, sys
rows = [r for r in csv.reader(open(sys.argv[1], errors='replace')) if len(r) > 5]
head = next((r for r in rows if 'Kernel Name' in r and 'Metric Value' in r), None)
if not head:
    sys.exit(1)
k, v = head.index('Kernel Name'), head.index('Metric Value')
tot = {}
for r in rows[rows.index(head) + 1:]:
    try:
        tot[r[k]] = tot.get(r[k], 0.0) + float(r[v].replace(',', ''))
    except ValueError:
        pass
top = sorted(tot, key=tot.get, reverse=True)[:5]
for name in top:
    print(f'{tot[name]:12.0f} ns in step 10  {name}', file=sys.stderr)
print('regex:^(' + '|'.join(re.escape(n) for n in top) + ')$')
PY
  ) || { echo "error: could not read kernel times from ncu's CSV (ncu-times.csv)"; return 1; }
  echo "five slowest kernels of step 10: $regex"
  ncu --profile-from-start off --clock-control none --kernel-name-base function --kernel-name "$regex" \
    --print-summary per-kernel "$MLM" "${run[@]}" --out "$RUNS/ncu-2"
}

# bg_wait NAME SECONDS: wait up to SECONDS for the background step NAME; status 0 once it has ended.
bg_wait() {
  local pid
  pid=$(cat "$WORK/$1.pid" 2>/dev/null) || return 0
  local until=$(($(date +%s) + $2))
  while kill -0 "$pid" 2>/dev/null; do
    [ "$(date +%s)" -ge $until ] && return 1
    sleep 1
  done
  return 0
}

if [ "${1:-}" = --step ]; then
  shift
  "$@"
  exit $?
fi

# ---- main -----------------------------------------------------------------------------------------------

BG_PIDS=()
trap 'for p in "${BG_PIDS[@]}"; do kill "$p" 2>/dev/null; done; rm -rf "$WORK"' EXIT
# bg_step NAME CAP FUNCTION ARGS: run_step in the background (its PID in WORK/NAME.pid).
bg_step() {
  local name=$1
  run_step "$@" &
  BG_PIDS+=($!)
  echo $! >"$WORK/$name.pid"
}
# override NAME STATUS DETAIL: a later verdict for a step that already ran (the summary keeps the last).
override() { record "$1" "$2" 0 "$3"; }

# 0. Environment, corpus and build.
for c in "$ROOT/data/tinyshakespeare.txt" "$ROOT/../shared/data/tinyshakespeare.txt"; do
  [ -f "$c" ] && { CORPUS="$c"; break; }
done
export CORPUS
REF_CONF=(--config "$ROOT/configs/shakespeare.conf" --data "$CORPUS" -q)
fact corpus "${CORPUS:-missing: put tinyshakespeare.txt in data/}"
fact deadline_s "$DEADLINE"
fact epochs "$EPOCHS"
fact started "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
fact commit "$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
environment >"$LOGS/environment.log" 2>&1
if [ "$STUB" = 1 ]; then
  fact device "stand-in (MLM_VERIFY_STUB=1: no GPU step ran)"
else
  fact device "$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1)"
  fact driver "$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n1)"
  fact cuda_driver_api "$(nvidia-smi 2>/dev/null | grep -o 'CUDA Version: [0-9.]*' | head -n1)"
  fact nvcc "$(nvcc --version 2>/dev/null | grep -o 'release [0-9.]*' | head -n1)"
  fact torch "$("$PY" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)' 2>/dev/null)"
fi
if [ "$STUB" = 1 ]; then
  run_step build 30 build_fresh
  fact build "stand-in"
elif build_usable "$BUILD" >"$LOGS/build-check.log" 2>&1; then
  record build pass 0 "the carried build-gpu/ loads and runs"
  fact build "carried build-gpu/"
else
  echo "the carried build-gpu/ is not usable ($(tr '\n' ' ' <"$LOGS/build-check.log")); building build-gpu-local/"
  run_step build 240 build_fresh && export BUILD="$ROOT/build-gpu-local"
  fact build "fresh build-gpu-local/ (carried: $(tr '\n' ' ' <"$LOGS/build-check.log" | cut -c1-160))"
fi
MLM="$BUILD/mlm"

# 1. In the background from the start: the reference's epochs (until the deadline at most) and the CPU half.
bg_step ref-20ep "$DEADLINE" reference_epochs
bg_step agree-cpu 150 agree_cpu

# 2. The GPU tests, each once; a failing one again with CUDA_LAUNCH_BLOCKING=1 so the log names the kernel.
# test_gpu_bf16 (BF16 kernels, cuBLASLt), test_gpu_bf16_model (the BF16 step against the CPU bf16 mode) and
# test_gpu_memory (the --dry-run plan against the allocations, bert-base T 512 batch 256 BF16 within 80 GB).
for t in test_gpu_mask:60 test_gpu_ops:150 test_gpu_model:200 test_gpu_sparse:60 test_gpu_bert:60 test_gpu_bf16:60 \
         test_gpu_bf16_model:60 test_gpu_memory:60; do
  name=${t%%:*}
  run_step "$name" "${t##*:}" gpu_test "$name"
  rc=$?
  if [ $rc -ne 0 ] && [ $rc -ne 125 ]; then
    CUDA_LAUNCH_BLOCKING=1 run_step "$name-blocking" 120 gpu_test "$name"
  fi
done

# 3. compute-sanitizer, the four at once; an unsupported device or a missing tool is a skip.
SAN=(memcheck-model memcheck-mask racecheck-model racecheck-mask)
run_step memcheck-model 150 sanitize memcheck-model memcheck test_gpu_model --quick &
p1=$!
run_step memcheck-mask 150 sanitize memcheck-mask memcheck test_gpu_mask &
p2=$!
run_step racecheck-model 150 sanitize racecheck-model racecheck test_gpu_model --quick &
p3=$!
run_step racecheck-mask 150 sanitize racecheck-mask racecheck test_gpu_mask &
p4=$!
wait $p1 $p2 $p3 $p4
for n in "${SAN[@]}"; do
  [ "$(awk -F'\t' -v n="$n" '$1 == n { st = $2 } END { print st }' "$RESULTS")" = fail ] || continue
  if grep -qiE 'device not supported|not supported on this (device|platform)' "$LOGS/$n.log" 2>/dev/null; then
    override "$n" skip "compute-sanitizer: $(grep -m1 -iE 'not supported' "$LOGS/$n.log" | tr -s ' ' | cut -c1-100) (the machine, not the project)"
  elif grep -q '^compute-sanitizer not found' "$LOGS/$n.log" 2>/dev/null; then
    override "$n" skip "compute-sanitizer is not installed on this machine"
  fi
done

# 4. The epochs on the GPU (TF32 off), the agreement run, the out-of-memory message, interrupt and resume.
run_step mlm-20ep 300 mlm_epochs
run_step agree-gpu-vs-cpu 120 agree_gpu
run_step oom-message 60 oom_message
run_step resume-bit-identical 120 resume_identity
run_step nccl-one-rank 90 nccl_one_rank  # dp (issue 13)
run_step subword-gpu-vs-cpu 120 subword_gpu_vs_cpu  # issue 11: WordPiece, sparse, whole words, accumulation
run_step bf16-gpu-vs-cpu 120 bf16_gpu_vs_cpu  # issue 23: BF16 against the CPU's BF16 reference mode
run_step long-seq-gpu-vs-cpu 120 long_seq_gpu_vs_cpu  # issue 23: seq_len 512, tiled attention

# 5. Throughput with nothing else running: wait for the reference, keeping 250 s for the nine runs.
THROUGHPUT_NEED=250
wait_s=$(($(left) - THROUGHPUT_NEED))
[ $wait_s -lt 0 ] && wait_s=0
if ! bg_wait ref-20ep $wait_s; then
  fact throughput_contended "yes: the reference's epochs were still running during the throughput runs"
fi
run_step tput-mlm-b64-tf32 60 throughput_mlm tput-mlm-b64-tf32 64 tf32
run_step tput-mlm-b64-fp32 60 throughput_mlm tput-mlm-b64-fp32 64 fp32
run_step tput-mlm-b64-bf16 60 throughput_mlm tput-mlm-b64-bf16 64 bf16
run_step tput-mlm-b512-tf32 60 throughput_mlm tput-mlm-b512-tf32 512 tf32
run_step tput-reference 60 throughput_ref
# issue 23: bert-base, 8,192 tokens a step at either length; PyTorch at the same batch with autocast and SDPA.
run_step tput-bert-t128-bf16 60 throughput_bert tput-bert-t128-bf16 128 64 bf16
run_step tput-torch-bert-t128-bf16 60 throughput_torch_bert tput-torch-bert-t128-bf16 128 64
run_step tput-bert-t128-tf32 60 throughput_bert tput-bert-t128-tf32 128 64 tf32
run_step tput-bert-t512-bf16 60 throughput_bert tput-bert-t512-bf16 512 16 bf16
run_step tput-torch-bert-t512-bf16 60 throughput_torch_bert tput-torch-bert-t512-bf16 512 16
run_step bench-suite $BENCH_CAP bench_suite  # the bench step (bench/, issue 12)
if [ "$(left)" -ge 60 ]; then
  run_step ncu-top5 150 ncu_top5
  grep -q '^ncu not found' "$LOGS/ncu-top5.log" 2>/dev/null && override ncu-top5 skip "ncu is not installed on this machine"
else
  record ncu-top5 skip 0 "optional; $(left) s left (it needs 60)"
fi

# 6. Summary, results JSON, logs. The background steps end by their own timeouts (the deadline at most).
wait
fact finished "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
fact elapsed_s "$(elapsed)"
[ -f "$MLM_DIR/metrics.jsonl" ] && cp "$MLM_DIR/metrics.jsonl" "$OUT/mlm-20ep.jsonl"
[ -f "$REF_DIR/metrics.jsonl" ] && cp "$REF_DIR/metrics.jsonl" "$OUT/ref-20ep.jsonl"
"$PY" "$ROOT/tools/compare_runs.py" epochs "$MLM_DIR/metrics.jsonl" "$REF_DIR/metrics.jsonl" >"$LOGS/compare-20ep.log" 2>&1
echo "exit status $?" >>"$LOGS/compare-20ep.log"
for r in "$RUNS"/*/metrics.jsonl; do  # every run's metrics go into the logs (no checkpoints)
  [ -f "$r" ] && cp "$r" "$LOGS/metrics-$(basename "$(dirname "$r")").jsonl"
done
"$PY" "$ROOT/tools/gpu_summary.py" "$LOGS" "$OUT" >"$LOGS/gpu_summary.log" 2>&1 || {
  # Without the summary writer: the raw results, so that nothing is lost.
  { echo "gpu_verify.sh: gpu_summary.py failed (see its log); the raw results follow"; cat "$LOGS/gpu_summary.log" "$RESULTS" "$FACTS" "$LOGS/compare-20ep.log"; } >"$OUT/summary.txt"
}
find "$LOGS" -type f -size +4M -delete  # ncu or a runaway log: the tarball must stay small
tar -czf "$OUT/logs.tar.gz" -C "$WORK" logs
n=$(find "$OUT" -mindepth 1 | wc -l)
[ "$n" -gt 8 ] && echo "warning: $OUT holds $n entries; only 8 files come back from the GPU machine"
cat "$OUT/summary.txt"
echo "gpu_verify.sh: $(elapsed) s of a ${DEADLINE} s deadline; results in $OUT"
# Everything is written by now; the exit status says whether any step failed (its last record counts).
failed=$(awk -F'\t' '{ st[$1] = $2 } END { n = 0; for (k in st) if (st[k] == "fail") n++; print n }' "$RESULTS")
[ "$failed" -eq 0 ] || { echo "gpu_verify.sh: $failed step(s) failed (summary.txt)"; exit 1; }
exit 0
