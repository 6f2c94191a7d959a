// paged_prefill/00_block_per_row: the simple correct rung of the prefill ladder, and the one that
// takes everything: paged_decode/01's kernel (common/paged_rows.cuh) with a block per (new token,
// key/value head, slice of its GQA group), each token walking the keys it sees (causal or not, its
// window) on CUDA cores. Every new token re-reads its sequence's keys, so it is the slowest rung;
// rung 01 tiles the tokens so that a K/V tile serves 128 query rows at once.
// float32, bfloat16, float16; every head dim of common/head_dims.cuh; any number of query heads
// per key/value head; any page size; sliding windows, soft caps and attention sinks.
#include "../common/paged_rows.cuh"
#include "../paged_decode/paged_decode_rungs.h"

namespace attn::cuda {

namespace {
constexpr const char* kName = "paged_prefill/00_block_per_row";
}

Status paged_prefill_00_supports(const PagedPrefillArgs& args) {
  return paged_problem(args, args.q_indptr, kPagedPrefill00Caps, kName).status();
}

Status paged_prefill_00_block_per_row(const PagedPrefillArgs& args, Stream& stream) {
  ATTN_ASSIGN_OR_RETURN(p, paged_problem(args, args.q_indptr, kPagedPrefill00Caps, kName));
  return paged_rows::dispatch(args, p, stream, kName);
}

}  // namespace attn::cuda
