// grpc.health.v1.Health served as a regular service (gRPC's built-in one is invisible to server
// reflection): Check answers at once, Watch streams every change until the client goes away.
#pragma once

#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>

#include "grpc/health/v1/health.grpc.pb.h"

namespace attn::server {

class HealthService final : public grpc::health::v1::Health::CallbackService {
 public:
  using ServingStatus = grpc::health::v1::HealthCheckResponse::ServingStatus;

  // "" (the whole server) and each name in `services` start SERVING.
  explicit HealthService(const std::set<std::string>& services);
  ~HealthService() override;

  // Sets every known service's status and tells the watchers.
  void set_all(ServingStatus status);
  ServingStatus get(const std::string& service) const;
  // Sets NOT_SERVING and ends every Watch stream, so that shutdown does not wait on them.
  void shutdown();

  grpc::ServerUnaryReactor* Check(grpc::CallbackServerContext* ctx,
                                  const grpc::health::v1::HealthCheckRequest* request,
                                  grpc::health::v1::HealthCheckResponse* response) override;
  grpc::ServerWriteReactor<grpc::health::v1::HealthCheckResponse>* Watch(
      grpc::CallbackServerContext* ctx,
      const grpc::health::v1::HealthCheckRequest* request) override;

  class Watcher;

 private:
  friend class Watcher;
  void unregister(Watcher* w);

  mutable std::mutex mu_;
  std::map<std::string, ServingStatus> statuses_;
  std::set<Watcher*> watchers_;
};

}  // namespace attn::server
