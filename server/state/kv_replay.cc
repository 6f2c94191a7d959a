#include "state/kv_replay.h"

#include "state/kv_cache.h"

namespace attn::server {
namespace {

std::string str(std::int64_t v) { return std::to_string(v); }

}  // namespace

Result<std::shared_ptr<AppliedCall>> AppliedCall::reserve(MemoryBudget* budget, std::size_t bytes) {
  if (budget) {
    ATTN_RETURN_IF_ERROR(budget->take_resident(
        bytes,
        "expected_lengths: keeping this call's response for a repeat (the last applied "
        "call per sequence and layer)"));
  }
  return std::shared_ptr<AppliedCall>(new AppliedCall(budget, bytes));
}

AppliedCall::~AppliedCall() {
  if (budget_) budget_->give_back_resident(bytes_);
}

// KvCache's judgement of a call with an expectation, beside the records it reads. Every refusal
// names expected_lengths[i], the sequence and layer, the length expected and the one found.
Status KvCache::judge(int layer, const std::vector<std::string>& ids,
                      const std::vector<std::int64_t>& fresh, bool create_missing,
                      const Expectation& e, std::shared_ptr<const AppliedCall>* repeat) const {
  const std::size_t n = ids.size();
  std::vector<const Sequence*> seqs(n, nullptr);
  std::vector<std::int64_t> actual(n, 0);
  for (std::size_t i = 0; i < n; ++i) {
    auto it = sequences_.find(ids[i]);
    if (it == sequences_.end()) {
      if (!create_missing) return unknown_sequence(i, ids[i]);
      continue;  // Prefill creates it: length 0, no record
    }
    seqs[i] = &it->second;
    actual[i] = it->second.lengths[static_cast<std::size_t>(layer)];
  }
  const auto field = [&](std::size_t i) {
    return "expected_lengths[" + str(static_cast<std::int64_t>(i)) + "]: sequence \"" + ids[i] +
           "\" at layer " + str(layer) + " of kv cache " + handle_ + ": expected length " +
           str(e.lengths[i]) + ", got " + str(actual[i]);
  };
  bool before = true, after = true;
  for (std::size_t i = 0; i < n; ++i) {
    before &= actual[i] == e.lengths[i];
    after &= actual[i] == e.lengths[i] + fresh[i];
  }
  if (before) return Status::Ok();
  if (!after) {
    // A sequence at neither length, or some at one and some at the other.
    for (std::size_t i = 0; i < n; ++i) {
      if (actual[i] == e.lengths[i] || actual[i] == e.lengths[i] + fresh[i]) continue;
      return failed_precondition(
          field(i) +
          (actual[i] > e.lengths[i] + fresh[i]
               ? " (later calls appended to it: only the last applied call on a sequence and layer "
                 "can be repeated)"
               : "") +
          "; nothing appended");
    }
    for (std::size_t i = 1; i < n; ++i)
      if ((actual[i] == e.lengths[i]) != (actual[0] == e.lengths[0])) {
        return failed_precondition(field(i) + ", while sequence \"" + ids[0] + "\" is at " +
                                   str(actual[0]) + " (expected " + str(e.lengths[0]) +
                                   "): some of the call's sequences already hold its tokens and "
                                   "some do not, so it is neither new nor a repeat; nothing "
                                   "appended");
      }
    return failed_precondition(field(0) + "; nothing appended");
  }
  // Every sequence at expected + fresh: a repeat if this call is the last one applied to each.
  const AppliedCall* last = seqs[0] ? seqs[0]->last_at(layer) : nullptr;
  for (std::size_t i = 0; i < n; ++i) {
    const AppliedCall* mine = seqs[i] ? seqs[i]->last_at(layer) : nullptr;
    if (!mine || mine != last || mine->ids != ids || mine->expected != e.lengths) {
      return failed_precondition(
          field(i) + " = " + str(e.lengths[i]) + " + " + str(fresh[i]) +
          ", but the last call applied to it there is not this one (another call, set of "
          "sequences or expectation, or its record went with a truncation or release): not a "
          "repeat; nothing appended");
    }
  }
  if (last->fingerprint != e.fingerprint) {
    return failed_precondition(
        field(0) + " = " + str(e.lengths[0]) + " + " + str(fresh[0]) +
        ": a different call with the same expectation (same sequences and expected lengths, but "
        "other inputs or options: fingerprint " +
        short_hex(e.fingerprint) + ", the applied call's " + short_hex(last->fingerprint) +
        ") was applied there already; this one is not a repeat of it; nothing appended");
  }
  *repeat = seqs[0]->last[static_cast<std::size_t>(layer)];
  return Status::Ok();
}

std::string short_hex(const Fingerprint& f) {
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out;
  for (std::size_t i = 0; i < 6; ++i) {
    out += kHex[f[i] >> 4];
    out += kHex[f[i] & 15];
  }
  return out;
}

}  // namespace attn::server
