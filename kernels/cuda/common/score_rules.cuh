// How the tensor-core attention tiles turn raw scores q.k into softmax inputs, and which keys a
// row keeps: shared by the dense and paged rungs. Scores go into log2 units (the tiles use exp2):
// s * scale_log2, or under a soft cap cap_log2 * tanh(s * cap_pre) with cap_pre = scale / cap and
// cap_log2 = cap * log2(e) (cap * tanh(scale s / cap), in log2 units).
#pragma once

#include <cuda_runtime.h>

#include <type_traits>

namespace attn::cuda {

// Rows of a head in shared memory are padded to a power of two >= 64 elements (128 bytes of
// 16-bit values): 16-byte chunks swizzled by XOR with row % 8 stay inside their row, and a lane's
// address for k-step kk is its base XOR kk's chunk (no carry from the row into the chunk bits).
// The tiles read and write only the first D columns.
template <int D>
constexpr int padded_dim() {
  return D <= 64 ? 64 : D <= 128 ? 128 : 256;
}

// tanh in one MUFU instruction (relative error 2^-11): well inside the 16-bit types' tolerance.
__device__ __forceinline__ float tanh_approx(float x) {
  float y;
  asm("tanh.approx.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

struct ScoreMap {
  float scale_log2;
  float cap_pre, cap_log2;  // cap_log2 == 0: no soft cap
  __device__ __forceinline__ bool capped() const { return cap_log2 != 0.0f; }
  __device__ __forceinline__ float operator()(float s) const {
    return capped() ? cap_log2 * tanh_approx(s * cap_pre) : s * scale_log2;
  }
};

// The keys [x, y) a row keeps, from a rule that gives either the end alone (an int: keys from 0)
// or both ends (an int2).
template <class Rule>
__device__ __forceinline__ int2 kept_keys(const Rule& rule, int row) {
  if constexpr (std::is_same_v<decltype(rule(row)), int2>) return rule(row);
  else return make_int2(0, rule(row));
}

}  // namespace attn::cuda
