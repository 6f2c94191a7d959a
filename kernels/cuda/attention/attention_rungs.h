// The attention ladder on CUDA, one file per rung, and the decoding variant.
#pragma once

#include "attn/executor.h"

namespace attn::cuda {

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
