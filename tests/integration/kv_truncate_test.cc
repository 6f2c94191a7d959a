// TruncateSequence against the real attnd (CPU backend): the cut at every layer (ReadKv against
// the test's mirror), the pages it frees (DescribeKvCache), decoding and prefilling on after a cut
// against float64 attention over the kept prefix and the new tokens, copy-on-write with forks in
// both orders, the cut to 0 and to the current length, every bad input leaving the cache as it
// was, and truncations ordered with Decode/Prefill calls on the same cache from many threads.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <atomic>
#include <cstring>
#include <functional>
#include <thread>

#include "attn/client.h"
#include "attn/wire.h"
#include "reference.h"
#include "support/kv_mirror.h"
#include "support/random.h"
#include "support/server_process.h"

namespace attn {
namespace {

using ::testing::ElementsAre;
using testing::from_wire;
using ::testing::HasSubstr;
using testing::Mirror;
using testing::random_tensor;
using testing::to_wire;

class KvTruncate : public ::testing::Test {
 protected:
  static constexpr int kHkv = 2, kHq = 4, kD = 16, kPage = 8;

  KvTruncate()
      : server_(ATTND_PATH, {"--backend", "cpu"}),
        client_(server_.address()),
        rng_(testing::seed()) {}

  std::string create(int layers, std::int64_t capacity, v1::DType dtype = v1::D_TYPE_FLOAT32) {
    v1::KvCacheConfig c;
    c.set_layers(layers);
    c.set_kv_heads(kHkv);
    c.set_head_dim(kD);
    c.set_dtype(dtype);
    c.set_page_size(kPage);
    c.set_capacity_tokens(capacity);
    auto info = client_.create_kv_cache(c);
    EXPECT_TRUE(info.ok()) << info.status().to_string();
    layers_ = layers;
    dtype_ = *wire::from_proto(dtype);
    mirror_ = Mirror{kHkv, kD, {}, {}};
    return info.ok() ? info->handle() : "";
  }
  v1::KvCacheInfo describe(const std::string& cache) {
    auto info = client_.describe_kv_cache(cache);
    EXPECT_TRUE(info.ok()) << info.status().to_string();
    return info.ok() ? *info : v1::KvCacheInfo{};
  }
  v1::KvSequenceInfo sequence(const std::string& cache, const std::string& id) {
    const v1::KvCacheInfo info = describe(cache);
    for (const auto& s : info.sequences())
      if (s.id() == id) return s;
    ADD_FAILURE() << "no sequence " << id;
    return {};
  }
  grpc::Status truncate(const std::string& cache, const std::string& id, std::int64_t length,
                        v1::TruncateSequenceResponse* resp) {
    v1::TruncateSequenceRequest req;
    req.set_cache(cache);
    req.set_sequence_id(id);
    req.set_length(length);
    grpc::ClientContext ctx;
    return client_.stub().TruncateSequence(&ctx, req, resp);
  }
  // Truncates on the server and in the mirror; the response.
  v1::TruncateSequenceResponse cut(const std::string& cache, const std::string& id,
                                   std::int64_t length) {
    v1::TruncateSequenceResponse resp;
    const grpc::Status s = truncate(cache, id, length, &resp);
    EXPECT_TRUE(s.ok()) << s.error_message();
    for (auto* side : {&mirror_.k, &mirror_.v})
      for (auto& rows : (*side)[id])
        rows.resize(std::min(rows.size(), static_cast<std::size_t>(length * kHkv * kD)));
    return resp;
  }
  // `n` new tokens of `id` at `layer` (a prefill, or a decode when `as_decode`), the output
  // checked against float64 attention over the mirror.
  void append(const std::string& cache, const std::string& id, int layer, std::int64_t n,
              bool as_decode = false) {
    Tensor q = random_tensor(dtype_, {n, kHq, kD}, rng_),
           k = random_tensor(dtype_, {n, kHkv, kD}, rng_),
           v = random_tensor(dtype_, {n, kHkv, kD}, rng_);
    Result<KvOpResult> r = as_decode ? client_.decode(cache, layer, {id}, q, k, v)
                                     : client_.prefill(cache, layer, {id}, {n}, q, k, v);
    ASSERT_TRUE(r.ok()) << r.status().to_string();
    const std::int64_t before = mirror_.k.count(id) ? mirror_.length(id, layer) : 0;
    mirror_.append(id, layer, layers_, k, v, 0, n);
    EXPECT_THAT(r->lengths, ElementsAre(before + n));
    std::vector<double> want;
    for (std::int64_t j = 0; j < n; ++j) mirror_.attend(q, j, id, layer, before + j + 1, want);
    EXPECT_LE(reference::relative_frobenius_error(r->output.view(), want),
              reference::tolerance(dtype_, before + n))
        << id << " layer " << layer << " tokens " << before << ".." << before + n;
  }
  // ReadKv of `id` at every layer equals the mirror, bit for bit.
  void expect_contents(const std::string& cache, const std::string& id) {
    for (int layer = 0; layer < layers_; ++layer) {
      auto kv = client_.read_kv(cache, id, layer);
      ASSERT_TRUE(kv.ok()) << kv.status().to_string();
      const auto& mk = mirror_.k[id][static_cast<std::size_t>(layer)];
      const auto& mv = mirror_.v[id][static_cast<std::size_t>(layer)];
      ASSERT_EQ(kv->k.shape(), (Shape{mirror_.length(id, layer), kHkv, kD}))
          << id << " layer " << layer;
      bool same = true;
      for (std::size_t e = 0; e < mk.size(); ++e)
        same &= kv->k.get(e) == mk[e] && kv->v.get(e) == mv[e];
      EXPECT_TRUE(same) << id << " layer " << layer;
    }
  }
  static std::int64_t pages(std::int64_t tokens) { return (tokens + kPage - 1) / kPage; }

  testing::ServerProcess server_;
  Client client_;
  std::mt19937_64 rng_;
  int layers_ = 0;
  DType dtype_ = DType::kFloat32;
  Mirror mirror_{kHkv, kD, {}, {}};
};

// Ragged layers (40, 40, 30 tokens): a cut to 35 leaves the short layer alone, a cut to 21
// shortens all three; whole pages past the end go back, ReadKv shows the kept prefix.
TEST_F(KvTruncate, CutsEveryLayerAndFreesWholePages) {
  const std::string cache = create(3, 256);  // 32 pages
  for (int layer = 0; layer < 3; ++layer) append(cache, "s", layer, layer == 2 ? 30 : 40);
  append(cache, "other", 0, 9);
  EXPECT_EQ(describe(cache).pages_used(), 5 + 2);

  auto r = cut(cache, "s", 35);
  EXPECT_THAT(r.sequence().lengths(), ElementsAre(35, 35, 30));
  EXPECT_EQ(r.sequence().id(), "s");
  EXPECT_EQ(r.sequence().pages(), 5);
  EXPECT_EQ(r.freed_pages(), 0);
  EXPECT_EQ(r.copied_pages(), 0);
  expect_contents(cache, "s");

  r = cut(cache, "s", 21);
  EXPECT_THAT(r.sequence().lengths(), ElementsAre(21, 21, 21));
  EXPECT_EQ(r.sequence().pages(), 3);
  EXPECT_EQ(r.freed_pages(), 2);
  EXPECT_EQ(r.copied_pages(), 0);
  expect_contents(cache, "s");
  expect_contents(cache, "other");
  const v1::KvCacheInfo info = describe(cache);
  EXPECT_EQ(info.pages_used(), 3 + 2);
  EXPECT_EQ(info.pages_free(), 32 - 5);
  EXPECT_EQ(info.pages_unshared(), 3 + 2);
  EXPECT_EQ(info.sequence_count(), 2);
  EXPECT_THAT(sequence(cache, "s").lengths(), ElementsAre(21, 21, 21));

  // A cut on a page boundary keeps exactly the full pages.
  r = cut(cache, "s", 16);
  EXPECT_EQ(r.sequence().pages(), 2);
  EXPECT_EQ(r.freed_pages(), 1);
  EXPECT_EQ(describe(cache).pages_used(), 2 + 2);
  expect_contents(cache, "s");
}

// Decoding and prefilling after a cut see the kept prefix and the new tokens only: outputs
// against float64 attention over them, in every dtype; the cache then holds exactly those rows.
TEST_F(KvTruncate, DecodeAndPrefillAfterACutMatchFloat64) {
  for (v1::DType wire_dtype : {v1::D_TYPE_FLOAT32, v1::D_TYPE_BFLOAT16}) {
    SCOPED_TRACE(v1::DType_Name(wire_dtype) + " seed " + std::to_string(testing::seed()));
    const std::string cache = create(2, 512, wire_dtype);
    for (int layer = 0; layer < 2; ++layer) append(cache, "s", layer, 37);
    for (int step = 0; step < 3; ++step)
      for (int layer = 0; layer < 2; ++layer) append(cache, "s", layer, 1, true);
    // A speculative step: 5 draft tokens in, 3 rejected.
    for (int layer = 0; layer < 2; ++layer) append(cache, "s", layer, 5);
    cut(cache, "s", 42);
    expect_contents(cache, "s");
    for (int step = 0; step < 10; ++step)  // crosses into a new page at 48
      for (int layer = 0; layer < 2; ++layer) append(cache, "s", layer, 1, true);
    // A deep cut into an earlier page, then a prefill that spans pages again.
    cut(cache, "s", 19);
    EXPECT_EQ(describe(cache).pages_used(), pages(19));
    for (int layer = 0; layer < 2; ++layer) append(cache, "s", layer, 14);
    for (int layer = 0; layer < 2; ++layer) append(cache, "s", layer, 1, true);
    expect_contents(cache, "s");
    EXPECT_EQ(describe(cache).pages_used(), pages(34));
  }
}

// Fork A -> B shares A's full pages. A cut of A inside a shared page copies it for A first, so A's
// appends never reach B; B's rows and B's decoding stay as they were. Releasing both frees all.
TEST_F(KvTruncate, ACutInsideASharedPageCopiesItForTheCutSequence) {
  const std::string cache = create(2, 512);
  for (int layer = 0; layer < 2; ++layer) append(cache, "a", layer, 40);  // 5 full pages
  auto fork = client_.fork_sequence(cache, "a", "b");
  ASSERT_TRUE(fork.ok()) << fork.status().to_string();
  EXPECT_EQ(fork->copied_pages(), 0);
  EXPECT_EQ(fork->sequence().shared_pages(), 5);
  mirror_.k["b"] = mirror_.k["a"];
  mirror_.v["b"] = mirror_.v["a"];
  EXPECT_EQ(describe(cache).pages_used(), 5);

  auto r = cut(cache, "a", 20);  // inside page 2, shared
  EXPECT_EQ(r.copied_pages(), 1);
  EXPECT_EQ(r.freed_pages(), 0) << "pages 3 and 4 stay b's";
  EXPECT_EQ(r.sequence().pages(), 3);
  EXPECT_EQ(r.sequence().shared_pages(), 2);
  EXPECT_EQ(describe(cache).pages_used(), 6);
  EXPECT_EQ(sequence(cache, "b").shared_pages(), 2);
  expect_contents(cache, "a");

  // a writes rows 20.. into its copy and a fresh page; b's page 2 keeps its rows.
  for (int step = 0; step < 6; ++step)
    for (int layer = 0; layer < 2; ++layer) append(cache, "a", layer, 1, true);
  expect_contents(cache, "b");
  expect_contents(cache, "a");
  for (int step = 0; step < 3; ++step)
    for (int layer = 0; layer < 2; ++layer) append(cache, "b", layer, 1, true);
  for (int layer = 0; layer < 2; ++layer) append(cache, "a", layer, 3);
  expect_contents(cache, "a");
  expect_contents(cache, "b");

  const v1::KvCacheInfo info = describe(cache);
  auto freed = client_.release_sequences(cache, {"a", "b"});
  ASSERT_TRUE(freed.ok());
  EXPECT_EQ(*freed, info.pages_used());
  EXPECT_EQ(describe(cache).pages_used(), 0);
}

// The other order: the fork is cut, the source goes on; and a cut of the source after its fork
// has been cut finds the page no longer shared (no copy).
TEST_F(KvTruncate, ACutForkLeavesItsSourceAlone) {
  const std::string cache = create(2, 512);
  for (int layer = 0; layer < 2; ++layer) append(cache, "a", layer, 43);  // 5 full pages + 3
  auto fork = client_.fork_sequence(cache, "a", "b");
  ASSERT_TRUE(fork.ok()) << fork.status().to_string();
  EXPECT_EQ(fork->copied_pages(), 1);
  mirror_.k["b"] = mirror_.k["a"];
  mirror_.v["b"] = mirror_.v["a"];
  EXPECT_EQ(describe(cache).pages_used(), 7);

  auto r = cut(cache, "b", 13);  // inside page 1, shared; pages 2..4 shared, 5 b's own
  EXPECT_EQ(r.copied_pages(), 1);
  EXPECT_EQ(r.freed_pages(), 1);
  EXPECT_EQ(r.sequence().pages(), 2);
  EXPECT_EQ(r.sequence().shared_pages(), 1);
  EXPECT_EQ(describe(cache).pages_used(), 7);
  for (int step = 0; step < 5; ++step)
    for (int layer = 0; layer < 2; ++layer) append(cache, "b", layer, 1, true);
  expect_contents(cache, "a");
  for (int step = 0; step < 4; ++step)
    for (int layer = 0; layer < 2; ++layer) append(cache, "a", layer, 1, true);
  expect_contents(cache, "a");
  expect_contents(cache, "b");

  // b's cut gave pages 1..4 back to a alone (page 0 stays shared): a cut inside page 3 copies
  // nothing.
  r = cut(cache, "a", 30);
  EXPECT_EQ(r.copied_pages(), 0);
  EXPECT_EQ(r.freed_pages(), 2);  // pages 4 and 5
  for (int layer = 0; layer < 2; ++layer) append(cache, "a", layer, 1, true);
  expect_contents(cache, "a");
  expect_contents(cache, "b");
}

// A full cache: the copy a cut needs takes a page the cut drops from this sequence alone; when it
// drops none and no page is free, RESOURCE_EXHAUSTED naming the pages, and nothing changed.
TEST_F(KvTruncate, AFullCacheCopiesIntoADroppedPageOrRefuses) {
  const std::string cache = create(1, 48);             // 6 pages
  append(cache, "a", 0, 36);                           // pages 0..3 full, page 4 holds 4 rows
  auto fork = client_.fork_sequence(cache, "a", "b");  // shares 0..3, copies 4 into 5
  ASSERT_TRUE(fork.ok()) << fork.status().to_string();
  mirror_.k["b"] = mirror_.k["a"];
  mirror_.v["b"] = mirror_.v["a"];
  EXPECT_EQ(describe(cache).pages_free(), 0);

  // Inside shared page 2: copied into page 4, a's own, which the cut drops.
  auto r = cut(cache, "a", 20);
  EXPECT_EQ(r.copied_pages(), 1);
  EXPECT_EQ(r.freed_pages(), 0);
  EXPECT_EQ(r.sequence().shared_pages(), 2);
  EXPECT_EQ(describe(cache).pages_free(), 0);
  for (int step = 0; step < 4; ++step) append(cache, "a", 0, 1, true);  // rows 20..23
  expect_contents(cache, "a");
  expect_contents(cache, "b");

  // On a page boundary: no copy; a's own page goes back, and another sequence takes it.
  r = cut(cache, "a", 16);
  EXPECT_EQ(r.copied_pages(), 0);
  EXPECT_EQ(r.freed_pages(), 1);
  append(cache, "d", 0, 1);
  EXPECT_EQ(describe(cache).pages_free(), 0);

  // Inside shared page 1, dropping nothing, no page free: refused.
  auto snapshot = [&] {
    v1::KvCacheInfo info = describe(cache);
    info.clear_expires_unix_ms();
    std::string s = info.DebugString();
    for (const char* id : {"a", "b", "d"}) {
      auto kv = client_.read_kv(cache, id, 0);
      EXPECT_TRUE(kv.ok());
      if (!kv.ok()) continue;
      s.append(static_cast<const char*>(kv->k.data()), kv->k.bytes());
      s.append(static_cast<const char*>(kv->v.data()), kv->v.bytes());
    }
    return s;
  };
  const std::string before = snapshot();
  v1::TruncateSequenceResponse resp;
  const grpc::Status refused = truncate(cache, "a", 12, &resp);
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << refused.error_message();
  EXPECT_THAT(refused.error_message(), HasSubstr("0 of 6 pages"));
  EXPECT_EQ(snapshot(), before) << "a refused cut changed the cache";

  // With a page free again, the same cut copies.
  ASSERT_TRUE(client_.release_sequences(cache, {"d"}).ok());
  r = cut(cache, "a", 12);
  EXPECT_EQ(r.copied_pages(), 1);
  EXPECT_EQ(r.freed_pages(), 0);
  EXPECT_EQ(r.sequence().shared_pages(), 1);
  for (int step = 0; step < 3; ++step) append(cache, "a", 0, 1, true);
  expect_contents(cache, "a");
  expect_contents(cache, "b");
  for (int step = 0; step < 2; ++step) append(cache, "b", 0, 1, true);
  expect_contents(cache, "b");
}

// A cut to 0 keeps the sequence, empty, its pages freed; a cut to its current length changes
// nothing. Both then serve like any sequence.
TEST_F(KvTruncate, CutToZeroKeepsTheSequenceAndACutToItsLengthIsANoOp) {
  const std::string cache = create(2, 256);
  for (int layer = 0; layer < 2; ++layer) append(cache, "s", layer, 27);
  append(cache, "t", 0, 5);  // layer 1 not reached yet: lengths (5, 0)

  const v1::KvCacheInfo before = describe(cache);
  auto r = cut(cache, "s", 27);
  EXPECT_THAT(r.sequence().lengths(), ElementsAre(27, 27));
  EXPECT_EQ(r.freed_pages(), 0);
  EXPECT_EQ(r.copied_pages(), 0);
  r = cut(cache, "t", 5);
  EXPECT_THAT(r.sequence().lengths(), ElementsAre(5, 0));
  EXPECT_EQ(describe(cache).pages_used(), before.pages_used());
  expect_contents(cache, "s");

  r = cut(cache, "s", 0);
  EXPECT_THAT(r.sequence().lengths(), ElementsAre(0, 0));
  EXPECT_EQ(r.sequence().pages(), 0);
  EXPECT_EQ(r.freed_pages(), 4);
  const v1::KvCacheInfo after = describe(cache);
  EXPECT_EQ(after.sequence_count(), 2);
  EXPECT_EQ(after.pages_used(), 1);
  expect_contents(cache, "s");  // no rows
  // An empty sequence decodes from scratch.
  for (int step = 0; step < 3; ++step)
    for (int layer = 0; layer < 2; ++layer) append(cache, "s", layer, 1, true);
  for (int layer = 0; layer < 2; ++layer) append(cache, "s", layer, 9);
  expect_contents(cache, "s");
  // And a cut to 0 of an empty sequence is a no-op.
  cut(cache, "t", 0);
  cut(cache, "t", 0);
  EXPECT_THAT(sequence(cache, "t").lengths(), ElementsAre(0, 0));
}

// Every bad call gets its status naming the field, what was expected and what came, and leaves
// the cache as it was (describe and ReadKv of every sequence at every layer, before and after).
TEST_F(KvTruncate, BadCallsNameTheFieldAndChangeNothing) {
  const std::string cache = create(2, 128);
  for (int layer = 0; layer < 2; ++layer) append(cache, "a", layer, layer == 0 ? 30 : 20);
  append(cache, "b", 0, 11);
  auto fork = client_.fork_sequence(cache, "a", "a2");
  ASSERT_TRUE(fork.ok());
  auto snapshot = [&] {
    v1::KvCacheInfo info = describe(cache);
    info.clear_expires_unix_ms();  // moves with every use
    std::string s = info.DebugString();
    for (const char* id : {"a", "b", "a2"})
      for (int layer = 0; layer < 2; ++layer) {
        auto kv = client_.read_kv(cache, id, layer);
        EXPECT_TRUE(kv.ok()) << kv.status().to_string();
        if (!kv.ok()) continue;
        s.append(static_cast<const char*>(kv->k.data()), kv->k.bytes());
        s.append(static_cast<const char*>(kv->v.data()), kv->v.bytes());
      }
    return s;
  };
  const std::string before = snapshot();
  struct Case {
    std::string what, cache, id;
    std::int64_t length;
    grpc::StatusCode code;
    std::vector<std::string> message;
  };
  using C = grpc::StatusCode;
  const std::vector<Case> cases{
      {"past the longest layer",
       cache,
       "a",
       31,
       C::INVALID_ARGUMENT,
       {"length", "0..30", "got 31"}},
      {"far past",
       cache,
       "b",
       1LL << 40,
       C::INVALID_ARGUMENT,
       {"length", "0..11", "got 1099511627776"}},
      {"negative", cache, "a", -1, C::INVALID_ARGUMENT, {"length", "0..30", "got -1"}},
      {"unknown sequence", cache, "zz", 0, C::NOT_FOUND, {"sequence_id", "\"zz\""}},
      {"empty sequence id", cache, "", 0, C::NOT_FOUND, {"sequence_id"}},
      {"unknown cache", "kv-nope", "a", 0, C::NOT_FOUND, {"cache", "kv-nope"}},
  };
  for (const Case& c : cases) {
    v1::TruncateSequenceResponse resp;
    const grpc::Status s = truncate(c.cache, c.id, c.length, &resp);
    EXPECT_EQ(s.error_code(), c.code) << c.what << ": " << s.error_message();
    for (const std::string& m : c.message) EXPECT_THAT(s.error_message(), HasSubstr(m)) << c.what;
  }
  EXPECT_EQ(snapshot(), before) << "a failed call changed the cache";
  // And the cache still serves.
  auto ok = client_.truncate_sequence(cache, "a", 30);
  EXPECT_TRUE(ok.ok()) << ok.status().to_string();
}

// Truncations queue in the cache's order with Decode and Prefill: threads, each on its own
// sequence of one cache, draft k tokens (a prefill), cut back, decode one, over and over, while
// their calls meet in the cache's queue (and in merged launches); every output matches float64
// and the cache ends holding exactly each thread's rows, its pages no more than they need.
TEST_F(KvTruncate, CutsAreOrderedWithAppendsFromManyThreads) {
  const int threads = 4, rounds = 8;
  const std::string cache = create(1, 4096);
  std::vector<Mirror> mirrors(threads, Mirror{kHkv, kD, {}, {}});
  std::atomic<int> failures{0};
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t)
    pool.emplace_back([&, t] {
      std::mt19937_64 rng(testing::seed() + static_cast<std::uint64_t>(t));
      const std::string id = "t" + std::to_string(t);
      Mirror& m = mirrors[static_cast<std::size_t>(t)];
      auto check = [&](const Result<KvOpResult>& r, const Tensor& q, std::int64_t n) {
        if (!r.ok()) return false;
        const std::int64_t len = m.length(id, 0);
        std::vector<double> want;
        for (std::int64_t j = 0; j < n; ++j) m.attend(q, j, id, 0, len - n + j + 1, want);
        return r->lengths == std::vector<std::int64_t>{len} &&
               reference::relative_frobenius_error(r->output.view(), want) <=
                   reference::tolerance(DType::kFloat32, len);
      };
      for (int round = 0; round < rounds; ++round) {
        const std::int64_t k = 2 + (round + t) % 5;
        Tensor q = random_tensor(DType::kFloat32, {k, kHq, kD}, rng),
               kn = random_tensor(DType::kFloat32, {k, kHkv, kD}, rng),
               vn = random_tensor(DType::kFloat32, {k, kHkv, kD}, rng);
        auto drafted = client_.prefill(cache, 0, {id}, {k}, q, kn, vn);
        m.append(id, 0, 1, kn, vn, 0, k);
        if (!check(drafted, q, k)) ++failures;
        const std::int64_t keep = m.length(id, 0) - (round % 3 == 0 ? k : 1);
        auto cut = client_.truncate_sequence(cache, id, keep);
        if (!cut.ok() || cut->sequence().lengths(0) != keep) ++failures;
        for (auto* side : {&m.k, &m.v})
          (*side)[id][0].resize(static_cast<std::size_t>(keep * kHkv * kD));
        Tensor q1 = random_tensor(DType::kFloat32, {1, kHq, kD}, rng),
               k1 = random_tensor(DType::kFloat32, {1, kHkv, kD}, rng),
               v1_ = random_tensor(DType::kFloat32, {1, kHkv, kD}, rng);
        auto decoded = client_.decode(cache, 0, {id}, q1, k1, v1_);
        m.append(id, 0, 1, k1, v1_, 0, 1);
        if (!check(decoded, q1, 1)) ++failures;
      }
    });
  for (auto& t : pool) t.join();
  EXPECT_EQ(failures.load(), 0);
  std::int64_t want_pages = 0;
  for (int t = 0; t < threads; ++t) {
    const std::string id = "t" + std::to_string(t);
    mirror_.k[id] = mirrors[static_cast<std::size_t>(t)].k[id];
    mirror_.v[id] = mirrors[static_cast<std::size_t>(t)].v[id];
    expect_contents(cache, id);
    want_pages += pages(mirror_.length(id, 0));
  }
  EXPECT_EQ(describe(cache).pages_used(), want_pages);
}

}  // namespace
}  // namespace attn
