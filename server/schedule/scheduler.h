// One bounded queue and one worker thread per executor (a device, or one stream of a GPU).
// Handlers submit jobs with a placement; a full queue refuses at once (RESOURCE_EXHAUSTED)
// instead of growing without bound. A job whose caller cancelled or whose deadline passed gives
// its slot back: it is dropped, never run.
//
// State: a job may name the state object it touches (a KV cache, anything mutable on a device).
// Jobs on one state object run one at a time in the order they were submitted, on one worker
// (whichever the first of them went to, while any is queued or running); jobs on other state
// objects, or on none, go to the least loaded worker and run in parallel.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "attn/executor.h"

namespace attn::server {

// The identity of a state object (its address: the job keeps the object alive until it ends).
using StateKey = const void*;

// Dynamic batching: a job that may share one launch with other jobs of the same key waiting in
// the same queue (decode calls on one cache and layer, softmax calls of one row width, ...).
class BatchMember {
 public:
  virtual ~BatchMember() = default;
  // Jobs merge only when their keys are equal; an empty key never merges.
  virtual const std::string& batch_key() const = 0;
  // Whether this job may join `batch` (the members so far, in queue order): e.g. it touches no
  // sequence they touch.
  virtual bool joins(const std::vector<const BatchMember*>& batch) const = 0;
  struct Merged {
    BatchMember* member;
    std::int64_t queue_ns;  // its wait, the wait for company included
  };
  // Runs `members` (this one first, at least two) as one launch and finishes each member's call
  // with its own result or its own error.
  virtual void run_together(Executor& executor, const std::vector<Merged>& members) = 0;
};

struct BatchingOptions {
  // The longest the first job of a batch waits for company after it was queued; 0: batching off
  // (every job runs alone).
  std::chrono::microseconds window{0};
  // The most jobs one launch takes.
  std::size_t max_calls = 64;
};

// Where a job may run.
struct Placement {
  Backend backend = Backend::kCpu;
  // A CUDA ordinal: any executor (stream) of that GPU; -1: any executor of `backend`.
  int device = -1;
  // The state the job touches, or null.
  StateKey state = nullptr;
  // The job may run on the submitting thread when its executor is idle (tiny ops: a hand-off
  // to the worker would cost more than the op). Never for a job whose state has jobs pending.
  bool inline_when_idle = false;
};

class Scheduler {
 public:
  struct Job {
    // Runs on the executor's worker thread (or inline) with the time the job waited in the queue.
    std::function<void(Executor& executor, std::int64_t queue_ns)> run;
    // Why the job need not run any more (its caller cancelled, its deadline passed), or OK.
    std::function<Status()> abandoned;
    // Finishes an abandoned job without running it.
    std::function<void(const Status& why)> drop;
    // Set when the job may be merged with others (BatchMember); null: it always runs alone.
    std::shared_ptr<BatchMember> batch;
  };

  // What the workers saw of batching, for the metrics and the tests.
  struct BatchStats {
    std::uint64_t launches = 0;  // merged launches (two calls or more)
    std::uint64_t calls = 0;     // calls they served
  };

  Scheduler(std::vector<std::unique_ptr<Executor>> executors, std::size_t queue_depth,
            BatchingOptions batching = {});
  ~Scheduler();

  // Queues `job` where `placement` allows: on the worker holding its state's earlier jobs, else
  // the least loaded one. UNAVAILABLE when no executor fits or the scheduler stops,
  // RESOURCE_EXHAUSTED when the chosen queue is full.
  Status submit(const Placement& placement, Job job);
  // Runs the queued jobs, then stops the workers.
  void stop();

  const std::vector<std::unique_ptr<Executor>>& executors() const { return executors_; }
  std::size_t queue_depth() const { return queue_depth_; }
  // Jobs waiting or running on the i-th executor.
  std::size_t load(std::size_t i) const;
  // The least loaded executor where `placement` may run (state aside), or none.
  std::optional<std::size_t> least_loaded(const Placement& placement) const;
  // The CUDA ordinal of the i-th executor, or -1 for the CPU.
  int device_of(std::size_t i) const;
  const BatchingOptions& batching() const { return batching_; }
  BatchStats batch_stats() const;

 private:
  struct Worker;
  struct StateQueue {
    Worker* worker = nullptr;
    std::size_t pending = 0;  // jobs queued or running
  };
  bool fits(std::size_t i, const Placement& placement) const;
  // The worker for `placement` (state_mu_ held), or null.
  Worker* choose(const Placement& placement);
  Status enqueue(Worker* worker, Job job, std::int64_t* inline_ran);
  void state_done(StateKey state);

  std::vector<std::unique_ptr<Executor>> executors_;
  std::vector<std::unique_ptr<Worker>> workers_;
  std::size_t queue_depth_;
  BatchingOptions batching_;
  std::mutex state_mu_;  // taken before a worker's mutex, never after
  std::map<StateKey, StateQueue> states_;
};

}  // namespace attn::server
