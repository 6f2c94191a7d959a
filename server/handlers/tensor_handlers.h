// Resident tensors: PutTensor, GetTensor, DeleteTensor, ListTensors.
#pragma once

#include "handlers/service_core.h"

namespace attn::server {

class TensorHandlers final {
 public:
  explicit TensorHandlers(ServiceCore& core) : core_(core) {}

  grpc::ServerReadReactor<v1::PutTensorRequest>* PutTensor(grpc::CallbackServerContext* ctx,
                                                           v1::PutTensorResponse* resp);
  grpc::ServerWriteReactor<v1::GetTensorResponse>* GetTensor(CallContext& call,
                                                             const v1::GetTensorRequest* req);
  grpc::ServerUnaryReactor* DeleteTensor(CallContext& call, const v1::DeleteTensorRequest* req,
                                         v1::DeleteTensorResponse* resp);
  grpc::ServerUnaryReactor* ListTensors(CallContext& call, const v1::ListTensorsRequest* req,
                                        v1::ListTensorsResponse* resp);

 private:
  ServiceCore& core_;
};

}  // namespace attn::server
