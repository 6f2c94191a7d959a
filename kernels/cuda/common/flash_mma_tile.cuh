// The FlashAttention-2 tile on mma.sync, shared by attention/03_flash_mma and
// paged_prefill/01_flash_mma: one warp's kMT 16-row m-tiles against one tile of kBN keys in
// shared memory (Q, K, V rows of D 16-bit elements padded to padded_dim<D>(), XOR-swizzled 16-byte
// chunks, addressed through the lanes' ldmatrix addresses), with the caller's visibility rule for
// masking and score map (a float scale, or a ScoreMap that may soft-cap).
#pragma once

#include "mma_sync.cuh"
#include "score_rules.cuh"

namespace attn::cuda::flash_mma {

using namespace mma_sync;

// One K/V tile for the warp: S = Q K^T for its kMT m-tiles, the online softmax, O += P V.
// kMask: the tile holds keys some of this block's rows must not see (past the sequence, or past
// the causal diagonal); every other tile skips the compares.
// `visible_keys(row)`: the keys row `row` sees, [0, int) or [x, y) of an int2 (read only under
// kMask); `scores`: the softmax scale in log2 units (a float) or a ScoreMap.
template <class T, int D, int kMT, int kBN, bool kMask, class Visible, class Scores>
__device__ __forceinline__ void attend_tile(const Visible& visible_keys, Scores scores, unsigned q_lane,
                                            unsigned k_lane, unsigned v_lane, int j0, int row0,
                                            float (&o)[kMT][D / 8][4], float (&m)[kMT][2], float (&l)[kMT][2]) {
  constexpr int kRowBytes = padded_dim<D>() * 2;
  const int lane = threadIdx.x % 32, t4 = lane % 4;
  float s[kMT][kBN / 8][4];
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int n = 0; n < kBN / 8; ++n) s[mt][n][0] = s[mt][n][1] = s[mt][n][2] = s[mt][n][3] = 0.0f;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    const unsigned q_kk = q_lane ^ (kk << 5), k_kk = k_lane ^ (kk << 5);
    unsigned qk[kMT][4];
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) ldsm_x4(qk[mt], q_kk + mt * 16 * kRowBytes);
#pragma unroll
    for (int np = 0; np < kBN / 16; ++np) {
      unsigned kf[4];
      ldsm_x4(kf, k_kk + np * 16 * kRowBytes);
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
        mma16816<T>(s[mt][2 * np], qk[mt], kf[0], kf[1]);
        mma16816<T>(s[mt][2 * np + 1], qk[mt], kf[2], kf[3]);
      }
    }
  }

  // Scale into log2 units, mask, and the online softmax of rows g and g + 8 of each m-tile.
  unsigned pf[kMT][kBN / 16][4];
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
    float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int2 kept = kMask ? kept_keys(visible_keys, row0 + mt * 16 + 8 * r) : make_int2(0, 0);
#pragma unroll
      for (int n = 0; n < kBN / 8; ++n)
#pragma unroll
        for (int e = 2 * r; e < 2 * r + 2; ++e) {
          if constexpr (std::is_same_v<Scores, float>) s[mt][n][e] *= scores;
          else s[mt][n][e] = scores(s[mt][n][e]);
          const int key = j0 + n * 8 + t4 * 2 + (e % 2);
          if constexpr (std::is_same_v<decltype(visible_keys(0)), int>) {
            if (kMask && key >= kept.y) s[mt][n][e] = -INFINITY;
          } else {
            if (kMask && (key >= kept.y || key < kept.x)) s[mt][n][e] = -INFINITY;
          }
          tile_max[r] = fmaxf(tile_max[r], s[mt][n][e]);
        }
    }
    float scale_o[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 1));
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 2));
      const float m_new = fmaxf(m[mt][r], tile_max[r]);
      const float m_use = m_new == -INFINITY ? 0.0f : m_new;  // a row with nothing visible yet
      scale_o[r] = exp2f(m[mt][r] - m_use);
      l[mt][r] *= scale_o[r];
      m[mt][r] = m_new;
      tile_max[r] = m_use;
    }
#pragma unroll
    for (int n = 0; n < kBN / 8; ++n) {
      const float p0 = exp2f(s[mt][n][0] - tile_max[0]), p1 = exp2f(s[mt][n][1] - tile_max[0]);
      const float p2 = exp2f(s[mt][n][2] - tile_max[1]), p3 = exp2f(s[mt][n][3] - tile_max[1]);
      l[mt][0] += p0 + p1;
      l[mt][1] += p2 + p3;
      // Two n-tiles of S make one k-step of P: [keys 0-7 | keys 8-15] of a 16-key step.
      pf[mt][n / 2][(n % 2) * 2 + 0] = pack2<T>(p0, p1);
      pf[mt][n / 2][(n % 2) * 2 + 1] = pack2<T>(p2, p3);
    }
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      o[mt][n][0] *= scale_o[0];
      o[mt][n][1] *= scale_o[0];
      o[mt][n][2] *= scale_o[1];
      o[mt][n][3] *= scale_o[1];
    }
  }
#pragma unroll
  for (int kk = 0; kk < kBN / 16; ++kk) {
#pragma unroll
    for (int dp = 0; dp < D / 16; ++dp) {
      unsigned vf[4];
      ldsm_x4_trans(vf, (v_lane ^ (dp << 5)) + kk * 16 * kRowBytes);
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
        mma16816<T>(o[mt][2 * dp], pf[mt][kk], vf[0], vf[1]);
        mma16816<T>(o[mt][2 * dp + 1], pf[mt][kk], vf[2], vf[3]);
      }
    }
  }
}

}  // namespace attn::cuda::flash_mma
