// paged_decode/04_warp_pipes: rung 03 with a cp.async pipeline per warp instead of per block.
// - Why: in rung 03 one __syncthreads per 64-key tile ties the 4 warps together: a tile's loads
//   are issued only after the slowest warp finished the tile before, and a late page stalls all
//   four. Here each warp streams its own 16-key tiles (keys 16 (4u + w) .. of the chunk for warp
//   w) through its own 3 stages (6 at D = 64) with cp.async and __syncwarp only: 8 independent
//   streams per SM instead of 2, the same 96 KB a block, the same bytes in flight.
// - Everything else is rung 03's (common/split_kv_mma_core.cuh: the plan, the mma.sync tiles, the
//   swizzle, the merges); this file is the per-warp loader and the registrations.
// - The same kernel reads dense [B, Hkv, Sk, D] K/V as one page per sequence: registered also as
//   attention/decode_mma_split for Sq = 1.
// bfloat16/float16; every head dim of common/head_dims.cuh (rows padded in shared memory to 64,
// 128 or 256, as in attention/03); any number of query heads per key/value head (16 a block;
// larger groups on the core's wide path: the warps split the heads over block-wide 64-key tiles,
// 64 heads a block); any page size; sliding windows (the plan splits only the keys in the window), soft
// caps and attention sinks.
// float8 e4m3 pages: common/split_kv_fp8.cuh (the same plan and pipelines, codes widened in
// registers).
#include <vector>

#include "../common/split_kv_fp8.cuh"
#include "../common/split_kv_mma_core.cuh"
#include "paged_decode_rungs.h"

namespace attn::cuda {
namespace {

using namespace split_kv_mma;

// A pipeline per warp: the warp's tile u is keys 16 (4u + w) .. + 15 of the chunk, its stage
// u % kStages the K then the V rows of those 16 keys, in the warp's own slice of the stages.
template <class T, int D>
struct WarpPipe {
  static constexpr int kTileBytes = 16 * padded_dim<D>() * 2;  // K or V of one warp's tile of 16 keys
  static constexpr int kStageBytes = 2 * kTileBytes;
  static constexpr int kStages = padded_dim<D>() == 64 ? 6 : 3;  // per warp
  static constexpr int kWarpBytes = kStages * kStageBytes;
  static constexpr int kRingBytes = kWarps * kWarpBytes;
  // A lane copies chunk `load_chunk` of rows load_row, + 32 / kChunks, ...; where the chunks of a
  // row do not divide 32 (D = 80, 96, 192), the lanes walk the tile's chunks in order instead.
  static constexpr int kChunks = D / 8;
  static constexpr bool kEven = 32 % kChunks == 0;

  const PagedProblem& p;
  const int* pages;
  const T *kpool, *vpool;
  int i, hkv, k_begin, k_end;
  unsigned wbase;
  int warp, lane, load_row, load_chunk;

  __device__ __forceinline__ WarpPipe(const PagedProblem& p_, const int* pages_, const T* kpool_,
                                      const T* vpool_, int i_, int hkv_, int k_begin_, int k_end_,
                                      unsigned base, int warp_, int lane_)
      : p(p_), pages(pages_), kpool(kpool_), vpool(vpool_), i(i_), hkv(hkv_), k_begin(k_begin_),
        k_end(k_end_), wbase(base + warp_ * kWarpBytes), warp(warp_), lane(lane_),
        load_row(lane_ / kChunks), load_chunk(lane_ % kChunks) {}

  static __device__ __forceinline__ int warp_row(int) { return 0; }
  static __device__ __forceinline__ int tiles(int first, int end, int w) {
    const int all_tiles = (end - first + 15) / 16;
    return all_tiles > w ? (all_tiles - w + kWarps - 1) / kWarps : 0;  // warp w's
  }
  __device__ __forceinline__ int first_key(int u) const { return k_begin + (u * kWarps + warp) * 16; }

  __device__ __forceinline__ void load_tile(int u) const {  // keys [j0, j0 + 16), zeros past k_end
    const unsigned kst = wbase + (u % kStages) * kStageBytes, vst = kst + kTileBytes;
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
      constexpr int kRowsPerPass = 32 / kChunks;
#pragma unroll
      for (int pass = 0; pass < 16 / kRowsPerPass; ++pass) copy(load_row + pass * kRowsPerPass, load_chunk);
    } else {
#pragma unroll
      for (int idx = lane; idx < 16 * kChunks; idx += 32) copy(idx / kChunks, idx % kChunks);
    }
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
    __syncwarp();  // tile t has landed for every lane; stage (t - 1) % kStages is free
    if (t + kStages - 1 < count) load_tile(t + kStages - 1);
    cp_async_commit();
    return wbase + (t % kStages) * kStageBytes;
  }
};

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
  ATTN_RETURN_IF_ERROR(check_options(kCaps, has_window(a), a.softcap, !a.sinks.empty(), kDenseName));
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
  // The one query sits at key Sk - 1: a window keeps its last window_left + 1 keys (the right side
  // has nothing past it).
  p.window_left = static_cast<int>(std::min<std::int64_t>(a.window_left, INT_MAX / 2));
  if (a.softcap > 0.0f) p.cap_pre = a.scale / a.softcap, p.cap_log2 = a.softcap * 1.4426950408889634f;
  if (!a.sinks.empty()) {
    ATTN_RETURN_IF_ERROR(check_sinks(a.sinks, d.heads_q));
    p.sinks = static_cast<const float*>(a.sinks.data);
  }
  return p;
}

}  // namespace

Status paged_decode_04_supports(const PagedDecodeArgs& args) { return paged(args).status(); }

Status paged_decode_04_warp_pipes(const PagedDecodeArgs& args, Stream& stream) {
  ATTN_ASSIGN_OR_RETURN(p, paged(args));
  if (p.fp8)
    return split_kv_fp8::dispatch<kPagedDecode04Caps.head_dims>(args.cache.dtype, args, p, stream, kPagedName);
  return split_kv_mma::dispatch<WarpPipe, kPagedDecode04Caps.head_dims>(args.cache.dtype, args, p, stream,
                                                                        kPagedName);
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
  planned.mask.window_left = p.window_left;
  return split_kv_mma::dispatch<WarpPipe, kAttentionDecodeMmaCaps.head_dims>(args.q.dtype, planned, p, stream,
                                                                             kDenseName);
}

}  // namespace attn::cuda
