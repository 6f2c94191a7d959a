#include "state/memory_budget.h"

#include <malloc.h>
#include <unistd.h>

#include <algorithm>
#include <fstream>
#include <vector>

namespace attn::server {
namespace {

constexpr std::size_t kMiB = std::size_t{1} << 20;

std::string mib(std::size_t bytes) { return std::to_string((bytes + kMiB - 1) / kMiB) + " MiB"; }

}  // namespace

std::size_t MemoryBudget::small_call_reserve() const {
  return std::min(limit_ / 32, std::size_t{64} << 20);
}

bool MemoryBudget::try_take(std::size_t bytes, std::size_t keep_free) {
  const std::size_t room = limit_ > keep_free ? limit_ - keep_free : 0;
  std::size_t used = used_.load();
  do {
    if (bytes > room || used > room - bytes) return false;
  } while (!used_.compare_exchange_weak(used, used + bytes));
  return true;
}

void MemoryBudget::give_back(std::size_t bytes, bool wake) {
  used_.fetch_sub(bytes);  // sequentially consistent with waiting_ (see take_when_free)
  if (wake && waiting_.load() > 0) grant_waiters();
}

void MemoryBudget::grant_waiters() {
  std::vector<std::function<void()>> granted;
  {
    std::lock_guard<std::mutex> lock(waiters_mutex_);
    for (auto it = waiters_.begin(); it != waiters_.end();) {
      if (try_take(it->bytes, it->keep_free)) {
        granted.push_back(std::move(it->granted));
        it = waiters_.erase(it);
        waiting_.fetch_sub(1);
      } else {
        ++it;
      }
    }
  }
  for (auto& g : granted) g();
}

Result<std::uint64_t> MemoryBudget::take_when_free(std::size_t bytes, const std::string& what,
                                                   std::size_t keep_free,
                                                   std::function<void()> granted) {
  std::unique_lock<std::mutex> lock(waiters_mutex_);
  // Counted as waiting before trying, so that a give_back() between the try and the wait below
  // sees it (both atomics sequentially consistent) and grants it once this lock is let go.
  waiting_.fetch_add(1);
  if (try_take(bytes, keep_free)) {
    waiting_.fetch_sub(1);
    return std::uint64_t{0};
  }
  const std::size_t resident = resident_.load();
  if (bytes + keep_free > limit_ || resident > limit_ - keep_free - bytes) {
    waiting_.fetch_sub(1);
    lock.unlock();
    return take(bytes, what, keep_free);  // refused, naming the bytes and the limit
  }
  const std::uint64_t ticket = next_ticket_++;
  waiters_.push_back(Waiter{ticket, bytes, keep_free, std::move(granted)});
  return ticket;
}

bool MemoryBudget::withdraw(std::uint64_t ticket) {
  std::lock_guard<std::mutex> lock(waiters_mutex_);
  for (auto it = waiters_.begin(); it != waiters_.end(); ++it) {
    if (it->ticket == ticket) {
      waiters_.erase(it);
      waiting_.fetch_sub(1);
      return true;
    }
  }
  return false;
}

Status MemoryBudget::take(std::size_t bytes, const std::string& what, std::size_t keep_free) {
  std::size_t used = used_.load(std::memory_order_relaxed);
  const std::size_t room = limit_ > keep_free ? limit_ - keep_free : 0;
  do {
    if (bytes > room || used > room - bytes) {
      return resource_exhausted(
          what + ": " + mib(bytes) +
          " would bring the host memory this server holds (calls' "
          "bytes; on the CPU backend also resident tensors and KV caches) to " +
          mib(used + bytes) + ", over its limit of " + mib(limit_) + " (--max-inflight-mb" +
          (keep_free ? ", less " + mib(keep_free) + " kept for small calls" : std::string()) +
          "); retry when fewer calls are in flight or fewer tensors held");
    }
  } while (!used_.compare_exchange_weak(used, used + bytes, std::memory_order_relaxed));
  return Status::Ok();
}

Status MemoryBudget::take_resident(std::size_t bytes, const std::string& what) {
  ATTN_RETURN_IF_ERROR(take(bytes, what));
  resident_.fetch_add(bytes);
  return Status::Ok();
}

void MemoryBudget::give_back_resident(std::size_t bytes) {
  resident_.fetch_sub(bytes);
  give_back(bytes);
}

Status MemoryHold::add(std::size_t bytes, const std::string& what) {
  if (budget_) ATTN_RETURN_IF_ERROR(budget_->take(bytes, what));
  bytes_ += bytes;
  return Status::Ok();
}

void MemoryHold::shrink_to(std::size_t bytes) {
  if (bytes >= bytes_) return;
  if (budget_) budget_->give_back(bytes_ - bytes, /*wake=*/false);
  bytes_ = bytes;
}

void MemoryHold::adopt(std::size_t bytes) { bytes_ += bytes; }

Status MemoryHold::add_large(std::size_t bytes, const std::string& what) {
  if (budget_) ATTN_RETURN_IF_ERROR(budget_->take(bytes, what, budget_->small_call_reserve()));
  bytes_ += bytes;
  return Status::Ok();
}

void MemoryHold::release() {
  if (budget_ && bytes_) budget_->give_back(bytes_);
  bytes_ = 0;
}

std::size_t process_memory_bytes() {
  std::size_t memory = static_cast<std::size_t>(sysconf(_SC_PHYS_PAGES)) *
                       static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
  std::ifstream cgroup("/sys/fs/cgroup/memory.max");  // "max" when unlimited
  std::size_t limit = 0;
  if (cgroup >> limit && limit > 0) memory = std::min(memory, limit);
  return memory;
}

void return_free_memory() { malloc_trim(0); }

void release_freed_memory_promptly() { mallopt(M_MMAP_THRESHOLD, 64 * 1024); }

}  // namespace attn::server
