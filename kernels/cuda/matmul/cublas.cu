// matmul/cublas: the reference variant. fp32 with TF32 off (pedantic math: true fp32 products),
// bf16/fp16 in with fp32 accumulation. cuBLAS is column-major: a row-major C = A.B is the
// column-major C^T = B^T.A^T, so the operands are passed swapped, read as stored.
#include <cublas_v2.h>

#include <map>
#include <mutex>

#include "matmul_common.cuh"
#include "matmul_rungs.h"

namespace attn::cuda {
namespace {

// One handle per stream (each executor has its own stream and one worker), created on first use
// (the server's warm-up) and kept: a handle is never used by two threads at once.
Result<cublasHandle_t> handle_for(cudaStream_t stream) {
  static std::mutex mu;
  static std::map<cudaStream_t, cublasHandle_t> handles;
  std::lock_guard lock(mu);
  auto it = handles.find(stream);
  if (it != handles.end()) return it->second;
  cublasHandle_t h = nullptr;
  if (cublasCreate(&h) != CUBLAS_STATUS_SUCCESS) return internal_error("cublasCreate failed");
  cublasSetMathMode(h, CUBLAS_PEDANTIC_MATH);
  handles[stream] = h;
  return h;
}

cudaDataType_t cuda_type(DType t) {
  switch (t) {
    case DType::kFloat32: return CUDA_R_32F;
    case DType::kFloat16: return CUDA_R_16F;
    case DType::kBFloat16: return CUDA_R_16BF;
    case DType::kInt32: break;  // no matmul operand is int32: supports() refuses it
  }
  return CUDA_R_32F;
}

}  // namespace

Status matmul_cublas_supports(const MatmulArgs& args) {
  ATTN_ASSIGN_OR_RETURN(d, matmul_dims(args.a, args.b, args.transpose_a, args.transpose_b));
  if (d.m > INT_MAX || d.n > INT_MAX || d.k > INT_MAX || d.batch > INT_MAX)
    return invalid_argument("a.shape: cuBLAS takes M, N, K and the batch < 2^31");
  return Status::Ok();
}

Status matmul_cublas(const MatmulArgs& args, Stream& stream) {
  ATTN_ASSIGN_OR_RETURN(d, matmul_dims(args.a, args.b, args.transpose_a, args.transpose_b));
  ATTN_ASSIGN_OR_RETURN(h, handle_for(stream_of(stream)));
  cublasSetStream(h, stream_of(stream));
  const cudaDataType_t t = cuda_type(args.a.dtype);
  const float alpha = 1.0f, beta = 0.0f;
  const int m = static_cast<int>(d.m), n = static_cast<int>(d.n), k = static_cast<int>(d.k);
  // Column-major view: C^T (n x m) = op(B)^T (n x k) . op(A)^T (k x m).
  const cublasOperation_t op_b = args.transpose_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t op_a = args.transpose_a ? CUBLAS_OP_T : CUBLAS_OP_N;
  const int ldb = args.transpose_b ? k : n, lda = args.transpose_a ? m : k;
  const cublasStatus_t s = cublasGemmStridedBatchedEx(
      h, op_b, op_a, n, m, k, &alpha, args.b.data, t, ldb, d.b_batched ? d.k * d.n : 0, args.a.data,
      t, lda, d.m * d.k, &beta, args.c.data, t, n, d.m * d.n, static_cast<int>(d.batch),
      CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
  if (s != CUBLAS_STATUS_SUCCESS)
    return internal_error(std::string("cublasGemmStridedBatchedEx: ") + cublasGetStatusString(s));
  return Status::Ok();
}

}  // namespace attn::cuda
