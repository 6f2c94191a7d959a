// The one-shot ops (Matmul, Softmax, Attention) and the server's self-description (ListKernels,
// GetServerInfo).
#include "handlers/op_handlers.h"

#include <spdlog/spdlog.h>

#include <array>
#include <cstdio>
#include <cstring>

#include "attn/version.h"
#include "handlers/handler_support.h"
#include "handlers/merged_launch.h"

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

// How calls of one op waiting together share a launch (dynamic batching, merged_launch.h): the
// key of calls that can, the tensors that stack and the union's finishing touches. Ops without a
// specialization never merge.
template <class A>
struct Merging {
  using Args = A;
  static constexpr int kAxis = 0;
  static constexpr std::array<TensorView Args::*, 0> kInputs{}, kOutputs{};
  struct Union {};
  static std::string key(const PreparedOp<Args>&, bool) { return ""; }
  static TensorView rows(const TensorView& v) { return v; }
  template <class Call>
  static Result<const Variant<Args>*> unite(const std::vector<Call*>&, Args&, Union&,
                                            const Registry&, const Target&) {
    return failed_precondition(std::string(OpDesc<Args>::kName) + " calls do not merge");
  }
};

// Softmax calls of one dtype, row width and variant: their rows, whatever their leading
// dimensions, stack into one [rows, cols] launch.
template <>
struct Merging<SoftmaxArgs> {
  using Args = SoftmaxArgs;
  static constexpr int kAxis = 0;
  static constexpr std::array kInputs{&SoftmaxArgs::x};
  static constexpr std::array kOutputs{&SoftmaxArgs::y};
  struct Union {};

  static std::string key(const PreparedOp<SoftmaxArgs>& op, bool) {
    // Inline inputs and outputs only: a resident input pins the call to its device's memory.
    if (!op.resident.empty() || !op.kept.empty()) return "";
    // A large input fills the device alone; merged, its rows and results would be copied into
    // and out of the batch's tensors, twice its bytes more (a 4 x 500 MB burst peaked 1 GB higher).
    if (op.args.x.bytes() > kMaxMergedBytes) return "";
    return "softmax " + op.variant->info.name + " " + std::string(dtype_name(op.args.x.dtype)) +
           " " + std::to_string(op.args.x.dim(-1));
  }
  static TensorView rows(TensorView v) {
    const std::int64_t cols = v.dim(-1);
    v.shape = {cols == 0 ? 0 : v.numel() / cols, cols};
    return v;
  }
  template <class Call>
  static Result<const Variant<Args>*> unite(const std::vector<Call*>& calls, Args&, Union&,
                                            const Registry&, const Target&) {
    return calls.front()->op->variant;
  }
};

// Attention calls of one query row per (batch, head) against the same resident K and V (sampling
// several continuations of one context): the rows stack along Sq, a query seeing every key.
template <>
struct Merging<AttentionArgs> {
  using Args = AttentionArgs;
  static constexpr int kAxis = 2;  // [B, H, Sq, D]
  static constexpr std::array kInputs{&AttentionArgs::q};
  static constexpr std::array kOutputs{&AttentionArgs::o, &AttentionArgs::lse};
  struct Union {};

  static std::string key(const PreparedOp<AttentionArgs>& op, bool named) {
    // A left window would move with the stacked row's position, so such calls stay alone; a
    // right window is no limit for a single row (it sits at the last key).
    const AttentionArgs& a = op.args;
    if (named || op.resident.size() != 2 || !op.kept.empty() || a.q.dim(2) != 1 ||
        a.q.memory != MemoryKind::kHost || a.window_left >= 0 ||
        (!a.sinks.empty() && a.sinks.memory != MemoryKind::kHost)) {
      return "";
    }
    char key[256];
    std::snprintf(key, sizeof key, "attention %p %p %s %lld %lld %lld %a %d %a", a.k.data, a.v.data,
                  std::string(dtype_name(a.q.dtype)).c_str(), static_cast<long long>(a.q.dim(0)),
                  static_cast<long long>(a.q.dim(1)), static_cast<long long>(a.q.dim(3)),
                  static_cast<double>(a.scale), a.lse.empty() ? 0 : 1,
                  static_cast<double>(a.softcap));
    return key + sinks_key(a.sinks);  // the union runs with the first call's sinks
  }
  static TensorView rows(const TensorView& v) { return v; }
  // The variant that takes the union here (another than the calls' own, perhaps).
  template <class Call>
  static Result<const Variant<Args>*> unite(const std::vector<Call*>&, Args& all, Union&,
                                            const Registry& registry, const Target& target) {
    all.causal = false;     // with one query row, causal or not, every key is seen
    all.window_right = -1;  // likewise for a right window (a left one never merges)
    return registry.of<AttentionArgs>().select(all, "", target);
  }
};

// One call of a one-shot op, from its parsed arguments to its response; a BatchMember, so that
// calls waiting together may share a launch (Merging<Args>).
template <class Request, class Response>
class OneShotCall final : public BatchMember {
 public:
  using Args = typename RpcOp<Request>::Args;
  const ServiceCore* core = nullptr;
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

  void fail(const Status& s) { core->finish(*call, reactor, variant().name, s, nullptr, 0); }

  void run_alone(Executor& executor, std::int64_t queue_ns) {
    ExecTimings t;
    const Status status = executor.execute(make_call(*op->variant, op->args), t);
    if (!status.ok()) {
      core->device_faulted(executor, variant().name, status);
      return fail(status);
    }
    succeed(executor, t, queue_ns, 1);
  }

  void run_together(Executor& executor, const std::vector<Merged>& members) override {
    std::vector<OneShotCall*> calls;
    std::vector<std::int64_t> waits;
    for (const Merged& m : members) {
      calls.push_back(static_cast<OneShotCall*>(m.member));
      waits.push_back(m.queue_ns);
    }
    run_merged<Merging<Args>>(*core, executor, calls, waits);
  }
  // Its part in a merged launch (merged_launch.h).
  const Args& launch_args() const { return op->args; }
  void undo_together() {}  // it changed nothing
  void ran_together(Executor& executor, const ExecTimings& t, std::int64_t queue_ns, int batched,
                    const VariantInfo& ran) {
    succeed(executor, t, queue_ns, batched, &ran);
  }

  // `ran`: the variant that ran, when a merged launch took another than the call's own.
  void succeed(Executor& executor, const ExecTimings& t, std::int64_t queue_ns, int batched,
               const VariantInfo* ran = nullptr) {
    const VariantInfo& v = ran ? *ran : variant();
    std::size_t shm_out = 0;
    if (!op->shm_outputs.empty()) {
      const Status written = write_shm_outputs(*core->config.shm, *op, &shm_out);
      if (!written.ok()) return fail(written);
    }
    if (shm_out && core->config.metrics)
      core->config.metrics->record_shared_memory(name(), 0, shm_out);
    for (const auto& kept : op->kept) core->config.store->publish(kept);
    if (return_values)
      for (v1::Tensor* out : outputs)
        if (!out->has_shm())
          wire::convert_to_values(out);  // kept outputs have no data, shm ones neither
    v1::Timings* timings = resp->mutable_timings();
    fill_timings(timings, v.name, executor, queue_ns, t, cost_of(op->args), batched, call->start);
    spdlog::debug("{} {} on {}: queue {} us, kernel {} us, total {} us", name(), v.name,
                  timings->device(), queue_ns / 1000, t.kernel_ns / 1000,
                  timings->total_ns() / 1000);
    core->finish(*call, reactor, v.name, Status::Ok(), timings, resp->ByteSizeLong());
  }
};

template <class Request, class Response>
grpc::ServerUnaryReactor* OpHandlers::serve(CallContext& ctx, const Request* req, Response* resp) {
  using Rpc = RpcOp<Request>;
  using Args = typename Rpc::Args;
  const char* op = ctx.op();
  auto call = std::make_shared<OneShotCall<Request, Response>>();
  auto* reactor = ctx.grpc->DefaultReactor();
  auto prepared = Rpc::parse(*req, resp, core_.requests, ctx);
  if (!prepared.ok()) {
    core_.finish(ctx, reactor, "", prepared.status(), nullptr, 0);
    return reactor;
  }
  if (core_.config.metrics && !prepared->shm_buffers.empty())
    core_.config.metrics->record_shared_memory(op, prepared->shm_bytes_in(), 0);
  call->core = &core_;
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
    placement.device = core_.scheduler.device_of(static_cast<std::size_t>(call->op->executor));
  // A tiny op on the CPU runs on this thread when the CPU is idle: handing it to the worker
  // (a queue push and a wake-up, ~20 us) would cost more than the op itself.
  placement.inline_when_idle = variant->backend == Backend::kCpu && tiny(cost_of(call->op->args));
  resp->mutable_timings()->set_receive_ns(ctx.receive_ns());
  resp->mutable_timings()->set_parse_ns(ctx.parse_ns());
  core_.submit(
      ctx, reactor, variant->name, placement,
      [call](Executor& executor, std::int64_t queue_ns) { call->run_alone(executor, queue_ns); },
      call->key.empty() ? nullptr : call);
  return reactor;
}

grpc::ServerUnaryReactor* OpHandlers::inject_fault(CallContext& call) {
  auto* reactor = call.grpc->DefaultReactor();
  Placement placement;
  placement.backend = core_.serving_backend();
  core_.submit(
      call, reactor, kFaultInjectionKernel, placement,
      [=, this, &call](Executor& executor, std::int64_t) {
        spdlog::warn("fault injection: making {} fault on purpose", executor.device().label());
        const Status status = executor.inject_fault();
        core_.device_faulted(executor, kFaultInjectionKernel, status);
        core_.finish(
            call, reactor, kFaultInjectionKernel,
            status.ok() ? internal_error("fault injection: the device did not fault") : status,
            nullptr, 0);
      });
  return reactor;
}

grpc::ServerUnaryReactor* OpHandlers::Matmul(CallContext& call, const v1::MatmulRequest* req,
                                             v1::MatmulResponse* resp) {
  return serve(call, req, resp);
}

grpc::ServerUnaryReactor* OpHandlers::Softmax(CallContext& call, const v1::SoftmaxRequest* req,
                                              v1::SoftmaxResponse* resp) {
  if (core_.config.fault_injection && req->kernel() == kFaultInjectionKernel) {
    return inject_fault(call);
  }
  return serve(call, req, resp);
}

grpc::ServerUnaryReactor* OpHandlers::Attention(CallContext& call, const v1::AttentionRequest* req,
                                                v1::AttentionResponse* resp) {
  return serve(call, req, resp);
}

grpc::ServerUnaryReactor* OpHandlers::ListKernels(CallContext& call,
                                                  const v1::ListKernelsRequest* req,
                                                  v1::ListKernelsResponse* resp) {
  auto* reactor = call.grpc->DefaultReactor();
  const std::string& op = req->op();
  const std::vector<std::string> ops = ops_of(core_.registry);
  if (!op.empty() && std::find(ops.begin(), ops.end(), op) == ops.end()) {
    std::string names;
    for (const std::string& o : ops) names += (names.empty() ? "\"" : ", \"") + o + "\"";
    core_.finish(call, reactor, "",
                 invalid_argument("op: expected " + names + " or empty, got \"" + op + "\""),
                 nullptr, 0);
    return reactor;
  }
  for (const VariantInfo* info : core_.registry.all()) {
    if (!op.empty() && op != op_name(info->op)) continue;
    v1::KernelInfo* k = resp->add_kernels();
    k->set_name(info->name);
    k->set_op(op_name(info->op));
    k->set_backend(backend_name(info->backend));
    for (DType t : info->dtypes) k->add_dtypes(wire::to_proto(t));
    k->set_limits(info->limits);
    k->set_description(info->description);
    k->set_available(available(*info, core_.requests));
  }
  core_.finish(call, reactor, "", Status::Ok(), nullptr, resp->ByteSizeLong());
  return reactor;
}

grpc::ServerUnaryReactor* OpHandlers::GetServerInfo(CallContext& call,
                                                    const v1::GetServerInfoRequest*,
                                                    v1::GetServerInfoResponse* resp) {
  auto* reactor = call.grpc->DefaultReactor();
  resp->set_version(kVersion);
  resp->set_backend(backend_name(core_.serving_backend()));
  for (const auto& ex : core_.scheduler.executors()) {
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
  limits->set_max_message_bytes(core_.config.max_message_bytes);
  limits->set_max_elements(core_.config.limits.max_elements);
  limits->set_queue_depth(static_cast<int>(core_.scheduler.queue_depth()));
  core_.finish(call, reactor, "", Status::Ok(), nullptr, resp->ByteSizeLong());
  return reactor;
}

}  // namespace attn::server
