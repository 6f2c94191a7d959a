// softmax/05_vectorized: 128-bit loads and stores, and the row held in registers between its one
// read and its one write (rung 04 read it twice). Threads per row scale with the width, from a
// warp (8 rows per block) for 1k-wide fp32 rows to 1024 threads for 32k-wide fp32 or 64k-wide
// bf16 rows, each thread holding 8 vectors of 16 bytes. Wider rows: softmax/06_split_row or
// softmax/04_online.
#include "row_registers.cuh"
#include "softmax_rungs.h"

namespace attn::cuda {
namespace {

template <class T, int kTPR, int kVectors>
__global__ void __launch_bounds__(kTPR < 256 ? 256 : kTPR) vectorized_kernel(SoftmaxProblem p) {
  constexpr int kBlock = kTPR < 256 ? 256 : kTPR, kRows = kBlock / kTPR, kWarps = kTPR / 32;
  __shared__ MaxSum scratch[kBlock / 32];
  const int group = threadIdx.x / kTPR, t = threadIdx.x % kTPR;
  const long long r = blockIdx.x * static_cast<long long>(kRows) + group;
  const bool valid = r < p.rows;
  const bool aligned = (p.cols * sizeof(T)) % 16 == 0;
  const int end = valid ? p.cols : 0;
  const T* x = static_cast<const T*>(p.x) + (valid ? r : 0) * p.cols;
  RowChunk<T, kVectors> chunk;
  chunk.load(x, t, kTPR, 0, end, aligned);
  MaxSum local = chunk.reduce(t, kTPR, 0, end);
  const MaxSum total = group_combine(local, scratch + group * kWarps, t / 32, kWarps);
  if (valid) chunk.store(static_cast<T*>(p.y) + r * p.cols, t, kTPR, 0, end, aligned, total);
}

// 16-bit rows hold 8 vectors a thread below 1024 threads (more bytes in flight), 4 at 1024.
template <class T, int kTPR>
constexpr int vectors_for() {
  return kTPR == 1024 ? vectors_per_thread<T>() : 8;
}

template <class T, int kTPR>
void launch(const SoftmaxProblem& p, cudaStream_t s) {
  constexpr int kBlock = kTPR < 256 ? 256 : kTPR, kRows = kBlock / kTPR;
  vectorized_kernel<T, kTPR, vectors_for<T, kTPR>()><<<static_cast<unsigned>((p.rows + kRows - 1) / kRows), kBlock, 0, s>>>(p);
}

}  // namespace

int softmax_05_capacity(DType t) {
  return t == DType::kFloat32 ? 1024 * vectors_per_thread<float>() * 4
                              : 1024 * vectors_per_thread<__half>() * 8;
}

Status softmax_05_supports(const SoftmaxArgs& args) {
  ATTN_ASSIGN_OR_RETURN(p, softmax_problem(args));
  if (p.cols > softmax_05_capacity(args.x.dtype)) {
    return invalid_argument("x.shape: softmax/05_vectorized holds a row in registers, up to " +
                            std::to_string(softmax_05_capacity(args.x.dtype)) + " " +
                            std::string(dtype_name(args.x.dtype)) + " columns; got " +
                            std::to_string(p.cols) + " (use softmax/06_split_row or 04_online)");
  }
  if (p.rows > (1LL << 31) - 1) return invalid_argument("x.shape: more than 2^31 rows");
  return Status::Ok();
}

Status softmax_05_vectorized(const SoftmaxArgs& args, Stream& stream) {
  ATTN_RETURN_IF_ERROR(softmax_05_supports(args));
  ATTN_ASSIGN_OR_RETURN(p, softmax_problem(args));
  const cudaStream_t s = softmax_stream(stream);
  with_dtype(args.x.dtype, [&](auto tag) {
    using T = decltype(tag);
    const int vectors = (p.cols * static_cast<int>(sizeof(T)) + 15) / 16;
    if (vectors <= 32 * vectors_for<T, 32>()) launch<T, 32>(p, s);
    else if (vectors <= 64 * vectors_for<T, 64>()) launch<T, 64>(p, s);
    else if (vectors <= 128 * vectors_for<T, 128>()) launch<T, 128>(p, s);
    else if (vectors <= 256 * vectors_for<T, 256>()) launch<T, 256>(p, s);
    else if (vectors <= 512 * vectors_for<T, 512>()) launch<T, 512>(p, s);
    else launch<T, 1024>(p, s);
  });
  return to_status(cudaGetLastError(), "softmax/05_vectorized launch");
}

}  // namespace attn::cuda
