// softmax/06_split_row: for very wide rows and few of them. A thread-block cluster of 2 to 8
// blocks shares one row, each block holding its part in registers; the blocks exchange their
// (max, sum) through distributed shared memory, so the row is still read once and written once,
// and a 256k-wide row keeps 8 SMs busy instead of 1: 256 such rows fill the whole GPU. Rows up to
// 256k columns (8 blocks x 1024 threads x 32 values).
#include <cooperative_groups.h>

#include "row_registers.cuh"
#include "softmax_rungs.h"

namespace attn::cuda {
namespace {

namespace cg = cooperative_groups;
constexpr int kMaxCluster = 8, kThreads = 1024;

// The cluster is as small as the row allows (2, 4 or 8 blocks): a 64k-wide float32 row needs 2,
// and smaller clusters mean more rows in flight and cheaper cluster barriers.
template <class T, int kCluster>
__global__ void __cluster_dims__(kCluster, 1, 1) __launch_bounds__(kThreads)
    split_row_kernel(SoftmaxProblem p) {
  __shared__ MaxSum scratch[kThreads / 32];
  __shared__ MaxSum block_total;
  cg::cluster_group cluster = cg::this_cluster();
  const int part = static_cast<int>(cluster.block_rank());
  const long long r = blockIdx.x / kCluster;
  const int vectors = (p.cols * static_cast<int>(sizeof(T)) + 15) / 16;
  const int per_block = (vectors + kCluster - 1) / kCluster;
  const int begin = part * per_block;
  const int end_col = min(p.cols, (begin + per_block) * RowChunk<T>::kPerVector);
  const bool aligned = (p.cols * sizeof(T)) % 16 == 0;
  const T* x = static_cast<const T*>(p.x) + r * p.cols;
  // Thread t holds vectors begin + t + i*1024 of the row; columns past this block's part are
  // excluded by end_col (vectors past `per_block` start beyond it).
  RowChunk<T> chunk;
  chunk.load(x, threadIdx.x, kThreads, begin, end_col, aligned);
  const MaxSum mine = group_combine(chunk.reduce(threadIdx.x, kThreads, begin, end_col), scratch,
                                    threadIdx.x / 32, kThreads / 32);
  if (threadIdx.x == 0) block_total = mine;
  cluster.sync();
  MaxSum total{-INFINITY, 0.0f};
  for (int b = 0; b < kCluster; ++b) total = combine(total, *cluster.map_shared_rank(&block_total, b));
  cluster.sync();  // no block leaves while another still reads its shared memory
  chunk.store(static_cast<T*>(p.y) + r * p.cols, threadIdx.x, kThreads, begin, end_col, aligned, total);
}

}  // namespace

Status softmax_06_supports(const SoftmaxArgs& args) {
  ATTN_ASSIGN_OR_RETURN(p, softmax_problem(args));
  const long long capacity = static_cast<long long>(kMaxCluster) * softmax_05_capacity(args.x.dtype);
  if (p.cols > capacity) {
    return invalid_argument("x.shape: softmax/06_split_row holds a row in the registers of 8 blocks, up to " +
                            std::to_string(capacity) + " " + std::string(dtype_name(args.x.dtype)) +
                            " columns; got " + std::to_string(p.cols) + " (use softmax/04_online)");
  }
  if (p.rows * kMaxCluster > (1LL << 31) - 1) return invalid_argument("x.shape: too many rows for split_row");
  return Status::Ok();
}

Status softmax_06_split_row(const SoftmaxArgs& args, Stream& stream) {
  ATTN_RETURN_IF_ERROR(softmax_06_supports(args));
  ATTN_ASSIGN_OR_RETURN(p, softmax_problem(args));
  const int per_block = softmax_05_capacity(args.x.dtype);
  const cudaStream_t s = softmax_stream(stream);
  with_dtype(args.x.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (p.cols <= 2 * per_block)
      split_row_kernel<T, 2><<<static_cast<unsigned>(p.rows * 2), kThreads, 0, s>>>(p);
    else if (p.cols <= 4 * per_block)
      split_row_kernel<T, 4><<<static_cast<unsigned>(p.rows * 4), kThreads, 0, s>>>(p);
    else
      split_row_kernel<T, 8><<<static_cast<unsigned>(p.rows * 8), kThreads, 0, s>>>(p);
  });
  return to_status(cudaGetLastError(), "softmax/06_split_row launch");
}

}  // namespace attn::cuda
