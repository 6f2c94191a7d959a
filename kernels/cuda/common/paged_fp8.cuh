// float8 e4m3 KV pages on the GPU: the append that quantizes a call's new rows into their pages
// (setting or growing each (page, kv head)'s power-of-two scale, as the CPU backend does, so both
// hold the same codes and scales for the same calls), and the dequantization of a call's pages
// into 16-bit scratch pools for the prefill rung. Included by paged_common.cuh after PagedProblem.
// The rounding is attn/fp8.h's (nearest, ties to even, saturating at +-448; NaN stays NaN, with
// its sign); the scale rule is fp8_pow2_scale's, worked on the bits (this library builds with fast
// math, which flushes float32 subnormals).
#pragma once

#include <cuda_fp8.h>

namespace attn::cuda {

__device__ __forceinline__ float e4m3_to_float(unsigned char code) {
  const __half_raw h = __nv_cvt_fp8_to_halfraw(static_cast<__nv_fp8_storage_t>(code), __NV_E4M3);
  return __half2float(__half(h));
}

// attn::float_to_fp8_e4m3 on the device (the same bit steps).
__device__ __forceinline__ unsigned char float_to_e4m3(float f) {
  const unsigned x = __float_as_uint(f);
  const unsigned sign = (x >> 24) & 0x80u, abs = x & 0x7fffffffu;
  if (abs > 0x7f800000u) return static_cast<unsigned char>(sign | 0x7fu);
  if (abs >= 0x43e00000u) return static_cast<unsigned char>(sign | 0x7eu);
  if (abs < 0x3c800000u) return static_cast<unsigned char>(sign | static_cast<unsigned>(rintf(__uint_as_float(abs) * 512.0f)));
  const unsigned rounded = (abs + 0x7ffffu + ((abs >> 20) & 1u)) >> 20;
  const unsigned code = rounded - ((127u - 7u) << 3);
  return static_cast<unsigned char>(sign | (code > 0x7eu ? 0x7eu : code));
}

// This library builds with fast math: float32 arithmetic flushes subnormals to zero. The steps
// below that must match the CPU bit for bit on any input (tiny and subnormal magnitudes included)
// therefore work on the bits, or in float64, which fast math leaves alone.

// |x| as ordered bits (a larger magnitude has larger bits), 0 for infinities and NaN: the largest
// finite magnitude is the maximum of these.
__device__ __forceinline__ unsigned finite_magnitude_bits(float x) {
  const unsigned b = __float_as_uint(x) & 0x7fffffffu;
  return b < 0x7f800000u ? b : 0u;
}

// attn::fp8_pow2_scale on the device, from the bits of amax: the smallest 2^e (e >= -126) with
// amax <= 448 x 2^e = 1.75 x 2^(e + 8). amax = m x 2^E (m in [1, 2)) needs e = E - 8, or E - 7
// when m > 1.75. 0 when amax is 0.
__device__ __forceinline__ float pow2_scale_e4m3(unsigned amax_bits) {
  if (amax_bits == 0) return 0.0f;
  int e = -126;
  const int biased = static_cast<int>(amax_bits >> 23);
  if (biased > 0) {  // normal (a subnormal amax needs less than 2^-126: the floor)
    const int exp = biased - 127;
    e = exp - 8 + ((amax_bits & 0x7fffffu) > 0x600000u ? 1 : 0);
    if (e < -126) e = -126;
  }
  return __uint_as_float(static_cast<unsigned>(e + 127) << 23);
}

// x exactly as a double, subnormal floats included (a float-to-double conversion would flush them).
__device__ __forceinline__ double exact_double(float x) {
  const unsigned b = __float_as_uint(x), biased = (b >> 23) & 0xffu, m = b & 0x7fffffu;
  if (biased == 0xffu) return static_cast<double>(x);  // infinity or NaN
  const double mag = biased == 0 ? static_cast<double>(m) * 0x1p-149
                                 : ldexp(static_cast<double>(m | 0x800000u), static_cast<int>(biased) - 150);
  return (b >> 31) ? -mag : mag;
}

// e4m3(x / scale) as the CPU computes it (float_to_fp8_e4m3 of the float quotient): NaN keeps its
// sign; a power-of-two scale divides exactly (in float64, then to float: the same quotient
// wherever a nonzero code can come of it); a client's calibrated scale divides rounded once, in
// float, as on the CPU. Scale 0 (a page of zeros): code 0, NaN 0x7f.
__device__ __forceinline__ unsigned char quantize_e4m3(float x, float scale, bool calibrated) {
  const unsigned b = __float_as_uint(x);
  if ((b & 0x7fffffffu) > 0x7f800000u) return scale > 0.0f ? static_cast<unsigned char>(((b >> 24) & 0x80u) | 0x7fu) : 0x7f;
  if (!(scale > 0.0f)) return 0;
  if (calibrated) return float_to_e4m3(__fdiv_rn(x, scale));
  return float_to_e4m3(static_cast<float>(exact_double(x) / static_cast<double>(scale)));
}

// Block (i, h, s): the new rows of sequence i that fall in its s-th page touched by the call, at
// kv head h, into K then V; block (n, 0, 0) plans. A block's rows [r0, r1) of one page: their
// largest magnitude sets (r0 = 0: a fresh page) or grows the page's scale, and a grown scale
// requantizes rows [0, r0) first.
template <class T>
__global__ void __launch_bounds__(128) paged_append_fp8_kernel(PagedProblem p, PagedPrep prep) {
  const int i = blockIdx.x, h = blockIdx.y, seg = blockIdx.z;
  if (i == p.n) {
    if (h == 0 && seg == 0) paged_prep(p, prep);
    return;
  }
  const int len = p.seq_lens[i], fresh = p.new_count(i), t0 = len - fresh;
  const int pidx = t0 / p.page_size + seg;
  if (fresh <= 0 || pidx * p.page_size >= len) return;
  const int pos0 = max(t0, pidx * p.page_size), pos1 = min(len, (pidx + 1) * p.page_size);
  const int r0 = pos0 - pidx * p.page_size, r1 = pos1 - pidx * p.page_size;
  const int page = p.page_indices[p.page_indptr[i] + pidx];
  const int src_row = p.first_new(i) + (pos0 - t0);
  const int d = p.head_dim, count = (r1 - r0) * d;
  __shared__ unsigned red[4];
  __shared__ float scale_sh[2];  // the old and the new scale
#pragma unroll 1
  for (int pool = 0; pool < 2; ++pool) {
    const T* src = static_cast<const T*>(pool == 0 ? p.k_new : p.v_new);
    unsigned char* codes = static_cast<unsigned char*>(pool == 0 ? p.k_pool : p.v_pool);
    float* scales = (pool == 0 ? p.k_scales : p.v_scales) + static_cast<long long>(page) * p.heads_kv + h;
    const auto value = [&](int e) {  // element e of the block's rows
      const int r = e / d, c = e % d;
      return to_float(src[(static_cast<long long>(src_row + r) * p.heads_kv + h) * d + c]);
    };
    if (!p.fixed_scales) {
      unsigned amax = 0;
      for (int e = threadIdx.x; e < count; e += blockDim.x) amax = max(amax, finite_magnitude_bits(value(e)));
      amax = __reduce_max_sync(0xffffffffu, amax);
      if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = amax;
      __syncthreads();
      if (threadIdx.x == 0) {
        const unsigned all = max(max(red[0], red[1]), max(red[2], red[3]));
        const float old = r0 == 0 ? 0.0f : *scales;
        scale_sh[0] = old;
        scale_sh[1] = fmaxf(old, pow2_scale_e4m3(all));
        *scales = scale_sh[1];
      }
      __syncthreads();
      const float old = scale_sh[0], grown = scale_sh[1];
      if (old > 0.0f && grown > old) {  // the rows already here, to the larger scale
        unsigned char* at = codes + p.pool_offset(page, h, 0);
        for (int e = threadIdx.x; e < r0 * d; e += blockDim.x) {
          const unsigned char c = at[e];
          if ((c & 0x7fu) == 0x7fu) continue;  // NaN stays, with its sign
          // code x old is exact in float64; / grown exact (powers of two).
          const double v = exact_double(e4m3_to_float(c)) * static_cast<double>(old) / static_cast<double>(grown);
          at[e] = float_to_e4m3(static_cast<float>(v));
        }
      }
    } else if (threadIdx.x == 0) {
      scale_sh[1] = *scales;
    }
    __syncthreads();
    const float scale = scale_sh[1];
    unsigned char* dst = codes + p.pool_offset(page, h, r0);
    for (int e = threadIdx.x; e < count; e += blockDim.x) dst[e] = quantize_e4m3(value(e), scale, p.fixed_scales);
    __syncthreads();  // red and scale_sh are reused by the next pool
  }
}

template <class T>
Status launch_paged_append_fp8(const PagedProblem& p, const PagedPrep& prep, cudaStream_t s, const char* name) {
  // The most pages a sequence's new rows touch: (row of its first new token + new rows) / page.
  // Bounded from the host copies where there are (prefill's q_indptr too), else one (decode).
  int segments = 1;
  if (p.q_indptr_host && p.seq_lens_host) {
    for (int i = 0; i < p.n; ++i) {
      const int fresh = p.q_indptr_host[i + 1] - p.q_indptr_host[i];
      const int t0 = p.seq_lens_host[i] - fresh;
      segments = max(segments, (t0 % p.page_size + fresh + p.page_size - 1) / p.page_size);
    }
  }
  if (segments > 65535) return invalid_argument(std::string("q: ") + name + " appends < 2^16 pages a sequence a call");
  const bool extra = prep.tile_indptr || prep.zeroed;
  paged_append_fp8_kernel<T><<<dim3(static_cast<unsigned>(p.n + (extra ? 1 : 0)), p.heads_kv, segments), 128, 0, s>>>(
      p, prep);
  return to_status(cudaGetLastError(), name);
}

// float16 saturates: a code rounded up past 65504 (65504 / 256 rounds to code 256) stays finite.
template <class T>
__device__ __forceinline__ float in_range(float v) {
  if constexpr (std::is_same_v<T, __half>) return fminf(fmaxf(v, -65504.0f), 65504.0f);
  return v;
}

// Pages page_indices[x] of the call (x < page_indptr[n]), dequantized into page x of 16-bit
// scratch pools [page_indptr[n], Hkv, page_size, D]: block (x, h) one page of one head, K and V.
template <class T>
__global__ void __launch_bounds__(128) dequantize_pages_kernel(PagedProblem p, T* k_out, T* v_out, int* iota) {
  const int x = blockIdx.x, h = blockIdx.y;
  const int page = p.page_indices[x];
  if (h == 0 && threadIdx.x == 0) iota[x] = x;
  const long long src = p.pool_offset(page, h, 0), dst = (static_cast<long long>(x) * p.heads_kv + h) * p.page_size * p.head_dim;
  const float ks = p.k_scales[static_cast<long long>(page) * p.heads_kv + h];
  const float vs = p.v_scales[static_cast<long long>(page) * p.heads_kv + h];
  const int count = p.page_size * p.head_dim;  // a multiple of 16 (D is)
  const auto* kc = static_cast<const unsigned char*>(p.k_pool) + src;
  const auto* vc = static_cast<const unsigned char*>(p.v_pool) + src;
  for (int e = threadIdx.x * 16; e < count; e += blockDim.x * 16) {
    const uint4 kraw = *reinterpret_cast<const uint4*>(kc + e), vraw = *reinterpret_cast<const uint4*>(vc + e);
    const auto* kb = reinterpret_cast<const unsigned char*>(&kraw);
    const auto* vb = reinterpret_cast<const unsigned char*>(&vraw);
    alignas(16) T ko[16], vo[16];
#pragma unroll
    for (int b = 0; b < 16; ++b) {
      ko[b] = from_float<T>(in_range<T>(e4m3_to_float(kb[b]) * ks));
      vo[b] = from_float<T>(in_range<T>(e4m3_to_float(vb[b]) * vs));
    }
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      reinterpret_cast<uint4*>(k_out + dst + e)[q] = reinterpret_cast<const uint4*>(ko)[q];
      reinterpret_cast<uint4*>(v_out + dst + e)[q] = reinterpret_cast<const uint4*>(vo)[q];
    }
  }
}

}  // namespace attn::cuda
