#include "vectorized.h"

#include <cpuid.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

// glibc's 8-lane expf for AVX2 (libmvec, x86_64 vector function ABI name). math.h declares it
// only under -ffast-math, for the compiler's own vectorizer; calling it by name gives the same
// function (max error 4 ulp by glibc's tests, 1 ulp in practice) without fast-math elsewhere.
extern "C" __attribute__((target("avx2"))) __m256 _ZGVdN8v_expf(__m256 x);

namespace attn::cpu {
namespace {

// Asked once, on first use (a static initializer could run before the CPU model is known).
bool avx2() {
  static const bool yes = [] {
    __builtin_cpu_init();
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    const bool f16c = __get_cpuid(1, &eax, &ebx, &ecx, &edx) && (ecx & bit_F16C);
    return f16c && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return yes;
}

// bfloat16 is the top half of a float32: widening is a shift, narrowing a rounding add. Both
// loops are plain integer arithmetic that the compiler vectorizes for any target.
void bfloat16_to_float(const std::uint16_t* src, std::int64_t n, float* out) {
  for (std::int64_t i = 0; i < n; ++i) {
    const std::uint32_t bits = std::uint32_t{src[i]} << 16;
    std::memcpy(out + i, &bits, 4);
  }
}

void float_to_bfloat16(const float* in, std::int64_t n, std::uint16_t* dst) {
  for (std::int64_t i = 0; i < n; ++i) {
    std::uint32_t x;
    std::memcpy(&x, in + i, 4);
    const bool nan = (x & 0x7fffffffu) > 0x7f800000u;
    const std::uint32_t rounded = (x + 0x7fffu + ((x >> 16) & 1u)) >> 16;  // nearest even
    dst[i] = static_cast<std::uint16_t>(nan ? (x >> 16) | 0x40u : rounded);
  }
}

__attribute__((target("avx2,fma,f16c"))) void half_to_float_avx2(const std::uint16_t* src,
                                                                 std::int64_t n, float* out) {
  std::int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(h));
  }
  for (; i < n; ++i) out[i] = half_bits_to_float(src[i]);
}

__attribute__((target("avx2,fma,f16c"))) void float_to_half_avx2(const float* in, std::int64_t n,
                                                                 std::uint16_t* dst) {
  std::int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(in + i), _MM_FROUND_TO_NEAREST_INT);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), h);
  }
  for (; i < n; ++i) dst[i] = float_to_half_bits(in[i]);
}

__attribute__((target("avx2,fma,f16c"))) float row_max_avx2(const float* x, std::int64_t n) {
  __m256 m = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  std::int64_t i = 0;
  for (; i + 8 <= n; i += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(x + i));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, m);
  float out = lanes[0];
  for (int l = 1; l < 8; ++l) out = std::max(out, lanes[l]);
  for (; i < n; ++i) out = std::max(out, x[i]);
  return out;
}

__attribute__((target("avx2,fma,f16c"))) float exp_shifted_sum_avx2(float* x, std::int64_t n,
                                                                    float shift) {
  // libmvec's expf takes a slow scalar path for a vector holding any argument below about -87
  // (a subnormal or zero result): the -inf of every masked score. Such arguments go in as -87
  // and come out as 0; NaN still comes out NaN.
  const __m256 s = _mm256_set1_ps(shift), lowest = _mm256_set1_ps(-87.0f);
  __m256 sum = _mm256_setzero_ps();
  std::int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 arg = _mm256_sub_ps(_mm256_loadu_ps(x + i), s);
    const __m256 tiny = _mm256_cmp_ps(arg, lowest, _CMP_LT_OQ);
    const __m256 e = _mm256_andnot_ps(tiny, _ZGVdN8v_expf(_mm256_max_ps(lowest, arg)));
    _mm256_storeu_ps(x + i, e);
    sum = _mm256_add_ps(sum, e);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, sum);
  float out = 0.0f;
  for (float l : lanes) out += l;
  for (; i < n; ++i) {
    const float arg = x[i] - shift;
    x[i] = arg < -87.0f ? 0.0f : std::exp(arg);
    out += x[i];
  }
  return out;
}

// tanh(z) = 1 - 2 / (exp(2z) + 1); |2z| clamped to 40, where tanh is 1 in float32 already.
// Near z = 0 the absolute error is about float32's epsilon times cap, small next to a score.
__attribute__((target("avx2,fma,f16c"))) void soft_cap_avx2(float* x, std::int64_t n, float cap) {
  const __m256 two_over_cap = _mm256_set1_ps(2.0f / cap), c = _mm256_set1_ps(cap);
  const __m256 hi = _mm256_set1_ps(40.0f), lo = _mm256_set1_ps(-40.0f);
  const __m256 one = _mm256_set1_ps(1.0f), two = _mm256_set1_ps(2.0f);
  std::int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 y = _mm256_min_ps(hi, _mm256_max_ps(lo, _mm256_mul_ps(_mm256_loadu_ps(x + i), two_over_cap)));
    const __m256 e = _ZGVdN8v_expf(y);
    const __m256 t = _mm256_sub_ps(one, _mm256_div_ps(two, _mm256_add_ps(e, one)));
    _mm256_storeu_ps(x + i, _mm256_mul_ps(c, t));
  }
  for (; i < n; ++i) x[i] = cap * std::tanh(x[i] / cap);
}

}  // namespace

bool vectorized_with_avx2() { return avx2(); }

void convert_to_float(const void* src, DType dtype, std::int64_t n, float* out) {
  switch (dtype) {
    case DType::kFloat32:
      std::memcpy(out, src, sizeof(float) * static_cast<std::size_t>(n));
      return;
    case DType::kBFloat16:
      bfloat16_to_float(static_cast<const std::uint16_t*>(src), n, out);
      return;
    case DType::kFloat16: {
      const auto* h = static_cast<const std::uint16_t*>(src);
      if (avx2()) return half_to_float_avx2(h, n, out);
      for (std::int64_t i = 0; i < n; ++i) out[i] = half_bits_to_float(h[i]);
      return;
    }
    case DType::kInt32: {
      const auto* x = static_cast<const std::int32_t*>(src);
      for (std::int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(x[i]);
      return;
    }
  }
}

void convert_from_float(const float* in, DType dtype, std::int64_t n, void* dst) {
  switch (dtype) {
    case DType::kFloat32:
      std::memcpy(dst, in, sizeof(float) * static_cast<std::size_t>(n));
      return;
    case DType::kBFloat16:
      float_to_bfloat16(in, n, static_cast<std::uint16_t*>(dst));
      return;
    case DType::kFloat16: {
      auto* h = static_cast<std::uint16_t*>(dst);
      if (avx2()) return float_to_half_avx2(in, n, h);
      for (std::int64_t i = 0; i < n; ++i) h[i] = float_to_half_bits(in[i]);
      return;
    }
    case DType::kInt32: {
      auto* x = static_cast<std::int32_t*>(dst);
      for (std::int64_t i = 0; i < n; ++i) x[i] = static_cast<std::int32_t>(in[i]);
      return;
    }
  }
}

float row_max(const float* x, std::int64_t n) {
  if (avx2()) return row_max_avx2(x, n);
  float out = -std::numeric_limits<float>::infinity();
  for (std::int64_t i = 0; i < n; ++i) out = std::max(out, x[i]);
  return out;
}

float exp_shifted_sum(float* x, std::int64_t n, float shift) {
  if (avx2()) return exp_shifted_sum_avx2(x, n, shift);
  float sum = 0.0f;
  for (std::int64_t i = 0; i < n; ++i) {
    const float arg = x[i] - shift;
    x[i] = arg < -87.0f ? 0.0f : std::exp(arg);
    sum += x[i];
  }
  return sum;
}

void soft_cap(float* x, std::int64_t n, float cap) {
  if (avx2()) return soft_cap_avx2(x, n, cap);
  for (std::int64_t i = 0; i < n; ++i) x[i] = cap * std::tanh(x[i] / cap);
}

}  // namespace attn::cpu
