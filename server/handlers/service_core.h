// What every handler group shares: the scheduler and registry, the server's configuration, how a
// call is finished (status, log, metrics), queued, and how a device fault is reported. The groups
// (op_handlers.h, tensor_handlers.h, benchmark_handlers.h, kv_handlers.h, shm_handlers.h) each
// hold a reference to one ServiceCore and nothing of each other.
#pragma once

#include <functional>
#include <string>

#include "attn/registry.h"
#include "attn/v1/attn.pb.h"
#include "requests/op_request.h"
#include "rpc/call_context.h"
#include "rpc/metrics.h"
#include "rpc/security.h"
#include "schedule/scheduler.h"

namespace attn::server {

class TensorStore;
class KvCacheStore;
class SharedMemoryRegistry;

struct ServiceConfig {
  std::int64_t max_message_bytes = 0;
  wire::TensorLimits limits;
  // Called once a device fault has poisoned a device (the server can no longer serve on it).
  std::function<void(const std::string& why)> on_device_fault;
  // Bearer token every call must carry; empty: none.
  std::string token;
  // Softmax with kernel "fault_injection/trap" makes the device fault (tests of the fault path).
  bool fault_injection = false;
  Metrics* metrics = nullptr;           // null: no metrics
  TensorStore* store = nullptr;         // resident tensors; null: none
  KvCacheStore* kv_caches = nullptr;    // KV caches; null: none
  SharedMemoryRegistry* shm = nullptr;  // shared-memory regions; null: --shared-memory off
};

// Why a queued call need not run any more (its deadline passed, its caller cancelled), or OK.
Status call_abandoned(const CallContext& call);

class ServiceCore {
 public:
  ServiceCore(Scheduler& workers, const Registry& variants, ServiceConfig settings);

  Scheduler& scheduler;
  const Registry& registry;
  const ServiceConfig config;
  RequestContext requests;  // what parsing needs of the server (targets, limits, stores)
  TokenCheck token;  // PutTensor's, whose calls the gate hands over before their first message

  // Finishes a call and counts it in the metrics (under its method's op label).
  void finish(const CallContext& call, grpc::ServerUnaryReactor* reactor,
              const std::string& variant, const Status& status, const v1::Timings* timings,
              std::size_t bytes_out) const;
  // Queues `run` for the call; a refusal, or the call abandoned in the queue, finishes it.
  void submit(const CallContext& call, grpc::ServerUnaryReactor* reactor,
              const std::string& variant, const Placement& placement,
              std::function<void(Executor&, std::int64_t queue_ns)> run,
              std::shared_ptr<BatchMember> batch = nullptr) const;
  // A device fault poisoned `executor` (when it did): logs it and tells the server.
  void device_faulted(Executor& executor, const std::string& what, const Status& status) const;
  // The executor index a request names for new state ("cuda:1", "cpu"), or the least used device
  // of the serving backend.
  Result<std::size_t> place(const std::string& device) const;
  // The serving backend (the first executor's).
  Backend serving_backend() const { return requests.targets.front().backend; }
};

}  // namespace attn::server
