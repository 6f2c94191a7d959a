// attention/04_wgmma_tma: rung 03's algorithm on Hopper's warpgroup MMA (sm_90a). What changes
// from rung 03 and why it is faster:
// - S = Q K^T is one wgmma.m64n128k16 chain per 16 of the head dim, straight from shared memory
//   (no ldmatrix, no fragment registers for Q or K), at the wgmma rate mma.sync cannot reach.
// - O += P V takes P from registers (the accumulator layout of S is the A-register layout of
//   wgmma, as with mma.sync) and V from shared memory through wgmma's transpose bit.
// - TMA copies Q once and K/V tiles into a 2-stage ring (128-byte swizzle, mbarriers); a producer
//   warpgroup (24 registers) issues them, two consumer warpgroups (240 registers) own 64 query
//   rows each of the block's 128, so a block keeps 8 warps of math and one thread of loading.
// - As in rung 03: exp2 with the scale folded in, masks only on tiles that cross a row's last
//   visible key, causal tiles past the diagonal skipped, query tiles heaviest first.
// Not yet here (FlashAttention-3's rest): the softmax of one tile overlapped with the wgmma of the
// next, two consumer warpgroups ping-ponging, a persistent scheduler.
// bf16/fp16, head dims 64 and 128.
#include "../common/mma_sync.cuh"
#include "../hopper/hopper.cuh"
#include "../hopper/tensor_map.h"
#include "attention_common.cuh"
#include "attention_rungs.h"

namespace attn::cuda {
namespace {

using namespace hopper;

constexpr int kBM = 128, kBN = 128, kStages = 2, kThreads = 384;

template <int D>
struct Smem {
  static constexpr int kSlab = 128 * 128;          // [128 rows][64 columns] of 16-bit, 128-byte rows
  static constexpr int kQBytes = (D / 64) * kSlab;  // Q: D / 64 slabs of the block's 128 rows
  static constexpr int kTileBytes = (D / 64) * kSlab;
  static constexpr int kStageBytes = 2 * kTileBytes;  // K then V
  static constexpr int kBytes = kQBytes + kStages * kStageBytes + 1024;
};

template <class T, int D>
__global__ void __launch_bounds__(kThreads, 1)
    wgmma_attention_kernel(const __grid_constant__ CUtensorMap map_q, const __grid_constant__ CUtensorMap map_k,
                           const __grid_constant__ CUtensorMap map_v, AttentionProblem p) {
  using S = Smem<D>;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  __shared__ __align__(8) std::uint64_t q_full, full[kStages], empty[kStages];
  unsigned char* qs = reinterpret_cast<unsigned char*>((reinterpret_cast<std::uintptr_t>(smem_raw) + 1023) & ~std::uintptr_t{1023});
  unsigned char* ring = qs + S::kQBytes;
  const int wg = threadIdx.x / 128, tid = threadIdx.x % 128;
  const int bh = blockIdx.y, b = bh / p.heads_q, h = bh % p.heads_q, bkv = b * p.heads_kv + h / p.group;
  const int i0 = (gridDim.x - 1 - blockIdx.x) * kBM;  // heaviest (latest, under causal) first
  const int last_row = min(i0 + kBM, p.len_q) - 1;
  const int tiles = (p.visible_keys(last_row) + kBN - 1) / kBN;
  const int first_masked = min(p.visible_keys(i0), p.len_kv) / kBN;

  if (threadIdx.x == 0) {
    mbar_init(&q_full, 1);
    for (int s = 0; s < kStages; ++s) {
      mbar_init(&full[s], 1);
      mbar_init(&empty[s], 2);
    }
    mbar_fence_init();
  }
  __syncthreads();

  if (wg == 0) {  // producer
    regs_decrease<24>();
    if (tid != 0) return;
    mbar_expect_tx(&q_full, S::kQBytes);
    for (int slab = 0; slab < D / 64; ++slab) tma_load_3d(qs + slab * S::kSlab, &map_q, &q_full, 64 * slab, i0, bh);
    int s = 0;
    std::uint32_t phase = 0;
    for (int t = 0; t < tiles; ++t) {
      mbar_wait(&empty[s], phase ^ 1);
      mbar_expect_tx(&full[s], S::kStageBytes);
      unsigned char* kt = ring + s * S::kStageBytes;
      for (int slab = 0; slab < D / 64; ++slab) {
        tma_load_3d(kt + slab * S::kSlab, &map_k, &full[s], 64 * slab, t * kBN, bkv);
        tma_load_3d(kt + S::kTileBytes + slab * S::kSlab, &map_v, &full[s], 64 * slab, t * kBN, bkv);
      }
      if (++s == kStages) s = 0, phase ^= 1;
    }
    return;
  }

  regs_increase<240>();
  const int half = wg - 1, warp = tid / 32, lane = tid % 32, t4 = lane % 4;
  const int row0 = i0 + half * 64 + warp * 16 + lane / 4;  // this thread's rows: row0 and row0 + 8
  float o[D / 2], m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
#pragma unroll
  for (int i = 0; i < D / 2; ++i) o[i] = 0.0f;
  mbar_wait(&q_full, 0);
  int s = 0;
  std::uint32_t phase = 0;
  for (int t = 0; t < tiles; ++t) {
    mbar_wait(&full[s], phase);
    const unsigned char* kt = ring + s * S::kStageBytes;
    const unsigned char* vt = kt + S::kTileBytes;
    // S = Q K^T: both K-major (head dim contiguous) in 64-wide slabs; a k-step of 16 is 32 bytes
    // along a 128-byte row, 8-row groups 1024 bytes apart.
    float sc[64];
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const std::uint64_t dq = smem_desc(qs + (kk / 4) * S::kSlab + half * 64 * 128 + (kk % 4) * 32, 16, 1024);
      const std::uint64_t dk = smem_desc(kt + (kk / 4) * S::kSlab + (kk % 4) * 32, 16, 1024);
      wgmma_m64n128k16<T, 0, 0>(sc, dq, dk, kk > 0);
    }
    wgmma_commit();
    wgmma_wait<0>();
    fence_registers(sc);

    // Online softmax of rows row0 (r = 0) and row0 + 8 (r = 1): element (r, j, e) of this thread
    // is sc[4 j + 2 r + e], key t * kBN + 8 j + 2 t4 + e.
    const bool masked = t >= first_masked;
    float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int visible = masked ? p.visible_keys(row0 + 8 * r) : 0;
#pragma unroll
      for (int j = 0; j < kBN / 8; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float& x = sc[4 * j + 2 * r + e];
          x *= p.scale_log2;
          if (masked && t * kBN + 8 * j + 2 * t4 + e >= visible) x = -INFINITY;
          tile_max[r] = fmaxf(tile_max[r], x);
        }
    }
    float scale_o[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 1));
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 2));
      const float m_new = fmaxf(m[r], tile_max[r]);
      const float m_use = m_new == -INFINITY ? 0.0f : m_new;  // a row with nothing visible yet
      scale_o[r] = exp2f(m[r] - m_use);
      l[r] *= scale_o[r];
      m[r] = m_new;
      tile_max[r] = m_use;
    }
    unsigned pf[kBN / 16][4];
#pragma unroll
    for (int j = 0; j < kBN / 8; ++j) {
      const float p0 = exp2f(sc[4 * j] - tile_max[0]), p1 = exp2f(sc[4 * j + 1] - tile_max[0]);
      const float p2 = exp2f(sc[4 * j + 2] - tile_max[1]), p3 = exp2f(sc[4 * j + 3] - tile_max[1]);
      l[0] += p0 + p1;
      l[1] += p2 + p3;
      // Keys 16 kk .. 16 kk + 15 make the A fragment of k-step kk: [keys 0-7 | keys 8-15].
      pf[j / 2][(j % 2) * 2 + 0] = mma_sync::pack2<T>(p0, p1);
      pf[j / 2][(j % 2) * 2 + 1] = mma_sync::pack2<T>(p2, p3);
    }
#pragma unroll
    for (int j = 0; j < D / 8; ++j) {
      o[4 * j] *= scale_o[0];
      o[4 * j + 1] *= scale_o[0];
      o[4 * j + 2] *= scale_o[1];
      o[4 * j + 3] *= scale_o[1];
    }

    // O += P V: V is [keys][head dim], N-major for this product: 64-wide head-dim slabs
    // (S::kSlab apart), a k-step of 16 keys is 16 rows (2048 bytes), 8-row groups 1024 apart.
    fence_registers(o);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) {
      const std::uint64_t dv = smem_desc(vt + kk * 2048, S::kSlab, 1024);
      if constexpr (D == 128) wgmma_m64n128k16_rs<T, 1>(o, pf[kk], dv, 1);
      else wgmma_m64n64k16_rs<T, 1>(o, pf[kk], dv, 1);
    }
    wgmma_commit();
    wgmma_wait<0>();
    fence_registers(o);
    if (tid == 0) mbar_arrive(&empty[s]);
    if (++s == kStages) s = 0, phase ^= 1;
  }

  store_output_rows<T, D>(p, b, h, row0, t4, o, m, l);
}

template <class T, int D>
cudaError_t launch(const AttentionProblem& p, const CUtensorMap& q, const CUtensorMap& k, const CUtensorMap& v,
                   cudaStream_t s) {
  auto kernel = wgmma_attention_kernel<T, D>;
  cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Smem<D>::kBytes);
  if (e != cudaSuccess) return e;
  const dim3 grid((p.len_q + kBM - 1) / kBM, p.batch * p.heads_q);
  kernel<<<grid, kThreads, Smem<D>::kBytes, s>>>(q, k, v, p);
  return cudaGetLastError();
}

}  // namespace

Status attention_04_supports(const AttentionArgs& args) {
  ATTN_RETURN_IF_ERROR(tensor_core_problem(args, "attention/04_wgmma_tma").status());
  ATTN_RETURN_IF_ERROR(require_hopper("attention/04_wgmma_tma"));
  for (const TensorView* t : {&args.q, &args.k, &args.v})
    if (reinterpret_cast<std::uintptr_t>(t->data) % 16 != 0)
      return invalid_argument("q.data: attention/04_wgmma_tma needs 16-byte aligned q, k and v");
  return Status::Ok();
}

Status attention_04_wgmma_tma(const AttentionArgs& args, Stream& stream) {
  ATTN_RETURN_IF_ERROR(attention_04_supports(args));
  ATTN_ASSIGN_OR_RETURN(p, tensor_core_problem(args, "attention/04_wgmma_tma"));
  const DType dt = args.q.dtype;
  // [heads][len][D], boxes of 128 rows x 64 of the head dim.
  ATTN_ASSIGN_OR_RETURN(mq, tensor_map_3d(p.q, dt, p.head_dim, p.len_q, static_cast<long long>(p.batch) * p.heads_q, 128));
  ATTN_ASSIGN_OR_RETURN(mk, tensor_map_3d(p.k, dt, p.head_dim, p.len_kv, static_cast<long long>(p.batch) * p.heads_kv, 128));
  ATTN_ASSIGN_OR_RETURN(mv, tensor_map_3d(p.v, dt, p.head_dim, p.len_kv, static_cast<long long>(p.batch) * p.heads_kv, 128));
  const cudaStream_t s = attention_stream(stream);
  cudaError_t e;
  if (dt == DType::kBFloat16)
    e = p.head_dim == 64 ? launch<__nv_bfloat16, 64>(p, mq, mk, mv, s) : launch<__nv_bfloat16, 128>(p, mq, mk, mv, s);
  else
    e = p.head_dim == 64 ? launch<__half, 64>(p, mq, mk, mv, s) : launch<__half, 128>(p, mq, mk, mv, s);
  return to_status(e, "attention/04_wgmma_tma launch");
}

}  // namespace attn::cuda
