// RegisterSharedMemory, UnregisterSharedMemory and SharedMemoryStatus: a caller's regions
// (shared_memory.h), served on the gRPC thread.
#include "attn_service.h"
#include "shared_memory.h"
#include "tensor_store.h"

namespace attn::server {
namespace {

// Shared memory is for clients on the server's host: a region names an object in the host's
// /dev/shm, so a caller from another host could only name somebody else's object (and read it
// back through an op's output). Loopback and Unix-socket peers only.
bool local_peer(const std::string& peer) {
  return peer.rfind("unix:", 0) == 0 || peer.rfind("ipv4:127.", 0) == 0 || peer.rfind("ipv6:[::1]", 0) == 0 ||
         peer.rfind("ipv6:%5B::1%5D", 0) == 0 || peer.rfind("ipv6:[::ffff:127.", 0) == 0;
}

Status shm_off(const char* method) {
  return failed_precondition(
      std::string(method) +
      ": this server serves no shared memory (start it with --shared-memory system)");
}

}  // namespace

grpc::ServerUnaryReactor* AttnService::RegisterSharedMemory(
    grpc::CallbackServerContext* ctx, const v1::RegisterSharedMemoryRequest* req,
    v1::RegisterSharedMemoryResponse* resp) {
  const char* op = "register_shared_memory";
  if (auto* refused = refuse_unauthenticated(ctx, op, 0)) return refused;
  auto* reactor = ctx->DefaultReactor();
  if (!config_.shm) {
    finish(reactor, ctx, op, "", shm_off("RegisterSharedMemory"), nullptr, 0, 0);
    return reactor;
  }
  if (!local_peer(ctx->peer())) {
    finish(reactor, ctx, op, "",
           failed_precondition("RegisterSharedMemory: shared memory is for clients on the server's host "
                               "(loopback or a Unix socket); this call came from " + ctx->peer()),
           nullptr, 0, 0);
    return reactor;
  }
  auto r = config_.shm->add(token_.owner(*ctx), *req);
  if (r.ok()) (*r)->describe(resp->mutable_region());
  finish(reactor, ctx, op, "", r.status(), nullptr, 0, 0);
  return reactor;
}

grpc::ServerUnaryReactor* AttnService::UnregisterSharedMemory(
    grpc::CallbackServerContext* ctx, const v1::UnregisterSharedMemoryRequest* req,
    v1::UnregisterSharedMemoryResponse* resp) {
  const char* op = "unregister_shared_memory";
  if (auto* refused = refuse_unauthenticated(ctx, op, 0)) return refused;
  auto* reactor = ctx->DefaultReactor();
  if (!config_.shm) {
    finish(reactor, ctx, op, "", shm_off("UnregisterSharedMemory"), nullptr, 0, 0);
    return reactor;
  }
  auto n = config_.shm->remove(token_.owner(*ctx), req->name());
  if (n.ok()) resp->set_unregistered(*n);
  finish(reactor, ctx, op, "", n.status(), nullptr, 0, 0);
  return reactor;
}

grpc::ServerUnaryReactor* AttnService::SharedMemoryStatus(grpc::CallbackServerContext* ctx,
                                                          const v1::SharedMemoryStatusRequest* req,
                                                          v1::SharedMemoryStatusResponse* resp) {
  const char* op = "shared_memory_status";
  if (auto* refused = refuse_unauthenticated(ctx, op, 0)) return refused;
  auto* reactor = ctx->DefaultReactor();
  if (!config_.shm) {
    finish(reactor, ctx, op, "", shm_off("SharedMemoryStatus"), nullptr, 0, 0);
    return reactor;
  }
  const auto regions = config_.shm->list(token_.owner(*ctx), req->name());
  if (!req->name().empty() && regions.empty()) {
    finish(reactor, ctx, op, "",
           not_found("name: no shared-memory region named \"" + req->name() +
                     "\" is registered by this caller"),
           nullptr, 0, 0);
    return reactor;
  }
  for (const auto& r : regions) r->describe(resp->add_regions());
  if (config_.store) {
    resp->set_used_bytes(static_cast<std::int64_t>(config_.store->used_bytes()));
    resp->set_quota_bytes(static_cast<std::int64_t>(config_.store->quota_bytes()));
  }
  finish(reactor, ctx, op, "", Status::Ok(), nullptr, 0, resp->ByteSizeLong());
  return reactor;
}

}  // namespace attn::server
