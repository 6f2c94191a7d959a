// What model families need of the CUDA rungs, against the float64 reference: every GQA group
// (3, 5, 6, 7, 12, 16, 32 and multi-query 128 heads on one kv head) on every paged rung, windows,
// soft caps and attention sinks on the rungs that take them (and a refusal naming the field on
// those that do not), sinks on the dense attention rungs, and `auto` never refusing on the GPU a
// call that any variant, the CPU's included, can serve.
#include <gtest/gtest.h>

#include <algorithm>
#include <string>
#include <vector>

#include "attn/executor.h"
#include "reference.h"
#include "support/gpu_executor.h"
#include "support/paged_batch.h"
#include "support/random.h"

namespace attn {
namespace {

using testing::gpu;
using testing::longest;
using testing::PagedBatch;
using testing::PagedCase;
using testing::paged_trace;
using testing::poison;
using testing::random_tensor;

std::vector<std::string> cuda_names(Op op) {
  std::vector<std::string> names;
  for (const VariantInfo* v : default_registry().all())
    if (v->op == op && v->backend == Backend::kCuda) names.push_back(v->name);
  if (names.empty()) names.push_back("none");
  return names;
}

std::string test_name(const ::testing::TestParamInfo<std::string>& p) {
  std::string s = p.param;
  for (char& c : s)
    if (c == '/') c = '_';
  return s;
}

template <class Args>
void run_on_gpu(const Variant<Args>& v, Args& args) {
  ExecTimings t;
  const Status s = gpu()->execute(make_call(v, args), t);
  ASSERT_TRUE(s.ok()) << s.to_string();
}

#define REQUIRE_GPU()                                                          \
  if (GetParam() == "none") GTEST_SKIP() << "this build has no CUDA variants"; \
  if (!gpu()) GTEST_SKIP() << "no usable GPU on this machine"

// The options of a call: none, a window, a soft cap, sinks, and all of them.
struct Options {
  const char* name;
  std::int64_t window_left = -1;
  float softcap = 0.0f;
  bool sinks = false;
};
const Options kOptions[] = {{"plain"},
                            {"window 0", 0},
                            {"window 37", 37},
                            {"window 1000", 1000},
                            {"softcap 5", -1, 5.0f},
                            {"sinks", -1, 0.0f, true},
                            {"window 100 + softcap 30 + sinks", 100, 30.0f, true}};

// Sinks across the range that matters: far below the scores (no effect), near them, far above
// (the row's output shrinks toward 0).
Tensor make_sinks(std::int64_t hq, std::mt19937_64& rng) {
  Tensor s(DType::kFloat32, {hq});
  std::uniform_real_distribution<float> u(-3.0f, 3.0f);
  for (std::int64_t h = 0; h < hq; ++h) s.set(static_cast<std::size_t>(h), h % 5 == 0 ? 8.0f : h % 5 == 1 ? -30.0f : u(rng));
  return s;
}

bool takes_options(const VariantInfo& info) { return info.limits.find("sliding windows") != std::string::npos; }

// A variant whose limits list windows takes every option; one that does not refuses each by name.
template <class Args>
bool refused_option(const Variant<Args>& v, const Args& args, const Options& opt) {
  const Status s = v.supports(args);
  if (s.ok()) return false;
  const std::string& m = s.message();
  const bool by_option = m.rfind("window_left:", 0) == 0 || m.rfind("softcap:", 0) == 0 || m.rfind("sinks:", 0) == 0;
  if (by_option) {
    EXPECT_TRUE(opt.window_left >= 0 || opt.softcap > 0.0f || opt.sinks) << "refused an option not asked for: " << m;
    EXPECT_FALSE(takes_options(v.info)) << "a rung that takes the options refused: " << m;
  } else {
    EXPECT_EQ(m.rfind("q.", 0), 0u) << m;  // a dtype or head dim it does not take
    EXPECT_EQ(m.find("query heads per"), std::string::npos) << "every rung takes every group: " << m;
  }
  return true;
}

// Groups as models have them: Qwen2 (7, 6), 3, 5, 12, 16, MQA with 32 and 128 query heads.
struct Heads {
  std::int64_t hq, hkv;
};
const Heads kGroups[] = {{21, 3}, {10, 2}, {12, 2}, {28, 4}, {24, 2}, {32, 2}, {32, 1}, {128, 1}};

class GpuModelFamiliesDecode : public ::testing::TestWithParam<std::string> {};

TEST_P(GpuModelFamiliesDecode, EveryGroupAndOption) {
  REQUIRE_GPU();
  const auto* v = default_registry().of<PagedDecodeArgs>().find(GetParam());
  ASSERT_NE(v, nullptr);
  std::mt19937_64 rng(testing::seed());
  int ran = 0;
  for (DType dt : {DType::kBFloat16, DType::kFloat32})
    for (std::int64_t d : {128, 64, 80, 256})
    for (const Heads& hs : kGroups)
      for (const Options& opt : kOptions) {
        const bool plain = opt.window_left < 0 && opt.softcap == 0.0f && !opt.sinks;
        if (!plain && hs.hq != 28 && hs.hq != 128) continue;  // options at groups 7 and 128
        // The other head dims (padded rows, other ring depths) at groups 7, 32 and 128, a few options.
        const bool wide_or_7 = hs.hq == 28 || hs.hkv == 1;  // groups 7, 32 and 128
        if (d != 128 && (!wide_or_7 || (!plain && opt.window_left != 37 && !opt.sinks))) continue;
        PagedCase c{hs.hq, hs.hkv, d, {}, {}};
        for (std::int32_t len : {1, 7, 33, 1000, 4097}) c.cached.push_back(len - 1), c.fresh.push_back(1);
        SCOPED_TRACE(paged_trace(dt, c, 16) + " " + opt.name);
        PagedBatch batch(dt, c, 16, rng);
        const std::int64_t n = static_cast<std::int64_t>(c.cached.size());
        Tensor q = random_tensor(dt, {n, c.hq, c.d}, rng);
        Tensor k_new = random_tensor(dt, {n, c.hkv, c.d}, rng), v_new = random_tensor(dt, {n, c.hkv, c.d}, rng);
        Tensor o(dt, q.shape()), lse(DType::kFloat32, {n, c.hq});
        Tensor sinks = make_sinks(c.hq, rng);
        poison(o);
        poison(lse);
        PagedDecodeArgs args{q.view(), k_new.view(), v_new.view(), o.view(), lse.view(), batch.device, {},
                             resolve_attention_scale(0.0f, c.d)};
        args.mask.window_left = opt.window_left;
        args.softcap = opt.softcap;
        if (opt.sinks) args.sinks = sinks.view();
        batch.plan.bind(args.seqs);
        if (refused_option(*v, args, opt)) continue;
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

INSTANTIATE_TEST_SUITE_P(Cuda, GpuModelFamiliesDecode, ::testing::ValuesIn(cuda_names(Op::kPagedDecode)), test_name);

class GpuModelFamiliesPrefill : public ::testing::TestWithParam<std::string> {};

TEST_P(GpuModelFamiliesPrefill, EveryGroupAndOption) {
  REQUIRE_GPU();
  const auto* v = default_registry().of<PagedPrefillArgs>().find(GetParam());
  ASSERT_NE(v, nullptr);
  std::mt19937_64 rng(testing::seed());
  int ran = 0;
  for (DType dt : {DType::kBFloat16, DType::kFloat32})
    for (const Heads& hs : kGroups)
      for (const Options& opt : kOptions)
        for (bool causal : {true, false}) {
          const bool plain = opt.window_left < 0 && opt.softcap == 0.0f && !opt.sinks;
          if (!plain && hs.hq != 28 && hs.hq != 128) continue;
          if (!causal && !plain && opt.window_left != 37) continue;
          // Onto empty caches and onto cached tokens, chunks crossing tiles, one token.
          PagedCase c{hs.hq, hs.hkv, 128, {0, 60, 7}, {33, 70, 1}};
          SCOPED_TRACE(paged_trace(dt, c, 16) + " " + opt.name + (causal ? " causal" : " non-causal"));
          PagedBatch batch(dt, c, 16, rng);
          const std::int64_t t = batch.tokens;
          Tensor q = random_tensor(dt, {t, c.hq, c.d}, rng);
          Tensor k_new = random_tensor(dt, {t, c.hkv, c.d}, rng), v_new = random_tensor(dt, {t, c.hkv, c.d}, rng);
          Tensor o(dt, q.shape()), lse(DType::kFloat32, {t, c.hq});
          Tensor sinks = make_sinks(c.hq, rng);
          poison(o);
          poison(lse);
          PagedPrefillArgs args;
          args.q = q.view(), args.k_new = k_new.view(), args.v_new = v_new.view(), args.o = o.view();
          args.lse = lse.view();
          args.cache = batch.device;
          args.mask.causal = causal;
          args.mask.window_left = opt.window_left;
          if (!causal && opt.window_left >= 0) args.mask.window_right = 11;
          args.softcap = opt.softcap;
          if (opt.sinks) args.sinks = sinks.view();
          args.scale = resolve_attention_scale(0.0f, c.d);
          batch.plan.bind(args);
          if (refused_option(*v, args, opt)) continue;
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

INSTANTIATE_TEST_SUITE_P(Cuda, GpuModelFamiliesPrefill, ::testing::ValuesIn(cuda_names(Op::kPagedPrefill)), test_name);

class GpuModelFamiliesAttention : public ::testing::TestWithParam<std::string> {};

// Sinks (with and without windows and caps) and odd groups on the dense rungs.
TEST_P(GpuModelFamiliesAttention, SinksAndGroups) {
  REQUIRE_GPU();
  const auto* v = default_registry().of<AttentionArgs>().find(GetParam());
  ASSERT_NE(v, nullptr);
  std::mt19937_64 rng(testing::seed());
  struct Case {
    std::int64_t b, hq, hkv, sq, sk, d;
  };
  const Case cases[] = {{1, 14, 2, 1, 1000, 128}, {2, 21, 3, 33, 300, 64}, {1, 32, 1, 1, 4097, 128},
                        {1, 28, 4, 70, 129, 128}, {1, 8, 8, 7, 7, 64}};
  int ran = 0;
  for (DType dt : kAllDTypes)
    for (const auto& c : cases)
      for (const Options& opt : kOptions)
        for (bool causal : {true, false}) {
          if (c.sk > 1000 && dt == DType::kFloat32 && GetParam().find("01_naive") != std::string::npos) continue;
          SCOPED_TRACE(std::string(dtype_name(dt)) + " B" + std::to_string(c.b) + " Hq" + std::to_string(c.hq) +
                       " Hkv" + std::to_string(c.hkv) + " Sq" + std::to_string(c.sq) + " Sk" + std::to_string(c.sk) +
                       " D" + std::to_string(c.d) + " " + opt.name + (causal ? " causal" : "") +
                       " seed=" + std::to_string(testing::seed()));
          Tensor q = random_tensor(dt, {c.b, c.hq, c.sq, c.d}, rng);
          Tensor k = random_tensor(dt, {c.b, c.hkv, c.sk, c.d}, rng);
          Tensor vv = random_tensor(dt, {c.b, c.hkv, c.sk, c.d}, rng);
          Tensor o(dt, q.shape()), lse(DType::kFloat32, {c.b, c.hq, c.sq});
          Tensor sinks = make_sinks(c.hq, rng);
          poison(o);
          poison(lse);
          AttentionArgs args{q.view(), k.view(), vv.view(), o.view(), lse.view(), causal,
                             resolve_attention_scale(0.0f, c.d)};
          args.window_left = opt.window_left;
          args.softcap = opt.softcap;
          if (opt.sinks) args.sinks = sinks.view();
          const Status supported = v->supports(args);
          if (!supported.ok()) {
            const std::string& m = supported.message();
            const bool by_option =
                m.rfind("window_left:", 0) == 0 || m.rfind("softcap:", 0) == 0 || m.rfind("sinks:", 0) == 0;
            EXPECT_TRUE(m.rfind("q.", 0) == 0 || m.rfind("k.", 0) == 0 || by_option) << m;
            if (by_option) {
              EXPECT_FALSE(takes_options(v->info)) << "a rung that takes the options refused: " << m;
            }
            EXPECT_EQ(m.find("query heads per"), std::string::npos) << "every rung takes every group: " << m;
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

INSTANTIATE_TEST_SUITE_P(Cuda, GpuModelFamiliesAttention, ::testing::ValuesIn(cuda_names(Op::kAttention)), test_name);

// `auto` on the GPU serves every call some variant (the CPU's included) serves: ops x dtypes x
// head dims x groups x options.
TEST(GpuAuto, NeverRefusesWhatAnyVariantServes) {
  if (!gpu()) GTEST_SKIP() << "no usable GPU on this machine";
  const Target target = gpu()->target();
  const Registry& reg = default_registry();
  std::mt19937_64 rng(3);
  int checked = 0;
  const auto served_anywhere = [&](const auto& ops, const auto& host_args, const auto& device_args) -> std::string {
    for (const auto& v : ops.variants()) {
      const auto& args = v.info.backend == Backend::kCuda ? device_args : host_args;
      if (v.supports(args).ok()) return v.info.name;
    }
    return std::string();
  };
  for (DType dt : kAllDTypes)
    for (std::int64_t d : {32, 64, 80, 96, 128, 192, 256})
      for (const Heads& hs : {Heads{8, 8}, Heads{8, 4}, Heads{8, 2}, Heads{21, 3}, Heads{28, 4}, Heads{16, 2},
                              Heads{32, 1}, Heads{128, 1}})
      {
        // The KV-cache calls' caches, made once for every option.
        PagedCase c{hs.hq, hs.hkv, d, {99, 300}, {1, 1}};
        PagedBatch batch(dt, c, 16, rng);
        PagedCase cp{hs.hq, hs.hkv, d, {0, 100}, {64, 1}};
        PagedBatch prefill_batch(dt, cp, 16, rng);
        Tensor sinks(DType::kFloat32, {hs.hq});
        for (const Options& opt : kOptions) {
          const std::string trace = std::string(dtype_name(dt)) + " D" + std::to_string(d) + " Hq" +
                                    std::to_string(hs.hq) + " Hkv" + std::to_string(hs.hkv) + " " + opt.name;
          // One-shot attention, prefill-like and decode-like.
          for (std::int64_t sq : {1, 200}) {
            TensorView q{dt, {1, hs.hq, sq, d}, nullptr, MemoryKind::kDevice};
            TensorView kv{dt, {1, hs.hkv, 1000, d}, nullptr, MemoryKind::kDevice};
            AttentionArgs dev{q, kv, kv, q, {}, true, 0.1f};
            dev.window_left = opt.window_left;
            dev.softcap = opt.softcap;
            if (opt.sinks) dev.sinks = TensorView{DType::kFloat32, {hs.hq}, sinks.data(), MemoryKind::kDevice};
            AttentionArgs host = dev;
            for (TensorView* t : {&host.q, &host.k, &host.v, &host.o}) t->memory = MemoryKind::kHost;
            if (opt.sinks) host.sinks = sinks.view();
            const std::string by = served_anywhere(reg.of<AttentionArgs>(), host, dev);
            if (by.empty()) continue;
            auto picked = reg.of<AttentionArgs>().select(dev, "", target);
            ++checked;
            ASSERT_TRUE(picked.ok()) << "attention Sq" << sq << " " << trace << " (" << by
                                     << " serves it): " << picked.status().to_string();
            EXPECT_EQ((*picked)->info.backend, Backend::kCuda) << trace;
          }
          // The KV-cache ops over a real device cache (the rungs check its pools' alignment).
          Tensor q(dt, {2, hs.hq, d}), kv(dt, {2, hs.hkv, d}), o(dt, {2, hs.hq, d});
          PagedDecodeArgs dd{q.view(), kv.view(), kv.view(), o.view(), {}, batch.device, {}, 0.1f};
          dd.mask.window_left = opt.window_left;
          dd.softcap = opt.softcap;
          if (opt.sinks) dd.sinks = sinks.view();
          batch.plan.bind(dd.seqs);
          PagedDecodeArgs dh = dd;
          dh.cache = batch.host;
          const std::string dby = served_anywhere(reg.of<PagedDecodeArgs>(), dh, dd);
          if (!dby.empty()) {
            ++checked;
            auto picked = reg.of<PagedDecodeArgs>().select(dd, "", target);
            ASSERT_TRUE(picked.ok()) << "paged_decode " << trace << " (" << dby << " serves it): " << picked.status().to_string();
          }
          Tensor pq(dt, {65, hs.hq, d}), pkv(dt, {65, hs.hkv, d}), po(dt, {65, hs.hq, d});
          PagedPrefillArgs pd;
          pd.q = pq.view(), pd.k_new = pkv.view(), pd.v_new = pkv.view(), pd.o = po.view();
          pd.cache = prefill_batch.device, pd.scale = 0.1f;
          pd.mask.window_left = opt.window_left;
          pd.softcap = opt.softcap;
          if (opt.sinks) pd.sinks = sinks.view();
          prefill_batch.plan.bind(pd);
          PagedPrefillArgs ph = pd;
          ph.cache = prefill_batch.host;
          const std::string pby = served_anywhere(reg.of<PagedPrefillArgs>(), ph, pd);
          if (!pby.empty()) {
            ++checked;
            auto picked = reg.of<PagedPrefillArgs>().select(pd, "", target);
            ASSERT_TRUE(picked.ok()) << "paged_prefill " << trace << " (" << pby << " serves it): " << picked.status().to_string();
          }
        }
      }
  EXPECT_GT(checked, 1000);
}

}  // namespace
}  // namespace attn
