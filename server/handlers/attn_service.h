// The attn.v1.AttnService handlers: parse and validate on the gRPC thread, run on the device's
// worker through the scheduler, encode and finish there. Calls reach them through the gate
// (rpc/gate.h), which has let the caller in and hands each handler its CallContext; the method
// table (method_table.cc) says which handler serves which method.
#pragma once

#include <functional>
#include <mutex>
#include <string>

#include "attn/registry.h"
#include "attn/v1/attn.grpc.pb.h"
#include "requests/op_request.h"
#include "rpc/call_context.h"
#include "rpc/metrics.h"
#include "rpc/security.h"
#include "schedule/scheduler.h"
#include "state/kv_cache.h"

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
  Metrics* metrics = nullptr;           // null: no metrics
  TensorStore* store = nullptr;         // resident tensors; null: none
  KvCacheStore* kv_caches = nullptr;    // KV caches; null: none
  SharedMemoryRegistry* shm = nullptr;  // shared-memory regions; null: --shared-memory off
};

// Whether `name` is a one-shot op ("matmul", ...), and all their names quoted, for messages.
bool known_op(const std::string& name);
std::string op_names();
// The same over every op, the KV-cache ops included (ListKernels).
bool known_any_op(const std::string& name);
std::string any_op_names();

// Why a queued call need not run any more (its deadline passed, its caller cancelled), or OK.
Status call_abandoned(const CallContext& call);

template <class Args, class Response>
class KvCall;
template <class Request, class Response>
class OneShotCall;
template <class Args>
struct Merging;

// The kernel name that injects a device fault when the server allows it.
inline constexpr const char* kFaultInjectionKernel = "fault_injection/trap";

class AttnService final {
 public:
  AttnService(Scheduler& scheduler, const Registry& registry, ServiceConfig config);

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
  // Resident tensors (tensor_handlers.cc).
  grpc::ServerReadReactor<v1::PutTensorRequest>* PutTensor(grpc::CallbackServerContext* ctx,
                                                           v1::PutTensorResponse* resp);
  grpc::ServerWriteReactor<v1::GetTensorResponse>* GetTensor(CallContext& call,
                                                             const v1::GetTensorRequest* req);
  grpc::ServerUnaryReactor* DeleteTensor(CallContext& call, const v1::DeleteTensorRequest* req,
                                         v1::DeleteTensorResponse* resp);
  grpc::ServerUnaryReactor* ListTensors(CallContext& call, const v1::ListTensorsRequest* req,
                                        v1::ListTensorsResponse* resp);
  // benchmark_handler.cc
  grpc::ServerUnaryReactor* Benchmark(CallContext& call, const v1::BenchmarkRequest* req,
                                      v1::BenchmarkResponse* resp);
  grpc::ServerUnaryReactor* Echo(CallContext& call, const v1::EchoRequest* req,
                                 v1::EchoResponse* resp);
  // KV caches (kv_handlers.cc).
  grpc::ServerUnaryReactor* CreateKvCache(CallContext& call, const v1::CreateKvCacheRequest* req,
                                          v1::CreateKvCacheResponse* resp);
  grpc::ServerUnaryReactor* DescribeKvCache(CallContext& call,
                                            const v1::DescribeKvCacheRequest* req,
                                            v1::DescribeKvCacheResponse* resp);
  grpc::ServerUnaryReactor* ListKvCaches(CallContext& call, const v1::ListKvCachesRequest* req,
                                         v1::ListKvCachesResponse* resp);
  grpc::ServerUnaryReactor* DeleteKvCache(CallContext& call, const v1::DeleteKvCacheRequest* req,
                                          v1::DeleteKvCacheResponse* resp);
  grpc::ServerUnaryReactor* ReleaseSequences(CallContext& call,
                                             const v1::ReleaseSequencesRequest* req,
                                             v1::ReleaseSequencesResponse* resp);
  grpc::ServerUnaryReactor* ForkSequence(CallContext& call, const v1::ForkSequenceRequest* req,
                                         v1::ForkSequenceResponse* resp);
  grpc::ServerUnaryReactor* Decode(CallContext& call, const v1::DecodeRequest* req,
                                   v1::DecodeResponse* resp);
  grpc::ServerUnaryReactor* Prefill(CallContext& call, const v1::PrefillRequest* req,
                                    v1::PrefillResponse* resp);
  grpc::ServerWriteReactor<v1::ReadKvResponse>* ReadKv(CallContext& call,
                                                       const v1::ReadKvRequest* req);
  // Shared memory (shm_handlers.cc).
  grpc::ServerUnaryReactor* RegisterSharedMemory(CallContext& call,
                                                 const v1::RegisterSharedMemoryRequest* req,
                                                 v1::RegisterSharedMemoryResponse* resp);
  grpc::ServerUnaryReactor* UnregisterSharedMemory(CallContext& call,
                                                   const v1::UnregisterSharedMemoryRequest* req,
                                                   v1::UnregisterSharedMemoryResponse* resp);
  grpc::ServerUnaryReactor* SharedMemoryStatus(CallContext& call,
                                               const v1::SharedMemoryStatusRequest* req,
                                               v1::SharedMemoryStatusResponse* resp);

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
  // An op's call (RpcOp<Request>): parsed, placed, run, encoded.
  template <class Request, class Response>
  grpc::ServerUnaryReactor* serve(CallContext& call, const Request* req, Response* resp);
  // Queues `run` for the call; a refusal, or the call abandoned in the queue, finishes it.
  void submit(const CallContext& call, grpc::ServerUnaryReactor* reactor,
              const std::string& variant, const Placement& placement,
              std::function<void(Executor&, std::int64_t queue_ns)> run,
              std::shared_ptr<BatchMember> batch = nullptr);
  grpc::ServerUnaryReactor* inject_fault(CallContext& call);
  // Decode and Prefill: checked against the cache, planned and run in the cache's order.
  template <class Args, class Request, class Response>
  grpc::ServerUnaryReactor* serve_kv(CallContext& call, const Request* req, Response* resp,
                                     std::vector<std::int64_t> fresh, bool create_missing);
  Result<std::shared_ptr<KvCache>> find_cache(const std::string& handle, const std::string& field);
  // Where a cache's calls run: its device, in its order.
  Placement placement_of(const KvCache& c) const;
  Status kv_servable(const KvCacheConfig& cfg, const Target& target) const;
  friend class PutTensorReactor;
  friend class GetTensorReactor;
  friend class ReadKvReactor;
  template <class Args, class Response>
  friend class KvCall;
  template <class Request, class Response>
  friend class OneShotCall;
  template <class Args>
  friend struct Merging;
  // Finishes a call and counts it in the metrics (under its method's op label).
  void finish(const CallContext& call, grpc::ServerUnaryReactor* reactor,
              const std::string& variant, const Status& status, const v1::Timings* timings,
              std::size_t bytes_out);
  // A device fault poisoned `executor`: logs it and tells the server.
  void device_faulted(Executor& executor, const std::string& what, const Status& status);

  Scheduler& scheduler_;
  const Registry& registry_;
  ServiceConfig config_;
  RequestContext requests_;
  TokenCheck token_;  // PutTensor's, whose calls the gate hands over before their first message
  mutable std::mutex advertise_mu_;
  std::string advertise_address_;
};

}  // namespace attn::server
