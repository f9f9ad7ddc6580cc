#!/usr/bin/env bash
# tools/install_deps.sh: installs the optional system packages that make mlm fast or complete, where it can, and
# says exactly what to install where it cannot. Used by the README's first command and by tools/test.sh.
#
#   bash tools/install_deps.sh [blas] [mpi]      (default: blas)
#     blas  OpenBLAS for the CPU backend's matmuls (Debian/Ubuntu libopenblas-dev; Fedora openblas-devel)
#     mpi   Open MPI for data parallel on the CPU backend (openmpi-bin libopenmpi-dev; Fedora openmpi-devel)
#
# It installs with apt-get or dnf when it runs as root or has passwordless sudo; otherwise it prints the command
# to run and goes on. It never fails the caller: without OpenBLAS, mlm builds its own GEMM (a reference BLAS is
# never used), without MPI the data-parallel test skips.
set -uo pipefail

want=("$@")
[ ${#want[@]} = 0 ] && want=(blas)

have_blas() { ldconfig -p 2>/dev/null | grep -qE 'libopenblas(p|o)?[^ ]*\.so|libblis[^ ]*\.so|libmkl_rt\.so'; }
have_mpi() { command -v mpirun >/dev/null && ldconfig -p 2>/dev/null | grep -q 'libmpi\.so'; }

if command -v apt-get >/dev/null; then
  manager=apt
  declare -A packages=([blas]="libopenblas-dev" [mpi]="openmpi-bin libopenmpi-dev")
elif command -v dnf >/dev/null; then
  manager=dnf
  declare -A packages=([blas]="openblas-devel" [mpi]="openmpi-devel")
else
  manager=""
  declare -A packages=([blas]="OpenBLAS (its development package)" [mpi]="Open MPI (mpirun, mpi.h, libmpi)")
fi

if [ "$(id -u)" = 0 ]; then
  sudo=()
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
  sudo=(sudo -n)
else
  sudo=(none)
fi

missing=()
for w in "${want[@]}"; do
  case "$w" in
    blas) have_blas || missing+=(${packages[blas]}) ;;
    mpi) have_mpi || missing+=(${packages[mpi]}) ;;
    *) echo "install_deps.sh: unknown group '$w' (blas, mpi)" >&2; exit 2 ;;
  esac
done
[ ${#missing[@]} = 0 ] && exit 0

if [ -z "$manager" ]; then
  echo "== mlm: optional packages missing: ${missing[*]}; install them with your package manager for the fast path"
  exit 0
fi
if [ "${sudo[0]:-}" = none ]; then
  case "$manager" in
    apt) cmd="sudo apt-get install ${missing[*]}" ;;
    dnf) cmd="sudo dnf install ${missing[*]}" ;;
  esac
  echo "== mlm: ${missing[*]} missing and this user cannot install packages (not root, no passwordless sudo)."
  echo "   To install them run:  $cmd   then configure again (cmake -S . -B build)."
  echo "   Meanwhile mlm builds with its own GEMM (never a reference BLAS)."
  exit 0
fi
echo "== installing ${missing[*]} (optional; the build works without them)"
case "$manager" in
  apt) ok=0
       "${sudo[@]}" apt-get update -qq >/dev/null 2>&1
       "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null && ok=1 ;;
  dnf) ok=0; "${sudo[@]}" dnf install -y -q "${missing[@]}" >/dev/null && ok=1 ;;
esac
if [ "$ok" != 1 ]; then
  echo "   could not install ${missing[*]} (no network or package index?); mlm builds with its own GEMM meanwhile"
fi
exit 0
