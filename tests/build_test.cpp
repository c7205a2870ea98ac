// Build smoke test: the umbrella header compiles under the project's warning flags, the test
// wiring (TPA_TEST_DATA_DIR) works, and tpa::Error / TPA_CHECK behave as documented.
#include <tpa/tpa.hpp>

#include <gtest/gtest.h>

#include <filesystem>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace build_test {

TEST(BuildTest, ErrorIsARuntimeErrorCarryingItsMessage) {
  static_assert(std::is_base_of_v<std::runtime_error, tpa::Error>);
  const tpa::Error e("GroupedQueryAttention: n_heads (12) is not a multiple of n_kv_heads (5)");
  EXPECT_STREQ(e.what(), "GroupedQueryAttention: n_heads (12) is not a multiple of n_kv_heads (5)");

  // Catchable as std::runtime_error with the same message.
  try {
    throw tpa::Error("bad shape");
  } catch (const std::runtime_error& re) {
    EXPECT_STREQ(re.what(), "bad shape");
    EXPECT_NE(dynamic_cast<const tpa::Error*>(&re), nullptr);
    return;
  }
  FAIL() << "tpa::Error was not caught as std::runtime_error";
}

TEST(BuildTest, CheckThrowsWithTheConcatenatedMessage) {
  const int n_heads = 12;
  const int n_kv_heads = 5;
  try {
    TPA_CHECK(n_heads % n_kv_heads == 0, "GroupedQueryAttention: n_heads (", n_heads,
              ") is not a multiple of n_kv_heads (", n_kv_heads, ")");
    FAIL() << "TPA_CHECK did not throw on a false condition";
  } catch (const tpa::Error& e) {
    EXPECT_EQ(std::string(e.what()),
              "GroupedQueryAttention: n_heads (12) is not a multiple of n_kv_heads (5)");
  }

  // Mixed argument types are formatted with operator<<.
  const std::string name = "q_rank";
  EXPECT_THROW(TPA_CHECK(false, name, " = ", 2.5, ", ", 'x', ", ", 7u), tpa::Error);
  try {
    TPA_CHECK(false, name, " = ", 2.5, ", ", 'x', ", ", 7u);
  } catch (const tpa::Error& e) {
    EXPECT_EQ(std::string(e.what()), "q_rank = 2.5, x, 7");
  }
}

TEST(BuildTest, CheckPassesAndDoesNotFormatWhenTheConditionHolds) {
  int formatted = 0;
  auto count = [&formatted] {
    ++formatted;
    return "message";
  };
  EXPECT_NO_THROW(TPA_CHECK(1 + 1 == 2, count()));
  EXPECT_EQ(formatted, 0) << "message arguments must only be evaluated on failure";

  EXPECT_THROW(TPA_CHECK(1 + 1 == 3, count()), tpa::Error);
  EXPECT_EQ(formatted, 1);
}

TEST(BuildTest, CheckEvaluatesItsConditionOnceAndIsOneStatement) {
  int evaluations = 0;
  auto cond = [&evaluations] {
    ++evaluations;
    return true;
  };
  // Unbraced if/else: TPA_CHECK must expand to a single statement.
  if (evaluations == 0)
    TPA_CHECK(cond(), "unreachable");
  else
    FAIL() << "else branch taken";
  EXPECT_EQ(evaluations, 1);
}

TEST(BuildTest, TensorAliasIsRowMajor) {
  static_assert(static_cast<int>(tpa::Tensor<float, 2>::Layout) == static_cast<int>(Eigen::RowMajor));
  tpa::Tensor<float, 2> x(2, 3);
  x.setZero();
  x(1, 0) = 1.0f;
  EXPECT_EQ(x.data()[3], 1.0f);
}

// tpa::is_backend tells backend tags from other types; every layer and Kernels<B> static_assert
// it (issue 27: TensorProductAttention<float> failed deep inside the kernels). Avx2 and Avx512
// are declared on every build; `enabled` says whether the flags enable them (using a disabled
// one fails to compile, naming the flags).
TEST(BuildTest, BackendTagsAreBackends) {
  static_assert(tpa::is_backend<tpa::Reference>::value);
  static_assert(tpa::is_backend_v<tpa::Portable>);
  static_assert(tpa::is_backend_v<tpa::Avx2>);
  static_assert(tpa::is_backend_v<tpa::Avx512>);
  static_assert(tpa::is_backend_v<tpa::Native>);
  static_assert(tpa::Native::enabled && tpa::Portable::enabled && tpa::Reference::enabled);
  static_assert(!tpa::is_backend_v<float>);
  static_assert(!tpa::is_backend_v<int>);
  static_assert(!tpa::is_backend_v<tpa::Kernels<tpa::Reference>>);
  static_assert(!tpa::is_backend_v<tpa::Tensor<float, 2>>);
#if defined(TPA_HAVE_AVX2)
  static_assert(tpa::Avx2::enabled);
#else
  static_assert(!tpa::Avx2::enabled);
#endif
#if defined(TPA_HAVE_AVX512)
  static_assert(tpa::Avx512::enabled && std::is_same_v<tpa::Native, tpa::Avx512>);
#else
  static_assert(!tpa::Avx512::enabled);
#endif
  SUCCEED() << "native backend: " << tpa::Native::name;
}

TEST(BuildTest, TestDataDirExists) {
  const std::filesystem::path dir(TPA_TEST_DATA_DIR);
  EXPECT_TRUE(dir.is_absolute()) << dir;
  EXPECT_TRUE(std::filesystem::is_directory(dir)) << dir;
}

}  // namespace build_test
