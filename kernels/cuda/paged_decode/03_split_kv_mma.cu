// paged_decode/03_split_kv_mma: rung 02's plan (equal chunks over the ragged batch, about 4
// waves, LSE merge by the last block) with the scores and the output on tensor cores.
// - Why: rung 02 does the GQA group's dot products on CUDA cores, ~58 warp instructions per key
//   row (16-byte pieces, 4 shuffle steps per score, conversions, exp2, FMAs): at 4 TB/s that is
//   half the H200's issue rate, and it measured 0.6x the copy. Here the group's query heads are
//   the rows of one m16n8k16 A operand (padded to 16: the tensor cores have cycles to spare), so
//   16 keys cost 32 mma, 16 ldmatrix and a 16-wide softmax per warp: ~6 instructions a key.
// - A block of 4 warps takes tiles of 64 keys, each warp its own 16 keys with its own running
//   max, sum and output (merged through shared memory at the end), so no barrier sits between
//   the warps' softmaxes; one __syncthreads per tile hands the stage back.
// - Pages gather with cp.async, 16 bytes a thread, into XOR-swizzled rows (ldmatrix conflict
//   free), 3 stages of 64 keys at D = 128 (6 at D = 64) in flight: 96 KB a block, 2 blocks an SM.
//   Keys past the chunk are zero-filled by the copy itself, so masked V rows stay finite.
// The kernel is common/split_kv_mma_core.cuh (shared with rung 04); this file is its K/V loader,
// the block-wide pipeline above. bfloat16/float16; head dims 64, 128; any number of query heads
// per key/value head (16 a block, more in slices); any page size; windows, soft caps and sinks.
#include "../common/split_kv_mma_core.cuh"
#include "paged_decode_rungs.h"

namespace attn::cuda {
namespace {

using namespace split_kv_mma;

// One pipeline for the block: stage t % kStages holds the K then the V rows of keys
// [64 t, 64 t + 64) of the chunk; warp w computes rows 16 w .. 16 w + 15 of each.
template <class T, int D>
struct BlockPipe {
  static constexpr int kTileBytes = kTileKeys * D * 2;  // K or V of one tile
  static constexpr int kStageBytes = 2 * kTileBytes;
  static constexpr int kStages = D == 64 ? 6 : 3;
  static constexpr int kRingBytes = kStages * kStageBytes;
  static constexpr int kChunks = D / 8, kRowsPerPass = kThreads / kChunks;

  const PagedProblem& p;
  const int* pages;
  const T *kpool, *vpool;
  int i, hkv, k_begin, k_end;
  unsigned base;
  int warp, load_row, load_chunk;

  __device__ __forceinline__ BlockPipe(const PagedProblem& p_, const int* pages_, const T* kpool_,
                                       const T* vpool_, int i_, int hkv_, int k_begin_, int k_end_,
                                       unsigned base_, int warp_, int)
      : p(p_), pages(pages_), kpool(kpool_), vpool(vpool_), i(i_), hkv(hkv_), k_begin(k_begin_),
        k_end(k_end_), base(base_), warp(warp_), load_row(threadIdx.x / kChunks),
        load_chunk(threadIdx.x % kChunks) {}

  static __device__ __forceinline__ int warp_row(int w) { return w * 16; }
  static __device__ __forceinline__ int tiles(int first, int end, int) {
    return (end - first + kTileKeys - 1) / kTileKeys;  // every warp computes every tile
  }
  __device__ __forceinline__ int first_key(int t) const { return k_begin + t * kTileKeys + warp * 16; }

  __device__ __forceinline__ void load_tile(int t) const {  // keys [j0, j0 + 64), zeros past k_end
    const unsigned kst = base + (t % kStages) * kStageBytes, vst = kst + kTileBytes;
    const int j0 = k_begin + t * kTileKeys;
#pragma unroll
    for (int pass = 0; pass < kTileKeys / kRowsPerPass; ++pass) {
      const int row = load_row + pass * kRowsPerPass, j = j0 + row;
      const bool valid = j < k_end;
      const long long off = valid ? p.key_offset(pages, i, hkv, j) + load_chunk * 8 : 0;
      const unsigned dst = swizzled_bytes<D>(row, load_chunk);
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

constexpr const char* kPagedName = "paged_decode/03_split_kv_mma";

Result<PagedProblem> paged(const PagedDecodeArgs& a) {
  return paged_problem(a, {}, kPagedDecode03Caps, kPagedName);
}

}  // namespace

Status paged_decode_03_supports(const PagedDecodeArgs& args) { return paged(args).status(); }

Status paged_decode_03_split_kv_mma(const PagedDecodeArgs& args, Stream& stream) {
  ATTN_ASSIGN_OR_RETURN(p, paged(args));
  return split_kv_mma::dispatch<BlockPipe, kPagedDecode03Caps.head_dims>(args.cache.dtype, args, p,
                                                                         stream, kPagedName);
}

}  // namespace attn::cuda
