// Executors run one op on one device: move the host inputs to the device, run the chosen variant
// on a stream, time it, move the outputs back. The CPU executor runs in place; the CUDA executor
// (kernels/cuda/) stages through pinned memory and a stream-ordered pool.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "attn/ops.h"
#include "attn/registry.h"
#include "attn/status.h"
#include "attn/tensor.h"

namespace attn {

// Where a kernel runs: the CPU, or one CUDA stream on one device.
class Stream {
 public:
  explicit Stream(Backend backend, void* cuda_stream = nullptr, int device = 0)
      : backend_(backend), cuda_stream_(cuda_stream), device_(device) {}
  Backend backend() const { return backend_; }
  void* cuda_stream() const { return cuda_stream_; }  // a cudaStream_t; null on the CPU
  int device() const { return device_; }

 private:
  Backend backend_;
  void* cuda_stream_;
  int device_;
};

struct DeviceInfo {
  std::string name;  // "cpu: 16 threads", "NVIDIA H100 80GB HBM3"
  Backend backend = Backend::kCpu;
  int ordinal = 0;
  std::int64_t memory_bytes = 0;
  int multiprocessors = 0;  // SMs, or hardware threads on the CPU
  int cc_major = 0, cc_minor = 0;
  int stream = 0;  // which of the device's executors (streams), from 0

  std::string label() const;  // "cpu" or "cuda:0 NVIDIA H100 80GB HBM3"
};

struct ExecTimings {
  std::int64_t h2d_ns = 0;
  std::int64_t kernel_ns = 0;
  std::int64_t d2h_ns = 0;
  // Host clock: issuing the copies and launches (driver calls), waiting for the device, and the
  // whole of execute().
  std::int64_t issue_ns = 0;
  std::int64_t wait_ns = 0;
  std::int64_t execute_ns = 0;
  // Set by the caller, not the executor: its host time before execute() (plans, stacking).
  std::int64_t prepare_ns = 0;
};

// One op, ready to run: the views it reads and writes (inside the args that `launch` captured)
// and the launch itself.
struct OpCall {
  std::vector<TensorView*> inputs;
  std::vector<TensorView*> outputs;
  std::function<Status(Stream&)> launch;
};

// `v` on `args`; both must outlive the call.
template <class Args>
OpCall make_call(const Variant<Args>& v, Args& args) {
  return {OpDesc<Args>::inputs(args), OpDesc<Args>::outputs(args), [&v, &args](Stream& s) { return v.run(args, s); }};
}

class Executor {
 public:
  virtual ~Executor() = default;
  virtual const DeviceInfo& device() const = 0;
  virtual Target target() const = 0;
  // Runs `call`. Views in host memory are copied in and out (and restored before returning);
  // views already in this executor's resident memory (memory == resident_kind()) are used where
  // they are, with no copy.
  virtual Status execute(const OpCall& call, ExecTimings& timings) = 0;

  // Resident memory: buffers that stay on this device between calls (the server's tensor store,
  // the Benchmark RPC's inputs). Device memory on a GPU, host memory on the CPU. Safe to call
  // from any thread, alongside execute().
  virtual MemoryKind resident_kind() const = 0;
  virtual Result<void*> allocate(std::size_t bytes) = 0;
  virtual void deallocate(void* p) = 0;
  // host -> resident at `offset` bytes into `dst`, and resident -> host.
  virtual Status write(void* dst, std::size_t offset, const void* src, std::size_t bytes) = 0;
  virtual Status read(void* dst, const void* src, std::size_t offset, std::size_t bytes) = 0;
  // Fills `n` elements at `dst` (resident) with uniform values in [-1, 1) from `seed`.
  virtual Status fill_random(void* dst, DType dtype, std::int64_t n, std::uint64_t seed) = 0;
  // True once a fault has poisoned the device (a CUDA illegal address, say): nothing more can
  // run on it and the process must be restarted.
  virtual bool poisoned() const { return false; }
  // Pinned host memory the executor may hold for staging, at most (0 on the CPU). Fixed, so the
  // server charges it to its in-flight memory budget once, at start.
  virtual std::size_t pinned_staging_bound() const { return 0; }
  // Device memory the executor's buffers hold now, in bytes (0 on the CPU).
  virtual std::int64_t memory_in_use() const { return 0; }
  // Test hook: makes the device fault the way a buggy kernel would (a trap that poisons the
  // CUDA context), so the server's fault path can be tested for real. The server only calls it
  // when started with --enable-fault-injection.
  virtual Status inject_fault() {
    return failed_precondition("fault injection: the " + device().label() +
                               " device has no fault to inject");
  }
};

std::unique_ptr<Executor> make_cpu_executor();

// `streams_per_device` executors per CUDA device in `ordinals` (empty: every visible device),
// each with its own stream, so that one call's copies overlap another's kernel on the same GPU;
// or the reason there are none (built without CUDA, no driver, no device, an ordinal that is not
// there).
Result<std::vector<std::unique_ptr<Executor>>> make_cuda_executors(const std::vector<int>& ordinals = {},
                                                                  int streams_per_device = 1);

// True when this build includes the CUDA backend.
bool built_with_cuda();

}  // namespace attn
