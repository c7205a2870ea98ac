// cache_accuracy: how much a narrower KV cache (bf16, f16, int8) moves the attention output of
// one decode step away from the f32 cache's, at long context, for every kind (README,
// "Quantized caches"). The attention kernels alone (tpa::grouped_attention, tpa::tpa_attention;
// Native backend, 2 threads) over caches of N(0, 1) factors at the LLaMA-like shape (H 32, d 128;
// GQA G 8; MLA d_c 512, d_R 64; TPA R_Q 6, R_K = R_V 2), queries N(0, 1), scale 1/sqrt(d_qk).
// The same random tokens are appended to one cache of each type (each rounds or quantizes them
// on append); per case 4 queries at the last position, all heads:
//
//   rel_l2   ‖o − o_f32‖₂ / ‖o_f32‖₂   over all heads and queries
//   rel_max  max |o − o_f32| / max |o_f32|
//
// Rows "sim …" are formats simulated in an f32 cache (SimFormat: each factor replaced by what
// the format stores for it, then the f32 kernels, which accumulate in f32 like the quantized
// ones, so the row is the format's output error): "sim 4-bit g32" is a 4-bit symmetric format
// with an f32 scale per 32 elements (no 4-bit cache exists). --ablate adds, per kind, int8 on one
// factor at a time, int8 with one factor in f32, MSE-chosen scales, and (TPA) finer scale groups
// for A (per token today) and B (per row today); --kind NAME runs one kind.
//
//   cache_accuracy [--contexts 1024,16384,32768] [--kind TPA-KV] [--ablate]
#include <tpa/tpa.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

namespace {

using tpa::Index;

struct Case {
  const char* name;
  Index H, G, d_k0, d_k1, d_v;
  bool v_in_key;
  Index r_q = 0, r_k = 0, r_v = 0;  // TPA when r_k > 0 (head_dim d_k0)
  bool tpa() const { return r_k > 0; }
};
const Case kCases[] = {{"MHA", 32, 32, 128, 0, 128, false},
                       {"GQA8", 32, 8, 128, 0, 128, false},
                       {"MQA", 32, 1, 128, 0, 128, false},
                       {"MLA", 32, 1, 512, 64, 512, true},
                       {"TPA", 32, 0, 128, 0, 128, false, 6, 2, 2},
                       {"TPA-KV", 32, 0, 128, 0, 128, false, 0, 2, 2}};
constexpr Index kBlock = 64, kQueries = 4;

std::vector<tpa::FactorSpec> factors(const Case& c) {
  if (c.tpa())
    return {{"A_K", c.H, c.r_k, false},
            {"B_K", c.r_k, c.d_k0, true},
            {"A_V", c.H, c.r_v, false},
            {"B_V", c.r_v, c.d_k0, false}};
  std::vector<tpa::FactorSpec> f = {{"K0", c.G, c.d_k0, true}};
  if (c.d_k1 > 0) f.push_back({"K1", c.G, c.d_k1, true});
  if (!c.v_in_key) f.push_back({"V", c.G, c.d_v, false});
  return f;
}

// N(0, 1) samples (xorshift64* and Box–Muller; reproducible).
void normal(float* x, std::size_t n, std::uint64_t seed) {
  std::uint64_t s = seed * 0x9E3779B97F4A7C15ull + 1;
  auto uniform = [&] {
    s ^= s >> 12;
    s ^= s << 25;
    s ^= s >> 27;
    return (static_cast<double>((s * 0x2545F4914F6CDD1Dull) >> 11) + 0.5) * 0x1.0p-53;
  };
  for (std::size_t i = 0; i < n; i += 2) {
    const double r = std::sqrt(-2 * std::log(uniform())), a = 6.283185307179586 * uniform();
    x[i] = static_cast<float>(r * std::cos(a));
    if (i + 1 < n) x[i + 1] = static_cast<float>(r * std::sin(a));
  }
}

// A storage format simulated in an f32 cache: every cached element is replaced by the value the
// format stores for it (quantize, then dequantize), so the f32 kernels, which accumulate in f32
// as the quantized kernels do, give the format's output exactly. Symmetric round to nearest over
// groups of one token's factor (row-major [rows, cols]): `group` consecutive elements (0: tpa::q8's
// rule, a row when rows hold >= tpa::kQ8MinRowCols elements, else the whole factor), q in
// [-qmax, qmax], scale max|x| / qmax (mse: the scale of {max|x| / qmax · k / 64, k = 32..64} with
// the least squared error of the group); qmax 0: rounded to f16.
struct SimFormat {
  int qmax = 127;
  Index group = 0;
  bool mse = false;
  bool keep = false;  // stored exactly (f32): the factor is left out of the simulation
};

void sim_group(float* x, Index n, int qmax, bool mse) {
  float amax = 0.f;
  for (Index i = 0; i < n; ++i) amax = std::max(amax, std::fabs(x[i]));
  if (amax == 0.f || !std::isfinite(amax)) return;
  auto err = [&](float scale, bool write) {
    double e = 0;
    for (Index i = 0; i < n; ++i) {
      const float q = std::min<float>(qmax, std::max<float>(-qmax, std::nearbyint(x[i] / scale)));
      const float y = q * scale;
      e += static_cast<double>(y - x[i]) * (y - x[i]);
      if (write) x[i] = y;
    }
    return e;
  };
  float best = amax / static_cast<float>(qmax);
  if (mse) {
    double best_e = err(best, false);
    for (int k = 32; k < 64; ++k) {
      const float s = amax / static_cast<float>(qmax) * static_cast<float>(k) / 64.f;
      const double e = err(s, false);
      if (e < best_e) best_e = e, best = s;
    }
  }
  err(best, true);
}

// Bytes per token of factor fs in format fmt (values and f32 scales).
std::size_t sim_bytes(const tpa::FactorSpec& fs, const SimFormat& fmt) {
  const Index n = fs.elements();
  if (fmt.keep) return static_cast<std::size_t>(4 * n);
  if (fmt.qmax == 0) return static_cast<std::size_t>(2 * n);
  const Index g = fmt.group > 0 ? std::min(fmt.group, n)
                                : (fs.cols >= tpa::kQ8MinRowCols ? fs.cols : n);
  return static_cast<std::size_t>(n * (fmt.qmax > 7 ? 8 : 4) / 8 + 4 * ((n + g - 1) / g));
}

// Applies format `fmt` to `len` tokens of factor f (spec fs) in place.
void simulate(const tpa::FactorSpec& fs, const SimFormat& fmt, Index len, float* x) {
  if (fmt.keep) return;
  if (fmt.qmax == 0) {  // f16
    for (Index i = 0; i < len * fs.elements(); ++i) x[i] = static_cast<float>(tpa::half(x[i]));
    return;
  }
  const Index n = fs.elements();
  const Index g = fmt.group > 0 ? std::min(fmt.group, n)
                                : (fs.cols >= tpa::kQ8MinRowCols ? fs.cols : n);
  for (Index t = 0; t < len; ++t)
    for (Index i = 0; i < n; i += g)
      sim_group(x + t * n + i, std::min(g, n - i), fmt.qmax, fmt.mse);
}

// The decode output [kQueries, H, d_v] of case c over `len` tokens `src` stored as S.
template <class S>
std::vector<float> attend(const Case& c, Index len, const std::vector<std::vector<float>>& src,
                          const std::vector<float>& q, std::size_t* bytes_per_token) {
  const auto f = factors(c);
  tpa::KVCache<S> cache({tpa::CacheLayout(c.name, f)}, kBlock, (len + kBlock - 1) / kBlock);
  const tpa::SeqId seq = cache.add_sequence();
  std::vector<tpa::FactorRows> rows;
  for (std::size_t i = 0; i < f.size(); ++i) rows.push_back({src[i].data(), f[i].elements()});
  cache.append(seq, 0, len, rows.data());
  *bytes_per_token = cache.bytes_per_token();
  tpa::Context ctx(2);
  const Index d_out = c.tpa() ? c.d_k0 : c.d_v;
  std::vector<float> o(static_cast<std::size_t>(kQueries * c.H * d_out));
  const Index q_size = c.tpa() && c.r_q > 0 ? c.r_q * (c.H + c.d_k0) : c.H * (c.d_k0 + c.d_k1);
  for (Index i = 0; i < kQueries; ++i) {
    const float* qi = q.data() + i * q_size;
    float* oi = o.data() + i * c.H * d_out;
    if (c.tpa()) {
      tpa::TpaAttentionParams<S> p;
      p.q_rank = c.r_q;
      if (c.r_q > 0) {
        p.a_q = qi;
        p.b_q = qi + c.H * c.r_q;
      } else {
        p.q = qi;
      }
      p.o = oi;
      p.n_q = 1;
      p.q_pos0 = len - 1;
      p.n_heads = c.H;
      p.head_dim = c.d_k0;
      p.k_rank = c.r_k;
      p.v_rank = c.r_v;
      p.scale = 1.f / std::sqrt(static_cast<float>(c.d_k0));
      p.kv = cache.view(seq, 0);
      tpa::tpa_attention<tpa::Native>(ctx, &p, 1);
    } else {
      tpa::GroupedAttentionParams<S> p;
      p.q = qi;
      p.o = oi;
      p.n_q = 1;
      p.q_pos0 = len - 1;
      p.n_heads = c.H;
      p.n_kv_heads = c.G;
      p.k_factor[0] = 0;
      p.k_dims[0] = c.d_k0;
      p.k_factor[1] = 1;
      p.k_dims[1] = c.d_k1;
      p.v_factor = c.v_in_key ? 0 : (c.d_k1 > 0 ? 2 : 1);
      p.d_v = c.d_v;
      p.scale = 1.f / std::sqrt(static_cast<float>(c.d_k0 + c.d_k1));
      p.kv = cache.view(seq, 0);
      tpa::grouped_attention<tpa::Native>(ctx, &p, 1);
    }
  }
  return o;
}

struct Err {
  double l2 = 0, max = 0;
};
Err compare(const std::vector<float>& o, const std::vector<float>& ref) {
  double num2 = 0, den2 = 0, num = 0, den = 0;
  for (std::size_t i = 0; i < ref.size(); ++i) {
    const double d = static_cast<double>(o[i]) - ref[i];
    num2 += d * d;
    den2 += static_cast<double>(ref[i]) * ref[i];
    num = std::max(num, std::abs(d));
    den = std::max(den, std::abs(static_cast<double>(ref[i])));
  }
  return Err{std::sqrt(num2 / den2), num / den};
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<Index> contexts = {1024, 16384, 32768};
  bool ablate = false;
  std::string only;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--ablate") == 0) {
      ablate = true;
      continue;
    }
    if (std::strcmp(argv[i], "--kind") == 0 && i + 1 < argc) {
      only = argv[++i];
      continue;
    }
    if (std::strcmp(argv[i], "--contexts") == 0 && i + 1 < argc) {
      contexts.clear();
      std::string s = argv[++i];
      for (std::size_t pos = 0; pos <= s.size();) {
        const std::size_t end = std::min(s.find(',', pos), s.size());
        contexts.push_back(std::stol(s.substr(pos, end - pos)));
        pos = end + 1;
      }
    } else {
      std::fprintf(stderr,
                   "usage: cache_accuracy [--contexts 1024,16384,32768] [--kind NAME] "
                   "[--ablate]\n");
      return 2;
    }
  }
  std::printf("Decode attention output vs the f32 cache, N(0,1) factors and queries, %ld queries "
              "per case (rel_l2 = |o - o_f32|_2 / |o_f32|_2, rel_max = max|o - o_f32| / "
              "max|o_f32|)\n\n",
              static_cast<long>(kQueries));
  std::printf("| kind | context | cache | bytes/token | rel_l2 | rel_max |\n");
  std::printf("|---|---:|---|---:|---:|---:|\n");
  for (const Case& c : kCases) {
    if (!only.empty() && only != c.name) continue;
    const auto f = factors(c);
    for (Index len : contexts) {
      std::vector<std::vector<float>> src(f.size());
      for (std::size_t i = 0; i < f.size(); ++i) {
        src[i].resize(static_cast<std::size_t>(len * f[i].elements()));
        normal(src[i].data(), src[i].size(), 100 + i);
      }
      const Index q_size =
          c.tpa() && c.r_q > 0 ? c.r_q * (c.H + c.d_k0) : c.H * (c.d_k0 + c.d_k1);
      std::vector<float> q(static_cast<std::size_t>(kQueries * q_size));
      normal(q.data(), q.size(), 7);
      std::size_t bpt = 0;
      const std::vector<float> ref = attend<float>(c, len, src, q, &bpt);
      auto row = [&](const char* name, const std::vector<float>& o, std::size_t bytes) {
        const Err e = compare(o, ref);
        std::printf("| %s | %ldK | %s | %zu | %.2e | %.2e |\n", c.name,
                    static_cast<long>(len / 1024), name, bytes, e.l2, e.max);
        std::fflush(stdout);
      };
      std::size_t b = 0;
      std::vector<float> o = attend<tpa::bfloat16>(c, len, src, q, &b);
      row("bf16", o, b);
      o = attend<tpa::half>(c, len, src, q, &b);
      row("f16", o, b);
      o = attend<tpa::q8>(c, len, src, q, &b);
      row("int8", o, b);
      for (float v : o)
        if (!std::isfinite(v)) {
          std::fprintf(stderr, "error: non-finite output\n");
          return 1;
        }
      // Formats simulated in an f32 cache (one SimFormat per factor).
      auto sim_row = [&](const std::string& name, const std::vector<SimFormat>& fmt) {
        std::vector<std::vector<float>> s = src;
        std::size_t bytes = 0, unused = 0;
        for (std::size_t i = 0; i < f.size(); ++i) {
          simulate(f[i], fmt[i], len, s[i].data());
          bytes += sim_bytes(f[i], fmt[i]);
        }
        row(name.c_str(), attend<float>(c, len, s, q, &unused), bytes);
      };
      const SimFormat i8{}, f32{127, 0, false, true};
      if (ablate) {
        sim_row("sim int8", std::vector<SimFormat>(f.size(), i8));
        for (std::size_t j = 0; j < f.size(); ++j) {
          std::vector<SimFormat> one(f.size(), f32);
          one[j] = i8;
          sim_row("sim int8 " + f[j].name + " only", one);
        }
        for (std::size_t j = 0; j < f.size(); ++j) {
          std::vector<SimFormat> one(f.size(), i8);
          one[j] = f32;
          sim_row("sim int8, f32 " + f[j].name, one);
        }
        const SimFormat i8_mse{127, 0, true, false};
        sim_row("sim int8 mse scales", std::vector<SimFormat>(f.size(), i8_mse));
        if (c.tpa()) {  // A factors [H, R] (groups: elements), B rows [R, d] (groups per row)
          for (Index ga : {Index{0}, Index{16}, Index{8}, Index{-1}})
            for (Index gb : {Index{0}, Index{64}, Index{32}}) {
              if (ga == 0 && gb == 0) continue;
              std::vector<SimFormat> fx(f.size(), i8);
              for (std::size_t j = 0; j < f.size(); ++j) {
                const Index g = f[j].cols < tpa::kQ8MinRowCols ? ga : gb;
                if (g < 0) fx[j].qmax = 0; else fx[j].group = g;
              }
              const std::string a = ga < 0 ? "f16" : ga == 0 ? "token" : "g" + std::to_string(ga);
              const std::string b = gb == 0 ? "row" : "g" + std::to_string(gb);
              sim_row("sim int8 A " + a + " B " + b, fx);
            }
        }
        const SimFormat i4_mse{7, 32, true, false};
        sim_row("sim 4-bit g32 mse", std::vector<SimFormat>(f.size(), i4_mse));
      }
      const SimFormat i4{7, 32, false, false};
      sim_row("sim 4-bit g32", std::vector<SimFormat>(f.size(), i4));
    }
  }
  return 0;
}
