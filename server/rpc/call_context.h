// One call as its handler and its request parsing see it, made by the gate once the call is let
// in: who called (for state that belongs to a caller), its share of the in-flight memory budget,
// its deadline and cancellation (through the gRPC context), its method and when it started.
// Passed explicitly, never read from thread-locals, so the code that parses a request states
// everything it depends on.
#pragma once

#include <grpcpp/server_context.h>

#include <chrono>
#include <cstddef>
#include <string>

#include "rpc/method_traits.h"
#include "state/memory_budget.h"

namespace attn::server {

struct CallContext {
  grpc::CallbackServerContext* grpc = nullptr;  // deadline, cancellation, peer, metadata
  const MethodInfo* method = nullptr;
  // The caller's identity: a digest of its token, "" when the server has none. Shared-memory
  // regions belong to it.
  std::string caller;
  // The call's hold on the in-flight budget: what parsing allocates for the response is added
  // to it. Null: no budget (tests, the fuzzer).
  MemoryHold* hold = nullptr;
  std::chrono::steady_clock::time_point start = std::chrono::steady_clock::now();
  // When its whole request had arrived (its body read, before parsing): start until then is the
  // transfer (and any wait for room in the memory budget).
  std::chrono::steady_clock::time_point received = start;
  std::size_t bytes_in = 0;  // the request's serialized size

  // Timings' receive_ns and parse_ns of a call being queued now.
  std::int64_t receive_ns() const {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(received - start).count();
  }
  std::int64_t parse_ns() const {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() -
                                                                received)
        .count();
  }

  const char* op() const { return method ? method->op.c_str() : "unknown"; }
  std::string peer() const { return grpc ? grpc->peer() : std::string("in-process"); }
  // Adds `bytes` to the call's hold (a no-op without one); `what` names them in a refusal.
  Status hold_more(std::size_t bytes, const std::string& what) const {
    return hold ? hold->add(bytes, what) : Status::Ok();
  }
};

}  // namespace attn::server
