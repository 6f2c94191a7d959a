// paged_decode/04_warp_pipes over float8 e4m3 pages: rung 04's plan, warps and per-warp cp.async
// pipelines (split_kv_mma_core.cuh), reading half the bytes.
// - The pages' codes land in shared memory as they are (rows of D bytes, XOR-swizzled 16-byte
//   chunks), with each key's K and V scales beside them (4-byte cp.async from the (page, kv head)
//   scale arrays), and are widened in registers: ldmatrix hands each lane 4 codes, and integer
//   operations place each code's sign, exponent and mantissa into a float16 (an e4m3 code shifted
//   into float16's fields is the code's value x 2^-8 exactly, subnormals included; the 2^8 joins
//   the scales): shifts and masks on the integer pipes (cvt.f16x2.e4m3x2 measured the same on the
//   H100; the kernel was latency-bound, not conversion-bound: see kStages). The MMAs run in float16
//   whatever the query's type (the widened codes are exact there; the query is rounded to it once).
// - A 32-bit word of codes [c0 c1 c2 c3] widens into the pairs (c0, c2) and (c1, c3).
// - K: ldmatrix gives lane (g, t4) dims 4 t4 .. 4 t4 + 3 of key g of a 16-dim chunk, so the dims of
//   the MMA's k index are permuted ((4 t4, 4 t4 + 2) then (4 t4 + 1, 4 t4 + 3)); the query
//   fragments are loaded with the same permutation (a dot product does not care about the order of
//   its terms). Scores are scaled per key by its K scale.
// - V: ldmatrix.trans on codes read as 16-bit pairs gives lane (g, t4) keys 2 t4, 2 t4 + 1 of dims
//   2 g, 2 g + 1: the widening's pairs are then the two keys of dim 2 g and of 2 g + 1, so each
//   chunk of 16 dims is two n8 MMAs over interleaved dims, and the keys line up with the
//   probabilities' fragment as in the 16-bit kernel. The V scales multiply the probabilities,
//   relative to the largest of the warp's 16 keys (a per-tile reference the output accumulator is
//   kept in, rescaled with the running max: powers of two, so exact).
// - A NaN code (the cache holds one only where a client appended NaN) widens to a finite value.
// Groups: up to 16 query heads a block, larger groups in slices of 16 (the K/V bytes of the
// second slice on come from L2).
#pragma once

#include "split_kv_mma_core.cuh"

namespace attn::cuda::split_kv_fp8 {

using namespace split_kv_mma;

// Bytes of a shared-memory row of D codes: padded to 64, 128 or 256 (as the 16-bit rows are to
// that many elements), so that 8 rows' same chunk spread over the banks under the XOR swizzle.
template <int D>
constexpr int row_bytes() {
  return padded_dim<D>();
}
template <int D>
__device__ __forceinline__ unsigned swizzled(int row, int chunk) {
  constexpr int kRow = row_bytes<D>();
  if constexpr (kRow == 64) return static_cast<unsigned>(row * 64 + ((chunk ^ ((row >> 1) & 3)) << 4));
  return static_cast<unsigned>(row * kRow + ((chunk ^ (row & 7)) << 4));
}

__device__ __forceinline__ void cp_async4(unsigned dst, const void* src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 4 : 0));
}
__device__ __forceinline__ void ldsm_x2(unsigned (&r)[2], unsigned addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(addr));
}
__device__ __forceinline__ void ldsm_x2_trans(unsigned (&r)[2], unsigned addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(addr));
}
// Codes [c0 c1 c2 c3] (c0 the low byte) as float16 pairs of their values x 2^-8: (c0, c2) and
// (c1, c3). Sign to bit 15, exponent and mantissa (7 bits) to bits 13..7 of each half.
__device__ __forceinline__ unsigned pairs02(unsigned w) {
  return ((w << 8) & 0x80008000u) | ((w << 7) & 0x3f803f80u);
}
__device__ __forceinline__ unsigned pairs13(unsigned w) { return (w & 0x80008000u) | ((w >> 1) & 0x3f803f80u); }
// The factor the widened codes are short of.
constexpr float kWidened = 256.0f;

// A pipeline per warp, as rung 04's: the warp's tile u is keys 16 (4u + w) .. + 15 of the chunk;
// a stage holds their K codes, V codes, then 16 K scales and 16 V scales.
template <int D>
struct WarpPipe8 {
  static constexpr int kTileBytes = 16 * row_bytes<D>();
  static constexpr int kScaleOffset = 2 * kTileBytes;
  static constexpr int kStageBytes = 2 * kTileBytes + 128;
  // ~12 KB a warp (at least 3 stages), ~50 KB a block: 3 blocks an SM at D 128 (12 warps; the
  // registers allow 3). With rung 04's 24 KB a warp (2 blocks, 8 warps) the kernel was latency-bound:
  // 4.4 cycles between a warp's instructions, DRAM 56% busy (ncu, H100); the bytes in flight
  // (8 KB a warp, 96 KB an SM) still cover the memory's latency.
  static constexpr int kStages = 12800 / kStageBytes > 3 ? 12800 / kStageBytes : 3;
  static constexpr int kWarpBytes = kStages * kStageBytes;
  static constexpr int kRingBytes = kWarps * kWarpBytes;
  static constexpr int kChunks = D / 16;  // 16-byte chunks of a row's codes

  const PagedProblem& p;
  const int* pages;
  const unsigned char *kpool, *vpool;
  int i, hkv, k_begin, k_end;
  unsigned wbase;
  int warp, lane;

  __device__ __forceinline__ WarpPipe8(const PagedProblem& p_, const int* pages_, int i_, int hkv_, int k_begin_,
                                       int k_end_, unsigned base, int warp_, int lane_)
      : p(p_), pages(pages_), kpool(static_cast<const unsigned char*>(p_.k_pool)),
        vpool(static_cast<const unsigned char*>(p_.v_pool)), i(i_), hkv(hkv_), k_begin(k_begin_), k_end(k_end_),
        wbase(base + warp_ * kWarpBytes), warp(warp_), lane(lane_) {}

  static __device__ __forceinline__ int tiles(int first, int end, int w) {
    const int all_tiles = (end - first + 15) / 16;
    return all_tiles > w ? (all_tiles - w + kWarps - 1) / kWarps : 0;
  }
  __device__ __forceinline__ int first_key(int u) const { return k_begin + (u * kWarps + warp) * 16; }

  __device__ __forceinline__ void load_tile(int u) const {  // keys [j0, j0 + 16), zeros past k_end
    const unsigned kst = wbase + (u % kStages) * kStageBytes, vst = kst + kTileBytes;
    const int j0 = first_key(u);
#pragma unroll
    for (int idx = lane; idx < 16 * kChunks; idx += 32) {
      const int row = idx / kChunks, chunk = idx % kChunks, j = j0 + row;
      const bool valid = j < k_end;
      const long long off = valid ? p.key_offset(pages, i, hkv, j) + chunk * 16 : 0;
      cp_async16(kst + swizzled<D>(row, chunk), kpool + off, valid);
      cp_async16(vst + swizzled<D>(row, chunk), vpool + off, valid);
    }
    // Lanes 0-15: key `lane`'s K scale; 16-31: key lane - 16's V scale (zero past k_end).
    const int row = lane % 16, j = j0 + row;
    const bool valid = j < k_end;
    const long long at = valid ? static_cast<long long>(p.page_of(pages, i, j)) * p.heads_kv + hkv : 0;
    cp_async4(kst + kScaleOffset + lane * 4, (lane < 16 ? p.k_scales : p.v_scales) + at, valid);
  }
  __device__ __forceinline__ void start(int count) const {
#pragma unroll
    for (int u = 0; u < kStages - 1; ++u) {
      if (u < count) load_tile(u);
      cp_async_commit();
    }
  }
  __device__ __forceinline__ unsigned wait(int t, int count) const {
    cp_async_wait<kStages - 2>();
    __syncwarp();
    if (t + kStages - 1 < count) load_tile(t + kStages - 1);
    cp_async_commit();
    return wbase + (t % kStages) * kStageBytes;
  }
};

// The query rows g and g + 8 (heads h0 + g, h0 + g + 8 of sequence i) as float16 A fragments with
// the dims of each 16-dim chunk permuted as the widened codes come: a0 = dims 4 t4, 4 t4 + 2;
// a2 = 4 t4 + 1, 4 t4 + 3. Float16 saturates (a query beyond +-65504 is clamped).
template <class T, int D>
__device__ __forceinline__ void load_query_rows_f16(const PagedProblem& p, int i, int h0, int group, int g, int t4,
                                                    unsigned (&qf)[D / 16][4]) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = g + 8 * r;
    const T* q = row < group ? static_cast<const T*>(p.q) + (static_cast<long long>(i) * p.heads_q + h0 + row) * D
                             : nullptr;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      float x[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      if (q) {
        const uint2 raw = __ldg(reinterpret_cast<const uint2*>(q + kk * 16 + 4 * t4));
        const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
        for (int k = 0; k < 4; ++k) {  // NaN stays NaN
          x[k] = to_float(e[k]);
          if (fabsf(x[k]) > 65504.0f) x[k] = copysignf(65504.0f, x[k]);
        }
      }
      qf[kk][r] = pack2<__half>(x[0], x[2]);
      qf[kk][2 + r] = pack2<__half>(x[1], x[3]);
    }
  }
}

// One warp's 16 keys from float8 codes: S = Q K^T (float16 MMAs), x each key's K scale, mapped and
// masked; the online softmax; O += P V with P x (V scale / the tile's largest V scale). The output
// accumulator is kept in units of the current tile's reference V scale (vref), rescaled when it
// changes. kst: the stage; lane_off: the lane's ldmatrix offset in a 16-key tile (the same for K
// and V).
template <int D>
__device__ __forceinline__ void attend16_fp8(const unsigned (&qf)[D / 16][4], unsigned kst, unsigned lane_off, int jw,
                                             int k_end, const ScoreMap& score, int t4, float (&o)[D / 8][4],
                                             float (&m)[2], float (&l)[2], float& vref) {
  using L = WarpPipe8<D>;
  const unsigned vst = kst + L::kTileBytes, sst = kst + L::kScaleOffset;
  // Two accumulators per n-tile (even and odd chunks): chains of D / 32 dependent MMAs, not D / 16.
  float s[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
  float s2[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
#pragma unroll
  for (int kk = 0; kk < D / 16; kk += 2) {
    if (kk + 1 < D / 16) {
      unsigned r[4];
      ldsm_x4(r, kst + (lane_off ^ (kk << 4)));
      mma16816<__half>(s[0], qf[kk], pairs02(r[0]), pairs13(r[0]));
      mma16816<__half>(s[1], qf[kk], pairs02(r[1]), pairs13(r[1]));
      mma16816<__half>(s2[0], qf[kk + 1], pairs02(r[2]), pairs13(r[2]));
      mma16816<__half>(s2[1], qf[kk + 1], pairs02(r[3]), pairs13(r[3]));
    } else {
      unsigned r[2];
      ldsm_x2(r, kst + (lane_off ^ (kk << 4)));
      mma16816<__half>(s[0], qf[kk], pairs02(r[0]), pairs13(r[0]));
      mma16816<__half>(s[1], qf[kk], pairs02(r[1]), pairs13(r[1]));
    }
  }
#pragma unroll
  for (int n = 0; n < 2; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) s[n][e] += s2[n][e];
  // The lane's keys: 2 t4, 2 t4 + 1 (n = 0) and 8 + 2 t4, 9 + 2 t4 (n = 1).
  float ks[2][2], vs[2][2];
#pragma unroll
  for (int n = 0; n < 2; ++n) {
    float2 kv, vv;
    asm volatile("ld.shared.v2.f32 {%0,%1}, [%2];\n" : "=f"(kv.x), "=f"(kv.y) : "r"(sst + (n * 8 + 2 * t4) * 4));
    asm volatile("ld.shared.v2.f32 {%0,%1}, [%2];\n" : "=f"(vv.x), "=f"(vv.y) : "r"(sst + 64 + (n * 8 + 2 * t4) * 4));
    ks[n][0] = kv.x * kWidened, ks[n][1] = kv.y * kWidened, vs[n][0] = vv.x, vs[n][1] = vv.y;
  }
  float vmax = fmaxf(fmaxf(vs[0][0], vs[0][1]), fmaxf(vs[1][0], vs[1][1]));
  vmax = fmaxf(vmax, __shfl_xor_sync(0xffffffffu, vmax, 1));
  vmax = fmaxf(vmax, __shfl_xor_sync(0xffffffffu, vmax, 2));
  const float vref_tile = vmax > 0.0f ? vmax : (vref > 0.0f ? vref : 1.0f);
  const float ratio = vref > 0.0f ? vref * __frcp_rn(vref_tile) : 1.0f;  // powers of two: exact
  const float inv_ref = __frcp_rn(vref_tile);
  vref = vref_tile;
  const bool whole = jw + 16 <= k_end;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float mx = -INFINITY;
#pragma unroll
    for (int n = 0; n < 2; ++n)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float v = score(s[n][2 * r + e] * ks[n][e]);
        if (!whole && jw + n * 8 + 2 * t4 + e >= k_end) v = -INFINITY;
        s[n][2 * r + e] = v;
        mx = fmaxf(mx, v);
      }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float m_new = fmaxf(m[r], mx);
    const float m_use = m_new == -INFINITY ? 0.0f : m_new;
    const float alpha = exp2f(m[r] - m_use);
    m[r] = m_new;
    float sum = 0.0f;
#pragma unroll
    for (int n = 0; n < 2; ++n)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const float pe = exp2f(s[n][2 * r + e] - m_use);
        sum += pe;
        s[n][2 * r + e] = pe * (vs[n][e] * inv_ref);
      }
    l[r] = l[r] * alpha + sum;
    const float rescale = alpha * ratio;
#pragma unroll
    for (int n = 0; n < D / 8; ++n) o[n][2 * r] *= rescale, o[n][2 * r + 1] *= rescale;
  }
  const unsigned pf[4] = {pack2<__half>(s[0][0], s[0][1]), pack2<__half>(s[0][2], s[0][3]),
                          pack2<__half>(s[1][0], s[1][1]), pack2<__half>(s[1][2], s[1][3])};
  // V: for chunk c, o[2c] holds dims 16c + 4 t4 + {0, 2}, o[2c + 1] dims 16c + 4 t4 + {1, 3}.
#pragma unroll
  for (int kk = 0; kk < D / 16; kk += 2) {
    if (kk + 1 < D / 16) {
      unsigned r[4];
      ldsm_x4_trans(r, vst + (lane_off ^ (kk << 4)));
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        mma16816<__half>(o[2 * (kk + c)], pf, pairs02(r[2 * c]), pairs02(r[2 * c + 1]));
        mma16816<__half>(o[2 * (kk + c) + 1], pf, pairs13(r[2 * c]), pairs13(r[2 * c + 1]));
      }
    } else {
      unsigned r[2];
      ldsm_x2_trans(r, vst + (lane_off ^ (kk << 4)));
      mma16816<__half>(o[2 * kk], pf, pairs02(r[0]), pairs02(r[1]));
      mma16816<__half>(o[2 * kk + 1], pf, pairs13(r[0]), pairs13(r[1]));
    }
  }
}

template <class T, int D>
__global__ void __launch_bounds__(kThreads) split_kv_fp8_kernel(PagedProblem p, SplitPartials sp) {
  using L = WarpPipe8<D>;
  extern __shared__ __align__(128) unsigned char smem_raw[];
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
  const int* pages = p.page_indices + __ldg(p.page_indptr + i);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t4 = lane % 4;
  const int tiles = L::tiles(k_begin, k_end, warp);
  const L load(p, pages, i, hkv, k_begin, k_end, base, warp, lane);
  load.start(tiles);

  unsigned qf[D / 16][4];
  load_query_rows_f16<T, D>(p, i, h0, group, g, t4, qf);
  float o[D / 8][4], m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f}, vref = 0.0f;
#pragma unroll
  for (int n = 0; n < D / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
  // ldmatrix lanes: matrix lane / 8 is keys 8 (mi % 2) .. + 7 of chunk mi / 2 (K plain, V
  // transposed): the chunk pair kk, kk + 1 by XOR-ing kk << 4 into the offset.
  const int mi = lane / 8, lrow = (mi % 2) * 8 + lane % 8;
  const unsigned lane_off = swizzled<D>(lrow, mi / 2);

  for (int t = 0; t < tiles; ++t) {
    const unsigned kst = load.wait(t, tiles);
    attend16_fp8<D>(qf, kst, lane_off, load.first_key(t), k_end, score, t4, o, m, l, vref);
  }
  cp_async_wait<0>();
  __syncthreads();  // the stages are free: the warps' outputs merge there

  float* staged = reinterpret_cast<float*>(smem);  // [kWarps][16][D]
  static_assert(kWarps * 16 * D * sizeof(float) <= L::kRingBytes);
  vref *= kWidened;  // the accumulator's unit: the last tile's reference V scale x 2^8
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
    const int row = g + 8 * r;
    if (row >= group) continue;
    if (t4 == 0) red_m[warp][row] = m[r], red_l[warp][row] = l[r];
#pragma unroll
    for (int c = 0; c < D / 16; ++c)
      *reinterpret_cast<float4*>(staged + (warp * 16 + row) * D + c * 16 + 4 * t4) =
          make_float4(o[2 * c][2 * r] * vref, o[2 * c + 1][2 * r] * vref, o[2 * c][2 * r + 1] * vref,
                      o[2 * c + 1][2 * r + 1] * vref);
  }
  __syncthreads();
  merge_warp_rows<T, D>(p, sp, staged, red_m, red_l, i, x, h0, group, chunks);
  if (chunks == 1) return;
  merge_chunks_if_last<T, D, kThreads>(p, sp, i, hkv * slices + slice, p.heads_kv * slices, h0, group, x0,
                                       chunks, reinterpret_cast<float*>(smem), last_block);
}

template <class T, int D>
Status launch(const PagedDecodeArgs& a, const PagedProblem& p, cudaStream_t s, int device, const char* name) {
  using L = WarpPipe8<D>;
  constexpr int kSmem = L::kRingBytes + 1024;
  constexpr auto kernel = split_kv_fp8_kernel<T, D>;
  LaunchFit fit;
  ATTN_RETURN_IF_ERROR((launch_fit<kernel, kThreads, kSmem>(device, name, &fit)));
  const int slices = (p.group + kMaxGroup - 1) / kMaxGroup;
  const int max_chunks =
      std::min(kMaxChunksPerSeq, L::kRingBytes / static_cast<int>(sizeof(float)) / std::min(p.group, kMaxGroup));
  const SplitPlan plan = plan_split(a, static_cast<std::int64_t>(p.heads_kv) * slices, fit.resident(),
                                    kWaves, kMinChunk, max_chunks, kTileKeys);
  return run_split<T, D>(p, plan, p.heads_kv * slices, s, name, [&](int chunks, const SplitPartials& sp) {
    kernel<<<dim3(static_cast<unsigned>(chunks * slices), p.heads_kv), kThreads, kSmem, s>>>(p, sp);
  });
}

template <unsigned kHeadDims>
Status dispatch(DType dt, const PagedDecodeArgs& a, const PagedProblem& p, Stream& stream, const char* name) {
  const cudaStream_t s = static_cast<cudaStream_t>(stream.cuda_stream());
  const int dev = stream.device();
  const auto by_dim = [&](auto tag) -> Status {
    using T = decltype(tag);
    return with_head_dim<kHeadDims>(p.head_dim,
                                    [&](auto d) { return launch<T, decltype(d)::value>(a, p, s, dev, name); });
  };
  return dt == DType::kBFloat16 ? by_dim(__nv_bfloat16{}) : by_dim(__half{});
}

}  // namespace attn::cuda::split_kv_fp8
