// Concurrent decode callers against a real server, each on its own sequence of one cache, for
// the dynamic-batching tests: what every caller got back, and how often it shared a launch.
#pragma once

#include <gtest/gtest.h>

#include <climits>
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
  // The first (step, layer) whose call did not succeed: from there on the caller's cache may
  // differ between servers (a dropped call may or may not have appended its row).
  std::pair<int, int> first_failure{INT_MAX, INT_MAX};
};

// What the callers of a soak do besides decoding one sequence each.
struct CallerMix {
  int bad = -1, hurried = -1;   // a caller naming an unknown sequence; one whose deadlines expire
  int two_sequences_every = 0;  // every k-th caller decodes two sequences per call (0: none)
  int cancelling_every = 0;     // every k-th caller cancels some of its calls mid-flight
};

// Runs `callers` concurrent decoders (each its own sequence, prefilled first) against `address`
// and returns what each got (outputs by step and by call within the step). Caller `bad` names a
// sequence that does not exist; caller `hurried` sends every call with a deadline too short to
// survive the queue.
inline std::vector<CallerLog> run_decode_callers(const std::string& address, int callers,
                                                 CallerMix mix, DecodeShape shape = {},
                                                 int steps = kDecodeSteps) {
  const int bad = mix.bad, hurried = mix.hurried;
  const int kLayers = shape.layers, kSteps = steps, kHq = shape.hq, kHkv = shape.hkv, kD = shape.d;
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
      const std::int64_t n =
          mix.two_sequences_every > 0 && t % mix.two_sequences_every == 1 ? 2 : 1;
      const bool cancels = mix.cancelling_every > 0 && t % mix.cancelling_every == 2;
      std::vector<std::string> ids;
      for (std::int64_t i = 0; i < n; ++i)
        ids.push_back("seq" + std::to_string(t) + (i ? "b" : ""));
      // The same inputs on every server: a generator per caller from the run's seed.
      std::mt19937_64 rng(testing::seed() * 1000 + static_cast<std::uint64_t>(t));
      std::vector<std::int64_t> prompts;
      for (std::int64_t i = 0; i < n; ++i)
        prompts.push_back(1 + static_cast<std::int64_t>(rng() % 200));
      std::int64_t rows = 0;
      for (auto p : prompts) rows += p;
      for (int layer = 0; layer < kLayers; ++layer) {
        v1::PrefillRequest req;
        req.set_cache(cache);
        req.set_layer(layer);
        for (std::int64_t i = 0; i < n; ++i) {
          req.add_sequence_ids(ids[static_cast<std::size_t>(i)]);
          req.add_lens(prompts[static_cast<std::size_t>(i)]);
        }
        *req.mutable_q() = to_wire(random_tensor(DType::kBFloat16, {rows, kHq, kD}, rng));
        *req.mutable_k() = to_wire(random_tensor(DType::kBFloat16, {rows, kHkv, kD}, rng));
        *req.mutable_v() = to_wire(random_tensor(DType::kBFloat16, {rows, kHkv, kD}, rng));
        v1::PrefillResponse resp;
        grpc::ClientContext ctx;
        // As attn::Client does: an undeclared request holds room for the largest one until read.
        ctx.AddMetadata("attn-request-bytes", std::to_string(req.ByteSizeLong()));
        const grpc::Status s = own.stub().Prefill(&ctx, req, &resp);
        EXPECT_TRUE(s.ok()) << s.error_message();
      }
      CallerLog& log = logs[static_cast<std::size_t>(t)];
      for (int step = 0; step < kSteps; ++step)
        for (int layer = 0; layer < kLayers; ++layer) {
          v1::DecodeRequest req;
          req.set_cache(cache);
          req.set_layer(shape.one_layer_each ? t % kLayers : layer);
          for (const std::string& id : ids) req.add_sequence_ids(t == bad ? "nobody" : id);
          *req.mutable_q() = to_wire(random_tensor(DType::kBFloat16, {n, kHq, kD}, rng));
          *req.mutable_k_new() = to_wire(random_tensor(DType::kBFloat16, {n, kHkv, kD}, rng));
          *req.mutable_v_new() = to_wire(random_tensor(DType::kBFloat16, {n, kHkv, kD}, rng));
          v1::DecodeResponse resp;
          grpc::ClientContext ctx;
          ctx.AddMetadata("attn-request-bytes", std::to_string(req.ByteSizeLong()));
          if (t == hurried)
            ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::microseconds(200));
          // Every other call of a cancelling caller is cancelled after a short while: before,
          // during or after its batch.
          std::thread canceller;
          if (cancels && step % 2 == 1)
            canceller = std::thread([&ctx, wait = static_cast<int>(rng() % 400)] {
              std::this_thread::sleep_for(std::chrono::microseconds(wait));
              ctx.TryCancel();
            });
          const grpc::Status s = own.stub().Decode(&ctx, req, &resp);
          if (canceller.joinable()) canceller.join();
          ++log.codes[s.error_code()];
          if (!s.ok()) {
            log.first_failure = std::min(log.first_failure, std::make_pair(step, layer));
            continue;
          }
          if (resp.o().data().size() != static_cast<std::size_t>(n * kHq * kD * 2)) {
            ADD_FAILURE() << "caller " << t << ": o of " << resp.o().data().size() << " bytes";
            continue;
          }
          ++log.ok;
          log.merged += resp.timings().batched_calls() > 1;
          log.outputs[{step, layer}] = resp.o().data();
        }
    });
  for (auto& th : threads) th.join();
  return logs;
}

}  // namespace attn::testing
