// `attn matmul`, `attn softmax`, `attn attention`: one op call each, inputs from .npy files or
// --random, inline or through shared memory (--shm).
#include <memory>
#include <random>

#include "commands.h"
#include "op_inputs.h"
#include "op_report.h"
#include "output.h"
#include "shm_call.h"

namespace attn::cli {
namespace {

struct MatmulFlags {
  OpFlags op;
  bool transpose_a = false, transpose_b = false;
};

// --random M,K,N or B,M,K,N: A and B as stored, [K, M] and [N, K] when transposed.
Status random_matmul_inputs(const MatmulFlags& f, Tensor& a, Tensor& b) {
  ATTN_ASSIGN_OR_RETURN(d, parse_shape(f.op.random, "--random"));
  if (d.size() != 3 && d.size() != 4)
    return invalid_argument("--random: expected M,K,N or B,M,K,N");
  ATTN_ASSIGN_OR_RETURN(dtype, dtype_of(f.op));
  std::mt19937_64 rng(f.op.seed);
  const bool batched = d.size() == 4;
  const std::int64_t m = d[batched], k = d[batched + 1], n = d[batched + 2];
  Shape as = f.transpose_a ? Shape{k, m} : Shape{m, k},
        bs = f.transpose_b ? Shape{n, k} : Shape{k, n};
  if (batched) as.insert(as.begin(), d[0]), bs.insert(bs.begin(), d[0]);
  a = random_tensor(dtype, as, rng);
  b = random_tensor(dtype, bs, rng);
  return Status::Ok();
}

Result<OpResult> matmul_in_shm(const MatmulFlags& f, Client& client, const Tensor& a,
                               const Tensor& b) {
  v1::MatmulRequest req;
  req.set_transpose_a(f.transpose_a);
  req.set_transpose_b(f.transpose_b);
  req.set_kernel(f.op.kernel);
  const std::int64_t rows = a.shape()[a.shape().size() - (f.transpose_a ? 1 : 2)];
  const std::int64_t cols = b.shape()[b.shape().size() - (f.transpose_b ? 2 : 1)];
  const std::int64_t batch = a.shape().size() == 3 ? a.shape()[0] : 1;
  const std::size_t out_bytes =
      static_cast<std::size_t>(batch * rows * cols) * element_size(a.dtype());
  return call_in_shm(client, {&a, &b}, out_bytes, {req.mutable_a(), req.mutable_b()}, req,
                     &v1::AttnService::Stub::Matmul, &v1::MatmulResponse::c);
}

int run_matmul(const MatmulFlags& f, const Session& session) {
  if (Status s = need_inputs(f.op, 2, "A.npy B.npy"); !s.ok()) return fail(s);
  Tensor a, b;
  const Status loaded =
      f.op.random.empty() ? load_inputs(f.op, {&a, &b}) : random_matmul_inputs(f, a, b);
  if (!loaded.ok()) return fail(loaded);
  if (f.op.shm)
    return report_op(session.flags, matmul_in_shm(f, session.client, a, b), f.op, nullptr);
  return report_op(session.flags,
                   session.client.matmul(a, b, {f.transpose_a, f.transpose_b, f.op.kernel}), f.op,
                   nullptr);
}

// --random SHAPE: one input of that shape.
Status random_softmax_input(const OpFlags& f, Tensor& x) {
  ATTN_ASSIGN_OR_RETURN(shape, parse_shape(f.random, "--random"));
  ATTN_ASSIGN_OR_RETURN(dtype, dtype_of(f));
  std::mt19937_64 rng(f.seed);
  x = random_tensor(dtype, shape, rng);
  return Status::Ok();
}

int run_softmax(const OpFlags& f, const Session& session) {
  if (Status s = need_inputs(f, 1, "X.npy"); !s.ok()) return fail(s);
  Tensor x;
  const Status loaded = f.random.empty() ? load_inputs(f, {&x}) : random_softmax_input(f, x);
  if (!loaded.ok()) return fail(loaded);
  if (f.shm) {
    v1::SoftmaxRequest req;
    req.set_kernel(f.kernel);
    return report_op(session.flags,
                     call_in_shm(session.client, {&x}, x.bytes(), {req.mutable_x()}, req,
                                 &v1::AttnService::Stub::Softmax, &v1::SoftmaxResponse::y),
                     f, nullptr);
  }
  return report_op(session.flags, session.client.softmax(x, f.kernel), f, nullptr);
}

struct AttentionFlags {
  OpFlags op;
  bool causal = false;
  float scale = 0.0f;
  std::int64_t kv_heads = 0, kv_len = 0;  // --random only; 0: as the query's
  std::int64_t window_left = -1, window_right = -1;
  float softcap = 0.0f;
  std::string lse_out;
};

// --random B,Hq,Sq,D: Q of that shape, K and V of --kv-heads and --kv-len.
Status random_attention_inputs(const AttentionFlags& f, Tensor& q, Tensor& k, Tensor& v) {
  ATTN_ASSIGN_OR_RETURN(d, parse_shape(f.op.random, "--random"));
  if (d.size() != 4) return invalid_argument("--random: expected B,Hq,Sq,D");
  ATTN_ASSIGN_OR_RETURN(dtype, dtype_of(f.op));
  std::mt19937_64 rng(f.op.seed);
  const Shape kv{d[0], f.kv_heads ? f.kv_heads : d[1], f.kv_len ? f.kv_len : d[2], d[3]};
  q = random_tensor(dtype, d, rng);
  k = random_tensor(dtype, kv, rng);
  v = random_tensor(dtype, kv, rng);
  return Status::Ok();
}

Result<OpResult> attention_in_shm(const AttentionFlags& f, Client& client, const Tensor& q,
                                  const Tensor& k, const Tensor& v) {
  v1::AttentionRequest req;
  req.set_causal(f.causal);
  req.set_scale(f.scale);
  req.set_kernel(f.op.kernel);
  if (f.window_left != -1) req.set_window_left(f.window_left);
  if (f.window_right != -1) req.set_window_right(f.window_right);
  req.set_softcap(f.softcap);
  return call_in_shm(client, {&q, &k, &v}, q.bytes(),
                     {req.mutable_q(), req.mutable_k(), req.mutable_v()}, req,
                     &v1::AttnService::Stub::Attention, &v1::AttentionResponse::o);
}

int run_attention(const AttentionFlags& f, const Session& session) {
  if (Status s = need_inputs(f.op, 3, "Q.npy K.npy V.npy"); !s.ok()) return fail(s);
  Tensor q, k, v;
  const Status loaded =
      f.op.random.empty() ? load_inputs(f.op, {&q, &k, &v}) : random_attention_inputs(f, q, k, v);
  if (!loaded.ok()) return fail(loaded);
  if (f.op.shm) {
    if (!f.lse_out.empty())
      return fail(invalid_argument("--lse-out with --shm: not supported yet"));
    return report_op(session.flags, attention_in_shm(f, session.client, q, k, v), f.op, nullptr);
  }
  const AttentionOptions o{f.causal,      f.scale,        !f.lse_out.empty(), f.op.kernel,
                           f.window_left, f.window_right, f.softcap};
  return report_op(session.flags, session.client.attention(q, k, v, o), f.op, f.lse_out.c_str());
}

}  // namespace

Subcommand add_matmul(CLI::App& app) {
  auto f = std::make_shared<MatmulFlags>();
  auto* cmd = app.add_subcommand("matmul", "C = A.B");
  add_op_flags(cmd, f->op, "A.npy B.npy", "M,K,N or B,M,K,N: random inputs of these sizes");
  cmd->add_flag("--transpose-a", f->transpose_a, "A is stored [K, M] and read transposed");
  cmd->add_flag("--transpose-b", f->transpose_b, "B is stored [N, K] and read transposed");
  return {cmd, [f](const Session& session) { return run_matmul(*f, session); }};
}

Subcommand add_softmax(CLI::App& app) {
  auto f = std::make_shared<OpFlags>();
  auto* cmd = app.add_subcommand("softmax", "softmax over the last dimension");
  add_op_flags(cmd, *f, "X.npy", "SHAPE: a random input of this shape, e.g. 8,1000");
  return {cmd, [f](const Session& session) { return run_softmax(*f, session); }};
}

Subcommand add_attention(CLI::App& app) {
  auto f = std::make_shared<AttentionFlags>();
  auto* cmd = app.add_subcommand("attention", "O = softmax(scale.QK^T) V");
  add_op_flags(cmd, f->op, "Q.npy K.npy V.npy", "B,Hq,Sq,D: random inputs of these sizes");
  cmd->add_flag("--causal", f->causal, "bottom-right aligned causal mask");
  cmd->add_option("--scale", f->scale, "score scale (0: 1/sqrt(D))");
  cmd->add_option("--kv-heads", f->kv_heads, "with --random: key/value heads (default Hq)");
  cmd->add_option("--kv-len", f->kv_len, "with --random: key/value length (default Sq)");
  cmd->add_option("--lse-out", f->lse_out, "also write the log-sum-exp [B,Hq,Sq] here (.npy)");
  cmd->add_option("--window-left", f->window_left,
                  "sliding window: keys seen left of a query's position (-1: all)");
  cmd->add_option("--window-right", f->window_right,
                  "sliding window: keys seen right of it (-1: all)");
  cmd->add_option("--softcap", f->softcap,
                  "soft-cap the scores: softcap * tanh(s / softcap) (0: none)");
  return {cmd, [f](const Session& session) { return run_attention(*f, session); }};
}

}  // namespace attn::cli
