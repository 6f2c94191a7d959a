#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "attn/dtype.h"

namespace attn {
namespace {

TEST(DType, SizesAndNames) {
  EXPECT_EQ(element_size(DType::kFloat32), 4u);
  EXPECT_EQ(element_size(DType::kFloat16), 2u);
  EXPECT_EQ(element_size(DType::kBFloat16), 2u);
  EXPECT_EQ(dtype_name(DType::kBFloat16), "bfloat16");
  EXPECT_EQ(parse_dtype("bf16"), DType::kBFloat16);
  EXPECT_EQ(parse_dtype("fp16"), DType::kFloat16);
  EXPECT_EQ(parse_dtype("int8"), std::nullopt);
}

TEST(DType, HalfKnownValues) {
  EXPECT_EQ(float_to_half_bits(1.0f), 0x3c00);
  EXPECT_EQ(float_to_half_bits(-2.0f), 0xc000);
  EXPECT_EQ(float_to_half_bits(65504.0f), 0x7bff);
  EXPECT_EQ(float_to_half_bits(65520.0f), 0x7c00);  // rounds up to infinity
  EXPECT_EQ(float_to_half_bits(std::ldexp(1.0f, -24)), 0x0001);  // smallest subnormal
  EXPECT_EQ(float_to_half_bits(std::ldexp(1.0f, -26)), 0x0000);  // below half of it
  EXPECT_EQ(float_to_half_bits(1.0f + std::ldexp(1.0f, -11)), 0x3c00);  // tie to even
  EXPECT_EQ(float_to_half_bits(1.0f + 3 * std::ldexp(1.0f, -11)), 0x3c02);  // tie to even, up
  EXPECT_TRUE(std::isnan(half_bits_to_float(float_to_half_bits(std::nanf("")))));
  EXPECT_EQ(half_bits_to_float(0x7c00), std::numeric_limits<float>::infinity());
}

TEST(DType, HalfRoundTripsEveryNonNanPattern) {
  for (std::uint32_t h = 0; h < 0x10000; ++h) {
    const float f = half_bits_to_float(static_cast<std::uint16_t>(h));
    if (std::isnan(f)) continue;
    ASSERT_EQ(float_to_half_bits(f), h) << "bits " << std::hex << h << " value " << f;
  }
}

TEST(DType, HalfRoundsToNearest) {
  // Midpoints between consecutive halves round to the even one; others to the nearer one.
  for (std::uint32_t h = 0x0001; h < 0x7bff; h += 37) {
    const float lo = half_bits_to_float(static_cast<std::uint16_t>(h));
    const float hi = half_bits_to_float(static_cast<std::uint16_t>(h + 1));
    const float quarter = lo + (hi - lo) * 0.25f, three_q = lo + (hi - lo) * 0.75f;
    EXPECT_EQ(float_to_half_bits(quarter), h);
    EXPECT_EQ(float_to_half_bits(three_q), h + 1);
    EXPECT_EQ(float_to_half_bits(lo + (hi - lo) * 0.5f), (h & 1) ? h + 1 : h);
  }
}

TEST(DType, BFloat16) {
  EXPECT_EQ(float_to_bfloat16_bits(1.0f), 0x3f80);
  EXPECT_EQ(bfloat16_bits_to_float(0x3f80), 1.0f);
  EXPECT_EQ(float_to_bfloat16_bits(1.0f + std::ldexp(1.0f, -8)), 0x3f80);  // tie to even
  EXPECT_EQ(float_to_bfloat16_bits(1.0f + 3 * std::ldexp(1.0f, -8)), 0x3f82);
  EXPECT_TRUE(std::isnan(bfloat16_bits_to_float(float_to_bfloat16_bits(std::nanf("")))));
  EXPECT_EQ(bfloat16_bits_to_float(float_to_bfloat16_bits(-3.5f)), -3.5f);
}

}  // namespace
}  // namespace attn
