// Concurrent decode callers against a real server, each on its own sequence of one cache, for
// the dynamic-batching tests: what every caller got back, and how often it shared a launch.
#pragma once

#include <gtest/gtest.h>

#include <map>
#include <string>
#include <thread>
#include <vector>

#include "attn/client.h"
#include "support/kv_mirror.h"
#include "support/random.h"

namespace attn::testing {

constexpr int kDecodeLayers = 2, kDecodeSteps = 25;

// The heads and head dim of the callers' cache.
struct DecodeShape {
  int hq = 8, hkv = 2, d = 32;
  int layers = kDecodeLayers;
  // Each caller decodes only layer (caller % layers), layers x steps times: concurrent callers
  // are then on different layers.
  bool one_layer_each = false;
};

struct CallerLog {
  std::map<std::pair<int, int>, std::string> outputs;  // (step, layer) -> o bytes
  int ok = 0, merged = 0;
  std::map<grpc::StatusCode, int> codes;
};

// Runs `callers` concurrent decoders (each its own sequence, prefilled first) against `address`
// and returns what each got (outputs by step and by call within the step). Caller `bad` names a
// sequence that does not exist; caller `hurried` sends every call with a deadline too short to
// survive the queue.
inline std::vector<CallerLog> run_decode_callers(const std::string& address, int callers, int bad,
                                                 int hurried, DecodeShape shape = {}) {
  const int kLayers = shape.layers, kSteps = kDecodeSteps, kHq = shape.hq, kHkv = shape.hkv,
            kD = shape.d;
  Client client(address);
  v1::CreateKvCacheRequest creq;
  auto* c = creq.mutable_config();
  c->set_layers(kLayers);
  c->set_kv_heads(kHkv);
  c->set_head_dim(kD);
  c->set_dtype(v1::D_TYPE_BFLOAT16);
  c->set_page_size(16);
  c->set_capacity_tokens(1 << 16);
  v1::CreateKvCacheResponse cresp;
  {
    grpc::ClientContext ctx;
    const grpc::Status s = client.stub().CreateKvCache(&ctx, creq, &cresp);
    EXPECT_TRUE(s.ok()) << s.error_message();
  }
  const std::string cache = cresp.cache().handle();
  std::vector<CallerLog> logs(static_cast<std::size_t>(callers));
  std::vector<std::thread> threads;
  for (int t = 0; t < callers; ++t)
    threads.emplace_back([&, t] {
      Client own(address);
      const std::string id = "seq" + std::to_string(t);
      // The same inputs on every server: a generator per caller from the run's seed.
      std::mt19937_64 rng(testing::seed() * 1000 + static_cast<std::uint64_t>(t));
      const std::int64_t prompt = 1 + static_cast<std::int64_t>(rng() % 200);
      for (int layer = 0; layer < kLayers; ++layer) {
        v1::PrefillRequest req;
        req.set_cache(cache);
        req.set_layer(layer);
        req.add_sequence_ids(id);
        req.add_lens(prompt);
        *req.mutable_q() = to_wire(random_tensor(DType::kBFloat16, {prompt, kHq, kD}, rng));
        *req.mutable_k() = to_wire(random_tensor(DType::kBFloat16, {prompt, kHkv, kD}, rng));
        *req.mutable_v() = to_wire(random_tensor(DType::kBFloat16, {prompt, kHkv, kD}, rng));
        v1::PrefillResponse resp;
        grpc::ClientContext ctx;
        const grpc::Status s = own.stub().Prefill(&ctx, req, &resp);
        EXPECT_TRUE(s.ok()) << s.error_message();
      }
      CallerLog& log = logs[static_cast<std::size_t>(t)];
      for (int step = 0; step < kSteps; ++step)
        for (int layer = 0; layer < kLayers; ++layer) {
          v1::DecodeRequest req;
          req.set_cache(cache);
          req.set_layer(shape.one_layer_each ? t % kLayers : layer);
          req.add_sequence_ids(t == bad ? "nobody" : id);
          *req.mutable_q() = to_wire(random_tensor(DType::kBFloat16, {1, kHq, kD}, rng));
          *req.mutable_k_new() = to_wire(random_tensor(DType::kBFloat16, {1, kHkv, kD}, rng));
          *req.mutable_v_new() = to_wire(random_tensor(DType::kBFloat16, {1, kHkv, kD}, rng));
          v1::DecodeResponse resp;
          grpc::ClientContext ctx;
          if (t == hurried)
            ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::microseconds(200));
          const grpc::Status s = own.stub().Decode(&ctx, req, &resp);
          ++log.codes[s.error_code()];
          if (!s.ok()) continue;
          ++log.ok;
          log.merged += resp.timings().batched_calls() > 1;
          log.outputs[{step, layer}] = resp.o().data();
        }
    });
  for (auto& th : threads) th.join();
  return logs;
}

}  // namespace attn::testing
