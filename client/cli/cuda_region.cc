#include "cuda_region.h"

#include <utility>

#if ATTN_CLI_CUDA
#include <cuda_runtime.h>
#endif

namespace attn::cli {

CudaRegion& CudaRegion::operator=(CudaRegion&& o) noexcept {
  std::swap(data_, o.data_);
  std::swap(size_, o.size_);
  std::swap(device_, o.device_);
  std::swap(ipc_handle_, o.ipc_handle_);
  return *this;
}

#if ATTN_CLI_CUDA

namespace {
Status cuda_failed(const std::string& what, cudaError_t e) {
  cudaGetLastError();
  return failed_precondition(what + ": " + cudaGetErrorName(e) + ": " + cudaGetErrorString(e));
}
}  // namespace

Result<CudaRegion> CudaRegion::create(int device, std::size_t bytes) {
  if (const cudaError_t e = cudaSetDevice(device); e != cudaSuccess)
    return cuda_failed("--cuda-ipc: cuda:" + std::to_string(device), e);
  CudaRegion r;
  r.device_ = device;
  if (const cudaError_t e = cudaMalloc(&r.data_, bytes); e != cudaSuccess)
    return cuda_failed("--cuda-ipc: cudaMalloc of " + std::to_string(bytes) + " bytes", e);
  r.size_ = bytes;
  if (const cudaError_t e = cudaMemset(r.data_, 0, bytes); e != cudaSuccess) return cuda_failed("--cuda-ipc: cudaMemset", e);
  cudaIpcMemHandle_t handle;
  if (const cudaError_t e = cudaIpcGetMemHandle(&handle, r.data_); e != cudaSuccess)
    return cuda_failed("--cuda-ipc: cudaIpcGetMemHandle", e);
  r.ipc_handle_.assign(reinterpret_cast<const char*>(&handle), sizeof handle);
  return r;
}

Status CudaRegion::upload(std::size_t offset, const void* src, std::size_t bytes) {
  if (offset > size_ || bytes > size_ - offset) return invalid_argument("--cuda-ipc: upload past the region");
  cudaSetDevice(device_);
  if (const cudaError_t e = cudaMemcpy(static_cast<char*>(data_) + offset, src, bytes, cudaMemcpyHostToDevice);
      e != cudaSuccess)
    return cuda_failed("--cuda-ipc: cudaMemcpy", e);
  return Status::Ok();
}

CudaRegion::~CudaRegion() {
  if (data_) {
    cudaSetDevice(device_);
    cudaFree(data_);
  }
}

#else

Result<CudaRegion> CudaRegion::create(int, std::size_t) {
  return failed_precondition("--cuda-ipc: this attn was built without the CUDA toolkit");
}
Status CudaRegion::upload(std::size_t, const void*, std::size_t) {
  return failed_precondition("--cuda-ipc: this attn was built without the CUDA toolkit");
}
CudaRegion::~CudaRegion() = default;

#endif

}  // namespace attn::cli
