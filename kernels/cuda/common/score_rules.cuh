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

// tanh as (1 - t) / (1 + t), t = 2^(-2 |x| log2 e): two MUFU instructions (ex2, rcp) with an
// absolute error near 1e-7. tanh.approx.f32 is one instruction, but its relative error of 2^-11
// near saturation is, times a cap of 50, 0.025 in a logit: 2.5% in a probability.
__device__ __forceinline__ float soft_tanh(float x) {
  float t, r;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(t) : "f"(fabsf(x) * -2.8853900817779268f));
  asm("rcp.approx.ftz.f32 %0, %1;\n" : "=f"(r) : "f"(1.0f + t));
  return copysignf((1.0f - t) * r, x);
}

struct ScoreMap {
  float scale_log2;
  float cap_pre, cap_log2;  // cap_log2 == 0: no soft cap
  __device__ __forceinline__ bool capped() const { return cap_log2 != 0.0f; }
  __device__ __forceinline__ float operator()(float s) const {
    return capped() ? cap_log2 * soft_tanh(s * cap_pre) : s * scale_log2;
  }
};

// The end of a row's online softmax, with the sink of its query head (null: none) joining the
// denominator: from its running max m and sum l (log2 units), the factor its unnormalized output
// takes (0 for a row that saw no key) and its log-sum-exp in log2 units (-inf, or the sink).
struct RowEnd {
  float inv, lse_log2;
};
__device__ __forceinline__ RowEnd finish_row(float m, float l, const float* sinks, int head) {
  if (!sinks) return {l > 0.0f ? 1.0f / l : 0.0f, m + log2f(l)};
  const float s2 = __ldg(sinks + head) * 1.4426950408889634f;
  const float mf = fmaxf(m, s2);
  const float keep = m == -INFINITY ? 0.0f : exp2f(m - mf);
  const float total = l * keep + exp2f(s2 - mf);
  return {keep / total, mf + log2f(total)};
}

// The keys [x, y) a row keeps, from a rule that gives either the end alone (an int: keys from 0)
// or both ends (an int2).
template <class Rule>
__device__ __forceinline__ int2 kept_keys(const Rule& rule, int row) {
  if constexpr (std::is_same_v<decltype(rule(row)), int2>) return rule(row);
  else return make_int2(0, rule(row));
}

}  // namespace attn::cuda
