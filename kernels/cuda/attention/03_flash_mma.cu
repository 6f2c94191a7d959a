// attention/03_flash_mma: rung 02's algorithm on tensor cores, with FlashAttention-2's work split.
// - A block of 4 warps owns 128 query rows of one head (32 per warp, two 16-row m-tiles) and
//   loops over K/V tiles of 64 keys; each warp's scores and output stay in registers for the
//   whole loop, and each K/V fragment read from shared memory feeds both m-tiles.
// - S = Q K^T and O += P V are mma.sync m16n8k16 (bf16/fp16 in, fp32 accumulate). Operands come
//   from shared memory through ldmatrix (V with .trans, so V is read as stored); P never leaves
//   registers: the accumulator layout of S is the A-operand layout of the next mma.
// - K/V tiles are double-buffered with cp.async: tile j+1 is in flight while tile j is computed.
// - Shared memory rows are XOR-swizzled in 16-byte chunks, so ldmatrix reads hit 8 banks apart,
//   and each lane's ldmatrix address for a k-step is its base XOR a constant (one instruction, no
//   per-fragment address registers): 1.23-1.30x over computing each swizzled address.
// - exp2 with the scale folded in; only tiles that cross a row's first or last visible key are
//   masked; tiles outside every row's causal or sliding window are skipped, and the query tiles
//   run heaviest first. A soft cap maps each score through tanh (soft_tanh: two MUFU ops).
// Every head dim of common/head_dims.cuh: rows sit in shared memory padded to 64, 128 or 256
// (padded_dim: the swizzle and the XOR addressing need a power of two), and above 128 a warp owns one m-tile (the O accumulators of
// two would not fit in 255 registers).
#include "../common/flash_mma_tile.cuh"
#include "../common/head_dims.cuh"
#include "../common/mma_sync.cuh"
#include "attention_common.cuh"
#include "attention_rungs.h"

namespace attn::cuda {
namespace {

using namespace mma_sync;
using flash_mma::attend_tile;

// Byte offset of (row, 16-byte chunk) in a [rows][D] tile whose chunks are XOR-swizzled by row & 7.
// Every lane's ldmatrix rows below start at a multiple of 8, so row & 7 is fixed per lane and the
// chunk of k-step kk is reached by XOR-ing (kk << 5) into the lane's base address: one LOP3 per
// k-step, and the other fragments of that step sit at immediate offsets (tiles are 256-aligned).
// Rows are padded_dim<D>() elements in shared memory (D itself at 64 and 128).
template <int D>
__device__ __forceinline__ unsigned swizzled_bytes(int row, int chunk) {
  return static_cast<unsigned>(row * padded_dim<D>() * 2 + ((chunk ^ (row & 7)) << 4));
}

// Copies rows [row0, row0 + rows) of a [len][D] head (zero past `len`) into a swizzled tile.
// Each thread copies one 16-byte chunk per pass, at a fixed column and a row 8k apart per pass;
// where the chunks of a row do not divide the threads (D = 80, 96, 192), pass by pass through
// the tile's chunks in order.
template <class T, int D, int kThreads, int kRows>
__device__ __forceinline__ void load_tile(unsigned tile, const T* head, int row0, int len) {
  constexpr int kChunks = D / 8, kRowsPerPass = kThreads / kChunks, kRowBytes = padded_dim<D>() * 2;
  if constexpr (kThreads % kChunks == 0 && kRowsPerPass % 8 == 0 && kRows % kRowsPerPass == 0) {
    const int r = threadIdx.x / kChunks, c = threadIdx.x % kChunks;
    const unsigned dst = tile + swizzled_bytes<D>(r, c);
    const T* src = head + static_cast<long long>(row0 + r) * D + c * 8;
#pragma unroll
    for (int pass = 0; pass < kRows / kRowsPerPass; ++pass) {
      const int row = row0 + r + pass * kRowsPerPass;
      const bool valid = row < len;
      const T* from = valid ? src + static_cast<long long>(pass) * kRowsPerPass * D : head;
      cp_async16(dst + pass * kRowsPerPass * kRowBytes, from, valid);
    }
  } else {
    static_assert((kRows * kChunks) % kThreads == 0);
#pragma unroll
    for (int pass = 0; pass < kRows * kChunks / kThreads; ++pass) {
      const int idx = pass * kThreads + threadIdx.x, r = idx / kChunks, c = idx % kChunks;
      const bool valid = row0 + r < len;
      const T* from = valid ? head + static_cast<long long>(row0 + r) * D + c * 8 : head;
      cp_async16(tile + swizzled_bytes<D>(r, c), from, valid);
    }
  }
}

// kMT: 16-row m-tiles per warp. With 2, every K and V fragment read from shared memory feeds
// two mma instead of one and each warp has two independent chains in flight; Q is re-read from
// shared memory per k-step (an ldmatrix) rather than held in registers, to stay within 255.
// kCap: scores go through the soft cap (a kernel of its own, so that the plain one keeps its
// registers).
template <class T, int D, int kWarps, int kMT, int kBN, int kMinBlocks, bool kCap>
__global__ void __launch_bounds__(kWarps * 32, kMinBlocks) flash_mma_kernel(AttentionProblem p) {
  constexpr int kThreads = kWarps * 32, kBlockM = 16 * kMT * kWarps;
  constexpr unsigned kTileBytes = kBN * padded_dim<D>() * 2;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  // Tiles start 256-aligned so that the XOR addressing above stays inside each row.
  const unsigned qs = (smem_addr(smem_raw) + 255u) & ~255u;
  const unsigned ks = qs + kBlockM * padded_dim<D>() * 2;  // [2][kBN][padded D]
  const unsigned vs = ks + 2 * kTileBytes;                  // [2][kBN][padded D]
  const int bh = blockIdx.y, b = bh / p.heads_q, h = bh % p.heads_q;
  const int m_tile = gridDim.x - 1 - blockIdx.x;  // heaviest (latest, under causal) first
  const int i0 = m_tile * kBlockM;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t4 = lane % 4;

  const T* qhead = static_cast<const T*>(p.q) + p.q_row(b, h, 0);
  const T* khead = static_cast<const T*>(p.k) + p.kv_row(b, h, 0);
  const T* vhead = static_cast<const T*>(p.v) + p.kv_row(b, h, 0);
  const int last_row = min(i0 + kBlockM, p.len_q) - 1;
  const int block_end = p.visible_keys(last_row);  // keys past it are masked for every row
  const int tiles = (block_end + kBN - 1) / kBN;
  // Tiles from here on hold a key that some row of the block must not see; under a sliding
  // window, so do the tiles before front_masked, and those before first_tile none sees.
  const int first_masked = min(p.visible_keys(i0), p.len_kv) / kBN;
  const int first_tile = min(p.first_key(i0) / kBN, tiles);
  const int front_masked = (p.first_key(last_row) + kBN - 1) / kBN;

  load_tile<T, D, kThreads, kBlockM>(qs, qhead, i0, p.len_q);
  if (tiles > first_tile) {
    load_tile<T, D, kThreads, kBN>(ks, khead, first_tile * kBN, p.len_kv);
    load_tile<T, D, kThreads, kBN>(vs, vhead, first_tile * kBN, p.len_kv);
  }
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();

  const int warp_row0 = warp * 16 * kMT;
  // Per-lane ldmatrix bases (see swizzled_bytes): Q and V^T rows lane % 16 (resp. lane % 8 +
  // 8 * (lane / 8 % 2)) with chunk lane / 16; K rows lane % 8 + 8 * (lane / 16), chunk lane / 8 % 2.
  const unsigned q_lane = qs + swizzled_bytes<D>(warp_row0 + lane % 16, lane / 16);
  const unsigned k_lane0 = swizzled_bytes<D>(lane % 8 + (lane / 16) * 8, (lane / 8) % 2);
  const unsigned v_lane0 = swizzled_bytes<D>(lane % 8 + ((lane / 8) % 2) * 8, lane / 16);

  float o[kMT][D / 8][4];
  float m[kMT][2], l[kMT][2];
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int n = 0; n < D / 8; ++n) o[mt][n][0] = o[mt][n][1] = o[mt][n][2] = o[mt][n][3] = 0.0f;
    m[mt][0] = m[mt][1] = -INFINITY;
    l[mt][0] = l[mt][1] = 0.0f;
  }
  const int row0 = i0 + warp_row0 + g;  // this lane's first row; the others are +8, +16, +24
  const auto visible = [&p](int row) { return make_int2(p.first_key(row), p.visible_keys(row)); };
  const auto scores = [&p] {
    if constexpr (kCap) return p.score_map();
    else return p.scale_log2;
  }();

  for (int t = first_tile; t < tiles; ++t) {
    const unsigned buf = ((t - first_tile) & 1) * kTileBytes, next = kTileBytes - buf;
    const int j0 = t * kBN;
    if (t + 1 < tiles) {  // the next tile flies while this one is computed
      load_tile<T, D, kThreads, kBN>(ks + next, khead, j0 + kBN, p.len_kv);
      load_tile<T, D, kThreads, kBN>(vs + next, vhead, j0 + kBN, p.len_kv);
    }
    cp_async_commit();
    if (t >= first_masked || t < front_masked)
      attend_tile<T, D, kMT, kBN, true>(visible, scores, q_lane, ks + buf + k_lane0, vs + buf + v_lane0, j0, row0, o, m, l);
    else
      attend_tile<T, D, kMT, kBN, false>(visible, scores, q_lane, ks + buf + k_lane0, vs + buf + v_lane0, j0, row0, o, m, l);
    cp_async_wait<0>();
    __syncthreads();  // tile t+1 has landed; nobody reads buffer `buf` any more
  }

#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) store_output_rows<T, D>(p, b, h, row0 + mt * 16, t4, &o[mt][0][0], m[mt], l[mt]);
}

template <class T, int D, int kWarps, int kMT, int kBN, int kMinBlocks = 1>
cudaError_t launch_with(const AttentionProblem& p, cudaStream_t s) {
  constexpr int kBlockM = 16 * kMT * kWarps;
  constexpr int kSmem = (kBlockM + 4 * kBN) * padded_dim<D>() * static_cast<int>(sizeof(T)) + 256;  // + alignment
  auto kernel = p.cap_log2 != 0.0f ? flash_mma_kernel<T, D, kWarps, kMT, kBN, kMinBlocks, true>
                                   : flash_mma_kernel<T, D, kWarps, kMT, kBN, kMinBlocks, false>;
  cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
  if (e != cudaSuccess) return e;
  const dim3 grid((p.len_q + kBlockM - 1) / kBlockM, p.batch * p.heads_q);
  kernel<<<grid, kWarps * 32, kSmem, s>>>(p);
  return cudaGetLastError();
}

// 4 warps x 2 m-tiles (128 query rows) x 64-key tiles: measured best on the H100 of five shapes
// (2 m-tiles x 32 keys (D=128) or x 128 keys (D=64): 8-10% slower; 1 m-tile per warp with 8 warps
// or 3 blocks/SM: 10-17% slower; 3 blocks/SM forced at D=64: 11% slower; bench/NOTES.md).
// Above 128 one m-tile a warp (64 rows a block): O of two would take 2 D / 2 registers alone; at
// 256, 32-key tiles (64 keys spilled 224 bytes).
template <class T, int D>
cudaError_t launch(const AttentionProblem& p, cudaStream_t s) {
  return launch_with<T, D, 4, D <= 128 ? 2 : 1, D <= 192 ? 64 : 32>(p, s);
}

template <class T>
cudaError_t launch_dim(const AttentionProblem& p, cudaStream_t s) {
  return with_head_dim<kAttention03Caps.head_dims>(p.head_dim, [&](auto d) { return launch<T, decltype(d)::value>(p, s); });
}


}  // namespace

Status attention_03_supports(const AttentionArgs& args) {
  return tensor_core_problem(args, kAttention03Caps, "attention/03_flash_mma").status();
}

Status attention_03_flash_mma(const AttentionArgs& args, Stream& stream) {
  ATTN_ASSIGN_OR_RETURN(p, tensor_core_problem(args, kAttention03Caps, "attention/03_flash_mma"));
  const cudaStream_t s = attention_stream(stream);
  const cudaError_t e = args.q.dtype == DType::kBFloat16 ? launch_dim<__nv_bfloat16>(p, s) : launch_dim<__half>(p, s);
  return to_status(e, "attention/03_flash_mma launch");
}

}  // namespace attn::cuda
