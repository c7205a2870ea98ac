#!/usr/bin/env bash
# Turns the Google Benchmark JSON of benchmarks/bench_attention into the comparison table of the
# attention kinds (Markdown, printed and written to OUT_DIR/bench_table.md) and a plot of
# whole-model cache bytes and decode latency against context (OUT_DIR/bench_plot.png, gnuplot).
#
# Usage: scripts/bench_report.sh RESULTS.json OUT_DIR [SHAPE [BATCH [THREADS [TABLE_CTX]]]]
#   SHAPE      llama (default) or medium
#   BATCH      decode batch of the table and the latency plot (default 1)
#   THREADS    thread count of the table and the latency plot (default 2)
#   TABLE_CTX  context of the table's decode columns (default 16384)
# Needs only bash, awk and (for the plot) gnuplot.
set -euo pipefail

if [[ $# -lt 2 ]]; then
  echo "usage: $0 RESULTS.json OUT_DIR [SHAPE [BATCH [THREADS [TABLE_CTX]]]]" >&2
  exit 2
fi
json="$1"
out="$2"
shape="${3:-llama}"
batch="${4:-1}"
threads="${5:-2}"
table_ctx="${6:-16384}"
mkdir -p "$out"

awk -v shape="$shape" -v batch="$batch" -v threads="$threads" -v table_ctx="$table_ctx" \
    -v out="$out" '
  # Google Benchmark writes one "key": value per line; names carry suffixes such as
  # /iterations:1, /min_time:0.300 or /real_time that the lookups below do not use.
  /^ *"name": "/ {
    name = $0
    sub(/^ *"name": "/, "", name)
    sub(/",?$/, "", name)
    gsub(/\/(iterations:[0-9]+|min_time:[0-9.]+|real_time|repeats:[0-9]+)/, "", name)
    next
  }
  /^ *"[A-Za-z0-9_]+": -?[0-9]/ {
    key = $1
    gsub(/[":]/, "", key)
    v = $2
    sub(/,$/, "", v)
    val[name, key] = v + 0
    has[name, key] = 1
  }
  function human(b) {
    if (b >= 2^30) return sprintf("%.1f GiB", b / 2^30)
    if (b >= 2^20) return sprintf("%.1f MiB", b / 2^20)
    if (b >= 2^10) return sprintf("%.1f KiB", b / 2^10)
    return sprintf("%d B", b)
  }
  function get(n, k, fmt, scale) {
    if (!has[n, k]) return "–"
    return sprintf(fmt, val[n, k] * scale)
  }
  function ctx_label(c) { return c >= 1024 ? (c / 1024) "K" : c }
  function best(a, b, k,    x) {
    x = has[a, k] ? val[a, k] : 0
    if (has[b, k] && val[b, k] > x) x = val[b, k]
    return x
  }
  # % of roofline of row n from its byte/FLOP model and the probes taken right around it
  # (read_GBps_now, GFLOPS_now), else the run'"'"'s best probes; the binary'"'"'s own pct_roofline
  # where the model counters are missing.
  function roofline(n,    t, r, b, f) {
    b = has[n, "read_GBps_now"] ? val[n, "read_GBps_now"] : bw
    f = has[n, "GFLOPS_now"] ? val[n, "GFLOPS_now"] : fma
    if (has[n, "model_bytes"] && has[n, "us_per_step"] && b > 0 && f > 0) {
      t = val[n, "model_bytes"] / (b * 1e9)
      r = val[n, "model_flops"] / (f * 1e9)
      if (r > t) t = r
      return sprintf("%.0f %%", 100 * t / (val[n, "us_per_step"] * 1e-6))
    }
    return get(n, "pct_roofline", "%.0f %%", 1)
  }
  END {
    nk = split("MHA GQA MQA MLA TPA TPA-KV", kinds, " ")
    nc = split("1024 2048 4096 8192 16384 32768 65536 131072", ctxs, " ")
    table = out "/bench_table.md"
    # Roofline inputs: the best of the probes run first and last (others may share the machine).
    bw = best("probe/read_bw/threads:" threads, "probe_end/read_bw/threads:" threads,
              "read_GBps_best")
    fma = best("probe/fma_peak/threads:" threads, "probe_end/fma_peak/threads:" threads,
               "GFLOPS_best")
    bw4k = "probe/read_bw_4k_pages/threads:" threads
    if (bw > 0) {
      printf("Roofline inputs (%d threads, best of this run'"'"'s probes; each decode row'"'"'s %% of " \
             "roofline is against probes taken right before and after it): read bandwidth %.1f GB/s " \
             "(2 MiB pages%s), FP32 FMA peak %.0f GFLOP/s\n\n", threads, bw,
             has[bw4k, "read_GBps_best"] ? sprintf("; %.1f GB/s over 4 KiB pages",
                                                   val[bw4k, "read_GBps_best"]) : "",
             fma) > table
    } else {
      printf("No probe results for %d threads in the JSON: %% of roofline is the benchmark'"'"'s " \
             "own pct_roofline (probes it ran when first needed)\n\n", threads) > table
    }
    layers = ""
    for (i = 1; i <= nk; ++i)
      if (has["cache_size/" shape "/" kinds[i] "/f32", "layers"])
        layers = val["cache_size/" shape "/" kinds[i] "/f32", "layers"]
    printf("Shape %s%s; decode: one layer call, batch %d, %d threads, context %s\n\n", shape,
           layers != "" ? " (" layers " layers)" : "", batch, threads, ctx_label(table_ctx)) > table
    printf("| kind | elements/token/layer | bytes/token/layer (f32) | model cache @32K | " \
           "model cache @128K | bytes/token/layer (int8) | model cache @32K (int8) | " \
           "decode µs/step @%s | speed-up vs MHA | speed-up vs Eigen | %% of roofline |\n",
           ctx_label(table_ctx)) > table
    printf("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n") > table
    rows = 0
    for (i = 1; i <= nk; ++i) {
      k = kinds[i]
      c = "cache_size/" shape "/" k "/f32"
      c8 = "cache_size/" shape "/" k "/int8"
      d = "decode/" shape "/" k "/ctx:" table_ctx "/batch:" batch "/threads:" threads
      if (!has[c, "bytes_per_token"] && !has[d, "us_per_step"]) continue
      ++rows
      printf("| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", k,
             get(c, "elements_per_token", "%d", 1),
             has[c, "bytes_per_token"] ? human(val[c, "bytes_per_token"]) : "–",
             has[c, "model_bytes_32K"] ? human(val[c, "model_bytes_32K"]) : "–",
             has[c, "model_bytes_128K"] ? human(val[c, "model_bytes_128K"]) : "–",
             has[c8, "bytes_per_token"] ? human(val[c8, "bytes_per_token"]) : "–",
             has[c8, "model_bytes_32K"] ? human(val[c8, "model_bytes_32K"]) : "–",
             get(d, "us_per_step", "%.0f", 1),
             get(d, "speedup_vs_mha", "%.2f×", 1),
             get(d, "speedup_vs_eigen", "%.2f×", 1),
             roofline(d)) > table
    }
    # 16-bit and int8 caches beside f32, where the run has them.
    any16 = 0
    split("bf16 f16 int8", narrow, " ")
    for (i = 1; i <= nk; ++i)
      for (st = 1; st <= 3; ++st)
        if (has["decode_" narrow[st] "/" shape "/" kinds[i] "/ctx:" table_ctx \
                "/batch:" batch "/threads:" threads, "us_per_step"]) any16 = 1
    if (any16) {
      printf("\nDecode with 16-bit and int8 caches (same case; speed-up vs f32 is the f32 " \
             "row'"'"'s time / this one'"'"'s, ideally 2× (16-bit) and ≈ 3.9× (int8) where the " \
             "step is bound by reading the cache)\n\n") > table
      printf("| kind | cache | bytes/token/layer | decode µs/step @%s | speed-up vs f32 | " \
             "speed-up vs MHA | %% of roofline |\n", ctx_label(table_ctx)) > table
      printf("|---|---|---:|---:|---:|---:|---:|\n") > table
      for (i = 1; i <= nk; ++i) {
        for (st = 1; st <= 3; ++st) {
          sn = narrow[st]
          d = "decode_" sn "/" shape "/" kinds[i] "/ctx:" table_ctx "/batch:" batch \
              "/threads:" threads
          if (!has[d, "us_per_step"]) continue
          printf("| %s | %s | %s | %s | %s | %s | %s |\n", kinds[i], sn,
                 human(val[d, "bytes_per_token"]), get(d, "us_per_step", "%.0f", 1),
                 get(d, "speedup_vs_f32", "%.2f×", 1), get(d, "speedup_vs_mha", "%.2f×", 1),
                 roofline(d)) > table
        }
      }
    }
    close(table)
    if (rows == 0) {
      print "bench_report: no cache_size/decode results for shape " shape " in the JSON" > "/dev/stderr"
      exit 1
    }

    # Plot data: one column per kind, "NaN" where a case did not run.
    cache = out "/bench_plot_cache.dat"
    lat = out "/bench_plot_decode.dat"
    printf("# whole-model cache GiB (f32, then int8), shape %s\ncontext", shape) > cache
    printf("# decode ms per step, shape %s, batch %d, %d threads\ncontext", shape, batch,
           threads) > lat
    for (i = 1; i <= nk; ++i) {
      printf(" %s", kinds[i]) > cache
      printf(" %s", kinds[i]) > lat
    }
    for (i = 1; i <= nk; ++i) printf(" %s-int8", kinds[i]) > cache
    printf("\n") > cache
    printf("\n") > lat
    # Decode rows only at contexts some kind ran (gnuplot joins the points of a line).
    for (j = 1; j <= nc; ++j) {
      printf("%d", ctxs[j]) > cache
      line = ""
      any = 0
      for (i = 1; i <= nk; ++i) {
        c = "cache_size/" shape "/" kinds[i] "/f32"
        key = "model_bytes_" ctx_label(ctxs[j])
        printf(" %s", has[c, key] ? sprintf("%.6g", val[c, key] / 2^30) : "NaN") > cache
        c8 = "cache_size/" shape "/" kinds[i] "/int8"
        int8_cols = int8_cols sprintf(" %s", has[c8, key] ? sprintf("%.6g", val[c8, key] / 2^30) : "NaN")
        d = "decode/" shape "/" kinds[i] "/ctx:" ctxs[j] "/batch:" batch "/threads:" threads
        if (has[d, "us_per_step"]) {
          line = line sprintf(" %.6g", val[d, "us_per_step"] / 1000)
          any = 1
        } else {
          line = line " NaN"
        }
      }
      printf("%s\n", int8_cols) > cache
      int8_cols = ""
      if (any) printf("%d%s\n", ctxs[j], line) > lat
    }
  }
' "$json"

cat "$out/bench_table.md"

if ! command -v gnuplot >/dev/null 2>&1; then
  echo "bench_report: gnuplot not found (scripts/install-deps.sh installs it); no plot" >&2
  exit 0
fi
gnuplot <<EOF
set terminal pngcairo size 1400,560 font "sans,11"
set output "$out/bench_plot.png"
set datafile missing "NaN"
set key top left box opaque width 1
set grid
set logscale xy
set xrange [900:150000]
set xtics ("1K" 1024, "2K" 2048, "4K" 4096, "8K" 8192, "16K" 16384, "32K" 32768, "64K" 65536, "128K" 131072)
set xlabel "context (tokens)"
set style data linespoints
# MHA, GQA, MQA, MLA, TPA, TPA-KV (dashed: at equal head counts its cache equals TPA's)
set style line 1 lc rgb "#c0392b" lw 2 pt 7
set style line 2 lc rgb "#e67e22" lw 2 pt 5
set style line 3 lc rgb "#7f8c8d" lw 2 pt 9
set style line 4 lc rgb "#27ae60" lw 2 pt 11
set style line 5 lc rgb "#1f4e9c" lw 3 pt 13
set style line 6 lc rgb "#3498db" lw 2 pt 6 dt 2
set multiplot layout 1,2 title "tpa attention kinds, shape $shape"
set title "Whole-model KV cache (f32 storage; thin dotted: int8)"
set ylabel "GiB"
plot for [i=2:7] "$out/bench_plot_cache.dat" using 1:i title columnheader(i) ls (i-1), \
     for [i=8:13] "$out/bench_plot_cache.dat" using 1:i title columnheader(i) ls (i-7) lw 1 dt 3
set title "Decode step, one layer call (batch $batch, $threads threads)"
set ylabel "ms per step"
plot for [i=2:7] "$out/bench_plot_decode.dat" using 1:i title columnheader(i) ls (i-1)
unset multiplot
EOF
echo "plot: $out/bench_plot.png"
