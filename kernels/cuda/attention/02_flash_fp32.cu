// attention/02_flash_fp32: FlashAttention's idea on plain CUDA cores. A block owns 32 query rows
// of one head and walks the keys in tiles of 32: K and V tiles are staged in shared memory, the
// scores of a tile live only in registers, and an online softmax (running max and sum, the
// output rescaled when the max grows) replaces the stored S of rung 01. Memory traffic drops
// from O(Sq x Sk) to reading Q, K and V once per 32 query rows, so long sequences stop being
// bound by S. Four threads share a row, each owning every fourth element of the head dim; a
// tile's 32 scores are reduced across the four with shuffles. Causal tiles past the diagonal are
// skipped. exp2 with the scale folded in. float32.
//
// Every head dim of common/head_dims.cuh (a kernel per D): above 128 eight threads share
// a row (16 rows a block) and key tiles are 16 keys, so q, o and the tile's scores stay within
// 128 registers a thread (no spills) and the K/V tiles within 32 KiB of shared memory.
//
// Sliding windows and soft-capping: a block walks only the key tiles between its first row's
// first key and its last row's last key (tiles wholly outside the band are skipped); scores
// outside a row's [first_key, visible_keys) are masked, which covers tiles crossing either edge.
// softcap > 0 turns each score s into softcap * tanh(s / softcap) (in log2 units here).
#include "attention_common.cuh"
#include "attention_rungs.h"

namespace attn::cuda {
namespace {

constexpr int kThreads = 128;

// The block's shape for head dim D.
template <int D>
struct Tiling {
  static constexpr int kLanes = D <= 128 ? 4 : 8;   // threads sharing a query row
  static constexpr int kRows = kThreads / kLanes;  // query rows per block
  static constexpr int kKeys = D <= 128 ? 32 : 16;  // keys per shared-memory tile
  static constexpr int kSlice = D / kLanes;         // head-dim elements per thread
  static_assert(D % 4 == 0 && D % kLanes == 0, "rows are read 4 elements at a time, split over the lanes");
};

template <int D>
__global__ void __launch_bounds__(kThreads) flash_fp32_kernel(AttentionProblem p) {
  using Tl = Tiling<D>;
  constexpr int kLanes = Tl::kLanes, kRows = Tl::kRows, kKeys = Tl::kKeys, kSlice = Tl::kSlice;
  __shared__ __align__(16) float ks[kKeys][D];
  __shared__ __align__(16) float vs[kKeys][D];
  const int bh = blockIdx.y, b = bh / p.heads_q, h = bh % p.heads_q;
  const int row = threadIdx.x / kLanes, lane = threadIdx.x % kLanes;
  const int i0 = blockIdx.x * kRows, i = i0 + row;
  const bool active = i < p.len_q;

  float q[kSlice], o[kSlice];
  const float* qrow = static_cast<const float*>(p.q) + p.q_row(b, h, active ? i : 0);
#pragma unroll
  for (int c = 0; c < kSlice; ++c) {
    q[c] = active ? qrow[lane + c * kLanes] * p.scale_log2 : 0.0f;  // scores come out in log2 units
    o[c] = 0.0f;
  }
  float m = -INFINITY, l = 0.0f;
  // Keys [first, visible) are this row's (causal, window); an inactive row sees none.
  const int visible = active ? p.visible_keys(i) : 0;
  const int first = active ? p.first_key(i) : 0;
  // The band any row of this block sees: from the first row's first key to the last row's last
  // key (both grow with the row); tiles outside it are skipped.
  const int last_row = min(i0 + kRows, p.len_q) - 1;
  const int block_begin = p.first_key(i0) / kKeys * kKeys, block_end = p.visible_keys(last_row);
  // Soft-capping in log2 units: s2 = s * log2(e) becomes cap * log2(e) * tanh(s2 / (cap * log2(e))).
  const bool capped = p.softcap > 0.0f;
  const float cap2 = p.softcap * 1.4426950408889634f, inv_cap2 = capped ? 1.0f / cap2 : 0.0f;
  const float* kbase = static_cast<const float*>(p.k) + p.kv_row(b, h, 0);
  const float* vbase = static_cast<const float*>(p.v) + p.kv_row(b, h, 0);

  for (int j0 = block_begin; j0 < block_end; j0 += kKeys) {
    __syncthreads();  // the previous tile is no longer read
    for (int idx = threadIdx.x; idx < kKeys * D / 4; idx += kThreads) {
      const int r = idx / (D / 4), c4 = (idx % (D / 4)) * 4;
      const bool in = j0 + r < p.len_kv;
      const float4 zero = make_float4(0.f, 0.f, 0.f, 0.f);
      *reinterpret_cast<float4*>(&ks[r][c4]) =
          in ? *reinterpret_cast<const float4*>(kbase + static_cast<long long>(j0 + r) * D + c4) : zero;
      *reinterpret_cast<float4*>(&vs[r][c4]) =
          in ? *reinterpret_cast<const float4*>(vbase + static_cast<long long>(j0 + r) * D + c4) : zero;
    }
    __syncthreads();
    float s[kKeys];
    float tile_max = -INFINITY;
#pragma unroll
    for (int jj = 0; jj < kKeys; ++jj) {
      float part = 0.0f;
#pragma unroll
      for (int c = 0; c < kSlice; ++c) part += q[c] * ks[jj][lane + c * kLanes];
#pragma unroll
      for (int off = 1; off < kLanes; off <<= 1) part += __shfl_xor_sync(0xffffffffu, part, off);
      if (capped) part = cap2 * soft_tanh(part * inv_cap2);  // tanhf is tanh.approx under fast math
      const int j = j0 + jj;
      s[jj] = j >= first && j < visible ? part : -INFINITY;  // masks tiles crossing either edge
      tile_max = fmaxf(tile_max, s[jj]);
    }
    const float m_new = fmaxf(m, tile_max);
    if (m_new == -INFINITY) continue;  // nothing visible yet for this row
    const float alpha = exp2f(m - m_new);
    l *= alpha;
#pragma unroll
    for (int c = 0; c < kSlice; ++c) o[c] *= alpha;
#pragma unroll
    for (int jj = 0; jj < kKeys; ++jj) {
      const float pj = exp2f(s[jj] - m_new);
      l += pj;
#pragma unroll
      for (int c = 0; c < kSlice; ++c) o[c] += pj * vs[jj][lane + c * kLanes];
    }
    m = m_new;
  }
  if (!active) return;
  const RowEnd end = finish_row(m, l, p.sinks, h);
  float* orow = static_cast<float*>(p.o) + p.q_row(b, h, i);
#pragma unroll
  for (int c = 0; c < kSlice; ++c) orow[lane + c * kLanes] = o[c] * end.inv;
  if (p.lse && lane == 0)
    p.lse[(static_cast<long long>(b) * p.heads_q + h) * p.len_q + i] = end.lse_log2 * 0.6931471805599453f;
}

constexpr const char* kName = "attention/02_flash_fp32";

Result<AttentionProblem> problem_02(const AttentionArgs& args) {
  return attention_problem(args, kAttention02Caps, kName);
}

template <int D>
void launch(const AttentionProblem& p, cudaStream_t s) {
  const dim3 grid((p.len_q + Tiling<D>::kRows - 1) / Tiling<D>::kRows, p.batch * p.heads_q);
  flash_fp32_kernel<D><<<grid, kThreads, 0, s>>>(p);
}

}  // namespace

Status attention_02_supports(const AttentionArgs& args) {
  ATTN_ASSIGN_OR_RETURN(p, problem_02(args));
  if (static_cast<long long>(p.batch) * p.heads_q > 65535) {
    return invalid_argument("q.shape: attention/02_flash_fp32 takes B x Hq <= 65535");
  }
  return Status::Ok();
}

Status attention_02_flash_fp32(const AttentionArgs& args, Stream& stream) {
  ATTN_RETURN_IF_ERROR(attention_02_supports(args));
  ATTN_ASSIGN_OR_RETURN(p, problem_02(args));
  const cudaStream_t s = attention_stream(stream);
  with_head_dim<kAttention02Caps.head_dims>(p.head_dim, [&](auto d) { launch<decltype(d)::value>(p, s); });
  return to_status(cudaGetLastError(), "attention/02_flash_fp32 launch");
}

}  // namespace attn::cuda
