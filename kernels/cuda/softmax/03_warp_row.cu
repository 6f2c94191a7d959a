// softmax/03_warp_row: a warp per row, 8 rows per block, each warp looping over rows (coarsening).
// Reductions are register shuffles: no shared memory, no block barriers, and 8x more rows in
// flight per block than rung 02, which matters when rows are narrow (1k) and plentiful; for wide
// rows one warp per row has too little parallelism per row and rung 02's block wins.
#include "softmax_common.cuh"
#include "softmax_rungs.h"

namespace attn::cuda {
namespace {

constexpr int kWarps = 8;

template <class T>
__global__ void __launch_bounds__(kWarps * 32) warp_row_kernel(SoftmaxProblem p) {
  const int lane = threadIdx.x & 31;
  const long long first = blockIdx.x * static_cast<long long>(kWarps) + threadIdx.x / 32;
  for (long long r = first; r < p.rows; r += static_cast<long long>(gridDim.x) * kWarps) {
    const T* x = static_cast<const T*>(p.x) + r * p.cols;
    T* y = static_cast<T*>(p.y) + r * p.cols;
    float m = -INFINITY;
    for (int c = lane; c < p.cols; c += 32) m = fmaxf(m, to_float(x[c]));
    m = warp_max(m);
    // A lane adds cols/32 terms (8192 for a 256k row): in float that drifts past 1e-5.
    double s = 0.0;
    for (int c = lane; c < p.cols; c += 32) s += __expf(to_float(x[c]) - m);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    const float inv = static_cast<float>(1.0 / s);
    for (int c = lane; c < p.cols; c += 32) y[c] = from_float<T>(__expf(to_float(x[c]) - m) * inv);
  }
}

}  // namespace

Status softmax_03_warp_row(const SoftmaxArgs& args, Stream& stream) {
  ATTN_ASSIGN_OR_RETURN(p, softmax_problem(args));
  const unsigned grid = static_cast<unsigned>(std::min<long long>((p.rows + kWarps - 1) / kWarps, 132 * 16));
  with_dtype(args.x.dtype, [&](auto t) {
    warp_row_kernel<decltype(t)><<<grid, kWarps * 32, 0, softmax_stream(stream)>>>(p);
  });
  return to_status(cudaGetLastError(), "softmax/03_warp_row launch");
}

}  // namespace attn::cuda
