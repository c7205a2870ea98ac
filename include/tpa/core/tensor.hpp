// Eigen aliases used throughout tpa: row-major tensors, non-owning views, and row-major matrices.
#pragma once

#include <Eigen/Core>
#include <unsupported/Eigen/CXX11/Tensor>

#include <cstdint>

namespace tpa {

using Index = Eigen::Index;

/// Owning row-major tensor, e.g. Tensor<float, 2> x(tokens, d_model).
template <class T, int N>
using Tensor = Eigen::Tensor<T, N, Eigen::RowMajor, Index>;

/// Non-owning mutable view of row-major memory; an lvalue Tensor<T, N> converts to it implicitly.
template <class T, int N>
using TensorView = Eigen::TensorMap<Eigen::Tensor<T, N, Eigen::RowMajor, Index>>;

/// Non-owning read-only view of row-major memory; a (const) Tensor<T, N> converts implicitly.
template <class T, int N>
using ConstTensorView = Eigen::TensorMap<const Eigen::Tensor<T, N, Eigen::RowMajor, Index>>;

/// Row-major dense matrix (weights are [out, in] like PyTorch's nn.Linear.weight).
template <class T>
using Matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <class T>
using MatrixMap = Eigen::Map<Matrix<T>>;
template <class T>
using ConstMatrixMap = Eigen::Map<const Matrix<T>>;

using bfloat16 = Eigen::bfloat16;
using half = Eigen::half;

}  // namespace tpa
