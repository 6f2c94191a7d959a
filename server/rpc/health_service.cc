#include "rpc/health_service.h"

namespace attn::server {

using grpc::health::v1::HealthCheckRequest;
using grpc::health::v1::HealthCheckResponse;

// One Watch call: writes the current status, then each change, one write in flight at a time.
class HealthService::Watcher final : public grpc::ServerWriteReactor<HealthCheckResponse> {
 public:
  Watcher(HealthService* owner, std::string service)
      : owner_(owner), service_(std::move(service)) {}

  // Called with the owner's lock held.
  void notify(ServingStatus status) {
    std::lock_guard lock(mu_);
    if (done_) return;
    pending_ = status;
    has_pending_ = true;
    write_next_locked();
  }

  void OnWriteDone(bool ok) override {
    std::lock_guard lock(mu_);
    writing_ = false;
    if (!ok) {
      finish_locked(grpc::Status::CANCELLED);
      return;
    }
    write_next_locked();
  }
  void OnCancel() override {
    std::lock_guard lock(mu_);
    finish_locked(grpc::Status::CANCELLED);
  }
  void OnDone() override {
    owner_->unregister(this);
    delete this;
  }

  // The server is stopping: end the stream cleanly.
  void close() {
    std::lock_guard lock(mu_);
    finish_locked(grpc::Status::OK);
  }

 private:
  void write_next_locked() {
    if (writing_ || !has_pending_ || finishing_) return;
    has_pending_ = false;
    response_.set_status(pending_);
    writing_ = true;
    StartWrite(&response_);
  }
  void finish_locked(const grpc::Status& s) {
    done_ = true;
    if (finishing_) return;
    finishing_ = true;
    Finish(s);
  }

  HealthService* owner_;
  std::string service_;
  std::mutex mu_;
  HealthCheckResponse response_;
  ServingStatus pending_ = HealthCheckResponse::UNKNOWN;
  bool has_pending_ = false, writing_ = false, finishing_ = false, done_ = false;

  friend class HealthService;
};

HealthService::HealthService(const std::set<std::string>& services) {
  statuses_[""] = HealthCheckResponse::SERVING;
  for (const auto& s : services) statuses_[s] = HealthCheckResponse::SERVING;
}

HealthService::~HealthService() = default;

void HealthService::set_all(ServingStatus status) {
  std::lock_guard lock(mu_);
  for (auto& [name, st] : statuses_) st = status;
  for (Watcher* w : watchers_) w->notify(status);
}

void HealthService::shutdown() {
  std::lock_guard lock(mu_);
  for (auto& [name, st] : statuses_) st = HealthCheckResponse::NOT_SERVING;
  for (Watcher* w : watchers_) {
    w->notify(HealthCheckResponse::NOT_SERVING);
    w->close();
  }
}

HealthService::ServingStatus HealthService::get(const std::string& service) const {
  std::lock_guard lock(mu_);
  auto it = statuses_.find(service);
  return it == statuses_.end() ? HealthCheckResponse::SERVICE_UNKNOWN : it->second;
}

grpc::ServerUnaryReactor* HealthService::Check(grpc::CallbackServerContext* ctx,
                                               const HealthCheckRequest* request,
                                               HealthCheckResponse* response) {
  auto* reactor = ctx->DefaultReactor();
  const ServingStatus status = get(request->service());
  if (status == HealthCheckResponse::SERVICE_UNKNOWN) {
    reactor->Finish(
        {grpc::StatusCode::NOT_FOUND, "service: unknown service \"" + request->service() + "\""});
    return reactor;
  }
  response->set_status(status);
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

grpc::ServerWriteReactor<HealthCheckResponse>* HealthService::Watch(
    grpc::CallbackServerContext*, const HealthCheckRequest* request) {
  auto* w = new Watcher(this, request->service());
  std::lock_guard lock(mu_);
  watchers_.insert(w);
  w->notify(statuses_.count(request->service()) ? statuses_[request->service()]
                                                : HealthCheckResponse::SERVICE_UNKNOWN);
  return w;
}

void HealthService::unregister(Watcher* w) {
  std::lock_guard lock(mu_);
  watchers_.erase(w);
}

}  // namespace attn::server
