// The CPU variants of the KV-cache ops against the float64 reference: ragged batches on awkward
// lengths (1, 15, 16, 17, 1000, 4097: non-multiples of every page), page sizes 16 and 64, pages
// assigned in shuffled order, GQA, every dtype, outputs poisoned; and the append itself: the new
// rows land bit for bit in the slots the page tables give them, and nothing else in the pools
// changes.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>

#include "attn/executor.h"
#include "attn/registry.h"
#include "reference.h"
#include "state/kv_cache.h"
#include "support/random.h"

namespace attn {
namespace {

using testing::poison;
using testing::random_tensor;

// One sequence of a call: tokens already cached, and the call's new ones.
struct SeqSpec {
  std::int64_t cached, fresh;
};

// A cache layer in host memory with pages handed out in shuffled order, and one call's inputs.
struct PagedCase {
  std::int64_t hq, hkv, d, page_size;
  DType dtype;
  Tensor k_pool, v_pool, q, k_new, v_new, o, lse;
  PagedPlan plan;
  PagedKvLayer layer;

  PagedCase(const std::vector<SeqSpec>& seqs, std::int64_t hq_, std::int64_t hkv_, std::int64_t d_,
            std::int64_t page_size_, DType dt, std::mt19937_64& rng)
      : hq(hq_), hkv(hkv_), d(d_), page_size(page_size_), dtype(dt) {
    std::int64_t pages = 0, rows = 0;
    for (const auto& s : seqs)
      pages += (s.cached + s.fresh + page_size - 1) / page_size, rows += s.fresh;
    pages += 3;  // spare pages nobody owns: the kernel must leave them alone
    k_pool = random_tensor(dt, {pages, hkv, page_size, d}, rng);
    v_pool = random_tensor(dt, {pages, hkv, page_size, d}, rng);
    std::vector<std::int32_t> order(static_cast<std::size_t>(pages));
    std::iota(order.begin(), order.end(), 0);
    std::shuffle(order.begin(), order.end(), rng);
    std::size_t next = 0;
    plan.page_indptr = {0};
    plan.q_indptr = {0};
    for (const auto& s : seqs) {
      const std::int64_t len = s.cached + s.fresh;
      for (std::int64_t p = 0; p < (len + page_size - 1) / page_size; ++p)
        plan.page_indices.push_back(order[next++]);
      plan.page_indptr.push_back(static_cast<std::int32_t>(plan.page_indices.size()));
      plan.seq_lens.push_back(static_cast<std::int32_t>(len));
      plan.q_indptr.push_back(plan.q_indptr.back() + static_cast<std::int32_t>(s.fresh));
    }
    q = random_tensor(dt, {rows, hq, d}, rng);
    k_new = random_tensor(dt, {rows, hkv, d}, rng);
    v_new = random_tensor(dt, {rows, hkv, d}, rng);
    o = Tensor(dt, {rows, hq, d});
    lse = Tensor(DType::kFloat32, {rows, hq});
    poison(o);
    poison(lse);
    layer = {dt, pages, hkv, page_size, d, k_pool.data(), v_pool.data(), MemoryKind::kHost};
  }

  template <class Args>
  Args args() {
    Args a;
    a.q = q.view();
    a.k_new = k_new.view();
    a.v_new = v_new.view();
    a.o = o.view();
    a.lse = lse.view();
    a.cache = layer;
    a.scale = resolve_attention_scale(0.0f, d);
    if constexpr (std::is_same_v<Args, PagedPrefillArgs>) {
      plan.bind(a);
    } else {
      plan.bind(a.seqs);
    }
    return a;
  }
};

std::vector<const VariantInfo*> cpu_variants(Op op) {
  std::vector<const VariantInfo*> out;
  for (const VariantInfo* v : default_registry().all())
    if (v->op == op && v->backend == Backend::kCpu) out.push_back(v);
  return out;
}

// A call's options beyond the plain causal mask: window, soft cap, sinks (empty: none).
struct PagedOptions {
  AttentionMask mask{true};
  float softcap = 0.0f;
  std::vector<float> sinks;
};

// Runs `variant` and checks o, lse and the pools against the reference and the inputs.
template <class Args>
void check(const Variant<Args>& variant, PagedCase& c, const PagedOptions& opt) {
  Args a = c.args<Args>();
  a.mask = opt.mask;
  a.softcap = opt.softcap;
  Tensor sinks;
  if (!opt.sinks.empty()) {
    sinks = Tensor::from_floats(DType::kFloat32, {c.hq}, opt.sinks);
    a.sinks = sinks.view();
  }
  ASSERT_TRUE(variant.supports(a).ok()) << variant.supports(a).to_string();
  std::vector<double> want_lse;
  std::vector<double> want;
  if constexpr (std::is_same_v<Args, PagedPrefillArgs>) {
    want = reference::paged_prefill(a, &want_lse);
  } else {
    want = reference::paged_decode(a, &want_lse);
  }
  const Tensor k_before = c.k_pool, v_before = c.v_pool;
  Stream stream(Backend::kCpu);
  const Status s = variant.run(a, stream);
  ASSERT_TRUE(s.ok()) << s.to_string();
  std::int64_t longest = 0;
  for (auto l : c.plan.seq_lens) longest = std::max<std::int64_t>(longest, l);
  EXPECT_LE(reference::relative_frobenius_error(c.o.view(), want),
            reference::tolerance(c.dtype, longest))
      << variant.info.name << " seed " << testing::seed();
  EXPECT_LE(reference::lse_error(c.lse.view(), want_lse), 1e-3)
      << variant.info.name << " seed " << testing::seed();

  // The pools: each new row in its slot, bit for bit; every other byte as before.
  Tensor k_want = k_before, v_want = v_before;
  const std::size_t row = static_cast<std::size_t>(c.d) * element_size(c.dtype);
  for (std::size_t i = 0; i + 1 < c.plan.q_indptr.size(); ++i) {
    const std::int64_t fresh = c.plan.q_indptr[i + 1] - c.plan.q_indptr[i],
                       len = c.plan.seq_lens[i];
    for (std::int64_t j = 0; j < fresh; ++j) {
      const std::int64_t t = len - fresh + j;
      const std::int64_t page =
          c.plan.page_indices[static_cast<std::size_t>(c.plan.page_indptr[i] + t / c.page_size)];
      for (std::int64_t h = 0; h < c.hkv; ++h) {
        const std::size_t slot =
            static_cast<std::size_t>(c.layer.offset(page, h, t % c.page_size)) *
            element_size(c.dtype);
        const std::size_t src =
            static_cast<std::size_t>(((c.plan.q_indptr[i] + j) * c.hkv + h) * c.d) *
            element_size(c.dtype);
        std::memcpy(static_cast<char*>(k_want.data()) + slot,
                    static_cast<const char*>(c.k_new.data()) + src, row);
        std::memcpy(static_cast<char*>(v_want.data()) + slot,
                    static_cast<const char*>(c.v_new.data()) + src, row);
      }
    }
  }
  EXPECT_EQ(std::memcmp(k_want.data(), c.k_pool.data(), k_want.bytes()), 0) << "K pool";
  EXPECT_EQ(std::memcmp(v_want.data(), c.v_pool.data(), v_want.bytes()), 0) << "V pool";
}

template <class Args>
void check(const Variant<Args>& variant, PagedCase& c, bool causal = true) {
  PagedOptions opt;
  opt.mask.causal = causal;
  check(variant, c, opt);
}

class PagedCpu : public ::testing::TestWithParam<std::tuple<DType, int>> {};

TEST_P(PagedCpu, DecodeRaggedBatchOnAwkwardLengths) {
  const auto [dtype, page_size] = GetParam();
  std::mt19937_64 rng(testing::seed());
  // Cached lengths such that the caches (cached + 1) are 1, 15, 16, 17, 1000 and 4097 long.
  const std::vector<SeqSpec> seqs{{0, 1}, {14, 1}, {15, 1}, {16, 1}, {999, 1}, {4096, 1}};
  for (const VariantInfo* info : cpu_variants(Op::kPagedDecode)) {
    const auto* v = default_registry().of<PagedDecodeArgs>().find(info->name);
    for (auto [hq, hkv] : {std::pair{4, 4}, std::pair{8, 2}}) {
      PagedCase c(seqs, hq, hkv, 64, page_size, dtype, rng);
      SCOPED_TRACE(info->name + " Hq " + std::to_string(hq) + " Hkv " + std::to_string(hkv));
      check(*v, c);
    }
  }
}

TEST_P(PagedCpu, PrefillOntoEmptyAndExistingCaches) {
  const auto [dtype, page_size] = GetParam();
  std::mt19937_64 rng(testing::seed());
  // Chunks of 1, 15, 16, 17 and 100 tokens onto empty caches and onto caches of awkward lengths.
  const std::vector<SeqSpec> seqs{{0, 1},     {0, 17},     {15, 16}, {16, 15},
                                  {1000, 17}, {4097, 100}, {7, 1}};
  for (const VariantInfo* info : cpu_variants(Op::kPagedPrefill)) {
    const auto* v = default_registry().of<PagedPrefillArgs>().find(info->name);
    PagedCase c(seqs, 8, 2, 32, page_size, dtype, rng);
    SCOPED_TRACE(info->name);
    check(*v, c);
  }
}

TEST_P(PagedCpu, NonCausalPrefillSeesTheWholeSequence) {
  const auto [dtype, page_size] = GetParam();
  std::mt19937_64 rng(testing::seed());
  for (const VariantInfo* info : cpu_variants(Op::kPagedPrefill)) {
    const auto* v = default_registry().of<PagedPrefillArgs>().find(info->name);
    PagedCase c({{33, 7}, {0, 20}}, 4, 1, 16, page_size, dtype, rng);
    check(*v, c, /*causal=*/false);
  }
}

std::string name_of(const ::testing::TestParamInfo<std::tuple<DType, int>>& p) {
  return std::string(dtype_name(std::get<0>(p.param))) + "_page" +
         std::to_string(std::get<1>(p.param));
}

INSTANTIATE_TEST_SUITE_P(AllDtypes, PagedCpu,
                         ::testing::Combine(::testing::Values(DType::kFloat32, DType::kFloat16,
                                                              DType::kBFloat16),
                                            ::testing::Values(16, 64)),
                         name_of);

TEST(PagedChecks, RefuseMismatchedShapesNamingTheField) {
  std::mt19937_64 rng(testing::seed());
  PagedCase c({{3, 1}}, 4, 2, 16, 16, DType::kFloat32, rng);
  PagedDecodeArgs a = c.args<PagedDecodeArgs>();
  EXPECT_TRUE(check_paged_decode(a).ok());
  PagedDecodeArgs bad = a;
  bad.q.shape = {1, 3, 16};  // Hq not a multiple of Hkv
  EXPECT_NE(check_paged_decode(bad).message().find("q.shape"), std::string::npos);
  bad = a;
  bad.k_new.shape = {1, 4, 16};
  EXPECT_NE(check_paged_decode(bad).message().find("k_new.shape"), std::string::npos);
  bad = a;
  bad.v_new.dtype = DType::kBFloat16;
  EXPECT_NE(check_paged_decode(bad).message().find("v_new.dtype"), std::string::npos);
  bad = a;
  bad.q.shape = {1, 4, 8};  // not the cache's head dim
  EXPECT_NE(check_paged_decode(bad).message().find("head dim"), std::string::npos);
  // Merged calls' sequence offsets: increasing, from 0 to n (here n = 1).
  const std::int32_t whole[] = {0, 1}, empty_call[] = {0, 0, 1}, short_of_n[] = {0, 0};
  bad = a;
  bad.merged_calls_host = whole;
  bad.merged_calls = 1;
  EXPECT_TRUE(check_paged_decode(bad).ok());
  bad.merged_calls_host = empty_call;
  bad.merged_calls = 2;
  EXPECT_NE(check_paged_decode(bad).message().find("merged_calls_host"), std::string::npos);
  bad.merged_calls_host = short_of_n;
  bad.merged_calls = 1;
  EXPECT_NE(check_paged_decode(bad).message().find("merged_calls_host"), std::string::npos);
  bad.merged_calls = 0;
  EXPECT_NE(check_paged_decode(bad).message().find("merged_calls_host"), std::string::npos);
}

// Windows, soft caps and sinks are parameters of both paged ops: taken in range by every CPU
// variant, refused out of range naming the field (window_left/right < -1, softcap < 0, NaN or
// infinite, sinks of another dtype or shape).
TEST(PagedChecks, RefuseOutOfRangeWindowsSoftcapsAndSinksNamingTheField) {
  std::mt19937_64 rng(testing::seed());
  PagedCase c({{3, 1}, {5, 2}}, 4, 2, 16, 16, DType::kFloat32, rng);
  PagedPrefillArgs prefill = c.args<PagedPrefillArgs>();
  PagedCase one_token({{3, 1}}, 4, 2, 16, 16, DType::kFloat32, rng);
  PagedDecodeArgs decode = one_token.args<PagedDecodeArgs>();
  Tensor sinks = random_tensor(DType::kFloat32, {4}, rng);
  Tensor bf16_sinks = random_tensor(DType::kBFloat16, {4}, rng);
  Tensor short_sinks = random_tensor(DType::kFloat32, {2}, rng);
  Tensor square_sinks = random_tensor(DType::kFloat32, {4, 1}, rng);
  EXPECT_TRUE(prefill.mask.causal);  // Prefill is causal unless asked otherwise
  // In range: taken by the checks and by every CPU variant.
  for (auto [left, right] :
       {std::pair{0, -1}, std::pair{5, 3}, std::pair{-1, 0}, std::pair{1000, 1000}})
    for (bool causal : {true, false}) {
      prefill.mask = {causal, left, right};
      prefill.softcap = 30.0f;
      prefill.sinks = sinks.view();
      EXPECT_TRUE(check_paged_prefill(prefill).ok()) << check_paged_prefill(prefill).to_string();
      for (const auto& v : default_registry().of<PagedPrefillArgs>().variants())
        if (v.info.backend == Backend::kCpu) {
          EXPECT_TRUE(v.supports(prefill).ok()) << v.info.name;
        }
    }
  decode.mask.window_left = 0;
  decode.softcap = 1.0f;
  decode.sinks = sinks.view();
  EXPECT_TRUE(check_paged_decode(decode).ok());
  for (const auto& v : default_registry().of<PagedDecodeArgs>().variants())
    if (v.info.backend == Backend::kCpu) {
      EXPECT_TRUE(v.supports(decode).ok()) << v.info.name;
    }

  // Out of range: each refused naming its field, by the checks and every variant.
  auto refused = [&](auto args, const std::string& field) {
    Status s;
    if constexpr (std::is_same_v<decltype(args), PagedPrefillArgs>) {
      s = check_paged_prefill(args);
      for (const auto& v : default_registry().of<PagedPrefillArgs>().variants())
        EXPECT_FALSE(v.supports(args).ok()) << v.info.name << " " << field;
    } else {
      s = check_paged_decode(args);
      for (const auto& v : default_registry().of<PagedDecodeArgs>().variants())
        EXPECT_FALSE(v.supports(args).ok()) << v.info.name << " " << field;
    }
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << field;
    EXPECT_EQ(s.message().rfind(field, 0), 0u) << s.message();
  };
  auto each = [&](const auto& args) {
    auto bad = args;
    bad.mask.window_left = -2;
    refused(bad, "window_left");
    bad = args;
    bad.mask.causal = false;
    bad.mask.window_right = -7;
    refused(bad, "window_right");
    for (float cap :
         {-1.0f, std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
      bad = args;
      bad.softcap = cap;
      refused(bad, "softcap");
    }
    bad = args;
    bad.sinks = bf16_sinks.view();
    refused(bad, "sinks.dtype");
    bad.sinks = short_sinks.view();
    refused(bad, "sinks.shape");
    bad.sinks = square_sinks.view();
    refused(bad, "sinks.shape");
  };
  each(prefill);
  each(decode);
}

// Sequences whose caches are 1, 7, 33 and 1000 long (awkward against pages of 16), for every
// window (0, 1, 5, longer than any sequence), with and without a soft cap, with sinks near 0,
// large positive and very negative, for GQA groups of 1, 3, 6, 7 and 32 (MQA: one K/V head).
struct GroupSpec {
  std::int64_t hq, hkv;
};
const GroupSpec kGroups[] = {{2, 2}, {6, 2}, {12, 2}, {7, 1}, {32, 1}};
const std::int64_t kWindows[] = {-1, 0, 1, 5, 5000};

std::vector<float> sinks_around(float center, std::int64_t hq, std::mt19937_64& rng) {
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> s(static_cast<std::size_t>(hq));
  for (float& x : s) x = center + dist(rng);
  return s;
}

TEST(PagedOptionsCpu, DecodeWindowsSoftcapsAndSinksMatchReference) {
  std::mt19937_64 rng(testing::seed());
  const std::vector<SeqSpec> seqs{{0, 1}, {6, 1}, {32, 1}, {999, 1}};
  const auto* v = default_registry().of<PagedDecodeArgs>().find("paged_decode/cpu");
  ASSERT_NE(v, nullptr);
  for (const auto& g : kGroups)
    for (std::int64_t window : kWindows)
      for (float cap : {0.0f, 2.0f})
        for (float sink : {std::nanf(""), 0.0f, 25.0f, -1e4f}) {
          SCOPED_TRACE("Hq " + std::to_string(g.hq) + " Hkv " + std::to_string(g.hkv) + " window " +
                       std::to_string(window) + " softcap " + std::to_string(cap) + " sinks ~" +
                       std::to_string(sink) + " seed " + std::to_string(testing::seed()));
          PagedCase c(seqs, g.hq, g.hkv, 24, 16, DType::kFloat32, rng);
          PagedOptions opt;
          opt.mask.window_left = window;
          opt.softcap = cap;
          if (!std::isnan(sink)) opt.sinks = sinks_around(sink, g.hq, rng);
          check(*v, c, opt);
        }
}

// The options change the answer (the tests above can tell): a window of 5, a cap of 2, sinks
// near 25 each move o or lse away from the plain result.
TEST(PagedOptionsCpu, EachOptionChangesTheAnswer) {
  std::mt19937_64 rng(testing::seed());
  PagedCase c({{40, 1}}, 4, 2, 16, 16, DType::kFloat32, rng);
  PagedDecodeArgs plain = c.args<PagedDecodeArgs>();
  std::vector<double> plain_lse;
  const auto plain_o = reference::paged_decode(plain, &plain_lse);
  Tensor sinks = Tensor::from_floats(DType::kFloat32, {4}, sinks_around(25.0f, 4, rng));
  for (int which = 0; which < 3; ++which) {
    PagedDecodeArgs a = plain;
    if (which == 0) a.mask.window_left = 5;
    if (which == 1) a.softcap = 0.5f;
    if (which == 2) a.sinks = sinks.view();
    std::vector<double> lse;
    const auto o = reference::paged_decode(a, &lse);
    EXPECT_GT(reference::relative_frobenius_error(o, plain_o) +
                  reference::relative_frobenius_error(lse, plain_lse),
              1e-3)
        << which;
  }
}

// A windowed decode reads the pages of its window only: the page-table entries of pages wholly
// before the window point far outside the pools, so a kernel that walked them would fault.
TEST(PagedOptionsCpu, WindowedDecodeReadsOnlyThePagesOfItsWindow) {
  std::mt19937_64 rng(testing::seed());
  for (std::int64_t window : {0, 1, 5, 20}) {
    PagedCase c({{999, 1}, {70, 1}}, 6, 2, 16, 16, DType::kFloat32, rng);
    for (std::size_t i = 0; i + 1 < c.plan.page_indptr.size(); ++i) {
      const std::int64_t len = c.plan.seq_lens[i],
                         first_key = std::max<std::int64_t>(0, len - 1 - window);
      for (std::int64_t p = 0; (p + 1) * c.page_size <= first_key; ++p)
        c.plan.page_indices[static_cast<std::size_t>(c.plan.page_indptr[i] + p)] = 1 << 28;
    }
    PagedOptions opt;
    opt.mask.window_left = window;
    opt.sinks = sinks_around(0.0f, 6, rng);
    SCOPED_TRACE("window " + std::to_string(window));
    check(*default_registry().of<PagedDecodeArgs>().find("paged_decode/cpu"), c, opt);
  }
}

// Prefill in chunks (onto empty caches and caches of 1, 7, 33 and 1000 tokens; chunks of 1, 7, 33
// and 1000 new tokens) with windows, causal or not (right windows), soft caps and sinks.
TEST(PagedOptionsCpu, ChunkedPrefillWindowsSoftcapsAndSinksMatchReference) {
  std::mt19937_64 rng(testing::seed());
  const std::vector<SeqSpec> seqs{{0, 1}, {0, 33}, {1, 7}, {7, 33}, {33, 1}, {1000, 7}, {5, 1000}};
  const auto* v = default_registry().of<PagedPrefillArgs>().find("paged_prefill/cpu");
  ASSERT_NE(v, nullptr);
  struct MaskCase {
    bool causal;
    std::int64_t left, right;
  };
  const MaskCase masks[] = {{true, 0, -1}, {true, 1, -1},  {true, 5, -1}, {true, 5000, -1},
                            {false, 5, 3}, {false, -1, 0}, {false, 0, 0}, {false, 1, 5000}};
  for (const auto& g : {GroupSpec{6, 2}, GroupSpec{7, 1}, GroupSpec{32, 1}})
    for (const auto& m : masks)
      for (float sink : {std::nanf(""), 25.0f, -1e4f}) {
        const float cap = m.left == 5 ? 2.0f : 0.0f;
        SCOPED_TRACE("Hq " + std::to_string(g.hq) + " Hkv " + std::to_string(g.hkv) +
                     (m.causal ? " causal" : "") + " window (" + std::to_string(m.left) + ", " +
                     std::to_string(m.right) + ") softcap " + std::to_string(cap) + " sinks ~" +
                     std::to_string(sink) + " seed " + std::to_string(testing::seed()));
        PagedCase c(seqs, g.hq, g.hkv, 8, 16, DType::kFloat32, rng);
        PagedOptions opt;
        opt.mask = {m.causal, m.left, m.right};
        opt.softcap = cap;
        if (!std::isnan(sink)) opt.sinks = sinks_around(sink, g.hq, rng);
        check(*v, c, opt);
      }
}

// Half precision caches with every option at once.
TEST_P(PagedCpu, WindowSoftcapAndSinksInEveryDtype) {
  const auto [dtype, page_size] = GetParam();
  std::mt19937_64 rng(testing::seed());
  PagedCase d({{0, 1}, {6, 1}, {999, 1}}, 12, 2, 32, page_size, dtype, rng);
  PagedOptions opt;
  opt.mask.window_left = 33;
  opt.softcap = 3.0f;
  opt.sinks = sinks_around(1.0f, 12, rng);
  check(*default_registry().of<PagedDecodeArgs>().find("paged_decode/cpu"), d, opt);
  PagedCase p({{33, 7}, {0, 40}}, 12, 2, 32, page_size, dtype, rng);
  opt.mask = {true, 7, -1};
  check(*default_registry().of<PagedPrefillArgs>().find("paged_prefill/cpu"), p, opt);
}

// Decode calls on different layers of a cache merge through one view of all its layers: only
// where that view's page numbers and pool rows stay below 2^31 (what the CUDA rungs index with),
// else a merged launch would be refused for every member.
TEST(KvCacheConfig, LayersFitOneViewOnlyBelowTheInt32Rows) {
  server::KvCacheConfig c;
  c.layers = 32, c.heads_kv = 8, c.head_dim = 128, c.page_size = 16;
  c.pages = 65536;  // 1M tokens: 64 x 65536 x 8 x 16 = 2^29 rows
  EXPECT_TRUE(c.layers_fit_one_view());
  c.pages = 262144;  // 4M tokens: 2^31 rows
  EXPECT_FALSE(c.layers_fit_one_view());
  c.layers = 1, c.heads_kv = 1, c.page_size = 1;
  c.pages = (std::int64_t{1} << 30) - 1;
  EXPECT_TRUE(c.layers_fit_one_view());
  c.pages = std::int64_t{1} << 30;  // 2^31 page numbers
  EXPECT_FALSE(c.layers_fit_one_view());
}

// The server chooses a call's variant before its plan exists (the plan is made on the worker, in
// the cache's order), from PagedPlan::placeholder: the GPU rungs must take that shape for the
// configurations they serve, or every cache on a GPU would fall back to the CPU. Needs no GPU:
// `supports` runs on the host. Skips in builds without CUDA variants.
TEST(PagedSelection, GpuRungsTakeACallBeforeItsPlan) {
  if (!built_with_cuda()) GTEST_SKIP() << "this build has no CUDA variants";
  const Target hopper{Backend::kCuda, 90};
  for (DType dt : {DType::kBFloat16, DType::kFloat16})
    for (std::int64_t d : {64, 128})
      for (std::int64_t page : {16, 64})
        for (std::int64_t group : {1, 4}) {
          for (std::int64_t n : {1, 32}) {
            const std::int64_t hkv = 8;
            const PagedPlan plan = PagedPlan::placeholder(n);
            PagedDecodeArgs a;
            a.q = {dt, {n, hkv * group, d}, nullptr, MemoryKind::kHost};
            a.k_new = a.v_new = {dt, {n, hkv, d}, nullptr, MemoryKind::kHost};
            a.o = a.q;
            a.cache = {dt, 1024, hkv, page, d, nullptr, nullptr, MemoryKind::kDevice};
            a.scale = 1.0f;
            plan.bind(a.seqs);
            auto decode = default_registry().of<PagedDecodeArgs>().select(a, "", hopper);
            ASSERT_TRUE(decode.ok()) << decode.status().to_string();
            EXPECT_EQ((*decode)->info.backend, Backend::kCuda);
            PagedPrefillArgs p;
            p.q = a.q;
            p.k_new = a.k_new;
            p.v_new = a.v_new;
            p.o = a.o;
            p.cache = a.cache;
            p.scale = 1.0f;
            plan.bind(p);
            auto prefill = default_registry().of<PagedPrefillArgs>().select(p, "", hopper);
            ASSERT_TRUE(prefill.ok()) << prefill.status().to_string();
            EXPECT_EQ((*prefill)->info.backend, Backend::kCuda);
          }
        }
}

}  // namespace
}  // namespace attn
