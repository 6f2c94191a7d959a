// Exactly-once appends. A Decode or Prefill that states each sequence's length before it
// (expected_lengths) is applied when the cache agrees, answered from a record when it is a repeat
// of the last call applied to its sequences at its layer, and refused otherwise. What a call
// states is an Expectation; what the cache keeps of an applied one, per (sequence, layer), is an
// AppliedCall: only the last one per (sequence, layer), so the records are bounded by the
// cache's sequences x layers, each by its call's response; their bytes are charged to the
// server's memory budget while they live.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "attn/status.h"
#include "attn/v1/attn.pb.h"
#include "state/memory_budget.h"

namespace attn::server {

// SHA-256 of everything that determines a call's result (requests/kv_fingerprint.h).
using Fingerprint = std::array<unsigned char, 32>;

// What a call with expected_lengths states: each sequence's length before it, its fingerprint,
// and the bytes its record will hold (its response's outputs) should it be applied.
struct Expectation {
  std::vector<std::int64_t> lengths;
  Fingerprint fingerprint{};
  std::size_t record_bytes = 0;
};

// An applied call as kept for its repeats: shared by the (sequence, layer) slots it wrote, alive
// while one of them still names it as its last call. Written once, on the cache's worker, before
// it is recorded; read-only after.
class AppliedCall {
 public:
  // A record of `bytes` charged to `budget` (null: none), or RESOURCE_EXHAUSTED naming
  // expected_lengths when the budget cannot hold it.
  static Result<std::shared_ptr<AppliedCall>> reserve(MemoryBudget* budget, std::size_t bytes);
  AppliedCall(const AppliedCall&) = delete;
  AppliedCall& operator=(const AppliedCall&) = delete;
  ~AppliedCall();

  std::size_t bytes() const { return bytes_; }

  std::vector<std::string> ids;
  std::vector<std::int64_t> expected;  // each sequence's length before the call
  std::vector<std::int64_t> lengths;   // and after it
  Fingerprint fingerprint{};
  // The response as it was sent: o, lse (when asked for) and the variant that ran.
  v1::Tensor o, lse;
  bool has_lse = false;
  std::string variant;

 private:
  AppliedCall(MemoryBudget* budget, std::size_t bytes) : budget_(budget), bytes_(bytes) {}
  MemoryBudget* budget_;
  std::size_t bytes_;
};

// Hex of a fingerprint's first bytes, for logs.
std::string short_hex(const Fingerprint& f);

}  // namespace attn::server
