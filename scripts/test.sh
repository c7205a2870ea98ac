#!/usr/bin/env bash
# Builds and runs every test: first the release preset (-O3 -march=native), then the asan preset
# (RelWithDebInfo under AddressSanitizer + UndefinedBehaviorSanitizer).
#   TPA_SKIP_SANITIZERS=1   skip the asan part
#   TPA_JOBS=<n>            parallel build/test jobs (default 2)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
jobs="${TPA_JOBS:-2}"

bash scripts/install-deps.sh

run_preset() {
  local preset="$1"
  echo "=== test.sh: preset ${preset}: configure"
  cmake --preset "$preset"
  echo "=== test.sh: preset ${preset}: build"
  cmake --build --preset "$preset" --parallel "$jobs"
  echo "=== test.sh: preset ${preset}: test"
  ctest --preset "$preset" --output-on-failure --parallel "$jobs"
}

run_preset release

if [[ "${TPA_SKIP_SANITIZERS:-0}" == "1" ]]; then
  echo "=== test.sh: TPA_SKIP_SANITIZERS=1: skipping the asan preset"
else
  run_preset asan
fi

echo "=== test.sh: all tests passed"
