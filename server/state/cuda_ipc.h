// CUDA IPC for shared-memory regions (--shared-memory cuda): device memory another process on
// this host exported with cudaIpcGetMemHandle, opened here so that ops read their inputs from it
// and write their outputs into it, device to device. Built with the CUDA backend only; elsewhere
// every open is refused by name.
#pragma once

#include <cstddef>
#include <string>

#include "attn/status.h"

namespace attn::server {

struct CudaIpcMapping {
  void* base = nullptr;   // the exporting allocation, mapped into this process
  std::size_t bytes = 0;  // that allocation's size, as the driver reports it
  int device = -1;        // the CUDA ordinal it lives on
  std::string key;        // which open mapping it shares (one per device and handle)
};

// Whether this build can open CUDA IPC handles.
bool cuda_ipc_built();

// Opens `handle` (a cudaIpcMemHandle_t's bytes) for CUDA device `device`: FAILED_PRECONDITION
// naming why when IPC is unavailable (no such device, a driver or container that refuses it) or
// when the memory lives on another device than `device`; INVALID_ARGUMENT for a handle of the
// wrong size.
Result<CudaIpcMapping> open_cuda_ipc(const std::string& handle, int device);
// Each open is closed once; a handle opened again while open shares its mapping.
void close_cuda_ipc(const CudaIpcMapping& m);

}  // namespace attn::server
