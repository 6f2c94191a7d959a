// The three ops: their arguments, their shape rules and their cost formulas. Shape rules live here
// once, used by the server's validation, by every backend and by the tests.
#pragma once

#include <cstdint>
#include <string>

#include "attn/status.h"
#include "attn/tensor.h"

namespace attn {

enum class Op : std::uint8_t { kMatmul, kSoftmax, kAttention };
const char* op_name(Op op);  // "matmul", "softmax", "attention"

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

// O = softmax(scale . Q K^T + mask) V per (batch, query head); query head h reads key/value head
// h / (Hq / Hkv). causal: query i sees key j only when j <= i + (Sk - Sq) (bottom-right aligned);
// a row that sees no key yields zeros and lse = -inf.
struct AttentionArgs {
  TensorView q, k, v;  // [B, Hq, Sq, D], [B, Hkv, Sk, D], [B, Hkv, Sk, D]
  TensorView o;        // [B, Hq, Sq, D], same dtype as q
  TensorView lse;      // optional float32 [B, Hq, Sq]; empty when not wanted
  bool causal = false;
  float scale = 0.0f;  // already resolved: never 0 once it reaches a kernel
};

struct AttentionDims {
  std::int64_t batch = 0, heads_q = 0, heads_kv = 0, len_q = 0, len_kv = 0, head_dim = 0;
};
Result<AttentionDims> attention_dims(const TensorView& q, const TensorView& k, const TensorView& v);

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
OpCost matmul_cost(const MatmulArgs& args);
OpCost softmax_cost(const SoftmaxArgs& args);
OpCost attention_cost(const AttentionArgs& args);

}  // namespace attn
