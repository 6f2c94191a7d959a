#include "handlers/service_core.h"

#include <spdlog/spdlog.h>

#include "state/tensor_store.h"

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

ServiceCore::ServiceCore(Scheduler& workers, const Registry& variants, ServiceConfig settings)
    : scheduler(workers), registry(variants), config(std::move(settings)), token(config.token) {
  requests.registry = &registry;
  for (const auto& ex : scheduler.executors()) {
    const Target t = ex->target();
    bool seen = false;
    for (const Target& known : requests.targets) seen |= known.backend == t.backend;
    if (!seen) requests.targets.push_back(t);
  }
  requests.limits = config.limits;
  requests.store = config.store;
  requests.shm = config.shm;
  for (std::size_t i = 0; i < scheduler.executors().size(); ++i) {
    requests.executor_targets.push_back(scheduler.executors()[i]->target());
    requests.executor_devices.push_back(scheduler.device_of(i));
    const DeviceInfo& d = scheduler.executors()[i]->device();
    requests.executor_cuda_ordinals.push_back(d.backend == Backend::kCuda ? d.ordinal : -1);
  }
}

void ServiceCore::finish(const CallContext& call, grpc::ServerUnaryReactor* reactor,
                         const std::string& variant, const Status& status,
                         const v1::Timings* timings, std::size_t bytes_out) const {
  const grpc::Status g = wire::to_grpc(status);
  if (!status.ok())
    spdlog::warn("{} from {} failed: {}", call.op(), call.peer(), status.to_string());
  if (config.metrics)
    config.metrics->record(call.op(), variant, g.error_code(), timings, call.bytes_in, bytes_out);
  reactor->Finish(g);
}

void ServiceCore::device_faulted(Executor& executor, const std::string& what,
                                 const Status& status) const {
  if (!executor.poisoned()) return;
  spdlog::critical(
      "device {} faulted running {}: {}; it cannot serve again until the server restarts",
      executor.device().label(), what, status.to_string());
  if (config.on_device_fault) config.on_device_fault(status.message());
}

void ServiceCore::submit(const CallContext& call, grpc::ServerUnaryReactor* reactor,
                         const std::string& variant, const Placement& placement,
                         std::function<void(Executor&, std::int64_t queue_ns)> run,
                         std::shared_ptr<BatchMember> batch) const {
  Scheduler::Job job;
  job.abandoned = [&call] { return call_abandoned(call); };
  job.drop = [=, this, &call](const Status& why) {
    finish(call, reactor, variant, why, nullptr, 0);
  };
  job.run = std::move(run);
  job.batch = std::move(batch);
  const Status queued = scheduler.submit(placement, std::move(job));
  if (!queued.ok()) finish(call, reactor, variant, queued, nullptr, 0);
}

Result<std::size_t> ServiceCore::place(const std::string& device) const {
  const auto& executors = scheduler.executors();
  if (!device.empty()) {
    for (std::size_t i = 0; i < executors.size(); ++i) {
      const std::string label = executors[i]->device().label();
      if (label == device || label.rfind(device + " ", 0) == 0 || label.rfind(device + ":", 0) == 0)
        return i;
    }
    std::string known;
    for (const auto& ex : executors)
      known += (known.empty() ? "\"" : ", \"") + ex->device().label() + "\"";
    return invalid_argument("header.device: expected one of " + known +
                            " (or a prefix like \"cuda:0\"), got \"" + device + "\"");
  }
  std::vector<std::size_t> serving;
  for (std::size_t i = 0; i < executors.size(); ++i)
    if (executors[i]->target().backend == serving_backend()) serving.push_back(i);
  return config.store->least_used(serving);
}

}  // namespace attn::server
