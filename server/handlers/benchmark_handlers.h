// Timing and transport: Benchmark (every variant timed on the device, inputs made there) and Echo
// (the transport baseline).
#pragma once

#include "handlers/service_core.h"

namespace attn::server {

class BenchmarkHandlers final {
 public:
  explicit BenchmarkHandlers(ServiceCore& core) : core_(core) {}

  grpc::ServerUnaryReactor* Benchmark(CallContext& call, const v1::BenchmarkRequest* req,
                                      v1::BenchmarkResponse* resp);
  grpc::ServerUnaryReactor* Echo(CallContext& call, const v1::EchoRequest* req,
                                 v1::EchoResponse* resp);

 private:
  ServiceCore& core_;
};

}  // namespace attn::server
