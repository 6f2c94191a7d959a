// The building blocks of the wgmma attention tiles, shared by attention/04_wgmma_tma and
// paged_prefill/02_wgmma: tiles of 128 query rows x kKeys keys (128, or 64 for head dims above
// 128) whose Q, K and V sit in shared memory as 64-wide slabs [rows][64 columns] of 16-bit
// elements (128-byte rows, 128-byte swizzle; a head dim that is not a multiple of 64 leaves the
// last slab's columns past it zero, as TMA fills them), S = Q K^T and O += P V on wgmma for a
// warpgroup's 64 rows, and the online softmax between them.
#pragma once

#include <cstdint>
#include <type_traits>

#include "../common/mma_sync.cuh"
#include "../common/score_rules.cuh"
#include "hopper.cuh"

namespace attn::cuda::wgmma_attention {

using namespace hopper;

constexpr int kBN = 128;             // keys per tile (the default)
constexpr int kSlab = 128 * 128;     // bytes of one slab: [128 rows][64 columns] of 16-bit

// 64-wide slabs a head dim takes (the last one partly filled at 32, 80, 96).
template <int D>
constexpr int slabs() {
  return (D + 63) / 64;
}

// S = Q K^T for a warpgroup's 64 rows, issued and committed, not waited. K is K-major (head dim
// contiguous) in 64-wide slabs; a k-step of 16 is 32 bytes along a 128-byte row, 8-row groups
// 1024 bytes apart. Q comes from registers (kQRegs: the A fragments loaded once per query tile,
// so the tensor cores read only K from shared memory) or, like K, from shared memory.
// K's slabs are [kKeys rows][64 columns].
template <class T, int D, bool kQRegs, int kKeys = kBN>
__device__ __forceinline__ void issue_scores(float (&sc)[kKeys / 2], const unsigned (&qf)[D / 16][4],
                                             const unsigned char* q, const unsigned char* k) {
  static_assert(kKeys == 128 || kKeys == 64);
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    const std::uint64_t dk = smem_desc(k + (kk / 4) * (kKeys * 128) + (kk % 4) * 32, 16, 1024);
    if constexpr (kQRegs) {
      if constexpr (kKeys == 128) wgmma_m64n128k16_rs<T, 0>(sc, qf[kk], dk, kk > 0);
      else wgmma_m64n64k16_rs<T, 0>(sc, qf[kk], dk, kk > 0);
    } else {
      const std::uint64_t dq = smem_desc(q + (kk / 4) * kSlab + (kk % 4) * 32, 16, 1024);
      if constexpr (kKeys == 128) wgmma_m64n128k16<T, 0, 0>(sc, dq, dk, kk > 0);
      else wgmma_m64n64k16<T, 0, 0>(sc, dq, dk, kk > 0);
    }
  }
  wgmma_commit();
}

// A warp's A fragments of its 16 query rows (of the block's 128) from the swizzled Q tile:
// ldmatrix matrices [rows 0-7 | 8-15] x [k 0-7 | 8-15] of each k-step; a row's 16-byte chunk c
// sits at chunk c ^ (row % 8) of its 128-byte row.
template <int D>
__device__ __forceinline__ void load_q_fragments(unsigned (&qf)[D / 16][4], const unsigned char* qs, int warp_row0,
                                                 int lane) {
  const int row = warp_row0 + (lane % 8) + 8 * ((lane / 8) % 2);
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    const int chunk = 2 * (kk % 4) + lane / 16;
    mma_sync::ldsm_x4(qf[kk], mma_sync::smem_addr(qs + (kk / 4) * kSlab + row * 128 + ((chunk ^ (lane % 8)) * 16)));
  }
}

// O += P V, issued and committed. V is [keys][head dim], N-major for this product: 64-wide
// head-dim slabs, a k-step of 16 keys is 16 rows (2048 bytes), 8-row groups 1024 apart.
// At 128 one n128 wgmma spans both slabs; otherwise one per slab, n64 or the remainder (n16, n32),
// whose accumulators follow each other in o as the columns do.
template <class T, int D, int kKeys = kBN>
__device__ __forceinline__ void issue_pv(float (&o)[D / 2], const unsigned (&pf)[kKeys / 16][4], const unsigned char* v) {
  constexpr int kSlabBytes = kKeys * 128;
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < kKeys / 16; ++kk) {
    if constexpr (D == 128 && kKeys == 128) {
      wgmma_m64n128k16_rs<T, 1>(o, pf[kk], smem_desc(v + kk * 2048, kSlabBytes, 1024), 1);
    } else {
#pragma unroll
      for (int sl = 0; sl < slabs<D>(); ++sl) {
        const std::uint64_t dv = smem_desc(v + sl * kSlabBytes + kk * 2048, kSlabBytes, 1024);
        constexpr int kLast = D - 64 * (slabs<D>() - 1);  // columns of the last slab
        float* acc = o + 32 * sl;
        if (sl + 1 < slabs<D>() || kLast == 64)
          wgmma_m64n64k16_rs<T, 1>(*reinterpret_cast<float(*)[32]>(acc), pf[kk], dv, 1);
        else if constexpr (kLast == 32)
          wgmma_m64n32k16_rs<T, 1>(*reinterpret_cast<float(*)[16]>(acc), pf[kk], dv, 1);
        else if constexpr (kLast == 16)
          wgmma_m64n16k16_rs<T, 1>(*reinterpret_cast<float(*)[8]>(acc), pf[kk], dv, 1);
      }
    }
  }
  wgmma_commit();
}

// 2^x in one MUFU instruction: exp2f's ex2.approx.f32 also scales subnormal results, three more
// instructions per element for values a softmax rounds away anyway.
__device__ __forceinline__ float exp2_ftz(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// Online softmax of a thread's rows row0 (r = 0) and row0 + 8 (r = 1) over one tile of keys:
// element (r, j, e) is sc[4 j + 2 r + e], key key0 + 8 j + 2 t4 + e. Turns the raw scores into
// unnormalized probabilities in place, updates the running max m (scaled, log2 units) and sum l,
// and returns in scale_o the factor the output rows must be multiplied by before this tile's P V
// is added. The max is taken on raw scores so that the scale folds into the exponent's FFMA.
// `visible(row)`: the keys row `row` of the tile sees, [0, int) or [x, y) of an int2 (read only
// when `masked`). `scores`: the scale in log2 units (a float), or a ScoreMap, whose soft cap
// maps the scores into log2 units first.
template <int kKeys = kBN, class Visible, class Scores>
__device__ __forceinline__ void softmax_tile(float (&sc)[kKeys / 2], float (&m)[2], float (&l)[2], float (&scale_o)[2],
                                             Scores scores, const Visible& visible_keys, bool masked, int key0,
                                             int row0, int t4) {
  float scale_log2;
  if constexpr (std::is_same_v<Scores, float>) {
    scale_log2 = scores;
  } else {
#pragma unroll
    for (int i = 0; i < kKeys / 2; ++i) sc[i] = scores.cap_log2 * cuda::tanh_approx(sc[i] * scores.cap_pre);
    scale_log2 = 1.0f;
  }
  if (scale_log2 < 0.0f) {  // s x = (-s)(-x): the max below must be of the scaled scores
#pragma unroll
    for (int i = 0; i < kKeys / 2; ++i) sc[i] = -sc[i];
  }
  const float scale = fabsf(scale_log2);
  // Two partial maxima and sums per row (by e) halve the dependent chains.
  float part[2][2] = {{-INFINITY, -INFINITY}, {-INFINITY, -INFINITY}}, tile_max[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int2 kept = masked ? kept_keys(visible_keys, row0 + 8 * r) : make_int2(0, 0);
#pragma unroll
    for (int j = 0; j < kKeys / 8; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float& x = sc[4 * j + 2 * r + e];
        const int key = key0 + 8 * j + 2 * t4 + e;
        if constexpr (std::is_same_v<decltype(visible_keys(0)), int>) {
          if (masked && key >= kept.y) x = -INFINITY;
        } else {
          if (masked && (key >= kept.y || key < kept.x)) x = -INFINITY;
        }
        part[r][e] = fmaxf(part[r][e], x);
      }
  }
  float neg_max[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    tile_max[r] = fmaxf(part[r][0], part[r][1]);
    tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 1));
    tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 2));
    const float m_new = fmaxf(m[r], tile_max[r] * scale);
    const float m_use = m_new == -INFINITY ? 0.0f : m_new;  // a row with nothing visible yet
    scale_o[r] = exp2_ftz(m[r] - m_use);
    m[r] = m_new;
    neg_max[r] = -m_use;
    part[r][0] = part[r][1] = 0.0f;
  }
#pragma unroll
  for (int j = 0; j < kKeys / 8; ++j)
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float& x = sc[4 * j + 2 * r + e];
        x = exp2_ftz(fmaf(x, scale, neg_max[r]));
        part[r][e] += x;
      }
#pragma unroll
  for (int r = 0; r < 2; ++r) l[r] = l[r] * scale_o[r] + (part[r][0] + part[r][1]);
}

// P as wgmma's A operand: keys 16 kk .. 16 kk + 15 make k-step kk, [keys 0-7 | keys 8-15].
template <class T, int kKeys = kBN>
__device__ __forceinline__ void pack_probabilities(unsigned (&pf)[kKeys / 16][4], const float (&sc)[kKeys / 2]) {
#pragma unroll
  for (int j = 0; j < kKeys / 8; ++j) {
    pf[j / 2][(j % 2) * 2 + 0] = mma_sync::pack2<T>(sc[4 * j], sc[4 * j + 1]);
    pf[j / 2][(j % 2) * 2 + 1] = mma_sync::pack2<T>(sc[4 * j + 2], sc[4 * j + 3]);
  }
}

template <int D>
__device__ __forceinline__ void rescale_rows(float (&o)[D / 2], const float (&scale_o)[2]) {
#pragma unroll
  for (int j = 0; j < D / 8; ++j) {
    o[4 * j] *= scale_o[0];
    o[4 * j + 1] *= scale_o[0];
    o[4 * j + 2] *= scale_o[1];
    o[4 * j + 3] *= scale_o[1];
  }
}

}  // namespace attn::cuda::wgmma_attention
