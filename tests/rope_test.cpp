// RoPE tables and rotation: hand-computed values for every convention, partial rotary, the
// relative-position property, RoPE with decay (table, rotation, underflow, decay_base 1 ≡ plain)
// and RoPE off.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "test_util.hpp"

using tpa::RopeConfig;
using tpa::RopeStyle;
using tpa::RopeTable;

namespace rope_test {

RopeTable table(RopeStyle style, tpa::Index dim, tpa::Index rotary = 0, double base = 10000.0) {
  RopeConfig c;
  c.style = style;
  c.rotary_dim = rotary;
  c.base = base;
  c.max_positions = 64;
  return RopeTable(c, dim);
}

// x = [1, 2, 3, 4] at position 1, base 10000: θ_0 = 1, θ_1 = 10000^(-1/2) = 0.01.
// fuzz_config found it: a rotary dim near 2^63 with decay overflowed r + r/2 in validate().
TEST(Rope, HugeRotaryDimIsRefusedWithoutOverflow) {
  RopeConfig c;
  c.decay_base = 0.9;
  c.max_positions = 1;
  const tpa::Index dim = tpa::Index(1) << 62;
  EXPECT_THROW(c.validate("test", dim), tpa::Error);
  c.rotary_dim = dim - 2;
  EXPECT_THROW(c.validate("test", dim), tpa::Error);
}

TEST(Rope, HalfSplitHandComputed) {
  std::vector<float> x = {1, 2, 3, 4};
  table(RopeStyle::kHalfSplit, 4).rotate(x.data(), 1);
  // pairs (x0, x2) at angle 1 and (x1, x3) at angle 0.01
  EXPECT_NEAR(x[0], std::cos(1.0) - 3 * std::sin(1.0), 1e-6);
  EXPECT_NEAR(x[2], std::sin(1.0) + 3 * std::cos(1.0), 1e-6);
  EXPECT_NEAR(x[1], 2 * std::cos(0.01) - 4 * std::sin(0.01), 1e-6);
  EXPECT_NEAR(x[3], 2 * std::sin(0.01) + 4 * std::cos(0.01), 1e-6);
}

TEST(Rope, HalfSplitReversedHandComputed) {
  // model/T6.py: y1 = x1 cos + x2 sin, y2 = −x1 sin + x2 cos
  std::vector<float> x = {1, 2, 3, 4};
  table(RopeStyle::kHalfSplitReversed, 4).rotate(x.data(), 1);
  EXPECT_NEAR(x[0], std::cos(1.0) + 3 * std::sin(1.0), 1e-6);
  EXPECT_NEAR(x[2], -std::sin(1.0) + 3 * std::cos(1.0), 1e-6);
  EXPECT_NEAR(x[1], 2 * std::cos(0.01) + 4 * std::sin(0.01), 1e-6);
  EXPECT_NEAR(x[3], -2 * std::sin(0.01) + 4 * std::cos(0.01), 1e-6);
}

TEST(Rope, InterleavedHandComputed) {
  // model/T6_infer.py: complex multiply of (x0 + i x1) by e^{i p θ_0}, (x2 + i x3) by e^{i p θ_1}
  std::vector<float> x = {1, 2, 3, 4};
  table(RopeStyle::kInterleaved, 4).rotate(x.data(), 1);
  EXPECT_NEAR(x[0], std::cos(1.0) - 2 * std::sin(1.0), 1e-6);
  EXPECT_NEAR(x[1], std::sin(1.0) + 2 * std::cos(1.0), 1e-6);
  EXPECT_NEAR(x[2], 3 * std::cos(0.01) - 4 * std::sin(0.01), 1e-6);
  EXPECT_NEAR(x[3], 3 * std::sin(0.01) + 4 * std::cos(0.01), 1e-6);
}

TEST(Rope, PartialRotaryLeavesTheRestAlone) {
  // d = 6, r = 4: θ_0 = 1, θ_1 = 0.01; dims 4 and 5 pass through.
  for (auto style : {RopeStyle::kHalfSplit, RopeStyle::kHalfSplitReversed, RopeStyle::kInterleaved}) {
    std::vector<float> x = {1, 2, 3, 4, 5, 6};
    table(style, 6, 4).rotate(x.data(), 2);
    EXPECT_EQ(x[4], 5.f);
    EXPECT_EQ(x[5], 6.f);
    std::vector<double> ref = {1, 2, 3, 4};
    tpa_test::rope_ref(ref.data(), 4, 2, style, 10000.0);
    for (int i = 0; i < 4; ++i) EXPECT_NEAR(x[i], ref[i], 1e-6) << tpa::rope_style_name(style);
  }
  // Half-split with r = 4 pairs (x0, x2) and (x1, x3): hand-computed at p = 1.
  std::vector<float> x = {1, 2, 3, 4, 5, 6};
  table(RopeStyle::kHalfSplit, 6, 4).rotate(x.data(), 1);
  EXPECT_NEAR(x[0], std::cos(1.0) - 3 * std::sin(1.0), 1e-6);
  EXPECT_NEAR(x[3], 2 * std::sin(0.01) + 4 * std::cos(0.01), 1e-6);
}

TEST(Rope, TablesAreDoublePrecisionRounded) {
  auto t = table(RopeStyle::kInterleaved, 16, 0, 500000.0);
  for (tpa::Index p : {0, 1, 17, 63}) {
    for (int i = 0; i < 8; ++i) {
      const double phi = p * std::pow(500000.0, -2.0 * i / 16.0);
      EXPECT_EQ(t.cos_row(p)[i], static_cast<float>(std::cos(phi)));
      EXPECT_EQ(t.sin_row(p)[i], static_cast<float>(std::sin(phi)));
    }
  }
}

TEST(Rope, ScoresDependOnlyOnRelativePosition) {
  for (auto style : {RopeStyle::kHalfSplit, RopeStyle::kHalfSplitReversed, RopeStyle::kInterleaved}) {
    auto t = table(style, 8);
    const auto q0 = tpa_test::random_tensor(1, 8, 1), k0 = tpa_test::random_tensor(1, 8, 2);
    auto score = [&](tpa::Index pq, tpa::Index pk) {
      tpa::Tensor<float, 2> q = q0, k = k0;
      t.rotate(q.data(), pq);
      t.rotate(k.data(), pk);
      double s = 0;
      for (int i = 0; i < 8; ++i) s += static_cast<double>(q.data()[i]) * k.data()[i];
      return s;
    };
    EXPECT_NEAR(score(10, 3), score(27, 20), 1e-5) << tpa::rope_style_name(style);
    EXPECT_NEAR(score(5, 5), score(0, 0), 1e-5);
  }
}

TEST(Rope, RotatesSeveralRowsWithAStride) {
  auto t = table(RopeStyle::kHalfSplitReversed, 4);
  std::vector<float> two = {1, 2, 3, 4, 9, 1, 2, 3, 4, 9};  // two rows of 4, stride 5
  t.rotate(two.data(), 3, 2, 5);
  std::vector<float> one = {1, 2, 3, 4};
  t.rotate(one.data(), 3);
  for (int i = 0; i < 4; ++i) {
    EXPECT_EQ(two[i], one[i]);
    EXPECT_EQ(two[5 + i], one[i]);
  }
  EXPECT_EQ(two[4], 9.f);
  EXPECT_EQ(two[9], 9.f);
}

TEST(Rope, InvalidConfigsThrow) {
  RopeConfig c;
  c.rotary_dim = 5;
  EXPECT_THROW(RopeTable(c, 8), tpa::Error);  // odd
  c.rotary_dim = 10;
  EXPECT_THROW(RopeTable(c, 8), tpa::Error);  // larger than the head dim
  c.rotary_dim = 0;
  EXPECT_THROW(RopeTable(c, 7), tpa::Error);  // full rotary of an odd dim
  c.base = 0;
  EXPECT_THROW(RopeTable(c, 8), tpa::Error);
  c.base = 10000;
  c.max_positions = 0;
  EXPECT_THROW(RopeTable(c, 8), tpa::Error);
  try {
    c.max_positions = 16;
    c.rotary_dim = 5;
    RopeTable t(c, 8);
    FAIL();
  } catch (const tpa::Error& e) {
    EXPECT_NE(std::string(e.what()).find("(5)"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("even"), std::string::npos) << e.what();
  }
}

// A table past kMaxRopeTableBytes (1 GiB) is rejected by validate(), naming the value, before
// anything is allocated: 2^61 positions of head dim 16 overflowed the table size and crashed
// the layer constructor, 2^60 threw std::length_error, 2^40 std::bad_alloc (issue 27).
TEST(Rope, TablesPastTheBoundThrowNamingMaxPositions) {
  RopeConfig c;
  for (const tpa::Index n : {tpa::Index(1) << 61, tpa::Index(1) << 60, tpa::Index(1) << 40,
                             std::numeric_limits<tpa::Index>::max()}) {
    c.max_positions = n;
    try {
      RopeTable t(c, 16);
      ADD_FAILURE() << n << ": no error";
    } catch (const tpa::Error& e) {
      const std::string what = e.what();
      EXPECT_NE(what.find("rope.max_positions (" + std::to_string(n) + ")"), std::string::npos)
          << what;
      EXPECT_NE(what.find("at most 1 GiB, i.e. at most 16777216 positions"), std::string::npos)
          << what;
    }
  }
  // The bound itself: 2^30 bytes of cos and sin for rotary dim 16 is 2^24 positions; rotary
  // dim 2 (and 0, counted as 2) allows 2^27.
  c.max_positions = tpa::Index(1) << 24;
  EXPECT_NO_THROW(c.validate("test", 16));
  c.max_positions += 1;
  EXPECT_THROW(c.validate("test", 16), tpa::Error);
  c.max_positions = tpa::Index(1) << 27;
  EXPECT_NO_THROW(c.validate("test", 2));
  EXPECT_NO_THROW(c.validate("test", 0));
  c.max_positions += 1;
  EXPECT_THROW(c.validate("test", 2), tpa::Error);
  // A negative vector size is rejected too (it validated with rotary_dim 0 before).
  c.max_positions = 16;
  EXPECT_THROW(c.validate("test", -4), tpa::Error);
}

TEST(Rope, PositionsPastTheTableThrow) {
  auto t = table(RopeStyle::kHalfSplit, 4);
  EXPECT_NO_THROW(t.check_positions("test", 60, 4));
  EXPECT_THROW(t.check_positions("test", 60, 5), tpa::Error);
  EXPECT_THROW(t.check_positions("test", 64, 1), tpa::Error);
  // Extreme values throw (no first + count overflow: found by fuzz_config).
  constexpr tpa::Index kMax = std::numeric_limits<tpa::Index>::max();
  constexpr tpa::Index kMin = std::numeric_limits<tpa::Index>::min();
  EXPECT_THROW(t.check_positions("test", kMax, kMax), tpa::Error);
  EXPECT_THROW(t.check_positions("test", 1, kMax), tpa::Error);
  EXPECT_THROW(t.check_positions("test", kMin, kMin), tpa::Error);
  EXPECT_THROW(t.check_positions("test", 0, -1), tpa::Error);
  EXPECT_NO_THROW(t.check_positions("test", 64, 0));
}

TEST(Rope, UnknownStyleThrows) {
  RopeConfig c;
  c.style = static_cast<RopeStyle>(4);
  EXPECT_THROW(c.validate("test", 8), tpa::Error);
  EXPECT_THROW(RopeTable(c, 8), tpa::Error);
  c.style = static_cast<RopeStyle>(-1);
  EXPECT_THROW(c.validate("test", 8), tpa::Error);
}

// ---- RoPE with decay --------------------------------------------------------------------------

RopeTable decay_table(RopeStyle style, tpa::Index dim, tpa::Index rotary, double decay_base,
                      tpa::Index positions = 64) {
  RopeConfig c;
  c.style = style;
  c.rotary_dim = rotary;
  c.max_positions = positions;
  c.decay_base = decay_base;
  return RopeTable(c, dim);
}

// decay[p, i] = decay_base^(p·θ_i), from the double value, as the reference computes it
// (exp(p·θ_i · ln decay_base)); the cos/sin tables are those of plain RoPE.
TEST(RopeDecay, TableIsDecayBaseToThePowerOfTheAngle) {
  const auto t = decay_table(RopeStyle::kHalfSplitReversed, 24, 8, 0.9);
  const auto plain = table(RopeStyle::kHalfSplitReversed, 24, 8);
  ASSERT_TRUE(t.has_decay());
  EXPECT_FALSE(plain.has_decay());
  for (tpa::Index p : {0, 1, 5, 63}) {
    for (int i = 0; i < 4; ++i) {
      const double theta = p * std::pow(10000.0, -2.0 * i / 8.0);
      EXPECT_NEAR(t.decay_row(p)[i], std::pow(0.9, theta), 1e-7 * std::pow(0.9, theta));
      EXPECT_EQ(t.cos_row(p)[i], plain.cos_row(p)[i]);
      EXPECT_EQ(t.sin_row(p)[i], plain.sin_row(p)[i]);
    }
  }
  EXPECT_EQ(t.decay_row(0)[0], 1.f);  // θ = 0 at position 0: no decay
}

// y1 = (x1 cos + x2 sin)·decay, y2 = (−x1 sin + x2 cos)·decay on the rotated dims (the reference's
// apply_rotary_emb for half-split reversed), the rest passes through; every style.
TEST(RopeDecay, RotationThenDecayOnTheRotatedDimsOnly) {
  for (auto style : {RopeStyle::kHalfSplit, RopeStyle::kHalfSplitReversed, RopeStyle::kInterleaved}) {
    const auto t = decay_table(style, 10, 6, 0.8);
    const auto plain = table(style, 10, 6);
    const auto x0 = tpa_test::random_tensor(1, 10, 7);
    for (tpa::Index p : {0, 3, 40}) {
      std::vector<float> x(x0.data(), x0.data() + 10), y(x);
      t.rotate(x.data(), p);
      plain.rotate(y.data(), p);
      for (int i = 0; i < 3; ++i) {
        const double dk = std::pow(0.8, p * std::pow(10000.0, -2.0 * i / 6.0));
        const int ia = style == RopeStyle::kInterleaved ? 2 * i : i;
        const int ib = style == RopeStyle::kInterleaved ? 2 * i + 1 : i + 3;
        EXPECT_NEAR(x[ia], y[ia] * dk, 1e-6) << tpa::rope_style_name(style) << " p " << p;
        EXPECT_NEAR(x[ib], y[ib] * dk, 1e-6) << tpa::rope_style_name(style) << " p " << p;
      }
      for (int i = 6; i < 10; ++i) EXPECT_EQ(x[i], x0.data()[i]);  // pass-through dims
    }
  }
}

// decay_base 1 is plain RoPE: no decay table, and the rotation is bit for bit the same.
TEST(RopeDecay, DecayBaseOneIsPlainRopeBitForBit) {
  for (auto style : {RopeStyle::kHalfSplit, RopeStyle::kHalfSplitReversed, RopeStyle::kInterleaved}) {
    const auto one = decay_table(style, 16, 12, 1.0);
    const auto plain = table(style, 16, 12);
    EXPECT_FALSE(one.has_decay());
    const auto x0 = tpa_test::random_tensor(3, 16, 11);
    for (tpa::Index p : {0, 1, 33, 63}) {
      std::vector<float> a(x0.data(), x0.data() + 48), b(a);
      one.rotate(a.data(), p, 3, 16);
      plain.rotate(b.data(), p, 3, 16);
      EXPECT_EQ(a, b) << tpa::rope_style_name(style) << " p " << p;
    }
  }
}

// Far positions: decay_base^θ underflows. Factors below the smallest normal float are stored as
// 0 (no subnormals), and rotating a finite vector there gives finite values (0 in the dims that
// fully decayed), never NaN or inf, for inputs up to the largest float.
TEST(RopeDecay, UnderflowGivesZerosNeverNaN) {
  const tpa::Index P = 4096;
  const auto t = decay_table(RopeStyle::kHalfSplitReversed, 8, 8, 0.5, P);
  const float tiny = std::numeric_limits<float>::min();
  bool some_zero = false;
  for (tpa::Index p = 0; p < P; ++p)
    for (int i = 0; i < 4; ++i) {
      const float f = t.decay_row(p)[i];
      EXPECT_TRUE(f == 0.f || (f >= tiny && f <= 1.f)) << "p " << p << " i " << i << ": " << f;
      some_zero = some_zero || f == 0.f;
    }
  EXPECT_TRUE(some_zero);
  EXPECT_EQ(t.decay_row(127)[0], 0.f);  // 0.5^127 < 2^-126, the smallest normal float
  EXPECT_GE(t.decay_row(125)[0], tiny);  // 0.5^125 = 2^-125
  // Inputs up to max/4, so that the rotation itself (|a cos − b sin| ≤ √2 max|a, b|) cannot
  // overflow.
  const float big = std::numeric_limits<float>::max() / 4;
  for (tpa::Index p : {tpa::Index(0), tpa::Index(126), tpa::Index(127), P - 1}) {
    std::vector<float> x = {big, -big, 1e-30f, 3.f, big, 2.f, -1.f, 0.5f};
    t.rotate(x.data(), p);
    for (float v : x) EXPECT_TRUE(std::isfinite(v)) << "p " << p << ": " << v;
  }
  std::vector<float> x = {1, 2, 3, 4, 5, 6, 7, 8};
  t.rotate(x.data(), P - 1);
  EXPECT_EQ(x[0], 0.f);  // θ_0 = 1: 0.5^4095 = 0
  EXPECT_EQ(x[4], 0.f);
}

TEST(RopeDecay, InvalidDecayBaseThrowsNamingTheValueAndTheRule) {
  for (double bad : {0.0, -0.5, 1.5, std::numeric_limits<double>::infinity(),
                     std::numeric_limits<double>::quiet_NaN(), -std::numeric_limits<double>::infinity()}) {
    RopeConfig c;
    c.decay_base = bad;
    try {
      c.validate("test", 8);
      ADD_FAILURE() << bad << ": no error";
    } catch (const tpa::Error& e) {
      const std::string what = e.what();
      EXPECT_NE(what.find("rope.decay_base ("), std::string::npos) << what;
      EXPECT_NE(what.find("must be finite and in (0, 1]"), std::string::npos) << what;
    }
    EXPECT_THROW(RopeTable(c, 8), tpa::Error);
  }
  RopeConfig ok;
  for (double good : {1.0, 0.999, 0.5, 1e-300}) {
    ok.decay_base = good;
    EXPECT_NO_THROW(ok.validate("test", 8)) << good;
  }
  // The decay table counts towards the 1 GiB bound: r + r/2 floats per position.
  ok.decay_base = 0.9;
  ok.max_positions = (tpa::Index(1) << 28) / 24;
  EXPECT_NO_THROW(ok.validate("test", 16));
  ok.max_positions += 1;
  EXPECT_THROW(ok.validate("test", 16), tpa::Error);
}

// ---- RoPE off ----------------------------------------------------------------------------------

// Style kNone: nothing rotates (the same as rotating by angle 0, i.e. to position 0), no table,
// and positions are bounded only against overflow; its other fields are ignored.
TEST(RopeOff, NothingRotatesAndNoPositionBound) {
  RopeConfig c;
  c.style = RopeStyle::kNone;
  c.max_positions = 0;  // ignored
  c.rotary_dim = 7;     // ignored
  c.base = -1;          // ignored
  const RopeTable t(c, 8);
  EXPECT_FALSE(t.enabled());
  EXPECT_FALSE(t.has_decay());
  EXPECT_EQ(t.rotary_dim(), 0);
  EXPECT_EQ(c.resolved_dim(8), 0);
  EXPECT_STREQ(tpa::rope_style_name(RopeStyle::kNone), "none");
  const auto x0 = tpa_test::random_tensor(2, 8, 3);
  const auto angle0 = table(RopeStyle::kHalfSplitReversed, 8);
  for (tpa::Index p : {tpa::Index(0), tpa::Index(5), tpa::Index(1) << 40}) {
    std::vector<float> x(x0.data(), x0.data() + 16), y(x);
    t.rotate(x.data(), p, 2, 8);
    angle0.rotate(y.data(), 0, 2, 8);  // angle 0
    EXPECT_EQ(x, y);
    EXPECT_EQ(x, std::vector<float>(x0.data(), x0.data() + 16));
  }
  constexpr tpa::Index kMax = std::numeric_limits<tpa::Index>::max();
  EXPECT_NO_THROW(t.check_positions("test", 0, 1));
  EXPECT_NO_THROW(t.check_positions("test", tpa::Index(1) << 50, 1000));
  EXPECT_NO_THROW(t.check_positions("test", kMax - 1, 1));
  EXPECT_THROW(t.check_positions("test", kMax, 1), tpa::Error);
  EXPECT_THROW(t.check_positions("test", 1, kMax), tpa::Error);
  EXPECT_THROW(t.check_positions("test", -1, 1), tpa::Error);
  EXPECT_THROW(t.check_positions("test", 0, -1), tpa::Error);
  // Decay needs rotated dims.
  c.decay_base = 0.9;
  try {
    c.validate("test", 8);
    ADD_FAILURE() << "decay with RoPE off: no error";
  } catch (const tpa::Error& e) {
    EXPECT_NE(std::string(e.what()).find("rope.decay_base (0.9) must be 1 when rope.style is none"),
              std::string::npos)
        << e.what();
  }
}

}  // namespace rope_test
