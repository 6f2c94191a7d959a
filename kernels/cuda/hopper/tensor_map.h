// Host side of the Hopper rungs: the architecture check and CUtensorMap descriptors for 16-bit tensors. The driver's encoder is
// reached through the runtime, so nothing links against libcuda.
#pragma once

#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>

#include <mutex>
#include <string>

#include "attn/dtype.h"
#include "attn/status.h"

namespace attn::cuda::hopper {

// The rungs built on wgmma and TMA run on compute capability 9.x only.
inline Status require_hopper(const std::string& name) {
  int device = 0, major = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (major == 9) return Status::Ok();
  return failed_precondition(name + " needs a Hopper GPU (compute capability 9.x), this one is " +
                             std::to_string(major) + ".x");
}

inline Result<PFN_cuTensorMapEncodeTiled_v12000> tensor_map_encoder() {
  static std::once_flag once;
  static PFN_cuTensorMapEncodeTiled_v12000 fn = nullptr;
  std::call_once(once, [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult q{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &q) == cudaSuccess &&
        q == cudaDriverEntryPointSuccess)
      fn = reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f);
  });
  if (!fn) return internal_error("cuTensorMapEncodeTiled is not available from this driver");
  return fn;
}

// A map over a [batch][outer][inner] bf16/fp16 tensor (inner contiguous), copied in boxes of
// [box_outer][64] with the 128-byte swizzle; reads past the edges give zeros, writes are clipped.
inline Result<CUtensorMap> tensor_map_3d(const void* base, DType dt, long long inner, long long outer,
                                         long long batch, int box_outer) {
  ATTN_ASSIGN_OR_RETURN(encode, tensor_map_encoder());
  CUtensorMap map{};
  const cuuint64_t dims[3] = {static_cast<cuuint64_t>(inner), static_cast<cuuint64_t>(outer),
                              static_cast<cuuint64_t>(batch)};
  const cuuint64_t strides[2] = {static_cast<cuuint64_t>(inner * 2), static_cast<cuuint64_t>(inner * outer * 2)};
  const cuuint32_t box[3] = {64, static_cast<cuuint32_t>(box_outer), 1};
  const cuuint32_t unit[3] = {1, 1, 1};
  const CUresult r = encode(&map, dt == DType::kBFloat16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
                            3, const_cast<void*>(base), dims, strides, box, unit, CU_TENSOR_MAP_INTERLEAVE_NONE,
                            CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) return internal_error("cuTensorMapEncodeTiled failed (CUresult " + std::to_string(r) + ")");
  return map;
}

}  // namespace attn::cuda::hopper
