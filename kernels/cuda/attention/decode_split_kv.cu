// attention/decode_split_kv: flash-decoding for one query row per head (Sq = 1) over long keys.
// A single query row cannot fill the GPU one block per head, so the keys are split across
// blocks: a block owns one key/value head, one slice of the keys, and every query head of its
// group (GQA), so each K/V byte is read once for the whole group. Within a block each half (or
// quarter) warp streams one key at a time in 16-byte loads, keeps a running max, sum and output
// per query head (the scores of 4 keys at a time, then one max and one rescale for the 4), and the
// partial results are merged in shared memory, then across blocks by a
// second small kernel using their log-sum-exps. Bound by reading K and V: its figure is GB/s.
// bf16/fp16, head dims 64 and 128, up to 8 query heads per key/value head.
#include "attention_common.cuh"
#include "attention_rungs.h"
#include "../softmax/softmax_common.cuh"

namespace attn::cuda {
namespace {

constexpr int kThreads = 128, kUnroll = 4;

struct Partials {
  float* o;  // [B*Hq][splits][D], unnormalized
  float* m;  // [B*Hq][splits], log2 units
  float* l;  // [B*Hq][splits]
  int splits, keys_per_split;
};

template <class T>
__device__ __forceinline__ void unpack8(const uint4& raw, float (&out)[8]) {
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < 8; ++i) out[i] = to_float(e[i]);
}

template <class T, int D, int G>
__global__ void __launch_bounds__(kThreads) split_kernel(AttentionProblem p, Partials part) {
  constexpr int kLanesPerKey = D / 8;            // 16 for D=128, 8 for D=64
  constexpr int kGroups = kThreads / kLanesPerKey;  // independent key streams in the block
  __shared__ float qs[G][D];
  __shared__ float red_m[kGroups][G], red_l[kGroups][G];
  __shared__ float red_o[G][D];

  const int split = blockIdx.x, bkv = blockIdx.y, b = bkv / p.heads_kv, hkv = bkv % p.heads_kv;
  const int h0 = hkv * p.group;
  for (int idx = threadIdx.x; idx < G * D; idx += kThreads) {
    const int gq = idx / D, c = idx % D;
    qs[gq][c] = to_float(static_cast<const T*>(p.q)[p.q_row(b, h0 + gq, 0) + c]) * p.scale_log2;
    red_o[gq][c] = 0.0f;
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
  const int k_begin = split * part.keys_per_split;
  const int k_end = min(p.len_kv, k_begin + part.keys_per_split);
  const T* kbase = static_cast<const T*>(p.k) + p.kv_row(b, h0, 0) + lane * 8;
  const T* vbase = static_cast<const T*>(p.v) + p.kv_row(b, h0, 0) + lane * 8;

  // The loop bound is the same for every stream of a warp, so the shuffles below never run with
  // part of a warp gone; keys past the slice are loaded by no one and skipped.
  // Loads the kUnroll keys of this stream starting at jb (zeros past the slice: a masked key's
  // weight is 0, and 0 x garbage could be NaN).
  auto load_group = [&](int jb, uint4 (&kr)[kUnroll], uint4 (&vr)[kUnroll]) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int jj = jb + stream + u * kGroups;
      if (jj < k_end) {
        kr[u] = *reinterpret_cast<const uint4*>(kbase + static_cast<long long>(jj) * D);
        vr[u] = *reinterpret_cast<const uint4*>(vbase + static_cast<long long>(jj) * D);
      } else {
        kr[u] = vr[u] = make_uint4(0u, 0u, 0u, 0u);
      }
    }
  };
  // Register double buffering: the next group's loads are in flight while this one is used, so
  // each stream keeps 2 x kUnroll keys (2 x 2 KB at D = 128) outstanding.
  uint4 kr[kUnroll], vr[kUnroll];
  load_group(k_begin, kr, vr);
  for (int jb = k_begin; jb < k_end; jb += kGroups * kUnroll) {
    const int j = jb + stream;
    uint4 kn[kUnroll], vn[kUnroll];
    load_group(jb + kGroups * kUnroll, kn, vn);
    // The scores of all kUnroll keys first (independent chains: dot products and shuffles
    // overlap), then one max, one rescale and kUnroll updates per query head.
    float sc[kUnroll][G];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      float kf[8];
      unpack8<T>(kr[u], kf);
#pragma unroll
      for (int gq = 0; gq < G; ++gq) {
        float dot = 0.0f;
#pragma unroll
        for (int e = 0; e < 8; ++e) dot += q[gq][e] * kf[e];
        sc[u][gq] = dot;
      }
    }
#pragma unroll
    for (int off = kLanesPerKey / 2; off > 0; off >>= 1)
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
#pragma unroll
        for (int gq = 0; gq < G; ++gq) sc[u][gq] += __shfl_xor_sync(0xffffffffu, sc[u][gq], off);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (j + u * kGroups >= k_end)
#pragma unroll
        for (int gq = 0; gq < G; ++gq) sc[u][gq] = -INFINITY;
#pragma unroll
    for (int gq = 0; gq < G; ++gq) {
      float m_new = m[gq];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) m_new = fmaxf(m_new, sc[u][gq]);
      if (m_new == -INFINITY) continue;  // nothing in this stream yet
      const float alpha = exp2f(m[gq] - m_new);
      l[gq] *= alpha;
#pragma unroll
      for (int e = 0; e < 8; ++e) o[gq][e] *= alpha;
      m[gq] = m_new;
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      float vf[8];
      unpack8<T>(vr[u], vf);
#pragma unroll
      for (int gq = 0; gq < G; ++gq) {
        if (m[gq] == -INFINITY) continue;  // no key of this stream seen yet
        const float pj = exp2f(sc[u][gq] - m[gq]);  // 0 for a masked key
        l[gq] += pj;
#pragma unroll
        for (int e = 0; e < 8; ++e) o[gq][e] += pj * vf[e];
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) kr[u] = kn[u], vr[u] = vn[u];
  }

  // Merge the block's key streams: the max first, then rescaled sums and outputs.
  if (lane == 0)
#pragma unroll
    for (int gq = 0; gq < G; ++gq) red_m[stream][gq] = m[gq], red_l[stream][gq] = l[gq];
  __syncthreads();
  float mb[G];
#pragma unroll
  for (int gq = 0; gq < G; ++gq) {
    mb[gq] = -INFINITY;
    for (int s = 0; s < kGroups; ++s) mb[gq] = fmaxf(mb[gq], red_m[s][gq]);
  }
#pragma unroll
  for (int gq = 0; gq < G; ++gq) {
    const float w = mb[gq] == -INFINITY ? 0.0f : exp2f(m[gq] - mb[gq]);
#pragma unroll
    for (int e = 0; e < 8; ++e) atomicAdd(&red_o[gq][lane * 8 + e], o[gq][e] * w);
  }
  __syncthreads();
  const long long row_base = static_cast<long long>(b) * p.heads_q + h0;
  for (int idx = threadIdx.x; idx < G * D; idx += kThreads) {
    const int gq = idx / D, c = idx % D;
    part.o[((row_base + gq) * part.splits + split) * D + c] = red_o[gq][c];
  }
  if (threadIdx.x < G) {
    const int gq = threadIdx.x;
    float lb = 0.0f;
    for (int s = 0; s < kGroups; ++s)
      if (red_m[s][gq] != -INFINITY) lb += red_l[s][gq] * exp2f(red_m[s][gq] - mb[gq]);
    part.m[(row_base + gq) * part.splits + split] = mb[gq];
    part.l[(row_base + gq) * part.splits + split] = lb;
  }
}

// One block per query head: merges the splits by their maxima, normalizes, writes O and lse.
// The splits' (max, sum) pairs are read in parallel into shared memory first; each thread then
// sums its output element over the splits, the loads independent of each other.
template <class T>
__global__ void combine_kernel(AttentionProblem p, Partials part) {
  extern __shared__ float weights[];  // [splits]: exp2(m_s - M), then divided by the total
  __shared__ float scratch[32];
  const long long row = blockIdx.x;
  const float* ms = part.m + row * part.splits;
  const float* ls = part.l + row * part.splits;
  float mx = -INFINITY;
  for (int s = threadIdx.x; s < part.splits; s += blockDim.x) mx = fmaxf(mx, ms[s]);
  mx = block_reduce<true>(mx, scratch);
  float total = 0.0f;
  for (int s = threadIdx.x; s < part.splits; s += blockDim.x) {
    const float w = ms[s] == -INFINITY ? 0.0f : exp2f(ms[s] - mx);
    weights[s] = w;
    total += ls[s] * w;
  }
  total = block_reduce<false>(total, scratch);
  const float inv = total > 0.0f ? 1.0f / total : 0.0f;
  for (int c = threadIdx.x; c < p.head_dim; c += blockDim.x) {
    float acc = 0.0f;
#pragma unroll 8
    for (int s = 0; s < part.splits; ++s) acc += part.o[(row * part.splits + s) * p.head_dim + c] * weights[s];
    static_cast<T*>(p.o)[row * p.head_dim + c] = from_float<T>(acc * inv);
  }
  if (p.lse && threadIdx.x == 0) p.lse[row] = total > 0.0f ? (mx + log2f(total)) * 0.6931471805599453f : -INFINITY;
}

template <class T, int D>
Status launch(const AttentionProblem& p, cudaStream_t s, int sms) {
  void (*kernel)(AttentionProblem, Partials) = p.group == 1   ? split_kernel<T, D, 1>
                                               : p.group == 2 ? split_kernel<T, D, 2>
                                               : p.group == 4 ? split_kernel<T, D, 4>
                                                              : split_kernel<T, D, 8>;
  // As many blocks as fit on the GPU at once, in one wave with no straggler wave, but no slice
  // shorter than 256 keys.
  int per_sm = 1;
  ATTN_RETURN_IF_ERROR(to_status(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0),
                                 "decode occupancy"));
  const long long heads = static_cast<long long>(p.batch) * p.heads_kv;
  int splits = static_cast<int>(std::max<long long>(1, static_cast<long long>(std::max(per_sm, 1)) * sms / heads));
  splits = std::min(splits, std::max(1, (p.len_kv + 255) / 256));
  Partials part{};
  part.splits = splits;
  part.keys_per_split = (p.len_kv + splits - 1) / splits;
  const long long rows = static_cast<long long>(p.batch) * p.heads_q;
  char* ws = nullptr;
  const std::size_t o_bytes = rows * splits * D * sizeof(float), ml_bytes = rows * splits * sizeof(float);
  ATTN_RETURN_IF_ERROR(to_status(cudaMallocAsync(&ws, o_bytes + 2 * ml_bytes, s), "decode workspace"));
  part.o = reinterpret_cast<float*>(ws);
  part.m = reinterpret_cast<float*>(ws + o_bytes);
  part.l = reinterpret_cast<float*>(ws + o_bytes + ml_bytes);
  const dim3 grid(splits, static_cast<unsigned>(heads));
  kernel<<<grid, kThreads, 0, s>>>(p, part);
  combine_kernel<T><<<static_cast<unsigned>(rows), 128, splits * sizeof(float), s>>>(p, part);
  const Status launched = to_status(cudaGetLastError(), "attention/decode_split_kv launch");
  cudaFreeAsync(ws, s);
  return launched;
}

}  // namespace

Status attention_decode_supports(const AttentionArgs& args) {
  ATTN_ASSIGN_OR_RETURN(p, attention_problem(args, {DType::kBFloat16, DType::kFloat16}, {64, 128},
                                             "attention/decode_split_kv"));
  if (p.len_q != 1) {
    return invalid_argument("q.shape[2]: attention/decode_split_kv takes one query row per head (decoding), got " +
                            std::to_string(p.len_q));
  }
  if (p.group != 1 && p.group != 2 && p.group != 4 && p.group != 8) {
    return invalid_argument("k.shape[1]: attention/decode_split_kv takes 1, 2, 4 or 8 query heads per key/value "
                            "head, got " + std::to_string(p.group));
  }
  if (static_cast<long long>(p.batch) * p.heads_kv > 65535) {
    return invalid_argument("k.shape: attention/decode_split_kv takes B x Hkv <= 65535");
  }
  return Status::Ok();
}

Status attention_decode_split_kv(const AttentionArgs& args, Stream& stream) {
  ATTN_RETURN_IF_ERROR(attention_decode_supports(args));
  ATTN_ASSIGN_OR_RETURN(p, attention_problem(args, {DType::kBFloat16, DType::kFloat16}, {64, 128},
                                             "attention/decode_split_kv"));
  int sms = 132;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, stream.device());
  const cudaStream_t s = attention_stream(stream);
  if (args.q.dtype == DType::kBFloat16)
    return p.head_dim == 64 ? launch<__nv_bfloat16, 64>(p, s, sms) : launch<__nv_bfloat16, 128>(p, s, sms);
  return p.head_dim == 64 ? launch<__half, 64>(p, s, sms) : launch<__half, 128>(p, s, sms);
}

}  // namespace attn::cuda
