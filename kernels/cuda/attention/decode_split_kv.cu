// attention/decode_split_kv: flash-decoding for one query row per head (Sq = 1) over long keys.
// A single query row cannot fill the GPU one block per head, so the keys are split across
// blocks: a block owns one key/value head, one slice of the keys, and every query head of its
// group (GQA), so each K/V byte is read once for the whole group. Bound by reading K and V: its
// figure is GB/s.
// - K and V stream into shared memory through a ring of 4 stages of 32 keys, each filled by two
//   bulk asynchronous copies (one thread issues them; an mbarrier counts the bytes in), so each
//   block keeps 3 stages (48 KB at D = 128) in flight without holding them in registers.
// - Each half (or quarter) warp takes one key at a time from shared memory in 16-byte reads and
//   keeps a running max, sum and output per query head: the scores of 4 keys, then one max and
//   one rescale for the 4 (common/stream_update.cuh, shared with paged_decode/02).
// - The block's key streams merge in shared memory; the last block of a head to finish (an atomic
//   count) merges the head's splits by their log-sum-exps, so there is no second kernel.
// bf16/fp16, head dims 64 and 128, any number of query heads per key/value head (up to 8 a block,
// larger groups in slices of 8).
#include "../hopper/hopper.cuh"
#include "../common/stream_update.cuh"
#include "../softmax/softmax_common.cuh"
#include "attention_common.cuh"
#include "attention_rungs.h"

namespace attn::cuda {
namespace {

constexpr int kThreads = 128, kStages = 4, kChunkKeys = 32;

struct Partials {
  float* o;        // [B*Hq][splits][D], unnormalized
  float* m;        // [B*Hq][splits], log2 units
  float* l;        // [B*Hq][splits]
  int* finished;   // [B*Hkv*slices]: blocks of that unit done (zeroed before the launch)
  int splits, keys_per_split;
};

template <class T>
__device__ __forceinline__ void unpack8(const uint4& raw, float (&out)[8]) {
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < 8; ++i) out[i] = to_float(e[i]);
}

using namespace hopper;

template <class T, int D, int G>
__global__ void __launch_bounds__(kThreads) split_kernel(AttentionProblem p, Partials part) {
  constexpr int kLanesPerKey = D / 8;               // 16 for D=128, 8 for D=64
  constexpr int kStreams = kThreads / kLanesPerKey;  // keys read at once by the block
  constexpr int kUnroll = kChunkKeys / kStreams;     // keys per stream per chunk
  static_assert(kChunkKeys % kStreams == 0);
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* ring = reinterpret_cast<T*>(smem_raw);  // [kStages][2][kChunkKeys][D]: K then V
  __shared__ std::uint64_t full[kStages];
  __shared__ float qs[G][D];
  __shared__ float red_m[kStreams][G], red_l[kStreams][G];
  __shared__ bool last_block;

  const int slices = (p.group + G - 1) / G, unit = blockIdx.y, bkv = unit / slices, slice = unit % slices;
  const int split = blockIdx.x, b = bkv / p.heads_kv, hkv = bkv % p.heads_kv;
  const int h0 = hkv * p.group + slice * G, count = min(G, p.group - slice * G);
  const int k_begin = split * part.keys_per_split;
  const int k_end = min(p.len_kv, k_begin + part.keys_per_split);
  const int chunks = max(0, (k_end - k_begin + kChunkKeys - 1) / kChunkKeys);
  const T* khead = static_cast<const T*>(p.k) + p.kv_row(b, h0, 0);
  const T* vhead = static_cast<const T*>(p.v) + p.kv_row(b, h0, 0);
  auto issue = [&](int c) {  // chunk c of the slice into stage c % kStages
    const int j = k_begin + c * kChunkKeys, rows = min(kChunkKeys, k_end - j);
    const unsigned bytes = static_cast<unsigned>(rows * D * sizeof(T));
    T* stage = ring + (c % kStages) * 2 * kChunkKeys * D;
    mbar_expect_tx(&full[c % kStages], 2 * bytes);
    bulk_load(stage, khead + static_cast<long long>(j) * D, bytes, &full[c % kStages]);
    bulk_load(stage + kChunkKeys * D, vhead + static_cast<long long>(j) * D, bytes, &full[c % kStages]);
  };
  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) mbar_init(&full[s], 1);
    mbar_fence_init();
    for (int c = 0; c < min(chunks, kStages); ++c) issue(c);
  }
  for (int idx = threadIdx.x; idx < G * D; idx += kThreads) {
    const int gq = idx / D, c = idx % D;
    qs[gq][c] = gq < count ? to_float(static_cast<const T*>(p.q)[p.q_row(b, h0 + gq, 0) + c]) * p.scale_log2 : 0.0f;
  }
  __syncthreads();

  const int lane = threadIdx.x % kLanesPerKey, stream = threadIdx.x / kLanesPerKey;
  float q[G][8];
#pragma unroll
  for (int gq = 0; gq < G; ++gq)
#pragma unroll
    for (int e = 0; e < 8; ++e) q[gq][e] = qs[gq][lane * 8 + e];
  float m[G], l[G], o[G][8];
#pragma unroll
  for (int gq = 0; gq < G; ++gq) {
    m[gq] = -INFINITY;
    l[gq] = 0.0f;
#pragma unroll
    for (int e = 0; e < 8; ++e) o[gq][e] = 0.0f;
  }

  for (int c = 0; c < chunks; ++c) {
    mbar_wait(&full[c % kStages], (c / kStages) & 1);
    const T* kt = ring + (c % kStages) * 2 * kChunkKeys * D;
    const T* vt = kt + kChunkKeys * D;
    const int j0 = k_begin + c * kChunkKeys;
    stream_update<kUnroll, G, 8, kLanesPerKey>(
        q, j0 + stream, kStreams, k_end, m, l, o,
        [&](int u, float (&kf)[8]) {
          unpack8<T>(*reinterpret_cast<const uint4*>(kt + (stream + u * kStreams) * D + lane * 8), kf);
        },
        [&](int u, float (&vf)[8]) {
          unpack8<T>(*reinterpret_cast<const uint4*>(vt + (stream + u * kStreams) * D + lane * 8), vf);
        });
    __syncthreads();  // every thread is done with this stage: refill it
    if (threadIdx.x == 0 && c + kStages < chunks) issue(c + kStages);
  }

  // Merge the block's key streams: each stream's (max, sum) and output go to shared memory (the
  // ring, free now), then each thread sums its output elements over the streams. (Shared-memory
  // float atomics here cost 13 us of an 86 us call at [1, 32/8, 32k, 128].)
  float* staged = reinterpret_cast<float*>(smem_raw);  // [kStreams][G][D]
  static_assert(kStreams * G * D * sizeof(float) <= kStages * 2 * kChunkKeys * D * sizeof(T));
  if (lane == 0)
#pragma unroll
    for (int gq = 0; gq < G; ++gq) red_m[stream][gq] = m[gq], red_l[stream][gq] = l[gq];
#pragma unroll
  for (int gq = 0; gq < G; ++gq) {
    float4* dst = reinterpret_cast<float4*>(staged + (stream * G + gq) * D + lane * 8);
    dst[0] = make_float4(o[gq][0], o[gq][1], o[gq][2], o[gq][3]);
    dst[1] = make_float4(o[gq][4], o[gq][5], o[gq][6], o[gq][7]);
  }
  __syncthreads();
  const long long row_base = static_cast<long long>(b) * p.heads_q + h0;
  for (int idx = threadIdx.x; idx < count * D; idx += kThreads) {
    const int gq = idx / D, c = idx % D;
    float mb = -INFINITY, acc = 0.0f;
    for (int s = 0; s < kStreams; ++s) mb = fmaxf(mb, red_m[s][gq]);
    for (int s = 0; s < kStreams; ++s)
      if (red_m[s][gq] != -INFINITY) acc += staged[(s * G + gq) * D + c] * exp2f(red_m[s][gq] - mb);
    part.o[((row_base + gq) * part.splits + split) * D + c] = acc;
  }
  if (threadIdx.x < count) {
    const int gq = threadIdx.x;
    float mb = -INFINITY, lb = 0.0f;
    for (int s = 0; s < kStreams; ++s) mb = fmaxf(mb, red_m[s][gq]);
    for (int s = 0; s < kStreams; ++s)
      if (red_m[s][gq] != -INFINITY) lb += red_l[s][gq] * exp2f(red_m[s][gq] - mb);
    part.m[(row_base + gq) * part.splits + split] = mb;
    part.l[(row_base + gq) * part.splits + split] = lb;
  }

  // The last block of this head to finish merges every split of its query heads by their
  // log-sum-exps: a warp per head finds the weights exp2(m_s - M) / total (kept in the ring's
  // shared memory, free now), then each thread sums output elements over the splits.
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last_block = atomicAdd(&part.finished[unit], 1) == part.splits - 1;
  __syncthreads();
  if (!last_block) return;
  __threadfence();
  float* weights = reinterpret_cast<float*>(smem_raw);  // [G][splits]
  const int warp = threadIdx.x / 32, wl = threadIdx.x % 32;
  for (int gq = warp; gq < count; gq += kThreads / 32) {
    const float* ms = part.m + (row_base + gq) * part.splits;
    const float* ls = part.l + (row_base + gq) * part.splits;
    float mx = -INFINITY;
    for (int s = wl; s < part.splits; s += 32) mx = fmaxf(mx, __ldcg(ms + s));
    mx = warp_max(mx);
    float total = 0.0f;
    for (int s = wl; s < part.splits; s += 32) {
      const float ms_s = __ldcg(ms + s);
      const float w = ms_s == -INFINITY ? 0.0f : exp2f(ms_s - mx);
      weights[gq * part.splits + s] = w;
      total += __ldcg(ls + s) * w;
    }
    total = warp_sum(total);
    const float inv = total > 0.0f ? 1.0f / total : 0.0f;
    for (int s = wl; s < part.splits; s += 32) weights[gq * part.splits + s] *= inv;
    if (p.lse && wl == 0)
      p.lse[row_base + gq] = total > 0.0f ? (mx + log2f(total)) * 0.6931471805599453f : -INFINITY;
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < count * D / 4; idx += kThreads) {  // 4 elements per thread and load
    const int gq = idx / (D / 4), c = idx % (D / 4) * 4;
    const float4* po = reinterpret_cast<const float4*>(part.o + (row_base + gq) * part.splits * D + c);
    const float* w = weights + gq * part.splits;
    float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll 16
    for (int s = 0; s < part.splits; ++s) {
      const float4 x = __ldcg(po + static_cast<long long>(s) * (D / 4));
      acc.x += x.x * w[s], acc.y += x.y * w[s], acc.z += x.z * w[s], acc.w += x.w * w[s];
    }
    T* out = static_cast<T*>(p.o) + (row_base + gq) * D + c;
    out[0] = from_float<T>(acc.x), out[1] = from_float<T>(acc.y), out[2] = from_float<T>(acc.z),
    out[3] = from_float<T>(acc.w);
  }
}

template <class T, int D>
Status launch(const AttentionProblem& p, cudaStream_t s, int sms) {
  const int g = p.group <= 1 ? 1 : p.group <= 2 ? 2 : p.group <= 4 ? 4 : 8, slices = (p.group + g - 1) / g;
  void (*kernel)(AttentionProblem, Partials) = g == 1   ? split_kernel<T, D, 1>
                                               : g == 2 ? split_kernel<T, D, 2>
                                               : g == 4 ? split_kernel<T, D, 4>
                                                        : split_kernel<T, D, 8>;
  // As many blocks as fit on the GPU at once, in one wave with no straggler wave, but no slice
  // shorter than 256 keys.
  constexpr int kRingBytes = kStages * 2 * kChunkKeys * D * static_cast<int>(sizeof(T));
  ATTN_RETURN_IF_ERROR(to_status(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kRingBytes), "decode shared memory"));
  int per_sm = 1;
  ATTN_RETURN_IF_ERROR(to_status(
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, kRingBytes), "decode occupancy"));
  const long long heads = static_cast<long long>(p.batch) * p.heads_kv * slices;
  int splits = static_cast<int>(std::max<long long>(1, static_cast<long long>(std::max(per_sm, 1)) * sms / heads));
  splits = std::min(splits, std::max(1, (p.len_kv + 255) / 256));
  // The merging block keeps [G][splits] weights in the ring's shared memory.
  splits = std::min(splits, kRingBytes / static_cast<int>(sizeof(float)) / g);
  Partials part{};
  part.splits = splits;
  part.keys_per_split = (p.len_kv + splits - 1) / splits;
  const long long rows = static_cast<long long>(p.batch) * p.heads_q;
  char* ws = nullptr;
  const std::size_t o_bytes = rows * splits * D * sizeof(float), ml_bytes = rows * splits * sizeof(float);
  const std::size_t count_bytes = (heads * sizeof(int) + 255) / 256 * 256;
  ATTN_RETURN_IF_ERROR(to_status(cudaMallocAsync(&ws, count_bytes + o_bytes + 2 * ml_bytes, s), "decode workspace"));
  part.finished = reinterpret_cast<int*>(ws);
  part.o = reinterpret_cast<float*>(ws + count_bytes);
  part.m = reinterpret_cast<float*>(ws + count_bytes + o_bytes);
  part.l = reinterpret_cast<float*>(ws + count_bytes + o_bytes + ml_bytes);
  const Status zeroed = to_status(cudaMemsetAsync(part.finished, 0, count_bytes, s), "decode workspace");
  if (!zeroed.ok()) {
    cudaFreeAsync(ws, s);
    return zeroed;
  }
  const dim3 grid(splits, static_cast<unsigned>(heads));
  kernel<<<grid, kThreads, kRingBytes, s>>>(p, part);
  const Status launched = to_status(cudaGetLastError(), "attention/decode_split_kv launch");
  cudaFreeAsync(ws, s);
  return launched;
}

constexpr const char* kName = "attention/decode_split_kv";

}  // namespace

Status attention_decode_supports(const AttentionArgs& args) {
  ATTN_ASSIGN_OR_RETURN(p, attention_problem(args, kAttentionDecodeCaps, kName));
  ATTN_RETURN_IF_ERROR(check_query_rows(kAttentionDecodeCaps, p.len_q, "q.shape[2]", kName));
  ATTN_RETURN_IF_ERROR(check_group(kAttentionDecodeCaps, p.group, "k.shape[1]", kName));
  if (static_cast<long long>(p.batch) * p.heads_kv * ((p.group + 7) / 8) > 65535) {
    return invalid_argument("k.shape: attention/decode_split_kv takes B x Hkv x ceil(group / 8) <= 65535");
  }
  return Status::Ok();
}

Status attention_decode_split_kv(const AttentionArgs& args, Stream& stream) {
  ATTN_RETURN_IF_ERROR(attention_decode_supports(args));
  ATTN_ASSIGN_OR_RETURN(p, attention_problem(args, kAttentionDecodeCaps, kName));
  int sms = 132;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, stream.device());
  const cudaStream_t s = attention_stream(stream);
  const auto by_dim = [&](auto tag) -> Status {
    using T = decltype(tag);
    return with_head_dim<kAttentionDecodeCaps.head_dims>(
        p.head_dim, [&](auto d) { return launch<T, decltype(d)::value>(p, s, sms); });
  };
  return args.q.dtype == DType::kBFloat16 ? by_dim(__nv_bfloat16{}) : by_dim(__half{});
}

}  // namespace attn::cuda
