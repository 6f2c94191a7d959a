// matmul/06_vectorized: rung 05's 128x128 tile with everything moved in 128-bit pieces and the
// next tile's loads overlapped with this tile's math.
// - Global loads are float4 along each operand's stored contiguous dimension (scalar only at
//   ragged edges or when that dimension is not a multiple of 4): a quarter of the load
//   instructions.
// - A is kept transposed in shared memory (as[k][m]) so that both operands are read as float4.
// - Warp tiling: a thread's 8x8 results are two 4x4 sub-tiles 64 apart in each dimension, so a
//   warp reads 2 distinct float4 of A (broadcast) and 16 consecutive float4 of B per step: no
//   bank conflicts, where rung 05's 8-wide strips of B collided.
// - The next K tile is fetched into registers before the current one is multiplied and stored
//   to the other of two shared buffers afterwards, so global latency hides under the FMAs, with
//   one barrier per tile instead of two.
// - At most 128 registers a thread, so two blocks share an SM (16 warps instead of 8) and one
//   block's barrier waits hide under the other's FMAs.
#include "matmul_common.cuh"
#include "matmul_rungs.h"

namespace attn::cuda {
namespace {

constexpr int kBM = 128, kBN = 128, kBK = 16, kThreads = 256;
constexpr int kLoads = kBM * kBK / 4 / kThreads;  // float4 per thread per operand: 2

// Four consecutive elements (row, col..col+3) of a row-major rows x cols matrix, zero outside.
__device__ __forceinline__ float4 fetch4(const float* src, int row, int col, int rows, int cols) {
  if (row < rows && col + 3 < cols && (cols & 3) == 0)
    return *reinterpret_cast<const float4*>(src + static_cast<long long>(row) * cols + col);
  float v[4];
#pragma unroll
  for (int e = 0; e < 4; ++e)
    v[e] = (row < rows && col + e < cols) ? src[static_cast<long long>(row) * cols + col + e] : 0.0f;
  return make_float4(v[0], v[1], v[2], v[3]);
}

// The stored tile of an operand: LONG x 16 when the stored rows run along M (or N), else
// 16 x LONG. `along_k_contiguous`: the stored rows are M (or N) and columns K.
template <bool kContiguousK>
__device__ __forceinline__ void fetch_tile(const float* src, int rows, int cols, int long0, int k0,
                                           float4 (&regs)[kLoads]) {
#pragma unroll
  for (int s = 0; s < kLoads; ++s) {
    const int idx = threadIdx.x + s * kThreads;
    if (kContiguousK) {  // stored [long][k]: 4 float4 per row of 16
      regs[s] = fetch4(src, long0 + idx / 4, k0 + (idx % 4) * 4, rows, cols);
    } else {  // stored [k][long]: 32 float4 per row of 128
      regs[s] = fetch4(src, k0 + idx / 32, long0 + (idx % 32) * 4, rows, cols);
    }
  }
}

template <bool kContiguousK>
__device__ __forceinline__ void store_tile(float* dst, const float4 (&regs)[kLoads]) {
#pragma unroll
  for (int s = 0; s < kLoads; ++s) {
    const int idx = threadIdx.x + s * kThreads;
    if (kContiguousK) {  // transpose into dst[k][long]
      const int l = idx / 4, kk = (idx % 4) * 4;
      dst[(kk + 0) * kBM + l] = regs[s].x;
      dst[(kk + 1) * kBM + l] = regs[s].y;
      dst[(kk + 2) * kBM + l] = regs[s].z;
      dst[(kk + 3) * kBM + l] = regs[s].w;
    } else {
      *reinterpret_cast<float4*>(dst + (idx / 32) * kBM + (idx % 32) * 4) = regs[s];
    }
  }
}

template <bool TA, bool TB>
__global__ void __launch_bounds__(kThreads, 2) vectorized_kernel(MatmulProblem p) {
  __shared__ __align__(16) float as[2][kBK * kBM];
  __shared__ __align__(16) float bs[2][kBK * kBN];
  const int i0 = blockIdx.y * kBM, j0 = blockIdx.x * kBN;
  const int tr = threadIdx.x / 16, tc = threadIdx.x % 16;
  const float* a = p.a + blockIdx.z * p.stride_a;
  const float* b = p.b + blockIdx.z * p.stride_b;
  // Stored shapes: A is [M][K] (contiguous K) or [K][M]; B is [K][N] or [N][K] (contiguous K).
  constexpr bool kAContigK = !TA, kBContigK = TB;
  const int a_rows = TA ? p.k : p.m, a_cols = TA ? p.m : p.k;
  const int b_rows = TB ? p.n : p.k, b_cols = TB ? p.k : p.n;

  float4 ra[kLoads], rb[kLoads];
  fetch_tile<kAContigK>(a, a_rows, a_cols, i0, 0, ra);
  fetch_tile<kBContigK>(b, b_rows, b_cols, j0, 0, rb);
  store_tile<kAContigK>(as[0], ra);
  store_tile<kBContigK>(bs[0], rb);
  __syncthreads();

  float acc[8][8] = {};
  const int tiles = (p.k + kBK - 1) / kBK;
  for (int t = 0; t < tiles; ++t) {
    const int cur = t & 1;
    const bool more = t + 1 < tiles;
    if (more) {
      fetch_tile<kAContigK>(a, a_rows, a_cols, i0, (t + 1) * kBK, ra);
      fetch_tile<kBContigK>(b, b_rows, b_cols, j0, (t + 1) * kBK, rb);
    }
#pragma unroll
    for (int kk = 0; kk < kBK; ++kk) {
      const float* arow = as[cur] + kk * kBM;
      const float* brow = bs[cur] + kk * kBN;
      const float4 a0 = *reinterpret_cast<const float4*>(arow + tr * 4);
      const float4 a1 = *reinterpret_cast<const float4*>(arow + 64 + tr * 4);
      const float4 b0 = *reinterpret_cast<const float4*>(brow + tc * 4);
      const float4 b1 = *reinterpret_cast<const float4*>(brow + 64 + tc * 4);
      const float av[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
      const float bv[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
      for (int x = 0; x < 8; ++x)
#pragma unroll
        for (int y = 0; y < 8; ++y) acc[x][y] += av[x] * bv[y];
    }
    if (more) {
      store_tile<kAContigK>(as[cur ^ 1], ra);
      store_tile<kBContigK>(bs[cur ^ 1], rb);
    }
    __syncthreads();
  }

  float* c = p.c + blockIdx.z * p.stride_c;
  const bool vec_ok = (p.n & 3) == 0;
#pragma unroll
  for (int x = 0; x < 8; ++x) {
    const int i = i0 + (x < 4 ? tr * 4 + x : 64 + tr * 4 + x - 4);
    if (i >= p.m) continue;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int j = j0 + half * 64 + tc * 4;
      float* dst = c + static_cast<long long>(i) * p.n + j;
      if (vec_ok && j + 3 < p.n) {
        *reinterpret_cast<float4*>(dst) =
            make_float4(acc[x][half * 4], acc[x][half * 4 + 1], acc[x][half * 4 + 2], acc[x][half * 4 + 3]);
      } else {
#pragma unroll
        for (int e = 0; e < 4; ++e)
          if (j + e < p.n) dst[e] = acc[x][half * 4 + e];
      }
    }
  }
}

}  // namespace

Status matmul_06_vectorized(const MatmulArgs& args, Stream& stream) {
  ATTN_ASSIGN_OR_RETURN(p, fp32_problem(args));
  const dim3 grid(ceil_div(p.n, kBN), ceil_div(p.m, kBM), p.batch);
  with_layout(p, [&](auto ta, auto tb) {
    vectorized_kernel<decltype(ta)::value, decltype(tb)::value>
        <<<grid, kThreads, 0, stream_of(stream)>>>(p);
  });
  return to_status(cudaGetLastError(), "matmul/06_vectorized launch");
}

}  // namespace attn::cuda
