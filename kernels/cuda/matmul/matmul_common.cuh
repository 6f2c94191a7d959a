// Shared by the fp32 matmul rungs: the problem as plain numbers, operand access "as stored"
// (transpose flags are template parameters, so each layout gets its own compiled kernel), and the
// batch offsets.
#pragma once

#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <string>
#include <type_traits>

#include "attn/executor.h"
#include "attn/ops.h"
#include "../cuda_check.h"

namespace attn::cuda {

struct MatmulProblem {
  int batch, m, n, k;
  bool ta, tb;
  const float* a;
  const float* b;
  float* c;
  long long stride_a, stride_b, stride_c;  // elements between batches; stride_b 0 when shared
};

inline Result<MatmulProblem> fp32_problem(const MatmulArgs& args) {
  ATTN_ASSIGN_OR_RETURN(d, matmul_dims(args.a, args.b, args.transpose_a, args.transpose_b));
  if (args.a.dtype != DType::kFloat32) {
    return invalid_argument("a.dtype: this variant takes float32, got " +
                            std::string(dtype_name(args.a.dtype)));
  }
  if (d.m > INT_MAX || d.n > INT_MAX || d.k > INT_MAX || d.batch > 65535) {
    return invalid_argument("a.shape: this variant takes M, N, K < 2^31 and a batch <= 65535");
  }
  return MatmulProblem{static_cast<int>(d.batch), static_cast<int>(d.m), static_cast<int>(d.n),
                       static_cast<int>(d.k), args.transpose_a, args.transpose_b,
                       static_cast<const float*>(args.a.data), static_cast<const float*>(args.b.data),
                       static_cast<float*>(args.c.data), d.m * d.k, d.b_batched ? d.k * d.n : 0,
                       d.m * d.n};
}

inline Status fp32_supports(const MatmulArgs& args) { return fp32_problem(args).status(); }

// What the 16-bit tensor-core rungs (07, 08) take: bfloat16/float16, each operand's contiguous
// dimension a multiple of 8 elements (16-byte copies), 16-byte aligned data, sizes below 2^30.
inline Status sixteen_bit_supports(const MatmulArgs& args, const MatmulDims& d, const std::string& name) {
  if (args.a.dtype != DType::kBFloat16 && args.a.dtype != DType::kFloat16) {
    return invalid_argument("a.dtype: " + name + " takes bfloat16, float16, got " + std::string(dtype_name(args.a.dtype)));
  }
  const long long a_inner = args.transpose_a ? d.m : d.k, b_inner = args.transpose_b ? d.k : d.n;
  if (a_inner % 8 != 0) {
    return invalid_argument("a.shape: " + name + " needs a's contiguous dimension (" + (args.transpose_a ? "M" : "K") +
                            ") to be a multiple of 8, got " + std::to_string(a_inner));
  }
  if (b_inner % 8 != 0) {
    return invalid_argument("b.shape: " + name + " needs b's contiguous dimension (" + (args.transpose_b ? "K" : "N") +
                            ") to be a multiple of 8, got " + std::to_string(b_inner));
  }
  if (d.m > INT_MAX / 2 || d.n > INT_MAX / 2 || d.k > INT_MAX / 2 || d.batch > 65535) {
    return invalid_argument("a.shape: " + name + " takes M, N, K < 2^30 and a batch <= 65535");
  }
  for (const TensorView* t : {&args.a, &args.b, &args.c})
    if (reinterpret_cast<std::uintptr_t>(t->data) % 16 != 0)
      return invalid_argument("a.data: " + name + " needs 16-byte aligned operands");
  return Status::Ok();
}

// A(i, kk) and B(kk, j) of the logical product, read from the operands as stored.
template <bool TA>
__device__ __forceinline__ float a_at(const float* a, int i, int kk, int m, int k) {
  return TA ? a[static_cast<long long>(kk) * m + i] : a[static_cast<long long>(i) * k + kk];
}
template <bool TB>
__device__ __forceinline__ float b_at(const float* b, int kk, int j, int k, int n) {
  return TB ? b[static_cast<long long>(j) * k + kk] : b[static_cast<long long>(kk) * n + j];
}

// Calls f(std::bool_constant<TA>, std::bool_constant<TB>) for the problem's flags.
template <class F>
void with_layout(const MatmulProblem& p, F&& f) {
  if (p.ta) {
    if (p.tb) f(std::true_type{}, std::true_type{});
    else f(std::true_type{}, std::false_type{});
  } else {
    if (p.tb) f(std::false_type{}, std::true_type{});
    else f(std::false_type{}, std::false_type{});
  }
}

inline cudaStream_t stream_of(Stream& s) { return static_cast<cudaStream_t>(s.cuda_stream()); }

inline int ceil_div(long long a, int b) { return static_cast<int>((a + b - 1) / b); }

}  // namespace attn::cuda
