#include "rpc/metrics.h"

#include <CivetServer.h>
#include <prometheus/collectable.h>
#include <prometheus/counter.h>
#include <prometheus/exposer.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

#include <map>
#include <mutex>

#include "schedule/scheduler.h"

namespace attn::server {
namespace {

using prometheus::Histogram;

// Latency buckets in seconds: 10 us to 30 s.
Histogram::BucketBoundaries latency_buckets() {
  return {1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1, 3, 10, 30};
}

// Gauges read from the scheduler and the devices at scrape time, so they are never stale.
class DeviceCollector final : public prometheus::Collectable {
 public:
  explicit DeviceCollector(const Scheduler& scheduler) : scheduler_(scheduler) {}

  std::vector<prometheus::MetricFamily> Collect() const override {
    prometheus::MetricFamily load{"attnd_queue_depth",
                                  "requests waiting or running per device",
                                  prometheus::MetricType::Gauge,
                                  {}};
    prometheus::MetricFamily memory{"attnd_device_memory_in_use_bytes",
                                    "device memory held by the server's buffers, per device",
                                    prometheus::MetricType::Gauge,
                                    {}};
    const auto& executors = scheduler_.executors();
    for (std::size_t i = 0; i < executors.size(); ++i) {
      const std::string device = executors[i]->device().label();
      prometheus::ClientMetric m;
      m.label = {{"device", device}, {"stream", std::to_string(executors[i]->device().stream)}};
      m.gauge.value = static_cast<double>(scheduler_.load(i));
      load.metric.push_back(m);
      if (executors[i]->target().backend == Backend::kCuda) {
        m.gauge.value = static_cast<double>(executors[i]->memory_in_use());
        memory.metric.push_back(m);
      }
    }
    return {load, memory};
  }

 private:
  const Scheduler& scheduler_;
};

}  // namespace

struct Metrics::Impl {
  std::unique_ptr<prometheus::Exposer> exposer;
  std::shared_ptr<prometheus::Registry> registry = std::make_shared<prometheus::Registry>();
  std::shared_ptr<DeviceCollector> devices;
  prometheus::Family<prometheus::Counter>& requests =
      prometheus::BuildCounter()
          .Name("attnd_requests_total")
          .Help("finished calls by op, variant and gRPC status code")
          .Register(*registry);
  prometheus::Family<prometheus::Counter>& bytes =
      prometheus::BuildCounter()
          .Name("attnd_payload_bytes_total")
          .Help("request (in) and response (out) message bytes by op")
          .Register(*registry);
  prometheus::Family<prometheus::Histogram>& latency =
      prometheus::BuildHistogram()
          .Name("attnd_latency_seconds")
          .Help("time per call by op and phase: queue, copy (host<->device), kernel, total")
          .Register(*registry);
  prometheus::Family<prometheus::Counter>& merged =
      prometheus::BuildCounter()
          .Name("attnd_merged_launches_total")
          .Help("kernel launches that served several calls together (dynamic batching), by op")
          .Register(*registry);
  prometheus::Family<prometheus::Histogram>& merged_calls =
      prometheus::BuildHistogram()
          .Name("attnd_merged_launch_calls")
          .Help("calls served by one merged launch, by op")
          .Register(*registry);
  prometheus::Family<prometheus::Counter>& declared =
      prometheus::BuildCounter()
          .Name("attnd_request_size_declared_total")
          .Help(
              "authenticated calls by op and whether their client declared the request's size "
              "(attn-request-bytes): undeclared ones hold room for the largest request while they "
              "arrive")
          .Register(*registry);
  prometheus::Family<prometheus::Counter>& replays =
      prometheus::BuildCounter()
          .Name("attnd_kv_replays_total")
          .Help(
              "Decode/Prefill calls answered as repeats of the call applied before them "
              "(expected_lengths), by op: nothing appended")
          .Register(*registry);
  prometheus::Family<prometheus::Counter>& shared_memory =
      prometheus::BuildCounter()
          .Name("attnd_shared_memory_bytes_total")
          .Help("bytes read from (in) and written to (out) clients' shared-memory regions, by op")
          .Register(*registry);
};

Metrics::Metrics(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Metrics::~Metrics() = default;

Result<std::unique_ptr<Metrics>> Metrics::start(const std::string& listen,
                                                const Scheduler& scheduler) {
  auto impl = std::make_unique<Impl>();
  static std::string last_error;
  try {
    CivetCallbacks callbacks{};
    callbacks.log_message = [](const mg_connection*, const char* message) {
      last_error = message;
      return 1;
    };
    impl->exposer = std::make_unique<prometheus::Exposer>(listen, 2, &callbacks);
  } catch (const std::exception& e) {
    return unavailable("--metrics-listen: cannot serve metrics on " + listen + ": " + e.what() +
                       " " + last_error);
  }
  impl->devices = std::make_shared<DeviceCollector>(scheduler);
  impl->exposer->RegisterCollectable(impl->registry);
  impl->exposer->RegisterCollectable(impl->devices);
  return std::unique_ptr<Metrics>(new Metrics(std::move(impl)));
}

int Metrics::port() const {
  const auto ports = impl_->exposer->GetListeningPorts();
  return ports.empty() ? 0 : ports.front();
}

void Metrics::record(const std::string& op, const std::string& variant, grpc::StatusCode code,
                     const v1::Timings* timings, std::size_t bytes_in, std::size_t bytes_out) {
  impl_->requests
      .Add({{"op", op},
            {"variant", variant.empty() ? "none" : variant},
            {"code", status_code_name(static_cast<int>(code))}})
      .Increment();
  impl_->bytes.Add({{"op", op}, {"direction", "in"}}).Increment(static_cast<double>(bytes_in));
  impl_->bytes.Add({{"op", op}, {"direction", "out"}}).Increment(static_cast<double>(bytes_out));
  if (!timings) return;
  const auto observe = [&](const char* phase, std::int64_t ns) {
    impl_->latency.Add({{"op", op}, {"phase", phase}}, latency_buckets())
        .Observe(static_cast<double>(ns) * 1e-9);
  };
  observe("queue", timings->queue_ns());
  observe("copy", timings->h2d_ns() + timings->d2h_ns());
  observe("kernel", timings->kernel_ns());
  observe("total", timings->total_ns());
}

void Metrics::record_request_size(const std::string& op, bool declared) {
  impl_->declared.Add({{"op", op}, {"declared", declared ? "yes" : "no"}}).Increment();
}

void Metrics::record_shared_memory(const std::string& op, std::size_t bytes_in,
                                   std::size_t bytes_out) {
  if (bytes_in)
    impl_->shared_memory.Add({{"op", op}, {"direction", "in"}})
        .Increment(static_cast<double>(bytes_in));
  if (bytes_out)
    impl_->shared_memory.Add({{"op", op}, {"direction", "out"}})
        .Increment(static_cast<double>(bytes_out));
}

void Metrics::record_replay(const std::string& op) { impl_->replays.Add({{"op", op}}).Increment(); }

void Metrics::record_batch(const std::string& op, std::size_t calls) {
  impl_->merged.Add({{"op", op}}).Increment();
  impl_->merged_calls.Add({{"op", op}}, Histogram::BucketBoundaries{2, 4, 8, 16, 32, 64, 128})
      .Observe(static_cast<double>(calls));
}

}  // namespace attn::server
