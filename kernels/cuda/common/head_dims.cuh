// The head dims the attention rungs are built for (32, 64, 80, 96, 128, 192, 256: the models in use)
// and the one dispatch from a runtime head dim to a kernel template: f(std::integral_constant<int,
// D>{}) for d among those up to kMax. A rung's problem check has refused every other head dim
// before, so anything else goes to the largest.
#pragma once

#include <type_traits>

namespace attn::cuda {

template <int kMax = 256, class F>
decltype(auto) with_head_dim(int d, F&& f) {
  if (d == 32) return f(std::integral_constant<int, 32>{});
  if (d == 64) return f(std::integral_constant<int, 64>{});
  if (d == 80) return f(std::integral_constant<int, 80>{});
  if (d == 96) return f(std::integral_constant<int, 96>{});
  if constexpr (kMax == 128) {
    return f(std::integral_constant<int, 128>{});
  } else {
    static_assert(kMax == 256);
    if (d == 128) return f(std::integral_constant<int, 128>{});
    if (d == 192) return f(std::integral_constant<int, 192>{});
    return f(std::integral_constant<int, 256>{});
  }
}

}  // namespace attn::cuda
