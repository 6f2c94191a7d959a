// float8 e4m3 KV pages on the GPU rungs that read them (paged_decode/04_warp_pipes,
// paged_prefill/02_wgmma, and `auto`): the append leaves the same codes and scales as the CPU
// backend's on the same call, bit for bit (scales set on fresh pages, grown by heavier rows with the
// page's earlier rows requantized), and the outputs match the float64 reference over the cache as
// it then holds it, on awkward lengths, every head dim (decode), GQA groups 1, 4, 7, 32 and 128
// (multi-query), page sizes 16, 64 and 13, windows, soft caps and sinks. Slots no call wrote hold
// NaN codes and the unused pages NaN scales, so a read past a sequence's end shows.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "attn/executor.h"
#include "attn/fp8.h"
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

// One layer's float8 pools built from a PagedBatch's cached tokens (each page's scale from its
// rows, as an append would set it), on the host and on the device.
struct Fp8Layer {
  PagedKvLayer host, device;
  std::vector<std::uint8_t> k, v;
  std::vector<float> ks, vs;

  explicit Fp8Layer(const PagedBatch& b) {
    host = b.host;
    host.storage = KvStorage::kFloat8E4M3;
    const std::int64_t pages = host.pages, hkv = host.heads_kv, ps = host.page_size, d = host.head_dim;
    const std::size_t n = static_cast<std::size_t>(pages * host.page_elements());
    k.assign(n, 0x7f), v.assign(n, 0x7f);  // NaN codes where nothing was written
    ks.assign(static_cast<std::size_t>(pages * hkv), std::numeric_limits<float>::quiet_NaN());
    vs = ks;
    const auto& plan = b.plan;
    for (std::size_t i = 0; i + 1 < plan.page_indptr.size(); ++i) {
      const std::int64_t cached = plan.seq_lens[i] - (plan.q_indptr[i + 1] - plan.q_indptr[i]);
      for (std::int64_t p0 = 0; p0 < cached; p0 += ps) {
        const std::int64_t page = plan.page_indices[static_cast<std::size_t>(plan.page_indptr[i] + p0 / ps)];
        const std::int64_t rows = std::min(ps, cached - p0);
        for (std::int64_t h = 0; h < hkv; ++h)
          for (int pool = 0; pool < 2; ++pool) {
            const Tensor& src = pool == 0 ? b.k_host : b.v_host;
            std::vector<float> x(static_cast<std::size_t>(rows * d));
            float amax = 0.0f;
            for (std::int64_t e = 0; e < rows * d; ++e) {
              x[static_cast<std::size_t>(e)] = src.get(static_cast<std::size_t>(host.offset(page, h, 0) + e));
              amax = std::max(amax, std::fabs(x[static_cast<std::size_t>(e)]));
            }
            const float scale = fp8_pow2_scale(amax);
            (pool == 0 ? ks : vs)[static_cast<std::size_t>(page * hkv + h)] = scale;
            quantize_fp8_e4m3(x.data(), rows * d, scale, (pool == 0 ? k : v).data() + host.offset(page, h, 0));
          }
      }
    }
    host.k = k.data(), host.v = v.data(), host.k_scales = ks.data(), host.v_scales = vs.data();
    device = host;
    device.memory = MemoryKind::kDevice;
    device.k = upload(k.data(), k.size());
    device.v = upload(v.data(), v.size());
    device.k_scales = static_cast<float*>(upload(ks.data(), ks.size() * 4));
    device.v_scales = static_cast<float*>(upload(vs.data(), vs.size() * 4));
  }
  ~Fp8Layer() {
    for (void* p : {device.k, device.v, static_cast<void*>(device.k_scales), static_cast<void*>(device.v_scales)})
      gpu()->deallocate(p);
  }
  Fp8Layer(const Fp8Layer&) = delete;
  Fp8Layer& operator=(const Fp8Layer&) = delete;

  static void* upload(const void* src, std::size_t bytes) {
    auto r = gpu()->allocate(bytes);
    EXPECT_TRUE(r.ok()) << r.status().to_string();
    if (!r.ok()) return nullptr;
    EXPECT_TRUE(gpu()->write(*r, 0, src, bytes).ok());
    return *r;
  }

  // The device's pools and scales now, on the host: a layer the reference (and the CPU) can read.
  struct Copy {
    std::vector<std::uint8_t> k, v;
    std::vector<float> ks, vs;
    PagedKvLayer layer;
  };
  Copy read_device() const {
    Copy c{k, v, ks, vs, host};
    EXPECT_TRUE(gpu()->read(c.k.data(), device.k, 0, c.k.size()).ok());
    EXPECT_TRUE(gpu()->read(c.v.data(), device.v, 0, c.v.size()).ok());
    EXPECT_TRUE(gpu()->read(c.ks.data(), device.k_scales, 0, c.ks.size() * 4).ok());
    EXPECT_TRUE(gpu()->read(c.vs.data(), device.v_scales, 0, c.vs.size() * 4).ok());
    c.layer.k = c.k.data(), c.layer.v = c.v.data(), c.layer.k_scales = c.ks.data(), c.layer.v_scales = c.vs.data();
    return c;
  }
  // A host copy as before the call, for the CPU backend to append to.
  Copy host_copy() const {
    Copy c{k, v, ks, vs, host};
    c.layer.k = c.k.data(), c.layer.v = c.v.data(), c.layer.k_scales = c.ks.data(), c.layer.v_scales = c.vs.data();
    return c;
  }
};

// Codes and scales equal bit for bit (NaN scales of unused pages compare by bits).
void expect_same_cache(const Fp8Layer::Copy& got, const Fp8Layer::Copy& want) {
  EXPECT_EQ(std::memcmp(got.k.data(), want.k.data(), got.k.size()), 0) << "K codes differ from the CPU's";
  EXPECT_EQ(std::memcmp(got.v.data(), want.v.data(), got.v.size()), 0) << "V codes differ from the CPU's";
  EXPECT_EQ(std::memcmp(got.ks.data(), want.ks.data(), got.ks.size() * 4), 0) << "K scales differ from the CPU's";
  EXPECT_EQ(std::memcmp(got.vs.data(), want.vs.data(), got.vs.size() * 4), 0) << "V scales differ from the CPU's";
}

template <class Args>
Status run(Executor& ex, const Variant<Args>& v, Args& args) {
  ExecTimings t;
  return ex.execute(make_call(v, args), t);
}

// New rows a few times heavier than the cached ones for some sequences: their pages' scales grow.
Tensor heavy_rows(DType dt, Shape shape, std::mt19937_64& rng, float factor) {
  Tensor t = random_tensor(dt, shape, rng);
  const std::int64_t per_row = shape[1] * shape[2];
  for (std::int64_t e = 0; e < t.numel(); ++e)
    if ((e / per_row) % 2 == 1) t.set(static_cast<std::size_t>(e), t.get(static_cast<std::size_t>(e)) * factor);
  return t;
}

struct Opt {
  const char* name;
  std::int64_t window_left = -1;
  float softcap = 0.0f;
  bool sinks = false;
};

Tensor make_sinks(std::int64_t hq) {
  Tensor s(DType::kFloat32, {hq});
  for (std::int64_t h = 0; h < hq; ++h) s.set(static_cast<std::size_t>(h), h % 3 == 0 ? 4.0f : -1.0f);
  return s;
}

TEST(GpuFp8Kv, DecodeMatchesTheCpuAppendAndFloat64) {
  if (!gpu()) GTEST_SKIP() << "no usable GPU on this machine";
  const auto& reg = default_registry().of<PagedDecodeArgs>();
  const auto* cpu_variant = reg.find("paged_decode/cpu");
  ASSERT_NE(cpu_variant, nullptr);
  auto cpu = make_cpu_executor();
  std::mt19937_64 rng(testing::seed());
  struct Heads {
    std::int64_t hq, hkv;
  };
  const Opt opts[] = {{"plain"}, {"window 37", 37}, {"softcap 20", -1, 20.0f}, {"sinks", -1, 0.0f, true},
                      {"window 100 + softcap 30 + sinks", 100, 30.0f, true}};
  int ran = 0;
  for (const char* name : {"paged_decode/04_warp_pipes", "auto"})
    for (DType dt : {DType::kBFloat16, DType::kFloat16})
      for (std::int64_t d : {128, 64, 32, 80, 96, 192, 256})
        for (const Heads& hs : {Heads{8, 8}, Heads{32, 8}, Heads{28, 4}, Heads{32, 1}, Heads{128, 1}})
          for (std::int64_t ps : {16, 64, 13})
            for (const Opt& opt : opts) {
              // The full matrix at D 128 bfloat16; other dims, dtypes, pages and options sampled.
              const bool plain = opt.window_left < 0 && opt.softcap == 0.0f && !opt.sinks;
              if (d != 128 && (ps != 16 || (hs.hq != 28 && hs.hq != 128) || !(plain || opt.sinks))) continue;
              if (dt != DType::kBFloat16 && (d != 128 || ps != 64 || !plain)) continue;
              if (std::string(name) == "auto" && (d != 128 || ps != 16 || !plain)) continue;
              PagedCase c{hs.hq, hs.hkv, d, {}, {}};
              for (std::int32_t len : {1, 7, 33, 1000, 4097}) c.cached.push_back(len - 1), c.fresh.push_back(1);
              SCOPED_TRACE(std::string(name) + " " + paged_trace(dt, c, ps) + " " + opt.name);
              PagedBatch batch(dt, c, ps, rng);
              Fp8Layer layer(batch);
              const std::int64_t n = static_cast<std::int64_t>(c.cached.size());
              Tensor q = random_tensor(dt, {n, c.hq, c.d}, rng);
              Tensor k_new = heavy_rows(dt, {n, c.hkv, c.d}, rng, 9.0f), v_new = heavy_rows(dt, {n, c.hkv, c.d}, rng, 5.0f);
              Tensor o(dt, q.shape()), lse(DType::kFloat32, {n, c.hq}), sinks = make_sinks(c.hq);
              poison(o);
              poison(lse);
              PagedDecodeArgs args{q.view(), k_new.view(), v_new.view(), o.view(), lse.view(), layer.device, {},
                                   resolve_attention_scale(0.0f, c.d)};
              args.mask.window_left = opt.window_left;
              args.softcap = opt.softcap;
              if (opt.sinks) args.sinks = sinks.view();
              batch.plan.bind(args.seqs);
              if (std::string(name) == "auto") {
                auto chosen = reg.select(args, "", Target{Backend::kCuda, 90});
                ASSERT_TRUE(chosen.ok()) << chosen.status().to_string();
                EXPECT_EQ((*chosen)->info.name, "paged_decode/04_warp_pipes");
                ASSERT_TRUE(run(*gpu(), **chosen, args).ok());
              } else {
                const auto* v = reg.find(name);
                ASSERT_NE(v, nullptr);
                const Status s = run(*gpu(), *v, args);
                ASSERT_TRUE(s.ok()) << s.to_string();
              }
              ++ran;
              const Fp8Layer::Copy got = layer.read_device();
              // The CPU backend's append of the same call onto the same pools.
              Fp8Layer::Copy want = layer.host_copy();
              Tensor o_cpu(dt, q.shape());
              PagedDecodeArgs cpu_args = args;
              cpu_args.cache = want.layer;
              cpu_args.o = o_cpu.view();
              cpu_args.lse = {};
              ASSERT_TRUE(run(*cpu, *cpu_variant, cpu_args).ok());
              expect_same_cache(got, want);
              PagedDecodeArgs ref_args = args;
              ref_args.cache = got.layer;
              std::vector<double> want_lse;
              const auto want_o = reference::paged_decode(ref_args, &want_lse);
              EXPECT_LE(reference::relative_frobenius_error(o.view(), want_o), reference::tolerance(dt, longest(c)));
              EXPECT_LE(reference::lse_error(lse.view(), want_lse), 1e-4);
            }
  EXPECT_GT(ran, 0);
}

TEST(GpuFp8Kv, PrefillMatchesTheCpuAppendAndFloat64) {
  if (!gpu()) GTEST_SKIP() << "no usable GPU on this machine";
  if (gpu()->target().compute_capability != 90) GTEST_SKIP() << "paged_prefill/02_wgmma is for sm_90";
  const auto& reg = default_registry().of<PagedPrefillArgs>();
  const auto* cpu_variant = reg.find("paged_prefill/cpu");
  ASSERT_NE(cpu_variant, nullptr);
  auto cpu = make_cpu_executor();
  std::mt19937_64 rng(testing::seed());
  const Opt opts[] = {{"plain"}, {"window 37", 37}, {"softcap 20 + sinks", -1, 20.0f, true}};
  int ran = 0;
  for (const char* name : {"paged_prefill/02_wgmma", "auto"})
    for (DType dt : {DType::kBFloat16, DType::kFloat16})
      for (std::int64_t d : {128, 64, 96})
        for (std::int64_t hq : {28, 32, 128})
          for (std::int64_t ps : {16, 64})
            for (const Opt& opt : opts)
              for (bool causal : {true, false}) {
                const bool plain = opt.window_left < 0 && opt.softcap == 0.0f && !opt.sinks;
                if ((d != 128 || dt != DType::kBFloat16) && (hq != 28 || ps != 16 || !plain || !causal)) continue;
                if (hq == 128 && (ps != 16 || !plain || !causal)) continue;  // the float64 reference's slowest
                if (!causal && !plain) continue;
                if (std::string(name) == "auto" && (d != 128 || hq != 28 || !plain || !causal)) continue;
                const std::int64_t hkv = hq == 128 ? 1 : hq == 28 ? 4 : 8;
                // Onto empty caches and onto cached tokens, chunks crossing pages, one token.
                PagedCase c{hq, hkv, d, {0, 60, 7, 200}, {33, 70, 1, 65}};
                SCOPED_TRACE(std::string(name) + " " + paged_trace(dt, c, ps) + " " + opt.name +
                             (causal ? " causal" : " non-causal"));
                PagedBatch batch(dt, c, ps, rng);
                Fp8Layer layer(batch);
                const std::int64_t t = batch.tokens;
                Tensor q = random_tensor(dt, {t, c.hq, c.d}, rng);
                Tensor k_new = heavy_rows(dt, {t, c.hkv, c.d}, rng, 6.0f), v_new = heavy_rows(dt, {t, c.hkv, c.d}, rng, 3.0f);
                Tensor o(dt, q.shape()), lse(DType::kFloat32, {t, c.hq}), sinks = make_sinks(c.hq);
                poison(o);
                poison(lse);
                PagedPrefillArgs args;
                args.q = q.view(), args.k_new = k_new.view(), args.v_new = v_new.view(), args.o = o.view();
                args.lse = lse.view();
                args.cache = layer.device;
                args.mask.causal = causal;
                args.mask.window_left = opt.window_left;
                args.softcap = opt.softcap;
                if (opt.sinks) args.sinks = sinks.view();
                args.scale = resolve_attention_scale(0.0f, c.d);
                batch.plan.bind(args);
                if (std::string(name) == "auto") {
                  auto chosen = reg.select(args, "", Target{Backend::kCuda, 90});
                  ASSERT_TRUE(chosen.ok()) << chosen.status().to_string();
                  EXPECT_EQ((*chosen)->info.name, "paged_prefill/02_wgmma");
                  ASSERT_TRUE(run(*gpu(), **chosen, args).ok());
                } else {
                  const auto* v = reg.find(name);
                  ASSERT_NE(v, nullptr);
                  const Status s = run(*gpu(), *v, args);
                  ASSERT_TRUE(s.ok()) << s.to_string();
                }
                ++ran;
                const Fp8Layer::Copy got = layer.read_device();
                Fp8Layer::Copy want = layer.host_copy();
                Tensor o_cpu(dt, q.shape());
                PagedPrefillArgs cpu_args = args;
                cpu_args.cache = want.layer;
                cpu_args.o = o_cpu.view();
                cpu_args.lse = {};
                ASSERT_TRUE(run(*cpu, *cpu_variant, cpu_args).ok());
                expect_same_cache(got, want);
                PagedPrefillArgs ref_args = args;
                ref_args.cache = got.layer;
                std::vector<double> want_lse;
                const auto want_o = reference::paged_prefill(ref_args, &want_lse);
                EXPECT_LE(reference::relative_frobenius_error(o.view(), want_o), reference::tolerance(dt, longest(c)));
                EXPECT_LE(reference::lse_error(lse.view(), want_lse), 1e-4);
              }
  EXPECT_GT(ran, 0);
}

// The append on awkward values, against the CPU's codes and scales bit for bit (this library builds
// with fast math; the append must not flush what the CPU keeps): pages of zeros (scale 0), tiny
// magnitudes (scales at the 2^-126 floor, bfloat16 subnormals), NaN of either sign (kept, with its
// sign, also through a requantization), float16's largest values, and a client's calibrated scales
// that are not powers of two.
TEST(GpuFp8Kv, AppendOfAwkwardValuesMatchesTheCpu) {
  if (!gpu()) GTEST_SKIP() << "no usable GPU on this machine";
  const auto& reg = default_registry().of<PagedDecodeArgs>();
  const auto* gpu_variant = reg.find("paged_decode/04_warp_pipes");
  const auto* cpu_variant = reg.find("paged_decode/cpu");
  ASSERT_NE(gpu_variant, nullptr);
  ASSERT_NE(cpu_variant, nullptr);
  auto cpu = make_cpu_executor();
  std::mt19937_64 rng(testing::seed());
  const float nan = std::numeric_limits<float>::quiet_NaN();
  struct Kind {
    const char* name;
    DType dt;
    float scale;         // times N(0, 1)
    bool nans, fixed;    // NaN of both signs in the new rows; calibrated scales
  };
  for (const Kind& kind : {Kind{"zeros", DType::kBFloat16, 0.0f, false, false},
                           Kind{"tiny 1e-37", DType::kBFloat16, 1e-37f, false, false},
                           Kind{"bf16 subnormals 1e-39", DType::kBFloat16, 1e-39f, false, false},
                           Kind{"huge 1e30", DType::kBFloat16, 1e30f, false, false},
                           Kind{"NaN", DType::kBFloat16, 1.0f, true, false},
                           Kind{"f16 near 65504", DType::kFloat16, 30000.0f, false, false},
                           Kind{"calibrated scales", DType::kBFloat16, 1.0f, false, true}}) {
    SCOPED_TRACE(std::string(kind.name) + " seed=" + std::to_string(testing::seed()));
    PagedCase c{8, 2, 64, {0, 5, 16, 28}, {1, 1, 1, 1}};
    PagedBatch batch(kind.dt, c, 16, rng);
    Fp8Layer layer(batch);
    Fp8Layer::Copy cpu_cache = layer.host_copy();
    if (kind.fixed) {  // calibrated: fixed, not powers of two, on both copies
      std::vector<float> ks(layer.ks.size()), vs(layer.vs.size());
      for (std::size_t i = 0; i < ks.size(); ++i) ks[i] = 0.0037f * static_cast<float>(i % 7 + 1), vs[i] = 0.011f / static_cast<float>(i % 5 + 1);
      ASSERT_TRUE(gpu()->write(layer.device.k_scales, 0, ks.data(), ks.size() * 4).ok());
      ASSERT_TRUE(gpu()->write(layer.device.v_scales, 0, vs.data(), vs.size() * 4).ok());
      cpu_cache.ks = ks, cpu_cache.vs = vs;
      cpu_cache.layer.k_scales = cpu_cache.ks.data(), cpu_cache.layer.v_scales = cpu_cache.vs.data();
      layer.device.fixed_scales = cpu_cache.layer.fixed_scales = true;
    }
    // Four decode steps of each sequence: the pages' later rows grow scales (x 64 at step 2).
    for (int step = 0; step < 4; ++step) {
      const std::int64_t n = 4;
      Tensor q = random_tensor(kind.dt, {n, c.hq, c.d}, rng);
      Tensor k_new = random_tensor(kind.dt, {n, c.hkv, c.d}, rng), v_new = random_tensor(kind.dt, {n, c.hkv, c.d}, rng);
      const float factor = kind.scale * (step == 2 ? 64.0f : 1.0f) * (kind.dt == DType::kFloat16 && step == 2 ? 1.0f / 64 : 1.0f);
      for (Tensor* t : {&k_new, &v_new})
        for (std::size_t e = 0; e < static_cast<std::size_t>(t->numel()); ++e) {
          float x = t->get(e) * factor;
          if (kind.dt == DType::kFloat16) x = std::max(-65504.0f, std::min(65504.0f, x));
          if (kind.nans && e % 37 == 3) x = e % 2 ? -nan : nan;
          t->set(e, x);
        }
      Tensor o(kind.dt, q.shape()), o_cpu(kind.dt, q.shape());
      PagedDecodeArgs args{q.view(), k_new.view(), v_new.view(), o.view(), {}, layer.device, {}, 0.125f};
      PagedPlan plan = batch.plan;
      for (std::size_t i = 0; i < plan.seq_lens.size(); ++i) plan.seq_lens[i] += step;
      // Each step appends one more row: the pages hold cached + fresh + 3 rows at most (16 a page).
      plan.bind(args.seqs);
      const Status s = run(*gpu(), *gpu_variant, args);
      ASSERT_TRUE(s.ok()) << s.to_string();
      PagedDecodeArgs cpu_args = args;
      cpu_args.cache = cpu_cache.layer;
      cpu_args.o = o_cpu.view();
      ASSERT_TRUE(run(*cpu, *cpu_variant, cpu_args).ok());
      const Fp8Layer::Copy got = layer.read_device();
      SCOPED_TRACE("step " + std::to_string(step));
      expect_same_cache(got, cpu_cache);
      // Outputs where both backends' float32 stays in range (fast math flushes the GPU's subnormal
      // scores and sums: tiny caches' outputs are not comparable; NaN propagates).
      if (kind.dt == DType::kFloat16 || kind.fixed) {
        std::vector<double> want;
        for (std::size_t e = 0; e < static_cast<std::size_t>(o_cpu.numel()); ++e) want.push_back(o_cpu.get(e));
        EXPECT_LE(reference::relative_frobenius_error(o.view(), want), reference::tolerance(kind.dt, 64))
            << "the GPU's outputs against the CPU's over the same cache";
      }
    }
  }
}

// The rungs that read only 16-bit pages refuse a float8 cache naming cache.storage.
TEST(GpuFp8Kv, OtherRungsRefuseFloat8PagesByName) {
  if (!gpu()) GTEST_SKIP() << "no usable GPU on this machine";
  std::mt19937_64 rng(testing::seed());
  PagedCase c{8, 2, 64, {10}, {1}};
  PagedBatch batch(DType::kBFloat16, c, 16, rng);
  Fp8Layer layer(batch);
  Tensor q = random_tensor(DType::kBFloat16, {1, 8, 64}, rng), kv = random_tensor(DType::kBFloat16, {1, 2, 64}, rng);
  Tensor o(DType::kBFloat16, q.shape());
  PagedDecodeArgs args{q.view(), kv.view(), kv.view(), o.view(), {}, layer.device, {}, 0.125f};
  batch.plan.bind(args.seqs);
  for (const char* name : {"paged_decode/01_block_per_head", "paged_decode/02_split_kv", "paged_decode/03_split_kv_mma"}) {
    const auto* v = default_registry().of<PagedDecodeArgs>().find(name);
    ASSERT_NE(v, nullptr) << name;
    const Status s = v->supports(args);
    EXPECT_FALSE(s.ok()) << name;
    EXPECT_EQ(s.message().rfind("cache.storage:", 0), 0u) << s.message();
  }
}

}  // namespace
}  // namespace attn
