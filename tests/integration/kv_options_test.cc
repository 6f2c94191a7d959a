// Sliding windows, soft caps and attention sinks through the real attnd (CPU backend): Decode and
// Prefill (chunked, causal or not) against float64 attention over a mirror of the cache the test
// keeps, the sinks inline or by resident handle, concurrent calls with different options (which
// must never share a launch); every out-of-range option refused with INVALID_ARGUMENT naming its
// field and the cache left exactly as it was; one-shot Attention with sinks and its bad inputs.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <limits>
#include <thread>

#include "attn/client.h"
#include "attn/wire.h"
#include "reference.h"
#include "support/kv_mirror.h"
#include "support/random.h"
#include "support/server_process.h"

namespace attn {
namespace {

using testing::from_wire;
using ::testing::HasSubstr;
using testing::Mirror;
using testing::random_tensor;
using testing::to_wire;

// The options of one call, as the test sends them.
struct KvOptions {
  bool causal = true;
  std::int64_t left = -1, right = -1;
  float softcap = 0.0f;
  std::vector<float> sinks;  // empty: none
};

// Float64 truth for `fresh` new rows of q (starting at `row`) of sequence `id`, the last of its
// `len` tokens at `layer`: dense float64 attention (reference::attention, bottom-right aligned,
// so new token j sits at position len - fresh + j) over the mirror's rows, [fresh, Hq, D] order.
void attend(const Mirror& m, const Tensor& q, std::int64_t row, std::int64_t fresh,
            const std::string& id, int layer, const KvOptions& opt, std::vector<double>& out) {
  const std::int64_t hq = q.shape()[1], d = m.d, hkv = m.hkv, len = m.length(id, layer);
  Tensor qd(DType::kFloat32, {1, hq, fresh, d}), kd(DType::kFloat32, {1, hkv, len, d}),
      vd(DType::kFloat32, {1, hkv, len, d}), o(DType::kFloat32, {1, hq, fresh, d});
  for (std::int64_t j = 0; j < fresh; ++j)
    for (std::int64_t h = 0; h < hq; ++h)
      for (std::int64_t c = 0; c < d; ++c)
        qd.set(static_cast<std::size_t>((h * fresh + j) * d + c),
               q.get(static_cast<std::size_t>(((row + j) * hq + h) * d + c)));
  const auto& ks = m.k.at(id)[static_cast<std::size_t>(layer)];
  const auto& vs = m.v.at(id)[static_cast<std::size_t>(layer)];
  for (std::int64_t t = 0; t < len; ++t)
    for (std::int64_t h = 0; h < hkv; ++h)
      for (std::int64_t c = 0; c < d; ++c) {
        kd.set(static_cast<std::size_t>((h * len + t) * d + c),
               ks[static_cast<std::size_t>((t * hkv + h) * d + c)]);
        vd.set(static_cast<std::size_t>((h * len + t) * d + c),
               vs[static_cast<std::size_t>((t * hkv + h) * d + c)]);
      }
  AttentionArgs a{
      qd.view(), kd.view(), vd.view(),  o.view(), {}, opt.causal, resolve_attention_scale(0.0f, d),
      opt.left,  opt.right, opt.softcap};
  Tensor sinks;
  if (!opt.sinks.empty()) {
    sinks = Tensor::from_floats(DType::kFloat32, {hq}, opt.sinks);
    a.sinks = sinks.view();
  }
  const std::vector<double> want = reference::attention(a);
  for (std::int64_t j = 0; j < fresh; ++j)
    for (std::int64_t h = 0; h < hq; ++h)
      for (std::int64_t c = 0; c < d; ++c)
        out.push_back(want[static_cast<std::size_t>((h * fresh + j) * d + c)]);
}

std::vector<float> sinks_around(float center, std::int64_t hq, std::mt19937_64& rng) {
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> s(static_cast<std::size_t>(hq));
  for (float& x : s) x = center + dist(rng);
  return s;
}

v1::Tensor sinks_wire(const std::vector<float>& s) {
  return to_wire(Tensor::from_floats(DType::kFloat32, {static_cast<std::int64_t>(s.size())}, s));
}

class KvOptionsServer : public ::testing::Test {
 protected:
  KvOptionsServer() : server_(ATTND_PATH, {"--backend", "cpu"}), client_(server_.address()) {}

  v1::KvCacheInfo create(int layers, int hkv, int d, v1::DType dtype, int page,
                         std::int64_t capacity) {
    v1::KvCacheConfig c;
    c.set_layers(layers);
    c.set_kv_heads(hkv);
    c.set_head_dim(d);
    c.set_dtype(dtype);
    c.set_page_size(page);
    c.set_capacity_tokens(capacity);
    auto info = client_.create_kv_cache(c);
    EXPECT_TRUE(info.ok()) << info.status().to_string();
    return info.ok() ? *info : v1::KvCacheInfo{};
  }
  grpc::Status prefill(const v1::PrefillRequest& req, v1::PrefillResponse* resp) {
    grpc::ClientContext ctx;
    return client_.stub().Prefill(&ctx, req, resp);
  }
  grpc::Status decode(const v1::DecodeRequest& req, v1::DecodeResponse* resp) {
    grpc::ClientContext ctx;
    return client_.stub().Decode(&ctx, req, resp);
  }
  v1::PrefillRequest prefill_request(const std::string& cache, int layer,
                                     const std::vector<std::string>& ids,
                                     const std::vector<std::int64_t>& lens, const Tensor& q,
                                     const Tensor& k, const Tensor& v, const KvOptions& opt) {
    v1::PrefillRequest req;
    req.set_cache(cache);
    req.set_layer(layer);
    for (std::size_t i = 0; i < ids.size(); ++i)
      req.add_sequence_ids(ids[i]), req.add_lens(lens[i]);
    *req.mutable_q() = to_wire(q);
    *req.mutable_k() = to_wire(k);
    *req.mutable_v() = to_wire(v);
    req.set_non_causal(!opt.causal);
    if (opt.left != -1) req.set_window_left(opt.left);
    if (opt.right != -1) req.set_window_right(opt.right);
    req.set_softcap(opt.softcap);
    if (!opt.sinks.empty()) *req.mutable_sinks() = sinks_wire(opt.sinks);
    req.set_return_lse(true);
    return req;
  }
  v1::DecodeRequest decode_request(const std::string& cache, int layer,
                                   const std::vector<std::string>& ids, const Tensor& q,
                                   const Tensor& k, const Tensor& v, const KvOptions& opt) {
    v1::DecodeRequest req;
    req.set_cache(cache);
    req.set_layer(layer);
    for (const auto& id : ids) req.add_sequence_ids(id);
    *req.mutable_q() = to_wire(q);
    *req.mutable_k_new() = to_wire(k);
    *req.mutable_v_new() = to_wire(v);
    if (opt.left != -1) req.set_window_left(opt.left);
    req.set_softcap(opt.softcap);
    if (!opt.sinks.empty()) *req.mutable_sinks() = sinks_wire(opt.sinks);
    return req;
  }
  // The cache's description (less its expiry, which moves with every use) and every sequence's
  // bytes at every layer, through ReadKv.
  std::string snapshot(const std::string& cache, const std::vector<std::string>& ids, int layers) {
    auto info = client_.describe_kv_cache(cache);
    EXPECT_TRUE(info.ok());
    v1::KvCacheInfo i = info.ok() ? *info : v1::KvCacheInfo{};
    i.clear_expires_unix_ms();
    std::string s = i.DebugString();
    for (const auto& id : ids)
      for (int layer = 0; layer < layers; ++layer) {
        auto kv = client_.read_kv(cache, id, layer);
        EXPECT_TRUE(kv.ok()) << kv.status().to_string();
        if (!kv.ok()) continue;
        s.append(static_cast<const char*>(kv->k.data()), kv->k.bytes());
        s.append(static_cast<const char*>(kv->v.data()), kv->v.bytes());
      }
    return s;
  }

  testing::ServerProcess server_;
  Client client_;
};

// Prompts of 1, 7, 33 and 1000 tokens, then a chunk of 7 more each (causal, and non-causal with a
// right window), then decode steps with windows of 0, 1, 5 and longer than any sequence, soft
// caps and sinks (near 0, large positive, very negative), GQA groups of 3 and 32 (one K/V head).
TEST_F(KvOptionsServer, WindowsSoftcapsAndSinksMatchFloat64) {
  std::mt19937_64 rng(testing::seed());
  for (const auto& heads : {std::pair{6, 2}, std::pair{32, 1}}) {
    const int hq = heads.first, hkv = heads.second;  // named (lambdas can't capture bindings in C++17)
    SCOPED_TRACE("Hq " + std::to_string(hq) + " Hkv " + std::to_string(hkv) + " seed " +
                 std::to_string(testing::seed()));
    const int d = 16, page = 16;
    const v1::KvCacheInfo cache = create(1, hkv, d, v1::D_TYPE_FLOAT32, page, 2048);
    Mirror mirror{static_cast<std::int64_t>(hkv), d, {}, {}};
    const std::vector<std::string> ids{"a", "b", "c", "d"};
    auto run_prefill = [&](const std::vector<std::int64_t>& lens, const KvOptions& opt) {
      std::int64_t total = 0;
      for (auto n : lens) total += n;
      Tensor q = random_tensor(DType::kFloat32, {total, hq, d}, rng, 2.0f),
             k = random_tensor(DType::kFloat32, {total, hkv, d}, rng, 2.0f),
             v = random_tensor(DType::kFloat32, {total, hkv, d}, rng);
      v1::PrefillResponse resp;
      const grpc::Status s =
          prefill(prefill_request(cache.handle(), 0, ids, lens, q, k, v, opt), &resp);
      ASSERT_TRUE(s.ok()) << s.error_message();
      EXPECT_EQ(resp.timings().kernel(), "paged_prefill/cpu");
      std::vector<double> want;
      std::int64_t row = 0;
      for (std::size_t i = 0; i < ids.size(); ++i) {
        mirror.append(ids[i], 0, 1, k, v, row, lens[i]);
        attend(mirror, q, row, lens[i], ids[i], 0, opt, want);
        row += lens[i];
      }
      EXPECT_LE(reference::relative_frobenius_error(from_wire(resp.o()).view(), want),
                reference::tolerance(DType::kFloat32, 1000));
    };
    KvOptions first;
    first.left = 5;
    first.softcap = 2.0f;
    first.sinks = sinks_around(0.0f, hq, rng);
    run_prefill({1, 7, 33, 1000}, first);
    KvOptions chunk;
    chunk.causal = false;
    chunk.left = 33;
    chunk.right = 3;
    chunk.sinks = sinks_around(25.0f, hq, rng);
    run_prefill({7, 7, 7, 7}, chunk);
    std::int64_t step = 0;
    for (std::int64_t window : {0, 1, 5, 5000, -1})
      for (float sink : {std::nanf(""), 0.0f, 25.0f, -1e4f}) {
        KvOptions opt;
        opt.left = window;
        opt.softcap = step++ % 2 ? 3.0f : 0.0f;
        if (!std::isnan(sink)) opt.sinks = sinks_around(sink, hq, rng);
        SCOPED_TRACE("decode window " + std::to_string(window) + " sinks ~" + std::to_string(sink));
        const auto n = static_cast<std::int64_t>(ids.size());
        Tensor q = random_tensor(DType::kFloat32, {n, hq, d}, rng, 2.0f),
               k = random_tensor(DType::kFloat32, {n, hkv, d}, rng, 2.0f),
               v = random_tensor(DType::kFloat32, {n, hkv, d}, rng);
        v1::DecodeRequest req = decode_request(cache.handle(), 0, ids, q, k, v, opt);
        req.set_return_lse(true);
        v1::DecodeResponse resp;
        const grpc::Status s = decode(req, &resp);
        ASSERT_TRUE(s.ok()) << s.error_message();
        EXPECT_EQ(resp.timings().kernel(), "paged_decode/cpu");
        std::vector<double> want;
        for (std::int64_t i = 0; i < n; ++i) {
          mirror.append(ids[static_cast<std::size_t>(i)], 0, 1, k, v, i, 1);
          attend(mirror, q, i, 1, ids[static_cast<std::size_t>(i)], 0, opt, want);
        }
        EXPECT_LE(reference::relative_frobenius_error(from_wire(resp.o()).view(), want),
                  reference::tolerance(DType::kFloat32, 1000));
      }
  }
}

// The C++ client's options, and sinks given by resident handle (PutTensor), in bfloat16.
TEST_F(KvOptionsServer, ClientOptionsAndResidentSinks) {
  std::mt19937_64 rng(testing::seed());
  const int hq = 7, hkv = 1, d = 32;
  const v1::KvCacheInfo cache = create(1, hkv, d, v1::D_TYPE_BFLOAT16, 16, 512);
  Mirror mirror{hkv, d, {}, {}};
  Tensor q = random_tensor(DType::kBFloat16, {40, hq, d}, rng),
         k = random_tensor(DType::kBFloat16, {40, hkv, d}, rng),
         v = random_tensor(DType::kBFloat16, {40, hkv, d}, rng);
  PrefillOptions p;
  p.window_left = 9;
  p.softcap = 4.0f;
  KvOptions popt{true, 9, -1, 4.0f, sinks_around(1.0f, hq, rng)};
  p.sinks = Tensor::from_floats(DType::kFloat32, {hq}, popt.sinks);
  auto r = client_.prefill(cache.handle(), 0, {"s"}, {40}, q, k, v, p);
  ASSERT_TRUE(r.ok()) << r.status().to_string();
  mirror.append("s", 0, 1, k, v, 0, 40);
  std::vector<double> want;
  attend(mirror, q, 0, 40, "s", 0, popt, want);
  EXPECT_LE(reference::relative_frobenius_error(r->output.view(), want),
            reference::tolerance(DType::kBFloat16));

  KvOptions dopt{true, 3, -1, 0.0f, sinks_around(2.0f, hq, rng)};
  auto resident = client_.put_tensor(Tensor::from_floats(DType::kFloat32, {hq}, dopt.sinks));
  ASSERT_TRUE(resident.ok()) << resident.status().to_string();
  for (int step = 0; step < 3; ++step) {
    Tensor q1 = random_tensor(DType::kBFloat16, {1, hq, d}, rng),
           k1 = random_tensor(DType::kBFloat16, {1, hkv, d}, rng),
           v1t = random_tensor(DType::kBFloat16, {1, hkv, d}, rng);
    v1::DecodeRequest req = decode_request(cache.handle(), 0, {"s"}, q1, k1, v1t, dopt);
    req.mutable_sinks()->Clear();
    req.mutable_sinks()->set_handle(resident->handle());
    v1::DecodeResponse resp;
    const grpc::Status s = decode(req, &resp);
    ASSERT_TRUE(s.ok()) << s.error_message();
    mirror.append("s", 0, 1, k1, v1t, 0, 1);
    want.clear();
    attend(mirror, q1, 0, 1, "s", 0, dopt, want);
    EXPECT_LE(reference::relative_frobenius_error(from_wire(resp.o()).view(), want),
              reference::tolerance(DType::kBFloat16));
  }
  // The client's decode options too.
  DecodeOptions o;
  o.window_left = 0;
  o.softcap = 1.0f;
  o.sinks = Tensor::from_floats(DType::kFloat32, {hq}, sinks_around(0.0f, hq, rng));
  KvOptions dopt2{true, 0, -1, 1.0f, o.sinks.to_floats()};
  Tensor q1 = random_tensor(DType::kBFloat16, {1, hq, d}, rng),
         k1 = random_tensor(DType::kBFloat16, {1, hkv, d}, rng),
         v1t = random_tensor(DType::kBFloat16, {1, hkv, d}, rng);
  auto dr = client_.decode(cache.handle(), 0, {"s"}, q1, k1, v1t, o);
  ASSERT_TRUE(dr.ok()) << dr.status().to_string();
  mirror.append("s", 0, 1, k1, v1t, 0, 1);
  want.clear();
  attend(mirror, q1, 0, 1, "s", 0, dopt2, want);
  EXPECT_LE(reference::relative_frobenius_error(dr->output.view(), want),
            reference::tolerance(DType::kBFloat16));
}

// Decode calls with different options arriving together (the server batches calls that wait
// together): each gets its own answer, never one computed with another call's window, soft cap
// or sinks.
TEST_F(KvOptionsServer, ConcurrentCallsWithDifferentOptionsKeepTheirOwn) {
  std::mt19937_64 rng(testing::seed());
  const int hq = 4, hkv = 2, d = 16, callers = 8, steps = 6;
  const v1::KvCacheInfo cache = create(1, hkv, d, v1::D_TYPE_FLOAT32, 16, 4096);
  std::vector<KvOptions> opts(callers);
  std::vector<Mirror> mirrors(callers, Mirror{hkv, d, {}, {}});
  for (int c = 0; c < callers; ++c) {
    opts[static_cast<std::size_t>(c)].left = c % 2 ? 2 : -1;
    opts[static_cast<std::size_t>(c)].softcap = c % 4 >= 2 ? 1.0f : 0.0f;
    if (c >= 4)
      opts[static_cast<std::size_t>(c)].sinks = sinks_around(c == 4 ? 5.0f : 0.0f, hq, rng);
    Tensor q = random_tensor(DType::kFloat32, {20, hq, d}, rng),
           k = random_tensor(DType::kFloat32, {20, hkv, d}, rng),
           v = random_tensor(DType::kFloat32, {20, hkv, d}, rng);
    v1::PrefillResponse resp;
    ASSERT_TRUE(
        prefill(prefill_request(cache.handle(), 0, {"s" + std::to_string(c)}, {20}, q, k, v, {}),
                &resp)
            .ok());
    mirrors[static_cast<std::size_t>(c)].append("s" + std::to_string(c), 0, 1, k, v, 0, 20);
  }
  std::vector<std::vector<Tensor>> inputs(callers);
  for (int c = 0; c < callers; ++c)
    for (int s = 0; s < steps; ++s)
      for (std::int64_t heads : {hq, hkv, hkv})
        inputs[static_cast<std::size_t>(c)].push_back(
            random_tensor(DType::kFloat32, {1, heads, d}, rng));
  std::vector<std::vector<double>> got(callers), want(callers);
  std::vector<std::thread> threads;
  for (int c = 0; c < callers; ++c)
    threads.emplace_back([&, c] {
      const std::string id = "s" + std::to_string(c);
      const auto& in = inputs[static_cast<std::size_t>(c)];
      for (int s = 0; s < steps; ++s) {
        const Tensor &q = in[static_cast<std::size_t>(3 * s)],
                     &k = in[static_cast<std::size_t>(3 * s + 1)],
                     &v = in[static_cast<std::size_t>(3 * s + 2)];
        v1::DecodeResponse resp;
        const grpc::Status st = decode(
            decode_request(cache.handle(), 0, {id}, q, k, v, opts[static_cast<std::size_t>(c)]),
            &resp);
        if (!st.ok()) return;
        const Tensor o = from_wire(resp.o());
        for (std::size_t e = 0; e < static_cast<std::size_t>(o.numel()); ++e)
          got[static_cast<std::size_t>(c)].push_back(o.get(e));
        mirrors[static_cast<std::size_t>(c)].append(id, 0, 1, k, v, 0, 1);
        attend(mirrors[static_cast<std::size_t>(c)], q, 0, 1, id, 0,
               opts[static_cast<std::size_t>(c)], want[static_cast<std::size_t>(c)]);
      }
    });
  for (auto& t : threads) t.join();
  for (int c = 0; c < callers; ++c) {
    ASSERT_EQ(got[static_cast<std::size_t>(c)].size(), static_cast<std::size_t>(steps * hq * d))
        << "caller " << c;
    EXPECT_LE(reference::relative_frobenius_error(got[static_cast<std::size_t>(c)],
                                                  want[static_cast<std::size_t>(c)]),
              reference::tolerance(DType::kFloat32))
        << "caller " << c;
  }
}

// Every out-of-range option: INVALID_ARGUMENT naming the field, nothing appended, the cache the
// same (description, lengths and bytes).
TEST_F(KvOptionsServer, BadOptionsFailNamingTheFieldAndChangeNothing) {
  std::mt19937_64 rng(testing::seed());
  const int hq = 4, hkv = 2, d = 8;
  const v1::KvCacheInfo cache = create(1, hkv, d, v1::D_TYPE_FLOAT32, 16, 256);
  const std::vector<std::string> ids{"a", "b"};
  {
    Tensor q = random_tensor(DType::kFloat32, {30, hq, d}, rng),
           k = random_tensor(DType::kFloat32, {30, hkv, d}, rng),
           v = random_tensor(DType::kFloat32, {30, hkv, d}, rng);
    v1::PrefillResponse resp;
    ASSERT_TRUE(
        prefill(prefill_request(cache.handle(), 0, ids, {10, 20}, q, k, v, {}), &resp).ok());
  }
  const std::string before = snapshot(cache.handle(), ids, 1);
  const float nan = std::numeric_limits<float>::quiet_NaN(),
              inf = std::numeric_limits<float>::infinity();
  // What each bad request changes from a good one, and the field its refusal must name.
  struct Case {
    std::string field;
    std::function<void(v1::DecodeRequest&)> decode;    // null: not a Decode field
    std::function<void(v1::PrefillRequest&)> prefill;  // null: not a Prefill field
  };
  auto bad_sinks = [&](DType dt, Shape shape, float value) {
    Tensor t(dt, shape);
    for (std::size_t i = 0; i < static_cast<std::size_t>(t.numel()); ++i)
      t.set(i, i == 1 ? value : 0.5f);
    return to_wire(t);
  };
  const std::vector<Case> cases{
      {"window_left", [](auto& r) { r.set_window_left(-2); },
       [](auto& r) { r.set_window_left(-5); }},
      {"window_right", nullptr, [](auto& r) { r.set_window_right(-2); }},
      {"softcap", [](auto& r) { r.set_softcap(-1.0f); }, [](auto& r) { r.set_softcap(-0.5f); }},
      {"softcap", [&](auto& r) { r.set_softcap(nan); }, [&](auto& r) { r.set_softcap(nan); }},
      {"softcap", [&](auto& r) { r.set_softcap(inf); }, [&](auto& r) { r.set_softcap(-inf); }},
      {"sinks.dtype",
       [&](auto& r) { *r.mutable_sinks() = bad_sinks(DType::kBFloat16, {hq}, 1.0f); },
       [&](auto& r) { *r.mutable_sinks() = bad_sinks(DType::kFloat16, {hq}, 1.0f); }},
      {"sinks.shape",
       [&](auto& r) { *r.mutable_sinks() = bad_sinks(DType::kFloat32, {hq + 1}, 1.0f); },
       [&](auto& r) {
         *r.mutable_sinks() = bad_sinks(DType::kFloat32, {1, hq}, 1.0f);
       }},
      {"sinks[1]", [&](auto& r) { *r.mutable_sinks() = bad_sinks(DType::kFloat32, {hq}, nan); },
       [&](auto& r) { *r.mutable_sinks() = bad_sinks(DType::kFloat32, {hq}, nan); }},
      {"sinks[1]", [&](auto& r) { *r.mutable_sinks() = bad_sinks(DType::kFloat32, {hq}, inf); },
       [&](auto& r) { *r.mutable_sinks() = bad_sinks(DType::kFloat32, {hq}, -inf); }},
      {"sinks.handle",
       [](auto& r) {
         r.mutable_sinks()->Clear();
         r.mutable_sinks()->set_handle("no-such-tensor");
       },
       [](auto& r) {
         r.mutable_sinks()->Clear();
         r.mutable_sinks()->set_handle("no-such-tensor");
       }},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.field);
    const auto want_code = c.field == "sinks.handle" ? grpc::StatusCode::NOT_FOUND
                                                     : grpc::StatusCode::INVALID_ARGUMENT;
    if (c.decode) {
      v1::DecodeRequest req =
          decode_request(cache.handle(), 0, ids, random_tensor(DType::kFloat32, {2, hq, d}, rng),
                         random_tensor(DType::kFloat32, {2, hkv, d}, rng),
                         random_tensor(DType::kFloat32, {2, hkv, d}, rng),
                         {true, 3, -1, 1.0f, std::vector<float>(hq, 0.5f)});
      c.decode(req);
      v1::DecodeResponse resp;
      const grpc::Status s = decode(req, &resp);
      EXPECT_EQ(s.error_code(), want_code) << "Decode: " << s.error_message();
      EXPECT_THAT(s.error_message(), HasSubstr(c.field)) << "Decode";
    }
    if (c.prefill) {
      v1::PrefillRequest req = prefill_request(cache.handle(), 0, ids, {3, 1},
                                               random_tensor(DType::kFloat32, {4, hq, d}, rng),
                                               random_tensor(DType::kFloat32, {4, hkv, d}, rng),
                                               random_tensor(DType::kFloat32, {4, hkv, d}, rng),
                                               {true, 3, -1, 1.0f, std::vector<float>(hq, 0.5f)});
      c.prefill(req);
      v1::PrefillResponse resp;
      const grpc::Status s = prefill(req, &resp);
      EXPECT_EQ(s.error_code(), want_code) << "Prefill: " << s.error_message();
      EXPECT_THAT(s.error_message(), HasSubstr(c.field)) << "Prefill";
    }
    EXPECT_EQ(snapshot(cache.handle(), ids, 1), before) << "the cache changed";
  }
  // A good call with every option still goes through afterwards, and appends.
  v1::DecodeResponse resp;
  const grpc::Status s =
      decode(decode_request(cache.handle(), 0, ids, random_tensor(DType::kFloat32, {2, hq, d}, rng),
                            random_tensor(DType::kFloat32, {2, hkv, d}, rng),
                            random_tensor(DType::kFloat32, {2, hkv, d}, rng),
                            {true, 3, -1, 1.0f, std::vector<float>(hq, 0.5f)}),
             &resp);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(resp.lengths(0), 11);
  EXPECT_EQ(resp.lengths(1), 21);
}

// One-shot Attention with sinks (with and without windows and soft caps) against float64, by the
// client's option; and its bad sinks refused naming the field.
TEST_F(KvOptionsServer, AttentionWithSinksMatchesFloat64AndRefusesBadSinks) {
  std::mt19937_64 rng(testing::seed());
  struct Shape4 {
    std::int64_t b, hq, hkv, sq, sk, d;
  };
  for (const Shape4& c : {Shape4{1, 1, 1, 1, 1, 16}, Shape4{2, 6, 2, 7, 33, 32},
                          Shape4{1, 7, 1, 33, 7, 16}, Shape4{1, 3, 1, 1, 1000, 64}})
    for (int variant = 0; variant < 3; ++variant) {
      Tensor q = random_tensor(DType::kFloat32, {c.b, c.hq, c.sq, c.d}, rng, 2.0f),
             k = random_tensor(DType::kFloat32, {c.b, c.hkv, c.sk, c.d}, rng, 2.0f),
             v = random_tensor(DType::kFloat32, {c.b, c.hkv, c.sk, c.d}, rng);
      AttentionOptions o;
      o.causal = variant != 0;
      o.return_lse = true;
      if (variant == 2) o.window_left = 3, o.softcap = 2.0f;
      o.sinks = Tensor::from_floats(DType::kFloat32, {c.hq},
                                    sinks_around(variant == 1 ? 20.0f : 0.0f, c.hq, rng));
      auto r = client_.attention(q, k, v, o);
      ASSERT_TRUE(r.ok()) << r.status().to_string();
      Tensor out(DType::kFloat32, q.shape());
      AttentionArgs a{q.view(),
                      k.view(),
                      v.view(),
                      out.view(),
                      {},
                      o.causal,
                      resolve_attention_scale(0.0f, c.d),
                      o.window_left,
                      o.window_right,
                      o.softcap};
      a.sinks = o.sinks.view();
      std::vector<double> want_lse;
      const auto want = reference::attention(a, &want_lse);
      EXPECT_LE(reference::relative_frobenius_error(r->output.view(), want),
                reference::tolerance(DType::kFloat32));
      EXPECT_LE(reference::lse_error(r->lse.view(), want_lse), 1e-5);
    }
  Tensor q = random_tensor(DType::kFloat32, {1, 4, 5, 8}, rng),
         k = random_tensor(DType::kFloat32, {1, 2, 5, 8}, rng);
  struct Bad {
    std::string field;
    Tensor sinks;
  };
  Tensor nan_sinks = Tensor::from_floats(DType::kFloat32, {4}, {0.0f, 1.0f, std::nanf(""), 0.0f});
  Tensor inf_sinks = Tensor::from_floats(
      DType::kFloat32, {4}, {0.0f, std::numeric_limits<float>::infinity(), 0.0f, 0.0f});
  for (const Bad& b : {Bad{"sinks.dtype", random_tensor(DType::kFloat16, {4}, rng)},
                       Bad{"sinks.shape", random_tensor(DType::kFloat32, {2}, rng)},
                       Bad{"sinks.shape", random_tensor(DType::kFloat32, {1, 4}, rng)},
                       Bad{"sinks[2]", nan_sinks}, Bad{"sinks[1]", inf_sinks}}) {
    AttentionOptions o;
    o.sinks = b.sinks;
    auto r = client_.attention(q, k, k, o);
    ASSERT_FALSE(r.ok()) << b.field;
    EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument) << r.status().to_string();
    EXPECT_THAT(r.status().message(), HasSubstr(b.field));
  }
}

}  // namespace
}  // namespace attn
