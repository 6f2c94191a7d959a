#include "attn/registry.h"

#include <algorithm>

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

template <class Args>
Result<const Variant<Args>*> OpRegistry<Args>::select(const Args& args, std::string_view requested,
                                                      const Target& target) const {
  if (!requested.empty()) {
    const Variant<Args>* v = find(requested);
    if (!v) {
      std::string known;
      for (const auto& x : variants_) known += (known.empty() ? "" : ", ") + x.info.name;
      return invalid_argument("kernel: no variant named \"" + std::string(requested) +
                       "\"; expected one of: " + known);
    }
    ATTN_RETURN_IF_ERROR(available_on(v->info, target));
    ATTN_RETURN_IF_ERROR(v->supports(args));
    return v;
  }
  const Variant<Args>* best = nullptr;
  int best_rank = 0;
  Status first_refusal;
  for (const auto& v : variants_) {
    if (!available_on(v.info, target).ok()) continue;
    Status s = v.supports(args);
    if (!s.ok()) {
      if (first_refusal.ok()) first_refusal = s;
      continue;
    }
    const int r = v.rank_for(args);
    if (!best || r > best_rank) best = &v, best_rank = r;
  }
  if (best) return best;
  if (!first_refusal.ok()) return first_refusal;
  return failed_precondition("kernel: no variant on the " + std::string(backend_name(target.backend)) +
                             " backend");
}

template class OpRegistry<MatmulArgs>;
template class OpRegistry<SoftmaxArgs>;
template class OpRegistry<AttentionArgs>;

std::vector<const VariantInfo*> Registry::all() const {
  std::vector<const VariantInfo*> out;
  for (const auto& v : matmul.variants()) out.push_back(&v.info);
  for (const auto& v : softmax.variants()) out.push_back(&v.info);
  for (const auto& v : attention.variants()) out.push_back(&v.info);
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
