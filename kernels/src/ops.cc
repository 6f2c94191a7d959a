#include "attn/ops.h"

#include <cmath>

namespace attn {
namespace {

std::string dims_str(std::int64_t v) { return std::to_string(v); }

Status same_dtype(const TensorView& first, const char* first_name, const TensorView& other,
                  const char* other_name) {
  if (other.dtype == first.dtype) return Status::Ok();
  return invalid_argument(std::string(other_name) + ".dtype: expected " +
                          std::string(dtype_name(first.dtype)) + " (the dtype of " + first_name +
                          "), got " + std::string(dtype_name(other.dtype)));
}

}  // namespace

const char* op_name(Op op) {
  switch (op) {
    case Op::kMatmul: return "matmul";
    case Op::kSoftmax: return "softmax";
    case Op::kAttention: return "attention";
    case Op::kPagedDecode: return "paged_decode";
    case Op::kPagedPrefill: return "paged_prefill";
  }
  return "?";
}

Result<MatmulDims> matmul_dims(const TensorView& a, const TensorView& b, bool transpose_a,
                               bool transpose_b) {
  if (a.rank() != 2 && a.rank() != 3) {
    return invalid_argument("a.shape: expected rank 2 [M, K] or 3 [B, M, K], got rank " +
                            std::to_string(a.rank()) + " " + shape_to_string(a.shape));
  }
  if (b.rank() != 2 && b.rank() != 3) {
    return invalid_argument("b.shape: expected rank 2 [K, N] or 3 [B, K, N], got rank " +
                            std::to_string(b.rank()) + " " + shape_to_string(b.shape));
  }
  if (b.rank() == 3 && a.rank() == 2) {
    return invalid_argument("b.shape: a 3-D b " + shape_to_string(b.shape) +
                            " needs a 3-D a, got a.shape " + shape_to_string(a.shape));
  }
  ATTN_RETURN_IF_ERROR(same_dtype(a, "a", b, "b"));
  MatmulDims d;
  const int ao = a.rank() - 2, bo = b.rank() - 2;
  d.batch = a.rank() == 3 ? a.shape[0] : 1;
  d.m = transpose_a ? a.shape[ao + 1] : a.shape[ao];
  const std::int64_t ka = transpose_a ? a.shape[ao] : a.shape[ao + 1];
  const std::int64_t kb = transpose_b ? b.shape[bo + 1] : b.shape[bo];
  d.n = transpose_b ? b.shape[bo] : b.shape[bo + 1];
  d.k = ka;
  d.b_batched = b.rank() == 3;
  if (ka != kb) {
    return invalid_argument(
        std::string("b.shape: inner dimensions differ: a") + (transpose_a ? "^T" : "") + " is " +
        dims_str(d.m) + "x" + dims_str(ka) + " so b" + (transpose_b ? "^T" : "") +
        " must have " + dims_str(ka) + " rows, got " + dims_str(kb) + " (a.shape " +
        shape_to_string(a.shape) + ", b.shape " + shape_to_string(b.shape) + ")");
  }
  if (d.b_batched && b.shape[0] != d.batch) {
    return invalid_argument("b.shape[0]: expected the batch of a, " + dims_str(d.batch) +
                            ", got " + dims_str(b.shape[0]));
  }
  return d;
}

Shape matmul_output_shape(const MatmulDims& d, int a_rank) {
  if (a_rank == 3) return {d.batch, d.m, d.n};
  return {d.m, d.n};
}

Result<SoftmaxDims> softmax_dims(const TensorView& x) {
  if (x.rank() < 1) return invalid_argument("x.shape: expected rank >= 1, got a scalar (rank 0)");
  SoftmaxDims d;
  d.cols = x.shape.back();
  d.rows = x.numel() / d.cols;
  return d;
}

Result<AttentionDims> attention_dims(const TensorView& q, const TensorView& k,
                                     const TensorView& v) {
  const char* names[] = {"q", "k", "v"};
  const TensorView* views[] = {&q, &k, &v};
  const char* layouts[] = {"[B, Hq, Sq, D]", "[B, Hkv, Sk, D]", "[B, Hkv, Sk, D]"};
  for (int i = 0; i < 3; ++i) {
    if (views[i]->rank() != 4) {
      return invalid_argument(std::string(names[i]) + ".shape: expected rank 4 " + layouts[i] +
                              ", got rank " + std::to_string(views[i]->rank()) + " " +
                              shape_to_string(views[i]->shape));
    }
  }
  ATTN_RETURN_IF_ERROR(same_dtype(q, "q", k, "k"));
  ATTN_RETURN_IF_ERROR(same_dtype(q, "q", v, "v"));
  if (k.shape != v.shape) {
    return invalid_argument("v.shape: expected the shape of k, " + shape_to_string(k.shape) +
                            ", got " + shape_to_string(v.shape));
  }
  AttentionDims d{q.shape[0], q.shape[1], k.shape[1], q.shape[2], k.shape[2], q.shape[3]};
  if (k.shape[0] != d.batch) {
    return invalid_argument("k.shape[0]: expected the batch of q, " + dims_str(d.batch) +
                            ", got " + dims_str(k.shape[0]));
  }
  if (k.shape[3] != d.head_dim) {
    return invalid_argument("k.shape[3]: expected the head dim of q, " + dims_str(d.head_dim) +
                            ", got " + dims_str(k.shape[3]));
  }
  if (d.heads_q % d.heads_kv != 0) {
    return invalid_argument("k.shape[1]: the query heads (q.shape[1] = " + dims_str(d.heads_q) +
                            ") must be a multiple of the key/value heads, got " +
                            dims_str(d.heads_kv));
  }
  return d;
}

Status check_attention_options(std::int64_t window_left, std::int64_t window_right, float softcap) {
  if (window_left < -1) return invalid_argument("window_left: expected >= 0, or -1 for unbounded, got " + std::to_string(window_left));
  if (window_right < -1) return invalid_argument("window_right: expected >= 0, or -1 for unbounded, got " + std::to_string(window_right));
  if (!(softcap >= 0.0f) || std::isinf(softcap)) return invalid_argument("softcap: expected a finite value >= 0 (0: none), got " + std::to_string(softcap));
  return Status::Ok();
}

Status check_sinks(const TensorView& sinks, std::int64_t heads_q) {
  if (sinks.empty()) return Status::Ok();
  if (sinks.dtype != DType::kFloat32)
    return invalid_argument("sinks.dtype: expected float32, got " + std::string(dtype_name(sinks.dtype)));
  if (sinks.rank() != 1 || sinks.dim(0) != heads_q)
    return invalid_argument("sinks.shape: expected [" + std::to_string(heads_q) + "] (one per query head), got " +
                            shape_to_string(sinks.shape));
  return Status::Ok();
}

float resolve_attention_scale(float scale, std::int64_t head_dim) {
  return scale != 0.0f ? scale : static_cast<float>(1.0 / std::sqrt(static_cast<double>(head_dim)));
}

Status OpDesc<MatmulArgs>::check(const MatmulArgs& a) {
  return matmul_dims(a.a, a.b, a.transpose_a, a.transpose_b).status();
}

OpCost OpDesc<MatmulArgs>::cost(const MatmulArgs& args) {
  auto d = matmul_dims(args.a, args.b, args.transpose_a, args.transpose_b);
  if (!d.ok()) return {};
  return {2 * d->batch * d->m * d->n * d->k,
          static_cast<std::int64_t>(args.a.bytes() + args.b.bytes() + args.c.bytes())};
}

namespace {

Status dims_at_least_one(const Shape& shape) {
  for (auto d : shape)
    if (d < 1) return invalid_argument("shape: expected dims >= 1, got " + shape_to_string(shape));
  return Status::Ok();
}

}  // namespace

Result<Problem<MatmulArgs>> OpDesc<MatmulArgs>::problem(const ProblemSpec& spec) {
  const Shape& s = spec.shape;
  if (s.size() != 3 && s.size() != 4) {
    return invalid_argument("shape: expected [M, K, N] or [B, M, K, N] for matmul, got " + shape_to_string(s));
  }
  ATTN_RETURN_IF_ERROR(dims_at_least_one(s));
  const bool batched = s.size() == 4;
  const std::int64_t B = batched ? s[0] : 1, M = s[batched], K = s[batched + 1], N = s[batched + 2];
  auto shape = [&](std::int64_t rows, std::int64_t cols) { return batched ? Shape{B, rows, cols} : Shape{rows, cols}; };
  Problem<MatmulArgs> p;
  p.inputs = {{"a", spec.dtype, shape(M, K)}, {"b", spec.dtype, shape(K, N)}};
  p.outputs = {{"c", spec.dtype, shape(M, N)}};
  p.bind = [](const std::vector<TensorView>& in, const std::vector<TensorView>& out) {
    return MatmulArgs{in[0], in[1], out[0]};
  };
  return p;
}

Status OpDesc<SoftmaxArgs>::check(const SoftmaxArgs& a) { return softmax_dims(a.x).status(); }

OpCost OpDesc<SoftmaxArgs>::cost(const SoftmaxArgs& args) {
  // exp, subtract, divide, max and sum per element, by the usual count.
  return {5 * args.x.numel(), static_cast<std::int64_t>(args.x.bytes() + args.y.bytes())};
}

Result<Problem<SoftmaxArgs>> OpDesc<SoftmaxArgs>::problem(const ProblemSpec& spec) {
  if (spec.shape.empty()) return invalid_argument("shape: expected at least one dimension, got none");
  ATTN_RETURN_IF_ERROR(dims_at_least_one(spec.shape));
  Problem<SoftmaxArgs> p;
  p.inputs = {{"x", spec.dtype, spec.shape}};
  p.outputs = {{"y", spec.dtype, spec.shape}};
  p.bind = [](const std::vector<TensorView>& in, const std::vector<TensorView>& out) {
    return SoftmaxArgs{in[0], out[0]};
  };
  return p;
}

Status OpDesc<AttentionArgs>::check(const AttentionArgs& a) {
  ATTN_RETURN_IF_ERROR(check_attention_options(a.window_left, a.window_right, a.softcap));
  ATTN_ASSIGN_OR_RETURN(d, attention_dims(a.q, a.k, a.v));
  return check_sinks(a.sinks, d.heads_q);
}

OpCost OpDesc<AttentionArgs>::cost(const AttentionArgs& args) {
  auto d = attention_dims(args.q, args.k, args.v);
  if (!d.ok()) return {};
  std::int64_t flops = 4 * d->batch * d->heads_q * d->len_q * d->len_kv * d->head_dim;
  if (has_window(args)) {  // the pairs the window keeps, counted
    std::int64_t pairs = 0;
    for (std::int64_t i = 0; i < d->len_q; ++i) {
      const KeyRange r = visible_keys(i, d->len_q, d->len_kv, args);
      pairs += r.end - r.begin;
    }
    flops = 4 * d->batch * d->heads_q * pairs * d->head_dim;
  } else if (args.causal && d->len_q == d->len_kv) {
    flops /= 2;
  }
  const auto bytes = args.q.bytes() + args.k.bytes() + args.v.bytes() + args.o.bytes() +
                     (args.lse.empty() ? 0 : args.lse.bytes());
  return {flops, static_cast<std::int64_t>(bytes)};
}

Result<Problem<AttentionArgs>> OpDesc<AttentionArgs>::problem(const ProblemSpec& spec) {
  const Shape& s = spec.shape;
  if (s.size() != 4) return invalid_argument("shape: expected [B, Hq, Sq, D] for attention, got " + shape_to_string(s));
  ATTN_RETURN_IF_ERROR(dims_at_least_one(s));
  if (spec.kv_heads < 0 || spec.kv_len < 0) return invalid_argument("kv_heads, kv_len: expected >= 0");
  ATTN_RETURN_IF_ERROR(check_attention_options(spec.window_left, spec.window_right, spec.softcap));
  const std::int64_t hkv = spec.kv_heads ? spec.kv_heads : s[1], sk = spec.kv_len ? spec.kv_len : s[2];
  if (s[1] % hkv != 0) {
    return invalid_argument("kv_heads: expected a divisor of Hq = " + std::to_string(s[1]) + ", got " +
                            std::to_string(hkv));
  }
  const Shape kv{s[0], hkv, sk, s[3]};
  Problem<AttentionArgs> p;
  p.inputs = {{"q", spec.dtype, s}, {"k", spec.dtype, kv}, {"v", spec.dtype, kv}};
  p.outputs = {{"o", spec.dtype, s}};
  if (spec.lse) p.outputs.push_back({"lse", DType::kFloat32, {s[0], s[1], s[2]}});
  p.bind = [spec, scale = resolve_attention_scale(0.0f, s[3])](const std::vector<TensorView>& in,
                                                               const std::vector<TensorView>& out) {
    return AttentionArgs{in[0],      in[1], in[2], out[0], out.size() > 1 ? out[1] : TensorView{}, spec.causal, scale,
                         spec.window_left, spec.window_right, spec.softcap};
  };
  return p;
}

}  // namespace attn
