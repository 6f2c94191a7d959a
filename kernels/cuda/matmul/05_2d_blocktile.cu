// matmul/05_2d_blocktile: coarsening in both dimensions. 256 threads compute a 128x128 tile, each
// an 8x8 block of C held in 64 registers. Per step of K a thread loads 8 A and 8 B values from
// shared memory and does 64 FMAs: 4 FMAs per shared load where rung 04 did about 1, and the
// block's tile is 4x larger, halving global loads per FMA again.
#include "matmul_rungs.h"
#include "tile_load.cuh"

namespace attn::cuda {
namespace {

constexpr int kBM = 128, kBN = 128, kBK = 8, kTM = 8, kTN = 8;
constexpr int kThreads = (kBM / kTM) * (kBN / kTN);

template <bool TA, bool TB>
__global__ void __launch_bounds__(kThreads) blocktile_2d_kernel(MatmulProblem p) {
  __shared__ float as[kBK * kBM];
  __shared__ float bs[kBK * kBN];
  const int i0 = blockIdx.y * kBM, j0 = blockIdx.x * kBN;
  const int row0 = (threadIdx.x / (kBN / kTN)) * kTM, col0 = (threadIdx.x % (kBN / kTN)) * kTN;
  const float* a = p.a + blockIdx.z * p.stride_a;
  const float* b = p.b + blockIdx.z * p.stride_b;
  float acc[kTM][kTN] = {};
  float ra[kTM], rb[kTN];
  for (int k0 = 0; k0 < p.k; k0 += kBK) {
    load_tiles_scalar<TA, TB, kBM, kBN, kBK, kThreads>(a, b, p, i0, j0, k0, as, bs);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kBK; ++kk) {
#pragma unroll
      for (int t = 0; t < kTM; ++t) ra[t] = as[kk * kBM + row0 + t];
#pragma unroll
      for (int t = 0; t < kTN; ++t) rb[t] = bs[kk * kBN + col0 + t];
#pragma unroll
      for (int x = 0; x < kTM; ++x)
#pragma unroll
        for (int y = 0; y < kTN; ++y) acc[x][y] += ra[x] * rb[y];
    }
    __syncthreads();
  }
  float* c = p.c + blockIdx.z * p.stride_c;
#pragma unroll
  for (int x = 0; x < kTM; ++x) {
    const int i = i0 + row0 + x;
    if (i >= p.m) continue;
#pragma unroll
    for (int y = 0; y < kTN; ++y) {
      const int j = j0 + col0 + y;
      if (j < p.n) c[static_cast<long long>(i) * p.n + j] = acc[x][y];
    }
  }
}

}  // namespace

Status matmul_05_2d_blocktile(const MatmulArgs& args, Stream& stream) {
  ATTN_ASSIGN_OR_RETURN(p, fp32_problem(args));
  const dim3 grid(ceil_div(p.n, kBN), ceil_div(p.m, kBM), p.batch);
  with_layout(p, [&](auto ta, auto tb) {
    blocktile_2d_kernel<decltype(ta)::value, decltype(tb)::value>
        <<<grid, kThreads, 0, stream_of(stream)>>>(p);
  });
  return to_status(cudaGetLastError(), "matmul/05_2d_blocktile launch");
}

}  // namespace attn::cuda
