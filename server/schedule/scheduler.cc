#include "schedule/scheduler.h"

#include <chrono>
#include <map>
#include <string>

namespace attn::server {

using Clock = std::chrono::steady_clock;

struct Scheduler::Worker {
  struct Entry {
    Job job;
    Clock::time_point enqueued;
    StateKey state = nullptr;
  };
  using Dropped = std::vector<std::pair<Entry, Status>>;

  Scheduler* owner = nullptr;
  Executor* executor = nullptr;
  mutable std::mutex mu;
  std::condition_variable cv;
  std::deque<Entry> queue;
  std::size_t running = 0;
  bool stopping = false;
  std::thread thread;
  // Batching: per key, whether its last launch had company (only then is it worth waiting for).
  std::map<std::string, bool> had_company;
  BatchStats stats;

  std::size_t load() const {
    std::lock_guard lock(mu);
    return queue.size() + running;
  }

  static std::int64_t waited_ns(const Entry& e) {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - e.enqueued).count();
  }

  // Moves the queued jobs that may join the batch into `batch` (mu held): same key, joinable,
  // still wanted. A job on the same state that cannot join stops the search, so nothing overtakes
  // it (its turn may matter: two calls on one cache draw on one free list); jobs whose callers
  // have gone are passed over (they will be dropped, never run).
  void gather(std::vector<Entry>& batch, std::size_t max_calls) {
    // By value: `batch` grows below.
    const std::string key = batch.front().job.batch->batch_key();
    const StateKey state = batch.front().state;
    std::vector<const BatchMember*> members;
    for (const Entry& b : batch) members.push_back(b.job.batch.get());
    for (auto it = queue.begin(); it != queue.end() && batch.size() < max_calls;) {
      if (!it->job.abandoned().ok()) {
        ++it;
        continue;
      }
      const BatchMember* m = it->job.batch.get();
      if (m && m->batch_key() == key && m->joins(members)) {
        members.push_back(m);
        batch.push_back(std::move(*it));
        it = queue.erase(it);
      } else if (state && it->state == state) {
        break;
      } else {
        ++it;
      }
    }
  }

  void loop() {
    for (;;) {
      std::vector<Entry> batch;
      {
        std::unique_lock lock(mu);
        cv.wait(lock, [&] { return stopping || !queue.empty(); });
        if (queue.empty()) return;  // stopping and drained
        batch.push_back(std::move(queue.front()));
        queue.pop_front();
        // Busy from now on: while it waits for company, no one may run a job inline on its
        // executor, and it counts in the load.
        ++running;
        const BatchingOptions& opts = owner->batching_;
        const Job& first = batch.front().job;
        if (first.batch && !first.batch->batch_key().empty() && opts.window.count() > 0 &&
            opts.max_calls > 1 && first.abandoned().ok()) {
          const std::string key = first.batch->batch_key();
          const auto deadline = batch.front().enqueued + opts.window;
          gather(batch, opts.max_calls);
          // Wait for company only where the key had company last time: a lone caller never waits.
          while (batch.size() < opts.max_calls && had_company[key] && !stopping &&
                 Clock::now() < deadline) {
            const std::size_t before = queue.size();
            cv.wait_until(lock, deadline, [&] { return stopping || queue.size() > before; });
            gather(batch, opts.max_calls);
          }
          had_company[key] = batch.size() > 1;
          if (had_company.size() > 4096) had_company.clear();  // keys of long-gone caches
          if (batch.size() > 1) ++stats.launches, stats.calls += batch.size();
        }
        running += batch.size() - 1;
      }
      run(batch);
      std::lock_guard lock(mu);
      running -= batch.size();
    }
  }

  void run(std::vector<Entry>& batch) {
    if (batch.size() == 1) {
      Entry& e = batch.front();
      if (Status why = e.job.abandoned(); !why.ok()) {
        e.job.drop(why);
      } else {
        e.job.run(*executor, waited_ns(e));
      }
    } else {
      std::vector<BatchMember::Merged> members;
      for (Entry& e : batch) members.push_back({e.job.batch.get(), waited_ns(e)});
      batch.front().job.batch->run_together(*executor, members);
    }
    for (Entry& e : batch)
      if (e.state) owner->state_done(e.state);
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

Scheduler::Scheduler(std::vector<std::unique_ptr<Executor>> executors, std::size_t queue_depth,
                     BatchingOptions batching)
    : executors_(std::move(executors)), queue_depth_(queue_depth), batching_(batching) {
  for (auto& ex : executors_) {
    auto w = std::make_unique<Worker>();
    w->owner = this;
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
      w->queue.push_back({std::move(job), Clock::now(), placement.state});
      w->cv.notify_one();
      if (placement.state) {
        StateQueue& s = states_[placement.state];
        s.worker = w;
        ++s.pending;
      }
    }
  }
  for (auto& [entry, why] : dropped) {  // with no lock held: drops finish calls
    entry.job.drop(why);
    if (entry.state) state_done(entry.state);
  }
  return result;
}

Scheduler::BatchStats Scheduler::batch_stats() const {
  BatchStats total;
  for (const auto& w : workers_) {
    std::lock_guard lock(w->mu);
    total.launches += w->stats.launches;
    total.calls += w->stats.calls;
  }
  return total;
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
