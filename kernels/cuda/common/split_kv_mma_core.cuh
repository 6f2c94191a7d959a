// The split-KV tensor-core decode of paged_decode rungs 03 and 04 (and, through rung 04,
// attention/decode_mma_split), everything but how K and V reach shared memory:
// - paged_split.cuh's plan: equal chunks of a sequence's keys over about 4 waves, a block per
//   (chunk, kv head), partials merged by their log-sum-exps by the last block to finish;
// - the GQA group's query heads as the rows of one m16n8k16 A operand (padded to 16), so 16 keys
//   cost 32 mma, 16 ldmatrix and a 16-wide softmax per warp;
// - a group of more than 16 (multi-query: up to 128 query heads on one kv head) takes the wide
//   path instead: the 4 warps split the heads, not the keys (16 heads each, 64 a block), each
//   computing every key of a block-wide 64-key tile (BlockPipe), so a K/V byte read once from
//   memory serves 64 heads; groups past 64 run in slices of 64, side by side in the grid so that
//   the second slice reads the chunk's K/V from L2 (16-head slices would read it 8 times at 128);
// - a window reads only the keys in it (the plan splits the window, not the sequence); a soft cap
//   maps the scores; the sinks join the denominators where the outputs are finished;
// - 4 warps, each with its own 16 keys of a 64-key tile and its own running max, sum and output,
//   merged through shared memory at the end;
// - K/V rows in XOR-swizzled shared memory (rows padded to padded_dim<D>()), read by ldmatrix.
// The rung gives a loader policy, Loader<T, D>, for the K/V pipeline, the one thing the rungs
// change:
//   kTileBytes                  bytes of K in a stage (its V follows them);
//   kRingBytes                  bytes of all the stages (the merge reuses them afterwards);
//   warp_row(warp)              the row of the warp's first key in a stage;
//   tiles(k_begin, k_end, warp) how many tiles of the keys [k_begin, k_end) the warp computes;
//   Loader(p, pages, kpool, vpool, i, hkv, k_begin, k_end, base, warp, lane): the loader of
//                               sequence i's keys [k_begin, k_end) for kv head hkv into the
//                               1024-aligned stages at `base`;
//   start(count)                puts the first of the warp's `count` tiles in flight;
//   wait(t, count)              tile t has landed for the warp, the next tile to fetch is issued:
//                               returns the address of tile t's K stage;
//   first_key(t)                the key of the warp's first row in tile t.
#pragma once

#include <algorithm>

#include "head_dims.cuh"
#include "launch_fit.cuh"
#include "mma_sync.cuh"
#include "paged_split.cuh"
#include "score_rules.cuh"

namespace attn::cuda::split_kv_mma {

using namespace mma_sync;

constexpr int kWarps = 4, kThreads = kWarps * 32, kTileKeys = 16 * kWarps, kMaxGroup = 16;
constexpr int kMinChunk = 256, kWaves = 4, kMaxChunksPerSeq = 32;

// Chunk `chunk` of row `row` (16-byte chunks, rows of padded_dim<D>() 16-bit elements), XOR-swizzled
// with row % 8: ldmatrix reads 8 rows of one chunk without bank conflicts.
template <int D>
__device__ __forceinline__ unsigned swizzled_bytes(int row, int chunk) {
  return static_cast<unsigned>(row * padded_dim<D>() * 2 + ((chunk ^ (row & 7)) << 4));
}

// The A operand of a warp's 16 query rows: heads h0 + g and h0 + g + 8 of sequence i (rows g and
// g + 8 of the m16 tile), zeros for rows at or past `group`.
template <class T, int D>
__device__ __forceinline__ void load_query_rows(const PagedProblem& p, int i, int h0, int group, int g, int t4,
                                                unsigned (&qf)[D / 16][4]) {
  const unsigned* q0 =
      g < group ? reinterpret_cast<const unsigned*>(static_cast<const T*>(p.q) +
                                                    (static_cast<long long>(i) * p.heads_q + h0 + g) * D)
                : nullptr;
  const unsigned* q1 = g + 8 < group ? q0 + 8 * D / 2 : nullptr;  // heads are D apart
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    const int c = (kk * 16 + 2 * t4) / 2;
    qf[kk][0] = q0 ? __ldg(q0 + c) : 0u;
    qf[kk][1] = q1 ? __ldg(q1 + c) : 0u;
    qf[kk][2] = q0 ? __ldg(q0 + c + 4) : 0u;
    qf[kk][3] = q1 ? __ldg(q1 + c + 4) : 0u;
  }
}

// One warp's 16 keys: S = Q K^T for its 16 query rows (q fragments qf), the scores mapped and
// masked past k_end, the online softmax of rows g and g + 8, O += P V. k_addr / v_addr: the lane's
// ldmatrix addresses of the 16 keys' K and V rows in swizzled shared memory; jw: the first key.
template <class T, int D>
__device__ __forceinline__ void attend16(const unsigned (&qf)[D / 16][4], unsigned k_addr, unsigned v_addr, int jw,
                                         int k_end, const ScoreMap& score, int t4, float (&o)[D / 8][4],
                                         float (&m)[2], float (&l)[2]) {
  float s[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    unsigned kf[4];
    ldsm_x4(kf, k_addr ^ (kk << 5));
    mma16816<T>(s[0], qf[kk], kf[0], kf[1]);
    mma16816<T>(s[1], qf[kk], kf[2], kf[3]);
  }
  const bool whole = jw + 16 <= k_end;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float mx = -INFINITY;
#pragma unroll
    for (int n = 0; n < 2; ++n)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float v = score(s[n][2 * r + e]);
        if (!whole && jw + n * 8 + 2 * t4 + e >= k_end) v = -INFINITY;
        s[n][2 * r + e] = v;
        mx = fmaxf(mx, v);
      }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float m_new = fmaxf(m[r], mx);
    const float m_use = m_new == -INFINITY ? 0.0f : m_new;  // no key of this warp yet
    const float alpha = exp2f(m[r] - m_use);
    m[r] = m_new;
    float sum = 0.0f;
#pragma unroll
    for (int n = 0; n < 2; ++n)
#pragma unroll
      for (int e = 0; e < 2; ++e) sum += (s[n][2 * r + e] = exp2f(s[n][2 * r + e] - m_use));
    l[r] = l[r] * alpha + sum;
#pragma unroll
    for (int n = 0; n < D / 8; ++n) o[n][2 * r] *= alpha, o[n][2 * r + 1] *= alpha;
  }
  const unsigned pf[4] = {pack2<T>(s[0][0], s[0][1]), pack2<T>(s[0][2], s[0][3]), pack2<T>(s[1][0], s[1][1]),
                          pack2<T>(s[1][2], s[1][3])};
#pragma unroll
  for (int dp = 0; dp < D / 16; ++dp) {
    unsigned vf[4];
    ldsm_x4_trans(vf, v_addr ^ (dp << 5));
    mma16816<T>(o[2 * dp], pf, vf[0], vf[1]);
    mma16816<T>(o[2 * dp + 1], pf, vf[2], vf[3]);
  }
}

// The warps' rows of a block, staged in shared memory ([kWarps][16][D] float32, each warp's
// running max and sum in red_m/red_l), merged by their maxima: row gq's output when the sequence
// is one chunk, else chunk x's partial (o, m, l) for merge_chunks_if_last.
template <class T, int D>
__device__ __forceinline__ void merge_warp_rows(const PagedProblem& p, const SplitPartials& sp, const float* staged,
                                                const float (&red_m)[kWarps][kMaxGroup],
                                                const float (&red_l)[kWarps][kMaxGroup], int i, int x, int h0,
                                                int group, int chunks) {
  const long long out0 = static_cast<long long>(i) * p.heads_q + h0;
  for (int idx = threadIdx.x; idx < group * D; idx += kThreads) {
    const int gq = idx / D, c = idx % D;
    float mb = -INFINITY, lb = 0.0f, acc = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) mb = fmaxf(mb, red_m[w][gq]);
#pragma unroll
    for (int w = 0; w < kWarps; ++w)
      if (red_m[w][gq] != -INFINITY) {
        const float wt = exp2f(red_m[w][gq] - mb);
        lb += red_l[w][gq] * wt;
        acc += staged[(w * 16 + gq) * D + c] * wt;
      }
    if (chunks == 1) {
      const RowEnd end = finish_row(mb, lb, p.sinks, h0 + gq);
      static_cast<T*>(p.o)[(out0 + gq) * D + c] = from_float<T>(acc * end.inv);
      if (p.lse && c == 0) p.lse[out0 + gq] = end.lse_log2 * 0.6931471805599453f;
    } else {
      const long long prow = static_cast<long long>(x) * p.heads_q + h0 + gq;
      sp.o[prow * D + c] = acc;
      if (c == 0) sp.m[prow] = mb, sp.l[prow] = lb;
    }
  }
}

template <template <class, int> class Loader, class T, int D>
__global__ void __launch_bounds__(kThreads) split_kv_mma_kernel(PagedProblem p, SplitPartials sp) {
  using L = Loader<T, D>;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  // Stages 1024-aligned, so the lanes' XOR addressing of chunks stays inside each row.
  unsigned char* smem = smem_raw + ((1024 - smem_addr(smem_raw) % 1024) % 1024);
  const unsigned base = smem_addr(smem);
  __shared__ float red_m[kWarps][kMaxGroup], red_l[kWarps][kMaxGroup];
  __shared__ bool last_block;

  const int slices = (p.group + kMaxGroup - 1) / kMaxGroup;
  const int x = blockIdx.x / slices, slice = blockIdx.x % slices, hkv = blockIdx.y;
  const int h0 = hkv * p.group + slice * kMaxGroup, group = min(kMaxGroup, p.group - slice * kMaxGroup);
  const int i = owner_of_tile(sp.chunk_indptr, p.n, x);
  const int x0 = __ldg(sp.chunk_indptr + i), chunks = __ldg(sp.chunk_indptr + i + 1) - x0;
  const int len = p.seq_len(i), first_key = p.decode_first_key(len);
  const int2 keys = chunk_keys(len - first_key, chunks, x - x0, kTileKeys);
  const int k_begin = first_key + keys.x, k_end = first_key + keys.y;
  const ScoreMap score = p.score_map();
  const int* pages = p.page_indices ? p.page_indices + __ldg(p.page_indptr + i) : nullptr;
  const T* kpool = static_cast<const T*>(p.k_pool);
  const T* vpool = static_cast<const T*>(p.v_pool);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t4 = lane % 4;
  const int tiles = L::tiles(k_begin, k_end, warp);
  const L load(p, pages, kpool, vpool, i, hkv, k_begin, k_end, base, warp, lane);
  load.start(tiles);

  // The group's query rows as the A operand (rows g and g + 8 of the m16 tile), zero past group.
  unsigned qf[D / 16][4];
  load_query_rows<T, D>(p, i, h0, group, g, t4, qf);

  float o[D / 8][4], m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
#pragma unroll
  for (int n = 0; n < D / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
  // ldmatrix lanes (attention/03's layout) for this warp's 16 keys of a stage.
  const int row0 = L::warp_row(warp);
  const unsigned k_lane = swizzled_bytes<D>(row0 + lane % 8 + (lane / 16) * 8, (lane / 8) % 2);
  const unsigned v_lane = swizzled_bytes<D>(row0 + lane % 8 + ((lane / 8) % 2) * 8, lane / 16);

  for (int t = 0; t < tiles; ++t) {
    const unsigned kst = load.wait(t, tiles), vst = kst + L::kTileBytes;
    attend16<T, D>(qf, kst + k_lane, vst + v_lane, load.first_key(t), k_end, score, t4, o, m, l);
  }
  cp_async_wait<0>();
  __syncthreads();  // the stages are free: the warps' outputs merge there

  float* staged = reinterpret_cast<float*>(smem);  // [kWarps][16][D]
  static_assert(kWarps * 16 * D * sizeof(float) <= L::kRingBytes);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
    const int row = g + 8 * r;
    if (row >= group) continue;
    if (t4 == 0) red_m[warp][row] = m[r], red_l[warp][row] = l[r];
#pragma unroll
    for (int n = 0; n < D / 8; ++n)
      *reinterpret_cast<float2*>(staged + (warp * 16 + row) * D + n * 8 + 2 * t4) =
          make_float2(o[n][2 * r], o[n][2 * r + 1]);
  }
  __syncthreads();
  merge_warp_rows<T, D>(p, sp, staged, red_m, red_l, i, x, h0, group, chunks);
  if (chunks == 1) return;
  merge_chunks_if_last<T, D, kThreads>(p, sp, i, hkv * slices + slice, p.heads_kv * slices, h0, group, x0,
                                       chunks, reinterpret_cast<float*>(smem), last_block);
}

// One pipeline for the block: stage t % kStages holds the K then the V rows of keys
// [64 t, 64 t + 64) of the chunk (rows padded to padded_dim<D>()), filled by every thread with
// cp.async; warp w computes rows 16 w .. 16 w + 15 of each (rung 03), or every row (the wide path).
template <class T, int D>
struct BlockPipe {
  static constexpr int kTileBytes = kTileKeys * padded_dim<D>() * 2;  // K or V of one tile
  static constexpr int kStageBytes = 2 * kTileBytes;
  static constexpr int kStages = padded_dim<D>() == 64 ? 6 : padded_dim<D>() == 128 ? 3 : 2;
  static constexpr int kRingBytes = kStages * kStageBytes;
  static constexpr int kChunks = D / 8;

  const PagedProblem& p;
  const int* pages;
  const T *kpool, *vpool;
  int i, hkv, k_begin, k_end;
  unsigned base;
  int warp;

  __device__ __forceinline__ BlockPipe(const PagedProblem& p_, const int* pages_, const T* kpool_,
                                       const T* vpool_, int i_, int hkv_, int k_begin_, int k_end_,
                                       unsigned base_, int warp_, int)
      : p(p_), pages(pages_), kpool(kpool_), vpool(vpool_), i(i_), hkv(hkv_), k_begin(k_begin_),
        k_end(k_end_), base(base_), warp(warp_) {}

  static __device__ __forceinline__ int warp_row(int w) { return w * 16; }
  static __device__ __forceinline__ int tiles(int first, int end, int) {
    return (end - first + kTileKeys - 1) / kTileKeys;  // every warp takes part in every tile
  }
  __device__ __forceinline__ int first_key(int t) const { return k_begin + t * kTileKeys + warp * 16; }

  __device__ __forceinline__ void load_tile(int t) const {  // keys [j0, j0 + 64), zeros past k_end
    const unsigned kst = base + (t % kStages) * kStageBytes, vst = kst + kTileBytes;
    const int j0 = k_begin + t * kTileKeys;
#pragma unroll
    for (int idx = threadIdx.x; idx < kTileKeys * kChunks; idx += kThreads) {
      const int row = idx / kChunks, chunk = idx % kChunks, j = j0 + row;
      const bool valid = j < k_end;
      const long long off = valid ? p.key_offset(pages, i, hkv, j) + chunk * 8 : 0;
      const unsigned dst = swizzled_bytes<D>(row, chunk);
      cp_async16(kst + dst, kpool + off, valid);
      cp_async16(vst + dst, vpool + off, valid);
    }
  }
  __device__ __forceinline__ void start(int count) const {
#pragma unroll
    for (int t = 0; t < kStages - 1; ++t) {
      if (t < count) load_tile(t);
      cp_async_commit();
    }
  }
  __device__ __forceinline__ unsigned wait(int t, int count) const {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // tile t has landed for every thread; stage (t - 1) % kStages is free
    if (t + kStages - 1 < count) load_tile(t + kStages - 1);
    cp_async_commit();
    return base + (t % kStages) * kStageBytes;
  }
};

constexpr int kWideGroup = kWarps * 16;  // heads a block of the wide path serves

// The wide path (groups of more than 16): warp w owns query heads 16 w .. 16 w + 15 of the
// block's slice of 64 and runs the online softmax over every key of the chunk; nothing to merge
// between warps.
template <class T, int D>
__global__ void __launch_bounds__(kThreads) wide_group_kernel(PagedProblem p, SplitPartials sp) {
  using L = BlockPipe<T, D>;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  unsigned char* smem = smem_raw + ((1024 - smem_addr(smem_raw) % 1024) % 1024);
  const unsigned base = smem_addr(smem);
  __shared__ bool last_block;

  const int slices = (p.group + kWideGroup - 1) / kWideGroup;
  const int x = blockIdx.x / slices, slice = blockIdx.x % slices, hkv = blockIdx.y;
  const int hb = hkv * p.group + slice * kWideGroup, block_heads = min(kWideGroup, p.group - slice * kWideGroup);
  const int i = owner_of_tile(sp.chunk_indptr, p.n, x);
  const int x0 = __ldg(sp.chunk_indptr + i), chunks = __ldg(sp.chunk_indptr + i + 1) - x0;
  const int len = p.seq_len(i), first_key = p.decode_first_key(len);
  const int2 keys = chunk_keys(len - first_key, chunks, x - x0, kTileKeys);
  const int k_begin = first_key + keys.x, k_end = first_key + keys.y;
  const ScoreMap score = p.score_map();
  const int* pages = p.page_indices ? p.page_indices + __ldg(p.page_indptr + i) : nullptr;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t4 = lane % 4;
  const int tiles = L::tiles(k_begin, k_end, warp);
  const L load(p, pages, static_cast<const T*>(p.k_pool), static_cast<const T*>(p.v_pool), i, hkv, k_begin, k_end,
               base, warp, lane);
  load.start(tiles);

  const int h0 = hb + warp * 16, group = min(16, block_heads - warp * 16);  // this warp's heads
  unsigned qf[D / 16][4];
  load_query_rows<T, D>(p, i, h0, group, g, t4, qf);
  float o[D / 8][4], m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
#pragma unroll
  for (int n = 0; n < D / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
  const unsigned k_lane0 = swizzled_bytes<D>(lane % 8 + (lane / 16) * 8, (lane / 8) % 2);
  const unsigned v_lane0 = swizzled_bytes<D>(lane % 8 + ((lane / 8) % 2) * 8, lane / 16);
  constexpr unsigned kSubBytes = 16 * padded_dim<D>() * 2;  // 16 keys of a stage

  for (int t = 0; t < tiles; ++t) {
    const unsigned kst = load.wait(t, tiles), vst = kst + L::kTileBytes;
    if (group <= 0) continue;  // a warp past the slice's heads only helps load
#pragma unroll 1
    for (int sub = 0; sub < kTileKeys / 16; ++sub) {
      const int jw = k_begin + t * kTileKeys + sub * 16;
      if (jw >= k_end) break;
      attend16<T, D>(qf, kst + sub * kSubBytes + k_lane0, vst + sub * kSubBytes + v_lane0, jw, k_end, score, t4, o,
                     m, l);
    }
  }
  cp_async_wait<0>();
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
    const int row = g + 8 * r;
    if (row >= group) continue;
    const long long orow = static_cast<long long>(i) * p.heads_q + h0 + row;
    if (chunks == 1) {
      const RowEnd end = finish_row(m[r], l[r], p.sinks, h0 + row);
      T* out = static_cast<T*>(p.o) + orow * D;
#pragma unroll
      for (int n = 0; n < D / 8; ++n)
        *reinterpret_cast<unsigned*>(out + n * 8 + 2 * t4) = pack2<T>(o[n][2 * r] * end.inv, o[n][2 * r + 1] * end.inv);
      if (p.lse && t4 == 0) p.lse[orow] = end.lse_log2 * 0.6931471805599453f;
    } else {
      const long long prow = static_cast<long long>(x) * p.heads_q + h0 + row;
#pragma unroll
      for (int n = 0; n < D / 8; ++n)
        *reinterpret_cast<float2*>(sp.o + prow * D + n * 8 + 2 * t4) = make_float2(o[n][2 * r], o[n][2 * r + 1]);
      if (t4 == 0) sp.m[prow] = m[r], sp.l[prow] = l[r];
    }
  }
  if (chunks == 1) return;
  __syncthreads();  // the stages are free: the merge's weights go there
  merge_chunks_if_last<T, D, kThreads>(p, sp, i, hkv * slices + slice, p.heads_kv * slices, hb, block_heads, x0,
                                       chunks, reinterpret_cast<float*>(smem), last_block);
}

template <class T, int D>
Status launch_wide(const PagedDecodeArgs& a, const PagedProblem& p, cudaStream_t s, int device, const char* name) {
  using L = BlockPipe<T, D>;
  constexpr int kSmem = L::kRingBytes + 1024;
  constexpr auto kernel = wide_group_kernel<T, D>;
  LaunchFit fit;
  ATTN_RETURN_IF_ERROR((launch_fit<kernel, kThreads, kSmem>(device, name, &fit)));
  const int slices = (p.group + kWideGroup - 1) / kWideGroup;
  const int max_chunks =
      std::min(kMaxChunksPerSeq, L::kRingBytes / static_cast<int>(sizeof(float)) / std::min(p.group, kWideGroup));
  const SplitPlan plan = plan_split(a, static_cast<std::int64_t>(p.heads_kv) * slices,
                                    fit.resident(), kWaves, kMinChunk, max_chunks, kTileKeys);
  return run_split<T, D>(p, plan, p.heads_kv * slices, s, name, [&](int chunks, const SplitPartials& sp) {
    kernel<<<dim3(static_cast<unsigned>(chunks * slices), p.heads_kv), kThreads, kSmem, s>>>(p, sp);
  });
}

// Plans the split for the kernel's occupancy and launches it after the append.
template <template <class, int> class Loader, class T, int D>
Status launch(const PagedDecodeArgs& a, const PagedProblem& p, cudaStream_t s, int device,
              const char* name) {
  if (p.group > kMaxGroup) return launch_wide<T, D>(a, p, s, device, name);
  using L = Loader<T, D>;
  constexpr int kSmem = L::kRingBytes + 1024;  // + alignment
  constexpr auto kernel = split_kv_mma_kernel<Loader, T, D>;
  LaunchFit fit;
  ATTN_RETURN_IF_ERROR((launch_fit<kernel, kThreads, kSmem>(device, name, &fit)));
  // At most 32 chunks a sequence: a batch of one long sequence gets about one wave of long chunks
  // (each block streams long enough to hide its start) and a short merge, not 4 waves of 256-key
  // chunks and a 128-way merge (78 us at 1 x 32k, 1 x 8 heads, on the H200).
  const int slices = (p.group + kMaxGroup - 1) / kMaxGroup;
  const int max_chunks =
      std::min(kMaxChunksPerSeq, L::kRingBytes / static_cast<int>(sizeof(float)) / std::min(p.group, kMaxGroup));
  const SplitPlan plan = plan_split(a, static_cast<std::int64_t>(p.heads_kv) * slices,
                                    fit.resident(), kWaves, kMinChunk, max_chunks, kTileKeys);
  return run_split<T, D>(p, plan, p.heads_kv * slices, s, name, [&](int chunks, const SplitPartials& sp) {
    kernel<<<dim3(static_cast<unsigned>(chunks * slices), p.heads_kv), kThreads, kSmem, s>>>(p, sp);
  });
}

// The kernel for the cache's dtype (bfloat16 or float16) and for p.head_dim among kHeadDims (a
// head_dims.cuh set; the rung's check has refused the others).
template <template <class, int> class Loader, unsigned kHeadDims>
Status dispatch(DType dt, const PagedDecodeArgs& a, const PagedProblem& p, Stream& stream,
                const char* name) {
  const cudaStream_t s = static_cast<cudaStream_t>(stream.cuda_stream());
  const int dev = stream.device();
  const auto by_dim = [&](auto tag) -> Status {
    using T = decltype(tag);
    return with_head_dim<kHeadDims>(
        p.head_dim, [&](auto d) { return launch<Loader, T, decltype(d)::value>(a, p, s, dev, name); });
  };
  return dt == DType::kBFloat16 ? by_dim(__nv_bfloat16{}) : by_dim(__half{});
}

}  // namespace attn::cuda::split_kv_mma
