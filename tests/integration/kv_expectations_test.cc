// Decode and Prefill with expected_lengths (exactly-once) against the real attnd (CPU backend):
// a count that does not match the sequences is INVALID_ARGUMENT; a wrong expectation is
// FAILED_PRECONDITION naming the sequence, the length expected and the one found, and leaves the
// cache as it was (ReadKv); a repeat of the last applied call gets its response bit for bit and
// appends nothing; a repeat with another payload, or after a newer call, or after a truncation is
// refused; a fork does not inherit records; DescribeKvCache counts their bytes until they go.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "attn/client.h"
#include "attn/wire.h"
#include "support/kv_mirror.h"
#include "support/random.h"
#include "support/server_process.h"

namespace attn {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using testing::random_tensor;
using testing::to_wire;

class KvExpectations : public ::testing::Test {
 protected:
  static constexpr int kHkv = 2, kHq = 4, kD = 16, kLayers = 2;

  KvExpectations()
      : server_(ATTND_PATH, {"--backend", "cpu"}),
        client_(server_.address()),
        rng_(testing::seed()) {
    v1::KvCacheConfig c;
    c.set_layers(kLayers);
    c.set_kv_heads(kHkv);
    c.set_head_dim(kD);
    c.set_dtype(v1::D_TYPE_FLOAT32);
    c.set_page_size(8);
    c.set_capacity_tokens(1024);
    auto info = client_.create_kv_cache(c);
    EXPECT_TRUE(info.ok()) << info.status().to_string();
    cache_ = info.ok() ? info->handle() : "";
  }

  // A Decode request with fresh random inputs: one token per sequence.
  v1::DecodeRequest decode_request(int layer, const std::vector<std::string>& ids,
                                   const std::vector<std::int64_t>& expected) {
    const auto n = static_cast<std::int64_t>(ids.size());
    v1::DecodeRequest req;
    req.set_cache(cache_);
    req.set_layer(layer);
    for (const auto& id : ids) req.add_sequence_ids(id);
    *req.mutable_q() = to_wire(random_tensor(DType::kFloat32, {n, kHq, kD}, rng_));
    *req.mutable_k_new() = to_wire(random_tensor(DType::kFloat32, {n, kHkv, kD}, rng_));
    *req.mutable_v_new() = to_wire(random_tensor(DType::kFloat32, {n, kHkv, kD}, rng_));
    req.mutable_expected_lengths()->Assign(expected.begin(), expected.end());
    return req;
  }
  v1::PrefillRequest prefill_request(int layer, const std::vector<std::string>& ids,
                                     const std::vector<std::int64_t>& lens,
                                     const std::vector<std::int64_t>& expected) {
    std::int64_t rows = 0;
    for (auto l : lens) rows += l;
    v1::PrefillRequest req;
    req.set_cache(cache_);
    req.set_layer(layer);
    for (const auto& id : ids) req.add_sequence_ids(id);
    req.mutable_lens()->Assign(lens.begin(), lens.end());
    *req.mutable_q() = to_wire(random_tensor(DType::kFloat32, {rows, kHq, kD}, rng_));
    *req.mutable_k() = to_wire(random_tensor(DType::kFloat32, {rows, kHkv, kD}, rng_));
    *req.mutable_v() = to_wire(random_tensor(DType::kFloat32, {rows, kHkv, kD}, rng_));
    req.mutable_expected_lengths()->Assign(expected.begin(), expected.end());
    return req;
  }
  grpc::Status send(const v1::DecodeRequest& req, v1::DecodeResponse* resp) {
    grpc::ClientContext ctx;
    return client_.stub().Decode(&ctx, req, resp);
  }
  grpc::Status send(const v1::PrefillRequest& req, v1::PrefillResponse* resp) {
    grpc::ClientContext ctx;
    return client_.stub().Prefill(&ctx, req, resp);
  }
  template <class Request,
            class Response = std::conditional_t<std::is_same_v<Request, v1::DecodeRequest>,
                                                v1::DecodeResponse, v1::PrefillResponse>>
  Response ok(const Request& req) {
    Response resp;
    const grpc::Status s = send(req, &resp);
    EXPECT_TRUE(s.ok()) << s.error_message();
    return resp;
  }
  template <class Request>
  grpc::Status refused(const Request& req, grpc::StatusCode code) {
    typename std::conditional_t<std::is_same_v<Request, v1::DecodeRequest>, v1::DecodeResponse,
                                v1::PrefillResponse>
        resp;
    const grpc::Status s = send(req, &resp);
    EXPECT_EQ(s.error_code(), code) << s.error_message();
    return s;
  }
  // Every sequence's K and V bytes at every layer, and the cache's lengths.
  std::string contents() {
    auto info = client_.describe_kv_cache(cache_);
    EXPECT_TRUE(info.ok());
    std::string all;
    for (const auto& s : info->sequences()) {
      all += s.id() + ":";
      for (int layer = 0; layer < kLayers; ++layer) {
        auto kv = client_.read_kv(cache_, s.id(), layer);
        EXPECT_TRUE(kv.ok()) << kv.status().to_string();
        all += std::to_string(kv->k.shape()[0]) + ",";
        all.append(static_cast<const char*>(kv->k.data()), kv->k.bytes());
        all.append(static_cast<const char*>(kv->v.data()), kv->v.bytes());
      }
    }
    return all;
  }
  std::int64_t replay_bytes() {
    auto info = client_.describe_kv_cache(cache_);
    EXPECT_TRUE(info.ok());
    return info.ok() ? info->replay_bytes() : -1;
  }

  testing::ServerProcess server_;
  Client client_;
  std::mt19937_64 rng_;
  std::string cache_;
};

TEST_F(KvExpectations, AnotherCountOrARangeIsAnInvalidArgument) {
  grpc::Status s = refused(decode_request(0, {"a", "b"}, {0}), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(s.error_message(),
              HasSubstr("expected_lengths: expected one length per sequence (2, or none), got 1"));
  s = refused(prefill_request(0, {"a"}, {3}, {0, 0}), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(s.error_message(),
              HasSubstr("expected_lengths: expected one length per sequence (1, or none), got 2"));
  s = refused(prefill_request(0, {"a", "b"}, {3, 1}, {0, -1}), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(s.error_message(),
              HasSubstr("expected_lengths[1]: expected a length 0..2^31-1, got -1"));
  s = refused(prefill_request(0, {"a"}, {3}, {std::int64_t{1} << 62}),
              grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(s.error_message(),
              HasSubstr("expected_lengths[0]: expected a length 0..2^31-1, got "));
  EXPECT_EQ(contents(), "") << "nothing created";
}

TEST_F(KvExpectations, AWrongExpectationChangesNothing) {
  ok(prefill_request(0, {"a", "b"}, {5, 3}, {0, 0}));
  const std::string before = contents();
  grpc::Status s =
      refused(decode_request(0, {"a", "b"}, {5, 4}), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(s.error_message(), HasSubstr("expected_lengths[1]: sequence \"b\" at layer 0"));
  EXPECT_THAT(s.error_message(), HasSubstr("expected length 4, got 3"));
  EXPECT_EQ(contents(), before) << "a was at its expected length, yet nothing may be appended";
  // A prefill that expects a sequence the cache does not have: not created.
  s = refused(prefill_request(1, {"a", "c"}, {2, 2}, {0, 2}),
              grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(s.error_message(), HasSubstr("expected_lengths[1]: sequence \"c\" at layer 1"));
  EXPECT_THAT(s.error_message(), HasSubstr("expected length 2, got 0"));
  EXPECT_EQ(contents(), before);
  // Decode's unknown sequence stays NOT_FOUND.
  refused(decode_request(0, {"x"}, {0}), grpc::StatusCode::NOT_FOUND);
  // The right expectation goes through.
  EXPECT_THAT(ok(decode_request(0, {"a", "b"}, {5, 3})).lengths(), ElementsAre(6, 4));
}

TEST_F(KvExpectations, ARepeatGetsTheSameBytesAndAppendsNothing) {
  const v1::PrefillRequest prefill = prefill_request(0, {"a", "b"}, {4, 9}, {0, 0});
  const v1::PrefillResponse p1 = ok(prefill);
  const std::string after_prefill = contents();
  const v1::PrefillResponse p2 = ok(prefill);
  EXPECT_FALSE(p1.replayed());
  EXPECT_TRUE(p2.replayed());
  EXPECT_EQ(p2.o().data(), p1.o().data());
  EXPECT_THAT(p2.lengths(), ElementsAre(4, 9));
  EXPECT_EQ(contents(), after_prefill);

  v1::DecodeRequest decode = decode_request(0, {"b", "a"}, {9, 4});
  decode.set_return_lse(true);
  const v1::DecodeResponse d1 = ok(decode);
  const std::string after_decode = contents();
  for (int repeat = 0; repeat < 2; ++repeat) {
    const v1::DecodeResponse d2 = ok(decode);
    EXPECT_TRUE(d2.replayed());
    EXPECT_EQ(d2.o().data(), d1.o().data());
    EXPECT_EQ(d2.lse().data(), d1.lse().data());
    EXPECT_THAT(d2.o().shape(), ::testing::ElementsAreArray(d1.o().shape()));
    EXPECT_THAT(d2.lengths(), ElementsAre(10, 5));
    EXPECT_EQ(d2.timings().kernel(), d1.timings().kernel());
    EXPECT_EQ(d2.timings().kernel_ns(), 0) << "no kernel ran";
  }
  EXPECT_EQ(contents(), after_decode);

  // Values (return_values) come back as they were sent too.
  v1::DecodeRequest values = decode_request(0, {"a"}, {5});
  values.set_return_values(true);
  const v1::DecodeResponse v1r = ok(values);
  const v1::DecodeResponse v2r = ok(values);
  EXPECT_TRUE(v2r.replayed());
  EXPECT_THAT(v2r.o().values(), ::testing::Pointwise(::testing::Eq(), v1r.o().values()));
  EXPECT_GT(v2r.o().values_size(), 0);
  EXPECT_THAT(server_.log(), HasSubstr("answered from its record, nothing appended"));
}

TEST_F(KvExpectations, ARepeatWithAnotherPayloadOrOptionIsRefused) {
  ok(prefill_request(0, {"a"}, {6}, {0}));
  v1::DecodeRequest first = decode_request(0, {"a"}, {6});
  ok(first);
  const std::string after = contents();
  v1::DecodeRequest other = first;
  *other.mutable_k_new() = to_wire(random_tensor(DType::kFloat32, {1, kHkv, kD}, rng_));
  grpc::Status s = refused(other, grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(s.error_message(), HasSubstr("expected_lengths[0]: sequence \"a\" at layer 0"));
  EXPECT_THAT(s.error_message(), HasSubstr("expected length 6, got 7"));
  EXPECT_THAT(s.error_message(), HasSubstr("a different call with the same expectation"));
  other = first;
  other.set_return_lse(true);
  s = refused(other, grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(s.error_message(), HasSubstr("a different call with the same expectation"));
  other = first;
  other.set_softcap(20.0f);
  refused(other, grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_EQ(contents(), after);
  EXPECT_TRUE(ok(first).replayed()) << "the call itself still repeats";
}

TEST_F(KvExpectations, ARepeatAfterANewerCallIsRefused) {
  ok(prefill_request(0, {"a", "b"}, {3, 3}, {0, 0}));
  const v1::DecodeRequest c1 = decode_request(0, {"a", "b"}, {3, 3});
  const v1::DecodeRequest c2 = decode_request(0, {"a", "b"}, {4, 4});
  ok(c1);
  const v1::DecodeResponse r2 = ok(c2);
  const std::string after = contents();
  grpc::Status s = refused(c1, grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(s.error_message(), HasSubstr("expected length 3, got 5"));
  EXPECT_THAT(s.error_message(), HasSubstr("only the last applied call"));
  EXPECT_EQ(contents(), after);
  const v1::DecodeResponse again = ok(c2);
  EXPECT_TRUE(again.replayed());
  EXPECT_EQ(again.o().data(), r2.o().data());

  // A newer call on one of the sequences only: the pair's call is no longer the last on a.
  ok(decode_request(0, {"a"}, {5}));
  s = refused(c2, grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(s.error_message(), HasSubstr("sequence \"a\" at layer 0"));
  EXPECT_THAT(s.error_message(), HasSubstr("expected length 4, got 6"));
  // Some sequences of a call at its expectation and some past it: neither new nor a repeat.
  s = refused(decode_request(0, {"a", "b"}, {5, 5}), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(s.error_message(), HasSubstr("some of the call's sequences already hold its tokens"));
}

TEST_F(KvExpectations, RecordsGoWithTruncationAndReleaseAndForksDoNotInheritThem) {
  ok(prefill_request(0, {"a"}, {10}, {0}));
  ok(prefill_request(1, {"a"}, {10}, {0}));
  const v1::DecodeRequest d = decode_request(0, {"a"}, {10});
  ok(d);
  ASSERT_TRUE(client_.truncate_sequence(cache_, "a", 11).ok());  // changes no length
  grpc::Status s = refused(d, grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(s.error_message(), HasSubstr("not a repeat"));

  const v1::DecodeRequest e = decode_request(1, {"a"}, {10});
  ok(e);
  ASSERT_TRUE(client_.fork_sequence(cache_, "a", "a2").ok());
  EXPECT_TRUE(ok(e).replayed()) << "the source keeps its record";
  v1::DecodeRequest on_fork = e;
  on_fork.set_sequence_ids(0, "a2");
  s = refused(on_fork, grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(s.error_message(), HasSubstr("sequence \"a2\" at layer 1"));
  EXPECT_THAT(s.error_message(), HasSubstr("not a repeat"));

  ASSERT_TRUE(client_.release_sequences(cache_, {"a"}).ok());
  refused(e, grpc::StatusCode::NOT_FOUND);
}

TEST_F(KvExpectations, DescribeCountsTheRecordsUntilTheyGo) {
  EXPECT_EQ(replay_bytes(), 0);
  ok(prefill_request(0, {"a", "b"}, {20, 12}, {0, 0}));  // one record for both: o 32 x 4 x 16
  const std::int64_t prefill = replay_bytes();
  EXPECT_GE(prefill, 32 * kHq * kD * 4);
  EXPECT_LT(prefill, 32 * kHq * kD * 4 + 4096);
  ok(prefill_request(1, {"a"}, {20}, {0}));
  EXPECT_GT(replay_bytes(), prefill);
  // A decode on a replaces a's record at layer 0, which b still names: the prefill's stays.
  ok(decode_request(0, {"a"}, {20}));
  const std::int64_t both = replay_bytes();
  EXPECT_GT(both, prefill);
  // A call without expected_lengths is the last on its sequences now: their records go.
  v1::DecodeRequest plain = decode_request(0, {"a", "b"}, {});
  ok(plain);
  EXPECT_LT(replay_bytes(), both);
  v1::DecodeRequest plain1 = decode_request(1, {"a"}, {});
  ok(plain1);
  EXPECT_EQ(replay_bytes(), 0);
  ok(decode_request(0, {"a", "b"}, {22, 13}));
  EXPECT_GT(replay_bytes(), 0);
  ASSERT_TRUE(client_.release_sequences(cache_, {"a", "b"}).ok());
  EXPECT_EQ(replay_bytes(), 0);
}

}  // namespace
}  // namespace attn
