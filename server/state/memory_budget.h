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
#include <functional>
#include <list>
#include <mutex>
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
  // Gives `bytes` back; `wake`: takes waiting for room may have them (a call that will go on
  // allocating its outputs gives back the unused part of its request's room without waking them).
  void give_back(std::size_t bytes, bool wake = true);

  // Takes `bytes` (leaving `keep_free`) now, or as soon as calls give enough back: `granted` then
  // runs on the thread that gave it back. Returns 0 when taken now (`granted` not called), else a
  // ticket for withdraw(). Refuses (as take() does) what could not fit even once every call in
  // flight has given its bytes back (resident tensors, KV caches and staging fill the rest).
  Result<std::uint64_t> take_when_free(std::size_t bytes, const std::string& what,
                                       std::size_t keep_free, std::function<void()> granted);
  // Withdraws a waiting take: true when it was still waiting (it will never be granted), false
  // when it has been granted (its `granted` runs or ran).
  bool withdraw(std::uint64_t ticket);

  // Resident state (tensors, KV caches' replay records, pinned staging): charged like take() and
  // counted apart from calls' bytes, so that take_when_free() can tell what no call will give back.
  Status take_resident(std::size_t bytes, const std::string& what);
  void give_back_resident(std::size_t bytes);

 private:
  bool try_take(std::size_t bytes, std::size_t keep_free);
  void grant_waiters();

  struct Waiter {
    std::uint64_t ticket;
    std::size_t bytes, keep_free;
    std::function<void()> granted;
  };
  const std::size_t limit_;
  std::atomic<std::size_t> used_{0};
  // Part of used_. Raised after used_ and lowered before it, so that it never reads high: a
  // waiting take is never refused for a call's bytes counted as resident.
  std::atomic<std::size_t> resident_{0};
  // Takes waiting for room, in arrival order; waiting_ mirrors their count so that give_back()
  // locks only when someone waits.
  std::mutex waiters_mutex_;
  std::list<Waiter> waiters_;
  std::atomic<std::size_t> waiting_{0};
  std::uint64_t next_ticket_ = 1;
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
  // Makes the hold own `bytes` its call already took from the budget (take_when_free).
  void adopt(std::size_t bytes);
  // Gives back what the hold has past `bytes`, for this call's own later use: waiters stay waiting.
  void shrink_to(std::size_t bytes);
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
