#include "state/cuda_ipc.h"

#if ATTN_SERVER_CUDA
#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>

#include <cstring>
#include <map>
#include <mutex>
#endif

namespace attn::server {

#if ATTN_SERVER_CUDA

namespace {

std::string cuda_error(cudaError_t e) {
  return std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e);
}

// cuMemGetAddressRange, through the runtime (as the TMA encoder is): the size of the allocation
// a pointer is in, so that a region can never name bytes past it.
PFN_cuMemGetAddressRange_v3020 address_range() {
  static std::once_flag once;
  static PFN_cuMemGetAddressRange_v3020 fn = nullptr;
  std::call_once(once, [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult q{};
    if (cudaGetDriverEntryPointByVersion("cuMemGetAddressRange", &f, 3020, cudaEnableDefault, &q) ==
            cudaSuccess &&
        q == cudaDriverEntryPointSuccess)
      fn = reinterpret_cast<PFN_cuMemGetAddressRange_v3020>(f);
  });
  return fn;
}

// Mappings open in this process, by device and handle. The driver maps a handle once per context:
// a second cudaIpcOpenMemHandle of the same allocation (two regions carved from one client
// buffer, as a framework's caching allocator hands out) fails, so each further region shares the
// first one's mapping, and the last to go closes it.
struct OpenMapping {
  void* base = nullptr;
  int users = 0;
};
std::mutex open_mutex;
std::map<std::string, OpenMapping>& open_mappings() {
  static auto* m = new std::map<std::string, OpenMapping>;
  return *m;
}
std::string mapping_key(int device, const std::string& handle) {
  return std::to_string(device) + ":" + handle;
}
void release(const CudaIpcMapping& m);

}  // namespace

bool cuda_ipc_built() { return true; }

Result<CudaIpcMapping> open_cuda_ipc(const std::string& handle, int device) {
  if (handle.size() != sizeof(cudaIpcMemHandle_t)) {
    return invalid_argument("cuda_ipc_handle: expected the " +
                            std::to_string(sizeof(cudaIpcMemHandle_t)) +
                            " bytes of a cudaIpcMemHandle_t, got " + std::to_string(handle.size()));
  }
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();
    return failed_precondition(
        "device_id: this server sees no CUDA device, so it cannot open CUDA IPC handles");
  }
  if (device < 0 || device >= count) {
    return failed_precondition("device_id: this server sees CUDA devices 0-" +
                               std::to_string(count - 1) + ", not " + std::to_string(device));
  }
  if (const cudaError_t e = cudaSetDevice(device); e != cudaSuccess) {
    cudaGetLastError();
    return failed_precondition("device_id: cannot use cuda:" + std::to_string(device) + ": " +
                               cuda_error(e));
  }
  cudaIpcMemHandle_t h;
  std::memcpy(&h, handle.data(), sizeof h);
  std::lock_guard lock(open_mutex);
  const std::string key = mapping_key(device, handle);
  void* p = nullptr;
  if (auto it = open_mappings().find(key); it != open_mappings().end()) {
    p = it->second.base;
  } else if (const cudaError_t e = cudaIpcOpenMemHandle(&p, h, cudaIpcMemLazyEnablePeerAccess);
             e != cudaSuccess) {
    // (That flag is the only one there is; memory of another device is refused below, not read
    // across the link.)
    cudaGetLastError();
    return failed_precondition(
        "cuda_ipc_handle: cudaIpcOpenMemHandle on cuda:" + std::to_string(device) + " failed (" +
        cuda_error(e) +
        "): the exporting process must be alive, on this host, share this server's IPC "
        "namespace, and not be this process");
  }
  CudaIpcMapping m;
  m.base = p;
  m.device = device;
  m.key = key;
  ++open_mappings()[key].users;
  open_mappings()[key].base = p;
  cudaPointerAttributes attr{};
  if (cudaPointerGetAttributes(&attr, p) != cudaSuccess || attr.type != cudaMemoryTypeDevice ||
      attr.device != device) {
    cudaGetLastError();
    const int on = attr.device;
    release(m);
    return failed_precondition(
        "device_id: the handle's memory lives on cuda:" + std::to_string(on) +
        ", not cuda:" + std::to_string(device) + "; register it with device_id " +
        std::to_string(on) + " on a server that serves that device");
  }
  CUdeviceptr base = 0;
  std::size_t size = 0;
  auto range = address_range();
  if (!range || range(&base, &size, reinterpret_cast<CUdeviceptr>(p)) != CUDA_SUCCESS) {
    release(m);
    return failed_precondition(
        "cuda_ipc_handle: the driver would not say how large the exported allocation is "
        "(cuMemGetAddressRange), so its bounds cannot be checked");
  }
  m.bytes = size - static_cast<std::size_t>(reinterpret_cast<CUdeviceptr>(p) - base);
  return m;
}

void close_cuda_ipc(const CudaIpcMapping& m) {
  if (!m.base) return;
  std::lock_guard lock(open_mutex);
  release(m);
}

namespace {

// With open_mutex held: one user fewer, and the mapping closed when it was the last.
void release(const CudaIpcMapping& m) {
  auto it = open_mappings().find(m.key);
  if (it != open_mappings().end() && --it->second.users > 0) return;
  if (it != open_mappings().end()) open_mappings().erase(it);
  int previous = 0;
  cudaGetDevice(&previous);
  cudaSetDevice(m.device);
  cudaIpcCloseMemHandle(m.base);
  cudaGetLastError();
  cudaSetDevice(previous);
}

}  // namespace

#else

bool cuda_ipc_built() { return false; }

Result<CudaIpcMapping> open_cuda_ipc(const std::string&, int) {
  return failed_precondition(
      "kind: this attnd was built without the CUDA backend, so it cannot open CUDA IPC handles");
}

void close_cuda_ipc(const CudaIpcMapping&) {}

#endif

}  // namespace attn::server
