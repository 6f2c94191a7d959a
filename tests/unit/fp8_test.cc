// float8 e4m3 (attn/fp8.h): the 256 codes exhaustively, the conversion from float against a
// brute-force nearest-even search (every bfloat16 and float16 value, and random float32s), the
// power-of-two page scales; and the CPU paged kernels over a float8 cache: appends that set and
// grow a page's scale (requantizing its rows), fixed client scales that saturate, outputs against
// the float64 reference over the dequantized cache.
#include "attn/fp8.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include "attn/dtype.h"
#include "attn/executor.h"
#include "attn/registry.h"
#include "reference.h"
#include "support/random.h"

namespace attn {
namespace {

// The code whose value is nearest to f, ties to the even code (mantissa bit 0), saturating at
// 448, NaN to 0x7f: by search over every finite code.
std::uint8_t nearest_code(float f) {
  if (std::isnan(f)) return std::signbit(f) ? 0xff : 0x7f;
  const std::uint8_t sign = std::signbit(f) ? 0x80 : 0;
  const double a = std::min<double>(std::fabs(static_cast<double>(f)), 448.0);
  std::uint8_t best = 0;
  double best_d = std::numeric_limits<double>::infinity();
  for (unsigned c = 0; c <= 0x7e; ++c) {
    const double d =
        std::fabs(static_cast<double>(fp8_e4m3_to_float(static_cast<std::uint8_t>(c))) - a);
    if (d < best_d || (d == best_d && (c & 1u) == 0))
      best = static_cast<std::uint8_t>(c), best_d = d;
  }
  return sign | best;
}

TEST(Fp8E4M3, EveryCodeDecodesAndRoundTrips) {
  int nans = 0;
  for (unsigned c = 0; c < 256; ++c) {
    const auto code = static_cast<std::uint8_t>(c);
    const float f = fp8_e4m3_to_float(code);
    if ((c & 0x7f) == 0x7f) {
      EXPECT_TRUE(std::isnan(f)) << c;
      ++nans;
      EXPECT_EQ(float_to_fp8_e4m3(f) & 0x7f, 0x7f);
      continue;
    }
    ASSERT_TRUE(std::isfinite(f)) << c;
    EXPECT_EQ(std::signbit(f), (c & 0x80) != 0) << c;
    // The value by its fields: e4m3fn, bias 7.
    const unsigned e = (c >> 3) & 15, m = c & 7;
    const double want = (e == 0 ? m / 8.0 * std::ldexp(1.0, -6)
                                : (1.0 + m / 8.0) * std::ldexp(1.0, static_cast<int>(e) - 7)) *
                        ((c & 0x80) ? -1.0 : 1.0);
    EXPECT_EQ(static_cast<double>(f), want) << c;
    EXPECT_EQ(float_to_fp8_e4m3(f), code) << c;  // -0 stays -0
    if (c < 0x7e) {
      EXPECT_LT(f, fp8_e4m3_to_float(static_cast<std::uint8_t>(c + 1))) << c;
    }
  }
  EXPECT_EQ(nans, 2);
  EXPECT_EQ(fp8_e4m3_to_float(0x7e), 448.0f);
  EXPECT_EQ(fp8_e4m3_to_float(0x01), std::ldexp(1.0f, -9));
  EXPECT_EQ(fp8_e4m3_to_float(0x08), std::ldexp(1.0f, -6));
}

TEST(Fp8E4M3, FromFloatIsNearestEvenAndSaturates) {
  // Every bfloat16 and every float16 value (NaNs, infinities and subnormals included).
  for (std::uint32_t b = 0; b < 65536; ++b) {
    const float fb = bfloat16_bits_to_float(static_cast<std::uint16_t>(b));
    ASSERT_EQ(float_to_fp8_e4m3(fb), nearest_code(fb)) << "bfloat16 bits " << b << " = " << fb;
    const float fh = half_bits_to_float(static_cast<std::uint16_t>(b));
    ASSERT_EQ(float_to_fp8_e4m3(fh), nearest_code(fh)) << "float16 bits " << b << " = " << fh;
  }
  // Random float32s over the whole range of e4m3 and beyond, and the exact midpoints.
  std::mt19937_64 rng(testing::seed());
  std::uniform_real_distribution<float> exponent(-14.0f, 10.0f), sign(-1.0f, 1.0f);
  for (int i = 0; i < 200000; ++i) {
    const float f = std::copysign(std::exp2(exponent(rng)), sign(rng));
    ASSERT_EQ(float_to_fp8_e4m3(f), nearest_code(f)) << f << " seed=" << testing::seed();
  }
  for (unsigned c = 0; c < 0x7e; ++c) {
    const float mid = (fp8_e4m3_to_float(static_cast<std::uint8_t>(c)) +
                       fp8_e4m3_to_float(static_cast<std::uint8_t>(c + 1))) /
                      2;
    EXPECT_EQ(float_to_fp8_e4m3(mid), (c & 1u) ? c + 1 : c)
        << "tie between " << c << " and " << c + 1;
  }
  EXPECT_EQ(float_to_fp8_e4m3(std::numeric_limits<float>::infinity()), 0x7e);
  EXPECT_EQ(float_to_fp8_e4m3(-std::numeric_limits<float>::infinity()), 0xfe);
  EXPECT_EQ(float_to_fp8_e4m3(1e30f), 0x7e);
  EXPECT_EQ(float_to_fp8_e4m3(464.0f), 0x7e);                 // would round to 480 unsaturated
  EXPECT_EQ(float_to_fp8_e4m3(std::ldexp(1.0f, -10)), 0x00);  // half the smallest step: even
  EXPECT_EQ(float_to_fp8_e4m3(std::ldexp(1.5f, -10)), 0x01);
}

TEST(Fp8E4M3, PowerOfTwoScalesCoverTheirValues) {
  EXPECT_EQ(fp8_pow2_scale(0.0f), 0.0f);
  EXPECT_EQ(fp8_pow2_scale(std::numeric_limits<float>::infinity()), 0.0f);
  EXPECT_EQ(fp8_pow2_scale(std::numeric_limits<float>::quiet_NaN()), 0.0f);
  EXPECT_EQ(fp8_pow2_scale(448.0f), 1.0f);
  EXPECT_EQ(fp8_pow2_scale(449.0f), 2.0f);
  EXPECT_EQ(fp8_pow2_scale(224.0f), 0.5f);
  EXPECT_EQ(fp8_pow2_scale(225.0f), 1.0f);
  std::mt19937_64 rng(testing::seed());
  std::uniform_real_distribution<float> exponent(-120.0f, 120.0f);
  for (int i = 0; i < 100000; ++i) {
    const float a = std::exp2(exponent(rng));
    const float s = fp8_pow2_scale(a);
    int e = 0;
    ASSERT_EQ(std::frexp(s, &e), 0.5f) << a;  // a power of two
    ASSERT_LE(a / s, 448.0f) << a;
    if (s > std::ldexp(1.0f, -126)) {
      ASSERT_GT(a / (s / 2), 448.0f) << a;  // the smallest
    }
  }
}

TEST(Fp8E4M3, QuantizeWithAScaleKeepsRelativeError) {
  std::mt19937_64 rng(testing::seed());
  std::normal_distribution<float> dist(0.0f, 3.0f);
  std::vector<float> x(4096), back(x.size());
  for (float& v : x) v = dist(rng);
  x[7] = 300.0f;  // an outlier sets the scale; the rest keep e4m3's 2^-4 relative step
  float amax = 0;
  for (float v : x) amax = std::max(amax, std::fabs(v));
  const float s = fp8_pow2_scale(amax);
  std::vector<std::uint8_t> codes(x.size());
  quantize_fp8_e4m3(x.data(), static_cast<std::int64_t>(x.size()), s, codes.data());
  dequantize_fp8_e4m3(codes.data(), static_cast<std::int64_t>(x.size()), s, back.data());
  for (std::size_t i = 0; i < x.size(); ++i) {
    const float tol = std::max(std::fabs(x[i]) / 16.0f, s * std::ldexp(1.0f, -10));
    ASSERT_LE(std::fabs(back[i] - x[i]), tol) << i << ": " << x[i] << " -> " << back[i];
  }
  // A scale of 0 (a page of zeros): zeros, NaN kept.
  const float zeros[3] = {0.0f, -0.0f, std::numeric_limits<float>::quiet_NaN()};
  std::uint8_t z[3];
  quantize_fp8_e4m3(zeros, 3, 0.0f, z);
  EXPECT_EQ(z[0], 0);
  EXPECT_EQ(z[1], 0);
  EXPECT_EQ(z[2], 0x7f);
}

// paged_prefill/cpu, chosen through the registry as the server does.
Status run_cpu(const PagedPrefillArgs& a) {
  auto variant = default_registry().of<PagedPrefillArgs>().select(a, "paged_prefill/cpu", Target{});
  if (!variant.ok()) return variant.status();
  Stream stream(Backend::kCpu);
  return (*variant)->run(a, stream);
}

// A float8 cache layer in host memory: pages in shuffled order, codes and scales poisoned
// (0x7f codes are NaN, scales NaN) so a read of anything the appends did not write shows.
struct Fp8Layer {
  std::int64_t hkv, d, ps, pages;
  std::vector<std::uint8_t> k, v;
  std::vector<float> ks, vs;
  std::vector<std::int32_t> table;  // one sequence's pages
  PagedKvLayer layer;

  Fp8Layer(std::int64_t hkv_, std::int64_t d_, std::int64_t ps_, std::int64_t pages_, DType dt,
           std::mt19937_64& rng)
      : hkv(hkv_), d(d_), ps(ps_), pages(pages_) {
    k.assign(static_cast<std::size_t>(pages * hkv * ps * d), 0x7f);
    v = k;
    ks.assign(static_cast<std::size_t>(pages * hkv), std::numeric_limits<float>::quiet_NaN());
    vs = ks;
    table.resize(static_cast<std::size_t>(pages));
    std::iota(table.begin(), table.end(), 0);
    std::shuffle(table.begin(), table.end(), rng);
    layer = PagedKvLayer{dt, pages, hkv, ps, d, k.data(), v.data(), MemoryKind::kHost};
    layer.storage = KvStorage::kFloat8E4M3;
    layer.k_scales = ks.data();
    layer.v_scales = vs.data();
  }
  // K (or V) of token t, head h, as stored, dequantized.
  float at(bool key, std::int64_t t, std::int64_t h, std::int64_t c) const {
    const std::int64_t page = table[static_cast<std::size_t>(t / ps)];
    const auto& codes = key ? k : v;
    const auto& scales = key ? ks : vs;
    return fp8_e4m3_to_float(codes[static_cast<std::size_t>(layer.offset(page, h, t % ps) + c)]) *
           scales[static_cast<std::size_t>(page * hkv + h)];
  }
};

// Prefill chunks of `chunks` tokens onto one sequence, each chunk's K/V `growth` times larger
// than the last (so later rows grow the scales of partly filled pages), every chunk's output
// against the float64 reference over the dequantized cache, and every stored value within
// e4m3's step of what was sent.
void chunked_prefill(const std::vector<std::int64_t>& chunks, float growth, std::int64_t hq,
                     std::int64_t hkv, std::int64_t d, std::int64_t ps, DType dt) {
  std::mt19937_64 rng(testing::seed());
  std::int64_t total = 0;
  for (auto c : chunks) total += c;
  Fp8Layer cache(hkv, d, ps, (total + ps - 1) / ps + 1, dt, rng);
  std::vector<float> sent_k, sent_v;  // every token's K/V as sent (rounded to dt)
  std::int64_t len = 0;
  float magnitude = 1.0f;
  for (std::int64_t fresh : chunks) {
    Tensor q = testing::random_tensor(dt, {fresh, hq, d}, rng);
    Tensor kn(dt, {fresh, hkv, d}), vn(dt, {fresh, hkv, d});
    std::normal_distribution<float> dist(0.0f, magnitude);
    for (std::int64_t i = 0; i < kn.numel(); ++i) {
      kn.set(static_cast<std::size_t>(i), dist(rng));
      vn.set(static_cast<std::size_t>(i), dist(rng));
      sent_k.push_back(kn.get(static_cast<std::size_t>(i)));
      sent_v.push_back(vn.get(static_cast<std::size_t>(i)));
    }
    magnitude *= growth;
    Tensor o(dt, {fresh, hq, d}), lse(DType::kFloat32, {fresh, hq});
    testing::poison(o);
    len += fresh;
    PagedPlan plan;
    plan.page_indptr = {0, static_cast<std::int32_t>((len + ps - 1) / ps)};
    plan.page_indices.assign(cache.table.begin(), cache.table.begin() + plan.page_indptr[1]);
    plan.seq_lens = {static_cast<std::int32_t>(len)};
    plan.q_indptr = {0, static_cast<std::int32_t>(fresh)};
    PagedPrefillArgs a;
    a.q = q.view(), a.k_new = kn.view(), a.v_new = vn.view(), a.o = o.view(), a.lse = lse.view();
    a.cache = cache.layer;
    plan.bind(a);
    a.scale = resolve_attention_scale(0.0f, d);
    ASSERT_TRUE(run_cpu(a).ok());
    const auto want = reference::paged_prefill(a);
    const double err = reference::relative_frobenius_error(o.view(), want);
    EXPECT_LE(err, reference::tolerance(dt))
        << "chunk ending at " << len << " seed=" << testing::seed();
    // The cache holds what was sent, to e4m3's precision at its page's scale.
    for (std::int64_t t = 0; t < len; ++t)
      for (std::int64_t h = 0; h < hkv; ++h)
        for (std::int64_t c = 0; c < d; ++c) {
          const auto i = static_cast<std::size_t>((t * hkv + h) * d + c);
          const std::int64_t page = cache.table[static_cast<std::size_t>(t / ps)];
          const float sk = cache.ks[static_cast<std::size_t>(page * hkv + h)];
          const float sv = cache.vs[static_cast<std::size_t>(page * hkv + h)];
          // Twice the step: a requantized row was rounded at the old scale, then (only where it
          // fell into the subnormals) again at the new one.
          ASSERT_LE(std::fabs(cache.at(true, t, h, c) - sent_k[i]),
                    std::max(std::fabs(sent_k[i]) / 8.0f, sk * std::ldexp(1.0f, -8)))
              << "K token " << t << " head " << h << " seed=" << testing::seed();
          ASSERT_LE(std::fabs(cache.at(false, t, h, c) - sent_v[i]),
                    std::max(std::fabs(sent_v[i]) / 8.0f, sv * std::ldexp(1.0f, -8)))
              << "V token " << t << " head " << h;
        }
  }
}

TEST(PagedFp8Cpu, ChunkedPrefillGrowsPageScalesAndMatchesReference) {
  // Chunks of 1, 7 and 33 onto pages of 16 and 8: most chunks start inside a page.
  chunked_prefill({1, 7, 33, 5, 1, 1, 20}, 4.0f, 8, 2, 64, 16, DType::kBFloat16);
  chunked_prefill({7, 1, 1, 9, 33}, 10.0f, 7, 1, 40, 8, DType::kFloat16);
  chunked_prefill({3, 300}, 0.5f, 4, 4, 128, 16, DType::kBFloat16);
}

TEST(PagedFp8Cpu, RefusesFloat32CachesAndMissingScales) {
  PagedKvLayer c{DType::kFloat32, 4, 1, 16, 8, nullptr, nullptr, MemoryKind::kHost};
  c.storage = KvStorage::kFloat8E4M3;
  float s[4] = {};
  c.k_scales = c.v_scales = s;
  PagedPlan plan = PagedPlan::placeholder(1);
  Tensor q(DType::kFloat32, {1, 1, 8});
  PagedDecodeArgs a;
  a.q = a.k_new = a.v_new = a.o = q.view();
  a.cache = c;
  plan.bind(a.seqs);
  Status st = check_paged_decode(a);
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("cache.storage"), std::string::npos) << st.message();
  c.dtype = DType::kBFloat16;
  c.k_scales = nullptr;
  Tensor qb(DType::kBFloat16, {1, 1, 8});
  a.q = a.k_new = a.v_new = a.o = qb.view();
  a.cache = c;
  st = check_paged_decode(a);
  EXPECT_NE(st.message().find("cache.k_scales"), std::string::npos) << st.message();
}

TEST(PagedFp8Cpu, FixedScalesSaturateAndNeverChange) {
  std::mt19937_64 rng(testing::seed());
  Fp8Layer cache(1, 16, 8, 2, DType::kBFloat16, rng);
  std::fill(cache.ks.begin(), cache.ks.end(), 0.25f);
  std::fill(cache.vs.begin(), cache.vs.end(), 0.5f);
  cache.layer.fixed_scales = true;
  Tensor q = testing::random_tensor(DType::kBFloat16, {3, 2, 16}, rng);
  Tensor kn(DType::kBFloat16, {3, 1, 16}), vn(DType::kBFloat16, {3, 1, 16});
  for (std::size_t i = 0; i < 48; ++i) kn.set(i, i == 5 ? 1000.0f : 1.0f), vn.set(i, -1.0f);
  Tensor o(DType::kBFloat16, {3, 2, 16});
  PagedPlan plan;
  plan.page_indptr = {0, 1};
  plan.page_indices = {cache.table[0]};
  plan.seq_lens = {3};
  plan.q_indptr = {0, 3};
  PagedPrefillArgs a;
  a.q = q.view(), a.k_new = kn.view(), a.v_new = vn.view(), a.o = o.view();
  a.cache = cache.layer;
  plan.bind(a);
  a.scale = 0.25f;
  ASSERT_TRUE(run_cpu(a).ok());
  EXPECT_EQ(cache.ks[static_cast<std::size_t>(cache.table[0])], 0.25f);
  EXPECT_EQ(cache.vs[static_cast<std::size_t>(cache.table[0])], 0.5f);
  EXPECT_EQ(cache.at(true, 0, 0, 5), 448.0f * 0.25f);  // 1000 saturated at 448 x scale
  EXPECT_EQ(cache.at(true, 0, 0, 4), 1.0f);
  EXPECT_EQ(cache.at(false, 2, 0, 15), -1.0f);
  EXPECT_LE(reference::relative_frobenius_error(o.view(), reference::paged_prefill(a)),
            reference::tolerance(DType::kBFloat16));
}

}  // namespace
}  // namespace attn
