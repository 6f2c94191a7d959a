// attnd's gRPC server: picks the backend, builds the services (attn.v1.AttnService, health,
// reflection), listens, and shuts down gracefully.
#pragma once

#include <grpcpp/security/server_credentials.h>
#include <grpcpp/server.h>

#include <chrono>
#include <functional>
#include <memory>
#include <string>

#include "attn/status.h"
#include "rpc/security.h"

namespace attn::server {

struct ServerOptions {
  std::string listen = "127.0.0.1:50051";
  std::string backend = "auto";  // auto | cpu | cuda
  std::int64_t max_message_mb = 1024;
  // Request and response bytes held by all calls at once (0: default_inflight_bytes()).
  std::int64_t max_inflight_mb = 0;
  std::int64_t max_elements = std::int64_t{1} << 31;
  std::size_t queue_depth = 256;
  std::chrono::milliseconds shutdown_grace{10000};
  std::string devices = "all";  // CUDA devices to own: "all" or ordinals, "0,2"
  int streams_per_device = 2;    // workers (each with a stream) per GPU: copies overlap kernels
  // Dynamic batching: how long a call may wait for company to share its launch (0: off), and
  // the most calls one launch serves.
  std::int64_t batch_window_us = 200;
  std::int64_t max_batch_calls = 64;
  SecurityOptions security;
  std::string metrics_listen;  // Prometheus endpoint, "127.0.0.1:9464"; empty: none
  std::int64_t tensor_quota_mb = 8192;  // resident tensors, all devices together
  std::int64_t tensor_ttl_s = 600;      // when PutTensor/keep_output give none
  std::int64_t tensor_max_ttl_s = 86400;
  bool fault_injection = false;
  // --shared-memory: "system", "cuda", both comma-separated, or empty (off).
  std::string shared_memory;
  // The address clients of several replicas reach this one at (KV caches live on one replica);
  // empty: --listen's, with a wildcard host replaced by the host name.
  std::string advertise_address;
  // Called (once, from a worker thread) when a device fault leaves the server unable to serve:
  // the process should shut down and exit non-zero so that its supervisor restarts it.
  std::function<void(const std::string& why)> on_fatal;
};

class Metrics;
class TensorStore;
class KvCacheStore;
class SharedMemoryRegistry;

class Scheduler;
struct AttnService;
class GatedMethods;
class UnknownMethods;
class MemoryBudget;
class HealthService;

class Server {
 public:
  // Starts serving, or says why it cannot (no such backend, address in use, ...).
  static Result<std::unique_ptr<Server>> start(const ServerOptions& options);
  ~Server();

  // The port actually bound (useful with port 0).
  int port() const { return port_; }
  const std::string& backend() const { return backend_; }
  // The Prometheus endpoint's port, 0 when metrics are off.
  int metrics_port() const;

  // Health to NOT_SERVING, refuse new calls, let in-flight ones finish within the grace period,
  // then stop the device workers.
  void shutdown();

 private:
  Server() = default;
  // The services (AttnService, health, metrics) over the scheduler and store.
  Status start_services();
  // Builds the gRPC server and binds options_.listen.
  Status listen(const std::shared_ptr<grpc::ServerCredentials>& credentials);
  ServerOptions options_;
  int port_ = 0;
  std::string backend_;
  std::unique_ptr<Scheduler> scheduler_;
  // Before the store: resident tensors and KV caches give their host bytes back to it as they go.
  std::unique_ptr<MemoryBudget> budget_;
  std::unique_ptr<TensorStore> store_;  // after the scheduler: its tensors go before the devices
  std::unique_ptr<KvCacheStore> kv_caches_;  // after the store, whose quota it shares
  std::unique_ptr<SharedMemoryRegistry> shm_;  // likewise; null: --shared-memory off
  std::unique_ptr<AttnService> service_;
  std::unique_ptr<GatedMethods> gated_;
  std::unique_ptr<UnknownMethods> unknown_;
  std::unique_ptr<HealthService> health_;
  std::unique_ptr<Metrics> metrics_;
  std::unique_ptr<grpc::Server> grpc_server_;
  bool stopped_ = false;
};

}  // namespace attn::server
