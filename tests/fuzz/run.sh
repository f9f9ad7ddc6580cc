#!/usr/bin/env bash
# tests/fuzz/run.sh: build the libFuzzer harnesses (clang, their own CMake build) and run each for a bounded
# time on its seeds: the committed corpus (tests/fuzz/corpus/<harness>/), files made by the current mlm
# (make_seeds.sh) and what earlier runs in this build folder found. Prints the executions of each harness
# (libFuzzer's stat::number_of_executed_units); exits 1 if any harness failed, naming the input to replay.
# Every harness gets tests/fuzz/mlm.dict (config keys, safetensors and checkpoint header tokens).
# Exits 77 (skipped) where clang or libFuzzer's runtime is missing.
#
# usage: bash tests/fuzz/run.sh [SECONDS_EACH (default 15)] [HARNESS...]
#   MLM_BIN=build/mlm (to make seeds from; skipped if absent)   MLM_FUZZ_BUILD=build-fuzz
set -uo pipefail
cd "$(dirname "$0")/../.."
secs="${1:-15}"
shift || true
harnesses=("$@")
[ ${#harnesses[@]} -gt 0 ] || harnesses=(config json utf8 safetensors checkpoint ckpt_model shards vocab shard_set prepare_input)
bdir="${MLM_FUZZ_BUILD:-build-fuzz}"
mlm="${MLM_BIN:-build/mlm}"

cc="$(command -v clang || true)"
if [ -z "$cc" ]; then
  echo "SKIP: fuzzing: no clang on PATH (install clang and libclang-rt-dev for libFuzzer)"
  exit 77
fi
probe="$(mktemp -d)"
printf 'int LLVMFuzzerTestOneInput(const char *d, unsigned long n) { return 0; }\n' > "$probe/p.c"
if ! "$cc" -fsanitize=fuzzer,address,undefined "$probe/p.c" -o "$probe/p" 2>/dev/null; then
  rm -rf "$probe"
  echo "SKIP: fuzzing: $cc cannot link -fsanitize=fuzzer (libFuzzer's runtime, Debian's libclang-rt-dev, is missing)"
  exit 77
fi
rm -rf "$probe"

echo "   building the harnesses in $bdir (clang)"
mkdir -p "$bdir"
blog="$bdir/build.log"
if ! { cmake -S tests/fuzz -B "$bdir" -DCMAKE_C_COMPILER="$cc" -DCMAKE_BUILD_TYPE=None >"$blog" 2>&1 &&
       cmake --build "$bdir" -j"$(nproc 2>/dev/null || echo 2)" >>"$blog" 2>&1; }; then
  tail -n 20 "$blog"
  echo "FAIL: the fuzz harnesses do not build (log: $blog)"
  exit 1
fi
if [ -x "$mlm" ]; then
  rm -rf "$bdir/seeds"
  bash tests/fuzz/make_seeds.sh "$mlm" "$bdir/seeds" || echo "   could not make seeds with $mlm; using the committed ones"
fi

# One harness: its report lines in $bdir/artifacts/$h.report, its exit status in $bdir/artifacts/$h.rc.
fuzz_one() {
  local h="$1"
  mkdir -p "$bdir/corpus/$h" "$bdir/artifacts/$h"
  local dirs=("$bdir/corpus/$h" "tests/fuzz/corpus/$h")
  [ -d "$bdir/seeds/$h" ] && dirs+=("$bdir/seeds/$h")
  local log="$bdir/artifacts/$h.log" report="$bdir/artifacts/$h.report"
  # -timeout: one input taking over 10 s is a hang; -rss_limit_mb: a leak or runaway allocation.
  "$bdir/fuzz_$h" -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 -dict=tests/fuzz/mlm.dict \
    -artifact_prefix="$bdir/artifacts/$h/" "${dirs[@]}" >"$log" 2>&1
  local rc=$?
  local execs cov
  execs="$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || true)"
  cov="$(grep -o 'cov: [0-9]*' "$log" | tail -n 1 || true)"
  if [ $rc -eq 0 ]; then
    printf '   fuzz_%-12s %9s executions in %s s, %s, corpus %s files\n' "$h" "${execs:-?}" "$secs" "${cov:-cov: ?}" \
      "$(ls "$bdir/corpus/$h" | wc -l)" >"$report"
  else
    local crash
    crash="$(grep -o "Test unit written to [^ ]*" "$log" | tail -n 1 | sed 's/Test unit written to //')"
    { echo "   fuzz_$h FAILED (exit $rc) after ${execs:-?} executions; last lines of $log:"
      { grep -E "ERROR|SUMMARY|fuzz property" "$log" | head -n 3; grep -E "^ +#[0-9]+ 0x" "$log" | head -n 5; } |
        sed 's/^ */     /'
      echo "     replay: $bdir/fuzz_$h ${crash:-<input>}"; } >"$report"
  fi
  echo "$rc" >"$bdir/artifacts/$h.rc"
}

# As many harnesses at a time as there are cores (each one process, one core, for its $secs seconds): the
# whole run takes its share of the test command's time once per core instead of once per harness.
slots="$(nproc 2>/dev/null || echo 1)"
running=0
for h in "${harnesses[@]}"; do
  rm -f "$bdir/artifacts/$h.rc" "$bdir/artifacts/$h.report"
  fuzz_one "$h" &
  running=$((running + 1))
  if [ "$running" -ge "$slots" ]; then
    wait -n || true
    running=$((running - 1))
  fi
done
wait
failed=()
for h in "${harnesses[@]}"; do
  cat "$bdir/artifacts/$h.report" 2>/dev/null || echo "   fuzz_$h: no report (the harness did not run to its end)"
  [ "$(cat "$bdir/artifacts/$h.rc" 2>/dev/null || echo 1)" = 0 ] || failed+=("$h")
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "FAIL: fuzzing found failures in: ${failed[*]}"
  exit 1
fi
echo "fuzzing: ${#harnesses[@]} harnesses, no failure"
