#include "scheduler.h"

#include <chrono>

namespace attn::server {

struct Scheduler::Worker {
  struct Entry {
    Job job;
    std::chrono::steady_clock::time_point enqueued;
  };
  Executor* executor = nullptr;
  std::mutex mu;
  std::condition_variable cv;
  std::deque<Entry> queue;
  std::size_t running = 0;
  bool stopping = false;
  std::thread thread;

  void loop() {
    for (;;) {
      Entry e;
      {
        std::unique_lock lock(mu);
        cv.wait(lock, [&] { return stopping || !queue.empty(); });
        if (queue.empty()) return;  // stopping and drained
        e = std::move(queue.front());
        queue.pop_front();
        ++running;
      }
      const auto waited = std::chrono::steady_clock::now() - e.enqueued;
      e.job(*executor, std::chrono::duration_cast<std::chrono::nanoseconds>(waited).count());
      std::lock_guard lock(mu);
      --running;
    }
  }
};

Scheduler::Scheduler(std::vector<std::unique_ptr<Executor>> executors, std::size_t queue_depth)
    : executors_(std::move(executors)), queue_depth_(queue_depth) {
  for (auto& ex : executors_) {
    auto w = std::make_unique<Worker>();
    w->executor = ex.get();
    w->thread = std::thread([raw = w.get()] { raw->loop(); });
    workers_.push_back(std::move(w));
  }
}

Scheduler::~Scheduler() { stop(); }

Status Scheduler::submit(Backend backend, Job job) {
  Worker* best = nullptr;
  std::size_t best_load = 0;
  for (auto& w : workers_) {
    if (w->executor->target().backend != backend) continue;
    std::lock_guard lock(w->mu);
    const std::size_t load = w->queue.size() + w->running;
    if (!best || load < best_load) best = w.get(), best_load = load;
  }
  if (!best) return unavailable(std::string("no ") + backend_name(backend) + " device to run on");
  std::lock_guard lock(best->mu);
  if (best->stopping) return unavailable("the server is shutting down");
  if (best->queue.size() >= queue_depth_) {
    return resource_exhausted("queue: all " + std::to_string(queue_depth_) +
                              " slots of the device queue are taken; retry later");
  }
  best->queue.push_back({std::move(job), std::chrono::steady_clock::now()});
  best->cv.notify_one();
  return Status::Ok();
}

void Scheduler::stop() {
  for (auto& w : workers_) {
    {
      std::lock_guard lock(w->mu);
      w->stopping = true;
    }
    w->cv.notify_all();
  }
  for (auto& w : workers_)
    if (w->thread.joinable()) w->thread.join();
}

}  // namespace attn::server
