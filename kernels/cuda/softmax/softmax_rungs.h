// The softmax ladder on CUDA, one file per rung.
#pragma once

#include "attn/executor.h"

namespace attn::cuda {

Status softmax_01_naive(const SoftmaxArgs& args, Stream& stream);
Status softmax_02_block_row(const SoftmaxArgs& args, Stream& stream);
Status softmax_03_warp_row(const SoftmaxArgs& args, Stream& stream);
Status softmax_04_online(const SoftmaxArgs& args, Stream& stream);
Status softmax_05_vectorized(const SoftmaxArgs& args, Stream& stream);
Status softmax_05_supports(const SoftmaxArgs& args);
int softmax_05_capacity(DType t);  // widest row 05 holds, in columns
Status softmax_06_split_row(const SoftmaxArgs& args, Stream& stream);
Status softmax_06_supports(const SoftmaxArgs& args);
Status softmax_07_bulk_ring(const SoftmaxArgs& args, Stream& stream);
Status softmax_07_supports(const SoftmaxArgs& args);

}  // namespace attn::cuda
