// `attn info`, `attn health`, `attn kernels`: what the server is, whether it serves, what it runs.
#include <cstdio>
#include <iostream>
#include <memory>
#include <string_view>

#include "attn/wire.h"
#include "commands.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "output.h"

namespace attn::cli {
namespace {

int run_info(const Session& session) {
  auto r = session.client.server_info();
  if (!r.ok()) return call_failed(r.status());
  if (session.flags.json) return print_json(*r);
  std::printf("attnd %s, %s backend\n", r->version().c_str(), r->backend().c_str());
  for (const auto& d : r->devices())
    std::printf("  device %s: %.1f GiB, %d %s%s%s\n", d.name().c_str(),
                d.memory_bytes() / 1073741824.0, d.multiprocessors(),
                d.backend() == "cuda" ? "SMs" : "threads",
                d.compute_capability().empty() ? "" : ", sm_", d.compute_capability().c_str());
  std::printf("  limits: max message %lld MiB, max %lld elements per tensor, queue depth %d\n",
              static_cast<long long>(r->limits().max_message_bytes() >> 20),
              static_cast<long long>(r->limits().max_elements()), r->limits().queue_depth());
  return 0;
}

// The standard grpc.health.v1 check, so that it says what a load balancer or Kubernetes sees.
int run_health(const std::string& service, const Session& session) {
  Client& client = session.client;
  if (!client.channel_status().ok()) return fail(client.channel_status());
  auto stub = grpc::health::v1::Health::NewStub(client.channel());
  grpc::health::v1::HealthCheckRequest req;
  req.set_service(service);
  grpc::health::v1::HealthCheckResponse resp;
  auto ctx = client.make_context();
  const grpc::Status s = stub->Check(ctx.get(), req, &resp);
  if (!s.ok()) return std::cerr << "attn: health: " << s.error_message() << "\n", 1;
  std::cout << grpc::health::v1::HealthCheckResponse::ServingStatus_Name(resp.status()) << "\n";
  return resp.status() == grpc::health::v1::HealthCheckResponse::SERVING ? 0 : 1;
}

// "float32,bfloat16": a kernel's dtypes by name.
std::string dtype_names(const v1::KernelInfo& k) {
  std::string dtypes;
  for (int d : k.dtypes()) {
    auto t = wire::from_proto(static_cast<v1::DType>(d));
    if (!dtypes.empty()) dtypes += ',';
    dtypes += t ? dtype_name(*t) : std::string_view("?");
  }
  return dtypes;
}

int run_kernels(const std::string& op, const Session& session) {
  auto r = session.client.list_kernels(op);
  if (!r.ok()) return call_failed(r.status());
  if (session.flags.json) return print_json(*r);
  for (const auto& k : r->kernels())
    std::printf("%-28s %-5s %-9s %-26s %s\n", k.name().c_str(), k.backend().c_str(),
                k.available() ? "available" : "-", dtype_names(k).c_str(), k.limits().c_str());
  return 0;
}

}  // namespace

Subcommand add_info(CLI::App& app) {
  auto* cmd = app.add_subcommand("info", "server version, backend, devices and limits");
  return {cmd, run_info};
}

Subcommand add_health(CLI::App& app) {
  auto service = std::make_shared<std::string>();
  auto* cmd = app.add_subcommand("health", "the standard health check; exit 0 when SERVING");
  cmd->add_option("--service", *service, "service name (default: the whole server)");
  return {cmd, [service](const Session& session) { return run_health(*service, session); }};
}

Subcommand add_kernels(CLI::App& app) {
  auto op = std::make_shared<std::string>();
  auto* cmd = app.add_subcommand("kernels", "every op's variants and whether they can run here");
  cmd->add_option("--op", *op, "matmul, softmax or attention");
  return {cmd, [op](const Session& session) { return run_kernels(*op, session); }};
}

}  // namespace attn::cli
