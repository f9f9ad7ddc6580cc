#!/usr/bin/env bash
# tools/plant_bugs.sh: proof that the emu tests (the CUDA sources run on the CPU layer, tests/emu) catch what
# matters. Plants realistic bugs in a copy of src/kernels, one at a time, rebuilds the emu tests against the
# copy (MLM_EMU_KERNEL_DIR) and runs them (ctest -L emu); a bug is caught when a test fails. Prints each
# bug, the first report that caught it, and caught/planted. The checkout itself is never modified.
#
#   bash tools/plant_bugs.sh [BUG_NUMBER...]      # default: all; MLM_PLANT_DIR (default build-plant) holds
#                                                 # the patched copy and its build (reused between runs)
#   bash tools/plant_bugs.sh --check              # only: does every bug's text still occur exactly once in
#                                                 # src/kernels? (seconds; test_plant_bugs_patterns in CTest)
# Release build, so the layer's own checks do the catching (ASan would add out-of-bounds reports on top).
# The first run compiles the project once (nvcc for mlm_cuda, a dependency of mlm_core); each bug then
# rebuilds one kernel object and relinks. About a minute per bug on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
work="${MLM_PLANT_DIR:-$root/build-plant}"
kdir="$work/kernels"
build="$work/build"
jobs="$(nproc 2>/dev/null || echo 2)"
mkdir -p "$work"

# The bugs: number, name, then (file, exact text, replacement) triples; python applies them to the copy.
bugs_py='
import sys
BUGS = [
 ("dropped __syncthreads (column sums)", [("feedforward.cu",
   " s += x[(size_t)r * C + c];\n    part[threadIdx.y][threadIdx.x] = s;\n    __syncthreads();\n",
   " s += x[(size_t)r * C + c];\n    part[threadIdx.y][threadIdx.x] = s;\n")]),
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
 ("wrong tile bound (tiled attention: key j <= T counts a key past the sequence)", [("attention.cu",
   "    return j < T && (!key_valid || key_valid[j]);", "    return j <= T && (!key_valid || key_valid[j]);")]),
 ("missing rescale of the running sum (tiled attention forward)", [("attention.cu",
   "l[a] = __fadd_rn(__fmul_rn(l[a], corr), row_sum(sum));", "l[a] = __fadd_rn(l[a], row_sum(sum));")]),
 ("dropout counter off by one (tiled attention)", [("attention.cu",
   "uint64_t g0 = rng->base + ((uint64_t)bh * T + i) * T + j0;",
   "uint64_t g0 = rng->base + ((uint64_t)bh * T + i) * T + j0 + 1;")]),
]
if sys.argv[1] == "count":
    print(len(BUGS)); sys.exit(0)
if sys.argv[1] == "check":  # the text of every edit must occur exactly once in the real sources, or the bug plants nothing
    bad = 0
    for k, (name, edits) in enumerate(BUGS, 1):
        for f, old, new in edits:
            n = open(sys.argv[2] + "/" + f).read().count(old)
            if n != 1:
                print("plant_bugs: bug %d (%s): its text occurs %d times in %s; update the bug to the source" % (k, name, n, f))
                bad += 1
    print("plant_bugs: %d bugs, %s" % (len(BUGS), "every text found once" if bad == 0 else "%d texts to update" % bad))
    sys.exit(1 if bad else 0)
k = int(sys.argv[1]); name, edits = BUGS[k - 1]
if sys.argv[2] == "name":
    print(name); sys.exit(0)
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

build_tests() {
  # Every executable ctest -L emu runs (test_emu_bert since model.arch = bert, test_emu_dp and its mlm_emu where MPI
  # is found: a test without its executable is Not Run, and the baseline fails).
  local dp=()
  if cmake --build "$build" --target help 2>/dev/null | grep 'test_emu_dp' >/dev/null; then dp=(test_emu_dp mlm_emu); fi
  nice -n 10 cmake --build "$build" -j"$jobs" --target test_emu_mask test_emu_ops test_emu_model test_emu_sparse \
    test_emu_layer test_emu_bert "${dp[@]}" >"$work/build.log" 2>&1
}

# ctest -L emu, stopping at the first failure; prints the failing test and the first line saying why. test_emu_dp
# (the data-parallel exchange over the same kernels as test_emu_model, under mpirun) is left out: it is not built here.
run_tests() {
  if (cd "$build" && ctest -L emu -E test_emu_dp -j"$jobs" --stop-on-failure --timeout 300 >"$work/ctest.log" 2>&1); then
    return 0
  fi
  local failed why
  failed="$(grep -E '\*\*\*|Failed|Timeout|Exception' "$work/ctest.log" | grep -oE 'test_emu_[a-z_]+' | head -1)"
  # The first report in that test's own section of the log (other tests print expected reports too).
  why="$(awk -v f="$failed" '$0 ~ ("Testing: " f "$") { on = 1; next } /Testing: test_/ { on = 0 } on' \
    "$build/Testing/Temporary/LastTest.log" 2>/dev/null |
    grep -m1 -oE '(emu: error|[^ ]*CHECK\(|mlm: error|ERROR: AddressSanitizer|runtime error).*' | cut -c1-240)"
  echo "   caught by ${failed:-?}: ${why:-see $build/Testing/Temporary/LastTest.log}"
  return 1
}

echo "== baseline: the unmodified kernels must pass"
fresh_copy
cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release -DMLM_EMU_KERNEL_DIR="$kdir" >/dev/null
build_tests || { echo "build of the unmodified sources failed: $work/build.log"; exit 1; }
if ! run_tests; then echo "the emu tests fail without a planted bug; fix that first"; exit 1; fi

caught=0
planted=0
missed=()
for k in "${selected[@]}"; do
  name="$(python3 -c "$bugs_py" "$k" name)"
  echo "== bug $k: $name"
  fresh_copy
  python3 -c "$bugs_py" "$k" "$kdir"
  planted=$((planted + 1))
  t0=$(date +%s)
  if ! build_tests; then
    echo "   caught at build time ($(grep -m1 'error' "$work/build.log" | cut -c1-200))"
    caught=$((caught + 1))
  elif run_tests; then
    echo "   MISSED: every emu test passed"
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
