// attention/04_wgmma_tma: rung 03's algorithm on Hopper's warpgroup MMA (sm_90a), scheduled the
// way FlashAttention-3 does it. What changes from rung 03 and why it is faster:
// - S = Q K^T is one wgmma.m64n128k16 chain per 16 of the head dim with K straight from shared
//   memory and Q from registers (head dim 128: loaded once per query tile, so the tensor cores
//   read only K) or shared memory (64); O += P V takes P from registers (the accumulator layout of
//   S is wgmma's A-register layout) and V through wgmma's transpose bit.
// - TMA copies Q and K/V tiles into a 2-stage ring (128-byte swizzle; K and V with their own
//   full/empty mbarriers, so QK^T starts before V lands); a producer warpgroup (40 registers)
//   issues them, two consumer warpgroups (232 registers) own 64 query rows each of 128.
// - The tensor cores do not wait on the softmax: inside a warpgroup, tile t's QK^T and tile t-1's
//   PV are issued together and tile t's softmax runs while PV t-1 is in flight; across the two
//   warpgroups, named barriers hand the tensor cores back and forth (ping-pong), so one
//   warpgroup's softmax runs under the other's matrix work.
// - The softmax is cut to what the FP32 pipe must do: max on raw scores, the scale folded into
//   the exponent's FFMA, ex2.approx.ftz (exp2f's subnormal handling is three more instructions).
// - Persistent blocks (one per SM) taking query tiles from a queue (an atomic counter), heaviest
//   first: the next tile's Q and K/V load while the current one finishes and stores, and uneven
//   causal tiles balance.
// - As in rung 03: masks only on tiles that cross a row's first or last visible key, tiles outside
//   every row's causal or sliding window skipped; a soft cap through tanh (soft_tanh; a kernel of its
//   own, so that the plain one keeps its registers).
// bf16/fp16, head dims 32, 64 (192-row tiles: three consumer warpgroups, 64-key tiles), 80, 96,
// 128 (128 x 128 tiles) and 192, 256 (128 x 64 tiles: O takes D / 2 registers and the stages must
// fit in shared memory). A head dim that is not a multiple
// of 64 fills its last slab partly (TMA writes zeros past it); O += P V runs one wgmma per slab,
// n64 or the remainder (n32, n16), so no padded column is computed.
#include <algorithm>

#include "../common/head_dims.cuh"
#include "../common/mma_sync.cuh"
#include "../hopper/hopper.cuh"
#include "../hopper/tensor_map.h"
#include "../hopper/wgmma_attention.cuh"
#include "attention_common.cuh"
#include "attention_rungs.h"

namespace attn::cuda {
namespace {

using namespace hopper;

using namespace wgmma_attention;

// Consumer warpgroups (64 query rows each) by head dim: three up to 64, where a tile's matrix work
// is short next to its softmax and a third warpgroup's softmax can run under the other two's
// wgmma (FlashAttention-3's 192-row tiles at head dim 64); two above, where O needs the registers.
template <int D>
struct Layout {
  static constexpr int kWG = D <= 64 ? 3 : 2;
  static constexpr int kBM = 64 * kWG, kThreads = 128 * (kWG + 1);
  // Registers a producer / consumer thread keeps (setmaxnreg; 64k a block). The producer spilled
  // at 24.
  static constexpr int kProducerRegs = 40, kConsumerRegs = kWG == 3 ? 152 : 232;
};
// Named barriers kTurn + w: consumer warpgroup w's turn to issue wgmma; kWarpgroupSync + w: the
// 128 threads of consumer warpgroup w.
constexpr int kTurn = 1, kWarpgroupSync = 4;

// Keys per K/V tile by head dim: 128, but 64 where three consumer warpgroups share the registers
// (the S and P of 128 keys spilled 232 bytes at 160 registers) or O takes most of them (above 128).
template <int D>
constexpr int keys_per_tile() {
  return D <= 64 || D > 128 ? 64 : 128;
}

template <int D, int kStagesIn = 2, int kKeys = keys_per_tile<D>()>
struct Smem {
  static constexpr int kStages = kStagesIn;
  static constexpr int kQSlab = Layout<D>::kBM * 128;          // Q: [kBM rows][64] per slab
  static constexpr int kQBytes = slabs<D>() * kQSlab;
  static constexpr int kTileBytes = slabs<D>() * kKeys * 128;  // a K or V tile: [kKeys rows][64] per slab
  static constexpr int kBytes = kQBytes + kStages * 2 * kTileBytes + 1024;
};

// A block's work item: one query tile of one (batch, head). Items are numbered head-major with a
// head's query tiles heaviest (latest, under causal) first, so that the blocks running at any time
// share a few heads' K and V in L2 and the long causal tiles start early.
// Its K/V tiles are [first_tile, tiles); those from first_masked on or before front_masked hold a
// key some row must not see.
template <int kKeys, int kBM>
struct WorkItem {
  int bh, i0, tiles, first_masked, first_tile, front_masked;
  __device__ WorkItem(const AttentionProblem& p, int q_tiles, int w) {
    bh = w / q_tiles;
    i0 = (q_tiles - 1 - w % q_tiles) * kBM;
    const int last_row = min(i0 + kBM, p.len_q) - 1;
    tiles = (p.visible_keys(last_row) + kKeys - 1) / kKeys;
    first_masked = min(p.visible_keys(i0), p.len_kv) / kKeys;
    first_tile = min(p.first_key(i0) / kKeys, tiles);
    front_masked = (p.first_key(last_row) + kKeys - 1) / kKeys;
  }
  __device__ bool masked(int t) const { return t >= first_masked || t < front_masked; }
};

// Persistent when launched with fewer blocks than work items: block x starts with item x and then
// takes the next from `next_item` (a zeroed counter: a dynamic queue, so that uneven causal items
// balance) or, without one, items x + grid, x + 2 grid, ... The producer picks the items, hands each
// to the consumers with its Q (item_slot, published before q_full completes; -1: no more) and loads
// the next item's Q and K/V while the consumers finish and store the current one.
template <class T, int D, int kStages, bool kPingPong, bool kQRegs, int kKeys, bool kCap>
__global__ void __launch_bounds__(Layout<D>::kThreads, 1)
    wgmma_attention_kernel(const __grid_constant__ CUtensorMap map_q, const __grid_constant__ CUtensorMap map_k,
                           const __grid_constant__ CUtensorMap map_v, AttentionProblem p, int* next_item) {
  using S = Smem<D, kStages, kKeys>;
  constexpr int kBM = Layout<D>::kBM, kWG = Layout<D>::kWG;
  using Item = WorkItem<kKeys, kBM>;
  static_assert(kWG == 2 || slabs<D>() == 1, "Q's slab stride in issue_scores is for 128-row tiles");
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  // K and V of a stage have their own barriers: "full" hears the TMA bytes land, "empty" hears
  // both consumer warpgroups finish with the tile. Q likewise, once per work item.
  __shared__ __align__(8) std::uint64_t q_full, q_empty, k_full[kStages], k_empty[kStages], v_full[kStages],
      v_empty[kStages];
  __shared__ int item_slot;
  unsigned char* qs = reinterpret_cast<unsigned char*>((reinterpret_cast<std::uintptr_t>(smem_raw) + 1023) & ~std::uintptr_t{1023});
  unsigned char* ring = qs + S::kQBytes;  // stage s: K at ring + 2 s kTileBytes, then V
  const int wg = threadIdx.x / 128, tid = threadIdx.x % 128;
  const int q_tiles = (p.len_q + kBM - 1) / kBM, items = q_tiles * p.batch * p.heads_q;

  if (threadIdx.x == 0) {
    mbar_init(&q_full, 1);
    mbar_init(&q_empty, kWG);
    for (int s = 0; s < kStages; ++s) {
      mbar_init(&k_full[s], 1);
      mbar_init(&v_full[s], 1);
      mbar_init(&k_empty[s], kWG);
      mbar_init(&v_empty[s], kWG);
    }
    mbar_fence_init();
  }
  __syncthreads();

  if (wg == 0) {  // producer
    regs_decrease<Layout<D>::kProducerRegs>();
    if (tid != 0) return;
    int s = 0;
    std::uint32_t phase = 0, q_phase = 0;
    for (int w = blockIdx.x;;) {
      mbar_wait(&q_empty, q_phase ^ 1);
      *static_cast<volatile int*>(&item_slot) = w < items ? w : -1;
      if (w >= items) {
        mbar_arrive(&q_full);  // releases the consumers with no more work
        break;
      }
      const Item item(p, q_tiles, w);
      const int bkv = (item.bh / p.heads_q) * p.heads_kv + (item.bh % p.heads_q) / p.group;
      mbar_expect_tx(&q_full, S::kQBytes);
      for (int slab = 0; slab < slabs<D>(); ++slab)
        tma_load_3d(qs + slab * S::kQSlab, &map_q, &q_full, 64 * slab, item.i0, item.bh);
      q_phase ^= 1;
      constexpr int kKvSlab = kKeys * 128;
      for (int t = item.first_tile; t < item.tiles; ++t) {
        unsigned char* kt = ring + s * 2 * S::kTileBytes;
        mbar_wait(&k_empty[s], phase ^ 1);
        mbar_expect_tx(&k_full[s], S::kTileBytes);
        for (int slab = 0; slab < slabs<D>(); ++slab)
          tma_load_3d(kt + slab * kKvSlab, &map_k, &k_full[s], 64 * slab, t * kKeys, bkv);
        mbar_wait(&v_empty[s], phase ^ 1);
        mbar_expect_tx(&v_full[s], S::kTileBytes);
        for (int slab = 0; slab < slabs<D>(); ++slab)
          tma_load_3d(kt + S::kTileBytes + slab * kKvSlab, &map_v, &v_full[s], 64 * slab, t * kKeys, bkv);
        if (++s == kStages) s = 0, phase ^= 1;
      }
      w = next_item ? atomicAdd(next_item, 1) + static_cast<int>(gridDim.x) : w + static_cast<int>(gridDim.x);
    }
    return;
  }

  regs_increase<Layout<D>::kConsumerRegs>();
  const int half = wg - 1, warp = tid / 32, lane = tid % 32, t4 = lane % 4;
  const unsigned char* q = qs + half * 64 * 128;  // this warpgroup's 64 rows of each Q slab
  // Turns at the tensor cores go round 0, 1, (2,) 0, ...: a warpgroup waits at its own barrier,
  // issues, and arrives at the next one's. The last warpgroup opens warpgroup 0's first turn, and
  // warpgroup 0 takes one more turn at the end, so every barrier sees as many arrivals as waits.
  const auto take_turn = [&] {
    if constexpr (kPingPong) named_barrier(kTurn + half, 256);
  };
  const auto pass_turn = [&] {
    if constexpr (kPingPong) named_barrier_arrive(kTurn + (half + 1 == kWG ? 0 : half + 1), 256);
  };
  if (kPingPong && half == kWG - 1) named_barrier_arrive(kTurn, 256);
  int s = 0;  // the ring's next stage and its phase, continued across work items
  std::uint32_t phase = 0, q_phase = 0;
  for (;;) {
    mbar_wait(&q_full, q_phase);
    q_phase ^= 1;
    const int w = *static_cast<volatile int*>(&item_slot);
    named_barrier(kWarpgroupSync + half, 128);  // every warp has read item_slot before it can change
    if (w < 0) break;
    const Item item(p, q_tiles, w);
    const int b = item.bh / p.heads_q, h = item.bh % p.heads_q;
    const int row0 = item.i0 + half * 64 + warp * 16 + lane / 4;  // this thread's rows: row0 and row0 + 8
    float o[D / 2], m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f}, sc[kKeys / 2], scale_o[2];
    unsigned pf[kKeys / 16][4], qf[D / 16][4];  // qf: unused (optimized away) without kQRegs
#pragma unroll
    for (int i = 0; i < D / 2; ++i) o[i] = 0.0f;
    const auto release_q = [&] {
      if (tid == 0) mbar_arrive(&q_empty);
    };
    const auto visible = [&p](int row) { return make_int2(p.first_key(row), p.visible_keys(row)); };
    const auto scores = [&p] {
      if constexpr (kCap) return p.score_map();
      else return p.scale_log2;
    }();
    const int t0 = item.first_tile, n = item.tiles - t0;  // tile t0 + u is the u-th of the item
    if constexpr (kQRegs) {
      load_q_fragments<D>(qf, qs, half * 64 + warp * 16, lane);
      named_barrier(kWarpgroupSync + half, 128);  // every warp's ldmatrix done before Q is refilled
      release_q();
    }
    if (n <= 0) {
      if (!kQRegs) release_q();
    } else {
      mbar_wait(&k_full[s], phase);
      take_turn();
      issue_scores<T, D, kQRegs, kKeys>(sc, qf, q, ring + s * 2 * S::kTileBytes);
      pass_turn();
      wgmma_wait<0>();
      fence_registers(sc);
      if (tid == 0) mbar_arrive(&k_empty[s]);
      if (!kQRegs && n == 1) release_q();
      softmax_tile<kKeys>(sc, m, l, scale_o, scores, visible, item.masked(t0), t0 * kKeys, row0, t4);
      pack_probabilities<T, kKeys>(pf, sc);
      for (int u = 1; u < n; ++u) {  // s, phase: the stage of tile u - 1
        const int sn = s + 1 == kStages ? 0 : s + 1;
        const std::uint32_t phase_n = sn == 0 ? phase ^ 1 : phase;
        mbar_wait(&k_full[sn], phase_n);
        take_turn();
        issue_scores<T, D, kQRegs, kKeys>(sc, qf, q, ring + sn * 2 * S::kTileBytes);
        rescale_rows<D>(o, scale_o);  // under QK^T: tile u - 1's factor, before its P V is added
        mbar_wait(&v_full[s], phase);
        issue_pv<T, D, kKeys>(o, pf, ring + s * 2 * S::kTileBytes + S::kTileBytes);
        pass_turn();
        wgmma_wait<1>();  // QK^T of tile u done; P V of tile u - 1 still running
        fence_registers(sc);
        if (tid == 0) mbar_arrive(&k_empty[sn]);
        if (!kQRegs && u == n - 1) release_q();
        softmax_tile<kKeys>(sc, m, l, scale_o, scores, visible, item.masked(t0 + u), (t0 + u) * kKeys, row0, t4);
        wgmma_wait<0>();
        fence_registers(o);
        if (tid == 0) mbar_arrive(&v_empty[s]);
        pack_probabilities<T, kKeys>(pf, sc);
        s = sn, phase = phase_n;
      }
      rescale_rows<D>(o, scale_o);
      mbar_wait(&v_full[s], phase);
      issue_pv<T, D, kKeys>(o, pf, ring + s * 2 * S::kTileBytes + S::kTileBytes);
      wgmma_wait<0>();
      fence_registers(o);
      if (tid == 0) mbar_arrive(&v_empty[s]);
      if (++s == kStages) s = 0, phase ^= 1;
    }
    store_output_rows<T, D>(p, b, h, row0, t4, o, m, l);
  }
  if (kPingPong && half == 0) named_barrier(kTurn, 256);
}

// How work items reach blocks: one block each (the hardware's block scheduler), or one block per SM
// taking items round robin (kStatic) or from a queue (kDynamic: measured best, +4-10% over the
// others under causal masking and at head dim 64, even at 128 without masking).
enum class Schedule { kGrid, kStatic, kDynamic };

template <class T, int D, int kStages = Smem<D>::kStages, bool kPingPong = true, bool kQRegs = D == 128,
          Schedule kSchedule = Schedule::kDynamic>
cudaError_t launch(const AttentionProblem& p, const CUtensorMap& q, const CUtensorMap& k, const CUtensorMap& v,
                   cudaStream_t s) {
  constexpr int kKeys = keys_per_tile<D>();
  auto kernel = p.cap_log2 != 0.0f ? wgmma_attention_kernel<T, D, kStages, kPingPong, kQRegs, kKeys, true>
                                   : wgmma_attention_kernel<T, D, kStages, kPingPong, kQRegs, kKeys, false>;
  constexpr int kBytes = Smem<D, kStages>::kBytes, kBM = Layout<D>::kBM;
  cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kBytes);
  if (e != cudaSuccess) return e;
  const long long items = static_cast<long long>((p.len_q + kBM - 1) / kBM) * p.batch * p.heads_q;
  constexpr Schedule schedule = kSchedule;
  int blocks = static_cast<int>(std::min<long long>(items, INT_MAX));
  if (schedule != Schedule::kGrid) {
    int device = 0, sms = 0;
    if ((e = cudaGetDevice(&device)) != cudaSuccess) return e;
    if ((e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device)) != cudaSuccess) return e;
    blocks = static_cast<int>(std::min<long long>(items, sms));
  }
  int* next_item = nullptr;
  if (schedule == Schedule::kDynamic && blocks < items) {
    if ((e = cudaMallocAsync(&next_item, sizeof(int), s)) != cudaSuccess) return e;
    if ((e = cudaMemsetAsync(next_item, 0, sizeof(int), s)) != cudaSuccess) {
      cudaFreeAsync(next_item, s);
      return e;
    }
  }
  kernel<<<blocks, Layout<D>::kThreads, kBytes, s>>>(q, k, v, p, next_item);
  e = cudaGetLastError();
  if (next_item) cudaFreeAsync(next_item, s);
  return e;
}

template <class T>
cudaError_t launch_dim(const AttentionProblem& p, const CUtensorMap& q, const CUtensorMap& k, const CUtensorMap& v,
                       cudaStream_t s) {
  return with_head_dim<kAttention04Caps.head_dims>(p.head_dim, [&](auto d) { return launch<T, decltype(d)::value>(p, q, k, v, s); });
}


}  // namespace

Status attention_04_supports(const AttentionArgs& args) {
  ATTN_ASSIGN_OR_RETURN(p, tensor_core_problem(args, kAttention04Caps, "attention/04_wgmma_tma"));
  ATTN_RETURN_IF_ERROR(check_arch(kAttention04Caps, "attention/04_wgmma_tma"));
  for (const TensorView* t : {&args.q, &args.k, &args.v})
    if (reinterpret_cast<std::uintptr_t>(t->data) % 16 != 0)
      return invalid_argument("q.data: attention/04_wgmma_tma needs 16-byte aligned q, k and v");
  const long long tiles = (static_cast<long long>(p.len_q) + 127) / 128 * p.batch * p.heads_q;  // the most
  if (tiles > INT_MAX / 2)  // item numbers run past the count by up to a grid
    return invalid_argument("q.shape: attention/04_wgmma_tma takes at most 2^30 - 1 tiles of 128 query rows, got " +
                            std::to_string(tiles));
  return Status::Ok();
}

Status attention_04_wgmma_tma(const AttentionArgs& args, Stream& stream) {
  ATTN_RETURN_IF_ERROR(attention_04_supports(args));
  ATTN_ASSIGN_OR_RETURN(p, tensor_core_problem(args, kAttention04Caps, "attention/04_wgmma_tma"));
  const DType dt = args.q.dtype;
  // [heads][len][D], boxes of a tile's query rows (K/V: its keys) x 64 of the head dim.
  const int q_box = p.head_dim <= 64 ? Layout<64>::kBM : Layout<128>::kBM, kv_box = p.head_dim <= 64 || p.head_dim > 128 ? 64 : 128;
  ATTN_ASSIGN_OR_RETURN(mq, tensor_map_3d(p.q, dt, p.head_dim, p.len_q, static_cast<long long>(p.batch) * p.heads_q, q_box));
  ATTN_ASSIGN_OR_RETURN(mk, tensor_map_3d(p.k, dt, p.head_dim, p.len_kv, static_cast<long long>(p.batch) * p.heads_kv, kv_box));
  ATTN_ASSIGN_OR_RETURN(mv, tensor_map_3d(p.v, dt, p.head_dim, p.len_kv, static_cast<long long>(p.batch) * p.heads_kv, kv_box));
  const cudaStream_t s = attention_stream(stream);
  const cudaError_t e = dt == DType::kBFloat16 ? launch_dim<__nv_bfloat16>(p, mq, mk, mv, s) : launch_dim<__half>(p, mq, mk, mv, s);
  return to_status(e, "attention/04_wgmma_tma launch");
}

}  // namespace attn::cuda
