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
    alone = run_decode_callers(server.address(), kCallers, kBad, kHurried);
  }
  {
    testing::ServerProcess server(ATTND_PATH, {"--backend", "cpu", "--batch-window-us", "2000"});
    merged = run_decode_callers(server.address(), kCallers, kBad, kHurried);
  }
  int merged_calls = 0;
  for (int t = 0; t < kCallers; ++t) {
    const CallerLog& a = alone[static_cast<std::size_t>(t)];
    const CallerLog& b = merged[static_cast<std::size_t>(t)];
    EXPECT_EQ(a.merged, 0) << "batching off, yet caller " << t << " shared a launch";
    merged_calls += b.merged;
    if (t == kBad) {
      EXPECT_EQ(b.codes.at(grpc::StatusCode::NOT_FOUND), kDecodeSteps * kDecodeLayers) << "the bad caller fails alone, every time";
      continue;
    }
    if (t == kHurried) {
      for (const auto& [code, n] : b.codes)
        EXPECT_TRUE(code == grpc::StatusCode::OK || code == grpc::StatusCode::DEADLINE_EXCEEDED) << code;
      continue;
    }
    EXPECT_EQ(b.ok, kDecodeSteps * kDecodeLayers) << "caller " << t;
    ASSERT_EQ(a.outputs.size(), b.outputs.size());
    for (const auto& [at, bytes] : a.outputs)
      EXPECT_EQ(b.outputs.at(at), bytes) << "caller " << t << " step " << at.first << " layer " << at.second;
  }
  ::testing::Test::RecordProperty("merged_calls", merged_calls);
  std::printf("calls that shared a launch: %d of %d\n", merged_calls, (kCallers - 2) * kDecodeSteps * kDecodeLayers);
  // The comparison means something only if calls did share launches.
  EXPECT_GT(merged_calls, 0) << "no call shared a launch";
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
          *req.mutable_x() = to_wire(random_tensor(DType::kFloat32, {1 + static_cast<std::int64_t>(rng() % 200), 1024}, rng));
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

}  // namespace
}  // namespace attn
