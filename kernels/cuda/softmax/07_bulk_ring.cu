// softmax/07_bulk_ring: persistent blocks (one per SM, 1024 threads) streaming rows through a
// ring of 2-4 shared-memory stages filled by bulk asynchronous copies (cp.async.bulk, an mbarrier
// counting the bytes in). A stage is issued as soon as the one it replaces has been written out,
// so while a block reduces, exchanges and stores one stage the next ones are already in flight:
// 64-200 KB per SM, where 05 and 06 had only what their registers held, and nothing while a row
// waited on its reductions or cluster barrier (06 at 256k: load -> reduce -> barrier -> store in
// series, 0.52x of copy). A stage is either
// - several whole rows (rows up to 100 KB), a group of 1024/R threads per row (8 lanes for rows
//   of 1 KB and less: more rows, so more bytes, per warp than 05's warp per row); or
// - one slice of a wider row, a cluster of 2-16 blocks sharing the row, which exchange their
//   (max, sum) through distributed shared memory, double-buffered so one cluster barrier a row
//   suffices.
// Shared memory is read twice (an online max/sum pass, then the normalizing pass with 16-byte
// stores to global memory). Rows must be whole 16-byte vectors (width x element size a multiple
// of 16) and the tensors 16-byte aligned; other widths are refused (05 and 06 take them).
// Measured (H200): ahead only at bf16 1k (0.86x of copy, 05 0.65x) and fp32 64k (0.75x, 06
// 0.69x); 0.86x flat at fp32 1k-16k, and below 06 from 128k. Each SM is bound by its own stage
// loop (one stage ahead or three: the same), not by bytes in flight; see bench/NOTES.md.
#include <cooperative_groups.h>

#include <atomic>
#include <string>

#include "../hopper/hopper.cuh"
#include "softmax_common.cuh"
#include "softmax_rungs.h"

namespace attn::cuda {
namespace {

namespace cg = cooperative_groups;
using hopper::bulk_load;
using hopper::mbar_expect_tx;
using hopper::mbar_fence_init;
using hopper::mbar_init;
using hopper::mbar_wait;

constexpr int kThreads = 1024, kWarps = kThreads / 32;
constexpr int kMaxStages = 4, kMaxCluster = 16;
constexpr long long kStageTarget = 64 << 10;    // bytes a stage of whole rows aims at
constexpr long long kSharedBudget = 200 << 10;  // dynamic shared memory for the ring
constexpr long long kMaxSlice = kSharedBudget / 2;  // a row slice must fit twice
constexpr unsigned kPiece = 32 << 10;           // bytes a bulk copy moves at most

// How a launch splits the problem; computed on the host, read by every thread.
struct RingPlan {
  const void* x;
  void* y;
  long long rows;
  long long units;     // stages' worth of work: groups of `rows_per_stage` rows, or rows (split)
  int cols;
  int row_vectors;     // 16-byte vectors a row
  int rows_per_stage;  // R: 1 when split
  int group;           // threads a row: kThreads / R
  int slice_vectors;   // split: vectors a block's slice holds (the last slice may be shorter)
  int stage_bytes;     // bytes of one stage's buffer
  int stages;          // S
};

// One thread's (max, sum of exp(x - max)) over `n` 16-byte vectors of shared memory, v = t,
// t + stride, ...; -inf entries add nothing.
template <class T>
__device__ __forceinline__ MaxSum reduce_vectors(const uint4* v, int n, int t, int stride) {
  constexpr int kPer = 16 / sizeof(T);
  float m = -INFINITY, s = 0.0f;
#pragma unroll 4
  for (int i = t; i < n; i += stride) {
    const uint4 raw = v[i];
    const T* e = reinterpret_cast<const T*>(&raw);
    float vm = to_float(e[0]);
#pragma unroll
    for (int j = 1; j < kPer; ++j) vm = fmaxf(vm, to_float(e[j]));
    const float nm = fmaxf(m, vm);
    if (nm != -INFINITY) {  // else everything so far is -inf: s stays 0
      float vs = 0.0f;
#pragma unroll
      for (int j = 0; j < kPer; ++j) vs += __expf(to_float(e[j]) - nm);
      s = s * __expf(m - nm) + vs;  // m = -inf: s is 0 and exp(-inf) = 0
      m = nm;
    }
  }
  return {m, s};
}

template <class T>
__device__ __forceinline__ void store_vectors(const uint4* v, uint4* out, int n, int t, int stride, MaxSum total) {
  constexpr int kPer = 16 / sizeof(T);
  const float inv = 1.0f / total.s;
#pragma unroll 4
  for (int i = t; i < n; i += stride) {
    const uint4 raw = v[i];
    const T* e = reinterpret_cast<const T*>(&raw);
    uint4 o;
    T* oe = reinterpret_cast<T*>(&o);
#pragma unroll
    for (int j = 0; j < kPer; ++j) oe[j] = from_float<T>(__expf(to_float(e[j]) - total.m) * inv);
    out[i] = o;
  }
}

// Combines over aligned groups of `lanes` lanes (a power of two <= 32) of the warp.
__device__ __forceinline__ MaxSum lanes_combine(MaxSum v, int lanes) {
  for (int o = lanes / 2; o > 0; o >>= 1) {
    MaxSum other{__shfl_xor_sync(0xffffffffu, v.m, o), __shfl_xor_sync(0xffffffffu, v.s, o)};
    v = combine(v, other);
  }
  return v;
}

// Stage k of this block's sequence: unit q + k * Q, where q is this block's cluster (its block
// with kSplit false) and Q the number of clusters. Thread 0 issues the copies.
template <class T, bool kSplit>
__device__ __forceinline__ void issue(const RingPlan& p, char* ring, std::uint64_t* full, long long unit, int k,
                                      int part) {
  const int stage = k % p.stages;
  char* dst = ring + static_cast<long long>(stage) * p.stage_bytes;
  const char* src;
  long long bytes;
  if constexpr (kSplit) {
    const int begin = part * p.slice_vectors;
    const int end = min(p.row_vectors, begin + p.slice_vectors);
    bytes = end > begin ? 16LL * (end - begin) : 0;
    src = static_cast<const char*>(p.x) + (unit * p.row_vectors + begin) * 16LL;
  } else {
    const long long first = unit * p.rows_per_stage;
    const long long n = min(static_cast<long long>(p.rows_per_stage), p.rows - first);
    bytes = n * p.row_vectors * 16LL;
    src = static_cast<const char*>(p.x) + first * p.row_vectors * 16LL;
  }
  mbar_expect_tx(&full[stage], static_cast<std::uint32_t>(bytes));
  for (long long off = 0; off < bytes; off += kPiece) {
    const unsigned n = static_cast<unsigned>(min(static_cast<long long>(kPiece), bytes - off));
    bulk_load(dst + off, src + off, n, &full[stage]);
  }
}

template <class T, bool kSplit>
__global__ void __launch_bounds__(kThreads, 1) bulk_ring_kernel(RingPlan p) {
  extern __shared__ __align__(128) char ring[];
  __shared__ __align__(8) std::uint64_t full[kMaxStages];
  __shared__ MaxSum scratch[kWarps];
  __shared__ MaxSum exchange[2];  // split: this block's total for even and odd k
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  int part = 0, parts = 1;
  long long q = blockIdx.x, clusters = gridDim.x;
  if constexpr (kSplit) {
    cg::cluster_group cluster = cg::this_cluster();
    part = static_cast<int>(cluster.block_rank());
    parts = static_cast<int>(cluster.num_blocks());
    q = blockIdx.x / parts;
    clusters = gridDim.x / parts;
  }
  if (tid == 0) {
    for (int s = 0; s < p.stages; ++s) mbar_init(&full[s], 1);
    mbar_fence_init();
  }
  __syncthreads();
  if (tid == 0)
    for (int k = 0; k < p.stages && q + k * clusters < p.units; ++k)
      issue<T, kSplit>(p, ring, full, q + k * clusters, k, part);

  // Rows mode: thread tid serves row tid / group of the stage, as lane tid % group of its group.
  const int g = kSplit ? 0 : tid / p.group, t = kSplit ? tid : tid % p.group;
  const int stride = kSplit ? kThreads : p.group;
  int vectors = p.row_vectors;  // this thread's row (or slice) in the stage, in vectors
  int first_vector = 0;         // where the slice starts in the row
  if constexpr (kSplit) {
    first_vector = part * p.slice_vectors;
    vectors = max(0, min(p.row_vectors, first_vector + p.slice_vectors) - first_vector);
  }
  int k = 0;
  for (long long unit = q; unit < p.units; unit += clusters, ++k) {
    const int stage = k % p.stages;
    mbar_wait(&full[stage], static_cast<std::uint32_t>((k / p.stages) & 1));
    const uint4* buf = reinterpret_cast<const uint4*>(ring + static_cast<long long>(stage) * p.stage_bytes);
    const long long row = kSplit ? unit : unit * p.rows_per_stage + g;
    const bool active = row < p.rows;
    const uint4* mine = buf + static_cast<long long>(g) * p.row_vectors;
    MaxSum total = active ? reduce_vectors<T>(mine, vectors, t, stride) : MaxSum{-INFINITY, 0.0f};
    total = lanes_combine(total, min(stride, 32));
    if (kSplit || stride > 32) {
      if (lane == 0) scratch[warp] = total;
      __syncthreads();
      if constexpr (kSplit) {
        static_assert(kWarps == 32, "warp 0 combines one partial a lane");
        if (warp == 0) {
          const MaxSum b = lanes_combine(scratch[lane], 32);
          if (lane == 0) exchange[k & 1] = b;
        }
        // Every block's exchange[k & 1] is written. Its previous content (k - 2) was read by
        // all blocks before they arrived at the barrier of k - 1, so one barrier a row suffices.
        cg::cluster_group cluster = cg::this_cluster();
        cluster.sync();
        MaxSum r{-INFINITY, 0.0f};
        if (lane < parts) r = *cluster.map_shared_rank(&exchange[k & 1], lane);
        total = lanes_combine(r, 32);
      } else {
        // A group is whole warps here: each of its warps combines the group's partials, one a lane.
        const int per = stride / 32;
        total = lanes_combine(lane < per ? scratch[g * per + lane] : MaxSum{-INFINITY, 0.0f}, 32);
      }
    }
    if (active) {
      uint4* out = reinterpret_cast<uint4*>(static_cast<T*>(p.y) + row * p.cols) + first_vector;
      store_vectors<T>(mine, out, vectors, t, stride, total);
    }
    // The stage is read out (and, rows mode, scratch too): refill it with stage k + S.
    __syncthreads();
    const long long next = unit + static_cast<long long>(p.stages) * clusters;
    if (tid == 0 && next < p.units) issue<T, kSplit>(p, ring, full, next, k + p.stages, part);
  }
  if constexpr (kSplit) cg::this_cluster().sync();  // no block leaves while another reads its exchange
}

// The plan for `p`, or an empty optional-like plan (stages 0) when the row is too wide.
RingPlan plan_for(const SoftmaxProblem& p, int element_bytes, int* cluster) {
  RingPlan r{};
  r.x = p.x;
  r.y = p.y;
  r.rows = p.rows;
  r.cols = p.cols;
  const long long row_bytes = static_cast<long long>(p.cols) * element_bytes;
  r.row_vectors = static_cast<int>(row_bytes / 16);
  *cluster = 1;
  if (row_bytes <= kMaxSlice) {
    int rows_per_stage = 1;
    while (rows_per_stage < kThreads / 8 && 2 * rows_per_stage * row_bytes <= kStageTarget) rows_per_stage *= 2;
    r.rows_per_stage = rows_per_stage;
    r.group = kThreads / rows_per_stage;
    r.slice_vectors = r.row_vectors;
    r.stage_bytes = static_cast<int>(rows_per_stage * row_bytes);
    r.units = (p.rows + rows_per_stage - 1) / rows_per_stage;
  } else {
    int c = 2;
    while (c < kMaxCluster && (static_cast<long long>(r.row_vectors) + c - 1) / c * 16 > kMaxSlice) c *= 2;
    *cluster = c;
    r.rows_per_stage = 1;
    r.group = kThreads;
    r.slice_vectors = (r.row_vectors + c - 1) / c;
    r.stage_bytes = r.slice_vectors * 16;
    r.units = p.rows;
  }
  r.stages = r.stage_bytes > 0 ? static_cast<int>(kSharedBudget / r.stage_bytes) : kMaxStages;
  if (r.stages > kMaxStages) r.stages = kMaxStages;
  if (r.stage_bytes > kMaxSlice) r.stages = 0;  // too wide even for 16 blocks
  return r;
}

// Blocks (clusters of 2^i blocks) resident at once, per device, plus one; 0: not asked yet. The
// attributes and the occupancy queries are host work that every call would otherwise repeat (in
// attn-bench, inside the timed events), so each kernel asks once per device and cluster size.
constexpr int kMaxDevices = 16;
template <class T, bool kSplit>
std::atomic<int> g_resident[kMaxDevices][5];

template <class T, bool kSplit>
cudaError_t launch(const RingPlan& plan, int cluster, cudaStream_t s) {
  auto* kernel = bulk_ring_kernel<T, kSplit>;
  const int smem = plan.stages * plan.stage_bytes;
  int device = 0;
  cudaError_t e = cudaGetDevice(&device);
  if (e != cudaSuccess) return e;
  int log2_cluster = 0;
  while ((1 << log2_cluster) < cluster) ++log2_cluster;
  std::atomic<int>* cached = device < kMaxDevices ? &g_resident<T, kSplit>[device][log2_cluster] : nullptr;
  long long resident = cached ? cached->load(std::memory_order_relaxed) - 1 : -1;
  cudaLaunchConfig_t config{};
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = static_cast<size_t>(smem);
  config.stream = s;
  cudaLaunchAttribute attr{};
  attr.id = cudaLaunchAttributeClusterDimension;
  attr.val.clusterDim.x = static_cast<unsigned>(cluster);
  attr.val.clusterDim.y = 1;
  attr.val.clusterDim.z = 1;
  config.attrs = &attr;
  config.numAttrs = cluster > 1 ? 1 : 0;
  // Persistent: as many blocks (clusters) as are resident at once, or fewer when units are few.
  // Every plan uses more than half an SM's shared memory and all of its registers: one block an
  // SM whatever the stage size, so the count depends on the cluster size alone.
  if (resident < 0) {
    e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(kSharedBudget));
    if (e != cudaSuccess) return e;
    if (cluster > 8) {
      e = cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
      if (e != cudaSuccess) return e;
    }
    if constexpr (kSplit) {
      config.gridDim = dim3(static_cast<unsigned>(cluster));
      int clusters = 0;
      e = cudaOccupancyMaxActiveClusters(&clusters, kernel, &config);
      if (e != cudaSuccess) return e;
      resident = clusters;
    } else {
      int sms = 0, per_sm = 0;
      if ((e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device)) != cudaSuccess) return e;
      if ((e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem)) != cudaSuccess)
        return e;
      resident = static_cast<long long>(sms) * per_sm;
    }
    if (resident < 1) return cudaErrorInvalidConfiguration;
    if (cached) cached->store(static_cast<int>(resident) + 1, std::memory_order_relaxed);
  }
  const long long units = plan.units < resident ? plan.units : resident;
  config.gridDim = dim3(static_cast<unsigned>(units * cluster));
  return cudaLaunchKernelEx(&config, kernel, plan);
}

}  // namespace
Status softmax_07_supports(const SoftmaxArgs& args) {
  ATTN_ASSIGN_OR_RETURN(p, softmax_problem(args));
  const int bytes = static_cast<int>(element_size(args.x.dtype));
  if ((static_cast<long long>(p.cols) * bytes) % 16 != 0) {
    return invalid_argument("x.shape: softmax/07_bulk_ring copies whole 16-byte vectors, so width x " +
                            std::to_string(bytes) + " bytes must be a multiple of 16; got width " +
                            std::to_string(p.cols) + " (use softmax/05_vectorized or 06_split_row)");
  }
  int cluster = 0;
  if (plan_for(p, bytes, &cluster).stages < 2) {
    return invalid_argument("x.shape: softmax/07_bulk_ring holds a row in the shared memory of up to 16 blocks, "
                            "up to " + std::to_string(kMaxCluster * kMaxSlice / bytes) + " " +
                            std::string(dtype_name(args.x.dtype)) + " columns; got " + std::to_string(p.cols) +
                            " (use softmax/04_online)");
  }
  if ((reinterpret_cast<std::uintptr_t>(p.x) | reinterpret_cast<std::uintptr_t>(p.y)) % 16 != 0)
    return invalid_argument("x.data, y.data: softmax/07_bulk_ring needs 16-byte aligned tensors");
  return Status::Ok();
}

Status softmax_07_bulk_ring(const SoftmaxArgs& args, Stream& stream) {
  ATTN_RETURN_IF_ERROR(softmax_07_supports(args));
  ATTN_ASSIGN_OR_RETURN(p, softmax_problem(args));
  if (p.rows == 0 || p.cols == 0) return Status::Ok();
  int cluster = 1;
  const RingPlan plan = plan_for(p, static_cast<int>(element_size(args.x.dtype)), &cluster);
  cudaError_t e = cudaSuccess;
  with_dtype(args.x.dtype, [&](auto tag) {
    using T = decltype(tag);
    e = cluster > 1 ? launch<T, true>(plan, cluster, softmax_stream(stream))
                    : launch<T, false>(plan, cluster, softmax_stream(stream));
  });
  if (e != cudaSuccess) return to_status(e, "softmax/07_bulk_ring launch");
  return to_status(cudaGetLastError(), "softmax/07_bulk_ring launch");
}

}  // namespace attn::cuda
