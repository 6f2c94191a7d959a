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
// - Skinny M (too few 128 x 256 tiles to fill the GPU): 128 x 128 or 128 x 64 tiles, with 6 or
//   8 stages, so that every SM streams its own share of B; a skinny matmul is a stream of B from
//   memory, and narrower tiles fill the GPU without split-K's fp32 partial sums (measured: split
//   K was 11-34% slower than no split at M = 128..384). Only where even 128 x 64 tiles leave half
//   the GPU idle is K split, the last split of a tile adding the others' partial sums.
// bf16/fp16 in, fp32 accumulation, bf16/fp16 out; any transpose flags (M- or N-major operands go
// through wgmma's transpose bits); batched. Refuses operands whose contiguous dimension is not a
// multiple of 8 elements (TMA needs 16-byte row strides).
#include "../hopper/hopper.cuh"
#include "../hopper/tensor_map.h"
#include "matmul_common.cuh"
#include "matmul_rungs.h"

namespace attn::cuda {
namespace {

using namespace hopper;

constexpr int kBM = 128, kBK = 64, kGroupM = 8;
constexpr int kConsumers = 2, kThreads = 128 * (kConsumers + 1);
constexpr int kABytes = kBM * kBK * 2;
// Each consumer warpgroup stages 64 x 128 of its output at a time for TMA stores.
constexpr int kCBytes = 64 * 128 * 2;
// A 64-element (128-byte) slab of an M- or N-major tile: kBK rows of 128 bytes.
constexpr int kSlabBytes = kBK * 128;

// The output tile is 128 x kBN; kBN = 256 for the square and wide shapes, 128 or 64 for skinny M.
// The ring takes what shared memory allows: 4 stages of 48 KiB, 6 of 32 KiB or 8 of 24 KiB.
template <int kBN>
struct TileShape {
  static constexpr int kBBytes = kBN * kBK * 2, kStageBytes = kABytes + kBBytes;
  static constexpr int kStages = kBN == 256 ? 4 : kBN == 128 ? 6 : 8;
  static constexpr int kPassCols = kBN < 128 ? kBN : 128;  // columns of C staged per TMA store pass
  static constexpr int kSmemBytes = kStages * kStageBytes + kConsumers * kCBytes + 1024;  // + room to align
  static constexpr int kAcc = kBN / 2;  // fp32 accumulators per consumer thread (64 x kBN / 128)
};

template <class T, int kTransA, int kTransB, int kBN>
__device__ __forceinline__ void wgmma_tile(float (&d)[kBN / 2], std::uint64_t da, std::uint64_t db) {
  if constexpr (kBN == 256) wgmma_m64n256k16<T, kTransA, kTransB>(d, da, db, 1);
  else if constexpr (kBN == 128) wgmma_m64n128k16<T, kTransA, kTransB>(d, da, db, 1);
  else wgmma_m64n64k16<T, kTransA, kTransB>(d, da, db, 1);
}

struct Tiles {
  int batch, m, n, k, tiles_m, tiles_n, k_tiles;
  int splits;      // > 1: K split across blocks, partial sums in `partial`, merged by the last
  bool b_batched;
  bool tma_store;  // C leaves through shared memory and TMA (needs rows of 16-byte multiples)
  void* c;
  float* partial;  // [tile][split][kBN / 2 values][256 consumer threads]
  int* arrived;    // [tile]: splits done (zeroed before the launch)

  __device__ int count() const { return batch * tiles_m * tiles_n * splits; }
  // Work unit u as (batch, m tile, n tile, split), walking groups of kGroupM m-tiles column by
  // column so that neighbouring blocks share A and B in L2.
  __device__ void at(int u, int& bt, int& tm, int& tn, int& split) const {
    split = u % splits;
    u /= splits;
    const int per_batch = tiles_m * tiles_n, r = u % per_batch;
    bt = u / per_batch;
    const int group = r / (kGroupM * tiles_n), first = group * kGroupM;
    const int rows = min(tiles_m - first, kGroupM), in_group = r % (kGroupM * tiles_n);
    tm = first + in_group % rows;
    tn = in_group / rows;
  }
};

// kSplitK: each unit covers a share of K; its fp32 sums are parked in `partial` and the last
// split of a tile to finish adds the others' and stores (for too few tiles to fill the GPU).
template <class T, bool TA, bool TB, bool kSplitK, int kBN>
__global__ void __launch_bounds__(kThreads, 1)
    wgmma_kernel(const __grid_constant__ CUtensorMap map_a, const __grid_constant__ CUtensorMap map_b,
                 const __grid_constant__ CUtensorMap map_c, Tiles tiles) {
  using Shape = TileShape<kBN>;
  constexpr int kStages = Shape::kStages, kStageBytes = Shape::kStageBytes, kAcc = Shape::kAcc;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  __shared__ __align__(8) std::uint64_t full[kStages], empty[kStages];
  __shared__ int last_split;
  unsigned char* ring = reinterpret_cast<unsigned char*>((reinterpret_cast<std::uintptr_t>(smem_raw) + 1023) & ~std::uintptr_t{1023});
  const int wg = threadIdx.x / 128, tid = threadIdx.x % 128;
  auto k_range = [&](int split, int& kt0, int& kt1) {
    kt0 = kSplitK ? split * tiles.k_tiles / tiles.splits : 0;
    kt1 = kSplitK ? (split + 1) * tiles.k_tiles / tiles.splits : tiles.k_tiles;
  };

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

  if (wg == 0) {  // producer: one thread issues every copy
    regs_decrease<40>();
    if (tid != 0) return;
    int s = 0;
    std::uint32_t phase = 0;
    for (int u = blockIdx.x; u < tiles.count(); u += gridDim.x) {
      int bt, tm, tn, split, kt0, kt1;
      tiles.at(u, bt, tm, tn, split);
      k_range(split, kt0, kt1);
      const int m0 = tm * kBM, n0 = tn * kBN, bb = tiles.b_batched ? bt : 0;
      for (int kt = kt0; kt < kt1; ++kt) {
        mbar_wait(&empty[s], phase ^ 1);  // both consumers are done with the stage
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
  float d[kAcc];
  for (int u = blockIdx.x; u < tiles.count(); u += gridDim.x) {
    int bt, tm, tn, split, kt0, kt1;
    tiles.at(u, bt, tm, tn, split);
    k_range(split, kt0, kt1);
#pragma unroll
    for (int i = 0; i < kAcc; ++i) d[i] = 0.0f;
    for (int kt = kt0; kt < kt1; ++kt) {
      // Never true; without it ptxas cannot place a split's first wgmma (kt0 not a constant) and
      // serializes every wgmma of the split-K kernel (C7515).
      if (kt < kt0) __builtin_unreachable();
      mbar_wait(&full[s], phase);
      const unsigned char* a = ring + s * kStageBytes;
      const unsigned char* b = a + kABytes;
      fence_registers(d);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kBK / 16; ++kk) {
        // K-major tiles: rows of 64 k (128 bytes), 8-row groups 1024 bytes apart; a k-step of 16
        // is 32 bytes along the row. M/N-major tiles: 64-wide slabs of kBK rows; a k-step is 16
        // rows (2048 bytes); the descriptor's leading offset is the slab stride, its stride
        // offset the 1024 bytes between 8-row k groups (checked on the H100 against cuBLAS).
        const std::uint64_t da = TA ? smem_desc(a + half * kSlabBytes + kk * 2048, kSlabBytes, 1024)
                                    : smem_desc(a + half * 64 * 128 + kk * 32, 16, 1024);
        const std::uint64_t db = TB ? smem_desc(b + kk * 32, 16, 1024) : smem_desc(b + kk * 2048, kSlabBytes, 1024);
        wgmma_tile<T, TA ? 1 : 0, TB ? 0 : 1, kBN>(d, da, db);
      }
      wgmma_commit();
      fence_registers(d);
      // The group before this one has retired: its stage can be refilled.
      wgmma_wait<1>();
      const int prev = s == 0 ? kStages - 1 : s - 1;
      if (kt > kt0 && tid == 0) mbar_arrive(&empty[prev]);
      if (++s == kStages) s = 0, phase ^= 1;
    }
    wgmma_wait<0>();
    fence_registers(d);
    if (kt1 > kt0 && tid == 0) mbar_arrive(&empty[s == 0 ? kStages - 1 : s - 1]);

    if constexpr (kSplitK) {
      const int tile = u / tiles.splits, ct = half * 128 + tid;
      float* mine = tiles.partial + (static_cast<long long>(tile) * tiles.splits + split) * kAcc * 256;
#pragma unroll
      for (int j = 0; j < kAcc; ++j) mine[j * 256 + ct] = d[j];
      __threadfence();
      named_barrier(1, 256);  // both consumer warpgroups have parked their sums
      if (threadIdx.x == 128) last_split = atomicAdd(&tiles.arrived[tile], 1) == tiles.splits - 1;
      named_barrier(1, 256);
      if (!last_split) continue;
      __threadfence();
      for (int other = 0; other < tiles.splits; ++other) {
        if (other == split) continue;
        const float* theirs = tiles.partial + (static_cast<long long>(tile) * tiles.splits + other) * kAcc * 256;
#pragma unroll
        for (int j = 0; j < kAcc; ++j) d[j] += __ldcg(theirs + j * 256 + ct);
      }
    }

    // Epilogue: thread (warp, lane) holds rows r and r + 8 of its warp's 16, two columns of
    // every 8. Stored straight from registers these are 4-byte pieces of 8 rows per warp store,
    // which cost 16% of the time at 4096^3; instead each 64 x 128 of the warpgroup's 64 x kBN goes to
    // shared memory (two 64 x 64 slabs in the 128-byte swizzle the C map expects: chunk c of
    // row r at c ^ (r % 8), so a warp's 8 rows hit different banks) and leaves by TMA.
    if (tiles.tma_store) {
      unsigned char* cbuf = ring + kStages * kStageBytes + half * kCBytes;
#pragma unroll
      for (int pass = 0; pass < kBN / Shape::kPassCols; ++pass) {
        constexpr int kJ = Shape::kPassCols / 8;  // 8-column groups per pass
        if (tid == 0) tma_store_wait_read();  // the previous store has read the buffer
        named_barrier(2 + half, 128);
#pragma unroll
        for (int j = kJ * pass; j < kJ * pass + kJ; ++j)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int row = warp * 16 + lane / 4 + 8 * h, chunk = j % 8;
            const int offset = ((j - kJ * pass) / 8) * 64 * 128 + row * 128 + ((chunk ^ (row % 8)) << 4) + (lane % 4) * 4;
            const float x = d[4 * j + 2 * h], y = d[4 * j + 2 * h + 1];
            std::uint32_t packed;
            if constexpr (std::is_same_v<T, __nv_bfloat16>) {
              __nv_bfloat162 v = __floats2bfloat162_rn(x, y);
              packed = *reinterpret_cast<std::uint32_t*>(&v);
            } else {
              __half2 v = __floats2half2_rn(x, y);
              packed = *reinterpret_cast<std::uint32_t*>(&v);
            }
            asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(smem_u32(cbuf + offset)), "r"(packed) : "memory");
          }
        fence_async_shared();
        named_barrier(2 + half, 128);
        if (tid == 0) {
          for (int slab = 0; slab < Shape::kPassCols / 64; ++slab)
            tma_store_3d(&map_c, cbuf + slab * 64 * 128, tn * kBN + Shape::kPassCols * pass + 64 * slab,
                         tm * kBM + half * 64, bt);
          tma_store_commit();
        }
      }
      continue;
    }
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
  if (tiles.tma_store && tid == 0) tma_store_wait_all();  // the buffer outlives its last store
}

int device_sms(int device) {
  int sms = 132;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  return sms;
}

}  // namespace

Status matmul_08_supports(const MatmulArgs& args) {
  ATTN_ASSIGN_OR_RETURN(d, matmul_dims(args.a, args.b, args.transpose_a, args.transpose_b));
  ATTN_RETURN_IF_ERROR(sixteen_bit_supports(args, d, "matmul/08_wgmma_tma"));
  ATTN_RETURN_IF_ERROR(require_hopper("matmul/08_wgmma_tma"));
  if (d.batch * ((d.m + kBM - 1) / kBM) * ((d.n + 255) / 256) > INT_MAX / 64) {
    return invalid_argument("a.shape: matmul/08_wgmma_tma takes fewer than 2^25 output tiles");
  }
  return Status::Ok();
}

namespace {

// Launches the 128 x kBN form with K split `splits` ways (128-wide tiles only): makes the tensor
// maps and the workspace.
template <int kBN>
Status launch_tiles(const MatmulArgs& args, const MatmulDims& d, cudaStream_t cs, int sms, int splits) {
  using Shape = TileShape<kBN>;
  if (splits > 1 && kBN != 128) return internal_error("matmul/08 splits K of 128-wide tiles only");
  Tiles tiles{static_cast<int>(d.batch), static_cast<int>(d.m), static_cast<int>(d.n), static_cast<int>(d.k),
              ceil_div(d.m, kBM), ceil_div(d.n, kBN), ceil_div(d.k, kBK), splits, d.b_batched, false, args.c.data,
              nullptr, nullptr};
  const int tile_count = tiles.batch * tiles.tiles_m * tiles.tiles_n;

  const long long b_batch = d.b_batched ? d.batch : 1;
  // A as stored: [batch][M][K] (K-major) or [batch][K][M] with transpose_a; B: [N][K] with
  // transpose_b (K-major) or [K][N].
  ATTN_ASSIGN_OR_RETURN(map_a, args.transpose_a ? tensor_map_3d(args.a.data, args.a.dtype, d.m, d.k, d.batch, kBK)
                                                : tensor_map_3d(args.a.data, args.a.dtype, d.k, d.m, d.batch, kBM));
  ATTN_ASSIGN_OR_RETURN(map_b, args.transpose_b ? tensor_map_3d(args.b.data, args.b.dtype, d.k, d.n, b_batch, kBN)
                                                : tensor_map_3d(args.b.data, args.b.dtype, d.n, d.k, b_batch, kBK));
  // C: [batch][M][N], stored in 64 x 64 boxes (TMA clips the edges); rows must be 16-byte multiples.
  tiles.tma_store = d.n % 8 == 0;
  CUtensorMap map_c{};
  if (tiles.tma_store) {
    ATTN_ASSIGN_OR_RETURN(m, tensor_map_3d(args.c.data, args.c.dtype, d.n, d.m, d.batch, 64));
    map_c = m;
  }
  char* workspace = nullptr;
  if (tiles.splits > 1) {
    const std::size_t counts = (tile_count * sizeof(int) + 255) / 256 * 256;
    const std::size_t partial = static_cast<std::size_t>(tile_count) * tiles.splits * Shape::kAcc * 256 * sizeof(float);
    ATTN_RETURN_IF_ERROR(to_status(cudaMallocAsync(&workspace, counts + partial, cs), "matmul/08 workspace"));
    tiles.arrived = reinterpret_cast<int*>(workspace);
    tiles.partial = reinterpret_cast<float*>(workspace + counts);
    const Status zeroed = to_status(cudaMemsetAsync(tiles.arrived, 0, counts, cs), "matmul/08 workspace");
    if (!zeroed.ok()) {
      cudaFreeAsync(workspace, cs);
      return zeroed;
    }
  }

  const int grid = std::min(tile_count * tiles.splits, sms);
  cudaError_t e = cudaSuccess;
  auto launch = [&](auto kernel) {
    e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Shape::kSmemBytes);
    if (e != cudaSuccess) return;
    kernel<<<grid, kThreads, Shape::kSmemBytes, cs>>>(map_a, map_b, map_c, tiles);
    e = cudaGetLastError();
  };
  auto with_layout_of = [&](auto type, auto ta, auto tb) {
    using T = decltype(type);
    constexpr bool TA = decltype(ta)::value, TB = decltype(tb)::value;
    if constexpr (kBN == 128) {
      if (tiles.splits > 1) return launch(wgmma_kernel<T, TA, TB, true, kBN>);
    }
    launch(wgmma_kernel<T, TA, TB, false, kBN>);
  };
  auto with_type = [&](auto type) {
    if (args.transpose_a) {
      if (args.transpose_b) with_layout_of(type, std::true_type{}, std::true_type{});
      else with_layout_of(type, std::true_type{}, std::false_type{});
    } else {
      if (args.transpose_b) with_layout_of(type, std::false_type{}, std::true_type{});
      else with_layout_of(type, std::false_type{}, std::false_type{});
    }
  };
  if (args.a.dtype == DType::kBFloat16) with_type(__nv_bfloat16{});
  else with_type(__half{});
  if (workspace) cudaFreeAsync(workspace, cs);
  return to_status(e, "matmul/08_wgmma_tma launch");
}

}  // namespace

Matmul08Form matmul_08_form(const MatmulDims& d, int sms) {
  // The widest tile that still gives more tiles than half the SMs: 128 x 256 for the square and
  // wide shapes; for skinny M narrower tiles fill the GPU instead (at N = K = 8192: M = 256 takes
  // 128 x 128, M = 128 takes 128 x 64, as cuBLAS does), each streaming its own share of B with
  // no partial sums. Only where even 128 x 64 tiles leave half the GPU idle is K split (128 x 128
  // tiles, at least 8 k-tiles a split) and the fp32 partial sums merged by the last split.
  auto tiles_of = [&](int bn) { return d.batch * ceil_div(d.m, kBM) * static_cast<long long>(ceil_div(d.n, bn)); };
  Matmul08Form f{256, 1, 0.0};
  if (tiles_of(256) <= sms / 2) f.tile_n = tiles_of(128) > sms / 2 ? 128 : tiles_of(64) > sms / 2 ? 64 : 128;
  const long long tiles = tiles_of(f.tile_n);
  if (tiles <= sms / 2) {
    f.splits = std::max(1, std::min(static_cast<int>(sms / tiles), ceil_div(d.k, kBK) / 8));
  } else {
    // Busy SMs in the last wave, times the rows of the tiles that hold data.
    const long long waves = (tiles + sms - 1) / sms;
    f.fill = static_cast<double>(tiles) / static_cast<double>(waves * sms) * static_cast<double>(d.m) /
             (static_cast<double>(ceil_div(d.m, kBM)) * kBM);
  }
  return f;
}

int device_sms_of_current() {
  int device = 0;
  cudaGetDevice(&device);
  return device_sms(device);
}

Status matmul_08_wgmma_tma(const MatmulArgs& args, Stream& stream) {
  ATTN_RETURN_IF_ERROR(matmul_08_supports(args));
  ATTN_ASSIGN_OR_RETURN(d, matmul_dims(args.a, args.b, args.transpose_a, args.transpose_b));
  const int sms = device_sms(stream.device());
  const cudaStream_t cs = stream_of(stream);
  const Matmul08Form f = matmul_08_form(d, sms);
  if (f.tile_n == 256) return launch_tiles<256>(args, d, cs, sms, f.splits);
  if (f.tile_n == 64) return launch_tiles<64>(args, d, cs, sms, f.splits);
  return launch_tiles<128>(args, d, cs, sms, f.splits);
}

}  // namespace attn::cuda
