// KV caches stored in float8 e4m3 (KvCacheConfig.kv_storage) through the real attnd (CPU
// backend): Decode and Prefill against float64 attention over the cache as it holds it (ReadKv's
// codes x scales), on awkward lengths, several head dims and GQA groups (7, multi-query), with
// windows, soft caps and sinks; fork then append (the parent's codes and scales unchanged, bit for
// bit), truncation into a shared page, client-fixed scales that saturate, ReadKv in both forms,
// capacity, and every bad configuration refused naming its field. It also prints the relative
// Frobenius error of a float8 cache's outputs against a bfloat16 cache's on the same inputs, for
// normal, Student-t and outlier K/V.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>

#include "attn/client.h"
#include "attn/fp8.h"
#include "attn/wire.h"
#include "reference.h"
#include "support/kv_mirror.h"
#include "support/random.h"
#include "support/server_process.h"

namespace attn {
namespace {

using testing::from_wire;
using ::testing::HasSubstr;

struct Options {
  std::int64_t left = -1;
  float softcap = 0.0f;
  std::vector<float> sinks;  // empty: none
};

// A sequence's K/V at a layer as the cache holds it (ReadKv as stored), dequantized, [len, Hkv, D].
struct Held {
  std::int64_t len = 0, hkv = 0, d = 0;
  std::vector<double> k, v;
};

Held held(Client& c, const std::string& cache, const std::string& id, int layer) {
  Held h;
  auto kv = c.read_kv(cache, id, layer);
  EXPECT_TRUE(kv.ok()) << kv.status().to_string();
  if (!kv.ok()) return h;
  EXPECT_TRUE(kv->fp8);
  h.len = kv->shape[0], h.hkv = kv->shape[1], h.d = kv->shape[2];
  EXPECT_EQ(kv->scales_shape, (Shape{(h.len + kv->page_size - 1) / kv->page_size, h.hkv}));
  for (std::int64_t t = 0; t < h.len; ++t)
    for (std::int64_t x = 0; x < h.hkv; ++x)
      for (std::int64_t c2 = 0; c2 < h.d; ++c2) {
        const auto i = static_cast<std::size_t>((t * h.hkv + x) * h.d + c2);
        const auto s = static_cast<std::size_t>(t / kv->page_size * h.hkv + x);
        h.k.push_back(static_cast<double>(fp8_e4m3_to_float(kv->k_codes[i])) * kv->k_scales[s]);
        h.v.push_back(static_cast<double>(fp8_e4m3_to_float(kv->v_codes[i])) * kv->v_scales[s]);
      }
  return h;
}

// Float64 truth for the last `fresh` tokens of a sequence whose cache is `h` (new rows of q from
// `row`), causal bottom-right, with the options: [fresh, Hq, D].
std::vector<double> truth(const Held& h, const Tensor& q, std::int64_t row, std::int64_t fresh,
                          const Options& opt) {
  const std::int64_t hq = q.shape()[1], d = h.d, len = h.len;
  Tensor qd(DType::kFloat32, {1, hq, fresh, d}), kd(DType::kFloat32, {1, h.hkv, len, d}),
      vd(DType::kFloat32, {1, h.hkv, len, d}), o(DType::kFloat32, {1, hq, fresh, d});
  for (std::int64_t j = 0; j < fresh; ++j)
    for (std::int64_t x = 0; x < hq; ++x)
      for (std::int64_t c = 0; c < d; ++c)
        qd.set(static_cast<std::size_t>((x * fresh + j) * d + c),
               q.get(static_cast<std::size_t>(((row + j) * hq + x) * d + c)));
  for (std::int64_t t = 0; t < len; ++t)
    for (std::int64_t x = 0; x < h.hkv; ++x)
      for (std::int64_t c = 0; c < d; ++c) {
        const auto i = static_cast<std::size_t>((t * h.hkv + x) * d + c);
        kd.set(static_cast<std::size_t>((x * len + t) * d + c), static_cast<float>(h.k[i]));
        vd.set(static_cast<std::size_t>((x * len + t) * d + c), static_cast<float>(h.v[i]));
      }
  AttentionArgs a{
      qd.view(), kd.view(), vd.view(),  o.view(), {}, true, resolve_attention_scale(0.0f, d),
      opt.left,  -1,        opt.softcap};
  Tensor sinks;
  if (!opt.sinks.empty()) {
    sinks = Tensor::from_floats(DType::kFloat32, {hq}, opt.sinks);
    a.sinks = sinks.view();
  }
  const std::vector<double> want = reference::attention(a);
  std::vector<double> out;
  for (std::int64_t j = 0; j < fresh; ++j)
    for (std::int64_t x = 0; x < hq; ++x)
      for (std::int64_t c = 0; c < d; ++c)
        out.push_back(want[static_cast<std::size_t>((x * fresh + j) * d + c)]);
  return out;
}

// K/V draws: normal, Student-t with 3 degrees of freedom, or normal with 1 in 200 values 100x.
enum class Tail { kNormal, kStudentT, kOutliers };

Tensor kv_tensor(DType dt, const Shape& shape, std::mt19937_64& rng, Tail tail,
                 float stddev = 1.0f) {
  Tensor t(dt, shape);
  std::normal_distribution<float> normal(0.0f, stddev);
  std::student_t_distribution<float> student(3.0f);
  std::uniform_int_distribution<int> one_in(0, 199);
  for (std::size_t i = 0; i < static_cast<std::size_t>(t.numel()); ++i) {
    float x = tail == Tail::kStudentT ? student(rng) * stddev : normal(rng);
    if (tail == Tail::kOutliers && one_in(rng) == 0) x *= 100.0f;
    t.set(i, x);
  }
  return t;
}

class KvFp8Server : public ::testing::Test {
 protected:
  KvFp8Server() : server_(ATTND_PATH, {"--backend", "cpu"}), client_(server_.address()) {}

  static v1::KvCacheConfig config(int layers, int hkv, int d, v1::DType dtype, int page,
                                  std::int64_t capacity, bool fp8 = true) {
    v1::KvCacheConfig c;
    c.set_layers(layers);
    c.set_kv_heads(hkv);
    c.set_head_dim(d);
    c.set_dtype(dtype);
    c.set_page_size(page);
    c.set_capacity_tokens(capacity);
    if (fp8) c.set_kv_storage(v1::D_TYPE_FLOAT8_E4M3);
    return c;
  }
  std::string create(const v1::KvCacheConfig& c) {
    auto info = client_.create_kv_cache(c);
    EXPECT_TRUE(info.ok()) << info.status().to_string();
    return info.ok() ? info->handle() : "";
  }
  PrefillOptions prefill_options(const Options& o) {
    PrefillOptions p;
    p.window_left = o.left;
    p.softcap = o.softcap;
    if (!o.sinks.empty())
      p.sinks = Tensor::from_floats(DType::kFloat32, {static_cast<std::int64_t>(o.sinks.size())},
                                    o.sinks);
    return p;
  }
  DecodeOptions decode_options(const Options& o) {
    DecodeOptions p;
    p.window_left = o.left;
    p.softcap = o.softcap;
    if (!o.sinks.empty())
      p.sinks = Tensor::from_floats(DType::kFloat32, {static_cast<std::int64_t>(o.sinks.size())},
                                    o.sinks);
    return p;
  }
  // Prefills `lens` tokens onto `ids` at `layer` and checks every output row against the truth
  // over what the cache then holds; returns the call's k (to compare with what is held).
  void prefill_and_check(const std::string& cache, int layer, const std::vector<std::string>& ids,
                         const std::vector<std::int64_t>& lens, std::int64_t hq, std::int64_t hkv,
                         std::int64_t d, DType dt, const Options& opt, std::mt19937_64& rng,
                         Tail tail = Tail::kNormal, const char* what = "") {
    std::int64_t rows = 0;
    for (auto l : lens) rows += l;
    const Tensor q = testing::random_tensor(dt, {rows, hq, d}, rng);
    const Tensor k = kv_tensor(dt, {rows, hkv, d}, rng, tail),
                 v = kv_tensor(dt, {rows, hkv, d}, rng, tail);
    auto r = client_.prefill(cache, layer, ids, lens, q, k, v, prefill_options(opt));
    ASSERT_TRUE(r.ok()) << r.status().to_string();
    std::int64_t row = 0;
    for (std::size_t i = 0; i < ids.size(); ++i) {
      const Held h = held(client_, cache, ids[i], layer);
      const auto want = truth(h, q, row, lens[i], opt);
      std::vector<double> got;
      for (std::int64_t x = 0; x < lens[i] * hq * d; ++x)
        got.push_back(r->output.get(static_cast<std::size_t>(row * hq * d + x)));
      EXPECT_LE(reference::relative_frobenius_error(got, want), 1e-2)
          << what << " prefill of " << lens[i] << " onto " << h.len - lens[i] << " (" << ids[i]
          << "), Hq " << hq << " Hkv " << hkv << " D " << d << " seed=" << testing::seed();
      // What the cache holds is what was sent, to e4m3's step at its page's scale.
      double diff = 0, norm = 0;
      for (std::int64_t t = 0; t < lens[i] * hkv * d; ++t) {
        const double sent = k.get(static_cast<std::size_t>(row * hkv * d + t));
        const double kept = h.k[static_cast<std::size_t>((h.len - lens[i]) * hkv * d + t)];
        diff += (sent - kept) * (sent - kept), norm += sent * sent;
      }
      EXPECT_LE(std::sqrt(diff / norm), 0.05) << what << " K as held vs sent";
      row += lens[i];
    }
  }
  void decode_and_check(const std::string& cache, int layer, const std::vector<std::string>& ids,
                        std::int64_t hq, std::int64_t hkv, std::int64_t d, DType dt,
                        const Options& opt, std::mt19937_64& rng, float kv_stddev = 1.0f) {
    const auto n = static_cast<std::int64_t>(ids.size());
    const Tensor q = testing::random_tensor(dt, {n, hq, d}, rng);
    const Tensor k = testing::random_tensor(dt, {n, hkv, d}, rng, kv_stddev);
    const Tensor v = testing::random_tensor(dt, {n, hkv, d}, rng, kv_stddev);
    auto r = client_.decode(cache, layer, ids, q, k, v, decode_options(opt));
    ASSERT_TRUE(r.ok()) << r.status().to_string();
    for (std::int64_t i = 0; i < n; ++i) {
      const Held h = held(client_, cache, ids[static_cast<std::size_t>(i)], layer);
      const auto want = truth(h, q, i, 1, opt);
      std::vector<double> got;
      for (std::int64_t x = 0; x < hq * d; ++x)
        got.push_back(r->output.get(static_cast<std::size_t>(i * hq * d + x)));
      EXPECT_LE(reference::relative_frobenius_error(got, want), 1e-2)
          << "decode of " << ids[static_cast<std::size_t>(i)] << " at " << h.len << ", window "
          << opt.left << " softcap " << opt.softcap << " sinks " << opt.sinks.size()
          << " seed=" << testing::seed();
    }
  }
  grpc::Status create_status(const v1::KvCacheConfig& c, const std::string& device = "") {
    v1::CreateKvCacheRequest req;
    *req.mutable_config() = c;
    req.set_device(device);
    v1::CreateKvCacheResponse resp;
    grpc::ClientContext ctx;
    return client_.stub().CreateKvCache(&ctx, req, &resp);
  }

  testing::ServerProcess server_;
  Client client_;
};

// Prompts of 1, 7, 33 and 1000 (or 100, 70) tokens in one call, a chunk of 7 more each, then decode
// steps with windows, soft caps and sinks; head dims 64, 40 and 128 with GQA groups 4, 7 (one K/V
// head: multi-query too) and 32; bfloat16 and float16; pages of 16, 8 and 32.
TEST_F(KvFp8Server, DecodeAndPrefillMatchFloat64OverTheHeldCache) {
  std::mt19937_64 rng(testing::seed());
  struct Shape4 {
    int hq, hkv, d, page;
    v1::DType dtype;
    std::int64_t longest;
  };
  for (const Shape4 s : {Shape4{8, 2, 64, 16, v1::D_TYPE_BFLOAT16, 1000},
                         Shape4{7, 1, 40, 8, v1::D_TYPE_FLOAT16, 100},
                         Shape4{32, 1, 128, 32, v1::D_TYPE_BFLOAT16, 70}}) {
    const DType dt = *wire::from_proto(s.dtype);
    const std::string cache = create(config(2, s.hkv, s.d, s.dtype, s.page, 4096));
    const std::vector<std::string> ids{"a", "b", "c", "d"};
    prefill_and_check(cache, 1, ids, {1, 7, 33, s.longest}, s.hq, s.hkv, s.d, dt, {}, rng);
    prefill_and_check(cache, 1, ids, {7, 7, 7, 7}, s.hq, s.hkv, s.d, dt, {}, rng);
    std::vector<float> sinks(static_cast<std::size_t>(s.hq));
    for (float& x : sinks) x = std::normal_distribution<float>(1.0f, 1.0f)(rng);
    for (const Options& opt : {Options{}, Options{0}, Options{5}, Options{-1, 5.0f},
                               Options{20, 3.0f, sinks}, Options{-1, 0.0f, sinks}})
      decode_and_check(cache, 1, ids, s.hq, s.hkv, s.d, dt, opt, rng);
    // Layer 0 was never written: its own pages' scales.
    prefill_and_check(cache, 0, {"b"}, {17}, s.hq, s.hkv, s.d, dt, {}, rng);
  }
}

// A decode step whose K/V are far larger than the page's earlier rows grows the page's scale and
// requantizes them; the output still matches the truth over what is held.
TEST_F(KvFp8Server, GrowingScalesInAPartlyFilledPage) {
  std::mt19937_64 rng(testing::seed());
  const std::string cache = create(config(1, 2, 64, v1::D_TYPE_BFLOAT16, 16, 1024));
  prefill_and_check(cache, 0, {"s"}, {5}, 4, 2, 64, DType::kBFloat16, {}, rng);
  auto before = client_.read_kv(cache, "s", 0);
  ASSERT_TRUE(before.ok());
  decode_and_check(cache, 0, {"s"}, 4, 2, 64, DType::kBFloat16, {}, rng, 300.0f);
  auto after = client_.read_kv(cache, "s", 0);
  ASSERT_TRUE(after.ok());
  EXPECT_GT(after->k_scales[0], before->k_scales[0]) << "the page's scale grew";
  decode_and_check(cache, 0, {"s"}, 4, 2, 64, DType::kBFloat16, {}, rng, 0.01f);
}

TEST_F(KvFp8Server, ForkThenAppendLeavesTheParentBitForBitAndTruncationCopiesSharedPages) {
  std::mt19937_64 rng(testing::seed());
  const int hq = 6, hkv = 2, d = 32;
  const std::string cache = create(config(2, hkv, d, v1::D_TYPE_BFLOAT16, 16, 1024));
  for (int layer = 0; layer < 2; ++layer)
    prefill_and_check(cache, layer, {"p"}, {37}, hq, hkv, d, DType::kBFloat16, {}, rng);
  auto stored = [&](const std::string& id, int layer) {
    auto kv = client_.read_kv(cache, id, layer);
    EXPECT_TRUE(kv.ok());
    std::string s;
    if (!kv.ok()) return s;
    s.append(reinterpret_cast<const char*>(kv->k_codes.data()), kv->k_codes.size());
    s.append(reinterpret_cast<const char*>(kv->v_codes.data()), kv->v_codes.size());
    s.append(reinterpret_cast<const char*>(kv->k_scales.data()), kv->k_scales.size() * 4);
    s.append(reinterpret_cast<const char*>(kv->v_scales.data()), kv->v_scales.size() * 4);
    return s;
  };
  const std::string parent0 = stored("p", 0), parent1 = stored("p", 1);
  auto forked = client_.fork_sequence(cache, "p", "c");
  ASSERT_TRUE(forked.ok()) << forked.status().to_string();
  EXPECT_EQ(forked->sequence().shared_pages(), 2);
  EXPECT_EQ(stored("c", 0), parent0);  // the fork holds the same codes and scales
  // Appends to the child 100x larger than the prompt (its copied last page grows its scales).
  for (int step = 0; step < 12; ++step)
    decode_and_check(cache, step % 2, {"c"}, hq, hkv, d, DType::kBFloat16, {}, rng, 100.0f);
  EXPECT_EQ(stored("p", 0), parent0);
  EXPECT_EQ(stored("p", 1), parent1);
  // A cut inside the second shared page: it is copied before the child writes it again.
  auto cut = client_.truncate_sequence(cache, "c", 20);
  ASSERT_TRUE(cut.ok()) << cut.status().to_string();
  EXPECT_EQ(cut->copied_pages(), 1);
  for (int layer = 0; layer < 2; ++layer)
    prefill_and_check(cache, layer, {"c"}, {9}, hq, hkv, d, DType::kBFloat16, {}, rng,
                      Tail::kOutliers);
  EXPECT_EQ(stored("p", 0), parent0);
  EXPECT_EQ(stored("p", 1), parent1);
  // The parent goes on from what it held.
  decode_and_check(cache, 0, {"p"}, hq, hkv, d, DType::kBFloat16, {}, rng);
}

TEST_F(KvFp8Server, ReadKvDequantizedIsTheStoredCodesTimesScales) {
  std::mt19937_64 rng(testing::seed());
  for (const v1::DType dtype : {v1::D_TYPE_BFLOAT16, v1::D_TYPE_FLOAT16}) {
    const DType dt = *wire::from_proto(dtype);
    const std::string cache = create(config(1, 3, 24, dtype, 8, 256));
    prefill_and_check(cache, 0, {"x"}, {29}, 3, 3, 24, dt, {}, rng, Tail::kStudentT);
    auto stored = client_.read_kv(cache, "x", 0, 100);  // chunks straddling every part
    auto deq = client_.read_kv(cache, "x", 0, 0, true);
    ASSERT_TRUE(stored.ok() && deq.ok());
    ASSERT_FALSE(deq->fp8);
    ASSERT_EQ(deq->k.dtype(), dt);
    ASSERT_EQ(deq->k.shape(), (Shape{29, 3, 24}));
    for (std::size_t i = 0; i < stored->k_codes.size(); ++i) {
      const std::size_t s = (i / 24 / 3) / 8 * 3 + (i / 24) % 3;
      Tensor want(dt, {2});
      want.set(0, fp8_e4m3_to_float(stored->k_codes[i]) * stored->k_scales[s]);
      want.set(1, fp8_e4m3_to_float(stored->v_codes[i]) * stored->v_scales[s]);
      ASSERT_EQ(std::memcmp(static_cast<const char*>(deq->k.data()) + 2 * i, want.data(), 2), 0)
          << i;
      ASSERT_EQ(std::memcmp(static_cast<const char*>(deq->v.data()) + 2 * i,
                            static_cast<const char*>(want.data()) + 2, 2),
                0)
          << i;
    }
  }
  // A cache stored in its dtype reads the same either way.
  const std::string plain = create(config(1, 1, 8, v1::D_TYPE_BFLOAT16, 8, 64, false));
  const Tensor k = testing::random_tensor(DType::kBFloat16, {3, 1, 8}, rng);
  ASSERT_TRUE(client_
                  .prefill(plain, 0, {"y"}, {3},
                           testing::random_tensor(DType::kBFloat16, {3, 1, 8}, rng), k, k)
                  .ok());
  auto a = client_.read_kv(plain, "y", 0), b = client_.read_kv(plain, "y", 0, 0, true);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_FALSE(a->fp8);
  ASSERT_EQ(a->k.bytes(), k.bytes());
  EXPECT_EQ(std::memcmp(a->k.data(), k.data(), k.bytes()), 0);
  EXPECT_EQ(std::memcmp(b->k.data(), k.data(), k.bytes()), 0);
}

TEST_F(KvFp8Server, FixedScalesSaturateAndNeverChange) {
  std::mt19937_64 rng(testing::seed());
  v1::KvCacheConfig c = config(2, 2, 16, v1::D_TYPE_BFLOAT16, 8, 256);
  for (float s : {0.01f, 0.02f, 0.03f, 0.04f}) c.add_k_scales(s), c.add_v_scales(2 * s);
  const std::string cache = create(c);
  Tensor q = testing::random_tensor(DType::kBFloat16, {11, 4, 16}, rng);
  Tensor k = testing::random_tensor(DType::kBFloat16, {11, 2, 16}, rng);
  Tensor v = testing::random_tensor(DType::kBFloat16, {11, 2, 16}, rng);
  k.set(3, 1000.0f);  // token 0, head 0: over 448 x 0.03 at layer 1
  auto r = client_.prefill(cache, 1, {"f"}, {11}, q, k, v);
  ASSERT_TRUE(r.ok()) << r.status().to_string();
  auto kv = client_.read_kv(cache, "f", 1);
  ASSERT_TRUE(kv.ok());
  ASSERT_EQ(kv->k_scales.size(), 4u);  // 2 pages x 2 heads
  for (std::size_t p = 0; p < 2; ++p) {
    EXPECT_EQ(kv->k_scales[2 * p], 0.03f);
    EXPECT_EQ(kv->k_scales[2 * p + 1], 0.04f);
    EXPECT_EQ(kv->v_scales[2 * p], 0.06f);
  }
  EXPECT_EQ(kv->k_codes[3], 0x7e);  // saturated at 448 x scale
  auto empty = client_.read_kv(cache, "f", 0);  // no token at layer 0 yet
  ASSERT_TRUE(empty.ok()) << empty.status().to_string();
  EXPECT_TRUE(empty->fp8);
  EXPECT_EQ(empty->shape, (Shape{0, 2, 16}));
  EXPECT_EQ(empty->scales_shape, (Shape{0, 2}));
  const Held h = held(client_, cache, "f", 1);
  const auto want = truth(h, q, 0, 11, {});
  std::vector<double> got;
  for (std::int64_t x = 0; x < r->output.numel(); ++x)
    got.push_back(r->output.get(static_cast<std::size_t>(x)));
  EXPECT_LE(reference::relative_frobenius_error(got, want), 1e-2);
}

TEST_F(KvFp8Server, TwiceTheTokensForTheSameBytes) {
  auto bf16 = client_.create_kv_cache(config(2, 8, 128, v1::D_TYPE_BFLOAT16, 16, 2048, false));
  auto fp8 = client_.create_kv_cache(config(2, 8, 128, v1::D_TYPE_BFLOAT16, 16, 4096));
  ASSERT_TRUE(bf16.ok() && fp8.ok());
  EXPECT_EQ(fp8->config().kv_storage(), v1::D_TYPE_FLOAT8_E4M3);
  EXPECT_EQ(bf16->config().kv_storage(), v1::D_TYPE_UNSPECIFIED);
  EXPECT_EQ(fp8->config().capacity_tokens(), 2 * bf16->config().capacity_tokens());
  // The same bytes for the pages, plus a float32 scale per (layer, K/V, page, kv head).
  const std::int64_t scales = 2 * 2 * (4096 / 16) * 8 * 4;
  EXPECT_EQ(fp8->bytes(), bf16->bytes() + scales);
  auto d = client_.describe_kv_cache(fp8->handle());
  ASSERT_TRUE(d.ok());
  EXPECT_EQ(d->config().kv_storage(), v1::D_TYPE_FLOAT8_E4M3);
  EXPECT_EQ(d->pages_total(), 4096 / 16);
}

TEST_F(KvFp8Server, BadConfigurationsAndFormsFailNamingTheField) {
  auto expect = [&](const v1::KvCacheConfig& c, grpc::StatusCode code, const std::string& field,
                    const std::string& device = "") {
    const grpc::Status s = create_status(c, device);
    EXPECT_EQ(s.error_code(), code) << field << ": " << s.error_message();
    EXPECT_THAT(s.error_message(), HasSubstr(field));
  };
  expect(config(1, 2, 16, v1::D_TYPE_FLOAT32, 16, 64), grpc::StatusCode::INVALID_ARGUMENT,
         "config.kv_storage: D_TYPE_FLOAT8_E4M3 storage serves float16 and bfloat16 caches");
  v1::KvCacheConfig c = config(1, 2, 16, v1::D_TYPE_BFLOAT16, 16, 64);
  c.set_kv_storage(v1::D_TYPE_FLOAT32);
  expect(c, grpc::StatusCode::INVALID_ARGUMENT, "config.kv_storage: expected");
  c.set_kv_storage(static_cast<v1::DType>(42));
  expect(c, grpc::StatusCode::INVALID_ARGUMENT, "got 42");
  const float nan = std::numeric_limits<float>::quiet_NaN(),
              inf = std::numeric_limits<float>::infinity();
  for (float bad : {0.0f, -1.0f, nan, inf, -inf}) {
    v1::KvCacheConfig s = config(1, 2, 16, v1::D_TYPE_BFLOAT16, 16, 64);
    s.add_k_scales(1.0f), s.add_k_scales(1.0f), s.add_v_scales(1.0f), s.add_v_scales(bad);
    expect(s, grpc::StatusCode::INVALID_ARGUMENT,
           "config.v_scales[1]: expected a positive finite scale");
  }
  v1::KvCacheConfig count = config(2, 2, 16, v1::D_TYPE_BFLOAT16, 16, 64);
  for (int i = 0; i < 4; ++i) count.add_k_scales(1.0f);
  for (int i = 0; i < 3; ++i) count.add_v_scales(1.0f);
  expect(count, grpc::StatusCode::INVALID_ARGUMENT,
         "config.v_scales: expected layers x kv_heads = 4");
  count.clear_v_scales();
  expect(count, grpc::StatusCode::INVALID_ARGUMENT,
         "config.v_scales: expected layers x kv_heads = 4");
  v1::KvCacheConfig plain = config(1, 2, 16, v1::D_TYPE_BFLOAT16, 16, 64, false);
  plain.add_k_scales(1.0f), plain.add_k_scales(1.0f), plain.add_v_scales(1.0f),
      plain.add_v_scales(1.0f);
  expect(plain, grpc::StatusCode::INVALID_ARGUMENT,
         "config.k_scales: scales come with float8 storage");

  // ReadKv: an unknown form.
  const std::string cache = create(config(1, 2, 16, v1::D_TYPE_BFLOAT16, 16, 64));
  std::mt19937_64 rng(testing::seed());
  ASSERT_TRUE(client_
                  .prefill(cache, 0, {"s"}, {3},
                           testing::random_tensor(DType::kBFloat16, {3, 2, 16}, rng),
                           testing::random_tensor(DType::kBFloat16, {3, 2, 16}, rng),
                           testing::random_tensor(DType::kBFloat16, {3, 2, 16}, rng))
                  .ok());
  v1::ReadKvRequest req;
  req.set_cache(cache);
  req.set_sequence_id("s");
  req.set_form(static_cast<v1::ReadKvForm>(7));
  grpc::ClientContext ctx;
  auto reader = client_.stub().ReadKv(&ctx, req);
  v1::ReadKvResponse msg;
  while (reader->Read(&msg)) {
  }
  const grpc::Status s = reader->Finish();
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(s.error_message(), HasSubstr("form: expected READ_KV_FORM_UNSPECIFIED"));
  EXPECT_THAT(s.error_message(), HasSubstr("got 7"));

  // float8 is no tensor dtype: a Decode whose q says it is refused naming q.dtype.
  v1::DecodeRequest d;
  d.set_cache(cache);
  d.add_sequence_ids("s");
  v1::Tensor* q = d.mutable_q();
  q->set_dtype(v1::D_TYPE_FLOAT8_E4M3);
  q->add_shape(1), q->add_shape(2), q->add_shape(16);
  q->set_data(std::string(32, '\0'));
  *d.mutable_k_new() = testing::to_wire(testing::random_tensor(DType::kBFloat16, {1, 2, 16}, rng));
  *d.mutable_v_new() = testing::to_wire(testing::random_tensor(DType::kBFloat16, {1, 2, 16}, rng));
  v1::DecodeResponse dr;
  grpc::ClientContext dctx;
  const grpc::Status ds = client_.stub().Decode(&dctx, d, &dr);
  EXPECT_EQ(ds.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(ds.error_message(), HasSubstr("q.dtype"));
  auto len = client_.describe_kv_cache(cache);
  ASSERT_TRUE(len.ok());
  EXPECT_EQ(len->sequences(0).lengths(0), 3) << "a refused call appends nothing";
}

// The error a float8 cache adds over a bfloat16 cache, same inputs: scales computed per page on
// append, and calibrated per kv head (each head's largest magnitude over all the tokens, fixed).
// Printed, and bounded loosely (a wrong kernel is off by ~1). Outliers in K dominate the
// softmax, and e4m3's 3 mantissa bits on those logits are what the error is made of there,
// whatever the scales' granularity.
TEST_F(KvFp8Server, ErrorAgainstABfloat16CacheOnNormalStudentTAndOutlierKv) {
  std::mt19937_64 rng(testing::seed());
  const int hq = 8, hkv = 2, d = 128, n = 512;
  for (const Tail tail : {Tail::kNormal, Tail::kStudentT, Tail::kOutliers}) {
    const Tensor q = testing::random_tensor(DType::kBFloat16, {n, hq, d}, rng);
    const Tensor k = kv_tensor(DType::kBFloat16, {n, hkv, d}, rng, tail);
    const Tensor v = kv_tensor(DType::kBFloat16, {n, hkv, d}, rng, tail);
    v1::KvCacheConfig per_head = config(1, hkv, d, v1::D_TYPE_BFLOAT16, 16, 2048);
    for (int h = 0; h < hkv; ++h) {
      float ka = 0, va = 0;
      for (std::int64_t t = 0; t < n; ++t)
        for (std::int64_t c = 0; c < d; ++c) {
          const auto i = static_cast<std::size_t>((t * hkv + h) * d + c);
          ka = std::max(ka, std::fabs(k.get(i))), va = std::max(va, std::fabs(v.get(i)));
        }
      per_head.add_k_scales(ka / 448.0f), per_head.add_v_scales(va / 448.0f);
    }
    const std::string bf16 = create(config(1, hkv, d, v1::D_TYPE_BFLOAT16, 16, 2048, false));
    auto want = client_.prefill(bf16, 0, {"s"}, {n}, q, k, v);
    ASSERT_TRUE(want.ok()) << want.status().to_string();
    double errs[2] = {};
    int at = 0;
    for (const v1::KvCacheConfig& c :
         {config(1, hkv, d, v1::D_TYPE_BFLOAT16, 16, 2048), per_head}) {
      auto got = client_.prefill(create(c), 0, {"s"}, {n}, q, k, v);
      ASSERT_TRUE(got.ok()) << got.status().to_string();
      std::vector<double> g, w;
      for (std::int64_t i = 0; i < got->output.numel(); ++i) {
        g.push_back(got->output.get(static_cast<std::size_t>(i)));
        w.push_back(want->output.get(static_cast<std::size_t>(i)));
      }
      errs[at++] = reference::relative_frobenius_error(g, w);
    }
    const char* name = tail == Tail::kNormal     ? "normal"
                       : tail == Tail::kStudentT ? "student-t(3)"
                                                 : "normal, 1 in 200 x100";
    std::printf(
        "[fp8 vs bf16 cache, Hq %d Hkv %d D %d, %d tokens] K/V %s: relative Frobenius error of o "
        "= %.4f (scales per page on append), %.4f (calibrated per kv head)\n",
        hq, hkv, d, n, name, errs[0], errs[1]);
    const double bound = tail == Tail::kNormal ? 0.06 : tail == Tail::kStudentT ? 0.1 : 0.25;
    for (double e : errs) {
      EXPECT_LE(e, bound) << name << " seed=" << testing::seed();
      EXPECT_GT(e, 0.0) << "float8 storage must differ from bfloat16 somewhere";
    }
  }
}

}  // namespace
}  // namespace attn
