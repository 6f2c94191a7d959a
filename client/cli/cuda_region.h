// Device memory this process allocates and exports through CUDA IPC, for `attn bench-rpc
// --cuda-ipc`: a server on the same GPU host reads the inputs from it and writes the outputs
// into it in place. Built with the CUDA toolkit only; elsewhere `create` says so.
#pragma once

#include <cstddef>
#include <string>

#include "attn/status.h"

namespace attn::cli {

class CudaRegion {
 public:
  // `bytes` of device memory on CUDA device `device`, zero-filled.
  static Result<CudaRegion> create(int device, std::size_t bytes);
  CudaRegion() = default;
  CudaRegion(CudaRegion&& o) noexcept { *this = std::move(o); }
  CudaRegion& operator=(CudaRegion&& o) noexcept;
  ~CudaRegion();

  // Copies `bytes` from host memory at `src` to `offset` in the region.
  Status upload(std::size_t offset, const void* src, std::size_t bytes);
  // The cudaIpcMemHandle_t's bytes, for RegisterSharedMemory.
  const std::string& ipc_handle() const { return ipc_handle_; }
  int device() const { return device_; }
  std::size_t size() const { return size_; }

 private:
  void* data_ = nullptr;
  std::size_t size_ = 0;
  int device_ = -1;
  std::string ipc_handle_;
};

}  // namespace attn::cli
