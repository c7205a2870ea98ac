// Layer weights from / to safetensors checkpoints, by the names of the reference PyTorch code
// (SPEC.md) under a per-layer prefix such as "transformer.h.3.attn.".
//
//   auto file = tpa::io::SafetensorsFile::open("model.safetensors");
//   tpa::TpaWeights w = tpa::io::load_tpa_weights(file, "transformer.h.3.attn.", cfg);
//   tpa::TensorProductAttention<> attn(cfg, std::move(w));
//
//   tpa::io::SafetensorsWriter out;
//   tpa::io::save_tpa_weights(out, "transformer.h.3.attn.", cfg, attn.weights(), DType::kBF16);
//   out.write("copy.safetensors");
//
// Names relative to the prefix (the library names):
//   MHA / GQA / MQA  c_q.weight, c_k.weight, c_v.weight, c_proj.weight; subln.weight iff head_norm
//   TPA              c_qkv.W_A_q.weight, c_qkv.W_A_k.weight, c_qkv.W_A_v.weight,
//                    c_qkv.W_B_q.weight, c_qkv.W_B_k.weight, c_qkv.W_B_v.weight, c_proj.weight;
//                    K/V-only: c_qkv.c_q.weight instead of the two query factors;
//                    subln.weight iff head_norm
//   MLA              q_a_proj.weight, q_a_layernorm.weight, q_b_proj.weight (q_lora_rank > 0) or
//                    q_proj.weight (q_lora_rank == 0); kv_a_proj_with_mqa.weight,
//                    kv_a_layernorm.weight, kv_b_proj.weight, c_proj.weight
//   every kind       sinks [H] iff variant.sinks (GPT-OSS's name for the attention sinks)
// A NameMap renames some of them for checkpoints that spell them differently (e.g.
// t6_infer_names() for model/T6_infer.py).
#pragma once

#include <algorithm>
#include <map>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "tpa/core/config.hpp"
#include "tpa/core/error.hpp"
#include "tpa/core/tensor.hpp"
#include "tpa/io/safetensors.hpp"
#include "tpa/layers/gqa_weights.hpp"
#include "tpa/layers/mla_weights.hpp"
#include "tpa/layers/tpa_weights.hpp"

namespace tpa::io {

/// Library weight name (e.g. "c_proj.weight") -> name in the checkpoint, both relative to the
/// prefix. Names not in the map are used as they are.
using NameMap = std::map<std::string, std::string>;

/// How a loader matches a checkpoint.
struct LoadOptions {
  NameMap names;  ///< renames (see NameMap)
  /// false: every tensor under the prefix must be one the layer uses (anything else is reported
  /// as unexpected). true: other tensors under the prefix are ignored, e.g. a file that also
  /// holds inputs and reference outputs next to the weights.
  bool allow_unused = false;
};

/// The names of `model/T6_infer.py`'s TPA module: the factor weights without the `c_qkv.`
/// prefix ("W_A_q.weight" …) and the output projection "wo.weight".
inline NameMap t6_infer_names() {
  NameMap m;
  for (const char* f : {"W_A_q", "W_A_k", "W_A_v", "W_B_q", "W_B_k", "W_B_v"})
    m[std::string("c_qkv.") + f + ".weight"] = std::string(f) + ".weight";
  m["c_proj.weight"] = "wo.weight";
  return m;
}

namespace detail {

/// One weight of a layer: its library name, where it lives, and the shape the config implies.
/// Exactly one of `matrix` and `vector` is set; a vector's shape is [rows].
template <class Weights>
struct Slot {
  using M = std::conditional_t<std::is_const<Weights>::value, const Matrix<float>, Matrix<float>>;
  using V =
      std::conditional_t<std::is_const<Weights>::value, const Eigen::VectorXf, Eigen::VectorXf>;
  std::string name;
  M* matrix = nullptr;
  V* vector = nullptr;
  Index rows = 0, cols = 0;

  std::vector<Index> shape() const {
    return matrix != nullptr ? std::vector<Index>{rows, cols} : std::vector<Index>{rows};
  }
};

/// The weights a config uses, plus the names of its kind that the config leaves out with the
/// reason (for the "unexpected tensor" message).
template <class Weights>
struct SlotList {
  std::vector<Slot<Weights>> used;
  std::vector<std::pair<std::string, std::string>> unused;  // library name, why it is unused

  void matrix(const char* name, typename Slot<Weights>::M& m, Index rows, Index cols) {
    used.push_back({name, &m, nullptr, rows, cols});
  }
  void vector(const char* name, typename Slot<Weights>::V& v, Index n) {
    used.push_back({name, nullptr, &v, n, 0});
  }
};

/// The attention sinks `sinks` [H] (GPT-OSS's name), a slot iff the variant uses them.
template <class W, class V>
void sink_slot(SlotList<W>& s, const AttentionVariant& v, V& sinks, Index H) {
  if (v.sinks) {
    s.vector("sinks", sinks, H);
  } else {
    s.unused.emplace_back("sinks", "used only with variant.sinks = true");
  }
}

template <class W>  // GqaWeights or const GqaWeights
SlotList<W> slots(const GqaConfig& c, W& w) {
  SlotList<W> s;
  const Index H = c.n_heads, G = c.kv_heads(), d = c.head_dim, D = c.d_model;
  s.matrix("c_q.weight", w.c_q, H * d, D);
  s.matrix("c_k.weight", w.c_k, G * d, D);
  s.matrix("c_v.weight", w.c_v, G * d, D);
  s.matrix("c_proj.weight", w.c_proj, D, H * d);
  if (c.head_norm) {
    s.vector("subln.weight", w.subln, d);
  } else {
    s.unused.emplace_back("subln.weight", "used only with head_norm = true");
  }
  sink_slot(s, c.variant, w.sinks, H);
  return s;
}

template <class W>  // TpaWeights or const TpaWeights
SlotList<W> slots(const TpaConfig& c, W& w) {
  SlotList<W> s;
  const Index H = c.n_heads, d = c.head_dim, D = c.d_model;
  if (c.kv_only) {
    s.matrix("c_qkv.c_q.weight", w.c_q, H * d, D);
    s.unused.emplace_back("c_qkv.W_A_q.weight", "kv_only = true uses c_qkv.c_q.weight");
    s.unused.emplace_back("c_qkv.W_B_q.weight", "kv_only = true uses c_qkv.c_q.weight");
  } else {
    s.matrix("c_qkv.W_A_q.weight", w.W_A_q, H * c.q_rank, D);
    s.unused.emplace_back("c_qkv.c_q.weight", "used only with kv_only = true");
  }
  s.matrix("c_qkv.W_A_k.weight", w.W_A_k, H * c.k_rank, D);
  s.matrix("c_qkv.W_A_v.weight", w.W_A_v, H * c.v_rank, D);
  if (!c.kv_only) s.matrix("c_qkv.W_B_q.weight", w.W_B_q, c.q_rank * d, D);
  s.matrix("c_qkv.W_B_k.weight", w.W_B_k, c.k_rank * d, D);
  s.matrix("c_qkv.W_B_v.weight", w.W_B_v, c.v_rank * d, D);
  s.matrix("c_proj.weight", w.c_proj, D, H * d);
  if (c.head_norm) {
    s.vector("subln.weight", w.subln, d);
  } else {
    s.unused.emplace_back("subln.weight", "used only with head_norm = true");
  }
  sink_slot(s, c.variant, w.sinks, H);
  return s;
}

template <class W>  // MlaWeights or const MlaWeights
SlotList<W> slots(const MlaConfig& c, W& w) {
  SlotList<W> s;
  const Index D = c.d_model, H = c.n_heads, d_cq = c.q_lora_rank, d_c = c.kv_lora_rank;
  const Index d_qk = c.qk_head_dim(), d_R = c.qk_rope_head_dim, d_n = c.qk_nope_head_dim;
  const Index d_v = c.v_head_dim;
  if (d_cq > 0) {
    s.matrix("q_a_proj.weight", w.q_a_proj, d_cq, D);
    s.vector("q_a_layernorm.weight", w.q_a_layernorm, d_cq);
    s.matrix("q_b_proj.weight", w.q_b_proj, H * d_qk, d_cq);
    s.unused.emplace_back("q_proj.weight", "used only with q_lora_rank = 0");
  } else {
    s.matrix("q_proj.weight", w.q_proj, H * d_qk, D);
    for (const char* n : {"q_a_proj.weight", "q_a_layernorm.weight", "q_b_proj.weight"})
      s.unused.emplace_back(n, "used only with q_lora_rank > 0");
  }
  s.matrix("kv_a_proj_with_mqa.weight", w.kv_a_proj_with_mqa, d_c + d_R, D);
  s.vector("kv_a_layernorm.weight", w.kv_a_layernorm, d_c);
  s.matrix("kv_b_proj.weight", w.kv_b_proj, H * (d_n + d_v), d_c);
  s.matrix("c_proj.weight", w.c_proj, D, H * d_v);
  sink_slot(s, c.variant, w.sinks, H);
  return s;
}

/// "" stays ""; any other prefix gets a trailing '.' if it has none, so that "h.1" cannot match
/// the tensors of "h.10".
inline std::string normalize_prefix(const std::string& prefix) {
  if (prefix.empty() || prefix.back() == '.') return prefix;
  return prefix + '.';
}

inline std::string file_name(const std::string& prefix, const LoadOptions& opt,
                             const std::string& lib_name) {
  const auto it = opt.names.find(lib_name);
  return prefix + (it == opt.names.end() ? lib_name : it->second);
}

/// Fills the used slots of `s` from `f`, or throws one tpa::Error listing every missing,
/// mis-shaped and unexpected tensor by its full name. Nothing is written to the slots unless
/// all of them match.
template <class W>
void load_slots(const char* who, const SafetensorsFile& f, const std::string& prefix,
                const LoadOptions& opt, const SlotList<W>& s) {
  std::vector<std::string> problems;
  std::vector<std::string> expected;
  for (const auto& slot : s.used) {
    const std::string name = file_name(prefix, opt, slot.name);
    expected.push_back(name);
    const std::vector<Index> want = slot.shape();
    if (!f.contains(name)) {
      problems.push_back(tpa::detail::concat("missing tensor '", name, "' (expected shape ",
                                             shape_string(want), ")"));
    } else if (f.info(name).shape != want) {
      problems.push_back(tpa::detail::concat("tensor '", name, "' has shape ",
                                             shape_string(f.info(name).shape), ", expected ",
                                             shape_string(want)));
    }
  }
  if (!opt.allow_unused) {
    for (const std::string& name : f.names()) {
      if (name.compare(0, prefix.size(), prefix) != 0) continue;
      if (std::find(expected.begin(), expected.end(), name) != expected.end()) continue;
      std::string why;
      for (const auto& u : s.unused)
        if (file_name(prefix, opt, u.first) == name) why = " (" + u.second + ")";
      problems.push_back(tpa::detail::concat("unexpected tensor '", clip(name), "' ",
                                             shape_string(f.info(name).shape), why));
    }
  }
  if (!problems.empty()) {
    constexpr std::size_t kMaxListed = 32;
    std::string msg = tpa::detail::concat(
        who, ": checkpoint does not match the config under prefix '", clip(prefix), "' (",
        problems.size(), " problem", problems.size() == 1 ? "" : "s", "):");
    for (std::size_t i = 0; i < problems.size() && i < kMaxListed; ++i) msg += "\n  " + problems[i];
    if (problems.size() > kMaxListed)
      msg += tpa::detail::concat("\n  ... and ", problems.size() - kMaxListed, " more");
    throw Error(msg);
  }
  for (const auto& slot : s.used) {
    const std::string name = file_name(prefix, opt, slot.name);
    if (slot.matrix != nullptr) {
      slot.matrix->resize(slot.rows, slot.cols);
      f.read_into(name, slot.matrix->data(), slot.matrix->size());
    } else {
      slot.vector->resize(slot.rows);
      f.read_into(name, slot.vector->data(), slot.vector->size());
    }
  }
}

template <class W>
void save_slots(SafetensorsWriter& out, const std::string& prefix, const NameMap& names,
                DType dtype, const SlotList<W>& s) {
  const LoadOptions opt{names, false};
  const std::size_t before = out.size();
  try {
    for (const auto& slot : s.used) {
      const float* data = slot.matrix != nullptr ? slot.matrix->data() : slot.vector->data();
      out.add(file_name(prefix, opt, slot.name), dtype, slot.shape(), data);
    }
  } catch (...) {
    out.truncate(before);  // all of the layer's tensors or none
    throw;
  }
}

/// What load_gqa_weights, load_tpa_weights and load_mla_weights do, named `who` in errors:
/// validates cfg, then reads the weights it needs (load_slots). \throws as they do.
template <class W, class Cfg>
W load_layer(const char* who, const SafetensorsFile& f, const std::string& prefix, const Cfg& cfg,
             const LoadOptions& opt) {
  cfg.validate(who);
  W w;
  load_slots(who, f, normalize_prefix(prefix), opt, slots(cfg, w));
  return w;
}

/// What save_gqa_weights, save_tpa_weights and save_mla_weights do, named `who` in errors:
/// validates cfg, checks w against it, then adds the weights it uses (save_slots). \throws as
/// they do.
template <class Cfg, class W>
void save_layer(const char* who, SafetensorsWriter& out, const std::string& prefix, const Cfg& cfg,
                const W& w, DType dtype, const NameMap& names) {
  cfg.validate(who);
  w.check(cfg, who);
  save_slots(out, normalize_prefix(prefix), names, dtype, slots(cfg, w));
}

}  // namespace detail

/// \brief Weights of a MHA / GQA / MQA layer from the tensors named `prefix` + c_q.weight, …
/// (SPEC.md), converted to float from F32, BF16 or F16.
/// \param prefix e.g. "transformer.h.3.attn." ("" for none; a missing trailing '.' is added).
/// \param cfg the config the layer will be built with; the shapes follow cfg.kv_heads(), so an
/// MQA layer's config needs n_kv_heads = 1 here.
/// \throws Error if the config is invalid, or listing by full name every tensor the config needs
/// that is missing or has another shape, and (unless opt.allow_unused) every other tensor under
/// the prefix.
inline GqaWeights load_gqa_weights(const SafetensorsFile& file, const std::string& prefix,
                                   const GqaConfig& cfg, const LoadOptions& opt = {}) {
  return detail::load_layer<GqaWeights>("load_gqa_weights", file, prefix, cfg, opt);
}

/// \brief Weights of a TensorProductAttention layer (T6 or K/V-only, per cfg.kv_only) from the
/// tensors named `prefix` + c_qkv.W_A_q.weight, …; as load_gqa_weights.
inline TpaWeights load_tpa_weights(const SafetensorsFile& file, const std::string& prefix,
                                   const TpaConfig& cfg, const LoadOptions& opt = {}) {
  return detail::load_layer<TpaWeights>("load_tpa_weights", file, prefix, cfg, opt);
}

/// \brief Weights of a MultiHeadLatentAttention layer from the tensors named `prefix` +
/// q_a_proj.weight, … (or q_proj.weight when cfg.q_lora_rank == 0); as load_gqa_weights.
inline MlaWeights load_mla_weights(const SafetensorsFile& file, const std::string& prefix,
                                   const MlaConfig& cfg, const LoadOptions& opt = {}) {
  return detail::load_layer<MlaWeights>("load_mla_weights", file, prefix, cfg, opt);
}

/// The loader of the config's kind (for code generic over the layer type, whose `Config` picks
/// the overload).
inline GqaWeights load_weights(const SafetensorsFile& file, const std::string& prefix,
                               const GqaConfig& cfg, const LoadOptions& opt = {}) {
  return load_gqa_weights(file, prefix, cfg, opt);
}
inline TpaWeights load_weights(const SafetensorsFile& file, const std::string& prefix,
                               const TpaConfig& cfg, const LoadOptions& opt = {}) {
  return load_tpa_weights(file, prefix, cfg, opt);
}
inline MlaWeights load_weights(const SafetensorsFile& file, const std::string& prefix,
                               const MlaConfig& cfg, const LoadOptions& opt = {}) {
  return load_mla_weights(file, prefix, cfg, opt);
}

/// \brief Adds the weights a GQA-family config uses to `out` under `prefix` (normalized as by
/// the loader), named as load_gqa_weights reads them, stored as `dtype` (F16/BF16 round to
/// nearest even). `names` renames as for loading.
/// \throws Error if the config is invalid, a weight's shape does not match it, or a name is
/// already in `out`; `out` is then unchanged (none of the layer's tensors are added).
inline void save_gqa_weights(SafetensorsWriter& out, const std::string& prefix,
                             const GqaConfig& cfg, const GqaWeights& w, DType dtype = DType::kF32,
                             const NameMap& names = {}) {
  detail::save_layer("save_gqa_weights", out, prefix, cfg, w, dtype, names);
}

/// As save_gqa_weights, for TensorProductAttention (only the query weights cfg.kv_only selects).
inline void save_tpa_weights(SafetensorsWriter& out, const std::string& prefix,
                             const TpaConfig& cfg, const TpaWeights& w, DType dtype = DType::kF32,
                             const NameMap& names = {}) {
  detail::save_layer("save_tpa_weights", out, prefix, cfg, w, dtype, names);
}

/// As save_gqa_weights, for MultiHeadLatentAttention (only the query path cfg selects).
inline void save_mla_weights(SafetensorsWriter& out, const std::string& prefix,
                             const MlaConfig& cfg, const MlaWeights& w, DType dtype = DType::kF32,
                             const NameMap& names = {}) {
  detail::save_layer("save_mla_weights", out, prefix, cfg, w, dtype, names);
}

/// The saver of the config's kind.
inline void save_weights(SafetensorsWriter& out, const std::string& prefix, const GqaConfig& cfg,
                         const GqaWeights& w, DType dtype = DType::kF32,
                         const NameMap& names = {}) {
  save_gqa_weights(out, prefix, cfg, w, dtype, names);
}
inline void save_weights(SafetensorsWriter& out, const std::string& prefix, const TpaConfig& cfg,
                         const TpaWeights& w, DType dtype = DType::kF32,
                         const NameMap& names = {}) {
  save_tpa_weights(out, prefix, cfg, w, dtype, names);
}
inline void save_weights(SafetensorsWriter& out, const std::string& prefix, const MlaConfig& cfg,
                         const MlaWeights& w, DType dtype = DType::kF32,
                         const NameMap& names = {}) {
  save_mla_weights(out, prefix, cfg, w, dtype, names);
}

}  // namespace tpa::io
