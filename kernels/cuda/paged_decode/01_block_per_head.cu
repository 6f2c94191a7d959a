// paged_decode/01_block_per_head: the simple correct rung. One launch appends every sequence's
// new K/V row to its page; then a block per (sequence, key/value head) walks the sequence's pages
// in token order for every query head of its GQA group (each K/V row is read once per group).
// - Lanes split a key's head dim in 16-byte pieces (D / 8 lanes for 16-bit types), so a warp
//   reads whole rows coalesced; the block's warps take keys round-robin, each stream keeping a
//   running max, sum and output per query head, merged in shared memory at the end.
// - No pipelining and no split of long sequences: a batch of few long sequences leaves most SMs
//   idle, and each load waits for the page table read before it. Rung 02 fixes both.
// float32, bfloat16, float16; head dims 64, 128 (and 256 for 16-bit types); 1, 2, 4 or 8 query
// heads per key/value head; any page size.
#include "../common/paged_common.cuh"
#include "paged_decode_rungs.h"

namespace attn::cuda {
namespace {

constexpr int kThreads = 128;

template <class T, int D, int G>
__global__ void __launch_bounds__(kThreads) block_per_head_kernel(PagedProblem p) {
  constexpr int kVec = 16 / sizeof(T), kLanes = D / kVec, kStreams = kThreads / kLanes;
  static_assert(kLanes <= 32 && 32 % kLanes == 0);
  __shared__ float qs[G][D];
  __shared__ float staged[kStreams][G][D];
  __shared__ float red_m[kStreams][G], red_l[kStreams][G];

  const int i = blockIdx.x, hkv = blockIdx.y, h0 = hkv * G;
  const int len = p.seq_lens[i];
  const int* pages = p.page_indices + p.page_indptr[i];
  for (int idx = threadIdx.x; idx < G * D; idx += kThreads) {
    const int g = idx / D, c = idx % D;
    qs[g][c] = to_float(static_cast<const T*>(
                   p.q)[(static_cast<long long>(i) * p.heads_q + h0 + g) * D + c]) *
               p.scale_log2;
  }
  __syncthreads();
  const int lane = threadIdx.x % kLanes, stream = threadIdx.x / kLanes;
  float q[G][kVec], o[G][kVec], m[G], l[G];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    m[g] = -INFINITY, l[g] = 0.0f;
#pragma unroll
    for (int e = 0; e < kVec; ++e) q[g][e] = qs[g][lane * kVec + e], o[g][e] = 0.0f;
  }
  const T* kpool = static_cast<const T*>(p.k_pool);
  const T* vpool = static_cast<const T*>(p.v_pool);
  // Every thread runs the same number of iterations, so the shuffles see whole warps.
  for (int j0 = 0; j0 < len; j0 += kStreams) {
    const int j = j0 + stream;
    const bool valid = j < len;
    const int jj = valid ? j : len - 1;
    const long long row =
        p.pool_offset(pages[jj / p.page_size], hkv, jj % p.page_size) + lane * kVec;
    float kf[kVec], vf[kVec];
    unpack16<T>(*reinterpret_cast<const uint4*>(kpool + row), kf);
    unpack16<T>(*reinterpret_cast<const uint4*>(vpool + row), vf);
    float s[G];
#pragma unroll
    for (int g = 0; g < G; ++g) {
      float dot = 0.0f;
#pragma unroll
      for (int e = 0; e < kVec; ++e) dot += q[g][e] * kf[e];
      s[g] = dot;
    }
#pragma unroll
    for (int off = kLanes / 2; off > 0; off >>= 1)
#pragma unroll
      for (int g = 0; g < G; ++g) s[g] += __shfl_xor_sync(0xffffffffu, s[g], off);
    if (!valid) continue;
#pragma unroll
    for (int g = 0; g < G; ++g) {
      const float m_new = fmaxf(m[g], s[g]);
      const float alpha = exp2f(m[g] - m_new),
                  pj = exp2f(s[g] - m_new);  // alpha = 0 on the first key
      l[g] = l[g] * alpha + pj;
#pragma unroll
      for (int e = 0; e < kVec; ++e) o[g][e] = o[g][e] * alpha + pj * vf[e];
      m[g] = m_new;
    }
  }
  if (lane == 0)
#pragma unroll
    for (int g = 0; g < G; ++g) red_m[stream][g] = m[g], red_l[stream][g] = l[g];
#pragma unroll
  for (int g = 0; g < G; ++g)
#pragma unroll
    for (int e = 0; e < kVec; ++e) staged[stream][g][lane * kVec + e] = o[g][e];
  __syncthreads();
  for (int idx = threadIdx.x; idx < G * D; idx += kThreads) {
    const int g = idx / D, c = idx % D;
    float mb = -INFINITY, lb = 0.0f, acc = 0.0f;
    for (int s = 0; s < kStreams; ++s) mb = fmaxf(mb, red_m[s][g]);
    for (int s = 0; s < kStreams; ++s)
      if (red_m[s][g] != -INFINITY) {
        const float w = exp2f(red_m[s][g] - mb);
        lb += red_l[s][g] * w;
        acc += staged[s][g][c] * w;
      }
    const long long row = static_cast<long long>(i) * p.heads_q + h0 + g;
    static_cast<T*>(p.o)[row * D + c] = from_float<T>(acc / lb);  // every sequence has >= 1 key
    if (p.lse && c == 0) p.lse[row] = (mb + log2f(lb)) * 0.6931471805599453f;
  }
}

template <class T, int D>
Status launch(const PagedProblem& p, cudaStream_t s) {
  ATTN_RETURN_IF_ERROR(launch_paged_append<T>(p, {}, s, "paged_decode/01 append"));
  void (*kernel)(PagedProblem) = p.group == 1   ? block_per_head_kernel<T, D, 1>
                                 : p.group == 2 ? block_per_head_kernel<T, D, 2>
                                 : p.group == 4 ? block_per_head_kernel<T, D, 4>
                                                : block_per_head_kernel<T, D, 8>;
  kernel<<<dim3(p.n, p.heads_kv), kThreads, 0, s>>>(p);
  return to_status(cudaGetLastError(), "paged_decode/01_block_per_head launch");
}

Result<PagedProblem> problem(const PagedDecodeArgs& a) {
  ATTN_ASSIGN_OR_RETURN(
      p, paged_problem(a, {}, kPagedDecode01Caps, "paged_decode/01_block_per_head"));
  return p;
}

}  // namespace

Status paged_decode_01_supports(const PagedDecodeArgs& args) { return problem(args).status(); }

Status paged_decode_01_block_per_head(const PagedDecodeArgs& args, Stream& stream) {
  ATTN_ASSIGN_OR_RETURN(p, problem(args));
  const cudaStream_t s = paged_stream(stream);
  const auto by_dim = [&](auto tag) -> Status {
    using T = decltype(tag);
    const auto run = [&](auto d) { return launch<T, decltype(d)::value>(p, s); };
    if constexpr (sizeof(T) == 2) return with_head_dim<kPagedDecode01Caps.head_dims>(p.head_dim, run);
    else return with_head_dim<kPagedDecode01Caps.float32_head_dims>(p.head_dim, run);
  };
  switch (args.cache.dtype) {
    case DType::kFloat32: return by_dim(float{});
    case DType::kBFloat16: return by_dim(__nv_bfloat16{});
    case DType::kFloat16: return by_dim(__half{});
    default: return invalid_argument("q.dtype: unexpected");
  }
}

}  // namespace attn::cuda
