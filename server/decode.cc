#include "decode.h"

#include <cmath>

namespace attn::server {
namespace {

Result<wire::DecodedTensor> input(const v1::Tensor& t, bool present, const char* field,
                                  const DecodeContext& ctx) {
  if (!present) return invalid_argument(std::string(field) + ": expected a tensor, got none");
  return wire::decode_tensor(t, field, ctx.limits);
}

// The output's shape must respect the same element limit as the inputs: small inputs can ask
// for a huge output (a [M,1] x [1,N] matmul).
Status check_output(const Shape& shape, const char* field, const DecodeContext& ctx) {
  auto count = checked_element_count(shape, field);
  ATTN_RETURN_IF_ERROR(count.status());
  if (*count > ctx.limits.max_elements) {
    return resource_exhausted(std::string(field) + ": the result " + shape_to_string(shape) +
                              " would have " + std::to_string(*count) +
                              " elements, over this server's limit of " +
                              std::to_string(ctx.limits.max_elements));
  }
  return Status::Ok();
}

// The requested variant, or the best one, on the first target that can take the arguments. The
// refusal reported is the primary target's, the one the client most likely meant.
template <class Args>
Result<const Variant<Args>*> select(const OpRegistry<Args>& registry, const Args& args,
                                    const std::string& requested, const DecodeContext& ctx) {
  Status first;
  for (const Target& target : ctx.targets) {
    auto picked = registry.select(args, requested, target);
    if (picked.ok()) return picked;
    if (first.ok()) first = picked.status();
  }
  return first;
}

}  // namespace

bool available(const VariantInfo& info, const DecodeContext& ctx) {
  for (const Target& t : ctx.targets)
    if (available_on(info, t).ok()) return true;
  return false;
}

Result<PreparedOp<MatmulArgs>> decode_matmul(const v1::MatmulRequest& req, v1::MatmulResponse* resp,
                                             const DecodeContext& ctx) {
  ATTN_ASSIGN_OR_RETURN(a, input(req.a(), req.has_a(), "a", ctx));
  ATTN_ASSIGN_OR_RETURN(b, input(req.b(), req.has_b(), "b", ctx));
  ATTN_ASSIGN_OR_RETURN(dims, matmul_dims(a.view, b.view, req.transpose_a(), req.transpose_b()));
  const Shape c_shape = matmul_output_shape(dims, a.view.rank());
  ATTN_RETURN_IF_ERROR(check_output(c_shape, "c", ctx));

  PreparedOp<MatmulArgs> op;
  op.args.a = a.view;
  op.args.b = b.view;
  op.args.transpose_a = req.transpose_a();
  op.args.transpose_b = req.transpose_b();
  ATTN_ASSIGN_OR_RETURN(variant, select(ctx.registry->matmul, op.args, req.kernel(), ctx));
  op.variant = variant;
  op.args.c = wire::prepare_output(a.view.dtype, c_shape, resp->mutable_c());
  op.inputs.push_back(std::move(a));
  op.inputs.push_back(std::move(b));
  return op;
}

Result<PreparedOp<SoftmaxArgs>> decode_softmax(const v1::SoftmaxRequest& req,
                                               v1::SoftmaxResponse* resp, const DecodeContext& ctx) {
  ATTN_ASSIGN_OR_RETURN(x, input(req.x(), req.has_x(), "x", ctx));
  PreparedOp<SoftmaxArgs> op;
  op.args.x = x.view;
  ATTN_ASSIGN_OR_RETURN(variant, select(ctx.registry->softmax, op.args, req.kernel(), ctx));
  op.variant = variant;
  op.args.y = wire::prepare_output(x.view.dtype, x.view.shape, resp->mutable_y());
  op.inputs.push_back(std::move(x));
  return op;
}

Result<PreparedOp<AttentionArgs>> decode_attention(const v1::AttentionRequest& req,
                                                   v1::AttentionResponse* resp,
                                                   const DecodeContext& ctx) {
  ATTN_ASSIGN_OR_RETURN(q, input(req.q(), req.has_q(), "q", ctx));
  ATTN_ASSIGN_OR_RETURN(k, input(req.k(), req.has_k(), "k", ctx));
  ATTN_ASSIGN_OR_RETURN(v, input(req.v(), req.has_v(), "v", ctx));
  ATTN_ASSIGN_OR_RETURN(dims, attention_dims(q.view, k.view, v.view));
  if (!std::isfinite(req.scale())) {
    return invalid_argument("scale: expected a finite number (0 for 1/sqrt(D)), got " +
                            std::to_string(req.scale()));
  }
  PreparedOp<AttentionArgs> op;
  op.args.q = q.view;
  op.args.k = k.view;
  op.args.v = v.view;
  op.args.causal = req.causal();
  op.args.scale = resolve_attention_scale(req.scale(), dims.head_dim);
  ATTN_ASSIGN_OR_RETURN(variant, select(ctx.registry->attention, op.args, req.kernel(), ctx));
  op.variant = variant;
  op.args.o = wire::prepare_output(q.view.dtype, q.view.shape, resp->mutable_o());
  if (req.return_lse()) {
    op.args.lse = wire::prepare_output(DType::kFloat32, {dims.batch, dims.heads_q, dims.len_q},
                                       resp->mutable_lse());
  }
  op.inputs.push_back(std::move(q));
  op.inputs.push_back(std::move(k));
  op.inputs.push_back(std::move(v));
  return op;
}

}  // namespace attn::server
