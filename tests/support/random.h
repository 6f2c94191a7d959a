// Random test tensors and output poisoning.
#pragma once

#include <cmath>
#include <cstdlib>
#include <limits>
#include <random>

#include "attn/tensor.h"

namespace attn::testing {

// Fresh random inputs each run (a seed from the device), reported on failure via `seed()`;
// ATTN_TEST_SEED=<n> replays a reported run.
inline std::uint64_t seed() {
  static const std::uint64_t s = [] {
    if (const char* replay = std::getenv("ATTN_TEST_SEED")) return std::strtoull(replay, nullptr, 10);
    return static_cast<unsigned long long>(std::random_device{}());
  }();
  return s;
}

inline Tensor random_tensor(DType dtype, const Shape& shape, std::mt19937_64& rng,
                            float stddev = 1.0f) {
  Tensor t(dtype, shape);
  std::normal_distribution<float> dist(0.0f, stddev);
  for (std::size_t i = 0; i < static_cast<std::size_t>(t.numel()); ++i) t.set(i, dist(rng));
  return t;
}

// Sets every `period`-th element (the first one included) to -inf, as masks leave them.
inline void mask_every(Tensor& t, std::size_t period) {
  for (std::size_t i = 0; i < static_cast<std::size_t>(t.numel()); i += period)
    t.set(i, -std::numeric_limits<float>::infinity());
}

// Fills with NaN so an element a kernel forgets to write cannot pass.
inline void poison(Tensor& t) {
  for (std::size_t i = 0; i < static_cast<std::size_t>(t.numel()); ++i)
    t.set(i, std::numeric_limits<float>::quiet_NaN());
}

}  // namespace attn::testing
