// The attention ladder on CUDA, one file per rung, and the decoding variants: for each its entry
// points and what it takes (its RungCaps, read by its checks and by register.cu).
#pragma once

#include "attn/executor.h"
#include "../common/rung_caps.h"

namespace attn::cuda {

inline constexpr RungCaps kFloat32Caps = RungCaps().with_dtypes({DType::kFloat32});
inline constexpr RungCaps kSixteenBitCaps = RungCaps().with_dtypes({DType::kBFloat16, DType::kFloat16});

inline constexpr RungCaps kAttention01Caps = kFloat32Caps.with_head_dims(head_dims_of({32, 64, 128, 256}))
                                                 .with_features(kAllFeatures)
                                                 .with_more("S = B x Hq x Sq x Sk floats must fit in 8 GiB");
inline constexpr RungCaps kAttention02Caps =
    kFloat32Caps.with_head_dims(kAllHeadDims).with_features(kAllFeatures);
inline constexpr RungCaps kAttention03Caps =
    kSixteenBitCaps.with_head_dims(kAllHeadDims).with_features(kAllFeatures);
inline constexpr RungCaps kAttention04Caps =
    kSixteenBitCaps.with_head_dims(kAllHeadDims).with_features(kAllFeatures).on_hopper_only();
inline constexpr RungCaps kAttentionDecodeCaps =
    kSixteenBitCaps.with_head_dims(head_dims_of({64, 128})).decoding();

Status attention_01_naive(const AttentionArgs& args, Stream& stream);
Status attention_01_supports(const AttentionArgs& args);
Status attention_02_flash_fp32(const AttentionArgs& args, Stream& stream);
Status attention_02_supports(const AttentionArgs& args);
Status attention_03_flash_mma(const AttentionArgs& args, Stream& stream);
Status attention_03_supports(const AttentionArgs& args);
Status attention_04_wgmma_tma(const AttentionArgs& args, Stream& stream);
Status attention_04_supports(const AttentionArgs& args);
Status attention_decode_split_kv(const AttentionArgs& args, Stream& stream);
Status attention_decode_supports(const AttentionArgs& args);

}  // namespace attn::cuda
