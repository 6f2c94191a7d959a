// Dynamic batching against the real attnd (CPU backend): concurrent Decode callers on one cache
// share launches, and every caller gets exactly the rows the same calls get from a server with
// batching off, bit for bit; a caller with a bad sequence fails alone; callers with deadlines
// that expire in the queue leave without harming the batch.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <atomic>
#include <map>
#include <mutex>
#include <thread>

#include "attn/client.h"
#include "reference.h"
#include "support/decode_callers.h"
#include "support/kv_mirror.h"
#include "support/random.h"
#include "support/server_process.h"

namespace attn {
namespace {

using testing::CallerLog;
using testing::kDecodeLayers;
using testing::kDecodeSteps;
using testing::random_tensor;
using testing::run_decode_callers;
using testing::to_wire;

TEST(DynamicBatching, ConcurrentDecodeCallersGetTheirOwnRowsBitForBit) {
  constexpr int kCallers = 16, kBad = 3, kHurried = 5;
  std::vector<CallerLog> alone, merged;
  {
    testing::ServerProcess server(ATTND_PATH, {"--backend", "cpu", "--batch-window-us", "0"});
    alone = run_decode_callers(server.address(), kCallers, {kBad, kHurried});
  }
  {
    testing::ServerProcess server(ATTND_PATH, {"--backend", "cpu", "--batch-window-us", "2000"});
    merged = run_decode_callers(server.address(), kCallers, {kBad, kHurried});
  }
  int merged_calls = 0;
  for (int t = 0; t < kCallers; ++t) {
    const CallerLog& a = alone[static_cast<std::size_t>(t)];
    const CallerLog& b = merged[static_cast<std::size_t>(t)];
    EXPECT_EQ(a.merged, 0) << "batching off, yet caller " << t << " shared a launch";
    merged_calls += b.merged;
    if (t == kBad) {
      EXPECT_EQ(b.codes.at(grpc::StatusCode::NOT_FOUND), kDecodeSteps * kDecodeLayers)
          << "the bad caller fails alone, every time";
      continue;
    }
    if (t == kHurried) {
      for (const auto& [code, n] : b.codes)
        EXPECT_TRUE(code == grpc::StatusCode::OK || code == grpc::StatusCode::DEADLINE_EXCEEDED)
            << code;
      continue;
    }
    EXPECT_EQ(b.ok, kDecodeSteps * kDecodeLayers) << "caller " << t;
    ASSERT_EQ(a.outputs.size(), b.outputs.size());
    for (const auto& [at, bytes] : a.outputs)
      EXPECT_EQ(b.outputs.at(at), bytes)
          << "caller " << t << " step " << at.first << " layer " << at.second;
  }
  ::testing::Test::RecordProperty("merged_calls", merged_calls);
  std::printf("calls that shared a launch: %d of %d\n", merged_calls,
              (kCallers - 2) * kDecodeSteps * kDecodeLayers);
  // The comparison means something only if calls did share launches.
  EXPECT_GT(merged_calls, 0) << "no call shared a launch";
}

// Callers on different layers of one cache share launches too (one view of every layer, pages
// renumbered into it): here each caller keeps to its own layer, so every shared launch mixes
// layers, and each caller still gets bit for bit what it gets with batching off.
TEST(DynamicBatching, DecodeCallersOnDifferentLayersShareLaunches) {
  constexpr int kCallers = 8;
  testing::DecodeShape shape;
  shape.layers = kCallers;
  shape.one_layer_each = true;
  std::vector<CallerLog> alone, merged;
  {
    testing::ServerProcess server(ATTND_PATH, {"--backend", "cpu", "--batch-window-us", "0"});
    alone = run_decode_callers(server.address(), kCallers, {}, shape);
  }
  {
    testing::ServerProcess server(ATTND_PATH, {"--backend", "cpu", "--batch-window-us", "2000"});
    merged = run_decode_callers(server.address(), kCallers, {}, shape);
  }
  int merged_calls = 0;
  for (int t = 0; t < kCallers; ++t) {
    const CallerLog& a = alone[static_cast<std::size_t>(t)];
    const CallerLog& b = merged[static_cast<std::size_t>(t)];
    merged_calls += b.merged;
    EXPECT_EQ(b.ok, kDecodeSteps * kCallers) << "caller " << t;
    ASSERT_EQ(a.outputs.size(), b.outputs.size());
    for (const auto& [at, bytes] : a.outputs)
      EXPECT_EQ(b.outputs.at(at), bytes)
          << "caller " << t << " step " << at.first << " call " << at.second;
  }
  std::printf("calls that shared a launch across layers: %d of %d\n", merged_calls,
              kCallers * kDecodeSteps * kCallers);
  EXPECT_GT(merged_calls, 0) << "no call shared a launch";
}

// A soak: 64 concurrent callers, some decoding two sequences per call, one naming an unknown
// sequence, one whose deadlines expire in the queue, some cancelling every other call at a random
// moment. Against a server with batching off: every call that succeeded on both after the same
// history of successes has the same bytes (nothing lost or mixed between callers), every failure
// is the caller's own (NOT_FOUND, DEADLINE_EXCEEDED, CANCELLED), and every undisturbed caller
// succeeds every time.
TEST(DynamicBatching, SixtyFourCallerSoakWithDeadlinesAndCancellations) {
  constexpr int kCallers = 64, kSteps = 8;
  const testing::CallerMix mix{3, 5, 4, 8};
  std::vector<CallerLog> alone, merged;
  {
    testing::ServerProcess server(ATTND_PATH, {"--backend", "cpu", "--batch-window-us", "0"});
    alone = run_decode_callers(server.address(), kCallers, mix, {}, kSteps);
  }
  {
    testing::ServerProcess server(ATTND_PATH, {"--backend", "cpu", "--batch-window-us", "2000"});
    merged = run_decode_callers(server.address(), kCallers, mix, {}, kSteps);
  }
  int merged_calls = 0, compared = 0, cancelled = 0;
  for (int t = 0; t < kCallers; ++t) {
    const CallerLog& a = alone[static_cast<std::size_t>(t)];
    const CallerLog& b = merged[static_cast<std::size_t>(t)];
    merged_calls += b.merged;
    const bool disturbed = t == mix.bad || t == mix.hurried || t % mix.cancelling_every == 2;
    for (const auto& [code, n] : b.codes) {
      const bool own = code == grpc::StatusCode::OK ||
                       (t == mix.bad && code == grpc::StatusCode::NOT_FOUND) ||
                       (t == mix.hurried && code == grpc::StatusCode::DEADLINE_EXCEEDED) ||
                       (t % mix.cancelling_every == 2 && code == grpc::StatusCode::CANCELLED);
      EXPECT_TRUE(own) << "caller " << t << " got " << code << " " << n << " times";
    }
    if (!disturbed) {
      EXPECT_EQ(b.ok, kSteps * kDecodeLayers) << "caller " << t;
    }
    if (b.codes.count(grpc::StatusCode::CANCELLED))
      cancelled += b.codes.at(grpc::StatusCode::CANCELLED);
    const auto history = std::min(a.first_failure, b.first_failure);
    for (const auto& [at, bytes] : b.outputs) {
      if (!(at < history) || !a.outputs.count(at)) continue;
      EXPECT_EQ(a.outputs.at(at), bytes)
          << "caller " << t << " step " << at.first << " layer " << at.second;
      ++compared;
    }
  }
  std::printf("calls that shared a launch: %d; outputs compared bit for bit: %d; cancelled: %d\n",
              merged_calls, compared, cancelled);
  EXPECT_GT(cancelled, 0) << "no call was cancelled in flight";
  EXPECT_GT(merged_calls, 0) << "no call shared a launch";
  EXPECT_GT(compared, kCallers * kSteps) << "too few calls compared for the soak to mean something";
}

// Softmax calls of one width waiting together share a launch; each caller gets its own rows,
// bit for bit what a server with batching off returns.
TEST(DynamicBatching, ConcurrentSoftmaxCallersShareLaunches) {
  constexpr int kCallers = 12, kCalls = 15;
  auto run = [&](const std::vector<std::string>& flags) {
    testing::ServerProcess server(ATTND_PATH, flags);
    std::vector<std::vector<std::string>> out(kCallers);
    std::atomic<int> merged{0};
    std::vector<std::thread> threads;
    for (int t = 0; t < kCallers; ++t)
      threads.emplace_back([&, t] {
        Client client(server.address());
        std::mt19937_64 rng(testing::seed() * 1000 + static_cast<std::uint64_t>(t));
        for (int i = 0; i < kCalls; ++i) {
          v1::SoftmaxRequest req;
          *req.mutable_x() = to_wire(random_tensor(
              DType::kFloat32, {1 + static_cast<std::int64_t>(rng() % 200), 1024}, rng));
          v1::SoftmaxResponse resp;
          grpc::ClientContext ctx;
          const grpc::Status s = client.stub().Softmax(&ctx, req, &resp);
          EXPECT_TRUE(s.ok()) << s.error_message();
          merged += resp.timings().batched_calls() > 1;
          out[static_cast<std::size_t>(t)].push_back(resp.y().data());
        }
      });
    for (auto& th : threads) th.join();
    return std::pair{out, merged.load()};
  };
  const auto [alone, merged_off] = run({"--backend", "cpu", "--batch-window-us", "0"});
  const auto [together, merged_on] = run({"--backend", "cpu", "--batch-window-us", "2000"});
  EXPECT_EQ(merged_off, 0);
  EXPECT_GT(merged_on, 0) << "no softmax call shared a launch";
  std::printf("softmax calls that shared a launch: %d of %d\n", merged_on, kCallers * kCalls);
  EXPECT_EQ(alone, together);
}

// One-row attention calls on the same resident K and V (continuations of one context) share a
// launch, their rows stacked; each caller's output matches float64 attention for its own row.
TEST(DynamicBatching, OneRowAttentionOnSharedResidentKvShareLaunches) {
  constexpr int kCallers = 12, kCalls = 15;
  testing::ServerProcess server(ATTND_PATH, {"--backend", "cpu", "--batch-window-us", "2000"});
  Client client(server.address());
  std::mt19937_64 rng(testing::seed());
  const Tensor k = random_tensor(DType::kFloat32, {2, 2, 3000, 64}, rng),
               v = random_tensor(DType::kFloat32, {2, 2, 3000, 64}, rng);
  auto kh = client.put_tensor(k), vh = client.put_tensor(v);
  ASSERT_TRUE(kh.ok() && vh.ok());
  std::atomic<int> merged{0}, checked{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kCallers; ++t)
    threads.emplace_back([&, t] {
      Client own(server.address());
      std::mt19937_64 r(testing::seed() * 1000 + static_cast<std::uint64_t>(t));
      for (int i = 0; i < kCalls; ++i) {
        const Tensor q = random_tensor(DType::kFloat32, {2, 8, 1, 64}, r);
        v1::AttentionRequest req;
        *req.mutable_q() = to_wire(q);
        *req.mutable_k() = Client::resident(kh->handle());
        *req.mutable_v() = Client::resident(vh->handle());
        req.set_causal(i % 2 == 0);  // one row sees every key either way
        req.set_return_lse(true);
        v1::AttentionResponse resp;
        grpc::ClientContext ctx;
        const grpc::Status s = own.stub().Attention(&ctx, req, &resp);
        ASSERT_TRUE(s.ok()) << s.error_message();
        merged += resp.timings().batched_calls() > 1;
        AttentionArgs args{
            q.view(), k.view(), v.view(), q.view(), {}, false, resolve_attention_scale(0, 64)};
        std::vector<double> want_lse;
        const std::vector<double> want = reference::attention(args, &want_lse);
        EXPECT_LE(reference::relative_frobenius_error(testing::from_wire(resp.o()).view(), want),
                  reference::tolerance(DType::kFloat32, 3000));
        EXPECT_LE(reference::lse_error(testing::from_wire(resp.lse()).view(), want_lse), 1e-4);
        ++checked;
      }
    });
  for (auto& th : threads) th.join();
  EXPECT_EQ(checked.load(), kCallers * kCalls);
  EXPECT_GT(merged.load(), 0) << "no attention call shared a launch";
  std::printf("attention calls that shared a launch: %d of %d\n", merged.load(), kCallers * kCalls);
}

}  // namespace
}  // namespace attn
