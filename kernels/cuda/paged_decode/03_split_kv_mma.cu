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
// The kernel and its block-wide K/V loader (BlockPipe) are common/split_kv_mma_core.cuh, shared
// with rung 04 (whose own loader is per warp, and which takes this one for groups past 16).
// bfloat16/float16; head dims 64, 128; any number of query heads per key/value head (16 a block;
// larger groups on the core's wide path, the warps splitting the heads); any page size; windows,
// soft caps and sinks.
#include "../common/split_kv_mma_core.cuh"
#include "paged_decode_rungs.h"

namespace attn::cuda {
namespace {

using namespace split_kv_mma;

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
