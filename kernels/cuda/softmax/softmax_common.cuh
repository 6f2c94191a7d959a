// Shared by the softmax rungs: element types, 16-byte vectors, reductions, dtype dispatch.
// Every rung reads T, computes in float32 and writes T.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <climits>

#include "attn/executor.h"
#include "attn/ops.h"
#include "../cuda_check.h"

namespace attn::cuda {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <class T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

struct SoftmaxProblem {
  const void* x;
  void* y;
  long long rows;
  int cols;
};

inline Result<SoftmaxProblem> softmax_problem(const SoftmaxArgs& args) {
  ATTN_ASSIGN_OR_RETURN(d, softmax_dims(args.x));
  if (d.cols > INT_MAX / 2) return invalid_argument("x.shape: rows wider than 2^30 are not supported");
  return SoftmaxProblem{args.x.data, args.y.data, d.rows, static_cast<int>(d.cols)};
}

// Calls f(T{}) with the element type of `dtype`.
template <class F>
void with_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: f(float{}); break;
    case DType::kFloat16: f(__half{}); break;
    case DType::kBFloat16: f(__nv_bfloat16{}); break;
    case DType::kInt32: break;  // index arrays only; no softmax takes them
  }
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Max (kMax) or sum of v over the whole block, returned to every thread. blockDim.x a multiple
// of 32; `scratch` holds one float per warp.
template <bool kMax>
__device__ __forceinline__ float block_reduce(float v, float* scratch) {
  v = kMax ? warp_max(v) : warp_sum(v);
  if ((threadIdx.x & 31) == 0) scratch[threadIdx.x / 32] = v;
  __syncthreads();
  float r = scratch[0];
  for (int w = 1; w < static_cast<int>(blockDim.x / 32); ++w) r = kMax ? fmaxf(r, scratch[w]) : r + scratch[w];
  __syncthreads();
  return r;
}

// A running (max, sum of exp(x - max)) pair; combining two is the heart of online softmax.
struct MaxSum {
  float m, s;
};
__device__ __forceinline__ MaxSum combine(MaxSum a, MaxSum b) {
  const float m = fmaxf(a.m, b.m);
  if (m == -INFINITY) return {m, 0.0f};
  return {m, a.s * __expf(a.m - m) + b.s * __expf(b.m - m)};
}
__device__ __forceinline__ MaxSum warp_combine(MaxSum v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    MaxSum other{__shfl_xor_sync(0xffffffffu, v.m, o), __shfl_xor_sync(0xffffffffu, v.s, o)};
    v = combine(v, other);
  }
  return v;
}

// Combines a MaxSum across the `warps` warps of a group; every thread gets the result.
// `scratch` holds one MaxSum per warp of the group.
__device__ __forceinline__ MaxSum group_combine(MaxSum v, MaxSum* scratch, int warp_in_group, int warps) {
  v = warp_combine(v);
  if (warps == 1) return v;
  if ((threadIdx.x & 31) == 0) scratch[warp_in_group] = v;
  __syncthreads();
  MaxSum r = scratch[0];
  for (int w = 1; w < warps; ++w) r = combine(r, scratch[w]);
  __syncthreads();
  return r;
}

inline cudaStream_t softmax_stream(Stream& s) { return static_cast<cudaStream_t>(s.cuda_stream()); }

}  // namespace attn::cuda
