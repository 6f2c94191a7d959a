// matmul/04_1d_blocktile: thread coarsening along M. A block of 512 threads computes a 64x64 tile
// of C, each thread a column strip of 8 results. Per step of K a thread loads one B value into a
// register and reuses it for 8 multiply-adds against A from shared memory, so shared-memory
// loads per FMA fall from 2 (rung 03) to about 1.1 and more of the time goes to arithmetic.
#include "matmul_rungs.h"
#include "tile_load.cuh"

namespace attn::cuda {
namespace {

constexpr int kBM = 64, kBN = 64, kBK = 8, kTM = 8, kThreads = kBM * kBN / kTM;

template <bool TA, bool TB>
__global__ void __launch_bounds__(kThreads) blocktile_1d_kernel(MatmulProblem p) {
  __shared__ float as[kBK * kBM];
  __shared__ float bs[kBK * kBN];
  const int i0 = blockIdx.y * kBM, j0 = blockIdx.x * kBN;
  const int col = threadIdx.x % kBN, row0 = (threadIdx.x / kBN) * kTM;
  const float* a = p.a + blockIdx.z * p.stride_a;
  const float* b = p.b + blockIdx.z * p.stride_b;
  float acc[kTM] = {};
  for (int k0 = 0; k0 < p.k; k0 += kBK) {
    load_tiles_scalar<TA, TB, kBM, kBN, kBK, kThreads>(a, b, p, i0, j0, k0, as, bs);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kBK; ++kk) {
      const float bv = bs[kk * kBN + col];
#pragma unroll
      for (int t = 0; t < kTM; ++t) acc[t] += as[kk * kBM + row0 + t] * bv;
    }
    __syncthreads();
  }
  const int j = j0 + col;
  if (j >= p.n) return;
  float* c = p.c + blockIdx.z * p.stride_c;
#pragma unroll
  for (int t = 0; t < kTM; ++t) {
    const int i = i0 + row0 + t;
    if (i < p.m) c[static_cast<long long>(i) * p.n + j] = acc[t];
  }
}

}  // namespace

Status matmul_04_1d_blocktile(const MatmulArgs& args, Stream& stream) {
  ATTN_ASSIGN_OR_RETURN(p, fp32_problem(args));
  const dim3 grid(ceil_div(p.n, kBN), ceil_div(p.m, kBM), p.batch);
  with_layout(p, [&](auto ta, auto tb) {
    blocktile_1d_kernel<decltype(ta)::value, decltype(tb)::value>
        <<<grid, kThreads, 0, stream_of(stream)>>>(p);
  });
  return to_status(cudaGetLastError(), "matmul/04_1d_blocktile launch");
}

}  // namespace attn::cuda
