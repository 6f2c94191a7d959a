// softmax/01_naive: one thread per row, three passes over the row (max, sum of exponentials,
// normalize and write). Neighbouring threads read addresses a whole row apart, so every load is
// its own transaction, and a 1k-wide row is all one thread's work.
#include "softmax_common.cuh"
#include "softmax_rungs.h"

namespace attn::cuda {
namespace {

template <class T>
__global__ void naive_kernel(SoftmaxProblem p) {
  const long long r = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x;
  if (r >= p.rows) return;
  const T* x = static_cast<const T*>(p.x) + r * p.cols;
  T* y = static_cast<T*>(p.y) + r * p.cols;
  float m = -INFINITY;
  for (int c = 0; c < p.cols; ++c) m = fmaxf(m, to_float(x[c]));
  // One thread adds up to a whole row: a float sum of 256k terms would drift by 1e-4.
  double s = 0.0;
  for (int c = 0; c < p.cols; ++c) s += __expf(to_float(x[c]) - m);
  const float inv = static_cast<float>(1.0 / s);
  for (int c = 0; c < p.cols; ++c) y[c] = from_float<T>(__expf(to_float(x[c]) - m) * inv);
}

}  // namespace

Status softmax_01_naive(const SoftmaxArgs& args, Stream& stream) {
  ATTN_ASSIGN_OR_RETURN(p, softmax_problem(args));
  with_dtype(args.x.dtype, [&](auto t) {
    naive_kernel<decltype(t)><<<static_cast<unsigned>((p.rows + 127) / 128), 128, 0, softmax_stream(stream)>>>(p);
  });
  return to_status(cudaGetLastError(), "softmax/01_naive launch");
}

}  // namespace attn::cuda
