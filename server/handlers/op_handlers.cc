// The one-shot ops (Matmul, Softmax, Attention) and the server's self-description (ListKernels,
// GetServerInfo).
#include <spdlog/spdlog.h>

#include <cstdio>
#include <cstring>

#include "attn/version.h"
#include "handlers/attn_service.h"
#include "handlers/handler_support.h"

namespace attn::server {
namespace {

using Clock = std::chrono::steady_clock;

// Softmax inputs up to this size may share a launch.
constexpr std::size_t kMaxMergedBytes = std::size_t{16} << 20;

// Every op some variant of `registry` serves, in the library's order, for ListKernels.
std::vector<std::string> ops_of(const Registry& registry) {
  std::vector<std::string> ops;
  for (const VariantInfo* info : registry.all())
    if (std::find(ops.begin(), ops.end(), op_name(info->op)) == ops.end())
      ops.emplace_back(op_name(info->op));
  return ops;
}

}  // namespace

// How calls of one op waiting together share a launch (dynamic batching): the key of calls that
// can, and the merged run. Ops without a specialization never merge.
template <class Args>
struct Merging {
  static std::string key(const PreparedOp<Args>&, bool) { return ""; }
  // No key, no company: only ever called with merged members of a key.
  template <class Call>
  static void run(Executor& executor, const std::vector<Call*>& calls,
                  const std::vector<BatchMember::Merged>& members) {
    for (std::size_t i = 0; i < calls.size(); ++i)
      calls[i]->run_alone(executor, members[i].queue_ns);
  }
};

// Softmax calls of one dtype, row width and variant: their rows run as one launch (a row's result
// does not depend on the other rows, so each caller gets what it would have alone).
template <>
struct Merging<SoftmaxArgs> {
  static std::string key(const PreparedOp<SoftmaxArgs>& op, bool) {
    // Inline inputs and outputs only: a resident input pins the call to its device's memory.
    if (!op.resident.empty() || !op.kept.empty()) return "";
    // A large input fills the device alone; merged, its rows and results would be copied into
    // and out of the batch's tensors, twice its bytes more (a 4 x 500 MB burst peaked 1 GB higher).
    if (op.args.x.bytes() > kMaxMergedBytes) return "";
    return "softmax " + op.variant->info.name + " " + std::string(dtype_name(op.args.x.dtype)) +
           " " + std::to_string(op.args.x.dim(-1));
  }

  template <class Call>
  static void run(Executor& executor, const std::vector<Call*>& calls,
                  const std::vector<BatchMember::Merged>& members) {
    const auto& op = calls.front()->op;
    auto* service = calls.front()->service;
    std::int64_t rows = 0;
    const std::int64_t cols = op->args.x.dim(-1);
    for (Call* c : calls) rows += c->op->args.x.numel() / cols;
    const DType dt = op->args.x.dtype;
    Tensor x(dt, {rows, cols}), y(dt, {rows, cols});
    std::size_t at = 0;
    for (Call* c : calls) {
      std::memcpy(static_cast<char*>(x.data()) + at, c->op->args.x.data, c->op->args.x.bytes());
      at += c->op->args.x.bytes();
    }
    SoftmaxArgs all{x.view(), y.view()};
    ExecTimings t;
    const Status status = executor.execute(make_call(*op->variant, all), t);
    if (!status.ok()) {
      service->device_faulted(executor, op->variant->info.name, status);
      for (Call* c : calls) c->fail(status);
      return;
    }
    if (service->config_.metrics)
      service->config_.metrics->record_batch(OpDesc<SoftmaxArgs>::kName, calls.size());
    at = 0;
    for (std::size_t i = 0; i < calls.size(); ++i) {
      Call& c = *calls[i];
      std::memcpy(c.op->args.y.data, static_cast<const char*>(y.data()) + at, c.op->args.y.bytes());
      at += c.op->args.y.bytes();
      c.succeed(executor, t, members[i].queue_ns, static_cast<int>(calls.size()));
    }
  }
};

// Attention calls of one query row against the same resident K and V.
template <>
struct Merging<AttentionArgs> {
  static std::string key(const PreparedOp<AttentionArgs>& op, bool named) {
    // One query row per (batch, head) against the same resident K and V (sampling several
    // continuations of one context): the rows stack along Sq, a query seeing every key. A left
    // window would move with the stacked row's position, so such calls stay alone; a right
    // window is no limit for a single row (it sits at the last key).
    const AttentionArgs& a = op.args;
    if (named || op.resident.size() != 2 || !op.kept.empty() || a.q.dim(2) != 1 ||
        a.q.memory != MemoryKind::kHost || a.window_left >= 0) {
      return "";
    }
    char key[256];
    std::snprintf(key, sizeof key, "attention %p %p %s %lld %lld %lld %a %d %a", a.k.data, a.v.data,
                  std::string(dtype_name(a.q.dtype)).c_str(), static_cast<long long>(a.q.dim(0)),
                  static_cast<long long>(a.q.dim(1)), static_cast<long long>(a.q.dim(3)),
                  static_cast<double>(a.scale), a.lse.empty() ? 0 : 1,
                  static_cast<double>(a.softcap));
    return key;
  }

  template <class Call>
  static void run(Executor& executor, const std::vector<Call*>& calls,
                  const std::vector<BatchMember::Merged>& members) {
    const auto& op = calls.front()->op;
    auto* service = calls.front()->service;
    const AttentionArgs& a = op->args;
    const std::int64_t b = a.q.dim(0), hq = a.q.dim(1), d = a.q.dim(3),
                       n = static_cast<std::int64_t>(calls.size());
    const std::size_t row = static_cast<std::size_t>(d) * element_size(a.q.dtype);
    Tensor q(a.q.dtype, {b, hq, n, d}), o(a.q.dtype, {b, hq, n, d});
    Tensor lse = a.lse.empty() ? Tensor() : Tensor(DType::kFloat32, {b, hq, n});
    // q_all[bh, i] = q_i[bh, 0]: call i's row of every (batch, head) at position i.
    for (std::int64_t i = 0; i < n; ++i)
      for (std::int64_t bh = 0; bh < b * hq; ++bh)
        std::memcpy(static_cast<char*>(q.data()) + static_cast<std::size_t>(bh * n + i) * row,
                    static_cast<const char*>(calls[static_cast<std::size_t>(i)]->op->args.q.data) +
                        static_cast<std::size_t>(bh) * row,
                    row);
    AttentionArgs all = a;
    all.q = q.view();
    all.o = o.view();
    all.lse = a.lse.empty() ? TensorView{} : lse.view();
    all.causal = false;     // with one query row, causal or not, every key is seen
    all.window_right = -1;  // likewise for a right window (a left one never merges)
    auto chosen =
        service->registry_.template of<AttentionArgs>().select(all, "", executor.target());
    if (!chosen.ok()) {  // no variant takes the union here: each runs alone
      for (std::size_t i = 0; i < calls.size(); ++i)
        calls[i]->run_alone(executor, members[i].queue_ns);
      return;
    }
    ExecTimings t;
    const Status status = executor.execute(make_call(**chosen, all), t);
    if (!status.ok()) {
      service->device_faulted(executor, (*chosen)->info.name, status);
      for (Call* c : calls) c->fail(status);
      return;
    }
    if (service->config_.metrics)
      service->config_.metrics->record_batch(OpDesc<AttentionArgs>::kName, calls.size());
    for (std::int64_t i = 0; i < n; ++i) {
      Call& c = *calls[static_cast<std::size_t>(i)];
      for (std::int64_t bh = 0; bh < b * hq; ++bh) {
        std::memcpy(static_cast<char*>(c.op->args.o.data) + static_cast<std::size_t>(bh) * row,
                    static_cast<const char*>(o.data()) + static_cast<std::size_t>(bh * n + i) * row,
                    row);
        if (!a.lse.empty())
          static_cast<float*>(c.op->args.lse.data)[bh] =
              static_cast<const float*>(lse.data())[bh * n + i];
      }
      c.succeed(executor, t, members[static_cast<std::size_t>(i)].queue_ns, static_cast<int>(n),
                &(*chosen)->info);
    }
  }
};

// One call of a one-shot op, from its parsed arguments to its response; a BatchMember, so that
// calls waiting together may share a launch (Merging<Args>).
template <class Request, class Response>
class OneShotCall final : public BatchMember {
 public:
  using Args = typename RpcOp<Request>::Args;
  AttnService* service = nullptr;
  const CallContext* call = nullptr;  // the gate's, alive until the call finishes
  grpc::ServerUnaryReactor* reactor = nullptr;
  Response* resp = nullptr;
  bool return_values = false;
  std::shared_ptr<PreparedOp<Args>> op;
  std::vector<v1::Tensor*> outputs;
  std::string key;

  const char* name() const { return OpDesc<Args>::kName; }
  const VariantInfo& variant() const { return op->variant->info; }
  const std::string& batch_key() const override { return key; }
  bool joins(const std::vector<const BatchMember*>&) const override { return true; }

  // The key of calls that can share a launch (Merging<Args>), or empty. `named`: the caller named
  // its variant.
  static std::string key_of(const PreparedOp<Args>& op, bool named) {
    return Merging<Args>::key(op, named);
  }

  void fail(const Status& s) { service->finish(*call, reactor, variant().name, s, nullptr, 0); }

  void run_alone(Executor& executor, std::int64_t queue_ns) {
    ExecTimings t;
    const Status status = executor.execute(make_call(*op->variant, op->args), t);
    if (!status.ok()) {
      service->device_faulted(executor, variant().name, status);
      return fail(status);
    }
    succeed(executor, t, queue_ns, 1);
  }

  void run_together(Executor& executor, const std::vector<Merged>& members) override {
    std::vector<OneShotCall*> calls;
    for (const Merged& m : members) calls.push_back(static_cast<OneShotCall*>(m.member));
    Merging<Args>::run(executor, calls, members);
  }

  // `ran`: the variant that ran, when a merged launch took another than the call's own.
  void succeed(Executor& executor, const ExecTimings& t, std::int64_t queue_ns, int batched,
               const VariantInfo* ran = nullptr) {
    const VariantInfo& v = ran ? *ran : variant();
    std::size_t shm_out = 0;
    for (const auto& o : op->shm_outputs) {
      const Status written = service->config_.shm->write(o.slice, o.data, o.field);
      if (!written.ok()) return fail(written);
      shm_out += static_cast<std::size_t>(o.slice.bytes);
    }
    if (shm_out && service->config_.metrics)
      service->config_.metrics->record_shared_memory(name(), 0, shm_out);
    for (const auto& kept : op->kept) service->config_.store->publish(kept);
    if (return_values)
      for (v1::Tensor* out : outputs)
        if (!out->has_shm())
          wire::convert_to_values(out);  // kept outputs have no data, shm ones neither
    v1::Timings* timings = resp->mutable_timings();
    fill_timings(timings, v.name, executor, queue_ns, t, cost_of(op->args), batched, call->start);
    spdlog::debug("{} {} on {}: queue {} us, kernel {} us, total {} us", name(), v.name,
                  timings->device(), queue_ns / 1000, t.kernel_ns / 1000,
                  timings->total_ns() / 1000);
    service->finish(*call, reactor, v.name, Status::Ok(), timings, resp->ByteSizeLong());
  }
};

template <class Request, class Response>
grpc::ServerUnaryReactor* AttnService::serve(CallContext& ctx, const Request* req, Response* resp) {
  using Rpc = RpcOp<Request>;
  using Args = typename Rpc::Args;
  const char* op = ctx.op();
  auto call = std::make_shared<OneShotCall<Request, Response>>();
  auto* reactor = ctx.grpc->DefaultReactor();
  auto prepared = Rpc::parse(*req, resp, requests_, ctx);
  if (!prepared.ok()) {
    finish(ctx, reactor, "", prepared.status(), nullptr, 0);
    return reactor;
  }
  if (config_.metrics && !prepared->shm_buffers.empty())
    config_.metrics->record_shared_memory(op, prepared->shm_bytes_in(), 0);
  call->service = this;
  call->call = &ctx;
  call->reactor = reactor;
  call->resp = resp;
  call->return_values = req->return_values();
  call->op = std::make_shared<PreparedOp<Args>>(std::move(prepared).value());
  call->outputs = Rpc::outputs(*req, resp);
  call->key = call->key_of(*call->op, !req->kernel().empty());
  // The registry outlives every call: the job holds a pointer, not a copy of the variant's info.
  const VariantInfo* variant = &call->variant();
  Placement placement;
  placement.backend = variant->backend;
  // Pinned to the device holding its resident data (any of its streams), else the backend's.
  if (call->op->executor >= 0)
    placement.device = scheduler_.device_of(static_cast<std::size_t>(call->op->executor));
  // A tiny op on the CPU runs on this thread when the CPU is idle: handing it to the worker
  // (a queue push and a wake-up, ~20 us) would cost more than the op itself.
  placement.inline_when_idle = variant->backend == Backend::kCpu && tiny(cost_of(call->op->args));
  submit(
      ctx, reactor, variant->name, placement,
      [call](Executor& executor, std::int64_t queue_ns) { call->run_alone(executor, queue_ns); },
      call->key.empty() ? nullptr : call);
  return reactor;
}

grpc::ServerUnaryReactor* AttnService::inject_fault(CallContext& call) {
  auto* reactor = call.grpc->DefaultReactor();
  Placement placement;
  placement.backend = requests_.targets.front().backend;
  submit(call, reactor, kFaultInjectionKernel, placement,
         [=, this, &call](Executor& executor, std::int64_t) {
           spdlog::warn("fault injection: making {} fault on purpose", executor.device().label());
           const Status status = executor.inject_fault();
           device_faulted(executor, kFaultInjectionKernel, status);
           finish(
               call, reactor, kFaultInjectionKernel,
               status.ok() ? internal_error("fault injection: the device did not fault") : status,
               nullptr, 0);
         });
  return reactor;
}

grpc::ServerUnaryReactor* AttnService::Matmul(CallContext& call, const v1::MatmulRequest* req,
                                              v1::MatmulResponse* resp) {
  return serve(call, req, resp);
}

grpc::ServerUnaryReactor* AttnService::Softmax(CallContext& call, const v1::SoftmaxRequest* req,
                                               v1::SoftmaxResponse* resp) {
  if (config_.fault_injection && req->kernel() == kFaultInjectionKernel) {
    return inject_fault(call);
  }
  return serve(call, req, resp);
}

grpc::ServerUnaryReactor* AttnService::Attention(CallContext& call, const v1::AttentionRequest* req,
                                                 v1::AttentionResponse* resp) {
  return serve(call, req, resp);
}

grpc::ServerUnaryReactor* AttnService::ListKernels(CallContext& call,
                                                   const v1::ListKernelsRequest* req,
                                                   v1::ListKernelsResponse* resp) {
  auto* reactor = call.grpc->DefaultReactor();
  const std::string& op = req->op();
  const std::vector<std::string> ops = ops_of(registry_);
  if (!op.empty() && std::find(ops.begin(), ops.end(), op) == ops.end()) {
    std::string names;
    for (const std::string& o : ops) names += (names.empty() ? "\"" : ", \"") + o + "\"";
    finish(call, reactor, "",
           invalid_argument("op: expected " + names + " or empty, got \"" + op + "\""), nullptr, 0);
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
    k->set_available(available(*info, requests_));
  }
  finish(call, reactor, "", Status::Ok(), nullptr, resp->ByteSizeLong());
  return reactor;
}

grpc::ServerUnaryReactor* AttnService::GetServerInfo(CallContext& call,
                                                     const v1::GetServerInfoRequest*,
                                                     v1::GetServerInfoResponse* resp) {
  auto* reactor = call.grpc->DefaultReactor();
  resp->set_version(kVersion);
  resp->set_backend(backend_name(requests_.targets.front().backend));
  for (const auto& ex : scheduler_.executors()) {
    const DeviceInfo& d = ex->device();
    if (d.stream > 0) continue;  // a GPU's further streams are the same device
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
  finish(call, reactor, "", Status::Ok(), nullptr, resp->ByteSizeLong());
  return reactor;
}

}  // namespace attn::server
