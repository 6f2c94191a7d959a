// matmul/02_coalesced: the same dot product per thread, but threadIdx.x walks columns of C. A
// warp now reads one A element (a broadcast) and 32 consecutive B elements and writes 32
// consecutive C elements: one memory transaction where rung 01 needed 32.
#include "matmul_common.cuh"
#include "matmul_rungs.h"

namespace attn::cuda {
namespace {

template <bool TA, bool TB>
__global__ void coalesced_kernel(MatmulProblem p) {
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  const int i = blockIdx.y * blockDim.y + threadIdx.y;
  if (i >= p.m || j >= p.n) return;
  const float* a = p.a + blockIdx.z * p.stride_a;
  const float* b = p.b + blockIdx.z * p.stride_b;
  float acc = 0.0f;
  for (int kk = 0; kk < p.k; ++kk) acc += a_at<TA>(a, i, kk, p.m, p.k) * b_at<TB>(b, kk, j, p.k, p.n);
  p.c[blockIdx.z * p.stride_c + static_cast<long long>(i) * p.n + j] = acc;
}

}  // namespace

Status matmul_02_coalesced(const MatmulArgs& args, Stream& stream) {
  ATTN_ASSIGN_OR_RETURN(p, fp32_problem(args));
  const dim3 block(32, 32), grid(ceil_div(p.n, 32), ceil_div(p.m, 32), p.batch);
  with_layout(p, [&](auto ta, auto tb) {
    coalesced_kernel<decltype(ta)::value, decltype(tb)::value><<<grid, block, 0, stream_of(stream)>>>(p);
  });
  return to_status(cudaGetLastError(), "matmul/02_coalesced launch");
}

}  // namespace attn::cuda
