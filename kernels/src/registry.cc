#include "attn/registry.h"

namespace attn {

void register_cpu_variants(Registry& r);   // kernels/cpu/register.cc
void register_cuda_variants(Registry& r);  // kernels/cuda/register.cc, or a no-op without CUDA

const char* backend_name(Backend b) { return b == Backend::kCpu ? "cpu" : "cuda"; }

Status available_on(const VariantInfo& info, const Target& target) {
  if (info.backend != target.backend) {
    return invalid_argument("kernel: variant " + info.name + " runs on the " +
                               backend_name(info.backend) + " backend, this server runs " +
                               backend_name(target.backend));
  }
  if (info.min_compute_capability > target.compute_capability) {
    return invalid_argument("kernel: variant " + info.name + " needs compute capability " +
                               std::to_string(info.min_compute_capability / 10) + "." +
                               std::to_string(info.min_compute_capability % 10) + ", the device has " +
                               std::to_string(target.compute_capability / 10) + "." +
                               std::to_string(target.compute_capability % 10));
  }
  return Status::Ok();
}

std::vector<const VariantInfo*> Registry::all() const {
  std::vector<const VariantInfo*> out;
  for_each([&](const auto& ops) {
    for (const auto& v : ops.variants()) out.push_back(&v.info);
  });
  return out;
}

const Registry& default_registry() {
  static const Registry registry = [] {
    Registry r;
    register_cpu_variants(r);
    register_cuda_variants(r);
    return r;
  }();
  return registry;
}

}  // namespace attn
