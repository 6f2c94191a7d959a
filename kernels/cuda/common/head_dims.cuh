// The head dims the attention rungs are built for (kHeadDims: the models in use), the one place
// they are listed. A rung takes a set of them (HeadDimSet: a bit per entry), which its checks,
// its limits text and its dispatch read: with_head_dim<set>(d, f) calls
// f(std::integral_constant<int, D>{}) for d among the set. A rung's problem check has refused
// every other head dim before, so anything else goes to the set's largest.
#pragma once

#include <initializer_list>
#include <string>
#include <type_traits>

namespace attn::cuda {

inline constexpr int kHeadDims[] = {32, 64, 80, 96, 128, 192, 256};
inline constexpr int kHeadDimCount = static_cast<int>(sizeof(kHeadDims) / sizeof(kHeadDims[0]));

// Bit k: kHeadDims[k].
using HeadDimSet = unsigned;
inline constexpr HeadDimSet kAllHeadDims = (1u << kHeadDimCount) - 1;

// Those of kHeadDims up to `max`.
constexpr HeadDimSet head_dims_up_to(int max) {
  HeadDimSet s = 0;
  for (int k = 0; k < kHeadDimCount; ++k)
    if (kHeadDims[k] <= max) s |= 1u << k;
  return s;
}

// The set of `dims`, each one of kHeadDims (a compile error otherwise, where constant-evaluated).
constexpr HeadDimSet head_dims_of(std::initializer_list<int> dims) {
  HeadDimSet s = 0;
  for (int d : dims) {
    int k = 0;
    while (kHeadDims[k] != d) ++k;  // past the end: not a constant expression
    s |= 1u << k;
  }
  return s;
}

constexpr bool takes_head_dim(HeadDimSet s, long long d) {
  for (int k = 0; k < kHeadDimCount; ++k)
    if ((s >> k & 1u) && kHeadDims[k] == d) return true;
  return false;
}

// "32, 64, 80": the set in words.
inline std::string head_dims_text(HeadDimSet s) {
  std::string out;
  for (int k = 0; k < kHeadDimCount; ++k)
    if (s >> k & 1u) out += (out.empty() ? "" : ", ") + std::to_string(kHeadDims[k]);
  return out;
}

namespace head_dims_detail {

template <HeadDimSet kSet, int kIndex, class F>
decltype(auto) dispatch_from(int d, F&& f) {
  constexpr int kDim = kHeadDims[kIndex];
  if constexpr (!(kSet >> kIndex & 1u)) {
    return dispatch_from<kSet, kIndex + 1>(d, f);
  } else if constexpr ((kSet >> (kIndex + 1)) == 0) {  // the largest: whatever is left
    return f(std::integral_constant<int, kDim>{});
  } else {
    if (d == kDim) return f(std::integral_constant<int, kDim>{});
    return dispatch_from<kSet, kIndex + 1>(d, f);
  }
}

}  // namespace head_dims_detail

template <HeadDimSet kSet = kAllHeadDims, class F>
decltype(auto) with_head_dim(int d, F&& f) {
  static_assert(kSet != 0 && (kSet & ~kAllHeadDims) == 0, "a set of kHeadDims");
  return head_dims_detail::dispatch_from<kSet, 0>(d, f);
}

}  // namespace attn::cuda
