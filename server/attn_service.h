// The attn.v1.AttnService handlers (callback API): decode and validate on the gRPC thread, run
// on the device's worker through the scheduler, encode and finish there.
#pragma once

#include <functional>
#include <string>

#include "attn/registry.h"
#include "attn/v1/attn.grpc.pb.h"
#include "decode.h"
#include "scheduler.h"

namespace attn::server {

struct ServiceConfig {
  std::int64_t max_message_bytes = 0;
  wire::TensorLimits limits;
  // Called once a device fault has poisoned a device (the server can no longer serve on it).
  std::function<void(const std::string& why)> on_device_fault;
};

class AttnService final : public v1::AttnService::CallbackService {
 public:
  AttnService(Scheduler& scheduler, const Registry& registry, ServiceConfig config);

  grpc::ServerUnaryReactor* Matmul(grpc::CallbackServerContext* ctx, const v1::MatmulRequest* req,
                                   v1::MatmulResponse* resp) override;
  grpc::ServerUnaryReactor* Softmax(grpc::CallbackServerContext* ctx, const v1::SoftmaxRequest* req,
                                    v1::SoftmaxResponse* resp) override;
  grpc::ServerUnaryReactor* Attention(grpc::CallbackServerContext* ctx,
                                      const v1::AttentionRequest* req,
                                      v1::AttentionResponse* resp) override;
  grpc::ServerUnaryReactor* ListKernels(grpc::CallbackServerContext* ctx,
                                        const v1::ListKernelsRequest* req,
                                        v1::ListKernelsResponse* resp) override;
  grpc::ServerUnaryReactor* GetServerInfo(grpc::CallbackServerContext* ctx,
                                          const v1::GetServerInfoRequest* req,
                                          v1::GetServerInfoResponse* resp) override;

 private:
  template <class Args, class Response>
  grpc::ServerUnaryReactor* run(grpc::CallbackServerContext* ctx, const char* rpc,
                                std::chrono::steady_clock::time_point start,
                                Result<PreparedOp<Args>> prepared, Response* resp,
                                bool return_values, std::vector<v1::Tensor*> outputs);

  Scheduler& scheduler_;
  const Registry& registry_;
  ServiceConfig config_;
  DecodeContext decode_;
};

}  // namespace attn::server
