#!/usr/bin/env bash
# The README's main job: compares the cache size and decode speed of all attention kinds.
#
# Builds benchmarks/bench_attention (release preset) and runs its default set: the machine probes
# (read bandwidth, FMA peak; 2 threads), cache sizes of every kind at the LLaMA-like shape, one
# layer's decode step at contexts 1K, 4K, 16K and 64K (batch 1, 2 threads), the same with bf16 and
# f16 caches at 16K, and the plain-Eigen baseline at 16K; then serving: one continuous-batching
# step (16 sequences of 1K-16K, 3 of them taking a 256-token prompt chunk) as one ragged call
# against separate calls (GQA, TPA; 2 threads), and the memory 16 forks of a 4096-token prompt
# save (printed by Google Benchmark). Then scripts/bench_report.sh prints the table and draws
# the plot.
#
# Outputs: build/release/bench_results.json  Google Benchmark JSON of the run
#          build/release/bench_table.md       the table (also printed)
#          build/release/bench_plot.png       cache bytes and decode latency vs context
# Environment: TPA_JOBS (build jobs, default 2), TPA_BENCH_MIN_TIME (seconds per benchmark,
# default 0.1). The full set (both shapes, batch 8, 1 thread, prefill) is
# ./build/release/benchmarks/bench_attention without a filter.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
jobs="${TPA_JOBS:-2}"
min_time="${TPA_BENCH_MIN_TIME:-0.1}"
out=build/release

bash scripts/install-deps.sh

cmake --preset release >/dev/null
cmake --build --preset release --parallel "$jobs" --target bench_attention

filter='^(probe(_end)?/(read_bw|read_bw_4k_pages|fma_peak)/threads:2/|cache_size/llama/'
filter+='|decode/llama/[^/]+/ctx:[0-9]+/batch:1/threads:2/'
filter+='|decode_(bf16|f16|int8)/llama/[^/]+/ctx:16384/batch:1/threads:2/'
filter+='|decode_eigen/llama/[^/]+/ctx:16384/batch:1/threads:2/'
filter+='|mixed/llama/(GQA|TPA)/[^/]+/threads:2/|fork_memory/llama/)'

"$out/benchmarks/bench_attention" \
  --benchmark_filter="$filter" \
  --benchmark_min_time="$min_time" \
  --benchmark_out="$out/bench_results.json" \
  --benchmark_out_format=json

echo
bash scripts/bench_report.sh "$out/bench_results.json" "$out" llama 1 2 16384
