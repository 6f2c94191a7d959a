// Small pieces the RPC handlers share: a streaming call refused before it starts, wall-clock
// milliseconds for expiry times, and a finished call's Timings.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <string>

#include "attn/executor.h"
#include "attn/ops.h"
#include "attn/v1/attn.pb.h"
#include "attn/wire.h"

namespace attn::server {

// A streaming call refused before it starts (no token, no store, a bad field): finishes with
// `status`.
template <class Base>
class Refused final : public Base {
 public:
  explicit Refused(const Status& status) { this->Finish(wire::to_grpc(status)); }
  void OnDone() override { delete this; }
};

inline std::int64_t unix_ms(std::chrono::system_clock::time_point t) {
  return std::chrono::duration_cast<std::chrono::milliseconds>(t.time_since_epoch()).count();
}

// The Timings of a call that ran `kernel` on `executor`: its wait, copies and kernel, the op's
// cost by formula, the calls that shared its launch, and the time since `start`.
inline void fill_timings(v1::Timings* out, const std::string& kernel, const Executor& executor,
                         std::int64_t queue_ns, const ExecTimings& t, const OpCost& cost,
                         int batched, std::chrono::steady_clock::time_point start) {
  out->set_kernel(kernel);
  out->set_device(executor.device().label());
  out->set_queue_ns(queue_ns);
  out->set_h2d_ns(t.h2d_ns);
  out->set_kernel_ns(t.kernel_ns);
  out->set_d2h_ns(t.d2h_ns);
  out->set_flops(cost.flops);
  out->set_bytes(cost.bytes);
  out->set_batched_calls(batched);
  const std::int64_t total =
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - start)
          .count();
  out->set_total_ns(total);
  // The host's parts: receive and parse (set by the handler), prepare, issue and wait (inside
  // execute), and what is left after execute: the response.
  out->set_prepare_ns(t.prepare_ns);
  out->set_issue_ns(t.issue_ns);
  out->set_wait_ns(t.wait_ns);
  out->set_finish_ns(std::max<std::int64_t>(
      0, total - out->receive_ns() - out->parse_ns() - queue_ns - t.prepare_ns - t.execute_ns));
}

}  // namespace attn::server
