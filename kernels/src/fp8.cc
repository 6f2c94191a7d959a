#include "attn/fp8.h"

#include <array>
#include <limits>

namespace attn {
namespace detail {
namespace {

constexpr float decode(unsigned code) {
  const unsigned e = (code >> 3) & 0xfu, m = code & 7u;
  float mag = 0.0f;
  if (e == 0xfu && m == 7u) {
    mag = std::numeric_limits<float>::quiet_NaN();
  } else if (e == 0) {
    mag = static_cast<float>(m) / 512.0f;  // m x 2^-9
  } else {
    mag = static_cast<float>(8u + m) / 8.0f;  // 1.m
    for (unsigned i = 7; i < e; ++i) mag *= 2.0f;
    for (unsigned i = e; i < 7; ++i) mag /= 2.0f;
  }
  return code & 0x80u ? -mag : mag;
}

constexpr std::array<float, 256> table() {
  std::array<float, 256> t{};
  for (unsigned c = 0; c < 256; ++c) t[c] = decode(c);
  return t;
}

}  // namespace

const std::array<float, 256> kFp8E4M3Table = table();  // constant-initialized

}  // namespace detail

float fp8_pow2_scale(float amax) {
  if (!(amax > 0.0f) || !std::isfinite(amax)) return 0.0f;
  int e = 0;
  std::frexp(amax / kFp8E4M3Max, &e);  // amax / 448 = f x 2^e, f in [0.5, 1): 2^e covers it
  if (e < -126) e = -126;
  float s = std::ldexp(1.0f, e);
  // 2^(e - 1) when the quotient was exactly a power of two; the check settles the rounding of
  // the division either way.
  if (e > -126 && amax / std::ldexp(1.0f, e - 1) <= kFp8E4M3Max) s = std::ldexp(1.0f, e - 1);
  return s;
}

void quantize_fp8_e4m3(const float* x, std::int64_t n, float scale, std::uint8_t* codes) {
  if (!(scale > 0.0f)) {
    for (std::int64_t i = 0; i < n; ++i) codes[i] = std::isnan(x[i]) ? 0x7f : 0;
    return;
  }
  for (std::int64_t i = 0; i < n; ++i) codes[i] = float_to_fp8_e4m3(x[i] / scale);
}

void dequantize_fp8_e4m3(const std::uint8_t* codes, std::int64_t n, float scale, float* out) {
  for (std::int64_t i = 0; i < n; ++i) out[i] = fp8_e4m3_to_float(codes[i]) * scale;
}

}  // namespace attn
