// paged_decode/01_block_per_head: the simple correct rung. One launch appends every sequence's
// new K/V row to its page; then a block per (sequence, key/value head, slice of its GQA group)
// walks the keys the new token sees, page by page, for every query head of the slice (each K/V
// row is read once per slice of up to 8 heads).
// - Lanes split a key's head dim in 16-byte pieces, so a warp reads whole rows coalesced; the
//   block's warps take keys round-robin, each stream keeping a running max, sum and output per
//   query head, merged in shared memory at the end (common/paged_rows.cuh, shared with
//   paged_prefill/00).
// - No pipelining and no split of long sequences: a batch of few long sequences leaves most SMs
//   idle, and each load waits for the page table read before it. Rung 02 fixes both.
// float32, bfloat16, float16; every head dim of common/head_dims.cuh; any number of query heads
// per key/value head; any page size; sliding windows (only the keys in the window are read), soft
// caps and attention sinks.
#include "../common/paged_rows.cuh"
#include "paged_decode_rungs.h"

namespace attn::cuda {

namespace {
constexpr const char* kName = "paged_decode/01_block_per_head";
}

Status paged_decode_01_supports(const PagedDecodeArgs& args) {
  return paged_problem(args, {}, kPagedDecode01Caps, kName).status();
}

Status paged_decode_01_block_per_head(const PagedDecodeArgs& args, Stream& stream) {
  ATTN_ASSIGN_OR_RETURN(p, paged_problem(args, {}, kPagedDecode01Caps, kName));
  return paged_rows::dispatch(args, p, stream, kName);
}

}  // namespace attn::cuda
