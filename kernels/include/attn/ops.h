// The ops: their arguments, their shape rules and their cost formulas, and for each op one
// description (OpDesc<Args>) that everything generic reads: the registry, the executors, the
// server's validation, costs, warm-up and Benchmark, and ListKernels. Shape rules live here once,
// used by the server's validation, by every backend and by the tests.
//
// Adding an op: its Args and an OpDesc specialization here (with the rules in ops.cc), its entry
// in OpArgs below, its float64 reference (kernels/reference), its kernels registered by the
// backends; on the server its request decoding (server/rpc_ops.h) and RPC.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <tuple>
#include <vector>

#include "attn/status.h"
#include "attn/tensor.h"

namespace attn {

enum class Op : std::uint8_t { kMatmul, kSoftmax, kAttention, kPagedDecode, kPagedPrefill };
// "matmul", "softmax", "attention", "paged_decode", "paged_prefill"
const char* op_name(Op op);

// C[b] = op(A[b]) . op(B[b]); op transposes when the flag is set. The kernels read A and B as
// stored. A 2-D B with a 3-D A is shared by every batch.
struct MatmulArgs {
  TensorView a, b;  // inputs
  TensorView c;     // output, same dtype as the inputs
  bool transpose_a = false;
  bool transpose_b = false;
};

// The dimensions of a matmul, derived from its operands.
struct MatmulDims {
  std::int64_t batch = 1, m = 0, n = 0, k = 0;
  bool b_batched = false;  // false: B is 2-D and shared by every batch
};

// Checks the operand shapes and dtypes (rank 2 or 3, inner dims equal, batches equal, same dtype)
// and returns the dims. Messages name the field ("a.shape", "b.dtype") and the expected value.
Result<MatmulDims> matmul_dims(const TensorView& a, const TensorView& b, bool transpose_a,
                               bool transpose_b);
Shape matmul_output_shape(const MatmulDims& d, int a_rank);

// y = softmax(x) over the last dimension.
struct SoftmaxArgs {
  TensorView x;
  TensorView y;
};

struct SoftmaxDims {
  std::int64_t rows = 0, cols = 0;
};
Result<SoftmaxDims> softmax_dims(const TensorView& x);

// Which keys a query row sees: the mask of the attention ops over a KV cache (paged decode and
// prefill), one parameter so that windows and, later, trees are one field more, not one argument
// per op. Positions are bottom-right aligned as in AttentionArgs below: a query at position p
// sees key j when j <= p (causal), and p - window_left <= j <= p + window_right (-1: unbounded).
struct AttentionMask {
  bool causal = false;
  std::int64_t window_left = -1, window_right = -1;
};

// O = softmax(softcap(scale . Q K^T) + mask) V per (batch, query head); query head h reads
// key/value head h / (Hq / Hkv). Query i sits at key position i + (Sk - Sq) (bottom-right
// aligned, as FlashAttention-2). causal: it sees key j only when j <= its position. A sliding
// window (FlashAttention-2's window_size) keeps keys with position - window_left <= j <= position +
// window_right, -1 meaning unbounded on that side; with causal the right side is 0. softcap > 0
// turns each scaled score s into softcap * tanh(s / softcap) before the softmax (Gemma 2, Grok).
// sinks (gpt-oss's learned attention sinks, StreamingLLM): a float32 logit per query head that
// joins every row's softmax denominator and has no value row: o = sum_j e^(s_j) v_j / (e^(sink_h) +
// sum_j e^(s_j)), in the units of the (scaled, capped) scores; the returned lse is the log of that
// whole denominator. A row that sees no key yields zeros and lse = -inf (sink_h with sinks).
struct AttentionArgs {
  TensorView q, k, v;  // [B, Hq, Sq, D], [B, Hkv, Sk, D], [B, Hkv, Sk, D]
  TensorView o;        // [B, Hq, Sq, D], same dtype as q
  TensorView lse;      // optional float32 [B, Hq, Sq]; empty when not wanted
  bool causal = false;
  float scale = 0.0f;  // already resolved: never 0 once it reaches a kernel
  std::int64_t window_left = -1, window_right = -1;  // -1: unbounded
  float softcap = 0.0f;                              // 0: none
  TensorView sinks;  // optional float32 [Hq]; empty: none
};

// The keys [begin, end) query i sees under causal and a window (see AttentionArgs); empty
// (begin >= end) when it sees none. Shared by the reference, the CPU backend and the kernels' hosts.
struct KeyRange {
  std::int64_t begin = 0, end = 0;
};
inline KeyRange visible_keys(std::int64_t i, std::int64_t len_q, std::int64_t len_kv, bool causal,
                             std::int64_t window_left = -1, std::int64_t window_right = -1) {
  const std::int64_t pos = i + (len_kv - len_q);
  KeyRange r{0, len_kv};
  const std::int64_t right = causal ? 0 : window_right;
  if (right >= 0 && pos + right + 1 < r.end) r.end = pos + right + 1;
  if (window_left >= 0 && pos - window_left > r.begin) r.begin = pos - window_left;
  if (r.end < 0) r.end = 0;
  if (r.begin > r.end) r.begin = r.end;
  return r;
}
inline KeyRange visible_keys(std::int64_t i, std::int64_t len_q, std::int64_t len_kv, const AttentionArgs& a) {
  return visible_keys(i, len_q, len_kv, a.causal, a.window_left, a.window_right);
}

struct AttentionDims {
  std::int64_t batch = 0, heads_q = 0, heads_kv = 0, len_q = 0, len_kv = 0, head_dim = 0;
};
Result<AttentionDims> attention_dims(const TensorView& q, const TensorView& k, const TensorView& v);
// window_left/right >= -1, softcap finite and >= 0; messages name the field.
Status check_attention_options(std::int64_t window_left, std::int64_t window_right, float softcap);
// Optional sinks: empty, or float32 [heads_q] (the values are the caller's to check: they may be
// in device memory).
Status check_sinks(const TensorView& sinks, std::int64_t heads_q);
// Whether the args ask for a window or a soft cap (rungs that take neither refuse them by name).
inline bool has_window(const AttentionArgs& a) { return a.window_left >= 0 || (!a.causal && a.window_right >= 0); }

// 1/sqrt(head_dim) when `scale` is 0, else `scale`.
float resolve_attention_scale(float scale, std::int64_t head_dim);

// Whether query i may see key j under the bottom-right aligned causal mask.
inline bool causal_visible(std::int64_t i, std::int64_t j, std::int64_t len_q, std::int64_t len_kv) {
  return j <= i + (len_kv - len_q);
}

// Cost of an op by its formula, for Timings (flops) and bandwidth (bytes read + written).
struct OpCost {
  std::int64_t flops = 0;
  std::int64_t bytes = 0;
};

// An op's problem by sizes, before any memory exists: what the Benchmark RPC and the warm-up ask
// for. `shape` is the op's own form: matmul [M, K, N] or [B, M, K, N]; softmax the shape of x;
// attention q's [B, Hq, Sq, D] with `kv_heads`/`kv_len` for K and V (0: Hq, Sq).
struct ProblemSpec {
  DType dtype = DType::kFloat32;
  Shape shape;
  std::int64_t kv_heads = 0, kv_len = 0;
  bool causal = false;
  bool lse = false;
  std::int64_t window_left = -1, window_right = -1;  // as AttentionArgs
  float softcap = 0.0f;
};

// One tensor of a problem: its name in the API ("a", "q"), dtype and shape.
struct TensorSpec {
  std::string name;
  DType dtype = DType::kFloat32;
  Shape shape;
};

// The tensors of a problem and how views of them (made anywhere) become the op's Args.
template <class Args>
struct Problem {
  std::vector<TensorSpec> inputs, outputs;
  std::function<Args(const std::vector<TensorView>& inputs, const std::vector<TensorView>& outputs)> bind;
};

// What the generic code knows of an op; one specialization per op, below.
//   kOp, kName                       the op and its name in the API
//   check(args)                      the shape rules: Ok, or INVALID_ARGUMENT naming the field
//   cost(args)                       FLOPs and bytes by the formula
//   inputs(args), outputs(args)      the views the executor moves in and out
//   problem(spec)                    the tensors of a problem by sizes (errors name "shape", ...)
//   example(dtype)                   a small problem every variant can take: the warm-up's
template <class Args>
struct OpDesc;

template <>
struct OpDesc<MatmulArgs> {
  using Args = MatmulArgs;
  static constexpr Op kOp = Op::kMatmul;
  static constexpr const char* kName = "matmul";
  static Status check(const MatmulArgs& a);
  static OpCost cost(const MatmulArgs& a);
  static std::vector<TensorView*> inputs(MatmulArgs& a) { return {&a.a, &a.b}; }
  static std::vector<TensorView*> outputs(MatmulArgs& a) { return {&a.c}; }
  static Result<Problem<MatmulArgs>> problem(const ProblemSpec& spec);
  static ProblemSpec example(DType dt) { return {dt, {64, 64, 64}}; }
};

template <>
struct OpDesc<SoftmaxArgs> {
  using Args = SoftmaxArgs;
  static constexpr Op kOp = Op::kSoftmax;
  static constexpr const char* kName = "softmax";
  static Status check(const SoftmaxArgs& a);
  static OpCost cost(const SoftmaxArgs& a);
  static std::vector<TensorView*> inputs(SoftmaxArgs& a) { return {&a.x}; }
  static std::vector<TensorView*> outputs(SoftmaxArgs& a) { return {&a.y}; }
  static Result<Problem<SoftmaxArgs>> problem(const ProblemSpec& spec);
  static ProblemSpec example(DType dt) { return {dt, {8, 1024}}; }
};

template <>
struct OpDesc<AttentionArgs> {
  using Args = AttentionArgs;
  static constexpr Op kOp = Op::kAttention;
  static constexpr const char* kName = "attention";
  static Status check(const AttentionArgs& a);
  static OpCost cost(const AttentionArgs& a);
  static std::vector<TensorView*> inputs(AttentionArgs& a) {
    if (a.sinks.empty()) return {&a.q, &a.k, &a.v};
    return {&a.q, &a.k, &a.v, &a.sinks};
  }
  static std::vector<TensorView*> outputs(AttentionArgs& a) {
    if (a.lse.empty()) return {&a.o};
    return {&a.o, &a.lse};
  }
  static Result<Problem<AttentionArgs>> problem(const ProblemSpec& spec);
  static ProblemSpec example(DType dt) {
    ProblemSpec s{dt, {1, 2, 64, 64}};
    s.lse = true;
    return s;
  }
};

// The one-shot ops (stateless: Benchmark and the warm-up make their problems), in the order
// ListKernels and the registry show them; the KV-cache ops follow (attn/paged_ops.h).
using OpArgs = std::tuple<MatmulArgs, SoftmaxArgs, AttentionArgs>;

// Calls f(OpDesc<Args>{}) for each op.
template <class F>
void for_each_op(F&& f) {
  std::apply([&](const auto&... args) { (f(OpDesc<std::decay_t<decltype(args)>>{}), ...); }, OpArgs{});
}

// The op's FLOPs and bytes, by argument type.
template <class Args>
OpCost cost_of(const Args& a) {
  return OpDesc<Args>::cost(a);
}

}  // namespace attn
