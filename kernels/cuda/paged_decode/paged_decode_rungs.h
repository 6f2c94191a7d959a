// The KV-cache ladders on CUDA (paged_decode, paged_prefill), one file per rung.
#pragma once

#include "attn/executor.h"
#include "attn/paged_ops.h"

namespace attn::cuda {

Status paged_decode_01_supports(const PagedDecodeArgs& args);
Status paged_decode_01_block_per_head(const PagedDecodeArgs& args, Stream& stream);
Status paged_decode_02_supports(const PagedDecodeArgs& args);
Status paged_decode_02_split_kv(const PagedDecodeArgs& args, Stream& stream);
Status paged_decode_03_supports(const PagedDecodeArgs& args);
Status paged_decode_03_split_kv_mma(const PagedDecodeArgs& args, Stream& stream);
Status paged_decode_04_supports(const PagedDecodeArgs& args);
Status paged_decode_04_warp_pipes(const PagedDecodeArgs& args, Stream& stream);
// Rung 03's kernel on dense K/V (Sq = 1): a sequence per batch item, one page each.
Status attention_decode_mma_supports(const AttentionArgs& args);
Status attention_decode_mma_split(const AttentionArgs& args, Stream& stream);

Status paged_prefill_01_supports(const PagedPrefillArgs& args);
Status paged_prefill_01_flash_mma(const PagedPrefillArgs& args, Stream& stream);
Status paged_prefill_02_supports(const PagedPrefillArgs& args);
Status paged_prefill_02_wgmma(const PagedPrefillArgs& args, Stream& stream);

}  // namespace attn::cuda
