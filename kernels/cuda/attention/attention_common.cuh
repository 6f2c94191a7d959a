// Shared by the attention rungs: the problem as plain numbers, where each head's rows live,
// the bottom-right causal rule and the checks every rung makes.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <string>

#include "attn/executor.h"
#include "attn/ops.h"
#include "../common/mma_sync.cuh"
#include "../common/rung_caps.h"
#include "../common/score_rules.cuh"
#include "../cuda_check.h"

namespace attn::cuda {

struct AttentionProblem {
  const void* q;
  const void* k;
  const void* v;
  void* o;
  float* lse;  // null when not wanted
  int batch, heads_q, heads_kv, len_q, len_kv, head_dim, group;
  float scale;       // natural-log scale
  float scale_log2;  // scale * log2(e): scores go through exp2
  bool causal;
  int window_left = -1, window_right = -1;  // -1: unbounded (see AttentionArgs)
  float softcap = 0.0f;                     // 0: none
  float cap_pre = 0.0f, cap_log2 = 0.0f;    // scale / softcap, softcap * log2(e); 0 without a cap
  const float* sinks = nullptr;             // [Hq] natural-log sink logits, or null

  __host__ __device__ ScoreMap score_map() const { return {scale_log2, cap_pre, cap_log2}; }
  __host__ __device__ bool windowed() const { return window_left >= 0 || (!causal && window_right >= 0); }

  // First element of row i of query head h (of batch b), and of key/value row j for that head.
  __host__ __device__ long long q_row(int b, int h, int i) const {
    return ((static_cast<long long>(b) * heads_q + h) * len_q + i) * head_dim;
  }
  __host__ __device__ long long kv_row(int b, int h, int j) const {
    return ((static_cast<long long>(b) * heads_kv + h / group) * len_kv + j) * head_dim;
  }
  // Keys [first_key(i), visible_keys(i)) are visible to query i (attn::visible_keys).
  __host__ __device__ int visible_keys(int i) const {
    const int right = causal ? 0 : window_right;
    if (right < 0) return len_kv;
    const long long v = static_cast<long long>(i) + (len_kv - len_q) + right + 1;
    return v < 0 ? 0 : (v > len_kv ? len_kv : static_cast<int>(v));
  }
  __host__ __device__ int first_key(int i) const {
    if (window_left < 0) return 0;
    const long long v = static_cast<long long>(i) + (len_kv - len_q) - window_left;
    const int end = visible_keys(i);
    return v < 0 ? 0 : (v > end ? end : static_cast<int>(v));
  }
};

// Checks the shapes and options of the call against what the rung takes (its RungCaps: dtypes,
// head dims, options) and its sizes, and builds the problem.
inline Result<AttentionProblem> attention_problem(const AttentionArgs& args, const RungCaps& caps, const char* name) {
  ATTN_ASSIGN_OR_RETURN(d, attention_dims(args.q, args.k, args.v));
  ATTN_RETURN_IF_ERROR(check_attention_options(args.window_left, args.window_right, args.softcap));
  ATTN_RETURN_IF_ERROR(check_options(caps, has_window(args), args.softcap, !args.sinks.empty(), name));
  ATTN_RETURN_IF_ERROR(check_dtype(caps, args.q.dtype, "q.dtype", name));
  ATTN_RETURN_IF_ERROR(check_head_dim(caps, args.q.dtype, d.head_dim, "q.shape[3]", name));
  if (d.len_q > INT_MAX / 2 || d.len_kv > INT_MAX / 2 || d.batch * d.heads_q > 65535 * 64) {
    return invalid_argument(std::string("q.shape: ") + name + " takes sequences < 2^30 and B x Hq <= 4M");
  }
  if (!args.lse.empty() && args.lse.dtype != DType::kFloat32) {
    return invalid_argument("lse: expected float32");
  }
  AttentionProblem p{args.q.data, args.k.data, args.v.data, args.o.data,
                     args.lse.empty() ? nullptr : static_cast<float*>(args.lse.data),
                     static_cast<int>(d.batch), static_cast<int>(d.heads_q), static_cast<int>(d.heads_kv),
                     static_cast<int>(d.len_q), static_cast<int>(d.len_kv), static_cast<int>(d.head_dim),
                     static_cast<int>(d.heads_q / d.heads_kv), args.scale, args.scale * 1.4426950408889634f,
                     args.causal};
  // Windows past the sequence are unbounded: the clamp keeps them in int.
  const auto clamp_window = [&](std::int64_t w) { return w < 0 ? -1 : static_cast<int>(w > d.len_kv + d.len_q ? d.len_kv + d.len_q : w); };
  p.window_left = clamp_window(args.window_left);
  p.window_right = clamp_window(args.window_right);
  p.softcap = args.softcap;
  if (args.softcap > 0.0f) {
    p.cap_pre = args.scale / args.softcap;
    p.cap_log2 = args.softcap * 1.4426950408889634f;
  }
  ATTN_RETURN_IF_ERROR(check_sinks(args.sinks, d.heads_q));
  p.sinks = args.sinks.empty() ? nullptr : static_cast<const float*>(args.sinks.data);
  return p;
}

// The problem for the bf16/fp16 tensor-core rungs (03, 04): one block row of the grid per
// (batch, query head).
inline Result<AttentionProblem> tensor_core_problem(const AttentionArgs& args, const RungCaps& caps, const char* name) {
  ATTN_ASSIGN_OR_RETURN(p, attention_problem(args, caps, name));
  if (static_cast<long long>(p.batch) * p.heads_q > 65535) {
    return invalid_argument(std::string("q.shape: ") + name + " takes B x Hq <= 65535");
  }
  return p;
}

// Normalizes and stores the two output rows (row, row + 8) a thread holds in the m16n8
// accumulator layout of the tensor-core rungs — o[4 j + 2 r + e] is column 8 j + 2 t4 + e of row
// row + 8 r — with their log-sum-exps; m and l are the rows' running max (log2 units) and sum,
// the sum still to be added over the 4 threads of a row.
template <class T, int D>
__device__ __forceinline__ void store_output_rows(const AttentionProblem& p, int b, int h, int row, int t4,
                                                  const float* o, const float (&m)[2], const float (&l)[2]) {
  T* ohead = static_cast<T*>(p.o) + p.q_row(b, h, 0);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int i = row + 8 * r;
    float lr = l[r];
    lr += __shfl_xor_sync(0xffffffffu, lr, 1);
    lr += __shfl_xor_sync(0xffffffffu, lr, 2);
    if (i >= p.len_q) continue;
    const RowEnd end = finish_row(m[r], lr, p.sinks, h);
    const float inv = end.inv;
    T* orow = ohead + static_cast<long long>(i) * D;
#pragma unroll
    for (int j = 0; j < D / 8; ++j)
      *reinterpret_cast<unsigned*>(orow + 8 * j + 2 * t4) =
          mma_sync::pack2<T>(o[4 * j + 2 * r] * inv, o[4 * j + 2 * r + 1] * inv);
    if (p.lse && t4 == 0) {
      p.lse[(static_cast<long long>(b) * p.heads_q + h) * p.len_q + i] = end.lse_log2 * 0.6931471805599453f;
    }
  }
}

inline cudaStream_t attention_stream(Stream& s) { return static_cast<cudaStream_t>(s.cuda_stream()); }

}  // namespace attn::cuda
