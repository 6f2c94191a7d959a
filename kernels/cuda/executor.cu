// The CUDA executor: one per device, used by one worker thread. Inputs go host -> pinned staging
// -> device on the executor's stream, into buffers from the device's stream-ordered pool (no
// cudaMalloc per call); CUDA events time the copies and the kernel. The pinned staging is bounded
// (two buffers of kStagingChunk): a call larger than one buffer streams through both in turn, the
// host copy of one chunk overlapping the DMA of the other, so a 1 GB call costs no 1 GB of pinned
// memory and nothing stays pinned after it.
#include <cuda_runtime.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <thread>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "attn/executor.h"
#include "attn/hash_uniform.h"
#include "cuda_check.h"

namespace attn {
namespace {

using Clock = std::chrono::steady_clock;

// Stops the kernel with a trap: the context is poisoned (cudaErrorLaunchFailure, sticky), as
// after an out-of-bounds access in a real kernel.
__global__ void trap_kernel() { asm volatile("trap;"); }

template <class T>
__global__ void fill_random_kernel(T* out, std::int64_t n, std::uint64_t seed) {
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const float f = uniform_from_hash(seed, static_cast<std::uint64_t>(i));
    if constexpr (std::is_same_v<T, float>) out[i] = f;
    else if constexpr (std::is_same_v<T, __half>) out[i] = __float2half_rn(f);
    else out[i] = __float2bfloat16_rn(f);
  }
}

// memcpy on several threads for large copies: one thread moves ~5 GB/s between pageable and
// pinned memory, well below what PCIe and the memory system can take.
void parallel_memcpy(void* dst, const void* src, std::size_t bytes) {
  constexpr std::size_t kPerThread = std::size_t{4} << 20;
  const std::size_t threads = std::min<std::size_t>(8, bytes / kPerThread);
  if (threads < 2) {
    std::memcpy(dst, src, bytes);
    return;
  }
  const std::size_t part = (bytes / threads + 63) / 64 * 64;
  std::vector<std::thread> pool;
  for (std::size_t t = 1; t < threads; ++t) {
    const std::size_t off = t * part;
    if (off >= bytes) break;
    pool.emplace_back([=] { std::memcpy(static_cast<char*>(dst) + off, static_cast<const char*>(src) + off,
                                        std::min(part, bytes - off)); });
  }
  std::memcpy(dst, src, std::min(part, bytes));
  for (auto& th : pool) th.join();
}

// One staging buffer's size. Calls up to it (every decode step) take one copy each way; larger
// ones stream in chunks of it. 32 MiB keeps 8 host threads busy per chunk and the DMA engine fed.
constexpr std::size_t kStagingChunk = std::size_t{32} << 20;

std::int64_t ns_between(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(b - a).count();
}

class CudaExecutor final : public Executor {
 public:
  static Result<std::unique_ptr<Executor>> create(int ordinal, int stream) {
    std::unique_ptr<CudaExecutor> ex(new CudaExecutor());
    ex->info_.stream = stream;
    ATTN_RETURN_IF_ERROR(ex->init(ordinal));
    return std::unique_ptr<Executor>(std::move(ex));
  }

  ~CudaExecutor() override {
    cudaSetDevice(info_.ordinal);
    for (auto* e : events_)
      if (e) cudaEventDestroy(e);
    if (stream_) cudaStreamDestroy(stream_);
    if (side_stream_) cudaStreamDestroy(side_stream_);
    for (auto* e : chunk_done_)
      if (e) cudaEventDestroy(e);
    for (char* buffer : staging_)
      if (buffer) cudaFreeHost(buffer);
  }

  const DeviceInfo& device() const override { return info_; }
  Target target() const override { return {Backend::kCuda, info_.cc_major * 10 + info_.cc_minor}; }
  bool poisoned() const override { return poisoned_; }
  std::size_t pinned_staging_bound() const override { return 2 * kStagingChunk; }
  std::int64_t memory_in_use() const override {
    std::uint64_t used = 0;
    if (!pool_ || cudaMemPoolGetAttribute(pool_, cudaMemPoolAttrUsedMemCurrent, &used) != cudaSuccess)
      return 0;
    return static_cast<std::int64_t>(used);
  }

  // Resident memory comes from the same pool on a side stream, synchronized before it is handed
  // out, so a store call never waits behind the worker's kernels (and never touches staging).
  MemoryKind resident_kind() const override { return MemoryKind::kDevice; }
  Result<void*> allocate(std::size_t bytes) override {
    ATTN_CUDA_RETURN(cudaSetDevice(info_.ordinal));
    void* p = nullptr;
    ATTN_RETURN_IF_ERROR(check(cudaMallocAsync(&p, std::max<std::size_t>(bytes, 1), side_stream_),
                               "cudaMallocAsync (resident)"));
    ATTN_RETURN_IF_ERROR(check(cudaStreamSynchronize(side_stream_), "cudaMallocAsync (resident)"));
    return p;
  }
  void deallocate(void* p) override {
    cudaSetDevice(info_.ordinal);
    cudaFreeAsync(p, side_stream_);
  }
  Status write(void* dst, std::size_t offset, const void* src, std::size_t bytes) override {
    ATTN_CUDA_RETURN(cudaSetDevice(info_.ordinal));
    ATTN_RETURN_IF_ERROR(check(cudaMemcpyAsync(static_cast<char*>(dst) + offset, src, bytes,
                                               cudaMemcpyHostToDevice, side_stream_),
                               "cudaMemcpyAsync (to a resident tensor)"));
    return check(cudaStreamSynchronize(side_stream_), "cudaMemcpyAsync (to a resident tensor)");
  }
  Status read(void* dst, const void* src, std::size_t offset, std::size_t bytes) override {
    ATTN_CUDA_RETURN(cudaSetDevice(info_.ordinal));
    ATTN_RETURN_IF_ERROR(check(cudaMemcpyAsync(dst, static_cast<const char*>(src) + offset, bytes,
                                               cudaMemcpyDeviceToHost, side_stream_),
                               "cudaMemcpyAsync (from a resident tensor)"));
    return check(cudaStreamSynchronize(side_stream_), "cudaMemcpyAsync (from a resident tensor)");
  }
  Status fill_random(void* dst, DType dtype, std::int64_t n, std::uint64_t seed) override {
    ATTN_CUDA_RETURN(cudaSetDevice(info_.ordinal));
    const int blocks = static_cast<int>(std::min<std::int64_t>((n + 255) / 256, 65535));
    if (n > 0) {
      if (dtype == DType::kFloat32)
        fill_random_kernel<<<blocks, 256, 0, side_stream_>>>(static_cast<float*>(dst), n, seed);
      else if (dtype == DType::kFloat16)
        fill_random_kernel<<<blocks, 256, 0, side_stream_>>>(static_cast<__half*>(dst), n, seed);
      else
        fill_random_kernel<<<blocks, 256, 0, side_stream_>>>(static_cast<__nv_bfloat16*>(dst), n, seed);
    }
    ATTN_RETURN_IF_ERROR(check(cudaGetLastError(), "fill_random launch"));
    return check(cudaStreamSynchronize(side_stream_), "fill_random");
  }

  Status inject_fault() override {
    ATTN_CUDA_RETURN(cudaSetDevice(info_.ordinal));
    trap_kernel<<<1, 1, 0, stream_>>>();
    ATTN_RETURN_IF_ERROR(check(cudaGetLastError(), "trap_kernel launch"));
    return check(cudaStreamSynchronize(stream_), "fault injection (trap_kernel)");
  }

  Status execute(const OpCall& call, ExecTimings& timings) override {
    if (poisoned_) return unavailable("device " + info_.label() + " faulted earlier; restart the server");
    ATTN_CUDA_RETURN(cudaSetDevice(info_.ordinal));
    const auto begin = Clock::now();
    StagedCall staged(*this, call);  // its views point back at host memory when it ends
    ATTN_RETURN_IF_ERROR(staged.allocate());
    const auto pack = Clock::now();
    staged.pack_inputs();  // a chunked call packs as it copies, in copy_in
    const auto packed = Clock::now();
    ATTN_RETURN_IF_ERROR(check(cudaEventRecord(events_[0], stream_), "cudaEventRecord"));
    ATTN_RETURN_IF_ERROR(staged.copy_in());
    ATTN_RETURN_IF_ERROR(check(cudaEventRecord(events_[1], stream_), "cudaEventRecord"));
    staged.point_at_device();
    ATTN_RETURN_IF_ERROR(launch(call));
    ATTN_RETURN_IF_ERROR(check(cudaEventRecord(events_[2], stream_), "cudaEventRecord"));
    ATTN_RETURN_IF_ERROR(staged.copy_out());
    ATTN_RETURN_IF_ERROR(check(cudaEventRecord(events_[3], stream_), "cudaEventRecord"));
    const auto issued = Clock::now();
    ATTN_RETURN_IF_ERROR(check(cudaStreamSynchronize(stream_), "the kernel"));
    const auto unpack = Clock::now();
    staged.unpack_outputs();
    const auto done = Clock::now();

    float h2d_ms = 0, kernel_ms = 0, d2h_ms = 0;
    cudaEventElapsedTime(&h2d_ms, events_[0], events_[1]);
    cudaEventElapsedTime(&kernel_ms, events_[1], events_[2]);
    cudaEventElapsedTime(&d2h_ms, events_[2], events_[3]);
    timings.h2d_ns = ns_between(pack, packed) + static_cast<std::int64_t>(h2d_ms * 1e6);
    timings.kernel_ns = static_cast<std::int64_t>(kernel_ms * 1e6);
    timings.d2h_ns = static_cast<std::int64_t>(d2h_ms * 1e6) + ns_between(unpack, done) + staged.chunked_out_ns();
    timings.issue_ns = ns_between(begin, issued) - ns_between(pack, packed) - staged.chunked_out_ns();
    timings.wait_ns = ns_between(issued, unpack);
    timings.execute_ns = ns_between(begin, Clock::now());
    return Status::Ok();
  }

 private:
  CudaExecutor() = default;

  // One call's views in host memory, moved through pinned staging into device buffers from the
  // pool (resident views are used where they are). While the kernel runs the views point at the
  // device buffers; when the StagedCall ends the buffers go back to the pool and the views point
  // at host memory again.
  class StagedCall {
   public:
    // Each view at a 256-byte aligned offset: the inputs, then the outputs, in one device block,
    // so a call makes one pool allocation, one copy in and one copy out however many views it
    // has (a decode call has six inputs: three tensors and its page tables). The staging buffer
    // mirrors that layout, a chunk of it at a time when the call is larger than one buffer.
    StagedCall(CudaExecutor& ex, const OpCall& call) : ex_(ex) {
      for (auto* v : call.inputs)
        if (v->memory != MemoryKind::kDevice) ins_.push_back(v), in_at_.push_back(in_bytes_), in_bytes_ += aligned(v->bytes());
      for (auto* v : call.outputs)
        if (v->memory != MemoryKind::kDevice)
          outs_.push_back(v), out_at_.push_back(out_bytes_), out_bytes_ += aligned(v->bytes());
      for (auto* v : ins_) in_host_.push_back(v->data);
      for (auto* v : outs_) out_host_.push_back(v->data);
    }
    ~StagedCall() {
      if (device_) cudaFreeAsync(device_, ex_.stream_);
      std::size_t i = 0;
      for (auto* views : {&ins_, &outs_})
        for (TensorView* v : *views)
          if (i < host_.size()) v->data = host_[i++], v->memory = MemoryKind::kHost;
    }
    StagedCall(const StagedCall&) = delete;
    StagedCall& operator=(const StagedCall&) = delete;

    Status allocate() {
      const std::size_t largest = std::max(in_bytes_, out_bytes_);
      ATTN_RETURN_IF_ERROR(ex_.ensure_staging(0, std::min(largest, kStagingChunk)));
      if (largest > kStagingChunk) ATTN_RETURN_IF_ERROR(ex_.ensure_staging(1, kStagingChunk));
      if (in_bytes_ + out_bytes_ == 0) return Status::Ok();
      return ex_.check(cudaMallocAsync(&device_, in_bytes_ + out_bytes_, ex_.stream_), "cudaMallocAsync");
    }
    // Host -> pinned staging, on the calling thread (a call within one buffer).
    void pack_inputs() {
      if (in_bytes_ <= kStagingChunk) pack_window(0, in_bytes_, ex_.staging_[0]);
    }
    Status copy_in() {
      if (in_bytes_ == 0) return Status::Ok();
      if (in_bytes_ <= kStagingChunk)
        return ex_.check(cudaMemcpyAsync(device_, ex_.staging_[0], in_bytes_, cudaMemcpyHostToDevice, ex_.stream_),
                         "cudaMemcpyAsync (host to device)");
      // Chunk c goes through buffer c % 2 once that buffer's previous copy has finished.
      for (std::size_t c = 0, begin = 0; begin < in_bytes_; ++c, begin += kStagingChunk) {
        const std::size_t end = std::min(begin + kStagingChunk, in_bytes_);
        if (c >= 2) ATTN_RETURN_IF_ERROR(ex_.check(cudaEventSynchronize(ex_.chunk_done_[c % 2]), "staging chunk"));
        pack_window(begin, end, ex_.staging_[c % 2]);
        ATTN_RETURN_IF_ERROR(ex_.check(cudaMemcpyAsync(static_cast<char*>(device_) + begin, ex_.staging_[c % 2],
                                                       end - begin, cudaMemcpyHostToDevice, ex_.stream_),
                                       "cudaMemcpyAsync (host to device)"));
        ATTN_RETURN_IF_ERROR(ex_.check(cudaEventRecord(ex_.chunk_done_[c % 2], ex_.stream_), "cudaEventRecord"));
      }
      return Status::Ok();
    }
    void point_at_device() {
      for (std::size_t i = 0; i < ins_.size(); ++i) point(ins_[i], in_at_[i]);
      for (std::size_t o = 0; o < outs_.size(); ++o) point(outs_[o], in_bytes_ + out_at_[o]);
    }
    Status copy_out() {
      if (out_bytes_ == 0) return Status::Ok();
      char* from = static_cast<char*>(device_) + in_bytes_;
      if (out_bytes_ <= kStagingChunk)
        return ex_.check(cudaMemcpyAsync(ex_.staging_[0], from, out_bytes_, cudaMemcpyDeviceToHost, ex_.stream_),
                         "cudaMemcpyAsync (device to host)");
      // The kernel first (its time is its own), then chunk c + 1's DMA runs while chunk c is
      // copied out of its buffer on the host.
      ATTN_RETURN_IF_ERROR(ex_.check(cudaEventSynchronize(ex_.events_[2]), "the kernel"));
      const auto start = Clock::now();
      const std::size_t chunks = (out_bytes_ + kStagingChunk - 1) / kStagingChunk;
      auto issue = [&](std::size_t c) {
        const std::size_t begin = c * kStagingChunk, end = std::min(begin + kStagingChunk, out_bytes_);
        ATTN_RETURN_IF_ERROR(ex_.check(cudaMemcpyAsync(ex_.staging_[c % 2], from + begin, end - begin,
                                                       cudaMemcpyDeviceToHost, ex_.stream_),
                                       "cudaMemcpyAsync (device to host)"));
        return ex_.check(cudaEventRecord(ex_.chunk_done_[c % 2], ex_.stream_), "cudaEventRecord");
      };
      ATTN_RETURN_IF_ERROR(issue(0));
      for (std::size_t c = 0; c < chunks; ++c) {
        if (c + 1 < chunks) ATTN_RETURN_IF_ERROR(issue(c + 1));
        ATTN_RETURN_IF_ERROR(ex_.check(cudaEventSynchronize(ex_.chunk_done_[c % 2]), "staging chunk"));
        const std::size_t begin = c * kStagingChunk;
        unpack_window(begin, std::min(begin + kStagingChunk, out_bytes_), ex_.staging_[c % 2]);
      }
      chunked_out_ns_ = ns_between(start, Clock::now());
      return Status::Ok();
    }
    // Pinned staging -> the host outputs, once the stream has finished (a call within one buffer).
    void unpack_outputs() {
      if (out_bytes_ <= kStagingChunk) unpack_window(0, out_bytes_, ex_.staging_[0]);
    }
    std::int64_t chunked_out_ns() const { return chunked_out_ns_; }

   private:
    static std::size_t aligned(std::size_t bytes) { return (std::max<std::size_t>(bytes, 1) + 255) / 256 * 256; }
    // The parts of the views (at `at` in the block's layout) inside [begin, end), between host
    // memory and a staging buffer that holds that window.
    template <class Copy>
    static void each_part(const std::vector<TensorView*>& views, const std::vector<std::size_t>& at,
                          std::size_t begin, std::size_t end, Copy&& copy) {
      for (std::size_t i = 0; i < views.size(); ++i) {
        const std::size_t lo = std::max(at[i], begin), hi = std::min(at[i] + views[i]->bytes(), end);
        if (lo < hi) copy(i, lo - at[i], lo - begin, hi - lo);
      }
    }
    void pack_window(std::size_t begin, std::size_t end, char* buffer) {
      each_part(ins_, in_at_, begin, end, [&](std::size_t i, std::size_t from, std::size_t to, std::size_t n) {
        parallel_memcpy(buffer + to, static_cast<const char*>(in_host_[i]) + from, n);
      });
    }
    void unpack_window(std::size_t begin, std::size_t end, const char* buffer) {
      each_part(outs_, out_at_, begin, end, [&](std::size_t o, std::size_t to, std::size_t from, std::size_t n) {
        parallel_memcpy(static_cast<char*>(out_host_[o]) + to, buffer + from, n);
      });
    }
    void point(TensorView* v, std::size_t at) {
      host_.push_back(v->data);
      v->data = static_cast<char*>(device_) + at;
      v->memory = MemoryKind::kDevice;
    }

    CudaExecutor& ex_;
    std::vector<TensorView*> ins_, outs_;
    std::vector<std::size_t> in_at_, out_at_;  // offsets in the device block (and the staging layout)
    std::vector<void*> in_host_, out_host_;    // the views' host memory
    std::size_t in_bytes_ = 0, out_bytes_ = 0;
    void* device_ = nullptr;
    std::vector<void*> host_;  // the views' host pointers while they point at the device block
    std::int64_t chunked_out_ns_ = 0;
  };

  // The op's kernels on the stream. A refusal before any launch leaves the device fine; a CUDA
  // error may not (check marks it poisoned).
  Status launch(const OpCall& call) {
    Stream stream(Backend::kCuda, stream_, info_.ordinal);
    const Status launched = call.launch(stream);
    ATTN_RETURN_IF_ERROR(check(cudaGetLastError(), "kernel launch"));
    return launched;
  }

  Status init(int ordinal) {
    info_.backend = Backend::kCuda;
    info_.ordinal = ordinal;
    ATTN_CUDA_RETURN(cudaSetDevice(ordinal));
    cudaDeviceProp prop{};
    ATTN_CUDA_RETURN(cudaGetDeviceProperties(&prop, ordinal));
    info_.name = prop.name;
    info_.memory_bytes = static_cast<std::int64_t>(prop.totalGlobalMem);
    info_.multiprocessors = prop.multiProcessorCount;
    info_.cc_major = prop.major;
    info_.cc_minor = prop.minor;
    ATTN_CUDA_RETURN(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    ATTN_CUDA_RETURN(cudaStreamCreateWithFlags(&side_stream_, cudaStreamNonBlocking));
    for (auto*& e : events_) ATTN_CUDA_RETURN(cudaEventCreate(&e));
    for (auto*& e : chunk_done_) ATTN_CUDA_RETURN(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    // Keep freed pool memory cached for the next call instead of returning it to the driver.
    ATTN_CUDA_RETURN(cudaDeviceGetDefaultMemPool(&pool_, ordinal));
    cudaMemPool_t pool = pool_;
    std::uint64_t keep = UINT64_MAX;
    ATTN_CUDA_RETURN(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep));
    return Status::Ok();
  }

  // Staging buffer `which` holds at least `bytes` (<= kStagingChunk). Buffer 0 grows at least 2x
  // at a time, so slowly growing calls do not re-pin memory every call; neither passes the chunk.
  Status ensure_staging(int which, std::size_t bytes) {
    if (bytes <= staging_bytes_[which]) return Status::Ok();
    const std::size_t want = std::min(std::max(bytes, staging_bytes_[which] * 2), kStagingChunk);
    if (staging_[which]) cudaFreeHost(staging_[which]);
    staging_[which] = nullptr;
    staging_bytes_[which] = 0;
    void* p = nullptr;
    ATTN_RETURN_IF_ERROR(check(cudaMallocHost(&p, want), "cudaMallocHost (pinned staging)"));
    staging_[which] = static_cast<char*>(p);
    staging_bytes_[which] = want;
    return Status::Ok();
  }

  // Converts a CUDA error and, for an error that poisons the context, marks the device faulted.
  Status check(cudaError_t e, const char* what) {
    if (e == cudaSuccess) return Status::Ok();
    if (cuda::is_sticky(e)) poisoned_ = true;
    if (e == cudaErrorMemoryAllocation) cudaGetLastError();  // not sticky: clear it
    return cuda::to_status(e, what);
  }

  DeviceInfo info_;
  cudaStream_t stream_ = nullptr;
  cudaStream_t side_stream_ = nullptr;  // resident-memory work (the store), apart from the ops
  cudaMemPool_t pool_ = nullptr;
  cudaEvent_t events_[4] = {};
  cudaEvent_t chunk_done_[2] = {};  // a staging buffer's last copy, in a chunked call
  char* staging_[2] = {};
  std::size_t staging_bytes_[2] = {};
  std::atomic<bool> poisoned_{false};  // set by any thread that sees a sticky error
};

}  // namespace

Result<std::vector<std::unique_ptr<Executor>>> make_cuda_executors(const std::vector<int>& ordinals,
                                                                  int streams_per_device) {
  int count = 0;
  cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess) {
    cudaGetLastError();
    return unavailable(std::string("CUDA reports ") + cudaGetErrorName(e) + ": " + cudaGetErrorString(e));
  }
  if (count == 0) return unavailable("CUDA sees no device");
  std::vector<int> wanted = ordinals;
  if (wanted.empty())
    for (int d = 0; d < count; ++d) wanted.push_back(d);
  std::vector<std::unique_ptr<Executor>> out;
  for (int d : wanted) {
    if (d < 0 || d >= count) {
      return not_found("CUDA device " + std::to_string(d) + ": expected 0.." + std::to_string(count - 1) +
                       " (" + std::to_string(count) + " visible)");
    }
    for (int s = 0; s < std::max(streams_per_device, 1); ++s) {
      ATTN_ASSIGN_OR_RETURN(ex, CudaExecutor::create(d, s));
      out.push_back(std::move(ex));
    }
  }
  return Result<std::vector<std::unique_ptr<Executor>>>(std::move(out));
}

bool built_with_cuda() { return true; }

}  // namespace attn
