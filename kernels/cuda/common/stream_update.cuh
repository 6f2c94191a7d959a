// One stage of the CUDA-core split-KV decode (attention/decode_split_kv, paged_decode/02): a key
// stream's online-softmax update over the keys of a shared-memory stage, for the G query heads of
// a GQA group.
// A stream is kLanes lanes sharing each key row (kVec elements a lane, the row's 16-byte pieces);
// it takes kUnroll keys of the stage, the keys j, j + stride, ... . The scores of the kUnroll
// keys come first (independent chains: the dot products and shuffles overlap), then one max and
// one rescale per query head, then kUnroll updates. Keys from k_end on (stale rows of the stage)
// are masked. q: the lane's slice of the query rows, in log2 units; m, l, o: the stream's running
// max (log2 units), sum and output slice.
#pragma once

#include <cuda_runtime.h>

namespace attn::cuda {

// load_k(u, f) / load_v(u, f): the lane's kVec elements of key u's K / V row, as floats.
template <int kUnroll, int G, int kVec, int kLanes, class LoadK, class LoadV>
__device__ __forceinline__ void stream_update(const float (&q)[G][kVec], int j, int stride, int k_end,
                                              float (&m)[G], float (&l)[G], float (&o)[G][kVec],
                                              LoadK&& load_k, LoadV&& load_v) {
  float sc[kUnroll][G];
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    float kf[kVec];
    load_k(u, kf);
#pragma unroll
    for (int g = 0; g < G; ++g) {
      float dot = 0.0f;
#pragma unroll
      for (int e = 0; e < kVec; ++e) dot += q[g][e] * kf[e];
      sc[u][g] = dot;
    }
  }
#pragma unroll
  for (int off = kLanes / 2; off > 0; off >>= 1)
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
#pragma unroll
      for (int g = 0; g < G; ++g) sc[u][g] += __shfl_xor_sync(0xffffffffu, sc[u][g], off);
  bool valid[kUnroll];
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    valid[u] = j + u * stride < k_end;  // rows past the keys hold stale data
    if (!valid[u])
#pragma unroll
      for (int g = 0; g < G; ++g) sc[u][g] = -INFINITY;
  }
#pragma unroll
  for (int g = 0; g < G; ++g) {
    float m_new = m[g];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) m_new = fmaxf(m_new, sc[u][g]);
    if (m_new == -INFINITY) continue;  // nothing in this stream yet
    const float alpha = exp2f(m[g] - m_new);
    l[g] *= alpha;
#pragma unroll
    for (int e = 0; e < kVec; ++e) o[g][e] *= alpha;
    m[g] = m_new;
  }
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    if (!valid[u]) continue;
    float vf[kVec];
    load_v(u, vf);
#pragma unroll
    for (int g = 0; g < G; ++g) {
      const float pj = exp2f(sc[u][g] - m[g]);
      l[g] += pj;
#pragma unroll
      for (int e = 0; e < kVec; ++e) o[g][e] += pj * vf[e];
    }
  }
}

}  // namespace attn::cuda
