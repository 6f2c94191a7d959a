// A matmul sized to keep the server's CPU backend busy for about a given time on this machine
// (release, sanitizer or debug build alike): a small one is timed first, and the size scaled by
// the cube root of the ratio. It runs the hand-written variant (kSlowMatmulKernel): OpenBLAS's
// would need inputs so large that sending and decoding them (under ASan, seconds) would outlast
// the call they are meant to queue behind.
#pragma once

#include <algorithm>
#include <cmath>
#include <stdexcept>

#include "attn/client.h"
#include "support/random.h"

namespace attn::testing {

inline constexpr const char* kSlowMatmulKernel = "matmul/cpu_blocked";

inline std::int64_t calibrated_matmul_size(Client& client, double seconds) {
  std::mt19937_64 rng(seed());
  constexpr std::int64_t kProbe = 256;
  Tensor a = random_tensor(DType::kFloat32, {kProbe, kProbe}, rng);
  double best = 1e30;
  for (int i = 0; i < 3; ++i) {
    auto r = client.matmul(a, a, {false, false, kSlowMatmulKernel});
    if (!r.ok()) throw std::runtime_error("calibration matmul failed: " + r.status().to_string());
    best = std::min(best, static_cast<double>(r->timings.kernel_ns()) * 1e-9);
  }
  const double n = kProbe * std::cbrt(seconds / std::max(best, 1e-6));
  return std::clamp<std::int64_t>(static_cast<std::int64_t>(n) / 64 * 64, 256, 4096);
}

}  // namespace attn::testing
