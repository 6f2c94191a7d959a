// paged_decode/04_warp_pipes: rung 03 with a cp.async pipeline per warp instead of per block.
// - Why: in rung 03 one __syncthreads per 64-key tile ties the 4 warps together: a tile's loads
//   are issued only after the slowest warp finished the tile before, and a late page stalls all
//   four. Here each warp streams its own 16-key tiles (keys 16 (4u + w) .. of the chunk for warp
//   w) through its own 3 stages (6 at D = 64) with cp.async and __syncwarp only: 8 independent
//   streams per SM instead of 2, the same 96 KB a block, the same bytes in flight.
// - Everything else is rung 03's: the plan, the mma.sync tiles, the swizzle, the merges.
// - The same kernel reads dense [B, Hkv, Sk, D] K/V as one page per sequence: registered also as
//   attention/decode_mma_split for Sq = 1.
// bfloat16/float16; every head dim of common/head_dims.cuh (rows padded in shared memory to 64,
// 128 or 256, as in attention/03); 1 to 16 query heads per key/value head; any page size.
#include <vector>

#include "../common/head_dims.cuh"
#include "../common/mma_sync.cuh"
#include "../common/paged_split.cuh"
#include "../common/score_rules.cuh"
#include "paged_decode_rungs.h"

namespace attn::cuda {
namespace {

using namespace mma_sync;

constexpr int kWarps = 4, kThreads = kWarps * 32, kTileKeys = 16 * kWarps, kMaxGroup = 16;
constexpr int kMinChunk = 256, kWaves = 4, kMaxChunksPerSeq = 32;

template <int D>
struct Pipe {
  static constexpr int kTileBytes = 16 * padded_dim<D>() * 2;  // K or V of one warp's tile of 16 keys
  static constexpr int kStageBytes = 2 * kTileBytes;
  static constexpr int kStages = padded_dim<D>() == 64 ? 6 : 3;  // per warp
  static constexpr int kWarpBytes = kStages * kStageBytes;
  static constexpr int kSmem = kWarps * kWarpBytes + 1024;  // + alignment
};

template <int D>
__device__ __forceinline__ unsigned swizzled_bytes(int row, int chunk) {
  return static_cast<unsigned>(row * padded_dim<D>() * 2 + ((chunk ^ (row & 7)) << 4));
}

template <class T, int D>
__global__ void __launch_bounds__(kThreads) warp_pipes_kernel(PagedProblem p, SplitPartials sp) {
  using P = Pipe<D>;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  // Stages 1024-aligned, so the lanes' XOR addressing of chunks stays inside each row.
  unsigned char* smem = smem_raw + ((1024 - smem_addr(smem_raw) % 1024) % 1024);
  const unsigned base = smem_addr(smem);
  __shared__ float red_m[kWarps][kMaxGroup], red_l[kWarps][kMaxGroup];
  __shared__ bool last_block;

  const int x = blockIdx.x, hkv = blockIdx.y, group = p.group, h0 = hkv * group;
  const int i = owner_of_tile(sp.chunk_indptr, p.n, x);
  const int x0 = __ldg(sp.chunk_indptr + i), chunks = __ldg(sp.chunk_indptr + i + 1) - x0;
  const int len = p.seq_len(i);
  const int2 keys = chunk_keys(len, chunks, x - x0, kTileKeys);
  const int k_begin = keys.x, k_end = keys.y;
  const int* pages = p.page_indices ? p.page_indices + __ldg(p.page_indptr + i) : nullptr;
  const T* kpool = static_cast<const T*>(p.k_pool);
  const T* vpool = static_cast<const T*>(p.v_pool);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t4 = lane % 4;
  const int all_tiles = (k_end - k_begin + 15) / 16;
  const int tiles = all_tiles > warp ? (all_tiles - warp + kWarps - 1) / kWarps : 0;  // this warp's
  const unsigned wbase = base + warp * P::kWarpBytes;

  // A lane copies chunk `load_chunk` of rows load_row, + kRowsPerPass, ...; where the chunks of a
  // row do not divide 32 (D = 80, 96, 192), the lanes walk the tile's chunks in order instead.
  constexpr int kChunks = D / 8, kRowsPerPass = 32 / kChunks;
  constexpr bool kEven = 32 % kChunks == 0;
  const int load_row = lane / kChunks, load_chunk = lane % kChunks;
  auto load_tile = [&](int u) {  // the warp's tile u: keys [j0, j0 + 16), zeros past k_end
    const unsigned kst = wbase + (u % P::kStages) * P::kStageBytes, vst = kst + P::kTileBytes;
    const int j0 = k_begin + (u * kWarps + warp) * 16;
    const auto copy = [&](int row, int chunk) {
      const int j = j0 + row;
      const bool valid = j < k_end;
      const long long off = valid ? p.key_offset(pages, i, hkv, j) + chunk * 8 : 0;
      const unsigned dst = swizzled_bytes<D>(row, chunk);
      cp_async16(kst + dst, kpool + off, valid);
      cp_async16(vst + dst, vpool + off, valid);
    };
    if constexpr (kEven) {
#pragma unroll
      for (int pass = 0; pass < 16 / kRowsPerPass; ++pass) copy(load_row + pass * kRowsPerPass, load_chunk);
    } else {
#pragma unroll
      for (int idx = lane; idx < 16 * kChunks; idx += 32) copy(idx / kChunks, idx % kChunks);
    }
  };
#pragma unroll
  for (int u = 0; u < P::kStages - 1; ++u) {
    if (u < tiles) load_tile(u);
    cp_async_commit();
  }

  // The group's query rows as the A operand (rows g and g + 8 of the m16 tile), zero past group.
  const unsigned* q0 =
      g < group
          ? reinterpret_cast<const unsigned*>(static_cast<const T*>(p.q) +
                                              (static_cast<long long>(i) * p.heads_q + h0 + g) * D)
          : nullptr;
  const unsigned* q1 = g + 8 < group ? q0 + 8 * D / 2 : nullptr;  // heads are D apart
  unsigned qf[D / 16][4];
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    const int c = (kk * 16 + 2 * t4) / 2;
    qf[kk][0] = q0 ? __ldg(q0 + c) : 0u;
    qf[kk][1] = q1 ? __ldg(q1 + c) : 0u;
    qf[kk][2] = q0 ? __ldg(q0 + c + 4) : 0u;
    qf[kk][3] = q1 ? __ldg(q1 + c + 4) : 0u;
  }

  float o[D / 8][4], m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
#pragma unroll
  for (int n = 0; n < D / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
  // ldmatrix lanes (attention/03's layout) for the 16 keys of a warp tile.
  const unsigned k_lane = swizzled_bytes<D>(lane % 8 + (lane / 16) * 8, (lane / 8) % 2);
  const unsigned v_lane = swizzled_bytes<D>(lane % 8 + ((lane / 8) % 2) * 8, lane / 16);

  for (int t = 0; t < tiles; ++t) {
    cp_async_wait<P::kStages - 2>();
    __syncwarp();  // tile t has landed for every lane; stage (t - 1) % kStages is free
    if (t + P::kStages - 1 < tiles) load_tile(t + P::kStages - 1);
    cp_async_commit();
    const unsigned kst = wbase + (t % P::kStages) * P::kStageBytes, vst = kst + P::kTileBytes;
    float s[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      unsigned kf[4];
      ldsm_x4(kf, (kst + k_lane) ^ (kk << 5));
      mma16816<T>(s[0], qf[kk], kf[0], kf[1]);
      mma16816<T>(s[1], qf[kk], kf[2], kf[3]);
    }
    const int jw = k_begin + (t * kWarps + warp) * 16;  // the tile's first key
    const bool whole = jw + 16 <= k_end;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = -INFINITY;
#pragma unroll
      for (int n = 0; n < 2; ++n)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float v = s[n][2 * r + e] * p.scale_log2;
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
    const unsigned pf[4] = {pack2<T>(s[0][0], s[0][1]), pack2<T>(s[0][2], s[0][3]),
                            pack2<T>(s[1][0], s[1][1]), pack2<T>(s[1][2], s[1][3])};
#pragma unroll
    for (int dp = 0; dp < D / 16; ++dp) {
      unsigned vf[4];
      ldsm_x4_trans(vf, (vst + v_lane) ^ (dp << 5));
      mma16816<T>(o[2 * dp], pf, vf[0], vf[1]);
      mma16816<T>(o[2 * dp + 1], pf, vf[2], vf[3]);
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // the stages are free: the warps' outputs merge there

  float* staged = reinterpret_cast<float*>(smem);  // [kWarps][16][D]
  static_assert(kWarps * 16 * D * sizeof(float) <= kWarps * P::kWarpBytes);
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
  const long long row0 = static_cast<long long>(i) * p.heads_q + h0;
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
      static_cast<T*>(p.o)[(row0 + gq) * D + c] = from_float<T>(acc / lb);
      if (p.lse && c == 0) p.lse[row0 + gq] = (mb + log2f(lb)) * 0.6931471805599453f;
    } else {
      const long long prow = static_cast<long long>(x) * p.heads_q + h0 + gq;
      sp.o[prow * D + c] = acc;
      if (c == 0) sp.m[prow] = mb, sp.l[prow] = lb;
    }
  }
  if (chunks == 1) return;
  merge_chunks_if_last<T, D, kThreads>(p, sp, i, hkv, x0, chunks, reinterpret_cast<float*>(smem),
                                       last_block);
}

template <class T, int D>
Status launch(const PagedDecodeArgs& a, const PagedProblem& p, cudaStream_t s, int device,
              const char* name) {
  using P = Pipe<D>;
  auto kernel = warp_pipes_kernel<T, D>;
  ATTN_RETURN_IF_ERROR(to_status(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, P::kSmem), name));
  int per_sm = 1, sms = 132;
  ATTN_RETURN_IF_ERROR(to_status(
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, P::kSmem), name));
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  // At most 32 chunks a sequence: a batch of one long sequence gets about one wave of long chunks
  // (each block streams long enough to hide its start) and a short merge, not 4 waves of 256-key
  // chunks and a 128-way merge (78 us at 1 x 32k, 1 x 8 heads, on the H200).
  const int max_chunks = std::min(
      kMaxChunksPerSeq, kWarps * P::kWarpBytes / static_cast<int>(sizeof(float)) / p.group);
  const SplitPlan plan = plan_split(a, p.heads_kv, std::max(per_sm, 1) * sms, kWaves, kMinChunk,
                                    max_chunks, kTileKeys);
  return run_split<T, D>(a.seqs, p, plan, s, name, [&](int chunks, const SplitPartials& sp) {
    kernel<<<dim3(static_cast<unsigned>(chunks), p.heads_kv), kThreads, P::kSmem, s>>>(p, sp);
  });
}

template <HeadDimSet kHeadDims>
Status dispatch(DType dt, const PagedDecodeArgs& a, const PagedProblem& p, Stream& stream,
                const char* name) {
  const cudaStream_t s = static_cast<cudaStream_t>(stream.cuda_stream());
  const int dev = stream.device();
  const auto by_dim = [&](auto tag) -> Status {
    using T = decltype(tag);
    return with_head_dim<kHeadDims>(p.head_dim, [&](auto d) { return launch<T, decltype(d)::value>(a, p, s, dev, name); });
  };
  return dt == DType::kBFloat16 ? by_dim(__nv_bfloat16{}) : by_dim(__half{});
}

constexpr const char* kPagedName = "paged_decode/04_warp_pipes";
constexpr const char* kDenseName = "attention/decode_mma_split";

Result<PagedProblem> paged(const PagedDecodeArgs& a) {
  return paged_problem(a, {}, kPagedDecode04Caps, kPagedName);
}

// Dense decode as a paged problem: sequence b is page b of pools [B, Hkv, Sk, D], Sk keys each.
Result<PagedProblem> dense(const AttentionArgs& a) {
  constexpr const RungCaps& kCaps = kAttentionDecodeMmaCaps;
  ATTN_ASSIGN_OR_RETURN(d, attention_dims(a.q, a.k, a.v));
  ATTN_RETURN_IF_ERROR(check_dtype(kCaps, a.q.dtype, "q.dtype", kDenseName));
  ATTN_RETURN_IF_ERROR(check_head_dim(kCaps, a.q.dtype, d.head_dim, "q.shape[3]", kDenseName));
  ATTN_RETURN_IF_ERROR(check_options(kCaps, has_window(a), a.softcap, kDenseName));
  ATTN_RETURN_IF_ERROR(check_query_rows(kCaps, d.len_q, "q.shape[2]", kDenseName));
  ATTN_RETURN_IF_ERROR(check_group(kCaps, d.heads_q / d.heads_kv, "k.shape[1]", kDenseName));
  if (d.batch > 65535 * 64 || d.heads_kv > 65535 || d.batch * d.heads_kv * d.len_kv > INT_MAX) {
    return invalid_argument(std::string("k.shape: ") + kDenseName + " takes B x Hkv x Sk < 2^31");
  }
  if (!a.lse.empty() && a.lse.dtype != DType::kFloat32)
    return invalid_argument("lse: expected float32");
  PagedProblem p{};
  p.q = a.q.data, p.o = a.o.data, p.k_pool = a.k.data, p.v_pool = a.v.data;
  p.lse = a.lse.empty() ? nullptr : static_cast<float*>(a.lse.data);
  p.n = static_cast<int>(d.batch), p.tokens = 0;
  p.heads_q = static_cast<int>(d.heads_q), p.heads_kv = static_cast<int>(d.heads_kv);
  p.group = static_cast<int>(d.heads_q / d.heads_kv), p.head_dim = static_cast<int>(d.head_dim);
  p.page_size = static_cast<int>(d.len_kv), p.fixed_len = static_cast<int>(d.len_kv);
  // One page per sequence: the page is the sequence, the row the key (a mask, not a division,
  // when Sk is a power of two).
  p.page_shift = page_shift_of(d.len_kv);
  p.scale = a.scale, p.scale_log2 = a.scale * 1.4426950408889634f;
  return p;
}

}  // namespace

Status paged_decode_04_supports(const PagedDecodeArgs& args) { return paged(args).status(); }

Status paged_decode_04_warp_pipes(const PagedDecodeArgs& args, Stream& stream) {
  ATTN_ASSIGN_OR_RETURN(p, paged(args));
  return dispatch<kPagedDecode04Caps.head_dims>(args.cache.dtype, args, p, stream, kPagedName);
}

Status attention_decode_mma_supports(const AttentionArgs& args) { return dense(args).status(); }

Status attention_decode_mma_split(const AttentionArgs& args, Stream& stream) {
  ATTN_ASSIGN_OR_RETURN(p, dense(args));
  // The planner reads the lengths from the host: B copies of Sk.
  std::vector<std::int32_t> lens(static_cast<std::size_t>(p.n), p.fixed_len);
  PagedDecodeArgs planned;
  planned.seqs.seq_lens = TensorView{DType::kInt32, {p.n}, nullptr, MemoryKind::kDevice};
  planned.seqs.seq_lens_host = lens.data();
  planned.seqs.max_seq_len = p.fixed_len;
  return dispatch<kAttentionDecodeMmaCaps.head_dims>(args.q.dtype, planned, p, stream, kDenseName);
}

}  // namespace attn::cuda
