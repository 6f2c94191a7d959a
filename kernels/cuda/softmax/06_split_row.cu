// softmax/06_split_row: for very wide rows and few of them. A thread-block cluster of 2 to 16
// blocks shares one row, each block holding its part in registers; the blocks exchange their
// (max, sum) through distributed shared memory, so the row is still read once and written once,
// and a 256k-wide row keeps 16 SMs busy instead of 1.
// Blocks are 512 threads holding 8 vectors of 16 bytes each (16k float32 or 32k bf16 columns a
// block) at <= 64 registers, so two blocks share an SM: one block's load phase overlaps the
// other's reductions, cluster barrier and stores. (A first version used one 1024-thread block
// per SM, whose phases ran one after the other: 0.74x of copy bandwidth at 256k float32.)
// Rows up to 256k float32 / 512k 16-bit columns (16 blocks).
#include <cooperative_groups.h>

#include "row_registers.cuh"
#include "softmax_rungs.h"

namespace attn::cuda {
namespace {

namespace cg = cooperative_groups;
constexpr int kMaxCluster = 16, kThreads = 512, kVectors = 8;

template <class T>
constexpr int columns_per_block() {
  return kThreads * kVectors * 16 / static_cast<int>(sizeof(T));
}

template <class T>
__global__ void __launch_bounds__(kThreads, 2) split_row_kernel(SoftmaxProblem p) {
  __shared__ MaxSum scratch[kThreads / 32];
  __shared__ MaxSum block_total;
  cg::cluster_group cluster = cg::this_cluster();
  const int blocks = static_cast<int>(cluster.num_blocks());
  const int part = static_cast<int>(cluster.block_rank());
  const long long r = blockIdx.x / blocks;
  const int vectors = (p.cols * static_cast<int>(sizeof(T)) + 15) / 16;
  const int per_block = (vectors + blocks - 1) / blocks;
  const int begin = part * per_block;
  const int end_col = min(p.cols, (begin + per_block) * RowChunk<T, kVectors>::kPerVector);
  const bool aligned = (p.cols * sizeof(T)) % 16 == 0;
  const T* x = static_cast<const T*>(p.x) + r * p.cols;
  // Thread t holds vectors begin + t + i*512 of the row; columns past this block's part are
  // excluded by end_col.
  RowChunk<T, kVectors> chunk;
  chunk.load(x, threadIdx.x, kThreads, begin, end_col, aligned);
  const MaxSum mine = group_combine(chunk.reduce(threadIdx.x, kThreads, begin, end_col), scratch,
                                    threadIdx.x / 32, kThreads / 32);
  if (threadIdx.x == 0) block_total = mine;
  cluster.sync();
  MaxSum total{-INFINITY, 0.0f};
  for (int b = 0; b < blocks; ++b) total = combine(total, *cluster.map_shared_rank(&block_total, b));
  cluster.sync();  // no block leaves while another still reads its shared memory
  chunk.store(static_cast<T*>(p.y) + r * p.cols, threadIdx.x, kThreads, begin, end_col, aligned, total);
}

template <class T>
cudaError_t launch(const SoftmaxProblem& p, cudaStream_t s) {
  // The smallest cluster that holds the row: fewer blocks per row, more rows in flight.
  int cluster = 2;
  while (cluster < kMaxCluster && static_cast<long long>(cluster) * columns_per_block<T>() < p.cols) cluster *= 2;
  if (cluster > 8) {
    cudaError_t e = cudaFuncSetAttribute(split_row_kernel<T>, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
    if (e != cudaSuccess) return e;
  }
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(static_cast<unsigned>(p.rows * cluster));
  config.blockDim = dim3(kThreads);
  config.stream = s;
  cudaLaunchAttribute attr{};
  attr.id = cudaLaunchAttributeClusterDimension;
  attr.val.clusterDim.x = cluster;
  attr.val.clusterDim.y = 1;
  attr.val.clusterDim.z = 1;
  config.attrs = &attr;
  config.numAttrs = 1;
  return cudaLaunchKernelEx(&config, split_row_kernel<T>, p);
}

long long capacity(DType t) {
  return static_cast<long long>(kMaxCluster) *
         (t == DType::kFloat32 ? columns_per_block<float>() : columns_per_block<__half>());
}

}  // namespace

Status softmax_06_supports(const SoftmaxArgs& args) {
  ATTN_ASSIGN_OR_RETURN(p, softmax_problem(args));
  if (p.cols > capacity(args.x.dtype)) {
    return invalid_argument("x.shape: softmax/06_split_row holds a row in the registers of up to 16 blocks, up to " +
                            std::to_string(capacity(args.x.dtype)) + " " + std::string(dtype_name(args.x.dtype)) +
                            " columns; got " + std::to_string(p.cols) + " (use softmax/04_online)");
  }
  if (p.rows * kMaxCluster > (1LL << 31) - 1) return invalid_argument("x.shape: too many rows for split_row");
  return Status::Ok();
}

Status softmax_06_split_row(const SoftmaxArgs& args, Stream& stream) {
  ATTN_RETURN_IF_ERROR(softmax_06_supports(args));
  ATTN_ASSIGN_OR_RETURN(p, softmax_problem(args));
  cudaError_t e = cudaSuccess;
  with_dtype(args.x.dtype, [&](auto tag) { e = launch<decltype(tag)>(p, softmax_stream(stream)); });
  if (e != cudaSuccess) return to_status(e, "softmax/06_split_row launch");
  return to_status(cudaGetLastError(), "softmax/06_split_row launch");
}

}  // namespace attn::cuda
