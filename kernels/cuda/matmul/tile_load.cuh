// Scalar tile loads for rungs 04 and 05: a BM x BK tile of A into as[BK][BM] and a BK x BN tile
// of B into bs[BK][BN], zero outside the matrix, with consecutive threads on consecutive stored
// addresses whatever the layout.
#pragma once

#include "matmul_common.cuh"

namespace attn::cuda {

template <bool TA, bool TB, int BM, int BN, int BK, int THREADS>
__device__ __forceinline__ void load_tiles_scalar(const float* a, const float* b, const MatmulProblem& p,
                                                  int i0, int j0, int k0, float* as, float* bs) {
  for (int idx = threadIdx.x; idx < BM * BK; idx += THREADS) {
    const int i = TA ? idx % BM : idx / BK, kk = TA ? idx / BM : idx % BK;
    as[kk * BM + i] =
        (i0 + i < p.m && k0 + kk < p.k) ? a_at<TA>(a, i0 + i, k0 + kk, p.m, p.k) : 0.0f;
  }
  for (int idx = threadIdx.x; idx < BN * BK; idx += THREADS) {
    const int j = TB ? idx / BK : idx % BN, kk = TB ? idx % BK : idx / BN;
    bs[kk * BN + j] =
        (j0 + j < p.n && k0 + kk < p.k) ? b_at<TB>(b, k0 + kk, j0 + j, p.k, p.n) : 0.0f;
  }
}

}  // namespace attn::cuda
