#!/usr/bin/env bash
# Builds every libFuzzer target tests/fuzz/*.cpp with clang (-fsanitize=fuzzer,address,undefined,
# warnings as errors; TPA_JOBS builds at a time) and runs each for a bounded time. Every target is
# seeded with the reproducers kept in the repository, tests/fuzz/corpus/<target>/ (written by
# tests/fuzz/make_corpus.py); the safetensors target also with the test fixtures
# (tests/data/*.safetensors) and a few small hand-made files. Exits non-zero if any target fails to build or
# finds a crash, leak, timeout or out-of-memory; the reproducer is left under
# <build>/artifacts/<target>/ (replay: <build>/<target> <reproducer>).
#   TPA_FUZZ_SECONDS=<s>     run time per target (default 60)
#   TPA_JOBS=<n>             parallel builds (default 2)
#   TPA_FUZZ_TIMEOUT=<s>     per-input timeout (default 10)
#   TPA_FUZZ_BUILD_DIR=<dir> build, corpus and artifact directory (default build/fuzz)
#   TPA_FUZZ_CXX=<clang++>   compiler (default clang++, else clang++-14)
#   TPA_FUZZ_TARGETS="a b"   only these targets (file stems in tests/fuzz/)
# The corpus directory persists between runs, so later runs start where earlier ones stopped.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
seconds="${TPA_FUZZ_SECONDS:-60}"
timeout="${TPA_FUZZ_TIMEOUT:-10}"
build="${TPA_FUZZ_BUILD_DIR:-$repo/build/fuzz}"

cxx="${TPA_FUZZ_CXX:-}"
if [[ -z "$cxx" ]]; then
  for c in clang++ clang++-14; do
    if command -v "$c" >/dev/null; then cxx="$c"; break; fi
  done
fi
if [[ -z "$cxx" ]]; then
  echo "fuzz.sh: no clang++ found (set TPA_FUZZ_CXX)" >&2
  exit 2
fi

eigen_inc=/usr/include/eigen3
[[ -d "$eigen_inc" ]] || eigen_inc="$(pkg-config --variable=includedir eigen3 2>/dev/null)/eigen3"

# write_seed <path> <header json> <data as printf escapes>: a safetensors file.
write_seed() {
  local path="$1" header="$2" data="$3" n=${#2} le="" i
  for i in 0 1 2 3 4 5 6 7; do le+="$(printf '\\x%02x' $(((n >> (8 * i)) & 255)))"; done
  printf "${le}%s${data}" "$header" >"$path"
}

seed_corpus() {
  local dir="$1" t="$2"
  mkdir -p "$dir"
  if [[ -d "$repo/tests/fuzz/corpus/$t" ]]; then cp "$repo/tests/fuzz/corpus/$t"/* "$dir"/; fi
  [[ "$t" == fuzz_safetensors ]] || return 0
  # The fixtures under 1 MiB (the tiny T6 checkpoint, 6.4 MiB, would raise libFuzzer's input
  # length limit to its size and slow every run).
  find "$repo"/tests/data -maxdepth 1 -name '*.safetensors' -size -1024k -exec cp {} "$dir"/ \;
  write_seed "$dir/seed_empty" '{}' ''
  write_seed "$dir/seed_mixed" \
    '{"__metadata__":{"n_head":"4"},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"h":{"dtype":"F16","shape":[1,2],"data_offsets":[8,12]},"b":{"dtype":"BF16","shape":[2,1,1],"data_offsets":[12,16]},"s":{"dtype":"F32","shape":[],"data_offsets":[16,20]},"z":{"dtype":"BF16","shape":[0,3],"data_offsets":[20,20]}}' \
    '\x00\x00\x80\x3f\x00\x00\x00\xc0\x00\x3c\x00\x7c\x80\x3f\xc0\x7f\x00\x00\x40\x40'
}

mkdir -p "$build"
if [[ -n "${TPA_FUZZ_TARGETS:-}" ]]; then
  read -r -a targets <<<"$TPA_FUZZ_TARGETS"
else
  targets=()
  for src in "$repo"/tests/fuzz/*.cpp; do targets+=("$(basename "$src" .cpp)"); done
fi

# Build every target first, TPA_JOBS at a time; a failed build leaves no executable.
max_jobs="${TPA_JOBS:-2}"
build_target() {
  local t="$1"
  rm -f "$build/$t"
  "$cxx" -std=c++17 -g -O1 -fno-omit-frame-pointer \
    -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all \
    -Wall -Wextra -Wpedantic -Werror \
    -I"$repo/include" -isystem "$eigen_inc" "$repo/tests/fuzz/$t.cpp" -o "$build/$t" \
    >"$build/$t.build.log" 2>&1
}
for t in "${targets[@]}"; do
  echo "=== fuzz.sh: build $t"
  while (($(jobs -rp | wc -l) >= max_jobs)); do wait -n || true; done
  build_target "$t" &
done
wait || true

failed=()
for t in "${targets[@]}"; do
  exe="$build/$t"
  if [[ ! -x "$exe" ]]; then
    cat "$build/$t.build.log" >&2
    echo "=== fuzz.sh: $t: build FAILED" >&2
    failed+=("$t (build)")
    continue
  fi

  corpus="$build/corpus/$t"
  artifacts="$build/artifacts/$t"
  seed_corpus "$corpus" "$t"
  mkdir -p "$artifacts"
  echo "=== fuzz.sh: run $t for ${seconds}s (corpus $corpus)"
  if UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}" \
      "$exe" -max_total_time="$seconds" -timeout="$timeout" -rss_limit_mb=2048 \
      -print_final_stats=1 -artifact_prefix="$artifacts/" "$corpus"; then
    echo "=== fuzz.sh: $t: no failures"
  else
    echo "=== fuzz.sh: $t: FAILED (exit $?); reproducers in $artifacts" >&2
    failed+=("$t")
  fi
done

if ((${#failed[@]})); then
  echo "=== fuzz.sh: failures: ${failed[*]}" >&2
  exit 1
fi
echo "=== fuzz.sh: all ${#targets[@]} target(s) ran ${seconds}s without failures"
