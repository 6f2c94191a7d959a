// paged_prefill/02_wgmma: attention/04's Hopper machinery (wgmma, TMA ring, producer/consumer
// warpgroups ping-ponging, persistent blocks on a queue) over a paged cache and a packed, ragged
// batch. What changes from rung 01 and why it should be faster:
// - S = Q K^T and O += P V are wgmma.m64n128k16 chains (64 rows a warpgroup, 128-key tiles) out of
//   128-byte swizzled shared memory instead of ldmatrix + mma.sync: the tensor cores run at the
//   Hopper rate and the registers and issue slots go to the softmax, which runs under the other
//   warpgroup's matrix work (ping-pong) and under this warpgroup's own P V of the previous tile.
// - K/V tiles come by TMA, one box per page (page_size rows of one kv head: in the pool viewed as
//   rows of D, (page, head) starts at row (page x Hkv + head) x page_size) into the same swizzled
//   layout a 128-row box would make, since a page's rows start a multiple of 1024 bytes in; one
//   producer thread keeps a 2-stage ring full while 256 consumer threads only compute.
// - Query rows stay rung 01's (new token, query head of the group) pairs, so the GQA group shares
//   each K/V tile: the rows of a tile are one 4-D TMA box [tokens][group heads][64 of D], a tile
//   holding whole tokens, 128 / group of them (a group of 7: 18 tokens, 126 of 128 rows; the
//   rows past them are computed and dropped).
// - Windows skip the tiles no row of a tile sees and mask the tiles at either edge; a soft cap
//   maps the scores as in attention/04; the sinks join each row's denominator at the end.
// - Work items (sequence, kv head, 128-row tile) go to one block per SM through an atomic queue,
//   the latest tiles (the most keys under causal) first; the append launch plans the tile offsets
//   on the device and zeroes the queue, so there is no host-to-device copy per call.
// Ragged edges: rows past a sequence's new tokens are computed but not stored; pages past the
// sequence are not loaded and keys past its length are masked, their V rows zeroed (a pool's
// unused slots may hold anything, NaN included, and 0 x NaN would reach the output).
// bf16/fp16; head dims 32, 64, 80, 96, 128 (a partial last slab as in attention/04); 1 to 128 query
// heads per kv head; page sizes 16 to 128; windows, soft caps, sinks.
// Passed its GPU test on the H200; the auto prefill rung on Hopper (bench/results/2026-11-30-h200-serving.md).
#include <algorithm>

#include "../common/head_dims.cuh"
#include "../common/mma_sync.cuh"
#include "../common/paged_common.cuh"
#include "../hopper/hopper.cuh"
#include "../hopper/tensor_map.h"
#include "../hopper/wgmma_attention.cuh"
#include "../paged_decode/paged_decode_rungs.h"

namespace attn::cuda {
namespace {

using namespace hopper;

constexpr const char* kName = "paged_prefill/02_wgmma";
using namespace wgmma_attention;  // attention/04's building blocks: the same swizzled layout

constexpr int kBM = 128, kThreads = 384;
constexpr int kTurn = 1, kWarpgroupSync = 3;  // named barriers, as in attention/04

template <int D>
struct Smem {
  static constexpr int kStages = 2;
  static constexpr int kSlab = wgmma_attention::kSlab;
  static constexpr int kTileBytes = slabs<D>() * kSlab;  // Q, a K tile or a V tile
  static constexpr int kBytes = kTileBytes + kStages * 2 * kTileBytes + 1024;
};

__device__ __forceinline__ void tma_load_4d(void* dst, const CUtensorMap* map, std::uint64_t* bar,
                                            int c0, int c1, int c2, int c3) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, "
      "{%3, %4, %5, "
      "%6}], [%2];\n" ::"r"(smem_u32(dst)),
      "l"(map), "r"(smem_u32(bar)), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
      : "memory");
}

// Which keys [x, y) a packed row (new token row / group, query head row % group of the group) sees.
struct Rows {
  PagedMask mask;
  int len, fresh, group;
  __device__ __forceinline__ int2 visible(int row) const { return mask.visible(len, fresh, row / group); }
  __device__ __forceinline__ int2 operator()(int row) const { return visible(row); }  // softmax_tile's rule
};

// Whole tokens a 128-row tile holds: 128 / group of them (group <= 128).
__host__ __device__ __forceinline__ int tile_tokens(int group) { return kBM / group; }

// Work item w: kv head w % Hkv of query tile x = tiles - 1 - w / Hkv in the batch's tile order
// (tile_indptr from the append launch), so the latest tiles of the latest sequences go first and
// the kv heads of one tile run side by side.
// Its K/V tiles are [first_tile, tiles); those from first_masked on or before front_masked hold a
// key some row must not see. Its rows are [r0, row_end) of the sequence's packed rows.
struct WorkItem {
  int seq, hkv, r0, row_end, first, tiles, first_tile, first_masked, front_masked;
  Rows rows;
  __device__ WorkItem(const PagedProblem& p, const int* tile_indptr, int total_tiles, int w) {
    hkv = w % p.heads_kv;
    const int x = total_tiles - 1 - w / p.heads_kv;
    seq = owner_of_tile(tile_indptr, p.n, x);
    r0 = (x - __ldg(tile_indptr + seq)) * tile_tokens(p.group) * p.group;
    first = __ldg(p.q_indptr + seq);
    const int fresh = __ldg(p.q_indptr + seq + 1) - first, len = __ldg(p.seq_lens + seq);
    row_end = min(r0 + tile_tokens(p.group) * p.group, fresh * p.group);
    rows = Rows{p.mask(), len, fresh, p.group};
    const int2 first_keys = rows.visible(r0), last_keys = rows.visible(row_end - 1);
    tiles = (last_keys.y + kBN - 1) / kBN;
    first_tile = min(first_keys.x / kBN, tiles);
    first_masked = first_keys.y / kBN;
    front_masked = (last_keys.x + kBN - 1) / kBN;
  }
  __device__ bool masked(int t) const { return t >= first_masked || t < front_masked; }
};

template <class T, int D, bool kQRegs, bool kCap>
__global__ void __launch_bounds__(kThreads, 1)
    paged_wgmma_kernel(const __grid_constant__ CUtensorMap map_q,
                       const __grid_constant__ CUtensorMap map_k,
                       const __grid_constant__ CUtensorMap map_v, PagedProblem p,
                       const int* tile_indptr, int* next_item, int items, int total_tiles) {
  using S = Smem<D>;
  constexpr int kStages = S::kStages;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  __shared__ __align__(8) std::uint64_t q_full, q_empty, k_full[kStages], k_empty[kStages],
      v_full[kStages], v_empty[kStages];
  __shared__ int item_slot;
  unsigned char* qs = reinterpret_cast<unsigned char*>(
      (reinterpret_cast<std::uintptr_t>(smem_raw) + 1023) & ~std::uintptr_t{1023});
  unsigned char* ring = qs + S::kTileBytes;
  const int wg = threadIdx.x / 128, tid = threadIdx.x % 128;

  if (threadIdx.x == 0) {
    mbar_init(&q_full, 1);
    mbar_init(&q_empty, 2);
    for (int s = 0; s < kStages; ++s) {
      mbar_init(&k_full[s], 1);
      mbar_init(&v_full[s], 1);
      mbar_init(&k_empty[s], 2);
      mbar_init(&v_empty[s], 2);
    }
    mbar_fence_init();
  }
  __syncthreads();

  if (wg == 0) {  // producer
    regs_decrease<40>();
    if (tid != 0) return;
    int s = 0;
    std::uint32_t phase = 0, q_phase = 0;
    const int ps = p.page_size, pages_per_tile = kBN / ps;
    const std::uint32_t page_bytes =
        static_cast<std::uint32_t>(ps) * 128u;  // one page of one 64-wide slab
    for (int w = blockIdx.x;;) {
      mbar_wait(&q_empty, q_phase ^ 1);
      *static_cast<volatile int*>(&item_slot) = w < items ? w : -1;
      if (w >= items) {
        mbar_arrive(&q_full);
        break;
      }
      const WorkItem item(p, tile_indptr, total_tiles, w);
      // Q: [128 / group tokens][group heads][64] per slab; tokens past the batch read as zeros,
      // those of the next sequence are computed and dropped, as are the rows past the box.
      mbar_expect_tx(&q_full, static_cast<std::uint32_t>(tile_tokens(p.group) * p.group * 128 * slabs<D>()));
      for (int slab = 0; slab < slabs<D>(); ++slab)
        tma_load_4d(qs + slab * S::kSlab, &map_q, &q_full, 64 * slab, 0, item.hkv,
                    item.first + item.r0 / p.group);
      q_phase ^= 1;
      const int* pages = p.page_indices + __ldg(p.page_indptr + item.seq);
      for (int t = item.first_tile; t < item.tiles; ++t) {
        const int key0 = t * kBN;
        // Only the pages holding keys < len: the page table ends there.
        const int loaded = min(pages_per_tile, (item.rows.len - key0 + ps - 1) / ps);
        const std::uint32_t bytes = static_cast<std::uint32_t>(loaded) * page_bytes * slabs<D>();
        unsigned char* kt = ring + s * 2 * S::kTileBytes;
        mbar_wait(&k_empty[s], phase ^ 1);
        mbar_expect_tx(&k_full[s], bytes);
        for (int pg = 0; pg < loaded; ++pg) {
          const int page_row = __ldg(pages + key0 / ps + pg) * p.heads_kv + item.hkv;
          for (int slab = 0; slab < slabs<D>(); ++slab)
            tma_load_3d(kt + slab * S::kSlab + pg * page_bytes, &map_k, &k_full[s], 64 * slab, 0,
                        page_row);
        }
        mbar_wait(&v_empty[s], phase ^ 1);
        mbar_expect_tx(&v_full[s], bytes);
        for (int pg = 0; pg < loaded; ++pg) {
          const int page_row = __ldg(pages + key0 / ps + pg) * p.heads_kv + item.hkv;
          for (int slab = 0; slab < slabs<D>(); ++slab)
            tma_load_3d(kt + S::kTileBytes + slab * S::kSlab + pg * page_bytes, &map_v, &v_full[s],
                        64 * slab, 0, page_row);
        }
        if (++s == kStages) s = 0, phase ^= 1;
      }
      w = next_item ? atomicAdd(next_item, 1) + static_cast<int>(gridDim.x)
                    : w + static_cast<int>(gridDim.x);
    }
    return;
  }

  regs_increase<232>();
  const int half = wg - 1, warp = tid / 32, lane = tid % 32, t4 = lane % 4;
  const unsigned char* q = qs + half * 64 * 128;
  const auto take_turn = [&] { named_barrier(kTurn + half, 256); };
  const auto pass_turn = [&] { named_barrier_arrive(kTurn + 1 - half, 256); };
  if (half == 1) named_barrier_arrive(kTurn, 256);
  int s = 0;
  std::uint32_t phase = 0, q_phase = 0;
  for (;;) {
    mbar_wait(&q_full, q_phase);
    q_phase ^= 1;
    const int w = *static_cast<volatile int*>(&item_slot);
    named_barrier(kWarpgroupSync + half, 128);
    if (w < 0) break;
    const WorkItem item(p, tile_indptr, total_tiles, w);
    const int row0 =
        item.r0 + half * 64 + warp * 16 + lane / 4;  // rows row0 and row0 + 8 of the sequence
    float o[D / 2], m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f}, sc[64], scale_o[2];
    unsigned pf[kBN / 16][4], qf[D / 16][4];
#pragma unroll
    for (int i = 0; i < D / 2; ++i) o[i] = 0.0f;
    const auto release_q = [&] {
      if (tid == 0) mbar_arrive(&q_empty);
    };
    if constexpr (kQRegs) {
      load_q_fragments<D>(qf, qs, half * 64 + warp * 16, lane);
      named_barrier(kWarpgroupSync + half, 128);
      release_q();
    }
    const auto scores = [&] {
      if constexpr (kCap) return p.score_map();
      else return p.scale_log2;
    }();
    const int t0 = item.first_tile, n = item.tiles - t0;  // tile t0 + u is the u-th of the item
    if (n <= 0) {
      if (!kQRegs) release_q();
    } else {
      mbar_wait(&k_full[s], phase);
      take_turn();
      issue_scores<T, D, kQRegs>(sc, qf, q, ring + s * 2 * S::kTileBytes);
      pass_turn();
      wgmma_wait<0>();
      fence_registers(sc);
      if (tid == 0) mbar_arrive(&k_empty[s]);
      if (!kQRegs && n == 1) release_q();
      softmax_tile(sc, m, l, scale_o, scores, item.rows, item.masked(t0), t0 * kBN, row0, t4);
      pack_probabilities<T>(pf, sc);
      for (int u = 1; u < n; ++u) {
        const int sn = s + 1 == kStages ? 0 : s + 1;
        const std::uint32_t phase_n = sn == 0 ? phase ^ 1 : phase;
        mbar_wait(&k_full[sn], phase_n);
        take_turn();
        issue_scores<T, D, kQRegs>(sc, qf, q, ring + sn * 2 * S::kTileBytes);
        rescale_rows<D>(o, scale_o);
        mbar_wait(&v_full[s], phase);
        issue_pv<T, D>(o, pf, ring + s * 2 * S::kTileBytes + S::kTileBytes);
        pass_turn();
        wgmma_wait<1>();
        fence_registers(sc);
        if (tid == 0) mbar_arrive(&k_empty[sn]);
        if (!kQRegs && u == n - 1) release_q();
        softmax_tile(sc, m, l, scale_o, scores, item.rows, item.masked(t0 + u), (t0 + u) * kBN, row0, t4);
        wgmma_wait<0>();
        fence_registers(o);
        if (tid == 0) mbar_arrive(&v_empty[s]);
        pack_probabilities<T>(pf, sc);
        s = sn, phase = phase_n;
      }
      rescale_rows<D>(o, scale_o);
      unsigned char* vt = ring + s * 2 * S::kTileBytes + S::kTileBytes;
      mbar_wait(&v_full[s], phase);
      // Only the last tile can hold keys >= len. Their P is 0, but their V rows are whatever the
      // pool's slot (or an earlier tile, where no page was loaded) left, possibly NaN: zero them.
      // Both warpgroups write the same zeros, so the second writing under the first's P V is
      // harmless; the proxy fence makes the stores visible to wgmma.
      const int kept = item.rows.len - (item.tiles - 1) * kBN;
      if (kept < kBN) {
        const int chunks = (kBN - kept) * 8;  // 16-byte pieces per slab
        for (int c = tid; c < chunks * slabs<D>(); c += 128) {
          const int slab = c / chunks, rc = c % chunks;
          *reinterpret_cast<uint4*>(vt + slab * S::kSlab + (kept + rc / 8) * 128 + (rc % 8) * 16) =
              make_uint4(0u, 0u, 0u, 0u);
        }
        fence_async_shared();
        named_barrier(kWarpgroupSync + half, 128);
      }
      issue_pv<T, D>(o, pf, vt);
      wgmma_wait<0>();
      fence_registers(o);
      if (tid == 0) mbar_arrive(&v_empty[s]);
      if (++s == kStages) s = 0, phase ^= 1;
    }
    // Row r of the sequence's packed rows: token first + r / group, query head hkv x group + r %
    // group.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = row0 + 8 * r;
      float lr = l[r];
      lr += __shfl_xor_sync(0xffffffffu, lr, 1);
      lr += __shfl_xor_sync(0xffffffffu, lr, 2);
      if (row >= item.row_end) continue;
      const int head = item.hkv * p.group + row % p.group;
      const long long orow = static_cast<long long>(item.first + row / p.group) * p.heads_q + head;
      const RowEnd end = finish_row(m[r], lr, p.sinks, head);
      const float inv = end.inv;
      T* out = static_cast<T*>(p.o) + orow * D;
#pragma unroll
      for (int j = 0; j < D / 8; ++j)
        *reinterpret_cast<unsigned*>(out + 8 * j + 2 * t4) =
            mma_sync::pack2<T>(o[4 * j + 2 * r] * inv, o[4 * j + 2 * r + 1] * inv);
      if (p.lse && t4 == 0) p.lse[orow] = end.lse_log2 * 0.6931471805599453f;
    }
  }
  if (half == 0) named_barrier(kTurn, 256);
}

// Q [T, Hq, D] as [T][Hkv][group][D]: a box of [128 / group][1][group][64] is the 128 (token,
// group head) rows of one kv head's tile, in rung 01's row order.
Result<CUtensorMap> q_map(const PagedProblem& p, DType dt) {
  ATTN_ASSIGN_OR_RETURN(encode, tensor_map_encoder());
  CUtensorMap map{};
  const auto d = static_cast<cuuint64_t>(p.head_dim);
  const cuuint64_t dims[4] = {d, static_cast<cuuint64_t>(p.group),
                              static_cast<cuuint64_t>(p.heads_kv),
                              static_cast<cuuint64_t>(p.tokens)};
  const cuuint64_t strides[3] = {d * 2, d * 2 * p.group, d * 2 * p.heads_q};
  const cuuint32_t box[4] = {64, static_cast<cuuint32_t>(p.group), 1,
                             static_cast<cuuint32_t>(tile_tokens(p.group))};
  const cuuint32_t unit[4] = {1, 1, 1, 1};
  const CUresult r = encode(
      &map,
      dt == DType::kBFloat16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
      4, const_cast<void*>(p.q), dims, strides, box, unit, CU_TENSOR_MAP_INTERLEAVE_NONE,
      CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
      CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS)
    return internal_error("cuTensorMapEncodeTiled failed (CUresult " + std::to_string(r) + ")");
  return map;
}

long long total_tiles(const PagedPrefillArgs& a, const PagedProblem& p) {
  long long tiles = 0;
  for (int i = 0; i < p.n; ++i)
    tiles += (a.q_indptr_host[i + 1] - a.q_indptr_host[i] + tile_tokens(p.group) - 1) / tile_tokens(p.group);
  return tiles;
}

template <class T, int D>
Status launch(const PagedPrefillArgs& a, const PagedProblem& p, cudaStream_t s) {
  const DType dt = a.cache.dtype;
  const long long pool_rows = a.cache.pages * a.cache.heads_kv;
  ATTN_ASSIGN_OR_RETURN(mq, q_map(p, dt));
  ATTN_ASSIGN_OR_RETURN(mk, tensor_map_3d(p.k_pool, dt, D, p.page_size, pool_rows, p.page_size));
  ATTN_ASSIGN_OR_RETURN(mv, tensor_map_3d(p.v_pool, dt, D, p.page_size, pool_rows, p.page_size));
  const long long tiles = total_tiles(a, p), items = tiles * p.heads_kv;
  constexpr bool kQRegs =
      D == 128;  // as attention/04: Q in registers at 128, from shared memory at 64
  auto kernel = p.capped() ? paged_wgmma_kernel<T, D, kQRegs, true> : paged_wgmma_kernel<T, D, kQRegs, false>;
  constexpr int kBytes = Smem<D>::kBytes;
  ATTN_RETURN_IF_ERROR(
      to_status(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kBytes),
                "paged_prefill/02 shared memory"));
  int device = 0, sms = 0;
  ATTN_RETURN_IF_ERROR(to_status(cudaGetDevice(&device), "paged_prefill/02 device"));
  ATTN_RETURN_IF_ERROR(
      to_status(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device),
                "paged_prefill/02 device"));
  const int blocks = static_cast<int>(std::min<long long>(items, sms));
  // tile_indptr [n + 1] then the queue's counter, both written by the append launch.
  int* ws = nullptr;
  ATTN_RETURN_IF_ERROR(
      to_status(cudaMallocAsync(&ws, (p.n + 2) * sizeof(int), s), "paged_prefill/02 workspace"));
  PagedPrep prep;
  prep.tile_indptr = ws;
  prep.per_tile = tile_tokens(p.group);
  prep.units_are_new_rows = true;  // tokens: rows_per_token 1
  prep.zeroed = ws + p.n + 1;
  prep.zero_count = 1;
  const Status st = launch_paged_append<T>(p, prep, s, "paged_prefill/02 append");
  if (st.ok() && blocks > 0)
    kernel<<<blocks, kThreads, kBytes, s>>>(mq, mk, mv, p, ws,
                                            blocks < items ? ws + p.n + 1 : nullptr,
                                            static_cast<int>(items), static_cast<int>(tiles));
  const Status launched =
      st.ok() ? to_status(cudaGetLastError(), "paged_prefill/02_wgmma launch") : st;
  cudaFreeAsync(ws, s);
  return launched;
}

// float8 pages: the new rows are quantized into the cache, the call's pages dequantized into
// 16-bit scratch pools (page x of the call's page list at x: TMA boxes over 16-bit rows), and the
// kernel runs over those, the append already done. The attention is compute-bound at the lengths
// prefill runs; the dequantization reads the call's pages once.
template <class T>
Status launch_over_fp8(const PagedPrefillArgs& a, const PagedProblem& p, cudaStream_t s) {
  ATTN_RETURN_IF_ERROR(launch_paged_append<T>(p, PagedPrep{}, s, "paged_prefill/02 float8 append"));
  const long long pages = a.seqs.page_indptr_host[p.n];
  if (pages == 0) return Status::Ok();
  const std::size_t pool_bytes = static_cast<std::size_t>(pages) * p.heads_kv * p.page_size * p.head_dim * sizeof(T);
  char* ws = nullptr;
  ATTN_RETURN_IF_ERROR(to_status(cudaMallocAsync(&ws, 2 * pool_bytes + pages * sizeof(int), s),
                                 "paged_prefill/02 float8 scratch"));
  T* k16 = reinterpret_cast<T*>(ws);
  T* v16 = reinterpret_cast<T*>(ws + pool_bytes);
  int* iota = reinterpret_cast<int*>(ws + 2 * pool_bytes);
  dequantize_pages_kernel<T><<<dim3(static_cast<unsigned>(pages), p.heads_kv), 128, 0, s>>>(p, k16, v16, iota);
  Status st = to_status(cudaGetLastError(), "paged_prefill/02 float8 dequantize");
  if (st.ok()) {
    PagedPrefillArgs a16 = a;
    a16.cache.storage = KvStorage::kDType;
    a16.cache.k = k16, a16.cache.v = v16, a16.cache.pages = pages;
    a16.cache.k_scales = a16.cache.v_scales = nullptr;
    PagedProblem p16 = p;
    p16.fp8 = false, p16.appended = true;
    p16.k_pool = k16, p16.v_pool = v16, p16.page_indices = iota;
    p16.k_scales = p16.v_scales = nullptr;
    st = with_head_dim<kPagedPrefill02Caps.head_dims>(
        p.head_dim, [&](auto d) { return launch<T, decltype(d)::value>(a16, p16, s); });
  }
  cudaFreeAsync(ws, s);
  return st;
}

Result<PagedProblem> problem(const PagedPrefillArgs& a) {
  ATTN_ASSIGN_OR_RETURN(p, paged_problem(a, a.q_indptr, kPagedPrefill02Caps, kName));
  ATTN_RETURN_IF_ERROR(check_arch(kPagedPrefill02Caps, kName));
  if (!a.q_indptr_host)
    return invalid_argument(std::string("q_indptr: ") + kName + " plans from its host copy");
  // A page is one TMA box of page_size rows landing a multiple of 1024 bytes into a 128-key tile
  // (so that the 128-byte swizzle lines up): powers of two from 16 to 128.
  ATTN_RETURN_IF_ERROR(check_page_size(kPagedPrefill02Caps, a.cache.page_size, kName));
  for (const TensorView* t : {&a.q, &a.o})
    if (reinterpret_cast<std::uintptr_t>(t->data) % 16 != 0)
      return invalid_argument(std::string("q.data: ") + kName + " needs 16-byte aligned q and o");
  if (p.group > kBM)
    return invalid_argument(std::string("q.shape: ") + kName + " takes up to 128 query heads per key/value head, got " +
                            std::to_string(p.group));
  if (total_tiles(a, p) * p.heads_kv >
      INT_MAX / 2)  // item numbers run past the count by up to a grid
    return invalid_argument(std::string("q.shape: ") + kName + " takes < 2^30 work items");
  return p;
}

}  // namespace

Status paged_prefill_02_supports(const PagedPrefillArgs& args) { return problem(args).status(); }

Status paged_prefill_02_wgmma(const PagedPrefillArgs& args, Stream& stream) {
  ATTN_ASSIGN_OR_RETURN(p, problem(args));
  const cudaStream_t s = paged_stream(stream);
  const auto by_dim = [&](auto tag) -> Status {
    using T = decltype(tag);
    if (p.fp8) return launch_over_fp8<T>(args, p, s);
    return with_head_dim<kPagedPrefill02Caps.head_dims>(p.head_dim, [&](auto d) { return launch<T, decltype(d)::value>(args, p, s); });
  };
  return args.cache.dtype == DType::kBFloat16 ? by_dim(__nv_bfloat16{}) : by_dim(__half{});
}

}  // namespace attn::cuda
