// CUDA errors to Status: out of memory is RESOURCE_EXHAUSTED, anything else INTERNAL with the
// CUDA error text.
#pragma once

#include <cuda_runtime.h>

#include <string>

#include "attn/status.h"

namespace attn::cuda {

inline Status to_status(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return Status::Ok();
  std::string msg = std::string(what) + ": " + cudaGetErrorName(e) + ": " + cudaGetErrorString(e);
  if (e == cudaErrorMemoryAllocation) return resource_exhausted("device memory: " + msg);
  return internal_error(msg);
}

// Errors after which the context is unusable until the process restarts.
inline bool is_sticky(cudaError_t e) {
  switch (e) {
    case cudaErrorIllegalAddress:
    case cudaErrorLaunchFailure:
    case cudaErrorIllegalInstruction:
    case cudaErrorMisalignedAddress:
    case cudaErrorInvalidAddressSpace:
    case cudaErrorInvalidPc:
    case cudaErrorHardwareStackError:
    case cudaErrorAssert:
    case cudaErrorLaunchTimeout:
    case cudaErrorECCUncorrectable:
      return true;
    default:
      return false;
  }
}

}  // namespace attn::cuda

#define ATTN_CUDA_RETURN(expr) ATTN_RETURN_IF_ERROR(::attn::cuda::to_status((expr), #expr))
