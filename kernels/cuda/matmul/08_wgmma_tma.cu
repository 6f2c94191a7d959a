// matmul/08_wgmma_tma: the Hopper rung (sm_90a). What changes from rung 07 and why it is faster:
// - Warpgroup MMA (wgmma.m64n256k16): a warpgroup of 128 threads multiplies 64 x 16 by
//   16 x 256 straight from shared memory, asynchronously; no ldmatrix, no register fragments of
//   A or B, and the tensor cores run at the Hopper rate (mma.sync reaches about two thirds).
// - TMA (cp.async.bulk.tensor) fills the shared tiles: one thread issues a whole 128 x 64 or
//   256 x 64 tile, swizzled 128 bytes wide (the layout wgmma reads without bank conflicts), with
//   zeros past the matrix edges; an mbarrier counts the bytes in.
// - Warp specialization: one producer warpgroup (its registers cut to 40 with setmaxnreg) keeps
//   a 4-stage ring full; two consumer warpgroups (232 registers each) own 64 x 256 of the
//   128 x 256 output tile each. Stages are handed back through "empty" mbarriers as soon as the
//   wgmma reading them has retired (one wgmma group stays in flight).
// - Persistent: one block per SM walks the output tiles (grouped 8 tall, so neighbouring blocks
//   share A and B in L2); while the consumers store one tile, the producer already loads the
//   next tile's stages, so the epilogue does not stall the loads.
// bf16/fp16 in, fp32 accumulation, bf16/fp16 out; any transpose flags (M- or N-major operands go
// through wgmma's transpose bits); batched. Refuses operands whose contiguous dimension is not a
// multiple of 8 elements (TMA needs 16-byte row strides).
#include <cudaTypedefs.h>

#include <mutex>

#include "../hopper/hopper.cuh"
#include "matmul_common.cuh"
#include "matmul_rungs.h"

namespace attn::cuda {
namespace {

using namespace hopper;

constexpr int kBM = 128, kBN = 256, kBK = 64, kStages = 4, kGroupM = 8;
constexpr int kConsumers = 2, kThreads = 128 * (kConsumers + 1);
constexpr int kABytes = kBM * kBK * 2, kBBytes = kBN * kBK * 2, kStageBytes = kABytes + kBBytes;
constexpr int kSmemBytes = kStages * kStageBytes + 1024;  // + room to align the ring to 1024 bytes
// A 64-element (128-byte) slab of an M- or N-major tile: kBK rows of 128 bytes.
constexpr int kSlabBytes = kBK * 128;
#ifndef ATTN_WGMMA_MN_SWAP
#define ATTN_WGMMA_MN_SWAP 0
#endif
// M/N-major descriptors: byte offsets between 64-wide slabs and between 8-row k groups.
constexpr std::uint32_t kMNLead = ATTN_WGMMA_MN_SWAP ? 1024 : kSlabBytes;
constexpr std::uint32_t kMNStride = ATTN_WGMMA_MN_SWAP ? kSlabBytes : 1024;

struct Tiles {
  int batch, m, n, k, tiles_m, tiles_n, k_tiles;
  bool b_batched;
  void* c;

  __device__ int count() const { return batch * tiles_m * tiles_n; }
  // Tile t as (batch, m tile, n tile), walking groups of kGroupM m-tiles column by column.
  __device__ void at(int t, int& bt, int& tm, int& tn) const {
    const int per_batch = tiles_m * tiles_n, r = t % per_batch;
    bt = t / per_batch;
    const int group = r / (kGroupM * tiles_n), first = group * kGroupM;
    const int rows = min(tiles_m - first, kGroupM), in_group = r % (kGroupM * tiles_n);
    tm = first + in_group % rows;
    tn = in_group / rows;
  }
};

template <class T, bool TA, bool TB>
__global__ void __launch_bounds__(kThreads, 1)
    wgmma_kernel(const __grid_constant__ CUtensorMap map_a, const __grid_constant__ CUtensorMap map_b, Tiles tiles) {
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  __shared__ __align__(8) std::uint64_t full[kStages], empty[kStages];
  unsigned char* ring = reinterpret_cast<unsigned char*>((reinterpret_cast<std::uintptr_t>(smem_raw) + 1023) & ~std::uintptr_t{1023});
  const int wg = threadIdx.x / 128, tid = threadIdx.x % 128;

  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbar_init(&full[s], 1);
      mbar_init(&empty[s], kConsumers);
    }
    mbar_fence_init();
    tma_prefetch_map(&map_a);
    tma_prefetch_map(&map_b);
  }
  __syncthreads();

  if (wg == 0) {  // producer
    regs_decrease<40>();
    if (tid != 0) return;
    int s = 0;
    std::uint32_t phase = 0;
    for (int t = blockIdx.x; t < tiles.count(); t += gridDim.x) {
      int bt, tm, tn;
      tiles.at(t, bt, tm, tn);
      const int m0 = tm * kBM, n0 = tn * kBN, bb = tiles.b_batched ? bt : 0;
      for (int kt = 0; kt < tiles.k_tiles; ++kt) {
        mbar_wait(&empty[s], phase ^ 1);
        mbar_expect_tx(&full[s], kStageBytes);
        unsigned char* a = ring + s * kStageBytes;
        unsigned char* b = a + kABytes;
        const int k0 = kt * kBK;
        if constexpr (!TA) {
          tma_load_3d(a, &map_a, &full[s], k0, m0, bt);
        } else {
#pragma unroll
          for (int j = 0; j < kBM / 64; ++j) tma_load_3d(a + j * kSlabBytes, &map_a, &full[s], m0 + 64 * j, k0, bt);
        }
        if constexpr (TB) {
          tma_load_3d(b, &map_b, &full[s], k0, n0, bb);
        } else {
#pragma unroll
          for (int j = 0; j < kBN / 64; ++j) tma_load_3d(b + j * kSlabBytes, &map_b, &full[s], n0 + 64 * j, k0, bb);
        }
        if (++s == kStages) s = 0, phase ^= 1;
      }
    }
    return;
  }

  // Consumers: warpgroup wg (1 or 2) owns rows [64 (wg - 1), 64 wg) of each output tile.
  regs_increase<232>();
  const int half = wg - 1, warp = tid / 32, lane = tid % 32;
  int s = 0;
  std::uint32_t phase = 0;
  float d[128];
  for (int t = blockIdx.x; t < tiles.count(); t += gridDim.x) {
    int bt, tm, tn;
    tiles.at(t, bt, tm, tn);
#pragma unroll
    for (int i = 0; i < 128; ++i) d[i] = 0.0f;
    for (int kt = 0; kt < tiles.k_tiles; ++kt) {
      mbar_wait(&full[s], phase);
      const unsigned char* a = ring + s * kStageBytes;
      const unsigned char* b = a + kABytes;
      fence_registers(d);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kBK / 16; ++kk) {
        // K-major tiles: rows of 64 k (128 bytes), 8-row groups 1024 bytes apart; a k-step of 16
        // is 32 bytes along the row. M/N-major tiles: 64-wide slabs of kBK rows; a k-step is 16
        // rows (2048 bytes); 8-row k groups are 1024 bytes apart, slabs kSlabBytes apart.
        const std::uint64_t da = TA ? smem_desc(a + half * kSlabBytes + kk * 2048, kMNLead, kMNStride)
                                    : smem_desc(a + half * 64 * 128 + kk * 32, 16, 1024);
        const std::uint64_t db = TB ? smem_desc(b + kk * 32, 16, 1024) : smem_desc(b + kk * 2048, kMNLead, kMNStride);
        wgmma_m64n256k16<T, TA ? 1 : 0, TB ? 0 : 1>(d, da, db, 1);
      }
      wgmma_commit();
      fence_registers(d);
      // The group before this one has retired: its stage can be refilled.
      wgmma_wait<1>();
      const int prev = s == 0 ? kStages - 1 : s - 1;
      if (kt > 0 && tid == 0) mbar_arrive(&empty[prev]);
      if (++s == kStages) s = 0, phase ^= 1;
    }
    wgmma_wait<0>();
    fence_registers(d);
    if (tiles.k_tiles > 0 && tid == 0) mbar_arrive(&empty[s == 0 ? kStages - 1 : s - 1]);

    // Epilogue: thread (warp, lane) holds rows r and r + 8 of its warp's 16, two columns of
    // every 8. Stored straight from registers, two elements at a time where N allows.
    T* c = static_cast<T*>(tiles.c) + static_cast<long long>(bt) * tiles.m * tiles.n;
    const int r0 = tm * kBM + half * 64 + warp * 16 + lane / 4;
    const int c0 = tn * kBN + (lane % 4) * 2;
    const bool pairs = (tiles.n % 2) == 0;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = r0 + 8 * h;
      if (row >= tiles.m) continue;
      T* crow = c + static_cast<long long>(row) * tiles.n;
#pragma unroll
      for (int j = 0; j < kBN / 8; ++j) {
        const int col = c0 + 8 * j;
        const float x = d[4 * j + 2 * h], y = d[4 * j + 2 * h + 1];
        if (pairs && col + 1 < tiles.n) {
          if constexpr (std::is_same_v<T, __nv_bfloat16>)
            *reinterpret_cast<__nv_bfloat162*>(crow + col) = __floats2bfloat162_rn(x, y);
          else
            *reinterpret_cast<__half2*>(crow + col) = __floats2half2_rn(x, y);
        } else {
          if (col < tiles.n) crow[col] = static_cast<T>(x);
          if (col + 1 < tiles.n) crow[col + 1] = static_cast<T>(y);
        }
      }
    }
  }
}

// The driver's tensor-map encoder, reached through the runtime (no link against libcuda).
Result<PFN_cuTensorMapEncodeTiled_v12000> tensor_map_encoder() {
  static std::once_flag once;
  static PFN_cuTensorMapEncodeTiled_v12000 fn = nullptr;
  std::call_once(once, [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult q{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &q) == cudaSuccess &&
        q == cudaDriverEntryPointSuccess)
      fn = reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(p);
  });
  if (!fn) return internal_error("matmul/08_wgmma_tma: cuTensorMapEncodeTiled is not available");
  return fn;
}

// A 3-D map over a [batch][outer][inner] operand, boxes of [box_outer][64] with 128-byte swizzle.
Result<CUtensorMap> make_map(const void* base, DType dt, long long inner, long long outer, long long batch,
                             int box_outer) {
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
  if (r != CUDA_SUCCESS) return internal_error("matmul/08_wgmma_tma: cuTensorMapEncodeTiled failed (" + std::to_string(r) + ")");
  return map;
}

int device_sms(int device) {
  int sms = 132;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  return sms;
}

}  // namespace

Status matmul_08_supports(const MatmulArgs& args) {
  ATTN_ASSIGN_OR_RETURN(d, matmul_dims(args.a, args.b, args.transpose_a, args.transpose_b));
  if (args.a.dtype != DType::kBFloat16 && args.a.dtype != DType::kFloat16) {
    return invalid_argument("a.dtype: matmul/08_wgmma_tma takes bfloat16, float16, got " +
                            std::string(dtype_name(args.a.dtype)));
  }
  int device = 0, major = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (major != 9) {
    return failed_precondition("matmul/08_wgmma_tma needs a Hopper GPU (compute capability 9.x), this one is " +
                               std::to_string(major) + ".x");
  }
  const long long a_inner = args.transpose_a ? d.m : d.k, b_inner = args.transpose_b ? d.k : d.n;
  if (a_inner % 8 != 0) {
    return invalid_argument(std::string("a.shape: matmul/08_wgmma_tma needs a's contiguous dimension (") +
                            (args.transpose_a ? "M" : "K") + ") to be a multiple of 8, got " + std::to_string(a_inner));
  }
  if (b_inner % 8 != 0) {
    return invalid_argument(std::string("b.shape: matmul/08_wgmma_tma needs b's contiguous dimension (") +
                            (args.transpose_b ? "K" : "N") + ") to be a multiple of 8, got " + std::to_string(b_inner));
  }
  if (d.m > INT_MAX / 2 || d.n > INT_MAX / 2 || d.k > INT_MAX / 2 || d.batch > 65535 ||
      d.batch * ((d.m + kBM - 1) / kBM) * ((d.n + kBN - 1) / kBN) > INT_MAX) {
    return invalid_argument("a.shape: matmul/08_wgmma_tma takes M, N, K < 2^30 and a batch <= 65535");
  }
  for (const TensorView* t : {&args.a, &args.b, &args.c})
    if (reinterpret_cast<std::uintptr_t>(t->data) % 16 != 0)
      return invalid_argument("a.data: matmul/08_wgmma_tma needs 16-byte aligned operands");
  return Status::Ok();
}

Status matmul_08_wgmma_tma(const MatmulArgs& args, Stream& stream) {
  ATTN_RETURN_IF_ERROR(matmul_08_supports(args));
  ATTN_ASSIGN_OR_RETURN(d, matmul_dims(args.a, args.b, args.transpose_a, args.transpose_b));
  const long long b_batch = d.b_batched ? d.batch : 1;
  // A as stored: [batch][M][K] (K-major) or [batch][K][M] with transpose_a; B: [N][K] with
  // transpose_b (K-major) or [K][N].
  ATTN_ASSIGN_OR_RETURN(map_a, args.transpose_a ? make_map(args.a.data, args.a.dtype, d.m, d.k, d.batch, kBK)
                                                : make_map(args.a.data, args.a.dtype, d.k, d.m, d.batch, kBM));
  ATTN_ASSIGN_OR_RETURN(map_b, args.transpose_b ? make_map(args.b.data, args.b.dtype, d.k, d.n, b_batch, kBN)
                                                : make_map(args.b.data, args.b.dtype, d.n, d.k, b_batch, kBK));
  Tiles tiles{static_cast<int>(d.batch), static_cast<int>(d.m), static_cast<int>(d.n), static_cast<int>(d.k),
              ceil_div(d.m, kBM), ceil_div(d.n, kBN), ceil_div(d.k, kBK), d.b_batched, args.c.data};
  const int count = tiles.batch * tiles.tiles_m * tiles.tiles_n;
  const int grid = std::min(count, device_sms(stream.device()));
  cudaError_t e = cudaSuccess;
  auto launch = [&](auto kernel) {
    e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
    if (e == cudaSuccess) {
      kernel<<<grid, kThreads, kSmemBytes, stream_of(stream)>>>(map_a, map_b, tiles);
      e = cudaGetLastError();
    }
  };
  auto with_type = [&](auto type) {
    using T = decltype(type);
    if (args.transpose_a) {
      if (args.transpose_b) launch(wgmma_kernel<T, true, true>);
      else launch(wgmma_kernel<T, true, false>);
    } else {
      if (args.transpose_b) launch(wgmma_kernel<T, false, true>);
      else launch(wgmma_kernel<T, false, false>);
    }
  };
  if (args.a.dtype == DType::kBFloat16) with_type(__nv_bfloat16{});
  else with_type(__half{});
  return to_status(e, "matmul/08_wgmma_tma launch");
}

}  // namespace attn::cuda
