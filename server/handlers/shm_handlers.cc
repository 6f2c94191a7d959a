// RegisterSharedMemory, UnregisterSharedMemory and SharedMemoryStatus: a caller's regions
// (shared_memory.h), served on the gRPC thread.
#include "handlers/shm_handlers.h"

#include "state/shared_memory.h"
#include "state/tensor_store.h"

namespace attn::server {
namespace {

// Shared memory is for clients on the server's host: a region names an object in the host's
// /dev/shm, so a caller from another host could only name somebody else's object (and read it
// back through an op's output). Loopback and Unix-socket peers only.
bool local_peer(const std::string& peer) {
  return peer.rfind("unix:", 0) == 0 || peer.rfind("ipv4:127.", 0) == 0 ||
         peer.rfind("ipv6:[::1]", 0) == 0 || peer.rfind("ipv6:%5B::1%5D", 0) == 0 ||
         peer.rfind("ipv6:[::ffff:127.", 0) == 0;
}

Status shm_off(const char* method) {
  return failed_precondition(
      std::string(method) +
      ": this server serves no shared memory (start it with --shared-memory system)");
}

}  // namespace

grpc::ServerUnaryReactor* ShmHandlers::RegisterSharedMemory(
    CallContext& call, const v1::RegisterSharedMemoryRequest* req,
    v1::RegisterSharedMemoryResponse* resp) {
  auto* reactor = call.grpc->DefaultReactor();
  if (!core_.config.shm) {
    core_.finish(call, reactor, "", shm_off("RegisterSharedMemory"), nullptr, 0);
    return reactor;
  }
  if (!local_peer(call.peer())) {
    core_.finish(call, reactor, "",
                 failed_precondition(
                     "RegisterSharedMemory: shared memory is for clients on the server's host "
                     "(loopback or a Unix socket); this call came from " +
                     call.peer()),
                 nullptr, 0);
    return reactor;
  }
  auto r = core_.config.shm->add(call.caller, *req);
  if (r.ok()) (*r)->describe(resp->mutable_region());
  core_.finish(call, reactor, "", r.status(), nullptr, 0);
  return reactor;
}

grpc::ServerUnaryReactor* ShmHandlers::UnregisterSharedMemory(
    CallContext& call, const v1::UnregisterSharedMemoryRequest* req,
    v1::UnregisterSharedMemoryResponse* resp) {
  auto* reactor = call.grpc->DefaultReactor();
  if (!core_.config.shm) {
    core_.finish(call, reactor, "", shm_off("UnregisterSharedMemory"), nullptr, 0);
    return reactor;
  }
  auto n = core_.config.shm->remove(call.caller, req->name());
  if (n.ok()) resp->set_unregistered(*n);
  core_.finish(call, reactor, "", n.status(), nullptr, 0);
  return reactor;
}

grpc::ServerUnaryReactor* ShmHandlers::SharedMemoryStatus(CallContext& call,
                                                          const v1::SharedMemoryStatusRequest* req,
                                                          v1::SharedMemoryStatusResponse* resp) {
  auto* reactor = call.grpc->DefaultReactor();
  if (!core_.config.shm) {
    core_.finish(call, reactor, "", shm_off("SharedMemoryStatus"), nullptr, 0);
    return reactor;
  }
  const auto regions = core_.config.shm->list(call.caller, req->name());
  if (!req->name().empty() && regions.empty()) {
    core_.finish(call, reactor, "",
                 not_found("name: no shared-memory region named \"" + req->name() +
                           "\" is registered by this caller"),
                 nullptr, 0);
    return reactor;
  }
  for (const auto& r : regions) r->describe(resp->add_regions());
  if (core_.config.store) {
    resp->set_used_bytes(static_cast<std::int64_t>(core_.config.store->used_bytes()));
    resp->set_quota_bytes(static_cast<std::int64_t>(core_.config.store->quota_bytes()));
  }
  core_.finish(call, reactor, "", Status::Ok(), nullptr, resp->ByteSizeLong());
  return reactor;
}

}  // namespace attn::server
