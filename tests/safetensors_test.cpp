// tpa::io safetensors reader/writer: round trips, the reference fixtures, and rejection of every
// kind of malformed file with a tpa::Error (never a crash or an out-of-bounds read).
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <initializer_list>
#include <iterator>
#include <limits>
#include <random>
#include <string>
#include <tpa/io/safetensors.hpp>
#include <vector>

#ifndef TPA_TEST_DATA_DIR
#error "TPA_TEST_DATA_DIR must be defined to the tests/data directory"
#endif

namespace safetensors_test {

using tpa::Index;
using tpa::io::DType;
using tpa::io::SafetensorsFile;
using tpa::io::SafetensorsWriter;
using Bytes = std::vector<std::uint8_t>;

const char* const kFixtures[] = {"gqa_kv2", "mla_c1", "t6_c1_sharp", "t6_infer_decode",
                                 "t6_kvonly_c1"};

std::string fixture_path(const std::string& stem) {
  return std::string(TPA_TEST_DATA_DIR) + "/" + stem + ".safetensors";
}

Bytes read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  EXPECT_TRUE(in.good()) << path;
  return Bytes(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

std::uint32_t bits_of(float f) {
  std::uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}

float float_of(std::uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

std::uint64_t header_len(const Bytes& b) {
  std::uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | b[static_cast<std::size_t>(i)];
  return n;
}

std::string header_of(const Bytes& b) {
  return std::string(b.begin() + 8, b.begin() + 8 + static_cast<std::ptrdiff_t>(header_len(b)));
}

Bytes data_of(const Bytes& b) {
  return Bytes(b.begin() + 8 + static_cast<std::ptrdiff_t>(header_len(b)), b.end());
}

void set_len(Bytes& b, std::uint64_t n) {
  for (int i = 0; i < 8; ++i)
    b[static_cast<std::size_t>(i)] = static_cast<std::uint8_t>(n >> (8 * i));
}

// A file with the given header text and data section; the length prefix matches the header.
Bytes make_file(const std::string& header, const Bytes& data) {
  Bytes b(8 + header.size() + data.size());
  set_len(b, header.size());
  std::copy(header.begin(), header.end(), b.begin() + 8);
  std::copy(data.begin(), data.end(), b.begin() + 8 + static_cast<std::ptrdiff_t>(header.size()));
  return b;
}

// Replaces the first occurrence of `from` in the header of `b` (which must contain it).
Bytes edit_header(const Bytes& b, const std::string& from, const std::string& to) {
  std::string h = header_of(b);
  const auto pos = h.find(from);
  EXPECT_NE(pos, std::string::npos) << "'" << from << "' not in header " << h;
  if (pos == std::string::npos) return b;
  h.replace(pos, from.size(), to);
  return make_file(h, data_of(b));
}

// Two F32 tensors "a" [2] at [0, 8) and "b" [2] at [8, 16), no metadata.
Bytes two_tensors() {
  const float a[] = {1.0f, 2.0f};
  const float b[] = {3.0f, 4.0f};
  return SafetensorsWriter().add("a", DType::kF32, {2}, a).add("b", DType::kF32, {2}, b).bytes();
}

// All three dtypes, a scalar, an empty tensor and metadata.
Bytes mixed_file() {
  const float v[] = {0.5f, -1.25f, 3.0f, 7.0f, -0.0f, 100.0f};
  SafetensorsWriter w;
  w.add("f32", DType::kF32, {2, 3}, v)
      .add("f16", DType::kF16, {3}, v)
      .add("bf16", DType::kBF16, {2, 1, 2}, v)
      .add("scalar", DType::kF32, {}, v + 2)
      .add("empty", DType::kBF16, {0, 4}, nullptr)
      .set_metadata("n_head", "4")
      .set_metadata("note", "ünïcödé");
  return w.bytes();
}

std::string error_of(const Bytes& b) {
  try {
    SafetensorsFile f = SafetensorsFile::from_bytes(b);
    for (const std::string& n : f.names()) (void)f.read_f32(n);
  } catch (const tpa::Error& e) {
    return e.what();
  }
  return "";
}

// from_bytes(b) throws a tpa::Error whose message contains every one of `parts`.
void expect_rejected(const Bytes& b, std::initializer_list<std::string> parts) {
  const std::string msg = error_of(b);
  ASSERT_FALSE(msg.empty()) << "accepted: " << std::string(b.begin(), b.end());
  for (const std::string& p : parts)
    EXPECT_NE(msg.find(p), std::string::npos) << "'" << p << "' not in: " << msg;
}

// ---------------------------------------------------------------------------------------------
// Round trips
// ---------------------------------------------------------------------------------------------

TEST(SafetensorsWriter, HeaderIsPaddedWithSpacesToAMultipleOf8) {
  for (int extra = 0; extra < 9; ++extra) {
    const float x = 1.0f;
    const Bytes b =
        SafetensorsWriter()
            .add(std::string(static_cast<std::size_t>(extra) + 1, 'n'), DType::kF32, {1}, &x)
            .bytes();
    const std::uint64_t n = header_len(b);
    EXPECT_EQ(n % 8, 0u);
    EXPECT_EQ(b.size(), 8 + n + 4);
    const std::string h = header_of(b);
    const auto last = h.find_last_not_of(' ');
    EXPECT_EQ(h[last], '}');
    EXPECT_LT(h.size() - last - 1, 8u);
  }
}

TEST(SafetensorsRoundTrip, F32IsBitExact) {
  std::vector<float> v = {0.0f,
                          -0.0f,
                          1.0f,
                          -3.5f,
                          1e-45f,
                          3.4028235e38f,
                          std::numeric_limits<float>::infinity(),
                          -std::numeric_limits<float>::infinity(),
                          std::numeric_limits<float>::quiet_NaN(),
                          1.17549435e-38f,
                          123.456f,
                          -7e-20f};
  const Bytes b = SafetensorsWriter().add("w", DType::kF32, {3, 4}, v.data()).bytes();
  const SafetensorsFile f = SafetensorsFile::from_bytes(b);
  const tpa::io::TensorInfo& ti = f.info("w");
  EXPECT_EQ(ti.dtype, DType::kF32);
  EXPECT_EQ(ti.shape, (std::vector<Index>{3, 4}));
  EXPECT_EQ(ti.begin, 0u);
  EXPECT_EQ(ti.end, 48u);
  EXPECT_EQ(ti.numel(), 12);
  const std::vector<float> r = f.read_f32("w");
  ASSERT_EQ(r.size(), v.size());
  for (std::size_t i = 0; i < v.size(); ++i) EXPECT_EQ(bits_of(r[i]), bits_of(v[i])) << i;

  const tpa::Matrix<float> m = f.matrix("w");
  ASSERT_EQ(m.rows(), 3);
  ASSERT_EQ(m.cols(), 4);
  EXPECT_EQ(m(1, 2), v[6]);
  const tpa::Tensor<float, 2> t = f.tensor<2>("w");
  EXPECT_EQ(t.dimension(0), 3);
  EXPECT_EQ(t.dimension(1), 4);
  EXPECT_EQ(t(2, 3), v[11]);
}

TEST(SafetensorsRoundTrip, F16IsExactWhenRepresentableAndRoundsToNearestEven) {
  // Exactly representable: normals, the largest finite, the smallest subnormal, signed zero, inf.
  const std::vector<float> exact = {0.5f,
                                    -2.0f,
                                    1024.0f,
                                    65504.0f,
                                    std::ldexp(1.0f, -24),
                                    -0.0f,
                                    std::numeric_limits<float>::infinity(),
                                    1.0f + std::ldexp(1.0f, -10)};
  {
    const SafetensorsFile f = SafetensorsFile::from_bytes(
        SafetensorsWriter().add("e", DType::kF16, {8}, exact.data()).bytes());
    const std::vector<float> r = f.read_f32("e");
    for (std::size_t i = 0; i < exact.size(); ++i)
      EXPECT_EQ(bits_of(r[i]), bits_of(exact[i])) << exact[i];
  }
  // Ties go to the even mantissa; 1e6 overflows to inf; NaN stays NaN.
  const float ties[] = {1.0f + std::ldexp(1.0f, -11), 1.0f + 3 * std::ldexp(1.0f, -11), 1e6f,
                        std::numeric_limits<float>::quiet_NaN()};
  const Bytes b = SafetensorsWriter().add("t", DType::kF16, {4}, ties).bytes();
  const Bytes d = data_of(b);
  ASSERT_EQ(d.size(), 8u);
  EXPECT_EQ(d[0] | (d[1] << 8), 0x3c00);  // 1.0
  EXPECT_EQ(d[2] | (d[3] << 8), 0x3c02);  // 1 + 2^-9
  EXPECT_EQ(d[4] | (d[5] << 8), 0x7c00);  // inf
  const std::vector<float> r = SafetensorsFile::from_bytes(b).read_f32("t");
  EXPECT_TRUE(std::isnan(r[3]));

  // Random normals: relative error at most 2^-11.
  std::mt19937 gen(7);
  std::uniform_real_distribution<float> dist(-1000.0f, 1000.0f);
  std::vector<float> v(1000);
  for (float& x : v) x = dist(gen);
  const std::vector<float> rr =
      SafetensorsFile::from_bytes(
          SafetensorsWriter().add("r", DType::kF16, {10, 100}, v.data()).bytes())
          .read_f32("r");
  for (std::size_t i = 0; i < v.size(); ++i) {
    if (std::abs(v[i]) < 1e-4f) continue;
    EXPECT_LE(std::abs(rr[i] - v[i]), std::ldexp(std::abs(v[i]), -11)) << v[i];
  }
}

TEST(SafetensorsRoundTrip, BF16IsExactWhenRepresentableAndRoundsToNearestEven) {
  const std::vector<float> exact = {0.5f,
                                    -2.0f,
                                    1.0f + std::ldexp(1.0f, -7),
                                    3.3895314e38f,
                                    float_of(0x00010000u),
                                    -0.0f,
                                    -std::numeric_limits<float>::infinity()};
  {
    const SafetensorsFile f = SafetensorsFile::from_bytes(
        SafetensorsWriter()
            .add("e", DType::kBF16, {static_cast<Index>(exact.size())}, exact.data())
            .bytes());
    const std::vector<float> r = f.read_f32("e");
    for (std::size_t i = 0; i < exact.size(); ++i)
      EXPECT_EQ(bits_of(r[i]), bits_of(exact[i])) << exact[i];
  }
  const float ties[] = {float_of(0x3f808000u), float_of(0x3f818000u), float_of(0x3f80c000u),
                        std::numeric_limits<float>::quiet_NaN()};
  const Bytes b = SafetensorsWriter().add("t", DType::kBF16, {2, 2}, ties).bytes();
  const Bytes d = data_of(b);
  ASSERT_EQ(d.size(), 8u);
  EXPECT_EQ(d[0] | (d[1] << 8), 0x3f80);  // tie 1 + 2^-8 -> 1.0 (even)
  EXPECT_EQ(d[2] | (d[3] << 8), 0x3f82);  // tie 1 + 3*2^-8 -> 1 + 2^-6 (even)
  EXPECT_EQ(d[4] | (d[5] << 8), 0x3f81);  // above the tie rounds up
  EXPECT_TRUE(std::isnan(SafetensorsFile::from_bytes(b).read_f32("t")[3]));

  std::mt19937 gen(11);
  std::uniform_real_distribution<float> dist(-1e4f, 1e4f);
  std::vector<float> v(1000);
  for (float& x : v) x = dist(gen);
  const std::vector<float> rr =
      SafetensorsFile::from_bytes(
          SafetensorsWriter().add("r", DType::kBF16, {1000}, v.data()).bytes())
          .read_f32("r");
  for (std::size_t i = 0; i < v.size(); ++i) {
    // Unit roundoff of bf16 (8 significant bits) is 2^-8; exact bits by integer round-half-even.
    EXPECT_LE(std::abs(rr[i] - v[i]), std::ldexp(std::abs(v[i]), -8)) << v[i];
    const std::uint32_t b = bits_of(v[i]);
    EXPECT_EQ(bits_of(rr[i]), ((b + 0x7fffu + ((b >> 16) & 1u)) >> 16) << 16) << v[i];
  }
}

TEST(SafetensorsRoundTrip, MixedDtypesScalarsEmptyTensorsAndMetadata) {
  const SafetensorsFile f = SafetensorsFile::from_bytes(mixed_file());
  EXPECT_EQ(f.names(), (std::vector<std::string>{"bf16", "empty", "f16", "f32", "scalar"}));
  EXPECT_TRUE(f.contains("f16"));
  EXPECT_FALSE(f.contains("F16"));
  EXPECT_FALSE(f.contains("__metadata__"));
  EXPECT_EQ(f.metadata().size(), 2u);
  EXPECT_EQ(f.metadata_value("n_head"), "4");
  EXPECT_EQ(f.metadata_value("note"), "ünïcödé");

  EXPECT_EQ(f.read_f32("f32"), (std::vector<float>{0.5f, -1.25f, 3.0f, 7.0f, -0.0f, 100.0f}));
  EXPECT_EQ(f.read_f32("f16"), (std::vector<float>{0.5f, -1.25f, 3.0f}));
  const tpa::Tensor<float, 3> bf = f.tensor<3>("bf16");
  EXPECT_EQ(bf.dimension(0), 2);
  EXPECT_EQ(bf.dimension(1), 1);
  EXPECT_EQ(bf.dimension(2), 2);
  EXPECT_EQ(bf(1, 0, 1), 7.0f);
  EXPECT_EQ(f.info("bf16").dtype, DType::kBF16);

  EXPECT_EQ(f.info("scalar").numel(), 1);
  EXPECT_TRUE(f.info("scalar").shape.empty());
  const tpa::Tensor<float, 0> s = f.tensor<0>("scalar");
  EXPECT_EQ(s(), 3.0f);

  EXPECT_EQ(f.info("empty").numel(), 0);
  EXPECT_TRUE(f.read_f32("empty").empty());
  const tpa::Tensor<float, 2> e = f.tensor<2>("empty");
  EXPECT_EQ(e.dimension(0), 0);
  EXPECT_EQ(e.dimension(1), 4);
  f.read_into("empty", nullptr, 0);

  float dst[6];
  f.read_into("f32", dst, 6);
  EXPECT_EQ(dst[5], 100.0f);
}

TEST(SafetensorsRoundTrip, NoTensorsNoMetadata) {
  const Bytes b = SafetensorsWriter().bytes();
  EXPECT_EQ(header_of(b).substr(0, 2), "{}");
  const SafetensorsFile f = SafetensorsFile::from_bytes(b);
  EXPECT_TRUE(f.names().empty());
  EXPECT_TRUE(f.metadata().empty());
}

TEST(SafetensorsRoundTrip, UnalignedDataIsReadCorrectly) {
  // An unpadded 1-byte-longer header puts the data section at an odd offset.
  const float v[] = {1.5f, -2.25f, 3.0f};
  const Bytes good =
      SafetensorsWriter().add("u", DType::kF32, {3}, v).add("h", DType::kBF16, {3}, v).bytes();
  std::string h = header_of(good);
  h.erase(h.find_last_not_of(' ') + 1);
  h += ' ';
  if (h.size() % 2 == 0) h += ' ';
  const SafetensorsFile f = SafetensorsFile::from_bytes(make_file(h, data_of(good)));
  EXPECT_EQ(f.read_f32("u"), (std::vector<float>{1.5f, -2.25f, 3.0f}));
  EXPECT_EQ(f.read_f32("h"), (std::vector<float>{1.5f, -2.25f, 3.0f}));
}

TEST(SafetensorsRoundTrip, WriteThenOpenMapsTheSameBytes) {
  const std::string path =
      "/tmp/tpa_safetensors_test_" + std::to_string(::getpid()) + ".safetensors";
  SafetensorsWriter w;
  const float v[] = {1, 2, 3, 4, 5, 6};
  w.add("m", DType::kF32, {2, 3}, v).set_metadata("k", "v");
  w.write(path);
  {
    SafetensorsFile f = SafetensorsFile::open(path);
    SafetensorsFile moved = std::move(f);
    SafetensorsFile assigned = SafetensorsFile::from_bytes(two_tensors());
    assigned = std::move(moved);
    EXPECT_EQ(assigned.metadata_value("k"), "v");
    const tpa::Matrix<float> m = assigned.matrix("m");
    EXPECT_EQ(m(1, 0), 4.0f);
    EXPECT_EQ(read_file(path), w.bytes());
  }
  std::remove(path.c_str());
}

// ---------------------------------------------------------------------------------------------
// The reference fixtures
// ---------------------------------------------------------------------------------------------

TEST(SafetensorsFixtures, EveryFixtureOpensAndEveryTensorReads) {
  for (const char* stem : kFixtures) {
    SCOPED_TRACE(stem);
    const SafetensorsFile f = SafetensorsFile::open(fixture_path(stem));
    const SafetensorsFile g = SafetensorsFile::from_bytes(read_file(fixture_path(stem)));
    EXPECT_EQ(f.names(), g.names());
    EXPECT_EQ(f.metadata(), g.metadata());
    EXPECT_GE(f.names().size(), 15u);
    EXPECT_EQ(f.metadata_value("n_head"), "4");
    EXPECT_EQ(f.metadata_value("batch"), "2");
    EXPECT_EQ(f.metadata_value("fixture"), stem);
    const tpa::Tensor<float, 3> x = f.tensor<3>("x");
    EXPECT_EQ(x.dimension(0), 2);
    EXPECT_EQ(x.dimension(1), 16);
    EXPECT_EQ(x.dimension(2), 64);
    for (const std::string& n : f.names()) {
      EXPECT_EQ(f.info(n).dtype, DType::kF32) << n;
      const std::vector<float> v = f.read_f32(n);
      EXPECT_EQ(static_cast<Index>(v.size()), f.info(n).numel()) << n;
      EXPECT_EQ(v, g.read_f32(n)) << n;
      for (float e : v) ASSERT_TRUE(std::isfinite(e)) << n;
    }
  }
}

TEST(SafetensorsFixtures, ShapesAndValues) {
  const SafetensorsFile t6 = SafetensorsFile::open(fixture_path("t6_c1_sharp"));
  EXPECT_EQ(t6.metadata_value("q_rank"), "6");
  EXPECT_EQ(t6.info("A_q").shape, (std::vector<Index>{2, 16, 4, 6}));
  EXPECT_EQ(t6.info("c_qkv.W_A_q.weight").shape, (std::vector<Index>{24, 64}));
  const tpa::Tensor<float, 3> x = t6.tensor<3>("x");
  EXPECT_EQ(x(0, 0, 0), -1.0200315713882446f);
  EXPECT_EQ(x(0, 0, 1), 0.41511625051498413f);
  EXPECT_EQ(x(1, 15, 63), -2.1754040718078613f);

  const SafetensorsFile gqa = SafetensorsFile::open(fixture_path("gqa_kv2"));
  EXPECT_EQ(gqa.metadata_value("n_kv_head"), "2");
  EXPECT_EQ(gqa.info("k").shape, (std::vector<Index>{2, 16, 2, 16}));
  const tpa::Matrix<float> wk = gqa.matrix("c_k.weight");
  EXPECT_EQ(wk.rows(), 32);
  EXPECT_EQ(wk.cols(), 64);
  EXPECT_EQ(gqa.tensor<3>("x")(0, 0, 0), 0.37303426861763f);

  const SafetensorsFile mla = SafetensorsFile::open(fixture_path("mla_c1"));
  EXPECT_EQ(mla.info("k_pe").shape, (std::vector<Index>{2, 16, 8}));
  EXPECT_EQ(mla.info("q_a_layernorm.weight").shape, (std::vector<Index>{32}));

  const SafetensorsFile dec = SafetensorsFile::open(fixture_path("t6_infer_decode"));
  EXPECT_EQ(dec.info("prefill.cache_kB").shape, (std::vector<Index>{2, 12, 2, 16}));
  EXPECT_EQ(dec.info("y_decode").shape, (std::vector<Index>{2, 4, 64}));
  EXPECT_EQ(dec.metadata_value("prompt_len"), "12");

  const SafetensorsFile kv = SafetensorsFile::open(fixture_path("t6_kvonly_c1"));
  EXPECT_EQ(kv.info("c_qkv.c_q.weight").shape, (std::vector<Index>{64, 64}));
}

TEST(SafetensorsFixtures, TruncatedFixtureIsRejected) {
  const Bytes full = read_file(fixture_path("t6_c1_sharp"));
  const std::size_t header_end = 8 + header_len(full);
  for (std::size_t len = 0; len < full.size(); len += (len < header_end + 64 ? 1 : 997)) {
    const Bytes cut(full.begin(), full.begin() + static_cast<std::ptrdiff_t>(len));
    EXPECT_THROW(SafetensorsFile::from_bytes(cut), tpa::Error) << len;
  }
}

// ---------------------------------------------------------------------------------------------
// Misuse of a valid file
// ---------------------------------------------------------------------------------------------

TEST(SafetensorsFile, LookupAndShapeErrorsNameTheTensor) {
  const SafetensorsFile f = SafetensorsFile::open(fixture_path("t6_c1_sharp"));
  try {
    (void)f.info("nope");
    FAIL();
  } catch (const tpa::Error& e) {
    EXPECT_NE(std::string(e.what()).find("no tensor named 'nope'"), std::string::npos) << e.what();
  }
  try {
    (void)f.tensor<2>("x");
    FAIL();
  } catch (const tpa::Error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("'x'"), std::string::npos) << m;
    EXPECT_NE(m.find("[2, 16, 64]"), std::string::npos) << m;
    EXPECT_NE(m.find("rank 2"), std::string::npos) << m;
  }
  EXPECT_THROW((void)f.matrix("x"), tpa::Error);
  EXPECT_THROW((void)f.read_f32("missing"), tpa::Error);
  EXPECT_THROW((void)f.metadata_value("no_such_key"), tpa::Error);
  std::vector<float> buf(2048);
  EXPECT_THROW(f.read_into("x", buf.data(), 2047), tpa::Error);
  EXPECT_THROW(f.read_into("x", nullptr, 2048), tpa::Error);
  f.read_into("x", buf.data(), 2048);
  EXPECT_EQ(buf[0], -1.0200315713882446f);
}

TEST(SafetensorsFile, OpenMissingFileNamesThePath) {
  const std::string path = std::string(TPA_TEST_DATA_DIR) + "/does_not_exist.safetensors";
  try {
    (void)SafetensorsFile::open(path);
    FAIL();
  } catch (const tpa::Error& e) {
    EXPECT_NE(std::string(e.what()).find(path), std::string::npos) << e.what();
  }
  EXPECT_THROW((void)SafetensorsFile::open(TPA_TEST_DATA_DIR), tpa::Error);  // a directory
}

TEST(SafetensorsFile, OpenFifoThrowsWithoutBlocking) {
  const std::string path = "/tmp/tpa_safetensors_fifo_" + std::to_string(::getpid());
  ASSERT_EQ(::mkfifo(path.c_str(), 0600), 0);
  try {
    (void)SafetensorsFile::open(path);
    ADD_FAILURE() << "a FIFO was accepted";
  } catch (const tpa::Error& e) {
    EXPECT_NE(std::string(e.what()).find("not a regular file"), std::string::npos) << e.what();
  }
  std::remove(path.c_str());
}

TEST(SafetensorsFile, OpenShortFileThrows) {
  const std::string path = "/tmp/tpa_safetensors_short_" + std::to_string(::getpid());
  for (int len : {0, 7}) {
    std::ofstream(path, std::ios::binary) << std::string(static_cast<std::size_t>(len), '\0');
    EXPECT_THROW((void)SafetensorsFile::open(path), tpa::Error) << len;
  }
  std::remove(path.c_str());
}

// ---------------------------------------------------------------------------------------------
// Writer misuse
// ---------------------------------------------------------------------------------------------

TEST(SafetensorsWriter, RejectsBadInput) {
  const float v[] = {1, 2, 3, 4};
  SafetensorsWriter w;
  w.add("a", DType::kF32, {4}, v);
  EXPECT_THROW(w.add("a", DType::kF16, {2}, v), tpa::Error);
  EXPECT_THROW(w.add("__metadata__", DType::kF32, {1}, v), tpa::Error);
  EXPECT_THROW(w.add("neg", DType::kF32, {2, -1}, v), tpa::Error);
  EXPECT_THROW(w.add("null", DType::kF32, {2}, nullptr), tpa::Error);
  EXPECT_THROW(w.add("huge", DType::kF32, {Index{1} << 40, Index{1} << 40}, v), tpa::Error);
  EXPECT_THROW(w.add("bad\xff", DType::kF32, {1}, v), tpa::Error);
  EXPECT_THROW(w.set_metadata("k", "\xc3"), tpa::Error);
  // Failed adds leave the writer unchanged.
  EXPECT_EQ(SafetensorsFile::from_bytes(w.bytes()).names(), (std::vector<std::string>{"a"}));
  try {
    w.write("/nonexistent-dir/x.safetensors");
    FAIL();
  } catch (const tpa::Error& e) {
    EXPECT_NE(std::string(e.what()).find("/nonexistent-dir/x.safetensors"), std::string::npos)
        << e.what();
  }
}

// ---------------------------------------------------------------------------------------------
// Malformed files
// ---------------------------------------------------------------------------------------------

TEST(SafetensorsMalformed, BaselinesAreValid) {
  EXPECT_EQ(error_of(two_tensors()), "");
  EXPECT_EQ(error_of(mixed_file()), "");
  std::string h = header_of(two_tensors());
  h.erase(h.find_last_not_of(' ') + 1);
  EXPECT_EQ(h,
            "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
            "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,16]}}");
}

TEST(SafetensorsMalformed, ShortFile) {
  const Bytes good = two_tensors();
  for (std::size_t len = 0; len < 8; ++len) {
    expect_rejected(Bytes(good.begin(), good.begin() + static_cast<std::ptrdiff_t>(len)),
                    {"shorter than the 8-byte"});
  }
}

TEST(SafetensorsMalformed, HeaderLength) {
  Bytes b = two_tensors();
  set_len(b, b.size() - 7);
  expect_rejected(b, {"header length", "larger than"});
  set_len(b, 100'000'001);
  expect_rejected(b, {"exceeds the limit"});
  set_len(b, ~std::uint64_t{0});
  expect_rejected(b, {"exceeds the limit"});
  set_len(b, 0);
  expect_rejected(b, {"not valid JSON"});
}

TEST(SafetensorsMalformed, HeaderNotJsonOrNotAnObject) {
  const Bytes data = data_of(two_tensors());
  expect_rejected(make_file("{\"a\":", data), {"not valid JSON"});
  expect_rejected(make_file("hello world", data), {"not valid JSON"});
  expect_rejected(make_file("{} {}", data), {"not valid JSON"});
  expect_rejected(make_file("{\"\xff\":1}", data), {"not valid JSON"});
  expect_rejected(make_file(std::string("{\"a\0\":1}", 8), data), {"NUL byte at header offset 3"});
  expect_rejected(make_file("[1, 2]  ", data), {"not a JSON object", "array"});
  expect_rejected(make_file("\"str\"", data), {"not a JSON object", "string"});
  expect_rejected(make_file("42", data), {"not a JSON object"});
  expect_rejected(make_file("null", data), {"not a JSON object"});
  expect_rejected(make_file(std::string(200, '[') + std::string(200, ']'), data),
                  {"nested deeper"});
}

// A NUL byte anywhere in the header is rejected, naming its offset: as padding after the JSON
// value it was accepted (issue 27); the format pads with spaces.
TEST(SafetensorsMalformed, NulBytesInTheHeaderAreRejected) {
  const Bytes data = data_of(two_tensors());
  std::string h = header_of(two_tensors());
  h.erase(h.find_last_not_of(' ') + 1);
  expect_rejected(make_file(h + std::string(3, '\0'), data),
                  {"NUL byte at header offset " + std::to_string(h.size()),
                   "file offset " + std::to_string(h.size() + 8)});
  expect_rejected(make_file(h + "  " + std::string(1, '\0') + "     ", data),
                  {"NUL byte at header offset " + std::to_string(h.size() + 2)});
  expect_rejected(make_file(std::string(1, '\0') + h, data), {"NUL byte at header offset 0"});
  EXPECT_EQ(error_of(make_file(h + "   ", data)), "");  // space padding stays valid
}

TEST(SafetensorsMalformed, EntryStructure) {
  const Bytes b = two_tensors();
  const std::string entry_b = "{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,16]}";
  expect_rejected(edit_header(b, entry_b, "[8, 16]"),
                  {"tensor 'b'", "entry must be an object", "array"});
  expect_rejected(edit_header(b, entry_b, "\"F32\""), {"tensor 'b'", "entry must be an object"});
  expect_rejected(edit_header(b, "\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8",
                              "\"shape\":[2],\"data_offsets\":[8"),
                  {"tensor 'b'", "missing \"dtype\""});
  expect_rejected(edit_header(b, "\"shape\":[2],\"data_offsets\":[8", "\"data_offsets\":[8"),
                  {"tensor 'b'", "missing \"shape\""});
  expect_rejected(edit_header(b, ",\"data_offsets\":[8,16]", ""),
                  {"tensor 'b'", "missing \"data_offsets\""});
}

TEST(SafetensorsMalformed, Dtype) {
  const Bytes b = two_tensors();
  expect_rejected(edit_header(b, "\"F32\"", "\"F64\""),
                  {"tensor 'a': dtype 'F64' is not supported (F32, F16, BF16)"});
  expect_rejected(edit_header(b, "\"F32\"", "\"f32\""),
                  {"tensor 'a'", "dtype 'f32' is not supported"});
  expect_rejected(edit_header(b, "\"F32\"", "\"I8\""),
                  {"tensor 'a'", "dtype 'I8' is not supported"});
  expect_rejected(edit_header(b, "\"F32\"", "32"),
                  {"tensor 'a'", "\"dtype\" must be a string", "number"});
  expect_rejected(edit_header(b, "\"F32\"", "null"), {"tensor 'a'", "\"dtype\" must be a string"});
}

TEST(SafetensorsMalformed, Shape) {
  const Bytes b = two_tensors();
  expect_rejected(edit_header(b, "[2]", "2"), {"tensor 'a'", "\"shape\" must be an array"});
  expect_rejected(edit_header(b, "[2]", "{}"), {"tensor 'a'", "\"shape\" must be an array"});
  expect_rejected(edit_header(b, "[2]", "[2.0]"), {"tensor 'a'", "shape[0] must be an integer"});
  expect_rejected(edit_header(b, "[2]", "[\"2\"]"), {"tensor 'a'", "shape[0] must be an integer"});
  expect_rejected(edit_header(b, "[2]", "[1,true]"), {"tensor 'a'", "shape[1] must be an integer"});
  expect_rejected(edit_header(b, "[2]", "[null]"), {"tensor 'a'", "shape[0] must be an integer"});
  expect_rejected(edit_header(b, "[2]", "[-2]"), {"tensor 'a'", "shape[0] = -2 is negative"});
  expect_rejected(edit_header(b, "[2]", "[-1,-2]"), {"tensor 'a'", "negative"});
  expect_rejected(edit_header(b, "[2]", "[9223372036854775808]"), {"tensor 'a'", "too large"});
  expect_rejected(edit_header(b, "[2]", "[99999999999999999999999]"),
                  {"tensor 'a'", "must be an integer"});
  // Element count overflow (2^64), and byte size overflow (2^62 elements of 4 bytes).
  expect_rejected(edit_header(b, "[2]", "[4294967296,4294967296]"),
                  {"tensor 'a'", "number of elements", "overflows"});
  expect_rejected(edit_header(b, "[2]", "[4294967296,4294967296,0]"), {"tensor 'a'", "overflows"});
  expect_rejected(edit_header(b, "[2]", "[4611686018427387904]"),
                  {"tensor 'a'", "byte size", "overflows"});
}

TEST(SafetensorsMalformed, DataOffsets) {
  const Bytes b = two_tensors();
  const std::string off_b = "[8,16]";
  expect_rejected(edit_header(b, off_b, "8"),
                  {"tensor 'b'", "\"data_offsets\" must be an array [begin, end]"});
  expect_rejected(edit_header(b, off_b, "[8]"),
                  {"tensor 'b'", "\"data_offsets\" must be an array [begin, end]"});
  expect_rejected(edit_header(b, off_b, "[8,16,16]"),
                  {"tensor 'b'", "must be an array [begin, end]"});
  expect_rejected(edit_header(b, off_b, "[8.0,16]"), {"tensor 'b'", "two non-negative integers"});
  expect_rejected(edit_header(b, off_b, "[-8,16]"), {"tensor 'b'", "two non-negative integers"});
  expect_rejected(edit_header(b, off_b, "[8,\"16\"]"), {"tensor 'b'", "two non-negative integers"});
  expect_rejected(edit_header(b, off_b, "[16,8]"), {"tensor 'b'", "begin > end"});
  // Size does not match the shape.
  expect_rejected(edit_header(b, off_b, "[8,12]"),
                  {"tensor 'b'", "span 4 bytes", "[2] of F32 needs 8"});
  expect_rejected(
      edit_header(b, "\"shape\":[2],\"data_offsets\":[8", "\"shape\":[3],\"data_offsets\":[8"),
      {"tensor 'b'", "needs 12"});
  expect_rejected(edit_header(b, "\"F32\",\"shape\":[2],\"data_offsets\":[8",
                              "\"BF16\",\"shape\":[2],\"data_offsets\":[8"),
                  {"tensor 'b'", "of BF16 needs 4"});
  // Past the end of the data section.
  expect_rejected(edit_header(b, "\"shape\":[2],\"data_offsets\":[8,16]",
                              "\"shape\":[3],\"data_offsets\":[8,20]"),
                  {"tensor 'b'", "end 20 is beyond the data section (16 bytes)"});
  expect_rejected(edit_header(b, off_b, "[18446744073709551615,18446744073709551615]"),
                  {"tensor 'b'", "beyond"});
  Bytes cut = two_tensors();
  cut.pop_back();
  expect_rejected(cut, {"tensor 'b'", "beyond the data section"});
}

TEST(SafetensorsMalformed, CoverageOverlapGapsTrailingGarbage) {
  const Bytes b = two_tensors();
  // Overlap: b moved onto a.
  expect_rejected(edit_header(b, "[8,16]", "[4,12]"), {"'a' [0, 8)", "'b' [4, 12)", "overlap"});
  expect_rejected(edit_header(b, "[8,16]", "[0,8]"), {"overlap"});
  // A zero-size tensor strictly inside another one overlaps it.
  const float v[] = {1, 2};
  const Bytes z =
      SafetensorsWriter().add("a", DType::kF32, {2}, v).add("z", DType::kF32, {0}, nullptr).bytes();
  expect_rejected(edit_header(z, "[8,8]", "[4,4]"), {"'a'", "'z'", "overlap"});
  // Gap in the middle: b shrunk to one element placed at the end.
  expect_rejected(edit_header(b, "\"shape\":[2],\"data_offsets\":[8,16]",
                              "\"shape\":[1],\"data_offsets\":[12,16]"),
                  {"bytes [8, 12)", "not covered", "fully covered"});
  // Gap at the start.
  expect_rejected(edit_header(b, "\"shape\":[2],\"data_offsets\":[0,8]",
                              "\"shape\":[1],\"data_offsets\":[4,8]"),
                  {"bytes [0, 4)", "not covered"});
  // Trailing garbage after the last tensor.
  Bytes t = two_tensors();
  t.push_back(0);
  expect_rejected(t, {"trailing garbage", "bytes [16, 17)"});
  expect_rejected(edit_header(b, "\"shape\":[2],\"data_offsets\":[8,16]",
                              "\"shape\":[1],\"data_offsets\":[8,12]"),
                  {"trailing garbage", "bytes [12, 16)"});
  // No tensors at all but a data section.
  expect_rejected(make_file("{}", {1, 2, 3}), {"trailing garbage", "bytes [0, 3)"});
}

TEST(SafetensorsMalformed, DuplicateKeysAreRejected) {
  const Bytes b = two_tensors();
  expect_rejected(edit_header(b, "\"b\":", "\"a\":"), {"duplicate key 'a'", "top level"});
  expect_rejected(edit_header(b, "\"dtype\":\"F32\"", "\"dtype\":\"F16\",\"dtype\":\"F32\""),
                  {"duplicate key 'dtype'", "inside an entry"});
  const Bytes m = mixed_file();
  expect_rejected(edit_header(m, "\"n_head\":\"4\"", "\"n_head\":\"4\",\"n_head\":\"5\""),
                  {"duplicate key 'n_head'"});
  expect_rejected(edit_header(b, "{", "{\"__metadata__\":{},\"__metadata__\":{},"),
                  {"duplicate key '__metadata__'"});
  // Keys equal only after unescaping are duplicates too.
  expect_rejected(edit_header(b, "\"b\":", "\"\\u0061\":"), {"duplicate key 'a'"});
}

TEST(SafetensorsMalformed, Metadata) {
  const Bytes m = mixed_file();
  expect_rejected(edit_header(m, "\"4\"", "4"),
                  {"__metadata__ value of key 'n_head' must be a string", "number"});
  expect_rejected(edit_header(m, "\"4\"", "null"), {"'n_head' must be a string"});
  expect_rejected(edit_header(m, "\"4\"", "[\"4\"]"), {"'n_head' must be a string", "array"});
  expect_rejected(edit_header(m, "\"4\"", "{\"x\":\"4\"}"),
                  {"'n_head' must be a string", "object"});
  const Bytes b = two_tensors();
  expect_rejected(edit_header(b, "{", "{\"__metadata__\":[],"),
                  {"__metadata__ must be an object", "array"});
  expect_rejected(edit_header(b, "{", "{\"__metadata__\":\"x\","),
                  {"__metadata__ must be an object", "string"});
  // An empty metadata object and extra keys in an entry are accepted.
  EXPECT_EQ(error_of(edit_header(b, "{", "{\"__metadata__\":{},")), "");
  EXPECT_EQ(error_of(edit_header(b, "\"dtype\"", "\"extra\":[1,{\"x\":null}],\"dtype\"")), "");
}

TEST(SafetensorsMalformed, ErrorsNameTheSource) {
  const std::string msg = error_of(edit_header(two_tensors(), "\"F32\"", "\"F64\""));
  EXPECT_EQ(
      msg,
      "safetensors buffer '<memory>': tensor 'a': dtype 'F64' is not supported (F32, F16, BF16)");
  const std::string path =
      "/tmp/tpa_safetensors_bad_" + std::to_string(::getpid()) + ".safetensors";
  const Bytes bad = edit_header(two_tensors(), "[8,16]", "[4,12]");
  std::ofstream(path, std::ios::binary)
      .write(reinterpret_cast<const char*>(bad.data()), static_cast<std::streamsize>(bad.size()));
  try {
    (void)SafetensorsFile::open(path);
    FAIL();
  } catch (const tpa::Error& e) {
    EXPECT_NE(std::string(e.what()).find("safetensors file '" + path + "'"), std::string::npos)
        << e.what();
  }
  std::remove(path.c_str());
}

TEST(SafetensorsMalformed, MessagesQuoteAtMostAFewHundredBytesOfTheFile) {
  const std::string name(100000, 'n');
  const float v[] = {1, 2};
  const Bytes b = SafetensorsWriter().add(name, DType::kF32, {2}, v).bytes();
  const std::string msg =
      error_of(edit_header(b, "\"F32\"", "\"" + std::string(100000, 'D') + "\""));
  EXPECT_NE(msg.find("tensor 'nnnn"), std::string::npos) << msg;
  EXPECT_NE(msg.find("...' is not supported"), std::string::npos) << msg;
  EXPECT_LT(msg.size(), 600u);
  EXPECT_LT(error_of(edit_header(b, "[2]", "[" + std::string(100000, '7') + "]")).size(), 600u);
}

TEST(SafetensorsMalformed, TruncationAtEveryLengthThrows) {
  const Bytes full = mixed_file();
  for (std::size_t len = 0; len < full.size(); ++len) {
    const Bytes cut(full.begin(), full.begin() + static_cast<std::ptrdiff_t>(len));
    EXPECT_THROW(SafetensorsFile::from_bytes(cut), tpa::Error) << len;
  }
  EXPECT_NO_THROW(SafetensorsFile::from_bytes(full));
}

TEST(SafetensorsMalformed, SingleByteCorruptionNeverCrashes) {
  // Every byte of the header (and the length prefix) replaced by a few values: either accepted or
  // rejected with tpa::Error; accepted files read back without error.
  const Bytes good = mixed_file();
  const std::size_t header_end = 8 + header_len(good);
  for (std::size_t i = 0; i < header_end; ++i) {
    for (std::uint8_t v : {std::uint8_t{0}, std::uint8_t{'"'}, std::uint8_t{'9'}, std::uint8_t{'}'},
                           std::uint8_t{0xff}}) {
      Bytes b = good;
      b[i] = v;
      (void)error_of(b);
    }
  }
}

}  // namespace safetensors_test
