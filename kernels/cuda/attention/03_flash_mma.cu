// attention/03_flash_mma: rung 02's algorithm on tensor cores, with FlashAttention-2's work split.
// - A block of 4 warps owns 64 query rows of one head (16 per warp) and loops over K/V tiles of
//   64 keys; each warp's scores and output stay in registers for the whole loop.
// - S = Q K^T and O += P V are mma.sync m16n8k16 (bf16/fp16 in, fp32 accumulate). Operands come
//   from shared memory through ldmatrix (V with .trans, so V is read as stored); P never leaves
//   registers: the accumulator layout of S is the A-operand layout of the next mma.
// - K/V tiles are double-buffered with cp.async: tile j+1 is in flight while tile j is computed.
// - Shared memory rows are XOR-swizzled in 16-byte chunks, so ldmatrix reads hit 8 banks apart.
// - exp2 with the scale folded in; causal tiles past the diagonal are skipped, and the query
//   tiles are scheduled heaviest first.
// Head dims 64 and 128.
#include "attention_common.cuh"
#include "attention_rungs.h"

namespace attn::cuda {
namespace {

constexpr int kWarps = 4, kThreads = kWarps * 32, kBlockM = 16 * kWarps, kBlockN = 64;

// Element offset of (row, 16-byte chunk) in a [rows][D] tile whose chunks are XOR-swizzled.
template <int D>
__device__ __forceinline__ int swizzled(int row, int chunk) {
  return row * D + ((chunk ^ (row & 7)) << 3);
}

__device__ __forceinline__ unsigned smem_addr(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::); }

__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

template <class T>
__device__ __forceinline__ void mma(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

template <class T>
__device__ __forceinline__ unsigned pack(float lo, float hi) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<unsigned*>(&v);
  } else {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<unsigned*>(&v);
  }
}

// Copies rows [row0, row0 + rows) of a [len][D] head (zero past `len`) into a swizzled tile.
template <class T, int D>
__device__ __forceinline__ void load_tile(T* tile, const T* head, int row0, int rows, int len) {
  constexpr int kChunks = D / 8;
  for (int idx = threadIdx.x; idx < rows * kChunks; idx += kThreads) {
    const int r = idx / kChunks, c = idx % kChunks;
    const bool valid = row0 + r < len;
    const T* src = head + static_cast<long long>(valid ? row0 + r : 0) * D + c * 8;
    cp_async16(tile + swizzled<D>(r, c), src, valid);
  }
}

template <class T, int D>
__global__ void __launch_bounds__(kThreads) flash_mma_kernel(AttentionProblem p) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* qs = reinterpret_cast<T*>(smem_raw);
  T* ks = qs + kBlockM * D;         // [2][kBlockN][D]
  T* vs = ks + 2 * kBlockN * D;     // [2][kBlockN][D]
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
  const int tiles = (block_end + kBlockN - 1) / kBlockN;

  load_tile<T, D>(qs, qhead, i0, kBlockM, p.len_q);
  if (tiles > 0) {
    load_tile<T, D>(ks, khead, 0, kBlockN, p.len_kv);
    load_tile<T, D>(vs, vhead, 0, kBlockN, p.len_kv);
  }
  cp_async_commit();
  cp_async_wait_all();
  __syncthreads();

  // This warp's 16 query rows as A fragments, one per 16 dims.
  unsigned qf[D / 16][4];
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk)
    ldmatrix_x4(qf[kk], qs + swizzled<D>(warp * 16 + (lane % 16), kk * 2 + lane / 16));

  float o[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
  const int rows[2] = {i0 + warp * 16 + g, i0 + warp * 16 + g + 8};
  const int visible[2] = {rows[0] < p.len_q ? p.visible_keys(rows[0]) : 0,
                          rows[1] < p.len_q ? p.visible_keys(rows[1]) : 0};

  for (int t = 0; t < tiles; ++t) {
    const int buf = t & 1, j0 = t * kBlockN;
    if (t + 1 < tiles) {  // the next tile flies while this one is computed
      load_tile<T, D>(ks + (buf ^ 1) * kBlockN * D, khead, j0 + kBlockN, kBlockN, p.len_kv);
      load_tile<T, D>(vs + (buf ^ 1) * kBlockN * D, vhead, j0 + kBlockN, kBlockN, p.len_kv);
    }
    cp_async_commit();
    const T* kt = ks + buf * kBlockN * D;
    const T* vt = vs + buf * kBlockN * D;

    float s[kBlockN / 8][4];
#pragma unroll
    for (int n = 0; n < kBlockN / 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
      for (int np = 0; np < kBlockN / 16; ++np) {
        unsigned kf[4];
        ldmatrix_x4(kf, kt + swizzled<D>(np * 16 + (lane % 8) + (lane / 16) * 8, kk * 2 + (lane / 8) % 2));
        mma<T>(s[2 * np], qf[kk], kf[0], kf[1]);
        mma<T>(s[2 * np + 1], qf[kk], kf[2], kf[3]);
      }
    }

    // Scale into log2 units, mask, and the online softmax of rows g and g + 8.
    float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int n = 0; n < kBlockN / 8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e / 2, j = j0 + n * 8 + t4 * 2 + (e % 2);
        s[n][e] = j < visible[r] ? s[n][e] * p.scale_log2 : -INFINITY;
        tile_max[r] = fmaxf(tile_max[r], s[n][e]);
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
    unsigned pf[kBlockN / 16][4];
#pragma unroll
    for (int n = 0; n < kBlockN / 8; ++n) {
      const float p0 = exp2f(s[n][0] - tile_max[0]), p1 = exp2f(s[n][1] - tile_max[0]);
      const float p2 = exp2f(s[n][2] - tile_max[1]), p3 = exp2f(s[n][3] - tile_max[1]);
      l[0] += p0 + p1;
      l[1] += p2 + p3;
      // Two n-tiles of S make one k-step of P: [keys 0-7 | keys 8-15] of a 16-key step.
      pf[n / 2][(n % 2) * 2 + 0] = pack<T>(p0, p1);
      pf[n / 2][(n % 2) * 2 + 1] = pack<T>(p2, p3);
    }
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      o[n][0] *= scale_o[0];
      o[n][1] *= scale_o[0];
      o[n][2] *= scale_o[1];
      o[n][3] *= scale_o[1];
    }
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        unsigned vf[4];
        ldmatrix_x4_trans(vf, vt + swizzled<D>(kk * 16 + (lane % 8) + ((lane / 8) % 2) * 8, dp * 2 + lane / 16));
        mma<T>(o[2 * dp], pf[kk], vf[0], vf[1]);
        mma<T>(o[2 * dp + 1], pf[kk], vf[2], vf[3]);
      }
    }
    cp_async_wait_all();
    __syncthreads();  // tile t+1 has landed; nobody reads buffer `buf` any more
  }

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
  }
  T* ohead = static_cast<T*>(p.o) + p.q_row(b, h, 0);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (rows[r] >= p.len_q) continue;
    const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
    T* orow = ohead + static_cast<long long>(rows[r]) * D;
#pragma unroll
    for (int n = 0; n < D / 8; ++n)
      *reinterpret_cast<unsigned*>(orow + n * 8 + t4 * 2) = pack<T>(o[n][2 * r] * inv, o[n][2 * r + 1] * inv);
    if (p.lse && t4 == 0) {
      p.lse[(static_cast<long long>(b) * p.heads_q + h) * p.len_q + rows[r]] =
          l[r] > 0.0f ? (m[r] + log2f(l[r])) * 0.6931471805599453f : -INFINITY;
    }
  }
}

template <class T, int D>
cudaError_t launch(const AttentionProblem& p, cudaStream_t s) {
  constexpr int kSmem = (kBlockM + 4 * kBlockN) * D * static_cast<int>(sizeof(T));
  cudaError_t e = cudaFuncSetAttribute(flash_mma_kernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
  if (e != cudaSuccess) return e;
  const dim3 grid((p.len_q + kBlockM - 1) / kBlockM, p.batch * p.heads_q);
  flash_mma_kernel<T, D><<<grid, kThreads, kSmem, s>>>(p);
  return cudaGetLastError();
}

}  // namespace

Status attention_03_supports(const AttentionArgs& args) {
  ATTN_ASSIGN_OR_RETURN(p, attention_problem(args, {DType::kBFloat16, DType::kFloat16}, {64, 128},
                                             "attention/03_flash_mma"));
  if (static_cast<long long>(p.batch) * p.heads_q > 65535) {
    return invalid_argument("q.shape: attention/03_flash_mma takes B x Hq <= 65535");
  }
  return Status::Ok();
}

Status attention_03_flash_mma(const AttentionArgs& args, Stream& stream) {
  ATTN_RETURN_IF_ERROR(attention_03_supports(args));
  ATTN_ASSIGN_OR_RETURN(p, attention_problem(args, {DType::kBFloat16, DType::kFloat16}, {64, 128},
                                             "attention/03_flash_mma"));
  const cudaStream_t s = attention_stream(stream);
  cudaError_t e;
  if (args.q.dtype == DType::kBFloat16)
    e = p.head_dim == 64 ? launch<__nv_bfloat16, 64>(p, s) : launch<__nv_bfloat16, 128>(p, s);
  else
    e = p.head_dim == 64 ? launch<__half, 64>(p, s) : launch<__half, 128>(p, s);
  return to_status(e, "attention/03_flash_mma launch");
}

}  // namespace attn::cuda
