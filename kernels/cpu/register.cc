// The CPU backend: the embedded default, every dtype, every shape.
#include <chrono>
#include <thread>

#include <unistd.h>

#include <cstdlib>
#include <cstring>

#include "attn/executor.h"
#include "attn/hash_uniform.h"
#include "attn/registry.h"
#include "cpu_kernels.h"
#include "openblas.h"
#include "parallel.h"

namespace attn {

void register_cpu_variants(Registry& r) {
  const std::vector<DType> all(std::begin(kAllDTypes), std::end(kAllDTypes));
  const std::string blas = cpu::openblas_description();
  // Priorities: auto takes the OpenBLAS variants; the hand-written ones stay, by name.
  r.of<MatmulArgs>().add(
      {{"matmul/cpu_openblas", Op::kMatmul, Backend::kCpu, all,
        "M, N, K below 2^31; served by " + blas,
        "cblas_sgemm of " + blas +
            ", transposes passed to sgemm; float16/bfloat16 converted in 1024 x 1024 blocks",
        10, 0},
       cpu::matmul_openblas_supports,
       cpu::matmul_openblas});
  r.of<MatmulArgs>().add({{"matmul/cpu_blocked", Op::kMatmul, Backend::kCpu, all, "any shape",
                 "64x256 output tiles across threads, float32 arithmetic", 0, 0},
                [](const MatmulArgs& a) {
                  return matmul_dims(a.a, a.b, a.transpose_a, a.transpose_b).status();
                },
                cpu::matmul_blocked});
  r.of<SoftmaxArgs>().add({{"softmax/cpu", Op::kSoftmax, Backend::kCpu, all, "any shape",
                  "a row per task, float32 arithmetic", 0, 0},
                 [](const SoftmaxArgs& a) { return softmax_dims(a.x).status(); },
                 cpu::softmax_rows});
  r.of<AttentionArgs>().add({{"attention/cpu_flash", Op::kAttention, Backend::kCpu, all,
                    "any head dim; causal, sliding windows, soft caps, attention sinks; served by " + blas,
                    "flash attention on cblas_sgemm tiles of 64 queries x 128 keys (" + blas +
                        "), online softmax, (batch, head, query block) across threads",
                    10, 0},
                   OpDesc<AttentionArgs>::check, cpu::attention_flash});
  r.of<AttentionArgs>().add({{"attention/cpu", Op::kAttention, Backend::kCpu, all,
                    "any head dim; causal, sliding windows, soft caps, attention sinks",
                    "query rows across threads, float32 arithmetic", 0, 0},
                   OpDesc<AttentionArgs>::check, cpu::attention_rows});
  r.of<PagedDecodeArgs>().add(
      {{"paged_decode/cpu", Op::kPagedDecode, Backend::kCpu, all,
        "any head dim, page size; sliding windows, soft caps, attention sinks; float8 e4m3 K/V "
        "storage",
        "a (sequence, kv head) per task: append, then one pass over the pages in the "
        "window for the whole GQA group, online softmax in float32",
        0, 0},
       check_paged_decode,
       cpu::paged_decode});
  r.of<PagedPrefillArgs>().add(
      {{"paged_prefill/cpu", Op::kPagedPrefill, Backend::kCpu, all,
        "any head dim, page size; sliding windows, soft caps, attention sinks; float8 e4m3 K/V "
        "storage",
        "a (sequence, kv head) per task: append, then one pass over the pages for "
        "every new token of the group, causal or not, windowed, online softmax in "
        "float32",
        0, 0},
       check_paged_prefill,
       cpu::paged_prefill});
}

namespace {

class CpuExecutor final : public Executor {
 public:
  CpuExecutor() {
    info_.backend = Backend::kCpu;
    info_.multiprocessors = cpu::usable_cpus();
    // GetServerInfo and the startup log show this name: it says which BLAS serves.
    info_.name = "cpu: " + std::to_string(info_.multiprocessors) + " threads, " +
                 cpu::openblas_description();
    cpu::configure_openblas_threads();
    cpu::start_openblas_pool();
    info_.memory_bytes = static_cast<std::int64_t>(sysconf(_SC_PHYS_PAGES)) * sysconf(_SC_PAGE_SIZE);
  }
  const DeviceInfo& device() const override { return info_; }
  Target target() const override { return {Backend::kCpu, 0}; }
  Status execute(const OpCall& call, ExecTimings& timings) override {
    Stream stream(Backend::kCpu);
    const auto start = std::chrono::steady_clock::now();
    Status s = call.launch(stream);
    timings.kernel_ns = std::chrono::duration_cast<std::chrono::nanoseconds>(
                            std::chrono::steady_clock::now() - start)
                            .count();
    timings.execute_ns = timings.kernel_ns;
    return s;
  }

  MemoryKind resident_kind() const override { return MemoryKind::kHost; }
  Result<void*> allocate(std::size_t bytes) override {
    void* p = std::aligned_alloc(64, (std::max<std::size_t>(bytes, 1) + 63) / 64 * 64);
    if (!p) return resource_exhausted("host memory: cannot allocate " + std::to_string(bytes) + " bytes");
    return p;
  }
  void deallocate(void* p) override { std::free(p); }
  Status write(void* dst, std::size_t offset, const void* src, std::size_t bytes) override {
    std::memcpy(static_cast<char*>(dst) + offset, src, bytes);
    return Status::Ok();
  }
  Status read(void* dst, const void* src, std::size_t offset, std::size_t bytes) override {
    std::memcpy(dst, static_cast<const char*>(src) + offset, bytes);
    return Status::Ok();
  }
  Status fill_random(void* dst, DType dtype, std::int64_t n, std::uint64_t seed) override {
    cpu::parallel_for(n, 8, [&](std::int64_t i) {
      store_from_float(dst, dtype, static_cast<std::size_t>(i), uniform_from_hash(seed, static_cast<std::uint64_t>(i)));
    });
    return Status::Ok();
  }

 private:
  DeviceInfo info_;
};

}  // namespace

std::unique_ptr<Executor> make_cpu_executor() { return std::make_unique<CpuExecutor>(); }

}  // namespace attn
