#include "scheduler.h"

#include <chrono>

namespace attn::server {

using Clock = std::chrono::steady_clock;

struct Scheduler::Worker {
  struct Entry {
    Job job;
    Clock::time_point enqueued;
  };
  using Dropped = std::vector<std::pair<Entry, Status>>;

  Executor* executor = nullptr;
  mutable std::mutex mu;
  std::condition_variable cv;
  std::deque<Entry> queue;
  std::size_t running = 0;
  bool stopping = false;
  std::thread thread;

  std::size_t load() const {
    std::lock_guard lock(mu);
    return queue.size() + running;
  }

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
        const auto waited = Clock::now() - e.enqueued;
        e.job.run(*executor, std::chrono::duration_cast<std::chrono::nanoseconds>(waited).count());
      }
      std::lock_guard lock(mu);
      --running;
    }
  }

  // Takes the abandoned entries out of the queue (mu held; the caller drops them with no lock).
  Dropped take_abandoned() {
    Dropped out;
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

std::size_t Scheduler::load(std::size_t i) const { return workers_.at(i)->load(); }

int Scheduler::device_of(std::size_t i) const {
  const Executor& ex = *executors_.at(i);
  return ex.target().backend == Backend::kCuda ? ex.device().ordinal : -1;
}

bool Scheduler::fits(std::size_t i, const Placement& p) const {
  return executors_[i]->target().backend == p.backend && (p.device < 0 || device_of(i) == p.device);
}

std::optional<std::size_t> Scheduler::least_loaded(const Placement& placement) const {
  std::optional<std::size_t> best;
  std::size_t best_load = 0;
  for (std::size_t i = 0; i < workers_.size(); ++i) {
    if (!fits(i, placement)) continue;
    const std::size_t l = workers_[i]->load();
    if (!best || l < best_load) best = i, best_load = l;
  }
  return best;
}

Scheduler::Worker* Scheduler::choose(const Placement& placement) {
  if (placement.state) {
    auto it = states_.find(placement.state);
    if (it != states_.end() && it->second.pending > 0) return it->second.worker;
  }
  const auto i = least_loaded(placement);
  return i ? workers_[*i].get() : nullptr;
}

Status Scheduler::submit(const Placement& placement, Job job) {
  Worker::Dropped dropped;
  Status result;
  {
    // Held across the choice and the push, so that jobs on one state keep their order.
    std::unique_lock state_lock(state_mu_, std::defer_lock);
    if (placement.state) state_lock.lock();
    Worker* w = choose(placement);
    if (!w) {
      std::string what = std::string("no ") + backend_name(placement.backend) + " device";
      if (placement.device >= 0) what.append(" ").append(std::to_string(placement.device));
      return unavailable(what + " to run on");
    }
    if (placement.state) {
      auto done = [this, state = placement.state] { state_done(state); };
      job.run = [run = std::move(job.run), done](Executor& ex, std::int64_t queue_ns) {
        run(ex, queue_ns);
        done();
      };
      job.drop = [drop = std::move(job.drop), done](const Status& why) {
        drop(why);
        done();
      };
    }
    std::unique_lock lock(w->mu);
    if (w->stopping) return unavailable("the server is shutting down");
    if (placement.inline_when_idle && !placement.state && w->queue.empty() && w->running == 0) {
      ++w->running;  // others see the executor busy while the job runs here
      lock.unlock();
      job.run(*w->executor, 0);
      lock.lock();
      --w->running;
      return Status::Ok();
    }
    // Full: first give the slots of callers that have gone (cancelled, out of time) back.
    if (w->queue.size() >= queue_depth_) dropped = w->take_abandoned();
    if (w->queue.size() >= queue_depth_) {
      result = resource_exhausted("queue: all " + std::to_string(queue_depth_) +
                                  " slots of the device queue are taken; retry later");
    } else {
      w->queue.push_back({std::move(job), Clock::now()});
      w->cv.notify_one();
      if (placement.state) {
        StateQueue& s = states_[placement.state];
        s.worker = w;
        ++s.pending;
      }
    }
  }
  for (auto& [entry, why] : dropped) entry.job.drop(why);  // with no lock held: drops finish calls
  return result;
}

void Scheduler::state_done(StateKey state) {
  std::lock_guard lock(state_mu_);
  auto it = states_.find(state);
  if (it != states_.end() && --it->second.pending == 0) states_.erase(it);
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
