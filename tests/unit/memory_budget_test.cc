// The in-flight memory budget: what a call waiting for room is refused for, and what it waits for.
#include "state/memory_budget.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <thread>
#include <vector>

namespace attn::server {
namespace {

constexpr std::size_t kMiB = std::size_t{1} << 20;

// A take that could fit once calls give their bytes back waits; one that resident state keeps
// out is refused at once, naming the limit.
TEST(MemoryBudget, WaitsForCallsAndIsRefusedForResidentState) {
  MemoryBudget budget(512 * kMiB);
  MemoryHold call(&budget);
  ASSERT_TRUE(call.add(300 * kMiB, "request").ok());
  int granted = 0;
  auto ticket = budget.take_when_free(256 * kMiB, "room", 16 * kMiB, [&] { ++granted; });
  ASSERT_TRUE(ticket.ok()) << ticket.status().message();
  EXPECT_NE(*ticket, 0u);
  EXPECT_EQ(granted, 0);
  call.release();
  EXPECT_EQ(granted, 1);
  EXPECT_EQ(budget.used(), 256 * kMiB);
  budget.give_back(256 * kMiB);

  ASSERT_TRUE(budget.take_resident(300 * kMiB, "tensors").ok());
  auto refused = budget.take_when_free(256 * kMiB, "room", 16 * kMiB, [&] { ++granted; });
  ASSERT_FALSE(refused.ok());
  EXPECT_THAT(refused.status().message(), ::testing::HasSubstr("--max-inflight-mb"));
  budget.give_back_resident(300 * kMiB);
  EXPECT_EQ(budget.used(), 0u);
}

// A withdrawn take is never granted, and what it asked for stays free.
TEST(MemoryBudget, WithdrawnTakeIsNeverGranted) {
  MemoryBudget budget(512 * kMiB);
  MemoryHold call(&budget);
  ASSERT_TRUE(call.add(400 * kMiB, "request").ok());
  bool granted = false;
  auto ticket = budget.take_when_free(256 * kMiB, "room", 0, [&] { granted = true; });
  ASSERT_TRUE(ticket.ok());
  EXPECT_TRUE(budget.withdraw(*ticket));
  call.release();
  EXPECT_FALSE(granted);
  EXPECT_EQ(budget.used(), 0u);
}

// Calls taking and giving back beside waiting takes: a take that fits once calls are done is
// never refused, however the threads interleave (before: bytes a call had taken but not yet
// counted as its own read as resident state, and a waiting take was refused).
TEST(MemoryBudget, CallsInFlightNeverGetAWaitingTakeRefused) {
  MemoryBudget budget(512 * kMiB);
  std::atomic<int> refused{0}, served{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 500; ++i) {
        std::atomic<bool> done{false};
        auto ticket = budget.take_when_free(200 * kMiB, "room", 16 * kMiB, [&] { done = true; });
        if (!ticket.ok()) {
          ++refused;
          continue;
        }
        if (*ticket != 0) {
          while (!done.load()) std::this_thread::yield();
        }
        // A moment between the take and the call's hold adopting it, as gRPC has (the call's
        // read starting on another thread).
        std::this_thread::sleep_for(std::chrono::microseconds(20));
        MemoryHold hold(&budget);
        hold.adopt(200 * kMiB);
        hold.shrink_to(150 * kMiB);
        ++served;
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(refused.load(), 0);
  EXPECT_EQ(served.load(), 2000);
  EXPECT_EQ(budget.used(), 0u);
}

}  // namespace
}  // namespace attn::server
