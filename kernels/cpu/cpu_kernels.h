// The CPU backend's kernels, registered in register.cc.
#pragma once

#include "attn/executor.h"
#include "attn/ops.h"
#include "attn/paged_ops.h"

namespace attn::cpu {

Status matmul_blocked(const MatmulArgs& args, Stream& stream);
Status matmul_openblas(const MatmulArgs& args, Stream& stream);
Status matmul_openblas_supports(const MatmulArgs& args);
Status softmax_rows(const SoftmaxArgs& args, Stream& stream);
Status attention_rows(const AttentionArgs& args, Stream& stream);
Status attention_flash(const AttentionArgs& args, Stream& stream);
Status paged_decode(const PagedDecodeArgs& args, Stream& stream);
Status paged_prefill(const PagedPrefillArgs& args, Stream& stream);

}  // namespace attn::cpu
