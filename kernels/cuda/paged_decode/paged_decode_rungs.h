// The KV-cache ladders on CUDA (paged_decode, paged_prefill), one file per rung: for each its
// entry points and what it takes (its RungCaps, read by its checks and by register.cu).
#pragma once

#include "attn/executor.h"
#include "attn/paged_ops.h"
#include "../common/rung_caps.h"

namespace attn::cuda {

inline constexpr RungCaps kPagedAllCaps =
    RungCaps().with_dtypes({DType::kBFloat16, DType::kFloat16, DType::kFloat32});
inline constexpr RungCaps kPagedSixteenBitCaps = RungCaps().with_dtypes({DType::kBFloat16, DType::kFloat16});

// Groups: every rung takes any number of query heads per key/value head (groups = 0), packing
// the heads of a group into its rows (up to 8 or 16 a block, more in slices).
inline constexpr RungCaps kPagedDecode01Caps =
    kPagedAllCaps.with_head_dims(kAllHeadDims).with_features(kAllFeatures);
inline constexpr RungCaps kPagedDecode02Caps = kPagedAllCaps.with_head_dims(kAllHeadDims)
                                                   .with_float32_head_dims(head_dims_up_to(128))
                                                   .with_min_arch(90);
inline constexpr RungCaps kPagedDecode03Caps =
    kPagedSixteenBitCaps.with_head_dims(head_dims_of({64, 128})).with_features(kAllFeatures);
inline constexpr RungCaps kPagedDecode04Caps =
    kPagedSixteenBitCaps.with_head_dims(kAllHeadDims).with_features(kAllFeatures).with_fp8_pages();
// Rung 04's kernel on dense K/V (Sq = 1).
inline constexpr RungCaps kAttentionDecodeMmaCaps =
    kPagedSixteenBitCaps.with_head_dims(kAllHeadDims).with_features(kAllFeatures).decoding();

inline constexpr RungCaps kPagedPrefill00Caps =
    kPagedAllCaps.with_head_dims(kAllHeadDims).with_features(kAllFeatures);
inline constexpr RungCaps kPagedPrefill01Caps =
    kPagedSixteenBitCaps.with_head_dims(kAllHeadDims).with_features(kAllFeatures);
inline constexpr RungCaps kPagedPrefill02Caps = kPagedSixteenBitCaps.with_head_dims(head_dims_up_to(128))
                                                    .with_features(kAllFeatures)
                                                    .with_more("up to 128 query heads per key/value head")
                                                    .with_page_sizes({16, 32, 64, 128})
                                                    .on_hopper_only()
                                                    .with_fp8_pages()
                                                    .with_min_arch(90);

Status paged_decode_01_supports(const PagedDecodeArgs& args);
Status paged_decode_01_block_per_head(const PagedDecodeArgs& args, Stream& stream);
Status paged_decode_02_supports(const PagedDecodeArgs& args);
Status paged_decode_02_split_kv(const PagedDecodeArgs& args, Stream& stream);
Status paged_decode_03_supports(const PagedDecodeArgs& args);
Status paged_decode_03_split_kv_mma(const PagedDecodeArgs& args, Stream& stream);
Status paged_decode_04_supports(const PagedDecodeArgs& args);
Status paged_decode_04_warp_pipes(const PagedDecodeArgs& args, Stream& stream);
// Rung 04's kernel on dense K/V (Sq = 1): a sequence per batch item, one page each.
Status attention_decode_mma_supports(const AttentionArgs& args);
Status attention_decode_mma_split(const AttentionArgs& args, Stream& stream);

Status paged_prefill_00_supports(const PagedPrefillArgs& args);
Status paged_prefill_00_block_per_row(const PagedPrefillArgs& args, Stream& stream);
Status paged_prefill_01_supports(const PagedPrefillArgs& args);
Status paged_prefill_01_flash_mma(const PagedPrefillArgs& args, Stream& stream);
Status paged_prefill_02_supports(const PagedPrefillArgs& args);
Status paged_prefill_02_wgmma(const PagedPrefillArgs& args, Stream& stream);

}  // namespace attn::cuda
