// The GPU tests' executor: one for the first GPU, made once per process (every test file of a
// binary shares it), or null where there is no usable GPU.
#pragma once

#include <cstdio>
#include <memory>
#include <vector>

#include "attn/executor.h"

namespace attn::testing {

inline Executor* gpu() {
  static std::vector<std::unique_ptr<Executor>> executors = [] {
    auto r = make_cuda_executors();
    if (!r.ok()) {
      std::fprintf(stderr, "no usable GPU: %s\n", r.status().message().c_str());
      return std::vector<std::unique_ptr<Executor>>{};
    }
    return std::move(r).value();
  }();
  return executors.empty() ? nullptr : executors.front().get();
}

}  // namespace attn::testing
