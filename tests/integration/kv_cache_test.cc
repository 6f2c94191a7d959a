// KV caches against the real attnd (CPU backend), through the generated stub: the lifecycle,
// prefill then decode across page boundaries checked against float64 attention over a mirror
// the test keeps of every sequence, ReadKv, Fork with copy-on-write, every bad input (each
// leaving the cache exactly as it was), concurrency on one cache and across caches.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <map>
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

class KvCacheServer : public ::testing::Test {
 protected:
  KvCacheServer() : server_(ATTND_PATH, {"--backend", "cpu"}), client_(server_.address()) {}

  v1::KvCacheInfo create(int layers, int hkv, int d, v1::DType dtype, int page,
                         std::int64_t capacity, grpc::StatusCode want = grpc::StatusCode::OK,
                         const std::string& message = "") {
    v1::CreateKvCacheRequest req;
    auto* c = req.mutable_config();
    c->set_layers(layers);
    c->set_kv_heads(hkv);
    c->set_head_dim(d);
    c->set_dtype(dtype);
    c->set_page_size(page);
    c->set_capacity_tokens(capacity);
    v1::CreateKvCacheResponse resp;
    grpc::ClientContext ctx;
    const grpc::Status s = client_.stub().CreateKvCache(&ctx, req, &resp);
    EXPECT_EQ(s.error_code(), want) << s.error_message();
    if (!message.empty()) {
      EXPECT_THAT(s.error_message(), HasSubstr(message));
    }
    return resp.cache();
  }
  v1::KvCacheInfo describe(const std::string& handle) {
    v1::DescribeKvCacheRequest req;
    req.set_handle(handle);
    v1::DescribeKvCacheResponse resp;
    grpc::ClientContext ctx;
    EXPECT_TRUE(client_.stub().DescribeKvCache(&ctx, req, &resp).ok());
    return resp.cache();
  }
  grpc::Status prefill(const v1::PrefillRequest& req, v1::PrefillResponse* resp) {
    grpc::ClientContext ctx;
    return client_.stub().Prefill(&ctx, req, resp);
  }
  grpc::Status decode(const v1::DecodeRequest& req, v1::DecodeResponse* resp) {
    grpc::ClientContext ctx;
    return client_.stub().Decode(&ctx, req, resp);
  }
  // K and V of one sequence at one layer, through ReadKv.
  std::pair<Tensor, Tensor> read_kv(const std::string& cache, const std::string& id, int layer,
                                    grpc::StatusCode want = grpc::StatusCode::OK) {
    v1::ReadKvRequest req;
    req.set_cache(cache);
    req.set_sequence_id(id);
    req.set_layer(layer);
    req.set_chunk_bytes(1000);  // several chunks, not aligned to rows
    grpc::ClientContext ctx;
    auto reader = client_.stub().ReadKv(&ctx, req);
    v1::ReadKvResponse msg;
    std::string bytes;
    v1::ReadKvHeader header;
    while (reader->Read(&msg)) {
      if (msg.has_header())
        header = msg.header();
      else
        bytes += msg.chunk();
    }
    const grpc::Status s = reader->Finish();
    EXPECT_EQ(s.error_code(), want) << s.error_message();
    if (!s.ok()) return {};
    Tensor k(*wire::from_proto(header.dtype()),
             Shape(header.shape().begin(), header.shape().end()));
    Tensor v(k.dtype(), k.shape());
    EXPECT_EQ(bytes.size(), k.bytes() + v.bytes());
    if (k.bytes() > 0) {  // a layer the sequence has not reached yet holds no rows
      std::memcpy(k.data(), bytes.data(), k.bytes());
      std::memcpy(v.data(), bytes.data() + k.bytes(), v.bytes());
    }
    return {std::move(k), std::move(v)};
  }

  testing::ServerProcess server_;
  Client client_;
};

// Prefill 5 ragged prompts into 2 layers, then decode 20 steps across page boundaries, every
// output against float64 attention over the mirror; ReadKv returns exactly the mirror.
TEST_F(KvCacheServer, PrefillThenDecodeMatchFloat64InEveryDtype) {
  std::mt19937_64 rng(testing::seed());
  for (v1::DType wire_dtype : {v1::D_TYPE_FLOAT32, v1::D_TYPE_FLOAT16, v1::D_TYPE_BFLOAT16}) {
    const DType dt = *wire::from_proto(wire_dtype);
    SCOPED_TRACE(std::string(dtype_name(dt)) + " seed " + std::to_string(testing::seed()));
    const int layers = 2, hkv = 2, hq = 6, d = 32, page = 16;
    const v1::KvCacheInfo cache = create(layers, hkv, d, wire_dtype, page, 4096);
    ASSERT_FALSE(cache.handle().empty());
    EXPECT_FALSE(cache.replica().empty());
    Mirror mirror{hkv, d, {}, {}};
    const std::vector<std::string> ids{"s1", "s15", "s16", "s17", "s1000"};
    const std::vector<std::int64_t> lens{1, 15, 16, 17, 1000};
    const std::int64_t total = 1 + 15 + 16 + 17 + 1000;
    for (int layer = 0; layer < layers; ++layer) {
      Tensor q = random_tensor(dt, {total, hq, d}, rng),
             k = random_tensor(dt, {total, hkv, d}, rng),
             v = random_tensor(dt, {total, hkv, d}, rng);
      v1::PrefillRequest req;
      req.set_cache(cache.handle());
      req.set_layer(layer);
      for (std::size_t i = 0; i < ids.size(); ++i)
        req.add_sequence_ids(ids[i]), req.add_lens(lens[i]);
      *req.mutable_q() = to_wire(q);
      *req.mutable_k() = to_wire(k);
      *req.mutable_v() = to_wire(v);
      v1::PrefillResponse resp;
      const grpc::Status s = prefill(req, &resp);
      ASSERT_TRUE(s.ok()) << s.error_message();
      EXPECT_EQ(resp.timings().kernel(), "paged_prefill/cpu");
      std::int64_t row = 0;
      std::vector<double> want, got;
      const Tensor o = from_wire(resp.o());
      for (std::size_t i = 0; i < ids.size(); ++i) {
        mirror.append(ids[i], layer, layers, k, v, row, lens[i]);
        EXPECT_EQ(resp.lengths(static_cast<int>(i)), lens[i]);
        // A sample of each prompt's rows: the first, the last and a few between.
        for (std::int64_t j : {std::int64_t{0}, lens[i] / 3, lens[i] / 2, lens[i] - 1}) {
          mirror.attend(q, row + j, ids[i], layer, j + 1, want);
          for (std::int64_t e = 0; e < hq * d; ++e)
            got.push_back(o.get(static_cast<std::size_t>((row + j) * hq * d + e)));
        }
        row += lens[i];
      }
      EXPECT_LE(reference::relative_frobenius_error(got, want), reference::tolerance(dt, 1000))
          << "prefill layer " << layer;
    }
    // Decode steps: s15 crosses into its second page at once, s16 at once too, s17 at 32.
    for (int step = 0; step < 20; ++step)
      for (int layer = 0; layer < layers; ++layer) {
        const auto n = static_cast<std::int64_t>(ids.size());
        Tensor q = random_tensor(dt, {n, hq, d}, rng), k = random_tensor(dt, {n, hkv, d}, rng),
               v = random_tensor(dt, {n, hkv, d}, rng);
        v1::DecodeRequest req;
        req.set_cache(cache.handle());
        req.set_layer(layer);
        for (const auto& id : ids) req.add_sequence_ids(id);
        *req.mutable_q() = to_wire(q);
        *req.mutable_k_new() = to_wire(k);
        *req.mutable_v_new() = to_wire(v);
        req.set_return_lse(true);
        v1::DecodeResponse resp;
        const grpc::Status s = decode(req, &resp);
        ASSERT_TRUE(s.ok()) << s.error_message();
        std::vector<double> want;
        for (std::int64_t i = 0; i < n; ++i) {
          mirror.append(ids[static_cast<std::size_t>(i)], layer, layers, k, v, i, 1);
          const std::int64_t len = mirror.length(ids[static_cast<std::size_t>(i)], layer);
          EXPECT_EQ(resp.lengths(static_cast<int>(i)), len);
          mirror.attend(q, i, ids[static_cast<std::size_t>(i)], layer, len, want);
        }
        EXPECT_LE(reference::relative_frobenius_error(from_wire(resp.o()).view(), want),
                  reference::tolerance(dt, 1020))
            << "decode step " << step << " layer " << layer;
        EXPECT_EQ(from_wire(resp.lse()).shape(), (Shape{n, hq}));
        // Where the server's time went: the parts it measured, within its total.
        const v1::Timings& t = resp.timings();
        EXPECT_GT(t.parse_ns(), 0);
        EXPECT_GT(t.prepare_ns(), 0);  // the pages planned
        EXPECT_GT(t.finish_ns(), 0);
        EXPECT_GE(t.receive_ns(), 0);
        EXPECT_EQ(t.issue_ns(), 0);  // the CPU backend issues nothing to a device
        EXPECT_LE(t.receive_ns() + t.parse_ns() + t.queue_ns() + t.prepare_ns() + t.kernel_ns() +
                      t.finish_ns(),
                  t.total_ns());
      }
    // What the server holds is the mirror, bit for bit (both rounded to the dtype once).
    for (const auto& id : ids)
      for (int layer = 0; layer < layers; ++layer) {
        auto [k, v] = read_kv(cache.handle(), id, layer);
        ASSERT_EQ(k.shape(), (Shape{mirror.length(id, layer), hkv, d}));
        const auto& mk = mirror.k[id][static_cast<std::size_t>(layer)];
        const auto& mv = mirror.v[id][static_cast<std::size_t>(layer)];
        bool same = true;
        for (std::size_t e = 0; e < mk.size(); ++e) same &= k.get(e) == mk[e] && v.get(e) == mv[e];
        EXPECT_TRUE(same) << id << " layer " << layer;
      }
    // Pages used = sum of ceil(len / page) over the sequences.
    const v1::KvCacheInfo info = describe(cache.handle());
    std::int64_t pages = 0;
    for (auto l : {21, 35, 36, 37, 1020}) pages += (l + page - 1) / page;
    EXPECT_EQ(info.pages_used(), pages);
    EXPECT_EQ(info.pages_unshared(), pages);
    EXPECT_EQ(info.sequence_count(), 5);
  }
}

TEST_F(KvCacheServer, LifecycleListDescribeDeleteAndQuota) {
  const v1::KvCacheInfo a = create(4, 8, 64, v1::D_TYPE_BFLOAT16, 64, 1000);
  EXPECT_THAT(a.handle(), ::testing::StartsWith("kv-"));
  EXPECT_EQ(a.pages_total(), 16);  // 1000 tokens round up to 16 pages of 64
  EXPECT_EQ(a.config().capacity_tokens(), 1024);
  EXPECT_EQ(a.bytes(), 4 * 2 * 16 * 8 * 64 * 64 * 2);
  EXPECT_EQ(a.pages_free(), 16);
  EXPECT_THAT(a.device(), HasSubstr("cpu"));
  EXPECT_GT(a.expires_unix_ms(), 0);
  const v1::KvCacheInfo b = create(1, 1, 8, v1::D_TYPE_FLOAT32, 0, 5);
  EXPECT_EQ(b.config().page_size(), 16);
  {
    grpc::ClientContext ctx;
    v1::ListKvCachesResponse list;
    ASSERT_TRUE(client_.stub().ListKvCaches(&ctx, {}, &list).ok());
    EXPECT_EQ(list.caches_size(), 2);
    EXPECT_EQ(list.used_bytes(), a.bytes() + b.bytes());
    // Resident tensors share the quota: ListTensors counts the caches too.
    auto tensors = client_.list_tensors();
    ASSERT_TRUE(tensors.ok());
    EXPECT_EQ(tensors->used_bytes(), a.bytes() + b.bytes());
  }
  {
    grpc::ClientContext ctx;
    v1::DeleteKvCacheRequest req;
    req.set_handle(a.handle());
    v1::DeleteKvCacheResponse resp;
    ASSERT_TRUE(client_.stub().DeleteKvCache(&ctx, req, &resp).ok());
    EXPECT_EQ(resp.freed_bytes(), a.bytes());
  }
  {
    grpc::ClientContext ctx;
    v1::DeleteKvCacheRequest req;
    req.set_handle(a.handle());
    v1::DeleteKvCacheResponse resp;
    EXPECT_EQ(client_.stub().DeleteKvCache(&ctx, req, &resp).error_code(),
              grpc::StatusCode::NOT_FOUND);
  }
  {
    grpc::ClientContext ctx;
    v1::DescribeKvCacheRequest req;
    req.set_handle(a.handle());
    v1::DescribeKvCacheResponse resp;
    EXPECT_EQ(client_.stub().DescribeKvCache(&ctx, req, &resp).error_code(),
              grpc::StatusCode::NOT_FOUND);
  }
  // Bad configurations, each named.
  create(0, 1, 8, v1::D_TYPE_FLOAT32, 16, 16, grpc::StatusCode::INVALID_ARGUMENT, "config.layers");
  create(1, 0, 8, v1::D_TYPE_FLOAT32, 16, 16, grpc::StatusCode::INVALID_ARGUMENT,
         "config.kv_heads");
  create(1, 1, 0, v1::D_TYPE_FLOAT32, 16, 16, grpc::StatusCode::INVALID_ARGUMENT,
         "config.head_dim");
  create(1, 1, 8, v1::D_TYPE_UNSPECIFIED, 16, 16, grpc::StatusCode::INVALID_ARGUMENT,
         "config.dtype");
  create(1, 1, 8, v1::D_TYPE_FLOAT32, 24, 16, grpc::StatusCode::INVALID_ARGUMENT,
         "config.page_size");
  create(1, 1, 8, v1::D_TYPE_FLOAT32, 16, 0, grpc::StatusCode::INVALID_ARGUMENT,
         "config.capacity_tokens");
  // Positions are int32: 2^31-1 tokens round up past it in pages of 16.
  create(1, 1, 1, v1::D_TYPE_FLOAT32, 16, 2147483647, grpc::StatusCode::INVALID_ARGUMENT,
         "config.capacity_tokens");
  // Over the memory quota (8 GiB by default): refused before any memory is taken.
  create(64, 8, 128, v1::D_TYPE_FLOAT32, 16, 1 << 20, grpc::StatusCode::RESOURCE_EXHAUSTED,
         "quota");
}

TEST_F(KvCacheServer, TimeToLiveExpiresAnIdleCache) {
  v1::CreateKvCacheRequest req;
  auto* c = req.mutable_config();
  c->set_layers(1);
  c->set_kv_heads(1);
  c->set_head_dim(8);
  c->set_dtype(v1::D_TYPE_FLOAT32);
  c->set_capacity_tokens(16);
  req.set_ttl_ms(300);
  v1::CreateKvCacheResponse resp;
  {
    grpc::ClientContext ctx;
    ASSERT_TRUE(client_.stub().CreateKvCache(&ctx, req, &resp).ok());
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(600));
  grpc::ClientContext ctx;
  v1::DescribeKvCacheRequest d;
  d.set_handle(resp.cache().handle());
  v1::DescribeKvCacheResponse out;
  EXPECT_EQ(client_.stub().DescribeKvCache(&ctx, d, &out).error_code(),
            grpc::StatusCode::NOT_FOUND);
}

// A cache whose time to live has passed gives its memory and quota back by itself: a resident
// tensor that needs the quota gets it without anyone touching the cache.
TEST(KvCacheQuota, AnExpiredCacheGivesItsQuotaBack) {
  testing::ServerProcess server(ATTND_PATH, {"--backend", "cpu", "--tensor-quota-mb", "1"});
  Client client(server.address());
  v1::CreateKvCacheRequest req;
  auto* c = req.mutable_config();
  c->set_layers(2);
  c->set_kv_heads(2);
  c->set_head_dim(64);
  c->set_dtype(v1::D_TYPE_FLOAT32);
  c->set_capacity_tokens(512);  // 2 x 2 x 512 x 2 x 64 x 4 = 1 MiB: the whole quota
  req.set_ttl_ms(1500);         // long enough for the refused put below, in any build
  v1::CreateKvCacheResponse resp;
  {
    grpc::ClientContext ctx;
    const grpc::Status s = client.stub().CreateKvCache(&ctx, req, &resp);
    ASSERT_TRUE(s.ok()) << s.error_message();
  }
  Tensor t(DType::kFloat32, {256, 256});  // 256 KiB
  EXPECT_EQ(client.put_tensor(t).status().code(), StatusCode::kResourceExhausted)
      << "the cache holds the quota";
  std::this_thread::sleep_for(std::chrono::milliseconds(2500));
  auto put = client.put_tensor(t);
  EXPECT_TRUE(put.ok()) << put.status().to_string();
}

// Fork shares the full pages and copies only the partial last one; the two sequences then go
// their own ways without touching each other's rows; release frees a shared page with its last
// holder only.
TEST_F(KvCacheServer, ForkSharesFullPagesAndCopiesThePartialOne) {
  std::mt19937_64 rng(testing::seed());
  const int hkv = 2, hq = 4, d = 16, page = 16;
  const v1::KvCacheInfo cache = create(2, hkv, d, v1::D_TYPE_FLOAT32, page, 4096);
  Mirror mirror{hkv, d, {}, {}};
  const std::int64_t len = 1000;  // 62 full pages and 8 tokens
  for (int layer = 0; layer < 2; ++layer) {
    Tensor q = random_tensor(DType::kFloat32, {len, hq, d}, rng),
           k = random_tensor(DType::kFloat32, {len, hkv, d}, rng),
           v = random_tensor(DType::kFloat32, {len, hkv, d}, rng);
    v1::PrefillRequest req;
    req.set_cache(cache.handle());
    req.set_layer(layer);
    req.add_sequence_ids("root");
    req.add_lens(len);
    *req.mutable_q() = to_wire(q);
    *req.mutable_k() = to_wire(k);
    *req.mutable_v() = to_wire(v);
    v1::PrefillResponse resp;
    ASSERT_TRUE(prefill(req, &resp).ok());
    mirror.append("root", layer, 2, k, v, 0, len);
  }
  const std::int64_t used_before = describe(cache.handle()).pages_used();
  EXPECT_EQ(used_before, 63);
  v1::ForkSequenceResponse fork;
  {
    grpc::ClientContext ctx;
    v1::ForkSequenceRequest req;
    req.set_cache(cache.handle());
    req.set_source_id("root");
    req.set_new_id("child");
    ASSERT_TRUE(client_.stub().ForkSequence(&ctx, req, &fork).ok());
  }
  EXPECT_EQ(fork.copied_pages(), 1);
  EXPECT_EQ(fork.sequence().pages(), 63);
  EXPECT_EQ(fork.sequence().shared_pages(), 62);
  EXPECT_EQ(describe(cache.handle()).pages_used(), used_before + 1) << "a fork costs one page";
  mirror.k["child"] = mirror.k["root"];
  mirror.v["child"] = mirror.v["root"];
  // Both decode 30 steps with different rows, crossing a page boundary; each sees only its own.
  for (int step = 0; step < 30; ++step)
    for (int layer = 0; layer < 2; ++layer) {
      Tensor q = random_tensor(DType::kFloat32, {2, hq, d}, rng),
             k = random_tensor(DType::kFloat32, {2, hkv, d}, rng),
             v = random_tensor(DType::kFloat32, {2, hkv, d}, rng);
      v1::DecodeRequest req;
      req.set_cache(cache.handle());
      req.set_layer(layer);
      req.add_sequence_ids("child");
      req.add_sequence_ids("root");
      *req.mutable_q() = to_wire(q);
      *req.mutable_k_new() = to_wire(k);
      *req.mutable_v_new() = to_wire(v);
      v1::DecodeResponse resp;
      ASSERT_TRUE(decode(req, &resp).ok());
      mirror.append("child", layer, 2, k, v, 0, 1);
      mirror.append("root", layer, 2, k, v, 1, 1);
      std::vector<double> want;
      mirror.attend(q, 0, "child", layer, mirror.length("child", layer), want);
      mirror.attend(q, 1, "root", layer, mirror.length("root", layer), want);
      EXPECT_LE(reference::relative_frobenius_error(from_wire(resp.o()).view(), want),
                reference::tolerance(DType::kFloat32, 1030));
    }
  for (const char* id : {"root", "child"}) {
    auto [k, v] = read_kv(cache.handle(), id, 1);
    const auto& mk = mirror.k[id][1];
    bool same = k.numel() == static_cast<std::int64_t>(mk.size());
    for (std::size_t e = 0; same && e < mk.size(); ++e) same &= k.get(e) == mk[e];
    EXPECT_TRUE(same) << id;
  }
  // Releasing the root frees only its own pages; the shared ones stay with the child.
  v1::ReleaseSequencesResponse released;
  {
    grpc::ClientContext ctx;
    v1::ReleaseSequencesRequest req;
    req.set_cache(cache.handle());
    req.add_sequence_ids("root");
    ASSERT_TRUE(client_.stub().ReleaseSequences(&ctx, req, &released).ok());
  }
  // 1030 tokens each: 65 pages, 62 of them shared. The root's own 3 go; 62 + 3 stay the child's.
  EXPECT_EQ(released.freed_pages(), 3);
  EXPECT_EQ(describe(cache.handle()).pages_used(), 65);
  {
    grpc::ClientContext ctx;
    v1::ReleaseSequencesRequest req;
    req.set_cache(cache.handle());
    req.add_sequence_ids("child");
    ASSERT_TRUE(client_.stub().ReleaseSequences(&ctx, req, &released).ok());
  }
  EXPECT_EQ(released.freed_pages(), 65);
  EXPECT_EQ(describe(cache.handle()).pages_used(), 0);
}

// Every bad call gets its status naming the field, and leaves the cache as it was: the same
// pages, lengths and bytes (ReadKv) before and after.
TEST_F(KvCacheServer, BadCallsFailAloneAndChangeNothing) {
  std::mt19937_64 rng(testing::seed());
  const int hkv = 2, hq = 4, d = 8, page = 16;
  const v1::KvCacheInfo cache = create(2, hkv, d, v1::D_TYPE_FLOAT32, page, 64);  // 4 pages
  auto good_prefill = [&](const std::string& id, std::int64_t n, int layer) {
    v1::PrefillRequest req;
    req.set_cache(cache.handle());
    req.set_layer(layer);
    req.add_sequence_ids(id);
    req.add_lens(n);
    *req.mutable_q() = to_wire(random_tensor(DType::kFloat32, {n, hq, d}, rng));
    *req.mutable_k() = to_wire(random_tensor(DType::kFloat32, {n, hkv, d}, rng));
    *req.mutable_v() = to_wire(random_tensor(DType::kFloat32, {n, hkv, d}, rng));
    return req;
  };
  auto good_decode = [&](const std::vector<std::string>& ids, int layer) {
    v1::DecodeRequest req;
    req.set_cache(cache.handle());
    req.set_layer(layer);
    for (const auto& id : ids) req.add_sequence_ids(id);
    const auto n = static_cast<std::int64_t>(ids.size());
    *req.mutable_q() = to_wire(random_tensor(DType::kFloat32, {n, hq, d}, rng));
    *req.mutable_k_new() = to_wire(random_tensor(DType::kFloat32, {n, hkv, d}, rng));
    *req.mutable_v_new() = to_wire(random_tensor(DType::kFloat32, {n, hkv, d}, rng));
    return req;
  };
  v1::PrefillResponse presp;
  ASSERT_TRUE(prefill(good_prefill("a", 30, 0), &presp).ok());
  ASSERT_TRUE(prefill(good_prefill("a", 30, 1), &presp).ok());
  ASSERT_TRUE(prefill(good_prefill("b", 20, 0), &presp).ok());  // 2 + 2 pages: the cache is full

  auto snapshot = [&] {
    std::string s = describe(cache.handle()).DebugString();
    for (const char* id : {"a", "b"})
      for (int layer = 0; layer < 2; ++layer) {
        auto [k, v] = read_kv(cache.handle(), id, layer);
        s.append(static_cast<const char*>(k.data()), k.bytes());
        s.append(static_cast<const char*>(v.data()), v.bytes());
      }
    // expires_unix_ms moves with every use: not part of the state compared.
    return s;
  };
  auto strip_expiry = [](std::string s) {
    const auto at = s.find("expires_unix_ms");
    if (at != std::string::npos) s.erase(at, s.find('\n', at) - at);
    return s;
  };
  const std::string before = strip_expiry(snapshot());

  struct Case {
    std::string what;
    std::function<grpc::Status()> call;
    grpc::StatusCode code;
    std::string message;
  };
  std::vector<Case> cases;
  auto decode_case = [&](std::string what, std::function<void(v1::DecodeRequest&)> edit,
                         grpc::StatusCode code, std::string message) {
    v1::DecodeRequest req = good_decode({"a", "b"}, 0);
    edit(req);
    cases.push_back({std::move(what),
                     [this, req] {
                       v1::DecodeResponse resp;
                       return decode(req, &resp);
                     },
                     code, std::move(message)});
  };
  auto prefill_case = [&](std::string what, std::function<void(v1::PrefillRequest&)> edit,
                          grpc::StatusCode code, std::string message) {
    v1::PrefillRequest req = good_prefill("a", 3, 0);
    edit(req);
    cases.push_back({std::move(what),
                     [this, req] {
                       v1::PrefillResponse resp;
                       return prefill(req, &resp);
                     },
                     code, std::move(message)});
  };
  using C = grpc::StatusCode;
  // b at layer 0 holds 20 tokens in 2 pages, a 30 in 2: decoding a at layer 0 fits (31 <= 32), but
  // b needs nothing new either; a prefill of 3 more onto a (33) needs a page the cache does not
  // have.
  prefill_case(
      "capacity", [](auto&) {}, C::RESOURCE_EXHAUSTED, "capacity");
  prefill_case(
      "a new sequence over capacity", [&](auto& r) { r = good_prefill("c", 1, 0); },
      C::RESOURCE_EXHAUSTED, "capacity");
  prefill_case(
      "longer than the cache", [&](auto& r) { r = good_prefill("c", 65, 0); },
      C::RESOURCE_EXHAUSTED, "capacity");
  decode_case(
      "unknown sequence", [](auto& r) { r.set_sequence_ids(1, "zz"); }, C::NOT_FOUND,
      "sequence_ids[1]");
  decode_case(
      "duplicate sequence", [](auto& r) { r.set_sequence_ids(1, "a"); }, C::INVALID_ARGUMENT,
      "appears twice");
  decode_case(
      "empty id", [](auto& r) { r.set_sequence_ids(0, ""); }, C::INVALID_ARGUMENT,
      "sequence_ids[0]");
  decode_case(
      "no sequences", [](auto& r) { r.clear_sequence_ids(); }, C::INVALID_ARGUMENT, "sequence_ids");
  decode_case(
      "layer out of range", [](auto& r) { r.set_layer(2); }, C::INVALID_ARGUMENT, "layer");
  decode_case(
      "negative layer", [](auto& r) { r.set_layer(-1); }, C::INVALID_ARGUMENT, "layer");
  decode_case(
      "unknown cache", [](auto& r) { r.set_cache("kv-nope"); }, C::NOT_FOUND, "cache");
  decode_case(
      "Hq not a multiple of Hkv",
      [&](auto& r) {
        *r.mutable_q() = to_wire(random_tensor(DType::kFloat32, {2, 3, d}, rng));
      },
      C::INVALID_ARGUMENT, "q.shape");
  decode_case(
      "q rows != sequences",
      [&](auto& r) {
        *r.mutable_q() = to_wire(random_tensor(DType::kFloat32, {3, hq, d}, rng));
      },
      C::INVALID_ARGUMENT, "q.shape");
  decode_case(
      "head dim",
      [&](auto& r) {
        *r.mutable_q() = to_wire(random_tensor(DType::kFloat32, {2, hq, 16}, rng));
      },
      C::INVALID_ARGUMENT, "q.shape");
  decode_case(
      "dtype",
      [&](auto& r) {
        *r.mutable_q() = to_wire(random_tensor(DType::kFloat16, {2, hq, d}, rng));
      },
      C::INVALID_ARGUMENT, "q.dtype");
  decode_case(
      "k_new heads",
      [&](auto& r) {
        *r.mutable_k_new() = to_wire(random_tensor(DType::kFloat32, {2, 1, d}, rng));
      },
      C::INVALID_ARGUMENT, "k_new.shape");
  decode_case(
      "v_new missing", [](auto& r) { r.clear_v_new(); }, C::INVALID_ARGUMENT, "v_new");
  decode_case(
      "v_new bytes", [](auto& r) { r.mutable_v_new()->mutable_data()->pop_back(); },
      C::INVALID_ARGUMENT, "v_new");
  decode_case(
      "handle input", [](auto& r) { r.mutable_q()->set_handle("t-x"); }, C::INVALID_ARGUMENT, "q");
  decode_case(
      "scale", [](auto& r) { r.set_scale(NAN); }, C::INVALID_ARGUMENT, "scale");
  decode_case(
      "kernel", [](auto& r) { r.set_kernel("paged_decode/none"); }, C::INVALID_ARGUMENT, "kernel");
  prefill_case(
      "lens count", [](auto& r) { r.add_lens(1); }, C::INVALID_ARGUMENT, "lens");
  prefill_case(
      "lens zero", [](auto& r) { r.set_lens(0, 0); }, C::INVALID_ARGUMENT, "lens[0]");
  prefill_case(
      "lens sum != rows", [](auto& r) { r.set_lens(0, 2); }, C::INVALID_ARGUMENT, "q.shape");
  prefill_case(
      "k rows",
      [&](auto& r) {
        *r.mutable_k() = to_wire(random_tensor(DType::kFloat32, {2, hkv, d}, rng));
      },
      C::INVALID_ARGUMENT, "k.shape");
  for (const Case& c : cases) {
    const grpc::Status s = c.call();
    EXPECT_EQ(s.error_code(), c.code) << c.what << ": " << s.error_message();
    EXPECT_THAT(s.error_message(), HasSubstr(c.message)) << c.what;
  }
  // A fork that needs a page the cache does not have, into an existing id, from an unknown one.
  for (auto [from, to, code] :
       {std::tuple{"a", "a2", C::RESOURCE_EXHAUSTED}, std::tuple{"a", "b", C::INVALID_ARGUMENT},
        std::tuple{"zz", "a3", C::NOT_FOUND}}) {
    grpc::ClientContext ctx;
    v1::ForkSequenceRequest req;
    req.set_cache(cache.handle());
    req.set_source_id(from);
    req.set_new_id(to);
    v1::ForkSequenceResponse resp;
    EXPECT_EQ(client_.stub().ForkSequence(&ctx, req, &resp).error_code(), code)
        << from << " -> " << to;
  }
  {  // Releasing a known and an unknown id releases neither.
    grpc::ClientContext ctx;
    v1::ReleaseSequencesRequest req;
    req.set_cache(cache.handle());
    req.add_sequence_ids("a");
    req.add_sequence_ids("zz");
    v1::ReleaseSequencesResponse resp;
    EXPECT_EQ(client_.stub().ReleaseSequences(&ctx, req, &resp).error_code(), C::NOT_FOUND);
  }
  read_kv(cache.handle(), "zz", 0, C::NOT_FOUND);
  read_kv(cache.handle(), "a", 2, C::INVALID_ARGUMENT);
  EXPECT_EQ(strip_expiry(snapshot()), before) << "a failed call changed the cache";
  // And the cache still serves.
  v1::DecodeResponse dresp;
  const grpc::Status ok = decode(good_decode({"a"}, 0), &dresp);
  EXPECT_TRUE(ok.ok()) << ok.error_message();
}

// Calls on one cache from many threads are applied one at a time: every append lands, none is
// lost or doubled; calls on different caches run side by side.
TEST_F(KvCacheServer, ConcurrentCallsOnOneCacheAndAcrossCaches) {
  const int hkv = 1, hq = 2, d = 8, threads = 8, steps = 20;
  const v1::KvCacheInfo shared = create(1, hkv, d, v1::D_TYPE_FLOAT32, 16, 4096);
  const v1::KvCacheInfo other = create(1, hkv, d, v1::D_TYPE_FLOAT32, 16, 4096);
  std::atomic<int> failures{0};
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t)
    pool.emplace_back([&, t] {
      std::mt19937_64 rng(testing::seed() + static_cast<std::uint64_t>(t));
      const std::string& handle = t % 2 ? other.handle() : shared.handle();
      const std::string id = "t" + std::to_string(t);
      for (int s = 0; s < steps; ++s) {
        v1::PrefillRequest
            req;  // a sequence of its own (created by the first call), and a shared one
        req.set_cache(handle);
        req.add_sequence_ids(id);
        req.add_lens(1);
        req.add_sequence_ids("common");
        req.add_lens(1);
        *req.mutable_q() = to_wire(random_tensor(DType::kFloat32, {2, hq, d}, rng));
        *req.mutable_k() = to_wire(random_tensor(DType::kFloat32, {2, hkv, d}, rng));
        *req.mutable_v() = to_wire(random_tensor(DType::kFloat32, {2, hkv, d}, rng));
        v1::PrefillResponse resp;
        if (!prefill(req, &resp).ok()) ++failures;
      }
    });
  for (auto& t : pool) t.join();
  EXPECT_EQ(failures.load(), 0);
  for (const auto* cache : {&shared, &other}) {
    const v1::KvCacheInfo info = describe(cache->handle());
    EXPECT_EQ(info.sequence_count(), threads / 2 + 1);
    for (const auto& s : info.sequences())
      EXPECT_EQ(s.lengths(0), s.id() == "common" ? steps * threads / 2 : steps) << s.id();
  }
}

TEST_F(KvCacheServer, ListKernelsShowsTheKvOps) {
  auto k = client_.list_kernels("paged_decode");
  ASSERT_TRUE(k.ok()) << k.status().to_string();
  ASSERT_GE(k->kernels_size(), 1);
  EXPECT_EQ(k->kernels(0).op(), "paged_decode");
  k = client_.list_kernels("paged_prefill");
  ASSERT_TRUE(k.ok());
  EXPECT_GE(k->kernels_size(), 1);
}

}  // namespace
}  // namespace attn
