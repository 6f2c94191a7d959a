#include "attn_service.h"

#include <spdlog/spdlog.h>

#include "attn/version.h"

namespace attn::server {
namespace {

using Clock = std::chrono::steady_clock;

std::int64_t ns_since(Clock::time_point t) {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - t).count();
}

void finish_failed(grpc::ServerUnaryReactor* reactor, grpc::CallbackServerContext* ctx,
                   const char* rpc, const Status& status) {
  spdlog::warn("{} from {} failed: {}", rpc, ctx->peer(), status.to_string());
  reactor->Finish(wire::to_grpc(status));
}

OpCost cost_of(const MatmulArgs& a) { return matmul_cost(a); }
OpCost cost_of(const SoftmaxArgs& a) { return softmax_cost(a); }
OpCost cost_of(const AttentionArgs& a) { return attention_cost(a); }

}  // namespace

AttnService::AttnService(Scheduler& scheduler, const Registry& registry, ServiceConfig config)
    : scheduler_(scheduler), registry_(registry), config_(config) {
  decode_.registry = &registry_;
  for (const auto& ex : scheduler_.executors()) {
    const Target t = ex->target();
    bool seen = false;
    for (const Target& known : decode_.targets) seen |= known.backend == t.backend;
    if (!seen) decode_.targets.push_back(t);
  }
  decode_.limits = config_.limits;
}

template <class Args, class Response>
grpc::ServerUnaryReactor* AttnService::run(grpc::CallbackServerContext* ctx, const char* rpc,
                                           Clock::time_point start,
                                           Result<PreparedOp<Args>> prepared, Response* resp,
                                           bool return_values, std::vector<v1::Tensor*> outputs) {
  auto* reactor = ctx->DefaultReactor();
  if (!prepared.ok()) {
    finish_failed(reactor, ctx, rpc, prepared.status());
    return reactor;
  }
  auto op = std::make_shared<PreparedOp<Args>>(std::move(prepared).value());
  const std::int64_t decode_ns = ns_since(start);
  Status queued = scheduler_.submit(op->variant->info.backend, [=, this](Executor& executor, std::int64_t queue_ns) {
    if (ctx->IsCancelled()) {
      reactor->Finish(grpc::Status::CANCELLED);
      return;
    }
    if (ctx->deadline() < std::chrono::system_clock::now()) {
      spdlog::warn("{} from {} dropped: its deadline passed in the queue", rpc, ctx->peer());
      reactor->Finish({grpc::StatusCode::DEADLINE_EXCEEDED,
                       "the call's deadline passed while it waited in the queue (" +
                           std::to_string(queue_ns / 1000) + " us)"});
      return;
    }
    ExecTimings t;
    const OpCall call = make_call(*op->variant, op->args);
    Status status = executor.execute(call, t);
    if (!status.ok()) {
      if (executor.poisoned() && config_.on_device_fault) {
        spdlog::critical("device {} faulted running {}: {}; it cannot serve again until the server "
                         "restarts", executor.device().label(), op->variant->info.name, status.to_string());
        config_.on_device_fault(status.message());
      }
      finish_failed(reactor, ctx, rpc, status);
      return;
    }
    if (return_values)
      for (v1::Tensor* out : outputs) wire::convert_to_values(out);
    const OpCost cost = cost_of(op->args);
    v1::Timings* timings = resp->mutable_timings();
    timings->set_kernel(op->variant->info.name);
    timings->set_device(executor.device().label());
    timings->set_queue_ns(queue_ns);
    timings->set_h2d_ns(t.h2d_ns);
    timings->set_kernel_ns(t.kernel_ns);
    timings->set_d2h_ns(t.d2h_ns);
    timings->set_flops(cost.flops);
    timings->set_bytes(cost.bytes);
    timings->set_total_ns(ns_since(start));
    spdlog::debug("{} {} on {}: decode {} us, queue {} us, kernel {} us, total {} us", rpc,
                  op->variant->info.name, timings->device(), decode_ns / 1000, queue_ns / 1000,
                  t.kernel_ns / 1000, timings->total_ns() / 1000);
    reactor->Finish(grpc::Status::OK);
  });
  if (!queued.ok()) finish_failed(reactor, ctx, rpc, queued);
  return reactor;
}

grpc::ServerUnaryReactor* AttnService::Matmul(grpc::CallbackServerContext* ctx,
                                              const v1::MatmulRequest* req,
                                              v1::MatmulResponse* resp) {
  const auto start = Clock::now();
  return run(ctx, "Matmul", start, decode_matmul(*req, resp, decode_), resp, req->return_values(),
             {resp->mutable_c()});
}

grpc::ServerUnaryReactor* AttnService::Softmax(grpc::CallbackServerContext* ctx,
                                               const v1::SoftmaxRequest* req,
                                               v1::SoftmaxResponse* resp) {
  const auto start = Clock::now();
  return run(ctx, "Softmax", start, decode_softmax(*req, resp, decode_), resp, req->return_values(),
             {resp->mutable_y()});
}

grpc::ServerUnaryReactor* AttnService::Attention(grpc::CallbackServerContext* ctx,
                                                 const v1::AttentionRequest* req,
                                                 v1::AttentionResponse* resp) {
  const auto start = Clock::now();
  std::vector<v1::Tensor*> outputs{resp->mutable_o()};
  if (req->return_lse()) outputs.push_back(resp->mutable_lse());
  return run(ctx, "Attention", start, decode_attention(*req, resp, decode_), resp,
             req->return_values(), outputs);
}

grpc::ServerUnaryReactor* AttnService::ListKernels(grpc::CallbackServerContext* ctx,
                                                   const v1::ListKernelsRequest* req,
                                                   v1::ListKernelsResponse* resp) {
  auto* reactor = ctx->DefaultReactor();
  const std::string& op = req->op();
  if (!op.empty() && op != "matmul" && op != "softmax" && op != "attention") {
    finish_failed(reactor, ctx, "ListKernels",
                  invalid_argument("op: expected \"matmul\", \"softmax\", \"attention\" or empty, got \"" +
                                   op + "\""));
    return reactor;
  }
  for (const VariantInfo* info : registry_.all()) {
    if (!op.empty() && op != op_name(info->op)) continue;
    v1::KernelInfo* k = resp->add_kernels();
    k->set_name(info->name);
    k->set_op(op_name(info->op));
    k->set_backend(backend_name(info->backend));
    for (DType t : info->dtypes) k->add_dtypes(wire::to_proto(t));
    k->set_limits(info->limits);
    k->set_description(info->description);
    k->set_available(available(*info, decode_));
  }
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

grpc::ServerUnaryReactor* AttnService::GetServerInfo(grpc::CallbackServerContext* ctx,
                                                     const v1::GetServerInfoRequest*,
                                                     v1::GetServerInfoResponse* resp) {
  auto* reactor = ctx->DefaultReactor();
  resp->set_version(kVersion);
  resp->set_backend(backend_name(decode_.targets.front().backend));
  for (const auto& ex : scheduler_.executors()) {
    const DeviceInfo& d = ex->device();
    v1::DeviceInfo* out = resp->add_devices();
    out->set_name(d.name);
    out->set_backend(backend_name(d.backend));
    out->set_memory_bytes(d.memory_bytes);
    out->set_multiprocessors(d.multiprocessors);
    if (d.backend == Backend::kCuda)
      out->set_compute_capability(std::to_string(d.cc_major) + "." + std::to_string(d.cc_minor));
  }
  v1::ServerLimits* limits = resp->mutable_limits();
  limits->set_max_message_bytes(config_.max_message_bytes);
  limits->set_max_elements(config_.limits.max_elements);
  limits->set_queue_depth(static_cast<int>(scheduler_.queue_depth()));
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

}  // namespace attn::server
