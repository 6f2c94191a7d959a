// softmax/02_block_row: a block of 256 threads per row. Threads stride across the row, so loads
// coalesce, and the max and the sum are reduced in shared memory (a tree, log2(256) steps). Still
// three passes over the row in global memory.
#include "softmax_common.cuh"
#include "softmax_rungs.h"

namespace attn::cuda {
namespace {

constexpr int kThreads = 256;

template <bool kMax>
__device__ float block_reduce(float v, float* smem) {
  smem[threadIdx.x] = v;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s)
      smem[threadIdx.x] = kMax ? fmaxf(smem[threadIdx.x], smem[threadIdx.x + s])
                               : smem[threadIdx.x] + smem[threadIdx.x + s];
    __syncthreads();
  }
  const float r = smem[0];
  __syncthreads();
  return r;
}

template <class T>
__global__ void __launch_bounds__(kThreads) block_row_kernel(SoftmaxProblem p) {
  __shared__ float smem[kThreads];
  for (long long r = blockIdx.x; r < p.rows; r += gridDim.x) {
    const T* x = static_cast<const T*>(p.x) + r * p.cols;
    T* y = static_cast<T*>(p.y) + r * p.cols;
    float m = -INFINITY;
    for (int c = threadIdx.x; c < p.cols; c += kThreads) m = fmaxf(m, to_float(x[c]));
    m = block_reduce<true>(m, smem);
    float s = 0.0f;
    for (int c = threadIdx.x; c < p.cols; c += kThreads) s += __expf(to_float(x[c]) - m);
    const float inv = 1.0f / block_reduce<false>(s, smem);
    for (int c = threadIdx.x; c < p.cols; c += kThreads) y[c] = from_float<T>(__expf(to_float(x[c]) - m) * inv);
  }
}

}  // namespace

Status softmax_02_block_row(const SoftmaxArgs& args, Stream& stream) {
  ATTN_ASSIGN_OR_RETURN(p, softmax_problem(args));
  const unsigned grid = static_cast<unsigned>(std::min<long long>(p.rows, 1 << 20));
  with_dtype(args.x.dtype, [&](auto t) {
    block_row_kernel<decltype(t)><<<grid, kThreads, 0, softmax_stream(stream)>>>(p);
  });
  return to_status(cudaGetLastError(), "softmax/02_block_row launch");
}

}  // namespace attn::cuda
