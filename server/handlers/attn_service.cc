#include "handlers/attn_service.h"

#include <spdlog/spdlog.h>

namespace attn::server {
Status call_abandoned(const CallContext& call) {
  // gRPC cancels a call whose deadline passed, so the deadline is looked at first.
  if (call.grpc->deadline() < std::chrono::system_clock::now()) {
    return deadline_exceeded("the call's deadline passed while it waited in the queue");
  }
  if (call.grpc->IsCancelled())
    return cancelled("the caller cancelled the call while it waited in the queue");
  return Status::Ok();
}

bool known_op(const std::string& name) {
  bool known = false;
  for_each_op([&](auto desc) { known |= name == decltype(desc)::kName; });
  return known;
}

std::string op_names() {
  std::string names;
  for_each_op([&](auto desc) {
    names += (names.empty() ? "\"" : ", \"") + std::string(decltype(desc)::kName) + "\"";
  });
  return names;
}

AttnService::AttnService(Scheduler& scheduler, const Registry& registry, ServiceConfig config)
    : scheduler_(scheduler),
      registry_(registry),
      config_(std::move(config)),
      token_(config_.token) {
  requests_.registry = &registry_;
  for (const auto& ex : scheduler_.executors()) {
    const Target t = ex->target();
    bool seen = false;
    for (const Target& known : requests_.targets) seen |= known.backend == t.backend;
    if (!seen) requests_.targets.push_back(t);
  }
  requests_.limits = config_.limits;
  requests_.store = config_.store;
  requests_.shm = config_.shm;
  for (std::size_t i = 0; i < scheduler_.executors().size(); ++i) {
    requests_.executor_targets.push_back(scheduler_.executors()[i]->target());
    requests_.executor_devices.push_back(scheduler_.device_of(i));
    const DeviceInfo& d = scheduler_.executors()[i]->device();
    requests_.executor_cuda_ordinals.push_back(d.backend == Backend::kCuda ? d.ordinal : -1);
  }
}

void AttnService::finish(const CallContext& call, grpc::ServerUnaryReactor* reactor,
                         const std::string& variant, const Status& status,
                         const v1::Timings* timings, std::size_t bytes_out) {
  const grpc::Status g = wire::to_grpc(status);
  if (!status.ok())
    spdlog::warn("{} from {} failed: {}", call.op(), call.peer(), status.to_string());
  if (config_.metrics)
    config_.metrics->record(call.op(), variant, g.error_code(), timings, call.bytes_in, bytes_out);
  reactor->Finish(g);
}

void AttnService::device_faulted(Executor& executor, const std::string& what,
                                 const Status& status) {
  if (!executor.poisoned()) return;
  spdlog::critical(
      "device {} faulted running {}: {}; it cannot serve again until the server restarts",
      executor.device().label(), what, status.to_string());
  if (config_.on_device_fault) config_.on_device_fault(status.message());
}

void AttnService::submit(const CallContext& call, grpc::ServerUnaryReactor* reactor,
                         const std::string& variant, const Placement& placement,
                         std::function<void(Executor&, std::int64_t queue_ns)> run,
                         std::shared_ptr<BatchMember> batch) {
  Scheduler::Job job;
  job.abandoned = [&call] { return call_abandoned(call); };
  job.drop = [=, this, &call](const Status& why) {
    finish(call, reactor, variant, why, nullptr, 0);
  };
  job.run = std::move(run);
  job.batch = std::move(batch);
  const Status queued = scheduler_.submit(placement, std::move(job));
  if (!queued.ok()) finish(call, reactor, variant, queued, nullptr, 0);
}

}  // namespace attn::server
