// The matmul ladder on CUDA, one file per rung.
#pragma once

#include "attn/executor.h"

namespace attn::cuda {

Status matmul_01_naive(const MatmulArgs& args, Stream& stream);
Status matmul_02_coalesced(const MatmulArgs& args, Stream& stream);
Status matmul_03_smem_tiled(const MatmulArgs& args, Stream& stream);
Status matmul_04_1d_blocktile(const MatmulArgs& args, Stream& stream);
Status matmul_05_2d_blocktile(const MatmulArgs& args, Stream& stream);
Status matmul_06_vectorized(const MatmulArgs& args, Stream& stream);
Status matmul_07_mma_pipelined(const MatmulArgs& args, Stream& stream);
Status matmul_07_supports(const MatmulArgs& args);
Status matmul_08_wgmma_tma(const MatmulArgs& args, Stream& stream);
Status matmul_08_supports(const MatmulArgs& args);
// Rung 08's choice for a shape on a GPU of `sms` SMs: output tiles 128 x tile_n, K split
// `splits` ways; without a split, `fill` is the share of the SMs' tile slots doing useful work
// (tiles over waves x SMs, times the share of tile rows inside M), what `auto` ranks it by.
struct Matmul08Form {
  int tile_n, splits;
  double fill;
};
Matmul08Form matmul_08_form(const MatmulDims& d, int sms);
int device_sms_of_current();
Status matmul_cublas(const MatmulArgs& args, Stream& stream);
Status matmul_cublas_supports(const MatmulArgs& args);
Status fp32_matmul_supports(const MatmulArgs& args);

}  // namespace attn::cuda
