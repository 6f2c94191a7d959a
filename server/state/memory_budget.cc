#include "state/memory_budget.h"

#include <malloc.h>
#include <unistd.h>

#include <algorithm>
#include <fstream>

namespace attn::server {
namespace {

constexpr std::size_t kMiB = std::size_t{1} << 20;

std::string mib(std::size_t bytes) { return std::to_string((bytes + kMiB - 1) / kMiB) + " MiB"; }

}  // namespace

std::size_t MemoryBudget::small_call_reserve() const {
  return std::min(limit_ / 32, std::size_t{64} << 20);
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

Status MemoryHold::add(std::size_t bytes, const std::string& what) {
  if (budget_) ATTN_RETURN_IF_ERROR(budget_->take(bytes, what));
  bytes_ += bytes;
  return Status::Ok();
}

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
