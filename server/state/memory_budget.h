// The bytes of requests and responses the server holds at once, server-wide: a call takes a hold
// on what it brings (its request, once read) and what it will send (its outputs, as decoding
// allocates them) and gives it back when it is done. A hold that would pass the limit is refused,
// so the call gets RESOURCE_EXHAUSTED at once while the calls already holding memory run on.
// Resident tensors and KV caches in host memory (the CPU backend) are charged to the same budget
// (TensorStoreOptions::host_budget).
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <string>

#include "attn/status.h"

namespace attn::server {

class MemoryBudget {
 public:
  explicit MemoryBudget(std::size_t limit_bytes) : limit_(limit_bytes) {}
  std::size_t limit() const { return limit_; }
  std::size_t used() const { return used_.load(std::memory_order_relaxed); }
  // Takes `bytes` if they fit under the limit with `keep_free` bytes still free after them;
  // `what` names them in the refusal.
  Status take(std::size_t bytes, const std::string& what, std::size_t keep_free = 0);
  // What large requests leave free for small calls: 1/32 of the limit, 64 MiB at most.
  std::size_t small_call_reserve() const;
  void give_back(std::size_t bytes) { used_.fetch_sub(bytes, std::memory_order_relaxed); }

 private:
  const std::size_t limit_;
  std::atomic<std::size_t> used_{0};
};

// One call's share of the budget, given back when destroyed.
class MemoryHold {
 public:
  explicit MemoryHold(MemoryBudget* budget) : budget_(budget) {}
  ~MemoryHold() { release(); }
  MemoryHold(const MemoryHold&) = delete;
  MemoryHold& operator=(const MemoryHold&) = delete;

  // Adds `bytes` to the hold, or says why they do not fit (a null budget holds everything).
  Status add(std::size_t bytes, const std::string& what);
  // The same, leaving the budget's small_call_reserve() free after them (a large request's room).
  Status add_large(std::size_t bytes, const std::string& what);
  std::size_t bytes() const { return bytes_; }
  void release();

 private:
  MemoryBudget* budget_;
  std::size_t bytes_ = 0;
};

// What this process may use: the smaller of the machine's memory and its cgroup's memory.max (a
// container's limit).
std::size_t process_memory_bytes();
// The default limit: half of that.
inline std::size_t default_inflight_bytes() { return process_memory_bytes() / 2; }

// Gives freed heap memory back to the system (glibc keeps it in its arenas otherwise).
void return_free_memory();

// Makes glibc serve allocations from 64 KiB up (gRPC's receive buffers, tensors) with their own
// mappings, unmapped when freed. Otherwise a request's receive buffers, freed one by one as it is
// parsed, stay resident in the heap beside the parsed copy (measured: 1.9x a request's size at
// peak instead of 1.07x), and the process stays at its high-water mark after big calls.
void release_freed_memory_promptly();

}  // namespace attn::server
