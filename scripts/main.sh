#!/usr/bin/env bash
# Builds the release preset's example program kinds_table and runs it.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
jobs="${TPA_JOBS:-2}"

bash scripts/install-deps.sh

cmake --preset release -DTPA_BUILD_EXAMPLES=ON
cmake --build --preset release --parallel "$jobs" --target kinds_table
./build/release/examples/kinds_table
