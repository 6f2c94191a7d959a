// OpenBLAS in the CPU backend: which build serves, how many threads it runs, and how a kernel that
// threads its own loop keeps OpenBLAS from threading inside it.
#pragma once

#include <string>

namespace attn::cpu {

// "OpenBLAS 0.3.21 pthread SkylakeX": the library's version, its threading flavour and the kernel
// set it picked for this CPU, as the library itself reports them at run time.
std::string openblas_description();

// Sets OpenBLAS's thread count to usable_cpus(), once (its default is the host's CPU count).
// Every path into OpenBLAS calls it first; cheap after the first time.
void configure_openblas_threads();

// Starts OpenBLAS's thread pool and faults in the scratch its calls pack into, with one threaded
// sgemm, once: the CPU executor calls it when it is made (the server's main thread, its stop
// signals already blocked, so the pool's threads inherit that mask), so that the first call does
// not pay for either.
void start_openblas_pool();

// OpenBLAS's current thread count (for tests).
int openblas_threads();

// While one of these lives, OpenBLAS runs every call on its calling thread. A kernel threading its
// own loop (query blocks, a batch of small matrices) holds one around the loop: OpenBLAS's pthread
// build would otherwise hand each of those calls to its own thread pool, N callers x N threads
// fighting for N CPUs. The 0.3.21 pthread build has no per-call or per-thread setting, only the
// process-wide openblas_set_num_threads, so holders are counted and the first sets 1, the last
// puts usable_cpus() back. A large matmul that runs meanwhile on another thread (the server's CPU
// executor runs one op at a time, tiny ops aside) gets one thread: slower, never wrong.
class SingleThreadedBlas {
 public:
  SingleThreadedBlas();
  ~SingleThreadedBlas();
  SingleThreadedBlas(const SingleThreadedBlas&) = delete;
  SingleThreadedBlas& operator=(const SingleThreadedBlas&) = delete;
};

}  // namespace attn::cpu
