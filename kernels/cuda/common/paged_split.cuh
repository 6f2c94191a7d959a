// Split-KV over a ragged batch, shared by the paged decode rungs 02 and 03: the host plans one
// chunk length, the append launch writes each sequence's first chunk index (a scan) and zeroes
// the merge counters, the attention kernel runs a block per (chunk, kv head), and the last block
// of a (sequence, kv head) to finish merges its chunks' partials by their log-sum-exps.
#pragma once

#include <algorithm>

#include "paged_common.cuh"

namespace attn::cuda {

struct SplitPartials {
  const int* chunk_indptr;  // [n + 1], written by the append launch
  int* finished;            // [n * Hkv], zeroed by the append launch
  float* o;                 // [chunks][Hq][D], unnormalized
  float* m;                 // [chunks][Hq], log2 units
  float* l;                 // [chunks][Hq]
  int chunk;                // keys per chunk
};

// Called by every thread of a block that has written its partial (o, m, l rows x * Hq + h0 ..
// + group) of chunk x of sequence i: the last block of the (sequence, kv head) to get here merges
// all `chunks` partials from chunk x0 on into o (and lse). `smem` holds group x chunks floats.
template <class T, int D, int kThreads>
__device__ __forceinline__ void merge_chunks_if_last(const PagedProblem& p, const SplitPartials& sp,
                                                     int i, int hkv, int x0, int chunks,
                                                     float* smem, bool& last_block) {
  const int h0 = hkv * p.group, group = p.group;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last_block = atomicAdd(&sp.finished[i * p.heads_kv + hkv], 1) == chunks - 1;
  __syncthreads();
  if (!last_block) return;
  __threadfence();
  const long long row0 = static_cast<long long>(i) * p.heads_q + h0;
  float* weights = smem;  // [group][chunks]
  const int warp = threadIdx.x / 32, wl = threadIdx.x % 32;
  for (int g = warp; g < group; g += kThreads / 32) {
    float mx = -INFINITY;
    for (int s = wl; s < chunks; s += 32)
      mx = fmaxf(mx, __ldcg(sp.m + static_cast<long long>(x0 + s) * p.heads_q + h0 + g));
    mx = warp_max(mx);
    float total = 0.0f;
    for (int s = wl; s < chunks; s += 32) {
      const long long prow = static_cast<long long>(x0 + s) * p.heads_q + h0 + g;
      const float w = exp2f(__ldcg(sp.m + prow) - mx);  // every chunk has >= 1 key: m finite
      weights[g * chunks + s] = w;
      total += __ldcg(sp.l + prow) * w;
    }
    total = warp_sum(total);
    for (int s = wl; s < chunks; s += 32) weights[g * chunks + s] /= total;
    if (p.lse && wl == 0) p.lse[row0 + g] = (mx + log2f(total)) * 0.6931471805599453f;
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < group * D / 4; idx += kThreads) {
    const int g = idx / (D / 4), c = idx % (D / 4) * 4;
    const float* w = weights + g * chunks;
    const float4* po = reinterpret_cast<const float4*>(
        sp.o + (static_cast<long long>(x0) * p.heads_q + h0 + g) * D + c);
    const long long stride = static_cast<long long>(p.heads_q) * D / 4;
    float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll 16
    for (int s = 0; s < chunks; ++s) {  // unrolled: 16 independent loads in flight, not one
      const float4 v = __ldcg(po + s * stride);
      acc.x += v.x * w[s], acc.y += v.y * w[s], acc.z += v.z * w[s], acc.w += v.w * w[s];
    }
    T* out = static_cast<T*>(p.o) + (row0 + g) * D + c;
    out[0] = from_float<T>(acc.x), out[1] = from_float<T>(acc.y), out[2] = from_float<T>(acc.z),
    out[3] = from_float<T>(acc.w);
  }
}

// Keys [first, last) of chunk c of a sequence of `len` keys in `chunks` chunks: the sequence's
// chunks are equal (rounded up to `granule` keys) rather than `chunk` keys and a short last one,
// so the items of one sequence take equal time. Never empty: the planned chunk length C is a
// multiple of the granule and chunks = ceil(len / C), so (chunks - 1) x per < len.
__device__ __forceinline__ int2 chunk_keys(int len, int chunks, int c, int granule) {
  const int per = ((len + chunks - 1) / chunks + granule - 1) / granule * granule;
  const int first = c * per;
  return make_int2(first, min(len, first + per));
}

// The chunk length: about `waves` waves of `resident` blocks over all (sequence, kv head) pairs,
// no chunk under `min_chunk` keys, at most `max_chunks` chunks per sequence (the merge's weights),
// a multiple of `granule` keys.
inline int plan_split_chunk(const PagedSequences& seqs, std::int64_t heads_kv, int resident,
                            int waves, int min_chunk, int max_chunks, int granule) {
  long long keys = 0;
  for (std::int64_t i = 0; i < seqs.count(); ++i) keys += seqs.seq_lens_host[i];
  const long long items = std::max<long long>(1, static_cast<long long>(resident) * waves);
  long long chunk = (keys * heads_kv + items - 1) / items;
  chunk = std::max<long long>(chunk, min_chunk);
  chunk = std::max<long long>(chunk, (seqs.max_seq_len + max_chunks - 1) / max_chunks);
  return static_cast<int>((chunk + granule - 1) / granule * granule);
}

// Plans, allocates the workspace, appends (with the scan and the zeroing), then calls
// launch(total_chunks, partials) to launch the attention kernel; frees the workspace in stream
// order.
template <class T, int D, class Launch>
Status run_split(const PagedSequences& seqs, const PagedProblem& p, int chunk, cudaStream_t s,
                 const char* name, Launch&& launch) {
  long long total_chunks = 0;
  for (int i = 0; i < p.n; ++i) total_chunks += (seqs.seq_lens_host[i] + chunk - 1) / chunk;
  if (total_chunks > INT_MAX / 2)
    return invalid_argument(std::string("seq_lens: ") + name + " takes < 2^30 chunks");
  const std::size_t ints =
      static_cast<std::size_t>(p.n + 1) + static_cast<std::size_t>(p.n) * p.heads_kv;
  const std::size_t head_bytes = (ints * sizeof(int) + 255) / 256 * 256;
  const std::size_t rows = static_cast<std::size_t>(total_chunks) * p.heads_q;
  const std::size_t o_bytes = rows * D * sizeof(float),
                    ml_bytes = (rows * sizeof(float) + 255) / 256 * 256;
  char* ws = nullptr;
  ATTN_RETURN_IF_ERROR(
      to_status(cudaMallocAsync(&ws, head_bytes + o_bytes + 2 * ml_bytes, s), name));
  SplitPartials sp{};
  int* ints_base = reinterpret_cast<int*>(ws);
  sp.chunk_indptr = ints_base;
  sp.finished = ints_base + p.n + 1;
  sp.o = reinterpret_cast<float*>(ws + head_bytes);
  sp.m = reinterpret_cast<float*>(ws + head_bytes + o_bytes);
  sp.l = reinterpret_cast<float*>(ws + head_bytes + o_bytes + ml_bytes);
  sp.chunk = chunk;
  PagedPrep prep;
  prep.tile_indptr = ints_base;
  prep.per_tile = chunk;
  prep.zeroed = sp.finished;
  prep.zero_count = p.n * p.heads_kv;
  const Status st = launch_paged_append<T>(p, prep, s, name);
  if (st.ok()) launch(static_cast<int>(total_chunks), sp);
  const Status launched = st.ok() ? to_status(cudaGetLastError(), name) : st;
  cudaFreeAsync(ws, s);
  return launched;
}

}  // namespace attn::cuda
