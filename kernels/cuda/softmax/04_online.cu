// softmax/04_online: the max and the sum in one pass. Each thread keeps a running (max, sum)
// and rescales the sum when the max grows; the pairs are combined across the block. Two passes
// over the row in global memory instead of three: a third less traffic when rows do not stay
// in cache. A block of 256 threads per row; any width. An entry of -inf adds nothing to the sum
// (it is skipped, not exponentiated: while the running max is still -inf that would be NaN).
#include "softmax_common.cuh"
#include "softmax_rungs.h"

namespace attn::cuda {
namespace {

constexpr int kThreads = 256;

template <class T>
__global__ void __launch_bounds__(kThreads) online_kernel(SoftmaxProblem p) {
  __shared__ MaxSum scratch[kThreads / 32];
  for (long long r = blockIdx.x; r < p.rows; r += gridDim.x) {
    const T* x = static_cast<const T*>(p.x) + r * p.cols;
    T* y = static_cast<T*>(p.y) + r * p.cols;
    MaxSum acc{-INFINITY, 0.0f};
    for (int c = threadIdx.x; c < p.cols; c += kThreads) {
      const float v = to_float(x[c]);
      if (v > acc.m) {
        acc.s = acc.s * __expf(acc.m - v) + 1.0f;
        acc.m = v;
      } else if (v != -INFINITY) {  // -inf adds nothing; exp(-inf - -inf) would be NaN
        acc.s += __expf(v - acc.m);
      }
    }
    const MaxSum row = group_combine(acc, scratch, threadIdx.x / 32, kThreads / 32);
    const float inv = 1.0f / row.s;
    for (int c = threadIdx.x; c < p.cols; c += kThreads)
      y[c] = from_float<T>(__expf(to_float(x[c]) - row.m) * inv);
  }
}

}  // namespace

Status softmax_04_online(const SoftmaxArgs& args, Stream& stream) {
  ATTN_ASSIGN_OR_RETURN(p, softmax_problem(args));
  const unsigned grid = static_cast<unsigned>(std::min<long long>(p.rows, 1 << 20));
  with_dtype(args.x.dtype, [&](auto t) {
    online_kernel<decltype(t)><<<grid, kThreads, 0, softmax_stream(stream)>>>(p);
  });
  return to_status(cudaGetLastError(), "softmax/04_online launch");
}

}  // namespace attn::cuda
