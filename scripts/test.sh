#!/usr/bin/env bash
# Builds and runs every test (README, "Testing"), in four stages:
#   release  all tests, -O3 -march=native
#   asan     all tests again, RelWithDebInfo under AddressSanitizer + UndefinedBehaviorSanitizer
#   tsan     the tests labelled `threads`, RelWithDebInfo under ThreadSanitizer
#   fuzz     every libFuzzer target in tests/fuzz/ for TPA_FUZZ_SECONDS each (scripts/fuzz.sh)
#   TPA_TEST_STAGES="a b"   only these stages, in this order (default "release asan tsan fuzz")
#   TPA_SKIP_SANITIZERS=1   only the release stage
#   TPA_JOBS=<n>            parallel build/test jobs (default 2)
#   TPA_FUZZ_SECONDS=<s>    run time per fuzz target in the fuzz stage (default 25)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
jobs="${TPA_JOBS:-2}"
stages="${TPA_TEST_STAGES:-release asan tsan fuzz}"
if [[ "${TPA_SKIP_SANITIZERS:-0}" == "1" ]]; then
  echo "=== test.sh: TPA_SKIP_SANITIZERS=1: release stage only"
  stages=release
fi

bash scripts/install-deps.sh

stage_start=$SECONDS
stage_done() { echo "=== test.sh: stage $1 passed in $((SECONDS - stage_start)) s"; stage_start=$SECONDS; }

run_preset() {
  local preset="$1"
  echo "=== test.sh: preset ${preset}: configure"
  cmake --preset "$preset"
  echo "=== test.sh: preset ${preset}: build"
  cmake --build --preset "$preset" --parallel "$jobs"
  echo "=== test.sh: preset ${preset}: test"
  ctest --preset "$preset" --output-on-failure --parallel "$jobs"
}

for stage in $stages; do
  case "$stage" in
    release | asan | tsan) run_preset "$stage" ;;
    fuzz)
      # Corpus and artifacts under build/fuzz; fuzz.sh fails on any crash, leak or timeout.
      TPA_FUZZ_SECONDS="${TPA_FUZZ_SECONDS:-25}" bash scripts/fuzz.sh ;;
    *)
      echo "test.sh: unknown stage '$stage' (release, asan, tsan, fuzz)" >&2
      exit 2 ;;
  esac
  stage_done "$stage"
done

echo "=== test.sh: all stages passed ($stages)"
