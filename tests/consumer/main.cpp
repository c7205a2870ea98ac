// Uses the installed tpa through find_package(tpa) + tpa::tpa. Returns non-zero on any failure.
#include <tpa/tpa.hpp>

#include <cstdio>
#include <string>

namespace {

int failures = 0;

void expect(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "tpa_consumer: FAILED: %s\n", what);
    ++failures;
  }
}

}  // namespace

int main() {
  // Errors: TPA_CHECK throws tpa::Error with the concatenated message.
  bool caught = false;
  try {
    const int n_heads = 12;
    const int n_kv_heads = 5;
    TPA_CHECK(n_heads % n_kv_heads == 0, "n_heads (", n_heads, ") is not a multiple of n_kv_heads (",
              n_kv_heads, ")");
  } catch (const tpa::Error& e) {
    caught = true;
    expect(std::string(e.what()) == "n_heads (12) is not a multiple of n_kv_heads (5)",
           "tpa::Error message");
  }
  expect(caught, "TPA_CHECK(false, ...) throws tpa::Error");

  // Tensors: the row-major Eigen alias.
  tpa::Tensor<float, 2> x(3, 4);
  for (tpa::Index i = 0; i < x.dimension(0); ++i) {
    for (tpa::Index j = 0; j < x.dimension(1); ++j) x(i, j) = static_cast<float>(10 * i + j);
  }
  expect(x.dimension(0) == 3 && x.dimension(1) == 4, "tensor dimensions");
  expect(x.data()[1 * 4 + 2] == 12.0f, "tensor is row-major");
  const tpa::Tensor<float, 0> sum = x.sum();
  expect(sum() == 4.0f * (0 + 10 + 20) + 3.0f * (0 + 1 + 2 + 3), "tensor sum");

  if (failures == 0) std::printf("tpa_consumer: OK\n");
  return failures == 0 ? 0 : 1;
}
