// The simple correct kernel of both KV-cache ladders (paged_decode/01_block_per_head and
// paged_prefill/00_block_per_row): a block per (new row, kv head, slice of up to G query heads
// of its group) walks the keys the row sees, page by page, on CUDA cores. It takes everything
// the ops define: every dtype and head dim, any group (slices of G heads; a group of 7 runs as one
// slice of 8 with the eighth head idle), windows, soft caps and sinks. Prefill re-reads the
// sequence's keys once per new token: correct, not fast.
// - Lanes split a key's head dim in 16-byte pieces (a power of two of lanes, up to 32, each lane
//   taking every kLanes-th piece), so a warp reads whole rows coalesced; the block's streams take
//   keys round-robin, each keeping a running max, sum and output per query head, merged in shared
//   memory at the end.
#pragma once

#include "paged_common.cuh"

namespace attn::cuda::paged_rows {

constexpr int kThreads = 128;

constexpr int pow2_at_least(int x) {
  int p = 1;
  while (p < x) p *= 2;
  return p;
}

// Heads a block serves for a group: the group up to 4 heads, else slices of 8.
inline int slice_heads(int group) { return group <= 1 ? 1 : group <= 2 ? 2 : group <= 4 ? 4 : 8; }

template <class T, int D, int G>
__global__ void __launch_bounds__(kThreads) rows_kernel(PagedProblem p) {
  constexpr int kVec = 16 / sizeof(T), kVecs = D / kVec;
  constexpr int kLanes = pow2_at_least(kVecs) < 32 ? pow2_at_least(kVecs) : 32;
  constexpr int kPer = (kVecs + kLanes - 1) / kLanes, kStreams = kThreads / kLanes;
  static_assert(D % kVec == 0 && 32 % kLanes == 0);
  __shared__ float qs[G][D];
  __shared__ float staged[kStreams][G][D];
  __shared__ float red_m[kStreams][G], red_l[kStreams][G];

  const int t = blockIdx.x;  // the new row
  const int slices = (p.group + G - 1) / G, hkv = blockIdx.y / slices, slice = blockIdx.y % slices;
  const int h0 = hkv * p.group + slice * G, count = min(G, p.group - slice * G);
  // The sequence of new row t: the last i with first_new(i) <= t.
  int i = t;
  if (p.q_indptr) {
    int lo = 0, hi = p.n - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (__ldg(p.q_indptr + mid) <= t) lo = mid;
      else hi = mid - 1;
    }
    i = lo;
  }
  const int len = p.seq_len(i);
  const int2 keys = p.visible(len, p.new_count(i), t - p.first_new(i));
  const int* pages = p.page_indices + __ldg(p.page_indptr + i);
  for (int idx = threadIdx.x; idx < G * D; idx += kThreads) {
    const int g = idx / D, c = idx % D;
    qs[g][c] = g < count ? to_float(static_cast<const T*>(p.q)[(static_cast<long long>(t) * p.heads_q + h0 + g) * D + c])
                         : 0.0f;
  }
  __syncthreads();
  const int lane = threadIdx.x % kLanes, stream = threadIdx.x / kLanes;
  const ScoreMap score = p.score_map();
  float q[G][kPer][kVec], o[G][kPer][kVec], m[G], l[G];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    m[g] = -INFINITY, l[g] = 0.0f;
#pragma unroll
    for (int v = 0; v < kPer; ++v)
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        const int c = (v * kLanes + lane) * kVec + e;
        q[g][v][e] = c < D ? qs[g][c] : 0.0f, o[g][v][e] = 0.0f;
      }
  }
  const T* kpool = static_cast<const T*>(p.k_pool);
  const T* vpool = static_cast<const T*>(p.v_pool);
  // Every thread runs the same number of iterations, so the shuffles see whole warps.
  for (int j0 = keys.x; j0 < keys.y; j0 += kStreams) {
    const int j = j0 + stream;
    const bool valid = j < keys.y;
    const long long row = p.key_offset(pages, i, hkv, valid ? j : keys.y - 1);
    float kf[kPer][kVec], vf[kPer][kVec];
#pragma unroll
    for (int v = 0; v < kPer; ++v) {
      const int vec = v * kLanes + lane;
      if (vec < kVecs) {
        unpack16<T>(*reinterpret_cast<const uint4*>(kpool + row + vec * kVec), kf[v]);
        unpack16<T>(*reinterpret_cast<const uint4*>(vpool + row + vec * kVec), vf[v]);
      } else {
#pragma unroll
        for (int e = 0; e < kVec; ++e) kf[v][e] = vf[v][e] = 0.0f;
      }
    }
    float s[G];
#pragma unroll
    for (int g = 0; g < G; ++g) {
      float dot = 0.0f;
#pragma unroll
      for (int v = 0; v < kPer; ++v)
#pragma unroll
        for (int e = 0; e < kVec; ++e) dot += q[g][v][e] * kf[v][e];
      s[g] = dot;
    }
#pragma unroll
    for (int off = kLanes / 2; off > 0; off >>= 1)
#pragma unroll
      for (int g = 0; g < G; ++g) s[g] += __shfl_xor_sync(0xffffffffu, s[g], off);
    if (!valid) continue;
#pragma unroll
    for (int g = 0; g < G; ++g) {
      const float x = score(s[g]);
      const float m_new = fmaxf(m[g], x);
      const float alpha = exp2f(m[g] - m_new), pj = exp2f(x - m_new);  // alpha = 0 on the first key
      l[g] = l[g] * alpha + pj;
#pragma unroll
      for (int v = 0; v < kPer; ++v)
#pragma unroll
        for (int e = 0; e < kVec; ++e) o[g][v][e] = o[g][v][e] * alpha + pj * vf[v][e];
      m[g] = m_new;
    }
  }
  if (lane == 0)
#pragma unroll
    for (int g = 0; g < G; ++g) red_m[stream][g] = m[g], red_l[stream][g] = l[g];
#pragma unroll
  for (int g = 0; g < G; ++g)
#pragma unroll
    for (int v = 0; v < kPer; ++v)
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        const int c = (v * kLanes + lane) * kVec + e;
        if (c < D) staged[stream][g][c] = o[g][v][e];
      }
  __syncthreads();
  for (int idx = threadIdx.x; idx < count * D; idx += kThreads) {
    const int g = idx / D, c = idx % D;
    float mb = -INFINITY, lb = 0.0f, acc = 0.0f;
    for (int s = 0; s < kStreams; ++s) mb = fmaxf(mb, red_m[s][g]);
    for (int s = 0; s < kStreams; ++s)
      if (red_m[s][g] != -INFINITY) {
        const float w = exp2f(red_m[s][g] - mb);
        lb += red_l[s][g] * w;
        acc += staged[s][g][c] * w;
      }
    const long long orow = static_cast<long long>(t) * p.heads_q + h0 + g;
    const RowEnd end = finish_row(mb, lb, p.sinks, h0 + g);
    static_cast<T*>(p.o)[orow * D + c] = from_float<T>(acc * end.inv);
    if (p.lse && c == 0) p.lse[orow] = end.lse_log2 * 0.6931471805599453f;
  }
}

// Appends the new rows, then runs the kernel over every new row.
template <class T, int D>
Status launch(const PagedProblem& p, cudaStream_t s, const char* name) {
  ATTN_RETURN_IF_ERROR(launch_paged_append<T>(p, {}, s, name));
  const int g = slice_heads(p.group), slices = (p.group + g - 1) / g;
  if (static_cast<long long>(p.heads_kv) * slices > 65535)
    return invalid_argument(std::string("q.shape: ") + name + " takes Hq / 8 <= 65535");
  void (*kernel)(PagedProblem) = g == 1   ? rows_kernel<T, D, 1>
                                 : g == 2 ? rows_kernel<T, D, 2>
                                 : g == 4 ? rows_kernel<T, D, 4>
                                          : rows_kernel<T, D, 8>;
  if (p.tokens > 0) kernel<<<dim3(p.tokens, p.heads_kv * slices), kThreads, 0, s>>>(p);
  return to_status(cudaGetLastError(), name);
}

// The kernel for the cache's dtype and head dim (kHeadDims: every one of head_dims.cuh).
template <class Args>
Status dispatch(const Args& a, const PagedProblem& p, Stream& stream, const char* name) {
  const cudaStream_t s = paged_stream(stream);
  const auto by_dim = [&](auto tag) -> Status {
    using T = decltype(tag);
    return with_head_dim<kAllHeadDims>(p.head_dim, [&](auto d) { return launch<T, decltype(d)::value>(p, s, name); });
  };
  switch (a.cache.dtype) {
    case DType::kFloat32: return by_dim(float{});
    case DType::kBFloat16: return by_dim(__nv_bfloat16{});
    case DType::kFloat16: return by_dim(__half{});
    default: return invalid_argument("q.dtype: unexpected");
  }
}

}  // namespace attn::cuda::paged_rows
