#include "openblas.h"

#include <cblas.h>
#include <dlfcn.h>

#include <cstdlib>
#include <memory>
#include <mutex>
#include <sstream>

#include "cpu_count.h"

namespace attn::cpu {
namespace {

std::mutex threads_mutex;
int single_threaded_holders = 0;  // guarded by threads_mutex

}  // namespace

std::string openblas_description() {
  // openblas_get_config(): "OpenBLAS 0.3.21 NO_LAPACKE DYNAMIC_ARCH NO_AFFINITY SkylakeX ...".
  std::istringstream config(openblas_get_config());
  std::string name, version;
  config >> name >> version;
  const int parallel = openblas_get_parallel();  // 0 sequential, 1 pthreads, 2 OpenMP
  const char* flavour = parallel == 1 ? "pthread" : parallel == 2 ? "openmp" : "serial";
  return name + " " + version + " " + flavour + " " + openblas_get_corename();
}

void configure_openblas_threads() {
  static std::once_flag once;
  std::call_once(once, [] {
    const std::lock_guard<std::mutex> lock(threads_mutex);
    openblas_set_num_threads(usable_cpus());
    // After a threaded call the pool's threads spin (sched_yield) for 2^28 cycles, ~0.1 s,
    // before they sleep: an attention right after a matmul ran 2x slower, its threads sharing
    // the CPUs with that spin. 2^20 cycles (~0.4 ms) instead; waking a sleeping pool costs
    // microseconds, next to milliseconds of a matmul worth threading. OpenBLAS reads the variable
    // when it loads and builds its pool; read again here, the pool restarted below takes it. A
    // value the user set is kept.
    setenv("OPENBLAS_THREAD_TIMEOUT", "20", /*overwrite=*/0);
    using Hook = int (*)();
    if (auto read_env = reinterpret_cast<void (*)()>(dlsym(RTLD_DEFAULT, "openblas_read_env")))
      read_env();
    // The pthread build starts its pool when the library loads, before main() runs, so those
    // threads have no signal blocked. attnd blocks SIGINT/SIGTERM in main() and takes them with
    // sigwait (server/main.cc): a signal sent to the process would go to a pool thread instead
    // and kill the process by its default action. Stopping the pool here (the CPU executor is
    // made after main() blocked them) makes OpenBLAS start it again at its next threaded call,
    // from the calling thread, whose signal mask the new threads inherit. blas_thread_shutdown_
    // is the pool's own exported stop, the one its fork handler uses; builds without a pool
    // (OpenMP, serial) lack it, hence the lookups.
    if (auto shutdown = reinterpret_cast<Hook>(dlsym(RTLD_DEFAULT, "blas_thread_shutdown_")))
      shutdown();
  });
}

void start_openblas_pool() {
  static std::once_flag once;
  std::call_once(once, [] {
    configure_openblas_threads();
    // One 1024^3 sgemm (~7 ms on 2 cores), which OpenBLAS threads: it starts the pool that
    // configure_openblas_threads stopped (from this thread, so with its signal mask) and touches
    // the pool's packing scratch. Without it the server's first matmul started the pool and
    // faulted that scratch inside its kernel time: 1.2-3.4x a later call's kernel time, ~1,000
    // more page faults (bench/results/2026-12-07-cpu-matmul-server.md).
    constexpr int n = 1024;
    const std::size_t elements = std::size_t{n} * n;
    auto a = std::make_unique<float[]>(elements), b = std::make_unique<float[]>(elements),
         c = std::make_unique<float[]>(elements);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, n, n, 1.0f, a.get(), n, b.get(), n,
                0.0f, c.get(), n);
  });
}

int openblas_threads() { return openblas_get_num_threads(); }

SingleThreadedBlas::SingleThreadedBlas() {
  configure_openblas_threads();
  const std::lock_guard<std::mutex> lock(threads_mutex);
  if (single_threaded_holders++ == 0) openblas_set_num_threads(1);
}

SingleThreadedBlas::~SingleThreadedBlas() {
  const std::lock_guard<std::mutex> lock(threads_mutex);
  if (--single_threaded_holders == 0) openblas_set_num_threads(usable_cpus());
}

}  // namespace attn::cpu
