// The Prometheus endpoint (--metrics-listen): requests by op, variant and status code; latency
// histograms for queue, copy, kernel and total; bytes in and out; per-device queue depth and
// device memory in use (read when scraped).
#pragma once

#include <grpcpp/support/status.h>

#include <memory>
#include <string>

#include "attn/status.h"
#include "attn/v1/attn.pb.h"

namespace attn::server {

class Scheduler;

class Metrics {
 public:
  // Serves /metrics on `listen` ("127.0.0.1:9464"; port 0 picks one).
  static Result<std::unique_ptr<Metrics>> start(const std::string& listen,
                                                const Scheduler& scheduler);
  ~Metrics();

  int port() const;
  // One finished call. `timings` is null when the call failed before it ran.
  void record(const std::string& op, const std::string& variant, grpc::StatusCode code,
              const v1::Timings* timings, std::size_t bytes_in, std::size_t bytes_out);
  // Bytes a call of `op` read from and wrote to shared-memory regions (--shared-memory).
  void record_shared_memory(const std::string& op, std::size_t bytes_in, std::size_t bytes_out);
  // One Decode or Prefill of `op` answered as a repeat of the call applied before it
  // (expected_lengths): nothing appended.
  void record_replay(const std::string& op);
  // One launch that served `calls` calls of `op` together (dynamic batching).
  void record_batch(const std::string& op, std::size_t calls);
  // One authenticated call of `op` before its body was read: whether its client declared the
  // request's size (attn-request-bytes), which is what lets the memory bound refuse it unread.
  void record_request_size(const std::string& op, bool declared);

 private:
  struct Impl;
  explicit Metrics(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace attn::server
