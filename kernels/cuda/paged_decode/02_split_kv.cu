// paged_decode/02_split_kv: rung 01 with the keys of every sequence split into equal chunks
// planned from the lengths, pages streamed through bulk copies, partials merged by LSE.
// - Balance: rung 01 gives a sequence's whole length to one block, so one 32k sequence beside
//   many short ones (or a batch of 1) runs on a few SMs. Here the host picks one chunk length C
//   (a multiple of 32 keys) so that the batch makes about 4 waves of (sequence, kv head, chunk)
//   work items of at most C keys whatever the length mix, a sequence's chunks equal; the hardware
//   hands the items to SMs as they free up. The append launch before this kernel
//   also writes the chunk offsets per sequence (a scan of ceil(len / C)) and zeroes the merge
//   counters, so nothing else is launched or copied per call.
// - Pages stream into a shared-memory ring (4 stages of 32 keys at D = 128) by bulk asynchronous
//   copies, one per page segment in a stage, counted in by an mbarrier: 3 stages stay in flight
//   without registers, and the page table read sits with the one issuing thread, off the
//   compute path.
// - The GQA group shares each K/V byte (one block per kv head); the scores of 4 keys per stream
//   are formed before one max and one rescale (common/stream_update.cuh, attention/decode_split_kv's
//   update too).
// - A sequence of one chunk writes its output directly; otherwise the last block of the
//   (sequence, kv head) to finish (an atomic count) merges its chunks by their log-sum-exps.
// bfloat16/float16 (every head dim of common/head_dims.cuh) and float32 (32 to 128); any number of
// query heads per key/value head (up to 8 a block, larger groups in slices of 8); any page size (best at 16 and up: one copy per page segment).
// A row's 16-byte vectors go to a power of two of lanes (at 80: 10 of 16 lanes work, 6 idle), so
// the dot products reduce by shuffles within the lane group.
#include <algorithm>

#include "../common/head_dims.cuh"
#include "../common/paged_split.cuh"
#include "../common/stream_update.cuh"
#include "../hopper/hopper.cuh"
#include "paged_decode_rungs.h"

namespace attn::cuda {
namespace {

using namespace hopper;

constexpr int kThreads = 128, kStageKeys = 32, kMinChunk = 128, kWaves = 4;

template <class T, int D>
struct Ring {
  static constexpr int kStageBytes = 2 * kStageKeys * D * static_cast<int>(sizeof(T));  // K then V
  static constexpr int kStages = std::max(3, 65536 / kStageBytes);
  static constexpr int kRingBytes = kStages * kStageBytes;
};

// Lanes a row of D elements takes: D / kVec vectors, rounded up to a power of two.
constexpr int lanes_for(int vectors) {
  int lanes = 1;
  while (lanes < vectors) lanes *= 2;
  return lanes;
}

template <class T, int D, int G>
__global__ void __launch_bounds__(kThreads) split_kernel(PagedProblem p, SplitPartials sp) {
  constexpr int kVec = 16 / sizeof(T), kLanes = lanes_for(D / kVec), kStreams = kThreads / kLanes;
  static_assert(D % kVec == 0);
  constexpr int kUnroll = kStageKeys / kStreams, kStages = Ring<T, D>::kStages;
  static_assert(kLanes <= 32 && kStageKeys % kStreams == 0);
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* ring = reinterpret_cast<T*>(smem_raw);  // [kStages][2][kStageKeys][D]
  __shared__ std::uint64_t full[kStages];
  __shared__ float qs[G][D];
  __shared__ float red_m[kStreams][G], red_l[kStreams][G];
  __shared__ bool last_block;

  // A slice of up to G query heads of the group (multi-query groups run in several).
  const int slices = (p.group + G - 1) / G;
  const int x = blockIdx.x / slices, slice = blockIdx.x % slices, hkv = blockIdx.y;
  const int h0 = hkv * p.group + slice * G, count = min(G, p.group - slice * G);
  const int i = owner_of_tile(sp.chunk_indptr, p.n, x);
  const int x0 = __ldg(sp.chunk_indptr + i), chunks = __ldg(sp.chunk_indptr + i + 1) - x0;
  const int len = __ldg(p.seq_lens + i);
  const int2 keys = chunk_keys(len, chunks, x - x0, kStageKeys);
  const int k_begin = keys.x, k_end = keys.y;
  const int stages = (k_end - k_begin + kStageKeys - 1) / kStageKeys;
  const int* pages = p.page_indices + __ldg(p.page_indptr + i);
  const T* kpool = static_cast<const T*>(p.k_pool);
  const T* vpool = static_cast<const T*>(p.v_pool);

  auto issue = [&](int c) {  // keys [j, j + 32) of the chunk into stage c % kStages
    const int j = k_begin + c * kStageKeys, rows = min(kStageKeys, k_end - j);
    T* kst = ring + (c % kStages) * 2 * kStageKeys * D;
    T* vst = kst + kStageKeys * D;
    mbar_expect_tx(&full[c % kStages], 2u * rows * D * sizeof(T));
    for (int r = 0; r < rows;) {  // one copy per page segment
      const int pos = j + r, off = p.page_shift >= 0 ? pos & (p.page_size - 1) : pos % p.page_size;
      const int seg = min(rows - r, p.page_size - off);
      const long long src = p.key_offset(pages, i, hkv, pos);
      const unsigned bytes = static_cast<unsigned>(seg * D * sizeof(T));
      bulk_load(kst + r * D, kpool + src, bytes, &full[c % kStages]);
      bulk_load(vst + r * D, vpool + src, bytes, &full[c % kStages]);
      r += seg;
    }
  };
  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) mbar_init(&full[s], 1);
    mbar_fence_init();
    for (int c = 0; c < min(stages, kStages); ++c) issue(c);
  }
  for (int idx = threadIdx.x; idx < G * D; idx += kThreads) {
    const int g = idx / D, c = idx % D;
    qs[g][c] = g < count ? to_float(static_cast<const T*>(
                               p.q)[(static_cast<long long>(i) * p.heads_q + h0 + g) * D + c]) *
                               p.scale_log2
                         : 0.0f;
  }
  __syncthreads();

  const int lane = threadIdx.x % kLanes, stream = threadIdx.x / kLanes;
  const bool lane_works = lane * kVec < D;  // false only for the padding lanes of D = 80, 96, 192
  float q[G][kVec], o[G][kVec], m[G], l[G];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    m[g] = -INFINITY, l[g] = 0.0f;
#pragma unroll
    for (int e = 0; e < kVec; ++e) q[g][e] = lane_works ? qs[g][lane * kVec + e] : 0.0f, o[g][e] = 0.0f;
  }
  const auto load16 = [&](const T* row, float (&f)[kVec]) {
    if (lane_works) {
      unpack16<T>(*reinterpret_cast<const uint4*>(row + lane * kVec), f);
    } else {
#pragma unroll
      for (int e = 0; e < kVec; ++e) f[e] = 0.0f;
    }
  };

  for (int c = 0; c < stages; ++c) {
    mbar_wait(&full[c % kStages], (c / kStages) & 1);
    const T* kt = ring + (c % kStages) * 2 * kStageKeys * D;
    const T* vt = kt + kStageKeys * D;
    const int j0 = k_begin + c * kStageKeys;
    stream_update<kUnroll, G, kVec, kLanes>(
        q, j0 + stream, kStreams, k_end, m, l, o,
        [&](int u, float (&kf)[kVec]) { load16(kt + (stream + u * kStreams) * D, kf); },
        [&](int u, float (&vf)[kVec]) { load16(vt + (stream + u * kStreams) * D, vf); });
    __syncthreads();  // every thread is done with this stage: refill it
    if (threadIdx.x == 0 && c + kStages < stages) issue(c + kStages);
  }

  // The block's streams merge through shared memory (the ring, free now).
  float* staged = reinterpret_cast<float*>(smem_raw);  // [kStreams][G][D]
  static_assert(kStreams * G * D * sizeof(float) <= Ring<T, D>::kRingBytes);
  if (lane == 0)
#pragma unroll
    for (int g = 0; g < G; ++g) red_m[stream][g] = m[g], red_l[stream][g] = l[g];
  if (lane_works)
#pragma unroll
    for (int g = 0; g < G; ++g)
#pragma unroll
      for (int e = 0; e < kVec; ++e) staged[(stream * G + g) * D + lane * kVec + e] = o[g][e];
  __syncthreads();
  const long long row0 = static_cast<long long>(i) * p.heads_q + h0;  // output row of query head h0
  for (int idx = threadIdx.x; idx < count * D; idx += kThreads) {
    const int g = idx / D, c = idx % D;
    float mb = -INFINITY, lb = 0.0f, acc = 0.0f;
    for (int s = 0; s < kStreams; ++s) mb = fmaxf(mb, red_m[s][g]);
    for (int s = 0; s < kStreams; ++s)
      if (red_m[s][g] != -INFINITY) {
        const float w = exp2f(red_m[s][g] - mb);
        lb += red_l[s][g] * w;
        acc += staged[(s * G + g) * D + c] * w;
      }
    if (chunks == 1) {  // the whole sequence: final output
      static_cast<T*>(p.o)[(row0 + g) * D + c] = from_float<T>(acc / lb);
      if (p.lse && c == 0) p.lse[row0 + g] = (mb + log2f(lb)) * 0.6931471805599453f;
    } else {
      const long long prow = static_cast<long long>(x) * p.heads_q + h0 + g;
      sp.o[prow * D + c] = acc;
      if (c == 0) sp.m[prow] = mb, sp.l[prow] = lb;
    }
  }
  if (chunks == 1) return;

  // The last block of this (sequence, kv head) to finish merges its chunks (the ring's shared
  // memory holds the weights).
  merge_chunks_if_last<T, D, kThreads>(p, sp, i, hkv * slices + slice, p.heads_kv * slices, h0, count, x0,
                                       chunks, reinterpret_cast<float*>(smem_raw), last_block);
}

template <class T, int D>
Status launch(const PagedDecodeArgs& a, const PagedProblem& p, cudaStream_t s, int device) {
  // Up to 4 heads a block as the group needs, else slices of 8.
  const int g = p.group <= 1 ? 1 : p.group <= 2 ? 2 : p.group <= 4 ? 4 : 8, slices = (p.group + g - 1) / g;
  void (*kernel)(PagedProblem, SplitPartials) = g == 1   ? split_kernel<T, D, 1>
                                                : g == 2 ? split_kernel<T, D, 2>
                                                : g == 4 ? split_kernel<T, D, 4>
                                                         : split_kernel<T, D, 8>;
  constexpr int kRing = Ring<T, D>::kRingBytes;
  ATTN_RETURN_IF_ERROR(
      to_status(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kRing),
                "paged_decode/02 shared memory"));
  int per_sm = 1, sms = 132;
  ATTN_RETURN_IF_ERROR(
      to_status(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, kRing),
                "paged_decode/02 occupancy"));
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  const SplitPlan plan = plan_split(a, static_cast<std::int64_t>(p.heads_kv) * slices, std::max(per_sm, 1) * sms,
                                    kWaves, kMinChunk, kRing / static_cast<int>(sizeof(float)) / g, kStageKeys);
  return run_split<T, D>(p, plan, p.heads_kv * slices, s, "paged_decode/02_split_kv",
                         [&](int chunks, const SplitPartials& sp) {
                           kernel<<<dim3(static_cast<unsigned>(chunks * slices), p.heads_kv), kThreads, kRing, s>>>(p, sp);
                         });
}

Result<PagedProblem> problem(const PagedDecodeArgs& a) {
  return paged_problem(a, {}, kPagedDecode02Caps, "paged_decode/02_split_kv");
}

}  // namespace

Status paged_decode_02_supports(const PagedDecodeArgs& args) { return problem(args).status(); }

Status paged_decode_02_split_kv(const PagedDecodeArgs& args, Stream& stream) {
  ATTN_ASSIGN_OR_RETURN(p, problem(args));
  const cudaStream_t s = paged_stream(stream);
  const int dev = stream.device();
  const auto by_dim = [&](auto tag) -> Status {
    using T = decltype(tag);
    const auto run = [&](auto d) { return launch<T, decltype(d)::value>(args, p, s, dev); };
    if constexpr (sizeof(T) == 2) return with_head_dim<kPagedDecode02Caps.head_dims>(p.head_dim, run);
    else return with_head_dim<kPagedDecode02Caps.float32_head_dims>(p.head_dim, run);
  };
  switch (args.cache.dtype) {
    case DType::kFloat32: return by_dim(float{});
    case DType::kBFloat16: return by_dim(__nv_bfloat16{});
    case DType::kFloat16: return by_dim(__half{});
    default: return invalid_argument("q.dtype: unexpected");
  }
}

}  // namespace attn::cuda
