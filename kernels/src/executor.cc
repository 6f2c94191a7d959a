#include "attn/executor.h"

namespace attn {

std::string DeviceInfo::label() const {
  if (backend == Backend::kCpu) return name;
  return "cuda:" + std::to_string(ordinal) + " " + name;
}

}  // namespace attn
