#!/usr/bin/env bash
# Builds and runs the tests (README, "Testing"). Stages:
#   release   all tests, -O3 -march=native
#   asan      all tests again, RelWithDebInfo under AddressSanitizer + UndefinedBehaviorSanitizer
#   tsan      the tests labelled `threads`, RelWithDebInfo under ThreadSanitizer
#   fuzz      every libFuzzer target in tests/fuzz/ for TPA_FUZZ_SECONDS each (scripts/fuzz.sh)
#   portable  all tests, Release without -march=native (the Portable and Reference backends only)
#   bench     builds the benchmarks and every example (release preset), runs the benchmarks on a
#             small case
# The default, the README's test command, runs `release asan` (the release stage leaves out the
# benchmarks and the examples no test runs); CI (.ci/run) runs it and then
# `tsan fuzz portable bench`.
#   TPA_TEST_STAGES="a b"   only these stages, in this order; "all" for every stage
#   TPA_SKIP_SANITIZERS=1   only the release stage
#   TPA_JOBS=<n>            parallel build/test jobs (default 2)
#   TPA_FUZZ_SECONDS=<s>    run time per fuzz target in the fuzz stage (default 25)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
jobs="${TPA_JOBS:-2}"
stages="${TPA_TEST_STAGES:-release asan}"
[[ "$stages" == all ]] && stages="release asan tsan fuzz portable bench"
if [[ "${TPA_SKIP_SANITIZERS:-0}" == "1" ]]; then
  echo "=== test.sh: TPA_SKIP_SANITIZERS=1: release stage only"
  stages=release
fi

start=$SECONDS
bash scripts/install-deps.sh
echo "=== test.sh: dependencies checked in $((SECONDS - start)) s"

summary=()
# run_preset <preset> [configure args...]
run_preset() {
  local preset="$1" t0=$SECONDS t1
  shift
  echo "=== test.sh: preset ${preset}: configure"
  cmake --preset "$preset" "$@"
  echo "=== test.sh: preset ${preset}: build"
  cmake --build --preset "$preset" --parallel "$jobs"
  t1=$SECONDS
  echo "=== test.sh: preset ${preset}: built in $((t1 - t0)) s; test"
  ctest --preset "$preset" --output-on-failure --parallel "$jobs"
  summary+=("${preset}: build $((t1 - t0)) s, tests $((SECONDS - t1)) s")
}

for stage in $stages; do
  stage_start=$SECONDS
  case "$stage" in
    release) run_preset release -DTPA_BUILD_BENCHMARKS=OFF -DTPA_EXAMPLES_TESTED_ONLY=ON ;;
    asan | tsan) run_preset "$stage" ;;
    portable) run_preset portable -DTPA_BUILD_BENCHMARKS=OFF -DTPA_EXAMPLES_TESTED_ONLY=ON ;;
    bench)
      cmake --preset release -DTPA_BUILD_BENCHMARKS=ON -DTPA_EXAMPLES_TESTED_ONLY=OFF
      cmake --build --preset release --parallel "$jobs"
      build/release/benchmarks/bench_attention --benchmark_min_time=0.01 \
        --benchmark_filter='^(cache_size/medium/|decode/medium/TPA/ctx:1024/batch:1/threads:1/)'
      build/release/benchmarks/bench_decode --benchmark_list_tests >/dev/null
      summary+=("bench: $((SECONDS - stage_start)) s") ;;
    fuzz)
      # Corpus and artifacts under build/fuzz; fuzz.sh fails on any crash, leak or timeout.
      TPA_FUZZ_SECONDS="${TPA_FUZZ_SECONDS:-25}" bash scripts/fuzz.sh
      summary+=("fuzz: $((SECONDS - stage_start)) s") ;;
    *)
      echo "test.sh: unknown stage '$stage' (release, asan, tsan, fuzz, portable, bench, all)" >&2
      exit 2 ;;
  esac
  echo "=== test.sh: stage $stage passed in $((SECONDS - stage_start)) s"
done

echo "=== test.sh: all stages passed ($stages) in $((SECONDS - start)) s"
for line in "${summary[@]}"; do echo "===   $line"; done
