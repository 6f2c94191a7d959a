#include "requests/op_request.h"

#include <algorithm>
#include <cmath>

#include "state/memory_budget.h"

namespace attn::server {
namespace {

Result<wire::DecodedTensor> input(const v1::Tensor& t, bool present, const char* field,
                                  const RequestContext& ctx) {
  if (!present) return invalid_argument(std::string(field) + ": expected a tensor, got none");
  return wire::decode_tensor(t, field, ctx.limits);
}

// An input given by handle, or null: its view replaces `decoded`'s, and the op is pinned to the
// device holding it.
Status resolve_handle(const v1::Tensor& t, const char* field, const RequestContext& ctx,
                      wire::DecodedTensor& decoded, RequestTensors& op) {
  const std::string f(field);
  if (!ctx.store) return failed_precondition(f + ".handle: this server keeps no resident tensors");
  if (!t.data().empty() || t.values_size() > 0) {
    return invalid_argument(f + ": expected a handle or data/values, got both");
  }
  ATTN_ASSIGN_OR_RETURN(r, ctx.store->find(t.handle(), f + ".handle"));
  if (t.dtype() != v1::D_TYPE_UNSPECIFIED && wire::from_proto(t.dtype()) != r->dtype) {
    return invalid_argument(f + ".dtype: the handle holds " + std::string(dtype_name(r->dtype)) +
                            ", the request says " + v1::DType_Name(t.dtype()));
  }
  if (t.shape_size() > 0 && Shape(t.shape().begin(), t.shape().end()) != r->shape) {
    return invalid_argument(f + ".shape: the handle holds " + shape_to_string(r->shape) +
                            ", the request says " +
                            shape_to_string(Shape(t.shape().begin(), t.shape().end())));
  }
  if (op.executor >= 0 && ctx.executor_devices[static_cast<std::size_t>(op.executor)] !=
                              ctx.executor_devices[r->executor]) {
    return failed_precondition(f +
                               ".handle: lives on another device than the op's other resident "
                               "inputs; put them on one device (PutTensor's header.device)");
  }
  op.executor = static_cast<int>(r->executor);
  decoded.view = r->view();
  op.resident.push_back(std::move(r));
  return Status::Ok();
}

std::string off_message(const std::string& field) {
  return field + ": this server serves no shared memory (start it with --shared-memory system)";
}

// Pins the op to an executor of CUDA device `ordinal`: FAILED_PRECONDITION when its other inputs
// already pin it elsewhere.
Status pin_to_cuda(int ordinal, const std::string& field, const RequestContext& ctx,
                   RequestTensors& op) {
  if (op.executor >= 0) {
    if (ctx.executor_cuda_ordinals[static_cast<std::size_t>(op.executor)] == ordinal)
      return Status::Ok();
    return failed_precondition(field + ": lives on cuda:" + std::to_string(ordinal) +
                               ", another device than the op's other inputs in device memory");
  }
  for (std::size_t i = 0; i < ctx.executor_cuda_ordinals.size(); ++i) {
    if (ctx.executor_cuda_ordinals[i] == ordinal) {
      op.executor = static_cast<int>(i);
      return Status::Ok();
    }
  }
  return failed_precondition(field + ": lives on cuda:" + std::to_string(ordinal) +
                             ", which this server does not serve");
}

// A host buffer of `bytes` from the registry's staging pool, not zeroed (it is overwritten whole),
// kept by the op.
void* shm_buffer(std::size_t bytes, const RequestContext& ctx, RequestTensors& op) {
  op.shm_buffers.push_back(ctx.shm->staging(bytes));
  return op.shm_buffers.back().get();
}

// An input given as bytes in a shared-memory region: read (through the region's descriptor) into
// a host buffer charged to the call.
Result<wire::DecodedTensor> shm_input(const v1::Tensor& t, const char* field,
                                      const RequestContext& ctx, const CallContext& call,
                                      RequestTensors& op) {
  const std::string f(field);
  if (!ctx.shm) return failed_precondition(off_message(f + ".shm"));
  if (!t.data().empty() || t.values_size() > 0 || !t.handle().empty()) {
    return invalid_argument(f + ": expected shm or data/values/handle, got both");
  }
  if (t.dtype() == v1::D_TYPE_UNSPECIFIED || t.shape_size() == 0) {
    return invalid_argument(f + ": a tensor in shared memory needs its dtype and shape");
  }
  const Shape shape(t.shape().begin(), t.shape().end());
  ATTN_ASSIGN_OR_RETURN(numel, ctx.limits.check(shape, f));
  const std::optional<DType> dtype = wire::from_proto(t.dtype());
  if (!dtype)
    return invalid_argument(f + ".dtype: expected FLOAT32, FLOAT16 or BFLOAT16, got " +
                            std::to_string(t.dtype()));
  const std::size_t bytes = static_cast<std::size_t>(numel) * element_size(*dtype);
  ATTN_ASSIGN_OR_RETURN(
      slice, ctx.shm->resolve(call.caller, t.shm(), static_cast<std::int64_t>(bytes), f));
  if (slice.region->on_device()) {  // read in place on its GPU
    ATTN_RETURN_IF_ERROR(pin_to_cuda(slice.region->cuda.device, f + ".shm", ctx, op));
    wire::DecodedTensor d;
    d.view = TensorView{*dtype, shape, static_cast<char*>(slice.region->cuda.base) + slice.offset,
                        MemoryKind::kDevice};
    op.shm_regions.push_back(slice.region);
    return d;
  }
  ATTN_RETURN_IF_ERROR(call.hold_more(bytes, f + " (read from shared memory)"));
  void* buf = shm_buffer(bytes, ctx, op);
  ATTN_RETURN_IF_ERROR(ctx.shm->read(slice, buf, f));
  wire::DecodedTensor d;
  d.view = TensorView{*dtype, shape, buf, MemoryKind::kHost};
  return d;
}

}  // namespace

Result<wire::DecodedTensor> any_input(const v1::Tensor& t, bool present, const char* field,
                                      const RequestContext& ctx, const CallContext& call,
                                      RequestTensors& op) {
  if (present && t.has_shm()) return shm_input(t, field, ctx, call, op);
  if (present && !t.handle().empty()) {
    wire::DecodedTensor d;
    ATTN_RETURN_IF_ERROR(resolve_handle(t, field, ctx, d, op));
    return d;
  }
  return input(t, present, field, ctx);
}

Result<TensorView> sinks_input(const v1::Tensor& t, bool present, std::int64_t heads_q,
                               const RequestContext& ctx, const CallContext& call,
                               RequestTensors& held) {
  if (!present) return TensorView{};
  ATTN_ASSIGN_OR_RETURN(d, any_input(t, present, "sinks", ctx, call, held));
  ATTN_RETURN_IF_ERROR(check_sinks(d.view, heads_q));
  if (d.view.memory == MemoryKind::kHost) {
    for (std::int64_t h = 0; h < heads_q; ++h) {
      const float x = load_as_float(d.view.data, d.view.dtype, static_cast<std::size_t>(h));
      if (!std::isfinite(x))
        return invalid_argument("sinks[" + std::to_string(h) + "]: expected a finite logit, got " +
                                std::to_string(x));
    }
  }
  const TensorView view = d.view;
  held.inputs.push_back(std::move(d));
  return view;
}

// Outputs bound for CUDA regions pin the op to their device before its variant is chosen.
Status pin_output_regions(const google::protobuf::RepeatedPtrField<v1::SharedMemoryRef>& refs,
                          const RequestContext& ctx, const CallContext& call, RequestTensors& op) {
  if (!ctx.shm) return Status::Ok();
  for (const auto& ref : refs) {
    if (ref.region().empty()) continue;
    auto r = ctx.shm->find(call.caller, ref.region());
    if (r && r->on_device())
      ATTN_RETURN_IF_ERROR(pin_to_cuda(r->cuda.device, "output_shm", ctx, op));
  }
  return Status::Ok();
}

const v1::SharedMemoryRef* output_ref(
    const google::protobuf::RepeatedPtrField<v1::SharedMemoryRef>& refs, int i) {
  return i < refs.size() ? &refs.Get(i) : nullptr;
}

Status check_output_refs(const google::protobuf::RepeatedPtrField<v1::SharedMemoryRef>& refs,
                         int outputs) {
  if (refs.size() <= outputs) return Status::Ok();
  return invalid_argument("output_shm: expected at most " + std::to_string(outputs) +
                          " entries (one per output), got " + std::to_string(refs.size()));
}

Result<TensorView> shm_output(DType dtype, const Shape& shape, v1::Tensor* out,
                              const v1::SharedMemoryRef& to_shm, const char* field,
                              const RequestContext& ctx, const CallContext& call,
                              RequestTensors& op) {
  const std::string f = std::string("output_shm (") + field + ")";
  if (!ctx.shm) return failed_precondition(off_message(f));
  const std::size_t bytes = static_cast<std::size_t>(element_count(shape)) * element_size(dtype);
  ATTN_ASSIGN_OR_RETURN(slice,
                        ctx.shm->resolve(call.caller, to_shm, static_cast<std::int64_t>(bytes), f));
  out->set_dtype(wire::to_proto(dtype));
  out->mutable_shape()->Assign(shape.begin(), shape.end());
  *out->mutable_shm() = to_shm;
  out->mutable_shm()->set_bytes(static_cast<std::int64_t>(bytes));
  if (slice.region->on_device()) {  // written in place on its GPU (pin_output_regions placed the
                                    // op there)
    ATTN_RETURN_IF_ERROR(pin_to_cuda(slice.region->cuda.device, f, ctx, op));
    op.shm_regions.push_back(slice.region);
    return TensorView{dtype, shape, static_cast<char*>(slice.region->cuda.base) + slice.offset,
                      MemoryKind::kDevice};
  }
  ATTN_RETURN_IF_ERROR(call.hold_more(bytes, f));
  void* buf = shm_buffer(bytes, ctx, op);
  op.shm_outputs.push_back({slice, f, buf});
  return TensorView{dtype, shape, buf, MemoryKind::kHost};
}

Status write_shm_outputs(SharedMemoryRegistry& shm, const RequestTensors& held,
                         std::size_t* written) {
  *written = 0;
  for (const auto& o : held.shm_outputs) {
    ATTN_RETURN_IF_ERROR(shm.write(o.slice, o.data, o.field));
    *written += static_cast<std::size_t>(o.slice.bytes);
  }
  return Status::Ok();
}

namespace {

// The context to select a variant in: only the pinned device's target when there is one.
RequestContext placed(const RequestContext& ctx, const RequestTensors& op) {
  if (op.executor < 0) return ctx;
  RequestContext c = ctx;
  c.targets = {ctx.executor_targets[static_cast<std::size_t>(op.executor)]};
  return c;
}

// An output: in the response's bytes, or (keep_output) in a new resident tensor on the op's
// device whose handle the response carries once the op has succeeded.
template <class Args>
Result<TensorView> output(DType dtype, const Shape& shape, v1::Tensor* out, bool keep,
                          std::int64_t ttl_ms, const char* field, const RequestContext& ctx,
                          const CallContext& call, PreparedOp<Args>& op,
                          const v1::SharedMemoryRef* to_shm = nullptr) {
  if (to_shm && !to_shm->region().empty()) {
    const std::string f = std::string("output_shm (") + field + ")";
    if (!ctx.shm) return failed_precondition(off_message(f));
    if (keep) return invalid_argument(f + ": expected keep_output or output_shm, got both");
    return shm_output(dtype, shape, out, *to_shm, field, ctx, call, op);
  }
  if (!keep) {
    // The response's bytes, charged to the call before they are allocated.
    ATTN_RETURN_IF_ERROR(call.hold_more(
        static_cast<std::size_t>(element_count(shape)) * element_size(dtype), field));
    return wire::prepare_output(dtype, shape, out);
  }
  if (!ctx.store) return failed_precondition("keep_output: this server keeps no resident tensors");
  if (op.executor < 0) {  // no resident input: the least used device of the variant's backend
    std::vector<std::size_t> candidates;
    for (std::size_t i = 0; i < ctx.executor_targets.size(); ++i)
      if (ctx.executor_targets[i].backend == op.variant->info.backend) candidates.push_back(i);
    op.executor = static_cast<int>(ctx.store->least_used(candidates));
  }
  ATTN_ASSIGN_OR_RETURN(
      t, ctx.store->create(dtype, shape, ttl_ms, static_cast<std::size_t>(op.executor),
                           std::string(field)));
  out->set_dtype(wire::to_proto(dtype));
  out->mutable_shape()->Assign(shape.begin(), shape.end());
  out->set_handle(t->handle);
  const TensorView view = t->view();
  op.kept.push_back(std::move(t));
  return view;
}

// The output's shape must respect the same element limit as the inputs: small inputs can ask
// for a huge output (a [M,1] x [1,N] matmul).
Status check_output(const Shape& shape, const char* field, const RequestContext& ctx) {
  return ctx.limits.check(shape, field).status();
}

// The requested variant, or the best one, on the first target that can take the arguments. The
// refusal reported is the primary target's, the one the client most likely meant.
template <class Args>
Result<const Variant<Args>*> select(const OpRegistry<Args>& registry, const Args& args,
                                    const std::string& requested, const RequestContext& ctx) {
  std::vector<Target> order = ctx.targets;
  if (requested.empty() && tiny(cost_of(args))) {  // outputs are not set yet: inputs' bytes only
    std::stable_partition(order.begin(), order.end(),
                          [](const Target& t) { return t.backend == Backend::kCpu; });
  }
  Status first;
  for (const Target& target : order) {
    auto picked = registry.select(args, requested, target);
    if (picked.ok()) return picked;
    if (first.ok()) first = picked.status();
  }
  return first;
}

}  // namespace

bool available(const VariantInfo& info, const RequestContext& ctx) {
  for (const Target& t : ctx.targets)
    if (available_on(info, t).ok()) return true;
  return false;
}

Result<PreparedOp<MatmulArgs>> parse_matmul(const v1::MatmulRequest& req, v1::MatmulResponse* resp,
                                            const RequestContext& ctx, const CallContext& call) {
  PreparedOp<MatmulArgs> op;
  ATTN_ASSIGN_OR_RETURN(a, any_input(req.a(), req.has_a(), "a", ctx, call, op));
  ATTN_ASSIGN_OR_RETURN(b, any_input(req.b(), req.has_b(), "b", ctx, call, op));
  ATTN_ASSIGN_OR_RETURN(dims, matmul_dims(a.view, b.view, req.transpose_a(), req.transpose_b()));
  const Shape c_shape = matmul_output_shape(dims, a.view.rank());
  ATTN_RETURN_IF_ERROR(check_output(c_shape, "c", ctx));

  op.args.a = a.view;
  op.args.b = b.view;
  op.args.transpose_a = req.transpose_a();
  op.args.transpose_b = req.transpose_b();
  ATTN_RETURN_IF_ERROR(pin_output_regions(req.output_shm(), ctx, call, op));
  ATTN_ASSIGN_OR_RETURN(
      variant, select(ctx.registry->of<MatmulArgs>(), op.args, req.kernel(), placed(ctx, op)));
  op.variant = variant;
  ATTN_RETURN_IF_ERROR(check_output_refs(req.output_shm(), 1));
  ATTN_ASSIGN_OR_RETURN(
      c, output(a.view.dtype, c_shape, resp->mutable_c(), req.keep_output(), req.output_ttl_ms(),
                "c", ctx, call, op, output_ref(req.output_shm(), 0)));
  op.args.c = c;
  op.inputs.push_back(std::move(a));
  op.inputs.push_back(std::move(b));
  return op;
}

Result<PreparedOp<SoftmaxArgs>> parse_softmax(const v1::SoftmaxRequest& req,
                                              v1::SoftmaxResponse* resp, const RequestContext& ctx,
                                              const CallContext& call) {
  PreparedOp<SoftmaxArgs> op;
  ATTN_ASSIGN_OR_RETURN(x, any_input(req.x(), req.has_x(), "x", ctx, call, op));
  op.args.x = x.view;
  ATTN_RETURN_IF_ERROR(pin_output_regions(req.output_shm(), ctx, call, op));
  ATTN_ASSIGN_OR_RETURN(
      variant, select(ctx.registry->of<SoftmaxArgs>(), op.args, req.kernel(), placed(ctx, op)));
  op.variant = variant;
  ATTN_RETURN_IF_ERROR(check_output_refs(req.output_shm(), 1));
  ATTN_ASSIGN_OR_RETURN(
      y, output(x.view.dtype, x.view.shape, resp->mutable_y(), req.keep_output(),
                req.output_ttl_ms(), "y", ctx, call, op, output_ref(req.output_shm(), 0)));
  op.args.y = y;
  op.inputs.push_back(std::move(x));
  return op;
}

Result<PreparedOp<AttentionArgs>> parse_attention(const v1::AttentionRequest& req,
                                                  v1::AttentionResponse* resp,
                                                  const RequestContext& ctx,
                                                  const CallContext& call) {
  PreparedOp<AttentionArgs> op;
  ATTN_ASSIGN_OR_RETURN(q, any_input(req.q(), req.has_q(), "q", ctx, call, op));
  ATTN_ASSIGN_OR_RETURN(k, any_input(req.k(), req.has_k(), "k", ctx, call, op));
  ATTN_ASSIGN_OR_RETURN(v, any_input(req.v(), req.has_v(), "v", ctx, call, op));
  ATTN_RETURN_IF_ERROR(pin_output_regions(req.output_shm(), ctx, call, op));
  ATTN_ASSIGN_OR_RETURN(dims, attention_dims(q.view, k.view, v.view));
  if (!std::isfinite(req.scale())) {
    return invalid_argument("scale: expected a finite number (0 for 1/sqrt(D)), got " +
                            std::to_string(req.scale()));
  }
  op.args.q = q.view;
  op.args.k = k.view;
  op.args.v = v.view;
  op.args.causal = req.causal();
  op.args.scale = resolve_attention_scale(req.scale(), dims.head_dim);
  // Unset window sides are unbounded (-1); check_attention_options names the field it refuses.
  op.args.window_left = req.has_window_left() ? req.window_left() : -1;
  op.args.window_right = req.has_window_right() ? req.window_right() : -1;
  op.args.softcap = req.softcap();
  ATTN_RETURN_IF_ERROR(
      check_attention_options(op.args.window_left, op.args.window_right, op.args.softcap));
  ATTN_ASSIGN_OR_RETURN(sinks,
                        sinks_input(req.sinks(), req.has_sinks(), dims.heads_q, ctx, call, op));
  op.args.sinks = sinks;
  ATTN_ASSIGN_OR_RETURN(
      variant, select(ctx.registry->of<AttentionArgs>(), op.args, req.kernel(), placed(ctx, op)));
  op.variant = variant;
  ATTN_RETURN_IF_ERROR(check_output_refs(req.output_shm(), req.return_lse() ? 2 : 1));
  ATTN_ASSIGN_OR_RETURN(
      o, output(q.view.dtype, q.view.shape, resp->mutable_o(), req.keep_output(),
                req.output_ttl_ms(), "o", ctx, call, op, output_ref(req.output_shm(), 0)));
  op.args.o = o;
  if (req.return_lse()) {
    ATTN_ASSIGN_OR_RETURN(lse, output(DType::kFloat32, {dims.batch, dims.heads_q, dims.len_q},
                                      resp->mutable_lse(), req.keep_output(), req.output_ttl_ms(),
                                      "lse", ctx, call, op, output_ref(req.output_shm(), 1)));
    op.args.lse = lse;
  }
  op.inputs.push_back(std::move(q));
  op.inputs.push_back(std::move(k));
  op.inputs.push_back(std::move(v));
  return op;
}

}  // namespace attn::server
