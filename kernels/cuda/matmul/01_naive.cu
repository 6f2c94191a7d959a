// matmul/01_naive: one thread per element of C, a dot product straight from global memory.
// threadIdx.x walks rows of C, so the threads of a warp read A at addresses K floats apart and
// write C with stride N: every access is uncoalesced. The baseline every later rung is measured
// against.
#include "matmul_common.cuh"
#include "matmul_rungs.h"

namespace attn::cuda {
namespace {

template <bool TA, bool TB>
__global__ void naive_kernel(MatmulProblem p) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  const int j = blockIdx.y * blockDim.y + threadIdx.y;
  if (i >= p.m || j >= p.n) return;
  const float* a = p.a + blockIdx.z * p.stride_a;
  const float* b = p.b + blockIdx.z * p.stride_b;
  float acc = 0.0f;
  for (int kk = 0; kk < p.k; ++kk) acc += a_at<TA>(a, i, kk, p.m, p.k) * b_at<TB>(b, kk, j, p.k, p.n);
  p.c[blockIdx.z * p.stride_c + static_cast<long long>(i) * p.n + j] = acc;
}

}  // namespace

Status matmul_01_naive(const MatmulArgs& args, Stream& stream) {
  ATTN_ASSIGN_OR_RETURN(p, fp32_problem(args));
  const dim3 block(32, 32), grid(ceil_div(p.m, 32), ceil_div(p.n, 32), p.batch);
  with_layout(p, [&](auto ta, auto tb) {
    naive_kernel<decltype(ta)::value, decltype(tb)::value><<<grid, block, 0, stream_of(stream)>>>(p);
  });
  return to_status(cudaGetLastError(), "matmul/01_naive launch");
}

}  // namespace attn::cuda
