// The attn.v1.AttnService handlers (callback API): decode and validate on the gRPC thread, run
// on the device's worker through the scheduler, encode and finish there.
#pragma once

#include <functional>
#include <mutex>
#include <string>

#include "attn/registry.h"
#include "attn/v1/attn.grpc.pb.h"
#include "decode.h"
#include "kv_cache.h"
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
  KvCacheStore* kv_caches = nullptr;  // KV caches; null: none
  SharedMemoryRegistry* shm = nullptr;  // shared-memory regions; null: --shared-memory off
};

// Whether `name` is a one-shot op ("matmul", ...), and all their names quoted, for messages.
bool known_op(const std::string& name);
std::string op_names();
// The same over every op, the KV-cache ops included (ListKernels).
bool known_any_op(const std::string& name);
std::string any_op_names();

// Why a queued call need not run any more (its deadline passed, its caller cancelled), or OK.
Status call_abandoned(grpc::CallbackServerContext* ctx);

template <class Args, class Response>
class KvCall;
template <class Request, class Response>
class OneShotCall;

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
  // KV caches (kv_handlers.cc).
  grpc::ServerUnaryReactor* CreateKvCache(grpc::CallbackServerContext* ctx, const v1::CreateKvCacheRequest* req,
                                          v1::CreateKvCacheResponse* resp) override;
  grpc::ServerUnaryReactor* DescribeKvCache(grpc::CallbackServerContext* ctx, const v1::DescribeKvCacheRequest* req,
                                            v1::DescribeKvCacheResponse* resp) override;
  grpc::ServerUnaryReactor* ListKvCaches(grpc::CallbackServerContext* ctx, const v1::ListKvCachesRequest* req,
                                         v1::ListKvCachesResponse* resp) override;
  grpc::ServerUnaryReactor* DeleteKvCache(grpc::CallbackServerContext* ctx, const v1::DeleteKvCacheRequest* req,
                                          v1::DeleteKvCacheResponse* resp) override;
  grpc::ServerUnaryReactor* ReleaseSequences(grpc::CallbackServerContext* ctx,
                                             const v1::ReleaseSequencesRequest* req,
                                             v1::ReleaseSequencesResponse* resp) override;
  grpc::ServerUnaryReactor* ForkSequence(grpc::CallbackServerContext* ctx, const v1::ForkSequenceRequest* req,
                                         v1::ForkSequenceResponse* resp) override;
  grpc::ServerUnaryReactor* Decode(grpc::CallbackServerContext* ctx, const v1::DecodeRequest* req,
                                   v1::DecodeResponse* resp) override;
  grpc::ServerUnaryReactor* Prefill(grpc::CallbackServerContext* ctx, const v1::PrefillRequest* req,
                                    v1::PrefillResponse* resp) override;
  grpc::ServerWriteReactor<v1::ReadKvResponse>* ReadKv(grpc::CallbackServerContext* ctx,
                                                       const v1::ReadKvRequest* req) override;
  // Shared memory (shm_handlers.cc).
  grpc::ServerUnaryReactor* RegisterSharedMemory(grpc::CallbackServerContext* ctx,
                                                 const v1::RegisterSharedMemoryRequest* req,
                                                 v1::RegisterSharedMemoryResponse* resp) override;
  grpc::ServerUnaryReactor* UnregisterSharedMemory(grpc::CallbackServerContext* ctx,
                                                   const v1::UnregisterSharedMemoryRequest* req,
                                                   v1::UnregisterSharedMemoryResponse* resp) override;
  grpc::ServerUnaryReactor* SharedMemoryStatus(grpc::CallbackServerContext* ctx,
                                               const v1::SharedMemoryStatusRequest* req,
                                               v1::SharedMemoryStatusResponse* resp) override;

  // The executor index a tensor header asks for ("cuda:1", "cpu"), or the least used device of
  // the serving backend.
  Result<std::size_t> place(const std::string& device);
  // A TensorInfo for a resident tensor.
  void describe(const ResidentTensor& t, v1::TensorInfo* out) const;
  // This server's address as clients of several replicas reach it (KvCacheInfo.replica), set
  // once the port is bound.
  void set_advertise_address(const std::string& address);
  // A KvCacheInfo for a cache, with its sequences when asked.
  void describe(const KvCache& c, bool with_sequences, v1::KvCacheInfo* out) const;

 private:
  // An op's call (RpcOp<Request>): authenticated, decoded, placed, run, encoded.
  template <class Request, class Response>
  grpc::ServerUnaryReactor* serve(grpc::CallbackServerContext* ctx, const Request* req, Response* resp);
  // Queues `run` for the call; a refusal, or the call abandoned in the queue, finishes it.
  void submit(grpc::CallbackServerContext* ctx, grpc::ServerUnaryReactor* reactor, const char* op,
              const std::string& variant, std::size_t bytes_in, const Placement& placement,
              std::function<void(Executor&, std::int64_t queue_ns)> run,
              std::shared_ptr<BatchMember> batch = nullptr);
  grpc::ServerUnaryReactor* inject_fault(grpc::CallbackServerContext* ctx);
  // Decode and Prefill: checked against the cache, planned and run in the cache's order.
  template <class Args, class Request, class Response>
  grpc::ServerUnaryReactor* serve_kv(grpc::CallbackServerContext* ctx, const Request* req, Response* resp,
                                     std::vector<std::int64_t> fresh, bool create_missing);
  Result<std::shared_ptr<KvCache>> find_cache(const std::string& handle, const std::string& field);
  // Where a cache's calls run: its device, in its order.
  Placement placement_of(const KvCache& c) const;
  Status kv_servable(const KvCacheConfig& cfg, const Target& target) const;
  // Finishes a call and counts it in the metrics.
  friend class PutTensorReactor;
  friend class GetTensorReactor;
  friend class ReadKvReactor;
  template <class Args, class Response>
  friend class KvCall;
  template <class Request, class Response>
  friend class OneShotCall;
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
  mutable std::mutex advertise_mu_;
  std::string advertise_address_;
};

}  // namespace attn::server
