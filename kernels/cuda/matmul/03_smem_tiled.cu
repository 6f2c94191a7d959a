// matmul/03_smem_tiled: a 32x32 block computes a 32x32 tile of C, stepping through K in 32-wide
// tiles of A and B staged in shared memory. Each global element is now read by one thread and
// reused 32 times from shared memory, cutting global traffic 32x against rung 02.
#include "matmul_common.cuh"
#include "matmul_rungs.h"

namespace attn::cuda {
namespace {

constexpr int kTile = 32;

template <bool TA, bool TB>
__global__ void smem_kernel(MatmulProblem p) {
  __shared__ float as[kTile][kTile + 1];  // [i][kk], +1 against bank conflicts
  __shared__ float bs[kTile][kTile + 1];  // [kk][j]
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int i0 = blockIdx.y * kTile, j0 = blockIdx.x * kTile;
  const float* a = p.a + blockIdx.z * p.stride_a;
  const float* b = p.b + blockIdx.z * p.stride_b;
  float acc = 0.0f;
  for (int k0 = 0; k0 < p.k; k0 += kTile) {
    // Load as stored: the thread index that varies fastest follows the contiguous dimension.
    if (TA) {
      const int i = i0 + tx, kk = k0 + ty;
      as[tx][ty] = (i < p.m && kk < p.k) ? a[static_cast<long long>(kk) * p.m + i] : 0.0f;
    } else {
      const int i = i0 + ty, kk = k0 + tx;
      as[ty][tx] = (i < p.m && kk < p.k) ? a[static_cast<long long>(i) * p.k + kk] : 0.0f;
    }
    if (TB) {
      const int j = j0 + ty, kk = k0 + tx;
      bs[tx][ty] = (j < p.n && kk < p.k) ? b[static_cast<long long>(j) * p.k + kk] : 0.0f;
    } else {
      const int j = j0 + tx, kk = k0 + ty;
      bs[ty][tx] = (j < p.n && kk < p.k) ? b[static_cast<long long>(kk) * p.n + j] : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTile; ++kk) acc += as[ty][kk] * bs[kk][tx];
    __syncthreads();
  }
  const int i = i0 + ty, j = j0 + tx;
  if (i < p.m && j < p.n) p.c[blockIdx.z * p.stride_c + static_cast<long long>(i) * p.n + j] = acc;
}

}  // namespace

Status matmul_03_smem_tiled(const MatmulArgs& args, Stream& stream) {
  ATTN_ASSIGN_OR_RETURN(p, fp32_problem(args));
  const dim3 block(kTile, kTile), grid(ceil_div(p.n, kTile), ceil_div(p.m, kTile), p.batch);
  with_layout(p, [&](auto ta, auto tb) {
    smem_kernel<decltype(ta)::value, decltype(tb)::value><<<grid, block, 0, stream_of(stream)>>>(p);
  });
  return to_status(cudaGetLastError(), "matmul/03_smem_tiled launch");
}

}  // namespace attn::cuda
