#include "server.h"

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/server_builder.h>
#include <spdlog/spdlog.h>

#include "attn/executor.h"
#include "attn/registry.h"
#include "attn/version.h"
#include "attn_service.h"
#include "health_service.h"
#include "scheduler.h"

namespace attn::server {
namespace {

Result<std::vector<std::unique_ptr<Executor>>> choose_executors(const std::string& backend) {
  std::vector<std::unique_ptr<Executor>> cpu;
  if (backend == "cpu") {
    cpu.push_back(make_cpu_executor());
    return cpu;
  }
  auto cuda = make_cuda_executors();
  if (backend == "cuda") {
    if (!cuda.ok()) return unavailable("--backend cuda: " + cuda.status().message());
    return cuda;
  }
  if (backend != "auto") {
    return invalid_argument("--backend: expected auto, cpu or cuda, got \"" + backend + "\"");
  }
  if (cuda.ok()) return cuda;
  spdlog::info("no usable GPU ({}): serving on the CPU backend", cuda.status().message());
  cpu.push_back(make_cpu_executor());
  return cpu;
}

}  // namespace

Result<std::unique_ptr<Server>> Server::start(const ServerOptions& options) {
  if (options.max_message_mb < 1 || options.max_message_mb > 2047) {
    return invalid_argument("--max-message-mb: expected 1..2047 (protobuf's limit is 2 GiB), got " +
                            std::to_string(options.max_message_mb));
  }
  if (options.queue_depth < 1) return invalid_argument("--queue-depth: expected >= 1, got 0");
  ATTN_ASSIGN_OR_RETURN(executors, choose_executors(options.backend));

  std::unique_ptr<Server> s(new Server());
  s->options_ = options;
  s->backend_ = backend_name(executors.front()->target().backend);
  for (const auto& ex : executors) spdlog::info("device: {}", ex->device().label());
  s->scheduler_ = std::make_unique<Scheduler>(std::move(executors), options.queue_depth);

  const std::int64_t max_bytes = options.max_message_mb * 1024 * 1024;
  ServiceConfig config;
  config.max_message_bytes = max_bytes;
  config.limits.max_elements = options.max_elements;
  s->service_ = std::make_unique<AttnService>(*s->scheduler_, default_registry(), config);
  s->health_ = std::make_unique<HealthService>(
      std::set<std::string>{std::string(v1::AttnService::service_full_name())});

  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  builder.AddListeningPort(options.listen, grpc::InsecureServerCredentials(), &s->port_);
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);  // a busy port is an error, not shared
  builder.SetMaxReceiveMessageSize(static_cast<int>(max_bytes));
  builder.SetMaxSendMessageSize(static_cast<int>(max_bytes));
  builder.RegisterService(s->service_.get());
  builder.RegisterService(s->health_.get());
  s->grpc_server_ = builder.BuildAndStart();
  if (!s->grpc_server_ || s->port_ == 0) {
    s->scheduler_->stop();
    return unavailable("--listen: could not listen on " + options.listen +
                       " (address in use, or not an address of this machine?)");
  }
  std::string host = options.listen.substr(0, options.listen.rfind(':'));
  spdlog::info("attnd {} serving on {}:{} with the {} backend; max message {} MiB, max {} elements "
               "per tensor, queue depth {}",
               kVersion, host, s->port_, s->backend_, options.max_message_mb, options.max_elements,
               options.queue_depth);
  return s;
}

void Server::shutdown() {
  if (stopped_) return;
  stopped_ = true;
  spdlog::info("shutting down: refusing new calls, waiting up to {} ms for in-flight ones",
               options_.shutdown_grace.count());
  health_->shutdown();
  grpc_server_->Shutdown(std::chrono::system_clock::now() + options_.shutdown_grace);
  scheduler_->stop();
  grpc_server_->Wait();
  spdlog::info("stopped");
}

Server::~Server() { shutdown(); }

}  // namespace attn::server
