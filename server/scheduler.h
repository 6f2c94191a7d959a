// One bounded queue and one worker thread per device. Handlers submit jobs; a full queue refuses
// at once (RESOURCE_EXHAUSTED) instead of growing without bound. A job whose caller cancelled or
// whose deadline passed gives its slot back: it is dropped, never run.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "attn/executor.h"

namespace attn::server {

class Scheduler {
 public:
  struct Job {
    // Runs on the device's worker thread with the time the job waited in the queue.
    std::function<void(Executor& executor, std::int64_t queue_ns)> run;
    // Why the job need not run any more (its caller cancelled, its deadline passed), or OK.
    std::function<Status()> abandoned;
    // Finishes an abandoned job without running it.
    std::function<void(const Status& why)> drop;
  };

  Scheduler(std::vector<std::unique_ptr<Executor>> executors, std::size_t queue_depth);
  ~Scheduler();

  // Queues `job` on the least loaded device of `backend`.
  Status submit(Backend backend, Job job);
  // Queues `job` on the i-th executor's device (where its resident data lives).
  Status submit_to(std::size_t executor, Job job);
  // Runs the queued jobs, then stops the workers.
  void stop();

  const std::vector<std::unique_ptr<Executor>>& executors() const { return executors_; }
  std::size_t queue_depth() const { return queue_depth_; }
  // Jobs waiting or running on the i-th executor's device.
  std::size_t load(std::size_t i) const;

 private:
  struct Worker;
  Status enqueue(Worker* worker, Job job);
  std::vector<std::unique_ptr<Executor>> executors_;
  std::vector<std::unique_ptr<Worker>> workers_;
  std::size_t queue_depth_;
};

}  // namespace attn::server
