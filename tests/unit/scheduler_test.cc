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
#include "schedule/scheduler.h"
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

// Dynamic batching with a BatchMember that records how it ran.
struct Recorder {
  std::mutex mu;
  std::vector<std::vector<int>> launches;  // ids per launch, in launch order
};

class TestMember final : public BatchMember {
 public:
  TestMember(Recorder& r, int id, std::string key, int conflict) : r_(r), id_(id), key_(std::move(key)), conflict_(conflict) {}
  const std::string& batch_key() const override { return key_; }
  bool joins(const std::vector<const BatchMember*>& batch) const override {
    for (const BatchMember* m : batch)
      if (static_cast<const TestMember*>(m)->conflict_ == conflict_) return false;
    return true;
  }
  void run_together(Executor&, const std::vector<Merged>& members) override {
    std::vector<int> ids;
    for (const Merged& m : members) ids.push_back(static_cast<TestMember*>(m.member)->id_);
    std::lock_guard lock(r_.mu);
    r_.launches.push_back(ids);
  }
  void run_alone() {
    std::lock_guard lock(r_.mu);
    r_.launches.push_back({id_});
  }

 private:
  Recorder& r_;
  int id_;
  std::string key_;
  int conflict_;
};

// Jobs queued behind a busy worker: those of one key merge (up to the limit); nothing overtakes
// a job of the same state that cannot join (a conflict, another key); abandoned jobs are dropped.
TEST(SchedulerBatching, QueuedJobsOfOneKeyMergeInOrder) {
  std::vector<std::unique_ptr<Executor>> one;
  one.push_back(make_cpu_executor());
  BatchingOptions batching;
  batching.window = std::chrono::microseconds(1);  // on, but no waiting to speak of
  batching.max_calls = 3;
  Scheduler scheduler(std::move(one), 100, batching);
  Recorder rec;
  std::atomic<bool> release{false};
  int state = 0;
  Placement p;
  p.state = &state;
  // A blocker holds the worker while the rest queue up.
  ASSERT_TRUE(scheduler.submit(p, job([&](Executor&) {
                while (!release) std::this_thread::sleep_for(std::chrono::milliseconds(1));
              })).ok());
  auto submit = [&](int id, const std::string& key, int conflict, std::atomic<int>* dropped = nullptr,
                    bool gone = false) {
    auto m = std::make_shared<TestMember>(rec, id, key, conflict);
    Scheduler::Job j;
    j.run = [m](Executor&, std::int64_t) { m->run_alone(); };
    j.abandoned = [gone] { return gone ? cancelled("gone") : Status::Ok(); };
    j.drop = [dropped](const Status&) {
      if (dropped) ++*dropped;
    };
    j.batch = m;
    ASSERT_TRUE(scheduler.submit(p, std::move(j)).ok());
  };
  std::atomic<int> dropped{0};
  submit(1, "a", 1);
  submit(2, "a", 2);
  submit(3, "a", 2);  // conflicts with 2: cannot join that batch
  submit(4, "a", 4, &dropped, /*gone=*/true);  // its caller went away: dropped, never merged
  submit(5, "a", 5);
  submit(6, "a", 6);
  submit(7, "b", 7);  // another key, the same state: nothing of key a may pass it
  submit(8, "a", 8);
  release = true;
  scheduler.stop();
  // 3 cannot join 1 and 2 (a conflict), so nothing after it may: it leads the next batch, which
  // passes over 4 (its caller went away: dropped when reached) and takes 5 and 6 up to the limit;
  // 7 is another key on the same state, 8 comes after it.
  std::vector<std::vector<int>> want{{1, 2}, {3, 5, 6}, {7}, {8}};
  EXPECT_EQ(rec.launches, want);
  EXPECT_EQ(dropped.load(), 1);
  EXPECT_EQ(scheduler.batch_stats().launches, 2u);
  EXPECT_EQ(scheduler.batch_stats().calls, 5u);
}

TEST(SchedulerBatching, WindowZeroMeansEveryJobRunsAlone) {
  std::vector<std::unique_ptr<Executor>> one;
  one.push_back(make_cpu_executor());
  Scheduler scheduler(std::move(one), 100, BatchingOptions{});
  Recorder rec;
  std::atomic<bool> release{false};
  ASSERT_TRUE(scheduler.submit({}, job([&](Executor&) {
                while (!release) std::this_thread::sleep_for(std::chrono::milliseconds(1));
              })).ok());
  for (int id = 1; id <= 4; ++id) {
    auto m = std::make_shared<TestMember>(rec, id, "a", id);
    Scheduler::Job j = job([m](Executor&) { m->run_alone(); });
    j.batch = m;
    ASSERT_TRUE(scheduler.submit({}, std::move(j)).ok());
  }
  release = true;
  scheduler.stop();
  EXPECT_EQ(rec.launches, (std::vector<std::vector<int>>{{1}, {2}, {3}, {4}}));
  EXPECT_EQ(scheduler.batch_stats().launches, 0u);
}

// A key that had company waits up to the window for more; a lone key never waits.
TEST(SchedulerBatching, WaitsForCompanyOnlyWhereItCameBefore) {
  std::vector<std::unique_ptr<Executor>> one;
  one.push_back(make_cpu_executor());
  BatchingOptions batching;
  batching.window = std::chrono::milliseconds(1000);  // wide: the sanitizer build and a loaded machine
  Scheduler scheduler(std::move(one), 100, batching);
  Recorder rec;
  auto submit = [&](int id) {
    auto m = std::make_shared<TestMember>(rec, id, "a", id);
    Scheduler::Job j = job([m](Executor&) { m->run_alone(); });
    j.batch = m;
    ASSERT_TRUE(scheduler.submit({}, std::move(j)).ok());
  };
  auto wait_for = [&](std::size_t launches) {
    for (int i = 0; i < 5000; ++i) {
      {
        std::lock_guard lock(rec.mu);
        if (rec.launches.size() >= launches) return;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
  };
  // Alone, with no history: runs at once, well inside the window.
  auto t0 = std::chrono::steady_clock::now();
  submit(1);
  wait_for(1);
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::milliseconds(800));
  // Two together (queued behind a blocker) give the key company...
  std::atomic<bool> release{false};
  ASSERT_TRUE(scheduler.submit({}, job([&](Executor&) {
                while (!release) std::this_thread::sleep_for(std::chrono::milliseconds(1));
              })).ok());
  submit(2);
  submit(3);
  release = true;
  wait_for(2);
  // ...so the next one waits for a partner that comes 50 ms later, and they share a launch.
  submit(4);
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  submit(5);
  wait_for(3);
  scheduler.stop();
  EXPECT_EQ(rec.launches, (std::vector<std::vector<int>>{{1}, {2, 3}, {4, 5}}));
}

}  // namespace
}  // namespace attn::server
