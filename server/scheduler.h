// One bounded queue and one worker thread per device. Handlers submit jobs; a full queue refuses
// at once (RESOURCE_EXHAUSTED) instead of growing without bound.
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
  // Runs on the device's worker thread with the time it waited in the queue.
  using Job = std::function<void(Executor& executor, std::int64_t queue_ns)>;

  Scheduler(std::vector<std::unique_ptr<Executor>> executors, std::size_t queue_depth);
  ~Scheduler();

  // Queues `job` on the least loaded device of `backend`.
  Status submit(Backend backend, Job job);
  // Runs the queued jobs, then stops the workers.
  void stop();

  const std::vector<std::unique_ptr<Executor>>& executors() const { return executors_; }
  std::size_t queue_depth() const { return queue_depth_; }

 private:
  struct Worker;
  std::vector<std::unique_ptr<Executor>> executors_;
  std::vector<std::unique_ptr<Worker>> workers_;
  std::size_t queue_depth_;
};

}  // namespace attn::server
