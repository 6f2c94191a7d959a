// Reproducible random values, the same on the CPU and the GPU: splitmix64 of (seed, index)
// mapped to [-1, 1). Used to make inputs where they are needed (the Benchmark RPC).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define ATTN_HOST_DEVICE __host__ __device__
#else
#define ATTN_HOST_DEVICE
#endif

namespace attn {

ATTN_HOST_DEVICE inline float uniform_from_hash(std::uint64_t seed, std::uint64_t i) {
  std::uint64_t z = seed + 0x9E3779B97F4A7C15ull * (i + 1);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return static_cast<float>(z >> 40) * (1.0f / 8388608.0f) - 1.0f;  // 24 bits over [0, 2), less 1
}

}  // namespace attn
