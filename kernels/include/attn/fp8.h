// float8 e4m3 (OCP FP8 "E4M3FN": 1 sign, 4 exponent bits with bias 7, 3 mantissa bits; no
// infinities, S.1111.111 is NaN, the largest finite value is 448) and the scaled quantization of
// a KV cache's float8 storage. It is a storage format of KV caches only, never a tensor's dtype:
// DType does not list it.
//
// Conversions from float round to nearest, ties to even, and saturate: anything above 448 in
// magnitude (infinities included) becomes +-448; NaN stays NaN (0x7f, with its sign). Decoding is
// a table of the 256 codes.
#pragma once

#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace attn {

inline constexpr float kFp8E4M3Max = 448.0f;

namespace detail {
// decode_e4m3 of every code.
extern const std::array<float, 256> kFp8E4M3Table;
}  // namespace detail

inline float fp8_e4m3_to_float(std::uint8_t code) { return detail::kFp8E4M3Table[code]; }

inline std::uint8_t float_to_fp8_e4m3(float f) {
  std::uint32_t x;
  std::memcpy(&x, &f, 4);
  const std::uint8_t sign = static_cast<std::uint8_t>((x >> 24) & 0x80u);
  const std::uint32_t abs = x & 0x7fffffffu;
  if (abs > 0x7f800000u) return sign | 0x7f;   // NaN
  if (abs >= 0x43e00000u) return sign | 0x7e;  // >= 448 (and infinity): saturate
  if (abs < 0x3c800000u) {                     // below 2^-6: subnormal steps of 2^-9
    float a;
    std::memcpy(&a, &abs, 4);
    // a * 512 is exact; nearbyint rounds ties to even under the default rounding mode. 8 steps
    // is 2^-6, code 0x08, the smallest normal: the codes run on.
    return sign | static_cast<std::uint8_t>(std::nearbyint(a * 512.0f));
  }
  // Normal: drop 20 of float32's 23 mantissa bits, ties to even; a carry moves into the
  // exponent, as it should. Rebias 127 -> 7.
  const std::uint32_t rounded = (abs + 0x7ffffu + ((abs >> 20) & 1u)) >> 20;
  const std::uint32_t code = rounded - ((127u - 7u) << 3);
  return sign | static_cast<std::uint8_t>(code > 0x7eu ? 0x7eu : code);
}

// The power-of-two scale a KV page needs for values up to `amax` in magnitude: the smallest 2^e
// (e >= -126) with amax / 2^e <= 448. 0 when amax is 0 or not finite (nothing to scale).
float fp8_pow2_scale(float amax);

// codes[i] = e4m3(x[i] / scale), saturating. scale 0 (a page of zeros): every code 0 (NaN stays
// NaN). With a power-of-two scale the division is exact: one rounding, the conversion's.
void quantize_fp8_e4m3(const float* x, std::int64_t n, float scale, std::uint8_t* codes);
// out[i] = e4m3(codes[i]) * scale.
void dequantize_fp8_e4m3(const std::uint8_t* codes, std::int64_t n, float scale, float* out);

}  // namespace attn
