// attn_gpu_tests: sliding windows and soft-capping on every CUDA attention variant in the registry,
// through the CUDA executor, against the float64 reference: every dtype a variant takes, head
// dims 64 and 128 (and 32, 80, 96, 192, 256 where a rung takes them), awkward lengths (1, 7,
// 33, 1000-ish, Sq > Sk), windows left only, right only, both, 0, with and without causal, caps
// of 50 and 5 on large logits; outputs poisoned with NaN. A rung that refuses (by name, as
// INVALID_ARGUMENT) is skipped, but rungs 01, 02 and 03 must take them. Skips without a GPU.
#include <gtest/gtest.h>

#include <algorithm>
#include <map>
#include <optional>

#include "attn/executor.h"
#include "reference.h"
#include "support/gpu_executor.h"
#include "support/random.h"

namespace attn {
namespace {

using testing::gpu;
using testing::poison;
using testing::random_tensor;


std::vector<const Variant<AttentionArgs>*> cuda_attention_variants() {
  std::vector<const Variant<AttentionArgs>*> out;
  for (const auto& v : default_registry().of<AttentionArgs>().variants())
    if (v.info.backend == Backend::kCuda) out.push_back(&v);
  return out;
}

struct Options {
  bool causal;
  std::int64_t left, right;
  float softcap;
  bool on_long;  // also run on the long case (the reference's cost)
};

const Options kOptions[] = {
    {false, 5, -1, 0.0f, false}, {false, -1, 3, 0.0f, false}, {false, 7, 2, 0.0f, true},
    {true, 6, -1, 0.0f, false},  {true, -1, 4, 0.0f, false},  {false, 0, 0, 0.0f, false},
    {true, 0, -1, 0.0f, false},  {false, -1, 0, 0.0f, false}, {false, -1, -1, 50.0f, false},
    {true, -1, -1, 5.0f, true},  {true, 100, -1, 5.0f, true}, {false, 300, 200, 50.0f, true},
};

std::string describe(const Options& o) {
  return std::string(o.causal ? " causal" : "") + " window=(" + std::to_string(o.left) + "," + std::to_string(o.right) +
         ") softcap=" + std::to_string(o.softcap);
}

// A refusal of a window or a soft cap is INVALID_ARGUMENT naming the field and the rung; other
// refusals name a shape or dtype field, or (FAILED_PRECONDITION) the architecture a rung needs.
void expect_named_refusal(const Status& s, const std::string& rung) {
  const std::string& m = s.message();
  const bool option =
      m.rfind("window_left:", 0) == 0 || m.rfind("window_right:", 0) == 0 || m.rfind("softcap:", 0) == 0;
  if (s.code() == StatusCode::kFailedPrecondition) {
    EXPECT_NE(m.find(rung), std::string::npos) << m;
    return;
  }
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.to_string();
  EXPECT_TRUE(option || m.rfind("q.", 0) == 0 || m.rfind("k.", 0) == 0) << m;
  if (option) {
    EXPECT_NE(m.find(rung), std::string::npos) << m;
  }
}

TEST(GpuAttentionOptions, EveryVariantMatchesReference) {
  const auto variants = cuda_attention_variants();
  if (variants.empty()) GTEST_SKIP() << "this build has no CUDA variants";
  if (!gpu()) GTEST_SKIP() << "no usable GPU on this machine";
  std::mt19937_64 rng(testing::seed());
  struct Case {
    std::int64_t b, hq, hkv, sq, sk;
    bool is_long;
  };
  const Case cases[] = {
      {1, 1, 1, 1, 1, false},   {2, 4, 2, 17, 33, false},   {1, 2, 1, 33, 7, false},
      {1, 8, 2, 1, 777, false}, {1, 2, 2, 130, 257, false}, {1, 1, 1, 1000, 1031, true},
  };
  std::map<std::string, int> ran;
  for (DType dt : {DType::kFloat32, DType::kBFloat16, DType::kFloat16})
    for (std::int64_t d : {64, 128, 32, 80, 96, 192, 256})
      for (const auto& c : cases)
        for (const Options& opt : kOptions) {
          if (c.is_long && (!opt.on_long || (d != 64 && d != 128))) continue;
          SCOPED_TRACE(std::string(dtype_name(dt)) + " B" + std::to_string(c.b) + " Hq" + std::to_string(c.hq) +
                       " Hkv" + std::to_string(c.hkv) + " Sq" + std::to_string(c.sq) + " Sk" + std::to_string(c.sk) +
                       " D" + std::to_string(d) + describe(opt) + " seed=" + std::to_string(testing::seed()));
          // Large logits (scaled scores of about 16 standard deviations) so that both caps matter.
          Tensor q = random_tensor(dt, {c.b, c.hq, c.sq, d}, rng, 4.0f);
          Tensor k = random_tensor(dt, {c.b, c.hkv, c.sk, d}, rng, 4.0f);
          Tensor vv = random_tensor(dt, {c.b, c.hkv, c.sk, d}, rng);
          std::optional<std::vector<double>> want, want_lse;  // computed once, for the first rung that runs
          for (const auto* v : variants) {
            SCOPED_TRACE(v->info.name);
            Tensor o(dt, q.shape()), lse(DType::kFloat32, {c.b, c.hq, c.sq});
            poison(o);
            poison(lse);
            AttentionArgs args{
                q.view(), k.view(),  vv.view(),  o.view(), lse.view(), opt.causal, resolve_attention_scale(0.0f, d),
                opt.left, opt.right, opt.softcap};
            const Status supported = v->supports(args);
            if (!supported.ok()) {
              expect_named_refusal(supported, v->info.name);
              // Rungs 01 and 02 take windows and caps: they may refuse only a shape or dtype.
              if (v->info.name == "attention/01_naive" || v->info.name == "attention/02_flash_fp32") {
                EXPECT_EQ(supported.message().rfind("q.", 0), 0u) << supported.message();
              }
              continue;
            }
            ExecTimings t;
            const Status s = gpu()->execute(make_call(*v, args), t);
            ASSERT_TRUE(s.ok()) << s.to_string();
            if (!want) {
              want_lse.emplace();
              want = reference::attention(args, &*want_lse);
            }
            EXPECT_LE(reference::relative_frobenius_error(o.view(), *want), reference::tolerance(dt));
            EXPECT_LE(reference::lse_error(lse.view(), *want_lse), 1e-4);
            ++ran[v->info.name];
          }
        }
  for (const auto& [name, n] : ran) std::printf("%-32s %d cases\n", name.c_str(), n);
  EXPECT_GT(ran["attention/01_naive"], 0);
  EXPECT_GT(ran["attention/02_flash_fp32"], 0);
  EXPECT_GT(ran["attention/03_flash_mma"], 0);
  // Rung 02 takes float32 at every head dim 32-256 with every option: 7 dims x 5 short cases x
  // 12 options, plus the long case's 4 options at D 64 and 128.
  EXPECT_EQ(ran["attention/02_flash_fp32"], 7 * 5 * 12 + 2 * 4);
}

// Without a GPU too: each CUDA rung either takes a window and a soft cap or refuses them by name.
TEST(GpuAttentionOptions, RungsTakeOrRefuseByName) {
  const auto variants = cuda_attention_variants();
  if (variants.empty()) GTEST_SKIP() << "this build has no CUDA variants";
  for (DType dt : {DType::kFloat32, DType::kBFloat16})
    for (std::int64_t sq : {1, 64}) {  // prefill and decode (the Sq = 1 rungs)
      TensorView q{dt, {1, 4, sq, 128}, nullptr, MemoryKind::kDevice};
      TensorView kv{dt, {1, 4, 256, 128}, nullptr, MemoryKind::kDevice};
      AttentionArgs window{q, kv, kv, q, {}, true, 0.088f, 32, -1, 0.0f};
      AttentionArgs cap{q, kv, kv, q, {}, false, 0.088f, -1, -1, 30.0f};
      for (const auto* v : variants) {
        SCOPED_TRACE(v->info.name + " " + std::string(dtype_name(dt)) + " Sq" + std::to_string(sq));
        for (const AttentionArgs* a : {&window, &cap}) {
          const Status s = v->supports(*a);
          if (!s.ok()) expect_named_refusal(s, v->info.name);
        }
      }
      // Rung 02 for float32, 03 for the 16-bit types: both take them.
      const auto* taker = default_registry().of<AttentionArgs>().find(dt == DType::kFloat32 ? "attention/02_flash_fp32"
                                                                                            : "attention/03_flash_mma");
      ASSERT_NE(taker, nullptr);
      EXPECT_TRUE(taker->supports(window).ok()) << taker->supports(window).to_string();
      EXPECT_TRUE(taker->supports(cap).ok()) << taker->supports(cap).to_string();
    }
}

// `auto` with a window or a soft cap stays on the GPU for float32 (rung 02) and bfloat16 (a
// tensor-core rung; for one query row the split-key decode rung, which takes every option),
// prefill and decode; float32 without them too.
TEST(GpuAuto, WindowedAttentionStaysOnTheGpu) {
  if (cuda_attention_variants().empty()) GTEST_SKIP() << "this build has no CUDA variants";
  if (!gpu()) GTEST_SKIP() << "no usable GPU on this machine";
  const Target target = gpu()->target();
  for (DType dt : {DType::kFloat32, DType::kBFloat16})
    for (std::int64_t sq : {1, 1000})
      for (std::int64_t d : {64, 128}) {
        SCOPED_TRACE(std::string(dtype_name(dt)) + " Sq" + std::to_string(sq) + " D" + std::to_string(d));
        // Shapes only: selection reads no data.
        TensorView q{dt, {1, 8, sq, d}, nullptr, MemoryKind::kDevice};
        TensorView kv{dt, {1, 8, 4096, d}, nullptr, MemoryKind::kDevice};
        AttentionArgs plain{q, kv, kv, q, {}, true, 0.088f};
        AttentionArgs window = plain, cap = plain;
        window.window_left = 1024;
        cap.softcap = 50.0f;
        for (const AttentionArgs* a : {&window, &cap}) {
          auto picked = default_registry().of<AttentionArgs>().select(*a, "", target);
          ASSERT_TRUE(picked.ok()) << picked.status().to_string();
          EXPECT_EQ((*picked)->info.backend, Backend::kCuda);
          const std::string& name = (*picked)->info.name;
          if (dt == DType::kFloat32) {
            EXPECT_EQ(name, "attention/02_flash_fp32");
          } else {
            EXPECT_TRUE(name == "attention/03_flash_mma" || name == "attention/04_wgmma_tma" ||
                        (sq == 1 && name == "attention/decode_mma_split"))
                << name;
          }
        }
        if (dt == DType::kFloat32) {
          auto usual = default_registry().of<AttentionArgs>().select(plain, "", target);
          ASSERT_TRUE(usual.ok()) << usual.status().to_string();
          EXPECT_EQ((*usual)->info.name, "attention/02_flash_fp32");
        }
      }
}

}  // namespace
}  // namespace attn
