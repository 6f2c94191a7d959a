// paged_prefill/01_flash_mma: attention/03's FlashAttention-2 loop on mma.sync, over a paged
// cache. One launch appends every new K/V row to its page (and plans the query tiles); then:
// - A block owns 128 query rows of one sequence and one key/value head, the rows being (new
//   token, query head of the group) pairs: the whole GQA group shares each K/V tile, so a chunk
//   of 64 new tokens at Hq / Hkv = 4 fills two blocks that read the cache once each, not four
//   blocks of 64 rows reading it four times.
// - K/V tiles of 64 keys are gathered from the pages with cp.async, 16 bytes a thread, each row
//   from its page (the table read is per row, cached in L1), double-buffered into XOR-swizzled
//   shared memory; Q/K fragments through ldmatrix, V with .trans; P stays in registers.
// - Causal bottom-right per sequence: new token j of a sequence of len keys with `fresh` new ones
//   sees keys < len - fresh + j + 1, and with a window only those from its position minus
//   window_left; tiles outside every row's keys are skipped and only tiles crossing a row's
//   limits are masked. A soft cap maps the scores (attention/03's ScoreMap); the sinks join each
//   row's denominator at the end.
// bfloat16/float16; every head dim of common/head_dims.cuh (rows padded to 64, 128 or 256 in
// shared memory, as in attention/03); any number of query heads per key/value head (a group of 7
// packs 7 heads of each token into consecutive rows; 128 rows hold 18 tokens and 2 heads of a
// 19th); any page size; windows, soft caps and sinks.
#include "../common/flash_mma_tile.cuh"
#include "../common/head_dims.cuh"
#include "../common/mma_sync.cuh"
#include "../common/paged_common.cuh"
#include "../paged_decode/paged_decode_rungs.h"

namespace attn::cuda {
namespace {

using namespace mma_sync;
using flash_mma::attend_tile;

constexpr int kWarps = 4, kThreads = kWarps * 32;

// As attention/03: 2 m-tiles a warp and 64-key tiles up to head dim 128; above it one m-tile (O of
// two would not fit in registers), and 32-key tiles at 256.
template <int D>
struct Tiling {
  static constexpr int kMT = D <= 128 ? 2 : 1, kBlockM = 16 * kMT * kWarps, kBN = D <= 192 ? 64 : 32;
};

// Byte offset of (row, 16-byte chunk) in a [rows][padded D] tile whose chunks are XOR-swizzled by
// row & 7 (padded_dim: rows of 64, 128 or 256 elements).
template <int D>
__device__ __forceinline__ unsigned swizzled_bytes(int row, int chunk) {
  return static_cast<unsigned>(row * padded_dim<D>() * 2 + ((chunk ^ (row & 7)) << 4));
}

// Copies kRows rows into a swizzled tile; row_src(r) gives row r's first element, or null for a
// row to zero-fill. Where a row's chunks do not divide the threads, through the chunks in order.
template <class T, int D, int kRows, class RowSrc>
__device__ __forceinline__ void load_rows(unsigned tile, const T* any_valid, RowSrc row_src) {
  constexpr int kChunks = D / 8, kRowsPerPass = kThreads / kChunks;
  if constexpr (kThreads % kChunks == 0 && kRows % kRowsPerPass == 0) {
    const int r = threadIdx.x / kChunks, c = threadIdx.x % kChunks;
#pragma unroll
    for (int pass = 0; pass < kRows / kRowsPerPass; ++pass) {
      const int row = r + pass * kRowsPerPass;
      const T* src = row_src(row);
      cp_async16(tile + swizzled_bytes<D>(row, c), src ? src + c * 8 : any_valid, src != nullptr);
    }
  } else {
    static_assert((kRows * kChunks) % kThreads == 0);
#pragma unroll
    for (int pass = 0; pass < kRows * kChunks / kThreads; ++pass) {
      const int idx = pass * kThreads + threadIdx.x, row = idx / kChunks, c = idx % kChunks;
      const T* src = row_src(row);
      cp_async16(tile + swizzled_bytes<D>(row, c), src ? src + c * 8 : any_valid, src != nullptr);
    }
  }
}

// The keys packed row `row` (token row / group of the sequence's new ones) sees: [x, y) with a
// window (kWindow), else [0, end) (the causal limit, or all len), which keeps the plain path's
// registers as they were.
template <bool kWindow>
struct Rows {
  PagedMask mask;
  int len, fresh, group;
  __device__ __forceinline__ auto operator()(int row) const {  // attend_tile's rule
    if constexpr (kWindow) return mask.visible(len, fresh, row / group);
    else return mask.causal ? min(len, len - fresh + 1 + row / group) : len;
  }
};

// kOptions: a window, a soft cap or sinks (the int2 rule, the ScoreMap, the sinks' row ends), else
// the plain path.
template <class T, int D, bool kOptions>
__global__ void __launch_bounds__(kThreads)
    paged_flash_kernel(PagedProblem p, const int* tile_indptr) {
  constexpr int kMT = Tiling<D>::kMT, kBlockM = Tiling<D>::kBlockM, kBN = Tiling<D>::kBN;
  constexpr unsigned kTileBytes = kBN * padded_dim<D>() * 2;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  const unsigned qs = (smem_addr(smem_raw) + 255u) & ~255u;
  const unsigned ks = qs + kBlockM * padded_dim<D>() * 2;  // [2][kBN][padded D]
  const unsigned vs = ks + 2 * kTileBytes;                  // [2][kBN][padded D]
  const int x = gridDim.x - 1 - blockIdx.x;  // the last tiles (latest tokens, most keys) first
  const int hkv = blockIdx.y, h0 = hkv * p.group;
  const int i = owner_of_tile(tile_indptr, p.n, x);
  const int r0 = (x - __ldg(tile_indptr + i)) * kBlockM;  // first (token, group head) row
  const int first = p.first_new(i), fresh = p.new_count(i), len = __ldg(p.seq_lens + i);
  const int row_count = fresh * p.group;
  const Rows<kOptions> rows{p.mask(), len, fresh, p.group};
  const int* pages = p.page_indices + __ldg(p.page_indptr + i);
  const T* qbase = static_cast<const T*>(p.q);
  const T* kpool = static_cast<const T*>(p.k_pool);
  const T* vpool = static_cast<const T*>(p.v_pool);

  // Rows' key ranges grow with the row (later tokens, same window): the block's keys are
  // [first row's x, last row's y); tiles from first_masked on or before front_masked hold a key
  // some row must not see.
  const int last_row = min(r0 + kBlockM, row_count) - 1;
  const int2 first_keys = kept_keys(rows, r0), last_keys = kept_keys(rows, last_row);
  const int tiles = (last_keys.y + kBN - 1) / kBN;
  const int first_tile = kOptions ? min(first_keys.x / kBN, tiles) : 0;  // 0 without a window
  const int first_masked = first_keys.y / kBN;
  const int front_masked = kOptions ? (last_keys.x + kBN - 1) / kBN : 0;

  auto q_src = [&](int r) -> const T* {
    const int row = r0 + r;
    if (row >= row_count) return nullptr;
    return qbase +
           (static_cast<long long>(first + row / p.group) * p.heads_q + h0 + row % p.group) * D;
  };
  // K and V rows of keys [j0, j0 + kBN) into buffer `buf`: one page-table read per row for both,
  // zeros past the sequence.
  constexpr int kChunks = D / 8, kRowsPerPass = kThreads / kChunks;
  const int load_row = threadIdx.x / kChunks, load_chunk = threadIdx.x % kChunks;
  auto load_kv = [&](unsigned buf, int j0) {
    const auto copy = [&](int row, int chunk) {
      const int j = j0 + row;
      const bool valid = j < len;
      const long long off = valid ? p.key_offset(pages, i, hkv, j) + chunk * 8 : 0;
      const unsigned dst = swizzled_bytes<D>(row, chunk);
      cp_async16(ks + buf + dst, kpool + off, valid);
      cp_async16(vs + buf + dst, vpool + off, valid);
    };
    if constexpr (kThreads % kChunks == 0 && kBN % kRowsPerPass == 0) {
#pragma unroll
      for (int pass = 0; pass < kBN / kRowsPerPass; ++pass) copy(load_row + pass * kRowsPerPass, load_chunk);
    } else {
      static_assert((kBN * kChunks) % kThreads == 0);
#pragma unroll
      for (int pass = 0; pass < kBN * kChunks / kThreads; ++pass) {
        const int idx = pass * kThreads + threadIdx.x;
        copy(idx / kChunks, idx % kChunks);
      }
    }
  };
  load_rows<T, D, kBlockM>(qs, qbase, q_src);
  if (tiles > first_tile) load_kv(0, first_tile * kBN);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t4 = lane % 4;
  const int warp_row0 = warp * 16 * kMT;
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
  const int row0 = r0 + warp_row0 + g;  // this lane's first row; the others are +8, +16, +24

  const auto scores = [&] {
    if constexpr (kOptions) return p.score_map();
    else return p.scale_log2;
  }();
  for (int t = first_tile; t < tiles; ++t) {
    const unsigned buf = ((t - first_tile) & 1) * kTileBytes, next = kTileBytes - buf;
    const int j0 = t * kBN;
    if (t + 1 < tiles) load_kv(next, j0 + kBN);  // the next tile flies while this one is computed
    cp_async_commit();
    if (t >= first_masked || t < front_masked)
      attend_tile<T, D, kMT, kBN, true>(rows, scores, q_lane, ks + buf + k_lane0, vs + buf + v_lane0,
                              j0, row0, o, m, l);
    else
      attend_tile<T, D, kMT, kBN, false>(rows, scores, q_lane, ks + buf + k_lane0, vs + buf + v_lane0,
                               j0, row0, o, m, l);
    cp_async_wait<0>();
    __syncthreads();
  }

  // Rows row0 + 16 mt + 8 r: (token, head) -> output row first + token, head h0 + row % group.
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = row0 + mt * 16 + 8 * r;
      float lr = l[mt][r];
      lr += __shfl_xor_sync(0xffffffffu, lr, 1);
      lr += __shfl_xor_sync(0xffffffffu, lr, 2);
      if (row >= row_count) continue;
      const long long orow =
          static_cast<long long>(first + row / p.group) * p.heads_q + h0 + row % p.group;
      const RowEnd end = kOptions ? finish_row(m[mt][r], lr, p.sinks, h0 + row % p.group)
                                  : RowEnd{1.0f / lr, m[mt][r] + log2f(lr)};  // every row sees its own key
      const float inv = end.inv;
      T* out = static_cast<T*>(p.o) + orow * D;
#pragma unroll
      for (int j = 0; j < D / 8; ++j)
        *reinterpret_cast<unsigned*>(out + 8 * j + 2 * t4) =
            pack2<T>(o[mt][j][2 * r] * inv, o[mt][j][2 * r + 1] * inv);
      if (p.lse && t4 == 0) p.lse[orow] = end.lse_log2 * 0.6931471805599453f;
    }
}

template <class T, int D>
Status launch(const PagedPrefillArgs& a, const PagedProblem& p, cudaStream_t s) {
  constexpr int kBlockM = Tiling<D>::kBlockM, kBN = Tiling<D>::kBN;
  long long tiles = 0;
  for (int i = 0; i < p.n; ++i)
    tiles += (static_cast<long long>(a.q_indptr_host[i + 1] - a.q_indptr_host[i]) * p.group +
              kBlockM - 1) /
             kBlockM;
  if (tiles > INT_MAX / 2)
    return invalid_argument("q.shape: paged_prefill/01 takes < 2^30 query tiles");
  constexpr int kSmem = (kBlockM + 4 * kBN) * padded_dim<D>() * static_cast<int>(sizeof(T)) + 256;
  const bool options = p.capped() || p.sinks || p.window_left >= 0 || (!p.causal && p.window_right >= 0);
  auto kernel = options ? paged_flash_kernel<T, D, true> : paged_flash_kernel<T, D, false>;
  ATTN_RETURN_IF_ERROR(
      to_status(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem),
                "paged_prefill/01 shared memory"));
  int* tile_indptr = nullptr;
  ATTN_RETURN_IF_ERROR(to_status(cudaMallocAsync(&tile_indptr, (p.n + 1) * sizeof(int), s),
                                 "paged_prefill/01 workspace"));
  PagedPrep prep;
  prep.tile_indptr = tile_indptr;
  prep.per_tile = kBlockM;
  prep.units_are_new_rows = true;
  prep.rows_per_token = p.group;
  const Status st = launch_paged_append<T>(p, prep, s, "paged_prefill/01 append");
  if (st.ok()) {
    kernel<<<dim3(static_cast<unsigned>(tiles), p.heads_kv), kThreads, kSmem, s>>>(p, tile_indptr);
  }
  const Status launched =
      st.ok() ? to_status(cudaGetLastError(), "paged_prefill/01_flash_mma launch") : st;
  cudaFreeAsync(tile_indptr, s);
  return launched;
}

Result<PagedProblem> problem(const PagedPrefillArgs& a) {
  ATTN_ASSIGN_OR_RETURN(p, paged_problem(a, a.q_indptr, kPagedPrefill01Caps, "paged_prefill/01_flash_mma"));
  if (!a.q_indptr_host)
    return invalid_argument("q_indptr: paged_prefill/01_flash_mma plans from its host copy");
  return p;
}

}  // namespace

Status paged_prefill_01_supports(const PagedPrefillArgs& args) { return problem(args).status(); }

Status paged_prefill_01_flash_mma(const PagedPrefillArgs& args, Stream& stream) {
  ATTN_ASSIGN_OR_RETURN(p, problem(args));
  const cudaStream_t s = paged_stream(stream);
  const auto by_dim = [&](auto tag) -> Status {
    using T = decltype(tag);
    return with_head_dim<kPagedPrefill01Caps.head_dims>(p.head_dim, [&](auto d) { return launch<T, decltype(d)::value>(args, p, s); });
  };
  return args.cache.dtype == DType::kBFloat16 ? by_dim(__nv_bfloat16{}) : by_dim(__half{});
}

}  // namespace attn::cuda
