// Converting tensors to float32 on load and back on store, the CPU kernels' one way to serve
// float16 and bfloat16.
#pragma once

#include <cstdint>
#include <vector>

#include "attn/tensor.h"

namespace attn::cpu {

// Elements [begin, begin + count) of `t` as float32, into `out`.
inline void load_floats(const TensorView& t, std::int64_t begin, std::int64_t count, float* out) {
  if (t.dtype == DType::kFloat32) {
    std::memcpy(out, static_cast<const float*>(t.data) + begin, sizeof(float) * count);
    return;
  }
  for (std::int64_t i = 0; i < count; ++i) out[i] = load_as_float(t.data, t.dtype, begin + i);
}

inline void store_floats(const TensorView& t, std::int64_t begin, std::int64_t count,
                         const float* in) {
  if (t.dtype == DType::kFloat32) {
    std::memcpy(static_cast<float*>(t.data) + begin, in, sizeof(float) * count);
    return;
  }
  for (std::int64_t i = 0; i < count; ++i) store_from_float(t.data, t.dtype, begin + i, in[i]);
}

// The whole tensor as float32.
inline std::vector<float> to_float_vector(const TensorView& t) {
  std::vector<float> out(static_cast<std::size_t>(t.numel()));
  load_floats(t, 0, t.numel(), out.data());
  return out;
}

}  // namespace attn::cpu
