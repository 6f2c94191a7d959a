// Converting tensors to float32 on load and back on store, the CPU kernels' one way to serve
// float16 and bfloat16.
#pragma once

#include <cstdint>
#include <vector>

#include "attn/tensor.h"
#include "vectorized.h"

namespace attn::cpu {

// Elements [begin, begin + count) of `t` as float32, into `out`.
inline void load_floats(const TensorView& t, std::int64_t begin, std::int64_t count, float* out) {
  const auto* bytes = static_cast<const char*>(t.data);
  convert_to_float(bytes + begin * static_cast<std::int64_t>(element_size(t.dtype)), t.dtype, count,
                   out);
}

inline void store_floats(const TensorView& t, std::int64_t begin, std::int64_t count,
                         const float* in) {
  auto* bytes = static_cast<char*>(t.data);
  convert_from_float(in, t.dtype, count,
                     bytes + begin * static_cast<std::int64_t>(element_size(t.dtype)));
}

// The whole tensor as float32.
inline std::vector<float> to_float_vector(const TensorView& t) {
  std::vector<float> out(static_cast<std::size_t>(t.numel()));
  load_floats(t, 0, t.numel(), out.data());
  return out;
}

}  // namespace attn::cpu
