#!/usr/bin/env bash
# tools/plant_bugs.sh: proof that the emu tests (the CUDA sources run on the CPU layer, tests/emu) catch what
# matters. Plants realistic bugs in a copy of src/kernels, one at a time, rebuilds the emu tests against the
# copy (MLM_EMU_KERNEL_DIR) and runs them; a bug is caught when a test fails. Prints each bug, the first report
# that caught it, and caught/planted. The checkout itself is never modified.
#
#   bash tools/plant_bugs.sh [BUG_NUMBER...]      # default: all; MLM_PLANT_DIR (default build-plant) holds
#                                                 # the patched copy and its builds (reused between runs)
#   bash tools/plant_bugs.sh --check              # only: does every bug's text still occur exactly once in
#                                                 # src/kernels? (seconds; test_plant_bugs_patterns in CTest)
# Each bug names the build that must catch it (its baseline, the unmodified kernels, must pass there first):
#   release  the Release build, ctest -L emu (the layer's own checks do the catching; ASan would add
#            out-of-bounds reports on top). The first run compiles the project once (nvcc for mlm_cuda, a
#            dependency of mlm_core); each bug then rebuilds one kernel object and relinks. About a minute a bug.
#   launch   the same build, test_launch_resources alone (ptxas's report and the launches at the presets' shapes)
#   tsan     blocks in parallel under ThreadSanitizer (MLM_EMU_TSAN, CPU-only), ctest -L emu: inter-block races
#   fma      the kernels compiled with contraction (MLM_EMU_FP_CONTRACT, CPU-only), ctest -L emu: roundings
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
work="${MLM_PLANT_DIR:-$root/build-plant}"
kdir="$work/kernels"
build="$work/build"
jobs="$(nproc 2>/dev/null || echo 2)"
mkdir -p "$work"

# The bugs: number, name, the build that catches it (default release), then (file, exact text, replacement)
# triples; python applies them to the copy.
bugs_py='
import sys
BUGS = [
 ("dropped __syncthreads (column sums)", [("feedforward.cu",
   " s += ld(x, (size_t)r * C + c);\n    part[threadIdx.y][threadIdx.x] = s;\n    __syncthreads();\n",
   " s += ld(x, (size_t)r * C + c);\n    part[threadIdx.y][threadIdx.x] = s;\n")]),
 ("off-by-one bound (masking kernel, i > n)", [("mask.cu", "    if (i >= n) return;", "    if (i > n) return;")]),
 ("wrong transpose (a Linear input gradient dout W^T instead of dout W)", [("cuda_model.cu",
   "sgemm(m, CUBLAS_OP_N, CUBLAS_OP_N, IC, rows, OC, w, 0, IC, dout, (size_t)r0 * OC, OC, beta, dinp,",
   "sgemm(m, CUBLAS_OP_T, CUBLAS_OP_N, IC, rows, OC, w, 0, IC, dout, (size_t)r0 * OC, OC, beta, dinp,")]),
 ("wrong leading dimension (a Linear input gradient, ldc OC instead of IC)", [("cuda_model.cu",
   "OC, beta, dinp,\n              (size_t)r0 * IC, IC);",
   "OC, beta, dinp,\n              (size_t)r0 * IC, OC);")]),
 ("wrong row stride (tiled attention reads q rows C apart instead of 3C)", [("attention.cu",
   "load_rows<HS, TILE>(qs, seq, 3 * (size_t)C, bias ? bias + (size_t)h * hs : NULL, i0, T, hs);",
   "load_rows<HS, TILE>(qs, seq, (size_t)C, bias ? bias + (size_t)h * hs : NULL, i0, T, hs);")]),
 ("full-mask shuffle in a partial warp (cross-entropy block of V threads)", [("loss.cu",
   "    int threads = ((V + 31) / 32) * 32;", "    int threads = V;")]),
 ("shared-memory race (block_argmax reads the result before warp 0 wrote it)", [("loss.cu",
   "    __syncthreads();\n    val = sval[0];", "    val = sval[0];")]),
 ("missing stream synchronisation before the host reads the step scalars", [("cuda_model.cu",
   "                               m->stream));\n    CUDA_CHECK(cudaStreamSynchronize(m->stream));\n    sparse_check_count(",
   "                               m->stream));\n    sparse_check_count(")]),
 ("wrong Philox offset (in blocks of 4 instead of values)", [("philox.cuh",
   "    return s->rng_base + offset_in_step + s->rng_row0 * row_len;",
   "    return (s->rng_base + offset_in_step + s->rng_row0 * row_len) / 4;")]),
 ("read of a buffer before its upload (tokens copied after the mask kernel)", [("mask.cu",
   "    CUDA_CHECK(cudaMemcpy(d_tokens, tokens, n * sizeof(int), cudaMemcpyHostToDevice));\n", ""),
  ("mask.cu", "    cuda_mask_philox(c, d_cont, d_tokens, n, d_step, 0, d_inputs, d_labels, 0);\n",
   "    cuda_mask_philox(c, d_cont, d_tokens, n, d_step, 0, d_inputs, d_labels, 0);\n"
   "    CUDA_CHECK(cudaMemcpy(d_tokens, tokens, n * sizeof(int), cudaMemcpyHostToDevice));\n")]),
 ("kernel reads one element past an allocation (column sums, k <= chunks)", [("feedforward.cu",
   "    for (int k = 0; k < chunks; k++) t += partial[(size_t)k * C + c];",
   "    for (int k = 0; k <= chunks; k++) t += partial[(size_t)k * C + c];")]),
 ("launch with too few blocks (elementwise grid rounds down)", [("feedforward.cu",
   "    size_t g = (n + EW_BLOCK - 1) / EW_BLOCK;", "    size_t g = n / EW_BLOCK;")]),
 ("dropped __syncthreads (LayerNorm weight-gradient partials)", [("layernorm.cu",
   "    __syncthreads();\n    for (int c = threadIdx.x; c < C; c += blockDim.x) {\n        float tw = lnf_part[c]",
   "    for (int c = threadIdx.x; c < C; c += blockDim.x) {\n        float tw = lnf_part[c]")]),
 ("softmax scale applied twice in the backward (tiled attention, dS)", [("attention.cu",
   "dss[row * LDT + col] = __fmul_rn(__fmul_rn(p, __fsub_rn(g, d_i)), scale);",
   "dss[row * LDT + col] = __fmul_rn(__fmul_rn(p, __fsub_rn(g, d_i)), scale * scale);")]),
 ("grad-norm block counter not reset (a replayed step never finishes its norm)", [("optim.cu",
   "            *ticket = 0;  // ready for the next launch (and the next replay of a captured step)\n", "")]),
 ("dropped __syncthreads (tiled attention backward, dS and dropout(P) before the products that read them)",
  [("attention.cu", "            __syncthreads();  // ps and dss complete: the products below read them by column, across warps\n",
    "")]),
 ("no __threadfence before the grad-norm ticket (the last block may read partials not yet visible)", "tsan",
  [("optim.cu", "        __threadfence();  // the partial is visible device-wide before the ticket counts this block\n", "")]),
 ("grad-norm counter reset by block 0 as it starts instead of by the last block when done", "tsan",
  [("optim.cu", "            *ticket = 0;  // ready for the next launch (and the next replay of a captured step)\n", ""),
   ("optim.cu", "    s = block_sum(s, shared);\n    unsigned int *ticket = (unsigned int *)(partial + gridDim.x);\n",
    "    s = block_sum(s, shared);\n    unsigned int *ticket = (unsigned int *)(partial + gridDim.x);\n"
    "    if (blockIdx.x == 0 && threadIdx.x == 0) *ticket = 0;\n")]),
 ("__launch_bounds__ that caps the grad-norm kernel at 32 registers (it spills)", "launch",
  [("optim.cu", "static __global__ void grad_norm_kernel(", "static __global__ void __launch_bounds__(256, 8) grad_norm_kernel(")]),
 ("fused LayerNorm backward: the shared-memory bound forgets its factor 3 (72 KiB at C 768)", "launch",
  [("layernorm.cu", "enum { LNF_MAX_C = (48 * 1024) / (3 * LNB_TY * (int)sizeof(float)) };",
    "enum { LNF_MAX_C = (48 * 1024) / (LNB_TY * (int)sizeof(float)) };")]),
 ("embedding forward without its explicit roundings (nvcc fuses tok_emb * scale + pe into an FMA)", "fma",
  [("embedding.cu", "__fadd_rn(__fmul_rn(ld(tok_emb, (size_t)tokens[n] * C + c), scale), pe[(size_t)t * C + c])",
    "ld(tok_emb, (size_t)tokens[n] * C + c) * scale + pe[(size_t)t * C + c]")]),
 ("wrong tile bound (tiled attention: key j <= T counts a key past the sequence)", [("attention.cu",
   "    return j < T && (!key_valid || key_valid[j]);", "    return j <= T && (!key_valid || key_valid[j]);")]),
 ("missing rescale of the running sum (tiled attention forward)", [("attention.cu",
   "l[a] = __fadd_rn(__fmul_rn(l[a], corr), row_sum(sum));", "l[a] = __fadd_rn(l[a], row_sum(sum));")]),
 ("dropout counter off by one (tiled attention)", [("attention.cu",
   "uint64_t g0 = rng->base + ((uint64_t)bh * T + i) * T + j0;",
   "uint64_t g0 = rng->base + ((uint64_t)bh * T + i) * T + j0 + 1;")]),
 ("BF16 copy from one Philox word (the Adam update rounds every element of a block with x[0])", [("optim.cu",
   "copy[i] = bf16_stochastic_bits(updated, x[g % 4]);", "copy[i] = bf16_stochastic_bits(updated, x[0]);")]),
 ("BF16 attention backward rounds a third of dqkv (BT C instead of BT 3C)", [("cuda_model.cu",
   "cuda_bf16_round((uint16_t *)a->dqkv, a->dqkv32, BT * 3 * C, m->stream);",
   "cuda_bf16_round((uint16_t *)a->dqkv, a->dqkv32, BT * C, m->stream);")]),
 ("BF16 store that goes on from the unrounded value (act.cuh st)", [("act.cuh",
   "    p[i] = b;\n    return __bfloat162float(b);", "    p[i] = b;\n    return v;")]),
 ("dropout keep bits packed most significant first (the Philox keep kernel, bit 31 - j)", [("mask.cu",
   "word |= (KeepWord)!(philox_to_uniform(x[k]) < p) << (g - g0);",
   "word |= (KeepWord)!(philox_to_uniform(x[k]) < p) << (KEEP_WORD_BITS - 1 - (g - g0));")]),
 ("the attention-residual keep mask of a layer at its old byte offset (rows * C words) in the backward", [("cuda_model.cu",
   "y.keep_res1 = a->keep_res1 + l * keep_words(maxBT * C),",
   "y.keep_res1 = a->keep_res1 + rows * C,")]),
]
# A bug without a build name is caught by the Release build.
BUGS = [b if len(b) == 3 else (b[0], "release", b[1]) for b in BUGS]
if sys.argv[1] == "count":
    print(len(BUGS)); sys.exit(0)
if sys.argv[1] == "check":  # the text of every edit must occur exactly once in the real sources, or the bug plants nothing
    bad = 0
    for k, (name, where, edits) in enumerate(BUGS, 1):
        for f, old, new in edits:
            n = open(sys.argv[2] + "/" + f).read().count(old)
            if n != 1:
                print("plant_bugs: bug %d (%s): its text occurs %d times in %s; update the bug to the source" % (k, name, n, f))
                bad += 1
    print("plant_bugs: %d bugs, %s" % (len(BUGS), "every text found once" if bad == 0 else "%d texts to update" % bad))
    sys.exit(1 if bad else 0)
k = int(sys.argv[1]); name, where, edits = BUGS[k - 1]
if sys.argv[2] == "name":
    print(name); sys.exit(0)
if sys.argv[2] == "where":
    print(where); sys.exit(0)
kdir = sys.argv[2]
for f, old, new in edits:
    p = kdir + "/" + f
    s = open(p).read()
    if s.count(old) != 1:
        sys.exit("plant_bugs: bug %d (%s): the text to replace occurs %d times in %s; update the bug to the source" % (k, name, s.count(old), f))
    open(p, "w").write(s.replace(old, new))
'
if [ "${1:-}" = "--check" ]; then exec python3 -c "$bugs_py" check "$root/src/kernels"; fi
n_bugs="$(python3 -c "$bugs_py" count)"
selected=("$@")
if [ ${#selected[@]} -eq 0 ]; then selected=($(seq 1 "$n_bugs")); fi

fresh_copy() {
  rm -rf "$kdir"
  cp -r "$root/src/kernels" "$kdir"
}

# The build each kind of bug runs in: its directory, configure options, targets and ctest arguments.
build_dir() { case "$1" in release|launch) echo "$work/build" ;; *) echo "$work/build-$1" ;; esac; }
configure() {
  local dir; dir="$(build_dir "$1")"
  case "$1" in
    release|launch) cmake -S "$root" -B "$dir" -DCMAKE_BUILD_TYPE=Release -DMLM_EMU_KERNEL_DIR="$kdir" ;;
    tsan) cmake -S "$root" -B "$dir" -DCMAKE_BUILD_TYPE=Release -DMLM_CUDA=OFF -DMLM_EMU_TSAN=ON -DMLM_EMU_KERNEL_DIR="$kdir" ;;
    fma) cmake -S "$root" -B "$dir" -DCMAKE_BUILD_TYPE=Release -DMLM_CUDA=OFF -DMLM_EMU_FP_CONTRACT=ON -DMLM_EMU_KERNEL_DIR="$kdir" ;;
  esac >/dev/null
}
build_tests() {
  local targets=(emu_tests)  # every emu test (test_launch_resources among them where it is built)
  case "$1" in launch) targets=(test_launch_resources) ;; esac
  nice -n 10 cmake --build "$(build_dir "$1")" -j"$jobs" --target "${targets[@]}" >"$work/build.log" 2>&1
}

# ctest -L emu (launch: test_launch_resources alone), stopping at the first failure; prints the failing test
# and the first line saying why. test_emu_dp (the data-parallel exchange over the same kernels as test_emu_model,
# under mpirun) is left out: it is not built here.
run_tests() {
  local build filter=(-L emu -E test_emu_dp)
  build="$(build_dir "$1")"
  if [ "$1" = launch ]; then filter=(-R '^test_launch_resources$'); fi
  if (cd "$build" && ctest "${filter[@]}" -j"$jobs" --stop-on-failure --timeout 600 >"$work/ctest.log" 2>&1); then
    return 0
  fi
  local failed why
  failed="$(grep -E '\*\*\*|Failed|Timeout|Exception' "$work/ctest.log" | grep -oE 'test_(emu|launch)_[a-z0-9_]+' | head -1)"
  # The first report in that test's own section of the log (other tests print expected reports too).
  why="$(awk -v f="$failed" '$0 ~ ("Testing: " f "$") { on = 1; next } /Testing: test_/ { on = 0 } on' \
    "$build/Testing/Temporary/LastTest.log" 2>/dev/null |
    grep -m1 -oE '(emu: error|[^ ]*CHECK\(|mlm: error|ERROR: AddressSanitizer|WARNING: ThreadSanitizer|runtime error).*' | cut -c1-240)"
  if [[ "$why" == *ThreadSanitizer* ]]; then  # and where: the kernel lines of the two accesses
    why="${why%% (pid*}: $(awk -v f="$failed" '$0 ~ ("Testing: " f "$") { on = 1; next } /Testing: test_/ { on = 0 } on' \
      "$build/Testing/Temporary/LastTest.log" | grep -oE '[A-Za-z0-9_]+\.cu:[0-9]+' | head -2 | paste -sd' ' |
      sed 's/ / races with /')"
  fi
  echo "   caught by ${failed:-?}: ${why:-see $build/Testing/Temporary/LastTest.log}"
  return 1
}

# The unmodified kernels must pass in every build a selected bug needs (once per build, before its first bug).
declare -A ready=()
baseline() {
  [ -n "${ready[$1]:-}" ] && return 0
  echo "== baseline ($1 build): the unmodified kernels must pass"
  fresh_copy
  configure "$1"
  build_tests "$1" || { echo "build of the unmodified sources failed: $work/build.log"; exit 1; }
  if ! run_tests "$1"; then echo "the emu tests fail without a planted bug; fix that first"; exit 1; fi
  ready[$1]=1
}

caught=0
planted=0
missed=()
for k in "${selected[@]}"; do
  name="$(python3 -c "$bugs_py" "$k" name)"
  where="$(python3 -c "$bugs_py" "$k" where)"
  baseline "$where"
  echo "== bug $k ($where build): $name"
  fresh_copy
  python3 -c "$bugs_py" "$k" "$kdir"
  planted=$((planted + 1))
  t0=$(date +%s)
  if ! build_tests "$where"; then
    echo "   caught at build time ($(grep -m1 'error' "$work/build.log" | cut -c1-200))"
    caught=$((caught + 1))
  elif run_tests "$where"; then
    echo "   MISSED: every test passed"
    missed+=("$k: $name")
  else
    caught=$((caught + 1))
  fi
  echo "   ($(( $(date +%s) - t0 )) s)"
done
fresh_copy  # leave the copy unmodified
echo "caught/planted: $caught/$planted"
for m in "${missed[@]}"; do echo "missed: $m"; done
[ "$caught" -eq "$planted" ]
