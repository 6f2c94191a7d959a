// Shared memory: RegisterSharedMemory, UnregisterSharedMemory, SharedMemoryStatus.
#pragma once

#include "handlers/service_core.h"

namespace attn::server {

class ShmHandlers final {
 public:
  explicit ShmHandlers(ServiceCore& core) : core_(core) {}

  grpc::ServerUnaryReactor* RegisterSharedMemory(CallContext& call,
                                                 const v1::RegisterSharedMemoryRequest* req,
                                                 v1::RegisterSharedMemoryResponse* resp);
  grpc::ServerUnaryReactor* UnregisterSharedMemory(CallContext& call,
                                                   const v1::UnregisterSharedMemoryRequest* req,
                                                   v1::UnregisterSharedMemoryResponse* resp);
  grpc::ServerUnaryReactor* SharedMemoryStatus(CallContext& call,
                                               const v1::SharedMemoryStatusRequest* req,
                                               v1::SharedMemoryStatusResponse* resp);

 private:
  ServiceCore& core_;
};

}  // namespace attn::server
