#include "scheduler.h"

#include <chrono>

namespace attn::server {

struct Scheduler::Worker {
  struct Entry {
    Job job;
    std::chrono::steady_clock::time_point enqueued;
  };
  Executor* executor = nullptr;
  mutable std::mutex mu;
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
      if (Status why = e.job.abandoned(); !why.ok()) {
        e.job.drop(why);
      } else {
        const auto waited = std::chrono::steady_clock::now() - e.enqueued;
        e.job.run(*executor, std::chrono::duration_cast<std::chrono::nanoseconds>(waited).count());
      }
      std::lock_guard lock(mu);
      --running;
    }
  }

  // Takes the abandoned entries out of the queue (the caller drops them outside the lock).
  std::vector<std::pair<Entry, Status>> take_abandoned() {
    std::vector<std::pair<Entry, Status>> out;
    for (auto it = queue.begin(); it != queue.end();) {
      if (Status why = it->job.abandoned(); !why.ok()) {
        out.emplace_back(std::move(*it), std::move(why));
        it = queue.erase(it);
      } else {
        ++it;
      }
    }
    return out;
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

std::size_t Scheduler::load(std::size_t i) const {
  std::lock_guard lock(workers_.at(i)->mu);
  return workers_[i]->queue.size() + workers_[i]->running;
}

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
  return enqueue(best, std::move(job));
}

Status Scheduler::submit_to(std::size_t executor, Job job) {
  if (executor >= workers_.size()) return internal_error("no executor " + std::to_string(executor));
  return enqueue(workers_[executor].get(), std::move(job));
}

Status Scheduler::enqueue(Worker* best, Job job) {
  std::vector<std::pair<Worker::Entry, Status>> dropped;
  Status result = Status::Ok();
  {
    std::lock_guard lock(best->mu);
    if (best->stopping) return unavailable("the server is shutting down");
    // Full: first give the slots of callers that have gone (cancelled, out of time) back.
    if (best->queue.size() >= queue_depth_) dropped = best->take_abandoned();
    if (best->queue.size() >= queue_depth_) {
      result = resource_exhausted("queue: all " + std::to_string(queue_depth_) +
                                  " slots of the device queue are taken; retry later");
    } else {
      best->queue.push_back({std::move(job), std::chrono::steady_clock::now()});
      best->cv.notify_one();
    }
  }
  for (auto& [entry, why] : dropped) entry.job.drop(why);
  return result;
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
