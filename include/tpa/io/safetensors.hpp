// safetensors reader (memory-mapped or in-memory, validated as untrusted input) and writer.
//
// Format: u64 little-endian header length N, N bytes of UTF-8 JSON mapping tensor names to
// {"dtype", "shape", "data_offsets": [begin, end]} plus an optional "__metadata__" object of
// string -> string, then the data section. Offsets are relative to the data section, which must
// be covered exactly by the tensors (no gaps, no overlaps, no trailing bytes). The reader rejects
// a header that contains a NUL byte anywhere (the format pads the header with spaces; NUL is
// not JSON, though the JSON parser would stop at one after the value), naming its offset.
#pragma once

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "tpa/core/error.hpp"
#include "tpa/core/tensor.hpp"

namespace tpa::io {

/// Element types tpa reads and writes. All are little-endian on disk.
enum class DType { kF32, kF16, kBF16 };

/// The safetensors spelling of a dtype: "F32", "F16", "BF16".
inline const char* dtype_name(DType d) {
  switch (d) {
    case DType::kF32:
      return "F32";
    case DType::kF16:
      return "F16";
    case DType::kBF16:
      return "BF16";
  }
  return "?";
}

/// Bytes per element: 4 for F32, 2 for F16 and BF16.
inline std::size_t dtype_size(DType d) { return d == DType::kF32 ? 4 : 2; }

/// One validated header entry.
struct TensorInfo {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<Index> shape;  ///< Empty for a scalar.
  std::size_t begin = 0;     ///< Byte offsets within the data section, [begin, end).
  std::size_t end = 0;

  /// Product of the shape (1 for a scalar).
  Index numel() const {
    Index n = 1;
    for (Index d : shape) n *= d;
    return n;
  }
};

namespace detail {

/// Largest header accepted, as in the reference implementation.
constexpr std::uint64_t kMaxHeaderBytes = 100'000'000;
/// Deepest JSON nesting accepted; a valid header needs 3 (object -> entry -> shape).
constexpr int kMaxJsonDepth = 64;

inline std::string shape_string(const std::vector<Index>& shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

/// Bounds text taken from a file before it goes into an error message (cut at a UTF-8 boundary).
inline std::string clip(const std::string& s, std::size_t max = 200) {
  if (s.size() <= max) return s;
  std::size_t n = max;
  while (n > 0 && (static_cast<unsigned char>(s[n]) & 0xC0) == 0x80) --n;
  return s.substr(0, n) + "...";
}

inline std::string clip(const nlohmann::json& j) { return clip(j.dump()); }

inline std::uint16_t load_u16(const std::uint8_t* p) {
  return static_cast<std::uint16_t>(p[0] | (p[1] << 8));
}

inline std::uint32_t load_u32(const std::uint8_t* p) {
  return static_cast<std::uint32_t>(p[0]) | (static_cast<std::uint32_t>(p[1]) << 8) |
         (static_cast<std::uint32_t>(p[2]) << 16) | (static_cast<std::uint32_t>(p[3]) << 24);
}

inline std::uint64_t load_u64(const std::uint8_t* p) {
  return static_cast<std::uint64_t>(load_u32(p)) |
         (static_cast<std::uint64_t>(load_u32(p + 4)) << 32);
}

inline void store_u16(std::uint8_t* p, std::uint16_t v) {
  p[0] = static_cast<std::uint8_t>(v);
  p[1] = static_cast<std::uint8_t>(v >> 8);
}

inline void store_u32(std::uint8_t* p, std::uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<std::uint8_t>(v >> (8 * i));
}

inline void store_u64(std::uint8_t* p, std::uint64_t v) {
  for (int i = 0; i < 8; ++i) p[i] = static_cast<std::uint8_t>(v >> (8 * i));
}

/// Owns the bytes of a SafetensorsFile: either a vector or a read-only private mapping.
class Bytes {
 public:
  explicit Bytes(std::vector<std::uint8_t> v)
      : vec_(std::move(v)), data_(vec_.data()), size_(vec_.size()) {}
  Bytes(void* map, std::size_t len)
      : map_(map), data_(static_cast<const std::uint8_t*>(map)), size_(len) {}
  Bytes(const Bytes&) = delete;
  Bytes& operator=(const Bytes&) = delete;
  ~Bytes() {
    if (map_ != nullptr) ::munmap(map_, size_);
  }
  const std::uint8_t* data() const { return data_; }
  std::size_t size() const { return size_; }

 private:
  std::vector<std::uint8_t> vec_;
  void* map_ = nullptr;
  const std::uint8_t* data_;
  std::size_t size_;
};

inline const char* json_type_name(const nlohmann::json& j) { return j.type_name(); }

/// SAX pass over the header: rejects duplicate keys in any object and excessive nesting, and
/// turns syntax errors into tpa::Error. The DOM is built by a second, plain parse.
class HeaderChecker : public nlohmann::json::json_sax_t {
 public:
  explicit HeaderChecker(const std::string& where) : where_(where) {}

  bool null() override { return true; }
  bool boolean(bool) override { return true; }
  bool number_integer(number_integer_t) override { return true; }
  bool number_unsigned(number_unsigned_t) override { return true; }
  bool number_float(number_float_t, const string_t&) override { return true; }
  bool string(string_t&) override { return true; }
  bool binary(binary_t&) override { return true; }
  bool start_object(std::size_t) override {
    enter();
    keys_.emplace_back();
    return true;
  }
  bool key(string_t& k) override {
    if (!keys_.back().insert(k).second) {
      tpa::detail::fail(where_, ": header JSON has duplicate key '", clip(k), "'", context(),
                        " (duplicate keys are rejected)");
    }
    return true;
  }
  bool end_object() override {
    keys_.pop_back();
    --depth_;
    return true;
  }
  bool start_array(std::size_t) override {
    enter();
    return true;
  }
  bool end_array() override {
    --depth_;
    return true;
  }
  bool parse_error(std::size_t, const std::string&, const nlohmann::json::exception& ex) override {
    tpa::detail::fail(where_, ": header is not valid JSON: ", clip(ex.what(), 300));
  }

 private:
  void enter() {
    if (++depth_ > kMaxJsonDepth)
      tpa::detail::fail(where_, ": header JSON is nested deeper than ", kMaxJsonDepth, " levels");
  }
  std::string context() const {
    // Depth 1 is the top-level object; deeper keys belong to an entry (or __metadata__).
    return keys_.size() == 1 ? std::string(" at the top level") : std::string(" inside an entry");
  }

  const std::string& where_;
  int depth_ = 0;
  std::vector<std::set<std::string>> keys_;
};

/// Reads a non-negative JSON integer into `out`; false if `j` is not one.
inline bool get_size(const nlohmann::json& j, std::uint64_t& out) {
  if (j.is_number_unsigned()) {
    out = j.get<std::uint64_t>();
    return true;
  }
  if (j.is_number_integer() && j.get<std::int64_t>() >= 0) {
    out = static_cast<std::uint64_t>(j.get<std::int64_t>());
    return true;
  }
  return false;
}

}  // namespace detail

/// A validated safetensors file. Tensors are decoded on demand from the underlying bytes
/// (mapped read-only or held in memory). Movable, not copyable.
///
/// Every function throws tpa::Error, with the file (or "<memory>") and the rule in the message,
/// for malformed input or misuse. Duplicate JSON keys are rejected, not resolved. Extra keys
/// inside an entry are ignored.
class SafetensorsFile {
 public:
  /// Maps `path` read-only and validates it. Throws tpa::Error if it cannot be opened or is
  /// malformed. The file must not be truncated while the object is alive (that raises SIGBUS,
  /// as with any mapping).
  static SafetensorsFile open(const std::string& path) {
    const std::string where = "safetensors file '" + path + "'";
    // O_NONBLOCK: opening a FIFO must not wait for a writer; it is rejected below.
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) tpa::detail::fail(where, ": cannot open: ", std::strerror(errno));
    struct FdCloser {
      int fd;
      ~FdCloser() { ::close(fd); }
    } closer{fd};
    struct stat st {};
    if (::fstat(fd, &st) != 0) tpa::detail::fail(where, ": cannot stat: ", std::strerror(errno));
    if (!S_ISREG(st.st_mode)) tpa::detail::fail(where, ": not a regular file");
    const auto size = static_cast<std::uint64_t>(st.st_size);
    if (size < 8) {
      tpa::detail::fail(where, ": file is ", size, " bytes, shorter than the 8-byte header length");
    }
    if (size > std::numeric_limits<std::size_t>::max())
      tpa::detail::fail(where, ": file too large to map");
    void* map = ::mmap(nullptr, static_cast<std::size_t>(size), PROT_READ, MAP_PRIVATE, fd, 0);
    if (map == MAP_FAILED) tpa::detail::fail(where, ": cannot mmap: ", std::strerror(errno));
    std::unique_ptr<detail::Bytes> bytes;
    try {
      bytes = std::make_unique<detail::Bytes>(map, static_cast<std::size_t>(size));
    } catch (...) {
      ::munmap(map, static_cast<std::size_t>(size));
      throw;
    }
    return SafetensorsFile(where, std::move(bytes));
  }

  /// Validates an in-memory file. Throws tpa::Error if malformed.
  static SafetensorsFile from_bytes(std::vector<std::uint8_t> bytes) {
    return SafetensorsFile("safetensors buffer '<memory>'",
                           std::make_unique<detail::Bytes>(std::move(bytes)));
  }

  SafetensorsFile(SafetensorsFile&&) noexcept = default;
  SafetensorsFile& operator=(SafetensorsFile&&) noexcept = default;
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  /// Tensor names in sorted order (excludes "__metadata__").
  std::vector<std::string> names() const {
    std::vector<std::string> out;
    out.reserve(tensors_.size());
    for (const auto& kv : tensors_) out.push_back(kv.first);
    return out;
  }

  bool contains(const std::string& name) const { return tensors_.count(name) != 0; }

  /// Header entry of `name`. Throws tpa::Error naming it if absent.
  const TensorInfo& info(const std::string& name) const {
    auto it = tensors_.find(name);
    if (it == tensors_.end()) {
      tpa::detail::fail(where_, ": no tensor named '", name, "' (", tensors_.size(),
                        " tensors in file)");
    }
    return it->second;
  }

  /// The "__metadata__" map (empty if absent).
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

  /// One metadata value. Throws tpa::Error naming the key if absent.
  const std::string& metadata_value(const std::string& key) const {
    auto it = metadata_.find(key);
    if (it == metadata_.end()) tpa::detail::fail(where_, ": no metadata key '", key, "'");
    return it->second;
  }

  /// All elements of `name` converted to float, in row-major order.
  std::vector<float> read_f32(const std::string& name) const {
    const TensorInfo& ti = info(name);
    std::vector<float> out(static_cast<std::size_t>(ti.numel()));
    decode(ti, out.data());
    return out;
  }

  /// Reads `name` as a rank-N tensor. Throws tpa::Error if its rank is not N.
  template <int N>
  Tensor<float, N> tensor(const std::string& name) const {
    static_assert(N >= 0, "rank must be non-negative");
    const TensorInfo& ti = info(name);
    TPA_CHECK(ti.shape.size() == static_cast<std::size_t>(N), where_, ": tensor '", name,
              "' has shape ", detail::shape_string(ti.shape), " (rank ", ti.shape.size(),
              "), requested rank ", N);
    Eigen::array<Index, N> dims;
    for (int i = 0; i < N; ++i)
      dims[static_cast<std::size_t>(i)] = ti.shape[static_cast<std::size_t>(i)];
    Tensor<float, N> t(dims);
    decode(ti, t.data());
    return t;
  }

  /// Reads a rank-2 tensor as a row-major matrix [shape[0], shape[1]]. Throws if rank != 2.
  Matrix<float> matrix(const std::string& name) const {
    const TensorInfo& ti = info(name);
    TPA_CHECK(ti.shape.size() == 2, where_, ": tensor '", name, "' has shape ",
              detail::shape_string(ti.shape), " (rank ", ti.shape.size(),
              "), a matrix needs rank 2");
    Matrix<float> m(ti.shape[0], ti.shape[1]);
    decode(ti, m.data());
    return m;
  }

  /// Converts `name` to float into dst[0, count). Throws unless count == numel.
  void read_into(const std::string& name, float* dst, Index count) const {
    const TensorInfo& ti = info(name);
    TPA_CHECK(count == ti.numel(), where_, ": tensor '", name, "' has shape ",
              detail::shape_string(ti.shape), " (", ti.numel(),
              " elements) but the destination holds ", count);
    TPA_CHECK(dst != nullptr || count == 0, where_, ": tensor '", name, "': null destination");
    decode(ti, dst);
  }

 private:
  SafetensorsFile(std::string where, std::unique_ptr<detail::Bytes> bytes)
      : where_(std::move(where)), bytes_(std::move(bytes)) {
    parse();
  }

  // Writes ti.numel() floats to dst. Bounds were checked in parse().
  void decode(const TensorInfo& ti, float* dst) const {
    const std::size_t n = static_cast<std::size_t>(ti.numel());
    if (n == 0) return;
    const std::uint8_t* src = data_ + ti.begin;
    switch (ti.dtype) {
      case DType::kF32:
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
        std::memcpy(dst, src, n * 4);
#else
        for (std::size_t i = 0; i < n; ++i) {
          const std::uint32_t bits = detail::load_u32(src + 4 * i);
          std::memcpy(dst + i, &bits, 4);
        }
#endif
        break;
      case DType::kF16:
        for (std::size_t i = 0; i < n; ++i) {
          dst[i] = static_cast<float>(Eigen::numext::bit_cast<half>(detail::load_u16(src + 2 * i)));
        }
        break;
      case DType::kBF16:
        for (std::size_t i = 0; i < n; ++i) {
          dst[i] =
              static_cast<float>(Eigen::numext::bit_cast<bfloat16>(detail::load_u16(src + 2 * i)));
        }
        break;
    }
  }

  template <class... Args>
  [[noreturn]] void fail(Args&&... args) const {
    tpa::detail::fail(where_, ": ", std::forward<Args>(args)...);
  }

  void parse() {
    const std::uint8_t* base = bytes_->data();
    const std::size_t size = bytes_->size();
    if (size < 8) fail("file is ", size, " bytes, shorter than the 8-byte header length");
    const std::uint64_t n = detail::load_u64(base);
    if (n > detail::kMaxHeaderBytes) {
      fail("header length ", n, " exceeds the limit of ", detail::kMaxHeaderBytes, " bytes");
    }
    if (n > size - 8) {
      fail("header length ", n, " is larger than the ", size - 8,
           " bytes that follow the length prefix");
    }
    const char* hbegin = reinterpret_cast<const char*>(base + 8);
    const char* hend = hbegin + n;
    data_ = base + 8 + n;
    data_size_ = size - 8 - static_cast<std::size_t>(n);

    // NUL is never valid JSON (inside a string it must be escaped), but the JSON parser stops
    // at one after the value, so padding with NULs instead of spaces was accepted.
    if (const void* nul = std::memchr(hbegin, 0, static_cast<std::size_t>(n))) {
      const auto at = static_cast<std::size_t>(static_cast<const char*>(nul) - hbegin);
      fail("header contains a NUL byte at header offset ", at, " (file offset ", at + 8,
           "); the header is JSON, padded with spaces");
    }
    detail::HeaderChecker checker(where_);
    nlohmann::json header;
    try {
      nlohmann::json::sax_parse(hbegin, hend, &checker);
      header = nlohmann::json::parse(hbegin, hend);
    } catch (const nlohmann::json::exception& e) {
      fail("header is not valid JSON: ", detail::clip(e.what(), 300));
    }
    if (!header.is_object()) fail("header is not a JSON object (got ", header.type_name(), ")");

    for (const auto& item : header.items()) {
      if (item.key() == "__metadata__") {
        parse_metadata(item.value());
      } else {
        TensorInfo ti = parse_entry(item.key(), item.value());
        tensors_.emplace(ti.name, std::move(ti));
      }
    }
    check_coverage();
  }

  void parse_metadata(const nlohmann::json& m) {
    if (!m.is_object())
      fail("__metadata__ must be an object of string values (got ", m.type_name(), ")");
    for (const auto& kv : m.items()) {
      if (!kv.value().is_string()) {
        fail("__metadata__ value of key '", detail::clip(kv.key()), "' must be a string (got ",
             kv.value().type_name(), ")");
      }
      metadata_.emplace(kv.key(), kv.value().get<std::string>());
    }
  }

  TensorInfo parse_entry(const std::string& name, const nlohmann::json& e) const {
    auto bad = [&](auto&&... args) { fail("tensor '", detail::clip(name), "': ", args...); };
    if (!e.is_object()) bad("entry must be an object (got ", e.type_name(), ")");
    TensorInfo ti;
    ti.name = name;

    auto d = e.find("dtype");
    if (d == e.end()) bad("missing \"dtype\"");
    if (!d->is_string()) bad("\"dtype\" must be a string (got ", d->type_name(), ")");
    const std::string& ds = d->get_ref<const std::string&>();
    if (ds == "F32") {
      ti.dtype = DType::kF32;
    } else if (ds == "F16") {
      ti.dtype = DType::kF16;
    } else if (ds == "BF16") {
      ti.dtype = DType::kBF16;
    } else {
      bad("dtype '", detail::clip(ds), "' is not supported (F32, F16, BF16)");
    }

    auto s = e.find("shape");
    if (s == e.end()) bad("missing \"shape\"");
    if (!s->is_array()) bad("\"shape\" must be an array of integers (got ", s->type_name(), ")");
    const auto kMaxIndex = static_cast<std::uint64_t>(std::numeric_limits<Index>::max());
    std::uint64_t numel = 1;
    bool overflow = false;
    for (std::size_t i = 0; i < s->size(); ++i) {
      const nlohmann::json& v = (*s)[i];
      std::uint64_t dim = 0;
      if (v.is_number_integer() && !v.is_number_unsigned() && v.get<std::int64_t>() < 0) {
        bad("shape[", i, "] = ", v.get<std::int64_t>(), " is negative");
      }
      if (!detail::get_size(v, dim))
        bad("shape[", i, "] must be an integer (got ", detail::clip(v), ")");
      if (dim > kMaxIndex) bad("shape[", i, "] = ", dim, " is too large");
      ti.shape.push_back(static_cast<Index>(dim));
      if (dim != 0 && numel > kMaxIndex / dim) overflow = true;
      numel *= dim;  // Only meaningful when !overflow.
    }
    if (overflow) bad("number of elements of shape ", detail::shape_string(ti.shape), " overflows");
    if (numel > std::numeric_limits<std::size_t>::max() / dtype_size(ti.dtype)) {
      bad("byte size of shape ", detail::shape_string(ti.shape), " overflows");
    }

    auto o = e.find("data_offsets");
    if (o == e.end()) bad("missing \"data_offsets\"");
    if (!o->is_array() || o->size() != 2)
      bad("\"data_offsets\" must be an array [begin, end] (got ", detail::clip(*o), ")");
    std::uint64_t b = 0, en = 0;
    if (!detail::get_size((*o)[0], b) || !detail::get_size((*o)[1], en)) {
      bad("\"data_offsets\" must be two non-negative integers (got ", detail::clip(*o), ")");
    }
    if (b > en) bad("data_offsets [", b, ", ", en, "] have begin > end");
    if (en > data_size_)
      bad("data_offsets end ", en, " is beyond the data section (", data_size_, " bytes)");
    const std::uint64_t need = numel * dtype_size(ti.dtype);
    if (en - b != need) {
      bad("data_offsets [", b, ", ", en, "] span ", en - b, " bytes but shape ",
          detail::shape_string(ti.shape), " of ", dtype_name(ti.dtype), " needs ", need);
    }
    ti.begin = static_cast<std::size_t>(b);
    ti.end = static_cast<std::size_t>(en);
    return ti;
  }

  // The tensors, sorted by offset, must tile [0, data_size_) exactly.
  void check_coverage() const {
    std::vector<const TensorInfo*> order;
    order.reserve(tensors_.size());
    for (const auto& kv : tensors_) order.push_back(&kv.second);
    std::sort(order.begin(), order.end(), [](const TensorInfo* a, const TensorInfo* b) {
      return std::tie(a->begin, a->end, a->name) < std::tie(b->begin, b->end, b->name);
    });
    std::size_t cursor = 0;
    const TensorInfo* prev = nullptr;
    for (const TensorInfo* t : order) {
      if (t->begin < cursor) {
        fail("tensors '", detail::clip(prev->name), "' [", prev->begin, ", ", prev->end, ") and '",
             detail::clip(t->name), "' [", t->begin, ", ", t->end, ") overlap");
      }
      if (t->begin > cursor) {
        fail("bytes [", cursor, ", ", t->begin,
             ") of the data section are not covered by any tensor (gap before '",
             detail::clip(t->name), "'; the data section must be fully covered)");
      }
      cursor = t->end;
      if (t->end > t->begin || prev == nullptr) prev = t;
    }
    if (cursor != data_size_) {
      fail("trailing garbage: bytes [", cursor, ", ", data_size_,
           ") of the data section are not covered by any tensor (the data section must be fully "
           "covered)");
    }
  }

  std::string where_;
  std::unique_ptr<detail::Bytes> bytes_;
  const std::uint8_t* data_ = nullptr;
  std::size_t data_size_ = 0;
  std::map<std::string, TensorInfo> tensors_;
  std::map<std::string, std::string> metadata_;
};

/// Builds a safetensors file. Tensors are laid out in the order added; the header is padded
/// with spaces to a multiple of 8 bytes, as the reference implementation does.
class SafetensorsWriter {
 public:
  /// Adds `name` with `shape` (row-major), converting numel(shape) floats from `data` to `dtype`
  /// (round to nearest even for F16/BF16). Throws tpa::Error on a duplicate or reserved name,
  /// a negative or overflowing shape, a null `data` with elements, or a name that is not UTF-8.
  SafetensorsWriter& add(const std::string& name, DType dtype, const std::vector<Index>& shape,
                         const float* data) {
    const std::string where = "safetensors writer: tensor '" + name + "'";
    TPA_CHECK(name != "__metadata__", where, ": the name is reserved for metadata");
    TPA_CHECK(names_.count(name) == 0, where, ": duplicate name");
    check_utf8(name, where + ": name");
    std::size_t numel = 1;
    const auto kMax = static_cast<std::size_t>(std::numeric_limits<Index>::max()) / 4;
    for (Index d : shape) {
      TPA_CHECK(d >= 0, where, ": shape ", detail::shape_string(shape),
                " has a negative dimension");
      TPA_CHECK(d == 0 || numel <= kMax / static_cast<std::size_t>(d), where, ": shape ",
                detail::shape_string(shape), " is too large");
      numel *= static_cast<std::size_t>(d);
    }
    TPA_CHECK(data != nullptr || numel == 0, where, ": null data for shape ",
              detail::shape_string(shape));

    Entry e{name, dtype, shape, std::vector<std::uint8_t>(numel * dtype_size(dtype))};
    std::uint8_t* out = e.bytes.data();
    for (std::size_t i = 0; i < numel; ++i) {
      switch (dtype) {
        case DType::kF32: {
          std::uint32_t bits;
          std::memcpy(&bits, data + i, 4);
          detail::store_u32(out + 4 * i, bits);
          break;
        }
        case DType::kF16:
          detail::store_u16(out + 2 * i, Eigen::numext::bit_cast<std::uint16_t>(half(data[i])));
          break;
        case DType::kBF16:
          detail::store_u16(out + 2 * i, Eigen::numext::bit_cast<std::uint16_t>(bfloat16(data[i])));
          break;
      }
    }
    entries_.push_back(std::move(e));
    try {
      names_.insert(name);
    } catch (...) {
      entries_.pop_back();
      throw;
    }
    return *this;
  }

  /// Tensors added so far.
  std::size_t size() const { return entries_.size(); }
  /// Whether a tensor named `name` was added.
  bool contains(const std::string& name) const { return names_.count(name) != 0; }
  /// Removes the tensors added after the first `n` (rollback of a failed batch of add()s).
  void truncate(std::size_t n) noexcept {
    while (entries_.size() > n) {
      names_.erase(entries_.back().name);
      entries_.pop_back();
    }
  }

  /// Sets a "__metadata__" entry (overwrites an existing key). Throws if not valid UTF-8.
  SafetensorsWriter& set_metadata(const std::string& key, const std::string& value) {
    check_utf8(key, "safetensors writer: metadata key");
    check_utf8(value, "safetensors writer: metadata value of '" + key + "'");
    metadata_[key] = value;
    return *this;
  }

  /// The complete file.
  std::vector<std::uint8_t> bytes() const {
    // Built piecewise (keys are unique by construction) to stay linear in the number of tensors.
    std::string text = "{";
    if (!metadata_.empty()) text += "\"__metadata__\":" + nlohmann::json(metadata_).dump();
    std::size_t offset = 0;
    for (const Entry& e : entries_) {
      nlohmann::ordered_json j = nlohmann::ordered_json::object();
      j["dtype"] = dtype_name(e.dtype);
      j["shape"] = e.shape;
      j["data_offsets"] = {offset, offset + e.bytes.size()};
      if (text.size() > 1) text += ",";
      text += nlohmann::json(e.name).dump() + ":" + j.dump();
      offset += e.bytes.size();
    }
    text += "}";
    TPA_CHECK(text.size() <= detail::kMaxHeaderBytes, "safetensors writer: header of ", text.size(),
              " bytes exceeds the limit of ", detail::kMaxHeaderBytes);
    text.append((8 - text.size() % 8) % 8, ' ');

    std::vector<std::uint8_t> out(8 + text.size() + offset);
    detail::store_u64(out.data(), text.size());
    std::memcpy(out.data() + 8, text.data(), text.size());
    std::uint8_t* p = out.data() + 8 + text.size();
    for (const Entry& e : entries_) {
      if (!e.bytes.empty()) std::memcpy(p, e.bytes.data(), e.bytes.size());
      p += e.bytes.size();
    }
    return out;
  }

  /// Writes bytes() to `path` (overwriting it). Throws tpa::Error naming the path on failure.
  void write(const std::string& path) const {
    const std::vector<std::uint8_t> b = bytes();
    std::FILE* f = std::fopen(path.c_str(), "wb");
    if (f == nullptr)
      tpa::detail::fail("safetensors writer: cannot open '", path, "': ", std::strerror(errno));
    const bool ok = std::fwrite(b.data(), 1, b.size(), f) == b.size() && std::fflush(f) == 0;
    const int err = errno;
    if (std::fclose(f) != 0 || !ok) {
      tpa::detail::fail("safetensors writer: cannot write '", path,
                        "': ", std::strerror(ok ? errno : err));
    }
  }

 private:
  struct Entry {
    std::string name;
    DType dtype;
    std::vector<Index> shape;
    std::vector<std::uint8_t> bytes;
  };

  static void check_utf8(const std::string& s, const std::string& what) {
    try {
      (void)nlohmann::json(s).dump();
    } catch (const nlohmann::json::exception&) {
      tpa::detail::fail(what, " is not valid UTF-8");
    }
  }

  std::vector<Entry> entries_;
  std::set<std::string> names_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace tpa::io
