// Split-KV over a ragged batch, shared by the paged decode rungs 02 and 03: the host plans one
// chunk length, the append launch writes each sequence's first chunk index (a scan) and zeroes
// the merge counters, the attention kernel runs a block per (chunk, kv head), and the last block
// of a (sequence, kv head) to finish merges its chunks' partials by their log-sum-exps.
#pragma once

#include <algorithm>
#include <vector>

#include "paged_common.cuh"

namespace attn::cuda {

struct SplitPartials {
  const int* chunk_indptr;  // [n + 1], written by the append launch
  int* finished;            // [n * units], zeroed by the append launch
  float* o;                 // [chunks][Hq][D], unnormalized
  float* m;                 // [chunks][Hq], log2 units
  float* l;                 // [chunks][Hq]
  int chunk;                // keys per chunk
};

// Called by every thread of a block that has written its partial (o, m, l rows x * Hq + h0 ..
// + group) of chunk x of sequence i for unit `unit` of `units` (a kv head, or a slice of its
// group's query heads): the last block of the (sequence, unit) to get here merges all `chunks`
// partials from chunk x0 on into o (and lse), the sinks joining. `smem` holds group x chunks
// floats.
template <class T, int D, int kThreads>
__device__ __forceinline__ void merge_chunks_if_last(const PagedProblem& p, const SplitPartials& sp,
                                                     int i, int unit, int units, int h0, int group,
                                                     int x0, int chunks, float* smem,
                                                     bool& last_block) {
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last_block = atomicAdd(&sp.finished[i * units + unit], 1) == chunks - 1;
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
    // The sink joins as one more partial of weight e^sink and no output.
    const float sink = p.sinks ? __ldg(p.sinks + h0 + g) * 1.4426950408889634f : -INFINITY;
    mx = fmaxf(mx, sink);
    float total = 0.0f;
    for (int s = wl; s < chunks; s += 32) {
      const long long prow = static_cast<long long>(x0 + s) * p.heads_q + h0 + g;
      const float w = exp2f(__ldcg(sp.m + prow) - mx);  // every chunk has >= 1 key: m finite
      weights[g * chunks + s] = w;
      total += __ldcg(sp.l + prow) * w;
    }
    total = warp_sum(total);
    if (p.sinks) total += exp2f(sink - mx);
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

// How a call's sequences are cut into chunks: `chunk` keys each, or (merged calls) each
// sequence's first chunk, built on the host.
struct SplitPlan {
  int chunk = 0;
  std::vector<std::int32_t> chunk_indptr;  // [n + 1] when the calls' chunk lengths differ
  long long total_chunks = 0;              // over every sequence
};

// The chunk length for sequences [first, last): about `waves` waves of `resident` blocks over all
// their (sequence, kv head) pairs, no chunk under `min_chunk` keys (a block must stream long
// enough to hide its start), at most `max_chunks` chunks per sequence (the merge's weights), a
// multiple of `granule` keys.
inline int balanced_chunk(const std::int32_t* lens, std::int64_t first, std::int64_t last,
                          std::int64_t heads_kv, int resident, int waves, int min_chunk,
                          int max_chunks, int granule) {
  long long keys = 0, longest = 0;
  for (std::int64_t i = first; i < last; ++i) {
    keys += lens[i];
    longest = std::max<long long>(longest, lens[i]);
  }
  const long long items = std::max<long long>(1, static_cast<long long>(resident) * waves);
  long long chunk = (keys * heads_kv + items - 1) / items;
  chunk = std::max<long long>(chunk, min_chunk);
  chunk = std::max<long long>(chunk, (longest + max_chunks - 1) / max_chunks);
  return static_cast<int>((chunk + granule - 1) / granule * granule);
}

// The keys a decode call reads of each sequence: its length, or the last window_left + 1 keys.
inline std::vector<std::int32_t> decode_key_counts(const PagedDecodeArgs& a) {
  const std::int64_t n = a.seqs.count(), w = a.mask.window_left;
  std::vector<std::int32_t> keys(a.seqs.seq_lens_host, a.seqs.seq_lens_host + n);
  if (w >= 0)
    for (auto& k : keys) k = static_cast<std::int32_t>(std::min<std::int64_t>(k, w + 1));
  return keys;
}

// The plan of a call, or of merged calls: each call's sequences cut as that call alone would be.
// `heads_kv`: the blocks a chunk of a sequence takes (kv heads x slices of their groups).
inline SplitPlan plan_split(const PagedDecodeArgs& a, std::int64_t heads_kv, int resident,
                            int waves, int min_chunk, int max_chunks, int granule) {
  const std::vector<std::int32_t> counts = decode_key_counts(a);
  const std::int32_t* lens = counts.data();
  const std::int64_t n = a.seqs.count();
  SplitPlan plan;
  if (!a.merged_calls_host || a.merged_calls <= 1) {
    plan.chunk =
        balanced_chunk(lens, 0, n, heads_kv, resident, waves, min_chunk, max_chunks, granule);
    for (const std::int32_t keys : counts) plan.total_chunks += (keys + plan.chunk - 1) / plan.chunk;
    return plan;
  }
  plan.chunk_indptr.reserve(static_cast<std::size_t>(n) + 1);
  plan.chunk_indptr.push_back(0);
  for (std::int64_t c = 0; c < a.merged_calls; ++c) {
    const std::int64_t first = a.merged_calls_host[c], last = a.merged_calls_host[c + 1];
    const int chunk = balanced_chunk(lens, first, last, heads_kv, resident, waves, min_chunk,
                                     max_chunks, granule);
    for (std::int64_t i = first; i < last; ++i)
      plan.chunk_indptr.push_back(plan.chunk_indptr.back() + (lens[i] + chunk - 1) / chunk);
  }
  plan.total_chunks = plan.chunk_indptr.back();
  return plan;
}

// Plans, allocates the workspace, appends (with the scan and the zeroing), then calls
// launch(total_chunks, partials) to launch the attention kernel; frees the workspace in stream
// order.
// `units`: blocks per chunk (kv heads x slices of their groups).
template <class T, int D, class Launch>
Status run_split(const PagedProblem& p, const SplitPlan& plan, int units,
                 cudaStream_t s, const char* name, Launch&& launch) {
  const long long total_chunks = plan.total_chunks;
  if (total_chunks > INT_MAX / 2 / units)
    return invalid_argument(std::string("seq_lens: ") + name + " takes < 2^30 chunks");
  const std::size_t ints =
      static_cast<std::size_t>(p.n + 1) + static_cast<std::size_t>(p.n) * units;
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
  sp.chunk = plan.chunk;
  PagedPrep prep;
  if (plan.chunk_indptr.empty()) {  // the append launch's scan writes it
    prep.tile_indptr = ints_base;
    prep.per_tile = plan.chunk;
  }
  prep.zeroed = sp.finished;
  prep.zero_count = p.n * units;
  // Merged calls' chunk offsets come from the host (pageable: staged before the call returns).
  const Status copied =
      plan.chunk_indptr.empty()
          ? Status::Ok()
          : to_status(cudaMemcpyAsync(ints_base, plan.chunk_indptr.data(),
                                      plan.chunk_indptr.size() * sizeof(std::int32_t),
                                      cudaMemcpyHostToDevice, s),
                      name);
  const Status appended = copied.ok() ? launch_paged_append<T>(p, prep, s, name) : copied;
  if (appended.ok()) launch(static_cast<int>(total_chunks), sp);
  const Status launched = appended.ok() ? to_status(cudaGetLastError(), name) : appended;
  cudaFreeAsync(ws, s);
  return launched;
}

}  // namespace attn::cuda
