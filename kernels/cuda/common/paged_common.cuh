// Shared by the paged (KV-cache) rungs: the call as plain numbers, the one launch that appends
// the new K/V rows to their pages (and plans the work on the device), and the checks.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <string>
#include <type_traits>

#include "../cuda_check.h"
#include "../softmax/softmax_common.cuh"
#include "rung_caps.h"
#include "score_rules.cuh"
#include "attn/executor.h"
#include "attn/paged_ops.h"

namespace attn::cuda {

// Which keys a new token sees (attn::visible_keys for the tokens of a paged call), as a small
// value a tile's rule can hold.
struct PagedMask {
  bool causal;
  int window_left, window_right;
  // The keys [x, y) new token t (0-based among the sequence's `fresh` new ones) of a sequence of
  // `len` keys sees: it sits at position len - fresh + t.
  __host__ __device__ __forceinline__ int2 visible(int len, int fresh, int t) const {
    const int pos = len - fresh + t;
    int end = len;
    if (causal) end = min(len, pos + 1);
    else if (window_right >= 0 && pos + window_right + 1 < len) end = pos + window_right + 1;
    int begin = window_left >= 0 && pos - window_left > 0 ? pos - window_left : 0;
    if (end < 0) end = 0;
    if (begin > end) begin = end;
    return make_int2(begin, end);
  }
};

struct PagedProblem {
  const void* q;
  const void* k_new;
  const void* v_new;
  void* o;
  float* lse;  // null when not wanted
  void* k_pool;
  void* v_pool;
  const int* page_indptr;   // [n + 1]
  const int* page_indices;  // [page_indptr[n]]
  const int* seq_lens;      // [n]; null: every sequence holds fixed_len keys (dense K/V)
  const int* q_indptr;      // [n + 1]; null for decode (one new row per sequence)
  int n, tokens, heads_q, heads_kv, group, page_size, head_dim;
  float scale, scale_log2;
  bool causal;
  int fixed_len;   // with seq_lens null and page_indices null: dense [n, Hkv, fixed_len, D] K/V
  int page_shift;  // log2(page_size) when a power of two (a shift and a mask per key), else -1
  int window_left = -1, window_right = -1;  // the mask's window (AttentionMask); -1: unbounded
  float cap_pre = 0.0f, cap_log2 = 0.0f;    // the soft cap as a ScoreMap; 0: none
  const float* sinks = nullptr;             // [Hq] natural-log sink logits, or null
  // float8 e4m3 pages (PagedKvLayer::fp8): the pools hold codes, a float32 scale per (page, kv
  // head) of each pool (attn/paged_ops.h); the append quantizes (paged_fp8.cuh).
  bool fp8 = false, fixed_scales = false;
  float* k_scales = nullptr;
  float* v_scales = nullptr;
  // The call's new rows are already in the pools (a caller appended them): the append launch
  // only plans.
  bool appended = false;
  // Host copies (never read on the device): the lengths, and prefill's q_indptr (null for decode).
  const std::int32_t* seq_lens_host = nullptr;
  const std::int32_t* q_indptr_host = nullptr;

  __host__ __device__ ScoreMap score_map() const { return {scale_log2, cap_pre, cap_log2}; }
  __host__ __device__ bool capped() const { return cap_log2 != 0.0f; }
  // The keys [x, y) new token t (0-based among the sequence's `fresh` new ones) of a sequence of
  // `len` keys sees: it sits at position len - fresh + t (attn::visible_keys).
  __host__ __device__ int2 visible(int len, int fresh, int t) const {
    return mask().visible(len, fresh, t);
  }
  __host__ __device__ PagedMask mask() const { return {causal, window_left, window_right}; }
  // Decode (the new token last, causal): the first key of the window, and the keys it sees.
  __host__ __device__ int decode_first_key(int len) const {
    return window_left >= 0 && len - 1 - window_left > 0 ? len - 1 - window_left : 0;
  }

  __device__ __forceinline__ int seq_len(int i) const {
    return seq_lens ? __ldg(seq_lens + i) : fixed_len;
  }
  // The page holding key j of sequence i, whose page table starts at `pages` (dense: page i).
  __device__ __forceinline__ int page_of(const int* pages, int i, int j) const {
    if (!page_indices) return i;
    return __ldg(pages + (page_shift >= 0 ? j >> page_shift : j / page_size));
  }
  // Element offset of key j of sequence i (page table `pages`) for kv head hkv in a pool.
  __device__ __forceinline__ long long key_offset(const int* pages, int i, int hkv, int j) const {
    const int row = page_shift >= 0 ? j & (page_size - 1) : j % page_size;
    return pool_offset(page_of(pages, i, j), hkv, row);
  }

  // First new row of sequence i in the packed q / k_new / v_new, and how many it brings.
  __device__ __forceinline__ int first_new(int i) const { return q_indptr ? q_indptr[i] : i; }
  __device__ __forceinline__ int new_count(int i) const {
    return q_indptr ? q_indptr[i + 1] - q_indptr[i] : 1;
  }
  // Element offset of (page, kv head, row) in a pool.
  __device__ __forceinline__ long long pool_offset(int page, int hkv, int row) const {
    return ((static_cast<long long>(page) * heads_kv + hkv) * page_size + row) * head_dim;
  }
};

inline int page_shift_of(std::int64_t page_size) {
  for (int s = 0; s < 31; ++s)
    if ((std::int64_t{1} << s) == page_size) return s;
  return -1;
}

// Checks what every paged CUDA rung needs (the op's shape rules, device memory, int32 ranges)
// and what the rung takes (its RungCaps: dtypes, head dims, group sizes); builds the problem.
template <class Args>
Result<PagedProblem> paged_problem(const Args& a, const TensorView& q_indptr, const RungCaps& caps,
                                   const char* name) {
  ATTN_RETURN_IF_ERROR(OpDesc<Args>::check(a));
  if (a.cache.fp8() && !caps.fp8_pages) {
    return invalid_argument(std::string("cache.storage: ") + name +
                            " reads pages in the cache's dtype, not float8_e4m3 (paged_decode/04_warp_pipes "
                            "and paged_prefill/02_wgmma do)");
  }
  ATTN_RETURN_IF_ERROR(check_dtype(caps, a.cache.dtype, "q.dtype", name));
  ATTN_RETURN_IF_ERROR(check_head_dim(caps, a.cache.dtype, a.cache.head_dim, "q.shape", name));
  const std::int64_t group = a.q.dim(1) / a.cache.heads_kv;
  ATTN_RETURN_IF_ERROR(check_group(caps, group, "q.shape", name));
  const bool windowed = a.mask.window_left >= 0 || (!a.mask.causal && a.mask.window_right >= 0);
  ATTN_RETURN_IF_ERROR(check_options(caps, windowed, a.softcap, !a.sinks.empty(), name));
  if (a.cache.pages * a.cache.heads_kv * a.cache.page_size > INT_MAX ||
      a.seqs.max_seq_len > INT_MAX / 2 || a.q.dim(0) > INT_MAX / 64 || a.q.dim(0) * group > INT_MAX / 2 ||
      a.seqs.count() > 65535 * 64 || a.cache.heads_kv > 65535) {
    return invalid_argument(std::string("cache: ") + name +
                            " takes pages x Hkv x page_size < 2^31, sequences < 2^30 and new rows x group < 2^30");
  }
  if (!a.seqs.seq_lens_host || !a.seqs.page_indptr_host) {
    return invalid_argument(std::string("seq_lens: ") + name +
                            " plans from the host copies of the arrays");
  }
  // Pages move in 16-byte pieces (cp.async, bulk copies): the pools must start 16-byte aligned
  // (Executor::allocate's are); a row is D x the element size, a multiple of 16 for every D taken.
  if (reinterpret_cast<std::uintptr_t>(a.cache.k) % 16 != 0 ||
      reinterpret_cast<std::uintptr_t>(a.cache.v) % 16 != 0) {
    return invalid_argument(std::string("cache: ") + name + " takes 16-byte aligned pools");
  }
  PagedProblem p{};
  p.q = a.q.data, p.k_new = a.k_new.data, p.v_new = a.v_new.data, p.o = a.o.data;
  p.lse = a.lse.empty() ? nullptr : static_cast<float*>(a.lse.data);
  p.k_pool = a.cache.k, p.v_pool = a.cache.v;
  p.page_indptr = static_cast<const int*>(a.seqs.page_indptr.data);
  p.page_indices = static_cast<const int*>(a.seqs.page_indices.data);
  p.seq_lens = static_cast<const int*>(a.seqs.seq_lens.data);
  p.q_indptr = q_indptr.empty() ? nullptr : static_cast<const int*>(q_indptr.data);
  p.n = static_cast<int>(a.seqs.count());
  p.tokens = static_cast<int>(a.q.dim(0));
  p.heads_q = static_cast<int>(a.q.dim(1));
  p.heads_kv = static_cast<int>(a.cache.heads_kv);
  p.group = static_cast<int>(group);
  p.page_size = static_cast<int>(a.cache.page_size);
  p.head_dim = static_cast<int>(a.cache.head_dim);
  p.scale = a.scale;
  p.scale_log2 = a.scale * 1.4426950408889634f;
  p.causal = a.mask.causal;
  p.page_shift = page_shift_of(p.page_size);
  p.window_left = static_cast<int>(std::min<std::int64_t>(a.mask.window_left, INT_MAX / 2));
  p.window_right = static_cast<int>(std::min<std::int64_t>(a.mask.window_right, INT_MAX / 2));
  if (a.softcap > 0.0f) {
    p.cap_pre = a.scale / a.softcap;
    p.cap_log2 = a.softcap * 1.4426950408889634f;
  }
  p.sinks = a.sinks.empty() ? nullptr : static_cast<const float*>(a.sinks.data);
  p.seq_lens_host = a.seqs.seq_lens_host;
  if constexpr (std::is_same_v<Args, PagedPrefillArgs>) p.q_indptr_host = a.q_indptr_host;
  if (a.cache.fp8()) {
    if (!a.cache.k_scales || !a.cache.v_scales)
      return invalid_argument(std::string("cache.k_scales: ") + name + " needs the float8 pages' scales");
    p.fp8 = true, p.fixed_scales = a.cache.fixed_scales;
    p.k_scales = a.cache.k_scales, p.v_scales = a.cache.v_scales;
  }
  return p;
}

// What the append launch also prepares for the attention kernel that follows it on the stream:
// tile_indptr[i] = sum over sequences before i of ceil(units(i) / per_tile), where units are the
// sequence's keys in its window (decode: split into chunks) or its new rows x rows_per_token
// (prefill: query tiles); and
// `zero_count` ints zeroed (the merge counters). Both optional.
struct PagedPrep {
  int* tile_indptr = nullptr;  // [n + 1]
  int per_tile = 1;
  bool units_are_new_rows = false;  // false: the keys of the sequence in the decode window
  int rows_per_token = 1;           // with units_are_new_rows: rows a new token brings
  int* zeroed = nullptr;
  int zero_count = 0;
};

// The planning part of the append launch: tile_indptr (a scan) and the zeroing.
__device__ __forceinline__ void paged_prep(const PagedProblem& p, const PagedPrep& prep) {
  if (prep.zeroed)
    for (int i = threadIdx.x; i < prep.zero_count; i += blockDim.x) prep.zeroed[i] = 0;
  if (prep.tile_indptr && threadIdx.x < 32) {
    const int lane = threadIdx.x;
    int carry = 0;
    if (lane == 0) prep.tile_indptr[0] = 0;
    for (int base = 0; base < p.n; base += 32) {
      const int i = base + lane;
      int tiles = 0;
      if (i < p.n) {
        const int len = p.seq_len(i);
        const int units = prep.units_are_new_rows ? p.new_count(i) * prep.rows_per_token
                                                  : len - p.decode_first_key(len);
        tiles = (units + prep.per_tile - 1) / prep.per_tile;
      }
#pragma unroll
      for (int off = 1; off < 32; off <<= 1) {  // inclusive scan across the warp
        const int x = __shfl_up_sync(0xffffffffu, tiles, off);
        if (lane >= off) tiles += x;
      }
      if (i < p.n) prep.tile_indptr[i + 1] = carry + tiles;
      carry += __shfl_sync(0xffffffffu, tiles, 31);
    }
  }
}

// Block b < tokens appends new row b (every kv head); block `tokens` runs the scan and zeroing.
template <class T>
__global__ void __launch_bounds__(128) paged_append_kernel(PagedProblem p, PagedPrep prep) {
  if (blockIdx.x == static_cast<unsigned>(p.tokens)) {
    paged_prep(p, prep);
    return;
  }
  const int t = blockIdx.x;
  // The sequence of new row t: the last i with first_new(i) <= t.
  int i = t;
  if (p.q_indptr) {
    int lo = 0, hi = p.n - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (p.q_indptr[mid] <= t)
        lo = mid;
      else
        hi = mid - 1;
    }
    i = lo;
  }
  const int pos = p.seq_lens[i] - p.new_count(i) + (t - p.first_new(i));
  const int page = p.page_indices[p.page_indptr[i] + pos / p.page_size];
  constexpr int kVec = 16 / sizeof(T);
  const int vecs = p.head_dim / kVec;
  for (int idx = threadIdx.x; idx < p.heads_kv * vecs; idx += blockDim.x) {
    const int h = idx / vecs, c = idx % vecs;
    const long long src = (static_cast<long long>(t) * p.heads_kv + h) * p.head_dim + c * kVec;
    const long long dst = p.pool_offset(page, h, pos % p.page_size) + c * kVec;
    reinterpret_cast<uint4*>(static_cast<T*>(p.k_pool) + dst)[0] =
        reinterpret_cast<const uint4*>(static_cast<const T*>(p.k_new) + src)[0];
    reinterpret_cast<uint4*>(static_cast<T*>(p.v_pool) + dst)[0] =
        reinterpret_cast<const uint4*>(static_cast<const T*>(p.v_new) + src)[0];
  }
}

}  // namespace attn::cuda

#include "paged_fp8.cuh"

namespace attn::cuda {

// The append of a call's new rows (float8 pages: quantized, paged_fp8.cuh), with the plan.
template <class T>
Status launch_paged_append(const PagedProblem& p, const PagedPrep& prep, cudaStream_t s,
                           const char* name) {
  const bool extra = prep.tile_indptr || prep.zeroed;
  if (p.fp8 && !p.appended) return launch_paged_append_fp8<T>(p, prep, s, name);
  if (p.appended) {  // planning only: a launch whose one block is the plan's
    if (!extra) return Status::Ok();
    PagedProblem plan = p;
    plan.tokens = 0;
    paged_append_kernel<T><<<1, 128, 0, s>>>(plan, prep);
    return to_status(cudaGetLastError(), name);
  }
  paged_append_kernel<T><<<p.tokens + (extra ? 1 : 0), 128, 0, s>>>(p, prep);
  return to_status(cudaGetLastError(), name);
}

// The sequence that owns tile x: the last i with tile_indptr[i] <= x (binary search, n + 1
// entries).
__device__ __forceinline__ int owner_of_tile(const int* tile_indptr, int n, int x) {
  int lo = 0, hi = n - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (__ldg(tile_indptr + mid) <= x)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

template <class T>
__device__ __forceinline__ void unpack16(const uint4& raw, float (&out)[16 / sizeof(T)]) {
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < static_cast<int>(16 / sizeof(T)); ++i) out[i] = to_float(e[i]);
}

inline cudaStream_t paged_stream(Stream& s) { return static_cast<cudaStream_t>(s.cuda_stream()); }

}  // namespace attn::cuda
