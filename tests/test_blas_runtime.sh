#!/usr/bin/env bash
# test_blas_runtime.sh: a built mlm refuses, at run time, a reference BLAS put behind the library name it linked
# (issue 18). Debian's alternatives can switch libblas.so.3 (or what a build linked) to netlib's reference BLAS
# after the build; CMake's choice then says nothing, so mlm asks the loaded library what it is (src/cpu/blas_id.h)
# and runs its built-in GEMM instead. The switch is made here with LD_LIBRARY_PATH, which the loader searches
# before the system directories, and a library of the linked soname:
#   1. a reference CBLAS built here (cblas_sgemm alone, no vendor function): mlm --version and the device line of
#      a one-step `mlm train` say the built-in GEMM runs and name the refused file;
#   2. netlib's reference BLAS itself (/usr/lib/<triplet>/blas/libblas.so.3, which exports cblas_sgemm), where
#      it is installed: the same;
#   3. the control: a library of that soname that says it is OpenBLAS (openblas_get_config): accepted, so 1 and
#      2 do not pass by refusing everything.
# usage: test_blas_runtime.sh MLM C_COMPILER MLM_BLAS(the CMake setting)
# Exit 77 (skipped) when mlm links no CBLAS (MLM_BLAS=OFF, or none found) or was configured with a named library
# (MLM_BLAS=path: "I know, use it", which is never refused).
set -uo pipefail
mlm="$1"; cc="$2"; setting="$3"
case "$setting" in
  AUTO|auto|ON|on) ;;
  *) echo "skip: MLM_BLAS=$setting (built-in only, or a library named explicitly, which mlm never refuses)"; exit 77 ;;
esac
soname="$(readelf -d "$mlm" | sed -n 's/.*(NEEDED).*\[\(lib\(open\)\{0,1\}blas[^]]*\|libblis[^]]*\|libmkl_rt[^]]*\|libcblas[^]]*\)\]/\1/p' | head -n1)"
if [ -z "$soname" ]; then
  echo "skip: $mlm links no CBLAS ($("$mlm" --version))"; exit 77
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
fail=0

mkdir -p "$tmp/ref" "$tmp/opt" "$tmp/netlib"
"$cc" -shared -fPIC -O1 -Wl,-soname,"$soname" -o "$tmp/ref/$soname" "$(dirname "$0")/fake_cblas.c" || { echo "FAIL: cannot build the fake CBLAS"; exit 1; }
"$cc" -shared -fPIC -O1 -DVENDOR -Wl,-soname,"$soname" -o "$tmp/opt/$soname" "$(dirname "$0")/fake_cblas.c" || { echo "FAIL: cannot build the fake OpenBLAS"; exit 1; }

# A two-line corpus repeated is enough for one step of 4 sequences (under a second).
printf 'First Citizen:\nBefore we proceed any further, hear me speak.\n%.0s' $(seq 1 50) >"$tmp/corpus.txt"

# check DIR WHAT PATTERN: with DIR first on the loader's path, `mlm --version` and the device line of a dry run
# both match PATTERN.
check() {
  local dir="$1" what="$2" pattern="$3" loaded
  loaded="$(LD_LIBRARY_PATH="$dir" ldd "$mlm" | grep -F "$soname" | head -n1)"
  case "$loaded" in
    *"$dir/"*) ;;
    *) echo "FAIL: $what: the loader did not take $dir/$soname: $loaded"; fail=1; return ;;
  esac
  local version device
  version="$(LD_LIBRARY_PATH="$dir" "$mlm" --version 2>&1)"
  device="$(LD_LIBRARY_PATH="$dir" "$mlm" train --device cpu --set data.path="$tmp/corpus.txt" \
    --set train.batch_size=4 --set train.max_steps=1 --out "$tmp/run-$(basename "$dir")" 2>&1 | grep -m1 "matmuls")"
  if ! grep -qE "$pattern" <<<"$version"; then
    echo "FAIL: $what: mlm --version did not say /$pattern/: $version"; fail=1
  elif ! grep -qE "$pattern" <<<"$device"; then
    echo "FAIL: $what: the device line of mlm train did not say /$pattern/: ${device:-(no matmuls line)}"; fail=1
  else
    echo "ok: $what: $version"
  fi
}

check "$tmp/ref" "a reference CBLAS behind $soname" \
  "built-in, [a-z0-9]+ kernel.*$tmp/ref/$soname is no optimized BLAS"
netlib=""
for f in /usr/lib/*-linux-gnu/blas/libblas.so.3 /usr/lib64/libblas.so.3; do
  [ -e "$f" ] && [ "$(nm -D "$f" 2>/dev/null | grep -c ' T cblas_sgemm$')" -gt 0 ] && netlib="$f" && break
done
if [ -n "$netlib" ]; then
  ln -s "$netlib" "$tmp/netlib/$soname"
  check "$tmp/netlib" "netlib's reference BLAS ($netlib) behind $soname" \
    "built-in, [a-z0-9]+ kernel.*is no optimized BLAS"
else
  echo "note: no netlib reference BLAS with CBLAS installed (apt-get install libblas-dev adds one); checked with the fake one"
fi
check "$tmp/opt" "the control: a library that says it is OpenBLAS" "OpenBLAS 9\.9\.9"
exit $fail
