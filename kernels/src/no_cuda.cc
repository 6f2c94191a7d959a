// Built when the CUDA backend is off: no CUDA variants, no CUDA executors.
#include "attn/executor.h"

namespace attn {

void register_cuda_variants(Registry&) {}

Result<std::vector<std::unique_ptr<Executor>>> make_cuda_executors(const std::vector<int>&, int) {
  return unavailable("this build has no CUDA backend (configured with ATTN_WITH_CUDA=OFF)");
}

bool built_with_cuda() { return false; }

}  // namespace attn
