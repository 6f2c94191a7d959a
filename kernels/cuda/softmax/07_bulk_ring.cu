// softmax/07_bulk_ring: persistent blocks (one per SM, 1024 threads) streaming rows through a
// ring of 3-8 shared-memory stages that bulk asynchronous copies fill (cp.async.bulk, an mbarrier
// counting the bytes in) and empty (normalized in place, written back by a bulk store). While a
// block reduces, exchanges and normalizes one stage, the next S - 2 are in flight (about 100 KB an
// SM), and its stores drain through the copy engine, not the warps: 05 and 06 had in flight only
// what their registers held, and nothing while a row waited on its reductions or its cluster
// barrier (06 at 256k: load -> reduce -> barrier -> store in series, 0.52x of copy). A stage is
// - several whole rows (rows up to 64 KB, stages of up to 48 KB), a group of 1024/R threads a row
//   (8 lanes for rows of 512 bytes and less), so narrow 16-bit rows have many rows, so many bytes,
//   a warp (05: a warp a row, 0.64x at bf16 1k); or
// - one slice of a wider row (up to 64 KB), a cluster of 2-16 blocks sharing the row, which
//   exchange their (max, sum) through distributed shared memory, double-buffered so one cluster
//   barrier a row suffices.
// Shared memory is read twice (an online max/sum pass, then the normalizing pass) and written
// once. Rows must be whole 16-byte vectors (width x element size a multiple of 16) and the
// tensors 16-byte aligned; other widths are refused (05 and 06 take them).
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
constexpr int kMaxStages = 8, kMaxCluster = 16;
constexpr long long kStageTarget = 48 << 10;    // bytes a stage of whole rows aims at
constexpr long long kSharedBudget = 200 << 10;  // dynamic shared memory for the ring
constexpr long long kMaxSlice = 64 << 10;       // a stage (rows or a slice) must fit 3 times
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

// Normalizes the same vectors in place, for the bulk store to write out.
template <class T>
__device__ __forceinline__ void normalize_vectors(uint4* v, int n, int t, int stride, MaxSum total) {
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
    v[i] = o;
  }
}

// Copies `bytes` (a multiple of 16, both addresses 16-byte aligned) from shared to global memory
// in the current bulk group.
__device__ __forceinline__ void bulk_store(void* dst, const void* src, unsigned bytes) {
  asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;\n" ::"l"(dst),
               "r"(hopper::smem_u32(src)), "r"(bytes)
               : "memory");
}
// Waits until all but the newest bulk group have read their shared memory.
__device__ __forceinline__ void bulk_wait_read_all_but_newest() {
  asm volatile("cp.async.bulk.wait_group.read 1;\n" ::: "memory");
}

// Combines over aligned groups of `lanes` lanes (a power of two <= 32) of the warp.
__device__ __forceinline__ MaxSum lanes_combine(MaxSum v, int lanes) {
  for (int o = lanes / 2; o > 0; o >>= 1) {
    MaxSum other{__shfl_xor_sync(0xffffffffu, v.m, o), __shfl_xor_sync(0xffffffffu, v.s, o)};
    v = combine(v, other);
  }
  return v;
}

// Where a unit's part lies in x and y (byte offset) and how long it is: whole rows, or this
// block's slice of a row.
template <bool kSplit>
__device__ __forceinline__ long long unit_span(const RingPlan& p, long long unit, int part, long long* bytes) {
  if constexpr (kSplit) {
    const int begin = part * p.slice_vectors;
    const int end = min(p.row_vectors, begin + p.slice_vectors);
    *bytes = end > begin ? 16LL * (end - begin) : 0;
    return (unit * p.row_vectors + begin) * 16LL;
  } else {
    const long long first = unit * p.rows_per_stage;
    const long long n = min(static_cast<long long>(p.rows_per_stage), p.rows - first);
    *bytes = n * p.row_vectors * 16LL;
    return first * p.row_vectors * 16LL;
  }
}

// Stage k of this block's sequence holds unit q + k * Q, where q is this block's cluster (its
// block with kSplit false) and Q the number of clusters. Thread 0 issues the copies.
template <bool kSplit>
__device__ __forceinline__ void issue_load(const RingPlan& p, char* ring, std::uint64_t* full, long long unit, int k,
                                           int part) {
  const int stage = k % p.stages;
  char* dst = ring + static_cast<long long>(stage) * p.stage_bytes;
  long long bytes;
  const char* src = static_cast<const char*>(p.x) + unit_span<kSplit>(p, unit, part, &bytes);
  mbar_expect_tx(&full[stage], static_cast<std::uint32_t>(bytes));
  for (long long off = 0; off < bytes; off += kPiece) {
    const unsigned n = static_cast<unsigned>(min(static_cast<long long>(kPiece), bytes - off));
    bulk_load(dst + off, src + off, n, &full[stage]);
  }
}

// Writes stage k (normalized in place) out as one bulk group.
template <bool kSplit>
__device__ __forceinline__ void issue_store(const RingPlan& p, const char* ring, long long unit, int k, int part) {
  const char* src = ring + static_cast<long long>(k % p.stages) * p.stage_bytes;
  long long bytes;
  char* dst = static_cast<char*>(p.y) + unit_span<kSplit>(p, unit, part, &bytes);
  for (long long off = 0; off < bytes; off += kPiece)
    bulk_store(dst + off, src + off, static_cast<unsigned>(min(static_cast<long long>(kPiece), bytes - off)));
  hopper::tma_store_commit();
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
  // Stages 0 .. S-2 now; stage k + S - 1 once stage k is processed and stage k - 1 (same buffer)
  // has been read out by its bulk store.
  if (tid == 0)
    for (int k = 0; k < p.stages - 1 && q + k * clusters < p.units; ++k)
      issue_load<kSplit>(p, ring, full, q + k * clusters, k, part);

  // Rows mode: thread tid serves row tid / group of the stage, as lane tid % group of its group.
  const int g = kSplit ? 0 : tid / p.group, t = kSplit ? tid : tid % p.group;
  const int stride = kSplit ? kThreads : p.group;
  int vectors = p.row_vectors;  // this thread's row (or slice) in the stage, in vectors
  if constexpr (kSplit) {
    const int first_vector = part * p.slice_vectors;
    vectors = max(0, min(p.row_vectors, first_vector + p.slice_vectors) - first_vector);
  }
  int k = 0;
  for (long long unit = q; unit < p.units; unit += clusters, ++k) {
    const int stage = k % p.stages;
    mbar_wait(&full[stage], static_cast<std::uint32_t>((k / p.stages) & 1));
    uint4* buf = reinterpret_cast<uint4*>(ring + static_cast<long long>(stage) * p.stage_bytes);
    const long long row = kSplit ? unit : unit * p.rows_per_stage + g;
    const bool active = row < p.rows;
    uint4* mine = buf + static_cast<long long>(g) * p.row_vectors;
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
    if (active) normalize_vectors<T>(mine, vectors, t, stride, total);
    hopper::fence_async_shared();  // this thread's writes, before the bulk store reads them
    // The stage is normalized (and, rows mode, scratch read): write it out, and refill the buffer
    // of stage k - 1 with stage k + S - 1 once its own store has read it.
    __syncthreads();
    if (tid == 0) {
      issue_store<kSplit>(p, ring, unit, k, part);
      const long long next = unit + static_cast<long long>(p.stages - 1) * clusters;
      if (next < p.units) {
        bulk_wait_read_all_but_newest();
        issue_load<kSplit>(p, ring, full, next, k + p.stages - 1, part);
      }
    }
  }
  if (tid == 0) hopper::tma_store_wait_all();
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
  if (r.stage_bytes > kMaxSlice) r.stages = 0;  // too wide even for 16 blocks (3 stages of 64 KB)
  return r;
}

// Blocks (clusters of 2^i blocks) resident at once, per device, plus one; 0: not asked yet. The
// attributes and the occupancy queries cost more host time than a 64 MB softmax takes on the GPU
// (the benchmark saw ~20 us a call), so each kernel asks once per device and cluster size.
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
  if (plan_for(p, bytes, &cluster).stages < 3) {
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
