// The registry: for each op, its named variants ("matmul/cpu_blocked", later "matmul/03_smem_tiled"),
// their backend and capabilities, and how to pick one for a given input.
#pragma once

#include <functional>
#include <string>
#include <string_view>
#include <tuple>
#include <vector>

#include "attn/dtype.h"
#include "attn/ops.h"
#include "attn/paged_ops.h"
#include "attn/status.h"

namespace attn {

enum class Backend : std::uint8_t { kCpu, kCuda };
const char* backend_name(Backend b);  // "cpu", "cuda"

class Stream;

// What a variant is and what it can take, as ListKernels shows it.
struct VariantInfo {
  std::string name;  // "op/variant"
  Op op = Op::kMatmul;
  Backend backend = Backend::kCpu;
  std::vector<DType> dtypes;
  std::string limits;       // in words, beyond the dtypes
  std::string description;  // one line
  // Among supported variants `auto` picks the highest priority (the fastest for the input).
  int priority = 0;
  // Minimum compute capability (major*10+minor) on CUDA; 0 means any.
  int min_compute_capability = 0;
};

template <class Args>
struct Variant {
  VariantInfo info;
  // Explains why this variant cannot take `args` (dtype, head dim, size, ...), or Ok.
  std::function<Status(const Args&)> supports;
  // Runs on `stream`; the views in `args` are in the stream's memory.
  std::function<Status(const Args&, Stream&)> run;
  // Optional: how good this variant is for these arguments (higher is faster), for variants
  // whose best range depends on the shape; info.priority when unset.
  std::function<int(const Args&)> rank;

  int rank_for(const Args& args) const { return rank ? rank(args) : info.priority; }
};

using MatmulVariant = Variant<MatmulArgs>;
using SoftmaxVariant = Variant<SoftmaxArgs>;
using AttentionVariant = Variant<AttentionArgs>;
using PagedDecodeVariant = Variant<PagedDecodeArgs>;
using PagedPrefillVariant = Variant<PagedPrefillArgs>;

// What a backend offers to selection: which backend it is and its compute capability.
struct Target {
  Backend backend = Backend::kCpu;
  int compute_capability = 0;  // major*10+minor on CUDA
};

// Whether `info` can run on `target` at all (backend and architecture), with the reason if not.
Status available_on(const VariantInfo& info, const Target& target);

template <class Args>
class OpRegistry {
 public:
  using Desc = OpDesc<Args>;

  void add(Variant<Args> v) {
    v.info.op = Desc::kOp;  // the op is the registry's, whatever the registration says
    variants_.push_back(std::move(v));
  }
  const std::vector<Variant<Args>>& variants() const { return variants_; }
  const Variant<Args>* find(std::string_view name) const {
    for (const auto& v : variants_)
      if (v.info.name == name) return &v;
    return nullptr;
  }

  // `requested` empty: the highest-priority variant available on `target` that supports `args`.
  // Otherwise that variant, or INVALID_ARGUMENT naming the reason: an unknown name, a variant of
  // another backend or architecture, or arguments it cannot take.
  Result<const Variant<Args>*> select(const Args& args, std::string_view requested, const Target& target) const {
    if (!requested.empty()) {
      const Variant<Args>* v = find(requested);
      if (!v) {
        std::string known;
        for (const auto& x : variants_) known += (known.empty() ? "" : ", ") + x.info.name;
        return invalid_argument("kernel: no variant named \"" + std::string(requested) + "\"; expected one of: " + known);
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
    return failed_precondition("kernel: no variant on the " + std::string(backend_name(target.backend)) + " backend");
  }

 private:
  std::vector<Variant<Args>> variants_;
};

// All variants of all ops (OpArgs, then PagedOpArgs), filled by each backend's register function.
class Registry {
 public:
  template <class Args>
  OpRegistry<Args>& of() {
    return std::get<OpRegistry<Args>>(ops_);
  }
  template <class Args>
  const OpRegistry<Args>& of() const {
    return std::get<OpRegistry<Args>>(ops_);
  }
  // Calls f(op_registry) for each op, in OpArgs order.
  template <class F>
  void for_each(F&& f) const {
    std::apply([&](const auto&... r) { (f(r), ...); }, ops_);
  }

  std::vector<const VariantInfo*> all() const;

 private:
  template <class Tuple>
  struct RegistriesOf;
  template <class... A>
  struct RegistriesOf<std::tuple<A...>> {
    using type = std::tuple<OpRegistry<A>...>;
  };
  RegistriesOf<decltype(std::tuple_cat(OpArgs{}, PagedOpArgs{}))>::type ops_;
};

// The registry with every backend compiled into this build (CPU always; CUDA when built with it).
const Registry& default_registry();

}  // namespace attn
