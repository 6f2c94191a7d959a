// The attn.v1.AttnService handlers, in groups by what they serve, over one ServiceCore: parse and
// validate on the gRPC thread, run on the device's worker through the scheduler, encode and
// finish there. Calls reach them through the gate (rpc/gate.h), which has let the caller in and
// hands each handler its CallContext; the method table (method_table.cc) says which handler
// serves which method.
#pragma once

#include "handlers/benchmark_handlers.h"
#include "handlers/kv_handlers.h"
#include "handlers/op_handlers.h"
#include "handlers/service_core.h"
#include "handlers/shm_handlers.h"
#include "handlers/tensor_handlers.h"

namespace attn::server {

struct AttnService {
  AttnService(Scheduler& scheduler, const Registry& registry, ServiceConfig config)
      : core(scheduler, registry, std::move(config)) {}
  // The groups hold a reference to `core`: never copied or moved.
  AttnService(const AttnService&) = delete;
  AttnService& operator=(const AttnService&) = delete;

  ServiceCore core;
  OpHandlers ops{core};
  TensorHandlers tensors{core};
  BenchmarkHandlers benchmarks{core};
  KvHandlers kv{core};
  ShmHandlers shm{core};
};

}  // namespace attn::server
