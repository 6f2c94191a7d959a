// Work splitting for the CPU kernels: OpenMP when the build has it, a plain loop otherwise.
// Teams have usable_cpus() threads, the CPUs the process is given (affinity, cgroup quota): the
// OpenMP runtime's default counts the host's CPUs, ignoring a container's quota.
#pragma once

#include <cstdint>

#include "cpu_count.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace attn::cpu {

inline int hardware_threads() {
#ifdef _OPENMP
  return usable_cpus();
#else
  return 1;
#endif
}

// Lets go of the calling thread's idle OpenMP team. After a parallel region its threads spin for
// a few milliseconds before sleeping: a matmul that OpenBLAS threads right after an attention ran
// 1.6x slower, OpenBLAS's threads sharing the CPUs with that spin. The next region starts a team
// again (tens of microseconds).
inline void release_openmp_threads() {
#ifdef _OPENMP
  omp_pause_resource_all(omp_pause_soft);
#endif
}

// Calls body(i) for i in [0, n), in parallel when the total work (n x work_per_item, in rough
// multiply-adds) is worth a thread team: tiny requests stay on the calling thread.
template <class Body>
void parallel_for(std::int64_t n, std::int64_t work_per_item, Body&& body) {
#ifdef _OPENMP
  const bool worth_it = n > 1 && n * work_per_item > (1 << 16);
#pragma omp parallel for schedule(dynamic, 1) num_threads(usable_cpus()) if (worth_it)
  for (std::int64_t i = 0; i < n; ++i) body(i);
#else
  (void)work_per_item;
  for (std::int64_t i = 0; i < n; ++i) body(i);
#endif
}

}  // namespace attn::cpu
