// Decode and Prefill with their outputs in registered shared memory (output_shm), against the real
// attnd (CPU backend, --shared-memory system): the same bits as the inline path whatever mix of
// inputs and outputs sits in a region (several sequences, GQA, the LSE, 1, 7 and 33 tokens),
// outputs poisoned before each call; every bad output reference refused by name with the cache
// left as it was; a repeated exactly-once call writing the recorded outputs into the regions the
// repeat names; merged launches writing each call's rows into its own region.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <cmath>
#include <cstring>
#include <map>
#include <memory>
#include <thread>

#include "attn/client.h"
#include "attn/wire.h"
#include "support/random.h"
#include "support/server_process.h"

namespace attn {
namespace {

using ::testing::HasSubstr;
using testing::random_tensor;

const std::vector<std::string> kShm = {"--backend", "cpu", "--shared-memory", "system"};

constexpr int kLayers = 2, kHkv = 2, kHq = 6, kD = 24;  // GQA: 3 query heads per KV head

bool same_bytes(const Tensor& a, const Tensor& b) {
  return a.bytes() == b.bytes() && std::memcmp(a.data(), b.data(), a.bytes()) == 0;
}

// A shared-memory buffer registered as one region, handed out front to back.
struct Region {
  SharedMemoryBuffer buf;
  std::string name;
  std::int64_t used = 0;

  Region(Client& c, const std::string& region, std::size_t bytes) : name(region) {
    auto b = SharedMemoryBuffer::create(bytes);
    if (!b.ok()) throw std::runtime_error(b.status().to_string());
    buf = std::move(b).value();
    auto info = c.register_shared_memory(name, buf.key(), 0, static_cast<std::int64_t>(bytes));
    if (!info.ok()) throw std::runtime_error(info.status().to_string());
  }
  char* at(std::int64_t offset) const { return static_cast<char*>(buf.data()) + offset; }
  // Room for `bytes`, 64-byte aligned, poisoned (all ones: NaN in every float dtype).
  std::int64_t alloc(std::size_t bytes) {
    const std::int64_t offset = used;
    used += (static_cast<std::int64_t>(bytes) + 63) / 64 * 64;
    if (static_cast<std::size_t>(used) > buf.size()) throw std::runtime_error("region full");
    std::memset(at(offset), 0xff, bytes);
    return offset;
  }
  std::int64_t put(const Tensor& t) {
    const std::int64_t offset = alloc(t.bytes());
    std::memcpy(at(offset), t.data(), t.bytes());
    return offset;
  }
  Tensor read(std::int64_t offset, DType dtype, const Shape& shape) const {
    Tensor t(dtype, shape);
    std::memcpy(t.data(), at(offset), t.bytes());
    return t;
  }
};

v1::KvCacheConfig config(DType dtype) {
  v1::KvCacheConfig c;
  c.set_layers(kLayers);
  c.set_kv_heads(kHkv);
  c.set_head_dim(kD);
  c.set_dtype(wire::to_proto(dtype));
  c.set_page_size(16);
  c.set_capacity_tokens(1024);
  return c;
}

// Each sequence's lengths per layer, from DescribeKvCache.
std::map<std::string, std::vector<std::int64_t>> lengths_of(Client& c, const std::string& cache) {
  auto info = c.describe_kv_cache(cache);
  EXPECT_TRUE(info.ok()) << info.status().to_string();
  std::map<std::string, std::vector<std::int64_t>> out;
  if (!info.ok()) return out;
  for (const auto& s : info->sequences()) out[s.id()] = {s.lengths().begin(), s.lengths().end()};
  return out;
}

// One call's inputs: q [rows, Hq, D], k and v [rows, Hkv, D].
struct Inputs {
  Tensor q, k, v;
  Inputs(DType dtype, std::int64_t rows, std::mt19937_64& rng)
      : q(random_tensor(dtype, {rows, kHq, kD}, rng)),
        k(random_tensor(dtype, {rows, kHkv, kD}, rng)),
        v(random_tensor(dtype, {rows, kHkv, kD}, rng)) {}
};

// Two caches of one configuration, one driven inline and one through the region, with the same
// calls: every output of the region's must equal the inline one's, bit for bit.
void check_equal_to_inline(DType dtype) {
  testing::ServerProcess server(ATTND_PATH, kShm);
  Client client(server.address());
  std::mt19937_64 rng(testing::seed());
  SCOPED_TRACE("seed " + std::to_string(testing::seed()) + ", " + std::string(dtype_name(dtype)));
  auto inline_cache = client.create_kv_cache(config(dtype));
  auto shm_cache = client.create_kv_cache(config(dtype));
  ASSERT_TRUE(inline_cache.ok() && shm_cache.ok());
  Region r(client, "kv", 4 << 20);
  const std::vector<std::string> ids = {"a", "b", "c"};
  const std::vector<std::int64_t> lens = {1, 7, 33};
  const std::int64_t rows = 41;

  // Prefill of 1, 7 and 33 tokens with the LSE, inputs and outputs in the region.
  for (int layer = 0; layer < kLayers; ++layer) {
    Inputs in(dtype, rows, rng);
    PrefillOptions opts;
    opts.return_lse = true;
    auto want = client.prefill(inline_cache->handle(), layer, ids, lens, in.q, in.k, in.v, opts);
    ASSERT_TRUE(want.ok()) << want.status().to_string();
    const std::int64_t offsets[3] = {r.put(in.q), r.put(in.k), r.put(in.v)};
    const std::int64_t o_at = r.alloc(in.q.bytes()), lse_at = r.alloc(rows * kHq * 4);
    auto got = client.prefill_shm(shm_cache->handle(), layer, ids, lens, "kv", r.buf, dtype,
                                  in.q.shape(), in.k.shape(), offsets, o_at, opts, true, lse_at);
    ASSERT_TRUE(got.ok()) << got.status().to_string();
    EXPECT_TRUE(same_bytes(got->output, want->output)) << "prefill o, layer " << layer;
    EXPECT_TRUE(same_bytes(got->lse, want->lse)) << "prefill lse, layer " << layer;
    EXPECT_EQ(got->lengths, want->lengths);
    EXPECT_EQ(got->timings.kernel(), want->timings.kernel());
  }
  // Decode steps, all in the region; then o in the region with the LSE inline, then o inline
  // with the LSE in the region, by hand (an entry with no region leaves its output inline).
  for (int step = 0; step < 3; ++step)
    for (int layer = 0; layer < kLayers; ++layer) {
      Inputs in(dtype, 3, rng);
      DecodeOptions opts;
      opts.return_lse = true;
      auto want = client.decode(inline_cache->handle(), layer, ids, in.q, in.k, in.v, opts);
      ASSERT_TRUE(want.ok()) << want.status().to_string();
      const std::int64_t offsets[3] = {r.put(in.q), r.put(in.k), r.put(in.v)};
      const std::int64_t o_at = r.alloc(in.q.bytes()), lse_at = r.alloc(3 * kHq * 4);
      Result<KvOpResult> got = invalid_argument("unset");
      if (step == 0) {
        got = client.decode_shm(shm_cache->handle(), layer, ids, "kv", r.buf, dtype, in.q.shape(),
                                in.k.shape(), offsets, o_at, opts, true, lse_at);
      } else if (step == 1) {
        got = client.decode_shm(shm_cache->handle(), layer, ids, "kv", r.buf, dtype, in.q.shape(),
                                in.k.shape(), offsets, o_at, opts, true, -1);
      } else {
        v1::DecodeRequest req;
        req.set_cache(shm_cache->handle());
        req.set_layer(layer);
        for (const auto& id : ids) req.add_sequence_ids(id);
        wire::encode_tensor(in.q.view(), req.mutable_q());
        *req.mutable_k_new() = Client::in_shared_memory(dtype, in.k.shape(), "kv", offsets[1]);
        wire::encode_tensor(in.v.view(), req.mutable_v_new());
        req.set_return_lse(true);
        req.add_output_shm();  // o inline
        *req.add_output_shm() = Client::shared_memory_ref("kv", lse_at);
        v1::DecodeResponse resp;
        const Status s =
            wire::from_grpc(client.stub().Decode(client.make_context(req).get(), req, &resp));
        ASSERT_TRUE(s.ok()) << s.to_string();
        EXPECT_FALSE(resp.o().has_shm());
        EXPECT_TRUE(resp.lse().has_shm());
        EXPECT_TRUE(resp.lse().data().empty()) << "an output in a region has no bytes inline";
        EXPECT_EQ(resp.lse().shm().offset(), lse_at);
        EXPECT_EQ(resp.lse().shm().bytes(), 3 * kHq * 4);
        KvOpResult result;
        result.output = Tensor(dtype, in.q.shape());
        ASSERT_EQ(resp.o().data().size(), result.output.bytes());
        std::memcpy(result.output.data(), resp.o().data().data(), result.output.bytes());
        result.lse = r.read(lse_at, DType::kFloat32, {3, kHq});
        result.lengths.assign(resp.lengths().begin(), resp.lengths().end());
        got = std::move(result);
      }
      ASSERT_TRUE(got.ok()) << got.status().to_string();
      EXPECT_TRUE(same_bytes(got->output, want->output)) << "step " << step << " layer " << layer;
      EXPECT_TRUE(same_bytes(got->lse, want->lse)) << "step " << step << " layer " << layer;
      EXPECT_EQ(got->lengths, want->lengths);
    }
  EXPECT_EQ(lengths_of(client, shm_cache->handle()), lengths_of(client, inline_cache->handle()));
}

TEST(KvSharedMemory, Float32EqualsTheInlinePath) { check_equal_to_inline(DType::kFloat32); }
TEST(KvSharedMemory, Bfloat16EqualsTheInlinePath) { check_equal_to_inline(DType::kBFloat16); }

TEST(KvSharedMemory, ResponseNamesWhereTheOutputsWent) {
  testing::ServerProcess server(ATTND_PATH, kShm);
  Client client(server.address());
  std::mt19937_64 rng(testing::seed());
  auto cache = client.create_kv_cache(config(DType::kFloat32));
  ASSERT_TRUE(cache.ok());
  Region r(client, "out", 1 << 20);
  Inputs in(DType::kFloat32, 7, rng);
  v1::PrefillRequest req;
  req.set_cache(cache->handle());
  req.add_sequence_ids("s");
  req.add_lens(7);
  wire::encode_tensor(in.q.view(), req.mutable_q());
  wire::encode_tensor(in.k.view(), req.mutable_k());
  wire::encode_tensor(in.v.view(), req.mutable_v());
  req.set_return_lse(true);
  req.set_return_values(true);  // no effect on outputs in a region: they have no bytes here
  const std::int64_t o_at = r.alloc(in.q.bytes()), lse_at = r.alloc(7 * kHq * 4);
  *req.add_output_shm() = Client::shared_memory_ref("out", o_at);
  *req.add_output_shm() = Client::shared_memory_ref("out", lse_at);
  v1::PrefillResponse resp;
  ASSERT_TRUE(
      wire::from_grpc(client.stub().Prefill(client.make_context(req).get(), req, &resp)).ok());
  for (const v1::Tensor* t : {&resp.o(), &resp.lse()}) {
    EXPECT_TRUE(t->has_shm());
    EXPECT_EQ(t->shm().region(), "out");
    EXPECT_TRUE(t->data().empty());
    EXPECT_EQ(t->values_size(), 0);
  }
  EXPECT_EQ(resp.o().dtype(), v1::D_TYPE_FLOAT32);
  EXPECT_THAT(std::vector<std::int64_t>(resp.o().shape().begin(), resp.o().shape().end()),
              ::testing::ElementsAre(7, kHq, kD));
  EXPECT_THAT(std::vector<std::int64_t>(resp.lse().shape().begin(), resp.lse().shape().end()),
              ::testing::ElementsAre(7, kHq));
  EXPECT_EQ(resp.o().shm().offset(), o_at);
  EXPECT_EQ(resp.o().shm().bytes(), static_cast<std::int64_t>(in.q.bytes()));
  const Tensor o = r.read(o_at, DType::kFloat32, {7, kHq, kD});
  for (std::int64_t i = 0; i < o.numel(); ++i)
    ASSERT_TRUE(std::isfinite(o.get(static_cast<std::size_t>(i)))) << "o[" << i << "] unwritten";
}

// Every bad output reference: refused with its code and a message naming output_shm, what was
// expected and what came; the cache as it was (no append, no new sequence).
TEST(KvSharedMemory, BadOutputRegionsAreRefusedAndAppendNothing) {
  testing::ServerProcess server(ATTND_PATH, kShm);
  Client client(server.address());
  std::mt19937_64 rng(testing::seed());
  auto cache = client.create_kv_cache(config(DType::kFloat32));
  ASSERT_TRUE(cache.ok());
  const std::string handle = cache->handle();
  Region r(client, "small", 4096);
  Region gone(client, "gone", 1 << 20);
  {
    Inputs in(DType::kFloat32, 5, rng);
    for (int layer = 0; layer < kLayers; ++layer)
      ASSERT_TRUE(client.prefill(handle, layer, {"s"}, {5}, in.q, in.k, in.v).ok());
  }
  const auto before = lengths_of(client, handle);
  ASSERT_EQ(before.at("s"), (std::vector<std::int64_t>{5, 5}));

  Inputs one(DType::kFloat32, 1, rng);
  auto decode_with = [&](std::vector<v1::SharedMemoryRef> refs, bool lse,
                         std::vector<std::int64_t> expected = {}) {
    v1::DecodeRequest req;
    req.set_cache(handle);
    req.set_layer(1);
    req.add_sequence_ids("s");
    wire::encode_tensor(one.q.view(), req.mutable_q());
    wire::encode_tensor(one.k.view(), req.mutable_k_new());
    wire::encode_tensor(one.v.view(), req.mutable_v_new());
    req.set_return_lse(lse);
    for (auto& ref : refs) *req.add_output_shm() = ref;
    req.mutable_expected_lengths()->Assign(expected.begin(), expected.end());
    v1::DecodeResponse resp;
    return wire::from_grpc(client.stub().Decode(client.make_context(req).get(), req, &resp));
  };
  auto prefill_with = [&](std::vector<v1::SharedMemoryRef> refs, bool lse) {
    Inputs in(DType::kFloat32, 7, rng);
    v1::PrefillRequest req;
    req.set_cache(handle);
    req.set_layer(0);
    req.add_sequence_ids("s");
    req.add_sequence_ids("new");
    req.add_lens(3);
    req.add_lens(4);
    wire::encode_tensor(in.q.view(), req.mutable_q());
    wire::encode_tensor(in.k.view(), req.mutable_k());
    wire::encode_tensor(in.v.view(), req.mutable_v());
    req.set_return_lse(lse);
    for (auto& ref : refs) *req.add_output_shm() = ref;
    v1::PrefillResponse resp;
    return wire::from_grpc(client.stub().Prefill(client.make_context(req).get(), req, &resp));
  };
  const std::int64_t o_bytes = kHq * kD * 4;  // one row of o: 576 bytes

  struct Case {
    const char* what;
    Status got;
    StatusCode code;
    std::vector<std::string> message;
  };
  std::vector<Case> cases;
  cases.push_back({"unknown region",
                   decode_with({Client::shared_memory_ref("nope", 0)}, false),
                   StatusCode::kNotFound,
                   {"output_shm (o)", "no shared-memory region named \"nope\""}});
  cases.push_back({"offset past the region",
                   decode_with({Client::shared_memory_ref("small", 4096 - o_bytes + 4)}, false),
                   StatusCode::kInvalidArgument,
                   {"output_shm (o)", "576 bytes from offset 3524", "region \"small\" of 4096"}});
  cases.push_back({"negative offset",
                   decode_with({Client::shared_memory_ref("small", -64)}, false),
                   StatusCode::kInvalidArgument,
                   {"output_shm (o)", "from offset -64", "do not fit"}});
  cases.push_back(
      {"lse outside the region",
       decode_with(
           {Client::shared_memory_ref("small", 0), Client::shared_memory_ref("small", 4090)}, true),
       StatusCode::kInvalidArgument,
       {"output_shm (lse)", "24 bytes from offset 4090"}});
  cases.push_back({"wrong byte count",
                   decode_with({Client::shared_memory_ref("small", 0, 100)}, false),
                   StatusCode::kInvalidArgument,
                   {"output_shm (o)", "take 576 bytes", "says 100"}});
  cases.push_back({"two entries, one output",
                   decode_with({Client::shared_memory_ref("small", 0),
                                Client::shared_memory_ref("small", 1024)},
                               false),
                   StatusCode::kInvalidArgument,
                   {"output_shm: expected at most 1 entries (one per output), got 2"}});
  cases.push_back(
      {"three entries, two outputs",
       decode_with({Client::shared_memory_ref("small", 0), Client::shared_memory_ref("small", 1024),
                    Client::shared_memory_ref("small", 2048)},
                   true),
       StatusCode::kInvalidArgument,
       {"output_shm: expected at most 2 entries (one per output), got 3"}});
  cases.push_back({"exactly-once call, unknown region",
                   decode_with({Client::shared_memory_ref("nope", 0)}, false, {5}),
                   StatusCode::kNotFound,
                   {"output_shm (o)", "\"nope\""}});
  cases.push_back({"prefill, unknown region",
                   prefill_with({Client::shared_memory_ref("nope", 0)}, false),
                   StatusCode::kNotFound,
                   {"output_shm (o)", "\"nope\""}});
  cases.push_back({"prefill, o outside the region",
                   prefill_with({Client::shared_memory_ref("small", 128)}, false),
                   StatusCode::kInvalidArgument,
                   {"output_shm (o)", "4032 bytes from offset 128", "region \"small\" of 4096"}});
  cases.push_back({"prefill, too many entries",
                   prefill_with({Client::shared_memory_ref("gone", 0), {}, {}}, true),
                   StatusCode::kInvalidArgument,
                   {"output_shm: expected at most 2 entries (one per output), got 3"}});
  // A region forgotten before the call.
  ASSERT_TRUE(client.unregister_shared_memory("gone").ok());
  cases.push_back({"region forgotten before the call",
                   decode_with({Client::shared_memory_ref("gone", 0)}, false),
                   StatusCode::kNotFound,
                   {"output_shm (o)", "no shared-memory region named \"gone\""}});
  cases.push_back({"prefill, region forgotten before the call",
                   prefill_with({{}, Client::shared_memory_ref("gone", 0)}, true),
                   StatusCode::kNotFound,
                   {"output_shm (lse)", "\"gone\""}});

  for (const Case& c : cases) {
    SCOPED_TRACE(c.what);
    EXPECT_EQ(c.got.code(), c.code) << c.got.to_string();
    for (const std::string& part : c.message) EXPECT_THAT(c.got.message(), HasSubstr(part));
    EXPECT_EQ(lengths_of(client, handle), before) << "a refused call appended";
  }
  auto k = client.read_kv(handle, "s", 1);
  ASSERT_TRUE(k.ok());
  EXPECT_EQ(k->k.shape()[0], 5);
  // The same call with a good region goes through.
  EXPECT_TRUE(decode_with({Client::shared_memory_ref("small", 0)}, false, {5}).ok());
  EXPECT_EQ(lengths_of(client, handle).at("s"), (std::vector<std::int64_t>{5, 6}));
}

// An output region whose object shrank under it after registration: the kernel ran but its
// output cannot be written, so the call fails naming the region and its pages go back (nothing
// appended); a call that states its expectation can then be sent again.
TEST(KvSharedMemory, OutputRegionShrunkAfterRegistrationAppendsNothing) {
  testing::ServerProcess server(ATTND_PATH, kShm);
  Client client(server.address());
  std::mt19937_64 rng(testing::seed());
  auto cache = client.create_kv_cache(config(DType::kFloat32));
  ASSERT_TRUE(cache.ok());
  Region r(client, "shrinks", 1 << 16);
  Inputs in(DType::kFloat32, 7, rng);
  PrefillOptions opts;
  opts.expected_lengths = {0};
  const std::int64_t at[3] = {r.put(in.q), r.put(in.k), r.put(in.v)};
  const std::int64_t o_at = (1 << 16) - static_cast<std::int64_t>(in.q.bytes());
  // The inputs stay readable; the output's room is gone.
  ASSERT_EQ(::ftruncate(r.buf.fd(), o_at), 0);
  auto failed =
      client.prefill_shm(cache->handle(), 0, {"s"}, {7}, "shrinks", r.buf, DType::kFloat32,
                         in.q.shape(), in.k.shape(), at, o_at, opts, false);
  EXPECT_EQ(failed.status().code(), StatusCode::kFailedPrecondition);
  EXPECT_THAT(failed.status().message(), HasSubstr("output_shm (o)"));
  EXPECT_THAT(failed.status().message(), HasSubstr("truncated after registration"));
  EXPECT_TRUE(lengths_of(client, cache->handle()).empty()) << "the failed call appended";
  auto info = client.describe_kv_cache(cache->handle());
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->pages_used(), 0) << "its pages did not go back";
  ASSERT_EQ(::ftruncate(r.buf.fd(), 1 << 16), 0);
  auto sent_again =
      client.prefill_shm(cache->handle(), 0, {"s"}, {7}, "shrinks", r.buf, DType::kFloat32,
                         in.q.shape(), in.k.shape(), at, o_at, opts, true);
  ASSERT_TRUE(sent_again.ok()) << sent_again.status().to_string();
  EXPECT_FALSE(sent_again->replayed);
  EXPECT_EQ(sent_again->lengths, (std::vector<std::int64_t>{7}));
}

// A server without --shared-memory refuses output_shm by name, appending nothing.
TEST(KvSharedMemory, OffRefusesOutputRegions) {
  testing::ServerProcess server(ATTND_PATH, {"--backend", "cpu"});
  Client client(server.address());
  std::mt19937_64 rng(testing::seed());
  auto cache = client.create_kv_cache(config(DType::kFloat32));
  ASSERT_TRUE(cache.ok());
  Inputs in(DType::kFloat32, 1, rng);
  v1::PrefillRequest req;
  req.set_cache(cache->handle());
  req.add_sequence_ids("s");
  req.add_lens(1);
  wire::encode_tensor(in.q.view(), req.mutable_q());
  wire::encode_tensor(in.k.view(), req.mutable_k());
  wire::encode_tensor(in.v.view(), req.mutable_v());
  *req.add_output_shm() = Client::shared_memory_ref("r", 0);
  v1::PrefillResponse resp;
  const Status s =
      wire::from_grpc(client.stub().Prefill(client.make_context(req).get(), req, &resp));
  EXPECT_EQ(s.code(), StatusCode::kFailedPrecondition);
  EXPECT_THAT(s.message(), HasSubstr("output_shm (o)"));
  EXPECT_THAT(s.message(), HasSubstr("--shared-memory"));
  EXPECT_TRUE(lengths_of(client, cache->handle()).empty()) << "the sequence was created";
}

// An exactly-once call repeated: the recorded outputs written into the regions the repeat names
// (other offsets than the first's, poisoned first), bit for bit, or inline when it names none;
// nothing appended.
TEST(KvSharedMemory, RepeatWritesTheRecordedOutputsIntoItsRegions) {
  testing::ServerProcess server(ATTND_PATH, kShm);
  Client client(server.address());
  std::mt19937_64 rng(testing::seed());
  auto cache = client.create_kv_cache(config(DType::kFloat16));
  ASSERT_TRUE(cache.ok());
  const std::string handle = cache->handle();
  Region r(client, "io", 1 << 20);
  const std::vector<std::string> ids = {"x", "y"};
  const std::vector<std::int64_t> lens = {33, 1};
  Inputs p(DType::kFloat16, 34, rng);
  const std::int64_t p_in[3] = {r.put(p.q), r.put(p.k), r.put(p.v)};
  PrefillOptions popts;
  popts.return_lse = true;
  popts.expected_lengths = {0, 0};
  const std::int64_t po = r.alloc(p.q.bytes()), plse = r.alloc(34 * kHq * 4);
  auto first = client.prefill_shm(handle, 0, ids, lens, "io", r.buf, DType::kFloat16, p.q.shape(),
                                  p.k.shape(), p_in, po, popts, true, plse);
  ASSERT_TRUE(first.ok()) << first.status().to_string();
  EXPECT_FALSE(first->replayed);
  // The repeat, into fresh (poisoned) room.
  const std::int64_t po2 = r.alloc(p.q.bytes()), plse2 = r.alloc(34 * kHq * 4);
  auto again = client.prefill_shm(handle, 0, ids, lens, "io", r.buf, DType::kFloat16, p.q.shape(),
                                  p.k.shape(), p_in, po2, popts, true, plse2);
  ASSERT_TRUE(again.ok()) << again.status().to_string();
  EXPECT_TRUE(again->replayed);
  EXPECT_TRUE(same_bytes(again->output, first->output));
  EXPECT_TRUE(same_bytes(again->lse, first->lse));
  EXPECT_EQ(again->lengths, (std::vector<std::int64_t>{33, 1}));
  // And inline, the same call with no output region.
  auto inline_again = client.prefill(handle, 0, ids, lens, p.q, p.k, p.v, popts);
  ASSERT_TRUE(inline_again.ok()) << inline_again.status().to_string();
  EXPECT_TRUE(inline_again->replayed);
  EXPECT_TRUE(same_bytes(inline_again->output, first->output));
  EXPECT_TRUE(same_bytes(inline_again->lse, first->lse));

  // A decode applied inline, repeated into a region (o there, the LSE inline).
  Inputs d(DType::kFloat16, 2, rng);
  DecodeOptions dopts;
  dopts.return_lse = true;
  dopts.expected_lengths = {0, 0};
  auto applied = client.decode(handle, 0, ids, d.q, d.k, d.v, dopts);
  ASSERT_FALSE(applied.ok()) << "expected lengths 0 at length 33/1: refused";
  dopts.expected_lengths = {33, 1};
  applied = client.decode(handle, 0, ids, d.q, d.k, d.v, dopts);
  ASSERT_TRUE(applied.ok()) << applied.status().to_string();
  const std::int64_t d_in[3] = {r.put(d.q), r.put(d.k), r.put(d.v)};
  const std::int64_t dout = r.alloc(d.q.bytes());
  auto repeat = client.decode_shm(handle, 0, ids, "io", r.buf, DType::kFloat16, d.q.shape(),
                                  d.k.shape(), d_in, dout, dopts, true, -1);
  ASSERT_TRUE(repeat.ok()) << repeat.status().to_string();
  EXPECT_TRUE(repeat->replayed);
  EXPECT_TRUE(same_bytes(repeat->output, applied->output));
  EXPECT_TRUE(same_bytes(repeat->lse, applied->lse));
  EXPECT_EQ(lengths_of(client, handle).at("x"), (std::vector<std::int64_t>{34, 0}));
  EXPECT_EQ(lengths_of(client, handle).at("y"), (std::vector<std::int64_t>{2, 0}));

  // A repeat naming a region it may not use is refused, like any call, appending nothing.
  const std::int64_t bad[3] = {d_in[0], d_in[1], d_in[2]};
  auto refused = client.decode_shm(handle, 0, ids, "elsewhere", r.buf, DType::kFloat16, d.q.shape(),
                                   d.k.shape(), bad, dout, dopts, true, -1);
  EXPECT_EQ(refused.status().code(), StatusCode::kNotFound);
  EXPECT_EQ(lengths_of(client, handle).at("x"), (std::vector<std::int64_t>{34, 0}));
}

// Concurrent decode callers on one cache with a batch window: merged launches write each call's
// rows into its own region, the same bits as its call alone (inline, on a server that never
// merges).
TEST(KvSharedMemory, MergedCallsWriteTheirOwnRegions) {
  constexpr int kCallers = 4, kSteps = 12;
  std::mt19937_64 rng(testing::seed());
  // Every caller's inputs per step, drawn once.
  std::vector<std::vector<Inputs>> inputs(kCallers);
  std::vector<Inputs> prompts;
  for (int c = 0; c < kCallers; ++c) {
    prompts.emplace_back(DType::kFloat32, 9 + c, rng);
    for (int s = 0; s < kSteps; ++s) inputs[c].emplace_back(DType::kFloat32, 1, rng);
  }
  // outputs[c][step] as bytes.
  auto run = [&](const std::vector<std::string>& flags, bool shm, int* merged) {
    testing::ServerProcess server(ATTND_PATH, flags);
    Client setup(server.address());
    auto cache = setup.create_kv_cache(config(DType::kFloat32));
    EXPECT_TRUE(cache.ok());
    std::vector<std::vector<std::string>> out(kCallers);
    std::vector<std::unique_ptr<Region>> regions;
    for (int c = 0; c < kCallers; ++c) {
      const std::string id = "s" + std::to_string(c);
      EXPECT_TRUE(
          setup.prefill(cache->handle(), 0, {id}, {9 + c}, prompts[c].q, prompts[c].k, prompts[c].v)
              .ok());
      if (shm)
        regions.push_back(std::make_unique<Region>(setup, "caller" + std::to_string(c), 1 << 20));
    }
    std::atomic<int> shared{0};
    std::vector<std::thread> threads;
    for (int c = 0; c < kCallers; ++c)
      threads.emplace_back([&, c] {
        Client client(server.address());
        const std::string id = "s" + std::to_string(c);
        for (int s = 0; s < kSteps; ++s) {
          const Inputs& in = inputs[c][s];
          DecodeOptions opts;
          opts.return_lse = true;
          Result<KvOpResult> got = invalid_argument("unset");
          if (shm) {
            Region& r = *regions[c];
            const std::int64_t at[3] = {r.put(in.q), r.put(in.k), r.put(in.v)};
            const std::int64_t o = r.alloc(in.q.bytes()), lse = r.alloc(kHq * 4);
            got = client.decode_shm(cache->handle(), 0, {id}, r.name, r.buf, DType::kFloat32,
                                    in.q.shape(), in.k.shape(), at, o, opts, true, lse);
          } else {
            got = client.decode(cache->handle(), 0, {id}, in.q, in.k, in.v, opts);
          }
          EXPECT_TRUE(got.ok()) << got.status().to_string();
          if (!got.ok()) return;
          if (got->timings.batched_calls() > 1) ++shared;
          out[c].push_back(
              std::string(static_cast<const char*>(got->output.data()), got->output.bytes()) +
              std::string(static_cast<const char*>(got->lse.data()), got->lse.bytes()));
        }
      });
    for (auto& t : threads) t.join();
    *merged = shared;
    return out;
  };
  int merged_alone = 0, merged_shm = 0;
  const auto alone = run({"--backend", "cpu", "--batch-window-us", "0"}, false, &merged_alone);
  const auto together =
      run({"--backend", "cpu", "--shared-memory", "system", "--batch-window-us", "3000"}, true,
          &merged_shm);
  EXPECT_EQ(merged_alone, 0);
  EXPECT_GT(merged_shm, 0) << "no call shared a launch: the merged path went untested";
  for (int c = 0; c < kCallers; ++c) {
    ASSERT_EQ(together[c].size(), alone[c].size());
    for (int s = 0; s < kSteps; ++s) EXPECT_EQ(together[c][s], alone[c][s]) << c << " " << s;
  }
}

}  // namespace
}  // namespace attn
