// The scheduler's ordering of work on shared state, with two real CPU executors (two workers, as
// two streams of a GPU would be): jobs that touch one state object run one at a time in the order
// they were submitted, while jobs on other objects run beside them.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <map>
#include <mutex>
#include <random>
#include <thread>

#include "attn/executor.h"
#include "scheduler.h"
#include "support/random.h"

namespace attn::server {
namespace {

std::vector<std::unique_ptr<Executor>> two_workers() {
  std::vector<std::unique_ptr<Executor>> ex;
  ex.push_back(make_cpu_executor());
  ex.push_back(make_cpu_executor());
  return ex;
}

Scheduler::Job job(std::function<void(Executor&)> body, std::atomic<int>* dropped = nullptr) {
  Scheduler::Job j;
  j.run = [body = std::move(body)](Executor& ex, std::int64_t) { body(ex); };
  j.abandoned = [] { return Status::Ok(); };
  j.drop = [dropped](const Status&) {
    if (dropped) ++*dropped;
  };
  return j;
}

TEST(Scheduler, JobsOnOneStateRunInArrivalOrderOthersInParallel) {
  Scheduler scheduler(two_workers(), 1000);
  constexpr int kStates = 4, kJobsPerState = 60;
  int states[kStates];  // their addresses are the state keys
  std::mutex mu;
  std::map<int, std::vector<int>> ran;      // state -> sequence numbers in the order they ran
  std::atomic<int> running_per_state[kStates] = {};
  std::atomic<int> running{0}, most_running{0}, overlaps_within_a_state{0};
  std::atomic<int> done{0};

  std::vector<std::thread> submitters;
  for (int s = 0; s < kStates; ++s)
    submitters.emplace_back([&, s] {
      std::mt19937_64 rng(testing::seed() + static_cast<std::uint64_t>(s));
      for (int n = 0; n < kJobsPerState; ++n) {
        const int sleep_us = std::uniform_int_distribution<int>(50, 400)(rng);
        Placement p;
        p.state = &states[s];
        const Status queued = scheduler.submit(p, job([&, s, n, sleep_us](Executor&) {
          if (++running_per_state[s] > 1) ++overlaps_within_a_state;
          const int now = ++running;
          for (int m = most_running; now > m && !most_running.compare_exchange_weak(m, now);) {
          }
          {
            std::lock_guard lock(mu);
            ran[s].push_back(n);
          }
          std::this_thread::sleep_for(std::chrono::microseconds(sleep_us));
          --running;
          --running_per_state[s];
          ++done;
        }));
        ASSERT_TRUE(queued.ok()) << queued.to_string();
        // Submitters race each other, so the states' jobs interleave in the queues.
        std::this_thread::sleep_for(std::chrono::microseconds(sleep_us / 4));
      }
    });
  for (auto& t : submitters) t.join();
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (done < kStates * kJobsPerState && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  ASSERT_EQ(done, kStates * kJobsPerState);

  EXPECT_EQ(overlaps_within_a_state, 0) << "two jobs on one state ran at once";
  for (int s = 0; s < kStates; ++s) {
    ASSERT_EQ(ran[s].size(), static_cast<std::size_t>(kJobsPerState));
    for (int n = 0; n < kJobsPerState; ++n) ASSERT_EQ(ran[s][static_cast<std::size_t>(n)], n) << "state " << s;
  }
  EXPECT_EQ(most_running, 2) << "jobs on different states never ran side by side";
}

TEST(Scheduler, StatelessJobsGoToTheLeastLoadedWorker) {
  Scheduler scheduler(two_workers(), 1000);
  std::mutex mu;
  std::map<const Executor*, int> by_executor;
  std::atomic<int> done{0};
  for (int n = 0; n < 40; ++n) {
    const Status queued = scheduler.submit(Placement{}, job([&](Executor& ex) {
      {
        std::lock_guard lock(mu);
        ++by_executor[&ex];
      }
      std::this_thread::sleep_for(std::chrono::microseconds(300));
      ++done;
    }));
    ASSERT_TRUE(queued.ok());
  }
  while (done < 40) std::this_thread::sleep_for(std::chrono::milliseconds(2));
  EXPECT_EQ(by_executor.size(), 2u);
}

TEST(Scheduler, AnAbandonedJobReleasesItsStateAndAFullQueueRefuses) {
  Scheduler scheduler(two_workers(), 1);
  int state = 0;
  Placement p;
  p.state = &state;
  std::atomic<bool> started{false}, release{false};
  std::atomic<int> dropped{0}, ran{0};
  // The first job holds its worker; the second waits in the queue (depth 1) and is abandoned.
  ASSERT_TRUE(scheduler.submit(p, job([&](Executor&) {
                                 started = true;
                                 while (!release) std::this_thread::sleep_for(std::chrono::milliseconds(1));
                                 ++ran;
                               }))
                  .ok());
  while (!started) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  Scheduler::Job gone = job([&](Executor&) { ++ran; }, &dropped);
  gone.abandoned = [] { return cancelled("the caller went away"); };
  ASSERT_TRUE(scheduler.submit(p, std::move(gone)).ok());
  // The state's worker is full: a third job on the state gives the abandoned slot back first.
  ASSERT_TRUE(scheduler.submit(p, job([&](Executor&) { ++ran; })).ok());
  EXPECT_EQ(dropped, 1);
  const Status refused = scheduler.submit(p, job([&](Executor&) { ++ran; }));
  EXPECT_EQ(refused.code(), StatusCode::kResourceExhausted) << refused.to_string();
  release = true;
  while (ran < 2) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  // Everything on the state has ended: the next job may go to either worker and still runs.
  std::atomic<bool> last{false};
  ASSERT_TRUE(scheduler.submit(p, job([&](Executor&) { last = true; })).ok());
  while (!last) std::this_thread::sleep_for(std::chrono::milliseconds(1));
}

TEST(Scheduler, NoExecutorForThePlacementIsUnavailable) {
  Scheduler scheduler(two_workers(), 4);
  Placement p;
  p.backend = Backend::kCuda;
  EXPECT_EQ(scheduler.submit(p, job([](Executor&) {})).code(), StatusCode::kUnavailable);
}

}  // namespace
}  // namespace attn::server
