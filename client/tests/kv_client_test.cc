// attn::Client's KV-cache calls against the real server: results against float64 loops, ReadKv,
// the status codes, and calls routed to the replica holding each cache when several replicas sit
// behind one round_robin target.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <set>
#include <thread>

#include "attn/client.h"
#include "support/random.h"
#include "support/server_process.h"

namespace attn {
namespace {

using testing::ServerProcess;

constexpr int kHq = 4, kHkv = 2, kD = 16;

v1::KvCacheConfig config(int layers, std::int64_t capacity) {
  v1::KvCacheConfig c;
  c.set_layers(layers);
  c.set_kv_heads(kHkv);
  c.set_head_dim(kD);
  c.set_dtype(v1::D_TYPE_FLOAT32);
  c.set_page_size(8);
  c.set_capacity_tokens(capacity);
  return c;
}

// One layer's sequences in float64: rows of [Hkv, D] per token.
struct ReferenceLayer {
  std::map<std::string, std::vector<std::vector<double>>> k, v;

  // Appends rows [first, first + n) of k_new/v_new to `id`, then attends q's rows [first, first +
  // n) causally; writes o's rows.
  void append(const std::string& id, const Tensor& q, const Tensor& k_new, const Tensor& v_new, std::int64_t first,
              std::int64_t n, std::vector<double>& o) {
    auto& ks = k[id];
    auto& vs = v[id];
    for (std::int64_t r = first; r < first + n; ++r) {
      std::vector<double> kr(kHkv * kD), vr(kHkv * kD);
      for (int i = 0; i < kHkv * kD; ++i) {
        kr[i] = k_new.get(static_cast<std::size_t>(r * kHkv * kD + i));
        vr[i] = v_new.get(static_cast<std::size_t>(r * kHkv * kD + i));
      }
      ks.push_back(kr);
      vs.push_back(vr);
    }
    const std::int64_t len = static_cast<std::int64_t>(ks.size());
    const double scale = 1 / std::sqrt(double{kD});
    for (std::int64_t r = 0; r < n; ++r) {
      const std::int64_t visible = len - n + r + 1;
      for (int h = 0; h < kHq; ++h) {
        const int g = h / (kHq / kHkv);
        std::vector<double> s(static_cast<std::size_t>(visible));
        double m = -INFINITY;
        for (std::int64_t j = 0; j < visible; ++j) {
          double dot = 0;
          for (int d = 0; d < kD; ++d)
            dot += q.get(static_cast<std::size_t>(((first + r) * kHq + h) * kD + d)) * ks[j][g * kD + d];
          s[j] = dot * scale;
          m = std::max(m, s[j]);
        }
        double sum = 0;
        for (auto& x : s) sum += (x = std::exp(x - m));
        for (int d = 0; d < kD; ++d) {
          double acc = 0;
          for (std::int64_t j = 0; j < visible; ++j) acc += s[j] * vs[j][g * kD + d];
          o[static_cast<std::size_t>(((first + r) * kHq + h) * kD + d)] = acc / sum;
        }
      }
    }
  }
};

double rel_error(const Tensor& got, const std::vector<double>& want) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < want.size(); ++i) {
    const double d = got.get(i) - want[i];
    num += d * d;
    den += want[i] * want[i];
  }
  return std::sqrt(num / den);
}

Tensor rows(std::int64_t n, int heads, std::mt19937_64& rng) {
  return testing::random_tensor(DType::kFloat32, {n, heads, kD}, rng);
}

// The servers stop after the clients are gone: a connection left open holds a SIGTERM'd server
// several seconds in its shutdown.
void expect_prefill_decode_read_kv(const ServerProcess& server) {
  ClientOptions options;
  options.timeout = std::chrono::seconds(30);
  Client client(server.address(), options);
  std::mt19937_64 rng(testing::seed());
  SCOPED_TRACE("ATTN_TEST_SEED=" + std::to_string(testing::seed()));

  auto info = client.create_kv_cache(config(2, 256));
  ASSERT_TRUE(info.ok()) << info.status().to_string();
  EXPECT_EQ(info->replica(), server.address());
  EXPECT_EQ(client.kv_cache_replica(info->handle()), server.address());
  const std::string cache = info->handle();
  std::vector<ReferenceLayer> ref(2);

  const std::vector<std::string> ids{"a", "b"};
  const std::vector<std::int64_t> lens{7, 12};
  for (int layer = 0; layer < 2; ++layer) {
    Tensor q = rows(19, kHq, rng), k = rows(19, kHkv, rng), v = rows(19, kHkv, rng);
    auto r = client.prefill(cache, layer, ids, lens, q, k, v, {.return_lse = true});
    ASSERT_TRUE(r.ok()) << r.status().to_string();
    std::vector<double> want(static_cast<std::size_t>(19 * kHq * kD));
    ref[layer].append("a", q, k, v, 0, 7, want);
    ref[layer].append("b", q, k, v, 7, 12, want);
    EXPECT_EQ(r->output.shape(), (Shape{19, kHq, kD}));
    EXPECT_EQ(r->lse.shape(), (Shape{19, kHq}));
    EXPECT_LT(rel_error(r->output, want), 1e-5);
    EXPECT_THAT(r->lengths, ::testing::ElementsAre(7, 12));
  }
  for (int step = 0; step < 3; ++step)
    for (int layer = 0; layer < 2; ++layer) {
      Tensor q = rows(2, kHq, rng), k = rows(2, kHkv, rng), v = rows(2, kHkv, rng);
      auto r = client.decode(cache, layer, {"b", "a"}, q, k, v);
      ASSERT_TRUE(r.ok()) << r.status().to_string();
      std::vector<double> want(static_cast<std::size_t>(2 * kHq * kD));
      ref[layer].append("b", q, k, v, 0, 1, want);
      ref[layer].append("a", q, k, v, 1, 1, want);
      EXPECT_LT(rel_error(r->output, want), 1e-5);
      EXPECT_THAT(r->lengths, ::testing::ElementsAre(13 + step, 8 + step));
      EXPECT_THAT(r->timings.kernel(), ::testing::StartsWith("paged_decode/"));
    }
  auto kv = client.read_kv(cache, "a", 1, 100);  // chunks that straddle K and V
  ASSERT_TRUE(kv.ok()) << kv.status().to_string();
  ASSERT_EQ(kv->k.shape(), (Shape{10, kHkv, kD}));
  for (std::int64_t t = 0; t < 10; ++t)
    for (int i = 0; i < kHkv * kD; ++i) {
      ASSERT_EQ(kv->k.get(static_cast<std::size_t>(t * kHkv * kD + i)), ref[1].k["a"][t][i]);
      ASSERT_EQ(kv->v.get(static_cast<std::size_t>(t * kHkv * kD + i)), ref[1].v["a"][t][i]);
    }

  auto fork = client.fork_sequence(cache, "a", "a2");
  ASSERT_TRUE(fork.ok()) << fork.status().to_string();
  EXPECT_EQ(fork->sequence().shared_pages(), 1);  // 10 tokens: one full page of 8
  // Cut inside the shared page: a2 gets a copy of it and gives its own second page back.
  auto cut = client.truncate_sequence(cache, "a2", 3);
  ASSERT_TRUE(cut.ok()) << cut.status().to_string();
  EXPECT_THAT(cut->sequence().lengths(), ::testing::ElementsAre(3, 3));
  EXPECT_EQ(cut->sequence().pages(), 1);
  EXPECT_EQ(cut->sequence().shared_pages(), 0);
  EXPECT_EQ(cut->copied_pages(), 1);
  EXPECT_EQ(cut->freed_pages(), 1);
  auto cut_a2 = client.read_kv(cache, "a2", 0);
  ASSERT_TRUE(cut_a2.ok()) << cut_a2.status().to_string();
  ASSERT_EQ(cut_a2->k.shape(), (Shape{3, kHkv, kD}));
  for (std::int64_t t = 0; t < 3; ++t)
    for (int i = 0; i < kHkv * kD; ++i)
      ASSERT_EQ(cut_a2->v.get(static_cast<std::size_t>(t * kHkv * kD + i)), ref[0].v["a"][t][i]);
  auto too_long = client.truncate_sequence(cache, "a2", 4);
  EXPECT_EQ(too_long.status().code(), StatusCode::kInvalidArgument);
  EXPECT_THAT(too_long.status().message(), ::testing::HasSubstr("length"));
  auto described = client.describe_kv_cache(cache);
  ASSERT_TRUE(described.ok());
  EXPECT_EQ(described->sequence_count(), 3);
  auto freed = client.release_sequences(cache, {"a", "a2", "b"});
  ASSERT_TRUE(freed.ok()) << freed.status().to_string();
  EXPECT_EQ(*freed, described->pages_used());
  auto deleted = client.delete_kv_cache(cache);
  ASSERT_TRUE(deleted.ok());
  EXPECT_EQ(*deleted, info->bytes());
  EXPECT_EQ(client.kv_cache_replica(cache), "");
}

TEST(KvClient, PrefillDecodeAndReadKvMatchFloat64) {
  ServerProcess server(ATTND_PATH, {"--backend", "cpu"});
  expect_prefill_decode_read_kv(server);
  EXPECT_EQ(server.stop(), 0);
}

void expect_errors_with_codes(const ServerProcess& server) {
  ClientOptions options;
  options.timeout = std::chrono::seconds(30);
  Client client(server.address(), options);
  std::mt19937_64 rng(testing::seed());
  auto info = client.create_kv_cache(config(1, 64));
  ASSERT_TRUE(info.ok()) << info.status().to_string();
  Tensor q = rows(1, kHq, rng), k = rows(1, kHkv, rng), v = rows(1, kHkv, rng);
  auto unknown_seq = client.decode(info->handle(), 0, {"nobody"}, q, k, v);
  EXPECT_EQ(unknown_seq.status().code(), StatusCode::kNotFound);
  EXPECT_THAT(unknown_seq.status().message(), ::testing::HasSubstr("nobody"));
  EXPECT_EQ(client.decode("no-such-cache", 0, {"a"}, q, k, v).status().code(), StatusCode::kNotFound);
  EXPECT_EQ(client.decode(info->handle(), 1, {"a"}, q, k, v).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(client.prefill(info->handle(), 0, {"a"}, {2}, q, k, v).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(client.read_kv(info->handle(), "nobody", 0).status().code(), StatusCode::kNotFound);
  EXPECT_EQ(client.truncate_sequence(info->handle(), "nobody", 0).status().code(), StatusCode::kNotFound);
  EXPECT_EQ(client.truncate_sequence("no-such-cache", "a", 0).status().code(), StatusCode::kNotFound);
  // A handle placed by hand on a replica that is not there: the call fails there, not elsewhere.
  client.set_kv_cache_replica(info->handle(), "127.0.0.1:1");
  EXPECT_EQ(client.describe_kv_cache(info->handle()).status().code(), StatusCode::kUnavailable);
  client.set_kv_cache_replica(info->handle(), server.address());
  EXPECT_TRUE(client.delete_kv_cache(info->handle()).ok());
}

TEST(KvClient, ErrorsCarryTheServersCode) {
  ServerProcess server(ATTND_PATH, {"--backend", "cpu"});
  expect_errors_with_codes(server);
  EXPECT_EQ(server.stop(), 0);
}

void expect_routes_to_replicas(const ServerProcess& a, const ServerProcess& b) {
  ClientOptions options;
  options.timeout = std::chrono::seconds(30);
  options.load_balancing = "round_robin";
  Client client("ipv4:" + a.address() + "," + b.address(), options);
  std::mt19937_64 rng(testing::seed());

  std::vector<v1::KvCacheInfo> caches;
  std::set<std::string> replicas;
  // round_robin spreads calls over the replicas it is connected to, and the second connection may
  // still be coming up when the first calls go: create until both replicas hold caches (or time runs out).
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (caches.size() < 6 || (replicas.size() < 2 && std::chrono::steady_clock::now() < give_up)) {
    auto info = client.create_kv_cache(config(1, 64));
    ASSERT_TRUE(info.ok()) << info.status().to_string();
    replicas.insert(info->replica());
    caches.push_back(*info);
    if (replicas.size() < 2 && caches.size() >= 6) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  EXPECT_EQ(replicas, (std::set<std::string>{a.address(), b.address()}));
  // Every call on every cache reaches its replica (round_robin alone would miss half of them).
  for (int step = 0; step < 4; ++step)
    for (const auto& info : caches) {
      Tensor q = rows(1, kHq, rng), k = rows(1, kHkv, rng), v = rows(1, kHkv, rng);
      auto r = step == 0 ? client.prefill(info.handle(), 0, {"s"}, {1}, q, k, v)
                         : client.decode(info.handle(), 0, {"s"}, q, k, v);
      ASSERT_TRUE(r.ok()) << r.status().to_string();
      EXPECT_THAT(r->lengths, ::testing::ElementsAre(step + 1));
    }
  // Another client, on replica a only, reaches a cache on b once told where it lives.
  const auto on_b = std::find_if(caches.begin(), caches.end(), [&](auto& c) { return c.replica() == b.address(); });
  ASSERT_NE(on_b, caches.end());
  Client other(a.address(), {});
  EXPECT_EQ(other.describe_kv_cache(on_b->handle()).status().code(), StatusCode::kNotFound);
  other.set_kv_cache_replica(on_b->handle(), b.address());
  auto described = other.describe_kv_cache(on_b->handle());
  ASSERT_TRUE(described.ok()) << described.status().to_string();
  EXPECT_EQ(described->sequence_count(), 1);
  // list_kv_caches(replica) teaches a third client the routes of b's caches.
  Client third(a.address(), {});
  auto listed = third.list_kv_caches(b.address());
  ASSERT_TRUE(listed.ok()) << listed.status().to_string();
  EXPECT_EQ(third.kv_cache_replica(on_b->handle()), b.address());
  auto kv = third.read_kv(on_b->handle(), "s", 0);
  ASSERT_TRUE(kv.ok()) << kv.status().to_string();
  EXPECT_EQ(kv->k.shape(), (Shape{4, kHkv, kD}));
  for (const auto& info : caches) EXPECT_TRUE(client.delete_kv_cache(info.handle()).ok());
}

TEST(KvClient, RoutesEachCacheToItsReplica) {
  ServerProcess a(ATTND_PATH, {"--backend", "cpu"}), b(ATTND_PATH, {"--backend", "cpu"});
  expect_routes_to_replicas(a, b);
  EXPECT_EQ(a.stop(), 0);
  EXPECT_EQ(b.stop(), 0);
}

}  // namespace
}  // namespace attn
