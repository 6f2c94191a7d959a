#include "server.h"

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/resource_quota.h>
#include <grpcpp/server_builder.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <sstream>
#include <thread>

#include "attn/executor.h"
#include "attn/registry.h"
#include "attn/v1/attn.grpc.pb.h"
#include "attn/version.h"
#include "handlers/attn_service.h"
#include "requests/kv_request.h"
#include "rpc/gate.h"
#include "rpc/health_service.h"
#include "rpc/metrics.h"
#include "schedule/scheduler.h"
#include "state/kv_cache.h"
#include "state/memory_budget.h"
#include "state/shared_memory.h"
#include "state/tensor_store.h"

namespace attn::server {
namespace {

// How long connections stay open after the last call finished, for clients to read its response.
constexpr std::chrono::milliseconds kLinger{500};

Result<std::vector<int>> parse_devices(const std::string& devices) {
  std::vector<int> ordinals;
  if (devices == "all") return ordinals;
  std::size_t pos = 0;
  while (pos <= devices.size()) {
    const std::size_t comma = std::min(devices.find(',', pos), devices.size());
    const std::string item = devices.substr(pos, comma - pos);
    if (item.empty() || item.find_first_not_of("0123456789") != std::string::npos ||
        item.size() > 4) {
      return invalid_argument("--devices: expected \"all\" or CUDA ordinals like \"0,1\", got \"" +
                              devices + "\"");
    }
    ordinals.push_back(std::stoi(item));
    pos = comma + 1;
  }
  return ordinals;
}

Result<std::vector<std::unique_ptr<Executor>>> choose_executors(const std::string& backend,
                                                                const std::string& devices,
                                                                int streams) {
  std::vector<std::unique_ptr<Executor>> cpu;
  ATTN_ASSIGN_OR_RETURN(ordinals, parse_devices(devices));
  if (backend == "cpu") {
    cpu.push_back(make_cpu_executor());
    return cpu;
  }
  auto cuda = make_cuda_executors(ordinals, streams);
  if (!ordinals.empty() && !cuda.ok() && cuda.status().code() == StatusCode::kNotFound) {
    return invalid_argument("--devices: " + cuda.status().message());
  }
  if (backend == "cuda") {
    if (!cuda.ok()) return unavailable("--backend cuda: " + cuda.status().message());
    cuda->push_back(make_cpu_executor());  // fallback, as with auto
    return cuda;
  }
  if (backend != "auto") {
    return invalid_argument("--backend: expected auto, cpu or cuda, got \"" + backend + "\"");
  }
  if (cuda.ok()) {
    // The CPU stays available for what the GPU variants cannot take (an op or a dtype without a
    // CUDA variant yet); requests go to it only when no GPU variant fits.
    cuda->push_back(make_cpu_executor());
    return cuda;
  }
  spdlog::info("no usable GPU ({}): serving on the CPU backend", cuda.status().message());
  cpu.push_back(make_cpu_executor());
  return cpu;
}

// Runs every variant of `variants` this executor can run on `args` once; how many ran.
template <class Args>
int warm_up_variants(Executor& executor, const OpRegistry<Args>& variants, const Args& args) {
  int ran = 0;
  for (const auto& variant : variants.variants()) {
    if (!available_on(variant.info, executor.target()).ok() || !variant.supports(args).ok())
      continue;
    ExecTimings t;
    Args copy = args;  // a run may rebind its views
    const Status s = executor.execute(make_call(variant, copy), t);
    if (!s.ok()) spdlog::warn("warm-up of {} failed: {}", variant.info.name, s.to_string());
    ++ran;
  }
  return ran;
}

// The KV-cache ops' variants (every op of PagedOpArgs), once each per dtype on a one-token call
// into a small cache of head dims 64 and 128 made on the device (they have no generated problems:
// their state is a cache).
int warm_up_paged(Executor& executor) {
  const Registry& registry = default_registry();
  int ran = 0;
  for (DType dt : kAllDTypes)
    for (std::int64_t d : {64, 128}) {
      PagedKvLayer layer{dt, 1, 1, 16, d, nullptr, nullptr, executor.resident_kind()};
      const std::size_t pool = static_cast<std::size_t>(16 * d) * element_size(dt);
      auto memory = executor.allocate(2 * pool);
      if (!memory.ok()) return ran;
      layer.k = *memory;
      layer.v = static_cast<char*>(*memory) + pool;
      PagedPlan plan{{0, 1}, {0}, {1}, {0, 1}};
      Tensor q(dt, {1, 1, d}), k(dt, {1, 1, d}), v(dt, {1, 1, d}), o(dt, {1, 1, d});
      for_each_paged_op([&](auto desc) {
        using Args = typename decltype(desc)::Args;
        ran +=
            warm_up_variants(executor, registry.of<Args>(),
                             paged_call<Args>(layer, q.view(), k.view(), v.view(), o.view(), plan));
      });
      executor.deallocate(*memory);
    }
  return ran;
}

// Runs every variant this device can run once on each op's example of each dtype it claims, so
// that the first real calls do not pay for lazy kernel loading and library handles.
void warm_up(Executor& executor) {
  const Registry& registry = default_registry();
  int ran = 0;
  for_each_op([&](auto desc) {
    using Args = typename decltype(desc)::Args;
    for (DType dt : kAllDTypes) {
      const Problem<Args> problem = decltype(desc)::problem(decltype(desc)::example(dt)).value();
      std::vector<Tensor> tensors;
      tensors.reserve(problem.inputs.size() + problem.outputs.size());
      std::vector<TensorView> in, out;
      for (const TensorSpec& t : problem.inputs)
        in.push_back(tensors.emplace_back(t.dtype, t.shape).view());
      for (const TensorSpec& t : problem.outputs)
        out.push_back(tensors.emplace_back(t.dtype, t.shape).view());
      ran += warm_up_variants(executor, registry.of<Args>(), problem.bind(in, out));
    }
  });
  ran += warm_up_paged(executor);
  spdlog::info("warm-up: ran {} variant/dtype pairs on {}", ran, executor.device().label());
}

std::size_t inflight_bytes(const ServerOptions& options) {
  return options.max_inflight_mb > 0 ? static_cast<std::size_t>(options.max_inflight_mb) << 20
                                     : default_inflight_bytes();
}

Status check_options(const ServerOptions& options) {
  if (options.max_inflight_mb < 0) {
    return invalid_argument(
        "--max-inflight-mb: expected 0 (half of this machine's memory) or more, got " +
        std::to_string(options.max_inflight_mb));
  }
  // Else the largest requests could never be served.
  if (inflight_bytes(options) < static_cast<std::size_t>(options.max_message_mb) << 20) {
    return invalid_argument(
        "--max-inflight-mb: expected at least --max-message-mb (" +
        std::to_string(options.max_message_mb) + "), got " +
        std::to_string(inflight_bytes(options) >> 20) +
        (options.max_inflight_mb > 0 ? "" : " (half of this machine's memory)"));
  }
  if (options.max_message_mb < 1 || options.max_message_mb > 2047) {
    return invalid_argument("--max-message-mb: expected 1..2047 (protobuf's limit is 2 GiB), got " +
                            std::to_string(options.max_message_mb));
  }
  if (options.queue_depth < 1) return invalid_argument("--queue-depth: expected >= 1, got 0");
  if (options.batch_window_us < 0 || options.batch_window_us > 1000000) {
    return invalid_argument("--batch-window-us: expected 0 (off) to 1000000, got " +
                            std::to_string(options.batch_window_us));
  }
  if (options.max_batch_calls < 1 || options.max_batch_calls > 1024) {
    return invalid_argument("--max-batch-calls: expected 1..1024, got " +
                            std::to_string(options.max_batch_calls));
  }
  if (options.streams_per_device < 1 || options.streams_per_device > 8) {
    return invalid_argument("--streams-per-device: expected 1..8, got " +
                            std::to_string(options.streams_per_device));
  }
  if (options.tensor_quota_mb < 0 || options.tensor_ttl_s < 1 ||
      options.tensor_max_ttl_s < options.tensor_ttl_s) {
    return invalid_argument(
        "--tensor-quota-mb >= 0, --tensor-ttl-s >= 1 and --tensor-max-ttl-s >= --tensor-ttl-s");
  }
  return Status::Ok();
}

// Logs each device and warms the GPUs' variants up.
void announce_and_warm_up(const std::vector<std::unique_ptr<Executor>>& executors) {
  for (const auto& ex : executors) {
    spdlog::info("device: {}{}{}", ex->device().label(),
                 ex->target().backend == Backend::kCuda
                     ? " stream " + std::to_string(ex->device().stream)
                     : "",
                 ex.get() != executors.front().get() && ex->target().backend == Backend::kCpu
                     ? " (fallback for what the GPU variants cannot take)"
                     : "");
    if (ex->target().backend == Backend::kCuda) warm_up(*ex);
  }
}

std::unique_ptr<TensorStore> make_store(const ServerOptions& options, const Scheduler& scheduler,
                                        MemoryBudget* budget) {
  std::vector<Executor*> devices;
  for (const auto& ex : scheduler.executors()) devices.push_back(ex.get());
  TensorStoreOptions store_options;
  store_options.quota_bytes = static_cast<std::size_t>(options.tensor_quota_mb) << 20;
  store_options.host_budget = budget;
  store_options.default_ttl = std::chrono::seconds(options.tensor_ttl_s);
  store_options.max_ttl = std::chrono::seconds(options.tensor_max_ttl_s);
  return std::make_unique<TensorStore>(std::move(devices), store_options);
}

// --advertise-address, else the listen address with the bound port, a wildcard host replaced by
// the host name.
std::string advertise_address(const ServerOptions& options, int port) {
  if (!options.advertise_address.empty()) return options.advertise_address;
  std::string host = options.listen.substr(0, options.listen.rfind(':'));
  if (host.empty() || host == "0.0.0.0" || host == "[::]" || host == "::") {
    char name[256] = {};
    host = gethostname(name, sizeof name - 1) == 0 ? name : "localhost";
  }
  return host + ":" + std::to_string(port);
}

void log_serving(const ServerOptions& options, int port, const std::string& backend,
                 int metrics_port) {
  const std::string host = options.listen.substr(0, options.listen.rfind(':'));
  const bool tls = !options.security.tls_cert_file.empty();
  const bool mtls = tls && !options.security.tls_client_ca_file.empty();
  spdlog::info(
      "attnd {} serving on {}:{} with the {} backend; {}, {}; max message {} MiB, max {} "
      "elements per tensor, queue depth {}, {} MiB in flight",
      kVersion, host, port, backend, mtls ? "mutual TLS" : (tls ? "TLS" : "plaintext"),
      options.security.token.empty() ? "no token" : "bearer token required", options.max_message_mb,
      options.max_elements, options.queue_depth, inflight_bytes(options) >> 20);
  if (!is_loopback_address(options.listen) && !tls && options.security.token.empty()) {
    spdlog::warn(
        "listening on {} beyond loopback with neither TLS nor a token: anyone who can reach "
        "the port can use the server (see --tls-cert, --token-file)",
        options.listen);
  }
  if (metrics_port) {
    spdlog::info("metrics on http://{}:{}/metrics",
                 options.metrics_listen.substr(0, options.metrics_listen.rfind(':')), metrics_port);
  }
}

}  // namespace

Result<std::unique_ptr<Server>> Server::start(const ServerOptions& options) {
  ATTN_RETURN_IF_ERROR(check_options(options));
  ATTN_ASSIGN_OR_RETURN(
      executors, choose_executors(options.backend, options.devices, options.streams_per_device));
  ATTN_ASSIGN_OR_RETURN(credentials, make_server_credentials(options.security));

  std::unique_ptr<Server> s(new Server());
  s->options_ = options;
  s->backend_ = backend_name(executors.front()->target().backend);
  announce_and_warm_up(executors);
  BatchingOptions batching;
  batching.window = std::chrono::microseconds(options.batch_window_us);
  batching.max_calls = static_cast<std::size_t>(options.max_batch_calls);
  s->scheduler_ = std::make_unique<Scheduler>(std::move(executors), options.queue_depth, batching);
  // One budget for the host memory the process holds: calls' bytes and, on the CPU backend,
  // resident tensors and KV caches.
  s->budget_ = std::make_unique<MemoryBudget>(inflight_bytes(options));
  // The GPU executors' pinned staging is bounded and held for the process's life: charged once.
  std::size_t pinned = 0;
  for (const auto& ex : s->scheduler_->executors()) pinned += ex->pinned_staging_bound();
  if (pinned > 0) {
    const Status charged = s->budget_->take_resident(pinned, "the GPU executors' pinned staging");
    if (!charged.ok()) {
      s->scheduler_->stop();
      return invalid_argument("--max-inflight-mb: expected room for the GPU executors' pinned staging (" +
                              std::to_string(pinned >> 20) + " MiB) besides calls: " + charged.message());
    }
    spdlog::info("pinned staging: {} MiB, charged to the in-flight budget", pinned >> 20);
  }
  s->store_ = make_store(options, *s->scheduler_, s->budget_.get());
  {
    std::vector<Executor*> devices;
    for (const auto& ex : s->scheduler_->executors()) devices.push_back(ex.get());
    TensorStoreOptions kv_options;
    kv_options.default_ttl = std::chrono::seconds(options.tensor_ttl_s);
    kv_options.max_ttl = std::chrono::seconds(options.tensor_max_ttl_s);
    // The records kept for repeats (expected_lengths) are host memory, held between calls.
    kv_options.host_budget = s->budget_.get();
    s->kv_caches_ = std::make_unique<KvCacheStore>(std::move(devices), s->store_.get(), kv_options);
    s->store_->set_reclaim([caches = s->kv_caches_.get()] { caches->drop_expired(); });
  }
  {
    auto shm = parse_shared_memory_flag(options.shared_memory);
    if (!shm.ok()) {
      s->scheduler_->stop();
      return shm.status();
    }
    if (shm->system || shm->cuda) {
      std::vector<int> cuda_devices;
      for (const auto& ex : s->scheduler_->executors())
        if (ex->device().backend == Backend::kCuda && ex->device().stream == 0)
          cuda_devices.push_back(ex->device().ordinal);
      s->shm_ = std::make_unique<SharedMemoryRegistry>(*shm, s->store_.get(), cuda_devices);
      spdlog::info("shared memory on: {}{}{}", shm->system ? "system" : "",
                   shm->system && shm->cuda ? ", " : "",
                   !shm->cuda ? ""
                   : !cuda_ipc_built()
                       ? "cuda (but this build has no CUDA backend: CUDA regions are refused)"
                   : cuda_devices.empty() ? "cuda (but no GPU is served: CUDA regions are refused)"
                                          : "cuda (IPC)");
    }
  }
  if (Status started = s->start_services(); !started.ok()) {
    s->scheduler_->stop();
    return started;
  }
  if (Status listening = s->listen(credentials); !listening.ok()) {
    s->scheduler_->stop();
    return listening;
  }
  s->service_->kv.set_advertise_address(advertise_address(options, s->port_));
  log_serving(options, s->port_, s->backend_, s->metrics_port());
  return s;
}

Status Server::start_services() {
  const std::int64_t max_bytes = options_.max_message_mb * 1024 * 1024;
  ServiceConfig config;
  config.max_message_bytes = max_bytes;
  config.limits.max_elements = options_.max_elements;
  health_ = std::make_unique<HealthService>(
      std::set<std::string>{std::string(v1::AttnService::service_full_name())});
  config.on_device_fault = [health = health_.get(),
                            on_fatal = options_.on_fatal](const std::string& why) {
    health->set_all(grpc::health::v1::HealthCheckResponse::NOT_SERVING);
    if (on_fatal) on_fatal(why);
  };
  config.token = options_.security.token;
  config.store = store_.get();
  config.kv_caches = kv_caches_.get();
  config.shm = shm_.get();
  config.fault_injection = options_.fault_injection;
  if (options_.fault_injection)
    spdlog::warn("fault injection is on: a call can make the device fault");
  if (!options_.metrics_listen.empty()) {
    ATTN_ASSIGN_OR_RETURN(metrics, Metrics::start(options_.metrics_listen, *scheduler_));
    metrics_ = std::move(metrics);
    config.metrics = metrics_.get();
  }
  service_ = std::make_unique<AttnService>(*scheduler_, default_registry(), config);
  GateConfig gate;
  gate.token = options_.security.token;
  gate.budget = budget_.get();
  gate.metrics = metrics_.get();
  gate.max_message_bytes = static_cast<std::size_t>(max_bytes);
  gated_ = std::make_unique<GatedMethods>(*service_, gate);
  unknown_ = std::make_unique<UnknownMethods>();
  return Status::Ok();
}

Status Server::listen(const std::shared_ptr<grpc::ServerCredentials>& credentials) {
  const int max_bytes = static_cast<int>(options_.max_message_mb * 1024 * 1024);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  builder.AddListeningPort(options_.listen, credentials, &port_);
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);  // a busy port is an error, not shared
  builder.SetMaxReceiveMessageSize(max_bytes);
  builder.SetMaxSendMessageSize(max_bytes);
  if (const char* extra = std::getenv("ATTND_GRPC_ARGS")) {  // EXPERIMENT: name=int,...
    std::stringstream in(extra);
    for (std::string kv; std::getline(in, kv, ',');)
      if (auto eq = kv.find('='); eq != std::string::npos)
        builder.AddChannelArgument(kv.substr(0, eq), std::stoi(kv.substr(eq + 1)));
  }
  // gRPC's own account of the bytes its transports hold (a request still arriving): past the
  // same limit it resets streams with RESOURCE_EXHAUSTED. Once read, a request is the budget's.
  grpc::ResourceQuota quota("attnd");
  quota.Resize(budget_->limit());
  builder.SetResourceQuota(quota);
  builder.RegisterService(gated_.get());
  builder.RegisterCallbackGenericService(unknown_.get());
  builder.RegisterService(health_.get());
  grpc_server_ = builder.BuildAndStart();
  if (!grpc_server_ || port_ == 0) {
    return unavailable("--listen: could not listen on " + options_.listen +
                       " (address in use, or not an address of this machine?)");
  }
  return Status::Ok();
}

void Server::shutdown() {
  if (stopped_) return;
  stopped_ = true;
  if (!grpc_server_) {  // start() failed before serving
    if (scheduler_) scheduler_->stop();
    return;
  }
  spdlog::info("shutting down: refusing new calls, waiting up to {} ms for in-flight ones",
               options_.shutdown_grace.count());
  health_->shutdown();
  const auto deadline = std::chrono::system_clock::now() + options_.shutdown_grace;
  grpc_server_->Shutdown(deadline);
  scheduler_->stop();
  grpc_server_->Wait();
  // The calls are done, but their last responses may still be on their way to the clients, who
  // answer with flow-control frames. Exiting now closes the connections with those frames unread,
  // which resets them (TCP RST), and a client loses the tail of a response the server finished
  // (seen: a 9 MB matmul result drained on SIGTERM, then "recvmsg: Connection reset by peer").
  // The connections stay served a moment longer, within the grace period.
  std::this_thread::sleep_until(std::min(deadline, std::chrono::system_clock::now() + kLinger));
  spdlog::info("stopped");
}

int Server::metrics_port() const { return metrics_ ? metrics_->port() : 0; }

Server::~Server() { shutdown(); }

}  // namespace attn::server
