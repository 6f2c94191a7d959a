// attn::Client's asynchronous Decode and Prefill (decode_async, prefill_async: a future or a
// callback) against the real server: the blocking calls' results bit for bit, many calls in flight
// on one client at once (their responses held by a proxy while the server has applied every one),
// the blocking calls' errors, an exactly-once call resent through a lost response and applied once,
// and a client whose destructor waits for its calls.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <future>
#include <map>
#include <thread>

#include "attn/client.h"
#include "support/fault_proxy.h"
#include "support/random.h"
#include "support/server_process.h"

namespace attn {
namespace {

using testing::random_tensor;
using testing::ServerProcess;

constexpr int kHq = 4, kHkv = 2, kD = 16, kLayers = 2;

std::string new_cache(Client& client) {
  v1::KvCacheConfig c;
  c.set_layers(kLayers);
  c.set_kv_heads(kHkv);
  c.set_head_dim(kD);
  c.set_dtype(v1::D_TYPE_FLOAT32);
  c.set_page_size(8);
  c.set_capacity_tokens(2048);
  auto info = client.create_kv_cache(c);
  EXPECT_TRUE(info.ok()) << info.status().to_string();
  return info.ok() ? info->handle() : "";
}

// Sequence i's id.
std::string seq(int i) { return std::string("s").append(std::to_string(i)); }

struct Rows {
  Tensor q, k, v;
};

Rows rows(std::mt19937_64& rng, std::int64_t n) {
  return {random_tensor(DType::kFloat32, {n, kHq, kD}, rng),
          random_tensor(DType::kFloat32, {n, kHkv, kD}, rng),
          random_tensor(DType::kFloat32, {n, kHkv, kD}, rng)};
}

// All a result says: o and lse bytes, lengths, replayed, attempts; or the error.
std::string said(const Result<KvOpResult>& r) {
  if (!r.ok()) return std::string("error ").append(r.status().to_string());
  std::string s(static_cast<const char*>(r->output.data()), r->output.bytes());
  s.append(static_cast<const char*>(r->lse.data()), r->lse.bytes());
  for (auto len : r->lengths) s.append(",").append(std::to_string(len));
  return s.append(r->replayed ? " replayed " : " applied ").append(std::to_string(r->attempts));
}

// Each sequence's lengths per layer, as the server has them.
std::map<std::string, std::vector<std::int64_t>> lengths(Client& client, const std::string& cache) {
  std::map<std::string, std::vector<std::int64_t>> out;
  auto info = client.describe_kv_cache(cache);
  EXPECT_TRUE(info.ok()) << info.status().to_string();
  if (info.ok())
    for (const auto& s : info->sequences()) out[s.id()] = {s.lengths().begin(), s.lengths().end()};
  return out;
}

// A future's result, failing the test rather than waiting forever.
Result<KvOpResult> wait(std::future<Result<KvOpResult>>& f) {
  if (f.wait_for(std::chrono::minutes(2)) != std::future_status::ready)
    return Status(StatusCode::kDeadlineExceeded, "the future never became ready");
  return f.get();
}

TEST(AsyncClient, GivesTheBlockingCallsResultsBitForBit) {
  ServerProcess server(ATTND_PATH, {"--backend", "cpu"});
  std::mt19937_64 rng(testing::seed());
  SCOPED_TRACE("seed " + std::to_string(testing::seed()));
  Client client(server.address());
  const std::string blocking = new_cache(client), async = new_cache(client);
  const std::vector<std::string> ids{"x", "y", "z"};
  const std::vector<std::int64_t> lens{5, 9, 1};
  const Rows prompt = rows(rng, 15);
  for (int layer = 0; layer < kLayers; ++layer) {
    PrefillOptions o;
    o.return_lse = layer == 1;
    if (layer == 1) o.window_left = 3;
    o.expected_lengths = {0, 0, 0};
    auto want = client.prefill(blocking, layer, ids, lens, prompt.q, prompt.k, prompt.v, o);
    ASSERT_TRUE(want.ok()) << want.status().to_string();
    auto f = client.prefill_async(async, layer, ids, lens, prompt.q, prompt.k, prompt.v, o);
    EXPECT_EQ(said(wait(f)), said(want)) << "prefill, layer " << layer;
  }
  for (int step = 0; step < 4; ++step) {
    const Rows r = rows(rng, 3);
    for (int layer = 0; layer < kLayers; ++layer) {
      DecodeOptions o;
      o.return_lse = true;
      o.softcap = layer == 1 ? 5.0f : 0.0f;
      o.expected_lengths = {5 + step, 9 + step, 1 + step};
      auto want = client.decode(blocking, layer, ids, r.q, r.k, r.v, o);
      ASSERT_TRUE(want.ok()) << want.status().to_string();
      if (step % 2 == 0) {
        auto f = client.decode_async(async, layer, ids, r.q, r.k, r.v, o);
        EXPECT_EQ(said(wait(f)), said(want)) << "decode (future), step " << step;
      } else {
        std::promise<std::string> got;
        client.decode_async(async, layer, ids, r.q, r.k, r.v, o,
                            [&](Result<KvOpResult> res) { got.set_value(said(res)); });
        EXPECT_EQ(got.get_future().get(), said(want)) << "decode (callback), step " << step;
      }
    }
  }
  for (const auto& id : ids)
    for (int layer = 0; layer < kLayers; ++layer) {
      auto a = client.read_kv(blocking, id, layer);
      auto b = client.read_kv(async, id, layer);
      ASSERT_TRUE(a.ok() && b.ok());
      EXPECT_EQ(0, std::memcmp(a->k.data(), b->k.data(), a->k.bytes()));
      EXPECT_EQ(0, std::memcmp(a->v.data(), b->v.data(), a->v.bytes()));
    }
}

// Every call goes out before any response comes back: the proxy holds the responses while the
// server applies every call (its lengths say so); once they are let go, each caller gets its own
// answer, through its future or its callback.
TEST(AsyncClient, ManyCallsInFlightOnOneClient) {
  ServerProcess server(ATTND_PATH, {"--backend", "cpu"});
  testing::FaultProxy proxy(server.port(), testing::seed(), {});
  std::mt19937_64 rng(testing::seed());
  SCOPED_TRACE("seed " + std::to_string(testing::seed()));
  Client direct(server.address());
  Client through(proxy.address());
  const std::string cache = new_cache(direct), twin = new_cache(direct);
  through.set_kv_cache_replica(cache, proxy.address());
  constexpr int kCalls = 48;
  std::vector<Rows> steps;
  for (int i = 0; i < kCalls; ++i) {
    const Rows p = rows(rng, 2);
    const std::vector<std::string> id{seq(i)};
    ASSERT_TRUE(direct.prefill(cache, i % kLayers, id, {2}, p.q, p.k, p.v).ok());
    ASSERT_TRUE(direct.prefill(twin, i % kLayers, id, {2}, p.q, p.k, p.v).ok());
    steps.push_back(rows(rng, 1));
  }
  proxy.hold_responses();
  std::vector<std::future<Result<KvOpResult>>> futures;
  std::vector<std::string> called(kCalls / 2);
  std::atomic<int> callbacks{0};
  DecodeOptions o;
  o.return_lse = true;
  o.expected_lengths = {2};
  for (int i = 0; i < kCalls; ++i) {
    const Rows& r = steps[static_cast<std::size_t>(i)];
    const std::vector<std::string> id{seq(i)};
    if (i % 2 == 0) {
      futures.push_back(through.decode_async(cache, i % kLayers, id, r.q, r.k, r.v, o));
    } else {
      through.decode_async(cache, i % kLayers, id, r.q, r.k, r.v, o,
                           [&, slot = static_cast<std::size_t>(i / 2)](Result<KvOpResult> res) {
                             called[slot] = said(res);
                             ++callbacks;
                           });
    }
  }
  // The server has every call while no response has come back.
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::minutes(2);
  for (;;) {
    int applied = 0;
    for (const auto& [id, lens] : lengths(direct, cache))
      applied += lens[std::stoul(id.substr(1)) % kLayers] == 3;
    if (applied == kCalls) break;
    ASSERT_LT(std::chrono::steady_clock::now(), give_up)
        << applied << " of " << kCalls << " applied";
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  for (auto& f : futures) EXPECT_NE(f.wait_for(std::chrono::seconds(0)), std::future_status::ready);
  EXPECT_EQ(callbacks.load(), 0);
  proxy.release_responses();
  for (int i = 0; i < kCalls; ++i) {
    const Rows& r = steps[static_cast<std::size_t>(i)];
    auto want = direct.decode(twin, i % kLayers, {seq(i)}, r.q, r.k, r.v, o);
    ASSERT_TRUE(want.ok()) << want.status().to_string();
    if (i % 2 == 0) {
      EXPECT_EQ(said(wait(futures[static_cast<std::size_t>(i / 2)])), said(want)) << "call " << i;
    } else {
      while (callbacks.load() < kCalls / 2) {
        ASSERT_LT(std::chrono::steady_clock::now(), give_up + std::chrono::minutes(2));
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
      }
      EXPECT_EQ(called[static_cast<std::size_t>(i / 2)], said(want)) << "call " << i;
    }
  }
}

TEST(AsyncClient, ErrorsArriveAsTheBlockingCalls) {
  ServerProcess server(ATTND_PATH, {"--backend", "cpu"});
  std::mt19937_64 rng(testing::seed());
  Client client(server.address());
  const std::string cache = new_cache(client);
  const Rows p = rows(rng, 3);
  ASSERT_TRUE(client.prefill(cache, 0, {"s"}, {3}, p.q, p.k, p.v).ok());
  const Rows r = rows(rng, 1);
  const Tensor odd_q = random_tensor(DType::kFloat32, {1, kHq + 1, kD}, rng);
  DecodeOptions elsewhere;
  elsewhere.expected_lengths = {7};
  struct Bad {
    std::string cache;
    int layer;
    const Tensor* q;
    DecodeOptions options;
  };
  const std::vector<Bad> bad{{cache, 0, &odd_q, {}},  // heads not a multiple of the cache's
                             {cache, 5, &r.q, {}},    // no such layer
                             {"kv-nonexistent", 0, &r.q, {}},
                             {cache, 0, &r.q, elsewhere}};  // not where the cache is
  for (const Bad& b : bad) {
    auto want = client.decode(b.cache, b.layer, {"s"}, *b.q, r.k, r.v, b.options);
    ASSERT_FALSE(want.ok());
    auto f = client.decode_async(b.cache, b.layer, {"s"}, *b.q, r.k, r.v, b.options);
    EXPECT_EQ(said(wait(f)), said(want));
    std::promise<std::string> got;
    client.decode_async(b.cache, b.layer, {"s"}, *b.q, r.k, r.v, b.options,
                        [&](Result<KvOpResult> res) { got.set_value(said(res)); });
    EXPECT_EQ(got.get_future().get(), said(want));
  }
  auto want = client.prefill(cache, 0, {"s"}, {2}, r.q, r.k, r.v);  // lens past the rows
  ASSERT_FALSE(want.ok());
  auto f = client.prefill_async(cache, 0, {"s"}, {2}, r.q, r.k, r.v);
  EXPECT_EQ(said(wait(f)), said(want));
  EXPECT_EQ(lengths(client, cache),
            (std::map<std::string, std::vector<std::int64_t>>{{"s", {3, 0}}}));
}

// A response lost once the server ran the call: with expected_lengths the async call is resent
// and answered from the record, applied once; without them its error comes through the future.
TEST(AsyncClient, ALostResponseIsResentAndAppliedOnce) {
  ServerProcess server(ATTND_PATH, {"--backend", "cpu"});
  testing::FaultProxy proxy(server.port(), testing::seed(), {});
  std::mt19937_64 rng(testing::seed());
  ClientOptions options;
  options.timeout = std::chrono::seconds(20);
  options.kv_retry.initial_backoff = std::chrono::milliseconds(1);
  Client direct(server.address());
  Client through(proxy.address(), options);
  const std::string cache = new_cache(direct), twin = new_cache(direct);
  through.set_kv_cache_replica(cache, proxy.address());

  const Rows p = rows(rng, 7);
  PrefillOptions first;
  first.return_lse = true;
  first.expected_lengths = {0, 0};
  proxy.drop_next_response();
  auto pf = through.prefill_async(cache, 0, {"a", "b"}, {3, 4}, p.q, p.k, p.v, first);
  auto pr = wait(pf);
  ASSERT_TRUE(pr.ok()) << pr.status().to_string();
  EXPECT_TRUE(pr->replayed);
  // 2, or 3 where the resend met the channel still reconnecting after the cut (UNAVAILABLE, resent).
  EXPECT_GE(pr->attempts, 2);
  auto pw = direct.prefill(twin, 0, {"a", "b"}, {3, 4}, p.q, p.k, p.v, first);
  ASSERT_TRUE(pw.ok());
  pw->replayed = true;
  pw->attempts = pr->attempts;
  EXPECT_EQ(said(pr), said(pw));

  const Rows r = rows(rng, 2);
  DecodeOptions next;
  next.expected_lengths = {3, 4};
  proxy.drop_next_response();
  std::promise<Result<KvOpResult>> got;
  through.decode_async(cache, 0, {"a", "b"}, r.q, r.k, r.v, next,
                       [&](Result<KvOpResult> res) { got.set_value(std::move(res)); });
  auto df = got.get_future();
  auto dr = wait(df);
  ASSERT_TRUE(dr.ok()) << dr.status().to_string();
  EXPECT_TRUE(dr->replayed);
  EXPECT_GE(dr->attempts, 2);
  auto dw = direct.decode(twin, 0, {"a", "b"}, r.q, r.k, r.v, next);
  ASSERT_TRUE(dw.ok());
  dw->replayed = true;
  dw->attempts = dr->attempts;
  EXPECT_EQ(said(dr), said(dw));
  EXPECT_EQ(lengths(direct, cache),
            (std::map<std::string, std::vector<std::int64_t>>{{"a", {4, 0}}, {"b", {5, 0}}}));

  const Rows s = rows(rng, 1);
  proxy.drop_next_response();
  auto plain = through.decode_async(cache, 0, {"a"}, s.q, s.k, s.v);
  auto pl = wait(plain);
  EXPECT_EQ(pl.status().code(), StatusCode::kUnavailable) << pl.status().to_string();
  EXPECT_THAT(pl.status().message(), ::testing::Not(::testing::HasSubstr("attempts")));
  EXPECT_EQ(lengths(direct, cache)["a"], (std::vector<std::int64_t>{5, 0}))
      << "applied, though its caller cannot tell";
  EXPECT_EQ(proxy.stats().forced_drops.load(), 3);
}

// A client destroyed with calls in flight waits for them: every callback has run when its
// destructor returns.
TEST(AsyncClient, TheDestructorWaitsForCallsInFlight) {
  ServerProcess server(ATTND_PATH, {"--backend", "cpu"});
  std::mt19937_64 rng(testing::seed());
  Client direct(server.address());
  const std::string cache = new_cache(direct);
  constexpr int kCalls = 16;
  std::vector<Rows> steps;
  for (int i = 0; i < kCalls; ++i) {
    const Rows p = rows(rng, 1);
    ASSERT_TRUE(direct.prefill(cache, 0, {seq(i)}, {1}, p.q, p.k, p.v).ok());
    steps.push_back(rows(rng, 1));
  }
  std::atomic<int> ok{0}, done{0};
  {
    Client client(server.address());
    for (int i = 0; i < kCalls; ++i) {
      const Rows& r = steps[static_cast<std::size_t>(i)];
      client.decode_async(cache, 0, {seq(i)}, r.q, r.k, r.v, {}, [&](Result<KvOpResult> res) {
        ok += res.ok();
        ++done;
      });
    }
  }
  EXPECT_EQ(done.load(), kCalls);
  EXPECT_EQ(ok.load(), kCalls);
}

}  // namespace
}  // namespace attn
