// The one-shot ops (Matmul, Softmax, Attention) and the server's self-description (ListKernels,
// GetServerInfo).
#pragma once

#include "handlers/service_core.h"

namespace attn::server {

// The kernel name that injects a device fault when the server allows it.
inline constexpr const char* kFaultInjectionKernel = "fault_injection/trap";

class OpHandlers final {
 public:
  explicit OpHandlers(ServiceCore& core) : core_(core) {}

  grpc::ServerUnaryReactor* Matmul(CallContext& call, const v1::MatmulRequest* req,
                                   v1::MatmulResponse* resp);
  grpc::ServerUnaryReactor* Softmax(CallContext& call, const v1::SoftmaxRequest* req,
                                    v1::SoftmaxResponse* resp);
  grpc::ServerUnaryReactor* Attention(CallContext& call, const v1::AttentionRequest* req,
                                      v1::AttentionResponse* resp);
  grpc::ServerUnaryReactor* ListKernels(CallContext& call, const v1::ListKernelsRequest* req,
                                        v1::ListKernelsResponse* resp);
  grpc::ServerUnaryReactor* GetServerInfo(CallContext& call, const v1::GetServerInfoRequest* req,
                                          v1::GetServerInfoResponse* resp);

 private:
  // An op's call (RpcOp<Request>): parsed, placed, run, encoded.
  template <class Request, class Response>
  grpc::ServerUnaryReactor* serve(CallContext& call, const Request* req, Response* resp);
  grpc::ServerUnaryReactor* inject_fault(CallContext& call);

  ServiceCore& core_;
};

}  // namespace attn::server
