#!/usr/bin/env bash
# test_blas_select.sh: CMake's BLAS selection refuses a reference BLAS (issue 18). Configures the project in
# temporary directories (CUDA, MPI and tests off: a few seconds each) against libraries named explicitly and
# checks what CMake says and what the link line of mlm holds:
#   1. a reference CBLAS built here (cblas_sgemm alone, no vendor function) via -DBLAS_LIBRARIES: refused,
#      the built-in GEMM, nothing of it on mlm's link line;
#   2. netlib's reference BLAS (Debian's libblas3, /usr/lib/<triplet>/blas/libblas.so.3) the same way, where
#      it is installed;
#   3. a library built here that exports cblas_sgemm and openblas_get_config (what OpenBLAS says of itself)
#      via -DBLAS_LIBRARIES: accepted as OpenBLAS, on the link line (so 1 does not pass by refusing everything);
#   4. the reference CBLAS of 1 named with -DMLM_BLAS=PATH ("I know, use it"): linked, with a warning.
# usage: test_blas_select.sh SOURCE_DIR C_COMPILER
set -uo pipefail
src="$1"; cc="$2"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
fail=0

# cblas_sgemm by its definition (row-major only, as mlm calls it); with -DVENDOR also OpenBLAS's vendor function.
cat >"$tmp/fake.c" <<'C'
void cblas_sgemm(int order, int ta, int tb, int M, int N, int K, float alpha, const float *A, int lda,
                 const float *B, int ldb, float beta, float *C, int ldc) {
    (void)order;
    for (int i = 0; i < M; i++)
        for (int j = 0; j < N; j++) {
            float s = 0.0f;
            for (int k = 0; k < K; k++)
                s += (ta == 112 ? A[k * lda + i] : A[i * lda + k]) * (tb == 112 ? B[j * ldb + k] : B[k * ldb + j]);
            C[i * ldc + j] = alpha * s + (beta != 0.0f ? beta * C[i * ldc + j] : 0.0f);
        }
}
#ifdef VENDOR
char *openblas_get_config(void) { return "OpenBLAS 9.9.9 (fake, for test_blas_select)"; }
#endif
C
"$cc" -shared -fPIC -O1 -o "$tmp/libfakeref.so" "$tmp/fake.c" || { echo "FAIL: cannot build the fake CBLAS with $cc"; exit 1; }
"$cc" -shared -fPIC -O1 -DVENDOR -o "$tmp/libfakeopt.so" "$tmp/fake.c" || { echo "FAIL: cannot build the fake OpenBLAS"; exit 1; }

# configure NAME ARGS...: configures into $tmp/NAME, leaves CMake's output in $tmp/NAME.log and mlm's link line
# in $tmp/NAME.link. Returns CMake's status.
configure() {
  local name="$1"; shift
  cmake -S "$src" -B "$tmp/$name" -G "Unix Makefiles" -DCMAKE_C_COMPILER="$cc" -DMLM_CUDA=OFF -DMLM_MPI=OFF \
    -DMLM_BUILD_TESTS=OFF "$@" >"$tmp/$name.log" 2>&1
  local rc=$?
  cat "$tmp/$name/CMakeFiles/mlm.dir/link.txt" >"$tmp/$name.link" 2>/dev/null || echo "(no link line)" >"$tmp/$name.link"
  return $rc
}

# expect NAME DESCRIPTION PATTERN-IN-LOG LIBRARY-PATTERN on|off: CMake said PATTERN, and the library is (on) or is
# not (off) on mlm's link line (as a path, or as -lNAME where CMake links it by name).
expect() {
  local name="$1" what="$2" pattern="$3" lib="$4" linked="$5"
  if ! grep -qE "$pattern" "$tmp/$name.log"; then
    echo "FAIL: $what: CMake did not say /$pattern/; it said:"; grep -E "mlm:|Warning|Error" -A2 "$tmp/$name.log"; fail=1
  elif [ "$linked" = on ] && ! grep -qE "$lib" "$tmp/$name.link"; then
    echo "FAIL: $what: $lib is not on mlm's link line: $(cat "$tmp/$name.link")"; fail=1
  elif [ "$linked" = off ] && grep -qE "$lib" "$tmp/$name.link"; then
    echo "FAIL: $what: $lib is on mlm's link line: $(cat "$tmp/$name.link")"; fail=1
  else
    echo "ok: $what: $(grep -m1 -E 'mlm: CPU matmuls' "$tmp/$name.log" | sed 's/^-- //')"
  fi
}

configure ref -DBLAS_LIBRARIES="$tmp/libfakeref.so" || { echo "FAIL: configure with the fake reference CBLAS failed"; cat "$tmp/ref.log"; exit 1; }
expect ref "a reference CBLAS via BLAS_LIBRARIES" \
  "refused BLAS $tmp/libfakeref.so.*a reference BLAS" "libfakeref.so" off
expect ref "... falls back to the built-in GEMM" "mlm: CPU matmuls: built-in GEMM: refused" "libfakeref|-lfakeref" off

netlib=""
for f in /usr/lib/*-linux-gnu/blas/libblas.so.3 /usr/lib64/libblas.so.3; do
  [ -e "$f" ] && netlib="$f" && break
done
if [ -n "$netlib" ]; then
  configure netlib -DBLAS_LIBRARIES="$netlib" || { echo "FAIL: configure against $netlib failed"; cat "$tmp/netlib.log"; exit 1; }
  expect netlib "netlib's reference BLAS ($netlib) via BLAS_LIBRARIES" "mlm: CPU matmuls: built-in GEMM: refused $netlib" \
    "blas/libblas|-lblas( |$)" off
else
  echo "note: no netlib reference BLAS installed (apt-get install libblas-dev adds one); checked with the fake one only"
fi

configure opt -DBLAS_LIBRARIES="$tmp/libfakeopt.so" || { echo "FAIL: configure with the fake OpenBLAS failed"; cat "$tmp/opt.log"; exit 1; }
expect opt "a library that says it is OpenBLAS" "mlm: CPU matmuls: OpenBLAS \(OpenBLAS 9\.9\.9" "libfakeopt|-lfakeopt" on

configure named -DMLM_BLAS="$tmp/libfakeref.so" || { echo "FAIL: configure with MLM_BLAS=the fake reference failed"; cat "$tmp/named.log"; exit 1; }
expect named "a reference CBLAS named with MLM_BLAS" "is no optimized BLAS that mlm" "libfakeref|-lfakeref" on

if [ "$fail" != 0 ]; then exit 1; fi
echo "test_blas_select: all passed"
