// attnd's gRPC server: picks the backend, builds the services (attn.v1.AttnService, health,
// reflection), listens, and shuts down gracefully.
#pragma once

#include <grpcpp/server.h>

#include <chrono>
#include <memory>
#include <string>

#include "attn/status.h"

namespace attn::server {

struct ServerOptions {
  std::string listen = "127.0.0.1:50051";
  std::string backend = "auto";  // auto | cpu | cuda
  std::int64_t max_message_mb = 1024;
  std::int64_t max_elements = std::int64_t{1} << 31;
  std::size_t queue_depth = 256;
  std::chrono::milliseconds shutdown_grace{10000};
};

class Scheduler;
class AttnService;
class HealthService;

class Server {
 public:
  // Starts serving, or says why it cannot (no such backend, address in use, ...).
  static Result<std::unique_ptr<Server>> start(const ServerOptions& options);
  ~Server();

  // The port actually bound (useful with port 0).
  int port() const { return port_; }
  const std::string& backend() const { return backend_; }

  // Health to NOT_SERVING, refuse new calls, let in-flight ones finish within the grace period,
  // then stop the device workers.
  void shutdown();

 private:
  Server() = default;
  ServerOptions options_;
  int port_ = 0;
  std::string backend_;
  std::unique_ptr<Scheduler> scheduler_;
  std::unique_ptr<AttnService> service_;
  std::unique_ptr<HealthService> health_;
  std::unique_ptr<grpc::Server> grpc_server_;
  bool stopped_ = false;
};

}  // namespace attn::server
