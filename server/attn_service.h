// The attn.v1.AttnService handlers (callback API): decode and validate on the gRPC thread, run
// on the device's worker through the scheduler, encode and finish there.
#pragma once

#include <functional>
#include <string>

#include "attn/registry.h"
#include "attn/v1/attn.grpc.pb.h"
#include "decode.h"
#include "metrics.h"
#include "scheduler.h"
#include "security.h"

namespace attn::server {

struct ServiceConfig {
  std::int64_t max_message_bytes = 0;
  wire::TensorLimits limits;
  // Called once a device fault has poisoned a device (the server can no longer serve on it).
  std::function<void(const std::string& why)> on_device_fault;
  // Bearer token every call must carry; empty: none.
  std::string token;
  // Softmax with kernel "fault_injection/trap" makes the device fault (tests of the fault path).
  bool fault_injection = false;
  Metrics* metrics = nullptr;  // null: no metrics
  TensorStore* store = nullptr;  // resident tensors; null: none
};

// Whether `name` is an op ("matmul", ...), and all their names quoted, for messages.
bool known_op(const std::string& name);
std::string op_names();

// The kernel name that injects a device fault when the server allows it.
inline constexpr const char* kFaultInjectionKernel = "fault_injection/trap";

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
  // Resident tensors (tensor_handlers.cc).
  grpc::ServerReadReactor<v1::PutTensorRequest>* PutTensor(grpc::CallbackServerContext* ctx,
                                                           v1::PutTensorResponse* resp) override;
  grpc::ServerWriteReactor<v1::GetTensorResponse>* GetTensor(grpc::CallbackServerContext* ctx,
                                                             const v1::GetTensorRequest* req) override;
  grpc::ServerUnaryReactor* DeleteTensor(grpc::CallbackServerContext* ctx, const v1::DeleteTensorRequest* req,
                                         v1::DeleteTensorResponse* resp) override;
  grpc::ServerUnaryReactor* ListTensors(grpc::CallbackServerContext* ctx, const v1::ListTensorsRequest* req,
                                        v1::ListTensorsResponse* resp) override;
  // benchmark_handler.cc
  grpc::ServerUnaryReactor* Benchmark(grpc::CallbackServerContext* ctx, const v1::BenchmarkRequest* req,
                                      v1::BenchmarkResponse* resp) override;
  grpc::ServerUnaryReactor* Echo(grpc::CallbackServerContext* ctx, const v1::EchoRequest* req,
                                 v1::EchoResponse* resp) override;

  // The executor index a tensor header asks for ("cuda:1", "cpu"), or the least used device of
  // the serving backend.
  Result<std::size_t> place(const std::string& device);
  // A TensorInfo for a resident tensor.
  void describe(const ResidentTensor& t, v1::TensorInfo* out) const;

 private:
  // An op's call (RpcOp<Request>): authenticated, decoded, placed, run, encoded.
  template <class Request, class Response>
  grpc::ServerUnaryReactor* serve(grpc::CallbackServerContext* ctx, const Request* req, Response* resp);
  // Queues `run` for the call; a refusal, or the call abandoned in the queue, finishes it.
  void submit(grpc::CallbackServerContext* ctx, grpc::ServerUnaryReactor* reactor, const char* op,
              const std::string& variant, std::size_t bytes_in, const Placement& placement,
              std::function<void(Executor&, std::int64_t queue_ns)> run);
  grpc::ServerUnaryReactor* inject_fault(grpc::CallbackServerContext* ctx);
  // Finishes a call and counts it in the metrics.
  friend class PutTensorReactor;
  friend class GetTensorReactor;
  void finish(grpc::ServerUnaryReactor* reactor, grpc::CallbackServerContext* ctx, const char* op,
              const std::string& variant, const Status& status, const v1::Timings* timings,
              std::size_t bytes_in, std::size_t bytes_out);
  // Null when the call may go on; else the reactor, already finished UNAUTHENTICATED.
  grpc::ServerUnaryReactor* refuse_unauthenticated(grpc::CallbackServerContext* ctx, const char* op,
                                                   std::size_t bytes_in);
  // A device fault poisoned `executor`: logs it and tells the server.
  void device_faulted(Executor& executor, const std::string& what, const Status& status);

  Scheduler& scheduler_;
  const Registry& registry_;
  ServiceConfig config_;
  DecodeContext decode_;
  TokenCheck token_;
};

}  // namespace attn::server
