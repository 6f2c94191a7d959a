// KV caches: CreateKvCache .. ReadKv, and Decode and Prefill over a cache.
#pragma once

#include <mutex>
#include <string>
#include <vector>

#include "handlers/service_core.h"
#include "state/kv_cache.h"

namespace attn::server {

class KvHandlers final {
 public:
  explicit KvHandlers(ServiceCore& core) : core_(core) {}

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
  grpc::ServerUnaryReactor* TruncateSequence(CallContext& call, const v1::TruncateSequenceRequest* req,
                                             v1::TruncateSequenceResponse* resp);
  grpc::ServerUnaryReactor* Decode(CallContext& call, const v1::DecodeRequest* req,
                                   v1::DecodeResponse* resp);
  grpc::ServerUnaryReactor* Prefill(CallContext& call, const v1::PrefillRequest* req,
                                    v1::PrefillResponse* resp);
  grpc::ServerWriteReactor<v1::ReadKvResponse>* ReadKv(CallContext& call,
                                                       const v1::ReadKvRequest* req);

  // This server's address as clients of several replicas reach it (KvCacheInfo.replica), set
  // once the port is bound.
  void set_advertise_address(const std::string& address);

 private:
  // Decode and Prefill: checked against the cache, planned and run in the cache's order.
  template <class Args, class Request, class Response>
  grpc::ServerUnaryReactor* serve_kv(CallContext& call, const Request* req, Response* resp,
                                     std::vector<std::int64_t> fresh, bool create_missing);
  Result<std::shared_ptr<KvCache>> find_cache(const std::string& handle,
                                              const std::string& field) const;
  // A KvCacheInfo for a cache, with its sequences when asked.
  void describe(const KvCache& c, bool with_sequences, v1::KvCacheInfo* out) const;
  Status kv_servable(const KvCacheConfig& cfg, const Target& target) const;

  ServiceCore& core_;
  mutable std::mutex advertise_mu_;
  std::string advertise_address_;
};

// Where a cache's calls run: its device, in its order.
Placement placement_of(const Scheduler& scheduler, const KvCache& c);

}  // namespace attn::server
