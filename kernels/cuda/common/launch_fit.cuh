// A kernel's shared-memory opt-in and how many of its blocks an SM holds, asked of the driver once
// per device: the answers never change, and asking (cudaFuncSetAttribute, the occupancy query,
// the SM count) costs several microseconds on every call of a decode step otherwise.
#pragma once

#include <cuda_runtime.h>

#include <atomic>

#include "../cuda_check.h"
#include "attn/status.h"

namespace attn::cuda {

struct LaunchFit {
  int per_sm = 1;  // resident blocks per SM
  int sms = 132;   // SMs of the device
  int resident() const { return per_sm * sms; }
};

// For `kKernel` (the template's statics are per kernel) with kThreads threads and kSmem bytes of
// dynamic shared memory on `device`: asked once, then read. Two workers racing on the first call
// both ask and store the same answer.
template <auto kKernel, int kThreads, int kSmem>
Status launch_fit(int device, const char* name, LaunchFit* fit) {
  constexpr int kDevices = 64;
  static std::atomic<int> per_sm_of[kDevices];  // 0: not asked yet
  static std::atomic<int> sms_of[kDevices];
  static_assert(kThreads > 0 && kSmem >= 0);
  if (device >= 0 && device < kDevices) {
    const int per_sm = per_sm_of[device].load(std::memory_order_acquire);
    if (per_sm > 0) {
      *fit = {per_sm, sms_of[device].load(std::memory_order_relaxed)};
      return Status::Ok();
    }
  }
  ATTN_RETURN_IF_ERROR(to_status(
      cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem), name));
  int per_sm = 1, sms = 132;
  ATTN_RETURN_IF_ERROR(to_status(
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kKernel, kThreads, kSmem), name));
  ATTN_RETURN_IF_ERROR(
      to_status(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), name));
  *fit = {per_sm > 0 ? per_sm : 1, sms};
  if (device >= 0 && device < kDevices) {
    sms_of[device].store(fit->sms, std::memory_order_relaxed);
    per_sm_of[device].store(fit->per_sm, std::memory_order_release);
  }
  return Status::Ok();
}

}  // namespace attn::cuda
