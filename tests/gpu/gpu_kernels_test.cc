// attn_gpu_tests: every CUDA variant against the float64 reference, through the CUDA executor
// (the same path the server takes): fresh random inputs, awkward sizes, every dtype a variant
// claims, outputs poisoned with NaN. Skips, saying so, where there is no usable GPU.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <numeric>

#include "attn/executor.h"
#include "reference.h"
#include "support/gpu_executor.h"
#include "support/paged_batch.h"
#include "support/random.h"

namespace attn {
namespace {

using testing::gpu;
using testing::mask_every;
using testing::poison;
using testing::random_tensor;
using testing::PagedBatch;
using testing::PagedCase;
using testing::paged_trace;
using testing::longest;


std::vector<std::string> cuda_names(Op op) {
  std::vector<std::string> names;
  for (const VariantInfo* v : default_registry().all())
    if (v->op == op && v->backend == Backend::kCuda) names.push_back(v->name);
  if (names.empty()) names.push_back("none");  // keeps the suite valid in builds without CUDA
  return names;
}

std::string test_name(const ::testing::TestParamInfo<std::string>& p) {
  std::string s = p.param;
  for (char& c : s)
    if (c == '/') c = '_';
  return s;
}

bool claims(const VariantInfo& info, DType t) {
  return std::find(info.dtypes.begin(), info.dtypes.end(), t) != info.dtypes.end();
}

template <class Args>
void run_on_gpu(const Variant<Args>& v, Args& args) {
  ExecTimings t;
  const OpCall call = make_call(v, args);
  const Status s = gpu()->execute(call, t);
  ASSERT_TRUE(s.ok()) << s.to_string();
}

#define REQUIRE_GPU()                                                        \
  if (GetParam() == "none") GTEST_SKIP() << "this build has no CUDA variants"; \
  if (!gpu()) GTEST_SKIP() << "no usable GPU on this machine"

class GpuMatmul : public ::testing::TestWithParam<std::string> {};

TEST_P(GpuMatmul, MatchesReference) {
  REQUIRE_GPU();
  const auto* v = default_registry().of<MatmulArgs>().find(GetParam());
  ASSERT_NE(v, nullptr);
  std::mt19937_64 rng(testing::seed());
  struct Case {
    Shape a, b;
    bool ta, tb;
  };
  const Case cases[] = {
      {{1, 1}, {1, 1}, false, false},        {{7, 33}, {33, 5}, false, false},
      {{33, 7}, {1000, 33}, true, true},     {{257, 129}, {129, 1000}, false, false},
      {{129, 257}, {129, 300}, true, false}, {{200, 130}, {68, 130}, false, true},
      {{3, 17, 9}, {9, 70}, false, false},   {{2, 9, 17}, {2, 70, 9}, true, true},
      {{256, 512}, {512, 384}, false, false},
      // Contiguous dimensions in multiples of 8 (what TMA-fed rungs take), the others awkward.
      {{1, 64}, {64, 8}, false, false},      {{1000, 72}, {72, 1000}, false, false},
      {{136, 33}, {33, 136}, true, true},    {{2, 130, 264}, {2, 264, 520}, false, false},
      {{7, 1000}, {1000, 24}, false, false}, {{2, 136, 16}, {8, 136}, true, true},
      {{64, 72}, {33, 72}, false, true},     {{100, 2048}, {2048, 264}, false, false},
      // Rung 08's tile forms on an H100: 128 x 256 (enough of them to fill half the GPU), 128 x 128,
      // 128 x 64; the smaller ones above split K over 128 x 128 tiles (or not, with few k-tiles).
      {{1100, 72}, {72, 2056}, false, false}, {{264, 1100}, {2056, 264}, true, true},
      {{300, 136}, {3000, 136}, false, true}, {{136, 300}, {136, 3000}, true, false},
      {{100, 264}, {264, 8200}, false, false}, {{264, 100}, {8200, 264}, true, true},
  };
  int ran = 0;
  for (DType dt : kAllDTypes) {
    for (const auto& c : cases) {
      SCOPED_TRACE(std::string(dtype_name(dt)) + " a" + shape_to_string(c.a) + " b" + shape_to_string(c.b) +
                   " ta=" + std::to_string(c.ta) + " tb=" + std::to_string(c.tb) + " seed=" +
                   std::to_string(testing::seed()));
      Tensor a = random_tensor(dt, c.a, rng), b = random_tensor(dt, c.b, rng);
      auto dims = matmul_dims(a.view(), b.view(), c.ta, c.tb);
      ASSERT_TRUE(dims.ok());
      Tensor out(dt, matmul_output_shape(*dims, static_cast<int>(c.a.size())));
      poison(out);
      MatmulArgs args{a.view(), b.view(), out.view(), c.ta, c.tb};
      const Status supported = v->supports(args);
      if (!claims(v->info, dt)) {
        EXPECT_FALSE(supported.ok()) << "takes a dtype it does not claim";
        continue;
      }
      if (!supported.ok()) {  // a variant may refuse shapes it documents, naming the operand
        EXPECT_TRUE(supported.message().rfind("a.shape", 0) == 0 || supported.message().rfind("b.shape", 0) == 0)
            << supported.to_string();
        continue;
      }
      run_on_gpu(*v, args);
      ++ran;
      // K up to 1000 in float32: a few ulps of accumulated rounding, so 1e-5 relative holds.
      EXPECT_LE(reference::relative_frobenius_error(out.view(), reference::matmul(args)),
                reference::tolerance(dt));
    }
  }
  EXPECT_GT(ran, 0) << "the variant took none of the cases";
}

INSTANTIATE_TEST_SUITE_P(Cuda, GpuMatmul, ::testing::ValuesIn(cuda_names(Op::kMatmul)), test_name);

// Calls larger than the executor's pinned staging (two 32 MiB buffers) stream through it in
// chunks: inputs whose chunk boundaries fall inside a view and between views, outputs over several
// chunks, and both at once. Each result must be what the float64 reference says, bit for bit the
// same as the same call again (the staging path must not depend on what a buffer held before).
TEST(GpuExecutor, CallsLargerThanTheStagingStreamThroughItInChunks) {
  if (!gpu()) GTEST_SKIP() << "no usable GPU on this machine";
  EXPECT_EQ(gpu()->pinned_staging_bound(), std::size_t{64} << 20);
  std::mt19937_64 rng(testing::seed());
  struct Case {
    Shape a, b;
  };
  const Case cases[] = {
      {{2500, 4001}, {4001, 4}},  // a: 40 MB, two chunks; b after it in the second
      {{4100, 3}, {3, 2101}},     // the output: 34 MB, two chunks
      {{4, 4}, {4, 2200001}},     // 35 MB in and 35 MB out
      {{7, 33}, {33, 5}},         // small again after the chunked calls
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(std::string("a") + shape_to_string(c.a) + " b" + shape_to_string(c.b) + " seed=" +
                 std::to_string(testing::seed()));
    Tensor a = random_tensor(DType::kFloat32, c.a, rng), b = random_tensor(DType::kFloat32, c.b, rng);
    Tensor out(DType::kFloat32, {c.a[0], c.b[1]}), again(DType::kFloat32, {c.a[0], c.b[1]});
    poison(out);
    poison(again);
    MatmulArgs args{a.view(), b.view(), out.view(), false, false};
    auto v = default_registry().of<MatmulArgs>().select(args, "", gpu()->target());
    ASSERT_TRUE(v.ok()) << v.status().to_string();
    run_on_gpu(**v, args);
    MatmulArgs repeat{a.view(), b.view(), again.view(), false, false};
    run_on_gpu(**v, repeat);
    EXPECT_EQ(std::memcmp(out.data(), again.data(), out.bytes()), 0);
    // tf32 may be taken for float32 on the tensor cores: its tolerance.
    EXPECT_LE(reference::relative_frobenius_error(out.view(), reference::matmul(args)), 1e-3);
  }
}

class GpuSoftmax : public ::testing::TestWithParam<std::string> {};

// `auto` takes rung 08 over cuBLAS only where its tiles fill the GPU without splitting K (where
// the H100 measured it ahead: 1.04-1.11x), and cuBLAS where rows are padded or K is split.
TEST(GpuAuto, MatmulTakesRung08WhereItsTilesFillTheGpu) {
  if (!gpu()) GTEST_SKIP() << "no usable GPU on this machine";
  const Target target = gpu()->target();
  if (target.compute_capability != 90) GTEST_SKIP() << "rung 08 is for sm_90";
  auto picked = [&](std::int64_t m, std::int64_t n, std::int64_t k) {
    // Shapes only: selection reads no data.
    TensorView a{DType::kBFloat16, {m, k}, nullptr, MemoryKind::kDevice};
    TensorView b{DType::kBFloat16, {k, n}, nullptr, MemoryKind::kDevice};
    TensorView c{DType::kBFloat16, {m, n}, nullptr, MemoryKind::kDevice};
    auto v = default_registry().of<MatmulArgs>().select(MatmulArgs{a, b, c}, "", target);
    return v.ok() ? (*v)->info.name : v.status().to_string();
  };
  for (std::int64_t m : {128, 256, 512, 1024}) EXPECT_EQ(picked(m, 8192, 8192), "matmul/08_wgmma_tma") << m;
  EXPECT_EQ(picked(4096, 4096, 4096), "matmul/08_wgmma_tma");
  EXPECT_EQ(picked(192, 8192, 8192), "matmul/cublas");  // a quarter of the rows padded
  EXPECT_EQ(picked(64, 1024, 8192), "matmul/cublas");   // 16 tiles: K split
}

// `auto` takes rung 07 where it measured ahead of 05 and 06 (16-bit rows of 513-1024 columns, float32 rows of
// 32k-64k), 05 wherever it holds the row, 06 beyond, and what else takes the widths 07 refuses.
TEST(GpuAuto, SoftmaxTakesRung07WhereItMeasuredAhead) {
  if (!gpu()) GTEST_SKIP() << "no usable GPU on this machine";
  const Target target = gpu()->target();
  if (target.compute_capability != 90) GTEST_SKIP() << "rung 07 is for sm_90";
  auto picked = [&](DType dt, std::int64_t rows, std::int64_t cols) {
    TensorView x{dt, {rows, cols}, nullptr, MemoryKind::kDevice};  // shapes only: selection reads no data
    TensorView y{dt, {rows, cols}, nullptr, MemoryKind::kDevice};
    auto v = default_registry().of<SoftmaxArgs>().select(SoftmaxArgs{x, y}, "", target);
    return v.ok() ? (*v)->info.name : v.status().to_string();
  };
  const DType f32 = DType::kFloat32, bf16 = DType::kBFloat16;
  EXPECT_EQ(picked(f32, 65536, 1024), "softmax/05_vectorized");
  EXPECT_EQ(picked(f32, 4096, 16384), "softmax/05_vectorized");
  EXPECT_EQ(picked(bf16, 16384, 4096), "softmax/05_vectorized");
  EXPECT_EQ(picked(bf16, 65536, 1024), "softmax/07_bulk_ring");
  EXPECT_EQ(picked(f32, 2048, 32768), "softmax/05_vectorized");
  EXPECT_EQ(picked(bf16, 2048, 32768), "softmax/05_vectorized");
  EXPECT_EQ(picked(f32, 1600, 40000), "softmax/07_bulk_ring");
  EXPECT_EQ(picked(f32, 1024, 65536), "softmax/07_bulk_ring");
  EXPECT_EQ(picked(bf16, 1024, 65536), "softmax/06_split_row");
  EXPECT_EQ(picked(f32, 256, 262144), "softmax/06_split_row");
  EXPECT_EQ(picked(f32, 256, 70001), "softmax/06_split_row");  // not whole 16-byte vectors: 07 refuses
  EXPECT_EQ(picked(f32, 4, 1 << 20), "softmax/04_online");     // wider than 07 and 06 hold
  EXPECT_EQ(picked(bf16, 4, 1 << 20), "softmax/04_online");
}

TEST_P(GpuSoftmax, MatchesReference) {
  REQUIRE_GPU();
  const auto* v = default_registry().of<SoftmaxArgs>().find(GetParam());
  ASSERT_NE(v, nullptr);
  std::mt19937_64 rng(testing::seed());
  // The last row: rung 07's paths, widths a multiple of 8 (whole 16-byte vectors in every dtype):
  // its ring of stages wrapping many times over short rows (40000 x 520) and over cluster-split
  // rows (96 x 262144: clusters of 16 for float32, 8 for 16-bit types), groups of several warps a
  // row (300 x 4104), slices of unequal length (45 x 100008) and the widest rows it takes (7 x 409600).
  const Shape shapes[] = {{1},       {7},         {3, 33},    {5, 1000},  {2, 3, 1024}, {3, 4097},
                          {2, 8191}, {1, 32768},  {2, 70001}, {1, 262144}, {1000, 7}, {4097, 33},
                          {40000, 520}, {300, 4104}, {96, 262144}, {45, 100008}, {7, 409600}};
  for (DType dt : kAllDTypes)
    for (const auto& shape : shapes) {
      SCOPED_TRACE(std::string(dtype_name(dt)) + " " + shape_to_string(shape) + " seed=" +
                   std::to_string(testing::seed()));
      Tensor x = random_tensor(dt, shape, rng, 4.0f), y(dt, shape);
      poison(y);
      SoftmaxArgs args{x.view(), y.view()};
      const Status supported = v->supports(args);
      if (!supported.ok()) {  // a refusal must explain itself and be about the width
        EXPECT_NE(supported.message().find("x.shape"), std::string::npos) << supported.message();
        continue;
      }
      run_on_gpu(*v, args);
      EXPECT_LE(reference::relative_frobenius_error(y.view(), reference::softmax(args)),
                reference::tolerance(dt));
    }
}

// Rows holding -inf (every third entry, the first of the tensor included, as masks leave them):
// those entries must come out 0 and the rest as the reference says, never NaN.
TEST_P(GpuSoftmax, RowsWithMinusInfinity) {
  REQUIRE_GPU();
  const auto* v = default_registry().of<SoftmaxArgs>().find(GetParam());
  ASSERT_NE(v, nullptr);
  std::mt19937_64 rng(testing::seed());
  const Shape shapes[] = {{7},       {3, 33},     {5, 1000},  {3, 4097},   {2, 70001}, {1, 262144},
                          {1000, 7}, {3000, 520}, {300, 4104}, {45, 100008}};
  int ran = 0;
  for (DType dt : kAllDTypes)
    for (const auto& shape : shapes) {
      SCOPED_TRACE(std::string(dtype_name(dt)) + " " + shape_to_string(shape) + " seed=" +
                   std::to_string(testing::seed()));
      Tensor x = random_tensor(dt, shape, rng, 4.0f), y(dt, shape);
      mask_every(x, 3);
      poison(y);
      SoftmaxArgs args{x.view(), y.view()};
      if (!v->supports(args).ok()) continue;
      run_on_gpu(*v, args);
      ++ran;
      EXPECT_LE(reference::relative_frobenius_error(y.view(), reference::softmax(args)), reference::tolerance(dt));
      for (std::size_t i = 0; i < static_cast<std::size_t>(y.numel()); i += 3) ASSERT_EQ(y.get(i), 0.0f) << i;
    }
  EXPECT_GT(ran, 0);
}

INSTANTIATE_TEST_SUITE_P(Cuda, GpuSoftmax, ::testing::ValuesIn(cuda_names(Op::kSoftmax)), test_name);

class GpuAttention : public ::testing::TestWithParam<std::string> {};

TEST_P(GpuAttention, MatchesReference) {
  REQUIRE_GPU();
  const auto* v = default_registry().of<AttentionArgs>().find(GetParam());
  ASSERT_NE(v, nullptr);
  std::mt19937_64 rng(testing::seed());
  struct Case {
    std::int64_t b, hq, hkv, sq, sk, d;
  };
  const Case cases[] = {
      {1, 1, 1, 1, 1, 64},      {2, 4, 2, 17, 33, 64},     {1, 8, 2, 1, 1000, 128},
      {1, 2, 1, 33, 7, 64},     {1, 2, 2, 100, 100, 128},  {1, 8, 1, 1, 4097, 128},
      {1, 2, 2, 1000, 1000, 64}, {2, 4, 4, 130, 257, 128}, {1, 16, 2, 1, 333, 64},
      {1, 4, 4, 64, 64, 32},    {1, 2, 1, 17, 300, 256},   {1, 8, 2, 1, 9000, 128},
      // More 128-row query tiles than SMs: persistent blocks take several work items.
      {1, 36, 4, 520, 33, 64},  {1, 48, 12, 300, 33, 128},
  };
  int ran = 0;
  for (DType dt : kAllDTypes)
    for (const auto& c : cases)
      for (bool causal : {false, true})
        for (float scale : {0.0f, 0.07f, -0.05f}) {
          SCOPED_TRACE(std::string(dtype_name(dt)) + " B" + std::to_string(c.b) + " Hq" + std::to_string(c.hq) +
                       " Hkv" + std::to_string(c.hkv) + " Sq" + std::to_string(c.sq) + " Sk" + std::to_string(c.sk) +
                       " D" + std::to_string(c.d) + (causal ? " causal" : "") + " scale=" + std::to_string(scale) +
                       " seed=" + std::to_string(testing::seed()));
          Tensor q = random_tensor(dt, {c.b, c.hq, c.sq, c.d}, rng);
          Tensor k = random_tensor(dt, {c.b, c.hkv, c.sk, c.d}, rng);
          Tensor vv = random_tensor(dt, {c.b, c.hkv, c.sk, c.d}, rng);
          Tensor o(dt, q.shape()), lse(DType::kFloat32, {c.b, c.hq, c.sq});
          poison(o);
          poison(lse);
          AttentionArgs args{q.view(), k.view(), vv.view(), o.view(), lse.view(), causal,
                             resolve_attention_scale(scale, c.d)};
          const Status supported = v->supports(args);
          if (!supported.ok()) {  // a refusal names the field it is about
            EXPECT_TRUE(supported.message().find("q.") == 0 || supported.message().find("k.") == 0)
                << supported.message();
            EXPECT_TRUE(!claims(v->info, dt) || supported.message().find("shape") != std::string::npos)
                << "refused a dtype it claims: " << supported.message();
            continue;
          }
          run_on_gpu(*v, args);
          ++ran;
          std::vector<double> want_lse;
          const auto want = reference::attention(args, &want_lse);
          EXPECT_LE(reference::relative_frobenius_error(o.view(), want), reference::tolerance(dt));
          EXPECT_LE(reference::lse_error(lse.view(), want_lse), 1e-4);
        }
  EXPECT_GT(ran, 0) << "the variant took none of the cases";
}

// Every common head dim (Phi-2 and Pythia-2.8B use 80, GPT-NeoX-20B 96, Gemma 256) on lengths that
// are no multiple of any tile; the tensor-core rungs (03, and 04 on Hopper) must take all of them.
TEST_P(GpuAttention, EveryHeadDim) {
  REQUIRE_GPU();
  const auto* v = default_registry().of<AttentionArgs>().find(GetParam());
  ASSERT_NE(v, nullptr);
  std::mt19937_64 rng(testing::seed());
  struct Case {
    std::int64_t b, hq, hkv, sq, sk;
  };
  const Case cases[] = {{1, 2, 1, 1, 1}, {1, 4, 2, 33, 200}, {2, 2, 2, 130, 130}, {1, 3, 1, 7, 1000}, {1, 2, 2, 300, 257}};
  const bool must_take = GetParam() == "attention/03_flash_mma" ||
                         (GetParam() == "attention/04_wgmma_tma" && gpu()->target().compute_capability == 90);
  int ran = 0;
  for (DType dt : kAllDTypes)
    for (std::int64_t d : {32, 64, 80, 96, 128, 192, 256})
      for (const auto& c : cases)
        for (bool causal : {false, true}) {
          SCOPED_TRACE(std::string(dtype_name(dt)) + " D" + std::to_string(d) + " Hq" + std::to_string(c.hq) + " Hkv" +
                       std::to_string(c.hkv) + " Sq" + std::to_string(c.sq) + " Sk" + std::to_string(c.sk) +
                       (causal ? " causal" : "") + " seed=" + std::to_string(testing::seed()));
          Tensor q = random_tensor(dt, {c.b, c.hq, c.sq, d}, rng);
          Tensor k = random_tensor(dt, {c.b, c.hkv, c.sk, d}, rng);
          Tensor vv = random_tensor(dt, {c.b, c.hkv, c.sk, d}, rng);
          Tensor o(dt, q.shape()), lse(DType::kFloat32, {c.b, c.hq, c.sq});
          poison(o);
          poison(lse);
          AttentionArgs args{q.view(), k.view(), vv.view(), o.view(), lse.view(), causal, resolve_attention_scale(0.0f, d)};
          const Status supported = v->supports(args);
          if (!supported.ok()) {
            EXPECT_FALSE(must_take && claims(v->info, dt)) << supported.message();
            continue;
          }
          run_on_gpu(*v, args);
          ++ran;
          std::vector<double> want_lse;
          const auto want = reference::attention(args, &want_lse);
          EXPECT_LE(reference::relative_frobenius_error(o.view(), want), reference::tolerance(dt));
          EXPECT_LE(reference::lse_error(lse.view(), want_lse), 1e-4);
        }
  if (must_take) {
    EXPECT_GT(ran, 0);
  }
}

INSTANTIATE_TEST_SUITE_P(Cuda, GpuAttention, ::testing::ValuesIn(cuda_names(Op::kAttention)), test_name);

// `auto` on a GPU never leaves a GPU dtype and common head dim to the CPU: plain, causal, with a
// sliding window and with a soft cap, prefill and decode shapes.
TEST(GpuAuto, AttentionNeverFallsToTheCpu) {
  if (!gpu()) GTEST_SKIP() << "no usable GPU on this machine";
  const Target target = gpu()->target();
  for (DType dt : kAllDTypes)
    for (std::int64_t d : {32, 64, 80, 96, 128, 192, 256})
      for (std::int64_t sq : {1, 1000})
        for (int form = 0; form < 4; ++form) {
          TensorView q{dt, {1, 8, sq, d}, nullptr, MemoryKind::kDevice};
          TensorView kv{dt, {1, 2, 4096, d}, nullptr, MemoryKind::kDevice};
          AttentionArgs a{q, kv, kv, q, {}, form == 1, 0.1f};
          if (form == 2) a.causal = true, a.window_left = 256;
          if (form == 3) a.softcap = 30.0f;
          auto v = default_registry().of<AttentionArgs>().select(a, "", target);
          ASSERT_TRUE(v.ok()) << dtype_name(dt) << " D" << d << " form " << form << ": " << v.status().to_string();
          EXPECT_EQ((*v)->info.backend, Backend::kCuda)
              << dtype_name(dt) << " D" << d << " Sq" << sq << " form " << form << ": " << (*v)->info.name;
        }
}

// --- The KV-cache ops -------------------------------------------------------------------------
// (PagedCase, PagedBatch: support/paged_batch.h)

// A refusal names the field it is about, and never a dtype the variant claims.
template <class Args>
bool refused(const Variant<Args>& v, const Args& args, DType dt) {
  const Status supported = v.supports(args);
  if (supported.ok()) return false;
  EXPECT_EQ(supported.message().rfind("q.", 0), 0u) << supported.message();
  EXPECT_TRUE(!claims(v.info, dt) || supported.message().find("shape") != std::string::npos)
      << "refused a dtype it claims: " << supported.message();
  return true;
}

class GpuPagedDecode : public ::testing::TestWithParam<std::string> {};

TEST_P(GpuPagedDecode, AppendsAndMatchesReference) {
  REQUIRE_GPU();
  const auto* v = default_registry().of<PagedDecodeArgs>().find(GetParam());
  ASSERT_NE(v, nullptr);
  std::mt19937_64 rng(testing::seed());
  auto decode = [](std::int64_t hq, std::int64_t hkv, std::int64_t d, std::vector<std::int32_t> lens) {
    PagedCase c{hq, hkv, d, {}, {}};
    for (auto l : lens) c.cached.push_back(l - 1), c.fresh.push_back(1);
    return c;
  };
  const PagedCase cases[] = {
      decode(8, 2, 128, {1, 15, 16, 17, 1000, 4097}),
      decode(32, 8, 64, {17, 4097, 1, 1000, 63, 64, 65}),
      decode(32, 8, 128, {4097, 15, 16, 1}),
      decode(4, 4, 256, {33, 300, 1}),
      decode(16, 2, 128, {5000, 2}),
      decode(8, 1, 128, {9000}),
      decode(6, 2, 64, {100}),  // 3 query heads per kv head (every rung packs any group)
      // The other common head dims (paged_decode/02 takes them all).
      decode(8, 2, 32, {1, 300}), decode(8, 2, 80, {17, 1000}), decode(8, 4, 96, {65, 2000}),
      decode(4, 2, 192, {1, 777}),
  };
  int ran = 0;
  for (DType dt : kAllDTypes)
    for (const auto& c : cases)
      for (std::int64_t ps : {16, 64}) {
        SCOPED_TRACE(paged_trace(dt, c, ps));
        PagedBatch batch(dt, c, ps, rng);
        const std::int64_t n = static_cast<std::int64_t>(c.cached.size());
        Tensor q = random_tensor(dt, {n, c.hq, c.d}, rng);
        Tensor k_new = random_tensor(dt, {n, c.hkv, c.d}, rng), v_new = random_tensor(dt, {n, c.hkv, c.d}, rng);
        Tensor o(dt, q.shape()), lse(DType::kFloat32, {n, c.hq});
        poison(o);
        poison(lse);
        PagedDecodeArgs args{q.view(), k_new.view(), v_new.view(), o.view(), lse.view(), batch.device, {},
                             resolve_attention_scale(0.0f, c.d)};
        batch.plan.bind(args.seqs);
        if (refused(*v, args, dt)) continue;
        run_on_gpu(*v, args);
        ++ran;
        PagedDecodeArgs ref_args = args;
        ref_args.cache = batch.host;
        std::vector<double> want_lse;
        const auto want = reference::paged_decode(ref_args, &want_lse);
        EXPECT_LE(reference::relative_frobenius_error(o.view(), want), reference::tolerance(dt, longest(c)));
        EXPECT_LE(reference::lse_error(lse.view(), want_lse), 1e-4);
        batch.expect_appended(k_new, v_new);
      }
  EXPECT_GT(ran, 0) << "the variant took none of the cases";
}

// Merged calls (dynamic batching) name their sequence ranges: each call's sequences must come out
// with the same bits as when that call runs alone, whatever the variant plans across a batch.
// The merged batch is first checked against float64, so equal garbage cannot pass.
TEST_P(GpuPagedDecode, MergedCallsGiveEachCallTheBitsItGetsAlone) {
  REQUIRE_GPU();
  const auto* v = default_registry().of<PagedDecodeArgs>().find(GetParam());
  ASSERT_NE(v, nullptr);
  std::mt19937_64 rng(testing::seed());
  const DType dt = DType::kBFloat16;
  PagedCase c{32, 8, 128, {}, {}};
  for (std::int32_t len : {4097, 17, 20000, 1000, 1, 9000, 513, 4096}) c.cached.push_back(len - 1), c.fresh.push_back(1);
  const std::int64_t n = static_cast<std::int64_t>(c.cached.size());
  const std::size_t es = element_size(dt);
  // Calls of one sequence each, and calls of several (a lone long call beside short ones).
  const std::vector<std::vector<std::int32_t>> groupings = {{0, 1, 2, 3, 4, 5, 6, 7, 8}, {0, 3, 4, 7, 8}, {0, 1, 8}};
  for (const auto& calls : groupings) {
    SCOPED_TRACE(paged_trace(dt, c, 16) + " calls " + std::to_string(calls.size() - 1));
    PagedBatch batch(dt, c, 16, rng);
    Tensor q = random_tensor(dt, {n, c.hq, c.d}, rng);
    Tensor k_new = random_tensor(dt, {n, c.hkv, c.d}, rng), v_new = random_tensor(dt, {n, c.hkv, c.d}, rng);
    Tensor o(dt, q.shape());
    poison(o);
    PagedDecodeArgs args{q.view(), k_new.view(), v_new.view(), o.view(), {}, batch.device, {},
                         resolve_attention_scale(0.0f, c.d)};
    batch.plan.bind(args.seqs);
    args.merged_calls_host = calls.data();
    args.merged_calls = static_cast<std::int64_t>(calls.size()) - 1;
    if (!v->supports(args).ok()) GTEST_SKIP() << v->supports(args).to_string();
    run_on_gpu(*v, args);
    PagedDecodeArgs ref_args = args;
    ref_args.cache = batch.host;
    EXPECT_LE(reference::relative_frobenius_error(o.view(), reference::paged_decode(ref_args, nullptr)),
              reference::tolerance(dt, longest(c)));
    for (std::size_t call = 0; call + 1 < calls.size(); ++call) {
      // The call alone: its rows of q/k_new/v_new, its page tables (the append rewrites the same
      // slots with the same rows).
      const std::size_t first = static_cast<std::size_t>(calls[call]), last = static_cast<std::size_t>(calls[call + 1]);
      const std::int64_t m = static_cast<std::int64_t>(last - first);
      PagedPlan alone{{0}, {}, {}, {}};
      for (std::size_t i = first; i < last; ++i) {
        alone.page_indices.insert(alone.page_indices.end(), batch.plan.page_indices.begin() + batch.plan.page_indptr[i],
                                  batch.plan.page_indices.begin() + batch.plan.page_indptr[i + 1]);
        alone.page_indptr.push_back(static_cast<std::int32_t>(alone.page_indices.size()));
        alone.seq_lens.push_back(batch.plan.seq_lens[i]);
      }
      Tensor qi(dt, {m, c.hq, c.d}), ki(dt, {m, c.hkv, c.d}), vi(dt, {m, c.hkv, c.d}), oi(dt, {m, c.hq, c.d});
      std::memcpy(qi.data(), static_cast<const char*>(q.data()) + first * c.hq * c.d * es, qi.bytes());
      std::memcpy(ki.data(), static_cast<const char*>(k_new.data()) + first * c.hkv * c.d * es, ki.bytes());
      std::memcpy(vi.data(), static_cast<const char*>(v_new.data()) + first * c.hkv * c.d * es, vi.bytes());
      poison(oi);
      PagedDecodeArgs one{qi.view(), ki.view(), vi.view(), oi.view(), {}, batch.device, {}, args.scale};
      alone.bind(one.seqs);
      run_on_gpu(*v, one);
      EXPECT_EQ(std::memcmp(oi.data(), static_cast<const char*>(o.data()) + first * c.hq * c.d * es, oi.bytes()), 0)
          << "call " << call << " (sequences " << first << ".." << last - 1 << "): alone it differs from its rows merged";
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Cuda, GpuPagedDecode, ::testing::ValuesIn(cuda_names(Op::kPagedDecode)), test_name);

class GpuPagedPrefill : public ::testing::TestWithParam<std::string> {};

TEST_P(GpuPagedPrefill, AppendsAndMatchesReference) {
  REQUIRE_GPU();
  const auto* v = default_registry().of<PagedPrefillArgs>().find(GetParam());
  ASSERT_NE(v, nullptr);
  std::mt19937_64 rng(testing::seed());
  const PagedCase cases[] = {
      // Onto empty caches, onto existing ones, one token and many, tile edges and past them.
      {8, 2, 128, {0, 15, 1000, 4092, 16, 1, 0}, {1, 17, 5, 64, 16, 300, 129}},
      {32, 8, 64, {0, 0, 17}, {300, 17, 33}},
      {4, 4, 128, {100, 0}, {129, 1}},
      {16, 2, 128, {4097, 0}, {33, 65}},
      {32, 8, 128, {8, 64}, {64, 64}},
      {6, 2, 64, {10}, {10}},  // 3 query heads per kv head
      {8, 2, 80, {0, 100}, {150, 7}}, {8, 4, 96, {33, 0}, {65, 200}}, {4, 2, 32, {0}, {129}},  // other head dims
  };
  int ran = 0;
  for (DType dt : kAllDTypes)
    for (const auto& c : cases)
      for (std::int64_t ps : {16, 64})
        for (bool causal : {true, false}) {
          SCOPED_TRACE(paged_trace(dt, c, ps) + (causal ? " causal" : ""));
          PagedBatch batch(dt, c, ps, rng);
          const std::int64_t t = batch.tokens;
          Tensor q = random_tensor(dt, {t, c.hq, c.d}, rng);
          Tensor k_new = random_tensor(dt, {t, c.hkv, c.d}, rng), v_new = random_tensor(dt, {t, c.hkv, c.d}, rng);
          Tensor o(dt, q.shape()), lse(DType::kFloat32, {t, c.hq});
          poison(o);
          poison(lse);
          PagedPrefillArgs args;
          args.q = q.view(), args.k_new = k_new.view(), args.v_new = v_new.view(), args.o = o.view();
          args.lse = lse.view();
          args.cache = batch.device;
          args.mask.causal = causal;
          args.scale = resolve_attention_scale(0.0f, c.d);
          batch.plan.bind(args);
          if (refused(*v, args, dt)) continue;
          run_on_gpu(*v, args);
          ++ran;
          PagedPrefillArgs ref_args = args;
          ref_args.cache = batch.host;
          std::vector<double> want_lse;
          const auto want = reference::paged_prefill(ref_args, &want_lse);
          EXPECT_LE(reference::relative_frobenius_error(o.view(), want), reference::tolerance(dt, longest(c)));
          EXPECT_LE(reference::lse_error(lse.view(), want_lse), 1e-4);
          batch.expect_appended(k_new, v_new);
        }
  EXPECT_GT(ran, 0) << "the variant took none of the cases";
}

INSTANTIATE_TEST_SUITE_P(Cuda, GpuPagedPrefill, ::testing::ValuesIn(cuda_names(Op::kPagedPrefill)), test_name);

// `auto` takes the top paged rungs on sm_90.
TEST(GpuAuto, PagedOpsTakeTheTopRungs) {
  if (!gpu()) GTEST_SKIP() << "no usable GPU on this machine";
  const Target target = gpu()->target();
  if (target.compute_capability != 90) GTEST_SKIP() << "the top decode rung is for sm_90";
  std::mt19937_64 rng(1);
  PagedCase c{32, 8, 128, {99, 4000}, {1, 1}};
  PagedBatch batch(DType::kBFloat16, c, 16, rng);
  Tensor q(DType::kBFloat16, {2, 32, 128}), kv(DType::kBFloat16, {2, 8, 128}), o(DType::kBFloat16, {2, 32, 128});
  PagedDecodeArgs d{q.view(), kv.view(), kv.view(), o.view(), {}, batch.device, {}, 0.088f};
  batch.plan.bind(d.seqs);
  auto picked = default_registry().of<PagedDecodeArgs>().select(d, "", target);
  ASSERT_TRUE(picked.ok()) << picked.status().to_string();
  EXPECT_EQ((*picked)->info.name, "paged_decode/04_warp_pipes");
  PagedPrefillArgs p;
  p.q = q.view(), p.k_new = kv.view(), p.v_new = kv.view(), p.o = o.view(), p.cache = batch.device, p.scale = 0.088f;
  batch.plan.bind(p);
  auto prefill = default_registry().of<PagedPrefillArgs>().select(p, "", target);
  ASSERT_TRUE(prefill.ok()) << prefill.status().to_string();
  EXPECT_EQ((*prefill)->info.name, "paged_prefill/02_wgmma");
}

}  // namespace
}  // namespace attn
