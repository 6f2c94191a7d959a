// matmul/07_mma_pipelined: the first 16-bit rung, on tensor cores. What changes from rung 06
// (fp32 FFMA) and why it is faster:
// - mma.sync m16n8k16 (bf16/fp16 in, fp32 accumulate): one instruction does 2048 multiply-adds
//   where rung 06 needed a warp-wide FFMA for 32. Each warp owns 64 x 32 of a 128 x 128 tile
//   (16 mma per k-step of 16, 64 accumulators a thread).
// - ldmatrix loads the operand fragments, 4 8x8 matrices per instruction; its .trans form reads
//   M- or N-major operands as stored, so every transpose flag runs without a copy.
// - Shared tiles are stored as in memory (rows of 64 k, or of 128 m/n) with 16-byte chunks
//   XOR-swizzled by row % 8: the 8 rows an ldmatrix reads land in 8 different bank groups.
// - A 3-stage cp.async pipeline: tiles k+1 and k+2 are in flight while tile k is multiplied; 96 KB
//   of shared memory and <= 128 registers a thread let two blocks share an SM.
// bf16/fp16 in and out; contiguous dimensions must be multiples of 8 (16-byte copies).
#include "../common/mma_sync.cuh"
#include "matmul_common.cuh"
#include "matmul_rungs.h"

namespace attn::cuda {
namespace {

constexpr int kBM = 128, kBN = 128, kBK = 64, kStages = 3, kThreads = 256;
constexpr int kTileBytes = kBM * kBK * 2;  // one operand's tile: 16 KB (kBM == kBN)
constexpr int kSmemBytes = kStages * 2 * kTileBytes;

struct Problem16 {
  int batch, m, n, k;
  const void* a;
  const void* b;
  void* c;
  long long stride_a, stride_b, stride_c;
};

using namespace mma_sync;

// Byte offset of 16-byte chunk `chunk` of row `row` in a tile of `row_bytes`-long rows.
__device__ __forceinline__ unsigned swz(int row, int chunk, int row_bytes) {
  return static_cast<unsigned>(row * row_bytes + ((chunk ^ (row & 7)) << 4));
}
// Copies one operand's tile as stored: `rows` rows of `row_elems` contiguous elements starting at
// (row0, col0) of a [rows_total][cols_total] matrix; zeros outside it.
__device__ __forceinline__ void load_tile(unsigned tile, const char* base, int row0, int col0, int rows,
                                          int row_elems, int rows_total, int cols_total) {
  const int chunks = row_elems / 8, row_bytes = row_elems * 2;
  for (int idx = threadIdx.x; idx < rows * chunks; idx += kThreads) {
    const int r = idx / chunks, ch = idx % chunks;
    const int gr = row0 + r, gc = col0 + ch * 8;
    const bool valid = gr < rows_total && gc < cols_total;
    const char* src = valid ? base + (static_cast<long long>(gr) * cols_total + gc) * 2 : base;
    cp_async16(tile + swz(r, ch, row_bytes), src, valid);
  }
}

template <class T, bool TA, bool TB>
__global__ void __launch_bounds__(kThreads, 2) mma_kernel(Problem16 p) {
  extern __shared__ __align__(128) unsigned char smem[];
  const unsigned base = smem_addr(smem);
  const int bz = blockIdx.z, m0 = blockIdx.y * kBM, n0 = blockIdx.x * kBN;
  const char* a = static_cast<const char*>(p.a) + bz * p.stride_a * 2;
  const char* b = static_cast<const char*>(p.b) + bz * p.stride_b * 2;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wm = (warp / 4) * 64, wn = (warp % 4) * 32;  // this warp's 64 x 32 of the tile
  const int k_tiles = (p.k + kBK - 1) / kBK;

  // Tile kt of A: [kBM][kBK] as stored ([m][k]), or [kBK][kBM] with TA ([k][m]); B likewise
  // [kBK][kBN] ([k][n]) or [kBN][kBK] with TB ([n][k]).
  auto load_stage = [&](int kt) {
    const unsigned at = base + (kt % kStages) * 2 * kTileBytes, bt = at + kTileBytes;
    const int k0 = kt * kBK;
    if (TA) load_tile(at, a, k0, m0, kBK, kBM, p.k, p.m);
    else load_tile(at, a, m0, k0, kBM, kBK, p.m, p.k);
    if (TB) load_tile(bt, b, n0, k0, kBN, kBK, p.n, p.k);
    else load_tile(bt, b, k0, n0, kBK, kBN, p.k, p.n);
  };

  float acc[4][4][4] = {};
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < k_tiles) load_stage(s);
    cp_async_commit();
  }
  for (int kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // tile kt has landed for everyone; tile kt - 1's buffer is free
    if (kt + kStages - 1 < k_tiles) load_stage(kt + kStages - 1);
    cp_async_commit();
    const unsigned at = base + (kt % kStages) * 2 * kTileBytes, bt = at + kTileBytes;
#pragma unroll
    for (int kk = 0; kk < kBK / 16; ++kk) {
      unsigned af[4][4], bf[2][4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {  // A fragments of m16 tile i: rows wm + 16 i .., k 16 kk ..
        const int mr = wm + 16 * i;
        if (TA)  // stored [k][m]: matrices (m 0-7 | 8-15) x (k 0-7 | 8-15), read transposed
          ldsm_x4_trans(af[i], at + swz(16 * kk + lane % 8 + (lane / 16) * 8, mr / 8 + (lane / 8) % 2, kBM * 2));
        else
          ldsm_x4(af[i], at + swz(mr + lane % 16, 2 * kk + lane / 16, kBK * 2));
      }
#pragma unroll
      for (int j = 0; j < 2; ++j) {  // B fragments of n8 tiles 2j, 2j + 1: cols wn + 16 j ..
        const int nc = wn + 16 * j;
        if (TB)  // stored [n][k]: rows are n, as mma's "col" B wants
          ldsm_x4(bf[j], bt + swz(nc + lane % 8 + (lane / 16) * 8, 2 * kk + (lane / 8) % 2, kBK * 2));
        else  // stored [k][n]: read transposed
          ldsm_x4_trans(bf[j], bt + swz(16 * kk + lane % 8 + ((lane / 8) % 2) * 8, nc / 8 + lane / 16, kBN * 2));
      }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          mma16816<T>(acc[i][2 * j], af[i], bf[j][0], bf[j][1]);
          mma16816<T>(acc[i][2 * j + 1], af[i], bf[j][2], bf[j][3]);
        }
    }
  }
  cp_async_wait<0>();

  // Thread (lane / 4, lane % 4) holds rows g and g + 8, columns 2 (lane % 4) + {0, 1} of each tile.
  T* c = static_cast<T*>(p.c) + bz * p.stride_c;
  const bool pairs = p.n % 2 == 0;
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = m0 + wm + 16 * i + lane / 4 + 8 * h;
      if (row >= p.m) continue;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int col = n0 + wn + 8 * j + (lane % 4) * 2;
        const float x = acc[i][j][2 * h], y = acc[i][j][2 * h + 1];
        T* dst = c + static_cast<long long>(row) * p.n + col;
        if (pairs && col + 1 < p.n) {
          if constexpr (std::is_same_v<T, __nv_bfloat16>)
            *reinterpret_cast<__nv_bfloat162*>(dst) = __floats2bfloat162_rn(x, y);
          else
            *reinterpret_cast<__half2*>(dst) = __floats2half2_rn(x, y);
        } else {
          if (col < p.n) dst[0] = static_cast<T>(x);
          if (col + 1 < p.n) dst[1] = static_cast<T>(y);
        }
      }
    }
}

}  // namespace

Status matmul_07_supports(const MatmulArgs& args) {
  ATTN_ASSIGN_OR_RETURN(d, matmul_dims(args.a, args.b, args.transpose_a, args.transpose_b));
  ATTN_RETURN_IF_ERROR(sixteen_bit_supports(args, d, "matmul/07_mma_pipelined"));
  if ((d.m + kBM - 1) / kBM > 65535) return invalid_argument("a.shape: matmul/07_mma_pipelined takes M < 2^23");
  return Status::Ok();
}

Status matmul_07_mma_pipelined(const MatmulArgs& args, Stream& stream) {
  ATTN_RETURN_IF_ERROR(matmul_07_supports(args));
  ATTN_ASSIGN_OR_RETURN(d, matmul_dims(args.a, args.b, args.transpose_a, args.transpose_b));
  const Problem16 p{static_cast<int>(d.batch), static_cast<int>(d.m), static_cast<int>(d.n), static_cast<int>(d.k),
                    args.a.data, args.b.data, args.c.data, d.m * d.k, d.b_batched ? d.k * d.n : 0, d.m * d.n};
  const dim3 grid(ceil_div(d.n, kBN), ceil_div(d.m, kBM), static_cast<unsigned>(d.batch));
  cudaError_t e = cudaSuccess;
  auto launch = [&](auto kernel) {
    e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
    if (e != cudaSuccess) return;
    kernel<<<grid, kThreads, kSmemBytes, stream_of(stream)>>>(p);
    e = cudaGetLastError();
  };
  auto with_type = [&](auto type) {
    using T = decltype(type);
    if (args.transpose_a) {
      if (args.transpose_b) launch(mma_kernel<T, true, true>);
      else launch(mma_kernel<T, true, false>);
    } else {
      if (args.transpose_b) launch(mma_kernel<T, false, true>);
      else launch(mma_kernel<T, false, false>);
    }
  };
  if (args.a.dtype == DType::kBFloat16) with_type(__nv_bfloat16{});
  else with_type(__half{});
  return to_status(e, "matmul/07_mma_pipelined launch");
}

}  // namespace attn::cuda
